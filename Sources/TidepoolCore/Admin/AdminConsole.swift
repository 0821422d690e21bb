import Foundation
import NIOCore

/// A command of the admin console (the `pooler` / `pgbouncer` virtual database).
public enum AdminCommand: Equatable, Sendable {
    case show(String)
    case pause(String?)
    case resume(String?)
    case reload
    case shutdown(ShutdownMode)
    case suspend
    case disable(String)
    case enable(String)
    case reconnect(String?)
    case kill(String?)
    case killClient(String)
    case waitClose(String?)
    case set(key: String, value: String)
    case empty

    public enum ShutdownMode: Equatable, Sendable {
        /// At once (SIGQUIT).
        case immediate
        /// Once every server in use is back (SIGINT).
        case waitForServers
        /// Once every client has left (SIGTERM).
        case waitForClients
    }

    /// Parses one statement; case and a trailing semicolon do not matter.
    public static func parse(_ sql: String) throws(PostgresError) -> AdminCommand {
        var text = Substring(sql)
        while let c = text.last, c == ";" || c.isWhitespace { text = text.dropLast() }
        let words = text.split(whereSeparator: { $0.isWhitespace }).map { String($0) }
        guard let verb = words.first?.uppercased() else { return .empty }
        let argument = words.count > 1 ? words[1] : nil
        if verb == "SET" { return try parseSet(text.dropFirst(3)) }
        switch (verb, words.count) {
        case ("SHOW", 2): return .show(words[1].uppercased())
        case ("PAUSE", 1...2): return .pause(argument)
        case ("RESUME", 1...2): return .resume(argument)
        case ("RELOAD", 1): return .reload
        case ("SHUTDOWN", 1): return .shutdown(.immediate)
        case ("SHUTDOWN", 2) where argument!.uppercased() == "WAIT_FOR_SERVERS": return .shutdown(.waitForServers)
        case ("SHUTDOWN", 2) where argument!.uppercased() == "WAIT_FOR_CLIENTS": return .shutdown(.waitForClients)
        case ("SUSPEND", 1): return .suspend
        case ("DISABLE", 2): return .disable(argument!)
        case ("ENABLE", 2): return .enable(argument!)
        case ("RECONNECT", 1...2): return .reconnect(argument)
        case ("KILL", 1...2): return .kill(argument)
        case ("KILL_CLIENT", 2): return .killClient(argument!)
        case ("WAIT_CLOSE", 1...2): return .waitClose(argument)
        default:
            throw PostgresError(code: SQLState.syntaxError, message: "invalid command '\(text)', use SHOW HELP;")
        }
    }

    /// `SET key = value` (or `key TO value`); the value may be quoted with single quotes.
    static func parseSet(_ rest: Substring) throws(PostgresError) -> AdminCommand {
        let text = rest.trimmingSpaces
        let separator = text.firstIndex(of: "=")
        var key: Substring
        var value: Substring
        if let separator {
            key = text[..<separator]
            value = text[text.index(after: separator)...]
        } else if let range = text.range(of: " to ", options: .caseInsensitive) {
            key = text[..<range.lowerBound]
            value = text[range.upperBound...]
        } else {
            throw PostgresError(code: SQLState.syntaxError, message: "expected SET key = value")
        }
        key = key.trimmingSpaces
        value = value.trimmingSpaces
        if value.count >= 2, value.first == "'", value.last == "'" {
            value = value.dropFirst().dropLast()
        }
        guard !key.isEmpty, !key.contains(" ") else {
            throw PostgresError(code: SQLState.syntaxError, message: "expected SET key = value")
        }
        return .set(key: key.lowercased(), value: String(value).replacingDoubledQuotes)
    }

    /// Whether users in stats_users (not admin_users) may run it. SHOW FDS (sockets and their
    /// parameters) is for admin users, as in PgBouncer.
    public var isReadOnly: Bool {
        if case .show(let what) = self { return what != "FDS" }
        return self == .empty
    }
}

