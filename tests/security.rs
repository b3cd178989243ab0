//! The attacks of the hostile review, each performed against a real pinhole on loopback and
//! required to fail: Record-Route token replay, digest replay (also across a restart),
//! credentials leaking to the callee, password guessing spread over many addresses (SIP
//! and STUN), connection floods, half-open requests, long ng cookies and reflection.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::sip::{answer, crlf, header, register, register_with_password, status, with_header, Phone};
use common::{free_port, Pinhole, PinholeOptions, TempDir};

/// Two users, nobody trusted: everything must authenticate.
fn untrusted(extra_sip: &str, extra: &str) -> PinholeOptions {
    PinholeOptions { trusted: vec![], sip_extra: extra_sip.to_owned(), extra: extra.to_owned(), ..Default::default() }
}

fn invite(to: &str, from: &Phone, branch: &str, call_id: &str) -> String {
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n";
    format!(
        "INVITE {to} SIP/2.0
Via: SIP/2.0/UDP {addr};branch=z9hG4bK{branch};rport
Max-Forwards: 70
To: <{to}>
From: <sip:alice@pinhole.test>;tag=a-{call_id}
Call-ID: {call_id}
CSeq: 1 INVITE
Contact: <sip:alice@{addr}>
User-Agent: softphone/1.0
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS
Content-Type: application/sdp
Content-Length: {}

{sdp}",
        sdp.len(),
        addr = from.addr(),
    )
}

/// A 200 OK from the callee for `req`, echoing its Record-Route.
fn ok_for(req: &str, callee: &Phone, to_tag: &str) -> String {
    let mut out = String::from("SIP/2.0 200 OK\n");
    for line in req.lines().take_while(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        match name.as_str() {
            "via" | "from" | "call-id" | "cseq" | "record-route" => out.push_str(&format!("{line}\n")),
            "to" => out.push_str(&format!("{line};tag={to_tag}\n")),
            _ => {}
        }
    }
    out.push_str(&format!("Contact: <sip:bob@{}>\nContent-Length: 0\n\n", callee.addr()));
    out
}

/// alice calls bob through pinhole, answering the 407 like a phone. Returns the INVITE bob
/// received and the Record-Route it carried.
fn call(ph: &Pinhole, alice: &Phone, bob: &Phone, call_id: &str) -> (String, String) {
    let server = ph.sip();
    let first = invite("sip:bob@pinhole.test", alice, &format!("{call_id}1"), call_id);
    alice.send(&server, &first);
    let challenge = alice.response().expect("407");
    assert_eq!(status(&challenge), Some(407), "{challenge}");
    let creds = answer(&challenge, "alice", "alice-pw", "INVITE", "sip:bob@pinhole.test", 1);
    let second = with_header(
        &first.replace(&format!("z9hG4bK{call_id}1"), &format!("z9hG4bK{call_id}2")).replace("CSeq: 1", "CSeq: 2"),
        &creds,
    );
    alice.send(&server, &second);
    let got = bob.recv_where(Duration::from_secs(3), |m| m.starts_with("INVITE ")).expect("bob is called");
    let rr = header(&got, "Record-Route").expect("record-routed").to_owned();
    bob.send(&server, &ok_for(&got, bob, "b-tag"));
    let ok = alice.response().expect("200 for alice");
    assert_eq!(status(&ok), Some(200), "{ok}");
    (crlf(&got), rr)
}

/// An in-dialog request from bob towards alice in the call above.
fn from_bob(method: &str, rr: &str, call_id: &str, via: &Phone, branch: &str) -> String {
    format!(
        "{method} sip:alice@127.0.0.1 SIP/2.0
Via: SIP/2.0/UDP {};branch=z9hG4bK{branch};rport
Route: {rr}
Max-Forwards: 70
From: <sip:bob@pinhole.test>;tag=b-tag
To: <sip:alice@pinhole.test>;tag=a-{call_id}
Call-ID: {call_id}
CSeq: 20 {method}
Content-Length: 0

",
        via.addr()
    )
}

