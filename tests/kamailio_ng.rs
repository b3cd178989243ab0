//! Tier 3: Kamailio 5.6 from Debian drives pinhole over ng, as it would rtpengine. sipp
//! calls through Kamailio must be anchored on pinhole's relay ports, RTP must flow, query
//! must show it, and the BYE's delete must leave no session behind.

mod common;

use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pinhole_media::ng::Bencode;

/// pinhole as a pure media relay: no SIP listener, ng on; returns it and its ng port.
fn relay_only(dir: &TempDir) -> (Pinhole, u16) {
    let ng_port = free_port();
    let (lo, hi) = relay_range();
    let ph = Pinhole::with_config(
        dir,
        &format!(
            "[sip]\nlisten = []\ndomain = \"relay.test\"\n[registrar]\nstore = \"\"\n\
             [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"lo\", bind = \"127.0.0.1\" }}]\nport_min = {lo}\nport_max = {hi}\n\
             [ng]\nlisten = \"127.0.0.1:{ng_port}\"\n"
        ),
    );
    (ph, ng_port)
}

fn int(v: Option<&Bencode>) -> i64 {
    match v {
        Some(Bencode::Int(i)) => *i,
        _ => -1,
    }
}

#[test]
fn kamailio_anchors_calls_on_pinhole_over_ng() {
    let dir = TempDir::new("kam");
    let (ph, ng_port) = relay_only(&dir);
    let pong = ng(ng_port, "p1", Bencode::dict(vec![("command", Bencode::str("ping"))]));
    assert_eq!(pong.get("result").and_then(Bencode::as_str), Some("pong"));

    let kam_port = free_port();
    let cfg = std::fs::read_to_string(repo().join("config/kamailio/kamailio.cfg"))
        .expect("kamailio.cfg")
        .replace("__LISTEN__", &format!("udp:127.0.0.1:{kam_port}"))
        .replace("__NG__", &format!("udp:127.0.0.1:{ng_port}"));
    let cfg_path = dir.path().join("kamailio.cfg");
    std::fs::write(&cfg_path, cfg).expect("write cfg");
    let kam_log = dir.path().join("kamailio.log");
    let _kamailio = Bg(Some(
        Command::new("kamailio")
            .arg("-f")
            .arg(&cfg_path)
            .args(["-DD", "-E", "-m", "512", "-M", "32", "-w"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&kam_log).expect("log"))
            .process_group(0)
            .spawn()
            .expect("kamailio must be installed"),
    ));
    let kam = format!("127.0.0.1:{kam_port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = "OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKkamprobe;rport\r\nFrom: <sip:t@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: kamprobe\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    while udp_exchange(&kam, probe.as_bytes(), Duration::from_millis(200)).is_empty() {
        assert!(
            Instant::now() < deadline,
            "kamailio did not start:\n{}",
            std::fs::read_to_string(&kam_log).unwrap_or_default()
        );
    }

    // The callee checks the offer it gets is anchored; the caller checks the answer.
    let callee = sipp_callee_via(
        &kam,
        None,
        "kim",
        free_port(),
        "u1",
        "uas_relay.xml",
        12_000,
        &dir.path().join("uas.err"),
        &["-rtp_echo", "-trace_msg", "-message_file", &dir.path().join("uas.msg").display().to_string()],
    );
    // The callee is reachable once Kamailio's registrar has said 200 to its REGISTER.
    assert!(wait_for(&dir.path().join("uas.msg"), "SIP/2.0 200", Duration::from_secs(10)), "callee never registered");
    let caller = std::thread::spawn({
        let kam = kam.clone();
        let err = dir.path().join("uac.err");
        move || sipp_caller(&kam, "kim", "uac_rtp.xml", 1, "u1", &err)
    });
    // While the call is up, query shows RTP on its streams.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut polls = 0;
    let q = loop {
        polls += 1;
        let list = ng(ng_port, &format!("l1-{polls}"), Bencode::dict(vec![("command", Bencode::str("list"))]));
        let calls = match list.get("calls") {
            Some(Bencode::List(calls)) => calls.clone(),
            _ => panic!("list: {list}"),
        };
        assert!(calls.len() <= 1, "one anchored call: {list}");
        if let Some(call_id) = calls.first().and_then(Bencode::as_str) {
            let cmd = Bencode::dict(vec![("command", Bencode::str("query")), ("call-id", Bencode::str(call_id))]);
            let q = ng(ng_port, &format!("q1-{polls}"), cmd);
            let rtp = q.get("totals").and_then(|t| t.get("RTP"));
            if int(rtp.and_then(|r| r.get("packets"))) > 20 {
                break q;
            }
            assert!(Instant::now() < deadline, "query shows RTP flowing: {q}");
        }
        assert!(Instant::now() < deadline, "no anchored call: {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(q.get("result").and_then(Bencode::as_str), Some("ok"), "{q}");
    assert!(int(q.get("created")) > 1_700_000_000, "{q}");

    let (ok, good, _, text) = caller.join().expect("caller thread");
    assert!(
        ok && good == 1,
        "call through Kamailio failed\n{text}\n--- kamailio ---\n{}",
        std::fs::read_to_string(&kam_log).unwrap_or_default()
    );
    drop(callee);
    // Kamailio's delete on BYE released everything.
    let list = ng(ng_port, "l2", Bencode::dict(vec![("command", Bencode::str("list"))]));
    assert_eq!(list.get("calls"), Some(&Bencode::List(vec![])), "{list}");
    assert!(ph.wait_metric("pinhole_relay_ports", 0.0, Duration::from_secs(3)));
    let deadline = Instant::now() + Duration::from_secs(3);
    while ph.metric("pinhole_relay_packets_total").unwrap_or(0.0) < 100.0 {
        assert!(Instant::now() < deadline, "RTP relayed both ways: {}", ph.metrics().unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ng_garbage_gets_error_replies_or_is_dropped_and_sessions_survive() {
    let dir = TempDir::new("nggarbage");
    let (_ph, ng_port) = relay_only(&dir);
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let offer = ng(
        ng_port,
        "o1",
        Bencode::dict(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("keep")),
            ("from-tag", Bencode::str("a")),
            ("sdp", Bencode::str(sdp)),
            ("flags", Bencode::List(vec![Bencode::str("trust-address"), Bencode::str("record-call")])),
        ]),
    );
    assert_eq!(offer.get("result").and_then(Bencode::as_str), Some("ok"));
    // Recording asked for where none is configured: said, not silently ignored.
    let warned = offer.get("warning").and_then(Bencode::as_str);
    assert!(warned.is_some_and(|w| w.contains("record-call ignored: recording is not configured")), "{offer}");
    let raw = |payload: &[u8]| -> Option<Vec<u8>> {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        s.send_to(payload, ("127.0.0.1", ng_port)).expect("send");
        let mut buf = vec![0u8; 65536];
        s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
    };
    let mut deep = b"g1 ".to_vec();
    deep.extend(std::iter::repeat_n(b'l', 5000));
    for (input, want) in [
        (&b"g0 d3:abc"[..], "truncated"),
        (b"g2 99999999999:x", "truncated"),
        (&deep[..], "nested too deeply"),
        (b"g3 d7:command4:pinge junk", "trailing"),
        (b"g4 d7:command7:unknowne", "Unrecognized command"),
        (b"g5 i42e", "not a dictionary"),
        (b"g6 d7:commandi1ee", "no command"),
    ] {
        let reply = raw(input).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&reply).contains(want),
            "{:?} → {:?}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(&reply)
        );
    }
    assert_eq!(raw(b"no-cookie-at-all"), None, "no cookie: dropped");
    // A retransmission gets the identical reply and is not executed twice.
    let again = ng(
        ng_port,
        "o1",
        Bencode::dict(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("other")),
            ("sdp", Bencode::str(sdp)),
        ]),
    );
    assert_eq!(again, offer);
    let list = ng(ng_port, "l1", Bencode::dict(vec![("command", Bencode::str("list"))]));
    assert_eq!(list.get("calls"), Some(&Bencode::List(vec![Bencode::str("keep")])), "session undisturbed");
}

#[test]
fn ng_answers_json_over_udp_and_bencode_over_tcp() {
    use std::io::{Read, Write};
    let dir = TempDir::new("ngtcp");
    let (_ph, ng_port) = relay_only(&dir);
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    s.send_to(br#"j1 {"command":"ping"}"#, ("127.0.0.1", ng_port)).expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).expect("reply");
    assert_eq!(&buf[..n], br#"j1 {"result":"pong"}"#);

    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", ng_port)).expect("tcp ng");
    tcp.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    // Two messages in one write, the second split across writes.
    tcp.write_all(b"t1 d7:command4:pinget2 d7:comm").expect("write");
    std::thread::sleep(Duration::from_millis(100));
    tcp.write_all(b"and4:listee").expect("write");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !got.ends_with(b"5:callslee") && Instant::now() < deadline {
        let n = tcp.read(&mut buf).unwrap_or(0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&got), "t1 d6:result4:ponget2 d6:result2:ok5:callslee");
}
