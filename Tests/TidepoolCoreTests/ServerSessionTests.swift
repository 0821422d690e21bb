import NIOCore
import Testing

@testable import TidepoolCore

/// A server connection's life outside a lend: login, connect_query, checks, resets, idle time, and
/// what its closing means in each phase.
@Suite struct ServerSessionTests {
    typealias A = ServerSession.Action

    func feed(_ s: inout ServerSession, _ build: (inout ByteBuffer) -> Void) -> [A] {
        let (type, body) = ServerLoginTests().message(build)
        return s.message(type: type, body: body)
    }

    /// A session logged in by trust, with `connectQuery` if given; returns the actions of the last
    /// login message.
    func loggedIn(
        connectQuery: String? = nil, target: TargetSessionAttrs = .any, reports: [(String, String)] = []
    ) -> (ServerSession, [A]) {
        var s = ServerSession(
            state: ServerSessionState(maxPreparedStatements: 4), connectQuery: connectQuery,
            targetSessionAttrs: target)
        let start = s.connected(ServerLoginStateMachine(user: "u", database: "d", secret: .none))
        #expect(start.count == 2 && start[1] == .armTimeout)
        #expect(s.phase == .loggingIn)
        _ = feed(&s) { Wire.authenticationOk(into: &$0) }
        _ = feed(&s) { Wire.parameterStatus("TimeZone", "UTC", into: &$0) }
        for (name, value) in reports { _ = feed(&s) { Wire.parameterStatus(name, value, into: &$0) } }
        _ = feed(&s) { Wire.backendKeyData(processID: 7, secretKey: 8, into: &$0) }
        let last = feed(&s) { Wire.readyForQuery(.idle, into: &$0) }
        return (s, last)
    }

    func sentQuery(_ actions: [A]) -> String? {
        for case .send(var b) in actions where b.readInteger(as: UInt8.self) == MessageType.query {
            b.moveReaderIndex(forwardBy: 4)
            return b.readNullTerminatedString()
        }
        return nil
    }

    @Test func loginMakesItReadyWithItsParametersAndKey() {
        let (s, last) = loggedIn()
        #expect(last == [.disarmTimeout, .loggedIn])
        #expect(s.phase == .ready)
        #expect(s.state.parameters == ["TimeZone": "UTC"])
        #expect(s.processID == 7 && s.secretKey == 8)
    }

    @Test func aListenerConnectionHandsWhatItReadsToTheListener() {
        var (s, _) = loggedIn()
        s.listens = true
        let notification = feed(&s) {
            $0.writeInteger(MessageType.notificationResponse)
            $0.writeInteger(Int32(4 + 4 + 2 + 2))
            $0.writeInteger(Int32(9))
            $0.writeNullTerminatedString("c")
            $0.writeNullTerminatedString("p")
        }
        guard case .forListener(let type, _) = notification.first else {
            Issue.record("expected forListener, got \(notification)")
            return
        }
        #expect(type == MessageType.notificationResponse)
        #expect(feed(&s) { Wire.readyForQuery(.idle, into: &$0) }.count == 1)
        let fatal = feed(&s) { Wire.errorResponse(.fatal(SQLState.adminShutdown, "terminating"), into: &$0) }
        #expect(fatal.contains(.lost(unused: true)) && s.phase == .closed)
    }

    /// target_session_attrs, judged from in_hot_standby and default_transaction_read_only.
    @Test func targetSessionAttrsAsPostgreSQLReportsThem() {
        let primary = ["in_hot_standby": "off", "default_transaction_read_only": "off"]
        let standby = ["in_hot_standby": "on", "default_transaction_read_only": "off"]
        let readOnlyPrimary = ["in_hot_standby": "off", "default_transaction_read_only": "on"]
        let table: [(TargetSessionAttrs, [String: String], Bool)] = [
            (.any, [:], true), (.readWrite, primary, true), (.readWrite, standby, false),
            (.readWrite, readOnlyPrimary, false), (.readOnly, standby, true), (.readOnly, readOnlyPrimary, true),
            (.readOnly, primary, false), (.primary, readOnlyPrimary, true), (.primary, standby, false),
            (.standby, standby, true), (.standby, primary, false),
            // An older server that does not say: refused rather than guessed.
            (.primary, [:], false), (.readWrite, ["in_hot_standby": "off"], false),
        ]
        for (target, parameters, accepted) in table {
            #expect((target.mismatch(parameters) == nil) == accepted, "\(target) \(parameters)")
        }
        #expect(TargetSessionAttrs.readWrite.mismatch(standby)!.contains("in_hot_standby=on"))
    }

