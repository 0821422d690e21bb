import NIOCore

extension ClientSession {
    /// What the pool, the pool's listener and the linked server tell a client's session besides
    /// bytes; the runtime hands each in on the client's loop with the time (`handle`).
    public enum Event: Sendable {
        /// query_wait_notify passed while queued.
        case waitNotice
        /// server_fast_close (`endAtTransactionEnd`).
        case endAtTransactionEnd
        /// The pool's listener listens on the client's new channels.
        case listenConfirmed
        /// A CancelRequest with this client's key came.
        case cancelRequested
        /// A cancel request sent for this client reached PostgreSQL (or gave up).
        case cancelFinished
        /// The replication connection's own server could not be opened.
        case passThroughFailed(PostgresError)
        /// The linked server's socket became writable, or stopped being writable.
        case serverWritable(Bool)
        /// The linked server closed or failed; `unused`: nothing of the client's reached it.
        case serverLost(unused: Bool)
        /// Bytes handed to a server on another loop were written down to half the limit.
        case handOffDrained
    }

    public mutating func handle(_ event: Event, now: NIODeadline, into actions: inout Actions) {
        switch event {
        case .waitNotice: waitNotice(into: &actions)
        case .endAtTransactionEnd: endAtTransactionEnd(now: now, into: &actions)
        case .listenConfirmed: listenConfirmed(now: now, into: &actions)
        case .cancelRequested: cancelRequested(now: now, into: &actions)
        case .cancelFinished: cancelFinished(now: now, into: &actions)
        case .passThroughFailed(let error): passThroughFailed(error, into: &actions)
        case .serverWritable(let writable): serverWritabilityChanged(writable, into: &actions)
        case .serverLost(let unused): serverLost(unused: unused, now: now, into: &actions)
        case .handOffDrained: handOffDrained(into: &actions)
        }
    }
}
