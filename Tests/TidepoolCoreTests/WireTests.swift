import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct StartupPacketTests {
    func packet(_ build: (inout ByteBuffer) -> Void) -> ByteBuffer {
        var b = ByteBuffer()
        build(&b)
        return b
    }

    @Test func parsesStartupParameters() throws {
        var b = packet {
            Wire.startupMessage(
                parameters: [("user", "alice"), ("database", "db1"), ("application_name", "x")], into: &$0)
        }
        let parsed = try StartupPacket.parse(from: &b)
        #expect(
            parsed
                == .startup(
                    minorVersion: 0, parameters: ["user": "alice", "database": "db1", "application_name": "x"],
                    unrecognizedOptions: []))
        #expect(b.readableBytes == 0)
    }

    @Test func incompletePacketConsumesNothing() throws {
        let full = packet { Wire.startupMessage(parameters: [("user", "alice")], into: &$0) }
        var partial = full.getSlice(at: 0, length: full.readableBytes - 3)!
        #expect(try StartupPacket.parse(from: &partial) == nil)
        #expect(partial.readableBytes == full.readableBytes - 3)
        var tiny = ByteBuffer(bytes: [0, 0])
        #expect(try StartupPacket.parse(from: &tiny) == nil)
    }

    @Test func sslGssAndCancelRequests() throws {
        var ssl = packet { Wire.sslRequest(into: &$0) }
        #expect(try StartupPacket.parse(from: &ssl) == .sslRequest)
        var gss = ByteBuffer()
        gss.writeInteger(Int32(8))
        gss.writeInteger(Int32(80_877_104))
        #expect(try StartupPacket.parse(from: &gss) == .gssEncRequest)
        var cancel = packet { Wire.cancelRequest(processID: 42, secretKey: -7, into: &$0) }
        #expect(try StartupPacket.parse(from: &cancel) == .cancel(processID: 42, secretKey: -7))
    }

    @Test func rejectsLyingLengths() {
        for length: Int32 in [-1, 0, 3, 7] {
            var b = ByteBuffer()
            b.writeInteger(length)
            b.writeInteger(Int32(196608))
            #expect(throws: WireError.invalidLength(Int(length))) { try StartupPacket.parse(from: &b) }
        }
        var huge = ByteBuffer()
        huge.writeInteger(Int32(1_000_000))
        #expect(throws: WireError.invalidLength(1_000_000)) { try StartupPacket.parse(from: &huge) }
    }

    @Test func rejectsWrongProtocolAndMalformedParameters() {
        var v2 = ByteBuffer()
        v2.writeInteger(Int32(8))
        v2.writeInteger(Int32(2 << 16))
        #expect(throws: WireError.unsupportedProtocol(major: 2, minor: 0)) { try StartupPacket.parse(from: &v2) }
        // A name without a value.
        var bad = ByteBuffer()
        bad.writeInteger(Int32(4 + 4 + 5))
        bad.writeInteger(Int32(3 << 16))
        bad.writeBytes(Array("user".utf8) + [0])
        #expect(throws: WireError.malformed("startup parameter user has no value")) {
            try StartupPacket.parse(from: &bad)
        }
    }

    @Test func newerMinorVersionAndProtocolOptionsAreReported() throws {
        var b = ByteBuffer()
        Wire.withMessage(nil, into: &b) {
            $0.writeInteger(Int32(3 << 16 | 2))
            $0.writeNullTerminatedString("user")
            $0.writeNullTerminatedString("u")
            $0.writeNullTerminatedString("_pq_.foo")
            $0.writeNullTerminatedString("1")
            $0.writeInteger(UInt8(0))
        }
        #expect(
            try StartupPacket.parse(from: &b)
                == .startup(minorVersion: 2, parameters: ["user": "u"], unrecognizedOptions: ["_pq_.foo"]))
    }
}

