import NIOCore

extension ClientSession {
    /// Bytes the client sent, read as its state says: its startup packet, password messages, the
    /// protocol once logged in, the admin console's commands; kept while a lookup or the welcome
    /// is awaited, dropped once closed. Returns true when it stopped at a login step whose actions
    /// must be carried out before the rest of `buffer` is read (then call it again).
    @inlinable @inline(__always)
    public mutating func read(
        _ buffer: inout ByteBuffer, now: NIODeadline, tlsOffered: @autoclosure () -> Bool,
        isKnownStatement: (String) -> Bool,
        into actions: inout Actions
    ) throws(WireError) -> Bool {
        while buffer.readableBytes > 0 {
            switch state {
            case .idle, .waiting, .linked, .passThrough:
                // Its actions are carried out once the whole read is taken in.
                try clientBytes(&buffer, now: now, isKnownStatement: isKnownStatement, into: &actions)
                switch state {
                case .idle, .waiting, .linked, .passThrough: return false  // more bytes are needed first
                default: continue
                }
            case .startup:
                guard let packet = try StartupPacket.parse(from: &buffer) else { return false }
                startupPacket(packet, tlsOffered: tlsOffered(), bytesFollow: buffer.readableBytes > 0, into: &actions)
                return true
            case .lookingUpSecret, .awaitingWelcome:
                return false  // kept until the secret is known, or the client is welcomed
            case .authenticating:
                guard let chunk = try scanner.next(from: &buffer, classify: { _ in .inspect }),
                    case .message(let type, let body, _) = chunk
                else { return false }
                passwordMessage(type: type, body: body, into: &actions)
                return true
            case .admin:
                try adminBytes(&buffer, into: &actions)
                return false
            case .closed:
                buffer.moveReaderIndex(to: buffer.writerIndex)
                return false
            }
        }
        return false
    }
}

extension ClientSession {
    /// Bytes the client sent while logged in to a pool (idle, queued or linked). Consumes what it can;
    /// returns when `buffer` is used up, when more bytes are needed, or when the state left those
    /// three (the rest is for the caller: a closed client's bytes are dropped).
    /// `isKnownStatement` says whether some server has accepted a pooler-wide statement name.
    public mutating func clientBytes(
        _ buffer: inout ByteBuffer, now: NIODeadline, isKnownStatement: (String) -> Bool,
        into actions: inout Actions
    ) throws(WireError) {
        while buffer.readableBytes > 0 {
            switch state {
            case .idle, .waiting, .linked:
                if prepared != nil {
                    guard try preparedStep(&buffer, now: now, isKnownStatement: isKnownStatement, into: &actions)
                    else { return }
                    continue
                }
                guard
                    let chunk = try scanner.next(
                        from: &buffer,
                        peek: { type, bytes, bodyStart in
                            if type == MessageType.terminate || (type == MessageType.query && refusesSimpleQuery) {
                                return .inspect
                            }
                            if tracksSessionState,
                                !Self.statementRead(
                                    type, bytes, bodyStart: bodyStart, limit: bufferLimit, preparedOn: false,
                                    state: &sessionState, lastParse: &lastPlainParse, standardStrings: standardStrings,
                                    refuses: refusesPins, refusal: &refusal)
                                    || refusal != nil
                            {
                                return .inspect
                            }
                            Self.clientSent(type, tracker: &tracker, state: sessionState)
                            return .forward
                        })
                else { return }
                switch chunk {
                case .forward(let bytes):
                    forward(bytes, now: now, into: &actions)
                case .head:
                    assertionFailure("without prepared statements no message is handed over by its head")
                case .message(let type, let body, _):
                    if let reason = refusal, type != MessageType.terminate,
                        !(type == MessageType.query && refusesSimpleQuery)
                    {
                        refusal = nil
                        Self.clientSent(type, tracker: &tracker, state: sessionState)
                        forward(Self.refusedMessage(type, body: body, reason: reason), now: now, into: &actions)
                        continue
                    }
                    if type == MessageType.query {
                        refuseSimpleQuery(into: &actions)
                    } else {
                        terminate(into: &actions)
                    }
                    return
                }
            case .passThrough:
                passThroughClientBytes(&buffer)
            default:
                return
            }
        }
    }

