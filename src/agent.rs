//! `pinhole agent`: the edge helper's sockets around the sans-IO [`Agent`]. One blocking
//! thread per UDP listen address; every message goes through the agent and out of the same
//! socket.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
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
