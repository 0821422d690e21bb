import NIOCore

/// Why a client is refused or closed: the FATAL it gets and the reason that is logged.
public struct Refusal: Error, Equatable, Sendable {
    public var error: PostgresError
    public var reason: String

    public init(_ error: PostgresError, reason: String) {
        self.error = error
        self.reason = reason
    }
}

/// Who is logging in, from where: what the login decisions read besides the configuration.
public struct LoginRequest: Sendable {
    public var user: String
    public var database: String
    /// The client's IP address as text; nil for a Unix socket.
    public var clientIP: String?
    public var tls: Bool
    /// The common name of the client's verified TLS certificate, if any.
    public var certificateCommonName: String?

    public init(user: String, database: String, clientIP: String?, tls: Bool, certificateCommonName: String? = nil) {
        self.user = user
        self.database = database
        self.clientIP = clientIP
        self.tls = tls
        self.certificateCommonName = certificateCommonName
    }
}

extension ClientSession {
    /// Where the secret to check the client's password against comes from.
    public enum SecretSource: Equatable, Sendable {
        /// auth_file (or the credentials learned from an earlier login) has it.
        case known(PasswordSecret)
        /// Ask auth_query.
        case lookUp
        /// No secret: trust logs in, any other method fails like a wrong password.
        case none
    }

    /// Where a logged-in client goes.
    public enum Destination: Equatable, Sendable {
        case adminConsole(readOnly: Bool)
        case pool(DatabaseEntry)
    }

    /// The client asked for the admin console: database `pooler` or `pgbouncer`, unless the
    /// configuration names a real database so.
    public static func isAdminConsole(_ database: String, config: Config) -> Bool {
        (database == "pooler" || database == "pgbouncer") && config.databases[database] == nil
    }

    /// The method the client authenticates with: auth_type, with hba resolved through
    /// auth_hba_file and cert checked against the certificate (then trusted); or the refusal.
    public static func authMethod(
        _ request: LoginRequest, config: Config, hba: HBARules?
    ) -> Result<AuthType, Refusal> {
        let sslmode = config.global.clientTLS.sslmode
        if sslmode.requiresTLS, !request.tls, request.clientIP != nil {
            return .failure(
                Refusal(
                    .fatal(SQLState.invalidAuthorization, "SSL required (client_tls_sslmode = \(sslmode.rawValue))"),
                    reason: "TLS required"))
        }
        var authType = config.global.authType
        if authType == .hba {
            switch hbaMethod(request, rules: hba) {
            case .success(let method): authType = method
            case .failure(let refusal): return .failure(refusal)
            }
        }
        if authType == .cert {
            guard let name = request.certificateCommonName, name == request.user else {
                return .failure(
                    Refusal(
                        .fatal(
                            SQLState.invalidAuthorization,
                            "certificate authentication failed for user \"\(request.user)\""
                        ), reason: "certificate authentication failed"))
            }
            authType = .trust
        }
        return .success(authType)
    }

    /// auth_type = hba: the method of the first auth_hba_file line matching the connection.
    static func hbaMethod(_ request: LoginRequest, rules: HBARules?) -> Result<AuthType, Refusal> {
        let address = request.clientIP.flatMap(HBARules.parseIP)
        guard let rules,
            let rule = rules.method(database: request.database, user: request.user, address: address, tls: request.tls)
        else {
            let host = request.clientIP ?? "local"
            return .failure(
                Refusal(
                    .fatal(
                        SQLState.invalidAuthorization,
                        "no auth_hba_file entry for host \"\(host)\", user \"\(request.user)\", database \"\(request.database)\", \(request.tls ? "SSL on" : "SSL off")"
                    ), reason: "no auth_hba_file entry"))
        }
        switch rule.method {
        case .trust: return .success(.trust)
        case .md5: return .success(.md5)
        case .scramSHA256: return .success(.scramSHA256)
        case .password: return .success(.plain)
        case .cert: return .success(.cert)
        case .reject:
            return .failure(
                Refusal(
                    .fatal(
                        SQLState.invalidAuthorization,
                        "connection rejected by auth_hba_file line \(rule.line) for user \"\(request.user)\", database \"\(request.database)\""
                    ), reason: "rejected by auth_hba_file"))
        }
    }

