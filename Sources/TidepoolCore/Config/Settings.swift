import NIOCore

/// The sections of the configuration file a setting may be written in.
public struct SettingSections: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// `[pooler]` (or `[pgbouncer]`).
    public static let pooler = SettingSections(rawValue: 1)
    /// A `[databases]` entry's connection string.
    public static let databases = SettingSections(rawValue: 2)
    /// A `[users]` entry.
    public static let users = SettingSections(rawValue: 4)
}

/// One setting: its name, where it may be written, how it is read and shown, whether SET and RELOAD
/// can change it while running, and one line of help. `Settings.table` holds them all; parsing,
/// SHOW CONFIG, SET, `--check` and the key list of pooler.ini.example follow from it.
public struct Setting: Sendable {
    typealias ApplyGlobal = @Sendable (inout GlobalSettings, Value) throws(ConfigError) -> Void
    typealias ApplyDatabase = @Sendable (inout DatabaseEntry, Value) throws(ConfigError) -> Void
    typealias ApplyUser = @Sendable (inout UserEntry, Value) throws(ConfigError) -> Void

    public let name: String
    public let sections: SettingSections
    /// The kind of value, as the help shows it.
    public let type: String
    /// SET and RELOAD change it while running (otherwise only a restart does).
    public let changeable: Bool
    public let help: String
    /// Accepted in `[pooler]` for compatibility with PgBouncer, but Tidepool does nothing with it:
    /// using it warns.
    public let noEffect: Bool
    let applyGlobal: ApplyGlobal?
    let showGlobal: (@Sendable (GlobalSettings) -> String)?
    let applyDatabase: ApplyDatabase?
    let applyUser: ApplyUser?

    /// The value the `[pooler]` section has when it does not name the setting.
    public var defaultValue: String { showGlobal?(GlobalSettings()) ?? "" }

    /// The value in `settings`, as SHOW CONFIG lists it.
    public func value(in settings: GlobalSettings) -> String { showGlobal?(settings) ?? "" }
}

extension Setting {
    /// A global setting, optionally also allowed per database and per user.
    static func global(
        _ name: String, _ type: String, changeable: Bool = true, _ help: String,
        also: SettingSections = [], database: ApplyDatabase? = nil, user: ApplyUser? = nil,
        apply: @escaping ApplyGlobal, show: @escaping @Sendable (GlobalSettings) -> String
    ) -> Setting {
        Setting(
            name: name, sections: also.union(.pooler), type: type, changeable: changeable, help: help,
            noEffect: false, applyGlobal: apply, showGlobal: show, applyDatabase: database, applyUser: user)
    }

    static func int(
        _ name: String, _ path: WritableKeyPath<GlobalSettings, Int> & Sendable, _ range: ClosedRange<Int>,
        changeable: Bool = true, _ help: String,
        also: SettingSections = [], database: ApplyDatabase? = nil, user: ApplyUser? = nil
    ) -> Setting {
        global(
            name, "integer \(range.lowerBound)..\(range.upperBound)", changeable: changeable, help, also: also,
            database: database, user: user, apply: { g, v throws(ConfigError) in g[keyPath: path] = try v.int(range) },
            show: { "\($0[keyPath: path])" })
    }

    static func bool(
        _ name: String, _ path: WritableKeyPath<GlobalSettings, Bool> & Sendable, changeable: Bool = true,
        _ help: String
    ) -> Setting {
        global(
            name, "boolean", changeable: changeable, help,
            apply: { g, v throws(ConfigError) in g[keyPath: path] = try v.bool() },
            show: { $0[keyPath: path] ? "1" : "0" })
    }

    static func text(
        _ name: String, _ path: WritableKeyPath<GlobalSettings, String> & Sendable, changeable: Bool = true,
        _ help: String
    ) -> Setting {
        global(
            name, "text", changeable: changeable, help, apply: { g, v in g[keyPath: path] = v.text },
            show: { $0[keyPath: path] })
    }

