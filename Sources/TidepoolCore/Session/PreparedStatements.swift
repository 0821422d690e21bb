import Crypto
import DequeModule
import NIOCore

/// The prepared statements one server connection holds, by their pooler-wide names, with the
/// least-recently-used one first out when the cache is full.
public struct ServerStatementCache: Sendable {
    struct Copy {
        var lastUse: UInt64
        /// The copy's result shape (`ResultShape`), once a Describe of it was answered.
        var shape: UInt64?
    }

    public private(set) var capacity: Int
    private var copies: [String: Copy] = [:]
    private var clock: UInt64 = 0

    public init(capacity: Int) {
        self.capacity = max(capacity, 1)
    }

    /// max_prepared_statements changed (SET, RELOAD): a larger cache takes effect at once; a
    /// smaller one closes its least-recently-used statements as the next ones are prepared
    /// (`evictOverflow`).
    public mutating func resize(to capacity: Int) {
        self.capacity = max(capacity, 1)
    }

    /// One statement past the capacity, least recently used first, to be closed; nil within it.
    public mutating func evictOverflow() -> String? {
        guard copies.count > capacity, let oldest = leastRecentlyUsed else { return nil }
        copies[oldest] = nil
        return oldest
    }

    private var leastRecentlyUsed: String? { copies.min(by: { $0.value.lastUse < $1.value.lastUse })?.key }

    public var count: Int { copies.count }
    public func contains(_ name: String) -> Bool { copies[name] != nil }

    public mutating func touch(_ name: String) {
        clock &+= 1
        copies[name]?.lastUse = clock
    }

    /// Touches `name` if this server holds a copy of it known to have `shape`, in one lookup.
    mutating func touch(_ name: String, ifShaped shape: UInt64) -> Bool {
        guard let i = copies.index(forKey: name), copies.values[i].shape == shape else { return false }
        clock &+= 1
        copies.values[i].lastUse = clock
        return true
    }

    /// Records `name` as prepared (a new copy, not described yet); returns the name that must be
    /// closed to make room, if any.
    public mutating func insert(_ name: String) -> String? {
        var evicted: String?
        if copies[name] == nil, copies.count >= capacity {
            evicted = leastRecentlyUsed
            if let evicted { copies[evicted] = nil }
        }
        clock &+= 1
        copies[name] = Copy(lastUse: clock)
        return evicted
    }

    /// Records `name` as prepared again without evicting (an eviction that PostgreSQL skipped).
    mutating func restore(_ name: String) {
        clock &+= 1
        if copies[name] == nil { copies[name] = Copy(lastUse: 0) }
    }

    public mutating func remove(_ name: String) { copies[name] = nil }
    public mutating func removeAll() { copies.removeAll() }

    public func shape(of name: String) -> UInt64? { copies[name]?.shape }

    mutating func setShape(_ name: String, _ shape: UInt64?) { copies[name]?.shape = shape }
}

/// Makes a client's named prepared statements work on whichever server it is lent (transaction
/// pooling). The client's statement names stay the client's: each distinct statement (query text and
/// parameter types) gets a pooler-wide name, the server is sent a Parse under that name only when it
/// lacks it, and every client Bind/Describe/Close naming the statement is rewritten to match.
///
/// The replies the pooler causes or answers for itself are kept in step with the server's: a queue
/// holds one entry per client message that the server answers, in order, plus entries for the
/// pooler's own Parse and Close (whose answers are swallowed) and for answers made up without asking
/// the server (ParseComplete for a statement the server already has, CloseComplete for a client
/// Close). After an ErrorResponse the server skips to the next Sync; the queue does the same and
/// undoes what the skipped entries would have done.
public struct PreparedStatementTracker: Sendable {
    public struct Statement: Sendable, Equatable {
        /// The name the servers know it by.
        public var serverName: String
        /// The Parse body after the statement name: query text and parameter types.
        public var definition: ByteBuffer
        /// For a statement made with SQL PREPARE: what followed its name ("(types) AS query").
        public var sqlText: String? = nil
        /// The stale-plan epoch `serverName` was made in (see `epoch`).
        public var epoch = 0
        /// Parsed by the client without a server (`answerWithoutServer`): the first server it runs
        /// on parses it afresh, as PostgreSQL plans every Parse, even one that holds a copy.
        public var unparsed = false
        /// The result shape of the client's plan (`ResultShape`), from the first Describe of it
        /// the client asked for: a server's copy of another shape is never run for it.
        public var shape: UInt64? = nil
        /// Its result changed with the schema since the client planned it: every Bind fails with
        /// 0A000, as PostgreSQL's would, until the client prepares it again.
        public var stale = false
    }

    /// A client's Bind kept back until a server's fresh copy of its statement has been described
    /// and compared with the client's plan (`ResultShape`).
    struct HeldBind: Sendable {
        var client: String
        var portal: String
        var serverName: String
        /// The Bind after its statement name.
        var rest: ByteBuffer
    }

    enum Undo: Sendable {
        case forget(String)
        case restore(String, Statement)
    }

    /// The cases with a payload are boxed (`indirect`): the common `.pass` then moves through the
    /// queue as a couple of bytes instead of a wide enum copied with outlined retains.
    enum Entry: Sendable {
        /// A client message whose answer goes to the client as it comes.
        case pass(UInt8)
        /// A client Parse sent under the pooler-wide name; an error means neither has it.
        /// `again`: after a Close of the server's own copy, so a skipped one leaves that copy.
        indirect case parse(client: String, server: String, again: Bool = false)
        /// The pooler's own Parse before a Bind or Describe; its ParseComplete is swallowed.
        indirect case injectedParse(server: String, again: Bool = false)
        /// The pooler's own Close of an evicted statement; its CloseComplete is swallowed.
        indirect case injectedClose(server: String)
        /// An answer made up by the pooler, given to the client when its turn comes.
        /// `ready`: a ReadyForQuery with the transaction status of the moment follows.
        indirect case reply(ByteBuffer, undo: Undo?, ready: Bool = false)
        /// A simple Query running DISCARD ALL or DEALLOCATE ALL: once it succeeds, neither the client
        /// nor the server has any prepared statement.
        case clearingQuery(failed: Bool)
        /// A client's SQL PREPARE sent under the pooler-wide name; an error means neither has it.
        indirect case sqlPrepare(client: String, server: String, failed: Bool)
        /// The pooler's own simple Query (SQL PREPARE before an EXECUTE): all it answers is swallowed.
        indirect case injectedQuery(server: String, failed: Bool)
        /// The pooler's own Sync after an injected Parse; its ReadyForQuery is swallowed.
        case injectedSync
        /// A client message (`request`) sent under another name so that the server raises
        /// PostgreSQL's own error, which reaches the client with the client's name in it: a Parse
        /// of a name the client already has (under the statement's pooler-wide name), a Bind or
        /// Describe of a name in the pooler's namespace that is not the client's (under a name no
        /// server has: the client's session has no such statement).
        indirect case underServerName(request: UInt8, client: String, server: String)
        /// A Describe of a statement on this server, whose answer gives the server's copy its
        /// shape: the client's own (`client`, its answer passed on; the client's statement takes
        /// the shape if it has none), or the pooler's check of a fresh copy before a held Bind
        /// (`check`, answer swallowed; `held` is then released).
        indirect case describeShape(server: String, client: String, check: Bool)
        /// A Bind of a statement whose plan went stale, sent under a name no server has: the
        /// server's error becomes PostgreSQL's 0A000.
        case stalePlan