#[test]
fn record_route_token_from_one_call_buys_no_register_no_new_call_and_nothing_after_restart() {
    let dir = TempDir::new("sec-token");
    let mut ph = Pinhole::start(&dir, untrusted("", ""));
    let server = ph.sip();
    let (alice, bob, mallory) = (Phone::bind("127.0.0.1"), Phone::bind("127.0.0.1"), Phone::bind("127.0.0.5"));
    let evil = UdpSocket::bind("127.0.0.6:0").expect("evil");
    assert_eq!(status(&register_with_password(&bob, &server, "bob", "bob-pw", "rb")), Some(200));
    let (got, rr) = call(&ph, &alice, &bob, "tok-call");
    assert!(!got.contains("Proxy-Authorization"), "credentials consumed, not forwarded:\n{got}");

    // 1. An unauthenticated REGISTER with the token and a To tag, to bind mallory to alice.
    let steal = register(&server, "alice", mallory.addr(), "sip:mallory@127.0.0.5:5060", "steal", 1)
        .replace("To: <sip:alice@pinhole.test>", "To: <sip:alice@pinhole.test>;tag=a-tok-call")
        .replace("Max-Forwards: 70", &format!("Route: {rr}\nMax-Forwards: 70"));
    mallory.send(&server, &steal);
    assert_eq!(status(&mallory.response().expect("answer")), Some(401));
    assert_eq!(ph.metric("pinhole_registrar_bindings"), Some(1.0), "only bob is bound");

    // 2. A toll call to an outside address carrying the token, the dialog's Call-ID and tags.
    let toll = from_bob("INVITE", &rr, "tok-call", &mallory, "toll")
        .replace("INVITE sip:alice@127.0.0.1", &format!("INVITE sip:+15550100@{}", evil.local_addr().expect("evil")));
    mallory.send(&server, &toll);
    assert_eq!(status(&mallory.response().expect("answer")), Some(407));
    evil.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    assert!(evil.recv_from(&mut [0u8; 2048]).is_err(), "nothing reached the outside address");

    // The dialog's own party, from its own flow, is served without a challenge.
    bob.send(&server, &from_bob("INFO", &rr, "tok-call", &bob, "info1"));
    assert!(
        alice.recv_where(Duration::from_secs(2), |m| m.starts_with("INFO ")).is_some(),
        "in-dialog INFO reaches alice"
    );

    // 3. After a restart the table of established dialogs is empty: the token vouches for nothing.
    ph.restart();
    bob.send(&ph.sip(), &from_bob("INFO", &rr, "tok-call", &bob, "info2"));
    assert_eq!(status(&bob.response().expect("answer")), Some(407));
}

#[test]
fn replayed_register_credentials_are_refused_now_and_after_a_restart() {
    let dir = TempDir::new("sec-replay");
    let mut ph = Pinhole::start(&dir, untrusted("", ""));
    let server = ph.sip();
    let (alice, mallory) = (Phone::bind("127.0.0.1"), Phone::bind("127.0.0.7"));
    let contact = format!("sip:alice@{}", alice.addr());
    alice.send(&server, &register(&server, "alice", alice.addr(), &contact, "rp1", 1));
    let challenge = alice.response().expect("401");
    let creds = answer(&challenge, "alice", "alice-pw", "REGISTER", "sip:pinhole.test", 1);
    alice.send(&server, &with_header(&register(&server, "alice", alice.addr(), &contact, "rp2", 2), &creds));
    assert_eq!(status(&alice.response().expect("200")), Some(200));

    // The captured Authorization, same nonce and nc, from elsewhere with mallory's Contact.
    let replay =
        with_header(&register(&server, "alice", mallory.addr(), "sip:mallory@127.0.0.7:5060", "rp3", 3), &creds);
    mallory.send(&server, &replay);
    let r = mallory.response().expect("answer");
    assert_eq!(status(&r), Some(401), "{r}");
    assert!(r.contains("stale=true"), "a replay is answered as stale: {r}");
    assert_eq!(ph.metric("pinhole_registrar_bindings"), Some(1.0), "mallory is not bound");
    assert_eq!(ph.metric("pinhole_auth_replays_total"), Some(1.0));
    ph.restart();
    mallory.send(&ph.sip(), &replay.replace("z9hG4bKrp3", "z9hG4bKrp4"));
    let r = mallory.response().expect("answer");
    assert_eq!(status(&r), Some(401), "captured credentials are void after a restart: {r}");
    assert!(ph.metric("pinhole_registrar_bindings").expect("served") <= 1.0, "mallory is not bound");
}

