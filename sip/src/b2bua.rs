//! Trunk mode: a back-to-back user agent between local phones and SIP trunks, sans-IO.
//!
//! A call from a local user whose Request-URI user matches a `[[route]]` is not proxied:
//! the phone's INVITE ends here (the A leg) and pinhole places a call of its own to the
//! route's first trunk that is up and under its call limit (the B leg). The carrier sees
//! only pinhole: a fresh Call-ID, tags and CSeq space, pinhole's address in Via and
//! Contact, headers copied across only by an allow-list, and SDP anchored on the relay.
//! Challenges from the carrier are answered with the trunk's credentials, once per
//! request; 408, 5xx or no answer within Timer B moves the call to the next trunk without
//! the caller noticing (no second ringing). Responses, ACK, BYE from either side, CANCEL
//! and in-dialog requests (re-INVITE, UPDATE, INFO) are carried across, each leg with its
//! own dialog state.
//!
//! The proxy hands the B2BUA what is its ([`B2bua::wants`], [`B2bua::owns_request`],
//! [`B2bua::owns_response`]); the B2BUA keeps its own transactions, timers and output.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pinhole_media::anchor::{MediaAnchor, SdpIn, Unanchored};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::auth::{Algorithm, Challenge, Credentials};
use crate::message::{param_of_name_addr, HeaderName, Message, Method};
use crate::proxy::{Interface, T1, T2, TIMEOUT_64T1};
use crate::transport::{Flow, Transmit, Transport};

mod build;
pub mod health;
#[cfg(test)]
mod tests;
mod waiting;

use health::TrunkHealth;
use waiting::{Resume, Waiting};

use build::*;

/// Branches of the B2BUA's own requests start with this (the proxy's with `z9hG4bKph`).
pub const BRANCH_PREFIX: &str = "z9hG4bKpb";

/// Headers copied from the phone's INVITE to the trunk's by default. An identity a phone
/// asserts (P-Asserted-Identity, P-Preferred-Identity) is never among them: towards a
/// carrier the caller is who authenticated (see [`B2buaConfig::caller_ids`]).
pub const DEFAULT_COPY_HEADERS: &[&str] =
    &["Allow", "Supported", "Accept", "Content-Disposition", "Privacy", "Session-Expires", "Min-SE"];

/// Identity headers a caller may only set when it is one of the operator's own trusted
/// networks (`auth.trusted`, a PBX vouching for its users); from anyone else they are
/// dropped, whatever `copy_headers` says.
const IDENTITY_HEADERS: [&str; 2] = ["P-Asserted-Identity", "P-Preferred-Identity"];

/// How long a trunk may ring before the call is given up (408), by default: Kamailio's
/// `fr_inv_timer` practice.
pub const DEFAULT_RING_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `number` (a Request-URI user) is something a trunk can be asked to dial: 1–64
/// ASCII characters of `0-9 A-Z a-z + * # . _ -`. Anything else (escapes, spaces, CR/LF,
/// an `@`, non-ASCII digits) is refused before a route is matched or a slot taken.
pub fn dialable(number: &str) -> bool {
    (1..=64).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'*' | b'#' | b'.' | b'_' | b'-'))
}

/// B2BUA calls at once, over all trunks (each holds two dialogs and relay ports).
pub const MAX_CALLS: usize = 10_000;

/// How calls end, for `pinhole_b2bua_calls_total{outcome}`.
const OUTCOMES: [&str; 4] = ["answered", "failed", "cancelled", "limited"];

/// One `[[trunk]]`.
#[derive(Debug, Clone)]
pub struct Trunk {
    pub name: String,
    pub transport: Transport,
    pub address: SocketAddr,
    pub username: String,
    pub password: String,
    pub register: bool,
    pub max_calls: usize,
    /// Inbound: Request-URI user -> local user.
    pub dids: Vec<(String, String)>,
    /// Seconds between OPTIONS pings (0: none, the trunk is always up), and the
    /// registration lifetime asked for.
    pub options_interval: u64,
    pub register_expires: u64,
    /// Calls from the trunk must also answer a digest challenge with `username`/`password`
    /// (beyond coming from its address).
    pub inbound_auth: bool,
}

/// One `[[route]]`: Request-URI users matching `pattern` go to `trunks`, in order.
#[derive(Debug, Clone)]
pub struct Route {
    pub pattern: regex::Regex,
    /// Indexes into the trunk list.
    pub trunks: Vec<usize>,
    /// Record this route's calls (`[[route]] record`).
    pub record: bool,
}

#[derive(Debug, Clone)]
pub struct B2buaConfig {
    pub trunks: Vec<Trunk>,
    pub routes: Vec<Route>,
    /// Header names copied from one leg's requests to the other's (case-insensitive).
    pub copy_headers: Vec<String>,
    /// The session interval asked for on the trunk leg (RFC 4028; at least 90 s).
    pub session_expires: Duration,
    /// How long a trunk may ring before the call is given up.
    pub ring_timeout: Duration,
    /// (user, caller ID): the identity a user's trunk calls carry (From and
    /// P-Asserted-Identity); users not listed call as their own name.
    pub caller_ids: Vec<(String, String)>,
}

impl Default for B2buaConfig {
    fn default() -> Self {
        B2buaConfig {
            trunks: Vec::new(),
            routes: Vec::new(),
            copy_headers: DEFAULT_COPY_HEADERS.iter().map(|h| (*h).to_owned()).collect(),
            session_expires: DEFAULT_SESSION_EXPIRES,
            ring_timeout: DEFAULT_RING_TIMEOUT,
            caller_ids: Vec::new(),
        }
    }
}

/// The session interval asked for on trunk legs by default, and the least RFC 4028 allows.
pub const DEFAULT_SESSION_EXPIRES: Duration = Duration::from_secs(1800);
pub const MIN_SE: Duration = Duration::from_secs(90);

/// Where an inbound call's B leg goes: a registered binding of the DID's user.
#[derive(Debug, Clone)]
pub struct Callee {
    pub flow: Flow,
    /// The binding's contact (the Request-URI), the Path to it, and the user's AOR.
    pub uri: String,
    pub routes: Vec<String>,
    pub aor: String,
}

/// Which leg of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    /// The phone's.
    A,
    /// The trunk's.
    B,
}

