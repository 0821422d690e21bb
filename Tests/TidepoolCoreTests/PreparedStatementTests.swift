import NIOCore
import Testing

@testable import TidepoolCore

/// Drives a PreparedStatementTracker the way the runtime does: client messages in, server message
/// types back, and checks what reaches the server and the client.
final class PreparedHarness {
    var tracker = PreparedStatementTracker()
    var server: ServerStatementCache
    /// Messages sent to the server, as (type, statement name) pairs.
    var sent: [(UInt8, String)] = []
    /// Made-up replies given to the client, by type.
    var madeUp: [UInt8] = []

    init(capacity: Int = 10) {
        server = ServerStatementCache(capacity: capacity)
    }

    static func message(_ type: UInt8, _ build: (inout ByteBuffer) -> Void) -> ByteBuffer {
        var b = ByteBufferAllocator().buffer(capacity: 64)
        b.writeInteger(type)
        b.writeInteger(Int32(0))
        build(&b)
        b.setInteger(Int32(b.writerIndex - 1), at: 1)
        return b
    }

    static func parse(_ name: String, _ sql: String) -> ByteBuffer {
        message(MessageType.parse) {
            $0.writeNullTerminatedString(name)
            $0.writeNullTerminatedString(sql)
            $0.writeInteger(Int16(0))
        }
    }

    static func bind(_ name: String) -> ByteBuffer {
        message(MessageType.bind) {
            $0.writeNullTerminatedString("")
            $0.writeNullTerminatedString(name)
            $0.writeInteger(Int16(0))
            $0.writeInteger(Int16(0))
            $0.writeInteger(Int16(0))
        }
    }

    static func describe(_ name: String) -> ByteBuffer {
        message(MessageType.describe) {
            $0.writeInteger(UInt8(ascii: "S"))
            $0.writeNullTerminatedString(name)
        }
    }

    static func close(_ name: String) -> ByteBuffer {
        message(MessageType.close) {
            $0.writeInteger(UInt8(ascii: "S"))
            $0.writeNullTerminatedString(name)
        }
    }

    static func query(_ sql: String) -> ByteBuffer {
        message(MessageType.query) { $0.writeNullTerminatedString(sql) }
    }

    /// The pooler-wide name a Parse of `sql` (no parameter types) gets.
    static func serverName(of sql: String) -> String {
        var definition = parse("x", sql)
        definition.moveReaderIndex(forwardBy: 7)  // type, length, "x\0"
        return PreparedStatementTracker.serverName(for: definition)
    }

    static let sync = message(MessageType.sync) { _ in }
    static let execute = message(MessageType.execute) {
        $0.writeNullTerminatedString("")
        $0.writeInteger(Int32(0))
    }

    /// The client prepares `name` with Parse+Sync and the server accepts it.
    func prepareAndSync(_ name: String, _ sql: String) {
        client(Self.parse(name, sql))
        client(Self.sync)
        serverSends("1Z")
    }

    /// The next transaction runs on another server, which has nothing prepared; forget what was sent.
    func moveToAnEmptyServer() {
        server = ServerStatementCache(capacity: 10)
        sent.removeAll()
    }

    /// Sends one client message through the tracker, as the runtime does.
    func client(_ whole: ByteBuffer) {
        let type = whole.getInteger(at: whole.readerIndex, as: UInt8.self)!
        if PreparedStatementTracker.inspects(type, whole, bodyStart: whole.readerIndex + 5) {
            let body = whole.getSlice(at: whole.readerIndex + 5, length: whole.readableBytes - 5)!
            var out: [ByteBuffer] = []
            tracker.clientMessage(type: type, body: body, whole: whole, server: &server, into: &out)
            for m in out { sent.append(Self.describeSent(m)) }
        } else {
            tracker.clientForwarded(type)
            sent.append((type, ""))
        }
        collect()
    }

