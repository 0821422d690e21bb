import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// Opens server connections: bootstrap, keepalive, TLS negotiation, then the connection's login.
extension Pooler {
    func connect(_ id: ServerID, pool key: PoolKey, loop: Int) {
        _ = openServer(id, pool: key, loop: loop, driver: self, listens: false)
    }

    /// Opens a server connection whose life `driver` is told about: the pool's, or a pool's
    /// listener (`listens`). Returns the connection (a placeholder when the database is gone).
    func openServer(
        _ id: ServerID, pool key: PoolKey, loop: Int, driver: any PoolDriving, listens: Bool,
        startup: [(String, String)] = []
    ) -> ServerConnection {
        guard let database = config.database(named: key.database) else {
            let placeholder = ServerConnection(
                id: id, pool: key, database: nil, pooler: self, loopIndex: 0, driver: driver)
            driver.serverConnectFailed(
                placeholder,
                error: .fatal(SQLState.invalidCatalogName, "database \"\(key.database)\" is not configured"))
            return placeholder
        }
        // host=a,b: which one, as load_balance_hosts says.
        let hosts = database.hosts
        let host: String? =
            hosts.count > 1
            ? shared.withLockedValue { s in
                var choice = s.hostChoices[key.database] ?? HostChoice(hosts: hosts, mode: .roundRobin)
                if choice.hosts != hosts || choice.mode != (database.loadBalanceHosts ?? .roundRobin) {
                    choice = HostChoice(hosts: hosts, mode: database.loadBalanceHosts ?? .roundRobin)
                }
                let host = choice.pick()
                s.hostChoices[key.database] = choice
                return host
            } : nil
        let server = ServerConnection(
            id: id, pool: key, database: database, pooler: self, loopIndex: loop % loops.count, host: host,
            driver: driver, startup: startup)
        server.session.listens = listens
        if driver === self { shared.withLockedValue { $0.servers[id] = server } }
        let g = config.global
        var bootstrap = ClientBootstrap(group: loops[loop % loops.count])
            .connectTimeout(g.serverConnectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.writeBufferWaterMark, value: Self.waterMark(g))
            .channelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: min(2048, g.pktBuf), maximum: g.pktBuf)
            )
            .channelOption(.maxMessagesPerRead, value: Self.readsPerTurn(g))
        if case .tcp = server.address {
            for (option, value) in Self.tcpKeepaliveOptions(g) {
                bootstrap = bootstrap.channelOption(option, value: value)
            }
        }
        let negotiator = serverTLSNegotiator(for: server.address)
        bootstrap =
            bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let negotiator { try channel.pipeline.syncOperations.addHandler(negotiator) }
                    try channel.pipeline.syncOperations.addHandler(server)
                }
            }
        let connecting = self.hosts.connect(bootstrap, to: server.address, on: loops[loop % loops.count])
        connecting.whenFailure { error in
            if let host { self.hostFailed(host, database: key.database) }
            driver.serverConnectFailed(
                server, error: PostgresError.fatal(SQLState.connectionFailure, "\(error)"))
        }
        return server
    }

    /// A connection to `host` of the database's list failed or was refused (load_balance_hosts =
    /// disable then moves on).
    func hostFailed(_ host: String, database: String) {
        shared.withLockedValue { $0.hostChoices[database]?.failed(host) }
    }

    /// SO_KEEPALIVE, then tcp_keepidle, tcp_keepintvl, tcp_keepcnt, tcp_user_timeout and
    /// tcp_socket_buffer, as PgBouncer applies them to TCP sockets on both sides.
    static func tcpKeepaliveOptions(_ g: GlobalSettings) -> [(ChannelOptions.Types.SocketOption, SocketOptionValue)] {
        var options = [
            (
                ChannelOptions.Types.SocketOption(level: .socket, name: .so_keepalive),
                SocketOptionValue(g.tcpKeepalive ? 1 : 0)
            )
        ]
        for (option, value) in [
            (TCP_KEEPIDLE, g.tcpKeepidle), (TCP_KEEPINTVL, g.tcpKeepintvl), (TCP_KEEPCNT, g.tcpKeepcnt),
            (TCP_USER_TIMEOUT, g.tcpUserTimeout),
        ] where value > 0 && (g.tcpKeepalive || option == TCP_USER_TIMEOUT) {
            options.append(
                (
                    ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: option)),
                    SocketOptionValue(value)
                ))
        }
        if g.tcpSocketBuffer > 0 {  // tcp_socket_buffer
            for name in [NIOBSDSocket.Option.so_sndbuf, .so_rcvbuf] {
                options.append(
                    (
                        ChannelOptions.Types.SocketOption(level: .socket, name: name),
                        SocketOptionValue(g.tcpSocketBuffer)
                    ))
            }
        }
        return options
    }

    /// sbuf_loopcnt: reads of one connection per turn of its event loop. NIO keeps up to that
    /// many receive buffers per channel (and reserves room for them), so "no limit" (0) and
    /// large values are held to 64.
    static func readsPerTurn(_ g: GlobalSettings) -> UInt {
        g.sbufLoopcnt == 0 ? 64 : UInt(min(g.sbufLoopcnt, 64))
    }

    /// Past max_buffered_bytes queued, a channel is not writable; below half, it is again.
    static func waterMark(_ g: GlobalSettings) -> ChannelOptions.Types.WriteBufferWaterMark {
        ChannelOptions.Types.WriteBufferWaterMark(low: g.maxBufferedBytes / 2, high: g.maxBufferedBytes)
    }

    /// The SSLRequest step for a new server connection, per server_tls_sslmode; none over a Unix
    /// socket (PostgreSQL does not offer TLS there) or when TLS is off.
    func serverTLSNegotiator(for address: ServerConnection.Address) -> ServerTLSNegotiator? {
        let g = config.global
        guard case .tcp(let host, _) = address, g.serverTLS.sslmode != .disable, g.serverTLS.sslmode != .allow
        else { return nil }
        return ServerTLSNegotiator(
            mode: g.serverTLS.sslmode, context: security.serverTLS, hostname: host, timeout: g.serverConnectTimeout)
    }
}

/// What a server connection asks of the pooler once it is made: settings, the log, and telling
/// the host list that a host failed. (Its pools are told through `PoolDriving`.)
extension Pooler {
    /// A host name's new answer dropped addresses: the servers open to them close once released.
    func addressesDropped(host: String, gone: [String], answered: [String], now: NIODeadline) {
        let ids = shared.withLockedValue { s in
            Set(
                s.servers.compactMap { id, server -> ServerID? in
                    guard case .tcp(let name, _) = server.address, name == host,
                        let remote = server.remoteIP, gone.contains(remote)
                    else { return nil }
                    return id
                })
        }
        logger.info(
            "DNS: \(host) is now \(answered.joined(separator: ",")), no longer \(gone.joined(separator: ",")): \(ids.count) server(s) to close"
        )
        if !ids.isEmpty { withPool { $0.reconnect(servers: ids, now: now) } }
    }
}

protocol ServerConnectionOwner: AnyObject, Sendable {
    var config: Config { get }
    var logger: Logger { get }
    func hostFailed(_ host: String, database: String)
}