impl Leg {
    fn other(self) -> Leg {
        match self {
            Leg::A => Leg::B,
            Leg::B => Leg::A,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The B leg's INVITE is out (or being retried on the next trunk).
    Calling,
    /// Answered; waiting for the phone's ACK (the 2xx is retransmitted until then).
    Answered,
    Confirmed,
    /// Torn down; kept a moment for retransmissions.
    Ended,
}

/// One side's dialog state.
#[derive(Debug, Clone, Default)]
struct Dialog {
    call_id: String,
    /// Our tag and theirs.
    local_tag: String,
    remote_tag: String,
    /// Our From/To as they appear in requests we send on this leg (with tags).
    local_uri: String,
    remote_uri: String,
    /// Where requests go (the remote Contact) and the Route set.
    target: String,
    routes: Vec<String>,
    local_cseq: u32,
    flow: Option<Flow>,
}

struct Call {
    /// A: the caller's side (the phone outbound, the carrier inbound); B: the callee's.
    a: Dialog,
    b: Dialog,
    /// Inbound from a trunk: the B leg goes to this binding (no failover, no challenges).
    inbound: Option<Callee>,
    /// Who the caller is towards the other leg and in the call record: the authenticated
    /// user's caller ID (outbound), or the From user a trusted network or a trunk gave,
    /// when it is [`dialable`] (else `anonymous`).
    identity: String,
    /// The caller came from a trusted network: its identity headers are copied.
    trusted_caller: bool,
    phase: Phase,
    /// The phone's INVITE (its transaction) and our last response to it.
    a_invite: Message,
    a_flow: Flow,
    a_last: Option<Vec<u8>>,
    /// The 2xx to the phone, retransmitted until its ACK.
    a_2xx_at: Option<(Instant, Duration)>,
    /// The trunks still to try, the one in use.
    trunks_left: VecDeque<usize>,
    trunk: usize,
    /// The B leg's INVITE as sent (for CANCEL and ACK), its branch, and whether a
    /// provisional came back.
    b_invite: Option<Message>,
    b_provisional: bool,
    /// Challenges answered on this INVITE (a second one fails the call).
    b_auth_answered: bool,
    /// The ACK we sent for the B leg's 2xx (repeated if the 2xx is).
    b_ack: Option<Vec<u8>>,
    ringing_sent: bool,
    /// The route records this call's media.
    record: bool,
    cancelled: bool,
    started: Instant,
    answered: Option<Instant>,
    ended: Option<Instant>,
    /// Who hung up and the final code, for records.
    hangup: Option<&'static str>,
    final_code: Option<u16>,
    /// The trunk leg's session timer (RFC 4028): the interval agreed, whether we refresh
    /// (else the carrier does), and when the session was last refreshed.
    session: Option<(Duration, bool)>,
    refreshed: Instant,
    /// The SDP we last sent on the trunk leg (a refresh re-INVITE offers it again).
    b_sdp: Option<Vec<u8>>,
    /// Keys of the client transactions this call started (forgotten with it).
    clients: Vec<String>,
}

impl Call {
    /// Whether a request with this call's Call-ID on leg `leg` is really that leg's: from
    /// its party's address (carriers send from many ports: the IP), and — once the dialog
    /// has tags — with its own From tag and our To tag.
    fn belongs(&self, leg: Leg, flow: &Flow, msg: &Message) -> bool {
        let d = match leg {
            Leg::A => &self.a,
            Leg::B => &self.b,
        };
        let Some(party) = d.flow else { return false };
        if party.remote.ip() != flow.remote.ip() {
            return false;
        }
        match msg.tag(HeaderName::To) {
            // The INVITE again, or its CANCEL: the same From tag.
            None => leg == Leg::A && msg.tag(HeaderName::From) == Some(d.remote_tag.as_str()),
            Some(to) => {
                to == d.local_tag
                    && (d.remote_tag.is_empty() || msg.tag(HeaderName::From) == Some(d.remote_tag.as_str()))
            }
        }
    }
}

/// What a client transaction of ours belongs to.
#[derive(Debug, Clone)]
enum Purpose {
    /// The B leg's INVITE.
    Invite,
    /// A request carried across from the other leg: answer `origin` with the response.
    Bridged {
        origin: Box<Message>,
        origin_flow: Flow,
        origin_leg: Leg,
    },
    /// Our own (BYE, CANCEL): the response just ends it.
    Own,
    /// Our session refresh on the trunk leg (a re-INVITE with the same offer).
    Refresh,
    /// A trunk's REGISTER, or its OPTIONS ping.
    Register(usize),
    Ping(usize),
}

struct ClientTx {
    call: u64,
    purpose: Purpose,
    bytes: Vec<u8>,
    flow: Flow,
    invite: bool,
    /// Retransmit at, and the interval (UDP only); the transaction's deadline.
    retransmit: Option<(Instant, Duration)>,
    deadline: Instant,
    answered: bool,
}

/// Things the proxy or shell may want to know.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum B2buaEvent {
    /// A call ended: one line of the call records.
    CallRecord(CallRecord),
}

/// What the call records keep of a call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    pub a_call_id: String,
    pub b_call_id: String,
    pub caller: String,
    pub callee: String,
    pub trunk: String,
    /// Milliseconds from the INVITE to the answer and to the end.
    pub answer_ms: Option<u64>,
    pub duration_ms: u64,
    pub hangup: &'static str,
    pub code: u16,
    /// What the relay carried (both ways), and which way media went at the end.
    pub packets: u64,
    pub bytes: u64,
    pub media_path: &'static str,
    /// What the relay measured of the media's quality, when it carried RTP.
    pub quality: Option<pinhole_media::quality::CallQuality>,
}

/// Counters the shell exports.
#[derive(Debug, Default, Clone)]
pub struct B2buaStats {
    pub calls_started: u64,
    pub failovers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Client(String),
    Call(u64),
    /// A call's trunk-leg session timer: refresh, or check the carrier refreshed.
    Session(u64),
    /// A call's ring timeout.
    Ring(u64),
    /// A trunk's registration refresh, or its next ping.
    Register(usize),
    Ping(usize),
}

pub struct B2bua {
    cfg: B2buaConfig,
    interfaces: Vec<Interface>,
    calls: HashMap<u64, Call>,
    /// Either leg's Call-ID to its call.
    by_call_id: HashMap<String, (u64, Leg)>,
    clients: HashMap<String, ClientTx>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    out: VecDeque<Transmit>,
    events: VecDeque<B2buaEvent>,
    /// Calls in progress per trunk.
    active: Vec<usize>,
    next_id: u64,
    rng: StdRng,
    pub stats: B2buaStats,
    /// Per trunk: registration and ping state.
    health: Vec<TrunkHealth>,
    /// Calls whose handling waits for their media.
    waiting: Waiting,
}

impl B2bua {
    pub fn new(cfg: B2buaConfig, interfaces: Vec<Interface>, seed: u64) -> B2bua {
        let active = vec![0; cfg.trunks.len()];
        for t in &cfg.trunks {
            metrics::gauge!("pinhole_b2bua_calls", "trunk" => t.name.clone()).set(0.0);
        }
        for outcome in OUTCOMES {
            metrics::counter!("pinhole_b2bua_calls_total", "outcome" => outcome).absolute(0);
        }
        metrics::counter!("pinhole_b2bua_failovers_total").absolute(0);
        metrics::counter!("pinhole_b2bua_challenges_answered_total").absolute(0);
        let health = cfg.trunks.iter().map(|_| TrunkHealth::default()).collect();
        B2bua {
            health,
            cfg,
            interfaces,
            calls: HashMap::new(),
            by_call_id: HashMap::new(),
            clients: HashMap::new(),
            timers: BinaryHeap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            active,
            next_id: 1,
            rng: StdRng::seed_from_u64(seed ^ 0xb2b),
            stats: B2buaStats::default(),
            waiting: Waiting::default(),
        }
    }

    pub fn config(&self) -> &B2buaConfig {
        &self.cfg
    }

    /// Calls in progress (set up or answered), per trunk name.
    pub fn active_calls(&self) -> impl Iterator<Item = (&str, usize)> {
        self.cfg.trunks.iter().zip(&self.active).map(|(t, n)| (t.name.as_str(), *n))
    }

    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// The trunk a request from `ip` comes from, if any (carriers send from many ports).
    pub fn trunk_at(&self, ip: std::net::IpAddr) -> Option<usize> {
        self.cfg.trunks.iter().position(|t| t.address.ip() == ip)
    }

    /// The local user DID `number` of trunk `trunk` maps to.
    pub fn did_user(&self, trunk: usize, number: &str) -> Option<&str> {
        let t = self.cfg.trunks.get(trunk)?;
        t.dids
            .iter()
            .find(|(n, _)| n == number || n.trim_start_matches('+') == number.trim_start_matches('+'))
            .map(|(_, u)| u.as_str())
    }

    /// Whether a new INVITE for Request-URI user `user` from a local user is ours: a
    /// [`dialable`] number that a route matches.
    pub fn wants(&self, user: &str) -> bool {
        dialable(user) && self.cfg.routes.iter().any(|r| r.pattern.is_match(user))
    }

    /// Whether a request belongs to one of our calls (either leg's Call-ID).
    pub fn owns_request(&self, msg: &Message) -> bool {
        msg.call_id().is_some_and(|c| self.by_call_id.contains_key(c))
    }