    /// The server answers with these message types; returns the ones the client sees, made-up
    /// replies included, in order.
    @discardableResult
    func serverSends(_ types: String) -> String {
        var seen = ""
        for ch in types.utf8 {
            let forward = tracker.serverMessage(ch, server: &server)
            if forward { seen.append(Character(UnicodeScalar(ch))) }
            for reply in tracker.takeReplies() {
                seen.append(Character(UnicodeScalar(reply.getInteger(at: reply.readerIndex, as: UInt8.self)!)))
            }
        }
        return seen
    }

    func collect() {
        for reply in tracker.takeReplies() {
            madeUp.append(reply.getInteger(at: reply.readerIndex, as: UInt8.self)!)
        }
    }

    static func describeSent(_ m: ByteBuffer) -> (UInt8, String) {
        var b = m
        let type = b.readInteger(as: UInt8.self)!
        _ = b.readInteger(as: Int32.self)
        switch type {
        case MessageType.parse: return (type, b.readNullTerminatedString()!)
        case MessageType.bind:
            _ = b.readNullTerminatedString()
            return (type, b.readNullTerminatedString()!)
        case MessageType.describe, MessageType.close:
            _ = b.readInteger(as: UInt8.self)
            return (type, b.readNullTerminatedString()!)
        case MessageType.query: return (type, b.readNullTerminatedString()!)
        default: return (type, "")
        }
    }

    var sentTypes: String { String(sent.map { Character(UnicodeScalar($0.0)) }) }
}

@Suite struct PreparedStatementTrackerTests {
    typealias H = PreparedHarness

    @Test func namedParseGoesOutUnderThePoolerWideName() {
        let h = H()
        h.client(H.parse("s1", "select 1"))
        h.client(H.sync)
        #expect(h.sentTypes == "PS")
        let name = h.sent[0].1
        #expect(name.hasPrefix("tidepool_") && name != "s1")
        #expect(h.tracker.statements["s1"]?.serverName == name)
        #expect(h.server.contains(name))
        #expect(h.serverSends("1Z") == "1Z")
        #expect(h.tracker.isQuiet)
        #expect(h.tracker.takeAccepted() == [name])
        #expect(h.tracker.clientParseCount == 1 && h.tracker.serverParseCount == 1)
    }

    @Test func sameTextGetsTheSameNameForEveryClient() {
        let a = PreparedStatementTracker.serverName(for: ByteBuffer(string: "select 1\0\0\0"))
        let b = PreparedStatementTracker.serverName(for: ByteBuffer(string: "select 1\0\0\0"))
        let c = PreparedStatementTracker.serverName(for: ByteBuffer(string: "select 2\0\0\0"))
        #expect(a == b && a != c)
        #expect(a.utf8.count < 64)  // fits NAMEDATALEN
    }

    @Test func parseOfAStatementTheServerHasIsPlannedAgain() {
        let h = H()
        let name = H.serverName(of: "select 1")
        _ = h.server.insert(name)
        // PostgreSQL plans every Parse afresh (the server's copy may predate a schema change): the
        // copy is closed and parsed again, the Close's answer is the pooler's own.
        h.client(H.query("select 2"))
        h.client(H.parse("mine", "select 1"))
        h.client(H.sync)
        #expect(h.sentTypes == "QCPS")
        #expect(h.madeUp.isEmpty)
        #expect(h.serverSends("TDCZ") == "TDCZ")
        #expect(h.serverSends("31Z") == "1Z")
        #expect(h.tracker.isQuiet)
        #expect(h.server.contains(name))
        #expect(h.tracker.serverParseCount == 1 && h.tracker.clientParseCount == 1)
    }

    @Test func bindAfterAParseAnsweredWithoutAServerPlansAgainWhereACopyIsHeld() {
        let h = H()
        let name = H.serverName(of: "select 1")
        var messages = H.parse("mine", "select 1")
        var sync = H.sync
        messages.writeBuffer(&sync)
        #expect(h.tracker.answerWithoutServer(messages, isKnown: { $0 == name }) != nil)
        _ = h.server.insert(name)
        h.client(H.bind("mine"))
        h.client(H.execute)
        h.client(H.sync)
        #expect(h.sentTypes == "CPBES")  // the server's copy is older than the client's Parse
        #expect(h.serverSends("312CZ") == "2CZ")
        h.sent.removeAll()
        h.client(H.bind("mine"))
        h.client(H.sync)
        #expect(h.sentTypes == "BS")  // once
    }