/// A result set of the console: column names and types, and rows in text form.
public struct AdminResult: Equatable, Sendable {
    public typealias ColumnType = Wire.ColumnType

    public var columns: [String]
    /// One per column, as PgBouncer types them (counts int4, statistics numeric, the rest text), so
    /// that a typed driver reads numbers as numbers. Every value of a number column is a number or
    /// NULL.
    public var types: [ColumnType]
    public var rows: [[String?]]
    public var tag: String

    /// `types` defaults to text for every column.
    public init(columns: [String], types: [ColumnType]? = nil, rows: [[String?]], tag: String = "SHOW") {
        assert(types == nil || types!.count == columns.count, "one type per column")
        self.columns = columns
        self.types = types ?? Array(repeating: .text, count: columns.count)
        self.rows = rows
        self.tag = tag
    }

    /// RowDescription, DataRows and CommandComplete; a command without columns only CommandComplete.
    public func encode(into buffer: inout ByteBuffer) {
        // A command (SET, RECONNECT...) answers with its tag alone.
        if !columns.isEmpty || !rows.isEmpty { Wire.rowDescription(columns, types: types, into: &buffer) }
        for row in rows { Wire.dataRow(row, into: &buffer) }
        Wire.commandComplete(tag, into: &buffer)
    }
}

/// Client counts of a pool, kept by the runtime (the pool state machine knows only waiters).
public struct PoolClientCounts: Equatable, Sendable {
    public var active = 0
    public var waiting = 0
    /// Keeping their server for session state.
    public var pinned = 0
    public init(active: Int = 0, waiting: Int = 0, pinned: Int = 0) {
        self.active = active
        self.waiting = waiting
        self.pinned = pinned
    }
}

/// The SHOW views, built from snapshots, with PgBouncer's column names and order.
public enum AdminViews {
    public static func pools(
        _ snapshots: [PoolSnapshot], clients: [PoolKey: PoolClientCounts], modes: [PoolKey: PoolMode],
        console: (database: String, clients: Int)? = nil
    ) -> AdminResult {
        let columns = [
            "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
            "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
            "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts", "cl_pinned",
        ]
        var all = snapshots
        if let console {
            all.append(
                PoolSnapshot(
                    key: PoolKey(database: console.database, user: console.database), waiting: 0, lent: 0, idle: 0,
                    connecting: 0, maxWait: .zero, settings: PoolSettings(poolSize: 2)))
        }
        let rows: [[String?]] = all.sorted { ($0.key.database, $0.key.user) < ($1.key.database, $1.key.user) }
            .map { s in
                if let console, s.key.database == console.database, s.key.user == console.database {
                    return [s.key.database, s.key.user, "\(console.clients)"] + Array(repeating: "0", count: 12)
                        + ["statement", nil, "0"]
                }
                let c = clients[s.key] ?? PoolClientCounts()
                let waitUs = s.maxWait.nanoseconds / 1000
                return [
                    s.key.database, s.key.user, "\(c.active)", "\(s.waiting)", "0", "0",
                    "\(s.lent - s.checking)", "0", "0", "\(s.idle)", "0", "\(s.checking)", "\(s.connecting)",
                    "\(waitUs / 1_000_000)", "\(waitUs % 1_000_000)", (modes[s.key] ?? .transaction).rawValue, nil,
                    "\(c.pinned)",
                ]
            }
        let types =
            [.text, .text] + Array(repeating: .int4, count: 13) + [.text, .text, .int4] as [AdminResult.ColumnType]
        return AdminResult(columns: columns, types: types, rows: rows)
    }

    /// SHOW LISTS' users: every user the pooler knows, as PgBouncer counts its user objects: those
    /// of auth_file and [users], and any other user with a pool (auth_query, a forced user).
    public static func knownUsers<A: Sequence<String>, B: Sequence<String>, C: Sequence<String>>(
        configured: A, authFile: B, pools: C
    ) -> Int {
        var users = Set(configured)
        users.formUnion(authFile)
        users.formUnion(pools)
        return users.count
    }

