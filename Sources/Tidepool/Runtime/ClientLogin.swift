import Foundation
import Logging
import NIOCore
import NIOSSL
import TidepoolCore

/// Carries out a client's login actions (`ClientSession+Login.swift` decides them) against the
/// pooler's registries, lookups and TLS: admission, the auth_query lookup, the destination, the
/// pool and the welcome. Made for each action; holds nothing.
struct ClientLogin {
    let client: ClientConnection
    var pooler: any ClientConnectionOwner { client.pooler }

    init(_ client: ClientConnection) { self.client = client }

    func carryOut(_ step: ClientSession.LoginStep) {
        switch step {
        case .startTLS: startTLS()
        case .register: register()
        case .lookUpSecret: lookUpSecret()
        case .authenticated: authenticated()
        case .joinPool: joinPool()
        case .openReplicationServer: pooler.openReplicationServer(for: client)
        case .forwardCancel(let processID, let secretKey):
            pooler.cancels.received(processID: processID, secretKey: secretKey)
            client.closeReason = "cancel request"
        case .closeQuietly: client.channel.close(promise: nil)
        }
    }

    /// Answers SSLRequest with 'S' and puts the TLS handler in front of the client's; its next
    /// bytes are its TLS handshake.
    func startTLS() {
        let channel = client.channel
        var out = channel.allocator.buffer(capacity: 1)
        out.writeInteger(MessageType.encryptionAccepted)
        channel.writeAndFlush(out, promise: nil)
        do {
            guard let context = pooler.security.clientTLS else { throw ChannelError.operationUnsupported }
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context), position: .first)
        } catch {
            client.closeReason = "TLS setup failed"
            channel.close(promise: nil)
        }
    }

    /// Admits the client (max_client_conn, the per-database, per-user and per-address limits),
    /// then hands the session what the login needs.
    func register() {
        // Read field by field: a copy of the whole session would make its buffers copy on write.
        let (user, database, tls) = (client.session.user, client.session.database, client.session.tls)
        let peer = ClientPeer(client.channel, tls: tls)
        let admission = ClientRegistry<ClientConnection>.Admission(
            database: database, user: user, config: pooler.config)
        switch pooler.pools.register(client, address: peer.ip, admission) {
        case .success(let id):
            client.id = id
            client.registration.address = peer.ip
            client.registration.counted = admission.counted
        case .failure(let error):
            pooler.logger.warning("client \(client.peer) user=\(user) refused: \(error.message)")
            client.sendFatal(error, reason: error.message)
            return
        }
        let config = pooler.config
        if config.global.logConnections {
            let words = LogWords.loginAttempt(
                database: database, user: user, tls: tls, replication: client.session.replication?.rawValue)
            pooler.logger.info("\(client.logPrefix) \(words)")
        }
        client.registration.peer = peer.credentials
        let security = pooler.security
        client.session.registered(
            LoginFacts(
                config: config, hba: security.hba, clientAddress: peer.addressAndPort, clientIP: peer.ip,
                certificateCommonName: peer.certificateCommonName, knownSecret: pooler.userlist[user],
                canLookUp: pooler.credentials.authUser(for: databaseEntry(config)) != nil, peer: peer.credentials,
                ident: security.ident, databaseDisabled: pooler.pools.isDisabled(database)),
            into: &client.actions)
    }

    /// The client's database entry; nil for the admin console, which looks secrets up only in
    /// auth_file, or through an explicit auth_dbname.
    func databaseEntry(_ config: Config) -> DatabaseEntry? {
        let database = client.session.database
        return ClientSession.isAdminConsole(database, config: config) ? nil : config.database(named: database)
    }

    func lookUpSecret() {
        let (client, user) = (self.client, client.session.user)
        let logger = pooler.logger
        pooler.credentials.lookUp(user: user, database: databaseEntry(pooler.config), on: client.channel.eventLoop)
            .whenSuccess { outcome in
                if case .failed(let error) = outcome {
                    logger.warning("auth_query for user=\(user) failed: \(error.message)")
                }
                client.session.secretLookedUp(outcome, into: &client.actions)
                client.run()
                if case .authenticating = client.session.state { client.processStash() }
            }
    }

    func authenticated() {
        let user = client.session.user
        if let secret = client.session.learnedServerSecret {
            pooler.credentials.learned(secret, user: user)
        }
        let request = LoginRequest(
            user: user, database: client.session.database, clientIP: ClientPeer.ip(client.channel),
            tls: client.session.tls, peer: client.registration.peer)
        let config = pooler.config
        let pooler = self.pooler
        client.session.enter(
            ClientSession.destination(
                request, config: config, shuttingDown: pooler.pools.isDraining,
                isDisabled: { pooler.pools.isDisabled($0) }),
            notice: config.global.loginNotifyMessage, into: &client.actions)
        if client.session.isAdmin {
            client.registration.inConsole = true
            pooler.pools.consoleEntered()
        }
    }

    /// Joins the pool of the client's (database, user) and welcomes the client with the pool's
    /// parameters, or borrows a server to learn them first.
    func joinPool() {
        let config = pooler.config
        let name = client.session.database
        let entry = config.database(named: name)
        guard client.session.joinPool(entry, config: config, now: .now(), into: &client.actions), let entry else {
            return
        }
        if config.global.statsListenPort > 0 { client.timers = pooler.metrics.timers(for: name) }
        client.session.latency = client.loop.latency.recorder(for: name)
        client.session.reportsTimings = client.timers != nil
        let key = PoolKey(database: name, entry: entry, loginUser: client.session.user)
        pooler.pools.joinPool(key, database: entry)
        client.registration.pool = key
        if let parameters = pooler.pools.welcomeParameters(for: key) {
            welcome(parameters, fromPool: true)
        } else {
            client.session.awaitWelcome(into: &client.actions)
        }
    }

    /// The welcome for the server parameters given. `fromPool`: they are the pool's (not a
    /// just-borrowed server's), so the welcome can be shared with the pool's other clients.
    func welcome(_ serverParameters: [String: String], fromPool: Bool) {
        let wanted = client.session.wanted
        let make = { ClientSession.Welcome(serverParameters: serverParameters, wanted: wanted) }
        let welcome =
            fromPool
            ? pooler.pools.welcome(for: client.registration.pool!, values: client.session.$wanted, make: make) : make()
        client.session.welcome(
            welcome, cancelKey: issueCancelKey(), notice: pooler.config.global.loginNotifyMessage, now: .now(),
            into: &client.actions)
    }

    /// The replication connection's own server logged in.
    func replicationServerReady(_ server: ServerConnection) {
        guard client.session.isAwaitingWelcome else {
            server.command(.terminate)
            return
        }
        client.server = server
        client.lease = 1
        server.attach(client, lease: 1)
        client.session.passThroughStarted(server.session.state, cancelKey: issueCancelKey(), into: &client.actions)
        client.run()
    }

    /// A cancel key of the client's own, kept in its registration to be dropped when it goes.
    func issueCancelKey() -> (Int32, Int32) {
        let key = pooler.pools.issueCancelKey(for: client)
        client.registration.cancelKey = key
        return (key.processID, key.secretKey)
    }
}

