import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct AdminTests {
    @Test func parsesCommandsLikePgBouncer() throws {
        #expect(try AdminCommand.parse("show pools;") == .show("POOLS"))
        #expect(try AdminCommand.parse("  SHOW   Lists  ") == .show("LISTS"))
        #expect(try AdminCommand.parse("PAUSE mydb") == .pause("mydb"))
        #expect(try AdminCommand.parse("resume;") == .resume(nil))
        #expect(try AdminCommand.parse(";") == .empty)
        #expect(throws: PostgresError.self) { try AdminCommand.parse("SELECT 1") }
        #expect(throws: PostgresError.self) { try AdminCommand.parse("SHOW") }
        #expect(AdminCommand.show("POOLS").isReadOnly)
        #expect(!AdminCommand.reload.isReadOnly)
    }

    @Test func showPoolsColumnsAndCounts() {
        var snap = PoolSnapshot(
            key: PoolKey(database: "db", user: "u"), waiting: 45, lent: 5, idle: 0, connecting: 1,
            maxWait: .microseconds(2_500_000), settings: PoolSettings(poolSize: 5))
        snap.checking = 1
        let result = AdminViews.pools(
            [snap], clients: [snap.key: PoolClientCounts(active: 5, waiting: 45, pinned: 2)],
            modes: [snap.key: .session])
        // PgBouncer's 17 columns in its order, then Tidepool's own.
        #expect(result.columns.count == 18)
        #expect(result.columns.first == "database")
        #expect(result.columns[16] == "load_balance_hosts")
        #expect(result.columns.last == "cl_pinned")
        let row = Dictionary(uniqueKeysWithValues: zip(result.columns, result.rows[0]))
        #expect(row["cl_active"] == "5")
        #expect(row["cl_waiting"] == "45")
        #expect(row["sv_active"] == "4")
        #expect(row["sv_tested"] == "1")
        #expect(row["sv_login"] == "1")
        #expect(row["maxwait"] == "2")
        #expect(row["maxwait_us"] == "500000")
        #expect(row["pool_mode"] == "session")
        #expect(row["cl_pinned"] == "2")
    }

    @Test func resultEncodesRowDescriptionRowsAndTag() {
        var buffer = ByteBuffer()
        AdminResult(columns: ["a"], rows: [["x"], [nil]]).encode(into: &buffer)
        var types: [UInt8] = []
        while let type = buffer.readInteger(as: UInt8.self), let length = buffer.readInteger(as: Int32.self) {
            types.append(type)
            buffer.moveReaderIndex(forwardBy: Int(length) - 4)
        }
        #expect(types == [UInt8(ascii: "T"), UInt8(ascii: "D"), UInt8(ascii: "D"), UInt8(ascii: "C")])
    }

    @Test func rowDescriptionCarriesEachColumnsTypeAndWidth() {
        var buffer = ByteBuffer()
        AdminResult(columns: ["a", "b", "c", "d"], types: [.text, .int4, .int8, .numeric], rows: []).encode(
            into: &buffer)
        #expect(buffer.readInteger(as: UInt8.self) == UInt8(ascii: "T"))
        _ = buffer.readInteger(as: Int32.self)
        #expect(buffer.readInteger(as: Int16.self) == 4)
        var described: [(String, Int32, Int16)] = []
        while let name = buffer.readNullTerminatedString() {
            _ = buffer.readInteger(as: Int32.self)  // table
            _ = buffer.readInteger(as: Int16.self)  // column number
            let oid = buffer.readInteger(as: Int32.self)!
            let width = buffer.readInteger(as: Int16.self)!
            #expect(buffer.readInteger(as: Int32.self) == -1)  // type modifier
            #expect(buffer.readInteger(as: Int16.self) == 0)  // text format
            described.append((name, oid, width))
            if described.count == 4 { break }
        }
        #expect(described.map(\.0) == ["a", "b", "c", "d"])
        #expect(described.map(\.1) == [25, 23, 20, 1700])
        #expect(described.map(\.2) == [-1, 4, 8, -1])
        // Without types every column is text, as before.
        #expect(AdminResult(columns: ["x", "y"], rows: []).types == [.text, .text])
    }

    /// Every SHOW view, filled with sample data: one type per column, PgBouncer's types where it has
    /// the column, and in every number column a number or NULL (a typed driver fails on anything else).
    @Test func everyViewTypesItsColumnsAndItsNumberColumnsHoldNumbers() throws {
        let config = try Config.parse(
            "[databases]\na = host=h port=5433 pool_size=3\n[users]\nu = pool_mode=session\n[pooler]\n")
        let key = PoolKey(database: "a", user: "u")
        let snapshot = PoolSnapshot(
            key: key, waiting: 2, lent: 1, idle: 1, connecting: 0, maxWait: .microseconds(1_500_000),
            settings: PoolSettings(poolSize: 3))
        var traffic = TrafficBook()
        var stats = TrafficStats()
        stats.transactions = 7
        stats.queries = 9
        stats.transactionTime = 700
        traffic.add(stats, database: "a")
        traffic.endPeriod(seconds: 3)
        var latency = LatencyBook()
        latency.total["a"] = LatencySet()
        var client = ConnectionRow()
        client.user = "u"
        client.port = 40_000
        client.id = "12"
        var loggingIn = ConnectionRow()  // no id yet
        loggingIn.port = 40_001
        let views: [String: AdminResult] = [
            "POOLS": AdminViews.pools([snapshot], clients: [:], modes: [:]),
            "LISTS": AdminViews.lists(
                databases: 1, users: 1, pools: 1, clients: 3, serversUsed: 1, serversIdle: 1, serversLogin: 0),
            "DATABASES": AdminViews.databases(config, currentConnections: ["a": 2]),
            "USERS": AdminViews.users(config, poolUsers: ["u", "v"], serverConnections: ["u": 2]),
            "CLIENTS": AdminViews.connections([client, loggingIn], type: "C"),
            "SOCKETS": AdminViews.sockets(clients: [client], servers: [loggingIn], activeOnly: false),
            "STATS": AdminViews.stats(traffic, databases: ["a"]),
            "STATS_TOTALS": AdminViews.statsTotals(traffic, databases: ["a"]),
            "STATS_AVERAGES": AdminViews.statsAverages(traffic, databases: ["a"]),
            "TOTALS": AdminViews.totals(traffic),
            "LATENCY": AdminViews.latency(latency),
            "MEM": AdminViews.memory([("process_rss", 1 << 33, 1, nil), ("client_buffers", 65536, 3, 100_000)]),
            "STATE": AdminViews.state(paused: false, suspended: false, instanceID: "i", uptimeSeconds: 5),
            "CONFIG": AdminViews.config(config.displaySettings),
        ]
        // A buffer row's total is their sum, not size × used.
        #expect(views["MEM"]!.rows[1] == ["client_buffers", "65536", "3", "0", "100000"])
        for (name, view) in views {
            #expect(view.types.count == view.columns.count, "\(name)")
            #expect(!view.rows.isEmpty, "\(name)")
            for row in view.rows {
                #expect(row.count == view.columns.count, "\(name)")
                for (index, type) in view.types.enumerated() where type != .text {
                    if let value = row[index] {
                        #expect(Int64(value) != nil, "\(name).\(view.columns[index]) = '\(value)'")
                    }
                }
            }
        }
        func type(_ view: String, _ column: String) -> AdminResult.ColumnType? {
            let v = views[view]!
            return v.columns.firstIndex(of: column).map { v.types[$0] }
        }
        // As PgBouncer sends them: counts int4, statistics numeric, names and times text.
        #expect(type("POOLS", "cl_active") == .int4 && type("POOLS", "maxwait_us") == .int4)
        #expect(type("POOLS", "pool_mode") == .text && type("POOLS", "database") == .text)
        #expect(type("STATS", "total_xact_count") == .numeric && type("STATS", "avg_wait_time") == .numeric)
        #expect(type("STATS_TOTALS", "bytes_sent") == .numeric && type("TOTALS", "value") == .numeric)
        #expect(type("CLIENTS", "port") == .int4 && type("CLIENTS", "connect_time") == .text)
        #expect(type("CLIENTS", "remote_pid") == .int4 && type("CLIENTS", "ptr") == .text)
        #expect(type("DATABASES", "port") == .int4 && type("DATABASES", "disabled") == .int4)
        #expect(type("DATABASES", "pool_mode") == .text && type("DATABASES", "force_user") == .text)
        #expect(type("LISTS", "items") == .int4 && type("USERS", "pool_size") == .int4)
        #expect(type("CONFIG", "value") == .text && type("STATE", "value") == .text)
        // The client without an id has NULL there, the user without pool_size NULL in pool_size.
        let id = views["CLIENTS"]!.columns.firstIndex(of: "id")!
        #expect(views["CLIENTS"]!.rows.contains { $0[id] == nil })
        #expect(views["USERS"]!.rows.contains { $0[1] == nil })
    }

    /// SHOW SOCKETS: SHOW CLIENTS' PgBouncer columns with PgBouncer's internal state names, then
    /// its seven buffer columns, then Tidepool's; ACTIVE_SOCKETS only the sockets holding bytes.
    @Test func socketsListClientsAndServersWithTheirBuffers() {
        var idle = ConnectionRow()
        idle.state = "idle"
        idle.id = "1"
        var reading = ConnectionRow()
        reading.state = "active"
        reading.id = "2"
        reading.received = 300
        var server = ConnectionRow()
        server.state = "idle"
        server.id = "9"
        server.queued = 40
        let all = AdminViews.sockets(clients: [idle, reading], servers: [server], activeOnly: false)
        let clientColumns = AdminViews.connections([], type: "C").columns
        #expect(Array(all.columns.prefix(21)) == Array(clientColumns.prefix(21)))
        #expect(
            Array(all.columns[21...]) == [
                "recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail",
                "send_queued", "pinned", "pin_reason",
            ])
        #expect(all.rows.map { $0[4] } == ["cl_idle", "cl_active", "sv_idle"])
        #expect(all.rows.map { $0[0] } == ["C", "C", "S"])
        let recv = all.columns.firstIndex(of: "recv_pos")!
        let queued = all.columns.firstIndex(of: "send_queued")!
        #expect(all.rows.map { $0[recv] } == ["0", "300", "0"])
        #expect(all.rows.map { $0[queued] } == ["0", "0", "40"])
        let active = AdminViews.sockets(clients: [idle, reading], servers: [server], activeOnly: true)
        #expect(active.columns == all.columns)
        #expect(active.rows.map { $0[0]! + $0[4]! } == ["Ccl_active", "Ssv_idle"])
    }

    @Test func showConfigHasNoSecrets() throws {
        let config = try Config.parse("[databases]\na = host=h password=hunter2\n[pooler]\nauth_file = /x\n")
        let text = config.displaySettings.map { "\($0.0)=\($0.1)" }.joined(separator: " ")
        #expect(!text.contains("hunter2"))
        #expect(text.contains("auth_file=/x"))
    }
}