    public static func lists(
        databases: Int, users: Int, pools: Int, clients: Int, serversUsed: Int, serversIdle: Int, serversLogin: Int,
        peers: Int = 0, peerPools: Int = 0, dnsNames: Int = 0, dnsZones: Int = 0, dnsQueries: Int = 0
    ) -> AdminResult {
        let items: [(String, Int)] = [
            ("databases", databases), ("users", users), ("peers", peers), ("pools", pools), ("peer_pools", peerPools),
            ("free_clients", 0), ("used_clients", clients), ("login_clients", 0), ("free_servers", 0),
            ("used_servers", serversUsed + serversIdle + serversLogin), ("dns_names", dnsNames),
            ("dns_zones", dnsZones), ("dns_queries", dnsQueries), ("dns_pending", 0),
        ]
        return AdminResult(columns: ["list", "items"], types: [.text, .int4], rows: items.map { [$0.0, "\($0.1)"] })
    }

    /// The admin console's own database, as PgBouncer lists it in SHOW DATABASES, POOLS and STATS
    /// (exporters expect its rows); nil when a real database takes the name.
    public static func consoleDatabase(_ config: Config) -> String? {
        ClientSession.isAdminConsole("pgbouncer", config: config) ? "pgbouncer" : nil
    }

    public static func databases(
        _ config: Config, currentConnections: [String: Int], clients: [String: Int] = [:], paused: Set<String> = [],
        disabled: Set<String> = [], consoleClients: Int = 0
    ) -> AdminResult {
        let columns = [
            "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool_size",
            "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections", "current_connections",
            "max_client_connections", "current_client_connections", "paused", "disabled",
        ]
        var rows: [[String?]] = config.databases.keys.sorted().map { name in
            let d = config.databases[name]!
            return [
                name, d.host, "\(d.port)", d.dbname ?? name, d.user, "\(d.poolSize ?? config.global.defaultPoolSize)",
                "\(d.minPoolSize ?? config.global.minPoolSize)",
                "\(d.reservePoolSize ?? config.global.reservePoolSize)",
                "\((d.serverLifetime ?? config.global.serverLifetime).nanoseconds / 1_000_000_000)",
                d.poolMode?.rawValue, (d.loadBalanceHosts ?? .roundRobin).rawValue,
                "\(d.maxDBConnections ?? config.global.maxDBConnections)", "\(currentConnections[name] ?? 0)",
                "\(d.maxDBClientConnections ?? config.global.maxDBClientConnections)", "\(clients[name] ?? 0)",
                paused.contains(name) ? "1" : "0", disabled.contains(name) ? "1" : "0",
            ]
        }
        if let console = consoleDatabase(config) {
            rows.append([
                console, nil, "\(config.global.listenPort)", console, console, "2", "0", "0", "0", "statement", nil,
                "0",
                "0", "0", "\(consoleClients)", "0", "0",
            ])
            rows.sort { ($0[0] ?? "") < ($1[0] ?? "") }
        }
        let types: [AdminResult.ColumnType] =
            [.text, .text, .int4, .text, .text, .int4, .int4, .int4, .int4, .text, .text]
            + Array(repeating: .int4, count: 6)
        return AdminResult(columns: columns, types: types, rows: rows)
    }

    /// SHOW LISTENS: each channel a pool's listener listens on for its clients.
    public static func listens(_ rows: [(PoolKey, String, Int)]) -> AdminResult {
        let sorted = rows.sorted { ($0.0.database, $0.0.user, $0.1) < ($1.0.database, $1.0.user, $1.1) }
        return AdminResult(
            columns: ["database", "user", "channel", "clients"], types: [.text, .text, .text, .int4],
            rows: sorted.map { [$0.0.database, $0.0.user, $0.1, String($0.2)] })
    }

