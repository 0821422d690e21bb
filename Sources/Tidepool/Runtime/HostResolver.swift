import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// Server host names to addresses, through `DNSCache`: the system resolver (getaddrinfo, on
/// NIO's blocking-work threads), or with `resolv_conf` the name servers it lists, asked here
/// (after /etc/hosts). SOA serials for dns_zone_check_period are asked the same way.
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

    static func readText(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

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
        let settings = config.global.resolvConf.map { ResolverSettings.parse(Self.readText($0)) }
        let answer: EventLoopFuture<[String]>
        if let settings {
            answer = askNameServers(host, settings: settings)
        } else {
            answer = NIOThreadPool.singleton.runIfActive(eventLoop: loops[0]) { try Self.systemLookup(host) }
        }
        answer.whenComplete { result in self.lookupFinished(host, result) }
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
                d.cache.failed(host, reason: "\((error as? LookupFailure)?.reason ?? "\(error)")", now: now)
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
        guard !zones.isEmpty else { return }
        let path = config.global.resolvConf ?? "/etc/resolv.conf"
        let settings = ResolverSettings.parse(Self.readText(path))
        for zone in zones {
            ask(zone, type: .soa, settings: settings).whenSuccess { answer in
                guard let serial = answer.serial else { return }
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

    /// getaddrinfo: blocking, so run on NIO's thread pool.
    static func systemLookup(_ host: String) throws -> [String] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, nil, &hints, &list)
        guard status == 0, let first = list else {
            throw LookupFailure(host: host, reason: String(cString: gai_strerror(status)))
        }
        defer { freeaddrinfo(first) }
        var addresses: [String] = []
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let current = entry {
            var text = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            if getnameinfo(
                current.pointee.ai_addr, current.pointee.ai_addrlen, &text, socklen_t(text.count), nil, 0,
                NI_NUMERICHOST) == 0
            {
                let address = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if !addresses.contains(address) { addresses.append(address) }
            }
            entry = current.pointee.ai_next
        }
        return addresses
    }

    /// /etc/hosts first, then A and AAAA queries to resolv_conf's name servers.
    private func askNameServers(_ host: String, settings: ResolverSettings) -> EventLoopFuture<[String]> {
        let loop = loops[0]
        let listed = HostsFile.addresses(of: host, in: Self.readText("/etc/hosts"))
        if !listed.isEmpty { return loop.makeSucceededFuture(listed) }
        let v4 = ask(host, type: .a, settings: settings)
        let v6 = ask(host, type: .aaaa, settings: settings)
        return v4.and(v6).flatMapThrowing { a, aaaa in
            switch DNSMessage.addresses(a, aaaa) {
            case .success(let addresses):
                // The form the socket layer writes, so that a server's address compares equal.
                return addresses.map { (try? SocketAddress(ipAddress: $0, port: 0))?.ipAddress ?? $0 }
            case .failure(let reason): throw LookupFailure(host: host, reason: reason.text)
            }
        }
    }

    /// One question to the name servers in turn (settings.attempts rounds), each given
    /// settings.timeoutSeconds.
    func ask(_ name: String, type: DNSMessage.RecordType, settings: ResolverSettings)
        -> EventLoopFuture<DNSMessage.Answer>
    {
        var tries: [(host: String, port: Int)] = []
        for _ in 0..<settings.attempts { tries += settings.nameservers }
        return Self.ask(name, type: type, tries[...], timeout: .seconds(Int64(settings.timeoutSeconds)), on: loops[0])
    }

    private static func ask(
        _ name: String, type: DNSMessage.RecordType, _ tries: ArraySlice<(host: String, port: Int)>,
        timeout: TimeAmount, on loop: EventLoop
    ) -> EventLoopFuture<DNSMessage.Answer> {
        let asked = DNSQuery.send(name: name, type: type, to: tries.first!, timeout: timeout, on: loop)
        guard tries.count > 1 else { return asked }
        return asked.flatMapError { _ in ask(name, type: type, tries.dropFirst(), timeout: timeout, on: loop) }
    }
}

/// One DNS question over UDP, on a socket of its own; answered or timed out.
final class DNSQuery: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    struct Timeout: Error, CustomStringConvertible {
        var server: String
        var description: String { "no answer from name server \(server)" }
    }

    let id: UInt16
    let promise: EventLoopPromise<DNSMessage.Answer>

    init(id: UInt16, promise: EventLoopPromise<DNSMessage.Answer>) {
        self.id = id
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        guard let answer = try? DNSMessage.decode(Array(envelope.data.readableBytesView)), answer.id == id else {
            return  // not ours (a late answer to an earlier question): keep waiting
        }
        promise.succeed(answer)
    }

    static func send(
        name: String, type: DNSMessage.RecordType, to server: (host: String, port: Int), timeout: TimeAmount,
        on loop: EventLoop
    ) -> EventLoopFuture<DNSMessage.Answer> {
        let id = UInt16.random(in: .min ... .max)
        let promise = loop.makePromise(of: DNSMessage.Answer.self)
        guard let query = DNSMessage.query(id: id, name: name, type: type),
            let address = try? SocketAddress(ipAddress: server.host, port: server.port)
        else {
            promise.fail(Pooler.LookupFailure(host: name, reason: "cannot be asked for"))
            return promise.futureResult
        }
        let handler = DNSQuery(id: id, promise: promise)
        let bound = DatagramBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(handler) }
            }
            .bind(host: address.protocol == .inet6 ? "::" : "0.0.0.0", port: 0)
        bound.whenComplete { result in
            switch result {
            case .failure(let error): promise.fail(error)
            case .success(let channel):
                let timer = loop.scheduleTask(in: timeout) { promise.fail(Timeout(server: server.host)) }
                promise.futureResult.whenComplete { _ in
                    timer.cancel()
                    channel.close(promise: nil)
                }
                let data = channel.allocator.buffer(bytes: query)
                channel.writeAndFlush(AddressedEnvelope(remoteAddress: address, data: data)).whenFailure {
                    promise.fail($0)
                }
            }
        }
        return promise.futureResult
    }
}
