import NIOCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Session state in transaction and statement pooling (`SessionState`): the client's statements
/// are read for what they leave behind, settings are replayed on each lend, and what cannot be
/// replayed keeps the client on its server.
extension ClientSession {
    /// A client message's header was read (`bytes` from `bodyStart` holds what has arrived of its
    /// body). Reads a Query's or Parse's SQL, or the statement a Bind names, for session-state
    /// effects into `state`. False when the message must be waited for whole first (up to `limit`
    /// bytes). Static, on the stored properties it needs, so that the message scanner's closure
    /// can call it while the scanner runs.
    @inline(__always)
    static func statementRead(
        _ type: UInt8, _ bytes: ByteBuffer, bodyStart: Int, limit: Int, preparedOn: Bool,
        state: inout SessionState?, lastParse: inout [UInt8], standardStrings: Bool, refuses: Bool,
        refusal: inout PinReason?
    ) -> Bool {
        guard type == MessageType.query || type == MessageType.parse || type == MessageType.bind else { return true }
        if type == MessageType.bind, state?.namedEffects.isEmpty ?? true { return true }
        return statementReadSlow(
            type, bytes, bodyStart: bodyStart, limit: limit, preparedOn: preparedOn, state: &state,
            lastParse: &lastParse, standardStrings: standardStrings, refuses: refuses, refusal: &refusal)
    }

    @inline(never)
    static func statementReadSlow(
        _ type: UInt8, _ bytes: ByteBuffer, bodyStart: Int, limit: Int, preparedOn: Bool,
        state: inout SessionState?, lastParse: inout [UInt8], standardStrings: Bool, refuses: Bool,
        refusal: inout PinReason?
    ) -> Bool {
        let length = Int(bytes.getInteger(at: bodyStart - 4, as: Int32.self) ?? 4) - 4
        let available = min(length, bytes.writerIndex - bodyStart)
        // A message too long to hold is read from what has come (its leading statements).
        if available < length, length <= limit { return false }
        let offset = bodyStart - bytes.readerIndex
        guard offset >= 0, available >= 0 else { return true }
        bytes.withUnsafeReadableBytes { raw in
            readMessage(
                type, body: UnsafeRawBufferPointer(rebasing: raw[offset..<offset + available]),
                whole: available == length, preparedOn: preparedOn, state: &state, lastParse: &lastParse,
                standardStrings: standardStrings, refuses: refuses, refusal: &refusal)
        }
        return true
    }

    /// A whole message the session inspects itself: a Query's or Parse's effects, a Bind's of the
    /// named statement it runs.
    mutating func sessionMessage(_ type: UInt8, body: ByteBuffer, whole: Bool) {
        switch type {
        case MessageType.query, MessageType.parse: break
        case MessageType.bind where !(sessionState?.namedEffects.isEmpty ?? true): break
        default: return
        }
        let preparedOn = prepared != nil
        body.withUnsafeReadableBytes {
            Self.readMessage(
                type, body: $0, whole: whole, preparedOn: preparedOn, state: &sessionState, lastParse: &lastPlainParse,
                standardStrings: standardStrings, refuses: refusesPins, refusal: &refusal)
        }
    }

