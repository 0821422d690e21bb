import NIOCore
import Testing

@testable import TidepoolCore

/// LISTEN in transaction pooling: when a client's channels change (PostgreSQL's transaction rules),
/// how its ReadyForQuery waits for the pool's listener, and how notifications reach it.
@Suite struct ChannelRulesTests {
    typealias Run = SessionStateRulesTests.Run

    @Test func channelsChangeWhenTheirTransactionCommits() {
        let r = Run()
        r.request("LISTEN a", .idle)
        #expect(r.state.channels == ["a"])
        #expect(!r.state.isPinned && r.state.serverListens)
        #expect(r.state.takeChannelChanges() == ChannelChanges(added: ["a"]))
        #expect(r.state.takeChannelChanges().isEmpty)

        r.request("BEGIN; LISTEN b", .inTransaction)
        #expect(r.state.channels == ["a"], "not before the commit")
        r.request("COMMIT", .idle)
        #expect(r.state.channels == ["a", "b"])

        r.request("BEGIN; LISTEN c; UNLISTEN a", .inTransaction)
        r.request("ROLLBACK", .idle)
        #expect(r.state.channels == ["a", "b"], "a rollback changes nothing")

        r.request("LISTEN d; select 1/0", .idle, failed: true)
        #expect(r.state.channels == ["a", "b"], "nor a failed implicit transaction")

        r.request("BEGIN; SAVEPOINT s; LISTEN e; ROLLBACK TO s; LISTEN f", .inTransaction)
        r.request("COMMIT", .idle)
        #expect(r.state.channels == ["a", "b", "f"])
        #expect(r.state.takeChannelChanges() == ChannelChanges(added: ["b", "f"]))

        r.request("LISTEN g; UNLISTEN g", .idle)
        #expect(r.state.takeChannelChanges().isEmpty, "listened and unlistened at once: nothing to tell")

        r.request("UNLISTEN b", .idle)
        #expect(r.state.takeChannelChanges() == ChannelChanges(removed: ["b"]))
        r.request("UNLISTEN *", .idle)
        #expect(r.state.channels.isEmpty)
        #expect(r.state.takeChannelChanges() == ChannelChanges(removed: ["a", "f"]))

        r.request("LISTEN h", .idle)
        r.request("DISCARD ALL", .idle)
        #expect(r.state.channels.isEmpty, "DISCARD ALL unlistens")
        #expect(!r.state.isPinned)
    }
}

@Suite struct ClientNotificationTests {
    typealias D = SessionDriver

    static func notification(_ channel: String, _ payload: String, pid: Int32 = 42) -> ByteBuffer {
        D.m("A") {
            $0.writeInteger(pid)
            $0.writeNullTerminatedString(channel)
            $0.writeNullTerminatedString(payload)
        }
    }

    func notify(_ d: D, _ channel: String, _ payload: String = "p") -> Int {
        let dropped = d.session.notification(
            Self.notification(channel, payload), channel: channel, now: d.now, into: &d.actions)
        d.carryOut()
        return dropped
    }

    /// A client listening on `channel`, idle, its server given back.
    func listening(_ channel: String = "jobs") -> D {
        let d = D()
        d.client(D.query("LISTEN \(channel)"))
        d.lend()
        d.serverSends(D.complete("LISTEN"), D.ready("I"))
        d.session.listenConfirmed(now: d.now, into: &d.actions)
        d.carryOut()
        return d
    }

    @Test func theReadyForQueryWaitsForTheListener() {
        let d = D()
        d.client(D.query("LISTEN jobs"))
        d.lend()
        d.serverSends(D.complete("LISTEN"), D.ready("I"))
        #expect(d.clientTypes == "C", "held until the pool's listener listens on the channel")
        #expect(d.listenChanges == [ChannelChanges(added: ["jobs"])])
        #expect(d.releases.isEmpty && d.resets.isEmpty)
        #expect(d.flow.contains(.pauseServerReads))
        // What the server sends meanwhile waits behind it.
        d.serverSends(Self.notification("jobs", "from the server"))
        #expect(d.clientTypes == "C")
        #expect(!d.session.serverIsClean)

        d.session.listenConfirmed(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "CZ", "the server's own notification is not passed on")
        #expect(d.resets == ["UNLISTEN *"], "the server's LISTEN is undone before another client gets it")
        #expect(d.session.state == .idle)
        #expect(d.session.traffic.queries == 1, "the held ReadyForQuery counted once")
    }

