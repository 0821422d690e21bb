import NIOCore

/// What a server connection carries from one client to the next: the parameters it last reported
/// and the pooler-wide prepared statements it holds. Shared by the server's connection and the
/// session it is lent to; only the linked session (on its event loop) or the server while it is in
/// the pool touch it, and the hand-over through the event loops orders those accesses.
public final class ServerSessionState: @unchecked Sendable {
    /// ParameterStatus values as this backend last reported them (or as the pooler last set them).
    @TrackedParameters public var parameters: [String: String] = [:]
    public var statements: ServerStatementCache
    /// Session settings the pooler replayed or saw committed here, by name (`SessionState`).
    public var settings: [String: String] = [:]

    // The link to the client it is lent to, as that client's session reads it: only a linked
    // session (`.linked(server)`) reaches it, and each lend starts it afresh (`ClientSession.lent`).
    /// Frames the server's bytes.
    var scanner = MessageScanner()
    /// Server bytes not taken yet: part of a message, or what came behind a held ReadyForQuery.
    var kept = KeptBytes()
    /// The server has not answered the client's bytes of this lend yet: what the lend started
    /// from is kept for a replay (`ClientSession+Replay`).
    var unanswered = false
    /// The pooler's own parameter sync, until its ReadyForQuery: the server's answers are not
    /// the client's.
    var sync: ClientSession.ParameterSync?

    public init(maxPreparedStatements: Int) {
        statements = ServerStatementCache(capacity: maxPreparedStatements)
    }
}

extension ServerSessionState: Equatable {
    /// The same server.
    public static func == (a: ServerSessionState, b: ServerSessionState) -> Bool { a === b }
}

/// One client's protocol life once it is logged in to a pool: which bytes go to the server, which
/// answers the pooler makes up, when the server goes back to the pool, what a cancel does, and
/// what is counted for SHOW STATS. Events come in with the time; actions are appended to the
/// caller's buffer, which the connection carries out in order. No sockets, no clock, no locks.
///
/// The connection frames nothing itself: it hands over the bytes it read (`read`) and other events
/// (`handle`, the clock's `tick`) and carries the actions out. The login's decisions are in
/// `ClientSession+Login.swift`; the runtime's part of it (registries, lookups, TLS) is
/// `ClientLogin`. When a server goes back to the pool: `ClientSession+Release.swift`.
public struct ClientSession {
    /// Where the client is; a state that needs data carries it, so that no server is held, and
    /// no wait timed, outside the states that have them.
    public enum State: Equatable, Sendable {
        /// From the connection to the StartupMessage's checks; the login's data is carried by
        /// the login's states and dropped with them.
        case startup(Login)
        /// Waiting for auth_query to find the user's secret.
        case lookingUpSecret(Login)
        case authenticating(Login)
        /// Authenticated, but waiting for a server to learn the pool's parameters (or for a
        /// replication connection's own server): still the login, client_login_timeout included.
        case awaitingWelcome(Login)
        case idle
        /// Queued for a server since then.
        case waiting(since: NIODeadline)
        /// Holding this server (until `ClientSession+Release.swift` gives it back), with the
        /// link's own state (its scanner, kept bytes, lease and parameter sync) in it.
        case linked(ServerSessionState)
        /// A replication connection on a server of its own: every byte passes through both ways.
        case passThrough(ServerSessionState)
        /// Connected to the admin console, with its messages not answered yet.
        case admin(Console)
        case closed
    }

