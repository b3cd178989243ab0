//! Fake TCP's sockets: raw IPv4/TCP sockets (a BPF filter passes only our ports) around the
//! sans-IO [`Forwarder`] and [`Tunnel`], and the nftables rule that keeps the kernel out.
//!
//! Why raw sockets and nftables rather than a TUN device (phantun's way): no interface,
//! address, route or forwarding to add on the agent's host or the server, and the server
//! already moves its relay traffic through raw sockets. The price is that no kernel socket
//! owns our ports, so the kernel would answer the peer's segments with RST; [`RstGuard`]
//! installs a table that drops exactly those RSTs (TCP from our source ports with RST set),
//! removes it on exit, and removes a table a crashed run left behind before installing.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use pinhole_media::faketcp::client::{Phase, Tunnel};
use pinhole_media::faketcp::forwarder::{Discard, Forwarder, Limits, Output, PROBE_KEY};
use pinhole_media::faketcp::{ipv4, Segment};

use crate::mmsg::RawSocket;

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

/// Starts the forwarder on `listen` in a thread of its own. Datagrams for relay ports are
/// not carried yet (the relay side comes next); probes are echoed.
pub(crate) fn start_forwarder(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let listen = ipv4_of(listen)?;
    let guard = RstGuard::install("pinhole_faketcp", listen.port(), listen.port())?;
    let sock = RawSocket::open_proto(*listen.ip(), libc::IPPROTO_TCP, listen.port(), listen.port())
        .context("opening the fake-TCP raw socket (needs CAP_NET_RAW)")?;
    let mut fwd = Forwarder::new(listen, Limits::default(), rand::random());
    tracing::info!(%listen, "fake-TCP forwarder");
    std::thread::Builder::new().name("faketcp".into()).spawn(move || {
        let _guard = guard;
        let mut buf = vec![0u8; 65_536];
        let mut id = 0u16;
        loop {
            let wait = fwd.poll_timeout().map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(Instant::now()).min(Duration::from_millis(100))
            });
            if !sock.wait_readable(wait) {
                fwd.handle_timeout(Instant::now());
            }
            while let Ok(n) = sock.recv(&mut buf) {
                match Segment::parse(&buf[..n]) {
                    Ok(s) => fwd.handle_segment(Instant::now(), &s),
                    Err(_) => metrics::counter!("pinhole_faketcp_garbage_total").increment(1),
                }
            }
            while let Some(o) = fwd.poll_output() {
                match o {
                    Output::Segment { from, to, tcp } => {
                        id = id.wrapping_add(1);
                        let _ = sock.send(&ipv4(*from.ip(), *to.ip(), &tcp, id), *to.ip());
                    }
                    Output::ToRelay { port, .. } => {
                        metrics::counter!("pinhole_faketcp_dropped_total", "reason" => "no relay").increment(1);
                        tracing::debug!(port, "fake-TCP datagram for the relay: not carried yet");
                    }
                }
            }
            while let Some(d) = fwd.poll_discard() {
                let reason = match d {
                    Discard::Unknown => "unknown",
                    Discard::Refused => "refused",
                    Discard::Unauthenticated => "unauthenticated",
                    Discard::Window => "window",
                };
                metrics::counter!("pinhole_faketcp_dropped_total", "reason" => reason).increment(1);
            }
            metrics::gauge!("pinhole_faketcp_connections").set(fwd.connections() as f64);
        }
    })?;
    Ok(())
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
