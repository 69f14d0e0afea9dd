//! Parsing: the whole document with [`parse_store`]'s rules, and one entry with
//! [`parse_entry`] (lenient per entry, strict per file).

use super::{EntryProblem, StoreEntry, StoreError, StoreSnapshot, WORKLOAD_KEY};
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

/// One entry of the store as parsed: usable, or why not (the same reason text parse_store puts
/// in EntryProblem::reason).
pub type Parsed = Result<StoreEntry, String>;

/// Handles and what they parse to now (None: gone), as a store delta lists them.
pub type Changed = Vec<(String, Option<Parsed>)>;

/// Parses the store's bytes. `path` is only used in error messages.
///
/// An empty (or all-whitespace) file is an empty store, as silk itself treats it. Entries are
/// first split off as raw JSON text, so one malformed entry is reported on its own; each entry
/// is then decoded into just the fields the agent uses (large values such as `log_config` are
/// skipped, not built).
pub fn parse_store(path: &Path, bytes: &[u8]) -> Result<StoreSnapshot, StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(StoreSnapshot::default());
    }
    let malformed = |err: serde_json::Error| StoreError::Malformed {
        path: path.to_path_buf(),
        message: err.to_string(),
    };
    let map: BTreeMap<String, &RawValue> = match serde_json::from_slice(bytes) {
        Ok(map) => map,
        Err(err) if err.is_data() => {
            // Valid JSON of the wrong shape, or invalid JSON: tell them apart for the message.
            let document: Value = serde_json::from_slice(bytes).map_err(malformed)?;
            return Err(StoreError::WrongShape {
                path: path.to_path_buf(),
                found: json_kind(&document),
            });
        }
        Err(err) => return Err(malformed(err)),
    };

    let mut snapshot = StoreSnapshot::default();
    // The map is ordered by key, so entries come out sorted by handle.
    for (handle, raw) in map {
        match parse_entry(&handle, raw) {
            Ok(entry) => snapshot.entries.push(entry),
            Err(reason) => snapshot.problems.push(EntryProblem { handle, reason }),
        }
    }
    Ok(snapshot)
}

/// The fields of an entry the agent reads; every other key is skipped without being built.
#[derive(serde::Deserialize)]
pub(super) struct RawEntry<'a> {
    ip: Option<Value>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
}

/// The metadata keys the agent reads.
#[derive(serde::Deserialize, Default)]
pub(super) struct RawMetadata {
    container_workload: Option<Value>,
    app_id: Option<Value>,
    space_id: Option<Value>,
    org_id: Option<Value>,
    log_config: Option<Value>,
}

/// The instance index in Diego's `log_config`, a JSON string (`{"guid":…,"index":0,…}`); None
/// when absent or unreadable (it names log lines only, never a verdict).
fn log_index(log_config: Option<&Value>) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct LogConfig {
        index: Option<u32>,
    }
    let Some(Value::String(text)) = log_config else {
        return None;
    };
    serde_json::from_str::<LogConfig>(text).ok()?.index
}

pub(super) fn parse_entry(handle: &str, raw: &RawValue) -> Result<StoreEntry, String> {
    let entry: RawEntry = serde_json::from_str(raw.get()).map_err(|_| {
        let kind = serde_json::from_str::<Value>(raw.get())
            .map(|v| json_kind(&v))
            .unwrap_or("malformed");
        format!("entry is {kind}, not an object")
    })?;
    let ip = match &entry.ip {
        Some(Value::String(text)) => text
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("`ip` {text:?} is not an IPv4 address"))?,
        Some(Value::Null) | None => return Err("entry has no `ip`".to_string()),
        Some(other) => return Err(format!("`ip` is {}, not a string", json_kind(other))),
    };
    let metadata: RawMetadata = match entry.metadata.map(RawValue::get) {
        None | Some("null") => RawMetadata::default(),
        Some(text) if text.starts_with('{') => {
            serde_json::from_str(text).map_err(|err| format!("`metadata` is unreadable: {err}"))?
        }
        Some(text) => {
            let kind = serde_json::from_str::<Value>(text)
                .map(|v| json_kind(&v))
                .unwrap_or("malformed");
            return Err(format!("`metadata` is {kind}, not an object"));
        }
    };
    let text = |key: &str, value: Option<Value>| -> Result<Option<Arc<str>>, String> {
        match value {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.into())),
            Some(other) => Err(format!(
                "metadata `{key}` is {}, not a string",
                json_kind(&other)
            )),
        }
    };
    Ok(StoreEntry {
        handle: handle.into(),
        ip,
        workload: text(WORKLOAD_KEY, metadata.container_workload)?,
        app_id: text("app_id", metadata.app_id)?,
        space_id: text("space_id", metadata.space_id)?,
        org_id: text("org_id", metadata.org_id)?,
        log_index: log_index(metadata.log_config.as_ref()),
    })
}

pub(super) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
