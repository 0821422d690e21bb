import Logging
import NIOConcurrencyHelpers
import NIOCore
import TidepoolCore

/// What the drivers of servers outside the pools (a pool's listener, a replication client's
/// server) need of the pooler.
protocol UnpooledServerOwner: AnyObject, Sendable {
    var loops: [EventLoop] { get }
    var logger: Logger { get }
    var metrics: PoolerMetrics { get }
    /// Slots for servers outside the pools (`unpooledServerOpening`), and the clients to deliver to.
    var pools: PoolDriver! { get }
    /// Opens a pool's listener connection, driven by `driver`.
    func openListener(pool key: PoolKey, loop: Int, driver: ListenerDriver) -> ServerConnection
}

/// Carries out one pool's `ChannelListener`: opens and closes its server connection, sends its
/// LISTEN and UNLISTEN statements, and hands each notification to the clients listening on its
/// channel. Everything runs on one event loop (the listener connection's), so the machine needs
/// no lock: clients' events hop there, and deliveries hop to each client's loop.
final class ListenerDriver: PoolDriving, @unchecked Sendable {
    let key: PoolKey
    let loop: EventLoop
    let loopIndex: Int
    /// The pooler, which owns the hub that owns this driver.
    unowned let pooler: any UnpooledServerOwner
    var machine = ChannelListener()
    /// The connection the machine speaks of; callbacks of an older one are ignored.
    var connection: ServerConnection?
    /// `connection` counts against max_db_connections / max_user_connections.
    var holdsSlot = false
    /// The error of the statements in flight, if they failed.
    var commandError: String?
    var timer: Scheduled<Void>?

    init(key: PoolKey, pooler: any UnpooledServerOwner, loopIndex: Int) {
        self.key = key
        self.pooler = pooler
        self.loopIndex = loopIndex
        self.loop = pooler.loops[loopIndex]
    }

    // MARK: From clients (any loop)

    func subscribe(_ client: ClientID, channels: [String]) {
        event { $0.subscribe(client, channels: channels, now: .now()) }
    }

    func unsubscribe(_ client: ClientID, channels: [String]) {
        event { $0.unsubscribe(client, channels: channels, now: .now()) }
    }

    func clientGone(_ client: ClientID) {
        event { $0.clientGone(client, now: .now()) }
    }

    /// Channels and their clients, for SHOW LISTENS.
    func channels() -> EventLoopFuture<[(channel: String, clients: Int)]> {
        loop.submit { self.machine.channelCounts }
    }

    private func event(_ body: @escaping @Sendable (inout ChannelListener) -> [ChannelListener.Action]) {
        if loop.inEventLoop {
            carryOut(body(&machine))
        } else {
            loop.execute { self.carryOut(body(&self.machine)) }
        }
    }

    // MARK: The machine's actions (on `loop`)

    private func carryOut(_ actions: [ChannelListener.Action]) {
        for action in actions {
            switch action {
            case .connect:
                open()
            case .send(let sql):
                commandError = nil
                connection?.command(.listenerQuery(sql))
            case .confirm(let ids):
                // The listener listens on these clients' new channels: their held ReadyForQuery may go.
                for client in pooler.pools.clients(ids) {
                    client.eventLoop.execute { client.deliver(.listenConfirmed) }
                }
            case .close:
                if let connection {
                    self.connection = nil
                    connection.command(.terminate)
                    releaseSlot()
                }
            case .armTimer(let at):
                timer?.cancel()
                timer = loop.scheduleTask(deadline: at) { [self] in carryOut(machine.timerFired(now: .now())) }
            case .warn(let text):
                pooler.logger.warning("listener of \(key): \(text)")
            }
        }
    }

    private func open() {
        guard pooler.pools.unpooledServerOpening(key) else {
            carryOut(
                machine.connectFailed(
                    "max_db_connections or max_user_connections reached", now: .now()))
            return
        }
        holdsSlot = true
        connection = pooler.openListener(pool: key, loop: loopIndex, driver: self)
    }

    private func releaseSlot() {
        guard holdsSlot else { return }
        holdsSlot = false
        pooler.pools.unpooledServerClosed(key)
    }

    // MARK: The connection (on `loop`)

