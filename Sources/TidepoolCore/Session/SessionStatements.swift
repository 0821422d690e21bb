/// Why a client keeps its server: session state the pooler cannot replay on another server.
public enum PinReason: UInt8, Sendable, CaseIterable, Comparable {
    case advisoryLock
    case tempTable
    case holdCursor
    case preparedStatement
    case load
    case setConfig
    /// Not a pin: SQL naming one of the pooler's own prepared statements, which is refused.
    case reservedName
    /// The classifier or the state rules could not tell what the session holds.
    case unknown

    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    /// The statement, as a refusal names it.
    public var statement: String {
        switch self {
        case .advisoryLock: "a session advisory lock"
        case .tempTable: "CREATE TEMP TABLE"
        case .holdCursor: "DECLARE ... WITH HOLD"
        case .preparedStatement: "PREPARE"
        case .load: "LOAD"
        case .setConfig: "set_config with arguments that are not literals"
        case .reservedName: "a prepared statement name beginning with \"\(PreparedStatementTracker.reservedPrefix)\""
        case .unknown: "a statement whose effect on the session the pooler cannot follow"
        }
    }

    /// For SHOW CLIENTS' pin_reason and the metrics label.
    public var name: String {
        switch self {
        case .advisoryLock: "advisory_lock"
        case .tempTable: "temp_table"
        case .holdCursor: "hold_cursor"
        case .preparedStatement: "prepare"
        case .load: "load"
        case .setConfig: "set_config"
        case .reservedName: "reserved_name"
        case .unknown: "unknown"
        }
    }
}

/// What one client statement does beyond its own transaction, as far as the pooler cares.
public enum SessionEffect: Equatable, Sendable {
    case begin
    case commit
    case rollback
    case savepoint(String)
    case release(String)
    case rollbackTo(String)
    /// A session-level setting; `statement` sets it again on another server.
    case set(name: String, statement: String)
    /// SET LOCAL: only for the transaction, unless SET ... FROM CURRENT makes it the session's.
    case setLocal(name: String, statement: String)
    /// SET name FROM CURRENT: the value in effect becomes the session's.
    case setFromCurrent(name: String)
    case reset(name: String)
    case resetAll
    /// DISCARD ALL: settings, pins and prepared statements are gone.
    case discardAll
    /// Session state the pooler cannot replay appears under `key` (a lock's arguments, a table,
    /// a cursor or channel name; "" when only the end of the session removes it).
    case pin(PinReason, key: String)
    case unpin(PinReason, key: String)
    /// Every key of that reason goes (pg_advisory_unlock_all, DISCARD TEMP, CLOSE ALL).
    case unpinAll(PinReason)
    /// A SET (`reset` false) or RESET of a parameter the server reports: its value is the
    /// server's report, or after a reset the client's startup value (`ClientSession.wanted`).
    case reported(name: String, reset: Bool)
    /// LISTEN and UNLISTEN: the pooler's listener connection serves the client's channels.
    case listen(channel: String)
    case unlisten(channel: String)
    case unlistenAll
    /// NOTIFY (or pg_notify with a literal channel): a client listening on the channel itself is
    /// shown the notification before the ReadyForQuery of the transaction that sent it.
    case notify(channel: String)

    var isTransactionControl: Bool {
        switch self {
        case .begin, .commit, .rollback, .savepoint, .release, .rollbackTo: true
        default: false
        }
    }
}

/// Reads client SQL just far enough to find statements that change session state: each
/// statement's leading keywords, and calls of the few functions that matter. Comments, quoted
/// identifiers, string, `E''` and dollar quoting and several statements per Query are honoured;
/// nothing of a server's replies is read.
public enum SessionStatements {
    /// Parameters PostgreSQL reports with ParameterStatus: the pooler follows those from the
    /// server's reports (`ClientSession.wanted`), not from the statements.
    static let reported: Set<String> = [
        "client_encoding", "datestyle", "timezone", "intervalstyle", "standard_conforming_strings",
        "application_name",
    ]

