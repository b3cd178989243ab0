//! The registrar (RFC 3261 §10.3) with flow-bound bindings.
//!
//! Each binding remembers the flow its REGISTER arrived on, so requests for the AOR go to
//! the NAT mapping the phone really uses, not to the private address in its Contact.
//! Bindings carry wall-clock expiry so the shell can persist and restore them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::message::{param_of_name_addr, HeaderName, Message, Rejection};
use crate::transport::{ConnId, Flow, Transport};

#[derive(Debug, Clone, Copy)]
pub struct RegistrarConfig {
    pub default_expires: u32,
    pub min_expires: u32,
    pub max_expires: u32,
}

/// One contact bound to an AOR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    /// The contact URI as the UA sent it (without angle brackets or header params).
    pub contact: String,
    /// q-value × 1000 (RFC 3261 §20.10).
    pub q: u16,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_at: u64,
    pub call_id: String,
    pub cseq: u32,
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    #[serde(skip)]
    pub conn: Option<ConnId>,
    /// Path header values (RFC 3327), used as a preloaded route set.
    pub path: Vec<String>,
    /// `+sip.instance` and `reg-id` (RFC 5626).
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
    #[serde(skip)]
    pub keepalive_failures: u32,
    /// Unix seconds of the next keepalive.
    #[serde(skip)]
    pub next_keepalive: u64,
    /// This binding's learned keepalive interval in seconds (0: the configured one). Halved,
    /// down to the floor, each time its NAT mapping is found dead.
    #[serde(default)]
    pub keepalive_interval: u64,
    /// Unix seconds since a keepalive has waited for its answer (0: none waiting).
    #[serde(skip)]
    pub keepalive_pending_since: u64,
    /// The NAT profile an agent reported with this (authenticated) REGISTER, in its
    /// `Pinhole-NAT` header form (see `pinhole_media::punch::NatProfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_profile: Option<String>,
    /// The agent's round trips to the relays' STUN services, in its `Pinhole-RTT` form
    /// (see `pinhole_media::fleet::parse_rtts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_rtts: Option<String>,
    /// The key the agent gave with this (authenticated) REGISTER, in `Pinhole-Key` form:
    /// its punch plans and forwarder offers are signed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_key: Option<String>,
    /// Unix seconds of the REGISTER that made this binding (the newest registration of a
    /// contact wins across a cluster).
    #[serde(default)]
    pub registered_at: u64,
    /// In a cluster: the node that holds this binding's flow and its SIP address (`None`:
    /// this node). Requests for a remote binding go to that node, which sends them down
    /// the flow (RFC 5626's edge proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_addr: Option<SocketAddr>,
}

/// One node's bindings of one AOR as a cluster store holds them (a Redis hash field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeBindings {
    /// Where the other nodes send requests for these bindings.
    pub addr: SocketAddr,
    pub bindings: Vec<Binding>,
}

/// The largest stored value read back: a node's bindings of one AOR (at most
/// [`MAX_BINDINGS_PER_AOR`] of a few hundred bytes each).
pub const MAX_NODE_BINDINGS_BYTES: usize = 64 * 1024;

impl NodeBindings {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A stored value, if it is one: at most [`MAX_NODE_BINDINGS_BYTES`] and
    /// [`MAX_BINDINGS_PER_AOR`] bindings.
    pub fn decode(value: &[u8]) -> Option<NodeBindings> {
        if value.len() > MAX_NODE_BINDINGS_BYTES {
            return None;
        }
        let v: NodeBindings = serde_json::from_slice(value).ok()?;
        (v.bindings.len() <= MAX_BINDINGS_PER_AOR).then_some(v)
    }

    /// The bindings as copies of node `node`'s, with its address.
    pub fn into_remote(self, node: &str) -> Vec<Binding> {
        let addr = self.addr;
        self.bindings
            .into_iter()
            .map(|mut b| {
                b.node = Some(node.to_owned());
                b.node_addr = Some(addr);
                b
            })
            .collect()
    }
}

/// Contacts one AOR may have at once, its own and copies from other nodes alike: every
/// call to it forks to each.
pub const MAX_BINDINGS_PER_AOR: usize = 10;

/// What an agent reported with a REGISTER the proxy vouched for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// `Pinhole-NAT`, canonical.
    pub nat_profile: Option<String>,
    /// `Pinhole-RTT`, canonical.
    pub relay_rtts: Option<String>,
    /// `Pinhole-Key`, canonical (64 hex digits).
    pub plan_key: Option<String>,
}

/// How often bindings are kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepalivePolicy {
    /// Seconds between keepalives for a new binding.
    pub interval: u64,
    /// The shortest interval learning may reach.
    pub floor: u64,
}

