//! The media data plane: forwarding threads owning the relay ports of the calls sharded
//! to them. The control plane (the proxy's relay, or ng) talks to them over channels; per
//! packet there is no lock and no allocation.
//!
//! Two ways to move packets, chosen at start:
//! - **raw** (IPv4, needs CAP_NET_RAW): one raw socket per interface sees every datagram
//!   for the whole port range (a BPF filter passes only that range), so one `recvmmsg`
//!   takes packets of many calls, and one `sendmmsg` sends many calls' packets, each built
//!   with the right relay source port. Per-port UDP sockets are still bound, to own the
//!   ports (no ICMP unreachable, no one else binds them), but never read.
//! - **per-port**: each relay port is a UDP socket polled with epoll; a ready socket is
//!   drained with `recvmmsg`, and its accepted packets leave the peer port in one
//!   `sendmmsg`.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use pinhole_media::ports::{Forward, PortTable};
use pinhole_media::relay::{Command, PortSpec, RelayPort, Side};
use pinhole_media::stats::Offloaded;

use crate::recording::{Rec, Recorder};

use crate::fastpath::{FastPath, Flow, FlowKey, Offload, Offloads, MAX_FLOWS};
use crate::gather::Gather;
use crate::mmsg::{raw_packet, RawSendBatch, RawSocket, RecvBatch, SendBatch};

const BATCH: usize = 64;
/// Past 5 000 packets/s a worker's rounds last long enough for about 64 packets, between
/// 0.25 and 1 ms (see [`crate::gather`]): at 500 calls one round moves ~50 packets with one
/// `recvmmsg` and one `sendmmsg` instead of ~4, for at most 1 ms more per packet.
const MEDIA_GATHER: Gather = Gather::new(5000, 64, Duration::from_micros(250), Duration::from_millis(1));
const WAKER: Token = Token(usize::MAX);
const RAW: Token = Token(usize::MAX - 1);

/// What a worker is told. Sockets are bound by the control plane before the command is
/// sent, so a port is open by the time its SDP leaves pinhole.
enum WorkerCmd {
    Link { a: (PortSpec, Option<std::net::UdpSocket>), b: (PortSpec, Option<std::net::UdpSocket>) },
    Command(Command),
}

/// How long a worker may take to notice a command that is not urgent (Unlink): links and
/// expectations wake it at once, since packets may follow their SDP immediately.
const LAZY_COMMANDS: std::time::Duration = std::time::Duration::from_millis(10);

/// Handles to the forwarding threads.
pub(crate) struct DataPlane {
    workers: Vec<(Sender<WorkerCmd>, Arc<Waker>)>,
    raw: bool,
    /// Raw mode: the placeholder sockets that own relay ports, bound on first use and kept,
    /// so steady-state call setup binds nothing.
    reserved: std::sync::Mutex<std::collections::HashMap<SocketAddr, std::net::UdpSocket>>,
    /// `[recording]`: told when a call's recording starts and stops.
    recorder: Option<Recorder>,
}

fn bind(spec: &PortSpec, raw: bool) -> Option<std::net::UdpSocket> {
    let addr = SocketAddr::new(spec.bind, spec.port.0);
    let sock = std::net::UdpSocket::bind(addr).and_then(|s| s.set_nonblocking(true).map(|()| s));
    match sock {
        Ok(s) => {
            if raw {
                // Only owns the port: keep its (never read) queue as small as possible.
                let _ = socket2::SockRef::from(&s).set_recv_buffer_size(0);
            }
            Some(s)
        }
        Err(e) => {
            metrics::counter!("pinhole_relay_bind_errors_total").increment(1);
            tracing::warn!(%addr, error = %e, "cannot bind relay port");
            None
        }
    }
}

