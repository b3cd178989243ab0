//! Several nodes sharing registrations in Redis (`[cluster]`). Each node writes the
//! bindings whose flows it holds — with its name and SIP address, one key per binding
//! expiring with it (`pinhole:reg:AOR|CONTACT|NODE`, TTL = the binding's remaining time) — and
//! reads everyone's back, every half second. Other nodes' bindings go into the local
//! registrar as remote copies: a request for such a phone is sent to the node holding its
//! flow (RFC 5626's edge-proxy model). A node that restarts takes its own bindings back
//! from Redis. When Redis cannot be reached the node serves from what it has (its own
//! bindings and the last copies of the others) and says so; when Redis is back, everything
//! local is written again and the copies refreshed (reconciled), and it says that too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pinhole_sip::Binding;
use serde::{Deserialize, Serialize};

use crate::server::Shared;

/// How often a node writes its bindings and reads the others'.
const SYNC_EVERY: Duration = Duration::from_millis(500);
const KEY_PREFIX: &str = "pinhole:reg:";
/// Largest value read from Redis (a binding or a call state is a few hundred bytes to a
/// few KiB): anything longer is refused unread, so a planted value costs no memory.
pub(crate) const MAX_VALUE: usize = 64 * 1024;
/// Most keys one scan reads; past it the rest waits for a later round (and is warned of).
pub(crate) const MAX_KEYS: usize = 500_000;

#[derive(Serialize, Deserialize)]
struct Entry {
    aor: String,
    #[serde(flatten)]
    binding: Binding,
}

