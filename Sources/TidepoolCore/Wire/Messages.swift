import NIOCore

/// Message type bytes of protocol v3.
public enum MessageType {
    // Backend
    public static let authentication = UInt8(ascii: "R")
    public static let parameterStatus = UInt8(ascii: "S")
    public static let backendKeyData = UInt8(ascii: "K")
    public static let readyForQuery = UInt8(ascii: "Z")
    public static let errorResponse = UInt8(ascii: "E")
    public static let noticeResponse = UInt8(ascii: "N")
    public static let negotiateProtocolVersion = UInt8(ascii: "v")
    public static let commandComplete = UInt8(ascii: "C")
    public static let rowDescription = UInt8(ascii: "T")
    public static let dataRow = UInt8(ascii: "D")
    public static let emptyQueryResponse = UInt8(ascii: "I")
    public static let copyInResponse = UInt8(ascii: "G")
    public static let copyOutResponse = UInt8(ascii: "H")
    public static let copyBothResponse = UInt8(ascii: "W")
    public static let notificationResponse = UInt8(ascii: "A")
    public static let parseComplete = UInt8(ascii: "1")
    public static let bindComplete = UInt8(ascii: "2")
    public static let closeComplete = UInt8(ascii: "3")
    public static let noData = UInt8(ascii: "n")
    public static let portalSuspended = UInt8(ascii: "s")
    // Frontend
    public static let query = UInt8(ascii: "Q")
    public static let sync = UInt8(ascii: "S")
    public static let functionCall = UInt8(ascii: "F")
    public static let terminate = UInt8(ascii: "X")
    public static let password = UInt8(ascii: "p")
    public static let parse = UInt8(ascii: "P")
    public static let bind = UInt8(ascii: "B")
    public static let execute = UInt8(ascii: "E")
    public static let describe = UInt8(ascii: "D")
    public static let close = UInt8(ascii: "C")
    public static let flush = UInt8(ascii: "H")
    public static let copyData = UInt8(ascii: "d")
    public static let copyDone = UInt8(ascii: "c")
    public static let copyFail = UInt8(ascii: "f")
    /// What Describe and Close name: a prepared statement or a portal.
    public static let targetStatement = UInt8(ascii: "S")
    public static let targetPortal = UInt8(ascii: "P")
    /// The one-byte answers to SSLRequest and GSSENCRequest.
    public static let encryptionAccepted = UInt8(ascii: "S")
    public static let encryptionRefused = UInt8(ascii: "N")
}

/// Transaction status carried by ReadyForQuery.
public enum TransactionStatus: UInt8, Sendable {
    case idle = 73  // 'I'
    case inTransaction = 84  // 'T'
    case failed = 69  // 'E'
}

/// Encoders for the messages the pooler itself writes. Each appends one whole message to `buffer`.
public enum Wire {
    @inlinable
    static func withMessage(_ type: UInt8?, into buffer: inout ByteBuffer, _ body: (inout ByteBuffer) -> Void) {
        if let type { buffer.writeInteger(type) }
        let lengthIndex = buffer.writerIndex
        buffer.writeInteger(Int32(0))
        body(&buffer)
        buffer.setInteger(Int32(buffer.writerIndex - lengthIndex), at: lengthIndex)
    }

    // MARK: Backend messages (pooler to client)

    public static func authenticationOk(into buffer: inout ByteBuffer) {
        withMessage(MessageType.authentication, into: &buffer) { $0.writeInteger(Int32(0)) }
    }

    public static func authenticationCleartextPassword(into buffer: inout ByteBuffer) {
        withMessage(MessageType.authentication, into: &buffer) { $0.writeInteger(Int32(3)) }
    }

    public static func authenticationMD5Password(salt: [UInt8], into buffer: inout ByteBuffer) {
        withMessage(MessageType.authentication, into: &buffer) {
            $0.writeInteger(Int32(5))
            $0.writeBytes(salt)
        }
    }

    public static func authenticationSASL(mechanisms: [String], into buffer: inout ByteBuffer) {
        withMessage(MessageType.authentication, into: &buffer) {
            $0.writeInteger(Int32(10))
            for m in mechanisms { $0.writeNullTerminatedString(m) }
            $0.writeInteger(UInt8(0))
        }
    }

    public static func authenticationSASLContinue(_ data: [UInt8], into buffer: inout ByteBuffer) {
        withMessage(MessageType.authentication, into: &buffer) {
            $0.writeInteger(Int32(11))
            $0.writeBytes(data)
        }
    }

