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
//! - **Call commands** (offer, answer, delete) go out of [`Fleet::poll_transmit`] too and
//!   their replies come back through [`Fleet::handle_reply`]: nothing waits on a socket.
//!   A message whose SDP needs a relay's answer gets [`Unanchored::Waiting`] and waits in
//!   the signalling core; when the answer comes (or the relay stays silent for
//!   [`COMMAND_WAIT`] × [`COMMAND_TRIES`]) [`MediaAnchor::poll_ready`] names its call, the
//!   core handles the message again, and the same command then finds its answer kept
//!   (for [`ANSWER_KEPT`]). A new call whose relay does not answer is tried on the next.
//!   A kept answer no message came back for is not leaked: an offer's session is deleted
//!   on its relay.
//!
//! Sans-IO: datagrams out, datagrams in, time as an input; tests give it relay cores in
//! memory.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::anchor::{MediaAnchor, MediaRefusal, SdpIn, Unanchored};
use crate::cidr::Cidr;
use crate::ng::{split_cookie, Bencode};

/// How often each relay is asked for its statistics.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// A relay whose statistics go unanswered this long is taken out.
pub const DOWN_AFTER: Duration = Duration::from_secs(3);
/// How long a call command waits for its reply before it is sent again, and how often it
/// is sent: a silent relay costs a new call 300 ms before the next relay is tried (as
/// Kamailio's rtpengine module, whose default is 1 s × 5, but nothing waits meanwhile).
pub const COMMAND_WAIT: Duration = Duration::from_millis(150);
pub const COMMAND_TRIES: u32 = 2;
/// How long a relay's answer is kept for the message that asked for it to come back.
pub const ANSWER_KEPT: Duration = Duration::from_secs(2);
/// Call commands waiting for their reply, and answers kept, at most: past either a new
/// call is refused (503) rather than queued.
pub const MAX_ASKED: usize = 4096;
pub const MAX_KEPT: usize = 16_384;

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

/// A relay taken out of the fleet or brought back, and why: for the shell's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub relay: SocketAddr,
    pub up: bool,
    pub why: &'static str,
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

/// A call command: the relay it goes to and its bencoded payload. The same SDP from the
/// same party makes the same command, however often its message comes back.
type Command = (usize, Vec<u8>);

/// A call command sent and not answered yet.
#[derive(Debug)]
struct Asked {
    cookie: String,
    call_id: String,
    datagram: Vec<u8>,
    resend_at: Instant,
    tries: u32,
    /// A message waits for it (offer, answer); nothing does for a delete.
    awaited: bool,
    /// A delete whose reply's totals the call's record waits for.
    counting: bool,
}

/// A relay's answer to a call command, kept for the message that asked for it.
#[derive(Debug)]
struct Kept {
    /// `None`: the relay stayed silent.
    reply: Option<Vec<u8>>,
    call_id: String,
    until: Instant,
}

/// A new call's relays while its first offer waits for them: the same ones when the
/// offer comes back, whatever the relays' load says by then.
#[derive(Debug)]
struct Starting {
    hops: Vec<usize>,
    skip: Vec<usize>,
    since: Instant,
}

/// What a call command came to.
enum Step {
    Answered(Result<Bencode, String>),
    Silent,
    Waiting,
    /// Too many commands in flight: not sent.
    Busy,
}

pub struct Fleet {
    members: Vec<Member>,
    calls: HashMap<String, FleetCall>,
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
    /// Datagrams to send before the next statistics request.
    sends: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Call commands in flight, by command and by cookie; their resend times in order
    /// (entries a reply or a later resend made stale are skipped).
    asked: HashMap<Command, Asked>,
    by_cookie: HashMap<String, Command>,
    asked_order: VecDeque<(Instant, Command)>,
    /// Answers kept for the messages that asked, and their expiry in order.
    kept: HashMap<Command, Kept>,
    kept_order: VecDeque<(Instant, Command)>,
    /// Answers the current anchoring used: dropped once it is done.
    used: Vec<Command>,
    starting: HashMap<String, Starting>,
    /// Calls whose waiting messages can go on.
    ready: VecDeque<String>,
    /// Released calls and what their first relay carried, once its delete is answered.
    released: VecDeque<(String, Option<(u64, u64)>)>,
    /// The time of the latest input (a release has none of its own).
    now: Instant,
}

