/// Parameters by name, with the tracked ones' values (`$name`, in `StartupParameters.tracked`
/// order) computed once per change: a client and the server it is lent agree when those arrays are
/// equal, which is cheaper to check on every lend than looking each name up on both sides.
@propertyWrapper
public struct TrackedParameters: Sendable {
    public var wrappedValue: [String: String] { didSet { cache = nil } }
    var cache: [String?]?

    public init(wrappedValue: [String: String]) { self.wrappedValue = wrappedValue }

    public var projectedValue: [String?] {
        mutating get {
            if let cache { return cache }
            // A client sets few parameters: matching each against the seven tracked names costs
            // less than hashing all seven names for lookups (once per login).
            var values = [String?](repeating: nil, count: StartupParameters.tracked.count)
            for (name, value) in wrappedValue {
                if let index = StartupParameters.tracked.firstIndex(of: name) { values[index] = value }
            }
            cache = values
            return values
        }
    }
}

/// What a client asked for in its StartupMessage, reduced to what the pooler can honour.
public enum StartupParameters {
    /// Parameters the pooler keeps in step between a client and whichever server it is lent,
    /// with PostgreSQL's spelling.
    public static let tracked = [
        "client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "standard_conforming_strings",
        "application_name", "search_path",
    ]

    /// Tracked parameters PostgreSQL 15 does not report with ParameterStatus: what a server has
    /// is known only from what the pooler set there.
    static let unreported = ["search_path"]

    static let trackedByLowercase = Dictionary(uniqueKeysWithValues: tracked.map { ($0.lowercased(), $0) })

    static func canonical(_ name: String) -> String? { trackedByLowercase[name.lowercased()] }

    /// The tracked parameters the client wants, from plain startup parameters and from `-c name=value`
    /// (or `--name=value`) in `options`. Anything else is refused unless listed in `ignored`
    /// (ignore_startup_parameters), as PgBouncer does.
    public static func resolve(_ parameters: [String: String], ignored: [String]) throws(PostgresError) -> [String:
        String]
    {
        try resolve(parameters, ignored: ignored, keepingOthers: false).wanted
    }

    /// As `resolve(_:ignored:)`; with `keepingOthers`, any other parameter is not refused but
    /// returned in `others` (name in lower case, value), to be kept as a session setting; without
    /// it, only those named in `extra` (track_extra_parameters) are.
    public static func resolve(
        _ parameters: [String: String], ignored: [String], keepingOthers: Bool, extra: [String] = []
    ) throws(PostgresError) -> (wanted: [String: String], others: [(String, String)]) {
        let ignoredSet = Set(ignored.map { $0.lowercased() })
        let extraSet = Set(extra.map { $0.lowercased() })
        var wanted: [String: String] = [:]
        var others: [(String, String)] = []
        func accept(_ name: String, _ value: String, from what: String) throws(PostgresError) {
            if let key = canonical(name) {
                wanted[key] = key == "DateStyle" ? wanted[key].map { Self.dateStyle($0, then: value) } ?? value : value
            } else if ignoredSet.contains(name.lowercased()) {
                return
            } else if keepingOthers || extraSet.contains(name.lowercased()) {
                others.append((name.lowercased(), value))
            } else {
                throw PostgresError.fatal(SQLState.featureNotSupported, "unsupported \(what): \(name)")
            }
        }
        // PostgreSQL reads `options` first, then the other parameters, which win.
        let sorted = parameters.sorted { a, b in
            let (x, y) = (a.key.lowercased() == "options", b.key.lowercased() == "options")
            return x != y ? x : a.key < b.key
        }
        for (name, value) in sorted {
            switch name.lowercased() {
            case "user", "database":
                continue
            case "replication":
                continue  // a replication connection (`ReplicationMode`), passed through unpooled
            case "options":
                if ignoredSet.contains("options") { continue }
                for (key, v) in try parseOptions(value) {
                    try accept(key, v, from: "options startup parameter")
                }
            default:
                try accept(name, value, from: "startup parameter")
            }
        }
        return (wanted, others)
    }