    /// Text where empty means unset.
    static func optionalText(
        _ name: String, _ path: WritableKeyPath<GlobalSettings, String?> & Sendable, changeable: Bool = true,
        _ help: String
    ) -> Setting {
        global(
            name, "text", changeable: changeable, help,
            apply: { g, v in g[keyPath: path] = v.text.isEmpty ? nil : v.text }, show: { $0[keyPath: path] ?? "" })
    }

    static func list(
        _ name: String, _ path: WritableKeyPath<GlobalSettings, [String]> & Sendable, _ help: String
    ) -> Setting {
        global(
            name, "comma-separated list", help, apply: { g, v in g[keyPath: path] = v.list() },
            show: { $0[keyPath: path].joined(separator: ",") })
    }

    static func duration(
        _ name: String, _ path: WritableKeyPath<GlobalSettings, TimeAmount> & Sendable, _ help: String,
        also: SettingSections = [], database: ApplyDatabase? = nil, user: ApplyUser? = nil
    ) -> Setting {
        global(
            name, "seconds (fractions and us, ms, s, min, h, d allowed)", help, also: also, database: database,
            user: user, apply: { g, v throws(ConfigError) in g[keyPath: path] = try v.duration() },
            show: { Settings.seconds($0[keyPath: path]) })
    }

    static func choice<E: RawRepresentable & CaseIterable & Sendable>(
        _ name: String, _ path: WritableKeyPath<GlobalSettings, E> & Sendable, _ help: String,
        also: SettingSections = [], database: ApplyDatabase? = nil, user: ApplyUser? = nil
    ) -> Setting where E.RawValue == String {
        global(
            name, E.allCases.map(\.rawValue).joined(separator: ", "), help, also: also, database: database,
            user: user, apply: { g, v throws(ConfigError) in g[keyPath: path] = try v.enumValue(E.self) },
            show: { $0[keyPath: path].rawValue })
    }

    /// A `[databases]` connection-string key only.
    static func database(_ name: String, _ type: String, _ help: String, apply: @escaping ApplyDatabase) -> Setting {
        Setting(
            name: name, sections: .databases, type: type, changeable: true, help: help, noEffect: false,
            applyGlobal: nil, showGlobal: nil, applyDatabase: apply, applyUser: nil)
    }

    /// A PgBouncer setting for something Tidepool leaves out: using it stops the load, saying why.
    static func unsupported(_ name: String, _ reason: String) -> Setting {
        Setting(
            name: name, sections: .pooler, type: "not supported", changeable: false, help: reason, noEffect: true,
            applyGlobal: { _, v throws(ConfigError) in throw v.fail(reason) }, showGlobal: nil, applyDatabase: nil,
            applyUser: nil)
    }

    /// A PgBouncer setting Tidepool accepts and ignores, with a warning.
    static func inert(_ name: String, _ help: String) -> Setting {
        Setting(
            name: name, sections: .pooler, type: "text", changeable: true, help: help, noEffect: true,
            applyGlobal: { g, v in g.inert[name] = v.text }, showGlobal: { $0.inert[name] ?? "" },
            applyDatabase: nil, applyUser: nil)
    }

