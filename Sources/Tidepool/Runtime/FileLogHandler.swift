import Foundation
import Logging
import Synchronization

/// A log handler writing PgBouncer-style lines (`time [pid] LEVEL message`) to a file or stderr.
public struct LineLogHandler: LogHandler {
    final class Sink: @unchecked Sendable {
        let handle: FileHandle
        let lock = NSLock()
        /// The level of every logger writing here, so that SET verbose and RELOAD change them all.
        let level = Atomic<Int>(Sink.levels.firstIndex(of: .info)!)
        static let levels = Logger.Level.allCases
        init(handle: FileHandle) { self.handle = handle }
        func write(_ line: String) {
            lock.lock()
            defer { lock.unlock() }
            handle.write(Data(line.utf8))
        }
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
        let handle: FileHandle
        if let path {
            if !FileManager.default.fileExists(atPath: path) {
                _ = FileManager.default.createFile(atPath: path, contents: nil)
            }
            guard let h = FileHandle(forWritingAtPath: path) else {
                throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: path])
            }
            h.seekToEndOfFile()
            handle = h
        } else {
            handle = FileHandle.standardError
        }
        let sink = Sink(handle: handle)
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
        var line = "\(Self.timestamp()) [\(Self.pid)] "
        line += "\(event.level.rawValue.uppercased()) \(event.message)"
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        if !merged.isEmpty {
            line += " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        sink.write(line + "\n")
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
