//! `pinhole server`: sockets, connections, timers and the store around the sans-IO [`Node`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::codec::{Codec, Got};
use anyhow::Context;
use bytes::Bytes;
use pinhole_core::{Node, NodeConfig, Output};
use pinhole_sip::{ConnId, Flow, Interface, Keepalive, ProxyConfig, RegistrarConfig, Transmit, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::{Config, KeepaliveKind};
use crate::dataplane::DataPlane;
use crate::gather::Gather;
use crate::limits::{accept_failed, Backoff, LogLimiter};
use crate::store::Store;

/// Frames queued per connection before the connection counts as stuck and is closed.
const CONN_QUEUE: usize = 1024;

struct Conn {
    transport: Transport,
    remote: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
    /// The source prefix an inbound connection counts against.
    source: Option<IpAddr>,
}

#[derive(Default)]
struct Conns {
    by_id: HashMap<ConnId, Conn>,
    by_remote: HashMap<(Transport, SocketAddr), ConnId>,
    /// Inbound connections per source prefix.
    by_source: HashMap<IpAddr, usize>,
}

/// Bounds on what strangers can make us hold over TCP/TLS.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    max: usize,
    per_source: usize,
    idle: Duration,
    message: Duration,
}

static ACCEPT_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

pub(crate) struct Shared {
    node: Mutex<Node>,
    /// UDP sockets are plain blocking std sockets: each has a receive thread, and sends
    /// are one `sendto` from whichever thread produced them.
    udp: Vec<(SocketAddr, Arc<std::net::UdpSocket>)>,
    /// For spawning connection tasks from the UDP threads.
    rt: tokio::runtime::Handle,
    /// Media forwarding threads, when the relay is on.
    dataplane: Option<DataPlane>,
    conns: Mutex<Conns>,
    next_conn: AtomicU64,
    wake: Notify,
    /// When the timer loop plans to wake next, so inputs only wake it for an earlier timer.
    timer_deadline: Mutex<Option<std::time::Instant>>,
    max_message: usize,
    limits: ConnLimits,
    /// The local address outbound TCP connections report as their flow's `local`.
    tcp_local: Option<SocketAddr>,
    /// Call records of trunk calls (`[cdr]`).
    cdr: Option<Mutex<crate::cdr::CdrWriter>>,
    /// The relay fleet's statistics socket (`[media] relays`).
    fleet: Option<Arc<std::net::UdpSocket>>,
    /// Where the node's cluster lookups and change signals go (`[cluster]`: the writer
    /// thread answers them).
    cluster_work: std::sync::OnceLock<std::sync::mpsc::Sender<crate::cluster::Work>>,
    /// A change signal is on its way to the writer (cleared when it takes the changes).
    pub(crate) changes_signalled: std::sync::atomic::AtomicBool,
    /// `[sip] allowed_origins`, for WebSocket upgrades.
    allowed_origins: Vec<String>,
    /// `[hep]`: captures for the capture server.
    hep: Option<crate::hep::Hep>,
}

