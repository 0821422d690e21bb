import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// Server host names to addresses, through `DNSCache` (the policy) and `NameResolver` (c-ares,
/// with the system's resolv.conf or `resolv_conf`). SOA serials for dns_zone_check_period are
/// asked the same way.
extension Pooler {
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

    /// The DNS cache as it is now, for the console.
    var dnsCache: DNSCache { dns.withLockedValue { $0.cache } }

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
    func startLookup(_ host: String) {
        resolver.addresses(of: host, on: loops[0]).whenComplete { result in self.lookupFinished(host, result) }
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
        guard !gone.isEmpty else { return }
        let ids = shared.withLockedValue { s in
            Set(
                s.servers.compactMap { id, server -> ServerID? in
                    guard case .tcp(let name, _) = server.address, name == host,
                        let remote = server.remoteIP, gone.contains(remote)
                    else { return nil }
                    return id
                })
        }
        logger.info(
            "DNS: \(host) is now \(answered.joined(separator: ",")), no longer \(gone.joined(separator: ",")): \(ids.count) server(s) to close"
        )
        if !ids.isEmpty { withPool { $0.reconnect(servers: ids, now: now) } }
    }

    /// The janitor's part: names whose answer is too old are looked up again, and zones' SOA
    /// serials asked for every dns_zone_check_period.
    func refreshHostNames(now: NIODeadline) {
        let (hosts, zones) = dns.withLockedValue { ($0.cache.due(now: now), $0.cache.zonesDue(now: now)) }
        for host in hosts { startLookup(host) }
        for zone in zones {
            resolver.soaSerial(of: zone, on: loops[0]).whenSuccess { serial in
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
    func applyDNSSettings(_ config: Config) {
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
