//! `pinhole agent`: the edge helper's sockets around the sans-IO [`Agent`]. One blocking
//! thread per UDP listen address; every message goes through the agent and out of the same
//! socket.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use pinhole_media::punch::NatProfile;
use pinhole_sip::agent::{Agent, AgentConfig};
use pinhole_sip::{Flow, Transport};

use crate::config::AgentFile;

pub(crate) fn run(cfg: AgentFile) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for l in &cfg.sip.listen {
        let sock = UdpSocket::bind(l.addr).with_context(|| format!("binding {l}"))?;
        let agent = Arc::new(Mutex::new(Agent::new(AgentConfig {
            listen: l.addr,
            server: cfg.agent.server,
            max_message: cfg.sip.max_message_size,
            secret: rand::random(),
        })));
        tracing::info!(listen = %l, server = %cfg.agent.server, "agent listening");
        measure_nat(cfg.agent.stun(), l.addr, agent.clone());
        let local = l.addr;
        threads.push(
            std::thread::Builder::new()
                .name(format!("agent {local}"))
                .spawn(move || serve(local, &sock, &agent))
                .context("starting the agent thread")?,
        );
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Classifies the NAT in front of `local` against the server's STUN service (RFC 5780), in
/// the background, and hands the profile to the agent for the REGISTERs it relays.
fn measure_nat(stun: SocketAddr, local: SocketAddr, agent: Arc<Mutex<Agent>>) {
    let spawned = std::thread::Builder::new().name("agent nat probe".into()).spawn(move || {
        match crate::probe::probe(&stun.to_string(), Some(local.ip())) {
            Ok((report, _)) if report.udp => {
                let profile = NatProfile::from_report(&report, report.mapped).to_header();
                tracing::info!(%stun, verdict = report.traditional_name(), %profile, "NAT profile");
                agent.lock().unwrap_or_else(|e| e.into_inner()).set_profile(profile);
            }
            Ok(_) => tracing::warn!(%stun, "no STUN answer over UDP; no NAT profile"),
            Err(e) => tracing::warn!(%stun, error = %e, "NAT probe failed; no NAT profile"),
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the NAT probe");
    }
}

fn serve(local: SocketAddr, sock: &UdpSocket, agent: &Mutex<Agent>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, remote) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        let flow = Flow { transport: Transport::Udp, local, remote, conn: None };
        let mut a = agent.lock().unwrap_or_else(|e| e.into_inner());
        if a.handle_input(flow, Bytes::copy_from_slice(&buf[..n])).is_err() {
            metrics::counter!("pinhole_sip_garbage_total", "transport" => "udp").increment(1);
            continue;
        }
        while let Some(t) = a.poll_transmit() {
            if let Err(e) = sock.send_to(&t.payload, t.flow.remote) {
                tracing::debug!(to = %t.flow.remote, error = %e, "UDP send failed");
            }
        }
    }
}
