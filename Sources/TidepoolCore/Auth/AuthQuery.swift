import NIOCore

/// auth_query: one lookup of a user's secret on a connection logged in as auth_user. The query is
/// sent with the extended protocol, the user name as its one text parameter ($1), so no quoting
/// is involved; the second column of the one row is the secret (md5 or SCRAM verifier).
public struct AuthQueryExchange: Sendable {
    public enum Outcome: Equatable, Sendable {
        /// The user exists; its secret, or nil when its password is NULL (no login possible).
        case found(PasswordSecret?)
        case notFound
        case failed(PostgresError)
    }

    var secret: PasswordSecret?
    var rows = 0
    var error: PostgresError?

    public init() {}

    /// Parse, Bind with the user name, Execute, Sync.
    public static func request(query: String, user: String, into out: inout ByteBuffer) {
        Wire.withMessage(MessageType.parse, into: &out) {
            $0.writeInteger(UInt8(0))
            $0.writeString(query)
            $0.writeInteger(UInt8(0))
            $0.writeInteger(Int16(0))
        }
        Wire.withMessage(MessageType.bind, into: &out) {
            $0.writeInteger(UInt16(0))  // unnamed portal and statement
            $0.writeInteger(Int16(0))  // parameters in text
            $0.writeInteger(Int16(1))
            $0.writeInteger(Int32(user.utf8.count))
            $0.writeString(user)
            $0.writeInteger(Int16(0))  // results in text
        }
        Wire.withMessage(MessageType.execute, into: &out) {
            $0.writeInteger(UInt8(0))
            $0.writeInteger(Int32(0))
        }
        Wire.withMessage(MessageType.sync, into: &out) { _ in }
    }

    /// Takes one backend message; returns the outcome at ReadyForQuery.
    public mutating func receive(type: UInt8, body: ByteBuffer) -> Outcome? {
        var body = body
        switch type {
        case MessageType.dataRow:
            rows += 1
            guard let columns = body.readInteger(as: Int16.self), columns >= 2,
                let firstLength = body.readInteger(as: Int32.self), firstLength >= -1,
                body.readSlice(length: Int(max(firstLength, 0))) != nil,
                let length = body.readInteger(as: Int32.self)
            else {
                error = PostgresError(
                    code: SQLState.protocolViolation, message: "auth_query must return two columns: name, secret")
                return nil
            }
            if length >= 0, let text = body.readString(length: Int(length)), !text.isEmpty {
                secret = PasswordSecret(parsing: text)
            } else {
                secret = nil
            }
        case MessageType.errorResponse:
            error = WireDecode.errorFields(body)
        case MessageType.readyForQuery:
            if let error { return .failed(error) }
            if rows > 1 {
                return .failed(
                    PostgresError(code: SQLState.protocolViolation, message: "auth_query returned more than one row"))
            }
            return rows == 1 ? .found(secret) : .notFound
        default:
            break
        }
        return nil
    }
}

/// Secrets found by auth_query, reused for a short while so that a burst of logins makes one
/// lookup. Not-found answers are cached too.
public struct AuthQueryCache: Sendable {
    struct Entry: Sendable {
        var outcome: AuthQueryExchange.Outcome
        var until: NIODeadline
    }

    public var ttl: TimeAmount
    var entries: [String: Entry] = [:]

    public init(ttl: TimeAmount) { self.ttl = ttl }

    public static func key(database: String, user: String) -> String { "\(database)\u{0}\(user)" }

    public func lookup(_ key: String, now: NIODeadline) -> AuthQueryExchange.Outcome? {
        guard let entry = entries[key], now < entry.until else { return nil }
        return entry.outcome
    }

    /// Failures (the query could not run) are not cached.
    public mutating func store(_ key: String, _ outcome: AuthQueryExchange.Outcome, now: NIODeadline) {
        if case .failed = outcome { return }
        entries[key] = Entry(outcome: outcome, until: now + ttl)
        if entries.count > 10_000 { entries = entries.filter { now < $0.value.until } }
    }

    public mutating func removeAll() { entries.removeAll() }
}

/// How many auth_query lookups run at once against one database (`target`): at most `limit`
/// connections as auth_user, the rest queued in order (a queued lookup whose user was found
/// meanwhile takes the cached answer). A flood of logins of unknown users then costs PostgreSQL
/// a couple of connections, not one each (PgBouncer uses one).
public struct AuthLookupQueue<Waiter>: Sendable where Waiter: Sendable {
    public var limit: Int
    var running: [String: Int] = [:]
    var queued: [String: [(key: String, waiter: Waiter)]] = [:]

    public init(limit: Int = 2) { self.limit = max(limit, 1) }

    /// A lookup of `key` against `target`: true when it may start now; otherwise `waiter` waits
    /// for `finished`.
    public mutating func request(target: String, key: String, waiter: Waiter) -> Bool {
        if running[target, default: 0] < limit {
            running[target, default: 0] += 1
            return true
        }
        queued[target, default: []].append((key, waiter))
        return false
    }

    /// A lookup against `target` ended: the next queued one (if any) starts in its place.
    public mutating func finished(target: String) -> (key: String, waiter: Waiter)? {
        if var waiting = queued[target], !waiting.isEmpty {
            let next = waiting.removeFirst()
            queued[target] = waiting.isEmpty ? nil : waiting
            return next
        }
        let left = running[target, default: 1] - 1
        running[target] = left > 0 ? left : nil
        return nil
    }

    /// Lookups running and queued against `target`.
    public func counts(target: String) -> (running: Int, queued: Int) {
        (running[target] ?? 0, queued[target]?.count ?? 0)
    }
}