    /// The end of one read of client bytes: what was gathered for the linked server goes, and the
    /// timeouts learn the client is active.
    public mutating func clientReadDone(now: NIODeadline, into actions: inout Actions) {
        if !toServer.isEmpty, holdsServer, !isSyncing {
            markSent(now: now)
            actions.append(.sendToServer)
        }
        if let timeoutClock { noteClientActivity(timeoutClock, now: now) }
    }

    /// A read from the client begins: it is counted, and joined to the bytes kept from the reads
    /// before (a message's start); `statementEpoch` is the pooler's stale-plan epoch now.
    public mutating func beginRead(_ buffer: inout ByteBuffer, statementEpoch epoch: Int) {
        if statementEpoch != epoch { statementEpoch = epoch }
        clientRead(buffer)
        inbound.prepend(to: &buffer)
    }

    /// The read was taken in (`read`): what is left of it is kept for the next, and the client's
    /// bytes go to its server.
    public mutating func endRead(_ buffer: inout ByteBuffer, now: NIODeadline, into actions: inout Actions) {
        if !isClosed { inbound.keep(&buffer) }
        clientReadDone(now: now, into: &actions)
    }

    /// Bytes kept while a lookup or the welcome was awaited, to be read now.
    public mutating func takeKeptBytes() -> ByteBuffer? {
        guard let kept = inbound.take(), kept.readableBytes > 0 else { return nil }
        return kept
    }

    /// Counts a read for SHOW STATS and keeps its first bytes for log_slow_query_ms.
    mutating func clientRead(_ buffer: ByteBuffer) {
        traffic.received += buffer.readableBytes
        if case .linked(let server) = state, server.unanswered { keepForReplay(buffer, server) }
        if queryStart == nil, slowQueryThreshold > 0 {
            slowQueryRequest = buffer.getSlice(at: buffer.readerIndex, length: min(buffer.readableBytes, 160))
        }
    }

    mutating func terminate(into actions: inout Actions) {
        actions.append(.terminate)
    }

    /// disable_pqexec: a simple Query (which may hold several statements) closes the client.
    mutating func refuseSimpleQuery(into actions: inout Actions) {
        close(
            .fatal(SQLState.protocolViolation, "PQexec disallowed"), reason: "simple query with disable_pqexec",
            into: &actions)
    }

    mutating func forward(_ bytes: ByteBuffer, now: NIODeadline, into actions: inout Actions) {
        switch state {
        case .linked(let server) where server.sync == nil:
            toServer.append(bytes)
        case .idle:
            hold(bytes)
            state = .waiting(since: now)
            actions.append(.requestServer)
        default:
            hold(bytes)
        }
    }

    /// Keeps client bytes until a server can take them.
    mutating func hold(_ bytes: ByteBuffer) {
        pending.append(bytes)
        flow.pendingBytes += bytes.readableBytes
    }

