import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct TransactionTrackerTests {
    let Q = MessageType.query, S = MessageType.sync, P = MessageType.parse, B = MessageType.bind
    let E = MessageType.execute, d = MessageType.copyData, c = MessageType.copyDone

    @Test func simpleQueryOutsideATransactionIsClean() {
        var t = TransactionTracker()
        t.clientSent(Q)
        #expect(!t.isClean)
        t.serverReady(.idle)
        #expect(t.isClean)
    }

    @Test func openTransactionIsNotClean() {
        var t = TransactionTracker()
        t.clientSent(Q)
        t.serverReady(.inTransaction)
        #expect(!t.isClean)
        #expect(t.isQuiet)
        t.clientSent(Q)
        t.serverReady(.failed)
        #expect(!t.isClean)
        t.clientSent(Q)
        t.serverReady(.idle)
        #expect(t.isClean)
    }

    @Test func pipelinedSyncsWaitForTheLastReadyForQuery() {
        var t = TransactionTracker()
        for _ in 0..<3 {
            t.clientSent(P)
            t.clientSent(B)
            t.clientSent(E)
            t.clientSent(S)
        }
        t.serverReady(.idle)
        t.serverReady(.idle)
        #expect(!t.isClean)
        t.serverReady(.idle)
        #expect(t.isClean)
    }

    @Test func unsyncedExtendedMessagesKeepTheServer() {
        var t = TransactionTracker()
        t.clientSent(Q)
        t.clientSent(P)  // sent before the Query's answer came back, with no Sync yet
        t.serverReady(.idle)
        #expect(!t.isClean)
    }

    @Test func copyInIsPartOfItsQuery() {
        var t = TransactionTracker()
        t.clientSent(Q)
        t.clientSent(d)
        t.clientSent(d)
        #expect(!t.isClean)
        t.clientSent(c)
        t.serverReady(.idle)
        #expect(t.isClean)
    }
}

@Suite struct ServerLoginTests {
    func message(_ build: (inout ByteBuffer) -> Void) -> (UInt8, ByteBuffer) {
        var b = ByteBuffer()
        build(&b)
        let type = b.readInteger(as: UInt8.self)!
        b.moveReaderIndex(forwardBy: 4)
        return (type, b)
    }

    func finishLogin(_ login: inout ServerLoginStateMachine) -> ServerLoginStateMachine.Action {
        var action = login.receive(
            type: MessageType.authentication, body: message { Wire.authenticationOk(into: &$0) }.1)
        let p = message { Wire.parameterStatus("server_version", "15.0", into: &$0) }
        action = login.receive(type: p.0, body: p.1)
        let k = message { Wire.backendKeyData(processID: 77, secretKey: 88, into: &$0) }
        action = login.receive(type: k.0, body: k.1)
        let z = message { Wire.readyForQuery(.idle, into: &$0) }
        action = login.receive(type: z.0, body: z.1)
        return action
    }

    @Test func trustLoginCollectsParametersAndKey() {
        var login = ServerLoginStateMachine(user: "u", database: "d", secret: .none)
        guard case .loggedIn(let params, let pid, let key) = finishLogin(&login) else {
            Issue.record("expected login")
            return
        }
        #expect(params == ["server_version": "15.0"])
        #expect(pid == 77)
        #expect(key == 88)
    }

    @Test func md5LoginWithStoredSecret() {
        let stored = MD5Auth.storedSecret(password: "pw", user: "u")
        var login = ServerLoginStateMachine(user: "u", database: "d", secret: .md5(stored))
        let challenge = message { Wire.authenticationMD5Password(salt: [1, 2, 3, 4], into: &$0) }
        guard case .send(var out) = login.receive(type: challenge.0, body: challenge.1) else {
            Issue.record("expected a password message")
            return
        }
        out.moveReaderIndex(forwardBy: 5)
        #expect(out.readNullTerminatedString() == MD5Auth.response(password: "pw", user: "u", salt: [1, 2, 3, 4]))
    }

    @Test func cleartextWithoutPasswordFails() {
        var login = ServerLoginStateMachine(user: "u", database: "d", secret: .md5("md5x"))
        let challenge = message { Wire.authenticationCleartextPassword(into: &$0) }
        guard case .fail(let e) = login.receive(type: challenge.0, body: challenge.1) else {
            Issue.record("expected failure")
            return
        }
        #expect(e.code == "28P01")
    }

