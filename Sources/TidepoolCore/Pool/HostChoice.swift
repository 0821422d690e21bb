/// Which host of a database entry's comma-separated `host` list a new server connection goes to,
/// as PgBouncer's `load_balance_hosts` decides it.
public enum LoadBalanceHosts: String, Sendable, CaseIterable {
    /// Each new connection takes the next host of the list.
    case roundRobin = "round-robin"
    /// New connections stay on one host until a connection to it fails, then move to the next.
    case disable
}

/// Which servers a database entry accepts (`target_session_attrs`), judged from what PostgreSQL
/// 14+ reports after login and connect_query: a server that does not match is closed and the next
/// connection tries the next host, so a host list with one primary finds it after a failover.
public enum TargetSessionAttrs: String, Sendable, CaseIterable {
    case any
    case readWrite = "read-write"
    case readOnly = "read-only"
    case primary, standby

    /// Why a server that reported `parameters` does not match, or nil when it does.
    public func mismatch(_ parameters: [String: String]) -> String? {
        guard self != .any else { return nil }
        let standby = parameters["in_hot_standby"]
        let readOnly = parameters["default_transaction_read_only"]
        let needed = self == .primary || self == .standby ? [standby] : [standby, readOnly]
        guard needed.allSatisfy({ $0 != nil }) else {
            return "server does not report in_hot_standby and default_transaction_read_only (PostgreSQL 14+ does)"
        }
        let matches =
            switch self {
            case .any: true
            case .readWrite: standby == "off" && readOnly == "off"
            case .readOnly: standby == "on" || readOnly == "on"
            case .primary: standby == "off"
            case .standby: standby == "on"
            }
        if matches { return nil }
        return "server is not \(rawValue) (in_hot_standby=\(standby!)"
            + (readOnly.map { ", default_transaction_read_only=\($0))" } ?? ")")
    }
}

/// The choice for one database: plain state, kept by the runtime per database entry.
public struct HostChoice: Sendable, Equatable {
    public let hosts: [String]
    public let mode: LoadBalanceHosts
    var next = 0

    public init(hosts: [String], mode: LoadBalanceHosts) {
        self.hosts = hosts.isEmpty ? [""] : hosts
        self.mode = mode
    }

    /// The host for the next connection.
    public mutating func pick() -> String {
        let host = hosts[next % hosts.count]
        if mode == .roundRobin { next = (next + 1) % hosts.count }
        return host
    }

    /// A connection to `host` could not be made: with `disable`, the next host is used from now on.
    public mutating func failed(_ host: String) {
        guard mode == .disable, hosts[next % hosts.count] == host else { return }
        next = (next + 1) % hosts.count
    }
}

extension DatabaseEntry {
    /// The `host` setting as a list (PgBouncer takes `host=a,b`); empty when it is not set.
    public var hosts: [String] {
        guard let host else { return [] }
        return host.split(separator: ",").map { String($0).trimmingWhitespace() }.filter { !$0.isEmpty }
    }
}
