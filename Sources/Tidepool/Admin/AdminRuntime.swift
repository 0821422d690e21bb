import Foundation
import Logging
import NIOCore
import TidepoolCore

/// What the admin console's commands need of the pooler: its settings, and the operations a
/// signal also starts (RELOAD, PAUSE, SUSPEND, RESUME), which stay the pooler's.
protocol AdminOwner: AnyObject, Sendable {
    var config: Config { get }
    var userlist: [String: PasswordSecret] { get }
    var logger: Logger { get }
    var instanceID: String { get }
    /// When the pooler was made, for SHOW STATE's uptime.
    var startedAt: Date { get }
    func reload() throws(PostgresError)
    func pause(database: String?) -> EventLoopFuture<Void>
    func resume(database: String?)
    func suspend(on loop: EventLoop) -> EventLoopFuture<Void>
    func waitUntil(on loop: EventLoop, _ condition: @escaping @Sendable () -> Bool) -> EventLoopFuture<Void>
    /// SET: one setting changed at run time (a bad value, or a certificate that does not load,
    /// refuses it).
    func set(_ key: String, _ value: String) throws(PostgresError)
    func trafficBook(endingPeriodAfter seconds: Double?) -> TrafficBook
    /// Every loop's SHOW LATENCY histograms, merged.
    func latencyBook(on loop: EventLoop) -> EventLoopFuture<LatencyBook>
    /// Histograms allocated for SHOW LATENCY, roughly.
    var latencyHistogramCount: Int { get }
    func bufferFigures(on loop: EventLoop) -> EventLoopFuture<BufferFigures>
}

/// The admin console's commands carried out: SHOW views gathered from the pool driver and from
/// every connection (each asked on its own event loop), and the control commands.
final class AdminRuntime: Sendable {
    /// The pooler, which owns the console's runtime and outlives it.
    private unowned let owner: any AdminOwner
    private let pools: PoolDriver
    private let hosts: HostResolver
    private let cancels: CancelRequests
    private let statements: SharedStatements
    private let listenerHub: ListenerHub

    init(
        owner: any AdminOwner, pools: PoolDriver, hosts: HostResolver, cancels: CancelRequests,
        statements: SharedStatements, listenerHub: ListenerHub
    ) {
        self.owner = owner
        self.pools = pools
        self.hosts = hosts
        self.cancels = cancels
        self.statements = statements
        self.listenerHub = listenerHub
    }

    private var config: Config { owner.config }
    private var logger: Logger { owner.logger }

    func done(_ tag: String, on loop: EventLoop) -> EventLoopFuture<AdminResult> {
        loop.makeSucceededFuture(AdminResult(columns: [], rows: [], tag: tag))
    }

