import Foundation
import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct ConfigTests {
    @Test func readsPgBouncerIniWithAliasSectionAndDatabases() throws {
        let text = """
            ;; a pgbouncer.ini
            [databases]
            app = host=10.0.0.5 port=6543 dbname=appdb user=svc password='it''s' pool_size=7 pool_mode=session
            quoted = host=db connect_query='SELECT 1' timezone=UTC
            * = host=fallback

            [users]
            alice = pool_mode=statement pool_size=3 max_user_connections=9

            [pgbouncer]
            listen_addr = *
            listen_port = 7432
            auth_type = scram-sha-256
            default_pool_size = 15
            query_wait_timeout = 2.5
            server_lifetime = 10min
            admin_users = root, ops
            unknown_thing = 1
            """
        let config = try Config.parse(text)
        #expect(config.global.listenAddr == "*")
        #expect(config.global.listenPort == 7432)
        #expect(config.global.authType == .scramSHA256)
        #expect(config.global.defaultPoolSize == 15)
        #expect(config.global.queryWaitTimeout == .milliseconds(2500))
        #expect(config.global.serverLifetime == .seconds(600))
        #expect(config.global.adminUsers == ["root", "ops"])
        #expect(config.warnings.count == 1)
        #expect(config.warnings[0].contains("unknown_thing"))
        let app = config.databases["app"]!
        #expect(app.host == "10.0.0.5")
        #expect(app.port == 6543)
        #expect(app.dbname == "appdb")
        #expect(app.password == "it's")
        #expect(app.poolSize == 7)
        #expect(app.poolMode == .session)
        #expect(config.databases["quoted"]!.connectQuery == "SELECT 1")
        // The fallback entry serves any name, with that name as dbname.
        let other = config.database(named: "reports")!
        #expect(other.host == "fallback")
        #expect(other.dbname == "reports")
        // Users override databases, which override the global setting.
        #expect(config.poolMode(database: app, user: "alice") == .statement)
        #expect(config.poolMode(database: app, user: "bob") == .session)
        #expect(config.poolSize(database: app, user: "alice") == 3)
        #expect(config.poolSize(database: other, user: "bob") == 15)
    }

    @Test func queryWaitTimeoutPerUserOverPerDatabaseOverGlobal() throws {
        let config = try Config.parse(
            "[databases]\nslow = host=h query_wait_timeout=30\nfast = host=h\n[users]\nimpatient = query_wait_timeout=2\n"
                + "[pooler]\nquery_wait_timeout = 60\n")
        let slow = config.databases["slow"]!
        let fast = config.databases["fast"]!
        #expect(config.queryWaitTimeout(database: slow, user: "bob") == .seconds(30))
        #expect(config.queryWaitTimeout(database: fast, user: "bob") == .seconds(60))
        #expect(config.queryWaitTimeout(database: slow, user: "impatient") == .seconds(2))
    }

    /// PgBouncer 1.24+ keys in the sections it allows them: client limits, per-database
    /// server_lifetime, per-user reserve_pool_size; SHOW DATABASES and SHOW USERS show them.
    @Test func pgBouncer124KeysPerDatabaseAndPerUser() throws {
        let config = try Config.parse(
            """
            [databases]
            d = host=h server_lifetime=60 max_db_client_connections=7
            [users]
            u = reserve_pool_size=3 max_user_client_connections=4
            [pooler]
            max_db_client_connections = 9
            max_user_client_connections = 11
            """)
        #expect(config.databases["d"]?.serverLifetime == .seconds(60))
        #expect(config.maxDBClientConnections(database: "d") == 7)
        #expect(config.maxDBClientConnections(database: "other") == 9)
        #expect(config.users["u"]?.reservePoolSize == 3)
        #expect(config.maxUserClientConnections(user: "u") == 4)
        #expect(config.maxUserClientConnections(user: "v") == 11)
        let databases = AdminViews.databases(config, currentConnections: [:], clients: ["d": 2])
        let d = Dictionary(uniqueKeysWithValues: zip(databases.columns, databases.rows[0]))
        #expect(d["server_lifetime"] == "60" && d["max_client_connections"] == "7")
        #expect(d["current_client_connections"] == "2")
        let users = AdminViews.users(config, poolUsers: [], serverConnections: [:], clients: ["u": 1])
        let u = Dictionary(uniqueKeysWithValues: zip(users.columns, users.rows.first { $0[0] == "u" }!))
        #expect(u["reserve_pool_size"] == "3" && u["max_user_client_connections"] == "4")
        #expect(u["current_client_connections"] == "1")
    }

    @Test func poolerSectionIsTheGlobalSection() throws {
        let config = try Config.parse("[pooler]\npool_mode = statement\n")
        #expect(config.global.poolMode == .statement)
    }

    @Test func noFallbackMeansUnknownDatabase() throws {
        let config = try Config.parse("[databases]\na = host=x\n")
        #expect(config.database(named: "b") == nil)
    }

    @Test func invalidValuesNameFileLineAndKey() {
        let cases: [(String, Int, String)] = [
            ("[pooler]\n\nlisten_port = abc\n", 3, "listen_port"),
            ("[pooler]\npool_mode = sometimes\n", 2, "pool_mode"),
            ("[pooler]\nquery_wait_timeout = soon\n", 2, "query_wait_timeout"),
            ("[databases]\nx = port=99999\n", 2, "port"),
            ("[databases]\nx = colour=blue\n", 2, "x"),
        ]
        for (text, line, key) in cases {
            do {
                _ = try Config.parse(text, file: "my.ini")
                Issue.record("\(text) should fail")
            } catch {
                #expect(error.file == "my.ini")
                #expect(error.line == line)
                #expect(error.key == key)
                #expect(error.description.hasPrefix("my.ini:\(line): "))
            }
        }
    }

    @Test func includeReadsAnotherFileInPlace() throws {
        let files = ["extra.ini": "default_pool_size = 33\n[databases]\nfromfile = host=h\n"]
        let config = try Config.parse("[pooler]\n%include extra.ini\n") { path in
            guard let text = files[path] else { throw ConfigError(file: path, line: 0, message: "missing") }
            return text
        }
        #expect(config.global.defaultPoolSize == 33)
        #expect(config.databases["fromfile"]?.host == "h")
        #expect(throws: ConfigError.self) {
            try Config.parse("[pooler]\n%include nope.ini\n") { _ in throw ConfigError(file: "", line: 0, message: "") }
        }
    }

    @Test func connectionStringQuotesAndEscapes() throws {
        let pairs = try ConnectionString.parse(#"host=a  password='x y\'z' dbname = d"#)
        #expect(pairs.map(\.0) == ["host", "password", "dbname"])
        #expect(pairs.map(\.1) == ["a", "x y'z", "d"])
        #expect(throws: ConfigError.self) { try ConnectionString.parse("host='open") }
    }

    @Test func shippedExampleParsesWithoutWarnings() throws {
        // The example lives at the package root; tests run from there.
        let path = #filePath.replacingOccurrences(
            of: "Tests/TidepoolCoreTests/ConfigTests.swift", with: "pooler.ini.example")
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let config = try Config.parse(text, file: "pooler.ini.example")
        #expect(config.warnings.filter { $0.contains("unknown") }.isEmpty)
        #expect(!config.databases.isEmpty)
    }
}

