import DequeModule
import NIOCore

/// Every pool of the pooler as one value: who waits, who gets which server, when to open and
/// close servers. It performs no I/O and reads no clock: events come in with the time, actions go
/// out, and the driver carries them out.
///
/// Limits that span pools (max_db_connections, max_user_connections) are why all pools live in one
/// state machine.
public struct PoolStateMachine: Sendable {
    struct Waiter: Sendable {
        var client: ClientID
        var loop: Int
        var since: NIODeadline
        /// Times a waiter behind it was served first because it ran on the free server's loop.
        var passedOver = 0
        /// Told it is queued (query_wait_notify).
        var notified = false
    }

    /// How far behind the head of the queue a waiter on the free server's event loop is looked
    /// for, and how often the head may be passed over that way before it is served regardless.
    /// Requests reach the queue in runs from one loop (a turn's worth), so the look-ahead spans
    /// several runs; with 32 places and 4 passes, 8-18 % of lends crossed loops at 200-5,000
    /// clients, with these about 1-2 % (BENCHMARKS.md). Passing the head over 16 times delays it
    /// by 16 transactions at most.
    static let sameLoopLookahead = 256
    static let maxPassedOver = 16

    enum ServerState: Equatable, Sendable {
        case connecting
        case idle(since: NIODeadline)
        case lent(ClientID)
        /// Running the pre-lend check, promised to this client.
        case checking(ClientID)
    }

    struct Server: Sendable {
        var id: ServerID
        /// Where its pool is in the pool table (`key(of:)` gives the pool's key). No key here:
        /// a server is copied out of `servers` on every event, and a key's strings cost
        /// reference counting on each copy.
        var slot: Int
        var loop: Int
        var state: ServerState
        var retireAt: NIODeadline
        var createdAt: NIODeadline
        /// Set when a younger server of the pool failed its check: check this one before use too.
        var suspect = false
        /// RECONNECT: closed instead of reused once it comes back.
        var closeNeeded = false
    }

    struct Pool: Sendable {
        let key: PoolKey
        var settings: PoolSettings
        var waiters: Deque<Waiter> = []
        var waitingCount = 0
        /// Idle servers, most recently used last.
        var idle: [ServerID] = []
        var connecting = 0
        var lent = 0
        /// Set while new connections fail; cleared by the first success.
        var lastConnectFailure: (at: NIODeadline, error: PostgresError)?
        /// A client was turned away while connections failed: try again when the back-off ends.
        var probeWanted = false
        /// PAUSE: no server is lent or opened; clients queue until RESUME.
        var paused = false
        /// Servers (in any state) on each event loop.
        var serversOnLoop: [Int] = []
        /// Since when the pool has had no server, no waiter and (the driver says) no client:
        /// pool_idle_timeout / autodb_idle_timeout free it after `settings.freeAfter`.
        var unusedSince: NIODeadline?
        /// Freed: the slot waits to be reused by another pool.
        var freed = false

        var total: Int { idle.count + connecting + lent }

        init(key: PoolKey, settings: PoolSettings) {
            self.key = key
            self.settings = settings
        }
    }

    /// Pools are found by key once per client request; a server remembers its pool's slot, so the
    /// events on the way back (release, lend to the next waiter) index an array instead of hashing.
    struct PoolTable: Sequence, Sendable {
        var storage: [Pool] = []
        var slots: [PoolKey: Int] = [:]
        /// Slots of freed pools, reused by the next pools made.
        var free: [Int] = []

        func slot(of key: PoolKey) -> Int? { slots[key] }
        func contains(_ key: PoolKey) -> Bool { slots[key] != nil }
        var keys: [PoolKey] { storage.compactMap { $0.freed ? nil : $0.key } }

        /// A slot stays the pool's while it has a server or a waiter: only a pool with neither is
        /// freed (`remove`), so what names a slot never outlives its pool.
        mutating func add(_ pool: Pool) -> Int {
            if let slot = free.popLast() {
                storage[slot] = pool
                slots[pool.key] = slot
                return slot
            }
            storage.append(pool)
            slots[pool.key] = storage.count - 1
            return storage.count - 1
        }

        mutating func remove(_ key: PoolKey) {
            guard let slot = slots.removeValue(forKey: key) else { return }
            storage[slot] = Pool(key: key, settings: storage[slot].settings)  // lets its buffers go
            storage[slot].freed = true
            free.append(slot)
        }

        // `_read`, not `get`: reading one field must not copy the whole pool.
        subscript(key: PoolKey) -> Pool {
            _read { yield storage[slots[key]!] }
            _modify { yield &storage[slots[key]!] }
        }

