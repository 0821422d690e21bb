import NIOCore
import Testing

@testable import TidepoolCore

/// Plays the connection and the pool around one `ClientSession`: feeds it client and server bytes
/// with a test clock, carries out its actions the way the runtime does (sends, writes, releases,
/// requests), and records what happened.
final class SessionDriver {
    var session: ClientSession
    var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
    let server: ServerSessionState
    var actions = ClientSession.Actions()
    /// Bytes that reached the server, and the client, in order.
    var toServer = ByteBuffer()
    var toClient = ByteBuffer()
    var requests = 0
    var releases: [Bool] = []
    var resets: [String] = []
    var cancels: [Bool] = []
    var closedWith: PostgresError?
    var terminated = false
    var forgotten = 0
    var leftQueue = 0
    var timings: [LatencySet.Kind] = []
    /// The login actions, in order.
    var login: [ClientSession.LoginStep] = []
    /// The flow-control actions, in order.
    var flow: [ClientSession.Action] = []
    var staleReports = 0
    var clockWatched = 0
    var clockUnwatched = 0
    var pinChanges: [Bool] = []
    var replayed = 0
    var traffic = TrafficStats()
    var listenChanges: [ChannelChanges] = []
    var adminCommands: [AdminCommand] = []
    var consoleTraffic: [(Int, Int)] = []

    init(
        mode: PoolMode = .transaction, prepared: Bool = false, timeouts: ClientTimeoutSettings? = nil,
        loggedIn: Bool = true, server: ServerSessionState = ServerSessionState(maxPreparedStatements: 10)
    ) {
        self.server = server
        session = ClientSession(maxMessageLength: 1 << 20)
        session.poolMode = mode
        session.tracksSessionState = mode != .session
        if prepared { session.prepared = PreparedStatementTracker() }
        if let timeouts { session.timeoutClock = ClientSession.TimeoutClock(settings: timeouts, now: now) }
        session.serverResetQuery = "DISCARD ALL"
        session.reportsTimings = true
        guard loggedIn else { return }
        session.loggedIn(now: now, into: &actions)
        carryOut()
    }

    func advance(_ amount: TimeAmount) { now = now + amount }

    /// The actions of the last event carried out, in order (flow control included).
    var lastActions: [ClientSession.Action] = []

    func carryOut() {
        lastActions = Array(actions)
        var writes = session.toClient.makeIterator()
        for action in actions {
            switch action {
            case .sendToServer:
                for var b in session.toServer { toServer.writeBuffer(&b) }
                session.toServer.removeAll()
            case .writeToClient:
                var b = writes.next()!
                toClient.writeBuffer(&b)
            case .writeServerBytes(let start, let length):
                var b = session.serverBuffer!.getSlice(at: start, length: length)!
                toClient.writeBuffer(&b)
            case .flushClient, .statementsAccepted, .logSlowQuery: break
            case .watchClock: clockWatched += 1
            case .unwatchClock: clockUnwatched += 1
            case .statementsStale: staleReports += 1
            case .pinChanged(let pinned): pinChanges.append(pinned)
            case .settingsReplayed(let count): replayed += count
            case .requestServer: requests += 1
            case .leaveQueue: leftQueue += 1
            case .releaseServer(let reusable):
                traffic = traffic + session.takeTraffic()
                releases.append(reusable)
            case .resetAndReleaseServer(let reset):
                switch reset {
                case .resetQuery: resets.append(session.serverResetQuery)
                case .discardAll: resets.append("DISCARD ALL")
                case .unlisten: resets.append("UNLISTEN *")
                }
            case .listenChanged:
                listenChanges.append(session.listenChanges)
                session.listenChanges = ChannelChanges()
            case .cancelServerQuery(let reportBack): cancels.append(reportBack)
            case .handInTraffic: traffic = traffic + session.takeTraffic()
            case .recordTiming(let kind, _): timings.append(kind)
            case .closeWithError: closedWith = session.closing?.error
            case .terminate: terminated = true
            case .forget: forgotten += 1
            case .runAdminCommand: adminCommands.append(session.adminCommand!)
            case .countConsole(let received, let sent): consoleTraffic.append((received, sent))
            case .login(let step): login.append(step)
            case .pauseClientReads, .resumeClientReads, .pauseServerReads, .resumeServerReads:
                flow.append(action)
            }
        }
        // As the connection does once it has carried out an event's actions.
        let done = actions.count
        session.settleReads(into: &actions)
        flow += actions[done...]
        actions.removeAll()
        #expect(writes.next() == nil, "a write without its action")
        session.actionsCarriedOut()
        session.accepted.removeAll()
    }

    func client(_ messages: ByteBuffer...) {
        var buffer = ByteBuffer()
        for var m in messages { buffer.writeBuffer(&m) }
        clientRaw(buffer)
    }

    func clientRaw(_ bytes: ByteBuffer) {
        var buffer = bytes
        session.beginRead(&buffer, statementEpoch: session.statementEpoch)
        do {
            try session.clientBytes(&buffer, now: now, isKnownStatement: { _ in false }, into: &actions)
        } catch {
            session.close(error.postgresError, reason: "bad packet", into: &actions)
        }
        session.endRead(&buffer, now: now, into: &actions)
        carryOut()
    }

    /// Lends the client `server`, or another server (`other`).
    func lend(_ other: ServerSessionState? = nil) {
        #expect(
            session.lent(
                other ?? server, now: now, isKnownStatement: { _ in false }, into: &actions) == .linked)
        carryOut()
    }

    func serverSends(_ messages: ByteBuffer...) {
        var buffer = ByteBuffer()
        for var m in messages { buffer.writeBuffer(&m) }
        session.serverBytes(buffer, now: now, into: &actions)
        carryOut()
    }

    /// The message types that reached the client, as letters.
    var clientTypes: String { Self.types(toClient) }
    var serverTypes: String { Self.types(toServer) }

    static func types(_ buffer: ByteBuffer) -> String {
        var b = buffer
        var s = ""
        while let type = b.readInteger(as: UInt8.self), let length = b.readInteger(as: Int32.self) {
            s.append(Character(UnicodeScalar(type)))
            b.moveReaderIndex(forwardBy: Int(length) - 4)
        }
        return s
    }

    // Messages.
    static func query(_ sql: String) -> ByteBuffer { PreparedHarness.query(sql) }
    static func m(_ type: Character, _ build: (inout ByteBuffer) -> Void = { _ in }) -> ByteBuffer {
        PreparedHarness.message(UInt8(ascii: type.unicodeScalars.first!), build)
    }
    static func ready(_ status: Character) -> ByteBuffer {
        m("Z") { $0.writeInteger(UInt8(ascii: status.unicodeScalars.first!)) }
    }
    static func complete(_ tag: String) -> ByteBuffer { m("C") { $0.writeNullTerminatedString(tag) } }
    static func parameter(_ name: String, _ value: String) -> ByteBuffer {
        m("S") {
            $0.writeNullTerminatedString(name)
            $0.writeNullTerminatedString(value)
        }
    }
    static var sync: ByteBuffer { m("S") }
    /// CopyInResponse / CopyOutResponse of a text COPY with no columns.
    static var copyInResponse: ByteBuffer { copyResponse("G") }
    static var copyOutResponse: ByteBuffer { copyResponse("H") }
    static func copyResponse(_ type: Character) -> ByteBuffer {
        m(type) {
            $0.writeInteger(UInt8(0))
            $0.writeInteger(Int16(0))
        }
    }
    static var terminate: ByteBuffer { m("X") }
}

@Suite struct ClientSessionTests {
    typealias D = SessionDriver

    /// A simple query on a transaction-mode client: a server is requested, the query goes to it once
    /// linked, and the server goes back with ReadyForQuery 'I' after the reply is written.
    @Test func serverGoesBackAtReadyForQueryIdle() {
        let d = D()
        d.client(D.query("select 1"))
        #expect(d.requests == 1)
        #expect(d.session.state == .waiting(since: d.now) && d.session.server == nil)
        #expect(d.serverTypes == "")
        d.lend()
        #expect(d.session.state == .linked(d.server) && d.session.waitStart == nil)
        #expect(d.serverTypes == "Q")
        d.serverSends(D.complete("SELECT 1"))
        #expect(d.releases.isEmpty)
        d.serverSends(D.ready("I"))
        #expect(d.clientTypes == "CZ")
        #expect(d.releases == [true])
        #expect(d.session.state == .idle)
        #expect(d.session.server == nil)
        #expect(d.traffic.transactions == 1 && d.traffic.queries == 1 && d.traffic.serverAssignments == 1)
    }

