import CoreMetrics
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import TidepoolCore

/// Tidepool's metrics in a Prometheus registry, through swift-metrics. Gauges and counters are
/// brought up to date from the pools and the traffic book when scraped; histograms are recorded as
/// transactions and queries finish (once per transaction or query, never per message).
final class PoolerMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    let factory: PrometheusMetricsFactory
    let instance: String
    /// Counter values already reported, per database: a scrape adds the difference.
    private let reported = NIOLockedValueBox([String: TrafficStats]())
    private let timers = NIOLockedValueBox([String: DatabaseTimers]())

    /// Histograms of one database, shared by its clients.
    final class DatabaseTimers: Sendable {
        let wait: CoreMetrics.Timer
        let transaction: CoreMetrics.Timer
        let query: CoreMetrics.Timer

        func record(_ kind: LatencySet.Kind, microseconds: Int) {
            let timer =
                switch kind {
                case .wait: wait
                case .query: query
                case .transaction: transaction
                }
            timer.recordNanoseconds(microseconds * 1000)
        }

        init(database: String, instance: String, factory: MetricsFactory) {
            let dimensions = [("database", database), ("instance_id", instance)]
            wait = Timer(label: "tidepool_wait_time_seconds", dimensions: dimensions, factory: factory)
            transaction = Timer(label: "tidepool_transaction_time_seconds", dimensions: dimensions, factory: factory)
            query = Timer(label: "tidepool_query_time_seconds", dimensions: dimensions, factory: factory)
        }
    }

    init(instance: String) {
        self.instance = instance
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10),
        ]
        self.factory = factory
    }

    func timers(for database: String) -> DatabaseTimers {
        timers.withLockedValue { all in
            if let existing = all[database] { return existing }
            let made = DatabaseTimers(database: database, instance: instance, factory: factory)
            all[database] = made
            return made
        }
    }

    func count(_ name: String, _ dimensions: [(String, String)], by amount: Int = 1) {
        guard amount > 0 else { return }
        Counter(label: name, dimensions: dimensions + [("instance_id", instance)], factory: factory)
            .increment(by: amount)
    }

    /// A pool event worth counting (pre-ping failures, recycling, reserve use, wait timeouts).
    func note(_ event: PoolEvent, pool: PoolKey) {
        let dimensions = [("database", pool.database), ("user", pool.user)]
        switch event {
        case .checkFailed: count("tidepool_preping_failures_total", dimensions)
        case .recycledForAge(_): count("tidepool_recycled_servers_total", dimensions + [("reason", "lifetime")])
        case .closedIdle(_): count("tidepool_recycled_servers_total", dimensions + [("reason", "idle")])
        case .reserveOpened: count("tidepool_reserve_uses_total", dimensions)
        case .waitTimedOut: count("tidepool_pool_timeouts_total", dimensions)
        case .probe: break
        }
    }

    /// An error the pooler itself sent a client, by SQLSTATE.
    func clientError(_ code: String) {
        count("tidepool_errors_total", [("sqlstate", code)])
    }

    /// Brings gauges and counters up to date and renders the registry in the text format.
    func render(
        snapshots: [PoolSnapshot], clients: [PoolKey: Int], pinned: [PoolKey: Int], traffic: TrafficBook,
        buffers: BufferFigures
    ) -> String {
        for (side, figures) in [("client", buffers.clients), ("server", buffers.servers)] {
            let dimensions = [("side", side), ("instance_id", instance)]
            Gauge(label: "tidepool_buffered_bytes", dimensions: dimensions, factory: factory)
                .record(Double(figures.total))
            Gauge(label: "tidepool_buffered_bytes_largest", dimensions: dimensions, factory: factory)
                .record(Double(figures.largest))
        }
        for s in snapshots {
            let dimensions = [("database", s.key.database), ("user", s.key.user), ("instance_id", instance)]
            func gauge(_ name: String, _ value: Double) {
                Gauge(label: name, dimensions: dimensions, factory: factory).record(value)
            }
            gauge("tidepool_clients_active", Double(max((clients[s.key] ?? 0) - s.waiting, 0)))
            gauge("tidepool_clients_waiting", Double(s.waiting))
            gauge("tidepool_clients_pinned", Double(pinned[s.key] ?? 0))
            gauge("tidepool_servers_active", Double(s.lent - s.checking))
            gauge("tidepool_servers_idle", Double(s.idle))
            gauge("tidepool_servers_used", 0)
            gauge("tidepool_servers_tested", Double(s.checking))
            gauge("tidepool_servers_login", Double(s.connecting))
            gauge("tidepool_max_wait_seconds", Double(s.maxWait.nanoseconds) / 1e9)
        }
        let deltas = reported.withLockedValue { reported -> [(String, TrafficStats)] in
            var out: [(String, TrafficStats)] = []
            for (database, total) in traffic.totals {
                out.append((database, total - (reported[database] ?? TrafficStats())))
                reported[database] = total
            }
            return out
        }
        for (database, d) in deltas {
            let dimensions = [("database", database)]
            count("tidepool_server_assignments_total", dimensions, by: d.serverAssignments)
            count("tidepool_transactions_total", dimensions, by: d.transactions)
            count("tidepool_queries_total", dimensions, by: d.queries)
            count("tidepool_received_bytes_total", dimensions, by: d.received)
            count("tidepool_sent_bytes_total", dimensions, by: d.sent)
            seconds("tidepool_transaction_time_seconds_total", dimensions, micros: d.transactionTime)
            seconds("tidepool_query_time_seconds_total", dimensions, micros: d.queryTime)
            seconds("tidepool_wait_time_seconds_total", dimensions, micros: d.waitTime)
            count("tidepool_client_parses_total", dimensions, by: d.clientParses)
            count("tidepool_server_parses_total", dimensions, by: d.serverParses)
            count("tidepool_binds_total", dimensions, by: d.binds)
        }
        Gauge(
            label: "tidepool_info", dimensions: [("version", TidepoolCoreVersion.string), ("instance_id", instance)],
            factory: factory
        ).record(1)
        return MetricFamilies.documented(registry.emitToString())
    }

    /// A time counter in seconds, Prometheus's base unit, from microseconds.
    func seconds(_ name: String, _ dimensions: [(String, String)], micros: Int) {
        FloatingPointCounter(label: name, dimensions: dimensions + [("instance_id", instance)], factory: factory)
            .increment(by: Double(micros) / 1e6)
    }
}

