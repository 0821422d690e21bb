import NIOCore

/// Authenticating a client that logs in to the pooler, after its StartupMessage.
/// Follows PgBouncer's rules: `md5` uses SCRAM when the stored secret is a SCRAM verifier.
public struct ClientAuthStateMachine: Sendable {
    /// scram_iterations: for the verifier made from a plain-text secret (and the stand-in one).
    public var scramIterations = 4096

    public enum Action: Sendable {
        case send(ByteBuffer)
        case authenticated
        case fail(PostgresError)
    }

    enum State: Sendable {
        case initial
        case awaitingCleartext
        case awaitingMD5(salt: [UInt8])
        case awaitingSASLInitial(ScramServerExchange)
        case awaitingSASLFinal(ScramServerExchange)
        case done
    }

    let authType: AuthType
    let user: String
    /// nil when the user is unknown: the exchange still runs, and fails at the end.
    let secret: PasswordSecret?
    var state = State.initial
    /// The client's key when it logged in with SCRAM (for logging in to the server in turn).
    public private(set) var scramClientKey: [UInt8]?
    public private(set) var scramServerKey: [UInt8]?
    /// The cleartext password, when the client sent one.
    public private(set) var cleartextPassword: String?

    public init(authType: AuthType, user: String, secret: PasswordSecret?) {
        self.authType = authType
        self.user = user
        self.secret = secret
    }

    var failure: PostgresError {
        .fatal(SQLState.invalidPassword, "password authentication failed for user \"\(user)\"")
    }

    /// `salt`: the md5 salt (random when nil, made only for the methods that use one).
    public mutating func start(salt givenSalt: [UInt8]? = nil, nonce: String? = nil) -> Action {
        var out = ByteBufferAllocator().buffer(capacity: 32)
        lazy var salt = givenSalt ?? Self.randomSalt()
        switch authType {
        case .trust, .any:
            state = .done
            return .authenticated
        case .cert:
            // Checked by the runtime against the TLS certificate before this machine is used.
            return .fail(
                PostgresError.fatal(
                    SQLState.invalidAuthorization, "certificate authentication failed for user \"\(user)\""))
        case .plain:
            state = .awaitingCleartext
            Wire.authenticationCleartextPassword(into: &out)
        case .md5, .hba:
            if case .scram(let verifier) = secret {
                return startSCRAM(verifier, nonce: nonce, into: &out)
            }
            state = .awaitingMD5(salt: salt)
            Wire.authenticationMD5Password(salt: salt, into: &out)
        case .scramSHA256:
            switch secret {
            case .scram(let verifier):
                return startSCRAM(verifier, nonce: nonce, into: &out)
            case .plain(let password):
                return startSCRAM(
                    ScramSecret(
                        password: password, salt: Array(salt + salt + salt + salt), iterations: scramIterations),
                    nonce: nonce, into: &out)
            case .md5, nil:
                // No usable verifier: run the exchange against a random one so the answer is the same.
                let fake = ScramSecret(
                    iterations: scramIterations, salt: salt, storedKey: Array(repeating: 0, count: 32),
                    serverKey: Array(repeating: 0, count: 32))
                return startSCRAM(fake, nonce: nonce, into: &out)
            }
        }
        return .send(out)
    }

    mutating func startSCRAM(_ verifier: ScramSecret, nonce: String?, into out: inout ByteBuffer) -> Action {
        state = .awaitingSASLInitial(ScramServerExchange(secret: verifier, serverNonce: nonce))
        Wire.authenticationSASL(mechanisms: [Scram.mechanism], into: &out)
        return .send(out)
    }

    /// Four random bytes, from one draw (each draw is a getrandom system call).
    public static func randomSalt() -> [UInt8] {
        withUnsafeBytes(of: UInt32.random(in: .min ... .max)) { Array($0) }
    }

    /// Takes the body of a password-type ('p') message.
    public mutating func receivePasswordMessage(_ body: ByteBuffer) -> Action {
        var body = body
        var out = ByteBufferAllocator().buffer(capacity: 64)
        switch state {
        case .awaitingCleartext:
            state = .done
            guard let password = body.readNullTerminatedString() else { return .fail(malformed) }
            cleartextPassword = password
            return checkCleartext(password) ? .authenticated : .fail(failure)
        case .awaitingMD5(let salt):
            state = .done
            guard let response = body.readNullTerminatedString() else { return .fail(malformed) }
            switch secret {
            case .plain(let password):
                guard response == MD5Auth.response(password: password, user: user, salt: salt) else {
                    return .fail(failure)
                }
                cleartextPassword = password
                return .authenticated
            case .md5(let stored):
                return response == MD5Auth.response(storedSecret: stored, salt: salt) ? .authenticated : .fail(failure)
            case .scram, nil:
                return .fail(failure)
            }
        case .awaitingSASLInitial(var exchange):
            guard let mechanism = body.readNullTerminatedString(), let length = body.readInteger(as: Int32.self),
                length >= 0, let data = body.readBytes(length: Int(length))
            else { state = .done; return .fail(malformed) }
            guard mechanism == Scram.mechanism else {
                state = .done
                return .fail(.fatal(SQLState.protocolViolation, "unsupported SASL mechanism \(mechanism)"))
            }
            do {
                let reply = try exchange.receiveClientFirst(data)
                state = .awaitingSASLFinal(exchange)
                Wire.authenticationSASLContinue(reply, into: &out)
                return .send(out)
            } catch {
                state = .done
                return .fail(.fatal(SQLState.protocolViolation, "invalid SCRAM exchange: \(error)"))
            }
        case .awaitingSASLFinal(var exchange):
            state = .done
            let data = body.readBytes(length: body.readableBytes) ?? []
            do {
                let reply = try exchange.receiveClientFinal(data)
                // An unknown user or an unusable secret fails here, after the same exchange.
                guard let secret, !(secret.isMD5) else { return .fail(failure) }
                scramClientKey = exchange.clientKey
                if case .scram(let v) = secret { scramServerKey = v.serverKey }
                Wire.authenticationSASLFinal(reply, into: &out)
                return .send(out)
            } catch .wrongProof {
                return .fail(failure)
            } catch {
                return .fail(.fatal(SQLState.protocolViolation, "invalid SCRAM exchange: \(error)"))
            }
        case .initial, .done:
            state = .done
            return .fail(.fatal(SQLState.protocolViolation, "unexpected password message"))
        }
    }

    /// After `.send` of the SASL final message the client is authenticated.
    public var isAuthenticated: Bool {
        if case .done = state, scramClientKey != nil { return true }
        return false
    }

    var malformed: PostgresError { .fatal(SQLState.protocolViolation, "malformed password message") }

    func checkCleartext(_ password: String) -> Bool {
        switch secret {
        case .plain(let stored): return stored == password
        case .md5(let stored): return stored == MD5Auth.storedSecret(password: password, user: user)
        case .scram(let verifier):
            return ScramSecret(password: password, salt: verifier.salt, iterations: verifier.iterations) == verifier
        case nil: return false
        }
    }
}

extension PasswordSecret {
    var isMD5: Bool {
        if case .md5 = self { return true }
        return false
    }
}
