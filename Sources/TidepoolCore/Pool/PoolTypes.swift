import NIOCore

/// Dictionaries keyed by client and server IDs are read several times per transaction, and
/// SipHash (the standard library's hashing) showed in profiles. IDs are counters the pooler
/// hands out, not input an attacker picks, so a multiplicative hash (odd constant, then the high
/// bits folded into the low ones the table indexes by) spreads them well at a fraction of the cost.
@inline(__always)
func idHash(_ raw: UInt64, seed: Int) -> Int {
    var h = (raw ^ UInt64(truncatingIfNeeded: seed)) &* 0x9E37_79B9_7F4A_7C15
    h ^= h >> 29
    return Int(truncatingIfNeeded: h)
}

/// Identifies a client connection to the pooler.
public struct ClientID: Hashable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "C-\(raw)" }
    public func _rawHashValue(seed: Int) -> Int { idHash(raw, seed: seed) }
}

/// Identifies a server connection from the pooler to PostgreSQL.
public struct ServerID: Hashable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "S-\(raw)" }
    public func _rawHashValue(seed: Int) -> Int { idHash(raw, seed: seed) }
}

/// A pool serves one (database, user) pair.
public struct PoolKey: Hashable, Sendable, CustomStringConvertible {
    public let database: String
    public let user: String
    /// Hashed once: the pool's dictionaries are looked up several times per transaction, and
    /// hashing two strings each time showed in profiles.
    let hash: Int

    public init(database: String, user: String) {
        self.database = database
        self.user = user
        var hasher = Hasher()
        hasher.combine(database)
        hasher.combine(user)
        self.hash = hasher.finalize()
    }

    /// The pool a client logged in as `loginUser` to `database` joins: the entry's user when it
    /// names one (all its clients share that user's servers), else the client's own.
    public init(database: String, entry: DatabaseEntry, loginUser: String) {
        self.init(database: database, user: entry.user ?? loginUser)
    }

    public static func == (a: PoolKey, b: PoolKey) -> Bool {
        a.hash == b.hash && a.database == b.database && a.user == b.user
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(hash) }
    public func _rawHashValue(seed: Int) -> Int { idHash(UInt64(bitPattern: Int64(hash)), seed: seed) }

    public var description: String { "\(database)/\(user)" }
}

/// The limits and timeouts the pool state machine applies to one pool. Durations of zero
/// switch the rule off, as in PgBouncer.
public struct PoolSettings: Equatable, Sendable {
    public var poolSize: Int
    public var minPoolSize: Int = 0
    public var reservePoolSize: Int = 0
    public var reservePoolTimeout: TimeAmount = .seconds(5)
    /// Across all pools of the database; 0 means no limit.
    public var maxDBConnections: Int = 0
    /// Across all pools of the user; 0 means no limit.
    public var maxUserConnections: Int = 0
    public var queryWaitTimeout: TimeAmount = .seconds(120)
    /// query_wait_notify: a client waiting this long is told it is queued (0: never).
    public var queryWaitNotify: TimeAmount = .seconds(5)
    public var serverLifetime: TimeAmount = .seconds(3600)
    public var serverIdleTimeout: TimeAmount = .seconds(600)
    public var serverLoginRetry: TimeAmount = .seconds(15)
    /// An idle server unused for this long is checked before it is lent; zero checks every time.
    public var serverCheckDelay: TimeAmount = .seconds(30)
    /// False switches the pre-lend check off (an empty server_check_query).
    public var serverCheckEnabled = true
    /// server_round_robin: idle servers are lent oldest-released first instead of newest.
    public var serverRoundRobin = false
    /// server_connect_fail_fast: while a database that has not served yet cannot be reached,
    /// clients fail at once instead of waiting (up to query_wait_timeout) for it to come up.
    public var connectFailFast = false
    /// pool_idle_timeout, or autodb_idle_timeout for a pool of a `*` database: an unused pool is
    /// freed after this (zero: kept).
    public var freeAfter: TimeAmount = .zero
    /// server_fast_close in a session-mode pool: RECONNECT ends the sessions on servers it replaces
    /// at their transaction's end instead of waiting for the clients to leave.
    public var fastClose = false

    public init(poolSize: Int) { self.poolSize = poolSize }
}

