/// User name maps in pg_ident.conf's format (auth_ident_file), for the HBA `peer` method's
/// `map=` option: which operating-system users may log in as which database users. A system user
/// name starting with `/` is a regular expression; `\1` in the database user name stands for its
/// first capture, as in PostgreSQL.
public struct IdentMap: Sendable {
    public struct Entry: Sendable {
        public var map: String
        public var systemUser: String
        public var databaseUser: String
        public var line: Int
    }

    public var entries: [Entry] = []

    public init(entries: [Entry] = []) { self.entries = entries }

    public static func parse(_ text: String, file: String = "ident") throws(ConfigError) -> IdentMap {
        var map = IdentMap()
        for (lineNumber, fields) in HBARules.lines(text) {
            guard fields.count == 3 else {
                throw ConfigError(
                    file: file, line: lineNumber, message: "expected: map-name system-username database-username")
            }
            if fields[1].hasPrefix("/") {
                do { _ = try Regex(String(fields[1].dropFirst())) } catch {
                    throw ConfigError(file: file, line: lineNumber, message: "invalid regular expression")
                }
            }
            map.entries.append(Entry(map: fields[0], systemUser: fields[1], databaseUser: fields[2], line: lineNumber))
        }
        return map
    }

    /// Whether map `name` lets operating-system user `systemUser` log in as `databaseUser`.
    public func allows(map name: String, systemUser: String, databaseUser: String) -> Bool {
        entries.contains { entry in
            guard entry.map == name else { return false }
            guard entry.systemUser.hasPrefix("/") else {
                return entry.systemUser == systemUser && entry.databaseUser == databaseUser
            }
            guard let regex = try? Regex(String(entry.systemUser.dropFirst())),
                let match = try? regex.firstMatch(in: systemUser)
            else { return false }
            var wanted = entry.databaseUser
            if wanted.contains("\\1"), match.output.count > 1, let capture = match.output[1].substring {
                wanted = wanted.split(separator: "\\1", omittingEmptySubsequences: false).joined(
                    separator: String(capture))
            }
            return wanted == databaseUser
        }
    }
}

/// Who is at the other end of a Unix socket (SO_PEERCRED).
public struct PeerCredentials: Equatable, Sendable {
    /// The peer's operating-system user name (nil if its uid has none).
    public var systemUser: String?
    /// The peer runs as the pooler's own operating-system user.
    public var isPoolerUser: Bool

    public init(systemUser: String?, isPoolerUser: Bool) {
        self.systemUser = systemUser
        self.isPoolerUser = isPoolerUser
    }
}
