//! Punch planning at call time: when both ends of a new call registered through agents
//! that reported NAT profiles, pick the method a direct path would take (media::punch),
//! under the operator's `[punch]` policy, report it as an event and a metric, and hand each
//! agent its side of the plan in the SDP of its leg: the callee's with the INVITE, the
//! caller's with the 2xx, both starting a moment after the answer. Media keeps flowing
//! through the relay whatever the plan.
//!
//! What an agent will punch is what we vouch for: each side's window is the address we
//! observed that agent's signalling come from (its reported window gives only the port),
//! the `[punch]` policy is checked against exactly those addresses, and every plan is
//! signed with the key of the agent it goes to, so no one else's plan is ever carried out.

use pinhole_media::punch::scheduler::Credentials;
use pinhole_media::punch::sdp::{insert, PlanStart, WirePlan};
use pinhole_media::punch::{choose, NatProfile};

use super::requests::request_user;
use super::*;

impl<M: MediaAnchor> Proxy<M> {
    /// The caller's binding: the one of `auth_user` on the very flow the INVITE came in on.
    pub(super) fn caller_binding(&self, now: Instant, flow: Flow, auth_user: Option<&str>) -> Option<Binding> {
        let unix = self.unix(now);
        auth_user.and_then(|u| {
            let aor = format!("{u}@{}", self.cfg.domain);
            self.registrar.lookup(&aor, unix).into_iter().find(|b| b.flow().remote == flow.remote)
        })
    }

    /// A new INVITE's SDP is about to be anchored: what the caller's and the (single)
    /// callee's agents measured to the relays, for a relay fleet to pick the nearest.
    pub(super) fn media_hints(&mut self, msg: &Message, caller: Option<&Binding>, targets: &[Target]) {
        let Some(call_id) = msg.call_id() else { return };
        let caller = caller.and_then(|b| b.relay_rtts.clone());
        let callee = if targets.len() == 1 { targets[0].relay_rtts.clone() } else { None };
        if caller.is_some() || callee.is_some() {
            self.media.prefer(call_id, caller.as_deref(), callee.as_deref());
        }
    }

    /// A new INVITE from `flow` (caller `auth_user`, registered as `caller`) is about to go
    /// to `targets`.
    pub(super) fn plan_punch(
        &mut self,
        flow: Flow,
        msg: &Message,
        (auth_user, caller): (Option<&str>, Option<&Binding>),
        targets: &[Target],
    ) {
        let Some(call_id) = msg.call_id() else { return };
        // Sides behind an agent (it gave us its key) get what is meant for their agent.
        let keys = [
            caller.as_ref().and_then(|b| b.plan_key.as_deref()).and_then(crate::agent::key_from_header),
            if targets.len() == 1 { targets[0].plan_key } else { None },
        ];
        if keys.iter().any(Option::is_some) && self.agent_legs.len() < MAX_PUNCH_PLANS {
            self.agent_legs.insert(call_id.to_owned(), keys);
        }
        let Some(caller_profile) =
            caller.as_ref().and_then(|b| b.nat_profile.as_deref()).and_then(NatProfile::parse_header)
        else {
            return;
        };
        let callee_user = request_user(msg);
        for t in targets {
            let Some(callee_profile) = t.nat_profile.as_deref().and_then(NatProfile::parse_header) else { continue };
            let users: Vec<&str> = auth_user.into_iter().chain(callee_user.as_deref()).collect();
            // The windows an agent may punch: where we saw each agent's signalling from, at
            // the port its report gives. Every address punched is in `addrs`.
            let observed = |w: Option<SocketAddr>, seen: SocketAddr| w.map(|w| SocketAddr::new(seen.ip(), w.port()));
            let windows =
                observed(caller_profile.window, flow.remote).zip(observed(callee_profile.window, t.flow.remote));
            let addrs: Vec<IpAddr> = [Some(flow.remote.ip()), Some(t.flow.remote.ip())]
                .into_iter()
                .chain([caller_profile.window, callee_profile.window].map(|w| w.map(|a| a.ip())))
                .chain([
                    caller.as_ref().and_then(|b| contact_ip(&b.contact)),
                    t.request_uri.as_deref().and_then(contact_ip),
                ])
                .flatten()
                .collect();
            let strategy = self.cfg.punch.allows(&users, &addrs).then(|| choose(&caller_profile, &callee_profile));
            let method = strategy.map_or("denied", |s| s.label());
            let keyed = keys.iter().all(Option::is_some);
            if let (Some(s), Some((wa, wb)), 1, true) =
                (strategy.filter(|s| s.is_direct()), windows, targets.len(), keyed)
            {
                if self.punch_plans.len() < MAX_PUNCH_PLANS {
                    let plans = self.wire_plans(s, [wa, wb]).map(Some);
                    self.punch_plans.insert(call_id.to_owned(), plans);
                }
            }
            tracing::info!(call_id, caller = ?auth_user, callee = ?callee_user, method, "punch plan (agents carry it out; media is relayed until a direct path is proven)");
            metrics::counter!("pinhole_punch_plans_total", "method" => method).increment(1);
            self.events.push_back(ProxyEvent::PunchPlanned { call_id: call_id.to_owned(), method });
        }
    }
}