    /// The effects of `sql` (a Query's text or a Parse's statement), in order. Empty for most SQL.
    /// `oneStatement`: a Parse's SQL, which PostgreSQL takes only as one statement.
    public static func effects(
        _ bytes: UnsafeRawBufferPointer, oneStatement: Bool = false, standardStrings: Bool = true
    ) -> [SessionEffect] {
        var lexer = SQLLexer(bytes, standardStrings: standardStrings)
        lexer.oneStatement = oneStatement
        var effects: [SessionEffect] = []
        while lexer.hasMore {
            classifyStatement(&lexer, into: &effects)
        }
        return effects
    }

    public static func effects(_ sql: String, standardStrings: Bool = true) -> [SessionEffect] {
        var text = sql
        return text.withUTF8 { effects(UnsafeRawBufferPointer($0), standardStrings: standardStrings) }
    }

    /// One statement, up to and including its `;`.
    static func classifyStatement(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        let first = lexer.next()
        guard first.kind == .word else {
            if !first.isSymbol(";") { scanForFunctions(&lexer, into: &effects) }
            return
        }
        switch keyword(first, in: lexer) {
        case .set:
            setStatement(&lexer, into: &effects)
        case .reset:
            resetStatement(&lexer, into: &effects)
        case .begin, .start:
            effects.append(.begin)
            lexer.skipStatement()
        case .commit, .end:
            // COMMIT PREPARED ends another transaction; COMMIT AND CHAIN keeps one open.
            let rest = lexer.next()
            if rest.isWord("prepared", in: lexer) {
                lexer.skipStatement()
                return
            }
            effects.append(.commit)
            if chains(rest, &lexer) { effects.append(.begin) }
        case .rollback, .abort:
            let rest = lexer.next()
            if rest.isWord("prepared", in: lexer) {
                lexer.skipStatement()
                return
            }
            var t = rest
            if t.isWord("work", in: lexer) || t.isWord("transaction", in: lexer) { t = lexer.next() }
            if t.isWord("to", in: lexer) {
                var name = lexer.next()
                if name.isWord("savepoint", in: lexer) { name = lexer.next() }
                effects.append(.rollbackTo(lexer.identifier(name)))
                lexer.skipStatement()
                return
            }
            effects.append(.rollback)
            if chains(t, &lexer) { effects.append(.begin) }
        case .savepoint:
            effects.append(.savepoint(lexer.identifier(lexer.next())))
            lexer.skipStatement()
        case .release:
            var name = lexer.next()
            if name.isWord("savepoint", in: lexer) { name = lexer.next() }
            effects.append(.release(lexer.identifier(name)))
            lexer.skipStatement()
        case .discard:
            let what = lexer.next()
            if what.isWord("all", in: lexer) {
                effects.append(.discardAll)
            } else if what.isWord("temp", in: lexer) || what.isWord("temporary", in: lexer) {
                effects.append(.unpinAll(.tempTable))
            }
            lexer.skipStatement()
        case .create:
            createStatement(&lexer, into: &effects)
        case .drop:
            dropStatement(&lexer, into: &effects)
        case .declare:
            // DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR [WITH|WITHOUT HOLD] FOR
            let name = lexer.identifier(lexer.next())
            var t = lexer.next()
            while t.kind != .end, !t.isSymbol(";"), !t.isWord("for", in: lexer) {
                if t.isWord("with", in: lexer), lexer.next().isWord("hold", in: lexer) {
                    effects.append(.pin(.holdCursor, key: name))
                }
                t = lexer.next()
            }
            if t.isWord("for", in: lexer) { scanForFunctions(&lexer, into: &effects) }
        case .close:
            let name = lexer.next()
            effects.append(
                name.isWord("all", in: lexer)
                    ? .unpinAll(.holdCursor) : .unpin(.holdCursor, key: lexer.identifier(name)))
            lexer.skipStatement()
        case .listen:
            effects.append(.listen(channel: channelName(lexer.identifier(lexer.next()))))
            lexer.skipStatement()
        case .unlisten:
            let name = lexer.next()
            effects.append(name.isSymbol("*") ? .unlistenAll : .unlisten(channel: channelName(lexer.identifier(name))))
            lexer.skipStatement()
        case .notify:
            effects.append(.notify(channel: channelName(lexer.identifier(lexer.next()))))
            lexer.skipStatement()
        case .prepare:
            let name = lexer.next()
            if name.isWord("transaction", in: lexer) {
                // The transaction leaves the session: its settings are not the session's.
                effects.append(.rollback)
                lexer.skipStatement()
                return
            }
            let key = lexer.identifier(name)
            effects.append(
                PreparedStatementTracker.isReserved(key)
                    ? .pin(.reservedName, key: key) : .pin(.preparedStatement, key: key))
            lexer.skipStatement()
        case .deallocate:
            var name = lexer.next()
            if name.isWord("prepare", in: lexer) { name = lexer.next() }
            let key = lexer.identifier(name)
            effects.append(
                name.isWord("all", in: lexer)
                    ? .unpinAll(.preparedStatement)
                    : PreparedStatementTracker.isReserved(key)
                        ? .pin(.reservedName, key: key) : .unpin(.preparedStatement, key: key))
            lexer.skipStatement()
        case .execute:
            // EXECUTE of one of the pooler's own statements (named in pg_prepared_statements).
            let key = lexer.identifier(lexer.next())
            if PreparedStatementTracker.isReserved(key) { effects.append(.pin(.reservedName, key: key)) }
            lexer.skipStatement()
        case .load:
            effects.append(.pin(.load, key: ""))
            lexer.skipStatement()
        case .do:
            doStatement(&lexer, into: &effects)
        default:
            // Most SQL: looked at closely only if something in it could matter.
            if mayHaveEffects(lexer) {
                scanForFunctions(&lexer, into: &effects)
            } else {
                lexer.position = lexer.count
            }
        }
    }