    /// Runs one admin command; the future completes with its result or a PostgresError.
    func admin(_ command: AdminCommand, on loop: EventLoop) -> EventLoopFuture<AdminResult> {
        do throws(PostgresError) {
            switch command {
            case .empty:
                return done("", on: loop)
            case .show(let what):
                return try show(what, on: loop)
            case .reload:
                try owner.reload()
                return done("RELOAD", on: loop)
            case .pause(let database):
                try requireDatabase(database)
                return owner.pause(database: database).map { AdminResult(columns: [], rows: [], tag: "PAUSE") }
            case .resume(let database):
                try requireDatabase(database)
                if let refusal = pools.resumeRefusal(database: database) { throw refusal }
                owner.resume(database: database)
                return done("RESUME", on: loop)
            case .suspend:
                return owner.suspend(on: loop).map { AdminResult(columns: [], rows: [], tag: "SUSPEND") }
            case .disable(let database):
                try requireDatabase(database)
                pools.setDisabled(database, true)
                logger.info("DISABLE \(database): new clients are refused")
                return done("DISABLE", on: loop)
            case .enable(let database):
                try requireDatabase(database)
                pools.setDisabled(database, false)
                logger.info("ENABLE \(database)")
                return done("ENABLE", on: loop)
            case .reconnect(let database):
                try requireDatabase(database)
                let now = NIODeadline.now()
                pools.withPool { $0.reconnect(database: database, now: now) }
                logger.info("RECONNECT \(database ?? "all databases")")
                return done("RECONNECT", on: loop)
            case .waitClose(let database):
                try requireDatabase(database)
                return owner.waitUntil(on: loop) { [pools] in pools.closeNeededCount(database: database) == 0 }.map {
                    AdminResult(columns: [], rows: [], tag: "WAIT_CLOSE")
                }
            case .kill(let database):
                try requireDatabase(database)
                pools.pause(database: database)
                let now = NIODeadline.now()
                pools.withPool { $0.reconnect(database: database, now: now) }
                // Clients of pools only: the console sessions (the one asking included) stay.
                let victims = pools.poolClients(database: database)
                for client in victims { client.onLoop { client.kill("KILL \(database ?? "")") } }
                logger.info("KILL \(database ?? "all databases"): \(victims.count) client(s) closed")
                return done("KILL", on: loop)
            case .killClient(let text):
                let raw = UInt64(text.hasPrefix("C-") ? String(text.dropFirst(2)) : text)
                guard let raw, let client = pools.client(ClientID(raw)) else {
                    throw PostgresError(code: SQLState.undefinedObject, message: "no client with id \(text)")
                }
                client.onLoop { client.kill("KILL_CLIENT") }
                return done("KILL_CLIENT", on: loop)
            case .set(let key, let value):
                try owner.set(key, value)
                return done("SET", on: loop)
            case .shutdown(let mode):
                let signal: Int32 =
                    switch mode {
                    case .immediate: SIGQUIT
                    case .waitForServers: SIGINT
                    case .waitForClients: SIGTERM
                    }
                logger.info("SHUTDOWN requested from the admin console")
                // The signal handler does the rest, as for a signal from outside; answer first.
                loop.scheduleTask(in: .milliseconds(50)) { kill(getpid(), signal) }
                return done("SHUTDOWN", on: loop)
            }
        } catch {
            return loop.makeFailedFuture(error)
        }
    }

    /// A command naming a database (none: all of them) is refused for one the configuration lacks,
    /// with PgBouncer's words.
    func requireDatabase(_ name: String?) throws(PostgresError) {
        guard let name else { return }
        guard config.database(named: name) != nil else {
            throw PostgresError(code: SQLState.invalidCatalogName, message: "no such database: \(name)")
        }
    }

