import NIOCore
import Testing

@testable import TidepoolCore

/// A server PostgreSQL ended just as it was lent: the client gets another server when nothing of
/// its own ran on the first, and loses its connection only when something may have.
@Suite struct ReplayTests {
    typealias D = SessionDriver

    static func fatal(_ code: String) -> ByteBuffer {
        var b = ByteBuffer()
        Wire.errorResponse(.fatal(code, "terminating connection due to administrator command"), into: &b)
        return b
    }

    func lost(_ d: D, unused: Bool) {
        d.session.serverLost(unused: unused, now: d.now, into: &d.actions)
        d.carryOut()
    }

    @Test(arguments: [false, true]) func aServerGoneBeforeTheBytesWereWrittenIsReplaced(prepared: Bool) {
        let d = D(prepared: prepared)
        if prepared {
            d.client(
                PreparedHarness.parse("s1", "select 1"), PreparedHarness.bind("s1"), PreparedHarness.execute, D.sync)
        } else {
            d.client(D.query("select 1"))
        }
        d.lend()
        let first = d.serverTypes
        #expect(!first.isEmpty)
        lost(d, unused: true)
        #expect(d.closedWith == nil)
        #expect(d.session.isWaiting && d.requests == 2)
        d.toServer.clear()
        d.lend(ServerSessionState(maxPreparedStatements: 10))
        #expect(d.serverTypes == first, "the same request again, rewritten for the new server")
        if prepared {
            d.serverSends(D.m("1"), D.m("2"), D.complete("SELECT 1"), D.ready("I"))
            #expect(d.clientTypes == "12CZ")
        } else {
            d.serverSends(D.complete("SELECT 1"), D.ready("I"))
            #expect(d.clientTypes == "CZ")
        }
        #expect(d.session.state == .idle && d.releases == [true])
    }

    @Test func aFatalOfClass57PAsTheFirstAnswerIsNotTheClients() {
        let d = D()
        d.client(D.query("insert into t values (1)"))
        d.lend()
        d.serverSends(Self.fatal(SQLState.adminShutdown))
        #expect(d.clientTypes == "", "the server's farewell is not passed on")
        lost(d, unused: false)
        #expect(d.closedWith == nil && d.session.isWaiting)
        d.toServer.clear()
        d.lend()
        #expect(d.serverTypes == "Q")
        d.serverSends(D.complete("INSERT 0 1"), D.ready("I"))
        #expect(d.clientTypes == "CZ")
    }

    @Test func bytesReadAfterTheLendGoAgainToo() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        d.client(D.query("select 2"))
        #expect(d.serverTypes == "QQ")
        lost(d, unused: true)
        d.toServer.clear()
        d.lend()
        #expect(d.serverTypes == "QQ")
        d.serverSends(D.complete("SELECT 1"), D.ready("I"), D.complete("SELECT 1"), D.ready("I"))
        #expect(d.clientTypes == "CZCZ")
        #expect(d.session.state == .idle)
    }

    @Test func aServerThatAnsweredOrMayHaveRunItIsNotReplaced() {
        // Answered in part: the client must learn its connection is gone.
        let d = D()
        d.client(D.query("select 1; select 2"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"))
        lost(d, unused: true)
        #expect(d.closedWith?.message == "server conn crashed?")

        // Written, then the socket closed without a word: it may have run.
        let e = D()
        e.client(D.query("select 1"))
        e.lend()
        lost(e, unused: false)
        #expect(e.closedWith?.message == "server conn crashed?")

        // A FATAL of another class (the query itself was the trouble).
        let f = D()
        f.client(D.query("select 1"))
        f.lend()
        f.serverSends(Self.fatal("XX000"))
        lost(f, unused: false)
        #expect(f.closedWith != nil)
        #expect(f.clientTypes == "E")
    }

    @Test func aServerLostDuringTheParameterSyncIsReplaced() {
        let d = D()
        d.session.wanted["application_name"] = "mine"
        d.client(D.query("select 1"))
        d.lend()
        #expect(d.serverTypes == "Q", "the sync first; the client's Query waits for it")
        lost(d, unused: false)
        #expect(d.closedWith == nil && d.session.isWaiting)
    }

    @Test func aRequestIsReplayedAFewTimesAtMost() {
        let d = D()
        d.client(D.query("select 1"))
        for _ in 0..<ClientSession.maxReplays {
            d.lend()
            lost(d, unused: true)
            #expect(d.session.isWaiting)
        }
        d.lend()
        lost(d, unused: true)
        #expect(d.closedWith?.message == "server conn crashed?")
    }
}
