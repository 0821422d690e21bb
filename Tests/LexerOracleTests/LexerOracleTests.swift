import CPgQuery
import Foundation
import Testing

@testable import TidepoolCore

/// The pooler's SQL lexer against PostgreSQL 15's own scanner (libpg_query): on generated SQL
/// rich in what tells them apart (comments, quotes of every kind, escapes, dollar quotes, numbers,
/// line ends), both must put every token at the same bytes, so that they see the same statements.
/// Fixed seeds and a fixed count here; `LEXER_ORACLE_SECONDS` and `LEXER_ORACLE_SEED` make a
/// longer run with other inputs (scripts/lexer-oracle.sh).
@Suite struct LexerOracleTests {
    @Test func tokensAgreeWithPostgreSQLsScanner() throws {
        let seconds = ProcessInfo.processInfo.environment["LEXER_ORACLE_SECONDS"].flatMap(Double.init)
        var generator = SplitMix64(
            seed: ProcessInfo.processInfo.environment["LEXER_ORACLE_SEED"].flatMap(UInt64.init) ?? 30)
        let deadline = Date().addingTimeInterval(seconds ?? 0)
        var compared = 0
        var cases = 0
        while seconds == nil ? cases < 20_000 : Date() < deadline {
            cases += 1
            let sql = Self.generate(&generator)
            let standard = generator.next() % 4 != 0
            guard let expected = Self.postgresMap(sql, standardStrings: standard) else { continue }
            compared += 1
            let got = Self.lexerMap(sql, standardStrings: standard)
            if got != expected {
                Issue.record(
                    """
                    the lexer and PostgreSQL's scanner disagree (standard_conforming_strings \
                    \(standard ? "on" : "off")) on \(String(reflecting: sql))
                      PostgreSQL: \(Self.render(expected))
                      lexer:      \(Self.render(got))
                    """)
                return
            }
        }
        print("lexer oracle: \(compared) of \(cases) generated statements compared (the rest PostgreSQL refuses)")
        #expect(compared > cases / 3)
    }

    /// The cases the issue named, always checked.
    @Test func knownCases() {
        for (sql, standard) in [
            ("SELECT 1; -- note\rSET app.tenant = 't2'", true),
            ("SELECT 'x\\'; SET app.tenant = ''t3''; --'", false),
            ("SET statement_timeout = 1.5e+3", true),
            ("SET x.y = U&'d\\0061t\\+000061'", true),
            ("SELECT 'a'\n   'b', 1..2, ..5, $1, $a$ ' $a$", true),
            ("SELECT\u{0B}1", true),
        ] {
            #expect(Self.lexerMap(sql, standardStrings: standard) == Self.postgresMap(sql, standardStrings: standard))
        }
    }

    // MARK: Maps: per byte, outside any token (0), a token's first byte (1), or inside one (2).
    // Operators are taken a byte at a time on both sides (the lexer does not join them).

    static func lexerMap(_ sql: String, standardStrings: Bool) -> [UInt8] {
        var text = sql
        return text.withUTF8 { utf8 in
            var map = [UInt8](repeating: 0, count: utf8.count)
            var lexer = SQLLexer(UnsafeRawBufferPointer(utf8), standardStrings: standardStrings)
            while true {
                let t = lexer.next()
                if t.kind == .end { break }
                for i in t.start..<t.end { map[i] = t.kind == .symbol || i == t.start ? 1 : 2 }
            }
            return map
        }
    }

    /// Nil when PostgreSQL's scanner refuses the text (an unterminated quote, trailing junk).
    static func postgresMap(_ sql: String, standardStrings: Bool) -> [UInt8]? {
        tidepool_set_standard_conforming_strings(standardStrings)
        let result = pg_query_scan(sql)
        defer { pg_query_free_scan_result(result) }
        guard result.error == nil, let data = result.pbuf.data else { return nil }
        let bytes = UnsafeRawBufferPointer(start: data, count: Int(result.pbuf.len))
        let text = Array(sql.utf8)
        var map = [UInt8](repeating: 0, count: text.count)
        guard let tokens = corrected(ScanTokens.decode(bytes), text) else { return nil }
        for token in tokens {
            guard token.end <= map.count, token.start < token.end else { return nil }
            switch token.kind {
            case 275, 276: continue  // comments
            case 259:  // U&"name": the lexer reads U, &, "name"
                map[token.start] = 1
                map[token.start + 1] = 1
                for i in (token.start + 2)..<token.end { map[i] = i == token.start + 2 ? 1 : 2 }
            case 258, 260...264, 266, 267, 277...:  // names, keywords, strings, numbers, $n
                for i in token.start..<token.end { map[i] = i == token.start ? 1 : 2 }
            default:  // operators and single characters
                for i in token.start..<token.end { map[i] = 1 }
            }
        }
        return map
    }

