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
//! - **the writer** takes the registrar's changes every [`WRITE_EVERY`] (under the lock: a
//!   swap of a small set), writes each changed AOR's field (or deletes it) and announces
//!   it on the stream; it also answers the proxy's read-through lookups (`HGETALL` of one
//!   AOR: a phone registered through another node a moment ago is reachable at once).
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

use crate::server::Shared;

/// How often the writer looks for changes (and, idle, how quickly a lookup is served).
const WRITE_EVERY: Duration = Duration::from_millis(5);
/// How often an idle writer checks Redis is there.
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
/// Largest value read from Redis (a binding or a call state is a few hundred bytes to a
/// few KiB): anything longer is refused unread, so a planted value costs no memory.
pub(crate) const MAX_VALUE: usize = 64 * 1024;
/// Most keys one scan reads; past it the rest waits for a later round (and is warned of).
pub(crate) const MAX_KEYS: usize = 500_000;
/// A hash's fields and values.
type Fields = Vec<(String, Vec<u8>)>;
/// A stream entry: its id and its field/value list.
type StreamEntry = (String, Vec<String>);

/// Most fields (nodes) one AOR's hash may have to be read.
const MAX_FIELDS: usize = 64;

/// Where Redis is: a `redis://` or `rediss://` (TLS) URL, with the CA that signs the
/// server's certificate when it is not one the system trusts.
#[derive(Debug, Clone)]
pub(crate) struct RedisTarget {
    pub(crate) url: String,
    pub(crate) tls_ca: Option<std::path::PathBuf>,
    /// Redis Sentinel: the sentinels' URLs and the master's name. The master is asked of
    /// them at every (re)connect, so a failover is followed; `url` then gives only the
    /// master's password (its host is whatever the sentinels say).
    pub(crate) sentinels: Vec<String>,
    pub(crate) master: Option<String>,
}

impl RedisTarget {
    /// What an operator should hear about this target at start: a Redis without a password
    /// away from this host lets anyone who reaches it rewrite every registration.
    pub(crate) fn warning(&self) -> Option<String> {
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str()).ok()?;
        let host = match &info.addr {
            redis::ConnectionAddr::Tcp(h, _) | redis::ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
            redis::ConnectionAddr::Unix(_) => return None,
        };
        let local = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        (info.redis.password.is_none() && !local).then(|| {
            format!(
                "Redis at {host} has no password: anyone who can reach it can redirect calls (give the URL a password, redis://:PASSWORD@host, and use rediss:// across networks)"
            )
        })
    }
}

pub(crate) struct ClusterConfig {
    pub(crate) redis: RedisTarget,
    pub(crate) node: String,
    /// Where the other nodes send requests for this node's phones.
    pub(crate) address: SocketAddr,
}

