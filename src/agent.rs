//! `pinhole agent`: the edge helper's sockets around the sans-IO [`Agent`]. One blocking
//! thread per UDP listen address; every message goes through the agent and out of the same
//! socket, or, where UDP to the server is blocked, over a TCP connection to it (a thread of
//! its own reads that). The first listen address also anchors the phones' media: a relay on the LAN
//! interface (`[media]`), whose ports the media thread ([`crate::agent_media`]) owns, and
//! where the server's punch plans are carried out.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use pinhole_media::punch::sdp::PlanStart;
use pinhole_media::punch::NatProfile;
use pinhole_media::relay::{Relay, Side};
use pinhole_sip::agent::{Agent, AgentConfig, AgentQuality, ReadyPlan};
use pinhole_sip::{Flow, Transport};

use crate::agent_media::{EdgeHandle, MediaCmd};
use crate::config::{AgentFile, AgentTransport};

type SharedAgent = Arc<Mutex<Agent<Option<Relay>>>>;

/// How the agent sends: UDP to the phones (and to the server, unless UDP is blocked) and
/// a TCP connection to the server when it is.
struct Link {
    udp: UdpSocket,
    tcp: Mutex<Option<TcpStream>>,
    /// UDP is blocked towards the server (the NAT probe said so, or the config): calls'
    /// legs go over fake TCP when the server offers its forwarder.
    udp_blocked: AtomicBool,
}

impl Link {
    /// Sends what the agent produced: over the server connection when the flow says TCP.
    fn send_all(&self, a: &mut Agent<Option<Relay>>) {
        while let Some(t) = a.poll_transmit() {
            if t.flow.transport == Transport::Tcp {
                let mut tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
                let sent = tcp.as_mut().map(|c| c.write_all(&t.payload));
                if !matches!(sent, Some(Ok(()))) {
                    tracing::debug!(to = %t.flow.remote, "no connection to the server; message dropped");
                }
            } else if let Err(e) = self.udp.send_to(&t.payload, t.flow.remote) {
                tracing::debug!(to = %t.flow.remote, error = %e, "UDP send failed");
            }
        }
    }
}

