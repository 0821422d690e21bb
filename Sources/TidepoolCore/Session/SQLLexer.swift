#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// PostgreSQL's lexical rules, as far as the session-state classifier needs them: tokens are
/// positions in the bytes, and text is made only for the few tokens a decision reads.
struct SQLLexer {
    enum Kind: UInt8 {
        case word
        case quotedWord
        case string
        case number
        case parameter
        case symbol
        case end
    }

    struct Token {
        var kind: Kind
        var start: Int
        var end: Int
        /// An `E''` string: backslash escapes apply.
        var escapes = false
        /// A dollar-quoted string: the length of `$tag$`.
        var dollarTag = 0

        func isSymbol(_ c: UInt8) -> Bool { kind == .symbol && end - start == 1 && c == symbolByte }
        func isSymbol(_ c: Unicode.Scalar) -> Bool { isSymbol(UInt8(c.value)) }
        var symbolByte: UInt8 = 0

        /// A keyword, compared without regard to case (`keyword` in lower case).
        @inline(__always)
        func isWord(_ keyword: StaticString, in lexer: SQLLexer) -> Bool {
            guard kind == .word, end - start == keyword.utf8CodeUnitCount else { return false }
            let k = keyword.utf8Start
            for offset in 0..<(end - start) where lexer.bytes[start + offset] | 0x20 != k[offset] {
                return false
            }
            return true
        }
    }

    struct Argument {
        /// The value of a string or number literal (a cast after it is ignored); nil otherwise.
        var literal: String?
    }

    let bytes: UnsafeRawBufferPointer
    var position = 0
    /// The text is one statement (a Parse's): no `;` needs looking for.
    var oneStatement = false

    init(_ bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
        // A Query's text ends with a NUL.
        var count = bytes.count
        while count > 0, bytes[count - 1] == 0 { count -= 1 }
        self.count = count
    }

    let count: Int

    /// Anything but whitespace and comments left.
    var hasMore: Bool {
        mutating get {
            skipSpace()
            return position < count
        }
    }

    @inline(__always)
    static func isWordStart(_ b: UInt8) -> Bool {
        (b | 0x20) &- 0x61 < 26 || b == 0x5F || b >= 0x80
    }

    @inline(__always)
    static func isWordPart(_ b: UInt8) -> Bool {
        isWordStart(b) || b &- 0x30 < 10 || b == 0x24
    }

    mutating func skipSpace() {
        while position < count {
            let b = bytes[position]
            if b == 0x20 || (b >= 0x09 && b <= 0x0D) {
                position += 1
            } else if b == 0x2D, position + 1 < count, bytes[position + 1] == 0x2D {
                // -- to the end of the line
                position += 2
                while position < count, bytes[position] != 0x0A { position += 1 }
            } else if b == 0x2F, position + 1 < count, bytes[position + 1] == 0x2A {
                // /* */, nested
                position += 2
                var depth = 1
                while position < count, depth > 0 {
                    if bytes[position] == 0x2A, position + 1 < count, bytes[position + 1] == 0x2F {
                        depth -= 1
                        position += 2
                    } else if bytes[position] == 0x2F, position + 1 < count, bytes[position + 1] == 0x2A {
                        depth += 1
                        position += 2
                    } else {
                        position += 1
                    }
                }
            } else {
                return
            }
        }
    }

