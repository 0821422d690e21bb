import NIOCore

public enum PoolMode: String, Sendable, CaseIterable {
    case session, transaction, statement
}

/// What transaction and statement pooling do with session state (SET, advisory locks, temp tables).
public enum SessionStateMode: String, Sendable, CaseIterable {
    /// Settings kept per client and replayed; what cannot be replayed pins the client to its server.
    case track
    /// As `track`, but statements that would pin are refused with SQLSTATE 0A000.
    case refuse
    /// Nothing is followed (PgBouncer's behaviour): state stays on whichever server ran it.
    case ignore
}

public enum AuthType: String, Sendable, CaseIterable {
    case trust, plain, md5
    case scramSHA256 = "scram-sha-256"
    case any
    case hba
    /// The client's TLS certificate: its common name must be the user name.
    case cert
}

/// syslog_facility's values, as PgBouncer takes them.
public enum SyslogFacility: String, Sendable, CaseIterable {
    case auth, authpriv, daemon, user
    case local0, local1, local2, local3, local4, local5, local6, local7
}

/// PostgreSQL's sslmode values, for client_tls_sslmode and server_tls_sslmode.
public enum SSLMode: String, Sendable, CaseIterable {
    case disable, allow, prefer, require
    case verifyCA = "verify-ca"
    case verifyFull = "verify-full"

    /// TLS is required: plaintext is refused.
    public var requiresTLS: Bool { self == .require || self == .verifyCA || self == .verifyFull }
}

/// One side's TLS settings (client_tls_* or server_tls_*). Files are read when a context is made:
/// at start and on RELOAD.
public struct TLSSettings: Equatable, Sendable {
    public var sslmode: SSLMode
    public var keyFile = ""
    public var certFile = ""
    public var caFile = ""
    /// PgBouncer's words: "secure" (TLS 1.2 and 1.3), "all" or "legacy" (1.0 to 1.3), or a list of
    /// tlsv1.0, tlsv1.1, tlsv1.2, tlsv1.3.
    public var protocols = "secure"
    /// OpenSSL cipher list for TLS 1.2; "default" keeps the library's.
    public var ciphers = "default"
    /// client_tls_ecdhcurve: "auto" (the library's curves) or one curve by its OpenSSL name.
    public var ecdhCurve = "auto"
    /// *_tls13_ciphers: TLS 1.3 suites allowed, colon-separated; empty: the library's.
    public var tls13Ciphers = ""
    /// client_tls_dheparams: none, auto or legacy. The TLS library has no finite-field DHE, so
    /// every value works as none.
    public var dheParams = "auto"

    /// The TLS 1.3 suites PgBouncer accepts, and the ones BoringSSL always offers (it has no way
    /// to leave one out, nor the CCM ones).
    public static let tls13Suites = [
        "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256",
        "TLS_AES_128_CCM_8_SHA256", "TLS_AES_128_CCM_SHA256",
    ]
    static let libraryTLS13Suites = [
        "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
    ]

    /// The curves the TLS library has, by their OpenSSL names, with their TLS code points.
    public static let curves: [String: UInt16] = [
        "prime256v1": 0x17, "secp256r1": 0x17, "secp384r1": 0x18, "secp521r1": 0x19, "x25519": 0x1D,
    ]

    /// The TLS code point of the one curve to offer; nil: the library's choice.
    public var ecdhCurveCodePoint: UInt16? { Self.curves[ecdhCurve] }

    public init(sslmode: SSLMode) { self.sslmode = sslmode }

    /// TLS versions by their minor number (1.0 is 0).
    public static let versionNames = ["tlsv1.0": 0, "tlsv1.1": 1, "tlsv1.2": 2, "tlsv1.3": 3]

    /// The lowest and highest TLS 1.x minor version `protocols` allows. The TLS library takes a
    /// range, so a list with a gap (tlsv1.0,tlsv1.2) allows the versions between too.
    public var versionRange: ClosedRange<Int> {
        var low = 3
        var high = 0
        for word in protocols.split(separator: ",") {
            let range: ClosedRange<Int> =
                switch word {
                case "all", "legacy": 0...3
                case "secure", "default": 2...3
                default: Self.versionNames[String(word)].map { $0...$0 } ?? 2...3
                }
            low = min(low, range.lowerBound)
            high = max(high, range.upperBound)
        }
        return low <= high ? low...high : 2...3
    }