extension Pooler {
    /// Starts the HTTP listener for /metrics, /health/live and /health/ready when
    /// stats_listen_port is set.
    func startStatsListener() throws {
        let g = config.global
        guard g.statsListenPort > 0 else { return }
        let channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] channel in
                // A port of its own budget: past the cap a connection is closed at once, so that
                // scrapers left hanging cannot take the descriptors clients need.
                let admitted = statsConnections.withLockedValue { count in
                    guard count < StatsHTTPHandler.maxConnections else { return false }
                    count += 1
                    return true
                }
                guard admitted else { return channel.close() }
                channel.closeFuture.whenComplete { [self] _ in statsConnections.withLockedValue { $0 -= 1 } }
                return channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(StatsHTTPHandler(pooler: self))
                }
            }
            .bind(host: g.statsListenAddr, port: g.statsListenPort).wait()
        statsListener = channel
        logger.info("metrics and health on http://\(g.statsListenAddr):\(g.statsListenPort)/metrics")
    }

    func renderMetrics(on loop: EventLoop) -> EventLoopFuture<String> {
        bufferFigures(on: loop).map { [self] buffers in
            let now = NIODeadline.now()
            let views = pools.views(now: now)
            return metrics.render(
                snapshots: views.pools, clients: views.poolClients, pinned: views.pinned, traffic: trafficBook(),
                buffers: buffers)
        }
    }

    /// /health/ready: every configured database accepts a connection (TCP or Unix socket) within
    /// a second. Completes with the databases that did not and why.
    func readiness(on loop: EventLoop) -> EventLoopFuture<[String: String]> {
        let databases = config.databases
        let checks = databases.map { name, entry -> EventLoopFuture<(String, String?)> in
            // Through the DNS cache, as servers are opened (resolv_conf's name servers included).
            let connection = hosts.connect(
                ClientBootstrap(group: loop).connectTimeout(.seconds(1)), to: ServerConnection.Address(entry), on: loop)
            return connection.flatMap { channel in channel.close().map { (name, nil as String?) } }
                .flatMapError { error in loop.makeSucceededFuture((name, "\(error)")) }
        }
        return EventLoopFuture.whenAllSucceed(checks, on: loop).map { results in
            var failed: [String: String] = [:]
            for (name, error) in results { if let error { failed[name] = error } }
            return failed
        }
    }
}

/// Answers /metrics, /health/live and /health/ready.
final class StatsHTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    unowned let pooler: Pooler
    var path = ""
    /// Closes the connection when a request has not come whole in time (or, after an answer, the
    /// next one): a client sending nothing, or a byte now and then, is not held for ever.
    var deadline: Scheduled<Void>?

    /// At most this many connections on the stats port at once.
    static let maxConnections = 64
    /// How long a request may take to arrive, and a kept-alive connection may wait for the next.
    static let requestTimeout = TimeAmount.seconds(10)

    init(pooler: Pooler) { self.pooler = pooler }

    func handlerAdded(context: ChannelHandlerContext) { arm(context) }

    func handlerRemoved(context: ChannelHandlerContext) { deadline?.cancel() }

    func arm(_ context: ChannelHandlerContext) {
        deadline?.cancel()
        let channel = context.channel
        deadline = context.eventLoop.scheduleTask(in: Self.requestTimeout) { channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            path = String(head.uri.split(separator: "?").first ?? "")
        case .body:
            break
        case .end:
            deadline?.cancel()  // the answer may take its time (readiness waits up to a second)
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            switch path {
            case "/metrics":
                pooler.renderMetrics(on: context.eventLoop).whenSuccess { [self] text in
                    respond(loopBound.value, .ok, "text/plain; version=0.0.4", text)
                }
            case "/health/live":
                respond(context, .ok, "application/json", #"{"status":"live"}"#)
            case "/health/ready":
                pooler.readiness(on: context.eventLoop).whenSuccess { [self] failed in
                    let context = loopBound.value
                    if failed.isEmpty {
                        respond(context, .ok, "application/json", #"{"status":"ready"}"#)
                    } else {
                        let reasons = failed.sorted { $0.key < $1.key }.map {
                            "\"\(Self.escape($0.key))\":\"\(Self.escape($0.value))\""
                        }
                        respond(
                            context, .serviceUnavailable, "application/json",
                            #"{"status":"unavailable","databases":{"# + reasons.joined(separator: ",") + "}}")
                    }
                }
            default:
                respond(context, .notFound, "text/plain", "not found\n")
            }
        }
    }

    static func escape(_ text: String) -> String {
        var out = ""
        for c in text {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    func respond(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ type: String, _ body: String) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: type)
        headers.add(name: "Content-Length", value: "\(body.utf8.count)")
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))),
            promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        arm(context)
    }
}
