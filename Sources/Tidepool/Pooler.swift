import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// The running pooler: listeners, the shared pool state machine, and the registry of live
/// connections. Decisions are made by `PoolStateMachine`; this class only carries out its actions.
public final class Pooler: @unchecked Sendable {
    /// The configuration and auth file in force; RELOAD swaps them.
    struct Settings {
        /// Boxed, so that a reader takes a reference out of the lock instead of a copy of the
        /// whole configuration (a login read it seven times: ~14,000 instructions of copying).
        var configBox: ConfigBox
        var userlist: [String: PasswordSecret]

        init(config: Config, userlist: [String: PasswordSecret]) {
            configBox = ConfigBox(value: config)
            self.userlist = userlist
        }
    }

    final class ConfigBox: Sendable {
        let value: Config
        init(value: Config) { self.value = value }
    }

    let settings: NIOLockedValueBox<Settings>
    /// Reads the configuration and the auth file again (for RELOAD and SIGHUP).
    let reloader: (@Sendable () throws -> (Config, [String: PasswordSecret]))?
    /// The configuration in force, lent to the reader (`pooler.config.global.x` copies nothing).
    public var config: Config {
        _read { yield settings.withLockedValue { $0.configBox }.value }
    }
    var userlist: [String: PasswordSecret] { settings.withLockedValue { $0.userlist } }
    public let logger: Logger
    let group: MultiThreadedEventLoopGroup
    let loops: [EventLoop]
    let shared: NIOLockedValueBox<Shared>
    /// HBA rules and TLS contexts; loaded by start() and RELOAD.
    let securityBox = NIOLockedValueBox(Security())
    var security: Security { securityBox.withLockedValue { $0 } }
    /// Secrets found by auth_query, and what a client's login taught about logging in to servers
    /// as that user (SCRAM keys recovered from the client's proof, or its cleartext password).
    let credentials = NIOLockedValueBox(Credentials())

    struct Credentials {
        var authQuery = AuthQueryCache(ttl: .seconds(10))
        var serverSecrets: [String: ServerLoginStateMachine.Secret] = [:]
    }
    /// Pooler-wide names of prepared statements some server has accepted: a client preparing one of
    /// these with Parse+Sync is answered without borrowing a server.
    let knownStatements = NIOLockedValueBox(Set<String>())

    func isKnownStatement(_ name: String) -> Bool {
        knownStatements.withLockedValue { $0.contains(name) }
    }

    func statementsAccepted(_ names: [String]) {
        knownStatements.withLockedValue { known in
            if known.count < 100_000 { known.formUnion(names) }
        }
    }
    var listeners: [Channel] = []
    /// The HTTP listener for /metrics and /health (stats_listen_port).
    var statsListener: Channel?
    let metrics: PoolerMetrics
    var janitor: RepeatedTask?
    var sweepers: [RepeatedTask] = []
    /// The logged-in clients of each event loop, touched only on that loop.
    let loopClients: [LoopClients]

    final class LoopClients: @unchecked Sendable {
        /// Clients with a client-side timeout on.
        var clients: [ObjectIdentifier: ClientConnection] = [:]
        /// Clients not logged in yet, with the moment client_login_timeout closes them.
        var loggingIn: [ObjectIdentifier: (client: ClientConnection, deadline: NIODeadline)] = [:]
    }

    /// SHOW LATENCY's histograms of each event loop, touched only on that loop.
    let loopLatency: [LoopLatency]
    let loopFlushers: [TurnFlusher]

    /// Flushes gathered over one turn of an event loop and done at its end, servers first (their
    /// queries start the work), then clients. A turn handles every socket that became ready at
    /// once, so the answers it forwards leave in one burst: a client program that waits on many
    /// sockets (pgbench, an application server's pool) then wakes once per burst instead of once
    /// per answer, which at 1,000 clients cut pgbench's own CPU per transaction by about a third.
    /// Only the loop's own thread touches it.
    final class TurnFlusher: @unchecked Sendable {
        let loop: EventLoop
        private var clients: [ClientConnection] = []
        private var servers: [ServerConnection] = []
        private var scheduled = false