impl Shared {
    pub(crate) fn node(&self) -> MutexGuard<'_, Node> {
        // A panic while holding the lock is a bug; keep serving with the state as it is.
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn run(cfg: Config) -> anyhow::Result<()> {
    // One thread: the proxy core is behind one lock anyway, and a single event loop avoids
    // cross-thread wakeups, which cost more than the SIP work itself (see the bench).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(serve(cfg))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let nofile = crate::limits::raise_nofile();
    if let Some(addr) = cfg.metrics.listen {
        crate::metrics::serve(addr).await?;
    }
    // With a fleet, media goes through remote relays: no ports of our own.
    let fleet: Vec<_> = cfg.media.relays.iter().map(|r| r.0.clone()).collect();
    let relay_fds = if cfg.relay().is_some() && fleet.is_empty() {
        u64::from(cfg.media.port_max - cfg.media.port_min) + 1
    } else {
        0
    };
    let max_conns = crate::limits::connection_cap(cfg.sip.max_connections, nofile, relay_fds);
    if max_conns < cfg.sip.max_connections {
        tracing::warn!(
            nofile,
            configured = cfg.sip.max_connections,
            max_conns,
            "open-file limit lowers the connection cap"
        );
    }
    let limits = ConnLimits {
        max: max_conns,
        per_source: cfg.sip.max_connections_per_source.min(max_conns),
        idle: Duration::from_secs(cfg.sip.idle_timeout),
        message: Duration::from_secs(cfg.sip.message_timeout),
    };
    let store = Store::new(&cfg.registrar.store);
    let loaded = store.load()?;

    let interfaces: Vec<Interface> = cfg
        .sip
        .listen
        .iter()
        .map(|l| Interface { transport: l.transport, bind: l.addr, advertise: cfg.advertise_for(l) })
        .collect();
    let pcfg = ProxyConfig {
        domain: cfg.sip.domain.clone(),
        interfaces,
        realm: cfg.auth.realm.clone(),
        users: cfg.auth.users.iter().map(|u| (u.user.clone(), u.password.clone())).collect(),
        auth_algorithms: cfg.auth.algorithms.iter().map(|a| a.0).collect(),
        trusted: cfg.auth.trusted.iter().map(|c| c.0).collect(),
        registrar: RegistrarConfig {
            default_expires: cfg.registrar.default_expires,
            min_expires: cfg.registrar.min_expires,
            max_expires: cfg.registrar.max_expires,
        },
        keepalive: match cfg.nat.keepalive {
            KeepaliveKind::Options => Keepalive::Options,
            KeepaliveKind::Crlf => Keepalive::Crlf,
            KeepaliveKind::Off => Keepalive::Off,
        },
        keepalive_interval: Duration::from_secs(cfg.nat.keepalive_interval),
        keepalive_min: Duration::from_secs(cfg.nat.keepalive_min.min(cfg.nat.keepalive_interval)),
        max_body: cfg.sip.max_message_size,
        max_message: cfg.sip.max_message_size,
        secret: loaded.secret,
        punch: pinhole_sip::PunchPolicy {
            enabled: cfg.punch.enabled,
            deny: cfg.punch.deny.iter().map(|c| c.0).collect(),
            // A recorded call stays on the relay, where the recorder is.
            deny_users: cfg
                .punch
                .deny_users
                .iter()
                .chain(cfg.recording.iter().flat_map(|r| &r.users))
                .cloned()
                .collect(),
        },
        faketcp_port: cfg.faketcp.as_ref().map(|f| f.listen.port()),
        record_users: cfg.recording.as_ref().map(|r| r.users.clone()).unwrap_or_default(),
        b2bua: cfg.b2bua(),
    };
    let epoch = Instant::now().into_std();
    let relay_cfg = cfg.relay();
    let own_relay = relay_cfg.as_ref().filter(|_| fleet.is_empty());
    let dataplane = match own_relay {
        Some(m) => {
            let workers = match cfg.media.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
                n => n,
            };
            tracing::info!(workers, ports = %format!("{}-{}", m.port_min, m.port_max), "media relay on");
            let binds: Vec<std::net::IpAddr> = m.interfaces.iter().map(|i| i.bind).collect();
            let fastpath = cfg.media.fastpath == crate::config::FastPathSpec::Auto;
            let recorder = match &cfg.recording {
                Some(r) => Some(crate::recording::Recorder::start(r.dir.clone(), r.max_bytes, r.queue)?),
                None => None,
            };
            let ports = (m.port_min, m.port_max);
            let dp = DataPlane::start(workers, cfg.media.nice, &binds, ports, epoch, fastpath, recorder);
            Some(dp.context("starting relay workers")?)
        }
        None => None,
    };
    let (dataplane, unusable) = match dataplane {
        Some((dp, unusable)) => (Some(dp), unusable),
        None => (None, Vec::new()),
    };
    let fleet_sock = if fleet.is_empty() {
        None
    } else {
        for r in &fleet {
            tracing::info!(relay = %r.ng, weight = r.weight, region = r.region.as_deref().unwrap_or("-"), "media on a fleet relay");
            let label = r.ng.to_string();
            metrics::gauge!("pinhole_fleet_relay_up", "relay" => label.clone()).set(1.0);
            metrics::counter!("pinhole_fleet_calls_total", "relay" => label.clone()).absolute(0);
            metrics::counter!("pinhole_fleet_failures_total", "relay" => label).absolute(0);
        }
        Some(crate::fleet::bind()?)
    };
    let ncfg = NodeConfig { proxy: pcfg, relay: relay_cfg, fleet };
    let mut node = Node::new(ncfg, epoch, unix_now(), rand::random());
    if let Some(relay) = node.relay_mut() {
        for port in unusable {
            relay.retire(port);
        }
    }
    // In a cluster the registrations live in Redis (the store keeps the secret only).
    let clustered = cfg.cluster.is_some();
    let bindings = if clustered { Vec::new() } else { loaded.bindings };
    let restored = bindings.len();
    node.proxy_mut().registrar_mut().restore(bindings, unix_now());
    metrics::gauge!("pinhole_registrar_bindings").set(node.proxy().registrar().binding_count() as f64);
    if restored > 0 {
        tracing::info!(restored, "registrations restored from {}", cfg.registrar.store.display());
    }

    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    // Stream listeners other than plain TCP (TLS, WS, WSS).
    let mut others = Vec::new();
    for l in &cfg.sip.listen {
        match l.transport {
            Transport::Udp => {
                let s = bind_udp(l.addr).with_context(|| format!("binding {l}"))?;
                udp.push((l.addr, Arc::new(s)));
            }
            Transport::Tcp => {
                tcp.push((l.addr, TcpListener::bind(l.addr).await.with_context(|| format!("binding {l}"))?))
            }
            t => others.push((t, l.addr, TcpListener::bind(l.addr).await.with_context(|| format!("binding {l}"))?)),
        }
        tracing::info!(listen = %l, "SIP listening");
    }
    let needs_tls = others.iter().any(|(t, _, _)| matches!(t, Transport::Tls | Transport::Wss));
    let acceptor = match (&cfg.sip.tls, !needs_tls) {
        (Some(t), false) => Some(tls_acceptor(&t.cert, &t.key)?),
        _ => None,
    };
    let stun_users = cfg.stun.users.iter().map(|u| (u.user.clone(), u.password.clone())).collect();
    crate::stun::start(&cfg.stun.listen, cfg.stun.alternate, stun_users)?;