@Suite struct MessageScannerTests {
    func message(_ type: Character, _ body: [UInt8]) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt8(ascii: type.unicodeScalars.first!))
        b.writeInteger(Int32(4 + body.count))
        b.writeBytes(body)
        return Array(b.readableBytesView)
    }

    func classifyZ(_ t: UInt8) -> MessageDisposition { t == UInt8(ascii: "Z") ? .inspect : .forward }

    @Test func forwardsRunsAndStopsAtInspectedMessages() throws {
        let bytes =
            message("D", [1, 2, 3]) + message("C", Array("SELECT 1".utf8) + [0]) + message("Z", [73])
            + message("D", [9])
        var buffer = ByteBuffer(bytes: bytes)
        var scanner = MessageScanner()
        var seen: [UInt8] = []
        let first = try scanner.next(from: &buffer) {
            seen.append($0); return classifyZ($0)
        }
        guard case .forward(let run) = first else { Issue.record("expected a run"); return }
        #expect(run.readableBytes == 8 + 14)
        let second = try scanner.next(from: &buffer, classify: classifyZ)
        guard case .message(let type, let body, _) = second else { Issue.record("expected Z"); return }
        #expect(type == UInt8(ascii: "Z"))
        #expect(Array(body.readableBytesView) == [73])
        guard case .forward(let tail) = try scanner.next(from: &buffer, classify: classifyZ) else {
            Issue.record("tail"); return
        }
        #expect(tail.readableBytes == 6)
        #expect(try scanner.next(from: &buffer, classify: classifyZ) == nil)
        // Forwarded messages are classified exactly once.
        #expect(seen.filter { $0 == UInt8(ascii: "D") }.count == 1)
    }

    @Test func forwardsLargeMessagesInPiecesAsTheyArrive() throws {
        let big = message("D", Array(repeating: 7, count: 1000)) + message("Z", [73])
        var scanner = MessageScanner()
        var forwarded = 0
        var sawReady = false
        var stash = ByteBuffer()
        for start in stride(from: 0, to: big.count, by: 100) {
            stash.writeBytes(big[start..<min(start + 100, big.count)])
            while let chunk = try scanner.next(from: &stash, classify: classifyZ) {
                switch chunk {
                case .forward(let b): forwarded += b.readableBytes
                case .message: sawReady = true
                case .head: Issue.record("no head was asked for")
                }
            }
        }
        #expect(forwarded == 1005)
        #expect(sawReady)
        #expect(scanner.atMessageBoundary)
    }

    @Test func splitHeaderWaitsForMoreBytes() throws {
        var scanner = MessageScanner()
        var buffer = ByteBuffer(bytes: [UInt8(ascii: "Z"), 0, 0])
        #expect(try scanner.next(from: &buffer, classify: classifyZ) == nil)
        #expect(buffer.readableBytes == 3)
    }

    @Test func rejectsBadLengthsAndOversizeMessages() {
        var scanner = MessageScanner(maxMessageLength: 100)
        var negative = ByteBuffer(bytes: [UInt8(ascii: "Q"), 0xFF, 0xFF, 0xFF, 0xFF])
        #expect(throws: WireError.invalidLength(-1)) { try scanner.next(from: &negative, classify: { _ in .forward }) }
        var short = ByteBuffer(bytes: [UInt8(ascii: "Q"), 0, 0, 0, 3])
        #expect(throws: WireError.invalidLength(3)) { try scanner.next(from: &short, classify: { _ in .forward }) }
        var huge = ByteBuffer(bytes: message("Q", Array(repeating: 1, count: 200)))
        #expect(throws: WireError.messageTooLarge(204, limit: 100)) {
            try scanner.next(from: &huge, classify: { _ in .forward })
        }
    }
}

extension MessageScanner.Chunk: Equatable {
    public static func == (a: Self, b: Self) -> Bool {
        switch (a, b) {
        case (.forward(let x), .forward(let y)): return x == y
        case (.message(let t1, let b1, _), .message(let t2, let b2, _)): return t1 == t2 && b1 == b2
        default: return false
        }
    }
}

@Suite struct BackendMessageTests {
    @Test func errorResponseRoundTrips() {
        var b = ByteBuffer()
        let error = PostgresError(
            severity: "FATAL", code: "28P01", message: "password authentication failed for user \"x\"", detail: "d",
            hint: "h")
        Wire.errorResponse(error, into: &b)
        #expect(b.readInteger(as: UInt8.self) == UInt8(ascii: "E"))
        let length = b.readInteger(as: Int32.self)!
        #expect(Int(length) == b.readableBytes + 4)
        #expect(WireDecode.errorFields(b) == error)
    }

    @Test func aNulInAFieldCannotForgeAnother() {
        var b = ByteBuffer()
        Wire.errorResponse(PostgresError(code: "58000", message: "no such user x\0C28000\0Mforged"), into: &b)
        b.moveReaderIndex(forwardBy: 5)
        let fields = WireDecode.errorFields(b)
        #expect(fields.code == "58000")
        #expect(fields.message == "no such user xC28000Mforged")
    }

    @Test func readyForQueryAndParameterStatus() {
        var b = ByteBuffer()
        Wire.readyForQuery(.inTransaction, into: &b)
        #expect(Array(b.readableBytesView) == [UInt8(ascii: "Z"), 0, 0, 0, 5, UInt8(ascii: "T")])
        var p = ByteBuffer()
        Wire.parameterStatus("TimeZone", "UTC", into: &p)
        p.moveReaderIndex(forwardBy: 5)
        #expect(WireDecode.parameterStatus(p)! == ("TimeZone", "UTC"))
    }
}

@Suite struct ReceiveBufferSizerTests {
    /// Records a read; true when the sizer says the next buffer may be larger.
    func grow(_ sizer: inout ReceiveBufferSizer, _ bytes: Int) -> Bool { sizer.record(actualReadBytes: bytes) }

