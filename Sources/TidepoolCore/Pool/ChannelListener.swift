import NIOCore

/// One pool's listener: the server connection that LISTENs on the union of the channels its
/// clients listen on (in transaction and statement pooling), so that a notification reaches them
/// whichever server they are lent, or none. LISTEN on its first subscriber, UNLISTEN after its
/// last; reopened at once when lost; closed when no client listens any more.
///
/// A client's new channels are confirmed (`confirm`) once the connection listens on them: its
/// ReadyForQuery waits for that, so that a NOTIFY sent after the client's LISTEN returned reaches
/// it, as with PostgreSQL.
public struct ChannelListener: Sendable {
    public enum Action: Equatable, Sendable {
        /// Open the listener connection (it counts against max_db_connections and
        /// max_user_connections, not pool_size).
        case connect
        /// Run these statements on the connection (one simple Query); `commandFinished` follows.
        case send(String)
        /// These clients' channels are all listened on (or cannot be for now): their held
        /// ReadyForQuery may go.
        case confirm([ClientID])
        /// Close the connection: no client listens any more.
        case close
        /// Call `timerFired` at this time.
        case armTimer(NIODeadline)
        case warn(String)
    }

    public enum Phase: Equatable, Sendable {
        case closed
        case connecting
        case ready
        /// The last connection attempt failed; the next one is at this time.
        case retrying(at: NIODeadline)
    }

    public private(set) var phase = Phase.closed
    /// The clients listening on each channel.
    public private(set) var subscribers: [String: Set<ClientID>] = [:]
    /// Each client's channels.
    var channelsOf: [ClientID: Set<String>] = [:]
    /// The channels the connection listens on.
    public private(set) var listening: Set<String> = []
    /// Statements sent and not finished yet.
    var inFlight: (listen: [String], unlisten: [String])?
    /// Clients waiting for channels to be listened on.
    var awaiting: [ClientID: Set<String>] = [:]
    /// The connection was lost while clients listened (for the warning and the counter).
    public private(set) var reconnects = 0
    /// How long to wait after a failed connection attempt.
    public var retryDelay = TimeAmount.milliseconds(500)

    public init() {}

    // MARK: Clients

    /// `client` listens on `channels` from now on (its LISTEN committed).
    public mutating func subscribe(_ client: ClientID, channels: [String], now: NIODeadline) -> [Action] {
        var missing: Set<String> = []
        for channel in channels {
            subscribers[channel, default: []].insert(client)
            channelsOf[client, default: []].insert(channel)
            if !listening.contains(channel) { missing.insert(channel) }
        }
        var actions: [Action] = []
        if missing.isEmpty {
            actions.append(.confirm([client]))
        } else {
            awaiting[client, default: []].formUnion(missing)
        }
        sync(now: now, into: &actions)
        return actions
    }

    /// `client` stopped listening on `channels` (its UNLISTEN committed).
    public mutating func unsubscribe(_ client: ClientID, channels: [String], now: NIODeadline) -> [Action] {
        for channel in channels { remove(client, from: channel) }
        if channelsOf[client]?.isEmpty == true { channelsOf[client] = nil }
        var actions: [Action] = []
        sync(now: now, into: &actions)
        return actions
    }

    /// `client` is gone.
    public mutating func clientGone(_ client: ClientID, now: NIODeadline) -> [Action] {
        guard let channels = channelsOf.removeValue(forKey: client) else { return [] }
        for channel in channels { remove(client, from: channel) }
        awaiting[client] = nil
        var actions: [Action] = []
        sync(now: now, into: &actions)
        return actions
    }

    mutating func remove(_ client: ClientID, from channel: String) {
        channelsOf[client]?.remove(channel)
        awaiting[client]?.remove(channel)
        if awaiting[client]?.isEmpty == true { awaiting[client] = nil }
        guard var clients = subscribers[channel] else { return }
        clients.remove(client)
        subscribers[channel] = clients.isEmpty ? nil : clients
    }

    /// The clients a notification on `channel` goes to.
    public func recipients(of channel: String) -> Set<ClientID> {
        subscribers[channel] ?? []
    }

    /// Channels with the number of their clients, for SHOW LISTENS.
    public var channelCounts: [(channel: String, clients: Int)] {
        subscribers.map { ($0.key, $0.value.count) }.sorted { $0.channel < $1.channel }
    }