    let cdr = match &cfg.cdr {
        Some(c) => {
            let w = crate::cdr::CdrWriter::open(c.path.clone(), c.max_bytes)
                .with_context(|| format!("opening the call record file {}", c.path.display()))?;
            tokio::spawn(reopen_on_sighup());
            Some(Mutex::new(w))
        }
        None => None,
    };
    let hep = cfg.hep.as_ref().map(crate::hep::Hep::start).transpose()?;
    let shared = Arc::new(Shared {
        node: Mutex::new(node),
        tcp_local: tcp.first().map(|(a, _)| *a),
        udp: udp.clone(),
        rt: tokio::runtime::Handle::current(),
        dataplane,
        conns: Mutex::new(Conns::default()),
        next_conn: AtomicU64::new(1),
        wake: Notify::new(),
        timer_deadline: Mutex::new(None),
        max_message: cfg.sip.max_message_size,
        limits,
        cdr,
        fleet: fleet_sock,
        cluster_work: std::sync::OnceLock::new(),
        changes_signalled: std::sync::atomic::AtomicBool::new(false),
        allowed_origins: cfg.sip.allowed_origins.clone(),
        hep,
    });
    if let Some(sock) = &shared.fleet {
        crate::fleet::spawn(&shared, sock.clone())?;
    }