#[test]
fn captured_invite_credentials_cannot_call_another_destination() {
    let dir = TempDir::new("sec-uri");
    let ph = Pinhole::start(&dir, untrusted("", ""));
    let server = ph.sip();
    let (alice, bob, mallory) = (Phone::bind("127.0.0.1"), Phone::bind("127.0.0.1"), Phone::bind("127.0.0.8"));
    assert_eq!(status(&register_with_password(&bob, &server, "bob", "bob-pw", "rb")), Some(200));
    let first = invite("sip:bob@pinhole.test", &alice, "cap1", "cap-call");
    alice.send(&server, &first);
    let challenge = alice.response().expect("407");
    let creds = answer(&challenge, "alice", "alice-pw", "INVITE", "sip:bob@pinhole.test", 1);
    // Mallory sniffed the credentials and aims them at a premium number.
    let fraud = with_header(&invite("sip:+19005550100@127.0.0.9", &mallory, "cap2", "fraud-call"), &creds);
    mallory.send(&server, &fraud);
    assert_eq!(status(&mallory.response().expect("answer")), Some(407));
}

#[test]
fn guesses_spread_over_56_addresses_never_find_the_password_and_the_user_still_registers() {
    let dir = TempDir::new("sec-guess");
    let ph = Pinhole::start(&dir, untrusted("", ""));
    let server = ph.sip();
    let alice = Phone::bind("127.0.0.1");
    assert_eq!(status(&register_with_password(&alice, &server, "alice", "alice-pw", "home1")), Some(200));
    let attackers: Vec<Phone> = (10..66).map(|i| Phone::bind(&format!("127.0.1.{i}"))).collect();
    let started = Instant::now();
    let mut codes = Vec::new();
    for i in 0..500usize {
        let p = &attackers[i % attackers.len()];
        let password = if i == 499 { "alice-pw".to_owned() } else { format!("guess-{i}") };
        let contact = format!("sip:mallory@{}", p.addr());
        p.send(&server, &register(&server, "alice", p.addr(), &contact, &format!("g{i}a"), 1));
        let challenge = p.response().expect("challenge");
        if status(&challenge) != Some(401) {
            codes.push(status(&challenge));
            continue;
        }
        let creds = answer(&challenge, "alice", &password, "REGISTER", "sip:pinhole.test", 1);
        p.send(&server, &with_header(&register(&server, "alice", p.addr(), &contact, &format!("g{i}b"), 2), &creds));
        codes.push(p.response().and_then(|r| status(&r)));
    }
    assert!(!codes.contains(&Some(200)), "a guess got through: {codes:?}");
    assert!(codes.iter().filter(|c| **c == Some(403)).count() >= 400, "most guesses refused unchecked: {codes:?}");
    eprintln!("500 guesses from 56 addresses in {:?}: none checked past the brake", started.elapsed());
    // The real user, from where she registered before, is not locked out.
    assert_eq!(status(&register_with_password(&alice, &server, "alice", "alice-pw", "home2")), Some(200));
}

