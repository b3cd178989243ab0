//! The stateful proxy core (RFC 3261 §16) with its transactions (§17), registrar and
//! digest authentication, as one sans-IO state machine.
//!
//! Call [`Proxy::handle_input`] for every message received, [`Proxy::handle_timeout`]
//! when [`Proxy::poll_timeout`] comes due, then drain [`Proxy::poll_transmit`].

use std::cmp::Reverse;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ezk_sip_types::host::Host;
use ezk_sip_types::uri::{SipUri, SipUriUserPart};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
mod budget;
mod dialogs;
mod media;

use budget::ReplyBudget;
use dialogs::{decode_token, encode_token, DialogFlows, DialogTable};

use pinhole_media::anchor::MediaAnchor;

use crate::auth::{Authenticator, Verdict};
use crate::message::{Editor, Garbage, HeaderName, Message, Method, Rejection};
use crate::registrar::{Binding, KeepalivePolicy, Registrar, RegistrarConfig};
use crate::transport::{Flow, Transmit, Transport};

/// RFC 3261 §17.1.1.1 timer values.
pub const T1: Duration = Duration::from_millis(500);
pub const T2: Duration = Duration::from_secs(4);
pub const T4: Duration = Duration::from_secs(5);
/// 64·T1: timers B, F, H, J and the RFC 6026 Accepted-state timers L and M.
pub const TIMEOUT_64T1: Duration = Duration::from_secs(32);
/// Timer C (§16.6 step 11): how long an INVITE branch may ring.
pub const TIMER_C: Duration = Duration::from_secs(180);
/// Consecutive failed keepalives after which a binding is dropped.
pub const KEEPALIVE_MAX_FAILURES: u32 = 3;

const BRANCH_PREFIX: &str = "z9hG4bKph";

/// An address pinhole listens on, and the host it puts in Via and Record-Route.
#[derive(Debug, Clone)]
pub struct Interface {
    pub transport: Transport,
    pub bind: SocketAddr,
    pub advertise: String,
}