        subscript(slot slot: Int) -> Pool {
            _read { yield storage[slot] }
            _modify { yield &storage[slot] }
        }

        func makeIterator() -> some IteratorProtocol<(key: PoolKey, value: Pool)> {
            storage.lazy.filter { !$0.freed }.map { (key: $0.key, value: $0) }.makeIterator()
        }
    }

    var pools = PoolTable()
    var servers: [ServerID: Server] = [:]
    /// Each waiting client's pool slot.
    var waitingClients: [ClientID: Int] = [:]
    /// PAUSE without a database, and PAUSE of databases by name (RESUME undoes each).
    var pausedAll = false
    var pausedDatabases: Set<String> = []
    /// SHUTDOWN WAIT_FOR_SERVERS (SIGINT) under way: no client gets a server any more.
    public private(set) var closingForShutdown = false
    var databaseTotals: [String: Int] = [:]
    /// Databases a server has logged in to since start: when one becomes unreachable, clients
    /// wait for it to come back (a restart) instead of failing at once.
    var databasesServed: Set<String> = []
    var userTotals: [String: Int] = [:]
    var nextServerID: UInt64 = 1
    /// The driver's event loops (numbered from 0). New servers of a pool are spread over them.
    let loopCount: Int

    public init(loopCount: Int = 1) {
        self.loopCount = max(loopCount, 1)
    }

    /// The key of the pool a server belongs to.
    func key(of server: Server) -> PoolKey { pools[slot: server.slot].key }

    // MARK: Configuration

    /// Creates the pool or changes its settings (on reload). Returns actions for the new limits.
    public mutating func configure(_ key: PoolKey, settings: PoolSettings, now: NIODeadline) -> [PoolAction] {
        if pools.contains(key) {
            pools[key].settings = settings
        } else {
            var pool = Pool(key: key, settings: settings)
            // A pool made while its database (or everything) is paused starts paused.
            pool.paused = pausedAll || pausedDatabases.contains(key.database)
            _ = pools.add(pool)
        }
        var actions: [PoolAction] = []
        trimIdle(key, now: now, into: &actions)
        grow(key, now: now, into: &actions)
        return actions
    }

    public func hasPool(_ key: PoolKey) -> Bool { pools.contains(key) }

    public var poolKeys: [PoolKey] { pools.keys }

    // MARK: Events

    /// A client needs a server of `pool`. `loop` is the client's event loop: a server on the
    /// same loop is preferred.
    public mutating func clientWantsServer(
        _ client: ClientID, pool key: PoolKey, loop: Int, now: NIODeadline
    ) -> [PoolAction] {
        var actions: [PoolAction] = []
        clientWantsServer(client, pool: key, loop: loop, now: now, into: &actions)
        return actions
    }

    /// `clientWantsServer` appending to the caller's `actions` (a buffer it reuses: no array is
    /// allocated per request).
    public mutating func clientWantsServer(
        _ client: ClientID, pool key: PoolKey, loop: Int, now: NIODeadline, into actions: inout [PoolAction]
    ) {
        guard let slot = pools.slot(of: key) else {
            preconditionFailure("clientWantsServer for unconfigured pool \(key)")
        }
        if !pools[slot: slot].paused, pools[slot: slot].waitingCount == 0,
            let index = pickIdle(
                pools[slot: slot].idle, loop: loop, oldestFirst: pools[slot: slot].settings.serverRoundRobin)
        {
            // Mutate in place, with no copy of the pool alive: a copy would make removing from
            // the idle list copy the whole list on every lend.
            let server = pools[slot: slot].idle.remove(at: index)
            pools[slot: slot].lent += 1
            lendIdle(server, to: client, now: now, into: &actions)
            return
        }
        // Every pool is paused while shutting down, so only this slower path needs to look.
        if closingForShutdown {
            actions.append(.failClient(client, .shuttingDown))
            return
        }
        // Fast failure: while connecting keeps failing and no server is left, do not queue, unless
        // the database served before and is only restarting; while the server refuses the login
        // (a changed password), not even when servers logged in earlier are busy.
        if let failure = pools[slot: slot].lastConnectFailure,
            pools[slot: slot].total == 0 || !Self.isTransient(failure.error), !ridesOut(key, failure.error),
            now < failure.at + retryDelay(key)
        {
            pools[key].probeWanted = true
            actions.append(.failClient(client, .connectFailed(failure.error)))
            return
        }
        pools[slot: slot].waiters.append(Waiter(client: client, loop: loop, since: now))
        pools[slot: slot].waitingCount += 1
        waitingClients[client] = slot
        grow(key, now: now, into: &actions)
    }