#[test]
fn stun_integrity_has_its_own_credentials_and_guesses_are_braked() {
    use stun_rs::attributes::stun::{MessageIntegrity, UserName};
    use stun_rs::methods::BINDING;
    use stun_rs::{HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder};

    let dir = TempDir::new("sec-stun");
    let port = free_port();
    let extra = format!(
        "[stun]\nlisten = [\"127.0.0.1:{port}\"]\nusers = [{{ user = \"agent1\", password = \"stun-secret\" }}]\n"
    );
    let _ph = Pinhole::start(&dir, untrusted("", &extra));
    let ask = |from: &UdpSocket, user: &str, password: &str| -> Option<MessageClass> {
        let key = HMACKey::new_short_term(password).expect("key");
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
            .with_attribute(UserName::new(user).expect("user"))
            .with_attribute(MessageIntegrity::new(key))
            .build();
        let mut buf = vec![0u8; 256];
        let n = MessageEncoderBuilder::default().build().encode(&mut buf, &msg).expect("encode");
        from.send_to(&buf[..n], ("127.0.0.1", port)).expect("send");
        from.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let mut resp = [0u8; 1500];
        let (n, _) = from.recv_from(&mut resp).ok()?;
        Some(MessageDecoderBuilder::default().build().decode(&resp[..n]).expect("decodes").0.class())
    };
    let home = UdpSocket::bind("127.0.0.1:0").expect("bind");
    assert_eq!(ask(&home, "agent1", "stun-secret"), Some(MessageClass::SuccessResponse));
    // A SIP password is no STUN credential.
    assert_eq!(ask(&home, "alice", "alice-pw"), Some(MessageClass::ErrorResponse));
    let sources: Vec<UdpSocket> = (20..33).map(|i| UdpSocket::bind(format!("127.0.2.{i}:0")).expect("bind")).collect();
    let mut outcomes = Vec::new();
    for i in 0..65usize {
        let password = if i == 64 { "stun-secret".to_owned() } else { format!("guess{i}") };
        outcomes.push(ask(&sources[i % sources.len()], "agent1", &password));
    }
    assert!(!outcomes.contains(&Some(MessageClass::SuccessResponse)), "{outcomes:?}");
    assert!(outcomes.iter().filter(|o| o.is_none()).count() >= 55, "braked guesses get no answer: {outcomes:?}");
    assert_eq!(ask(&home, "agent1", "stun-secret"), Some(MessageClass::SuccessResponse), "the real agent gets in");
}

#[test]
fn connection_floods_hit_the_per_source_and_total_caps_and_the_server_keeps_serving() {
    let dir = TempDir::new("sec-flood");
    let ph = Pinhole::start(&dir, untrusted("max_connections = 40\nmax_connections_per_source = 10\n", ""));
    let target = ph.sip();
    let held: Vec<TcpStream> = (0..100).filter_map(|_| TcpStream::connect(&target).ok()).collect();
    assert_eq!(held.len(), 100, "the kernel accepts them all");
    let refused = "pinhole_sip_connections_refused_total{reason=\"source\"}";
    assert!(ph.wait_metric(refused, 90.0, Duration::from_secs(5)), "{}", ph.metrics().unwrap_or_default());
    assert_eq!(ph.metric("pinhole_sip_connections"), Some(10.0));
    // Other sources fill the rest up to the total cap; beyond it even new sources are refused.
    let from = |ip: &str| -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&format!("{ip}:0").parse::<std::net::SocketAddr>().expect("addr").into())?;
        s.connect(&target.parse::<std::net::SocketAddr>().expect("addr").into())?;
        Ok(s.into())
    };
    let others: Vec<TcpStream> =
        (3..6).flat_map(|i| (0..10).map(move |_| format!("127.0.3.{i}"))).filter_map(|ip| from(&ip).ok()).collect();
    assert_eq!(others.len(), 30);
    assert!(ph.wait_metric("pinhole_sip_connections", 40.0, Duration::from_secs(5)));
    let _late = from("127.0.3.9").expect("connect");
    assert!(ph.wait_metric("pinhole_sip_connections_refused_total{reason=\"total\"}", 1.0, Duration::from_secs(5)));
    // UDP SIP and /metrics still answer.
    let phone = Phone::bind("127.0.0.1");
    phone.send(&target, &register(&target, "bob", phone.addr(), "sip:bob@127.0.0.1", "fl", 1));
    assert_eq!(phone.response().and_then(|r| status(&r)), Some(401));
    assert!(ph.metrics().is_some());
    // Refusals are logged at most once per 10 s, not once each.
    let lines = ph.log_text().lines().filter(|l| l.contains("connection refused")).count();
    assert!((1..=2).contains(&lines), "{lines} log lines for 91 refusals");
    drop(held);
    assert!(ph.wait_metric("pinhole_sip_connections", 30.0, Duration::from_secs(5)), "closed ones are released");
}