    /// A server of the wrong kind is closed as a failed connection the pool waits through (57P03);
    /// the check comes after connect_query, which may change default_transaction_read_only.
    @Test func aServerOfTheWrongKindIsRefusedAfterLogin() {
        let (s, last) = loggedIn(target: .primary, reports: [("in_hot_standby", "on")])
        #expect(s.phase == .closed)
        guard case .connectFailed(let error) = last.dropFirst().first else {
            Issue.record("expected connectFailed, got \(last)")
            return
        }
        #expect(error.code == SQLState.cannotConnectNow && PoolStateMachine.isTransient(error))
        #expect(last.last == .close)
        #expect(loggedIn(target: .standby, reports: [("in_hot_standby", "on")]).1 == [.disarmTimeout, .loggedIn])
        var (after, sent) = loggedIn(
            connectQuery: "SET default_transaction_read_only = on", target: .readOnly,
            reports: [("in_hot_standby", "off"), ("default_transaction_read_only", "off")])
        #expect(sentQuery(sent) != nil)
        _ = feed(&after) { Wire.parameterStatus("default_transaction_read_only", "on", into: &$0) }
        #expect(feed(&after) { Wire.readyForQuery(.idle, into: &$0) } == [.disarmTimeout, .loggedIn])
    }

    @Test func connectQueryRunsBeforeThePoolHearsOfIt() {
        var (s, last) = loggedIn(connectQuery: "set search_path = app")
        #expect(sentQuery(last) == "set search_path = app")
        #expect(!last.contains(.loggedIn))
        #expect(s.phase == .internalQuery(.afterLogin))
        _ = feed(&s) { Wire.commandComplete("SET", into: &$0) }
        #expect(feed(&s) { Wire.readyForQuery(.idle, into: &$0) } == [.disarmTimeout, .loggedIn])
    }

    @Test func loginTimeoutAndFailureReachThePool() {
        var s = ServerSession(state: ServerSessionState(maxPreparedStatements: 4), connectQuery: nil)
        _ = s.connected(ServerLoginStateMachine(user: "u", database: "d", secret: .none))
        let actions = s.timedOut()
        guard case .connectFailed(let error) = actions[1] else {
            Issue.record("expected connectFailed, got \(actions)")
            return
        }
        #expect(error.message == "server login timed out")
        #expect(actions.last == .close)
        #expect(s.closed().isEmpty, "its closing was already reported")
    }

    @Test func aListenerQueryIsSentOnlyByAReadyListener() {
        var (s, _) = loggedIn()
        #expect(s.command(.listenerQuery("LISTEN c")).isEmpty, "a pooled server runs no listener query")
        s.listens = true
        #expect(sentQuery(s.command(.listenerQuery("LISTEN c"))) == "LISTEN c")
        #expect(s.phase == .ready, "its answers go to the listener, not to a query of the pooler's")
        _ = s.closed()
        #expect(s.command(.listenerQuery("LISTEN c")).isEmpty)
        #expect(s.command(.terminate).isEmpty, "a closed server is not closed twice")
    }

