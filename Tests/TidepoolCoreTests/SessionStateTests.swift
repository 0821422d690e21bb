import Crypto
import Foundation
import NIOCore
import Testing

@testable import TidepoolCore

/// The classifier: which statements leave state in the session, read through PostgreSQL's
/// lexical rules.
@Suite struct SessionStatementsTests {
    func effects(_ sql: String) -> [SessionEffect] { SessionStatements.effects(sql) }

    @Test func settingsInEveryForm() {
        #expect(
            effects("SET search_path = a, \"B\"") == [
                .set(name: "search_path", statement: "SET search_path = a, \"B\"")
            ])
        #expect(
            effects("set Statement_Timeout to '5s'")
                == [.set(name: "statement_timeout", statement: "SET statement_timeout = '5s'")])
        #expect(effects("SET SESSION work_mem = 65536") == [.set(name: "work_mem", statement: "SET work_mem = 65536")])
        #expect(
            effects("SET app.tenant_id = '42'") == [.set(name: "app.tenant_id", statement: "SET app.tenant_id = '42'")])
        #expect(
            effects("set \"My\".Setting = -5")
                == [.set(name: "My.setting", statement: "SET \"My\".setting = -5")])
        #expect(effects("sEt SeArCh_PaTh = x")[0] == .set(name: "search_path", statement: "SET search_path = x"))
        #expect(effects("SET work_mem TO DEFAULT") == [.reset(name: "work_mem")])
        #expect(effects("RESET work_mem") == [.reset(name: "work_mem")])
        #expect(effects("RESET ALL") == [.resetAll])
        #expect(effects("SET ROLE alice") == [.set(name: "role", statement: "SET ROLE alice")])
        #expect(effects("SET ROLE NONE") == [.reset(name: "role")])
        #expect(effects("RESET ROLE") == [.reset(name: "role")])
        #expect(
            effects("SET SESSION AUTHORIZATION 'bob'")
                == [.set(name: "session_authorization", statement: "SET SESSION AUTHORIZATION 'bob'")])
        #expect(effects("SET SESSION AUTHORIZATION DEFAULT") == [.reset(name: "session_authorization")])
        #expect(effects("RESET SESSION AUTHORIZATION") == [.reset(name: "session_authorization")])
        #expect(
            effects("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY") == [
                .set(
                    name: "default_transaction_isolation",
                    statement: "SET default_transaction_isolation = 'repeatable read'"),
                .set(name: "default_transaction_read_only", statement: "SET default_transaction_read_only = on"),
            ])
        #expect(
            effects("select set_config('App.X', 'it''s', false)")
                == [
                    .set(name: "app.x", statement: "SELECT pg_catalog.set_config('app.x', 'it''s', false)")
                ])
    }

    @Test func whatLastsOnlyATransactionOrIsReportedIsNotState() {
        #expect(
            effects("SET LOCAL search_path = x") == [.setLocal(name: "search_path", statement: "SET search_path = x")])
        #expect(effects("SET LOCAL ROLE alice") == [])
        #expect(effects("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE") == [])
        #expect(effects("SET CONSTRAINTS ALL DEFERRED") == [])
        #expect(effects("select set_config('a.b', 'v', true)") == [])
        #expect(effects("select pg_advisory_xact_lock(1)") == [])
        // Reported by the server with ParameterStatus: values followed from there, resets noted.
        #expect(effects("SET TIME ZONE 'UTC'") == [.reported(name: "timezone", reset: false)])
        #expect(effects("SET TIME ZONE LOCAL") == [.reported(name: "timezone", reset: true)])
        #expect(effects("SET NAMES 'UTF8'") == [.reported(name: "client_encoding", reset: false)])
        #expect(effects("SET application_name = 'x'") == [.reported(name: "application_name", reset: false)])
        #expect(effects("set DateStyle to ISO") == [.reported(name: "datestyle", reset: false)])
        #expect(effects("RESET application_name") == [.reported(name: "application_name", reset: true)])
        #expect(effects("SET application_name TO DEFAULT") == [.reported(name: "application_name", reset: true)])
        #expect(effects("SET LOCAL application_name = 'x'") == [])
    }

    /// PostgreSQL's scanner decides where a statement ends and what a value is; these are the
    /// cases where a reading of our own went wrong before.
    @Test func lexedAsPostgreSQLLexesIt() {
        // A -- comment ends at a carriage return too: the SET after it runs.
        #expect(
            effects("SELECT 1; -- note\rSET app.tenant = 't2'")
                == [.set(name: "app.tenant", statement: "SET app.tenant = 't2'")])
        #expect(effects("SELECT 1 -- note\rSET app.tenant = 't2'") == [])  // one statement
        // Vertical tab is no white space in PostgreSQL 15.
        #expect(effects("SET\u{0B}app.x = 1") == [.pin(.unknown, key: "")])
        // standard_conforming_strings off: a backslash escapes the quote, the string goes on.
        #expect(SessionStatements.effects("SELECT 'a\\'; SET app.x = 1; --'", standardStrings: false) == [])
        #expect(
            SessionStatements.effects("SELECT 'a\\'; SET app.x = 1; --'")
                == [.set(name: "app.x", statement: "SET app.x = 1")])
        #expect(SessionStatements.effects("SELECT N'a\\'; SET app.x = 1; --'", standardStrings: false) == [])
        #expect(
            SessionStatements.effects("SELECT X'a\\'; SET app.x = 1; --'", standardStrings: false)
                == [.set(name: "app.x", statement: "SET app.x = 1")])
        // Strings on several lines are one; a name before a quote is no prefix.
        #expect(effects("SET app.x = 'a'\n  'b'") == [.set(name: "app.x", statement: "SET app.x = E'ab'")])
        #expect(effects("SELECT t'x'; SET app.y = 1") == [.set(name: "app.y", statement: "SET app.y = 1")])
    }

    /// The pooler's statement names are out of the clients' reach in SQL.
    @Test func thePoolersStatementNamesAreReserved() {
        #expect(effects("DEALLOCATE tidepool_0a1b") == [.pin(.reservedName, key: "tidepool_0a1b")])
        #expect(effects("deallocate prepare \"tidepool_x\"") == [.pin(.reservedName, key: "tidepool_x")])
        #expect(
            effects("select 1; PREPARE TidePool_x AS select 'POISONED'") == [.pin(.reservedName, key: "tidepool_x")])
        #expect(effects("EXECUTE tidepool_x") == [.pin(.reservedName, key: "tidepool_x")])
        #expect(effects("EXECUTE mine") == [])
        #expect(effects("PREPARE mine AS select 1") == [.pin(.preparedStatement, key: "mine")])
        #expect(
            PreparedStatementTracker.serverName(for: ByteBuffer(string: "select 1\0\0\0"))
                != "tidepool_"
                + String(
                    SHA256.hash(data: Array("select 1\0\0\0".utf8)).prefix(12).map { String(format: "%02x", $0) }
                        .joined()),
            "the names carry the process's secret")
    }

    /// A refused statement's text cannot end its own dollar quote (a client's name is in it).
    @Test func failingStatementsKeepTheirQuoteWhole() {
        var sql = SessionStatements.failing(
            code: "42P05", message: "prepared statement \"x$tidepool$; DROP TABLE t; --\"")
        #expect(!sql.hasPrefix("DO $tidepool$"))
        let kinds = sql.withUTF8 { utf8 -> [SQLLexer.Kind] in
            var lexer = SQLLexer(UnsafeRawBufferPointer(utf8))
            var kinds: [SQLLexer.Kind] = []
            while true {
                let t = lexer.next()
                kinds.append(t.kind)
                if t.kind == .end { return kinds }
            }
        }
        #expect(kinds == [.word, .string, .end], "DO and one dollar-quoted body, nothing after it")
    }

    /// Values are sent again as PostgreSQL's own token text, not tokens joined again.
    @Test func valuesReplayAsWritten() {
        #expect(
            effects("SET statement_timeout = 1.5e+3") == [
                .set(name: "statement_timeout", statement: "SET statement_timeout = 1.5e+3")
            ])
        #expect(effects("SET x.y = 1.5e-3") == [.set(name: "x.y", statement: "SET x.y = 1.5e-3")])
        #expect(effects("SET x.y = .5E2") == [.set(name: "x.y", statement: "SET x.y = .5E2")])
        #expect(effects("SET x.y = U&'d\\0061t\\+000061'") == [.set(name: "x.y", statement: "SET x.y = E'data'")])
        #expect(
            effects("SET x.y = U&'d!0061t' UESCAPE '!'")
                == [.set(name: "x.y", statement: "SET x.y = U&'d!0061t' UESCAPE '!'")])
        #expect(effects("SET x.y = E'a\\nb\\\\c'") == [.set(name: "x.y", statement: "SET x.y = E'a\nb\\\\c'")])
        // A backslash reads the same whatever standard_conforming_strings the server has.
        #expect(effects("SET x.y = 'a\\b'") == [.set(name: "x.y", statement: "SET x.y = E'a\\\\b'")])
        #expect(
            SessionStatements.effects("SET x.y = 'it\\'s'", standardStrings: false)
                == [.set(name: "x.y", statement: "SET x.y = E'it''s'")])
        // Parts after a comment go on in E'' mode, as the server reads them.
        #expect(effects("SET x.y = E'x' \n -- c\n 'a\\'b'") == [.set(name: "x.y", statement: "SET x.y = E'xa''b'")])
        #expect(effects("SET x.y = 'x' -- c\n 'a'") == [.set(name: "x.y", statement: "SET x.y = E'xa'")])
        #expect(effects("SET x.y = 'x' /* c */\n 'a'") == [.set(name: "x.y", statement: "SET x.y = 'x' 'a'")])
        #expect(effects("SET x.y = 'a' /* c */ ") == [.set(name: "x.y", statement: "SET x.y = 'a'")])
        #expect(
            effects("SET search_path = a, -- c\n b") == [.set(name: "search_path", statement: "SET search_path = a, b")]
        )
        #expect(
            effects("select set_config('x.y', U&'\\0061', false)")
                == [.set(name: "x.y", statement: "SELECT pg_catalog.set_config('x.y', 'a', false)")])
    }

    @Test func quotesAndCommentsHideStatements() {
        #expect(effects("select 'set role x'") == [])
        #expect(effects("/* set role x */ select 1") == [])
        #expect(effects("-- set role x\nselect 1") == [])
        #expect(effects("/* a /* nested */ set role x; */ select 1") == [])
        #expect(effects("select $$ ; set role x; $$") == [])
        #expect(effects("select $q$ $$; set role x; $q$") == [])
        #expect(effects("select E'\\'; set role x; '") == [])
        #expect(effects("select 'a'';set role x;'") == [])
        #expect(effects("select \"set role x\" from t") == [])
        #expect(effects("select 'pg_advisory_lock(1)'") == [])
        // Outside them, a statement counts wherever it stands.
        #expect(
            effects("select 1; /* c */ SET search_path = x; select 2")
                == [.set(name: "search_path", statement: "SET search_path = x")])
        #expect(effects("select 'a' -- ;\n; set role x") == [.set(name: "role", statement: "SET ROLE x")])
        // A comment after a value is not replayed (it would swallow what follows).
        #expect(effects("SET work_mem = 64 -- note") == [.set(name: "work_mem", statement: "SET work_mem = 64")])
    }

    @Test func transactionControl() {
        #expect(effects("BEGIN") == [.begin])
        #expect(effects("start transaction isolation level serializable") == [.begin])
        #expect(effects("COMMIT") == [.commit])
        #expect(effects("end") == [.commit])
        #expect(effects("ROLLBACK") == [.rollback])
        #expect(effects("abort work") == [.rollback])
        #expect(effects("COMMIT AND CHAIN") == [.commit, .begin])
        #expect(effects("ROLLBACK AND NO CHAIN") == [.rollback])
        #expect(effects("SAVEPOINT s1") == [.savepoint("s1")])
        #expect(effects("RELEASE SAVEPOINT s1") == [.release("s1")])
        #expect(effects("release s1") == [.release("s1")])
        #expect(effects("ROLLBACK TO SAVEPOINT s1") == [.rollbackTo("s1")])
        #expect(effects("rollback work to \"S1\"") == [.rollbackTo("S1")])
        #expect(effects("COMMIT PREPARED 'x'") == [])
        #expect(effects("PREPARE TRANSACTION 'x'") == [.rollback])
    }

    @Test func stateThatPins() {
        #expect(effects("SELECT pg_advisory_lock(42)") == [.pin(.advisoryLock, key: "x:42")])
        #expect(effects("select pg_try_advisory_lock(1, -2)") == [.pin(.advisoryLock, key: "x:1,-2")])
        #expect(effects("select pg_advisory_lock_shared('7'::bigint)") == [.pin(.advisoryLock, key: "s:7")])
        #expect(effects("select pg_advisory_lock(id) from t") == [.pin(.advisoryLock, key: "*")])
        #expect(effects("SELECT pg_catalog.pg_advisory_unlock(42)") == [.unpin(.advisoryLock, key: "x:42")])
        #expect(effects("select pg_advisory_unlock_all()") == [.unpinAll(.advisoryLock)])
        #expect(effects("select set_config('a.b', $1, false)") == [.pin(.setConfig, key: "")])
        #expect(effects("CREATE TEMP TABLE t (a int)") == [.pin(.tempTable, key: "t")])
        #expect(effects("create global temporary table if not exists \"T\"(a int)") == [.pin(.tempTable, key: "T")])
        #expect(effects("CREATE TABLE pg_temp.x (a int)") == [.pin(.tempTable, key: "x")])
        #expect(effects("create temp view v as select 1") == [.pin(.tempTable, key: "v")])
        #expect(effects("CREATE TEMP TABLE t (a int) ON COMMIT DROP") == [])
        #expect(effects("CREATE TABLE t (a int)") == [])
        #expect(effects("select 1 as a into temp table t") == [.pin(.tempTable, key: "t")])
        #expect(
            effects("DROP TABLE IF EXISTS t, pg_temp.u") == [
                .unpin(.tempTable, key: "t"), .unpin(.tempTable, key: "u"),
            ])
        #expect(effects("DISCARD TEMP") == [.unpinAll(.tempTable)])
        #expect(effects("DECLARE c CURSOR WITH HOLD FOR SELECT 1") == [.pin(.holdCursor, key: "c")])
        #expect(effects("declare c no scroll cursor without hold for select 1") == [])
        #expect(effects("CLOSE c") == [.unpin(.holdCursor, key: "c")])
        #expect(effects("CLOSE ALL") == [.unpinAll(.holdCursor)])
        #expect(effects("LISTEN \"Chan\"") == [.listen(channel: "Chan")])
        #expect(effects("listen Chan; NOTIFY chan") == [.listen(channel: "chan"), .notify(channel: "chan")])
        #expect(effects("unlisten chan") == [.unlisten(channel: "chan")])
        #expect(effects("UNLISTEN *") == [.unlistenAll])
        // Cut to 63 bytes as PostgreSQL cuts identifiers, not in the middle of a character.
        #expect(
            effects("LISTEN " + String(repeating: "a", count: 70)) == [
                .listen(channel: String(repeating: "a", count: 63))
            ])
        #expect(
            effects("LISTEN \"" + String(repeating: "a", count: 62) + "é\"")
                == [.listen(channel: String(repeating: "a", count: 62))])
        #expect(effects("PREPARE p (int) AS select $1") == [.pin(.preparedStatement, key: "p")])
        #expect(effects("DEALLOCATE PREPARE p") == [.unpin(.preparedStatement, key: "p")])
        #expect(effects("deallocate all") == [.unpinAll(.preparedStatement)])
        #expect(effects("LOAD 'auto_explain'") == [.pin(.load, key: "")])
        #expect(effects("DISCARD ALL") == [.discardAll])
        #expect(effects("DO $$ BEGIN PERFORM set_config('a.b', 'c', false); END $$") == [.pin(.unknown, key: "")])
        #expect(effects("DO $$ BEGIN RAISE NOTICE 'hello'; END $$") == [])
        #expect(effects("SET search_path FROM CURRENT") == [.setFromCurrent(name: "search_path")])
        #expect(effects("SET x") == [.pin(.unknown, key: "")])
    }

    @Test func ordinarySQLHasNoEffects() {
        for sql in [
            "UPDATE pgbench_accounts SET abalance = abalance + -3 WHERE aid = 1;",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP);",
            "select count(*) from t where set_configuration = 1", "with x as (select 1) select * from x",
            "", ";;", "select", "set", "'unterminated", "$$ unterminated", "/* unterminated",
        ] {
            #expect(effects(sql).allSatisfy { $0 == .pin(.unknown, key: "") || $0.isTransactionControl }, "\(sql)")
        }
    }
}