    /// Two places where libpg_query's token list is not what the server does (checked against
    /// a PostgreSQL 15 server): a `U&''` string's or `U&""` name's end is not given (found here),
    /// and a string going on past a `--` comment (`'a' -- c` newline `'b'` is 'ab') is given as
    /// two strings (nil: such text is not judged).
    static func corrected(_ tokens: [ScanTokens.Token], _ text: [UInt8]) -> [ScanTokens.Token]? {
        var out: [ScanTokens.Token] = []
        var lastString: Int? = nil
        for var token in tokens {
            if token.kind == 259 { token.end = stringEnd(text, quote: token.start + 2) }
            if token.kind == 262 {
                // With the parts that continue it.
                token.end = stringEnd(text, quote: token.start + 2)
                while true {
                    var next = token.end
                    while next < text.count, text[next] != 0x27, continues(text[token.end..<next] + [0x0A]) {
                        next += 1
                    }
                    guard next < text.count, text[next] == 0x27, continues(text[token.end..<next]) else { break }
                    token.end = stringEnd(text, quote: next)
                }
            }
            if token.kind == 275 || token.kind == 276 {
                out.append(token)
                continue
            }
            if (261...264).contains(token.kind), let last = lastString, text[token.start] == 0x27,
                continues(text[out[last].end..<token.start])
            {
                // libpg_query read the part after the comment as a string of its own; the server
                // goes on with the first (in E'' mode if it was one): not to be judged here
                // (SessionStatementsTests has these cases, checked against the server).
                return nil
            }
            out.append(token)
            // A dollar-quoted string never goes on.
            lastString = (261...264).contains(token.kind) && text[token.start] != 0x24 ? out.count - 1 : nil
        }
        return out
    }

    /// Past the quote that closes the part opened at `quote` (a doubled quote stays inside).
    static func stringEnd(_ text: [UInt8], quote: Int) -> Int {
        guard quote < text.count else { return text.count }
        let q = text[quote]
        var i = quote + 1
        while i < text.count {
            if text[i] == q {
                if i + 1 < text.count, text[i + 1] == q {
                    i += 2
                    continue
                }
                return i + 1
            }
            i += 1
        }
        return text.count
    }

    /// PostgreSQL's quotecontinue: space and `--` comments with a newline, the newline first
    /// reached before any comment that does not end in one.
    static func continues(_ gap: ArraySlice<UInt8>) -> Bool {
        var newline = false
        var i = gap.startIndex
        while i < gap.endIndex {
            let c = gap[i]
            if c == 0x0A || c == 0x0D {
                newline = true
                i += 1
            } else if c == 0x20 || c == 0x09 || c == 0x0C {
                i += 1
            } else if c == 0x2D, i + 1 < gap.endIndex, gap[i + 1] == 0x2D {
                while i < gap.endIndex, gap[i] != 0x0A, gap[i] != 0x0D { i += 1 }
                if i == gap.endIndex { return false }
            } else {
                return false
            }
        }
        return newline
    }

    static func render(_ map: [UInt8]) -> String { String(map.map { Character(String($0)) }) }

    // MARK: Generated SQL

    static let fragments: [String] = [
        "SELECT", "SET", "app.x", "=", "TO", "RESET", "ALL", " ", " ", " ", "\n", "\r", "\t", "\u{0C}", "\u{0B}", ";",
        "; ", "'a'", "'it''s'", "'a\\'", "'\\\\'", "'", "E'x\\'y'", "e'\\n'", "E'", "B'101'", "X'1F'", "N'n'",
        "U&'d\\0061t'", "U&\"d\\0061\"", "u&'x'", "UESCAPE", "'!'", "\"q\"", "\"a\"\"b\"", "\"", "$$", "$$x$$",
        "$a$ x $a$", "$a$", "$b$", "$1", "$", "1", "42", "1.5", "1.5e+3", "1e-2", ".5", "1.", "1..2", "..", ".", "1e",
        "--c", "-- c\n", "--\r", "/*", "*/", "/* c */", "/* a /* b */ c */", "-", "+", "::", "(", ")", ",", "<=",
        "!=", "x", "é", "\\", "'a'\n'b'", "'a' \n -- c\n 'b'", "'a' /* c */\n'b'", "'a'\r'b'", "E'a'\n'\\''",
    ]

    static func generate(_ g: inout SplitMix64) -> String {
        let count = 1 + Int(g.next() % 12)
        var out = ""
        for _ in 0..<count { out += fragments[Int(g.next() % UInt64(fragments.count))] }
        return out
    }
}

/// ScanResult (pg_query.proto): field 2 holds ScanTokens {1: start, 2: end, 4: token}.
enum ScanTokens {
    struct Token {
        var start = 0
        var end = 0
        var kind = 0
    }

    static func decode(_ bytes: UnsafeRawBufferPointer) -> [Token] {
        var tokens: [Token] = []
        var reader = Reader(bytes: bytes, position: 0, end: bytes.count)
        while let (field, wire) = reader.key() {
            if field == 2, wire == 2, let inner = reader.nested() {
                var r = inner
                var token = Token()
                while let (f, w) = r.key() {
                    guard w == 0, let v = r.varint() else {
                        r.skip(w)
                        continue
                    }
                    switch f {
                    case 1: token.start = Int(v)
                    case 2: token.end = Int(v)
                    case 4: token.kind = Int(v)
                    default: break
                    }
                }
                tokens.append(token)
            } else {
                reader.skip(wire)
            }
        }
        return tokens
    }

    struct Reader {
        let bytes: UnsafeRawBufferPointer
        var position: Int
        let end: Int

        mutating func varint() -> UInt64? {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while position < end {
                let b = bytes[position]
                position += 1
                value |= UInt64(b & 0x7F) << shift
                if b & 0x80 == 0 { return value }
                shift += 7
            }
            return nil
        }

        mutating func key() -> (Int, Int)? {
            guard position < end, let k = varint() else { return nil }
            return (Int(k >> 3), Int(k & 7))
        }

        mutating func nested() -> Reader? {
            guard let length = varint(), position + Int(length) <= end else { return nil }
            defer { position += Int(length) }
            return Reader(bytes: bytes, position: position, end: position + Int(length))
        }

        mutating func skip(_ wire: Int) {
            switch wire {
            case 0: _ = varint()
            case 1: position += 8
            case 2: _ = nested()
            case 5: position += 4
            default: position = end
            }
        }
    }
}
