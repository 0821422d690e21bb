import Foundation
import NIOCore
import TidepoolCore

/// Carries out how a client leaves (`ClientSession+Release.swift` decides what becomes of its
/// server): the closing error written within its linger cap, Terminate, and forgetting it
/// everywhere with PgBouncer's closing log line. Made for each action; holds nothing.
struct ClientExit {
    let client: ClientConnection
    var pooler: any ClientConnectionOwner { client.pooler }

    init(_ client: ClientConnection) { self.client = client }

    /// Sends `closing`'s error and closes once it is written, or when its linger cap passes.
    func closeWithError() {
        guard let closing = client.session.closing else { return }
        let error = closing.error
        client.closeReason = closing.reason
        pooler.metrics.clientError(error.code)
        if pooler.config.global.logPoolerErrors {
            pooler.logger.warning("\(client.logPrefix) pooler error: \(error.message)")
        }
        let channel = client.channel
        guard let linger = client.session.closingLinger else { return channel.close(promise: nil) }
        var out = channel.allocator.buffer(capacity: 128)
        Wire.errorResponse(error, into: &out)
        let cap = channel.eventLoop.scheduleTask(in: linger) { channel.close(promise: nil) }
        channel.writeAndFlush(out).whenComplete { _ in
            cap.cancel()
            channel.close(promise: nil)
        }
    }

    /// The client said Terminate: what it was sent is flushed (close drops unflushed writes).
    func terminate() {
        client.closeReason = "client close request"
        client.finish()
        if client.flushQueued { client.clientFlush() }
        client.channel.close(promise: nil)
    }

    /// Forgets the client everywhere, once, when the session closes.
    func forget() {
        if client.registration.pool != nil { ClientStatistics(client).handInTraffic() }
        pooler.forget(client)
        if client.id != nil, pooler.config.global.logDisconnections {
            let age = Int(Date().timeIntervalSince1970 - client.connectedAtWallClock)
            pooler.logger.info("\(client.logPrefix) \(LogWords.closing(because: client.closeReason, ageSeconds: age))")
        }
    }
}