        var isPlain: Bool {
            if case .pass = self { return true }
            return false
        }
    }

    /// The client's statements by the client's names.
    public private(set) var statements: [String: Statement] = [:]
    /// The pooler's stale-plan epoch as this client last heard it. A server that finds a cached
    /// plan no longer valid after a schema change (0A000 "cached plan must not change result
    /// type") makes the pooler start a new epoch; statements then get new pooler-wide names, so
    /// every server really parses them again, as the drivers' own recovery expects.
    public var epoch = 0
    private var queue = Deque<Entry>()
    /// Entries in the queue other than plain `.pass`: while there are any, every server message
    /// must be looked at one by one.
    public private(set) var specials = 0
    /// Answers made up by the pooler that are due now, in order.
    private var dueReplies: [ByteBuffer] = []
    /// Statements a server accepted, not yet taken by `takeAccepted`.
    private var accepted: [String] = []
    /// A Bind waiting for the check of its statement's fresh copy; client messages after it wait
    /// too (`isHolding`).
    private var held: HeldBind? {
        get { checks.held }
        set { checks.held = newValue }
    }
    /// Messages for the server once a check is over (`takeReleased`).
    private var released: [ByteBuffer] {
        get { checks.released }
        set { checks.released = newValue }
    }
    /// A portal bound from a statement whose shape is not known yet: a Describe of it gives it.
    private var portalShape: (portal: String, client: String)? {
        get { checks.portalShape }
        set {
            checks.portalShape = newValue
            wantsPortalShape = newValue != nil
        }
    }
    /// A Describe of a portal is read: it may give a statement its shape (`portalShape`).
    public private(set) var wantsPortalShape = false
    /// The result-shape checks' state, behind one reference: fields of their own would make every
    /// copy and nil test of a session's optional tracker cost more (an outlined copy per server
    /// message in a profile), for state that is nearly always empty.
    private let checks = ShapeChecks()

    /// One session's, used on its event loop only.
    final class ShapeChecks: @unchecked Sendable {
        var held: HeldBind?
        var released: [ByteBuffer] = []
        var portalShape: (portal: String, client: String)?
    }
    /// The transaction status of the last ReadyForQuery, for made-up ones.
    private var lastStatus = TransactionStatus.idle

    /// Named Parse messages from the client.
    public private(set) var clientParseCount = 0
    /// Parse messages actually sent to servers (the client's and the pooler's own).
    public private(set) var serverParseCount = 0
    /// Bind messages of named statements.
    public private(set) var bindCount = 0

    public init() {}

    /// What a lend starts from (`ClientSession.LeaseStart`): the client's statements and counters.
    /// Nothing is outstanding then, so the queue is not part of it.
    struct Snapshot {
        var statements: [String: Statement]
        var lastStatus: TransactionStatus
        var counts: (clientParses: Int, serverParses: Int, binds: Int)
    }

    func snapshot() -> Snapshot {
        Snapshot(
            statements: statements, lastStatus: lastStatus,
            counts: (clientParseCount, serverParseCount, bindCount))
    }

    /// Back to `snapshot`: the server the client's messages were rewritten for is gone.
    mutating func restore(_ snapshot: Snapshot) {
        statements = snapshot.statements
        lastStatus = snapshot.lastStatus
        (clientParseCount, serverParseCount, bindCount) = snapshot.counts
        queue.removeAll()
        specials = 0
        dueReplies.removeAll()
        accepted.removeAll()
        held = nil
        released.removeAll()
        portalShape = nil
    }

    /// A Bind is held until a server's answer (`HeldBind`): the client's next messages wait.
    public var isHolding: Bool { held != nil }
    public var hasReleased: Bool { !released.isEmpty }

    /// What goes to the server now that a check is over.
    public mutating func takeReleased() -> [ByteBuffer] {
        defer { released.removeAll() }
        return released
    }

    /// No answer is outstanding and nothing is due.
    public var isQuiet: Bool { queue.isEmpty && dueReplies.isEmpty }
    public var hasDueReplies: Bool { !dueReplies.isEmpty }

    // MARK: Client messages

    /// Whether a client message needs `clientMessage`, from its type and the first bytes of its body
    /// (from `bodyStart` in `buffer`, as far as they have arrived). Parse, Bind, Describe and Close of
    /// the unnamed statement, and of portals, go through untouched; so does a Query that cannot be
    /// DISCARD, DEALLOCATE, PREPARE or EXECUTE.
    @inlinable
    public static func inspects(_ type: UInt8, _ buffer: ByteBuffer, bodyStart: Int) -> Bool {
        @inline(__always) func byte(_ i: Int) -> UInt8? {
            i < buffer.writerIndex ? buffer.getInteger(at: i, as: UInt8.self) : nil
        }
        switch type {
        case MessageType.parse:
            return byte(bodyStart) != 0
        case MessageType.bind:
            // Portal name, then statement name; only the unnamed portal is looked past.
            guard byte(bodyStart) == 0 else { return true }
            return byte(bodyStart + 1) != 0
        case MessageType.describe, MessageType.close:
            guard let kind = byte(bodyStart) else { return true }
            return kind != MessageType.targetPortal && byte(bodyStart + 1) != 0
        case MessageType.query:
            var i = bodyStart
            while let c = byte(i), c == 32 || c == 9 || c == 10 || c == 13 { i += 1 }
            guard let c = byte(i) else { return true }
            // d(iscard|eallocate), p(repare), e(xecute), either case.
            switch c | 0x20 {
            case UInt8(ascii: "d"), UInt8(ascii: "p"), UInt8(ascii: "e"): return true
            default: return false
            }
        default:
            return false
        }
    }

