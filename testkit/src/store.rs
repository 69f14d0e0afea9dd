//! A writer for silk's container metadata store that behaves like silk's cni-wrapper-plugin:
//! exclusive `flock` on `store.json_lock`, truncate and rewrite `store.json` in place (no
//! rename), bump the integer in `store.json_version`, release the lock.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde_json::{Map, Value, json};

/// What a container's store entry says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `container_workload: "app"`.
    App,
    /// `container_workload: "task"`.
    Task,
    /// `container_workload: "staging"` (exempt with the default configuration).
    Staging,
    /// Garden health-check container: handle `check-…`, metadata only `healthcheck: "true"`.
    HealthCheck,
    /// App metadata without any `container_workload` (older platforms).
    NoWorkload,
    /// Some other `container_workload` value.
    Workload(String),
    /// In the kernel (veth, route) but with no store entry at all.
    NotInStore,
}

impl Kind {
    /// The handle silk would use for a container of this kind.
    pub fn handle(&self, unique: &str) -> String {
        match self {
            Kind::HealthCheck => format!("check-{unique}-5f0c1d2e"),
            _ => format!("{unique}-6f2c0a6e-6d5e-4b1f-7a3c"),
        }
    }

    /// The store entry's `metadata` object, or `None` when there is no entry.
    fn metadata(&self, name: &str) -> Option<Value> {
        let workload = match self {
            Kind::NotInStore => return None,
            Kind::HealthCheck => return Some(json!({ "healthcheck": "true" })),
            Kind::App => Some("app"),
            Kind::Task => Some("task"),
            Kind::Staging => Some("staging"),
            Kind::Workload(w) => Some(w.as_str()),
            Kind::NoWorkload => None,
        };
        let mut m = Map::new();
        for (k, v) in [
            ("app_id", format!("app-guid-{name}")),
            ("space_id", "space-guid-1".to_string()),
            ("org_id", "org-guid-1".to_string()),
            ("policy_group_id", format!("pg-guid-{name}")),
            ("ports", "8080,2222".to_string()),
            (
                "log_config",
                format!("{{\"guid\":\"app-guid-{name}\",\"index\":0}}"),
            ),
        ] {
            m.insert(k.to_string(), Value::String(v));
        }
        if let Some(w) = workload {
            m.insert("container_workload".into(), Value::String(w.into()));
        }
        Some(Value::Object(m))
    }
}

/// The store directory and its current contents.
pub struct Store {
    dir: PathBuf,
    entries: BTreeMap<String, Value>,
    paused: bool,
    /// fsync the store after each write (the suite's default; silk itself does not, and the
    /// benches write as silk does).
    sync: bool,
}

impl Store {
    /// A store in `dir` (created); nothing is written until the first change.
    pub fn new(dir: &Path) -> Store {
        std::fs::create_dir_all(dir).expect("create metadata store dir");
        Store {
            dir: dir.to_path_buf(),
            entries: BTreeMap::new(),
            paused: false,
            sync: true,
        }
    }

    /// Writes without fsync, exactly as silk does (for timing: the benches).
    pub fn without_sync(mut self) -> Store {
        self.sync = false;
        self
    }

    /// The entries as they will be written (handle -> entry).
    pub fn entries(&self) -> &BTreeMap<String, Value> {
        &self.entries
    }

    /// The entries, to change many at once before one [`write`](Self::write).
    pub fn entries_mut(&mut self) -> &mut BTreeMap<String, Value> {
        &mut self.entries
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("store.json")
    }

    /// Adds (or replaces) the entry for `handle`, if `kind` has one, and rewrites the store.
    pub fn add(&mut self, handle: &str, ip: std::net::Ipv4Addr, kind: &Kind, name: &str) {
        let Some(metadata) = kind.metadata(name) else {
            return;
        };
        self.entries.insert(
            handle.to_string(),
            json!({ "handle": handle, "ip": ip.to_string(), "metadata": metadata }),
        );
        if !self.paused {
            self.write();
        }
    }

    /// Sets (or, with None, removes) the metadata key `key` of `handle`'s entry, as a new
    /// container of another org or space would have it, and rewrites the store.
    pub fn set_metadata(&mut self, handle: &str, key: &str, value: Option<&str>) {
        let entry = self
            .entries
            .get_mut(handle)
            .unwrap_or_else(|| panic!("no store entry {handle}"));
        let metadata = entry["metadata"]
            .as_object_mut()
            .unwrap_or_else(|| panic!("entry {handle} has no metadata object"));
        match value {
            Some(v) => metadata.insert(key.into(), Value::String(v.into())),
            None => metadata.remove(key),
        };
        if !self.paused {
            self.write();
        }
    }

    /// Removes the entry for `handle` (if any) and rewrites the store.
    pub fn remove(&mut self, handle: &str) {
        if self.entries.remove(handle).is_some() && !self.paused {
            self.write();
        }
    }

    /// While paused, [`add`](Self::add) and [`remove`](Self::remove) only change the entries
    /// in memory (the file keeps whatever it holds, e.g. corrupt bytes); [`write`](Self::write)
    /// still writes.
    pub fn pause_writes(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Rewrites the store from the current entries, the way silk does.
    pub fn write(&self) {
        self.write_raw(&self.render());
    }

    /// The store file content for the current entries.
    pub fn render(&self) -> Vec<u8> {
        serde_json::to_vec(&self.entries).expect("serialise store")
    }

    /// Writes arbitrary bytes as the store content (under the lock, in place, version bump).
    pub fn write_raw(&self, bytes: &[u8]) {
        let _lock = self.lock();
        self.write_in_place(bytes);
    }

    /// Truncates and rewrites `store.json` in place and bumps `store.json_version`, WITHOUT
    /// taking the lock: for a caller that already holds [`lock`](Self::lock).
    pub fn write_in_place(&self, bytes: &[u8]) {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.path())
            .expect("open store.json for in-place rewrite");
        file.write_all(bytes).expect("write store.json");
        if self.sync {
            file.sync_all().expect("sync store.json");
        }
        let version_path = self.dir.join("store.json_version");
        let version: u64 = std::fs::read_to_string(&version_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        std::fs::write(&version_path, (version + 1).to_string()).expect("write store.json_version");
    }

    /// Tries to take silk's exclusive lock for at most `timeout` (polling every millisecond,
    /// as a writer that must not wait forever would): the lock and how long it took, or how
    /// long it waited in vain.
    pub fn lock_within(
        &self,
        timeout: std::time::Duration,
    ) -> Result<(Flock<File>, std::time::Duration), std::time::Duration> {
        let started = std::time::Instant::now();
        let mut file = self.lock_file();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok((lock, started.elapsed())),
                Err((_, e)) if e != nix::errno::Errno::EWOULDBLOCK => {
                    panic!("flock store.json_lock: {e}")
                }
                Err((returned, _)) if started.elapsed() < timeout => {
                    file = returned;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => return Err(started.elapsed()),
            }
        }
    }

    /// silk's lock file, opened (and created) as silk opens it.
    fn lock_file(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join("store.json_lock"))
            .expect("open store.json_lock")
    }

    /// Takes silk's exclusive lock on `store.json_lock` (released when dropped).
    pub fn lock(&self) -> Flock<File> {
        let file = self.lock_file();
        Flock::lock(file, FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock store.json_lock: {e}"))
    }
}
