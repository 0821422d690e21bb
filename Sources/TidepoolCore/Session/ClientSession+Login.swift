import NIOCore

/// Why a client is refused or closed: the FATAL it gets and the reason that is logged.
public struct Refusal: Error, Equatable, Sendable {
    public var error: PostgresError
    public var reason: String
    /// The error is for a client that is behind in reading: it is written anyway, and the close
    /// waits a while for the client to get to it (otherwise a client not reading is closed at once).
    public var waitsForReader = false
    /// Closed without the error: it could not reach the client (a TLS handshake not finished).
    public var atOnce = false

    public init(_ error: PostgresError, reason: String) {
        self.error = error
        self.reason = reason
    }
}

extension ClientSession {
    /// How long the closing error may take to reach the client before the connection is closed
    /// anyway; nil: closed at once without it (a client not reading would never let it through,
    /// and a TLS handshake not finished cannot carry it). A client behind in reading its
    /// notifications is given longer to get to the error.
    public var closingLinger: TimeAmount? {
        guard let closing, !closing.atOnce else { return nil }
        if closing.waitsForReader { return .seconds(15) }
        return flow.clientWritable ? .seconds(5) : nil
    }
}

/// What the login decisions read besides the configuration: who is logging in, from where, and
/// what the pooler knows about them.
public struct LoginRequest: Sendable {
    public var user: String
    public var database: String
    /// The client's IP address as text; nil for a Unix socket.
    public var clientIP: String?
    public var tls: Bool
    /// The common name of the client's verified TLS certificate, if any.
    public var certificateCommonName: String?
    /// Who is at the other end of a Unix socket.
    public var peer: PeerCredentials?

    public init(
        user: String, database: String, clientIP: String?, tls: Bool, certificateCommonName: String? = nil,
        peer: PeerCredentials? = nil
    ) {
        self.user = user
        self.database = database
        self.clientIP = clientIP
        self.tls = tls
        self.certificateCommonName = certificateCommonName
        self.peer = peer
    }

    /// The user `pgbouncer` on the console over the Unix socket, from the pooler's own
    /// operating-system user: let in without a password, as an admin, as PgBouncer does.
    var isPoolerOwnConsoleLogin: Bool {
        user == "pgbouncer" && peer?.isPoolerUser == true
    }
}

/// What the runtime knows about a registered client that the login needs.
public struct LoginFacts: Sendable {
    public var config: Config
    public var hba: HBARules?
    /// "address:port" of a TCP client, nil for a Unix socket (application_name_add_host).
    public var clientAddress: String?
    public var clientIP: String?
    public var certificateCommonName: String?
    /// What auth_file (or an earlier login) holds for the user.
    public var knownSecret: PasswordSecret?
    /// An auth_user is set for the database, so auth_query can look the user up.
    public var canLookUp: Bool
    /// Who is at the other end of a Unix socket.
    public var peer: PeerCredentials?
    /// auth_ident_file's maps, for the HBA peer method.
    public var ident: IdentMap?
    /// DISABLE: the client's database refuses new clients, before any auth_query runs there.
    public var databaseDisabled = false

    public init(
        config: Config, hba: HBARules?, clientAddress: String?, clientIP: String?, certificateCommonName: String?,
        knownSecret: PasswordSecret?, canLookUp: Bool, peer: PeerCredentials? = nil, ident: IdentMap? = nil,
        databaseDisabled: Bool = false
    ) {
        self.config = config
        self.hba = hba
        self.clientAddress = clientAddress
        self.clientIP = clientIP
        self.certificateCommonName = certificateCommonName
        self.knownSecret = knownSecret
        self.canLookUp = canLookUp
        self.peer = peer
        self.ident = ident
        self.databaseDisabled = databaseDisabled
    }
}

extension ClientSession {
    /// The login's events, in order: a startup packet; once the client is registered, its facts;
    /// a looked-up secret if auth_query was needed; password messages; where the authenticated
    /// client goes; its welcome.