    /// server_fast_close: a session-mode client between transactions is closed at once (its server
    /// closed, not reused); one inside a transaction gets its COMMIT's answer, then is closed.
    /// The ordering rules as exact action sequences: the answer is written before its server goes
    /// back; a client closed while linked is sent its error before its server is given back, and
    /// forgotten last.
    @Test func theAnswerIsWrittenBeforeTheServerGoesBackAndTheErrorBeforeTheRelease() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        let order = d.lastActions.filter {
            if case .recordTiming = $0 { return false }
            return true
        }
        #expect(order == [.writeServerBytes(start: 0, length: 20), .releaseServer(reusable: true)])
        d.client(D.query("begin"))
        d.lend()
        d.serverSends(D.complete("BEGIN"), D.ready("T"))
        d.session.close(.fatal(SQLState.adminShutdown, "bye"), reason: "test", into: &d.actions)
        d.carryOut()
        #expect(d.lastActions == [.closeWithError, .releaseServer(reusable: false), .forget])
    }

    @Test func fastCloseEndsTheSessionAtTheTransactionsEnd() {
        /// A session-mode client that ran `sql` and was told its server is to be replaced.
        func replaced(after sql: String, tag: String, status: Character) -> D {
            let d = D(mode: .session)
            d.client(D.query(sql))
            d.lend()
            d.serverSends(D.complete(tag), D.ready(status))
            d.session.endAtTransactionEnd(now: d.now, into: &d.actions)
            d.carryOut()
            return d
        }
        let idle = replaced(after: "select 1", tag: "SELECT 1", status: "I")
        #expect(idle.releases == [false])
        #expect(idle.closedWith?.code == SQLState.adminShutdown)

        let busy = replaced(after: "begin", tag: "BEGIN", status: "T")
        #expect(busy.closedWith == nil && busy.releases.isEmpty)
        busy.client(D.query("commit"))
        busy.serverSends(D.complete("COMMIT"), D.ready("I"))
        #expect(busy.clientTypes == "CZCZ")  // the COMMIT's answer is written before the close
        #expect(busy.releases == [false])
        #expect(busy.closedWith?.message.contains("server_fast_close") == true)
    }

    /// max_prepared_statements changed at run time reaches a server when it is next lent.
    @Test func aLendAppliesTheCurrentStatementCapacity() {
        let d = D()
        d.client(D.query("select 1"))
        let before = d.server.statements.capacity
        #expect(
            d.session.lent(
                d.server, now: d.now, statementCapacity: before + 5, isKnownStatement: { _ in false },
                into: &d.actions) == .linked)
        #expect(d.server.statements.capacity == before + 5)
    }

    /// SHOW CLIENTS' state names follow the session: idle, waiting, active, idle again.
    @Test func stateNamesAreShowClientsOnes() {
        let d = D()
        #expect(d.session.stateName == "idle")
        d.client(D.query("select 1"))
        #expect(d.session.stateName == "waiting")
        d.lend()
        #expect(d.session.stateName == "active")
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.session.stateName == "idle")
        #expect(ClientSession(maxMessageLength: 100).stateName == "login")
    }

    /// ReadyForQuery 'T' keeps the server (a transaction is open); 'I' later gives it back.
    @Test func serverStaysForAnOpenTransaction() {
        let d = D()
        d.client(D.query("begin"))
        d.lend()
        d.serverSends(D.complete("BEGIN"), D.ready("T"))
        #expect(d.releases.isEmpty)
        #expect(d.session.isLinked)
        d.client(D.query("commit"))
        #expect(d.requests == 1)
        #expect(d.serverTypes == "QQ")
        d.serverSends(D.complete("COMMIT"), D.ready("I"))
        #expect(d.releases == [true])
    }

    /// A failed transaction ('E') holds the server until the client rolls back.
    @Test func failedTransactionKeepsTheServer() {
        let d = D()
        d.client(D.query("begin; select 1/0"))
        d.lend()
        d.serverSends(D.m("E"), D.ready("E"))
        #expect(d.releases.isEmpty)
        d.client(D.query("rollback"))
        d.serverSends(D.complete("ROLLBACK"), D.ready("I"))
        #expect(d.releases == [true])
    }

    /// Pipelined extended-protocol requests: the server goes back only at the last Sync's answer.
    @Test func pipelinedSyncsGiveBackAtTheLastReady() {
        let d = D()
        d.client(
            PreparedHarness.parse("", "select 1"), PreparedHarness.bind(""), D.m("E") { $0.writeInteger(UInt32(0)) },
            D.sync, PreparedHarness.bind(""), D.m("E") { $0.writeInteger(UInt32(0)) }, D.sync)
        d.lend()
        #expect(d.serverTypes == "PBESBES")
        d.serverSends(D.m("1"), D.m("2"), D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases.isEmpty, "one Sync is still unanswered")
        d.serverSends(D.m("2"), D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases == [true])
    }

    /// An unsynced Parse/Bind/Execute keeps the server even after a ReadyForQuery 'I'.
    @Test func unsyncedMessagesKeepTheServer() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        d.client(PreparedHarness.parse("", "select 2"))
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases.isEmpty)
        d.client(D.sync)
        d.serverSends(D.m("1"), D.ready("I"))
        #expect(d.releases == [true])
    }

    /// COPY FROM STDIN: CopyData and CopyDone go through without counting as requests; the server
    /// goes back after the COPY's ReadyForQuery.
    @Test func copyInGoesThroughAndEndsAtReady() {
        let d = D()
        d.client(D.query("copy t from stdin"))
        d.lend()
        d.serverSends(
            D.copyInResponse)
        d.client(D.m("d") { $0.writeString("1\n") }, D.m("d") { $0.writeString("2\n") }, D.m("c"))
        #expect(d.serverTypes == "Qddc")
        #expect(d.releases.isEmpty)
        d.serverSends(D.complete("COPY 2"), D.ready("I"))
        #expect(d.releases == [true])
    }

    /// COPY TO STDOUT: the server's CopyData reaches the client unchanged, as one run.
    @Test func copyOutReachesTheClient() {
        let d = D()
        d.client(D.query("copy t to stdout"))
        d.lend()
        d.serverSends(
            D.copyOutResponse, D.m("d") { $0.writeString("1\n") },
            D.m("c"), D.complete("COPY 1"), D.ready("I"))
        #expect(d.clientTypes == "HdcCZ")
        #expect(d.releases == [true])
    }

    /// Statement mode refuses a transaction block: the ReadyForQuery 'T' becomes a FATAL, and the
    /// server (inside a transaction) is closed, not reused.
    @Test func statementModeRefusesTransactions() {
        let d = D(mode: .statement)
        d.client(D.query("begin"))
        d.lend()
        d.serverSends(D.complete("BEGIN"), D.ready("T"))
        #expect(d.closedWith?.code == SQLState.featureNotSupported)
        #expect(d.closedWith?.severity == "FATAL")
        #expect(d.clientTypes == "C", "the ReadyForQuery is replaced by the error")
        #expect(d.releases == [false])
        #expect(d.session.state == .closed)
        #expect(d.forgotten == 1)
    }

    /// Session mode keeps the server across transactions and resets it when the client leaves.
    @Test func sessionModeKeepsTheServerAndResetsIt() {
        let d = D(mode: .session)
        d.client(D.query("select 1"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases.isEmpty)
        #expect(d.session.isLinked)
        d.client(D.terminate)
        #expect(d.terminated)
        d.session.finish(serverResetQuery: "DISCARD ALL", resetAlways: false, into: &d.actions)
        d.carryOut()
        #expect(d.resets == ["DISCARD ALL"])
        #expect(d.releases.isEmpty)
    }

    /// The pooler's own SETs (tracked parameters) go first on a lend, their replies are swallowed,
    /// and the client's query follows once they are done.
    @Test func parameterSyncRepliesAreSwallowed() {
        let d = D()
        d.session.wanted = ["application_name": "app'1"]
        d.server.parameters = ["application_name": "other"]
        d.client(D.query("select 1"))
        d.lend()
        #expect(d.serverTypes == "Q", "only the SET so far")
        var sent = d.toServer
        sent.moveReaderIndex(forwardBy: 5)
        #expect(sent.readNullTerminatedString() == "SELECT pg_catalog.set_config('application_name', 'app''1', false);")
        #expect(!d.session.mayGiveBack)
        d.serverSends(D.parameter("application_name", "app'1"), D.complete("SET"), D.ready("I"))
        #expect(d.clientTypes == "", "the client sees nothing of the SET")
        #expect(d.releases.isEmpty)
        #expect(d.serverTypes == "QQ", "the client's query went after the SET's ReadyForQuery")
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.clientTypes == "CZ")
        #expect(d.releases == [true])
        #expect(d.server.parameters["application_name"] == "app'1")
    }

    /// A ParameterStatus the server sends for the client's own SET reaches the client and becomes
    /// what the client wants from then on.
    @Test func clientSetBecomesWanted() {
        let d = D()
        d.client(D.query("set application_name = 'x'"))
        d.lend()
        d.serverSends(D.parameter("application_name", "x"), D.complete("SET"), D.ready("I"))
        #expect(d.clientTypes == "SCZ")
        #expect(d.session.wanted["application_name"] == "x")
    }

    /// A cancel for a queued client answers each of its requests with the cancel error and one
    /// ReadyForQuery, and takes it out of the queue.
    @Test func cancelWhileQueuedAnswersEachRequest() {
        let d = D()
        d.client(D.query("select 1"), D.query("select 2"))
        #expect(d.session.isWaiting)
        d.session.cancelRequested(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.leftQueue == 1)
        #expect(d.clientTypes == "EZZ")
        #expect(d.session.state == .idle)
        #expect(d.closedWith == nil)
    }

    /// The same with prepared statements tracked: the requests are counted in the kept bytes.
    @Test func cancelWhileQueuedCountsKeptRequests() {
        let d = D(prepared: true)
        d.client(PreparedHarness.parse("s1", "select 1"), D.sync, PreparedHarness.bind("s1"), D.sync, D.sync)
        #expect(d.session.isWaiting)
        d.session.cancelRequested(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "EZZZ")
        #expect(d.session.inbound.isEmpty)
    }

    /// A cancel in the middle of a message cannot be answered cleanly: the client is closed.
    @Test func cancelMidMessageCloses() {
        let d = D()
        let q = D.query("select 1")
        d.client(q)
        d.clientRaw(q.getSlice(at: 0, length: 8)!)
        d.session.cancelRequested(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.code == SQLState.queryCanceled)
        #expect(d.releases.isEmpty, "no server was held")
    }

    /// A cancel for a client using a server keeps the server until the cancel has reached
    /// PostgreSQL, even if the query finished first.
    @Test func cancelInFlightHoldsTheServer() {
        let d = D()
        d.client(D.query("select pg_sleep(10)"))
        d.lend()
        d.session.cancelRequested(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.cancels == [true])
        d.serverSends(D.m("E"), D.ready("I"))
        #expect(d.releases.isEmpty, "the cancel is still on its way")
        d.session.cancelFinished(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.releases == [true])
    }

    /// Prepared statements: a Parse is answered and replayed on whichever server is lent next.
    @Test func preparedStatementsAreReplayedAfterALend() {
        let d = D(prepared: true)
        d.client(PreparedHarness.parse("s1", "select 1"), D.sync)
        d.lend()
        #expect(d.serverTypes == "PS")
        d.serverSends(D.m("1"), D.ready("I"))
        #expect(d.clientTypes == "1Z")
        #expect(d.releases == [true])
        // The next lend is of a server that has never seen the statement.
        let fresh = ServerSessionState(maxPreparedStatements: 10)
        d.toServer.clear()
        d.client(PreparedHarness.bind("s1"), D.m("E") { $0.writeInteger(UInt32(0)) }, D.sync)
        #expect(
            d.session.lent(
                fresh, now: d.now, isKnownStatement: { _ in false }, into: &d.actions) == .linked
        )
        d.carryOut()
        #expect(d.serverTypes == "PBES", "the statement is parsed on the new server first")
        d.serverSends(D.m("1"), D.m("2"), D.complete("SELECT 1"), D.ready("I"))
        #expect(d.clientTypes == "1Z2CZ", "the replayed Parse's answer is swallowed")
        #expect(d.releases == [true, true])
    }

    /// A second Parse of a name the client has fails with PostgreSQL's error, naming the client's
    /// statement, not the pooler-wide one the server knows.
    @Test func duplicatePrepareNamesTheClientsStatement() {
        let d = D(prepared: true)
        d.client(PreparedHarness.parse("s1", "select 1"), D.sync)
        d.lend()
        d.serverSends(D.m("1"), D.ready("I"))
        d.toClient.clear()
        d.client(PreparedHarness.parse("s1", "select 1"), D.sync)
        d.lend()
        let serverName = PreparedHarness.serverName(of: "select 1")
        var error = ByteBuffer()
        Wire.errorResponse(
            PostgresError(
                code: SQLState.duplicatePreparedStatement,
                message: "prepared statement \"\(serverName)\" already exists"),
            into: &error)
        d.serverSends(error, D.ready("I"))
        #expect(d.clientTypes == "EZ")
        var reply = d.toClient
        reply.moveReaderIndex(forwardBy: 5)
        let fields = WireDecode.errorFields(reply)
        #expect(fields.message == "prepared statement \"s1\" already exists")
        #expect(fields.code == SQLState.duplicatePreparedStatement)
        #expect(d.releases == [true, true])
    }

    /// A client that vanishes inside a transaction leaves a server that must not be reused.
    @Test func clientVanishingInATransactionClosesTheServer() {
        let d = D()
        d.client(D.query("begin"))
        d.lend()
        d.serverSends(D.complete("BEGIN"), D.ready("T"))
        d.session.finish(serverResetQuery: "DISCARD ALL", resetAlways: true, into: &d.actions)
        d.carryOut()
        #expect(d.releases == [false])
        #expect(d.resets.isEmpty)
        #expect(d.forgotten == 1)
        d.session.finish(serverResetQuery: "DISCARD ALL", resetAlways: true, into: &d.actions)
        d.carryOut()
        #expect(d.forgotten == 1, "finish is idempotent")
    }

    /// A client gone while part of a server message is still on its way: the rest of it would
    /// reach the next client as the start of a reply, so the server is closed, in either mode.
    @Test(arguments: [PoolMode.transaction, .session])
    func aServerInTheMiddleOfAMessageIsNotReused(mode: PoolMode) {
        let d = D(mode: mode)
        d.client(D.query("select 1"))
        d.lend()
        let notice = D.m("N") { $0.writeString("SNOTICE\0\0") }
        d.serverSends(D.complete("SELECT 1"), D.ready("I"), notice.getSlice(at: 0, length: 3)!)
        #expect(d.releases.isEmpty && d.session.isLinked)
        d.session.finish(serverResetQuery: "DISCARD ALL", resetAlways: false, into: &d.actions)
        d.carryOut()
        #expect(d.releases == [false] && d.resets.isEmpty)
    }

    /// A message forwarded in pieces (its header read, its end still to come) after the last
    /// ReadyForQuery keeps the server: given back then, the rest would reach the next client as
    /// the start of a reply. Once the rest has come the server goes back, with no ReadyForQuery to
    /// prompt it.
    @Test func aServerGoesBackOnlyBetweenMessages() {
        let d = D()
        d.client(D.query("select pg_sleep(1)"))
        d.lend()
        d.session.cancelRequested(now: d.now, into: &d.actions)  // held until the cancel arrives
        d.carryOut()
        let notice = D.m("N") { $0.writeString("SNOTICE\0C00000\0Mlate\0\0") }
        d.serverSends(D.complete("SELECT 1"), D.ready("I"), notice.getSlice(at: 0, length: 9)!)
        d.session.cancelFinished(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.releases.isEmpty && d.session.isLinked, "not in the middle of the notice")
        d.serverSends(notice.getSlice(at: 9, length: notice.readableBytes - 9)!)
        #expect(d.releases == [true] && d.session.isIdle)
        #expect(d.clientTypes == "CZN")
    }

    /// The other way too: a client message sent in part (a CopyData outside COPY counts as no
    /// request) keeps its server, which would take the next client's bytes as the rest of it;
    /// a client gone meanwhile has its server closed, not reset and reused.
    @Test(arguments: [PoolMode.transaction, .session])
    func aServerHalfwayThroughAClientMessageIsNotGivenBack(mode: PoolMode) {
        let d = D(mode: mode)
        d.client(D.query("select 1"))
        d.lend()
        d.session.cancelRequested(now: d.now, into: &d.actions)  // held until the cancel arrives
        d.carryOut()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        let copyData = D.m("d") { $0.writeString(String(repeating: "x", count: 100)) }
        let sent = d.toServer.readableBytes
        d.client(copyData.getSlice(at: 0, length: 10)!)
        #expect(d.toServer.readableBytes == sent + 10, "the part went to the server")
        d.session.cancelFinished(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.releases.isEmpty && d.session.isLinked)
        d.session.finish(serverResetQuery: "DISCARD ALL", resetAlways: true, into: &d.actions)
        d.carryOut()
        #expect(d.releases == [false] && d.resets.isEmpty)
    }

    /// A client that has begun its next message when its answer ends keeps the server (it would
    /// ask for one again as soon as the message is whole), and it goes back after that request.
    @Test func aClientInTheMiddleOfItsNextMessageKeepsTheServer() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        let next = D.query("select 2")
        d.client(next.getSlice(at: 0, length: 3)!)
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases.isEmpty && d.session.isLinked)
        d.client(next.getSlice(at: 3, length: next.readableBytes - 3)!)
        #expect(d.requests == 1 && d.serverTypes == "QQ")
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases == [true] && d.clientTypes == "CZCZ")
    }

    /// The same inside COPY IN: the server waits for CopyDone, so it is closed.
    @Test func clientVanishingInsideCopyClosesTheServer() {
        let d = D()
        d.client(D.query("copy t from stdin"))
        d.lend()
        d.serverSends(
            D.copyInResponse)
        d.client(D.m("d") { $0.writeString("1\n") })
        d.session.finish(serverResetQuery: "", resetAlways: false, into: &d.actions)
        d.carryOut()
        #expect(d.releases == [false])
    }

    /// A server that closes under a client ends the client with an error; nothing is released.
    @Test func serverLostClosesTheClient() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        d.session.serverLost(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.code == SQLState.protocolViolation)
        #expect(d.closedWith?.message == "server conn crashed?")
        #expect(d.releases.isEmpty)
        #expect(d.session.server == nil)
    }

    /// A malformed server message closes the client and the server.
    @Test func badServerBytesCloseBoth() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        var bad = ByteBuffer()
        bad.writeInteger(UInt8(ascii: "C"))
        bad.writeInteger(Int32(2))
        d.serverSends(bad)
        #expect(d.closedWith?.code == SQLState.protocolViolation)
        #expect(d.releases == [false])
    }

    /// Terminate from an idle client: the session says so, and holds nothing.
    @Test func terminateFromIdle() {
        let d = D()
        d.client(D.terminate)
        #expect(d.terminated)
        #expect(d.requests == 0)
    }

    /// query_timeout: the running query is cancelled and the client closed; the server, mid-query,
    /// is closed too.
    @Test(arguments: [false, true]) func queryTimeoutCancelsAndCloses(prepared: Bool) {
        var settings = ClientTimeoutSettings()
        settings.queryTimeout = .seconds(2)
        let d = D(prepared: prepared, timeouts: settings)
        d.client(D.query("select pg_sleep(10)"))
        d.lend()
        d.advance(.seconds(1))
        d.session.tick(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.closedWith == nil)
        d.advance(.seconds(1))
        d.session.tick(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.cancels == [false])
        #expect(d.closedWith?.code == SQLState.queryCanceled)
        #expect(d.releases == [false])
    }

    /// client_idle_timeout counts from the last byte the client sent while it held no server.
    @Test func clientIdleTimeoutCountsFromTheLastRequest() {
        var settings = ClientTimeoutSettings()
        settings.clientIdleTimeout = .seconds(5)
        let d = D(timeouts: settings)
        d.advance(.seconds(4))
        d.client(D.query("select 1"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        d.advance(.seconds(4))
        d.session.tick(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.closedWith == nil)
        d.advance(.seconds(1))
        d.session.tick(now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.code == SQLState.adminShutdown)
    }

    /// Wait, query and transaction times are recorded, and counted for SHOW STATS.
    @Test func timingsAreRecorded() {
        let d = D()
        d.client(D.query("select 1"))
        d.advance(.milliseconds(3))
        d.lend()
        d.advance(.milliseconds(2))
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.timings == [.wait, .query, .transaction])
        #expect(d.traffic.waitTime == 3000)
        #expect(d.traffic.queryTime == 2000)
        #expect(d.traffic.transactionTime == 2000)
    }

    /// disable_pqexec: a simple Query closes the client; the extended protocol still works.
    @Test func disablePqexecRefusesSimpleQueries() {
        let d = D()
        d.session.refusesSimpleQuery = true
        d.client(PreparedHarness.parse("", "select 1"), D.sync)
        d.lend()
        #expect(d.serverTypes == "PS")
        d.serverSends(D.m("1"), D.ready("I"))
        #expect(d.releases == [true])
        d.client(D.query("select 1; drop table t"))
        #expect(d.closedWith?.message == "PQexec disallowed")
        #expect(d.serverTypes == "PS", "the Query never reached a server")
        #expect(d.session.state == .closed)
    }

    /// The same with prepared statements tracked (the default in transaction mode).
    @Test func disablePqexecRefusesSimpleQueriesWithPreparedTracking() {
        let d = D(prepared: true)
        d.session.refusesSimpleQuery = true
        d.client(D.query("select 1"))
        d.lend()
        #expect(d.closedWith?.message == "PQexec disallowed")
        #expect(d.serverTypes == "")
        #expect(d.releases == [true], "the server never saw the Query")
    }

    /// A pool error while queued closes the client with it as a FATAL.
    @Test func waitFailureClosesTheClient() {
        let d = D()
        d.client(D.query("select 1"))
        d.session.waitFailed(.waitTimeout(waited: .seconds(1)), into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.severity == "FATAL")
        #expect(d.session.state == .closed)
    }
}