    static func tls(_ side: String, _ path: WritableKeyPath<GlobalSettings, TLSSettings> & Sendable) -> [Setting] {
        let sslmodeHelp =
            side == "client"
            ? "TLS for clients: require refuses plaintext TCP; verify-ca and verify-full ask for a certificate"
            : "TLS to servers: prefer falls back to plaintext; verify-full checks the host name"
        func one(
            _ key: String, _ type: String, _ help: String, show: @escaping @Sendable (TLSSettings) -> String
        ) -> Setting {
            // PgBouncer names the TLS 1.3 suites client_tls13_ciphers, not client_tls_tls13_ciphers.
            global(
                key == "tls13_ciphers" ? "\(side)_tls13_ciphers" : "\(side)_tls_\(key)", type, help,
                apply: { g, v throws(ConfigError) in try g[keyPath: path].apply(key, v) },
                show: { show($0[keyPath: path]) })
        }
        return [
            one("sslmode", SSLMode.allCases.map(\.rawValue).joined(separator: ", "), sslmodeHelp) {
                $0.sslmode.rawValue
            },
            one("key_file", "path", "private key (PEM), re-read on RELOAD") { $0.keyFile },
            one("cert_file", "path", "certificate (PEM), re-read on RELOAD") { $0.certFile },
            one("ca_file", "path", "CA certificates (PEM) to verify the other side") { $0.caFile },
            one("protocols", "secure, all, legacy or tlsv1.0..tlsv1.3", "TLS versions allowed") { $0.protocols },
            one("ciphers", "OpenSSL cipher list", "ciphers for TLS 1.2; default keeps the library's") { $0.ciphers },
            one(
                "tls13_ciphers", "TLS 1.3 suites, colon-separated",
                "TLS 1.3 suites; empty: the library's, and a list must name its three GCM/CHACHA20 suites"
            ) { $0.tls13Ciphers },
        ]
            + (side == "client"
                ? [
                    one("ecdhcurve", "auto or a curve name", "the ECDH curve offered to clients; auto: the library's") {
                        $0.ecdhCurve
                    },
                    one(
                        "dheparams", "none, auto or legacy",
                        "finite-field DHE; the TLS library has none, so every value works as none"
                    ) { $0.dheParams },
                ] : [])
    }
}

public enum Settings {
    /// PgBouncer's auth_type values Tidepool leaves out, and why.
    static let unsupportedAuthTypes = [
        "ldap": "LDAP is not supported: Tidepool has no LDAP client; use scram-sha-256 with auth_query or auth_file",
        "pam": "PAM is not supported: Tidepool does not call PAM; use scram-sha-256 with auth_query or auth_file",
    ]

