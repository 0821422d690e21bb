/// Client authentication rules in pg_hba.conf's format (auth_hba_file, auth_type = hba): the
/// first line matching the connection type, database, user and address picks the method.
public struct HBARules: Equatable, Sendable {
    public enum ConnectionType: String, Sendable {
        case local, host, hostssl, hostnossl
    }

    public enum Method: String, Sendable, CaseIterable {
        case trust, reject, md5, password, cert, peer
        case scramSHA256 = "scram-sha-256"
    }

    /// An address range: the network's bytes and how many leading bits must match.
    public struct Network: Equatable, Sendable {
        public var bytes: [UInt8]
        public var prefix: Int

        public func contains(_ address: [UInt8]) -> Bool {
            guard address.count == bytes.count else { return false }
            var bits = prefix
            for (a, b) in zip(address, bytes) {
                guard bits > 0 else { return true }
                let mask: UInt8 = bits >= 8 ? 0xFF : ~(0xFF >> UInt8(bits))
                if a & mask != b & mask { return false }
                bits -= 8
            }
            return true
        }
    }

    public struct Rule: Equatable, Sendable {
        public var type: ConnectionType
        /// nil means all.
        public var databases: [String]?
        public var users: [String]?
        /// nil means all addresses (and always for local).
        public var network: Network?
        public var method: Method
        public var line: Int
        /// The `name=value` options after the method (`map` for peer).
        public var options: [String: String] = [:]
    }

    public var rules: [Rule] = []

    public init(rules: [Rule] = []) { self.rules = rules }

    /// The method for a connection, or nil when no line matches (refused, like PostgreSQL).
    /// `address` is the client's IPv4 (4 bytes) or IPv6 (16 bytes) address; nil for a Unix socket.
    public func method(database: String, user: String, address: [UInt8]?, tls: Bool) -> Rule? {
        rules.first { rule in
            switch rule.type {
            case .local: guard address == nil else { return false }
            case .host: guard address != nil else { return false }
            case .hostssl: guard address != nil, tls else { return false }
            case .hostnossl: guard address != nil, !tls else { return false }
            }
            if let databases = rule.databases {
                guard
                    databases.contains(database) || (databases.contains("sameuser") && database == user)
                        || (Self.consoleNames.contains(database)
                            && databases.contains(where: Self.consoleNames.contains))
                else {
                    return false
                }
            }
            if let users = rule.users, !users.contains(user) { return false }
            if let network = rule.network, let address, !network.contains(address) { return false }
            return true
        }
    }

    /// The admin console answers to both names: a rule for one is a rule for the other.
    static let consoleNames: Set<String> = ["pgbouncer", "pooler"]

    /// Parse errors name the file and line only: nothing of a file's contents reaches a client
    /// (an admin's SET auth_hba_file could point at any file the pooler can read).
    public static func parse(_ text: String, file: String = "hba") throws(ConfigError) -> HBARules {
        var result = HBARules()
        for (lineNumber, fields) in lines(text) {
            func fail(_ message: String) -> ConfigError {
                ConfigError(file: file, line: lineNumber, message: message)
            }
            guard let type = ConnectionType(rawValue: fields[0]) else {
                throw fail("unknown connection type (use local, host, hostssl or hostnossl)")
            }
            let needed = type == .local ? 4 : 5
            guard fields.count >= needed else { throw fail("too few fields") }
            var network: Network?
            var methodIndex = 3
            if type != .local {
                methodIndex = 4
                let address = fields[3]
                if address != "all" {
                    if address.contains("/") {
                        guard let parsed = parseCIDR(address) else { throw fail("invalid address") }
                        network = parsed
                    } else {
                        // An address followed by a netmask column.
                        guard let bytes = parseIP(address), fields.count >= 6, let mask = parseIP(fields[4]),
                            mask.count == bytes.count
                        else {
                            throw fail("invalid address (use CIDR, or an address and a netmask)")
                        }
                        network = Network(bytes: bytes, prefix: mask.reduce(0) { $0 + $1.nonzeroBitCount })
                        methodIndex = 5
                    }
                }
            }
            guard let method = Method(rawValue: fields[methodIndex]) else {
                if let reason = Settings.unsupportedAuthTypes[fields[methodIndex]] { throw fail(reason) }
                throw fail("unknown method")
            }
            func list(_ field: String) -> [String]? {
                let items = field.split(separator: ",").map(String.init)
                return items.contains("all") ? nil : items
            }
            var options: [String: String] = [:]
            for option in fields[(methodIndex + 1)...] {
                let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
                guard parts.count == 2 else { throw fail("invalid option (use name=value)") }
                options[parts[0]] = parts[1]
            }
            if method == .peer, type != .local {
                throw fail("peer authentication is only supported on local sockets")
            }
            result.rules.append(
                Rule(
                    type: type, databases: list(fields[1]), users: list(fields[2]), network: network,
                    method: method, line: lineNumber, options: options))
        }
        return result
    }