    public static func version(_ version: String) -> AdminResult {
        AdminResult(columns: ["version"], rows: [["Tidepool \(version)"]])
    }

    public static let helpText = [
        "SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION",
        "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS",
        "SHOW LATENCY|LISTS|LISTENS|STATE|MEM", "SHOW SOCKETS|ACTIVE_SOCKETS|DNS_HOSTS|DNS_ZONES|PEERS|PEER_POOLS",
        "SET key = arg",
        "RELOAD", "PAUSE [<db>]", "RESUME [<db>]",
        "DISABLE <db>",
        "ENABLE <db>", "RECONNECT [<db>]", "KILL [<db>]", "KILL_CLIENT <id>", "SUSPEND", "SHUTDOWN",
        "SHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS", "WAIT_CLOSE [<db>]",
    ]

    /// SHOW CONFIG: every setting with its value; secrets never appear.
    public static func config(_ settings: [(String, String, String, Bool)]) -> AdminResult {
        AdminResult(
            columns: ["key", "value", "default", "changeable"],
            rows: settings.sorted { $0.0 < $1.0 }.map { [$0.0, $0.1, $0.2, $0.3 ? "yes" : "no"] })
    }
}

extension Substring {
    var trimmingSpaces: Substring {
        var s = self
        while let c = s.first, c.isWhitespace { s = s.dropFirst() }
        while let c = s.last, c.isWhitespace { s = s.dropLast() }
        return s
    }
}

extension String {
    var replacingDoubledQuotes: String {
        var out = ""
        var previousQuote = false
        for c in self {
            if c == "'", previousQuote {
                previousQuote = false
                continue
            }
            previousQuote = c == "'"
            out.append(c)
        }
        return out
    }
}

/// One client or server connection as SHOW CLIENTS and SHOW SERVERS list it.
public struct ConnectionRow: Sendable, Equatable {
    public var user = ""
    public var database = ""
    /// none, physical or logical.
    public var replication = "none"
    /// active, waiting, idle, used, tested, login...
    public var state = ""
    public var address = ""
    public var port = 0
    public var localAddress = ""
    public var localPort = 0
    /// Seconds since the epoch.
    public var connectTime = 0.0
    public var requestTime = 0.0
    public var waitMicroseconds = 0
    public var closeNeeded = false
    public var id = ""
    /// The id of the connection at the other end of the link, if any.
    public var link = ""
    public var remotePID = 0
    public var applicationName = ""
    public var preparedStatements = 0
    /// The client keeps its server for session state (`SessionState`), and why.
    public var pinned = false
    public var pinReason = ""
    /// Bytes read from the connection and not yet passed on, and bytes queued toward it.
    public var received = 0
    public var queued = 0

    public init() {}
}

extension AdminViews {
    static let connectionColumns = [
        "type", "user", "database", "replication", "state", "addr", "port", "local_addr", "local_port",
        "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls",
        "application_name", "prepared_statements", "id", "pinned", "pin_reason",
    ]
    static let connectionTypes: [AdminResult.ColumnType] = [
        .text, .text, .text, .text, .text, .text, .int4, .text, .int4, .text, .text, .int4, .int4, .int4, .text,
        .text, .int4, .text, .text, .int4, .int8, .int4, .text,
    ]

    static func timestamp(_ seconds: Double) -> String {
        guard seconds > 0 else { return "" }
        let date = Date(timeIntervalSince1970: seconds)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss 'UTC'"
        return formatter.string(from: date)
    }

    /// SHOW CLIENTS (type C) and SHOW SERVERS (type S), PgBouncer 1.25's columns.
    public static func connections(_ rows: [ConnectionRow], type: String) -> AdminResult {
        AdminResult(
            columns: connectionColumns, types: connectionTypes,
            rows: sortedConnections(rows).map { r in
                pgbouncerFields(r, type: type, state: r.state) + [r.pinned ? "1" : "0", r.pinReason]
            })
    }

