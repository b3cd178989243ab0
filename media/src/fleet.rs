//! A fleet of remote relays driven over ng, as Kamailio's rtpengine module drives
//! rtpengine: the SIP edge anchors each call's SDP on relays chosen per call instead of on
//! a relay of its own.
//!
//! - **Choice.** Each relay may serve a list of CIDRs (and carry a region). An endpoint is
//!   served by the up relays whose CIDRs hold its address (the longest prefix wins), else
//!   by those serving anyone (no CIDRs), else by any up relay. Among them the least loaded
//!   by weight: sessions from the relay's last ng `statistics` plus the calls placed on it
//!   since, divided by its weight.
//! - **Measured proximity.** Where an endpoint registered through an agent that measured
//!   its round trip to relays' STUN services (`Pinhole-RTT`, passed in through
//!   [`MediaAnchor::prefer`]), the nearest of those relays serves it instead.
//! - **Chains.** When the callee's relay is in another region than the caller's, the call
//!   goes through both: the offer through the caller's relay then the callee's, the answer
//!   back the other way, so media flows caller ↔ relay A ↔ relay B ↔ callee.
//! - **Health.** Every relay is asked for `statistics` each second (asynchronously: the
//!   requests come out of [`Fleet::poll_transmit`], replies go into
//!   [`Fleet::handle_reply`]). One unanswered for [`DOWN_AFTER`], or a call command that
//!   got no reply, takes the relay out; its next answer brings it back.
//! - **Call commands** (offer, answer, delete) need their reply before the SIP message can
//!   go on, so they go through a blocking [`NgExchange`] the shell provides (a socket with
//!   a short deadline); a new call whose relay does not answer is tried on the next one.
//!
//! Sans-IO: the exchange is the only way out, and tests give it relay cores in memory.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::anchor::{MediaAnchor, MediaRefusal, SdpIn};
use crate::cidr::Cidr;
use crate::ng::{split_cookie, Bencode};

/// How often each relay is asked for its statistics.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// A relay whose statistics go unanswered this long is taken out.
pub const DOWN_AFTER: Duration = Duration::from_secs(3);

/// One relay of the fleet, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySpec {
    /// Where its ng control listens (UDP).
    pub ng: SocketAddr,
    /// Share of calls relative to the others (≥ 1).
    pub weight: u32,
    pub region: Option<String>,
    /// Endpoint addresses it serves; empty: anyone.
    pub cidrs: Vec<Cidr>,
    /// Its STUN service, which agents measure their round trip to (see [`parse_rtts`]).
    pub stun: Option<SocketAddr>,
}

/// Most relays an agent reports round trips for.
pub const MAX_RTTS: usize = 16;

/// Reads a `Pinhole-RTT` value, an agent's round trips to relays' STUN services:
/// `203.0.113.21:3478=12, 192.0.2.21:3478=80` (milliseconds). `None` when malformed or
/// longer than [`MAX_RTTS`] entries.
pub fn parse_rtts(value: &str) -> Option<Vec<(SocketAddr, u32)>> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (addr, ms) = part.rsplit_once('=')?;
        out.push((addr.trim().parse().ok()?, ms.trim().parse().ok()?));
        if out.len() > MAX_RTTS {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The `Pinhole-RTT` value for these round trips.
pub fn rtts_header(rtts: &[(SocketAddr, u32)]) -> String {
    rtts.iter().take(MAX_RTTS).map(|(a, ms)| format!("{a}={ms}")).collect::<Vec<_>>().join(", ")
}

/// The shell's side of a call command: send `cookie payload` to `to` and return the payload
/// of the reply carrying that cookie, or `None` when none came in time.
/// A relay taken out of the fleet or brought back, and why: for the shell's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub relay: SocketAddr,
    pub up: bool,
    pub why: &'static str,
}

pub trait NgExchange {
    fn exchange(&mut self, to: SocketAddr, cookie: &str, payload: &[u8]) -> Option<Vec<u8>>;
}

impl<T: NgExchange + ?Sized> NgExchange for Box<T> {
    fn exchange(&mut self, to: SocketAddr, cookie: &str, payload: &[u8]) -> Option<Vec<u8>> {
        (**self).exchange(to, cookie, payload)
    }
}

