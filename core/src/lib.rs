//! pinhole-core: the server role as one sans-IO object.
//!
//! A [`Node`] owns the SIP proxy, the media relay and the ng control server, and routes
//! between them: SDP from the proxy is anchored on the relay (through the proxy's
//! [`MediaAnchor`](pinhole_media::anchor::MediaAnchor) type parameter), ng commands reach
//! the same relay, and calls the relay ends are torn down by the proxy. The shell drives it
//! with inputs and one output loop, as str0m's `Rtc`:
//!
//! ```no_run
//! # use std::time::Instant;
//! # use pinhole_core::{Node, NodeConfig, Output};
//! # fn recv() -> (pinhole_sip::Flow, bytes::Bytes) { unimplemented!() }
//! # fn send(_: &pinhole_sip::Transmit) {}
//! # fn data_plane(_: pinhole_media::relay::Command) {}
//! # fn run(cfg: NodeConfig) {
//! let mut node = Node::new(cfg, Instant::now(), 1_700_000_000, 42);
//! loop {
//!     let (flow, bytes) = recv();
//!     let _ = node.handle_sip(Instant::now(), flow, bytes); // Err: garbage, counted
//!     let _wake_at = loop {
//!         match node.poll_output(Instant::now()) {
//!             Output::Transmit(t) => send(&t),
//!             Output::Media(c) => data_plane(c),
//!             Output::Ng { .. } => {} // a relay fleet's statistics request
//!             Output::Event(_) => {}
//!             Output::Timeout(at, _why) => break at, // call handle_timeout then
//!             _ => break Instant::now() + std::time::Duration::from_secs(3600), // Idle
//!         }
//!     };
//! }
//! # }
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pinhole_media::anchor::{MediaAnchor, SdpIn, Unanchored};
use pinhole_media::fleet::{Fleet, RelaySpec};
use pinhole_media::ng_server::{NgServer, NgStreamError};
use pinhole_media::relay::{Command, Relay, RelayConfig};
use pinhole_sip::message::Garbage;
use pinhole_sip::{Flow, Proxy, ProxyConfig, ProxyEvent, Transmit, Transport};

/// What a node is made of.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub proxy: ProxyConfig,
    /// Anchor media on the relay (`media.mode = "relay"`); `None` leaves SDP untouched.
    pub relay: Option<RelayConfig>,
    /// Anchor media on these remote relays over ng instead (`media.relays`); when set,
    /// `relay` is not used.
    pub fleet: Vec<RelaySpec>,
}

/// Where a node anchors media: its own relay (or none), or a fleet of remote relays.
// One per node: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Media {
    Local(Option<Relay>),
    Fleet(Fleet),
}

impl Media {
    /// The node's own relay, when it has one.
    fn local(&mut self) -> Option<&mut Relay> {
        match self {
            Media::Local(r) => r.as_mut(),
            Media::Fleet(_) => None,
        }
    }

    fn fleet(&mut self) -> Option<&mut Fleet> {
        match self {
            Media::Fleet(f) => Some(f),
            Media::Local(_) => None,
        }
    }
}

impl MediaAnchor for Media {
    fn anchoring(&self) -> bool {
        match self {
            Media::Local(r) => r.anchoring(),
            Media::Fleet(f) => f.anchoring(),
        }
    }

    fn anchor_sdp(&mut self, now: Instant, s: &SdpIn<'_>) -> Result<Vec<u8>, Unanchored> {
        match self {
            Media::Local(r) => r.anchor_sdp(now, s),
            Media::Fleet(f) => f.anchor_sdp(now, s),
        }
    }

    fn poll_ready(&mut self) -> Option<String> {
        match self {
            Media::Local(_) => None,
            Media::Fleet(f) => f.poll_ready(),
        }
    }

    fn prefer(&mut self, call_id: &str, caller: Option<&str>, callee: Option<&str>) {
        if let Media::Fleet(f) = self {
            f.prefer(call_id, caller, callee);
        }
    }

