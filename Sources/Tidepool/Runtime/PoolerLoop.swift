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
