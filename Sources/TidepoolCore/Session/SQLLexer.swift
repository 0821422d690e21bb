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
        /// How a string's text is read: backslash escapes (`E''`, or `''` with
        /// standard_conforming_strings off), Unicode escapes (`U&''`), parts joined across newlines.
        var escapes = false
        var unicode = false
        var continued = false
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
    /// standard_conforming_strings as the session has it: off, a backslash escapes in `''` too.
    let standardStrings: Bool

    init(_ bytes: UnsafeRawBufferPointer, standardStrings: Bool = true) {
        self.bytes = bytes
        self.standardStrings = standardStrings
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

    /// PostgreSQL 15's white space: space, tab, newline, carriage return, form feed (not \v).
    @inline(__always)
    static func isSpace(_ b: UInt8) -> Bool {
        b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D || b == 0x0C
    }

    @inline(__always)
    static func isNewline(_ b: UInt8) -> Bool { b == 0x0A || b == 0x0D }

    /// Past a `--` comment at `position`: it ends at a newline or a carriage return, as
    /// PostgreSQL's scanner ends it.
    mutating func skipLineComment() {
        position += 2
        while position < count, !Self.isNewline(bytes[position]) { position += 1 }
    }

    mutating func skipSpace() {
        while position < count {
            let b = bytes[position]
            if Self.isSpace(b) {
                position += 1
            } else if b == 0x2D, position + 1 < count, bytes[position + 1] == 0x2D {
                skipLineComment()
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
            return string(from: start, quoteAt: start, escapes: !standardStrings)
        }
        if b == 0x22 {  // "
            position += 1
            skipQuoted(0x22, backslash: false)
            return Token(kind: .quotedWord, start: start, end: position)
        }
        if Self.isWordStart(b) {
            if position + 1 < count, bytes[position + 1] == 0x27 {
                // E'' (backslash escapes), B'' and X'' (bits, no escapes). N'' is the word N and
                // a plain string, as PostgreSQL's scanner has it.
                switch b | 0x20 {
                case 0x65: return string(from: start, quoteAt: start + 1, escapes: true)
                case 0x62, 0x78: return string(from: start, quoteAt: start + 1, escapes: false, doubled: false)
                default: break
                }
            }
            if b | 0x20 == 0x75, position + 2 < count, bytes[position + 1] == 0x26, bytes[position + 2] == 0x27 {
                // U&'': Unicode escapes, read after the scanner; backslash does not end it.
                var t = string(from: start, quoteAt: start + 2, escapes: false)
                t.unicode = true
                return t
            }
            position += 1
            while position < count, Self.isWordPart(bytes[position]) { position += 1 }
            return Token(kind: .word, start: start, end: position)
        }
        if b &- 0x30 < 10 || (b == 0x2E && position + 1 < count && bytes[position + 1] &- 0x30 < 10) {
            number()
            return Token(kind: .number, start: start, end: position)
        }
        if b == 0x24 {  // $
            position += 1
            if position < count, bytes[position] &- 0x30 < 10 {
                while position < count, bytes[position] &- 0x30 < 10 { position += 1 }
                return Token(kind: .parameter, start: start, end: position)
            }
            // $tag$ ... $tag$ (a tag starts as a name does)
            var tagEnd = position
            if tagEnd < count, Self.isWordStart(bytes[tagEnd]) {
                while tagEnd < count, Self.isWordPart(bytes[tagEnd]), bytes[tagEnd] != 0x24 { tagEnd += 1 }
            }
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
            // `..` is one token, so `..2` is no `.2`.
            if b == 0x2E, position < count, bytes[position] == 0x2E {
                position += 1
                return Token(kind: .symbol, start: start, end: position)
            }
        }
        var t = Token(kind: .symbol, start: start, end: start + 1)
        t.symbolByte = b
        return t
    }

    /// A number as PostgreSQL reads it: digits, a fraction (`1.` but not `1..`), an exponent
    /// with its sign (`1.5e+3`). Letters straight after are PostgreSQL 15's "trailing junk"
    /// error, taken into the token.
    mutating func number() {
        func digits() { while position < count, bytes[position] &- 0x30 < 10 { position += 1 } }
        digits()
        if position < count, bytes[position] == 0x2E, !(position + 1 < count && bytes[position + 1] == 0x2E) {
            position += 1
            digits()
        }
        if position < count, bytes[position] | 0x20 == 0x65 {
            var p = position + 1
            if p < count, bytes[p] == 0x2B || bytes[p] == 0x2D { p += 1 }
            if p < count, bytes[p] &- 0x30 < 10 {
                position = p
                digits()
            }
        }
        if position < count, Self.isWordStart(bytes[position]) {
            while position < count, Self.isWordPart(bytes[position]) { position += 1 }
        }
    }

    /// A quoted string whose first quote is at `quoteAt`, with the parts PostgreSQL joins to it:
    /// another quote after white space holding a newline (`'a'\n'b'` is `'ab'`).
    /// In bit strings (`doubled` false) `''` is no quote inside: it ends one and starts another.
    mutating func string(from start: Int, quoteAt: Int, escapes: Bool, doubled: Bool = true) -> Token {
        var t = Token(kind: .string, start: start, end: start, escapes: escapes)
        position = quoteAt + 1
        while true {
            if doubled {
                skipQuoted(0x27, backslash: escapes)
            } else {
                while position < count, bytes[position] != 0x27 { position += 1 }
                position = min(position + 1, count)
            }
            guard let next = continuation(at: position) else { break }
            t.continued = true
            position = next + 1
        }
        t.end = position
        return t
    }

    /// Where a string's next part starts (its quote), if one follows `at`: horizontal space or
    /// `--` comments, a newline, then space and comments ending in newlines.
    func continuation(at: Int) -> Int? {
        var p = at
        var sawNewline = false
        while p < count {
            let c = bytes[p]
            if c == 0x27 { return sawNewline ? p : nil }
            if Self.isNewline(c) {
                sawNewline = true
                p += 1
            } else if c == 0x20 || c == 0x09 || c == 0x0C {
                p += 1
            } else if c == 0x2D, p + 1 < count, bytes[p + 1] == 0x2D {
                p += 2
                while p < count, !Self.isNewline(bytes[p]) { p += 1 }
                // After the first newline a comment must end in another.
                if sawNewline, p >= count { return nil }
            } else {
                return nil
            }
        }
        return nil
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
        return String(decoding: stringBytes(t) ?? [], as: UTF8.self)
    }

    /// A quoted string's value as bytes: its parts joined, `''` and the escapes of its kind read.
    /// Nil where the pooler does not read it to the letter (`U&''` with a surrogate pair or a bad
    /// escape): PostgreSQL then decides.
    func stringBytes(_ t: Token) -> [UInt8]? {
        var out: [UInt8] = []
        var i = t.start
        while i < t.end, bytes[i] != 0x27 { i += 1 }  // past a prefix (E, N, B, X, U&)
        i += 1
        func hex(_ from: Int, _ n: Int) -> UInt32? {
            guard from + n <= t.end else { return nil }
            var v: UInt32 = 0
            for k in 0..<n {
                let c = bytes[from + k] | 0x20
                guard let d = c &- 0x30 < 10 ? c &- 0x30 : (c &- 0x61 < 6 ? c &- 0x61 + 10 : nil) else { return nil }
                v = v << 4 | UInt32(d)
            }
            return v
        }
        func append(scalar v: UInt32) -> Bool {
            guard let scalar = Unicode.Scalar(v), v != 0 else { return false }
            out.append(contentsOf: Array(String(Character(scalar)).utf8))
            return true
        }
        while i < t.end {
            let c = bytes[i]
            if c == 0x27 {
                if i + 1 < t.end, bytes[i + 1] == 0x27 {
                    out.append(0x27)
                    i += 2
                    continue
                }
                // The end of a part: the next starts at the next quote.
                guard let next = continuation(at: i + 1), next < t.end else { break }
                i = next + 1
                continue
            }
            if c == 0x5C, t.unicode {
                if i + 1 < t.end, bytes[i + 1] == 0x5C {
                    out.append(0x5C)
                    i += 2
                } else if i + 1 < t.end, bytes[i + 1] == 0x2B, let v = hex(i + 2, 6) {
                    guard append(scalar: v) else { return nil }
                    i += 8
                } else if let v = hex(i + 1, 4) {
                    guard append(scalar: v) else { return nil }
                    i += 5
                } else {
                    return nil
                }
                continue
            }
            if c == 0x5C, t.escapes, i + 1 < t.end {
                let e = bytes[i + 1]
                i += 2
                switch e {
                case 0x62: out.append(0x08)
                case 0x66: out.append(0x0C)
                case 0x6E: out.append(0x0A)
                case 0x72: out.append(0x0D)
                case 0x74: out.append(0x09)
                case 0x30...0x37:
                    var v = UInt32(e - 0x30)
                    var n = 1
                    while n < 3, i < t.end, bytes[i] &- 0x30 < 8 {
                        v = v << 3 | UInt32(bytes[i] - 0x30)
                        i += 1
                        n += 1
                    }
                    out.append(UInt8(truncatingIfNeeded: v))
                case 0x78:
                    var v: UInt32 = 0
                    var n = 0
                    while n < 2, let d = hex(i, 1) {
                        v = v << 4 | d
                        i += 1
                        n += 1
                    }
                    if n == 0 { out.append(0x78) } else { out.append(UInt8(v)) }
                case 0x75, 0x55:
                    let n = e == 0x75 ? 4 : 8
                    guard let v = hex(i, n), append(scalar: v) else { return nil }
                    i += n
                default: out.append(e)
                }
                continue
            }
            out.append(c)
            i += 1
        }
        return out
    }

    /// A `U&''` string followed by UESCAPE: its escapes are not the ones `stringBytes` reads.
    func followedByUescape(_ t: Token) -> Bool {
        var after = self
        after.position = t.end
        let next = after.next()
        return next.isWord("uescape", in: after)
    }

    /// The tokens up to the statement's end as SQL to send again among other statements:
    /// PostgreSQL's own token text, adjacent tokens kept together and one space where white
    /// space or comments were. A quoted string whose reading depends on the session (backslashes,
    /// Unicode escapes, parts on several lines) is written as `E''` of its value, which reads the
    /// same whatever standard_conforming_strings the server has.
    mutating func valueText() -> String {
        var out = ""
        var previousEnd = -1
        var t = next()
        while t.kind != .end, !t.isSymbol(";") {
            if previousEnd >= 0, t.start != previousEnd { out += " " }
            out += replayText(t)
            previousEnd = t.end
            t = next()
        }
        return out
    }

    func replayText(_ t: Token) -> String {
        guard t.kind == .string, t.dollarTag == 0, bytes[t.start] | 0x20 != 0x62, bytes[t.start] | 0x20 != 0x78,
            t.escapes || t.unicode || t.continued || bytes.index(of: 0x5C, from: t.start, to: t.end) != nil,
            !(t.unicode && followedByUescape(t)), let value = stringBytes(t)
        else { return text(t) }
        var out: [UInt8] = [0x45, 0x27]
        for c in value {
            if c == 0x5C || c == 0x27 { out.append(c) }
            out.append(c)
        }
        out.append(0x27)
        return String(decoding: out, as: UTF8.self)
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
            } else if let value = rest.first, value.kind == .string || value.kind == .number,
                value.kind != .string || value.dollarTag > 0 || lexer.stringBytes(value) != nil
            {
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