    mutating func next() -> Token {
        skipSpace()
        let start = position
        guard position < count else { return Token(kind: .end, start: count, end: count) }
        let b = bytes[position]
        if b == 0x27 {  // '
            position += 1
            skipQuoted(0x27, backslash: false)
            return Token(kind: .string, start: start, end: position)
        }
        if b == 0x22 {  // "
            position += 1
            skipQuoted(0x22, backslash: false)
            return Token(kind: .quotedWord, start: start, end: position)
        }
        if Self.isWordStart(b) {
            position += 1
            if position < count, bytes[position] == 0x27 {
                // E'', B'', X'', N'': a string with a prefix.
                let escapes = b | 0x20 == 0x65
                position += 1
                skipQuoted(0x27, backslash: escapes)
                return Token(kind: .string, start: start, end: position, escapes: escapes)
            }
            while position < count, Self.isWordPart(bytes[position]) { position += 1 }
            return Token(kind: .word, start: start, end: position)
        }
        if b &- 0x30 < 10 || (b == 0x2E && position + 1 < count && bytes[position + 1] &- 0x30 < 10) {
            position += 1
            while position < count, Self.isWordPart(bytes[position]) || bytes[position] == 0x2E { position += 1 }
            return Token(kind: .number, start: start, end: position)
        }
        if b == 0x24 {  // $
            position += 1
            if position < count, bytes[position] &- 0x30 < 10 {
                while position < count, bytes[position] &- 0x30 < 10 { position += 1 }
                return Token(kind: .parameter, start: start, end: position)
            }
            // $tag$ ... $tag$
            var tagEnd = position
            while tagEnd < count, Self.isWordPart(bytes[tagEnd]), bytes[tagEnd] != 0x24 { tagEnd += 1 }
            if tagEnd < count, bytes[tagEnd] == 0x24 {
                let tagLength = tagEnd + 1 - start
                position = tagEnd + 1
                while position < count {
                    if bytes[position] == 0x24, position + tagLength <= count,
                        (0..<tagLength).allSatisfy({ bytes[position + $0] == bytes[start + $0] })
                    {
                        position += tagLength
                        break
                    }
                    position += 1
                }
                return Token(kind: .string, start: start, end: position, dollarTag: tagLength)
            }
        } else {
            position += 1
        }
        var t = Token(kind: .symbol, start: start, end: start + 1)
        t.symbolByte = b
        return t
    }

    /// Past the closing `quote` (doubled quotes stay inside; with `backslash`, escaped ones too).
    mutating func skipQuoted(_ quote: UInt8, backslash: Bool) {
        while position < count {
            let c = bytes[position]
            position += 1
            if backslash, c == 0x5C {
                position += 1
            } else if c == quote {
                if position < count, bytes[position] == quote {
                    position += 1
                } else {
                    return
                }
            }
        }
        position = min(position, count)
    }

    /// Whether the next token is the symbol `c`, without taking it.
    mutating func peekSymbol(_ c: Unicode.Scalar) -> Bool {
        skipSpace()
        return position < count && bytes[position] == UInt8(c.value)
    }

    /// Past the statement's `;` (or to the end).
    mutating func skipStatement() {
        var t = next()
        while t.kind != .end, !t.isSymbol(";") { t = next() }
    }

