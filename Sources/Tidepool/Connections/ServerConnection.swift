import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import TidepoolCore

/// One connection from the pooler to PostgreSQL. It logs in, then either sits idle in the pool
/// or is linked to one client, to which it passes every byte it reads.
///
/// Threading: all mutable state is touched on `eventLoop` only, except `session.state` (the
/// backend's parameters and prepared statements), which only the linked client's session reads and
/// updates (the hand-over through the event loops orders those accesses).
final class ServerConnection: ChannelDuplexHandler, OnPoolerLoop, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let id: ServerID
    let pool: PoolKey
    let address: Address
    /// The host of the database's host list it went to (load_balance_hosts).
    let host: String?
    /// What the connection asks of the pooler once made; held strongly (the pooler lets go of the
    /// server when it closes, `serverClosed`).
    let pooler: any ServerConnectionOwner
    /// Told when the host of a host list refused the login (load_balance_hosts).
    let connector: ServerConnector
    /// The pools (or a replication connection's or listener's driver), told what became of this
    /// connection only through `PoolDriving`.
    let pools: any PoolDriving
    /// The server's event loop and what the pooler keeps for it (the turn flusher).
    let loop: PoolerLoop
    private(set) var channel: Channel?
    var context: ChannelHandlerContext?
    /// The connection's life outside a lend: login, the pooler's own queries, idle time.
    var session: ServerSession
    var inbound = KeptBytes()
    var scanner = MessageScanner()
    var owner: ClientConnection?
    /// Lends of this server are numbered under the pool lock (`leasesIssued`); the server follows
    /// only the newest (`leases`, on its loop), so an attach or detach that reaches its loop late
    /// (queued from another loop behind a newer lend) changes nothing.
    var leasesIssued: UInt64 = 0
    var leases = LeaseTracker()
    /// server_connect_timeout for the login or a query of the pooler's own.
    var timeout: Scheduled<Void>?
    let database: DatabaseEntry?

    let connectedAtWallClock = Date().timeIntervalSince1970

    /// The index of the server's event loop in the pooler's table.
    var loopIndex: Int { loop.index }
    /// Waiting in its loop's `TurnFlusher`.
    var flushQueued = false
    /// Held while the linked client's session paused reading this server, or while too much
    /// of what was read waits for a client on another loop.
    var reads = ReadGate()
    /// Bytes read here and handed to a client on another loop that it has not taken in yet.
    let toClient: HandOff
    /// Bytes a client on another loop handed here to be written, not written yet.
    let fromClient: HandOff

    /// Made by `ServerConnector.make`, with its login (nil for a placeholder whose database is gone).
    init(
        id: ServerID, pool: PoolKey, database: DatabaseEntry?, login: ServerLoginStateMachine?,
        owner: any ServerConnectionOwner, connector: ServerConnector, loop: PoolerLoop, host: String?,
        driver: any PoolDriving
    ) {
        self.id = id
        self.loop = loop
        self.pool = pool
        self.pooler = owner
        self.connector = connector
        self.pools = driver
        self.database = database
        self.session = ServerSession(
            state: ServerSessionState(maxPreparedStatements: owner.config.global.maxPreparedStatements),
            connectQuery: database?.connectQuery, targetSessionAttrs: database?.targetSessionAttrs ?? .any,
            login: login)
        self.address = Address(database, host: host)
        self.host = host
        let limit = owner.config.global.maxBufferedBytes
        toClient = HandOff(limit: limit)
        fromClient = HandOff(limit: limit)
    }

    /// The address a TCP connection reached, for the DNS cache to tell which servers went to an
    /// address a host name no longer has (read from other threads, so boxed).
    private let remoteIPBox = NIOLockedValueBox<String?>(nil)
    var remoteIP: String? { remoteIPBox.withLockedValue { $0 } }

    // MARK: Login

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Carries out what the session decided (on the server's loop).
    func run(_ actions: [ServerSession.Action]) {
        assertOnLoop()
        for action in actions {
            switch action {
            case .send(let bytes):
                if let context { context.writeAndFlush(wrapOutboundOut(bytes), promise: nil) }
            case .armTimeout:
                timeout?.cancel()
                timeout = eventLoop.scheduleTask(in: pooler.config.global.serverConnectTimeout) { [self] in
                    run(session.timedOut())
                }
            case .disarmTimeout:
                timeout?.cancel()
                timeout = nil
            case .loggedIn:
                if pooler.config.global.logConnections, let channel {
                    pooler.logger.info(
                        "\(logPrefix) \(LogWords.newServerConnection(from: channel.localAddress.logText))")
                }
                pools.serverLoggedIn(self)
            case .connectFailed(let error):
                if let host { connector.hostFailed(host, database: pool.database) }
                pools.serverConnectFailed(self, error: error)
            case .released(let reusable): pools.release(self, reusable: reusable)
            case .checkFinished(let ok): pools.checkFinished(self, ok: ok)
            case .lost(let unused):
                if let owner {
                    self.owner = nil
                    owner.onLoop { owner.deliver(.serverLost(unused: unused), from: self) }
                }
                pools.serverClosed(self)
            case .close: channel?.close(promise: nil)
            case .logWarning(let text): pooler.logger.warning("server \(id) of \(pool): \(text)")
            case .logInfo(let text): pooler.logger.info("server \(id) of \(pool): \(text)")
            case .forListener(let type, let body): pools.listenerMessage(self, type: type, body: body)
            }
        }
    }

    /// A command of the pool's or the listener's, from any loop.
    func command(_ command: ServerSession.Command) {
        onLoop { self.run(self.session.command(command)) }
    }

    func channelActive(context: ChannelHandlerContext) {
        if case .tcp = address, let ip = context.channel.remoteAddress?.ipAddress {
            remoteIPBox.withLockedValue { $0 = ip }
        }
        run(session.connected())
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .ready = session.phase, let owner, inbound.isEmpty {
            // The hot path: hand the bytes to the client as they are.
            let bytes = unwrapInboundIn(data)
            if owner.loopIndex == loopIndex {
                owner.serverData(bytes, from: self)  // same loop: no task, no closure
            } else {
                let count = bytes.readableBytes
                if toClient.handed(count) { reads.hold(.handOff) }
                owner.eventLoop.execute {
                    owner.serverData(bytes, from: self)
                    if self.toClient.taken(count) { self.onLoop { self.handOffDrained() } }
                }
            }
            return
        }
        var buffer = unwrapInboundIn(data)
        inbound.prepend(to: &buffer)
        do {
            while let chunk = try scanner.next(from: &buffer, classify: { _ in .inspect }) {
                guard case .message(let type, let body, _) = chunk else { continue }
                run(session.message(type: type, body: body))
                if case .closed = session.phase { return }
                if case .ready = session.phase, let owner, buffer.readableBytes > 0 {
                    // Lent while these bytes were read: the rest is the client's.
                    let rest = buffer
                    owner.onLoop { owner.serverData(rest, from: self) }
                    return
                }
            }
        } catch {
            run(session.badMessage())
            return
        }
        inbound.keep(&buffer)
    }

    func channelInactive(context: ChannelHandlerContext) {
        run(session.closed())
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        guard let owner else { return }
        let (writable, lease) = (context.channel.isWritable, leases.current)
        owner.onLoop { owner.deliver(.serverWritable(writable), from: self, lease: lease) }
    }

    func read(context: ChannelHandlerContext) { reads.read(context) }

    /// The client on another loop took in enough of what was handed to it.
    private func handOffDrained() {
        assertOnLoop()
        guard reads.holds.contains(.handOff), toClient.mayGoOn else { return }
        reads.release(.handOff, context)
    }

    /// The linked client (lend number `lease`) can take no more, or can again.
    func setReadsPaused(_ paused: Bool, lease: UInt64) {
        onLoop {
            guard self.leases.current == lease, self.leases.attached else { return }
            if paused { self.reads.hold(.session) } else { self.reads.release(.session, self.context) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        pooler.logger.debug("server \(id) error: \(error)")
        let fault: ServerSession.Fault =
            switch error {
            case let error as PostgresError: .postgres(error)
            case is IOError, is ChannelError, NIOSSLError.uncleanShutdown: .transport("\(error)")
            default: .handshake("\(error)")
            }
        run(session.failed(fault))
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
        assertOnLoop()
        if case .closed = session.phase {
            // It died between being lent and being linked: nobody else will tell the client.
            client.onLoop { client.deliver(.serverLost(unused: true), from: self) }
        } else if leases.attach(lease) {
            owner = client
            session.attached()
        }
    }

    /// Ends lend number `lease`. A detach (or an attach) of an older lend that reaches the server's
    /// loop after a newer one must not cut the newer client off: the newer client may run on the
    /// server's loop and attach at once, while the older lend's tasks still wait in its queue.
    func detach(from client: ClientConnection, lease: UInt64) {
        if eventLoop.inEventLoop {
            detachOnLoop(lease)
        } else {
            onLoop { self.detachOnLoop(lease) }
        }
    }

    private func detachOnLoop(_ lease: UInt64) {
        assertOnLoop()
        guard leases.detach(lease) else { return }
        owner = nil
        reads.release(.session, context)
    }

    /// Writes bytes of `client` (whole or partial messages), called on the client's loop; they are
    /// flushed at the end of the server loop's turn. True when bytes handed to this server's loop
    /// are past max_buffered_bytes (the client is told when they drain: `handOffDrained`).
    func send(_ buffers: [ByteBuffer], from client: ClientConnection) -> Bool {
        if client.loopIndex == loopIndex {
            write(buffers)
            return false
        }
        var count = 0
        for b in buffers { count += b.readableBytes }
        let backlogged = fromClient.handed(count)  // counted before the other loop can take them
        eventLoop.execute {
            self.write(buffers)
            if self.fromClient.taken(count) { client.onLoop { client.handOffDrained(self) } }
        }
        return backlogged
    }

    /// On the server's loop: from this handler's place in the pipeline while it is there (skips
    /// the pipeline's tail and its event-loop check), else through the channel.
    private func write(_ buffers: [ByteBuffer]) {
        assertOnLoop()
        if let context {
            for b in buffers { context.write(NIOAny(b), promise: nil) }
            session.wroteClientBytes()
            loop.flusher.add(self)
        } else if let channel {
            for b in buffers { channel.write(b, promise: nil) }
            channel.flush()
        }
    }

}
