import Logging
import NIOCore
import NIOEmbedded
import Testing
import TidepoolCore

@testable import Tidepool

/// The client and server handlers on EmbeddedChannels of one loop, with the real pooler's
/// registries and a stand-in for its pools: what reaches each socket, and when a server is handed
/// back, in the order the handlers carry the sessions' actions out.
@Suite struct HandlerTests {
    /// What happened, in order, as the sockets and the pools saw it.
    final class Log: @unchecked Sendable {
        var events: [String] = []
        var reads: [String: Int] = [:]
    }

    /// Sits between a handler and the socket: records what the handler writes and the reads it
    /// lets through.
    final class Socket: ChannelOutboundHandler, @unchecked Sendable {
        typealias OutboundIn = ByteBuffer
        let name: String
        let log: Log

        init(_ name: String, _ log: Log) {
            self.name = name
            self.log = log
        }

        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            log.events.append("\(name) gets \(HandlerTests.types(unwrapOutboundIn(data)))")
            context.write(data, promise: promise)
        }

        func read(context: ChannelHandlerContext) {
            log.reads[name, default: 0] += 1
            context.read()
        }
    }

    /// Stands in for the pools: records requests and releases; the test lends.
    final class Pools: PoolDriving, @unchecked Sendable {
        let log: Log
        var waiting: [ClientConnection] = []

        init(_ log: Log) { self.log = log }

        func requestServer(for client: ClientConnection) {
            log.events.append("pool asked for a server")
            waiting.append(client)
        }
        func clientGaveUp(_ id: ClientID) { log.events.append("client gave up") }
        func release(_ server: ServerConnection, reusable: Bool) {
            log.events.append("server released\(reusable ? "" : " to close")")
        }
        func serverLoggedIn(_ server: ServerConnection) { log.events.append("server logged in") }
        func serverConnectFailed(_ server: ServerConnection, error: PostgresError) {
            log.events.append("server failed: \(error.message)")
        }
        func serverClosed(_ server: ServerConnection) { log.events.append("server closed") }
        func checkFinished(_ server: ServerConnection, ok: Bool) {}
        func listenerMessage(_ server: ServerConnection, type: UInt8, body: ByteBuffer) {}
    }

    static func types(_ buffer: ByteBuffer) -> String {
        var b = buffer
        var s = ""
        if b.readableBytes >= 8, b.getInteger(at: b.readerIndex + 4, as: Int32.self) == 196_608 { return "startup" }
        while let type = b.readInteger(as: UInt8.self), let length = b.readInteger(as: Int32.self) {
            s.append(Character(UnicodeScalar(type)))
            b.moveReaderIndex(forwardBy: Int(length) - 4)
        }
        return s
    }

    static func message(_ type: Character, _ build: (inout ByteBuffer) -> Void = { _ in }) -> ByteBuffer {
        var body = ByteBuffer()
        build(&body)
        var out = ByteBuffer()
        out.writeInteger(UInt8(ascii: type.unicodeScalars.first!))
        out.writeInteger(Int32(body.readableBytes + 4))
        out.writeBuffer(&body)
        return out
    }

    static func query(_ sql: String) -> ByteBuffer { message("Q") { $0.writeNullTerminatedString(sql) } }
    static func ready(_ status: Character = "I") -> ByteBuffer {
        message("Z") { $0.writeInteger(UInt8(ascii: status.unicodeScalars.first!)) }
    }

    /// A pooler (never started) whose connections run on `loop`, a logged-in server and a client
    /// welcomed with that server's parameters.
    final class Rig {
        let loop = EmbeddedEventLoop()
        let log = Log()
        let pools: Pools
        let pooler: Pooler
        let client: ClientConnection
        let clientChannel: EmbeddedChannel
        let server: ServerConnection
        let serverChannel: EmbeddedChannel
        var lease: UInt64 = 0

        /// `settings`: more [pooler] lines.
        init(settings: String = "") throws {
            let config = try Config.parse(
                "[databases]\napp = host=127.0.0.1 port=1\n[pooler]\nauth_type = trust\nmax_prepared_statements = 0\n"
                    + settings)
            pools = Pools(log)
            pooler = Pooler(config: config, userlist: [:], logger: Logger(label: "test"), loops: [loop])
            clientChannel = EmbeddedChannel(loop: loop)
            client = ClientConnection(pooler: pooler, channel: clientChannel, loopIndex: 0, pools: pools)
            try clientChannel.pipeline.syncOperations.addHandlers([Socket("client", log), client])
            serverChannel = EmbeddedChannel(loop: loop)
            server = pooler.connector.make(
                ServerID(1), pool: PoolKey(database: "app", user: "alice"), database: config.database(named: "app"),
                loop: 0, driver: pools)
            try serverChannel.pipeline.syncOperations.addHandlers([Socket("server", log), server])

            // The server logs in.
            try serverChannel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            var login = ByteBuffer()
            Wire.authenticationOk(into: &login)
            Wire.parameterStatus("TimeZone", "UTC", into: &login)
            Wire.backendKeyData(processID: 1, secretKey: 2, into: &login)
            Wire.readyForQuery(.idle, into: &login)
            try serverChannel.writeInbound(login)

            // The client logs in and is welcomed with the parameters of a server lent for them.
            try clientChannel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 2)).wait()
            var startup = ByteBuffer()
            Wire.startupMessage(parameters: [("user", "alice"), ("database", "app")], into: &startup)
            try clientChannel.writeInbound(startup)
            lend()
            loop.run()
            log.events.removeAll()
        }

        /// The pool lends the server to the client that asked.
        func lend() {
            lease += 1
            server.leasesIssued = lease
            client.lent(server, lease: lease)
        }

        func serverSends(_ messages: ByteBuffer...) throws {
            var bytes = ByteBuffer()
            for var m in messages { bytes.writeBuffer(&m) }
            try serverChannel.writeInbound(bytes)
            loop.run()
        }

        func clientSends(_ messages: ByteBuffer...) throws {
            var bytes = ByteBuffer()
            for var m in messages { bytes.writeBuffer(&m) }
            try clientChannel.writeInbound(bytes)
            loop.run()
        }
    }

    @Test func theServersAnswerIsWrittenBeforeTheServerGoesBack() throws {
        let rig = try Rig()
        try rig.clientSends(Self.query("select 1"))
        #expect(rig.log.events == ["pool asked for a server"])
        rig.lend()
        rig.loop.run()
        #expect(rig.log.events.last == "server gets Q")
        rig.log.events.removeAll()
        try rig.serverSends(
            Self.message("T") { $0.writeInteger(Int16(0)) },
            Self.message("C") { $0.writeNullTerminatedString("SELECT 1") },
            Self.ready())
        #expect(rig.log.events == ["client gets TCZ", "server released"])
    }

    @Test func aTransactionKeepsItsServerUntilItEnds() throws {
        let rig = try Rig()
        try rig.clientSends(Self.query("begin"))
        rig.lend()
        rig.loop.run()
        try rig.serverSends(Self.message("C") { $0.writeNullTerminatedString("BEGIN") }, Self.ready("T"))
        try rig.clientSends(Self.query("commit"))
        try rig.serverSends(Self.message("C") { $0.writeNullTerminatedString("COMMIT") }, Self.ready())
        #expect(
            rig.log.events == [
                "pool asked for a server", "server gets Q", "client gets CZ", "server gets Q", "client gets CZ",
                "server released",
            ])
    }

    @Test func aClientThatStopsReadingStopsItsServerBeingRead() throws {
        let rig = try Rig()
        try rig.clientSends(Self.query("select big"))
        rig.lend()
        rig.loop.run()
        rig.serverChannel.read()
        #expect(rig.log.reads["server"] == 1)
        rig.clientChannel.isWritable = false
        rig.clientChannel.pipeline.fireChannelWritabilityChanged()
        rig.serverChannel.read()
        rig.clientChannel.read()
        #expect(rig.log.reads["server"] == 1, "the server is not read while the client cannot take more")
        #expect(rig.log.reads["client"] == nil, "nor the client")
        rig.clientChannel.isWritable = true
        rig.clientChannel.pipeline.fireChannelWritabilityChanged()
        #expect(rig.log.reads["server"] == 2 && rig.log.reads["client"] == 1, "the reads asked for meanwhile go ahead")
    }

    /// A server lost once the client's query was written to it: the query may have run, so the
    /// client is told (as PostgreSQL's own connection loss would tell it), not given another server.
    @Test func aServerLostAfterTheQueryReachedItFailsTheClient() throws {
        let rig = try Rig()
        try rig.clientSends(Self.query("select 1"))
        rig.lend()
        rig.loop.run()
        rig.log.events.removeAll()
        try rig.serverChannel.close().wait()
        rig.loop.run()
        #expect(rig.log.events.contains("server closed"))
        #expect(rig.log.events.contains { $0.hasPrefix("client gets E") })
        #expect(!rig.log.events.contains("pool asked for a server"))
    }

    /// A server that closed before anything of the client's reached it: the client's request is
    /// sent to another server, and the client sees nothing of it.
    @Test func aServerLostBeforeTheQueryReachedItIsReplacedQuietly() throws {
        let rig = try Rig()
        try rig.clientSends(Self.query("select 1"))
        try rig.serverChannel.close().wait()
        rig.log.events.removeAll()
        rig.lend()
        rig.loop.run()
        #expect(rig.log.events == ["pool asked for a server"])
    }

    @Test func theLoopTicksAClientOnlyWhileItsSessionWatchesTheClock() throws {
        var rig = try Rig()
        var watched: Int { rig.pooler.poolerLoops[0].clockWatchers.count }
        #expect(watched == 1, "client_login_timeout: watched from the connection's start")
        rig.client.tick(now: .now())
        #expect(watched == 0, "logged in, with no timeout: let go at the next tick")

        rig = try Rig(settings: "client_idle_timeout = 100\n")
        rig.client.tick(now: .now())
        #expect(watched == 1, "client_idle_timeout: still watched")
        try rig.clientChannel.close().wait()
        rig.loop.run()
        #expect(watched == 0, "a closed client is not ticked again")
    }
}
