import CAres
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import TidepoolCore

#if canImport(Glibc)
    import Glibc
#endif

/// Server host names and zone serials through c-ares, the resolver PgBouncer uses: it reads
/// /etc/hosts and resolv.conf (search, ndots, timeout, attempts), asks each name server from a
/// connected socket with a random id and source port, takes an answer only for the question it
/// asked, follows CNAME chains, and asks again over TCP when an answer is truncated. `DNSCache`
/// stays the policy (how long an answer is kept, who waits for it); this only asks.
///
/// A c-ares channel is used by one thread at a time, so it lives on a thread of its own, which
/// sleeps in poll(2) on the channel's sockets and a wake-up pipe.
final class NameResolver: @unchecked Sendable {
    struct Failure: Error, CustomStringConvertible {
        var reason: String
        var description: String { reason }
    }

    enum Request {
        case addresses(String, EventLoopPromise<[String]>)
        case soaSerial(String, EventLoopPromise<UInt32>)

        func fail(_ reason: String) {
            switch self {
            case .addresses(_, let promise): promise.fail(Failure(reason: reason))
            case .soaSerial(_, let promise): promise.fail(Failure(reason: reason))
            }
        }
    }

    private struct Inbox {
        var requests: [Request] = []
        var stopping = false
    }

    private let inbox = NIOLockedValueBox(Inbox())
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let resolvConf: String?
    private var thread: Thread?

