//! `cargo xtask bench faketcp` (root): the fake-TCP forwarder's CPU per relayed packet
//! against the plain UDP relay's, in the same run. N calls are set up over ng; each sends
//! 50 packets/s of 172-byte RTP per leg both ways. In the UDP run both legs are UDP; in the
//! fake-TCP run leg B of every call goes over its own fake-TCP connection (proved with the
//! key the server would put in SDP), through the forwarder and its shim into the relay.
//! CPU is pinhole's whole process (from /proc) over packets received by the generator.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use pinhole_media::faketcp::client::{Phase, Tunnel};
use pinhole_media::faketcp::{ipv4, Segment};

use crate::bench::{arg, cpu_ticks, free_port, spawn_pinhole, ticks_per_sec, Proc};
use crate::relaybench::set_up_call;

const SECRET: [u8; 32] = [7; 32];
const PACKET: usize = 172;
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Tunnels per source address (the forwarder caps connections per source at 64).
const PER_SOURCE: usize = 50;

/// Where call `i`'s tunnel comes from.
fn tunnel_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 10 + (i / PER_SOURCE) as u8, 3)
}
/// Local TCP ports of the generator's tunnels: two per call.
const TCP_BASE: u16 = 50_000;

struct Run {
    sent: u64,
    received: u64,
    cpu_us_per_packet: f64,
}

fn start(dir: &std::path::Path, ng_port: u16, fwd_port: u16) -> anyhow::Result<Proc> {
    let store = dir.join("store.json");
    let hex: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&store, format!("{{\"version\":1,\"secret\":\"{hex}\",\"bindings\":[]}}"))?;
    spawn_pinhole(
        dir,
        "pinhole-faketcp-bench",
        &format!(
            "[sip]\nlisten = []\ndomain = \"bench.test\"\n[registrar]\nstore = \"{}\"\n[nat]\nkeepalive = \"off\"\n\
             [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"lo\", bind = \"127.0.0.1\" }}]\nport_min = 30000\nport_max = 39999\n\
             [ng]\nlisten = \"127.0.0.1:{ng_port}\"\n[faketcp]\nlisten = \"127.0.0.1:{fwd_port}\"\n[metrics]\n",
            store.display()
        ),
    )
}

/// Drops the kernel's RSTs for the generator's tunnel ports while it runs.
struct RstRule;

impl RstRule {
    fn install(dir: &std::path::Path, hi: u16) -> anyhow::Result<RstRule> {
        let rules = format!(
            "table inet pinhole_bench_faketcp {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    tcp sport {TCP_BASE}-{hi} tcp flags & rst == rst drop\n  }}\n}}\n"
        );
        let path = dir.join("rst.nft");
        std::fs::write(&path, rules)?;
        crate::run(Command::new("nft").arg("-f").arg(&path))?;
        Ok(RstRule)
    }
}

impl Drop for RstRule {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", "pinhole_bench_faketcp"]).status();
    }
}