/// The rules that make a statement's effect the session's.
@Suite struct SessionStateRulesTests {
    final class Run {
        let state = SessionState()
        var server: [String: String] = [:]
        var status = TransactionStatus.idle
        var outstanding = 0

        /// One request with `sql`, answered with `after` (and an error first if `failed`).
        func request(_ sql: String, _ after: TransactionStatus, failed: Bool = false) {
            send(sql)
            answer(after, failed: failed)
        }

        func send(_ sql: String) {
            state.statementSent(SessionStatements.effects(sql))
            state.requestSent(outstanding: outstanding)
            outstanding += 1
        }

        func answer(_ after: TransactionStatus, failed: Bool = false) {
            if failed, state.awaitsReplies { state.errorReceived() }
            state.ready(before: status, after: after, server: &server)
            status = after
            outstanding -= 1
        }

        var names: [String] { state.settings.map(\.name) }
    }

    @Test func aSetOutsideATransactionIsKeptAtOnce() {
        let r = Run()
        r.request("SET search_path = x", .idle)
        #expect(r.names == ["search_path"])
        #expect(r.server == ["search_path": "SET search_path = x"])
        r.request("SET work_mem = '8MB'; SET search_path = y", .idle)
        #expect(r.names == ["work_mem", "search_path"])
        #expect(r.state.settings.last?.statement == "SET search_path = y")
        r.request("RESET search_path", .idle)
        #expect(r.names == ["work_mem"])
        #expect(r.server == ["work_mem": "SET work_mem = '8MB'"])
    }

