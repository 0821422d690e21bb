import NIOCore
import Testing

@testable import TidepoolCore

/// A message larger than the pooler's buffer goes to the server as it arrives: what a decision
/// needs (a Bind's statement name) is read from its start, the rest is never held (issue 31, item 4).
@Suite struct LargeMessageTests {
    typealias D = SessionDriver

    @Test func aHeadIsHandedOverThenTheRestIsForwardedInPieces() throws {
        var whole = ByteBuffer()
        whole.writeInteger(UInt8(ascii: "B"))
        whole.writeInteger(Int32(4 + 3 + 1000))
        whole.writeBytes([UInt8(ascii: "a"), 0, 0])
        whole.writeBytes(Array(repeating: 7, count: 1000))
        let bytes = Array(whole.readableBytesView)
        var scanner = MessageScanner()
        var heads: [[UInt8]] = []
        var forwarded = 0
        var stash = ByteBuffer()
        for start in stride(from: 0, to: bytes.count, by: 100) {
            stash.writeBytes(bytes[start..<min(start + 100, bytes.count)])
            while let chunk = try scanner.next(from: &stash, peek: { _, _, _ in .head(3) }) {
                switch chunk {
                case .head(let type, let length, let body):
                    #expect(type == UInt8(ascii: "B") && length == 1007)
                    heads.append(Array(body.readableBytesView))
                case .forward(let b): forwarded += b.readableBytes
                case .message: Issue.record("a head was asked for")
                }
            }
        }
        #expect(heads == [[UInt8(ascii: "a"), 0, 0]])
        #expect(forwarded == 1000)
        #expect(scanner.atMessageBoundary)
    }

    /// A Bind whose parameter is 40 times the buffer limit, sent in pieces of a quarter of it.
    static func largeBind(_ statement: String, size: Int) -> ByteBuffer {
        PreparedHarness.message(MessageType.bind) {
            $0.writeNullTerminatedString("")
            $0.writeNullTerminatedString(statement)
            $0.writeInteger(Int16(0))
            $0.writeInteger(Int16(1))
            $0.writeInteger(Int32(size))
            $0.writeBytes(Array(repeating: UInt8(ascii: "z"), count: size))
            $0.writeInteger(Int16(0))
        }
    }

    @Test func aLargeBindOfANamedStatementIsRewrittenByItsHeadAndStreamed() {
        let d = D(prepared: true)
        d.session.bufferLimit = 4096
        d.client(PreparedHarness.parse("s1", "select $1"), PreparedHarness.sync)
        d.lend()
        d.serverSends(D.m("1"), D.ready("I"))
        d.toServer.clear()
        var bind = Self.largeBind("s1", size: 160_000)
        let sent = bind.readableBytes
        d.clientRaw(bind.readSlice(length: 1024)!)
        d.lend(ServerSessionState(maxPreparedStatements: 10))  // another server: s1 is parsed there first
        var largest = 0
        while bind.readableBytes > 0 {
            d.clientRaw(bind.readSlice(length: min(1024, bind.readableBytes))!)
            largest = max(largest, d.session.bufferedBytes)
        }
        #expect(largest < 4096, "the session held \(largest) bytes of a \(sent)-byte Bind")
        d.client(PreparedHarness.execute, PreparedHarness.sync)
        #expect(D.types(d.toServer) == "PBES")
        // The server's Bind names the pooler's statement and carries the client's parameter whole.
        var out = d.toServer
        out.moveReaderIndex(forwardBy: Int(out.getInteger(at: out.readerIndex + 1, as: Int32.self)!) + 1)
        #expect(out.readInteger(as: UInt8.self) == MessageType.bind)
        let length = Int(out.readInteger(as: Int32.self)!)
        var body = out.readSlice(length: length - 4)!
        #expect(body.readNullTerminatedString() == "")
        let serverName = body.readNullTerminatedString()!
        #expect(PreparedStatementTracker.isReserved(serverName))
        #expect(body.readInteger(as: Int16.self) == 0 && body.readInteger(as: Int16.self) == 1)
        #expect(body.readInteger(as: Int32.self) == 160_000)
        #expect(body.readBytes(length: 160_000) == Array(repeating: UInt8(ascii: "z"), count: 160_000))
        #expect(body.readInteger(as: Int16.self) == 0 && body.readableBytes == 0)
        d.serverSends(D.m("1"), D.m("2"), D.complete("SELECT 1"), D.ready("I"))
        #expect(d.clientTypes == "1Z2CZ", "the injected Parse is answered to the pooler")
    }

    @Test func aRequestLargerThanTheBufferIsNotKeptForAReplay() {
        let d = D()
        d.session.bufferLimit = 4096
        var query = PreparedHarness.query(String(repeating: "x", count: 20_000))
        d.client(query.readSlice(length: 100)!)
        d.lend()
        while query.readableBytes > 0 { d.clientRaw(query.readSlice(length: min(1024, query.readableBytes))!) }
        #expect(d.session.bufferedBytes < 4096)
        // PostgreSQL ended the server before it answered: too much was sent to send it again.
        d.serverSends(ReplayTests.fatal(SQLState.adminShutdown))
        d.session.serverLost(unused: false, now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.closedWith != nil && d.requests == 1)
    }

    @Test func onlyWhatDecidesIsWaitedFor() {
        func disposition(_ type: UInt8, _ start: String, declared: Int = 100_000) -> MessageDisposition? {
            var b = ByteBuffer()
            b.writeInteger(type)
            b.writeInteger(Int32(declared))
            b.writeString(start)
            return PreparedStatementTracker.disposition(type, b, bodyStart: 5, limit: 4096)
        }
        func isInspect(_ d: MessageDisposition?) -> Bool { d == .inspect }
        let q = MessageType.query
        #expect(disposition(q, " delete from t where x = '") == nil)
        #expect(isInspect(disposition(q, "DEALLOCATE s1")))
        #expect(isInspect(disposition(q, "\nPREPARE s1 AS select '")))
        #expect(isInspect(disposition(q, "  dele")), "the word has not ended: wait for more")
        #expect(isInspect(disposition(q, "delete", declared: 2000)), "small enough to hold")
        let b = MessageType.bind
        #expect(disposition(b, "p\0stmt\0\0\0")?.headLength == 7)
        #expect(isInspect(disposition(b, "p\0stm")), "the names have not ended: wait for more")
        #expect(isInspect(disposition(b, "p\0" + String(repeating: "s", count: 5000))), "names too long: held whole")
    }

    @Test(arguments: [100, 20_000]) func aQueryReadOnlyInPartKeepsItsServer(padding: Int) {
        let d = D()
        d.session.bufferLimit = 4096
        var query = PreparedHarness.query("select length('\(String(repeating: "x", count: padding))'); set a.b = 1")
        // The start of a long one is enough to ask for a server; a short one is read whole first.
        d.client(query.readSlice(length: padding > 4096 ? 100 : query.readableBytes)!)
        d.lend()
        while query.readableBytes > 0 { d.clientRaw(query.readSlice(length: min(1024, query.readableBytes))!) }
        d.serverSends(D.complete("SELECT 1"), D.complete("SET"), D.ready("I"))
        if padding > 4096 {
            #expect(d.pinChanges == [true], "what follows the part read may hold any statement")
            #expect(d.releases.isEmpty)
        } else {
            #expect(d.pinChanges.isEmpty && d.releases == [true])
            #expect(d.session.sessionState?.settings.map(\.name) == ["a.b"])
        }
    }
}
