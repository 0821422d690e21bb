import NIOCore

/// What the fuzz target (`Sources/tidepool-fuzz`) does with one input, kept here so that unit tests
/// can replay the committed corpus and crash inputs without a fuzzing build. The first byte picks
/// the way in; the rest goes to the startup decoder, or through the message scanner to the
/// decoders and state machines a client's and a server's bytes reach: the client's login (startup
/// packet, then password messages), the pooler's login to a server, and the traffic after them;
/// the readers of what operators write (the configuration, HBA rules, auth file, console); and
/// the resolv.conf reader (name servers' answers are c-ares').
public enum FuzzHarness {
    public static func run(_ input: [UInt8]) {
        guard let mode = input.first else { return }
        var buffer = ByteBuffer(bytes: input.dropFirst())
        switch mode % 8 {
        case 0: startup(&buffer)
        case 1: clientMessages(&buffer)
        case 2: serverMessages(&buffer)
        case 3: authentication(&buffer)
        case 4: serverLogin(&buffer)
        case 5: clientLogin(&buffer)
        case 6: operatorText(buffer)
        default: resolverText(buffer)
        }
    }

    /// A resolv.conf, and the DNS cache given whatever addresses it names.
    static func resolverText(_ buffer: ByteBuffer) {
        let settings = ResolverSettings.parse(String(decoding: buffer.readableBytesView, as: UTF8.self))
        _ = settings.csv
        var cache = DNSCache(maxTTL: .seconds(1), nxdomainTTL: .seconds(1), zoneCheckPeriod: .seconds(1))
        let now = NIODeadline.uptimeNanoseconds(0)
        _ = cache.lookup("db.example.test", now: now)
        _ = cache.resolved("db.example.test", addresses: settings.nameservers.map(\.host), now: now)
        _ = cache.zoneSerial("example.test", serial: UInt32(truncatingIfNeeded: buffer.readableBytes))
    }

    /// Text as an operator writes it: the configuration (with an %include answered from the same
    /// text), HBA rules, the auth file and admin console commands. Errors are fine; crashes are not.
    static func operatorText(_ buffer: ByteBuffer) {
        let text = String(decoding: buffer.readableBytesView, as: UTF8.self)
        if let config = try? Config.parse(text, readFile: { _ in "[pooler]\nlisten_port = 1\n" }) {
            _ = config.displaySettings
            for database in config.databases.values {
                _ = config.poolMode(database: database, user: "u")
                _ = config.queryWaitTimeout(database: database, user: "u")
            }
            _ = config.clientTimeouts(user: "u")
        }
        _ = try? HBARules.parse(text)
        // SQL as the session-state classifier reads it: the whole text, and each line alone.
        _ = SessionStatements.effects(text)
        _ = Userlist.parse(text)
        for line in text.split(separator: "\n") {
            _ = try? AdminCommand.parse(String(line))
            _ = SessionStatements.effects(String(line))
        }
    }

    static func startup(_ buffer: inout ByteBuffer) {
        while buffer.readableBytes > 0 {
            guard let packet = try? StartupPacket.parse(from: &buffer) else { return }
            if case .startup(_, let parameters, _) = packet {
                _ = try? StartupParameters.resolve(parameters, ignored: ["extra_float_digits"])
            }
        }
    }

    /// Client messages as the pooler reads them in transaction mode with prepared statements on:
    /// the real `ClientSession`, with the rest of the input as a conversation.
    static func clientMessages(_ buffer: inout ByteBuffer) {
        conversation(&buffer, poolMode: .transaction, tracksPrepared: true)
    }

    /// Server messages as a linked client reads them, in a pool mode the input picks.
    static func serverMessages(_ buffer: inout ByteBuffer) {
        let mode = PoolMode.allCases[Int(buffer.readInteger(as: UInt8.self) ?? 0) % PoolMode.allCases.count]
        conversation(&buffer, poolMode: mode, tracksPrepared: mode != .session)
    }