@Suite struct AdminControlParsingTests {
    @Test func parsesControlCommands() throws {
        #expect(try AdminCommand.parse("SHUTDOWN") == .shutdown(.immediate))
        #expect(try AdminCommand.parse("shutdown wait_for_servers;") == .shutdown(.waitForServers))
        #expect(try AdminCommand.parse("SHUTDOWN WAIT_FOR_CLIENTS") == .shutdown(.waitForClients))
        #expect(try AdminCommand.parse("SUSPEND") == .suspend)
        #expect(try AdminCommand.parse("DISABLE db1") == .disable("db1"))
        #expect(try AdminCommand.parse("enable db1") == .enable("db1"))
        #expect(try AdminCommand.parse("RECONNECT") == .reconnect(nil))
        #expect(try AdminCommand.parse("KILL db1") == .kill("db1"))
        #expect(try AdminCommand.parse("KILL_CLIENT 42") == .killClient("42"))
        #expect(try AdminCommand.parse("WAIT_CLOSE") == .waitClose(nil))
        #expect(throws: PostgresError.self) { try AdminCommand.parse("DISABLE") }
        #expect(throws: PostgresError.self) { try AdminCommand.parse("SHUTDOWN NOW") }
        #expect(!AdminCommand.kill(nil).isReadOnly && !AdminCommand.set(key: "a", value: "b").isReadOnly)
    }

