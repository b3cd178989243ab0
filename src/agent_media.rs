//! The agent's media thread: the sockets around the sans-IO [`EdgeMedia`]. It binds the
//! relay ports the agent's relay links (and a birthday's extra sockets), polls them with
//! epoll, and sends what the engine says, from the socket it names. An agent serves one
//! LAN's phones, so one thread and a socket per port are plenty.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use pinhole_media::edge::{EdgeEvent, EdgeMedia, Socket, SocketRequest, TunnelSpec};
use pinhole_media::faketcp::direct::DirectPhase;
use pinhole_media::faketcp::{ipv4, Segment};
use pinhole_media::punch::path::{PathEvent, Phase};
use pinhole_media::punch::scheduler::PunchPlan;
use pinhole_media::relay::Command;

use crate::faketcp::RstGuard;
use crate::mmsg::RawSocket;

const WAKER: Token = Token(usize::MAX);
const RAW: Token = Token(usize::MAX - 1);

/// What the signalling side hands the media thread.
pub(crate) enum MediaCmd {
    Relay(Command),
    Punch {
        call_id: String,
        window: u16,
        plan: PunchPlan,
    },
    /// The LAN's gateway maps ports on request: each punched window asks it for its own.
    Portmap {
        gateway: Ipv4Addr,
        client: Ipv4Addr,
    },
    /// Carry the leg of `window` over fake TCP to the forwarder `server`, proven with `key`:
    /// `at_once`, or only if the relay is not heard on the window within a few seconds.
    Tunnel {
        call_id: String,
        window: u16,
        server: std::net::SocketAddrV4,
        key: String,
        at_once: bool,
    },
}

/// The handle the signalling side keeps.
#[derive(Clone)]
pub(crate) struct EdgeHandle {
    tx: Sender<MediaCmd>,
    waker: Arc<Waker>,
}

