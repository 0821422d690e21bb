import DequeModule
import NIOCore

/// What state a client's session holds beyond its transactions, with PostgreSQL's rules for when
/// a statement's effect becomes the session's: at its transaction's commit, never for one that
/// rolls back or fails, undone by ROLLBACK TO SAVEPOINT. Settings are replayed on whichever server
/// the client is lent; what cannot be replayed pins the client to its server.
///
/// Effects are collected per request (a Query, or the extended messages up to a Sync) and settled
/// by that request's ReadyForQuery, whose transaction status and whether an error came before it
/// say what happened. Where the rules cannot tell (an error in a request that also commits, say),
/// the client is pinned for good: its server then holds the truth.
public final class SessionState {
    /// A setting and the statement that sets it again.
    public struct Setting: Equatable, Sendable {
        public var name: String
        public var statement: String
    }

    /// The client's settings, in the order they were made: what a server it is lent must have.
    public internal(set) var settings: [Setting] = []
    /// Session state that keeps the client on its server, by reason and key (a count per key:
    /// advisory locks nest).
    public internal(set) var pins: [PinReason: [String: Int]] = [:]
    /// The server has had state of this client's that no other client may see: it is reset before
    /// it goes back to the pool.
    public internal(set) var serverNeedsReset = false
    /// DISCARD ALL ran: the server no longer has the pooler's prepared statements.
    public internal(set) var statementsDiscarded = false
    /// The channels the client listens on (committed LISTENs): the pool's listener connection
    /// serves them.
    public internal(set) var channels: Set<String> = []
    /// The channels the pool's listener was last told about (`takeChannelChanges`).
    var reportedChannels: Set<String> = []
    /// The linked server ran a LISTEN of the client's: it runs UNLISTEN * before it goes back.
    public internal(set) var serverListens = false

    /// Effects of the open transaction block, applied at its commit.
    var open: [Entry] = []
    /// The open transaction failed: its COMMIT is a rollback.
    var openFailed = false
    /// Requests sent with effects, waiting for their ReadyForQuery.
    var batches: Deque<Batch> = []
    /// Effects of extended-protocol messages not yet ended by a Sync.
    var collecting: [SessionEffect] = []
    /// An ErrorResponse came since the last ReadyForQuery.
    var errorSeen = false
    /// Effects of named prepared statements, sent again with each Bind of them.
    var namedEffects: [String: [SessionEffect]] = [:]

    struct Entry {
        var effect: SessionEffect
        /// From a request that failed part way: it may not have run.
        var uncertain = false
    }

    struct Batch {
        /// ReadyForQuery messages due before this request's own.
        var ahead: Int
        var effects: [SessionEffect]
    }

    public init() {}

    /// Startup parameters the pooler does not follow otherwise: the first settings, and what
    /// RESET, RESET ALL and DISCARD ALL go back to, as PostgreSQL takes them for the session's
    /// defaults.
    func startWith(_ parameters: [(String, String)]) {
        for (name, value) in parameters {
            settings.removeAll { $0.name == name }
            settings.append(
                Setting(
                    name: name,
                    statement: "SELECT pg_catalog.set_config(\(name.sqlLiteral), \(value.sqlLiteral), false)"))
        }
        startup = settings
        startupValues = parameters
    }

    /// The settings from the client's startup parameters (`startWith`).
    var startup: [Setting] = []

    /// Reported parameters reset since `takeResets` (`.reported(reset:)`, RESET ALL, DISCARD ALL):
    /// by name, true when the last word on it was a reset; `all` when every one was reset first.
    struct Resets {
        var all = false
        var names: [String: Bool] = [:]
        /// Whether the server's settings may now differ from the client's.
        var any = false
    }
    var resets = Resets()

    /// Tracked parameters the server does not report that a committed reset put back to the
    /// server's defaults: the pooler no longer knows them set there.
    var serverDefaults: Set<String> = []
    /// A committed reset may have left the server's settings other than the client's: a server
    /// the client keeps is set again once it is idle.
    var resyncDue = false
    /// The server's ParameterStatus reports held while a reset is in flight, by name: the client
    /// is shown the values PostgreSQL would show it once the request is settled.
    var heldReports: [String: String] = [:]
    /// Channels the client listens on that its own committed NOTIFY sent to: the ReadyForQuery
    /// waits for the pool's listener to hand those notifications over (`awaitingNotify`), as
    /// PostgreSQL sends them before it.
    var selfNotified: Set<String> = []
    var awaitingNotify: Set<String> = []
    /// When the wait began (the sweeper's first tick after it); it ends after `notifyWait`.
    var notifyWaitSince: NIODeadline?
    static let notifyWait = TimeAmount.seconds(1)
    /// Startup values to set for the rest of the open transaction (`ClientSession.localSync`).
    var localSync: String?

