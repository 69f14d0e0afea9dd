use super::*;

fn invalid_key(text: &str) -> String {
    match Config::parse(text) {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn empty_file_gives_documented_defaults() {
    let config = Config::parse("").expect("defaults are valid");
    assert!(config.enabled);
    assert_eq!(config.overlay_network.to_string(), "10.255.0.0/16");
    assert_eq!(config.allowed_networks, vec!["10.0.0.0/8".parse().unwrap()]);
    assert!(config.allowed_v6().is_empty());
    assert_eq!(
        config.exempt_workloads,
        BTreeSet::from(["staging".to_string()])
    );
    assert_eq!(
        config.metadata_store,
        PathBuf::from("/var/vcap/data/container-metadata/store.json")
    );
    assert_eq!(config.reconcile_interval, Duration::from_secs(10));
    assert!(config.obsolete.is_empty());
    assert_eq!(config.log.level, "info");
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.health.listen, "127.0.0.1:9851".parse().unwrap());
    assert_eq!(config.mode, Mode::Enforce);
    assert!(!config.dns.enabled, "DNS filtering is opt-in");
    assert_eq!(
        config.dns.allowed_suffixes,
        vec![
            "apps.internal.".to_string(),
            "service.cf.internal.".to_string()
        ]
    );
    assert_eq!(config.dns.upstream, "169.254.0.2:53".parse().unwrap());
    assert_eq!(config.dns.listen, "0.0.0.0:9853".parse().unwrap());
    assert_eq!(config.dns.max_inflight, 256);
    assert_eq!(config.dns.per_container_tcp_connections, 8);
    assert_eq!(
        (config.dns.per_container_qps, config.dns.per_container_burst),
        (200, 400)
    );
    assert_eq!(config.dns.upstream_timeout, Duration::from_secs(2));
    assert_eq!(config.dns.refuse_with, RefuseWith::Refused);
    assert_eq!(config, Config::default());
}

#[test]
fn shipped_example_is_the_defaults() {
    let text = include_str!("../../config/egress-guard.toml");
    assert_eq!(
        Config::parse(text).expect("example parses"),
        Config::default()
    );
}

#[test]
fn every_key_can_be_set() {
    let config = Config::parse(
        r#"
        enabled = false
        overlay_network = "10.250.0.0/16"
        allowed_networks = ["10.0.0.0/8", "172.16.5.0/24", "fd00::/8"]
        exempt_workloads = ["staging", "build"]
        metadata_store = "/tmp/store.json"
        reconcile_interval = "1m 30s"
        nft = "/var/vcap/packages/nftables/sbin/nft"
        mode = "audit"
        [log]
        level = "DEBUG"
        format = "json"
        [health]
        listen = "0.0.0.0:9999"
        "#,
    )
    .expect("valid");
    assert!(!config.enabled);
    // The obsolete nft key is accepted, ignored and reported.
    assert_eq!(config.obsolete.len(), 1);
    assert!(config.obsolete[0].contains("`nft` is obsolete"));
    assert_eq!(config.allowed_networks.len(), 3);
    assert_eq!(config.allowed_v4().len(), 2);
    assert_eq!(
        config.allowed_v6(),
        vec!["fd00::/8".parse::<Ipv6Net>().expect("literal")]
    );
    assert_eq!(config.exempt_workloads.len(), 2);
    assert_eq!(config.reconcile_interval, Duration::from_secs(90));
    assert_eq!(config.log.level, "debug");
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.health.listen.port(), 9999);
    assert_eq!(config.mode, Mode::Audit);
}

#[test]
fn mode_is_strict_and_named() {
    for text in [
        "mode = \"Audit\"",
        "mode = \"dry-run\"",
        "mode = true",
        "mode = \"\"",
    ] {
        match Config::parse(text) {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(
                    message.contains("mode"),
                    "{text}: {message} should name the key"
                )
            }
            other => panic!("{text}: expected Syntax, got {other:?}"),
        }
    }
    let audit = Config::parse("mode = \"audit\"").expect("valid");
    assert!(audit.to_toml().contains("mode = \"audit\""));
    assert_eq!(Config::parse(&audit.to_toml()).expect("round trip"), audit);
}

