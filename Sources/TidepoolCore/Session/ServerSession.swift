import NIOCore

/// One server connection's life outside a lend: its login, the queries the pooler runs on it
/// (connect_query, server_check_query, server_reset_query), idle time in the pool, and what its
/// closing means to the pool. While it is lent, its bytes belong to the client's `ClientSession`.
/// Events in, actions out; timers are armed and disarmed by action, and their firing is an event.
public struct ServerSession: Sendable {
    public enum InternalQuery: Sendable, Equatable {
        /// connect_query, right after login.
        case afterLogin
        /// server_reset_query after a session-mode client left; then back to the pool.
        case reset
        /// server_check_query before the server is lent.
        case check
    }

    public enum Phase: Sendable, Equatable {
        case connecting
        case loggingIn
        /// Idle in the pool, or lent.
        case ready
        /// Running a query of the pooler's own; its results are not shown to anybody.
        case internalQuery(InternalQuery)
        case closed
    }

    public enum Action: Sendable, Equatable {
        case send(ByteBuffer)
        /// Start the server_connect_timeout timer (login, or a query of the pooler's own).
        case armTimeout
        case disarmTimeout
        /// Logged in (and connect_query done): the pool may lend it.
        case loggedIn
        /// The connection could not be made ready; the pool learns why.
        case connectFailed(PostgresError)
        /// server_reset_query finished: back to the pool, closed unless `reusable`.
        case released(reusable: Bool)
        case checkFinished(ok: Bool)
        /// A usable server closed: its client (if lent) and the pool are told. `unused`: nothing
        /// of the linked client reached it in this lend, so the client may replay its requests.
        case lost(unused: Bool)
        case close
        case logWarning(String)
        case logInfo(String)
        /// A message for the pool's listener (`listens`).
        case forListener(type: UInt8, body: ByteBuffer)
    }

    /// The connection is a pool's listener (`ChannelListener`): once ready, what it reads goes to
    /// the listener, not to a client.
    public var listens = false

    public private(set) var phase = Phase.connecting
    var login: ServerLoginStateMachine?
    var internalFailed = false
    /// The parameters and prepared statements this backend has.
    public let state: ServerSessionState
    let connectQuery: String?
    let targetSessionAttrs: TargetSessionAttrs
    public private(set) var processID: Int32 = 0
    public private(set) var secretKey: Int32 = 0
    /// Bytes of the client linked now were written: if the server is lost before, its requests
    /// did not reach PostgreSQL (`ClientSession.serverLost`).
    public private(set) var wroteForClient = false

    /// How a connection failed, as the channel saw it; `failed` decides what the pool learns.
    public enum Fault: Sendable {
        /// An error PostgreSQL or the login sent.
        case postgres(PostgresError)
        /// The socket was reset or closed (PostgreSQL stopping): worth waiting out (08006).
        case transport(String)
        /// TLS could not be set up or a certificate was refused: not waited out (08001).
        case handshake(String)
    }

    /// `login`: how the server will be logged in to, once its connection opens (`connected`).
    public init(
        state: ServerSessionState, connectQuery: String?, targetSessionAttrs: TargetSessionAttrs = .any,
        login: ServerLoginStateMachine? = nil
    ) {
        self.state = state
        self.login = login
        self.connectQuery = connectQuery.flatMap { $0.isEmpty ? nil : $0 }
        self.targetSessionAttrs = targetSessionAttrs
    }

    /// Logged in and connect_query run: ready for the pool, unless the server is not of the kind
    /// target_session_attrs asks for (then it is closed; clients wait for one that is, as through
    /// a restart: a failover promotes one).
    mutating func ready() -> [Action] {
        guard let mismatch = targetSessionAttrs.mismatch(state.parameters) else { return [.disarmTimeout, .loggedIn] }
        phase = .closed
        return [.disarmTimeout, .connectFailed(.fatal(SQLState.cannotConnectNow, mismatch)), .close]
    }

    /// The connection is open: the login starts (`login`, else the one given at init).
    public mutating func connected(_ login: ServerLoginStateMachine? = nil) -> [Action] {
        guard let login = login ?? self.login else { return fail(.fatal(SQLState.connectionFailure, "no login")) }
        self.login = login
        phase = .loggingIn
        return [.send(login.startupMessage(allocator: ByteBufferAllocator())), .armTimeout]
    }

