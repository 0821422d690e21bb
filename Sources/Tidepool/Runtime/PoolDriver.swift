import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// What connections ask of the pool driver, and tell it: the only way they reach the pools.
/// Client side: a server wanted, given up, given back. Server side: what became of a connection.
protocol PoolDriving: AnyObject, Sendable {
    func requestServer(for client: ClientConnection)
    func clientGaveUp(_ id: ClientID)
    func release(_ server: ServerConnection, reusable: Bool)
    func serverLoggedIn(_ server: ServerConnection)
    func serverConnectFailed(_ server: ServerConnection, error: PostgresError)
    func serverClosed(_ server: ServerConnection)
    func checkFinished(_ server: ServerConnection, ok: Bool)
    /// A message read by a pool's listener connection (`ListenerDriver`).
    func listenerMessage(_ server: ServerConnection, type: UInt8, body: ByteBuffer)
}

/// What the pool driver needs of the pooler.
protocol PoolDriverOwner: AnyObject, Sendable {
    var config: Config { get }
    var logger: Logger { get }
    var metrics: PoolerMetrics { get }
}

/// The pool driver: runs the `PoolStateMachine` and the `ClientRegistry` under one lock, looks
/// up the connections the pools' actions name, and carries them out (lends, connects, closes,
/// checks).
final class PoolDriver: PoolDriving, Sendable {
    struct Shared: Sendable {
        var pools: PoolStateMachine
        /// The live clients and their counts.
        var registry = ClientRegistry<ClientConnection>()
        /// The actions of the pool decision being made (see `decide`).
        var actions: [PoolAction] = []
        var servers: [ServerID: ServerConnection] = [:]
        /// ParameterStatus values a server of each pool reported at login.
        var welcome: [PoolKey: [String: String]] = [:]
        /// What a client of a pool gets at login, by the tracked values it asked for
        /// (`StartupParameters.tracked` order): working it out per login was a fifth of what a
        /// connection cost.
        var welcomes: [PoolKey: [[String?]: ClientSession.Welcome]] = [:]
        /// Once set, pool decisions are no longer carried out.
        var shuttingDown = false
        /// A shutdown signal or SHUTDOWN came: the pooler waits for clients or servers to finish.
        var draining = false
        /// DISABLE: databases that refuse new clients.
        var disabled: Set<String> = []
        /// SUSPEND: set until RESUME.
        var suspended = false
    }

    private let shared: NIOLockedValueBox<Shared>
    /// The pooler, which owns the driver and outlives it.
    private unowned let owner: any PoolDriverOwner
    private let connector: ServerConnector

    init(owner: any PoolDriverOwner, connector: ServerConnector, loopCount: Int) {
        self.owner = owner
        self.connector = connector
        shared = NIOLockedValueBox(Shared(pools: PoolStateMachine(loopCount: loopCount)))
    }

    private var config: Config { owner.config }
    private var logger: Logger { owner.logger }

    func listenerMessage(_ server: ServerConnection, type: UInt8, body: ByteBuffer) {}

    /// The pool settings for a client's (database, user), from the config.
    func poolSettings(database: DatabaseEntry, user: String) -> PoolSettings {
        let config = self.config
        let g = config.global
        var s = PoolSettings(poolSize: config.poolSize(database: database, user: user))
        s.minPoolSize = database.minPoolSize ?? g.minPoolSize
        s.reservePoolSize = config.users[user]?.reservePoolSize ?? database.reservePoolSize ?? g.reservePoolSize
        s.reservePoolTimeout = g.reservePoolTimeout
        s.maxDBConnections = database.maxDBConnections ?? g.maxDBConnections
        s.maxUserConnections = config.users[user]?.maxUserConnections ?? g.maxUserConnections
        s.queryWaitTimeout = config.queryWaitTimeout(database: database, user: user)
        s.queryWaitNotify = g.queryWaitNotify
        s.serverLifetime = database.serverLifetime ?? g.serverLifetime
        s.serverIdleTimeout = g.serverIdleTimeout
        s.serverLoginRetry = g.serverLoginRetry
        s.serverCheckDelay = g.serverCheckDelay
        s.serverCheckEnabled = !g.serverCheckQuery.isEmpty
        s.serverRoundRobin = g.serverRoundRobin
        s.connectFailFast = g.serverConnectFailFast
        s.fastClose = config.fastClose(database: database, user: user)
        s.freeAfter = config.poolFreeAfter(database: database)
        return s
    }

    /// A waiting client cancelled: it leaves the queue without a server.
    func clientGaveUp(_ id: ClientID) {
        shared.withLockedValue { $0.pools.clientGaveUp(id) }
    }

