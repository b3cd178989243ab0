//! Fake TCP's sockets: raw IPv4/TCP sockets (a BPF filter passes only our ports) around the
//! sans-IO [`Forwarder`] and [`Tunnel`], and the nftables rule that keeps the kernel out.
//!
//! Why raw sockets and nftables rather than a TUN device (phantun's way): no interface,
//! address, route or forwarding to add on the agent's host or the server, and the server
//! already moves its relay traffic through raw sockets. The price is that no kernel socket
//! owns our ports, so the kernel would answer the peer's segments with RST; [`RstGuard`]
//! installs a table that drops exactly those RSTs (TCP from our source ports with RST set),
//! removes it on exit, and removes a table a crashed run left behind before installing.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pinhole_media::faketcp::client::{Phase, Tunnel};
use pinhole_media::faketcp::forwarder::{Discard, Forwarder, Limits, Output, PROBE_KEY};
use pinhole_media::faketcp::{ipv4, Segment};

use crate::mmsg::RawSocket;
use crate::server::Shared;

/// The nftables table that drops the kernel's RSTs for our ports; removed on drop.
pub(crate) struct RstGuard {
    table: String,
}

impl RstGuard {
    /// Drops TCP RSTs the kernel sends from local ports `lo..=hi` (it owns no socket there).
    pub(crate) fn install(table: &str, lo: u16, hi: u16) -> anyhow::Result<RstGuard> {
        let _ = Command::new("nft").args(["delete", "table", "inet", table]).stderr(Stdio::null()).status();
        let ports = if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") };
        let rules = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
             tcp sport {ports} tcp flags & rst == rst drop\n  }}\n}}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (nftables) for the fake-TCP RST rule")?;
        child.stdin.take().context("nft stdin")?.write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(RstGuard { table: table.to_owned() })
    }
}

impl Drop for RstGuard {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).stderr(Stdio::null()).status();
    }
}

fn ipv4_of(addr: std::net::SocketAddr) -> anyhow::Result<SocketAddrV4> {
    match addr {
        std::net::SocketAddr::V4(a) => Ok(a),
        std::net::SocketAddr::V6(_) => anyhow::bail!("fake TCP is IPv4 only"),
    }
}

/// Starts the forwarder on `listen` in a thread of its own. A leg that proves itself gets a
/// shim: a UDP socket on the relay's address that speaks for the agent to its relay port
/// (the relay is told to expect the leg from there), so the relay itself is unchanged.
pub(crate) fn start_forwarder(listen: std::net::SocketAddr, shared: Arc<Shared>) -> anyhow::Result<()> {
    let listen = ipv4_of(listen)?;
    let guard = RstGuard::install("pinhole_faketcp", listen.port(), listen.port())?;
    let sock = RawSocket::open_proto(*listen.ip(), libc::IPPROTO_TCP, listen.port(), listen.port())
        .context("opening the fake-TCP raw socket (needs CAP_NET_RAW)")?;
    let mut fwd = Forwarder::new(listen, Limits::default(), rand::random(), Instant::now());
    let lookup = shared.clone();
    fwd.set_lookup(Box::new(move |port| {
        let node = lookup.node();
        let (call_id, _) = node.relay()?.call_of_port(port)?;
        Some(pinhole_sip::faketcp_key(&node.proxy().secret(), call_id, port))
    }));
    let poll = mio::Poll::new()?;
    poll.registry().register(&mut mio::unix::SourceFd(&sock.fd()), RAW, mio::Interest::READABLE)?;
    tracing::info!(%listen, "fake-TCP forwarder");
    let mut f = ForwarderThread { shared, fwd, sock, poll, shims: HashMap::new(), id: 0, _guard: guard };
    std::thread::Builder::new().name("faketcp".into()).spawn(move || f.run())?;
    Ok(())
}

const RAW: mio::Token = mio::Token(usize::MAX);

struct ForwarderThread {
    shared: Arc<Shared>,
    fwd: Forwarder,
    sock: RawSocket,
    poll: mio::Poll,
    /// Per carried relay port: the shim socket and the relay port's address.
    shims: HashMap<u16, (mio::net::UdpSocket, std::net::SocketAddr)>,
    id: u16,
    _guard: RstGuard,
}