    @Test func parsesSet() throws {
        #expect(try AdminCommand.parse("SET default_pool_size = 3") == .set(key: "default_pool_size", value: "3"))
        #expect(try AdminCommand.parse("set Query_Timeout TO '1.5';") == .set(key: "query_timeout", value: "1.5"))
        #expect(
            try AdminCommand.parse("SET server_reset_query = 'it''s'") == .set(key: "server_reset_query", value: "it's")
        )
        #expect(throws: PostgresError.self) { try AdminCommand.parse("SET nothing") }
    }

    @Test func setChangesRuntimeSettingsOnly() throws {
        var config = Config()
        try config.set("default_pool_size", "7")
        #expect(config.global.defaultPoolSize == 7)
        try config.set("query_timeout", "2.5")
        #expect(config.global.queryTimeout == .milliseconds(2500))
        #expect(throws: PostgresError.self) { try config.set("listen_port", "1") }
        #expect(throws: PostgresError.self) { try config.set("no_such_key", "1") }
        #expect(throws: PostgresError.self) { try config.set("default_pool_size", "many") }
        let changeable = Dictionary(
            uniqueKeysWithValues: AdminViews.config(config.displaySettings).rows.map { ($0[0]!, $0[3]!) })
        #expect(changeable["listen_port"] == "no" && changeable["default_pool_size"] == "yes")
    }

    @Test func commandsAnswerWithTheirTagOnly() {
        var out = ByteBufferAllocator().buffer(capacity: 32)
        AdminResult(columns: [], rows: [], tag: "RECONNECT").encode(into: &out)
        #expect(out.getInteger(at: 0, as: UInt8.self) == MessageType.commandComplete)
    }
}

