//! Several nodes sharing registrations in Redis (`[cluster]`), by changes, never by scans.
//!
//! The store (every command touches one key, so one slot of a Redis Cluster):
//! - `pinhole:aor:AOR`, a hash: one field per node holding bindings of the AOR, its value
//!   that node's bindings and SIP address ([`NodeBindings`]); the key expires with the
//!   longest binding written to it.
//! - `pinhole:regchanges`, a stream: an entry `{node, aor}` per change, capped (about
//!   [`STREAM_MAX`] entries).
//!
//! Two threads, neither holding the node's lock while it waits on Redis:
//! - **the writer** takes the registrar's changes as soon as the node signals some (under
//!   the lock: a swap of a small set), writes each changed AOR's field (or deletes it) and announces
//!   it on the stream; it also answers the proxy's read-through lookups (the AOR's hash,
//!   read bounded: a phone registered through another node a moment ago is reachable at
//!   once).
//! - **the reader**, at every (re)connect, reads the whole store once, paged (a `SCAN` page
//!   of keys, their hashes, applied page by page), then follows the stream from where that
//!   read began (`XREAD BLOCK`), applying each announced change (`HGET` of that node's
//!   field, bounded).
//!
//! Idle, that is a `PING` a second and a blocked `XREAD` per node, whatever the number of
//! registrations. Each node keeps a full copy of the others' bindings: a lookup never waits
//! on Redis when the phone is known, and a copy costs about what the binding costs its own
//! node (see the README for the measured figures). When Redis cannot be reached the node
//! serves from what it has and says so; when it is back, everything local is written again
//! and the copies are read again (reconciled), and it says that too.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinhole_sip::registrar::NodeBindings;
use pinhole_sip::Binding;

use crate::redis_link::{RedisLink, RedisTarget, ScanCursor, MAX_KEYS};
use crate::server::Shared;

/// How often an idle writer checks Redis is there (and looks for changes nobody signalled).
const PING_EVERY: Duration = Duration::from_secs(1);
const KEY_PREFIX: &str = "pinhole:aor:";
const STREAM: &str = "pinhole:regchanges";
/// Changes kept in the stream (about); a node further behind reads the store again.
const STREAM_MAX: u64 = 100_000;
/// Changes the reader takes per read, and keys per page of a full read.
const READ_MAX: u64 = 1_000;
/// How long a read waits for changes (under the connection's 1 s read timeout).
const BLOCK_MS: u64 = 500;
const PAGE: u64 = 500;
/// A stream entry: its id and its field/value list.
type StreamEntry = (String, Vec<String>);
pub(crate) struct ClusterConfig {
    pub(crate) redis: RedisTarget,
    pub(crate) node: String,
    /// Where the other nodes send requests for this node's phones.
    pub(crate) address: SocketAddr,
}

/// Work for the writer thread.
pub(crate) enum Work {
    /// A read-through: read this AOR's bindings for the node.
    Lookup(String),
    /// The registrar has changes to write (sent once until the writer takes them).
    Changes,
}

/// Starts the writer and the reader; returns where the node's lookups and change signals go.
pub(crate) fn start(cfg: ClusterConfig, shared: Arc<Shared>) -> anyhow::Result<Sender<Work>> {
    let writer_link = RedisLink::open(&cfg.redis)?;
    let reader_link = RedisLink::open(&cfg.redis)?;
    if let Some(w) = cfg.redis.warning() {
        tracing::warn!("{w}");
    }
    metrics::gauge!("pinhole_cluster_redis_up").set(0.0);
    for c in [
        "pinhole_cluster_reconciles_total",
        "pinhole_cluster_changes_written_total",
        "pinhole_cluster_changes_applied_total",
        "pinhole_cluster_garbage_total",
        "pinhole_cluster_oversized_total",
        "pinhole_cluster_bindings_refused_total",
    ] {
        metrics::counter!(c).absolute(0);
    }
    for result in ["found", "missing", "timeout"] {
        metrics::counter!("pinhole_cluster_lookups_total", "result" => result).absolute(0);
    }
    shared.node().enable_read_through();
    let (tx, rx) = std::sync::mpsc::channel();
    let (node, address) = (cfg.node.clone(), cfg.address);
    let s = shared.clone();
    std::thread::Builder::new()
        .name("cluster writer".into())
        .spawn(move || Writer { node, address, redis: writer_link, shared: s, up: None, last_ping: None }.run(&rx))?;
    std::thread::Builder::new()
        .name("cluster reader".into())
        .spawn(move || Reader { node: cfg.node, redis: reader_link, shared, restored: false }.run())?;
    Ok(tx)
}