    /// One client_tls_* or server_tls_* setting, `name` without its prefix.
    mutating func apply(_ name: String, _ v: Value) throws(ConfigError) {
        switch name {
        case "sslmode": sslmode = try v.enumValue(SSLMode.self)
        case "key_file": keyFile = v.text
        case "cert_file": certFile = v.text
        case "ca_file": caFile = v.text
        case "protocols": protocols = try v.tlsProtocols()
        case "ciphers": ciphers = v.text
        case "ecdhcurve":
            let name = v.text.lowercased()
            guard name == "auto" || Self.curves[name] != nil else {
                throw v.fail(
                    "'\(v.text)' is not auto or one of \(Self.curves.keys.sorted().joined(separator: ", "))"
                        + (name == "none"
                            ? " (TLS 1.3 needs an ECDH key exchange: none would refuse every client)" : ""))
            }
            ecdhCurve = name
        case "tls13_ciphers":
            let names = v.text.split(separator: ":").map { $0.trimmingWhitespace() }.filter { !$0.isEmpty }
            if let unknown = names.first(where: { !Self.tls13Suites.contains($0) }) {
                throw v.fail("'\(unknown)' is not a TLS 1.3 suite (\(Self.tls13Suites.joined(separator: ", ")))")
            }
            let left = Self.libraryTLS13Suites.filter { !names.contains($0) }
            guard names.isEmpty || left.isEmpty else {
                throw v.fail(
                    "the TLS library (BoringSSL) always offers \(Self.libraryTLS13Suites.joined(separator: ", ")) "
                        + "with TLS 1.3 and cannot leave out \(left.joined(separator: ", ")): list all three, "
                        + "or keep TLS 1.3 out with the protocols setting")
            }
            tls13Ciphers = v.text
        case "dheparams":
            let value = v.text.lowercased()
            guard ["none", "auto", "legacy"].contains(value) else {
                throw v.fail("'\(v.text)' is not none, auto or legacy")
            }
            dheParams = value
        default: throw v.fail("unknown setting \(v.key)")
        }
    }
}