    @Test func aSetInATransactionCountsAtCommitOnly() {
        let r = Run()
        r.request("BEGIN", .inTransaction)
        r.request("SET a.b = 1", .inTransaction)
        #expect(r.names == [])
        r.request("COMMIT", .idle)
        #expect(r.names == ["a.b"])
        r.request("BEGIN; SET a.c = 1", .inTransaction)
        r.request("ROLLBACK", .idle)
        #expect(r.names == ["a.b"])
        r.request("BEGIN; SET a.c = 1; COMMIT", .idle)
        #expect(r.names == ["a.b", "a.c"])
        #expect(!r.state.isPinned)
    }

    @Test func aFailedTransactionKeepsNothing() {
        let r = Run()
        r.request("BEGIN", .inTransaction)
        r.request("SET a.b = 1", .inTransaction)
        r.request("select 1/0", .failed, failed: true)
        r.request("COMMIT", .idle)  // answered ROLLBACK
        #expect(r.names == [])
        // Implicit transaction: the SET and the failing statement in one Query roll back together.
        r.request("SET a.b = 1; select 1/0", .idle, failed: true)
        #expect(r.names == [])
        r.request("BEGIN; SET a.b = 1; select 1/0", .failed, failed: true)
        r.request("ROLLBACK", .idle)
        #expect(r.names == [])
        #expect(!r.state.isPinned)
    }