    /// The first words the classifier acts on.
    enum Keyword {
        case set, reset, begin, start, commit, end, rollback, abort, savepoint, release, discard, create
        case drop, declare, close, listen, unlisten, notify, prepare, deallocate, execute, load, `do`, other
    }

    /// The statement's first word as a `Keyword`: compared byte by byte, by length first, so that
    /// the usual SELECT, INSERT, UPDATE... cost a few comparisons.
    static func keyword(_ t: SQLLexer.Token, in lexer: SQLLexer) -> Keyword {
        @inline(__always) func word(_ keyword: StaticString) -> Bool { t.isWord(keyword, in: lexer) }
        // No keyword starts with the letters SELECT, INSERT, UPDATE, WITH... start with but s, d, u.
        switch lexer.bytes[t.start] | 0x20 {
        case 0x61...0x65, 0x6C, 0x6E, 0x70, 0x72, 0x73, 0x75: break  // a b c d e l n p r s u
        default: return .other
        }
        switch t.end - t.start {
        case 2: if word("do") { return .do }
        case 3:
            if word("set") { return .set }
            if word("end") { return .end }
        case 4:
            if word("drop") { return .drop }
            if word("load") { return .load }
        case 5:
            if word("reset") { return .reset }
            if word("begin") { return .begin }
            if word("start") { return .start }
            if word("abort") { return .abort }
            if word("close") { return .close }
        case 6:
            if word("commit") { return .commit }
            if word("create") { return .create }
            if word("listen") { return .listen }
            if word("notify") { return .notify }
        case 7:
            if word("release") { return .release }
            if word("discard") { return .discard }
            if word("declare") { return .declare }
            if word("prepare") { return .prepare }
            if word("execute") { return .execute }
        case 8:
            if word("rollback") { return .rollback }
            if word("unlisten") { return .unlisten }
        case 9: if word("savepoint") { return .savepoint }
        case 10: if word("deallocate") { return .deallocate }
        default: break
        }
        return .other
    }

