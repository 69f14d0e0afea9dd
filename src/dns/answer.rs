//! What a hostname rule's answer allows (pure): the addresses on the CNAME chain from the
//! queried name, for how long, and the answer as the container gets it (only the addresses
//! the kernel allows, TTLs no longer than they stay allowed).
//!
//! The chain is followed as resolvers follow it: from the question's name, each CNAME in the
//! answer section whose owner is the current name leads to the next (at most
//! [`MAX_CNAME_HOPS`], no loops); only A and AAAA records owned by a name on the chain
//! count. Records for other names (an upstream stuffing the answer) allow nothing.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData, RecordType};

/// CNAMEs followed from the queried name (resolvers stop around 8 to 16).
pub const MAX_CNAME_HOPS: usize = 8;
/// Addresses taken from one answer; more are left out of the answer and counted.
pub const MAX_ADDRESSES_PER_ANSWER: usize = 16;

/// What one answer allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learnable {
    /// The addresses on the chain, in the answer's order, at most
    /// [`MAX_ADDRESSES_PER_ANSWER`].
    pub addresses: Vec<IpAddr>,
    /// How many more there were.
    pub over_bound: usize,
    /// How long they stay allowed: the chain's smallest TTL clamped to `[min, max]`.
    pub allowed_for: Duration,
}

/// The addresses `answer` gives for `qname` (lowercase) and how long they may stay allowed;
/// None when the answer does not parse.
pub fn learnable(answer: &[u8], qname: &Name, min: Duration, max: Duration) -> Option<Learnable> {
    let message = Message::from_vec(answer).ok()?;
    let chain = cname_chain(&message, qname);
    let mut addresses = Vec::new();
    let mut over_bound = 0;
    let mut ttl = u32::MAX;
    for record in &message.answers {
        let owner = record.name.to_lowercase();
        if !chain.contains(&owner) {
            continue;
        }
        let address = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            RData::CNAME(_) => {
                ttl = ttl.min(record.ttl);
                continue;
            }
            _ => continue,
        };
        ttl = ttl.min(record.ttl);
        if addresses.contains(&address) {
            continue;
        }
        if addresses.len() >= MAX_ADDRESSES_PER_ANSWER {
            over_bound += 1;
            continue;
        }
        addresses.push(address);
    }
    let ttl = Duration::from_secs(u64::from(if ttl == u32::MAX { 0 } else { ttl }));
    Some(Learnable {
        addresses,
        over_bound,
        allowed_for: ttl.clamp(min, max),
    })
}

/// The names on the CNAME chain from `qname`, lowercase, `qname` first.
fn cname_chain(message: &Message, qname: &Name) -> Vec<Name> {
    let mut chain = vec![qname.to_lowercase()];
    for _ in 0..MAX_CNAME_HOPS {
        let Some(current) = chain.last() else { break };
        let next = message.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name.to_lowercase() == *current => {
                Some(target.0.to_lowercase())
            }
            _ => None,
        });
        match next {
            Some(next) if !chain.contains(&next) => chain.push(next),
            _ => break,
        }
    }
    chain
}

