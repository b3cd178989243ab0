//! The agent's signalling: a stateless outbound proxy (RFC 3261 §16.11) next to unchanged
//! phones on a LAN. Phones name it as their outbound proxy; it consumes its own Route,
//! forwards their requests to the pinhole server and the server's requests to the phone
//! the Request-URI names, Record-Routes so in-dialog requests come back through it, and
//! leaves authentication alone, so the phone's digest passes end to end. OPTIONS addressed
//! to the agent itself is answered by the agent, whether or not the server is reachable.
//!
//! Stateless means retransmissions are forwarded again with the same branch (derived from
//! the received one), and responses follow the Via chain. The only state is media: SDP
//! both ways is anchored through a [`MediaAnchor`] on the agent's LAN address (bounded by
//! the relay's session limit), and a punch plan the server put in SDP on its way to a
//! phone is taken out and kept for the media side.
//!
//! Trust (docs/DESIGN.md, "Trust boundaries added in security round 3"):
//! - Our branch is a MAC of the received one under the agent's secret, so a response is
//!   ours only if its top Via's branch is the MAC of the next one: a stranger who never
//!   saw our request cannot forge one, and nothing but answers to what we sent allocates.
//! - Punch plans and forwarder offers count only when signed (`a=x-pinhole-sig`) with the
//!   plan key this agent gave the server in the REGISTERs it relayed ([`sign_plan`]).
//! - We forward only between our phones and the server: a request from anyone but the
//!   server goes to the server; the server's requests go only to phones whose
//!   registration the server accepted through us.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::Bytes;
use ezk_sip_types::host::Host;
use pinhole_media::anchor::{MediaAnchor, SdpIn};
use pinhole_media::punch::sdp::{self as punch_sdp, WirePlan};

use crate::message::{Editor, Garbage, HeaderName, Message, Method, Rejection};
use crate::proxy::{fix_top_via, host_ip, parse_sip_uri, uri_of};
use crate::transport::{Flow, Transmit, Transport};

const BRANCH_PREFIX: &str = "z9hG4bKpha";
/// Branches of the agent's own profile updates (answered by the server, not forwarded).
const PROFILE_BRANCH: &str = "z9hG4bKphp";
/// Answered calls remembered at most.
const MAX_ANSWERED: usize = 100_000;
/// Phones (addresses a registration was accepted for) remembered at most.
pub const MAX_PHONES: usize = 10_000;
/// Media streams one call through an agent may anchor: what a phone's call needs (audio,
/// video, a spare), so one forged SDP holds a handful of ports, not hundreds.
pub const MAX_STREAMS_PER_CALL: usize = 4;
/// Plans held for calls not answered yet, at most (the oldest goes).
const MAX_PENDING_PLANS: usize = 1024;

/// The server's fake-TCP forwarder offered for one of our phones' calls: the leg towards
/// the server relay (the side tagged `server_tag`) may go over a connection to `port` on
/// the server, proven with `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderOffer {
    pub call_id: String,
    pub server_tag: String,
    pub port: u16,
    pub key: String,
}

/// A punch plan for one of our phones' calls, ready to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyPlan {
    pub call_id: String,
    /// The tag of the server's side of the call (whose SDP carried the plan): the media
    /// anchor's leg towards the server relay is this side's.
    pub server_tag: String,
    pub plan: WirePlan,
    /// When the call was answered here (the 2xx passed), which a plan's start counts from.
    pub answered: Instant,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the agent listens (UDP), and the address it puts in Via and Record-Route.
    pub listen: SocketAddr,
    /// The pinhole server's SIP address.
    pub server: SocketAddr,
    /// Largest message accepted; larger requests get 513.
    pub max_message: usize,
    /// Keys the branches derived from received ones, and (derived) the plan key the agent
    /// gives the server.
    pub secret: [u8; 32],
}

/// The agent's relay: on its LAN address `bind`, over `port_min..=port_max`, holding no
/// more streams per call than a phone's call needs.
pub fn relay_config(bind: IpAddr, port_min: u16, port_max: u16) -> pinhole_media::relay::RelayConfig {
    pinhole_media::relay::RelayConfig {
        max_streams: MAX_STREAMS_PER_CALL,
        ..pinhole_media::relay::RelayConfig::single(bind, port_min, port_max)
    }
}