/// Global settings (`[pooler]`, alias `[pgbouncer]`), with PgBouncer's defaults.
public struct GlobalSettings: Equatable, Sendable {
    public var listenAddr = "127.0.0.1"
    public var listenPort = 6432
    public var unixSocketDir = "/tmp"
    public var unixSocketMode = 0o777
    public var authType = AuthType.md5
    public var authFile: String?
    public var adminUsers: [String] = []
    public var statsUsers: [String] = []
    public var poolMode = PoolMode.transaction
    public var sessionState = SessionStateMode.track
    /// Clients fail at once, instead of waiting, while a database that has not served cannot be
    /// reached (a circuit breaker).
    public var serverConnectFailFast = false
    /// Notifications a client may leave unread before it is closed (LISTEN in transaction mode).
    public var notifyQueueSize = 4096
    public var defaultPoolSize = 20
    public var minPoolSize = 0
    public var reservePoolSize = 0
    public var reservePoolTimeout = TimeAmount.seconds(5)
    public var maxClientConn = 100
    public var maxDBConnections = 0
    /// Clients per database, per user (0: no limit), as PgBouncer 1.24+.
    public var maxDBClientConnections = 0
    /// A client queued this long gets a NOTICE that it is (0: never), as PgBouncer 1.25.
    public var queryWaitNotify = TimeAmount.seconds(5)
    /// A NOTICE every client gets once logged in (empty: none).
    public var loginNotifyMessage = ""
    /// Iterations of the SCRAM verifiers the pooler makes from plain-text secrets.
    public var scramIterations = 4096
    public var maxUserClientConnections = 0
    public var maxUserConnections = 0
    public var serverResetQuery = "DISCARD ALL"
    public var serverResetQueryAlways = false
    public var serverCheckQuery = "select 1"
    public var serverCheckDelay = TimeAmount.seconds(30)
    public var serverLifetime = TimeAmount.seconds(3600)
    public var serverIdleTimeout = TimeAmount.seconds(600)
    public var serverConnectTimeout = TimeAmount.seconds(15)
    public var serverLoginRetry = TimeAmount.seconds(15)
    public var queryTimeout = TimeAmount.zero
    public var queryWaitTimeout = TimeAmount.seconds(120)
    public var clientIdleTimeout = TimeAmount.zero
    public var clientLoginTimeout = TimeAmount.seconds(60)
    public var idleTransactionTimeout = TimeAmount.zero
    public var transactionTimeout = TimeAmount.zero
    /// How long SIGTERM and SIGINT wait for clients or servers before closing anyway; 0 = no limit.
    public var shutdownTimeout = TimeAmount.seconds(60)
    public var logConnections = true
    public var logDisconnections = true
    public var logPoolerErrors = true
    public var verbose = 0
    public var logfile: String?
    public var syslog = false
    public var syslogIdent = "tidepool"
    public var syslogFacility = SyslogFacility.daemon
    public var pidfile: String?
    public var maxPacketSize = 2_147_483_647
    /// Flow control: past this many bytes queued toward a connection (or held for a queued
    /// client), the other side is not read until they drain.
    public var maxBufferedBytes = 65536
    /// Named prepared statements kept per server connection in transaction and statement pooling;
    /// 0 passes prepared statements through untouched.
    public var maxPreparedStatements = 200
    public var listenBacklog = 128
    /// so_reuseport: other processes may listen on the same TCP port too (the kernel spreads new
    /// connections). Tidepool itself always listens with one socket per event-loop thread.
    public var soReuseport = false
    /// This process's number among the [peers] (0: peering off).
    public var peerID = 0
    public var serverFastClose = false
    /// Pools unused this long are freed (0: kept); autodb_idle_timeout for pools of `*` databases.
    public var poolIdleTimeout = TimeAmount.zero
    public var autodbIdleTimeout = TimeAmount.seconds(3600)
    /// A cancel request queued for a peer longer than this is dropped (0: never).
    public var cancelWaitTimeout = TimeAmount.seconds(10)
    /// How long SUSPEND waits for lent servers before dropping their clients (0: no limit).
    public var suspendTimeout = TimeAmount.seconds(10)
    /// Server host names' answers are kept this long (failures dns_nxdomain_ttl); names are
    /// looked up again when their zone's SOA serial changes (every dns_zone_check_period, 0: off).
    public var dnsMaxTTL = TimeAmount.seconds(15)
    public var dnsNxdomainTTL = TimeAmount.seconds(15)
    public var dnsZoneCheckPeriod = TimeAmount.zero
    /// Name servers to ask instead of the system resolver's (and for SOA serials).
    public var resolvConf: String?
    public var ignoreStartupParameters: [String] = []
    /// Startup parameters kept per client and set on each server it is lent, beyond the tracked
    /// ones (with session_state = track every parameter is).
    public var trackExtraParameters = ["IntervalStyle"]
    public var applicationNameAddHost = false
    public var statsPeriod = TimeAmount.seconds(60)
    /// Log one line of rates and averages per database every stats_period.
    public var logStats = true
    /// Log queries slower than this (0 = off).
    public var logSlowQuery = TimeAmount.zero
    /// HTTP listener for /metrics and /health (off when the port is 0).
    public var statsListenAddr = "127.0.0.1"
    public var statsListenPort = 0
    /// Told apart in logs, SHOW STATE and metrics; empty means host-pid.
    public var instanceID = ""
    public var serverRoundRobin = false
    public var disablePqexec = false
    public var tcpKeepalive = true
    /// Seconds of idleness before keepalive probes, seconds between probes, probes before giving
    /// up (0 = the kernel's default), and TCP_USER_TIMEOUT in milliseconds (0 = off).
    public var tcpKeepidle = 0
    public var tcpKeepintvl = 0
    public var tcpKeepcnt = 0
    public var tcpUserTimeout = 0
    /// SO_SNDBUF and SO_RCVBUF for TCP connections (0 = the kernel's).
    public var tcpSocketBuffer = 0
    /// The largest read buffer of a connection (PgBouncer's pkt_buf; its default is 4096, smaller
    /// than NIO's 64 KiB, which Tidepool keeps) and how many reads a connection gets per turn of
    /// its event loop (sbuf_loopcnt; 0: as many as there is data).
    public var pktBuf = 65536
    public var sbufLoopcnt = 5
    /// TCP_DEFER_ACCEPT on the TCP listeners. Off by default (PgBouncer has it on, on Linux): a
    /// client that connects and says nothing then still meets client_login_timeout.
    public var tcpDeferAccept = false
    public var unixSocketGroup: String?
    /// The operating-system user to run as (-u wins).
    public var user: String?
    /// The file RELOAD reads, when not the one given at start.
    public var conffile: String?
    /// Event-loop threads; 0 means one per core.
    public var threads = 0
    public var clientTLS = TLSSettings(sslmode: .disable)
    public var serverTLS = TLSSettings(sslmode: .prefer)
    /// auth_query: secrets of users not in auth_file are looked up in PostgreSQL as auth_user.
    public var authUser: String?
    public var authQuery = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    public var authDBName: String?
    /// How long a secret found (or not found) by auth_query is reused.
    public var authQueryCacheTTL = TimeAmount.seconds(10)
    /// pg_hba.conf-style rules for auth_type = hba.
    public var authHBAFile: String?
    public var authIdentFile: String?
    /// Per client address: open connections and new connections per second (0 = no limit).
    public var maxClientConnPerIP = 0
    public var clientConnectRatePerIP = 0
    /// PgBouncer settings accepted without effect (Setting.noEffect), kept for SHOW CONFIG.
    public var inert: [String: String] = [:]