/// How the logs name a client.
extension ClientConnection {
    var peer: String { channel.remoteAddress.map { "\($0)" } ?? "unix" }

    /// `C-<id>: db/user@address:port`, as PgBouncer starts a client's log lines.
    var logPrefix: String {
        LogWords.connection(
            "C", id: id.map { "\($0.raw)" } ?? "?", database: databaseName, user: user,
            address: channel.remoteAddress.logText)
    }
}

/// What the login reads of the client's socket.
struct ClientPeer {
    /// The client's IP address as text, and "address:port"; nil for a Unix socket.
    var ip: String?
    var addressAndPort: String?
    /// Who is at the other end of a Unix socket (SO_PEERCRED); nil over TCP.
    var credentials: PeerCredentials?
    /// The common name of the client's verified certificate, for the cert method.
    var certificateCommonName: String?

    init(_ channel: Channel, tls: Bool) {
        if let ip = Self.ip(channel) {
            self.ip = ip
            addressAndPort = "\(ip):\(channel.remoteAddress?.port ?? 0)"
        }
        credentials = Self.credentials(channel)
        if tls, let handler = try? channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self),
            let certificate = handler.peerCertificate
        {
            certificateCommonName = certificate.subjectName.first { $0.type == .commonName }?.value
        }
    }

    static func ip(_ channel: Channel) -> String? {
        guard let address = channel.remoteAddress, address.protocol != .unix else { return nil }
        return address.ipAddress
    }

    static func credentials(_ channel: Channel) -> PeerCredentials? {
        guard channel.localAddress?.protocol == .unix, let provider = channel as? SocketOptionProvider else {
            return nil
        }
        var credentials: SocketPeer?
        // On the channel's loop the future is already complete, and its callback runs at once.
        provider.unsafeGetSocketOption(
            level: .socket, name: NIOBSDSocket.Option(rawValue: SO_PEERCRED)
        ).whenSuccess { (value: SocketPeer) in credentials = value }
        guard let credentials else { return nil }
        return PeerCredentials(
            systemUser: Self.userName(uid: credentials.uid), isPoolerUser: credentials.uid == getuid())
    }

    /// Linux's struct ucred, as SO_PEERCRED fills it (Glibc's is not visible to Swift).
    struct SocketPeer {
        var pid: Int32 = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
    }

    /// An operating-system user's name.
    static func userName(uid: uid_t) -> String? {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 4096)
        guard getpwuid_r(uid, &entry, &buffer, buffer.count, &result) == 0, result != nil, let name = entry.pw_name
        else { return nil }
        return String(cString: name)
    }
}
