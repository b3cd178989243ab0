//! The relay's control plane: calls, their streams and relay ports, offer/answer, and
//! timeouts. It never touches a socket: port bindings and forwarding rules come out as
//! [`Command`]s for the data plane (the forwarding workers in the shell), and timeouts as
//! [`Event`]s for whoever owns the call (the SIP proxy, or an ng client).
//!
//! A call has two sides: A, who made the first offer, and B, who answered it. Each media
//! stream has, per side, the relay port pair that side sends to. A packet arriving on A's
//! RTP port is accepted or dropped by that port's [`Latch`], then leaves from B's RTP port
//! towards B's latched (or signalled) address.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dtls::Identity;
use crate::latch::{Expected, LatchMode};
use crate::quality;
use crate::sdp::{Anchor, Profile, Rewrite, Sdp, SdpError};
use crate::secure::LegSetup;
use crate::stats::StreamStats;

/// A relay port (RTP ports are even, RTCP = RTP + 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayPort(pub u16);

#[derive(Debug, Clone)]
pub struct RelayInterface {
    pub name: String,
    pub bind: IpAddr,
    pub advertise: IpAddr,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub interfaces: Vec<RelayInterface>,
    pub port_min: u16,
    pub port_max: u16,
    /// No media in either direction for this long ends the call.
    pub media_timeout: Duration,
    /// An offer without an answer for this long is dropped.
    pub offer_timeout: Duration,
    /// No call lasts longer than this.
    pub max_duration: Duration,
    /// Most calls at once; more get [`RelayError::LoadLimit`].
    pub max_sessions: usize,
    /// Most media streams (m= lines) in one call's SDP; more get
    /// [`RelayError::TooManyStreams`] before any port is taken.
    pub max_streams: usize,
    /// A recorder is there (`[recording]`): calls may be recorded.
    pub can_record: bool,
}

/// Media streams one call may have by default: audio, video, a presentation, text, and
/// room to spare. Each costs four ports.
pub const DEFAULT_MAX_STREAMS: usize = 8;

impl RelayConfig {
    /// A relay on one interface (bound and advertised on `ip`) over `port_min..=port_max`,
    /// with the defaults pinhole's config uses: 60 s media timeout, 200 s for an answer,
    /// 4 h longest call, 10 000 calls.
    pub fn single(ip: IpAddr, port_min: u16, port_max: u16) -> RelayConfig {
        RelayConfig {
            interfaces: vec![RelayInterface { name: "default".into(), bind: ip, advertise: ip }],
            port_min,
            port_max,
            media_timeout: Duration::from_secs(60),
            offer_timeout: Duration::from_secs(200),
            max_duration: Duration::from_secs(4 * 3600),
            max_sessions: 10_000,
            max_streams: DEFAULT_MAX_STREAMS,
            can_record: false,
        }
    }
}

/// Per-offer/answer choices (from the proxy's policy or ng flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub mode: LatchMode,
    /// Keep ICE attributes instead of removing them.
    pub keep_ice: bool,
    /// Put the relay address in `o=` too.
    pub replace_origin: bool,
    /// Interface facing the side this SDP is sent to (index into `interfaces`); by default
    /// the first interface of the address family of the next hop (see [`Options::to_v6`]),
    /// else the first one.
    pub interface: Option<usize>,
    /// Whether the recipient of this SDP is reached over IPv6, when known. With interfaces
    /// of both families this bridges IPv4 and IPv6 phones.
    pub to_v6: Option<bool>,
    /// The transport the recipient of an offer speaks (a browser: WebRTC), when signalling
    /// knows; by default the other side's so far, else the sender's (a browser's offer goes
    /// to a plain RTP phone). See [`secure`].
    pub to_profile: Option<Profile>,
    /// Record the call's media (ng `record-call`, or the proxy's recording policy). A
    /// recorded call stays on the relay: its streams are never handed to the kernel fast
    /// path, and the proxy plans no direct path for it.
    pub record: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("{0}")]
    Sdp(#[from] SdpError),
    #[error("no relay ports left")]
    PortsExhausted,
    #[error("session limit reached")]
    LoadLimit,
    #[error("more than {0} media streams in one call")]
    TooManyStreams(usize),
    #[error("unknown call")]
    UnknownCall,
    /// A secure stream cannot be set up (no crypto suite in common, no fingerprint).
    #[error("{0}")]
    Security(&'static str),
}

/// One of a call's two parties: A made the first offer, B answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::A, Side::B];

    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    /// `A` or `B`, as logs and reports name a side.
    pub fn label(self) -> &'static str {
        match self {
            Side::A => "A",
            Side::B => "B",
        }
    }
}

/// A value for each side of a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerSide<T>(pub [T; 2]);

impl<T> std::ops::Index<Side> for PerSide<T> {
    type Output = T;
    fn index(&self, side: Side) -> &T {
        &self.0[side as usize]
    }
}

impl<T> std::ops::IndexMut<Side> for PerSide<T> {
    fn index_mut(&mut self, side: Side) -> &mut T {
        &mut self.0[side as usize]
    }
}

/// RTP, or its RTCP companion on the next port up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Rtp,
    Rtcp,
}

impl Component {
    pub const BOTH: [Component; 2] = [Component::Rtp, Component::Rtcp];

    /// Port offset from the stream's RTP port.
    pub fn port_offset(self) -> u16 {
        self as u16
    }
}

/// A stream's packet counters: one per component and side, counting what that side sent.
#[derive(Debug, Clone, Default)]
pub struct StreamCounters([Arc<StreamStats>; 4]);

