/// Every metric family `/metrics` shows, with its type and help text: each is in every scrape from
/// the first one (with no samples until it has some), so dashboards and alerts find it, and
/// `promtool check metrics` finds a `# HELP` for each. Times are in seconds, Prometheus's base unit.
public enum MetricFamilies {
    public enum Kind: String, Sendable {
        case counter, gauge, histogram
    }

    public struct Family: Sendable {
        public var name: String
        public var kind: Kind
        public var help: String
    }

    public static let all: [Family] = [
        Family(name: "tidepool_info", kind: .gauge, help: "Always 1; the version and instance_id as labels."),
        Family(name: "tidepool_clients_active", kind: .gauge, help: "Clients of a pool not waiting for a server."),
        Family(name: "tidepool_clients_waiting", kind: .gauge, help: "Clients of a pool queued for a server."),
        Family(
            name: "tidepool_clients_pinned", kind: .gauge,
            help: "Clients kept on their server by session state that cannot be replayed."),
        Family(name: "tidepool_servers_active", kind: .gauge, help: "Servers of a pool lent to a client."),
        Family(name: "tidepool_servers_idle", kind: .gauge, help: "Servers of a pool ready to be lent."),
        Family(name: "tidepool_servers_used", kind: .gauge, help: "Servers waiting for a check (always 0 here)."),
        Family(name: "tidepool_servers_tested", kind: .gauge, help: "Servers of a pool being checked."),
        Family(name: "tidepool_servers_login", kind: .gauge, help: "Servers of a pool logging in."),
        Family(
            name: "tidepool_max_wait_seconds", kind: .gauge,
            help: "How long the oldest client of a pool has waited for a server."),
        Family(name: "tidepool_buffered_bytes", kind: .gauge, help: "Bytes buffered by the pooler, by side."),
        Family(
            name: "tidepool_buffered_bytes_largest", kind: .gauge,
            help: "The most bytes buffered for one connection, by side."),
        Family(name: "tidepool_server_assignments_total", kind: .counter, help: "Servers lent to clients."),
        Family(name: "tidepool_transactions_total", kind: .counter, help: "Transactions completed."),
        Family(name: "tidepool_queries_total", kind: .counter, help: "Queries completed."),
        Family(name: "tidepool_received_bytes_total", kind: .counter, help: "Bytes received from clients."),
        Family(name: "tidepool_sent_bytes_total", kind: .counter, help: "Bytes sent to clients."),
        Family(
            name: "tidepool_transaction_time_seconds_total", kind: .counter,
            help: "Time spent in transactions, in seconds."),
        Family(name: "tidepool_query_time_seconds_total", kind: .counter, help: "Time spent in queries, in seconds."),
        Family(
            name: "tidepool_wait_time_seconds_total", kind: .counter,
            help: "Time clients spent waiting for a server, in seconds."),
        Family(
            name: "tidepool_client_parses_total", kind: .counter,
            help: "Parse messages of named statements from clients."),
        Family(name: "tidepool_server_parses_total", kind: .counter, help: "Parse messages the pooler sent servers."),
        Family(name: "tidepool_binds_total", kind: .counter, help: "Bind messages of named statements."),
        Family(name: "tidepool_preping_failures_total", kind: .counter, help: "Servers that failed their check."),
        Family(name: "tidepool_recycled_servers_total", kind: .counter, help: "Servers closed for age or idleness."),
        Family(name: "tidepool_reserve_uses_total", kind: .counter, help: "Servers opened from the reserve pool."),
        Family(
            name: "tidepool_pool_timeouts_total", kind: .counter, help: "Clients that waited past query_wait_timeout."),
        Family(
            name: "tidepool_errors_total", kind: .counter, help: "Errors the pooler itself sent clients, by SQLSTATE."),
        Family(name: "tidepool_pins_total", kind: .counter, help: "Clients pinned to their server, by reason."),
        Family(
            name: "tidepool_replayed_settings_total", kind: .counter,
            help: "Settings made again on a server for the client it was lent to."),
        Family(
            name: "tidepool_listener_reconnects_total", kind: .counter,
            help: "Times a pool's LISTEN connection was opened again."),
        Family(
            name: "tidepool_notifications_delivered_total", kind: .counter,
            help: "Notifications handed to listening clients."),
        Family(
            name: "tidepool_notifications_dropped_total", kind: .counter,
            help: "Notifications dropped for clients that did not read them."),
        Family(name: "tidepool_wait_time_seconds", kind: .histogram, help: "Time clients waited for a server."),
        Family(name: "tidepool_transaction_time_seconds", kind: .histogram, help: "Transaction durations."),
        Family(name: "tidepool_query_time_seconds", kind: .histogram, help: "Query durations."),
    ]

    static let byName = Dictionary(uniqueKeysWithValues: all.map { ($0.name, $0) })

    /// The registry's text with a `# HELP` before each family's `# TYPE`, and the families that
    /// have no samples yet as their `# HELP` and `# TYPE` lines.
    public static func documented(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count + 4096)
        var seen = Set<String>()
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("# TYPE ") {
                let name = String(line.dropFirst(7).prefix { $0 != " " })
                seen.insert(name)
                if let family = byName[name] { out += "# HELP \(name) \(family.help)\n" }
            } else if line.hasPrefix("# HELP ") {
                continue  // ours replace any
            }
            out += line
            out += "\n"
        }
        while out.hasSuffix("\n\n") { out.removeLast() }
        for family in all where !seen.contains(family.name) {
            out += "# HELP \(family.name) \(family.help)\n# TYPE \(family.name) \(family.kind.rawValue)\n"
        }
        return out
    }
}