    if let Some(ft) = &cfg.faketcp {
        // Optional: without raw sockets or nftables the rest of the server runs on.
        if let Err(e) = crate::faketcp::start_forwarder(ft.listen, shared.clone()) {
            tracing::warn!(listen = %ft.listen, error = %format!("{e:#}"), "fake-TCP forwarder not started");
        }
    }
    for (local, sock) in udp {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("udp {local}"))
            .spawn(move || udp_loop(&shared, local, &sock))
            .context("starting a UDP thread")?;
    }
    for (local, listener) in tcp {
        tokio::spawn(accept_loop(shared.clone(), local, listener, Transport::Tcp, None));
    }
    for (transport, local, listener) in others {
        let tls = match transport {
            Transport::Tls | Transport::Wss => Some(acceptor.clone().context("TLS listener without [sip.tls]")?),
            _ => None,
        };
        tokio::spawn(accept_loop(shared.clone(), local, listener, transport, tls));
    }
    if !cfg.ng.listen.is_empty() {
        let addr: SocketAddr = cfg.ng.listen.parse().context("ng.listen")?;
        let sock = std::net::UdpSocket::bind(addr).with_context(|| format!("binding ng on {addr}"))?;
        let tcp = std::net::TcpListener::bind(addr).with_context(|| format!("binding ng on tcp {addr}"))?;
        let (s1, s2) = (shared.clone(), shared.clone());
        std::thread::Builder::new()
            .name("ng".into())
            .spawn(move || crate::ng::run(&s1, &sock))
            .context("starting the ng thread")?;
        std::thread::Builder::new()
            .name("ng tcp".into())
            .spawn(move || crate::ng::run_tcp(&s2, &tcp))
            .context("starting the ng TCP thread")?;
        tracing::info!(%addr, "ng control listening");
    }
    tokio::spawn(timer_loop(shared.clone()));
    if let Some(c) = cfg.cluster() {
        let work = crate::cluster::start(c, shared.clone()).context("starting the cluster sync")?;
        let _ = shared.cluster_work.set(work);
    }
    if let Some(c) = cfg.call_store() {
        crate::takeover::start(c, shared.clone()).context("starting the call state sync")?;
    }
    tokio::spawn(store_loop(shared.clone(), store, clustered));

    shutdown_signal().await;
    tracing::info!("shutting down");
    let (secret, snapshot) = {
        let n = shared.node();
        (n.proxy().secret(), if clustered { Vec::new() } else { n.proxy().registrar().snapshot() })
    };
    Store::new(&cfg.registrar.store).save(&secret, snapshot)?;
    Ok(())
}

/// A trunk call's record: logged, and appended to the `[cdr]` file when there is one.
fn write_record(shared: &Shared, r: &pinhole_sip::b2bua::CallRecord) {
    tracing::info!(a = %r.a_call_id, b = %r.b_call_id, trunk = %r.trunk, code = r.code, hangup = r.hangup, "trunk call ended");
    if let Some(cdr) = &shared.cdr {
        let mut w = cdr.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.write(r, std::time::SystemTime::now()) {
            metrics::counter!("pinhole_cdr_write_errors_total").increment(1);
            tracing::warn!(error = %e, "cannot write a call record");
        }
    }
}

