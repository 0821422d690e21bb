import NIOCore
import Testing

@testable import TidepoolCore

/// A test clock: time only moves when the test says so.
struct TestClock {
    var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
    mutating func advance(_ amount: TimeAmount) { now = now + amount }
}

let poolA = PoolKey(database: "db", user: "alice")
let poolB = PoolKey(database: "db", user: "bob")
let dbError = PostgresError(severity: "FATAL", code: "08006", message: "connection refused")
let loginError = PostgresError(severity: "FATAL", code: "28P01", message: "password authentication failed")

func c(_ n: UInt64) -> ClientID { ClientID(n) }

extension [PoolAction] {
    var connects: [ServerID] {
        compactMap { if case .connect(let id, _, _) = $0 { return id } else { return nil } }
    }
    var lends: [(ServerID, ClientID)] {
        compactMap { if case .lend(let s, let c) = $0 { return (s, c) } else { return nil } }
    }
    var closes: [ServerID] {
        compactMap { if case .close(let id) = $0 { return id } else { return nil } }
    }
    var failures: [(ClientID, PoolError)] {
        compactMap { if case .failClient(let c, let e) = $0 { return (c, e) } else { return nil } }
    }
}

@Suite final class PoolStateMachineTests {
    var clock = TestClock()
    var pool = PoolStateMachine()

    init() {
        _ = pool.configure(poolA, settings: PoolSettings(poolSize: 2), now: clock.now)
    }

    /// Connects a server for a first client and lends it.
    func lendNewServer(to client: ClientID, key: PoolKey = poolA) -> ServerID {
        let actions = pool.clientWantsServer(client, pool: key, loop: 0, now: clock.now)
        let id = actions.connects.first!
        let lent = pool.serverConnected(id, now: clock.now)
        #expect(lent == [.lend(id, to: client)])
        return id
    }

