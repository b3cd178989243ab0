//! The embedded registration store: a snapshot file rewritten atomically (write, fsync,
//! rename) at most once a second while registrations change. A `kill -9` therefore loses
//! at most the last second of changes. It also keeps the secret that keys nonces and
//! Record-Route tokens, so dialogs survive a restart.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use pinhole_sip::Binding;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    secret: String,
    bindings: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    aor: String,
    #[serde(flatten)]
    binding: Binding,
}

pub(crate) struct Store {
    path: Option<PathBuf>,
    /// Descriptors held open for the store alone: released just before a save and taken
    /// back after it, so a descriptor flood elsewhere can never make a save fail.
    reserve: std::sync::Mutex<Vec<std::fs::File>>,
}

/// Descriptors kept for a save: the temporary file, and one spare.
const RESERVED_FDS: usize = 2;

fn open_reserve() -> Vec<std::fs::File> {
    (0..RESERVED_FDS).filter_map(|_| std::fs::File::open("/dev/null").ok()).collect()
}

pub(crate) struct Loaded {
    pub(crate) secret: [u8; 32],
    pub(crate) bindings: Vec<(String, Binding)>,
}

impl Store {
    pub(crate) fn new(path: &Path) -> Store {
        let path = (!path.as_os_str().is_empty()).then(|| path.to_owned());
        let reserve = std::sync::Mutex::new(if path.is_some() { open_reserve() } else { Vec::new() });
        Store { path, reserve }
    }

    /// Reads the snapshot, or starts fresh with a new secret.
    pub(crate) fn load(&self) -> anyhow::Result<Loaded> {
        let fresh = || Loaded { secret: rand::random(), bindings: vec![] };
        let Some(path) = &self.path else {
            return Ok(fresh());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(fresh()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let snap: Snapshot = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut secret = [0u8; 32];
        let bytes = hex::decode(&snap.secret).ok().context("store secret is not 64 hex digits")?;
        if bytes.len() != 32 {
            anyhow::bail!("store secret is not 64 hex digits");
        }
        secret.copy_from_slice(&bytes);
        Ok(Loaded { secret, bindings: snap.bindings.into_iter().map(|e| (e.aor, e.binding)).collect() })
    }

    pub(crate) fn save(&self, secret: &[u8; 32], bindings: Vec<(String, Binding)>) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut reserve = self.reserve.lock().unwrap_or_else(|e| e.into_inner());
        reserve.clear();
        let saved = Self::write(path, secret, bindings);
        *reserve = open_reserve();
        saved
    }

    fn write(path: &Path, secret: &[u8; 32], bindings: Vec<(String, Binding)>) -> anyhow::Result<()> {
        let snap = Snapshot {
            version: 1,
            secret: hex::encode(secret),
            bindings: bindings.into_iter().map(|(aor, binding)| Entry { aor, binding }).collect(),
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(&snap)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }
}
