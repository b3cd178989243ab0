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
mod forward;
mod keepalive;
mod lookup;
mod media;
mod punch;
pub use punch::faketcp_key;
mod requests;
#[cfg(test)]
mod tests;
mod transactions;

use forward::*;
use transactions::*;

pub(crate) use forward::{build_hop_request, fix_top_via};
pub(crate) use media::{contact_uri, sdp_body};
pub(crate) use requests::{host_ip, host_string, parse_sip_uri, request_user, uri_of};

use budget::ReplyBudget;
use dialogs::{decode_token, encode_token, DialogFlows, DialogTable};
use media::{MediaWait, NotAnchored};

use pinhole_media::anchor::MediaAnchor;
use pinhole_media::relay::Side;

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
    pub fn host_port(&self) -> String {
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

pub use pinhole_media::cidr::Cidr;

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
    /// Who may get a direct media path (`[punch]`).
    pub punch: PunchPolicy,
    /// The fake-TCP forwarder's port (`[faketcp]`), offered to agents' legs in SDP.
    pub faketcp_port: Option<u16>,
    /// Users whose calls (as caller or callee) are recorded (`[recording] users`).
    pub record_users: Vec<String>,
    /// Trunks and the routes to them (`[[trunk]]`, `[[route]]`): calls on a route go
    /// through the B2BUA.
    pub b2bua: crate::b2bua::B2buaConfig,
}

/// The administrators' say over direct paths (`[punch]`): off altogether, or never for
/// endpoints in denied networks (public or private address) or for denied users.
#[derive(Debug, Clone)]
pub struct PunchPolicy {
    pub enabled: bool,
    pub deny: Vec<Cidr>,
    pub deny_users: Vec<String>,
}

impl Default for PunchPolicy {
    fn default() -> Self {
        PunchPolicy { enabled: true, deny: Vec::new(), deny_users: Vec::new() }
    }
}

impl PunchPolicy {
    /// May these users, at these addresses, get a direct path?
    pub fn allows(&self, users: &[&str], addrs: &[IpAddr]) -> bool {
        self.enabled
            && !users.iter().any(|u| self.deny_users.iter().any(|d| d == u))
            && !addrs.iter().any(|a| self.deny.iter().any(|c| c.contains(*a)))
    }
}

/// Things the driver above the proxy acts on or reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ProxyEvent {
    /// A call between two endpoints with NAT profiles got a punch method (or `relay`).
    PunchPlanned { call_id: String, method: &'static str },
    /// An agent (at `agent`) reported the quality of a call whose media it carried.
    AgentQuality { agent: std::net::SocketAddr, report: crate::agent::AgentQuality },
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
    /// The binding's agent-reported NAT profile, when the target is a registered binding.
    nat_profile: Option<String>,
    relay_rtts: Option<String>,
    /// The binding's agent's plan key.
    plan_key: Option<[u8; 32]>,
}

impl Target {
    /// A next hop and nothing more: no new Request-URI, routes or agent report.
    fn plain(flow: Flow) -> Target {
        Target { flow, request_uri: None, routes: vec![], nat_profile: None, relay_rtts: None, plan_key: None }
    }
}

/// Our own entries at the top of a request's Route set, and what follows them.
struct RouteInfo<'m> {
    /// (header index, value range) of each of our Route values, to strip when forwarding.
    strip: Vec<(usize, std::ops::Range<usize>)>,
    /// The flows named by our token, if its MAC holds for this Call-ID and a tag.
    flows: Option<DialogFlows>,
    remaining: Vec<&'m str>,
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
    /// Requests waiting for the cluster store (see [`lookup`]).
    read_through: lookup::ReadThrough,
    media_waiting: media::MediaWaiting,
    /// Agents' signed profile updates (see `punch.rs`).
    profile_updates: punch::ProfileUpdates,
    media: M,
    dialogs: HashMap<String, media::Dialog>,
    /// Dialogs seen established through us: what lets a Record-Route token skip a challenge.
    established: DialogTable,
    /// Bytes unauthenticated sources may draw from us (challenges, refusals).
    budget: ReplyBudget,
    events: VecDeque<ProxyEvent>,
    /// Punch plans of calls being set up: [caller's, callee's], by Call-ID. The callee's
    /// rides on the INVITE's SDP, the caller's on the 2xx.
    /// Each side's plan until delivered: the callee's goes with the INVITE (or, for a late
    /// offer, the ACK), the caller's with every 2xx until the ACK.
    punch_plans: HashMap<String, [Option<pinhole_media::punch::sdp::WirePlan>; 2]>,
    /// Calls with a side behind an agent (it gave a plan key with an authenticated
    /// REGISTER), with that side's key (A = caller, B = callee): what goes to that side's
    /// agent (its plan, the fake-TCP forwarder offer) is signed with it.
    agent_legs: HashMap<String, [Option<[u8; 32]>; 2]>,
    /// Trunk calls (see [`crate::b2bua`]).
    b2bua: crate::b2bua::B2bua,
    /// Per trunk with `inbound_auth`: the digest its calls must answer (its own account).
    trunk_auth: Vec<Option<Authenticator>>,
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
        let mut b2bua = crate::b2bua::B2bua::new(cfg.b2bua.clone(), cfg.interfaces.clone(), seed);
        b2bua.start(now);
        let trunk_auth = cfg
            .b2bua
            .trunks
            .iter()
            .map(|t| {
                t.inbound_auth.then(|| {
                    let account = [(t.username.clone(), t.password.clone())];
                    Authenticator::new(&cfg.realm, account, cfg.secret, boot ^ 0x7472, now, unix_now)
                })
            })
            .collect();
        Proxy {
            b2bua,
            trunk_auth,
            media,
            dialogs: HashMap::new(),
            established: DialogTable::default(),
            budget: ReplyBudget::default(),
            events: VecDeque::new(),
            punch_plans: HashMap::new(),
            agent_legs: HashMap::new(),
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
            read_through: lookup::ReadThrough::default(),
            media_waiting: media::MediaWaiting::default(),
            profile_updates: punch::ProfileUpdates::default(),
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

    /// The next thing to act on or report, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ProxyEvent> {
        self.events.pop_front()
    }

    /// Next thing to send, if any.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front().or_else(|| self.b2bua.poll_transmit())
    }

    /// The B2BUA (trunk calls).
    pub fn b2bua(&self) -> &crate::b2bua::B2bua {
        &self.b2bua
    }

    /// A call record of a B2BUA call that ended, if any.
    #[must_use]
    pub fn poll_call_record(&mut self) -> Option<crate::b2bua::CallRecord> {
        match self.b2bua.poll_event()? {
            crate::b2bua::B2buaEvent::CallRecord(r) => Some(r),
        }
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
        let b2bua = self.b2bua.poll_timeout().map(|t| (t, "b2bua timer"));
        let lookup = self.lookup_deadline().map(|t| (t, "cluster lookup"));
        [timer, housekeeping, b2bua, lookup].into_iter().flatten().min_by_key(|(t, _)| *t)
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
        self.lookups_due(now);
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
        if self.b2bua.poll_timeout().is_some_and(|t| t <= now) {
            self.b2bua.handle_timeout(now, &mut self.media);
        }
    }

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
}