impl StreamCounters {
    pub fn get(&self, component: Component, side: Side) -> &Arc<StreamStats> {
        &self.0[component as usize * 2 + side as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<StreamStats>> {
        self.0.iter()
    }

    /// The round trip of the path `side`'s media takes through the relay: its leg and the
    /// other's, as their RTCP told them.
    pub fn path_rtt_us(&self, side: Side) -> Option<u32> {
        let leg = |side: Side| self.get(Component::Rtp, side).rtt_us();
        quality::path_rtt_us(leg(side), leg(side.other()))
    }
}

/// A call as a query reports it.
#[derive(Debug, Clone)]
pub struct CallInfo {
    pub created: Instant,
    pub last_signal: Instant,
    /// Tags of side A and side B (empty until known).
    pub tags: PerSide<String>,
    pub streams: Vec<StreamInfo>,
}

#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub kind: String,
    pub proto: String,
    /// RTP port each side sends to (RTCP is +1).
    pub ports: PerSide<RelayPort>,
    /// Each side's address from its SDP.
    pub sdp: PerSide<Option<SocketAddr>>,
    pub stats: StreamCounters,
    /// Each side's MOS samples so far.
    pub quality: PerSide<quality::Track>,
}

/// One side of a forwarding link, as the data plane needs it.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub iface: usize,
    pub bind: IpAddr,
    pub port: RelayPort,
    pub expected: Expected,
    pub mode: LatchMode,
    pub stats: Arc<StreamStats>,
    /// Already latched to this source (a call restored from another relay node).
    pub latched: Option<SocketAddr>,
}

/// What the data plane must do.
#[derive(Debug, Clone)]
pub enum Command {
    /// Bind both ports and forward between them: packets to `a` come from side A and leave
    /// from `b` towards B, and the other way round. `shard` keeps a call on one worker.
    Link { shard: u64, a: PortSpec, b: PortSpec },
    /// Signalling changed what to expect on a port; reopens its learning window.
    Expect { shard: u64, port: RelayPort, expected: Expected },
    /// Close these ports.
    Unlink { shard: u64, ports: Vec<RelayPort> },
    /// How the leg sending to RTP port `port` is secured (`None`: plain RTP), and whether
    /// it sends RTCP on that port too.
    Secure { shard: u64, port: RelayPort, setup: Option<Box<LegSetup>>, mux: bool },
    /// Start (`on`) or stop recording call `call_id` as recording `id`: what arrives on
    /// each port, sent by the side named.
    Record { shard: u64, id: u64, call_id: String, on: bool, ports: Vec<(RelayPort, Side)> },
}

/// Which way an answered call's media goes, as the relay sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaPath {
    /// RTP came through the relay within [`RTP_RECENT`].
    Relayed,
    /// No RTP through the relay for [`RTP_RECENT`], but its RTP ports still hear from the
    /// parties within [`KEEPALIVE_RECENT`]: their agents' keepalives, the media gone direct.
    Direct,
    /// Nothing at all lately (on hold, or not answered yet).
    Quiet,
}

/// See [`MediaPath`].
pub const RTP_RECENT: Duration = Duration::from_secs(2);
pub const KEEPALIVE_RECENT: Duration = Duration::from_secs(5);

impl MediaPath {
    pub fn label(self) -> &'static str {
        match self {
            MediaPath::Relayed => "relay",
            MediaPath::Direct => "direct",
            MediaPath::Quiet => "quiet",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    MediaTimeout,
    OfferTimeout,
    MaxDuration,
}

/// Things the owner of a call must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The relay ended the call; the owner should tear the dialog down (BYE both sides).
    Ended { call_id: String, reason: EndReason },
}

#[derive(Debug)]
struct Stream {
    kind: String,
    proto: String,
    /// Each side's address from its last SDP.
    sdp: PerSide<Option<SocketAddr>>,
    iface: PerSide<usize>,
    /// RTP port each side sends to (RTCP is +1).
    ports: PerSide<RelayPort>,
    stats: StreamCounters,
    /// Where each side's signalling came from, and how the stream latches: what its ports
    /// expect, kept for the call state a standby restores.
    signalling: PerSide<Option<IpAddr>>,
    mode: LatchMode,
    /// The latched sources last written to the call state, as `StreamCounters` orders them.
    saved_latches: [Option<SocketAddr>; 4],
    /// Each side's transport, when pinhole terminates it.
    sec: PerSide<secure::SideSec>,
    /// Each side's MOS samples (what that side sent).
    quality: PerSide<quality::Track>,
    /// Each side's RTCP report blocks already exported.
    rtcp_exported: PerSide<u64>,
}

#[derive(Debug)]
struct Call {
    serial: u64,
    tags: PerSide<String>,
    streams: Vec<Stream>,
    created: Instant,
    last_signal: Instant,
    answered: Option<Instant>,
    /// The side whose offer awaits an answer.
    pending_offer: Option<Side>,
    /// Per side, the last SDP received and what it was rewritten to, so retransmissions
    /// and repeated bodies (18x then 200) change nothing.
    last: PerSide<Option<(Vec<u8>, Vec<u8>)>>,
    /// Its media is being recorded.
    recording: bool,
}

impl Call {
    fn side_of(&self, tag: &str) -> Option<Side> {
        Side::BOTH.into_iter().find(|s| !self.tags[*s].is_empty() && self.tags[*s] == tag)
    }
}

pub struct Relay {
    cfg: RelayConfig,
    epoch: Instant,
    free: VecDeque<u16>,
    calls: HashMap<String, Call>,
    commands: VecDeque<Command>,
    events: VecDeque<Event>,
    next_serial: u64,
    /// Packets, bytes and drops of calls already deleted.
    ended: Totals,
    /// When a timeout can next be due (see [`Relay::poll_timeout`]).
    next_check: Option<Instant>,
    /// Calls whose state changed since [`Relay::poll_changed`] last took them, when the
    /// call state is kept for a standby (see [`Relay::keep_state`]).
    changed: std::collections::BTreeSet<String>,
    keep_state: bool,
    /// A standby mirrors another node's calls and ends none of them on its own.
    standby: bool,
    /// The certificate of the relay's DTLS-SRTP legs, made when the first WebRTC stream
    /// needs it (`None` until then, or if it could not be made: WebRTC offers are refused).
    identity: Option<Arc<Identity>>,
    /// When the streams are next sampled for quality.
    next_sample: Option<Instant>,
    /// Quality of calls released, for the owner's log line and metrics (the oldest
    /// dropped past [`MAX_RELEASED`] when nobody takes them).
    released: VecDeque<quality::CallQuality>,
    /// The latest RTCP report of each direction that sent one since the last sample, as
    /// JSON for a capture server: (Call-ID, JSON), the oldest dropped past [`MAX_RELEASED`].
    rtcp_reports: VecDeque<(String, String)>,
}