/// The login decisions: which method authenticates a client, where its secret comes from, and
/// where it goes afterwards.
@Suite struct LoginDecisionTests {
    func request(
        user: String = "alice", database: String = "app", ip: String? = "127.0.0.1", tls: Bool = false,
        cn: String? = nil
    ) -> LoginRequest {
        LoginRequest(user: user, database: database, clientIP: ip, tls: tls, certificateCommonName: cn)
    }

    func config(_ authType: AuthType) -> Config {
        var config = Config()
        config.global.authType = authType
        config.databases["app"] = DatabaseEntry(name: "app")
        return config
    }

    @Test func configuredMethodsPassThrough() throws {
        for type in [AuthType.trust, .md5, .scramSHA256, .plain] {
            #expect(try ClientSession.authMethod(request(), config: config(type), hba: nil).get() == type)
        }
    }

    @Test func hbaPicksTheLineAndRefusesOthers() throws {
        let hba = try HBARules.parse(
            """
            host all bob 127.0.0.1/32 reject
            host app all 127.0.0.1/32 scram-sha-256
            local all all md5
            """)
        let c = config(.hba)
        #expect(try ClientSession.authMethod(request(), config: c, hba: hba).get() == .scramSHA256)
        #expect(try ClientSession.authMethod(request(ip: nil), config: c, hba: hba).get() == .md5)
        guard case .failure(let rejected) = ClientSession.authMethod(request(user: "bob"), config: c, hba: hba),
            case .failure(let unmatched) = ClientSession.authMethod(request(database: "other"), config: c, hba: hba)
        else {
            Issue.record("bob and the other database must be refused")
            return
        }
        #expect(rejected.error.code == SQLState.invalidAuthorization)
        #expect(rejected.error.message.contains("line 1"))
        #expect(unmatched.error.message.contains("no auth_hba_file entry"))
    }