/// Where Redis is: a `redis://` or `rediss://` (TLS) URL, with the CA that signs the
/// server's certificate when it is not one the system trusts.
#[derive(Debug, Clone)]
pub(crate) struct RedisTarget {
    pub(crate) url: String,
    pub(crate) tls_ca: Option<std::path::PathBuf>,
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

/// Starts the sync thread.
pub(crate) fn start(cfg: ClusterConfig, shared: Arc<Shared>) -> anyhow::Result<()> {
    let redis = RedisLink::open(&cfg.redis)?;
    if let Some(w) = cfg.redis.warning() {
        tracing::warn!("{w}");
    }
    std::thread::Builder::new().name("cluster".into()).spawn(move || Sync::new(cfg, redis, shared).run())?;
    Ok(())
}

/// A Redis connection made on demand and dropped on error, so the next use reconnects.
pub(crate) struct RedisLink {
    client: redis::Client,
    con: Option<redis::Connection>,
}

impl RedisLink {
    pub(crate) fn open(target: &RedisTarget) -> anyhow::Result<RedisLink> {
        use anyhow::Context;
        let client = match &target.tls_ca {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("reading the Redis CA {}", ca.display()))?;
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                redis::Client::build_with_tls(target.url.as_str(), certs)?
            }
            None => redis::Client::open(target.url.as_str())?,
        };
        Ok(RedisLink { client, con: None })
    }

    pub(crate) fn connection(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.con.is_none() {
            let con = self.client.get_connection_with_timeout(Duration::from_secs(1))?;
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

struct Sync {
    cfg: ClusterConfig,
    redis: RedisLink,
    shared: Arc<Shared>,
    /// What was written last, by key: written again only when it changes.
    pushed: HashMap<String, String>,
    /// Whether Redis answered last time (None: not tried yet).
    up: Option<bool>,
    /// Our own bindings are taken back from Redis once, at the first contact.
    restored: bool,
}

impl Sync {
    fn new(cfg: ClusterConfig, redis: RedisLink, shared: Arc<Shared>) -> Sync {
        metrics::gauge!("pinhole_cluster_redis_up").set(0.0);
        metrics::counter!("pinhole_cluster_reconciles_total").absolute(0);
        Sync { cfg, redis, shared, pushed: HashMap::new(), up: None, restored: false }
    }

    fn run(mut self) {
        loop {
            match self.sync_once() {
                Ok((local, remote)) => {
                    if self.up == Some(false) {
                        metrics::counter!("pinhole_cluster_reconciles_total").increment(1);
                        tracing::info!(local, remote, "Redis is back: local bindings written again, copies refreshed");
                    } else if self.up.is_none() {
                        tracing::info!(node = %self.cfg.node, local, remote, "cluster registrations in Redis");
                    }
                    self.up = Some(true);
                    metrics::gauge!("pinhole_cluster_redis_up").set(1.0);
                    metrics::gauge!("pinhole_cluster_local_bindings").set(local as f64);
                    metrics::gauge!("pinhole_cluster_remote_bindings").set(remote as f64);
                }
                Err(e) => {
                    if self.up != Some(false) {
                        tracing::warn!(error = %e, "Redis unreachable: serving from the local cache");
                    }
                    self.up = Some(false);
                    self.redis.drop_connection();
                    // Everything is written again once Redis answers.
                    self.pushed.clear();
                    metrics::gauge!("pinhole_cluster_redis_up").set(0.0);
                }
            }
            std::thread::sleep(SYNC_EVERY);
        }
    }

    /// One round: our bindings out, everyone's in. Returns (ours, others') counts.
    fn sync_once(&mut self) -> redis::RedisResult<(usize, usize)> {
        let now = crate::server::unix_now();
        if !self.restored {
            let ours = self.read_all()?.into_iter().filter(|(_, b)| b.node.as_deref() == Some(&self.cfg.node));
            let ours: Vec<(String, Binding)> = ours
                .map(|(aor, mut b)| {
                    b.node = None;
                    b.node_addr = None;
                    (aor, b)
                })
                .collect();
            if !ours.is_empty() {
                tracing::info!(bindings = ours.len(), "own registrations taken back from Redis");
            }
            let mut node = self.shared.node();
            let registrar = node.proxy_mut().registrar_mut();
            let known: Vec<(String, String)> =
                registrar.local_snapshot().into_iter().map(|(a, b)| (a, b.contact)).collect();
            let fresh: Vec<(String, Binding)> =
                ours.into_iter().filter(|(a, b)| !known.iter().any(|(ka, kc)| ka == a && *kc == b.contact)).collect();
            registrar.restore(fresh, now);
            self.restored = true;
        }
        let local = self.shared.node().proxy().registrar().local_snapshot();
        let mut pipe = redis::pipe();
        let mut current = HashMap::new();
        for (aor, mut b) in local {
            let ttl = b.expires_at.saturating_sub(now);
            if ttl == 0 {
                continue;
            }
            b.node = Some(self.cfg.node.clone());
            b.node_addr = Some(self.cfg.address);
            // Each node's keys are its own: a phone that moved to another node has a key
            // there too, and the newest registration wins when they are read.
            let key = format!("{KEY_PREFIX}{aor}|{}|{}", b.contact, self.cfg.node);
            let value = serde_json::to_string(&Entry { aor, binding: b }).unwrap_or_default();
            if self.pushed.get(&key) != Some(&value) {
                pipe.cmd("SET").arg(&key).arg(&value).arg("EX").arg(ttl).ignore();
            }
            current.insert(key, value);
        }
        for gone in self.pushed.keys().filter(|k| !current.contains_key(*k)) {
            pipe.cmd("DEL").arg(gone).ignore();
        }
        let count = current.len();
        pipe.query::<()>(self.redis.connection()?)?;
        self.pushed = current;
        let remote: Vec<(String, Binding)> =
            self.read_all()?.into_iter().filter(|(_, b)| b.node.as_deref() != Some(&self.cfg.node)).collect();
        let others = remote.len();
        self.shared.node().proxy_mut().registrar_mut().replace_remote(remote, now);
        Ok((count, others))
    }

    /// Every binding in Redis.
    fn read_all(&mut self) -> redis::RedisResult<Vec<(String, Binding)>> {
        let mut out = Vec::new();
        for (_, v) in self.redis.values_under(KEY_PREFIX)? {
            match serde_json::from_str::<Entry>(&v) {
                Ok(e) => out.push((e.aor, e.binding)),
                Err(_) => metrics::counter!("pinhole_cluster_garbage_total").increment(1),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> RedisTarget {
        RedisTarget { url: url.into(), tls_ca: None }
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
