import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

extension Pooler {
    /// Flushes gathered over one turn of an event loop and done at its end, servers first (their
    /// queries start the work), then clients. A turn handles every socket that became ready at
    /// once, so the answers it forwards leave in one burst: a client program that waits on many
    /// sockets (pgbench, an application server's pool) then wakes once per burst instead of once
    /// per answer, which at 1,000 clients cut pgbench's own CPU per transaction by about a third.
    /// Only the loop's own thread touches it.
    final class TurnFlusher: @unchecked Sendable {
        let loop: EventLoop
        private var clients: [ClientConnection] = []
        private var servers: [ServerConnection] = []
        private var scheduled = false

        /// Made once: scheduling it then allocates nothing. It holds the flusher strongly (an
        /// unowned capture cost a checked retain per turn): flushers live as long as the process's
        /// pooler, and `stop` breaks the cycle.
        private var runTask: (@Sendable () -> Void)?

        init(loop: EventLoop) {
            self.loop = loop
            runTask = { [self] in self.run() }
        }

        /// Lets the flusher go (the pooler stopped).
        func stop() { runTask = nil }

        /// Flushes `client` at the end of this turn (once, however often it asks).
        func add(_ client: ClientConnection) { queue(client, in: &clients) }

        /// Flushes `server` at the end of this turn (once, however often it asks).
        func add(_ server: ServerConnection) { queue(server, in: &servers) }

        private func queue<Connection: TurnFlushed>(_ connection: Connection, in list: inout [Connection]) {
            guard !connection.flushQueued else { return }
            connection.flushQueued = true
            list.append(connection)
            guard !scheduled else { return }
            scheduled = true
            // Tasks run after the turn's I/O events.
            if let runTask { loop.execute(runTask) }
        }

        private func run() {
            scheduled = false
            Self.flush(&servers)
            Self.flush(&clients)
        }

        private static func flush<Connection: TurnFlushed>(_ list: inout [Connection]) {
            var index = 0
            while index < list.count {
                list[index].flushQueued = false
                list[index].flushNow()
                index += 1
            }
            list.removeAll(keepingCapacity: true)
        }
    }
}

/// A connection whose flushes its loop's `TurnFlusher` gathers.
protocol TurnFlushed: AnyObject {
    /// Waiting in its loop's `TurnFlusher`.
    var flushQueued: Bool { get set }
    func flushNow()
}

extension ClientConnection: TurnFlushed {
    func flushNow() { clientFlush() }
}

extension ServerConnection: TurnFlushed {
    func flushNow() { context?.flush() }
}