    @Test func savepointsUndoAndRelease() {
        let r = Run()
        r.request("BEGIN; SET a.a = 1; SAVEPOINT s", .inTransaction)
        r.request("SET a.b = 2", .inTransaction)
        r.request("ROLLBACK TO SAVEPOINT s", .inTransaction)
        r.request("SAVEPOINT t; SET a.c = 3; RELEASE t", .inTransaction)
        r.request("COMMIT", .idle)
        #expect(r.names == ["a.a", "a.c"])
        // An error after a savepoint, undone by rolling back to it: the transaction goes on.
        r.request("BEGIN; SAVEPOINT s", .inTransaction)
        r.request("SET a.d = 4; select 1/0", .failed, failed: true)
        r.request("ROLLBACK TO s", .inTransaction)
        r.request("SET a.e = 5; COMMIT", .idle)
        #expect(r.names == ["a.a", "a.c", "a.e"])
        #expect(!r.state.isPinned)
    }

    @Test func setFromCurrentKeepsTheTransactionsLocalValue() {
        let r = Run()
        r.request("SET a.b FROM CURRENT", .idle)
        #expect(r.names == [], "outside a transaction the session's value stays")
        r.request("BEGIN; SET LOCAL a.b = 'x'; SET a.b FROM CURRENT", .inTransaction)
        #expect(r.names == [])
        r.request("COMMIT", .idle)
        #expect(r.state.settings == [.init(name: "a.b", statement: "SET a.b = 'x'")])
        r.request("BEGIN; SET LOCAL a.c = 'y'; SET a.c FROM CURRENT", .inTransaction)
        r.request("ROLLBACK", .idle)
        r.request("BEGIN; SET LOCAL a.d = 'z'", .inTransaction)
        r.request("COMMIT", .idle)
        #expect(r.names == ["a.b"], "a rollback, or no FROM CURRENT, keeps nothing")
    }

