import Foundation
import Logging
import Synchronization
import TidepoolCore

/// A log handler writing PgBouncer-style lines (`time [pid] LEVEL message`) to a file or stderr.
public struct LineLogHandler: LogHandler {
    final class Sink: @unchecked Sendable {
        private var handle: FileHandle
        /// The log file (nil: standard error), opened again by `reopen`.
        let path: String?
        let lock = NSLock()
        /// The level of every logger writing here, so that SET verbose and RELOAD change them all.
        let level = Atomic<Int>(Sink.levels.firstIndex(of: .info)!)
        static let levels = Logger.Level.allCases
        init(handle: FileHandle, path: String?) {
            self.handle = handle
            self.path = path
        }
        func write(_ line: String) {
            lock.lock()
            defer { lock.unlock() }
            handle.write(Data(line.utf8))
        }

        /// Opens the log file again by its name (after logrotate renamed it, a new file); the old
        /// one stays in use if the new one cannot be opened.
        func reopen() {
            guard let path, let fresh = try? LineLogHandler.open(path) else { return }
            lock.lock()
            let old = handle
            handle = fresh
            lock.unlock()
            try? old.close()
        }
    }

    /// The process's log file, for `reopenLogFile`.
    nonisolated(unsafe) static var current: Sink?

    /// SIGHUP and RELOAD open the log file again, as PgBouncer does, so that logrotate can rename it.
    public static func reopenLogFile() { current?.reopen() }

    static func open(_ path: String) throws -> FileHandle {
        if !FileManager.default.fileExists(atPath: path) {
            _ = FileManager.default.createFile(atPath: path, contents: nil)
        }
        guard let h = FileHandle(forWritingAtPath: path) else {
            throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: path])
        }
        h.seekToEndOfFile()
        return h
    }

    let sink: Sink
    let label: String
    public var logLevel: Logger.Level {
        get { Sink.levels[sink.level.load(ordering: .relaxed)] }
        set { sink.level.store(Sink.levels.firstIndex(of: newValue)!, ordering: .relaxed) }
    }
    public var metadata: Logger.Metadata = [:]

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// Logs to `path`, appending, or to standard error when `path` is nil.
    public static func factory(path: String?) throws -> @Sendable (String) -> LogHandler {
        let handle = try path.map(open) ?? FileHandle.standardError
        let sink = Sink(handle: handle, path: path)
        current = sink
        return { label in LineLogHandler(sink: sink, label: label) }
    }

    /// The level for PgBouncer's verbose (with -v counted in).
    public static func level(verbose: Int) -> Logger.Level {
        switch verbose {
        case ...0: .info
        case 1: .debug
        default: .trace
        }
    }

    public func log(event: LogEvent) {
        var body = "\(event.level.rawValue.uppercased()) \(event.message)"
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        if !merged.isEmpty {
            body += " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        body = LogWords.escapingControls(body)
        sink.write("\(Self.timestamp()) [\(Self.pid)] \(body)\n")
        SyslogOutput.shared.send(event.level, body)  // syslog adds its own time and pid
    }

    static let pid = getpid()

    /// The time as `2026-11-23T18:12:29.729Z`, formatted by hand: a Foundation date formatter made
    /// per line cost about a million instructions (ICU locale set-up), which every logged
    /// connection paid twice.
    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = now.tv_sec
        var t = tm()
        gmtime_r(&seconds, &t)
        let fields: [(value: Int, digits: Int, after: UInt8)] = [
            (Int(t.tm_year) + 1900, 4, UInt8(ascii: "-")), (Int(t.tm_mon) + 1, 2, UInt8(ascii: "-")),
            (Int(t.tm_mday), 2, UInt8(ascii: "T")), (Int(t.tm_hour), 2, UInt8(ascii: ":")),
            (Int(t.tm_min), 2, UInt8(ascii: ":")), (Int(t.tm_sec), 2, UInt8(ascii: ".")),
            (Int(now.tv_nsec) / 1_000_000, 3, UInt8(ascii: "Z")),
        ]
        return String(unsafeUninitializedCapacity: 24) { out in
            var i = 0
            for field in fields {
                var value = field.value
                for position in stride(from: field.digits - 1, through: 0, by: -1) {
                    out[i + position] = UInt8(ascii: "0") + UInt8(value % 10)
                    value /= 10
                }
                i += field.digits
                out[i] = field.after
                i += 1
            }
            return i
        }
    }
}

/// syslog, syslog_ident and syslog_facility: log lines also go to syslog (openlog is one per
/// process, so this is too). Changed at start and by SET and RELOAD.
public final class SyslogOutput: @unchecked Sendable {
    public static let shared = SyslogOutput()
    private let lock = NSLock()
    /// openlog keeps the pointer: the ident lives as long as it is in use.
    private var ident: UnsafeMutablePointer<CChar>?

    public func configure(enabled: Bool, ident name: String, facility: SyslogFacility) {
        lock.lock()
        defer { lock.unlock() }
        if ident != nil {
            closelog()
            free(ident)
            ident = nil
        }
        guard enabled else { return }
        ident = strdup(name)
        openlog(ident, LOG_PID, Self.code(facility))
    }

    func send(_ level: Logger.Level, _ message: String) {
        lock.lock()
        defer { lock.unlock() }
        guard ident != nil else { return }
        let priority: Int32 =
            switch level {
            case .trace, .debug: LOG_DEBUG
            case .info: LOG_INFO
            case .notice: LOG_NOTICE
            case .warning: LOG_WARNING
            case .error: LOG_ERR
            case .critical: LOG_CRIT
            }
        message.withCString { text in
            withVaList([text]) { vsyslog(priority, "%s", $0) }
        }
    }

    static func code(_ facility: SyslogFacility) -> Int32 {
        switch facility {
        case .auth: LOG_AUTH
        case .authpriv: LOG_AUTHPRIV
        case .daemon: LOG_DAEMON
        case .user: LOG_USER
        case .local0: LOG_LOCAL0
        case .local1: LOG_LOCAL1
        case .local2: LOG_LOCAL2
        case .local3: LOG_LOCAL3
        case .local4: LOG_LOCAL4
        case .local5: LOG_LOCAL5
        case .local6: LOG_LOCAL6
        case .local7: LOG_LOCAL7
        }
    }
}
