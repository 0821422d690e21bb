import Foundation
import Logging
import NIOCore
import NIOSSL
import TidepoolCore

/// One client of the pooler. It reads the startup packet, authenticates the client, and then
/// forwards its messages to whichever server the pool lends it, deciding from the message
/// headers when the server can go back.
///
/// Threading: all mutable state is touched on the channel's event loop only.
final class ClientConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum State {
        case startup
        /// Waiting for auth_query to find the user's secret.
        case lookingUpSecret
        /// Boxed: the other cases are a word at most, and the state is copied on every message.
        indirect case authenticating(ClientAuthStateMachine)
        /// Logged in as far as the client knows, but waiting for a server to learn its parameters.
        case awaitingWelcome
        case idle
        case waiting
        case linked(ServerConnection)
        /// Connected to the admin console.
        case admin(readOnly: Bool)
        case closed
    }

    // Stored properties are laid out in the order declared: a one-byte field placed after a
    // nine-byte optional (or the ten-byte tracker) fills its padding instead of taking a word of
    // its own. The object is allocated per client and stays while the client is idle.

    /// unowned(unsafe): the pooler outlives every connection (it stops its event loops before it
    /// goes), and a checked unowned reference cost an atomic retain and release per use.
    unowned(unsafe) let pooler: Pooler
    let channel: Channel
    let loopIndex: Int
    var state = State.startup
    var poolMode = PoolMode.transaction
    var id: ClientID?
    var joinedPool = false
    var inbound: ByteBuffer?
    var scanner: MessageScanner
    var tracker = TransactionTracker()
    /// Responses to a query the pooler sent itself (parameter sync) are not shown to the client.
    var swallowingUntilReady = false
    /// Client bytes waiting for a server.
    var pending: [ByteBuffer] = []
    /// Client bytes read in this burst for the linked server.
    var toServer: [ByteBuffer] = []
    var serverInbound: ByteBuffer?
    var serverScanner = MessageScanner()
    /// Named prepared statements kept working across servers (transaction and statement pooling
    /// with max_prepared_statements > 0). While it is on, client bytes stay in `inbound` until a
    /// server is linked, because how they are rewritten depends on what that server has prepared.
    var prepared: PreparedStatementTracker?
    /// Counters for SHOW STATS, handed to the pooler once per transaction.
    var traffic = TrafficStats()
    /// Where `traffic` is handed in (this loop's cell for the client's database).
    var trafficCell: Pooler.TrafficCell?
    /// The number of the lend that linked the current server.
    var lease: UInt64 = 0
    var waitStart: NIODeadline?
    /// The client's connection is encrypted (it sent SSLRequest and the handshake was started).
    var tls = false
    var statsQueryStart: NIODeadline?
    /// Waiting in its loop's `TurnFlusher`.
    var flushQueued = false
    var statsTransactionStart: NIODeadline?
    /// The first bytes of the request being timed, kept (as a slice) only with log_slow_query_ms.
    var slowQueryRequest: ByteBuffer?
    /// This database's SHOW LATENCY histograms on this client's event loop.
    var latency: LatencyRecorder?
    /// Histograms for /metrics (when stats_listen_port is set).
    var timers: PoolerMetrics.DatabaseTimers?
    /// log_slow_query_ms in microseconds as it was at login (0 = off).
    var slowQueryThreshold = 0

    var user = ""
    var databaseName = ""
    var poolKey: PoolKey?
    /// The values of the tracked parameters as the client should see them.
    @TrackedParameters var wanted: [String: String] = [:]
    var cancelKey: (Int32, Int32)?
    let connectedAt = NIODeadline.now()
    let connectedAtWallClock = Date().timeIntervalSince1970
    var closeReason = "client close request"
    /// The client address counted for max_client_conn_per_ip (nil for a Unix socket).
    var countedAddress: String?
    /// Cancel requests for this client still on their way to PostgreSQL: the server is not given
    /// back until they have arrived.
    var cancelsInFlight = 0
    /// The client-side timeouts and the moments they count from: nil while all of them are off
    /// (the default), so that a client without them does not carry their 80 bytes.
    var timeoutClock: TimeoutClock?

    final class TimeoutClock {
        let settings: ClientTimeoutSettings
        var idleSince = NIODeadline.now()
        var linkedAt = NIODeadline.now()
        var queryStartedAt: NIODeadline?
        var quietSince: NIODeadline?

        init(settings: ClientTimeoutSettings) { self.settings = settings }
    }

    init(pooler: Pooler, channel: Channel, loopIndex: Int) {
        self.pooler = pooler
        self.channel = channel
        self.loopIndex = loopIndex
        self.scanner = MessageScanner(maxMessageLength: pooler.config.global.maxPacketSize)
    }

    /// This handler's place in the client's pipeline, while it is there.
    var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    /// Writes toward the client from this handler's place in the pipeline (on the client's loop):
    /// the per-transaction writes skip the pipeline's tail and its event-loop check.
    func clientWrite(_ buffer: ByteBuffer) {
        if let context { context.write(NIOAny(buffer), promise: nil) } else { channel.write(buffer, promise: nil) }
    }

    func clientFlush() {
        if let context { context.flush() } else { channel.flush() }
    }

    /// Flushes at the end of the loop's turn, together with the turn's other answers.
    func flushAtTurnEnd() { pooler.loopFlushers[loopIndex].add(self) }

    var logger: Logger { pooler.logger }
    /// The client's event loop, found without touching its channel (a cold object when a server
    /// is handed over among thousands of clients).
    var eventLoop: EventLoop { pooler.loops[loopIndex] }
    var peer: String { channel.remoteAddress.map { "\($0)" } ?? "unix" }

    func onLoop(_ body: @escaping @Sendable () -> Void) {
        let loop = eventLoop
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }

    // MARK: Channel events

    func channelActive(context: ChannelHandlerContext) {
        let timeout = pooler.config.global.clientLoginTimeout
        if timeout > .zero {
            // Watched by the loop's sweeper: cheaper than a timer per connection, and nothing
            // stays in the client once it is logged in.
            pooler.loopClients[loopIndex].loggingIn[ObjectIdentifier(self)] = (self, .now() + timeout)
        }
    }

    /// Called by the loop's sweeper when client_login_timeout has passed since the connection.
    func loginTimedOut() {
        switch state {
        case .startup, .lookingUpSecret, .authenticating, .awaitingWelcome:
            closeReason = "client_login_timeout"
            sendFatal(.fatal(SQLState.protocolViolation, "client_login_timeout: login took too long"))
        default:
            endLoginTimer()
        }
    }

    /// The login is over (done or given up): the sweeper stops watching it.
    func endLoginTimer() {
        pooler.loopClients[loopIndex].loggingIn.removeValue(forKey: ObjectIdentifier(self))
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        traffic.received += buffer.readableBytes
        if statsQueryStart == nil, slowQueryThreshold > 0 {
            slowQueryRequest = buffer.getSlice(at: buffer.readerIndex, length: min(buffer.readableBytes, 160))
        }
        if var stash = inbound {
            stash.writeBuffer(&buffer)
            buffer = stash
            inbound = nil
        }
        guard processCatching(&buffer) else { return }
        if buffer.readableBytes > 0 {
            if case .closed = state { return }
            inbound = buffer
        }
        if !toServer.isEmpty, case .linked(let server) = state, !swallowingUntilReady {
            markSent()
            server.send(toServer, from: self)
            toServer.removeAll(keepingCapacity: true)
        }
        if let timeoutClock { noteClientActivity(timeoutClock) }
    }

    /// Runs `process`, turning a framing error into a FATAL for the client. False when it closed.
    func processCatching(_ buffer: inout ByteBuffer) -> Bool {
        do {
            try process(&buffer)
            return true
        } catch let error as WireError {
            closeReason = "bad packet"
            logger.info("client \(peer): \(error.postgresError.message)")
            sendFatal(error.postgresError)
        } catch {
            sendFatal(.fatal(SQLState.internalError, "\(error)"))
        }
        return false
    }

    func noteClientActivity(_ clock: TimeoutClock) {
        let now = NIODeadline.now()
        switch state {
        case .idle: clock.idleSince = now
        case .linked, .waiting:
            clock.quietSince = nil
            if tracker.outstanding > 0, clock.queryStartedAt == nil { clock.queryStartedAt = now }
        default: break
        }
    }

    /// Called by the loop's sweeper: applies query_timeout, idle_transaction_timeout,
    /// client_idle_timeout and transaction_timeout.
    func checkTimeouts(now: NIODeadline) {
        guard let clock = timeoutClock else { return }
        let activity: ClientActivity
        switch state {
        case .idle: activity = .idle(since: clock.idleSince)
        case .waiting: activity = .waiting
        case .linked:
            activity = .linked(
                linkedAt: clock.linkedAt, queryStartedAt: clock.queryStartedAt, quietSince: clock.quietSince)
        default: return
        }
        let error: PostgresError
        switch ClientTimeouts.check(activity, settings: clock.settings, now: now) {
        case .none:
            return
        case .close(let e):
            error = e
        case .cancelAndClose(let e):
            if case .linked(let server) = state { pooler.sendCancel(to: server.cancelTarget) }
            error = e
        }
        closeReason = error.message
        logger.info("client \(peer) db=\(databaseName) user=\(user): \(error.message)")
        sendFatal(error)
    }

    /// A CancelRequest for a client still queued for a server: it leaves the queue and its request
    /// fails as if cancelled by the server. Returns false when the client is not waiting.
    func cancelWhileWaiting() -> Bool {
        guard case .waiting = state, let id else { return false }
        pooler.clientGaveUp(id)
        var answers = max(tracker.outstanding, 1)
        var midMessage = !scanner.atMessageBoundary
        if prepared != nil, var stash = inbound {
            // Unread bytes kept for the server: count the requests among them, and drop them.
            inbound = nil
            var counter = MessageScanner()
            var requests = 0
            while let chunk = try? counter.next(
                from: &stash,
                classify: { type in
                    if type == MessageType.query || type == MessageType.sync || type == MessageType.functionCall {
                        requests += 1
                    }
                    return .forward
                }), case .forward = chunk
            {}
            answers = max(tracker.outstanding + requests, 1)
            midMessage = midMessage || !counter.atMessageBoundary || stash.readableBytes > 0
        }
        guard !midMessage else {
            closeReason = "cancelled in the middle of a message"
            sendFatal(.fatal(SQLState.queryCanceled, "canceling statement due to user request"))
            return true
        }
        pending.removeAll()
        var out = channel.allocator.buffer(capacity: 128)
        Wire.errorResponse(
            PostgresError(code: SQLState.queryCanceled, message: "canceling statement due to user request"),
            into: &out)
        for _ in 0..<answers { Wire.readyForQuery(.idle, into: &out) }
        tracker.reset()
        state = .idle
        timeoutClock?.idleSince = NIODeadline.now()
        channel.writeAndFlush(out, promise: nil)
        return true
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        closeReason = "client connection error: \(error)"
        context.close(promise: nil)
    }

    // MARK: Reading client bytes

    func process(_ buffer: inout ByteBuffer) throws {
        while buffer.readableBytes > 0 {
            switch state {
            case .startup:
                guard let packet = try StartupPacket.parse(from: &buffer) else { return }
                if packet == .sslRequest, !tls, let context = pooler.security.clientTLS {
                    // Bytes after SSLRequest came before encryption: refuse them rather than
                    // read them as if the handshake had covered them.
                    guard buffer.readableBytes == 0 else {
                        closeReason = "data after SSLRequest"
                        sendFatal(.fatal(SQLState.protocolViolation, "unexpected data after SSLRequest"))
                        return
                    }
                    startTLS(context)
                    return
                }
                handleStartup(packet)
            case .lookingUpSecret:
                return  // kept until the secret is known
            case .authenticating(var auth):
                guard let chunk = try scanner.next(from: &buffer, classify: { _ in .inspect }) else { return }
                guard case .message(let type, let body, _) = chunk, type == MessageType.password else {
                    closeReason = "unexpected message during login"
                    sendFatal(.fatal(SQLState.protocolViolation, "expected a password message"))
                    return
                }
                let action = auth.receivePasswordMessage(body)
                state = .authenticating(auth)
                handleAuth(action, auth: auth)
            case .awaitingWelcome:
                // A client should wait for ReadyForQuery; keep what it sent for later.
                return
            case .idle, .waiting, .linked:
                if prepared != nil {
                    guard try processPrepared(&buffer) else { return }
                    continue
                }
                guard
                    let chunk = try scanner.next(
                        from: &buffer,
                        classify: { type in
                            if type == MessageType.terminate { return .inspect }
                            tracker.clientSent(type)
                            return .forward
                        })
                else { return }
                switch chunk {
                case .forward(let bytes):
                    forward(bytes)
                case .message:
                    clientTerminated()
                    return
                }
            case .admin(let readOnly):
                guard let chunk = try scanner.next(from: &buffer, classify: { _ in .inspect }),
                    case .message(let type, let body, _) = chunk
                else { return }
                handleAdmin(type: type, body: body, readOnly: readOnly)
                if case .closed = state { return }
            case .closed:
                buffer.moveReaderIndex(to: buffer.writerIndex)
                return
            }
        }
    }

    /// One step of `process` for a client whose named prepared statements the pooler keeps.
    /// Returns false when it needs more bytes or a server first.
    func processPrepared(_ buffer: inout ByteBuffer) throws -> Bool {
        guard case .linked(let server) = state, !swallowingUntilReady else {
            guard case .idle = state else { return false }
            if buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == MessageType.terminate {
                clientTerminated()
                return false
            }
            if let answer = prepared!.answerWithoutServer(buffer, isKnown: { pooler.isKnownStatement($0) }) {
                buffer.moveReaderIndex(forwardBy: answer.consumed)
                channel.writeAndFlush(answer.reply, promise: nil)
                return true
            }
            // Stash first: the server may be lent, and the stash read, before requestServer returns.
            state = .waiting
            waitStart = NIODeadline.now()
            inbound = buffer
            buffer.moveReaderIndex(to: buffer.writerIndex)
            pooler.requestServer(for: self)
            return false
        }
        guard
            let chunk = try scanner.next(
                from: &buffer,
                peek: { type, bytes, bodyStart in
                    if type == MessageType.terminate
                        || PreparedStatementTracker.inspects(type, bytes, bodyStart: bodyStart)
                    {
                        return .inspect
                    }
                    tracker.clientSent(type)
                    prepared!.clientForwarded(type)
                    return .forward
                })
        else { return false }
        switch chunk {
        case .forward(let bytes):
            toServer.append(bytes)
        case .message(let type, let body, let whole):
            if type == MessageType.terminate {
                clientTerminated()
                return false
            }
            tracker.clientSent(type)
            prepared!.clientMessage(type: type, body: body, whole: whole, server: &server.statements, into: &toServer)
            if writeMadeUpReplies() {
                channel.flush()
                if toServer.isEmpty, serverInbound == nil, mayGiveBack {
                    unlink(server, reusable: true)
                    return true
                }
            }
        }
        return true
    }

    /// Writes the answers the prepared-statement tracker made up that are due. True if it wrote any.
    func writeMadeUpReplies() -> Bool {
        guard prepared != nil else { return false }
        let replies = prepared!.takeReplies()
        for reply in replies {
            if reply.getInteger(at: reply.readerIndex, as: UInt8.self) == MessageType.readyForQuery,
                let raw = reply.getInteger(at: reply.readerIndex + 5, as: UInt8.self),
                let status = TransactionStatus(rawValue: raw)
            {
                // Ends a client Query the pooler answered itself, like one from the server.
                tracker.serverReady(status)
                countReady(status)
            }
            clientWrite(reply)
        }
        return !replies.isEmpty
    }

    func forward(_ bytes: ByteBuffer) {
        switch state {
        case .linked where !swallowingUntilReady:
            toServer.append(bytes)
        case .idle:
            pending.append(bytes)
            state = .waiting
            waitStart = NIODeadline.now()
            pooler.requestServer(for: self)
        default:
            pending.append(bytes)
        }
    }

    // MARK: Admin console

    func handleAdmin(type: UInt8, body: ByteBuffer, readOnly: Bool) {
        var out = channel.allocator.buffer(capacity: 1024)
        switch type {
        case MessageType.terminate:
            clientTerminated()
            return
        case MessageType.query:
            let sql = WireDecode.queryText(body) ?? ""
            let command: AdminCommand
            do throws(PostgresError) {
                command = try AdminCommand.parse(sql)
                if readOnly, !command.isReadOnly {
                    throw PostgresError(
                        code: SQLState.insufficientPrivilege, message: "admin command requires an admin_users user")
                }
            } catch {
                Wire.errorResponse(error, into: &out)
                Wire.readyForQuery(.idle, into: &out)
                channel.writeAndFlush(out, promise: nil)
                return
            }
            let channel = self.channel
            pooler.admin(command, on: channel.eventLoop).whenComplete { result in
                var reply = channel.allocator.buffer(capacity: 1024)
                switch result {
                case .success(let table):
                    if table.tag.isEmpty { Wire.emptyQueryResponse(into: &reply) } else { table.encode(into: &reply) }
                case .failure(let error):
                    Wire.errorResponse(
                        error as? PostgresError ?? PostgresError(code: SQLState.internalError, message: "\(error)"),
                        into: &reply)
                }
                Wire.readyForQuery(.idle, into: &reply)
                channel.writeAndFlush(reply, promise: nil)
            }
            return
        case MessageType.sync:
            Wire.errorResponse(
                PostgresError(
                    code: SQLState.featureNotSupported,
                    message: "the admin console speaks the simple query protocol only"),
                into: &out)
            Wire.readyForQuery(.idle, into: &out)
        default:
            return  // extended-protocol messages are answered at their Sync
        }
        channel.writeAndFlush(out, promise: nil)
    }

    // MARK: Login

    /// Answers SSLRequest with 'S' and puts the TLS handler in front of this one; the client's
    /// next bytes are its TLS handshake.
    func startTLS(_ context: NIOSSLContext) {
        var out = channel.allocator.buffer(capacity: 1)
        out.writeInteger(UInt8(ascii: "S"))
        channel.writeAndFlush(out, promise: nil)
        do {
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context), position: .first)
            tls = true
        } catch {
            closeReason = "TLS setup failed"
            channel.close(promise: nil)
        }
    }

    /// The common name of the client's verified certificate, for the cert method.
    var certificateCommonName: String? {
        guard tls, let handler = try? channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self),
            let certificate = handler.peerCertificate
        else { return nil }
        return certificate.subjectName.first { $0.type == .commonName }?.value
    }

    /// The client's IP address as text; nil for a Unix socket.
    var clientIP: String? {
        guard let address = channel.remoteAddress, address.protocol != .unix else { return nil }
        return address.ipAddress
    }

    func handleStartup(_ packet: StartupPacket) {
        switch packet {
        case .sslRequest, .gssEncRequest:
            var out = channel.allocator.buffer(capacity: 1)
            out.writeInteger(UInt8(ascii: "N"))
            channel.writeAndFlush(out, promise: nil)
        case .cancel(let pid, let key):
            pooler.cancel(processID: pid, secretKey: key)
            closeReason = "cancel request"
            state = .closed
            channel.close(promise: nil)
        case .startup(let minor, let parameters, let unrecognized):
            login(minor: minor, parameters: parameters, unrecognized: unrecognized)
        }
    }

    func login(minor: Int, parameters: [String: String], unrecognized: [String]) {
        guard let user = parameters["user"], !user.isEmpty else {
            sendFatal(.fatal(SQLState.invalidAuthorization, "no PostgreSQL user name specified in startup packet"))
            return
        }
        self.user = user
        databaseName = parameters["database"].flatMap { $0.isEmpty ? nil : $0 } ?? user
        let ip = clientIP
        switch pooler.register(self, address: ip) {
        case .success(let id):
            self.id = id
            countedAddress = ip
        case .failure(let error):
            closeReason = error.message
            logger.warning("client \(peer) user=\(user) refused: \(error.message)")
            sendFatal(error)
            return
        }
        let config = pooler.config
        if config.global.logConnections {
            logger.info("login attempt: db=\(databaseName) user=\(user) client=\(peer)\(tls ? " tls" : "")")
        }
        if minor > 0 || !unrecognized.isEmpty {
            var out = channel.allocator.buffer(capacity: 32)
            Wire.negotiateProtocolVersion(minor: 0, unrecognized: unrecognized, into: &out)
            channel.write(out, promise: nil)
        }
        do {
            wanted = try StartupParameters.resolve(parameters, ignored: config.global.ignoreStartupParameters)
        } catch {
            closeReason = "unsupported startup parameter"
            sendFatal(error)
            return
        }
        if config.global.clientTLS.sslmode.requiresTLS, !tls, ip != nil {
            closeReason = "TLS required"
            sendFatal(
                .fatal(
                    SQLState.invalidAuthorization,
                    "SSL required (client_tls_sslmode = \(config.global.clientTLS.sslmode.rawValue))"))
            return
        }
        var authType = config.global.authType
        if authType == .hba {
            guard let method = hbaMethod(config) else { return }
            authType = method
        }
        if authType == .cert {
            guard let name = certificateCommonName, name == user else {
                closeReason = "certificate authentication failed"
                sendFatal(
                    .fatal(SQLState.invalidAuthorization, "certificate authentication failed for user \"\(user)\""))
                return
            }
            authType = .trust
        }
        if let secret = pooler.userlist[user] {
            startAuth(authType, secret: secret)
            return
        }
        // The admin console looks secrets up only in auth_file, or through an explicit auth_dbname.
        let isConsole = isAdminConsole(config)
        let entry = isConsole ? nil : config.database(named: databaseName)
        let lookUp = isConsole ? config.global.authDBName != nil : pooler.authUser(for: entry) != nil
        guard authType != .trust, lookUp else {
            if authType == .trust, config.global.authFile != nil, config.global.authType != .hba {
                sendFatal(.fatal(SQLState.invalidAuthorization, "user \"\(user)\" is not in auth_file"))
                return
            }
            startAuth(authType, secret: nil)
            return
        }
        state = .lookingUpSecret
        let method = authType
        pooler.lookUpSecret(user: user, database: entry, on: channel.eventLoop).whenSuccess { [self] outcome in
            guard case .lookingUpSecret = state else { return }
            switch outcome {
            case .found(let secret):
                startAuth(method, secret: secret)
            case .notFound:
                startAuth(method, secret: nil)  // fails like a wrong password, as PostgreSQL does
            case .failed(let error):
                logger.warning("auth_query for user=\(user) failed: \(error.message)")
                closeReason = "auth_query failed"
                sendFatal(.fatal(SQLState.connectionFailure, "authentication lookup failed (auth_query)"))
            }
            if let stash = inbound, stash.readableBytes > 0, case .authenticating = state {
                inbound = nil
                var buffer = stash
                if processCatching(&buffer), buffer.readableBytes > 0 { inbound = buffer }
            }
        }
    }

    /// auth_type = hba: the method of the first auth_hba_file line matching this connection, or
    /// nil when the client was refused (no line, or reject).
    func hbaMethod(_ config: Config) -> AuthType? {
        let address = clientIP.flatMap(HBARules.parseIP)
        guard let rules = pooler.security.hba,
            let rule = rules.method(database: databaseName, user: user, address: address, tls: tls)
        else {
            closeReason = "no auth_hba_file entry"
            let host = clientIP ?? "local"
            sendFatal(
                .fatal(
                    SQLState.invalidAuthorization,
                    "no auth_hba_file entry for host \"\(host)\", user \"\(user)\", database \"\(databaseName)\", \(tls ? "SSL on" : "SSL off")"
                ))
            return nil
        }
        switch rule.method {
        case .trust: return .trust
        case .md5: return .md5
        case .scramSHA256: return .scramSHA256
        case .password: return .plain
        case .cert: return .cert
        case .reject:
            closeReason = "rejected by auth_hba_file"
            sendFatal(
                .fatal(
                    SQLState.invalidAuthorization,
                    "connection rejected by auth_hba_file line \(rule.line) for user \"\(user)\", database \"\(databaseName)\""
                ))
            return nil
        }
    }

    func startAuth(_ authType: AuthType, secret: PasswordSecret?) {
        var auth = ClientAuthStateMachine(authType: authType, user: user, secret: secret)
        let action = auth.start()
        state = .authenticating(auth)
        handleAuth(action, auth: auth)
    }

    func handleAuth(_ action: ClientAuthStateMachine.Action, auth: ClientAuthStateMachine) {
        switch action {
        case .send(let out):
            channel.writeAndFlush(out, promise: nil)
            if auth.isAuthenticated {
                rememberServerSecret(auth)
                authenticated()
            }
        case .authenticated:
            rememberServerSecret(auth)
            authenticated()
        case .fail(let error):
            closeReason = "authentication failed"
            logger.info("client \(peer) user=\(user): \(error.message)")
            sendFatal(error)
        }
    }

    /// What a successful login teaches about logging in to servers as this user, when the stored
    /// secret alone cannot (a SCRAM verifier): the keys recovered from the client's SCRAM proof, or
    /// the cleartext password it sent.
    func rememberServerSecret(_ auth: ClientAuthStateMachine) {
        let secret: ServerLoginStateMachine.Secret
        if let clientKey = auth.scramClientKey, let serverKey = auth.scramServerKey {
            secret = .scramKeys(clientKey: clientKey, serverKey: serverKey)
        } else if let password = auth.cleartextPassword {
            secret = .password(password)
        } else {
            return
        }
        pooler.credentials.withLockedValue { $0.serverSecrets[user] = secret }
    }

    /// The client asked for the admin console: database `pooler` or `pgbouncer`, unless the
    /// configuration names a real database so.
    func isAdminConsole(_ config: Config) -> Bool {
        (databaseName == "pooler" || databaseName == "pgbouncer") && config.databases[databaseName] == nil
    }

    func authenticated() {
        let config = pooler.config
        if isAdminConsole(config) {
            let isAdmin = config.global.adminUsers.contains(user)
            guard isAdmin || config.global.statsUsers.contains(user) else {
                closeReason = "not an admin user"
                sendFatal(
                    .fatal(SQLState.insufficientPrivilege, "not allowed: \(user) is not in admin_users or stats_users"))
                return
            }
            state = .admin(readOnly: !isAdmin)
            endLoginTimer()
            var out = channel.allocator.buffer(capacity: 256)
            Wire.authenticationOk(into: &out)
            for (name, value) in [
                ("server_version", "15.0 (Tidepool \(TidepoolCoreVersion.string))"), ("client_encoding", "UTF8"),
                ("server_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("standard_conforming_strings", "on"),
                ("integer_datetimes", "on"), ("application_name", wanted["application_name"] ?? ""),
            ] {
                Wire.parameterStatus(name, value, into: &out)
            }
            Wire.backendKeyData(processID: 0, secretKey: 0, into: &out)
            Wire.readyForQuery(.idle, into: &out)
            channel.writeAndFlush(out, promise: nil)
            return
        }
        guard let database = config.database(named: databaseName) else {
            closeReason = "unknown database"
            sendFatal(.fatal(SQLState.invalidCatalogName, "database \"\(databaseName)\" does not exist"))
            return
        }
        if pooler.isDisabled(databaseName) {
            closeReason = "database disabled"
            sendFatal(.fatal(SQLState.cannotConnectNow, "database \"\(databaseName)\" does not allow connections"))
            return
        }
        let timeouts = config.clientTimeouts(user: user)
        timeoutClock = timeouts.anyEnabled ? TimeoutClock(settings: timeouts) : nil
        slowQueryThreshold = Int(config.global.logSlowQuery.nanoseconds / 1000)
        if config.global.statsListenPort > 0 { timers = pooler.metrics.timers(for: databaseName) }
        latency = pooler.loopLatency[loopIndex].recorder(for: databaseName)
        let serverUser = database.user ?? user
        poolKey = PoolKey(database: databaseName, user: serverUser)
        poolMode = config.poolMode(database: database, user: user)
        if config.global.maxPreparedStatements > 0, poolMode != .session { prepared = PreparedStatementTracker() }
        pooler.joinPool(poolKey!, database: database)
        joinedPool = true
        if let welcome = pooler.welcomeParameters(for: poolKey!) {
            sendWelcome(welcome, fromPool: true)
        } else {
            // No server of this pool has logged in yet: borrow one to learn its parameters.
            state = .awaitingWelcome
            pooler.requestServer(for: self)
        }
    }

    /// AuthenticationOk, the server's parameters with the client's own values, BackendKeyData and
    /// ReadyForQuery. `fromPool`: the parameters are the pool's (not a just-borrowed server's), so
    /// their encoding can be shared with the pool's other clients.
    func sendWelcome(_ serverParameters: [String: String], fromPool: Bool) {
        endLoginTimer()
        var out = channel.allocator.buffer(capacity: 512)
        Wire.authenticationOk(into: &out)
        let make = { [wanted] () -> Pooler.Welcome in
            var messages = ByteBufferAllocator().buffer(capacity: 512)
            var parameters = serverParameters
            for (name, value) in wanted { parameters[name] = value }
            for (name, value) in parameters.sorted(by: { $0.key < $1.key }) {
                Wire.parameterStatus(name, value, into: &messages)
            }
            // Make the client's view explicit so a server with other values is brought in line.
            var complete = wanted
            for name in StartupParameters.tracked where complete[name] == nil {
                if let value = serverParameters[name] { complete[name] = value }
            }
            var tracked = TrackedParameters(wrappedValue: complete)
            _ = tracked.projectedValue  // worked out once for every client that shares this welcome
            return Pooler.Welcome(messages: messages, wanted: tracked)
        }
        var welcome = fromPool ? pooler.welcome(for: poolKey!, values: $wanted, make: make) : make()
        out.writeBuffer(&welcome.messages)
        _wanted = welcome.wanted
        let key = pooler.issueCancelKey(for: self)
        cancelKey = key
        Wire.backendKeyData(processID: key.0, secretKey: key.1, into: &out)
        Wire.readyForQuery(.idle, into: &out)
        channel.writeAndFlush(out, promise: nil)
        state = .idle
        if let timeoutClock {
            timeoutClock.idleSince = NIODeadline.now()
            pooler.loopClients[loopIndex].clients[ObjectIdentifier(self)] = self
        }
        if !pending.isEmpty {
            state = .waiting
            pooler.requestServer(for: self)
        }
    }

    // MARK: Pool events (called on this event loop)

    func lent(_ server: ServerConnection, lease: UInt64) {
        switch state {
        case .awaitingWelcome:
            // The server was only needed for its parameters.
            pooler.release(server, reusable: true)
            sendWelcome(server.parameters, fromPool: false)
            if let stash = inbound, stash.readableBytes > 0 {
                inbound = nil
                var b = stash
                try? process(&b)
                if b.readableBytes > 0 { inbound = b }
            }
        case .waiting:
            state = .linked(server)
            self.lease = lease
            server.attach(self, lease: lease)
            traffic.serverAssignments += 1
            if let start = waitStart {
                let waited = Int((NIODeadline.now() - start).nanoseconds / 1000)
                traffic.waitTime += waited
                latency?.record(.wait, microseconds: UInt64(waited))
                timers?.wait.recordNanoseconds(waited * 1000)
                waitStart = nil
            }
            if let timeoutClock {
                timeoutClock.linkedAt = NIODeadline.now()
                timeoutClock.queryStartedAt = tracker.outstanding > 0 ? timeoutClock.linkedAt : nil
                timeoutClock.quietSince = nil
            }
            serverScanner = MessageScanner(maxMessageLength: scanner.maxMessageLength)
            serverInbound = nil
            var sets = ""
            if server.$parameters != $wanted {
                for name in StartupParameters.tracked {
                    // Parameters the server does not report (search_path) are known only once set here.
                    guard let value = wanted[name], server.parameters[name] != value else { continue }
                    sets += "SET \(name) = '\(value.replacingQuotes())';"
                    server.parameters[name] = value
                }
            }
            if !sets.isEmpty {
                var out = channel.allocator.buffer(capacity: sets.utf8.count + 8)
                Wire.query(sets, into: &out)
                swallowingUntilReady = true
                server.send([out], from: self)
            } else {
                flushPending(to: server)
            }
        default:
            // The client left while waiting; the server was never used.
            pooler.release(server, reusable: true)
        }
    }

    func flushPending(to server: ServerConnection) {
        if prepared != nil, var stash = inbound {
            // What the client sent while it waited, now that the server's statements are known.
            inbound = nil
            guard processCatching(&stash) else { return }
            if stash.readableBytes > 0, inbound == nil { inbound = stash }
            guard case .linked(let linked) = state, linked === server else { return }
        }
        if !pending.isEmpty {
            // Held back while waiting: goes first.
            toServer.insert(contentsOf: pending, at: 0)
            pending.removeAll(keepingCapacity: true)
        }
        if !toServer.isEmpty {
            markSent()
            server.send(toServer, from: self)
            toServer.removeAll(keepingCapacity: true)
        }
    }

    /// log_slow_query_ms: database, user, client address, duration and the statement's first bytes.
    func logSlowQuery(microseconds: Int) {
        var text = ""
        if var request = slowQueryRequest, let type = request.readInteger(as: UInt8.self),
            request.readInteger(as: Int32.self) != nil
        {
            if type == MessageType.parse { _ = request.readNullTerminatedString() }
            if type == MessageType.query || type == MessageType.parse {
                let bytes = request.readBytes(length: min(request.readableBytes, 100)) ?? []
                text = String(decoding: bytes.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
        }
        logger.warning(
            "slow query: db=\(databaseName) user=\(user) client=\(peer) duration=\(microseconds / 1000) ms: \(text)")
    }

    /// Client bytes went to the server: a query (and maybe a transaction) starts, for SHOW STATS.
    func markSent() {
        guard statsQueryStart == nil else { return }
        let now = NIODeadline.now()
        statsQueryStart = now
        if statsTransactionStart == nil { statsTransactionStart = now }
    }

    /// A ReadyForQuery from the server ends a query, and with status idle a transaction.
    func countReady(_ status: TransactionStatus) {
        traffic.queries += 1
        let now = NIODeadline.now()
        if tracker.isQuiet, let start = statsQueryStart {
            let took = Int((now - start).nanoseconds / 1000)
            traffic.queryTime += took
            latency?.record(.query, microseconds: UInt64(took))
            timers?.query.recordNanoseconds(took * 1000)
            statsQueryStart = nil
            if slowQueryThreshold > 0, took >= slowQueryThreshold { logSlowQuery(microseconds: took) }
        }
        if status == .idle, let start = statsTransactionStart {
            let took = Int((now - start).nanoseconds / 1000)
            traffic.transactions += 1
            traffic.transactionTime += took
            latency?.record(.transaction, microseconds: UInt64(took))
            timers?.transaction.recordNanoseconds(took * 1000)
            statsTransactionStart = nil
            if poolMode == .session { handInTraffic() }
        }
    }

    /// Adds this client's counters to its database's totals.
    func handInTraffic() {
        if prepared != nil {
            let counts = prepared!.takeCounts()
            traffic.clientParses += counts.clientParses
            traffic.serverParses += counts.serverParses
            traffic.binds += counts.binds
        }
        guard !traffic.isZero else { return }
        if trafficCell?.database != databaseName {
            trafficCell = pooler.trafficCell(loop: loopIndex, database: databaseName)
        }
        trafficCell!.add(traffic)
        traffic = TrafficStats()
    }

    func waitFailed(_ error: PoolError) {
        switch state {
        case .waiting, .awaitingWelcome:
            closeReason = "\(error.postgresError.message)"
            logger.warning("client \(peer) db=\(databaseName) user=\(user): \(error.postgresError.message)")
            var e = error.postgresError
            e.severity = "FATAL"
            sendFatal(e)
        default:
            break
        }
    }

    /// Bytes from the linked server. What is passed on unchanged is written as one slice of the
    /// server's bytes per run (a reply and its ReadyForQuery usually arrive in one read and leave
    /// in one write); anything the pooler writes itself ends the run first, to keep the order.
    func serverData(_ data: ByteBuffer, from sender: ServerConnection) {
        guard case .linked(let server) = state, server === sender else { return }
        traffic.sent += data.readableBytes
        var buffer = data
        if var stash = serverInbound {
            stash.writeBuffer(&buffer)
            buffer = stash
            serverInbound = nil
        }
        var run = ServerBytesRun(of: buffer)
        do {
            while true {
                let chunkStart = buffer.readerIndex
                guard
                    let chunk = try serverScanner.next(
                        from: &buffer,
                        classify: { type in
                            if type == MessageType.readyForQuery || type == MessageType.parameterStatus {
                                return .inspect
                            }
                            if prepared != nil {
                                // Made-up or swallowed answers pending: look at each message.
                                if prepared!.specials > 0 { return .inspect }
                                _ = prepared!.serverMessage(type, server: &server.statements)
                            }
                            return .forward
                        })
                else { break }
                let chunkLength = buffer.readerIndex - chunkStart
                switch chunk {
                case .forward:
                    if !swallowingUntilReady { run.add(chunkStart, chunkLength, to: self) }
                case .message(let type, let body, _):
                    if type != MessageType.readyForQuery, type != MessageType.parameterStatus {
                        // Only while the prepared-statement tracker has answers of its own pending.
                        if prepared!.serverMessage(type, server: &server.statements) {
                            run.add(chunkStart, chunkLength, to: self)
                        }
                        run.write(to: self)
                        _ = writeMadeUpReplies()
                        continue
                    }
                    if type == MessageType.parameterStatus {
                        run.write(to: self)
                        if let (name, value) = WireDecode.parameterStatus(body) {
                            server.parameters[name] = value
                            if swallowingUntilReady {
                                // Our own SET: remember the server's spelling of the value.
                                if wanted[name] != nil { wanted[name] = value }
                            } else {
                                wanted[name] = value
                                var out = channel.allocator.buffer(capacity: body.readableBytes + 5)
                                Wire.parameterStatus(name, value, into: &out)
                                clientWrite(out)
                            }
                        }
                        continue
                    }
                    var b = body
                    let status = TransactionStatus(rawValue: b.readInteger(as: UInt8.self) ?? 0) ?? .failed
                    if swallowingUntilReady {
                        swallowingUntilReady = false
                        flushPending(to: server)
                        continue
                    }
                    if prepared != nil, !prepared!.serverMessage(type, status: status, server: &server.statements) {
                        // The ReadyForQuery of the pooler's own Sync or Query.
                        run.write(to: self)
                        _ = writeMadeUpReplies()
                        continue
                    }
                    tracker.serverReady(status)
                    countReady(status)
                    if let timeoutClock, tracker.isQuiet {
                        timeoutClock.queryStartedAt = nil
                        timeoutClock.quietSince = status == .idle ? nil : NIODeadline.now()
                    }
                    if poolMode == .statement, status != .idle {
                        // The error takes the ReadyForQuery's place, so the statement that opened
                        // the transaction is the one that fails.
                        run.write(to: self)
                        closeReason = "transaction in statement mode"
                        sendFatal(
                            .fatal(
                                SQLState.featureNotSupported,
                                "transaction blocks are not allowed in statement pooling mode"))
                        return
                    }
                    run.add(chunkStart, chunkLength, to: self)  // the server's own bytes
                    if prepared?.hasDueReplies ?? false {
                        run.write(to: self)
                        _ = writeMadeUpReplies()
                    }
                    if buffer.readableBytes == 0, mayGiveBack {
                        // The answer is written before the server goes back to the pool.
                        run.write(to: self)
                        unlink(server, reusable: true)
                    }
                }
            }
        } catch {
            run.write(to: self)
            closeReason = "bad packet from server"
            unlink(server, reusable: false)
            sendFatal(.fatal(SQLState.protocolViolation, "server sent an invalid message"))
            return
        }
        run.write(to: self)
        if buffer.readableBytes > 0 { serverInbound = buffer }
        if prepared != nil {
            let accepted = prepared!.takeAccepted()
            if !accepted.isEmpty { pooler.statementsAccepted(accepted) }
        }
        flushAtTurnEnd()
    }

    func unlink(_ server: ServerConnection, reusable: Bool) {
        handInTraffic()
        server.detach(from: self, lease: lease)
        state = .idle
        tracker.reset()
        timeoutClock?.idleSince = NIODeadline.now()
        pooler.release(server, reusable: reusable)
    }

    /// Whether the linked server may go back to the pool now: not in session mode, nothing
    /// outstanding, no transaction open, no query of the pooler's own and no cancel under way.
    var mayGiveBack: Bool { poolMode != .session && serverIsClean }

    /// Nothing outstanding, no transaction open, no query or reply of the pooler's own pending and
    /// no cancel under way (one still on its way could hit the next client's query).
    var serverIsClean: Bool {
        tracker.isClean && !swallowingUntilReady && cancelsInFlight == 0 && (prepared?.isQuiet ?? true)
    }

    /// A CancelRequest with this client's key. A queued client leaves the queue; a client using a
    /// server keeps it until the cancel has reached PostgreSQL, so that the cancel cannot land on a
    /// query another client runs on that backend after a hand-over.
    func cancelRequested() {
        if cancelWhileWaiting() { return }
        guard case .linked(let server) = state, !tracker.isClean else { return }
        cancelsInFlight += 1
        pooler.sendCancel(to: server.cancelTarget).whenComplete { _ in
            self.onLoop { self.cancelFinished() }
        }
    }

    /// A cancel request sent for this client reached PostgreSQL (or gave up): the server may go back.
    func cancelFinished() {
        cancelsInFlight -= 1
        guard case .linked(let server) = state, serverInbound == nil, mayGiveBack else { return }
        unlink(server, reusable: true)
    }

    /// The linked server closed or failed.
    func serverLost(_ server: ServerConnection) {
        guard case .linked(let linked) = state, linked === server else { return }
        state = .idle
        closeReason = "server connection lost"
        sendFatal(.fatal(SQLState.adminShutdown, "server closed the connection unexpectedly"))
    }

    // MARK: Closing

    /// Terminate: the client is leaving.
    func clientTerminated() {
        closeReason = "client close request"
        finish()
        if flushQueued { clientFlush() }  // unflushed writes are dropped by close
        channel.close(promise: nil)
    }

    func sendFatal(_ error: PostgresError) {
        pooler.metrics.clientError(error.code)
        var out = channel.allocator.buffer(capacity: 128)
        Wire.errorResponse(error, into: &out)
        channel.writeAndFlush(out).whenComplete { [channel] _ in channel.close(promise: nil) }
        finish()
        state = .closed
    }

    /// Gives back or closes the server and forgets the client. Safe to call more than once.
    func finish() {
        endLoginTimer()
        switch state {
        case .linked(let server):
            let clean = serverIsClean
            server.detach(from: self, lease: lease)
            let global = pooler.config.global
            let reset = global.serverResetQuery
            if clean, poolMode == .session || global.serverResetQueryAlways, !reset.isEmpty {
                server.resetAndRelease(reset)
            } else {
                pooler.release(server, reusable: clean)
            }
        case .closed:
            return
        default:
            break
        }
        state = .closed
        if joinedPool { handInTraffic() }
        pooler.loopClients[loopIndex].clients[ObjectIdentifier(self)] = nil
        pooler.unregister(
            self, id: id, cancelKey: cancelKey, pool: joinedPool ? poolKey : nil, address: countedAddress)
        if id != nil, pooler.config.global.logDisconnections {
            let age = Double((NIODeadline.now() - connectedAt).nanoseconds) / 1e9
            logger.info(
                "closing client \(peer) db=\(databaseName) user=\(user): \(closeReason) (age=\(Int(age))s)")
        }
    }
}

extension String {
    /// Doubles single quotes for a SQL string literal.
    func replacingQuotes() -> String {
        var s = ""
        for c in self {
            if c == "'" { s.append("''") } else { s.append(c) }
        }
        return s
    }
}

/// A run of a server's bytes that the client gets unchanged, written as one slice.
struct ServerBytesRun {
    /// The bytes as read, before any chunk was taken from them.
    let source: ByteBuffer
    var start = 0
    var length = 0

    init(of source: ByteBuffer) { self.source = source }

    /// Adds the chunk at `chunkStart`; a chunk that does not follow the run ends it first.
    mutating func add(_ chunkStart: Int, _ chunkLength: Int, to client: ClientConnection) {
        if length > 0, start + length != chunkStart { write(to: client) }
        if length == 0 { start = chunkStart }
        length += chunkLength
    }

    /// Writes the run, if any (without flushing).
    mutating func write(to client: ClientConnection) {
        guard length > 0 else { return }
        client.clientWrite(source.getSlice(at: start, length: length)!)
        length = 0
    }
}
