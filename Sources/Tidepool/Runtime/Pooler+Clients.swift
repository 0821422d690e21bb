import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// The registries of live clients: admission (max_client_conn, per-address limits), cancel keys,
/// pools joined, the welcome each pool's clients share.
extension Pooler {
    /// Registers a client that passed the startup packet; fails when max_client_conn or a limit
    /// per client address is reached. `address` is nil for a Unix socket (no per-address limit).
    /// `limited`: the client's database and user, counted against max_db_client_connections and
    /// max_user_client_connections (nil for the admin console).
    func register(
        _ client: ClientConnection, address: String?, limited: (database: String, user: String)?, limit: Int
    ) -> Result<ClientID, PostgresError> {
        // Values read through the lent configuration, not a copy of all the global settings.
        let config = self.config
        let maxClientConn = limit
        let maxPerAddress = config.global.maxClientConnPerIP
        let perSecond = config.global.clientConnectRatePerIP
        let maxPerDatabase = limited.map { config.maxDBClientConnections(database: $0.database) } ?? 0
        let maxPerUser = limited.map { config.maxUserClientConnections(user: $0.user) } ?? 0
        let now = NIODeadline.now()
        return shared.withLockedValue { s in
            guard s.clientCount < maxClientConn else {
                return .failure(.fatal(SQLState.tooManyConnections, "no more connections allowed (max_client_conn)"))
            }
            if let limited {
                if maxPerDatabase > 0, s.databaseClients[limited.database, default: 0] >= maxPerDatabase {
                    return .failure(
                        .fatal(SQLState.tooManyConnections, "client connections exceeded (max_db_client_connections)"))
                }
                if maxPerUser > 0, s.userClients[limited.user, default: 0] >= maxPerUser {
                    return .failure(
                        .fatal(SQLState.tooManyConnections, "client connections exceeded (max_user_client_connections)")
                    )
                }
            }
            if let address {
                s.addresses.maxPerAddress = maxPerAddress
                s.addresses.perSecond = perSecond
                if let refusal = s.addresses.admit(address, now: now) {
                    var error = refusal.postgresError
                    error.severity = "FATAL"
                    return .failure(error)
                }
            }
            s.clientCount += 1
            if let limited {
                s.databaseClients[limited.database, default: 0] += 1
                s.userClients[limited.user, default: 0] += 1
            }
            let id = ClientID(s.nextClientID)
            s.nextClientID += 1
            s.clients[id] = client
            return .success(id)
        }
    }

    /// Gives a logged-in client a cancel key of its own.
    func issueCancelKey(for client: ClientConnection) -> (Int32, Int32) {
        var g = SystemRandomNumberGenerator()
        let peerID = config.global.peerID
        return shared.withLockedValue { s in
            while true {
                // One draw (a getrandom system call) gives both halves; process IDs are positive.
                let bits = g.next()
                let key = CancelKey(
                    processID: Peering.processID(peerID: peerID, random: UInt32(truncatingIfNeeded: bits)),
                    secretKey: Int32(truncatingIfNeeded: bits >> 32))
                if key.processID != 0, s.cancelKeys[key] == nil {
                    s.cancelKeys[key] = client
                    return (key.processID, key.secretKey)
                }
            }
        }
    }

    /// A client of pool `key` logged in; the pool is made with the settings of `database` if it
    /// does not exist yet (pools are never removed, so the client need not keep the entry).
    func joinPool(_ key: PoolKey, database: DatabaseEntry) {
        let now = NIODeadline.now()
        withShared { s in
            s.poolClients[key, default: 0] += 1
            return makePoolIfNew(key, database: database, in: &s.pools, now: now)
        }
    }

    /// Makes the pool `key` with the settings of `database` unless it exists; its actions.
    func makePoolIfNew(
        _ key: PoolKey, database: DatabaseEntry, in pools: inout PoolStateMachine, now: NIODeadline
    ) -> [PoolAction] {
        guard !pools.hasPool(key) else { return [] }
        return pools.configure(key, settings: poolSettings(database: database, user: key.user), now: now)
    }

