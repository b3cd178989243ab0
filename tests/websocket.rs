//! SIP over WebSocket (RFC 7118) on `ws:` and `wss:` listeners: JsSIP from npm — the SIP
//! stack of browser softphones — in headless Chromium (Debian's, driven by playwright-core)
//! and in Node on Node's own WebSocket, registers as alice and is
//! called by a UDP phone (the INVITE goes down its connection, and JsSIP's refusal — Node
//! has no WebRTC to answer with — comes back up);
//! and what the worst stranger on the listener can do: refused upgrades, unmasked frames,
//! a frame claiming a terabyte, an upgrade that never ends.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn js_dir() -> PathBuf {
    repo().join("tests/js")
}

/// A JsSIP phone: `script` in tests/js (ws_phone.mjs: in Node; browser_phone.mjs: in
/// headless Chromium), its output lines collected in `out`, in a process group of its own
/// (the browser goes with it). Over `wss:` it trusts pinhole's self-signed certificate.
fn jssip_phone(script: &str, url: &str, out: &std::path::Path) -> Bg {
    use std::os::unix::process::CommandExt;
    assert!(
        js_dir().join("node_modules/jssip").exists(),
        "JsSIP is not installed: cargo xtask test installs it (npm ci in tests/js)"
    );
    Bg(Some(
        Command::new("node")
            .arg("--experimental-websocket")
            .arg(js_dir().join(script))
            .args([url, "alice", "pinhole.test", "alice-pw"])
            .env("NODE_TLS_REJECT_UNAUTHORIZED", "0")
            .current_dir(js_dir())
            .stdout(std::fs::File::create(out).expect("log"))
            .stderr(std::fs::File::create(out.with_extension("err")).expect("log"))
            .process_group(0)
            .spawn()
            .expect("node (package nodejs) must be installed"),
    ))
}

/// pinhole with `ws:` and `wss:` listeners on the ports given.
fn ws_edge(dir: &TempDir, (ws_port, wss_port): (u16, u16), sip_extra: &str) -> Pinhole {
    Pinhole::start(
        dir,
        PinholeOptions {
            listen_extra: vec![format!("ws:127.0.0.1:{ws_port}"), format!("wss:127.0.0.1:{wss_port}")],
            sip_extra: sip_extra.to_owned(),
            tls: true,
            ..Default::default()
        },
    )
}

#[test]
fn jssip_in_chromium_registers_over_secure_websocket_and_a_udp_phones_call_reaches_it() {
    jssip_is_reached("browser_phone.mjs", "wss", "SIP/2.0 486 Busy Here");
}

#[test]
fn jssip_registers_over_websocket_and_a_udp_phones_call_reaches_it_and_its_answer_comes_back() {
    jssip_is_reached("ws_phone.mjs", "ws", "SIP/2.0 405");
}

#[test]
fn jssip_registers_over_secure_websocket_and_is_reached_the_same_way() {
    jssip_is_reached("ws_phone.mjs", "wss", "SIP/2.0 405");
}

/// JsSIP (`script`) registers over `scheme` and a UDP phone calls it: the answer the
/// caller gets starts with `answer` and is JsSIP's own (its Supported list).
fn jssip_is_reached(script: &str, scheme: &str, answer: &str) {
    let dir = TempDir::new("ws-jssip");
    let ports = (free_port(), free_port());
    let edge = ws_edge(&dir, ports, "");
    let log = dir.path().join("jssip.log");
    let port = if scheme == "wss" { ports.1 } else { ports.0 };
    let _phone = jssip_phone(script, &format!("{scheme}://127.0.0.1:{port}"), &log);
    let registered = wait_for(&log, "REGISTERED", Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
    assert!(registered, "JsSIP did not register over WebSocket: {text}\n{err}\n{}", edge.log_text());
    assert!(edge.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(5)));

    // A UDP phone calls alice: the INVITE goes down the WebSocket, JsSIP's answer (its
    // own: its Supported list) comes back.
    let caller = UdpSocket::bind("127.0.0.1:0").expect("bind");
    caller.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let c = caller.local_addr().expect("addr");
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let invite = format!(
        "INVITE sip:alice@pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP {c};branch=z9hG4bKwscall1;rport\r\nMax-Forwards: 70\r\nTo: <sip:alice@pinhole.test>\r\nFrom: <sip:bob@pinhole.test>;tag=b1\r\nCall-ID: ws-call-1\r\nCSeq: 1 INVITE\r\nContact: <sip:bob@{c}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    caller.send_to(invite.as_bytes(), edge.sip()).expect("send");
    let mut buf = [0u8; 8192];
    let mut refusal = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while refusal.is_none() && Instant::now() < deadline {
        if let Ok(n) = caller.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.starts_with(answer) {
                refusal = Some(text);
            }
        }
    }
    // The page's console reaches the log through Node, possibly after the answer did.
    let incoming = wait_for(&log, "INCOMING bob", Duration::from_secs(5));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(incoming, "the INVITE did not reach JsSIP: {text}\n{}", edge.log_text());
    let refusal =
        refusal.unwrap_or_else(|| panic!("JsSIP's answer did not come back to the caller\n{}", edge.log_text()));
    assert!(refusal.contains("Call-ID: ws-call-1"), "{refusal}");
    assert!(refusal.contains("Supported: ice,replaces,outbound"), "JsSIP's own answer: {refusal}");
    assert!(
        !refusal.contains(".invalid") && !refusal.contains("SIP/2.0/WS"),
        "our Via to JsSIP stays on its leg: {refusal}"
    );
}