    public init() {}
}

/// One `[databases]` entry.
public struct DatabaseEntry: Equatable, Sendable {
    public var name: String
    public var host: String?
    public var port = 5432
    public var dbname: String?
    public var user: String?
    public var password: String?
    public var poolSize: Int?
    public var minPoolSize: Int?
    public var reservePoolSize: Int?
    public var poolMode: PoolMode?
    public var sessionState: SessionStateMode?
    public var maxDBConnections: Int?
    public var maxDBClientConnections: Int?
    public var serverLifetime: TimeAmount?
    public var loadBalanceHosts: LoadBalanceHosts?
    public var targetSessionAttrs = TargetSessionAttrs.any
    public var connectQuery: String?
    public var clientEncoding: String?
    public var datestyle: String?
    public var timezone: String?
    public var applicationName: String?
    public var authUser: String?
    public var authQuery: String?
    public var authDBName: String?
    public var queryWaitTimeout: TimeAmount?

    public init(name: String) { self.name = name }

    /// What a server connection is made with: a change means the servers already open go to the
    /// old place or log in the old way.
    public var connection: [String?] {
        [
            host, "\(port)", dbname, user, password, connectQuery, clientEncoding, datestyle, timezone,
            applicationName, targetSessionAttrs.rawValue,
        ]
    }
}

/// One `[users]` entry.
public struct UserEntry: Equatable, Sendable {
    public var name: String
    public var poolMode: PoolMode?
    public var sessionState: SessionStateMode?
    public var poolSize: Int?
    public var maxUserConnections: Int?
    public var maxUserClientConnections: Int?
    public var reservePoolSize: Int?
    public var queryTimeout: TimeAmount?
    public var idleTransactionTimeout: TimeAmount?
    public var clientIdleTimeout: TimeAmount?
    public var transactionTimeout: TimeAmount?
    public var queryWaitTimeout: TimeAmount?

    public init(name: String) { self.name = name }
}

/// One `[peers]` entry: another pooler process behind the same address, to which cancel
/// requests for its clients are passed on.
public struct PeerEntry: Equatable, Sendable {
    public var id: Int
    public var host: String?
    public var port = 6432
    /// Cancel requests passed on to it at once, at most.
    public var poolSize: Int?

