//! One SIP edge driving two pinhole relay nodes (`sip.listen = []`, ng only) over ng on
//! loopback: calls from sipp are spread over both; one relay killed with -9, the next calls
//! all go to the survivor; restarted, it is taken back. And a call between two regions,
//! chained through a relay in each, with RTP crossing both. And a relay that never
//! answers: the calls waiting for it hold up nothing else on the edge.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A REGISTER for `user` from `contact`, over `transport`.
fn register(user: &str, contact: &str, transport: &str, n: u32) -> String {
    format!(
        "REGISTER sip:pinhole.test SIP/2.0\r\nVia: SIP/2.0/{transport} {contact};branch=z9hG4bKreg{user}{n}\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@pinhole.test>;tag=r{n}\r\nTo: <sip:{user}@pinhole.test>\r\nCall-ID: reg-{user}@test\r\nCSeq: {n} REGISTER\r\nContact: <sip:{user}@{contact};transport={}>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n",
        transport.to_lowercase()
    )
}

/// Reads one response from a stream (no bodies here): its status line.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let text = String::from_utf8_lossy(&head).into_owned();
            return text.lines().next().unwrap_or_default().to_owned();
        }
        let n = s.read(&mut chunk).expect("the edge answers over TCP");
        assert!(n > 0, "the edge closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_relay_that_never_answers_holds_up_only_its_calls_and_never_a_register_over_tcp() {
    let dir = TempDir::new("silent-relay");
    // The fleet's only relay: a socket that takes every datagram and answers none.
    let relay = UdpSocket::bind("127.0.0.1:0").expect("bind");
    relay.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
    let edge = Pinhole::start(
        &dir,
        PinholeOptions {
            relay_ports: Some(relay_range()),
            media_extra: format!("relays = [\"ng:{}\"]", relay.local_addr().expect("addr")),
            ..Default::default()
        },
    );
    // carol is registered over UDP: a call to her needs its SDP anchored on the relay.
    let carol = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let carol_at = carol.local_addr().expect("addr").to_string();
    let answers = udp_exchange_from(&carol, &edge.sip(), register("carol", &carol_at, "UDP", 1).as_bytes());
    assert!(answers.iter().any(|a| a.starts_with("SIP/2.0 200")), "carol did not register: {answers:?}");

    // A caller keeps INVITEs coming (each waits 300 ms for the silent relay, then 503).
    let stop = Arc::new(AtomicBool::new(false));
    let caller = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let caller_at = caller.local_addr().expect("addr").to_string();
    let flood = {
        let (stop, target, caller) = (stop.clone(), edge.sip(), caller.try_clone().expect("clone"));
        std::thread::spawn(move || {
            let sdp =
                "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 400 {
                n += 1;
                let invite = format!(
                    "INVITE sip:carol@pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP {caller_at};branch=z9hG4bKinv{n}\r\nMax-Forwards: 70\r\nFrom: <sip:dave@pinhole.test>;tag=d{n}\r\nTo: <sip:carol@pinhole.test>\r\nCall-ID: silent-{n}@test\r\nCSeq: 1 INVITE\r\nContact: <sip:dave@{caller_at}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
                    sdp.len()
                );
                caller.send_to(invite.as_bytes(), &target).expect("send");
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        })
    };
    // The relay is being asked before the REGISTERs start.
    let mut offers = 0;
    let mut buf = [0u8; 65536];
    assert!(
        wait_until(Duration::from_secs(5), || {
            offers += count_offers(&relay, &mut buf);
            offers >= 3
        }),
        "the edge sent the silent relay no offers\n{}",
        edge.log_text()
    );

    // bob registers over TCP again and again while calls wait on the silent relay.
    let mut tcp = TcpStream::connect(edge.sip()).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let bob_at = tcp.local_addr().expect("addr").to_string();
    let mut pending = Vec::new();
    let mut delays = Vec::new();
    for n in 1..=50u32 {
        let t = Instant::now();
        tcp.write_all(register("bob", &bob_at, "TCP", n).as_bytes()).expect("send");
        let status = read_response(&mut tcp, &mut pending);
        delays.push(t.elapsed());
        assert!(status.starts_with("SIP/2.0 200"), "REGISTER {n}: {status}");
        offers += count_offers(&relay, &mut buf);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let invites = flood.join().expect("caller");
    offers += count_offers(&relay, &mut buf);

    // The calls did wait on the relay the whole time, and were refused naming why.
    assert!(offers >= 50, "only {offers} offers reached the relay for {invites} INVITEs");
    // (Unacknowledged, the 503s are retransmitted: a second of them is enough.)
    caller.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut refused = 0;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if let Ok((n, _)) = caller.recv_from(&mut buf) {
            refused += usize::from(buf[..n].starts_with(b"SIP/2.0 503 No Media Relay Answering"));
        }
    }
    assert!(refused >= 10, "the waiting calls were not refused with 503 ({refused} of {invites})");
    delays.sort();
    let (median, max) = (delays[delays.len() / 2], delays[delays.len() - 1]);
    eprintln!(
        "REGISTER over TCP while calls waited on a silent relay: median {median:?}, max {max:?}, {offers} offers"
    );
    assert!(
        median < Duration::from_millis(5) && max < Duration::from_millis(25),
        "REGISTER over TCP held up while calls waited on a silent relay: median {median:?}, max {max:?} (a wait on the relay is 300 ms)"
    );
}

/// Offers the silent relay received since last asked.
fn count_offers(relay: &UdpSocket, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while let Ok((len, _)) = relay.recv_from(buf) {
        n += usize::from(buf[..len].windows(13).any(|w| w == b"7:command5:of"));
    }
    n
}

/// Sends `payload` from `socket` and collects what comes back within a second.
fn udp_exchange_from(socket: &UdpSocket, target: &str, payload: &[u8]) -> Vec<String> {
    socket.send_to(payload, target).expect("send");
    socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && out.is_empty() {
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}
