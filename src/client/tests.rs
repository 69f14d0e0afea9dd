use super::*;
use crate::health::Counts;

fn decision(handle: &str, ip: &str, workload: &str, verdict: Verdict) -> Decision {
    Decision {
        ipv6: Vec::new(),
        handle: Some(handle.into()),
        ip: Some(ip.parse().expect("literal")),
        host_ifindex: Some(7),
        host_interface: Some("s-010255000002".into()),
        workload: Some(workload.into()),
        app_id: Some("app-guid".into()),
        space_id: None,
        org_id: None,
        log_index: None,
        verdict,
        reason: "why".into(),
    }
}

#[test]
fn find_by_ip_handle_and_prefix() {
    let list = vec![
        decision("abc-123", "10.255.0.2", "app", Verdict::Restricted),
        decision("abd-456", "10.255.0.3", "staging", Verdict::Exempt),
    ];
    assert!(
        matches!(find(&list, "10.255.0.3"), Found::One(d) if d.workload.as_deref() == Some("staging"))
    );
    assert!(matches!(find(&list, "abc-123"), Found::One(_)));
    assert!(matches!(find(&list, "abd"), Found::One(_)));
    assert!(matches!(find(&list, "ab"), Found::Many(2)));
    assert!(matches!(find(&list, "10.255.0.9"), Found::None));
}

#[test]
fn explanation_says_verdict_reason_and_effect() {
    let text = format_explanation(
        &decision("abc", "10.255.0.2", "app", Verdict::Restricted),
        true,
    );
    assert!(text.starts_with("10.255.0.2 is RESTRICTED\n"), "{text}");
    assert!(text.contains("reason:    why"));
    assert!(text.contains("s-010255000002 (ifindex 7)"));
    assert!(text.contains("cannot reach"));
    let text = format_explanation(
        &decision("abc", "10.255.0.2", "staging", Verdict::Exempt),
        false,
    );
    assert!(text.contains("disabled"));
}

#[test]
fn status_table_fits_a_terminal() {
    let health = HealthBody {
        status: "ready".into(),
        enabled: true,
        last_reconcile: Some("2026-11-25T09:00:00.000Z".into()),
        last_error: None,
        containers: Counts {
            restricted: 1,
            exempt: 1,
        },
        drift_repairs: 2,
        tamper_protection: Some(true),
        ipv6_in_use: true,
        per_container_limits: Some(true),
        reason: None,
        mode: Default::default(),
        dns: None,
        app_logs: None,
    };
    let listing = StatusBody {
        enabled: true,
        tamper_protection: Some(true),
        ipv6_in_use: true,
        mode: Default::default(),
        app_logs: None,
        allowed_networks: Vec::new(),
        rules: Vec::new(),
        last_reload: None,
        containers: vec![
            decision(&"x".repeat(80), "10.255.0.2", "app", Verdict::Restricted),
            decision("short", "10.255.0.3", "staging", Verdict::Exempt),
        ],
    };
    let text = format_status("127.0.0.1:9851", true, &health, &listing);
    assert!(
        text.starts_with("egress-guard at 127.0.0.1:9851: READY; enforcing\n"),
        "{text}"
    );
    assert!(text.contains("1 restricted, 1 exempt"));
    assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
    assert!(text.contains('…'));
}

#[test]
fn blocked_prints_who_tried_what() {
    let attempt = |handle: &str, app: &str, port: Option<u16>| Attempt {
        action: crate::attribution::Action::WouldReject,
        handle: handle.into(),
        app_id: app.into(),
        space_id: "space-guid".into(),
        org_id: "org-guid".into(),
        workload: "app".into(),
        interface: "s-010255000002".into(),
        src: "10.255.0.2".parse().expect("literal"),
        dst: "203.0.113.10".parse().expect("literal"),
        protocol: "tcp".into(),
        dst_port: port,
        rules_in_scope: Vec::new(),
        count: 12,
        first_seen: "2026-11-25T09:00:00.000Z".into(),
        last_seen: "2026-11-25T09:01:00.000Z".into(),
    };
    let body = BlockedBody {
        mode: crate::config::Mode::Audit,
        attempts: vec![attempt("h1", "app-guid", Some(443)), attempt("", "", None)],
        suppressed: 7,
        attribution_error: None,
    };
    let text = format_blocked(&body);
    assert!(
        text.starts_with("mode: audit   attempts: 2   suppressed"),
        "{text}"
    );
    let first = text.lines().nth(3).expect("a row");
    let words: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(
        &words[..4],
        &[
            "2026-11-25T09:01:00",
            "would_reject",
            "10.255.0.2",
            "203.0.113.10:443/tcp"
        ],
        "{text}"
    );
    assert!(text.contains("app-guid"), "{text}");
    assert!(text.contains("org-guid / h1"), "{text}");
    assert!(
        text.contains("(not in the metadata store; s-010255000002)"),
        "{text}"
    );
    assert_eq!(
        blocked_path(&Filter {
            app_id: Some("a b".into()),
            org_id: Some("o-1".into()),
            space_id: None,
        }),
        "/blocked?app_id=a%20b&org_id=o-1"
    );
    assert_eq!(blocked_path(&Filter::default()), "/blocked");
}