    public init(id: Int) { self.id = id }
}

/// The whole configuration.
public struct Config: Equatable, Sendable {
    public var global = GlobalSettings()
    public var databases: [String: DatabaseEntry] = [:]
    public var users: [String: UserEntry] = [:]
    public var peers: [Int: PeerEntry] = [:]
    /// Unknown keys met while loading: (file:line, key).
    public var warnings: [String] = []

    public init() {}

    /// The entry for a database name, falling back to `*` with that name as dbname.
    public func database(named name: String) -> DatabaseEntry? {
        if let entry = databases[name] { return entry }
        if var fallback = databases["*"] {
            fallback.name = name
            if fallback.dbname == nil { fallback.dbname = name }
            return fallback
        }
        return nil
    }

    public func poolMode(database: DatabaseEntry, user: String) -> PoolMode {
        users[user]?.poolMode ?? database.poolMode ?? global.poolMode
    }

    /// max_db_client_connections for the database a client names (0: no limit).
    public func maxDBClientConnections(database name: String) -> Int {
        database(named: name)?.maxDBClientConnections ?? global.maxDBClientConnections
    }

    /// max_user_client_connections for a login user (0: no limit).
    public func maxUserClientConnections(user: String) -> Int {
        users[user]?.maxUserClientConnections ?? global.maxUserClientConnections
    }

    public func sessionState(database: DatabaseEntry, user: String) -> SessionStateMode {
        users[user]?.sessionState ?? database.sessionState ?? global.sessionState
    }

    public func poolSize(database: DatabaseEntry, user: String) -> Int {
        users[user]?.poolSize ?? database.poolSize ?? global.defaultPoolSize
    }

    /// The client-side timeouts for a user: its [users] entry over the global settings.
    public func clientTimeouts(user: String) -> ClientTimeoutSettings {
        var t = ClientTimeoutSettings()
        let u = users[user]
        t.clientIdleTimeout = u?.clientIdleTimeout ?? global.clientIdleTimeout
        t.idleTransactionTimeout = u?.idleTransactionTimeout ?? global.idleTransactionTimeout
        t.queryTimeout = u?.queryTimeout ?? global.queryTimeout
        t.transactionTimeout = u?.transactionTimeout ?? global.transactionTimeout
        return t
    }

    /// Settings as SHOW CONFIG lists them (no secrets): (name, value, default, changeable).
    public var displaySettings: [(String, String, String, Bool)] { Settings.show(global) }

    /// How long an unused pool of `database` lives: pool_idle_timeout, or autodb_idle_timeout
    /// for a database made from the `*` entry, whichever is shorter (zero: kept).
    public func poolFreeAfter(database: DatabaseEntry) -> TimeAmount {
        let auto = databases[database.name] == nil ? global.autodbIdleTimeout : .zero
        return [global.poolIdleTimeout, auto].filter { $0 > .zero }.min() ?? .zero
    }

    /// server_fast_close applies to session pooling only.
    public func fastClose(database: DatabaseEntry, user: String) -> Bool {
        global.serverFastClose && poolMode(database: database, user: user) == .session
    }

    /// A peer's pool_size: its own, else default_pool_size.
    public func poolSize(peer: PeerEntry) -> Int { peer.poolSize ?? global.defaultPoolSize }

    public func queryWaitTimeout(database: DatabaseEntry, user: String) -> TimeAmount {
        users[user]?.queryWaitTimeout ?? database.queryWaitTimeout ?? global.queryWaitTimeout
    }

    /// The databases whose servers must be replaced after a RELOAD to `new`, as PgBouncer decides:
    /// those whose connection settings changed or that are gone (servers in use close when
    /// released); nil means every database (the `*` entry or the server TLS settings changed).
    public func databasesToReconnect(after new: Config) -> [String]? {
        if global.serverTLS != new.global.serverTLS { return nil }
        if databases["*"].map(\.connection) != new.databases["*"].map(\.connection) { return nil }
        return databases.keys.filter { name in
            name != "*" && databases[name]?.connection != new.databases[name]?.connection
        }.sorted()
    }

