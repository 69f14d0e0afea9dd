//! What to do with one query (pure): parse it with hickory-proto, then forward it (a name
//! under an allowed suffix), answer it ourselves (REFUSED or NXDOMAIN), or drop it (anything
//! that is not one well-formed standard query).
//!
//! Queries are hostile input: nothing here panics on any byte string, and a query is forwarded
//! only as hickory-proto re-encodes what it parsed, so the upstream resolver reads exactly the
//! name that was checked (no parser differential between the filter and the resolver).

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::Name;

use crate::config::{DnsConfig, RefuseWith};
use crate::policy::RuleSet;

/// Largest query accepted. A standard query is a header, one name (at most 255 bytes) and an
/// optional EDNS record, well under this; anything bigger is not a query for this filter.
pub const MAX_QUERY_BYTES: usize = 512;

/// Why a query was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Longer than [`MAX_QUERY_BYTES`].
    Oversized,
    /// Not a DNS message hickory-proto can parse.
    Unparseable,
    /// A response, not a query (never answered: that is how reflection loops start).
    NotAQuery,
    /// An opcode other than QUERY (NOTIFY, UPDATE, …).
    Opcode,
    /// Not exactly one question, or records in the answer or authority sections.
    Shape,
}

impl Malformed {
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::Oversized => "oversized",
            Malformed::Unparseable => "unparseable",
            Malformed::NotAQuery => "not a query",
            Malformed::Opcode => "opcode other than QUERY",
            Malformed::Shape => "not exactly one question",
        }
    }
}

/// The filter's decision on one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Drop it: no answer, counted.
    Drop(Malformed),
    /// Answer it with `answer` (REFUSED or NXDOMAIN, the query's id and question); the name
    /// is never sent anywhere.
    Refuse {
        answer: Vec<u8>,
        name: String,
        qtype: String,
    },
    /// Send `query` upstream and relay the answer unchanged.
    Forward { query: Query },
}

/// An allowed query as it goes upstream, with what its answer must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The query re-encoded from what was parsed (same id, flags, question and EDNS).
    pub bytes: Vec<u8>,
    pub id: u16,
    /// The question, lowercase, to match the answer against.
    pub name: Name,
    pub qtype: u16,
    /// The hostname rule whose answer the kernel learns for the asking container (the first
    /// in the order written whose name matches and whose scope holds the container).
    pub learn: Option<HostRule>,
}

/// A hostname rule, by its index in `[[rules]]` and its connection mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRule {
    pub index: usize,
    pub mark: u16,
    /// The asking container's host interface (the learned element's key).
    pub ifindex: u32,
}

/// The asking container as the agent knows it: its host interface, org and space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asker {
    pub ifindex: u32,
    pub org: Option<std::sync::Arc<str>>,
    pub space: Option<std::sync::Arc<str>>,
}

/// The allowed suffixes and the answer for other names.
#[derive(Debug, Clone)]
pub struct Filter {
    suffixes: Vec<Name>,
    refuse_with: ResponseCode,
    /// `[[rules]]`, for their hostname rules.
    rules: std::sync::Arc<RuleSet>,
}

impl Filter {
    /// From a validated `[dns]` section (every suffix parses; one that did not would simply
    /// allow nothing).
    pub fn new(config: &DnsConfig) -> Filter {
        let suffixes = config
            .allowed_suffixes
            .iter()
            .filter_map(|s| Name::from_ascii(s).ok())
            .collect();
        Filter {
            suffixes,
            refuse_with: match config.refuse_with {
                RefuseWith::Refused => ResponseCode::Refused,
                RefuseWith::Nxdomain => ResponseCode::NXDomain,
            },
            rules: std::sync::Arc::default(),
        }
    }

    /// The filter of `config` with the hostname rules of `rules`.
    pub fn with_rules(config: &DnsConfig, rules: std::sync::Arc<RuleSet>) -> Filter {
        Filter {
            rules,
            ..Filter::new(config)
        }
    }

    /// Whether some rule names a host (queries then need to know who asks).
    pub fn has_hostname_rules(&self) -> bool {
        !self.rules.host_marks().is_empty()
    }

