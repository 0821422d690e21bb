import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Synchronization
import TidepoolCore

/// The running pooler: settings, listeners, the janitor, start and stop, and the components it
/// owns (the pool driver with the pools and the client registry, the server connector, the host
/// resolver, credentials, cancels, each pool's listener, the admin console's runtime), each of
/// which sees it only through a protocol of its own.
public final class Pooler: @unchecked Sendable {
    let settings: NIOLockedValueBox<Settings>
    /// Reads the configuration and the auth file again (for RELOAD and SIGHUP).
    /// Reads the configuration again: the file given at start, or conffile when set.
    let reloader: (@Sendable (_ conffile: String?) throws -> (Config, [String: PasswordSecret]))?
    /// The configuration in force, lent to the reader (`pooler.config.global.x` copies nothing).
    public var config: Config {
        _read { yield settings.withLockedValue { $0.configBox }.value }
    }
    var userlist: [String: PasswordSecret] { settings.withLockedValue { $0.userlist } }
    public let logger: Logger
    /// Prepared statements' names, epoch and capacity, shared by the clients.
    let statements: SharedStatements
    /// -v given on the command line, added to verbose when SET or RELOAD changes it.
    public var commandLineVerbose = 0
    /// For SHOW STATE's uptime: when the pooler was made (at process start).
    let startedAt = Date()
    /// The instance id: `instance_id`, or host-pid.
    public var instanceID: String { metrics.instance }
    /// What `waitUntil` waits for, failed by `shutdown` if still pending.
    let waits = NIOLockedValueBox([ObjectIdentifier: (RepeatedTask, EventLoopPromise<Void>)]())
    let group: MultiThreadedEventLoopGroup
    let loops: [EventLoop]
    /// HBA rules and TLS contexts; loaded by start() and RELOAD.
    let securityBox = NIOLockedValueBox(Security())
    var security: Security { securityBox.withLockedValue { $0 } }
    /// auth_query's answers and the secrets clients' logins taught (set once, at the end of init).
    private(set) var credentials: Credentials!
    /// Each pool's listener (set once, at the end of init).
    private(set) var listenerHub: ListenerHub!
    /// Numbers the server connections opened outside the pools (`unpooledServerID`).
    let unpooledServerIDs = Atomic<UInt64>(0)
    /// Server host names' addresses (set once, at the end of init: it is given the pooler).
    private(set) var hosts: HostResolver!
    /// Opens server connections (set once, at the end of init).
    private(set) var connector: ServerConnector!
    /// The pools and the client registry under their lock (set once, at the end of init).
    private(set) var pools: PoolDriver!

    var listeners: [Channel] = []
    /// The HTTP listener for /metrics and /health (stats_listen_port).
    var statsListener: Channel?
    /// Connections open on the stats port (`startStatsListener` caps them).
    let statsConnections = NIOLockedValueBox(0)
    let metrics: PoolerMetrics
    /// Passes cancel requests on (set once, at the end of init: it is given the pooler).
    private(set) var cancels: CancelRequests!
    /// Carries out the admin console's commands (set once, at the end of init).
    private(set) var admin: AdminRuntime!
    var janitor: RepeatedTask?
    var sweepers: [RepeatedTask] = []
    /// What the pooler keeps for each of its event loops (`loops`, same order).
    let poolerLoops: [PoolerLoop]