    /// Every setting Tidepool reads, in the order pooler.ini.example explains them.
    public static let table: [Setting] = {
        var t: [Setting] = []
        // Where clients connect.
        t += [
            .text("listen_addr", \.listenAddr, changeable: false, "comma-separated addresses; * for all"),
            .int("listen_port", \.listenPort, 0...65535, changeable: false, "TCP port"),
            .text("unix_socket_dir", \.unixSocketDir, changeable: false, "directory of the Unix socket; empty: none"),
            .global(
                "unix_socket_mode", "octal file mode", changeable: false, "permissions of the Unix socket",
                apply: { g, v throws(ConfigError) in g.unixSocketMode = try v.octal() },
                show: { "0" + String($0.unixSocketMode, radix: 8) }),
            .int("listen_backlog", \.listenBacklog, 1...65535, changeable: false, "accept queue length"),
            .optionalText(
                "unix_socket_group", \.unixSocketGroup, changeable: false, "group the Unix socket belongs to"),
            .bool(
                "tcp_defer_accept", \.tcpDeferAccept, changeable: false,
                "TCP_DEFER_ACCEPT (45 s): a client is accepted once it has sent something"),
            .bool("so_reuseport", \.soReuseport, changeable: false, "let other processes listen on the same port"),
            .int(
                "peer_id", \.peerID, 0...Peering.peerIDs.upperBound, changeable: false,
                "this process's number among the [peers], carried in its cancel keys; 0: peering off"),
        ]
        // Authentication.
        t += [
            .global(
                "auth_type", AuthType.allCases.map(\.rawValue).joined(separator: ", "),
                "how clients prove who they are",
                apply: { g, v throws(ConfigError) in
                    if let reason = Settings.unsupportedAuthTypes[v.text.lowercased()] { throw v.fail(reason) }
                    g.authType = try v.enumValue(AuthType.self)
                }, show: { $0.authType.rawValue }),
            .unsupported("auth_ldap_options", Settings.unsupportedAuthTypes["ldap"]!),
            .optionalText("auth_file", \.authFile, changeable: false, "\"user\" \"secret\" per line"),
            .optionalText("auth_hba_file", \.authHBAFile, "pg_hba.conf-style rules for auth_type = hba"),
            .optionalText(
                "auth_ident_file", \.authIdentFile, "pg_ident.conf-style user maps for the HBA peer method's map="),
            .optionalText("auth_user", \.authUser, "user that runs auth_query for users missing from auth_file"),
            .text("auth_query", \.authQuery, "query that returns a user's name and secret"),
            .optionalText("auth_dbname", \.authDBName, "database auth_query runs in"),
            .int(
                "scram_iterations", \.scramIterations, 1...100_000_000,
                "SCRAM iterations when the pooler makes a verifier from a plain-text password"),
            .duration("auth_query_cache_ttl", \.authQueryCacheTTL, "how long a looked-up secret is reused"),
            .int("max_client_conn_per_ip", \.maxClientConnPerIP, 0...10_000_000, "connections per client address"),
            .int(
                "client_connect_rate_per_ip", \.clientConnectRatePerIP, 0...10_000_000,
                "new connections per second per client address"),
        ]
        t += Setting.tls("client", \.clientTLS) + Setting.tls("server", \.serverTLS)
        // Pooling.
        t += [
            .choice(
                "pool_mode", \.poolMode, "when a server goes back to the pool", also: [.databases, .users],
                database: { d, v throws(ConfigError) in d.poolMode = try v.enumValue(PoolMode.self) },
                user: { u, v throws(ConfigError) in u.poolMode = try v.enumValue(PoolMode.self) }),
            .choice(
                "session_state", \.sessionState,
                "track: settings replayed per client, LISTEN served by the pooler, pinned otherwise; refuse; ignore",
                also: [.databases, .users],
                database: { d, v throws(ConfigError) in d.sessionState = try v.enumValue(SessionStateMode.self) },
                user: { u, v throws(ConfigError) in u.sessionState = try v.enumValue(SessionStateMode.self) }),
            .int(
                "notify_queue_size", \.notifyQueueSize, 1...10_000_000,
                "notifications a client may leave unread before it is closed"),
            .int("default_pool_size", \.defaultPoolSize, 1...100_000, "servers per (database, user) pool"),
            .int(
                "min_pool_size", \.minPoolSize, 0...100_000, "servers kept open per pool", also: .databases,
                database: { d, v throws(ConfigError) in d.minPoolSize = try v.int(0...100_000) }),
            .int(
                "reserve_pool_size", \.reservePoolSize, 0...100_000, "extra servers for a pool whose clients wait",
                also: [.databases, .users],
                database: { d, v throws(ConfigError) in d.reservePoolSize = try v.int(0...100_000) },
                user: { u, v throws(ConfigError) in u.reservePoolSize = try v.int(0...100_000) }),
            .duration(
                "query_wait_notify", \.queryWaitNotify, "a client queued this long is told so with a NOTICE (0: never)"),
            .text(
                "login_notify_message", \.loginNotifyMessage,
                "a NOTICE sent to each client once logged in, so that people know a pooler answers; empty: none"),
            .duration("reserve_pool_timeout", \.reservePoolTimeout, "how long a client waits before the reserve opens"),
            .int("max_client_conn", \.maxClientConn, 1...10_000_000, "clients held at once"),
            .int(
                "max_db_connections", \.maxDBConnections, 0...1_000_000, "servers per database (0: no limit)",
                also: .databases,
                database: { d, v throws(ConfigError) in d.maxDBConnections = try v.int(0...1_000_000) }),
            .int(
                "max_user_connections", \.maxUserConnections, 0...1_000_000, "servers per user (0: no limit)",
                also: .users, user: { u, v throws(ConfigError) in u.maxUserConnections = try v.int(0...1_000_000) }),
            .int(
                "max_db_client_connections", \.maxDBClientConnections, 0...10_000_000,
                "clients per database (0: no limit)", also: .databases,
                database: { d, v throws(ConfigError) in d.maxDBClientConnections = try v.int(0...10_000_000) }),
            .int(
                "max_user_client_connections", \.maxUserClientConnections, 0...10_000_000,
                "clients per user (0: no limit)", also: .users,
                user: { u, v throws(ConfigError) in u.maxUserClientConnections = try v.int(0...10_000_000) }),
            .bool("server_round_robin", \.serverRoundRobin, "lend idle servers oldest-released first"),
            .bool(
                "server_connect_fail_fast", \.serverConnectFailFast,
                "while a database that has not served cannot be reached, fail clients at once instead of waiting"),
            .int("threads", \.threads, 0...1024, changeable: false, "event-loop threads; 0: one per core"),
        ]
        // Server connections.
        t += [
            .text("server_reset_query", \.serverResetQuery, "cleans a session-mode server before reuse"),
            .bool("server_reset_query_always", \.serverResetQueryAlways, "run it in every pool mode"),
            .bool(
                "server_fast_close", \.serverFastClose,
                "session pooling: a server RECONNECT or RELOAD replaces ends its client's session at the transaction's end"
            ),
            .text("server_check_query", \.serverCheckQuery, "checks a server idle for server_check_delay; empty: off"),
            .duration("server_check_delay", \.serverCheckDelay, "idle time before a server is checked"),
            .duration(
                "server_lifetime", \.serverLifetime, "servers older than this are closed when released",
                also: .databases, database: { d, v throws(ConfigError) in d.serverLifetime = try v.duration() }),
            .duration("server_idle_timeout", \.serverIdleTimeout, "idle servers are closed after this"),
            .duration(
                "pool_idle_timeout", \.poolIdleTimeout,
                "a pool without clients or servers this long is freed; 0: kept"),
            .duration(
                "autodb_idle_timeout", \.autodbIdleTimeout,
                "the same for pools of databases made from the * entry; 0: kept"),
            .duration("server_connect_timeout", \.serverConnectTimeout, "connect and login time limit"),
            .duration("server_login_retry", \.serverLoginRetry, "wait after a failed server login"),
            .duration(
                "cancel_wait_timeout", \.cancelWaitTimeout,
                "a cancel request queued for a peer (its pool_size busy) longer than this is dropped; 0: never"),
            .duration(
                "suspend_timeout", \.suspendTimeout,
                "SUSPEND waits this long for lent servers, then drops their clients; 0: no limit"),
            .duration("dns_max_ttl", \.dnsMaxTTL, "how long a server host name's addresses are kept"),
            .duration("dns_nxdomain_ttl", \.dnsNxdomainTTL, "how long a failed host name lookup is kept"),
            .duration(
                "dns_zone_check_period", \.dnsZoneCheckPeriod,
                "how often zones' SOA serials are asked for; a change looks their names up again; 0: off"),
            .optionalText(
                "resolv_conf", \.resolvConf, changeable: false,
                "resolv.conf whose name servers the pooler asks itself; empty: the system resolver"),
            .int(
                "pkt_buf", \.pktBuf, 512...16_777_216, changeable: false,
                "largest read buffer of a connection (a read takes at most this much)"),
            .int(
                "sbuf_loopcnt", \.sbufLoopcnt, 0...1_000_000,
                "reads a connection gets before the others' turn (0: no limit, which is 64 here); new connections"),
            .bool("tcp_keepalive", \.tcpKeepalive, "TCP keepalive on server connections"),
            .int("tcp_keepidle", \.tcpKeepidle, 0...86_400, "idle seconds before keepalive probes"),
            .int("tcp_keepintvl", \.tcpKeepintvl, 0...86_400, "seconds between keepalive probes"),
            .int("tcp_keepcnt", \.tcpKeepcnt, 0...1000, "keepalive probes before giving up"),
            .int("tcp_user_timeout", \.tcpUserTimeout, 0...86_400_000, "TCP_USER_TIMEOUT in milliseconds"),
            .int(
                "tcp_socket_buffer", \.tcpSocketBuffer, 0...268_435_456,
                "SO_SNDBUF and SO_RCVBUF of TCP connections in bytes; 0: the kernel's"),
        ]
        // Client timeouts.
        t += [
            .duration(
                "query_timeout", \.queryTimeout, "cancel queries running longer", also: .users,
                user: { u, v throws(ConfigError) in u.queryTimeout = try v.duration() }),
            .duration(
                "query_wait_timeout", \.queryWaitTimeout, "longest wait for a server", also: [.databases, .users],
                database: { d, v throws(ConfigError) in d.queryWaitTimeout = try v.duration() },
                user: { u, v throws(ConfigError) in u.queryWaitTimeout = try v.duration() }),
            .duration(
                "client_idle_timeout", \.clientIdleTimeout, "close clients idle longer", also: .users,
                user: { u, v throws(ConfigError) in u.clientIdleTimeout = try v.duration() }),
            .duration("client_login_timeout", \.clientLoginTimeout, "close clients that do not log in in time"),
            .duration(
                "idle_transaction_timeout", \.idleTransactionTimeout, "close clients idle in a transaction",
                also: .users, user: { u, v throws(ConfigError) in u.idleTransactionTimeout = try v.duration() }),
            .duration(
                "transaction_timeout", \.transactionTimeout, "close clients whose transaction runs longer",
                also: .users, user: { u, v throws(ConfigError) in u.transactionTimeout = try v.duration() }),
            .duration("shutdown_timeout", \.shutdownTimeout, "how long SIGTERM and SIGINT wait before closing"),
        ]
        // Protocol.
        t += [
            .int("max_packet_size", \.maxPacketSize, 9...2_147_483_647, "largest message a client may send"),
            .int(
                "max_buffered_bytes", \.maxBufferedBytes, 4096...67_108_864,
                "bytes queued for one connection before the pooler stops reading its peer"),
            .int(
                "max_prepared_statements", \.maxPreparedStatements, 0...100_000,
                "named prepared statements kept per server in transaction mode; 0: pass through"),
            .list("ignore_startup_parameters", \.ignoreStartupParameters, "startup parameters dropped silently"),
            .list(
                "track_extra_parameters", \.trackExtraParameters,
                "startup parameters kept per client and set on each server lent (session_state = track: all)"),
            .bool(
                "application_name_add_host", \.applicationNameAddHost,
                "append the client's address and port to its application_name at login"),
            .bool("disable_pqexec", \.disablePqexec, "refuse the simple query protocol"),
        ]
        // Administration and logging.
        t += [
            .list("admin_users", \.adminUsers, "users allowed every admin command"),
            .list("stats_users", \.statsUsers, "users allowed the read-only admin commands"),
            .duration("stats_period", \.statsPeriod, "period of averages and log_stats"),
            .bool("log_stats", \.logStats, "log rates and averages every stats_period"),
            .global(
                "log_slow_query_ms", "milliseconds", "log queries slower than this; 0: off",
                apply: { g, v throws(ConfigError) in g.logSlowQuery = .milliseconds(Int64(try v.int(0...86_400_000))) },
                show: { "\($0.logSlowQuery.nanoseconds / 1_000_000)" }),
            .text("stats_listen_addr", \.statsListenAddr, changeable: false, "address of /metrics and /health"),
            .int("stats_listen_port", \.statsListenPort, 0...65535, changeable: false, "port of /metrics; 0: off"),
            .text("instance_id", \.instanceID, changeable: false, "name in logs, SHOW STATE and metrics"),
            .bool("log_connections", \.logConnections, "log logins"),
            .bool("log_disconnections", \.logDisconnections, "log disconnections with their reason"),
            .bool("log_pooler_errors", \.logPoolerErrors, "log the errors the pooler sends to clients"),
            .int("verbose", \.verbose, 0...10, "more log detail"),
            .optionalText("logfile", \.logfile, changeable: false, "log file; default standard error"),
            .bool("syslog", \.syslog, "also send the log to syslog"),
            .text("syslog_ident", \.syslogIdent, "the name syslog lines carry"),
            .choice("syslog_facility", \.syslogFacility, "the syslog facility"),
            .optionalText("pidfile", \.pidfile, changeable: false, "file the process id is written to"),
            .optionalText("user", \.user, changeable: false, "operating-system user to switch to at start (as -u)"),
            .optionalText("conffile", \.conffile, "the file RELOAD reads; empty: the one given at start"),
        ]
        // [databases] connection-string keys.
        t += [
            .database("host", "host names or socket directories", "where the database is (a,b: several)") { d, v in
                d.host = v.text
            },
            .database("load_balance_hosts", "round-robin or disable", "which host of a list new servers go to") {
                d, v throws(ConfigError) in d.loadBalanceHosts = try v.enumValue(LoadBalanceHosts.self)
            },
            .database(
                "target_session_attrs", TargetSessionAttrs.allCases.map(\.rawValue).joined(separator: ", "),
                "which servers are accepted, by what PostgreSQL 14+ reports (with a host list: the next host is tried)"
            ) { d, v throws(ConfigError) in d.targetSessionAttrs = try v.enumValue(TargetSessionAttrs.self) },
            .database("port", "integer 1..65535", "its port") { d, v throws(ConfigError) in
                d.port = try v.int(1...65535)
            },
            .database("dbname", "text", "its name on the server") { d, v in d.dbname = v.text },
            .database("user", "text", "log in to the server as this user") { d, v in d.user = v.text },
            .database("password", "text", "that user's password") { d, v in d.password = v.text },
            Setting(
                name: "pool_size", sections: [.databases, .users], type: "integer 0..100000", changeable: true,
                help: "servers of this database's or user's pools", noEffect: false, applyGlobal: nil,
                showGlobal: nil, applyDatabase: { d, v throws(ConfigError) in d.poolSize = try v.int(0...100_000) },
                applyUser: { u, v throws(ConfigError) in u.poolSize = try v.int(0...100_000) }),
            .database("reserve_pool", "integer 0..100000", "PgBouncer's older name of reserve_pool_size") {
                d, v throws(ConfigError) in d.reservePoolSize = try v.int(0...100_000)
            },
            .database("connect_query", "SQL", "run on each new server connection") { d, v in d.connectQuery = v.text },
            .database("client_encoding", "text", "server connections start with it") { d, v in
                d.clientEncoding = v.text
            },
            .database("datestyle", "text", "server connections start with it") { d, v in d.datestyle = v.text },
            .database("timezone", "text", "server connections start with it") { d, v in d.timezone = v.text },
            .database("application_name", "text", "server connections start with it") { d, v in
                d.applicationName = v.text
            },
            .database("auth_user", "text", "auth_user for logins to this database") { d, v in d.authUser = v.text },
            .database("auth_query", "SQL", "auth_query for logins to this database") { d, v in d.authQuery = v.text },
            .database("auth_dbname", "text", "where auth_query runs for this database") { d, v in
                d.authDBName = v.text
            },
        ]
        // PgBouncer's settings Tidepool has no use for.
        t += [
            .inert("stats_users_prefix", "not used"),
            .inert("job_name", "not used"),
            .inert("service_name", "not used"),
            .inert("server_check_delay_ms", "use server_check_delay"),
        ]
        return t
    }()