    /// `AND CHAIN` after COMMIT or ROLLBACK (`t` is the token after the keyword, or after WORK).
    static func chains(_ first: SQLLexer.Token, _ lexer: inout SQLLexer) -> Bool {
        var t = first
        if t.isWord("work", in: lexer) || t.isWord("transaction", in: lexer) { t = lexer.next() }
        var chained = false
        if t.isWord("and", in: lexer) {
            let next = lexer.next()
            chained = next.isWord("chain", in: lexer)
            t = next
        }
        if !t.isSymbol(";"), t.kind != .end { lexer.skipStatement() }
        return chained
    }

    static func setStatement(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        var t = lexer.next()
        if t.isWord("local", in: lexer) {
            // Only a plain name's value matters (SET ... FROM CURRENT may keep it); the rest of
            // SET LOCAL lasts the transaction.
            let name = lexer.next()
            guard name.kind == .word || name.kind == .quotedWord,
                !(["role", "time", "names", "session", "transaction", "constraints"].contains(lexer.lowercased(name)))
            else {
                lexer.skipStatement()
                return
            }
            assignment(name, local: true, &lexer, into: &effects)
            return
        }
        if t.isWord("session", in: lexer) {
            let after = lexer.next()
            if after.isWord("authorization", in: lexer) {
                let value = lexer.valueText()
                if value.lowercased() == "default" {
                    effects.append(.reset(name: "session_authorization"))
                } else {
                    effects.append(.set(name: "session_authorization", statement: "SET SESSION AUTHORIZATION \(value)"))
                }
                return
            }
            if after.isWord("characteristics", in: lexer) {
                sessionCharacteristics(&lexer, into: &effects)
                return
            }
            t = after
        }
        switch t.kind {
        case .word where lexer.lowercased(t) == "transaction" || lexer.lowercased(t) == "constraints":
            lexer.skipStatement()
            return
        case .word where lexer.lowercased(t) == "time":
            guard lexer.next().isWord("zone", in: lexer) else { break }
            // TimeZone is reported by the server.
            let value = lexer.valueText().lowercased()
            effects.append(.reported(name: "timezone", reset: value == "default" || value == "local"))
            return
        case .word where lexer.lowercased(t) == "names":
            // client_encoding is reported.
            effects.append(.reported(name: "client_encoding", reset: lexer.valueText().lowercased() == "default"))
            return
        case .word where lexer.lowercased(t) == "role":
            let value = lexer.valueText()
            if value.lowercased() == "none" {
                effects.append(.reset(name: "role"))
            } else {
                effects.append(.set(name: "role", statement: "SET ROLE \(value)"))
            }
            return
        case .word, .quotedWord:
            assignment(t, local: false, &lexer, into: &effects)
            return
        default:
            break
        }
        effects.append(.pin(.unknown, key: ""))
        lexer.skipStatement()
    }

    /// `SET [LOCAL] name {=|TO} value`, `SET name FROM CURRENT`, after the name's first token.
    static func assignment(
        _ first: SQLLexer.Token, local: Bool, _ lexer: inout SQLLexer, into effects: inout [SessionEffect]
    ) {
        let name = lexer.settingName(first)
        let op = lexer.next()
        guard op.isSymbol("=") || op.isWord("to", in: lexer) else {
            if !local {
                if op.isWord("from", in: lexer), lexer.next().isWord("current", in: lexer) {
                    if !reported.contains(name) { effects.append(.setFromCurrent(name: name)) }
                } else {
                    effects.append(.pin(.unknown, key: ""))  // a SET the classifier cannot read
                }
            }
            lexer.skipStatement()
            return
        }
        let value = lexer.valueText()
        guard !reported.contains(name) else {
            if !local { effects.append(.reported(name: name, reset: value.lowercased() == "default")) }
            return
        }
        let statement = "SET \(quotedName(name)) = \(value)"
        if value.lowercased() == "default" {
            if !local { effects.append(.reset(name: name)) }
        } else {
            effects.append(local ? .setLocal(name: name, statement: statement) : .set(name: name, statement: statement))
        }
    }