    /// A waiting client disconnected or cancelled; it leaves the queue without taking a server.
    public mutating func clientGaveUp(_ client: ClientID) {
        guard let slot = waitingClients.removeValue(forKey: client) else { return }
        pools[slot: slot].waitingCount -= 1
        pools[slot: slot].waiters.removeAll { $0.client == client }
    }

    /// A new server connection logged in and is ready.
    public mutating func serverConnected(_ id: ServerID, now: NIODeadline) -> [PoolAction] {
        guard let server = servers[id], server.state == .connecting else { return [] }
        let key = key(of: server)
        pools[slot: server.slot].connecting -= 1
        pools[slot: server.slot].lastConnectFailure = nil
        pools[slot: server.slot].probeWanted = false
        databasesServed.insert(key.database)
        var actions: [PoolAction] = []
        makeAvailable(id, now: now, into: &actions)
        // After an outage only one connection was being tried: open the rest for the queue.
        grow(key, now: now, into: &actions)
        return actions
    }

    /// A new server connection could not be opened or logged in.
    public mutating func serverConnectFailed(
        _ id: ServerID, error: PostgresError, now: NIODeadline
    ) -> [PoolAction] {
        guard let server = servers[id], server.state == .connecting else { return [] }
        let key = key(of: server)
        remove(id)
        pools[key].lastConnectFailure = (now, error)
        var actions: [PoolAction] = []
        if (pools[key].total == 0 && !ridesOut(key, error)) || !Self.isTransient(error) {
            // Nothing will free up for the queue, or the server refuses the login (its password
            // changed): tell the waiters now rather than at their timeout. A database that served
            // before and is now unreachable or restarting is waited for.
            failAllWaiters(key, error: .connectFailed(error), into: &actions)
        }
        return actions
    }

    /// The client is done with the server. `reusable` is false when the server is not clean
    /// (open transaction, broken protocol state) and must be closed.
    public mutating func serverReleased(_ id: ServerID, reusable: Bool, now: NIODeadline) -> [PoolAction] {
        var actions: [PoolAction] = []
        serverReleased(id, reusable: reusable, now: now, into: &actions)
        return actions
    }

    /// `serverReleased` appending to the caller's `actions`.
    public mutating func serverReleased(
        _ id: ServerID, reusable: Bool, now: NIODeadline, into actions: inout [PoolAction]
    ) {
        guard let server = servers[id], case .lent = server.state else { return }
        if !reusable || server.closeNeeded || now >= server.retireAt || isOverSize(slot: server.slot)
            || closingForShutdown
        {
            let key = key(of: server)
            remove(id)
            // The note first: the driver still knows the server then, for its log line.
            if reusable && now >= server.retireAt { actions.append(.note(key, .recycledForAge(id))) }
            actions.append(.close(id))
            grow(key, now: now, into: &actions)
        } else {
            pools[slot: server.slot].lent -= 1
            makeAvailable(id, now: now, into: &actions)
        }
    }

    /// A server connection closed or failed on its own (idle or lent).
    public mutating func serverClosed(_ id: ServerID, now: NIODeadline) -> [PoolAction] {
        guard let server = servers[id] else { return [] }
        if case .checking = server.state { return serverCheckFailed(id, now: now) }
        remove(id)
        var actions: [PoolAction] = []
        grow(key(of: server), now: now, into: &actions)
        return actions
    }

    /// The pre-lend check passed: the server goes to the client it was meant for.
    public mutating func serverCheckSucceeded(_ id: ServerID, now: NIODeadline) -> [PoolAction] {
        guard let server = servers[id], case .checking(let client) = server.state else { return [] }
        servers[id]!.state = .lent(client)
        servers[id]!.suspect = false
        return [.lend(id, to: client)]
    }

    /// The pre-lend check failed: the server is closed, every idle server of the pool older than it
    /// is checked before use too (the database probably restarted), and the client is served next.
    public mutating func serverCheckFailed(_ id: ServerID, now: NIODeadline) -> [PoolAction] {
        guard let server = servers[id], case .checking(let client) = server.state else { return [] }
        let key = key(of: server)
        remove(id)
        var actions: [PoolAction] = [.close(id), .note(key, .checkFailed)]
        for other in pools[key].idle where servers[other]!.createdAt <= server.createdAt {
            servers[other]!.suspect = true
        }
        // The client goes back to the head of the queue, keeping its place.
        if !pools[key].idle.isEmpty, pools[key].waitingCount == 0 {
            let index = pickIdle(pools[key].idle, loop: server.loop, oldestFirst: pools[key].settings.serverRoundRobin)!
            let next = pools[key].idle.remove(at: index)
            pools[key].lent += 1
            lendIdle(next, to: client, now: now, into: &actions)
        } else {
            pools[key].waiters.prepend(Waiter(client: client, loop: server.loop, since: now))
            pools[key].waitingCount += 1
            waitingClients[client] = server.slot
            grow(key, now: now, into: &actions)
        }
        return actions
    }

