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
    func loggedIn(connectQuery: String? = nil) -> (ServerSession, [A]) {
        var s = ServerSession(state: ServerSessionState(maxPreparedStatements: 4), connectQuery: connectQuery)
        let start = s.connected(ServerLoginStateMachine(user: "u", database: "d", secret: .none))
        #expect(start.count == 2 && start[1] == .armTimeout)
        #expect(s.phase == .loggingIn)
        _ = feed(&s) { Wire.authenticationOk(into: &$0) }
        _ = feed(&s) { Wire.parameterStatus("TimeZone", "UTC", into: &$0) }
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
        #expect(fatal.contains(.lost) && s.phase == .closed)
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

    @Test func internalQueryTimeoutClosesTheServer() {
        var (s, _) = loggedIn()
        _ = s.reset("DISCARD ALL")
        #expect(s.timedOut() == [.close])
        #expect(s.closed() == [.disarmTimeout, .lost], "a reset server that goes is reported lost")
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
        #expect(idle.closed() == [.disarmTimeout, .lost])
        #expect(idle.closed() == [])
    }

    /// Bytes that are no PostgreSQL message close an idle server, and the pool hears of it.
    @Test func badBytesFromAnIdleServerAreReported() {
        var (s, _) = loggedIn()
        #expect(s.badMessage() == [.disarmTimeout, .lost, .close])
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
        #expect(Array(actions.dropFirst()) == [.disarmTimeout, .lost, .close])
        #expect(s.phase == .closed)
        #expect(s.closed() == [])
    }
}
