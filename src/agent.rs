//! `pinhole agent`: the edge helper's sockets around the sans-IO [`Agent`]. One blocking
//! thread per UDP listen address; every message goes through the agent and out of the same
//! socket. The first listen address also anchors the phones' media: a relay on the LAN
//! interface (`[media]`), whose ports the media thread ([`crate::agent_media`]) owns, and
//! where the server's punch plans are carried out.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use pinhole_media::punch::sdp::PlanStart;
use pinhole_media::punch::NatProfile;
use pinhole_media::relay::{Relay, RelayConfig, Side};
use pinhole_sip::agent::{Agent, AgentConfig, ReadyPlan};
use pinhole_sip::{Flow, Transport};

use crate::agent_media::{EdgeHandle, MediaCmd};
use crate::config::AgentFile;

type SharedAgent = Arc<Mutex<Agent<Option<Relay>>>>;

pub(crate) fn run(cfg: AgentFile) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let mut threads = Vec::new();
    let mut edge = None;
    if let Some(addr) = cfg.metrics.listen {
        serve_metrics(addr)?;
    }
    for (i, l) in cfg.sip.listen.iter().enumerate() {
        let sock = UdpSocket::bind(l.addr).with_context(|| format!("binding {l}"))?;
        // Media on the first address: the LAN interface named in [media], else this one.
        let relay = if i == 0 {
            let bind = cfg.media.interfaces.first().map_or(l.addr.ip(), |m| m.bind);
            let relay_cfg = RelayConfig::single(bind, cfg.media.port_min, cfg.media.port_max);
            edge = Some(
                crate::agent_media::start(bind, cfg.media.port_min, cfg.media.port_max, cfg.agent.stun(), epoch)
                    .context("starting the agent's media thread")?,
            );
            tracing::info!(%bind, ports = %format!("{}-{}", cfg.media.port_min, cfg.media.port_max), "agent media relay");
            Some(Relay::new(relay_cfg, epoch))
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
        let media = if i == 0 { edge.clone() } else { None };
        if let Some(m) = media.clone() {
            start_relay_timers(agent.clone(), m);
        }
        let local = l.addr;
        threads.push(
            std::thread::Builder::new()
                .name(format!("agent {local}"))
                .spawn(move || serve(local, &sock, &agent, media.as_ref()))
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

/// `/metrics` on `addr`, from a thread of its own.
fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(crate::metrics::serve(addr))?;
    std::thread::Builder::new()
        .name("agent metrics".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(())
}

/// The relay's offer, media and duration deadlines, fired when due.
fn start_relay_timers(agent: SharedAgent, media: EdgeHandle) {
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
            drain_media(&mut a, &media);
            a.media().as_ref().and_then(Relay::poll_timeout)
        };
        let wait = next.map_or(Duration::from_secs(1), |t| t.saturating_duration_since(Instant::now()));
        std::thread::sleep(wait.clamp(Duration::from_millis(10), Duration::from_secs(1)));
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the relay timers");
    }
}

/// Hands the relay's port and forwarding commands, and the plans of answered calls, to
/// the media thread.
fn drain_media(agent: &mut Agent<Option<Relay>>, media: &EdgeHandle) {
    while let Some(c) = agent.media_mut().as_mut().and_then(Relay::poll_command) {
        media.send(MediaCmd::Relay(c));
    }
    while let Some(p) = agent.poll_plan() {
        if let Some(cmd) = punch_command(agent, p) {
            media.send(cmd);
        }
    }
}

/// A plan for the media thread: the call's leg towards the server relay is its window.
fn punch_command(agent: &Agent<Option<Relay>>, p: ReadyPlan) -> Option<MediaCmd> {
    let info = agent.media().as_ref()?.describe(&p.call_id)?;
    let side = Side::BOTH.into_iter().find(|s| info.tags[*s] == p.server_tag)?;
    let window = info.streams.first()?.ports[side].0;
    let start = match p.plan.start {
        PlanStart::AfterAnswer { ms } => p.answered + Duration::from_millis(u64::from(ms)),
        PlanStart::UnixMs(ms) => {
            let unix_now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis() as u64;
            Instant::now() + Duration::from_millis(ms.saturating_sub(unix_now))
        }
    };
    Some(MediaCmd::Punch { call_id: p.call_id, window, plan: p.plan.to_plan(start) })
}

fn serve(local: SocketAddr, sock: &UdpSocket, agent: &Mutex<Agent<Option<Relay>>>, media: Option<&EdgeHandle>) {
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
        // Ports are handed over before the SDP naming them leaves.
        if let Some(m) = media {
            drain_media(&mut a, m);
        }
        while let Some(t) = a.poll_transmit() {
            if let Err(e) = sock.send_to(&t.payload, t.flow.remote) {
                tracing::debug!(to = %t.flow.remote, error = %e, "UDP send failed");
            }
        }
    }
}
