import Foundation
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import TidepoolCore

/// One client of the pooler: frames its bytes, hands them to its `ClientSession` with the time,
/// and carries out what the session decides. Login is driven from here with the session's login
/// decisions, because it waits on the pooler's registries and lookups.
///
/// Threading: all mutable state is touched on the channel's event loop only.
final class ClientConnection: ChannelDuplexHandler, OnPoolerLoop, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Held strongly: the pooler lets go of the client when it forgets it (`Pooler.forget`).
    let pooler: any ClientConnectionOwner
    /// The pools, reached only through what `PoolDriving` offers.
    let pools: any PoolDriving
    /// The client's event loop and what the pooler keeps for it (the turn flusher, the clock).
    let loop: PoolerLoop
    /// Prepared statements' names, epoch and capacity, shared with the other clients.
    let statements: SharedStatements
    let channel: Channel
    var loopIndex: Int { loop.index }
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
    /// What the pooler counts the client under (`Pooler.forget` undoes it).
    var registration = ClientRegistration()
    /// Waiting in its loop's `TurnFlusher`.
    var flushQueued = false
    /// Where `traffic` is handed in (this loop's cell for the client's database).
    var trafficCell: Pooler.TrafficCell?
    /// Histograms for /metrics (when stats_listen_port is set).
    var timers: PoolerMetrics.DatabaseTimers?
    var user: String { session.user }
    var databaseName: String { session.database }
    let connectedAtWallClock = Date().timeIntervalSince1970
    /// PgBouncer's words: a Terminate is a close request, a socket closed without one is not.
    var closeReason = "client unexpected eof"
    /// Held while the session has paused reading the client.
    var reads = ReadGate()

    /// `pools`: the pooler's pool driver, unless a test stands in for it.
    init(pooler: any ClientConnectionOwner, channel: Channel, loopIndex: Int, pools: (any PoolDriving)? = nil) {
        self.pooler = pooler
        self.pools = pools ?? pooler.pools
        self.channel = channel
        self.loop = pooler.poolerLoops[loopIndex]
        self.statements = pooler.statements
        let global = pooler.config.global
        self.session = ClientSession(maxMessageLength: global.maxPacketSize, bufferLimit: global.maxBufferedBytes)
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

    // MARK: Carrying out the session's actions

    /// Carries out the actions in order. An action may lead to another event (a lend from the pool
    /// arrives inside `requestServer`): its actions are appended and carried out by the same loop.
    func run() {
        assertOnLoop()
        guard !runningActions else { return }
        runningActions = true
        var i = 0
        while true {
            while i < actions.count {
                let action = actions[i]
                i += 1
                perform(action)
            }
            // What was done may change which side can be read.
            session.settleReads(into: &actions)
            if i == actions.count { break }
        }
        actions.removeAll()
        session.actionsCarriedOut()
        nextClientWrite = 0
        runningActions = false
    }

    func perform(_ action: ClientSession.Action) {
        switch action {
        case .sendToServer:
            guard !session.toServer.isEmpty, let server else { return }
            if server.send(session.toServer, from: self) { session.handOffBacklogged() }
            session.toServer.removeAll(keepingCapacity: true)
        case .writeServerBytes(let start, let length):
            clientWrite(session.serverBuffer!.getSlice(at: start, length: length)!)
            loop.flusher.add(self)
        case .writeToClient:
            clientWrite(session.toClient[nextClientWrite])
            nextClientWrite += 1
            loop.flusher.add(self)
        case .flushClient:
            clientFlush()
        case .requestServer:
            pools.requestServer(for: self)
        case .leaveQueue:
            if let id { pools.clientGaveUp(id) }
        case .releaseServer(let reusable):
            ClientStatistics(self).handInTraffic()
            guard let server else { return }
            self.server = nil
            server.detach(from: self, lease: lease)
            // To the server's own driver: the pools, or a replication connection's.
            server.pools.release(server, reusable: reusable)
        case .resetAndReleaseServer(let reset):
            guard let server else { return }
            self.server = nil
            server.detach(from: self, lease: lease)
            server.command(.reset(reset.sql(serverResetQuery: session.serverResetQuery)))
        case .listenChanged:
            pooler.listenerHub.changed(self, session.listenChanges)
            session.listenChanges = ChannelChanges()
        case .cancelServerQuery(let reportBack):
            guard let server else { return }
            let sent = pooler.cancels.send(to: server.cancelTarget)
            if reportBack {
                sent.whenComplete { _ in self.onLoop { self.deliver(.cancelFinished) } }
            }
        case .watchClock:
            loop.clockWatchers[ObjectIdentifier(self)] = self
        case .unwatchClock:
            loop.clockWatchers[ObjectIdentifier(self)] = nil
        case .statementsAccepted:
            statements.accepted(session.accepted)
            session.accepted.removeAll()
        case .statementsStale:
            ClientStatistics(self).statementsStale()
        case .pinChanged(let pinned):
            pooler.pinChanged(self, pinned: pinned)
        case .settingsReplayed(let count):
            ClientStatistics(self).settingsReplayed(count)
        case .handInTraffic:
            ClientStatistics(self).handInTraffic()
        case .recordTiming(let kind, let microseconds):
            timers?.record(kind, microseconds: microseconds)
        case .logSlowQuery(let microseconds):
            ClientStatistics(self).slowQuery(microseconds: microseconds)
        case .closeWithError:
            ClientExit(self).closeWithError()
        case .terminate:
            ClientExit(self).terminate()
        case .forget:
            ClientExit(self).forget()
        case .runAdminCommand:
            guard let command = session.adminCommand else { return }
            // A command may complete on another loop (PAUSE waits on the first).
            pooler.admin.admin(command, on: eventLoop).hop(to: eventLoop).whenComplete { [self] result in
                session.adminAnswered(AdminConsoleSession.answer(result.mapError { $0 }), into: &actions)
                run()
            }
        case .countConsole(let received, let sent):
            pooler.countConsole(loop: loopIndex, received: received, sent: sent)
        case .login(let step):
            ClientLogin(self).carryOut(step)
        case .pauseClientReads:
            reads.hold(.session)
        case .resumeClientReads:
            reads.release(.session, context)
        case .pauseServerReads:
            server?.setReadsPaused(true, lease: lease)
        case .resumeServerReads:
            server?.setReadsPaused(false, lease: lease)
        }
    }

    // MARK: Channel events

    func channelActive(context: ChannelHandlerContext) {
        session.connectionOpened(now: .now(), loginTimeout: pooler.config.global.clientLoginTimeout, into: &actions)
        run()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted = event as? TLSUserEvent { session.tlsEstablished() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        session.beginRead(&buffer, statementEpoch: statements.epoch.load(ordering: .relaxed))
        process(&buffer)
    }

    /// Called by the loop's sweeper while the session watches the clock.
    func tick(now: NIODeadline) {
        if let error = session.tick(now: now, into: &actions) {
            logger.info("client \(peer) db=\(databaseName) user=\(user): \(error.message)")
        }
        run()
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        session.clientWritabilityChanged(context.channel.isWritable, into: &actions)
        run()
    }

    func read(context: ChannelHandlerContext) { reads.read(context) }

    /// A server on another loop wrote enough of what this client handed it.
    func handOffDrained(_ server: ServerConnection) {
        if server.fromClient.mayGoOn { deliver(.handOffDrained) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        closeReason = "client connection error: \(error)"
        context.close(promise: nil)
    }

    // MARK: Reading client bytes

    /// Hands the client's bytes to the session, carrying out each login step's actions before the
    /// next bytes are read; a framing error is a FATAL for the client.
    func process(_ buffer: inout ByteBuffer) {
        let now = NIODeadline.now()
        do throws(WireError) {
            while try session.read(
                &buffer, now: now, tlsOffered: pooler.security.clientTLS != nil,
                isKnownStatement: { statements.isKnown($0) }, into: &actions)
            {
                run()
            }
        } catch {
            logger.info("client \(peer): \(error.postgresError.message)")
            return sendFatal(error.postgresError, reason: "bad packet")
        }
        session.endRead(&buffer, now: now, into: &actions)
        run()
    }

    /// Feeds bytes the client sent before the connection could read them (during a lookup or the
    /// welcome) now that it can.
    func processStash() {
        if var kept = session.takeKeptBytes() { process(&kept) }
    }

    // MARK: Pool events (called on this event loop)

    /// An event from the pool, the listener or a server. `from` and `lease`: the server and lend
    /// it is about; it is dropped when that server or lend is no longer the client's.
    func deliver(_ event: ClientSession.Event, from sender: ServerConnection? = nil, lease: UInt64? = nil) {
        if let sender, sender !== server { return }
        if let lease, lease != self.lease { return }
        if case .serverLost = event { server = nil }
        session.handle(event, now: .now(), into: &actions)
        run()
    }

    func lent(_ server: ServerConnection, lease: UInt64) {
        // The lent server is the one a `.releaseServer` of this lend acts on; a link the client
        // already had (it never asks for a second server) is kept.
        let (linked, linkedLease) = (self.server, self.lease)
        self.server = server
        self.lease = lease
        defer {
            if let linked, self.server == nil {
                self.server = linked
                self.lease = linkedLease
            }
        }
        switch session.lent(
            server.session.state, now: .now(),
            statementCapacity: statements.capacity.load(ordering: .relaxed),
            isKnownStatement: { statements.isKnown($0) }, into: &actions)
        {
        case .linked:
            server.attach(self, lease: lease)
            run()
        case .parametersOnly:
            // Welcomed before the server's release (queued in `actions`) is carried out.
            ClientLogin(self).welcome(server.session.state.parameters, fromPool: false)
            run()
            processStash()
        case .unwanted:
            run()
        }
    }

    /// A notification from the pool's listener.
    func notification(_ message: ByteBuffer, channel: String) {
        let dropped = session.notification(message, channel: channel, now: .now(), into: &actions)
        if dropped > 0 { ClientStatistics(self).notificationsDropped(dropped) }
        run()
    }

    func waitFailed(_ error: PoolError) {
        guard session.waitFailed(error, into: &actions) else { return }
        logger.warning("client \(peer) db=\(databaseName) user=\(user): \(error.postgresError.message)")
        run()
    }

    /// Bytes from the linked server.
    func serverData(_ data: ByteBuffer, from sender: ServerConnection) {
        guard sender === server else { return }
        session.serverBytes(data, now: .now(), into: &actions)
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
}
