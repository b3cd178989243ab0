//! The media data plane: forwarding threads, each owning the relay sockets of the calls
//! sharded to it. The control plane (the proxy's relay) talks to them over channels; per
//! packet there is no lock and no allocation — one `recvmmsg` per ready socket, a latch
//! decision per packet, one `sendmmsg` per batch.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use pinhole_media::latch::{Latch, RtpInfo, Verdict};
use pinhole_media::relay::{Command, PortSpec, RelayPort};
use pinhole_media::stats::StreamStats;

use crate::mmsg::{RecvBatch, SendBatch};

const BATCH: usize = 32;
const WAKER: Token = Token(usize::MAX);

struct Slot {
    sock: UdpSocket,
    peer: RelayPort,
    latch: Latch,
    stats: Arc<StreamStats>,
}

/// What a worker is told. Sockets are bound by the control plane before the command is
/// sent, so a port is open by the time its SDP leaves pinhole.
enum WorkerCmd {
    Link { a: (PortSpec, std::net::UdpSocket), b: (PortSpec, std::net::UdpSocket) },
    Command(Command),
}

/// Handles to the forwarding threads.
pub(crate) struct DataPlane {
    workers: Vec<(Sender<WorkerCmd>, Arc<Waker>)>,
}

fn bind(spec: &PortSpec) -> Option<std::net::UdpSocket> {
    let addr = SocketAddr::new(spec.bind, spec.port.0);
    match std::net::UdpSocket::bind(addr).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
        Ok(s) => Some(s),
        Err(e) => {
            metrics::counter!("pinhole_relay_bind_errors_total").increment(1);
            tracing::warn!(%addr, error = %e, "cannot bind relay port");
            None
        }
    }
}

impl DataPlane {
    /// Starts `n` forwarding threads for ports in `port_min..=port_max`.
    pub(crate) fn start(n: usize, port_min: u16, port_max: u16, epoch: Instant) -> std::io::Result<DataPlane> {
        let mut workers = Vec::new();
        for i in 0..n.max(1) {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = channel();
            let mut w = Worker {
                poll,
                rx,
                slots: (port_min..=port_max).map(|_| None).collect(),
                base: port_min,
                epoch,
                recv: RecvBatch::new(BATCH),
                send: SendBatch::new(BATCH),
            };
            std::thread::Builder::new().name(format!("relay {i}")).spawn(move || w.run())?;
            workers.push((tx, waker));
        }
        Ok(DataPlane { workers })
    }

    /// Hands a relay command to the worker that owns the call.
    pub(crate) fn execute(&self, cmd: Command) {
        let shard = match &cmd {
            Command::Link { shard, .. } | Command::Expect { shard, .. } | Command::Unlink { shard, .. } => *shard,
        };
        let (tx, waker) = &self.workers[(shard % self.workers.len() as u64) as usize];
        let msg = match cmd {
            Command::Link { a, b, .. } => {
                let (Some(sa), Some(sb)) = (bind(&a), bind(&b)) else { return };
                WorkerCmd::Link { a: (a, sa), b: (b, sb) }
            }
            other => WorkerCmd::Command(other),
        };
        if tx.send(msg).is_ok() {
            let _ = waker.wake();
        }
    }
}

struct Worker {
    poll: Poll,
    rx: Receiver<WorkerCmd>,
    slots: Vec<Option<Slot>>,
    base: u16,
    epoch: Instant,
    recv: RecvBatch,
    send: SendBatch,
}

impl Worker {
    fn index(&self, port: RelayPort) -> Option<usize> {
        let i = usize::from(port.0.checked_sub(self.base)?);
        (i < self.slots.len()).then_some(i)
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "relay worker poll failed");
                return;
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    self.commands();
                } else {
                    self.forward(RelayPort(ev.token().0 as u16));
                }
            }
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
                    if let Some(slot) = self.index(port).and_then(|i| self.slots[i].as_mut()) {
                        slot.latch.on_signal(now, expected);
                    }
                }
                WorkerCmd::Command(Command::Unlink { ports, .. }) => {
                    for p in ports {
                        if let Some(i) = self.index(p) {
                            if let Some(mut s) = self.slots[i].take() {
                                let _ = self.poll.registry().deregister(&mut s.sock);
                            }
                        }
                    }
                }
            }
        }
    }

    fn open(&mut self, now: Instant, (spec, sock): (PortSpec, std::net::UdpSocket), peer: RelayPort) {
        let Some(i) = self.index(spec.port) else { return };
        let mut sock = UdpSocket::from_std(sock);
        if let Err(e) = self.poll.registry().register(&mut sock, Token(usize::from(spec.port.0)), Interest::READABLE) {
            tracing::warn!(port = spec.port.0, error = %e, "cannot poll relay port");
            return;
        }
        self.slots[i] = Some(Slot { sock, peer, latch: Latch::new(spec.mode, spec.expected, now), stats: spec.stats });
    }

    /// Drains one ready socket: latch each packet, send the accepted ones on from the peer.
    fn forward(&mut self, port: RelayPort) {
        let Some(i) = self.index(port) else { return };
        loop {
            let Some(slot) = self.slots[i].as_ref() else { return };
            let n = match self.recv.recv(slot.sock.as_raw_fd()) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = Instant::now();
            let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
            let peer_index = self.index(slot.peer);
            // Decide every packet with this port's latch.
            let mut accepted = [false; BATCH];
            if let Some(slot) = self.slots[i].as_mut() {
                for (k, ok) in accepted.iter_mut().enumerate().take(n) {
                    let (data, src, truncated) = self.recv.packet(k);
                    let Some(src) = src.filter(|_| !truncated) else {
                        slot.stats.on_drop();
                        continue;
                    };
                    let rtp = RtpInfo::parse(data);
                    match slot.latch.on_packet(now, src, rtp) {
                        Verdict::Forward => {
                            slot.stats.on_packet(now_ns, data.len(), rtp);
                            *ok = true;
                        }
                        Verdict::Drop(_) => slot.stats.on_drop(),
                    }
                }
            }
            // Send the accepted ones from the peer port to the peer's destination.
            let Some(peer) = peer_index.and_then(|p| self.slots[p].as_ref()) else { continue };
            let Some(dst) = peer.latch.destination() else { continue };
            self.send.start(dst);
            for (k, ok) in accepted.iter().enumerate().take(n) {
                if *ok {
                    let len = self.recv.packet(k).0.len();
                    self.send.push(&self.recv, k, len);
                }
            }
            if let Err(e) = self.send.flush(peer.sock.as_raw_fd(), &self.recv) {
                tracing::debug!(%dst, error = %e, "relay send failed");
            }
            if n < BATCH {
                return;
            }
        }
    }
}