    public static func authenticationSASLFinal(_ data: [UInt8], into buffer: inout ByteBuffer) {
        withMessage(MessageType.authentication, into: &buffer) {
            $0.writeInteger(Int32(12))
            $0.writeBytes(data)
        }
    }

    public static func parameterStatus(_ name: String, _ value: String, into buffer: inout ByteBuffer) {
        withMessage(MessageType.parameterStatus, into: &buffer) {
            $0.writeNullTerminatedString(name)
            $0.writeNullTerminatedString(value)
        }
    }

    public static func backendKeyData(processID: Int32, secretKey: Int32, into buffer: inout ByteBuffer) {
        withMessage(MessageType.backendKeyData, into: &buffer) {
            $0.writeInteger(processID)
            $0.writeInteger(secretKey)
        }
    }

    public static func readyForQuery(_ status: TransactionStatus, into buffer: inout ByteBuffer) {
        withMessage(MessageType.readyForQuery, into: &buffer) { $0.writeInteger(status.rawValue) }
    }

    /// The newest protocol version the pooler speaks for the client's major version (the whole
    /// version, major in the high 16 bits, as PostgreSQL sends it: libpq 18 refuses a bare minor
    /// number as a "downgrade to pre-3.0"), and the `_pq_.` options it does not know.
    public static func negotiateProtocolVersion(minor: Int, unrecognized: [String], into buffer: inout ByteBuffer) {
        withMessage(MessageType.negotiateProtocolVersion, into: &buffer) {
            $0.writeInteger(Int32(3 << 16 | minor))
            $0.writeInteger(Int32(unrecognized.count))
            for option in unrecognized { $0.writeNullTerminatedString(option) }
        }
    }

    public static func errorResponse(_ error: PostgresError, into buffer: inout ByteBuffer) {
        noticeOrError(MessageType.errorResponse, error, into: &buffer)
    }

    public static func noticeResponse(_ notice: PostgresError, into buffer: inout ByteBuffer) {
        noticeOrError(MessageType.noticeResponse, notice, into: &buffer)
    }

    static func noticeOrError(_ type: UInt8, _ error: PostgresError, into buffer: inout ByteBuffer) {
        withMessage(type, into: &buffer) {
            $0.writeInteger(UInt8(ascii: "S"))
            $0.writeNullTerminatedString(error.severity)
            $0.writeInteger(UInt8(ascii: "V"))
            $0.writeNullTerminatedString(error.severity)
            $0.writeInteger(UInt8(ascii: "C"))
            $0.writeNullTerminatedString(error.code)
            $0.writeInteger(UInt8(ascii: "M"))
            writeField(error.message, into: &$0)
            if let detail = error.detail {
                $0.writeInteger(UInt8(ascii: "D"))
                writeField(detail, into: &$0)
            }
            if let hint = error.hint {
                $0.writeInteger(UInt8(ascii: "H"))
                writeField(hint, into: &$0)
            }
            $0.writeInteger(UInt8(0))
        }
    }

    /// A field's text up to its NUL: a NUL inside (from a name or a file) would end the field
    /// early and let what follows pass for other fields.
    static func writeField(_ text: String, into buffer: inout ByteBuffer) {
        if text.utf8.contains(0) {
            buffer.writeNullTerminatedString(String(decoding: text.utf8.filter { $0 != 0 }, as: UTF8.self))
        } else {
            buffer.writeNullTerminatedString(text)
        }
    }

    /// Columns sent in text format; `types` gives each column's type (text for a column past its end).
    public static func rowDescription(_ columns: [String], types: [ColumnType], into buffer: inout ByteBuffer) {
        withMessage(MessageType.rowDescription, into: &buffer) {
            $0.writeInteger(Int16(columns.count))
            for (index, name) in columns.enumerated() {
                let type = index < types.count ? types[index] : .text
                $0.writeNullTerminatedString(name)
                $0.writeInteger(Int32(0))  // table oid
                $0.writeInteger(Int16(0))  // column number
                $0.writeInteger(type.rawValue)
                $0.writeInteger(type.size)
                $0.writeInteger(Int32(-1))  // type modifier
                $0.writeInteger(Int16(0))  // text format
            }
        }
    }

    /// The column types of the results the pooler makes itself, by PostgreSQL type OID.
    public enum ColumnType: Int32, Sendable {
        case text = 25
        case int4 = 23
        case int8 = 20
        case numeric = 1700