    func text(_ t: Token) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[t.start..<t.end]), as: UTF8.self)
    }

    /// A word in lower case (ASCII letters only, as PostgreSQL folds identifiers).
    func lowercased(_ t: Token) -> String {
        guard t.kind == .word else { return text(t) }
        return String(
            unsafeUninitializedCapacity: t.end - t.start,
            initializingUTF8With: { out in
                for offset in 0..<(t.end - t.start) {
                    let b = bytes[t.start + offset]
                    out[offset] = b &- 0x41 < 26 ? b | 0x20 : b
                }
                return t.end - t.start
            })
    }

    /// A name as PostgreSQL reads it: folded, or as quoted.
    func identifier(_ t: Token) -> String {
        switch t.kind {
        case .word: lowercased(t)
        case .quotedWord: unquoted(t, quote: 0x22)
        case .string: stringValue(t)
        default: text(t)
        }
    }

    func unquoted(_ t: Token, quote: UInt8) -> String {
        var out: [UInt8] = []
        var i = t.start + 1
        let end = t.end - 1
        while i < end {
            let c = bytes[i]
            out.append(c)
            i += c == quote && i + 1 < end && bytes[i + 1] == quote ? 2 : 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// A string literal's value.
    func stringValue(_ t: Token) -> String {
        guard t.kind == .string else { return text(t) }
        if t.dollarTag > 0 {
            let from = t.start + t.dollarTag
            let to = max(from, t.end - t.dollarTag)
            return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[from..<to]), as: UTF8.self)
        }
        // Skip a prefix letter (E'', N'').
        var start = t.start
        while start < t.end, bytes[start] != 0x27 { start += 1 }
        guard t.escapes else { return unquoted(Token(kind: .string, start: start, end: t.end), quote: 0x27) }
        var out: [UInt8] = []
        var i = start + 1
        let end = t.end - 1
        while i < end {
            var c = bytes[i]
            if c == 0x5C, i + 1 < end {
                i += 1
                switch bytes[i] {
                case 0x6E: c = 0x0A
                case 0x74: c = 0x09
                case 0x72: c = 0x0D
                case 0x62: c = 0x08
                case 0x66: c = 0x0C
                default: c = bytes[i]
                }
            } else if c == 0x27, i + 1 < end, bytes[i + 1] == 0x27 {
                i += 1
            }
            out.append(c)
            i += 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The tokens up to the statement's end, as SQL text with single spaces between them (so that
    /// comments are dropped and the text can be sent again among other statements).
    mutating func valueText() -> String {
        var parts: [String] = []
        var t = next()
        while t.kind != .end, !t.isSymbol(";") {
            parts.append(text(t))
            t = next()
        }
        return parts.joined(separator: " ")
    }

    /// A setting's name from its first token: folded or as quoted, with a custom parameter's
    /// `prefix.name` parts joined.
    mutating func settingName(_ first: Token) -> String {
        var name = identifier(first)
        while peekSymbol(".") {
            _ = next()
            name += "." + identifier(next())
        }
        return name
    }

    /// After a function's `(`: its arguments, to the matching `)`.
    mutating func arguments() -> [Argument] {
        var arguments: [Argument] = []
        var depth = 0
        var tokens: [Token] = []
        func close(_ lexer: SQLLexer) {
            var literal: String? = nil
            var sign = ""
            var rest = tokens[...]
            if let first = rest.first, first.isSymbol("-") || first.isSymbol("+") {
                sign = first.isSymbol("-") ? "-" : ""
                rest = rest.dropFirst()
            }
            if let value = rest.first, value.kind == .word, rest.count == 1 {
                // true, false, on, off
                let word = lexer.lowercased(value)
                if ["true", "false", "on", "off"].contains(word) { literal = word }
            } else if let value = rest.first, value.kind == .string || value.kind == .number {
                let cast = rest.dropFirst()
                // 42, '42', 42::bigint
                if cast.isEmpty || (cast.count >= 3 && cast.first!.isSymbol(":")) {
                    literal = value.kind == .string ? lexer.stringValue(value) : sign + lexer.text(value)
                    if value.kind == .string, !sign.isEmpty { literal = nil }
                }
            }
            arguments.append(Argument(literal: literal))
            tokens.removeAll()
        }
        while true {
            let t = next()
            if t.kind == .end { return arguments }
            if t.isSymbol(";") {
                position = t.start  // the statement ends here: leave it to the caller
                return arguments
            }
            if t.isSymbol("(") {
                depth += 1
            } else if t.isSymbol(")") {
                if depth == 0 {
                    if !tokens.isEmpty || !arguments.isEmpty { close(self) }
                    return arguments
                }
                depth -= 1
            } else if t.isSymbol(","), depth == 0 {
                close(self)
                continue
            }
            tokens.append(t)
        }
    }
}

extension UnsafeRawBufferPointer {
    /// The index of the first `byte` in `from..<to` (to the end by default), found with memchr.
    func index(of byte: UInt8, from: Int, to: Int? = nil) -> Int? {
        let end = to ?? count
        guard let base = baseAddress, from < end, let hit = memchr(base + from, Int32(byte), end - from) else {
            return nil
        }
        return base.distance(to: UnsafeRawPointer(hit))
    }
}