    /// The body (or its start, when not `whole`) of a Query, Parse or Bind: its effects go to
    /// `state` (made when first needed). `lastParse` is the SQL of the last Parse found to have
    /// none: drivers send the same unnamed statement again and again, and a byte comparison is
    /// cheaper than reading it again.
    static func readMessage(
        _ type: UInt8, body raw: UnsafeRawBufferPointer, whole: Bool, preparedOn: Bool, state: inout SessionState?,
        lastParse: inout [UInt8], standardStrings: Bool = true, refuses: Bool, refusal: inout PinReason?
    ) {
        var effects: [SessionEffect] = []
        var statement: String? = nil
        ({ () in
            var sql = raw
            if type != MessageType.query {
                // Parse: statement name, then the SQL. Bind: portal name, then statement name.
                guard let nul = raw.index(of: 0, from: 0) else { return }
                if type == MessageType.bind {
                    guard let end = raw.index(of: 0, from: nul + 1) else { return }
                    statement = Self.text(raw, nul + 1, end)
                    return
                }
                if nul > 0 { statement = Self.text(raw, 0, nul) }
                let end = raw.index(of: 0, from: nul + 1) ?? raw.count
                sql = UnsafeRawBufferPointer(rebasing: raw[(nul + 1)..<end])
                if sql.count == lastParse.count, sql.count > 0,
                    lastParse.withUnsafeBytes({ memcmp($0.baseAddress!, sql.baseAddress!, sql.count) == 0 })
                {
                    return
                }
            }
            effects = SessionStatements.effects(
                sql, oneStatement: type == MessageType.parse, standardStrings: standardStrings)
            if type == MessageType.parse, whole, effects.isEmpty, sql.count <= Self.lastParseLimit {
                lastParse.removeAll(keepingCapacity: true)
                lastParse.append(contentsOf: sql)
            }
        })()
        if !effects.isEmpty, effects.contains(where: \.isReservedName) {
            // The pooler's own statements are out of the clients' reach, whatever session_state says.
            refusal = .reservedName
            return
        }
        if preparedOn, type == MessageType.query, !effects.isEmpty {
            // SQL PREPARE in a simple Query is kept per client by the prepared-statement tracker:
            // nothing to pin. In a Parse (pgjdbc sends every statement so) it is not, and pins.
            effects.removeAll { effect in
                switch effect {
                case .pin(.preparedStatement, _), .unpin(.preparedStatement, _), .unpinAll(.preparedStatement): true
                default: false
                }
            }
        }
        if !whole, type == MessageType.query || !effects.isEmpty {
            // A message longer than max_buffered_bytes goes through as it arrives, and only its
            // start is read: what follows (more statements, the rest of a value) is not known,
            // so the client keeps its server, which is cleaned before anyone else gets it.
            effects.append(.pin(.unknown, key: ""))
        }
        if refuses, whole,
            let refused = effects.lazy.compactMap({ effect -> PinReason? in
                if case .pin(let reason, _) = effect { return reason }
                return nil
            }).first
        {
            // session_state = refuse: it is not run, so none of its effects count.
            refusal = refused
            return
        }
        switch type {
        case MessageType.bind:
            if let statement, let named = state?.namedEffects[statement] { state!.statementSent(named) }
        case MessageType.parse where statement?.isEmpty == false:
            // A named statement's effects come with each Bind of it.
            if effects.isEmpty {
                if state?.namedEffects[statement!] != nil { state!.namedEffects[statement!] = nil }
            } else {
                made(&state).namedEffects[statement!] = effects
            }
        default:
            if !effects.isEmpty { made(&state).statementSent(effects) }
        }
    }

    /// The longest Parse SQL kept for the comparison (`readMessage`).
    static let lastParseLimit = 512

