import NIOCore

/// Logging in to a PostgreSQL server: from the StartupMessage to the first ReadyForQuery.
public struct ServerLoginStateMachine: Sendable {
    public enum Secret: Sendable, Equatable {
        case none
        case password(String)
        /// An md5 verifier ("md5..."): enough for md5 authentication, not for cleartext or SCRAM.
        case md5(String)
        case scramKeys(clientKey: [UInt8], serverKey: [UInt8])
    }

    public enum Action: Sendable {
        case send(ByteBuffer)
        case none
        case loggedIn(parameters: [String: String], processID: Int32, secretKey: Int32)
        case fail(PostgresError)
    }

    enum State: Sendable {
        case startup
        case scram(ScramClientExchange)
        case authenticated
        case done
    }

    let user: String
    let database: String
    let secret: Secret
    let extraParameters: [(String, String)]
    var state = State.startup
    var parameters: [String: String] = [:]
    var processID: Int32 = 0
    var secretKey: Int32 = 0

    public init(user: String, database: String, secret: Secret, extraParameters: [(String, String)] = []) {
        self.user = user
        self.database = database
        self.secret = secret
        self.extraParameters = extraParameters
    }

    /// The login to a server of `database` as `user`: the entry's client_encoding, datestyle,
    /// timezone and application_name go in the StartupMessage, then `extra` (a replication
    /// client's) for names the entry does not set.
    public init(database: DatabaseEntry, user: String, secret: Secret, extra: [(String, String)] = []) {
        var parameters: [(String, String)] = []
        if let v = database.clientEncoding { parameters.append(("client_encoding", v)) }
        if let v = database.datestyle { parameters.append(("DateStyle", v)) }
        if let v = database.timezone { parameters.append(("TimeZone", v)) }
        if let v = database.applicationName { parameters.append(("application_name", v)) }
        for (name, value) in extra where !parameters.contains(where: { $0.0 == name }) {
            parameters.append((name, value))
        }
        self.init(user: user, database: database.dbname ?? database.name, secret: secret, extraParameters: parameters)
    }

    public func startupMessage(allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 128)
        Wire.startupMessage(parameters: [("user", user), ("database", database)] + extraParameters, into: &buffer)
        return buffer
    }

    static func authFailure(_ message: String) -> PostgresError {
        PostgresError.fatal(SQLState.invalidPassword, message)
    }

    /// Takes one whole backend message.
    public mutating func receive(type: UInt8, body: ByteBuffer) -> Action {
        var body = body
        switch (type, state) {
        case (MessageType.errorResponse, _):
            state = .done
            return .fail(WireDecode.errorFields(body))
        case (MessageType.noticeResponse, _), (MessageType.negotiateProtocolVersion, _):
            return .none
        case (MessageType.authentication, .startup), (MessageType.authentication, .scram):
            guard let code = body.readInteger(as: Int32.self) else { return .fail(malformed) }
            return authenticate(code: code, body: body)
        case (MessageType.parameterStatus, .authenticated):
            if let (name, value) = WireDecode.parameterStatus(body) { parameters[name] = value }
            return .none
        case (MessageType.backendKeyData, .authenticated):
            guard let pid = body.readInteger(as: Int32.self), let key = body.readInteger(as: Int32.self) else {
                return .fail(malformed)
            }
            processID = pid
            secretKey = key
            return .none
        case (MessageType.readyForQuery, .authenticated):
            state = .done
            return .loggedIn(parameters: parameters, processID: processID, secretKey: secretKey)
        default:
            state = .done
            return .fail(
                PostgresError.fatal(
                    SQLState.protocolViolation,
                    "unexpected message '\(Character(UnicodeScalar(type)))' from server during login"))
        }
    }

    var malformed: PostgresError {
        PostgresError.fatal(SQLState.protocolViolation, "malformed message from server")
    }

    mutating func authenticate(code: Int32, body: ByteBuffer) -> Action {
        var body = body
        let allocator = ByteBufferAllocator()
        var out = allocator.buffer(capacity: 64)
        switch code {
        case 0:
            state = .authenticated
            return .none
        case 3:
            guard case .password(let password) = secret else {
                return .fail(
                    Self.authFailure("server asked for a cleartext password, but none is configured for \(user)"))
            }
            Wire.passwordMessage(password, into: &out)
            return .send(out)
        case 5:
            guard let salt = body.readBytes(length: 4) else { return .fail(malformed) }
            switch secret {
            case .password(let password):
                Wire.passwordMessage(MD5Auth.response(password: password, user: user, salt: salt), into: &out)
            case .md5(let stored):
                Wire.passwordMessage(MD5Auth.response(storedSecret: stored, salt: salt), into: &out)
            default:
                return .fail(Self.authFailure("server asked for an md5 password, but none is configured for \(user)"))
            }
            return .send(out)
        case 10:
            var mechanisms: [String] = []
            while let m = body.readNullTerminatedString(), !m.isEmpty { mechanisms.append(m) }
            guard mechanisms.contains(Scram.mechanism) else {
                return .fail(Self.authFailure("server offers no supported SASL mechanism"))
            }
            let credentials: ScramClientExchange.Credentials
            switch secret {
            case .password(let password): credentials = .password(password)
            case .scramKeys(let c, let s): credentials = .keys(clientKey: c, serverKey: s)
            default:
                return .fail(Self.authFailure("server asked for SCRAM, but no password is configured for \(user)"))
            }
            let exchange = ScramClientExchange(credentials: credentials)
            Wire.saslInitialResponse(mechanism: Scram.mechanism, data: exchange.clientFirst(), into: &out)
            state = .scram(exchange)
            return .send(out)
        case 11:
            guard case .scram(var exchange) = state else { return .fail(malformed) }
            do {
                let final = try exchange.receiveServerFirst(body.readBytes(length: body.readableBytes) ?? [])
                state = .scram(exchange)
                Wire.saslResponse(final, into: &out)
                return .send(out)
            } catch {
                return .fail(Self.authFailure("SCRAM exchange with server failed: \(error)"))
            }
        case 12:
            guard case .scram(let exchange) = state else { return .fail(malformed) }
            do {
                try exchange.receiveServerFinal(body.readBytes(length: body.readableBytes) ?? [])
                state = .startup  // AuthenticationOk follows
                return .none
            } catch {
                return .fail(Self.authFailure("server's SCRAM signature is wrong"))
            }
        default:
            return .fail(Self.authFailure("unsupported authentication method \(code) requested by server"))
        }
    }
}

extension ServerLoginStateMachine.Secret {
    /// What logs in to a server as `user`, first found first: the database entry's password (when
    /// the entry names no other user), auth_file's plain or md5 secret, what a client's login
    /// taught (SCRAM keys or a cleartext password), an md5 verifier auth_query found.
    public static func forServer(
        user: String, database: DatabaseEntry, listed: PasswordSecret?, learned: () -> Self?,
        lookedUp: () -> AuthQueryExchange.Outcome?
    ) -> Self {
        if let password = database.password, database.user == nil || database.user == user {
            return .password(password)
        }
        switch listed {
        case .plain(let p): return .password(p)
        case .md5(let m): return .md5(m)
        case .scram, nil:
            if let learned = learned() { return learned }
            if case .found(.md5(let m))? = lookedUp() { return .md5(m) }
            return .none
        }
    }
}