    @Test func whatTheRulesCannotTellPinsForGood() {
        let r = Run()
        // Part of the Query committed before the error: which part is not known.
        r.request("BEGIN; SET a.b = 1; COMMIT; select 1/0", .idle, failed: true)
        #expect(r.state.pinReason == .unknown)
        r.request("RESET ALL", .idle)
        #expect(r.state.isPinned)
    }

    @Test func pinsCountUntilTheStateIsGone() {
        let r = Run()
        r.request("select pg_advisory_lock(1)", .idle)
        r.request("select pg_advisory_lock(1)", .idle)
        #expect(r.state.pinReason == .advisoryLock)
        r.request("select pg_advisory_unlock(1)", .idle)
        #expect(r.state.isPinned, "locks nest")
        r.request("select pg_advisory_unlock(2)", .idle)
        #expect(r.state.isPinned, "not the lock held")
        r.request("select pg_advisory_unlock(1)", .idle)
        #expect(!r.state.isPinned)
        #expect(r.state.serverNeedsReset)

        r.request("BEGIN; CREATE TEMP TABLE t (a int)", .inTransaction)
        #expect(r.state.pinReason == .tempTable)
        r.request("DROP TABLE t", .inTransaction)
        r.request("ROLLBACK", .idle)
        #expect(r.state.isPinned, "the drop rolled back")
        r.request("DROP TABLE t", .idle)
        #expect(!r.state.isPinned)

        r.request("select pg_advisory_lock(k) from t", .idle)
        r.request("select pg_advisory_unlock(k) from t", .idle)
        #expect(r.state.isPinned, "a lock of unknown key stays until unlock_all")
        r.request("select pg_advisory_unlock_all()", .idle)
        #expect(!r.state.isPinned)

        r.request("LOAD 'x'; SET a.b = 1; PREPARE p AS select 1", .idle)
        r.request("DISCARD ALL", .idle)
        #expect(r.state.pinReason == .load, "a loaded library stays")
        #expect(r.names == [] && r.server == [:])
        #expect(r.state.statementsDiscarded)
    }