    /// How a message `inspects` accepts is read when it is longer than `limit`, nil when it need
    /// not be read after all. A Bind is read by its portal and statement names only (its
    /// parameters then go to the server as they arrive); a Query whose first word is none of
    /// DISCARD, DEALLOCATE, PREPARE and EXECUTE is forwarded. Until the bytes that decide have come,
    /// `.inspect` keeps it, and it is looked at again with more; what still cannot be decided from
    /// its first `namesLimit` bytes (a PREPARE of a huge statement) is held whole.
    public static func disposition(_ type: UInt8, _ buffer: ByteBuffer, bodyStart: Int, limit: Int)
        -> MessageDisposition?
    {
        guard let declared = buffer.getInteger(at: bodyStart - 4, as: Int32.self), Int(declared) > limit else {
            return .inspect
        }
        let available = min(buffer.writerIndex - bodyStart, Int(declared) - 4, namesLimit)
        return buffer.withUnsafeReadableBytes { raw -> MessageDisposition? in
            let body = UnsafeRawBufferPointer(rebasing: raw[(bodyStart - buffer.readerIndex)...].prefix(available))
            switch type {
            case MessageType.bind:
                guard let portalEnd = body.firstIndex(of: 0),
                    let nameEnd = body[(portalEnd + 1)...].firstIndex(of: 0)
                else { return .inspect }
                return .head(nameEnd + 1)
            case MessageType.query:
                guard let start = body.firstIndex(where: { $0 != 32 && $0 != 9 && $0 != 10 && $0 != 13 }),
                    let end = body[start...].firstIndex(where: { !(($0 | 0x20) >= 97 && ($0 | 0x20) <= 122) })
                else { return .inspect }
                let word = String(decoding: body[start..<end], as: UTF8.self).lowercased()
                return ["discard", "deallocate", "prepare", "execute"].contains(word) ? .inspect : nil
            default:
                return .inspect
            }
        }
    }

    static let namesLimit = 4096

    /// Whether a Query of at most `limit` bytes has `tidepool_` in it, in any case, or has not all
    /// come yet (it is then looked at again): with session_state = ignore only such a Query is
    /// read for SQL naming the pooler's statements. A longer one goes through unread, as every
    /// statement does in that mode.
    public static func mayNameReserved(_ buffer: ByteBuffer, bodyStart: Int, limit: Int) -> Bool {
        guard let declared = buffer.getInteger(at: bodyStart - 4, as: Int32.self), Int(declared) <= limit else {
            return false
        }
        guard buffer.writerIndex - bodyStart >= Int(declared) - 4 else { return true }
        return buffer.withUnsafeReadableBytes { raw in
            let body = UnsafeRawBufferPointer(
                rebasing: raw[(bodyStart - buffer.readerIndex)...].prefix(Int(declared) - 4))
            let prefix = Array(reservedPrefix.utf8.dropLast())
            var i = prefix.count
            while i < body.count {
                guard let underscore = body[i...].firstIndex(of: UInt8(ascii: "_")) else { return false }
                if zip(body[(underscore - prefix.count)..<underscore], prefix).allSatisfy({ $0 | 0x20 == $1 }) {
                    return true
                }
                i = underscore + 1
            }
            return false
        }
    }

    static func bindMessage(_ portal: String, _ serverName: String, rest: ByteBuffer) -> ByteBuffer {
        var message = ByteBufferAllocator().buffer(capacity: rest.readableBytes + serverName.utf8.count + 16)
        Wire.withMessage(MessageType.bind, into: &message) { m in
            m.writeNullTerminatedString(portal)
            m.writeNullTerminatedString(serverName)
            m.writeImmutableBuffer(rest)
        }
        return message
    }

    /// A fresh copy of the client's statement on this server (its old copy closed first), described
    /// and flushed, for a held Bind (`HeldBind`).
    private mutating func checkFreshCopy(
        _ client: String, _ statement: Statement, on server: inout ServerStatementCache, into out: inout [ByteBuffer]
    ) {
        if statement.unparsed { statements[client]?.unparsed = false }
        let parse = Self.parseMessage(statement.serverName, statement.definition)
        if server.contains(statement.serverName) {
            parseAgain(statement.serverName, server: &server, into: &out)
            server.setShape(statement.serverName, nil)
            out.append(parse)
            append(.injectedParse(server: statement.serverName, again: true))
        } else {
            prepareOnServer(
                statement.serverName, [(parse, .injectedParse(server: statement.serverName))], on: &server, into: &out)
        }
        out.append(Self.describeMessage(statement.serverName))
        append(.describeShape(server: statement.serverName, client: client, check: true))
        out.append(Self.simpleMessage(MessageType.flush))
    }

    /// The check of a held Bind's fresh copy is over (`shape` nil: it failed, and the server now
    /// skips to the next Sync): the Bind goes as it was, or, if the client's plan has another
    /// result, under a name no server has, to fail as PostgreSQL's Bind would.
    private mutating func releaseHeld(shape: UInt64?) {
        guard let bind = held else { return }
        held = nil
        if let shape, let planned = statements[bind.client]?.shape, planned != shape {
            statements[bind.client]?.stale = true
            released.append(Self.bindMessage(bind.portal, Self.absentName, rest: bind.rest))
            append(.stalePlan)
        } else {
            released.append(Self.bindMessage(bind.portal, bind.serverName, rest: bind.rest))
            append(.pass(MessageType.bind))
        }
    }

    /// PostgreSQL's error for a Bind of a statement whose result changed since it was planned.
    /// With PostgreSQL's file and routine fields, by which drivers (pgjdbc) know to prepare the
    /// statement again and retry.
    static var stalePlanError: ByteBuffer {
        var reply = ByteBufferAllocator().buffer(capacity: 128)
        Wire.withMessage(MessageType.errorResponse, into: &reply) { m in
            for (field, value) in [
                ("S", "ERROR"), ("V", "ERROR"), ("C", SQLState.featureNotSupported),
                ("M", "cached plan must not change result type"), ("F", "plancache.c"),
                ("R", "RevalidateCachedQuery"),
            ] {
                m.writeInteger(UInt8(ascii: Unicode.Scalar(field)!))
                m.writeNullTerminatedString(value)
            }
            m.writeInteger(UInt8(0))
        }
        return reply
    }

    /// A name in the pooler's namespace that no server has.
    static let absentName = reservedPrefix + "absent"

    static func describeMessage(_ serverName: String) -> ByteBuffer {
        statementMessage(MessageType.describe, serverName)
    }