#[derive(Debug)]
struct Member {
    spec: RelaySpec,
    label: String,
    up: bool,
    /// Sessions the relay reported last.
    sessions: u64,
    /// Calls placed on it since that report.
    placed: u64,
    next_stats: Instant,
    /// When the oldest unanswered statistics request went out.
    waiting_since: Option<Instant>,
    /// The cookies of its unanswered statistics requests (the last few): only a reply
    /// carrying one of them counts.
    pending: VecDeque<String>,
}

/// Unanswered statistics cookies remembered per relay (a reply later than this many
/// requests is not believed, and by then the relay is out anyway).
const PENDING_STATS: usize = 4;

impl Member {
    /// Load per unit of weight, in thousandths.
    fn score(&self) -> u64 {
        (self.sessions + self.placed) * 1000 / u64::from(self.spec.weight.max(1))
    }

    /// The round trip to this relay in `rtts` (an endpoint's agent's measurements).
    fn rtt(&self, rtts: &[(SocketAddr, u32)]) -> Option<u32> {
        let stun = self.spec.stun?;
        rtts.iter().find(|(a, _)| *a == stun).map(|(_, ms)| *ms)
    }

    fn longest_match(&self, ip: IpAddr) -> Option<u8> {
        self.spec.cidrs.iter().filter(|c| c.contains(ip)).map(|c| c.prefix).max()
    }
}

/// A call anchored on the fleet.
#[derive(Debug)]
struct FleetCall {
    /// Relays in order from the first offerer's side to the other's.
    hops: Vec<usize>,
    /// The tag of the party that made the first offer, and of the other, once known.
    offerer: String,
    answerer: Option<String>,
    /// The tag whose offer awaits an answer.
    pending_offer: Option<String>,
    /// Per tag, the last SDP it sent and what we forwarded for it (repeats are not sent
    /// again: a 183 and the 200 often carry the same answer).
    last: Vec<(String, Vec<u8>, Vec<u8>)>,
    created: Instant,
}

pub struct Fleet<X> {
    members: Vec<Member>,
    calls: HashMap<String, FleetCall>,
    exchange: X,
    next_cookie: u64,
    /// Keys the cookies: a stranger who sees none cannot guess the next one.
    secret: [u8; 32],
    max_calls: usize,
    max_duration: Duration,
    next_sweep: Instant,
    changes: VecDeque<Change>,
    /// Per Call-ID not anchored yet, the caller's and callee's agents' round trips to the
    /// relays (see [`MediaAnchor::prefer`]); bounded by [`MAX_HINTS`].
    hints: HashMap<String, [Vec<(SocketAddr, u32)>; 2]>,
}

/// Calls whose round-trip hints wait for their first SDP, at most.
pub const MAX_HINTS: usize = 4096;

impl<X: NgExchange> Fleet<X> {
    /// `max_calls` bounds the calls tracked at once; calls older than `max_duration` are
    /// forgotten (their relays end them on their own). `secret` keys the ng cookies.
    pub fn new(
        specs: Vec<RelaySpec>,
        exchange: X,
        now: Instant,
        (max_calls, max_duration): (usize, Duration),
        secret: [u8; 32],
    ) -> Self {
        let members = specs
            .into_iter()
            .map(|spec| Member {
                label: spec.ng.to_string(),
                spec,
                up: true,
                sessions: 0,
                placed: 0,
                next_stats: now,
                waiting_since: None,
                pending: VecDeque::new(),
            })
            .collect();
        Fleet {
            members,
            calls: HashMap::new(),
            exchange,
            next_cookie: 1,
            secret,
            max_calls,
            max_duration,
            next_sweep: now + Duration::from_secs(60),
            changes: VecDeque::new(),
            hints: HashMap::new(),
        }
    }