    func show(_ what: String, on loop: EventLoop) throws(PostgresError) -> EventLoopFuture<AdminResult> {
        let now = NIODeadline.now()
        let config = self.config
        let views = pools.views(now: now, databases: what == "DATABASES" ? Array(config.databases.keys) : [])
        let snapshots = views.pools
        let (clientCount, consoleClients) = (views.clientCount, views.consoleClients)
        let console = AdminViews.consoleDatabase(config)
        switch what {
        case "POOLS":
            var counts: [PoolKey: PoolClientCounts] = [:]
            var modes: [PoolKey: PoolMode] = [:]
            for snap in snapshots {
                let total = views.poolClients[snap.key] ?? 0
                counts[snap.key] = PoolClientCounts(
                    active: max(total - snap.waiting, 0), waiting: snap.waiting, pinned: views.pinned[snap.key] ?? 0)
                if let db = config.database(named: snap.key.database) {
                    modes[snap.key] = config.poolMode(database: db, user: snap.key.user)
                }
            }
            return loop.makeSucceededFuture(
                AdminViews.pools(
                    snapshots, clients: counts, modes: modes, console: console.map { ($0, consoleClients) }))
        case "LISTS":
            return loop.makeSucceededFuture(
                AdminViews.lists(
                    databases: config.databases.count,
                    users: AdminViews.knownUsers(
                        configured: config.users.keys, authFile: owner.userlist.keys, pools: snapshots.map(\.key.user)),
                    pools: snapshots.count,
                    clients: clientCount, serversUsed: snapshots.reduce(0) { $0 + $1.lent },
                    serversIdle: snapshots.reduce(0) { $0 + $1.idle },
                    serversLogin: snapshots.reduce(0) { $0 + $1.connecting }, peers: config.peers.count,
                    peerPools: config.peers.count, dnsNames: hosts.cache.entries.count,
                    dnsZones: hosts.cache.zoneRows().count, dnsQueries: hosts.cache.pending))
        case "DATABASES":
            var current: [String: Int] = [:]
            for snap in snapshots {
                current[snap.key.database, default: 0] += snap.lent + snap.idle + snap.connecting
            }
            return loop.makeSucceededFuture(
                AdminViews.databases(
                    config, currentConnections: current, clients: views.databaseClients, paused: views.pausedDatabases,
                    disabled: views.disabled, consoleClients: consoleClients))
        case "USERS":
            var connections: [String: Int] = [:]
            for snap in snapshots { connections[snap.key.user, default: 0] += snap.lent + snap.idle + snap.connecting }
            return loop.makeSucceededFuture(
                AdminViews.users(
                    config, poolUsers: snapshots.map(\.key.user), serverConnections: connections,
                    clients: views.userClients, authFileUsers: Array(owner.userlist.keys)))
        case "FDS":
            let g = config.global
            let listeners = g.listenAddr.isEmpty ? [] : [(address: g.listenAddr, port: g.listenPort)]
            return clientRows(on: loop).and(serverRows(on: loop)).map { clients, servers in
                AdminViews.fds(listeners: listeners, clients: clients, servers: servers)
            }
        case "STATS", "STATS_TOTALS", "STATS_AVERAGES", "TOTALS":
            let book = owner.trafficBook(endingPeriodAfter: nil)
            let databases = Array(Set(snapshots.map(\.key.database))) + (console.map { [$0] } ?? [])
            switch what {
            case "STATS": return loop.makeSucceededFuture(AdminViews.stats(book, databases: databases))
            case "STATS_TOTALS": return loop.makeSucceededFuture(AdminViews.statsTotals(book, databases: databases))
            case "STATS_AVERAGES":
                return loop.makeSucceededFuture(AdminViews.statsAverages(book, databases: databases))
            default: return loop.makeSucceededFuture(AdminViews.totals(book))
            }
        case "STATE":
            return loop.makeSucceededFuture(
                AdminViews.state(
                    paused: views.allPaused, suspended: views.suspended, instanceID: owner.instanceID,
                    uptimeSeconds: Int(Date().timeIntervalSince(owner.startedAt))))
        case "MEM":
            let servers = views.serverCount
            let known = statements.knownCount
            let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
            let statm = (try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8)) ?? ""
            let rss = (statm.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0) * pageSize
            let histograms = owner.latencyHistogramCount
            return owner.bufferFigures(on: loop).map { buffers in
                AdminViews.memory([
                    ("process_rss", rss, 1, nil), ("clients", 0, clientCount, nil), ("servers", 0, servers, nil),
                    ("prepared_statement_names", 0, known, nil),
                    ("latency_histograms", LatencyHistogram.byteSize, histograms, nil),
                    // Per connection: the largest, how many hold any, all of them together.
                    ("client_buffers", buffers.clients.largest, buffers.clients.holding, buffers.clients.total),
                    ("server_buffers", buffers.servers.largest, buffers.servers.holding, buffers.servers.total),
                ])
            }
        case "CLIENTS":
            return clientRows(on: loop).map { AdminViews.connections($0, type: "C") }
        case "SERVERS":
            return serverRows(on: loop).map { AdminViews.connections($0, type: "S") }
        case "SOCKETS", "ACTIVE_SOCKETS":
            return clientRows(on: loop).and(serverRows(on: loop)).map { clients, servers in
                AdminViews.sockets(clients: clients, servers: servers, activeOnly: what == "ACTIVE_SOCKETS")
            }
        case "PEERS":
            return loop.makeSucceededFuture(AdminViews.peers(config))
        case "PEER_POOLS":
            return loop.makeSucceededFuture(AdminViews.peerPools(config, cancels: peerCancelCounts()))
        case "DNS_HOSTS":
            return loop.makeSucceededFuture(AdminViews.dnsHosts(hosts.cache, now: .now()))
        case "DNS_ZONES":
            return loop.makeSucceededFuture(AdminViews.dnsZones(hosts.cache))
        case "LATENCY":
            return owner.latencyBook(on: loop).map { AdminViews.latency($0) }
        case "LISTENS":
            let listeners = listenerHub.all
            let lists = listeners.map { listener in
                listener.channels().map { channels in channels.map { (listener.key, $0.channel, $0.clients) } }
            }
            return EventLoopFuture.whenAllSucceed(lists, on: loop).map { AdminViews.listens($0.flatMap { $0 }) }
        case "VERSION":
            return loop.makeSucceededFuture(AdminViews.version(TidepoolCoreVersion.string))
        case "HELP":
            return loop.makeSucceededFuture(AdminResult(columns: ["help"], rows: AdminViews.helpText.map { [$0] }))
        case "CONFIG":
            return loop.makeSucceededFuture(AdminViews.config(config.displaySettings))
        default:
            throw PostgresError(code: SQLState.syntaxError, message: "unknown SHOW item \(what), use SHOW HELP;")
        }
    }

    /// Cancel requests in flight to each peer and queued for it.
    func peerCancelCounts() -> [Int: (sending: Int, queued: Int)] {
        cancels.peerCounts
    }

    /// Every client as SHOW CLIENTS lists it, each asked on its own loop.
    func clientRows(on loop: EventLoop) -> EventLoopFuture<[ConnectionRow]> {
        let clients = pools.connections().clients
        let rows = clients.map { client in client.channel.eventLoop.submit { client.describe() } }
        return EventLoopFuture.whenAllSucceed(rows, on: loop)
    }

    /// Every server as SHOW SERVERS lists it, each asked on its own loop; one still being connected
    /// (no channel yet) is left out.
    func serverRows(on loop: EventLoop) -> EventLoopFuture<[ConnectionRow]> {
        let (servers, closing) = pools.serversClosing()
        let rows: [EventLoopFuture<ConnectionRow?>] = servers.map { server in
            server.eventLoop.submit {
                server.channel == nil ? nil : server.describe(closeNeeded: closing.contains(server.id))
            }
        }
        return EventLoopFuture.whenAllSucceed(rows, on: loop).map { $0.compactMap { $0 } }
    }
}