/// The signature of a profile update (`Pinhole-Sig: HEX;t=UNIX`): the profile and the time,
/// under the agent's plan key. The server checks it against the key of the bindings on the
/// update's flow, and takes each key's updates in time order only.
pub fn sign_profile(key: &[u8; 32], profile: &str, unix: u64) -> String {
    let mac = crate::mac::hmac(key, "profile", &[profile.as_bytes(), &unix.to_be_bytes()]);
    hex::encode(&mac[..16])
}

/// The signature of a quality report (`Pinhole-Quality` with `Pinhole-Sig`): the report
/// and its time (milliseconds, so reports of one second stay in order) under the plan key.
pub fn sign_quality(key: &[u8; 32], report: &str, t: u64) -> String {
    let mac = crate::mac::hmac(key, "quality", &[report.as_bytes(), &t.to_be_bytes()]);
    hex::encode(&mac[..16])
}

/// A call's quality as an agent measured it (its media went direct, past the server's
/// relay): the figures of the worst direction, and the packets behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentQuality {
    pub call_id: String,
    pub mos: f64,
    pub loss_pct: f64,
    pub jitter_ms: f64,
    pub rtt_ms: Option<f64>,
    pub expected: u64,
    pub lost: u64,
}

impl AgentQuality {
    /// What an agent's relay measured of a released call (`None` without RTP).
    pub fn of(q: &pinhole_media::quality::CallQuality) -> Option<AgentQuality> {
        Some(AgentQuality {
            call_id: q.call_id.clone(),
            mos: q.mos()?,
            loss_pct: q.loss_pct(),
            jitter_ms: q.jitter_ms(),
            rtt_ms: q.rtt_us().map(|r| f64::from(r) / 1000.0),
            expected: q.directions.iter().map(|d| d.expected).sum(),
            lost: q.directions.iter().map(|d| d.lost).sum(),
        })
    }

    /// The `Pinhole-Quality` value: `CALL-ID;mos=4.40;loss=0.00;jitter=0.5;rtt=12.0;expected=N;lost=N`
    /// (a Call-ID holds no `;`).
    pub fn to_header(&self) -> String {
        let rtt = self.rtt_ms.map_or("-".to_owned(), |r| format!("{r:.1}"));
        format!(
            "{};mos={:.2};loss={:.2};jitter={:.1};rtt={rtt};expected={};lost={}",
            self.call_id, self.mos, self.loss_pct, self.jitter_ms, self.expected, self.lost
        )
    }

    /// Reads a `Pinhole-Quality` value; `None` unless every figure is there and sane.
    pub fn parse_header(v: &str) -> Option<AgentQuality> {
        if v.len() > 512 {
            return None;
        }
        let mut parts = v.trim().split(';');
        let call_id = parts.next()?.trim();
        if call_id.is_empty() || call_id.contains(char::is_whitespace) {
            return None;
        }
        let mut q = AgentQuality {
            call_id: call_id.to_owned(),
            mos: 0.0,
            loss_pct: 0.0,
            jitter_ms: 0.0,
            rtt_ms: None,
            expected: 0,
            lost: 0,
        };
        let mut seen = 0;
        for p in parts {
            let (k, v) = p.split_once('=')?;
            let num = || v.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
            match k.trim() {
                "mos" => q.mos = num().filter(|m| (1.0..=5.0).contains(m))?,
                "loss" => q.loss_pct = num().filter(|l| *l <= 100.0)?,
                "jitter" => q.jitter_ms = num()?,
                "rtt" if v == "-" => q.rtt_ms = None,
                "rtt" => q.rtt_ms = Some(num()?),
                "expected" => q.expected = v.parse().ok()?,
                "lost" => q.lost = v.parse().ok()?,
                _ => return None,
            }
            seen += 1;
        }
        (seen == 6 && q.lost <= q.expected).then_some(q)
    }
}