    @Test func aBindRefusedForItsResultFormatsIsThePlanChangeItIs() {
        let h = H()
        h.prepareAndSync("s1", "select * from t")
        h.client(H.bind("s1"))
        h.client(H.execute)
        h.client(H.sync)
        var error = ByteBufferAllocator().buffer(capacity: 64)
        Wire.errorResponse(
            PostgresError(code: "08P01", message: "bind message has 2 result formats but query has 3 columns"),
            into: &error)
        func body(_ m: ByteBuffer) -> ByteBuffer { m.getSlice(at: m.readerIndex + 5, length: m.readableBytes - 5)! }
        #expect(!h.tracker.serverMessage(MessageType.errorResponse, body: body(error), server: &h.server))
        let replies = h.tracker.takeReplies()
        #expect(replies.count == 1)
        #expect(replies.first.map { WireDecode.errorFields(body($0)).code } == "0A000")
    }

    @Test func bindOnAServerWithoutTheStatementInjectsParse() {
        let h = H()
        h.prepareAndSync("s1", "select 1")
        // The next transaction runs on another server, which has nothing prepared.
        h.moveToAnEmptyServer()
        h.client(H.bind("s1"))
        h.client(H.execute)
        h.client(H.sync)
        #expect(h.sentTypes == "PBES")
        #expect(h.sent[0].1 == h.sent[1].1 && h.sent[1].1.hasPrefix("tidepool_"))
        // The injected Parse's ParseComplete is swallowed.
        #expect(h.serverSends("12DCZ") == "2DCZ")
        #expect(h.tracker.isQuiet)
        #expect(h.tracker.bindCount == 1 && h.tracker.serverParseCount == 2)
    }

    @Test func describeOfAStatementIsRewrittenToo() {
        let h = H()
        h.client(H.parse("s1", "select 1"))
        h.client(H.describe("s1"))
        h.client(H.sync)
        #expect(h.sentTypes == "PDS")
        #expect(h.sent[1].1 == h.sent[0].1)
        #expect(h.serverSends("1tTZ") == "1tTZ")
    }

    @Test func fullCacheClosesTheLeastRecentlyUsedStatement() {
        let h = H(capacity: 2)
        for (i, sql) in ["select 1", "select 2"].enumerated() {
            h.client(H.parse("s\(i)", sql))
        }
        h.client(H.sync)
        h.serverSends("11Z")
        let first = h.tracker.statements["s0"]!.serverName
        let second = h.tracker.statements["s1"]!.serverName
        h.client(H.bind("s0"))  // s0 is now more recent than s1
        h.client(H.execute)
        h.client(H.sync)
        h.serverSends("2CZ")
        h.sent.removeAll()
        h.client(H.parse("s2", "select 3"))
        h.client(H.sync)
        #expect(h.sentTypes == "CPS")
        #expect(h.sent[0].1 == second)
        #expect(!h.server.contains(second) && h.server.contains(first) && h.server.count == 2)
        // The CloseComplete of the pooler's own Close is swallowed.
        #expect(h.serverSends("31Z") == "1Z")
        // The client still has s1: using it prepares it again.
        h.sent.removeAll()
        h.client(H.bind("s1"))
        #expect(h.sentTypes == "CPB")
    }