    /// A startup packet (SSLRequest, GSSENCRequest, CancelRequest or StartupMessage).
    /// `tlsOffered`: client TLS is configured; `bytesFollow`: more bytes came with it.
    public mutating func startupPacket(
        _ packet: StartupPacket, tlsOffered: Bool, bytesFollow: Bool, into actions: inout Actions
    ) {
        switch packet {
        case .sslRequest where !tls && tlsOffered:
            // Bytes after SSLRequest came before encryption: refused rather than read as if the
            // handshake had covered them.
            guard !bytesFollow else {
                close(
                    .fatal(SQLState.protocolViolation, "unexpected data after SSLRequest"),
                    reason: "data after SSLRequest", into: &actions)
                return
            }
            tls = true
            tlsHandshaking = true
            actions.append(.login(.startTLS))
        case .sslRequest, .gssEncRequest:
            var no = ByteBufferAllocator().buffer(capacity: 1)
            no.writeInteger(MessageType.encryptionRefused)
            write(no, into: &actions)
            actions.append(.flushClient)
        case .cancel(let processID, let secretKey):
            state = .closed
            actions.append(.login(.forwardCancel(processID: processID, secretKey: secretKey)))
            actions.append(.login(.closeQuietly))
        case .startup(let minor, let parameters, let unrecognized):
            guard let user = parameters["user"], !user.isEmpty else {
                close(
                    .fatal(SQLState.invalidAuthorization, "no PostgreSQL user name specified in startup packet"),
                    reason: "no user name", into: &actions)
                return
            }
            self.user = user
            database = parameters["database"].flatMap { $0.isEmpty ? nil : $0 } ?? user
            startup = Startup(minor: minor, parameters: parameters, unrecognized: unrecognized)
            actions.append(.login(.register))
        }
    }

    /// The client was registered (within max_client_conn and the per-address limits): the
    /// startup parameters are checked and the method and secret chosen.
    public mutating func registered(_ facts: LoginFacts, into actions: inout Actions) {
        guard let startup else { return }
        self.startup = nil
        let config = facts.config
        login?.scramIterations = config.global.scramIterations
        if startup.minor > 0 || !startup.unrecognized.isEmpty {
            var out = ByteBufferAllocator().buffer(capacity: 32)
            Wire.negotiateProtocolVersion(minor: 0, unrecognized: startup.unrecognized, into: &out)
            write(out, into: &actions)
        }
        do {
            replication = try ReplicationMode.parse(startup.parameters["replication"])
            // With session_state = track, any parameter is kept as a setting and replayed; with
            // ignore, those of track_extra_parameters.
            let keeps =
                config.database(named: database).map { config.sessionState(database: $0, user: user) } != .ignore
            let resolved = try StartupParameters.resolve(
                startup.parameters, ignored: config.global.ignoreStartupParameters, keepingOthers: keeps,
                extra: config.global.trackExtraParameters)
            wanted = resolved.wanted
            followStandardStrings()
            if !resolved.others.isEmpty { stateOfSession.startWith(resolved.others) }
        } catch {
            close(error, reason: "unsupported startup parameter", into: &actions)
            return
        }
        if let name = Self.applicationName(
            wanted["application_name"], clientAddress: facts.clientAddress, config: config)
        {
            wanted["application_name"] = name
        }
        startupParameters = wanted
        if facts.databaseDisabled {
            close(Self.disabledError(database), reason: "database disabled", into: &actions)
            return
        }
        let request = LoginRequest(
            user: user, database: database, clientIP: facts.clientIP, tls: tls,
            certificateCommonName: facts.certificateCommonName, peer: facts.peer)
        switch Self.authMethod(request, config: config, hba: facts.hba, ident: facts.ident)
            .flatMap({ method in
                Self.secretSource(
                    request, method: method, known: facts.knownSecret, canLookUp: facts.canLookUp, config: config
                ).map { (method, $0) }
            })
        {
        case .failure(let refusal):
            close(refusal.error, reason: refusal.reason, into: &actions)
        case .success((let method, .known(let secret))):
            startAuthentication(method, secret: secret, into: &actions)
        case .success((let method, .none)):
            startAuthentication(method, secret: nil, into: &actions)
        case .success((let method, .lookUp)):
            guard let login else { return }
            login.authMethod = method
            state = .lookingUpSecret(login)
            actions.append(.login(.lookUpSecret))
        }
    }

    /// auth_query answered.
    public mutating func secretLookedUp(_ outcome: AuthQueryExchange.Outcome, into actions: inout Actions) {
        guard case .lookingUpSecret(let login) = state else { return }
        switch outcome {
        case .found(let secret):
            startAuthentication(login.authMethod, secret: secret, into: &actions)
        case .notFound where login.authMethod == .trust:
            let message = "user \"\(user)\" is not in auth_file and auth_query did not find it"
            close(.fatal(SQLState.invalidAuthorization, message), reason: "no such user", into: &actions)
        case .notFound:
            startAuthentication(login.authMethod, secret: nil, into: &actions)  // fails like a wrong password
        case .failed:
            close(
                .fatal(SQLState.connectionFailure, "authentication lookup failed (auth_query)"),
                reason: "auth_query failed", into: &actions)
        }
    }