extension ClientConnection {
    /// This client as SHOW CLIENTS lists it (called on its event loop).
    func describe() -> ConnectionRow {
        var row = ConnectionRow()
        row.user = user
        row.database = databaseName
        row.state = session.stateName
        if let mode = session.replication { row.replication = mode.rawValue }
        if let remote = channel.remoteAddress {
            row.address = remote.ipAddress ?? "unix"
            row.port = remote.port ?? 0
        }
        if let local = channel.localAddress {
            row.localAddress = local.ipAddress ?? "unix"
            row.localPort = local.port ?? 0
        }
        row.connectTime = connectedAtWallClock
        row.requestTime = connectedAtWallClock
        if let start = session.waitStart {
            row.waitMicroseconds = Int((NIODeadline.now() - start).nanoseconds / 1000)
        }
        row.id = id.map { "\($0.raw)" } ?? ""
        if let server { row.link = "\(server.id)" }
        row.applicationName = session.wanted["application_name"] ?? ""
        row.preparedStatements = session.prepared?.statements.count ?? 0
        if let reason = session.sessionState?.pinReason {
            row.pinned = true
            row.pinReason = reason.name
        }
        row.received = session.bufferedBytes
        row.queued = queuedBytes
        return row
    }

    /// KILL and KILL_CLIENT: the client is told and disconnected.
    func kill(_ reason: String) {
        sendFatal(.fatal(SQLState.adminShutdown, "terminating connection due to administrator command"), reason: reason)
    }
}

extension ServerConnection {
    /// This server as SHOW SERVERS lists it (called on its event loop).
    func describe(closeNeeded: Bool) -> ConnectionRow {
        var row = ConnectionRow()
        row.user = database?.user ?? pool.user
        row.database = pool.database
        switch session.phase {
        case .connecting, .loggingIn, .internalQuery(.afterLogin): row.state = "login"
        case .internalQuery(.check): row.state = "tested"
        case .internalQuery(.reset): row.state = "used"
        case .ready: row.state = owner == nil ? "idle" : "active"
        case .closed: row.state = "closed"
        }
        if let remote = channel?.remoteAddress {
            row.address = remote.ipAddress ?? "unix"
            row.port = remote.port ?? 0
        }
        if let local = channel?.localAddress {
            row.localAddress = local.ipAddress ?? "unix"
            row.localPort = local.port ?? 0
        }
        row.connectTime = connectedAtWallClock
        row.requestTime = connectedAtWallClock
        row.closeNeeded = closeNeeded
        row.id = "\(id.raw)"
        if let owner, let ownerID = owner.id { row.link = "\(ownerID)" }
        row.remotePID = Int(session.processID)
        row.applicationName = session.state.parameters["application_name"] ?? ""
        row.preparedStatements = session.state.statements.count
        row.received = receivedBytes
        row.queued = queuedBytes
        return row
    }
}
