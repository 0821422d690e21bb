import NIOCore
import Testing

@testable import TidepoolCore

@Suite struct DNSTests {
    let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func cache(zoneCheck: TimeAmount = .zero) -> DNSCache {
        DNSCache(maxTTL: .seconds(15), nxdomainTTL: .seconds(5), zoneCheckPeriod: zoneCheck)
    }

    @Test func resolvConfNameServersKeepTheirPorts() {
        let conf = ResolverSettings.parse(
            "# comment\nnameserver 127.0.0.1:5353\nnameserver 10.0.0.53\nnameserver [::1]:53\noptions timeout:2 attempts:3 rotate\n"
        )
        #expect(conf.nameservers.map(\.host) == ["127.0.0.1", "10.0.0.53", "::1"])
        #expect(conf.nameservers.map(\.port) == [5353, 53, 53])
        #expect(conf.csv == "127.0.0.1:5353,10.0.0.53:53,[::1]:53")
        #expect(ResolverSettings.parse("").nameservers.map(\.host) == ["127.0.0.1"])
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
