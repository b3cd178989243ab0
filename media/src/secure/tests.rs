//! A browser and a plain RTP phone through the relay, in virtual time: the relay's SDP in
//! both directions, its commands applied to a port table, and the browser modelled by a
//! DTLS client leg of its own certificate and the checks a browser sends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::dtls::{DtlsLeg, Identity};
use crate::ice_lite::tests::check;
use crate::ports::{PortTable, Reply};
use crate::relay::{Options, Relay, RelayConfig};
use crate::sdp::{Profile, Sdp};

const BROWSER: &str = "198.51.100.7:51000";
const PHONE: &str = "192.0.2.20:4000";
const STRANGER: &str = "203.0.113.66:51000";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn browser_offer(identity: &Identity) -> Vec<u8> {
    format!(
        "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\na=extmap-allow-mixed\r\n\
         a=msid-semantic: WMS\r\nm=audio 51000 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 198.51.100.7\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
         a=candidate:1 1 udp 2122260223 198.51.100.7 51000 typ host generation 0\r\na=ice-ufrag:brws\r\n\
         a=ice-pwd:browserpasswordbrowserpass\r\na=ice-options:trickle\r\na=fingerprint:{}\r\na=setup:actpass\r\n\
         a=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\na=rtcp-fb:111 transport-cc\r\na=rtpmap:111 opus/48000/2\r\n\
         a=rtpmap:0 PCMU/8000\r\n",
        identity.fingerprint_attr()
    )
    .into_bytes()
}

fn phone_answer() -> Vec<u8> {
    b"v=0\r\no=- 1 1 IN IP4 192.0.2.20\r\ns=-\r\nc=IN IP4 192.0.2.20\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        .to_vec()
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 160, 0xb0, 0x0b, 0x1e, 0x55];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

fn attr<'a>(sdp: &'a str, name: &str) -> Option<&'a str> {
    sdp.lines().find_map(|l| l.strip_prefix(&format!("a={name}:")))
}

struct Lab {
    relay: Relay,
    table: PortTable<()>,
    now: Instant,
    /// What the relay answered the browser.
    answer: String,
    /// Relay ports: the browser sends to `to_relay_b`, the phone to `to_relay_p`.
    browser_port: u16,
    phone_port: u16,
}

impl Lab {
    fn new(browser: &Identity) -> Lab {
        let now = Instant::now();
        let mut relay = Relay::new(RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099), now);
        let offer = relay
            .offer(now, "c1", "b", &browser_offer(browser), None, Options::default())
            .expect("the browser's offer is anchored");
        let to_phone = String::from_utf8(offer).expect("utf8");
        // The phone gets plain RTP: no browser transport left.
        assert!(to_phone.contains(" RTP/AVP 111 0"), "{to_phone}");
        for gone in ["a=ice-", "a=candidate", "a=fingerprint", "a=setup", "a=rtcp-fb", "a=group:BUNDLE", "a=mid"] {
            assert!(!to_phone.contains(gone), "{gone} left in {to_phone}");
        }
        let phone_port = Sdp::parse(to_phone.as_bytes()).expect("sdp").media[0].port;
        let answer = relay.answer(now, "c1", "p", &phone_answer(), None, Options::default()).expect("answer");
        let answer = String::from_utf8(answer).expect("utf8");
        let parsed = Sdp::parse(answer.as_bytes()).expect("sdp");
        assert_eq!(Profile::of(&parsed.media[0]), Some(Profile::WebRtc), "{answer}");
        let browser_port = parsed.media[0].port;
        let mut table = PortTable::new(30000, 30099);
        while let Some(c) = relay.poll_command() {
            table.apply(now, c);
        }
        Lab { relay, table, now, answer, browser_port, phone_port }
    }

    fn ours(&self) -> (String, String) {
        (
            attr(&self.answer, "ice-ufrag").expect("ufrag").to_owned(),
            attr(&self.answer, "ice-pwd").expect("pwd").to_owned(),
        )
    }

    fn replies(&mut self) -> Vec<Reply> {
        std::iter::from_fn(|| self.table.poll_reply()).collect()
    }

    /// The browser's nominating check, answered.
    fn nominate(&mut self) {
        let (ufrag, pwd) = self.ours();
        let c = check(&format!("{ufrag}:brws"), &pwd, true, false, 1);
        assert!(self.table.forward(self.now, 1, self.browser_port, sa(BROWSER), &c).is_none());
        let r = self.replies();
        assert_eq!(r.len(), 1, "one answer to the check");
        assert_eq!((r[0].to, r[0].from_port), (sa(BROWSER), self.browser_port));
    }

    /// Runs the browser's DTLS client against the relay's leg until both are done.
    fn handshake(&mut self, client: &mut DtlsLeg) {
        for _ in 0..20 {
            while let Some(p) = client.poll_transmit() {
                assert!(self.table.forward(self.now, 1, self.browser_port, sa(BROWSER), &p).is_none());
            }
            for r in self.replies() {
                assert_eq!(r.to, sa(BROWSER));
                client.handle(self.now, &r.data);
            }
            if client.state() == crate::dtls::State::Done {
                return;
            }
            self.now += Duration::from_millis(5);
            self.table.handle_timeout(self.now);
        }
        panic!("the handshake did not finish: {:?}", client.state());
    }
}