impl DataPlane {
    /// Starts the forwarding threads for ports `port_min..=port_max` on `binds`. Raw mode
    /// is used when every interface is IPv4 and raw sockets can be opened (one thread);
    /// otherwise `n` per-port threads. Each runs at `nice` (0: unchanged).
    /// `recorder`: where recorded calls' packets go (`[recording]`).
    pub(crate) fn start(
        n: usize,
        nice: i32,
        binds: &[IpAddr],
        (port_min, port_max): (u16, u16),
        epoch: Instant,
        fastpath: bool,
        recorder: Option<Recorder>,
    ) -> std::io::Result<(DataPlane, Vec<u16>)> {
        let raws: Option<Vec<RawSocket>> = binds
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => RawSocket::open(*v4, port_min, port_max).ok(),
                IpAddr::V6(_) => None,
            })
            .collect();
        let raw = raws.is_some();
        let threads = if raw { 1 } else { n.max(1) };
        // The kernel fast path: the one raw-mode worker owns its flow map.
        let mut fast = match (fastpath, raw) {
            (false, _) => {
                tracing::info!("kernel fast path off ([media] fastpath = \"off\"): userspace relay");
                None
            }
            (true, false) => {
                tracing::warn!("kernel fast path unavailable: it needs the raw-socket data plane (IPv4 and CAP_NET_RAW); userspace relay");
                None
            }
            (true, true) => match FastPath::start(binds) {
                Ok(f) => {
                    tracing::info!(interfaces = %f.interfaces.join(","), "kernel fast path on: latched RTP forwarded by a TC program");
                    Some(f)
                }
                Err(why) => {
                    tracing::warn!(why, "kernel fast path unavailable: userspace relay");
                    None
                }
            },
        };
        metrics::gauge!("pinhole_fastpath_on").set(if fast.is_some() { 1.0 } else { 0.0 });
        let mut raws = raws.unwrap_or_default();
        let mut workers = Vec::new();
        for i in 0..threads {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let mut raw_socks = Vec::new();
            for (k, r) in raws.drain(..).enumerate() {
                poll.registry().register(&mut SourceFd(&r.fd()), Token(RAW.0 - k), Interest::READABLE)?;
                raw_socks.push(r);
            }
            let (tx, rx) = channel();
            let mut w = Worker {
                poll,
                rx,
                ports: PortTable::new(port_min, port_max),
                epoch,
                recv: RecvBatch::new(BATCH),
                send: SendBatch::new(BATCH),
                raw_send: RawSendBatch::new(BATCH),
                raw: raw_socks,
                raw_local: Default::default(),
                fast: fast.take(),
                offloads: Offloads::new(),
                last_account: Instant::now(),
                forwarded_here: Vec::with_capacity(BATCH),
                recorder: recorder.clone(),
                recorded: Vec::new(),
                wall: (epoch, std::time::SystemTime::now() - epoch.elapsed()),
            };
            std::thread::Builder::new().name(format!("relay {i}")).spawn(move || {
                if nice != 0 {
                    match crate::mmsg::set_thread_nice(nice) {
                        Ok(()) => tracing::info!(nice, "relay worker priority set"),
                        Err(e) => tracing::warn!(nice, error = %e, "cannot set the relay worker's priority"),
                    }
                }
                w.run()
            })?;
            workers.push((tx, waker));
        }
        // Raw mode owns the whole range up front: a port something else holds (an ephemeral
        // socket, another daemon) is reported so the relay never offers it.
        let mut reserved = std::collections::HashMap::new();
        let mut unusable = Vec::new();
        if raw {
            let limit = crate::limits::raise_nofile();
            let needed = (usize::from(port_max - port_min) + 1) * binds.len();
            if (limit as usize) < needed + 256 {
                tracing::warn!(
                    limit,
                    needed,
                    "open-file limit below the relay port range; ports will be bound per call"
                );
            } else {
                for ip in binds {
                    for port in port_min..=port_max {
                        let addr = SocketAddr::new(*ip, port);
                        match std::net::UdpSocket::bind(addr) {
                            Ok(s) => {
                                let _ = socket2::SockRef::from(&s).set_recv_buffer_size(0);
                                reserved.insert(addr, s);
                            }
                            Err(_) => unusable.push(port),
                        }
                    }
                }
            }
        }
        tracing::info!(
            mode = if raw { "raw range socket" } else { "socket per port" },
            threads,
            unusable = unusable.len(),
            "relay data plane"
        );
        Ok((DataPlane { workers, raw, reserved: std::sync::Mutex::new(reserved), recorder }, unusable))
    }

    /// Hands a relay command to the worker that owns the call.
    pub(crate) fn execute(&self, cmd: Command) {
        let shard = match &cmd {
            Command::Link { shard, .. }
            | Command::Expect { shard, .. }
            | Command::Unlink { shard, .. }
            | Command::Secure { shard, .. }
            | Command::Record { shard, .. } => *shard,
        };
        // The recorder hears of a recording before any worker sends it a packet of it.
        if let Command::Record { id, call_id, on, .. } = &cmd {
            match &self.recorder {
                Some(r) if *on => {
                    r.offer(Rec::Start { id: *id, call_id: call_id.clone() });
                }
                Some(r) => {
                    r.offer(Rec::Stop { id: *id });
                }
                None => {
                    tracing::warn!(%call_id, "recording asked for, but [recording] is not configured");
                    return;
                }
            }
        }
        let (tx, waker) = &self.workers[(shard % self.workers.len() as u64) as usize];
        let (msg, urgent) = match cmd {
            Command::Link { a, b, .. } if self.raw => {
                let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
                for spec in [&a, &b] {
                    let addr = SocketAddr::new(spec.bind, spec.port.0);
                    if let std::collections::hash_map::Entry::Vacant(slot) = reserved.entry(addr) {
                        let Some(s) = bind(spec, true) else { return };
                        slot.insert(s);
                    }
                }
                (WorkerCmd::Link { a: (a, None), b: (b, None) }, true)
            }
            Command::Link { a, b, .. } => {
                let (Some(sa), Some(sb)) = (bind(&a, false), bind(&b, false)) else { return };
                (WorkerCmd::Link { a: (a, Some(sa)), b: (b, Some(sb)) }, true)
            }
            // Expect carries the answerer's address, Secure the keys the first packets need.
            urgent @ (Command::Expect { .. } | Command::Secure { .. } | Command::Record { .. }) => {
                (WorkerCmd::Command(urgent), true)
            }
            other => (WorkerCmd::Command(other), false),
        };
        if tx.send(msg).is_ok() && urgent {
            let _ = waker.wake();
        }
    }
}