    /// Loads a file and everything it includes.
    public static func load(path: String, readFile: (String) throws -> String) throws(ConfigError) -> Config {
        let text: String
        do { text = try readFile(path) } catch {
            throw ConfigError(file: path, line: 0, message: "cannot read config file")
        }
        return try parse(text, file: path, readFile: readFile)
    }

    public static func parse(
        _ text: String, file: String = "pooler.ini", readFile: (String) throws -> String = { _ in "" }
    ) throws(ConfigError) -> Config {
        let entries = try IniFile.parse(text, file: file, readFile: readFile)
        var config = Config()
        for entry in entries {
            switch entry.section {
            case "pooler", "pgbouncer":
                try config.applyGlobal(entry)
            case "databases":
                config.databases[entry.key] = try parseDatabase(entry)
            case "users":
                config.users[entry.key] = try parseUser(entry)
            case "peers":
                let peer = try parsePeer(entry)
                config.peers[peer.id] = peer
            default:
                config.warnings.append("\(entry.file):\(entry.line): unknown section [\(entry.section)]; ignored")
            }
        }
        return config
    }

    /// The `key=value` settings of a [databases] or [users] line, each ready to be parsed.
    static func settings(of entry: IniEntry) throws(ConfigError) -> [(String, String, Value)] {
        do {
            return try ConnectionString.parse(entry.value).map {
                ($0.0, $0.1, Value(entry: entry, key: $0.0, text: $0.1))
            }
        } catch {
            throw ConfigError(file: entry.file, line: entry.line, key: entry.key, message: error.message)
        }
    }

    static func parseDatabase(_ entry: IniEntry) throws(ConfigError) -> DatabaseEntry {
        var db = DatabaseEntry(name: entry.key)
        for (key, _, v) in try settings(of: entry) {
            guard let apply = Settings.named(key)?.applyDatabase else {
                throw ConfigError(
                    file: entry.file, line: entry.line, key: entry.key, message: "unknown database parameter \(key)")
            }
            try apply(&db, v)
        }
        return db
    }

    static func parsePeer(_ entry: IniEntry) throws(ConfigError) -> PeerEntry {
        guard let id = Int(entry.key), Peering.peerIDs.contains(id) else {
            throw ConfigError(
                file: entry.file, line: entry.line, key: entry.key,
                message: "a peer is named by its peer_id, \(Peering.peerIDs.lowerBound)..\(Peering.peerIDs.upperBound)")
        }
        var peer = PeerEntry(id: id)
        for (key, _, v) in try settings(of: entry) {
            switch key {
            case "host": peer.host = v.text
            case "port": peer.port = try v.int(1...65535)
            case "pool_size": peer.poolSize = try v.int(0...100_000)
            default:
                throw ConfigError(
                    file: entry.file, line: entry.line, key: entry.key, message: "unknown peer parameter \(key)")
            }
        }
        return peer
    }

    static func parseUser(_ entry: IniEntry) throws(ConfigError) -> UserEntry {
        var user = UserEntry(name: entry.key)
        for (key, _, v) in try settings(of: entry) {
            guard let apply = Settings.named(key)?.applyUser else {
                throw ConfigError(
                    file: entry.file, line: entry.line, key: entry.key, message: "unknown user parameter \(key)")
            }
            try apply(&user, v)
        }
        return user
    }

    mutating func applyGlobal(_ entry: IniEntry) throws(ConfigError) {
        guard let setting = Settings.named(entry.key), let apply = setting.applyGlobal else {
            if entry.key.hasPrefix("client_tls_") || entry.key.hasPrefix("server_tls_") {
                // A misspelt TLS key would leave TLS weaker than meant: refused, not ignored.
                throw ConfigError(file: entry.file, line: entry.line, key: entry.key, message: "unknown setting")
            }
            warnings.append("\(entry.file):\(entry.line): unknown setting \(entry.key); ignored")
            return
        }
        try apply(&global, Value(entry: entry, key: entry.key, text: entry.value))
        if setting.noEffect {
            warnings.append("\(entry.file):\(entry.line): \(entry.key) is accepted but has no effect")
        }
    }
}