    /// Per relay: its ng address, whether it is up, and its load as last known.
    pub fn relays(&self) -> impl Iterator<Item = (SocketAddr, bool, u64)> + '_ {
        self.members.iter().map(|m| (m.spec.ng, m.up, m.sessions + m.placed))
    }

    /// The ng addresses of the relays a call goes through, in offer order.
    pub fn hops(&self, call_id: &str) -> Option<Vec<SocketAddr>> {
        Some(self.calls.get(call_id)?.hops.iter().map(|&i| self.members[i].spec.ng).collect())
    }

    /// The next relay that went out or came back.
    pub fn poll_change(&mut self) -> Option<Change> {
        self.changes.pop_front()
    }

    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// The next statistics request due (`to`, whole datagram), until none is.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let i = self.members.iter().position(|m| m.next_stats <= now)?;
        let cookie = format!("s{}", self.cookie());
        let m = &mut self.members[i];
        if m.pending.len() >= PENDING_STATS {
            m.pending.pop_front();
        }
        m.pending.push_back(cookie.clone());
        m.next_stats = now + STATS_INTERVAL;
        if m.waiting_since.is_some_and(|t| now.duration_since(t) >= DOWN_AFTER) {
            set_up(m, false, "statistics unanswered", &mut self.changes);
        }
        m.waiting_since.get_or_insert(now);
        let mut out = cookie.into_bytes();
        out.push(b' ');
        Bencode::dict(vec![("command", Bencode::str("statistics"))]).encode(&mut out);
        Some((m.spec.ng, out))
    }

    /// When the next statistics request is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.members.iter().map(|m| m.next_stats).min()
    }

    /// Forgets calls older than the longest call (a BYE that never came).
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + Duration::from_secs(60);
        let max = self.max_duration;
        self.calls.retain(|_, c| now.duration_since(c.created) < max);
    }

    /// A datagram on the fleet's statistics socket. `false`: not a statistics reply from
    /// one of our relays (dropped; the caller counts it).
    pub fn handle_reply(&mut self, from: SocketAddr, datagram: &[u8]) -> bool {
        let Some(m) = self.members.iter_mut().find(|m| m.spec.ng == from) else { return false };
        let Ok((cookie, payload)) = split_cookie(datagram) else { return false };
        // Only an answer to a request we sent (an address proves nothing: a stranger on a
        // dead relay's address, or spoofing it, does not know the cookie).
        if !m.pending.iter().any(|c| c.as_bytes() == cookie) {
            return false;
        }
        let Ok(reply) = Bencode::decode(payload) else { return false };
        let sessions = reply
            .get("statistics")
            .and_then(|s| s.get("currentstatistics"))
            .and_then(|c| c.get("sessionsown"))
            .and_then(|v| match v {
                Bencode::Int(n) => u64::try_from(*n).ok(),
                _ => None,
            });
        let Some(sessions) = sessions else { return false };
        m.sessions = sessions;
        m.placed = 0;
        m.waiting_since = None;
        m.pending.clear();
        set_up(m, true, "statistics answered", &mut self.changes);
        metrics::gauge!("pinhole_fleet_relay_sessions", "relay" => m.label.clone()).set(sessions as f64);
        true
    }

    /// A fresh cookie: 64 bits of a MAC of a counter under the fleet's secret.
    fn cookie(&mut self) -> String {
        self.next_cookie += 1;
        let mac = crate::mac::hmac(&self.secret, "ng-cookie", &[&self.next_cookie.to_be_bytes()]);
        crate::mac::hex(&mac[..8])
    }

    /// The relay serving an endpoint at `ip` whose agent measured `rtts`, leaving out
    /// `skip`: see the module notes.
    fn pick(&self, ip: Option<IpAddr>, rtts: &[(SocketAddr, u32)], skip: &[usize]) -> Option<usize> {
        let usable: Vec<usize> = (0..self.members.len()).filter(|i| !skip.contains(i)).collect();
        let up: Vec<usize> = usable.iter().copied().filter(|&i| self.members[i].up).collect();
        // With every relay out, try them anyway: one may be back before its statistics say.
        let pool = if up.is_empty() { usable } else { up };
        // Measured proximity first: the nearest relay the endpoint's agent could reach.
        let nearest = pool
            .iter()
            .filter_map(|&i| Some((self.members[i].rtt(rtts)?, self.members[i].score(), i)))
            .min()
            .map(|(_, _, i)| i);
        if nearest.is_some() {
            return nearest;
        }
        let best_prefix = ip.and_then(|ip| pool.iter().filter_map(|&i| self.members[i].longest_match(ip)).max());
        let serving: Vec<usize> = match (ip, best_prefix) {
            (Some(ip), Some(p)) => {
                pool.iter().copied().filter(|&i| self.members[i].longest_match(ip) == Some(p)).collect()
            }
            _ => pool.iter().copied().filter(|&i| self.members[i].spec.cidrs.is_empty()).collect(),
        };
        let candidates = if serving.is_empty() { pool } else { serving };
        candidates.into_iter().min_by_key(|&i| (self.members[i].score(), i))
    }

    /// Relays for a new call between `caller` and `callee`: the caller's, then the
    /// callee's when that one is in another region.
    fn route(
        &self,
        caller: IpAddr,
        callee: Option<IpAddr>,
        hints: &[Vec<(SocketAddr, u32)>; 2],
        skip: &[usize],
    ) -> Option<Vec<usize>> {
        let a = self.pick(Some(caller), &hints[0], skip)?;
        let b = match callee {
            Some(ip) => self.pick(Some(ip), &hints[1], skip),
            None if !hints[1].is_empty() => self.pick(None, &hints[1], skip),
            None => None,
        };
        let region = |i: usize| self.members[i].spec.region.as_deref();
        match b {
            Some(b) if b != a && region(a).is_some() && region(b).is_some() && region(a) != region(b) => {
                Some(vec![a, b])
            }
            _ => Some(vec![a]),
        }
    }

    /// One ng command to relay `i`; `None` (and the relay taken out) when it does not
    /// answer, `Err` with the relay's error text when it refuses.
    fn command(&mut self, i: usize, pairs: Vec<(&str, Bencode)>) -> Option<Result<Bencode, String>> {
        let cookie = format!("c{}", self.cookie());
        let mut payload = Vec::new();
        Bencode::dict(pairs).encode(&mut payload);
        let to = self.members[i].spec.ng;
        let Some(reply) = self.exchange.exchange(to, &cookie, &payload) else {
            metrics::counter!("pinhole_fleet_failures_total", "relay" => self.members[i].label.clone()).increment(1);
            set_up(&mut self.members[i], false, "no reply to a call command", &mut self.changes);
            return None;
        };
        let Ok(reply) = Bencode::decode(&reply) else {
            return Some(Err("unreadable reply".to_owned()));
        };
        match reply.get("result").and_then(Bencode::as_str) {
            Some("ok") => Some(Ok(reply)),
            Some("load limit") => Some(Err("load limit".to_owned())),
            _ => Some(Err(reply.get("error-reason").and_then(Bencode::as_str).unwrap_or("error").to_owned())),
        }
    }

    /// Sends `r`'s SDP through `hops` in order, as an offer or an answer between the
    /// tags given: the first hop hears it from the endpoint (`received-from`), each later
    /// hop from the relay before it (trust its address).
    fn through(
        &mut self,
        hops: &[usize],
        offer: bool,
        (from_tag, to_tag): (&str, Option<&str>),
        r: &SdpIn<'_>,
    ) -> Result<Vec<u8>, Failure> {
        let SdpIn { call_id, sdp, signalling_ip, hide, .. } = *r;
        let mut body = sdp.to_vec();
        for (n, &i) in hops.iter().enumerate() {
            let mut pairs = vec![
                ("command", Bencode::str(if offer { "offer" } else { "answer" })),
                ("call-id", Bencode::str(call_id)),
                ("from-tag", Bencode::str(from_tag)),
            ];
            if let Some(t) = to_tag {
                pairs.push(("to-tag", Bencode::str(t)));
            }
            pairs.push(("sdp", Bencode::Bytes(body)));
            if n == 0 {
                let family = if signalling_ip.is_ipv6() { "IP6" } else { "IP4" };
                pairs.push((
                    "received-from",
                    Bencode::List(vec![Bencode::str(family), Bencode::str(&signalling_ip.to_string())]),
                ));
            } else {
                pairs.push(("flags", Bencode::List(vec![Bencode::str("trust-address")])));
            }
            if hide {
                pairs.push(("replace", Bencode::List(vec![Bencode::str("origin")])));
            }
            body = match self.command(i, pairs) {
                None => return Err(Failure::Silent(i)),
                Some(Err(e)) if e == "load limit" => {
                    return Err(Failure::Refused(503, "Media Relay At Session Limit".into()))
                }
                Some(Err(e)) => return Err(Failure::Refused(488, format!("Not Acceptable Here - {e}"))),
                Some(Ok(r)) => match r.get("sdp").and_then(Bencode::as_bytes) {
                    Some(s) => s.to_vec(),
                    None => return Err(Failure::Refused(500, "Media Relay Reply Without SDP".into())),
                },
            };
        }
        Ok(body)
    }

    fn anchor(&mut self, now: Instant, r: &SdpIn<'_>) -> Result<Vec<u8>, MediaRefusal> {
        let SdpIn { call_id, sender_tag, sdp, .. } = *r;
        let Some(call) = self.calls.get(call_id) else {
            return self.new_call(now, r);
        };
        if let Some((_, _, out)) = call.last.iter().find(|(t, i, _)| t == sender_tag && i == sdp) {
            return Ok(out.clone());
        }
        let is_answer = call.pending_offer.as_deref().is_some_and(|p| p != sender_tag);
        let from_offerer = sender_tag == call.offerer;
        let mut hops = call.hops.clone();
        if !from_offerer {
            hops.reverse();
        }
        let other = if from_offerer { call.answerer.clone() } else { Some(call.offerer.clone()) };
        let r = if is_answer {
            let from = other.unwrap_or_default();
            self.through(&hops, false, (&from, Some(sender_tag)), r)
        } else {
            self.through(&hops, true, (sender_tag, other.as_deref()), r)
        };
        let out = r.map_err(Failure::refusal)?;
        let Some(call) = self.calls.get_mut(call_id) else { return Ok(out) };
        if !from_offerer && call.answerer.is_none() {
            call.answerer = Some(sender_tag.to_owned());
        }
        call.pending_offer = if is_answer { None } else { Some(sender_tag.to_owned()) };
        remember(call, sender_tag, sdp, &out);
        Ok(out)
    }

    fn new_call(&mut self, now: Instant, r: &SdpIn<'_>) -> Result<Vec<u8>, MediaRefusal> {
        let SdpIn { call_id, sender_tag, sdp, signalling_ip, to, .. } = *r;
        if self.calls.len() >= self.max_calls {
            return Err(MediaRefusal { code: 503, reason: "Media Relay At Session Limit".into() });
        }
        let hints = self.hints.remove(call_id).unwrap_or_default();
        let mut skip = Vec::new();
        loop {
            let Some(hops) = self.route(signalling_ip, to, &hints, &skip) else {
                return Err(MediaRefusal { code: 503, reason: "No Media Relay Answering".into() });
            };
            match self.through(&hops, true, (sender_tag, None), r) {
                Ok(out) => {
                    for &i in &hops {
                        let m = &mut self.members[i];
                        m.placed += 1;
                        metrics::counter!("pinhole_fleet_calls_total", "relay" => m.label.clone()).increment(1);
                    }
                    let mut call = FleetCall {
                        hops,
                        offerer: sender_tag.to_owned(),
                        answerer: None,
                        pending_offer: Some(sender_tag.to_owned()),
                        last: Vec::new(),
                        created: now,
                    };
                    remember(&mut call, sender_tag, sdp, &out);
                    self.calls.insert(call_id.to_owned(), call);
                    return Ok(out);
                }
                Err(Failure::Silent(i)) => {
                    // Hops before the silent one hold the call: free it there.
                    for &h in hops.iter().take_while(|&&h| h != i) {
                        self.delete_on(h, call_id, sender_tag);
                    }
                    skip.push(i);
                }
                Err(Failure::Refused(code, reason)) => {
                    for &h in &hops {
                        self.delete_on(h, call_id, sender_tag);
                    }
                    return Err(MediaRefusal { code, reason });
                }
            }
        }
    }

    /// Deletes the call on relay `i`; its reply, when it gave one.
    fn delete_on(&mut self, i: usize, call_id: &str, from_tag: &str) -> Option<Bencode> {
        if !self.members[i].up {
            return None;
        }
        let reply = self.command(
            i,
            vec![
                ("command", Bencode::str("delete")),
                ("call-id", Bencode::str(call_id)),
                ("from-tag", Bencode::str(from_tag)),
            ],
        );
        reply?.ok()
    }

    /// Deletes the call on every hop: `None` when there was no such call, else what the
    /// first hop (the one facing the offerer, which carries both ways) says it relayed.
    fn end(&mut self, call_id: &str) -> Option<Option<(u64, u64)>> {
        self.hints.remove(call_id);
        let call = self.calls.remove(call_id)?;
        let mut counts = None;
        for (k, &i) in call.hops.iter().enumerate() {
            let reply = self.delete_on(i, call_id, &call.offerer);
            if k == 0 {
                counts = reply.as_ref().and_then(relayed);
            }
        }
        Some(counts)
    }
}

