//! The relay fleet's sockets (`[media] relays`): a blocking exchange for call commands, and
//! a socket with a receive thread for the relays' statistics. The choices are made in
//! `pinhole_media::fleet`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pinhole_media::fleet::NgExchange;
use pinhole_media::ng::split_cookie;

use crate::server::Shared;

/// How long a call command waits for its reply before it is sent again, and how often it
/// is sent. The SIP message that needs it waits meanwhile (as with Kamailio's rtpengine
/// module, whose default is 1 s × 5), so a silent relay costs at most this much, once,
/// before it is taken out. Kept under T1 (500 ms): the message's SIP timers start from the
/// clock read before the wait, and a wait past T1 would have its INVITE retransmitted at
/// once.
const WAIT: Duration = Duration::from_millis(150);
const TRIES: u32 = 2;

/// Call commands: one socket, one command at a time (the node is behind one lock).
pub(crate) struct BlockingNg {
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl BlockingNg {
    pub(crate) fn new() -> anyhow::Result<BlockingNg> {
        let sock = UdpSocket::bind("0.0.0.0:0").context("binding the fleet's command socket")?;
        Ok(BlockingNg { sock, buf: vec![0; 65536] })
    }
}

impl NgExchange for BlockingNg {
    fn exchange(&mut self, to: SocketAddr, cookie: &str, payload: &[u8]) -> Option<Vec<u8>> {
        let mut msg = Vec::with_capacity(cookie.len() + 1 + payload.len());
        msg.extend_from_slice(cookie.as_bytes());
        msg.push(b' ');
        msg.extend_from_slice(payload);
        for _ in 0..TRIES {
            if let Err(e) = self.sock.send_to(&msg, to) {
                tracing::debug!(relay = %to, error = %e, "ng command not sent");
                return None;
            }
            let deadline = Instant::now() + WAIT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || self.sock.set_read_timeout(Some(left)).is_err() {
                    break;
                }
                let Ok((n, from)) = self.sock.recv_from(&mut self.buf) else { break };
                // A late reply to an earlier command, or a stranger: not ours.
                match split_cookie(&self.buf[..n]) {
                    Ok((c, reply)) if from == to && c == cookie.as_bytes() => return Some(reply.to_vec()),
                    _ => metrics::counter!("pinhole_fleet_garbage_total").increment(1),
                }
            }
        }
        None
    }
}

/// The statistics socket; the node's `Output::Ng` go out on it.
pub(crate) fn bind() -> anyhow::Result<Arc<UdpSocket>> {
    Ok(Arc::new(UdpSocket::bind("0.0.0.0:0").context("binding the fleet's statistics socket")?))
}

/// The statistics socket's receive thread: replies go to the node.
pub(crate) fn spawn(shared: &Arc<Shared>, rx: Arc<UdpSocket>) -> anyhow::Result<()> {
    let s = shared.clone();
    std::thread::Builder::new()
        .name("fleet".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = rx.recv_from(&mut buf) else { continue };
                if !s.node().handle_fleet_reply(from, &buf[..n]) {
                    metrics::counter!("pinhole_fleet_garbage_total").increment(1);
                }
            }
        })
        .context("starting the fleet thread")?;
    Ok(())
}
