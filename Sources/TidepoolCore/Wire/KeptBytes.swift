import NIOCore

/// Bytes read but not used yet (part of a message, or messages kept for later), held between reads
/// as an optional buffer. The kept buffer is always taken out before it is appended to, so that
/// copy-on-write does not copy it on every read.
extension Optional where Wrapped == ByteBuffer {
    /// Puts the kept bytes in front of `buffer`, and keeps nothing.
    public mutating func prependKept(to buffer: inout ByteBuffer) {
        guard var kept = self.take() else { return }
        kept.writeBuffer(&buffer)
        buffer = kept
    }

    /// Keeps what is left of `buffer` after the bytes kept already.
    public mutating func keep(_ buffer: inout ByteBuffer) {
        guard buffer.readableBytes > 0 else { return }
        if var kept = self.take() {
            kept.writeBuffer(&buffer)
            self = kept
        } else {
            self = buffer
            buffer.moveReaderIndex(to: buffer.writerIndex)
        }
    }
}