    /// `loops`: the event loops connections run on, when not the pooler's own threads' (the
    /// handler tests run them on one `EmbeddedEventLoop`).
    public init(
        config: Config, userlist: [String: PasswordSecret], logger: Logger, threads: Int? = nil,
        reloader: (@Sendable (_ conffile: String?) throws -> (Config, [String: PasswordSecret]))? = nil,
        loops: [EventLoop]? = nil
    ) {
        self.settings = NIOLockedValueBox(Settings(config: config, userlist: userlist))
        self.statements = SharedStatements(capacity: config.global.maxPreparedStatements)
        self.reloader = reloader
        self.logger = logger
        let count = threads ?? (config.global.threads > 0 ? config.global.threads : System.coreCount)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: loops == nil ? count : 1)
        self.loops = loops ?? Array(group.makeIterator())
        self.poolerLoops = self.loops.enumerated().map { PoolerLoop(index: $0, eventLoop: $1) }
        let configured = config.global.instanceID
        self.metrics = PoolerMetrics(
            instance: configured.isEmpty ? "\(ProcessInfo.processInfo.hostName)-\(getpid())" : configured)
        self.hosts = HostResolver(config.global, loop: self.loops[0], logger: logger, owner: self)
        self.credentials = Credentials(pooler: self, hosts: hosts)
        self.connector = ServerConnector(owner: self, hosts: hosts, credentials: credentials, loops: poolerLoops)
        self.pools = PoolDriver(owner: self, connector: connector, loopCount: self.loops.count)
        self.cancels = CancelRequests(pooler: self, pools: pools, hosts: hosts, group: group)
        self.listenerHub = ListenerHub(pooler: self)
        self.admin = AdminRuntime(
            owner: self, pools: pools, hosts: hosts, cancels: cancels, statements: statements, listenerHub: listenerHub)
    }

    /// The stats periods of the traffic counters; the totals are summed from `trafficCells` when
    /// read (`trafficBook()`).
    let traffic = NIOLockedValueBox(TrafficBook())
    let trafficCells = NIOLockedValueBox([TrafficCellKey: TrafficCell]())
    /// Touched by the janitor only.
    var statsPeriodStart = NIODeadline.now()

    // MARK: Start and stop

    /// Binds the TCP and Unix listeners and starts the periodic janitor. Blocks until bound.
    public func start() throws {
        let g = config.global
        try loadSecurity(config)
        // Health and metrics first: once the pooler's port accepts, /health answers too.
        try startStatsListener()
        var addresses: [String] = []
        for part in g.listenAddr.split(separator: ",").map({ $0.trimmingWhitespace() }) where !part.isEmpty {
            if part == "*" { addresses += ["0.0.0.0", "::"] } else { addresses.append(part) }
        }
        if !g.unixSocketDir.isEmpty {
            let path = "\(g.unixSocketDir)/.s.PGSQL.\(g.listenPort)"
            let channel = try makeServerBootstrap(tcp: false).bind(
                unixDomainSocketPath: path, cleanupExistingSocketFile: true
            ).wait()
            chmod(path, mode_t(g.unixSocketMode))
            if let group = g.unixSocketGroup {
                guard let entry = getgrnam(group) else {
                    throw ConfigError(file: "", line: 0, key: "unix_socket_group", message: "no such group \(group)")
                }
                guard chown(path, uid_t.max, entry.pointee.gr_gid) == 0 else {
                    let reason = String(cString: strerror(errno))
                    throw ConfigError(
                        file: "", line: 0, key: "unix_socket_group",
                        message: "cannot give \(path) to \(group): \(reason)")
                }
            }
            listeners.append(channel)
            logger.info("listening on unix:\(path)")
        }
        // TCP last: once its port accepts, the Unix socket is there too, with its mode and group.
        for address in addresses {
            try listenTCP(host: address, port: g.listenPort, shared: g.soReuseport)
            logger.info("listening on \(address):\(g.listenPort)")
        }
        let period = TimeAmount.milliseconds(100)
        // unowned: `shutdown` cancels it; a weak reference would give the pooler a side table,
        // and every retain of it the slow path.
        janitor = loops[0].scheduleRepeatedTask(initialDelay: period, delay: period) { [unowned self] _ in
            self.janitorTick()
        }
        warmStart()
        // Always running (cheap when no client registered): a RELOAD may switch timeouts on.
        for loop in poolerLoops {
            sweepers.append(
                loop.eventLoop.scheduleRepeatedTask(initialDelay: period, delay: period) { _ in
                    let now = NIODeadline.now()
                    for client in loop.clockWatchers.values { client.tick(now: now) }
                })
        }
    }

    /// Opens min_pool_size servers for the pools known before any client arrives: databases whose
    /// entry names the server user.
    /// Makes the pool of every database entry with a user and a min_pool_size, so that the
    /// janitor keeps it at its minimum (at start, and after RELOAD or SET).
    func warmStart() {
        let now = NIODeadline.now()
        for (name, database) in config.databases where name != "*" {
            guard let user = database.user else { continue }
            let settings = pools.poolSettings(database: database, user: user)
            guard settings.minPoolSize > 0 else { continue }
            let key = PoolKey(database: name, user: user)
            pools.withPool { $0.configure(key, settings: settings, now: now) }
        }
    }

    /// Every 100 ms on the first loop: the pools' timers, host names due for a lookup, the end
    /// of a stats period.
    func janitorTick() {
        let now = NIODeadline.now()
        // Read first: a listener is made only for a pool with a client, which keeps it in use.
        pools.timerFired(now: now, listening: listenerHub.pools)
        hosts.refresh(now: now)
        let elapsed = now - statsPeriodStart
        if elapsed >= config.global.statsPeriod {
            statsPeriodStart = now
            let book = trafficBook(endingPeriodAfter: Double(elapsed.nanoseconds) / 1e9)
            for (index, loop) in loops.enumerated() {
                let latency = poolerLoops[index].latency
                loop.execute { for recorder in latency.recorders.values { recorder.endPeriod() } }
            }
            if config.global.logStats { logStats(book) }
        }
    }

    /// Stops listening, closes every connection and stops the event loops. Blocks until done.
    public func shutdown() {
        pools.shutDown()
        janitor?.cancel()
        try? statsListener?.close().wait()
        for sweeper in sweepers { sweeper.cancel() }
        for listener in listeners { try? listener.close().wait() }
        let (clients, servers) = pools.connections()
        var closing: [EventLoopFuture<Void>] = []
        for client in clients {
            client.channel.close(promise: nil)
            closing.append(client.channel.closeFuture)
        }
        for server in servers {
            server.command(.terminate)
            let loop = server.eventLoop  // the channel is read on its own loop
            closing.append(loop.flatSubmit { server.channel?.closeFuture ?? loop.makeSucceededVoidFuture() })
        }
        for future in closing { try? future.wait() }
        endWaits()
        hosts.stop()
        try? group.syncShutdownGracefully()
        for loop in poolerLoops { loop.flusher.stop() }  // their threads are gone
    }

    public var connectedClients: Int { pools.clientCount }

    /// Completes once `condition` holds, checking every 50 ms; fails if the pooler shuts down first
    /// (PAUSE or WAIT_CLOSE still waiting when a second signal stops it).
    public func waitUntil(on loop: EventLoop, _ condition: @escaping @Sendable () -> Bool) -> EventLoopFuture<Void> {
        if condition() { return loop.makeSucceededVoidFuture() }
        let promise = loop.makePromise(of: Void.self)
        let key = ObjectIdentifier(promise.futureResult)
        let task = loop.scheduleRepeatedTask(initialDelay: .milliseconds(50), delay: .milliseconds(50)) {
            [self] task in
            guard condition(), waits.withLockedValue({ $0.removeValue(forKey: key) }) != nil else { return }
            task.cancel()
            promise.succeed(())
        }
        waits.withLockedValue { $0[key] = (task, promise) }
        return promise.futureResult
    }

    /// Fails what `waitUntil` still waits for.
    func endWaits() {
        let pending = waits.withLockedValue { waits in
            defer { waits.removeAll() }
            return Array(waits.values)
        }
        for (task, promise) in pending {
            task.cancel()
            promise.fail(PostgresError(code: SQLState.adminShutdown, message: "the pooler is shutting down"))
        }
    }
}

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What the pooler's components see of it.
extension Pooler: CancelRouting, CredentialSources, ServerConnectorOwner, ResolvedHostsOwner, UnpooledServerOwner,
    PoolDriverOwner, ClientConnectionOwner, AdminOwner
{}
