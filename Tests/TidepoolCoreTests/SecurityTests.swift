import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct HBATests {
    let rules = """
        # comment line
        local   all         all                       trust
        hostssl app         cert_user  0.0.0.0/0      cert
        host    all         blocked    all            reject
        host    app,reports alice      10.1.0.0/16    scram-sha-256
        host    sameuser    all        127.0.0.1 255.255.255.255   md5
        hostnossl all       plainuser  ::1/128        password
        host    all         all        ::ffff:192.168.0.0/120 md5   # trailing comment
        """

    func method(_ db: String, _ user: String, _ address: String?, tls: Bool = false) throws -> HBARules.Method? {
        let hba = try HBARules.parse(rules)
        return hba.method(database: db, user: user, address: address.flatMap(HBARules.parseIP), tls: tls)?.method
    }

    @Test func firstMatchingLineWins() throws {
        #expect(try method("app", "x", nil) == .trust)
        #expect(try method("app", "cert_user", "1.2.3.4", tls: true) == .cert)
        #expect(try method("app", "cert_user", "1.2.3.4", tls: false) == nil)
        #expect(try method("app", "blocked", "127.0.0.1") == .reject)
        #expect(try method("reports", "alice", "10.1.200.3") == .scramSHA256)
        #expect(try method("other", "alice", "10.1.200.3") == nil)
        #expect(try method("bob", "bob", "127.0.0.1") == .md5)
        #expect(try method("app", "bob", "127.0.0.1") == nil)
        #expect(try method("app", "plainuser", "::1") == .password)
        #expect(try method("app", "plainuser", "::1", tls: true) == nil)
        #expect(try method("app", "z", "192.168.0.77") == .md5)
        #expect(try method("app", "z", "192.168.1.77") == nil)
    }

    @Test func parsesAddresses() {
        #expect(HBARules.parseIP("10.0.0.1") == [10, 0, 0, 1])
        #expect(HBARules.parseIP("::1") == Array(repeating: 0, count: 15) + [1])
        #expect(HBARules.parseIP("::ffff:127.0.0.1") == [127, 0, 0, 1])
        #expect(HBARules.parseIP("fe80::1:2%eth0")?.count == 16)
        #expect(HBARules.parseIP("2001:db8::") == [0x20, 0x01, 0x0d, 0xb8] + Array(repeating: 0, count: 12))
        #expect(HBARules.parseIP("1.2.3") == nil)
        #expect(HBARules.parseIP("1::2::3") == nil)
        #expect(HBARules.parseIP("300.1.1.1") == nil)
    }

    @Test func refusesBadLinesWithTheirLineNumber() {
        for (text, wanted) in [
            ("hots all all all trust", "unknown connection type"),
            ("host all all 10.0.0.0/33 md5", "invalid address"),
            ("host all all 10.0.0.0/8 kerberos", "unknown method"),
            ("\nlocal all", "too few fields"),
        ] {
            #expect(throws: ConfigError.self) { try HBARules.parse(text) }
            do {
                _ = try HBARules.parse(text)
            } catch {
                #expect(error.message.contains(wanted), "\(error.message)")
                #expect(error.line == (text.hasPrefix("\n") ? 2 : 1))
            }
        }
    }
}

@Suite struct AddressLimiterTests {
    @Test func limitsOpenConnectionsPerAddress() {
        var limiter = ClientAddressLimiter(maxPerAddress: 2)
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        #expect(limiter.admit("10.0.0.1", now: now) == nil)
        #expect(limiter.admit("10.0.0.1", now: now) == nil)
        #expect(limiter.admit("10.0.0.1", now: now) == .tooManyConnections(limit: 2))
        #expect(limiter.admit("10.0.0.2", now: now) == nil)
        limiter.release("10.0.0.1")
        #expect(limiter.admit("10.0.0.1", now: now) == nil)
        #expect(limiter.openCount("10.0.0.1") == 2)
        #expect(limiter.admit("10.0.0.1", now: now)?.postgresError.code == SQLState.tooManyConnections)
    }