    /// Whether a response answers one of our requests.
    pub fn owns_response(&self, msg: &Message) -> bool {
        msg.branch().is_some_and(|b| b.starts_with(BRANCH_PREFIX))
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<B2buaEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    fn publish_active(&self, trunk: usize) {
        if let Some(t) = self.cfg.trunks.get(trunk) {
            metrics::gauge!("pinhole_b2bua_calls", "trunk" => t.name.clone()).set(self.active[trunk] as f64);
        }
    }

    fn random_hex(&mut self, bytes: usize) -> String {
        (0..bytes).map(|_| format!("{:02x}", self.rng.gen::<u8>())).collect()
    }

    fn interface_for(&self, transport: Transport) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.transport == transport)
    }

    /// A new INVITE from a local user routed to a trunk: `auth_user` authenticated it, or
    /// (`None`) it came from a trusted network.
    pub fn on_invite<M: MediaAnchor>(
        &mut self,
        now: Instant,
        flow: Flow,
        msg: Message,
        auth_user: Option<&str>,
        media: &mut M,
    ) {
        let user = crate::proxy::request_user(&msg).unwrap_or_default();
        if !self.wants(&user) {
            return;
        }
        let Some(route) = self.cfg.routes.iter().find(|r| r.pattern.is_match(&user)) else { return };
        // Extensions a caller requires are ours to provide on its leg: none are (100rel and
        // timers end here on the trunk leg only).
        let required = msg.value_texts(HeaderName::Require);
        if !required.is_empty() {
            let unsupported = [format!("Unsupported: {}", required.join(", "))];
            let resp = msg.response(420, "Bad Extension", Some("pbrequire"), &unsupported);
            self.out.push_back(Transmit { flow, payload: resp });
            return;
        }
        // Trunks that answer their pings first, in route order; those marked down after
        // them (a carrier that ignores OPTIONS still takes calls): a call is refused with
        // 503 only when every trunk is at its limit.
        let up = |t: &usize| self.health.get(*t).is_some_and(|h| h.up);
        let trunks: VecDeque<usize> =
            route.trunks.iter().copied().filter(up).chain(route.trunks.iter().copied().filter(|t| !up(t))).collect();
        let identity = match auth_user {
            Some(u) => self.cfg.caller_ids.iter().find(|(n, _)| n == u).map_or(u, |(_, id)| id.as_str()).to_owned(),
            None => from_identity(&msg),
        };
        let record = route.record;
        if let Some(id) = self.start_call(now, flow, msg, trunks, None, (identity, auth_user.is_none())) {
            if let Some(call) = self.calls.get_mut(&id) {
                call.record = record;
            }
            self.try_next_trunk(now, id, media, None);
        }
    }

    /// A new INVITE from trunk `trunk` to one of its DIDs, for `callee` (the user's
    /// binding; `None` when the user is not registered: 480).
    pub fn on_inbound<M: MediaAnchor>(
        &mut self,
        now: Instant,
        flow: Flow,
        msg: Message,
        trunk: usize,
        callee: Option<Callee>,
        media: &mut M,
    ) {
        let Some(callee) = callee else {
            self.out.push_back(Transmit { flow, payload: msg.response(100, "Trying", None, &[]) });
            self.reply_stateless(flow, &msg, 480, "Temporarily Unavailable - Not Registered");
            return;
        };
        let identity = from_identity(&msg);
        let Some(id) = self.start_call(now, flow, msg, VecDeque::new(), Some(callee), (identity, false)) else {
            return;
        };
        let max = self.cfg.trunks.get(trunk).map_or(0, |t| t.max_calls);
        if self.active.get(trunk).is_none_or(|n| *n >= max) {
            self.fail_a(now, id, 503, "Service Unavailable - Trunk At Call Limit", media);
            return;
        }
        if let Some(call) = self.calls.get_mut(&id) {
            call.trunk = trunk;
        }
        self.active[trunk] += 1;
        self.publish_active(trunk);
        self.send_b_invite(now, id, media, None);
    }

    /// The A leg of a new call: 100 Trying, its dialog state, its B leg's Call-ID and tag.
    fn start_call(
        &mut self,
        now: Instant,
        flow: Flow,
        msg: Message,
        trunks: VecDeque<usize>,
        inbound: Option<Callee>,
        (identity, trusted_caller): (String, bool),
    ) -> Option<u64> {
        self.out.push_back(Transmit { flow, payload: msg.response(100, "Trying", None, &[]) });
        if self.calls.len() >= MAX_CALLS {
            self.reply_stateless(flow, &msg, 503, "Service Unavailable - B2BUA At Call Limit");
            return None;
        }
        let (Some(call_id), Some(from_tag)) = (msg.call_id(), msg.tag(HeaderName::From)) else {
            self.reply_stateless(flow, &msg, 400, "Bad Request - Missing Call-ID Or From Tag");
            return None;
        };
        let id = self.next_id;
        self.next_id += 1;
        let local_tag = format!("pb{}", self.random_hex(6));
        let a = Dialog {
            call_id: call_id.to_owned(),
            local_uri: format!("{};tag={local_tag}", strip_tag(msg.header(HeaderName::To).unwrap_or(""))),
            local_tag,
            remote_tag: from_tag.to_owned(),
            remote_uri: msg.header(HeaderName::From).unwrap_or("").to_owned(),
            target: contact_uri(&msg).unwrap_or_else(|| msg.request_uri().unwrap_or("").to_owned()),
            routes: Vec::new(),
            local_cseq: 0,
            flow: Some(flow),
        };
        let b = Dialog {
            call_id: self.random_hex(12),
            local_tag: format!("pb{}", self.random_hex(6)),
            ..Dialog::default()
        };
        let call = Call {
            a,
            b,
            inbound,
            identity,
            trusted_caller,
            phase: Phase::Calling,
            a_invite: msg,
            a_flow: flow,
            a_last: None,
            a_2xx_at: None,
            trunks_left: trunks,
            trunk: usize::MAX,
            b_invite: None,
            b_provisional: false,
            b_auth_answered: false,
            b_ack: None,
            ringing_sent: false,
            record: false,
            cancelled: false,
            started: now,
            answered: None,
            ended: None,
            hangup: None,
            final_code: None,
            session: None,
            refreshed: now,
            b_sdp: None,
            clients: Vec::new(),
        };
        self.by_call_id.insert(call.a.call_id.clone(), (id, Leg::A));
        self.calls.insert(id, call);
        self.stats.calls_started += 1;
        self.timers.push(Reverse((now + self.cfg.ring_timeout, Timer::Ring(id))));
        Some(id)
    }

    /// Places the B leg on the next trunk that is under its limit; when none is left,
    /// answers the phone with `failure` (or 503).
    fn try_next_trunk<M: MediaAnchor>(&mut self, now: Instant, id: u64, media: &mut M, failure: Option<(u16, String)>) {
        loop {
            let Some(call) = self.calls.get_mut(&id) else { return };
            let Some(t) = call.trunks_left.pop_front() else {
                let (code, reason) = failure.unwrap_or((503, "Service Unavailable - All Trunks Busy".into()));
                self.fail_a(now, id, code, &reason, media);
                return;
            };
            let Some(trunk) = self.cfg.trunks.get(t) else { continue };
            if self.active[t] >= trunk.max_calls {
                continue;
            }
            if call.trunk != usize::MAX {
                self.stats.failovers += 1;
                metrics::counter!("pinhole_b2bua_failovers_total").increment(1);
                let old = call.trunk;
                self.active[old] = self.active[old].saturating_sub(1);
                self.publish_active(old);
            }
            let Some(call) = self.calls.get_mut(&id) else { return };
            call.trunk = t;
            call.b_auth_answered = false;
            call.b_provisional = false;
            self.active[t] += 1;
            self.publish_active(t);
            self.send_b_invite(now, id, media, None);
            return;
        }
    }

    /// Sends the B leg's INVITE (again, with `auth` credentials after a challenge).
    fn send_b_invite<M: MediaAnchor>(
        &mut self,
        now: Instant,
        id: u64,
        media: &mut M,
        auth: Option<(&'static str, String)>,
    ) {
        let branch = format!("{BRANCH_PREFIX}{}", self.random_hex(8));
        let Some(call) = self.calls.get(&id) else { return };
        let number = crate::proxy::request_user(&call.a_invite).unwrap_or_default();
        // Where the B leg goes: the DID user's binding, or the trunk.
        let (transport, remote, ruri, to_uri, routes) = match &call.inbound {
            Some(c) => (c.flow.transport, c.flow.remote, c.uri.clone(), format!("<sip:{}>", c.aor), c.routes.clone()),
            None => {
                let trunk = &self.cfg.trunks[call.trunk];
                let host = host_port(trunk.address);
                let ruri = format!("sip:{number}@{host}");
                (trunk.transport, trunk.address, ruri, format!("<sip:{number}@{host}>"), Vec::new())
            }
        };
        let Some(iface) = self.interface_for(transport).cloned() else {
            self.fail_a(now, id, 503, "Service Unavailable - No Interface For Trunk Transport", media);
            return;
        };
        let conn = call.inbound.as_ref().and_then(|c| c.flow.conn);
        let flow = Flow { transport, local: iface.bind, remote, conn };
        let caller = call.identity.clone();
        let our = iface.host_port();
        let body = match sdp_body(&call.a_invite) {
            Some(sdp) => {
                let ip = call.a_flow.remote.ip();
                match media.anchor_sdp(
                    now,
                    &hidden(&call.a.call_id, &call.a.remote_tag, sdp, (ip, Some(remote.ip())), call.record),
                ) {
                    Ok(b) => Some(b),
                    Err(Unanchored::Waiting) => {
                        if !self.wait_for_media(id, Resume::BInvite(auth)) {
                            self.fail_a(now, id, 503, "Service Unavailable - Media Relay Backlog", media);
                        }
                        return;
                    }
                    Err(Unanchored::Refused(r)) => {
                        self.fail_a(now, id, r.code, &r.reason, media);
                        return;
                    }
                }
            }
            None => None,
        };
        let Some(call) = self.calls.get_mut(&id) else { return };
        call.b.local_cseq += 1;
        call.b.local_uri = format!("<sip:{caller}@{}>;tag={}", iface.advertise, call.b.local_tag);
        call.b.remote_uri = to_uri;
        call.b.target = ruri.clone();
        call.b.routes = routes;
        call.b.flow = Some(flow);
        let mut copied = copied_headers(&call.a_invite, &self.cfg.copy_headers);
        if !call.trusted_caller {
            copied.retain(|h| {
                !IDENTITY_HEADERS.iter().any(|i| h.len() > i.len() && h[..i.len()].eq_ignore_ascii_case(i))
            });
        }
        if call.inbound.is_none() && !call.trusted_caller {
            copied.push(format!("P-Asserted-Identity: <sip:{caller}@{}>", iface.advertise));
        }
        if call.inbound.is_none() {
            copied.push(format!("Session-Expires: {};refresher=uac", self.cfg.session_expires.as_secs()));
            copied.push(format!("Min-SE: {}", MIN_SE.as_secs()));
            // Session timers and reliable provisionals are ours on this leg.
            match copied.iter_mut().find(|h| h.to_ascii_lowercase().starts_with("supported:")) {
                None => copied.push("Supported: timer, 100rel".into()),
                Some(h) => {
                    for ext in ["timer", "100rel"] {
                        if !h.to_ascii_lowercase().split([':', ',']).any(|v| v.trim() == ext) {
                            h.push_str(&format!(", {ext}"));
                        }
                    }
                }
            }
        }
        call.b_sdp = body.clone();
        let req = RequestSpec {
            method: "INVITE",
            uri: &ruri,
            via: &format!("SIP/2.0/{} {our};branch={branch};rport", flow.transport.via_token()),
            from: &call.b.local_uri,
            to: &call.b.remote_uri,
            call_id: &call.b.call_id,
            cseq: call.b.local_cseq,
            contact: Some(&format!("<sip:{our}{}>", transport_param(flow.transport))),
            routes: &call.b.routes,
            extra: &[copied, auth.iter().map(|(h, v)| format!("{h}: {v}")).collect()].concat(),
            body: body.as_deref().map(|b| (b, "application/sdp")),
        }
        .build();
        let Ok(sent) = Message::parse(Bytes::from(req.clone())) else {
            // Never a slot held by a call that sent nothing.
            self.fail_a(now, id, 500, "Server Internal Error - Trunk Request Could Not Be Built", media);
            return;
        };
        call.b_invite = Some(sent);
        self.by_call_id.insert(call.b.call_id.clone(), (id, Leg::B));
        self.start_client(now, branch, id, Purpose::Invite, flow, req, true);
    }

    #[allow(clippy::too_many_arguments)]
    fn start_client(
        &mut self,
        now: Instant,
        branch: String,
        call: u64,
        purpose: Purpose,
        flow: Flow,
        bytes: Vec<u8>,
        invite: bool,
    ) {
        self.out.push_back(Transmit { flow, payload: bytes.clone() });
        let retransmit = (flow.transport == Transport::Udp).then_some((now + T1, T1));
        let deadline = now + TIMEOUT_64T1;
        if let Some((at, _)) = retransmit {
            self.timers.push(Reverse((at, Timer::Client(branch.clone()))));
        }
        self.timers.push(Reverse((deadline, Timer::Client(branch.clone()))));
        self.clients.insert(
            branch.clone(),
            ClientTx { call, purpose, bytes, flow, invite, retransmit, deadline, answered: false },
        );
        if let Some(c) = self.calls.get_mut(&call) {
            c.clients.push(branch);
        }
    }

    /// A final error to the phone's INVITE; the call ends.
    fn fail_a<M: MediaAnchor>(&mut self, now: Instant, id: u64, code: u16, reason: &str, media: &mut M) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        if call.phase != Phase::Calling {
            return;
        }
        let resp = call.a_invite.response(code, reason, Some(&call.a.local_tag), &[]);
        call.a_last = Some(resp.clone());
        call.final_code = Some(code);
        self.out.push_back(Transmit { flow: call.a_flow, payload: resp });
        self.end_call(now, id, "callee", media);
    }

    fn reply_stateless(&mut self, flow: Flow, msg: &Message, code: u16, reason: &str) {
        self.out.push_back(Transmit { flow, payload: msg.response(code, reason, Some("pbrefused"), &[]) });
    }

    /// The call is over: media released, records written, state kept a little for
    /// retransmissions (32 s), then forgotten.
    fn end_call<M: MediaAnchor>(&mut self, now: Instant, id: u64, who: &'static str, media: &mut M) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        if call.phase == Phase::Ended {
            return;
        }
        call.phase = Phase::Ended;
        call.ended = Some(now);
        call.hangup.get_or_insert(who);
        call.a_2xx_at = None;
        let media_path = media.path(&call.a.call_id, now).unwrap_or("none");
        let quality = media.quality(&call.a.call_id);
        let (packets, bytes) = media.release_counting(&call.a.call_id).unwrap_or((0, 0));
        let outcome = if call.answered.is_some() {
            "answered"
        } else if call.cancelled {
            "cancelled"
        } else if call.trunk == usize::MAX && call.final_code == Some(503) {
            "limited"
        } else {
            "failed"
        };
        metrics::counter!("pinhole_b2bua_calls_total", "outcome" => outcome).increment(1);
        let trunk_index = call.trunk;
        if trunk_index != usize::MAX {
            self.active[trunk_index] = self.active[trunk_index].saturating_sub(1);
            self.publish_active(trunk_index);
        }
        let Some(call) = self.calls.get_mut(&id) else { return };
        let trunk = self.cfg.trunks.get(call.trunk).map(|t| t.name.clone()).unwrap_or_default();
        let record = CallRecord {
            a_call_id: call.a.call_id.clone(),
            b_call_id: call.b.call_id.clone(),
            caller: call.identity.clone(),
            callee: crate::proxy::request_user(&call.a_invite).unwrap_or_default(),
            trunk,
            answer_ms: call.answered.map(|t| t.duration_since(call.started).as_millis() as u64),
            duration_ms: now.duration_since(call.started).as_millis() as u64,
            hangup: call.hangup.unwrap_or(who),
            code: call.final_code.unwrap_or(0),
            packets,
            bytes,
            media_path,
            quality,
        };
        self.events.push_back(B2buaEvent::CallRecord(record));
        self.timers.push(Reverse((now + TIMEOUT_64T1, Timer::Call(id))));
    }

    /// A request of one of our calls (or its CANCEL / ACK).
    pub fn on_request<M: MediaAnchor>(&mut self, now: Instant, flow: Flow, msg: Message, media: &mut M) {
        let Some(&(id, leg)) = msg.call_id().and_then(|c| self.by_call_id.get(c)) else { return };
        let Some(method) = msg.method().cloned() else { return };
        let Some(call) = self.calls.get_mut(&id) else { return };
        tracing::debug!(?leg, method = method.as_str(), phase = ?call.phase, "trunk call request");
        if !call.belongs(leg, &flow, &msg) {
            // Knowing a Call-ID is not enough: the request must come from that leg's party
            // and name its dialog's tags.
            if method != Method::Ack {
                let resp = msg.response(481, "Call/Transaction Does Not Exist", None, &[]);
                self.out.push_back(Transmit { flow, payload: resp });
            }
            return;
        }
        match (leg, &method) {
            (Leg::A, Method::Invite) if msg.tag(HeaderName::To).is_none() => {
                // The phone's INVITE again: our last answer again.
                if let Some(r) = call.a_last.clone() {
                    self.out.push_back(Transmit { flow, payload: r });
                }
            }
            (Leg::A, Method::Ack) => {
                if call.phase == Phase::Answered && msg.tag(HeaderName::To) == Some(call.a.local_tag.as_str()) {
                    call.phase = Phase::Confirmed;
                    call.a_2xx_at = None;
                }
                // An ACK for our error response ends the transaction: nothing to do.
            }
            (Leg::A, Method::Cancel) => {
                self.out.push_back(Transmit { flow, payload: msg.response(200, "OK", Some(&call.a.local_tag), &[]) });
                if call.phase == Phase::Calling {
                    call.cancelled = true;
                    call.hangup = Some("caller");
                    if call.b_provisional {
                        self.cancel_b(now, id);
                    }
                    self.fail_a(now, id, 487, "Request Terminated", media);
                }
            }
            (_, Method::Ack) => {
                // The carrier's ACK for a re-INVITE we answered: absorbed.
            }
            (_, Method::Bye) => {
                let resp = msg.response(200, "OK", None, &[]);
                self.out.push_back(Transmit { flow, payload: resp });
                if call.phase == Phase::Ended {
                    return;
                }
                let early = call.phase == Phase::Calling;
                call.hangup = Some(if leg == Leg::A { "caller" } else { "callee" });
                if early && leg == Leg::A {
                    // A BYE before the answer (an early dialog): treat as a CANCEL.
                    call.cancelled = true;
                    if call.b_provisional {
                        self.cancel_b(now, id);
                    }
                    self.fail_a(now, id, 487, "Request Terminated", media);
                    return;
                }
                self.send_bye(now, id, leg.other());
                self.end_call(now, id, if leg == Leg::A { "caller" } else { "callee" }, media);
            }
            (_, Method::Refer) => {
                // Transfers across the B2BUA are not carried (yet): say so.
                let resp = msg.response(501, "Not Implemented - REFER Across Trunk Calls", None, &[]);
                self.out.push_back(Transmit { flow, payload: resp });
            }
            _ if call.phase == Phase::Confirmed || call.phase == Phase::Answered => {
                if leg == Leg::B && matches!(method, Method::Invite | Method::Update) {
                    call.refreshed = now;
                }
                self.bridge_request(now, id, leg, flow, msg, media);
            }
            _ => {
                let resp = msg.response(491, "Request Pending", None, &[]);
                self.out.push_back(Transmit { flow, payload: resp });
            }
        }
    }

    /// CANCEL for the B leg's INVITE.
    fn cancel_b(&mut self, now: Instant, id: u64) {
        let Some(call) = self.calls.get(&id) else { return };
        let (Some(invite), Some(flow)) = (&call.b_invite, call.b.flow) else { return };
        let bytes = hop_request(invite, "CANCEL", None);
        let branch = invite.branch().unwrap_or_default().to_owned();
        // A CANCEL shares its INVITE's branch; its transaction is keyed apart.
        self.start_client(now, format!("{branch}:cancel"), id, Purpose::Own, flow, bytes, false);
    }

    /// Our own BYE on leg `leg`.
    fn send_bye(&mut self, now: Instant, id: u64, leg: Leg) {
        if let Some((branch, bytes, flow)) = self.dialog_request(id, leg, "BYE", None, &[], None) {
            self.start_client(now, branch, id, Purpose::Own, flow, bytes, false);
        }
    }

    /// A request on leg `leg`'s dialog, with CSeq `cseq` (or our next one): its branch,
    /// bytes and flow.
    fn dialog_request(
        &mut self,
        id: u64,
        leg: Leg,
        method: &str,
        cseq: Option<u32>,
        extra: &[String],
        body: Option<(&[u8], &str)>,
    ) -> Option<(String, Vec<u8>, Flow)> {
        let branch = format!("{BRANCH_PREFIX}{}", self.random_hex(8));
        let call = self.calls.get_mut(&id)?;
        let d = match leg {
            Leg::A => &mut call.a,
            Leg::B => &mut call.b,
        };
        let flow = d.flow?;
        let cseq = cseq.unwrap_or_else(|| {
            d.local_cseq += 1;
            d.local_cseq
        });
        let our = self.interfaces.iter().find(|i| i.transport == flow.transport)?.host_port();
        let bytes = RequestSpec {
            method,
            uri: &d.target,
            via: &format!("SIP/2.0/{} {our};branch={branch};rport", flow.transport.via_token()),
            from: &d.local_uri,
            to: &d.remote_uri,
            call_id: &d.call_id,
            cseq,
            contact: Some(&format!("<sip:{our}{}>", transport_param(flow.transport))),
            routes: &d.routes,
            extra,
            body,
        }
        .build();
        Some((branch, bytes, flow))
    }

    /// An in-dialog request from `leg` carried to the other leg, SDP anchored; its
    /// response comes back the same way.
    fn bridge_request<M: MediaAnchor>(
        &mut self,
        now: Instant,
        id: u64,
        leg: Leg,
        flow: Flow,
        msg: Message,
        media: &mut M,
    ) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        let method = msg.method().map(|m| m.as_str().to_owned()).unwrap_or_default();
        let body = match sdp_body(&msg) {
            Some(sdp) => {
                let tag = if leg == Leg::A { call.a.remote_tag.clone() } else { TRUNK_TAG.to_owned() };
                match media.anchor_sdp(now, &hidden(&call.a.call_id, &tag, sdp, (flow.remote.ip(), None), call.record))
                {
                    Ok(b) => Some((b, "application/sdp".to_owned())),
                    Err(Unanchored::Waiting) => {
                        let busy = msg.response(503, "Service Unavailable - Media Relay Backlog", None, &[]);
                        if !self.wait_for_media(id, Resume::Bridge { leg, flow, msg }) {
                            self.out.push_back(Transmit { flow, payload: busy });
                        }
                        return;
                    }
                    Err(Unanchored::Refused(r)) => {
                        self.out.push_back(Transmit { flow, payload: msg.response(r.code, &r.reason, None, &[]) });
                        return;
                    }
                }
            }
            None if !msg.body_bytes().is_empty() => Some((
                msg.body_bytes().to_vec(),
                msg.header(HeaderName::ContentType).unwrap_or("application/octet-stream").to_owned(),
            )),
            None => None,
        };
        let copied = copied_headers(&msg, &self.cfg.copy_headers);
        let body = body.as_ref().map(|(b, t)| (b.as_slice(), t.as_str()));
        let Some((branch, bytes, out_flow)) = self.dialog_request(id, leg.other(), &method, None, &copied, body) else {
            return;
        };
        let invite = method == "INVITE";
        let purpose = Purpose::Bridged { origin: Box::new(msg), origin_flow: flow, origin_leg: leg };
        self.start_client(now, branch, id, purpose, out_flow, bytes, invite);
    }

    /// A response to one of our requests.
    pub fn on_response<M: MediaAnchor>(&mut self, now: Instant, flow: Flow, msg: Message, media: &mut M) {
        let Some(code) = msg.status() else { return };
        let branch = msg.branch().unwrap_or_default().to_owned();
        let is_cancel = msg.cseq().is_some_and(|(_, m)| m == Method::Cancel);
        let key = if is_cancel { format!("{branch}:cancel") } else { branch };
        let Some(tx) = self.clients.get_mut(&key) else {
            // A 2xx retransmitted after its transaction: our ACK again.
            self.repeat_ack(&msg);
            return;
        };
        tx.retransmit = None;
        if code >= 200 || tx.invite {
            tx.answered = true;
        }
        if tx.invite && code >= 300 {
            // Every final non-2xx to an INVITE is acknowledged within its transaction.
            if let Ok(sent) = Message::parse(Bytes::from(tx.bytes.clone())) {
                let ack = hop_request(&sent, "ACK", msg.header(HeaderName::To));
                self.out.push_back(Transmit { flow: tx.flow, payload: ack });
            }
        }
        let (id, purpose) = (tx.call, tx.purpose.clone());
        if code >= 200 {
            if code >= 300 || !tx.invite {
                self.clients.remove(&key);
            } else {
                tx.deadline = now + TIMEOUT_64T1;
            }
        }
        match purpose {
            Purpose::Invite => self.on_b_invite_response(now, id, flow, msg, media),
            Purpose::Bridged { origin, origin_flow, origin_leg } => {
                self.bridged_response(now, id, &msg, &origin, origin_flow, origin_leg, media)
            }
            Purpose::Own => {}
            Purpose::Refresh => self.on_refresh_response(now, id, &msg, media),
            Purpose::Register(t) => self.on_register_response(now, t, &msg),
            Purpose::Ping(t) => self.on_ping_response(now, t),
        }
    }

    fn repeat_ack(&mut self, msg: &Message) {
        let Some(&(id, Leg::B)) = msg.call_id().and_then(|c| self.by_call_id.get(c)) else { return };
        let Some(call) = self.calls.get(&id) else { return };
        if let (Some(ack), Some(flow)) = (&call.b_ack, call.b.flow) {
            self.out.push_back(Transmit { flow, payload: ack.clone() });
        }
    }

    fn on_b_invite_response<M: MediaAnchor>(&mut self, now: Instant, id: u64, flow: Flow, msg: Message, media: &mut M) {
        let Some(code) = msg.status() else { return };
        let Some(call) = self.calls.get_mut(&id) else { return };
        if msg.call_id() != Some(call.b.call_id.as_str()) {
            return;
        }
        if code < 200 {
            if code > 100 {
                call.b_provisional = true;
                if call.cancelled {
                    self.cancel_b(now, id);
                    return;
                }
                self.prack_if_reliable(now, id, &msg);
                self.relay_provisional(now, id, &msg, media);
            }
            return;
        }
        if code >= 300 {
            if call.cancelled || call.phase != Phase::Calling {
                return;
            }
            let inbound = call.inbound.is_some();
            if (code == 401 || code == 407) && !call.b_auth_answered && !inbound {
                if let Some(auth) = self.answer_challenge(id, &msg) {
                    metrics::counter!("pinhole_b2bua_challenges_answered_total").increment(1);
                    if let Some(call) = self.calls.get_mut(&id) {
                        call.b_auth_answered = true;
                    }
                    self.send_b_invite(now, id, media, Some((auth.0, auth.1)));
                    return;
                }
            }
            if inbound {
                self.fail_a(now, id, code, msg.reason(), media);
                return;
            }
            let (code, reason) = match code {
                401 | 407 => (403, "Forbidden - Trunk Refused Our Credentials".to_owned()),
                408 => (408, "Request Timeout".to_owned()),
                c if c >= 500 => (c, msg.reason().to_owned()),
                c => {
                    self.fail_a(now, id, c, msg.reason(), media);
                    return;
                }
            };
            self.try_next_trunk(now, id, media, Some((code, reason)));
            return;
        }
        // 2xx: the B leg's dialog is set, it gets its ACK, the phone gets the answer.
        if call.cancelled || call.phase == Phase::Ended {
            // Crossed our CANCEL (or the call ended meanwhile): acknowledge it, and hang up
            // once (a retransmitted 2xx only gets the ACK again).
            let first = call.b_ack.is_none();
            self.learn_b_dialog(id, &msg);
            self.ack_b(id, &msg);
            if first {
                self.send_bye(now, id, Leg::B);
            }
            return;
        }
        if call.phase != Phase::Calling {
            // A retransmitted 2xx: the same ACK.
            self.ack_b(id, &msg);
            return;
        }
        self.learn_b_dialog(id, &msg);
        self.ack_b(id, &msg);
        self.answer_a(now, id, flow, &msg, media);
    }

    /// The B leg's 2xx (acknowledged) to the phone, its SDP anchored: the call is answered.
    fn answer_a<M: MediaAnchor>(&mut self, now: Instant, id: u64, flow: Flow, msg: &Message, media: &mut M) {
        let Some(code) = msg.status() else { return };
        let Some(call) = self.calls.get(&id) else { return };
        let body = match sdp_body(msg)
            .map(|sdp| hidden(&call.a.call_id, TRUNK_TAG, sdp, (flow.remote.ip(), None), call.record))
        {
            Some(s) => match media.anchor_sdp(now, &s) {
                Ok(b) => Some(b),
                Err(Unanchored::Waiting) if self.wait_for_media(id, Resume::Answer { flow, msg: msg.clone() }) => {
                    return;
                }
                Err(_) => None,
            },
            None => None,
        };
        let Some(call) = self.calls.get_mut(&id) else { return };
        call.phase = Phase::Answered;
        call.answered = Some(now);
        call.final_code = Some(code);
        call.refreshed = now;
        if call.inbound.is_none() {
            call.session = session_of(msg, self.cfg.session_expires);
            if let Some((interval, _)) = call.session {
                self.timers.push(Reverse((now + interval / 2, Timer::Session(id))));
            }
        }
        let resp = self.a_response(id, code, msg.reason(), msg, body.as_deref());
        if let Some(call) = self.calls.get_mut(&id) {
            call.a_last = Some(resp.clone());
            self.out.push_back(Transmit { flow: call.a_flow, payload: resp });
            if call.a_flow.transport == Transport::Udp {
                call.a_2xx_at = Some((now + T1, T1));
                self.timers.push(Reverse((now + T1, Timer::Call(id))));
            }
            self.timers.push(Reverse((now + TIMEOUT_64T1, Timer::Call(id))));
        }
    }

    /// A reliable provisional (RFC 3262) from the carrier is acknowledged here with a
    /// PRACK in its early dialog: 100rel ends at pinhole on each leg, and the phone gets
    /// the provisional unreliably.
    fn prack_if_reliable(&mut self, now: Instant, id: u64, msg: &Message) {
        let reliable = msg.value_texts(HeaderName::Require).iter().any(|r| r.eq_ignore_ascii_case("100rel"));
        let Some(rseq) = msg.extension_header("RSeq").and_then(|v| v.trim().parse::<u32>().ok()) else { return };
        let Some(cseq) = msg.cseq().map(|(n, _)| n) else { return };
        if !reliable {
            return;
        }
        self.learn_b_dialog(id, msg);
        let rack = [format!("RAck: {rseq} {cseq} INVITE")];
        if let Some((branch, bytes, flow)) = self.dialog_request(id, Leg::B, "PRACK", None, &rack, None) {
            self.start_client(now, branch, id, Purpose::Own, flow, bytes, false);
        }
    }

    /// A 1xx from the trunk to the phone: 180 once (a later trunk's ringing is not
    /// repeated), 183 with its SDP anchored whenever it comes.
    fn relay_provisional<M: MediaAnchor>(&mut self, now: Instant, id: u64, msg: &Message, media: &mut M) {
        let Some(code) = msg.status() else { return };
        let Some(call) = self.calls.get(&id) else { return };
        let from = call.b.flow.map_or(call.a_flow.remote.ip(), |f| f.remote.ip());
        let body = match sdp_body(msg).map(|sdp| hidden(&call.a.call_id, TRUNK_TAG, sdp, (from, None), call.record)) {
            Some(s) => match media.anchor_sdp(now, &s) {
                Ok(b) => Some(b),
                Err(Unanchored::Waiting) if self.wait_for_media(id, Resume::Provisional(msg.clone())) => return,
                Err(_) => None,
            },
            None => None,
        };
        let Some(call) = self.calls.get_mut(&id) else { return };
        if body.is_none() && call.ringing_sent {
            return;
        }
        call.ringing_sent = true;
        let resp = self.a_response(id, code, msg.reason(), msg, body.as_deref());
        if let Some(call) = self.calls.get_mut(&id) {
            call.a_last = Some(resp.clone());
            self.out.push_back(Transmit { flow: call.a_flow, payload: resp });
        }
    }

    /// A response to the phone's INVITE: its own Via/From/To/Call-ID/CSeq, our tag and
    /// Contact, allowed headers from the trunk's response, and `body` (anchored SDP).
    fn a_response(&self, id: u64, code: u16, reason: &str, from: &Message, body: Option<&[u8]>) -> Vec<u8> {
        let Some(call) = self.calls.get(&id) else { return Vec::new() };
        let our = self.interface_for(call.a_flow.transport).map(Interface::host_port).unwrap_or_default();
        let mut extra = vec![format!("Contact: <sip:{our}{}>", transport_param(call.a_flow.transport))];
        extra.extend(copied_headers(from, &self.cfg.copy_headers));
        response_with_body(
            &call.a_invite,
            code,
            reason,
            &call.a.local_tag,
            &extra,
            body.map(|b| (b, "application/sdp")),
        )
    }

    /// The B leg's dialog from its 2xx: the carrier's tag, Contact and Record-Route.
    fn learn_b_dialog(&mut self, id: u64, msg: &Message) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        if let Some(tag) = msg.tag(HeaderName::To) {
            call.b.remote_tag = tag.to_owned();
            call.b.remote_uri = msg.header(HeaderName::To).unwrap_or("").to_owned();
        }
        if let Some(c) = contact_uri(msg) {
            call.b.target = c;
        }
        call.b.routes = msg.value_texts(HeaderName::RecordRoute).into_iter().rev().map(str::to_owned).collect();
    }

    /// ACK for the B leg's 2xx (a new transaction of its own, §13.2.2.4).
    fn ack_b(&mut self, id: u64, msg: &Message) {
        let cseq = msg.cseq().map(|(n, _)| n);
        if let Some((_, bytes, flow)) = self.dialog_request(id, Leg::B, "ACK", cseq, &[], None) {
            if let Some(call) = self.calls.get_mut(&id) {
                call.b_ack = Some(bytes.clone());
            }
            self.out.push_back(Transmit { flow, payload: bytes });
        }
    }

    /// A response to a request we carried across: to the request's sender, as the answer
    /// to its own request, SDP anchored. A 2xx to a re-INVITE is acknowledged on our side.
    #[allow(clippy::too_many_arguments)]
    fn bridged_response<M: MediaAnchor>(
        &mut self,
        now: Instant,
        id: u64,
        msg: &Message,
        origin: &Message,
        origin_flow: Flow,
        origin_leg: Leg,
        media: &mut M,
    ) {
        let Some(code) = msg.status() else { return };
        if code == 100 {
            return;
        }
        let invite = origin.method() == Some(&Method::Invite);
        if invite && (200..300).contains(&code) {
            let cseq = msg.cseq().map(|(n, _)| n);
            if let Some((_, bytes, flow)) = self.dialog_request(id, origin_leg.other(), "ACK", cseq, &[], None) {
                self.out.push_back(Transmit { flow, payload: bytes });
            }
        }
        self.relay_bridged_response(now, id, msg, origin, origin_flow, origin_leg, media);
    }

    /// The response to a request carried across, its SDP anchored, to the request's sender.
    #[allow(clippy::too_many_arguments)]
    fn relay_bridged_response<M: MediaAnchor>(
        &mut self,
        now: Instant,
        id: u64,
        msg: &Message,
        origin: &Message,
        origin_flow: Flow,
        origin_leg: Leg,
        media: &mut M,
    ) {
        let Some(code) = msg.status() else { return };
        let Some(call) = self.calls.get(&id) else { return };
        let tag = if origin_leg == Leg::A { TRUNK_TAG.to_owned() } else { call.a.remote_tag.clone() };
        let body = match sdp_body(msg)
            .map(|sdp| hidden(&call.a.call_id, &tag, sdp, (origin_flow.remote.ip(), None), call.record))
        {
            Some(s) => match media.anchor_sdp(now, &s) {
                Ok(b) => Some(b),
                Err(Unanchored::Waiting) => {
                    let resume =
                        Resume::Bridged { msg: msg.clone(), origin: Box::new(origin.clone()), origin_flow, origin_leg };
                    if self.wait_for_media(id, resume) {
                        return;
                    }
                    None
                }
                Err(_) => None,
            },
            None => None,
        };
        let Some(call) = self.calls.get(&id) else { return };
        let local_tag = if origin_leg == Leg::A { call.a.local_tag.clone() } else { call.b.local_tag.clone() };
        let our = self.interface_for(origin_flow.transport).map(Interface::host_port).unwrap_or_default();
        let extra = vec![format!("Contact: <sip:{our}{}>", transport_param(origin_flow.transport))];
        let body = body.as_deref().map(|b| (b, "application/sdp"));
        let resp = response_with_body(origin, code, msg.reason(), &local_tag, &extra, body);
        self.out.push_back(Transmit { flow: origin_flow, payload: resp });
    }

    /// Answers a 401/407 to a call's INVITE with the trunk's credentials: the header to add.
    fn answer_challenge(&mut self, id: u64, msg: &Message) -> Option<(&'static str, String)> {
        let call = self.calls.get(&id)?;
        let (trunk, uri) = (call.trunk, call.b.target.clone());
        self.credentials_for(trunk, msg, "INVITE", &uri)
    }

    /// The trunk's credentials answering the challenge in `msg` for `method` on `uri`.
    fn credentials_for(
        &mut self,
        trunk: usize,
        msg: &Message,
        method: &str,
        uri: &str,
    ) -> Option<(&'static str, String)> {
        let cnonce = self.random_hex(8);
        let trunk = self.cfg.trunks.get(trunk)?;
        let (challenge_header, answer_header) = if msg.status() == Some(407) {
            ("Proxy-Authenticate", "Proxy-Authorization")
        } else {
            ("WWW-Authenticate", "Authorization")
        };
        let values: Vec<&str> = msg.extension_headers(challenge_header).map(|(_, r)| msg.text(r)).collect();
        // The strongest algorithm offered that we speak.
        let parsed: Vec<ParsedChallenge> = values.iter().filter_map(|v| ParsedChallenge::parse(v)).collect();
        let best = parsed.iter().find(|c| c.algorithm == Algorithm::Sha256).or(parsed.first())?;
        let challenge = Challenge { realm: &best.realm, nonce: &best.nonce, algorithm: best.algorithm };
        let mut creds = Credentials::answering(&challenge, &trunk.username, &trunk.password, method, uri, 1, &cnonce);
        if !best.qop_auth {
            creds.qop = None;
            creds.nc = None;
            creds.cnonce = None;
            creds.response = crate::auth::digest_response(
                best.algorithm,
                &trunk.username,
                &best.realm,
                &trunk.password,
                method,
                &creds,
            );
        }
        let mut value = creds.header_value();
        if let Some(o) = &best.opaque {
            value.push_str(&format!(", opaque=\"{o}\""));
        }
        Some((answer_header, value))
    }

    pub fn handle_timeout<M: MediaAnchor>(&mut self, now: Instant, media: &mut M) {
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, timer))) = self.timers.pop() else { break };
            match timer {
                Timer::Client(branch) => self.client_timer(now, &branch, media),
                Timer::Call(id) => self.call_timer(now, id, media),
                Timer::Session(id) => self.session_timer(now, id, media),
                Timer::Ring(id) => self.ring_timer(now, id, media),
                Timer::Register(t) => self.register(now, t, None),
                Timer::Ping(t) => self.ping(now, t),
            }
        }
    }

    fn client_timer<M: MediaAnchor>(&mut self, now: Instant, key: &str, media: &mut M) {
        let Some(tx) = self.clients.get_mut(key) else { return };
        if now >= tx.deadline {
            let tx = self.clients.remove(key).expect("present");
            if tx.answered {
                return; // an INVITE's 2xx window closed
            }
            match tx.purpose {
                Purpose::Invite => {
                    // Timer B: no answer from this trunk; the next one, or 408.
                    if let Some(call) = self.calls.get(&tx.call) {
                        if call.phase == Phase::Calling && !call.cancelled {
                            self.try_next_trunk(now, tx.call, media, Some((408, "Request Timeout".into())));
                        }
                    }
                }
                Purpose::Bridged { origin, origin_flow, .. } => {
                    let resp = origin.response(408, "Request Timeout", None, &[]);
                    self.out.push_back(Transmit { flow: origin_flow, payload: resp });
                    if origin.method() == Some(&Method::Invite) {
                        self.send_bye(now, tx.call, Leg::A);
                        self.send_bye(now, tx.call, Leg::B);
                        self.end_call(now, tx.call, "timeout", media);
                    }
                }
                Purpose::Own => {}
                Purpose::Refresh => self.leg_died(now, tx.call, Leg::B, media),
                Purpose::Register(t) => self.registration_failed(now, t, "timeout"),
                Purpose::Ping(t) => self.ping_failed(now, t),
            }
            return;
        }
        if let Some((at, interval)) = tx.retransmit {
            if now >= at {
                self.out.push_back(Transmit { flow: tx.flow, payload: tx.bytes.clone() });
                let next = if tx.invite { interval * 2 } else { (interval * 2).min(T2) };
                tx.retransmit = Some((now + next, next));
                self.timers.push(Reverse((now + next, Timer::Client(key.to_owned()))));
            }
        }
    }

    /// The ring timeout: a call still unanswered is given up, its trunk leg cancelled and
    /// its slot freed.
    fn ring_timer<M: MediaAnchor>(&mut self, now: Instant, id: u64, media: &mut M) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        if call.phase != Phase::Calling {
            return;
        }
        call.hangup = Some("timeout");
        metrics::counter!("pinhole_b2bua_ring_timeouts_total").increment(1);
        if call.b_provisional {
            self.cancel_b(now, id);
        }
        self.fail_a(now, id, 408, "Request Timeout - No Answer Within The Ring Timeout", media);
    }

    /// The trunk leg's session timer: our refresh is due, or the carrier's is overdue.
    fn session_timer<M: MediaAnchor>(&mut self, now: Instant, id: u64, media: &mut M) {
        let Some(call) = self.calls.get(&id) else { return };
        let Some((interval, we_refresh)) = call.session else { return };
        if !matches!(call.phase, Phase::Answered | Phase::Confirmed) {
            return;
        }
        if we_refresh {
            let body = call.b_sdp.clone();
            let extra = [format!("Session-Expires: {};refresher=uac", interval.as_secs())];
            let body = body.as_deref().map(|b| (b, "application/sdp"));
            if let Some((branch, bytes, flow)) = self.dialog_request(id, Leg::B, "INVITE", None, &extra, body) {
                self.start_client(now, branch, id, Purpose::Refresh, flow, bytes, true);
            }
            self.timers.push(Reverse((now + interval / 2, Timer::Session(id))));
            return;
        }
        // The carrier refreshes: it must have by the interval less a margin (§10).
        let deadline = call.refreshed + interval - (interval / 3).min(Duration::from_secs(32));
        if now >= deadline {
            self.leg_died(now, id, Leg::B, media);
        } else {
            self.timers.push(Reverse((deadline, Timer::Session(id))));
        }
    }

    fn on_refresh_response<M: MediaAnchor>(&mut self, now: Instant, id: u64, msg: &Message, media: &mut M) {
        let Some(code) = msg.status() else { return };
        if (200..300).contains(&code) {
            let cseq = msg.cseq().map(|(n, _)| n);
            if let Some((_, bytes, flow)) = self.dialog_request(id, Leg::B, "ACK", cseq, &[], None) {
                self.out.push_back(Transmit { flow, payload: bytes });
            }
            if let Some(call) = self.calls.get_mut(&id) {
                call.refreshed = now;
            }
        } else if code == 408 || code == 481 {
            // The carrier has forgotten the call (RFC 4028 §10).
            self.leg_died(now, id, Leg::B, media);
        }
    }

    /// Leg `dead` is gone (refresh unanswered, session expired): the other leg gets a BYE
    /// and the call ends. The dead leg gets one too, in case it is only deaf.
    fn leg_died<M: MediaAnchor>(&mut self, now: Instant, id: u64, dead: Leg, media: &mut M) {
        let Some(call) = self.calls.get(&id) else { return };
        if call.phase == Phase::Ended {
            return;
        }
        tracing::info!(call_id = %call.a.call_id, leg = ?dead, "trunk call leg died");
        self.send_bye(now, id, dead.other());
        self.send_bye(now, id, dead);
        self.end_call(now, id, "session-timer", media);
    }

    /// The relay ended a call on its own (no media): both legs get a BYE.
    pub fn media_ended<M: MediaAnchor>(&mut self, now: Instant, call_id: &str, media: &mut M) {
        let Some(&(id, _)) = self.by_call_id.get(call_id) else { return };
        let Some(call) = self.calls.get(&id) else { return };
        if matches!(call.phase, Phase::Answered | Phase::Confirmed) {
            self.send_bye(now, id, Leg::A);
            self.send_bye(now, id, Leg::B);
            self.end_call(now, id, "media-timeout", media);
        }
    }

    fn call_timer<M: MediaAnchor>(&mut self, now: Instant, id: u64, media: &mut M) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        if call.phase == Phase::Ended {
            if call.ended.is_some_and(|e| now >= e + TIMEOUT_64T1) {
                let call = self.calls.remove(&id).expect("present");
                self.by_call_id.remove(&call.a.call_id);
                self.by_call_id.remove(&call.b.call_id);
                for key in &call.clients {
                    self.clients.remove(key);
                }
            }
            return;
        }
        if call.phase == Phase::Answered {
            if now >= call.answered.unwrap_or(now) + TIMEOUT_64T1 {
                // The phone never acknowledged the answer: hang up both legs.
                self.send_bye(now, id, Leg::B);
                self.send_bye(now, id, Leg::A);
                self.end_call(now, id, "timeout", media);
                return;
            }
            if let Some((at, interval)) = call.a_2xx_at {
                if now >= at {
                    if let Some(r) = call.a_last.clone() {
                        self.out.push_back(Transmit { flow: call.a_flow, payload: r });
                    }
                    let next = (interval * 2).min(T2);
                    call.a_2xx_at = Some((now + next, next));
                    self.timers.push(Reverse((now + next, Timer::Call(id))));
                }
            }
        }
    }
}

