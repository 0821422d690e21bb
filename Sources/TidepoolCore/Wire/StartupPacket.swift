import NIOCore

/// The first packet a client sends: it has a length but no type byte.
public enum StartupPacket: Equatable, Sendable {
    case startup(minorVersion: Int, parameters: [String: String], unrecognizedOptions: [String])
    case sslRequest
    case gssEncRequest
    case cancel(processID: Int32, secretKey: Int32)

    static let sslRequestCode: Int32 = 80_877_103
    static let gssEncRequestCode: Int32 = 80_877_104
    static let cancelRequestCode: Int32 = 80_877_102
    static let maxStartupLength = 10_000

    /// Parses one startup packet from the front of `buffer`.
    /// Returns nil (consuming nothing) when the packet is not complete yet.
    public static func parse(from buffer: inout ByteBuffer) throws(WireError) -> StartupPacket? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: Int32.self) else { return nil }
        guard length >= 8 else { throw .invalidLength(Int(length)) }
        guard length <= maxStartupLength else { throw .invalidLength(Int(length)) }
        guard buffer.readableBytes >= Int(length) else { return nil }
        var packet = buffer.readSlice(length: Int(length))!
        packet.moveReaderIndex(forwardBy: 4)
        let code = packet.readInteger(as: Int32.self)!
        switch code {
        case sslRequestCode:
            guard length == 8 else { throw .malformed("SSLRequest of length \(length)") }
            return .sslRequest
        case gssEncRequestCode:
            guard length == 8 else { throw .malformed("GSSENCRequest of length \(length)") }
            return .gssEncRequest
        case cancelRequestCode:
            guard length == 16, let pid = packet.readInteger(as: Int32.self),
                let key = packet.readInteger(as: Int32.self)
            else { throw .malformed("CancelRequest of length \(length)") }
            return .cancel(processID: pid, secretKey: key)
        default:
            let major = Int(code >> 16)
            let minor = Int(code & 0xFFFF)
            guard major == 3 else { throw .unsupportedProtocol(major: major, minor: minor) }
            var parameters: [String: String] = [:]
            var unrecognized: [String] = []
            while true {
                guard let name = packet.readNullTerminatedString() else {
                    throw .malformed("startup parameters are not terminated")
                }
                if name.isEmpty { break }
                guard let value = packet.readNullTerminatedString() else {
                    throw .malformed("startup parameter \(name) has no value")
                }
                if name.hasPrefix("_pq_.") {
                    unrecognized.append(name)
                } else {
                    parameters[name] = value
                }
            }
            guard packet.readableBytes == 0 else { throw .malformed("trailing bytes after startup parameters") }
            return .startup(minorVersion: minor, parameters: parameters, unrecognizedOptions: unrecognized)
        }
    }
}