/// Packets and bytes in a delete or query reply's totals (RTP and RTCP together).
fn relayed(reply: &Bencode) -> Option<(u64, u64)> {
    let totals = reply.get("totals")?;
    let count = |c: &Bencode, key: &str| match c.get(key) {
        Some(Bencode::Int(n)) => Some(u64::try_from(*n).unwrap_or(0)),
        _ => None,
    };
    ["RTP", "RTCP"].into_iter().try_fold((0, 0), |(p, b), component| {
        let c = totals.get(component)?;
        Some((p + count(c, "packets")?, b + count(c, "bytes")?))
    })
}

fn remember(call: &mut FleetCall, tag: &str, sdp: &[u8], out: &[u8]) {
    call.last.retain(|(t, _, _)| t != tag);
    call.last.push((tag.to_owned(), sdp.to_vec(), out.to_vec()));
}

fn set_up(m: &mut Member, up: bool, why: &'static str, changes: &mut VecDeque<Change>) {
    if m.up != up {
        m.up = up;
        changes.push_back(Change { relay: m.spec.ng, up, why });
    }
    metrics::gauge!("pinhole_fleet_relay_up", "relay" => m.label.clone()).set(if up { 1.0 } else { 0.0 });
}

enum Failure {
    /// The relay at this index did not answer.
    Silent(usize),
    Refused(u16, String),
}