    @Test func scramLoginAgainstOurOwnServerSide() throws {
        let verifier = ScramSecret(password: "pw", salt: Array("0123456789abcdef".utf8))
        var server = ScramServerExchange(secret: verifier)
        var login = ServerLoginStateMachine(user: "u", database: "d", secret: .password("pw"))
        let sasl = message { Wire.authenticationSASL(mechanisms: ["SCRAM-SHA-256"], into: &$0) }
        guard case .send(var first) = login.receive(type: sasl.0, body: sasl.1) else { Issue.record("initial"); return }
        first.moveReaderIndex(forwardBy: 5)
        #expect(first.readNullTerminatedString() == "SCRAM-SHA-256")
        let n = Int(first.readInteger(as: Int32.self)!)
        let serverFirst = try server.receiveClientFirst(first.readBytes(length: n)!)
        let cont = message { Wire.authenticationSASLContinue(serverFirst, into: &$0) }
        guard case .send(var final) = login.receive(type: cont.0, body: cont.1) else { Issue.record("final"); return }
        final.moveReaderIndex(forwardBy: 5)
        let serverFinal = try server.receiveClientFinal(final.readBytes(length: final.readableBytes)!)
        let fin = message { Wire.authenticationSASLFinal(serverFinal, into: &$0) }
        guard case .none = login.receive(type: fin.0, body: fin.1) else { Issue.record("final ok"); return }
        guard case .loggedIn = finishLogin(&login) else { Issue.record("login"); return }
    }

    @Test func serverErrorDuringLoginIsReported() {
        var login = ServerLoginStateMachine(user: "u", database: "nope", secret: .none)
        let e = message { Wire.errorResponse(.fatal("3D000", "database \"nope\" does not exist"), into: &$0) }
        guard case .fail(let error) = login.receive(type: e.0, body: e.1) else { Issue.record("fail"); return }
        #expect(error.code == "3D000")
    }
}

@Suite struct StartupParametersTests {
    @Test func tracksKnownParametersAndOptions() throws {
        let wanted = try StartupParameters.resolve(
            [
                "user": "u", "database": "d", "application_name": "app", "timezone": "UTC",
                "options": "-c DateStyle=ISO,\\ MDY --search-path=public -cIntervalStyle=iso_8601",
            ], ignored: [])
        #expect(wanted["application_name"] == "app")
        #expect(wanted["TimeZone"] == "UTC")
        #expect(wanted["DateStyle"] == "ISO, MDY")
        #expect(wanted["search_path"] == "public")
        #expect(wanted["IntervalStyle"] == "iso_8601")
    }

    /// PostgreSQL reads `options` first and the other parameters after, and a DateStyle may give
    /// the style or the order alone (each checked against PostgreSQL 15 in
    /// test_a_datestyle_that_gives_the_style_alone).
    @Test func dateStylesAddUpAsPostgreSQLAppliesThem() throws {
        let both = try StartupParameters.resolve(
            ["user": "u", "DateStyle": "ISO", "options": "-c DateStyle=German"], ignored: [])
        #expect(both["DateStyle"] == "ISO, DMY", "German first (so DMY), then ISO")
        let other = try StartupParameters.resolve(
            ["user": "u", "options": "-c application_name=a", "application_name": "b"], ignored: [])
        #expect(other["application_name"] == "b", "the parameter wins over the option")
        #expect(StartupParameters.dateStyle("ISO, MDY", then: "ISO") == "ISO, MDY")
        #expect(StartupParameters.dateStyle("ISO, MDY", then: "german") == "German, DMY")
        #expect(StartupParameters.dateStyle("German, DMY", then: "US") == "German, MDY")
        #expect(StartupParameters.dateStyle("SQL, YMD", then: "Postgres") == "Postgres, YMD")
        #expect(StartupParameters.dateStyle("ISO, MDY", then: "euro") == "ISO, DMY")
        #expect(
            ClientSession.Welcome(serverParameters: ["DateStyle": "ISO, MDY"], wanted: ["DateStyle": "ISO"])
                .wanted.wrappedValue["DateStyle"] == "ISO, MDY", "completed from the server's default")
    }

    @Test func refusesUnknownParametersUnlessIgnored() throws {
        #expect(throws: PostgresError.self) {
            try StartupParameters.resolve(["user": "u", "extra_float_digits": "2"], ignored: [])
        }
        #expect(throws: PostgresError.self) {
            try StartupParameters.resolve(["user": "u", "options": "-c work_mem=1MB"], ignored: [])
        }
        let wanted = try StartupParameters.resolve(
            ["user": "u", "extra_float_digits": "2", "options": "-c work_mem=1MB"],
            ignored: ["extra_float_digits", "work_mem"])
        #expect(wanted.isEmpty)
    }

    /// track_extra_parameters: named parameters are kept (to be set on each server) even where
    /// others are refused; case does not matter, as in PostgreSQL.
    @Test func trackExtraParametersAreKept() throws {
        let kept = try StartupParameters.resolve(
            ["user": "u", "Work_Mem": "8MB", "options": "-c statement_timeout=5s"], ignored: [],
            keepingOthers: false, extra: ["work_mem", "statement_timeout"])
        #expect(
            kept.others.sorted { $0.0 < $1.0 }.map { "\($0.0)=\($0.1)" } == ["statement_timeout=5s", "work_mem=8MB"])
        #expect(throws: PostgresError.self) {
            try StartupParameters.resolve(
                ["user": "u", "lock_timeout": "1s"], ignored: [], keepingOthers: false, extra: ["work_mem"])
        }
    }
}