pub(crate) fn run(cfg: AgentFile) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let mut threads = Vec::new();
    let mut edge = None;
    if let Some(addr) = cfg.metrics.listen {
        serve_metrics(addr)?;
    }
    for (i, l) in cfg.sip.listen.iter().enumerate() {
        let link = Arc::new(Link {
            udp: UdpSocket::bind(l.addr).with_context(|| format!("binding {l}"))?,
            tcp: Mutex::new(None),
            udp_blocked: AtomicBool::new(cfg.agent.transport == AgentTransport::Tcp),
        });
        // Media on the first address: the LAN interface named in [media], else this one.
        let relay = if i == 0 {
            let bind = cfg.media.interfaces.first().map_or(l.addr.ip(), |m| m.bind);
            let relay_cfg = pinhole_sip::agent::relay_config(bind, cfg.media.port_min, cfg.media.port_max);
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
        if cfg.agent.transport == AgentTransport::Tcp {
            // The operator says UDP does not get through: the server hears it at once.
            agent.lock().unwrap_or_else(|e| e.into_inner()).set_profile("udp=blocked".into());
        }
        tracing::info!(listen = %l, server = %cfg.agent.server, "agent listening");
        let media = if i == 0 { edge.clone() } else { None };
        if cfg.agent.transport == AgentTransport::Tcp {
            use_tcp(&agent, &link, media.clone(), l.addr, cfg.agent.server, cfg.sip.max_message_size);
        }
        measure_nat(cfg.agent.stun(), l.addr, agent.clone(), link.clone(), media.clone(), &cfg);
        if !cfg.agent.relays.is_empty() {
            measure_relays(cfg.agent.relays.clone(), l.addr, agent.clone());
        }
        if let Some(m) = media.clone() {
            start_relay_timers(agent.clone(), m, link.clone());
        }
        let local = l.addr;
        threads.push(
            std::thread::Builder::new()
                .name(format!("agent {local}"))
                .spawn(move || serve(local, &link, &agent, media.as_ref()))
                .context("starting the agent thread")?,
        );
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// How often the NAT is profiled again (a change is pushed to the server at once).
const PROFILE_EVERY: Duration = Duration::from_secs(300);

/// How often the round trips to the relays are measured again.
const RELAY_RTT_EVERY: Duration = Duration::from_secs(60);

/// Measures the round trip from `local`'s address to each relay's STUN service (the best of
/// three Binding requests, 500 ms each), now and every minute, for the REGISTERs the agent
/// relays. A relay that never answers is left out.
fn measure_relays(relays: Vec<SocketAddr>, local: SocketAddr, agent: SharedAgent) {
    let spawned = std::thread::Builder::new().name("agent relay rtt".into()).spawn(move || loop {
        let mut rtts = Vec::new();
        for relay in relays.iter().take(pinhole_media::fleet::MAX_RTTS) {
            let Ok(sock) = UdpSocket::bind(SocketAddr::new(local.ip(), 0)) else { continue };
            let best = (0..3).filter_map(|_| stun_rtt(&sock, *relay)).min();
            match best {
                Some(d) => rtts.push((*relay, u32::try_from(d.as_millis()).unwrap_or(u32::MAX))),
                None => tracing::debug!(%relay, "relay STUN unanswered"),
            }
        }
        if !rtts.is_empty() {
            let header = pinhole_media::fleet::rtts_header(&rtts);
            tracing::info!(rtts = %header, "relay round trips");
            agent.lock().unwrap_or_else(|e| e.into_inner()).set_relay_rtts(header);
        }
        std::thread::sleep(RELAY_RTT_EVERY);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the relay round-trip measurement");
    }
}

/// One Binding request's round trip, if answered within 500 ms.
fn stun_rtt(sock: &UdpSocket, to: SocketAddr) -> Option<Duration> {
    let txid: [u8; 12] = rand::random();
    let sent = std::time::Instant::now();
    sock.send_to(&pinhole_media::stun::binding_request(txid)?, to).ok()?;
    let deadline = sent + Duration::from_millis(500);
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).ok()?;
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        if from == to && pinhole_media::stun::answers(&buf[..n], txid) {
            return Some(sent.elapsed());
        }
    }
}

/// Classifies the NAT in front of `local` against the server's STUN service (RFC 5780), in
/// the background, and hands the profile to the agent for the REGISTERs it relays. With
/// `transport = "auto"`, a NAT that lets no UDP through moves signalling to TCP.
fn measure_nat(
    stun: SocketAddr,
    local: SocketAddr,
    agent: SharedAgent,
    link: Arc<Link>,
    media: Option<EdgeHandle>,
    cfg: &AgentFile,
) {
    let (server, max, auto) = (cfg.agent.server, cfg.sip.max_message_size, cfg.agent.transport == AgentTransport::Auto);
    let portmap = cfg.agent.portmap == crate::config::PortmapMode::Auto;
    let spawned = std::thread::Builder::new().name("agent nat probe".into()).spawn(move || {
        let mut last: Option<String> = None;
        // A profile measured for the first time, or changed since (a new public address, a
        // NAT reboot, a gateway found to map ports): the phones' REGISTERs carry it from now
        // on, and the server hears it at once for the phones already registered.
        let mut publish = |p: String| {
            if last.as_ref() == Some(&p) {
                return;
            }
            let mut a = agent.lock().unwrap_or_else(|e| e.into_inner());
            a.set_profile(p.clone());
            let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            a.push_profile(unix);
            link.send_all(&mut a);
            tracing::info!(profile = %p, first = last.is_none(), "NAT profile sent to the server");
            last = Some(p);
        };
        loop {
            match crate::probe::probe(&stun.to_string(), Some(local.ip())) {
                Ok((report, _)) if report.udp => {
                    let mut profile = NatProfile::from_report(&report, report.mapped);
                    tracing::info!(%stun, verdict = report.traditional_name(), profile = %profile.to_header(), "NAT profile");
                    publish(profile.to_header());
                    // Behind a gateway that maps ports on request every window can be made
                    // reachable: the server then plans for a full cone. Asked after the
                    // profile is out, so a gateway that does not answer delays nothing.
                    if let (true, Some(true), IpAddr::V4(client), Some(seen)) =
                        (portmap, report.nat, local.ip(), report.mapped)
                    {
                        let mapped = default_gateway().and_then(|g| Some((g, gateway_maps(g, client, seen.ip())?)));
                        if let Some((gateway, protocol)) = mapped {
                            tracing::info!(%gateway, protocol = protocol.token(), "the gateway maps ports: windows get mappings");
                            profile.portmap = Some(protocol);
                            if let Some(m) = &media {
                                m.send(MediaCmd::Portmap { gateway, client });
                            }
                            publish(profile.to_header());
                        }
                    }
                }
                Ok(_) => {
                    tracing::warn!(%stun, "no STUN answer over UDP: UDP blocked; NAT profile udp=blocked");
                    if auto && !link.udp_blocked.swap(true, Ordering::Relaxed) {
                        use_tcp(&agent, &link, media.clone(), local, server, max);
                    }
                    publish("udp=blocked".to_owned());
                }
                Err(e) => tracing::warn!(%stun, error = %e, "NAT probe failed; no NAT profile"),
            }
            std::thread::sleep(PROFILE_EVERY);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the NAT probe");
    }
}

/// The IPv4 default gateway (this network namespace's routing table).
fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000")
            .then(|| u32::from_str_radix(f[2], 16).ok())
            .flatten()
            .map(|g| Ipv4Addr::from(g.to_le_bytes()))
            .filter(|g| !g.is_unspecified())
    })
}