impl Failure {
    fn refusal(self) -> MediaRefusal {
        match self {
            Failure::Silent(_) => MediaRefusal { code: 503, reason: "Media Relay Not Answering".into() },
            Failure::Refused(code, reason) => MediaRefusal { code, reason },
        }
    }
}

impl<X: NgExchange> MediaAnchor for Fleet<X> {
    fn anchoring(&self) -> bool {
        true
    }

    fn anchor_sdp(&mut self, now: Instant, s: &SdpIn<'_>) -> Result<Vec<u8>, MediaRefusal> {
        self.anchor(now, s)
    }

    fn prefer(&mut self, call_id: &str, caller: Option<&str>, callee: Option<&str>) {
        let parse = |v: Option<&str>| v.and_then(parse_rtts).unwrap_or_default();
        let hints = [parse(caller), parse(callee)];
        if hints.iter().all(Vec::is_empty) || self.calls.contains_key(call_id) {
            return;
        }
        if self.hints.len() >= MAX_HINTS {
            // Calls that never brought SDP: forget them all rather than grow.
            self.hints.clear();
        }
        self.hints.insert(call_id.to_owned(), hints);
    }

    fn release(&mut self, call_id: &str) -> bool {
        self.end(call_id).is_some()
    }

    fn release_counting(&mut self, call_id: &str) -> Option<(u64, u64)> {
        self.end(call_id).flatten()
    }

    fn anchors(&self, call_id: &str) -> bool {
        self.calls.contains_key(call_id)
    }

    fn path(&self, call_id: &str, _now: Instant) -> Option<&'static str> {
        self.calls.get(call_id).map(|_| "relay")
    }
}

#[cfg(test)]
mod tests;