        /// Made once: scheduling it then allocates nothing.
        private var runTask: (@Sendable () -> Void)?

        init(loop: EventLoop) {
            self.loop = loop
            runTask = { [unowned(unsafe) self] in self.run() }
        }

        /// Flushes `client` at the end of this turn (once, however often it asks).
        func add(_ client: ClientConnection) { queue(client, in: &clients) }

        /// Flushes `server` at the end of this turn (once, however often it asks).
        func add(_ server: ServerConnection) { queue(server, in: &servers) }

        private func queue<Connection: TurnFlushed>(_ connection: Connection, in list: inout [Connection]) {
            guard !connection.flushQueued else { return }
            connection.flushQueued = true
            list.append(connection)
            guard !scheduled else { return }
            scheduled = true
            // Tasks run after the turn's I/O events.
            loop.execute(runTask!)
        }

        private func run() {
            scheduled = false
            Self.flush(&servers)
            Self.flush(&clients)
        }

        private static func flush<Connection: TurnFlushed>(_ list: inout [Connection]) {
            var index = 0
            while index < list.count {
                list[index].flushQueued = false
                list[index].flushNow()
                index += 1
            }
            list.removeAll(keepingCapacity: true)
        }
    }

    final class LoopLatency: @unchecked Sendable {
        var recorders: [String: LatencyRecorder] = [:]

        func recorder(for database: String) -> LatencyRecorder {
            if let r = recorders[database] { return r }
            let r = LatencyRecorder()
            recorders[database] = r
            return r
        }

        var book: LatencyBook { LatencyBook(recorders) }
    }

    struct CancelKey: Hashable {
        var processID: Int32
        var secretKey: Int32
    }

    struct Shared {
        var pools: PoolStateMachine
        /// The actions of the pool decision being made (see `decide`).
        var actions: [PoolAction] = []
        var clients: [ClientID: ClientConnection] = [:]
        var servers: [ServerID: ServerConnection] = [:]
        var cancelKeys: [CancelKey: ClientConnection] = [:]
        /// ParameterStatus values a server of each pool reported at login.
        var welcome: [PoolKey: [String: String]] = [:]
        /// What a client of a pool gets at login, by the tracked values it asked for
        /// (`StartupParameters.tracked` order): working it out per login was a fifth of what a
        /// connection cost.
        var welcomes: [PoolKey: [[String?]: Welcome]] = [:]
        var nextClientID: UInt64 = 1
        var clientCount = 0
        /// Once set, pool decisions are no longer carried out.
        var shuttingDown = false
        /// Logged-in clients per pool, for SHOW POOLS.
        var poolClients: [PoolKey: Int] = [:]
        /// DISABLE: databases that refuse new clients.
        var disabled: Set<String> = []
        /// max_client_conn_per_ip and client_connect_rate_per_ip.
        var addresses = ClientAddressLimiter()
        /// SUSPEND: set until RESUME.
        var suspended = false
    }

