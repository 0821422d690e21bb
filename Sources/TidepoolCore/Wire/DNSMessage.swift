/// The little of the DNS wire format (RFC 1035) the pooler's own resolver needs: a query for one
/// name, and the A, AAAA and SOA records of an answer. Used when `resolv_conf` names the servers
/// to ask, and for `dns_zone_check_period`'s SOA serials; otherwise the system resolver answers.
public enum DNSMessage {
    public enum RecordType: UInt16, Sendable {
        case a = 1
        case soa = 6
        case aaaa = 28
    }

    public struct Answer: Equatable, Sendable {
        public var id: UInt16
        /// 0 no error, 2 server failure, 3 no such name (NXDOMAIN), …
        public var rcode: UInt8
        /// Addresses of A and AAAA records, as text.
        public var addresses: [String]
        /// The serial of the first SOA record, in the answer or the authority section.
        public var serial: UInt32?

        public init(id: UInt16, rcode: UInt8, addresses: [String], serial: UInt32?) {
            self.id = id
            self.rcode = rcode
            self.addresses = addresses
            self.serial = serial
        }
    }

    public enum DecodeError: Error, Equatable {
        case truncated
        case badName
        case notAnAnswer
    }

    /// A recursive query for `name`'s records of `type`; nil when the name cannot be encoded
    /// (a label empty or over 63 bytes, or the whole over 255).
    public static func query(id: UInt16, name: String, type: RecordType) -> [UInt8]? {
        var bytes: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        let labels =
            name.hasSuffix(".")
            ? name.dropLast().split(separator: ".", omittingEmptySubsequences: false)
            : name.split(separator: ".", omittingEmptySubsequences: false)
        var length = 1
        for label in labels {
            let utf8 = Array(label.utf8)
            guard (1...63).contains(utf8.count) else { return nil }
            length += utf8.count + 1
            bytes.append(UInt8(utf8.count))
            bytes += utf8
        }
        guard length <= 255 else { return nil }
        bytes += [0, UInt8(type.rawValue >> 8), UInt8(type.rawValue & 0xFF), 0, 1]
        return bytes
    }

    /// Reads a response: its id, rcode, addresses and SOA serial. Records of other types (CNAME
    /// on the way to the address, OPT) are skipped.
    public static func decode(_ bytes: [UInt8]) throws(DecodeError) -> Answer {
        var reader = Reader(bytes: bytes)
        let id = try reader.u16()
        let flags = try reader.u16()
        guard flags & 0x8000 != 0 else { throw .notAnAnswer }
        let counts = (try reader.u16(), try reader.u16(), try reader.u16())
        _ = try reader.u16()  // additional records: nothing the pooler needs
        for _ in 0..<counts.0 {
            try reader.skipName()
            try reader.skip(4)
        }
        var answer = Answer(id: id, rcode: UInt8(flags & 0xF), addresses: [], serial: nil)
        for _ in 0..<(Int(counts.1) + Int(counts.2)) {
            try reader.skipName()
            let type = try reader.u16()
            try reader.skip(6)  // class, TTL: dns_max_ttl decides how long answers are kept
            let length = Int(try reader.u16())
            let end = reader.offset + length
            guard end <= bytes.count else { throw .truncated }
            switch RecordType(rawValue: type) {
            case .a where length == 4:
                answer.addresses.append(bytes[reader.offset..<end].map { String($0) }.joined(separator: "."))
            case .aaaa where length == 16:
                answer.addresses.append(ipv6Text(Array(bytes[reader.offset..<end])))
            case .soa where answer.serial == nil:
                try reader.skipName()  // primary name server
                try reader.skipName()  // responsible mailbox
                answer.serial = UInt32(try reader.u16()) << 16 | UInt32(try reader.u16())
            default: break
            }
            reader.offset = end
        }
        return answer
    }

    public struct Failure: Error, Equatable, Sendable {
        public var text: String
    }

    /// A name's addresses from the answers to its A and AAAA questions: NXDOMAIN from either
    /// means there is no such name; an answer with neither kind of address is a failure too.
    public static func addresses(_ answers: Answer...) -> Result<[String], Failure> {
        if answers.contains(where: { $0.rcode == 3 }) { return .failure(Failure(text: "no such host (NXDOMAIN)")) }
        let addresses = answers.flatMap(\.addresses)
        if !addresses.isEmpty { return .success(addresses) }
        if let failed = answers.first(where: { $0.rcode != 0 }) {
            return .failure(Failure(text: "name server failure (rcode \(failed.rcode))"))
        }
        return .failure(Failure(text: "no address"))
    }