    /// What the connection is to do. Plain values, so that appending and carrying them out copies
    /// nothing that is reference counted: the bytes and errors they refer to wait in the session
    /// (`toServer`, `toClient`, `closing`, `accepted`).
    public enum Action: Equatable, Sendable {
        /// Send and clear `toServer` (client bytes and the pooler's rewrites, in order).
        case sendToServer
        /// Write the next of `toClient` (they are written in order). Writes are flushed at the end
        /// of the event loop's turn at the latest, with the turn's other answers.
        case writeToClient
        /// Write these bytes of `serverBuffer` (the server's bytes as read, passed on unchanged).
        case writeServerBytes(start: Int, length: Int)
        /// Flush the writes now.
        case flushClient
        /// Join the pool's queue for a server.
        case requestServer
        /// Leave the pool's queue.
        case leaveQueue
        /// Hand in `traffic`, unlink the server and give it back; `reusable` false closes it.
        case releaseServer(reusable: Bool)
        /// Unlink the server, clean it as `ServerReset` says (`serverResetQuery`, DISCARD ALL, or
        /// UNLISTEN *), then give it back.
        case resetAndReleaseServer(ServerReset)
        /// Send a CancelRequest for the linked server's backend; with `reportBack`, tell the session
        /// (`cancelFinished`) when it has reached PostgreSQL.
        case cancelServerQuery(reportBack: Bool)
        /// `accepted` holds names of prepared statements a server accepted (so other clients'
        /// Parses of them can be answered without a server).
        case statementsAccepted
        /// A server found a prepared statement's cached plan stale (the schema changed): the
        /// pooler starts a new stale-plan epoch (`PreparedStatementTracker.epoch`).
        case statementsStale
        /// The client started or stopped keeping its server for its session state (`sessionState`
        /// says why).
        case pinChanged(pinned: Bool)
        /// This many settings of the client's were made on the server it was lent.
        case settingsReplayed(Int)
        /// The client's channels changed (`listenChanges`): tell the pool's listener. Channels
        /// added hold the client's ReadyForQuery until `listenConfirmed`.
        case listenChanged
        /// Add `traffic` to the database's totals and zero it (also done before `releaseServer`).
        case handInTraffic
        /// A wait, query or transaction time for /metrics, when `reportsTimings` (SHOW LATENCY's
        /// histograms in `latency` are recorded by the session itself).
        case recordTiming(LatencySet.Kind, microseconds: Int)
        case logSlowQuery(microseconds: Int)
        /// The session needs the clock's ticks (`ownNotificationTick`) though it may have no
        /// timeouts: a ReadyForQuery waits, for a bounded time, for the client's own notification.
        case watchClock
        /// The session needs the clock no more (`tick` found nothing to watch).
        case unwatchClock
        /// Send `closing`'s error (FATAL) and close; its reason is logged.
        case closeWithError
        /// The client said Terminate.
        case terminate
        /// The client was closed (by any of the above or the peer): forget it everywhere.
        case forget
        /// Run `adminCommand` on the admin console, then call `adminAnswered`.
        case runAdminCommand
        /// Count an admin console exchange in the console's traffic (SHOW STATS' pgbouncer row).
        case countConsole(received: Int, sent: Int)

        /// A step of the login the runtime carries out (its registries, lookups, TLS).
        case login(LoginStep)

        // Flow control (`ClientSession+FlowControl.swift`).
        /// Stop reading the client until `resumeClientReads`.
        case pauseClientReads
        case resumeClientReads
        /// Stop reading the linked server until `resumeServerReads` or the unlink.
        case pauseServerReads
        case resumeServerReads
    }

    /// What a login needs of the runtime; each step but the last two answers with an event.
    public enum LoginStep: Equatable, Sendable {
        /// Answer SSLRequest with 'S' and start the TLS handshake.
        case startTLS
        /// Register the client (max_client_conn, per-address limits), then call `registered`.
        case register
        /// Look the user's secret up with auth_query, then call `secretLookedUp`.
        case lookUpSecret
        /// The client proved who it is: remember `learnedServerSecret`, then call `enter`.
        case authenticated
        /// Join the pool, then call `welcome` (or `awaitWelcome`).
        case joinPool
        /// A replication connection: open a server connection of its own (with the client's
        /// `replication` and other startup parameters), then call `passThroughStarted`.
        case openReplicationServer
        /// A CancelRequest: pass it on to the backend of the client with this key.
        case forwardCancel(processID: Int32, secretKey: Int32)
        /// Close without a word (after a CancelRequest).
        case closeQuietly
    }

    public internal(set) var state: State
    /// A replication connection's kind (the `replication` startup parameter).
    public internal(set) var replication: ReplicationMode?
    /// Who logged in, to which database.
    public internal(set) var user = ""
    public internal(set) var database = ""
    /// The client's connection is encrypted (it sent SSLRequest and the handshake was started).
    public var tls = false
    /// The TLS handshake was started and has not finished (`tlsEstablished`).
    var tlsHandshaking = false
    /// What a client rarely needs (why it is being closed), kept out of line: made when first
    /// written.
    var scratch: Scratch?

