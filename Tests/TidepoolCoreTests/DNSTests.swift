import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct DNSTests {
    let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func cache(zoneCheck: TimeAmount = .zero) -> DNSCache {
        DNSCache(maxTTL: .seconds(15), nxdomainTTL: .seconds(5), zoneCheckPeriod: zoneCheck)
    }

    /// A response as a name server sends it: the question echoed (with a compression pointer in
    /// each answer's name), then the records.
    func response(id: UInt16, rcode: UInt8 = 0, records: [(type: UInt16, data: [UInt8])], authority: Int = 0)
        -> [UInt8]
    {
        var bytes = DNSMessage.query(id: id, name: "db.example.test", type: .a)!
        bytes[2] = 0x81
        bytes[3] = 0x80 | rcode
        let answers = records.count - authority
        bytes[6] = UInt8(answers >> 8)
        bytes[7] = UInt8(answers & 0xFF)
        bytes[9] = UInt8(authority)
        for record in records {
            bytes += [0xC0, 12, UInt8(record.type >> 8), UInt8(record.type & 0xFF), 0, 1, 0, 0, 0x0E, 0x10]
            bytes += [UInt8(record.data.count >> 8), UInt8(record.data.count & 0xFF)] + record.data
        }
        return bytes
    }

    @Test func queriesAreEncodedAsRFC1035Says() throws {
        let query = try #require(DNSMessage.query(id: 0x1234, name: "db.example.test.", type: .aaaa))
        #expect(query[0..<4] == [0x12, 0x34, 0x01, 0x00])  // id, recursion desired
        #expect(query[4..<6] == [0, 1])  // one question
        #expect(
            Array(query[12...]) == [2] + Array("db".utf8) + [7] + Array("example".utf8) + [4] + Array("test".utf8) + [
                0, 0, 28, 0, 1,
            ])
        #expect(DNSMessage.query(id: 1, name: "a..b", type: .a) == nil)
        #expect(DNSMessage.query(id: 1, name: String(repeating: "x", count: 64), type: .a) == nil)
        #expect(
            DNSMessage.query(
                id: 1, name: Array(repeating: String(repeating: "x", count: 60), count: 5).joined(separator: "."),
                type: .a) == nil)
    }

    @Test func answersGiveAddressesAndSerials() throws {
        let v6: [UInt8] = [0x20, 0x01, 0x0d, 0xb8] + Array(repeating: 0, count: 10) + [0, 1]
        let cname: [UInt8] = [3] + Array("foo".utf8) + [0xC0, 12]
        let answer = try DNSMessage.decode(
            response(id: 7, records: [(5, cname), (1, [10, 0, 0, 2]), (28, v6), (1, [10, 0, 0, 3])]))
        #expect(
            answer
                == DNSMessage.Answer(id: 7, rcode: 0, addresses: ["10.0.0.2", "2001:db8::1", "10.0.0.3"], serial: nil))
        // SOA in the authority section (the name is not the zone's apex): its serial still counts.
        let soa: [UInt8] =
            [2] + Array("ns".utf8) + [0xC0, 12] + [0xC0, 12] + [0, 0, 0x30, 0x39] + Array(repeating: 0, count: 16)
        let withSOA = try DNSMessage.decode(response(id: 8, rcode: 3, records: [(6, soa)], authority: 1))
        #expect(withSOA.rcode == 3 && withSOA.serial == 12345)
        // Cut short anywhere, or a question rather than an answer: an error, never a crash.
        let whole = response(id: 9, records: [(1, [1, 2, 3, 4])])
        for length in 0..<whole.count {
            #expect(throws: DNSMessage.DecodeError.self) { try DNSMessage.decode(Array(whole[..<length])) }
        }
        #expect(throws: DNSMessage.DecodeError.notAnAnswer) {
            try DNSMessage.decode(DNSMessage.query(id: 1, name: "x", type: .a)!)
        }
    }

    @Test func aAndAAAAAnswersCombine() {
        let none = DNSMessage.Answer(id: 1, rcode: 0, addresses: [], serial: nil)
        let v4 = DNSMessage.Answer(id: 1, rcode: 0, addresses: ["10.0.0.1"], serial: nil)
        let nx = DNSMessage.Answer(id: 1, rcode: 3, addresses: [], serial: nil)
        let servfail = DNSMessage.Answer(id: 1, rcode: 2, addresses: [], serial: nil)
        #expect(DNSMessage.addresses(v4, none) == .success(["10.0.0.1"]))
        #expect(DNSMessage.addresses(nx, none) == .failure(.init(text: "no such host (NXDOMAIN)")))
        #expect(DNSMessage.addresses(servfail, v4) == .success(["10.0.0.1"]))
        #expect(DNSMessage.addresses(servfail, none) == .failure(.init(text: "name server failure (rcode 2)")))
        #expect(DNSMessage.addresses(none, none) == .failure(.init(text: "no address")))
    }

    @Test func ipv6AddressesAreWrittenAsTheSocketLayerWritesThem() {
        func text(_ groups: [UInt16]) -> String {
            DNSMessage.ipv6Text(groups.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xFF)] })
        }
        #expect(text([0, 0, 0, 0, 0, 0, 0, 1]) == "::1")
        #expect(text([0, 0, 0, 0, 0, 0, 0, 0]) == "::")
        #expect(text([0x2001, 0xdb8, 0, 1, 0, 0, 0, 1]) == "2001:db8:0:1::1")  // the longer run
        #expect(text([0x2001, 0xdb8, 0, 0, 1, 0, 0, 1]) == "2001:db8::1:0:0:1")  // the first of two
        #expect(text([0x2001, 0xdb8, 0, 1, 2, 3, 4, 5]) == "2001:db8:0:1:2:3:4:5")  // one zero: kept
    }

    @Test func resolvConfAndHostsFileAreRead() {
        let conf = ResolverSettings.parse(
            "# comment\nnameserver 127.0.0.1:5353\nnameserver 10.0.0.53\nnameserver [::1]:53\noptions timeout:2 attempts:3 rotate\n"
        )
        #expect(conf.nameservers.map(\.host) == ["127.0.0.1", "10.0.0.53", "::1"])
        #expect(conf.nameservers.map(\.port) == [5353, 53, 53])
        #expect(conf.timeoutSeconds == 2 && conf.attempts == 3)
        #expect(ResolverSettings.parse("").nameservers.map(\.host) == ["127.0.0.1"])
        let hosts =
            "127.0.0.1 localhost\n::1 localhost ip6-localhost # v6\n10.1.1.1 db.internal db # ours\n#10.9.9.9 db\n"
        #expect(HostsFile.addresses(of: "localhost", in: hosts) == ["127.0.0.1", "::1"])
        #expect(HostsFile.addresses(of: "DB", in: hosts) == ["10.1.1.1"])
        #expect(HostsFile.addresses(of: "other", in: hosts).isEmpty)
    }

    @Test func answersAreKeptForDnsMaxTTLAndUsedInTurn() {
        var dns = cache()
        #expect(dns.lookup("db.example.test", now: start) == .resolve)
        #expect(dns.lookup("db.example.test", now: start) == .wait)  // one lookup at a time
        #expect(dns.pending == 1)
        #expect(dns.resolved("db.example.test", addresses: ["10.0.0.1", "10.0.0.2"], now: start).isEmpty)
        #expect(dns.lookup("db.example.test", now: start) == .addresses(["10.0.0.1", "10.0.0.2"], refresh: false))
        #expect(dns.lookup("db.example.test", now: start) == .addresses(["10.0.0.2", "10.0.0.1"], refresh: false))
        #expect(dns.lookup("db.example.test", now: start) == .addresses(["10.0.0.1", "10.0.0.2"], refresh: false))
        // Time up: the old answer still serves this connect while the name is looked up again.
        let later = start + .seconds(15)
        #expect(dns.lookup("db.example.test", now: later) == .addresses(["10.0.0.2", "10.0.0.1"], refresh: true))
        #expect(dns.lookup("db.example.test", now: later) == .addresses(["10.0.0.1", "10.0.0.2"], refresh: false))
        // The new answer drops 10.0.0.1: servers open to it are to go.
        #expect(dns.resolved("db.example.test", addresses: ["10.0.0.2", "10.0.0.3"], now: later) == ["10.0.0.1"])
        #expect(
            dns.hostRows(now: later + .seconds(5)).map { "\($0.host) \($0.ttl) \($0.addresses)" } == [
                "db.example.test 10 10.0.0.2,10.0.0.3"
            ])
    }

    @Test func theJanitorRefreshesNamesInUse() {
        var dns = cache()
        _ = dns.lookup("a.example.test", now: start)
        _ = dns.resolved("a.example.test", addresses: ["10.0.0.1"], now: start)
        _ = dns.lookup("b.example.test", now: start)
        _ = dns.resolved("b.example.test", addresses: ["10.0.0.2"], now: start + .seconds(10))
        #expect(dns.due(now: start + .seconds(14)).isEmpty)
        #expect(dns.due(now: start + .seconds(15)) == ["a.example.test"])
        #expect(dns.due(now: start + .seconds(16)).isEmpty)  // under way already
        #expect(dns.due(now: start + .seconds(25)) == ["b.example.test"])
    }

    @Test func failuresAreKeptForDnsNxdomainTTL() {
        var dns = cache()
        #expect(dns.lookup("gone.example.test", now: start) == .resolve)
        dns.failed("gone.example.test", reason: "no such host (NXDOMAIN)", now: start)
        #expect(dns.lookup("gone.example.test", now: start + .seconds(4)) == .failed("no such host (NXDOMAIN)"))
        #expect(dns.lookup("gone.example.test", now: start + .seconds(5)) == .resolve)
        #expect(dns.lookup("gone.example.test", now: start + .seconds(5)) == .wait)  // for that answer
        #expect(dns.due(now: start + .seconds(60)).isEmpty)  // never resolved: looked up only when used
        // A name that had addresses keeps them through a failed refresh.
        _ = dns.lookup("db.example.test", now: start)
        _ = dns.resolved("db.example.test", addresses: ["10.0.0.1"], now: start)
        #expect(dns.due(now: start + .seconds(15)) == ["db.example.test"])
        dns.failed("db.example.test", reason: "no answer from name server 10.0.0.53", now: start + .seconds(20))
        #expect(dns.lookup("db.example.test", now: start + .seconds(21)) == .addresses(["10.0.0.1"], refresh: false))
        #expect(dns.lookup("db.example.test", now: start + .seconds(25)) == .addresses(["10.0.0.1"], refresh: true))
        // An empty answer is a failure.
        _ = dns.lookup("empty.example.test", now: start)
        #expect(dns.resolved("empty.example.test", addresses: [], now: start).isEmpty)
        #expect(dns.lookup("empty.example.test", now: start) == .failed("no address"))
    }

    @Test func aChangedZoneSerialLooksItsNamesUpAgain() {
        var dns = cache(zoneCheck: .seconds(30))
        for (host, address) in [
            ("a.example.test", "10.0.0.1"), ("b.example.test", "10.0.0.2"), ("c.other.test", "10.0.0.3"),
        ] {
            _ = dns.lookup(host, now: start)
            _ = dns.resolved(host, addresses: [address], now: start)
        }
        _ = dns.lookup("plain", now: start)  // no dot: no zone
        #expect(dns.zonesDue(now: start) == ["example.test", "other.test"])
        #expect(dns.zonesDue(now: start + .seconds(29)).isEmpty)
        #expect(dns.zoneSerial("example.test", serial: 7).isEmpty)  // the first serial: nothing to compare
        #expect(dns.zoneSerial("example.test", serial: 7).isEmpty)
        #expect(dns.zoneSerial("example.test", serial: 8) == ["a.example.test", "b.example.test"])
        #expect(dns.zoneSerial("unknown.test", serial: 1).isEmpty)
        #expect(dns.zonesDue(now: start + .seconds(30)) == ["example.test", "other.test"])
        #expect(dns.zoneRows().map { "\($0.zone) \($0.serial) \($0.count)" } == ["example.test 8 2", "other.test 0 1"])
        var off = cache()  // dns_zone_check_period = 0
        _ = off.lookup("a.example.test", now: start)
        #expect(off.zonesDue(now: start).isEmpty)
        // RELOAD: names no database uses are dropped, and zones left empty with them.
        dns.keep(only: ["a.example.test"])
        #expect(dns.hostRows(now: start).map(\.host) == ["a.example.test"])
        #expect(dns.zoneRows().map(\.zone) == ["example.test"])
    }

    @Test func addressesAreNeverLookedUp() {
        #expect(DNSCache.isAddress("127.0.0.1"))
        #expect(DNSCache.isAddress("::1"))
        #expect(!DNSCache.isAddress("db.example.test"))
        #expect(!DNSCache.isAddress("1.2.3"))
        #expect(!DNSCache.isAddress("300.1.1.1"))
        #expect(DNSCache.zone(of: "db.example.test") == "example.test")
        #expect(DNSCache.zone(of: "localhost") == "")
    }

    @Test func theConsoleShowsTheCache() {
        var dns = cache()
        _ = dns.lookup("db.example.test", now: start)
        _ = dns.resolved("db.example.test", addresses: ["10.0.0.1", "::1"], now: start)
        let hosts = AdminViews.dnsHosts(dns, now: start + .seconds(1))
        #expect(hosts.columns == ["hostname", "ttl", "addrs"])
        #expect(hosts.rows == [["db.example.test", "14", "10.0.0.1,::1"]])
        let zones = AdminViews.dnsZones(dns)
        #expect(zones.columns == ["zonename", "serial", "count"])
        #expect(zones.rows == [["example.test", "0", "1"]])
    }
}