#[test]
fn unknown_keys_are_named() {
    for (text, name) in [
        ("enable = true", "enable"),
        ("[log]\nlevl = \"info\"", "levl"),
        ("[health]\nport = 1", "port"),
        ("[nope]\n", "nope"),
    ] {
        match Config::parse(text) {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.contains(name), "{message} should name {name}")
            }
            other => panic!("{text}: expected Syntax, got {other:?}"),
        }
    }
}

#[test]
fn malformed_toml_and_wrong_types_are_syntax_errors() {
    for text in [
        "enabled = ",
        "enabled = \"yes\"",
        "allowed_networks = \"10.0.0.0/8\"",
        "[log]\nformat = \"xml\"",
    ] {
        assert!(
            matches!(Config::parse(text), Err(ConfigError::Syntax { .. })),
            "{text}"
        );
    }
}

#[test]
fn invalid_values_name_their_key() {
    assert_eq!(
        invalid_key("overlay_network = \"10.255.0.0\""),
        "overlay_network"
    );
    assert_eq!(
        invalid_key("overlay_network = \"10.255.1.0/16\""),
        "overlay_network"
    );
    assert_eq!(
        invalid_key("overlay_network = \"fd00::/8\""),
        "overlay_network"
    );
    assert_eq!(
        invalid_key("overlay_network = \"10.255.0.1/32\""),
        "overlay_network"
    );
    assert_eq!(
        invalid_key("allowed_networks = [\"10.0.0.0/8\", \"300.1.0.0/16\"]"),
        "allowed_networks[1]"
    );
    assert_eq!(
        invalid_key("allowed_networks = [\"0.0.0.0/0\"]"),
        "allowed_networks[0]"
    );
    assert_eq!(
        invalid_key("allowed_networks = [\"fd00::/8\", \"::/0\"]"),
        "allowed_networks[1]"
    );
    assert_eq!(
        invalid_key("allowed_networks = [\"fd00::1/8\"]"),
        "allowed_networks[0]"
    );
    assert_eq!(
        invalid_key("exempt_workloads = [\"\"]"),
        "exempt_workloads[0]"
    );
    assert_eq!(
        invalid_key("exempt_workloads = [\" staging\"]"),
        "exempt_workloads[0]"
    );
    assert_eq!(invalid_key("metadata_store = \"\""), "metadata_store");
    assert_eq!(invalid_key("metadata_store = \"/\""), "metadata_store");
    assert_eq!(
        invalid_key("reconcile_interval = \"ten\""),
        "reconcile_interval"
    );
    assert_eq!(
        invalid_key("reconcile_interval = \"10\""),
        "reconcile_interval"
    );
    assert_eq!(
        invalid_key("reconcile_interval = \"1ms\""),
        "reconcile_interval"
    );
    assert_eq!(
        invalid_key("reconcile_interval = \"2h\""),
        "reconcile_interval"
    );
    assert_eq!(invalid_key("[log]\nlevel = \"loud\""), "log.level");
    assert_eq!(
        invalid_key("[health]\nlisten = \"localhost:9851\""),
        "health.listen"
    );
    assert_eq!(
        invalid_key("[health]\nlisten = \"127.0.0.1\""),
        "health.listen"
    );
}