    /// SET SESSION CHARACTERISTICS AS TRANSACTION mode [, ...]: the three default_transaction_ settings.
    static func sessionCharacteristics(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        guard lexer.next().isWord("as", in: lexer), lexer.next().isWord("transaction", in: lexer) else {
            effects.append(.pin(.unknown, key: ""))
            lexer.skipStatement()
            return
        }
        var t = lexer.next()
        while t.kind != .end, !t.isSymbol(";") {
            if t.isWord("isolation", in: lexer) {
                _ = lexer.next()  // LEVEL
                var level = lexer.lowercased(lexer.next())
                if level == "read" || level == "repeatable" { level += " " + lexer.lowercased(lexer.next()) }
                effects.append(
                    .set(
                        name: "default_transaction_isolation",
                        statement: "SET default_transaction_isolation = \(level.sqlLiteral)"))
            } else if t.isWord("read", in: lexer) {
                let only = lexer.next().isWord("only", in: lexer)
                effects.append(
                    .set(
                        name: "default_transaction_read_only",
                        statement: "SET default_transaction_read_only = \(only ? "on" : "off")"))
            } else if t.isWord("deferrable", in: lexer) || t.isWord("not", in: lexer) {
                let deferrable = t.isWord("deferrable", in: lexer)
                if !deferrable { _ = lexer.next() }
                effects.append(
                    .set(
                        name: "default_transaction_deferrable",
                        statement: "SET default_transaction_deferrable = \(deferrable ? "on" : "off")"))
            }
            t = lexer.next()
        }
    }

    static func resetStatement(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        let t = lexer.next()
        if t.isWord("all", in: lexer) {
            effects.append(.resetAll)
        } else if t.isWord("session", in: lexer) {
            effects.append(.reset(name: "session_authorization"))
        } else if t.isWord("time", in: lexer) {
            effects.append(.reported(name: "timezone", reset: true))
        } else if t.kind == .word || t.kind == .quotedWord {
            let name = lexer.settingName(t)
            effects.append(reported.contains(name) ? .reported(name: name, reset: true) : .reset(name: name))
        }
        lexer.skipStatement()
    }

    /// CREATE [GLOBAL|LOCAL] TEMP|TEMPORARY [UNLOGGED] TABLE|VIEW|SEQUENCE [IF NOT EXISTS] name,
    /// or CREATE ... pg_temp.name: a temporary object, unless ON COMMIT DROP removes it.
    static func createStatement(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        var temporary = false
        var t = lexer.next()
        while t.kind == .word {
            let word = lexer.lowercased(t)
            if word == "temp" || word == "temporary" {
                temporary = true
            } else if word == "or" || word == "replace" || word == "global" || word == "local" || word == "unlogged"
                || word == "recursive"
            {
                // modifiers
            } else {
                break
            }
            t = lexer.next()
        }
        guard t.kind == .word else {
            scanForFunctions(&lexer, into: &effects)
            return
        }
        let kind = lexer.lowercased(t)
        guard kind == "table" || kind == "view" || kind == "sequence" else {
            if kind == "function" || kind == "procedure" {
                lexer.skipStatement()  // its body runs later, when called
            } else {
                scanForFunctions(&lexer, into: &effects)
            }
            return
        }
        var nameToken = lexer.next()
        if nameToken.isWord("if", in: lexer) {
            _ = lexer.next()  // NOT
            _ = lexer.next()  // EXISTS
            nameToken = lexer.next()
        }
        var name = lexer.identifier(nameToken)
        if lexer.peekSymbol(".") {
            _ = lexer.next()
            if name == "pg_temp" { temporary = true }
            name = lexer.identifier(lexer.next())
        }
        // ON COMMIT DROP: gone with the transaction.
        var dropsAtCommit = false
        var previous = ""
        var tok = lexer.next()
        while tok.kind != .end, !tok.isSymbol(";") {
            if tok.kind == .word {
                let word = lexer.lowercased(tok)
                if previous == "commit", word == "drop" { dropsAtCommit = true }
                previous = word
            } else {
                previous = ""
            }
            tok = lexer.next()
        }
        if temporary, !dropsAtCommit { effects.append(.pin(.tempTable, key: name)) }
    }

