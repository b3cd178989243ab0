//! `[hep]`: SIP messages, RTCP and call quality reports exported to a capture server
//! (Homer, sngrep) over HEP v3. Capture points hand copies to a bounded queue and never
//! wait: when it is full the capture is dropped and counted. One thread encodes and sends.

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use pinhole_sip::hep::{self, Capture};
use pinhole_sip::transport::{Flow, Transport};

use crate::config::HepSpec;

/// One capture waiting for the exporter thread.
enum Item {
    Sip { src: SocketAddr, dst: SocketAddr, stream: bool, at: SystemTime, data: Bytes },
    Json { kind: u8, correlation: String, at: SystemTime, json: String },
}

/// The capture points' side of the exporter.
pub(crate) struct Hep {
    tx: SyncSender<Item>,
}

impl Hep {
    /// Starts the exporter thread sending to `spec.address`.
    pub(crate) fn start(spec: &HepSpec) -> anyhow::Result<Hep> {
        let to = spec.address.addr;
        let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let sock = UdpSocket::bind(bind).context("binding the HEP socket")?;
        sock.connect(to).with_context(|| format!("HEP to {to}"))?;
        let (tx, rx) = sync_channel(spec.queue.max(1));
        let (id, password) = (spec.capture_id, spec.password.clone());
        std::thread::Builder::new()
            .name("hep".into())
            .spawn(move || export(&rx, &sock, id, &password))
            .context("starting the HEP exporter")?;
        for reason in ["queue_full", "too_large", "send_error"] {
            metrics::counter!("pinhole_hep_dropped_total", "reason" => reason).absolute(0);
        }
        metrics::counter!("pinhole_hep_sent_total").absolute(0);
        tracing::info!(to = %to, capture_id = id, "HEP export on");
        Ok(Hep { tx })
    }

    fn push(&self, item: Item) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(item) {
            metrics::counter!("pinhole_hep_dropped_total", "reason" => "queue_full").increment(1);
        }
    }

    /// A SIP message received on `flow` (`inbound`) or sent on it. Only SIP start lines
    /// are captured: keepalives (CRLF, STUN) on the SIP ports are not messages.
    pub(crate) fn sip(&self, flow: &Flow, inbound: bool, data: &[u8]) {
        if !data.first().is_some_and(u8::is_ascii_uppercase) {
            return;
        }
        let (src, dst) = if inbound { (flow.remote, flow.local) } else { (flow.local, flow.remote) };
        let stream = flow.transport != Transport::Udp;
        self.push(Item::Sip { src, dst, stream, at: SystemTime::now(), data: Bytes::copy_from_slice(data) });
    }

    /// A JSON report of `kind` ([`hep::RTCP_JSON`], [`hep::REPORT_JSON`]) for a call.
    pub(crate) fn json(&self, kind: u8, call_id: &str, json: String) {
        self.push(Item::Json { kind, correlation: call_id.to_owned(), at: SystemTime::now(), json });
    }
}

fn unix(at: SystemTime) -> (u32, u32) {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as u32, d.subsec_micros())
}

/// The exporter thread: encodes and sends until the capture points are gone.
fn export(rx: &Receiver<Item>, sock: &UdpSocket, capture_id: u32, password: &str) {
    let mut buf = Vec::with_capacity(2048);
    let unspecified: SocketAddr = ([0, 0, 0, 0], 0).into();
    let password = Some(password).filter(|p| !p.is_empty());
    while let Ok(item) = rx.recv() {
        let capture = match &item {
            Item::Sip { src, dst, stream, at, data } => Capture {
                src: *src,
                dst: *dst,
                stream: *stream,
                time: unix(*at),
                kind: hep::SIP,
                payload: data,
                correlation: None,
            },
            Item::Json { kind, correlation, at, json } => Capture {
                src: unspecified,
                dst: unspecified,
                stream: false,
                time: unix(*at),
                kind: *kind,
                payload: json.as_bytes(),
                correlation: Some(correlation),
            },
        };
        if hep::encode(&capture, capture_id, password, &mut buf).is_err() {
            metrics::counter!("pinhole_hep_dropped_total", "reason" => "too_large").increment(1);
            continue;
        }
        match sock.send(&buf) {
            Ok(_) => metrics::counter!("pinhole_hep_sent_total").increment(1),
            Err(_) => metrics::counter!("pinhole_hep_dropped_total", "reason" => "send_error").increment(1),
        }
    }
}

/// A released call's quality as the JSON of a HEP report: the worst direction's figures
/// and each direction's.
pub(crate) fn quality_json(q: &pinhole_media::quality::CallQuality) -> String {
    let directions: Vec<serde_json::Value> = q
        .directions
        .iter()
        .map(|d| {
            serde_json::json!({
                "stream": d.stream,
                "from": d.from.label(),
                "ssrc": d.ssrc,
                "expected": d.expected,
                "lost": d.lost,
                "loss_pct": d.loss_pct(),
                "jitter_ms": d.jitter_ms,
                "rtt_ms": d.rtt_us.map(|r| f64::from(r) / 1000.0),
                "mos": d.mos,
                "mos_min": d.lowest_mos,
            })
        })
        .collect();
    serde_json::json!({
        "type": "call quality",
        "measured_by": "relay",
        "call_id": q.call_id,
        "mos": q.mos(),
        "mos_min": q.lowest_mos(),
        "loss_pct": q.loss_pct(),
        "jitter_ms": q.jitter_ms(),
        "rtt_ms": q.rtt_us().map(|r| f64::from(r) / 1000.0),
        "directions": directions,
    })
    .to_string()
}

/// An agent's report of a call it carried, as the JSON of a HEP report.
pub(crate) fn agent_json(q: &pinhole_sip::agent::AgentQuality) -> String {
    serde_json::json!({
        "type": "call quality",
        "measured_by": "agent",
        "call_id": q.call_id,
        "mos": q.mos,
        "loss_pct": q.loss_pct,
        "jitter_ms": q.jitter_ms,
        "rtt_ms": q.rtt_ms,
        "expected": q.expected,
        "lost": q.lost,
    })
    .to_string()
}
