/// An error to report to a PostgreSQL client (or received from a server) as an ErrorResponse.
public struct PostgresError: Error, Equatable, Sendable, CustomStringConvertible {
    public var severity: String
    /// The five-character SQLSTATE.
    public var code: String
    public var message: String
    public var detail: String?
    public var hint: String?

    public init(severity: String = "ERROR", code: String, message: String, detail: String? = nil, hint: String? = nil) {
        self.severity = severity
        self.code = code
        self.message = message
        self.detail = detail
        self.hint = hint
    }

    public var description: String { "\(severity) \(code): \(message)" }

    /// A FATAL error: the connection is closed after it is sent.
    public static func fatal(_ code: String, _ message: String, detail: String? = nil) -> PostgresError {
        PostgresError(severity: "FATAL", code: code, message: message, detail: detail)
    }
}

/// SQLSTATE codes used by the pooler, with PostgreSQL's names.
public enum SQLState {
    public static let successfulCompletion = "00000"
    public static let protocolViolation = "08P01"
    public static let connectionFailure = "08006"
    /// sqlclient_unable_to_establish_sqlconnection: a TLS set-up or verification the server
    /// connection failed, which a retry will not fix (the pool does not wait it out).
    public static let unableToConnect = "08001"
    public static let cannotConnectNow = "57P03"
    public static let invalidPassword = "28P01"
    public static let invalidAuthorization = "28000"
    public static let invalidCatalogName = "3D000"
    public static let tooManyConnections = "53300"
    public static let featureNotSupported = "0A000"
    public static let reservedName = "42939"
    public static let queryCanceled = "57014"
    public static let adminShutdown = "57P01"
    public static let programLimitExceeded = "54000"
    public static let activeSQLTransaction = "25001"
    public static let insufficientPrivilege = "42501"
    public static let syntaxError = "42601"
    public static let duplicatePreparedStatement = "42P05"
    public static let cantChangeRuntimeParam = "55P02"
    public static let undefinedObject = "42704"
    public static let internalError = "XX000"
    public static let invalidParameterValue = "22023"
    public static let objectNotInPrerequisiteState = "55000"
}

/// Framing errors: the byte stream cannot be a valid PostgreSQL message sequence.
public enum WireError: Error, Equatable, Sendable {
    case invalidLength(Int)
    case messageTooLarge(Int, limit: Int)
    case malformed(String)
    case unsupportedProtocol(major: Int, minor: Int)

    /// The ErrorResponse a client gets for this framing error.
    public var postgresError: PostgresError {
        switch self {
        case .invalidLength(let n):
            return .fatal(SQLState.protocolViolation, "invalid message length \(n)")
        case .messageTooLarge(let n, let limit):
            return .fatal(
                SQLState.programLimitExceeded,
                "message of \(n) bytes is longer than the \(limit) allowed here (max_packet_size; before login, 65535)")
        case .malformed(let what):
            return .fatal(SQLState.protocolViolation, "malformed packet: \(what)")
        case .unsupportedProtocol(let major, let minor):
            return .fatal(
                SQLState.featureNotSupported,
                "unsupported frontend protocol \(major).\(minor): server supports 3.0 to 3.0")
        }
    }
}
