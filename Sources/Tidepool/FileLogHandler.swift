import Foundation
import Logging

/// A log handler writing PgBouncer-style lines (`time [pid] LEVEL message`) to a file or stderr.
public struct LineLogHandler: LogHandler {
    final class Sink: @unchecked Sendable {
        let handle: FileHandle
        let lock = NSLock()
        init(handle: FileHandle) { self.handle = handle }
        func write(_ line: String) {
            lock.lock()
            defer { lock.unlock() }
            handle.write(Data(line.utf8))
        }
    }

    let sink: Sink
    let label: String
    public var logLevel: Logger.Level = .info
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

    public func log(event: LogEvent) {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        var line = "\(formatter.string(from: Date())) [\(ProcessInfo.processInfo.processIdentifier)] "
        line += "\(event.level.rawValue.uppercased()) \(event.message)"
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        if !merged.isEmpty {
            line += " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        sink.write(line + "\n")
    }
}
