//! Tier 3: pinhole on loopback with real sipp callers and callees.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A callee registers through pinhole, a caller calls its AOR; both sides must finish their
/// scenarios (register → answered calls → unregister).
fn call_through(transport: &str, ooc: &str, uac: &str, user: &str, calls: u32) {
    let dir = TempDir::new(user);
    let ph = Pinhole::start(&dir, PinholeOptions::default());
    let uas_port = free_port();
    let callee = sipp_callee(&ph.sip(), user, uas_port, transport, ooc, 4000, &dir.path().join("uas.err"));
    assert!(
        ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)),
        "callee never registered\n{}",
        ph.log_text()
    );
    let (ok, good, failed, text) = sipp_caller(&ph.sip(), user, uac, calls, transport, &dir.path().join("uac.err"));
    assert!(ok && good == calls && failed == 0, "caller: {good} ok / {failed} failed\n{text}\n{}", ph.log_text());
    let out = callee.wait_output(Duration::from_secs(20));
    assert!(
        out.status.success(),
        "callee scenario failed: {}",
        std::fs::read_to_string(dir.path().join("uas.out")).unwrap_or_default()
    );
    assert!(
        ph.wait_metric("pinhole_registrar_bindings", 0.0, Duration::from_secs(5)),
        "callee's unregister was not applied"
    );
}

#[test]
fn udp_call_reaches_registered_callee_and_is_torn_down() {
    call_through("u1", "uas.xml", "uac.xml", "bob", 5);
}

#[test]
fn tcp_call_goes_back_over_the_callee_registration_connection() {
    call_through("t1", "uas.xml", "uac.xml", "carol", 5);
}

#[test]
fn busy_callee_486_reaches_caller_and_is_acked() {
    call_through("u1", "uas_busy.xml", "uac_busy.xml", "dave", 3);
}

#[test]
fn caller_cancel_while_ringing_ends_with_487() {
    call_through("u1", "uas_ring.xml", "uac_cancel.xml", "erin", 3);
}

/// sipp here has no TLS, so each sipp talks TCP to its own socat, which speaks TLS to
/// pinhole. The callee's INVITE must come back over the TLS connection it registered on.
#[test]
fn tls_call_goes_back_over_the_callee_tls_connection() {
    let dir = TempDir::new("tls");
    let ph = Pinhole::start(&dir, PinholeOptions { tls: true, ..Default::default() });
    let shim = |port: u16| {
        Bg(Some(
            Command::new("socat")
                .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"))
                .arg(format!("OPENSSL:127.0.0.1:{},verify=0", ph.tls_port))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("socat must be installed"),
        ))
    };
    let callee_shim_port = free_port();
    let caller_shim_port = free_port();
    let _s1 = shim(callee_shim_port);
    let _s2 = shim(caller_shim_port);
    // Each socat serves a single connection, so wait for its listening socket rather than
    // probing it with a connect.
    for port in [callee_shim_port, caller_shim_port] {
        assert!(wait_listening(port, Duration::from_secs(5)), "socat never listened on {port}");
    }
    let tls_target = format!("127.0.0.1:{}", ph.tls_port);
    let callee = sipp_callee_via(
        &tls_target,
        Some(&format!("127.0.0.1:{callee_shim_port}")),
        "frank",
        free_port(),
        "t1",
        "uas.xml",
        4000,
        &dir.path().join("uas.err"),
        &[],
    );
    assert!(
        ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)),
        "callee never registered over TLS\n{}",
        ph.log_text()
    );
    let (ok, good, failed, text) = sipp_caller_via(
        &tls_target,
        Some(&format!("127.0.0.1:{caller_shim_port}")),
        "frank",
        "uac.xml",
        3,
        "t1",
        &dir.path().join("uac.err"),
        &[],
    );
    assert!(ok && good == 3 && failed == 0, "{good}/{failed}\n{text}\n{}", ph.log_text());
    let out = callee.wait_output(Duration::from_secs(20));
    assert!(
        out.status.success(),
        "callee: {}",
        std::fs::read_to_string(dir.path().join("uas.out")).unwrap_or_default()
    );
    assert_eq!(
        ph.metric("pinhole_sip_requests_total{method=\"INVITE\",transport=\"tls\"}"),
        Some(3.0),
        "INVITEs arrived over TLS\n{}",
        ph.metrics().unwrap_or_default()
    );
}

