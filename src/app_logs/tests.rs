use super::*;
use crate::attribution::{Action, Destination, Protocol};
use prost::Message as _;

fn attempt(port: u16) -> AppAttempt {
    AppAttempt {
        app_id: "11111111-2222-3333-4444-555555555555".into(),
        instance_index: Some(3),
        action: Action::Rejected,
        destination: Destination::Address("203.0.113.10".parse().expect("literal")),
        protocol: Protocol::Ip(6),
        dst_port: Some(port),
        reachable_by_rule: Vec::new(),
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    }
}

/// The envelope as Loggregator reads it: the field numbers of loggregator-api v2.
#[test]
fn an_envelope_is_the_apps_log_line() {
    let e = envelope(&attempt(443), "hello".into(), attempt(443).at);
    assert_eq!(e.source_id, "11111111-2222-3333-4444-555555555555");
    assert_eq!(e.instance_id, "3");
    assert_eq!(
        e.tags.get("source_type").map(String::as_str),
        Some("EGRESS")
    );
    let bytes = e.encode_to_vec();
    // timestamp (field 1, varint), source_id (2), log (4: payload 1, type 2 omitted as 0),
    // instance_id (8), tags (9: map entry key 1 value 2).
    let mut want = vec![0x08];
    prost::encoding::encode_varint(1_700_000_000_000_000_000, &mut want);
    want.extend([0x12, 36]);
    want.extend(b"11111111-2222-3333-4444-555555555555");
    want.extend([0x22, 7, 0x0a, 5]);
    want.extend(b"hello");
    want.extend([0x42, 1, b'3']);
    want.extend([0x4a, 21, 0x0a, 11]);
    want.extend(b"source_type");
    want.extend([0x12, 6]);
    want.extend(b"EGRESS");
    assert_eq!(bytes, want);
    let batch = EnvelopeBatch {
        batch: vec![e.clone()],
    }
    .encode_to_vec();
    assert_eq!(batch[0], 0x0a, "batch: repeated field 1");
}

#[test]
fn lines_are_limited_per_app_and_destination_and_summarised() {
    let mut lines = Lines::new(Allowed::new(&["10.0.0.0/8"], &["apps.internal."]), 5);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let sent: usize = (0..40)
        .map(|_| lines.attempt(&attempt(443), now).len())
        .sum();
    assert_eq!(sent, 5);
    assert_eq!(
        lines.attempt(&attempt(80), now).len(),
        1,
        "another port is another destination"
    );
    assert!(lines.due(now + Duration::from_secs(30)).is_empty());
    let summaries = lines.due(now + limit::WINDOW);
    assert_eq!(summaries.len(), 1);
    let Some(Message::Log(log)) = &summaries[0].message else {
        panic!("a log envelope")
    };
    let text = String::from_utf8_lossy(&log.payload);
    assert!(text.contains("35 more attempts rejected"), "{text}");
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let (queue, _kept) = mpsc::channel(2);
    let counts = Arc::new(AppLogCounts::default());
    let sink = AppLogSink {
        queue,
        counts: counts.clone(),
    };
    for _ in 0..5 {
        sink.attempt(attempt(443));
    }
    assert_eq!(counts.dropped.load(Ordering::Relaxed), 3);
}