    /// The HBA peer method: the Unix socket peer's OS user is the database user, or maps to it.
    @Test func peerTrustsTheSocketsOwnUserOrAMappedOne() throws {
        let hba = try HBARules.parse(
            """
            local app all peer map=staff
            local all all peer
            """)
        let ident = try IdentMap.parse(
            """
            staff  root          alice
            staff  /^(.*)-admin$  \\1
            """)
        let c = config(.hba)
        func method(_ user: String, database: String = "app", os: String?) -> AuthType? {
            var r = request(user: user, database: database, ip: nil)
            r.peer = os.map { PeerCredentials(systemUser: $0, isPoolerUser: false) }
            return try? ClientSession.authMethod(r, config: c, hba: hba, ident: ident).get()
        }
        #expect(method("alice", os: "root") == .trust)
        #expect(method("bob", os: "bob-admin") == .trust)
        #expect(method("bob", os: "root") == nil, "root maps to alice only")
        #expect(method("alice", os: "alice") == nil, "the map decides, not the name")
        #expect(method("carol", database: "other", os: "carol") == .trust, "no map: the same name")
        #expect(method("carol", database: "other", os: "dave") == nil)
        #expect(method("carol", database: "other", os: nil) == nil)
        guard
            case .failure(let refusal) = ClientSession.authMethod(
                LoginRequest(
                    user: "bob", database: "app", clientIP: nil, tls: false,
                    peer: PeerCredentials(systemUser: "root", isPoolerUser: false)),
                config: c, hba: hba, ident: ident)
        else {
            Issue.record("expected a refusal")
            return
        }
        #expect(refusal.error.message == "Peer authentication failed for user \"bob\"")
        #expect(throws: ConfigError.self) { try HBARules.parse("host all all 0.0.0.0/0 peer") }
    }