    /// `resolvConf`: the resolv.conf to read instead of the system's (its `nameserver` lines may
    /// name a port: `127.0.0.1:5353`, `[::1]:5353`).
    init(resolvConf: String?) {
        self.resolvConf = resolvConf
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) == 0 {
            for fd in fds {
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            }
        }
        wakeRead = fds[0]
        wakeWrite = fds[1]
        let thread = Thread { [self] in run() }
        thread.name = "tidepool-dns"
        self.thread = thread
        thread.start()
    }

    /// The addresses of `host`, as the socket layer writes them.
    func addresses(of host: String, on loop: EventLoop) -> EventLoopFuture<[String]> {
        let promise = loop.makePromise(of: [String].self)
        submit(.addresses(host, promise))
        return promise.futureResult
    }

    /// The serial of `zone`'s SOA record.
    func soaSerial(of zone: String, on loop: EventLoop) -> EventLoopFuture<UInt32> {
        let promise = loop.makePromise(of: UInt32.self)
        submit(.soaSerial(zone, promise))
        return promise.futureResult
    }

    /// Ends the thread; questions not answered yet fail.
    func stop() {
        let stopped = inbox.withLockedValue { inbox -> Bool in
            defer { inbox.stopping = true }
            return inbox.stopping
        }
        if !stopped { wake() }
    }

    private func submit(_ request: Request) {
        let stopped = inbox.withLockedValue { inbox -> Bool in
            if !inbox.stopping { inbox.requests.append(request) }
            return inbox.stopping
        }
        if stopped { request.fail("the pooler is stopping") } else { wake() }
    }

    private func wake() {
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
    }

    // MARK: The resolver's thread

    private func run() {
        var channel: ares_channel?
        let status = Self.makeChannel(&channel, resolvConf: resolvConf)
        var fds: [pollfd] = []
        while true {
            let (requests, stopping) = inbox.withLockedValue { inbox -> ([Request], Bool) in
                defer { inbox.requests.removeAll() }
                return (inbox.requests, inbox.stopping)
            }
            guard !stopping else {
                for request in requests { request.fail("the pooler is stopping") }
                break
            }
            for request in requests {
                guard status == ARES_SUCCESS, let channel else {
                    request.fail("resolver not available: \(String(cString: ares_strerror(status)))")
                    continue
                }
                Self.start(request, on: channel)
            }
            fds.removeAll(keepingCapacity: true)
            fds.append(pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0))
            var timeout: Int32 = -1
            if let channel {
                var sockets = [ares_socket_t](repeating: ARES_SOCKET_BAD, count: Int(ARES_GETSOCK_MAXNUM))
                let bits = ares_getsock(channel, &sockets, ARES_GETSOCK_MAXNUM)
                for (i, socket) in sockets.enumerated() {
                    var events: Int16 = 0
                    if bits & (1 << i) != 0 { events |= Int16(POLLIN) }
                    if bits & (1 << (i + Int(ARES_GETSOCK_MAXNUM))) != 0 { events |= Int16(POLLOUT) }
                    if events != 0 { fds.append(pollfd(fd: socket, events: events, revents: 0)) }
                }
                var room = timeval()
                if let next = ares_timeout(channel, nil, &room) {
                    timeout = Int32(clamping: next.pointee.tv_sec * 1000 + Int(next.pointee.tv_usec) / 1000 + 1)
                }
            }
            let ready = poll(&fds, nfds_t(fds.count), timeout)
            if ready > 0, fds[0].revents != 0 {
                var drain = [UInt8](repeating: 0, count: 64)
                while read(wakeRead, &drain, drain.count) > 0 {}
            }
            guard let channel else { continue }
            for entry in fds.dropFirst() where entry.revents != 0 {
                let readable = entry.revents & Int16(POLLIN | POLLERR | POLLHUP) != 0
                let writable = entry.revents & Int16(POLLOUT) != 0
                ares_process_fd(channel, readable ? entry.fd : ARES_SOCKET_BAD, writable ? entry.fd : ARES_SOCKET_BAD)
            }
            ares_process_fd(channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD)  // timeouts
        }
        if let channel {
            ares_cancel(channel)  // every question's callback runs, failing its promise
            ares_destroy(channel)
        }
        close(wakeRead)
        close(wakeWrite)
    }

    private static let initialized: Int32 = ares_library_init(ARES_LIB_INIT_ALL)

    private static func makeChannel(_ channel: inout ares_channel?, resolvConf: String?) -> Int32 {
        guard initialized == ARES_SUCCESS else { return initialized }
        var options = ares_options()
        var mask = ARES_OPT_FLAGS
        options.flags = ARES_FLAG_EDNS
        var path: UnsafeMutablePointer<CChar>? = nil
        if let resolvConf {
            path = strdup(resolvConf)
            options.resolvconf_path = path
            mask |= ARES_OPT_RESOLVCONF
        }
        defer { free(path) }
        let status = ares_init_options(&channel, &options, mask)
        guard status == ARES_SUCCESS, let resolvConf, let made = channel else { return status }
        // c-ares reads a nameserver line without a port; the file's own list, ports and all, wins.
        let text = (try? String(contentsOfFile: resolvConf, encoding: .utf8)) ?? ""
        return ares_set_servers_ports_csv(made, ResolverSettings.parse(text).csv)
    }

    private final class Question {
        let request: Request
        init(_ request: Request) { self.request = request }
    }

    private static func start(_ request: Request, on channel: ares_channel) {
        let context = Unmanaged.passRetained(Question(request)).toOpaque()
        switch request {
        case .addresses(let host, _):
            var hints = ares_addrinfo_hints()
            hints.ai_family = AF_UNSPEC
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = ARES_AI_NOSORT
            ares_getaddrinfo(channel, host, nil, &hints, addressesAnswered, context)
        case .soaSerial(let zone, _):
            ares_query(channel, zone, Int32(ns_c_in.rawValue), Int32(ns_t_soa.rawValue), soaAnswered, context)
        }
    }

    private static let addressesAnswered: ares_addrinfo_callback = { context, status, _, result in
        let question = Unmanaged<Question>.fromOpaque(context!).takeRetainedValue()
        guard case .addresses(_, let promise) = question.request else { return }
        defer { if let result { ares_freeaddrinfo(result) } }
        guard status == ARES_SUCCESS, let result else {
            promise.fail(Failure(reason: String(cString: ares_strerror(status))))
            return
        }
        var addresses: [String] = []
        var node = result.pointee.nodes
        while let current = node {
            if let address = current.pointee.ai_addr, let text = numericHost(address, current.pointee.ai_addrlen),
                !addresses.contains(text)
            {
                addresses.append(text)
            }
            node = current.pointee.ai_next
        }
        if addresses.isEmpty {
            promise.fail(Failure(reason: "no address"))
        } else {
            promise.succeed(addresses)
        }
    }

    private static let soaAnswered: ares_callback = { context, status, _, answer, length in
        let question = Unmanaged<Question>.fromOpaque(context!).takeRetainedValue()
        guard case .soaSerial(_, let promise) = question.request else { return }
        var soa: UnsafeMutablePointer<ares_soa_reply>?
        guard status == ARES_SUCCESS, let answer else {
            promise.fail(Failure(reason: String(cString: ares_strerror(status))))
            return
        }
        let parsed = ares_parse_soa_reply(answer, length, &soa)
        guard parsed == ARES_SUCCESS, let soa else {
            promise.fail(Failure(reason: String(cString: ares_strerror(parsed))))
            return
        }
        let serial = soa.pointee.serial
        ares_free_data(soa)
        promise.succeed(serial)
    }

    /// An address as the socket layer writes it, so that a server's address compares equal.
    private static func numericHost(_ address: UnsafeMutablePointer<sockaddr>, _ length: ares_socklen_t) -> String? {
        var text = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        guard getnameinfo(address, socklen_t(length), &text, socklen_t(text.count), nil, 0, NI_NUMERICHOST) == 0 else {
            return nil
        }
        let raw = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (try? SocketAddress(ipAddress: raw, port: 0))?.ipAddress ?? raw
    }
}
