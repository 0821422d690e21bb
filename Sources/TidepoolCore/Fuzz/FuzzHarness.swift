import NIOCore

/// What the fuzz target (`Sources/tidepool-fuzz`) does with one input, kept here so that unit tests
/// can replay the committed corpus and crash inputs without a fuzzing build. The first byte picks
/// the way in; the rest goes to the startup decoder, or through the message scanner to the
/// decoders and state machines a client's and a server's bytes reach: the client's login (startup
/// packet, then password messages), the pooler's login to a server, and the traffic after them.
public enum FuzzHarness {
    public static func run(_ input: [UInt8]) {
        guard let mode = input.first else { return }
        var buffer = ByteBuffer(bytes: input.dropFirst())
        switch mode % 6 {
        case 0: startup(&buffer)
        case 1: clientMessages(&buffer)
        case 2: serverMessages(&buffer)
        case 3: authentication(&buffer)
        case 4: serverLogin(&buffer)
        default: clientLogin(&buffer)
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

    /// Client messages as the pooler reads them in transaction mode with prepared statements on.
    static func clientMessages(_ buffer: inout ByteBuffer) {
        var scanner = MessageScanner(maxMessageLength: 1 << 20)
        var tracker = TransactionTracker()
        var prepared = PreparedStatementTracker()
        var server = ServerStatementCache(capacity: 4)
        while true {
            let chunk: MessageScanner.Chunk?
            do {
                chunk = try scanner.next(
                    from: &buffer,
                    peek: { type, bytes, start in
                        if PreparedStatementTracker.inspects(type, bytes, bodyStart: start) { return .inspect }
                        tracker.clientSent(type)
                        prepared.clientForwarded(type)
                        return .forward
                    })
            } catch {
                return
            }
            guard let chunk else { return }
            if case .message(let type, let body, let whole) = chunk {
                tracker.clientSent(type)
                var out: [ByteBuffer] = []
                prepared.clientMessage(type: type, body: body, whole: whole, server: &server, into: &out)
                _ = prepared.takeReplies()
                if type == MessageType.query, let sql = WireDecode.queryText(body) {
                    _ = try? AdminCommand.parse(sql)
                    _ = SQLStatementCommand.parse(sql)
                }
            }
            // Answer every request the way a server might, to drive the response queue too.
            for type in [UInt8(ascii: "1"), UInt8(ascii: "2"), UInt8(ascii: "C"), MessageType.readyForQuery] {
                _ = prepared.serverMessage(type, server: &server)
            }
            _ = prepared.takeReplies()
        }
    }

    /// Server messages as a linked client reads them.
    static func serverMessages(_ buffer: inout ByteBuffer) {
        var scanner = MessageScanner(maxMessageLength: 1 << 20)
        var prepared = PreparedStatementTracker()
        var server = ServerStatementCache(capacity: 2)
        var tracker = TransactionTracker()
        var out: [ByteBuffer] = []
        var parse = ByteBuffer(bytes: [0x73, 0x31, 0] + Array("select 1".utf8) + [0, 0, 0])
        prepared.clientMessage(
            type: MessageType.parse, body: parse, whole: parse, server: &server, into: &out)
        parse.moveReaderIndex(to: 0)
        while let chunk = try? scanner.next(from: &buffer, classify: { _ in .inspect }) {
            guard case .message(let type, let body, _) = chunk else { continue }
            switch type {
            case MessageType.errorResponse, MessageType.noticeResponse: _ = WireDecode.errorFields(body)
            case MessageType.parameterStatus: _ = WireDecode.parameterStatus(body)
            case MessageType.readyForQuery:
                var b = body
                let status = TransactionStatus(rawValue: b.readInteger(as: UInt8.self) ?? 0) ?? .failed
                tracker.serverReady(status)
            default: break
            }
            _ = prepared.serverMessage(type, server: &server)
            _ = prepared.takeReplies()
            _ = prepared.takeAccepted()
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

    /// Backend messages as the pooler's login to a server reads them, with each kind of secret.
    static func serverLogin(_ buffer: inout ByteBuffer) {
        let secrets: [ServerLoginStateMachine.Secret] = [
            .none, .password("secret"), .md5("md5" + String(repeating: "0", count: 32)),
            .scramKeys(clientKey: Array(repeating: 1, count: 32), serverKey: Array(repeating: 2, count: 32)),
        ]
        for secret in secrets {
            var login = ServerLoginStateMachine(user: "u", database: "d", secret: secret)
            var copy = buffer
            var scanner = MessageScanner(maxMessageLength: 1 << 16)
            messages: while let chunk = try? scanner.next(from: &copy, classify: { _ in .inspect }) {
                guard case .message(let type, let body, _) = chunk else { continue }
                switch login.receive(type: type, body: body) {
                case .fail, .loggedIn: break messages
                case .send, .none: continue
                }
            }
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