impl Binding {
    /// Seconds between this binding's keepalives, given the configured interval.
    pub fn keepalive_every(&self, configured: u64) -> u64 {
        if self.keepalive_interval == 0 {
            configured
        } else {
            self.keepalive_interval
        }
    }

    /// A refresh of this binding arrived on `flow`: did its NAT mapping die? Only if the
    /// flow changed while a keepalive went unanswered (a phone that merely moved networks
    /// answered its keepalives until it left).
    fn mapping_died(&self, flow: &Flow, unix_now: u64) -> bool {
        let moved = self.remote != flow.remote || self.transport != flow.transport;
        let unanswered = self.keepalive_failures > 0
            || self.keepalive_pending_since != 0 && unix_now >= self.keepalive_pending_since + 2;
        moved && unanswered
    }

    pub fn flow(&self) -> Flow {
        Flow { transport: self.transport, local: self.local, remote: self.remote, conn: self.conn }
    }

    fn same_contact(&self, contact: &str, instance: Option<&str>, reg_id: Option<u32>) -> bool {
        match (&self.instance, instance) {
            (Some(a), Some(b)) => a == b && self.reg_id == reg_id,
            _ => uri_eq(&self.contact, contact),
        }
    }
}

/// Loose URI equality good enough for binding matching: scheme and host are
/// case-insensitive, the user part is not.
fn uri_eq(a: &str, b: &str) -> bool {
    let split = |u: &str| -> (String, String) {
        match u.split_once('@') {
            Some((user, host)) => (user.to_owned(), host.to_ascii_lowercase()),
            None => (String::new(), u.to_ascii_lowercase()),
        }
    };
    split(a) == split(b)
}

/// What a REGISTER did.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterOutcome {
    /// The bindings now current for the AOR (for the 200's Contact list).
    pub bindings: Vec<Binding>,
    /// Contacts whose NAT mapping died under the keepalives, with their new interval.
    pub mapping_deaths: Vec<(String, u64)>,
}

#[derive(Default)]
pub struct Registrar {
    aors: HashMap<String, Vec<Binding>>,
    dirty: bool,
    /// AORs whose bindings on this node changed since [`Registrar::take_changes`] last
    /// ran: what a cluster node writes to Redis (and announces), and nothing else.
    changed: std::collections::BTreeSet<String>,
    /// Bindings held here and copies of other nodes', kept as they change (counting them
    /// would be linear in the registrations, and the gauges are read at every REGISTER).
    tally: Tally,
    /// When each AOR is next due to have a binding expire, earliest first, and that time
    /// per AOR: expiry visits the AORs due, not every AOR every second. An AOR is in the
    /// heap once (again only when a binding expiring sooner arrives; the later entry is
    /// then found stale); a refresh leaves it, and the AOR is rescheduled when it comes up.
    expiries: BinaryHeap<Reverse<(u64, String)>>,
    scheduled: HashMap<String, u64>,
}

/// Bindings held here (`local`) and copies of other nodes' (`remote`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    local: usize,
    remote: usize,
}

impl Tally {
    fn of(list: Option<&Vec<Binding>>) -> Tally {
        let list = list.map_or(&[][..], Vec::as_slice);
        let local = list.iter().filter(|b| b.node.is_none()).count();
        Tally { local, remote: list.len() - local }
    }
}

impl Registrar {
    pub fn new() -> Registrar {
        Registrar::default()
    }