#[test]
fn a_browser_and_a_plain_phone_talk_once_the_browser_checked_and_shook_hands() {
    let browser = Identity::generate().expect("id");
    let mut lab = Lab::new(&browser);
    // Our answer to the browser: ICE-lite, our certificate, passive to its actpass, muxed.
    assert!(lab.answer.contains("a=ice-lite\r\na=group:BUNDLE 0\r\n"), "{}", lab.answer);
    assert_eq!(attr(&lab.answer, "setup"), Some("passive"));
    assert_eq!(attr(&lab.answer, "mid"), Some("0"));
    assert!(lab.answer.contains("a=rtcp-mux\r\n"));
    assert_eq!(attr(&lab.answer, "fingerprint").map(str::to_owned), lab.relay.fingerprint());
    assert!(lab.answer.contains(&format!("a=candidate:1 1 UDP 2130706431 203.0.113.1 {} typ host", lab.browser_port)));

    // Before any check: the browser's media goes nowhere, and the phone's neither.
    assert!(lab.table.forward(lab.now, 1, lab.browser_port, sa(BROWSER), &rtp(1)).is_none());
    assert!(lab.table.forward(lab.now, 1, lab.phone_port, sa(PHONE), &rtp(1)).is_none());

    lab.nominate();
    // Checked, but no keys yet: still nothing.
    assert!(lab.table.forward(lab.now, 1, lab.phone_port, sa(PHONE), &rtp(2)).is_none());

    let relay_fp = crate::dtls::parse_fingerprint(attr(&lab.answer, "fingerprint").expect("fp")).expect("fp");
    let mut client = DtlsLeg::new(&browser, relay_fp, true, lab.now);
    lab.handshake(&mut client);
    let mut keys = client.take_keys().expect("the browser's keys");

    // Browser → phone: SRTP in, plain RTP out, from the phone's relay port.
    let mut srtp = rtp(10);
    keys.tx.protect(&mut srtp).expect("protect");
    let f = lab.table.forward(lab.now, 2, lab.browser_port, sa(BROWSER), &srtp).expect("forwarded");
    assert!(f.rewritten);
    assert_eq!((f.to, f.from_port), (sa(PHONE), lab.phone_port));
    assert_eq!(lab.table.rewritten(), &rtp(10)[..]);

    // The same packet again is a replay: dropped.
    assert!(lab.table.forward(lab.now, 3, lab.browser_port, sa(BROWSER), &srtp).is_none());
    // A forged tag: dropped.
    let mut forged = rtp(11);
    keys.tx.protect(&mut forged).expect("protect");
    *forged.last_mut().expect("tag") ^= 1;
    assert!(lab.table.forward(lab.now, 4, lab.browser_port, sa(BROWSER), &forged).is_none());

    // Phone → browser: plain in, SRTP out that the browser's keys open.
    let f = lab.table.forward(lab.now, 5, lab.phone_port, sa(PHONE), &rtp(20)).expect("forwarded");
    assert_eq!((f.to, f.from_port), (sa(BROWSER), lab.browser_port));
    let mut back = lab.table.rewritten().to_vec();
    assert_ne!(back, rtp(20), "encrypted");
    keys.rx.unprotect(&mut back).expect("the browser reads it");
    assert_eq!(back, rtp(20));

    // RTCP from the phone's own RTCP port reaches the browser on the muxed RTP port.
    let rr = [
        0x81, 201, 0, 7, 0, 0, 0, 1, 0xb0, 0x0b, 0x1e, 0x55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let f = lab.table.forward(lab.now, 6, lab.phone_port + 1, sa("192.0.2.20:4001"), &rr).expect("forwarded");
    assert_eq!((f.to, f.from_port), (sa(BROWSER), lab.browser_port));
    let mut srtcp = lab.table.rewritten().to_vec();
    keys.rx_rtcp.unprotect(&mut srtcp).expect("the browser reads the report");
    assert_eq!(srtcp, rr);
    // And the browser's muxed RTCP leaves from the phone's RTCP port.
    let mut sr = rr.to_vec();
    sr[1] = 200;
    keys.tx_rtcp.protect(&mut sr).expect("protect");
    let f = lab.table.forward(lab.now, 7, lab.browser_port, sa(BROWSER), &sr).expect("forwarded");
    assert_eq!(f.from_port, lab.phone_port + 1);
}

#[test]
fn a_stranger_without_the_credentials_gets_no_answer_no_latch_and_no_handshake() {
    let browser = Identity::generate().expect("id");
    let mut lab = Lab::new(&browser);
    let (ufrag, _) = lab.ours();
    // The right username, the wrong password; then a check for another leg.
    for c in [
        check(&format!("{ufrag}:brws"), "guessedpasswordguessedpa", true, false, 2),
        check("nope:brws", "x", true, false, 3),
    ] {
        assert!(lab.table.forward(lab.now, 1, lab.browser_port, sa(STRANGER), &c).is_none());
    }
    assert!(lab.replies().is_empty(), "no answer to a check that does not verify");
    // Its ClientHello flood gets nothing either: DTLS is taken only from the checked address.
    let relay_fp = crate::dtls::parse_fingerprint(attr(&lab.answer, "fingerprint").expect("fp")).expect("fp");
    let mut mallory = DtlsLeg::new(&browser, relay_fp, true, lab.now);
    let hello = mallory.poll_transmit().expect("hello");
    for _ in 0..100 {
        lab.table.forward(lab.now, 1, lab.browser_port, sa(STRANGER), &hello);
    }
    assert!(lab.replies().is_empty());
    assert!(!lab.table.has_timers(), "no handshake begun");
    // The phone's media still goes nowhere: nothing latched.
    assert!(lab.table.forward(lab.now, 1, lab.phone_port, sa(PHONE), &rtp(1)).is_none());
    // Every one of the stranger's datagrams was dropped and counted on the browser's port.
    let stats = lab.relay.stats("c1").expect("stats");
    let dropped = stats[0].get(crate::relay::Component::Rtp, crate::relay::Side::A).dropped.load(Relaxed);
    assert_eq!(dropped, 102, "2 checks and 100 hellos");
    // The real browser still gets in.
    lab.nominate();
}

#[test]
fn an_sdes_phone_and_a_plain_one_are_bridged_with_a_key_each_way() {
    let now = Instant::now();
    let mut relay = Relay::new(RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099), now);
    let key = crate::sdes::Crypto::generate(3, crate::sdes::Suite::AesCm128HmacSha1_80, || 9);
    let offer = format!(
        "v=0\r\no=- 1 1 IN IP4 192.0.2.30\r\ns=-\r\nc=IN IP4 192.0.2.30\r\nt=0 0\r\nm=audio 5000 RTP/SAVP 0\r\n\
         a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:{}\r\na=crypto:{}\r\n",
        "d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSoj",
        key.value()
    );
    let opts = Options { to_profile: Some(Profile::Plain), ..Options::default() };
    let to_plain =
        String::from_utf8(relay.offer(now, "c2", "s", offer.as_bytes(), None, opts).expect("offer")).expect("utf8");
    assert!(to_plain.contains("RTP/AVP 0") && !to_plain.contains("a=crypto"), "{to_plain}");
    let back = relay.answer(now, "c2", "p", &phone_answer(), None, Options::default()).expect("answer");
    let back = String::from_utf8(back).expect("utf8");
    assert!(back.contains("RTP/SAVP 0"), "{back}");
    // The suite pinhole takes (the second line), under the offer's tag, with a key of ours.
    let ours = crate::sdes::Crypto::parse(attr(&back, "crypto").expect("crypto")).expect("parses");
    assert_eq!((ours.tag, ours.suite), (3, crate::sdes::Suite::AesCm128HmacSha1_80));
    assert_ne!(ours.key_salt, key.key_salt, "a key of its own");
    let mut table = PortTable::<()>::new(30000, 30099);
    while let Some(c) = relay.poll_command() {
        table.apply(now, c);
    }
    let sdes_port = Sdp::parse(back.as_bytes()).expect("sdp").media[0].port;
    let plain_port = Sdp::parse(to_plain.as_bytes()).expect("sdp").media[0].port;
    let (mut tx, _) = key.contexts().expect("ctx");
    let mut p = rtp(1);
    tx.protect(&mut p).expect("protect");
    let f = table.forward(now, 1, sdes_port, sa("192.0.2.30:5000"), &p).expect("SRTP in, RTP out");
    assert_eq!(table.rewritten(), &rtp(1)[..]);
    assert_eq!(f.to, sa(PHONE));
    let f = table.forward(now, 2, plain_port, sa(PHONE), &rtp(2)).expect("RTP in, SRTP out");
    assert_eq!(f.to, sa("192.0.2.30:5000"));
    let (mut rx, mut rx_rtcp) = ours.contexts().expect("ctx");
    let mut q = table.rewritten().to_vec();
    rx.unprotect(&mut q).expect("the SDES phone reads it with the key pinhole sent");
    assert_eq!(q, rtp(2));
    // RTCP from the plain phone's RTCP port goes to the SDES phone's RTCP port (neither
    // muxes), as SRTCP.
    let rr = [0x81, 201, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0];
    let f = table.forward(now, 3, plain_port + 1, sa("192.0.2.20:4001"), &rr).expect("RTCP in, SRTCP out");
    assert_eq!((f.to, f.from_port), (sa("192.0.2.30:5001"), sdes_port + 1));
    let mut q = table.rewritten().to_vec();
    rx_rtcp.unprotect(&mut q).expect("SRTCP under the key pinhole sent");
    assert_eq!(q, rr);
}