impl ForwarderThread {
    fn run(&mut self) {
        let mut events = mio::Events::with_capacity(64);
        let mut buf = vec![0u8; 65_536];
        let mut last_sweep = Instant::now();
        loop {
            let wait = self.fwd.poll_timeout().map_or(Duration::from_secs(1), |t| {
                t.saturating_duration_since(Instant::now()).min(Duration::from_secs(1))
            });
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "fake-TCP poll failed");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == RAW {
                    while let Ok(n) = self.sock.recv(&mut buf) {
                        match Segment::parse(&buf[..n]) {
                            Ok(s) => self.fwd.handle_segment(Instant::now(), &s),
                            Err(_) => metrics::counter!("pinhole_faketcp_garbage_total").increment(1),
                        }
                    }
                } else {
                    // A shim: the leg's RTP port's, or (odd) its RTCP port's; both go over
                    // the connection bound to the RTP port.
                    let port = ev.token().0 as u16;
                    while let Some(Ok((n, _))) = self.shims.get(&port).map(|(s, _)| s.recv_from(&mut buf)) {
                        self.fwd.from_relay(Instant::now(), port - port % 2, &buf[..n]);
                    }
                }
            }
            let now = Instant::now();
            if self.fwd.poll_timeout().is_some_and(|t| t <= now) {
                self.fwd.handle_timeout(now);
            }
            if now.duration_since(last_sweep) >= Duration::from_secs(1) {
                self.sweep();
                last_sweep = now;
            }
            self.flush();
        }
    }

    fn flush(&mut self) {
        while let Some(o) = self.fwd.poll_output() {
            match o {
                Output::Segment { from, to, tcp } => {
                    self.id = self.id.wrapping_add(1);
                    let _ = self.sock.send(&ipv4(*from.ip(), *to.ip(), &tcp, self.id), *to.ip());
                }
                Output::Bound { port } => {
                    // Both legs of the call over fake TCP: the agents may find a way
                    // to each other without us.
                    let peer = self.shared.node().relay().and_then(|r| r.peer_port(port));
                    if let Some(peer) = peer.filter(|p| self.fwd.carries(*p)) {
                        if self.fwd.introduce(Instant::now(), port, peer) {
                            tracing::info!(port, peer, "fake-TCP legs introduced for a direct path");
                            metrics::counter!("pinhole_faketcp_introductions_total").increment(1);
                        }
                    }
                }
                Output::ToRelay { port, datagram } => {
                    // RTCP rides the same connection, to the relay's RTCP port.
                    let port = if pinhole_media::latch::is_rtcp(&datagram) { port + 1 } else { port };
                    if !self.shims.contains_key(&port) {
                        self.open_shim(port);
                    }
                    if let Some((shim, relay)) = self.shims.get(&port) {
                        let _ = shim.send_to(&datagram, *relay);
                    }
                }
            }
        }
        while let Some(d) = self.fwd.poll_discard() {
            let reason = match d {
                Discard::Unknown => "unknown",
                Discard::Refused => "refused",
                Discard::Unauthenticated => "unauthenticated",
                Discard::Window => "window",
            };
            metrics::counter!("pinhole_faketcp_dropped_total", "reason" => reason).increment(1);
        }
        metrics::gauge!("pinhole_faketcp_connections").set(self.fwd.connections() as f64);
    }

    /// A shim for relay port `port`, and the relay told the leg comes from it now.
    fn open_shim(&mut self, port: u16) {
        let relay_ip = {
            let node = self.shared.node();
            node.relay().and_then(|r| r.config().interfaces.first().map(|i| i.bind))
        };
        let Some(relay_ip) = relay_ip else { return };
        let relay = std::net::SocketAddr::new(relay_ip, port);
        let Ok(mut shim) = mio::net::UdpSocket::bind(std::net::SocketAddr::new(relay_ip, 0)) else { return };
        let Ok(addr) = shim.local_addr() else { return };
        if self.poll.registry().register(&mut shim, mio::Token(usize::from(port)), mio::Interest::READABLE).is_err() {
            return;
        }
        let moved = crate::server::input(&self.shared, |node| {
            node.relay_mut().is_some_and(|r| r.retarget(std::time::Instant::now(), port, addr))
        });
        if moved {
            tracing::info!(port, shim = %addr, "call leg over fake TCP");
            self.shims.insert(port, (shim, relay));
        }
    }

    /// Legs whose call ended are let go.
    fn sweep(&mut self) {
        let gone: Vec<u16> = {
            let node = self.shared.node();
            let relay = node.relay();
            let ended = |p: u16| relay.is_none_or(|r| r.call_of_port(p - p % 2).is_none());
            self.shims.keys().copied().filter(|p| ended(*p)).collect()
        };
        for port in gone {
            if let Some((mut shim, _)) = self.shims.remove(&port) {
                let _ = self.poll.registry().deregister(&mut shim);
            }
            self.fwd.revoke(port - port % 2);
        }
    }
}

