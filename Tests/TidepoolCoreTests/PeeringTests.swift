import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct PeeringTests {
    @Test func cancelKeysCarryThePeerID() {
        let id = Peering.processID(peerID: 3, random: 0xFFFF_ABCD)
        #expect(id == 3 << 15 | 0x2BCD)
        #expect(id > 0)
        // The largest peer_id keeps the process ID positive and clear of the hop count.
        let top = Peering.processID(peerID: 16383, random: .max)
        #expect(top > 0 && top & Peering.hopMask == 0)
        // Peering off: 31 random bits, positive.
        #expect(Peering.processID(peerID: 0, random: .max) == Int32.max)
    }

    @Test func cancelRequestsGoToThePeerThatIssuedTheKey() {
        let peers: Set = [1, 2, 3]
        let mine = Peering.processID(peerID: 1, random: 77)
        let theirs = Peering.processID(peerID: 2, random: 77)
        #expect(Peering.route(processID: mine, ownPeerID: 1, peers: peers) == .local(processID: mine))
        let once = theirs | 1 << 29
        #expect(Peering.route(processID: theirs, ownPeerID: 1, peers: peers) == .forward(peer: 2, processID: once))
        // The peer acts on it, the hop count taken off.
        #expect(Peering.route(processID: once, ownPeerID: 2, peers: peers) == .local(processID: theirs))
        // A peer missing from [peers]; peering off: everything local.
        let stranger = Peering.processID(peerID: 9, random: 1)
        #expect(Peering.route(processID: stranger, ownPeerID: 1, peers: peers) == .unknownPeer(9))
        #expect(Peering.route(processID: theirs, ownPeerID: 0, peers: peers) == .local(processID: theirs))
    }

    /// A peer's host name may lead to another process (several addresses, a load balancer): that
    /// one passes the request on again, three times in all, then acts on it where it is.
    @Test func aCancelRequestIsPassedOnAtMostThreeTimes() {
        let peers: Set = [1, 2, 3, 4, 5]
        let key = Peering.processID(peerID: 5, random: 42)
        var processID = key
        var hops: [Int] = []
        for receiver in [1, 2, 3, 4] {
            switch Peering.route(processID: processID, ownPeerID: receiver, peers: peers) {
            case .forward(let peer, let next):
                #expect(peer == 5)
                hops.append(receiver)
                processID = next
            case .local(let local):
                #expect(local == key)
                #expect(hops == [1, 2, 3] && receiver == 4)
                return
            case .unknownPeer: Issue.record("peer 5 is known")
            }
        }
        Issue.record("passed on more than three times")
    }

    @Test func cancelsToAPeerWaitBehindItsPoolSize() {
        var cancels = PeerCancels<Int>()
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        let none = TimeAmount.zero
        #expect(cancels.submit(1, peer: 5, limit: 2, now: now) == 1)
        #expect(cancels.submit(2, peer: 5, limit: 2, now: now) == 2)
        #expect(cancels.submit(3, peer: 5, limit: 2, now: now) == nil)
        #expect(cancels.submit(4, peer: 5, limit: 2, now: now) == nil)
        #expect(cancels.submit(9, peer: 6, limit: 2, now: now) == 9)  // another peer has its own limit
        #expect(cancels.peers[5]?.sending == 2 && cancels.peers[5]?.queued.map(\.request) == [3, 4])
        #expect(cancels.finished(peer: 5, now: now, timeout: none).next == 3)
        #expect(cancels.finished(peer: 5, now: now, timeout: none).next == 4)
        #expect(cancels.finished(peer: 5, now: now, timeout: none).next == nil)
        #expect(cancels.peers[5]?.sending == 1)
        #expect(cancels.finished(peer: 5, now: now, timeout: none).next == nil)
        #expect(cancels.peers[5] == nil)
        // pool_size 0 still lets one through.
        #expect(cancels.submit(7, peer: 8, limit: 0, now: now) == 7)
    }

    /// cancel_wait_timeout: a request queued too long is dropped, not sent late.
    @Test func cancelsQueuedPastCancelWaitTimeoutAreDropped() {
        var cancels = PeerCancels<Int>()
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        #expect(cancels.submit(1, peer: 2, limit: 1, now: start) == 1)
        #expect(cancels.submit(2, peer: 2, limit: 1, now: start) == nil)
        #expect(cancels.submit(3, peer: 2, limit: 1, now: start + .seconds(9)) == nil)
        let after = cancels.finished(peer: 2, now: start + .seconds(11), timeout: .seconds(10))
        #expect(after.next == 3 && after.dropped == 1)
    }

    @Test func peersSectionAndPeerIDAreRead() throws {
        let config = try Config.parse(
            """
            [pooler]
            peer_id = 2
            [peers]
            1 = host=/run/p1 port=6432
            2 = host=127.0.0.1 port=7000 pool_size=3
            """)
        #expect(config.global.peerID == 2)
        #expect(config.peers[1]?.host == "/run/p1" && config.peers[1]?.poolSize == nil)
        #expect(config.peers[2]?.port == 7000 && config.peers[2]?.poolSize == 3)
        #expect(config.warnings.isEmpty)
        #expect(throws: ConfigError.self) { try Config.parse("[peers]\nzero = host=x\n") }
        #expect(throws: ConfigError.self) { try Config.parse("[peers]\n16384 = host=x\n") }
        #expect(throws: ConfigError.self) { try Config.parse("[peers]\n1 = host=x dbname=y\n") }
        #expect(throws: ConfigError.self) { try Config.parse("[pooler]\npeer_id = 20000\n") }
        let views = AdminViews.peers(config)
        #expect(views.columns == ["peer_id", "host", "port", "pool_size"])
        #expect(views.rows == [["1", "/run/p1", "6432", "20"], ["2", "127.0.0.1", "7000", "3"]])
        let pools = AdminViews.peerPools(config, cancels: [2: (sending: 1, queued: 4)])
        #expect(
            pools.columns.first == "database" && pools.rows == [["1", "0", "0", "0", "0"], ["2", "1", "4", "1", "0"]])
    }
}
