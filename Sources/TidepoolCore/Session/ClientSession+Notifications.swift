import NIOCore

/// LISTEN in transaction and statement pooling: the client's LISTEN and UNLISTEN run on the server
/// it is lent (PostgreSQL answers them, and its transaction decides whether they count); once
/// committed, the pool's listener connection listens on the channel for every client of the pool,
/// and each NotificationResponse it reads is handed to the sessions listening on that channel.
/// The servers' own notifications are not passed on: they would come twice, or reach a client
/// that did not ask for them.
extension ClientSession {
    /// A NotificationResponse (the whole message) from the pool's listener, for `channel`. Written
    /// between whole messages of the client's stream: at once unless a reply is in the middle of
    /// a message, a ReadyForQuery waits for the listener, or the client is not reading. Returns
    /// how many notifications were dropped: those queued, when the queue overflows.
    @discardableResult
    public mutating func notification(
        _ message: ByteBuffer, channel: String, now: NIODeadline, into actions: inout Actions
    ) -> Int {
        guard isIdle || isWaiting || isLinked,
            let sessionState, sessionState.channels.contains(channel)
        else { return 0 }
        if readyHold == .held, sessionState.awaitingNotify.remove(channel) != nil {
            // The client's own notification: before the ReadyForQuery held for it.
            write(message, into: &actions)
            if sessionState.awaitingNotify.isEmpty { resumeHeldReady(now: now, into: &actions) }
            actions.append(.flushClient)
            return 0
        }
        if notificationQueue.isEmpty, mayWriteNotification {
            write(message, into: &actions)
            actions.append(.flushClient)
            return 0
        }
        notificationQueue.append(message)
        if notificationQueue.count > notifyQueueSize {
            let dropped = notificationQueue.count
            notificationQueue.removeAll()
            close(
                .fatal(
                    SQLState.programLimitExceeded,
                    "too many notifications waiting for this client (notify_queue_size = \(notifyQueueSize))"),
                reason: "notification queue overflow", into: &actions)
            closing?.waitsForReader = true
            return dropped
        }
        writeQueuedNotifications(into: &actions)
        return 0
    }

    /// Whether a notification written now would come between whole messages the client can take.
    var mayWriteNotification: Bool {
        flow.clientWritable && readyHold == .none && atServerMessageBoundary
    }

    /// Writes the queued notifications if they may go now.
    mutating func writeQueuedNotifications(into actions: inout Actions) {
        guard !notificationQueue.isEmpty, mayWriteNotification else { return }
        for message in notificationQueue { write(message, into: &actions) }
        notificationQueue.removeAll()
        actions.append(.flushClient)
    }

    /// Settles a ReadyForQuery's channel changes: the connection tells the pool's listener, and a
    /// new channel holds the ReadyForQuery (when `mayHold`) until the listener listens on it.
    mutating func channelsSettled(_ sessionState: SessionState, mayHold: Bool, into actions: inout Actions) {
        let changes = sessionState.takeChannelChanges()
        listenChanges.added += changes.added
        listenChanges.removed += changes.removed
        actions.append(.listenChanged)
        if mayHold, !changes.added.isEmpty { readyHold = .held }
    }

    /// The pool's listener listens on every channel the client was subscribed to: the held
    /// ReadyForQuery, and what the server sent after it, go on.
    public mutating func listenConfirmed(now: NIODeadline, into actions: inout Actions) {
        guard readyHold == .held, sessionState?.awaitingNotify.isEmpty ?? true else { return }
        resumeHeldReady(now: now, into: &actions)
    }

    /// The held ReadyForQuery, and what the server sent after it, go on.
    mutating func resumeHeldReady(now: NIODeadline, into actions: inout Actions) {
        waitingOwnNotification = false
        sessionState?.awaitingNotify.removeAll()
        guard readyHold == .held else { return }
        guard isLinked else {
            readyHold = .none
            return
        }
        readyHold = .resuming
        serverBytes(ByteBuffer(), now: now, into: &actions)
        writeQueuedNotifications(into: &actions)
    }

    /// Whether the sweeper must tick this client for a notification it waits for (a stored flag:
    /// the sweeper asks every client ten times a second).
    public var waitsForOwnNotification: Bool { waitingOwnNotification }

    /// The sweeper's tick while the client waits for its own notification: the wait is bounded
    /// (the pool's listener may have lost it, as when its connection drops).
    public mutating func ownNotificationTick(now: NIODeadline, into actions: inout Actions) {
        guard let sessionState, !sessionState.awaitingNotify.isEmpty else {
            waitingOwnNotification = false
            return
        }
        guard let since = sessionState.notifyWaitSince else {
            sessionState.notifyWaitSince = now
            return
        }
        if now - since >= SessionState.notifyWait { resumeHeldReady(now: now, into: &actions) }
    }
}