@Suite struct StatsTests {
    @Test func booksTotalsAndPeriods() {
        var book = TrafficBook()
        var s = TrafficStats()
        s.transactions = 10
        s.queries = 20
        s.transactionTime = 10_000
        s.queryTime = 4_000
        s.serverAssignments = 10
        s.waitTime = 500
        s.received = 1000
        book.add(s, database: "a")
        book.endPeriod(seconds: 2)
        book.add(s, database: "a")
        #expect(book.totals["a"]!.transactions == 20)
        #expect(book.lastPeriod["a"]!.transactions == 10)
        let averages = book.lastPeriod["a"]!.averages(overSeconds: 2)
        // per second: assignments, xacts, queries, received...; then µs per xact, query, assignment.
        #expect(averages[1] == 5 && averages[2] == 10 && averages[3] == 500)
        #expect(averages[5] == 1000 && averages[6] == 200 && averages[7] == 50)
        let stats = AdminViews.stats(book, databases: ["a", "b"])
        #expect(stats.columns.count == 23 && stats.columns[1] == "total_server_assignment_count")
        #expect(stats.columns.contains("avg_recv") && stats.columns.last == "avg_bind_count")
        #expect(stats.rows.map { $0[0] } == ["a", "b"])
        #expect(stats.rows[0][2] == "20")
        let totals = AdminViews.statsTotals(book, databases: [])
        #expect(totals.columns[4] == "bytes_received" && totals.rows[0][4] == "2000")
    }

    @Test func latencyPercentilesAreWithinThreePercent() {
        var h = LatencyHistogram()
        for v in 1...10_000 { h.record(UInt64(v)) }
        #expect(h.count == 10_000 && h.max == 10_000)
        for (fraction, exact) in [(0.5, 5_000.0), (0.95, 9_500.0), (0.99, 9_900.0)] {
            let got = Double(h.percentile(fraction))
            #expect(got >= exact && got <= exact * 1.035)
        }
        #expect(h.percentile(1.0) == 10_000)
        var small = LatencyHistogram()
        small.record(7)
        #expect(small.percentile(0.5) == 7)
        var huge = LatencyHistogram()
        huge.record(UInt64.max / 2)
        #expect(huge.count == 1)
        #expect(LatencyHistogram().percentile(0.99) == 0)
    }

    @Test func latencyBooksMergeAcrossLoops() {
        // Two event loops' recorders of one database.
        let loop1 = LatencyRecorder()
        let loop2 = LatencyRecorder()
        loop1.record(.query, microseconds: 100)
        loop2.record(.query, microseconds: 300)
        loop2.endPeriod()
        #expect(loop2.current.query.count == 0 && loop2.total.query.count == 1)
        var a = LatencyBook(["db": loop1])
        a.merge(LatencyBook(["db": loop2]))
        #expect(a.total["db"]!.query.count == 2)
        #expect(a.lastPeriod["db"]!.query.count == 1)
        let view = AdminViews.latency(a)
        #expect(view.columns == ["database", "kind", "span", "count", "p50_us", "p95_us", "p99_us", "max_us"])
        #expect(view.rows.count == 6)
    }