    public init(
        config: Config, userlist: [String: PasswordSecret], logger: Logger, threads: Int? = nil,
        reloader: (@Sendable () throws -> (Config, [String: PasswordSecret]))? = nil
    ) {
        self.settings = NIOLockedValueBox(Settings(config: config, userlist: userlist))
        self.reloader = reloader
        self.logger = logger
        let count = threads ?? (config.global.threads > 0 ? config.global.threads : System.coreCount)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: count)
        self.loops = Array(group.makeIterator())
        self.shared = NIOLockedValueBox(Shared(pools: PoolStateMachine(loopCount: loops.count)))
        self.loopClients = loops.map { _ in LoopClients() }
        self.loopLatency = loops.map { _ in LoopLatency() }
        self.loopFlushers = loops.map { TurnFlusher(loop: $0) }
        let configured = config.global.instanceID
        self.metrics = PoolerMetrics(
            instance: configured.isEmpty ? "\(ProcessInfo.processInfo.hostName)-\(getpid())" : configured)
    }

    // MARK: Start and stop

    /// Binds the TCP and Unix listeners and starts the periodic janitor. Blocks until bound.
    public func start() throws {
        let g = config.global
        try loadSecurity(config)
        var addresses: [String] = []
        for part in g.listenAddr.split(separator: ",").map({ $0.trimmingWhitespace() }) where !part.isEmpty {
            if part == "*" { addresses += ["0.0.0.0", "::"] } else { addresses.append(part) }
        }
        for address in addresses {
            try listenTCP(host: address, port: g.listenPort, shared: g.soReuseport)
            logger.info("listening on \(address):\(g.listenPort)")
        }
        if !g.unixSocketDir.isEmpty {
            let path = "\(g.unixSocketDir)/.s.PGSQL.\(g.listenPort)"
            let channel = try makeServerBootstrap().bind(
                unixDomainSocketPath: path, cleanupExistingSocketFile: true
            ).wait()
            chmod(path, mode_t(g.unixSocketMode))
            listeners.append(channel)
            logger.info("listening on unix:\(path)")
        }
        let period = TimeAmount.milliseconds(100)
        janitor = loops[0].scheduleRepeatedTask(initialDelay: period, delay: period) { [weak self] _ in
            self?.timerFired()
        }
        warmStart()
        try startStatsListener()
        // Always running (cheap when no client registered): a RELOAD may switch timeouts on.
        for (index, loop) in loops.enumerated() {
            let registry = loopClients[index]
            sweepers.append(
                loop.scheduleRepeatedTask(initialDelay: period, delay: period) { _ in
                    let now = NIODeadline.now()
                    for client in registry.clients.values { client.checkTimeouts(now: now) }
                    for (client, deadline) in registry.loggingIn.values where deadline <= now {
                        client.loginTimedOut()
                    }
                })
        }
    }

    /// Opens min_pool_size servers for the pools known before any client arrives: databases whose
    /// entry names the server user.
    func warmStart() {
        let now = NIODeadline.now()
        for (name, database) in config.databases where name != "*" {
            guard let user = database.user else { continue }
            let settings = poolSettings(database: database, user: user)
            guard settings.minPoolSize > 0 else { continue }
            let key = PoolKey(database: name, user: user)
            withPool { $0.configure(key, settings: settings, now: now) }
        }
    }

    /// Stops listening, closes every connection and stops the event loops. Blocks until done.
    public func shutdown() {
        shared.withLockedValue { $0.shuttingDown = true }
        janitor?.cancel()
        try? statsListener?.close().wait()
        for sweeper in sweepers { sweeper.cancel() }
        for listener in listeners { try? listener.close().wait() }
        let (clients, servers) = shared.withLockedValue { ($0.clients.values, $0.servers.values) }
        var closing: [EventLoopFuture<Void>] = []
        for client in clients {
            client.channel.close(promise: nil)
            closing.append(client.channel.closeFuture)
        }
        for server in servers {
            server.terminate()
            let loop = server.eventLoop  // the channel is read on its own loop
            closing.append(loop.flatSubmit { server.channel?.closeFuture ?? loop.makeSucceededVoidFuture() })
        }
        for future in closing { try? future.wait() }
        try? group.syncShutdownGracefully()
    }

    /// One listening socket per event loop (SO_REUSEPORT), each accepting onto its own loop: a
    /// new client then never waits for a hand-over from the accepting thread to its own. Unless
    /// `shared` (so_reuseport), a plain bind first makes sure no other process holds the port, so
    /// a second pooler on the same port fails as it would with one socket.
    func listenTCP(host: String, port: Int, shared: Bool) throws {
        if loops.count == 1 {
            listeners.append(try makeServerBootstrap().bind(host: host, port: port).wait())
            return
        }
        if !shared {
            try makeServerBootstrap(on: loops[0], reusePort: false).bind(host: host, port: port).wait().close().wait()
        }
        var bound = port
        for loop in loops {
            let channel = try makeServerBootstrap(on: loop, reusePort: true).bind(host: host, port: bound).wait()
            bound = channel.localAddress?.port ?? bound  // port 0: the others join the first one's
            listeners.append(channel)
        }
    }

    func makeServerBootstrap(on loop: EventLoop? = nil, reusePort: Bool = false) -> ServerBootstrap {
        let bootstrap = loop.map { ServerBootstrap(group: $0) } ?? ServerBootstrap(group: group)
        return
            bootstrap
            .serverChannelOption(
                ChannelOptions.Types.SocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: SO_REUSEPORT)),
                value: reusePort ? 1 : 0
            )
            .serverChannelOption(.backlog, value: Int32(config.global.listenBacklog))
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: false)
            // An idle client keeps its receive buffer between reads: start it small (it grows
            // when a read fills it) so that thousands of idle clients cost little memory. 128
            // bytes hold a startup packet; 256 cost 128 B more per idle client and NIO's adaptive
            // allocator another 49 B for its box (BENCHMARKS.md).
            .childChannelOption(.recvAllocator, value: ReceiveBufferSizer(initial: 128))
            .childChannelInitializer { [self] channel in
                let index = self.loopIndex(of: channel.eventLoop)
                let client = ClientConnection(pooler: self, channel: channel, loopIndex: index)
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(client)
                }
            }
    }

    func loopIndex(of loop: EventLoop) -> Int {
        loops.firstIndex { $0 === loop } ?? 0
    }

    // MARK: Clients

    /// Registers a client that passed the startup packet; fails when max_client_conn or a limit
    /// per client address is reached. `address` is nil for a Unix socket (no per-address limit).
    func register(_ client: ClientConnection, address: String?) -> Result<ClientID, PostgresError> {
        // Three values read through the lent configuration, not a copy of all the global settings.
        let maxClientConn = config.global.maxClientConn
        let maxPerAddress = config.global.maxClientConnPerIP
        let perSecond = config.global.clientConnectRatePerIP
        let now = NIODeadline.now()
        return shared.withLockedValue { s in
            guard s.clientCount < maxClientConn else {
                return .failure(.fatal(SQLState.tooManyConnections, "no more connections allowed (max_client_conn)"))
            }
            if let address {
                s.addresses.maxPerAddress = maxPerAddress
                s.addresses.perSecond = perSecond
                if let refusal = s.addresses.admit(address, now: now) {
                    var error = refusal.postgresError
                    error.severity = "FATAL"
                    return .failure(error)
                }
            }
            s.clientCount += 1
            let id = ClientID(s.nextClientID)
            s.nextClientID += 1
            s.clients[id] = client
            return .success(id)
        }
    }

    /// Gives a logged-in client a cancel key of its own.
    func issueCancelKey(for client: ClientConnection) -> (Int32, Int32) {
        var g = SystemRandomNumberGenerator()
        return shared.withLockedValue { s in
            while true {
                // One draw (a getrandom system call) gives both halves; process IDs are positive.
                let bits = g.next()
                let key = CancelKey(
                    processID: Int32(truncatingIfNeeded: bits & 0x7FFF_FFFF),
                    secretKey: Int32(truncatingIfNeeded: bits >> 32))
                if key.processID != 0, s.cancelKeys[key] == nil {
                    s.cancelKeys[key] = client
                    return (key.processID, key.secretKey)
                }
            }
        }
    }

    /// A client of pool `key` logged in; the pool is made with the settings of `database` if it
    /// does not exist yet (pools are never removed, so the client need not keep the entry).
    func joinPool(_ key: PoolKey, database: DatabaseEntry) {
        let now = NIODeadline.now()
        withShared { s in
            s.poolClients[key, default: 0] += 1
            return makePoolIfNew(key, database: database, in: &s.pools, now: now)
        }
    }

    /// Makes the pool `key` with the settings of `database` unless it exists; its actions.
    func makePoolIfNew(
        _ key: PoolKey, database: DatabaseEntry, in pools: inout PoolStateMachine, now: NIODeadline
    ) -> [PoolAction] {
        guard !pools.hasPool(key) else { return [] }
        return pools.configure(key, settings: poolSettings(database: database, user: key.user), now: now)
    }

    func unregister(
        _ client: ClientConnection, id: ClientID?, cancelKey: (Int32, Int32)?, pool: PoolKey?, address: String?
    ) {
        shared.withLockedValue { s in
            if let pool { s.poolClients[pool, default: 1] -= 1 }
            if let id, s.clients.removeValue(forKey: id) != nil {
                s.clientCount -= 1
                if let address { s.addresses.release(address) }
                s.pools.clientGaveUp(id)
            }
            if let cancelKey { s.cancelKeys[CancelKey(processID: cancelKey.0, secretKey: cancelKey.1)] = nil }
        }
    }

    /// Passes a CancelRequest on to the backend the client is using right now, if any.
    func cancel(processID: Int32, secretKey: Int32) {
        let client = shared.withLockedValue { $0.cancelKeys[CancelKey(processID: processID, secretKey: secretKey)] }
        guard let client else {
            logger.debug("cancel request with an unknown key ignored")
            return
        }
        client.onLoop { client.cancelRequested() }
    }

    /// Sends a CancelRequest on a new connection; completes when PostgreSQL has closed that
    /// connection (it has then acted on the request) or after server_connect_timeout.
    @discardableResult
    func sendCancel(to target: ServerConnection.CancelTarget) -> EventLoopFuture<Void> {
        var buffer = ByteBufferAllocator().buffer(capacity: 16)
        Wire.cancelRequest(processID: target.processID, secretKey: target.secretKey, into: &buffer)
        let packet = buffer
        let timeout = config.global.serverConnectTimeout
        let connecting = target.address.connect(ClientBootstrap(group: group).connectTimeout(timeout))
        return connecting.flatMap { channel in
            channel.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
            return channel.writeAndFlush(packet).flatMap { channel.closeFuture }
        }
    }

    // MARK: Pools

    /// The pool settings for a client's (database, user), from the config.
    func poolSettings(database: DatabaseEntry, user: String) -> PoolSettings {
        let config = self.config
        let g = config.global
        var s = PoolSettings(poolSize: config.poolSize(database: database, user: user))
        s.minPoolSize = database.minPoolSize ?? g.minPoolSize
        s.reservePoolSize = database.reservePoolSize ?? g.reservePoolSize
        s.reservePoolTimeout = g.reservePoolTimeout
        s.maxDBConnections = database.maxDBConnections ?? g.maxDBConnections
        s.maxUserConnections = config.users[user]?.maxUserConnections ?? g.maxUserConnections
        s.queryWaitTimeout = config.queryWaitTimeout(database: database, user: user)
        s.serverLifetime = g.serverLifetime
        s.serverIdleTimeout = g.serverIdleTimeout
        s.serverLoginRetry = g.serverLoginRetry
        s.serverCheckDelay = g.serverCheckDelay
        s.serverCheckEnabled = !g.serverCheckQuery.isEmpty
        s.serverRoundRobin = g.serverRoundRobin
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
        let key = client.poolKey!
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

    /// A client's welcome: the ParameterStatus messages, and the tracked parameters it then has
    /// (its own values, the server's for the rest).
    struct Welcome: Sendable {
        var messages: ByteBuffer
        var wanted: TrackedParameters
    }

    /// The pool's welcome for a client wanting `values`, made by `make` the first time. At most 64
    /// sets of values are kept per pool (application_name can differ per client).
    func welcome(for key: PoolKey, values: [String?], make: () -> Welcome) -> Welcome {
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
            if s.welcome[server.pool] == nil { s.welcome[server.pool] = server.parameters }
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

    func timerFired() {
        let now = NIODeadline.now()
        withPool { $0.timerFired(now: now) }
        let elapsed = now - statsPeriodStart
        if elapsed >= config.global.statsPeriod {
            statsPeriodStart = now
            let book = trafficBook(endingPeriodAfter: Double(elapsed.nanoseconds) / 1e9)
            for (index, loop) in loops.enumerated() {
                let latency = loopLatency[index]
                loop.execute { for recorder in latency.recorders.values { recorder.endPeriod() } }
            }
            if config.global.logStats { logStats(book) }
        }
    }

    /// The stats periods of the traffic counters; the totals are summed from `trafficCells` when
    /// read (`trafficBook()`).
    let traffic = NIOLockedValueBox(TrafficBook())

    /// A database's traffic counters on one event loop. Clients of that loop hand theirs in once
    /// per transaction under the cell's own lock, which only a reader ever contends for: no
    /// pooler-wide lock and no lookup by database name per transaction.
    final class TrafficCell: @unchecked Sendable {
        let database: String
        private let lock = NIOLock()
        private var stats = TrafficStats()

        init(database: String) { self.database = database }

        func add(_ delta: TrafficStats) { lock.withLock { stats += delta } }
        var value: TrafficStats { lock.withLock { stats } }
    }

    struct TrafficCellKey: Hashable {
        var loop: Int
        var database: String
    }

    let trafficCells = NIOLockedValueBox([TrafficCellKey: TrafficCell]())

    /// The cell a client of loop `loop` counts its traffic to `database` in (made on first use).
    func trafficCell(loop: Int, database: String) -> TrafficCell {
        trafficCells.withLockedValue { cells in
            let key = TrafficCellKey(loop: loop, database: database)
            if let cell = cells[key] { return cell }
            let cell = TrafficCell(database: database)
            cells[key] = cell
            return cell
        }
    }

    /// The traffic totals summed over the loops, with the stats periods.
    func trafficBook(endingPeriodAfter seconds: Double? = nil) -> TrafficBook {
        let cells = trafficCells.withLockedValue { Array($0.values) }
        var totals: [String: TrafficStats] = [:]
        for cell in cells { totals[cell.database, default: TrafficStats()] += cell.value }
        return traffic.withLockedValue { book in
            book.setTotals(totals)
            if let seconds { book.endPeriod(seconds: seconds) }
            return book
        }
    }
    /// Touched by the janitor only.
    var statsPeriodStart = NIODeadline.now()

    /// log_stats: one line per database with the last period's rates and averages.
    func logStats(_ book: TrafficBook) {
        for (database, delta) in book.lastPeriod.sorted(by: { $0.key < $1.key }) {
            let a = delta.averages(overSeconds: book.lastPeriodSeconds)
            let line =
                "stats: instance=\(instanceID) db=\(database) \(a[1]) xacts/s, \(a[2]) queries/s, in \(a[3]) B/s, "
                + "out \(a[4]) B/s, xact \(a[5]) us, query \(a[6]) us, wait \(a[7]) us"
            logger.info("\(line)")
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
            if s.actions.count == 1 { return .one(Self.resolve(s.actions[0], in: &s)) }
            let actions = s.actions
            return .many(actions.map { Self.resolve($0, in: &s) })
        }
        switch decided {
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
                action: action, client: s.clients[clientID], server: server, lease: server?.leasesIssued ?? 0)
        case .failClient(let clientID, _):
            return Resolved(action: action, client: s.clients[clientID], server: nil)
        case .check(let serverID, _):
            return Resolved(action: action, client: nil, server: s.servers[serverID])
        case .close(let serverID):
            return Resolved(action: action, client: nil, server: s.servers.removeValue(forKey: serverID))
        case .connect, .note:
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
            connect(serverID, pool: key, loop: loop)
        case .close:
            item.server?.terminate()
        case .failClient(_, let error):
            let client = item.client
            client?.onLoop { client?.waitFailed(error) }
        case .check(let serverID, _):
            if let server = item.server {
                server.check(config.global.serverCheckQuery)
            } else {
                let now = NIODeadline.now()
                withPool { $0.serverCheckFailed(serverID, now: now) }
            }
        case .note(let key, let event):
            metrics.note(event, pool: key)
            switch event {
            case .reserveOpened(let waited):
                logger.info("pool \(key): opening a reserve server, a client waited \(waited.secondsText) s")
            case .checkFailed:
                logger.warning("pool \(key): server failed server_check_query; checking older idle servers")
            case .recycledForAge:
                logger.debug("pool \(key): closed a server that reached server_lifetime")
            case .closedIdle:
                logger.debug("pool \(key): closed a server idle for server_idle_timeout")
            case .waitTimedOut:
                logger.debug("pool \(key): a client reached query_wait_timeout")
            case .probe:
                logger.info("pool \(key): trying to connect again")
            }
        }
    }

    func connect(_ id: ServerID, pool key: PoolKey, loop: Int) {
        guard let database = config.database(named: key.database) else {
            serverConnectFailed(
                ServerConnection.placeholder(id: id, pool: key, pooler: self),
                error: .fatal(SQLState.invalidCatalogName, "database \"\(key.database)\" is not configured"))
            return
        }
        let server = ServerConnection(
            id: id, pool: key, database: database, pooler: self, loopIndex: loop % loops.count)
        shared.withLockedValue { $0.servers[id] = server }
        let g = config.global
        var bootstrap = ClientBootstrap(group: loops[loop % loops.count])
            .connectTimeout(g.serverConnectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.socketOption(.so_keepalive), value: g.tcpKeepalive ? 1 : 0)
        if case .tcp = server.address {
            // tcp_keepidle, tcp_keepintvl, tcp_keepcnt and tcp_user_timeout, as PgBouncer applies them.
            for (option, value) in [
                (TCP_KEEPIDLE, g.tcpKeepidle), (TCP_KEEPINTVL, g.tcpKeepintvl), (TCP_KEEPCNT, g.tcpKeepcnt),
                (TCP_USER_TIMEOUT, g.tcpUserTimeout),
            ] where value > 0 && (g.tcpKeepalive || option == TCP_USER_TIMEOUT) {
                bootstrap = bootstrap.channelOption(
                    ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: option)),
                    value: SocketOptionValue(value))
            }
        }
        let negotiator = serverTLSNegotiator(for: server.address)
        bootstrap =
            bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let negotiator { try channel.pipeline.syncOperations.addHandler(negotiator) }
                    try channel.pipeline.syncOperations.addHandler(server)
                }
            }
        let connecting = server.address.connect(bootstrap)
        connecting.whenFailure { error in
            self.serverConnectFailed(
                server, error: PostgresError.fatal(SQLState.connectionFailure, "\(error)"))
        }
    }

    /// The SSLRequest step for a new server connection, per server_tls_sslmode; none over a Unix
    /// socket (PostgreSQL does not offer TLS there) or when TLS is off.
    func serverTLSNegotiator(for address: ServerConnection.Address) -> ServerTLSNegotiator? {
        let g = config.global
        guard case .tcp(let host, _) = address, g.serverTLS.sslmode != .disable, g.serverTLS.sslmode != .allow
        else { return nil }
        return ServerTLSNegotiator(
            mode: g.serverTLS.sslmode, context: security.serverTLS, hostname: host, timeout: g.serverConnectTimeout)
    }

    /// RELOAD: reads the configuration and auth file again and applies them to the pools (sizes,
    /// limits, timeouts) without dropping a client. An invalid configuration is rejected and the
    /// old one stays.
    public func reload() throws(PostgresError) {
        guard let reloader else {
            throw PostgresError(code: SQLState.featureNotSupported, message: "no configuration file to reload")
        }
        let fresh: (Config, [String: PasswordSecret])
        do {
            fresh = try reloader()
        } catch {
            logger.error("RELOAD rejected, keeping the old configuration: \(error)")
            throw PostgresError(code: SQLState.invalidParameterValue, message: "RELOAD rejected: \(error)")
        }
        do {
            try loadSecurity(fresh.0)
        } catch {
            logger.error("RELOAD rejected, keeping the old configuration: \(error)")
            throw PostgresError(code: SQLState.invalidParameterValue, message: "RELOAD rejected: \(error)")
        }
        let old = config
        settings.withLockedValue { $0 = Settings(config: fresh.0, userlist: fresh.1) }
        credentials.withLockedValue { $0.authQuery.removeAll() }
        let g = fresh.0.global
        if g.listenAddr != old.global.listenAddr || g.listenPort != old.global.listenPort
            || g.unixSocketDir != old.global.unixSocketDir
        {
            logger.warning("RELOAD: listen_addr, listen_port and unix_socket_dir take effect after a restart")
        }
        for warning in fresh.0.warnings { logger.warning("\(warning)") }
        applyPoolSettings(fresh.0)
        logger.info("RELOAD: configuration applied")
    }

    /// For --check: loads the HBA file and the TLS certificates the way start() would.
    public static func checkSecurityFiles(_ config: Config) throws {
        _ = try Security.load(config)
    }

    /// Reads the HBA file and the TLS certificates; nothing changes when one of them is bad.
    func loadSecurity(_ config: Config) throws {
        let loaded = try Security.load(config)
        securityBox.withLockedValue { $0 = loaded }
        credentials.withLockedValue { $0.authQuery.ttl = config.global.authQueryCacheTTL }
    }

    /// Applies changed pool settings to the existing pools (RELOAD and SET).
    func applyPoolSettings(_ config: Config) {
        let now = NIODeadline.now()
        withPool { pools in
            var actions: [PoolAction] = []
            for key in pools.poolKeys {
                guard let database = config.database(named: key.database) else { continue }
                actions += pools.configure(key, settings: poolSettings(database: database, user: key.user), now: now)
            }
            return actions
        }
    }

    /// PAUSE: stop lending servers of `database` (all when nil); the future completes once no server
    /// of those pools is lent any more.
    public func pause(database: String?) -> EventLoopFuture<Void> {
        shared.withLockedValue { $0.pools.pause(database: database) }
        logger.info("PAUSE \(database ?? "all databases"): waiting for lent servers to come back")
        return waitUntil(on: loops[0]) { [self] in lentServers(database: database) == 0 }
    }

    /// Servers lent to clients right now in the pools of `database` (all when nil).
    public func lentServers(database: String?) -> Int {
        shared.withLockedValue { $0.pools.lentCount(database: database) }
    }

    public func resume(database: String?) {
        let now = NIODeadline.now()
        withPool { $0.resume(database: database, now: now) }
        shared.withLockedValue { s in
            if database == nil { s.suspended = false }
        }
        logger.info("RESUME \(database ?? "all databases")")
    }

    /// Stops accepting new clients.
    public func stopListening() {
        for listener in listeners { try? listener.close().wait() }
        listeners.removeAll()
    }

    public var connectedClients: Int { shared.withLockedValue { $0.clientCount } }

    /// Completes once `condition` holds, checking every 50 ms.
    public func waitUntil(on loop: EventLoop, _ condition: @escaping @Sendable () -> Bool) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        if condition() {
            promise.succeed(())
            return promise.futureResult
        }
        loop.scheduleRepeatedTask(initialDelay: .milliseconds(50), delay: .milliseconds(50)) { task in
            if condition() {
                task.cancel()
                promise.succeed(())
            }
        }
        return promise.futureResult
    }
}

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A connection whose flushes its loop's `TurnFlusher` gathers.
protocol TurnFlushed: AnyObject {
    /// Waiting in its loop's `TurnFlusher`.
    var flushQueued: Bool { get set }
    func flushNow()
}

extension ClientConnection: TurnFlushed {
    func flushNow() { clientFlush() }
}

extension ServerConnection: TurnFlushed {
    func flushNow() { context?.flush() }
}