    @Test func pipelinedRequestsAreSettledByTheirOwnReadyForQuery() {
        let r = Run()
        r.send("select 1")
        r.send("BEGIN; SET a.b = 1")
        r.send("select 2")
        r.send("COMMIT")
        r.answer(.idle)
        #expect(r.names == [])
        r.answer(.inTransaction)
        #expect(r.names == [])
        r.answer(.inTransaction)
        r.answer(.idle)
        #expect(r.names == ["a.b"])
        #expect(!r.state.awaitsReplies)
    }

    @Test func resetAllKeepsTheRole() {
        let r = Run()
        r.request("SET ROLE alice; SET a.b = 1", .idle)
        r.request("RESET ALL", .idle)
        #expect(r.names == ["role"])
    }
}

/// The SQL of the Query messages in `buffer`.
func queries(_ buffer: ByteBuffer) -> [String] {
    var b = buffer
    var out: [String] = []
    while let type = b.readInteger(as: UInt8.self), let length = b.readInteger(as: Int32.self) {
        var body = b.readSlice(length: Int(length) - 4)!
        if type == UInt8(ascii: "Q") { out.append(body.readNullTerminatedString() ?? "") }
    }
    return out
}

/// Settings replayed across servers, pins that keep a server, and resets before reuse, through
/// `ClientSession`.
@Suite struct SessionStateLendTests {
    typealias D = SessionDriver