    @Test func aRecorderTotalCoversEndedPeriodsAndTheCurrentOne() {
        let recorder = LatencyRecorder()
        recorder.record(.transaction, microseconds: 50)
        recorder.endPeriod()
        recorder.record(.transaction, microseconds: 70)
        recorder.endPeriod()
        recorder.record(.transaction, microseconds: 9_000)
        #expect(recorder.current.transaction.count == 1)
        #expect(recorder.lastPeriod.transaction.count == 1)
        #expect(recorder.lastPeriod.transaction.max == 70)
        #expect(recorder.total.transaction.count == 3)
        #expect(recorder.total.transaction.max == 9_000)
        #expect(recorder.total.transaction.percentile(0.34) < 100)
    }
}

@Suite struct AdminConsoleSessionTests {
    func query(_ sql: String) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeNullTerminatedString(sql)
        return b
    }

    func types(_ buffer: ByteBuffer) -> String { SessionDriver.types(buffer) }

    @Test func commandsRunAndReadOnlyUsersGetTheReadOnlyOnes() {
        #expect(
            AdminConsoleSession.receive(type: MessageType.query, body: query("SHOW POOLS"), readOnly: true)
                == .run(.show("POOLS")))
        guard
            case .reply(let refused) = AdminConsoleSession.receive(
                type: MessageType.query, body: query("PAUSE"), readOnly: true)
        else {
            Issue.record("PAUSE must be refused to a stats user")
            return
        }
        #expect(types(refused) == "EZ")
        #expect(
            AdminConsoleSession.receive(type: MessageType.query, body: query("PAUSE"), readOnly: false)
                == .run(.pause(nil)))
    }

    @Test func badCommandsAndTheExtendedProtocolGetAnErrorAndReady() {
        guard
            case .reply(let bad) = AdminConsoleSession.receive(
                type: MessageType.query, body: query("FROB"), readOnly: false),
            case .reply(let sync) = AdminConsoleSession.receive(
                type: MessageType.sync, body: ByteBuffer(), readOnly: false)
        else {
            Issue.record("expected replies")
            return
        }
        #expect(types(bad) == "EZ" && types(sync) == "EZ")
        #expect(AdminConsoleSession.receive(type: MessageType.parse, body: query("x"), readOnly: false) == .none)
        #expect(
            AdminConsoleSession.receive(type: MessageType.terminate, body: ByteBuffer(), readOnly: false) == .terminate)
    }
}

@Suite struct ShutdownSignalsTests {
    @Test func firstSignalPicksTheShutdownAndASecondOneStopsAtOnce() {
        var term = ShutdownSignals()
        #expect(term.received(.terminate) == .waitForClients)
        #expect(term.received(.terminate) == .now)
        var int = ShutdownSignals()
        #expect(int.received(.interrupt) == .waitForServers)
        #expect(int.received(.terminate) == .now)
        var quit = ShutdownSignals()
        #expect(quit.received(.quit) == .now)
        var late = ShutdownSignals()
        _ = late.received(.terminate)
        #expect(late.received(.quit) == .now)
    }
}

@Suite struct AdminRulesTests {
    @Test func resumeIsRefusedInPgBouncersWords() {
        func refusal(_ database: String?, paused: Bool = false, suspended: Bool = false, down: Bool = false) -> String?
        {
            AdminRules.resumeRefusal(database: database, paused: paused, suspended: suspended, shuttingDown: down)?
                .message
        }
        #expect(refusal(nil) == "pooler is not paused/suspended")
        #expect(refusal(nil, paused: true) == nil)
        #expect(refusal(nil, suspended: true) == nil)
        #expect(refusal("app") == "database app is not paused")
        #expect(refusal("app", paused: true) == nil)
        #expect(refusal(nil, paused: true, down: true) == "pooler is shutting down")
        #expect(
            AdminRules.resumeRefusal(database: nil, paused: false, suspended: false, shuttingDown: false)?.code
                == "55000")
    }
}

