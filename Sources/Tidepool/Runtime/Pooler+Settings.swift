import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TidepoolCore

/// The configuration in force and RELOAD: read again, checked, then swapped in without dropping a
/// client; HBA rules and TLS contexts reloaded with it.
extension Pooler {
    /// The configuration and auth file in force; RELOAD swaps them.
    struct Settings {
        /// Boxed, so that a reader takes a reference out of the lock instead of a copy of the
        /// whole configuration (a login read it seven times: ~14,000 instructions of copying).
        var configBox: ConfigBox
        var userlist: [String: PasswordSecret]

        init(config: Config, userlist: [String: PasswordSecret]) {
            configBox = ConfigBox(value: config)
            self.userlist = userlist
        }
    }

    final class ConfigBox: Sendable {
        let value: Config
        init(value: Config) { self.value = value }
    }

    /// RELOAD: reads the configuration and auth file again and applies them to the pools (sizes,
    /// limits, timeouts) without dropping a client. An invalid configuration is rejected and the
    /// old one stays.
    public func reload() throws(PostgresError) {
        LineLogHandler.reopenLogFile()
        guard let reloader else {
            throw PostgresError(code: SQLState.featureNotSupported, message: "no configuration file to reload")
        }
        let fresh: (Config, [String: PasswordSecret])
        do {
            fresh = try reloader(config.global.conffile)
        } catch {
            logger.error("RELOAD rejected, keeping the old configuration: \(error)")
            throw PostgresError(code: SQLState.invalidParameterValue, message: "RELOAD rejected: \(error)")
        }
        do {
            try loadSecurity(fresh.0)
        } catch {
            logger.error("RELOAD rejected, keeping the old configuration: \(error)")
            throw PostgresError(code: SQLState.invalidParameterValue, message: "RELOAD rejected: \(error)")
        }
        let old = config
        settings.withLockedValue { $0 = Settings(config: fresh.0, userlist: fresh.1) }
        credentials.configured(fresh.0, forgetAnswers: true)
        let g = fresh.0.global
        if g.listenAddr != old.global.listenAddr || g.listenPort != old.global.listenPort
            || g.unixSocketDir != old.global.unixSocketDir
        {
            logger.warning("RELOAD: listen_addr, listen_port and unix_socket_dir take effect after a restart")
        }
        for warning in fresh.0.warnings { logger.warning("\(warning)") }
        applyPoolSettings(fresh.0)
        // Servers made with connection settings that changed go as RECONNECT would send them.
        let now = NIODeadline.now()
        if let changed = old.databasesToReconnect(after: fresh.0) {
            for database in changed { pools.withPool { $0.reconnect(database: database, now: now) } }
            if !changed.isEmpty { logger.info("RELOAD: servers of \(changed.joined(separator: ", ")) are replaced") }
        } else {
            pools.withPool { $0.reconnect(database: nil, now: now) }
            logger.info("RELOAD: every server is replaced")
        }
        logger.info("RELOAD: configuration applied")
    }

    /// SET from the admin console: one setting changed at run time; certificates and HBA rules
    /// are loaded now, and a bad file refuses it.
    func set(_ key: String, _ value: String) throws(PostgresError) {
        var fresh = config
        try fresh.set(key, value)
        if key.hasPrefix("client_tls_") || key.hasPrefix("server_tls_") || key.hasPrefix("auth_") {
            do { try loadSecurity(fresh) } catch {
                throw PostgresError(code: SQLState.invalidParameterValue, message: "\(error)")
            }
        }
        settings.withLockedValue { $0.configBox = ConfigBox(value: fresh) }
        applyPoolSettings(fresh)
        logger.info("SET \(key) = \(value)")
    }

    /// For --check: loads the HBA file and the TLS certificates the way start() would.
    public static func checkSecurityFiles(_ config: Config) throws {
        _ = try Security.load(config)
    }

    /// Reads the HBA file and the TLS certificates; nothing changes when one of them is bad.
    func loadSecurity(_ config: Config) throws {
        let loaded = try Security.load(config)
        securityBox.withLockedValue { $0 = loaded }
        credentials.configured(config, forgetAnswers: false)
    }

    /// Applies changed pool settings to the existing pools (RELOAD and SET).
    func applyPoolSettings(_ config: Config) {
        var logger = self.logger  // its handler's level is shared by every copy
        logger.logLevel = LineLogHandler.level(verbose: config.global.verbose + commandLineVerbose)
        statements.capacity.store(config.global.maxPreparedStatements, ordering: .relaxed)
        let g = config.global
        SyslogOutput.shared.configure(enabled: g.syslog, ident: g.syslogIdent, facility: g.syslogFacility)
        hosts.apply(config)
        let now = NIODeadline.now()
        pools.withPool { pools in
            var actions: [PoolAction] = []
            for key in pools.poolKeys {
                guard let database = config.database(named: key.database) else { continue }
                actions += pools.configure(
                    key, settings: self.pools.poolSettings(database: database, user: key.user), now: now)
            }
            return actions
        }
        // Pools of databases added or given a min_pool_size are made and warmed now, not when a
        // client first comes.
        warmStart()
    }
}
