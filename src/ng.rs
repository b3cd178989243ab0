//! The ng control listeners (UDP and TCP) around the node's sans-IO
//! [`NgServer`](pinhole_media::ng_server::NgServer): sockets and threads only.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits::{Backoff, LogLimiter};
use crate::server::{input, Shared};

/// ng TCP connections served at once (each has a thread); more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 32;

pub(crate) fn run(shared: &Arc<Shared>, sock: &UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
        if let Some(reply) = input(shared, |node| node.handle_ng(Instant::now(), from, &buf[..n])) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

/// A connection slot, given back when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// An ng TCP connection silent this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(300);

/// ng over TCP: `<cookie> <bencoded dictionary>` back to back on a stream. A message that
/// cannot be framed closes the connection.
pub(crate) fn run_tcp(shared: &Arc<Shared>, listener: &TcpListener) {
    static ACCEPT_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = Backoff::new();
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!("pinhole_accept_errors_total", "listener" => "ng").increment(1);
                if let Some(suppressed) = ACCEPT_LOG.allow(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "ng accept failed; backing off");
                }
                std::thread::sleep(backoff.next_delay());
                continue;
            }
        };
        backoff.reset();
        if open.load(Relaxed) >= MAX_TCP_CONNECTIONS {
            metrics::counter!("pinhole_ng_connections_refused_total").increment(1);
            continue; // dropping it closes it
        }
        open.fetch_add(1, Relaxed);
        let _ = conn.set_read_timeout(Some(TCP_IDLE));
        let shared = shared.clone();
        let open = open.clone();
        let _ = std::thread::Builder::new().name("ng tcp".into()).spawn(move || {
            let _slot = Slot(open);
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 16 * 1024];
            loop {
                let n = match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                let replies = match input(&shared, |node| node.handle_ng_stream(Instant::now(), &mut buf)) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "ng stream closed");
                        return;
                    }
                };
                for reply in replies {
                    if conn.write_all(&reply).is_err() {
                        return;
                    }
                }
            }
        });
    }
}