    /// One step for a client whose named prepared statements the pooler keeps. Returns false when
    /// it needs more bytes or a server first.
    mutating func preparedStep(
        _ buffer: inout ByteBuffer, now: NIODeadline, isKnownStatement: (String) -> Bool,
        into actions: inout Actions
    ) throws(WireError) -> Bool {
        guard case .linked(let server) = state, server.sync == nil else {
            guard isIdle else {
                // Kept whole until a server is linked: how it is rewritten depends on that server.
                stash(&buffer)
                return false
            }
            if buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == MessageType.terminate {
                terminate(into: &actions)
                return false
            }
            if prepared!.epoch != statementEpoch { prepared!.epoch = statementEpoch }
            if let answer = prepared!.answerWithoutServer(buffer, isKnown: isKnownStatement) {
                buffer.moveReaderIndex(forwardBy: answer.consumed)
                write(answer.reply, into: &actions)
                actions.append(.flushClient)
                return true
            }
            state = .waiting(since: now)
            stash(&buffer)
            actions.append(.requestServer)
            return false
        }
        if flow.bindHeld {
            // A Bind waits for its statement's fresh copy to be checked; what follows waits too.
            flow.pendingBytes += buffer.readableBytes
            flow.bytesAfterHeldBind += buffer.readableBytes
            stash(&buffer)
            return false
        }
        guard
            let chunk = try scanner.next(
                from: &buffer,
                peek: { type, bytes, bodyStart in
                    if type == MessageType.terminate || (type == MessageType.query && refusesSimpleQuery) {
                        return .inspect
                    }
                    if type == MessageType.describe, prepared!.wantsPortalShape { return .inspect }
                    if PreparedStatementTracker.inspects(type, bytes, bodyStart: bodyStart),
                        let disposition = PreparedStatementTracker.disposition(
                            type, bytes, bodyStart: bodyStart, limit: bufferLimit)
                    {
                        return disposition
                    }
                    if tracksSessionState,
                        !Self.statementRead(
                            type, bytes, bodyStart: bodyStart, limit: bufferLimit, preparedOn: true,
                            state: &sessionState, lastParse: &lastPlainParse, standardStrings: standardStrings,
                            refuses: refusesPins, refusal: &refusal)
                            || refusal != nil
                    {
                        return .inspect
                    }
                    if !tracksSessionState, type == MessageType.query,
                        PreparedStatementTracker.mayNameReserved(bytes, bodyStart: bodyStart, limit: bufferLimit)
                    {
                        return .inspect
                    }
                    Self.clientSent(type, tracker: &tracker, state: sessionState)
                    prepared!.clientForwarded(type)
                    return .forward
                })
        else { return false }
        switch chunk {
        case .forward(let bytes):
            toServer.append(bytes)
        case .head(let type, let length, let body):
            // A Bind too large to hold: its statement is rewritten, its parameters go as they come.
            if tracksSessionState { sessionMessage(type, body: body, whole: false) }
            Self.clientSent(type, tracker: &tracker, state: sessionState)
            if prepared!.epoch != statementEpoch { prepared!.epoch = statementEpoch }
            prepared!.clientBindHead(body, length: length, server: &server.statements, into: &toServer)
        case .message(let type, let body, let whole):
            if type == MessageType.terminate {
                terminate(into: &actions)
                return false
            }
            if type == MessageType.query, refusesSimpleQuery {
                refuseSimpleQuery(into: &actions)
                return false
            }
            var body = body
            var whole = whole
            if tracksSessionState || type == MessageType.query {
                refusal = nil
                if tracksSessionState {
                    sessionMessage(type, body: body, whole: true)
                } else {
                    // session_state = ignore: read only for SQL naming the pooler's statements.
                    var unused: SessionState? = nil
                    body.withUnsafeReadableBytes {
                        Self.readMessage(
                            type, body: $0, whole: true, preparedOn: true, state: &unused, lastParse: &lastPlainParse,
                            standardStrings: standardStrings, refuses: false, refusal: &refusal)
                    }
                    if refusal != .reservedName { refusal = nil }
                }
                if let reason = refusal {
                    refusal = nil
                    whole = Self.refusedMessage(type, body: body, reason: reason)
                    body = whole.getSlice(at: whole.readerIndex + 5, length: whole.readableBytes - 5)!
                }
            }
            Self.clientSent(type, tracker: &tracker, state: sessionState)
            if prepared!.epoch != statementEpoch { prepared!.epoch = statementEpoch }
            prepared!.clientMessage(type: type, body: body, whole: whole, server: &server.statements, into: &toServer)
            if type == MessageType.bind, prepared!.isHolding { flow.bindHeld = true }
            if writeMadeUpReplies(now: now, into: &actions) {
                actions.append(.flushClient)
                releaseIfDone(now: now, into: &actions)
            }
        }
        return true
    }