    /// Drives one logged-in `ClientSession` through a conversation read from the input: each step is
    /// a kind byte, a length byte and that many bytes. Kinds: client bytes, server bytes, a lend,
    /// a cancel request, a cancel's arrival, a timer tick, the server lost, the client gone, and
    /// (with the kind's high bit) the client's or the server's socket filling up or draining. The
    /// pool's side is played straight: a request for a server is answered at the next lend step,
    /// a released server may be lent again. Checks that the session's state and its server agree,
    /// and that reads are paused exactly when the flow-control rules say.
    static func conversation(_ buffer: inout ByteBuffer, poolMode: PoolMode, tracksPrepared: Bool) {
        var session = ClientSession(maxMessageLength: 1 << 20)
        session.bufferLimit = 64
        session.poolMode = poolMode
        session.tracksSessionState = poolMode != .session
        if tracksPrepared { session.prepared = PreparedStatementTracker() }
        var settings = ClientTimeoutSettings()
        settings.queryTimeout = .milliseconds(5)
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        session.timeoutClock = ClientSession.TimeoutClock(settings: settings, now: start)
        var now = start
        var actions = ClientSession.Actions()
        session.loggedIn(now: now, into: &actions)
        let server = ServerSessionState(maxPreparedStatements: 4)
        var cancels = 0
        session.notifyQueueSize = 8
        var awaitsListener = false
        while session.state != .closed, let kind = buffer.readInteger(as: UInt8.self),
            let length = buffer.readInteger(as: UInt8.self),
            var bytes = buffer.readSlice(length: min(Int(length), buffer.readableBytes))
        {
            now = now + .microseconds(Int64(kind))
            var spareLent = false
            if kind & 0x80 != 0 {
                // The sockets: which one, and whether it can take more, from the length byte.
                if length & 1 == 0 {
                    session.clientWritabilityChanged(length & 2 != 0, into: &actions)
                } else {
                    session.serverWritabilityChanged(length & 2 != 0, into: &actions)
                }
            }
            if kind & 0x40 != 0, awaitsListener {
                // The pool's listener listens on the client's new channels.
                awaitsListener = false
                session.listenConfirmed(now: now, into: &actions)
            }
            if kind & 0x20 != 0, let channel = session.sessionState?.channels.first {
                var message = ByteBuffer()
                message.writeInteger(MessageType.notificationResponse)
                message.writeInteger(Int32(4 + 4 + channel.utf8.count + 2))
                message.writeInteger(Int32(1))
                message.writeNullTerminatedString(channel)
                message.writeInteger(UInt8(0))
                session.notification(message, channel: channel, now: now, into: &actions)
            }
            switch kind % 8 {
            case 0:
                guard !session.flow.clientPaused else { break }  // the connection does not read it
                session.beginRead(&bytes, statementEpoch: session.statementEpoch)
                do {
                    try session.clientBytes(&bytes, now: now, isKnownStatement: { $0.count % 2 == 0 }, into: &actions)
                } catch {
                    session.close(error.postgresError, reason: "bad packet", into: &actions)
                }
                session.endRead(&bytes, now: now, into: &actions)
            case 1:
                guard !session.flow.serverPaused else { break }
                session.serverBytes(bytes, now: now, into: &actions)
            case 2:
                // A lend the session no longer wants is another server of the pool's, given back
                // at once: not the one it holds.
                spareLent = !session.isWaiting
                _ = session.lent(
                    spareLent ? ServerSessionState(maxPreparedStatements: 4) : server, now: now,
                    isKnownStatement: { _ in false }, into: &actions)
            case 3:
                session.cancelRequested(now: now, into: &actions)
            case 4:
                if cancels > 0 {
                    cancels -= 1
                    session.cancelFinished(now: now, into: &actions)
                }
            case 5:
                session.tick(now: now + .milliseconds(Int64(length)), into: &actions)
            case 6:
                session.serverLost(unused: length & 1 == 0, now: now, into: &actions)
            default:
                session.finish(serverResetQuery: "DISCARD ALL", resetAlways: false, into: &actions)
            }
            for action in actions {
                switch action {
                case .sendToServer: session.toServer.removeAll()
                case .releaseServer(reusable: true) where !spareLent, .resetAndReleaseServer:
                    // The next client must start at a message of its own.
                    precondition(
                        server.kept.isEmpty && server.scanner.atMessageBoundary && server.sync == nil,
                        "a server given back in the middle of a message or of the pooler's own query")
                case .cancelServerQuery(let reportBack): if reportBack { cancels += 1 }
                case .handInTraffic: _ = session.takeTraffic()
                case .listenChanged:
                    if !session.listenChanges.added.isEmpty { awaitsListener = true }
                    session.listenChanges = ChannelChanges()
                default: break
                }
            }
            // As the connection does: a Terminate ends the session.
            if actions.contains(.terminate) {
                session.finish(serverResetQuery: "DISCARD ALL", resetAlways: false, into: &actions)
            }
            session.settleReads(into: &actions)
            actions.removeAll()
            session.actionsCarriedOut()
            session.accepted.removeAll()
            precondition(!session.flow.serverPaused || session.isLinked, "an unlinked server left paused")
            // Reads stop in time: what waits is bounded by the limit and one read.
            precondition(session.heldBytes <= session.bufferLimit + 255, "held bytes past the limit")
            precondition(session.notificationQueue.count <= session.notifyQueueSize, "notification queue unbounded")
            precondition(session.readyHold != .held || awaitsListener, "a ReadyForQuery held with nothing to wait for")
        }
    }

