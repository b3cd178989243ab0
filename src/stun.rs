//! The STUN service on `stun.listen` (+ `stun.alternate`): one thread per socket around the
//! sans-IO [`pinhole_media::stun::StunServer`], which decides what to answer and from which
//! of the sockets.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use pinhole_media::stun::{StunDrop, StunServer, StunServerConfig};

/// Binds the service: each listen address, and the same ports on the alternate address.
pub(crate) fn start(
    listen: &[SocketAddr],
    alternate: Option<IpAddr>,
    users: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let Some(first) = listen.first() else { return Ok(()) };
    let ports = [first.port(), listen.get(1).map_or(first.port(), |a| a.port())];
    let mut addrs: Vec<SocketAddr> = listen.to_vec();
    if let Some(alt) = alternate {
        for p in ports {
            let a = SocketAddr::new(alt, p);
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    let mut socks = Vec::new();
    for a in &addrs {
        socks.push((*a, UdpSocket::bind(a).with_context(|| format!("binding STUN on {a}"))?));
    }
    let socks = Arc::new(socks);
    let server = Arc::new(Mutex::new(StunServer::new(StunServerConfig {
        primary: first.ip(),
        alternate,
        ports,
        rate: 20,
        users,
    })));
    for i in 0..socks.len() {
        let (socks, server) = (socks.clone(), server.clone());
        std::thread::Builder::new()
            .name(format!("stun {}", socks[i].0))
            .spawn(move || serve(&socks, i, &server))
            .context("starting a STUN thread")?;
    }
    tracing::info!(?addrs, "STUN (RFC 8489 + RFC 5780) listening");
    Ok(())
}

fn serve(socks: &[(SocketAddr, UdpSocket)], i: usize, server: &Mutex<StunServer>) {
    let (local, sock) = &socks[i];
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, src)) = sock.recv_from(&mut buf) else { continue };
        let reply = server.lock().unwrap_or_else(|e| e.into_inner()).handle(Instant::now(), *local, src, &buf[..n]);
        match reply {
            Ok(r) => {
                metrics::counter!("pinhole_stun_requests_total", "port" => "stun").increment(1);
                let out = socks.iter().find(|(a, _)| *a == r.from).map_or(sock, |(_, s)| s);
                let _ = out.send_to(&r.bytes, r.to);
            }
            Err(why) => {
                let reason = match why {
                    StunDrop::Malformed => "malformed",
                    StunDrop::RateLimited => "rate",
                    StunDrop::CannotChange => "change",
                    StunDrop::Guarded => "guarded",
                    StunDrop::Encode => "encode",
                    _ => "other",
                };
                metrics::counter!("pinhole_stun_dropped_total", "reason" => reason).increment(1);
            }
        }
    }
}
