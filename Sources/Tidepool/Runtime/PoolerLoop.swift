import NIOCore

/// What the pooler keeps for one of its event loops, touched only on that loop's thread: the
/// turn flusher, the clients whose sessions watch the clock, SHOW LATENCY's histograms. Each
/// connection holds its loop's directly (its hot path reaches the flusher without the pooler).
final class PoolerLoop: @unchecked Sendable {
    let index: Int
    let eventLoop: EventLoop
    let flusher: Pooler.TurnFlusher
    /// Clients whose sessions watch the clock (`ClientSession.tick`), ticked by the loop's sweeper.
    var clockWatchers: [ObjectIdentifier: ClientConnection] = [:]
    let latency = Pooler.LoopLatency()

    init(index: Int, eventLoop: EventLoop) {
        self.index = index
        self.eventLoop = eventLoop
        self.flusher = Pooler.TurnFlusher(loop: eventLoop)
    }
}

/// A connection that lives on one of the pooler's loops: its state is touched there only, and
/// callers on other loops hop.
protocol OnPoolerLoop: AnyObject {
    var loop: PoolerLoop { get }
}

extension OnPoolerLoop {
    /// The connection's event loop, known before its channel exists and found without touching
    /// it (a cold object when a server is handed over among thousands of clients; `channel` is
    /// set on that loop).
    var eventLoop: EventLoop { loop.eventLoop }

    /// Runs `body` on the connection's loop: now if the caller is on it.
    func onLoop(_ body: @escaping @Sendable () -> Void) {
        let loop = eventLoop
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }

    /// Debug builds check that the connection is touched on its own loop only. The integration
    /// suite runs two loops, so a missing hop stops the pooler there instead of racing.
    @inline(__always) func assertOnLoop() {
        #if DEBUG
            eventLoop.preconditionInEventLoop()
        #endif
    }
}