    /// The start of a Bind too large to hold (`disposition`): its portal and statement names.
    /// The rest of the message follows unchanged, so only the statement name is rewritten.
    public mutating func clientBindHead(
        _ body: ByteBuffer, length: Int, server: inout ServerStatementCache, into out: inout [ByteBuffer]
    ) {
        var b = body
        var head = ByteBufferAllocator().buffer(capacity: body.readableBytes + 80)
        head.writeInteger(MessageType.bind)
        guard let portal = b.readNullTerminatedString(), let name = b.readNullTerminatedString() else {
            head.writeInteger(Int32(length))  // `disposition` saw both names end: not reached
            head.writeImmutableBuffer(body)
            out.append(head)
            append(.pass(MessageType.bind))
            return
        }
        var entry = Entry.pass(MessageType.bind)
        var serverName = name
        if let statement = current(name) {
            bindCount += 1
            ensurePrepared(name, statement, on: &server, into: &out)
            serverName = statement.serverName
        } else if Self.isReserved(name) {
            serverName = Self.absentName
            entry = .underServerName(request: MessageType.bind, client: name, server: serverName)
        }
        head.writeInteger(Int32(length - name.utf8.count + serverName.utf8.count))
        head.writeNullTerminatedString(portal)
        head.writeNullTerminatedString(serverName)
        out.append(head)
        append(entry)
    }

    /// A client message forwarded untouched.
    public mutating func clientForwarded(_ type: UInt8) {
        switch type {
        case MessageType.execute, MessageType.sync, MessageType.functionCall, MessageType.query,
            MessageType.parse, MessageType.bind, MessageType.describe, MessageType.close:
            append(.pass(type))
        default:
            break  // Flush and COPY traffic are not answered on their own
        }
    }

    /// Translates one whole client message of a type `inspects` accepts into what the server gets,
    /// appended to `out`. `whole` is the message with its header, `body` without.
    public mutating func clientMessage(
        type: UInt8, body: ByteBuffer, whole: ByteBuffer, server: inout ServerStatementCache,
        into out: inout [ByteBuffer]
    ) {
        var b = body
        switch type {
        case MessageType.parse:
            guard let name = b.readNullTerminatedString(), !name.isEmpty else { break }
            clientParseCount += 1
            if let existing = current(name) {
                // PostgreSQL refuses a second statement of the same name: let the server say so,
                // by parsing under a name it is known to hold.
                ensurePrepared(name, existing, on: &server, into: &out)
                out.append(Self.parseMessage(existing.serverName, existing.definition))
                serverParseCount += 1
                append(.underServerName(request: MessageType.parse, client: name, server: existing.serverName))
                return
            }
            // A copy: a slice would keep the client's whole read buffer alive.
            var definition = ByteBufferAllocator().buffer(capacity: b.readableBytes)
            definition.writeImmutableBuffer(b)
            let statement = Statement(
                serverName: Self.serverName(for: b, epoch: epoch), definition: definition, epoch: epoch)
            statements[name] = statement
            if server.contains(statement.serverName) {
                // PostgreSQL plans every Parse afresh: the server's copy may be older than a schema
                // change, and a client's Parse is never answered with a stale plan.
                parseAgain(statement.serverName, server: &server, into: &out)
                out.append(Self.parseMessage(statement.serverName, statement.definition))
                append(.parse(client: name, server: statement.serverName, again: true))
            } else {
                prepareOnServer(
                    statement.serverName,
                    [
                        (
                            Self.parseMessage(statement.serverName, statement.definition),
                            .parse(client: name, server: statement.serverName)
                        )
                    ],
                    on: &server, into: &out)
            }
            return
        case MessageType.bind:
            guard let portal = b.readNullTerminatedString(), let name = b.readNullTerminatedString() else { break }
            guard let statement = current(name) else {
                guard Self.isReserved(name) else { break }
                var message = ByteBufferAllocator().buffer(capacity: whole.readableBytes + 40)
                Wire.withMessage(type, into: &message) { m in
                    m.writeNullTerminatedString(portal)
                    m.writeNullTerminatedString(Self.absentName)
                    m.writeImmutableBuffer(b)
                }
                out.append(message)
                append(.underServerName(request: type, client: name, server: Self.absentName))
                return
            }
            bindCount += 1
            if statement.stale {
                out.append(Self.bindMessage(portal, Self.absentName, rest: b))
                append(.stalePlan)
                return
            }
            if let shape = statement.shape {
                guard server.touch(statement.serverName, ifShaped: shape) else {
                    // The server's copy is not known to be the client's plan: a fresh one is made
                    // and described, and the Bind waits for the comparison.
                    checkFreshCopy(name, statement, on: &server, into: &out)
                    var rest = ByteBufferAllocator().buffer(capacity: b.readableBytes)
                    rest.writeImmutableBuffer(b)
                    held = HeldBind(client: name, portal: portal, serverName: statement.serverName, rest: rest)
                    return
                }
            } else {
                ensurePrepared(name, statement, on: &server, into: &out)
            }
            out.append(Self.bindMessage(portal, statement.serverName, rest: b))
            append(.pass(type))
            if statement.shape == nil {
                portalShape = (portal, name)
            } else if wantsPortalShape {
                portalShape = nil
            }
            return
        case MessageType.describe:
            let kind = b.readInteger(as: UInt8.self)
            if kind == MessageType.targetPortal, let wanted = portalShape,
                b.readNullTerminatedString() == wanted.portal,
                let statement = statements[wanted.client]
            {
                // The first description of the client's plan (drivers that describe portals only).
                portalShape = nil
                out.append(whole)
                append(.describeShape(server: statement.serverName, client: wanted.client, check: false))
                return
            }
            guard kind == MessageType.targetStatement, let name = b.readNullTerminatedString() else { break }
            guard let statement = current(name) else {
                guard Self.isReserved(name) else { break }
                out.append(Self.describeMessage(Self.absentName))
                append(.underServerName(request: type, client: name, server: Self.absentName))
                return
            }
            ensurePrepared(name, statement, on: &server, into: &out)
            out.append(Self.describeMessage(statement.serverName))
            append(.describeShape(server: statement.serverName, client: name, check: false))
            return
        case MessageType.close:
            guard b.readInteger(as: UInt8.self) == MessageType.targetStatement, let name = b.readNullTerminatedString()
            else { break }
            guard let statement = statements[name] else {
                guard Self.isReserved(name) else { break }
                // Not the client's: as PostgreSQL closes a name it does not have, nothing happens.
                append(.reply(Self.simpleMessage(MessageType.closeComplete), undo: nil))
                return
            }
            // Only the client's name goes; the server keeps the statement for others.
            statements[name] = nil
            append(.reply(Self.simpleMessage(MessageType.closeComplete), undo: .restore(name, statement)))
            return
        case MessageType.query:
            guard let sql = WireDecode.queryText(body) else { break }
            if Self.clearsStatements(sql) {
                out.append(whole)
                append(.clearingQuery(failed: false))
                return
            }
            if let command = SQLStatementCommand.parse(sql),
                sqlCommand(command, server: &server, into: &out)
            {
                return
            }
        default:
            break
        }
        out.append(whole)
        append(.pass(type))
    }

