//! Relay takeover through Redis (`[cluster] calls`), rtpengine's model: the active relay
//! writes each call's state (`pinhole:call:<relay address>:<Call-ID>`, one JSON value) when
//! it changes — signalling, a latch, the end — never per packet, and appends the Call-ID to
//! a stream of changes (`pinhole:calllog:<relay address>`). A standby with the same
//! `[media] interfaces` address loads every call once, then tails the stream and reads only
//! the calls that changed, mirroring them on the same ports; when the address moves to it
//! (a virtual IP) and ng reaches it, it is the active node (see `pinhole_core::Node`), and
//! it writes from then on.
//!
//! The standby binds an address it does not have yet: it needs
//! `net.ipv4.ip_nonlocal_bind = 1` (as keepalived setups for rtpengine do).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pinhole_media::relay::CallState;

use crate::cluster::stream_id;
use crate::redis_link::RedisLink;
use crate::server::{unix_now, Shared};

/// How often the active node writes what changed, and the standby reads.
const WRITE_EVERY: Duration = Duration::from_millis(100);
const MIRROR_EVERY: Duration = Duration::from_millis(250);
/// Changes kept in the stream (about); a standby further behind loads everything again.
const STREAM_MAX: u64 = 100_000;
/// Changes a standby takes per read.
const READ_MAX: u64 = 5_000;

pub(crate) struct CallStoreConfig {
    pub(crate) redis: crate::redis_link::RedisTarget,
    pub(crate) node: String,
    /// Key prefix: the relay's address, shared by the active node and its standby.
    pub(crate) prefix: String,
    /// The stream of changed Call-IDs under that address, which a standby tails.
    pub(crate) stream: String,
    pub(crate) standby: bool,
    /// Keys expire after the longest call.
    pub(crate) ttl: u64,
}

pub(crate) fn start(cfg: CallStoreConfig, shared: Arc<Shared>) -> anyhow::Result<()> {
    let redis = RedisLink::open(&cfg.redis)?;
    {
        let mut node = shared.node();
        // A standby mirrors and ends nothing; an active node writes every change from the
        // start (it first takes back what Redis holds under its address: a restart in place).
        if let Some(relay) = node.relay_mut() {
            relay.set_standby(cfg.standby, std::time::Instant::now());
            relay.keep_state(!cfg.standby);
        }
    }
    if cfg.standby {
        check_nonlocal_bind();
    }
    tracing::info!(node = %cfg.node, keys = %cfg.prefix, role = if cfg.standby { "standby" } else { "active" }, "relay call state in Redis");
    metrics::gauge!("pinhole_takeover_standby").set(if cfg.standby { 1.0 } else { 0.0 });
    for op in ["set", "delete"] {
        metrics::counter!("pinhole_takeover_writes_total", "op" => op).absolute(0);
    }
    let mut store = CallStore {
        cfg,
        redis,
        shared,
        pending: HashMap::new(),
        mirrored: HashMap::new(),
        position: None,
        taking_back: false,
        up: None,
    };
    std::thread::Builder::new().name("calls".into()).spawn(move || store.run())?;
    Ok(())
}

fn check_nonlocal_bind() {
    let on = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind").is_ok_and(|v| v.trim() == "1");
    if !on {
        tracing::warn!(
            "standby without net.ipv4.ip_nonlocal_bind = 1: relay ports on an address not yet here cannot be bound"
        );
    }
}

struct CallStore {
    cfg: CallStoreConfig,
    redis: RedisLink,
    shared: Arc<Shared>,
    /// Active: changes not yet written (`None`: delete), kept across a Redis outage.
    pending: HashMap<String, Option<String>>,
    /// Standby: the value each mirrored call was restored from.
    mirrored: HashMap<String, String>,
    /// Standby: the last change read from the stream (`None`: load everything first).
    position: Option<String>,
    /// An active node taking its calls back at start restores as a standby does.
    taking_back: bool,
    up: Option<bool>,
}

impl CallStore {
    fn run(&mut self) {
        if !self.cfg.standby {
            self.taking_back = true;
            let r = self.load_all();
            self.taking_back = false;
            let n = self.mirrored.len();
            self.note(r);
            if n > 0 {
                tracing::info!(calls = n, "calls taken back from Redis at start");
            }
        }
        loop {
            let standby = self.shared.node().relay().is_some_and(|r| r.is_standby());
            let r = if standby { self.mirror() } else { self.write() };
            self.note(r);
            std::thread::sleep(if standby { MIRROR_EVERY } else { WRITE_EVERY });
        }
    }

    fn note(&mut self, r: redis::RedisResult<()>) {
        match r {
            Ok(()) => {
                if self.up == Some(false) {
                    tracing::info!(pending = self.pending.len(), "Redis is back: call state written again");
                }
                self.up = Some(true);
                metrics::gauge!("pinhole_takeover_redis_up").set(1.0);
            }
            Err(e) => {
                if self.up != Some(false) {
                    tracing::warn!(error = %e, "Redis unreachable: call state kept until it is back");
                }
                self.up = Some(false);
                self.redis.drop_connection();
                // A standby loads everything again: changes may have gone by meanwhile.
                self.position = None;
                metrics::gauge!("pinhole_takeover_redis_up").set(0.0);
            }
        }
    }

