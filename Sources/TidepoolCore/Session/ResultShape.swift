import NIOCore

/// What PostgreSQL compares when it decides that a cached plan's result type changed (0A000
/// "cached plan must not change result type"): the result columns' names, types and type
/// modifiers, in order. A statement's shape is read from a RowDescription (or NoData) answering a
/// Describe of it; the table a column comes from does not count, as it does not for PostgreSQL.
public enum ResultShape {
    /// A 64-bit FNV-1a hash of the shape in a RowDescription body, or of "no result" for NoData.
    public static func of(_ type: UInt8, body: ByteBuffer?) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        @inline(__always) func mix(_ byte: UInt8) {
            hash ^= UInt64(byte)
            hash &*= 0x100_0000_01b3
        }
        guard type == MessageType.rowDescription, var b = body, let count = b.readInteger(as: Int16.self) else {
            mix(type)
            return hash
        }
        for _ in 0..<max(0, Int(count)) {
            guard let name = b.readNullTerminatedString(), b.readableBytes >= 18 else { break }
            for byte in name.utf8 { mix(byte) }
            mix(0)
            b.moveReaderIndex(forwardBy: 6)  // table OID and column number
            for byte in b.readBytes(length: 4)! { mix(byte) }  // type OID
            b.moveReaderIndex(forwardBy: 2)  // type length, which the type decides
            for byte in b.readBytes(length: 4)! { mix(byte) }  // type modifier
            b.moveReaderIndex(forwardBy: 2)  // format: always text in a statement's description
        }
        return hash
    }
}
