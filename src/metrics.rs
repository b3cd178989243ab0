//! `/metrics` over HTTP, served here rather than by the exporter's own listener so that it
//! has the same bounds as every other listener: a cap on concurrent connections, a deadline
//! per request, and backoff with rate-limited logging when accept fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::limits::{accept_failed, Backoff, LogLimiter};

/// Scrapes served at once; more are closed at accept.
const MAX_SCRAPERS: usize = 16;
/// A scrape must send its request and take its answer within this.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_REQUEST: usize = 4096;

static ACCEPT_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// Installs the recorder and serves it on `addr`.
pub(crate) async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let handle =
        quality_buckets(PrometheusBuilder::new())?.install_recorder().context("installing the metrics recorder")?;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("serving metrics on {addr}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    register_defaults();
    tokio::spawn(accept_loop(listener, handle));
    tracing::info!(%addr, "metrics on /metrics");
    Ok(())
}

/// Call quality as histograms (buckets where the figures mean something to an operator),
/// not the exporter's default summaries: they aggregate across nodes.
fn quality_buckets(b: PrometheusBuilder) -> anyhow::Result<PrometheusBuilder> {
    use metrics_exporter_prometheus::Matcher;
    let buckets: [(&str, &[f64]); 4] = [
        ("pinhole_call_mos", &[1.0, 2.0, 2.6, 3.1, 3.6, 3.8, 4.0, 4.2, 4.3, 4.4, 5.0]),
        ("pinhole_call_loss_percent", &[0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]),
        ("pinhole_call_jitter_ms", &[1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0]),
        ("pinhole_call_rtt_ms", &[10.0, 25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0]),
    ];
    buckets.into_iter().try_fold(b, |b, (name, values)| {
        b.set_buckets_for_metric(Matcher::Full(name.to_owned()), values).context("metric buckets")
    })
}

/// Every counter and gauge appears from the start, at 0, so a scrape (or a test) can tell
/// "nothing happened" from "not served".
fn register_defaults() {
    for name in [
        "pinhole_relay_packets_total",
        "pinhole_relay_bytes_total",
        "pinhole_relay_dropped_total",
        "pinhole_relay_bind_errors_total",
        "pinhole_ng_garbage_total",
        "pinhole_ng_connections_refused_total",
        "pinhole_auth_replays_total",
        "pinhole_auth_refused_total",
        "pinhole_sip_replies_suppressed_total",
        "pinhole_sip_dialogs_refused_total",
        "pinhole_metrics_refused_total",
        "pinhole_fleet_garbage_total",
        "pinhole_fleet_backlog_refusals_total",
        "pinhole_fleet_orphans_deleted_total",
        "pinhole_media_waiting_refused_total",
        "pinhole_sip_websocket_refused_total",
        "pinhole_takeovers_total",
        "pinhole_takeover_restore_errors_total",
        "pinhole_takeover_garbage_total",
        "pinhole_relay_replies_dropped_total",
        "pinhole_relay_userspace_packets_total",
        "pinhole_fastpath_packets_total",
        "pinhole_relay_identity_errors_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    // Secure legs (SDES, WebRTC): what was not forwarded, and handshakes.
    for reason in
        ["control", "not_ready", "bad_tag", "replayed", "too_old", "malformed", "too_many_sources", "too_large"]
    {
        metrics::counter!("pinhole_relay_secure_dropped_total", "reason" => reason).absolute(0);
    }
    for outcome in ["done", "failed"] {
        metrics::counter!("pinhole_dtls_handshakes_total", "outcome" => outcome).absolute(0);
    }
    for t in ["udp", "tcp", "tls", "ws", "wss"] {
        metrics::counter!("pinhole_sip_garbage_total", "transport" => t).absolute(0);
    }
    for reason in ["total", "source"] {
        metrics::counter!("pinhole_sip_connections_refused_total", "reason" => reason).absolute(0);
    }
    for result in ["sent", "answered", "unanswered"] {
        metrics::counter!("pinhole_nat_keepalives_total", "result" => result).absolute(0);
    }
    metrics::counter!("pinhole_nat_mapping_deaths_total").absolute(0);
    for method in ["reach", "simultaneous-open", "prediction", "lockstep-shotgun", "birthday", "relay", "denied"] {
        metrics::counter!("pinhole_punch_plans_total", "method" => method).absolute(0);
    }
    // An agent's punching (zero on a server).
    for method in ["reach", "simultaneous-open", "prediction", "lockstep-shotgun", "birthday"] {
        metrics::counter!("pinhole_punch_attempts_total", "method" => method).absolute(0);
        metrics::counter!("pinhole_punch_fallbacks_total", "method" => method).absolute(0);
        metrics::counter!("pinhole_punch_recoveries_total", "method" => method).absolute(0);
        for outcome in ["direct", "failed"] {
            metrics::counter!("pinhole_punch_outcomes_total", "method" => method, "outcome" => outcome).absolute(0);
        }
    }
    for path in ["direct", "relayed"] {
        metrics::gauge!("pinhole_punch_calls", "path" => path).set(0.0);
    }
    for reason in ["idle", "incomplete"] {
        metrics::counter!("pinhole_sip_connections_timed_out_total", "reason" => reason).absolute(0);
    }
    for reason in ["media", "offer", "duration"] {
        metrics::counter!("pinhole_relay_timeouts_total", "reason" => reason).absolute(0);
    }
    // Call quality: served (empty) before the first call ends.
    for name in ["pinhole_call_mos", "pinhole_call_loss_percent", "pinhole_call_jitter_ms", "pinhole_call_rtt_ms"] {
        for by in ["relay", "agent"] {
            let _ = metrics::histogram!(name, "measured_by" => by);
        }
    }
    for result in ["taken", "refused"] {
        metrics::counter!("pinhole_agent_quality_reports_total", "result" => result).absolute(0);
    }
    for name in [
        "pinhole_registrar_bindings",
        "pinhole_sip_transactions",
        "pinhole_sip_connections",
        "pinhole_sip_dialogs",
        "pinhole_relay_sessions",
        "pinhole_relay_ports",
        "pinhole_fastpath_flows",
    ] {
        metrics::gauge!(name).set(0.0);
    }
}

async fn accept_loop(listener: TcpListener, handle: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    let mut backoff = Backoff::new();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                accept_failed("metrics", &e, &mut backoff, &ACCEPT_LOG).await;
                continue;
            }
        };
        backoff.reset();
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("pinhole_metrics_refused_total").increment(1);
            continue; // dropping the stream closes it
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_DEADLINE, answer(stream, &handle)).await;
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "not found: GET /metrics\n".to_owned())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}
