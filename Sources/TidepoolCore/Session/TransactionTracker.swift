/// Follows one client-server link closely enough to know when the server may go back to the pool:
/// every Query, Sync and FunctionCall the client sends is answered by one ReadyForQuery, and the
/// server is clean only when none is outstanding and the last one said the transaction is idle.
public struct TransactionTracker: Sendable {
    public internal(set) var outstanding = 0
    public internal(set) var status = TransactionStatus.idle
    /// Extended-query messages sent after the last Query, Sync or FunctionCall (an unsynced
    /// Parse/Bind/Execute): the server is busy with them until a Sync.
    public internal(set) var sentUnsynced = false

    public init() {}

    /// Classifies a client message header: counts those that ask for a ReadyForQuery.
    public mutating func clientSent(_ type: UInt8) {
        switch type {
        case MessageType.query, MessageType.sync, MessageType.functionCall:
            outstanding += 1
            sentUnsynced = false
        case MessageType.copyData, MessageType.copyDone, MessageType.copyFail, MessageType.flush:
            break  // part of the COPY or request already counted
        default:
            sentUnsynced = true
        }
    }

    /// Records a ReadyForQuery from the server.
    public mutating func serverReady(_ status: TransactionStatus) {
        if outstanding > 0 { outstanding -= 1 }
        self.status = status
    }

    /// Nothing outstanding and no transaction open: the server can serve another client.
    public var isClean: Bool { outstanding == 0 && !sentUnsynced && status == .idle }

    /// Nothing outstanding, whatever the transaction state.
    public var isQuiet: Bool { outstanding == 0 && !sentUnsynced }

    public mutating func reset() { self = TransactionTracker() }
}