    static func sortedConnections(_ rows: [ConnectionRow]) -> [ConnectionRow] {
        rows.sorted { ($0.database, $0.user, $0.id) < ($1.database, $1.user, $1.id) }
    }

    /// The fields of SHOW CLIENTS, SERVERS and SOCKETS that PgBouncer has, in its order.
    static func pgbouncerFields(_ r: ConnectionRow, type: String, state: String) -> [String?] {
        [
            type, r.user, r.database, r.replication, state, r.address, "\(r.port)", r.localAddress,
            "\(r.localPort)", timestamp(r.connectTime), timestamp(r.requestTime),
            "\(r.waitMicroseconds / 1_000_000)", "\(r.waitMicroseconds % 1_000_000)", r.closeNeeded ? "1" : "0",
            "\(type)-\(r.id)", r.link.isEmpty ? nil : r.link, "\(r.remotePID)", nil, r.applicationName,
            "\(r.preparedStatements)", r.id.isEmpty ? nil : r.id,
        ]
    }

    /// SHOW SOCKETS and SHOW ACTIVE_SOCKETS: clients and servers with PgBouncer's internal state
    /// names (cl_active, sv_idle...) and its buffer columns, then Tidepool's. Tidepool passes bytes
    /// on as it parses them, so there is no parsed-but-unsent part: recv_pos, pkt_avail and
    /// send_avail are all the bytes read and not passed on, the positions 0, and what is queued
    /// toward the connection goes in send_queued. ACTIVE_SOCKETS lists the sockets holding bytes.
    public static func sockets(clients: [ConnectionRow], servers: [ConnectionRow], activeOnly: Bool) -> AdminResult {
        let standard = connectionColumns.count - 2  // without pinned, pin_reason
        let columns =
            connectionColumns.prefix(standard) + [
                "recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail",
                "send_queued", "pinned", "pin_reason",
            ]
        let types = connectionTypes.prefix(standard) + Array(repeating: .int4, count: 9) + [.text]
        func rows(_ list: [ConnectionRow], type: String, prefix: String) -> [[String?]] {
            sortedConnections(activeOnly ? list.filter { $0.received > 0 || $0.queued > 0 } : list).map { r in
                let buffers = [r.received, 0, 0, 0, 0, r.received, r.received, r.queued]
                return pgbouncerFields(r, type: type, state: "\(prefix)_\(r.state)") + buffers.map { "\($0)" }
                    + [r.pinned ? "1" : "0", r.pinReason]
            }
        }
        return AdminResult(
            columns: Array(columns), types: Array(types),
            rows: rows(clients, type: "C", prefix: "cl") + rows(servers, type: "S", prefix: "sv"))
    }

    /// SHOW FDS in PgBouncer's columns: the listening sockets, then every client and server
    /// connection. Tidepool hands no sockets to another process (PgBouncer's online restart), so
    /// the descriptor and the columns that go with a handover are NULL.
    public static func fds(
        listeners: [(address: String, port: Int)], clients: [ConnectionRow], servers: [ConnectionRow]
    )
        -> AdminResult
    {
        let columns = [
            "fd", "task", "user", "database", "addr", "port", "cancel", "link", "client_encoding", "std_strings",
            "datestyle", "timezone", "password", "scram_client_key", "scram_server_key",
        ]
        let types: [AdminResult.ColumnType] = [
            .int4, .text, .text, .text, .text, .int4, .int8, .int4, .text, .text, .text, .text, .text, .text, .text,
        ]
        var rows: [[String?]] = listeners.map { [nil, "pooler", nil, nil, $0.address, "\($0.port)", "0", "0"] }
        for (task, list) in [("client", clients), ("server", servers)] {
            rows += sortedConnections(list).map { r in
                [nil, task, r.user, r.database, r.address, "\(r.port)", "0", nil]
            }
        }
        return AdminResult(
            columns: columns, types: types,
            rows: rows.map { $0 + Array(repeating: nil, count: columns.count - $0.count) })
    }

