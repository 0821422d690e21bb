import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// What a client's connection and its carriers (`ClientLogin`, `ClientStatistics`,
/// `ClientExit`) need of the pooler beyond what they hold directly (its loop, the pool driver,
/// the shared statements): the login's sources, the registry's bookkeeping, the console.
protocol ClientConnectionOwner: AnyObject, Sendable {
    var config: Config { get }
    var logger: Logger { get }
    var metrics: PoolerMetrics { get }
    /// HBA rules, ident map and the client TLS context.
    var security: Security { get }
    /// auth_file's users.
    var userlist: [String: PasswordSecret] { get }
    var pools: PoolDriver! { get }
    var credentials: Credentials! { get }
    var cancels: CancelRequests! { get }
    var listenerHub: ListenerHub! { get }
    var statements: SharedStatements { get }
    var poolerLoops: [PoolerLoop] { get }
    func trafficCell(loop: Int, database: String) -> Pooler.TrafficCell
    func countConsole(loop: Int, received: Int, sent: Int)
    func pinChanged(_ client: ClientConnection, pinned: Bool)
    func forget(_ client: ClientConnection)
    func openReplicationServer(for client: ClientConnection)
    var admin: AdminRuntime! { get }
}

/// A client's pin and its exit, as counted in the registry (`PoolDriver`) and its pool's listener.
extension Pooler {
    /// A client of a pool started (or stopped) keeping its server for session state. While
    /// pinned clients hold every server of the pool, a warning is logged once a minute.
    func pinChanged(_ client: ClientConnection, pinned: Bool) {
        guard let key = client.registration.pool, pinned != client.registration.pinned else { return }
        client.registration.pinned = pinned
        let reason = client.session.sessionState?.pinReason
        let now = NIODeadline.now()
        let poolSize = config.database(named: key.database).map { config.poolSize(database: $0, user: key.user) }
        let warn = pools.pinChanged(key, pinned: pinned, poolSize: poolSize, now: now)
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

    /// Undoes, once, everything `client` was counted under: the registry, its pool's pinned
    /// clients and listener, the console, the clock.
    func forget(_ client: ClientConnection) {
        pinChanged(client, pinned: false)
        let r = client.registration
        client.registration = ClientRegistration()
        if r.listens, let id = client.id, let pool = r.pool {
            listenerHub.listener(for: pool, loop: client.loopIndex).clientGone(id)
        }
        client.loop.clockWatchers[ObjectIdentifier(client)] = nil
        pools.remove(client.id, r)
    }
}

/// What the pooler counts one client under, kept by its connection so that `Pooler.forget` undoes
/// exactly that.
struct ClientRegistration {
    /// The address counted for max_client_conn_per_ip (nil for a Unix socket).
    var address: String?
    /// The database and user counted for max_db_client_connections and the user's.
    var counted: ClientRegistry<ClientConnection>.Counted?
    /// Who is at the other end of a Unix socket, read at admission.
    var peer: PeerCredentials?
    var cancelKey: ClientRegistry<ClientConnection>.CancelKey?
    /// The pool joined (counted in SHOW POOLS).
    var pool: PoolKey?
    /// Counted among the pool's pinned clients (cl_pinned).
    var pinned = false
    /// Subscribed to the pool's listener.
    var listens = false
    /// Counted among the admin console's sessions.
    var inConsole = false
}
