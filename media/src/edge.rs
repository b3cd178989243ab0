//! An agent's media, sans-IO: the relay links its [`Relay`](crate::relay::Relay) makes
//! (a phone port on the LAN, a window port towards the server relay), each call's
//! [`DirectPath`] on its window, and the rule for every packet. The shell owns the sockets
//! (the relay ports, and a birthday's extra sockets) and does what this says.
//!
//! Per packet on a call with a path:
//! - on the window: STUN and null packets go to the path (checks, announcements, the
//!   server's STUN answers); media from the relay, or from a source that passed a signed
//!   check, goes to the phone; anything else is the latch's to judge (and drop);
//! - on the phone port: the phone's media leaves by the path's route, the relay until a
//!   direct path is proven, then the direct path.
//!
//! RTCP (the next port up) stays on the relay.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::faketcp::client::{Phase as TunnelPhase, Tunnel};
use crate::faketcp::direct::DirectPhase;
use crate::faketcp::Segment;
use crate::portmap::PortMapper;
use crate::ports::PortTable;
use crate::punch::path::{DirectPath, PathEvent, Phase, Route};
use crate::punch::scheduler::PunchPlan;
use crate::relay::Command;

/// Calls with a punch plan at once; later plans are ignored (those calls stay relayed).
pub const MAX_PATHS: usize = 1024;
/// Extra sockets (a birthday's hard side) open at once, over all paths.
pub const MAX_EXTRA_SOCKETS: usize = 2048;

/// One of the agent's media sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Socket {
    /// A relay port.
    Port(u16),
    /// Extra socket `index` (1..) of the path on window port `window`.
    Extra { window: u16, index: usize },
    /// The raw TCP socket, sending a fake-TCP segment (TCP header and payload) from local
    /// port `port` (the shell adds the IP header).
    Tcp { port: u16 },
}

/// Sockets the shell must open or close for a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketRequest {
    /// `count` more sockets on the media address for window `window`: indexes 1..=count.
    Open {
        window: u16,
        count: usize,
    },
    Close {
        window: u16,
    },
}

/// Where a datagram goes on: at most two copies (from which socket, to where).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sends(pub [Option<(Socket, SocketAddr)>; 2]);

impl Sends {
    pub const NONE: Sends = Sends([None, None]);

    pub fn iter(&self) -> impl Iterator<Item = (Socket, SocketAddr)> + '_ {
        self.0.iter().flatten().copied()
    }

    /// The first (or only) copy.
    pub fn first(&self) -> Option<(Socket, SocketAddr)> {
        self.0[0]
    }
}

/// A tunnel's news: its phase now, its direct path's if it was introduced to the other
/// end, and how many connections it has opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEvent {
    pub window: u16,
    pub phase: TunnelPhase,
    pub direct: Option<DirectPhase>,
    pub connections: u32,
}

/// A path's news, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeEvent {
    pub call_id: String,
    pub method: &'static str,
    pub event: PathEvent,
}

struct Session {
    call_id: String,
    path: DirectPath,
}

/// Calls whose relay leg goes over fake TCP at once, at most.
pub const MAX_TUNNELS: usize = 1024;
/// A leg whose relay has not been heard on its window this long after the forwarder was
/// offered goes over fake TCP (UDP to the relay does not get through, though STUN did).
pub const RELAY_SILENCE: Duration = Duration::from_secs(3);

/// A leg's way to the forwarder: from our address `local_ip` to `server`, proving the
/// leg with `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    pub local_ip: Ipv4Addr,
    pub server: SocketAddrV4,
    pub key: String,
}

/// A forwarder offer held in reserve for a window, until its deadline.
struct Standby {
    spec: TunnelSpec,
    deadline: Instant,
}

pub struct EdgeMedia {
    ports: PortTable<()>,
    /// Paths by window port.
    paths: HashMap<u16, Session>,
    /// Fake-TCP tunnels by window port: the leg to the server relay goes over them, with
    /// the phase last reported.
    tunnels: HashMap<u16, Tunnel>,
    tunnel_phases: HashMap<u16, (TunnelPhase, Option<DirectPhase>)>,
    tunnel_events: VecDeque<TunnelEvent>,
    /// Forwarder offers in reserve, by window.
    standby: HashMap<u16, Standby>,
    stun: SocketAddr,
    epoch: Instant,
    requests: VecDeque<SocketRequest>,
    events: VecDeque<EdgeEvent>,
    out: VecDeque<(Socket, SocketAddr, Vec<u8>)>,
    /// The LAN's gateway maps ports on request (the agent found so at start): its address
    /// and ours. Each punched window then gets a mapping of its own.
    portmap: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Those mappings, by window port.
    mappers: HashMap<u16, PortMapper>,
}