/// The one table of settings: everything that reads or shows settings follows from it.
@Suite struct SettingsTableTests {
    static let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("pooler.ini.example")

    @Test func everyPoolerSettingIsInTheExampleAndNothingElse() throws {
        let text = try String(contentsOf: Self.example, encoding: .utf8)
        var keys = Set<String>()
        var section = ""
        for raw in text.split(separator: "\n") {
            var line = Substring(raw)
            if line.hasPrefix("[") || line.hasPrefix(";[") {  // a section, maybe commented out
                section = String(line.drop { $0 == ";" || $0 == "[" }.dropLast())
            }
            guard section == "pooler", !line.hasPrefix(";;"), !line.hasPrefix("; ") else { continue }
            if line.hasPrefix(";") { line = line.dropFirst() }
            guard let eq = line.firstIndex(of: "=") else { continue }
            let key = line[..<eq].trimmingWhitespace()
            if !key.isEmpty, !key.contains(" ") { keys.insert(key) }
        }
        let table = Set(Settings.table.filter { $0.sections.contains(.pooler) && !$0.noEffect }.map(\.name))
        #expect(table.subtracting(keys).sorted() == [], "settings missing from pooler.ini.example")
        #expect(keys.subtracting(table).sorted() == [], "keys in pooler.ini.example that Tidepool does not know")
    }