extension Config {
    /// Settings that take effect only at start: SET refuses them, RELOAD warns about them.
    public static let fixedAtStart = Set(Settings.table.filter { !$0.changeable }.map(\.name))

    /// SET key = value from the admin console: a global setting changed at run time.
    public mutating func set(_ key: String, _ value: String) throws(PostgresError) {
        guard !Self.fixedAtStart.contains(key) else {
            throw PostgresError(code: SQLState.cantChangeRuntimeParam, message: "\(key) cannot be changed at run time")
        }
        guard Settings.named(key)?.applyGlobal != nil else {
            throw PostgresError(code: SQLState.undefinedObject, message: "unknown setting \(key)")
        }
        do {
            try applyGlobal(IniEntry(section: "pooler", key: key, value: value, file: "SET", line: 0))
        } catch {
            throw PostgresError(code: SQLState.invalidParameterValue, message: error.message)
        }
    }
}

/// A value being parsed, for error messages naming file, line and key.
public struct Value {
    let entry: IniEntry
    let key: String
    let text: String

    func fail(_ message: String) -> ConfigError {
        ConfigError(file: entry.file, line: entry.line, key: key, message: message)
    }

    func int(_ range: ClosedRange<Int>) throws(ConfigError) -> Int {
        guard let n = Int(text.trimmingWhitespace()) else { throw fail("'\(text)' is not an integer") }
        guard range.contains(n) else {
            throw fail("\(n) is out of range \(range.lowerBound)...\(range.upperBound)")
        }
        return n
    }

    func octal() throws(ConfigError) -> Int {
        guard let n = Int(text.trimmingWhitespace(), radix: 8) else { throw fail("'\(text)' is not an octal mode") }
        return n
    }

    func bool() throws(ConfigError) -> Bool {
        switch text.lowercased() {
        case "1", "on", "yes", "true": return true
        case "0", "off", "no", "false": return false
        default: throw fail("'\(text)' is not a boolean (use 0 or 1)")
        }
    }

    /// "secure", "all", "legacy" or a list of tlsv1.2 / tlsv1.3 (older versions are refused).
    func tlsProtocols() throws(ConfigError) -> String {
        let words = list().map { $0.lowercased() }
        let known = Set(["secure", "all", "legacy", "default"] + TLSSettings.versionNames.keys)
        guard !words.isEmpty, words.allSatisfy({ known.contains($0) }) else {
            throw fail("'\(text)' is not secure, all, legacy, or a list of tlsv1.0, tlsv1.1, tlsv1.2, tlsv1.3")
        }
        return words.joined(separator: ",")
    }

    func list() -> [String] {
        text.split(whereSeparator: { $0 == "," || $0 == " " }).map { String($0) }
    }

    func enumValue<E: RawRepresentable & CaseIterable>(_ type: E.Type) throws(ConfigError) -> E
    where E.RawValue == String {
        guard let value = E(rawValue: text.lowercased()) else {
            let allowed = E.allCases.map(\.rawValue).joined(separator: ", ")
            throw fail("'\(text)' is not one of \(allowed)")
        }
        return value
    }

    /// Seconds by default, fractions allowed; or a number with a unit: us, ms, s, min, h, d.
    func duration() throws(ConfigError) -> TimeAmount {
        let t = text.trimmingWhitespace().lowercased()
        let units: [(String, Double)] = [
            ("us", 1e-6), ("ms", 1e-3), ("min", 60), ("s", 1), ("h", 3600), ("d", 86400),
        ]
        var number = t
        var scale = 1.0
        for (suffix, factor) in units where t.hasSuffix(suffix) {
            number = String(t.dropLast(suffix.count)).trimmingWhitespace()
            scale = factor
            break
        }
        guard let value = Double(number), value >= 0, value.isFinite else {
            throw fail("'\(text)' is not a duration (seconds, or a number with us, ms, s, min, h, d)")
        }
        return .nanoseconds(Int64((value * scale * 1e9).rounded()))
    }
}