/// SIGHUP: the call record file is reopened before its next record (after logrotate).
async fn reopen_on_sighup() {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        crate::cdr::REOPEN.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("SIGHUP: call record file reopened at the next record");
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificates from {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("reading key from {}", key.display()))?
    .ok_or_else(|| anyhow::anyhow!("no private key in {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("building the TLS configuration")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Feeds one SIP message to the node and sends what it produces.
fn handle(shared: &Arc<Shared>, flow: Flow, data: Bytes) -> bool {
    // The clock is read once the node is ours: the wait for its lock (a fleet relay's
    // reply, say) must not make the message's timers start in the past.
    let captured = shared.hep.as_ref().map(|_| (flow, data.clone()));
    let ok = input(shared, |node| node.handle_sip(Instant::now().into_std(), flow, data).is_ok());
    if let (true, Some(hep), Some((flow, data))) = (ok, &shared.hep, captured) {
        hep.sip(&flow, true, &data);
    }
    ok
}

/// Runs one input on the locked node, executes what it produced (relay commands at once,
/// transmits after the lock is released) and wakes the timer loop if the input needs it
/// sooner than it planned.
pub(crate) fn input<R>(shared: &Arc<Shared>, f: impl FnOnce(&mut Node) -> R) -> R {
    let mut out = Outbox::default();
    let (r, next) = {
        let mut node = shared.node();
        let r = f(&mut node);
        (r, drain(shared, &mut node, &mut out))
    };
    dispatch(shared, out);
    let planned = *shared.timer_deadline.lock().unwrap_or_else(|e| e.into_inner());
    let sooner = match (next, planned) {
        (Some(n), Some(d)) => n + TIMER_SLACK < d,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if sooner {
        shared.wake.notify_one();
    }
    r
}

/// What a node's outputs send, collected under its lock and sent after it is released.
#[derive(Default)]
struct Outbox {
    transmits: Vec<Transmit>,
    /// Datagrams to fleet relays (call commands, statistics requests).
    ng: Vec<(SocketAddr, Vec<u8>)>,
    /// The registrar has changes for the cluster writer.
    registrations_changed: bool,
    /// Reports for the capture server: (HEP type, Call-ID, JSON).
    reports: Vec<(u8, String, String)>,
}

/// Polls the node's outputs until it has nothing more to do now: transmits and ng
/// datagrams are collected in `out`, relay commands go to the forwarding threads. Returns
/// when to wake next.
fn drain(shared: &Shared, node: &mut Node, out: &mut Outbox) -> Option<std::time::Instant> {
    out.registrations_changed |= node.proxy().registrar().has_changes();
    loop {
        match node.poll_output(Instant::now().into_std()) {
            Output::Transmit(t) => out.transmits.push(t),
            Output::Media(c) => {
                if let Some(dp) = &shared.dataplane {
                    dp.execute(c);
                }
            }
            Output::Event(pinhole_core::Event::CallRecord(r)) => write_record(shared, &r),
            Output::Event(pinhole_core::Event::MediaReleased(q)) => {
                crate::quality::media_released(&q);
                if shared.hep.is_some() {
                    out.reports.push((pinhole_sip::hep::REPORT_JSON, q.call_id.clone(), crate::hep::quality_json(&q)));
                }
            }
            Output::Event(pinhole_core::Event::AgentQuality { agent, report }) => {
                crate::quality::agent_quality(agent, &report);
                if shared.hep.is_some() {
                    out.reports.push((
                        pinhole_sip::hep::REPORT_JSON,
                        report.call_id.clone(),
                        crate::hep::agent_json(&report),
                    ));
                }
            }
            Output::Event(pinhole_core::Event::RtcpReport { call_id, json }) => {
                if shared.hep.is_some() {
                    out.reports.push((pinhole_sip::hep::RTCP_JSON, call_id, json));
                }
            }
            Output::Event(pinhole_core::Event::TookOver { calls }) => {
                metrics::gauge!("pinhole_takeover_standby").set(0.0);
                metrics::counter!("pinhole_takeovers_total").increment(1);
                tracing::warn!(calls, "ng reached this standby: taking over the relay's calls");
            }
            Output::Event(pinhole_core::Event::FleetRelay { relay, up, why }) => {
                if up {
                    tracing::info!(%relay, why, "relay back in the fleet");
                } else {
                    tracing::warn!(%relay, why, "relay taken out of the fleet");
                }
            }
            Output::Ng { to, payload } => out.ng.push((to, payload)),
            Output::Lookup(aor) => {
                if let Some(tx) = shared.cluster_work.get() {
                    let _ = tx.send(crate::cluster::Work::Lookup(aor));
                }
            }
            Output::Event(e) => tracing::debug!(?e, "node event"),
            Output::Timeout(at, why) => {
                tracing::trace!(?at, why, "next wakeup");
                return Some(at);
            }
            // Idle (and any output a newer node adds): nothing due until the next input.
            _ => return None,
        }
    }
}

fn dispatch(shared: &Arc<Shared>, out: Outbox) {
    if out.registrations_changed {
        if let Some(tx) = shared.cluster_work.get() {
            if !shared.changes_signalled.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let _ = tx.send(crate::cluster::Work::Changes);
            }
        }
    }
    if let Some(sock) = &shared.fleet {
        for (to, payload) in &out.ng {
            if let Err(e) = sock.send_to(payload, *to) {
                tracing::debug!(relay = %to, error = %e, "ng datagram not sent");
            }
        }
    }
    if let Some(hep) = &shared.hep {
        for t in &out.transmits {
            hep.sip(&t.flow, false, &t.payload);
        }
        for (kind, call_id, json) in out.reports {
            hep.json(kind, &call_id, json);
        }
    }
    let (datagrams, streams): (Vec<Transmit>, Vec<Transmit>) =
        out.transmits.into_iter().partition(|t| t.flow.transport == Transport::Udp);
    for t in streams {
        send_stream(shared, t);
    }
    // UDP datagrams grouped by the socket they leave from: one sendmmsg per socket.
    let mut udp: Vec<Vec<(SocketAddr, &[u8])>> = vec![Vec::new(); shared.udp.len()];
    for t in &datagrams {
        match udp_socket(shared, &t.flow) {
            Some(i) => udp[i].push((t.flow.remote, &t.payload[..])),
            None => tracing::debug!(remote = %t.flow.remote, "no UDP socket for this address family"),
        }
    }
    for (i, packets) in udp.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
        let sock = &shared.udp[i].1;
        let sent = match packets.as_slice() {
            [(to, payload)] => sock.send_to(payload, to).map(|_| 1),
            many => {
                use std::os::fd::AsRawFd;
                crate::mmsg::send_to_many(sock.as_raw_fd(), many)
            }
        };
        match sent {
            Ok(n) if n < packets.len() => tracing::debug!(dropped = packets.len() - n, "UDP send buffer full"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "UDP send failed"),
        }
    }
}

/// The UDP socket a flow leaves from: its own local address, else one of the family.
fn udp_socket(shared: &Shared, flow: &Flow) -> Option<usize> {
    let udp = &shared.udp;
    udp.iter()
        .position(|(a, _)| *a == flow.local)
        .or_else(|| udp.iter().position(|(a, _)| a.is_ipv4() == flow.remote.is_ipv4()))
}

fn send_stream(shared: &Arc<Shared>, t: Transmit) {
    let tx = {
        let conns = shared.conns();
        t.flow
            .conn
            .and_then(|id| conns.by_id.get(&id))
            .or_else(|| conns.by_remote.get(&(t.flow.transport, t.flow.remote)).and_then(|id| conns.by_id.get(id)))
            .filter(|c| c.transport == t.flow.transport && c.remote == t.flow.remote)
            .map(|c| c.tx.clone())
    };
    if let Some(tx) = tx {
        // Over WebSocket each SIP message is one text frame (RFC 7118 §5).
        let payload =
            if t.flow.transport.is_websocket() { pinhole_sip::websocket::text_frame(&t.payload) } else { t.payload };
        if tx.try_send(payload).is_err() {
            tracing::warn!(remote = %t.flow.remote, "connection queue full; message dropped");
        }
        return;
    }
    match t.flow.transport {
        Transport::Tcp => {
            let shared = shared.clone();
            let rt = shared.rt.clone();
            rt.spawn(async move {
                match TcpStream::connect(t.flow.remote).await {
                    Ok(stream) => {
                        let local = shared.tcp_local.unwrap_or(t.flow.local);
                        let Some((id, rx)) = register_conn(&shared, Transport::Tcp, t.flow.remote, false) else {
                            return;
                        };
                        let _ = shared.conns().by_id.get(&id).map(|c| c.tx.try_send(t.payload));
                        run_conn(shared, stream, Transport::Tcp, local, t.flow.remote, id, rx).await;
                    }
                    Err(e) => {
                        tracing::debug!(remote = %t.flow.remote, error = %e, "TCP connect failed")
                    }
                }
            });
        }
        other => tracing::debug!(
            remote = %t.flow.remote,
            transport = other.as_str(),
            "no connection to this peer; only TCP connections are opened outbound"
        ),
    }
}

/// Socket buffers for SIP over UDP: large enough to absorb a burst of a few thousand
/// messages while the proxy thread is busy (the kernel caps it at net.core.rmem_max).
const UDP_BUFFER: usize = 4 << 20;

fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// One thread per UDP socket: a blocking receive costs one system call per datagram,
/// where readiness polling costs three (epoll_wait, recvfrom, and the EAGAIN that ends it).
///
/// Under load the thread gathers (see [`crate::gather`]): when datagrams have been
/// arriving faster than 1 000/s, each round lasts long enough for about 16 of them (1–5
/// ms); the thread takes everything queued by then (up to [`BATCH_MAX`]), runs it through
/// the node under one lock and sends what came out with one `sendmmsg` per socket. At 500
/// calls/s that turns thousands of wakeups a second here — and as many in the peers, woken
/// by each send — into a few hundred, for at most 5 ms more per hop (SIP's shortest timer
/// is 500 ms). Below the rate every datagram is handled as it comes.
fn udp_loop(shared: &Arc<Shared>, local: SocketAddr, sock: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    // One recvmmsg per round: it waits for the first datagram and takes what else is queued.
    let mut recv = crate::mmsg::RecvBatch::with_size(BATCH_MAX, 65_536);
    let mut gather = SIP_GATHER;
    let mut round = std::time::Instant::now();
    loop {
        gather.pace(round);
        let n = match recv.recv_wait(fd) {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors surface here on some systems; keep serving.
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        round = std::time::Instant::now();
        let batch: Vec<(SocketAddr, Bytes)> = (0..n)
            .filter_map(|i| {
                let (data, remote, _) = recv.packet(i);
                Some((remote?, Bytes::copy_from_slice(data)))
            })
            .collect();
        gather.count(round, n);
        let mut accepted = Vec::new();
        input(shared, |node| {
            // The clock is read once the node is ours (see `handle`).
            let now = Instant::now().into_std();
            for (remote, data) in batch {
                let flow = Flow { transport: Transport::Udp, local, remote, conn: None };
                let copy = shared.hep.as_ref().map(|_| data.clone());
                if node.handle_sip(now, flow, data).is_err() {
                    tracing::debug!(%remote, "UDP garbage dropped");
                } else if let Some(data) = copy {
                    accepted.push((flow, data));
                }
            }
        });
        // Captured once the node's lock is released: what it accepted, not garbage.
        if let Some(hep) = &shared.hep {
            for (flow, data) in &accepted {
                hep.sip(flow, true, data);
            }
        }
    }
}

/// See [`udp_loop`].
const SIP_GATHER: Gather = Gather::new(1000, 16, Duration::from_millis(1), Duration::from_millis(5));
const BATCH_MAX: usize = 64;

async fn accept_loop(
    shared: Arc<Shared>,
    local: SocketAddr,
    listener: TcpListener,
    transport: Transport,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut backoff = Backoff::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                accept_failed(transport.as_str(), &e, &mut backoff, &ACCEPT_LOG).await;
                continue;
            }
        };
        backoff.reset();
        // Over a cap: close at once (dropping the stream), counted in register_conn.
        let Some((id, rx)) = register_conn(&shared, transport, remote, true) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => run_conn(shared, stream, transport, local, remote, id, rx).await,
                Some(acceptor) => match tokio::time::timeout(shared.limits.message, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => run_conn(shared, s, transport, local, remote, id, rx).await,
                    _ => {
                        tracing::debug!(%remote, "TLS handshake failed");
                        unregister_conn(&shared, id);
                    }
                },
            }
        });
    }
}

