import NIOCore
import Testing

@testable import TidepoolCore

/// The pooler's registry of live clients, driven with a test clock.
@Suite struct ClientRegistryTests {
    final class Client {}
    typealias Registry = ClientRegistry<Client>
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func refused(_ result: Result<ClientID, PostgresError>) -> Bool {
        if case .failure = result { return true }
        return false
    }

    func config(_ text: String) throws -> Config {
        try Config.parse("[databases]\napp = host=h\nother = host=h\n[pooler]\n" + text)
    }

    @Test func maxClientConnCountsEveryClientAndFreesASlotOnRemove() throws {
        let config = try config("max_client_conn = 2\n")
        var r = Registry()
        let admission = Registry.Admission(database: "app", user: "u", config: config)
        let a = try r.admit(Client(), address: nil, admission, now: t0).get()
        _ = try r.admit(Client(), address: nil, admission, now: t0).get()
        let v1 = r.admit(Client(), address: nil, admission, now: t0)
        #expect(refused(v1))
        let v2 = r.remove(a, address: nil, counted: admission.counted, pool: nil)
        #expect(v2)
        let v3 = r.remove(a, address: nil, counted: nil, pool: nil)
        #expect(!v3, "removed once")
        #expect(r.count == 1 && r.databaseClients["app"] == 1)
        let v4 = r.admit(Client(), address: nil, admission, now: t0)
        #expect((try? v4.get()) != nil)
    }

    @Test func perDatabaseAndPerUserLimitsCountOnlyTheirOwnClients() throws {
        let config = try config("max_db_client_connections = 1\nmax_user_client_connections = 2\n")
        var r = Registry()
        func admit(_ database: String, _ user: String) -> String {
            switch r.admit(Client(), address: nil, .init(database: database, user: user, config: config), now: t0) {
            case .success: "ok"
            case .failure(let e): e.message
            }
        }
        #expect(admit("app", "u") == "ok")
        #expect(admit("app", "v") == "client connections exceeded (max_db_client_connections)")
        #expect(admit("other", "u") == "ok")
        #expect(admit("pgbouncer", "u") == "ok", "the console is not counted per database and user")
        #expect(r.userClients["u"] == 2 && r.count == 3)
    }

    @Test func perAddressLimitsApplyToTCPClientsOnly() throws {
        let config = try config("max_client_conn_per_ip = 1\n")
        var r = Registry()
        let admission = Registry.Admission(database: "app", user: "u", config: config)
        let first = try r.admit(Client(), address: "10.0.0.1", admission, now: t0).get()
        let v5 = r.admit(Client(), address: "10.0.0.1", admission, now: t0)
        #expect(refused(v5))
        let v6 = r.admit(Client(), address: nil, admission, now: t0)
        #expect((try? v6.get()) != nil)
        _ = r.remove(first, address: "10.0.0.1", counted: admission.counted, pool: nil)
        let v7 = r.admit(Client(), address: "10.0.0.1", admission, now: t0)
        #expect((try? v7.get()) != nil)
    }

    @Test func cancelKeysAreUniqueAndFindTheirClient() {
        var r = Registry()
        let a = Client()
        let b = Client()
        var draws: [UInt64] = [0, 7 | 9 << 32, 7 | 9 << 32, 8 | 9 << 32]
        let first = r.issueCancelKey(for: a, peerID: 0, random: { draws.removeFirst() })
        let second = r.issueCancelKey(for: b, peerID: 0, random: { draws.removeFirst() })
        #expect(first == .init(processID: 7, secretKey: 9), "a zero process ID is drawn again")
        #expect(second == .init(processID: 8, secretKey: 9), "a key in use is drawn again")
        #expect(r.client(cancelKey: first) === a && r.client(cancelKey: second) === b)
        r.dropCancelKey(first)
        #expect(r.client(cancelKey: first) == nil)
    }

    @Test func pinnedClientsHoldingThePoolWarnOnceAMinute() {
        var r = Registry()
        let pool = PoolKey(database: "app", user: "u")
        let v8 = r.pinChanged(pool, pinned: true, poolSize: 2, now: t0)
        #expect(v8 == nil)
        let v9 = r.pinChanged(pool, pinned: true, poolSize: 2, now: t0)
        #expect(v9 == 2)
        let v10 = r.pinChanged(pool, pinned: false, poolSize: 2, now: t0)
        #expect(v10 == nil)
        let v11 = r.pinChanged(pool, pinned: true, poolSize: 2, now: t0 + .seconds(59))
        #expect(v11 == nil, "warned a minute ago")
        _ = r.pinChanged(pool, pinned: false, poolSize: 2, now: t0 + .seconds(59))
        let v12 = r.pinChanged(pool, pinned: true, poolSize: 2, now: t0 + .seconds(60))
        #expect(v12 == 2)
        #expect(r.pinnedClients[pool] == 2)
        r.poolFreed(pool)
        #expect(r.pinnedClients[pool] == nil)
    }

    @Test func poolAndConsoleCounts() {
        var r = Registry()
        let pool = PoolKey(database: "app", user: "u")
        r.joined(pool)
        r.joined(pool)
        _ = r.remove(nil, address: nil, counted: nil, pool: pool)
        #expect(r.poolClients[pool] == 1)
        r.consoleEntered()
        #expect(r.consoleClients == 1)
        r.consoleLeft()
        #expect(r.consoleClients == 0)
    }
}