#[test]
fn unreachable_agent_is_an_error() {
    // Port 9 (discard) on loopback: nothing listens there in the test environment.
    let err = get("127.0.0.1:9", "/readyz").expect_err("nothing listens");
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn status_lists_rules_and_explain_names_the_rule_that_allows() {
    let config = crate::config::Config::parse(
        r#"
        [[rules]]
        description = "tenant A's peered VPC"
        destination = "172.16.0.0/24"
        protocol = "tcp"
        ports = "5432"
        orgs = ["org-a"]

        [[rules]]
        description = "partner"
        destination = "api.partner.example"
        protocol = "tcp"
        orgs = ["org-b"]

        [dns]
        enabled = true
        "#,
    )
    .expect("valid");
    let rule = config.rules[0].clone();
    let host_rule = config.rules[1].clone();
    let listing = StatusBody {
        enabled: true,
        tamper_protection: Some(true),
        ipv6_in_use: false,
        mode: Default::default(),
        app_logs: None,
        allowed_networks: vec!["10.0.0.0/8".parse().expect("literal")],
        rules: vec![
            crate::health::RuleBody {
                index: 0,
                scope: rule.scope_text(),
                rule,
                containers: 3,
                learned_addresses: None,
            },
            crate::health::RuleBody {
                index: 1,
                scope: host_rule.scope_text(),
                rule: host_rule,
                containers: 5,
                learned_addresses: Some(2),
            },
        ],
        last_reload: None,
        containers: Vec::new(),
    };
    // /status as JSON reads back (the client parses what the agent serves).
    let json = serde_json::to_string(&listing).expect("serialise");
    let listing: StatusBody = serde_json::from_str(&json).expect("read back");
    let health: HealthBody = serde_json::from_value(serde_json::json!({
        "status": "ok", "enabled": true, "in_sync": true, "last_reconcile": null,
        "last_error": null, "containers": { "restricted": 3, "exempt": 0 },
        "drift_repairs": 0
    }))
    .expect("health body");
    let text = format_status("127.0.0.1:9851", true, &health, &listing);
    assert!(
        text.contains("[0] 172.16.0.0/24 tcp ports 5432 (\"tenant A's peered VPC\"); for orgs org-a; applies to 3 container(s)"),
        "{text}"
    );
    assert!(
        text.contains("applies to 5 container(s); 2 address(es) allowed by its answers now"),
        "{text}"
    );
    let mut d = decision("h", "10.255.0.2", "app", Verdict::Restricted);
    d.org_id = Some("org-a".into());
    let probe = Probe::parse("172.16.0.4:5432").expect("probe");
    let outcome = destination_outcome(&listing, &d, &probe);
    assert_eq!(
        format_outcome(&listing, &probe, &outcome),
        "  to 172.16.0.4:5432/tcp: ALLOWED by rules[0] \"tenant A's peered VPC\": 172.16.0.0/24 tcp ports 5432 (\"tenant A's peered VPC\"), for orgs org-a\n"
    );
    let probe = Probe::parse("172.16.0.4:5433").expect("probe");
    let outcome = destination_outcome(&listing, &d, &probe);
    assert_eq!(
        format_outcome(&listing, &probe, &outcome),
        "  to 172.16.0.4:5433/tcp: REJECTED: outside allowed_networks, and none of the 1 rule(s) in this container's scope matches (in scope: rules[0])\n"
    );
}