/// An RTCP report block as Homer's RTCP JSON (the field names captagent and rtpengine use),
/// with the round trip the relay worked out for the reporter's leg.
fn rtcp_json(sender_report: bool, b: &crate::rtcp::ReportBlock, rtt_us: Option<u32>) -> String {
    serde_json::json!({
        "type": if sender_report { 200 } else { 201 },
        "ssrc": b.reporter,
        "report_count": 1,
        "report_blocks": [{
            "source_ssrc": b.source,
            "fraction_lost": b.fraction_lost,
            "packets_lost": b.cumulative_lost,
            "highest_seq_no": b.highest_seq,
            "ia_jitter": b.jitter,
            "lsr": b.lsr,
            "dlsr": b.dlsr,
        }],
        "rtt_us": rtt_us,
    })
    .to_string()
}

/// Released calls' quality reports (and RTCP reports) kept for their poller.
const MAX_RELEASED: usize = 1024;

/// Queues `item`, forgetting the oldest past [`MAX_RELEASED`] (when nobody polls).
fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= MAX_RELEASED {
        q.pop_front();
    }
    q.push_back(item);
}

/// Relay-wide packet counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
}

impl Totals {
    fn add(&mut self, s: &StreamStats) {
        let snap = s.snapshot();
        self.packets += snap.packets;
        self.bytes += snap.bytes;
        self.dropped += snap.dropped;
    }
}

impl Relay {
    /// `epoch` is the zero of the data plane's `now_ns` clock (see [`StreamStats`]).
    pub fn new(cfg: RelayConfig, epoch: Instant) -> Relay {
        let first = cfg.port_min + cfg.port_min % 2;
        let free = (first..cfg.port_max).step_by(2).filter(|p| *p < cfg.port_max).collect();
        Relay {
            cfg,
            epoch,
            free,
            calls: HashMap::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            next_serial: 1,
            ended: Totals::default(),
            next_check: None,
            changed: Default::default(),
            keep_state: false,
            standby: false,
            identity: None,
            next_sample: None,
            released: VecDeque::new(),
            rtcp_reports: VecDeque::new(),
        }
    }

    /// The DTLS certificate's fingerprint (`sha-256 AB:…`), as the relay's SDP carries it,
    /// once a WebRTC stream made it.
    pub fn fingerprint(&self) -> Option<String> {
        self.identity.as_ref().map(|i| i.fingerprint_attr())
    }

    /// Uses `identity` for DTLS from now on (relays of one node share one).
    pub fn set_identity(&mut self, identity: Arc<Identity>) {
        self.identity = Some(identity);
    }

    /// Makes the relay's certificate the first time a WebRTC stream needs one (a few
    /// milliseconds, once).
    fn need_identity(&mut self) {
        if self.identity.is_none() {
            match Identity::generate() {
                Ok(id) => self.identity = Some(Arc::new(id)),
                Err(_) => metrics::counter!("pinhole_relay_identity_errors_total").increment(1),
            }
        }
    }

    /// Takes a port pair out of use (the data plane could not bind one of its ports).
    pub fn retire(&mut self, port: u16) {
        let rtp = port - port % 2;
        self.free.retain(|p| *p != rtp);
    }

    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// Calls this relay has started since it was made.
    pub fn calls_started(&self) -> u64 {
        self.next_serial - 1
    }

    /// Relay ports in use (RTP and RTCP).
    pub fn ports_in_use(&self) -> usize {
        self.calls.values().map(|c| c.streams.len() * 4).sum()
    }

    /// Packets relayed (accepted) and dropped so far, over ended and live calls.
    pub fn totals(&self) -> Totals {
        let mut t = self.ended;
        for c in self.calls.values() {
            for s in &c.streams {
                for st in s.stats.iter() {
                    t.add(st);
                }
            }
        }
        t
    }

    pub fn has_call(&self, call_id: &str) -> bool {
        self.calls.contains_key(call_id)
    }

    /// An SDP body from the party tagged `sender_tag` (the From tag of a request, the To
    /// tag of a response), classified as offer or answer by the call's state (RFC 3264):
    /// an SDP that follows the other side's outstanding offer is the answer.
    pub fn on_sdp(
        &mut self,
        now: Instant,
        call_id: &str,
        sender_tag: &str,
        sdp: &[u8],
        signalling_ip: Option<IpAddr>,
        opts: Options,
    ) -> Result<Vec<u8>, RelayError> {
        let is_answer = match self.calls.get(call_id) {
            None => false,
            Some(call) => {
                let side = call.side_of(sender_tag);
                if let Some((input, output)) = side.and_then(|s| call.last[s].as_ref()) {
                    if input == sdp {
                        return Ok(output.clone());
                    }
                }
                match (call.pending_offer, side) {
                    (Some(p), Some(s)) => p != s,
                    (Some(_), None) => true,
                    (None, _) => false,
                }
            }
        };
        if is_answer {
            self.answer(now, call_id, sender_tag, sdp, signalling_ip, opts)
        } else {
            self.offer(now, call_id, sender_tag, sdp, signalling_ip, opts)
        }
    }

    /// An SDP offer from the side tagged `from_tag`, to be sent on to the other side.
    /// Returns the rewritten body. `signalling_ip` is where the offerer's signalling came from.
    pub fn offer(
        &mut self,
        now: Instant,
        call_id: &str,
        from_tag: &str,
        sdp: &[u8],
        signalling_ip: Option<IpAddr>,
        opts: Options,
    ) -> Result<Vec<u8>, RelayError> {
        let parsed = Sdp::parse(sdp)?;
        if parsed.media.len() > self.cfg.max_streams {
            return Err(RelayError::TooManyStreams(self.cfg.max_streams));
        }
        if !self.calls.contains_key(call_id) {
            if self.calls.len() >= self.cfg.max_sessions {
                return Err(RelayError::LoadLimit);
            }
            let serial = self.next_serial;
            self.next_serial += 1;
            self.calls.insert(
                call_id.to_owned(),
                Call {
                    serial,
                    tags: PerSide([from_tag.to_owned(), String::new()]),
                    streams: Vec::new(),
                    created: now,
                    last_signal: now,
                    answered: None,
                    pending_offer: None,
                    last: PerSide([None, None]),
                    recording: false,
                },
            );
        }
        // An offer from a tag the call does not know yet comes from side A.
        let side = self.calls.get(call_id).and_then(|c| c.side_of(from_tag)).unwrap_or(Side::A);
        let record = opts.record;
        let out = self.apply(call_id, side, &parsed, signalling_ip, opts, true)?;
        self.remember(now, call_id, side, sdp, &out, Some(side));
        self.plan_check(call_id);
        self.keep_recording(call_id, record);
        Ok(out)
    }