    /// The user pgbouncer on the console over the Unix socket from the pooler's own OS user is an
    /// admin without a password, even with md5 and not in admin_users; from another user it is not.
    @Test func thePoolersOwnUserReachesTheConsoleAsPgbouncer() throws {
        var c = config(.md5)
        c.global.adminUsers = ["admin"]
        var own = request(user: "pgbouncer", database: "pgbouncer", ip: nil)
        own.peer = PeerCredentials(systemUser: "root", isPoolerUser: true)
        #expect(try ClientSession.authMethod(own, config: c, hba: nil).get() == .trust)
        c.global.authFile = "userlist.txt"
        #expect(
            try ClientSession.secretSource(own, method: .trust, known: nil, canLookUp: false, config: c).get() == .none,
            "not refused for missing from auth_file")
        #expect(
            try ClientSession.destination(own, config: c, isDisabled: { _ in false }).get()
                == .adminConsole(readOnly: false))
        var other = own
        other.peer = PeerCredentials(systemUser: "postgres", isPoolerUser: false)
        #expect(try ClientSession.authMethod(other, config: c, hba: nil).get() == .md5)
        #expect(throws: Refusal.self) {
            try ClientSession.destination(other, config: c, isDisabled: { _ in false }).get()
        }
        var app = own
        app.database = "app"
        #expect(try ClientSession.authMethod(app, config: c, hba: nil).get() == .md5, "the console only")
    }

    @Test func certNeedsACertificateForTheUser() throws {
        let c = config(.cert)
        #expect(try ClientSession.authMethod(request(tls: true, cn: "alice"), config: c, hba: nil).get() == .trust)
        guard
            case .failure(let wrong) = ClientSession.authMethod(request(tls: true, cn: "mallory"), config: c, hba: nil),
            case .failure = ClientSession.authMethod(request(tls: true), config: c, hba: nil)
        else {
            Issue.record("a certificate for another user, or none, must be refused")
            return
        }
        #expect(wrong.error.message.contains("certificate authentication failed"))
    }

    @Test func tlsRequiredRefusesPlainTCPButNotUnixSockets() throws {
        var c = config(.trust)
        c.global.clientTLS.sslmode = .require
        guard case .failure(let refusal) = ClientSession.authMethod(request(), config: c, hba: nil) else {
            Issue.record("plain TCP must be refused")
            return
        }
        #expect(refusal.reason == "TLS required")
        #expect(try ClientSession.authMethod(request(tls: true), config: c, hba: nil).get() == .trust)
        #expect(try ClientSession.authMethod(request(ip: nil), config: c, hba: nil).get() == .trust)
    }

    @Test func secretComesFromAuthFileThenAuthQuery() throws {
        var c = config(.md5)
        let known = PasswordSecret.plain("pw")
        #expect(
            try ClientSession.secretSource(request(), method: .md5, known: known, canLookUp: true, config: c).get()
                == .known(known))
        #expect(
            try ClientSession.secretSource(request(), method: .md5, known: nil, canLookUp: true, config: c).get()
                == .lookUp)
        #expect(
            try ClientSession.secretSource(request(), method: .md5, known: nil, canLookUp: false, config: c).get()
                == .none)
        // trust with an auth_file that does not list the user refuses, as PgBouncer does.
        c.global.authFile = "users.txt"
        guard
            case .failure(let refusal) = ClientSession.secretSource(
                request(), method: .trust, known: nil, canLookUp: false, config: c)
        else {
            Issue.record("a user missing from auth_file must be refused under trust")
            return
        }
        #expect(refusal.error.message.contains("auth_file"))
        // With an auth_user, a user missing from auth_file is looked up under trust too.
        c.global.authType = .trust
        #expect(
            try ClientSession.secretSource(request(), method: .trust, known: nil, canLookUp: true, config: c).get()
                == .lookUp)
    }

    /// The welcome: the client's own values over the server's, and every tracked parameter known.
    @Test func welcomeShowsTheClientsValuesOverTheServers() {
        let welcome = ClientSession.Welcome(
            serverParameters: ["TimeZone": "UTC", "server_version": "15.0", "application_name": ""],
            wanted: ["application_name": "app"])
        var messages = welcome.messages
        var shown: [String: String] = [:]
        while messages.readableBytes > 0 {
            #expect(messages.readInteger(as: UInt8.self) == MessageType.parameterStatus)
            let length = Int(messages.readInteger(as: Int32.self)!)
            let (name, value) = WireDecode.parameterStatus(messages.readSlice(length: length - 4)!)!
            shown[name] = value
        }
        #expect(shown == ["TimeZone": "UTC", "server_version": "15.0", "application_name": "app"])
        #expect(welcome.wanted.wrappedValue == ["TimeZone": "UTC", "application_name": "app"])
    }

    @Test func applicationNameAddHost() {
        var c = config(.trust)
        #expect(ClientSession.applicationName("psql", clientAddress: "10.0.0.7:5123", config: c) == "psql")
        #expect(ClientSession.applicationName(nil, clientAddress: "10.0.0.7:5123", config: c) == nil)
        c.global.applicationNameAddHost = true
        #expect(
            ClientSession.applicationName("psql", clientAddress: "10.0.0.7:5123", config: c) == "psql - 10.0.0.7:5123")
        #expect(ClientSession.applicationName(nil, clientAddress: nil, config: c) == " - unix")
    }

    @Test func destinationIsTheConsoleThePoolOrARefusal() throws {
        var c = config(.trust)
        c.global.adminUsers = ["admin"]
        c.global.statsUsers = ["watcher"]
        let never: (String) -> Bool = { _ in false }
        #expect(
            try ClientSession.destination(request(user: "admin", database: "pgbouncer"), config: c, isDisabled: never)
                .get() == .adminConsole(readOnly: false))
        #expect(
            try ClientSession.destination(request(user: "watcher", database: "pooler"), config: c, isDisabled: never)
                .get() == .adminConsole(readOnly: true))
        #expect(
            try ClientSession.destination(request(), config: c, isDisabled: never).get()
                == .pool(DatabaseEntry(name: "app")))
        guard
            case .failure(let notAdmin) = ClientSession.destination(
                request(database: "pgbouncer"), config: c, isDisabled: never),
            case .failure(let unknown) = ClientSession.destination(
                request(database: "nope"), config: c, isDisabled: never),
            case .failure(let disabled) = ClientSession.destination(request(), config: c, isDisabled: { _ in true })
        else {
            Issue.record("each must be refused")
            return
        }
        #expect(notAdmin.error.code == SQLState.insufficientPrivilege)
        #expect(unknown.error.code == SQLState.invalidCatalogName && unknown.error.message == "no such database: nope")
        #expect(disabled.error.code == SQLState.cannotConnectNow)
        // A shutdown that waits: the console still, a database not.
        #expect(
            try ClientSession.destination(
                request(user: "admin", database: "pgbouncer"), config: c, shuttingDown: true, isDisabled: never
            ).get() == .adminConsole(readOnly: false))
        guard
            case .failure(let closing) = ClientSession.destination(
                request(), config: c, shuttingDown: true, isDisabled: never)
        else {
            Issue.record("a database login must be refused while shutting down")
            return
        }
        #expect(closing.error.code == SQLState.cannotConnectNow && closing.error.message == "server shutting down")
    }
}

/// The login as a flow of events: startup packets, registration, authentication, destination and
/// welcome, driven the way the connection drives them.
@Suite struct ClientLoginFlowTests {
    typealias D = SessionDriver

    func startup(_ parameters: [String: String], minor: Int = 0, unrecognized: [String] = []) -> StartupPacket {
        .startup(minorVersion: minor, parameters: parameters, unrecognizedOptions: unrecognized)
    }

    func facts(_ authType: AuthType, known: PasswordSecret? = nil, canLookUp: Bool = false) -> LoginFacts {
        var config = Config()
        config.global.authType = authType
        config.databases["app"] = DatabaseEntry(name: "app")
        return LoginFacts(
            config: config, hba: nil, clientAddress: "127.0.0.1:5000", clientIP: "127.0.0.1",
            certificateCommonName: nil, knownSecret: known, canLookUp: canLookUp)
    }