    @Test func limitsConnectionsPerSecondPerAddress() {
        var limiter = ClientAddressLimiter(perSecond: 3)
        var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        for _ in 0..<3 { #expect(limiter.admit("a", now: now) == nil) }
        #expect(limiter.admit("a", now: now) == .tooFast(perSecond: 3))
        #expect(limiter.admit("b", now: now) == nil)
        now = now + .milliseconds(999)
        #expect(limiter.admit("a", now: now) == .tooFast(perSecond: 3))
        now = now + .milliseconds(1)
        #expect(limiter.admit("a", now: now) == nil)
        limiter.prune(now: now + .seconds(2))
        #expect(limiter.window.isEmpty)
    }
}

@Suite struct AuthQueryTests {
    func message(_ type: Character, _ body: (inout ByteBuffer) -> Void) -> (UInt8, ByteBuffer) {
        var b = ByteBuffer()
        body(&b)
        return (UInt8(ascii: type.unicodeScalars.first!), b)
    }

    func dataRow(_ values: [String?]) -> (UInt8, ByteBuffer) {
        var out = ByteBuffer()
        Wire.dataRow(values, into: &out)
        out.moveReaderIndex(forwardBy: 5)
        return (MessageType.dataRow, out)
    }

    var ready: (UInt8, ByteBuffer) { (MessageType.readyForQuery, ByteBuffer(bytes: [UInt8(ascii: "I")])) }

    @Test func requestCarriesTheUserAsAParameter() {
        var out = ByteBuffer()
        AuthQueryExchange.request(
            query: "SELECT usename, passwd FROM pg_shadow WHERE usename=$1", user: "o'brien", into: &out)
        var scanner = MessageScanner()
        var types: [UInt8] = []
        var bind: ByteBuffer?
        while let chunk = try? scanner.next(from: &out, classify: { _ in .inspect }) {
            if case .message(let type, let body, _) = chunk {
                types.append(type)
                if type == MessageType.bind { bind = body }
            }
        }
        #expect(types == [MessageType.parse, MessageType.bind, MessageType.execute, MessageType.sync])
        #expect(
            bind.map { Array($0.readableBytesView) } == [0, 0, 0, 0, 0, 1, 0, 0, 0, 7] + Array("o'brien".utf8) + [0, 0])
    }

    @Test func readsTheSecretOfTheOneRow() {
        var exchange = AuthQueryExchange()
        let verifier = "md5" + String(repeating: "a", count: 32)
        #expect(exchange.receive(type: UInt8(ascii: "1"), body: ByteBuffer()) == nil)
        let row = dataRow(["alice", verifier])
        #expect(exchange.receive(type: row.0, body: row.1) == nil)
        #expect(exchange.receive(type: ready.0, body: ready.1) == .found(.md5(verifier)))
    }

    @Test func missingUserNullPasswordAndErrors() {
        var none = AuthQueryExchange()
        #expect(none.receive(type: ready.0, body: ready.1) == .notFound)
        var null = AuthQueryExchange()
        let row = dataRow(["alice", nil])
        _ = null.receive(type: row.0, body: row.1)
        #expect(null.receive(type: ready.0, body: ready.1) == .found(nil))
        var failed = AuthQueryExchange()
        var error = ByteBuffer()
        Wire.errorResponse(PostgresError(code: "42501", message: "permission denied for pg_shadow"), into: &error)
        error.moveReaderIndex(forwardBy: 5)
        _ = failed.receive(type: MessageType.errorResponse, body: error)
        guard case .failed(let e) = failed.receive(type: ready.0, body: ready.1) else {
            Issue.record("expected a failure")
            return
        }
        #expect(e.code == "42501")
        var oneColumn = AuthQueryExchange()
        let short = dataRow(["alice"])
        _ = oneColumn.receive(type: short.0, body: short.1)
        guard case .failed = oneColumn.receive(type: ready.0, body: ready.1) else {
            Issue.record("expected a failure for one column")
            return
        }
    }