    /// PAUSE: the pools of `database` (all pools when nil) stop lending and opening servers;
    /// clients queue. Servers already lent stay with their clients until released.
    public mutating func pause(database: String?) {
        if let database { pausedDatabases.insert(database) } else { pausedAll = true }
        for key in pools.keys where database == nil || key.database == database {
            pools[key].paused = true
        }
    }

    /// SHUTDOWN WAIT_FOR_SERVERS (SIGINT), as PgBouncer: a client inside a transaction keeps its
    /// server until the transaction ends; every other client that wants a server (those queued now
    /// included) is closed with "server shutting down"; idle servers close now, lent ones when
    /// they come back. The pooler exits once no server is lent.
    public mutating func closeForShutdown() -> [PoolAction] {
        closingForShutdown = true
        pausedAll = true
        var actions: [PoolAction] = []
        for key in pools.keys {
            pools[key].paused = true
            failAllWaiters(key, error: .shuttingDown, into: &actions)
            while let id = pools[key].idle.popLast() {
                remove(id)
                actions.append(.close(id))
            }
        }
        return actions
    }

    /// RESUME: paused pools serve their queues again (a pool stays paused while its database is
    /// paused by name, or everything is).
    public mutating func resume(database: String?, now: NIODeadline) -> [PoolAction] {
        guard !closingForShutdown else { return [] }
        if let database { pausedDatabases.remove(database) } else { pausedAll = false }
        var actions: [PoolAction] = []
        for key in pools.keys
        where (database == nil || key.database == database) && pools[key].paused && !pausedAll
            && !pausedDatabases.contains(key.database)
        {
            pools[key].paused = false
            while pools[key].waitingCount > 0,
                let index = pickIdle(pools[key].idle, loop: 0, oldestFirst: pools[key].settings.serverRoundRobin)
            {
                let id = pools[key].idle.remove(at: index)
                makeAvailable(id, now: now, into: &actions)
            }
            grow(key, now: now, into: &actions)
        }
        return actions
    }

    /// RECONNECT: every server of `database` (all when nil) is replaced: idle ones are closed now,
    /// the others when they come back.
    public mutating func reconnect(database: String?, now: NIODeadline) -> [PoolAction] {
        let included = { (key: PoolKey) in database == nil || key.database == database }
        return reconnect(now: now, servers: { included($1) }, pools: included)
    }

    /// RECONNECT for some servers only: those open to an address their host name no longer has.
    public mutating func reconnect(servers ids: Set<ServerID>, now: NIODeadline) -> [PoolAction] {
        let keys = Set(ids.compactMap { servers[$0].map(key(of:)) })
        return reconnect(now: now, servers: { id, _ in ids.contains(id) }, pools: keys.contains)
    }

    /// Closes the idle servers `servers` takes in and marks the others to close when they come
    /// back, then lets the pools `pools` takes in open new ones.
    mutating func reconnect(
        now: NIODeadline, servers included: (ServerID, PoolKey) -> Bool, pools grown: (PoolKey) -> Bool
    ) -> [PoolAction] {
        var actions: [PoolAction] = []
        for (id, server) in servers where included(id, key(of: server)) {
            if case .idle = server.state {
                remove(id)
                actions.append(.close(id))
            } else {
                servers[id]!.closeNeeded = true
                if case .lent(let client) = server.state, pools[slot: server.slot].settings.fastClose {
                    actions.append(.endSession(client))
                }
            }
        }
        for key in pools.keys where grown(key) {
            grow(key, now: now, into: &actions)
        }
        return actions
    }

    /// Servers of `database` (all when nil) still open that RECONNECT asked to close: WAIT_CLOSE
    /// returns at zero.
    public func closeNeededCount(database: String?) -> Int {
        servers.values.filter { $0.closeNeeded && (database == nil || key(of: $0).database == database) }.count
    }