    @Test func opensAServerForTheFirstClientAndReusesItWhenReleased() {
        let s1 = lendNewServer(to: c(1))
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).isEmpty)
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now) == [.lend(s1, to: c(2))])
    }

    /// Idle servers go out newest-released first; with server_round_robin oldest-released first.
    @Test func roundRobinLendsTheServerReleasedFirst() {
        for roundRobin in [false, true] {
            var settings = PoolSettings(poolSize: 2)
            settings.serverRoundRobin = roundRobin
            _ = pool.configure(poolA, settings: settings, now: clock.now)
            let s1 = lendNewServer(to: c(1))
            let s2 = lendNewServer(to: c(2))
            _ = pool.serverReleased(s1, reusable: true, now: clock.now)
            _ = pool.serverReleased(s2, reusable: true, now: clock.now)
            let lent = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now).lends
            #expect(lent.map(\.0) == [roundRobin ? s1 : s2])
            _ = pool.serverReleased(lent[0].0, reusable: false, now: clock.now)
            _ = pool.serverReleased(roundRobin ? s2 : s1, reusable: false, now: clock.now)
            _ = pool.clientWantsServer(c(9), pool: poolA, loop: 0, now: clock.now)
            pool = PoolStateMachine()
        }
    }

    /// A refused server login fails the clients already waiting at once, even while other servers
    /// (logged in earlier) are lent, and new clients until the retry succeeds.
    @Test func refusedLoginFailsWaitersAtOnceEvenWithServersLent() {
        let s1 = lendNewServer(to: c(1))
        let connect = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).connects
        #expect(connect.count == 1)
        let failed = pool.serverConnectFailed(connect[0], error: loginError, now: clock.now)
        #expect(failed.failures.map(\.0) == [c(2)])
        #expect(failed.failures.first?.1 == .connectFailed(loginError))
        #expect(pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now).failures.map(\.0) == [c(3)])
        // The server lent before still serves its client, and goes back to the pool.
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).isEmpty)
        #expect(pool.clientWantsServer(c(4), pool: poolA, loop: 0, now: clock.now) == [.lend(s1, to: c(4))])
        // A transient failure with a server lent keeps the queue.
        let connect2 = pool.clientWantsServer(c(5), pool: poolA, loop: 0, now: clock.now + .seconds(16)).connects
        #expect(pool.serverConnectFailed(connect2[0], error: dbError, now: clock.now + .seconds(16)).failures.isEmpty)
    }

    @Test func neverOpensMoreThanPoolSizeAndQueuesInOrder() {
        var connects: [ServerID] = []
        for n in 1...5 {
            connects += pool.clientWantsServer(c(UInt64(n)), pool: poolA, loop: 0, now: clock.now).connects
        }
        #expect(connects.count == 2)
        #expect(pool.serverConnected(connects[0], now: clock.now) == [.lend(connects[0], to: c(1))])
        #expect(pool.serverConnected(connects[1], now: clock.now) == [.lend(connects[1], to: c(2))])
        // Released servers go to the waiters first in, first out.
        #expect(pool.serverReleased(connects[1], reusable: true, now: clock.now) == [.lend(connects[1], to: c(3))])
        #expect(pool.serverReleased(connects[0], reusable: true, now: clock.now) == [.lend(connects[0], to: c(4))])
        let snap = pool.snapshot(now: clock.now).first!
        #expect(snap.waiting == 1)
        #expect(snap.lent == 2)
    }

    @Test func dirtyServerIsClosedAndReplacedForWaiters() {
        let s1 = lendNewServer(to: c(1))
        _ = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now)  // opens a second
        _ = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now)  // waits
        let actions = pool.serverReleased(s1, reusable: false, now: clock.now)
        #expect(actions.closes == [s1])
        // The pool had room again, and two clients wait for one connecting server.
        #expect(actions.connects.count == 1)
    }

    @Test func waiterLeavingTheQueueNeverGetsAServer() {
        let s1 = lendNewServer(to: c(1))
        let s2 = lendNewServer(to: c(2))
        _ = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now)
        _ = pool.clientWantsServer(c(4), pool: poolA, loop: 0, now: clock.now)
        pool.clientGaveUp(c(3))
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now) == [.lend(s1, to: c(4))])
        #expect(pool.serverReleased(s2, reusable: true, now: clock.now).isEmpty)
        #expect(pool.snapshot(now: clock.now).first!.idle == 1)
    }

    @Test func waitTimeoutFailsTheClientAndSaysHowLong() {
        _ = lendNewServer(to: c(1))
        _ = lendNewServer(to: c(2))
        _ = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now)
        clock.advance(.seconds(4))
        #expect(pool.timerFired(now: clock.now).isEmpty)
        // query_wait_notify (5 s): told once that it is queued.
        clock.advance(.seconds(1))
        #expect(pool.timerFired(now: clock.now) == [.notifyWaiting(c(3))])
        clock.advance(.seconds(114))
        #expect(pool.timerFired(now: clock.now).isEmpty)
        clock.advance(.seconds(1))
        let actions = pool.timerFired(now: clock.now)
        #expect(actions == [.failClient(c(3), .waitTimeout(waited: .seconds(120))), .note(poolA, .waitTimedOut)])
        #expect(PoolError.waitTimeout(waited: .seconds(120)).postgresError.message.contains("120.0 s"))
        #expect(!pool.isWaiting(c(3)))
    }

    @Test func connectFailureWithNoServersFailsWaitersFastAndBacksOff() {
        let actions = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now)
        _ = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now)
        let failed = actions.connects.first!
        // A refused login fails every waiter at once, though the second connect is under way.
        let result = pool.serverConnectFailed(failed, error: loginError, now: clock.now)
        #expect(result.failures.map(\.0) == [c(1), c(2)])
        let other = ServerID(failed.raw + 1)
        #expect(pool.serverConnectFailed(other, error: loginError, now: clock.now).failures.isEmpty)
        // A new client fails at once while the breaker is open, without a new connect.
        clock.advance(.seconds(1))
        let fast = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now)
        #expect(fast == [.failClient(c(3), .connectFailed(loginError))])
        // A refused login is retried only after server_login_retry, by a probe.
        clock.advance(.seconds(13))
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        clock.advance(.seconds(1))
        let probe = pool.timerFired(now: clock.now)
        #expect(probe.connects.count == 1)
        #expect(probe.contains(.note(poolA, .probe)))
        // A success closes the breaker: the next client gets that server.
        #expect(pool.serverConnected(probe.connects[0], now: clock.now).isEmpty)
        #expect(
            pool.clientWantsServer(c(4), pool: poolA, loop: 0, now: clock.now) == [.lend(probe.connects[0], to: c(4))])
    }

    /// A pooler started before its database: the first clients wait and are served once it is up.
    @Test func aDatabaseDownFromTheStartIsWaitedFor() {
        let first = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).connects[0]
        #expect(pool.serverConnectFailed(first, error: dbError, now: clock.now).isEmpty)
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).isEmpty)
        #expect(pool.isWaiting(c(1)) && pool.isWaiting(c(2)))
        clock.advance(.milliseconds(250))
        let retry = pool.timerFired(now: clock.now).connects
        #expect(retry.count == 1)
        // Up now: the first is served, and a server is opened for the second.
        let up = pool.serverConnected(retry[0], now: clock.now)
        #expect(up.lends.map(\.1) == [c(1)])
        #expect(up.connects.count == 1)
        // A refused login is another matter: the waiters learn it at once.
        #expect(pool.serverConnectFailed(up.connects[0], error: loginError, now: clock.now).failures.map(\.0) == [c(2)])
    }

    /// A TLS set-up or verification failure (08001) is not waited out: a retry will not fix it.
    @Test func aServerTLSFailureFailsTheWaitersAtOnce() {
        let tls = PostgresError(severity: "FATAL", code: SQLState.unableToConnect, message: "server TLS: bad cert")
        let first = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).connects[0]
        #expect(pool.serverConnectFailed(first, error: tls, now: clock.now).failures.map(\.0) == [c(1)])
    }

    /// server_connect_fail_fast: while the database has never been reached, clients fail at once,
    /// and a probe per second (while clients ask) finds when it is back.
    @Test func unreachableDatabaseIsProbedEverySecondWhileClientsAsk() {
        var settings = PoolSettings(poolSize: 2)
        settings.connectFailFast = true
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let first = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).connects[0]
        #expect(pool.serverConnectFailed(first, error: dbError, now: clock.now).failures.map(\.0) == [c(1)])
        clock.advance(.milliseconds(500))
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).failures.count == 1)
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        clock.advance(.milliseconds(500))
        let probe = pool.timerFired(now: clock.now).connects
        #expect(probe.count == 1)
        // Still down: the probe fails and the back-off starts again.
        _ = pool.serverConnectFailed(probe[0], error: dbError, now: clock.now)
        // Nobody asked since: no more probes.
        clock.advance(.seconds(5))
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        // Past the back-off, a client queues and a connect starts for it.
        let retry = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now)
        #expect(retry.connects.count == 1)
        #expect(pool.serverConnected(retry.connects[0], now: clock.now) == [.lend(retry.connects[0], to: c(3))])
    }

    @Test func databaseShuttingDownIsRetriedWithinASecond() {
        // "the database system is shutting down" (57P03) during a restart is transient, unlike a
        // refused login: the pool must serve again within a second of PostgreSQL being back.
        let shuttingDown = PostgresError(
            severity: "FATAL", code: SQLState.cannotConnectNow, message: "the database system is shutting down")
        var settings = PoolSettings(poolSize: 2)
        settings.connectFailFast = true
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let first = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).connects[0]
        #expect(pool.serverConnectFailed(first, error: shuttingDown, now: clock.now).failures.map(\.0) == [c(1)])
        clock.advance(.milliseconds(400))
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).failures.count == 1)
        clock.advance(.milliseconds(600))
        let retry = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now)
        #expect(retry.connects.count == 1)
    }

    @Test func restartingDatabaseThatServedBeforeKeepsClientsWaitingAndServesWhenBack() {
        // The database served, then its servers died (a restart): clients queue instead of failing.
        let s1 = lendNewServer(to: c(1))
        #expect(pool.serverClosed(s1, now: clock.now).isEmpty)
        let first = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).connects
        #expect(first.count == 1)
        #expect(pool.serverConnectFailed(first[0], error: dbError, now: clock.now).isEmpty)
        // A new client queues too; nothing is tried during the 250 ms back-off.
        #expect(pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now).isEmpty)
        #expect(pool.isWaiting(c(2)) && pool.isWaiting(c(3)))
        clock.advance(.milliseconds(200))
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        // Then one connection at a time, although two clients wait.
        clock.advance(.milliseconds(50))
        let retry = pool.timerFired(now: clock.now).connects
        #expect(retry.count == 1)
        clock.advance(.milliseconds(100))
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        let shuttingDown = PostgresError(
            severity: "FATAL", code: SQLState.cannotConnectNow, message: "the database system is starting up")
        #expect(pool.serverConnectFailed(retry[0], error: shuttingDown, now: clock.now).isEmpty)
        clock.advance(.milliseconds(250))
        let back = pool.timerFired(now: clock.now).connects
        #expect(back.count == 1)
        // Back: the first waiter is served and a connection opens for the other.
        let served = pool.serverConnected(back[0], now: clock.now)
        #expect(served.lends.map(\.1) == [c(2)])
        #expect(served.connects.count == 1)
        #expect(pool.serverConnected(served.connects[0], now: clock.now) == [.lend(served.connects[0], to: c(3))])
    }

    @Test func waitingThroughAnOutageThatDoesNotEndFailsWithTheConnectError() {
        let s1 = lendNewServer(to: c(1))
        _ = pool.serverClosed(s1, now: clock.now)
        let first = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).connects[0]
        _ = pool.serverConnectFailed(first, error: dbError, now: clock.now)
        var failures: [(ClientID, PoolError)] = []
        for _ in 0..<(120 * 4) {
            clock.advance(.milliseconds(250))
            let actions = pool.timerFired(now: clock.now)
            for id in actions.connects { _ = pool.serverConnectFailed(id, error: dbError, now: clock.now) }
            failures += actions.failures
        }
        #expect(failures.count == 1)
        #expect(failures.first?.0 == c(2))
        #expect(failures.first?.1 == .connectFailed(dbError))
    }

    @Test func refusedLoginAfterServingStillFailsFast() {
        let s1 = lendNewServer(to: c(1))
        _ = pool.serverClosed(s1, now: clock.now)
        let first = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).connects[0]
        #expect(pool.serverConnectFailed(first, error: loginError, now: clock.now).failures.map(\.0) == [c(2)])
        #expect(pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now).failures.map(\.0) == [c(3)])
    }

    @Test func idleServerPastCheckDelayIsCheckedBeforeLending() {
        let s1 = lendNewServer(to: c(1))
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        clock.advance(.seconds(10))
        // Recently used: lent without a check.
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now) == [.lend(s1, to: c(2))])
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        clock.advance(.seconds(30))
        #expect(pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now) == [.check(s1, for: c(3))])
        #expect(pool.snapshot(now: clock.now).first!.lent == 1)
        #expect(pool.serverCheckSucceeded(s1, now: clock.now) == [.lend(s1, to: c(3))])
    }

    @Test func failedCheckClosesTheServerAndChecksOlderOnesTheClientNeverNotices() {
        var settings = PoolSettings(poolSize: 3)
        settings.serverCheckDelay = .seconds(30)
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let old1 = lendNewServer(to: c(1))
        let old2 = lendNewServer(to: c(2))
        clock.advance(.seconds(1))
        let young = lendNewServer(to: c(3))
        // Released in this order: young is used last, so it is lent first (LIFO).
        _ = pool.serverReleased(old1, reusable: true, now: clock.now)
        _ = pool.serverReleased(old2, reusable: true, now: clock.now)
        _ = pool.serverReleased(young, reusable: true, now: clock.now)
        clock.advance(.seconds(60))
        #expect(pool.clientWantsServer(c(4), pool: poolA, loop: 0, now: clock.now) == [.check(young, for: c(4))])
        let failed = pool.serverCheckFailed(young, now: clock.now)
        #expect(failed.closes == [young])
        #expect(failed.contains(.note(poolA, .checkFailed)))
        // The client is offered the next server at once, which is checked too.
        #expect(failed.contains(.check(old2, for: c(4))))
        #expect(pool.serverCheckSucceeded(old2, now: clock.now) == [.lend(old2, to: c(4))])
        // old1 is older than the failed server: checked even though a check delay has not passed.
        _ = pool.serverReleased(old2, reusable: true, now: clock.now)
        #expect(pool.clientWantsServer(c(5), pool: poolA, loop: 0, now: clock.now) == [.lend(old2, to: c(5))])
        #expect(pool.clientWantsServer(c(6), pool: poolA, loop: 0, now: clock.now) == [.check(old1, for: c(6))])
    }

    @Test func failedCheckWithNoOtherServerConnectsANewOneForTheClient() {
        let s1 = lendNewServer(to: c(1))
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        clock.advance(.seconds(31))
        _ = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now)
        let actions = pool.serverCheckFailed(s1, now: clock.now)
        #expect(actions.closes == [s1])
        #expect(actions.connects.count == 1)
        #expect(pool.serverConnected(actions.connects[0], now: clock.now) == [.lend(actions.connects[0], to: c(2))])
    }

    @Test func serverClosingDuringItsCheckCountsAsAFailedCheck() {
        let s1 = lendNewServer(to: c(1))
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        clock.advance(.seconds(31))
        _ = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now)
        let actions = pool.serverClosed(s1, now: clock.now)
        #expect(actions.contains(.note(poolA, .checkFailed)))
        #expect(actions.connects.count == 1)
    }

    @Test func checkCanBeSwitchedOff() {
        var settings = PoolSettings(poolSize: 2)
        settings.serverCheckEnabled = false
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let s1 = lendNewServer(to: c(1))
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        clock.advance(.seconds(100))
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now) == [.lend(s1, to: c(2))])
    }

    @Test func recycleWhileLentHappensAtRelease() {
        var settings = PoolSettings(poolSize: 1)
        settings.serverLifetime = .seconds(10)
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let s1 = lendNewServer(to: c(1))
        _ = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now)
        clock.advance(.seconds(20))
        // Lent past its lifetime: nothing happens to it until the client is done.
        #expect(pool.timerFired(now: clock.now).closes.isEmpty)
        let actions = pool.serverReleased(s1, reusable: true, now: clock.now)
        #expect(actions.closes == [s1])
        #expect(actions.connects.count == 1)  // replaced for the waiting client
    }

    @Test func reservePoolWhileConnectsFailOpensNothing() {
        var settings = PoolSettings(poolSize: 1)
        settings.reservePoolSize = 2
        settings.reservePoolTimeout = .seconds(1)
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let s1 = lendNewServer(to: c(1))
        _ = pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now)
        clock.advance(.seconds(1))
        let reserve = pool.timerFired(now: clock.now)
        #expect(reserve.connects.count == 1)
        #expect(reserve.contains(.note(poolA, .reserveOpened(waited: .seconds(1)))))
        // The reserve connect is refused: the waiting client gets the server's error at once (a
        // server still lent does not keep it waiting), and no new attempt is made during the
        // back-off.
        #expect(
            pool.serverConnectFailed(reserve.connects[0], error: loginError, now: clock.now)
                == [.failClient(c(2), .connectFailed(loginError))])
        clock.advance(.seconds(2))
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).isEmpty)
    }

    @Test func serverLifetimeRetiresOnRelease() {
        let s1 = lendNewServer(to: c(1))
        clock.advance(.seconds(3601))
        #expect(
            pool.serverReleased(s1, reusable: true, now: clock.now) == [.note(poolA, .recycledForAge(s1)), .close(s1)])
    }

    /// SHUTDOWN WAIT_FOR_SERVERS: the waiters are closed at once, idle servers closed, a lent one
    /// closed when it comes back; no client gets a server any more, and RESUME does not undo it.
    @Test func closingForShutdownLendsNothingMore() {
        _ = pool.configure(poolA, settings: PoolSettings(poolSize: 2), now: clock.now)
        _ = pool.configure(poolB, settings: PoolSettings(poolSize: 1), now: clock.now)
        let s1 = lendNewServer(to: c(1))
        let s2 = lendNewServer(to: c(2))
        #expect(pool.serverReleased(s2, reusable: true, now: clock.now).isEmpty)  // idle
        _ = lendNewServer(to: c(10), key: poolB)
        #expect(pool.clientWantsServer(c(11), pool: poolB, loop: 0, now: clock.now).isEmpty)  // queued
        let actions = pool.closeForShutdown()
        #expect(actions.contains(.failClient(c(11), .shuttingDown)))
        #expect(actions.contains(.close(s2)))
        #expect(
            pool.clientWantsServer(c(6), pool: poolA, loop: 0, now: clock.now) == [.failClient(c(6), .shuttingDown)])
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).closes == [s1])
        #expect(pool.resume(database: nil, now: clock.now).isEmpty)
        #expect(
            pool.clientWantsServer(c(7), pool: poolA, loop: 0, now: clock.now) == [.failClient(c(7), .shuttingDown)])
        #expect(PoolError.shuttingDown.postgresError.message == "server shutting down")
    }

    /// server_fast_close: RECONNECT ends the session holding a server of a session-mode pool;
    /// without it the session keeps its server until it leaves.
    @Test func reconnectEndsSessionsOnlyWithFastClose() {
        var fast = PoolSettings(poolSize: 2)
        fast.fastClose = true
        _ = pool.configure(poolA, settings: fast, now: clock.now)
        _ = pool.configure(poolB, settings: PoolSettings(poolSize: 2), now: clock.now)
        _ = lendNewServer(to: c(1))
        _ = lendNewServer(to: c(2), key: poolB)
        let actions = pool.reconnect(database: nil, now: clock.now)
        #expect(actions.contains(.endSession(c(1))))
        #expect(!actions.contains(.endSession(c(2))))
    }

    /// SUSPEND past suspend_timeout drops the clients holding servers: exactly those.
    @Test func clientsHoldingServersAreTheOnesLentTo() {
        _ = pool.configure(poolA, settings: PoolSettings(poolSize: 3), now: clock.now)
        let s1 = lendNewServer(to: c(1))
        _ = lendNewServer(to: c(2))
        #expect(Set(pool.clientsHoldingServers()) == [c(1), c(2)])
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        #expect(pool.clientsHoldingServers() == [c(2)])
    }

    /// A host name that no longer has an address: only the servers open to that address go,
    /// idle ones at once, lent ones when they come back.
    @Test func reconnectOfSomeServersLeavesTheOthers() {
        _ = pool.configure(poolA, settings: PoolSettings(poolSize: 3), now: clock.now)
        let s1 = lendNewServer(to: c(1))
        let s2 = lendNewServer(to: c(2))
        let s3 = lendNewServer(to: c(3))
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        let actions = pool.reconnect(servers: [s1, s2], now: clock.now)
        #expect(actions.contains(.close(s1)))
        #expect(!actions.contains(.close(s2)) && !actions.contains(.close(s3)))
        #expect(pool.isCloseNeeded(s2) && !pool.isCloseNeeded(s3))
        #expect(pool.serverReleased(s2, reusable: true, now: clock.now).closes == [s2])
        #expect(pool.serverReleased(s3, reusable: true, now: clock.now).isEmpty)
    }

    /// pool_idle_timeout / autodb_idle_timeout: a pool with no client, waiter or server for
    /// `freeAfter` is freed; its slot is reused by the next pool made, which works as any other.
    @Test func unusedPoolsAreFreedAndTheirSlotsReused() {
        var settings = PoolSettings(poolSize: 1)
        settings.freeAfter = .seconds(10)
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let s1 = lendNewServer(to: c(1))
        clock.advance(.seconds(30))
        #expect(!pool.timerFired(now: clock.now) { _ in false }.contains(.poolFreed(poolA)))  // a server is lent
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        _ = pool.serverClosed(s1, now: clock.now)
        #expect(pool.hasPool(poolA))
        _ = pool.timerFired(now: clock.now) { _ in false }  // unused from now
        clock.advance(.seconds(5))
        #expect(!pool.timerFired(now: clock.now) { _ in true }.contains(.poolFreed(poolA)))  // a client came
        clock.advance(.seconds(11))
        #expect(!pool.timerFired(now: clock.now) { _ in false }.contains(.poolFreed(poolA)))  // counts again
        clock.advance(.seconds(11))
        #expect(pool.timerFired(now: clock.now) { _ in false }.contains(.poolFreed(poolA)))
        #expect(!pool.hasPool(poolA) && !pool.poolKeys.contains(poolA) && pool.snapshot(now: clock.now).isEmpty)
        // The next pool takes the slot and serves.
        _ = pool.configure(poolB, settings: PoolSettings(poolSize: 1), now: clock.now)
        #expect(pool.pools.slot(of: poolB) == 0)
        let s2 = lendNewServer(to: c(2), key: poolB)
        #expect(pool.serverReleased(s2, reusable: true, now: clock.now).isEmpty)
        #expect(pool.clientWantsServer(c(3), pool: poolB, loop: 0, now: clock.now) == [.lend(s2, to: c(3))])
        // Without a freeAfter a pool stays.
        clock.advance(.seconds(100))
        _ = pool.serverReleased(s2, reusable: true, now: clock.now)
        #expect(!pool.timerFired(now: clock.now) { _ in false }.contains(.poolFreed(poolB)))
    }

    /// server_lifetime = 0, as PgBouncer: a server serves one lend and is closed; an idle one that
    /// has not served yet is kept for its lend.
    @Test func zeroLifetimeServesOnce() {
        var settings = PoolSettings(poolSize: 2)
        settings.serverLifetime = .zero
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let s1 = lendNewServer(to: c(1))
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).closes == [s1])
        settings.minPoolSize = 1
        let opened = pool.configure(poolA, settings: settings, now: clock.now).connects  // min_pool_size opens one
        #expect(opened.count == 1)
        _ = pool.serverConnected(opened[0], now: clock.now)
        clock.advance(.seconds(10))
        #expect(pool.timerFired(now: clock.now).closes.isEmpty)
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now) == [.lend(opened[0], to: c(2))])
        #expect(pool.serverReleased(opened[0], reusable: true, now: clock.now).closes == [opened[0]])
    }

    @Test func lifetimeDeadlinesAreSpread() {
        var settings = PoolSettings(poolSize: 50)
        settings.serverLifetime = .seconds(1000)
        var p = PoolStateMachine()
        _ = p.configure(poolA, settings: settings, now: clock.now)
        var ids: [ServerID] = []
        for n in 1...50 { ids += p.clientWantsServer(c(UInt64(n)), pool: poolA, loop: 0, now: clock.now).connects }
        let deadlines = Set(ids.map { p.servers[$0]!.retireAt.uptimeNanoseconds })
        #expect(deadlines.count > 40)
        // All within the last tenth of the lifetime.
        for d in deadlines {
            #expect(d > clock.now.uptimeNanoseconds + 900_000_000_000)
            #expect(d <= clock.now.uptimeNanoseconds + 1_000_000_000_000)
        }
    }

    @Test func idleTimeoutClosesDownToMinPoolSize() {
        var settings = PoolSettings(poolSize: 3)
        settings.minPoolSize = 1
        settings.serverIdleTimeout = .seconds(600)
        // min_pool_size opens one server right away.
        let warm = pool.configure(poolA, settings: settings, now: clock.now).connects
        #expect(warm.count == 1)
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        _ = pool.serverConnected(warm[0], now: clock.now)
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now) == [.lend(warm[0], to: c(2))])
        let s3 = lendNewServer(to: c(3))
        let s4 = lendNewServer(to: c(4))
        for s in [warm[0], s3, s4] { _ = pool.serverReleased(s, reusable: true, now: clock.now) }
        clock.advance(.seconds(601))
        let closed = pool.timerFired(now: clock.now).closes
        #expect(closed.count == 2)
        #expect(pool.snapshot(now: clock.now).first!.idle == 1)
    }

    @Test func reservePoolOpensAfterReserveTimeoutAndShrinksBack() {
        var settings = PoolSettings(poolSize: 1)
        settings.reservePoolSize = 1
        settings.reservePoolTimeout = .seconds(5)
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        let s1 = lendNewServer(to: c(1))
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).isEmpty)
        clock.advance(.seconds(4))
        #expect(pool.timerFired(now: clock.now).connects.isEmpty)
        clock.advance(.seconds(1))
        let reserve = pool.timerFired(now: clock.now).connects
        #expect(reserve.count == 1)
        #expect(pool.serverConnected(reserve[0], now: clock.now) == [.lend(reserve[0], to: c(2))])
        // Once nobody waits, the pool goes back to its size.
        #expect(pool.serverReleased(reserve[0], reusable: true, now: clock.now) == [.close(reserve[0])])
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).isEmpty)
    }

    @Test func maxDBConnectionsClosesIdleServerOfAnotherPool() {
        var settings = PoolSettings(poolSize: 5)
        settings.maxDBConnections = 1
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        _ = pool.configure(poolB, settings: settings, now: clock.now)
        let s1 = lendNewServer(to: c(1), key: poolA)
        // Bob's pool is blocked by the database limit while Alice's server is busy.
        #expect(pool.clientWantsServer(c(2), pool: poolB, loop: 0, now: clock.now).isEmpty)
        // When Alice's server goes idle it is closed to make room for Bob's.
        let actions = pool.serverReleased(s1, reusable: true, now: clock.now)
        #expect(actions.isEmpty)  // parked idle first
        let room = pool.timerFired(now: clock.now)
        #expect(room.closes == [s1])
        #expect(room.connects.count == 1)
    }

    @Test func maxUserConnectionsLimitsAcrossDatabases() {
        var settings = PoolSettings(poolSize: 5)
        settings.maxUserConnections = 2
        let other = PoolKey(database: "db2", user: "alice")
        _ = pool.configure(poolA, settings: settings, now: clock.now)
        _ = pool.configure(other, settings: settings, now: clock.now)
        _ = lendNewServer(to: c(1), key: poolA)
        _ = lendNewServer(to: c(2), key: other)
        #expect(pool.clientWantsServer(c(3), pool: other, loop: 0, now: clock.now).isEmpty)
        #expect(pool.snapshot(now: clock.now).first { $0.key == other }!.waiting == 1)
    }

    @Test func prefersAnIdleServerOnTheClientsLoop() {
        let a = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).connects[0]
        let b = pool.clientWantsServer(c(2), pool: poolA, loop: 1, now: clock.now).connects[0]
        _ = pool.serverConnected(a, now: clock.now)
        _ = pool.serverConnected(b, now: clock.now)
        // Whichever servers the clients got, each one is now idle on a known loop.
        _ = pool.serverReleased(a, reusable: true, now: clock.now)
        _ = pool.serverReleased(b, reusable: true, now: clock.now)
        let loopOf = { (id: ServerID) in self.pool.servers[id]!.loop }
        let onLoop0 = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now).lends[0].0
        #expect(loopOf(onLoop0) == 0)
        let onLoop1 = pool.clientWantsServer(c(4), pool: poolA, loop: 1, now: clock.now).lends[0].0
        #expect(loopOf(onLoop1) == 1)
    }

    @Test func newServersAreSpreadOverTheEventLoops() {
        var pool = PoolStateMachine(loopCount: 2)
        _ = pool.configure(poolA, settings: PoolSettings(poolSize: 4), now: clock.now)
        // A burst of requests handled by loop 1 alone: the pool still ends up on both loops.
        var opened: [(ServerID, Int)] = []
        for n in 1...4 {
            for action in pool.clientWantsServer(c(UInt64(n)), pool: poolA, loop: 1, now: clock.now) {
                if case .connect(let id, _, let loop) = action { opened.append((id, loop)) }
            }
        }
        #expect(opened.map(\.1) == [1, 0, 1, 0])
        #expect(opened.allSatisfy { pool.servers[$0.0]!.loop == $0.1 })
        // A server that goes is replaced on its own loop, the one that now has fewer.
        for (id, _) in opened { _ = pool.serverConnected(id, now: clock.now) }
        let gone = opened[1].0
        let actions = pool.serverReleased(gone, reusable: false, now: clock.now)
        #expect(actions.closes == [gone])
        let replacement = pool.clientWantsServer(c(5), pool: poolA, loop: 1, now: clock.now)
        #expect(replacement.compactMap { if case .connect(_, _, let loop) = $0 { loop } else { nil } } == [0])
    }

    @Test func aFreedServerGoesToAWaiterOnItsLoopButNoWaiterIsPassedOverTooOften() {
        let passes = PoolStateMachine.maxPassedOver
        let lookahead = PoolStateMachine.sameLoopLookahead
        // Two loops, one server on loop 0, lent to c1.
        func poolWithOneServer() -> (PoolStateMachine, ServerID) {
            var pool = PoolStateMachine(loopCount: 2)
            _ = pool.configure(poolA, settings: PoolSettings(poolSize: 1), now: clock.now)
            let server = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).connects[0]
            #expect(pool.serverConnected(server, now: clock.now) == [.lend(server, to: c(1))])
            return (pool, server)
        }
        var (pool, server) = poolWithOneServer()
        // c2 waits on loop 1 at the head of the queue, passes + 2 clients behind it on loop 0 (the
        // server's): they go first until c2 was passed over `passes` times.
        _ = pool.clientWantsServer(c(2), pool: poolA, loop: 1, now: clock.now)
        let behind = (3..<(passes + 5)).map { c(UInt64($0)) }
        for client in behind { _ = pool.clientWantsServer(client, pool: poolA, loop: 0, now: clock.now) }
        var served: [ClientID] = []
        for _ in 0...behind.count {
            served += pool.serverReleased(server, reusable: true, now: clock.now).lends.map(\.1)
        }
        #expect(served == Array(behind.prefix(passes)) + [c(2)] + behind.dropFirst(passes))

        // A waiter on the server's loop more than `lookahead` places behind the head (another
        // loop's run of waiters in between) does not go first; one `lookahead` places behind does.
        let run = (1000...(1000 + lookahead)).map { c(UInt64($0)) }
        for client in run { _ = pool.clientWantsServer(client, pool: poolA, loop: 1, now: clock.now) }
        _ = pool.clientWantsServer(c(5000), pool: poolA, loop: 0, now: clock.now)
        #expect(pool.serverReleased(server, reusable: true, now: clock.now).lends.map(\.1) == [run[0]])
        var (short, other) = poolWithOneServer()
        for client in run.dropLast() { _ = short.clientWantsServer(client, pool: poolA, loop: 1, now: clock.now) }
        _ = short.clientWantsServer(c(5000), pool: poolA, loop: 0, now: clock.now)
        #expect(short.serverReleased(other, reusable: true, now: clock.now).lends.map(\.1) == [c(5000)])
    }

    @Test func brokenServerIsReplacedForWaiters() {
        let s1 = lendNewServer(to: c(1))
        _ = lendNewServer(to: c(2))
        _ = pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now)
        let actions = pool.serverClosed(s1, now: clock.now)
        #expect(actions.connects.count == 1)
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).isEmpty)  // already gone
    }

    @Test func reconfigureShrinksIdleServers() {
        let s1 = lendNewServer(to: c(1))
        let s2 = lendNewServer(to: c(2))
        _ = pool.serverReleased(s1, reusable: true, now: clock.now)
        _ = pool.serverReleased(s2, reusable: true, now: clock.now)
        let actions = pool.configure(poolA, settings: PoolSettings(poolSize: 1), now: clock.now)
        #expect(actions.closes.count == 1)
    }
}