    /// RFC 5952's text form: lowercase hex, the longest run of two or more zero groups as "::".
    static func ipv6Text(_ bytes: [UInt8]) -> String {
        let groups = (0..<8).map { UInt16(bytes[2 * $0]) << 8 | UInt16(bytes[2 * $0 + 1]) }
        var best = (start: -1, length: 1)
        var index = 0
        while index < 8 {
            var end = index
            while end < 8 && groups[end] == 0 { end += 1 }
            if end - index > best.length { best = (index, end - index) }
            index = end == index ? index + 1 : end
        }
        let hex = groups.map { String($0, radix: 16) }
        guard best.start >= 0 else { return hex.joined(separator: ":") }
        let head = hex[..<best.start].joined(separator: ":")
        let tail = hex[(best.start + best.length)...].joined(separator: ":")
        return head + "::" + tail
    }

    struct Reader {
        let bytes: [UInt8]
        var offset = 0

        mutating func u16() throws(DecodeError) -> UInt16 {
            guard offset + 2 <= bytes.count else { throw .truncated }
            defer { offset += 2 }
            return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
        }

        mutating func skip(_ count: Int) throws(DecodeError) {
            guard offset + count <= bytes.count else { throw .truncated }
            offset += count
        }

        /// A name ends at a zero length or at a compression pointer (two bytes); where a pointer
        /// leads is never needed here.
        mutating func skipName() throws(DecodeError) {
            var length = 0
            while true {
                guard offset < bytes.count else { throw .truncated }
                let byte = bytes[offset]
                if byte & 0xC0 == 0xC0 {
                    try skip(2)
                    return
                }
                guard byte & 0xC0 == 0 else { throw .badName }
                offset += 1
                if byte == 0 { return }
                length += Int(byte) + 1
                guard length <= 255 else { throw .badName }
                try skip(Int(byte))
            }
        }
    }
}

/// The parts of a resolv.conf (resolv_conf) the pooler's resolver uses: `nameserver` lines (an
/// address, with `:port` after an IPv4 address or `[v6]:port` as an extension for tests) and
/// `options timeout:N attempts:N`.
public struct ResolverSettings: Equatable, Sendable {
    public var nameservers: [(host: String, port: Int)]
    public var timeoutSeconds: Int = 5
    public var attempts: Int = 2

    public static func == (a: Self, b: Self) -> Bool {
        a.nameservers.elementsEqual(b.nameservers) { $0 == $1 } && a.timeoutSeconds == b.timeoutSeconds
            && a.attempts == b.attempts
    }

    public static func parse(_ text: String) -> ResolverSettings {
        var settings = ResolverSettings(nameservers: [])
        for line in text.split(whereSeparator: \.isNewline) {
            let words = line.split(whereSeparator: \.isWhitespace).map(String.init)
            guard let keyword = words.first, words.count >= 2 else { continue }
            switch keyword {
            case "nameserver":
                settings.nameservers.append(nameserver(words[1]))
            case "options":
                for option in words.dropFirst() {
                    let parts = option.split(separator: ":", maxSplits: 1)
                    guard parts.count == 2, let value = Int(parts[1]), value > 0 else { continue }
                    if parts[0] == "timeout" { settings.timeoutSeconds = min(value, 30) }
                    if parts[0] == "attempts" { settings.attempts = min(value, 5) }
                }
            default: continue
            }
        }
        if settings.nameservers.isEmpty { settings.nameservers = [("127.0.0.1", 53)] }  // as libc does
        return settings
    }

    static func nameserver(_ word: String) -> (host: String, port: Int) {
        if word.hasPrefix("["), let close = word.firstIndex(of: "]") {
            let host = String(word[word.index(after: word.startIndex)..<close])
            let rest = word[word.index(after: close)...]
            return (host, rest.hasPrefix(":") ? Int(rest.dropFirst()) ?? 53 : 53)
        }
        let parts = word.split(separator: ":")
        if parts.count == 2, let port = Int(parts[1]) { return (String(parts[0]), port) }
        return (word, 53)
    }
}

/// /etc/hosts, read before asking name servers (as the system resolver and c-ares do).
public enum HostsFile {
    public static func addresses(of name: String, in text: String) -> [String] {
        var found: [String] = []
        let wanted = name.lowercased()
        for line in text.split(whereSeparator: \.isNewline) {
            let words = line.prefix { $0 != "#" }.split(whereSeparator: \.isWhitespace)
            guard words.count >= 2, words.dropFirst().contains(where: { $0.lowercased() == wanted }) else { continue }
            if !found.contains(String(words[0])) { found.append(String(words[0])) }
        }
        return found
    }
}