struct Worker {
    poll: Poll,
    rx: Receiver<WorkerCmd>,
    /// The ports of this worker's calls; in per-port mode each holds its socket.
    ports: PortTable<UdpSocket>,
    epoch: Instant,
    recv: RecvBatch,
    send: SendBatch,
    raw_send: RawSendBatch,
    raw: Vec<RawSocket>,
    /// Raw mode, relay ports bound on the unspecified address: the address each port was
    /// last reached at, the source of what the port sends on its own (DTLS retransmissions).
    raw_local: std::collections::HashMap<u16, std::net::Ipv4Addr>,
    /// The kernel fast path's flow map, and the ports whose flows are in it.
    fast: Option<FastPath>,
    offloads: Offloads,
    last_account: Instant,
    /// Ports whose packets this batch forwarded in userspace (fast path candidates).
    forwarded_here: Vec<u16>,
    /// `[recording]`, and the wall clock at `epoch` (for the packets' times).
    recorder: Option<Recorder>,
    wall: (Instant, std::time::SystemTime),
    /// Packets of recorded calls this batch, for the recorder.
    recorded: Vec<Rec>,
}

/// A packet of a recorded call (a copy) from `src` to the relay's `dst`, timed by the wall
/// clock `wall` gives for `now`.
fn recorded(
    wall: (Instant, std::time::SystemTime),
    (id, side): (u64, Side),
    now: Instant,
    (src, dst): (SocketAddr, SocketAddr),
    data: &[u8],
) -> Rec {
    let at = wall.1 + now.saturating_duration_since(wall.0);
    Rec::Packet { id, from_a: side == Side::A, at, src, dst, data: data.to_vec() }
}

