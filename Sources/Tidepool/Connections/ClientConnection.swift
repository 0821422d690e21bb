import Foundation
import Logging
import NIOCore
import NIOSSL
import TidepoolCore

/// One client of the pooler: frames its bytes, hands them to its `ClientSession` with the time,
/// and carries out what the session decides. Login is driven from here with the session's login
/// decisions, because it waits on the pooler's registries and lookups.
///
/// Threading: all mutable state is touched on the channel's event loop only.
final class ClientConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// unowned(unsafe): the pooler outlives every connection (it stops its event loops before it
    /// goes), and a checked unowned reference cost an atomic retain and release per use.
    unowned(unsafe) let pooler: Pooler
    let channel: Channel
    let loopIndex: Int
    var session: ClientSession
    /// What the session decided and the connection has not carried out yet; reused.
    var actions = ClientSession.Actions()
    var runningActions = false
    /// The next of `session.toClient` to write.
    var nextClientWrite = 0
    /// The server the session is linked to, and the number of the lend that linked it.
    var server: ServerConnection?
    var lease: UInt64 = 0
    var id: ClientID?
    var joinedPool = false
    /// Waiting in its loop's `TurnFlusher`.
    var flushQueued = false
    var auth: ClientAuthStateMachine?
    /// Where `traffic` is handed in (this loop's cell for the client's database).
    var trafficCell: Pooler.TrafficCell?
    /// Histograms for /metrics (when stats_listen_port is set).
    var timers: PoolerMetrics.DatabaseTimers?
    var user = ""
    var databaseName = ""
    var poolKey: PoolKey?
    var cancelKey: (Int32, Int32)?
    let connectedAt = NIODeadline.now()
    let connectedAtWallClock = Date().timeIntervalSince1970
    var closeReason = "client close request"
    /// The client address counted for max_client_conn_per_ip (nil for a Unix socket).
    var countedAddress: String?
    /// The client's connection is encrypted (it sent SSLRequest and the handshake was started).
    var tls = false

    init(pooler: Pooler, channel: Channel, loopIndex: Int) {
        self.pooler = pooler
        self.channel = channel
        self.loopIndex = loopIndex
        self.session = ClientSession(maxMessageLength: pooler.config.global.maxPacketSize)
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

    var logger: Logger { pooler.logger }
    /// The client's event loop, found without touching its channel (a cold object when a server
    /// is handed over among thousands of clients).
    var eventLoop: EventLoop { pooler.loops[loopIndex] }
    var peer: String { channel.remoteAddress.map { "\($0)" } ?? "unix" }

    func onLoop(_ body: @escaping @Sendable () -> Void) {
        let loop = eventLoop
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }

    // MARK: Carrying out the session's actions

    /// Carries out the actions in order. An action may lead to another event (a lend from the pool
    /// arrives inside `requestServer`): its actions are appended and carried out by the same loop.
    func run() {
        guard !runningActions else { return }
        runningActions = true
        var i = 0
        while i < actions.count {
            let action = actions[i]
            i += 1
            perform(action)
        }
        actions.removeAll()
        session.actionsCarriedOut()
        nextClientWrite = 0
        runningActions = false
    }

    func perform(_ action: ClientSession.Action) {
        switch action {
        case .sendToServer:
            guard !session.toServer.isEmpty else { return }
            server?.send(session.toServer, from: self)
            session.toServer.removeAll(keepingCapacity: true)
        case .writeServerBytes(let start, let length):
            clientWrite(session.serverBuffer!.getSlice(at: start, length: length)!)
            pooler.loopFlushers[loopIndex].add(self)
        case .writeToClient:
            clientWrite(session.toClient[nextClientWrite])
            nextClientWrite += 1
            pooler.loopFlushers[loopIndex].add(self)
        case .flushClient:
            clientFlush()
        case .requestServer:
            pooler.requestServer(for: self)
        case .leaveQueue:
            if let id { pooler.clientGaveUp(id) }
        case .releaseServer(let reusable):
            handInTraffic()
            guard let server else { return }
            self.server = nil
            server.detach(from: self, lease: lease)
            pooler.release(server, reusable: reusable)
        case .resetAndReleaseServer:
            guard let server else { return }
            self.server = nil
            server.detach(from: self, lease: lease)
            server.resetAndRelease(session.serverResetQuery)
        case .cancelServerQuery(let reportBack):
            guard let server else { return }
            let sent = pooler.sendCancel(to: server.cancelTarget)
            if reportBack {
                sent.whenComplete { _ in
                    self.onLoop {
                        self.session.cancelFinished(now: .now(), into: &self.actions)
                        self.run()
                    }
                }
            }
        case .statementsAccepted:
            pooler.statementsAccepted(session.accepted)
            session.accepted.removeAll()
        case .handInTraffic:
            handInTraffic()
        case .recordTiming(let kind, let microseconds):
            if let timers {
                switch kind {
                case .wait: timers.wait.recordNanoseconds(microseconds * 1000)
                case .query: timers.query.recordNanoseconds(microseconds * 1000)
                case .transaction: timers.transaction.recordNanoseconds(microseconds * 1000)
                }
            }
        case .logSlowQuery(let microseconds):
            logger.warning(
                "slow query: db=\(databaseName) user=\(user) client=\(peer) duration=\(microseconds / 1000) ms: \(session.slowQueryText)"
            )
        case .closeWithError:
            guard let closing = session.closing else { return }
            let error = closing.error
            closeReason = closing.reason
            pooler.metrics.clientError(error.code)
            if pooler.config.global.logPoolerErrors {
                logger.warning("pooler error to client \(peer) db=\(databaseName) user=\(user): \(error.message)")
            }
            var out = channel.allocator.buffer(capacity: 128)
            Wire.errorResponse(error, into: &out)
            channel.writeAndFlush(out).whenComplete { [channel] _ in channel.close(promise: nil) }
        case .terminate:
            closeReason = "client close request"
            finish()
            if flushQueued { clientFlush() }  // unflushed writes are dropped by close
            channel.close(promise: nil)
        case .forget:
            forget()
        }
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
        switch session.state {
        case .startup, .lookingUpSecret, .authenticating, .awaitingWelcome:
            sendFatal(
                .fatal(SQLState.protocolViolation, "client_login_timeout: login took too long"),
                reason: "client_login_timeout")
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
        session.clientRead(buffer)
        session.inbound.prepend(to: &buffer)
        let now = NIODeadline.now()
        guard processCatching(&buffer, now: now) else { return }
        if session.state != .closed { session.inbound.keep(&buffer) }
        session.clientReadDone(now: now, into: &actions)
        run()
    }

    /// Runs `process`, turning a framing error into a FATAL for the client. False when it closed.
    func processCatching(_ buffer: inout ByteBuffer, now: NIODeadline) -> Bool {
        do {
            try process(&buffer, now: now)
            return true
        } catch let error as WireError {
            logger.info("client \(peer): \(error.postgresError.message)")
            sendFatal(error.postgresError, reason: "bad packet")
        } catch {
            sendFatal(.fatal(SQLState.internalError, "\(error)"), reason: "internal error")
        }
        return false
    }

    /// Called by the loop's sweeper: the client-side timeouts.
    func checkTimeouts(now: NIODeadline) {
        guard session.timeoutClock != nil else { return }
        if let error = session.tick(now: now, into: &actions) {
            logger.info("client \(peer) db=\(databaseName) user=\(user): \(error.message)")
        }
        run()
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        closeReason = "client connection error: \(error)"
        context.close(promise: nil)
    }

    // MARK: Reading client bytes

    func process(_ buffer: inout ByteBuffer, now: NIODeadline) throws {
        while buffer.readableBytes > 0 {
            switch session.state {
            case .startup:
                guard let packet = try StartupPacket.parse(from: &buffer) else { return }
                if packet == .sslRequest, !tls, let context = pooler.security.clientTLS {
                    // Bytes after SSLRequest came before encryption: refuse them rather than
                    // read them as if the handshake had covered them.
                    guard buffer.readableBytes == 0 else {
                        sendFatal(
                            .fatal(SQLState.protocolViolation, "unexpected data after SSLRequest"),
                            reason: "data after SSLRequest")
                        return
                    }
                    startTLS(context)
                    return
                }
                handleStartup(packet)
            case .lookingUpSecret, .awaitingWelcome:
                return  // kept until the secret is known, or the client is welcomed
            case .authenticating:
                guard let chunk = try session.scanner.next(from: &buffer, classify: { _ in .inspect }) else { return }
                guard case .message(let type, let body, _) = chunk, type == MessageType.password, var auth else {
                    sendFatal(
                        .fatal(SQLState.protocolViolation, "expected a password message"),
                        reason: "unexpected message during login")
                    return
                }
                let action = auth.receivePasswordMessage(body)
                self.auth = auth
                handleAuth(action, auth: auth)
            case .idle, .waiting, .linked:
                // Its actions are carried out once the whole read is taken in.
                try session.clientBytes(
                    &buffer, now: now, isKnownStatement: { pooler.isKnownStatement($0) }, into: &actions)
                switch session.state {
                case .idle, .waiting, .linked: return  // more bytes are needed first
                default: continue
                }
            case .admin:
                guard let chunk = try session.scanner.next(from: &buffer, classify: { _ in .inspect }),
                    case .message(let type, let body, _) = chunk
                else { return }
                handleAdmin(type: type, body: body, readOnly: session.adminReadOnly)
            case .closed:
                buffer.moveReaderIndex(to: buffer.writerIndex)
                return
            }
        }
    }

    /// Feeds bytes the client sent before the connection could read them (during a lookup or the
    /// welcome) now that it can.
    func processStash() {
        guard var stash = session.inbound.take(), stash.readableBytes > 0 else { return }
        let now = NIODeadline.now()
        if processCatching(&stash, now: now), session.state != .closed { session.inbound.keep(&stash) }
        session.clientReadDone(now: now, into: &actions)
        run()
    }

    // MARK: Admin console

    func handleAdmin(type: UInt8, body: ByteBuffer, readOnly: Bool) {
        switch AdminConsoleSession.receive(type: type, body: body, readOnly: readOnly) {
        case .terminate:
            actions.append(.terminate)
            run()
        case .reply(let reply):
            channel.writeAndFlush(reply, promise: nil)
        case .run(let command):
            let channel = self.channel
            pooler.admin(command, on: channel.eventLoop).whenComplete { result in
                channel.writeAndFlush(AdminConsoleSession.answer(result.mapError { $0 }), promise: nil)
            }
        case .none:
            break
        }
    }

    // MARK: Login

    /// Answers SSLRequest with 'S' and puts the TLS handler in front of this one; the client's
    /// next bytes are its TLS handshake.
    func startTLS(_ context: NIOSSLContext) {
        var out = channel.allocator.buffer(capacity: 1)
        out.writeInteger(MessageType.encryptionAccepted)
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

    /// "address:port" of a TCP client; nil for a Unix socket.
    var clientAddressAndPort: String? {
        guard let address = channel.remoteAddress, address.protocol != .unix, let ip = address.ipAddress else {
            return nil
        }
        return "\(ip):\(address.port ?? 0)"
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
            out.writeInteger(MessageType.encryptionRefused)
            channel.writeAndFlush(out, promise: nil)
        case .cancel(let pid, let key):
            pooler.cancel(processID: pid, secretKey: key)
            closeReason = "cancel request"
            session.loginStep(.closed)
            channel.close(promise: nil)
        case .startup(let minor, let parameters, let unrecognized):
            login(minor: minor, parameters: parameters, unrecognized: unrecognized)
        }
    }

    var loginRequest: LoginRequest {
        LoginRequest(
            user: user, database: databaseName, clientIP: clientIP, tls: tls,
            certificateCommonName: certificateCommonName)
    }

    func login(minor: Int, parameters: [String: String], unrecognized: [String]) {
        guard let user = parameters["user"], !user.isEmpty else {
            sendFatal(
                .fatal(SQLState.invalidAuthorization, "no PostgreSQL user name specified in startup packet"),
                reason: "no user name")
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
            logger.warning("client \(peer) user=\(user) refused: \(error.message)")
            sendFatal(error, reason: error.message)
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
            session.wanted = try StartupParameters.resolve(parameters, ignored: config.global.ignoreStartupParameters)
            if let name = ClientSession.applicationName(
                session.wanted["application_name"], clientAddress: clientAddressAndPort, config: config)
            {
                session.wanted["application_name"] = name
            }
        } catch {
            sendFatal(error, reason: "unsupported startup parameter")
            return
        }
        let request = loginRequest
        let method: AuthType
        switch ClientSession.authMethod(request, config: config, hba: pooler.security.hba) {
        case .success(let m): method = m
        case .failure(let refusal):
            refuse(refusal)
            return
        }
        let isConsole = ClientSession.isAdminConsole(databaseName, config: config)
        let entry = isConsole ? nil : config.database(named: databaseName)
        let source = ClientSession.secretSource(
            request, method: method, known: pooler.userlist[user], canLookUp: pooler.authUser(for: entry) != nil,
            config: config)
        switch source {
        case .failure(let refusal):
            refuse(refusal)
        case .success(.known(let secret)):
            startAuth(method, secret: secret)
        case .success(.none):
            startAuth(method, secret: nil)
        case .success(.lookUp):
            session.loginStep(.lookingUpSecret)
            pooler.lookUpSecret(user: user, database: entry, on: channel.eventLoop).whenSuccess { [self] outcome in
                guard session.state == .lookingUpSecret else { return }
                switch outcome {
                case .found(let secret):
                    startAuth(method, secret: secret)
                case .notFound:
                    startAuth(method, secret: nil)  // fails like a wrong password, as PostgreSQL does
                case .failed(let error):
                    logger.warning("auth_query for user=\(user) failed: \(error.message)")
                    sendFatal(
                        .fatal(SQLState.connectionFailure, "authentication lookup failed (auth_query)"),
                        reason: "auth_query failed")
                }
                if session.state == .authenticating { processStash() }
            }
        }
    }

    func refuse(_ refusal: Refusal) {
        sendFatal(refusal.error, reason: refusal.reason)
    }

    func startAuth(_ authType: AuthType, secret: PasswordSecret?) {
        var auth = ClientAuthStateMachine(authType: authType, user: user, secret: secret)
        let action = auth.start()
        self.auth = auth
        session.loginStep(.authenticating)
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
            logger.info("client \(peer) user=\(user): \(error.message)")
            sendFatal(error, reason: "authentication failed")
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

    func authenticated() {
        auth = nil
        let config = pooler.config
        let database: DatabaseEntry
        switch ClientSession.destination(loginRequest, config: config, isDisabled: { pooler.isDisabled($0) }) {
        case .failure(let refusal):
            sendFatal(refusal.error, reason: refusal.reason)
            return
        case .success(.adminConsole(let readOnly)):
            session.adminReadOnly = readOnly
            session.loginStep(.admin)
            endLoginTimer()
            var out = channel.allocator.buffer(capacity: 256)
            Wire.authenticationOk(into: &out)
            for (name, value) in [
                ("server_version", "15.0 (Tidepool \(TidepoolCoreVersion.string))"), ("client_encoding", "UTF8"),
                ("server_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("standard_conforming_strings", "on"),
                ("integer_datetimes", "on"), ("application_name", session.wanted["application_name"] ?? ""),
            ] {
                Wire.parameterStatus(name, value, into: &out)
            }
            Wire.backendKeyData(processID: 0, secretKey: 0, into: &out)
            Wire.readyForQuery(.idle, into: &out)
            channel.writeAndFlush(out, promise: nil)
            return
        case .success(.pool(let entry)):
            database = entry
        }
        let now = NIODeadline.now()
        session.joinPool(
            poolMode: config.poolMode(database: database, user: user), config: config, user: user, now: now)
        if config.global.statsListenPort > 0 { timers = pooler.metrics.timers(for: databaseName) }
        session.latency = pooler.loopLatency[loopIndex].recorder(for: databaseName)
        session.reportsTimings = timers != nil
        let serverUser = database.user ?? user
        poolKey = PoolKey(database: databaseName, user: serverUser)
        pooler.joinPool(poolKey!, database: database)
        joinedPool = true
        if let welcome = pooler.welcomeParameters(for: poolKey!) {
            sendWelcome(welcome, fromPool: true)
        } else {
            // No server of this pool has logged in yet: borrow one to learn its parameters.
            session.loginStep(.awaitingWelcome)
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
        let wanted = session.wanted
        let make = { ClientSession.Welcome(serverParameters: serverParameters, wanted: wanted) }
        var welcome = fromPool ? pooler.welcome(for: poolKey!, values: session.$wanted, make: make) : make()
        out.writeBuffer(&welcome.messages)
        session.wantedParameters = welcome.wanted
        let key = pooler.issueCancelKey(for: self)
        cancelKey = key
        Wire.backendKeyData(processID: key.0, secretKey: key.1, into: &out)
        Wire.readyForQuery(.idle, into: &out)
        channel.writeAndFlush(out, promise: nil)
        let now = NIODeadline.now()
        if session.timeoutClock != nil {
            pooler.loopClients[loopIndex].clients[ObjectIdentifier(self)] = self
        }
        session.loggedIn(now: now, into: &actions)
        run()
    }

    // MARK: Pool events (called on this event loop)

    func lent(_ server: ServerConnection, lease: UInt64) {
        if session.state == .awaitingWelcome {
            // The server was only needed for its parameters.
            pooler.release(server, reusable: true)
            sendWelcome(server.parameters, fromPool: false)
            processStash()
            return
        }
        let linked = session.lent(
            server.sessionState, now: .now(), isKnownStatement: { pooler.isKnownStatement($0) }, into: &actions)
        if linked {
            self.server = server
            self.lease = lease
            server.attach(self, lease: lease)
        } else {
            // The client left while waiting; the server was never used.
            pooler.release(server, reusable: true)
        }
        run()
    }

    func waitFailed(_ error: PoolError) {
        guard session.state == .waiting || session.state == .awaitingWelcome else { return }
        logger.warning("client \(peer) db=\(databaseName) user=\(user): \(error.postgresError.message)")
        session.waitFailed(error, into: &actions)
        run()
    }

    /// Bytes from the linked server.
    func serverData(_ data: ByteBuffer, from sender: ServerConnection) {
        guard sender === server else { return }
        session.serverBytes(data, now: .now(), into: &actions)
        run()
    }

    /// Adds this client's counters to its database's totals.
    func handInTraffic() {
        let traffic = session.takeTraffic()
        guard !traffic.isZero else { return }
        if trafficCell?.database != databaseName {
            trafficCell = pooler.trafficCell(loop: loopIndex, database: databaseName)
        }
        trafficCell!.add(traffic)
    }

    /// A CancelRequest with this client's key.
    func cancelRequested() {
        session.cancelRequested(now: .now(), into: &actions)
        run()
    }

    /// The linked server closed or failed.
    func serverLost(_ lost: ServerConnection) {
        guard lost === server else { return }
        server = nil
        session.serverLost(into: &actions)
        run()
    }

    // MARK: Closing

    /// Sends a FATAL and closes: the session gives back what it holds.
    func sendFatal(_ error: PostgresError, reason: String) {
        session.close(error, reason: reason, into: &actions)
        run()
    }

    /// The client is gone: the session gives back or closes its server. Safe to call more than once.
    func finish() {
        let global = pooler.config.global
        session.finish(
            serverResetQuery: global.serverResetQuery, resetAlways: global.serverResetQueryAlways, into: &actions)
        run()
    }

    /// Forgets the client everywhere, once, when the session closes.
    func forget() {
        endLoginTimer()
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