#[test]
fn registrations_survive_a_kill_9_restart() {
    let dir = TempDir::new("restart");
    let mut ph = Pinhole::start(&dir, PinholeOptions::default());
    let callee = sipp_callee(&ph.sip(), "gina", free_port(), "u1", "uas.xml", 9000, &dir.path().join("uas.err"));
    assert!(ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)));
    // The store is written within a second of a change.
    assert!(wait_for(&dir.path().join("store.json"), "gina", Duration::from_secs(3)), "binding stored");
    ph.kill9();
    ph.restart();
    assert_eq!(ph.metric("pinhole_registrar_bindings"), Some(1.0), "binding restored\n{}", ph.log_text());
    let (ok, good, _, text) = sipp_caller(&ph.sip(), "gina", "uac.xml", 2, "u1", &dir.path().join("uac.err"));
    assert!(ok && good == 2, "call after restart failed\n{text}\n{}", ph.log_text());
    drop(callee);
}

#[test]
fn nobody_registered_gives_480_for_known_user_and_404_otherwise() {
    let dir = TempDir::new("nobody");
    let ph = Pinhole::start(&dir, PinholeOptions::default());
    let inv = |user: &str| {
        format!(
            "INVITE sip:{user}@pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK{user}\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:{user}@pinhole.test>\r\nCall-ID: {user}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let r = udp_exchange(&ph.sip(), inv("alice").as_bytes(), Duration::from_millis(400));
    assert!(r.iter().any(|m| m.starts_with("SIP/2.0 480 ")), "{r:?}");
    let r = udp_exchange(&ph.sip(), inv("zed").as_bytes(), Duration::from_millis(400));
    assert!(r.iter().any(|m| m.starts_with("SIP/2.0 404 ")), "{r:?}");
}

#[test]
fn bad_requests_get_named_errors_and_garbage_is_counted() {
    let dir = TempDir::new("bad");
    let ph =
        Pinhole::start(&dir, PinholeOptions { sip_extra: "max_message_size = 16384".into(), ..Default::default() });
    let base = "OPTIONS sip:someone@pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKbad\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:someone@pinhole.test>\r\nCall-ID: bad\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    let cases: Vec<(String, &str)> = vec![
        (base.replace("Call-ID: bad\r\n", ""), "SIP/2.0 400 Missing Call-ID Header"),
        (base.replace("CSeq: 1 OPTIONS", "CSeq: x OPTIONS"), "SIP/2.0 400 Malformed CSeq Header"),
        (base.replace("OPTIONS sip:someone@pinhole.test", "OPTIONS tel:+123"), "SIP/2.0 416 Unsupported URI Scheme"),
        (base.replace("Max-Forwards: 70", "Max-Forwards: 0"), "SIP/2.0 483 Too Many Hops"),
        (base.replace("Max-Forwards: 70", "Max-Forwards: 70\r\nProxy-Require: x-foo"), "SIP/2.0 420 Bad Extension"),
        (
            base.replace("Content-Length: 0\r\n\r\n", &format!("Content-Length: 20000\r\n\r\n{}", "a".repeat(20000))),
            "SIP/2.0 513 Message Too Large",
        ),
    ];
    for (i, (msg, want)) in cases.iter().enumerate() {
        let msg = msg.replace("z9hG4bKbad", &format!("z9hG4bKbad{i}"));
        let r = udp_exchange(&ph.sip(), msg.as_bytes(), Duration::from_millis(300));
        assert!(r.iter().any(|m| m.starts_with(want)), "case {i}: want {want}, got {r:?}");
    }
    let before = ph.metric("pinhole_sip_garbage_total{transport=\"udp\"}").expect("garbage counter served");
    for junk in [&b"\x00\x01\x02garbage"[..], b"HELLO\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"] {
        assert!(udp_exchange(&ph.sip(), junk, Duration::from_millis(100)).is_empty());
    }
    assert_eq!(ph.metric("pinhole_sip_garbage_total{transport=\"udp\"}"), Some(before + 3.0));
    // Still serving.
    let ping = base
        .replace("sip:someone@pinhole.test SIP", &format!("sip:{} SIP", ph.sip()))
        .replace("z9hG4bKbad", "z9hG4bKok");
    let r = udp_exchange(&ph.sip(), ping.as_bytes(), Duration::from_millis(300));
    assert!(r.iter().any(|m| m.starts_with("SIP/2.0 200 OK")), "{r:?}");
}

#[test]
fn tcp_garbage_closes_only_that_connection() {
    use std::io::{Read, Write};
    let dir = TempDir::new("tcpbad");
    let ph = Pinhole::start(&dir, PinholeOptions::default());
    let mut s = std::net::TcpStream::connect(ph.sip()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    s.write_all(b"NOT SIP AT ALL\r\n\r\n").expect("write");
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "connection closed");
    // A well-behaved connection still works, including CRLF keepalive pong.
    let mut ok = std::net::TcpStream::connect(ph.sip()).expect("connect");
    ok.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    ok.write_all(b"\r\n\r\n").expect("ping");
    let n = ok.read(&mut buf).expect("pong");
    assert_eq!(&buf[..n], b"\r\n");
}

#[test]
fn untrusted_register_is_challenged_and_wrong_aor_forbidden() {
    let dir = TempDir::new("auth");
    let ph = Pinhole::start(
        &dir,
        PinholeOptions {
            trusted: vec![],
            auth_extra: "algorithms = [\"SHA-256\", \"MD5\"]".into(),
            ..Default::default()
        },
    );
    let reg = "REGISTER sip:pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKr1\r\nFrom: <sip:bob@pinhole.test>;tag=1\r\nTo: <sip:bob@pinhole.test>\r\nCall-ID: r1\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@127.0.0.1:9>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    let r = udp_exchange(&ph.sip(), reg.as_bytes(), Duration::from_millis(300));
    let challenge = r.iter().find(|m| m.starts_with("SIP/2.0 401 ")).expect("401");
    assert!(challenge.contains("WWW-Authenticate: Digest realm=\"pinhole.test\""));
    assert!(challenge.contains("algorithm=SHA-256") && challenge.contains("algorithm=MD5"));
    // alice's own credentials, answering correctly, for bob's AOR: forbidden.
    let phone = common::sip::Phone::bind("127.0.0.1");
    let contact = format!("sip:alice@{}", phone.addr());
    let wrong_aor = |branch: &str, cseq: u32| {
        common::sip::register(&ph.sip(), "alice", phone.addr(), &contact, branch, cseq)
            .replace("To: <sip:alice@pinhole.test>", "To: <sip:bob@pinhole.test>")
    };
    phone.send(&ph.sip(), &wrong_aor("aor1", 1));
    let challenge = phone.response().expect("401");
    let creds = common::sip::answer(&challenge, "alice", "alice-pw", "REGISTER", "sip:pinhole.test", 1);
    phone.send(&ph.sip(), &common::sip::with_header(&wrong_aor("aor2", 2), &creds));
    let r = phone.response().expect("answer");
    assert!(r.starts_with("SIP/2.0 403 Forbidden - Credentials Do Not Match AOR\r\n"), "{r}");
    assert_eq!(ph.metric("pinhole_registrar_bindings"), Some(0.0));
}

#[test]
fn check_config_reports_line_and_column_and_fails() {
    let dir = TempDir::new("cfg");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[sip]\ndomain = \"x\"\nlisten = [\"udp:127.0.0.1:5060\"]\nlisen = 1\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pinhole")).arg("check-config").arg(&bad).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4:1:") && err.contains("lisen"), "{err}");
    let good = repo().join("config/pinhole.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_pinhole")).arg("check-config").arg(&good).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// RFC 5626 §8 keepalives: a STUN Binding request on the SIP UDP port is answered with the
