import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// What opening server connections needs of the pooler (the connections themselves see it as
/// `ServerConnectionOwner`).
protocol ServerConnectorOwner: ServerConnectionOwner {
    /// The server TLS context (`server_tls_*`), reloaded by RELOAD.
    var security: Security { get }
}

/// Opens server connections: picks the host of a host list, builds the connection with its
/// login (the server secret from `Credentials`), then bootstrap, keepalive, TLS negotiation and
/// the address through `HostResolver`.
final class ServerConnector: Sendable {
    /// The pooler, which owns the connector and outlives it.
    private unowned let owner: any ServerConnectorOwner
    private let hosts: HostResolver
    private let credentials: Credentials
    private let loops: [PoolerLoop]
    /// Where the next server of each database with a host list goes (load_balance_hosts).
    private let hostChoices = NIOLockedValueBox([String: HostChoice]())

    init(owner: any ServerConnectorOwner, hosts: HostResolver, credentials: Credentials, loops: [PoolerLoop]) {
        self.owner = owner
        self.hosts = hosts
        self.credentials = credentials
        self.loops = loops
    }

    /// Opens a server connection whose life `driver` is told about: the pool's, or a pool's
    /// listener (`listens`). `made` sees it before it connects (the pool registers its servers
    /// there). Returns the connection (a placeholder when the database is gone).
    @discardableResult
    func open(
        _ id: ServerID, pool key: PoolKey, loop: Int, driver: any PoolDriving, listens: Bool,
        startup: [(String, String)] = [], made: (ServerConnection) -> Void = { _ in }
    ) -> ServerConnection {
        let config = owner.config
        guard let database = config.database(named: key.database) else {
            let placeholder = make(id, pool: key, database: nil, loop: 0, driver: driver)
            driver.serverConnectFailed(
                placeholder,
                error: .fatal(SQLState.invalidCatalogName, "database \"\(key.database)\" is not configured"))
            return placeholder
        }
        let server = make(
            id, pool: key, database: database, loop: loop, host: pickHost(of: database, pool: key), driver: driver,
            startup: startup)
        server.session.listens = listens
        made(server)
        let g = config.global
        let eventLoop = loops[server.loopIndex].eventLoop
        var bootstrap = ClientBootstrap(group: eventLoop)
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
        let negotiator = owner.security.serverTLSNegotiator(for: server.address, g)
        bootstrap =
            bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let negotiator { try channel.pipeline.syncOperations.addHandler(negotiator) }
                    try channel.pipeline.syncOperations.addHandler(server)
                }
            }
        let host = server.host
        hosts.connect(bootstrap, to: server.address, on: eventLoop).whenFailure { error in
            if let host { self.hostFailed(host, database: key.database) }
            driver.serverConnectFailed(server, error: PostgresError.fatal(SQLState.connectionFailure, "\(error)"))
        }
        return server
    }

    /// The connection, with its login, not connected yet (`open` connects it; the handler tests
    /// connect it to an EmbeddedChannel).
    func make(
        _ id: ServerID, pool key: PoolKey, database: DatabaseEntry?, loop: Int, host: String? = nil,
        driver: any PoolDriving, startup: [(String, String)] = []
    ) -> ServerConnection {
        let user = database?.user ?? key.user
        let login = database.map {
            ServerLoginStateMachine(
                database: $0, user: user, secret: credentials.serverSecret(user: user, database: $0), extra: startup)
        }
        return ServerConnection(
            id: id, pool: key, database: database, login: login, owner: owner, connector: self,
            loop: loops[loop % loops.count], host: host, driver: driver)
    }

    /// host=a,b: which one, as load_balance_hosts says (nil for a single host).
    private func pickHost(of database: DatabaseEntry, pool key: PoolKey) -> String? {
        let hosts = database.hosts
        guard hosts.count > 1 else { return nil }
        let mode = database.loadBalanceHosts ?? .roundRobin
        return hostChoices.withLockedValue { choices in
            var choice = choices[key.database] ?? HostChoice(hosts: hosts, mode: mode)
            if choice.hosts != hosts || choice.mode != mode { choice = HostChoice(hosts: hosts, mode: mode) }
            let host = choice.pick()
            choices[key.database] = choice
            return host
        }
    }

    /// A connection to `host` of the database's list failed or was refused (load_balance_hosts =
    /// disable then moves on).
    func hostFailed(_ host: String, database: String) {
        hostChoices.withLockedValue { $0[database]?.failed(host) }
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
}

extension Security {
    /// The SSLRequest step for a new server connection, per server_tls_sslmode; none over a Unix
    /// socket (PostgreSQL does not offer TLS there) or when TLS is off.
    func serverTLSNegotiator(for address: ServerConnection.Address, _ g: GlobalSettings) -> ServerTLSNegotiator? {
        guard case .tcp(let host, _) = address, g.serverTLS.sslmode != .disable, g.serverTLS.sslmode != .allow
        else { return nil }
        return ServerTLSNegotiator(
            mode: g.serverTLS.sslmode, context: serverTLS, hostname: host, timeout: g.serverConnectTimeout)
    }
}

extension Pooler {
    /// A host name's new answer dropped addresses: the servers open to them close once released.
    func addressesDropped(host: String, gone: [String], answered: [String], now: NIODeadline) {
        let ids = pools.servers(of: host, at: gone)
        logger.info(
            "DNS: \(host) is now \(answered.joined(separator: ",")), no longer \(gone.joined(separator: ",")): \(ids.count) server(s) to close"
        )
        if !ids.isEmpty { pools.withPool { $0.reconnect(servers: ids, now: now) } }
    }
}

/// What a server connection asks of the pooler once it is made: settings and the log. (Its
/// pools are told through `PoolDriving`, a failed host through its connector.)
protocol ServerConnectionOwner: AnyObject, Sendable {
    var config: Config { get }
    var logger: Logger { get }
}