    /// The first hostname rule that matches `name` and holds `asker` in its scope.
    pub fn host_rule_for(&self, name: &Name, asker: Option<&Asker>) -> Option<HostRule> {
        let asker = asker?;
        let text = name.to_ascii();
        self.rules.host_marks().iter().find_map(|(index, mark)| {
            let rule = &self.rules.rules[*index];
            let pattern = rule.destination.hostname()?;
            (pattern.matches(&text)
                && rule.applies_to(asker.org.as_deref(), asker.space.as_deref()))
            .then_some(HostRule {
                index: *index,
                mark: *mark,
                ifindex: asker.ifindex,
            })
        })
    }

    /// Whether `name` is one of the allowed suffixes or below one, label by label and
    /// ignoring ASCII case (`apps.internal.` allows `web.APPS.internal.`, not
    /// `evilapps.internal.`).
    pub fn allows(&self, name: &Name) -> bool {
        self.suffixes.iter().any(|suffix| suffix.zone_of(name))
    }

    /// Decides what to do with `bytes`, one query as received, from no known container.
    pub fn decide(&self, bytes: &[u8]) -> Decision {
        self.decide_for(bytes, None)
    }

    /// Decides what to do with `bytes`, one query of `asker`: a name of a hostname rule in
    /// its scope is forwarded and its answer learned.
    pub fn decide_for(&self, bytes: &[u8], asker: Option<&Asker>) -> Decision {
        if bytes.len() > MAX_QUERY_BYTES {
            return Decision::Drop(Malformed::Oversized);
        }
        let Ok(message) = Message::from_vec(bytes) else {
            return Decision::Drop(Malformed::Unparseable);
        };
        if message.metadata.message_type != MessageType::Query {
            return Decision::Drop(Malformed::NotAQuery);
        }
        if message.metadata.op_code != OpCode::Query {
            return Decision::Drop(Malformed::Opcode);
        }
        let [question] = message.queries.as_slice() else {
            return Decision::Drop(Malformed::Shape);
        };
        if !message.answers.is_empty() || !message.authorities.is_empty() {
            return Decision::Drop(Malformed::Shape);
        }
        let name = question.name().clone();
        let qtype = u16::from(question.query_type());
        let learn = self.host_rule_for(&name, asker);
        if learn.is_some() || self.allows(&name) {
            let Ok(bytes) = message.to_vec() else {
                return Decision::Drop(Malformed::Unparseable);
            };
            return Decision::Forward {
                query: Query {
                    bytes,
                    id: message.metadata.id,
                    name: name.to_lowercase(),
                    qtype,
                    learn,
                },
            };
        }
        let mut answer = Message::error_msg(message.metadata.id, OpCode::Query, self.refuse_with);
        answer.metadata.recursion_desired = message.metadata.recursion_desired;
        answer.metadata.checking_disabled = message.metadata.checking_disabled;
        answer.add_query(question.clone());
        // RFC 6891: a query with an OPT record gets one back.
        if message.edns.is_some() {
            let mut edns = hickory_proto::op::Edns::new();
            edns.set_max_payload(MAX_QUERY_BYTES as u16);
            answer.set_edns(edns);
        }
        let qtype = question.query_type().to_string();
        match answer.to_vec() {
            Ok(answer) => Decision::Refuse {
                answer,
                name: name.to_ascii(),
                qtype,
            },
            Err(_) => Decision::Drop(Malformed::Unparseable),
        }
    }
}

/// SERVFAIL for query `bytes` (the upstream did not answer, or too many queries are in
/// flight): the query's id and question, so the client stops waiting at once.
pub fn servfail(query: &Query) -> Option<Vec<u8>> {
    let original = Message::from_vec(&query.bytes).ok()?;
    let mut answer = Message::error_msg(query.id, OpCode::Query, ResponseCode::ServFail);
    answer.metadata.recursion_desired = original.metadata.recursion_desired;
    answer.add_queries(original.queries);
    answer.to_vec().ok()
}

/// Whether `bytes` is the answer to `query`: a response with its id and its question (case
/// aside). Anything else on the upstream socket is ignored.
pub fn answers(query: &Query, bytes: &[u8]) -> bool {
    let Ok(message) = Message::from_vec(bytes) else {
        return false;
    };
    if message.metadata.message_type != MessageType::Response || message.metadata.id != query.id {
        return false;
    }
    match message.queries.as_slice() {
        [question] => {
            question.name().to_lowercase() == query.name
                && u16::from(question.query_type()) == query.qtype
        }
        // A FORMERR or similar may carry no question; the id (a fresh socket per query) is
        // then what ties it to the query.
        [] => message.metadata.response_code != ResponseCode::NoError,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