fn key(aor: &str) -> String {
    format!("{KEY_PREFIX}{aor}")
}

/// Writes this node's changes and answers lookups.
struct Writer {
    node: String,
    address: SocketAddr,
    redis: RedisLink,
    shared: Arc<Shared>,
    /// Whether Redis answered last time (None: not tried yet).
    up: Option<bool>,
    last_ping: Option<Instant>,
}

impl Writer {
    /// Writes changes as soon as the node signals them (and once a second anyway, with a
    /// ping), and answers lookups.
    fn run(mut self, work: &Receiver<Work>) {
        loop {
            let result = match work.recv_timeout(PING_EVERY) {
                Ok(Work::Lookup(aor)) => self.lookup(&aor),
                Ok(Work::Changes) | Err(RecvTimeoutError::Timeout) => self.write_changes(),
                Err(RecvTimeoutError::Disconnected) => return,
            };
            self.note(result);
        }
    }

    /// Redis answered or failed: logs and metrics when that changes; after an outage every
    /// local binding is written again.
    fn note(&mut self, result: redis::RedisResult<()>) {
        match result {
            Ok(()) => {
                if self.up == Some(false) {
                    self.shared.node().proxy_mut().registrar_mut().mark_all_changed();
                    metrics::counter!("pinhole_cluster_reconciles_total").increment(1);
                    tracing::info!("Redis is back: local bindings written again, copies read again");
                } else if self.up.is_none() {
                    tracing::info!(node = %self.node, "cluster registrations in Redis");
                }
                self.up = Some(true);
                metrics::gauge!("pinhole_cluster_redis_up").set(1.0);
            }
            Err(e) => {
                if self.up != Some(false) {
                    tracing::warn!(error = %e, "Redis unreachable: serving from the local cache");
                }
                self.up = Some(false);
                self.redis.drop_connection();
                metrics::gauge!("pinhole_cluster_redis_up").set(0.0);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// The registrar's changes, written and announced. While Redis is away they stay
    /// taken (everything is written again when it is back).
    fn write_changes(&mut self) -> redis::RedisResult<()> {
        // Once a second: the gauges, and a ping when there is nothing to write.
        let due = self.last_ping.is_none_or(|t| t.elapsed() >= PING_EVERY) || self.up != Some(true);
        let (changes, counts) = {
            // Signals from here on are for changes this pass does not take.
            self.shared.changes_signalled.store(false, std::sync::atomic::Ordering::Release);
            let mut node = self.shared.node();
            let registrar = node.proxy_mut().registrar_mut();
            let changes = if self.up == Some(false) { Vec::new() } else { registrar.take_changes() };
            (changes, due.then(|| registrar.counts()))
        };
        if let Some((local, remote)) = counts {
            metrics::gauge!("pinhole_cluster_local_bindings").set(local as f64);
            metrics::gauge!("pinhole_cluster_remote_bindings").set(remote as f64);
        }
        if changes.is_empty() {
            if due {
                self.last_ping = Some(Instant::now());
                let _: String = redis::cmd("PING").query(self.redis.connection()?)?;
            }
            return Ok(());
        }
        let now = crate::server::unix_now();
        // The bindings are written before they are announced, in two batches: over a Redis
        // Cluster the AOR's key and the stream sit on different masters, and one pipeline
        // split between them could let another node read the announcement, and then the AOR,
        // before the AOR's write landed (it would then miss the change until a reconcile).
        let (mut cmds, mut announce) = (Vec::new(), Vec::new());
        for (aor, bindings) in &changes {
            let k = key(aor);
            let live: Vec<Binding> = bindings.iter().filter(|b| b.expires_at > now).cloned().collect();
            match live.iter().map(|b| b.expires_at).max() {
                Some(last) => {
                    let value = NodeBindings { addr: self.address, bindings: live }.encode();
                    cmds.push(redis::cmd("HSET").arg(&k).arg(&self.node).arg(value).to_owned());
                    // The key outlives its longest binding (GT: never shortened by another node).
                    cmds.push(redis::cmd("EXPIRE").arg(&k).arg(last - now).arg("GT").to_owned());
                    cmds.push(redis::cmd("EXPIRE").arg(&k).arg(last - now).arg("NX").to_owned());
                }
                None => cmds.push(redis::cmd("HDEL").arg(&k).arg(&self.node).to_owned()),
            }
            announce.push(
                redis::cmd("XADD")
                    .arg(STREAM)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_MAX)
                    .arg("*")
                    .arg("node")
                    .arg(&self.node)
                    .arg("aor")
                    .arg(aor)
                    .to_owned(),
            );
        }
        let written = self.redis.batch::<redis::Value>(cmds).and_then(|_| self.redis.batch::<redis::Value>(announce));
        if written.is_err() {
            // Not lost: written again with everything once Redis is back.
            self.shared.node().proxy_mut().registrar_mut().mark_all_changed();
        }
        written?;
        metrics::counter!("pinhole_cluster_changes_written_total").increment(changes.len() as u64);
        Ok(())
    }

    /// A read-through: every other node's bindings of `aor`, handed to the node.
    fn lookup(&mut self, aor: &str) -> redis::RedisResult<()> {
        let found = match read_aor(&mut self.redis, aor, &self.node) {
            Ok(f) => f,
            Err(e) => {
                // The request waits out its timeout and is answered from what there is.
                return Err(e);
            }
        };
        crate::server::input(&self.shared, |n| n.handle_lookup(std::time::Instant::now(), aor, found));
        Ok(())
    }
}

/// Every other node's bindings of `aor` in the store (bounded: fields over
/// [`MAX_VALUE`] are refused, see [`RedisLink::bounded_hash`]).
fn read_aor(redis: &mut RedisLink, aor: &str, us: &str) -> redis::RedisResult<Vec<(String, Vec<Binding>)>> {
    let fields = redis.bounded_hash(&key(aor))?;
    Ok(fields
        .into_iter()
        .filter(|(node, _)| node != us)
        .filter_map(|(node, v)| Some((node.clone(), decode(&v)?.into_remote(&node))))
        .collect())
}

fn decode(value: &[u8]) -> Option<NodeBindings> {
    let v = NodeBindings::decode(value);
    if v.is_none() {
        metrics::counter!("pinhole_cluster_garbage_total").increment(1);
    }
    v
}

/// Follows the other nodes' changes.
struct Reader {
    node: String,
    redis: RedisLink,
    shared: Arc<Shared>,
    /// Our own bindings are taken back from Redis once, at the first contact.
    restored: bool,
}

impl Reader {
    fn run(mut self) {
        loop {
            if let Err(e) = self.follow() {
                tracing::debug!(error = %e, "cluster reader: Redis lost; reading everything again when it is back");
                self.redis.drop_connection();
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// One connection's life: read everything, then every change as it comes.
    fn follow(&mut self) -> redis::RedisResult<()> {
        let con = self.redis.connection()?;
        // Where the stream is now: changes from here on come after the full read.
        let last: Vec<(String, Vec<String>)> =
            redis::cmd("XREVRANGE").arg(STREAM).arg("+").arg("-").arg("COUNT").arg(1).query(con)?;
        let mut position = last.first().map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone());
        self.read_all()?;
        loop {
            let con = self.redis.connection()?;
            let read: Option<Vec<(String, Vec<StreamEntry>)>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_MAX)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(STREAM)
                .arg(&position)
                .query(con)?;
            let entries: Vec<StreamEntry> = read.into_iter().flatten().flat_map(|(_, e)| e).collect();
            let Some((id, _)) = entries.last() else { continue };
            // Only a reader that fell a whole batch behind can have missed trimmed entries.
            let full = entries.len() as u64 >= READ_MAX;
            if full && position != "0-0" && self.trimmed_past(&position)? {
                tracing::info!("registration changes moved on past this node: reading everything again");
                return Err(redis::RedisError::from((redis::ErrorKind::IoError, "stream trimmed")));
            }
            position = id.clone();
            let mut changed: Vec<(String, String)> = entries
                .into_iter()
                .filter_map(|(_, f)| {
                    let get = |k: &str| f.chunks(2).find(|kv| kv.len() == 2 && kv[0] == k).map(|kv| kv[1].clone());
                    Some((get("aor")?, get("node")?))
                })
                .filter(|(_, node)| *node != self.node)
                .collect();
            changed.sort();
            changed.dedup();
            self.apply(&changed)?;
        }
    }

    /// Whether entries after `position` were trimmed away (the oldest one still in the
    /// stream is later than what we read up to).
    fn trimmed_past(&mut self, position: &str) -> redis::RedisResult<bool> {
        let con = self.redis.connection()?;
        let oldest: Vec<(String, Vec<String>)> =
            redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+").arg("COUNT").arg(1).query(con)?;
        Ok(oldest.first().is_some_and(|(id, _)| stream_id(id) > stream_id(position)))
    }

    /// Announced changes: each (AOR, node) read again, bounded, and applied.
    fn apply(&mut self, changed: &[(String, String)]) -> redis::RedisResult<()> {
        if changed.is_empty() {
            return Ok(());
        }
        let values = self.redis.bounded_fields(changed.iter().map(|(aor, node)| (key(aor), node.clone())).collect())?;
        let changes: Vec<(String, String, Vec<Binding>)> = changed
            .iter()
            .zip(values)
            .map(|((aor, from), value)| {
                let bindings = value.and_then(|v| decode(&v)).map(|v| v.into_remote(from)).unwrap_or_default();
                (aor.clone(), from.clone(), bindings)
            })
            .collect();
        let n = changes.len() as u64;
        // Through the node's input: requests waiting for these phones go on at once.
        crate::server::input(&self.shared, |node| node.apply_remote(std::time::Instant::now(), changes));
        metrics::counter!("pinhole_cluster_changes_applied_total").increment(n);
        Ok(())
    }

    /// The whole store, page by page, outside the node's lock but for applying each page:
    /// the other nodes' bindings become the copies (those no longer there are dropped), and
    /// at the first contact ours come back (a restart).
    fn read_all(&mut self) -> redis::RedisResult<()> {
        let now = crate::server::unix_now();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut ours: Vec<(String, Binding)> = Vec::new();
        let mut at = ScanCursor::START;
        let mut keys_read = 0;
        loop {
            let (next, keys) = self.redis.scan(at, &format!("{KEY_PREFIX}*"), PAGE)?;
            keys_read += keys.len();
            let mut page: Vec<(String, String, Vec<Binding>)> = Vec::new();
            let hashes = self.redis.bounded_hashes(&keys)?;
            for (k, fields) in keys.iter().zip(hashes) {
                let Some(aor) = k.strip_prefix(KEY_PREFIX) else { continue };
                for (from, v) in fields {
                    let Some(nb) = decode(&v) else { continue };
                    if from == self.node {
                        if !self.restored {
                            ours.extend(nb.bindings.into_iter().map(|mut b| {
                                b.node = None;
                                b.node_addr = None;
                                (aor.to_owned(), b)
                            }));
                        }
                        continue;
                    }
                    seen.insert((aor.to_owned(), from.clone()));
                    page.push((aor.to_owned(), from.clone(), nb.into_remote(&from)));
                }
            }
            {
                let mut node = self.shared.node();
                let registrar = node.proxy_mut().registrar_mut();
                for (aor, from, bindings) in page {
                    registrar.set_remote(&aor, &from, bindings, now);
                }
            }
            at = next;
            if at == ScanCursor::START || keys_read >= MAX_KEYS {
                break;
            }
        }
        if keys_read >= MAX_KEYS {
            tracing::warn!(max = MAX_KEYS, "more AORs in Redis than one full read takes");
        }
        let mut node = self.shared.node();
        let registrar = node.proxy_mut().registrar_mut();
        registrar.retain_remote(|aor, from| seen.contains(&(aor.to_owned(), from.to_owned())));
        if !self.restored {
            self.restored = true;
            let known: Vec<(String, String)> = registrar
                .snapshot()
                .into_iter()
                .filter(|(_, b)| b.node.is_none())
                .map(|(a, b)| (a, b.contact))
                .collect();
            let fresh: Vec<(String, Binding)> =
                ours.into_iter().filter(|(a, b)| !known.iter().any(|(ka, kc)| ka == a && *kc == b.contact)).collect();
            if !fresh.is_empty() {
                tracing::info!(bindings = fresh.len(), "own registrations taken back from Redis");
            }
            registrar.restore(fresh, now);
        }
        Ok(())
    }
}

/// A stream entry ID (`ms-seq`) as a pair that orders like the stream.
pub(crate) fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}
