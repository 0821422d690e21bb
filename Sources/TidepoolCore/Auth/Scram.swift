import Crypto
import Foundation
import _CryptoExtras

/// A SCRAM-SHA-256 verifier as PostgreSQL stores it:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 fields).
public struct ScramSecret: Equatable, Sendable {
    public var iterations: Int
    public var salt: [UInt8]
    public var storedKey: [UInt8]
    public var serverKey: [UInt8]

    public init(iterations: Int, salt: [UInt8], storedKey: [UInt8], serverKey: [UInt8]) {
        self.iterations = iterations
        self.salt = salt
        self.storedKey = storedKey
        self.serverKey = serverKey
    }

    public init?(parsing text: String) {
        guard text.hasPrefix("SCRAM-SHA-256$") else { return nil }
        let parts = text.dropFirst("SCRAM-SHA-256$".count).split(separator: "$", omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        let left = parts[0].split(separator: ":")
        let right = parts[1].split(separator: ":")
        guard left.count == 2, right.count == 2, let iterations = Int(left[0]), iterations > 0,
            let salt = Data(base64Encoded: String(left[1])),
            let storedKey = Data(base64Encoded: String(right[0])),
            let serverKey = Data(base64Encoded: String(right[1])),
            storedKey.count == 32, serverKey.count == 32
        else { return nil }
        self.init(iterations: iterations, salt: Array(salt), storedKey: Array(storedKey), serverKey: Array(serverKey))
    }

    /// Derives a verifier from a plain password.
    public init(password: String, salt: [UInt8], iterations: Int = 4096) {
        let salted = Scram.saltedPassword(password, salt: salt, iterations: iterations)
        let clientKey = Scram.hmac(key: salted, "Client Key")
        self.init(
            iterations: iterations, salt: salt, storedKey: Scram.sha256(clientKey),
            serverKey: Scram.hmac(key: salted, "Server Key"))
    }

    public var text: String {
        "SCRAM-SHA-256$\(iterations):\(Data(salt).base64EncodedString())$"
            + "\(Data(storedKey).base64EncodedString()):\(Data(serverKey).base64EncodedString())"
    }
}

public enum Scram {
    public static let mechanism = "SCRAM-SHA-256"

    static func saltedPassword(_ password: String, salt: [UInt8], iterations: Int) -> [UInt8] {
        let key = try! KDF.Insecure.PBKDF2.deriveKey(
            from: Array(password.utf8), salt: salt, using: .sha256, outputByteCount: 32,
            unsafeUncheckedRounds: iterations)
        return key.withUnsafeBytes { Array($0) }
    }

    static func hmac(key: [UInt8], _ message: String) -> [UInt8] {
        hmac(key: key, Array(message.utf8))
    }

    static func hmac(key: [UInt8], _ message: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: key)))
    }

    static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        Array(SHA256.hash(data: bytes))
    }

    static func xor(_ a: [UInt8], _ b: [UInt8]) -> [UInt8] {
        zip(a, b).map { $0 ^ $1 }
    }

    static func randomNonce() -> String {
        // 18 bytes from three 64-bit draws (each draw is a getrandom system call).
        var generator = SystemRandomNumberGenerator()
        let words = (generator.next(), generator.next(), generator.next())
        let bytes = withUnsafeBytes(of: words) { Array($0.prefix(18)) }
        return Data(bytes).base64EncodedString()
    }

    /// Splits `a=x,b=y` into attributes (values may contain '=').
    static func attributes(_ message: String) -> [Character: String] {
        var result: [Character: String] = [:]
        for part in message.split(separator: ",", omittingEmptySubsequences: false) {
            guard part.count >= 2, part.dropFirst().first == "=" else { continue }
            result[part.first!] = String(part.dropFirst(2))
        }
        return result
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<a.count { diff |= a[i] ^ b[i] }
        return diff == 0
    }
}

/// The pooler's side of SCRAM when a client logs in to it (the pooler acts as the server).
public struct ScramServerExchange: Sendable {
    public enum Failure: Error, Equatable, Sendable {
        case malformed(String)
        case channelBindingNotSupported
        case wrongProof
    }

    let secret: ScramSecret
    let serverNonce: String
    var clientFirstBare = ""
    var serverFirst = ""
    var combinedNonce = ""
    var gs2Header = ""
    /// The client's key, recovered from a correct proof (lets the pooler log in to a server that
    /// holds the same verifier).
    public private(set) var clientKey: [UInt8]?

    public init(secret: ScramSecret, serverNonce: String? = nil) {
        self.secret = secret
        self.serverNonce = serverNonce ?? Scram.randomNonce()
    }

