use super::*;
use egress_guard_testkit::rng::XorShift64;
use hickory_proto::op::Query as Question;
use hickory_proto::rr::RecordType;

fn filter(refuse_with: RefuseWith) -> Filter {
    let config = crate::config::Config::parse(&format!(
        "[dns]\nallowed_suffixes = [\"apps.internal.\", \"Service.CF.internal\"]\nrefuse_with = \"{}\"",
        match refuse_with {
            RefuseWith::Refused => "refused",
            RefuseWith::Nxdomain => "nxdomain",
        }
    ))
    .expect("valid");
    Filter::new(&config.dns)
}

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Question::query(
        Name::from_ascii(name).expect("name"),
        qtype,
    ));
    message.to_vec().expect("encodes")
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("name")
}

#[test]
fn suffixes_match_on_label_boundaries_ignoring_case() {
    let f = filter(RefuseWith::Refused);
    for allowed in [
        "apps.internal.",
        "apps.internal",
        "web.apps.internal.",
        "a.b.c.WEB.Apps.Internal.",
        "uaa.service.cf.internal.",
        "SERVICE.CF.INTERNAL",
    ] {
        assert!(f.allows(&name(allowed)), "{allowed} should be allowed");
    }
    for refused in [
        "evilapps.internal.",
        "apps.internal.attacker.example.",
        "internal.",
        "x.attacker.example.",
        "cf.internal.",
        "xservice.cf.internal.",
        ".",
    ] {
        assert!(!f.allows(&name(refused)), "{refused} should be refused");
    }
}

#[test]
fn refused_names_are_answered_with_the_query_id_and_question() {
    for (refuse_with, code) in [
        (RefuseWith::Refused, ResponseCode::Refused),
        (RefuseWith::Nxdomain, ResponseCode::NXDomain),
    ] {
        let decision =
            filter(refuse_with).decide(&query(0xbeef, "x.Attacker.example.", RecordType::TXT));
        let Decision::Refuse {
            answer,
            name,
            qtype,
        } = decision
        else {
            panic!("expected a refusal, got {decision:?}");
        };
        assert_eq!(name, "x.Attacker.example.");
        assert_eq!(qtype, "TXT");
        let answer = Message::from_vec(&answer).expect("the answer parses");
        assert_eq!(answer.metadata.id, 0xbeef);
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        assert_eq!(answer.metadata.response_code, code);
        assert!(answer.metadata.recursion_desired);
        assert!(answer.answers.is_empty());
        assert_eq!(answer.queries.len(), 1);
        assert_eq!(answer.queries[0].name(), &self::name("x.Attacker.example."));
        assert_eq!(answer.queries[0].query_type(), RecordType::TXT);
    }
}

#[test]
fn allowed_names_are_forwarded_as_parsed() {
    let bytes = query(7, "Web.apps.internal.", RecordType::A);
    let Decision::Forward { query: q } = filter(RefuseWith::Refused).decide(&bytes) else {
        panic!("expected a forward");
    };
    assert_eq!(q.id, 7);
    assert_eq!(q.name, name("web.apps.internal."));
    assert_eq!(q.qtype, u16::from(RecordType::A));
    // The re-encoded query is the same message.
    assert_eq!(
        Message::from_vec(&q.bytes).expect("parses"),
        Message::from_vec(&bytes).expect("parses")
    );
}

#[test]
fn malformed_and_oversized_queries_are_dropped() {
    let f = filter(RefuseWith::Refused);
    assert_eq!(f.decide(&[]), Decision::Drop(Malformed::Unparseable));
    assert_eq!(
        f.decide(&[0xff; 11]),
        Decision::Drop(Malformed::Unparseable)
    );
    assert_eq!(
        f.decide(&vec![0; MAX_QUERY_BYTES + 1]),
        Decision::Drop(Malformed::Oversized)
    );
    // A header that promises a question that is not there.
    let mut truncated = query(1, "web.apps.internal.", RecordType::A);
    truncated.truncate(14);
    assert_eq!(f.decide(&truncated), Decision::Drop(Malformed::Unparseable));
    // A compression pointer that points at itself.
    let mut looping = query(1, "a.", RecordType::A)[..12].to_vec();
    looping.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    assert!(matches!(f.decide(&looping), Decision::Drop(_)));
    // A response sent to the filter.
    let mut response = Message::new(1, MessageType::Response, OpCode::Query);
    response.add_query(Question::query(name("web.apps.internal."), RecordType::A));
    assert_eq!(
        f.decide(&response.to_vec().expect("encodes")),
        Decision::Drop(Malformed::NotAQuery)
    );
    // No question, two questions, another opcode.
    let empty = Message::new(1, MessageType::Query, OpCode::Query);
    assert_eq!(
        f.decide(&empty.to_vec().expect("encodes")),
        Decision::Drop(Malformed::Shape)
    );
    let mut two = Message::new(1, MessageType::Query, OpCode::Query);
    two.add_query(Question::query(name("web.apps.internal."), RecordType::A));
    two.add_query(Question::query(name("x.attacker.example."), RecordType::A));
    assert_eq!(
        f.decide(&two.to_vec().expect("encodes")),
        Decision::Drop(Malformed::Shape)
    );
    let mut notify = Message::new(1, MessageType::Query, OpCode::Notify);
    notify.add_query(Question::query(name("web.apps.internal."), RecordType::SOA));
    assert_eq!(
        f.decide(&notify.to_vec().expect("encodes")),
        Decision::Drop(Malformed::Opcode)
    );
}

