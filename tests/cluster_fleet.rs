//! One SIP edge driving two pinhole relay nodes (`sip.listen = []`, ng only) over ng on
//! loopback: calls from sipp are spread over both; one relay killed with -9, the next calls
//! all go to the survivor; restarted, it is taken back. And a call between two regions,
//! chained through a relay in each, with RTP crossing both.

mod common;

use std::time::Duration;

use common::*;

/// A relay node: no SIP, ng on `ng_port`, media on `ip`.
fn relay_node(dir: &TempDir, ip: &str, ng_port: u16) -> Pinhole {
    let (lo, hi) = relay_range();
    Pinhole::with_config(
        dir,
        &format!(
            "[sip]\nlisten = []\ndomain = \"relay.test\"\n[media]\ninterfaces = [{{ name = \"lo\", bind = \"{ip}\" }}]\nport_min = {lo}\nport_max = {hi}\n[ng]\nlisten = \"127.0.0.1:{ng_port}\"\n"
        ),
    )
}

fn offers(relay: &Pinhole) -> Option<f64> {
    relay.metric("pinhole_ng_commands_total{command=\"offer\"}")
}

#[test]
fn calls_are_spread_over_two_relay_nodes_and_go_to_the_survivor_when_one_is_killed() {
    let dir = TempDir::new("fleet");
    let (ng1, ng2) = (free_port(), free_port());
    let mut r1 = relay_node(&dir, "127.0.0.21", ng1);
    let r2 = relay_node(&dir, "127.0.0.22", ng2);
    assert!(wait_listening_udp_ng(ng1) && wait_listening_udp_ng(ng2), "relay nodes' ng did not answer");
    let edge = Pinhole::start(
        &dir,
        PinholeOptions {
            relay_ports: Some(relay_range()),
            media_extra: format!("relays = [\"ng:127.0.0.1:{ng1}\", {{ ng = \"127.0.0.1:{ng2}\", weight = 1 }}]"),
            ..Default::default()
        },
    );
    let up = |ng: u16| format!("pinhole_fleet_relay_up{{relay=\"127.0.0.1:{ng}\"}}");
    assert!(
        edge.wait_metric(&up(ng1), 1.0, Duration::from_secs(5))
            && edge.wait_metric(&up(ng2), 1.0, Duration::from_secs(5)),
        "the edge never heard the relays' statistics\n{}",
        edge.log_text()
    );
    let _callee = sipp_callee(&edge.sip(), "carol", free_port(), "u1", "uas.xml", 120_000, &dir.path().join("uas.err"));
    assert!(edge.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)), "carol did not register");

    let (ok, good, _, text) = sipp_caller(&edge.sip(), "carol", "uac.xml", 20, "u1", &dir.path().join("spread.err"));
    assert!(ok && good == 20, "not all 20 calls were answered: {text}\n{}", edge.log_text());
    let (a, b) = (offers(&r1).expect("relay 1 metrics"), offers(&r2).expect("relay 2 metrics"));
    assert_eq!(a + b, 20.0, "each call is one offer on one relay");
    assert!(a >= 5.0 && b >= 5.0, "calls not spread: relay 1 took {a}, relay 2 took {b}");
    // Every call was released on its relay.
    assert!(wait_until(Duration::from_secs(5), || r1.metric("pinhole_relay_sessions") == Some(0.0)
        && r2.metric("pinhole_relay_sessions") == Some(0.0)));

    // Relay 1 dies: the edge takes it out and every new call is anchored on relay 2.
    r1.kill9();
    let (ok, good, _, text) = sipp_caller(&edge.sip(), "carol", "uac.xml", 10, "u1", &dir.path().join("survivor.err"));
    assert!(
        ok && good == 10,
        "calls failed after relay 1 died: {text}\n{}\n--- callee ---\n{}",
        edge.log_text(),
        std::fs::read_to_string(dir.path().join("uas.err")).unwrap_or_default()
    );
    assert_eq!(offers(&r2), Some(b + 10.0), "the survivor took all 10");
    assert!(edge.wait_metric(&up(ng1), 0.0, Duration::from_secs(5)), "relay 1 still counted up");
    assert!(edge.log_text().contains("relay taken out of the fleet"), "{}", edge.log_text());

    // Back again: the edge takes it back in and gives it calls.
    r1.restart();
    assert!(edge.wait_metric(&up(ng1), 1.0, Duration::from_secs(10)), "relay 1 not taken back\n{}", edge.log_text());
    let (ok, good, _, text) = sipp_caller(&edge.sip(), "carol", "uac.xml", 4, "u1", &dir.path().join("back.err"));
    assert!(ok && good == 4, "{text}");
    assert!(offers(&r1).is_some_and(|n| n >= 1.0), "the restarted relay got no call");
}