    static func text(_ raw: UnsafeRawBufferPointer, _ from: Int, _ to: Int) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: raw[from..<to]), as: UTF8.self)
    }

    /// A refused statement (session_state = refuse) as one that fails on the server with 0A000 in
    /// its place, so that the error comes in order among the replies and fails the transaction
    /// as the statement would have. A Parse keeps its statement name (and loses its parameter
    /// types: a Bind with parameters then fails on the count instead).
    static func refusedMessage(_ type: UInt8, body: ByteBuffer, reason: PinReason) -> ByteBuffer {
        let sql =
            reason == .reservedName
            ? SessionStatements.failing(code: SQLState.reservedName, message: PreparedStatementTracker.reservedMessage)
            : SessionStatements.failing(
                code: SQLState.featureNotSupported,
                message: "\(reason.statement) keeps session state, which session_state = refuse does not allow",
                hint: "pool this client in session mode, or set session_state = track")
        var out = ByteBufferAllocator().buffer(capacity: sql.utf8.count + 64)
        if type == MessageType.parse {
            var b = body
            let name = b.readNullTerminatedString() ?? ""
            out.writeInteger(MessageType.parse)
            let start = out.writerIndex
            out.writeInteger(Int32(0))
            out.writeNullTerminatedString(name)
            out.writeNullTerminatedString(sql)
            out.writeInteger(Int16(0))
            out.setInteger(Int32(out.writerIndex - start), at: start)
        } else {
            Wire.query(sql, into: &out)
        }
        return out
    }

    /// `state`, made when first needed.
    static func made(_ state: inout SessionState?) -> SessionState {
        if let state { return state }
        let made = SessionState()
        state = made
        return made
    }

    /// `sessionState`, made when first needed.
    var stateOfSession: SessionState {
        mutating get { Self.made(&sessionState) }
    }

    /// Counts a client message for the transaction tracker, and ends a request's session effects.
    @inline(__always)
    static func clientSent(_ type: UInt8, tracker: inout TransactionTracker, state: SessionState?) {
        tracker.clientSent(type)
        if let state, type == MessageType.query || type == MessageType.sync || type == MessageType.functionCall {
            state.requestSent(outstanding: tracker.outstanding - 1)
        }
    }

    /// A ReadyForQuery for one of the client's requests; `fromServer` when the server sent it
    /// (it may then wait for the pool's listener, `channelsSettled`).
    mutating func readyForQuery(_ status: TransactionStatus, fromServer: Bool = false, into actions: inout Actions) {
        let before = tracker.status
        tracker.serverReady(status)
        guard let sessionState, sessionState.awaitsReplies || !sessionState.heldReports.isEmpty else { return }
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
        if sessionState.resets.any || !sessionState.heldReports.isEmpty || !sessionState.serverDefaults.isEmpty {
            parametersSettled(sessionState, into: &actions)
        }
        if sessionState.channelsChanged { channelsSettled(sessionState, mayHold: fromServer, into: &actions) }
        if !sessionState.selfNotified.isEmpty {
            // Only channels still listened on once the transaction is over get the notification.
            let awaited = sessionState.selfNotified.intersection(sessionState.channels)
            if fromServer, readyHold == .none, !awaited.isEmpty {
                readyHold = .held
                waitingOwnNotification = true
                sessionState.awaitingNotify = awaited
                sessionState.notifyWaitSince = nil
                actions.append(.watchClock)
            }
            sessionState.selfNotified.removeAll()
        }
    }

    /// A settled request reset parameters or its reports were held: the client is shown what
    /// PostgreSQL would show it. A reset parameter goes back to the client's startup value (not
    /// the server's default, which is what the server reports), one that was set takes the
    /// server's report.
    mutating func parametersSettled(_ sessionState: SessionState, into actions: inout Actions) {
        let resets = sessionState.takeResets()
        if let resets, tracker.status == .inTransaction { sessionState.localSync = localSync(resets, sessionState) }
        let held = sessionState.heldReports
        sessionState.heldReports.removeAll()
        if let server {
            for name in sessionState.serverDefaults where server.parameters[name] != nil {
                server.parameters[name] = nil
            }
        }
        sessionState.serverDefaults.removeAll()
        for name in StartupParameters.tracked {
            let lower = name.lowercased()
            let reported = !StartupParameters.unreported.contains(name)
            var value = wanted[name]
            if let resets, resets.names[lower] ?? resets.all {
                if let first = startupParameters[name] {
                    value = first
                } else if reported {
                    value = held[name] ?? server?.parameters[name] ?? value
                } else {
                    value = nil
                }
            } else if let report = held[name] {
                value = report
            } else {
                continue
            }
            guard value != wanted[name] else { continue }
            wanted[name] = value
            if reported, let value {
                var out = ByteBufferAllocator().buffer(capacity: name.utf8.count + value.utf8.count + 7)
                Wire.parameterStatus(name, value, into: &out)
                write(out, into: &actions)
            }
        }
        followStandardStrings()
    }

    /// Inside a transaction block a reset leaves the server's defaults where PostgreSQL would
    /// have the client's startup values: they are set for the rest of the transaction (as SET
    /// LOCAL, so that they go with it whether it commits or rolls back; a commit is then followed
    /// by the usual sync).
    func localSync(_ resets: SessionState.Resets, _ sessionState: SessionState) -> String? {
        var sql = ""
        func reset(_ name: String) -> Bool { resets.names[name.lowercased()] ?? resets.all }
        for name in StartupParameters.tracked where reset(name) {
            guard let value = startupParameters[name] else { continue }
            sql += "SELECT pg_catalog.set_config(\(name.sqlLiteral), \(value.sqlLiteral), true);"
        }
        for (name, value) in sessionState.startupValues where reset(name) {
            sql += "SELECT pg_catalog.set_config(\(name.sqlLiteral), \(value.sqlLiteral), true);"
        }
        return sql.isEmpty ? nil : sql
    }

    /// Sends the pooler's own `sql` to `server`, its answers not shown, ahead of anything the
    /// client sent: the client's bytes wait for its ReadyForQuery.
    mutating func sendSwallowed(
        _ sql: String, to server: ServerSessionState, spellings: [String: String] = [:], into actions: inout Actions
    ) {
        var out = ByteBufferAllocator().buffer(capacity: sql.utf8.count + 8)
        Wire.query(sql, into: &out)
        server.sync = ParameterSync(spellings: spellings)
        toServer.insert(out, at: 0)
        actions.append(.sendToServer)
    }

    /// A reset was committed on a server the client keeps: the server is made the client's again
    /// (as at a lend), its answers not shown.
    mutating func resyncServer(into actions: inout Actions) {
        sessionState?.resyncDue = false
        guard case .linked(let server) = state else { return }
        let settings = settingsSync(server, into: &actions)
        let parameters = parameterSync(server)
        let sync = settings.resets + (parameters?.sets ?? "") + settings.sets
        guard !sync.isEmpty else { return }
        sendSwallowed(sync, to: server, spellings: parameters?.spellings ?? [:], into: &actions)
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
        if server.settings["session_authorization"]
            != settings.last(where: { $0.name == "session_authorization" })?
            .statement
        {
            // Changing the session authorization ends the server's SET ROLE: made again after it.
            server.settings["role"] = nil
        }
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
