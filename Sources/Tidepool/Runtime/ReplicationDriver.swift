import NIOCore
import Synchronization
import TidepoolCore

/// A replication connection's own server (`ClientSession+PassThrough`): opened for one client,
/// outside the pool (but within max_db_connections / max_user_connections), closed with it.
final class ReplicationDriver: PoolDriving, Sendable {
    let key: PoolKey
    /// The pooler, which outlives the client's connection that holds this driver.
    unowned let pooler: any UnpooledServerOwner
    let client: ClientConnection
    /// The slot in the limits is given back once (close, failure or loss, whichever comes first).
    private let holdsSlot = Atomic<Bool>(true)

    init(key: PoolKey, pooler: any UnpooledServerOwner, client: ClientConnection) {
        self.key = key
        self.pooler = pooler
        self.client = client
    }

    func releaseSlot() {
        guard holdsSlot.exchange(false, ordering: .relaxed) else { return }
        pooler.pools.unpooledServerClosed(key)
    }

    func serverLoggedIn(_ server: ServerConnection) {
        let client = self.client
        client.onLoop { ClientLogin(client).replicationServerReady(server) }
    }

    func serverConnectFailed(_ server: ServerConnection, error: PostgresError) {
        releaseSlot()
        pooler.logger.warning("replication server connection for \(key) failed: \(error.message)")
        let client = self.client
        client.onLoop { client.deliver(.passThroughFailed(error)) }
    }

    /// The client is done: its server is closed, never pooled.
    func release(_ server: ServerConnection, reusable: Bool) {
        server.command(.terminate)
        releaseSlot()
    }

    func serverClosed(_ server: ServerConnection) { releaseSlot() }
    func requestServer(for client: ClientConnection) {}
    func clientGaveUp(_ id: ClientID) {}
    func checkFinished(_ server: ServerConnection, ok: Bool) {}
    func listenerMessage(_ server: ServerConnection, type: UInt8, body: ByteBuffer) {}
}

extension Pooler {
    /// A number for a server connection outside the pools (a listener, a replication client's),
    /// from a range the pool state machine's numbers never reach.
    func unpooledServerID() -> ServerID {
        ServerID((1 << 62) | unpooledServerIDs.add(1, ordering: .relaxed).newValue)
    }

    /// Opens a replication client's own server, with its `replication` parameter and the
    /// parameters it asked for (application_name and the like).
    func openReplicationServer(for client: ClientConnection) {
        let session = client.session
        let config = self.config
        guard let database = config.database(named: session.database), let mode = session.replication else { return }
        let key = PoolKey(database: session.database, entry: database, loginUser: session.user)
        let now = NIODeadline.now()
        var granted = false
        pools.withShared { s in
            var actions = pools.makePoolIfNew(key, database: database, in: &s.pools, now: now)
            granted = s.pools.unpooledServerOpening(key, into: &actions)
            return actions
        }
        guard granted else {
            client.deliver(
                .passThroughFailed(
                    .fatal(
                        SQLState.tooManyConnections,
                        "no more connections allowed (max_db_connections or max_user_connections)")))
            return
        }
        var startup = [("replication", mode == .logical ? "database" : "true")]
        for (name, value) in session.wanted.sorted(by: { $0.key < $1.key }) { startup.append((name, value)) }
        let id = unpooledServerID()
        let driver = ReplicationDriver(key: key, pooler: self, client: client)
        connector.open(id, pool: key, loop: client.loopIndex, driver: driver, listens: false, startup: startup)
        logger.info("replication connection (\(mode.rawValue)) for \(key): server \(id) opened")
    }
}
