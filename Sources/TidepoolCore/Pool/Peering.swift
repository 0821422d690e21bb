import NIOCore

/// Several pooler processes behind one address (so_reuseport) each know only their own clients,
/// while a client's cancel request arrives on a new connection that the kernel may hand to any of
/// them. With peering, a cancel key says which process issued it: bits 15-28 of the process ID
/// carry that process's peer_id, and a process that receives a key of another passes the request
/// on to that [peers] entry. Bits 29-30 count how often a request was passed on: a peer's host may
/// lead to yet another process (a name with several addresses, a load balancer), which passes it
/// on again, three times at most as PgBouncer allows, so that processes whose configurations
/// disagree never pass one around for ever; bit 31 stays clear (process IDs are positive).
public enum Peering {
    public static let peerIDs = 1...16383
    static let hopShift: Int32 = 29
    static let hopMask: Int32 = 0b11 << hopShift
    static let maxHops: Int32 = 3

    /// The process ID half of a new cancel key: 15 random bits under `peerID`, or 31 random bits
    /// with peering off.
    public static func processID(peerID: Int, random: UInt32) -> Int32 {
        guard peerIDs.contains(peerID) else { return Int32(bitPattern: random & 0x7FFF_FFFF) }
        return Int32(peerID) << 15 | Int32(random & 0x7FFF)
    }

    public enum CancelRoute: Equatable, Sendable {
        /// This process issued the key (or peering is off, or the request was passed on three
        /// times): look the client up here.
        case local(processID: Int32)
        /// Pass the request on to this peer, with this process ID (one more hop counted).
        case forward(peer: Int, processID: Int32)
        /// The key names a peer this process does not know: nobody can act on it.
        case unknownPeer(Int)
    }

    /// Where a cancel request with `processID` goes.
    public static func route(processID: Int32, ownPeerID: Int, peers: some Collection<Int>) -> CancelRoute {
        guard peerIDs.contains(ownPeerID) else { return .local(processID: processID) }
        let hops = (processID & hopMask) >> hopShift
        let key = processID & ~hopMask
        let peer = Int(key >> 15) & 0x3FFF
        if peer == ownPeerID || peer == 0 || hops >= maxHops { return .local(processID: key) }
        guard peers.contains(peer) else { return .unknownPeer(peer) }
        return .forward(peer: peer, processID: key | (hops + 1) << hopShift)
    }
}

/// Cancel requests passed on to peers: at most a peer's pool_size at once, the rest queued in
/// arrival order (SHOW PEER_POOLS counts both); one queued longer than cancel_wait_timeout is
/// dropped rather than sent late, when a query it was meant for has long finished.
public struct PeerCancels<Request: Sendable>: Sendable {
    public struct Peer: Sendable {
        public var sending = 0
        public var queued: [(request: Request, since: NIODeadline)] = []
    }

    public private(set) var peers: [Int: Peer] = [:]

    public init() {}

    /// A request for `peer`: returned to be sent now, or nil when queued behind `limit` in flight.
    public mutating func submit(_ request: Request, peer: Int, limit: Int, now: NIODeadline) -> Request? {
        if peers[peer, default: Peer()].sending < max(limit, 1) {
            peers[peer, default: Peer()].sending += 1
            return request
        }
        peers[peer, default: Peer()].queued.append((request, now))
        return nil
    }

    /// One request to `peer` is done: the next queued one still within `timeout` (zero: no limit),
    /// to send now, and how many were dropped for waiting longer (for the log).
    public mutating func finished(
        peer: Int, now: NIODeadline, timeout: TimeAmount
    ) -> (next: Request?, dropped: Int) {
        guard var state = peers[peer] else { return (nil, 0) }
        var dropped = 0
        while let first = state.queued.first, timeout > .zero, now - first.since > timeout {
            state.queued.removeFirst()
            dropped += 1
        }
        if state.queued.isEmpty {
            state.sending -= 1
            peers[peer] = state.sending > 0 ? state : nil
            return (nil, dropped)
        }
        let next = state.queued.removeFirst().request
        peers[peer] = state
        return (next, dropped)
    }
}