@Suite final class PauseTests {
    var clock = TestClock()
    var pool = PoolStateMachine()

    init() {
        _ = pool.configure(poolA, settings: PoolSettings(poolSize: 2), now: clock.now)
        _ = pool.configure(
            PoolKey(database: "other", user: "alice"), settings: PoolSettings(poolSize: 2), now: clock.now)
    }

    @Test func pausedPoolQueuesClientsAndLendsNothingUntilResume() {
        let s1 = pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).connects[0]
        _ = pool.serverConnected(s1, now: clock.now)
        pool.pause(database: "db")
        #expect(pool.lentCount(database: "db") == 1)
        // Released while paused: parked, not handed to the queue.
        #expect(pool.clientWantsServer(c(2), pool: poolA, loop: 0, now: clock.now).isEmpty)
        #expect(pool.serverReleased(s1, reusable: true, now: clock.now).isEmpty)
        #expect(pool.lentCount(database: "db") == 0)
        #expect(pool.clientWantsServer(c(3), pool: poolA, loop: 0, now: clock.now).isEmpty)
        // Another database is not paused.
        let other = PoolKey(database: "other", user: "alice")
        #expect(pool.clientWantsServer(c(4), pool: other, loop: 0, now: clock.now).connects.count == 1)
        let resumed = pool.resume(database: "db", now: clock.now)
        #expect(resumed.lends.map(\.1) == [c(2)])
        #expect(resumed.connects.count == 1)  // for c(3)
    }

    @Test func pauseAllAndResumeAll() {
        pool.pause(database: nil)
        #expect(pool.isPaused(database: nil) && !pool.isPaused(database: "db"))
        #expect(pool.clientWantsServer(c(1), pool: poolA, loop: 0, now: clock.now).isEmpty)
        #expect(pool.resume(database: nil, now: clock.now).connects.count == 1)
        #expect(!pool.isPaused(database: nil))
    }

    /// A pool made while its database, or everything, is paused starts paused; and a database
    /// paused by name stays paused through a RESUME of everything, as in PgBouncer.
    @Test func poolsMadeWhilePausedStartPaused() {
        let other = PoolKey(database: "other", user: "alice")
        pool.pause(database: nil)
        _ = pool.configure(other, settings: PoolSettings(poolSize: 2), now: clock.now)
        #expect(pool.clientWantsServer(c(1), pool: other, loop: 0, now: clock.now).isEmpty)
        pool.pause(database: "late")
        let late = PoolKey(database: "late", user: "alice")
        #expect(pool.resume(database: nil, now: clock.now).connects.count == 1)
        _ = pool.configure(late, settings: PoolSettings(poolSize: 2), now: clock.now)
        #expect(pool.clientWantsServer(c(2), pool: late, loop: 0, now: clock.now).isEmpty)
        #expect(pool.isPaused(database: "late"))
        #expect(pool.resume(database: "late", now: clock.now).connects.count == 1)
    }
}