/// Calls whose plans are remembered between INVITE and 2xx at most.
const MAX_PUNCH_PLANS: usize = 65_536;
/// How long after the answer both agents start punching.
const START_AFTER_ANSWER_MS: u32 = 200;

impl<M: MediaAnchor> Proxy<M> {
    /// Both sides' plans, with fresh short-term credentials (ICE sizes: 8 and 24 chars).
    fn wire_plans(&mut self, strategy: pinhole_media::punch::Strategy, windows: [SocketAddr; 2]) -> [WirePlan; 2] {
        let mut token = |n: usize| -> String {
            const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
            (0..n).map(|_| char::from(ALPHABET[self.rng.gen_range(0..ALPHABET.len())])).collect()
        };
        let (ua, pa, ub, pb) = (token(8), token(24), token(8), token(24));
        let plan = |side, local: (&str, &str), remote: (&str, &str)| WirePlan {
            strategy,
            side,
            windows,
            credentials: Credentials {
                local_ufrag: local.0.to_owned(),
                local_pwd: local.1.to_owned(),
                remote_ufrag: remote.0.to_owned(),
                remote_pwd: remote.1.to_owned(),
            },
            start: PlanStart::AfterAnswer { ms: START_AFTER_ANSWER_MS },
        };
        [plan(Side::A, (&ua, &pa), (&ub, &pb)), plan(Side::B, (&ub, &pb), (&ua, &pa))]
    }

    /// The body to forward with `side`'s plan added, if the call has one and the message
    /// carries SDP. The callee's (B) goes once, with the INVITE, or with the ACK when the
    /// INVITE had no offer; the caller's (A) with every 2xx, retransmissions too, until
    /// the ACK (or the call's end) retires the plans.
    pub(super) fn with_punch_plan(&mut self, msg: &Message, side: Side, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let body = self.without_planted_lines(msg, side, body);
        let body = self.with_forwarder(msg, side, body);
        let body = self.with_plan(msg, side, body);
        self.signed_for_agent(msg, side, body)
    }

    /// The plan key of the agent on `side` of a call, if that side is behind one.
    fn agent_key(&self, call_id: &str, side: Side) -> Option<[u8; 32]> {
        self.agent_legs.get(call_id).and_then(|k| k[side as usize])
    }

    /// Towards an agent, the other party's SDP loses every line that looks like ours, so
    /// what we sign is only what we added.
    fn without_planted_lines(&self, msg: &Message, side: Side, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let Some(call_id) = msg.call_id() else { return body };
        if self.agent_key(call_id, side).is_none() {
            return body;
        }
        let base = match &body {
            Some(b) => b.as_slice(),
            None => super::media::sdp_body(msg)?,
        };
        let Ok(text) = std::str::from_utf8(base) else { return body };
        let stripped = pinhole_media::punch::sdp::strip(text);
        if stripped.len() == text.len() {
            return body;
        }
        Some(stripped.into_bytes())
    }

    fn with_plan(&mut self, msg: &Message, side: Side, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let Some(call_id) = msg.call_id() else { return body };
        let Some(plans) = self.punch_plans.get_mut(call_id) else { return body };
        let Some(plan) = plans[side as usize].clone() else { return body };
        let base = match &body {
            Some(b) => b.as_slice(),
            None => match super::media::sdp_body(msg) {
                Some(b) => b,
                None => return body,
            },
        };
        let Ok(text) = std::str::from_utf8(base) else { return body };
        if side == Side::B {
            plans[side as usize] = None;
        }
        Some(insert(text, &plan).into_bytes())
    }

    /// A body to which a plan or forwarder offer was added gets the signature of the
    /// agent on `side` (the lines go nowhere else: only agents' legs get them).
    fn signed_for_agent(&self, msg: &Message, side: Side, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let (Some(b), Some(call_id)) = (&body, msg.call_id()) else { return body };
        let Some(key) = self.agent_key(call_id, side) else { return body };
        let Ok(text) = std::str::from_utf8(b) else { return body };
        if !text.contains("a=x-pinhole-") {
            return body;
        }
        let line =
            format!("{}{}\r\n", pinhole_media::punch::sdp::SIG_PREFIX, crate::agent::sign_plan(&key, call_id, text));
        Some(pinhole_media::punch::sdp::insert_lines(text, &line).into_bytes())
    }
}