/// Whether `gateway` maps ports for `client` (PCP, then NAT-PMP; 3 s at most) at the
/// address the world sees us at (`seen`, not behind a second NAT): a mapping of a scratch
/// port is asked for and given back at once.
fn gateway_maps(gateway: Ipv4Addr, client: Ipv4Addr, seen: IpAddr) -> Option<pinhole_media::portmap::Protocol> {
    use pinhole_media::portmap::PortMapper;
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client), 0)).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(20))).ok()?;
    let port = sock.local_addr().ok()?.port();
    let start = Instant::now();
    let mut m = PortMapper::new(start, gateway, client, port, 60, rand::random());
    let mut buf = [0u8; 1500];
    while m.mapping().is_none() && !m.failed() && start.elapsed() < Duration::from_secs(5) {
        while let Some(d) = m.poll_transmit() {
            let _ = sock.send_to(&d, m.gateway());
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            m.handle_input(Instant::now(), from, &buf[..n]);
        }
        if m.poll_timeout().is_some_and(|t| t <= Instant::now()) {
            m.handle_timeout(Instant::now());
        }
    }
    let protocol = match m.mapping() {
        Some(x) if x.is_public_at(seen) => Some(x.protocol),
        Some(x) => {
            tracing::info!(%gateway, public = %x.external, %seen, "the gateway maps ports, but another NAT is beyond it: no mappings");
            None
        }
        None => {
            tracing::info!(%gateway, "the gateway maps no ports (no PCP or NAT-PMP, or it refused)");
            None
        }
    };
    m.release();
    while let Some(d) = m.poll_transmit() {
        let _ = sock.send_to(&d, m.gateway());
    }
    protocol
}