    /// The answer from the side tagged `to_tag` to an offer from `from_tag`.
    pub fn answer(
        &mut self,
        now: Instant,
        call_id: &str,
        to_tag: &str,
        sdp: &[u8],
        signalling_ip: Option<IpAddr>,
        opts: Options,
    ) -> Result<Vec<u8>, RelayError> {
        let parsed = Sdp::parse(sdp)?;
        if parsed.media.len() > self.cfg.max_streams {
            return Err(RelayError::TooManyStreams(self.cfg.max_streams));
        }
        let call = self.calls.get_mut(call_id).ok_or(RelayError::UnknownCall)?;
        let side = match call.side_of(to_tag) {
            Some(s) => s,
            None => {
                // The first answer names side B (later forks' answers replace it).
                call.tags[Side::B] = to_tag.to_owned();
                Side::B
            }
        };
        if call.answered.is_none() {
            call.answered = Some(now);
        }
        let record = opts.record;
        let out = self.apply(call_id, side, &parsed, signalling_ip, opts, false)?;
        self.remember(now, call_id, side, sdp, &out, None);
        self.plan_check(call_id);
        self.keep_recording(call_id, record);
        Ok(out)
    }

    /// Starts or stops recording a call's media (ng `start recording` / `stop recording`);
    /// false for an unknown call.
    /// Without a recorder ([`RelayConfig::can_record`]) nothing is recorded: false.
    pub fn set_recording(&mut self, call_id: &str, on: bool) -> bool {
        if !self.cfg.can_record {
            return false;
        }
        let Some(call) = self.calls.get_mut(call_id) else { return false };
        call.recording = on;
        self.commands.push_back(Self::record_command(call_id, call, on));
        self.mark_changed(call_id);
        true
    }

    /// Records (or stops recording) every port of `call`, as recording `call.serial`.
    fn record_command(call_id: &str, call: &Call, on: bool) -> Command {
        Command::Record {
            shard: call.serial,
            id: call.serial,
            call_id: call_id.to_owned(),
            on,
            ports: Self::recorded_ports(call),
        }
    }

    /// After an offer or answer: a call to be recorded (or being recorded) has every port
    /// recorded, the new streams' too.
    fn keep_recording(&mut self, call_id: &str, asked: bool) {
        if asked || self.calls.get(call_id).is_some_and(|c| c.recording) {
            self.set_recording(call_id, true);
        }
    }

    fn recorded_ports(call: &Call) -> Vec<(RelayPort, Side)> {
        let mut ports = Vec::new();
        for s in &call.streams {
            for side in Side::BOTH {
                ports.push((s.ports[side], side));
                ports.push((RelayPort(s.ports[side].0 + 1), side));
            }
        }
        ports
    }

    /// Whether a call's media is being recorded.
    pub fn recording(&self, call_id: &str) -> bool {
        self.calls.get(call_id).is_some_and(|c| c.recording)
    }

    /// Ends a call and frees its ports.
    pub fn delete(&mut self, call_id: &str) -> bool {
        let Some(call) = self.calls.remove(call_id) else {
            return false;
        };
        if call.recording {
            self.commands.push_back(Self::record_command(call_id, &call, false));
        }
        self.mark_changed(call_id);
        let report = Self::call_quality(call_id, &call);
        if !report.directions.is_empty() {
            push_bounded(&mut self.released, report);
        }
        let mut ports = Vec::new();
        for s in &call.streams {
            for st in s.stats.iter() {
                self.ended.add(st);
            }
            for p in s.ports.0 {
                ports.push(p);
                ports.push(RelayPort(p.0 + 1));
                self.free.push_back(p.0);
            }
        }
        if !ports.is_empty() {
            self.commands.push_back(Command::Unlink { shard: call.serial, ports });
        }
        true
    }

    /// Each direction of the call's streams that carried RTP, measured over the whole call.
    fn directions(call: &Call) -> Vec<quality::Direction> {
        let mut out = Vec::new();
        for (i, s) in call.streams.iter().enumerate() {
            for side in Side::BOTH {
                let stats = s.stats.get(Component::Rtp, side);
                if stats.expected() == 0 {
                    continue;
                }
                let rtt = s.stats.path_rtt_us(side);
                out.push(quality::Direction::measure((i, side), stats, rtt, &s.quality[side]));
            }
        }
        out
    }

    /// The call's quality so far, as a release would report it.
    pub fn quality(&self, call_id: &str) -> Option<quality::CallQuality> {
        Some(Self::call_quality(call_id, self.calls.get(call_id)?))
    }

    fn call_quality(call_id: &str, call: &Call) -> quality::CallQuality {
        quality::CallQuality { call_id: call_id.to_owned(), directions: Self::directions(call) }
    }

    /// A released call's quality (each direction that carried RTP), oldest first.
    pub fn poll_released(&mut self) -> Option<quality::CallQuality> {
        self.released.pop_front()
    }

    /// Every [`quality::SAMPLE_INTERVAL`], samples each stream's directions for their lowest
    /// and highest MOS. Call it about once a second; it does nothing in between.
    pub fn sample_quality(&mut self, now: Instant) {
        if self.next_sample.is_some_and(|t| now < t) {
            return;
        }
        self.next_sample = Some(now + quality::SAMPLE_INTERVAL);
        for (call_id, call) in &mut self.calls {
            for s in &mut call.streams {
                for side in Side::BOTH {
                    let rtt = s.stats.path_rtt_us(side);
                    let stats = s.stats.get(Component::Rtp, side);
                    s.quality[side].sample(now, stats, rtt);
                    let (count, last) = stats.last_report();
                    if let (true, Some((sr, block))) = (count != s.rtcp_exported[side], last) {
                        s.rtcp_exported[side] = count;
                        push_bounded(&mut self.rtcp_reports, (call_id.clone(), rtcp_json(sr, &block, stats.rtt_us())));
                    }
                }
            }
        }
    }

