/// PgBouncer 1.25's words for the events it logs, so that operators' log searches and alerts keep
/// working after a move: a connection's line starts with its kind and id (`C-12`, `S-7`) and
/// `database/user@address:port`, then PgBouncer's phrase; Tidepool's extra detail comes after it.
public enum LogWords {
    /// A log line's text with control characters written as escapes (`\n`, `\x1b`), so that a
    /// client's user or database name cannot start a forged line of its own.
    public static func escapingControls(_ text: String) -> String {
        guard text.utf8.contains(where: { $0 < 0x20 || $0 == 0x7F }) else { return text }
        var out = ""
        for scalar in text.unicodeScalars {
            switch scalar.value {
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x09: out += "\\t"
            case 0..<0x20, 0x7F:
                let hex = String(scalar.value, radix: 16)
                out += "\\x" + (hex.count < 2 ? "0" + hex : hex)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    public static func connection(
        _ kind: Character, id: String, database: String, user: String, address: String
    ) -> String {
        "\(kind)-\(id): \(database)/\(user)@\(address)"
    }

    public static func loginAttempt(database: String, user: String, tls: Bool, replication: String?) -> String {
        "login attempt: db=\(database) user=\(user) tls=\(tls ? "yes" : "no") replication=\(replication ?? "no")"
    }

    public static func closing(because reason: String, ageSeconds: Int) -> String {
        "closing because: \(reason) (age=\(ageSeconds)s)"
    }

    public static func newServerConnection(from local: String) -> String {
        "new connection to server (from \(local))"
    }

    /// A reserve server opened for a pool whose first client waited `waited` seconds.
    public static func reservePool(waited: String) -> String {
        "taking connection from reserve_pool (a client waited \(waited) s)"
    }

    /// PgBouncer's reasons for closing a server, by what the pool decided.
    public static let serverLifetimeOver = "server lifetime over"
    public static let serverIdleTimeout = "server idle timeout"
}