#[test]
fn half_open_requests_and_idle_connections_are_closed_on_time() {
    let dir = TempDir::new("sec-halfopen");
    let ph = Pinhole::start(&dir, untrusted("message_timeout = 2\nidle_timeout = 4\n", ""));
    let mut half = TcpStream::connect(ph.sip()).expect("connect");
    let head = crlf(
        "INVITE sip:bob@pinhole.test SIP/2.0\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKhalf\nMax-Forwards: 70\nTo: <sip:bob@pinhole.test>\nFrom: <sip:a@pinhole.test>;tag=1\nCall-ID: half\nCSeq: 1 INVITE\nContent-Length: 65000\n\n",
    );
    half.write_all(head.as_bytes()).expect("write");
    half.write_all(&[b'v'; 100]).expect("write");
    let idle = TcpStream::connect(ph.sip()).expect("connect");
    let started = Instant::now();
    let closed_after = |mut s: TcpStream| -> Duration {
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = s.read(&mut [0u8; 64]);
        started.elapsed()
    };
    let t = closed_after(half);
    assert!(t >= Duration::from_millis(1500) && t < Duration::from_secs(5), "half-open closed after {t:?}");
    let t = closed_after(idle);
    assert!(t >= Duration::from_millis(3500) && t < Duration::from_secs(7), "idle closed after {t:?}");
    assert_eq!(ph.metric("pinhole_sip_connections_timed_out_total{reason=\"incomplete\"}"), Some(1.0));
    assert_eq!(ph.metric("pinhole_sip_connections_timed_out_total{reason=\"idle\"}"), Some(1.0));
    assert!(ph.wait_metric("pinhole_sip_connections", 0.0, Duration::from_secs(2)));
}

#[test]
fn long_ng_cookies_are_refused_and_counted() {
    let dir = TempDir::new("sec-ng");
    let port = free_port();
    let ph = Pinhole::start(&dir, untrusted("", &format!("[ng]\nlisten = \"127.0.0.1:{port}\"\n")));
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let before = ph.metric("pinhole_ng_garbage_total").expect("served");
    let long = [vec![b'c'; 60_000], b" d7:command4:pinge".to_vec()].concat();
    for _ in 0..5 {
        s.send_to(&long, ("127.0.0.1", port)).expect("send");
        assert!(s.recv_from(&mut [0u8; 1024]).is_err(), "no reply to a 60 KB cookie");
    }
    assert!(ph.wait_metric("pinhole_ng_garbage_total", before + 5.0, Duration::from_secs(3)));
    let ok = [vec![b'c'; 256], b" d7:command4:pinge".to_vec()].concat();
    s.send_to(&ok, ("127.0.0.1", port)).expect("send");
    let mut buf = [0u8; 1024];
    let (n, _) = s.recv_from(&mut buf).expect("a 256-byte cookie is fine");
    assert!(buf[..n].ends_with(b"d6:result4:ponge"));
}