    /// Whether a request in flight or the open transaction may reset a reported parameter.
    var mayReset: Bool {
        batches.contains { $0.effects.contains(where: \.resetsParameters) }
            || collecting.contains(where: \.resetsParameters) || open.contains(where: \.effect.resetsParameters)
    }

    /// Notes a reset (or a SET after one) for `parametersSettled`: as the statement runs, and
    /// again when a transaction holding it commits.
    func noteReset(_ effect: SessionEffect) {
        switch effect {
        case .resetAll, .discardAll: resets = Resets(all: true, names: [:], any: true)
        case .reported(let name, let reset):
            resets.names[name] = reset
            resets.any = true
        case .reset(let name):
            resets.names[name] = true
            resets.any = true
        case .set(let name, _):
            if resets.any { resets.names[name] = false }
        default: break
        }
    }

    /// The value of a startup setting (`startWith`), by name.
    func startupValue(_ name: String) -> String? { startupValues.first { $0.0 == name }?.1 }
    var startupValues: [(String, String)] = []

    /// What was reset since the last call.
    func takeResets() -> Resets? {
        guard resets.any else { return nil }
        defer { resets = Resets() }
        return resets
    }

    /// Whether the client must keep its server.
    public var isPinned: Bool { !pins.isEmpty }

    /// The first reason it is pinned, for SHOW CLIENTS.
    public var pinReason: PinReason? { pins.keys.min() }

    /// Whether ReadyForQuery and ErrorResponse messages matter now.
    public var awaitsReplies: Bool { !batches.isEmpty }

    // MARK: Events

    /// Effects of a statement about to be sent (Query, or Parse/Bind of the extended protocol).
    func statementSent(_ effects: [SessionEffect]) {
        collecting += effects
    }

    /// A request (Query, Sync, FunctionCall) goes to the server; `outstanding` requests were sent
    /// before it and are not answered yet.
    func requestSent(outstanding: Int) {
        guard !collecting.isEmpty else { return }
        // BEGIN, COMMIT and ROLLBACK alone matter only while something waits for them (savepoints
        // are kept: a ROLLBACK TO must find them).
        if batches.isEmpty, open.isEmpty, collecting.allSatisfy({ $0 == .begin || $0 == .commit || $0 == .rollback }) {
            collecting.removeAll()
            return
        }
        batches.append(Batch(ahead: outstanding, effects: collecting))
        collecting.removeAll()
    }

    func errorReceived() {
        errorSeen = true
    }

    /// A ReadyForQuery: the request it answers is settled. `before` is the transaction status
    /// before it. `server` is the linked server's settings, kept equal to what was applied.
    func ready(before: TransactionStatus, after: TransactionStatus, server: inout [String: String]) {
        for index in batches.indices { batches[index].ahead -= 1 }
        guard let first = batches.first, first.ahead < 0 else {
            errorSeen = false
            return
        }
        batches.removeFirst()
        settle(first.effects, before: before, after: after, failed: errorSeen, server: &server)
        errorSeen = false
    }

    /// The requests in flight, to go back to (`ClientSession.LeaseStart`).
    struct Mark {
        var batches: Int
        var collecting: [SessionEffect]
        var errorSeen: Bool
    }

    var mark: Mark { Mark(batches: batches.count, collecting: collecting, errorSeen: errorSeen) }

    /// What was sent since `mark` did not run: it will be read again when it is sent again.
    func restore(_ mark: Mark) {
        if batches.count > mark.batches { batches.removeLast(batches.count - mark.batches) }
        collecting = mark.collecting
        errorSeen = mark.errorSeen
    }

    /// The client left the queue or its link before answers came: what it sent did not run.
    func requestsDropped() {
        batches.removeAll()
        collecting.removeAll()
        errorSeen = false
    }

    // MARK: The rules