    /// For a client that holds no server (so no transaction is open): when `buffer` starts with
    /// Parse messages of statements some server has already accepted (`isKnown`, by pooler-wide
    /// name) under names new to the client, and Close messages, up to a Sync, they are answered here
    /// without borrowing a server. Returns how many bytes were used and the answer, or nil when a
    /// server is needed. A driver that prepares with Parse+Sync then never waits for a server that
    /// its own other connections hold.
    public mutating func answerWithoutServer(
        _ buffer: ByteBuffer, isKnown: (String) -> Bool
    ) -> (consumed: Int, reply: ByteBuffer)? {
        var cursor = buffer.readerIndex
        // Most transactions start with something else: answer those without allocating.
        guard let first = buffer.getInteger(at: cursor, as: UInt8.self),
            first == MessageType.parse || first == MessageType.close
        else { return nil }
        // Nor those that start with a Parse of the unnamed statement (its name, the body's first
        // string, is empty), as drivers using the extended protocol without prepared statements do.
        if first == MessageType.parse, buffer.getInteger(at: cursor + 5, as: UInt8.self) == 0 { return nil }
        var view = statements
        var parses = 0
        var reply = ByteBufferAllocator().buffer(capacity: 32)
        while let type = buffer.getInteger(at: cursor, as: UInt8.self),
            let length = buffer.getInteger(at: cursor + 1, as: Int32.self).map(Int.init), length >= 4,
            var body = buffer.getSlice(at: cursor + 5, length: length - 4)
        {
            cursor += 1 + length
            switch type {
            case MessageType.parse:
                guard let name = body.readNullTerminatedString(), !name.isEmpty, view[name] == nil else { return nil }
                let serverName = Self.serverName(for: body, epoch: epoch)
                guard isKnown(serverName) else { return nil }
                var definition = ByteBufferAllocator().buffer(capacity: body.readableBytes)
                definition.writeImmutableBuffer(body)
                view[name] = Statement(serverName: serverName, definition: definition, epoch: epoch, unparsed: true)
                parses += 1
                Wire.withMessage(MessageType.parseComplete, into: &reply) { _ in }
            case MessageType.close:
                guard let kind = body.readInteger(as: UInt8.self), let name = body.readNullTerminatedString()
                else { return nil }
                if kind == MessageType.targetStatement { view[name] = nil }
                Wire.withMessage(MessageType.closeComplete, into: &reply) { _ in }
            case MessageType.sync:
                guard reply.readableBytes > 0 else { return nil }
                statements = view
                clientParseCount += parses
                Wire.readyForQuery(.idle, into: &reply)
                return (cursor - buffer.readerIndex, reply)
            default:
                return nil
            }
        }
        return nil
    }

    /// The statement counters since the last call, zeroed: (client Parses, server Parses, Binds).
    public mutating func takeCounts() -> (clientParses: Int, serverParses: Int, binds: Int) {
        defer { (clientParseCount, serverParseCount, bindCount) = (0, 0, 0) }
        return (clientParseCount, serverParseCount, bindCount)
    }

    /// Pooler-wide names a server accepted a Parse for since the last call.
    public mutating func takeAccepted() -> [String] {
        guard !accepted.isEmpty else { return [] }
        defer { accepted.removeAll() }
        return accepted
    }

    /// SQL PREPARE, EXECUTE and DEALLOCATE of a statement name, alone in a Query. Returns false when
    /// the Query goes to the server as it is.
    private mutating func sqlCommand(
        _ command: SQLStatementCommand, server: inout ServerStatementCache, into out: inout [ByteBuffer]
    ) -> Bool {
        if Self.isReserved(command.name) {
            // The pooler's own statements are out of the clients' reach (with session_state =
            // track the session refuses these before they get here, in any statement of a Query).
            out.append(
                Self.queryMessage(
                    SessionStatements.failing(code: SQLState.reservedName, message: Self.reservedMessage)))
            append(.pass(MessageType.query))
            return true
        }
        // In a failed transaction PostgreSQL refuses every statement (25P02) before reading it:
        // the server says so, and nothing changes here.
        if lastStatus == .failed { return false }
        switch command {
        case .prepare(let name, let text):
            if statements[name] != nil {
                // PostgreSQL's own error, raised by the server so the transaction fails as it would.
                out.append(
                    Self.queryMessage(
                        SessionStatements.failing(
                            code: SQLState.duplicatePreparedStatement,
                            message: "prepared statement \"\(name)\" already exists")))
                append(.pass(MessageType.query))
                return true
            }
            let serverName = Self.serverName(forSQL: text)
            statements[name] = Statement(
                serverName: serverName, definition: ByteBuffer(), sqlText: text)
            clientParseCount += 1
            if server.contains(serverName) {
                server.touch(serverName)
                var done = ByteBufferAllocator().buffer(capacity: 16)
                Wire.commandComplete("PREPARE", into: &done)
                append(.reply(done, undo: .forget(name), ready: true))
            } else {
                prepareOnServer(
                    serverName,
                    [
                        (
                            Self.queryMessage("PREPARE \(serverName) \(text)"),
                            .sqlPrepare(client: name, server: serverName, failed: false)
                        )
                    ],
                    on: &server, into: &out)
            }
            return true
        case .execute(let name, let rest):
            guard let statement = statements[name] else { return false }
            bindCount += 1
            if !server.contains(statement.serverName) {
                let messages: [(ByteBuffer, Entry)] =
                    if let text = statement.sqlText {
                        [
                            (
                                Self.queryMessage("PREPARE \(statement.serverName) \(text)"),
                                .injectedQuery(server: statement.serverName, failed: false)
                            )
                        ]
                    } else {
                        [
                            (
                                Self.parseMessage(statement.serverName, statement.definition),
                                .injectedParse(server: statement.serverName)
                            ),
                            (Self.simpleMessage(MessageType.sync), .injectedSync),
                        ]
                    }
                prepareOnServer(statement.serverName, messages, on: &server, into: &out)
            } else {
                server.touch(statement.serverName)
            }
            out.append(Self.queryMessage("EXECUTE \(statement.serverName)\(rest)"))
            append(.pass(MessageType.query))
            return true
        case .deallocate(let name):
            guard let statement = statements[name] else { return false }
            statements[name] = nil
            var done = ByteBufferAllocator().buffer(capacity: 16)
            Wire.commandComplete("DEALLOCATE", into: &done)
            append(.reply(done, undo: .restore(name, statement), ready: true))
            return true
        }
    }

