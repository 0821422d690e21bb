import NIOCore

extension ClientSession {
    /// Client bytes went to the server: a query (and maybe a transaction) starts, for SHOW STATS.
    mutating func markSent(now: NIODeadline) {
        guard queryStart == nil else { return }
        queryStart = now
        if transactionStart == nil { transactionStart = now }
    }

    /// A ReadyForQuery ends a query, and with status idle a transaction.
    mutating func countReady(_ status: TransactionStatus, now: NIODeadline, into actions: inout Actions) {
        traffic.queries += 1
        if tracker.isQuiet, let start = queryStart {
            let took = Int((now - start).nanoseconds / 1000)
            traffic.queryTime += took
            recordTiming(.query, took, into: &actions)
            queryStart = nil
            if slowQueryThreshold > 0, took >= slowQueryThreshold { actions.append(.logSlowQuery(microseconds: took)) }
        }
        if status == .idle, let start = transactionStart {
            let took = Int((now - start).nanoseconds / 1000)
            traffic.transactions += 1
            traffic.transactionTime += took
            recordTiming(.transaction, took, into: &actions)
            transactionStart = nil
            if poolMode == .session { actions.append(.handInTraffic) }
        }
    }

    @inline(__always)
    mutating func recordTiming(_ kind: LatencySet.Kind, _ microseconds: Int, into actions: inout Actions) {
        latency?.record(kind, microseconds: UInt64(microseconds))
        if reportsTimings { actions.append(.recordTiming(kind, microseconds: microseconds)) }
    }

    /// The counters since the last call, zeroed (the prepared-statement counts included).
    public mutating func takeTraffic() -> TrafficStats {
        if prepared != nil {
            let counts = prepared!.takeCounts()
            traffic.clientParses += counts.clientParses
            traffic.serverParses += counts.serverParses
            traffic.binds += counts.binds
        }
        defer { traffic = TrafficStats() }
        return traffic
    }

    /// The start of the request that log_slow_query_ms reports: a Query's or a Parse's SQL.
    public var slowQueryText: String {
        guard var request = slowQueryRequest, let type = request.readInteger(as: UInt8.self),
            request.readInteger(as: Int32.self) != nil
        else { return "" }
        if type == MessageType.parse { _ = request.readNullTerminatedString() }
        guard type == MessageType.query || type == MessageType.parse else { return "" }
        let bytes = request.readBytes(length: min(request.readableBytes, 100)) ?? []
        return String(decoding: bytes.prefix(while: { $0 != 0 }), as: UTF8.self)
    }

    // MARK: Timeouts

    func noteClientActivity(_ clock: TimeoutClock, now: NIODeadline) {
        switch state {
        case .idle: clock.idleSince = now
        case .linked, .waiting:
            clock.quietSince = nil
            if tracker.outstanding > 0, clock.queryStartedAt == nil { clock.queryStartedAt = now }
        default: break
        }
    }

    /// The clock's tick (ten a second, while the session watches it: `watchClock`): applies
    /// client_login_timeout, the bounded wait for the client's own notification, query_timeout,
    /// idle_transaction_timeout, client_idle_timeout and transaction_timeout. Returns the error the
    /// client is closed with, if any.
    @discardableResult
    public mutating func tick(now: NIODeadline, into actions: inout Actions) -> PostgresError? {
        if let deadline = login?.loginDeadline {
            guard now >= deadline else { return nil }
            let error = PostgresError.fatal(SQLState.protocolViolation, "client_login_timeout: login took too long")
            close(error, reason: "client_login_timeout", into: &actions)
            return error
        }
        if waitingOwnNotification { ownNotificationTick(now: now, into: &actions) }
        guard let clock = timeoutClock else {
            if !waitingOwnNotification, !isClosed { actions.append(.unwatchClock) }
            return nil
        }
        let activity: ClientActivity
        switch state {
        case .idle: activity = .idle(since: clock.idleSince)
        case .waiting: activity = .waiting
        case .linked:
            activity = .linked(
                linkedAt: clock.linkedAt, queryStartedAt: clock.queryStartedAt, quietSince: clock.quietSince)
        default: return nil
        }
        let error: PostgresError
        switch ClientTimeouts.check(activity, settings: clock.settings, now: now) {
        case .none:
            return nil
        case .close(let e):
            error = e
        case .cancelAndClose(let e):
            if isLinked { actions.append(.cancelServerQuery(reportBack: false)) }
            error = e
        }
        close(error, reason: error.message, into: &actions)
        return error
    }
}

extension ClientSession {
    /// The client's state as PgBouncer 1.25's SHOW CLIENTS names it: `active` with a server,
    /// `idle` logged in without one (the console's sessions too), `waiting` in the queue, `login`
    /// until then.
    public var stateName: String {
        switch state {
        case .startup, .lookingUpSecret, .authenticating, .awaitingWelcome: "login"
        case .waiting: "waiting"
        case .linked, .passThrough: "active"
        case .idle, .admin: "idle"
        case .closed: "closed"
        }
    }
}
