//! What a configuration reload (SIGHUP) changes in a running agent, and what needs a restart.

use super::Config;

/// The keys a reload applies, for logs and the documentation.
pub const RELOADED_KEYS: &[&str] = &[
    "enabled",
    "mode",
    "allowed_networks",
    "exempt_workloads",
    "rules",
    "dns.allowed_suffixes",
    "dns.refuse_with",
    "dns.per_container_qps",
    "dns.per_container_burst",
];

impl Config {
    /// The keys whose new value in `new` a reload cannot apply (listeners, files, the
    /// overlay the DNS filter serves, intervals, logging): they keep their running value
    /// until a restart.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let checks: [(&'static str, bool); 14] = [
            (
                "overlay_network",
                self.overlay_network != new.overlay_network,
            ),
            ("metadata_store", self.metadata_store != new.metadata_store),
            (
                "reconcile_interval",
                self.reconcile_interval != new.reconcile_interval,
            ),
            ("log", self.log != new.log),
            ("health.listen", self.health != new.health),
            ("dns.enabled", self.dns.enabled != new.dns.enabled),
            ("dns.listen", self.dns.listen != new.dns.listen),
            ("dns.upstream", self.dns.upstream != new.dns.upstream),
            (
                "dns.max_inflight",
                self.dns.max_inflight != new.dns.max_inflight,
            ),
            (
                "dns.upstream_timeout",
                self.dns.upstream_timeout != new.dns.upstream_timeout,
            ),
            (
                "dns.per_container_tcp_connections",
                self.dns.per_container_tcp_connections != new.dns.per_container_tcp_connections,
            ),
            ("loggregator", self.loggregator != new.loggregator),
            ("metrics_tls", self.metrics_tls != new.metrics_tls),
            // `enabled` switching on a DNS filter that never started, or off one that runs,
            // changes which threads exist: the filter's side of it needs a restart.
            (
                "enabled (with [dns] enabled)",
                self.dns.enabled && self.enabled != new.enabled,
            ),
        ];
        checks
            .into_iter()
            .filter(|(_, differs)| *differs)
            .map(|(key, _)| key)
            .collect()
    }

    /// The configuration a reload runs with: `new`'s reloaded keys, and the running value of
    /// every key that needs a restart.
    pub fn reloaded(&self, new: Config) -> Config {
        let mut dns = self.dns.clone();
        dns.allowed_suffixes = new.dns.allowed_suffixes;
        dns.refuse_with = new.dns.refuse_with;
        dns.per_container_qps = new.dns.per_container_qps;
        dns.per_container_burst = new.dns.per_container_burst;
        // With a DNS filter running, `enabled` stays: the filter's thread cannot follow it.
        let enabled = if self.dns.enabled {
            self.enabled
        } else {
            new.enabled
        };
        Config {
            enabled,
            mode: new.mode,
            allowed_networks: new.allowed_networks,
            exempt_workloads: new.exempt_workloads,
            rules: new.rules,
            dns,
            obsolete: new.obsolete,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_takes_the_policy_and_keeps_the_listeners() {
        let running = Config::parse(
            "[dns]\nenabled = true\nallowed_suffixes = [\"apps.internal\"]\n[health]\nlisten = \"127.0.0.1:9851\"",
        )
        .expect("valid");
        let new = Config::parse(
            r#"
            mode = "audit"
            allowed_networks = ["10.0.0.0/8", "172.16.0.0/12"]
            reconcile_interval = "5s"
            [health]
            listen = "127.0.0.1:9999"
            [dns]
            enabled = true
            allowed_suffixes = ["apps.internal", "partner.example"]
            per_container_qps = 50
            upstream = "169.254.0.3:53"
            [[rules]]
            destination = "198.51.100.0/24"
            "#,
        )
        .expect("valid");
        assert_eq!(
            running.restart_needed(&new),
            vec!["reconcile_interval", "health.listen", "dns.upstream"]
        );
        let effective = running.reloaded(new);
        assert_eq!(effective.mode, crate::config::Mode::Audit);
        assert_eq!(effective.allowed_networks.len(), 2);
        assert_eq!(effective.rules.len(), 1);
        assert_eq!(effective.dns.allowed_suffixes.len(), 2);
        assert_eq!(effective.dns.per_container_qps, 50);
        // Kept until a restart:
        assert_eq!(effective.health, running.health);
        assert_eq!(effective.reconcile_interval, running.reconcile_interval);
        assert_eq!(effective.dns.upstream, running.dns.upstream);
        // Reloading the same file changes nothing.
        assert!(running.restart_needed(&running.clone()).is_empty());
        assert_eq!(running.reloaded(running.clone()), running);
    }

    #[test]
    fn enabled_follows_a_reload_unless_a_dns_filter_runs() {
        let running = Config::default();
        let off = Config::parse("enabled = false").expect("valid");
        assert!(!running.reloaded(off.clone()).enabled);
        assert!(running.restart_needed(&off).is_empty());
        let with_dns = Config::parse("[dns]\nenabled = true").expect("valid");
        let off_with_dns = Config::parse("enabled = false\n[dns]\nenabled = true").expect("valid");
        assert!(with_dns.reloaded(off_with_dns.clone()).enabled);
        assert_eq!(
            with_dns.restart_needed(&off_with_dns),
            vec!["enabled (with [dns] enabled)"]
        );
    }
}
