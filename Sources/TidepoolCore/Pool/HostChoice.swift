/// Which host of a database entry's comma-separated `host` list a new server connection goes to,
/// as PgBouncer's `load_balance_hosts` decides it.
public enum LoadBalanceHosts: String, Sendable, CaseIterable {
    /// Each new connection takes the next host of the list.
    case roundRobin = "round-robin"
    /// New connections stay on one host until a connection to it fails, then move to the next.
    case disable
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