/// Signalling to the server over TCP from now on: a connection kept open (reopened when it
/// drops), whose messages go through the agent like datagrams do.
fn use_tcp(
    agent: &SharedAgent,
    link: &Arc<Link>,
    media: Option<EdgeHandle>,
    local: SocketAddr,
    server: SocketAddr,
    max_message: usize,
) {
    link.udp_blocked.store(true, Ordering::Relaxed);
    agent.lock().unwrap_or_else(|e| e.into_inner()).set_server_transport(Transport::Tcp);
    let (agent, link) = (agent.clone(), link.clone());
    let spawned = std::thread::Builder::new().name("agent tcp".into()).spawn(move || loop {
        let stream = match TcpStream::connect_timeout(&server, Duration::from_secs(3)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%server, error = %e, "cannot reach the server over TCP; retrying");
                std::thread::sleep(Duration::from_secs(2));
                continue;
            }
        };
        tracing::info!(%server, "signalling to the server over TCP");
        let _ = stream.set_nodelay(true);
        let mut reader = match stream.try_clone() {
            Ok(r) => r,
            Err(_) => continue,
        };
        *link.tcp.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        let mut framer = pinhole_sip::stream::Framer::new(max_message);
        let mut buf = vec![0u8; 16 * 1024];
        let flow = Flow { transport: Transport::Tcp, local, remote: server, conn: None };
        'conn: loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            framer.extend(&buf[..n]);
            loop {
                match framer.next_frame() {
                    Ok(Some(pinhole_sip::stream::Frame::Message(m))) => {
                        let mut a = agent.lock().unwrap_or_else(|e| e.into_inner());
                        if a.handle_input(Instant::now(), flow, m).is_err() {
                            metrics::counter!("pinhole_sip_garbage_total", "transport" => "tcp").increment(1);
                        }
                        if let Some(m) = &media {
                            drain_media(&mut a, m, &link);
                        }
                        link.send_all(&mut a);
                        publish(&mut a);
                    }
                    Ok(Some(pinhole_sip::stream::Frame::Ping)) => {
                        if let Some(c) = link.tcp.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                            let _ = c.write_all(b"\r\n");
                        }
                    }
                    Ok(Some(pinhole_sip::stream::Frame::Pong)) => {}
                    Ok(None) => break,
                    Err(_) => break 'conn,
                }
            }
        }
        tracing::warn!(%server, "TCP connection to the server closed; reopening");
        *link.tcp.lock().unwrap_or_else(|e| e.into_inner()) = None;
        std::thread::sleep(Duration::from_secs(1));
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the TCP signalling thread");
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
fn start_relay_timers(agent: SharedAgent, media: EdgeHandle, link: Arc<Link>) {
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
            drain_media(&mut a, &media, &link);
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
fn drain_media(agent: &mut Agent<Option<Relay>>, media: &EdgeHandle, link: &Link) {
    while let Some(c) = agent.media_mut().as_mut().and_then(Relay::poll_command) {
        media.send(MediaCmd::Relay(c));
    }
    // Calls released here: what their media measured goes to the server (a direct call's
    // media never crossed its relay).
    let released: Vec<_> = std::iter::from_fn(|| agent.media_mut().as_mut().and_then(Relay::poll_released)).collect();
    if !released.is_empty() {
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        for q in released.iter().filter_map(AgentQuality::of) {
            agent.report_quality(unix, &q);
        }
        link.send_all(agent);
    }
    while let Some(p) = agent.poll_plan() {
        if let Some(cmd) = punch_command(agent, p) {
            media.send(cmd);
        }
    }
    while let Some(o) = agent.poll_forwarder_offer() {
        // Where UDP is blocked the leg goes over fake TCP at once; elsewhere only if the
        // relay is not heard on it within a few seconds.
        let at_once = link.udp_blocked.load(Ordering::Relaxed);
        let SocketAddr::V4(server) = agent.server() else { continue };
        let window = leg_window(agent, &o.call_id, &o.server_tag);
        if let Some(window) = window {
            let server = std::net::SocketAddrV4::new(*server.ip(), o.port);
            media.send(MediaCmd::Tunnel { call_id: o.call_id, window, server, key: o.key, at_once });
        }
    }
}

/// The window port of a call: its relay's port on the server's side (`server_tag`).
fn leg_window(agent: &Agent<Option<Relay>>, call_id: &str, server_tag: &str) -> Option<u16> {
    let info = agent.media().as_ref()?.describe(call_id)?;
    let side = Side::BOTH.into_iter().find(|s| info.tags[*s] == server_tag)?;
    Some(info.streams.first()?.ports[side].0)
}

/// A plan for the media thread: the call's leg towards the server relay is its window.
fn punch_command(agent: &Agent<Option<Relay>>, p: ReadyPlan) -> Option<MediaCmd> {
    let window = leg_window(agent, &p.call_id, &p.server_tag)?;
    let start = match p.plan.start {
        PlanStart::AfterAnswer { ms } => p.answered + Duration::from_millis(u64::from(ms)),
        PlanStart::UnixMs(ms) => {
            let unix_now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis() as u64;
            // A start far from now is no plan a server makes: refused like any out-of-range value.
            let limit = u64::from(pinhole_media::punch::sdp::MAX_START_AFTER_ANSWER_MS);
            if ms > unix_now + limit || ms + limit < unix_now {
                tracing::warn!(call_id = p.call_id, "punch plan starting too far from now; refused");
                return None;
            }
            Instant::now() + Duration::from_millis(ms.saturating_sub(unix_now))
        }
    };
    Some(MediaCmd::Punch { call_id: p.call_id, window, plan: p.plan.to_plan(start) })
}

fn serve(local: SocketAddr, link: &Link, agent: &Mutex<Agent<Option<Relay>>>, media: Option<&EdgeHandle>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, remote) = match link.udp.recv_from(&mut buf) {
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
            drain_media(&mut a, m, link);
        }
        link.send_all(&mut a);
        publish(&mut a);
    }
}

/// The agent's refusals as counters: what strangers tried.
fn publish(a: &mut Agent<Option<Relay>>) {
    for code in a.take_profile_answers() {
        if code == 200 {
            tracing::info!("the server took the new NAT profile");
        } else {
            // 403 before any phone registered through us is expected: no binding to update.
            tracing::info!(code, "the server did not take the NAT profile update");
        }
    }
    metrics::counter!("pinhole_agent_plans_refused_total").absolute(a.plans_refused());
    metrics::counter!("pinhole_agent_requests_refused_total").absolute(a.refused());
    metrics::counter!("pinhole_agent_responses_dropped_total").absolute(a.dropped());
}