    mutating func startAuthentication(_ method: AuthType, secret: PasswordSecret?, into actions: inout Actions) {
        guard let login else { return }
        var machine = ClientAuthStateMachine(authType: method, user: user, secret: secret)
        machine.scramIterations = login.scramIterations
        let step = machine.start()
        login.auth = machine
        state = .authenticating(login)
        authenticationStep(step, into: &actions)
    }

    /// A message while authenticating: it must be a password message.
    public mutating func passwordMessage(type: UInt8, body: ByteBuffer, into actions: inout Actions) {
        guard case .authenticating = state, type == MessageType.password else {
            close(
                .fatal(SQLState.protocolViolation, "expected a password message"),
                reason: "unexpected message during login", into: &actions)
            return
        }
        let step = auth!.receivePasswordMessage(body)
        authenticationStep(step, into: &actions)
    }

    mutating func authenticationStep(_ step: ClientAuthStateMachine.Action, into actions: inout Actions) {
        switch step {
        case .send(let out):
            write(out, into: &actions)
            actions.append(.flushClient)
            if auth!.isAuthenticated { actions.append(.login(.authenticated)) }
        case .authenticated:
            actions.append(.login(.authenticated))
        case .fail(let error):
            close(error, reason: "authentication failed", into: &actions)
        }
    }

    /// What a successful login teaches about logging in to servers as this user, when the stored
    /// secret alone cannot (a SCRAM verifier): the keys recovered from the client's SCRAM proof, or
    /// the cleartext password it sent.
    public var learnedServerSecret: ServerLoginStateMachine.Secret? {
        guard let auth else { return nil }
        if let clientKey = auth.scramClientKey, let serverKey = auth.scramServerKey {
            return .scramKeys(clientKey: clientKey, serverKey: serverKey)
        }
        return auth.cleartextPassword.map { .password($0) }
    }

