import ArgumentParser
import Foundation
import Logging
import NIOCore
import Tidepool
import TidepoolCore

#if canImport(Glibc)
    import Glibc
#endif

@main
struct TidepoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tidepool",
        abstract: "A PostgreSQL connection pooler, drop-in for PgBouncer.",
        version: "tidepool \(TidepoolCoreVersion.string)")

    @Flag(name: [.customShort("d"), .long], help: "Run in the background (needs logfile or -q).")
    var daemon = false

    @Flag(name: [.customShort("q"), .long], help: "Log nothing to the console.")
    var quiet = false

    @Flag(name: [.customShort("v"), .long], help: "Log more; repeat for even more.")
    var verbose: Int

    @Option(name: [.customShort("u"), .long], help: "Switch to this OS user at start-up.")
    var user: String?

    @Flag(name: [.customShort("V")], help: "Print the version and exit.")
    var printVersion = false

    @Flag(name: .long, help: "Check the configuration, print problems and exit.")
    var check = false

    @Argument(help: "The configuration file (pooler.ini or an existing pgbouncer.ini).")
    var configFile: String?

    func run() throws {
        if printVersion {
            print("tidepool \(TidepoolCoreVersion.string)")
            return
        }
        guard let configFile else {
            throw ValidationError("a configuration file is required")
        }
        let config: Config
        let userlist: [String: PasswordSecret]
        do {
            (config, userlist) = try loadConfiguration(configFile)
        } catch {
            FileHandle.standardError.write(Data("tidepool: \(error)\n".utf8))
            throw ExitCode(1)
        }
        if check {
            for warning in config.warnings { print("warning: \(warning)") }
            do {
                try Pooler.checkSecurityFiles(config)  // auth_hba_file, TLS certificates and keys
            } catch {
                FileHandle.standardError.write(Data("tidepool: \(error)\n".utf8))
                throw ExitCode(1)
            }
            print("configuration OK: \(config.databases.count) database(s), \(userlist.count) user(s) in auth_file")
            return
        }
        if daemon {
            try daemonize(logfile: config.global.logfile)
        }
        let logPath = config.global.logfile
        let factory = try LineLogHandler.factory(path: quiet && logPath == nil ? "/dev/null" : logPath)
        let g = config.global
        SyslogOutput.shared.configure(enabled: g.syslog, ident: g.syslogIdent, facility: g.syslogFacility)
        var logger = Logger(label: "tidepool", factory: factory)
        logger.logLevel = LineLogHandler.level(verbose: config.global.verbose + verbose)
        for warning in config.warnings { logger.warning("\(warning)") }
        if let pidfile = config.global.pidfile {
            try "\(getpid())\n".write(toFile: pidfile, atomically: true, encoding: .utf8)
        }
        // Before any thread starts, so that every thread runs as that user.
        if let user = user ?? config.global.user { try switchUser(user) }
        let path = configFile
        let pooler = Pooler(
            config: config, userlist: userlist, logger: logger, reloader: { try loadConfiguration($0 ?? path) })
        pooler.commandLineVerbose = verbose
        // Watched before the port opens: a SIGHUP or SIGTERM sent as soon as it accepts must not
        // meet the default action (end the process).
        let signals = SignalWatcher(
            pause: { _ = pooler.pause(database: nil) }, resume: { pooler.resume(database: nil) },
            reload: { try? pooler.reload() })
        do {
            try pooler.start()
        } catch {
            logger.critical("cannot start: \(error)")
            throw ExitCode(1)
        }
        logger.info("tidepool \(TidepoolCoreVersion.string) started, instance_id=\(pooler.instanceID)")
        let limit = config.global.shutdownTimeout
        let verdict = signals.waitForFirst()
        pooler.beginDraining()
        switch verdict {
        case .waitForClients:
            // Graceful: no new clients; the connected ones finish and leave.
            logger.info("SIGTERM: waiting for \(pooler.connectedClients) client(s) to disconnect")
            pooler.stopListening(keepUnixSocket: true)
            drain(limit: limit, stopNow: signals.stopNow) { pooler.connectedClients == 0 }
        case .waitForServers:
            // Like SHUTDOWN WAIT_FOR_SERVERS: transactions in flight finish, then everything closes.
            logger.info("SIGINT: waiting for servers in use to be released")
            pooler.stopListening(keepUnixSocket: true)
            pooler.closeForShutdown()
            drain(limit: limit, stopNow: signals.stopNow) { pooler.lentServers(database: nil) == 0 }
        case .now:
            break
        }
        if signals.stopNow() { logger.info("second termination signal: stopping now") }
        logger.info("shutting down")
        pooler.shutdown()
        if let pidfile = config.global.pidfile { unlink(pidfile) }
    }

    /// Re-runs this program in a new session without -d, then exits the parent.
    func daemonize(logfile: String?) throws {
        guard logfile != nil || quiet else {
            throw ValidationError("-d needs logfile in the config or -q")
        }
        var arguments = CommandLine.arguments.filter { $0 != "-d" && $0 != "--daemon" }
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        arguments[0] = executable
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/setsid")
        process.arguments = [executable] + arguments.dropFirst()
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        Foundation.exit(0)
    }

    func switchUser(_ name: String) throws {
        guard let entry = getpwnam(name) else { throw ValidationError("unknown user \(name)") }
        guard initgroups(name, entry.pointee.pw_gid) == 0, setgid(entry.pointee.pw_gid) == 0,
            setuid(entry.pointee.pw_uid) == 0
        else {
            throw ValidationError("cannot switch to user \(name)")
        }
    }
}

