import NIOCore

/// Sizes the buffer a client's channel reads into. The channel keeps its last receive buffer
/// between reads, so an idle client holds one; starting small and following the sizes of the
/// client's reads keeps thousands of idle clients cheap while a busy client's buffer grows to
/// what it sends.
///
/// The size doubles when a read fills the buffer and halves after two reads in a row that would
/// have fit in half of it, between `minimum` and `maximum` (powers of two). The whole value is
/// five bytes, so the channel stores it inline instead of allocating a box for it per client
/// (as it must for NIO's adaptive allocator, which is larger than an existential's inline
/// buffer).
public struct ReceiveBufferSizer: RecvByteBufferAllocator, Sendable {
    public static let minimum = 64
    public static let maximum = 65536

    private var size: UInt32
    private var shrinkNext = false

    /// `initial` is rounded down to a power of two and kept within the bounds.
    public init(initial: Int) {
        let clamped = min(max(initial, Self.minimum), Self.maximum)
        size = UInt32(1 << (Int.bitWidth - 1 - clamped.leadingZeroBitCount))
    }

    public var capacity: Int { Int(size) }

    public func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
        allocator.buffer(capacity: Int(size))
    }

    public func nextBufferSize() -> Int? { Int(size) }

    public mutating func record(actualReadBytes: Int) -> Bool {
        let current = Int(size)
        if actualReadBytes >= current, current < Self.maximum {
            size <<= 1
            shrinkNext = false
            return true
        }
        if actualReadBytes <= current / 2, current > Self.minimum {
            if shrinkNext {
                size >>= 1
                shrinkNext = false
            } else {
                shrinkNext = true
            }
        } else {
            shrinkNext = false
        }
        return false
    }
}
