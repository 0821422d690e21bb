import NIOCore

/// The pooler's live clients and what is counted of them: admission (max_client_conn,
/// max_db_client_connections, max_user_client_connections, the per-address limits), the cancel
/// keys handed out, clients per pool and pinned clients per pool (with the warning when pinned
/// clients hold all of a pool's servers), and the admin console's sessions. Kept beside
/// `PoolStateMachine` under the pooler's lock; `Client` is the runtime's connection type.
public struct ClientRegistry<Client: AnyObject> {
    public struct CancelKey: Hashable, Sendable {
        public var processID: Int32
        public var secretKey: Int32

        public init(processID: Int32, secretKey: Int32) {
            self.processID = processID
            self.secretKey = secretKey
        }
    }

    /// What a client is counted under once admitted; the admin console's sessions are not
    /// counted per database and user.
    public struct Counted: Hashable, Sendable {
        public var database: String
        public var user: String
    }

    /// The limits one client is admitted under, read from the configuration at its startup:
    /// max_client_conn, and a few more (`ClientSession.consoleReserve`) for an admin user (or the
    /// pooler's own `pgbouncer` user) asking for the console. Who they are is proved at
    /// authentication; until then a slot of the reserve is all they take.
    public struct Admission: Sendable {
        public var maxClientConn: Int
        public var maxPerAddress: Int
        public var perSecond: Int
        public var counted: Counted?
        public var maxPerDatabase = 0
        public var maxPerUser = 0

        public init(database: String, user: String, config: Config) {
            let global = config.global
            maxPerAddress = global.maxClientConnPerIP
            perSecond = global.clientConnectRatePerIP
            if ClientSession.isAdminConsole(database, config: config) {
                let admin = user == "pgbouncer" || global.adminUsers.contains(user)
                maxClientConn = global.maxClientConn + (admin ? ClientSession.consoleReserve : 0)
                counted = nil
            } else {
                maxClientConn = global.maxClientConn
                counted = Counted(database: database, user: user)
                maxPerDatabase = config.maxDBClientConnections(database: database)
                maxPerUser = config.maxUserClientConnections(user: user)
            }
        }
    }

    public private(set) var clients: [ClientID: Client] = [:]
    public private(set) var count = 0
    var nextID: UInt64 = 1
    /// Admitted clients per database and per login user (the console's not counted), for
    /// max_db_client_connections, max_user_client_connections and SHOW DATABASES / USERS.
    public private(set) var databaseClients: [String: Int] = [:]
    public private(set) var userClients: [String: Int] = [:]
    /// Logged-in clients per pool, for SHOW POOLS.
    public private(set) var poolClients: [PoolKey: Int] = [:]
    /// Clients keeping their server for session state, per pool (SHOW POOLS cl_pinned).
    public private(set) var pinnedClients: [PoolKey: Int] = [:]
    /// When the last warning that pinned clients held all of a pool's servers was given.
    var pinWarnings: [PoolKey: NIODeadline] = [:]
    /// Sessions on the admin console.
    public private(set) var consoleClients = 0
    var cancelKeys: [CancelKey: Client] = [:]
    var addresses = ClientAddressLimiter()

    public init() {}

    /// Admits a client that passed its startup packet, or refuses it (53300) when a limit is
    /// reached. `address` is nil for a Unix socket (no per-address limit).
    public mutating func admit(
        _ client: Client, address: String?, _ admission: Admission, now: NIODeadline
    ) -> Result<ClientID, PostgresError> {
        guard count < admission.maxClientConn else {
            return .failure(.fatal(SQLState.tooManyConnections, "no more connections allowed (max_client_conn)"))
        }
        if let counted = admission.counted {
            if admission.maxPerDatabase > 0, databaseClients[counted.database, default: 0] >= admission.maxPerDatabase {
                return .failure(
                    .fatal(SQLState.tooManyConnections, "client connections exceeded (max_db_client_connections)"))
            }
            if admission.maxPerUser > 0, userClients[counted.user, default: 0] >= admission.maxPerUser {
                return .failure(
                    .fatal(SQLState.tooManyConnections, "client connections exceeded (max_user_client_connections)"))
            }
        }
        if let address {
            addresses.maxPerAddress = admission.maxPerAddress
            addresses.perSecond = admission.perSecond
            if let refusal = addresses.admit(address, now: now) {
                var error = refusal.postgresError
                error.severity = "FATAL"
                return .failure(error)
            }
        }
        count += 1
        if let counted = admission.counted {
            databaseClients[counted.database, default: 0] += 1
            userClients[counted.user, default: 0] += 1
        }
        let id = ClientID(nextID)
        nextID += 1
        clients[id] = client
        return .success(id)
    }

    /// Forgets a client and what it was counted under. True when it had been admitted (the pool's
    /// queue is then told it gave up).
    public mutating func remove(_ id: ClientID?, address: String?, counted: Counted?, pool: PoolKey?) -> Bool {
        if let counted {
            databaseClients[counted.database, default: 1] -= 1
            userClients[counted.user, default: 1] -= 1
        }
        if let pool { poolClients[pool, default: 1] -= 1 }
        guard let id, clients.removeValue(forKey: id) != nil else { return false }
        count -= 1
        if let address { addresses.release(address) }
        return true
    }

    /// A cancel key no other client has: one 64-bit draw gives both halves, process IDs are
    /// positive and carry the peer's ID when [peers] is used (`Peering.processID`).
    public mutating func issueCancelKey(for client: Client, peerID: Int, random: () -> UInt64) -> CancelKey {
        while true {
            let bits = random()
            let key = CancelKey(
                processID: Peering.processID(peerID: peerID, random: UInt32(truncatingIfNeeded: bits)),
                secretKey: Int32(truncatingIfNeeded: bits >> 32))
            if key.processID != 0, cancelKeys[key] == nil {
                cancelKeys[key] = client
                return key
            }
        }
    }

    public mutating func dropCancelKey(_ key: CancelKey) { cancelKeys[key] = nil }

    /// The client a CancelRequest with `key` is for.
    public func client(cancelKey key: CancelKey) -> Client? { cancelKeys[key] }

    /// A client joined pool `key` (it left it in `remove`).
    public mutating func joined(_ key: PoolKey) { poolClients[key, default: 0] += 1 }

    public mutating func consoleEntered() { consoleClients += 1 }
    public mutating func consoleLeft() { consoleClients -= 1 }

    /// A client of pool `key` started or stopped keeping its server for session state. Returns the
    /// pinned count when pinned clients now hold all `poolSize` servers and no warning was given
    /// for the pool in the last minute.
    public mutating func pinChanged(_ key: PoolKey, pinned: Bool, poolSize: Int?, now: NIODeadline) -> Int? {
        pinnedClients[key, default: 0] += pinned ? 1 : -1
        let pinnedNow = pinnedClients[key]!
        guard pinned, let poolSize, pinnedNow >= poolSize else { return nil }
        if let last = pinWarnings[key], now - last < .seconds(60) { return nil }
        pinWarnings[key] = now
        return pinnedNow
    }

    /// The pool was freed: its counts go with it.
    public mutating func poolFreed(_ key: PoolKey) {
        poolClients[key] = nil
        pinnedClients[key] = nil
        pinWarnings[key] = nil
    }
}

extension ClientRegistry: Sendable where Client: Sendable {}
