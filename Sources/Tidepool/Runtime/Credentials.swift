import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// What the credentials need of the pooler.
protocol CredentialSources: AnyObject, Sendable {
    var config: Config { get }
    /// auth_file's users.
    var userlist: [String: PasswordSecret] { get }
    /// The server TLS context, for the auth_query connection.
    var security: Security { get }
}

/// Secrets the pooler learns while running: auth_query's answers (cached for
/// auth_query_cache_ttl; lookups against one database run a couple at a time) and what a client's
/// login taught about logging in to servers as that user (SCRAM keys recovered from its proof, its
/// cleartext password); and from them, how the pooler logs in to a server.
final class Credentials: Sendable {
    private unowned let pooler: any CredentialSources
    private let hosts: HostResolver
    private struct State {
        var authQuery = AuthQueryCache(ttl: .seconds(10))
        var serverSecrets: [String: ServerLoginStateMachine.Secret] = [:]
    }
    private let state = NIOLockedValueBox(State())
    /// auth_query lookups running and queued, per database they run against.
    private let lookups = NIOLockedValueBox(AuthLookupQueue<@Sendable () -> Void>())

    init(pooler: any CredentialSources, hosts: HostResolver) {
        self.pooler = pooler
        self.hosts = hosts
    }

    /// A client's login taught how to log in as `user` (`ClientSession.learnedServerSecret`).
    func learned(_ secret: ServerLoginStateMachine.Secret, user: String) {
        state.withLockedValue { $0.serverSecrets[user] = secret }
    }

    /// RELOAD: auth_query's answers are asked again (auth_query_cache_ttl as configured).
    func configured(_ config: Config, forgetAnswers: Bool) {
        state.withLockedValue {
            $0.authQuery.ttl = config.global.authQueryCacheTTL
            if forgetAnswers { $0.authQuery.removeAll() }
        }
    }

    /// The auth_user that looks secrets up for logins to `database` (its own auth_user first), or
    /// nil when auth_query is not in use.
    func authUser(for database: DatabaseEntry?) -> String? {
        database?.authUser ?? pooler.config.global.authUser
    }

    /// The database auth_query runs in for logins of `user` to `database`, and the cache key of
    /// the answer.
    private func authQueryTarget(user: String, database: DatabaseEntry?) -> (dbname: String, key: String) {
        let dbname = database?.authDBName ?? pooler.config.global.authDBName ?? database?.name ?? user
        return (dbname, AuthQueryCache.key(database: dbname, user: user))
    }

    /// A fresh auth_query answer under `key`, without a lookup.
    private func cachedAnswer(_ key: String) -> AuthQueryExchange.Outcome? {
        state.withLockedValue { $0.authQuery.lookup(key, now: NIODeadline.now()) }
    }

    /// How the pooler logs in to a server of `database` as `user`: the entry's password (when it is
    /// that user's), the auth file's password or md5 secret, then what a client's login taught (the
    /// keys recovered from its SCRAM proof, its cleartext password), then auth_query's md5.
    func serverSecret(user: String, database: DatabaseEntry) -> ServerLoginStateMachine.Secret {
        .forServer(
            user: user, database: database, listed: pooler.userlist[user],
            learned: { state.withLockedValue { $0.serverSecrets[user] } },
            lookedUp: { cachedAnswer(authQueryTarget(user: user, database: database).key) })
    }

    /// Looks up `user`'s secret with auth_query, from the cache when it is fresh. Completes on `loop`.
    /// Lookups against one database run a couple at a time (`AuthLookupQueue`), the rest queued; a
    /// lookup holds its slot until its connection is closed, so that PostgreSQL never has more
    /// than that many of them, counting backends still exiting.
    func lookUp(user: String, database: DatabaseEntry?, on loop: EventLoop) -> EventLoopFuture<
        AuthQueryExchange.Outcome
    > {
        guard let authUser = authUser(for: database) else { return loop.makeSucceededFuture(.notFound) }
        let (authDBName, key) = authQueryTarget(user: user, database: database)
        if let cached = cachedAnswer(key) { return loop.makeSucceededFuture(cached) }
        let promise = loop.makePromise(of: AuthQueryExchange.Outcome.self)
        let start = { @Sendable in
            let lookup = self.runLookup(
                user: user, database: database, as: authUser, in: authDBName, key: key, on: loop)
            lookup.answer.whenComplete { promise.completeWith($0) }
            lookup.closed.whenComplete { _ in
                if let next = self.lookups.withLockedValue({ $0.finished(target: authDBName) }) {
                    next.waiter()
                }
            }
        }
        if lookups.withLockedValue({ $0.request(target: authDBName, key: key, waiter: start) }) { start() }
        return promise.futureResult
    }

    /// One lookup of `user` (logging in to `database`) on a connection of its own as `authUser`
    /// to `authDBName` (its settings only, never the client's): its answer (cached under `key`),
    /// and when its connection has closed.
    private func runLookup(
        user: String, database: DatabaseEntry?, as authUser: String, in authDBName: String, key: String,
        on loop: EventLoop
    ) -> (answer: EventLoopFuture<AuthQueryExchange.Outcome>, closed: EventLoopFuture<Void>) {
        let config = pooler.config
        let none = loop.makeSucceededVoidFuture()
        if let cached = cachedAnswer(key) {
            return (loop.makeSucceededFuture(cached), none)  // found by a lookup this one queued behind
        }
        guard let target = config.database(named: authDBName) else {
            let error = PostgresError.fatal(
                SQLState.invalidCatalogName, "auth_dbname \"\(authDBName)\" is not configured")
            return (loop.makeSucceededFuture(.failed(error)), none)
        }
        let closed = loop.makePromise(of: Void.self)
        let login = ServerLoginStateMachine(
            user: authUser, database: target.dbname ?? target.name,
            secret: serverSecret(user: authUser, database: target))
        let promise = loop.makePromise(of: AuthQueryExchange.Outcome.self)
        let handler = AuthQueryConnection(
            login: login, query: database?.authQuery ?? config.global.authQuery, user: user, promise: promise)
        let address = ServerConnection.Address(target)
        let negotiator = pooler.security.serverTLSNegotiator(for: address, config.global)
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(config.global.serverConnectTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let negotiator { try channel.pipeline.syncOperations.addHandler(negotiator) }
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        hosts.connect(bootstrap, to: address, on: loop).whenComplete { result in
            switch result {
            case .success(let channel):
                // Nothing may hang a login: the lookup gets server_connect_timeout in all.
                let timer = channel.eventLoop.scheduleTask(in: config.global.serverConnectTimeout) {
                    promise.succeed(
                        .failed(
                            PostgresError.fatal(SQLState.connectionFailure, "auth_query timed out")))
                    channel.close(promise: nil)
                }
                promise.futureResult.whenComplete { _ in timer.cancel() }
                channel.closeFuture.cascade(to: closed)
            case .failure(let error):
                closed.succeed(())
                promise.succeed(
                    .failed(
                        PostgresError.fatal(SQLState.connectionFailure, "auth_query: \(error)")))
            }
        }
        let answer = promise.futureResult.map { outcome in
            self.state.withLockedValue { $0.authQuery.store(key, outcome, now: NIODeadline.now()) }
            return outcome
        }
        return (answer, closed.futureResult)
    }
}
