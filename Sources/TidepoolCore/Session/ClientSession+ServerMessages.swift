import NIOCore

extension ClientSession {
    /// Bytes from the linked server. What is passed on unchanged is written as one slice of the
    /// server's bytes per run (a reply and its ReadyForQuery usually arrive in one read and leave
    /// in one write); anything the pooler writes itself ends the run first, to keep the order.
    public mutating func serverBytes(
        _ data: ByteBuffer, now: NIODeadline, into actions: inout Actions
    ) {
        guard case .linked(let server) = state else {
            if isPassingThrough { passThroughServerBytes(data, into: &actions) }
            return
        }
        traffic.sent += data.readableBytes
        var buffer = data
        if readyHold == .held {
            // Kept behind the held ReadyForQuery (`listenConfirmed`).
            server.kept.keep(&buffer)
            return
        }
        server.kept.prepend(to: &buffer)
        if server.unanswered, server.sync == nil {
            // The first answer to the client's bytes on this server (`ClientSession+Replay`).
            if Self.isGoingAway(buffer) {
                // Not the client's: its connection is not over (`serverLost`).
                leaseStart!.goneBeforeAnswer = true
                return
            }
            leaseAnswered(server)
        }
        serverBuffer = buffer
        var run = ServerBytesRun()
        do {
            scan: while true {
                let chunkStart = buffer.readerIndex
                guard
                    let chunk = try server.scanner.next(
                        from: &buffer,
                        classify: { type in
                            if type == MessageType.readyForQuery || type == MessageType.parameterStatus
                                || type == MessageType.notificationResponse
                            {
                                return .inspect
                            }
                            if type == MessageType.errorResponse {
                                // The pooler's own SETs failed: seen whole, to tell the client why.
                                if server.sync != nil { return .inspect }
                                if let sessionState, sessionState.awaitsReplies { sessionState.errorReceived() }
                            }
                            if prepared != nil {
                                // Made-up or swallowed answers pending: look at each message. An
                                // error may say a statement's plan went stale.
                                if prepared!.specials > 0 || type == MessageType.errorResponse { return .inspect }
                                _ = prepared!.serverMessage(type, server: &server.statements)
                            }
                            return .forward
                        })
                else { break }
                let chunkLength = buffer.readerIndex - chunkStart
                switch chunk {
                case .forward:
                    if server.sync == nil { run.add(chunkStart, chunkLength, to: &self, into: &actions) }
                    if !notificationQueue.isEmpty, server.scanner.atMessageBoundary {
                        run.write(to: &self, into: &actions)
                        writeQueuedNotifications(into: &actions)
                    }
                case .head:
                    assertionFailure("the server's scanner hands over whole messages only")
                case .message(let type, let body, _):
                    if type == MessageType.parameterStatus {
                        run.write(to: &self, into: &actions)
                        parameterStatus(body, server: server, into: &actions)
                        continue
                    }
                    if type == MessageType.errorResponse, server.sync != nil {
                        server.sync!.error = WireDecode.errorFields(body)
                        continue
                    }
                    if type == MessageType.notificationResponse {
                        guard tracksSessionState else {
                            run.add(chunkStart, chunkLength, to: &self, into: &actions)
                            continue
                        }
                        // The pool's listener delivers the client's notifications, except on a
                        // channel whose LISTEN commits with this transaction: the listener is not
                        // listening on it yet, and PostgreSQL sends what the same commit notified.
                        if let sessionState, sessionState.listenerLacks(notification: body) {
                            run.add(chunkStart, chunkLength, to: &self, into: &actions)
                            continue
                        }
                        // One that came after the last ReadyForQuery must not keep the server.
                        if buffer.readableBytes == 0, mayGiveBack {  // written first if it goes back
                            run.write(to: &self, into: &actions)
                            releaseIfDone(now: now, into: &actions)
                        }
                        continue
                    }
                    if type != MessageType.readyForQuery {
                        // Only while prepared statements are tracked: an error, or any message
                        // while the tracker has answers of its own pending.
                        if type == MessageType.errorResponse, PreparedStatementTracker.isStalePlanError(body) {
                            actions.append(.statementsStale)
                        }
                        if prepared!.serverMessage(type, body: body, server: &server.statements) {
                            run.add(chunkStart, chunkLength, to: &self, into: &actions)
                        }
                        run.write(to: &self, into: &actions)
                        _ = writeMadeUpReplies(now: now, into: &actions)
                        continue
                    }
                    var b = body
                    let status = TransactionStatus(rawValue: b.readInteger(as: UInt8.self) ?? 0) ?? .failed
                    if let sync = server.sync {
                        // The end of the pooler's own parameter sync: the client's bytes may go now.
                        server.sync = nil
                        if !sync.spellings.isEmpty { spellingsLearned(sync.spellings, server, into: &actions) }
                        if let error = sync.error {
                            // The client's settings could not be made: it cannot go on as if they were.
                            unlink(now: now, reusable: false, into: &actions)
                            close(
                                .fatal(error.code, "could not restore session state: \(error.message)"),
                                reason: "session state replay failed", into: &actions)
                            return
                        }
                        flushPending(now: now, into: &actions)
                        guard isLinked else { return }
                        continue
                    }
                    if readyHold == .resuming {
                        // Held for the pool's listener, settled already.
                        readyHold = .none
                    } else {
                        if prepared != nil, !prepared!.serverMessage(type, status: status, server: &server.statements) {
                            // The ReadyForQuery of the pooler's own Sync or Query.
                            run.write(to: &self, into: &actions)
                            _ = writeMadeUpReplies(now: now, into: &actions)
                            continue
                        }
                        // What the settled request changes may be written to the client first.
                        if let sessionState, sessionState.awaitsReplies || !sessionState.heldReports.isEmpty {
                            run.write(to: &self, into: &actions)
                        }
                        readyForQuery(status, fromServer: true, into: &actions)
                        if readyHold == .held {
                            run.write(to: &self, into: &actions)
                            buffer.moveReaderIndex(to: chunkStart)
                            break scan
                        }
                    }
                    countReady(status, now: now, into: &actions)
                    if let timeoutClock, tracker.isQuiet {
                        timeoutClock.queryStartedAt = nil
                        timeoutClock.quietSince = status == .idle ? nil : now
                    }
                    if poolMode == .statement, status != .idle {
                        // The error takes the ReadyForQuery's place, so the statement that opened
                        // the transaction is the one that fails.
                        run.write(to: &self, into: &actions)
                        close(
                            .fatal(
                                SQLState.featureNotSupported,
                                "transaction blocks are not allowed in statement pooling mode"),
                            reason: "transaction in statement mode", into: &actions)
                        return
                    }
                    run.add(chunkStart, chunkLength, to: &self, into: &actions)  // the server's own bytes
                    if endsAtTransactionEnd, status == .idle, buffer.readableBytes == 0, tracker.isQuiet {
                        run.write(to: &self, into: &actions)
                        endSessionNow(now: now, into: &actions)
                        return
                    }
                    if prepared?.hasDueReplies ?? false {
                        run.write(to: &self, into: &actions)
                        _ = writeMadeUpReplies(now: now, into: &actions)
                    }
                    if buffer.readableBytes == 0, mayGiveBack {
                        // The answer is written before the server goes back to the pool.
                        run.write(to: &self, into: &actions)
                        releaseIfDone(now: now, into: &actions)
                    } else if let sessionState, sessionState.resyncDue || sessionState.localSync != nil {
                        let sync = sessionState.localSync
                        sessionState.localSync = nil
                        if buffer.readableBytes == 0, tracker.isQuiet {
                            // Kept (pinned, or in a block): the server gets the client's settings
                            // back before its next request.
                            run.write(to: &self, into: &actions)
                            if status == .idle, sessionState.resyncDue {
                                resyncServer(into: &actions)
                            } else if status == .inTransaction, let sync {
                                sendSwallowed(sync, to: server, into: &actions)
                            }
                        }
                    }
                }
            }
        } catch {
            run.write(to: &self, into: &actions)
            unlink(now: now, reusable: false, into: &actions)
            close(
                .fatal(SQLState.protocolViolation, "server sent an invalid message"), reason: "bad packet from server",
                into: &actions)
            return
        }
        run.write(to: &self, into: &actions)
        server.kept.keep(&buffer)
        if isLinked, tracker.isClean {
            // The end of a message that came after the last ReadyForQuery (a notice in pieces).
            releaseIfDone(now: now, into: &actions)
        }
        if !notificationQueue.isEmpty { writeQueuedNotifications(into: &actions) }
        if prepared != nil {
            let names = prepared!.takeAccepted()
            if !names.isEmpty {
                accepted += names
                actions.append(.statementsAccepted)
            }
            if flow.bindHeld, prepared!.hasReleased {
                // A held Bind's check is over: it goes, then what the client sent after it.
                flow.bindHeld = false
                flow.pendingBytes -= flow.bytesAfterHeldBind
                flow.bytesAfterHeldBind = 0
                toServer.append(contentsOf: prepared!.takeReleased())
                flushPending(now: now, into: &actions)
            }
        }
    }