@Suite struct ShowListsTests {
    @Test func usersAreEveryUserThePoolerKnowsOnce() {
        #expect(AdminViews.knownUsers(configured: ["a", "b"], authFile: ["b", "c"], pools: ["c", "d", "d"]) == 4)
        #expect(AdminViews.knownUsers(configured: [String](), authFile: [String](), pools: [String]()) == 0)
    }
}

@Suite struct ConsoleDatabaseRowsTests {
    /// The console's own database has rows in SHOW DATABASES and SHOW POOLS, as in PgBouncer,
    /// unless a configured database takes its name.
    @Test func thePgbouncerDatabaseIsListed() {
        var config = Config()
        config.databases["app"] = DatabaseEntry(name: "app")
        let databases = AdminViews.databases(config, currentConnections: [:], consoleClients: 3)
        let row = databases.rows.first { $0[0] == "pgbouncer" }
        #expect(row?[3] == "pgbouncer" && row?[4] == "pgbouncer" && row?[9] == "statement")
        #expect(row?[databases.columns.firstIndex(of: "current_client_connections")!] == "3")
        #expect(databases.rows.map { $0[0] } == ["app", "pgbouncer"])
        let pools = AdminViews.pools(
            [], clients: [:], modes: [:], console: AdminViews.consoleDatabase(config).map { ($0, 2) })
        #expect(pools.rows.count == 1)
        #expect(pools.rows[0][0] == "pgbouncer" && pools.rows[0][2] == "2")
        #expect(pools.rows[0].count == pools.columns.count)
        #expect(pools.rows[0][pools.columns.firstIndex(of: "pool_mode")!] == "statement")
        config.databases["pgbouncer"] = DatabaseEntry(name: "pgbouncer")
        #expect(AdminViews.consoleDatabase(config) == nil)
    }
}

@Suite struct LogWordsTests {
    /// The lines operators grep for after a move from PgBouncer.
    @Test func pgbouncersLogLines() {
        let client = LogWords.connection("C", id: "12", database: "app", user: "alice", address: "10.0.0.7:5123")
        #expect(client == "C-12: app/alice@10.0.0.7:5123")
        #expect(
            LogWords.loginAttempt(database: "app", user: "alice", tls: true, replication: nil)
                == "login attempt: db=app user=alice tls=yes replication=no")
        #expect(
            LogWords.closing(because: "client close request", ageSeconds: 5)
                == "closing because: client close request (age=5s)")
        #expect(
            LogWords.newServerConnection(from: "127.0.0.1:40000") == "new connection to server (from 127.0.0.1:40000)")
        #expect(LogWords.reservePool(waited: "5.0").hasPrefix("taking connection from reserve_pool"))
    }

    /// A user or database name cannot start a log line of its own.
    @Test func logLinesEscapeControlCharacters() {
        #expect(LogWords.escapingControls("plain é") == "plain é")
        #expect(
            LogWords.escapingControls("user=x\n2026-01-01 [1] LOG forged\r\u{1B}[31m")
                == "user=x\\n2026-01-01 [1] LOG forged\\r\\x1b[31m")
    }

    /// Every family gets its help text, and those without samples yet are shown too.
    @Test func metricFamiliesAreDocumented() {
        let text = MetricFamilies.documented(
            "# TYPE tidepool_queries_total counter\ntidepool_queries_total{database=\"d\"} 3\n")
        #expect(
            text.contains("# HELP tidepool_queries_total Queries completed.\n# TYPE tidepool_queries_total counter\n"))
        #expect(text.components(separatedBy: "# TYPE tidepool_queries_total").count == 2)
        for family in MetricFamilies.all {
            #expect(text.contains("# HELP \(family.name) "))
            #expect(text.contains("# TYPE \(family.name) \(family.kind.rawValue)"))
            #expect(!family.name.contains("microseconds"))
        }
    }

    /// PgBouncer answers every console error with 08P01; tools recognise the console by it.
    @Test func consoleErrorsAre08P01() {
        var reply = AdminConsoleSession.answer(.failure(PostgresError(code: "42601", message: "invalid command")))
        reply.moveReaderIndex(forwardBy: 5)
        #expect(WireDecode.errorFields(reply).code == "08P01")
    }
}
