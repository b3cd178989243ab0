//! `pinhole probe`: a NAT report from the command line, running the sans-IO
//! [`pinhole_media::probe::NatProbe`] over real sockets.

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pinhole_media::probe::lifetime::{Lifetime, LifetimeProbe};
use pinhole_media::probe::{Allocation, Behaviour, NatProbe, NatReport, SocketId};

/// Exit codes: 0 report made, 2 server unreachable (neither UDP nor TCP), 3 UDP blocked
/// (TCP reaches the server), 1 any other failure.
pub(crate) fn run(server: &str, json: bool, bind: Option<IpAddr>, lifetime: bool) -> ExitCode {
    match probe(server, bind) {
        Ok((report, tcp)) => {
            let life = if lifetime && report.udp { binding_lifetime(server, bind).ok() } else { None };
            if json {
                let mut v = to_json(&report, tcp);
                if let Some((alive, dead)) = life {
                    v["lifetime"] = serde_json::json!({ "alive_after_s": alive, "gone_after_s": dead });
                }
                println!("{v}");
            } else {
                print_table(&report, tcp);
                if let Some((alive, dead)) = life {
                    match dead {
                        Some(d) => println!("binding lifetime: between {alive} s and {d} s"),
                        None => println!("binding lifetime: more than {alive} s"),
                    }
                }
            }
            match (report.udp, tcp) {
                (true, _) => ExitCode::SUCCESS,
                (false, true) => ExitCode::from(3),
                (false, false) => ExitCode::from(2),
            }
        }
        Err(e) => {
            eprintln!("pinhole probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn probe(server: &str, bind: Option<IpAddr>) -> anyhow::Result<(NatReport, bool)> {
    let addr: SocketAddr = match server.parse() {
        Ok(a) => a,
        Err(_) => SocketAddr::new(server.parse().map_err(|_| anyhow::anyhow!("--server wants IP[:PORT]"))?, 3478),
    };
    let local_ip = bind.unwrap_or(if addr.is_ipv4() { IpAddr::from([0, 0, 0, 0]) } else { IpAddr::from([0u16; 8]) });
    let mut socks = Vec::new();
    for id in NatProbe::sockets() {
        let s = UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
        s.set_nonblocking(true)?;
        // The local address as the server would see it without a NAT.
        let mut local = s.local_addr()?;
        if local.ip().is_unspecified() {
            if let Ok(probe_sock) = UdpSocket::bind(SocketAddr::new(local_ip, 0)) {
                if probe_sock.connect(addr).is_ok() {
                    if let Ok(l) = probe_sock.local_addr() {
                        local.set_ip(l.ip());
                    }
                }
            }
        }
        socks.push((id, local, s));
    }
    let locals = socks.iter().map(|(id, l, _)| (*id, *l)).collect();
    let start = Instant::now();
    let mut probe = NatProbe::new(start, addr, locals, u64::from(std::process::id()));
    let mut buf = [0u8; 1500];
    while probe.result().is_none() {
        while let Some(t) = probe.poll_transmit() {
            if let Some((_, _, s)) = socks.iter().find(|(id, _, _)| *id == t.socket) {
                let _ = s.send_to(&t.bytes, t.to);
            }
        }
        for (id, _, s) in &socks {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                probe.handle_input(Instant::now(), *id, from, &buf[..n]);
            }
        }
        probe.handle_timeout(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        if start.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("probe did not finish within 60 s");
        }
    }
    let report = probe.result().cloned().unwrap_or_default();
    // TCP reachability (for the fake-TCP fallback): pinhole's SIP port on the same host.
    let tcp = TcpStream::connect_timeout(&SocketAddr::new(addr.ip(), 5060), Duration::from_secs(2)).is_ok();
    Ok((report, tcp))
}

fn behaviour(b: Option<Behaviour>) -> &'static str {
    match b {
        Some(Behaviour::EndpointIndependent) => "endpoint-independent",
        Some(Behaviour::AddressDependent) => "address-dependent",
        Some(Behaviour::AddressAndPortDependent) => "address-and-port-dependent",
        None => "unknown",
    }
}

fn allocation(a: &Option<Allocation>) -> String {
    match a {
        Some(Allocation::Preserving) => "port-preserving".into(),
        Some(Allocation::Sequential { delta }) => format!("sequential (delta {delta})"),
        Some(Allocation::PortBlock { size }) => format!("port block (≤ {size} ports)"),
        Some(Allocation::Random) => "random".into(),
        None => "unknown".into(),
    }
}

fn print_table(r: &NatReport, tcp: bool) {
    println!("{:<52} result", "test");
    for o in &r.observations {
        let result = match (o.mapped, o.from) {
            (Some(m), Some(f)) => format!("mapped {m} (answer from {f})"),
            (None, Some(f)) => format!("answer from {f}"),
            _ => "no answer".into(),
        };
        println!("{:<52} {result}", format!("{} → {}", o.test, o.to));
    }
    println!();
    println!("UDP reachable:   {}", if r.udp { "yes" } else { "no" });
    println!("TCP reachable:   {}", if tcp { "yes" } else { "no" });
    println!(
        "NAT:             {}",
        match r.nat {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        }
    );
    println!("mapped address:  {}", r.mapped.map_or("-".into(), |m| m.to_string()));
    println!("mapping:         {}", behaviour(r.mapping));
    println!("filtering:       {}", behaviour(r.filtering));
    println!("port allocation: {}  {:?}", allocation(&r.allocation), r.ports);
    println!(
        "hairpinning:     {}",
        match r.hairpinning {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not tested",
        }
    );
    println!("verdict:         {} (confidence {:.0}%)", r.traditional_name(), r.confidence() * 100.0);
}

/// How long an idle mapping survives: the sans-IO [`LifetimeProbe`] over two real sockets.
/// Returns (longest seen alive, first gone).
fn binding_lifetime(server: &str, bind: Option<IpAddr>) -> anyhow::Result<(u64, Option<u64>)> {
    let addr: SocketAddr = server.parse().or_else(|_| server.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 3478)))?;
    let ip = bind.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let (main, other) = (UdpSocket::bind(SocketAddr::new(ip, 0))?, UdpSocket::bind(SocketAddr::new(ip, 0))?);
    let mut probe = LifetimeProbe::new(Instant::now(), addr, u64::from(std::process::id()));
    let mut buf = [0u8; 512];
    loop {
        while let Some(t) = probe.poll_transmit() {
            let sock = if t.socket == SocketId::Main { &main } else { &other };
            sock.send_to(&t.bytes, t.to)?;
        }
        if let Some(r) = probe.result() {
            return match r {
                Lifetime::Measured { alive, gone } => Ok((alive, gone)),
                Lifetime::Failed => anyhow::bail!("the server stopped answering"),
            };
        }
        let Some(at) = probe.poll_timeout() else { anyhow::bail!("lifetime probe stalled") };
        let wait = at.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            main.set_read_timeout(Some(wait))?;
            if let Ok((n, _)) = main.recv_from(&mut buf) {
                probe.handle_input(Instant::now(), SocketId::Main, &buf[..n]);
                continue;
            }
        }
        probe.handle_timeout(Instant::now());
    }
}