    /// Answers made up by the pooler that are now due, to be written to the client in order.
    public mutating func takeReplies() -> [ByteBuffer] {
        guard !dueReplies.isEmpty else { return [] }
        defer { dueReplies.removeAll(keepingCapacity: true) }
        return dueReplies
    }

    // MARK: Server messages

    /// One message from the server, by type (and `body`, when the caller holds it whole). Returns
    /// whether it goes on to the client; afterwards, `takeReplies` gives the made-up answers that
    /// follow it.
    public mutating func serverMessage(
        _ type: UInt8, status: TransactionStatus = .idle, body: ByteBuffer? = nil, server: inout ServerStatementCache
    ) -> Bool {
        if specials > 0, case .injectedQuery(let name, let failed) = queue.first {
            // Everything the pooler's own Query answers is swallowed; its ReadyForQuery ends it.
            if type == MessageType.errorResponse {
                queue[queue.startIndex] = .injectedQuery(server: name, failed: true)
            } else if type == MessageType.readyForQuery {
                if failed { server.remove(name) } else { accepted.append(name) }
                pop(server: &server)
                releaseDueReplies()
            }
            return type == MessageType.parameterStatus
        }
        switch type {
        case MessageType.noticeResponse, MessageType.parameterStatus, MessageType.notificationResponse:
            return true  // may come at any time
        case MessageType.readyForQuery:
            lastStatus = status
            if specials == 0 {
                // Only plain entries: nothing to undo or release, drop up to the one this ends.
                while let entry = queue.popFirst(), !Self.isReadyTerminated(entry) {}
                return true
            }
            // Ends the Sync, Query or FunctionCall at the front; anything before it was skipped.
            var forward = true
            while let entry = queue.first {
                pop(server: &server, skipped: !Self.isReadyTerminated(entry))
                if Self.isReadyTerminated(entry) {
                    switch entry {
                    case .clearingQuery(let failed) where !failed:
                        statements.removeAll()
                        server.removeAll()
                    case .sqlPrepare(let client, let name, let failed):
                        if failed {
                            server.remove(name)
                            if statements[client]?.serverName == name { statements[client] = nil }
                        } else {
                            accepted.append(name)
                        }
                    case .injectedSync:
                        forward = false
                    default:
                        break
                    }
                    break
                }
            }
            releaseDueReplies()
            return forward
        case MessageType.errorResponse:
            guard let entry = queue.first else { return true }
            var forward = true
            switch entry {
            case .sqlPrepare(let client, let name, _):
                queue[queue.startIndex] = .sqlPrepare(client: client, server: name, failed: true)
                return true
            case .pass(let t) where t == MessageType.query || t == MessageType.sync || t == MessageType.functionCall:
                return true  // the ReadyForQuery ends it
            case .clearingQuery:
                queue[queue.startIndex] = .clearingQuery(failed: true)
                return true
            default:
                if case .stalePlan = entry {
                    dueReplies.append(Self.stalePlanError)
                    forward = false
                } else if case .pass(MessageType.bind) = entry, let body, Self.isResultShapeError(body) {
                    // The client's statement was planned again on this server (another server's
                    // copy, or one parsed afresh) and its result changed with the schema since
                    // the client parsed it: PostgreSQL would have refused the Bind with 0A000,
                    // which drivers answer by preparing again.
                    dueReplies.append(Self.stalePlanError)
                    forward = false
                }
                if case .underServerName(_, let client, let serverName) = entry {
                    // PostgreSQL's error, but with the name the client knows.
                    var error =
                        body.map(WireDecode.errorFields)
                        ?? PostgresError(
                            code: SQLState.duplicatePreparedStatement,
                            message: "prepared statement \"\(serverName)\" already exists")
                    error.message = error.message.replacing(serverName, with: client)
                    var reply = ByteBufferAllocator().buffer(capacity: 96)
                    Wire.errorResponse(error, into: &reply)
                    dueReplies.append(reply)
                    forward = false
                }
                // An extended-protocol message failed: the server skips everything up to the next Sync.
                pop(server: &server, failed: true)
                while let next = queue.first {
                    if case .pass(let t) = next, t == MessageType.sync { break }
                    if case .injectedSync = next { break }
                    pop(server: &server, skipped: true)
                }
                releaseDueReplies()
                return forward
            }
        default:
            if specials == 0 {
                // Only plain entries: the front one may end, nothing else to do.
                if case .pass(let t) = queue.first, Self.ends(t, with: type) { queue.removeFirst() }
                return true
            }
            guard let entry = queue.first else { return true }
            var forward = true
            switch entry {
            case .pass(let t):
                if Self.ends(t, with: type) { pop(server: &server) }
            case .parse(_, let name, _):
                if type == MessageType.parseComplete {
                    accepted.append(name)
                    pop(server: &server)
                }
            case .injectedParse(let name, _):
                if type == MessageType.parseComplete {
                    forward = false
                    accepted.append(name)
                    pop(server: &server)
                }
            case .injectedClose:
                if type == MessageType.closeComplete {
                    forward = false
                    pop(server: &server)
                }
            case .underServerName(let request, _, _):
                if Self.ends(request, with: type) { pop(server: &server) }
            case .describeShape(let serverName, let client, let check):
                forward = !check
                guard type == MessageType.rowDescription || type == MessageType.noData else { break }
                let shape = ResultShape.of(type, body: body)
                server.setShape(serverName, shape)
                if check {
                    releaseHeld(shape: shape)
                } else if statements[client]?.serverName == serverName, statements[client]?.shape == nil {
                    statements[client]!.shape = shape
                }
                pop(server: &server)
            case .stalePlan:
                break
            case .reply, .clearingQuery, .sqlPrepare, .injectedQuery, .injectedSync:
                break
            }
            releaseDueReplies()
            return forward
        }
    }

    // MARK: Internals

    private mutating func append(_ entry: Entry) {
        queue.append(entry)
        // A plain entry at the back cannot make a made-up answer at the front due.
        guard !entry.isPlain else { return }
        specials += 1
        releaseDueReplies()
    }