    /// Processes a REGISTER for `aor` that arrived on `flow` at `unix_now`.
    #[allow(clippy::too_many_arguments)] // the REGISTER and everything known about where it came from
    pub fn register(
        &mut self,
        cfg: &RegistrarConfig,
        unix_now: u64,
        aor: &str,
        msg: &Message,
        flow: Flow,
        keepalive: KeepalivePolicy,
        agent: Option<AgentReport>,
    ) -> Result<RegisterOutcome, (Rejection, Vec<String>)> {
        let agent = agent.unwrap_or_default();
        let call_id = msg.call_id().unwrap_or_default().to_owned();
        let cseq = msg.cseq().map(|(n, _)| n).unwrap_or(0);
        let header_expires = match msg.header(HeaderName::Expires) {
            Some(v) => Some(v.parse::<u32>().map_err(|_| (Rejection::new(400, "Malformed Expires Header"), vec![]))?),
            None => None,
        };
        let path: Vec<String> = msg.value_texts(HeaderName::Path).into_iter().map(str::to_owned).collect();
        let contacts = msg.contacts();

        // Contact: * removes every binding (RFC 3261 §10.3 step 6).
        if contacts.iter().any(|(r, _)| msg.text(r.clone()) == "*") {
            if contacts.len() != 1 || header_expires != Some(0) {
                return Err((Rejection::new(400, "Wildcard Contact Requires Expires 0"), vec![]));
            }
            let before = Tally::of(self.aors.get(aor));
            if self.aors.remove(aor).is_some() {
                self.dirty = true;
                self.changed.insert(aor.to_owned());
            }
            self.recount(aor, before);
            return Ok(RegisterOutcome { bindings: vec![], mapping_deaths: vec![] });
        }

        let mut parsed = Vec::new();
        for (r, c) in &contacts {
            let Some(c) = c else {
                return Err((Rejection::new(400, "Malformed Contact Header"), vec![]));
            };
            let raw = msg.text(r.clone());
            let uri = match (raw.find('<'), raw.find('>')) {
                (Some(s), Some(e)) if s < e => raw[s + 1..e].to_owned(),
                _ => raw.split(';').next().unwrap_or(raw).trim().to_owned(),
            };
            let expires = match c.params.get_val("expires") {
                Some(v) => v.parse::<u32>().map_err(|_| (Rejection::new(400, "Malformed Contact Expires"), vec![]))?,
                None => header_expires.unwrap_or(cfg.default_expires),
            };
            if expires != 0 && expires < cfg.min_expires {
                return Err((
                    Rejection::new(423, "Interval Too Brief"),
                    vec![format!("Min-Expires: {}", cfg.min_expires)],
                ));
            }
            let q = match c.params.get_val("q") {
                Some(v) => parse_q(v).ok_or((Rejection::new(400, "Malformed Contact q-value"), vec![]))?,
                None => 1000,
            };
            let instance = param_of_name_addr(raw, "+sip.instance").map(str::to_owned);
            let reg_id = param_of_name_addr(raw, "reg-id").and_then(|v| v.parse().ok());
            parsed.push((uri, expires.min(cfg.max_expires), q, instance, reg_id));
        }

        // A bounded number of contacts per AOR (Kamailio's usrloc max_contacts): each is a
        // branch of every call to it.
        let have: Vec<&Binding> =
            self.aors.get(aor).map(|l| l.iter().filter(|b| b.expires_at > unix_now).collect()).unwrap_or_default();
        let new = parsed
            .iter()
            .filter(|(uri, expires, _, instance, reg_id)| {
                *expires != 0 && !have.iter().any(|b| b.same_contact(uri, instance.as_deref(), *reg_id))
            })
            .count();
        if have.len() + new > MAX_BINDINGS_PER_AOR {
            return Err((Rejection::new(503, "Service Unavailable - Too Many Registered Contacts"), vec![]));
        }

        let mut mapping_deaths = Vec::new();
        let before = Tally::of(self.aors.get(aor));
        let list = self.aors.entry(aor.to_owned()).or_default();
        for (uri, expires, q, instance, reg_id) in parsed {
            let existing = list.iter().position(|b| b.same_contact(&uri, instance.as_deref(), reg_id));
            let mut learned = 0;
            if let Some(i) = existing {
                let b = &list[i];
                learned = b.keepalive_interval;
                if b.mapping_died(&flow, unix_now) {
                    learned = (b.keepalive_every(keepalive.interval) / 2).max(keepalive.floor);
                    mapping_deaths.push((uri.clone(), learned));
                }
                if b.call_id == call_id && cseq <= b.cseq {
                    // A stale or reordered REGISTER must not undo a newer one (§10.3 step 7).
                    continue;
                }
                if expires == 0 {
                    list.remove(i);
                    self.dirty = true;
                    continue;
                }
            } else if expires == 0 {
                continue;
            }
            let binding = Binding {
                contact: uri,
                q,
                expires_at: unix_now + u64::from(expires),
                call_id: call_id.clone(),
                cseq,
                transport: flow.transport,
                local: flow.local,
                remote: flow.remote,
                conn: flow.conn,
                path: path.clone(),
                instance,
                reg_id,
                keepalive_failures: 0,
                next_keepalive: unix_now + if learned == 0 { keepalive.interval } else { learned },
                keepalive_interval: learned,
                keepalive_pending_since: 0,
                nat_profile: agent.nat_profile.clone(),
                relay_rtts: agent.relay_rtts.clone(),
                plan_key: agent.plan_key.clone(),
                registered_at: unix_now,
                node: None,
                node_addr: None,
            };
            match existing {
                Some(i) => list[i] = binding,
                None => list.push(binding),
            }
            self.dirty = true;
        }
        let bindings = list.clone();
        if list.is_empty() {
            self.aors.remove(aor);
        }
        self.recount(aor, before);
        // A refresh changes the expiry, so every accepted REGISTER is a change to share.
        self.changed.insert(aor.to_owned());
        Ok(RegisterOutcome { bindings, mapping_deaths })
    }