    /// Whether a server is to be closed once it comes back (SHOW SERVERS close_needed).
    public func isCloseNeeded(_ id: ServerID) -> Bool { servers[id]?.closeNeeded ?? false }

    /// Whether `database` is paused by name (PAUSE db), or, when nil, everything is (PAUSE).
    public func isPaused(database: String?) -> Bool {
        guard let database else { return pausedAll }
        return pausedDatabases.contains(database)
    }

    /// Servers lent right now in the pools of `database` (all when nil): PAUSE is complete at zero.
    public func lentCount(database: String?) -> Int {
        pools.reduce(0) { sum, entry in
            sum + (database == nil || entry.key.database == database ? entry.value.lent : 0)
        }
    }

    /// The clients holding a server now: what SUSPEND drops once suspend_timeout has passed.
    public func clientsHoldingServers() -> [ClientID] {
        servers.values.compactMap { server in
            if case .lent(let client) = server.state { client } else { nil }
        }
    }

    /// Periodic work: wait timeouts, the reserve pool, idle and age limits, min_pool_size.
    public mutating func timerFired(now: NIODeadline, hasClients: (PoolKey) -> Bool = { _ in true }) -> [PoolAction] {
        var actions: [PoolAction] = []
        for key in pools.keys {
            expireWaiters(key, now: now, into: &actions)
            notifyWaiters(key, now: now, into: &actions)
            trimIdle(key, now: now, into: &actions)
            grow(key, now: now, into: &actions)
            probe(key, now: now, into: &actions)
            freeIfUnused(key, now: now, hasClients: hasClients, into: &actions)
        }
        return actions
    }

    /// pool_idle_timeout and autodb_idle_timeout, as PgBouncer: a pool that has had no client, no
    /// waiter and no server for `freeAfter` is freed; the next client of its key makes it anew.
    mutating func freeIfUnused(
        _ key: PoolKey, now: NIODeadline, hasClients: (PoolKey) -> Bool, into actions: inout [PoolAction]
    ) {
        let pool = pools[key]
        guard pool.settings.freeAfter > .zero else { return }
        guard pool.total == 0, pool.waitingCount == 0, !hasClients(key) else {
            if pool.unusedSince != nil { pools[key].unusedSince = nil }
            return
        }
        guard let since = pool.unusedSince else {
            pools[key].unusedSince = now
            return
        }
        guard now - since >= pool.settings.freeAfter else { return }
        pools.remove(key)
        actions.append(.poolFreed(key))
    }

    // MARK: Queries

    public func snapshot(now: NIODeadline) -> [PoolSnapshot] {
        pools.map { key, pool in
            let slot = pools.slot(of: key)!
            let oldest = pool.waiters.first { waitingClients[$0.client] == slot }
            var snapshot = PoolSnapshot(
                key: key, waiting: pool.waitingCount, lent: pool.lent, idle: pool.idle.count,
                connecting: pool.connecting, maxWait: oldest.map { now - $0.since } ?? .zero,
                settings: pool.settings)
            snapshot.checking =
                servers.values.filter {
                    if case .checking = $0.state { return $0.slot == slot }
                    return false
                }.count
            return snapshot
        }
    }

    public func isWaiting(_ client: ClientID) -> Bool { waitingClients[client] != nil }

    // MARK: Internals

    /// Lends an idle server already taken off the idle list, checking it first when it sat unused
    /// for server_check_delay or is suspect.
    mutating func lendIdle(_ id: ServerID, to client: ClientID, now: NIODeadline, into actions: inout [PoolAction]) {
        let server = servers[id]!
        let settings = pools[slot: server.slot].settings
        var needsCheck = server.suspect
        if case .idle(let since) = server.state, now - since >= settings.serverCheckDelay { needsCheck = true }
        if settings.serverCheckEnabled && needsCheck {
            servers[id]!.state = .checking(client)
            actions.append(.check(id, for: client))
        } else {
            servers[id]!.state = .lent(client)
            actions.append(.lend(id, to: client))
        }
    }

    /// Whether a failure is transient: the server is unreachable, shutting down or starting up
    /// (57P03), as during a restart; a refused login is not.
    static func isTransient(_ error: PostgresError) -> Bool {
        error.code == SQLState.connectionFailure || error.code == SQLState.cannotConnectNow
    }

    /// Whether clients wait through this failure instead of failing at once: the failure is
    /// transient (PostgreSQL unreachable, starting or restarting), and either the database served
    /// before or server_connect_fail_fast is off (a pooler started before its database serves the
    /// first clients once it is up). They wait up to query_wait_timeout.
    func ridesOut(_ key: PoolKey, _ error: PostgresError) -> Bool {
        Self.isTransient(error) && (databasesServed.contains(key.database) || !pools[key].settings.connectFailFast)
    }

