//! A browser leg of the relay as the network sees it: a WebRTC offer and a plain answer
//! through the relay, its commands applied to a port table, a correctly signed check
//! nominating the browser's address, and then the input as datagrams (each prefixed by
//! three bytes: whether it comes from the browser's address or a stranger's, and its
//! length)
//! to the browser's relay port, where they are ICE, DTLS, SRTP or garbage. Nothing may
//! panic; no datagram from a stranger is ever answered; nothing reaches the phone (no
//! input can complete a handshake under a certificate it does not hold); whatever the
//! relay sends back is no larger than a DTLS flight's record, and goes to the browser.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pinhole_media::dtls::Identity;
use pinhole_media::ice_lite::browser_check;
use pinhole_media::ports::PortTable;
use pinhole_media::relay::{Options, Relay, RelayConfig};
use pinhole_media::sdp::Sdp;

const BROWSER: &str = "198.51.100.7:51000";
const STRANGER: &str = "203.0.113.66:51000";

fn browser_identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| Identity::generate().expect("identity"))
}

fn relay_identity() -> Arc<Identity> {
    static ID: OnceLock<Arc<Identity>> = OnceLock::new();
    ID.get_or_init(|| Arc::new(Identity::generate().expect("identity"))).clone()
}

fn attr<'a>(sdp: &'a str, name: &str) -> &'a str {
    sdp.lines().find_map(|l| l.strip_prefix(&format!("a={name}:"))).unwrap_or("")
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut relay = Relay::new(RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099), now);
    relay.set_identity(relay_identity());
    let offer = format!(
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 51000 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 198.51.100.7\r\n\
         a=ice-ufrag:brws\r\na=ice-pwd:browserpasswordbrowserpass\r\na=fingerprint:{}\r\na=setup:actpass\r\na=mid:0\r\n\
         a=rtcp-mux\r\n",
        browser_identity().fingerprint_attr()
    );
    let Ok(to_phone) = relay.offer(now, "c", "b", offer.as_bytes(), None, Options::default()) else { panic!("offer") };
    let phone_port = Sdp::parse(&to_phone).expect("sdp").media[0].port;
    let answer = b"v=0\r\no=- 1 1 IN IP4 192.0.2.20\r\ns=-\r\nc=IN IP4 192.0.2.20\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let Ok(to_browser) = relay.answer(now, "c", "p", answer, None, Options::default()) else { panic!("answer") };
    let to_browser = String::from_utf8(to_browser).expect("utf8");
    let port = Sdp::parse(to_browser.as_bytes()).expect("sdp").media[0].port;
    let mut table = PortTable::<()>::new(30000, 30099);
    while let Some(c) = relay.poll_command() {
        table.apply(now, c);
    }
    let (browser, stranger): (SocketAddr, SocketAddr) = (BROWSER.parse().expect("a"), STRANGER.parse().expect("a"));
    let user = format!("{}:brws", attr(&to_browser, "ice-ufrag"));
    let check = browser_check(&user, attr(&to_browser, "ice-pwd"), true, false, [1; 12]).expect("check");
    assert!(table.forward(now, 1, port, browser, &check).is_none());
    assert!(table.poll_reply().is_some_and(|r| r.to == browser), "the check is answered");

    let mut rest = data;
    let mut t = now;
    while rest.len() >= 3 {
        let (head, tail) = rest.split_at(3);
        let len = usize::from(u16::from_be_bytes([head[1], head[2]])).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        let from = if head[0] & 1 == 0 { browser } else { stranger };
        t += Duration::from_millis(7);
        table.handle_timeout(t);
        let f = table.forward(t, 2, port, from, datagram);
        assert!(f.is_none(), "{datagram:?} from {from} was forwarded");
        while let Some(r) = table.poll_reply() {
            assert_eq!(r.to, browser, "only the checked browser is ever answered");
            assert!(r.data.len() <= 1500, "a reply of {} bytes", r.data.len());
        }
    }
    // The phone's media still goes nowhere: no keys.
    assert!(table.forward(t, 3, phone_port, "192.0.2.20:4000".parse().expect("a"), &[0x80; 172]).is_none());
});