    /// Where the authenticated client goes (from `destination`): the admin console is welcomed
    /// here; a pool is joined by the connection (`joinPool`), which then gives the welcome.
    public mutating func enter(
        _ destination: Result<Destination, Refusal>, notice: String = "", into actions: inout Actions
    ) {
        endLogin()
        switch destination {
        case .failure(let refusal):
            close(refusal.error, reason: refusal.reason, into: &actions)
        case .success(.adminConsole) where replication != nil:
            close(
                .fatal(SQLState.featureNotSupported, "replication connections to the admin console are not supported"),
                reason: "replication to the console", into: &actions)
        case .success(.adminConsole(let readOnly)):
            state = .admin(Console(readOnly: readOnly))
            var out = ByteBufferAllocator().buffer(capacity: 256)
            Wire.authenticationOk(into: &out)
            for (name, value) in [
                ("server_version", "15.0 (Tidepool \(TidepoolCoreVersion.string))"), ("client_encoding", "UTF8"),
                ("server_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("standard_conforming_strings", "on"),
                ("integer_datetimes", "on"), ("application_name", wanted["application_name"] ?? ""),
            ] {
                Wire.parameterStatus(name, value, into: &out)
            }
            Wire.backendKeyData(processID: 0, secretKey: 0, into: &out)
            Self.loginNotice(notice, into: &out)
            Wire.readyForQuery(.idle, into: &out)
            write(out, into: &actions)
            actions.append(.flushClient)
            loginFinished(into: &actions)
        case .success(.pool):
            if replication != nil, let login {
                // Unpooled: a server of its own, then every byte passes through.
                state = .awaitingWelcome(login)
                actions.append(.login(.openReplicationServer))
                return
            }
            actions.append(.login(.joinPool))
        }
    }

    /// The connection is open: client_login_timeout (when on) counts from now, on the clock's ticks.
    public mutating func connectionOpened(now: NIODeadline, loginTimeout: TimeAmount, into actions: inout Actions) {
        guard loginTimeout > .zero else { return }
        login?.loginDeadline = now + loginTimeout
        actions.append(.watchClock)
    }

    /// Logged in: the login deadline is over, and the clock ticks the session for its timeouts
    /// only (a session watched for nothing is let go at its next tick).
    mutating func loginFinished(into actions: inout Actions) {
        login?.loginDeadline = nil
        if timeoutClock != nil { actions.append(.watchClock) }
    }

    /// The pool knows no server parameters yet: a server is borrowed to learn them.
    public mutating func awaitWelcome(into actions: inout Actions) {
        guard let login else { return }
        state = .awaitingWelcome(login)
        actions.append(.requestServer)
    }

    /// AuthenticationOk, the welcome's parameters, BackendKeyData with the client's cancel key and
    /// ReadyForQuery: the client is logged in to its pool.
    public mutating func welcome(
        _ welcome: Welcome, cancelKey: (Int32, Int32), notice: String = "", now: NIODeadline,
        into actions: inout Actions
    ) {
        var out = ByteBufferAllocator().buffer(capacity: 64 + welcome.messages.readableBytes)
        Wire.authenticationOk(into: &out)
        out.writeImmutableBuffer(welcome.messages)
        wantedParameters = welcome.wanted
        if startupParameters["DateStyle"] != nil {
            // As completed with the server's default (`Welcome`): what a reset goes back to.
            startupParameters["DateStyle"] = welcome.wanted.wrappedValue["DateStyle"]
        }
        Wire.backendKeyData(processID: cancelKey.0, secretKey: cancelKey.1, into: &out)
        Self.loginNotice(notice, into: &out)
        Wire.readyForQuery(.idle, into: &out)
        write(out, into: &actions)
        actions.append(.flushClient)
        loginFinished(into: &actions)
        loggedIn(now: now, into: &actions)
    }

    /// login_notify_message, as a NOTICE just before the first ReadyForQuery.
    static func loginNotice(_ message: String, into out: inout ByteBuffer) {
        guard !message.isEmpty else { return }
        Wire.noticeResponse(PostgresError(severity: "NOTICE", code: "00000", message: message), into: &out)
    }

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

    static func disabledError(_ database: String) -> PostgresError {
        .fatal(SQLState.cannotConnectNow, "database \"\(database)\" does not allow connections")
    }

    /// Console logins by admin users may go this far past max_client_conn, so that an operator is
    /// not locked out of a pooler full of clients (PgBouncer lets them in too).
    public static let consoleReserve = 5

    /// The client asked for the admin console: database `pooler` or `pgbouncer`, unless the
    /// configuration names a real database so.
    public static func isAdminConsole(_ database: String, config: Config) -> Bool {
        (database == "pooler" || database == "pgbouncer") && config.databases[database] == nil
    }

    /// The method the client authenticates with: auth_type, with hba resolved through
    /// auth_hba_file and cert checked against the certificate (then trusted); or the refusal.
    public static func authMethod(
        _ request: LoginRequest, config: Config, hba: HBARules?, ident: IdentMap? = nil
    ) -> Result<AuthType, Refusal> {
        if request.isPoolerOwnConsoleLogin, isAdminConsole(request.database, config: config) {
            return .success(.trust)
        }
        let sslmode = config.global.clientTLS.sslmode
        if sslmode.requiresTLS, !request.tls, request.clientIP != nil {
            return .failure(
                Refusal(
                    .fatal(SQLState.invalidAuthorization, "SSL required (client_tls_sslmode = \(sslmode.rawValue))"),
                    reason: "TLS required"))
        }
        var authType = config.global.authType
        if authType == .hba {
            switch hbaMethod(request, rules: hba, ident: ident) {
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
    static func hbaMethod(_ request: LoginRequest, rules: HBARules?, ident: IdentMap?) -> Result<AuthType, Refusal> {
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
        case .peer: return peerMethod(request, map: rule.options["map"], ident: ident)
        case .reject:
            return .failure(
                Refusal(
                    .fatal(
                        SQLState.invalidAuthorization,
                        "connection rejected by auth_hba_file line \(rule.line) for user \"\(request.user)\", database \"\(request.database)\""
                    ), reason: "rejected by auth_hba_file"))
        }
    }

    /// The HBA peer method: the client's operating-system user (SO_PEERCRED) must be the database
    /// user, or map to it in auth_ident_file's map `map`. Trusted then; refused in PostgreSQL's
    /// words otherwise.
    static func peerMethod(_ request: LoginRequest, map: String?, ident: IdentMap?) -> Result<AuthType, Refusal> {
        let failed = Refusal(
            .fatal(SQLState.invalidAuthorization, "Peer authentication failed for user \"\(request.user)\""),
            reason: "peer authentication failed")
        guard let systemUser = request.peer?.systemUser else { return .failure(failed) }
        if let map {
            guard let ident, ident.allows(map: map, systemUser: systemUser, databaseUser: request.user) else {
                return .failure(failed)
            }
            return .success(.trust)
        }
        return systemUser == request.user ? .success(.trust) : .failure(failed)
    }

    /// Where the client's secret comes from, for `method` (from `authMethod`). `known` is what
    /// auth_file holds for the user; `canLookUp` whether an auth_user is set for the database (the
    /// admin console looks secrets up only through an explicit auth_dbname).
    public static func secretSource(
        _ request: LoginRequest, method: AuthType, known: PasswordSecret?, canLookUp: Bool, config: Config
    ) -> Result<SecretSource, Refusal> {
        if let known { return .success(.known(known)) }
        if request.isPoolerOwnConsoleLogin, isAdminConsole(request.database, config: config) { return .success(.none) }
        let lookUp = isAdminConsole(request.database, config: config) ? config.global.authDBName != nil : canLookUp
        // trust (auth_type, not an HBA line) wants the user to exist, as PgBouncer: in auth_file, or
        // found by auth_query when an auth_user is set.
        let trustNeedsUser = method == .trust && config.global.authType == .trust
        guard method != .trust || trustNeedsUser, lookUp else {
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
        _ request: LoginRequest, config: Config, shuttingDown: Bool = false, isDisabled: (String) -> Bool
    ) -> Result<Destination, Refusal> {
        if isAdminConsole(request.database, config: config) {
            let isAdmin = config.global.adminUsers.contains(request.user) || request.isPoolerOwnConsoleLogin
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
        // A shutdown that waits keeps the Unix socket open for the console only.
        if shuttingDown {
            return .failure(
                Refusal(.fatal(SQLState.cannotConnectNow, "server shutting down"), reason: "server shutting down"))
        }
        guard let database = config.database(named: request.database) else {
            return .failure(
                Refusal(
                    .fatal(SQLState.invalidCatalogName, "no such database: \(request.database)"),
                    reason: "unknown database"))
        }
        if isDisabled(request.database) {
            return .failure(Refusal(disabledError(request.database), reason: "database disabled"))
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
            var wanted = wanted
            if let given = wanted["DateStyle"], let serverDefault = serverParameters["DateStyle"] {
                // A style or an order alone (pgjdbc sends "ISO") goes with the server's default
                // for the other, as at a PostgreSQL login, and is shown as PostgreSQL spells it.
                wanted["DateStyle"] = StartupParameters.dateStyle(serverDefault, then: given)
            }
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

    /// The client's TLS handshake finished.
    public mutating func tlsEstablished() { tlsHandshaking = false }

    /// Sets the session up for its pool once the client is authenticated.
    /// Takes the pool settings of the client's database entry (nil when a RELOAD removed it since
    /// the client was let in: the client is refused as one naming an unknown database is). False
    /// when refused.
    public mutating func joinPool(
        _ entry: DatabaseEntry?, config: Config, now: NIODeadline, into actions: inout Actions
    )
        -> Bool
    {
        guard let entry else {
            close(
                .fatal(SQLState.invalidCatalogName, "no such database: \(database)"), reason: "no such database",
                into: &actions)
            return false
        }
        joinPool(
            poolMode: config.poolMode(database: entry, user: user),
            sessionStateMode: config.sessionState(database: entry, user: user), config: config, user: user, now: now)
        return true
    }

    public mutating func joinPool(
        poolMode: PoolMode, sessionStateMode: SessionStateMode = .track, config: Config, user: String,
        now: NIODeadline
    ) {
        self.poolMode = poolMode
        let timeouts = config.clientTimeouts(user: user)
        timeoutClock = timeouts.anyEnabled ? TimeoutClock(settings: timeouts, now: now) : nil
        slowQueryThreshold = Int(config.global.logSlowQuery.nanoseconds / 1000)
        serverResetQuery = config.global.serverResetQuery
        serverResetQueryAlways = config.global.serverResetQueryAlways
        refusesSimpleQuery = config.global.disablePqexec
        notifyQueueSize = config.global.notifyQueueSize
        if config.global.maxPreparedStatements > 0, poolMode != .session { prepared = PreparedStatementTracker() }
        tracksSessionState = poolMode != .session && sessionStateMode != .ignore
        refusesPins = poolMode != .session && sessionStateMode == .refuse
    }
}
