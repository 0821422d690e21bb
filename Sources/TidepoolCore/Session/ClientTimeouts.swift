import NIOCore

/// The client-side timeouts of PgBouncer; zero switches one off.
public struct ClientTimeoutSettings: Equatable, Sendable {
    public var clientIdleTimeout: TimeAmount = .zero
    public var idleTransactionTimeout: TimeAmount = .zero
    public var queryTimeout: TimeAmount = .zero
    public var transactionTimeout: TimeAmount = .zero

    public init() {}

    public var anyEnabled: Bool {
        clientIdleTimeout > .zero || idleTransactionTimeout > .zero || queryTimeout > .zero
            || transactionTimeout > .zero
    }
}

/// Where a logged-in client stands, with the moments the timeouts count from.
public enum ClientActivity: Sendable {
    /// No server, nothing sent since `since`.
    case idle(since: NIODeadline)
    /// Queued for a server (query_wait_timeout is the pool's business).
    case waiting
    /// Holding a server since `linkedAt`. `queryStartedAt` is set while a request is outstanding;
    /// `quietSince` while none is and a transaction is open.
    case linked(linkedAt: NIODeadline, queryStartedAt: NIODeadline?, quietSince: NIODeadline?)
}

/// What to do with a client whose time is up.
public enum ClientTimeoutVerdict: Equatable, Sendable {
    case none
    /// Cancel the running query, then close the client with this error.
    case cancelAndClose(PostgresError)
    case close(PostgresError)
}

public enum ClientTimeouts {
    public static func check(
        _ activity: ClientActivity, settings: ClientTimeoutSettings, now: NIODeadline
    ) -> ClientTimeoutVerdict {
        switch activity {
        case .waiting:
            return .none
        case .idle(let since):
            if settings.clientIdleTimeout > .zero, now - since >= settings.clientIdleTimeout {
                return .close(.fatal(SQLState.adminShutdown, "client_idle_timeout: client was idle too long"))
            }
            return .none
        case .linked(let linkedAt, let queryStartedAt, let quietSince):
            if let started = queryStartedAt, settings.queryTimeout > .zero, now - started >= settings.queryTimeout {
                return .cancelAndClose(
                    .fatal(
                        SQLState.queryCanceled, "query_timeout: query ran longer than \(format(settings.queryTimeout))")
                )
            }
            if let quiet = quietSince, settings.idleTransactionTimeout > .zero,
                now - quiet >= settings.idleTransactionTimeout
            {
                return .close(
                    .fatal(
                        SQLState.adminShutdown,
                        "idle_transaction_timeout: transaction was idle longer than \(format(settings.idleTransactionTimeout))"
                    ))
            }
            if settings.transactionTimeout > .zero, now - linkedAt >= settings.transactionTimeout {
                return .cancelAndClose(
                    .fatal(
                        SQLState.adminShutdown,
                        "transaction_timeout: transaction ran longer than \(format(settings.transactionTimeout))"))
            }
            return .none
        }
    }

    static func format(_ t: TimeAmount) -> String {
        "\(t.secondsText) s"
    }
}