    /// Current bindings for an AOR, highest q first.
    pub fn lookup(&self, aor: &str, unix_now: u64) -> Vec<Binding> {
        let mut v: Vec<Binding> = self
            .aors
            .get(aor)
            .map(|l| l.iter().filter(|b| b.expires_at > unix_now).cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|b| std::cmp::Reverse(b.q));
        v
    }

    /// Removes expired bindings; returns how many went.
    /// Drops the bindings expired by `unix_now` (visiting only the AORs due); how many.
    pub fn expire(&mut self, unix_now: u64) -> usize {
        let mut removed = 0;
        while let Some(Reverse((at, _))) = self.expiries.peek() {
            if *at > unix_now {
                break;
            }
            let Some(Reverse((at, aor))) = self.expiries.pop() else { break };
            if self.scheduled.get(&aor) != Some(&at) {
                continue; // a stale entry: the AOR was scheduled sooner since
            }
            self.scheduled.remove(&aor);
            let before = Tally::of(self.aors.get(&aor));
            let Some(list) = self.aors.get_mut(&aor) else { continue };
            list.retain(|b| b.expires_at > unix_now);
            let after = Tally::of(Some(list));
            removed += before.local + before.remote - after.local - after.remote;
            if after.local != before.local {
                self.changed.insert(aor.clone());
            }
            if list.is_empty() {
                self.aors.remove(&aor);
            }
            self.recount(&aor, before);
        }
        if removed > 0 {
            self.dirty = true;
        }
        removed
    }

    /// After a change to `aor`'s bindings (which counted `before`): the tally follows, and
    /// the AOR is scheduled for its next expiry if that is sooner than it was.
    fn recount(&mut self, aor: &str, before: Tally) {
        let list = self.aors.get(aor);
        let after = Tally::of(list);
        self.tally.local = self.tally.local + after.local - before.local;
        self.tally.remote = self.tally.remote + after.remote - before.remote;
        let Some(next) = list.and_then(|l| l.iter().map(|b| b.expires_at).min()) else { return };
        if self.scheduled.get(aor).is_none_or(|at| next < *at) {
            self.scheduled.insert(aor.to_owned(), next);
            self.expiries.push(Reverse((next, aor.to_owned())));
        }
    }

    pub fn binding_count(&self) -> usize {
        self.tally.local + self.tally.remote
    }

    pub fn bindings_mut(&mut self) -> impl Iterator<Item = (&String, &mut Binding)> {
        self.aors.iter_mut().flat_map(|(aor, l)| l.iter_mut().map(move |b| (aor, b)))
    }

    pub fn remove(&mut self, aor: &str, contact: &str) {
        let before = Tally::of(self.aors.get(aor));
        if let Some(list) = self.aors.get_mut(aor) {
            list.retain(|b| b.contact != contact);
            if list.is_empty() {
                self.aors.remove(aor);
            }
            self.dirty = true;
            self.changed.insert(aor.to_owned());
        }
        self.recount(aor, before);
    }

    /// An agent's new NAT profile for the bindings it holds on `remote` (its flow) whose
    /// plan key `verify` accepts: returns how many it verified for (a profile that did not
    /// change is no change to share).
    /// Whether a binding on flow `remote` (this node's) has a plan key that `verify` accepts.
    pub fn signed_on_flow(&self, remote: SocketAddr, verify: impl Fn(&[u8; 32]) -> bool) -> bool {
        self.aors
            .values()
            .flatten()
            .filter(|b| b.node.is_none() && b.remote == remote)
            .any(|b| b.plan_key.as_deref().and_then(crate::agent::key_from_header).is_some_and(|k| verify(&k)))
    }

    pub fn update_profile(&mut self, remote: SocketAddr, verify: impl Fn(&[u8; 32]) -> bool, profile: &str) -> usize {
        let mut updated = 0;
        for (aor, list) in &mut self.aors {
            let mut changed = false;
            for b in list.iter_mut().filter(|b| b.node.is_none() && b.remote == remote) {
                let key = b.plan_key.as_deref().and_then(crate::agent::key_from_header);
                if key.is_some_and(|k| verify(&k)) {
                    updated += 1;
                    if b.nat_profile.as_deref() != Some(profile) {
                        b.nat_profile = Some(profile.to_owned());
                        changed = true;
                    }
                }
            }
            if changed {
                self.changed.insert(aor.clone());
                self.dirty = true;
            }
        }
        updated
    }