#[test]
fn an_sdes_offer_without_a_suite_pinhole_takes_is_refused_by_name() {
    let now = Instant::now();
    let mut relay = Relay::new(RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099), now);
    let offer =
        "v=0\r\no=- 1 1 IN IP4 192.0.2.30\r\ns=-\r\nc=IN IP4 192.0.2.30\r\nt=0 0\r\nm=audio 5000 RTP/SAVP 0\r\n\
                 a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSoj\r\n";
    let opts = Options { to_profile: Some(Profile::Plain), ..Options::default() };
    let e = relay.offer(now, "c3", "s", offer.as_bytes(), None, opts).expect_err("refused");
    assert!(e.to_string().contains("no crypto suite negotiated"), "{e}");
}

#[test]
fn a_reinvite_that_turns_the_dtls_roles_round_keeps_media_on_the_old_keys_until_the_new_ones_are_out() {
    let browser = Identity::generate().expect("id");
    let mut lab = Lab::new(&browser);
    lab.nominate();
    let relay_fp = crate::dtls::parse_fingerprint(attr(&lab.answer, "fingerprint").expect("fp")).expect("fp");
    let mut first = DtlsLeg::new(&browser, relay_fp, true, lab.now);
    lab.handshake(&mut first);
    let mut old = first.take_keys().expect("keys");

    // The browser re-offers as passive: pinhole becomes the DTLS client.
    let reoffer =
        String::from_utf8(browser_offer(&browser)).expect("utf8").replace("a=setup:actpass", "a=setup:passive");
    lab.relay.offer(lab.now, "c1", "b", reoffer.as_bytes(), None, Options::default()).expect("re-offer");
    let answer = lab.relay.answer(lab.now, "c1", "p", &phone_answer(), None, Options::default()).expect("answer");
    let answer = String::from_utf8(answer).expect("utf8");
    assert_eq!(attr(&answer, "setup"), Some("active"), "{answer}");
    while let Some(c) = lab.relay.poll_command() {
        lab.table.apply(lab.now, c);
    }
    // Until the new handshake is done the old keys carry the media.
    let mut p = rtp(30);
    old.tx.protect(&mut p).expect("protect");
    assert!(lab.table.forward(lab.now, 1, lab.browser_port, sa(BROWSER), &p).is_some(), "old keys still work");

    // pinhole sends the ClientHello to the checked address; the browser's server answers.
    let mut server = DtlsLeg::new(&browser, relay_fp, false, lab.now);
    for _ in 0..20 {
        lab.now += Duration::from_millis(5);
        lab.table.handle_timeout(lab.now);
        for r in lab.replies() {
            assert_eq!(r.to, sa(BROWSER));
            server.handle(lab.now, &r.data);
        }
        while let Some(d) = server.poll_transmit() {
            assert!(lab.table.forward(lab.now, 1, lab.browser_port, sa(BROWSER), &d).is_none());
        }
        if server.state() == crate::dtls::State::Done && lab.replies().is_empty() {
            break;
        }
    }
    assert_eq!(server.state(), crate::dtls::State::Done);
    let mut new = server.take_keys().expect("new keys");
    let mut p = rtp(31);
    new.tx.protect(&mut p).expect("protect");
    assert!(lab.table.forward(lab.now, 2, lab.browser_port, sa(BROWSER), &p).is_some(), "the new keys work");
    let f = lab.table.forward(lab.now, 3, lab.phone_port, sa(PHONE), &rtp(40)).expect("to the browser");
    assert_eq!(f.to, sa(BROWSER));
    let mut back = lab.table.rewritten().to_vec();
    new.rx.unprotect(&mut back).expect("under the new keys");
}