/// Waits (polling) until `done` holds, `limit` passes (zero: no limit) or `stopNow` says so.
func drain(limit: TimeAmount, stopNow: () -> Bool, until done: () -> Bool) {
    let deadline = limit > .zero ? NIODeadline.now() + limit : NIODeadline.distantFuture
    while !done() && !stopNow() && NIODeadline.now() < deadline {
        usleep(50_000)
    }
}

/// Reads the configuration file and the auth file it names.
func loadConfiguration(_ path: String) throws -> (Config, [String: PasswordSecret]) {
    let config = try Config.load(path: path) { try String(contentsOfFile: $0, encoding: .utf8) }
    var userlist: [String: PasswordSecret] = [:]
    if let authFile = config.global.authFile {
        guard let text = try? String(contentsOfFile: authFile, encoding: .utf8) else {
            throw ConfigError(file: path, line: 0, key: "auth_file", message: "cannot read auth_file \(authFile)")
        }
        userlist = Userlist.parse(text)
    }
    return (config, userlist)
}

/// The process's signals, watched for its whole life. As in PgBouncer, SIGHUP reloads the
/// configuration, SIGUSR1 pauses and SIGUSR2 resumes all pools; SIGTERM, SIGINT and SIGQUIT mean
/// what `ShutdownSignals` says, a second one included.
final class SignalWatcher: @unchecked Sendable {
    private let lock = NSLock()
    private var shutdown = ShutdownSignals()
    private var verdicts: [ShutdownSignals.Verdict] = []
    private let first = DispatchSemaphore(value: 0)
    private let queue = DispatchQueue(label: "tidepool.signals")
    private var sources: [DispatchSourceSignal] = []

    init(
        pause: @escaping @Sendable () -> Void, resume: @escaping @Sendable () -> Void,
        reload: @escaping @Sendable () -> Void
    ) {
        for sig in [SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            switch sig {
            case SIGUSR1: source.setEventHandler { pause() }
            case SIGUSR2: source.setEventHandler { resume() }
            case SIGHUP: source.setEventHandler { reload() }
            default:
                let kind: ShutdownSignals.Signal = sig == SIGTERM ? .terminate : sig == SIGINT ? .interrupt : .quit
                source.setEventHandler { [unowned self] in self.received(kind) }
            }
            source.resume()
            sources.append(source)
        }
    }

    private func received(_ signal: ShutdownSignals.Signal) {
        lock.lock()
        let isFirst = verdicts.isEmpty
        verdicts.append(shutdown.received(signal))
        lock.unlock()
        if isFirst { first.signal() }
    }

    /// Blocks until the first termination signal and says what it asks for.
    func waitForFirst() -> ShutdownSignals.Verdict {
        first.wait()
        lock.lock()
        defer { lock.unlock() }
        return verdicts[0]
    }

    /// A later signal asked to stop at once.
    func stopNow() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        return verdicts.dropFirst().contains(.now)
    }
}