    @Test func checkPassesOrClosesTheServer() {
        var (s, _) = loggedIn()
        #expect(sentQuery(s.check("select 1")) == "select 1")
        _ = feed(&s) { Wire.commandComplete("SELECT 1", into: &$0) }
        #expect(feed(&s) { Wire.readyForQuery(.idle, into: &$0) } == [.disarmTimeout, .checkFinished(ok: true)])
        _ = s.check("select 1")
        #expect(feed(&s) { Wire.errorResponse(.fatal("57P01", "terminating"), into: &$0) }.count == 1)
        #expect(
            feed(&s) { Wire.readyForQuery(.idle, into: &$0) } == [.disarmTimeout, .checkFinished(ok: false), .close])
        #expect(s.phase == .closed)
        #expect(s.check("select 1") == [.checkFinished(ok: false)], "a closed server fails its check at once")
    }

    @Test func resetDropsPreparedStatementsAndReleasesCleanOnly() {
        var (s, _) = loggedIn()
        _ = s.state.statements.insert("tidepool_1")
        #expect(sentQuery(s.reset("DISCARD ALL")) == "DISCARD ALL")
        #expect(s.state.statements.count == 0)
        #expect(feed(&s) { Wire.readyForQuery(.idle, into: &$0) } == [.disarmTimeout, .released(reusable: true)])
        _ = s.reset("DISCARD ALL")
        #expect(
            feed(&s) { Wire.readyForQuery(.inTransaction, into: &$0) } == [.disarmTimeout, .released(reusable: false)])
    }

    @Test func unlistenKeepsPreparedStatementsAndTheSearchPathIsForgottenByResetAll() {
        var (s, _) = loggedIn()
        _ = s.state.statements.insert("tidepool_1")
        s.state.parameters["search_path"] = "a,b"
        _ = s.reset("UNLISTEN *")
        #expect(s.state.statements.contains("tidepool_1"), "the server still has it")
        #expect(s.state.parameters["search_path"] == "a,b")
        _ = feed(&s) { Wire.readyForQuery(.idle, into: &$0) }
        _ = s.reset("RESET ALL")
        #expect(s.state.statements.contains("tidepool_1"))
        #expect(s.state.parameters["search_path"] == nil, "back at the server's default")
    }

    @Test func internalQueryTimeoutClosesTheServer() {
        var (s, _) = loggedIn()
        _ = s.reset("DISCARD ALL")
        #expect(s.timedOut() == [.close])
        #expect(s.closed() == [.disarmTimeout, .lost(unused: true)], "a reset server that goes is reported lost")
    }

    @Test func closingMeansSomethingDifferentInEachPhase() {
        var connecting = ServerSession(state: ServerSessionState(maxPreparedStatements: 4), connectQuery: nil)
        guard case .connectFailed = connecting.closed()[1] else {
            Issue.record("closing while connecting is a failed connect")
            return
        }
        var (checking, _) = loggedIn()
        _ = checking.check("select 1")
        #expect(checking.closed() == [.disarmTimeout, .checkFinished(ok: false)])
        var (idle, _) = loggedIn()
        #expect(idle.closed() == [.disarmTimeout, .lost(unused: true)])
        #expect(idle.closed() == [])
    }

    /// Bytes that are no PostgreSQL message close an idle server, and the pool hears of it.
    @Test func badBytesFromAnIdleServerAreReported() {
        var (s, _) = loggedIn()
        #expect(s.badMessage() == [.disarmTimeout, .lost(unused: true), .close])
    }

    @Test func idleServerKeepsItsParametersUpToDate() {
        var (s, _) = loggedIn()
        #expect(feed(&s) { Wire.parameterStatus("TimeZone", "Europe/Paris", into: &$0) } == [])
        #expect(s.state.parameters["TimeZone"] == "Europe/Paris")
        #expect(
            feed(&s) { Wire.errorResponse(PostgresError(code: "01000", message: "just saying"), into: &$0) }.count == 1)
        #expect(s.phase == .ready)
    }

    /// A FATAL from an idle server (pg_terminate_backend) retires it at once: the pool hears of it
    /// before it can lend it, and its closing later says nothing more.
    @Test func fatalFromAnIdleServerRetiresItAtOnce() {
        var (s, _) = loggedIn()
        let actions = feed(&s) { Wire.errorResponse(.fatal("57P01", "terminating connection"), into: &$0) }
        #expect(Array(actions.dropFirst()) == [.disarmTimeout, .lost(unused: true), .close])
        #expect(s.phase == .closed)
        #expect(s.closed() == [])
    }
}