/// Reads a `Pinhole-Sig` value: (signature, time).
pub fn parse_profile_sig(v: &str) -> Option<(&str, u64)> {
    let (sig, t) = v.trim().split_once(";t=")?;
    if sig.len() != 32 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((sig, t.trim().parse().ok()?))
}

/// Signs the lines a plan or forwarder offer added to an SDP for `call_id`, under the plan
/// key of the agent it goes to: the value of `a=x-pinhole-sig`.
pub fn sign_plan(key: &[u8; 32], call_id: &str, sdp: &str) -> String {
    let mac = crate::mac::hmac(key, "plan", &[call_id.as_bytes(), punch_sdp::signed_part(sdp).as_bytes()]);
    hex::encode(&mac[..16])
}

/// Whether the plan lines of `sdp` carry a good signature under `key`.
pub fn plan_signed(key: &[u8; 32], call_id: &str, sdp: &str) -> bool {
    punch_sdp::signature(sdp)
        .is_some_and(|sig| crate::mac::ct_eq(sig.as_bytes(), sign_plan(key, call_id, sdp).as_bytes()))
}

/// A plan key in the form of a `Pinhole-Key` header (64 hex digits), and back.
pub fn key_to_header(key: &[u8; 32]) -> String {
    hex::encode(key)
}

pub fn key_from_header(v: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(v.trim(), &mut key).ok()?;
    Some(key)
}

/// The agent, generic over where it anchors its phones' media (`Option<Relay>` on its LAN
/// interface in pinhole; `None` passes SDP through).
pub struct Agent<M: MediaAnchor> {
    cfg: AgentConfig,
    media: M,
    /// Calls answered (a 2xx to their INVITE passed), whose media a later failure of a
    /// re-INVITE must not release.
    answered: HashSet<String>,
    out: VecDeque<Transmit>,
    /// Responses dropped: not through us, or with no hop to return to.
    dropped: u64,
    /// This agent's NAT profile (`Pinhole-NAT` form), once measured.
    profile: Option<String>,
    /// Its round trips to the relays' STUN services (`Pinhole-RTT` form), once measured.
    relay_rtts: Option<String>,
    /// How we reach the server: UDP, or TCP where UDP is blocked.
    server_transport: Transport,
    /// Punch plans from an INVITE, waiting for the phone's 2xx: (Call-ID, server tag, plan).
    pending: VecDeque<(String, String, WirePlan)>,
    /// Plans of answered calls.
    plans: VecDeque<ReadyPlan>,
    /// Forwarder offers, as they came.
    offers: VecDeque<ForwarderOffer>,
    /// The key the server signs our plans with (told in every REGISTER we relay).
    plan_key: [u8; 32],
    /// Where our phones are: the addresses the server accepted a registration of through us.
    phones: HashSet<SocketAddr>,
    /// Plans and forwarder offers refused: unsigned, badly signed, or not from the server.
    plans_refused: u64,
    /// Requests refused: from outside towards anywhere but the server, or from the server
    /// towards an address that is not one of our phones.
    refused: u64,
    /// The server's answers to our profile updates and quality reports, not taken yet.
    profile_answers: Vec<u16>,
    /// Quality reports sent, to keep their times (and branches) apart within a second.
    reports: u64,
}

impl<M: MediaAnchor> Agent<M> {
    pub fn new(cfg: AgentConfig, media: M) -> Agent<M> {
        Agent {
            media,
            answered: HashSet::new(),
            out: VecDeque::new(),
            dropped: 0,
            profile: None,
            relay_rtts: None,
            server_transport: Transport::Udp,
            pending: VecDeque::new(),
            plans: VecDeque::new(),
            offers: VecDeque::new(),
            plan_key: crate::mac::hmac(&cfg.secret, "plan-key", &[]),
            phones: HashSet::new(),
            plans_refused: 0,
            refused: 0,
            profile_answers: Vec::new(),
            reports: 0,
            cfg,
        }
    }

    /// Plans and forwarder offers refused (unsigned, badly signed, not from the server).
    pub fn plans_refused(&self) -> u64 {
        self.plans_refused
    }