    /// Each setting's shown default reads back as the same value, and SHOW CONFIG lists each once.
    @Test func defaultsReadBackAsThemselves() throws {
        var seen = Set<String>()
        for (name, value, defaultValue, _) in Config().displaySettings {
            #expect(seen.insert(name).inserted, "\(name) listed twice")
            #expect(value == defaultValue)
            guard !(Settings.named(name)?.noEffect ?? false) else { continue }
            let config = try Config.parse("[pooler]\n\(name) = \(defaultValue)\n")
            #expect(config.warnings == [], "\(name)")
            #expect(config.displaySettings.first { $0.0 == name }?.1 == defaultValue, "\(name)")
        }
        #expect(seen.count > 80)
    }

    @Test func sectionsDecideWhereAKeyMayStand() throws {
        for setting in Settings.table {
            let value =
                switch setting.name {
                case "session_state": "ignore"
                case "load_balance_hosts": "disable"
                case "target_session_attrs": "read-write"
                default: setting.name.hasSuffix("mode") ? "session" : "1"
                }
            let inDatabase = Result { try Config.parse("[databases]\nd = host=h \(setting.name)=\(value)\n") }
            let inUser = Result { try Config.parse("[users]\nu = \(setting.name)=\(value)\n") }
            let merged = Settings.named(setting.name)!
            #expect((try? inDatabase.get()) != nil || !merged.sections.contains(.databases), "\(setting.name)")
            #expect((try? inUser.get()) != nil || !merged.sections.contains(.users), "\(setting.name)")
            if !merged.sections.contains(.databases) {
                #expect(throws: ConfigError.self) { try inDatabase.get() }
            }
            if !merged.sections.contains(.users) { #expect(throws: ConfigError.self) { try inUser.get() } }
        }
    }

    @Test func inertSettingsWarnAndAreShown() throws {
        let config = try Config.parse("[pooler]\njob_name = x\n")
        #expect(config.warnings.count == 1 && config.warnings[0].contains("no effect"))
        #expect(config.displaySettings.first { $0.0 == "job_name" }?.1 == "x")
    }

    /// TLS 1.3 suites: a list naming the three the TLS library always offers is taken (the CCM
    /// ones may stand beside them); one leaving one out is refused with the reason, as is a name
    /// that is no suite. dheparams: PgBouncer's three values.
    @Test func tls13CiphersAndDheparams() throws {
        let all = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_128_CCM_SHA256"
        let config = try Config.parse(
            "[pgbouncer]\nclient_tls13_ciphers = \(all)\nserver_tls13_ciphers = \(all)\nclient_tls_dheparams = legacy\n"
        )
        #expect(config.warnings.isEmpty)
        #expect(config.global.clientTLS.tls13Ciphers == all && config.global.clientTLS.dheParams == "legacy")
        #expect(config.displaySettings.first { $0.0 == "server_tls13_ciphers" }?.1 == all)
        do {
            _ = try Config.parse("[pgbouncer]\nclient_tls13_ciphers = TLS_AES_256_GCM_SHA384\n")
            Issue.record("a list the TLS library cannot keep to was taken")
        } catch {
            #expect(error.key == "client_tls13_ciphers")
            #expect(error.message.contains("cannot leave out TLS_AES_128_GCM_SHA256, TLS_CHACHA20_POLY1305_SHA256"))
        }
        #expect(throws: ConfigError.self) { try Config.parse("[pgbouncer]\nserver_tls13_ciphers = RC4\n") }
        #expect(throws: ConfigError.self) { try Config.parse("[pgbouncer]\nclient_tls_dheparams = 4096\n") }
        #expect(throws: ConfigError.self) { try Config.parse("[pgbouncer]\nserver_tls_dheparams = auto\n") }
    }

    @Test func pgbouncer125KeysLoad() throws {
        // Read with their effect: no warning.
        let effective = try Config.parse(
            "[pgbouncer]\nunix_socket_group = postgres\nconffile = /etc/pgbouncer.ini\nuser = postgres\n"
                + "tcp_defer_accept = 1\ntcp_socket_buffer = 65536\ncancel_wait_timeout = 5\n"
                + "client_tls_ecdhcurve = x25519\nsyslog = 1\nsyslog_ident = pooler\nsyslog_facility = local0\n"
                + "pool_idle_timeout = 60\nautodb_idle_timeout = 600\n")
        #expect(effective.warnings.isEmpty)
        #expect(effective.global.unixSocketGroup == "postgres" && effective.global.conffile == "/etc/pgbouncer.ini")
        #expect(effective.global.user == "postgres" && effective.global.tcpDeferAccept)
        #expect(effective.global.tcpSocketBuffer == 65536)
        #expect(effective.global.syslog && effective.global.syslogFacility == .local0)
        #expect(throws: ConfigError.self) { try Config.parse("[pooler]\nsyslog_facility = kernel\n") }
    }
}

/// RELOAD replaces the servers whose connection settings changed, as PgBouncer does.
@Suite struct ReloadReconnectTests {
    @Test func changedRemovedAndWildcardDatabases() throws {
        let old = try Config.parse(
            "[databases]\na = host=h1 port=5432\nb = host=h2\nc = host=h3\n[pooler]\npool_mode = session\n")
        let new = try Config.parse(
            "[databases]\na = host=h1 port=5433\nb = host=h2 pool_size=9\nd = host=h4\n[pooler]\n")
        // a's port changed, c is gone; b's pool size and the global pool_mode are not connection settings.
        #expect(old.databasesToReconnect(after: new) == ["a", "c"])
        #expect(old.databasesToReconnect(after: old) == [])
        let wildcard = try Config.parse("[databases]\n* = host=h1\n")
        #expect(wildcard.databasesToReconnect(after: try Config.parse("[databases]\n* = host=h9\n")) == nil)
        var tls = old
        tls.global.serverTLS.sslmode = .require
        #expect(old.databasesToReconnect(after: tls) == nil)
    }
}

/// Per-pool settings looked up in the configuration.
@Suite struct PoolSettingLookupTests {
    @Test func freeAfterFastCloseAndPeerPoolSize() throws {
        let config = try Config.parse(
            "[databases]\nnamed = host=h\n* = host=h\n[users]\ns = pool_mode=session\n[peers]\n1 = host=/p\n"
                + "2 = host=/q pool_size=3\n[pooler]\npool_idle_timeout = 600\nautodb_idle_timeout = 60\n"
                + "server_fast_close = 1\n")
        let named = config.database(named: "named")!
        let auto = config.database(named: "other")!
        #expect(config.poolFreeAfter(database: named) == .seconds(600))
        #expect(config.poolFreeAfter(database: auto) == .seconds(60))  // the shorter of the two
        let defaults = try Config.parse("[databases]\nnamed = host=h\n")
        #expect(defaults.poolFreeAfter(database: named) == .zero)  // pool_idle_timeout 0: kept
        #expect(defaults.poolFreeAfter(database: auto) == .seconds(3600))  // autodb_idle_timeout's default
        #expect(config.fastClose(database: named, user: "s") && !config.fastClose(database: named, user: "t"))
        #expect(config.poolSize(peer: config.peers[1]!) == 20 && config.poolSize(peer: config.peers[2]!) == 3)
    }
}

/// load_balance_hosts: which host of `host=a,b` each new server connection goes to.
@Suite struct HostChoiceTests {
    @Test func roundRobinTakesTheNextHostEachTime() throws {
        let config = try Config.parse("[databases]\nd = host='a, b ,c'\n")
        #expect(config.databases["d"]!.hosts == ["a", "b", "c"])
        var choice = HostChoice(hosts: config.databases["d"]!.hosts, mode: .roundRobin)
        #expect((0..<5).map { _ in choice.pick() } == ["a", "b", "c", "a", "b"])
        choice.failed("c")
        #expect(choice.pick() == "c", "a failure changes nothing")
    }

    @Test func disableStaysOnAHostUntilItFails() throws {
        let config = try Config.parse("[databases]\nd = host=a,b load_balance_hosts=disable\n")
        let entry = config.databases["d"]!
        #expect(entry.loadBalanceHosts == .disable)
        var choice = HostChoice(hosts: entry.hosts, mode: .disable)
        #expect([choice.pick(), choice.pick()] == ["a", "a"])
        choice.failed("b")
        #expect(choice.pick() == "a", "a failure of another host changes nothing")
        choice.failed("a")
        #expect([choice.pick(), choice.pick()] == ["b", "b"])
        choice.failed("b")
        #expect(choice.pick() == "a")
        #expect(throws: ConfigError.self) { try Config.parse("[databases]\nd = host=a load_balance_hosts=x\n") }
    }
}