    // MARK: The connection

    public mutating func connected(now: NIODeadline) -> [Action] {
        guard phase == .connecting else { return [] }
        phase = .ready
        listening = []
        inFlight = nil
        var actions: [Action] = []
        sync(now: now, into: &actions)
        return actions
    }

    /// The connection could not be opened (or no connection may be opened now): tried again after
    /// `retryDelay`. Clients waiting for it go on without it rather than wait for PostgreSQL.
    public mutating func connectFailed(_ reason: String, now: NIODeadline) -> [Action] {
        guard phase == .connecting else { return [] }
        inFlight = nil
        listening = []
        var actions: [Action] = [.warn("could not open the listener connection: \(reason)")]
        releaseAwaiting(into: &actions)
        guard !subscribers.isEmpty else {
            phase = .closed
            return actions
        }
        let at = now + retryDelay
        phase = .retrying(at: at)
        actions.append(.armTimer(at))
        return actions
    }

    /// The connection closed or failed. Notifications sent until it listens again are lost, as
    /// when a PostgreSQL session drops.
    public mutating func lost(now: NIODeadline) -> [Action] {
        guard phase == .ready else {
            if phase == .connecting { return connectFailed("connection lost", now: now) }
            return []
        }
        phase = .closed
        listening = []
        inFlight = nil
        guard !subscribers.isEmpty else { return [] }
        reconnects += 1
        var actions: [Action] = [
            .warn(
                "listener connection lost: reopening it for \(subscribers.count) channel(s); notifications meanwhile are lost"
            )
        ]
        sync(now: now, into: &actions)
        return actions
    }

    /// The statements sent finished (ReadyForQuery); `error` if they failed (none of them then
    /// took effect: they ran as one implicit transaction).
    public mutating func commandFinished(error: String?, now: NIODeadline) -> [Action] {
        guard phase == .ready, let sent = inFlight else { return [] }
        inFlight = nil
        var actions: [Action] = []
        if let error {
            actions.append(.warn("LISTEN on the listener connection failed: \(error)"))
            releaseAwaiting(into: &actions)
            // Not sent again until a client's channels change: the same statements would fail.
            return actions
        }
        listening.formUnion(sent.listen)
        listening.subtract(sent.unlisten)
        var confirmed: [ClientID] = []
        for (client, channels) in awaiting where channels.isSubset(of: listening) { confirmed.append(client) }
        for client in confirmed { awaiting[client] = nil }
        if !confirmed.isEmpty { actions.append(.confirm(confirmed.sorted { $0.raw < $1.raw })) }
        sync(now: now, into: &actions)
        return actions
    }

    public mutating func timerFired(now: NIODeadline) -> [Action] {
        guard case .retrying(let at) = phase, now >= at else { return [] }
        phase = .closed
        var actions: [Action] = []
        sync(now: now, into: &actions)
        return actions
    }

    mutating func releaseAwaiting(into actions: inout [Action]) {
        guard !awaiting.isEmpty else { return }
        actions.append(.confirm(awaiting.keys.sorted { $0.raw < $1.raw }))
        awaiting.removeAll()
    }

    /// Brings the connection in line with the channels wanted.
    mutating func sync(now: NIODeadline, into actions: inout [Action]) {
        switch phase {
        case .closed:
            if !subscribers.isEmpty {
                phase = .connecting
                actions.append(.connect)
            }
        case .ready:
            guard inFlight == nil else { return }
            if subscribers.isEmpty {
                phase = .closed
                listening = []
                actions.append(.close)
                return
            }
            let listen = subscribers.keys.filter { !listening.contains($0) }.sorted()
            let unlisten = listening.filter { subscribers[$0] == nil }.sorted()
            guard !listen.isEmpty || !unlisten.isEmpty else { return }
            inFlight = (listen, unlisten)
            var sql = ""
            for channel in listen { sql += "LISTEN \(SessionStatements.quotedChannel(channel));" }
            for channel in unlisten { sql += "UNLISTEN \(SessionStatements.quotedChannel(channel));" }
            actions.append(.send(sql))
        case .connecting, .retrying:
            break
        }
    }
}