    /// DROP TABLE|VIEW|SEQUENCE [IF EXISTS] a, b: any of them may be a temporary object.
    static func dropStatement(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        let kind = lexer.next()
        guard kind.isWord("table", in: lexer) || kind.isWord("view", in: lexer) || kind.isWord("sequence", in: lexer)
        else {
            lexer.skipStatement()
            return
        }
        var t = lexer.next()
        if t.isWord("if", in: lexer) {
            _ = lexer.next()
            t = lexer.next()
        }
        while t.kind == .word || t.kind == .quotedWord {
            var name = lexer.identifier(t)
            if lexer.peekSymbol(".") {
                _ = lexer.next()
                name = lexer.identifier(lexer.next())
            }
            effects.append(.unpin(.tempTable, key: name))
            guard lexer.peekSymbol(",") else { break }
            _ = lexer.next()
            t = lexer.next()
        }
        lexer.skipStatement()
    }

    /// DO: the body is code the pooler does not follow; what could leave session state behind pins.
    static func doStatement(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        var t = lexer.next()
        while t.kind != .end, !t.isSymbol(";") {
            if t.kind == .string {
                let body = lexer.stringValue(t).lowercased()
                for word in ["set_config", "advisory_lock", "temp", "set ", "set\n", "listen", "prepare ", "load "]
                where body.contains(word) {
                    effects.append(.pin(.unknown, key: ""))
                    break
                }
            }
            t = lexer.next()
        }
    }

    /// Whether the rest of the text (the statement and any after it) could hold what
    /// `scanForFunctions` looks for: another statement (a `;` with more after it), a call of a
    /// function that matters (a `(` after a name it could be), or INTO TEMP (`temp` in any case).
    /// A fast over-estimate with memchr, so that ordinary SQL is not read byte by byte.
    static func mayHaveEffects(_ lexer: SQLLexer) -> Bool {
        guard lexer.position < lexer.count else { return false }
        let start = lexer.position
        let count = lexer.count
        func find(_ byte: UInt8, from: Int) -> Int? { lexer.bytes.index(of: byte, from: from, to: count) }
        if !lexer.oneStatement, let semicolon = find(0x3B, from: start) {
            var rest = semicolon + 1
            while rest < count, lexer.bytes[rest] == 0x20 || lexer.bytes[rest] &- 0x09 < 5 { rest += 1 }
            if rest < count { return true }
        }
        var from = start
        while let paren = find(0x28, from: from) {
            if wordBefore(paren, in: lexer) != nil { return true }
            from = paren + 1
        }
        func hasTemp(_ t: UInt8) -> Bool {
            var from = start
            while let hit = find(t, from: from) {
                if hit + 4 <= count, lexer.bytes[hit + 1] | 0x20 == 0x65, lexer.bytes[hit + 2] | 0x20 == 0x6D,
                    lexer.bytes[hit + 3] | 0x20 == 0x70
                {
                    return true
                }
                from = hit + 1
            }
            return false
        }
        return hasTemp(0x74) || hasTemp(0x54)  // t, T
    }