fn to_json(r: &NatReport, tcp: bool) -> serde_json::Value {
    let obs: Vec<serde_json::Value> = r
        .observations
        .iter()
        .map(|o| {
            serde_json::json!({
                "test": o.test,
                "to": o.to.to_string(),
                "mapped": o.mapped.map(|m| m.to_string()),
                "from": o.from.map(|f| f.to_string()),
            })
        })
        .collect();
    let (kind, delta, block) = match &r.allocation {
        Some(Allocation::Preserving) => ("preserving", None, None),
        Some(Allocation::Sequential { delta }) => ("sequential", Some(*delta), None),
        Some(Allocation::PortBlock { size }) => ("port-block", None, Some(*size)),
        Some(Allocation::Random) => ("random", None, None),
        None => ("unknown", None, None),
    };
    serde_json::json!({
        "udp": r.udp,
        "tcp": tcp,
        "nat": r.nat,
        "mapped": r.mapped.map(|m| m.to_string()),
        "mapping": behaviour(r.mapping),
        "filtering": behaviour(r.filtering),
        "allocation": { "kind": kind, "delta": delta, "block": block, "ports": r.ports.iter().map(|(m, l)| serde_json::json!({"mapped": m, "local": l})).collect::<Vec<_>>() },
        "hairpinning": r.hairpinning,
        "verdict": r.traditional_name(),
        "confidence": r.confidence(),
        "observations": obs,
    })
}