/// Calls whose round-trip hints wait for their first SDP, at most.
pub const MAX_HINTS: usize = 4096;

/// How long a new call's chosen relays are remembered for its waiting offer.
const STARTING_KEPT: Duration = Duration::from_secs(5);

impl Fleet {
    /// `max_calls` bounds the calls tracked at once; calls older than `max_duration` are
    /// forgotten (their relays end them on their own). `secret` keys the ng cookies.
    pub fn new(
        specs: Vec<RelaySpec>,
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
            next_cookie: 1,
            secret,
            max_calls,
            max_duration,
            next_sweep: now + Duration::from_secs(60),
            changes: VecDeque::new(),
            hints: HashMap::new(),
            sends: VecDeque::new(),
            asked: HashMap::new(),
            by_cookie: HashMap::new(),
            asked_order: VecDeque::new(),
            kept: HashMap::new(),
            kept_order: VecDeque::new(),
            used: Vec::new(),
            starting: HashMap::new(),
            ready: VecDeque::new(),
            released: VecDeque::new(),
            now,
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

    /// Call commands waiting for their reply now.
    pub fn in_flight(&self) -> usize {
        self.asked.len()
    }

    /// Whether a delete whose reply tells the call's totals is in flight (they come out of
    /// [`Fleet::poll_released`]).
    pub fn counting(&self, call_id: &str) -> bool {
        self.asked.values().any(|a| a.counting && a.call_id == call_id)
    }

    /// A released call and what its first relay says it carried (`None`: it did not say).
    pub fn poll_released(&mut self) -> Option<(String, Option<(u64, u64)>)> {
        self.released.pop_front()
    }

    /// The next datagram to send (`to`, whole datagram): call commands, then the
    /// statistics requests due. Until `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        self.now = self.now.max(now);
        if let Some(d) = self.sends.pop_front() {
            return Some(d);
        }
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

    /// When [`Fleet::handle_timeout`] is next due: a statistics request, a call command's
    /// resend or give-up, a kept answer's expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stats = self.members.iter().map(|m| m.next_stats).min();
        let asked = self.asked_order.front().map(|(t, _)| *t);
        let kept = self.kept_order.front().map(|(t, _)| *t);
        [stats, asked, kept].into_iter().flatten().min()
    }

