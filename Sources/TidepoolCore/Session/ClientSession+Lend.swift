import NIOCore

extension ClientSession {
    /// What a lend is for.
    public enum Lend: Equatable, Sendable {
        /// The client uses the server: link them.
        case linked
        /// The client was waiting only to learn the pool's parameters (its welcome): the server
        /// goes back (`.releaseServer`) and the client is welcomed with them (`welcome`).
        case parametersOnly
        /// The client no longer wants a server (it left or was cancelled meanwhile): it goes back.
        case unwanted
    }

    /// The pool lent the queued client a server.
    public mutating func lent(
        _ server: ServerSessionState, now: NIODeadline, statementCapacity: Int? = nil,
        isKnownStatement: (String) -> Bool, into actions: inout Actions
    ) -> Lend {
        guard case .waiting(let waitStart) = state else {
            actions.append(.releaseServer(reusable: true))
            return isAwaitingWelcome ? .parametersOnly : .unwanted
        }
        // max_prepared_statements as it is now (SET, RELOAD), applied by the server's owner.
        if let statementCapacity, server.statements.capacity != statementCapacity {
            server.statements.resize(to: statementCapacity)
        }
        server.scanner = MessageScanner(maxMessageLength: scanner.maxMessageLength)
        server.kept = KeptBytes()
        server.sync = nil
        beginLease(server, waitStart: waitStart)
        state = .linked(server)
        traffic.serverAssignments += 1
        let waited = Int((now - waitStart).nanoseconds / 1000)
        traffic.waitTime += waited
        recordTiming(.wait, waited, into: &actions)
        if let timeoutClock {
            timeoutClock.linkedAt = now
            timeoutClock.queryStartedAt = tracker.outstanding > 0 ? now : nil
            timeoutClock.quietSince = nil
        }
        resetServerFlow()
        let settings = settingsSync(server, into: &actions)
        let parameters = parameterSync(server)
        if !settings.resets.isEmpty || parameters != nil || !settings.sets.isEmpty {
            sendSwallowed(
                settings.resets + (parameters?.sets ?? "") + settings.sets, to: server,
                spellings: parameters?.spellings ?? [:], into: &actions)
        } else {
            flushPending(now: now, isKnownStatement: isKnownStatement, into: &actions)
        }
        return .linked
    }

    /// The SETs that make the server's tracked parameters the client's, in one Query; nil when they
    /// already agree. The server is taken to hold the values from now on; `spellings` are the
    /// server's values before, of those it reports (`ParameterSync`).
    mutating func parameterSync(_ server: ServerSessionState) -> (sets: String, spellings: [String: String])? {
        guard server.$parameters != $wanted else { return nil }
        var sets = ""
        var spellings: [String: String] = [:]
        for name in StartupParameters.tracked {
            // Parameters the server does not report (search_path) are known only once set here.
            guard let value = wanted[name] else {
                // Set by the client before (search_path is not reported): the server's default again.
                if server.parameters[name] != nil {
                    sets += "RESET \(name);"
                    server.parameters[name] = nil
                }
                continue
            }
            guard server.parameters[name] != value else { continue }
            if let before = server.parameters[name], !StartupParameters.unreported.contains(name) {
                spellings[name] = before  // unless the server reports a change
            }
            // set_config takes the value as the startup packet gave it: `SET search_path = 'a,b'`
            // would name one schema "a,b".
            sets += "SELECT pg_catalog.set_config(\(name.sqlLiteral), \(value.sqlLiteral), false);"
            server.parameters[name] = value
        }
        return sets.isEmpty ? nil : (sets, spellings)
    }

    /// What the client sent while it waited goes to the server, now that it is linked.
    mutating func flushPending(
        now: NIODeadline, isKnownStatement: (String) -> Bool = { _ in false }, into actions: inout Actions
    ) {
        if prepared != nil, var kept = inbound.take() {
            // Rewritten now that the server's statements are known.
            do {
                try clientBytes(&kept, now: now, isKnownStatement: isKnownStatement, into: &actions)
            } catch {
                close(error.postgresError, reason: "bad packet", into: &actions)
                return
            }
            if kept.readableBytes > 0, !isClosed { stash(&kept) }
            guard isLinked else { return }
        }
        if !pending.isEmpty {
            // Held back while waiting: goes first.
            toServer.insert(contentsOf: pending, at: 0)
            pending.removeAll(keepingCapacity: true)
            flow.pendingBytes = 0
        }
        if !toServer.isEmpty {
            markSent(now: now)
            actions.append(.sendToServer)
        }
        // Requests kept until now (prepared statements tracked) start query_timeout's count here.
        if let clock = timeoutClock, tracker.outstanding > 0, clock.queryStartedAt == nil { clock.queryStartedAt = now }
    }

    /// The client has waited query_wait_notify: it is told it is queued, in PgBouncer's words.
    public mutating func waitNotice(into actions: inout Actions) {
        guard isWaiting else { return }
        var out = ByteBufferAllocator().buffer(capacity: 128)
        Wire.noticeResponse(
            PostgresError(
                severity: "NOTICE", code: SQLState.successfulCompletion,
                message: "No server connection available in postgres backend, client being queued"),
            into: &out)
        write(out, into: &actions)
        actions.append(.flushClient)
    }

    /// The pool could not lend a server (query_wait_timeout, pool closed, server login refused).
    /// True when it closed the client (one still waiting, or logging in).
    @discardableResult
    public mutating func waitFailed(_ error: PoolError, into actions: inout Actions) -> Bool {
        guard isWaiting || isAwaitingWelcome else { return false }
        var e = error.postgresError
        e.severity = "FATAL"
        close(e, reason: e.message, into: &actions)
        return true
    }

    /// server_fast_close (session pooling): the server this session holds must be replaced
    /// (RECONNECT, or a RELOAD that changed its database): the client is closed now if it is
    /// between transactions, else at the end of its transaction, so that no session runs on
    /// the old server for long.
    public mutating func endAtTransactionEnd(now: NIODeadline, into actions: inout Actions) {
        guard isLinked else { return }
        if tracker.status == .idle, tracker.isQuiet {
            endSessionNow(now: now, into: &actions)
        } else {
            endsAtTransactionEnd = true
        }
    }

    mutating func endSessionNow(now: NIODeadline, into actions: inout Actions) {
        unlink(now: now, reusable: false, into: &actions)
        close(
            .fatal(SQLState.adminShutdown, "database configuration changed (server_fast_close)"),
            reason: "database configuration changed", into: &actions)
    }
}
