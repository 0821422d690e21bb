import NIOCore
import TidepoolCore

/// Carries out a client's statistics actions (`ClientSession+Statistics.swift` decides them): its
/// traffic handed in to its database's totals, the slow-query and stale-plan log lines, counters
/// for /metrics. Made for each action; holds nothing.
struct ClientStatistics {
    let client: ClientConnection
    var pooler: any ClientConnectionOwner { client.pooler }

    init(_ client: ClientConnection) { self.client = client }

    /// Adds the client's counters to its database's totals (this loop's cell for it).
    func handInTraffic() {
        let traffic = client.session.takeTraffic()
        guard !traffic.isZero else { return }
        let database = client.databaseName
        if client.trafficCell?.database != database {
            client.trafficCell = pooler.trafficCell(loop: client.loopIndex, database: database)
        }
        client.trafficCell!.add(traffic)
    }

    func slowQuery(microseconds: Int) {
        pooler.logger.warning(
            "slow query: db=\(client.databaseName) user=\(client.user) client=\(client.peer) duration=\(microseconds / 1000) ms: \(client.session.slowQueryText)"
        )
    }

    /// A server found a prepared statement's plan stale: every client parses its statements again.
    func statementsStale() {
        let epoch = client.statements.planWentStale()
        client.session.statementEpoch = epoch
        pooler.logger.info(
            "a server found a prepared statement's plan stale: statements are parsed again (epoch \(epoch))")
    }

    func settingsReplayed(_ count: Int) {
        pooler.metrics.count("tidepool_replayed_settings_total", [("database", client.databaseName)], by: count)
    }

    /// The client was closed with notifications it had not read.
    func notificationsDropped(_ dropped: Int) {
        let (database, user) = (client.databaseName, client.user)
        pooler.logger.warning(
            "client \(client.peer) db=\(database) user=\(user): closed, \(dropped) notifications left unread")
        pooler.metrics.count(
            "tidepool_notifications_dropped_total", [("database", database), ("user", user)], by: dropped)
    }
}