    /// SHOW PEERS: the [peers] entries.
    public static func peers(_ config: Config) -> AdminResult {
        AdminResult(
            columns: ["peer_id", "host", "port", "pool_size"], types: [.int4, .text, .int4, .int4],
            rows: config.peers.values.sorted { $0.id < $1.id }.map { p in
                ["\(p.id)", p.host, "\(p.port)", "\(config.poolSize(peer: p))"]
            })
    }

    /// SHOW PEER_POOLS: one row per [peers] entry, with the cancel requests passed on to it in
    /// flight and those queued behind its pool_size.
    public static func peerPools(_ config: Config, cancels: [Int: (sending: Int, queued: Int)]) -> AdminResult {
        AdminResult(
            columns: ["database", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"],
            types: [.text, .int4, .int4, .int4, .int4],
            rows: config.peers.keys.sorted().map { id in
                let p = cancels[id] ?? (0, 0)
                return ["\(id)", "\(p.sending)", "\(p.queued)", "\(p.sending)", "0"]
            })
    }

    /// SHOW DNS_HOSTS and SHOW DNS_ZONES: PgBouncer's columns, from the DNS cache (host names
    /// written as addresses are never looked up, so never listed).
    public static func dnsHosts(_ cache: DNSCache, now: NIODeadline) -> AdminResult {
        AdminResult(
            columns: ["hostname", "ttl", "addrs"], types: [.text, .int8, .text],
            rows: cache.hostRows(now: now).map { [$0.host, "\($0.ttl)", $0.addresses] })
    }

    public static func dnsZones(_ cache: DNSCache) -> AdminResult {
        AdminResult(
            columns: ["zonename", "serial", "count"], types: [.text, .int8, .int4],
            rows: cache.zoneRows().map { [$0.zone, "\($0.serial)", "\($0.count)"] })
    }

    /// SHOW USERS: every user the pooler knows, as PgBouncer lists them: the [users] entries, the
    /// auth file's users, the console's users (admin_users, stats_users, `pgbouncer`) and every
    /// user with a pool or clients.
    public static func users(
        _ config: Config, poolUsers: [String], serverConnections: [String: Int], clients: [String: Int] = [:],
        authFileUsers: [String] = []
    ) -> AdminResult {
        let columns = [
            "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections", "current_connections",
            "max_user_client_connections", "current_client_connections",
        ]
        let names = Set(config.users.keys).union(poolUsers).union(clients.filter { $0.value > 0 }.keys)
            .union(authFileUsers).union(config.global.adminUsers).union(config.global.statsUsers).union(["pgbouncer"])
            .sorted()
        let rows: [[String?]] = names.map { name in
            let u = config.users[name]
            return [
                name, u?.poolSize.map { "\($0)" }, u?.reservePoolSize.map { "\($0)" },
                (u?.poolMode ?? config.global.poolMode).rawValue,
                "\(u?.maxUserConnections ?? config.global.maxUserConnections)", "\(serverConnections[name] ?? 0)",
                "\(config.maxUserClientConnections(user: name))", "\(clients[name] ?? 0)",
            ]
        }
        let types: [AdminResult.ColumnType] = [.text, .int4, .int4, .text, .int4, .int4, .int4, .int4]
        return AdminResult(columns: columns, types: types, rows: rows)
    }

    /// SHOW STATE: whether the pooler is active, paused or suspended, and which instance this is.
    public static func state(paused: Bool, suspended: Bool, instanceID: String, uptimeSeconds: Int) -> AdminResult {
        let rows: [[String?]] = [
            ["active", !paused && !suspended ? "yes" : "no"], ["paused", paused ? "yes" : "no"],
            ["suspended", suspended ? "yes" : "no"], ["instance_id", instanceID], ["uptime", "\(uptimeSeconds)"],
        ]
        return AdminResult(columns: ["key", "value"], rows: rows)
    }

    /// SHOW MEM: Tidepool's own figures in PgBouncer's columns (name, size, used, free, memtotal).
    /// `total` is size × used unless given (buffers: size is the largest one, total their sum).
    public static func memory(_ items: [(name: String, size: Int, used: Int, total: Int?)]) -> AdminResult {
        AdminResult(
            columns: ["name", "size", "used", "free", "memtotal"], types: [.text, .int8, .int8, .int8, .int8],
            rows: items.map { [$0.name, "\($0.size)", "\($0.used)", "0", "\($0.total ?? $0.size * $0.used)"] })
    }
}

/// A client of the admin console: what each message it sends leads to. The console speaks the
/// simple query protocol; a stats_users user gets the read-only commands only.
public enum AdminConsoleSession {
    public enum Step: Equatable {
        /// Run the command and send `answer(_:)` of its result.
        case run(AdminCommand)
        /// Send this at once.
        case reply(ByteBuffer)
        case terminate
        /// Nothing yet (extended-protocol messages are answered at their Sync).
        case none
    }