/// Records a connection, or refuses it when a cap is reached (`inbound` connections count
/// against their source's cap too).
fn register_conn(
    shared: &Arc<Shared>,
    transport: Transport,
    remote: SocketAddr,
    inbound: bool,
) -> Option<(ConnId, mpsc::Receiver<Vec<u8>>)> {
    let source = pinhole_media::guard::source_prefix(remote.ip());
    let mut conns = shared.conns();
    let refused = if conns.by_id.len() >= shared.limits.max {
        Some("total")
    } else if inbound && conns.by_source.get(&source).copied().unwrap_or(0) >= shared.limits.per_source {
        Some("source")
    } else {
        None
    };
    if let Some(reason) = refused {
        metrics::counter!("pinhole_sip_connections_refused_total", "reason" => reason).increment(1);
        if let Some(suppressed) = ACCEPT_LOG.allow(std::time::Instant::now()) {
            tracing::warn!(%remote, reason, suppressed, "connection refused: cap reached");
        }
        return None;
    }
    let id = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    conns.by_id.insert(id, Conn { transport, remote, tx, source: inbound.then_some(source) });
    conns.by_remote.insert((transport, remote), id);
    if inbound {
        *conns.by_source.entry(source).or_insert(0) += 1;
    }
    metrics::gauge!("pinhole_sip_connections").set(conns.by_id.len() as f64);
    Some((id, rx))
}

