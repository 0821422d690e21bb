import NIOCore

/// A command of the admin console (the `pooler` / `pgbouncer` virtual database).
public enum AdminCommand: Equatable, Sendable {
    case show(String)
    case pause(String?)
    case resume(String?)
    case reload
    case shutdown
    case empty

    /// Parses one statement; case and a trailing semicolon do not matter.
    public static func parse(_ sql: String) throws(PostgresError) -> AdminCommand {
        var text = Substring(sql)
        while let c = text.last, c == ";" || c.isWhitespace { text = text.dropLast() }
        let words = text.split(whereSeparator: { $0.isWhitespace }).map { String($0) }
        guard let verb = words.first?.uppercased() else { return .empty }
        let argument = words.count > 1 ? words[1] : nil
        switch (verb, words.count) {
        case ("SHOW", 2): return .show(words[1].uppercased())
        case ("PAUSE", 1...2): return .pause(argument)
        case ("RESUME", 1...2): return .resume(argument)
        case ("RELOAD", 1): return .reload
        case ("SHUTDOWN", 1): return .shutdown
        default:
            throw PostgresError(code: SQLState.syntaxError, message: "invalid command '\(text)', use SHOW HELP;")
        }
    }

    /// Whether users in stats_users (not admin_users) may run it.
    public var isReadOnly: Bool {
        if case .show = self { return true }
        return self == .empty
    }
}

/// A result set of the console: column names and text rows.
public struct AdminResult: Equatable, Sendable {
    public var columns: [String]
    public var rows: [[String?]]
    public var tag: String

    public init(columns: [String], rows: [[String?]], tag: String = "SHOW") {
        self.columns = columns
        self.rows = rows
        self.tag = tag
    }

    /// RowDescription, DataRows and CommandComplete.
    public func encode(into buffer: inout ByteBuffer) {
        Wire.rowDescription(columns, into: &buffer)
        for row in rows { Wire.dataRow(row, into: &buffer) }
        Wire.commandComplete(tag, into: &buffer)
    }
}

/// Client counts of a pool, kept by the runtime (the pool state machine knows only waiters).
public struct PoolClientCounts: Equatable, Sendable {
    public var active = 0
    public var waiting = 0
    public init(active: Int = 0, waiting: Int = 0) {
        self.active = active
        self.waiting = waiting
    }
}

/// The SHOW views, built from snapshots, with PgBouncer's column names and order.
public enum AdminViews {
    public static func pools(
        _ snapshots: [PoolSnapshot], clients: [PoolKey: PoolClientCounts], modes: [PoolKey: PoolMode]
    ) -> AdminResult {
        let columns = [
            "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
            "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
            "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts",
        ]
        let rows: [[String?]] = snapshots.sorted { ($0.key.database, $0.key.user) < ($1.key.database, $1.key.user) }
            .map { s in
                let c = clients[s.key] ?? PoolClientCounts()
                let waitUs = s.maxWait.nanoseconds / 1000
                return [
                    s.key.database, s.key.user, "\(c.active)", "\(s.waiting)", "0", "0",
                    "\(s.lent - s.checking)", "0", "0", "\(s.idle)", "0", "\(s.checking)", "\(s.connecting)",
                    "\(waitUs / 1_000_000)", "\(waitUs % 1_000_000)", (modes[s.key] ?? .transaction).rawValue, nil,
                ]
            }
        return AdminResult(columns: columns, rows: rows)
    }

    public static func lists(
        databases: Int, users: Int, pools: Int, clients: Int, serversUsed: Int, serversIdle: Int, serversLogin: Int
    ) -> AdminResult {
        let items: [(String, Int)] = [
            ("databases", databases), ("users", users), ("peers", 0), ("pools", pools), ("peer_pools", 0),
            ("free_clients", 0), ("used_clients", clients), ("login_clients", 0), ("free_servers", 0),
            ("used_servers", serversUsed + serversIdle + serversLogin), ("dns_names", 0), ("dns_zones", 0),
            ("dns_queries", 0), ("dns_pending", 0),
        ]
        return AdminResult(columns: ["list", "items"], rows: items.map { [$0.0, "\($0.1)"] })
    }

    public static func databases(_ config: Config, currentConnections: [String: Int]) -> AdminResult {
        let columns = [
            "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool_size",
            "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections", "current_connections",
            "max_client_connections", "current_client_connections", "paused", "disabled",
        ]
        let rows: [[String?]] = config.databases.keys.sorted().map { name in
            let d = config.databases[name]!
            return [
                name, d.host, "\(d.port)", d.dbname ?? name, d.user, "\(d.poolSize ?? config.global.defaultPoolSize)",
                "\(d.minPoolSize ?? config.global.minPoolSize)",
                "\(d.reservePoolSize ?? config.global.reservePoolSize)",
                "\(config.global.serverLifetime.nanoseconds / 1_000_000_000)", d.poolMode?.rawValue, nil,
                "\(d.maxDBConnections ?? config.global.maxDBConnections)", "\(currentConnections[name] ?? 0)", "0",
                "0", "0", "0",
            ]
        }
        return AdminResult(columns: columns, rows: rows)
    }

    public static func version(_ version: String) -> AdminResult {
        AdminResult(columns: ["version"], rows: [["Tidepool \(version)"]])
    }

    public static let helpText = [
        "SHOW HELP|POOLS|LISTS|DATABASES|CONFIG|VERSION", "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS",
        "PAUSE [<db>]", "RESUME [<db>]", "RELOAD",
    ]

    /// SHOW CONFIG: every setting with its value; secrets never appear.
    public static func config(_ settings: [(String, String)]) -> AdminResult {
        AdminResult(
            columns: ["key", "value", "default", "changeable"],
            rows: settings.sorted { $0.0 < $1.0 }.map { [$0.0, $0.1, nil, "no"] })
    }
}