    /// DateStyle `first` and then `second`, as PostgreSQL applies them: each may give the output
    /// style, the field order or both, and German without an order means DMY. A style or order
    /// neither gives stays out (the server's default then fills it in).
    static func dateStyle(_ first: String, then second: String) -> String {
        func parts(_ value: String) -> (style: String?, order: String?) {
            var style: String?
            var order: String?
            for token in value.split(whereSeparator: { $0 == "," || $0 == " " }).map({ $0.uppercased() }) {
                switch token {
                case "ISO", "SQL", "POSTGRES", "GERMAN":
                    style = token == "POSTGRES" ? "Postgres" : token == "GERMAN" ? "German" : token
                case "DMY", "EURO", "EUROPEAN": order = "DMY"
                case "MDY", "US", "NONEURO", "NONEUROPEAN": order = "MDY"
                case "YMD": order = "YMD"
                default: break
                }
            }
            if style == "German", order == nil { order = "DMY" }
            return (style, order)
        }
        let a = parts(first)
        let b = parts(second)
        let merged = [b.style ?? a.style, b.order ?? a.order].compactMap { $0 }
        return merged.joined(separator: ", ")
    }

    /// Splits libpq's `options` string: `-c a=b -c c=d`, `-ca=b`, `--a=b`; backslash escapes a space.
    static func parseOptions(_ text: String) throws(PostgresError) -> [(String, String)] {
        var words: [String] = []
        var current = ""
        var escaped = false
        for ch in text {
            if escaped {
                current.append(ch)
                escaped = false
            } else if ch == "\\" {
                escaped = true
            } else if ch == " " || ch == "\t" {
                if !current.isEmpty { words.append(current) }
                current = ""
            } else {
                current.append(ch)
            }
        }
        if !current.isEmpty { words.append(current) }
        var result: [(String, String)] = []
        var i = 0
        while i < words.count {
            var setting: String
            if words[i] == "-c", i + 1 < words.count {
                setting = words[i + 1]
                i += 2
            } else if words[i].hasPrefix("-c") {
                setting = String(words[i].dropFirst(2))
                i += 1
            } else if words[i].hasPrefix("--") {
                setting = String(words[i].dropFirst(2))
                i += 1
            } else {
                throw PostgresError.fatal(
                    SQLState.featureNotSupported, "unsupported options startup parameter: \(words[i])")
            }
            guard let eq = setting.firstIndex(of: "=") else {
                throw PostgresError.fatal(SQLState.protocolViolation, "invalid option \(setting): expected name=value")
            }
            let name = setting[..<eq].replacingDashes()
            setting = String(setting[setting.index(after: eq)...])
            result.append((name, setting))
        }
        return result
    }
}

extension Substring {
    /// PostgreSQL reads `-` in an option's name as `_` (`--search-path=x`).
    func replacingDashes() -> String {
        String(self.map { $0 == "-" ? "_" : $0 })
    }
}

/// A replication connection's kind, from the StartupMessage's `replication` parameter: passed
/// through unpooled on a server connection of its own, as PgBouncer 1.23+.
public enum ReplicationMode: String, Sendable, Equatable {
    /// `replication=true` (on, yes, 1): physical replication (pg_basebackup, pg_receivewal).
    case physical
    /// `replication=database`: logical replication (subscriptions, pg_recvlogical).
    case logical

    /// The mode a `replication` value asks for; nil for a normal connection (false, off, no, 0).
    public static func parse(_ value: String?) throws(PostgresError) -> ReplicationMode? {
        guard let value else { return nil }
        switch value.lowercased() {
        case "database": return .logical
        case "true", "on", "yes", "1": return .physical
        case "false", "off", "no", "0": return nil
        default:
            throw PostgresError.fatal(
                SQLState.invalidParameterValue, "invalid value for parameter \"replication\": \"\(value)\"")
        }
    }
}