/// Decisions the server handler used to make itself: what a channel error means to the pool,
/// whether a lost server's client may replay, the login's parameters and secret, the pool key.
@Suite struct ServerDecisionTests {
    @Test func aSocketErrorIsWaitedOutAndATLSRefusalIsNot() {
        let (transport, _) = ServerSessionTests().loggedIn()
        var loggingIn = ServerSession(state: ServerSessionState(maxPreparedStatements: 4), connectQuery: nil)
        _ = loggingIn.connected(ServerLoginStateMachine(user: "u", database: "d", secret: .none))
        var tls = loggingIn
        #expect(
            loggingIn.failed(.transport("reset"))
                == [
                    .disarmTimeout, .connectFailed(.fatal(SQLState.connectionFailure, "server connection: reset")),
                    .close,
                ])
        #expect(
            tls.failed(.handshake("bad certificate"))
                == [
                    .disarmTimeout, .connectFailed(.fatal(SQLState.unableToConnect, "server TLS: bad certificate")),
                    .close,
                ])
        var ready = transport
        #expect(
            ready.failed(.transport("reset")) == [.close], "a ready server that fails is closed, not a login failure")
    }

    @Test func aReadyServerIsToldTerminateBeforeItIsClosed() {
        let (ready, _) = ServerSessionTests().loggedIn()
        let actions = ready.terminate()
        guard case .send(let bytes) = actions.first else {
            Issue.record("expected a Terminate first, got \(actions)")
            return
        }
        #expect(bytes.getInteger(at: bytes.readerIndex, as: UInt8.self) == UInt8(ascii: "X") && actions.last == .close)
        var loggingIn = ServerSession(state: ServerSessionState(maxPreparedStatements: 4), connectQuery: nil)
        _ = loggingIn.connected(ServerLoginStateMachine(user: "u", database: "d", secret: .none))
        #expect(loggingIn.terminate() == [.close])
        var closed = ready
        _ = closed.closed()
        #expect(closed.terminate().isEmpty)
    }

    @Test func aLostServerLetsItsClientReplayOnlyWhenNothingWasWrittenInThisLend() {
        var (s, _) = ServerSessionTests().loggedIn()
        s.attached()
        var untouched = s
        #expect(untouched.closed() == [.disarmTimeout, .lost(unused: true)])
        s.wroteClientBytes()
        var written = s
        #expect(written.closed() == [.disarmTimeout, .lost(unused: false)])
        s.attached()  // the next lend starts clean
        #expect(s.closed() == [.disarmTimeout, .lost(unused: true)])
    }

    @Test func theLoginCarriesTheEntrysParametersBeforeAReplicationClientsOwn() {
        var entry = DatabaseEntry(name: "app")
        entry.dbname = "real"
        entry.timezone = "UTC"
        entry.applicationName = "pooled"
        let login = ServerLoginStateMachine(
            database: entry, user: "u", secret: .none, extra: [("application_name", "mine"), ("replication", "true")])
        #expect(login.database == "real")
        #expect(
            login.extraParameters.map { "\($0.0)=\($0.1)" } == [
                "TimeZone=UTC", "application_name=pooled", "replication=true",
            ])
    }

    @Test func theServerSecretIsTheEntrysThenTheAuthFilesThenLearnedThenLookedUp() {
        typealias Secret = ServerLoginStateMachine.Secret
        var entry = DatabaseEntry(name: "app")
        let learned: () -> Secret? = { .password("learned") }
        let lookedUp: () -> AuthQueryExchange.Outcome? = { .found(.md5("md5found")) }
        entry.password = "entry"
        #expect(
            Secret.forServer(user: "u", database: entry, listed: .plain("file"), learned: learned, lookedUp: lookedUp)
                == .password("entry"))
        entry.user = "other"
        #expect(
            Secret.forServer(user: "u", database: entry, listed: .plain("file"), learned: learned, lookedUp: lookedUp)
                == .password("file"), "the entry's password is its own user's")
        #expect(
            Secret.forServer(user: "u", database: entry, listed: .md5("md5file"), learned: learned, lookedUp: lookedUp)
                == .md5("md5file"))
        #expect(
            Secret.forServer(user: "u", database: entry, listed: nil, learned: learned, lookedUp: lookedUp)
                == .password("learned"))
        #expect(
            Secret.forServer(user: "u", database: entry, listed: nil, learned: { nil }, lookedUp: lookedUp)
                == .md5("md5found"))
        #expect(
            Secret.forServer(user: "u", database: entry, listed: nil, learned: { nil }, lookedUp: { .notFound })
                == .none)
    }

    @Test func aClientJoinsItsEntrysUsersPoolWhenTheEntryNamesOne() {
        var entry = DatabaseEntry(name: "app")
        #expect(PoolKey(database: "app", entry: entry, loginUser: "alice") == PoolKey(database: "app", user: "alice"))
        entry.user = "shared"
        #expect(PoolKey(database: "app", entry: entry, loginUser: "alice") == PoolKey(database: "app", user: "shared"))
    }
}