    /// Resends call commands whose reply is late, gives up on those sent
    /// [`COMMAND_TRIES`] times (their relay is taken out, their messages go on), lets kept
    /// answers expire, and forgets calls older than the longest call (a BYE that never came).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        while let Some((at, cmd)) = self.asked_order.front().cloned() {
            if at > now {
                break;
            }
            self.asked_order.pop_front();
            let Some(a) = self.asked.get_mut(&cmd) else { continue };
            if a.resend_at != at {
                continue;
            }
            if a.tries < COMMAND_TRIES {
                a.tries += 1;
                a.resend_at = now + COMMAND_WAIT;
                self.sends.push_back((self.members[cmd.0].spec.ng, a.datagram.clone()));
                self.asked_order.push_back((a.resend_at, cmd));
                continue;
            }
            let Some(a) = self.asked.remove(&cmd) else { continue };
            self.by_cookie.remove(&a.cookie);
            let m = &mut self.members[cmd.0];
            metrics::counter!("pinhole_fleet_failures_total", "relay" => m.label.clone()).increment(1);
            set_up(m, false, "no reply to a call command", &mut self.changes);
            self.answered(now, cmd, a, None);
        }
        while let Some((until, cmd)) = self.kept_order.front().cloned() {
            if until > now {
                break;
            }
            self.kept_order.pop_front();
            if self.kept.get(&cmd).is_some_and(|k| k.until == until) {
                if let Some(k) = self.kept.remove(&cmd) {
                    self.orphan(cmd, k);
                }
            }
        }
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + Duration::from_secs(60);
        let max = self.max_duration;
        self.calls.retain(|_, c| now.duration_since(c.created) < max);
        self.starting.retain(|_, s| now.duration_since(s.since) < STARTING_KEPT);
    }

    /// A datagram on the fleet's socket: a call command's reply or a relay's statistics.
    /// `false`: neither, from one of our relays, answering a request we sent (dropped; the
    /// caller counts it).
    pub fn handle_reply(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        self.now = self.now.max(now);
        let Ok((cookie, payload)) = split_cookie(datagram) else { return false };
        let command = std::str::from_utf8(cookie).ok().and_then(|c| self.by_cookie.get(c));
        if let Some(cmd) = command {
            // An address proves nothing: the cookie does (see `cookie`).
            if self.members[cmd.0].spec.ng != from {
                return false;
            }
            let cmd = cmd.clone();
            let Some(a) = self.asked.remove(&cmd) else { return false };
            self.by_cookie.remove(&a.cookie);
            self.answered(now, cmd, a, Some(payload.to_vec()));
            return true;
        }
        let Some(m) = self.members.iter_mut().find(|m| m.spec.ng == from) else { return false };
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

    /// A call command is over: answered (`reply`) or given up on (`None`). A waiting
    /// message's answer is kept for it and its call named ready; a counting delete's
    /// totals are released.
    fn answered(&mut self, now: Instant, cmd: Command, a: Asked, reply: Option<Vec<u8>>) {
        if a.counting {
            let totals = reply.as_deref().and_then(|r| Bencode::decode(r).ok()).as_ref().and_then(relayed);
            self.released.push_back((a.call_id.clone(), totals));
        }
        if !a.awaited {
            return;
        }
        let until = now + ANSWER_KEPT;
        self.ready.push_back(a.call_id.clone());
        self.kept.insert(cmd.clone(), Kept { reply, call_id: a.call_id, until });
        self.kept_order.push_back((until, cmd));
    }

    /// A kept answer nobody came back for (the call was cancelled meanwhile): an offer that
    /// made a session on a relay for a call we do not hold is deleted there.
    fn orphan(&mut self, (i, payload): Command, k: Kept) {
        let Some(reply) = k.reply.as_deref().and_then(|r| Bencode::decode(r).ok()) else { return };
        let Ok(asked) = Bencode::decode(&payload) else { return };
        let is_offer = asked.get("command").and_then(Bencode::as_str) == Some("offer");
        let ok = reply.get("result").and_then(Bencode::as_str) == Some("ok");
        if is_offer && ok && !self.calls.contains_key(&k.call_id) {
            let tag = asked.get("from-tag").and_then(Bencode::as_str).unwrap_or_default().to_owned();
            metrics::counter!("pinhole_fleet_orphans_deleted_total").increment(1);
            self.delete_on(i, &k.call_id, &tag, false);
        }
    }

    /// A fresh cookie: 64 bits of a MAC of a counter under the fleet's secret.
    fn cookie(&mut self) -> String {
        self.next_cookie += 1;
        let mac = crate::mac::hmac(&self.secret, "ng-cookie", &[&self.next_cookie.to_be_bytes()]);
        hex::encode(&mac[..8])
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

    /// Sends a call command to relay `i` for `call_id`, unless it was answered already (the
    /// answer kept for a message handled again) or is in flight.
    fn command(&mut self, now: Instant, i: usize, call_id: &str, pairs: Vec<(&str, Bencode)>) -> Step {
        let mut payload = Vec::new();
        Bencode::dict(pairs).encode(&mut payload);
        let cmd = (i, payload);
        if let Some(k) = self.kept.get(&cmd) {
            let step = match k.reply.as_deref() {
                None => Step::Silent,
                Some(r) => Step::Answered(read_reply(r)),
            };
            self.used.push(cmd);
            return step;
        }
        if self.asked.contains_key(&cmd) {
            return Step::Waiting;
        }
        if self.asked.len() >= MAX_ASKED || self.kept.len() >= MAX_KEPT {
            metrics::counter!("pinhole_fleet_backlog_refusals_total").increment(1);
            return Step::Busy;
        }
        self.ask(now, cmd, call_id, (true, false));
        Step::Waiting
    }

    /// Puts a call command in flight: (`awaited`, `counting`) as in [`Asked`].
    fn ask(&mut self, now: Instant, cmd: Command, call_id: &str, (awaited, counting): (bool, bool)) {
        let cookie = format!("c{}", self.cookie());
        let mut datagram = Vec::with_capacity(cookie.len() + 1 + cmd.1.len());
        datagram.extend_from_slice(cookie.as_bytes());
        datagram.push(b' ');
        datagram.extend_from_slice(&cmd.1);
        self.sends.push_back((self.members[cmd.0].spec.ng, datagram.clone()));
        let resend_at = now + COMMAND_WAIT;
        self.by_cookie.insert(cookie.clone(), cmd.clone());
        self.asked_order.push_back((resend_at, cmd.clone()));
        let call_id = call_id.to_owned();
        self.asked.insert(cmd, Asked { cookie, call_id, datagram, resend_at, tries: 1, awaited, counting });
    }

    /// Sends `r`'s SDP through `hops` in order, as an offer or an answer between the
    /// tags given: the first hop hears it from the endpoint (`received-from`), each later
    /// hop from the relay before it (trust its address).
    fn through(
        &mut self,
        now: Instant,
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
            // The relay that hears from the endpoint records (rtpengine's key).
            if r.record && n == 0 {
                pairs.push(("record call", Bencode::str("yes")));
            }
            body = match self.command(now, i, call_id, pairs) {
                Step::Waiting => return Err(Failure::Waiting),
                Step::Silent => return Err(Failure::Silent(i)),
                Step::Busy => return Err(Failure::Busy(i)),
                Step::Answered(Err(e)) if e == "load limit" => {
                    return Err(Failure::Refused(503, "Media Relay At Session Limit".into()))
                }
                Step::Answered(Err(e)) => return Err(Failure::Refused(488, format!("Not Acceptable Here - {e}"))),
                Step::Answered(Ok(r)) => match r.get("sdp").and_then(Bencode::as_bytes) {
                    Some(s) => s.to_vec(),
                    None => return Err(Failure::Refused(500, "Media Relay Reply Without SDP".into())),
                },
            };
        }
        Ok(body)
    }

    fn anchor(&mut self, now: Instant, r: &SdpIn<'_>) -> Result<Vec<u8>, Unanchored> {
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
            self.through(now, &hops, false, (&from, Some(sender_tag)), r)
        } else {
            self.through(now, &hops, true, (sender_tag, other.as_deref()), r)
        };
        let out = r.map_err(Failure::unanchored)?;
        let Some(call) = self.calls.get_mut(call_id) else { return Ok(out) };
        if !from_offerer && call.answerer.is_none() {
            call.answerer = Some(sender_tag.to_owned());
        }
        call.pending_offer = if is_answer { None } else { Some(sender_tag.to_owned()) };
        remember(call, sender_tag, sdp, &out);
        Ok(out)
    }

    fn new_call(&mut self, now: Instant, r: &SdpIn<'_>) -> Result<Vec<u8>, Unanchored> {
        let SdpIn { call_id, sender_tag, sdp, signalling_ip, to, .. } = *r;
        if self.calls.len() >= self.max_calls {
            return Err(MediaRefusal { code: 503, reason: "Media Relay At Session Limit".into() }.into());
        }
        let mut start = match self.starting.remove(call_id) {
            Some(s) => s,
            None => {
                let hints = self.hints.remove(call_id).unwrap_or_default();
                let Some(hops) = self.route(signalling_ip, to, &hints, &[]) else {
                    return Err(MediaRefusal { code: 503, reason: "No Media Relay Answering".into() }.into());
                };
                Starting { hops, skip: Vec::new(), since: now }
            }
        };
        loop {
            match self.through(now, &start.hops, true, (sender_tag, None), r) {
                Ok(out) => {
                    for &i in &start.hops {
                        let m = &mut self.members[i];
                        m.placed += 1;
                        metrics::counter!("pinhole_fleet_calls_total", "relay" => m.label.clone()).increment(1);
                    }
                    let mut call = FleetCall {
                        hops: start.hops,
                        offerer: sender_tag.to_owned(),
                        answerer: None,
                        pending_offer: Some(sender_tag.to_owned()),
                        last: Vec::new(),
                        created: now,
                    };
                    remember(&mut call, sender_tag, sdp, &out);
                    self.calls.insert(call_id.to_owned(), call);
                    // Hints given again while the offer waited are of no more use.
                    self.hints.remove(call_id);
                    return Ok(out);
                }
                Err(Failure::Waiting) => {
                    self.starting.insert(call_id.to_owned(), start);
                    return Err(Unanchored::Waiting);
                }
                Err(Failure::Busy(i)) => {
                    self.free_before(&start.hops, i, call_id, sender_tag);
                    return Err(Failure::Busy(i).unanchored());
                }
                Err(Failure::Silent(i)) => {
                    self.free_before(&start.hops, i, call_id, sender_tag);
                    start.skip.push(i);
                    let hints = self.hints.get(call_id).cloned().unwrap_or_default();
                    let Some(hops) = self.route(signalling_ip, to, &hints, &start.skip) else {
                        return Err(MediaRefusal { code: 503, reason: "No Media Relay Answering".into() }.into());
                    };
                    start.hops = hops;
                }
                Err(Failure::Refused(code, reason)) => {
                    for &h in &start.hops {
                        self.delete_on(h, call_id, sender_tag, false);
                    }
                    return Err(MediaRefusal { code, reason }.into());
                }
            }
        }
    }

    /// The hops before relay `i` (which did not take the offer) hold the call: free it there.
    fn free_before(&mut self, hops: &[usize], i: usize, call_id: &str, from_tag: &str) {
        for &h in hops.iter().take_while(|&&h| h != i) {
            self.delete_on(h, call_id, from_tag, false);
        }
    }

    /// Deletes the call on relay `i` (nothing waits for it); `counting`: its reply's
    /// totals are the call's (see [`Fleet::poll_released`]).
    fn delete_on(&mut self, i: usize, call_id: &str, from_tag: &str, counting: bool) {
        if !self.members[i].up {
            return;
        }
        let mut payload = Vec::new();
        Bencode::dict(vec![
            ("command", Bencode::str("delete")),
            ("call-id", Bencode::str(call_id)),
            ("from-tag", Bencode::str(from_tag)),
        ])
        .encode(&mut payload);
        let cmd = (i, payload);
        if !self.asked.contains_key(&cmd) {
            self.ask(self.now, cmd, call_id, (false, counting));
        }
    }

    /// Deletes the call on every hop (the first hop, which faces the offerer and carries
    /// both ways, tells the totals); `false` when there was no such call.
    fn end(&mut self, call_id: &str) -> bool {
        self.hints.remove(call_id);
        self.starting.remove(call_id);
        let Some(call) = self.calls.remove(call_id) else { return false };
        for (k, &i) in call.hops.iter().enumerate() {
            self.delete_on(i, call_id, &call.offerer, k == 0);
        }
        true
    }
}