/// Waits until an ng `ping` on 127.0.0.1:`port` gets its `pong`.
fn wait_listening_udp_ng(port: u16) -> bool {
    wait_until(Duration::from_secs(10), || {
        udp_exchange(&format!("127.0.0.1:{port}"), b"p1 d7:command4:pinge", Duration::from_millis(200))
            .iter()
            .any(|r| r.contains("pong"))
    })
}

#[test]
fn a_call_between_two_regions_is_chained_through_a_relay_in_each_and_rtp_crosses_both() {
    let dir = TempDir::new("chain");
    let (ng_eu, ng_us) = (free_port(), free_port());
    let eu = relay_node(&dir, "127.0.0.21", ng_eu);
    let us = relay_node(&dir, "127.0.0.22", ng_us);
    assert!(wait_listening_udp_ng(ng_eu) && wait_listening_udp_ng(ng_us), "relay nodes' ng did not answer");
    let edge = Pinhole::start(
        &dir,
        PinholeOptions {
            relay_ports: Some(relay_range()),
            media_extra: format!(
                "relays = [{{ ng = \"127.0.0.1:{ng_eu}\", region = \"eu\", cidrs = [\"127.0.0.1/32\"] }}, \
                 {{ ng = \"127.0.0.1:{ng_us}\", region = \"us\", cidrs = [\"127.0.0.5/32\"] }}]"
            ),
            ..Default::default()
        },
    );
    // The callee lives on 127.0.0.5 (the us relay's CIDR), the caller on 127.0.0.1 (eu).
    let _callee = sipp_callee_via(
        &edge.sip(),
        None,
        "rita",
        free_port(),
        "u1",
        "uas.xml",
        8000,
        &dir.path().join("uas.err"),
        &["-rtp_echo", "-mp", &media_ports().to_string(), "-i", "127.0.0.5"],
    );
    assert!(
        edge.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)),
        "callee did not register: {}",
        std::fs::read_to_string(dir.path().join("uas.out")).unwrap_or_default()
    );
    let (ok, good, _, text) = sipp_caller_via(
        &edge.sip(),
        None,
        "rita",
        "uac_rtp.xml",
        1,
        "u1",
        &dir.path().join("uac.err"),
        &["-mp", &media_ports().to_string()],
    );
    assert!(ok && good == 1, "{text}\n{}", edge.log_text());
    assert_eq!(offers(&eu), Some(1.0), "the caller's leg on eu");
    assert_eq!(offers(&us), Some(1.0), "the callee's leg on us");
    // g711a.pcap holds 100+ packets and the callee echoes them: each relay carries both
    // directions of the whole call.
    for (name, relay) in [("eu", &eu), ("us", &us)] {
        assert!(
            wait_until(Duration::from_secs(5), || relay.metric("pinhole_relay_sessions") == Some(0.0)),
            "{name} kept the call"
        );
        let packets = relay.metric("pinhole_relay_packets_total").expect("packets counted");
        assert!(packets >= 180.0, "{name} relayed {packets} packets");
        assert_eq!(relay.metric("pinhole_relay_dropped_total"), Some(0.0), "{name} dropped packets");
    }
}
