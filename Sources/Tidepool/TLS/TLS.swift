import Foundation
import NIOCore
import NIOSSL
import TidepoolCore

/// What RELOAD re-reads besides the configuration: the HBA rules and the TLS contexts made from
/// the certificate files. Built whole or not at all, so a bad file leaves the old one in force.
struct Security: Sendable {
    var hba: HBARules?
    var ident: IdentMap?
    var clientTLS: NIOSSLContext?
    var serverTLS: NIOSSLContext?

    static func load(
        _ config: Config, readFile: (String) throws -> String = { try String(contentsOfFile: $0, encoding: .utf8) }
    ) throws -> Security {
        var security = Security()
        let g = config.global
        if let path = g.authHBAFile {
            let text: String
            do { text = try readFile(path) } catch {
                throw PostgresError(code: SQLState.invalidParameterValue, message: "cannot read auth_hba_file \(path)")
            }
            security.hba = try HBARules.parse(text, file: path)
        } else if g.authType == .hba {
            throw PostgresError(code: SQLState.invalidParameterValue, message: "auth_type = hba needs auth_hba_file")
        }
        if let path = g.authIdentFile {
            let text: String
            do { text = try readFile(path) } catch {
                throw PostgresError(
                    code: SQLState.invalidParameterValue, message: "cannot read auth_ident_file \(path)")
            }
            security.ident = try IdentMap.parse(text, file: path)
        }
        if g.clientTLS.sslmode != .disable {
            security.clientTLS = try makeContext(g.clientTLS, server: true)
        }
        if g.serverTLS.sslmode != .disable && g.serverTLS.sslmode != .allow {
            security.serverTLS = try makeContext(g.serverTLS, server: false)
        }
        return security
    }

    /// A context for one side. Clients of the pooler (server: true) need a certificate and key;
    /// with a CA file they are asked for a certificate, which verify-ca and verify-full require.
    static func makeContext(_ settings: TLSSettings, server: Bool) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        do {
            if !settings.certFile.isEmpty {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(settings.certFile).map {
                    .certificate($0)
                }
            }
            if !settings.keyFile.isEmpty {
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: settings.keyFile, format: .pem))
            }
        } catch {
            throw PostgresError(
                code: SQLState.invalidParameterValue,
                message: "cannot load \(server ? "client" : "server")_tls certificate or key: \(error)")
        }
        if server && (settings.certFile.isEmpty || settings.keyFile.isEmpty) {
            throw PostgresError(
                code: SQLState.invalidParameterValue,
                message:
                    "client_tls_sslmode = \(settings.sslmode.rawValue) needs client_tls_cert_file and client_tls_key_file"
            )
        }
        if !settings.caFile.isEmpty { configuration.trustRoots = .file(settings.caFile) }
        switch settings.sslmode {
        case .verifyFull: configuration.certificateVerification = server ? .noHostnameVerification : .fullVerification
        case .verifyCA: configuration.certificateVerification = .noHostnameVerification
        default:
            configuration.certificateVerification =
                server && !settings.caFile.isEmpty ? .optionalVerification : .none
        }
        let versions: [TLSVersion] = [.tlsv1, .tlsv11, .tlsv12, .tlsv13]
        let range = settings.versionRange
        configuration.minimumTLSVersion = versions[range.lowerBound]
        configuration.maximumTLSVersion = versions[range.upperBound]
        if let curve = settings.ecdhCurveCodePoint { configuration.curves = [NIOTLSCurve(rawValue: curve)] }
        if settings.ciphers != "default" && !settings.ciphers.isEmpty && settings.ciphers != "fast"
            && settings.ciphers != "normal" && settings.ciphers != "secure"
        {
            configuration.cipherSuites = settings.ciphers
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw PostgresError(
                code: SQLState.invalidParameterValue,
                message: "cannot set up \(server ? "client" : "server")-side TLS: \(error)")
        }
    }
}

/// The first handler of a server connection: asks PostgreSQL for TLS (SSLRequest) before anything
/// else, and on 'S' puts a TLS handler behind itself. Then it passes channelActive on and leaves,
/// so the login above it starts on a channel that is already encrypted (or plain, when allowed).
final class ServerTLSNegotiator: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let mode: SSLMode
    let context: NIOSSLContext?
    let hostname: String?
    let timeout: TimeAmount
    var timer: Scheduled<Void>?
    var answered = false

    init(mode: SSLMode, context: NIOSSLContext?, hostname: String?, timeout: TimeAmount) {
        self.mode = mode
        self.context = context
        self.hostname = hostname
        self.timeout = timeout
    }

    func channelActive(context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: 8)
        Wire.sslRequest(into: &out)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        timer = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [weak self] in
            guard let self, !self.answered else { return }
            context.fireErrorCaught(
                PostgresError.fatal(SQLState.connectionFailure, "server login timed out (no answer to SSLRequest)"))
            context.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !answered else { return context.fireChannelRead(data) }
        answered = true
        timer?.cancel()
        let buffer = unwrapInboundIn(data)
        // Exactly one byte: anything after it was sent before encryption and cannot be trusted.
        guard buffer.readableBytes == 1, let answer = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else {
            return fail(context, "unexpected answer to SSLRequest")
        }
        switch answer {
        case MessageType.encryptionAccepted:
            guard let tls = self.context else { return fail(context, "no TLS context") }
            do {
                let handler = try NIOSSLClientHandler(context: tls, serverHostname: sniName)
                try context.pipeline.syncOperations.addHandler(handler, position: .after(self))
            } catch {
                return fail(context, "TLS setup failed: \(error)")
            }
        case MessageType.encryptionRefused:
            if mode.requiresTLS {
                return fail(context, "server does not support TLS, and server_tls_sslmode = \(mode.rawValue)")
            }
        default:
            return fail(context, "unexpected answer to SSLRequest")
        }
        context.fireChannelActive()
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    /// SNI and the name checked under verify-full; an IP address is checked against the
    /// connected address instead.
    var sniName: String? {
        guard let hostname, HBARules.parseIP(hostname) == nil else { return nil }
        return hostname
    }

    func fail(_ context: ChannelHandlerContext, _ message: String) {
        context.fireErrorCaught(PostgresError.fatal(SQLState.unableToConnect, message))
        context.close(promise: nil)
    }
}
