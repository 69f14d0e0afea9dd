//! The command line as an operator uses it, without root: check-config, render, --version,
//! and status/explain against an agent that is not there.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_egress-guard");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run egress-guard")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `egress-guard render --config <example> --store <store> <extra...>`.
fn render(store: &Path, extra: &[&str]) -> Output {
    let config = example_config();
    let mut args = vec!["render", "--config", &config, "--store"];
    args.push(store.to_str().expect("temp path is UTF-8"));
    args.extend_from_slice(extra);
    run(&args)
}

fn example_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/egress-guard.toml")
        .display()
        .to_string()
}

#[test]
fn version_and_help() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("egress-guard {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--help"]);
    assert!(out.status.success());
    for command in ["run", "check-config", "render", "status", "explain"] {
        assert!(text(&out.stdout).contains(command), "help lists {command}");
    }
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let out = run(&["check-config", "--config", &example_config()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        printed.contains("overlay_network = \"10.255.0.0/16\""),
        "{printed}"
    );
    assert!(
        printed.contains("reconcile_interval = \"10s\""),
        "{printed}"
    );
}

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (body, key) in [
        (
            "allowed_networks = [\"10.0.0.0/33\"]",
            "allowed_networks[0]",
        ),
        ("reconcile_intervall = \"10s\"", "reconcile_intervall"),
        ("[log]\nformat = \"xml\"", "format"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, body).expect("write");
        let out = run(&["check-config", "--config", path.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(2), "{body}");
        let err = text(&out.stderr);
        assert!(err.contains(key), "{body}: {err}");
        assert!(
            err.contains("bad.toml") || err.contains("config key"),
            "{err}"
        );
    }
    let out = run(&["check-config", "--config", "/nonexistent/eg.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/eg.toml"));
}

#[test]
fn render_is_a_dry_run_for_a_given_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store.json");
    std::fs::write(
        &store,
        r#"{"a": {"handle": "a", "ip": "10.255.9.2", "metadata": {"container_workload": "app"}},
            "s": {"handle": "s", "ip": "10.255.9.3", "metadata": {"container_workload": "staging"}}}"#,
    )
    .expect("write store");
    let out = render(&store, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        printed.starts_with("table inet egress_guard {"),
        "{printed}"
    );
    assert!(printed.contains("type filter hook forward priority filter - 10; policy accept;"));
    assert!(printed.contains("reject with tcp reset"));
    // No host routes to 10.255.9.x here, so the staging container cannot be exempt.
    assert!(
        printed.contains("10.255.9.2      restricted a: running app container"),
        "{printed}"
    );
    assert!(
        printed.contains("10.255.9.3      restricted s:"),
        "{printed}"
    );
    assert!(printed.contains("no host route"), "{printed}");

    let out = render(&store, &["--json"]);
    assert!(out.status.success());
    let batch: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(batch["nftables"].as_array().is_some_and(|a| a.len() > 5));
}

#[test]
fn render_refuses_a_corrupt_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store.json");
    std::fs::write(&store, "{\"a\": {\"ip\": ").expect("write");
    let out = render(&store, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not valid JSON"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn status_and_explain_report_an_unreachable_agent() {
    // Port 9 on loopback: nothing listens there.
    let out = run(&["status", "--addr", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("cannot reach egress-guard"));
    let out = run(&["explain", "10.255.0.2", "--addr", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(3));
}
