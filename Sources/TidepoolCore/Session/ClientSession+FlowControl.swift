extension ClientSession {
    /// Whether each side's bytes are read now. A side is not read while what it sent cannot go
    /// anywhere: the pooler then holds at most `max_buffered_bytes` (plus one read) per
    /// connection, whatever a result's or a pipeline's size, as PostgreSQL itself stops reading a
    /// client whose replies it cannot send.
    ///
    /// - The server is not read while the client is not writable (its socket's queue is past
    ///   `max_buffered_bytes`), or while a ReadyForQuery waits for the pool's listener.
    /// - The client is not read while it is not writable itself (it is not reading what it asked
    ///   for), while its linked server is not writable or its bytes handed to a server on another
    ///   loop wait there past the limit, or while more than `bufferLimit` bytes wait
    ///   for something outside the session (a server, an auth_query lookup, the welcome). Bytes
    ///   of a message the session must see whole are not counted while nothing else is awaited:
    ///   the message can only complete if reading goes on, and max_packet_size bounds it.
    public struct FlowControl: Sendable {
        /// The client's socket accepts more (NIO's writability).
        public internal(set) var clientWritable = true
        /// The linked server's socket accepts more.
        public internal(set) var serverWritable = true
        /// The client is not being read.
        public internal(set) var clientPaused = false
        /// The linked server is not being read.
        public internal(set) var serverPaused = false
        /// Bytes handed to a server on another loop are past max_buffered_bytes
        /// (`HandOff`): the client is not read until that loop has written enough of them.
        public internal(set) var handOffBacklog = false
        /// Bytes in `pending`.
        var pendingBytes = 0
        /// A Bind waits for its statement's fresh copy to be checked (`PreparedStatementTracker.isHolding`):
        /// the client's bytes after it wait in `inbound`, counted in `pendingBytes` (`bytesAfterHeldBind`).
        var bindHeld = false
        var bytesAfterHeldBind = 0
    }

    /// Client bytes held until something outside the session happens.
    var heldBytes: Int {
        switch state {
        case .waiting, .lookingUpSecret, .awaitingWelcome:
            return flow.pendingBytes + (inbound.bytes?.readableBytes ?? 0)
        default:
            return flow.pendingBytes
        }
    }

    /// The client's socket became writable or stopped being writable.
    public mutating func clientWritabilityChanged(_ writable: Bool, into actions: inout Actions) {
        flow.clientWritable = writable
        if writable, !notificationQueue.isEmpty { writeQueuedNotifications(into: &actions) }
        settleReads(into: &actions)
    }

    /// The linked server's socket became writable or stopped being writable.
    public mutating func serverWritabilityChanged(_ writable: Bool, into actions: inout Actions) {
        guard holdsServer else { return }
        flow.serverWritable = writable
        settleReads(into: &actions)
    }

    /// Bytes handed to a server on another loop passed the limit (`HandOff.handed`); reads are
    /// settled after the actions being carried out.
    public mutating func handOffBacklogged() { flow.handOffBacklog = true }

    /// The server's loop wrote enough of them (`HandOff.mayGoOn`); nothing when the client was
    /// not held back for them.
    public mutating func handOffDrained(into actions: inout Actions) {
        guard flow.handOffBacklog else { return }
        flow.handOffBacklog = false
        settleReads(into: &actions)
    }

    /// Pauses or resumes reading either side as the rules above say. Called after every event's
    /// actions are carried out; appends nothing when nothing changes.
    public mutating func settleReads(into actions: inout Actions) {
        let linked = holdsServer
        let pauseClient =
            !isClosed
            && (!flow.clientWritable || (linked && !flow.serverWritable) || flow.handOffBacklog
                || heldBytes > bufferLimit)
        let pauseServer = linked && (!flow.clientWritable || readyHold == .held)
        guard pauseClient != flow.clientPaused || pauseServer != flow.serverPaused else { return }
        settleReadsSlow(pauseClient: pauseClient, pauseServer: pauseServer, into: &actions)
    }

    mutating func settleReadsSlow(pauseClient: Bool, pauseServer: Bool, into actions: inout Actions) {
        if pauseClient != flow.clientPaused {
            flow.clientPaused = pauseClient
            actions.append(pauseClient ? .pauseClientReads : .resumeClientReads)
        }
        if pauseServer != flow.serverPaused {
            flow.serverPaused = pauseServer
            // An unlinked server is read again by the unlink itself.
            if holdsServer {
                actions.append(pauseServer ? .pauseServerReads : .resumeServerReads)
            }
        }
    }

    /// A new link: the server starts writable and read.
    mutating func resetServerFlow() {
        flow.serverWritable = true
        flow.serverPaused = false
    }
}

extension ClientSession {
    /// Bytes the session holds: client bytes waiting for a server or for the rest of their
    /// message, and server bytes waiting for the rest of theirs (SHOW MEM, /metrics).
    public var bufferedBytes: Int {
        flow.pendingBytes + (inbound.bytes?.readableBytes ?? 0) + (server?.kept.bytes?.readableBytes ?? 0)
    }
}