    /// The latest RTCP report of a direction, sampled for a capture server: (Call-ID, JSON).
    pub fn poll_rtcp_report(&mut self) -> Option<(String, String)> {
        self.rtcp_reports.pop_front()
    }

    /// Statistics of a call's streams: per stream, per side (packets that side sent).
    pub fn stats(&self, call_id: &str) -> Option<Vec<StreamCounters>> {
        self.calls.get(call_id).map(|c| c.streams.iter().map(|s| s.stats.clone()).collect())
    }

    /// What a query reports about a call.
    pub fn describe(&self, call_id: &str) -> Option<CallInfo> {
        self.calls.get(call_id).map(|c| CallInfo {
            created: c.created,
            last_signal: c.last_signal,
            tags: c.tags.clone(),
            streams: c
                .streams
                .iter()
                .map(|s| StreamInfo {
                    kind: s.kind.clone(),
                    proto: s.proto.clone(),
                    ports: s.ports,
                    sdp: s.sdp,
                    stats: s.stats.clone(),
                    quality: s.quality,
                })
                .collect(),
        })
    }

    /// The call whose party sends to relay port `port` (an RTP port), and which side.
    pub fn call_of_port(&self, port: u16) -> Option<(&str, Side)> {
        self.calls.iter().find_map(|(id, c)| {
            c.streams
                .iter()
                .find_map(|s| Side::BOTH.into_iter().find(|side| s.ports[*side].0 == port))
                .map(|side| (id.as_str(), side))
        })
    }

    /// The relay port the other party of `port`'s stream sends to (both RTP ports).
    pub fn peer_port(&self, port: u16) -> Option<u16> {
        self.calls.values().flat_map(|c| &c.streams).find_map(|s| {
            Side::BOTH.into_iter().find(|side| s.ports[*side].0 == port).map(|side| s.ports[side.other()].0)
        })
    }

    /// The party that sends to relay port `port` is reached at `to` from now on, and only
    /// packets from `to` are its media (its leg now comes through the fake-TCP forwarder,
    /// which speaks for it from `to`). False for a port no call uses.
    ///
    /// An odd `port` is the RTCP port of a leg: its companion moves the same way (the SDP
    /// address stays the RTP one's).
    pub fn retarget(&mut self, now: Instant, port: u16, to: SocketAddr) -> bool {
        let rtcp = port % 2 == 1;
        let rtp_port = if rtcp { port - 1 } else { port };
        let Some((call_id, side)) = self.call_of_port(rtp_port) else { return false };
        let call_id = call_id.to_owned();
        let Some(call) = self.calls.get_mut(&call_id) else { return false };
        let Some(stream) = call.streams.iter_mut().find(|s| s.ports[side].0 == rtp_port) else { return false };
        if !rtcp {
            stream.sdp[side] = Some(to);
            stream.signalling[side] = None;
        }
        let expected = Expected { sdp: Some(to), signalling_ip: None };
        call.last_signal = now;
        self.commands.push_back(Command::Expect { shard: call.serial, port: RelayPort(port), expected });
        self.mark_changed(&call_id);
        true
    }

