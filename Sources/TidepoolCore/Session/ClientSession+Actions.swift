extension ClientSession {
    /// The actions of one event (and of the events carried out inside it), kept in a buffer that
    /// is reused: emptying it only resets a count, since an action holds nothing to release.
    public struct Actions: RandomAccessCollection, Sendable {
        @usableFromInline var storage: [Action] = []
        @usableFromInline var count_ = 0

        public var endIndex: Int { count_ }

        public init() {}

        public var startIndex: Int { 0 }

        @inlinable
        public subscript(position: Int) -> Action { storage[position] }

        @inlinable @inline(__always)
        public mutating func append(_ action: Action) {
            if count_ < storage.count {
                storage[count_] = action
            } else {
                storage.append(action)
            }
            count_ += 1
        }

        /// Empties the buffer. Its storage is kept for the next event, unless a long batch (a login)
        /// made it larger than a transaction needs: an idle client does not carry that.
        @inlinable
        public mutating func removeAll() {
            count_ = 0
            if storage.count > 4 { storage = [] }
        }
    }
}
