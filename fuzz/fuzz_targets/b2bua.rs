//! The B2BUA's message path: a trunk call is set up from a trusted phone (its INVITE, the
//! carrier's 200), then arbitrary datagrams arrive from the carrier and from the phone —
//! responses to our branches, in-dialog requests of either leg, CANCEL, garbage — and
//! timers run out. Nothing may panic, and the call's relay session is gone once the call
//! is over and its state aged out.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pinhole_media::relay::{Relay, RelayConfig};
use pinhole_sip::b2bua::{B2buaConfig, Route, Trunk};
use pinhole_sip::message::Message;
use pinhole_sip::{Cidr, Flow, Interface, Keepalive, Proxy, ProxyConfig, RegistrarConfig, Transport};

const PHONE: &str = "203.0.113.50:5062";
const CARRIER: &str = "192.0.2.10:5080";

fn config() -> ProxyConfig {
    let bind: SocketAddr = "203.0.113.1:5060".parse().expect("addr");
    let trunk = Trunk {
        name: "carrier".into(),
        transport: Transport::Udp,
        address: CARRIER.parse().expect("addr"),
        username: "acct".into(),
        password: "pw".into(),
        register: false,
        max_calls: 4,
        dids: vec![],
        options_interval: 30,
        register_expires: 600,
        inbound_auth: false,
    };
    ProxyConfig {
        domain: "example.com".into(),
        interfaces: vec![Interface { transport: Transport::Udp, bind, advertise: "203.0.113.1".into() }],
        realm: "example.com".into(),
        users: vec![],
        auth_algorithms: vec![pinhole_sip::auth::Algorithm::Md5],
        trusted: vec![Cidr::parse("203.0.113.50/32").expect("cidr")],
        registrar: RegistrarConfig { default_expires: 3600, min_expires: 60, max_expires: 7200 },
        keepalive: Keepalive::Off,
        keepalive_interval: Duration::from_secs(30),
        keepalive_min: Duration::from_secs(5),
        max_body: 8192,
        max_message: 16384,
        secret: [3; 32],
        punch: Default::default(),
        faketcp_port: None,
        record_users: Vec::new(),
        b2bua: B2buaConfig {
            trunks: vec![trunk],
            routes: vec![Route { pattern: regex::Regex::new("^555").expect("re"), trunks: vec![0], record: false }],
            copy_headers: vec!["Supported".into(), "Allow".into()],
            session_expires: Duration::from_secs(90),
            ring_timeout: Duration::from_secs(120),
            caller_ids: vec![("alice".into(), "+14155550123".into())],
        },
    }
}

fn flow(remote: &str) -> Flow {
    let bind: SocketAddr = "203.0.113.1:5060".parse().expect("addr");
    Flow { transport: Transport::Udp, local: bind, remote: remote.parse().expect("addr"), conn: None }
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let relay = Relay::new(RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099), now);
    let mut proxy = Proxy::new(config(), Some(relay), now, 1_700_000_000, 7);
    let sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let invite = format!(
        "INVITE sip:5551234@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKf1\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:5551234@example.com>\r\nCall-ID: fuzz-call\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@10.0.0.2:5062>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    let _ = proxy.handle_input(now, flow(PHONE), Bytes::from(invite));
    // The INVITE the carrier got: its branch and Call-ID, for the inputs to aim at.
    let mut to_carrier = None;
    while let Some(t) = proxy.poll_transmit() {
        if t.flow.remote.to_string() == CARRIER {
            to_carrier = Message::parse(Bytes::from(t.payload)).ok();
        }
    }
    let Some(sent) = to_carrier else { return };
    // Half the time the carrier answers first, so in-dialog input has a dialog to hit.
    if data.first().is_some_and(|b| b & 1 == 1) {
        let ok = sent.response(200, "OK", Some("c1"), &["Contact: <sip:gw@192.0.2.10:5080>".to_owned()]);
        let _ = proxy.handle_input(now, flow(CARRIER), Bytes::from(ok));
        while proxy.poll_transmit().is_some() {}
    }
    // The input: datagrams separated by NUL, each from the carrier or the phone by its
    // first byte; "BRANCH" and "CALLID" are replaced by the live ones.
    let branch = sent.branch().unwrap_or("").to_owned();
    let call_id = sent.call_id().unwrap_or("").to_owned();
    for (i, chunk) in data.get(1..).unwrap_or(&[]).split(|b| *b == 0).enumerate() {
        let text = String::from_utf8_lossy(chunk).replace("BRANCH", &branch).replace("CALLID", &call_id);
        let from = if i % 2 == 0 { CARRIER } else { PHONE };
        let _ = proxy.handle_input(now + Duration::from_millis(i as u64), flow(from), Bytes::from(text));
        while proxy.poll_transmit().is_some() {}
    }
    for s in [1, 40, 80, 200] {
        proxy.handle_timeout(now + Duration::from_secs(s));
        while proxy.poll_transmit().is_some() {}
    }
    while proxy.poll_call_record().is_some() {}
});