    /// Password messages (cleartext, md5 and SCRAM) against each auth method.
    static func authentication(_ buffer: inout ByteBuffer) {
        for authType in [AuthType.plain, AuthType.md5, AuthType.scramSHA256] {
            var auth = ClientAuthStateMachine(
                authType: authType, user: "u", secret: .plain("secret"))
            _ = auth.start(salt: [1, 2, 3, 4], nonce: "fuzznonce")
            var copy = buffer
            var scanner = MessageScanner(maxMessageLength: 1 << 16)
            while let chunk = try? scanner.next(from: &copy, classify: { _ in .inspect }) {
                guard case .message(_, let body, _) = chunk else { continue }
                if case .fail = auth.receivePasswordMessage(body) { break }
            }
        }
    }

    /// Backend messages as a server connection reads them outside a lend (`ServerSession`): its
    /// login with each kind of secret, connect_query, then checks and resets while idle.
    static func serverLogin(_ buffer: inout ByteBuffer) {
        let secrets: [ServerLoginStateMachine.Secret] = [
            .none, .password("secret"), .md5("md5" + String(repeating: "0", count: 32)),
            .scramKeys(clientKey: Array(repeating: 1, count: 32), serverKey: Array(repeating: 2, count: 32)),
        ]
        for (index, secret) in secrets.enumerated() {
            var session = ServerSession(
                state: ServerSessionState(maxPreparedStatements: 2), connectQuery: index % 2 == 0 ? nil : "select 1")
            _ = session.connected(ServerLoginStateMachine(user: "u", database: "d", secret: secret))
            var copy = buffer
            var scanner = MessageScanner(maxMessageLength: 1 << 16)
            var count = 0
            while session.phase != .closed {
                guard let chunk = try? scanner.next(from: &copy, classify: { _ in .inspect }) else {
                    _ = session.badMessage()
                    break
                }
                guard case .message(let type, let body, _) = chunk else { continue }
                _ = session.message(type: type, body: body)
                count += 1
                if session.phase == .ready {
                    _ = count % 3 == 0 ? session.check("select 1") : count % 3 == 1 ? session.reset("DISCARD ALL") : []
                }
                if count % 7 == 0 { _ = session.timedOut() }
            }
            _ = session.closed()
        }
    }

    /// A client's whole login as it arrives on the socket: startup packets (SSLRequest, cancel or
    /// StartupMessage), then password messages against the method the auth type picks.
    static func clientLogin(_ buffer: inout ByteBuffer) {
        var parameters: [String: String] = [:]
        while buffer.readableBytes > 0 {
            guard let packet = try? StartupPacket.parse(from: &buffer) else { return }
            if case .startup(_, let raw, _) = packet {
                guard (try? StartupParameters.resolve(raw, ignored: [])) != nil else { return }
                parameters = raw
                break
            }
        }
        let authTypes: [AuthType] = [.trust, .plain, .md5, .scramSHA256]
        let authType = authTypes[(parameters["user"]?.utf8.count ?? 0) % authTypes.count]
        var auth = ClientAuthStateMachine(
            authType: authType, user: parameters["user"] ?? "", secret: .plain("secret"))
        if case .fail = auth.start(salt: [1, 2, 3, 4], nonce: "fuzznonce") { return }
        var scanner = MessageScanner(maxMessageLength: 1 << 16)
        while let chunk = try? scanner.next(from: &buffer, classify: { _ in .inspect }) {
            guard case .message(_, let body, _) = chunk else { continue }
            if case .fail = auth.receivePasswordMessage(body) { return }
            if auth.isAuthenticated { return }
        }
    }
}

/// A small seeded generator for the tests that generate their inputs, so that a failure is found
/// again from its seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