    func settle(
        _ effects: [SessionEffect], before: TransactionStatus, after: TransactionStatus, failed: Bool,
        server: inout [String: String]
    ) {
        var inTransaction = before != .idle || !open.isEmpty
        // Failed by a request that had no effects of its own.
        if before == .failed { openFailed = true }
        // Session advisory locks stay even when their transaction rolls back, and a pin too many
        // only costs a server for a while: pins count whatever happens.
        for case .pin(let reason, let key) in effects { pin(reason, key) }
        if !failed {
            for effect in effects { step(effect, &inTransaction, server: &server) }
        } else if after == .idle {
            // The request's implicit transaction, or the block it was in, rolled back; unless it
            // also committed part of itself, and which part is unknown.
            if effects.contains(.commit) {
                unknown()
                return
            }
            discardOpen()
            inTransaction = false
        } else {
            // Still in a transaction block, now failed: what ran before the error waits for the
            // block's end with the rest, marked as perhaps not having run.
            if effects.contains(where: { $0.isTransactionControl && $0 != .begin }) {
                unknown()
                return
            }
            for effect in effects where !effect.isTransactionControl && !effect.isPin {
                open.append(Entry(effect: effect, uncertain: true))
            }
            inTransaction = true
            openFailed = after == .failed
        }
        if inTransaction != (after != .idle) {
            // Something this model does not follow happened to the transaction.
            unknown()
        }
    }

    func step(_ effect: SessionEffect, _ inTransaction: inout Bool, server: inout [String: String]) {
        // What the client is shown of reported parameters follows the statements as they run,
        // committed or not (the server's reports do too).
        noteReset(effect)
        switch effect {
        case .begin:
            inTransaction = true
        case .commit:
            if inTransaction, !openFailed {
                if open.contains(where: \.uncertain) {
                    unknown()
                    return
                }
                for entry in open { apply(entry.effect, server: &server) }
            }
            discardOpen()
            inTransaction = false
        case .rollback:
            discardOpen()
            inTransaction = false
        case .savepoint:
            if inTransaction { open.append(Entry(effect: effect)) }
        case .release(let name):
            if let index = open.lastIndex(where: { $0.effect == .savepoint(name) }) {
                // It and every savepoint after it go; the effects stay in the transaction.
                var kept: [Entry] = Array(open[..<index])
                for entry in open[(index + 1)...] {
                    if case .savepoint = entry.effect { continue }
                    kept.append(entry)
                }
                open = kept
            }
        case .rollbackTo(let name):
            if let index = open.lastIndex(where: { $0.effect == .savepoint(name) }) {
                open.removeSubrange((index + 1)...)
                openFailed = false
                if open.contains(where: \.uncertain) { unknown() }
            }
        case .pin:
            break  // counted already
        case .setLocal:
            if inTransaction { open.append(Entry(effect: effect)) }
        case .setFromCurrent(let name):
            // The value in effect: a SET LOCAL of this transaction makes it the session's; else the
            // session's own value stays.
            guard inTransaction else { return }
            for entry in open.reversed() {
                switch entry.effect {
                case .setLocal(name, let statement):
                    open.append(Entry(effect: .set(name: name, statement: statement), uncertain: entry.uncertain))
                    return
                case .set(name, _), .reset(name), .resetAll, .discardAll:
                    return
                default:
                    continue
                }
            }
        default:
            if inTransaction { open.append(Entry(effect: effect)) } else { apply(effect, server: &server) }
        }
    }

    func discardOpen() {
        open.removeAll()
        openFailed = false
    }

    /// A committed effect becomes the session's (and the linked server's).
    func apply(_ effect: SessionEffect, server: inout [String: String]) {
        noteReset(effect)
        switch effect {
        case .set(let name, let statement):
            if name == "session_authorization" { roleReset(server: &server) }
            settings.removeAll { $0.name == name }
            settings.append(Setting(name: name, statement: statement))
            server[name] = statement
        case .reset(let name):
            if name == "session_authorization" { roleReset(server: &server) }
            // Back to the startup value, which the server does not have as its default.
            settings.removeAll { $0.name == name }
            if let first = startup.first(where: { $0.name == name }) { settings.append(first) }
            server[name] = nil
            if StartupParameters.unreported.contains(name) { serverDefaults.insert(name) }
            resyncDue = true
        case .resetAll:
            // RESET ALL leaves the role and the session authorization.
            settings.removeAll { !Self.notResetByResetAll.contains($0.name) }
            settings += startup.filter { !Self.notResetByResetAll.contains($0.name) }
            server = server.filter { Self.notResetByResetAll.contains($0.key) }
            serverDefaults.formUnion(StartupParameters.unreported)
            resyncDue = true
        case .reported(_, let reset):
            if reset { resyncDue = true }
        case .discardAll:
            settings = startup
            server.removeAll()
            serverDefaults.formUnion(StartupParameters.unreported)
            resyncDue = true
            statementsDiscarded = true
            channels.removeAll()
            let loaded = pins[.load]
            pins.removeAll()
            pins[.load] = loaded
        case .unpin(let reason, let key):
            guard var keys = pins[reason], let count = keys[key] else { return }
            keys[key] = count > 1 ? count - 1 : nil
            pins[reason] = keys.isEmpty ? nil : keys
        case .unpinAll(let reason):
            pins[reason] = nil
        case .listen(let channel):
            channels.insert(channel)
            serverListens = true
        case .unlisten(let channel):
            channels.remove(channel)
        case .unlistenAll:
            channels.removeAll()
        case .notify(let channel):
            if channels.contains(channel) { selfNotified.insert(channel) }
        default:
            break
        }
    }