impl Interface {
    fn host_port(&self) -> String {
        let host = if self.advertise.contains(':') && !self.advertise.starts_with('[') {
            format!("[{}]", self.advertise)
        } else {
            self.advertise.clone()
        };
        format!("{host}:{}", self.bind.port())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keepalive {
    Options,
    Crlf,
    Off,
}

/// A CIDR block of trusted sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub domain: String,
    pub interfaces: Vec<Interface>,
    pub realm: String,
    pub users: Vec<(String, String)>,
    /// Digest algorithms offered, in challenge order.
    pub auth_algorithms: Vec<crate::auth::Algorithm>,
    pub trusted: Vec<Cidr>,
    pub registrar: RegistrarConfig,
    pub keepalive: Keepalive,
    /// Keepalive interval a binding starts with.
    pub keepalive_interval: Duration,
    /// The floor a binding's interval is halved towards each time its NAT mapping dies.
    pub keepalive_min: Duration,
    pub max_body: usize,
    /// Largest message accepted; larger requests get 513.
    pub max_message: usize,
    /// Keys nonces and Record-Route flow tokens; keep it across restarts.
    pub secret: [u8; 32],
}

/// Counters the shell exports as metrics.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub garbage: u64,
    pub unmatched_responses: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SState {
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
}

struct ServerTx {
    invite: bool,
    flow: Flow,
    request: Message,
    state: SState,
    last_response: Option<Vec<u8>>,
    retransmit_at: Option<Instant>,
    interval: Duration,
    timeout_at: Option<Instant>,
    cleanup_at: Option<Instant>,
    branches: Vec<String>,
    best: Option<Message>,
    final_sent: bool,
    to_tag: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CState {
    Trying,
    Proceeding,
    Completed,
    Accepted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Server(String),
    /// A request pinhole originates itself (a relay-initiated BYE); responses just end it.
    Local,
    Keepalive {
        aor: String,
        contact: String,
    },
    Cancel,
}

struct ClientTx {
    owner: Owner,
    flow: Flow,
    sent: Message,
    state: CState,
    retransmit_at: Option<Instant>,
    interval: Duration,
    timeout_at: Option<Instant>,
    cleanup_at: Option<Instant>,
    final_code: Option<u16>,
    cancel_requested: bool,
    ack: Option<Vec<u8>>,
    /// The flows our Record-Route named, for a dialog-creating request.
    rr: Option<DialogFlows>,
}

impl ClientTx {
    fn invite(&self) -> bool {
        self.sent.method() == Some(&Method::Invite)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum TimerRef {
    Server(String),
    Client(String),
}

/// Where a request goes next.
struct Target {
    flow: Flow,
    request_uri: Option<String>,
    routes: Vec<String>,
}

/// Our own entries at the top of a request's Route set, and what follows them.
struct RouteInfo {
    /// (header index, value range) of each of our Route values, to strip when forwarding.
    strip: Vec<(usize, std::ops::Range<usize>)>,
    /// The flows named by our token, if its MAC holds for this Call-ID and a tag.
    flows: Option<DialogFlows>,
    remaining: Vec<String>,
}

/// The proxy, generic over where it anchors media (`Option<Relay>` in pinhole: `None`
/// leaves SDP untouched).
pub struct Proxy<M: MediaAnchor> {
    cfg: ProxyConfig,
    auth: Authenticator,
    registrar: Registrar,
    server_txs: HashMap<String, ServerTx>,
    client_txs: HashMap<String, ClientTx>,
    timers: BinaryHeap<Reverse<(Instant, TimerRef)>>,
    out: VecDeque<Transmit>,
    rng: StdRng,
    epoch: Instant,
    unix_epoch: u64,
    next_housekeeping: Instant,
    stats: Stats,
    counters: HashMap<(u16, bool), metrics::Counter>,
    media: M,
    dialogs: HashMap<String, media::Dialog>,
    /// Dialogs seen established through us: what lets a Record-Route token skip a challenge.
    established: DialogTable,
    /// Bytes unauthenticated sources may draw from us (challenges, refusals).
    budget: ReplyBudget,
}

impl<M: MediaAnchor> Proxy<M> {
    /// `unix_now` is the wall clock at `now`, used for registration expiry that survives
    /// restarts; `seed` makes branches and tags reproducible in tests.
    pub fn new(cfg: ProxyConfig, media: M, now: Instant, unix_now: u64, seed: u64) -> Proxy<M> {
        let mut rng = StdRng::seed_from_u64(seed);
        // Random per start: nonces of an earlier run are never accepted again.
        let boot: u64 = rng.gen();
        let auth = Authenticator::new(&cfg.realm, cfg.users.clone(), cfg.secret, boot, now, unix_now)
            .with_algorithms(cfg.auth_algorithms.clone());
        Proxy {
            media,
            dialogs: HashMap::new(),
            established: DialogTable::default(),
            budget: ReplyBudget::default(),
            auth,
            cfg,
            registrar: Registrar::new(),
            server_txs: HashMap::new(),
            client_txs: HashMap::new(),
            timers: BinaryHeap::new(),
            out: VecDeque::new(),
            rng,
            epoch: now,
            unix_epoch: unix_now,
            next_housekeeping: now + Duration::from_secs(1),
            stats: Stats::default(),
            counters: HashMap::new(),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    pub fn registrar_mut(&mut self) -> &mut Registrar {
        &mut self.registrar
    }

    /// The secret keying nonces and Record-Route tokens (persisted by the shell).
    pub fn secret(&self) -> [u8; 32] {
        self.cfg.secret
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn transaction_count(&self) -> usize {
        self.server_txs.len() + self.client_txs.len()
    }

    fn unix(&self, now: Instant) -> u64 {
        self.unix_epoch + now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Next thing to send, if any.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// When [`Proxy::handle_timeout`] should next be called, and why: a transaction timer,
    /// or once a second while there is state to age (bindings, dialogs, failure counts).
    /// `None` when nothing is due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let timer = self.timers.peek().map(|Reverse((t, _))| (*t, "sip transaction timer"));
        let idle = self.registrar.binding_count() == 0
            && self.established.len() == 0
            && self.dialogs.is_empty()
            && self.auth.is_idle()
            && self.budget.is_empty();
        let housekeeping = (!idle).then_some((self.next_housekeeping, "sip housekeeping"));
        match (timer, housekeeping) {
            (Some(t), Some(h)) => Some(if t.0 <= h.0 { t } else { h }),
            (t, h) => t.or(h),
        }
    }

    /// Feeds one received message (a datagram or a frame cut from a stream).
    /// Returns `Err` for input that is not SIP at all: UDP drops it, streams close.
    pub fn handle_input(&mut self, now: Instant, flow: Flow, data: Bytes) -> Result<(), Garbage> {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(g) => {
                self.stats.garbage += 1;
                metrics::counter!("pinhole_sip_garbage_total", "transport" => flow.transport.as_str()).increment(1);
                return Err(g);
            }
        };
        let msg = if flow.transport == Transport::Udp { msg.truncated_to_content_length() } else { msg };
        if msg.is_request() {
            self.on_request(now, flow, msg);
        } else {
            self.on_response(now, flow, msg);
        }
        Ok(())
    }

    /// Fires due timers and housekeeping.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, r))) = self.timers.pop() else {
                break;
            };
            match r {
                TimerRef::Server(k) => self.server_timer(now, &k),
                TimerRef::Client(k) => self.client_timer(now, &k),
            }
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + Duration::from_secs(1);
            self.housekeeping(now);
        }
    }

    // ---------------------------------------------------------------- requests

    fn on_request(&mut self, now: Instant, flow: Flow, msg: Message) {
        let method = msg.method().cloned().unwrap_or(Method::Other(String::new()));
        self.count_request(&method, flow.transport);
        let checked = if msg.raw().len() > self.cfg.max_message {
            Err(Rejection::new(513, "Message Too Large"))
        } else {
            msg.validate_request(self.cfg.max_body)
        };
        if let Err(rej) = checked {
            tracing::debug!(code = rej.code, reason = %rej.reason, "rejecting malformed request");
            if method != Method::Ack && msg.header(HeaderName::Via).is_some() {
                let resp = msg.response(rej.code, &rej.reason, Some(&self.local_tag(&msg)), &[]);
                self.send_response_stateless(flow, resp, rej.code);
            }
            return;
        }
        let branch = msg.branch().unwrap_or_default().to_owned();

        if method == Method::Ack {
            let key = server_key(&branch, &Method::Invite);
            if let Some(st) = self.server_txs.get_mut(&key) {
                if st.state == SState::Completed {
                    st.state = SState::Confirmed;
                    st.retransmit_at = None;
                    st.timeout_at = None;
                    st.cleanup_at = Some(now + if flow.transport == Transport::Udp { T4 } else { Duration::ZERO });
                    self.timers.push(Reverse((st.cleanup_at.unwrap_or(now), TimerRef::Server(key))));
                }
                return;
            }
            self.forward_ack(now, flow, &msg);
            return;
        }
        if method == Method::Cancel {
            self.on_cancel(now, flow, &msg, &branch);
            return;
        }

        let key = server_key(&branch, &method);
        if let Some(st) = self.server_txs.get(&key) {
            // A retransmission: repeat the last response (§17.2.1, §17.2.2).
            if let Some(r) = &st.last_response {
                self.out.push_back(Transmit { flow: st.flow, payload: r.clone() });
            }
            return;
        }

        // Authenticate before any state exists: a challenge is answered statelessly and never
        // retransmitted, so a spoofed request draws one response of about its own size.
        let routing = self.route_info(&msg);
        let in_dialog = self.dialog_vouches(now, flow, &msg, &method, &routing);
        let auth_user = if in_dialog || self.is_trusted(flow.remote.ip()) {
            None
        } else {
            match self.authenticate(now, flow, &msg, &method) {
                Some(user) => Some(user),
                None => return,
            }
        };

        let invite = method == Method::Invite;
        let to_tag = self.local_tag(&msg);
        self.server_txs.insert(
            key.clone(),
            ServerTx {
                invite,
                flow,
                request: msg.clone(),
                state: SState::Proceeding,
                last_response: None,
                retransmit_at: None,
                interval: T1,
                timeout_at: None,
                cleanup_at: None,
                branches: Vec::new(),
                best: None,
                final_sent: false,
                to_tag,
            },
        );
        if invite {
            self.respond(now, &key, 100, "Trying", &[]);
        }
        if in_dialog {
            if let (Some(call_id), Some(from), Some(to)) =
                (msg.call_id(), msg.tag(HeaderName::From), msg.tag(HeaderName::To))
            {
                self.established.touch(now, call_id, from, to);
            }
        }
        self.route_request(now, &key, flow, &msg, &method, routing, auth_user);
    }

    /// Our Route entries at the top of the Route set, and the flows their token names.
    fn route_info(&self, msg: &Message) -> RouteInfo {
        let routes = msg.values(HeaderName::Route);
        let mut strip = Vec::new();
        let mut flows = None;
        let call_id = msg.call_id().unwrap_or("");
        let tags: Vec<&str> = [msg.tag(HeaderName::From), msg.tag(HeaderName::To)].into_iter().flatten().collect();
        for (hi, r) in &routes {
            match self.route_is_us(msg.text(r.clone())) {
                Some(token) => {
                    if flows.is_none() {
                        flows = token.and_then(|t| decode_token(&self.cfg.secret, &t, call_id, &tags));
                    }
                    strip.push((*hi, r.clone()));
                }
                None => break,
            }
        }
        let remaining = routes.iter().skip(strip.len()).map(|(_, r)| msg.text(r.clone()).to_owned()).collect();
        RouteInfo { strip, flows, remaining }
    }

    /// May this request skip authentication? Only an in-dialog request (never a REGISTER)
    /// of a dialog we saw established, whose token names that dialog's flows, arriving on
    /// one of them.
    fn dialog_vouches(&self, now: Instant, flow: Flow, msg: &Message, method: &Method, routing: &RouteInfo) -> bool {
        let (Some(flows), Some(call_id), Some(from), Some(to)) =
            (routing.flows, msg.call_id(), msg.tag(HeaderName::From), msg.tag(HeaderName::To))
        else {
            return false;
        };
        *method != Method::Register
            && self.established.vouches(now, call_id, from, to, flows, |side| self.side_matches(side, flow))
    }

    /// Checks credentials; on failure answers statelessly (challenge or refusal) and
    /// returns `None`.
    fn authenticate(&mut self, now: Instant, flow: Flow, msg: &Message, method: &Method) -> Option<String> {
        let register = *method == Method::Register;
        let header = if register { HeaderName::Authorization } else { HeaderName::ProxyAuthorization };
        let creds = msg.value_texts(header);
        let uri = msg.request_uri().unwrap_or("");
        let verdict = self.auth.verify(now, flow.remote.ip(), method.as_str(), uri, &creds);
        let tag = self.local_tag(msg);
        let (code, reason, extra): (u16, &str, Vec<String>) = match verdict {
            Verdict::Authenticated(u) => return Some(u),
            Verdict::RateLimited => (403, "Forbidden - Too Many Failed Authentication Attempts", vec![]),
            Verdict::UserDelayed(d) => (
                403,
                "Forbidden - Too Many Failed Attempts For This User",
                vec![format!("Retry-After: {}", d.as_secs().max(1))],
            ),
            v => {
                let stale = matches!(v, Verdict::Stale | Verdict::Replayed);
                if v == Verdict::Replayed {
                    metrics::counter!("pinhole_auth_replays_total").increment(1);
                }
                let (code, reason, hname) = if register {
                    (401, "Unauthorized", "WWW-Authenticate")
                } else {
                    (407, "Proxy Authentication Required", "Proxy-Authenticate")
                };
                let hs = self.auth.challenges(now, stale).into_iter().map(|c| format!("{hname}: {c}")).collect();
                (code, reason, hs)
            }
        };
        if code == 403 {
            metrics::counter!("pinhole_auth_refused_total").increment(1);
        }
        let resp = msg.response(code, reason, Some(&tag), &extra);
        if self.budget.allow(now, flow.remote.ip(), msg.raw().len(), resp.len()) {
            self.send_response_stateless(flow, resp, code);
        } else {
            metrics::counter!("pinhole_sip_replies_suppressed_total").increment(1);
        }
        None
    }

    /// The values of `header` carrying credentials for our realm: consumed here, never
    /// forwarded (as Kamailio's `consume_credentials()`).
    fn our_credentials(&self, msg: &Message, header: HeaderName) -> Vec<(usize, std::ops::Range<usize>)> {
        msg.values(header)
            .into_iter()
            .filter(|(_, r)| {
                crate::auth::Credentials::parse(msg.text(r.clone())).is_some_and(|c| c.realm == self.auth.realm())
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn route_request(
        &mut self,
        now: Instant,
        key: &str,
        flow: Flow,
        msg: &Message,
        method: &Method,
        routing: RouteInfo,
        auth_user: Option<String>,
    ) {
        // Max-Forwards (§16.3 step 3).
        if let Some(Ok(0)) = msg.max_forwards() {
            if *method == Method::Options && self.request_uri_is_us(msg) && request_user(msg).is_none() {
                self.respond(now, key, 200, "OK", &self.options_headers());
            } else {
                self.respond(now, key, 483, "Too Many Hops", &[]);
            }
            return;
        }
        // Proxy-Require (§16.3 step 5): pinhole supports no proxy extensions.
        let unsupported: Vec<&str> = msg.value_texts(HeaderName::ProxyRequire);
        if !unsupported.is_empty() {
            let h = format!("Unsupported: {}", unsupported.join(", "));
            self.respond(now, key, 420, "Bad Extension", &[h]);
            return;
        }
        // Loop detection (§16.3 step 4).
        let loop_hash = self.loop_hash(msg);
        if self.is_loop(msg, loop_hash) {
            self.respond(now, key, 482, "Loop Detected", &[]);
            return;
        }

        let RouteInfo { mut strip, flows: dialog, remaining } = routing;
        let remaining: Vec<&str> = remaining.iter().map(String::as_str).collect();
        if auth_user.is_some() {
            let header =
                if *method == Method::Register { HeaderName::Authorization } else { HeaderName::ProxyAuthorization };
            strip.extend(self.our_credentials(msg, header));
        }

        let to_us = remaining.is_empty() && self.request_uri_is_us(msg);
        if *method == Method::Register && to_us {
            self.on_register(now, key, flow, msg, auth_user.as_deref());
            return;
        }
        if *method == Method::Options && to_us && request_user(msg).is_none() {
            self.respond(now, key, 200, "OK", &self.options_headers());
            return;
        }

        let targets = match self.targets(now, flow, msg, &remaining, dialog, to_us) {
            Ok(t) => t,
            Err(rej) => {
                self.respond(now, key, rej.code, &rej.reason, &[]);
                return;
            }
        };
        let body = match self.media_request(now, flow, msg, targets.first().map(|t| t.flow)) {
            Ok(b) => b,
            Err(rej) => {
                self.respond(now, key, rej.code, &rej.reason, &[]);
                return;
            }
        };
        self.media_seen_request(msg);
        let record_route = method.creates_dialog() && msg.tag(HeaderName::To).is_none();
        for target in targets {
            self.forward_request(now, key, flow, msg, &strip, target, record_route, loop_hash, body.as_deref());
        }
        if *method == Method::Bye {
            if let Some(call_id) = msg.call_id() {
                if let (Some(from), Some(to)) = (msg.tag(HeaderName::From), msg.tag(HeaderName::To)) {
                    self.established.end(now, call_id, from, to);
                }
                self.media_end(call_id);
            }
        }
    }

    /// Decides where a request goes: the next Route, a dialog flow, the bindings of a local
    /// AOR, or the Request-URI.
    fn targets(
        &self,
        now: Instant,
        flow: Flow,
        msg: &Message,
        remaining: &[&str],
        dialog: Option<DialogFlows>,
        to_us: bool,
    ) -> Result<Vec<Target>, Rejection> {
        // A token whose MAC holds for this dialog, arriving from one of its sides, routes to
        // the other side: routed by the dialog, whatever the Request-URI and later Routes say.
        if let Some(d) = dialog {
            let other = if self.side_matches(d.a, flow) {
                Some(d.b)
            } else if self.side_matches(d.b, flow) {
                Some(d.a)
            } else {
                None
            };
            if let Some((iface, remote)) = other {
                if let Some(i) = self.cfg.interfaces.get(iface) {
                    return Ok(vec![Target {
                        flow: Flow { transport: i.transport, local: i.bind, remote, conn: None },
                        request_uri: None,
                        routes: vec![],
                    }]);
                }
            }
        }
        if let Some(next) = remaining.first() {
            let uri = uri_of(next);
            let f = self.flow_for_uri(uri).ok_or(Rejection::new(503, "Cannot Route To Next Hop"))?;
            return Ok(vec![Target { flow: f, request_uri: None, routes: vec![] }]);
        }
        if to_us {
            let Some(user) = request_user(msg) else {
                return Err(Rejection::new(404, "Not Found"));
            };
            let aor = format!("{user}@{}", self.cfg.domain);
            let bindings = self.registrar.lookup(&aor, self.unix(now));
            if bindings.is_empty() {
                // Only the operator's own networks learn whether a user exists.
                return Err(if self.is_trusted(flow.remote.ip()) && !self.auth.knows_user(&user) {
                    Rejection::new(404, "Not Found")
                } else {
                    Rejection::new(480, "Temporarily Unavailable")
                });
            }
            return Ok(bindings.iter().map(binding_target).collect());
        }
        let uri = msg.request_uri().unwrap_or("");
        let f = self.flow_for_uri(uri).ok_or(Rejection::new(404, "Not Found - Unresolvable Request-URI Host"))?;
        Ok(vec![Target { flow: f, request_uri: None, routes: vec![] }])
    }

    fn side_matches(&self, side: (usize, SocketAddr), flow: Flow) -> bool {
        side.1 == flow.remote && self.cfg.interfaces.get(side.0).is_some_and(|i| i.transport == flow.transport)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_request(
        &mut self,
        now: Instant,
        key: &str,
        in_flow: Flow,
        msg: &Message,
        strip: &[(usize, std::ops::Range<usize>)],
        target: Target,
        record_route: bool,
        loop_hash: u64,
        body: Option<&[u8]>,
    ) {
        let Some(out_iface) = self.interface_index(target.flow.transport, target.flow.local, target.flow.remote) else {
            self.respond(now, key, 503, "No Interface For Transport", &[]);
            return;
        };
        let in_iface = self.interface_index(in_flow.transport, in_flow.local, in_flow.remote).unwrap_or(out_iface);
        let mut flow = target.flow;
        flow.local = self.cfg.interfaces[out_iface].bind;
        let branch = format!("{BRANCH_PREFIX}{loop_hash:016x}.{:08x}", self.rng.gen::<u32>());

        let mut e = Editor::new(msg);
        if let Some(uri) = &target.request_uri {
            if let crate::message::StartLine::Request { uri: r, .. } = &msg.start {
                e.replace(r.clone(), uri.clone());
            }
        }
        let via = format!(
            "SIP/2.0/{} {};branch={branch}",
            flow.transport.via_token(),
            self.cfg.interfaces[out_iface].host_port()
        );
        e.prepend_header("Via", &via);
        let rr = record_route.then_some(DialogFlows { a: (in_iface, in_flow.remote), b: (out_iface, flow.remote) });
        if let Some(flows) = rr {
            let (call_id, from_tag) = (msg.call_id().unwrap_or(""), msg.tag(HeaderName::From).unwrap_or(""));
            let token = encode_token(&self.cfg.secret, flows, call_id, from_tag);
            let rr_out = self.rr_uri(out_iface, &token);
            e.prepend_header("Record-Route", &rr_out);
            if in_iface != out_iface {
                // §4 of RFC 5658: one entry per interface the dialog crosses.
                let rr_in = self.rr_uri(in_iface, &token);
                e.prepend_header("Record-Route", &rr_in);
            }
        }
        for r in &target.routes {
            e.prepend_header("Route", r);
        }
        for (hi, r) in strip {
            e.remove_value(*hi, r.clone());
        }
        fix_top_via(msg, &mut e, in_flow);
        if let Some(b) = body {
            e.set_body(b);
        }
        match msg.headers.iter().find(|h| h.name == HeaderName::MaxForwards) {
            Some(h) => {
                let mf = msg.max_forwards().and_then(Result::ok).unwrap_or(70);
                e.replace(h.value.clone(), mf.saturating_sub(1).to_string());
            }
            None => {
                e.append_header("Max-Forwards", "69");
            }
        }
        let bytes = e.finish();
        let Ok(sent) = Message::parse(Bytes::from(bytes)) else {
            self.respond(now, key, 500, "Internal Error Building Request", &[]);
            return;
        };
        if let Some(st) = self.server_txs.get_mut(key) {
            st.branches.push(branch.clone());
        }
        self.start_client(now, branch.clone(), Owner::Server(key.to_owned()), flow, sent);
        if let Some(ct) = self.client_txs.get_mut(&branch) {
            ct.rr = rr;
        }
    }

    fn start_client(&mut self, now: Instant, key: String, owner: Owner, flow: Flow, sent: Message) {
        self.out.push_back(Transmit { flow, payload: sent.raw().to_vec() });
        let udp = flow.transport == Transport::Udp;
        let ct = ClientTx {
            owner,
            flow,
            sent,
            state: CState::Trying,
            retransmit_at: udp.then(|| now + T1),
            interval: T1,
            timeout_at: Some(now + TIMEOUT_64T1),
            cleanup_at: None,
            final_code: None,
            cancel_requested: false,
            ack: None,
            rr: None,
        };
        if let Some(t) = ct.retransmit_at {
            self.timers.push(Reverse((t, TimerRef::Client(key.clone()))));
        }
        self.timers.push(Reverse((now + TIMEOUT_64T1, TimerRef::Client(key.clone()))));
        self.client_txs.insert(key, ct);
    }

    /// ACK for a 2xx is its own transaction (§13.2.2.4): forward it without state.
    fn forward_ack(&mut self, now: Instant, flow: Flow, msg: &Message) {
        let routing = self.route_info(msg);
        if !self.dialog_vouches(now, flow, msg, &Method::Ack, &routing) && !self.is_trusted(flow.remote.ip()) {
            return; // not a dialog we saw established, from one of its sides: never relay for strangers
        }
        let RouteInfo { strip, flows: dialog, remaining } = routing;
        let remaining: Vec<&str> = remaining.iter().map(String::as_str).collect();
        let to_us = remaining.is_empty() && self.request_uri_is_us(msg);
        let Ok(targets) = self.targets(now, flow, msg, &remaining, dialog, to_us) else {
            return;
        };
        let Some(target) = targets.into_iter().next() else {
            return;
        };
        let Some(iface) = self.interface_index(target.flow.transport, target.flow.local, target.flow.remote) else {
            return;
        };
        let mut out = target.flow;
        out.local = self.cfg.interfaces[iface].bind;
        let mut h = DefaultHasher::new();
        msg.branch().hash(&mut h);
        let branch = format!("{BRANCH_PREFIX}{:016x}.ack", h.finish());
        let body = self.media_request(now, flow, msg, Some(target.flow)).ok().flatten();
        let mut e = Editor::new(msg);
        if let Some(b) = &body {
            e.set_body(b);
        }

        if let Some(uri) = &target.request_uri {
            if let crate::message::StartLine::Request { uri: r, .. } = &msg.start {
                e.replace(r.clone(), uri.clone());
            }
        }
        let via =
            format!("SIP/2.0/{} {};branch={branch}", out.transport.via_token(), self.cfg.interfaces[iface].host_port());
        e.prepend_header("Via", &via);
        for (hi, r) in &strip {
            e.remove_value(*hi, r.clone());
        }
        if let Some(h) = msg.headers.iter().find(|h| h.name == HeaderName::MaxForwards) {
            let mf = msg.max_forwards().and_then(Result::ok).unwrap_or(70);
            if mf == 0 {
                return;
            }
            e.replace(h.value.clone(), (mf - 1).to_string());
        }
        self.out.push_back(Transmit { flow: out, payload: e.finish() });
    }

    fn on_cancel(&mut self, now: Instant, flow: Flow, msg: &Message, branch: &str) {
        let invite_key = server_key(branch, &Method::Invite);
        let tag = self.local_tag(msg);
        let Some(st) = self.server_txs.get(&invite_key) else {
            let r = msg.response(481, "Call/Transaction Does Not Exist", Some(&tag), &[]);
            self.send_response_stateless(flow, r, 481);
            return;
        };
        let ok = msg.response(200, "OK", Some(&st.to_tag), &[]);
        let (final_sent, branches) = (st.final_sent, st.branches.clone());
        self.send_response_stateless(flow, ok, 200);
        if final_sent {
            return;
        }
        for b in branches {
            self.cancel_branch(now, &b);
        }
    }

    /// Sends CANCEL for a pending INVITE branch (§9.1), or remembers to once it rings.
    fn cancel_branch(&mut self, now: Instant, branch: &str) {
        let Some(ct) = self.client_txs.get_mut(branch) else {
            return;
        };
        if ct.final_code.is_some() || ct.cancel_requested && ct.state != CState::Proceeding {
            return;
        }
        ct.cancel_requested = true;
        if ct.state != CState::Proceeding {
            return; // §9.1: wait for a provisional response before cancelling
        }
        let cancel = build_cancel(&ct.sent);
        let flow = ct.flow;
        let key = format!("{branch};CANCEL");
        if self.client_txs.contains_key(&key) {
            return;
        }
        if let Ok(sent) = Message::parse(Bytes::from(cancel)) {
            self.start_client(now, key, Owner::Cancel, flow, sent);
        }
    }

    fn on_register(&mut self, now: Instant, key: &str, flow: Flow, msg: &Message, auth_user: Option<&str>) {
        let Some(to) = msg.name_addr(HeaderName::To) else {
            self.respond(now, key, 400, "Malformed To Header", &[]);
            return;
        };
        let user = match &to.uri.user_part {
            SipUriUserPart::Empty => {
                self.respond(now, key, 404, "Not Found - No User In To URI", &[]);
                return;
            }
            SipUriUserPart::User(u) => u.to_string(),
            SipUriUserPart::UserPw(up) => up.user.to_string(),
        };
        if let Some(a) = auth_user {
            if a != user {
                self.respond(now, key, 403, "Forbidden - Credentials Do Not Match AOR", &[]);
                return;
            }
        }
        let requires: Vec<&str> = msg.value_texts(HeaderName::Require);
        let unsupported: Vec<&str> =
            requires.into_iter().filter(|r| !["path", "outbound"].contains(&r.to_ascii_lowercase().as_str())).collect();
        if !unsupported.is_empty() {
            let h = format!("Unsupported: {}", unsupported.join(", "));
            self.respond(now, key, 420, "Bad Extension", &[h]);
            return;
        }
        let aor = format!("{user}@{}", self.cfg.domain);
        let unix = self.unix(now);
        let keepalive = KeepalivePolicy {
            interval: self.cfg.keepalive_interval.as_secs().max(1),
            floor: self.cfg.keepalive_min.as_secs().max(1),
        };
        match self.registrar.register(&self.cfg.registrar, unix, &aor, msg, flow, keepalive) {
            Ok(out) => {
                for (contact, interval) in &out.mapping_deaths {
                    tracing::info!(%aor, contact, interval, "NAT mapping died under the keepalives; interval shortened");
                    metrics::counter!("pinhole_nat_mapping_deaths_total").increment(1);
                }
                tracing::info!(
                    %aor,
                    remote = %flow.remote,
                    transport = %flow.transport,
                    bindings = out.bindings.len(),
                    "registered"
                );
                let mut hs: Vec<String> = out
                    .bindings
                    .iter()
                    .map(|b| format!("Contact: <{}>;expires={}", b.contact, b.expires_at.saturating_sub(unix)))
                    .collect();
                for p in msg.value_texts(HeaderName::Path) {
                    hs.push(format!("Path: {p}"));
                }
                hs.push("Supported: path, outbound".into());
                metrics::gauge!("pinhole_registrar_bindings").set(self.registrar.binding_count() as f64);
                self.respond(now, key, 200, "OK", &hs);
            }
            Err((rej, hs)) => self.respond(now, key, rej.code, &rej.reason, &hs),
        }
    }

    // ---------------------------------------------------------------- responses

    fn on_response(&mut self, now: Instant, flow: Flow, msg: Message) {
        let code = msg.status().unwrap_or(0);
        self.count_response(code, false);
        let Some(branch) = msg.branch().map(str::to_owned) else {
            self.stats.unmatched_responses += 1;
            return;
        };
        let cancel = msg.cseq().is_some_and(|(_, m)| m == Method::Cancel);
        let key = if cancel { format!("{branch};CANCEL") } else { branch };
        let Some(ct) = self.client_txs.get_mut(&key) else {
            self.stats.unmatched_responses += 1;
            return;
        };
        let invite = ct.invite();
        let owner = ct.owner.clone();
        if let (Some(flows), 101..=299) = (ct.rr, code) {
            let from_tag = ct.sent.tag(HeaderName::From).map(str::to_owned);
            if let (Some(call_id), Some(from_tag), Some(to_tag)) = (msg.call_id(), from_tag, msg.tag(HeaderName::To)) {
                self.established.establish(now, call_id, &from_tag, to_tag, flows, code >= 200);
            }
        }
        let Some(ct) = self.client_txs.get_mut(&key) else { return };
        if code < 200 {
            if matches!(ct.state, CState::Trying | CState::Proceeding) {
                ct.state = CState::Proceeding;
                ct.retransmit_at = if invite { None } else { ct.retransmit_at };
                if invite {
                    ct.timeout_at = Some(now + TIMER_C);
                    self.timers.push(Reverse((now + TIMER_C, TimerRef::Client(key.clone()))));
                }
                let cancel_now = invite && ct.cancel_requested;
                if cancel_now {
                    ct.cancel_requested = false;
                    self.cancel_branch(now, &key);
                }
                if code > 100 {
                    if let Owner::Server(sk) = &owner {
                        self.forward_response(now, sk, &msg, Some(flow));
                    }
                }
            }
            return;
        }
        match ct.state {
            CState::Completed => {
                // Retransmitted final: repeat our ACK (§17.1.1.2).
                if let Some(ack) = ct.ack.clone() {
                    let flow = ct.flow;
                    self.out.push_back(Transmit { flow, payload: ack });
                }
                return;
            }
            CState::Accepted => {
                if (200..300).contains(&code) {
                    if let Owner::Server(sk) = &owner {
                        self.forward_response(now, sk, &msg, Some(flow));
                    }
                }
                return;
            }
            _ => {}
        }
        ct.final_code = Some(code);
        ct.retransmit_at = None;
        ct.timeout_at = None;
        let reliable = ct.flow.transport != Transport::Udp;
        if invite && (200..300).contains(&code) {
            ct.state = CState::Accepted;
            ct.cleanup_at = Some(now + TIMEOUT_64T1);
        } else {
            ct.state = CState::Completed;
            if invite {
                let ack = build_ack(&ct.sent, &msg);
                ct.ack = Some(ack.clone());
                let flow = ct.flow;
                self.out.push_back(Transmit { flow, payload: ack });
            }
            let wait = if reliable {
                Duration::ZERO
            } else if invite {
                TIMEOUT_64T1
            } else {
                T4
            };
            if let Some(ct) = self.client_txs.get_mut(&key) {
                ct.cleanup_at = Some(now + wait);
            }
        }
        if let Some(ct) = self.client_txs.get(&key) {
            if let Some(c) = ct.cleanup_at {
                self.timers.push(Reverse((c, TimerRef::Client(key.clone()))));
            }
        }
        match owner {
            Owner::Server(sk) => self.branch_final(now, &sk, &key, msg, flow),
            Owner::Keepalive { aor, contact } => self.keepalive_result(&aor, &contact, true),
            Owner::Cancel | Owner::Local => {}
        }
    }

    /// A branch reached a final response: 2xx goes up at once, others wait for the best
    /// (§16.7).
    fn branch_final(&mut self, now: Instant, sk: &str, branch: &str, msg: Message, from: Flow) {
        let code = msg.status().unwrap_or(500);
        let Some(st) = self.server_txs.get_mut(sk) else {
            return;
        };
        if (200..300).contains(&code) {
            let others: Vec<String> = st.branches.iter().filter(|b| *b != branch).cloned().collect();
            self.forward_response(now, sk, &msg, Some(from));
            for b in others {
                self.cancel_branch(now, &b);
            }
            return;
        }
        if st.final_sent && code >= 300 {
            return;
        }
        let better = match &st.best {
            None => true,
            Some(b) => rank(code) < rank(b.status().unwrap_or(500)),
        };
        if better {
            st.best = Some(msg);
        }
        self.maybe_finish(now, sk);
    }

    fn maybe_finish(&mut self, now: Instant, sk: &str) {
        let Some(st) = self.server_txs.get(sk) else {
            return;
        };
        if st.final_sent {
            return;
        }
        let pending = st.branches.iter().any(|b| self.client_txs.get(b).is_some_and(|c| c.final_code.is_none()));
        if pending {
            return;
        }
        match st.best.clone() {
            Some(best) => self.forward_response(now, sk, &best, None),
            None => self.respond(now, sk, 408, "Request Timeout", &[]),
        }
    }

    /// Sends a downstream response upstream through server transaction `sk`, without our Via.
    fn forward_response(&mut self, now: Instant, sk: &str, msg: &Message, from: Option<Flow>) {
        let code = msg.status().unwrap_or(500);
        let up = self.server_txs.get(sk).map(|st| st.flow);
        let body = from.and_then(|f| self.media_response(now, f, up, msg));
        if let (Some(f), true) = (from, (200..300).contains(&code)) {
            if let Some(st) = self.server_txs.get(sk) {
                if st.invite && st.request.tag(HeaderName::To).is_none() {
                    let (req, up) = (st.request.clone(), st.flow);
                    self.media_dialog(&req, up, msg, f);
                }
            }
        }
        let Some((hi, r)) = msg.values(HeaderName::Via).into_iter().next() else {
            return;
        };
        let mut e = Editor::new(msg);
        e.remove_value(hi, r);
        if code == 503 {
            // §16.7 step 6: a 503 from downstream must not make upstream avoid us.
            let sl = msg.start_line_range();
            e.replace(sl, "SIP/2.0 500 Service Unavailable Downstream");
        }
        if let Some(b) = &body {
            e.set_body(b);
        }
        let bytes = e.finish();
        self.send_on_server(now, sk, code, bytes);
    }

    /// Builds and sends a local response on a server transaction.
    fn respond(&mut self, now: Instant, sk: &str, code: u16, reason: &str, extra: &[String]) {
        let Some(st) = self.server_txs.get(sk) else {
            return;
        };
        let bytes = st.request.response(code, reason, Some(&st.to_tag), extra);
        self.send_on_server(now, sk, code, bytes);
    }

    fn send_on_server(&mut self, now: Instant, sk: &str, code: u16, bytes: Vec<u8>) {
        let Some(st) = self.server_txs.get(sk) else {
            return;
        };
        if st.final_sent && !(st.invite && (200..300).contains(&code) && st.state == SState::Accepted) {
            return;
        }
        self.count_response(code, true);
        let Some(st) = self.server_txs.get_mut(sk) else {
            return;
        };
        self.out.push_back(Transmit { flow: st.flow, payload: bytes.clone() });
        st.last_response = Some(bytes);
        if code < 200 {
            return;
        }
        let udp = st.flow.transport == Transport::Udp;
        st.final_sent = true;
        let failed_call = (st.invite && code >= 300 && st.request.tag(HeaderName::To).is_none())
            .then(|| st.request.call_id().map(str::to_owned))
            .flatten();
        if st.invite && (200..300).contains(&code) {
            st.state = SState::Accepted;
            st.cleanup_at = Some(now + TIMEOUT_64T1);
        } else if st.invite {
            st.state = SState::Completed;
            if udp {
                st.retransmit_at = Some(now + T1);
                st.interval = T1;
                self.timers.push(Reverse((now + T1, TimerRef::Server(sk.to_owned()))));
            }
            st.timeout_at = Some(now + TIMEOUT_64T1);
        } else {
            st.state = SState::Completed;
            st.cleanup_at = Some(now + if udp { TIMEOUT_64T1 } else { Duration::ZERO });
        }
        let next = [st.cleanup_at, st.timeout_at].into_iter().flatten().min();
        if let Some(t) = next {
            self.timers.push(Reverse((t, TimerRef::Server(sk.to_owned()))));
        }
        if let Some(call_id) = failed_call {
            self.media_end(&call_id);
        }
    }

    fn send_response_stateless(&mut self, flow: Flow, bytes: Vec<u8>, code: u16) {
        self.count_response(code, true);
        self.out.push_back(Transmit { flow, payload: bytes });
    }

    // ---------------------------------------------------------------- timers

    fn server_timer(&mut self, now: Instant, key: &str) {
        let Some(st) = self.server_txs.get_mut(key) else {
            return;
        };
        if st.cleanup_at.is_some_and(|t| t <= now) || st.timeout_at.is_some_and(|t| t <= now) {
            // Timer H, I, J or L: the transaction ends.
            self.server_txs.remove(key);
            return;
        }
        if let Some(t) = st.retransmit_at.filter(|t| *t <= now) {
            let _ = t;
            if let Some(r) = &st.last_response {
                self.out.push_back(Transmit { flow: st.flow, payload: r.clone() });
            }
            st.interval = (st.interval * 2).min(T2);
            st.retransmit_at = Some(now + st.interval);
            self.timers.push(Reverse((now + st.interval, TimerRef::Server(key.to_owned()))));
        }
    }

    fn client_timer(&mut self, now: Instant, key: &str) {
        let Some(ct) = self.client_txs.get_mut(key) else {
            return;
        };
        if ct.cleanup_at.is_some_and(|t| t <= now) {
            // Timers D, K, M: absorb time over.
            self.client_txs.remove(key);
            return;
        }
        if ct.timeout_at.is_some_and(|t| t <= now) && ct.final_code.is_none() {
            let owner = ct.owner.clone();
            if ct.invite() && ct.state == CState::Proceeding {
                // Timer C: cancel the ringing branch; its 487 finishes it.
                ct.timeout_at = Some(now + TIMEOUT_64T1);
                ct.cancel_requested = false;
                self.timers.push(Reverse((now + TIMEOUT_64T1, TimerRef::Client(key.to_owned()))));
                self.cancel_branch(now, key);
                return;
            }
            // Timer B or F: the branch timed out (§17.1.1.2, §17.1.2.2).
            ct.final_code = Some(408);
            self.client_txs.remove(key);
            match owner {
                Owner::Server(sk) => self.maybe_finish(now, &sk),
                Owner::Keepalive { aor, contact } => self.keepalive_result(&aor, &contact, false),
                Owner::Cancel | Owner::Local => {}
            }
            return;
        }
        if let Some(t) = ct.retransmit_at.filter(|t| *t <= now) {
            let _ = t;
            self.out.push_back(Transmit { flow: ct.flow, payload: ct.sent.raw().to_vec() });
            ct.interval = if ct.invite() { ct.interval * 2 } else { (ct.interval * 2).min(T2) };
            let next = now + ct.interval;
            ct.retransmit_at = Some(next);
            self.timers.push(Reverse((next, TimerRef::Client(key.to_owned()))));
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        let unix = self.unix(now);
        if self.registrar.expire(unix) > 0 {
            metrics::gauge!("pinhole_registrar_bindings").set(self.registrar.binding_count() as f64);
        }
        self.auth.expire(now);
        self.established.expire(now);
        self.budget.expire(now);
        metrics::gauge!("pinhole_sip_transactions").set(self.transaction_count() as f64);
        metrics::gauge!("pinhole_sip_dialogs").set(self.established.len() as f64);
        if self.cfg.keepalive == Keepalive::Off {
            return;
        }
        let interval = self.cfg.keepalive_interval.as_secs().max(1);
        let options = self.cfg.keepalive == Keepalive::Options;
        let mut due = Vec::new();
        for (aor, b) in self.registrar.bindings_mut() {
            if b.next_keepalive <= unix {
                b.next_keepalive = unix + b.keepalive_every(interval);
                if options && b.keepalive_pending_since == 0 {
                    b.keepalive_pending_since = unix;
                }
                due.push((aor.clone(), b.clone()));
            }
        }
        for (aor, b) in due {
            metrics::counter!("pinhole_nat_keepalives_total", "result" => "sent").increment(1);
            self.send_keepalive(now, &aor, &b);
        }
    }

    fn send_keepalive(&mut self, now: Instant, aor: &str, b: &Binding) {
        let flow = b.flow();
        if b.transport.is_stream() && self.cfg.keepalive == Keepalive::Crlf {
            self.out.push_back(Transmit { flow, payload: b"\r\n\r\n".to_vec() });
            return;
        }
        if self.cfg.keepalive == Keepalive::Crlf && b.transport == Transport::Udp {
            // RFC 5626 §4.4.2 uses STUN on datagrams; a CRLF still refreshes NAT state.
            self.out.push_back(Transmit { flow, payload: b"\r\n\r\n".to_vec() });
            return;
        }
        let Some(iface) = self.interface_index(flow.transport, flow.local, flow.remote) else {
            return;
        };
        let branch = format!("{BRANCH_PREFIX}ka.{:016x}", self.rng.gen::<u64>());
        let hp = self.cfg.interfaces[iface].host_port();
        let req = format!(
            "OPTIONS {} SIP/2.0\r\nVia: SIP/2.0/{} {hp};branch={branch}\r\nMax-Forwards: 70\r\nTo: <{}>\r\nFrom: <sip:pinhole@{}>;tag={:08x}\r\nCall-ID: ka-{:016x}@{}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            b.contact,
            flow.transport.via_token(),
            b.contact,
            self.cfg.domain,
            self.rng.gen::<u32>(),
            self.rng.gen::<u64>(),
            self.cfg.domain,
        );
        if let Ok(sent) = Message::parse(Bytes::from(req)) {
            let owner = Owner::Keepalive { aor: aor.to_owned(), contact: b.contact.clone() };
            self.start_client(now, branch, owner, flow, sent);
        }
    }

    fn keepalive_result(&mut self, aor: &str, contact: &str, ok: bool) {
        let mut dead = false;
        for (a, b) in self.registrar.bindings_mut() {
            if a == aor && b.contact == contact {
                if ok {
                    b.keepalive_failures = 0;
                    b.keepalive_pending_since = 0;
                    metrics::counter!("pinhole_nat_keepalives_total", "result" => "answered").increment(1);
                } else {
                    metrics::counter!("pinhole_nat_keepalives_total", "result" => "unanswered").increment(1);
                    b.keepalive_failures += 1;
                    dead = b.keepalive_failures >= KEEPALIVE_MAX_FAILURES;
                }
            }
        }
        if dead {
            tracing::info!(aor, contact, "binding expired after failed keepalives");
            self.registrar.remove(aor, contact);
        }
    }

    // ---------------------------------------------------------------- helpers

    /// Counts a response; counter handles are cached so the hot path does not format labels.
    fn count_response(&mut self, code: u16, out: bool) {
        self.counters
            .entry((code, out))
            .or_insert_with(|| {
                let direction = if out { "out" } else { "in" };
                metrics::counter!("pinhole_sip_responses_total", "code" => code.to_string(), "direction" => direction)
            })
            .increment(1);
    }

    fn count_request(&self, method: &Method, transport: Transport) {
        metrics::counter!(
            "pinhole_sip_requests_total",
            "method" => method.label(),
            "transport" => transport.as_str()
        )
        .increment(1);
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.cfg.trusted.iter().any(|c| c.contains(ip))
    }

    fn options_headers(&self) -> Vec<String> {
        vec![
            "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, PRACK, INFO, MESSAGE, SUBSCRIBE, NOTIFY, REFER".into(),
            "Accept: application/sdp".into(),
            "Supported: path, outbound".into(),
        ]
    }

    /// A To tag for local responses: stable for retransmissions of the same request.
    fn local_tag(&self, msg: &Message) -> String {
        let mut h = DefaultHasher::new();
        msg.call_id().hash(&mut h);
        msg.tag(HeaderName::From).hash(&mut h);
        msg.cseq().map(|(n, _)| n).hash(&mut h);
        self.cfg.secret.hash(&mut h);
        format!("ph{:012x}", h.finish() & 0xffff_ffff_ffff)
    }

    /// §16.6 step 8: the part of our branch that detects loops.
    fn loop_hash(&self, msg: &Message) -> u64 {
        let mut h = DefaultHasher::new();
        msg.request_uri().hash(&mut h);
        msg.tag(HeaderName::From).hash(&mut h);
        msg.header(HeaderName::To).hash(&mut h);
        msg.call_id().hash(&mut h);
        msg.cseq().map(|(n, _)| n).hash(&mut h);
        msg.value_texts(HeaderName::Route).hash(&mut h);
        msg.value_texts(HeaderName::ProxyRequire).hash(&mut h);
        h.finish()
    }

    fn is_loop(&self, msg: &Message, hash: u64) -> bool {
        let ours = format!("{BRANCH_PREFIX}{hash:016x}.");
        msg.vias().into_iter().flatten().any(|v| {
            let sent_by_us = self.host_is_us(&host_string(&v.sent_by.host), v.sent_by.port);
            sent_by_us && v.params.get_val("branch").is_some_and(|b| b.starts_with(&ours))
        })
    }

    fn host_is_us(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.cfg.interfaces.iter().any(|i| {
            let p = port.unwrap_or(i.transport.default_port());
            let adv = i.advertise.trim_start_matches('[').trim_end_matches(']');
            p == i.bind.port() && (host.eq_ignore_ascii_case(adv) || host.parse::<IpAddr>().ok() == Some(i.bind.ip()))
        })
    }

    fn request_uri_is_us(&self, msg: &Message) -> bool {
        let Some(uri) = msg.request_sip_uri() else {
            return false;
        };
        let host = host_string(&uri.host_port.host);
        self.host_is_us(&host, uri.host_port.port) || self.is_our_domain(&host, uri.host_port.port)
    }

    /// Our domain, on no port or one we listen on (Kamailio's `myself` compares ports too):
    /// `sip:bob@example.com:5090` is somebody else's server when we listen on 5060 only.
    fn is_our_domain(&self, host: &str, port: Option<u16>) -> bool {
        host.eq_ignore_ascii_case(&self.cfg.domain)
            && port.is_none_or(|p| self.cfg.interfaces.iter().any(|i| i.bind.port() == p))
    }

    /// If `route` names us, returns its user part (our flow token), if any.
    fn route_is_us(&self, route: &str) -> Option<Option<String>> {
        let uri = uri_of(route);
        let parsed = parse_sip_uri(uri)?;
        let host = host_string(&parsed.host_port.host);
        if !(self.host_is_us(&host, parsed.host_port.port) || self.is_our_domain(&host, parsed.host_port.port)) {
            return None;
        }
        Some(match parsed.user_part {
            SipUriUserPart::User(u) => Some(u.to_string()),
            _ => None,
        })
    }

    fn rr_uri(&self, iface: usize, token: &str) -> String {
        let i = &self.cfg.interfaces[iface];
        let tp = match i.transport {
            Transport::Udp => String::new(),
            t => format!(";transport={t}"),
        };
        format!("<sip:{token}@{}{tp};lr>", i.host_port())
    }

    /// The interface to send from: the one we received on for this transport, else the
    /// first of the transport and address family.
    fn interface_index(&self, transport: Transport, local: SocketAddr, remote: SocketAddr) -> Option<usize> {
        let ifs = &self.cfg.interfaces;
        ifs.iter()
            .position(|i| i.transport == transport && i.bind == local)
            .or_else(|| ifs.iter().position(|i| i.transport == transport && i.bind.is_ipv4() == remote.is_ipv4()))
            .or_else(|| ifs.iter().position(|i| i.transport == transport))
    }

    /// A flow to an IP-literal SIP URI (pinhole does no DNS).
    fn flow_for_uri(&self, uri: &str) -> Option<Flow> {
        let u = parse_sip_uri(uri)?;
        let ip: IpAddr = host_string(&u.host_port.host).trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        let transport = if u.sips {
            Transport::Tls
        } else {
            u.uri_params.get_val("transport").and_then(|t| Transport::from_param(t)).unwrap_or(Transport::Udp)
        };
        let port = u.host_port.port.unwrap_or(transport.default_port());
        let remote = SocketAddr::new(ip, port);
        let iface = self.interface_index(transport, remote, remote)?;
        Some(Flow { transport, local: self.cfg.interfaces[iface].bind, remote, conn: None })
    }
}

fn binding_target(b: &Binding) -> Target {
    Target { flow: b.flow(), request_uri: Some(b.contact.clone()), routes: b.path.iter().rev().cloned().collect() }
}

fn server_key(branch: &str, method: &Method) -> String {
    let kind = match method {
        Method::Ack | Method::Invite => "INVITE",
        m => m.as_str(),
    };
    format!("{branch};{kind}")
}

/// §16.7 step 6 preference: 6xx, then the lowest class.
fn rank(code: u16) -> u16 {
    if code >= 600 {
        0
    } else {
        code
    }
}

fn request_user(msg: &Message) -> Option<String> {
    match msg.request_sip_uri()?.user_part {
        SipUriUserPart::Empty => None,
        SipUriUserPart::User(u) => Some(u.to_string()),
        SipUriUserPart::UserPw(up) => Some(up.user.to_string()),
    }
}

fn host_string(h: &Host) -> String {
    match h {
        Host::Name(n) => n.to_string(),
        Host::IP4(ip) => ip.to_string(),
        Host::IP6(ip) => ip.to_string(),
    }
}

/// The URI inside a name-addr (`<sip:…>` or a bare URI).
fn uri_of(v: &str) -> &str {
    match (v.find('<'), v.find('>')) {
        (Some(s), Some(e)) if s < e => &v[s + 1..e],
        _ => v.split(';').next().unwrap_or(v).trim(),
    }
}

fn parse_sip_uri(uri: &str) -> Option<SipUri> {
    use ezk_sip_types::parse::Parse;
    let src = Bytes::copy_from_slice(uri.as_bytes());
    let text = std::str::from_utf8(&src).ok()?;
    let parsed = match SipUri::parse(&src)(text) {
        Ok(("", u)) => Some(u),
        _ => None,
    };
    parsed
}

/// RFC 3581 §4 and RFC 3261 §18.2.1: record where the request really came from in the top
/// Via, so responses can follow the NAT mapping.
fn fix_top_via(msg: &Message, e: &mut Editor<'_>, flow: Flow) {
    let Some((_, r)) = msg.values(HeaderName::Via).into_iter().next() else {
        return;
    };
    let Some(via) = msg.top_via() else { return };
    let text = msg.text(r.clone());
    let src_ip = flow.remote.ip().to_string();
    let mut out = String::with_capacity(text.len() + 40);
    let mut changed = false;
    for (i, part) in text.split(';').enumerate() {
        if i > 0 {
            out.push(';');
        }
        if i > 0 && part.trim().eq_ignore_ascii_case("rport") {
            out.push_str(&format!("rport={}", flow.remote.port()));
            changed = true;
        } else {
            out.push_str(part);
        }
    }
    let sent_ip = host_string(&via.sent_by.host);
    if sent_ip.trim_start_matches('[').trim_end_matches(']') != src_ip && via.params.get("received").is_none() {
        out.push_str(&format!(";received={src_ip}"));
        changed = true;
    }
    if changed {
        e.replace(r, out);
    }
}

/// CANCEL for a sent INVITE (§9.1).
fn build_cancel(invite: &Message) -> Vec<u8> {
    build_hop_request(invite, "CANCEL", None)
}

/// ACK for a non-2xx final response (§17.1.1.3).
fn build_ack(invite: &Message, resp: &Message) -> Vec<u8> {
    build_hop_request(invite, "ACK", resp.header(HeaderName::To))
}

fn build_hop_request(invite: &Message, method: &str, to: Option<&str>) -> Vec<u8> {
    let uri = invite.request_uri().unwrap_or("");
    let mut out = format!("{method} {uri} SIP/2.0\r\n");
    if let Some((_, r)) = invite.values(HeaderName::Via).into_iter().next() {
        out.push_str(&format!("Via: {}\r\n", invite.text(r)));
    }
    for r in invite.value_texts(HeaderName::Route) {
        out.push_str(&format!("Route: {r}\r\n"));
    }
    out.push_str("Max-Forwards: 70\r\n");
    out.push_str(&format!("From: {}\r\n", invite.header(HeaderName::From).unwrap_or("")));
    out.push_str(&format!("To: {}\r\n", to.or(invite.header(HeaderName::To)).unwrap_or("")));
    out.push_str(&format!("Call-ID: {}\r\n", invite.call_id().unwrap_or("")));
    let n = invite.cseq().map(|(n, _)| n).unwrap_or(1);
    out.push_str(&format!("CSeq: {n} {method}\r\nContent-Length: 0\r\n\r\n"));
    out.into_bytes()
}