/// Starts the writer and the reader; returns where the node's lookups go.
pub(crate) fn start(cfg: ClusterConfig, shared: Arc<Shared>) -> anyhow::Result<Sender<String>> {
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

/// A Redis connection made on demand and dropped on error, so the next use reconnects
/// (through the sentinels, to whichever server is the master then).
pub(crate) struct RedisLink {
    backend: Backend,
    con: Option<redis::Connection>,
}

enum Backend {
    Direct(redis::Client),
    Sentinel(redis::sentinel::SentinelClient),
}

impl RedisLink {
    pub(crate) fn open(target: &RedisTarget) -> anyhow::Result<RedisLink> {
        use anyhow::Context;
        if let Some(master) = &target.master {
            let info = redis::IntoConnectionInfo::into_connection_info(target.url.as_str())?;
            let node = redis::sentinel::SentinelNodeConnectionInfo {
                tls_mode: matches!(info.addr, redis::ConnectionAddr::TcpTls { .. }).then_some(redis::TlsMode::Secure),
                redis_connection_info: Some(info.redis),
            };
            let sentinels: Vec<&str> = target.sentinels.iter().map(String::as_str).collect();
            let client = redis::sentinel::SentinelClient::build(
                sentinels,
                master.clone(),
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )?;
            return Ok(RedisLink { backend: Backend::Sentinel(client), con: None });
        }
        let client = match &target.tls_ca {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("reading the Redis CA {}", ca.display()))?;
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                redis::Client::build_with_tls(target.url.as_str(), certs)?
            }
            None => redis::Client::open(target.url.as_str())?,
        };
        Ok(RedisLink { backend: Backend::Direct(client), con: None })
    }

    pub(crate) fn connection(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.con.is_none() {
            let con = match &mut self.backend {
                Backend::Direct(c) => c.get_connection_with_timeout(Duration::from_secs(1))?,
                Backend::Sentinel(s) => s.get_connection()?,
            };
            con.set_read_timeout(Some(Duration::from_secs(1)))?;
            con.set_write_timeout(Some(Duration::from_secs(1)))?;
            self.con = Some(con);
        }
        self.con.as_mut().ok_or_else(|| redis::RedisError::from((redis::ErrorKind::IoError, "no connection")))
    }

    pub(crate) fn drop_connection(&mut self) {
        self.con = None;
    }

    /// Every key under `prefix` with its value (SCAN, then MGET in chunks).
    pub(crate) fn values_under(&mut self, prefix: &str) -> redis::RedisResult<Vec<(String, String)>> {
        let con = self.connection()?;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        while keys.len() < MAX_KEYS {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query(con)?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if keys.len() >= MAX_KEYS {
            tracing::warn!(prefix, max = MAX_KEYS, "more keys in Redis than one scan reads");
        }
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let values = self.bounded_values(chunk)?;
            out.extend(chunk.iter().cloned().zip(values).filter_map(|(k, v)| Some((k, v?))));
        }
        Ok(out)
    }

    /// Each of `keys`' hash fields and values, bounded: a hash of more than [`MAX_FIELDS`]
    /// fields is refused unread, and so is a value longer than [`MAX_VALUE`] (both counted).
    /// Four round trips whatever the number of keys.
    pub(crate) fn bounded_hashes(&mut self, keys: &[String]) -> redis::RedisResult<Vec<Fields>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let con = self.connection()?;
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HLEN").arg(k);
        }
        let lens: Vec<usize> = pipe.query(con)?;
        let readable: Vec<&String> = keys
            .iter()
            .zip(&lens)
            .filter(|(_, n)| {
                let ok = **n <= MAX_FIELDS;
                if !ok {
                    metrics::counter!("pinhole_cluster_oversized_total").increment(1);
                }
                ok
            })
            .map(|(k, _)| k)
            .collect();
        let mut pipe = redis::pipe();
        for k in &readable {
            pipe.cmd("HKEYS").arg(*k);
        }
        let names: Vec<Vec<String>> = if readable.is_empty() { Vec::new() } else { pipe.query(con)? };
        let pairs: Vec<(String, String)> = readable
            .iter()
            .zip(&names)
            .flat_map(|(k, fields)| fields.iter().take(MAX_FIELDS).map(|f| ((*k).clone(), f.clone())))
            .collect();
        let values = self.bounded_fields(pairs.clone())?;
        let mut out: Vec<Fields> = vec![Vec::new(); keys.len()];
        for ((k, f), v) in pairs.into_iter().zip(values) {
            if let (Some(i), Some(v)) = (keys.iter().position(|x| *x == k), v) {
                out[i].push((f, v));
            }
        }
        Ok(out)
    }

    pub(crate) fn bounded_hash(&mut self, key: &str) -> redis::RedisResult<Vec<(String, Vec<u8>)>> {
        Ok(self.bounded_hashes(&[key.to_owned()])?.pop().unwrap_or_default())
    }

    /// The values of hash fields `(key, field)` (`None`: missing, or longer than
    /// [`MAX_VALUE`], refused unread and counted). Two round trips.
    pub(crate) fn bounded_fields(&mut self, pairs: Vec<(String, String)>) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let con = self.connection()?;
        let mut pipe = redis::pipe();
        for (k, f) in &pairs {
            pipe.cmd("HSTRLEN").arg(k).arg(f);
        }
        let lens: Vec<usize> = pipe.query(con)?;
        let mut pipe = redis::pipe();
        let mut wanted = Vec::new();
        for (i, ((k, f), n)) in pairs.iter().zip(&lens).enumerate() {
            if *n > MAX_VALUE {
                metrics::counter!("pinhole_cluster_oversized_total").increment(1);
            } else if *n > 0 {
                pipe.cmd("HGET").arg(k).arg(f);
                wanted.push(i);
            }
        }
        let got: Vec<Option<Vec<u8>>> = if wanted.is_empty() { Vec::new() } else { pipe.query(con)? };
        let mut out = vec![None; pairs.len()];
        for (i, v) in wanted.into_iter().zip(got) {
            out[i] = v;
        }
        Ok(out)
    }

    /// The values of `keys` (`None`: missing, empty, or longer than [`MAX_VALUE`], which
    /// is counted and never read whole: GETRANGE fetches at most one byte past the limit).
    pub(crate) fn bounded_values(&mut self, keys: &[String]) -> redis::RedisResult<Vec<Option<String>>> {
        let con = self.connection()?;
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GETRANGE").arg(k).arg(0).arg(MAX_VALUE);
        }
        let raw: Vec<Vec<u8>> = if keys.is_empty() { Vec::new() } else { pipe.query(con)? };
        Ok(raw
            .into_iter()
            .map(|v| {
                if v.len() > MAX_VALUE {
                    metrics::counter!("pinhole_cluster_oversized_total").increment(1);
                    return None;
                }
                String::from_utf8(v).ok().filter(|s| !s.is_empty())
            })
            .collect())
    }
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
    fn run(mut self, lookups: &Receiver<String>) {
        loop {
            let result = match lookups.recv_timeout(WRITE_EVERY) {
                Ok(aor) => self.lookup(&aor),
                Err(RecvTimeoutError::Timeout) => self.write_changes(),
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
        // Once a second: the gauges (counting is linear in the bindings, so not every tick).
        let due = self.last_ping.is_none_or(|t| t.elapsed() >= PING_EVERY) || self.up != Some(true);
        let (changes, counts) = {
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
        let mut pipe = redis::pipe();
        for (aor, bindings) in &changes {
            let k = key(aor);
            let live: Vec<Binding> = bindings.iter().filter(|b| b.expires_at > now).cloned().collect();
            match live.iter().map(|b| b.expires_at).max() {
                Some(last) => {
                    let value = NodeBindings { addr: self.address, bindings: live }.encode();
                    pipe.cmd("HSET").arg(&k).arg(&self.node).arg(value).ignore();
                    // The key outlives its longest binding (GT: never shortened by another node).
                    pipe.cmd("EXPIRE").arg(&k).arg(last - now).arg("GT").ignore();
                    pipe.cmd("EXPIRE").arg(&k).arg(last - now).arg("NX").ignore();
                }
                None => {
                    pipe.cmd("HDEL").arg(&k).arg(&self.node).ignore();
                }
            }
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_MAX)
                .arg("*")
                .arg("node")
                .arg(&self.node)
                .arg("aor")
                .arg(aor)
                .ignore();
        }
        let written = pipe.query::<()>(self.redis.connection()?);
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
        let mut cursor: u64 = 0;
        let mut keys_read = 0;
        loop {
            let con = self.redis.connection()?;
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{KEY_PREFIX}*"))
                .arg("COUNT")
                .arg(PAGE)
                .query(con)?;
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
            cursor = next;
            if cursor == 0 || keys_read >= MAX_KEYS {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> RedisTarget {
        RedisTarget { url: url.into(), tls_ca: None, sentinels: vec![], master: None }
    }

    #[test]
    fn a_redis_without_a_password_away_from_this_host_is_warned_of() {
        assert!(target("redis://192.0.2.5:6379").warning().is_some_and(|w| w.contains("no password")));
        assert!(target("rediss://redis.example.net:6380").warning().is_some());
        assert_eq!(target("redis://:secret@192.0.2.5:6379").warning(), None, "a password");
        assert_eq!(target("redis://127.0.0.1:6379").warning(), None, "loopback");
        assert_eq!(target("redis://localhost:6379").warning(), None, "this host");
        assert_eq!(target("redis://[::1]:6379").warning(), None, "loopback v6");
    }
}