    @Test func aClientsSettingsFollowItAndLeaveWithIt() {
        let shared = ServerSessionState(maxPreparedStatements: 10)
        let a = D(server: shared)
        a.client(D.query("SET search_path = a_schema"))
        a.lend()
        a.serverSends(D.complete("SET"), D.ready("I"))
        #expect(a.releases == [true])
        #expect(shared.settings["search_path"] == "SET search_path = a_schema")

        // Another client gets that server: the setting is undone first, replies unseen.
        let b = D(server: shared)
        b.client(D.query("show search_path"))
        b.lend()
        #expect(queries(b.toServer) == ["RESET search_path;"])
        b.serverSends(D.complete("RESET"), D.ready("I"))
        #expect(b.clientTypes == "")
        #expect(queries(b.toServer) == ["RESET search_path;", "show search_path"])
        b.serverSends(D.complete("SHOW"), D.ready("I"))
        #expect(b.clientTypes == "CZ")
        #expect(shared.settings.isEmpty)

        // The first client, on a server without its setting, gets it made first.
        let other = ServerSessionState(maxPreparedStatements: 10)
        a.client(D.query("show search_path"))
        #expect(a.session.lent(other, now: a.now, isKnownStatement: { _ in false }, into: &a.actions) == .linked)
        a.carryOut()
        a.serverSends(D.complete("SET"), D.ready("I"))
        #expect(queries(a.toServer).suffix(2) == ["SET search_path = a_schema;", "show search_path"])
        #expect(a.replayed == 1)
    }

    @Test func aPinnedClientKeepsItsServerAndLeavesItReset() {
        let d = D()
        d.client(D.query("select pg_advisory_lock(7)"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases.isEmpty && d.resets.isEmpty)
        #expect(d.session.isLinked)
        d.client(D.query("select pg_advisory_unlock(7)"))
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.resets == ["DISCARD ALL"], "the server goes back reset")
        #expect(d.session.state == .idle)
        #expect(d.pinChanges == [true, false])

        // Leaving while pinned: reset as well.
        let e = D()
        e.client(D.query("create temp table t (a int)"))
        e.lend()
        e.serverSends(D.complete("CREATE TABLE"), D.ready("I"))
        #expect(e.session.isLinked)
        e.session.finish(serverResetQuery: "", resetAlways: false, into: &e.actions)
        e.carryOut()
        #expect(e.resets == ["DISCARD ALL"])
    }