#[test]
fn spoofed_invites_draw_back_no_more_than_they_sent() {
    let dir = TempDir::new("sec-reflect");
    let ph = Pinhole::start(&dir, untrusted("", ""));
    let victim = Phone::bind("127.0.0.11");
    let mut sent = 0;
    for i in 0..200 {
        sent += victim.send(&ph.sip(), &invite("sip:bob@pinhole.test", &victim, &format!("sp{i}"), &format!("sp{i}")));
    }
    // Long enough for Timer G retransmissions (0.5 s, 1 s, 2 s), were there any.
    let back = victim.collect(Duration::from_secs(4));
    let bytes: usize = back.iter().map(String::len).sum();
    assert!(back.len() <= 200, "{} responses to 200 requests: retransmitted", back.len());
    assert!(back.iter().all(|m| status(m) == Some(407)), "only challenges, no 100 Trying");
    assert!(bytes <= sent + 4096, "{bytes} bytes back for {sent} sent");
    eprintln!("reflection: {sent} bytes sent, {bytes} back ({:.2}x)", bytes as f64 / sent as f64);
}

/// The capture queue is the stranger's to fill: a flood of OPTIONS with `[hep]` on (a queue
/// of 16) drops captures, counted, and pinhole still answers SIP.
#[test]
fn a_sip_flood_with_hep_on_drops_captures_not_calls() {
    let dir = TempDir::new("sec-hep");
    // The capture server: a socket that takes what comes and is never read.
    let sink = UdpSocket::bind("127.0.0.1:0").expect("sink");
    let hep = format!("[hep]\naddress = \"udp:{}\"\nqueue = 16\n", sink.local_addr().expect("addr"));
    let ph = Pinhole::start(&dir, untrusted("", &hep));
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let me = s.local_addr().expect("addr");
    let options = |n: u32| {
        crlf(&format!(
            "OPTIONS sip:pinhole.test SIP/2.0\nVia: SIP/2.0/UDP {me};branch=z9hG4bKflood{n}\nMax-Forwards: 70\nTo: <sip:pinhole.test>\nFrom: <sip:x@{me}>;tag=f{n}\nCall-ID: flood-{n}\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n"
        ))
    };
    let _ = s.set_nonblocking(true);
    for n in 0..20_000 {
        let _ = s.send_to(options(n).as_bytes(), ("127.0.0.1", ph.sip_port));
        // Drain answers so the flood is not throttled by our own receive buffer.
        while s.recv_from(&mut [0u8; 2048]).is_ok() {}
    }
    let dropped = "pinhole_hep_dropped_total{reason=\"queue_full\"}";
    let flooded = common::wait_until(Duration::from_secs(10), || ph.metric(dropped).unwrap_or(0.0) > 0.0);
    assert!(flooded, "no capture dropped: {:?}", ph.metric(dropped));
    assert!(ph.metric("pinhole_hep_sent_total").unwrap_or(0.0) > 0.0, "captures were sent too");
    // Signalling goes on: another client's request is answered (the flooder's own replies
    // are braked per source, and its backlog is still being worked off), retransmitted as a
    // UAC would over UDP.
    let other = UdpSocket::bind("127.0.0.3:0").expect("bind");
    other.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let me = other.local_addr().expect("addr");
    let request = crlf(&format!(
        "OPTIONS sip:pinhole.test SIP/2.0\nVia: SIP/2.0/UDP {me};branch=z9hG4bKafter1\nMax-Forwards: 70\nTo: <sip:pinhole.test>\nFrom: <sip:y@{me}>;tag=a1\nCall-ID: after-the-flood\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n"
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let answered = loop {
        other.send_to(request.as_bytes(), ("127.0.0.1", ph.sip_port)).expect("send");
        let mut buf = [0u8; 4096];
        match other.recv_from(&mut buf) {
            Ok((n, _)) if String::from_utf8_lossy(&buf[..n]).contains("after-the-flood") => break true,
            _ if Instant::now() > deadline => break false,
            _ => {}
        }
    };
    assert!(answered, "the request after the flood went unanswered\n{}", ph.log_text());
}