    /// The AORs whose bindings on this node changed since the last call, each with those
    /// bindings now (empty: none left here). Cheap when nothing changed: a cluster node
    /// calls it every few milliseconds.
    pub fn take_changes(&mut self) -> Vec<(String, Vec<Binding>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|aor| {
                let local = self
                    .aors
                    .get(&aor)
                    .map(|l| l.iter().filter(|b| b.node.is_none()).cloned().collect())
                    .unwrap_or_default();
                (aor, local)
            })
            .collect()
    }

    /// Whether [`Registrar::take_changes`] has anything to give.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }

    /// Every AOR with bindings on this node counts as changed (Redis came back, perhaps
    /// empty: everything is written again).
    pub fn mark_all_changed(&mut self) {
        let local = self.aors.iter().filter(|(_, l)| l.iter().any(|b| b.node.is_none())).map(|(a, _)| a.clone());
        self.changed.extend(local);
    }

    /// Node `node`'s bindings of `aor`, as announced or read from the cluster store: they
    /// replace that node's copies of the AOR (an empty list removes them). A local binding
    /// of the same contact registered earlier gives way (the phone re-registered through
    /// the other node); one registered later stays. Bounded by [`MAX_BINDINGS_PER_AOR`].
    pub fn set_remote(&mut self, aor: &str, node: &str, bindings: Vec<Binding>, unix_now: u64) {
        let before = Tally::of(self.aors.get(aor));
        let list = self.aors.entry(aor.to_owned()).or_default();
        list.retain(|b| b.node.as_deref() != Some(node));
        for mut b in bindings {
            if b.expires_at <= unix_now {
                continue;
            }
            b.node = Some(node.to_owned());
            if let Some(i) = list.iter().position(|l| l.same_contact(&b.contact, b.instance.as_deref(), b.reg_id)) {
                if list[i].registered_at > b.registered_at {
                    continue;
                }
                if list[i].node.is_none() {
                    self.changed.insert(aor.to_owned());
                }
                list.remove(i);
                self.dirty = true;
            }
            if list.len() >= MAX_BINDINGS_PER_AOR {
                // More than any AOR may hold: someone wrote them to Redis by hand.
                metrics::counter!("pinhole_cluster_bindings_refused_total").increment(1);
                continue;
            }
            list.push(b);
        }
        if list.is_empty() {
            self.aors.remove(aor);
        }
        self.recount(aor, before);
    }

    /// Keeps only the copies of other nodes' bindings that `keep(aor, node)` still wants
    /// (after a full read of the cluster store, those it found).
    pub fn retain_remote(&mut self, keep: impl Fn(&str, &str) -> bool) {
        let mut dropped = 0;
        self.aors.retain(|aor, list| {
            let before = list.len();
            list.retain(|b| b.node.as_deref().is_none_or(|n| keep(aor, n)));
            dropped += before - list.len();
            !list.is_empty()
        });
        self.tally.remote -= dropped;
    }

    /// Bindings held here, and copies of other nodes'.
    pub fn counts(&self) -> (usize, usize) {
        (self.tally.local, self.tally.remote)
    }

    /// Takes the "changed since last snapshot" flag.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn snapshot(&self) -> Vec<(String, Binding)> {
        self.aors.iter().flat_map(|(aor, l)| l.iter().map(move |b| (aor.clone(), b.clone()))).collect()
    }

    pub fn restore(&mut self, entries: Vec<(String, Binding)>, unix_now: u64) {
        for (aor, b) in entries {
            if b.expires_at > unix_now {
                let before = Tally::of(self.aors.get(&aor));
                self.aors.entry(aor.clone()).or_default().push(b);
                self.recount(&aor, before);
            }
        }
    }
}