#[test]
fn every_dns_key_can_be_set() {
    let config = Config::parse(
        r#"
        [dns]
        enabled = true
        allowed_suffixes = ["Apps.Internal", "apps.internal.", "buildpacks.cloudfoundry.org."]
        upstream = "10.0.0.2:53"
        listen = "169.254.0.1:5300"
        max_inflight = 16
        upstream_timeout = "500ms"
        per_container_tcp_connections = 3
        per_container_qps = 50
        per_container_burst = 75
        refuse_with = "nxdomain"
        "#,
    )
    .expect("valid");
    assert!(config.dns.enabled);
    // Lowercased, the trailing dot added, duplicates dropped.
    assert_eq!(
        config.dns.allowed_suffixes,
        vec![
            "apps.internal.".to_string(),
            "buildpacks.cloudfoundry.org.".to_string()
        ]
    );
    assert_eq!(config.dns.upstream, "10.0.0.2:53".parse().unwrap());
    assert_eq!(config.dns.listen.port(), 5300);
    assert_eq!(config.dns.max_inflight, 16);
    assert_eq!(config.dns.upstream_timeout, Duration::from_millis(500));
    assert_eq!(config.dns.per_container_tcp_connections, 3);
    assert_eq!(
        (config.dns.per_container_qps, config.dns.per_container_burst),
        (50, 75)
    );
    assert_eq!(config.dns.refuse_with, RefuseWith::Nxdomain);
    let reparsed = Config::parse(&config.to_toml()).expect("printed config is valid input");
    assert_eq!(config, reparsed);
}

#[test]
fn invalid_dns_values_name_their_key() {
    for (text, key) in [
        ("allowed_suffixes = [\".\"]", "dns.allowed_suffixes[0]"),
        ("allowed_suffixes = [\"\"]", "dns.allowed_suffixes[0]"),
        (
            "allowed_suffixes = [\"ok.\", \"*.apps.internal\"]",
            "dns.allowed_suffixes[1]",
        ),
        ("allowed_suffixes = [\"a..b\"]", "dns.allowed_suffixes[0]"),
        (
            "allowed_suffixes = [\"exa mple.com\"]",
            "dns.allowed_suffixes[0]",
        ),
        (
            "allowed_suffixes = [\"bücher.example\"]",
            "dns.allowed_suffixes[0]",
        ),
        ("upstream = \"bosh-dns:53\"", "dns.upstream"),
        ("upstream = \"169.254.0.2\"", "dns.upstream"),
        ("upstream = \"0.0.0.0:53\"", "dns.upstream"),
        ("upstream = \"127.0.0.1:9853\"", "dns.upstream"),
        ("listen = \"127.0.0.1:9853\"", "dns.listen"),
        ("listen = \"[::]:9853\"", "dns.listen"),
        ("listen = \"0.0.0.0:0\"", "dns.listen"),
        ("max_inflight = 0", "dns.max_inflight"),
        ("max_inflight = 100000", "dns.max_inflight"),
        ("upstream_timeout = \"1ms\"", "dns.upstream_timeout"),
        (
            "per_container_tcp_connections = 0",
            "dns.per_container_tcp_connections",
        ),
        (
            "per_container_tcp_connections = 65",
            "dns.per_container_tcp_connections",
        ),
        ("upstream_timeout = \"soon\"", "dns.upstream_timeout"),
        ("per_container_qps = 0", "dns.per_container_qps"),
        ("per_container_qps = 100001", "dns.per_container_qps"),
        ("per_container_burst = 0", "dns.per_container_burst"),
        (
            "per_container_burst = 5000000000",
            "dns.per_container_burst",
        ),
    ] {
        assert_eq!(invalid_key(&format!("[dns]\n{text}")), key, "{text}");
    }
    let label = "a".repeat(64);
    assert_eq!(
        invalid_key(&format!("[dns]\nallowed_suffixes = [\"{label}.example\"]")),
        "dns.allowed_suffixes[0]"
    );
    for text in ["[dns]\nrefuse_with = \"drop\"", "[dns]\nenable = true"] {
        assert!(
            matches!(Config::parse(text), Err(ConfigError::Syntax { .. })),
            "{text}"
        );
    }
}

#[test]
fn host_bits_error_suggests_the_network() {
    let err = Config::parse("overlay_network = \"10.255.1.0/16\"").unwrap_err();
    assert!(err.to_string().contains("10.255.0.0/16"), "{err}");
}