    final class Scratch {
        var closing: Refusal?
    }

    /// The pooler's own SETs running on the linked server (`ServerSessionState.sync`). A class:
    /// made only when they run, while the check that none does, made for every server message,
    /// stays a pointer's.
    final class ParameterSync {
        /// An error the server answered them with.
        var error: PostgresError?
        /// Reported parameters they set, with the server's value before (`spellingsLearned`).
        var spellings: [String: String]

        init(spellings: [String: String]) { self.spellings = spellings }
    }

    /// What only the login needs (a few hundred bytes an idle client need not carry), carried by
    /// the login's states.
    public final class Login: Equatable, @unchecked Sendable {
        /// The StartupMessage, until the client is registered.
        var startup: Startup?
        var authMethod = AuthType.trust
        var auth: ClientAuthStateMachine?
        /// max_packet_size, taken once the login is over.
        let messageLimitAfterLogin: Int
        var scramIterations = 4096
        /// When client_login_timeout closes the client if it is still logging in.
        var loginDeadline: NIODeadline?

        init(messageLimitAfterLogin: Int) { self.messageLimitAfterLogin = messageLimitAfterLogin }

        /// The same login.
        public static func == (a: Login, b: Login) -> Bool { a === b }
    }

    /// The login's data, while logging in.
    var login: Login? {
        switch state {
        case .startup(let login), .lookingUpSecret(let login), .authenticating(let login),
            .awaitingWelcome(let login):
            login
        default: nil
        }
    }

    var writableScratch: Scratch {
        mutating get {
            if let scratch { return scratch }
            let made = Scratch()
            scratch = made
            return made
        }
    }

    var startup: Startup? {
        get { login?.startup }
        set { login?.startup = newValue }
    }
    var auth: ClientAuthStateMachine? {
        get { login?.auth }
        set { login?.auth = newValue }
    }

    struct Startup {
        var minor: Int
        var parameters: [String: String]
        var unrecognized: [String]
    }
    /// On the admin console with the read-only commands only (as a stats_users user).
    public var adminReadOnly: Bool {
        if case .admin(let console) = state { console.readOnly } else { false }
    }
    public var isAdmin: Bool {
        if case .admin = state { true } else { false }
    }
    public var poolMode = PoolMode.transaction
    /// Named prepared statements kept working across servers (transaction and statement pooling
    /// with max_prepared_statements > 0). While it is on, client bytes stay in `inbound` until a
    /// server is linked, because how they are rewritten depends on what that server has prepared.
    public var prepared: PreparedStatementTracker?
    public var scanner: MessageScanner
    public internal(set) var tracker = TransactionTracker()
    /// session_state = track in transaction or statement pooling: statements are read for state.
    public var tracksSessionState = false
    /// The client's settings and pins; made when its first statement with an effect is sent.
    public internal(set) var sessionState: SessionState?
    /// The SQL of the client's last Parse without effects (`readMessage`).
    var lastPlainParse: [UInt8] = []
    /// standard_conforming_strings as the client has it (`wanted`): off, `''` takes backslashes.
    var standardStrings = true
    /// session_state = refuse: a statement that would pin is sent as one that fails instead.
    public var refusesPins = false
    /// Why the message being read is refused (session_state = refuse), until it is rewritten.
    var refusal: PinReason?
    /// Cancel requests for this client still on their way to PostgreSQL: the server is not given
    /// back until they have arrived (one still on its way could hit the next client's query).
    public internal(set) var cancelsInFlight = 0
    /// A ReadyForQuery that made the client listen on new channels waits, with what the server
    /// sent after it, until the pool's listener listens on them too: a NOTIFY the client's
    /// application sends once it has its answer must reach it.
    var readyHold = ReadyHold.none
    /// The held ReadyForQuery waits for the client's own notification (`ownNotificationTick`).
    var waitingOwnNotification = false
    /// server_fast_close: the session's server is to be replaced, so the client is closed at the
    /// end of its transaction.
    var endsAtTransactionEnd = false
    /// For `listenChanged`; the connection takes them.
    public var listenChanges = ChannelChanges()
    /// Notifications that could not be written at once (the client is in the middle of a reply,
    /// or not reading); past `notifyQueueSize` of them the client is closed.
    var notificationQueue: [ByteBuffer] = []
    /// notify_queue_size.
    public var notifyQueueSize = 4096