/// How often the fast path's counters are read into the streams' statistics.
const ACCOUNT_EVERY: Duration = Duration::from_millis(500);

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut gather = MEDIA_GATHER;
        let mut round = Instant::now();
        loop {
            gather.pace(round);
            if let Err(e) = self.poll.poll(&mut events, Some(LAZY_COMMANDS)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "relay worker poll failed");
                return;
            }
            round = Instant::now();
            // Commands first: a link must be in place before its first packets are handled.
            self.commands();
            if self.ports.has_timers() {
                self.ports.handle_timeout(round);
                self.send_replies(None);
            }
            if !self.offloads.is_empty() && round.duration_since(self.last_account) >= ACCOUNT_EVERY {
                self.last_account = round;
                self.account_offloads(round);
            }
            let mut packets = 0;
            for ev in events.iter() {
                packets += match ev.token() {
                    WAKER => 0,
                    t if t.0 > RAW.0 - self.raw.len().max(1) && !self.raw.is_empty() => self.forward_raw(RAW.0 - t.0),
                    t => self.forward(t.0 as u16),
                };
            }
            gather.count(round, packets);
        }
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            let now = Instant::now();
            match cmd {
                WorkerCmd::Link { a, b } => {
                    let (pa, pb) = (a.0.port, b.0.port);
                    self.open(now, a, pb);
                    self.open(now, b, pa);
                }
                WorkerCmd::Command(Command::Link { .. }) => {}
                WorkerCmd::Command(Command::Expect { port, expected, .. }) => {
                    // Signalling changed what the port takes: userspace decides again.
                    self.unoffload(port.0);
                    self.ports.expect(now, port, expected)
                }
                WorkerCmd::Command(Command::Secure { port, setup, mux, .. }) => {
                    self.ports.secure(port, setup.map(|s| *s), mux)
                }
                WorkerCmd::Command(Command::Record { id, on, ports, .. }) => {
                    // Recorded packets come through userspace.
                    for (p, _) in &ports {
                        self.unoffload(p.0);
                    }
                    self.ports.record(id, on, &ports);
                }
                WorkerCmd::Command(Command::Unlink { ports, .. }) => {
                    for p in &ports {
                        self.unoffload(p.0);
                    }
                    for p in ports {
                        if let Some(mut sock) = self.ports.close(p) {
                            let _ = self.poll.registry().deregister(&mut sock);
                        }
                    }
                }
            }
        }
    }

    /// Hands what a batch recorded to the recorder in one message (one wakeup).
    fn flush_recorded(&mut self) {
        if let (Some(r), false) = (&self.recorder, self.recorded.is_empty()) {
            r.offer_batch(std::mem::take(&mut self.recorded));
        }
    }

    fn open(&mut self, now: Instant, (spec, sock): (PortSpec, Option<std::net::UdpSocket>), peer: RelayPort) {
        let mut sock = sock.map(UdpSocket::from_std);
        if let Some(sock) = sock.as_mut() {
            if let Err(e) = self.poll.registry().register(sock, Token(usize::from(spec.port.0)), Interest::READABLE) {
                tracing::warn!(port = spec.port.0, error = %e, "cannot poll relay port");
                return;
            }
        }
        self.ports.open(now, spec, peer, sock);
    }

    /// Raw mode: a batch of packets for any ports of the range, and one send for all.
    /// Returns how many packets were read.
    fn forward_raw(&mut self, k: usize) -> usize {
        let Some(fd) = self.raw.get(k).map(RawSocket::fd) else { return 0 };
        let mut read = 0;
        loop {
            let n = match self.recv.recv(fd) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            read += n;
            metrics::counter!("pinhole_relay_userspace_packets_total").increment(n as u64);
            let now = Instant::now();
            let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
            for p in 0..n {
                let Some(pkt) = raw_packet(&self.recv, p) else { continue };
                let forwarded = self.ports.forward(now, now_ns, pkt.dst.port(), SocketAddr::V4(pkt.src), pkt.payload);
                if self.ports.has_replies() {
                    self.raw_local.insert(pkt.dst.port(), *pkt.dst.ip());
                }
                let Some(Forward { from_port: out_port, from_ip: out_ip, to, rewritten }) = forwarded else {
                    continue;
                };
                if self.fast.is_some() && !rewritten {
                    self.forwarded_here.push(pkt.dst.port());
                }
                if let (Some(rec), true) = (self.ports.recorded(pkt.dst.port()), self.recorder.is_some()) {
                    let data = if rewritten { self.ports.rewritten() } else { pkt.payload };
                    let path = (SocketAddr::V4(pkt.src), SocketAddr::V4(pkt.dst));
                    self.recorded.push(recorded(self.wall, rec, now, path, data));
                }
                let SocketAddr::V4(to) = to else { continue };
                let from_ip = match out_ip {
                    IpAddr::V4(ip) if !ip.is_unspecified() => ip,
                    _ => *pkt.dst.ip(),
                };
                let from = SocketAddrV4::new(from_ip, out_port);
                let payload = if rewritten { self.ports.rewritten() } else { pkt.payload };
                if !self.raw_send.push(from, to, payload) {
                    let _ = self.raw_send.flush(fd);
                    self.raw_send.push(from, to, payload);
                }
            }
            let _ = self.raw_send.flush(fd);
            self.flush_recorded();
            self.send_replies(Some(k));
            let mut ports = std::mem::take(&mut self.forwarded_here);
            ports.dedup();
            for port in ports.drain(..) {
                self.offload(port);
            }
            self.forwarded_here = ports;
            if n < BATCH {
                break;
            }
        }
        read
    }

    /// After a packet on `port` was forwarded here: puts its flow in the kernel once both
    /// parties are latched, or — when its party's latched source is no longer the one the
    /// flow was made for — takes it and its peer's (which sends to that party) out first.
    fn offload(&mut self, port: u16) {
        let now = self.ports.offloadable(port);
        if let Some(o) = self.offloads.get(&port) {
            if now.is_some_and(|c| c.src == o.src) {
                return;
            }
            self.unoffload(port);
        }
        let (Some(c), Some(fast)) = (now, self.fast.as_mut()) else { return };
        let (SocketAddr::V4(src), SocketAddr::V4(relay), SocketAddr::V4(from), SocketAddr::V4(to)) =
            (c.src, c.relay, c.from, c.to)
        else {
            return;
        };
        if self.offloads.len() >= MAX_FLOWS {
            return;
        }
        // A leg that one of this host's own sockets speaks for (the fake-TCP forwarder's
        // shim) stays in userspace with its peer: the forwarder is userspace anyway, and a
        // packet rewritten to a local source must not arrive from outside.
        if fast.is_local(*src.ip()) != fast.is_local(*to.ip()) {
            return;
        }
        let Some(ifindex) = fast.egress(*to.ip()) else { return };
        let key = FlowKey::new(src, relay);
        let seq = self.ports.sequence(c.relay.port());
        if fast.install(key, Flow::new(from, to, ifindex, seq)) {
            self.offloads.insert(port, Offload { key, src: c.src, packets: 0, bytes: 0, rtp: 0 });
            metrics::gauge!("pinhole_fastpath_flows").set(self.offloads.len() as f64);
        }
    }

    /// Takes `port`'s flow and its peer port's out of the kernel, counting what they
    /// forwarded last.
    fn unoffload(&mut self, port: u16) {
        let peer = self.ports.peer_of(port);
        for p in std::iter::once(port).chain(peer) {
            let Some(o) = self.offloads.remove(&p) else { continue };
            self.account_one(p, o, Instant::now());
            if let Some(fast) = self.fast.as_mut() {
                fast.remove(&o.key);
            }
        }
        metrics::gauge!("pinhole_fastpath_flows").set(self.offloads.len() as f64);
    }

    /// Reads every flow's counters into its stream's statistics.
    fn account_offloads(&mut self, now: Instant) {
        let ports: Vec<(u16, Offload)> = self.offloads.iter().map(|(p, o)| (*p, *o)).collect();
        for (port, o) in ports {
            let updated = self.account_one(port, o, now);
            self.offloads.insert(port, updated);
        }
    }

    fn account_one(&self, port: u16, mut o: Offload, now: Instant) -> Offload {
        let Some(c) = self.fast.as_ref().and_then(|f| f.counters(&o.key)) else { return o };
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let (dp, db) = (c.packets.saturating_sub(o.packets), c.bytes.saturating_sub(o.bytes));
        let rtp =
            c.ext_max.map(|ext_max| Offloaded { packets: c.rtp.saturating_sub(o.rtp), ext_max, jitter16: c.jitter16 });
        self.ports.account(port, now_ns, (dp, db), rtp);
        metrics::counter!("pinhole_fastpath_packets_total").increment(dp);
        (o.packets, o.bytes, o.rtp) = (c.packets, c.bytes, c.rtp);
        o
    }

    /// Sends what ports send on their own (ICE answers, DTLS records): from the port's own
    /// socket, or in raw mode through raw socket `raw`.
    fn send_replies(&mut self, raw: Option<usize>) {
        while let Some(r) = self.ports.poll_reply() {
            if let Some(fd) =
                raw.or((!self.raw.is_empty()).then_some(0)).and_then(|k| self.raw.get(k)).map(RawSocket::fd)
            {
                let (IpAddr::V4(from_ip), SocketAddr::V4(to)) = (r.from_ip, r.to) else { continue };
                let from_ip = if from_ip.is_unspecified() {
                    match self.raw_local.get(&r.from_port) {
                        Some(ip) => *ip,
                        None => continue,
                    }
                } else {
                    from_ip
                };
                if !self.raw_send.push(SocketAddrV4::new(from_ip, r.from_port), to, &r.data) {
                    let _ = self.raw_send.flush(fd);
                    self.raw_send.push(SocketAddrV4::new(from_ip, r.from_port), to, &r.data);
                }
                let _ = self.raw_send.flush(fd);
            } else if let Some(sock) = self.ports.slot(r.from_port).and_then(|s| s.sock.as_ref()) {
                if let Err(e) = sock.send_to(&r.data, r.to) {
                    tracing::debug!(dst = %r.to, error = %e, "relay reply failed");
                }
            }
        }
    }

    /// Per-port mode: drain one ready socket, send the accepted packets on from the peer.
    /// Returns how many packets were read.
    fn forward(&mut self, port: u16) -> usize {
        let mut read = 0;
        loop {
            let Some(fd) = self.ports.slot(port).and_then(|s| s.sock.as_ref()).map(AsRawFd::as_raw_fd) else {
                return read;
            };
            let n = match self.recv.recv(fd) {
                Ok(0) | Err(_) => return read,
                Ok(n) => n,
            };
            read += n;
            metrics::counter!("pinhole_relay_userspace_packets_total").increment(n as u64);
            let now = Instant::now();
            let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
            let mut out: Option<(u16, SocketAddr)> = None;
            let mut accepted = [false; BATCH];
            for (k, ok) in accepted.iter_mut().enumerate().take(n) {
                let (data, src, truncated) = self.recv.packet(k);
                let Some(src) = src.filter(|_| !truncated) else { continue };
                let forwarded = self.ports.forward(now, now_ns, port, src, data);
                if let (Some(f), Some(rec), true) = (&forwarded, self.ports.recorded(port), self.recorder.is_some()) {
                    let data = if f.rewritten { self.ports.rewritten() } else { data };
                    let bound = self.ports.slot(port).map_or(src, |s| SocketAddr::new(s.bind, port));
                    self.recorded.push(recorded(self.wall, rec, now, (src, bound), data));
                }
                match forwarded {
                    // Changed on the way (SRTP): sent alone, perhaps from another port (RTCP
                    // between a muxing and a non-muxing leg).
                    Some(f) if f.rewritten => {
                        if let Some(sock) = self.ports.slot(f.from_port).and_then(|s| s.sock.as_ref()) {
                            if let Err(e) = sock.send_to(self.ports.rewritten(), f.to) {
                                tracing::debug!(dst = %f.to, error = %e, "relay send failed");
                            }
                        }
                    }
                    Some(f) => {
                        *ok = true;
                        out = Some((f.from_port, f.to));
                    }
                    None => {}
                }
            }
            self.flush_recorded();
            self.send_replies(None);
            if let Some((peer_port, dst)) = out {
                let Some(peer) = self.ports.slot(peer_port) else {
                    return read;
                };
                self.send.start(dst);
                for (k, ok) in accepted.iter().enumerate().take(n) {
                    if *ok {
                        let len = self.recv.packet(k).0.len();
                        self.send.push(&self.recv, k, len);
                    }
                }
                let Some(peer_fd) = peer.sock.as_ref().map(AsRawFd::as_raw_fd) else { return read };
                if let Err(e) = self.send.flush(peer_fd, &self.recv) {
                    tracing::debug!(%dst, error = %e, "relay send failed");
                }
            }
            if n < BATCH {
                return read;
            }
        }
    }
}