    /// How long new connections are held back after one failed: a database clients wait for is
    /// tried every 250 ms (so the pool serves within a second of it being back), one that fails
    /// them fast every second, and a server that refused the login only after
    /// server_login_retry, so as not to flood its log.
    func retryDelay(_ key: PoolKey) -> TimeAmount {
        let pool = pools[key]
        guard let failure = pool.lastConnectFailure else { return .zero }
        guard Self.isTransient(failure.error) else { return pool.settings.serverLoginRetry }
        let delay: TimeAmount = ridesOut(key, failure.error) ? .milliseconds(250) : .seconds(1)
        return min(pool.settings.serverLoginRetry, delay)
    }

    /// After the back-off, one connection attempt for the clients turned away in the meantime.
    mutating func probe(_ key: PoolKey, now: NIODeadline, into actions: inout [PoolAction]) {
        let pool = pools[key]
        guard pool.probeWanted, pool.total == 0, let failure = pool.lastConnectFailure,
            now >= failure.at + retryDelay(key)
        else { return }
        pools[key].probeWanted = false
        open(key, loop: 0, now: now, into: &actions)
        actions.append(.note(key, .probe))
    }

    /// The idle server to lend next: the one released last (its connection is warm, and the
    /// others can reach server_idle_timeout), or with server_round_robin the one released first;
    /// one on the borrower's event loop if there is one.
    func pickIdle(_ idle: [ServerID], loop: Int, oldestFirst: Bool) -> Int? {
        guard !idle.isEmpty else { return nil }
        if oldestFirst {
            return idle.firstIndex { servers[$0]!.loop == loop } ?? 0
        }
        var i = idle.count - 1
        while i >= 0 {
            if servers[idle[i]]!.loop == loop { return i }
            i -= 1
        }
        return idle.count - 1
    }

    /// Gives a free server to the first waiter, or parks it as idle. When the head of the queue
    /// runs on another event loop than the server, the first waiter within `sameLoopLookahead`
    /// places behind it that runs on the server's loop goes first, unless the head was passed over
    /// `maxPassedOver` times already: the transaction then stays on one thread (no hand-over
    /// between loops for each of its messages), and the queue stays first come, first served per
    /// loop, with a bounded delay for the head.
    mutating func makeAvailable(_ id: ServerID, now: NIODeadline, into actions: inout [PoolAction]) {
        let slot = servers[id]!.slot
        guard !pools[slot: slot].paused, pools[slot: slot].waitingCount > 0 else {
            servers[id]!.state = .idle(since: now)
            pools[slot: slot].idle.append(id)
            return
        }
        // Entries of clients that left the queue some other way are dropped here.
        while let head = pools[slot: slot].waiters.first, waitingClients[head.client] != slot {
            pools[slot: slot].waiters.removeFirst()
        }
        var pick = 0
        let loop = servers[id]!.loop
        if pools[slot: slot].waiters[0].loop != loop,
            pools[slot: slot].waiters[0].passedOver < Self.maxPassedOver
        {
            let end = min(pools[slot: slot].waiters.count, Self.sameLoopLookahead + 1)
            var index = 1
            while index < end {
                let candidate = pools[slot: slot].waiters[index]
                if candidate.loop == loop, waitingClients[candidate.client] == slot {
                    pick = index
                    pools[slot: slot].waiters[0].passedOver += 1
                    break
                }
                index += 1
            }
        }
        let waiter = pools[slot: slot].waiters.remove(at: pick)
        waitingClients[waiter.client] = nil
        pools[slot: slot].waitingCount -= 1
        pools[slot: slot].lent += 1
        servers[id]!.state = .lent(waiter.client)
        actions.append(.lend(id, to: waiter.client))
    }

    func isOverSize(slot: Int) -> Bool {
        pools[slot: slot].waitingCount == 0 && pools[slot: slot].total > pools[slot: slot].settings.poolSize
    }