    /// The rest of a statement that is not itself about the session: calls of set_config and of
    /// the session advisory lock functions, and SELECT ... INTO TEMP. Most SQL goes through here,
    /// so it walks bytes and makes tokens only for quotes, comments, `into` and `name(`.
    static func scanForFunctions(_ lexer: inout SQLLexer, into effects: inout [SessionEffect]) {
        let bytes = lexer.bytes
        let count = lexer.count
        var i = lexer.position
        while i < count {
            let b = bytes[i]
            // Letters (but i), `_` and the like: nothing to look at.
            if b > 0x3B, b | 0x20 != 0x69 {
                i += 1
                continue
            }
            switch b {
            case 0x3B:  // ;
                lexer.position = i + 1
                return
            case 0x28:  // (
                lexer.position = i + 1
                if let name = wordBefore(i, in: lexer) { functionCall(name, &lexer, into: &effects) }
                i = lexer.position
            case 0x27, 0x22, 0x24:  // ' " $: a string, quoted name, dollar quote or parameter
                // A prefix (E, B, X, U&) says how the string reads: the token starts there.
                lexer.position = b == 0x27 ? stringStart(quote: i, in: lexer) : i
                _ = lexer.next()
                i = lexer.position
            case 0x2D, 0x2F:  // - /: perhaps a comment
                lexer.position = i
                lexer.skipSpace()
                i = lexer.position == i ? i + 1 : lexer.position
            case 0x49, 0x69:  // i: perhaps INTO TEMP
                if i + 4 <= count, i == 0 || !SQLLexer.isWordPart(bytes[i - 1]),
                    bytes[i + 1] | 0x20 == 0x6E, bytes[i + 2] | 0x20 == 0x74, bytes[i + 3] | 0x20 == 0x6F,
                    i + 4 == count || !SQLLexer.isWordPart(bytes[i + 4])
                {
                    lexer.position = i + 4
                    let t = lexer.next()
                    if t.isWord("temp", in: lexer) || t.isWord("temporary", in: lexer) {
                        var name = lexer.next()
                        if name.isWord("table", in: lexer) { name = lexer.next() }
                        effects.append(.pin(.tempTable, key: lexer.identifier(name)))
                    }
                    i = t.kind == .end || t.isSymbol(";") ? t.start : lexer.position
                } else {
                    i += 1
                }
            default:
                i += 1
            }
        }
        lexer.position = count
    }

    /// Where a string whose quote is at `quote` starts: at its prefix letter (`E''`, `B''`, `X''`)
    /// or `U&`, when one stands alone before it.
    static func stringStart(quote: Int, in lexer: SQLLexer) -> Int {
        let bytes = lexer.bytes
        func alone(_ at: Int) -> Bool { at == 0 || !SQLLexer.isWordPart(bytes[at - 1]) }
        guard quote > 0 else { return quote }
        switch bytes[quote - 1] | 0x20 {
        case 0x65, 0x62, 0x78: return alone(quote - 1) ? quote - 1 : quote
        case 0x26 where quote > 1 && bytes[quote - 2] | 0x20 == 0x75 && alone(quote - 2): return quote - 2
        default: return quote
        }
    }

    /// The name before a `(` at `index`, when it may be one of the functions that matter (they
    /// start with p or s and are 9 to 27 letters long).
    static func wordBefore(_ index: Int, in lexer: SQLLexer) -> SQLLexer.Token? {
        let bytes = lexer.bytes
        var end = index
        while end > 0, bytes[end - 1] == 0x20 || bytes[end - 1] == 0x0A || bytes[end - 1] == 0x09 { end -= 1 }
        var start = end
        while start > 0, SQLLexer.isWordPart(bytes[start - 1]), end - start <= 27 { start -= 1 }
        let length = end - start
        guard length >= 9, length <= 27, bytes[start] | 0x20 == 0x70 || bytes[start] | 0x20 == 0x73,
            start == 0 || !SQLLexer.isWordPart(bytes[start - 1])
        else { return nil }
        return SQLLexer.Token(kind: .word, start: start, end: end)
    }