    /// One whole message while logging in, running a query of the pooler's own, or idle in the pool.
    public mutating func message(type: UInt8, body: ByteBuffer) -> [Action] {
        switch phase {
        case .loggingIn:
            switch login!.receive(type: type, body: body) {
            case .none: return []
            case .send(let out): return [.send(out)]
            case .fail(let error): return fail(error)
            case .loggedIn(let parameters, let pid, let key):
                login = nil
                state.parameters = parameters
                processID = pid
                secretKey = key
                phase = .ready
                guard let connectQuery else { return ready() }
                return [.disarmTimeout] + runInternal(connectQuery, purpose: .afterLogin)
            }
        case .internalQuery(let purpose):
            return internalQueryMessage(type: type, body: body, purpose: purpose)
        case .ready:
            if listens {
                if type == MessageType.errorResponse, WireDecode.errorFields(body).severity != "ERROR" {
                    phase = .closed
                    return [
                        .logInfo("listener server is going"), .disarmTimeout, .lost(unused: !wroteForClient), .close,
                    ]
                }
                return [.forListener(type: type, body: body)]
            }
            // Idle in the pool: only a ParameterStatus or a FATAL error may come.
            if type == MessageType.parameterStatus, let (name, value) = WireDecode.parameterStatus(body) {
                state.parameters[name] = value
            } else if type == MessageType.errorResponse {
                let error = WireDecode.errorFields(body)
                guard error.severity == "FATAL" || error.severity == "PANIC" else {
                    return [.logInfo("idle server reported: \(error.message)")]
                }
                // The backend is going (pg_terminate_backend, a shutdown): retired now, before the
                // pool can lend it, rather than when its socket closes.
                phase = .closed
                return [
                    .logInfo("idle server is going: \(error.message)"), .disarmTimeout, .lost(unused: !wroteForClient),
                    .close,
                ]
            }
            return []
        case .connecting, .closed:
            return []
        }
    }

    mutating func internalQueryMessage(type: UInt8, body: ByteBuffer, purpose: InternalQuery) -> [Action] {
        switch type {
        case MessageType.errorResponse:
            internalFailed = true
            return [.logWarning("\(purpose) query failed: \(WireDecode.errorFields(body).message)")]
        case MessageType.parameterStatus:
            if let (name, value) = WireDecode.parameterStatus(body) { state.parameters[name] = value }
            return []
        case MessageType.readyForQuery:
            let clean =
                !internalFailed
                && body.getInteger(at: body.readerIndex, as: UInt8.self) == TransactionStatus.idle.rawValue
            internalFailed = false
            phase = .ready
            switch purpose {
            case .afterLogin: return ready()
            case .reset: return [.disarmTimeout, .released(reusable: clean)]
            case .check:
                guard clean else {
                    phase = .closed
                    return [.disarmTimeout, .checkFinished(ok: false), .close]
                }
                return [.disarmTimeout, .checkFinished(ok: true)]
            }
        default:
            return []
        }
    }

    /// Runs a query whose results nobody sees.
    mutating func runInternal(_ sql: String, purpose: InternalQuery) -> [Action] {
        phase = .internalQuery(purpose)
        var out = ByteBufferAllocator().buffer(capacity: sql.utf8.count + 6)
        Wire.query(sql, into: &out)
        return [.send(out), .armTimeout]
    }

    /// What the pool (or a pool's listener) asks of a server, from any loop.
    public enum Command: Sendable, Equatable {
        /// server_check_query before the server is lent (pre-ping).
        case check(String)
        /// Session mode: clean the server with this query, then back to the pool.
        case reset(String)
        /// A pool's listener: run this query; its answers go to the listener (`listens`).
        case listenerQuery(String)
        /// The pool no longer wants the connection.
        case terminate
    }

