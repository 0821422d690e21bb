import NIOCore

/// Whether a handler passes its channel's read requests on. A read asked for while something holds
/// reads waits here until nothing does. One type for both ends of a link.
struct ReadGate {
    struct Holds: OptionSet {
        let rawValue: UInt8
        /// The client's session paused this side (`ClientSession.settleReads`).
        static let session = Holds(rawValue: 1)
        /// A server's bytes handed to a client on another loop are past max_buffered_bytes.
        static let handOff = Holds(rawValue: 2)
    }

    private(set) var holds: Holds = []
    private var wanted = false

    /// The channel asks for a read.
    mutating func read(_ context: ChannelHandlerContext) {
        if holds.isEmpty { context.read() } else { wanted = true }
    }

    mutating func hold(_ hold: Holds) { holds = Holds(rawValue: holds.rawValue | hold.rawValue) }

    /// Lets go of `hold`; a read that waited goes ahead once nothing holds reads.
    mutating func release(_ hold: Holds, _ context: ChannelHandlerContext?) {
        holds = Holds(rawValue: holds.rawValue & ~hold.rawValue)
        if wanted, holds.isEmpty, let context {
            wanted = false
            context.read()
        }
    }
}