    /// PostgreSQL sends a session the notifications of its own NOTIFY before the ReadyForQuery of
    /// the transaction that sent them: the ReadyForQuery waits for the pool's listener.
    @Test func aClientsOwnNotificationComesBeforeItsReadyForQuery() {
        let d = listening()
        d.client(D.query("NOTIFY jobs, 'mine'"))
        d.lend()
        d.serverSends(D.complete("NOTIFY"), D.ready("I"))
        #expect(d.clientTypes == "CZC", "held for the listener's copy")
        #expect(notify(d, "jobs", "mine") == 0)
        #expect(d.clientTypes == "CZCAZ")
        #expect(d.session.state == .idle, "the server went back once the ReadyForQuery was written")
    }

    /// A LISTEN and a NOTIFY on its channel committed together: PostgreSQL sends the notification
    /// before the ReadyForQuery, and the pool's listener, not yet listening, cannot have it.
    @Test func aNotificationOfTheCommitThatListensComesFromTheServer() {
        let d = D()
        d.client(D.query("BEGIN; LISTEN jobs; NOTIFY jobs, 'same'; COMMIT"))
        d.lend()
        d.serverSends(
            D.complete("BEGIN"), D.complete("LISTEN"), D.complete("NOTIFY"), D.complete("COMMIT"),
            Self.notification("jobs", "same"), D.ready("I"))
        #expect(d.clientTypes == "CCCCA", "the server's copy, in PostgreSQL's order")
        d.session.listenConfirmed(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "CCCCAZ")
        #expect(!d.session.waitsForOwnNotification, "no wait for a listener's copy")

        // Once the listener was told of the channel, the server's copies are not passed on.
        d.client(D.query("NOTIFY jobs, 'again'"))
        d.lend()
        d.serverSends(D.complete("NOTIFY"), Self.notification("jobs", "again"), D.ready("I"))
        #expect(d.clientTypes == "CCCCAZC", "held for the listener's copy, the server's dropped")
        #expect(notify(d, "jobs", "again") == 0)
        #expect(d.clientTypes == "CCCCAZCAZ")
    }