    /// Requests refused for going anywhere but between our phones and the server.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The server's answers to our profile updates since the last call (status codes).
    pub fn take_profile_answers(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.profile_answers)
    }

    /// The plan key, as the server receives it.
    pub fn plan_key(&self) -> [u8; 32] {
        self.plan_key
    }

    pub fn media(&self) -> &M {
        &self.media
    }

    pub fn media_mut(&mut self) -> &mut M {
        &mut self.media
    }

    /// The round trips to relays to report with every REGISTER relayed from now on.
    pub fn set_relay_rtts(&mut self, header_value: String) {
        self.relay_rtts = Some(header_value);
    }

    /// The NAT profile to report with every REGISTER relayed from now on (the server keeps
    /// it only with a REGISTER it authenticated).
    pub fn set_profile(&mut self, header_value: String) {
        self.profile = Some(header_value);
    }

    /// Tells the server our NAT profile now, signed with our plan key, for every phone
    /// registered through us: a profile that changed (a new public address, a NAT reboot)
    /// reaches the server without waiting for the phones' next REGISTERs. `unix` is the
    /// wall clock (the server takes each key's updates in time order).
    pub fn push_profile(&mut self, unix: u64) {
        let Some(profile) = self.profile.clone() else { return };
        let sig = sign_profile(&self.plan_key, &profile, unix);
        self.signed_options("profile", unix, &format!("Pinhole-NAT: {profile}\r\nPinhole-Sig: {sig};t={unix}"));
    }

    /// Tells the server what we measured of a call whose media we carried (a direct path
    /// bypasses its relay), signed with our plan key like a profile update. `unix` is the
    /// wall clock.
    pub fn report_quality(&mut self, unix: u64, q: &AgentQuality) {
        self.reports += 1;
        let t = unix * 1000 + self.reports % 1000;
        let value = q.to_header();
        let sig = sign_quality(&self.plan_key, &value, t);
        self.signed_options("quality", t, &format!("Pinhole-Quality: {value}\r\nPinhole-Sig: {sig};t={t}"));
    }

    /// An OPTIONS of ours to the server carrying `headers` (a signed profile or report),
    /// its branch, tag and Call-ID made from `kind` and `t`; its answer is taken as ours.
    fn signed_options(&mut self, kind: &str, t: u64, headers: &str) {
        let transport = self.server_transport;
        let (us, server) = (self.cfg.listen, self.cfg.server);
        let tag = hex::encode(&crate::mac::hmac(&self.cfg.secret, &format!("{kind}-tag"), &[&t.to_be_bytes()])[..4]);
        let request = format!(
            "OPTIONS sip:{server} SIP/2.0\r\nVia: SIP/2.0/{} {us};branch={PROFILE_BRANCH}{}{t:x}\r\nMax-Forwards: 70\r\nFrom: <sip:agent@{us}>;tag={tag}\r\nTo: <sip:{server}>\r\nCall-ID: {kind}-{t:x}-{tag}@{us}\r\nCSeq: 1 OPTIONS\r\n{headers}\r\nContent-Length: 0\r\n\r\n",
            transport.via_token(),
            &kind[..1],
        );
        let flow = Flow { transport, local: us, remote: server, conn: None };
        self.out.push_back(Transmit { flow, payload: request.into_bytes() });
    }

    /// Signalling to the server goes over `t` from now on (TCP where UDP is blocked): its
    /// Via says so, and the shell sends it on its connection to the server.
    pub fn set_server_transport(&mut self, t: Transport) {
        self.server_transport = t;
    }

    /// The transport towards `to`: the server's, else UDP (the phones on the LAN).
    fn transport_to(&self, to: SocketAddr) -> Transport {
        if to.ip() == self.cfg.server.ip() {
            self.server_transport
        } else {
            Transport::Udp
        }
    }

    /// The server's SIP address.
    pub fn server(&self) -> SocketAddr {
        self.cfg.server
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The next punch plan for one of our phones' calls, once the call is answered (the
    /// callee's plan comes in the INVITE and waits for its 2xx; the caller's comes in the
    /// 2xx). A retransmitted 2xx brings its plan again.
    #[must_use]
    pub fn poll_plan(&mut self) -> Option<ReadyPlan> {
        self.plans.pop_front()
    }

    /// The next fake-TCP forwarder offer the server made for one of our phones' calls.
    #[must_use]
    pub fn poll_forwarder_offer(&mut self) -> Option<ForwarderOffer> {
        self.offers.pop_front()
    }

    /// The body of a message we forward: a punch plan in it is ours (taken out, so the
    /// phone never sees it, and kept for the media side), and SDP is anchored on our LAN
    /// relay. `sender_tag` is the tag of whoever wrote the SDP; `None`: not an SDP carrier.
    fn fix_body(
        &mut self,
        now: Instant,
        msg: &Message,
        from: SocketAddr,
        sender_tag: Option<&str>,
        e: &mut Editor<'_>,
    ) -> Result<(), Rejection> {
        let Ok(body) = std::str::from_utf8(msg.body_bytes()) else { return Ok(()) };
        let stripped = body.contains("a=x-pinhole-").then(|| {
            // Only the server plans, and only what it signed with our key counts; anything
            // else is only taken out.
            let signed = from == self.cfg.server
                && msg.call_id().is_some_and(|c| plan_signed(&self.plan_key, c, body))
                && sender_tag.is_some();
            if !signed {
                self.plans_refused += 1;
                return punch_sdp::strip(body);
            }
            if let (Some((port, key)), Some(call_id), Some(tag)) =
                (punch_sdp::forwarder_offer(body), msg.call_id(), sender_tag)
            {
                if self.offers.len() >= MAX_PENDING_PLANS {
                    self.offers.pop_front();
                }
                self.offers.push_back(ForwarderOffer {
                    call_id: call_id.to_owned(),
                    server_tag: tag.to_owned(),
                    port,
                    key,
                });
            }
            if let (Some(plan), Some(call_id), Some(tag)) = (WirePlan::from_sdp(body), msg.call_id(), sender_tag) {
                let (call_id, server_tag) = (call_id.to_owned(), tag.to_owned());
                // An INVITE's plan waits for the answer; a 2xx's (ours is the caller) or a
                // late offer's ACK's (the answer has passed) starts counting now.
                if msg.is_request() && msg.method() != Some(&Method::Ack) {
                    if self.pending.len() >= MAX_PENDING_PLANS {
                        self.pending.pop_front();
                    }
                    self.pending.retain(|(c, _, _)| *c != call_id);
                    self.pending.push_back((call_id, server_tag, plan));
                } else {
                    self.plans.push_back(ReadyPlan { call_id, server_tag, plan, answered: now });
                }
            }
            punch_sdp::strip(body)
        });
        let sdp = stripped.as_deref().unwrap_or(body);
        match (sender_tag, msg.call_id()) {
            (Some(tag), Some(call_id)) if self.media.anchoring() && sdp.starts_with("v=0") => {
                let anchored = self
                    .media
                    .anchor_sdp(
                        now,
                        &SdpIn {
                            call_id,
                            sender_tag: tag,
                            sdp: sdp.as_bytes(),
                            signalling_ip: from.ip(),
                            to: None,
                            hide: false,
                            to_browser: false,
                            record: false,
                        },
                    )
                    .map_err(|r| {
                        let r = r.into_refusal();
                        Rejection::new(r.code, r.reason)
                    })?;
                e.set_body(&anchored);
            }
            _ => {
                if let Some(s) = &stripped {
                    e.set_body(s.as_bytes());
                }
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// One datagram from `flow.remote`. `Err` for input that is not SIP at all (dropped,
    /// counted by the caller).
    pub fn handle_input(&mut self, now: Instant, flow: Flow, data: Bytes) -> Result<(), Garbage> {
        if data.iter().all(u8::is_ascii_whitespace) {
            return Ok(()); // CRLF keepalives
        }
        let msg = Message::parse(data)?.truncated_to_content_length();
        if msg.is_request() {
            self.on_request(now, flow, &msg);
        } else {
            self.on_response(now, flow, &msg);
        }
        Ok(())
    }

    fn reply(&mut self, flow: Flow, msg: &Message, code: u16, reason: &str, extra: &[String]) {
        if msg.method() == Some(&Method::Ack) || msg.header(HeaderName::Via).is_none() {
            return;
        }
        let tag = format!("pha{:08x}", self.branch_mac(msg.branch(), msg) as u32);
        self.out.push_back(Transmit { flow, payload: msg.response(code, reason, Some(&tag), extra) });
    }

    fn is_us(&self, host: &Host, port: Option<u16>) -> bool {
        host_ip(host) == Some(self.cfg.listen.ip()) && port.unwrap_or(5060) == self.cfg.listen.port()
    }

    fn on_request(&mut self, now: Instant, flow: Flow, msg: &Message) {
        if let Err(rej) = msg.check_request(self.cfg.max_message, self.cfg.max_message) {
            self.reply(flow, msg, rej.code, &rej.reason, &[]);
            return;
        }
        // Loose routing: our own Route entries go.
        let routes = msg.values(HeaderName::Route);
        let ours: Vec<(usize, std::ops::Range<usize>)> = routes
            .iter()
            .take_while(|(_, r)| {
                parse_sip_uri(uri_of(msg.text(r.clone())))
                    .is_some_and(|u| self.is_us(&u.host_port.host, u.host_port.port))
            })
            .cloned()
            .collect();
        let next_route = routes.get(ours.len()).map(|(_, r)| uri_of(msg.text(r.clone())).to_owned());
        let to_us = next_route.is_none()
            && msg.request_sip_uri().is_some_and(|u| self.is_us(&u.host_port.host, u.host_port.port));
        if to_us && msg.method() == Some(&Method::Options) {
            self.reply(flow, msg, 200, "OK", &["Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER".to_owned()]);
            return;
        }
        if let Some(Ok(0)) = msg.max_forwards() {
            self.reply(flow, msg, 483, "Too Many Hops", &[]);
            return;
        }
        let from_server = flow.remote == self.cfg.server;
        // Where it goes: the next Route, else the phone the server's Request-URI names,
        // else (a phone's request) the server.
        let next = match (&next_route, from_server) {
            (Some(r), _) => ip_target(r),
            (None, true) => msg.request_uri().and_then(ip_target),
            (None, false) => Some(self.cfg.server),
        };
        let Some(next) = next else {
            self.reply(flow, msg, 404, "Not Found - Unresolvable Next Hop", &[]);
            return;
        };
        // Only between our phones and the server: nobody uses us to reach a LAN host.
        if !from_server && next != self.cfg.server {
            self.refused += 1;
            self.reply(flow, msg, 403, "Forbidden - The Agent Forwards Only To Its Server", &[]);
            return;
        }
        if from_server && !self.phones.contains(&next) {
            self.refused += 1;
            self.reply(flow, msg, 404, "Not Found - No Phone Registered There Through This Agent", &[]);
            return;
        }
        if next.ip() == self.cfg.listen.ip() && next.port() == self.cfg.listen.port() {
            self.reply(flow, msg, 482, "Loop Detected", &[]);
            return;
        }
        let mut e = Editor::new(msg);
        let branch = self.branch(msg.branch(), msg);
        let transport = self.transport_to(next);
        e.prepend_header("Via", &format!("SIP/2.0/{} {};branch={branch}", transport.via_token(), self.cfg.listen));
        if msg.method().is_some_and(Method::creates_dialog) && msg.tag(HeaderName::To).is_none() {
            e.prepend_header("Record-Route", &format!("<sip:{};lr>", self.cfg.listen));
        }
        for (hi, r) in &ours {
            e.remove_value(*hi, r.clone());
        }
        if msg.method() == Some(&Method::Register) && !from_server {
            // Only the agent speaks for its NAT and its key: whatever a phone put there goes.
            for name in ["Pinhole-NAT", "Pinhole-Key"] {
                for (i, r) in msg.extension_headers(name) {
                    e.remove_value(i, r);
                }
            }
            if let Some(p) = &self.profile {
                e.append_header("Pinhole-NAT", p);
            }
            e.append_header("Pinhole-Key", &key_to_header(&self.plan_key));
            for (i, r) in msg.extension_headers("Pinhole-RTT") {
                e.remove_value(i, r);
            }
            if let Some(r) = &self.relay_rtts {
                e.append_header("Pinhole-RTT", r);
            }
        }
        fix_top_via(msg, &mut e, flow);
        e.decrement_max_forwards();
        let carries_sdp = matches!(msg.method(), Some(Method::Invite | Method::Update | Method::Prack | Method::Ack));
        let tag = carries_sdp.then(|| msg.tag(HeaderName::From)).flatten();
        if let Err(rej) = self.fix_body(now, msg, flow.remote, tag, &mut e) {
            self.reply(flow, msg, rej.code, &rej.reason, &[]);
            return;
        }
        if msg.method() == Some(&Method::Bye) {
            if let Some(call_id) = msg.call_id() {
                self.media.release(call_id);
                self.answered.remove(call_id);
            }
        }
        let out = Flow { transport, local: self.cfg.listen, remote: next, conn: None };
        self.out.push_back(Transmit { flow: out, payload: e.finish() });
    }

    /// Responses follow the Via chain: ours on top goes, the next one says where.
    fn on_response(&mut self, now: Instant, flow: Flow, msg: &Message) {
        if msg.branch().is_some_and(|b| b.starts_with(PROFILE_BRANCH)) && flow.remote == self.cfg.server {
            // The answer to our own profile update: nothing to forward.
            self.profile_answers.push(msg.status().unwrap_or(0));
            return;
        }
        let vias = msg.values(HeaderName::Via);
        let parsed = msg.vias();
        let Some(next) = parsed.get(1).cloned().flatten() else {
            self.dropped += 1;
            return;
        };
        // Ours only if the top branch is the MAC of the one below: an answer to a request
        // we sent, not a stranger's forgery.
        let expected = self.branch(next.params.get_val("branch").map(|b| b.as_str()), msg);
        let ours = msg.top_via().is_some_and(|v| {
            self.is_us(&v.sent_by.host, v.sent_by.port)
                && v.params.get_val("branch").is_some_and(|b| crate::mac::ct_eq(b.as_bytes(), expected.as_bytes()))
        });
        let (Some((hi, r)), true) = (vias.first(), ours) else {
            self.dropped += 1;
            return;
        };
        // RFC 3581: received and rport say where the previous hop really is.
        let ip = next
            .params
            .get_val("received")
            .and_then(|r| r.parse::<IpAddr>().ok())
            .or_else(|| host_ip(&next.sent_by.host));
        let port =
            next.params.get_val("rport").and_then(|p| p.parse::<u16>().ok()).or(next.sent_by.port).unwrap_or(5060);
        let Some(ip) = ip else {
            self.dropped += 1;
            return;
        };
        let mut e = Editor::new(msg);
        e.remove_value(*hi, r.clone());
        let code = msg.status().unwrap_or(500);
        let method = msg.cseq().map(|(_, m)| m);
        let carries_sdp = code < 300 && matches!(method, Some(Method::Invite | Method::Update | Method::Prack));
        let tag = carries_sdp.then(|| msg.tag(HeaderName::To)).flatten();
        // An answer the relay cannot take goes on as it is: the call still works, relayed
        // by the server alone.
        let _ = self.fix_body(now, msg, flow.remote, tag, &mut e);
        if method == Some(Method::Register) && (200..300).contains(&code) && flow.remote == self.cfg.server {
            // The server accepted a phone's registration through us: calls may reach it.
            self.learn_phone(SocketAddr::new(ip, port), msg);
            if self.profile.is_none() {
                // Registered without our NAT profile (we are still measuring it): the phone
                // is told to come back in seconds, and that REGISTER will carry it.
                shorten_expiry(msg, &mut e, NOT_READY_EXPIRES);
            }
        }
        if let (Some(call_id), Some(Method::Invite)) = (msg.call_id(), &method) {
            if (200..300).contains(&code) {
                // Our phone answered a call the server planned: the plan starts now.
                if let Some(i) = self.pending.iter().position(|(c, _, _)| c == call_id) {
                    if let Some((call_id, server_tag, plan)) = self.pending.remove(i) {
                        self.plans.push_back(ReadyPlan { call_id, server_tag, plan, answered: now });
                    }
                }
                if self.answered.len() >= MAX_ANSWERED {
                    self.answered.clear(); // only costs a failed re-INVITE its media
                }
                self.answered.insert(call_id.to_owned());
            } else if code >= 300 && !self.answered.contains(call_id) {
                self.media.release(call_id);
                self.pending.retain(|(c, _, _)| c != call_id);
            }
        }
        let out = Flow {
            transport: self.transport_to(SocketAddr::new(ip, port)),
            local: self.cfg.listen,
            remote: SocketAddr::new(ip, port),
            conn: None,
        };
        self.out.push_back(Transmit { flow: out, payload: e.finish() });
    }

    /// Our branch for a request whose top Via had branch `received`: a MAC of it (and, per
    /// §16.11, of what identifies the transaction) under our secret, so retransmissions get
    /// the same one, CANCEL and ACK for a non-2xx share their INVITE's, and a response is
    /// ours only if it carries exactly this above the sender's Via.
    fn branch(&self, received: Option<&str>, msg: &Message) -> String {
        format!("{BRANCH_PREFIX}{:016x}", self.branch_mac(received, msg))
    }

    fn branch_mac(&self, received: Option<&str>, msg: &Message) -> u64 {
        let part = |v: Option<&str>| v.unwrap_or("").as_bytes().to_vec();
        let mac = crate::mac::hmac(
            &self.cfg.secret,
            "branch",
            &[&part(received), &part(msg.call_id()), &part(msg.tag(HeaderName::From))],
        );
        u64::from_be_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], mac[6], mac[7]])
    }

    /// The server accepted a registration for the phone at `at` (where its response goes):
    /// that address, and its Contacts on the same host, may be sent the server's requests.
    fn learn_phone(&mut self, at: SocketAddr, msg: &Message) {
        let contacts = msg
            .values(HeaderName::Contact)
            .into_iter()
            .filter_map(|(_, r)| ip_target(uri_of(msg.text(r))))
            .filter(|c| c.ip() == at.ip());
        for a in std::iter::once(at).chain(contacts) {
            if self.phones.len() >= MAX_PHONES && !self.phones.contains(&a) {
                self.phones.clear(); // only costs calls to phones until they register again
            }
            self.phones.insert(a);
        }
    }
}