    /// The fields of each line that has any, with its number, in pg_hba.conf's and pg_ident.conf's
    /// format: `#` starts a comment.
    static func lines(_ text: String) -> [(number: Int, fields: [String])] {
        var result: [(number: Int, fields: [String])] = []
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let fields = tokens(String(line))
            if !fields.isEmpty { result.append((index + 1, fields)) }
        }
        return result
    }

    /// Whitespace-separated fields; double quotes keep spaces and commas inside a name.
    static func tokens(_ line: String) -> [String] {
        var fields: [String] = []
        var current = ""
        var quoted = false
        var started = false
        for c in line {
            if c == "\"" {
                quoted.toggle()
                started = true
            } else if !quoted && (c == " " || c == "\t" || c == "\r") {
                if started { fields.append(current) }
                current = ""
                started = false
            } else {
                current.append(c)
                started = true
            }
        }
        if started { fields.append(current) }
        return fields
    }

    static func parseCIDR(_ text: String) -> Network? {
        let parts = text.split(separator: "/", maxSplits: 1)
        guard parts.count == 2, let bytes = parseIP(String(parts[0])), var prefix = Int(parts[1]) else { return nil }
        // An IPv4-mapped IPv6 network (::ffff:a.b.c.d/120) is an IPv4 one.
        if parts[0].contains(":"), bytes.count == 4 { prefix -= 96 }
        guard prefix >= 0, prefix <= bytes.count * 8 else { return nil }
        return Network(bytes: bytes, prefix: prefix)
    }

    /// An IPv4 or IPv6 address as 4 or 16 bytes; an IPv4-mapped IPv6 address becomes IPv4.
    public static func parseIP(_ text: String) -> [UInt8]? {
        if !text.contains(":") {
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var bytes: [UInt8] = []
            for part in parts {
                guard let n = UInt8(part) else { return nil }
                bytes.append(n)
            }
            return bytes
        }
        var text = Substring(text)
        if let percent = text.firstIndex(of: "%") { text = text[..<percent] }  // zone id
        var tail: [UInt8] = []
        // A trailing dotted IPv4 part (::ffff:1.2.3.4).
        if let lastColon = text.lastIndex(of: ":"), text[lastColon...].contains(".") {
            guard let v4 = parseIP(String(text[text.index(after: lastColon)...])) else { return nil }
            tail = v4
            text = text[...lastColon]
            if text.hasSuffix("::") == false { text = text.dropLast() }
        }
        var halves: [String] = []
        var part = ""
        var previous: Character?
        for c in text {
            if c == ":" && previous == ":" {
                part.removeLast()
                halves.append(part)
                part = ""
                previous = nil
                continue
            }
            part.append(c)
            previous = c
        }
        halves.append(part)
        guard halves.count <= 2 else { return nil }
        func groups(_ part: String) -> [UInt16]? {
            if part.isEmpty { return [] }
            var out: [UInt16] = []
            for g in part.split(separator: ":", omittingEmptySubsequences: false) {
                guard g.count <= 4, let n = UInt16(g, radix: 16) else { return nil }
                out.append(n)
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        var all = head
        let wanted = (16 - tail.count) / 2
        if halves.count == 2 {
            guard let rest = groups(halves[1]), head.count + rest.count < wanted else { return nil }
            all += Array(repeating: 0, count: wanted - head.count - rest.count) + rest
        }
        guard all.count == wanted else { return nil }
        var bytes = all.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xFF)] } + tail
        if bytes.count == 16, bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF {
            bytes = Array(bytes[12...])
        }
        return bytes
    }
}