    /// Takes the client-first-message, returns the server-first-message.
    public mutating func receiveClientFirst(_ data: [UInt8]) throws(Failure) -> [UInt8] {
        guard let message = String(bytes: data, encoding: .utf8) else { throw .malformed("not UTF-8") }
        // gs2-header: cbind-flag "," [authzid] ","
        let pieces = message.split(separator: ",", maxSplits: 2, omittingEmptySubsequences: false)
        guard pieces.count == 3 else { throw .malformed("client-first-message") }
        switch pieces[0].first {
        case "n", "y": break
        case "p": throw .channelBindingNotSupported
        default: throw .malformed("gs2 header")
        }
        gs2Header = "\(pieces[0]),\(pieces[1]),"
        clientFirstBare = String(pieces[2])
        guard let clientNonce = Scram.attributes(clientFirstBare)["r"], !clientNonce.isEmpty else {
            throw .malformed("client nonce")
        }
        combinedNonce = clientNonce + serverNonce
        serverFirst = "r=\(combinedNonce),s=\(Data(secret.salt).base64EncodedString()),i=\(secret.iterations)"
        return Array(serverFirst.utf8)
    }

    /// Takes the client-final-message, checks the proof, returns the server-final-message.
    public mutating func receiveClientFinal(_ data: [UInt8]) throws(Failure) -> [UInt8] {
        guard let message = String(bytes: data, encoding: .utf8) else { throw .malformed("not UTF-8") }
        guard let proofRange = message.range(of: ",p=") else { throw .malformed("client-final-message") }
        let withoutProof = String(message[..<proofRange.lowerBound])
        let attributes = Scram.attributes(message)
        guard attributes["r"] == combinedNonce else { throw .malformed("nonce mismatch") }
        guard let binding = attributes["c"], let bindingData = Data(base64Encoded: binding),
            String(decoding: bindingData, as: UTF8.self) == gs2Header
        else { throw .malformed("channel binding") }
        guard let proofText = attributes["p"], let proof = Data(base64Encoded: proofText), proof.count == 32 else {
            throw .malformed("proof")
        }
        let authMessage = Array("\(clientFirstBare),\(serverFirst),\(withoutProof)".utf8)
        let clientSignature = Scram.hmac(key: secret.storedKey, authMessage)
        let clientKey = Scram.xor(Array(proof), clientSignature)
        guard Scram.constantTimeEqual(Scram.sha256(clientKey), secret.storedKey) else { throw .wrongProof }
        self.clientKey = clientKey
        let serverSignature = Scram.hmac(key: secret.serverKey, authMessage)
        return Array("v=\(Data(serverSignature).base64EncodedString())".utf8)
    }
}

/// The pooler's side of SCRAM when it logs in to a PostgreSQL server (the pooler acts as the client).
public struct ScramClientExchange: Sendable {
    public enum Credentials: Sendable {
        case password(String)
        /// Keys recovered from a client's proof; valid only against the same verifier.
        case keys(clientKey: [UInt8], serverKey: [UInt8])
    }

    public enum Failure: Error, Equatable, Sendable {
        case malformed(String)
        case serverSignatureMismatch
    }

    let credentials: Credentials
    let clientNonce: String
    var clientFirstBare: String
    var expectedServerSignature: [UInt8] = []

    public init(credentials: Credentials, clientNonce: String? = nil) {
        self.credentials = credentials
        self.clientNonce = clientNonce ?? Scram.randomNonce()
        self.clientFirstBare = "n=,r=\(self.clientNonce)"
    }

    public func clientFirst() -> [UInt8] {
        Array("n,,\(clientFirstBare)".utf8)
    }

    public mutating func receiveServerFirst(_ data: [UInt8]) throws(Failure) -> [UInt8] {
        guard let serverFirst = String(bytes: data, encoding: .utf8) else { throw .malformed("not UTF-8") }
        let attributes = Scram.attributes(serverFirst)
        guard let nonce = attributes["r"], nonce.hasPrefix(clientNonce),
            let saltText = attributes["s"], let salt = Data(base64Encoded: saltText),
            let iterationsText = attributes["i"], let iterations = Int(iterationsText), iterations > 0
        else { throw .malformed("server-first-message") }
        let clientKey: [UInt8]
        let serverKey: [UInt8]
        switch credentials {
        case .password(let password):
            let salted = Scram.saltedPassword(password, salt: Array(salt), iterations: iterations)
            clientKey = Scram.hmac(key: salted, "Client Key")
            serverKey = Scram.hmac(key: salted, "Server Key")
        case .keys(let c, let s):
            clientKey = c
            serverKey = s
        }
        let withoutProof = "c=biws,r=\(nonce)"
        let authMessage = Array("\(clientFirstBare),\(serverFirst),\(withoutProof)".utf8)
        let clientSignature = Scram.hmac(key: Scram.sha256(clientKey), authMessage)
        let proof = Scram.xor(clientKey, clientSignature)
        expectedServerSignature = Scram.hmac(key: serverKey, authMessage)
        return Array("\(withoutProof),p=\(Data(proof).base64EncodedString())".utf8)
    }

    public func receiveServerFinal(_ data: [UInt8]) throws(Failure) {
        guard let text = String(bytes: data, encoding: .utf8), let v = Scram.attributes(text)["v"],
            let signature = Data(base64Encoded: v)
        else { throw .malformed("server-final-message") }
        guard Scram.constantTimeEqual(Array(signature), expectedServerSignature) else {
            throw .serverSignatureMismatch
        }
    }
}
