import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct AdminTests {
    @Test func parsesCommandsLikePgBouncer() throws {
        #expect(try AdminCommand.parse("show pools;") == .show("POOLS"))
        #expect(try AdminCommand.parse("  SHOW   Lists  ") == .show("LISTS"))
        #expect(try AdminCommand.parse("PAUSE mydb") == .pause("mydb"))
        #expect(try AdminCommand.parse("resume;") == .resume(nil))
        #expect(try AdminCommand.parse(";") == .empty)
        #expect(throws: PostgresError.self) { try AdminCommand.parse("SELECT 1") }
        #expect(throws: PostgresError.self) { try AdminCommand.parse("SHOW") }
        #expect(AdminCommand.show("POOLS").isReadOnly)
        #expect(!AdminCommand.reload.isReadOnly)
    }

    @Test func showPoolsColumnsAndCounts() {
        var snap = PoolSnapshot(
            key: PoolKey(database: "db", user: "u"), waiting: 45, lent: 5, idle: 0, connecting: 1,
            maxWait: .microseconds(2_500_000), settings: PoolSettings(poolSize: 5))
        snap.checking = 1
        let result = AdminViews.pools(
            [snap], clients: [snap.key: PoolClientCounts(active: 5, waiting: 45)], modes: [snap.key: .session])
        #expect(result.columns.count == 17)
        #expect(result.columns.first == "database")
        #expect(result.columns.last == "load_balance_hosts")
        let row = Dictionary(uniqueKeysWithValues: zip(result.columns, result.rows[0]))
        #expect(row["cl_active"] == "5")
        #expect(row["cl_waiting"] == "45")
        #expect(row["sv_active"] == "4")
        #expect(row["sv_tested"] == "1")
        #expect(row["sv_login"] == "1")
        #expect(row["maxwait"] == "2")
        #expect(row["maxwait_us"] == "500000")
        #expect(row["pool_mode"] == "session")
    }

    @Test func resultEncodesRowDescriptionRowsAndTag() {
        var buffer = ByteBuffer()
        AdminResult(columns: ["a"], rows: [["x"], [nil]]).encode(into: &buffer)
        var types: [UInt8] = []
        while let type = buffer.readInteger(as: UInt8.self), let length = buffer.readInteger(as: Int32.self) {
            types.append(type)
            buffer.moveReaderIndex(forwardBy: Int(length) - 4)
        }
        #expect(types == [UInt8(ascii: "T"), UInt8(ascii: "D"), UInt8(ascii: "D"), UInt8(ascii: "C")])
    }

    @Test func showConfigHasNoSecrets() throws {
        let config = try Config.parse("[databases]\na = host=h password=hunter2\n[pooler]\nauth_file = /x\n")
        let text = config.displaySettings.map { "\($0.0)=\($0.1)" }.joined(separator: " ")
        #expect(!text.contains("hunter2"))
        #expect(text.contains("auth_file=/x"))
    }
}