    /// Which way the call's media goes now (see [`MediaPath`]).
    pub fn media_path(&self, call_id: &str, now: Instant) -> Option<MediaPath> {
        let c = self.calls.get(call_id)?;
        let since = |ns: u64| (ns != 0).then(|| now.saturating_duration_since(self.epoch + Duration::from_nanos(ns)));
        let rtp_ports = c.streams.iter().flat_map(|s| Side::BOTH.map(|side| s.stats.get(Component::Rtp, side).clone()));
        let (mut rtp, mut any) = (None::<Duration>, None::<Duration>);
        for st in rtp_ports {
            let fresher = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            };
            rtp = fresher(rtp, since(st.last_rtp_ns.load(std::sync::atomic::Ordering::Relaxed)));
            any = fresher(any, since(st.last_ns.load(std::sync::atomic::Ordering::Relaxed)));
        }
        Some(if rtp.is_some_and(|d| d <= RTP_RECENT) {
            MediaPath::Relayed
        } else if any.is_some_and(|d| d <= KEEPALIVE_RECENT) {
            MediaPath::Direct
        } else {
            MediaPath::Quiet
        })
    }

    /// Call-IDs of the calls in progress.
    pub fn list(&self) -> Vec<String> {
        self.calls.keys().cloned().collect()
    }

    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Relay::handle_timeout`] should next run: the earliest offer, media or
    /// duration deadline of any call as of the last check (media that arrived since only
    /// moves deadlines later, so waking early is harmless). `None` without calls.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_check.filter(|_| !self.calls.is_empty() && !self.standby)
    }

    /// The deadline of one call: when it would end if nothing more happened.
    fn deadline(&self, c: &Call) -> (Instant, EndReason) {
        let cfg = &self.cfg;
        let longest = (c.created + cfg.max_duration, EndReason::MaxDuration);
        let other = match c.answered {
            None => (c.created + cfg.offer_timeout, EndReason::OfferTimeout),
            Some(answered) => {
                let last_ns = c
                    .streams
                    .iter()
                    .flat_map(|s| s.stats.iter())
                    .map(|st| st.last_ns.load(std::sync::atomic::Ordering::Relaxed))
                    .max()
                    .unwrap_or(0);
                let last =
                    if last_ns == 0 { answered } else { (self.epoch + Duration::from_nanos(last_ns)).max(answered) };
                (last + cfg.media_timeout, EndReason::MediaTimeout)
            }
        };
        if longest.0 <= other.0 {
            longest
        } else {
            other
        }
    }

    /// Ends the calls whose offer, media or duration deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.standby {
            self.next_check = None;
            return;
        }
        let mut ended = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, c) in &self.calls {
            let (at, reason) = self.deadline(c);
            if at <= now {
                ended.push((id.clone(), reason));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        self.next_check = next;
        for (id, reason) in ended {
            self.delete(&id);
            self.events.push_back(Event::Ended { call_id: id, reason });
        }
    }

    /// A call's deadline may now be earlier than planned.
    fn plan_check(&mut self, call_id: &str) {
        if let Some(c) = self.calls.get(call_id) {
            let (at, _) = self.deadline(c);
            self.next_check = Some(self.next_check.map_or(at, |n| n.min(at)));
        }
    }

    fn remember(
        &mut self,
        now: Instant,
        call_id: &str,
        side: Side,
        input: &[u8],
        output: &[u8],
        pending: Option<Side>,
    ) {
        if let Some(c) = self.calls.get_mut(call_id) {
            c.last_signal = now;
            c.last[side] = Some((input.to_vec(), output.to_vec()));
            c.pending_offer = pending;
        }
        self.mark_changed(call_id);
    }

    fn allocate(&mut self) -> Result<RelayPort, RelayError> {
        self.free.pop_front().map(RelayPort).ok_or(RelayError::PortsExhausted)
    }

    /// Applies an offer or answer from `side`: updates what that side's ports expect and
    /// rewrites the SDP with the other side's ports.
    fn apply(
        &mut self,
        call_id: &str,
        side: Side,
        sdp: &Sdp<'_>,
        signalling_ip: Option<IpAddr>,
        opts: Options,
        offer: bool,
    ) -> Result<Vec<u8>, RelayError> {
        if opts.to_profile == Some(Profile::WebRtc) || sdp.media.iter().any(|m| Profile::of(m) == Some(Profile::WebRtc))
        {
            self.need_identity();
        }
        let other = side.other();
        let ifaces = &self.cfg.interfaces;
        let family = |v6: bool| ifaces.iter().position(|i| i.advertise.is_ipv6() == v6);
        let out_iface =
            opts.interface.or_else(|| opts.to_v6.and_then(family)).unwrap_or(0).min(ifaces.len().saturating_sub(1));
        // The sender's side faces it on an interface of its SDP's address family.
        let in_ifaces: Vec<usize> =
            sdp.media.iter().map(|m| m.addr.and_then(|a| family(a.is_ipv6())).unwrap_or(out_iface)).collect();
        // Allocate ports for new streams first, so a failure changes nothing.
        let have = self.calls.get(call_id).map_or(0, |c| c.streams.len());
        let need = sdp.media.len().saturating_sub(have);
        if self.free.len() < need * 2 {
            return Err(RelayError::PortsExhausted);
        }
        let mut fresh = Vec::new();
        for _ in 0..need {
            fresh.push(PerSide([self.allocate()?, self.allocate()?]));
        }
        let Some(call) = self.calls.get_mut(call_id) else {
            return Err(RelayError::UnknownCall);
        };
        let serial = call.serial;
        let mut anchors = Vec::with_capacity(sdp.media.len());
        let mut transports = Vec::with_capacity(sdp.media.len());
        let mut ice_lite = false;
        for (i, m) in sdp.media.iter().enumerate() {
            let expected_rtp = Expected { sdp: m.addr.map(|a| SocketAddr::new(a, m.port)), signalling_ip };
            let rtcp_port = if m.rtcp_mux { m.port } else { m.rtcp_port.unwrap_or(m.port.saturating_add(1)) };
            let expected_rtcp = Expected { sdp: m.addr.map(|a| SocketAddr::new(a, rtcp_port)), signalling_ip };
            if i >= call.streams.len() {
                let ports = fresh.remove(0);
                let mut iface = PerSide([out_iface; 2]);
                iface[side] = in_ifaces[i];
                let stats = StreamCounters::default();
                for component in Component::BOTH {
                    // Only the sender of this SDP says what to expect; the other side learns.
                    let mut expected = PerSide([Expected::default(); 2]);
                    expected[side] = if component == Component::Rtp { expected_rtp } else { expected_rtcp };
                    let spec = |s: Side| PortSpec {
                        iface: iface[s],
                        bind: self.cfg.interfaces[iface[s]].bind,
                        port: RelayPort(ports[s].0 + component.port_offset()),
                        expected: expected[s],
                        mode: opts.mode,
                        stats: stats.get(component, s).clone(),
                        latched: None,
                    };
                    self.commands.push_back(Command::Link { shard: serial, a: spec(Side::A), b: spec(Side::B) });
                }
                let mut sdp_addr = PerSide([None, None]);
                sdp_addr[side] = expected_rtp.sdp;
                let mut signalling = PerSide([None, None]);
                signalling[side] = signalling_ip;
                call.streams.push(Stream {
                    kind: m.kind.clone(),
                    proto: m.proto.clone(),
                    sdp: sdp_addr,
                    iface,
                    ports,
                    stats,
                    signalling,
                    mode: opts.mode,
                    saved_latches: [None; 4],
                    sec: PerSide::default(),
                    quality: PerSide::default(),
                    rtcp_exported: PerSide::default(),
                });
            } else {
                call.streams[i].sdp[side] = expected_rtp.sdp;
                call.streams[i].signalling[side] = signalling_ip;
                let s = &call.streams[i];
                for (port, e) in [(s.ports[side], expected_rtp), (RelayPort(s.ports[side].0 + 1), expected_rtcp)] {
                    self.commands.push_back(Command::Expect { shard: serial, port, expected: e });
                }
            }
            let s = &mut call.streams[i];
            let terminated =
                secure::negotiate(&mut s.sec, side, m, offer, opts.to_profile, i).map_err(RelayError::Security)?;
            let iface = &self.cfg.interfaces[s.iface[other]];
            let transport = if terminated {
                let t = secure::transport(
                    &s.sec[other],
                    offer,
                    s.sec[side].mux,
                    self.identity.as_ref(),
                    iface.advertise,
                    s.ports[other].0,
                )
                .map_err(RelayError::Security)?;
                for leg in Side::BOTH {
                    self.commands.push_back(Command::Secure {
                        shard: serial,
                        port: s.ports[leg],
                        setup: secure::leg_setup(&s.sec[leg], self.identity.as_ref()).map(Box::new),
                        mux: s.sec[leg].mux,
                    });
                }
                t
            } else {
                None
            };
            if transport.as_ref().is_some_and(|t| t.add.iter().any(|a| a.starts_with("ice-ufrag"))) {
                ice_lite = true;
            }
            transports.push(transport);
            anchors.push(m.is_active().then_some(Anchor {
                addr: iface.advertise,
                rtp_port: s.ports[other].0,
                rtcp_port: s.ports[other].0 + 1,
            }));
        }
        let origin = opts.replace_origin.then(|| self.cfg.interfaces[out_iface].advertise);
        let mut session_add = Vec::new();
        if ice_lite {
            session_add.push("ice-lite".to_owned());
            // One WebRTC section (the audio of a call) is bundled on its own; several each
            // keep a transport of their own (no group: the browser does not bundle them).
            let mids: Vec<&str> = transports
                .iter()
                .flatten()
                .filter(|t| t.proto == Profile::WebRtc.proto())
                .filter_map(|t| t.add.iter().find_map(|a| a.strip_prefix("mid:")))
                .collect();
            if let [mid] = mids[..] {
                session_add.push(format!("group:BUNDLE {mid}"));
            }
        }
        Ok(sdp.rewrite(&Rewrite {
            media: anchors,
            origin,
            remove_ice: !opts.keep_ice,
            transport: transports,
            session_add,
        }))
    }
}

mod secure;
mod state;
pub use state::{CallState, RestoreError, StreamState};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latch::RtpInfo;

    fn relay(now: Instant) -> Relay {
        Relay::new(
            RelayConfig { max_sessions: 3, ..RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30019) },
            now,
        )
    }

    fn sdp(addr: &str, port: u16) -> Vec<u8> {
        format!("v=0\r\no=- 1 1 IN IP4 {addr}\r\ns=-\r\nc=IN IP4 {addr}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
            .into_bytes()
    }

    fn port_of(body: &[u8]) -> u16 {
        Sdp::parse(body).expect("sdp").media[0].port
    }

    #[test]
    fn offer_and_answer_get_distinct_stable_relay_ports() {
        let t = Instant::now();
        let mut r = relay(t);
        let o = r.offer(t, "c1", "a", &sdp("198.51.100.10", 4000), None, Options::default()).expect("offer");
        let a = r.answer(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("answer");
        let (po, pa) = (port_of(&o), port_of(&a));
        assert_ne!(po, pa);
        assert_eq!(po % 2, 0);
        assert!(String::from_utf8_lossy(&o).contains("c=IN IP4 203.0.113.1"));
        // A re-INVITE from B (B offers, A answers) keeps every port.
        let o2 = r.offer(t, "c1", "b", &sdp("198.51.100.20", 5002), None, Options::default()).expect("reoffer");
        let a2 = r.answer(t, "c1", "a", &sdp("198.51.100.10", 4000), None, Options::default()).expect("reanswer");
        assert_eq!(port_of(&o2), pa, "B's re-offer goes to A with A's ports");
        assert_eq!(port_of(&a2), po);
        assert_eq!(r.ports_in_use(), 4);
    }

    #[test]
    fn link_commands_describe_both_directions_and_delete_frees_ports() {
        let t = Instant::now();
        let mut r = relay(t);
        r.offer(
            t,
            "c1",
            "a",
            &sdp("198.51.100.10", 4000),
            Some("203.0.113.2".parse().expect("ip")),
            Options::default(),
        )
        .expect("offer");
        let links: Vec<_> = std::iter::from_fn(|| r.poll_command()).collect();
        assert_eq!(links.len(), 2, "RTP and RTCP links");
        let Command::Link { a, b, .. } = &links[0] else { panic!("link") };
        assert_eq!(a.expected.sdp, Some("198.51.100.10:4000".parse().expect("addr")));
        assert_eq!(a.expected.signalling_ip, Some("203.0.113.2".parse().expect("ip")));
        assert_eq!(b.expected, Expected::default(), "B unknown until it answers");
        r.answer(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("answer");
        let updates: Vec<_> = std::iter::from_fn(|| r.poll_command()).collect();
        assert!(matches!(updates[0], Command::Expect { port, .. } if port == b.port));
        assert!(r.delete("c1"));
        let Some(Command::Unlink { ports, .. }) = r.poll_command() else { panic!("unlink") };
        assert_eq!(ports.len(), 4);
        assert_eq!(r.call_count(), 0);
        assert_eq!(r.ports_in_use(), 0);
    }

    #[test]
    fn exhausted_ports_and_session_limit_are_errors_that_change_nothing() {
        let t = Instant::now();
        let mut r = relay(t);
        // 10 pairs in range 30000..=30019; two calls with two streams each use 8 pairs.
        let two = b"v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\nm=video 4002 RTP/AVP 96\r\n";
        r.offer(t, "c1", "a", two, None, Options::default()).expect("c1");
        r.offer(t, "c2", "a", two, None, Options::default()).expect("c2");
        assert_eq!(r.offer(t, "c3", "a", two, None, Options::default()), Err(RelayError::PortsExhausted));
        r.offer(t, "c3", "a", &sdp("198.51.100.1", 4000), None, Options::default()).expect("c3 fits");
        assert_eq!(
            r.offer(t, "c4", "a", &sdp("198.51.100.1", 4000), None, Options::default()),
            Err(RelayError::LoadLimit)
        );
    }

    #[test]
    fn a_leg_moved_to_the_forwarder_expects_its_media_from_there_only() {
        let t = Instant::now();
        let mut r = relay(t);
        r.offer(t, "c1", "a", &sdp("198.51.100.10", 4000), None, Options::default()).expect("offer");
        r.answer(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("answer");
        while r.poll_command().is_some() {}
        let info = r.describe("c1").expect("call");
        let b_port = info.streams[0].ports[Side::B].0;
        assert_eq!(r.call_of_port(b_port), Some(("c1", Side::B)));
        assert_eq!(r.call_of_port(b_port + 1), None, "RTCP ports are not legs");
        let shim: SocketAddr = "203.0.113.1:50123".parse().expect("addr");
        assert!(r.retarget(t, b_port, shim));
        match r.poll_command() {
            Some(Command::Expect { port, expected, .. }) => {
                assert_eq!(port.0, b_port);
                assert_eq!(expected, Expected { sdp: Some(shim), signalling_ip: None });
            }
            other => panic!("expected an Expect, got {other:?}"),
        }
        assert_eq!(r.describe("c1").expect("call").streams[0].sdp[Side::B], Some(shim));
        // Its RTCP port moves too, to a shim of its own.
        let rtcp_shim: SocketAddr = "203.0.113.1:50125".parse().expect("addr");
        assert!(r.retarget(t, b_port + 1, rtcp_shim));
        match r.poll_command() {
            Some(Command::Expect { port, expected, .. }) => {
                assert_eq!((port.0, expected.sdp), (b_port + 1, Some(rtcp_shim)));
            }
            other => panic!("expected an Expect, got {other:?}"),
        }
        assert_eq!(r.describe("c1").expect("call").streams[0].sdp[Side::B], Some(shim), "the SDP address stays");
        assert!(!r.retarget(t, 1, shim), "no call uses port 1");
    }

    #[test]
    fn a_call_whose_media_went_direct_shows_as_direct_and_its_keepalives_hold_it_open() {
        let t = Instant::now();
        let mut r = relay(t);
        r.offer(t, "c1", "a", &sdp("198.51.100.10", 4000), None, Options::default()).expect("offer");
        r.answer(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("answer");
        let stats = r.stats("c1").expect("stats");
        let at = |s: u64| Duration::from_secs(s).as_nanos() as u64;
        let rtp = RtpInfo { ssrc: 1, seq: 1, timestamp: 160, payload_type: 0 };
        stats[0].get(Component::Rtp, Side::A).on_packet(at(1), 172, Some(rtp));
        assert_eq!(r.media_path("c1", t + Duration::from_secs(2)), Some(MediaPath::Relayed));
        // Then only the agents' keepalives (STUN, not RTP), every 2 s for two minutes.
        for k in 1..60 {
            stats[0].get(Component::Rtp, Side::B).on_packet(at(1 + 2 * k), 92, None);
            r.handle_timeout(t + Duration::from_secs(2 + 2 * k));
            assert_eq!(r.poll_event(), None, "the 60 s media timeout counts keepalives");
        }
        assert_eq!(r.media_path("c1", t + Duration::from_secs(120)), Some(MediaPath::Direct));
        assert_eq!(r.media_path("c1", t + Duration::from_secs(130)), Some(MediaPath::Quiet));
        assert_eq!(r.media_path("nope", t), None);
    }

    #[test]
    fn media_timeout_ends_the_call_and_frees_ports() {
        let t = Instant::now();
        let mut r = relay(t);
        r.offer(t, "c1", "a", &sdp("198.51.100.10", 4000), None, Options::default()).expect("offer");
        r.answer(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("answer");
        // Media flows for 30 s, then stops.
        let stats = r.stats("c1").expect("stats");
        stats[0].get(Component::Rtp, Side::A).on_packet(Duration::from_secs(30).as_nanos() as u64, 172, None);
        r.handle_timeout(t + Duration::from_secs(80));
        assert_eq!(r.poll_event(), None, "50 s of silence is under the 60 s timeout");
        r.handle_timeout(t + Duration::from_secs(91));
        assert_eq!(r.poll_event(), Some(Event::Ended { call_id: "c1".into(), reason: EndReason::MediaTimeout }));
        assert_eq!(r.ports_in_use(), 0);
    }

    #[test]
    fn unanswered_offer_times_out() {
        let t = Instant::now();
        let mut r = relay(t);
        r.offer(t, "c1", "a", &sdp("198.51.100.10", 4000), None, Options::default()).expect("offer");
        r.handle_timeout(t + Duration::from_secs(201));
        assert!(matches!(r.poll_event(), Some(Event::Ended { reason: EndReason::OfferTimeout, .. })));
    }

    #[test]
    fn sdp_bodies_are_classified_by_offer_answer_state() {
        let t = Instant::now();
        let mut r = relay(t);
        let o = r.on_sdp(t, "c1", "a", &sdp("198.51.100.10", 4000), None, Options::default()).expect("offer");
        // 183 and then 200 from B carry the same answer: one answer, same rewrite.
        let a1 = r.on_sdp(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("183");
        let a2 = r.on_sdp(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("200");
        assert_eq!(a1, a2);
        assert_ne!(port_of(&o), port_of(&a1));
        // B's re-INVITE (new SDP) is an offer; A's reply to it is the answer.
        let o2 = r.on_sdp(t, "c1", "b", &sdp("198.51.100.20", 5002), None, Options::default()).expect("reoffer");
        assert_eq!(port_of(&o2), port_of(&a1));
        let a3 = r.on_sdp(t, "c1", "a", &sdp("198.51.100.10", 4002), None, Options::default()).expect("reanswer");
        assert_eq!(port_of(&a3), port_of(&o));
        assert_eq!(r.ports_in_use(), 4);
    }

    #[test]
    fn ipv6_phone_and_ipv4_phone_are_bridged_across_interfaces() {
        let t = Instant::now();
        let mut cfg = relay(t).cfg;
        cfg.interfaces.push(RelayInterface {
            name: "v6".into(),
            bind: "2001:db8::1".parse().expect("ip"),
            advertise: "2001:db8::1".parse().expect("ip"),
        });
        let mut r = Relay::new(cfg, t);
        let v6_offer =
            b"v=0\r\no=- 1 1 IN IP6 2001:db8::7\r\ns=-\r\nc=IN IP6 2001:db8::7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
        let opts = Options { to_v6: Some(false), ..Options::default() };
        let o = r.offer(t, "c1", "a", v6_offer, None, opts).expect("offer");
        assert!(String::from_utf8_lossy(&o).contains("c=IN IP4 203.0.113.1"), "offer goes to the v4 phone");
        let a = r.answer(t, "c1", "b", &sdp("198.51.100.20", 5000), None, Options::default()).expect("answer");
        assert!(String::from_utf8_lossy(&a).contains("c=IN IP6 2001:db8::1"), "answer goes to the v6 phone");
        let links: Vec<_> = std::iter::from_fn(|| r.poll_command()).collect();
        let Command::Link { a: pa, b: pb, .. } = &links[0] else { panic!("link") };
        assert_eq!(pa.bind, "2001:db8::1".parse::<IpAddr>().expect("ip"));
        assert_eq!(pb.bind, "203.0.113.1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn bad_sdp_is_an_error_and_creates_no_call() {
        let t = Instant::now();
        let mut r = relay(t);
        assert!(matches!(r.offer(t, "c1", "a", b"garbage", None, Options::default()), Err(RelayError::Sdp(_))));
        assert_eq!(r.call_count(), 0);
        assert_eq!(
            r.answer(t, "nope", "b", &sdp("198.51.100.1", 1), None, Options::default()),
            Err(RelayError::UnknownCall)
        );
    }
}