/// A raw client on the WebSocket port: sends `wire`, returns what came back before the
/// server closed (or `wait` passed) and whether it closed.
fn raw(port: u16, wire: &[u8], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    s.write_all(wire).expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&got).into_owned(), true)
            }
            Err(_) => {}
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

fn upgrade(extra: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

#[test]
fn the_worst_stranger_on_the_websocket_listener_is_refused_and_costs_nothing() {
    let dir = TempDir::new("ws-stranger");
    let ws_port = free_port();
    let edge =
        ws_edge(&dir, (ws_port, free_port()), "message_timeout = 1\nallowed_origins = [\"https://pbx.example\"]\n");
    let ok = "Sec-WebSocket-Protocol: sip\r\nOrigin: https://pbx.example\r\n";

    let (r, closed) = raw(
        ws_port,
        upgrade("Sec-WebSocket-Protocol: chat\r\nOrigin: https://pbx.example\r\n").as_bytes(),
        Duration::from_secs(2),
    );
    assert!(r.starts_with("HTTP/1.1 400") && closed, "no sip subprotocol: {r:?}");
    let (r, closed) = raw(
        ws_port,
        upgrade("Sec-WebSocket-Protocol: sip\r\nOrigin: https://evil.example\r\n").as_bytes(),
        Duration::from_secs(2),
    );
    assert!(r.starts_with("HTTP/1.1 403") && closed, "another origin: {r:?}");
    assert!(edge.metric("pinhole_sip_websocket_refused_total").is_some_and(|n| n >= 2.0));

    // Accepted, then an unmasked frame: closed, counted as garbage.
    let garbage = |e: &Pinhole| e.metric("pinhole_sip_garbage_total{transport=\"ws\"}").unwrap_or(0.0);
    let before = garbage(&edge);
    let mut wire = upgrade(ok).into_bytes();
    wire.extend_from_slice(b"\x81\x05Hello");
    let (r, closed) = raw(ws_port, &wire, Duration::from_secs(2));
    assert!(r.starts_with("HTTP/1.1 101") && closed, "an unmasked frame: {r:?}");
    // A frame claiming 2^40 bytes: closed from its header.
    let mut wire = upgrade(ok).into_bytes();
    wire.extend_from_slice(&[0x81, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
    let (_, closed) = raw(ws_port, &wire, Duration::from_secs(2));
    assert!(closed, "a terabyte frame header");
    assert!(garbage(&edge) >= before + 2.0, "both counted as garbage");

    // An upgrade that never ends: closed after message_timeout (1 s), counted.
    let timed_out =
        |e: &Pinhole| e.metric("pinhole_sip_connections_timed_out_total{reason=\"incomplete\"}").unwrap_or(0.0);
    let before = timed_out(&edge);
    let t = Instant::now();
    let (r, closed) = raw(ws_port, b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n", Duration::from_secs(4));
    assert!(closed && r.is_empty(), "a half upgrade must be closed: {r:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "closed after {:?}", t.elapsed());
    assert!(timed_out(&edge) > before);
}
