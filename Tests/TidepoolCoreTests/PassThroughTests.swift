import NIOCore
import Testing

@testable import TidepoolCore

/// Replication connections: not pooled; a server of their own, then every byte passes through.
@Suite struct PassThroughTests {
    typealias D = SessionDriver

    @Test func theReplicationParameterPicksTheMode() throws {
        #expect(try ReplicationMode.parse(nil) == nil)
        #expect(try ReplicationMode.parse("database") == .logical)
        for value in ["true", "on", "YES", "1"] { #expect(try ReplicationMode.parse(value) == .physical) }
        for value in ["false", "off", "no", "0"] { #expect(try ReplicationMode.parse(value) == nil) }
        #expect(throws: PostgresError.self) { try ReplicationMode.parse("maybe") }
        // No longer refused as a startup parameter.
        #expect(try StartupParameters.resolve(["replication": "true", "user": "u"], ignored: []).isEmpty)
    }

    /// A replication client: authenticated, then a server of its own instead of the pool.
    func replicationClient(_ mode: String = "true") -> D {
        let d = D(loggedIn: false)
        d.session.startupPacket(
            .startup(
                minorVersion: 0, parameters: ["user": "alice", "database": "app", "replication": mode],
                unrecognizedOptions: []), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.carryOut()
        var config = Config()
        config.global.authType = .trust
        config.databases["app"] = DatabaseEntry(name: "app")
        d.session.registered(
            LoginFacts(
                config: config, hba: nil, clientAddress: nil, clientIP: nil, certificateCommonName: nil,
                knownSecret: nil, canLookUp: false), into: &d.actions)
        d.carryOut()
        d.session.enter(.success(.pool(DatabaseEntry(name: "app"))), into: &d.actions)
        d.carryOut()
        return d
    }

    @Test func everyBytePassesThroughBothWays() {
        let d = replicationClient()
        #expect(d.session.replication == .physical)
        #expect(d.login.last == .openReplicationServer)
        #expect(!d.login.contains(.joinPool))
        #expect(d.session.state.name == "awaitingWelcome")
        d.server.parameters = ["server_version": "15.4", "TimeZone": "UTC"]
        d.session.passThroughStarted(d.server, cancelKey: (7, 8), into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "RSSKZ")
        #expect(d.session.state == .passThrough(d.server) && d.session.stateName == "active")
        // Replication commands and CopyBoth data, unread by the pooler.
        d.toClient.clear()
        d.client(D.query("IDENTIFY_SYSTEM"), D.query("START_REPLICATION 0/0"))
        #expect(d.serverTypes == "QQ")
        var garbage = ByteBuffer()
        garbage.writeBytes([0x64, 0, 0, 0, 9, 1, 2, 3, 4])  // a CopyData from the client
        garbage.writeBytes([0xFF, 0xFE])  // and the start of something the pooler need not understand
        d.clientRaw(garbage)
        #expect(d.toServer.readableBytesView.suffix(11).elementsEqual([0x64, 0, 0, 0, 9, 1, 2, 3, 4, 0xFF, 0xFE]))
        d.serverSends(D.m("W") { $0.writeBytes([0, 0, 0]) }, D.m("d") { $0.writeBytes([1, 2]) })
        #expect(d.clientTypes == "Wd")
        // A cancel goes to the server; the client's end closes the server, never pooled.
        d.session.cancelRequested(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.cancels == [false])
        d.session.finish(serverResetQuery: "DISCARD ALL", resetAlways: false, into: &d.actions)
        d.carryOut()
        #expect(d.releases == [false])
    }

    @Test func aLostOrRefusedServerClosesTheClient() {
        let d = replicationClient("database")
        #expect(d.session.replication == .logical)
        d.session.passThroughFailed(
            .fatal("28000", "no pg_hba.conf entry for replication connection"), into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.message == "no pg_hba.conf entry for replication connection")
        let e = replicationClient()
        e.session.passThroughStarted(e.server, cancelKey: (1, 2), into: &e.actions)
        e.carryOut()
        e.session.serverLost(now: e.now, into: &e.actions)
        e.carryOut()
        #expect(e.closedWith != nil && e.session.state == .closed)
    }

    @Test func theConsoleTakesNoReplicationConnections() {
        let e = D(loggedIn: false)
        e.session.startupPacket(
            .startup(
                minorVersion: 0, parameters: ["user": "alice", "database": "pgbouncer", "replication": "true"],
                unrecognizedOptions: []), tlsOffered: false, bytesFollow: false, into: &e.actions)
        e.carryOut()
        var config = Config()
        config.global.authType = .trust
        e.session.registered(
            LoginFacts(
                config: config, hba: nil, clientAddress: nil, clientIP: nil, certificateCommonName: nil,
                knownSecret: nil, canLookUp: false), into: &e.actions)
        e.carryOut()
        e.session.enter(.success(.adminConsole(readOnly: false)), into: &e.actions)
        e.carryOut()
        #expect(e.closedWith?.code == SQLState.featureNotSupported)
    }
}