    /// max_prepared_statements lowered at run time: the next statement prepared on the server
    /// closes every statement past the new size, least recently used first.
    @Test func aSmallerCacheClosesTheOverflowAtTheNextParse() {
        let h = H(capacity: 4)
        for (i, sql) in ["select 1", "select 2", "select 3", "select 4"].enumerated() {
            h.client(H.parse("s\(i)", sql))
        }
        h.client(H.sync)
        h.serverSends("1111Z")
        let names = (0..<4).map { h.tracker.statements["s\($0)"]!.serverName }
        h.server.resize(to: 2)
        h.sent.removeAll()
        h.client(H.parse("s4", "select 5"))
        h.client(H.sync)
        #expect(h.sentTypes == "CCCPS")
        #expect(h.sent.prefix(3).map(\.1) == Array(names.prefix(3)))
        #expect(h.server.count == 2 && h.server.contains(names[3]))
        #expect(h.serverSends("3331Z") == "1Z")
    }

    @Test func closeForgetsOnlyTheClientsName() {
        let h = H()
        h.prepareAndSync("s1", "select 1")
        let name = h.tracker.statements["s1"]!.serverName
        h.sent.removeAll()
        h.client(H.close("s1"))
        h.client(H.sync)
        #expect(h.sentTypes == "S")
        #expect(h.madeUp == [UInt8(ascii: "3")])
        #expect(h.tracker.statements["s1"] == nil)
        #expect(h.server.contains(name))
        #expect(h.serverSends("Z") == "Z")
        // A Bind of the closed name now goes through as is, for the server to refuse.
        h.sent.removeAll()
        h.client(H.bind("s1"))
        #expect(h.sent.map(\.1) == ["s1"])
    }

    @Test func failedParseLeavesNeitherClientNorServerWithTheStatement() {
        let h = H()
        h.client(H.parse("bad", "selec 1"))
        h.client(H.bind("bad"))
        h.client(H.execute)
        h.client(H.sync)
        let name = h.sent[0].1
        // The Bind goes out rewritten, but the server skips it after the error.
        #expect(h.serverSends("EZ") == "EZ")
        #expect(h.tracker.statements["bad"] == nil)
        #expect(!h.server.contains(name))
        #expect(h.tracker.isQuiet && h.tracker.specials == 0)
        #expect(h.tracker.takeAccepted().isEmpty)
    }

    @Test func errorMidPipelineDropsMadeUpRepliesAfterIt() {
        let h = H()
        let known = H.serverName(of: "select 1")
        _ = h.server.insert(known)
        h.client(H.parse("", "select 1/0"))
        h.client(H.bind(""))
        h.client(H.execute)
        h.client(H.parse("later", "select 1"))  // answered by the pooler, but after the failing Execute
        h.client(H.sync)
        h.client(H.parse("after", "select 1"))  // after the Sync: answered normally
        h.client(H.sync)
        #expect(h.madeUp.isEmpty)
        #expect(h.serverSends("12EZ") == "12EZ")
        #expect(h.tracker.statements["later"] == nil)
        #expect(h.tracker.statements["after"] != nil)
        #expect(h.server.contains(known))  // the skipped Close and Parse left the server's copy
        #expect(h.serverSends("31Z") == "1Z")
        #expect(h.tracker.isQuiet)
    }

    @Test func failedInjectedParseIsShownAndSkipsToSync() {
        let h = H()
        h.prepareAndSync("s1", "select 1")
        h.server = ServerStatementCache(capacity: 10)
        h.client(H.bind("s1"))
        h.client(H.execute)
        h.client(H.sync)
        #expect(h.serverSends("EZ") == "EZ")
        #expect(h.server.count == 0)
        #expect(h.tracker.statements["s1"] != nil)  // still the client's: the next try prepares again
        #expect(h.tracker.isQuiet)
    }

    @Test func skippedEvictionPutsTheStatementBack() {
        let h = H(capacity: 1)
        h.client(H.parse("a", "select 1"))
        h.client(H.sync)
        h.serverSends("1Z")
        let first = h.tracker.statements["a"]!.serverName
        h.client(H.parse("", "select 1/0"))
        h.client(H.bind(""))
        h.client(H.execute)
        h.client(H.parse("b", "select 2"))  // evicts a, but the server skips the Close after the error
        h.client(H.sync)
        #expect(h.serverSends("12EZ") == "12EZ")
        #expect(h.server.contains(first))
        #expect(h.tracker.statements["b"] == nil)
    }

