import DequeModule
import NIOCore

extension ClientSession {
    /// An admin console session's messages in the order they came: a command is run by the
    /// runtime (`runAdminCommand`) and the next message waits for its answer, so pipelined
    /// commands are answered in order, as PostgreSQL answers queries.
    public final class Console: Equatable, @unchecked Sendable {
        /// Read-only commands only (a stats_users user).
        let readOnly: Bool

        init(readOnly: Bool) { self.readOnly = readOnly }

        /// The same console session.
        public static func == (a: Console, b: Console) -> Bool { a === b }

        enum Step {
            case command(AdminCommand, received: Int)
            case reply(ByteBuffer, received: Int)
            case terminate
        }
        var steps = Deque<Step>()
        /// The command being run and the bytes of the message that asked for it.
        var running: (command: AdminCommand, received: Int)?
    }

    /// The command the runtime is to run (`runAdminCommand`).
    public var adminCommand: AdminCommand? {
        if case .admin(let console) = state { console.running?.command } else { nil }
    }

    /// Bytes from an admin console client.
    public mutating func adminBytes(_ buffer: inout ByteBuffer, into actions: inout Actions) throws(WireError) {
        guard case .admin(let queue) = state else { return }
        while let chunk = try scanner.next(from: &buffer, classify: { _ in .inspect }) {
            guard case .message(let type, let body, _) = chunk else { continue }
            let received = body.readableBytes + 5
            switch AdminConsoleSession.receive(type: type, body: body, readOnly: queue.readOnly) {
            case .terminate: queue.steps.append(.terminate)
            case .reply(let reply): queue.steps.append(.reply(reply, received: received))
            case .run(let command): queue.steps.append(.command(command, received: received))
            case .none: break
            }
        }
        nextAdminStep(queue, into: &actions)
    }

    /// The runtime ran `adminCommand`; `reply` is its answer (rows or error, and ReadyForQuery).
    public mutating func adminAnswered(_ reply: ByteBuffer, into actions: inout Actions) {
        guard case .admin(let queue) = state, let running = queue.running else { return }
        queue.running = nil
        writeAdmin(reply, received: running.received, into: &actions)
        nextAdminStep(queue, into: &actions)
    }

    mutating func nextAdminStep(_ queue: Console, into actions: inout Actions) {
        while queue.running == nil, let step = queue.steps.popFirst() {
            switch step {
            case .terminate:
                queue.steps.removeAll()
                actions.append(.terminate)
            case .reply(let reply, let received):
                writeAdmin(reply, received: received, into: &actions)
            case .command(let command, let received):
                queue.running = (command, received)
                actions.append(.runAdminCommand)
            }
        }
    }

    mutating func writeAdmin(_ reply: ByteBuffer, received: Int, into actions: inout Actions) {
        write(reply, into: &actions)
        actions.append(.flushClient)
        actions.append(.countConsole(received: received, sent: reply.readableBytes))
    }
}
