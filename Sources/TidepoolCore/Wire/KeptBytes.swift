import NIOCore

/// Bytes read but not used yet (part of a message, or messages kept for later), held between
/// reads. The kept buffer is always taken out before it is appended to, so that copy-on-write does
/// not copy it on every read.
public struct KeptBytes: Sendable {
    public var bytes: ByteBuffer?

    public init() {}

    @inlinable
    public var isEmpty: Bool { bytes == nil }

    /// Puts the kept bytes in front of `buffer`, and keeps nothing.
    @inlinable @inline(__always)
    public mutating func prepend(to buffer: inout ByteBuffer) {
        guard var kept = bytes.take() else { return }
        kept.writeBuffer(&buffer)
        buffer = kept
    }

    /// Keeps what is left of `buffer` after the bytes kept already.
    @inlinable @inline(__always)
    public mutating func keep(_ buffer: inout ByteBuffer) {
        if buffer.readableBytes > 0 { keepSome(&buffer) }
    }

    @inlinable
    mutating func keepSome(_ buffer: inout ByteBuffer) {
        if var kept = bytes.take() {
            kept.writeBuffer(&buffer)
            bytes = kept
        } else {
            bytes = buffer
            buffer.moveReaderIndex(to: buffer.writerIndex)
        }
    }

    /// Everything kept, and keeps nothing.
    @inlinable
    public mutating func take() -> ByteBuffer? { bytes.take() }
}