/// Whether `name`'s labels end with `suffix`'s, ASCII case aside: the test's own reading of
/// "under an allowed suffix", independent of the filter's.
fn under(name: &Name, suffix: &str) -> bool {
    let labels: Vec<Vec<u8>> = name.iter().map(|l| l.to_ascii_lowercase()).collect();
    let wanted: Vec<Vec<u8>> = suffix
        .trim_end_matches('.')
        .split('.')
        .map(|l| l.to_ascii_lowercase().into_bytes())
        .collect();
    labels.len() >= wanted.len() && labels[labels.len() - wanted.len()..] == wanted[..]
}

/// Random and mutated queries against what the filter promises: a forwarded query is one
/// well-formed question under an allowed suffix, re-encoded with the same id; a refusal
/// answers the query's id and question with REFUSED and sends nothing on; everything that
/// is not one standard question is dropped, with the reason hickory-proto's own parse
/// gives. Every outcome must occur, so the property cannot hold vacuously.
#[test]
fn random_and_mutated_queries_get_the_promised_decision() {
    let f = filter(RefuseWith::Refused);
    let allowed = ["apps.internal.", "service.cf.internal."];
    let seeds = [
        query(3, "web.apps.internal.", RecordType::A),
        query(4, "UAA.Service.CF.Internal.", RecordType::AAAA),
        query(5, "x.attacker.example.", RecordType::TXT),
        query(6, "evilapps.internal.", RecordType::A),
        {
            let mut two = Message::new(7, MessageType::Query, OpCode::Query);
            two.add_query(Question::query(name("web.apps.internal."), RecordType::A));
            two.add_query(Question::query(name("x.attacker.example."), RecordType::A));
            two.to_vec().expect("encodes")
        },
    ];
    let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let mut seen = std::collections::BTreeMap::<&str, u32>::new();
    for round in 0..20_000u32 {
        let bytes = match round % 4 {
            // Random bytes of every length up to just past the limit.
            0 => (0..(round as usize / 4) % (MAX_QUERY_BYTES + 2))
                .map(|_| next() as u8)
                .collect(),
            // A real query, unchanged.
            1 => seeds[(round as usize / 4) % seeds.len()].clone(),
            // A real query with a few bytes changed, cut short, or with junk after it.
            _ => {
                let mut bytes = seeds[(next() % seeds.len() as u64) as usize].clone();
                match next() % 3 {
                    0 => {
                        for _ in 0..=(next() % 3) {
                            let at = (next() % bytes.len() as u64) as usize;
                            bytes[at] = next() as u8;
                        }
                    }
                    1 => bytes.truncate((next() % bytes.len() as u64) as usize),
                    _ => bytes.extend((0..next() % 8).map(|_| next() as u8)),
                }
                bytes
            }
        };
        let decision = f.decide(&bytes);
        let parsed = Message::from_vec(&bytes);
        let one_standard_question = parsed.as_ref().is_ok_and(|m| {
            m.metadata.message_type == MessageType::Query
                && m.metadata.op_code == OpCode::Query
                && m.queries.len() == 1
                && m.answers.is_empty()
                && m.authorities.is_empty()
        });
        let outcome = match &decision {
            Decision::Forward { query } => {
                assert!(
                    bytes.len() <= MAX_QUERY_BYTES && one_standard_question,
                    "{bytes:?}"
                );
                let sent = Message::from_vec(&query.bytes).expect("forwarded bytes parse");
                let original = parsed.as_ref().expect("parsed");
                assert_eq!(sent.metadata.id, original.metadata.id);
                assert_eq!(sent.queries, original.queries);
                let asked = sent.queries[0].name();
                assert!(
                    allowed.iter().any(|s| under(asked, s)),
                    "forwarded {asked}, which no allowed suffix covers"
                );
                assert_eq!(query.name, asked.to_lowercase());
                "forward"
            }
            Decision::Refuse { answer, name, .. } => {
                assert!(
                    bytes.len() <= MAX_QUERY_BYTES && one_standard_question,
                    "{bytes:?}"
                );
                let original = parsed.as_ref().expect("parsed");
                let asked = original.queries[0].name();
                assert!(!allowed.iter().any(|s| under(asked, s)), "refused {asked}");
                assert_eq!(name, &asked.to_ascii());
                let answer = Message::from_vec(answer).expect("the answer parses");
                assert_eq!(answer.metadata.message_type, MessageType::Response);
                assert_eq!(answer.metadata.id, original.metadata.id);
                assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
                assert_eq!(answer.queries, original.queries);
                assert!(answer.answers.is_empty(), "a refusal carries no address");
                "refuse"
            }
            Decision::Drop(why) => {
                let expected = match &parsed {
                    _ if bytes.len() > MAX_QUERY_BYTES => Malformed::Oversized,
                    Err(_) => Malformed::Unparseable,
                    Ok(m) if m.metadata.message_type != MessageType::Query => Malformed::NotAQuery,
                    Ok(m) if m.metadata.op_code != OpCode::Query => Malformed::Opcode,
                    Ok(_) if !one_standard_question => Malformed::Shape,
                    Ok(_) => panic!("dropped one standard question ({why:?}): {bytes:?}"),
                };
                assert_eq!(*why, expected, "{bytes:?}");
                why.as_str()
            }
        };
        *seen.entry(outcome).or_default() += 1;
    }
    for outcome in [
        "forward",
        "refuse",
        "oversized",
        "unparseable",
        "not a query",
        "opcode other than QUERY",
        "not exactly one question",
    ] {
        assert!(
            seen.get(outcome).copied().unwrap_or(0) > 0,
            "never saw {outcome}: {seen:?}"
        );
    }
}