/// How long a window's mapping is asked for (renewed at half; deleted with its call).
const MAPPING_LIFETIME: u32 = 3600;

impl EdgeMedia {
    /// Ports `port_min..=port_max`; `stun` is the server's STUN service.
    pub fn new(port_min: u16, port_max: u16, stun: SocketAddr, epoch: Instant) -> EdgeMedia {
        EdgeMedia {
            ports: PortTable::new(port_min, port_max),
            paths: HashMap::new(),
            tunnels: HashMap::new(),
            tunnel_phases: HashMap::new(),
            tunnel_events: VecDeque::new(),
            standby: HashMap::new(),
            stun,
            epoch,
            requests: VecDeque::new(),
            events: VecDeque::new(),
            out: VecDeque::new(),
            portmap: None,
            mappers: HashMap::new(),
        }
    }

    /// The LAN's gateway (`gateway`) maps ports for us (`client`, our LAN address): each
    /// window punched from now on asks for a mapping of its own.
    pub fn set_portmap(&mut self, gateway: Ipv4Addr, client: Ipv4Addr) {
        self.portmap = Some((gateway, client));
    }

    /// A command of the agent's relay.
    pub fn apply(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::Unlink { ports, .. } => {
                for p in ports {
                    if let Some(mut m) = self.mappers.remove(&p.0) {
                        m.release();
                        self.drain_mapper(p.0, &mut m);
                    }
                    self.ports.close(p);
                    self.tunnels.remove(&p.0);
                    self.tunnel_phases.remove(&p.0);
                    self.standby.remove(&p.0);
                    if let Some(s) = self.paths.remove(&p.0) {
                        if s.path.extra_sockets() > 0 {
                            self.requests.push_back(SocketRequest::Close { window: p.0 });
                        }
                    }
                }
            }
            other => self.ports.apply(now, other),
        }
    }

    /// The server's punch plan for `call_id` (at `now`), whose leg to the server relay
    /// leaves from `window`. A plan for a window that has one already (a retransmitted 2xx) changes
    /// nothing.
    pub fn punch(&mut self, now: Instant, call_id: &str, window: u16, plan: PunchPlan, seed: u64) -> bool {
        if self.paths.contains_key(&window) || self.paths.len() >= MAX_PATHS || self.ports.slot(window).is_none() {
            return false;
        }
        if let (Some((gateway, client)), true) = (self.portmap, plan.strategy.is_direct()) {
            // Asked now, before the plan's start: a LAN gateway answers in milliseconds.
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&seed.to_be_bytes());
            nonce[8..10].copy_from_slice(&window.to_be_bytes());
            let mut m = PortMapper::new(now, gateway, client, window, MAPPING_LIFETIME, nonce);
            self.drain_mapper(window, &mut m);
            self.mappers.insert(window, m);
        }
        let path = DirectPath::new(plan, self.stun, seed);
        let extra = path.extra_sockets();
        let open: usize = self.paths.values().map(|s| s.path.extra_sockets()).sum();
        if open + extra > MAX_EXTRA_SOCKETS {
            return false;
        }
        if extra > 0 {
            self.requests.push_back(SocketRequest::Open { window, count: extra });
        }
        self.paths.insert(window, Session { call_id: call_id.to_owned(), path });
        true
    }

    /// The leg of window `window` goes to the server relay over fake TCP: a connection
    /// from `local_ip` (local ports `window`, then `window + 1` on reconnects: TCP ports,
    /// free since the relay's are UDP) to the forwarder `server`, proving the relay port
    /// with `key`. False when the window has no leg or a tunnel already.
    pub fn tunnel(&mut self, now: Instant, window: u16, spec: TunnelSpec, seed: u64) -> bool {
        if self.tunnels.contains_key(&window) || self.tunnels.len() >= MAX_TUNNELS {
            return false;
        }
        let Some(relay_port) = self.relay_of(window).map(|r| r.port()) else { return false };
        let local = SocketAddrV4::new(spec.local_ip, window);
        let t = Tunnel::new(now, local, (window, window.saturating_add(1)), spec.server, relay_port, spec.key, seed);
        self.tunnels.insert(window, t);
        self.drain_tunnel(window);
        true
    }

    /// The forwarder is offered for window `window`'s leg, but UDP gets out: keep the
    /// offer, and take it if the relay is not heard on the window within
    /// [`RELAY_SILENCE`].
    pub fn standby(&mut self, now: Instant, window: u16, spec: TunnelSpec) -> bool {
        if self.ports.slot(window).is_none() || self.tunnels.contains_key(&window) || self.standby.len() >= MAX_TUNNELS
        {
            return false;
        }
        self.standby.insert(window, Standby { spec, deadline: now + RELAY_SILENCE });
        true
    }

    /// A fake-TCP segment for one of our tunnels: the datagram it carried goes to the
    /// phone, as relayed media would.
    pub fn on_segment(&mut self, now: Instant, s: &Segment<'_>) -> Sends {
        let p = s.dst.port();
        let window = if self.tunnels.contains_key(&p) { p } else { p.wrapping_sub(1) };
        let Some(t) = self.tunnels.get_mut(&window) else { return Sends::NONE };
        let data = t.handle_segment(now, s);
        let now_ns = self.now_ns(now);
        // RTCP rides the same connection: it goes to the phone's RTCP port.
        let port = |d: &[u8]| if crate::latch::is_rtcp(d) { window.wrapping_add(1) } else { window };
        let f = data.and_then(|d| self.ports.deliver(now_ns, port(d), d));
        self.drain_tunnel(window);
        Sends([f.map(|f| (Socket::Port(f.from_port), f.to)), None])
    }

    fn drain_tunnel(&mut self, window: u16) {
        let Some(t) = self.tunnels.get_mut(&window) else { return };
        let port = t.local().port();
        let (phase, direct) = (t.phase(), t.direct());
        if self.tunnel_phases.insert(window, (phase, direct)) != Some((phase, direct)) {
            self.tunnel_events.push_back(TunnelEvent { window, phase, direct, connections: t.connections });
        }
        while let Some((to, tcp)) = t.poll_transmit() {
            self.out.push_back((Socket::Tcp { port }, SocketAddr::V4(to), tcp));
        }
    }

    /// Whether window `window`'s leg goes over a tunnel that is up.
    pub fn tunnelled(&self, window: u16) -> bool {
        self.tunnels.get(&window).is_some_and(|t| t.phase() == TunnelPhase::Up)
    }

    /// Where the relay leg of window `window` sends: the server relay's port.
    fn relay_of(&self, window: u16) -> Option<SocketAddr> {
        self.ports.destination(window)
    }

    fn now_ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// One datagram from `src` on `at`: where it goes on (from which socket, to where; a
    /// shaky direct path sends a copy through the relay as well), or nothing when it was
    /// consumed or is dropped.
    pub fn on_packet(&mut self, now: Instant, at: Socket, src: SocketAddr, data: &[u8]) -> Sends {
        let now_ns = self.now_ns(now);
        let control = data.is_empty() || crate::stun::looks_like_stun(data);
        if let Socket::Port(p) = at {
            // The relay answers on this window: UDP gets through, no fallback needed.
            if self.standby.contains_key(&p) && Some(src) == self.relay_of(p) {
                self.standby.remove(&p);
            }
        }
        if let Socket::Port(p) = at {
            // The port first: no map lookup on the media path.
            if src.port() == crate::portmap::PORT && self.mappers.get(&p).is_some_and(|m| m.gateway() == src) {
                self.on_gateway(now, p, data);
                return Sends::NONE;
            }
        }
        let (window, index) = match at {
            Socket::Tcp { .. } => return Sends::NONE, // segments come through on_segment
            Socket::Extra { window, index } => (window, index),
            Socket::Port(p) if self.paths.contains_key(&p) => (p, 0),
            Socket::Port(p) => {
                // A phone's packet (or one of a call without a path).
                let Some(f) = self.ports.forward(now, now_ns, p, src, data) else { return Sends::NONE };
                let direct = |socket: usize, to| {
                    let from = if socket == 0 {
                        Socket::Port(f.from_port)
                    } else {
                        Socket::Extra { window: f.from_port, index: socket }
                    };
                    (from, to)
                };
                let (direct, via_relay) = match self.paths.get(&f.from_port).map(|s| s.path.route()) {
                    Some(Route::Direct { socket, to }) => (Some(direct(socket, to)), false),
                    Some(Route::Both { socket, to }) => (Some(direct(socket, to)), true),
                    _ => (None, true),
                };
                // What goes to the relay goes over the tunnel when the leg has one up: RTP from
                // the window's port, RTCP from the one above it.
                let mut relayed = via_relay.then_some((Socket::Port(f.from_port), f.to));
                let leg = f.from_port - f.from_port % 2;
                if let Some(t) = self.tunnels.get_mut(&leg).filter(|t| t.phase() == TunnelPhase::Up) {
                    if relayed.take().is_some() {
                        t.send(now, data);
                        self.drain_tunnel(leg);
                    }
                }
                return match (direct, relayed) {
                    (Some(d), r) => Sends([Some(d), r]),
                    (None, r) => Sends([r, None]),
                };
            }
        };
        let relay = self.relay_of(window);
        let Some(s) = self.paths.get_mut(&window) else { return Sends::NONE };
        if control && s.path.handle_input(now, index, src, data, relay) {
            self.drain(window);
            return Sends::NONE;
        }
        let trusted = Some(src) != relay && s.path.accepts(index, src);
        let f = if trusted {
            self.ports.deliver(now_ns, window, data)
        } else if index == 0 {
            self.ports.forward(now, now_ns, window, src, data)
        } else {
            None
        };
        Sends([f.map(|f| (Socket::Port(f.from_port), f.to)), None])
    }

    /// A window's mapper's requests go out from the window's socket to the gateway.
    fn drain_mapper(&mut self, window: u16, m: &mut PortMapper) {
        while let Some(d) = m.poll_transmit() {
            self.out.push_back((Socket::Port(window), m.gateway(), d));
        }
    }

    /// The gateway answered a window's mapper: once mapped, the window's path knows its
    /// public address without asking STUN.
    fn on_gateway(&mut self, now: Instant, window: u16, data: &[u8]) {
        let Some(mut m) = self.mappers.remove(&window) else { return };
        let before = m.mapping();
        m.handle_input(now, m.gateway(), data);
        if let (Some(map), None) = (m.mapping(), before) {
            if let Some(s) = self.paths.get_mut(&window) {
                s.path.set_mapped(now, SocketAddr::V4(map.external));
            }
            self.drain(window);
        }
        self.drain_mapper(window, &mut m);
        self.mappers.insert(window, m);
    }

    /// Moves a path's output and events to ours.
    fn drain(&mut self, window: u16) {
        let Some(s) = self.paths.get_mut(&window) else { return };
        while let Some(t) = s.path.poll_transmit() {
            let from = if t.socket == 0 { Socket::Port(window) } else { Socket::Extra { window, index: t.socket } };
            self.out.push_back((from, t.to, t.bytes));
        }
        while let Some(event) = s.path.poll_event() {
            self.events.push_back(EdgeEvent { call_id: s.call_id.clone(), method: s.path.method(), event });
        }
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(Socket, SocketAddr, Vec<u8>)> {
        self.out.pop_front()
    }

    /// A tunnel changed phase (connecting, proving, up).
    #[must_use]
    pub fn poll_tunnel_event(&mut self) -> Option<TunnelEvent> {
        self.tunnel_events.pop_front()
    }

    #[must_use]
    pub fn poll_socket_request(&mut self) -> Option<SocketRequest> {
        self.requests.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<EdgeEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let paths = self.paths.values().filter_map(|s| s.path.poll_timeout());
        let standby = self.standby.values().map(|s| s.deadline);
        let mappers = self.mappers.values().filter_map(PortMapper::poll_timeout);
        paths.chain(self.tunnels.values().filter_map(Tunnel::poll_timeout)).chain(standby).chain(mappers).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u16> =
            self.mappers.iter().filter(|(_, m)| m.poll_timeout().is_some_and(|t| t <= now)).map(|(w, _)| *w).collect();
        for w in due {
            if let Some(mut m) = self.mappers.remove(&w) {
                m.handle_timeout(now);
                self.drain_mapper(w, &mut m);
                if !m.failed() {
                    self.mappers.insert(w, m);
                }
            }
        }
        let silent: Vec<u16> = self.standby.iter().filter(|(_, s)| s.deadline <= now).map(|(w, _)| *w).collect();
        for w in silent {
            if let Some(s) = self.standby.remove(&w) {
                let seed = u64::from(w) ^ now.saturating_duration_since(self.epoch).as_nanos() as u64;
                self.tunnel(now, w, s.spec, seed);
            }
        }
        let due: Vec<u16> =
            self.tunnels.iter().filter(|(_, t)| t.poll_timeout().is_some_and(|d| d <= now)).map(|(w, _)| *w).collect();
        for w in due {
            if let Some(t) = self.tunnels.get_mut(&w) {
                t.handle_timeout(now);
            }
            self.drain_tunnel(w);
        }
        let due: Vec<u16> = self
            .paths
            .iter()
            .filter(|(_, s)| s.path.poll_timeout().is_some_and(|t| t <= now))
            .map(|(w, _)| *w)
            .collect();
        for w in due {
            let relay = self.relay_of(w);
            if let Some(s) = self.paths.get_mut(&w) {
                s.path.handle_timeout(now, relay);
            }
            self.drain(w);
        }
    }

    /// Each call with a plan: its Call-ID, method and where its path stands.
    pub fn paths(&self) -> impl Iterator<Item = (&str, &'static str, Phase)> {
        self.paths.values().map(|s| (s.call_id.as_str(), s.path.method(), s.path.phase()))
    }
}

#[cfg(test)]
mod tests;