    /// A command, carried out on the server's loop.
    public mutating func command(_ command: Command) -> [Action] {
        switch command {
        case .check(let sql): return check(sql)
        case .reset(let sql): return reset(sql)
        case .terminate: return terminate()
        case .listenerQuery(let sql):
            guard phase == .ready, listens else { return [] }
            var out = ByteBufferAllocator().buffer(capacity: sql.utf8.count + 6)
            Wire.query(sql, into: &out)
            return [.send(out)]
        }
    }

    /// server_check_query before the server is lent (pre-ping).
    public mutating func check(_ sql: String) -> [Action] {
        guard phase == .ready else { return [.checkFinished(ok: false)] }
        return runInternal(sql, purpose: .check)
    }

    /// Session mode: the server is cleaned with the reset query before it goes back to the pool.
    public mutating func reset(_ sql: String) -> [Action] {
        guard phase == .ready else { return [] }
        let upper = sql.uppercased()
        // Prepared statements are gone after DISCARD ALL or DEALLOCATE, not after UNLISTEN *
        // (the server would then be sent a Parse of a name it still holds: 42P05).
        if upper.contains("DISCARD ALL") || upper.contains("DEALLOCATE") { state.statements.removeAll() }
        // Settings are known gone only after a reset that resets them all.
        if upper.contains("DISCARD ALL") || upper.contains("RESET ALL") {
            state.settings.removeAll()
            // Parameters the server does not report are back at its defaults too.
            for name in StartupParameters.unreported where state.parameters[name] != nil {
                state.parameters[name] = nil
            }
        }
        return runInternal(sql, purpose: .reset)
    }

    /// server_connect_timeout passed during the login or a query of the pooler's own.
    public mutating func timedOut() -> [Action] {
        switch phase {
        case .loggingIn: return fail(.fatal(SQLState.connectionFailure, "server login timed out"))
        case .internalQuery: return [.close]  // no answer in time: the server is unusable
        default: return []
        }
    }

    /// The pool no longer wants the connection: a ready server is told Terminate first (PostgreSQL
    /// then ends the backend at once rather than logging an unexpected EOF). Its closing is still
    /// reported by `closed` when the socket closes.
    public func terminate() -> [Action] {
        switch phase {
        case .closed: return []
        case .ready:
            var out = ByteBufferAllocator().buffer(capacity: 5)
            Wire.terminate(into: &out)
            return [.send(out), .close]
        default: return [.close]
        }
    }

    /// A client is linked (a new lend): nothing of its bytes written yet.
    public mutating func attached() { wroteForClient = false }

    /// Bytes of the linked client were written.
    @inline(__always)
    public mutating func wroteClientBytes() { if !wroteForClient { wroteForClient = true } }

    /// The channel failed: the pool learns why, the connection closes.
    public mutating func failed(_ fault: Fault) -> [Action] {
        switch fault {
        case .postgres(let error): fail(error)
        case .transport(let text): fail(.fatal(SQLState.connectionFailure, "server connection: \(text)"))
        case .handshake(let text): fail(.fatal(SQLState.unableToConnect, "server TLS: \(text)"))
        }
    }

    /// Login failed (or TLS did): the pool learns why, the connection closes.
    public mutating func fail(_ error: PostgresError) -> [Action] {
        switch phase {
        case .connecting, .loggingIn:
            phase = .closed
            return [.disarmTimeout, .connectFailed(error), .close]
        case .closed:
            return []
        default:
            return [.close]
        }
    }

    /// The server sent bytes that are not PostgreSQL messages: it is closed as if it had gone.
    public mutating func badMessage() -> [Action] {
        closed() + [.close]
    }

    /// The connection closed: what that means depends on what it was doing.
    public mutating func closed() -> [Action] {
        let was = phase
        phase = .closed
        switch was {
        case .connecting, .loggingIn, .internalQuery(.afterLogin):
            let step = if case .internalQuery = was { "connect_query" } else { "login" }
            return [
                .disarmTimeout,
                .connectFailed(.fatal(SQLState.connectionFailure, "server closed the connection during \(step)")),
            ]
        case .internalQuery(.check):
            return [.disarmTimeout, .checkFinished(ok: false)]
        case .ready, .internalQuery(.reset):
            return [.disarmTimeout, .lost(unused: !wroteForClient)]
        case .closed:
            return []
        }
    }
}