/// The registration time granted to a phone while the agent's NAT profile is not measured
/// yet: the phone registers at once (its calls work, relayed) and returns within about
/// this long, when the profile is there.
pub const NOT_READY_EXPIRES: u32 = 20;

/// Lowers every expiry a REGISTER's 2xx grants (`;expires=` of each Contact, and an
/// `Expires` header) to at most `max` seconds.
fn shorten_expiry(msg: &Message, e: &mut Editor<'_>, max: u32) {
    let mut lower = |range: std::ops::Range<usize>| {
        let digits = msg.text(range.clone());
        if digits.parse::<u64>().is_ok_and(|v| v > u64::from(max)) {
            e.replace(range, max.to_string());
        }
    };
    for (_, r) in msg.values(HeaderName::Contact) {
        let text = msg.text(r.clone());
        let params = text.rfind('>').unwrap_or(0);
        let lower_text = text.to_ascii_lowercase();
        if let Some(i) = lower_text[params..].find(";expires=").map(|i| params + i + ";expires=".len()) {
            let len = text[i..].bytes().take_while(u8::is_ascii_digit).count();
            lower(r.start + i..r.start + i + len);
        }
    }
    for (_, r) in msg.values(HeaderName::Expires) {
        let text = msg.text(r.clone());
        let start = text.len() - text.trim_start().len();
        let len = text[start..].bytes().take_while(u8::is_ascii_digit).count();
        lower(r.start + start..r.start + start + len);
    }
}

/// The address an IP-literal SIP URI names (the agent does no DNS).
fn ip_target(uri: &str) -> Option<SocketAddr> {
    let u = parse_sip_uri(uri)?;
    Some(SocketAddr::new(host_ip(&u.host_port.host)?, u.host_port.port.unwrap_or(5060)))
}

#[cfg(test)]
mod tests;