    @Test func duplicateNameIsRefusedByTheServer() {
        let h = H()
        h.prepareAndSync("s1", "select 1")
        h.sent.removeAll()
        h.client(H.parse("s1", "select 2"))
        h.client(H.sync)
        // Parsed again under the existing name, which the server refuses (42P05).
        #expect(h.sentTypes == "PS")
        #expect(h.sent[0].1 == h.tracker.statements["s1"]!.serverName)
        #expect(h.serverSends("EZ") == "EZ")
        #expect(h.tracker.statements["s1"] != nil)
    }

    @Test func discardAllClearsEverythingOnlyWhenItSucceeds() {
        let h = H()
        h.prepareAndSync("s1", "select 1")
        h.client(H.query("DISCARD ALL"))
        h.serverSends("EZ")  // e.g. inside a transaction block
        #expect(h.tracker.statements["s1"] != nil && h.server.count == 1)
        h.client(H.query("discard all;"))
        h.serverSends("CZ")
        #expect(h.tracker.statements.isEmpty && h.server.count == 0)
        #expect(PreparedStatementTracker.clearsStatements("DEALLOCATE  ALL"))
        #expect(PreparedStatementTracker.clearsStatements("deallocate prepare all ;"))
        #expect(!PreparedStatementTracker.clearsStatements("deallocate s1"))
    }

    @Test func parseAndSyncOfAKnownStatementNeedsNoServer() {
        var t = PreparedStatementTracker()
        var bytes = H.parse("s1", "select 1")
        var sync = H.sync
        bytes.writeBuffer(&sync)
        let total = bytes.readableBytes
        #expect(t.answerWithoutServer(bytes, isKnown: { _ in false }) == nil)
        let answer = t.answerWithoutServer(bytes, isKnown: { _ in true })
        #expect(answer?.consumed == total)
        var reply = answer!.reply
        #expect(reply.readInteger(as: UInt8.self) == UInt8(ascii: "1"))
        _ = reply.readInteger(as: Int32.self)
        #expect(reply.readInteger(as: UInt8.self) == UInt8(ascii: "Z"))
        #expect(t.statements["s1"] != nil)
        // Not without a Sync, not for a name the client already uses, not for a Bind.
        #expect(t.answerWithoutServer(H.parse("s2", "select 1"), isKnown: { _ in true }) == nil)
        #expect(t.answerWithoutServer(bytes, isKnown: { _ in true }) == nil)
        var bind = H.bind("s1")
        var sync2 = H.sync
        bind.writeBuffer(&sync2)
        #expect(t.answerWithoutServer(bind, isKnown: { _ in true }) == nil)
        // Nor for the unnamed statement.
        var unnamed = H.parse("", "select 1")
        var sync3 = H.sync
        unnamed.writeBuffer(&sync3)
        #expect(t.answerWithoutServer(unnamed, isKnown: { _ in true }) == nil)
    }

    @Test func onlyNamedStatementsAndStatementCommandsAreInspected() {
        func inspects(_ m: ByteBuffer) -> Bool {
            PreparedStatementTracker.inspects(m.getInteger(at: 0, as: UInt8.self)!, m, bodyStart: 5)
        }
        #expect(inspects(H.parse("s1", "select 1")))
        #expect(!inspects(H.parse("", "select 1")))
        #expect(inspects(H.bind("s1")))
        #expect(!inspects(H.bind("")))
        #expect(inspects(H.describe("s1")) && !inspects(H.describe("")))
        #expect(inspects(H.close("s1")) && !inspects(H.close("")))
        #expect(!inspects(H.query("select 1")) && !inspects(H.query("  BEGIN")))
        for sql in ["DISCARD ALL", " deallocate x", "PREPARE a AS SELECT 1", "\nexecute a"] {
            #expect(inspects(H.query(sql)))
        }
        // Bytes not arrived yet: look at the whole message to be safe.
        #expect(inspects(H.parse("s1", "x").getSlice(at: 0, length: 5)!))
        #expect(!inspects(H.sync) && !inspects(H.execute))
    }

