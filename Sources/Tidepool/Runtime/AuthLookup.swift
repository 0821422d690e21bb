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
    /// Closes the connection if PostgreSQL has not within a second of the Terminate.
    var closeLater: Scheduled<Void>?

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
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        // PostgreSQL closes the connection once its backend is gone (and out of its connection
        // count): the lookup's slot is given back then (`Credentials.lookUp`), within a second.
        let channel = context.channel
        closeLater = channel.eventLoop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closeLater?.cancel()  // closed already: the task need not hold the channel
        closeLater = nil
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
