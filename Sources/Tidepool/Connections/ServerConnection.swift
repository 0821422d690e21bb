import Foundation
import Logging
import NIOCore
import NIOPosix
import TidepoolCore

/// One connection from the pooler to PostgreSQL. It logs in, then either sits idle in the pool
/// or is linked to one client, to which it passes every byte it reads.
///
/// Threading: all mutable state is touched on `eventLoop` only, except `parameters`, which only the
/// linked client touches (the hand-over through the event loops orders those accesses).
final class ServerConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Address: Sendable {
        case tcp(host: String, port: Int)
        case unix(path: String)

        /// Where a database entry points: a host, or a directory holding PostgreSQL's socket.
        init(_ database: DatabaseEntry?) {
            let host = database?.host ?? "/var/run/postgresql"
            let port = database?.port ?? 5432
            self = host.hasPrefix("/") ? .unix(path: "\(host)/.s.PGSQL.\(port)") : .tcp(host: host, port: port)
        }

        func connect(_ bootstrap: ClientBootstrap) -> EventLoopFuture<Channel> {
            switch self {
            case .tcp(let host, let port): bootstrap.connect(host: host, port: port)
            case .unix(let path): bootstrap.connect(unixDomainSocketPath: path)
            }
        }
    }

    struct CancelTarget: Sendable {
        var address: Address
        var processID: Int32
        var secretKey: Int32
    }

    enum InternalQuery {
        /// connect_query, right after login.
        case afterLogin
        /// server_reset_query after a session-mode client left; then back to the pool.
        case reset
        /// server_check_query before the server is lent.
        case check
    }

    enum Phase {
        case connecting
        case loggingIn(ServerLoginStateMachine)
        case ready
        /// Running a query of the pooler's own; its results are not shown to anybody.
        case internalQuery(InternalQuery)
        case closed
    }

    let id: ServerID
    let pool: PoolKey
    let address: Address
    /// unowned(unsafe): the pooler outlives every connection (it stops its event loops before it
    /// goes), and a checked unowned reference cost an atomic retain and release per use.
    unowned(unsafe) let pooler: Pooler
    private(set) var channel: Channel?
    var context: ChannelHandlerContext?
    var phase = Phase.connecting
    var inbound = KeptBytes()
    var scanner = MessageScanner()
    var owner: ClientConnection?
    /// Lends of this server are numbered under the pool lock (`leasesIssued`); the server follows
    /// only the newest (`leases`, on its loop), so an attach or detach that reaches its loop late
    /// (queued from another loop behind a newer lend) changes nothing.
    var leasesIssued: UInt64 = 0
    var leases = LeaseTracker()
    var loginTimeout: Scheduled<Void>?
    let database: DatabaseEntry?

    let connectedAtWallClock = Date().timeIntervalSince1970
    /// The parameters and prepared statements this backend has; the linked client's session
    /// reads and updates them.
    let sessionState: ServerSessionState
    /// ParameterStatus values as this backend last reported them.
    var parameters: [String: String] {
        get { sessionState.parameters }
        set { sessionState.parameters = newValue }
    }
    var processID: Int32 = 0
    var secretKey: Int32 = 0

    /// The index of the server's event loop in the pooler's table.
    let loopIndex: Int
    /// Waiting in its loop's `TurnFlusher`.
    var flushQueued = false

    init(id: ServerID, pool: PoolKey, database: DatabaseEntry?, pooler: Pooler, loopIndex: Int) {
        self.id = id
        self.loopIndex = loopIndex
        self.pool = pool
        self.pooler = pooler
        self.database = database
        self.sessionState = ServerSessionState(maxPreparedStatements: pooler.config.global.maxPreparedStatements)
        self.address = Address(database)
    }

    static func placeholder(id: ServerID, pool: PoolKey, pooler: Pooler) -> ServerConnection {
        ServerConnection(id: id, pool: pool, database: nil, pooler: pooler, loopIndex: 0)
    }

    /// The server's event loop, known before its channel exists. Other threads use this, never
    /// `channel`, which is set on that loop.
    var eventLoop: EventLoop { pooler.loops[loopIndex] }

    // MARK: Login

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Runs server_check_query before the server is lent (pre-ping).
    func check(_ sql: String) {
        onLoop {
            guard case .ready = self.phase, let context = self.context else {
                self.pooler.checkFinished(self, ok: false)
                return
            }
            self.runInternal(sql, purpose: .check, context: context)
        }
    }

    func channelActive(context: ChannelHandlerContext) {
        guard let database else { return }
        let user = database.user ?? pool.user
        let secret = pooler.serverSecret(user: user, database: database)
        var extra: [(String, String)] = []
        if let v = database.clientEncoding { extra.append(("client_encoding", v)) }
        if let v = database.datestyle { extra.append(("DateStyle", v)) }
        if let v = database.timezone { extra.append(("TimeZone", v)) }
        if let v = database.applicationName { extra.append(("application_name", v)) }
        let login = ServerLoginStateMachine(
            user: user, database: database.dbname ?? database.name, secret: secret, extraParameters: extra)
        phase = .loggingIn(login)
        context.writeAndFlush(wrapOutboundOut(login.startupMessage(allocator: context.channel.allocator)), promise: nil)
        loginTimeout = context.eventLoop.scheduleTask(in: pooler.config.global.serverConnectTimeout) { [self] in
            if case .loggingIn = phase {
                fail(
                    PostgresError.fatal(SQLState.connectionFailure, "server login timed out"))
            }
        }
    }

    func fail(_ error: PostgresError) {
        if case .closed = phase { return }
        phase = .closed
        loginTimeout?.cancel()
        pooler.serverConnectFailed(self, error: error)
        channel?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .ready = phase, let owner, inbound.isEmpty {
            // The hot path: hand the bytes to the client as they are.
            let bytes = unwrapInboundIn(data)
            if owner.loopIndex == loopIndex {
                owner.serverData(bytes, from: self)  // same loop: no task, no closure
            } else {
                owner.eventLoop.execute { owner.serverData(bytes, from: self) }
            }
            return
        }
        var buffer = unwrapInboundIn(data)
        inbound.prepend(to: &buffer)
        do {
            while let chunk = try scanner.next(from: &buffer, classify: { _ in .inspect }) {
                guard case .message(let type, let body, _) = chunk else { continue }
                handleUnlinked(type: type, body: body, context: context)
                if case .closed = phase { return }
                if case .ready = phase, let owner, buffer.readableBytes > 0 {
                    let rest = buffer
                    owner.onLoop { owner.serverData(rest, from: self) }
                    return
                }
            }
        } catch {
            phase = .closed
            context.close(promise: nil)
            return
        }
        inbound.keep(&buffer)
    }

    /// A whole message while logging in, resetting, or idle in the pool.
    func handleUnlinked(type: UInt8, body: ByteBuffer, context: ChannelHandlerContext) {
        switch phase {
        case .loggingIn(var login):
            let action = login.receive(type: type, body: body)
            phase = .loggingIn(login)
            switch action {
            case .none: break
            case .send(let out): context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            case .fail(let error): fail(error)
            case .loggedIn(let parameters, let pid, let key):
                loginTimeout?.cancel()
                self.parameters = parameters
                processID = pid
                secretKey = key
                phase = .ready
                if let query = database?.connectQuery, !query.isEmpty {
                    runInternal(query, purpose: .afterLogin, context: context)
                } else {
                    pooler.serverLoggedIn(self)
                }
            }
        case .internalQuery(let purpose):
            if type == MessageType.errorResponse {
                pooler.logger.warning("\(purpose) query failed on \(pool): \(WireDecode.errorFields(body).message)")
                internalFailed = true
            } else if type == MessageType.parameterStatus, let (name, value) = WireDecode.parameterStatus(body) {
                parameters[name] = value
            } else if type == MessageType.readyForQuery {
                var b = body
                let status = b.readInteger(as: UInt8.self)
                phase = .ready
                internalTimeout?.cancel()
                let clean = !internalFailed && status == TransactionStatus.idle.rawValue
                internalFailed = false
                switch purpose {
                case .afterLogin: pooler.serverLoggedIn(self)
                case .reset: pooler.release(self, reusable: clean)
                case .check:
                    if clean {
                        pooler.checkFinished(self, ok: true)
                    } else {
                        phase = .closed
                        pooler.checkFinished(self, ok: false)
                        context.close(promise: nil)
                    }
                }
            }
        case .ready:
            // Idle in the pool: only a ParameterStatus or a FATAL error may come.
            if type == MessageType.parameterStatus, let (name, value) = WireDecode.parameterStatus(body) {
                parameters[name] = value
            } else if type == MessageType.errorResponse {
                pooler.logger.info("idle server \(pool) reported: \(WireDecode.errorFields(body).message)")
            }
        case .connecting, .closed:
            break
        }
    }

    var internalFailed = false
    var internalTimeout: Scheduled<Void>?

    /// Runs a query whose results nobody sees (connect_query, server_reset_query, server_check_query).
    func runInternal(_ sql: String, purpose: InternalQuery, context: ChannelHandlerContext) {
        phase = .internalQuery(purpose)
        var out = context.channel.allocator.buffer(capacity: sql.utf8.count + 6)
        Wire.query(sql, into: &out)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        let channel = context.channel
        internalTimeout = context.eventLoop.scheduleTask(in: pooler.config.global.serverConnectTimeout) {
            // No answer in time: the server is unusable.
            channel.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        let wasPhase = phase
        phase = .closed
        loginTimeout?.cancel()
        switch wasPhase {
        case .connecting, .loggingIn, .internalQuery(.afterLogin):
            let step = if case .internalQuery = wasPhase { "connect_query" } else { "login" }
            pooler.serverConnectFailed(
                self,
                error: PostgresError.fatal(SQLState.connectionFailure, "server closed the connection during \(step)"))
        case .internalQuery(.check):
            pooler.checkFinished(self, ok: false)
        case .ready, .internalQuery(.reset):
            if let owner {
                self.owner = nil
                owner.onLoop { owner.serverLost(self) }
            }
            pooler.serverClosed(self)
        case .closed:
            break
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        switch phase {
        case .connecting, .loggingIn:
            // TLS negotiation or handshake failed: the pool learns why.
            fail(
                error as? PostgresError
                    ?? PostgresError.fatal(SQLState.connectionFailure, "server TLS: \(error)"))
        default:
            pooler.logger.debug("server \(id) error: \(error)")
            context.close(promise: nil)
        }
    }

    // MARK: Used by the linked client (from any event loop)

    /// Links the server to a client for lend number `lease`: from now on every byte read goes to it.
    func attach(_ client: ClientConnection, lease: UInt64) {
        if eventLoop.inEventLoop {
            attachOnLoop(client, lease: lease)
        } else {
            onLoop { self.attachOnLoop(client, lease: lease) }
        }
    }

    private func attachOnLoop(_ client: ClientConnection, lease: UInt64) {
        if case .closed = phase {
            // It died between being lent and being linked: nobody else will tell the client.
            client.onLoop { client.serverLost(self) }
        } else if leases.attach(lease) {
            owner = client
        }
    }

    /// Ends lend number `lease`. A detach (or an attach) of an older lend that reaches the server's
    /// loop after a newer one must not cut the newer client off: the newer client may run on the
    /// server's loop and attach at once, while the older lend's tasks still wait in its queue.
    func detach(from client: ClientConnection, lease: UInt64) {
        if eventLoop.inEventLoop {
            if leases.detach(lease) { owner = nil }
        } else {
            onLoop { if self.leases.detach(lease) { self.owner = nil } }
        }
    }

    /// Writes bytes of `client` (whole or partial messages), called on the client's loop; they are
    /// flushed at the end of the server loop's turn.
    func send(_ buffers: [ByteBuffer], from client: ClientConnection) {
        if client.loopIndex == loopIndex {
            write(buffers)
        } else {
            eventLoop.execute { self.write(buffers) }
        }
    }

    /// On the server's loop: from this handler's place in the pipeline while it is there (skips
    /// the pipeline's tail and its event-loop check), else through the channel.
    private func write(_ buffers: [ByteBuffer]) {
        if let context {
            for b in buffers { context.write(NIOAny(b), promise: nil) }
            pooler.loopFlushers[loopIndex].add(self)
        } else if let channel {
            for b in buffers { channel.write(b, promise: nil) }
            channel.flush()
        }
    }

    /// Session mode: clean the server with the reset query before it goes back to the pool.
    func resetAndRelease(_ sql: String) {
        onLoop {
            guard case .ready = self.phase, let context = self.context else { return }
            self.owner = nil
            self.sessionState.statements.removeAll()  // DISCARD ALL and the like drop them
            self.runInternal(sql, purpose: .reset, context: context)
        }
    }

    /// Closes the connection politely (Terminate) because the pool no longer wants it.
    func terminate() {
        onLoop {
            guard let channel = self.channel else { return }
            if case .closed = self.phase { return }
            if case .ready = self.phase {
                var out = channel.allocator.buffer(capacity: 5)
                Wire.terminate(into: &out)
                channel.writeAndFlush(out, promise: nil)
            }
            channel.close(promise: nil)
        }
    }

    var cancelTarget: CancelTarget {
        CancelTarget(address: address, processID: processID, secretKey: secretKey)
    }

    func onLoop(_ body: @escaping @Sendable () -> Void) {
        let loop = eventLoop
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }
}