    @Test func unnamedStatementsPassThroughUntouched() {
        let h = H()
        h.client(H.parse("", "select 1"))
        h.client(H.bind(""))
        h.client(H.execute)
        h.client(H.sync)
        #expect(h.sent.map(\.1) == ["", "", "", ""])
        #expect(h.tracker.specials == 0)
        #expect(h.serverSends("12DCZ") == "12DCZ")
        #expect(h.tracker.isQuiet && h.tracker.clientParseCount == 0)
    }
}

@Suite struct SQLPreparedStatementTests {
    typealias H = PreparedHarness

    @Test func recognisesTheCommands() {
        typealias C = SQLStatementCommand
        #expect(C.parse("PREPARE foo AS SELECT 1") == .prepare(name: "foo", text: "AS SELECT 1"))
        #expect(C.parse("  prepare Foo (int) as select $1; ") == .prepare(name: "foo", text: "(int) as select $1"))
        #expect(C.parse("PREPARE \"My \"\"x\"\"\" AS SELECT 1") == .prepare(name: "My \"x\"", text: "AS SELECT 1"))
        #expect(C.parse("EXECUTE foo(1, 'a')") == .execute(name: "foo", rest: " (1, 'a')"))
        #expect(C.parse("execute foo") == .execute(name: "foo", rest: ""))
        #expect(C.parse("DEALLOCATE foo") == .deallocate(name: "foo"))
        #expect(C.parse("deallocate prepare foo;") == .deallocate(name: "foo"))
        #expect(C.parse("DEALLOCATE ALL") == nil)
        #expect(C.parse("PREPARE a AS SELECT 1; EXECUTE a") == nil)
        #expect(C.parse("SELECT 1") == nil)
        #expect(C.parse("EXECUTE") == nil)
    }

    @Test func prepareThenExecuteOnAnotherServer() {
        let h = H()
        h.client(H.query("PREPARE foo AS SELECT 1"))
        #expect(h.sent.count == 1 && h.sent[0].1.hasPrefix("PREPARE tidepool_"))
        #expect(h.serverSends("CZ") == "CZ")
        let serverName = h.tracker.statements["foo"]!.serverName
        #expect(h.tracker.takeAccepted() == [serverName])
        // Next transaction, another server: the statement is prepared there first, silently.
        h.moveToAnEmptyServer()
        h.client(H.query("EXECUTE foo"))
        #expect(h.sent.map(\.1) == ["PREPARE \(serverName) AS SELECT 1", "EXECUTE \(serverName)"])
        #expect(h.serverSends("CZ") == "")
        #expect(h.serverSends("TDCZ") == "TDCZ")
        #expect(h.tracker.isQuiet && h.server.contains(serverName))
    }

    @Test func executeOfAProtocolStatementInjectsParseAndSync() {
        let h = H()
        h.prepareAndSync("s1", "select 1")
        h.moveToAnEmptyServer()
        h.client(H.query("EXECUTE s1"))
        #expect(h.sentTypes == "PSQ")
        #expect(h.serverSends("1Z") == "")
        #expect(h.serverSends("TDCZ") == "TDCZ")
        #expect(h.tracker.isQuiet)
    }

    @Test func deallocateIsAnsweredForTheClientAlone() {
        let h = H()
        h.client(H.query("PREPARE foo AS SELECT 1"))
        h.serverSends("CZ")
        h.client(H.query("BEGIN"))
        h.serverSends("C")
        _ = h.tracker.serverMessage(MessageType.readyForQuery, status: .inTransaction, server: &h.server)
        h.sent.removeAll()
        h.client(H.query("DEALLOCATE foo"))
        #expect(h.sent.isEmpty)
        #expect(h.madeUp == [UInt8(ascii: "C"), UInt8(ascii: "Z")])
        #expect(h.tracker.statements["foo"] == nil)
        #expect(h.server.count == 1)  // the server keeps it for others
        // Unknown names go to the server, which answers as PostgreSQL does.
        h.client(H.query("DEALLOCATE nope"))
        #expect(h.sent.map(\.1) == ["DEALLOCATE nope"])
    }