fn unregister_conn(shared: &Arc<Shared>, id: ConnId) {
    let mut conns = shared.conns();
    if let Some(c) = conns.by_id.remove(&id) {
        if conns.by_remote.get(&(c.transport, c.remote)) == Some(&id) {
            conns.by_remote.remove(&(c.transport, c.remote));
        }
        if let Some(src) = c.source {
            if let Some(n) = conns.by_source.get_mut(&src) {
                *n -= 1;
                if *n == 0 {
                    conns.by_source.remove(&src);
                }
            }
        }
    }
    metrics::gauge!("pinhole_sip_connections").set(conns.by_id.len() as f64);
}

async fn run_conn<S>(
    shared: Arc<Shared>,
    stream: S,
    transport: Transport,
    local: SocketAddr,
    remote: SocketAddr,
    id: ConnId,
    mut rx: mpsc::Receiver<Vec<u8>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut writer = tokio::spawn(async move {
        while let Some(buf) = rx.recv().await {
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let flow = Flow { transport, local, remote, conn: Some(id) };
    let mut codec = Codec::new(transport.is_websocket(), shared.max_message);
    let mut buf = vec![0u8; 16 * 1024];
    let limits = shared.limits;
    let send = |bytes: Vec<u8>| {
        let tx = shared.conns().by_id.get(&id).map(|c| c.tx.clone());
        if let Some(tx) = tx {
            let _ = tx.try_send(bytes);
        }
    };
    // Idle: no complete message or keepalive for `limits.idle`. Incomplete: a message
    // (or a WebSocket upgrade) started and not finished within `limits.message`. A
    // WebSocket quiet for half the idle time is pinged once; its pong keeps it.
    let mut last_activity = Instant::now();
    let mut pinged = false;
    let mut partial_since: Option<Instant> = transport.is_websocket().then(Instant::now);
    'conn: loop {
        let idle_at = if transport.is_websocket() && !pinged {
            last_activity + limits.idle / 2
        } else {
            last_activity + limits.idle
        };
        let deadline = match partial_since {
            Some(t) => (t + limits.message).min(idle_at),
            None => idle_at,
        };
        let n = match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) if transport.is_websocket() && !pinged && partial_since.is_none() => {
                pinged = true;
                send(pinhole_sip::websocket::ping_frame());
                continue;
            }
            Err(_) => {
                let reason = if partial_since.is_some() { "incomplete" } else { "idle" };
                metrics::counter!("pinhole_sip_connections_timed_out_total", "reason" => reason).increment(1);
                tracing::debug!(%remote, reason, "connection timed out; closing");
                break;
            }
        };
        codec.extend(&buf[..n]);
        loop {
            let got = match codec.next(&shared.allowed_origins) {
                Ok(None) => break,
                Ok(Some(g)) => g,
                Err(e) => {
                    metrics::counter!("pinhole_sip_garbage_total", "transport" => transport.to_string()).increment(1);
                    tracing::debug!(%remote, error = %e, "bad stream framing; closing");
                    break 'conn;
                }
            };
            last_activity = Instant::now();
            pinged = false;
            match got {
                Got::Message(m) => {
                    if !handle(&shared, flow, m) {
                        tracing::debug!(%remote, "garbage on stream; closing");
                        break 'conn;
                    }
                }
                Got::Write(bytes) => send(bytes),
                Got::Alive => {}
                Got::Close(bytes) => {
                    send(bytes);
                    break 'conn;
                }
            }
        }
        partial_since = match (codec.buffered(), partial_since) {
            (0, _) if !matches!(codec, Codec::Upgrade { .. }) => None,
            (_, Some(t)) => Some(t),
            (_, None) => Some(Instant::now()),
        };
    }
    unregister_conn(&shared, id);
    // What was queued (a refusal, a close frame) goes out before the connection closes.
    if tokio::time::timeout(Duration::from_secs(1), &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Timers due within this window of each other fire in one wakeup. SIP's shortest timer is
/// T1 = 500 ms, so 10 ms of lateness is harmless and saves most wakeups under load.
const TIMER_SLACK: Duration = Duration::from_millis(10);

async fn timer_loop(shared: Arc<Shared>) {
    let mut fire = false;
    loop {
        let mut out = Outbox::default();
        let next = {
            let mut node = shared.node();
            if fire {
                node.handle_timeout(Instant::now().into_std());
            }
            drain(&shared, &mut node, &mut out)
        };
        dispatch(&shared, out);
        let deadline = next.map(|d| d + TIMER_SLACK);
        *shared.timer_deadline.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
        // Idle: nothing is due until an input wakes us.
        let sleep_until = deadline.map(Instant::from_std).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until) => fire = true,
            _ = shared.wake.notified() => fire = false,
        }
    }
}

async fn store_loop(shared: Arc<Shared>, store: Store, clustered: bool) {
    let store = Arc::new(store);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let snapshot = {
            let mut node = shared.node();
            if !node.proxy_mut().registrar_mut().take_dirty() {
                continue;
            }
            let bindings = if clustered { Vec::new() } else { node.proxy().registrar().snapshot() };
            (node.proxy().secret(), bindings)
        };
        let store = store.clone();
        let res = tokio::task::spawn_blocking(move || store.save(&snapshot.0, snapshot.1)).await;
        if let Ok(Err(e)) = res {
            tracing::error!(error = %e, "saving registrations failed");
        }
    }
}