    /// A ParameterStatus from the linked server: the server's value is remembered, and the client
    /// is told unless it answers the pooler's own SET.
    mutating func parameterStatus(
        _ body: ByteBuffer, server: ServerSessionState, into actions: inout Actions
    ) {
        guard let (name, value) = WireDecode.parameterStatus(body) else { return }
        server.parameters[name] = value
        if server.sync != nil {
            // Our own SET: remember the server's spelling of the value (and of the startup
            // value, when that is what was set).
            server.sync!.spellings[name] = nil
            if let was = wanted[name], was != value {
                if startupParameters[name] == was { startupParameters[name] = value }
                wanted[name] = value
                // The client was told its value as it gave it (`Welcome`); PostgreSQL would have
                // told it the value as the server spells it (`German` is `German, DMY`).
                var out = ByteBufferAllocator().buffer(capacity: body.readableBytes + 5)
                Wire.parameterStatus(name, value, into: &out)
                write(out, into: &actions)
            }
        } else if let sessionState, sessionState.mayReset {
            // Shown once the request is settled (`parametersSettled`).
            sessionState.heldReports[name] = value
        } else {
            wanted[name] = value
            if name == "standard_conforming_strings" { followStandardStrings() }
            var out = ByteBufferAllocator().buffer(capacity: body.readableBytes + 5)
            Wire.parameterStatus(name, value, into: &out)
            write(out, into: &actions)
        }
    }