    /// Asks the client's pool (made at its login, `joinPool`) for a server for `client`.
    func requestServer(for client: ClientConnection) {
        let now = NIODeadline.now()
        let loop = client.loopIndex
        let id = client.id!
        let key = client.registration.pool!
        withPoolBuffer { pools, actions in
            if !pools.hasPool(key) {
                // Not reached (a client joins its pool at login); made from the current config if so.
                let entry = config.database(named: key.database) ?? DatabaseEntry(name: key.database)
                actions += makePoolIfNew(key, database: entry, in: &pools, now: now)
            }
            pools.clientWantsServer(id, pool: key, loop: loop, now: now, into: &actions)
        }
    }

    func release(_ server: ServerConnection, reusable: Bool) {
        let now = NIODeadline.now()
        withPoolBuffer { $0.serverReleased(server.id, reusable: reusable, now: now, into: &$1) }
    }

    func welcomeParameters(for key: PoolKey) -> [String: String]? {
        shared.withLockedValue { $0.welcome[key] }
    }

    /// The pool's welcome for a client wanting `values`, made by `make` the first time. At most 64
    /// sets of values are kept per pool (application_name can differ per client).
    func welcome(
        for key: PoolKey, values: [String?], make: () -> ClientSession.Welcome
    ) -> ClientSession.Welcome {
        if let welcome = shared.withLockedValue({ $0.welcomes[key]?[values] }) { return welcome }
        let welcome = make()
        shared.withLockedValue { s in
            if s.welcomes[key, default: [:]].count < 64 { s.welcomes[key, default: [:]][values] = welcome }
        }
        return welcome
    }

    func serverLoggedIn(_ server: ServerConnection) {
        let now = NIODeadline.now()
        withShared { s in
            if s.welcome[server.pool] == nil { s.welcome[server.pool] = server.session.state.parameters }
            return s.pools.serverConnected(server.id, now: now)
        }
    }

    func serverConnectFailed(_ server: ServerConnection, error: PostgresError) {
        logger.warning("server connection to \(server.pool) failed: \(error.message)")
        let now = NIODeadline.now()
        withShared { s in
            s.servers[server.id] = nil
            return s.pools.serverConnectFailed(server.id, error: error, now: now)
        }
    }

    func serverClosed(_ server: ServerConnection) {
        let now = NIODeadline.now()
        withShared { s in
            s.servers[server.id] = nil
            return s.pools.serverClosed(server.id, now: now)
        }
    }

    func checkFinished(_ server: ServerConnection, ok: Bool) {
        let now = NIODeadline.now()
        withShared { s in
            if ok { return s.pools.serverCheckSucceeded(server.id, now: now) }
            s.servers[server.id] = nil
            return s.pools.serverCheckFailed(server.id, now: now)
        }
    }

    /// The janitor's tick: the pools' timeouts, minimums and retries. A pool in use (a client
    /// or a listener) is not freed.
    func timerFired(now: NIODeadline, listening: Set<PoolKey>) {
        withShared { s in
            let clients = s.registry.poolClients
            return s.pools.timerFired(now: now) { clients[$0, default: 0] > 0 || listening.contains($0) }
        }
    }

    /// A pool decision with the connections it names looked up (under the same lock).
    struct Resolved {
        var action: PoolAction
        var client: ClientConnection?
        var server: ServerConnection?
        var lease: UInt64 = 0
    }

    /// Runs a pool event and looks up what its actions name in one lock acquisition, then carries
    /// the actions out outside the lock.
    func withPool(_ event: (inout PoolStateMachine) -> [PoolAction]) {
        withShared { event(&$0.pools) }
    }

    /// `withPool` for events that also update the registries kept beside the pools.
    func withShared(_ event: (inout Shared) -> [PoolAction]) {
        decide { s in s.actions = event(&s) }
    }

    /// `withPool` for the events of every transaction: they append their actions to a buffer
    /// kept beside the pools and reused, so no array is allocated per event.
    func withPoolBuffer(_ event: (inout PoolStateMachine, inout [PoolAction]) -> Void) {
        decide { s in event(&s.pools, &s.actions) }
    }