    /// Moves made-up answers at the front of the queue to `dueReplies`.
    private mutating func releaseDueReplies() {
        guard specials > 0 else { return }  // made-up answers are specials
        while case .reply(let bytes, _, let ready) = queue.first {
            dueReplies.append(bytes)
            if ready {
                var z = ByteBufferAllocator().buffer(capacity: 6)
                Wire.readyForQuery(lastStatus, into: &z)
                dueReplies.append(z)
            }
            queue.removeFirst()
            specials -= 1
        }
    }

    /// Removes the front entry. A skipped or failed entry undoes what it stood for.
    private mutating func pop(server: inout ServerStatementCache, skipped: Bool = false, failed: Bool = false) {
        guard let entry = queue.popFirst() else { return }
        if !entry.isPlain { specials -= 1 }
        guard skipped || failed else { return }
        switch entry {
        case .parse(let client, let serverName, let again):
            // Skipped after a skipped Close: the server keeps its copy.
            if !again || failed { server.remove(serverName) }
            if statements[client]?.serverName == serverName { statements[client] = nil }
        case .injectedParse(let serverName, let again):
            if !again || failed { server.remove(serverName) }
        case .injectedClose(let serverName):
            server.restore(serverName)
        case .reply(_, let undo, _):
            switch undo {
            case .forget(let name): statements[name] = nil
            case .restore(let name, let statement): statements[name] = statement
            case nil: break
            }
        case .sqlPrepare(let client, let serverName, _):
            server.remove(serverName)
            if statements[client]?.serverName == serverName { statements[client] = nil }
        case .injectedQuery(let serverName, _):
            server.remove(serverName)
        case .describeShape(_, _, let check):
            if check { releaseHeld(shape: nil) }
        case .pass, .clearingQuery, .injectedSync, .underServerName, .stalePlan:
            break
        }
    }

    private mutating func ensurePrepared(
        _ client: String, _ statement: Statement, on server: inout ServerStatementCache, into out: inout [ByteBuffer]
    ) {
        if statement.unparsed { statements[client]?.unparsed = false }
        if server.contains(statement.serverName) {
            guard statement.unparsed else {
                server.touch(statement.serverName)
                return
            }
            parseAgain(statement.serverName, server: &server, into: &out)
            out.append(Self.parseMessage(statement.serverName, statement.definition))
            append(.injectedParse(server: statement.serverName, again: true))
            return
        }
        prepareOnServer(
            statement.serverName,
            [
                (
                    Self.parseMessage(statement.serverName, statement.definition),
                    .injectedParse(server: statement.serverName)
                )
            ],
            on: &server, into: &out)
    }

    /// Closes the server's copy of `serverName` so that the Parse after it plans afresh.
    private mutating func parseAgain(
        _ serverName: String, server: inout ServerStatementCache, into out: inout [ByteBuffer]
    ) {
        server.touch(serverName)
        serverParseCount += 1
        out.append(Self.closeMessage(serverName))
        append(.injectedClose(server: serverName))
    }

    static func closeMessage(_ name: String) -> ByteBuffer { statementMessage(MessageType.close, name) }

    /// A Describe or Close of the statement `name`.
    static func statementMessage(_ type: UInt8, _ name: String) -> ByteBuffer {
        var message = ByteBufferAllocator().buffer(capacity: name.utf8.count + 7)
        Wire.withMessage(type, into: &message) { m in
            m.writeInteger(MessageType.targetStatement)
            m.writeNullTerminatedString(name)
        }
        return message
    }

    /// Gives a server a statement it lacks: room first (closing the least recently used one when
    /// full), then `messages`, each with the queue entry that stands for its answers.
    private mutating func prepareOnServer(
        _ serverName: String, _ messages: [(ByteBuffer, Entry)], on server: inout ServerStatementCache,
        into out: inout [ByteBuffer]
    ) {
        makeRoom(for: serverName, on: &server, into: &out)
        serverParseCount += 1
        for (message, entry) in messages {
            out.append(message)
            append(entry)
        }
    }

    private mutating func makeRoom(
        for name: String, on server: inout ServerStatementCache, into out: inout [ByteBuffer]
    ) {
        var evicted = server.insert(name)
        while let name = evicted ?? server.evictOverflow() {
            out.append(Self.closeMessage(name))
            append(.injectedClose(server: name))
            evicted = nil
        }
    }

    static func isReadyTerminated(_ entry: Entry) -> Bool {
        switch entry {
        case .pass(let t): return t == MessageType.query || t == MessageType.sync || t == MessageType.functionCall
        case .clearingQuery, .sqlPrepare, .injectedQuery, .injectedSync: return true
        default: return false
        }
    }

    /// Whether `response` is the last message answering a client message of type `request`.
    static func ends(_ request: UInt8, with response: UInt8) -> Bool {
        switch request {
        case MessageType.parse: return response == MessageType.parseComplete
        case MessageType.bind: return response == MessageType.bindComplete
        case MessageType.close: return response == MessageType.closeComplete
        case MessageType.describe: return response == MessageType.rowDescription || response == MessageType.noData
        case MessageType.execute:
            return response == MessageType.commandComplete || response == MessageType.emptyQueryResponse
                || response == MessageType.portalSuspended
        default: return false  // Sync, Query and FunctionCall end at ReadyForQuery
        }
    }

    /// The pooler-wide name of a statement: a digest of its text and parameter types, so every
    /// client and server agrees on it without asking anybody, and the stale-plan epoch after the
    /// first.
    public static func serverName(for definition: ByteBuffer, epoch: Int = 0) -> String {
        var hasher = SHA256()
        nameSecret.withUnsafeBytes { hasher.update(bufferPointer: $0) }
        definition.withUnsafeReadableBytes { hasher.update(bufferPointer: $0) }
        let digest = hasher.finalize()
        var name = "tidepool_"
        for byte in digest.prefix(12) {
            name += String(byte >> 4, radix: 16) + String(byte & 0xF, radix: 16)
        }
        if epoch > 0 { name += "_\(epoch)" }
        return name
    }