    /// The sync set parameters the server did not report again: their values were already the
    /// server's, as it spells them (the client gave `German`, the server has `German, DMY`), and
    /// that is what the client is told, as PostgreSQL would have at login.
    mutating func spellingsLearned(
        _ spellings: [String: String], _ server: ServerSessionState, into actions: inout Actions
    ) {
        for (name, spelled) in spellings {
            server.parameters[name] = spelled
            guard let was = wanted[name], was != spelled else { continue }
            if startupParameters[name] == was { startupParameters[name] = spelled }
            wanted[name] = spelled
            var out = ByteBufferAllocator().buffer(capacity: name.utf8.count + spelled.utf8.count + 7)
            Wire.parameterStatus(name, spelled, into: &out)
            write(out, into: &actions)
        }
    }

    /// The client's SQL is read with the standard_conforming_strings it has now.
    mutating func followStandardStrings() {
        // PostgreSQL's spellings of false: off, false, no, 0, and their unambiguous prefixes.
        let value = wanted["standard_conforming_strings"]?.lowercased() ?? "on"
        let standard =
            value.isEmpty
            || !(value == "0" || (value.count >= 2 && "off".hasPrefix(value)) || "false".hasPrefix(value)
                || "no".hasPrefix(value))
        guard standard != standardStrings else { return }
        standardStrings = standard
        lastPlainParse.removeAll()  // found to have no effects under the other reading
    }

    /// The linked server closed or failed (`unused`: before any of the client's bytes were written
    /// to it). Unless nothing of the client's ran there (`ClientSession+Replay`), the client
    /// cannot go on without knowing what it ran.
    /// PgBouncer's words and SQLSTATE, which applications match to retry (libpq's own "server
    /// closed the connection unexpectedly" would hide whether the pooler said anything).
    public mutating func serverLost(unused: Bool = false, now: NIODeadline, into actions: inout Actions) {
        guard holdsServer else { return }
        if requeueAfterLoss(unused: unused, now: now, into: &actions) { return }
        state = .idle
        close(
            .fatal(SQLState.protocolViolation, "server conn crashed?"), reason: "server connection lost",
            into: &actions)
    }
}

/// A run of the server's bytes (in `serverBuffer`) that the client gets unchanged, written as one
/// slice.
struct ServerBytesRun {
    var start = 0
    var length = 0

    /// Adds the chunk at `chunkStart`; a chunk that does not follow the run ends it first.
    mutating func add(
        _ chunkStart: Int, _ chunkLength: Int, to session: inout ClientSession,
        into actions: inout ClientSession.Actions
    ) {
        if length > 0, start + length != chunkStart { write(to: &session, into: &actions) }
        if length == 0 { start = chunkStart }
        length += chunkLength
    }

    /// Writes the run, if any (without flushing).
    mutating func write(to session: inout ClientSession, into actions: inout ClientSession.Actions) {
        guard length > 0 else { return }
        actions.append(.writeServerBytes(start: start, length: length))
        length = 0
    }
}