/// `pinhole probe --faketcp SERVER:PORT`: whether fake TCP gets through from here. Opens a
/// connection to the forwarder, proves itself as a probe, sends `count` datagrams at 50 a
/// second and counts the echoes. Exit 0 when at least 95 % came back.
pub(crate) fn probe(server: std::net::SocketAddr, bind: Ipv4Addr, count: u32) -> anyhow::Result<bool> {
    let server = ipv4_of(server)?;
    let lo = 40_000 + (rand::random::<u16>() % 20_000);
    let ports = (lo, lo + 9);
    let _guard = RstGuard::install(&format!("pinhole_probe_{lo}"), ports.0, ports.1)?;
    let local_ip = if bind.is_unspecified() { local_ip_towards(server)? } else { bind };
    let sock = RawSocket::open_proto(local_ip, libc::IPPROTO_TCP, ports.0, ports.1)
        .context("opening a raw TCP socket (needs CAP_NET_RAW)")?;
    let start = Instant::now();
    let mut t = Tunnel::new(start, SocketAddrV4::new(local_ip, 0), ports, server, 0, PROBE_KEY.into(), rand::random());
    let mut buf = vec![0u8; 65_536];
    let (mut sent, mut echoed, mut id) = (0u32, 0u32, 0u16);
    let mut up_at = None;
    let deadline = start + Duration::from_secs(10) + Duration::from_millis(20 * u64::from(count));
    let mut next_send = start;
    while Instant::now() < deadline && echoed < count {
        while let Some((to, tcp)) = t.poll_transmit() {
            id = id.wrapping_add(1);
            let _ = sock.send(&ipv4(local_ip, *to.ip(), &tcp, id), *to.ip());
        }
        let now = Instant::now();
        if t.phase() == Phase::Up {
            up_at.get_or_insert(now);
            if sent < count && now >= next_send {
                if t.send(now, &sent.to_be_bytes()) {
                    sent += 1;
                }
                next_send = now + Duration::from_millis(20);
                continue;
            }
        }
        let wake = [t.poll_timeout(), (t.phase() == Phase::Up && sent < count).then_some(next_send)]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_millis(20), |w| w.saturating_duration_since(now));
        sock.wait_readable(wake.min(Duration::from_millis(20)));
        while let Ok(n) = sock.recv(&mut buf) {
            if let Ok(s) = Segment::parse(&buf[..n]) {
                if t.handle_segment(Instant::now(), &s).is_some() {
                    echoed += 1;
                }
            }
        }
        t.handle_timeout(Instant::now());
    }
    let ok = echoed * 100 >= count * 95;
    println!(
        "fake TCP to {server} from {local_ip}: {} after {} ms, {echoed}/{count} datagrams echoed, {} connection(s)",
        if up_at.is_some() { "up" } else { "never up" },
        up_at.map_or(0, |u| u.duration_since(start).as_millis()),
        t.connections
    );
    Ok(ok)
}

/// The local address the kernel would use towards `to`.
fn local_ip_towards(to: SocketAddrV4) -> anyhow::Result<Ipv4Addr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(to)?;
    match s.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(*a.ip()),
        std::net::SocketAddr::V6(_) => anyhow::bail!("no IPv4 route to {to}"),
    }
}