@Suite struct LeaseTrackerTests {
    @Test func lateAttachAndDetachOfOlderLendsChangeNothing() {
        var leases = LeaseTracker()
        // Lend 7 attaches at once on the server's own loop while lends 3..6 still wait in its queue.
        let attachedNewest = leases.attach(7)
        #expect(attachedNewest)
        for old in UInt64(3)...6 {
            let attached = leases.attach(old)
            let detached = leases.detach(old)
            #expect(!attached && !detached)
        }
        #expect(leases.attached && leases.current == 7)
        let detached = leases.detach(7)
        let detachedTwice = leases.detach(7)
        #expect(detached && !detachedTwice && !leases.attached)
        let next = leases.attach(8)
        #expect(next)
    }
}

final class ReconnectTests {
    @Test func reconnectClosesIdleServersNowAndLentOnesWhenBack() {
        var pools = PoolStateMachine()
        let key = PoolKey(database: "app", user: "u")
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        _ = pools.configure(key, settings: PoolSettings(poolSize: 2), now: now)
        // Two clients each get a server; the first gives it back.
        var servers: [ServerID] = []
        for c in 1...2 {
            let actions = pools.clientWantsServer(ClientID(UInt64(c)), pool: key, loop: 0, now: now)
            for case .connect(let id, _, _) in actions { servers.append(id) }
        }
        #expect(servers.count == 2)
        for id in servers { _ = pools.serverConnected(id, now: now) }
        _ = pools.serverReleased(servers[0], reusable: true, now: now)
        let actions = pools.reconnect(database: "app", now: now)
        #expect(actions.contains(.close(servers[0])))
        #expect(pools.closeNeededCount(database: "app") == 1)
        #expect(pools.isCloseNeeded(servers[1]))
        #expect(pools.closeNeededCount(database: "other") == 0)
        let back = pools.serverReleased(servers[1], reusable: true, now: now)
        #expect(back.contains(.close(servers[1])))
        #expect(pools.closeNeededCount(database: nil) == 0)
    }
}