#[test]
fn empty_allowed_networks_is_valid_and_strictest() {
    let config = Config::parse("allowed_networks = []").expect("valid");
    assert!(config.allowed_networks.is_empty());
}

#[test]
fn effective_config_round_trips_through_toml() {
    let config =
        Config::parse("reconcile_interval = \"90s\"\n[log]\nformat = \"json\"").expect("valid");
    let reparsed = Config::parse(&config.to_toml()).expect("printed config is valid input");
    assert_eq!(config, reparsed);
}

#[test]
fn load_names_the_file() {
    let err = Config::load(Path::new("/nonexistent/egress-guard.toml")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/egress-guard.toml"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "enabled = [").unwrap();
    let err = Config::load(&path).unwrap_err();
    assert!(err.to_string().contains("bad.toml"), "{err}");
}

#[test]
fn loggregator_section_is_off_by_default_and_validated() {
    let config = Config::parse("").expect("valid");
    assert!(!config.loggregator.enabled);
    assert_eq!(
        config.loggregator.address,
        "127.0.0.1:3458".parse().expect("literal")
    );
    assert_eq!(config.loggregator.server_name, "metron");
    assert_eq!(config.loggregator.lines_per_minute, 5);
    let on = Config::parse(
        "[loggregator]\nenabled = true\nca_cert = \"/c/ca.crt\"\ncert = \"/c/a.crt\"\nkey = \"/c/a.key\"\nlines_per_minute = 10\n",
    )
    .expect("valid");
    assert!(on.loggregator.enabled);
    assert_eq!(on.loggregator.lines_per_minute, 10);
    let reparsed = Config::parse(&on.to_toml()).expect("printed config is valid input");
    assert_eq!(on, reparsed);
    for (text, key) in [
        (
            "enabled = true\ncert = \"a\"\nkey = \"b\"",
            "loggregator.ca_cert",
        ),
        (
            "enabled = true\nca_cert = \"a\"\nkey = \"b\"",
            "loggregator.cert",
        ),
        (
            "enabled = true\nca_cert = \"a\"\ncert = \"b\"",
            "loggregator.key",
        ),
        ("address = \"localhost:3458\"", "loggregator.address"),
        ("server_name = \"\"", "loggregator.server_name"),
        ("lines_per_minute = 0", "loggregator.lines_per_minute"),
        ("lines_per_minute = 61", "loggregator.lines_per_minute"),
    ] {
        assert_eq!(
            invalid_key(&format!("[loggregator]\n{text}")),
            key,
            "{text}"
        );
    }
}

#[test]
fn metrics_tls_section_is_off_by_default_and_validated() {
    let config = Config::parse("").expect("valid");
    assert!(!config.metrics_tls.enabled);
    assert_eq!(
        config.metrics_tls.listen,
        "127.0.0.1:9852".parse().expect("literal")
    );
    let on = Config::parse(
        "[metrics_tls]\nenabled = true\nca_cert = \"/c/ca\"\ncert = \"/c/crt\"\nkey = \"/c/key\"\n",
    )
    .expect("valid");
    assert!(on.metrics_tls.enabled);
    assert_eq!(
        on,
        Config::parse(&on.to_toml()).expect("printed config is valid input")
    );
    for (text, key) in [
        (
            "enabled = true\ncert = \"a\"\nkey = \"b\"",
            "metrics_tls.ca_cert",
        ),
        (
            "enabled = true\nca_cert = \"a\"\nkey = \"b\"",
            "metrics_tls.cert",
        ),
        (
            "enabled = true\nca_cert = \"a\"\ncert = \"b\"",
            "metrics_tls.key",
        ),
        ("listen = \"localhost:9852\"", "metrics_tls.listen"),
    ] {
        assert_eq!(
            invalid_key(&format!("[metrics_tls]\n{text}")),
            key,
            "{text}"
        );
    }
}