    /// Runs a pool decision under the lock, looks up the connections its actions name there too,
    /// and carries the actions out after the lock is released.
    private func decide(_ body: (inout Shared) -> Void) {
        let decided = shared.withLockedValue { s -> Decided in
            s.actions.removeAll(keepingCapacity: true)
            body(&s)
            if s.actions.isEmpty || s.shuttingDown { return .nothing }
            // Most events decide one action: it is carried out without an array of its own.
            // Moved out of the buffer rather than copied (the buffer keeps its capacity).
            if s.actions.count == 1 { return .one(Self.resolve(s.actions.removeLast(), in: &s)) }
            let actions = s.actions
            return .many(actions.map { Self.resolve($0, in: &s) })
        }
        // Consumed: the lend's connections are moved to `carryOut`, not copied and released.
        switch consume decided {
        case .nothing: break
        case .one(let item): carryOut(item)
        case .many(let items): for item in items { carryOut(item) }
        }
    }

    /// What a pool decision left to carry out. An enum rather than an optional captured by the
    /// locked closure: that one was destroyed through the generic value witnesses on every event.
    private enum Decided {
        case nothing
        case one(Resolved)
        case many([Resolved])
    }

    /// Looks up the connections an action names; called under the lock.
    static func resolve(_ action: PoolAction, in s: inout Shared) -> Resolved {
        switch action {
        case .lend(let serverID, let clientID):
            let server = s.servers[serverID]
            server?.leasesIssued += 1  // under the lock: lends of a server are numbered in order
            return Resolved(
                action: action, client: s.registry.clients[clientID], server: server, lease: server?.leasesIssued ?? 0)
        case .failClient(let clientID, _), .notifyWaiting(let clientID), .endSession(let clientID):
            return Resolved(action: action, client: s.registry.clients[clientID], server: nil)
        case .check(let serverID, _):
            return Resolved(action: action, client: nil, server: s.servers[serverID])
        case .close(let serverID):
            return Resolved(action: action, client: nil, server: s.servers.removeValue(forKey: serverID))
        case .note(_, .recycledForAge(let serverID)), .note(_, .closedIdle(let serverID)):
            return Resolved(action: action, client: nil, server: s.servers[serverID])
        case .connect, .note:
            return Resolved(action: action, client: nil, server: nil)
        case .poolFreed(let key):
            // What is kept beside the pool goes with it, under the same lock.
            s.welcome[key] = nil
            s.welcomes[key] = nil
            s.registry.poolFreed(key)
            return Resolved(action: action, client: nil, server: nil)
        }
    }

    func carryOut(_ item: Resolved) {
        switch item.action {
        case .lend:
            let client = item.client
            guard let server = item.server else { return }
            guard let client else {
                release(server, reusable: true)
                return
            }
            let lease = item.lease
            let loop = client.eventLoop
            if loop.inEventLoop {
                client.lent(server, lease: lease)
            } else {
                loop.execute { client.lent(server, lease: lease) }
            }
        case .connect(let serverID, let key, let loop):
            // Registered before it connects, so that the pool can lend it once it has logged in.
            connector.open(serverID, pool: key, loop: loop, driver: self, listens: false) { server in
                shared.withLockedValue { $0.servers[serverID] = server }
            }
        case .close:
            item.server?.command(.terminate)
        case .failClient(_, let error):
            let client = item.client
            client?.onLoop { client?.waitFailed(error) }
        case .notifyWaiting:
            let client = item.client
            client?.onLoop { client?.deliver(.waitNotice) }
        case .endSession:
            let client = item.client
            client?.onLoop { client?.deliver(.endAtTransactionEnd) }
        case .poolFreed(let key):
            logger.info("pool \(key): freed, unused for pool_idle_timeout / autodb_idle_timeout")
        case .check(let serverID, _):
            if let server = item.server {
                server.command(.check(config.global.serverCheckQuery))
            } else {
                let now = NIODeadline.now()
                withPool { $0.serverCheckFailed(serverID, now: now) }
            }
        case .note(let key, let event):
            owner.metrics.note(event, pool: key)
            switch event {
            case .reserveOpened(let waited):
                logger.info("pool \(key): \(LogWords.reservePool(waited: waited.secondsText))")
            case .checkFailed:
                logger.warning("pool \(key): server failed server_check_query; checking older idle servers")
            case .recycledForAge(let id):
                if config.global.logDisconnections {
                    logServerClosing(id, item.server, key, because: LogWords.serverLifetimeOver)
                }
            case .closedIdle(let id):
                if config.global.logDisconnections {
                    logServerClosing(id, item.server, key, because: LogWords.serverIdleTimeout)
                }
            case .waitTimedOut:
                logger.debug("pool \(key): a client reached query_wait_timeout")
            case .probe:
                logger.info("pool \(key): trying to connect again")
            }
        }
    }