    @Test func cacheKeepsAnswersForTheTTLButNotFailures() {
        var cache = AuthQueryCache(ttl: .seconds(10))
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        let key = AuthQueryCache.key(database: "db", user: "u")
        cache.store(key, .notFound, now: now)
        #expect(cache.lookup(key, now: now + .seconds(9)) == .notFound)
        #expect(cache.lookup(key, now: now + .seconds(10)) == nil)
        cache.store(key, .failed(PostgresError(code: "08006", message: "x")), now: now)
        #expect(cache.lookup(key, now: now) == .notFound)
    }
}

@Suite struct SecuritySettingsTests {
    @Test func readsBothSidesTLSAndAuthSettings() throws {
        let config = try Config.parse(
            """
            [pooler]
            client_tls_sslmode = verify-full
            client_tls_cert_file = /c.crt
            client_tls_key_file = /c.key
            client_tls_ca_file = /ca.crt
            client_tls_protocols = tlsv1.3
            server_tls_sslmode = verify-ca
            server_tls_ciphers = HIGH
            auth_user = looker
            auth_dbname = authdb
            auth_query_cache_ttl = 2
            auth_hba_file = /hba.conf
            max_client_conn_per_ip = 7
            client_connect_rate_per_ip = 3
            [databases]
            app = host=db auth_user=other auth_query='SELECT u, p FROM s WHERE u=$1' auth_dbname=x
            """)
        let g = config.global
        #expect(g.clientTLS.sslmode == .verifyFull && g.clientTLS.certFile == "/c.crt")
        #expect(
            g.clientTLS.keyFile == "/c.key" && g.clientTLS.caFile == "/ca.crt" && g.clientTLS.protocols == "tlsv1.3")
        #expect(g.serverTLS.sslmode == .verifyCA && g.serverTLS.ciphers == "HIGH")
        #expect(g.authUser == "looker" && g.authDBName == "authdb" && g.authQueryCacheTTL == .seconds(2))
        #expect(g.authHBAFile == "/hba.conf" && g.maxClientConnPerIP == 7 && g.clientConnectRatePerIP == 3)
        let app = try #require(config.databases["app"])
        #expect(app.authUser == "other" && app.authQuery == "SELECT u, p FROM s WHERE u=$1" && app.authDBName == "x")
        #expect(Config().global.serverTLS.sslmode == .prefer && Config().global.clientTLS.sslmode == .disable)
    }

    @Test func refusesBadTLSSettingsWithTheirKey() {
        for line in ["client_tls_sslmode = sometimes", "server_tls_protocols = sslv3", "client_tls_colour = red"] {
            #expect(throws: ConfigError.self) { try Config.parse("[pooler]\n\(line)\n") }
        }
    }

    /// What Tidepool leaves out (LDAP, PAM) stops the load with a reason naming the key, in the
    /// configuration and in the HBA file.
    @Test func ldapAndPamAreRefusedSayingWhy() {
        for line in ["auth_type = ldap", "auth_type = pam", "auth_ldap_options = ldapurl=\"ldap://x\""] {
            #expect {
                try Config.parse("[pooler]\n\(line)\n")
            } throws: { error in
                let message = "\(error)"
                return (message.contains("LDAP is not supported") || message.contains("PAM is not supported"))
                    && message.contains(String(line.prefix { $0 != " " }))
            }
        }
        #expect {
            try HBARules.parse("host all all 0.0.0.0/0 ldap ldapserver=x\n")
        } throws: { "\($0)".contains("LDAP is not supported") }
    }

    /// client_tls_ecdhcurve: auto, or one curve by its OpenSSL name; none cannot work with TLS 1.3.
    @Test func ecdhCurveByName() throws {
        #expect(Config().global.clientTLS.ecdhCurveCodePoint == nil)
        let config = try Config.parse("[pooler]\nclient_tls_ecdhcurve = secp384r1\n")
        #expect(config.global.clientTLS.ecdhCurveCodePoint == 0x18 && config.warnings.isEmpty)
        #expect(
            try Config.parse("[pooler]\nclient_tls_ecdhcurve = prime256v1\n").global.clientTLS.ecdhCurveCodePoint
                == 0x17)
        #expect {
            try Config.parse("[pooler]\nclient_tls_ecdhcurve = none\n")
        } throws: { "\($0)".contains("TLS 1.3 needs") }
        #expect(throws: ConfigError.self) { try Config.parse("[pooler]\nclient_tls_ecdhcurve = brainpool\n") }
        #expect(throws: ConfigError.self) { try Config.parse("[pooler]\nserver_tls_ecdhcurve = auto\n") }
    }

    /// Every value PgBouncer 1.25 accepts for *_tls_protocols, as the range of versions allowed.
    @Test func tlsProtocolsAsPgBouncerReadsThem() throws {
        let expected: [(String, ClosedRange<Int>)] = [
            ("secure", 2...3), ("default", 2...3), ("all", 0...3), ("legacy", 0...3), ("tlsv1.0", 0...0),
            ("tlsv1.1", 1...1), ("tlsv1.2", 2...2), ("tlsv1.3", 3...3), ("tlsv1.1,tlsv1.2", 1...2),
            ("TLSv1.2, tlsv1.3", 2...3),
        ]
        for (value, range) in expected {
            let config = try Config.parse(
                "[pooler]\nclient_tls_protocols = \(value)\nserver_tls_protocols = \(value)\n")
            #expect(config.global.clientTLS.versionRange == range, "\(value)")
            #expect(config.global.serverTLS.versionRange == range, "\(value)")
        }
        #expect(Config().global.clientTLS.versionRange == 2...3)
        #expect(throws: ConfigError.self) { try Config.parse("[pooler]\nclient_tls_protocols = tlsv1.4\n") }
    }

    @Test func trackedParametersFollowChanges() {
        var parameters = TrackedParameters(wrappedValue: ["TimeZone": "UTC", "other": "x"])
        let zone = StartupParameters.tracked.firstIndex(of: "TimeZone")!
        #expect(parameters.projectedValue[zone] == "UTC")
        #expect(parameters.projectedValue.compactMap { $0 } == ["UTC"])
        parameters.wrappedValue["TimeZone"] = "Europe/Paris"
        #expect(parameters.projectedValue[zone] == "Europe/Paris")
        var several = TrackedParameters(wrappedValue: ["search_path": "a", "client_encoding": "UTF8", "x": "y"])
        #expect(
            several.projectedValue
                == StartupParameters.tracked.map { ["search_path": "a", "client_encoding": "UTF8"][$0] })
    }
}

@Suite struct ReservedNameTests {
    func mentions(_ sql: String, limit: Int = 4096) -> Bool {
        PreparedStatementTracker.mayNameReserved(PreparedHarness.query(sql), bodyStart: 5, limit: limit)
    }

    @Test func aQueryThatMayNameThePoolersStatementsIsReadInAnyMode() {
        #expect(mentions("select 1; deallocate tidepool_0a1b"))
        #expect(mentions("SELECT 1; PREPARE \"TIDEPOOL_x\" AS SELECT 2"))
        #expect(mentions("tidepool_"))
        #expect(!mentions("select user_id, pool_size from tide_pool"))
        #expect(!mentions("select 1; deallocate tidepool_0a1b", limit: 10), "too long to hold: not read")
        var cut = PreparedHarness.query("select 1; deallocate tidepool_0a1b")
        cut.moveWriterIndex(to: cut.writerIndex - 3)
        #expect(PreparedStatementTracker.mayNameReserved(cut, bodyStart: 5, limit: 4096), "not whole yet: wait")
    }
}