    /// Opens servers while clients wait for more than are being opened, within the limits.
    mutating func grow(_ key: PoolKey, now: NIODeadline, into actions: inout [PoolAction]) {
        // No copy of the pool here: this runs on every request that has to wait.
        guard let slot = pools.slot(of: key), !pools[slot: slot].paused else { return }
        var wanted = max(
            pools[slot: slot].waitingCount - pools[slot: slot].connecting,
            pools[slot: slot].settings.minPoolSize - pools[slot: slot].total)
        guard wanted > 0 else { return }
        if let failure = pools[slot: slot].lastConnectFailure {
            // Back off after a failed connection, then try one at a time until one succeeds.
            guard now >= failure.at + retryDelay(key), pools[slot: slot].connecting == 0 else { return }
            wanted = min(wanted, 1)
        }
        while wanted > 0 {
            let total = pools[slot: slot].total
            let settings = pools[slot: slot].settings
            guard total < settings.poolSize + settings.reservePoolSize else { return }
            var limit = settings.poolSize
            var waited = TimeAmount.zero
            if let head = pools[slot: slot].waiters.first(where: { waitingClients[$0.client] == slot }) {
                waited = now - head.since
                if waited >= settings.reservePoolTimeout { limit += settings.reservePoolSize }
            }
            guard total < limit else { return }
            guard makeRoom(for: key, into: &actions) else { return }
            let loop = pools[slot: slot].waiters.last(where: { waitingClients[$0.client] == slot })?.loop ?? 0
            open(key, loop: loop, now: now, into: &actions)
            if total >= settings.poolSize { actions.append(.note(key, .reserveOpened(waited: waited))) }
            wanted -= 1
        }
    }

    /// Checks max_db_connections and max_user_connections; closes an idle server of another pool of
    /// the same database or user when that makes room. Returns false if there is no room.
    mutating func makeRoom(for key: PoolKey, into actions: inout [PoolAction]) -> Bool {
        let settings = pools[key].settings
        func full() -> (db: Bool, user: Bool) {
            (
                settings.maxDBConnections > 0 && databaseTotals[key.database, default: 0] >= settings.maxDBConnections,
                settings.maxUserConnections > 0 && userTotals[key.user, default: 0] >= settings.maxUserConnections
            )
        }
        var state = full()
        while state.db || state.user {
            let victim = pools.first { other, pool in
                other != key && !pool.idle.isEmpty
                    && ((state.db && other.database == key.database) || (state.user && other.user == key.user))
            }
            guard let (victimKey, _) = victim else { return false }
            let id = pools[victimKey].idle.first!
            remove(id)
            actions.append(.close(id))
            state = full()
        }
        return true
    }

    /// A server connection outside the pool is to be opened (a pool's listener, a replication
    /// connection's own server): it is outside pool_size but counts against max_db_connections
    /// and max_user_connections, and may close an idle server of another pool to make room. False
    /// when there is no room.
    public mutating func unpooledServerOpening(_ key: PoolKey, into actions: inout [PoolAction]) -> Bool {
        guard pools.contains(key), makeRoom(for: key, into: &actions) else { return false }
        databaseTotals[key.database, default: 0] += 1
        userTotals[key.user, default: 0] += 1
        return true
    }

    /// A connection opened with `unpooledServerOpening` closed (or never opened).
    public mutating func unpooledServerClosed(_ key: PoolKey) {
        databaseTotals[key.database, default: 1] -= 1
        userTotals[key.user, default: 1] -= 1
    }

    /// Opens a server for the pool. It goes on the event loop `wanted` (the loop of the client it
    /// is opened for) unless another loop has fewer of the pool's servers: clients spread evenly
    /// over the loops, and a request that finds a server on its own loop keeps its transaction on
    /// one thread. (Without this, a burst of requests handled by one loop put the whole pool on it
    /// and half the transactions crossed between threads.)
    mutating func open(_ key: PoolKey, loop wanted: Int, now: NIODeadline, into actions: inout [PoolAction]) {
        let slot = pools.slot(of: key)!
        let needed = max(loopCount, wanted + 1)
        if pools[slot: slot].serversOnLoop.count < needed {
            pools[slot: slot].serversOnLoop += Array(
                repeating: 0, count: needed - pools[slot: slot].serversOnLoop.count)
        }
        var loop = wanted
        for candidate in 0..<loopCount
        where pools[slot: slot].serversOnLoop[candidate] < pools[slot: slot].serversOnLoop[loop] {
            loop = candidate
        }
        pools[slot: slot].serversOnLoop[loop] += 1
        let id = ServerID(nextServerID)
        nextServerID += 1
        let settings = pools[key].settings
        let lifetime = settings.serverLifetime
        // server_lifetime = 0, as PgBouncer: each server serves one lend, then is closed.
        var retireAt = lifetime == .zero ? now : NIODeadline.distantFuture
        if lifetime > .zero {
            // Spread the deadlines over the last tenth of the lifetime so that servers opened
            // together are not closed together.
            let spread = max(lifetime.nanoseconds / 10, 1)
            let jitter = Int64(truncatingIfNeeded: (id.raw &* 0x9E37_79B9_7F4A_7C15) >> 1) % spread
            retireAt = now + lifetime - .nanoseconds(jitter)
        }
        servers[id] = Server(
            id: id, slot: slot, loop: loop, state: .connecting, retireAt: retireAt,
            createdAt: now)
        pools[key].connecting += 1
        databaseTotals[key.database, default: 0] += 1
        userTotals[key.user, default: 0] += 1
        actions.append(.connect(id, key, loop: loop))
    }

