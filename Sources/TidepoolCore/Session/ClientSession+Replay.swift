import NIOCore

/// A server that PostgreSQL ended just as it was lent (pg_terminate_backend, idle_session_timeout,
/// a restart) must not cost the client its connection when nothing of the client's ran there: the
/// client goes back to the queue with everything it sent, and another server gets it.
///
/// Nothing ran when the server was gone before the client's bytes were written to it, when it
/// went during the pooler's own parameter sync (the client's bytes wait for its end), or when
/// its first answer was a FATAL of class 57P (operator intervention): PostgreSQL sends that
/// instead of any reply, so no statement of the request completed, and an aborted transaction
/// commits nothing.
extension ClientSession {
    /// What a lend started from, kept until the server first answers the client. Made once per
    /// client and reused, so that a lend allocates nothing.
    final class LeaseStart {
        var tracker = TransactionTracker()
        var scanner = MessageScanner()
        var pending: [ByteBuffer] = []
        var pendingBytes = 0
        var inbound: ByteBuffer?
        /// Client bytes read since the lend, as read.
        var after = KeptBytes()
        var prepared: PreparedStatementTracker.Snapshot?
        var sessionMark: SessionState.Mark?
        var waitStart = NIODeadline.uptimeNanoseconds(0)
        /// The server's first answer was a FATAL of class 57P.
        var goneBeforeAnswer = false
        /// Times this request went back to the queue: a server that fails every time is not
        /// retried for ever.
        var replays = 0

        /// Lets go of the bytes kept.
        func answered() {
            replays = 0
            pending.removeAll(keepingCapacity: true)
            inbound = nil
            if !after.isEmpty { after = KeptBytes() }
            prepared = nil
            sessionMark = nil
        }
    }

    static let maxReplays = 3

    /// The pool lent a server: what the client has sent is kept until the server answers.
    mutating func beginLease(_ server: ServerSessionState, waitStart: NIODeadline) {
        let lease: LeaseStart
        if let kept = leaseStart {
            lease = kept
        } else {
            lease = LeaseStart()
            leaseStart = lease
        }
        server.unanswered = true
        lease.tracker = tracker
        lease.scanner = scanner
        if !pending.isEmpty { lease.pending.append(contentsOf: pending) }
        lease.pendingBytes = flow.pendingBytes
        lease.inbound = inbound.bytes
        lease.prepared = prepared?.snapshot()
        lease.sessionMark = sessionState?.mark
        lease.waitStart = waitStart
        lease.goneBeforeAnswer = false
    }

    /// The server answered: nothing is replayed from now on.
    mutating func leaseAnswered(_ server: ServerSessionState) {
        server.unanswered = false
        leaseStart!.answered()
    }

    /// Client bytes read while the lend is not answered.
    /// Past `bufferLimit` bytes the request is not kept: a message of any size then goes through
    /// as it arrives, and a server lost before answering it costs the client its connection.
    mutating func keepForReplay(_ buffer: ByteBuffer, _ server: ServerSessionState) {
        let lease = leaseStart!
        let kept = lease.after.bytes?.readableBytes ?? 0
        guard kept + buffer.readableBytes <= bufferLimit else {
            leaseAnswered(server)
            return
        }
        var copy = buffer
        lease.after.keep(&copy)
    }

    /// Whether the first answer of the lend (`bytes`, whole messages from the server) is a FATAL
    /// of class 57P: the server went without running anything.
    static func isGoingAway(_ bytes: ByteBuffer) -> Bool {
        guard bytes.getInteger(at: bytes.readerIndex, as: UInt8.self) == MessageType.errorResponse else {
            return false
        }
        return isGoingAwaySlow(bytes)
    }

    @inline(never)
    static func isGoingAwaySlow(_ bytes: ByteBuffer) -> Bool {
        guard let length = bytes.getInteger(at: bytes.readerIndex + 1, as: Int32.self), length >= 4,
            let body = bytes.getSlice(at: bytes.readerIndex + 5, length: Int(length) - 4)
        else { return false }
        let error = WireDecode.errorFields(body)
        return error.severity == "FATAL" && error.code.hasPrefix("57P")
    }

    /// The linked server is gone, `unused` if none of the client's bytes were written to it.
    /// True if the client went back to the queue with what it had sent.
    mutating func requeueAfterLoss(unused: Bool, now: NIODeadline, into actions: inout Actions) -> Bool {
        guard case .linked(let server) = state, server.unanswered, let lease = leaseStart,
            unused || server.sync != nil || lease.goneBeforeAnswer,
            lease.replays < Self.maxReplays,
            lease.tracker.outstanding > 0 || !lease.pending.isEmpty || lease.inbound != nil || !lease.after.isEmpty
        else { return false }
        server.unanswered = false
        lease.replays += 1
        state = .waiting(since: lease.waitStart)
        readyHold = .none
        toServer.removeAll()
        tracker = lease.tracker
        scanner = lease.scanner
        if let snapshot = lease.prepared { prepared?.restore(snapshot) }
        flow.bindHeld = false
        flow.bytesAfterHeldBind = 0
        if let mark = lease.sessionMark {
            sessionState?.restore(mark)
        } else {
            sessionState?.requestsDropped()
        }
        pending = lease.pending
        lease.pending.removeAll(keepingCapacity: true)
        flow.pendingBytes = lease.pendingBytes
        var raw = lease.inbound ?? ByteBuffer()
        lease.inbound = nil
        if var after = lease.after.take() { raw.writeBuffer(&after) }
        inbound = KeptBytes()
        actions.append(.requestServer)
        if prepared != nil {
            // Rewritten at the next lend, for that server.
            stash(&raw)
        } else if raw.readableBytes > 0 {
            // Read again from where the lend started; queued for the next server.
            do {
                try clientBytes(&raw, now: now, isKnownStatement: { _ in false }, into: &actions)
            } catch {
                close(error.postgresError, reason: "bad packet", into: &actions)
                return true
            }
            if raw.readableBytes > 0, !isClosed { stash(&raw) }
        }
        return true
    }
}