    fn release(&mut self, call_id: &str) -> bool {
        match self {
            Media::Local(r) => r.release(call_id),
            Media::Fleet(f) => f.release(call_id),
        }
    }

    fn anchors(&self, call_id: &str) -> bool {
        match self {
            Media::Local(r) => r.anchors(call_id),
            Media::Fleet(f) => f.anchors(call_id),
        }
    }

    fn path(&self, call_id: &str, now: Instant) -> Option<&'static str> {
        match self {
            Media::Local(r) => r.path(call_id, now),
            Media::Fleet(f) => f.path(call_id, now),
        }
    }

    fn counts(&self, call_id: &str) -> Option<(u64, u64)> {
        match self {
            Media::Local(r) => r.counts(call_id),
            Media::Fleet(_) => None,
        }
    }

    fn quality(&self, call_id: &str) -> Option<pinhole_media::quality::CallQuality> {
        match self {
            Media::Local(r) => r.quality(call_id),
            Media::Fleet(_) => None,
        }
    }

    fn release_counting(&mut self, call_id: &str) -> Option<(u64, u64)> {
        match self {
            Media::Local(r) => r.release_counting(call_id),
            // The relay tells it in its reply to the delete: see `Node::poll_output`.
            Media::Fleet(f) => {
                f.release(call_id);
                None
            }
        }
    }
}

