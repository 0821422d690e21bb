import NIOCore
import NIOPosix
import TidepoolCore

/// One auth_query lookup: a connection logged in as auth_user that runs the query for one user
/// name and closes. Answers are cached by the pooler for auth_query_cache_ttl.
final class AuthQueryConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let query: String
    let user: String
    let promise: EventLoopPromise<AuthQueryExchange.Outcome>
    var login: ServerLoginStateMachine
    var exchange: AuthQueryExchange?
    var scanner = MessageScanner(maxMessageLength: 1 << 20)
    var inbound = KeptBytes()
    var done = false

    init(
        login: ServerLoginStateMachine, query: String, user: String,
        promise: EventLoopPromise<AuthQueryExchange.Outcome>
    ) {
        self.login = login
        self.query = query
        self.user = user
        self.promise = promise
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(login.startupMessage(allocator: context.channel.allocator)), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        inbound.prepend(to: &buffer)
        while !done, let chunk = try? scanner.next(from: &buffer, classify: { _ in .inspect }) {
            guard case .message(let type, let body, _) = chunk else { continue }
            if var running = exchange {
                let outcome = running.receive(type: type, body: body)
                exchange = running
                if let outcome { finish(context, outcome) }
                continue
            }
            switch login.receive(type: type, body: body) {
            case .none: break
            case .send(let out): context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            case .fail(let error): finish(context, .failed(error))
            case .loggedIn:
                exchange = AuthQueryExchange()
                var out = context.channel.allocator.buffer(capacity: 128)
                AuthQueryExchange.request(query: query, user: user, into: &out)
                context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            }
        }
        inbound.keep(&buffer)
    }

    func finish(_ context: ChannelHandlerContext, _ outcome: AuthQueryExchange.Outcome) {
        guard !done else { return }
        done = true
        promise.succeed(outcome)
        var out = context.channel.allocator.buffer(capacity: 5)
        Wire.terminate(into: &out)
        context.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in context.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        guard !done else { return }
        done = true
        promise.succeed(
            .failed(
                PostgresError.fatal(SQLState.connectionFailure, "auth_query connection closed")))
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if !done {
            done = true
            let e = error as? PostgresError
            promise.succeed(
                .failed(
                    e
                        ?? PostgresError.fatal(SQLState.connectionFailure, "auth_query: \(error)")))
        }
        context.close(promise: nil)
    }
}

extension Pooler {
    /// The auth_user that looks secrets up for logins to `database` (its own auth_user first), or
    /// nil when auth_query is not in use.
    func authUser(for database: DatabaseEntry?) -> String? {
        database?.authUser ?? config.global.authUser
    }

    /// The database auth_query runs in for logins of `user` to `database`, and the cache key of
    /// the answer.
    func authQueryTarget(user: String, database: DatabaseEntry?) -> (dbname: String, key: String) {
        let dbname = database?.authDBName ?? config.global.authDBName ?? database?.name ?? user
        return (dbname, AuthQueryCache.key(database: dbname, user: user))
    }

    /// A fresh auth_query answer for `user`, without a lookup.
    func cachedAuthQuery(user: String, database: DatabaseEntry?) -> AuthQueryExchange.Outcome? {
        let key = authQueryTarget(user: user, database: database).key
        return credentials.withLockedValue { $0.authQuery.lookup(key, now: NIODeadline.now()) }
    }

    /// How the pooler logs in to a server of `database` as `user`: the entry's password (when it is
    /// that user's), the auth file's password or md5 secret, then what a client's login taught (the
    /// keys recovered from its SCRAM proof, its cleartext password), then auth_query's md5.
    func serverSecret(user: String, database: DatabaseEntry) -> ServerLoginStateMachine.Secret {
        .forServer(
            user: user, database: database, listed: userlist[user],
            learned: { credentials.withLockedValue { $0.serverSecrets[user] } },
            lookedUp: { cachedAuthQuery(user: user, database: database) })
    }

    /// Looks up `user`'s secret with auth_query, from the cache when it is fresh. Completes on `loop`.
    /// Lookups against one database run a couple at a time (`AuthLookupQueue`), the rest queued.
    func lookUpSecret(user: String, database: DatabaseEntry?, on loop: EventLoop) -> EventLoopFuture<
        AuthQueryExchange.Outcome
    > {
        guard authUser(for: database) != nil else { return loop.makeSucceededFuture(.notFound) }
        let (authDBName, key) = authQueryTarget(user: user, database: database)
        if let cached = credentials.withLockedValue({ $0.authQuery.lookup(key, now: NIODeadline.now()) }) {
            return loop.makeSucceededFuture(cached)
        }
        let promise = loop.makePromise(of: AuthQueryExchange.Outcome.self)
        let start = { @Sendable in
            self.runLookup(user: user, database: database, on: loop).whenComplete { result in
                promise.completeWith(result)
                if let next = self.authLookups.withLockedValue({ $0.finished(target: authDBName) }) {
                    next.waiter()
                }
            }
        }
        if authLookups.withLockedValue({ $0.request(target: authDBName, key: key, waiter: start) }) { start() }
        return promise.futureResult
    }

    /// One lookup on a connection of its own as auth_user (its settings only, never the client's).
    func runLookup(user: String, database: DatabaseEntry?, on loop: EventLoop) -> EventLoopFuture<
        AuthQueryExchange.Outcome
    > {
        let config = self.config
        guard let authUser = authUser(for: database) else { return loop.makeSucceededFuture(.notFound) }
        let (authDBName, key) = authQueryTarget(user: user, database: database)
        if let cached = credentials.withLockedValue({ $0.authQuery.lookup(key, now: NIODeadline.now()) }) {
            return loop.makeSucceededFuture(cached)  // found by a lookup this one queued behind
        }
        guard let target = config.database(named: authDBName) else {
            return loop.makeSucceededFuture(
                .failed(.fatal(SQLState.invalidCatalogName, "auth_dbname \"\(authDBName)\" is not configured")))
        }
        let login = ServerLoginStateMachine(
            user: authUser, database: target.dbname ?? target.name,
            secret: serverSecret(user: authUser, database: target))
        let promise = loop.makePromise(of: AuthQueryExchange.Outcome.self)
        let handler = AuthQueryConnection(
            login: login, query: database?.authQuery ?? config.global.authQuery, user: user, promise: promise)
        let address = ServerConnection.Address(target)
        let negotiator = serverTLSNegotiator(for: address)
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(config.global.serverConnectTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let negotiator { try channel.pipeline.syncOperations.addHandler(negotiator) }
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        connect(bootstrap, to: address, on: loop).whenComplete { result in
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
            case .failure(let error):
                promise.succeed(
                    .failed(
                        PostgresError.fatal(SQLState.connectionFailure, "auth_query: \(error)")))
            }
        }
        return promise.futureResult.map { outcome in
            self.credentials.withLockedValue { $0.authQuery.store(key, outcome, now: NIODeadline.now()) }
            return outcome
        }
    }
}