@Suite struct ClientTimeoutTests {
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
    var settings: ClientTimeoutSettings {
        var s = ClientTimeoutSettings()
        s.clientIdleTimeout = .seconds(10)
        s.idleTransactionTimeout = .seconds(5)
        s.queryTimeout = .seconds(3)
        s.transactionTimeout = .seconds(60)
        return s
    }

    func message(_ v: ClientTimeoutVerdict) -> String? {
        switch v {
        case .none: return nil
        case .close(let e), .cancelAndClose(let e): return e.message
        }
    }

    @Test func offByDefault() {
        #expect(!ClientTimeoutSettings().anyEnabled)
        let v = ClientTimeouts.check(.idle(since: t0), settings: ClientTimeoutSettings(), now: t0 + .hours(10))
        #expect(v == .none)
    }

    @Test func clientIdleTimeout() {
        #expect(ClientTimeouts.check(.idle(since: t0), settings: settings, now: t0 + .seconds(9)) == .none)
        let v = ClientTimeouts.check(.idle(since: t0), settings: settings, now: t0 + .seconds(10))
        #expect(message(v)?.hasPrefix("client_idle_timeout") == true)
        guard case .close = v else { Issue.record("idle clients are closed, nothing to cancel"); return }
    }

    @Test func queryTimeoutCancelsAndCloses() {
        let running = ClientActivity.linked(linkedAt: t0, queryStartedAt: t0 + .seconds(1), quietSince: nil)
        #expect(ClientTimeouts.check(running, settings: settings, now: t0 + .seconds(3)) == .none)
        let v = ClientTimeouts.check(running, settings: settings, now: t0 + .seconds(4))
        guard case .cancelAndClose(let e) = v else { Issue.record("expected cancel"); return }
        #expect(e.code == "57014")
        #expect(e.message.hasPrefix("query_timeout"))
    }

    @Test func idleInTransactionTimeout() {
        let quiet = ClientActivity.linked(linkedAt: t0, queryStartedAt: nil, quietSince: t0 + .seconds(1))
        #expect(ClientTimeouts.check(quiet, settings: settings, now: t0 + .seconds(5)) == .none)
        #expect(
            message(ClientTimeouts.check(quiet, settings: settings, now: t0 + .seconds(6)))?.hasPrefix(
                "idle_transaction_timeout") == true)
    }

    @Test func transactionTimeoutCountsFromTheStartOfTheTransaction() {
        let busy = ClientActivity.linked(linkedAt: t0, queryStartedAt: nil, quietSince: nil)
        #expect(ClientTimeouts.check(busy, settings: settings, now: t0 + .seconds(59)) == .none)
        #expect(
            message(ClientTimeouts.check(busy, settings: settings, now: t0 + .seconds(60)))?.hasPrefix(
                "transaction_timeout") == true)
    }

    @Test func waitingClientsAreThePoolsBusiness() {
        #expect(ClientTimeouts.check(.waiting, settings: settings, now: t0 + .hours(1)) == .none)
    }

    @Test func perUserSettingsOverrideGlobal() throws {
        let config = try Config.parse(
            "[users]\nslow = query_timeout=100 client_idle_timeout=0\n[pooler]\nquery_timeout = 5\nclient_idle_timeout = 7\n"
        )
        #expect(config.clientTimeouts(user: "slow").queryTimeout == .seconds(100))
        #expect(config.clientTimeouts(user: "slow").clientIdleTimeout == .zero)
        #expect(config.clientTimeouts(user: "other").queryTimeout == .seconds(5))
    }
}