    /// `S-7: db/user@host:port closing because: server lifetime over (age=3600s)`, as PgBouncer.
    func logServerClosing(_ id: ServerID, _ server: ServerConnection?, _ key: PoolKey, because reason: String) {
        let prefix =
            server?.logPrefix
            ?? LogWords.connection("S", id: "\(id.raw)", database: key.database, user: key.user, address: "?")
        let age = server.map { Int(Date().timeIntervalSince1970 - $0.connectedAtWallClock) } ?? 0
        logger.info("\(prefix) \(LogWords.closing(because: reason, ageSeconds: age))")
    }

    /// Makes the pool `key` with the settings of `database` unless it exists; its actions.
    func makePoolIfNew(
        _ key: PoolKey, database: DatabaseEntry, in pools: inout PoolStateMachine, now: NIODeadline
    ) -> [PoolAction] {
        guard !pools.hasPool(key) else { return [] }
        return pools.configure(key, settings: poolSettings(database: database, user: key.user), now: now)
    }

    // MARK: The client registry

    /// Admits a client that passed the startup packet (`ClientRegistry.admit`).
    func register(
        _ client: ClientConnection, address: String?, _ admission: ClientRegistry<ClientConnection>.Admission
    ) -> Result<ClientID, PostgresError> {
        let now = NIODeadline.now()
        return shared.withLockedValue { $0.registry.admit(client, address: address, admission, now: now) }
    }

    /// Gives a logged-in client a cancel key of its own.
    func issueCancelKey(for client: ClientConnection) -> ClientRegistry<ClientConnection>.CancelKey {
        var g = SystemRandomNumberGenerator()
        let peerID = config.global.peerID
        return shared.withLockedValue { $0.registry.issueCancelKey(for: client, peerID: peerID, random: { g.next() }) }
    }

    /// A client of pool `key` logged in; the pool is made with the settings of `database` if it
    /// does not exist yet (pools are never removed, so the client need not keep the entry).
    func joinPool(_ key: PoolKey, database: DatabaseEntry) {
        let now = NIODeadline.now()
        withShared { s in
            s.registry.joined(key)
            return makePoolIfNew(key, database: database, in: &s.pools, now: now)
        }
    }

    func consoleEntered() {
        shared.withLockedValue { $0.registry.consoleEntered() }
    }

    /// A client of pool `key` started or stopped being pinned; the number of pinned clients when
    /// they now hold all its servers and the once-a-minute warning is due.
    func pinChanged(_ key: PoolKey, pinned: Bool, poolSize: Int?, now: NIODeadline) -> Int? {
        shared.withLockedValue { $0.registry.pinChanged(key, pinned: pinned, poolSize: poolSize, now: now) }
    }

    /// Undoes what a client was counted under (`ClientRegistration`); a client still queued leaves
    /// its pool's queue.
    func remove(_ id: ClientID?, _ r: ClientRegistration) {
        shared.withLockedValue { s in
            if r.inConsole { s.registry.consoleLeft() }
            if s.registry.remove(id, address: r.address, counted: r.counted, pool: r.pool), let id {
                s.pools.clientGaveUp(id)
            }
            if let key = r.cancelKey { s.registry.dropCancelKey(key) }
        }
    }

    func client(cancelKey key: ClientRegistry<ClientConnection>.CancelKey) -> ClientConnection? {
        shared.withLockedValue { $0.registry.client(cancelKey: key) }
    }

    /// The clients among `ids` still connected.
    func clients(_ ids: some Sequence<ClientID>) -> [ClientConnection] {
        shared.withLockedValue { s in ids.compactMap { s.registry.clients[$0] } }
    }

    // MARK: Control and views (admin console, signals, /metrics)

    /// The pools and the registry as SHOW and /metrics read them, taken under one lock.
    struct Views {
        var pools: [PoolSnapshot]
        var poolClients: [PoolKey: Int]
        var pinned: [PoolKey: Int]
        var clientCount: Int
        var consoleClients: Int
        var databaseClients: [String: Int]
        var userClients: [String: Int]
        var serverCount: Int
        var disabled: Set<String>
        var suspended: Bool
        var allPaused: Bool
        /// Of `databases` asked for, the paused ones.
        var pausedDatabases: Set<String>
    }

    func views(now: NIODeadline, databases: some Sequence<String> = []) -> Views {
        shared.withLockedValue { s in
            Views(
                pools: s.pools.snapshot(now: now), poolClients: s.registry.poolClients,
                pinned: s.registry.pinnedClients,
                clientCount: s.registry.count, consoleClients: s.registry.consoleClients,
                databaseClients: s.registry.databaseClients, userClients: s.registry.userClients,
                serverCount: s.servers.count, disabled: s.disabled, suspended: s.suspended,
                allPaused: s.pools.isPaused(database: nil),
                pausedDatabases: Set(databases.filter { s.pools.isPaused(database: $0) }))
        }
    }

