import NIOCore

/// Server host names and their addresses, as PgBouncer keeps them: a name is looked up when a
/// server is first opened to it, the answer kept for `dns_max_ttl` (a failure for
/// `dns_nxdomain_ttl`) whatever TTL the records carry, and its addresses used in turn. Names in
/// use are looked up again when their time is up, and with `dns_zone_check_period` set, all the
/// names of a zone (what follows a name's first dot) as soon as its SOA serial changes. When an
/// answer drops an address, servers open to it are closed once released.
public struct DNSCache: Sendable {
    public struct Entry: Sendable {
        public var addresses: [String]
        /// Why the last lookup failed; nil when it answered.
        public var failure: String?
        public var expires: NIODeadline
        var next = 0
        var resolving = false
    }

    public enum Lookup: Equatable, Sendable {
        /// Connect to the first of these addresses that takes the connection (each lookup starts
        /// at the next one: round robin). With `refresh`, the entry's time is up: look the name
        /// up again (`resolved` or `failed` later), while this connect uses the old answer.
        case addresses([String], refresh: Bool)
        /// The last lookup failed, less than dns_nxdomain_ttl ago.
        case failed(String)
        /// Nothing known yet: look the name up; connects wait for its answer.
        case resolve
        /// A lookup is under way: wait for its answer.
        case wait
    }

    public private(set) var entries: [String: Entry] = [:]
    /// Each zone's last SOA serial (nil until one answer came).
    public private(set) var serials: [String: UInt32?] = [:]
    public var maxTTL: TimeAmount
    public var nxdomainTTL: TimeAmount
    public var zoneCheckPeriod: TimeAmount
    var nextZoneCheck: NIODeadline?

    public init(maxTTL: TimeAmount, nxdomainTTL: TimeAmount, zoneCheckPeriod: TimeAmount) {
        self.maxTTL = maxTTL
        self.nxdomainTTL = nxdomainTTL
        self.zoneCheckPeriod = zoneCheckPeriod
    }

    /// Where a new server to `host` goes.
    public mutating func lookup(_ host: String, now: NIODeadline) -> Lookup {
        guard var entry = entries[host] else {
            entries[host] = Entry(addresses: [], failure: nil, expires: now, resolving: true)
            if serials.index(forKey: Self.zone(of: host)) == nil {
                serials.updateValue(nil, forKey: Self.zone(of: host))
            }
            return .resolve
        }
        let expired = entry.expires <= now
        if entry.addresses.isEmpty {
            if let failure = entry.failure, !expired { return .failed(failure) }
            if entry.resolving { return .wait }  // looked up again: its answer decides
            entries[host]!.resolving = true
            return .resolve
        }
        let start = entry.next % entry.addresses.count
        let addresses = Array(entry.addresses[start...] + entry.addresses[..<start])
        entry.next = start + 1
        let refresh = expired && !entry.resolving
        if refresh { entry.resolving = true }
        entries[host] = entry
        return .addresses(addresses, refresh: refresh)
    }

    /// A lookup of `host` answered. Returns the addresses it had before that the answer left
    /// out: servers open to them are to be closed.
    public mutating func resolved(_ host: String, addresses: [String], now: NIODeadline) -> [String] {
        guard addresses.isEmpty == false else {
            failed(host, reason: "no address", now: now)
            return []
        }
        let before = entries[host]?.addresses ?? []
        entries[host] = Entry(addresses: addresses, failure: nil, expires: now + maxTTL)
        return before.filter { !addresses.contains($0) }
    }

    /// A lookup of `host` failed (no such name, no answer): connects to a name never resolved
    /// fail until dns_nxdomain_ttl has passed; a name that had addresses keeps them that long (a
    /// name server that does not answer for a moment must not stop new servers). Servers
    /// already open stay.
    public mutating func failed(_ host: String, reason: String, now: NIODeadline) {
        let kept = entries[host]?.addresses ?? []
        entries[host] = Entry(addresses: kept, failure: reason, expires: now + nxdomainTTL)
    }

    /// Names in use whose time is up: the janitor looks them up again (marked as under way).
    public mutating func due(now: NIODeadline) -> [String] {
        var hosts: [String] = []
        for (host, entry) in entries where entry.expires <= now && !entry.resolving && !entry.addresses.isEmpty {
            entries[host]!.resolving = true
            hosts.append(host)
        }
        return hosts.sorted()
    }

    /// Zones whose SOA serial is to be asked for now (every dns_zone_check_period; 0 = never).
    public mutating func zonesDue(now: NIODeadline) -> [String] {
        guard zoneCheckPeriod > .zero else { return [] }
        if let next = nextZoneCheck, next > now { return [] }
        nextZoneCheck = now + zoneCheckPeriod
        return serials.keys.filter { !$0.isEmpty }.sorted()
    }

    /// A zone's SOA serial arrived. Returns the names of the zone to look up again now (marked
    /// as under way): all of them when the serial changed, none the first time or when the same.
    public mutating func zoneSerial(_ zone: String, serial: UInt32) -> [String] {
        guard serials.keys.contains(zone) else { return [] }
        let before = serials[zone] ?? nil
        serials[zone] = serial
        guard let before, before != serial else { return [] }
        var hosts: [String] = []
        for (host, entry) in entries where Self.zone(of: host) == zone && !entry.resolving {
            entries[host]!.resolving = true
            hosts.append(host)
        }
        return hosts.sorted()
    }

    /// Drops names no database uses any more (RELOAD), and their zones when none is left.
    public mutating func keep(only hosts: Set<String>) {
        entries = entries.filter { hosts.contains($0.key) }
        let zones = Set(entries.keys.map(Self.zone(of:)))
        serials = serials.filter { zones.contains($0.key) }
    }

    /// Lookups under way (SHOW LISTS dns_queries).
    public var pending: Int { entries.values.filter(\.resolving).count }

    /// The zone of a name, as PgBouncer forms it: what follows the first dot ("" for none).
    public static func zone(of host: String) -> String {
        guard let dot = host.firstIndex(of: ".") else { return "" }
        return String(host[host.index(after: dot)...])
    }

    /// Whether a host is written as an address (no lookup) rather than a name.
    public static func isAddress(_ host: String) -> Bool {
        if host.contains(":") { return true }
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts.allSatisfy { UInt8($0) != nil }
    }

    /// SHOW DNS_HOSTS rows: hostname, seconds its answer is still kept, addresses.
    public func hostRows(now: NIODeadline) -> [(host: String, ttl: Int64, addresses: String)] {
        entries.keys.sorted().map { host in
            let entry = entries[host]!
            let ttl = max(0, (entry.expires - now).nanoseconds / 1_000_000_000)
            return (host, ttl, entry.addresses.joined(separator: ","))
        }
    }

    /// SHOW DNS_ZONES rows: zone, last serial (0 before one came), how many names are in it.
    public func zoneRows() -> [(zone: String, serial: Int64, count: Int)] {
        serials.keys.filter { !$0.isEmpty }.sorted().map { zone in
            (zone, Int64((serials[zone] ?? nil) ?? 0), entries.keys.filter { Self.zone(of: $0) == zone }.count)
        }
    }
}