fn load(
    ng_addr: SocketAddr,
    fwd: SocketAddrV4,
    pid: u32,
    calls: usize,
    seconds: u64,
    tcp: bool,
) -> anyhow::Result<Run> {
    let ctl = UdpSocket::bind("127.0.0.1:0")?;
    ctl.set_read_timeout(Some(Duration::from_millis(500)))?;
    let bind = |ip: Ipv4Addr| -> anyhow::Result<UdpSocket> {
        let s = UdpSocket::bind(SocketAddr::from((ip, 0)))?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    let a: Vec<UdpSocket> = (0..calls).map(|_| bind(Ipv4Addr::new(127, 0, 0, 2))).collect::<Result<_, _>>()?;
    let b: Vec<UdpSocket> = (0..calls).map(|_| bind(B_IP)).collect::<Result<_, _>>()?;
    let raw = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::TCP))?;
    raw.set_header_included_v4(true)?;
    raw.set_nonblocking(true)?;
    // Held as a std socket only for its plain recv/send_to (a raw socket underneath).
    let raw: std::net::UdpSocket = raw.into();
    let mut targets = Vec::with_capacity(calls);
    let mut tunnels = Vec::new();
    let now = Instant::now();
    for i in 0..calls {
        let call_id = format!("ftbench-{i}-{}-{tcp}", std::process::id());
        let (sa, sb) = (a[i].local_addr()?, b[i].local_addr()?);
        let (pa, pb) = set_up_call(&ctl, ng_addr, i as u64, &call_id, (sa, sb), None)?;
        targets.push((SocketAddr::from(([127, 0, 0, 1], pa)), SocketAddr::from(([127, 0, 0, 1], pb))));
        if tcp {
            let key = pinhole_sip::faketcp_key(&SECRET, &call_id, pb);
            let port = TCP_BASE + 2 * i as u16;
            let local = SocketAddrV4::new(tunnel_ip(i), port);
            tunnels.push(Tunnel::new(now, local, (port, port + 1), fwd, pb, key, i as u64 + 1));
        }
    }
    let mut buf = vec![0u8; 65_536];
    let mut pkt = [0u8; PACKET];
    pkt[0] = 0x80;
    let (mut sent, mut received, mut id) = (0u64, 0u64, 0u16);
    let flush = |t: &mut Tunnel, id: &mut u16| {
        while let Some((to, seg)) = t.poll_transmit() {
            *id = id.wrapping_add(1);
            let p = ipv4(*t.local().ip(), *to.ip(), &seg, *id);
            let _ = raw.send_to(&p, SocketAddr::V4(SocketAddrV4::new(*to.ip(), 0)));
        }
    };
    // Bring the tunnels up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnels.iter().any(|t| t.phase() != Phase::Up) && Instant::now() < deadline {
        for t in &mut tunnels {
            t.handle_timeout(Instant::now());
            flush(t, &mut id);
        }
        std::thread::sleep(Duration::from_millis(5));
        receive(&raw, &mut buf, &mut tunnels, &mut received);
    }
    anyhow::ensure!(tunnels.iter().all(|t| t.phase() == Phase::Up), "fake-TCP tunnels did not come up");
    let warmup = Instant::now() + Duration::from_secs(2);
    let end = warmup + Duration::from_secs(seconds);
    let (mut c0, mut r0) = (None, 0);
    let mut next = Instant::now();
    let mut slice = 0usize;
    let mut seq = 0u16;
    while Instant::now() < end {
        if c0.is_none() && Instant::now() >= warmup {
            c0 = Some(cpu_ticks(pid));
            r0 = received;
        }
        seq = seq.wrapping_add(u16::from(slice == 0));
        for i in (0..calls).filter(|i| i % 20 == slice) {
            pkt[2..4].copy_from_slice(&seq.to_be_bytes());
            let (pa, pb) = targets[i];
            if a[i].send_to(&pkt, pa).is_ok() {
                sent += 1;
            }
            if tcp {
                if tunnels[i].send(Instant::now(), &pkt) {
                    sent += 1;
                }
                flush(&mut tunnels[i], &mut id);
            } else if b[i].send_to(&pkt, pb).is_ok() {
                sent += 1;
            }
        }
        slice = (slice + 1) % 20;
        // Drain what came back, on every socket.
        for s in a.iter().chain(b.iter()) {
            while s.recv_from(&mut buf).is_ok() {
                received += 1;
            }
        }
        receive(&raw, &mut buf, &mut tunnels, &mut received);
        for t in &mut tunnels {
            if t.poll_timeout().is_some_and(|w| w <= Instant::now()) {
                t.handle_timeout(Instant::now());
            }
            flush(t, &mut id);
        }
        next += Duration::from_millis(1);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    let (c1, r1) = (cpu_ticks(pid), received);
    let cpu_us = c1.saturating_sub(c0.unwrap_or(c1)) as f64 / ticks_per_sec() * 1e6;
    Ok(Run { sent, received, cpu_us_per_packet: cpu_us / (r1 - r0).max(1) as f64 })
}

/// Segments for the generator's tunnels: data counted, the rest fed to the tunnel.
fn receive(raw: &UdpSocket, buf: &mut [u8], tunnels: &mut [Tunnel], received: &mut u64) {
    while let Ok(n) = raw.recv(buf) {
        let Ok(s) = Segment::parse(&buf[..n]) else { continue };
        if s.dst.port() < TCP_BASE {
            continue;
        }
        let i = usize::from((s.dst.port() - TCP_BASE) / 2);
        if let Some(t) = tunnels.get_mut(i).filter(|t| t.local().ip() == s.dst.ip()) {
            if t.handle_segment(Instant::now(), &s).is_some() {
                *received += 1;
            }
        }
    }
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let seconds = u64::from(arg(args, "--seconds", 10));
    let calls = arg(args, "--calls", 200) as usize;
    let dir = std::env::temp_dir().join(format!("pinhole-faketcp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _rule = RstRule::install(&dir, TCP_BASE + 2 * calls as u16 + 1)?;
    let mut rows = Vec::new();
    for tcp in [false, true] {
        let (ng_port, fwd_port) = (free_port(), free_port());
        let p = start(&dir, ng_port, fwd_port)?;
        std::thread::sleep(Duration::from_millis(500));
        let fwd = SocketAddrV4::new(Ipv4Addr::LOCALHOST, fwd_port);
        let r = load(SocketAddr::from(([127, 0, 0, 1], ng_port)), fwd, p.0.id(), calls, seconds, tcp)?;
        let name = if tcp { "fake TCP (leg B)" } else { "UDP both legs" };
        println!(
            "{name:17} calls {calls:5}  {:8} sent {:8} received  loss {:6.3}%  cpu {:6.2} us/pkt",
            r.sent,
            r.received,
            (1.0 - r.received as f64 / r.sent.max(1) as f64) * 100.0,
            r.cpu_us_per_packet
        );
        rows.push(r.cpu_us_per_packet);
        drop(p);
    }
    println!(
        "\nfake TCP costs {:.2}x the UDP relay's CPU per relayed packet (half the packets cross the forwarder); \
         overhead on the wire: 20-byte TCP header vs 8-byte UDP, +12 bytes per packet, no framing",
        rows[1] / rows[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