    @Test func startsAtAPowerOfTwoWithinTheBounds() {
        #expect(ReceiveBufferSizer(initial: 128).capacity == 128)
        #expect(ReceiveBufferSizer(initial: 200).capacity == 128)
        #expect(ReceiveBufferSizer(initial: 1).capacity == ReceiveBufferSizer.minimum)
        #expect(ReceiveBufferSizer(initial: 1 << 20).capacity == ReceiveBufferSizer.maximum)
        #expect(ReceiveBufferSizer(initial: 128).buffer(allocator: ByteBufferAllocator()).capacity >= 128)
        #expect(ReceiveBufferSizer(initial: 128).nextBufferSize() == 128)
    }

    @Test func aFullReadDoublesTheBufferUpToTheMaximum() {
        var sizer = ReceiveBufferSizer(initial: 128)
        #expect(grow(&sizer, 128) == true)
        #expect(sizer.capacity == 256)
        while sizer.capacity < ReceiveBufferSizer.maximum {
            #expect(grow(&sizer, sizer.capacity) == true)
        }
        #expect(grow(&sizer, ReceiveBufferSizer.maximum) == false)
        #expect(sizer.capacity == ReceiveBufferSizer.maximum)
    }

    /// pkt_buf: the ceiling, rounded down to a power of two, above or below the default.
    @Test func pktBufIsTheCeiling() {
        for (pktBuf, ceiling) in [(4096, 4096), (5000, 4096), (1 << 20, 1 << 20), (10, ReceiveBufferSizer.minimum)] {
            var sizer = ReceiveBufferSizer(initial: 128, maximum: pktBuf)
            for _ in 0..<30 { _ = grow(&sizer, sizer.capacity) }
            #expect(sizer.capacity == ceiling)
        }
        #expect(ReceiveBufferSizer(initial: 8192, maximum: 4096).capacity == 4096)
        // Still stored inline in the channel's existential (three words), not boxed.
        #expect(MemoryLayout<ReceiveBufferSizer>.size <= 3 * MemoryLayout<Int>.size)
    }

    @Test func twoSmallReadsInARowHalveItDownToTheMinimum() {
        var sizer = ReceiveBufferSizer(initial: 256)
        #expect(grow(&sizer, 100) == false)
        #expect(sizer.capacity == 256)
        #expect(grow(&sizer, 100) == false)
        #expect(sizer.capacity == 128)
        // A read between half and full resets the count.
        #expect(grow(&sizer, 10) == false)
        #expect(grow(&sizer, 100) == false)
        #expect(grow(&sizer, 10) == false)
        #expect(sizer.capacity == 128)
        #expect(grow(&sizer, 10) == false)
        #expect(sizer.capacity == 64)
        #expect(grow(&sizer, 0) == false)
        #expect(grow(&sizer, 0) == false)
        #expect(sizer.capacity == ReceiveBufferSizer.minimum)
    }

    @Test func itIsStoredInlineInAnExistential() {
        // NIO keeps the allocator as `any RecvByteBufferAllocator`: up to three words are stored
        // inline; anything larger costs every client a boxed copy.
        #expect(MemoryLayout<ReceiveBufferSizer>.size <= 3 * MemoryLayout<Int>.size)
    }
}

@Suite struct KeptBytesTests {
    @Test func keptBytesGoInFrontOfTheNextRead() {
        var kept = KeptBytes()
        var first = ByteBuffer(bytes: [1, 2, 3])
        first.moveReaderIndex(forwardBy: 1)
        kept.keep(&first)
        #expect(first.readableBytes == 0)
        var second = ByteBuffer(bytes: [4])
        kept.keep(&second)
        var next = ByteBuffer(bytes: [5, 6])
        kept.prepend(to: &next)
        #expect(kept.isEmpty)
        #expect(next.readableBytesView.elementsEqual([2, 3, 4, 5, 6]))
        var empty = ByteBuffer()
        kept.keep(&empty)
        #expect(kept.isEmpty, "nothing left, nothing kept")
    }
}

@Suite struct NegotiateProtocolVersionTests {
    /// The version is the whole number (3.0 is 0x30000), then the options not understood.
    @Test func carriesTheWholeVersionAndTheUnknownOptions() {
        var out = ByteBuffer()
        Wire.negotiateProtocolVersion(minor: 0, unrecognized: ["_pq_.x"], into: &out)
        #expect(out.readInteger(as: UInt8.self) == MessageType.negotiateProtocolVersion)
        #expect(out.readInteger(as: Int32.self) == Int32(out.readableBytes + 4))
        #expect(out.readInteger(as: Int32.self) == 0x3_0000)
        #expect(out.readInteger(as: Int32.self) == 1)
        #expect(out.readNullTerminatedString() == "_pq_.x")
    }
}
