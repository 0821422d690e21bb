import NIOCore

/// Sizes the buffer a client's channel reads into. The channel keeps its last receive buffer
/// between reads, so an idle client holds one; starting small and following the sizes of the
/// client's reads keeps thousands of idle clients cheap while a busy client's buffer grows to
/// what it sends.
///
/// The size doubles when a read fills the buffer and halves after two reads in a row that would
/// have fit in half of it, between `minimum` and the ceiling (pkt_buf; powers of two). The whole
/// value is nine bytes, so the channel stores it inline instead of allocating a box for it per
/// client (as it must for NIO's adaptive allocator, which is larger than an existential's inline
/// buffer).
public struct ReceiveBufferSizer: RecvByteBufferAllocator, Sendable {
    public static let minimum = 64
    /// The ceiling unless pkt_buf says otherwise.
    public static let maximum = 65536

    private var size: UInt32
    private let ceiling: UInt32
    private var shrinkNext = false

    /// `initial` and `maximum` are rounded down to powers of two, the size kept within them.
    public init(initial: Int, maximum: Int = Self.maximum) {
        ceiling = UInt32(Self.powerOfTwo(max(maximum, Self.minimum)))
        size = UInt32(Self.powerOfTwo(min(max(initial, Self.minimum), Int(ceiling))))
    }

    static func powerOfTwo(_ n: Int) -> Int { 1 << (Int.bitWidth - 1 - n.leadingZeroBitCount) }

    public var capacity: Int { Int(size) }

    public func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
        allocator.buffer(capacity: Int(size))
    }

    public func nextBufferSize() -> Int? { Int(size) }

    public mutating func record(actualReadBytes: Int) -> Bool {
        let current = Int(size)
        if actualReadBytes >= current, size < ceiling {
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