    func password(_ text: String) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeNullTerminatedString(text)
        return b
    }

    @Test func sslRequestIsAcceptedOnlyWhenTLSIsOfferedAndNothingFollows() {
        let offered = D(loggedIn: false)
        offered.session.startupPacket(.sslRequest, tlsOffered: true, bytesFollow: false, into: &offered.actions)
        offered.carryOut()
        #expect(offered.login == [.startTLS] && offered.session.tls)
        let refused = D(loggedIn: false)
        refused.session.startupPacket(.sslRequest, tlsOffered: false, bytesFollow: false, into: &refused.actions)
        refused.carryOut()
        #expect(refused.toClient.readableBytesView.elementsEqual([MessageType.encryptionRefused]))
        #expect(refused.session.state.name == "startup")
        let early = D(loggedIn: false)
        early.session.startupPacket(.sslRequest, tlsOffered: true, bytesFollow: true, into: &early.actions)
        early.carryOut()
        #expect(early.closedWith?.code == SQLState.protocolViolation)
        #expect(early.login.isEmpty)
    }

    /// A TLS handshake that never finishes cannot carry an error: the client is closed at once
    /// (client_login_timeout on a client stalled at ClientHello); after the handshake the error
    /// is written first.
    @Test func aClientClosedDuringItsTLSHandshakeIsClosedAtOnce() {
        let stalled = D(loggedIn: false)
        stalled.session.startupPacket(.sslRequest, tlsOffered: true, bytesFollow: false, into: &stalled.actions)
        stalled.session.close(
            .fatal(SQLState.protocolViolation, "timeout"), reason: "login timeout", into: &stalled.actions)
        stalled.carryOut()
        #expect(stalled.session.closing?.atOnce == true)
        let done = D(loggedIn: false)
        done.session.startupPacket(.sslRequest, tlsOffered: true, bytesFollow: false, into: &done.actions)
        done.session.tlsEstablished()
        done.session.close(.fatal(SQLState.protocolViolation, "timeout"), reason: "login timeout", into: &done.actions)
        done.carryOut()
        #expect(done.session.closing?.atOnce == false && done.closedWith != nil)
    }

    @Test func cancelRequestIsPassedOnAndTheConnectionClosedQuietly() {
        let d = D(loggedIn: false)
        d.session.startupPacket(
            .cancel(processID: 5, secretKey: 6), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.carryOut()
        #expect(d.login == [.forwardCancel(processID: 5, secretKey: 6), .closeQuietly])
        #expect(d.session.state == .closed && d.forgotten == 0)
    }

    @Test func startupWithoutAUserIsRefused() {
        let d = D(loggedIn: false)
        d.session.startupPacket(startup(["database": "app"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.code == SQLState.invalidAuthorization)
    }

    /// A DISABLEd database refuses the client before any secret is looked up (no auth_query runs
    /// against it), with the same error as after a login.
    @Test func aDisabledDatabaseRefusesBeforeTheLookUp() {
        let d = D(loggedIn: false)
        d.session.startupPacket(
            startup(["user": "alice", "database": "app"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.carryOut()
        var disabled = facts(.md5, canLookUp: true)
        disabled.databaseDisabled = true
        d.session.registered(disabled, into: &d.actions)
        d.carryOut()
        #expect(!d.login.contains(.lookUpSecret))
        #expect(d.closedWith?.code == SQLState.cannotConnectNow)
        #expect(d.closedWith?.message == "database \"app\" does not allow connections")
    }

    /// trust: registered, authenticated at once, the pool joined, welcomed, logged in.
    @Test func trustLoginGoesStraightToThePool() {
        let d = D(loggedIn: false)
        d.session.startupPacket(
            startup(
                ["user": "alice", "database": "app", "application_name": "x"], minor: 2,
                unrecognized: ["_pq_.y"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.carryOut()
        #expect(d.login == [.register])
        d.session.registered(facts(.trust), into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "v", "NegotiateProtocolVersion for the minor version and _pq_ option")
        #expect(d.login == [.register, .authenticated])
        d.session.enter(.success(.pool(DatabaseEntry(name: "app"))), into: &d.actions)
        d.carryOut()
        #expect(d.login.last == .joinPool)
        let welcome = ClientSession.Welcome(serverParameters: ["TimeZone": "UTC"], wanted: d.session.wanted)
        d.session.welcome(welcome, cancelKey: (1, 2), now: d.now, into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "vRSSKZ")
        #expect(d.session.state == .idle)
        #expect(d.session.wanted["application_name"] == "x")
    }

    /// login_notify_message: a NOTICE just before the first ReadyForQuery, for pool clients and on
    /// the console; none when empty.
    @Test func loginNotifyMessageComesBeforeTheFirstReadyForQuery() {
        for (notice, expected) in [("Welcome to the pooler", "RSKNZ"), ("", "RSKZ")] {
            let d = D(loggedIn: false)
            d.session.startupPacket(
                startup(["user": "alice", "database": "app"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
            d.session.registered(facts(.trust), into: &d.actions)
            d.session.enter(.success(.pool(DatabaseEntry(name: "app"))), notice: notice, into: &d.actions)
            let welcome = ClientSession.Welcome(serverParameters: ["TimeZone": "UTC"], wanted: d.session.wanted)
            d.session.welcome(welcome, cancelKey: (1, 2), notice: notice, now: d.now, into: &d.actions)
            d.carryOut()
            #expect(d.clientTypes == expected)
            if !notice.isEmpty { #expect(String(buffer: d.toClient).contains(notice)) }
            let console = D(loggedIn: false)
            console.session.startupPacket(
                startup(["user": "alice", "database": "pgbouncer"]), tlsOffered: false, bytesFollow: false,
                into: &console.actions)
            console.session.registered(facts(.trust), into: &console.actions)
            console.session.enter(.success(.adminConsole(readOnly: true)), notice: notice, into: &console.actions)
            console.carryOut()
            #expect(console.clientTypes.hasSuffix(notice.isEmpty ? "SKZ" : "SKNZ"))
        }
    }

    /// trust with auth_user: a user auth_query finds logs in without a password, one it does not
    /// find is refused (trust does not make up users).
    @Test func trustLooksUpUsersMissingFromAuthFile() {
        for (outcome, loggedIn) in [
            (AuthQueryExchange.Outcome.found(.plain("x")), true), (AuthQueryExchange.Outcome.notFound, false),
        ] {
            let d = D(loggedIn: false)
            d.session.startupPacket(
                startup(["user": "alice", "database": "app"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
            d.session.registered(facts(.trust, canLookUp: true), into: &d.actions)
            d.carryOut()
            #expect(d.login.contains(.lookUpSecret))
            d.session.secretLookedUp(outcome, into: &d.actions)
            d.carryOut()
            #expect(d.login.contains(.authenticated) == loggedIn)
            if !loggedIn { #expect(d.closedWith?.code == SQLState.invalidAuthorization) }
        }
    }

    /// md5 with a known secret: the challenge, then a wrong and a right password on two clients.
    @Test func md5LoginChecksThePassword() {
        let secret = PasswordSecret.plain("pw")
        for (given, succeeds) in [("wrong", false), ("pw", true)] {
            let d = D(loggedIn: false)
            d.session.startupPacket(
                startup(["user": "alice", "database": "app"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
            d.carryOut()
            d.session.registered(facts(.plain, known: secret), into: &d.actions)
            d.carryOut()
            #expect(d.session.state.name == "authenticating")
            #expect(d.clientTypes == "R")
            d.session.passwordMessage(type: MessageType.password, body: password(given), into: &d.actions)
            d.carryOut()
            #expect(d.login.contains(.authenticated) == succeeds)
            #expect((d.closedWith?.code == SQLState.invalidPassword) == !succeeds)
            if succeeds {
                #expect(d.session.learnedServerSecret == .password("pw"))
            }
        }
    }

    @Test func aMessageOtherThanAPasswordDuringLoginCloses() {
        let d = D(loggedIn: false)
        d.session.startupPacket(startup(["user": "alice"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.session.registered(facts(.md5, known: .plain("pw")), into: &d.actions)
        d.session.passwordMessage(type: MessageType.query, body: password("select 1"), into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.code == SQLState.protocolViolation)
    }

    /// auth_query: the secret is looked up; not found fails like a wrong password; a failed lookup
    /// closes with 08006.
    @Test func authQueryLookups() {
        for outcome in [AuthQueryExchange.Outcome.found(.plain("pw")), .notFound, .failed(.fatal("XX000", "x"))] {
            let d = D(loggedIn: false)
            d.session.startupPacket(
                startup(["user": "bob", "database": "app"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
            d.session.registered(facts(.plain, canLookUp: true), into: &d.actions)
            d.carryOut()
            #expect(d.login == [.register, .lookUpSecret])
            #expect(d.session.state.name == "lookingUpSecret")
            d.session.secretLookedUp(outcome, into: &d.actions)
            d.carryOut()
            switch outcome {
            case .failed: #expect(d.closedWith?.code == SQLState.connectionFailure)
            default: #expect(d.session.state.name == "authenticating")
            }
        }
    }

    /// A read-only admin console session, welcomed.
    func consoleSession() -> D {
        let d = D(loggedIn: false)
        d.session.startupPacket(
            startup(["user": "admin", "database": "pgbouncer"]), tlsOffered: false, bytesFollow: false, into: &d.actions
        )
        d.session.registered(facts(.trust), into: &d.actions)
        d.session.enter(.success(.adminConsole(readOnly: true)), into: &d.actions)
        d.carryOut()
        return d
    }

    /// `read` stops after a login step, with the rest of the read left for after its actions;
    /// keeps bytes while a lookup is awaited; drops them once closed.
    @Test func readStopsAtEachLoginStepAndKeepsWhatFollows() throws {
        let d = D(loggedIn: false)
        var bytes = ByteBuffer()
        Wire.startupMessage(parameters: [("user", "alice"), ("database", "app")], into: &bytes)
        var query = D.query("select 1")
        bytes.writeBuffer(&query)
        let more = try d.session.read(
            &bytes, now: d.now, tlsOffered: false, isKnownStatement: { _ in false }, into: &d.actions)
        #expect(more && d.actions.last == .login(.register))
        #expect(bytes.readableBytes == query.writerIndex, "the query waits for the login's actions")
        d.carryOut()
        d.session.registered(facts(.trust, canLookUp: true), into: &d.actions)
        d.carryOut()
        #expect(d.session.state.name == "lookingUpSecret")
        let kept = try d.session.read(
            &bytes, now: d.now, tlsOffered: false, isKnownStatement: { _ in false }, into: &d.actions)
        #expect(!kept && bytes.readableBytes == query.writerIndex, "kept until the secret is known")
        d.session.close(.fatal(SQLState.adminShutdown, "bye"), reason: "test", into: &d.actions)
        d.carryOut()
        _ = try d.session.read(
            &bytes, now: d.now, tlsOffered: false, isKnownStatement: { _ in false }, into: &d.actions)
        #expect(bytes.readableBytes == 0, "a closed client's bytes are dropped")
    }

    @Test func adminConsoleIsWelcomedByTheSession() {
        let d = consoleSession()
        #expect(d.session.isAdmin && d.session.adminReadOnly)
        #expect(d.clientTypes == "RSSSSSSSKZ")
    }

    /// Pipelined console messages are answered in the order they came: an error found at once
    /// waits behind the command still running before it, and the next command runs only after.
    @Test func adminConsoleAnswersPipelinedCommandsInOrder() throws {
        let d = consoleSession()
        d.toClient.clear()
        var bytes = ByteBuffer()
        for var m in [D.query("SHOW POOLS"), D.query("NO SUCH COMMAND"), D.query("SHOW STATS")] {
            bytes.writeBuffer(&m)
        }
        try d.session.adminBytes(&bytes, into: &d.actions)
        d.carryOut()
        #expect(d.adminCommands == [.show("POOLS")])
        #expect(d.clientTypes == "", "the error waits for the answer before it")
        d.session.adminAnswered(
            AdminConsoleSession.answer(.success(AdminResult(columns: ["a"], types: [.text], rows: [["1"]]))),
            into: &d.actions)
        d.carryOut()
        #expect(d.clientTypes == "TDCZEZ")
        #expect(d.adminCommands == [.show("POOLS"), .show("STATS")])
        #expect(d.consoleTraffic.count == 2 && d.consoleTraffic[0].0 == 16)
        var terminate = D.m("X")
        try d.session.adminBytes(&terminate, into: &d.actions)
        d.carryOut()
        #expect(!d.terminated, "Terminate waits for the command running")
        d.session.adminAnswered(
            AdminConsoleSession.answer(.failure(PostgresError(code: "58000", message: "x"))), into: &d.actions)
        d.carryOut()
        #expect(d.terminated && d.clientTypes == "TDCZEZEZ")
    }

    /// The closing FATAL is written to a client that reads, within a few seconds; a client not
    /// reading is closed at once (it would never let the error through).
    @Test func theClosingErrorLingersOnlyForAClientThatReads() {
        let reading = D()
        reading.session.close(.fatal(SQLState.adminShutdown, "bye"), reason: "test", into: &reading.actions)
        reading.carryOut()
        #expect(reading.session.closingLinger == .seconds(5))
        let stuck = D()
        stuck.session.clientWritabilityChanged(false, into: &stuck.actions)
        stuck.carryOut()
        stuck.session.close(.fatal(SQLState.adminShutdown, "bye"), reason: "test", into: &stuck.actions)
        stuck.carryOut()
        #expect(stuck.closedWith != nil && stuck.session.closingLinger == nil)
    }

    /// A database entry removed (RELOAD) while its client logged in refuses the client as an
    /// unknown database, rather than leaving it waiting.
    @Test func aDatabaseRemovedDuringTheLoginRefusesTheClient() {
        let d = D(loggedIn: false)
        #expect(!d.session.joinPool(nil, config: Config(), now: d.now, into: &d.actions))
        d.carryOut()
        #expect(d.closedWith?.code == SQLState.invalidCatalogName)
    }

    /// A client waiting for its pool's first server only learns the parameters from the lend.
    @Test func aLendWhileAwaitingTheWelcomeIsForTheParametersOnly() {
        let d = D(loggedIn: false)
        d.session.startupPacket(
            startup(["user": "alice", "database": "app"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.session.registered(facts(.trust), into: &d.actions)
        d.session.enter(.success(.pool(DatabaseEntry(name: "app"))), into: &d.actions)
        d.session.awaitWelcome(into: &d.actions)
        d.carryOut()
        #expect(d.requests == 1)
        #expect(
            d.session.lent(d.server, now: d.now, isKnownStatement: { _ in false }, into: &d.actions)
                == .parametersOnly)
        #expect(d.session.state.name == "awaitingWelcome")
        d.carryOut()
        #expect(d.releases == [true], "the server goes back at once, through the session's own action")
        let idle = D()
        #expect(
            idle.session.lent(idle.server, now: idle.now, isKnownStatement: { _ in false }, into: &idle.actions)
                == .unwanted)
        idle.carryOut()
        #expect(idle.releases == [true])
    }

    /// client_login_timeout is a tick of the session's clock: it closes a client still logging in
    /// once the time has passed, and a client logged in stops being watched at its next tick.
    @Test func loginTimeoutClosesOnlyClientsStillLoggingIn() {
        let waiting = D(loggedIn: false)
        waiting.session.connectionOpened(now: waiting.now, loginTimeout: .seconds(5), into: &waiting.actions)
        waiting.session.startupPacket(
            startup(["user": "alice"]), tlsOffered: false, bytesFollow: false, into: &waiting.actions)
        waiting.carryOut()
        #expect(waiting.clockWatched == 1)
        waiting.advance(.milliseconds(4900))
        #expect(waiting.session.tick(now: waiting.now, into: &waiting.actions) == nil)
        waiting.advance(.milliseconds(100))
        #expect(waiting.session.tick(now: waiting.now, into: &waiting.actions)?.code == SQLState.protocolViolation)
        waiting.carryOut()
        #expect(waiting.closedWith?.message == "client_login_timeout: login took too long")
        let done = D(loggedIn: false)
        done.session.connectionOpened(now: done.now, loginTimeout: .seconds(5), into: &done.actions)
        done.session.loggedIn(now: done.now, into: &done.actions)
        done.carryOut()
        done.advance(.seconds(6))
        done.session.tick(now: done.now, into: &done.actions)
        done.carryOut()
        #expect(done.closedWith == nil && done.clockUnwatched == 1)
    }

    /// Waiting for a server to learn the pool's parameters (or for a replication connection's
    /// server) is still the login: client_login_timeout closes a client that waits past it.
    @Test(arguments: [false, true]) func loginTimeoutCoversTheWaitForTheWelcome(replication: Bool) {
        let d = D(loggedIn: false)
        d.session.connectionOpened(now: d.now, loginTimeout: .seconds(5), into: &d.actions)
        var parameters = ["user": "alice", "database": "app"]
        if replication { parameters["replication"] = "true" }
        d.session.startupPacket(startup(parameters), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.session.registered(facts(.trust), into: &d.actions)
        d.session.enter(.success(.pool(DatabaseEntry(name: "app"))), into: &d.actions)
        if !replication { d.session.awaitWelcome(into: &d.actions) }
        d.carryOut()
        #expect(d.session.stateName == "login" && d.session.state.name == "awaitingWelcome")
        d.advance(.seconds(5))
        #expect(d.session.tick(now: d.now, into: &d.actions)?.message == "client_login_timeout: login took too long")
        d.carryOut()
        #expect(d.closedWith?.message == "client_login_timeout: login took too long")
    }

    /// A client with client-side timeouts is watched from its welcome on; one without them and
    /// without client_login_timeout never is.
    @Test func onlyClientsWithTimeoutsAreWatchedOnceLoggedIn() {
        var timeouts = ClientTimeoutSettings()
        timeouts.clientIdleTimeout = .seconds(1)
        for (settings, watched) in [(timeouts, 1), (ClientTimeoutSettings(), 0)] {
            let d = D(loggedIn: false)
            d.session.connectionOpened(now: d.now, loginTimeout: .zero, into: &d.actions)
            d.session.startupPacket(startup(["user": "alice"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
            d.session.registered(facts(.trust), into: &d.actions)
            d.session.enter(.success(.pool(DatabaseEntry(name: "app"))), into: &d.actions)
            d.carryOut()
            if settings.anyEnabled {
                d.session.timeoutClock = ClientSession.TimeoutClock(settings: settings, now: d.now)
            }
            let welcome = ClientSession.Welcome(serverParameters: ["TimeZone": "UTC"], wanted: d.session.wanted)
            d.session.welcome(welcome, cancelKey: (1, 2), now: d.now, into: &d.actions)
            d.carryOut()
            #expect(d.clockWatched == watched)
        }
    }

    @Test func refusedDestinationCloses() {
        let d = D(loggedIn: false)
        d.session.startupPacket(
            startup(["user": "alice", "database": "nope"]), tlsOffered: false, bytesFollow: false, into: &d.actions)
        d.session.registered(facts(.trust), into: &d.actions)
        d.session.enter(
            .failure(Refusal(.fatal(SQLState.invalidCatalogName, "no"), reason: "unknown database")), into: &d.actions)
        d.carryOut()
        #expect(d.closedWith?.code == SQLState.invalidCatalogName)
        #expect(d.forgotten == 1)
    }
}

/// Flow control: which side is read, so that what the pooler holds per connection stays bounded.
@Suite struct FlowControlTests {
    typealias D = SessionDriver

    /// A client that stops reading its result stops the server being read (and itself, since it
    /// is not taking its replies); both resume when it drains.
    @Test func unwritableClientPausesItsServer() {
        let d = D()
        d.client(D.query("select big"))
        d.lend()
        #expect(d.flow.isEmpty)
        d.session.clientWritabilityChanged(false, into: &d.actions)
        d.carryOut()
        #expect(d.flow == [.pauseClientReads, .pauseServerReads])
        d.session.clientWritabilityChanged(true, into: &d.actions)
        d.carryOut()
        #expect(d.flow == [.pauseClientReads, .pauseServerReads, .resumeClientReads, .resumeServerReads])
    }

    /// A server that cannot take more stops the client being read; the server is still read.
    @Test func unwritableServerPausesItsClient() {
        let d = D()
        d.client(D.query("copy t from stdin"))
        d.lend()
        d.session.serverWritabilityChanged(false, into: &d.actions)
        d.carryOut()
        #expect(d.flow == [.pauseClientReads])
        d.session.serverWritabilityChanged(true, into: &d.actions)
        d.carryOut()
        #expect(d.flow == [.pauseClientReads, .resumeClientReads])
    }

    /// Bytes handed to a server on another loop past the limit stop the client being read until
    /// that loop has written enough of them: the same pause as any other, decided by the session.
    @Test func aHandOffBacklogPausesTheClientUntilItDrains() {
        let d = D()
        d.client(D.query("copy t from stdin"))
        d.lend()
        d.session.handOffBacklogged()
        d.carryOut()
        #expect(d.flow == [.pauseClientReads])
        d.session.serverWritabilityChanged(false, into: &d.actions)
        d.carryOut()
        d.session.handOffDrained(into: &d.actions)
        d.carryOut()
        #expect(d.flow == [.pauseClientReads], "still paused: the server is not writable")
        d.session.serverWritabilityChanged(true, into: &d.actions)
        d.carryOut()
        #expect(d.flow == [.pauseClientReads, .resumeClientReads])
    }

    /// A queued client is read only up to the limit; the lend takes its bytes and reads resume.
    @Test(arguments: [false, true]) func queuedClientIsReadUpToTheLimit(prepared: Bool) {
        let d = D(prepared: prepared)
        d.session.bufferLimit = 100
        d.client(D.query(String(repeating: "x", count: 60)))
        #expect(d.session.isWaiting)
        #expect(d.flow.isEmpty)
        d.client(D.query(String(repeating: "y", count: 60)))
        #expect(d.flow == [.pauseClientReads])
        d.lend()
        #expect(d.serverTypes == "QQ")
        #expect(d.flow == [.pauseClientReads, .resumeClientReads])
    }

    /// A message the session must see whole is read to its end once linked, however long
    /// (max_packet_size bounds it): only the wait for a server pauses it.
    @Test func aLongMessageHeldWholeIsReadToItsEnd() {
        let d = D(prepared: true)
        d.session.bufferLimit = 100
        d.client(D.query("select 1"))
        d.lend()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.session.state == .idle)
        let parse = PreparedHarness.parse("s1", "select '" + String(repeating: "z", count: 500) + "'")
        d.clientRaw(parse.getSlice(at: 0, length: 300)!)
        #expect(d.session.isWaiting)
        #expect(d.flow == [.pauseClientReads])
        d.lend()
        #expect(d.flow == [.pauseClientReads, .resumeClientReads])
        d.clientRaw(parse.getSlice(at: 300, length: 200)!)
        #expect(d.flow == [.pauseClientReads, .resumeClientReads], "a partial message while linked is not held back")
        d.clientRaw(parse.getSlice(at: 500, length: parse.readableBytes - 500)!)
        d.client(D.sync)
        #expect(d.serverTypes == "QPS")
    }

    /// The unlink reads the server again by itself: no resume is asked of a server given back,
    /// and the next lend starts with both sides read.
    @Test func unlinkForgetsTheServersPause() {
        let d = D()
        d.client(D.query("select 1"))
        d.lend()
        d.session.clientWritabilityChanged(false, into: &d.actions)
        d.carryOut()
        d.serverSends(D.complete("SELECT 1"), D.ready("I"))
        #expect(d.releases == [true])
        #expect(!d.session.flow.serverPaused)
        #expect(d.flow == [.pauseClientReads, .pauseServerReads])
        d.session.clientWritabilityChanged(true, into: &d.actions)
        d.carryOut()
        #expect(d.flow == [.pauseClientReads, .pauseServerReads, .resumeClientReads])
    }

    /// Before login only short messages are taken (a password, a SCRAM message); max_packet_size,
    /// capped at what PostgreSQL accepts, applies once logged in.
    @Test func messagesAreShortUntilLoggedIn() {
        let d = D(loggedIn: false)
        #expect(d.session.scanner.maxMessageLength == ClientSession.loginMessageLimit)
        d.session.loggedIn(now: d.now, into: &d.actions)
        #expect(d.session.scanner.maxMessageLength == 1 << 20)
        let big = ClientSession(maxMessageLength: Int(Int32.max))
        var session = big
        var actions = ClientSession.Actions()
        session.loggedIn(now: d.now, into: &actions)
        #expect(session.scanner.maxMessageLength == ClientSession.largestMessage)
    }
}

/// The bytes handed between event loops: the reader stops past the limit and is told to go on
/// exactly when the taker brings them down to half.
@Suite struct HandOffTests {
    @Test func readerStopsPastTheLimitAndGoesOnAtHalf() {
        let handOff = HandOff(limit: 100)
        #expect(!handOff.handed(60))
        #expect(handOff.handed(60), "120 handed off: stop")
        #expect(!handOff.mayGoOn)
        #expect(!handOff.taken(60), "60 left: more than half")
        #expect(handOff.taken(30), "30 left: the reader may go on")
        #expect(handOff.mayGoOn)
        #expect(!handOff.taken(30), "already under half: told once")
        #expect(handOff.pending == 0)
    }
}

/// Prepared statements after a schema change: a server's "cached plan must not change result type"
/// starts a new epoch, and the statements get new pooler-wide names, so servers parse them again.
@Suite struct StalePlanTests {
    typealias D = SessionDriver

    static func error(code: String, message: String, routine: String?) -> ByteBuffer {
        D.m("E") { b in
            for (field, value) in [("S", "ERROR"), ("C", code), ("M", message)] + (routine.map { [("R", $0)] } ?? []) {
                b.writeInteger(UInt8(ascii: field.unicodeScalars.first!))
                b.writeNullTerminatedString(value)
            }
            b.writeInteger(UInt8(0))
        }
    }

    @Test func theStalePlanErrorIsRecognizedByCodeAndRoutineOrMessage() {
        func body(_ m: ByteBuffer) -> ByteBuffer { m.getSlice(at: 5, length: m.readableBytes - 5)! }
        let stale = "cached plan must not change result type"
        #expect(
            PreparedStatementTracker.isStalePlanError(body(Self.error(code: "0A000", message: stale, routine: nil))))
        #expect(
            PreparedStatementTracker.isStalePlanError(
                body(Self.error(code: "0A000", message: "translated", routine: "RevalidateCachedQuery"))))
        #expect(
            !PreparedStatementTracker.isStalePlanError(body(Self.error(code: "0A000", message: "other", routine: nil))))
        #expect(
            !PreparedStatementTracker.isStalePlanError(body(Self.error(code: "42P01", message: stale, routine: nil))))
    }

    /// The session reports the stale plan; once the epoch moves, the client's next Bind of the same
    /// statement goes with a Parse under a new name.
    @Test func aStalePlanRenamesTheStatementForEveryServer() {
        let d = D(prepared: true)
        let execute = D.m("E") { $0.writeInteger(UInt32(0)) }
        d.client(PreparedHarness.parse("s1", "select * from t"), PreparedHarness.bind("s1"), execute, D.sync)
        d.lend()
        d.serverSends(D.m("1"), D.m("2"), D.complete("SELECT 1"), D.ready("I"))
        let first = d.toServer
        d.toServer.clear()
        d.client(PreparedHarness.bind("s1"), execute, D.sync)
        d.lend()
        d.serverSends(
            Self.error(code: "0A000", message: "cached plan must not change result type", routine: nil), D.ready("I"))
        #expect(d.staleReports == 1)
        #expect(d.clientTypes.hasSuffix("EZ"), "the error still reaches the client")
        d.toServer.clear()
        d.session.statementEpoch = 1
        d.client(PreparedHarness.bind("s1"), execute, D.sync)
        d.lend()
        #expect(D.types(d.toServer) == "PBES", "a Parse under the new name comes first")
        let oldName = PreparedStatementTracker.serverName(for: Self.definition("select * from t"))
        let newName = PreparedStatementTracker.serverName(for: Self.definition("select * from t"), epoch: 1)
        #expect(oldName != newName)
        #expect(String(buffer: first).contains(oldName))
        #expect(String(buffer: d.toServer).contains(newName))
    }

    static func definition(_ sql: String) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeNullTerminatedString(sql)
        b.writeInteger(Int16(0))
        return b
    }
}

extension ClientSession.State {
    /// The case's name, for expectations on states that carry data.
    var name: String { String("\(self)".prefix { $0 != "(" }) }
}
