import NIOCore

/// Session state in transaction and statement pooling (`SessionState`): the client's statements
/// are read for what they leave behind, settings are replayed on each lend, and what cannot be
/// replayed keeps the client on its server.
extension ClientSession {
    /// A client message's header was read (`bytes` from `bodyStart` holds what has arrived of its
    /// body). Reads a Query's or Parse's SQL, or the statement a Bind names, for session-state
    /// effects. False when the message must be waited for whole first.
    @inline(__always)
    mutating func sessionStatement(_ type: UInt8, _ bytes: ByteBuffer, bodyStart: Int) -> Bool {
        guard type == MessageType.query || type == MessageType.parse || type == MessageType.bind else { return true }
        if type == MessageType.bind, sessionState?.namedEffects.isEmpty ?? true { return true }
        return sessionStatementSlow(type, bytes, bodyStart: bodyStart)
    }

    mutating func sessionStatementSlow(_ type: UInt8, _ bytes: ByteBuffer, bodyStart: Int) -> Bool {
        let length = Int(bytes.getInteger(at: bodyStart - 4, as: Int32.self) ?? 4) - 4
        let available = min(length, bytes.writerIndex - bodyStart)
        // A message too long to hold is read from what has come (its leading statements).
        if available < length, length <= bufferLimit { return false }
        guard let body = bytes.getSlice(at: bodyStart, length: available) else { return true }
        sessionMessage(type, body: body, whole: available == length)
        return true
    }

    /// The body (or its start, when not `whole`) of a Query, Parse or Bind.
    mutating func sessionMessage(_ type: UInt8, body: ByteBuffer, whole: Bool) {
        var effects: [SessionEffect] = []
        var statement: String? = nil
        body.withUnsafeReadableBytes { raw in
            var sql = raw
            if type != MessageType.query {
                // Parse: statement name, then the SQL. Bind: portal name, then statement name.
                guard let nul = raw.firstIndex(of: 0) else { return }
                if type == MessageType.bind {
                    let rest = UnsafeRawBufferPointer(rebasing: raw[(nul + 1)...])
                    guard let end = rest.firstIndex(of: 0) else { return }
                    statement = String(decoding: UnsafeRawBufferPointer(rebasing: rest[..<end]), as: UTF8.self)
                    return
                }
                statement = String(decoding: UnsafeRawBufferPointer(rebasing: raw[..<nul]), as: UTF8.self)
                sql = UnsafeRawBufferPointer(rebasing: raw[(nul + 1)...])
                if let end = sql.firstIndex(of: 0) { sql = UnsafeRawBufferPointer(rebasing: sql[..<end]) }
            }
            effects = SessionStatements.effects(sql)
        }
        if prepared != nil, !effects.isEmpty {
            // SQL PREPARE is kept per client by the prepared-statement tracker: nothing to pin.
            effects.removeAll { effect in
                switch effect {
                case .pin(.preparedStatement, _), .unpin(.preparedStatement, _), .unpinAll(.preparedStatement): true
                default: false
                }
            }
        }
        if !whole, type == MessageType.query, effects.isEmpty == false || body.readableBytes > 0 {
            // What follows the part read is not known: a long Query with more statements pins.
            if effects.contains(where: { !$0.isTransactionControl }) { effects.append(.pin(.unknown, key: "")) }
        }
        switch type {
        case MessageType.bind:
            if let statement, let named = sessionState?.namedEffects[statement] { sessionState!.statementSent(named) }
        case MessageType.parse where statement?.isEmpty == false:
            // A named statement's effects come with each Bind of it.
            if effects.isEmpty {
                if sessionState?.namedEffects[statement!] != nil { sessionState!.namedEffects[statement!] = nil }
            } else {
                stateOfSession.namedEffects[statement!] = effects
            }
        default:
            if !effects.isEmpty { stateOfSession.statementSent(effects) }
        }
    }

    /// `sessionState`, made when first needed.
    var stateOfSession: SessionState {
        mutating get {
            if let sessionState { return sessionState }
            let made = SessionState()
            sessionState = made
            return made
        }
    }

    /// Counts a client message for the transaction tracker, and ends a request's session effects.
    @inline(__always)
    mutating func clientSent(_ type: UInt8) {
        tracker.clientSent(type)
        if let sessionState, type == MessageType.query || type == MessageType.sync || type == MessageType.functionCall {
            sessionState.requestSent(outstanding: tracker.outstanding - 1)
        }
    }

    /// A ReadyForQuery for one of the client's requests.
    mutating func readyForQuery(_ status: TransactionStatus, into actions: inout Actions) {
        let before = tracker.status
        tracker.serverReady(status)
        guard let sessionState, sessionState.awaitsReplies else { return }
        var serverSettings = server?.settings ?? [:]
        let wasPinned = sessionState.isPinned
        sessionState.ready(before: before, after: status, server: &serverSettings)
        if sessionState.isPinned != wasPinned { actions.append(.pinChanged(pinned: !wasPinned)) }
        if let server {
            server.settings = serverSettings
            if sessionState.statementsDiscarded {
                server.statements.removeAll()
                sessionState.statementsForgotten()
            }
        }
    }

    /// Whether the client keeps its server for its session state.
    var isPinned: Bool { sessionState?.isPinned ?? false }

    /// The statements that make `server`'s settings the client's, after its tracked parameters:
    /// RESETs first (a RESET of a tracked parameter lets `parameterSync` set the client's value).
    mutating func settingsSync(
        _ server: ServerSessionState, into actions: inout Actions
    ) -> (resets: String, sets: String) {
        let settings = sessionState?.settings ?? []
        guard !settings.isEmpty || !server.settings.isEmpty else { return ("", "") }
        var resets = ""
        var sets = ""
        for name in server.settings.keys where !settings.contains(where: { $0.name == name }) {
            resets += "RESET \(SessionStatements.quotedName(name));"
            server.settings[name] = nil
            if server.parameters[name] != nil { server.parameters[name] = nil }
        }
        var count = 0
        for setting in settings where server.settings[setting.name] != setting.statement {
            sets += setting.statement + ";"
            server.settings[setting.name] = setting.statement
            count += 1
        }
        if count > 0 { actions.append(.settingsReplayed(count)) }
        return (resets, sets)
    }
}