#[test]
fn answers_must_match_the_query() {
    let Decision::Forward { query: q } =
        filter(RefuseWith::Refused).decide(&query(42, "web.apps.internal.", RecordType::A))
    else {
        panic!("expected a forward");
    };
    let mut good = Message::new(42, MessageType::Response, OpCode::Query);
    good.add_query(Question::query(name("WEB.apps.internal."), RecordType::A));
    assert!(answers(&q, &good.to_vec().expect("encodes")));
    let mut other_id = good.clone();
    other_id.metadata.id = 43;
    assert!(!answers(&q, &other_id.to_vec().expect("encodes")));
    let mut other_name = Message::new(42, MessageType::Response, OpCode::Query);
    other_name.add_query(Question::query(name("x.attacker.example."), RecordType::A));
    assert!(!answers(&q, &other_name.to_vec().expect("encodes")));
    assert!(!answers(&q, &q.bytes), "a query is not an answer");
    assert!(!answers(&q, b"junk"));
    let fail = servfail(&q).expect("servfail encodes");
    let fail = Message::from_vec(&fail).expect("parses");
    assert_eq!(fail.metadata.id, 42);
    assert_eq!(fail.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(fail.queries[0].name(), &name("web.apps.internal."));
}

fn hostname_filter() -> Filter {
    let config = crate::config::Config::parse(
        r#"
        [dns]
        enabled = true
        allowed_suffixes = ["apps.internal."]
        [[rules]]
        destination = "*.partner.example"
        protocol = "tcp"
        ports = "443"
        orgs = ["org-a"]
        [[rules]]
        destination = "api.partner.example"
        spaces = ["space-b"]
        [[rules]]
        destination = "status.vendor.example"
        "#,
    )
    .expect("valid");
    Filter::with_rules(&config.dns, std::sync::Arc::new(RuleSet::new(config.rules)))
}

fn asker(org: Option<&str>, space: Option<&str>) -> Asker {
    Asker {
        ifindex: 42,
        org: org.map(Into::into),
        space: space.map(Into::into),
    }
}

fn learned_rule(decision: Decision) -> Option<usize> {
    match decision {
        Decision::Forward { query } => query.learn.map(|rule| {
            assert_eq!(
                rule.ifindex, 42,
                "the asker's interface is the element's key"
            );
            rule.index
        }),
        Decision::Refuse { .. } => None,
        Decision::Drop(why) => panic!("dropped: {why:?}"),
    }
}

#[test]
fn a_hostname_rule_is_learned_for_containers_in_its_scope_only() {
    let f = hostname_filter();
    assert!(f.has_hostname_rules());
    let q = query(1, "API.partner.example.", RecordType::A);
    // The first matching rule in the order written whose scope holds the container.
    assert_eq!(
        learned_rule(f.decide_for(&q, Some(&asker(Some("org-a"), None)))),
        Some(0)
    );
    assert_eq!(
        learned_rule(f.decide_for(&q, Some(&asker(None, Some("space-b"))))),
        Some(1)
    );
    // Out of scope, or not known to the agent: refused as any other name, nothing learned.
    assert!(matches!(
        f.decide_for(&q, Some(&asker(Some("org-z"), None))),
        Decision::Refuse { .. }
    ));
    assert!(matches!(f.decide_for(&q, None), Decision::Refuse { .. }));
    // `*.partner.example` does not match the domain itself.
    let apex = query(2, "partner.example.", RecordType::A);
    assert!(matches!(
        f.decide_for(&apex, Some(&asker(Some("org-a"), None))),
        Decision::Refuse { .. }
    ));
    // An unscoped hostname rule applies to a container with no org or space.
    let vendor = query(3, "status.vendor.example.", RecordType::AAAA);
    assert_eq!(
        learned_rule(f.decide_for(&vendor, Some(&asker(None, None)))),
        Some(2)
    );
    // Allowed suffixes are forwarded as before, learning nothing.
    let internal = query(4, "web.apps.internal.", RecordType::A);
    assert_eq!(
        learned_rule(f.decide_for(&internal, Some(&asker(None, None)))),
        None
    );
    assert!(matches!(f.decide(&internal), Decision::Forward { .. }));
}
