/// A password secret as stored in an auth file or in pg_shadow.
public enum PasswordSecret: Equatable, Sendable {
    case plain(String)
    /// "md5" followed by md5(password + user) in hex.
    case md5(String)
    case scram(ScramSecret)

    public init(parsing stored: String) {
        if stored.hasPrefix("md5"), stored.utf8.count == 35,
            stored.utf8.dropFirst(3).allSatisfy({ ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) })
        {
            self = .md5(stored)
        } else if let scram = ScramSecret(parsing: stored) {
            self = .scram(scram)
        } else {
            self = .plain(stored)
        }
    }
}

/// The auth file in PgBouncer's userlist.txt format: one `"user" "secret"` pair per line, a
/// double quote inside a field written twice. Other lines are comments.
public enum Userlist {
    public static func parse(_ text: String) -> [String: PasswordSecret] {
        var result: [String: PasswordSecret] = [:]
        for line in text.split(omittingEmptySubsequences: true, whereSeparator: { $0 == "\n" || $0 == "\r" }) {
            var fields: [String] = []
            var iterator = line.makeIterator()
            while let c = iterator.next() {
                guard c == "\"" else {
                    if c == " " || c == "\t" { continue }
                    break
                }
                var field = ""
                var closed = false
                while let d = iterator.next() {
                    if d == "\"" {
                        // A doubled quote is a literal quote; anything else closes the field.
                        var lookahead = iterator
                        if lookahead.next() == "\"" {
                            field.append("\"")
                            iterator = lookahead
                            continue
                        }
                        closed = true
                        break
                    }
                    field.append(d)
                }
                guard closed else { break }
                fields.append(field)
                if fields.count == 2 { break }
            }
            if fields.count == 2 {
                result[fields[0]] = PasswordSecret(parsing: fields[1])
            }
        }
        return result
    }
}