    /// Where the client's secret comes from, for `method` (from `authMethod`). `known` is what
    /// auth_file holds for the user; `canLookUp` whether an auth_user is set for the database (the
    /// admin console looks secrets up only through an explicit auth_dbname).
    public static func secretSource(
        _ request: LoginRequest, method: AuthType, known: PasswordSecret?, canLookUp: Bool, config: Config
    ) -> Result<SecretSource, Refusal> {
        if let known { return .success(.known(known)) }
        let lookUp = isAdminConsole(request.database, config: config) ? config.global.authDBName != nil : canLookUp
        guard method != .trust, lookUp else {
            if method == .trust, config.global.authFile != nil, config.global.authType != .hba {
                return .failure(
                    Refusal(
                        .fatal(SQLState.invalidAuthorization, "user \"\(request.user)\" is not in auth_file"),
                        reason: "not in auth_file"))
            }
            return .success(.none)
        }
        return .success(.lookUp)
    }

    /// Where an authenticated client goes: the admin console (for admin_users and stats_users) or
    /// its database's pool, if the database exists and is not disabled.
    public static func destination(
        _ request: LoginRequest, config: Config, isDisabled: (String) -> Bool
    ) -> Result<Destination, Refusal> {
        if isAdminConsole(request.database, config: config) {
            let isAdmin = config.global.adminUsers.contains(request.user)
            guard isAdmin || config.global.statsUsers.contains(request.user) else {
                return .failure(
                    Refusal(
                        .fatal(
                            SQLState.insufficientPrivilege,
                            "not allowed: \(request.user) is not in admin_users or stats_users"),
                        reason: "not an admin user"))
            }
            return .success(.adminConsole(readOnly: !isAdmin))
        }
        guard let database = config.database(named: request.database) else {
            return .failure(
                Refusal(
                    .fatal(SQLState.invalidCatalogName, "database \"\(request.database)\" does not exist"),
                    reason: "unknown database"))
        }
        if isDisabled(request.database) {
            return .failure(
                Refusal(
                    .fatal(SQLState.cannotConnectNow, "database \"\(request.database)\" does not allow connections"),
                    reason: "database disabled"))
        }
        return .success(.pool(database))
    }

    /// The application_name a client logs in with: with application_name_add_host, the client's
    /// address and port follow it (" - 10.0.0.7:51234"), as PgBouncer writes them.
    public static func applicationName(_ given: String?, clientAddress: String?, config: Config) -> String? {
        guard config.global.applicationNameAddHost else { return given }
        return "\(given ?? "") - \(clientAddress ?? "unix")"
    }

    /// What a client is told at login after AuthenticationOk: the ParameterStatus messages (the
    /// server's values with the client's own over them), and the tracked parameters it then has
    /// (its own values, the server's for the rest), so that a server with other values is brought
    /// in line when lent. Shared by the clients of a pool that want the same values.
    public struct Welcome: Sendable {
        public var messages: ByteBuffer
        public var wanted: TrackedParameters

        public init(serverParameters: [String: String], wanted: [String: String]) {
            messages = ByteBufferAllocator().buffer(capacity: 512)
            var parameters = serverParameters
            for (name, value) in wanted { parameters[name] = value }
            for (name, value) in parameters.sorted(by: { $0.key < $1.key }) {
                Wire.parameterStatus(name, value, into: &messages)
            }
            var complete = wanted
            for name in StartupParameters.tracked where complete[name] == nil {
                if let value = serverParameters[name] { complete[name] = value }
            }
            self.wanted = TrackedParameters(wrappedValue: complete)
            _ = self.wanted.projectedValue  // worked out once for every client that shares this welcome
        }
    }

    /// Sets the session up for its pool once the client is authenticated.
    public mutating func joinPool(
        poolMode: PoolMode, config: Config, user: String, now: NIODeadline
    ) {
        self.poolMode = poolMode
        let timeouts = config.clientTimeouts(user: user)
        timeoutClock = timeouts.anyEnabled ? TimeoutClock(settings: timeouts, now: now) : nil
        slowQueryThreshold = Int(config.global.logSlowQuery.nanoseconds / 1000)
        serverResetQuery = config.global.serverResetQuery
        serverResetQueryAlways = config.global.serverResetQueryAlways
        refusesSimpleQuery = config.global.disablePqexec
        if config.global.maxPreparedStatements > 0, poolMode != .session { prepared = PreparedStatementTracker() }
    }
}
