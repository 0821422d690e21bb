/// The name servers a resolv.conf lists, with a port where one is written (`127.0.0.1:5353`,
/// `[::1]:5353`), which c-ares' own reading of the file leaves out.
public struct ResolverSettings: Equatable, Sendable {
    public var nameservers: [(host: String, port: Int)]

    public static func == (a: Self, b: Self) -> Bool {
        a.nameservers.elementsEqual(b.nameservers) { $0 == $1 }
    }

    public static func parse(_ text: String) -> ResolverSettings {
        var settings = ResolverSettings(nameservers: [])
        for line in text.split(whereSeparator: \.isNewline) {
            let words = line.split(whereSeparator: \.isWhitespace).map(String.init)
            guard words.count >= 2, words[0] == "nameserver" else { continue }
            settings.nameservers.append(nameserver(words[1]))
        }
        if settings.nameservers.isEmpty { settings.nameservers = [("127.0.0.1", 53)] }  // as libc does
        return settings
    }

    /// The servers as c-ares' `ares_set_servers_ports_csv` takes them.
    public var csv: String {
        nameservers.map { $0.host.contains(":") ? "[\($0.host)]:\($0.port)" : "\($0.host):\($0.port)" }
            .joined(separator: ",")
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