    enum ReadyHold: UInt8 {
        case none
        case held
        /// Confirmed: the held ReadyForQuery, settled already, is passed on.
        case resuming
    }

    /// What the current lend started from, until the server answers (`ClientSession+Replay`);
    /// made at the first lend and reused.
    var leaseStart: LeaseStart?

    /// The server the client holds, while linked or passing through.
    public var server: ServerSessionState? {
        switch state {
        case .linked(let server), .passThrough(let server): server
        default: nil
        }
    }
    /// The pooler's own parameter sync runs on the linked server.
    @inline(__always) public var isSyncing: Bool {
        if case .linked(let server) = state { server.sync != nil } else { false }
    }
    /// Both ways of the link end at a message's end: the client's bytes sent to the server (none
    /// of a message still to come from the client) and the server's read (none kept, none of a
    /// message still to come); true when no server is linked.
    @inline(__always) var linkBetweenMessages: Bool {
        guard case .linked(let server) = state else { return true }
        return scanner.atMessageBoundary && server.kept.isEmpty && server.scanner.atMessageBoundary
    }
    /// No server message is half read (or no server is linked).
    @inline(__always) var atServerMessageBoundary: Bool {
        if case .linked(let server) = state { server.scanner.atMessageBoundary } else { true }
    }
    public var isAwaitingWelcome: Bool {
        if case .awaitingWelcome = state { true } else { false }
    }
    @inline(__always) public var isLinked: Bool {
        if case .linked = state { true } else { false }
    }
    // Matched rather than compared: `==` on a State with payloads is a call that compares them.
    @inline(__always) public var isClosed: Bool {
        if case .closed = state { true } else { false }
    }
    @inline(__always) var isIdle: Bool {
        if case .idle = state { true } else { false }
    }
    @inline(__always) public var isWaiting: Bool {
        if case .waiting = state { true } else { false }
    }
    @inline(__always) var isPassingThrough: Bool {
        if case .passThrough = state { true } else { false }
    }
    /// Linked or passing through: client bytes go to a server.
    @inline(__always) var holdsServer: Bool {
        switch state {
        case .linked, .passThrough: true
        default: false
        }
    }
    /// Client bytes kept for later: before login ends, or while prepared statements are tracked
    /// and no server is linked.
    public var inbound = KeptBytes()
    /// Client bytes waiting for a server.
    var pending: [ByteBuffer] = []
    /// Which sides are read, and why not.
    public internal(set) var flow = FlowControl()
    /// max_buffered_bytes: client bytes held for a server beyond this stop the client's reads.
    public var bufferLimit = 65536
    /// What `sendToServer` sends; the connection clears it after sending.
    public var toServer: [ByteBuffer] = []
    /// What `writeToClient` writes, one buffer per action; the connection clears it once it has
    /// carried out all actions.
    public var toClient: [ByteBuffer] = []
    /// The server's bytes of the last `serverBytes` event, for `writeServerBytes`; dropped once the
    /// actions are carried out, so that an idle client holds no read buffer.
    public var serverBuffer: ByteBuffer?
    /// Why the session closed, for `closeWithError`.
    public internal(set) var closing: Refusal? {
        get { scratch?.closing }
        set { writableScratch.closing = newValue }
    }
    /// For `statementsAccepted`; the connection takes them.
    public var accepted: [String] = []
    /// The pooler's stale-plan epoch as the connection last read it; the tracker takes it before it
    /// names statements (`PreparedStatementTracker.epoch`).
    public var statementEpoch = 0
    /// The tracked parameters the client logged in with: what RESET and RESET ALL go back to.
    var startupParameters: [String: String] = [:]
    /// The values of the tracked parameters as the client should see them.
    @TrackedParameters public var wanted: [String: String] = [:]
    /// `wanted` with its tracked values worked out, as a shared welcome has it.
    public var wantedParameters: TrackedParameters {
        get { _wanted }
        set { _wanted = newValue }
    }
    /// Counters for SHOW STATS, handed to the pool's totals once per transaction.
    public var traffic = TrafficStats()
    /// This database's SHOW LATENCY histograms on the client's event loop.
    public var latency: LatencyRecorder?
    /// Wait, query and transaction times also go out as `recordTiming` (for /metrics).
    public var reportsTimings = false
    /// When the client joined the pool's queue, while it waits.
    public var waitStart: NIODeadline? {
        if case .waiting(let since) = state { since } else { nil }
    }
    var queryStart: NIODeadline?
    var transactionStart: NIODeadline?
    /// log_slow_query_ms in microseconds (0 = off).
    public var slowQueryThreshold = 0
    /// The first bytes of the request being timed, kept (as a slice) only with log_slow_query_ms.
    var slowQueryRequest: ByteBuffer?
    /// The client-side timeouts and the moments they count from: nil while all of them are off
    /// (the default), so that a client without them does not carry their bytes.
    public var timeoutClock: TimeoutClock?
    /// server_reset_query and server_reset_query_always, for a client the pooler closes itself.
    public var serverResetQuery = ""
    public var serverResetQueryAlways = false
    /// disable_pqexec: the simple query protocol is refused.
    public var refusesSimpleQuery = false