    /// Active: the calls that changed since last time, written in one pipeline.
    fn write(&mut self) -> redis::RedisResult<()> {
        // Mirrored calls are ours now; later changes are written as they come.
        self.mirrored.clear();
        {
            let mut node = self.shared.node();
            let Some(relay) = node.relay_mut() else { return Ok(()) };
            relay.note_latches();
            let (now, unix) = (std::time::Instant::now(), unix_now());
            while let Some((id, state)) = relay.poll_changed(now, unix) {
                let json = state.and_then(|s| serde_json::to_string(&s).ok());
                self.pending.insert(id, json);
            }
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut cmds = Vec::new();
        let (mut sets, mut dels) = (0u64, 0u64);
        for (id, json) in &self.pending {
            let key = format!("{}{id}", self.cfg.prefix);
            cmds.push(
                redis::cmd("XADD")
                    .arg(&self.cfg.stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_MAX)
                    .arg("*")
                    .arg("call")
                    .arg(id)
                    .to_owned(),
            );
            match json {
                Some(v) => {
                    cmds.push(redis::cmd("SET").arg(&key).arg(v).arg("EX").arg(self.cfg.ttl).to_owned());
                    sets += 1;
                }
                None => {
                    cmds.push(redis::cmd("DEL").arg(&key).to_owned());
                    dels += 1;
                }
            }
        }
        self.redis.batch::<redis::Value>(cmds)?;
        self.pending.clear();
        metrics::counter!("pinhole_takeover_writes_total", "op" => "set").increment(sets);
        metrics::counter!("pinhole_takeover_writes_total", "op" => "delete").increment(dels);
        Ok(())
    }

    /// Standby: every call under the relay's address at first (and after an outage, or
    /// when the stream moved on past what was read), then only the calls the stream names
    /// as changed — each restored (or replaced) when its value changed, dropped when its
    /// key is gone.
    fn mirror(&mut self) -> redis::RedisResult<()> {
        let Some(position) = self.position.clone() else { return self.load_all() };
        let con = self.redis.connection()?;
        let first: Vec<Entry> =
            redis::cmd("XRANGE").arg(&self.cfg.stream).arg("-").arg("+").arg("COUNT").arg(1).query(con)?;
        // Trimmed past what was read (from an empty stream, "0-0", nothing was missed).
        if position != "0-0" && first.first().is_some_and(|(id, _)| stream_id(id) > stream_id(&position)) {
            tracing::info!("call state stream moved on past the standby: loading every call again");
            return self.load_all();
        }
        let read: Option<Vec<(String, Vec<Entry>)>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_MAX)
            .arg("STREAMS")
            .arg(&self.cfg.stream)
            .arg(&position)
            .query(con)?;
        let entries = read.into_iter().flatten().flat_map(|(_, e)| e).collect::<Vec<_>>();
        let Some((last, _)) = entries.last() else { return Ok(()) };
        let last = last.clone();
        let mut ids: Vec<String> = entries
            .into_iter()
            .filter_map(|(_, f)| f.chunks(2).find(|kv| kv[0] == "call").map(|kv| kv[1].clone()))
            .collect();
        ids.sort();
        ids.dedup();
        let keys: Vec<String> = ids.iter().map(|id| format!("{}{id}", self.cfg.prefix)).collect();
        let values = self.redis.bounded_values(&keys)?;
        let changed: Vec<(String, Option<String>)> = ids.into_iter().zip(values).collect();
        self.apply(changed, false);
        self.position = Some(last);
        Ok(())
    }

    /// Every call under the relay's address; the stream is read from where it stood before.
    fn load_all(&mut self) -> redis::RedisResult<()> {
        let con = self.redis.connection()?;
        let newest: Vec<Entry> =
            redis::cmd("XREVRANGE").arg(&self.cfg.stream).arg("+").arg("-").arg("COUNT").arg(1).query(con)?;
        let position = newest.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id);
        let values = self.redis.values_under(&self.cfg.prefix)?;
        let prefix = self.cfg.prefix.len();
        let all = values.into_iter().map(|(key, json)| (key[prefix..].to_owned(), Some(json))).collect();
        self.apply(all, true);
        self.position = Some(position);
        Ok(())
    }

    /// Restores the calls whose value changed and drops those without one (`None`); with
    /// `whole`, also every mirrored call not in `calls`.
    fn apply(&mut self, calls: Vec<(String, Option<String>)>, whole: bool) {
        let mut restored = 0usize;
        crate::server::input(&self.shared, |node| {
            let taking_back = self.taking_back;
            let Some(relay) = node.relay_mut().filter(|r| r.is_standby() || taking_back) else { return };
            let (now, unix) = (std::time::Instant::now(), unix_now());
            let mut seen = std::collections::HashSet::new();
            for (id, json) in calls {
                seen.insert(id.clone());
                let Some(json) = json else {
                    if self.mirrored.remove(&id).is_some() {
                        relay.delete(&id);
                    }
                    continue;
                };
                if self.mirrored.get(&id) == Some(&json) {
                    continue;
                }
                match serde_json::from_str::<CallState>(&json) {
                    Ok(st) if st.call_id == id => match relay.restore(now, unix, &st) {
                        Ok(()) => {
                            self.mirrored.insert(id, json);
                            restored += 1;
                        }
                        Err(e) => {
                            metrics::counter!("pinhole_takeover_restore_errors_total").increment(1);
                            tracing::warn!(call_id = id, error = %e, "call state not restored");
                        }
                    },
                    _ => metrics::counter!("pinhole_takeover_garbage_total").increment(1),
                }
            }
            if whole {
                let gone: Vec<String> = self.mirrored.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                for id in gone {
                    relay.delete(&id);
                    self.mirrored.remove(&id);
                }
            }
            metrics::gauge!("pinhole_takeover_mirrored_calls").set(self.mirrored.len() as f64);
        });
        if restored > 0 {
            tracing::debug!(restored, mirrored = self.mirrored.len(), "calls mirrored from Redis");
        }
    }
}

/// A stream entry as Redis returns it: its ID and its fields, name and value in turn.
type Entry = (String, Vec<String>);
