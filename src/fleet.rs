//! The relay fleet's socket (`[media] relays`): call commands and statistics requests go
//! out of it as the node's `Output::Ng`, and a receive thread hands every reply to the
//! node. Nothing waits for a relay: the choices and the waiting are in
//! `pinhole_media::fleet`.

use std::net::UdpSocket;
use std::sync::Arc;

use anyhow::Context;

use crate::server::Shared;

/// The fleet's socket; the node's `Output::Ng` go out on it.
pub(crate) fn bind() -> anyhow::Result<Arc<UdpSocket>> {
    Ok(Arc::new(UdpSocket::bind("0.0.0.0:0").context("binding the fleet's socket")?))
}

/// The fleet socket's receive thread: replies go to the node, and what they release
/// (messages waiting for a relay) is sent.
pub(crate) fn spawn(shared: &Arc<Shared>, rx: Arc<UdpSocket>) -> anyhow::Result<()> {
    let s = shared.clone();
    std::thread::Builder::new()
        .name("fleet".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = rx.recv_from(&mut buf) else { continue };
                let data = &buf[..n];
                let taken =
                    crate::server::input(&s, |node| node.handle_fleet_reply(std::time::Instant::now(), from, data));
                if !taken {
                    metrics::counter!("pinhole_fleet_garbage_total").increment(1);
                }
            }
        })
        .context("starting the fleet thread")?;
    Ok(())
}
