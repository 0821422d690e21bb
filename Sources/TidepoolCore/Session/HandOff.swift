import Synchronization

/// Bytes one event loop handed to a connection on another loop that the other loop has not taken
/// in yet. Within one loop, writability tells the reader when to stop; across loops the reader
/// would learn it only after the other loop caught up, and could read without bound meanwhile.
/// The reader stops past `limit` handed off, and is told to go on once the taker has brought them
/// to half of it.
public final class HandOff: Sendable {
    let bytes = Atomic<Int>(0)
    public let limit: Int

    public init(limit: Int) {
        self.limit = limit
    }

    /// Bytes handed off but not taken in.
    public var pending: Int { bytes.load(ordering: .relaxed) }

    /// On the reader's loop, for bytes handed off. True when the reader is to stop reading.
    @inlinable
    public func handed(_ count: Int) -> Bool {
        add(count) > limit
    }

    /// On the taker's loop, for bytes taken in. True when this brought the pending bytes down to
    /// half the limit: a reader that stopped may go on (it checks `mayGoOn` on its own loop).
    @inlinable
    public func taken(_ count: Int) -> Bool {
        let left = add(-count)
        return left <= limit / 2 && left + count > limit / 2
    }

    /// Whether a reader that stopped may read again.
    public var mayGoOn: Bool { pending <= limit / 2 }

    @usableFromInline
    func add(_ count: Int) -> Int {
        bytes.add(count, ordering: .relaxed).newValue
    }
}