    @Test func theWaitForAnOwnNotificationIsBounded() {
        let d = listening()
        d.client(D.query("SELECT pg_notify('jobs', 'lost')"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.clientTypes == "CZC")
        #expect(d.session.waitsForOwnNotification)
        #expect(d.clockWatched == 1, "the runtime ticks it though it has no timeouts")
        d.session.ownNotificationTick(now: d.now, into: &d.actions)
        d.session.ownNotificationTick(now: d.now + .milliseconds(500), into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "CZC")
        d.session.ownNotificationTick(now: d.now + .seconds(1), into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "CZCZ", "released when the listener never hands it over")
        #expect(!d.session.waitsForOwnNotification)
        // A NOTIFY in a block that rolls back sends nothing: no wait.
        d.client(D.query("BEGIN; NOTIFY jobs; ROLLBACK"))
        d.lend()
        d.serverSends(D.complete("BEGIN"), D.complete("NOTIFY"), D.complete("ROLLBACK"), D.ready("I"))
        #expect(d.clientTypes == "CZCZCCCZ")
        // Nor one whose transaction also stops listening on the channel (PostgreSQL delivers
        // only to sessions listening at commit).
        d.client(D.query("NOTIFY jobs, 'x'; UNLISTEN jobs"))
        d.lend()
        d.serverSends(D.complete("NOTIFY"), D.complete("UNLISTEN"), D.ready("I"))
        #expect(d.clientTypes == "CZCZCCCZCCZ")
        #expect(!d.session.waitsForOwnNotification)
    }

    @Test func aChannelListenedOnAlreadyDoesNotHold() {
        let d = listening()
        let before = d.listenChanges.count
        d.client(D.query("LISTEN jobs"))
        d.lend()
        d.serverSends(D.complete("LISTEN"), D.ready("I"))
        #expect(d.clientTypes == "CZCZ")
        #expect(d.listenChanges.count == before)
    }

    @Test func unlistenTakesEffectAtOnce() {
        let d = listening()
        #expect(notify(d, "jobs") == 0)
        #expect(d.clientTypes == "CZA")
        d.client(D.query("UNLISTEN jobs"))
        d.lend()
        d.serverSends(D.complete("UNLISTEN"), D.ready("I"))
        #expect(d.clientTypes == "CZACZ", "no hold")
        #expect(d.listenChanges.last == ChannelChanges(removed: ["jobs"]))
        _ = notify(d, "jobs")
        #expect(d.clientTypes == "CZACZ", "nothing after UNLISTEN")
    }

    @Test func aRolledBackListenListensOnNothing() {
        let d = D()
        d.client(D.query("BEGIN; LISTEN jobs"))
        d.lend()
        d.serverSends(D.complete("BEGIN"), D.complete("LISTEN"), D.ready("T"))
        d.client(D.query("ROLLBACK"))
        d.serverSends(D.complete("ROLLBACK"), D.ready("I"))
        #expect(d.clientTypes == "CCZCZ")
        #expect(d.listenChanges.isEmpty)
        _ = notify(d, "jobs")
        #expect(d.clientTypes == "CCZCZ")
    }

    @Test func notificationsComeBetweenWholeMessages() {
        let d = listening()
        d.toClient.clear()
        d.client(D.query("select x"))
        d.lend()
        // A DataRow split over two reads: the notification waits for the end of it.
        let row = D.m("D") {
            $0.writeInteger(Int16(1))
            $0.writeInteger(Int32(4))
            $0.writeString("abcd")
        }
        d.serverSends(row.getSlice(at: 0, length: 7)!)
        _ = notify(d, "jobs", "1")
        #expect(d.toClient.readableBytes == 7, "not in the middle of the row")
        d.serverSends(row.getSlice(at: 7, length: row.readableBytes - 7)!)
        #expect(d.clientTypes == "DA")
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        _ = notify(d, "jobs", "2")
        #expect(d.clientTypes == "DACZA", "an idle client gets it at once")
    }

    @Test func aClientNotReadingIsClosedWhenItsQueueOverflows() {
        let d = listening()
        d.session.notifyQueueSize = 3
        d.session.clientWritabilityChanged(false, into: &d.actions)
        d.carryOut()
        let before = d.toClient.readableBytes
        for i in 0..<3 { #expect(notify(d, "jobs", "\(i)") == 0) }
        #expect(d.toClient.readableBytes == before, "queued while the client does not read")
        #expect(notify(d, "jobs", "3") == 4)
        #expect(d.closedWith?.code == SQLState.programLimitExceeded)
        #expect(d.session.state == .closed)

        let e = listening()
        e.session.notifyQueueSize = 3
        e.session.clientWritabilityChanged(false, into: &e.actions)
        e.carryOut()
        for i in 0..<3 { _ = notify(e, "jobs", "\(i)") }
        e.session.clientWritabilityChanged(true, into: &e.actions)
        e.carryOut()
        #expect(e.clientTypes == "CZAAA", "written in order once it reads again")
        #expect(e.session.state == .idle)
    }

    @Test func aClientThatNeverListenedGetsNothing() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        d.serverSends(Self.notification("jobs", "x"), D.complete("SELECT 1"), D.ready("I"))
        #expect(d.clientTypes == "CZ")
        _ = notify(d, "jobs")
        #expect(d.clientTypes == "CZ")
    }

    @Test func sessionModePassesNotificationsThrough() {
        let d = D(mode: .session)
        d.client(D.query("LISTEN jobs"))
        d.lend()
        d.serverSends(D.complete("LISTEN"), D.ready("I"), Self.notification("jobs", "x"))
        #expect(d.clientTypes == "CZA")
        #expect(d.listenChanges.isEmpty)
    }

    @Test func extendedProtocolListenIsFollowed() {
        let d = D(prepared: true)
        d.client(PreparedHarness.parse("", "LISTEN jobs"), PreparedHarness.bind(""), PreparedHarness.execute, D.sync)
        d.lend()
        d.serverSends(D.m("1"), D.m("2"), D.complete("LISTEN"), D.ready("I"))
        #expect(d.clientTypes == "12C")
        #expect(d.listenChanges == [ChannelChanges(added: ["jobs"])])
        d.session.listenConfirmed(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "12CZ")
        #expect(d.session.state == .idle)
    }
}

@Suite struct ChannelListenerTests {
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
    let a = ClientID(1)
    let b = ClientID(2)