/// Things the shell may want to know about, beyond what it must do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// This standby relay got its first ng command: the address moved here, and the calls
    /// it mirrored are its own now.
    TookOver { calls: usize },
    /// A relay of the fleet was taken out (`up == false`) or came back.
    FleetRelay { relay: SocketAddr, up: bool, why: &'static str },
    /// The relay ended a call on its own; its dialog is being torn down (BYE both sides).
    CallEnded { call_id: String, reason: &'static str },
    /// A call between two profiled endpoints got a punch method (`relay` or `denied` when
    /// none); media stays on the relay until plans are carried out.
    PunchPlanned { call_id: String, method: &'static str },
    /// A trunk call ended: its call record.
    CallRecord(pinhole_sip::b2bua::CallRecord),
    /// The relay released a call's media: its quality, direction by direction.
    MediaReleased(pinhole_media::quality::CallQuality),
    /// A direction's latest RTCP report, sampled, as JSON for a capture server.
    RtcpReport { call_id: String, json: String },
    /// An agent (at `agent`) reported what it measured of a call whose media it carried.
    AgentQuality { agent: std::net::SocketAddr, report: pinhole_sip::agent::AgentQuality },
}

/// The next thing the shell must do.
#[derive(Debug)]
#[non_exhaustive]
pub enum Output {
    /// Send these bytes on this flow.
    Transmit(Transmit),
    /// Bind, link or close relay ports in the data plane.
    Media(Command),
    /// Send this ng request (a call command or statistics to a fleet relay) from the
    /// fleet's socket; replies go to [`Node::handle_fleet_reply`].
    Ng {
        to: SocketAddr,
        payload: Vec<u8>,
    },
    Event(Event),
    /// Read this AOR's bindings from the cluster store (every node's), outside the node's
    /// lock, and hand them to [`Node::handle_lookup`]: a request for it is waiting.
    Lookup(String),
    /// Nothing more to do now: call [`Node::handle_timeout`] at this instant (the label
    /// says which part wants to wake).
    Timeout(Instant, &'static str),
    /// Nothing to do until the next input.
    Idle,
}

pub struct Node {
    proxy: Proxy<Media>,
    ng: NgServer,
    events: VecDeque<Event>,
    /// Answers the node makes itself (STUN keepalives on the SIP port).
    transmits: VecDeque<Transmit>,
    /// Relay usage (calls, ports, calls started) as last published: a call that came and
    /// went within one input still changes it.
    published: (usize, usize, u64),
    /// When relay packet totals are next published (once a second while calls exist).
    next_stats: Instant,
    /// Call records of fleet calls waiting for what the relay says it carried (its reply
    /// to the delete, or its silence); at most [`MAX_HELD_RECORDS`].
    held: Vec<pinhole_sip::b2bua::CallRecord>,
}

/// Call records held for their relay's totals at once; past this one goes out without.
const MAX_HELD_RECORDS: usize = 4096;

/// How often relay packet totals are published while calls exist.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

impl Node {
    /// `unix_now` is the wall clock at `now`; `seed` makes branches, tags and nonce salts
    /// reproducible in tests (use a random one in production).
    ///
    pub fn new(cfg: NodeConfig, now: Instant, unix_now: u64, seed: u64) -> Node {
        let media = match cfg.fleet.is_empty() {
            false => {
                let (max, longest) = cfg
                    .relay
                    .as_ref()
                    .map_or((10_000, Duration::from_secs(4 * 3600)), |r| (r.max_sessions, r.max_duration));
                let secret = pinhole_media::mac::hmac(&cfg.proxy.secret, "fleet", &[]);
                Media::Fleet(Fleet::new(cfg.fleet, now, (max, longest), secret))
            }
            true => Media::Local(cfg.relay.map(|r| Relay::new(r, now))),
        };
        Node {
            proxy: Proxy::new(cfg.proxy, media, now, unix_now, seed),
            ng: NgServer::new(now, unix_now),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            published: (0, 0, 0),
            next_stats: now,
            held: Vec::new(),
        }
    }

    pub fn proxy(&self) -> &Proxy<Media> {
        &self.proxy
    }

    /// The proxy, for the registrar store (restore and snapshots).
    pub fn proxy_mut(&mut self) -> &mut Proxy<Media> {
        &mut self.proxy
    }

    pub fn relay(&self) -> Option<&Relay> {
        match self.proxy.media() {
            Media::Local(r) => r.as_ref(),
            Media::Fleet(_) => None,
        }
    }

    /// The relay, for taking ports the data plane could not bind out of use.
    pub fn relay_mut(&mut self) -> Option<&mut Relay> {
        Media::local(self.proxy.media_mut())
    }

    /// The relay fleet, when media is anchored on remote relays.
    pub fn fleet(&self) -> Option<&Fleet> {
        match self.proxy.media() {
            Media::Fleet(f) => Some(f),
            Media::Local(_) => None,
        }
    }

    fn fleet_mut(&mut self) -> Option<&mut Fleet> {
        self.proxy.media_mut().fleet()
    }

    /// In a cluster: a request for a user with no binding here waits for the store (see
    /// [`Output::Lookup`]) instead of being answered 480 at once.
    pub fn enable_read_through(&mut self) {
        self.proxy.enable_read_through();
    }

    /// The cluster store's answer to an [`Output::Lookup`]: each other node's bindings of
    /// `aor` (empty when it has none).
    pub fn handle_lookup(&mut self, now: Instant, aor: &str, found: Vec<(String, Vec<pinhole_sip::Binding>)>) {
        self.proxy.handle_lookup(now, aor, found);
    }

    /// Changes other nodes announced: (AOR, node, its bindings of the AOR now).
    pub fn apply_remote(&mut self, now: Instant, changes: Vec<(String, String, Vec<pinhole_sip::Binding>)>) {
        for (aor, node, bindings) in changes {
            self.proxy.apply_remote(now, &aor, &node, bindings);
        }
    }

    /// A datagram on the fleet's socket (a relay's reply to a call command or to
    /// statistics): messages waiting for it go on. `false`: not one, dropped.
    pub fn handle_fleet_reply(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        let taken = self.fleet_mut().is_some_and(|f| f.handle_reply(now, from, datagram));
        self.proxy.resume_media(now);
        taken
    }

    /// One SIP message (a datagram, or a frame cut from a stream). `Err`: not SIP at all,
    /// counted; UDP drops it, streams close.
    ///
    /// On UDP the SIP port also carries phones' NAT keepalives (RFC 5626 §8): CRLF
    /// datagrams are absorbed, STUN Binding requests answered with XOR-MAPPED-ADDRESS (never
    /// much larger than the request).
    pub fn handle_sip(&mut self, now: Instant, flow: Flow, data: Bytes) -> Result<(), Garbage> {
        if flow.transport == Transport::Udp {
            if data.iter().all(u8::is_ascii_whitespace) {
                return Ok(());
            }
            if pinhole_media::stun::looks_like_stun(&data) {
                match pinhole_media::stun::binding_response(&data, flow.remote) {
                    Some(payload) => {
                        metrics::counter!("pinhole_stun_requests_total", "port" => "sip").increment(1);
                        self.transmits.push_back(Transmit { flow, payload });
                    }
                    None => metrics::counter!("pinhole_stun_garbage_total", "port" => "sip").increment(1),
                }
                return Ok(());
            }
        }
        let r = self.proxy.handle_input(now, flow, data);
        self.publish_usage();
        r
    }

    /// One ng datagram from `from`; its reply, if it deserves one.
    pub fn handle_ng(&mut self, now: Instant, _from: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
        self.take_over(now);
        let reply = self.ng.handle(now, Media::local(self.proxy.media_mut()), datagram);
        self.publish_usage();
        reply
    }

    /// Bytes received on an ng TCP stream: the replies to every whole message in `buf`.
    pub fn handle_ng_stream(&mut self, now: Instant, buf: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, NgStreamError> {
        self.take_over(now);
        let replies = self.ng.handle_stream(now, Media::local(self.proxy.media_mut()), buf);
        self.publish_usage();
        replies
    }

    /// A standby that hears ng has had the relay's address moved to it: it becomes the
    /// active node, keeping the calls it mirrored (their state is written from now on).
    fn take_over(&mut self, now: Instant) {
        let Some(relay) = self.relay_mut().filter(|r| r.is_standby()) else { return };
        relay.set_standby(false, now);
        relay.keep_state(true);
        let calls = relay.call_count();
        self.events.push_back(Event::TookOver { calls });
    }

    /// Fires whatever is due: relay deadlines (calls it ends are torn down by the proxy),
    /// then SIP timers and housekeeping.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut ended = Vec::new();
        if let Some(f) = self.fleet_mut() {
            f.handle_timeout(now);
        }
        if let Some(relay) = Media::local(self.proxy.media_mut()) {
            if relay.poll_timeout().is_some_and(|t| t <= now) {
                relay.handle_timeout(now);
            }
            while let Some(pinhole_media::relay::Event::Ended { call_id, reason }) = relay.poll_event() {
                ended.push((call_id, reason.label()));
            }
            if now >= self.next_stats {
                self.next_stats = now + STATS_INTERVAL;
                publish_totals(relay);
                relay.sample_quality(now);
            }
        }
        for (call_id, reason) in ended {
            tracing::info!(%call_id, reason, "relay ended the call");
            metrics::counter!("pinhole_relay_timeouts_total", "reason" => reason).increment(1);
            self.proxy.media_call_ended(now, &call_id);
            self.events.push_back(Event::CallEnded { call_id, reason });
        }
        // A fleet relay that stayed silent: the messages that waited for it go on.
        self.proxy.resume_media(now);
        if self.proxy.poll_timeout().is_some_and(|(t, _)| t <= now) {
            self.proxy.handle_timeout(now);
        }
        self.publish_usage();
    }

    /// Relay calls and ports as gauges, when they changed; the totals once more when the
    /// last call is gone.
    fn publish_usage(&mut self) {
        let Some(relay) = self.relay() else { return };
        let usage = (relay.call_count(), relay.ports_in_use(), relay.calls_started());
        if usage == self.published {
            return;
        }
        metrics::gauge!("pinhole_relay_sessions").set(usage.0 as f64);
        metrics::gauge!("pinhole_relay_ports").set(usage.1 as f64);
        if usage.0 == 0 {
            publish_totals(relay);
        }
        self.published = usage;
    }

    /// The next output. Call after every input and timeout until it returns
    /// [`Output::Timeout`] or [`Output::Idle`].
    #[must_use]
    pub fn poll_output(&mut self, now: Instant) -> Output {
        if let Some(t) = self.transmits.pop_front().or_else(|| self.proxy.poll_transmit()) {
            return Output::Transmit(t);
        }
        if let Some(c) = self.relay_mut().and_then(Relay::poll_command) {
            return Output::Media(c);
        }
        if let Some(f) = self.fleet_mut() {
            if let Some(c) = f.poll_change() {
                return Output::Event(Event::FleetRelay { relay: c.relay, up: c.up, why: c.why });
            }
            if let Some((to, payload)) = f.poll_transmit(now) {
                return Output::Ng { to, payload };
            }
        }
        if let Some(e) = self.events.pop_front() {
            return Output::Event(e);
        }
        if let Some(q) = self.relay_mut().and_then(Relay::poll_released) {
            return Output::Event(Event::MediaReleased(q));
        }
        if let Some((call_id, json)) = self.relay_mut().and_then(Relay::poll_rtcp_report) {
            return Output::Event(Event::RtcpReport { call_id, json });
        }
        if let Some(aor) = self.proxy.poll_lookup() {
            return Output::Lookup(aor);
        }
        match self.proxy.poll_event() {
            Some(ProxyEvent::PunchPlanned { call_id, method }) => {
                return Output::Event(Event::PunchPlanned { call_id, method })
            }
            Some(ProxyEvent::AgentQuality { agent, report }) => {
                return Output::Event(Event::AgentQuality { agent, report })
            }
            _ => {}
        }
        if let Some(r) = self.next_record() {
            return Output::Event(Event::CallRecord(r));
        }
        // The earliest deadline; on a tie the proxy's comes first.
        let relay = self.relay();
        let stats = relay.filter(|r| r.call_count() > 0).map(|_| (self.next_stats, "relay statistics"));
        let deadline = relay.and_then(Relay::poll_timeout).map(|t| (t, "relay deadline"));
        let fleet = self.fleet().and_then(Fleet::poll_timeout).map(|t| (t, "fleet"));
        match [self.proxy.poll_timeout(), stats, deadline, fleet].into_iter().flatten().min_by_key(|(t, _)| *t) {
            Some((at, why)) => Output::Timeout(at, why),
            None => Output::Idle,
        }
    }
}

impl Node {
    /// The next call record to write. A fleet call's waits for its first relay's reply to
    /// the delete, which tells what it carried.
    fn next_record(&mut self) -> Option<pinhole_sip::b2bua::CallRecord> {
        if let Some(f) = self.proxy.media_mut().fleet() {
            while let Some((call_id, totals)) = f.poll_released() {
                let Some(i) = self.held.iter().position(|r| r.a_call_id == call_id) else { continue };
                let mut r = self.held.remove(i);
                (r.packets, r.bytes) = totals.unwrap_or((0, 0));
                return Some(r);
            }
        }
        loop {
            let r = self.proxy.poll_call_record()?;
            let counting = self.fleet().is_some_and(|f| f.counting(&r.a_call_id));
            if !counting || self.held.len() >= MAX_HELD_RECORDS {
                return Some(r);
            }
            self.held.push(r);
        }
    }
}

fn publish_totals(relay: &Relay) {
    let totals = relay.totals();
    metrics::counter!("pinhole_relay_packets_total").absolute(totals.packets);
    metrics::counter!("pinhole_relay_bytes_total").absolute(totals.bytes);
    metrics::counter!("pinhole_relay_dropped_total").absolute(totals.dropped);
    metrics::counter!("pinhole_relay_sessions_started_total").absolute(relay.calls_started());
}

#[cfg(test)]
mod tests;