    public final class TimeoutClock {
        public let settings: ClientTimeoutSettings
        var idleSince: NIODeadline
        var linkedAt: NIODeadline
        var queryStartedAt: NIODeadline?
        var quietSince: NIODeadline?

        public init(settings: ClientTimeoutSettings, now: NIODeadline) {
            self.settings = settings
            idleSince = now
            linkedAt = now
        }
    }

    /// The longest message a client may send before it is logged in (a password, a SCRAM
    /// message), as PostgreSQL bounds authentication tokens: more is refused at its header, not
    /// read into memory.
    public static let loginMessageLimit = 65_535

    /// The longest message PostgreSQL takes (its length field at most 1 GB - 2): a longer one is
    /// refused at its header instead of being passed on (or held whole) only to be refused there.
    public static let largestMessage = 0x3FFF_FFFE

    /// `maxMessageLength` applies once the client is logged in (max_packet_size); `bufferLimit`
    /// is max_buffered_bytes.
    public init(maxMessageLength: Int, bufferLimit: Int = 65536) {
        self.bufferLimit = bufferLimit
        scanner = MessageScanner(maxMessageLength: min(maxMessageLength, Self.loginMessageLimit))
        state = .startup(Login(messageLimitAfterLogin: min(maxMessageLength, Self.largestMessage)))
    }

    /// The login is over: messages up to max_packet_size are taken from now on (the login's data
    /// goes with the state that follows).
    mutating func endLogin() {
        if let login { scanner.maxMessageLength = login.messageLimitAfterLogin }
    }

    /// The connection carried out every action: the bytes they referred to are let go.
    @inlinable @inline(__always)
    public mutating func actionsCarriedOut() {
        if serverBuffer != nil { serverBuffer = nil }
        // Rarely used after login: its storage is not kept by an idle client.
        if !toClient.isEmpty { toClient.removeAll() }
    }

    /// Queues `bytes` for the client.
    mutating func write(_ bytes: ByteBuffer, into actions: inout Actions) {
        toClient.append(bytes)
        actions.append(.writeToClient)
    }

    // MARK: Moving between states

    /// Closes the client with `error`: the server it holds goes back (closed unless clean).
    public mutating func close(_ error: PostgresError, reason: String, into actions: inout Actions) {
        guard !isClosed else { return }
        closing = Refusal(error, reason: reason)
        // A TLS handshake that never finished would hold the error, and the connection, until
        // the runtime's cap.
        closing!.atOnce = tlsHandshaking
        actions.append(.closeWithError)
        finish(serverResetQuery: serverResetQuery, resetAlways: serverResetQueryAlways, into: &actions)
    }

    /// Login is over: the client is told it may send queries.
    public mutating func loggedIn(now: NIODeadline, into actions: inout Actions) {
        if login != nil { endLogin() }
        state = .idle
        timeoutClock?.idleSince = now
        if !pending.isEmpty {
            state = .waiting(since: now)
            actions.append(.requestServer)
        }
    }
}

extension String {
    /// The text as a SQL string literal: quoted, with single quotes doubled.
    public var sqlLiteral: String {
        var s = "'"
        for c in self {
            if c == "'" { s.append("''") } else { s.append(c) }
        }
        s.append("'")
        return s
    }
}