    /// Moves all of `buffer` to the end of `inbound`.
    mutating func stash(_ buffer: inout ByteBuffer) { inbound.keep(&buffer) }

    /// Writes the answers the prepared-statement tracker made up that are due. True if it wrote any.
    mutating func writeMadeUpReplies(now: NIODeadline, into actions: inout Actions) -> Bool {
        guard prepared != nil else { return false }
        let replies = prepared!.takeReplies()
        for reply in replies {
            if reply.getInteger(at: reply.readerIndex, as: UInt8.self) == MessageType.readyForQuery,
                let raw = reply.getInteger(at: reply.readerIndex + 5, as: UInt8.self),
                let status = TransactionStatus(rawValue: raw)
            {
                // Ends a client Query the pooler answered itself, like one from the server.
                readyForQuery(status, into: &actions)
                countReady(status, now: now, into: &actions)
            }
            write(reply, into: &actions)
        }
        return !replies.isEmpty
    }

    // MARK: Cancel

    /// A CancelRequest with this client's key. A queued client leaves the queue and its requests
    /// fail as if cancelled by the server; a client using a server keeps it until the cancel has
    /// reached PostgreSQL, so that the cancel cannot land on a query another client runs on that
    /// backend after a hand-over.
    public mutating func cancelRequested(now: NIODeadline, into actions: inout Actions) {
        if isWaiting {
            cancelWhileWaiting(now: now, into: &actions)
            return
        }
        if isPassingThrough {
            actions.append(.cancelServerQuery(reportBack: false))
            return
        }
        guard isLinked, !tracker.isClean else { return }
        cancelsInFlight += 1
        actions.append(.cancelServerQuery(reportBack: true))
    }

    /// A cancel request sent for this client reached PostgreSQL (or gave up): the server may go back.
    public mutating func cancelFinished(now: NIODeadline, into actions: inout Actions) {
        cancelsInFlight -= 1
        releaseIfDone(now: now, into: &actions)
    }

    /// Answers every request the queued client has sent with the cancel error, one ReadyForQuery each.
    mutating func cancelWhileWaiting(now: NIODeadline, into actions: inout Actions) {
        actions.append(.leaveQueue)
        var answers = max(tracker.outstanding, 1)
        var midMessage = !scanner.atMessageBoundary
        if var stash = inbound.take() {
            // Unread bytes kept for the server (or a message waited for whole): count the requests among them, and drop them.
            var counter = MessageScanner()
            var requests = 0
            while let chunk = try? counter.next(
                from: &stash,
                classify: { type in
                    if type == MessageType.query || type == MessageType.sync || type == MessageType.functionCall {
                        requests += 1
                    }
                    return .forward
                }), case .forward = chunk
            {}
            answers = max(tracker.outstanding + requests, 1)
            midMessage = midMessage || !counter.atMessageBoundary || stash.readableBytes > 0
        }
        let cancelled = PostgresError(code: SQLState.queryCanceled, message: "canceling statement due to user request")
        guard !midMessage else {
            var fatal = cancelled
            fatal.severity = "FATAL"
            state = .idle  // nothing linked: nothing to give back
            close(fatal, reason: "cancelled in the middle of a message", into: &actions)
            return
        }
        pending.removeAll()
        flow.pendingBytes = 0
        sessionState?.requestsDropped()
        var out = ByteBufferAllocator().buffer(capacity: 128)
        Wire.errorResponse(cancelled, into: &out)
        for _ in 0..<answers { Wire.readyForQuery(.idle, into: &out) }
        tracker.reset()
        state = .idle
        timeoutClock?.idleSince = now
        write(out, into: &actions)
        actions.append(.flushClient)
    }
}
