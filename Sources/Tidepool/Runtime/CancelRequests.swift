import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// What passing cancel requests on needs of the pooler.
protocol CancelRouting: AnyObject, Sendable {
    var config: Config { get }
    var logger: Logger { get }
}

/// Passes cancel requests on: a client's own key to the backend it is using (through its session,
/// which decides), a key another pooler of the [peers] issued to that peer within the peer's
/// pool_size (PgBouncer's peering), and the session's own cancels to PostgreSQL.
final class CancelRequests: Sendable {
    private unowned let pooler: any CancelRouting
    /// Finds the client a cancel key was given to.
    private let pools: PoolDriver
    private let hosts: HostResolver
    private let group: EventLoopGroup
    /// Requests being passed on to each peer, and those waiting for a slot.
    private let peers = NIOLockedValueBox(PeerCancels<ServerConnection.CancelTarget>())

    init(pooler: any CancelRouting, pools: PoolDriver, hosts: HostResolver, group: EventLoopGroup) {
        self.pooler = pooler
        self.pools = pools
        self.hosts = hosts
        self.group = group
    }

    /// A CancelRequest a client sent: to the session of the client holding the key, to the peer
    /// that issued it, or nowhere.
    func received(processID received: Int32, secretKey: Int32) {
        let config = pooler.config
        let processID: Int32
        switch Peering.route(processID: received, ownPeerID: config.global.peerID, peers: config.peers.keys) {
        case .local(let id): processID = id
        case .forward(let peer, let id):
            return forward(processID: id, secretKey: secretKey, to: config.peers[peer]!, config: config)
        case .unknownPeer(let peer):
            pooler.logger.warning("cancel request for peer \(peer), which is not in [peers]: ignored")
            return
        }
        guard let client = pools.client(cancelKey: .init(processID: processID, secretKey: secretKey)) else {
            pooler.logger.debug("cancel request with an unknown key ignored")
            return
        }
        client.onLoop { client.deliver(.cancelRequested) }
    }

    /// Sends a CancelRequest on a new connection; completes when PostgreSQL has closed that
    /// connection (it has then acted on the request) or after server_connect_timeout.
    @discardableResult
    func send(to target: ServerConnection.CancelTarget) -> EventLoopFuture<Void> {
        var buffer = ByteBufferAllocator().buffer(capacity: 16)
        Wire.cancelRequest(processID: target.processID, secretKey: target.secretKey, into: &buffer)
        let packet = buffer
        let timeout = pooler.config.global.serverConnectTimeout
        let loop = group.next()
        let connecting = hosts.connect(
            ClientBootstrap(group: loop).connectTimeout(timeout), to: target.address, on: loop)
        return connecting.flatMap { channel in
            channel.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
            return channel.writeAndFlush(packet).flatMap { channel.closeFuture }
        }
    }

    /// Requests in flight to each peer and queued for it (SHOW PEERS).
    var peerCounts: [Int: (sending: Int, queued: Int)] {
        peers.withLockedValue { $0.peers.mapValues { ($0.sending, $0.queued.count) } }
    }

    private func forward(processID: Int32, secretKey: Int32, to peer: PeerEntry, config: Config) {
        let target = ServerConnection.CancelTarget(
            address: ServerConnection.Address(host: peer.host, port: peer.port), processID: processID,
            secretKey: secretKey)
        let limit = config.poolSize(peer: peer)
        let now = NIODeadline.now()
        if let send = peers.withLockedValue({ $0.submit(target, peer: peer.id, limit: limit, now: now) }) {
            sendToPeer(send, peer: peer.id)
        }
    }

    private func sendToPeer(_ target: ServerConnection.CancelTarget, peer: Int) {
        send(to: target).whenComplete { [self] result in
            if case .failure(let error) = result {
                pooler.logger.warning("cancel request for peer \(peer) not passed on: \(error)")
            }
            let timeout = pooler.config.global.cancelWaitTimeout
            let (next, dropped) = peers.withLockedValue { $0.finished(peer: peer, now: .now(), timeout: timeout) }
            if dropped > 0 {
                pooler.logger.warning("\(dropped) cancel request(s) for peer \(peer) dropped: cancel_wait_timeout")
            }
            if let next { sendToPeer(next, peer: peer) }
        }
    }
}
