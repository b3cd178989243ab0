//! Call quality as the shell reports it: one log line per released call (and per agent
//! report of a direct call), and the histograms, by who measured it.

use std::net::SocketAddr;

/// A call's media was released: its quality in the log and the metrics (the worst
/// direction's MOS, loss over all directions, the highest jitter and round trip).
pub(crate) fn media_released(q: &pinhole_media::quality::CallQuality) {
    let Some(mos) = q.mos() else { return };
    let (loss, jitter, rtt) = (q.loss_pct(), q.jitter_ms(), q.rtt_us().map(|r| f64::from(r) / 1000.0));
    record_quality("relay", mos, loss, jitter, rtt);
    tracing::info!(
        call_id = %q.call_id,
        mos = format_args!("{mos:.2}"),
        mos_min = format_args!("{:.2}", q.lowest_mos().unwrap_or(mos)),
        loss_pct = format_args!("{loss:.2}"),
        jitter_ms = format_args!("{jitter:.1}"),
        rtt_ms = %rtt.map_or("-".to_owned(), |r| format!("{r:.1}")),
        directions = %directions(q),
        "call media released"
    );
}

/// One call's quality in the histograms, by who measured it: the relay, or an agent for
/// a call whose media went direct.
fn record_quality(measured_by: &'static str, mos: f64, loss: f64, jitter: f64, rtt: Option<f64>) {
    metrics::histogram!("pinhole_call_mos", "measured_by" => measured_by).record(mos);
    metrics::histogram!("pinhole_call_loss_percent", "measured_by" => measured_by).record(loss);
    metrics::histogram!("pinhole_call_jitter_ms", "measured_by" => measured_by).record(jitter);
    if let Some(rtt) = rtt {
        metrics::histogram!("pinhole_call_rtt_ms", "measured_by" => measured_by).record(rtt);
    }
}

/// An agent's signed report of a call it carried (media direct, past the relay).
pub(crate) fn agent_quality(agent: SocketAddr, q: &pinhole_sip::agent::AgentQuality) {
    record_quality("agent", q.mos, q.loss_pct, q.jitter_ms, q.rtt_ms);
    tracing::info!(
        call_id = %q.call_id,
        %agent,
        mos = format_args!("{:.2}", q.mos),
        loss_pct = format_args!("{:.2}", q.loss_pct),
        jitter_ms = format_args!("{:.1}", q.jitter_ms),
        rtt_ms = %q.rtt_ms.map_or("-".to_owned(), |r| format!("{r:.1}")),
        lost = q.lost,
        expected = q.expected,
        "agent reported call quality"
    );
}

/// Each direction of a released call: who sent, its MOS, loss, jitter and round trip.
fn directions(q: &pinhole_media::quality::CallQuality) -> String {
    let rtt = |r: Option<u32>| r.map_or("-".to_owned(), |r| format!("{:.1}ms", f64::from(r) / 1000.0));
    q.directions
        .iter()
        .map(|d| {
            format!(
                "{}#{}: mos {:.2} loss {:.2}% ({}/{}) jitter {:.1}ms rtt {}",
                d.from.label(),
                d.stream,
                d.mos,
                d.loss_pct(),
                d.lost,
                d.expected,
                d.jitter_ms,
                rtt(d.rtt_us)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