    /// After `name(`: the function's effect, its arguments read up to the closing parenthesis.
    static func functionCall(
        _ nameToken: SQLLexer.Token, _ lexer: inout SQLLexer, into effects: inout [SessionEffect]
    ) {
        let name = lexer.lowercased(nameToken)
        switch name {
        case "set_config":
            let arguments = lexer.arguments()
            guard arguments.count == 3, arguments.allSatisfy({ $0.literal != nil }) else {
                effects.append(.pin(.setConfig, key: ""))
                return
            }
            let isLocal = ["t", "true", "on", "yes", "1"].contains(arguments[2].literal!.lowercased())
            if isLocal { return }
            let setting = arguments[0].literal!.lowercased()
            guard !reported.contains(setting) else { return }
            let value = arguments[1].literal!
            effects.append(
                .set(
                    name: setting,
                    statement: "SELECT pg_catalog.set_config(\(setting.sqlLiteral), \(value.sqlLiteral), false)"))
        case "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared":
            effects.append(.pin(.advisoryLock, key: lockKey(lexer.arguments(), shared: name.hasSuffix("shared"))))
        case "pg_advisory_unlock", "pg_advisory_unlock_shared":
            let key = lockKey(lexer.arguments(), shared: name.hasSuffix("shared"))
            if key != "*" { effects.append(.unpin(.advisoryLock, key: key)) }
        case "pg_advisory_unlock_all":
            effects.append(.unpinAll(.advisoryLock))
        case "pg_notify":
            if let channel = lexer.arguments().first?.literal { effects.append(.notify(channel: channelName(channel))) }
        default:
            break
        }
    }

    /// A lock's identity from literal arguments; "*" when they are not literals (only
    /// pg_advisory_unlock_all is then known to free it).
    static func lockKey(_ arguments: [SQLLexer.Argument], shared: Bool) -> String {
        guard !arguments.isEmpty, arguments.allSatisfy({ $0.literal != nil }) else { return "*" }
        return (shared ? "s:" : "x:") + arguments.map { $0.literal! }.joined(separator: ",")
    }

    /// A setting's name as SET takes it.
    static func quotedName(_ name: String) -> String {
        name.split(separator: ".", omittingEmptySubsequences: false).map { part in
            part.allSatisfy({ $0.isLowercase || $0.isNumber || $0 == "_" }) && !part.isEmpty
                ? String(part)
                : "\"" + part.split(separator: "\"", omittingEmptySubsequences: false).joined(separator: "\"\"") + "\""
        }.joined(separator: ".")
    }
}

extension SessionStatements {
    /// A statement that fails on the server with `code` and `message` (and `hint`), sent in place of
    /// one the pooler refuses, so that the error comes in its place among the replies and fails the
    /// transaction as PostgreSQL's own would. The body's dollar quote is one the text does not hold.
    static func failing(code: String, message: String, hint: String? = nil) -> String {
        var body = "BEGIN RAISE EXCEPTION USING ERRCODE = '\(code)', MESSAGE = \(message.sqlLiteral)"
        if let hint { body += ", HINT = \(hint.sqlLiteral)" }
        body += "; END"
        var tag = "$tidepool$"
        while body.contains(tag) { tag.insert("x", at: tag.index(before: tag.endIndex)) }
        return "DO \(tag)\(body)\(tag)"
    }

    /// A channel name as PostgreSQL keeps it: identifiers are cut to NAMEDATALEN - 1 bytes (63),
    /// at a character boundary.
    static func channelName(_ name: String) -> String {
        var utf8 = Array(name.utf8)
        guard utf8.count > 63 else { return name }
        var end = 63
        while end > 0, utf8[end] & 0xC0 == 0x80 { end -= 1 }
        utf8.removeSubrange(end...)
        return String(decoding: utf8, as: UTF8.self)
    }

    /// A channel name quoted for LISTEN and UNLISTEN.
    public static func quotedChannel(_ name: String) -> String {
        "\"" + name.split(separator: "\"", omittingEmptySubsequences: false).joined(separator: "\"\"") + "\""
    }
}