fn parse_q(v: &str) -> Option<u16> {
    let f: f32 = v.parse().ok()?;
    (0.0..=1.0).contains(&f).then(|| (f * 1000.0).round() as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KA: KeepalivePolicy = KeepalivePolicy { interval: 30, floor: 5 };
    use bytes::Bytes;

    const CFG: RegistrarConfig = RegistrarConfig { default_expires: 3600, min_expires: 60, max_expires: 7200 };

    fn flow(port: u16) -> Flow {
        Flow {
            transport: Transport::Udp,
            local: "203.0.113.1:5060".parse().expect("addr"),
            remote: SocketAddr::from(([203, 0, 113, 9], port)),
            conn: None,
        }
    }

    fn register(cseq: u32, contact: &str, extra: &str) -> Message {
        let s = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bK{cseq}\r\nTo: <sip:alice@example.com>\r\nFrom: <sip:alice@example.com>;tag=1\r\nCall-ID: reg1\r\nCSeq: {cseq} REGISTER\r\nContact: {contact}\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(s)).expect("scans")
    }

    #[test]
    fn binding_is_added_refreshed_and_removed() {
        let mut r = Registrar::new();
        let aor = "alice@example.com";
        let out = r
            .register(&CFG, 1000, aor, &register(1, "<sip:alice@10.0.0.2:5060>", ""), flow(40000), KA, None)
            .expect("ok");
        assert_eq!(out.bindings.len(), 1);
        assert_eq!(out.bindings[0].expires_at, 1000 + 3600);
        assert_eq!(out.bindings[0].remote.port(), 40000);
        // Refresh from a new NAT mapping moves the flow.
        let out = r
            .register(&CFG, 1100, aor, &register(2, "<sip:alice@10.0.0.2:5060>;expires=120", ""), flow(40001), KA, None)
            .expect("ok");
        assert_eq!(out.bindings.len(), 1);
        assert_eq!(out.bindings[0].remote.port(), 40001);
        assert_eq!(out.bindings[0].expires_at, 1220);
        let out = r
            .register(
                &CFG,
                1200,
                aor,
                &register(3, "<sip:alice@10.0.0.2:5060>", "Expires: 0\r\n"),
                flow(40001),
                KA,
                None,
            )
            .expect("ok");
        assert!(out.bindings.is_empty());
        assert_eq!(r.binding_count(), 0);
    }

    #[test]
    fn an_aor_holds_at_most_its_cap_of_contacts_here_and_from_other_nodes() {
        let mut r = Registrar::new();
        for i in 0..MAX_BINDINGS_PER_AOR {
            let contact = format!("<sip:a@10.0.0.{i}>");
            r.register(&CFG, 100, "a@x", &register(i as u32 + 1, &contact, ""), flow(1), KA, None).expect("ok");
        }
        assert_eq!(r.lookup("a@x", 100).len(), MAX_BINDINGS_PER_AOR, "the cap is reachable");
        let (rej, _) = r
            .register(&CFG, 100, "a@x", &register(99, "<sip:a@10.0.0.99>", ""), flow(1), KA, None)
            .expect_err("one too many");
        assert_eq!((rej.code, rej.reason.as_str()), (503, "Service Unavailable - Too Many Registered Contacts"));
        // Refreshing one that is there is fine.
        r.register(&CFG, 100, "a@x", &register(100, "<sip:a@10.0.0.3>", ""), flow(1), KA, None).expect("refresh");
        // Copies from Redis beyond the cap are refused too: 10 000 planted bindings fork nothing.
        let mut r2 = Registrar::new();
        r2.register(&CFG, 100, "b@x", &register(1, "<sip:b@10.0.0.2>", ""), flow(1), KA, None).expect("ok");
        let template = r2.lookup("b@x", 100)[0].clone();
        let planted: Vec<Binding> = (0..10_000)
            .map(|i| {
                let mut b = template.clone();
                b.contact = format!("sip:b@192.0.2.{}:{}", i % 250, 1000 + i);
                b
            })
            .collect();
        r2.set_remote("b@x", "evil", planted, 100);
        assert_eq!(r2.lookup("b@x", 100).len(), MAX_BINDINGS_PER_AOR);
    }

    #[test]
    fn too_brief_interval_gets_423_with_min_expires() {
        let mut r = Registrar::new();
        let err = r
            .register(&CFG, 0, "a@x", &register(1, "<sip:a@10.0.0.2>;expires=5", ""), flow(1), KA, None)
            .expect_err("423");
        assert_eq!(err.0.code, 423);
        assert_eq!(err.1, vec!["Min-Expires: 60".to_owned()]);
    }

    #[test]
    fn wildcard_removes_all_contacts() {
        let mut r = Registrar::new();
        r.register(&CFG, 0, "a@x", &register(1, "<sip:a@10.0.0.2>, <sip:a@10.0.0.3>;q=0.5", ""), flow(1), KA, None)
            .expect("ok");
        assert_eq!(r.lookup("a@x", 1).len(), 2);
        assert_eq!(r.lookup("a@x", 1)[1].q, 500);
        let err = r.register(&CFG, 1, "a@x", &register(2, "*", ""), flow(1), KA, None).expect_err("needs Expires 0");
        assert_eq!(err.0.code, 400);
        r.register(&CFG, 1, "a@x", &register(3, "*", "Expires: 0\r\n"), flow(1), KA, None).expect("ok");
        assert!(r.lookup("a@x", 2).is_empty());
    }

    #[test]
    fn reordered_register_does_not_undo_a_newer_one() {
        let mut r = Registrar::new();
        r.register(&CFG, 0, "a@x", &register(5, "<sip:a@10.0.0.2>", ""), flow(1), KA, None).expect("ok");
        r.register(&CFG, 0, "a@x", &register(4, "<sip:a@10.0.0.2>", "Expires: 0\r\n"), flow(1), KA, None).expect("ok");
        assert_eq!(r.lookup("a@x", 1).len(), 1);
    }

    #[test]
    fn instance_id_identifies_the_binding_across_contact_changes() {
        let mut r = Registrar::new();
        let c1 = "<sip:a@10.0.0.2:5060>;+sip.instance=\"<urn:uuid:1>\";reg-id=1";
        let c2 = "<sip:a@10.0.0.9:5062>;+sip.instance=\"<urn:uuid:1>\";reg-id=1";
        r.register(&CFG, 0, "a@x", &register(1, c1, ""), flow(1), KA, None).expect("ok");
        r.register(&CFG, 0, "a@x", &register(2, c2, ""), flow(2), KA, None).expect("ok");
        let b = r.lookup("a@x", 1);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].contact, "sip:a@10.0.0.9:5062");
    }

    #[test]
    fn expired_bindings_are_dropped_and_snapshot_round_trips() {
        let mut r = Registrar::new();
        r.register(
            &CFG,
            0,
            "a@x",
            &register(1, "<sip:a@10.0.0.2>;expires=60", "Path: <sip:edge.example.com;lr>\r\n"),
            flow(1),
            KA,
            None,
        )
        .expect("ok");
        let snap = r.snapshot();
        let mut r2 = Registrar::new();
        r2.restore(snap, 10);
        assert_eq!(r2.lookup("a@x", 10)[0].path, vec!["<sip:edge.example.com;lr>".to_owned()]);
        assert_eq!(r2.expire(61), 1);
        assert_eq!(r2.binding_count(), 0);
    }

    #[test]
    fn another_nodes_copies_follow_its_changes_and_the_newest_registration_of_a_contact_wins() {
        let mut r = Registrar::new();
        r.register(&CFG, 100, "a@x", &register(1, "<sip:a@10.0.0.2>", ""), flow(1), KA, None).expect("ok");
        assert_eq!(r.take_changes().len(), 1, "a registration is a change to share");
        assert!(r.take_changes().is_empty(), "and only once");
        let template = r.lookup("a@x", 100)[0].clone();
        let remote = |contact: &str, at: u64| {
            let mut b = template.clone();
            b.contact = contact.to_owned();
            b.registered_at = at;
            b
        };
        // Another phone of the AOR on node 2, and an older copy of our own contact: ours stays.
        r.set_remote("a@x", "edge-2", vec![remote("sip:a@10.0.0.7", 90), remote("sip:a@10.0.0.2", 50)], 100);
        let all = r.lookup("a@x", 100);
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|b| b.contact == "sip:a@10.0.0.2" && b.node.is_none()));
        assert_eq!(r.counts(), (1, 1));
        assert!(r.take_changes().is_empty(), "copies are nobody's change here");
        // The phone re-registered through node 2 since: node 2's binding wins, ours goes,
        // and that is a change of ours (its field in the store goes too).
        r.set_remote("a@x", "edge-2", vec![remote("sip:a@10.0.0.2", 150)], 160);
        let all = r.lookup("a@x", 160);
        assert_eq!(all.len(), 1, "node 2's copy of 10.0.0.7 went with its change: {all:?}");
        assert_eq!(all[0].node.as_deref(), Some("edge-2"));
        assert_eq!(r.take_changes(), vec![("a@x".to_owned(), vec![])]);
        // A full read that no longer finds node 2's field drops the copy.
        r.retain_remote(|_, _| false);
        assert_eq!(r.counts(), (0, 0));
    }

    #[test]
    fn expiry_and_removal_of_our_bindings_are_changes_and_a_reconnect_writes_everything() {
        let mut r = Registrar::new();
        for (i, aor) in ["a@x", "b@x"].into_iter().enumerate() {
            let reg = register(1, &format!("<sip:{}@10.0.0.{i}>;expires=60", &aor[..1]), "");
            r.register(&CFG, 100, aor, &reg, flow(1), KA, None).expect("ok");
        }
        let _ = r.take_changes();
        r.set_remote("c@x", "edge-2", vec![r.lookup("a@x", 100)[0].clone()], 100);
        assert_eq!(r.expire(161), 3);
        let changed: Vec<String> = r.take_changes().into_iter().map(|(a, _)| a).collect();
        assert_eq!(changed, vec!["a@x".to_owned(), "b@x".to_owned()], "ours, not the copy");
        r.register(&CFG, 200, "a@x", &register(2, "<sip:a@10.0.0.9>", ""), flow(1), KA, None).expect("ok");
        let _ = r.take_changes();
        r.remove("a@x", "sip:a@10.0.0.9");
        assert_eq!(r.take_changes(), vec![("a@x".to_owned(), vec![])]);
        r.register(&CFG, 200, "b@x", &register(3, "<sip:b@10.0.0.9>", ""), flow(1), KA, None).expect("ok");
        let _ = r.take_changes();
        r.mark_all_changed();
        assert_eq!(r.take_changes().len(), 1);
    }

    #[test]
    fn a_stored_value_is_read_only_within_its_bounds() {
        let mut r = Registrar::new();
        r.register(&CFG, 100, "a@x", &register(1, "<sip:a@10.0.0.2>", ""), flow(1), KA, None).expect("ok");
        let b = r.lookup("a@x", 100)[0].clone();
        let v = NodeBindings { addr: "203.0.113.2:5060".parse().expect("addr"), bindings: vec![b.clone()] };
        let back = NodeBindings::decode(v.encode().as_bytes()).expect("decodes");
        assert_eq!(
            (back.addr, back.bindings[0].contact.as_str(), back.bindings[0].expires_at),
            (v.addr, "sip:a@10.0.0.2", 3700)
        );
        let remote = v.clone().into_remote("edge-2");
        assert_eq!((remote[0].node.as_deref(), remote[0].node_addr), (Some("edge-2"), Some(v.addr)));
        let many = NodeBindings { bindings: vec![b; MAX_BINDINGS_PER_AOR + 1], ..v };
        assert_eq!(NodeBindings::decode(many.encode().as_bytes()), None, "more contacts than an AOR may have");
        assert_eq!(NodeBindings::decode(&vec![b' '; MAX_NODE_BINDINGS_BYTES + 1]), None, "too long");
        assert_eq!(NodeBindings::decode(b"{}"), None);
    }

    /// What the kept tally should say, counted the slow way.
    fn recounted(r: &Registrar) -> (usize, usize) {
        let all: Vec<&Binding> = r.aors.values().flatten().collect();
        let local = all.iter().filter(|b| b.node.is_none()).count();
        (local, all.len() - local)
    }

    #[test]
    fn the_kept_counts_and_expiry_schedule_follow_every_kind_of_change() {
        let mut r = Registrar::new();
        let check = |r: &Registrar, what: &str| {
            assert_eq!(r.counts(), recounted(r), "after {what}");
            assert_eq!(r.binding_count(), r.counts().0 + r.counts().1, "after {what}");
        };
        // Local bindings with different expiries, two contacts on one AOR.
        for (i, expires) in [(1, 60), (2, 120), (3, 600)] {
            let c = format!("<sip:u{i}@10.0.0.{i}>;expires={expires}");
            r.register(&CFG, 1000, &format!("u{i}@x"), &register(1, &c, ""), flow(1), KA, None).expect("ok");
        }
        r.register(&CFG, 1000, "u3@x", &register(2, "<sip:u3@10.0.0.9>;expires=90", ""), flow(1), KA, None)
            .expect("second contact");
        check(&r, "registers");
        assert_eq!(r.counts(), (4, 0));
        // Copies from another node, one of them of the same contact registered later there.
        let mut template = r.lookup("u1@x", 1000)[0].clone();
        template.expires_at = 1000 + 300;
        template.registered_at = 1001;
        r.set_remote("u1@x", "edge-2", vec![template.clone()], 1001);
        let mut other = template.clone();
        other.contact = "sip:v@192.0.2.1".into();
        r.set_remote("v@x", "edge-2", vec![other.clone()], 1001);
        check(&r, "copies (one replacing a local binding of the same contact)");
        assert_eq!(r.counts(), (3, 2));
        // Refreshing u2 for longer: nothing due at its old time.
        r.register(&CFG, 1100, "u2@x", &register(2, "<sip:u2@10.0.0.2>;expires=3600", ""), flow(1), KA, None)
            .expect("refresh");
        assert_eq!(r.expire(1089), 0, "u1's local binding (due at 1060) gave way to a later copy");
        // u3's second contact (90 s) expires alone; u2, due at 1120, was refreshed.
        assert_eq!(r.expire(1095), 1);
        assert_eq!(r.lookup("u3@x", 1095).len(), 1);
        check(&r, "one of two contacts expired");
        assert_eq!(r.expire(1125), 0, "u2 was refreshed");
        check(&r, "a refresh");
        // The copies (300 s) go at 1300, u3's last at 1600.
        assert_eq!(r.expire(1300), 2);
        check(&r, "copies expired");
        assert_eq!(r.counts(), (2, 0));
        // Removal, a wildcard and a full retain of copies.
        r.remove("u3@x", "sip:u3@10.0.0.3");
        r.set_remote("w@x", "edge-3", vec![other], 1301);
        r.register(&CFG, 1301, "u2@x", &register(3, "*", "Expires: 0\r\n"), flow(1), KA, None).expect("wildcard");
        check(&r, "removal and wildcard");
        r.retain_remote(|_, node| node != "edge-3");
        check(&r, "a retain of copies");
        assert_eq!(r.counts(), (0, 0));
        assert_eq!(r.expire(100_000), 0, "nothing is left to expire");
        assert!(r.scheduled.is_empty(), "nothing left scheduled");
    }
}