    @Test func madeUpReadyForQueryCarriesTheTransactionStatus() {
        var t = PreparedStatementTracker()
        var server = ServerStatementCache(capacity: 4)
        var out: [ByteBuffer] = []
        let prepare = H.query("PREPARE foo AS SELECT 1")
        t.clientMessage(
            type: MessageType.query, body: prepare.getSlice(at: 5, length: prepare.readableBytes - 5)!,
            whole: prepare, server: &server, into: &out)
        _ = t.serverMessage(MessageType.commandComplete, server: &server)
        _ = t.serverMessage(MessageType.readyForQuery, status: .inTransaction, server: &server)
        let deallocate = H.query("DEALLOCATE foo")
        t.clientMessage(
            type: MessageType.query, body: deallocate.getSlice(at: 5, length: deallocate.readableBytes - 5)!,
            whole: deallocate, server: &server, into: &out)
        let replies = t.takeReplies()
        #expect(replies.count == 2)
        #expect(replies[1].getInteger(at: 5, as: UInt8.self) == TransactionStatus.inTransaction.rawValue)
    }

    @Test func duplicatePrepareFailsOnTheServer() {
        let h = H()
        h.client(H.query("PREPARE foo AS SELECT 1"))
        h.serverSends("CZ")
        h.sent.removeAll()
        h.client(H.query("PREPARE foo AS SELECT 2"))
        #expect(h.sent.count == 1 && h.sent[0].1.contains("42P05"))
        #expect(h.serverSends("EZ") == "EZ")
        #expect(h.tracker.statements["foo"]?.sqlText == "AS SELECT 1")
    }

    @Test func failedPrepareLeavesNothing() {
        let h = H()
        h.client(H.query("PREPARE foo AS SELEC 1"))
        #expect(h.serverSends("EZ") == "EZ")
        #expect(h.tracker.statements["foo"] == nil && h.server.count == 0)
    }
}

@Suite struct ServerStatementCacheTests {
    @Test func resizeAndOverflow() {
        var c = ServerStatementCache(capacity: 3)
        for name in ["a", "b", "c"] { #expect(c.insert(name) == nil) }
        #expect(c.evictOverflow() == nil)
        c.resize(to: 1)
        #expect(c.capacity == 1)
        #expect(c.evictOverflow() == "a")
        #expect(c.evictOverflow() == "b")
        #expect(c.evictOverflow() == nil && c.count == 1)
        c.resize(to: 0)
        #expect(c.capacity == 1)  // never below one
    }

    @Test func evictsTheLeastRecentlyUsed() {
        var c = ServerStatementCache(capacity: 2)
        #expect(c.insert("a") == nil)
        #expect(c.insert("b") == nil)
        c.touch("a")
        #expect(c.insert("c") == "b")
        #expect(c.contains("a") && c.contains("c") && !c.contains("b"))
        #expect(c.insert("c") == nil)  // already there
        c.remove("a")
        #expect(c.count == 1)
    }
}

@Suite struct PreparedStatementsInAFailedTransactionTests {
    typealias H = PreparedHarness

    /// In a failed transaction PostgreSQL answers DEALLOCATE with 25P02: the pooler does not
    /// answer it itself (found by the differential tester).
    @Test func sqlDeallocateInAFailedTransactionGoesToTheServer() {
        let h = H()
        h.client(H.query("PREPARE p AS SELECT 1"))
        h.serverSends("CZ")
        h.client(H.query("BEGIN"))
        h.serverSends("CZ")
        _ = h.tracker.serverMessage(MessageType.readyForQuery, status: .failed, server: &h.server)
        h.sent.removeAll()
        h.client(H.query("DEALLOCATE p"))
        #expect(h.sentTypes == "Q" && h.sent.first?.1 == "DEALLOCATE p")
        #expect(h.madeUp.isEmpty)
        #expect(h.tracker.statements["p"] != nil)
    }
}
