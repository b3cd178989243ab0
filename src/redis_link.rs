//! One way to Redis for the cluster's threads, whichever way Redis is deployed: one
//! server, a master found through Redis Sentinel, or a Redis Cluster.
//!
//! Everything pinhole keeps in Redis is addressed by one key per command, so each command
//! is one slot of a Redis Cluster; batches of commands (pipelines) may span slots and are
//! split by node ([`RedisLink::batch`]). The only command that is not about one key is
//! `SCAN`, which a Redis Cluster answers per master: [`RedisLink::scan`] walks the masters
//! in turn behind one cursor.
//!
//! Reads of values planted by whoever can write to Redis are bounded (see
//! [`MAX_VALUE`], [`MAX_FIELDS`], [`MAX_KEYS`]).

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ConnectionLike, FromRedisValue, RedisResult};

/// Largest value read from Redis (a binding or a call state is a few hundred bytes to a
/// few KiB): anything longer is refused unread, so a planted value costs no memory.
pub(crate) const MAX_VALUE: usize = 64 * 1024;
/// Most keys one scan reads; past it the rest waits for a later round (and is warned of).
pub(crate) const MAX_KEYS: usize = 500_000;
/// Most fields (nodes) one AOR's hash may have to be read.
const MAX_FIELDS: usize = 64;
/// How long a command may take (a blocked `XREAD` asks for less).
const TIMEOUT: Duration = Duration::from_secs(1);

/// A hash's fields and values.
pub(crate) type Fields = Vec<(String, Vec<u8>)>;

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
    /// Redis Cluster: some of its nodes' URLs (the client learns the rest and the slots
    /// from them, and again after a failover or resharding); `url` then gives only the
    /// password, user and scheme.
    pub(crate) cluster_nodes: Vec<String>,
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

/// Where a scan stands: the master it is on (always 0 off a Redis Cluster) and that
/// master's cursor. [`ScanCursor::START`] begins a scan; a scan is over when it returns
/// to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanCursor {
    master: usize,
    cursor: u64,
}

impl ScanCursor {
    pub(crate) const START: ScanCursor = ScanCursor { master: 0, cursor: 0 };
}

/// A Redis connection made on demand and dropped on error, so the next use reconnects
/// (through the sentinels to whichever server is the master then; to a Redis Cluster,
/// learning its slots again).
pub(crate) struct RedisLink {
    backend: Backend,
    con: Option<Con>,
    /// A Redis Cluster's masters, read at the start of each scan.
    masters: Vec<(String, u16)>,
}

enum Backend {
    Direct(redis::Client),
    Sentinel(redis::sentinel::SentinelClient),
    Cluster(ClusterClient),
}

// One per thread that talks to Redis: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Con {
    One(redis::Connection),
    Cluster(ClusterConnection),
}