impl EdgeHandle {
    pub(crate) fn send(&self, cmd: MediaCmd) {
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// Starts the media thread for ports `port_min..=port_max` on `bind`, punching with the
/// server's STUN service at `stun`; `epoch` is the relay's (its counters' clock).
pub(crate) fn start(
    bind: IpAddr,
    port_min: u16,
    port_max: u16,
    stun: SocketAddr,
    epoch: Instant,
) -> std::io::Result<EdgeHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = channel();
    let mut engine = Engine {
        poll,
        rx,
        bind,
        edge: EdgeMedia::new(port_min, port_max, stun, epoch),
        sockets: HashMap::new(),
        tokens: HashMap::new(),
        next_token: 1 << 20,
        buf: vec![0u8; 65_536],
        paths_changed: false,
        ports: (port_min, port_max),
        raw: None,
        ip_id: 0,
    };
    std::thread::Builder::new().name("agent media".into()).spawn(move || engine.run())?;
    Ok(EdgeHandle { tx, waker })
}

struct Engine {
    poll: Poll,
    rx: Receiver<MediaCmd>,
    bind: IpAddr,
    edge: EdgeMedia,
    sockets: HashMap<Socket, UdpSocket>,
    tokens: HashMap<Token, Socket>,
    next_token: usize,
    buf: Vec<u8>,
    /// A path began or ended since the gauges were last set.
    paths_changed: bool,
    /// The media port range (fake-TCP tunnels take their local TCP ports from it too).
    ports: (u16, u16),
    /// The raw TCP socket for fake-TCP tunnels and the rule keeping the kernel's RSTs in,
    /// opened with the first tunnel.
    raw: Option<(RawSocket, RstGuard)>,
    ip_id: u16,
}

impl Engine {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let wait = self.edge.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, Some(wait.unwrap_or(Duration::from_secs(1)))) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "agent media poll failed");
                    return;
                }
            }
            self.commands();
            for ev in events.iter() {
                if ev.token() == RAW {
                    self.receive_segments();
                } else if let Some(s) = self.tokens.get(&ev.token()).copied() {
                    self.receive(s);
                }
            }
            let now = Instant::now();
            if self.edge.poll_timeout().is_some_and(|t| t <= now) {
                self.edge.handle_timeout(now);
            }
            self.flush();
        }
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            let now = Instant::now();
            match cmd {
                MediaCmd::Relay(c) => {
                    if let Command::Link { a, b, .. } = &c {
                        for spec in [a, b] {
                            self.open(Socket::Port(spec.port.0), SocketAddr::new(spec.bind, spec.port.0));
                        }
                    }
                    let closing: Vec<u16> = match &c {
                        Command::Unlink { ports, .. } => ports.iter().map(|p| p.0).collect(),
                        _ => Vec::new(),
                    };
                    self.edge.apply(now, c);
                    // What the edge sends as a call ends (a mapping's delete) leaves before
                    // its sockets close.
                    if !closing.is_empty() {
                        self.flush();
                    }
                    for p in closing {
                        self.close(Socket::Port(p));
                    }
                }
                MediaCmd::Portmap { gateway, client } => self.edge.set_portmap(gateway, client),
                MediaCmd::Tunnel { call_id, window, server, key, at_once } => {
                    let Some(ip) = self.raw_socket() else { continue };
                    let spec = TunnelSpec { local_ip: ip, server, key };
                    if at_once {
                        if self.edge.tunnel(now, window, spec, rand::random()) {
                            tracing::info!(call_id, window, %server, "call leg over fake TCP");
                        }
                    } else if self.edge.standby(now, window, spec) {
                        tracing::debug!(call_id, window, %server, "fake TCP in reserve for the call leg");
                    }
                }
                MediaCmd::Punch { call_id, window, plan } => {
                    let method = plan.strategy.label();
                    if self.edge.punch(now, &call_id, window, plan, rand::random()) {
                        metrics::counter!("pinhole_punch_attempts_total", "method" => method).increment(1);
                        tracing::info!(call_id, method, window, "punching");
                    }
                }
            }
            self.sockets_requested();
            self.paths_changed = true;
        }
    }

    fn sockets_requested(&mut self) {
        while let Some(r) = self.edge.poll_socket_request() {
            match r {
                SocketRequest::Open { window, count } => {
                    for index in 1..=count {
                        self.open(Socket::Extra { window, index }, SocketAddr::new(self.bind, 0));
                    }
                }
                SocketRequest::Close { window } => {
                    let extra: Vec<Socket> = self
                        .sockets
                        .keys()
                        .filter(|s| matches!(s, Socket::Extra { window: w, .. } if *w == window))
                        .copied()
                        .collect();
                    for s in extra {
                        self.close(s);
                    }
                }
            }
        }
    }

    fn open(&mut self, s: Socket, addr: SocketAddr) {
        if self.sockets.contains_key(&s) {
            return;
        }
        let mut sock = match UdpSocket::bind(addr) {
            Ok(sock) => sock,
            Err(e) => {
                metrics::counter!("pinhole_relay_bind_errors_total").increment(1);
                tracing::warn!(%addr, error = %e, "cannot bind agent media socket");
                return;
            }
        };
        let token = match s {
            Socket::Port(p) => Token(usize::from(p)),
            Socket::Tcp { .. } => return,
            Socket::Extra { .. } => {
                self.next_token += 1;
                Token(self.next_token)
            }
        };
        if self.poll.registry().register(&mut sock, token, Interest::READABLE).is_ok() {
            self.tokens.insert(token, s);
            self.sockets.insert(s, sock);
        }
    }

    fn close(&mut self, s: Socket) {
        if let Some(mut sock) = self.sockets.remove(&s) {
            let _ = self.poll.registry().deregister(&mut sock);
            self.tokens.retain(|_, v| *v != s);
        }
    }

    /// The raw TCP socket for tunnels (opened on first use): our IPv4 address, if we have one.
    fn raw_socket(&mut self) -> Option<Ipv4Addr> {
        let IpAddr::V4(ip) = self.bind else { return None };
        if self.raw.is_none() {
            let (lo, hi) = self.ports;
            let opened = RstGuard::install("pinhole_agent_faketcp", lo, hi).and_then(|g| {
                let sock = RawSocket::open_proto(ip, libc::IPPROTO_TCP, lo, hi)?;
                Ok((sock, g))
            });
            match opened {
                Ok((sock, guard)) => {
                    let fd = sock.fd();
                    if let Err(e) = self.poll.registry().register(&mut SourceFd(&fd), RAW, Interest::READABLE) {
                        tracing::warn!(error = %e, "cannot poll the fake-TCP socket");
                        return None;
                    }
                    self.raw = Some((sock, guard));
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "no fake TCP (needs CAP_NET_RAW and nftables)");
                    return None;
                }
            }
        }
        Some(ip)
    }

    fn receive_segments(&mut self) {
        loop {
            let Some((raw, _)) = &self.raw else { return };
            let n = match raw.recv(&mut self.buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            let Ok(seg) = Segment::parse(&self.buf[..n]) else { continue };
            let now = Instant::now();
            // The payload is sent from the receive buffer itself: no copy per packet.
            for (from, to) in self.edge.on_segment(now, &seg).iter() {
                if let Some(out) = self.sockets.get(&from) {
                    let _ = out.send_to(seg.payload, to);
                }
            }
        }
    }

    fn receive(&mut self, at: Socket) {
        loop {
            let Some(sock) = self.sockets.get(&at) else { return };
            let (n, src) = match sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => continue, // ICMP errors surface here; the next datagram is fine
            };
            let now = Instant::now();
            for (from, to) in self.edge.on_packet(now, at, src, &self.buf[..n]).iter() {
                if let Some(out) = self.sockets.get(&from) {
                    let _ = out.send_to(&self.buf[..n], to);
                }
            }
        }
    }

    fn flush(&mut self) {
        self.sockets_requested();
        while let Some((from, to, bytes)) = self.edge.poll_transmit() {
            match (from, to, &self.raw) {
                (Socket::Tcp { .. }, SocketAddr::V4(to), Some((raw, _))) => {
                    let IpAddr::V4(ip) = self.bind else { continue };
                    self.ip_id = self.ip_id.wrapping_add(1);
                    let _ = raw.send(&ipv4(ip, *to.ip(), &bytes, self.ip_id), *to.ip());
                }
                _ => {
                    if let Some(sock) = self.sockets.get(&from) {
                        let _ = sock.send_to(&bytes, to);
                    }
                }
            }
        }
        while let Some(t) = self.edge.poll_tunnel_event() {
            if t.phase == pinhole_media::faketcp::client::Phase::Connecting && t.connections == 1 {
                metrics::counter!("pinhole_faketcp_tunnels_total").increment(1);
            }
            let outcome = match t.direct {
                Some(DirectPhase::Up) => Some("up"),
                Some(DirectPhase::Failed) => Some("failed"),
                _ => None,
            };
            if let Some(outcome) = outcome {
                metrics::counter!("pinhole_faketcp_direct_total", "outcome" => outcome).increment(1);
            }
            tracing::info!(window = t.window, phase = ?t.phase, direct = ?t.direct, connections = t.connections, "fake-TCP tunnel");
        }
        let mut changed = false;
        while let Some(e) = self.edge.poll_event() {
            report(&e);
            changed = true;
        }
        if changed || self.paths_changed {
            self.paths_changed = false;
            let direct = self.edge.paths().filter(|p| p.2 == Phase::Direct).count();
            let relayed = self.edge.paths().count() - direct;
            metrics::gauge!("pinhole_punch_calls", "path" => "direct").set(direct as f64);
            metrics::gauge!("pinhole_punch_calls", "path" => "relayed").set(relayed as f64);
        }
    }
}

/// A log line and metrics per path event.
fn report(e: &EdgeEvent) {
    let (call_id, method) = (e.call_id.as_str(), e.method);
    match e.event {
        PathEvent::Direct { after } => {
            metrics::counter!("pinhole_punch_outcomes_total", "method" => method, "outcome" => "direct").increment(1);
            metrics::histogram!("pinhole_punch_time_to_direct_seconds", "method" => method).record(after.as_secs_f64());
            tracing::info!(call_id, method, after_ms = after.as_millis() as u64, "media direct");
        }
        PathEvent::Recovered => {
            metrics::counter!("pinhole_punch_recoveries_total", "method" => method).increment(1);
            tracing::info!(call_id, method, "direct path answers again; media direct");
        }
        PathEvent::FellBack => {
            metrics::counter!("pinhole_punch_fallbacks_total", "method" => method).increment(1);
            tracing::info!(call_id, method, "direct path lost; media back on the relay");
        }
        PathEvent::Failed => {
            metrics::counter!("pinhole_punch_outcomes_total", "method" => method, "outcome" => "failed").increment(1);
            tracing::info!(call_id, method, "no direct path; media stays relayed");
        }
    }
}