#[test]
fn without_ice_dtls_is_taken_from_the_address_the_latch_takes_and_media_follows() {
    let browser = Identity::generate().expect("id");
    let now = Instant::now();
    let mut relay = Relay::new(RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099), now);
    // A DTLS-SRTP offer without ICE (what an ng client sends with ICE=remove).
    let offer = String::from_utf8(browser_offer(&browser))
        .expect("utf8")
        .lines()
        .filter(|l| !l.starts_with("a=ice-") && !l.starts_with("a=candidate"))
        .map(|l| format!("{l}\r\n"))
        .collect::<String>();
    let to_phone = relay.offer(now, "c4", "b", offer.as_bytes(), None, Options::default()).expect("offer");
    let phone_port = Sdp::parse(&to_phone).expect("sdp").media[0].port;
    let answer = relay.answer(now, "c4", "p", &phone_answer(), None, Options::default()).expect("answer");
    let answer = String::from_utf8(answer).expect("utf8");
    assert!(!answer.contains("a=ice-") && !answer.contains("a=candidate"), "{answer}");
    let port = Sdp::parse(answer.as_bytes()).expect("sdp").media[0].port;
    let mut table = PortTable::<()>::new(30000, 30099);
    while let Some(c) = relay.poll_command() {
        table.apply(now, c);
    }
    let relay_fp = crate::dtls::parse_fingerprint(attr(&answer, "fingerprint").expect("fp")).expect("fp");
    let mut client = DtlsLeg::new(&browser, relay_fp, true, now);
    // A stranger's hello first: the latch expects the SDP's address, so nothing back.
    let hello = client.poll_transmit().expect("hello");
    assert!(table.forward(now, 1, port, sa(STRANGER), &hello).is_none());
    assert!(table.poll_reply().is_none());
    table.forward(now, 1, port, sa(BROWSER), &hello);
    for _ in 0..20 {
        while let Some(r) = table.poll_reply() {
            assert_eq!(r.to, sa(BROWSER));
            client.handle(now, &r.data);
        }
        while let Some(p) = client.poll_transmit() {
            table.forward(now, 1, port, sa(BROWSER), &p);
        }
        if client.state() == crate::dtls::State::Done && !table.has_replies() {
            break;
        }
    }
    let mut keys = client.take_keys().expect("keys");
    let mut p = rtp(1);
    keys.tx.protect(&mut p).expect("protect");
    let f = table.forward(now, 2, port, sa(BROWSER), &p).expect("forwarded");
    assert_eq!(f.to, sa(PHONE));
    let f = table.forward(now, 3, phone_port, sa(PHONE), &rtp(2)).expect("back");
    assert_eq!(f.to, sa(BROWSER));
}