    func requestServer(for client: ClientConnection) {}
    func clientGaveUp(_ id: ClientID) {}
    func release(_ server: ServerConnection, reusable: Bool) {}
    func checkFinished(_ server: ServerConnection, ok: Bool) {}

    func serverLoggedIn(_ server: ServerConnection) {
        onLoop {
            guard server === self.connection else { return }
            self.carryOut(self.machine.connected(now: .now()))
        }
    }

    func serverConnectFailed(_ server: ServerConnection, error: PostgresError) {
        onLoop {
            guard server === self.connection else { return }
            self.connection = nil
            self.releaseSlot()
            self.carryOut(self.machine.connectFailed(error.message, now: .now()))
        }
    }

    func serverClosed(_ server: ServerConnection) {
        onLoop {
            guard server === self.connection else { return }
            self.connection = nil
            self.releaseSlot()
            if case .ready = self.machine.phase {
                self.pooler.metrics.count("tidepool_listener_reconnects_total", self.labels)
            }
            self.carryOut(self.machine.lost(now: .now()))
        }
    }

    func listenerMessage(_ server: ServerConnection, type: UInt8, body: ByteBuffer) {
        guard server === connection else { return }
        switch type {
        case MessageType.notificationResponse:
            deliver(body)
        case MessageType.errorResponse:
            commandError = WireDecode.errorFields(body).message
        case MessageType.readyForQuery:
            let error = commandError
            commandError = nil
            carryOut(machine.commandFinished(error: error, now: .now()))
        default:
            break
        }
    }

    var labels: [(String, String)] { [("database", key.database), ("user", key.user)] }

    /// Hands a NotificationResponse to every client listening on its channel.
    private func deliver(_ body: ByteBuffer) {
        var reader = body
        guard reader.readInteger(as: Int32.self) != nil, let channel = reader.readNullTerminatedString() else { return }
        let recipients = machine.recipients(of: channel)
        guard !recipients.isEmpty else { return }
        var message = ByteBufferAllocator().buffer(capacity: body.readableBytes + 5)
        message.writeInteger(MessageType.notificationResponse)
        message.writeInteger(Int32(body.readableBytes + 4))
        var copy = body
        message.writeBuffer(&copy)
        let clients = pooler.pools.clients(recipients)
        for client in clients {
            client.eventLoop.execute { client.notification(message, channel: channel) }
        }
        pooler.metrics.count("tidepool_notifications_delivered_total", labels, by: clients.count)
    }

    private func onLoop(_ body: @escaping @Sendable () -> Void) {
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }
}

/// Each pool's listener (LISTEN in transaction and statement pooling), made when a client of the
/// pool first listens, under a lock of its own.
final class ListenerHub: Sendable {
    private unowned let pooler: any UnpooledServerOwner
    private let drivers = NIOLockedValueBox([PoolKey: ListenerDriver]())

    init(pooler: any UnpooledServerOwner) { self.pooler = pooler }

    /// The pool's listener, made on `loop` if it is the first.
    func listener(for key: PoolKey, loop: Int) -> ListenerDriver {
        drivers.withLockedValue { drivers in
            if let listener = drivers[key] { return listener }
            let made = ListenerDriver(key: key, pooler: pooler, loopIndex: loop)
            drivers[key] = made
            return made
        }
    }

    var all: [ListenerDriver] { drivers.withLockedValue { Array($0.values) } }
    /// The pools that have a listener (a pool with one is in use).
    var pools: Set<PoolKey> { drivers.withLockedValue { Set($0.keys) } }

    /// The client's channels changed: its pool's listener is told.
    func changed(_ client: ClientConnection, _ changes: ChannelChanges) {
        guard let id = client.id, let pool = client.registration.pool else { return }
        let listener = listener(for: pool, loop: client.loopIndex)
        if !changes.removed.isEmpty { listener.unsubscribe(id, channels: changes.removed) }
        if !changes.added.isEmpty {
            client.registration.listens = true
            listener.subscribe(id, channels: changes.added)
        }
    }
}

extension Pooler {
    func openListener(pool key: PoolKey, loop: Int, driver: ListenerDriver) -> ServerConnection {
        connector.open(unpooledServerID(), pool: key, loop: loop, driver: driver, listens: true)
    }
}