/// A call command's reply: its body, or the relay's reason for refusing.
fn read_reply(reply: &[u8]) -> Result<Bencode, String> {
    let Ok(reply) = Bencode::decode(reply) else {
        return Err("unreadable reply".to_owned());
    };
    match reply.get("result").and_then(Bencode::as_str) {
        Some("ok") => Ok(reply),
        Some("load limit") => Err("load limit".to_owned()),
        _ => Err(reply.get("error-reason").and_then(Bencode::as_str).unwrap_or("error").to_owned()),
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
    /// A relay was asked: the message waits for its answer.
    Waiting,
    /// The relay at this index did not answer.
    Silent(usize),
    /// Too many commands in flight to ask the relay at this index.
    Busy(usize),
    Refused(u16, String),
}

impl Failure {
    fn unanchored(self) -> Unanchored {
        let (code, reason) = match self {
            Failure::Waiting => return Unanchored::Waiting,
            Failure::Silent(_) => (503, "Media Relay Not Answering".to_owned()),
            Failure::Busy(_) => (503, "Media Relay Commands Backlogged".to_owned()),
            Failure::Refused(code, reason) => (code, reason),
        };
        Unanchored::Refused(MediaRefusal { code, reason })
    }
}

impl MediaAnchor for Fleet {
    fn anchoring(&self) -> bool {
        true
    }

    /// Anchors on the call's relays; answers this anchoring used are dropped once it is
    /// done (kept while it still waits for a later hop).
    fn anchor_sdp(&mut self, now: Instant, s: &SdpIn<'_>) -> Result<Vec<u8>, Unanchored> {
        self.now = self.now.max(now);
        self.used.clear();
        let r = self.anchor(now, s);
        if r != Err(Unanchored::Waiting) {
            for cmd in std::mem::take(&mut self.used) {
                self.kept.remove(&cmd);
            }
        }
        r
    }

    fn poll_ready(&mut self) -> Option<String> {
        self.ready.pop_front()
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

    /// Deletes the call on its relays; what they carried comes later, out of
    /// [`Fleet::poll_released`].
    fn release(&mut self, call_id: &str) -> bool {
        self.end(call_id)
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
