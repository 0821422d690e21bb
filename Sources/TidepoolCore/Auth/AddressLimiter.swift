import NIOCore

/// max_client_conn_per_ip and client_connect_rate_per_ip: how many connections one client address
/// may hold, and open per second. A plain value; the caller holds it under its lock.
public struct ClientAddressLimiter: Sendable {
    public enum Refusal: Equatable, Sendable {
        case tooManyConnections(limit: Int)
        case tooFast(perSecond: Int)

        public var postgresError: PostgresError {
            switch self {
            case .tooManyConnections(let limit):
                PostgresError(
                    code: SQLState.tooManyConnections,
                    message: "too many connections from this address (max_client_conn_per_ip = \(limit))")
            case .tooFast(let rate):
                PostgresError(
                    code: SQLState.tooManyConnections,
                    message: "connecting too fast from this address (client_connect_rate_per_ip = \(rate))")
            }
        }
    }

    public var maxPerAddress: Int
    public var perSecond: Int
    var open: [String: Int] = [:]
    /// Connections started in the current one-second window, per address.
    var window: [String: (start: NIODeadline, count: Int)] = [:]

    public init(maxPerAddress: Int = 0, perSecond: Int = 0) {
        self.maxPerAddress = maxPerAddress
        self.perSecond = perSecond
    }

    /// A new connection from `address`: counted and admitted, or refused (and not counted).
    public mutating func admit(_ address: String, now: NIODeadline) -> Refusal? {
        if perSecond > 0 {
            var entry = window[address] ?? (now, 0)
            if now - entry.start >= .seconds(1) { entry = (now, 0) }
            entry.count += 1
            window[address] = entry
            if entry.count > perSecond { return .tooFast(perSecond: perSecond) }
        }
        if maxPerAddress > 0, open[address, default: 0] >= maxPerAddress {
            return .tooManyConnections(limit: maxPerAddress)
        }
        open[address, default: 0] += 1
        return nil
    }

    /// An admitted connection from `address` closed.
    public mutating func release(_ address: String) {
        guard let count = open[address] else { return }
        open[address] = count > 1 ? count - 1 : nil
    }

    /// Forgets rate windows that ended, so addresses seen once do not accumulate.
    public mutating func prune(now: NIODeadline) {
        window = window.filter { now - $0.value.start < .seconds(1) }
    }

    public func openCount(_ address: String) -> Int { open[address, default: 0] }
}