impl<M: MediaAnchor> Proxy<M> {
    /// SDP towards a side behind an agent offers the fake-TCP forwarder for its leg:
    /// `a=x-pinhole-tcp:PORT KEY`, the key proving which relay port the leg is (the one in
    /// this SDP's first m= line) for this call only.
    fn with_forwarder(&self, msg: &Message, side: Side, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let (Some(fwd), Some(call_id)) = (self.cfg.faketcp_port, msg.call_id()) else { return body };
        if self.agent_key(call_id, side).is_none() {
            return body;
        }
        let base = match &body {
            Some(b) => b.as_slice(),
            None => super::media::sdp_body(msg)?,
        };
        let text = std::str::from_utf8(base).ok()?;
        let Some(port) = first_media_port(text) else { return body };
        let line = format!("a=x-pinhole-tcp:{fwd} {}\r\n", faketcp_key(&self.cfg.secret, call_id, port));
        Some(pinhole_media::punch::sdp::insert_lines(text, &line).into_bytes())
    }
}

/// The port of an SDP's first m= line.
fn first_media_port(sdp: &str) -> Option<u16> {
    sdp.lines()
        .find_map(|l| l.strip_prefix("m="))
        .and_then(|m| m.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
}

/// The secret an agent proves its call leg with to the fake-TCP forwarder: for this call's
/// relay port `port` only, derived from the proxy's secret (so the forwarder recomputes it
/// and nothing is stored).
pub fn faketcp_key(secret: &[u8; 32], call_id: &str, port: u16) -> String {
    let mac = crate::mac::hmac(secret, "faketcp", &[call_id.as_bytes(), &port.to_be_bytes()]);
    hex::encode(&mac[..12])
}

/// The host of a SIP URI, when it is an IP literal (a phone's private address).
fn contact_ip(uri: &str) -> Option<IpAddr> {
    let u = parse_sip_uri(uri)?;
    host_ip(&u.host_port.host)
}

/// Profile updates taken from one source at most this often (each checks every binding on
/// its flow), and sources remembered for it at most.
const PROFILE_UPDATE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_PROFILE_SOURCES: usize = 4096;
/// How far a profile update's time may be from ours.
const PROFILE_UPDATE_SKEW: u64 = 60;

/// Profile updates: when each source last sent one, and the newest time each agent flow
/// signed (its updates are taken in time order only: no replays).
#[derive(Default)]
pub(super) struct ProfileUpdates {
    last_seen: HashMap<IpAddr, Instant>,
    newest: HashMap<SocketAddr, u64>,
    /// Quality reports: per source, the second's start and how many came in it; the newest
    /// time (ms) each agent flow signed.
    reports_seen: HashMap<IpAddr, (Instant, u32)>,
    reports_newest: HashMap<SocketAddr, u64>,
}

/// Quality reports taken from one source per second at most (one per call that ended).
const REPORTS_PER_SECOND: u32 = 50;

impl<M: MediaAnchor> Proxy<M> {
    /// An agent's signed profile update (`OPTIONS` with `Pinhole-NAT` and `Pinhole-Sig`):
    /// it changes the profile of the bindings on the flow it came from whose plan key
    /// signed it, and nothing else. Answered statelessly.
    pub(super) fn on_profile_update(&mut self, now: Instant, flow: Flow, msg: &Message) {
        let unix = self.unix(now);
        let (code, reason, extra) = self.profile_update(now, unix, flow, msg);
        let outcome = if code == 200 { "updated" } else { "refused" };
        metrics::counter!("pinhole_agent_profile_updates_total", "result" => outcome).increment(1);
        let resp = msg.response(code, reason, Some(&self.local_tag(msg)), &extra);
        self.send_response_stateless(flow, resp, code);
    }

    /// An agent's signed quality report (`OPTIONS` with `Pinhole-Quality` and
    /// `Pinhole-Sig`): taken when the plan key of a binding on the flow it came from signed
    /// it, as a [`ProxyEvent::AgentQuality`]. Answered statelessly.
    pub(super) fn on_quality_report(&mut self, now: Instant, flow: Flow, msg: &Message) {
        let unix = self.unix(now);
        let (code, reason) = self.quality_report(now, unix, flow, msg);
        let outcome = if code == 200 { "taken" } else { "refused" };
        metrics::counter!("pinhole_agent_quality_reports_total", "result" => outcome).increment(1);
        let resp = msg.response(code, reason, Some(&self.local_tag(msg)), &[]);
        self.send_response_stateless(flow, resp, code);
    }

    fn quality_report(&mut self, now: Instant, unix: u64, flow: Flow, msg: &Message) -> (u16, &'static str) {
        let u = &mut self.profile_updates;
        if u.reports_seen.len() >= MAX_PROFILE_SOURCES {
            u.reports_seen.retain(|_, (t, _)| now < *t + PROFILE_UPDATE_EVERY);
        }
        let seen = u.reports_seen.entry(flow.remote.ip()).or_insert((now, 0));
        if now >= seen.0 + PROFILE_UPDATE_EVERY {
            *seen = (now, 0);
        }
        seen.1 += 1;
        if seen.1 > REPORTS_PER_SECOND || u.reports_seen.len() > MAX_PROFILE_SOURCES {
            return (503, "Service Unavailable - Quality Reports Too Frequent");
        }
        let value = msg.extension_header("Pinhole-Quality").map(str::trim);
        let report = value.and_then(crate::agent::AgentQuality::parse_header);
        let sig = msg.extension_header("Pinhole-Sig").and_then(crate::agent::parse_profile_sig);
        let (Some(value), Some(report), Some((sig, t))) = (value, report, sig) else {
            return (400, "Bad Request - Malformed Quality Report");
        };
        if (t / 1000).abs_diff(unix) > PROFILE_UPDATE_SKEW
            || u.reports_newest.get(&flow.remote).is_some_and(|n| t <= *n)
        {
            return (403, "Forbidden - Stale Or Replayed Quality Report");
        }
        let signed =
            |k: &[u8; 32]| crate::mac::ct_eq(crate::agent::sign_quality(k, value, t).as_bytes(), sig.as_bytes());
        if !self.registrar.signed_on_flow(flow.remote, signed) {
            return (403, "Forbidden - Quality Report Not Signed By An Agent Registered On This Flow");
        }
        let u = &mut self.profile_updates;
        if u.reports_newest.len() >= MAX_PROFILE_SOURCES && !u.reports_newest.contains_key(&flow.remote) {
            u.reports_newest.clear();
        }
        u.reports_newest.insert(flow.remote, t);
        if self.events.len() < MAX_PROFILE_SOURCES {
            self.events.push_back(super::ProxyEvent::AgentQuality { agent: flow.remote, report });
        }
        (200, "OK")
    }

    fn profile_update(
        &mut self,
        now: Instant,
        unix: u64,
        flow: Flow,
        msg: &Message,
    ) -> (u16, &'static str, Vec<String>) {
        let u = &mut self.profile_updates;
        if u.last_seen.get(&flow.remote.ip()).is_some_and(|t| now < *t + PROFILE_UPDATE_EVERY) {
            return (503, "Service Unavailable - Profile Updates Too Frequent", vec!["Retry-After: 1".into()]);
        }
        if u.last_seen.len() >= MAX_PROFILE_SOURCES {
            u.last_seen.retain(|_, t| now < *t + PROFILE_UPDATE_EVERY);
        }
        if u.last_seen.len() >= MAX_PROFILE_SOURCES {
            return (503, "Service Unavailable - Profile Updates Too Frequent", vec!["Retry-After: 1".into()]);
        }
        u.last_seen.insert(flow.remote.ip(), now);
        let profile = msg.extension_header("Pinhole-NAT").and_then(NatProfile::parse_header).map(|p| p.to_header());
        let sig = msg.extension_header("Pinhole-Sig").and_then(crate::agent::parse_profile_sig);
        let (Some(profile), Some((sig, t))) = (profile, sig) else {
            return (400, "Bad Request - Malformed Profile Update", vec![]);
        };
        if t.abs_diff(unix) > PROFILE_UPDATE_SKEW || u.newest.get(&flow.remote).is_some_and(|n| t <= *n) {
            return (403, "Forbidden - Stale Or Replayed Profile Update", vec![]);
        }
        let signed =
            |k: &[u8; 32]| crate::mac::ct_eq(crate::agent::sign_profile(k, &profile, t).as_bytes(), sig.as_bytes());
        let n = self.registrar.update_profile(flow.remote, signed, &profile);
        if n == 0 {
            return (403, "Forbidden - Profile Update Not Signed By An Agent Registered On This Flow", vec![]);
        }
        let u = &mut self.profile_updates;
        if u.newest.len() >= MAX_PROFILE_SOURCES && !u.newest.contains_key(&flow.remote) {
            u.newest.clear(); // only lets an old update be replayed within its 60 s window
        }
        u.newest.insert(flow.remote, t);
        tracing::info!(agent = %flow.remote, bindings = n, %profile, "agent profile updated");
        (200, "OK", vec![format!("Pinhole-Updated: {n}")])
    }
}
