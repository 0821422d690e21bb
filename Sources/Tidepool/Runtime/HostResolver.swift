import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// What the host resolver needs of the pooler: to close the servers open to addresses a name no
/// longer has.
protocol ResolvedHostsOwner: AnyObject, Sendable {
    /// `host`'s answer dropped `gone`: its servers open to them are to be closed.
    func addressesDropped(host: String, gone: [String], answered: [String], now: NIODeadline)
}

/// Server host names to addresses, through `DNSCache` (the policy) and `NameResolver` (c-ares,
/// with the system's resolv.conf or `resolv_conf`). SOA serials for dns_zone_check_period are
/// asked the same way.
final class HostResolver: Sendable {
    struct DNSState {
        var cache: DNSCache
        /// Connects waiting for a name's first answer.
        var waiters: [String: [EventLoopPromise<[String]>]] = [:]
    }

    struct LookupFailure: Error, CustomStringConvertible {
        var host: String
        var reason: String
        var description: String { "could not resolve host \"\(host)\": \(reason)" }
    }

    private let dns: NIOLockedValueBox<DNSState>
    /// Asks c-ares for host names and zone serials (resolv_conf cannot change while running).
    private let names: NameResolver
    /// Where lookups' answers arrive.
    private let loop: EventLoop
    private let logger: Logger
    /// The pooler, which owns the resolver and outlives it.
    private unowned let owner: any ResolvedHostsOwner

    init(_ global: GlobalSettings, loop: EventLoop, logger: Logger, owner: any ResolvedHostsOwner) {
        dns = NIOLockedValueBox(
            DNSState(
                cache: DNSCache(
                    maxTTL: global.dnsMaxTTL, nxdomainTTL: global.dnsNxdomainTTL,
                    zoneCheckPeriod: global.dnsZoneCheckPeriod)))
        names = NameResolver(resolvConf: global.resolvConf)
        self.loop = loop
        self.logger = logger
        self.owner = owner
    }

    /// The DNS cache as it is now, for the console.
    var cache: DNSCache { dns.withLockedValue { $0.cache } }

    func stop() { names.stop() }

    /// Connects `bootstrap` to `address`: a socket path, an address as written, or the addresses
    /// of a host name one after the other until one takes the connection.
    func connect(_ bootstrap: ClientBootstrap, to address: ServerConnection.Address, on loop: EventLoop)
        -> EventLoopFuture<Channel>
    {
        switch address {
        case .unix(let path):
            return bootstrap.connect(unixDomainSocketPath: path)
        case .tcp(let host, let port):
            let bootstrap = SharedBootstrap(value: bootstrap)
            return addresses(of: host, on: loop).flatMap { addresses in
                Self.connectFirst(bootstrap, addresses.compactMap { try? SocketAddress(ipAddress: $0, port: port) })
            }
        }
    }

    private static func connectFirst(_ bootstrap: SharedBootstrap, _ addresses: [SocketAddress])
        -> EventLoopFuture<Channel>
    {
        guard let first = addresses.first else {
            return bootstrap.value.connect(host: "", port: 0)  // fails with the resolver's own error
        }
        let attempt = bootstrap.value.connect(to: first)
        guard addresses.count > 1 else { return attempt }
        return attempt.flatMapError { _ in connectFirst(bootstrap, Array(addresses.dropFirst())) }
    }

    /// A bootstrap is settings only: connecting with it from whichever thread an answer arrives
    /// on is safe, though NIO does not mark it Sendable.
    struct SharedBootstrap: @unchecked Sendable {
        let value: ClientBootstrap
    }

    /// The addresses to try for `host`, the next one first.
    func addresses(of host: String, on loop: EventLoop) -> EventLoopFuture<[String]> {
        if DNSCache.isAddress(host) { return loop.makeSucceededFuture([host]) }
        let now = NIODeadline.now()
        let (lookup, waiter) = dns.withLockedValue { d -> (DNSCache.Lookup, EventLoopPromise<[String]>?) in
            let lookup = d.cache.lookup(host, now: now)
            switch lookup {
            case .resolve, .wait:
                let promise = loop.makePromise(of: [String].self)
                d.waiters[host, default: []].append(promise)
                return (lookup, promise)
            case .addresses, .failed: return (lookup, nil)
            }
        }
        switch lookup {
        case .addresses(let addresses, let refresh):
            if refresh { startLookup(host) }
            return loop.makeSucceededFuture(addresses)
        case .failed(let reason):
            return loop.makeFailedFuture(LookupFailure(host: host, reason: reason))
        case .resolve:
            startLookup(host)
            return waiter!.futureResult
        case .wait:
            return waiter!.futureResult
        }
    }

    /// Looks `host` up and tells the cache; an answer that drops addresses closes the servers
    /// open to them once they are released.
    private func startLookup(_ host: String) {
        names.addresses(of: host, on: loop).whenComplete { result in self.lookupFinished(host, result) }
    }

    private func lookupFinished(_ host: String, _ result: Result<[String], Error>) {
        let now = NIODeadline.now()
        var gone: [String] = []
        var answered: [String] = []
        let waiters = dns.withLockedValue { d in
            switch result {
            case .success(let addresses):
                answered = addresses
                gone = d.cache.resolved(host, addresses: addresses, now: now)
            case .failure(let error):
                d.cache.failed(host, reason: "\(error)", now: now)
            }
            let waiting = d.waiters.removeValue(forKey: host) ?? []
            return waiting.map { ($0, d.cache.lookup(host, now: now)) }
        }
        for (promise, lookup) in waiters {
            switch lookup {
            case .addresses(let addresses, _): promise.succeed(addresses)
            case .failed(let reason): promise.fail(LookupFailure(host: host, reason: reason))
            case .resolve, .wait: promise.fail(LookupFailure(host: host, reason: "no answer"))
            }
        }
        if case .failure(let error) = result { logger.warning("DNS lookup failed: \(host): \(error)") }
        if !gone.isEmpty { owner.addressesDropped(host: host, gone: gone, answered: answered, now: now) }
    }

    /// The janitor's part: names whose answer is too old are looked up again, and zones' SOA
    /// serials asked for every dns_zone_check_period.
    func refresh(now: NIODeadline) {
        let (hosts, zones) = dns.withLockedValue { ($0.cache.due(now: now), $0.cache.zonesDue(now: now)) }
        for host in hosts { startLookup(host) }
        for zone in zones {
            names.soaSerial(of: zone, on: loop).whenSuccess { serial in
                let changed = self.dns.withLockedValue { $0.cache.zoneSerial(zone, serial: serial) }
                if !changed.isEmpty {
                    self.logger.info(
                        "DNS: zone \(zone) serial now \(serial): looking up \(changed.joined(separator: ","))")
                }
                for host in changed { self.startLookup(host) }
            }
        }
    }

    /// RELOAD and SET: new TTLs, and names no database uses any more forgotten.
    func apply(_ config: Config) {
        let g = config.global
        let hosts = Set(config.databases.values.flatMap(\.hosts))
        dns.withLockedValue { d in
            d.cache.maxTTL = g.dnsMaxTTL
            d.cache.nxdomainTTL = g.dnsNxdomainTTL
            d.cache.zoneCheckPeriod = g.dnsZoneCheckPeriod
            d.cache.keep(only: hosts)
        }
    }
}