/// The session timer a 2xx agreed (RFC 4028): its interval, and whether we (the UAC)
/// refresh. A 2xx without Session-Expires runs none.
fn session_of(msg: &Message, asked: Duration) -> Option<(Duration, bool)> {
    let v = msg.extension_header("Session-Expires").or_else(|| msg.extension_header("x"))?;
    let mut parts = v.split(';');
    let secs: u64 = parts.next()?.trim().parse().ok()?;
    let refresher = parts.find_map(|p| p.trim().strip_prefix("refresher=")).unwrap_or("uac");
    let interval = Duration::from_secs(secs).clamp(MIN_SE, asked.max(MIN_SE));
    Some((interval, refresher.trim().eq_ignore_ascii_case("uac")))
}

/// The sender tag the relay knows the trunk leg's SDP by.
const TRUNK_TAG: &str = "pinhole-trunk-leg";

/// The caller a trusted network or a trunk names in its From: the user part, when it is
/// [`dialable`]; otherwise `anonymous` (never a display name, never anything that could
/// break the From we write).
fn from_identity(msg: &Message) -> String {
    use ezk_sip_types::uri::SipUriUserPart;
    msg.name_addr(HeaderName::From)
        .and_then(|na| match &na.uri.user_part {
            SipUriUserPart::User(u) => Some(u.to_string()),
            SipUriUserPart::UserPw(up) => Some(up.user.to_string()),
            SipUriUserPart::Empty => None,
        })
        .filter(|u| dialable(u))
        .unwrap_or_else(|| "anonymous".to_owned())
}

fn strip_tag(name_addr: &str) -> &str {
    match param_of_name_addr(name_addr, "tag") {
        Some(_) => name_addr.split(";tag=").next().unwrap_or(name_addr),
        None => name_addr,
    }
}

/// A leg's SDP to anchor with the sender's address hidden everywhere (its `o=` line too):
/// neither side of a B2BUA call learns the other's.
fn hidden<'a>(
    call_id: &'a str,
    sender_tag: &'a str,
    sdp: &'a [u8],
    (from, to): (IpAddr, Option<IpAddr>),
    record: bool,
) -> SdpIn<'a> {
    SdpIn { call_id, sender_tag, sdp, signalling_ip: from, to, hide: true, to_browser: false, record }
}
