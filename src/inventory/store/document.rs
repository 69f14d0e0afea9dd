//! The layout of a store document: where the top-level object opens and closes, and each
//! member's handle and where its value ends. A leaf both readers use (the full parse in
//! regions and the incremental re-read); it parses nothing itself.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The layout of a valid document whose keys are all distinct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Index {
    /// Offset of the top-level `{`.
    pub open: usize,
    /// Offset of the closing `}`.
    pub close: usize,
    /// In document order, so `end` is strictly increasing.
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub handle: Box<str>,
    /// Offset just past the end of the member's value.
    pub end: usize,
}

/// The index of a document that parsed into `members`; None if it is not laid out as expected.
pub(crate) fn index_of(bytes: &[u8], members: &[(String, &RawValue)]) -> Option<Index> {
    let open = bytes.iter().position(|b| !is_json_ws(*b))?;
    let close = bytes.iter().rposition(|b| !is_json_ws(*b))?;
    if bytes[open] != b'{' || bytes[close] != b'}' {
        return None;
    }
    let members = members
        .iter()
        .map(|(handle, raw)| {
            Some(Member {
                handle: handle.as_str().into(),
                end: value_end(raw, bytes)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Index {
        open,
        close,
        members,
    })
}

/// The offset in `base` just past `raw`, which must borrow from `base`.
pub(crate) fn value_end(raw: &RawValue, base: &[u8]) -> Option<usize> {
    let text = raw.get();
    let start = (text.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(text.len())?;
    (end <= base.len()).then_some(end)
}

/// JSON's whitespace (RFC 8259), which is what serde_json skips; narrower than
/// `u8::is_ascii_whitespace` (no form feed).
pub(crate) fn is_json_ws(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// A JSON object's members in document order, repeated keys included: what serde's BTreeMap
/// sees before it keeps the last of each key. The same deserializer calls as
/// `BTreeMap<String, &RawValue>`, so it accepts exactly the same documents.
pub(crate) struct Members<'a>(pub Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}