/// address it came from, and SIP on the same port is unaffected.
#[test]
fn stun_keepalive_on_the_sip_port_reports_the_mapped_address() {
    let dir = TempDir::new("stun");
    let ph = Pinhole::start(&dir, PinholeOptions::default());
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    // Binding request: type 0x0001, length 0, magic cookie, transaction id.
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(b"pinholetest1");
    s.send_to(&req, ph.sip()).expect("send");
    let mut buf = [0u8; 256];
    let (n, _) = s.recv_from(&mut buf).expect("binding response");
    let resp = &buf[..n];
    assert_eq!(&resp[..2], &[0x01, 0x01], "Binding success response");
    assert_eq!(&resp[8..20], b"pinholetest1", "same transaction id");
    // XOR-MAPPED-ADDRESS (0x0020): port and IPv4 XORed with the magic cookie.
    let attrs = &resp[20..];
    let at = attrs.windows(2).position(|w| w == [0x00, 0x20]).expect("xor-mapped-address");
    let v = &attrs[at + 4..at + 12];
    let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
    let ip = [v[4] ^ 0x21, v[5] ^ 0x12, v[6] ^ 0xa4, v[7] ^ 0x42];
    let local = s.local_addr().expect("addr");
    assert_eq!((ip, port), ([127, 0, 0, 1], local.port()));
    assert!(n <= 2 * req.len(), "no amplification: {n} bytes for {}", req.len());
    // Not garbage, and SIP still works on the port.
    assert_eq!(ph.metric("pinhole_sip_garbage_total{transport=\"udp\"}"), Some(0.0));
    let opt = format!(
        "OPTIONS sip:{} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKstun\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: stun\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        ph.sip()
    );
    let r = udp_exchange(&ph.sip(), opt.as_bytes(), Duration::from_millis(300));
    assert!(r.iter().any(|m| m.starts_with("SIP/2.0 200 OK")), "{r:?}");
}