    public static func receive(type: UInt8, body: ByteBuffer, readOnly: Bool) -> Step {
        switch type {
        case MessageType.terminate:
            return .terminate
        case MessageType.query:
            do throws(PostgresError) {
                let command = try AdminCommand.parse(WireDecode.queryText(body) ?? "")
                if readOnly, !command.isReadOnly {
                    throw PostgresError(
                        code: SQLState.insufficientPrivilege, message: "admin command requires an admin_users user")
                }
                return .run(command)
            } catch {
                return .reply(answer(.failure(error)))
            }
        case MessageType.sync:
            return .reply(
                answer(
                    .failure(
                        PostgresError(
                            code: SQLState.featureNotSupported,
                            message: "the admin console speaks the simple query protocol only"))))
        default:
            return .none
        }
    }

    /// A command's result (or its error) and ReadyForQuery.
    public static func answer(_ result: Result<AdminResult, Error>) -> ByteBuffer {
        var reply = ByteBufferAllocator().buffer(capacity: 1024)
        switch result {
        case .success(let table):
            if table.tag.isEmpty { Wire.emptyQueryResponse(into: &reply) } else { table.encode(into: &reply) }
        case .failure(let error):
            var e = error as? PostgresError ?? PostgresError(code: SQLState.internalError, message: "\(error)")
            // PgBouncer answers every console error with 08P01, and tools (pgcli) recognise the
            // console by it; the message says which error it is.
            e.code = SQLState.protocolViolation
            Wire.errorResponse(e, into: &reply)
        }
        Wire.readyForQuery(.idle, into: &reply)
        return reply
    }

    /// What a console message counts for SHOW STATS (the console's own row, as PgBouncer counts
    /// it): one query and transaction per Query, the bytes each way.
    public static func traffic(received: Int, sent: Int) -> TrafficStats {
        var t = TrafficStats()
        t.transactions = 1
        t.queries = 1
        t.received = received
        t.sent = sent
        return t
    }
}

/// Rules of the console's control commands that do not need the runtime.
public enum AdminRules {
    /// Why RESUME (of `database`, or of everything) is refused, in PgBouncer's words; nil when it
    /// may go ahead. `paused`: that database is paused by name, or (no database) everything is.
    public static func resumeRefusal(
        database: String?, paused: Bool, suspended: Bool, shuttingDown: Bool
    ) -> PostgresError? {
        if shuttingDown {
            return PostgresError(code: SQLState.objectNotInPrerequisiteState, message: "pooler is shutting down")
        }
        if let database {
            guard paused else {
                return PostgresError(
                    code: SQLState.objectNotInPrerequisiteState, message: "database \(database) is not paused")
            }
        } else if !paused && !suspended {
            return PostgresError(
                code: SQLState.objectNotInPrerequisiteState, message: "pooler is not paused/suspended")
        }
        return nil
    }
}
