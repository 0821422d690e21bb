/// What the termination signals mean, in order, as in PgBouncer: SIGTERM waits for the clients to
/// leave, SIGINT for the transactions in flight to end; SIGQUIT, or a second SIGTERM or SIGINT
/// while one of those waits, stops at once.
public struct ShutdownSignals: Sendable {
    public enum Signal: Sendable, Equatable {
        case terminate, interrupt, quit
    }

    public enum Verdict: Sendable, Equatable {
        /// Stop accepting clients and wait until they have left (SIGTERM).
        case waitForClients
        /// Pause the pools and wait until no server is lent (SIGINT).
        case waitForServers
        /// Stop now.
        case now
    }

    /// The shutdown under way, if any.
    public private(set) var started: Verdict?

    public init() {}

    public mutating func received(_ signal: Signal) -> Verdict {
        let verdict: Verdict
        switch (signal, started) {
        case (.quit, _), (_, .some): verdict = .now
        case (.terminate, nil): verdict = .waitForClients
        case (.interrupt, nil): verdict = .waitForServers
        }
        started = verdict
        return verdict
    }
}
