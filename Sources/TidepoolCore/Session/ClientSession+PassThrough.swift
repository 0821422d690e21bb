import NIOCore

/// Replication connections (`replication=true` or `database` in the StartupMessage) are not
/// pooled, as in PgBouncer 1.23+: once the client is authenticated, a server connection of its
/// own is opened with its replication parameter, and from then on every byte passes through both
/// ways unread (the replication protocol's CopyBoth stream included). Closing either side closes
/// the other.
extension ClientSession {
    /// The replication connection's server logged in: the client gets AuthenticationOk, the
    /// server's parameters and the pooler's cancel key, then everything passes through.
    public mutating func passThroughStarted(
        _ server: ServerSessionState, cancelKey: (Int32, Int32), into actions: inout Actions
    ) {
        guard isAwaitingWelcome, replication != nil else { return }
        state = .passThrough(server)
        resetServerFlow()
        var out = ByteBufferAllocator().buffer(capacity: 512)
        Wire.authenticationOk(into: &out)
        for (name, value) in server.parameters.sorted(by: { $0.key < $1.key }) {
            Wire.parameterStatus(name, value, into: &out)
        }
        Wire.backendKeyData(processID: cancelKey.0, secretKey: cancelKey.1, into: &out)
        Wire.readyForQuery(.idle, into: &out)
        write(out, into: &actions)
        actions.append(.flushClient)
        loginFinished(into: &actions)
        // What the client sent meanwhile goes first.
        if !pending.isEmpty {
            toServer += pending
            pending.removeAll()
            flow.pendingBytes = 0
        }
        if let kept = inbound.take() { toServer.append(kept) }
        if !toServer.isEmpty { actions.append(.sendToServer) }
    }

    /// The replication connection's server could not be opened: the client gets its error.
    public mutating func passThroughFailed(_ error: PostgresError, into actions: inout Actions) {
        guard isAwaitingWelcome else { return }
        var fatal = error
        fatal.severity = "FATAL"
        close(fatal, reason: "replication server connection failed", into: &actions)
    }

    /// Client bytes of a replication connection: all of them go to its server.
    mutating func passThroughClientBytes(_ buffer: inout ByteBuffer) {
        toServer.append(buffer.readSlice(length: buffer.readableBytes)!)
    }

    /// Server bytes of a replication connection: all of them go to the client as they are.
    mutating func passThroughServerBytes(_ data: ByteBuffer, into actions: inout Actions) {
        traffic.sent += data.readableBytes
        serverBuffer = data
        actions.append(.writeServerBytes(start: data.readerIndex, length: data.readableBytes))
    }
}