/// `answer` as the container gets it: A and AAAA records on the chain that are not in
/// `allowed` removed, and every answer record's TTL cut to `allowed_for` (so no cache keeps
/// an address longer than the kernel allows it). None when it does not re-encode.
pub fn rewrite(
    answer: &[u8],
    qname: &Name,
    allowed: &[IpAddr],
    allowed_for: Duration,
) -> Option<Vec<u8>> {
    let mut message = Message::from_vec(answer).ok()?;
    let chain = cname_chain(&message, qname);
    let cap = u32::try_from(allowed_for.as_secs()).unwrap_or(u32::MAX);
    message.answers.retain(|record| {
        let on_chain = chain.contains(&record.name.to_lowercase());
        let address = match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        };
        match address {
            // Addresses off the chain allow nothing and are not handed out either.
            Some(address) => on_chain && allowed.contains(&address),
            None => true,
        }
    });
    for record in &mut message.answers {
        if matches!(
            record.record_type(),
            RecordType::A | RecordType::AAAA | RecordType::CNAME
        ) {
            record.ttl = record.ttl.min(cap);
        }
    }
    message.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use std::str::FromStr;

    fn name(text: &str) -> Name {
        Name::from_str(text).expect("name")
    }

    fn answer(records: Vec<Record>) -> Vec<u8> {
        let mut message = Message::new(7, MessageType::Response, OpCode::Query);
        message.add_query(Query::query(name("api.partner.example."), RecordType::A));
        for record in records {
            message.add_answer(record);
        }
        message.to_vec().expect("encodes")
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(
            name(owner),
            ttl,
            RData::A(A::from(std::net::Ipv4Addr::from(ip))),
        )
    }

    const MIN: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn addresses_on_the_cname_chain_count_and_others_do_not() {
        let bytes = answer(vec![
            Record::from_rdata(
                name("API.partner.example."),
                60,
                RData::CNAME(CNAME(name("edge.cdn.example."))),
            ),
            a("edge.cdn.example.", 20, [203, 0, 113, 5]),
            a("evil.example.", 3600, [192, 0, 2, 66]),
            Record::from_rdata(
                name("edge.cdn.example."),
                40,
                RData::AAAA(AAAA::from(
                    std::net::Ipv6Addr::from_str("2001:db8::5").expect("v6"),
                )),
            ),
        ]);
        let learnable = learnable(&bytes, &name("api.partner.example."), MIN, MAX).expect("parses");
        assert_eq!(
            learnable.addresses,
            vec![
                IpAddr::from([203, 0, 113, 5]),
                "2001:db8::5".parse::<IpAddr>().expect("v6")
            ]
        );
        assert_eq!(learnable.allowed_for, Duration::from_secs(20));
    }

    #[test]
    fn the_ttl_is_clamped_and_the_rewritten_answer_never_outlives_it() {
        let long = answer(vec![a("api.partner.example.", 86_400, [203, 0, 113, 5])]);
        let qname = name("api.partner.example.");
        let l = learnable(&long, &qname, MIN, MAX).expect("parses");
        assert_eq!(l.allowed_for, MAX);
        let short = answer(vec![a("api.partner.example.", 1, [203, 0, 113, 5])]);
        assert_eq!(
            learnable(&short, &qname, MIN, MAX)
                .expect("parses")
                .allowed_for,
            MIN
        );

        let both = answer(vec![
            a("api.partner.example.", 86_400, [203, 0, 113, 5]),
            a("api.partner.example.", 86_400, [203, 0, 113, 6]),
        ]);
        let rewritten =
            rewrite(&both, &qname, &[IpAddr::from([203, 0, 113, 6])], MAX).expect("re-encodes");
        let message = Message::from_vec(&rewritten).expect("parses");
        assert_eq!(message.answers.len(), 1);
        assert_eq!(message.answers[0].ttl, 300);
        assert_eq!(message.metadata.id, 7);
    }

    #[test]
    fn a_cname_loop_and_garbage_allow_nothing() {
        let looped = answer(vec![
            Record::from_rdata(
                name("api.partner.example."),
                60,
                RData::CNAME(CNAME(name("b.example."))),
            ),
            Record::from_rdata(
                name("b.example."),
                60,
                RData::CNAME(CNAME(name("api.partner.example."))),
            ),
        ]);
        let l = learnable(&looped, &name("api.partner.example."), MIN, MAX).expect("parses");
        assert!(l.addresses.is_empty());
        assert!(learnable(b"\\x00\\x01", &name("a.example."), MIN, MAX).is_none());
    }

    #[test]
    fn at_most_sixteen_addresses_are_taken_from_one_answer() {
        let records = (0..20u8)
            .map(|i| a("api.partner.example.", 60, [203, 0, 113, i]))
            .collect();
        let l =
            learnable(&answer(records), &name("api.partner.example."), MIN, MAX).expect("parses");
        assert_eq!(l.addresses.len(), MAX_ADDRESSES_PER_ANSWER);
        assert_eq!(l.over_bound, 4);
    }
}