    static let notResetByResetAll: Set<String> = ["role", "session_authorization"]

    /// SET SESSION AUTHORIZATION, and its RESET, end a SET ROLE too.
    func roleReset(server: inout [String: String]) {
        settings.removeAll { $0.name == "role" }
        server["role"] = nil
    }

    func pin(_ reason: PinReason, _ key: String) {
        serverNeedsReset = true
        var keys = pins[reason] ?? [:]
        // Locks nest; a table, cursor, channel or statement is there or not.
        keys[key] = reason == .advisoryLock ? (keys[key] ?? 0) + 1 : 1
        pins[reason] = keys
    }

    /// The rules cannot tell what the session holds: the client keeps its server for good.
    func unknown() {
        discardOpen()
        pin(.unknown, "")
    }

    /// The server was reset (DISCARD ALL) after the client left it.
    func serverWasReset() {
        serverNeedsReset = false
        statementsDiscarded = false
        serverListens = false
    }

    /// How the server the client leaves is cleaned of its state, if it must be.
    func resetForRelease() -> ServerReset? {
        if serverNeedsReset {
            serverWasReset()
            return .discardAll
        }
        if serverListens {
            serverListens = false
            return .unlisten
        }
        return nil
    }

    func statementsForgotten() { statementsDiscarded = false }

    /// Whether the channels changed since the pool's listener was last told.
    var channelsChanged: Bool { channels != reportedChannels }

    /// A NotificationResponse (its body) the server read on a channel the pool's listener was not
    /// told of. The server listens only on channels the client's own LISTENs committed in this
    /// lend (it runs UNLISTEN * before it goes back), so this is a LISTEN that committed with the
    /// transaction just ended, and what that commit notified: the listener cannot have it.
    func listenerLacks(notification body: ByteBuffer) -> Bool {
        var reader = body
        guard reader.readInteger(as: Int32.self) != nil, let channel = reader.readNullTerminatedString() else {
            return false
        }
        return !reportedChannels.contains(channel)
    }

    /// The channels to subscribe and to unsubscribe since the pool's listener was last told.
    func takeChannelChanges() -> ChannelChanges {
        let changes = ChannelChanges(
            added: channels.subtracting(reportedChannels).sorted(),
            removed: reportedChannels.subtracting(channels).sorted())
        reportedChannels = channels
        return changes
    }
}

/// Channels a client started or stopped listening on.
public struct ChannelChanges: Equatable, Sendable {
    public var added: [String] = []
    public var removed: [String] = []

    public init(added: [String] = [], removed: [String] = []) {
        self.added = added
        self.removed = removed
    }

    public var isEmpty: Bool { added.isEmpty && removed.isEmpty }
}

/// How a server is cleaned before it goes back to the pool.
public enum ServerReset: UInt8, Sendable {
    /// server_reset_query.
    case resetQuery
    /// DISCARD ALL: the client left state that cannot be undone otherwise.
    case discardAll
    /// UNLISTEN *: the client's LISTENs ran there.
    case unlisten

    /// The query that cleans the server, given server_reset_query.
    public func sql(serverResetQuery: String) -> String {
        switch self {
        case .resetQuery: serverResetQuery
        case .discardAll: "DISCARD ALL"
        case .unlisten: "UNLISTEN *"
        }
    }
}

extension SessionEffect {
    var isReservedName: Bool {
        if case .pin(.reservedName, _) = self { return true }
        return false
    }

    var resetsParameters: Bool {
        switch self {
        case .resetAll, .discardAll, .reported(_, reset: true): true
        default: false
        }
    }

    var isPin: Bool {
        if case .pin = self { return true }
        return false
    }
}