    @Test func theFirstSubscriberListensAndTheLastUnlistens() {
        var l = ChannelListener()
        #expect(l.subscribe(a, channels: ["jobs"], now: t0) == [.connect])
        #expect(l.connected(now: t0) == [.send("LISTEN \"jobs\";")])
        #expect(l.subscribe(b, channels: ["jobs", "Odd\"name"], now: t0).isEmpty, "one batch in flight at a time")
        #expect(l.commandFinished(error: nil, now: t0) == [.confirm([a]), .send("LISTEN \"Odd\"\"name\";")])
        #expect(l.commandFinished(error: nil, now: t0) == [.confirm([b])])
        #expect(l.recipients(of: "jobs") == [a, b])
        #expect(l.subscribe(a, channels: ["Odd\"name"], now: t0) == [.confirm([a])], "listened on already")

        #expect(l.unsubscribe(a, channels: ["jobs"], now: t0).isEmpty)
        #expect(l.recipients(of: "jobs") == [b])
        #expect(l.clientGone(b, now: t0) == [.send("UNLISTEN \"jobs\";")])
        #expect(l.commandFinished(error: nil, now: t0).isEmpty)
        #expect(l.unsubscribe(a, channels: ["Odd\"name"], now: t0) == [.close])
        #expect(l.phase == .closed)
        #expect(l.channelCounts.isEmpty)
    }

    @Test func aLostConnectionIsReopenedWithEveryChannel() {
        var l = ChannelListener()
        _ = l.subscribe(a, channels: ["x", "y"], now: t0)
        _ = l.connected(now: t0)
        _ = l.commandFinished(error: nil, now: t0)
        let lost = l.lost(now: t0)
        #expect(lost.count == 2 && lost.last == .connect)
        #expect(l.reconnects == 1)
        #expect(l.connected(now: t0) == [.send("LISTEN \"x\";LISTEN \"y\";")])
        #expect(l.commandFinished(error: nil, now: t0).isEmpty)
        #expect(l.listening == ["x", "y"])
    }

    @Test func aFailedConnectionIsTriedAgainAndReleasesWaitingClients() {
        var l = ChannelListener()
        _ = l.subscribe(a, channels: ["x"], now: t0)
        let failed = l.connectFailed("refused", now: t0)
        #expect(failed.contains(.confirm([a])), "not held while PostgreSQL cannot be reached")
        #expect(failed.last == .armTimer(t0 + .milliseconds(500)))
        #expect(l.timerFired(now: t0 + .milliseconds(100)).isEmpty)
        #expect(l.timerFired(now: t0 + .milliseconds(500)) == [.connect])
        #expect(l.connected(now: t0) == [.send("LISTEN \"x\";")])
    }

    @Test func aFailedListenIsNotRetriedInALoop() {
        var l = ChannelListener()
        _ = l.subscribe(a, channels: ["x"], now: t0)
        _ = l.connected(now: t0)
        let finished = l.commandFinished(error: "cannot execute LISTEN during recovery", now: t0)
        #expect(finished.contains(.confirm([a])))
        #expect(!finished.contains { if case .send = $0 { true } else { false } })
        #expect(l.listening.isEmpty)
    }

    @Test func everyClientGoneClosesTheConnection() {
        var l = ChannelListener()
        _ = l.subscribe(a, channels: ["x"], now: t0)
        _ = l.connected(now: t0)
        #expect(l.clientGone(a, now: t0).isEmpty, "after the LISTEN in flight")
        #expect(l.commandFinished(error: nil, now: t0) == [.close])
        #expect(l.lost(now: t0).isEmpty, "its closing is no loss")
    }
}
