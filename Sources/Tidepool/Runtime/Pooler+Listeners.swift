import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// Where clients connect: one TCP listener per event loop (SO_REUSEPORT), the Unix socket.
extension Pooler {
    /// One listening socket per event loop (SO_REUSEPORT), each accepting onto its own loop: a
    /// new client then never waits for a hand-over from the accepting thread to its own. Unless
    /// `shared` (so_reuseport), a plain bind first makes sure no other process holds the port, so
    /// a second pooler on the same port fails as it would with one socket.
    func listenTCP(host: String, port: Int, shared: Bool) throws {
        if loops.count == 1 {
            listeners.append(try makeServerBootstrap().bind(host: host, port: port).wait())
            return
        }
        if !shared {
            try makeServerBootstrap(on: loops[0], reusePort: false).bind(host: host, port: port).wait().close().wait()
        }
        var bound = port
        for loop in loops {
            let channel = try makeServerBootstrap(on: loop, reusePort: true).bind(host: host, port: bound).wait()
            bound = channel.localAddress?.port ?? bound  // port 0: the others join the first one's
            listeners.append(channel)
        }
    }

    func makeServerBootstrap(on loop: EventLoop? = nil, reusePort: Bool = false, tcp: Bool = true) -> ServerBootstrap {
        let bootstrap = loop.map { ServerBootstrap(group: $0) } ?? ServerBootstrap(group: group)
        if tcp && config.global.tcpDeferAccept {  // PgBouncer's fixed 45 seconds; a TCP option only
            _ = bootstrap.serverChannelOption(
                ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_DEFER_ACCEPT)),
                value: 45)
        }
        return
            bootstrap
            .serverChannelOption(
                ChannelOptions.Types.SocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: SO_REUSEPORT)),
                value: reusePort ? 1 : 0
            )
            .serverChannelOption(.backlog, value: Int32(config.global.listenBacklog))
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: false)
            // An idle client keeps its receive buffer between reads: start it small (it grows
            // when a read fills it) so that thousands of idle clients cost little memory. 128
            // bytes hold a startup packet; 256 cost 128 B more per idle client and NIO's adaptive
            // allocator another 49 B for its box (BENCHMARKS.md).
            .childChannelOption(.recvAllocator, value: ReceiveBufferSizer(initial: 128, maximum: config.global.pktBuf))
            .childChannelInitializer { [self] channel in
                let index = self.loopIndex(of: channel.eventLoop)
                let client = ClientConnection(pooler: self, channel: channel, loopIndex: index)
                return channel.eventLoop.makeCompletedFuture {
                    let g = config.global
                    if let options = channel.syncOptions {
                        try options.setOption(.writeBufferWaterMark, value: ServerConnector.waterMark(g))
                        try options.setOption(.maxMessagesPerRead, value: ServerConnector.readsPerTurn(g))
                        if channel.localAddress?.protocol != .unix {
                            // A client gone without a word is noticed as a server would be.
                            for (option, value) in ServerConnector.tcpKeepaliveOptions(g) {
                                try options.setOption(option, value: value)
                            }
                        }
                    }
                    try channel.pipeline.syncOperations.addHandler(client)
                }
            }
    }

    func loopIndex(of loop: EventLoop) -> Int {
        loops.firstIndex { $0 === loop } ?? 0
    }

    /// Stops accepting new clients.
    /// A shutdown that waits has begun: RESUME is refused from now on.
    public func beginDraining() {
        pools.beginDraining()
    }

    /// Stops accepting clients. With `keepUnixSocket`, the Unix socket stays open for the admin
    /// console until the end, as PgBouncer's shutdowns that wait keep it (logins to a database
    /// are refused there, `ClientSession.destination`).
    public func stopListening(keepUnixSocket: Bool = false) {
        var kept: [Channel] = []
        for listener in listeners {
            if keepUnixSocket, listener.localAddress?.protocol == .unix {
                kept.append(listener)
            } else {
                try? listener.close().wait()
            }
        }
        listeners = kept
    }

    /// SHUTDOWN WAIT_FOR_SERVERS (SIGINT): see `PoolStateMachine.closeForShutdown`.
    public func closeForShutdown() {
        pools.withPool { $0.closeForShutdown() }
    }

    /// PAUSE: stop lending servers of `database` (all when nil); the future completes once no server
    /// of those pools is lent any more.
    public func pause(database: String?) -> EventLoopFuture<Void> {
        pools.pause(database: database)
        logger.info("PAUSE \(database ?? "all databases"): waiting for lent servers to come back")
        return waitUntil(on: loops[0]) { [self] in lentServers(database: database) == 0 }
    }

    /// SUSPEND: PAUSE everything, waiting at most suspend_timeout (0: as long as it takes) for lent
    /// servers to come back; clients still holding one then are dropped (their servers, mid
    /// transaction, are closed with them), as PgBouncer drops connections it cannot flush in time.
    func suspend(on loop: EventLoop) -> EventLoopFuture<Void> {
        pools.suspend()
        let timeout = config.global.suspendTimeout
        let deadline = timeout > .zero ? NIODeadline.now() + timeout : .distantFuture
        logger.info("SUSPEND: waiting for lent servers to come back")
        return waitUntil(on: loop) { [self] in lentServers(database: nil) == 0 || .now() >= deadline }.map { [self] in
            let holders = pools.clientsHoldingServers()
            guard !holders.isEmpty else { return }
            logger.warning("SUSPEND: suspend_timeout: \(holders.count) client(s) still holding a server dropped")
            for client in holders { client.onLoop { client.kill("suspend_timeout") } }
        }
    }

    /// Servers lent to clients right now in the pools of `database` (all when nil).
    public func lentServers(database: String?) -> Int {
        pools.lentCount(database: database)
    }

    public func resume(database: String?) {
        pools.resume(database: database)
        logger.info("RESUME \(database ?? "all databases")")
    }
}
