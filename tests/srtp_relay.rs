//! SDES-SRTP ↔ RTP through the relay on real sockets, driven over ng as Kamailio drives
//! it (`transport-protocol=RTP/AVP` towards the plain side), in both data-plane modes: the
//! raw range socket (IPv4, root) and a socket per port (IPv6). A's SRTP reaches B as RTP,
//! B's RTP reaches A as SRTP under the key pinhole answered with; a forged tag and a
//! replay from A's own address reach nobody and are counted.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use pinhole_media::ng::Bencode;
use pinhole_media::sdes::{Crypto, Suite};
use pinhole_media::sdp::Sdp;

fn sdp(addr: SocketAddr, crypto: Option<&Crypto>) -> String {
    let (ip4, host) = match addr {
        SocketAddr::V4(a) => ("IP4", a.ip().to_string()),
        SocketAddr::V6(a) => ("IP6", a.ip().to_string()),
    };
    let (proto, line) = match crypto {
        Some(c) => ("RTP/SAVP", format!("a=crypto:{}\r\n", c.value())),
        None => ("RTP/AVP", String::new()),
    };
    format!(
        "v=0\r\no=- 1 1 IN {ip4} {host}\r\ns=-\r\nc=IN {ip4} {host}\r\nt=0 0\r\nm=audio {} {proto} 0\r\n{line}",
        addr.port()
    )
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 160, 0x0a, 0x0b, 0x0c, 0x0d];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0x55; 160]);
    p
}

fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn srtp_through(ip: &str, mode: &str) {
    let dir = TempDir::new("srtp");
    let ng_port = free_port();
    let (lo, hi) = relay_range();
    let ph = Pinhole::with_config(
        &dir,
        &format!(
            "[sip]\nlisten = []\ndomain = \"relay.test\"\n[registrar]\nstore = \"\"\n\
             [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"lo\", bind = \"{ip}\" }}]\nport_min = {lo}\nport_max = {hi}\n\
             [ng]\nlisten = \"127.0.0.1:{ng_port}\"\n"
        ),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ph.log_text().contains("ng control listening") {
        assert!(std::time::Instant::now() < deadline, "ng did not start\n{}", ph.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ph.log_text().contains(&format!("mode=\"{mode}\"")), "not the {mode} data plane\n{}", ph.log_text());
    let bind = |ip: &str| {
        let s = UdpSocket::bind(SocketAddr::new(ip.parse().expect("ip"), 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        s
    };
    let (a, b) = (bind(ip), bind(ip));
    let key = Crypto::generate(1, Suite::AesCm128HmacSha1_80, rand_byte);
    let offer = ng(
        ng_port,
        "o1",
        Bencode::dict(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("srtp-1")),
            ("from-tag", Bencode::str("a")),
            ("sdp", Bencode::str(&sdp(a.local_addr().expect("a"), Some(&key)))),
            ("transport-protocol", Bencode::str("RTP/AVP")),
        ]),
    );
    let to_b = offer.get("sdp").and_then(Bencode::as_str).expect("sdp").to_owned();
    assert!(to_b.contains("RTP/AVP 0") && !to_b.contains("a=crypto"), "{to_b}");
    let answer = ng(
        ng_port,
        "a1",
        Bencode::dict(vec![
            ("command", Bencode::str("answer")),
            ("call-id", Bencode::str("srtp-1")),
            ("from-tag", Bencode::str("a")),
            ("to-tag", Bencode::str("b")),
            ("sdp", Bencode::str(&sdp(b.local_addr().expect("b"), None))),
        ]),
    );
    let to_a = answer.get("sdp").and_then(Bencode::as_str).expect("sdp").to_owned();
    let ours = to_a.lines().find_map(|l| l.strip_prefix("a=crypto:")).and_then(Crypto::parse).expect("our key");
    let relay_ip: std::net::IpAddr = ip.parse().expect("ip");
    let port = |s: &str| Sdp::parse(s.as_bytes()).expect("sdp").media[0].port;
    let (to_relay_a, to_relay_b) = (SocketAddr::new(relay_ip, port(&to_a)), SocketAddr::new(relay_ip, port(&to_b)));

    let (mut a_tx, _) = key.contexts().expect("ctx");
    let (mut a_rx, _) = ours.contexts().expect("ctx");
    // A → B: SRTP in, RTP out.
    let mut p = rtp(1);
    a_tx.protect(&mut p).expect("protect");
    a.send_to(&p, to_relay_a).expect("send");
    assert_eq!(recv(&b), Some(rtp(1)), "B gets A's packet as plain RTP\n{}", ph.log_text());
    // B → A: RTP in, SRTP out, under the key pinhole answered A with.
    b.send_to(&rtp(7), to_relay_b).expect("send");
    let mut back = recv(&a).expect("A gets B's packet");
    assert_ne!(back, rtp(7));
    a_rx.unprotect(&mut back).expect("SRTP under pinhole's key");
    assert_eq!(back, rtp(7));
    // The worst A-address sender: a replay and a forged tag reach nobody.
    a.send_to(&p, to_relay_a).expect("send");
    let mut forged = rtp(2);
    a_tx.protect(&mut forged).expect("protect");
    *forged.last_mut().expect("tag") ^= 0x40;
    a.send_to(&forged, to_relay_a).expect("send");
    assert_eq!(recv(&b), None, "a replay or a forgery was forwarded");
    let m = ph.metrics().unwrap_or_default();
    assert!(m.contains("pinhole_relay_secure_dropped_total{reason=\"replayed\"} 1"), "{m}");
    assert!(m.contains("pinhole_relay_secure_dropped_total{reason=\"bad_tag\"} 1"), "{m}");
}

fn rand_byte() -> u8 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEED: AtomicU32 = AtomicU32::new(0x9e37_79b9);
    let s = SEED.fetch_add(0x6d2b_79f5, Ordering::Relaxed);
    (s.wrapping_mul(2_654_435_761) >> 24) as u8
}

#[test]
fn sdes_srtp_and_plain_rtp_are_bridged_by_the_raw_range_socket() {
    srtp_through("127.0.0.1", "raw range socket");
}

#[test]
fn sdes_srtp_and_plain_rtp_are_bridged_by_a_socket_per_port() {
    srtp_through("::1", "socket per port");
}