impl RedisLink {
    pub(crate) fn open(target: &RedisTarget) -> anyhow::Result<RedisLink> {
        let backend = if let Some(master) = &target.master {
            let info = redis::IntoConnectionInfo::into_connection_info(target.url.as_str())?;
            let node = redis::sentinel::SentinelNodeConnectionInfo {
                tls_mode: matches!(info.addr, redis::ConnectionAddr::TcpTls { .. }).then_some(redis::TlsMode::Secure),
                redis_connection_info: Some(info.redis),
            };
            let sentinels: Vec<&str> = target.sentinels.iter().map(String::as_str).collect();
            Backend::Sentinel(redis::sentinel::SentinelClient::build(
                sentinels,
                master.clone(),
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )?)
        } else if !target.cluster_nodes.is_empty() {
            let info = redis::IntoConnectionInfo::into_connection_info(target.url.as_str())?;
            let mut b = ClusterClient::builder(target.cluster_nodes.clone())
                .connection_timeout(TIMEOUT)
                .response_timeout(TIMEOUT);
            if let Some(p) = info.redis.password {
                b = b.password(p);
            }
            if let Some(u) = info.redis.username {
                b = b.username(u);
            }
            if let Some(pem) = read_ca(target)? {
                b = b.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) });
            }
            Backend::Cluster(b.build()?)
        } else {
            match read_ca(target)? {
                Some(pem) => {
                    let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                    Backend::Direct(redis::Client::build_with_tls(target.url.as_str(), certs)?)
                }
                None => Backend::Direct(redis::Client::open(target.url.as_str())?),
            }
        };
        Ok(RedisLink { backend, con: None, masters: Vec::new() })
    }

    /// The connection, made if there is none: for single commands (on a Redis Cluster,
    /// each is routed by its key).
    pub(crate) fn connection(&mut self) -> RedisResult<&mut dyn ConnectionLike> {
        Ok(match self.con()? {
            Con::One(c) => c,
            Con::Cluster(c) => c,
        })
    }

    fn con(&mut self) -> RedisResult<&mut Con> {
        if self.con.is_none() {
            let con = match &mut self.backend {
                Backend::Direct(c) => Con::One(c.get_connection_with_timeout(TIMEOUT)?),
                Backend::Sentinel(s) => Con::One(s.get_connection()?),
                Backend::Cluster(c) => Con::Cluster(c.get_connection()?),
            };
            match &con {
                Con::One(c) => {
                    c.set_read_timeout(Some(TIMEOUT))?;
                    c.set_write_timeout(Some(TIMEOUT))?;
                }
                Con::Cluster(c) => {
                    c.set_read_timeout(Some(TIMEOUT))?;
                    c.set_write_timeout(Some(TIMEOUT))?;
                }
            }
            self.con = Some(con);
        }
        self.con.as_mut().ok_or_else(|| redis::RedisError::from((redis::ErrorKind::IoError, "no connection")))
    }

    pub(crate) fn drop_connection(&mut self) {
        self.con = None;
    }

    /// Several commands in one round trip (one per node of a Redis Cluster), each command's
    /// reply in order.
    pub(crate) fn batch<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<T>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self.con()? {
            Con::One(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(c)
            }
            Con::Cluster(c) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(c)
            }
        }
    }

    /// One page of the keys matching `pattern` (about `count`) and where the scan goes on;
    /// over when that is [`ScanCursor::START`] again. A Redis Cluster's masters are read at
    /// the start and scanned one after the other.
    pub(crate) fn scan(&mut self, at: ScanCursor, pattern: &str, count: u64) -> RedisResult<(ScanCursor, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at.cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
        if matches!(self.con()?, Con::One(_)) {
            let (next, keys): (u64, Vec<String>) = cmd.query(self.connection()?)?;
            return Ok((ScanCursor { master: 0, cursor: next }, keys));
        }
        if at == ScanCursor::START {
            self.masters = self.cluster_masters()?;
        }
        let Some((host, port)) = self.masters.get(at.master).cloned() else {
            return Ok((ScanCursor::START, Vec::new()));
        };
        let Con::Cluster(c) = self.con()? else { unreachable!("checked above") };
        let value = c.route_command(&cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }))?;
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(&value)?;
        let next = match (next, at.master + 1 < self.masters.len()) {
            (0, true) => ScanCursor { master: at.master + 1, cursor: 0 },
            (0, false) => ScanCursor::START,
            (n, _) => ScanCursor { master: at.master, cursor: n },
        };
        Ok((next, keys))
    }

    /// A Redis Cluster's masters, from `CLUSTER SLOTS` asked of any node.
    fn cluster_masters(&mut self) -> RedisResult<Vec<(String, u16)>> {
        let Con::Cluster(c) = self.con()? else { return Ok(Vec::new()) };
        let slots = c.route_command(
            &redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )?;
        let ranges: Vec<Vec<redis::Value>> = redis::from_redis_value(&slots)?;
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in ranges {
            let Some(master) = range.get(2) else { continue };
            let node: Vec<redis::Value> = redis::from_redis_value(master)?;
            let (Some(host), Some(port)) = (node.first(), node.get(1)) else { continue };
            let addr = (redis::from_redis_value::<String>(host)?, redis::from_redis_value::<u16>(port)?);
            if !masters.contains(&addr) {
                masters.push(addr);
            }
        }
        masters.sort();
        Ok(masters)
    }

    /// Every key under `prefix` with its value (a scan, then the values in chunks).
    pub(crate) fn values_under(&mut self, prefix: &str) -> RedisResult<Vec<(String, String)>> {
        let mut keys: Vec<String> = Vec::new();
        let mut at = ScanCursor::START;
        while keys.len() < MAX_KEYS {
            let (next, batch) = self.scan(at, &format!("{prefix}*"), 1000)?;
            keys.extend(batch);
            at = next;
            if at == ScanCursor::START {
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
    pub(crate) fn bounded_hashes(&mut self, keys: &[String]) -> RedisResult<Vec<Fields>> {
        let lens: Vec<usize> = self.batch(keys.iter().map(|k| redis::cmd("HLEN").arg(k).to_owned()).collect())?;
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
        let names: Vec<Vec<String>> =
            self.batch(readable.iter().map(|k| redis::cmd("HKEYS").arg(*k).to_owned()).collect())?;
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

    pub(crate) fn bounded_hash(&mut self, key: &str) -> RedisResult<Fields> {
        Ok(self.bounded_hashes(&[key.to_owned()])?.pop().unwrap_or_default())
    }

    /// The values of hash fields `(key, field)` (`None`: missing, or longer than
    /// [`MAX_VALUE`], refused unread and counted). Two round trips.
    pub(crate) fn bounded_fields(&mut self, pairs: Vec<(String, String)>) -> RedisResult<Vec<Option<Vec<u8>>>> {
        let lens: Vec<usize> =
            self.batch(pairs.iter().map(|(k, f)| redis::cmd("HSTRLEN").arg(k).arg(f).to_owned()).collect())?;
        let mut cmds = Vec::new();
        let mut wanted = Vec::new();
        for (i, ((k, f), n)) in pairs.iter().zip(&lens).enumerate() {
            if *n > MAX_VALUE {
                metrics::counter!("pinhole_cluster_oversized_total").increment(1);
            } else if *n > 0 {
                cmds.push(redis::cmd("HGET").arg(k).arg(f).to_owned());
                wanted.push(i);
            }
        }
        let got: Vec<Option<Vec<u8>>> = self.batch(cmds)?;
        let mut out = vec![None; pairs.len()];
        for (i, v) in wanted.into_iter().zip(got) {
            out[i] = v;
        }
        Ok(out)
    }

    /// The values of `keys` (`None`: missing, empty, or longer than [`MAX_VALUE`], which
    /// is counted and never read whole: GETRANGE fetches at most one byte past the limit).
    pub(crate) fn bounded_values(&mut self, keys: &[String]) -> RedisResult<Vec<Option<String>>> {
        let raw: Vec<Vec<u8>> =
            self.batch(keys.iter().map(|k| redis::cmd("GETRANGE").arg(k).arg(0).arg(MAX_VALUE).to_owned()).collect())?;
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

fn read_ca(target: &RedisTarget) -> anyhow::Result<Option<Vec<u8>>> {
    use anyhow::Context;
    let Some(ca) = &target.tls_ca else { return Ok(None) };
    Ok(Some(std::fs::read(ca).with_context(|| format!("reading the Redis CA {}", ca.display()))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> RedisTarget {
        RedisTarget { url: url.into(), tls_ca: None, sentinels: vec![], master: None, cluster_nodes: vec![] }
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
