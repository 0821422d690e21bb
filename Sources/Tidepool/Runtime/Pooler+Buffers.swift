import NIOCore
import TidepoolCore

/// What the pooler holds in buffers, for SHOW MEM and /metrics: bytes queued toward each
/// connection and bytes read from it and not yet passed on.
struct BufferFigures: Sendable {
    struct Side: Sendable {
        var total = 0
        var largest = 0
        /// Connections holding any.
        var holding = 0

        mutating func add(_ bytes: Int) {
            guard bytes > 0 else { return }
            total += bytes
            largest = max(largest, bytes)
            holding += 1
        }

        mutating func merge(_ other: Side) {
            total += other.total
            largest = max(largest, other.largest)
            holding += other.holding
        }
    }

    var clients = Side()
    var servers = Side()
}

extension ClientConnection {
    /// Bytes queued toward the client plus bytes its session holds (on the client's loop).
    var bufferedBytes: Int { queuedBytes + session.bufferedBytes }

    var queuedBytes: Int { (try? channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0 }
}

extension ServerConnection {
    /// Bytes queued toward the server plus bytes read and not passed on (on the server's loop).
    var bufferedBytes: Int { queuedBytes + receivedBytes }

    var queuedBytes: Int { (try? channel?.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0 }
    var receivedBytes: Int { inbound.bytes?.readableBytes ?? 0 }
}

extension Pooler {
    /// Sums every connection's buffered bytes, each on its own loop.
    func bufferFigures(on loop: EventLoop) -> EventLoopFuture<BufferFigures> {
        let (clients, servers) = pools.connections()
        var byLoop = [(clients: [ClientConnection], servers: [ServerConnection])](
            repeating: ([], []), count: loops.count)
        for client in clients { byLoop[client.loopIndex].clients.append(client) }
        for server in servers { byLoop[server.loopIndex].servers.append(server) }
        let parts = byLoop.enumerated().map { index, connections in
            loops[index].submit {
                var figures = BufferFigures()
                for client in connections.clients { figures.clients.add(client.bufferedBytes) }
                for server in connections.servers { figures.servers.add(server.bufferedBytes) }
                return figures
            }
        }
        return EventLoopFuture.whenAllSucceed(parts, on: loop).map { parts in
            var total = BufferFigures()
            for part in parts {
                total.clients.merge(part.clients)
                total.servers.merge(part.servers)
            }
            return total
        }
    }
}