        /// pg_type.typlen: the width of a fixed-size type, -1 for a variable one.
        var size: Int16 {
            switch self {
            case .int4: 4
            case .int8: 8
            case .text, .numeric: -1
            }
        }
    }

    public static func dataRow(_ values: [String?], into buffer: inout ByteBuffer) {
        withMessage(MessageType.dataRow, into: &buffer) {
            $0.writeInteger(Int16(values.count))
            for value in values {
                if let value {
                    let lengthIndex = $0.writerIndex
                    $0.writeInteger(Int32(0))
                    let written = $0.writeString(value)
                    $0.setInteger(Int32(written), at: lengthIndex)
                } else {
                    $0.writeInteger(Int32(-1))
                }
            }
        }
    }

    public static func commandComplete(_ tag: String, into buffer: inout ByteBuffer) {
        withMessage(MessageType.commandComplete, into: &buffer) { $0.writeNullTerminatedString(tag) }
    }

    public static func emptyQueryResponse(into buffer: inout ByteBuffer) {
        withMessage(MessageType.emptyQueryResponse, into: &buffer) { _ in }
    }

    // MARK: Frontend messages (pooler to server)

    public static func startupMessage(parameters: [(String, String)], into buffer: inout ByteBuffer) {
        withMessage(nil, into: &buffer) {
            $0.writeInteger(Int32(3 << 16))
            for (name, value) in parameters {
                $0.writeNullTerminatedString(name)
                $0.writeNullTerminatedString(value)
            }
            $0.writeInteger(UInt8(0))
        }
    }

    public static func cancelRequest(processID: Int32, secretKey: Int32, into buffer: inout ByteBuffer) {
        withMessage(nil, into: &buffer) {
            $0.writeInteger(StartupPacket.cancelRequestCode)
            $0.writeInteger(processID)
            $0.writeInteger(secretKey)
        }
    }

    public static func sslRequest(into buffer: inout ByteBuffer) {
        withMessage(nil, into: &buffer) { $0.writeInteger(StartupPacket.sslRequestCode) }
    }

    public static func passwordMessage(_ password: String, into buffer: inout ByteBuffer) {
        withMessage(MessageType.password, into: &buffer) { $0.writeNullTerminatedString(password) }
    }

    public static func saslInitialResponse(mechanism: String, data: [UInt8], into buffer: inout ByteBuffer) {
        withMessage(MessageType.password, into: &buffer) {
            $0.writeNullTerminatedString(mechanism)
            $0.writeInteger(Int32(data.count))
            $0.writeBytes(data)
        }
    }

    public static func saslResponse(_ data: [UInt8], into buffer: inout ByteBuffer) {
        withMessage(MessageType.password, into: &buffer) { $0.writeBytes(data) }
    }

    public static func query(_ sql: String, into buffer: inout ByteBuffer) {
        withMessage(MessageType.query, into: &buffer) { $0.writeNullTerminatedString(sql) }
    }

    public static func terminate(into buffer: inout ByteBuffer) {
        withMessage(MessageType.terminate, into: &buffer) { _ in }
    }
}

/// Decoders for the few message bodies the pooler reads. `body` is the message without its
/// type byte and length.
public enum WireDecode {
    /// Fields of an ErrorResponse or NoticeResponse.
    public static func errorFields(_ body: ByteBuffer) -> PostgresError {
        var body = body
        var fields: [UInt8: String] = [:]
        while let tag = body.readInteger(as: UInt8.self), tag != 0 {
            guard let value = body.readNullTerminatedString() else { break }
            fields[tag] = value
        }
        return PostgresError(
            severity: fields[UInt8(ascii: "V")] ?? fields[UInt8(ascii: "S")] ?? "ERROR",
            code: fields[UInt8(ascii: "C")] ?? SQLState.internalError,
            message: fields[UInt8(ascii: "M")] ?? "unknown error",
            detail: fields[UInt8(ascii: "D")],
            hint: fields[UInt8(ascii: "H")])
    }

    public static func parameterStatus(_ body: ByteBuffer) -> (String, String)? {
        var body = body
        guard let name = body.readNullTerminatedString(), let value = body.readNullTerminatedString() else {
            return nil
        }
        return (name, value)
    }

    /// The text of a simple Query message body.
    public static func queryText(_ body: ByteBuffer) -> String? {
        var body = body
        return body.readNullTerminatedString()
    }
}
