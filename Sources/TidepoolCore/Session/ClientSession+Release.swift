import NIOCore

/// When does a server go back to the pool? Only here, by one of these:
///
/// - `releaseIfDone`: the client stays and its server is done with it: nothing more of the
///   server's to read or of the client's to send, and `mayGiveBack` (not session pooling, the
///   server clean by `serverIsClean`, the client not pinned by its session state). Called where
///   any of that may have become true: a ReadyForQuery or a late notification read, replies the
///   pooler made up itself, a cancel that reached PostgreSQL, the end of a server message that
///   came after the last ReadyForQuery.
/// - `finish`: the client is gone: the server goes back clean (reset first when it holds the
///   client's session state, or server_reset_query in session pooling), or closed if it may be
///   dirty.
/// - `unlink(reusable: false)`: the server cannot be trusted (bad bytes, a session-state replay
///   that failed, server_fast_close): it is closed.
/// - `lent` of a server the client no longer needs (it only waited for the pool's parameters,
///   or left the queue meanwhile): given straight back.
///
/// Each emits `.releaseServer` or `.resetAndReleaseServer`, which the runtime carries out in
/// order after the writes before it; a reset server goes back when its reset query's
/// ReadyForQuery comes (`ServerSession.reset`, then `.released`). The pool itself takes back a
/// server it lent to a client gone before the lend reached it.
extension ClientSession {
    /// Whether the linked server may go back to the pool now: not in session mode, and clean.
    @inline(__always) public var mayGiveBack: Bool { poolMode != .session && serverIsClean && !isPinned }

    /// Nothing outstanding, no transaction open, no query or reply of the pooler's own pending and
    /// no cancel under way. With `linkBetweenMessages`, which `releaseIfDone` and `finish` add,
    /// the rule for handing a server to another client (kept out of this getter, read at every
    /// ReadyForQuery, where it holds already).
    public var serverIsClean: Bool {
        tracker.isClean && !isSyncing && cancelsInFlight == 0 && readyHold == .none && (prepared?.isQuiet ?? true)
    }

    /// The one way a linked server goes back while its client stays (see above): nothing of
    /// the server's left to read, nothing of the client's to send, and `mayGiveBack`. Not inlined: inlined into `serverBytes` it made that function large enough that
    /// the classify closure of its hot loop was no longer inlined (callers there check the cheap
    /// part, `mayGiveBack`, first, to write the answer before).
    @inline(never)
    mutating func releaseIfDone(now: NIODeadline, into actions: inout Actions) {
        // A message the client has begun to send (kept until it is whole) keeps the server too:
        // it would ask for one again as soon as the message is complete.
        guard isLinked, toServer.isEmpty, mayGiveBack, linkBetweenMessages, inbound.isEmpty else { return }
        unlink(now: now, reusable: true, into: &actions)
    }

    mutating func unlink(now: NIODeadline, reusable: Bool, into actions: inout Actions) {
        if reusable, let sessionState, let reset = sessionState.resetForRelease() {
            // It holds state of this client's that no other client may see.
            actions.append(.resetAndReleaseServer(reset))
        } else {
            actions.append(.releaseServer(reusable: reusable))
        }
        state = .idle
        tracker.reset()
        timeoutClock?.idleSince = now
    }

    /// The client is gone (Terminate, closed socket, or closed by the pooler): the server it holds
    /// is reset and given back, or closed if it may be dirty. Safe to call more than once.
    public mutating func finish(serverResetQuery: String, resetAlways: Bool, into actions: inout Actions) {
        if isClosed { return }
        self.serverResetQuery = serverResetQuery
        serverResetQueryAlways = resetAlways
        if isPassingThrough {
            actions.append(.releaseServer(reusable: false))
        } else if isLinked {
            let clean = serverIsClean && linkBetweenMessages
            if clean, let sessionState, let reset = sessionState.resetForRelease() {
                actions.append(.resetAndReleaseServer(reset))
            } else if clean, poolMode == .session || resetAlways, !serverResetQuery.isEmpty {
                actions.append(.resetAndReleaseServer(.resetQuery))
            } else {
                actions.append(.releaseServer(reusable: clean))
            }
        }
        state = .closed
        actions.append(.forget)
    }

}
