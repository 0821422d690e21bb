import NIOCore
import Testing

@testable import TidepoolCore

/// A client statement is never run from a server copy whose result differs from the client's
/// plan: PostgreSQL refuses such a Bind with 0A000 (issue 30, pgjdbc after ALTER TABLE).
@Suite struct ResultShapeTests {
    typealias D = SessionDriver

    static func rowDescription(_ columns: [(String, Int32)]) -> ByteBuffer {
        D.m("T") {
            $0.writeInteger(Int16(columns.count))
            for (name, type) in columns {
                $0.writeNullTerminatedString(name)
                $0.writeInteger(Int32(16384))  // table
                $0.writeInteger(Int16(1))  // column
                $0.writeInteger(type)
                $0.writeInteger(Int16(4))
                $0.writeInteger(Int32(-1))
                $0.writeInteger(Int16(0))
            }
        }
    }

    static let oneColumn = rowDescription([("a", 23)])
    static let twoColumns = rowDescription([("a", 23), ("b", 23)])
    static let describe = PreparedHarness.describe("s1")

    @Test func theShapeIsWhatPostgreSQLComparesOnly() {
        let a = ResultShape.of(
            MessageType.rowDescription, body: Self.oneColumn.getSlice(at: 5, length: Self.oneColumn.readableBytes - 5))
        var otherTable = Self.rowDescription([("a", 23)])
        otherTable.setInteger(Int32(99), at: 5 + 2 + 2)
        let b = ResultShape.of(
            MessageType.rowDescription, body: otherTable.getSlice(at: 5, length: otherTable.readableBytes - 5))
        let c = ResultShape.of(
            MessageType.rowDescription, body: Self.twoColumns.getSlice(at: 5, length: Self.twoColumns.readableBytes - 5)
        )
        #expect(a == b, "the table a column comes from does not count")
        #expect(a != c)
        #expect(ResultShape.of(MessageType.noData, body: nil) != a)
    }

    /// The client prepares and describes s1 (one column) on the first server.
    func prepared() -> D {
        let d = D(prepared: true)
        d.client(PreparedHarness.parse("s1", "select * from t"), Self.describe, PreparedHarness.sync)
        d.lend()
        d.serverSends(D.m("1"), D.m("t") { $0.writeInteger(Int16(0)) }, Self.oneColumn, D.ready("I"))
        #expect(d.clientTypes == "1tTZ")
        d.toServer.clear()
        d.toClient.clear()
        return d
    }

    @Test func aBindWaitsForAFreshCopyToBeComparedAndGoesWhenItMatches() {
        let d = prepared()
        d.client(PreparedHarness.bind("s1"), PreparedHarness.execute, PreparedHarness.sync)
        d.lend(ServerSessionState(maxPreparedStatements: 10))
        #expect(d.serverTypes == "PDH", "a fresh copy, described, flushed; the Bind and what follows wait")
        // What the client sends meanwhile waits too, and counts against max_buffered_bytes.
        d.session.bufferLimit = 4096
        d.flow.removeAll()
        d.client(PreparedHarness.query("select '\(String(repeating: "x", count: 5000))'"))
        #expect(d.serverTypes == "PDH")
        #expect(d.flow.contains { if case .pauseClientReads = $0 { true } else { false } })
        d.toServer.clear()
        d.serverSends(D.m("1"), D.m("t") { $0.writeInteger(Int16(0)) }, Self.oneColumn)
        #expect(d.serverTypes == "BESQ", "the same result: the Bind goes, then the rest")
        #expect(d.flow.contains { if case .resumeClientReads = $0 { true } else { false } })
        #expect(d.clientTypes == "", "the pooler's own answers are swallowed")
        d.serverSends(D.m("2"), D.complete("SELECT 1"), D.ready("I"), D.complete("SELECT 1"), D.ready("I"))
        #expect(d.clientTypes == "2CZCZ")
    }

    @Test func aBindOfAPlanWhoseResultChangedFailsAsPostgreSQLsDoesUntilPreparedAgain() {
        let d = prepared()
        d.client(PreparedHarness.bind("s1"), PreparedHarness.execute, PreparedHarness.sync)
        d.lend(ServerSessionState(maxPreparedStatements: 10))
        d.toServer.clear()
        d.serverSends(D.m("1"), D.m("t") { $0.writeInteger(Int16(0)) }, Self.twoColumns)
        #expect(d.serverTypes == "BES")
        // The Bind names a statement no server has; the server's error becomes PostgreSQL's.
        var error = ByteBuffer()
        Wire.errorResponse(PostgresError(code: "26000", message: "prepared statement does not exist"), into: &error)
        d.serverSends(error, D.ready("I"))
        #expect(d.clientTypes == "EZ")
        var seen = d.toClient
        seen.moveReaderIndex(forwardBy: 5)
        let fields = WireDecode.errorFields(seen)
        #expect(fields.code == "0A000" && fields.message == "cached plan must not change result type")
        #expect(PreparedStatementTracker.isStalePlanError(seen), "with the routine drivers look for")
        // Again on the same server, whose copy is now the new one: still refused.
        d.toServer.clear()
        d.toClient.clear()
        d.client(PreparedHarness.bind("s1"), PreparedHarness.execute, PreparedHarness.sync)
        d.lend()
        #expect(d.serverTypes == "BES")
        d.serverSends(error, D.ready("I"))
        #expect(d.clientTypes == "EZ")
        // Prepared again under its name (after a Close, as drivers do): it runs.
        d.toServer.clear()
        d.toClient.clear()
        d.client(
            PreparedHarness.close("s1"), PreparedHarness.parse("s1", "select * from t"), Self.describe,
            PreparedHarness.bind("s1"), PreparedHarness.execute, PreparedHarness.sync)
        d.lend()
        #expect(!d.serverTypes.contains("H"), "a copy planned for this Parse needs no check")
        #expect(d.serverTypes.hasSuffix("BES"))
    }
}