    @Test func aFailedReplayClosesTheClient() {
        let shared = ServerSessionState(maxPreparedStatements: 10)
        let d = D(server: shared)
        d.client(D.query("SET ROLE gone"))
        d.lend()
        d.serverSends(D.complete("SET"), D.ready("I"))
        shared.settings.removeAll()
        d.client(D.query("select 1"))
        d.lend()
        d.serverSends(
            D.m("E") {
                $0.writeInteger(UInt8(ascii: "S"))
                $0.writeNullTerminatedString("ERROR")
                $0.writeInteger(UInt8(ascii: "C"))
                $0.writeNullTerminatedString("22023")
                $0.writeInteger(UInt8(ascii: "M"))
                $0.writeNullTerminatedString("role \"gone\" does not exist")
                $0.writeInteger(UInt8(0))
            }, D.ready("I"))
        #expect(d.closedWith?.message == "could not restore session state: role \"gone\" does not exist")
        #expect(d.releases.last == false, "the server's state is not known")
    }

    /// The last effect-free Parse is remembered and not read again; any other text is.
    @Test func aRepeatedParseIsNotReadAgainButAnotherIs() {
        func parse(_ sql: String) -> ByteBuffer {
            D.m("P") {
                $0.writeNullTerminatedString("")
                $0.writeNullTerminatedString(sql)
                $0.writeInteger(Int16(0))
            }
        }
        let sync = D.m("S")
        let d = D()
        d.client(parse("select abalance from t where aid = $1"), sync)
        #expect(d.session.lastPlainParse == Array("select abalance from t where aid = $1".utf8))
        d.lend()
        d.serverSends(D.m("1"), D.ready("I"))
        d.client(parse("select abalance from t where aid = $1"), sync)
        d.lend()
        d.serverSends(D.m("1"), D.ready("I"))
        d.client(parse("select pg_advisory_lock($1)"), sync)
        d.lend()
        d.serverSends(D.m("1"), D.ready("I"))
        #expect(d.session.sessionState?.pinReason == .advisoryLock)
        #expect(d.session.lastPlainParse == Array("select abalance from t where aid = $1".utf8))
    }

    /// session_state = refuse: a pinning statement goes to the server as one that fails with 0A000
    /// in its place (in order, failing its transaction); settings are still kept.
    @Test func refuseModeSendsAFailingStatementInstead() {
        for prepared in [false, true] {
            let d = D(prepared: prepared)
            d.session.refusesPins = true
            d.client(D.query("SET app.x = '1'; select pg_advisory_lock(7)"))
            d.lend()
            let sent = queries(d.toServer)
            #expect(sent.count == 1 && sent[0].hasPrefix("DO $tidepool$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000'"))
            #expect(sent[0].contains("a session advisory lock keeps session state"))
            d.serverSends(D.m("E"), D.ready("I"))
            #expect(d.session.sessionState?.isPinned != true)
            #expect(d.session.sessionState?.settings ?? [] == [], "the refused Query ran nothing")
            #expect(d.releases == [true])
            d.client(D.query("SET app.x = '2'"))
            d.lend()
            d.serverSends(D.complete("SET"), D.ready("I"))
            #expect(d.session.sessionState?.settings.map(\.name) == ["app.x"])
        }
    }

    /// query_wait_notify: a queued client gets PgBouncer's NOTICE; a linked one nothing.
    @Test func aQueuedClientIsToldItWaits() {
        let d = D()
        d.client(D.query("select 1"))
        d.session.waitNotice(into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "N")
        #expect(d.toClient.readableBytesView.contains(Array("client being queued".utf8)))
        d.lend()
        d.session.waitNotice(into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "N")
    }

    @Test func ignoreModeFollowsNothing() {
        let d = D()
        d.session.tracksSessionState = false
        d.client(D.query("select pg_advisory_lock(7)"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases == [true])
    }
}