    /// Mixed into every pooler-wide name, new with each process, so that no client can work out
    /// a name before it appears (SECURITY.md); the names are reserved besides (`isReserved`).
    static let nameSecret: [UInt8] = {
        var generator = SystemRandomNumberGenerator()
        return (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }()

    /// The prefix of the pooler's statement names, which clients may not use in SQL.
    public static let reservedPrefix = "tidepool_"

    /// What a client that names one of the pooler's statements is told (SQLSTATE 42939).
    static let reservedMessage =
        "prepared statement names beginning with \"\(reservedPrefix)\" are reserved for the pooler"

    /// Whether a statement name (as PostgreSQL folds it) is in the pooler's namespace.
    public static func isReserved(_ name: String) -> Bool { name.lowercased().hasPrefix(reservedPrefix) }

    /// The client's statement `name`, renamed first if it was named in an earlier stale-plan epoch.
    @inline(__always)
    private mutating func current(_ name: String) -> Statement? {
        guard let statement = statements[name] else { return nil }
        if statement.epoch == epoch || statement.sqlText != nil { return statement }
        return renamed(name, statement)
    }

    @inline(never)
    private mutating func renamed(_ name: String, _ old: Statement) -> Statement {
        var statement = old
        statement.serverName = Self.serverName(for: statement.definition, epoch: epoch)
        statement.epoch = epoch
        statements[name] = statement
        return statement
    }

    /// Whether a server's ErrorResponse to a Bind says its result formats do not fit the
    /// statement's columns (08P01 "bind message has N result formats but query has M columns").
    static func isResultShapeError(_ body: ByteBuffer) -> Bool {
        let error = WireDecode.errorFields(body)
        return error.code == SQLState.protocolViolation && error.message.hasPrefix("bind message has ")
            && error.message.contains(" result formats but query has ")
    }

    /// Whether a server's ErrorResponse says a prepared statement's cached plan went stale (its
    /// result type changed with the schema). The routine name is checked as well as the message,
    /// which the server may translate.
    public static func isStalePlanError(_ body: ByteBuffer) -> Bool {
        var b = body
        var code = false
        var stale = false
        while let field = b.readInteger(as: UInt8.self), field != 0, let value = b.readNullTerminatedString() {
            switch field {
            case UInt8(ascii: "C"): code = value == SQLState.featureNotSupported
            case UInt8(ascii: "R"): stale = stale || value == "RevalidateCachedQuery"
            case UInt8(ascii: "M"): stale = stale || value == "cached plan must not change result type"
            default: break
            }
        }
        return code && stale
    }

    /// The pooler-wide name of a statement made with SQL PREPARE, from what followed its name.
    public static func serverName(forSQL text: String) -> String {
        var definition = ByteBufferAllocator().buffer(capacity: text.utf8.count + 4)
        definition.writeString("sql:")
        definition.writeString(text)
        return serverName(for: definition)
    }

    static func queryMessage(_ sql: String) -> ByteBuffer {
        var message = ByteBufferAllocator().buffer(capacity: sql.utf8.count + 6)
        Wire.query(sql, into: &message)
        return message
    }

    /// DISCARD ALL, DEALLOCATE ALL and DEALLOCATE PREPARE ALL, alone in a Query.
    public static func clearsStatements(_ sql: String) -> Bool {
        var words = sql.lowercased().split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" })
            .map(String.init)
        if let last = words.last, last.hasSuffix(";") {
            words[words.count - 1] = String(last.dropLast())
            if words.last == "" { words.removeLast() }
        }
        return words == ["discard", "all"] || words == ["deallocate", "all"]
            || words == ["deallocate", "prepare", "all"]
    }

    static func parseMessage(_ name: String, _ definition: ByteBuffer) -> ByteBuffer {
        var message = ByteBufferAllocator().buffer(capacity: name.utf8.count + definition.readableBytes + 6)
        Wire.withMessage(MessageType.parse, into: &message) { m in
            m.writeNullTerminatedString(name)
            m.writeImmutableBuffer(definition)
        }
        return message
    }

    static func simpleMessage(_ type: UInt8) -> ByteBuffer {
        var message = ByteBufferAllocator().buffer(capacity: 5)
        Wire.withMessage(type, into: &message) { _ in }
        return message
    }
}

/// SQL PREPARE, EXECUTE and DEALLOCATE of one statement name, alone in a simple Query.
public enum SQLStatementCommand: Equatable, Sendable {
    /// `text` is what follows the name: "[(types)] AS query".
    case prepare(name: String, text: String)
    /// `rest` is what follows the name: " (parameters)" or "".
    case execute(name: String, rest: String)
    case deallocate(name: String)

    var name: String {
        switch self {
        case .prepare(let name, _), .execute(let name, _), .deallocate(let name): name
        }
    }

    /// Recognises the commands; nil for anything else, several statements, or DEALLOCATE ALL.
    public static func parse(_ sql: String) -> SQLStatementCommand? {
        var text = Substring(sql)
        while let c = text.first, c.isWhitespace { text = text.dropFirst() }
        while let c = text.last, c.isWhitespace || c == ";" { text = text.dropLast() }
        guard !text.contains(";"), !text.hasPrefix("--"), !text.hasPrefix("/*") else { return nil }
        guard let verb = keyword(&text) else { return nil }
        switch verb {
        case "prepare":
            guard let name = identifier(&text), !text.isEmpty else { return nil }
            let rest = text.drop(while: { $0.isWhitespace })
            guard rest.lowercased().hasPrefix("as") || rest.hasPrefix("(") else { return nil }
            return .prepare(name: name, text: String(rest))
        case "execute":
            guard let name = identifier(&text) else { return nil }
            let rest = text.drop(while: { $0.isWhitespace })
            guard rest.isEmpty || rest.hasPrefix("(") else { return nil }
            return .execute(name: name, rest: rest.isEmpty ? "" : " " + rest)
        case "deallocate":
            var probe = text
            if keyword(&probe) == "prepare" { text = probe }
            guard let name = identifier(&text), text.allSatisfy(\.isWhitespace) else { return nil }
            if name == "all" { return nil }
            return .deallocate(name: name)
        default:
            return nil
        }
    }

    /// A bare word, lowercased, after optional whitespace.
    static func keyword(_ text: inout Substring) -> String? {
        text = text.drop(while: { $0.isWhitespace })
        let word = text.prefix(while: { $0.isLetter })
        guard !word.isEmpty else { return nil }
        text = text.dropFirst(word.count)
        return word.lowercased()
    }

    /// An SQL identifier: folded to lower case unless double-quoted.
    static func identifier(_ text: inout Substring) -> String? {
        text = text.drop(while: { $0.isWhitespace })
        if text.first == "\"" {
            var name = ""
            var rest = text.dropFirst()
            while let c = rest.first {
                rest = rest.dropFirst()
                if c == "\"" {
                    if rest.first == "\"" {
                        name.append("\"")
                        rest = rest.dropFirst()
                        continue
                    }
                    text = rest
                    return name.isEmpty ? nil : name
                }
                name.append(c)
            }
            return nil
        }
        let word = text.prefix(while: { $0.isLetter || $0.isNumber || $0 == "_" || $0 == "$" })
        guard let first = word.first, first.isLetter || first == "_" else { return nil }
        text = text.dropFirst(word.count)
        return word.lowercased()
    }
}