    /// A name may stand in the table twice (auth_user globally and per database): one entry for both.
    static let byName: [String: Setting] = {
        var names: [String: Setting] = [:]
        for setting in table {
            guard let other = names[setting.name] else {
                names[setting.name] = setting
                continue
            }
            names[setting.name] = Setting(
                name: setting.name, sections: other.sections.union(setting.sections), type: other.type,
                changeable: other.changeable && setting.changeable, help: other.help,
                noEffect: other.noEffect || setting.noEffect, applyGlobal: other.applyGlobal ?? setting.applyGlobal,
                showGlobal: other.showGlobal ?? setting.showGlobal,
                applyDatabase: other.applyDatabase ?? setting.applyDatabase,
                applyUser: other.applyUser ?? setting.applyUser)
        }
        return names
    }()

    /// The setting called `name`, whatever sections allow it.
    public static func named(_ name: String) -> Setting? { byName[name] }

    /// Settings of `[pooler]`, as SHOW CONFIG lists them: (name, value, default, changeable).
    public static func show(_ settings: GlobalSettings) -> [(String, String, String, Bool)] {
        table.filter { $0.sections.contains(.pooler) }.map {
            ($0.name, $0.value(in: settings), $0.defaultValue, $0.changeable)
        }
    }

    static func seconds(_ t: TimeAmount) -> String {
        let ms = t.nanoseconds / 1_000_000
        return ms % 1000 == 0 ? "\(ms / 1000)" : "\(Double(ms) / 1000)"
    }
}
