//! Tier 3 for the media relay: sipp calls with real RTP through pinhole on loopback.

mod common;

use std::time::Duration;

use common::*;

fn relay_pinhole(dir: &TempDir) -> Pinhole {
    Pinhole::start(dir, PinholeOptions { relay_ports: Some(relay_range()), ..Default::default() })
}

/// The answer sipp receives must be anchored on a relay port (the scenario checks it), RTP
/// must cross the relay both ways (sipp's callee echoes it), and nothing may be left over.
#[test]
fn call_with_rtp_is_anchored_and_relayed_both_ways() {
    let dir = TempDir::new("rtp");
    let ph = relay_pinhole(&dir);
    let mp = media_ports().to_string();
    let callee = sipp_callee_via(
        &ph.sip(),
        None,
        "rita",
        free_port(),
        "u1",
        "uas.xml",
        6000,
        &dir.path().join("uas.err"),
        &["-rtp_echo", "-mp", &mp],
    );
    assert!(
        ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)),
        "callee did not register: {}",
        std::fs::read_to_string(dir.path().join("uas.out")).unwrap_or_default()
    );
    let mp2 = media_ports().to_string();
    let (ok, good, _, text) =
        sipp_caller_via(&ph.sip(), None, "rita", "uac_rtp.xml", 1, "u1", &dir.path().join("uac.err"), &["-mp", &mp2]);
    assert!(ok && good == 1, "{text}\n{}", ph.log_text());
    drop(callee);
    assert!(ph.wait_metric("pinhole_relay_sessions", 0.0, Duration::from_secs(5)), "session released");
    assert_eq!(ph.metric("pinhole_relay_sessions_started_total"), Some(1.0), "the call had a session");
    assert_eq!(ph.metric("pinhole_relay_ports"), Some(0.0));
    // g711a.pcap holds 100+ packets; the echo doubles them. One direction alone cannot pass.
    let packets = ph.metric("pinhole_relay_packets_total").expect("packets counted");
    assert!(packets >= 180.0, "relayed {packets} packets");
    assert_eq!(ph.metric("pinhole_relay_dropped_total"), Some(0.0));
}

/// Answered, busy and cancelled calls all release their relay ports.
#[test]
fn no_zombie_sessions_after_answered_busy_and_cancelled_calls() {
    for (ooc, uac, user) in [
        ("uas.xml", "uac.xml", "zed"),
        ("uas_busy.xml", "uac_busy.xml", "zoe"),
        ("uas_ring.xml", "uac_cancel.xml", "zak"),
    ] {
        let dir = TempDir::new(user);
        let ph = relay_pinhole(&dir);
        let callee = sipp_callee(&ph.sip(), user, free_port(), "u1", ooc, 4000, &dir.path().join("uas.err"));
        assert!(ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)));
        let (ok, good, _, text) = sipp_caller(&ph.sip(), user, uac, 10, "u1", &dir.path().join("uac.err"));
        assert!(ok && good == 10, "{uac}: {text}\n{}", ph.log_text());
        drop(callee);
        assert!(
            ph.wait_metric("pinhole_relay_sessions", 0.0, Duration::from_secs(5)),
            "{uac}: sessions left\n{}",
            ph.metrics().unwrap_or_default()
        );
        assert_eq!(ph.metric("pinhole_relay_ports"), Some(0.0), "{uac}: ports left");
        // ... and there were sessions to release: every call was anchored.
        assert_eq!(ph.metric("pinhole_relay_sessions_started_total"), Some(10.0), "{uac}: sessions started");
    }
}

/// `media.nice` reaches the forwarding threads (a positive value needs no privilege).
#[test]
fn relay_workers_run_at_the_configured_nice_value() {
    let dir = TempDir::new("relay-nice");
    let p = Pinhole::start(
        &dir,
        PinholeOptions { relay_ports: Some(relay_range()), media_extra: "nice = 7".into(), ..Default::default() },
    );
    let pid = p.pid().expect("running");
    let nice_of = |name: &str| -> Option<i64> {
        std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().find_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim() == name).then_some(())?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // Fields after the parenthesised name: state is 3rd, nice the 19th.
            stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), || nice_of("relay 0") == Some(7)),
        "relay 0 at nice {:?}",
        nice_of("relay 0")
    );
    assert_eq!(nice_of("pinhole"), Some(0), "the main thread keeps its priority");
    assert!(p.log_text().contains("relay worker priority set"));
}