    /// Forgets a server, whatever its state, and takes it out of its pool's counts.
    mutating func remove(_ id: ServerID) {
        guard let server = servers.removeValue(forKey: id) else { return }
        switch server.state {
        case .connecting: pools[slot: server.slot].connecting -= 1
        case .lent, .checking: pools[slot: server.slot].lent -= 1
        case .idle: pools[slot: server.slot].idle.removeAll { $0 == id }
        }
        pools[slot: server.slot].serversOnLoop[server.loop] -= 1
        let key = key(of: server)
        databaseTotals[key.database, default: 1] -= 1
        userTotals[key.user, default: 1] -= 1
    }

    mutating func failAllWaiters(_ key: PoolKey, error: PoolError, into actions: inout [PoolAction]) {
        let slot = pools.slot(of: key)!
        while let waiter = pools[key].waiters.popFirst() {
            guard waitingClients[waiter.client] == slot else { continue }
            waitingClients[waiter.client] = nil
            pools[key].waitingCount -= 1
            actions.append(.failClient(waiter.client, error))
        }
    }

    mutating func expireWaiters(_ key: PoolKey, now: NIODeadline, into actions: inout [PoolAction]) {
        let timeout = pools[key].settings.queryWaitTimeout
        guard timeout > .zero else { return }
        let slot = pools.slot(of: key)!
        while let waiter = pools[key].waiters.first {
            guard waitingClients[waiter.client] == slot else {
                pools[key].waiters.removeFirst()
                continue
            }
            let waited = now - waiter.since
            guard waited >= timeout else { break }
            pools[key].waiters.removeFirst()
            waitingClients[waiter.client] = nil
            pools[key].waitingCount -= 1
            // Waiting through an outage that did not end: say why there was no server.
            let failure = pools[key].lastConnectFailure
            actions.append(
                .failClient(waiter.client, failure.map { .connectFailed($0.error) } ?? .waitTimeout(waited: waited)))
            actions.append(.note(key, .waitTimedOut))
        }
    }

    /// Waiters queued for query_wait_notify are told so, once each. The queue is in arrival order,
    /// so the look stops at the first that has not waited that long.
    mutating func notifyWaiters(_ key: PoolKey, now: NIODeadline, into actions: inout [PoolAction]) {
        let after = pools[key].settings.queryWaitNotify
        guard after > .zero else { return }
        let slot = pools.slot(of: key)!
        for index in pools[key].waiters.indices {
            let waiter = pools[key].waiters[index]
            guard now - waiter.since >= after else { break }
            guard !waiter.notified, waitingClients[waiter.client] == slot else { continue }
            pools[key].waiters[index].notified = true
            actions.append(.notifyWaiting(waiter.client))
        }
    }

    /// Closes idle servers past their lifetime or idle timeout (down to min_pool_size), and reserve
    /// servers no longer needed.
    mutating func trimIdle(_ key: PoolKey, now: NIODeadline, into actions: inout [PoolAction]) {
        let settings = pools[key].settings
        var index = 0
        while index < pools[key].idle.count {
            let id = pools[key].idle[index]
            let server = servers[id]!
            guard case .idle(let since) = server.state else {
                index += 1
                continue
            }
            let pool = pools[key]
            // With server_lifetime = 0 an idle server has not served yet: it waits for its one lend.
            let expired = now >= server.retireAt && settings.serverLifetime > .zero
            let idleTooLong =
                settings.serverIdleTimeout > .zero && now - since >= settings.serverIdleTimeout
                && pool.total > settings.minPoolSize
            let surplus = pool.waitingCount == 0 && pool.total > settings.poolSize
            if expired || idleTooLong || surplus {
                remove(id)  // takes it off the idle list, so `index` now names the next one
                if expired {
                    actions.append(.note(key, .recycledForAge(id)))
                } else if idleTooLong {
                    actions.append(.note(key, .closedIdle(id)))
                }
                actions.append(.close(id))
            } else {
                index += 1
            }
        }
    }
}