    /// PAUSE: no more lends in the pools of `database` (all when nil).
    func pause(database: String?) {
        shared.withLockedValue { $0.pools.pause(database: database) }
    }

    /// SUSPEND: everything paused until RESUME.
    func suspend() {
        shared.withLockedValue {
            $0.suspended = true
            $0.pools.pause(database: nil)
        }
    }

    /// Why RESUME of `database` (all when nil) is refused, if it is (`AdminRules.resumeRefusal`).
    func resumeRefusal(database: String?) -> PostgresError? {
        shared.withLockedValue { s in
            AdminRules.resumeRefusal(
                database: database, paused: s.pools.isPaused(database: database), suspended: s.suspended,
                shuttingDown: s.draining)
        }
    }

    func resume(database: String?) {
        let now = NIODeadline.now()
        withShared { s in
            if database == nil { s.suspended = false }
            return s.pools.resume(database: database, now: now)
        }
    }

    /// DISABLE and ENABLE: whether `database` refuses new clients.
    func setDisabled(_ database: String, _ disabled: Bool) {
        shared.withLockedValue { s in
            if disabled { s.disabled.insert(database) } else { s.disabled.remove(database) }
        }
    }

    func isDisabled(_ database: String) -> Bool {
        shared.withLockedValue { $0.disabled.contains(database) }
    }

    /// Servers lent to clients right now in the pools of `database` (all when nil).
    func lentCount(database: String?) -> Int {
        shared.withLockedValue { $0.pools.lentCount(database: database) }
    }

    /// Servers of `database` (all when nil) to close once released (WAIT_CLOSE).
    func closeNeededCount(database: String?) -> Int {
        shared.withLockedValue { $0.pools.closeNeededCount(database: database) }
    }

    /// The clients holding a server now (SUSPEND's suspend_timeout drops them).
    func clientsHoldingServers() -> [ClientConnection] {
        shared.withLockedValue { s in s.pools.clientsHoldingServers().compactMap { s.registry.clients[$0] } }
    }

    /// The clients of the pools of `database` (all when nil); console sessions are none of them.
    func poolClients(database: String?) -> [ClientConnection] {
        shared.withLockedValue { s in
            s.registry.clients.values.filter { client in
                client.registration.pool.map { database == nil || $0.database == database } ?? false
            }
        }
    }

    func client(_ id: ClientID) -> ClientConnection? {
        shared.withLockedValue { $0.registry.clients[id] }
    }

    /// Every connection.
    func connections() -> (clients: [ClientConnection], servers: [ServerConnection]) {
        shared.withLockedValue { s in (Array(s.registry.clients.values), Array(s.servers.values)) }
    }

    /// Every server, with the ones to close once released (SHOW SERVERS).
    func serversClosing() -> (servers: [ServerConnection], closeNeeded: Set<ServerID>) {
        shared.withLockedValue { s in
            (Array(s.servers.values), Set(s.servers.keys.filter { s.pools.isCloseNeeded($0) }))
        }
    }

    var clientCount: Int { shared.withLockedValue { $0.registry.count } }

    /// The servers open to `host` at one of the addresses `gone`.
    func servers(of host: String, at gone: [String]) -> Set<ServerID> {
        shared.withLockedValue { s in
            Set(
                s.servers.compactMap { id, server -> ServerID? in
                    guard case .tcp(let name, _) = server.address, name == host,
                        let remote = server.remoteIP, gone.contains(remote)
                    else { return nil }
                    return id
                })
        }
    }

    /// A shutdown that waits has begun: RESUME is refused from now on.
    func beginDraining() {
        shared.withLockedValue { $0.draining = true }
    }

    var isDraining: Bool { shared.withLockedValue { $0.draining } }

    /// The pooler stops: no pool decision is carried out from now on.
    func shutDown() {
        shared.withLockedValue { $0.shuttingDown = true }
    }

    // MARK: Servers outside the pools (listeners, replication)

    /// Takes a slot in max_db_connections / max_user_connections for a server of `key` outside
    /// the pool; false when none is left.
    func unpooledServerOpening(_ key: PoolKey) -> Bool {
        var granted = false
        withPoolBuffer { pools, actions in granted = pools.unpooledServerOpening(key, into: &actions) }
        return granted
    }

    /// Gives the slot back.
    func unpooledServerClosed(_ key: PoolKey) {
        shared.withLockedValue { $0.pools.unpooledServerClosed(key) }
    }
}
