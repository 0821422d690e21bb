import NIOCore
import TidepoolCore

extension ServerConnection {
    enum Address: Sendable {
        case tcp(host: String, port: Int)
        case unix(path: String)

        /// Where a database entry points: a host (`host`, else the entry's first), or a directory
        /// holding PostgreSQL's socket.
        init(_ database: DatabaseEntry?, host chosen: String? = nil) {
            self.init(host: chosen ?? database?.hosts.first, port: database?.port ?? 5432)
        }

        /// A host name, address or socket directory (PostgreSQL's socket file name in it) and port.
        init(host: String?, port: Int) {
            let host = host ?? "/var/run/postgresql"
            self = host.hasPrefix("/") ? .unix(path: "\(host)/.s.PGSQL.\(port)") : .tcp(host: host, port: port)
        }

    }

    /// `S-<id>: db/user@host:port`, as PgBouncer starts a server's log lines.
    var logPrefix: String {
        let remote: String =
            switch address {
            case .tcp(let host, let port): "\(host):\(port)"
            case .unix(let path): path
            }
        return LogWords.connection(
            "S", id: "\(id.raw)", database: pool.database, user: database?.user ?? pool.user, address: remote)
    }

    struct CancelTarget: Sendable {
        var address: Address
        var processID: Int32
        var secretKey: Int32
    }

    /// Where a CancelRequest for this server's backend goes.
    var cancelTarget: CancelTarget {
        // The address this server is at: its host name may point elsewhere by now.
        var target = address
        if case .tcp(_, let port) = address, let ip = remoteIP { target = .tcp(host: ip, port: port) }
        return CancelTarget(address: target, processID: session.processID, secretKey: session.secretKey)
    }
}

extension SocketAddress? {
    /// `address:port` (or `unix`), as PgBouncer's log lines show an end of a connection.
    var logText: String { map { "\($0.ipAddress ?? "unix"):\($0.port ?? 0)" } ?? "unix" }
}
