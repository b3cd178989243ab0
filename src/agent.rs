//! `pinhole agent`: the edge helper's sockets around the sans-IO [`Agent`]. One blocking
//! thread per UDP listen address; every message goes through the agent and out of the same
//! socket. The first listen address also anchors the phones' media: a relay on the LAN
//! interface (`[media]`), with the same forwarding threads as the server's.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use pinhole_media::punch::NatProfile;
use pinhole_media::relay::{Relay, RelayConfig};
use pinhole_sip::agent::{Agent, AgentConfig};
use pinhole_sip::{Flow, Transport};

use crate::config::AgentFile;
use crate::dataplane::DataPlane;

type SharedAgent = Arc<Mutex<Agent<Option<Relay>>>>;

pub(crate) fn run(cfg: AgentFile) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let mut threads = Vec::new();
    let mut dataplane = None;
    for (i, l) in cfg.sip.listen.iter().enumerate() {
        let sock = UdpSocket::bind(l.addr).with_context(|| format!("binding {l}"))?;
        // Media on the first address: the LAN interface named in [media], else this one.
        let relay = if i == 0 {
            let bind = cfg.media.interfaces.first().map_or(l.addr.ip(), |m| m.bind);
            let relay_cfg = RelayConfig::single(bind, cfg.media.port_min, cfg.media.port_max);
            let (dp, unusable) = DataPlane::start(1, &[bind], cfg.media.port_min, cfg.media.port_max, epoch)
                .context("starting the agent's media relay")?;
            let mut relay = Relay::new(relay_cfg, epoch);
            for port in unusable {
                relay.retire(port);
            }
            dataplane = Some(Arc::new(dp));
            tracing::info!(%bind, ports = %format!("{}-{}", cfg.media.port_min, cfg.media.port_max), "agent media relay");
            Some(relay)
        } else {
            None
        };
        let agent: SharedAgent = Arc::new(Mutex::new(Agent::new(
            AgentConfig {
                listen: l.addr,
                server: cfg.agent.server,
                max_message: cfg.sip.max_message_size,
                secret: rand::random(),
            },
            relay,
        )));
        tracing::info!(listen = %l, server = %cfg.agent.server, "agent listening");
        measure_nat(cfg.agent.stun(), l.addr, agent.clone());
        let dp = if i == 0 { dataplane.clone() } else { None };
        if let Some(dp) = dp.clone() {
            start_relay_timers(agent.clone(), dp);
        }
        let local = l.addr;
        threads.push(
            std::thread::Builder::new()
                .name(format!("agent {local}"))
                .spawn(move || serve(local, &sock, &agent, dp.as_deref()))
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
fn measure_nat(stun: SocketAddr, local: SocketAddr, agent: SharedAgent) {
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

/// The relay's offer, media and duration deadlines, fired when due.
fn start_relay_timers(agent: SharedAgent, dp: Arc<DataPlane>) {
    let spawned = std::thread::Builder::new().name("agent relay timers".into()).spawn(move || loop {
        let next = {
            let mut a = agent.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if let Some(relay) = a.media_mut().as_mut() {
                if relay.poll_timeout().is_some_and(|t| t <= now) {
                    relay.handle_timeout(now);
                    while relay.poll_event().is_some() {}
                }
            }
            drain_media(&mut a, &dp);
            a.media().as_ref().and_then(Relay::poll_timeout)
        };
        let wait = next.map_or(Duration::from_secs(1), |t| t.saturating_duration_since(Instant::now()));
        std::thread::sleep(wait.clamp(Duration::from_millis(10), Duration::from_secs(1)));
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the relay timers");
    }
}

/// Hands the relay's port and forwarding commands to the forwarding thread.
fn drain_media(agent: &mut Agent<Option<Relay>>, dp: &DataPlane) {
    while let Some(c) = agent.media_mut().as_mut().and_then(Relay::poll_command) {
        dp.execute(c);
    }
}

fn serve(local: SocketAddr, sock: &UdpSocket, agent: &Mutex<Agent<Option<Relay>>>, dp: Option<&DataPlane>) {
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
        if a.handle_input(Instant::now(), flow, Bytes::copy_from_slice(&buf[..n])).is_err() {
            metrics::counter!("pinhole_sip_garbage_total", "transport" => "udp").increment(1);
            continue;
        }
        // Ports are bound before the SDP naming them leaves.
        if let Some(dp) = dp {
            drain_media(&mut a, dp);
        }
        while let Some(t) = a.poll_transmit() {
            if let Err(e) = sock.send_to(&t.payload, t.flow.remote) {
                tracing::debug!(to = %t.flow.remote, error = %e, "UDP send failed");
            }
        }
    }
}