    /// A client of pool `key` started (or stopped) keeping its server for session state. While
    /// pinned clients hold every server of the pool, a warning is logged once a minute.
    func pinChanged(_ key: PoolKey, pinned: Bool, reason: PinReason?) {
        let now = NIODeadline.now()
        let poolSize = config.database(named: key.database).map { config.poolSize(database: $0, user: key.user) }
        let warn = shared.withLockedValue { s -> Int? in
            s.pinnedClients[key, default: 0] += pinned ? 1 : -1
            let count = s.pinnedClients[key]!
            guard pinned, let poolSize, count >= poolSize else { return nil }
            if let last = s.pinWarnings[key], now - last < .seconds(60) { return nil }
            s.pinWarnings[key] = now
            return count
        }
        if pinned, let reason {
            metrics.count(
                "tidepool_pins_total", [("database", key.database), ("user", key.user), ("reason", reason.name)])
        }
        if let warn {
            logger.warning(
                "pool \(key): \(warn) pinned clients hold all its servers (session state: advisory locks, temp tables, WITH HOLD cursors, LISTEN...); other clients wait"
            )
        }
    }

    func unregister(
        _ client: ClientConnection, id: ClientID?, cancelKey: (Int32, Int32)?, pool: PoolKey?, address: String?,
        limited: (database: String, user: String)?
    ) {
        shared.withLockedValue { s in
            if let limited {
                s.databaseClients[limited.database, default: 1] -= 1
                s.userClients[limited.user, default: 1] -= 1
            }
            if let pool { s.poolClients[pool, default: 1] -= 1 }
            if let id, s.clients.removeValue(forKey: id) != nil {
                s.clientCount -= 1
                if let address { s.addresses.release(address) }
                s.pools.clientGaveUp(id)
            }
            if let cancelKey { s.cancelKeys[CancelKey(processID: cancelKey.0, secretKey: cancelKey.1)] = nil }
        }
    }

    /// Passes a CancelRequest on to the backend the client is using right now, if any, or to the
    /// peer process that issued the key.
    func cancel(processID received: Int32, secretKey: Int32) {
        let config = self.config
        let processID: Int32
        switch Peering.route(processID: received, ownPeerID: config.global.peerID, peers: config.peers.keys) {
        case .local(let id): processID = id
        case .forward(let peer, let id):
            return forwardCancel(processID: id, secretKey: secretKey, to: config.peers[peer]!)
        case .unknownPeer(let peer):
            logger.warning("cancel request for peer \(peer), which is not in [peers]: ignored")
            return
        }
        let client = shared.withLockedValue { $0.cancelKeys[CancelKey(processID: processID, secretKey: secretKey)] }
        guard let client else {
            logger.debug("cancel request with an unknown key ignored")
            return
        }
        client.onLoop { client.cancelRequested() }
    }

    /// Sends a CancelRequest on a new connection; completes when PostgreSQL has closed that
    /// connection (it has then acted on the request) or after server_connect_timeout.
    @discardableResult
    func sendCancel(to target: ServerConnection.CancelTarget) -> EventLoopFuture<Void> {
        var buffer = ByteBufferAllocator().buffer(capacity: 16)
        Wire.cancelRequest(processID: target.processID, secretKey: target.secretKey, into: &buffer)
        let packet = buffer
        let timeout = config.global.serverConnectTimeout
        let loop = group.next()
        let connecting = connect(ClientBootstrap(group: loop).connectTimeout(timeout), to: target.address, on: loop)
        return connecting.flatMap { channel in
            channel.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
            return channel.writeAndFlush(packet).flatMap { channel.closeFuture }
        }
    }

    /// Passes a cancel request on to the peer that issued its key, within the peer's pool_size.
    func forwardCancel(processID: Int32, secretKey: Int32, to peer: PeerEntry) {
        let target = ServerConnection.CancelTarget(
            address: ServerConnection.Address(host: peer.host, port: peer.port), processID: processID,
            secretKey: secretKey)
        let limit = config.poolSize(peer: peer)
        let now = NIODeadline.now()
        let send = shared.withLockedValue { $0.peerCancels.submit(target, peer: peer.id, limit: limit, now: now) }
        if let send { sendToPeer(send, peer: peer.id) }
    }

    private func sendToPeer(_ target: ServerConnection.CancelTarget, peer: Int) {
        sendCancel(to: target).whenComplete { [self] result in
            if case .failure(let error) = result {
                logger.warning("cancel request for peer \(peer) not passed on: \(error)")
            }
            let timeout = config.global.cancelWaitTimeout
            let (next, dropped) = shared.withLockedValue {
                $0.peerCancels.finished(peer: peer, now: .now(), timeout: timeout)
            }
            if dropped > 0 {
                logger.warning("\(dropped) cancel request(s) for peer \(peer) dropped: cancel_wait_timeout")
            }
            if let next { sendToPeer(next, peer: peer) }
        }
    }
}