/// Why a waiting client could not be given a server.
public enum PoolError: Error, Equatable, Sendable {
    /// It waited `query_wait_timeout` in the queue.
    case waitTimeout(waited: TimeAmount)
    /// New server connections to the database keep failing; this is the last error.
    case connectFailed(PostgresError)
    /// SHUTDOWN WAIT_FOR_SERVERS: the pooler is stopping and lends no more servers.
    case shuttingDown

    public var postgresError: PostgresError {
        switch self {
        case .waitTimeout(let waited):
            return PostgresError(
                code: SQLState.protocolViolation,
                message: "query_wait_timeout: waited \(waited.secondsText) s for a server connection",
                hint: "all servers of the pool stayed busy; raise pool_size or query_wait_timeout")
        case .shuttingDown:
            // PgBouncer's words, with PostgreSQL's code for a connection ended by a shutdown.
            return PostgresError(code: SQLState.adminShutdown, message: "server shutting down")
        case .connectFailed(let error):
            return PostgresError(
                code: error.code.hasPrefix("28") || error.code == SQLState.invalidCatalogName
                    ? error.code : SQLState.connectionFailure,
                message: "server connection failed: \(error.message)",
                detail: error.detail)
        }
    }
}

extension TimeAmount {
    /// Seconds with one decimal, as messages and logs show durations ("2.5").
    public var secondsText: String {
        let tenths = Int((Double(nanoseconds) / 1e8).rounded())
        return "\(tenths / 10).\(tenths % 10)"
    }
}

/// What the pool state machine asks its driver to do.
public enum PoolAction: Equatable, Sendable {
    /// Hand this idle server to the client.
    case lend(ServerID, to: ClientID)
    /// Open a new server connection for the pool, preferably on this event loop.
    case connect(ServerID, PoolKey, loop: Int)
    /// Close this server connection (it is no longer in the pool).
    case close(ServerID)
    /// Tell a waiting client it will get no server.
    case failClient(ClientID, PoolError)
    /// Tell a client that has waited query_wait_notify that it is queued (a NOTICE).
    case notifyWaiting(ClientID)
    /// server_fast_close: the client holding a server that must be replaced (session pooling) is
    /// closed at the end of its transaction.
    case endSession(ClientID)
    /// The pool was freed (pool_idle_timeout, autodb_idle_timeout): the driver drops what it
    /// keeps for it.
    case poolFreed(PoolKey)
    /// Run `server_check_query` on this idle server; answer with `serverCheckSucceeded` or
    /// `serverCheckFailed`. The server is meant for the client.
    case check(ServerID, for: ClientID)
    /// Something worth logging and counting happened.
    case note(PoolKey, PoolEvent)
}

/// Events of a pool for logs and metrics.
public enum PoolEvent: Equatable, Sendable {
    /// A server beyond pool_size was opened because a client waited reserve_pool_timeout.
    case reserveOpened(waited: TimeAmount)
    /// A server reached server_lifetime and was closed.
    case recycledForAge(ServerID)
    /// An idle server reached server_idle_timeout and was closed.
    case closedIdle(ServerID)
    /// A server failed its pre-lend check and was closed.
    case checkFailed
    /// A client waited query_wait_timeout and was turned away.
    case waitTimedOut
    /// A connection attempt made while new connections kept failing.
    case probe
}

/// Counts of one pool at a moment, for SHOW POOLS and metrics.
public struct PoolSnapshot: Equatable, Sendable {
    public var key: PoolKey
    public var waiting: Int
    /// Lent to clients (checked out), including those being checked before lending.
    public var lent: Int
    /// Running the pre-lend check.
    public var checking: Int = 0
    public var idle: Int
    public var connecting: Int
    public var maxWait: TimeAmount
    public var settings: PoolSettings
}

/// Which lend of a server connection is current, from attach and detach events that may reach the
/// server out of order: lends are numbered when the pool decides them, and an attach or detach of
/// an older lend than the newest seen changes nothing.
public struct LeaseTracker: Sendable {
    public private(set) var current: UInt64 = 0
    public private(set) var attached = false

    public init() {}

    /// Lend `lease` links its client; false when a newer lend was already seen.
    public mutating func attach(_ lease: UInt64) -> Bool {
        guard lease > current else { return false }
        current = lease
        attached = true
        return true
    }

    /// Lend `lease` ends; false when it is not the current one.
    public mutating func detach(_ lease: UInt64) -> Bool {
        guard lease == current, attached else { return false }
        attached = false
        return true
    }
}
