/// A problem in a configuration file, located by file and line.
public struct ConfigError: Error, Equatable, Sendable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var key: String?
    public var message: String

    public init(file: String, line: Int, key: String? = nil, message: String) {
        self.file = file
        self.line = line
        self.key = key
        self.message = message
    }

    public var description: String {
        if let key { return "\(file):\(line): \(key): \(message)" }
        return "\(file):\(line): \(message)"
    }
}

/// One `key = value` line of an INI file, with where it came from.
public struct IniEntry: Equatable, Sendable {
    public var section: String
    public var key: String
    public var value: String
    public var file: String
    public var line: Int
}

/// PgBouncer's INI dialect: `[section]`, `key = value`, `;` and `#` comments, and
/// `%include path` lines that read another file in place.
public enum IniFile {
    /// Parses `text`; `readFile` loads included files (relative paths are taken as given).
    public static func parse(
        _ text: String, file: String, readFile: (String) throws -> String, depth: Int = 0
    ) throws(ConfigError) -> [IniEntry] {
        var entries: [IniEntry] = []
        var section = ""
        try parse(text, file: file, readFile: readFile, depth: depth, section: &section, into: &entries)
        return entries
    }

    static func parse(
        _ text: String, file: String, readFile: (String) throws -> String, depth: Int,
        section: inout String, into entries: inout [IniEntry]
    ) throws(ConfigError) {
        var lineNumber = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = rawLine.trimmingWhitespace()
            if line.isEmpty || line.hasPrefix(";") || line.hasPrefix("#") { continue }
            if line.hasPrefix("%include") {
                let path = line.dropFirst("%include".count).trimmingWhitespace()
                guard !path.isEmpty else {
                    throw ConfigError(file: file, line: lineNumber, message: "%include needs a file name")
                }
                guard depth < 10 else {
                    throw ConfigError(file: file, line: lineNumber, message: "%include nested too deeply")
                }
                let included: String
                do {
                    included = try readFile(String(path))
                } catch {
                    throw ConfigError(file: file, line: lineNumber, message: "cannot read included file \(path)")
                }
                try parse(
                    included, file: String(path), readFile: readFile, depth: depth + 1, section: &section,
                    into: &entries)
                continue
            }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]") else {
                    throw ConfigError(file: file, line: lineNumber, message: "section header without ]")
                }
                section = line.dropFirst().dropLast().trimmingWhitespace().lowercased()
                continue
            }
            guard let eq = line.firstIndex(of: "=") else {
                throw ConfigError(file: file, line: lineNumber, message: "expected key = value")
            }
            let key = line[..<eq].trimmingWhitespace()
            var value = line[line.index(after: eq)...].trimmingWhitespace()
            guard !key.isEmpty else {
                throw ConfigError(file: file, line: lineNumber, message: "empty key")
            }
            if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") {
                value = String(value.dropFirst().dropLast())
            }
            guard !section.isEmpty else {
                throw ConfigError(file: file, line: lineNumber, key: key, message: "key outside of a section")
            }
            // Database and user names keep their case; setting names do not matter for case.
            let normalizedKey = (section == "databases" || section == "users") ? key : key.lowercased()
            entries.append(IniEntry(section: section, key: normalizedKey, value: value, file: file, line: lineNumber))
        }
    }
}

/// Parses libpq-style `key=value key2='quoted value'` connection strings.
public enum ConnectionString {
    public static func parse(_ text: String) throws(ConfigError) -> [(String, String)] {
        var result: [(String, String)] = []
        var chars = Array(text)[...]
        func skipSpaces() { while let c = chars.first, c == " " || c == "\t" { chars = chars.dropFirst() } }
        while true {
            skipSpaces()
            guard !chars.isEmpty else { break }
            var key = ""
            while let c = chars.first, c != "=", c != " ", c != "\t" {
                key.append(c)
                chars = chars.dropFirst()
            }
            skipSpaces()
            guard chars.first == "=" else {
                throw ConfigError(file: "", line: 0, key: key, message: "expected '=' after \(key)")
            }
            chars = chars.dropFirst()
            skipSpaces()
            var value = ""
            if chars.first == "'" {
                chars = chars.dropFirst()
                var closed = false
                while let c = chars.first {
                    chars = chars.dropFirst()
                    if c == "\\", let next = chars.first {
                        value.append(next)
                        chars = chars.dropFirst()
                    } else if c == "'", chars.first == "'" {
                        value.append("'")  // a doubled quote stands for one
                        chars = chars.dropFirst()
                    } else if c == "'" {
                        closed = true
                        break
                    } else {
                        value.append(c)
                    }
                }
                guard closed else { throw ConfigError(file: "", line: 0, key: key, message: "unterminated quote") }
            } else {
                while let c = chars.first, c != " ", c != "\t" {
                    value.append(c)
                    chars = chars.dropFirst()
                }
            }
            result.append((key.lowercased(), value))
        }
        return result
    }
}

extension StringProtocol {
    /// The text without leading and trailing white space.
    public func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s = s.dropFirst() }
        while let c = s.last, c.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}
