import NIOCore

/// What a scanner's owner wants done with a message, decided from its type byte alone. One word
/// (not an enum with a payload), so that the classify closures on the hot paths stay cheap.
public struct MessageDisposition: Sendable, Equatable {
    @usableFromInline let raw: Int

    @usableFromInline init(raw: Int) { self.raw = raw }

    /// Forward it untouched, possibly in pieces, together with its neighbours.
    public static let forward = MessageDisposition(raw: -1)
    /// Hand it over whole, on its own, so its body can be read.
    public static let inspect = MessageDisposition(raw: -2)
    /// Hand over its header and the first `n` bytes of its body on their own (once they have
    /// come), then forward the rest as it arrives: for a message too large to hold whose
    /// decision rests on its first bytes.
    public static func head(_ n: Int) -> MessageDisposition { MessageDisposition(raw: max(0, n)) }

    /// `n` of `head(n)`.
    public var headLength: Int? { raw >= 0 ? raw : nil }
}

/// Splits a stream of typed PostgreSQL messages (type byte, Int32 length, body) into runs of
/// bytes that can be forwarded untouched, stopping only at the messages its owner must read.
///
/// Only the five header bytes of a forwarded message are looked at; its body is never copied, and a
/// message larger than what has arrived is forwarded in pieces as it arrives.
public struct MessageScanner: Sendable {
    /// Bytes of the message being forwarded that have not arrived yet.
    public var bytesLeftInMessage: Int = 0
    public var maxMessageLength: Int

    public init(maxMessageLength: Int = Int(Int32.max)) {
        self.maxMessageLength = maxMessageLength
    }

    public enum Chunk {
        /// Bytes to forward unchanged: whole messages and possibly the start or end of one.
        case forward(ByteBuffer)
        /// One whole message to inspect: `body` excludes the type byte and the length, `whole` has them.
        case message(type: UInt8, body: ByteBuffer, whole: ByteBuffer)
        /// The start of a message (`MessageDisposition.head`): `length` is its declared length,
        /// `body` the first bytes of its body; the rest comes as `.forward` chunks.
        case head(type: UInt8, length: Int, body: ByteBuffer)
    }

    /// True when the scanner sits at a message boundary.
    public var atMessageBoundary: Bool { bytesLeftInMessage == 0 }

    /// Takes the next chunk from the front of `buffer`. Returns nil when more bytes are needed; the
    /// unread bytes then stay in `buffer`. `classify` is called with each message's type byte when its
    /// header is read: exactly once for a message it forwards (so it may count them), possibly more
    /// than once for a message it inspects.
    /// Never `.head`: a loop of its own with two outcomes, so that the callers' classify
    /// closures stay inlined into it (the server side's hot path).
    @inlinable @inline(__always)
    public mutating func next(
        from buffer: inout ByteBuffer, classify: (UInt8) -> MessageDisposition
    ) throws(WireError) -> Chunk? {
        let start = buffer.readerIndex
        var cursor = start
        let end = buffer.writerIndex
        while cursor < end {
            if bytesLeftInMessage > 0 {
                let step = min(bytesLeftInMessage, end - cursor)
                bytesLeftInMessage -= step
                cursor += step
                continue
            }
            guard end - cursor >= 5 else { break }
            let type = buffer.getInteger(at: cursor, as: UInt8.self)!
            let length = Int(buffer.getInteger(at: cursor + 1, as: Int32.self)!)
            guard length >= 4 else { throw .invalidLength(length) }
            guard length <= maxMessageLength else { throw .messageTooLarge(length, limit: maxMessageLength) }
            if classify(type) == .forward {
                bytesLeftInMessage = length + 1
                continue
            }
            // A message to inspect ends the run before it, and is handed over alone.
            if cursor > start { break }
            guard end - cursor >= 1 + length else { return nil }
            let whole = buffer.readSlice(length: length + 1)!
            return .message(
                type: type, body: whole.getSlice(at: whole.readerIndex + 5, length: length - 4)!, whole: whole)
        }
        guard cursor > start else { return nil }
        return .forward(buffer.readSlice(length: cursor - start)!)
    }

    /// As `next(from:classify:)`, but `peek` also gets the buffer and the index where the message's
    /// body starts, to look at its first bytes (which may not have arrived: check `writerIndex`).
    /// Always inlined, so that the hot paths' classify closures are inlined into it: whether the
    /// optimizer did so by itself changed with the size of the callers.
    @inlinable @inline(__always)
    public mutating func next(
        from buffer: inout ByteBuffer, peek classify: (UInt8, ByteBuffer, Int) -> MessageDisposition
    ) throws(WireError) -> Chunk? {
        let start = buffer.readerIndex
        var cursor = start
        let end = buffer.writerIndex
        scan: while cursor < end {
            if bytesLeftInMessage > 0 {
                let step = min(bytesLeftInMessage, end - cursor)
                bytesLeftInMessage -= step
                cursor += step
                continue
            }
            guard end - cursor >= 5 else { break }
            let type = buffer.getInteger(at: cursor, as: UInt8.self)!
            let length = Int(buffer.getInteger(at: cursor + 1, as: Int32.self)!)
            guard length >= 4 else { throw .invalidLength(length) }
            guard length <= maxMessageLength else { throw .messageTooLarge(length, limit: maxMessageLength) }
            let disposition = classify(type, buffer, cursor + 5)
            if disposition == .forward {
                bytesLeftInMessage = length + 1
            } else if disposition == .inspect {
                // A message to inspect ends the run before it, and is handed over alone.
                if cursor > start { break scan }
                guard end - cursor >= 1 + length else { return nil }
                let whole = buffer.readSlice(length: length + 1)!
                return .message(
                    type: type, body: whole.getSlice(at: whole.readerIndex + 5, length: length - 4)!, whole: whole)
            } else {
                if cursor > start { break scan }
                let n = min(disposition.raw, length - 4)
                guard end - cursor >= 5 + n else { return nil }
                buffer.moveReaderIndex(forwardBy: 5)
                bytesLeftInMessage = length - 4 - n
                return .head(type: type, length: length, body: buffer.readSlice(length: n)!)
            }
        }
        guard cursor > start else { return nil }
        return .forward(buffer.readSlice(length: cursor - start)!)
    }
}
