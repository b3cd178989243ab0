//! Proxy behaviour in virtual time: phones are just byte strings on flows.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::message::{HeaderName, Message, Method};
use crate::proxy::*;
use crate::registrar::RegistrarConfig;
use crate::transport::{Flow, Transmit, Transport};

const LOCAL: &str = "203.0.113.1:5060";
const TRUSTED: &str = "203.0.113.50:5060"; // a trunk / sipp box in auth.trusted
const NAT_A: &str = "203.0.113.9:40001"; // phone A's NAT mapping
const NAT_B: &str = "203.0.113.10:40002"; // phone B's NAT mapping

use pinhole_media::relay::{Relay, RelayConfig};

struct Lab {
    proxy: Proxy<Option<Relay>>,
    now: Instant,
    /// Registrations made, to give each its own Call-ID and branches.
    regs: u32,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn udp(remote: &str) -> Flow {
    Flow { transport: Transport::Udp, local: addr(LOCAL), remote: addr(remote), conn: None }
}

impl Lab {
    fn new() -> Lab {
        Lab::with_keepalive(Keepalive::Off)
    }

    fn with_media() -> Lab {
        let mut lab = Lab::new();
        let now = lab.now;
        let cfg = lab.proxy.config().clone();
        let relay = Relay::new(
            RelayConfig { max_sessions: 100, ..RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099) },
            now,
        );
        lab.proxy = Proxy::new(cfg, Some(relay), now, 1_700_000_000, 1);
        lab
    }

    fn with_keepalive(keepalive: Keepalive) -> Lab {
        let now = Instant::now();
        let cfg = ProxyConfig {
            domain: "example.com".into(),
            interfaces: vec![
                Interface { transport: Transport::Udp, bind: addr(LOCAL), advertise: "203.0.113.1".into() },
                Interface { transport: Transport::Tcp, bind: addr(LOCAL), advertise: "203.0.113.1".into() },
            ],
            realm: "example.com".into(),
            users: vec![
                ("alice".into(), "pw-a".into()),
                ("bob".into(), "pw-b".into()),
                ("carol".into(), "pw-c".into()),
            ],
            auth_algorithms: vec![crate::auth::Algorithm::Sha256, crate::auth::Algorithm::Md5],
            trusted: vec![Cidr::parse("203.0.113.50/32").expect("cidr")],
            registrar: RegistrarConfig { default_expires: 3600, min_expires: 60, max_expires: 7200 },
            keepalive,
            keepalive_interval: Duration::from_secs(30),
            keepalive_min: Duration::from_secs(5),
            max_body: 16384,
            max_message: 32768,
            secret: [9; 32],
            punch: Default::default(),
            faketcp_port: None,
            record_users: Vec::new(),
            b2bua: Default::default(),
        };
        Lab { proxy: Proxy::new(cfg, None, now, 1_700_000_000, 1), now, regs: 0 }
    }

    fn send(&mut self, from: Flow, text: &str) -> Vec<Transmit> {
        let data = Bytes::from(text.replace('\n', "\r\n"));
        self.proxy.handle_input(self.now, from, data).expect("SIP");
        self.drain()
    }

    fn drain(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.proxy.poll_transmit()).collect()
    }

    /// Moves virtual time on, firing the proxy's and the relay's timers as a driver would.
    fn advance(&mut self, d: Duration) -> Vec<Transmit> {
        let end = self.now + d;
        let mut out = Vec::new();
        loop {
            let relay = self.proxy.media().as_ref().and_then(Relay::poll_timeout);
            let proxy = self.proxy.poll_timeout().map(|(t, _)| t);
            let Some(t) = [relay, proxy].into_iter().flatten().min().filter(|t| *t <= end) else { break };
            self.now = t.max(self.now);
            let mut ended = Vec::new();
            if let Some(r) = self.proxy.media_mut() {
                r.handle_timeout(self.now);
                while let Some(pinhole_media::relay::Event::Ended { call_id, .. }) = r.poll_event() {
                    ended.push(call_id);
                }
            }
            for call_id in ended {
                self.proxy.media_call_ended(self.now, &call_id);
            }
            self.proxy.handle_timeout(self.now);
            out.extend(self.drain());
        }
        self.now = end;
        out
    }

    /// Relay calls and ports in use.
    fn media_usage(&self) -> (usize, usize) {
        self.proxy.media().as_ref().map_or((0, 0), |r| (r.call_count(), r.ports_in_use()))
    }

    /// Registers `user` from a trusted-free NAT mapping using the proxy's own challenge.
    fn register(&mut self, user: &str, nat: &str, password: &str) {
        self.register_with(user, nat, password, None);
    }

    /// Like [`Lab::register`], with an extra header line (an agent's `Pinhole-NAT`).
    fn register_with(&mut self, user: &str, nat: &str, password: &str, extra: Option<&str>) {
        self.regs += 1;
        let n = self.regs;
        let reg = format!(
            "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKreg{user}{n}x1;rport
Max-Forwards: 70
To: <sip:{user}@example.com>
From: <sip:{user}@example.com>;tag=r{user}
Call-ID: reg-{user}-{n}
CSeq: 1 REGISTER
Contact: <sip:{user}@10.0.0.2:5060>
Content-Length: 0

"
        );
        let reg = match extra {
            Some(line) => with_header(&reg, line),
            None => reg,
        };
        let out = self.send(udp(nat), &reg);
        assert_eq!(parse(&out[0]).status(), Some(401));
        let creds = credentials(&out[0], user, password, "REGISTER", "sip:example.com", 1);
        let authed = with_header(
            &reg.replace("CSeq: 1", "CSeq: 2").replace(&format!("reg{user}{n}x1"), &format!("reg{user}{n}x2")),
            &creds,
        );
        let out = self.send(udp(nat), &authed);
        let ok = parse(&out[0]);
        assert_eq!(ok.status(), Some(if password.starts_with("pw-") { 200 } else { 401 }), "{}", text(&out[0]));
    }
}

fn parse(t: &Transmit) -> Message {
    Message::parse(Bytes::from(t.payload.clone())).expect("proxy output scans")
}

fn text(t: &Transmit) -> String {
    String::from_utf8_lossy(&t.payload).into_owned()
}

fn invite(to_user: &str, branch: &str) -> String {
    format!(
        "INVITE sip:{to_user}@example.com SIP/2.0
Via: SIP/2.0/UDP 203.0.113.50:5060;branch={branch}
Max-Forwards: 70
To: <sip:{to_user}@example.com>
From: <sip:caller@trunk.example.net>;tag=from1
Call-ID: call-{branch}
CSeq: 1 INVITE
Contact: <sip:caller@203.0.113.50:5060>
Content-Type: application/sdp
Content-Length: 3

v=0"
    )
}

/// Answers a forwarded request as the UA would.
fn reply(req: &Transmit, code: u16, reason: &str, to_tag: &str) -> String {
    let m = parse(req);
    let resp = m.response(code, reason, Some(to_tag), &["Contact: <sip:callee@10.0.0.2:5060>".to_owned()]);
    let mut s = String::from_utf8(resp).expect("utf8");
    // Echo Record-Route as a UAS does (§12.1.1).
    for rr in m.value_texts(HeaderName::RecordRoute).iter().rev() {
        s = s.replacen("\r\n", &format!("\r\nRecord-Route: {rr}\r\n"), 1);
    }
    s.replace("\r\n", "\n")
}

#[test]
fn invite_to_registered_phone_goes_to_its_nat_mapping() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKc1"));
    assert_eq!(out.len(), 2, "100 Trying and the forwarded INVITE");
    assert_eq!(parse(&out[0]).status(), Some(100));
    let fwd = &out[1];
    assert_eq!(fwd.flow.remote, addr(NAT_B));
    let m = parse(fwd);
    assert_eq!(m.request_uri(), Some("sip:bob@10.0.0.2:5060"));
    assert_eq!(m.header(HeaderName::MaxForwards), Some("69"));
    let vias = m.value_texts(HeaderName::Via);
    assert!(vias[0].starts_with("SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKph"), "{vias:?}");
    assert_eq!(vias[1], "SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKc1");
    let rr = m.value_texts(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 1);
    assert!(rr[0].starts_with("<sip:ph") && rr[0].ends_with("@203.0.113.1:5060;lr>"), "{rr:?}");
    // The body and the rest pass untouched.
    assert_eq!(m.body_bytes(), b"v=0");
    assert!(text(fwd).contains("Contact: <sip:caller@203.0.113.50:5060>\r\n"));
}

#[test]
fn received_and_rport_record_the_real_source() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let inv = invite("bob", "z9hG4bKc2")
        .replace("203.0.113.50:5060;branch=z9hG4bKc2", "10.1.1.1:5060;branch=z9hG4bKc2;rport");
    let out = lab.send(udp(TRUSTED), &inv);
    let vias = parse(&out[1]).value_texts(HeaderName::Via).into_iter().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(vias[1], "SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKc2;rport=5060;received=203.0.113.50");
}

#[test]
fn ringing_and_answer_go_back_to_the_caller_without_our_via() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKc3"));
    let fwd = out[1].clone();
    let up = lab.send(udp(NAT_B), &reply(&fwd, 180, "Ringing", "b1"));
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].flow.remote, addr(TRUSTED));
    let ringing = parse(&up[0]);
    assert_eq!(ringing.status(), Some(180));
    assert_eq!(ringing.value_texts(HeaderName::Via), vec!["SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKc3"]);
    let up = lab.send(udp(NAT_B), &reply(&fwd, 200, "OK", "b1"));
    assert_eq!(parse(&up[0]).status(), Some(200));
    // A retransmitted 200 is forwarded too (RFC 6026), nothing else is generated.
    let up = lab.send(udp(NAT_B), &reply(&fwd, 200, "OK", "b1"));
    assert_eq!(up.len(), 1);
    assert_eq!(parse(&up[0]).status(), Some(200));
}

#[test]
fn in_dialog_requests_follow_the_record_route_token_to_each_nat() {
    let mut lab = Lab::new();
    lab.register("alice", NAT_A, "pw-a");
    lab.register("bob", NAT_B, "pw-b");
    // alice (behind NAT_A) calls bob, authenticating is skipped by making her trusted? No:
    // she answers the 407 challenge like a phone does.
    let inv = invite("bob", "z9hG4bKd1").replace("203.0.113.50:5060", "10.0.0.2:5060");
    let out = lab.send(udp(NAT_A), &inv);
    assert_eq!(out.len(), 1, "a challenge and no 100 Trying");
    let challenge = parse(&out[0]);
    assert_eq!(challenge.status(), Some(407));
    // Trusted-source call instead, then alice's side is the trunk and bob's the phone.
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKd2"));
    let fwd = out[1].clone();
    let rr = parse(&fwd).value_texts(HeaderName::RecordRoute)[0].to_owned();
    lab.send(udp(NAT_B), &reply(&fwd, 200, "OK", "b2"));
    // Bob hangs up: his BYE goes to the caller's Contact via our Record-Route.
    let bye = format!(
        "BYE sip:caller@203.0.113.50:5060 SIP/2.0
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKbye1;rport
Route: {rr}
Max-Forwards: 70
From: <sip:bob@example.com>;tag=b2
To: <sip:caller@trunk.example.net>;tag=from1
Call-ID: call-z9hG4bKd2
CSeq: 1 BYE
Content-Length: 0

"
    );
    let out = lab.send(udp(NAT_B), &bye);
    assert_eq!(out.len(), 1, "BYE is forwarded, not challenged");
    assert_eq!(out[0].flow.remote, addr(TRUSTED));
    let m = parse(&out[0]);
    assert_eq!(m.method(), Some(&Method::Bye));
    assert!(m.value_texts(HeaderName::Route).is_empty(), "our Route is consumed");
    // The caller's ACK/BYE towards bob's private Contact reaches his NAT mapping.
    let bye2 = bye
        .replace("BYE sip:caller@203.0.113.50:5060", "BYE sip:callee@10.0.0.2:5060")
        .replace("z9hG4bKbye1", "z9hG4bKbye2")
        .replace("10.0.0.2:5060;branch", "203.0.113.50:5060;branch");
    let out = lab.send(udp(TRUSTED), &bye2);
    assert_eq!(out[0].flow.remote, addr(NAT_B));
}

#[test]
fn forged_record_route_token_is_not_trusted() {
    let mut lab = Lab::new();
    let bye = "BYE sip:x@198.51.100.99 SIP/2.0
Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKforge
Route: <sip:ph0004cb00710a10e00004cb00710a10e000000000000000000000@203.0.113.1:5060;lr>
From: <sip:a@example.com>;tag=1
To: <sip:b@example.com>;tag=2
Call-ID: forged
CSeq: 1 BYE
Content-Length: 0

";
    let out = lab.send(udp("198.51.100.1:5060"), bye);
    assert_eq!(out.len(), 1);
    assert_eq!(parse(&out[0]).status(), Some(407), "a forged token buys no free relaying");
    assert_eq!(out[0].flow.remote, addr("198.51.100.1:5060"));
    let ack = bye.replace("BYE", "ACK");
    assert!(lab.send(udp("198.51.100.1:5060"), &ack).is_empty(), "a forged ACK is dropped");
}

#[test]
fn unregistered_known_user_gets_480_and_unknown_user_404() {
    let mut lab = Lab::new();
    let out = lab.send(udp(TRUSTED), &invite("carol", "z9hG4bKe1"));
    assert_eq!(parse(&out[1]).status(), Some(480));
    let out = lab.send(udp(TRUSTED), &invite("nobody", "z9hG4bKe2"));
    assert_eq!(parse(&out[1]).status(), Some(404));
}

#[test]
fn busy_callee_gets_ack_and_caller_gets_486_until_it_acks() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKf1"));
    let fwd = out[1].clone();
    let out = lab.send(udp(NAT_B), &reply(&fwd, 486, "Busy Here", "b3"));
    assert_eq!(out.len(), 2);
    let ack = parse(&out[0]);
    assert_eq!(ack.method(), Some(&Method::Ack));
    assert_eq!(out[0].flow.remote, addr(NAT_B));
    assert_eq!(ack.tag(HeaderName::To), Some("b3"));
    assert_eq!(
        ack.top_via().and_then(|v| v.params.get_val("branch").cloned()),
        parse(&fwd).top_via().and_then(|v| v.params.get_val("branch").cloned())
    );
    assert_eq!(parse(&out[1]).status(), Some(486));
    // Timer G: the 486 is retransmitted to the caller until it ACKs.
    let re = lab.advance(Duration::from_millis(600));
    assert_eq!(re.len(), 1);
    assert_eq!(parse(&re[0]).status(), Some(486));
    let caller_ack = "ACK sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKf1
To: <sip:bob@example.com>;tag=b3
From: <sip:caller@trunk.example.net>;tag=from1
Call-ID: call-z9hG4bKf1
CSeq: 1 ACK
Content-Length: 0

";
    assert!(lab.send(udp(TRUSTED), caller_ack).is_empty(), "hop-by-hop ACK is absorbed");
    assert!(lab.advance(Duration::from_secs(10)).is_empty(), "no more retransmissions after ACK");
}

#[test]
fn invite_client_retransmits_until_timer_b_then_caller_gets_408() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKg1"));
    let first = out[1].payload.clone();
    let later = lab.advance(Duration::from_secs(40));
    let retransmits: Vec<_> = later.iter().filter(|t| t.payload == first).collect();
    // Timer A doubles from T1: 0.5, 1, 2, 4, 8, 16 s, then Timer B fires at 32 s.
    assert_eq!(retransmits.len(), 6);
    let finals: Vec<_> = later.iter().filter(|t| t.flow.remote == addr(TRUSTED)).map(parse).collect();
    assert_eq!(finals.first().and_then(Message::status), Some(408));
    assert_eq!(lab.proxy.transaction_count(), 1, "only the server transaction waiting for the ACK remains");
}

#[test]
fn ringing_branch_stops_retransmitting() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKg2"));
    let fwd = out[1].clone();
    lab.send(udp(NAT_B), &reply(&fwd, 180, "Ringing", "b"));
    let later = lab.advance(Duration::from_secs(20));
    assert!(later.iter().all(|t| t.payload != fwd.payload));
}

#[test]
fn parallel_fork_first_2xx_wins_and_others_are_cancelled() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    // A second contact for bob from another device.
    let reg2 = "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKr2
To: <sip:bob@example.com>
From: <sip:bob@example.com>;tag=r
Call-ID: reg-bob-desk
CSeq: 1 REGISTER
Contact: <sip:bob@203.0.113.50:5070>
Content-Length: 0

";
    let out = lab.send(udp(TRUSTED), reg2);
    assert_eq!(parse(&out[0]).status(), Some(200));
    assert_eq!(parse(&out[0]).value_texts(HeaderName::Contact).len(), 2);
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKh1"));
    let forks: Vec<_> = out.iter().filter(|t| parse(t).method() == Some(&Method::Invite)).cloned().collect();
    assert_eq!(forks.len(), 2);
    for f in &forks {
        lab.send(udp(&f.flow.remote.to_string()), &reply(f, 180, "Ringing", "x"));
    }
    let up = lab.send(udp(&forks[0].flow.remote.to_string()), &reply(&forks[0], 200, "OK", "w"));
    let statuses: Vec<_> = up.iter().filter_map(|t| parse(t).status()).collect();
    assert_eq!(statuses, vec![200]);
    let cancels: Vec<_> = up.iter().filter(|t| parse(t).method() == Some(&Method::Cancel)).collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].flow.remote, forks[1].flow.remote);
    // The cancelled branch's 487 is not forwarded: the caller already has its 2xx.
    let up = lab.send(udp(&forks[1].flow.remote.to_string()), &reply(&forks[1], 487, "Request Terminated", "l"));
    assert!(up.iter().all(|t| parse(t).status() != Some(487)));
}

#[test]
fn caller_cancel_is_answered_and_propagated() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKi1"));
    let fwd = out[1].clone();
    lab.send(udp(NAT_B), &reply(&fwd, 180, "Ringing", "b"));
    let cancel = "CANCEL sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKi1
Max-Forwards: 70
To: <sip:bob@example.com>
From: <sip:caller@trunk.example.net>;tag=from1
Call-ID: call-z9hG4bKi1
CSeq: 1 CANCEL
Content-Length: 0

";
    let out = lab.send(udp(TRUSTED), cancel);
    assert_eq!(parse(&out[0]).status(), Some(200));
    let c = parse(&out[1]);
    assert_eq!(c.method(), Some(&Method::Cancel));
    assert_eq!(out[1].flow.remote, addr(NAT_B));
    assert_eq!(c.request_uri(), parse(&fwd).request_uri());
    let up = lab.send(udp(NAT_B), &reply(&fwd, 487, "Request Terminated", "b"));
    assert!(up.iter().any(|t| parse(t).status() == Some(487) && t.flow.remote == addr(TRUSTED)));
    // A CANCEL for nothing gets 481.
    let out = lab.send(udp(TRUSTED), &cancel.replace("z9hG4bKi1", "z9hG4bKnone"));
    assert_eq!(parse(&out[0]).status(), Some(481));
}

#[test]
fn untrusted_invite_is_challenged_with_every_offered_algorithm() {
    let mut lab = Lab::new();
    let out = lab.send(udp("198.51.100.77:5060"), &invite("bob", "z9hG4bKj1"));
    assert_eq!(out.len(), 1);
    let c = parse(&out[0]);
    assert_eq!(c.status(), Some(407));
    assert!(text(&out[0]).contains("Proxy-Authenticate: Digest realm=\"example.com\""));
    assert!(text(&out[0]).contains("algorithm=SHA-256"));
    assert!(text(&out[0]).contains("algorithm=MD5"));
    assert!(lab.proxy.registrar().binding_count() == 0);
}

#[test]
fn wrong_password_is_challenged_again() {
    let mut lab = Lab::new();
    let reg = "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKwp1;rport
Max-Forwards: 70
To: <sip:alice@example.com>
From: <sip:alice@example.com>;tag=wp
Call-ID: wrong-password
CSeq: 1 REGISTER
Contact: <sip:alice@10.0.0.2:5060>
Content-Length: 0

";
    let out = lab.send(udp(NAT_A), reg);
    assert_eq!(parse(&out[0]).status(), Some(401));
    let guess = credentials(&out[0], "alice", "guess", "REGISTER", "sip:example.com", 1);
    let again = with_header(&reg.replace("z9hG4bKwp1", "z9hG4bKwp2").replace("CSeq: 1", "CSeq: 2"), &guess);
    let out = lab.send(udp(NAT_A), &again);
    assert_eq!(out.len(), 1);
    let r = parse(&out[0]);
    assert_eq!(r.status(), Some(401), "a wrong password is challenged again");
    assert!(text(&out[0]).contains("WWW-Authenticate: Digest realm=\"example.com\""));
    assert!(!text(&out[0]).contains("stale=true"), "not stale: wrong");
    assert_eq!(lab.proxy.registrar().binding_count(), 0);
}

#[test]
fn exhausted_max_forwards_gets_483() {
    let mut lab = Lab::new();
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKk1").replace("Max-Forwards: 70", "Max-Forwards: 0"));
    assert_eq!(parse(&out[1]).status(), Some(483));
}

#[test]
fn proxy_require_extension_gets_420_with_unsupported() {
    let mut lab = Lab::new();
    let out = lab.send(
        udp(TRUSTED),
        &invite("bob", "z9hG4bKk2").replace("Max-Forwards: 70", "Max-Forwards: 70\nProxy-Require: foo"),
    );
    assert_eq!(parse(&out[1]).status(), Some(420));
    assert!(text(&out[1]).contains("Unsupported: foo\r\n"));
}

#[test]
fn request_looping_back_to_us_gets_482() {
    let mut lab = Lab::new();
    // bob's binding points back at pinhole itself.
    let reg = "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKloopreg
To: <sip:bob@example.com>
From: <sip:bob@example.com>;tag=r
Call-ID: loop
CSeq: 1 REGISTER
Contact: <sip:bob@example.com>
Content-Length: 0

";
    lab.send(udp(TRUSTED), reg);
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKl1"));
    let fwd = out[1].clone();
    // Feed our own forwarded INVITE back in, as the network would.
    lab.proxy.handle_input(lab.now, udp(TRUSTED), Bytes::from(fwd.payload.clone())).expect("sip");
    let back = lab.drain();
    assert!(back.iter().any(|t| parse(t).status() == Some(482)), "{:?}", back.iter().map(text).collect::<Vec<_>>());
}

#[test]
fn malformed_request_gets_400_naming_the_header_and_garbage_is_counted() {
    let mut lab = Lab::new();
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKm1").replace("CSeq: 1 INVITE", "CSeq: one INVITE"));
    let r = parse(&out[0]);
    assert_eq!(r.status(), Some(400));
    assert_eq!(r.reason(), "Malformed CSeq Header");
    assert!(lab.proxy.handle_input(lab.now, udp(TRUSTED), Bytes::from_static(b"\x00\x01garbage\r\n\r\n")).is_err());
    assert_eq!(lab.proxy.stats().garbage, 1);
}

#[test]
fn options_to_the_proxy_is_answered_locally() {
    let mut lab = Lab::new();
    let opt = "OPTIONS sip:203.0.113.1 SIP/2.0
Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKo1
To: <sip:203.0.113.1>
From: <sip:probe@example.net>;tag=1
Call-ID: opt
CSeq: 1 OPTIONS
Max-Forwards: 70
Content-Length: 0

";
    let out = lab.send(udp(TRUSTED), opt);
    assert_eq!(parse(&out[0]).status(), Some(200));
    // A retransmission gets the same answer without new state.
    let again = lab.send(udp(TRUSTED), opt);
    assert_eq!(again[0].payload, out[0].payload);
}

#[test]
fn binding_whose_keepalives_fail_is_expired() {
    let mut lab = Lab::with_keepalive(Keepalive::Options);
    lab.register("bob", NAT_B, "pw-b");
    assert_eq!(lab.proxy.registrar().binding_count(), 1);
    let sent = lab.advance(Duration::from_secs(200));
    let pings =
        sent.iter().filter(|t| parse(t).method() == Some(&Method::Options) && t.flow.remote == addr(NAT_B)).count();
    assert!(pings >= 3, "keepalives were sent ({pings})");
    assert_eq!(lab.proxy.registrar().binding_count(), 0);
}

#[test]
fn answered_keepalives_keep_the_binding() {
    let mut lab = Lab::with_keepalive(Keepalive::Options);
    lab.register("bob", NAT_B, "pw-b");
    for _ in 0..400 {
        let sent = lab.advance(Duration::from_millis(500));
        for t in sent.iter().filter(|t| parse(t).method() == Some(&Method::Options)) {
            let r = parse(t).response(200, "OK", Some("k"), &[]);
            lab.proxy.handle_input(lab.now, udp(NAT_B), Bytes::from(r)).expect("sip");
        }
    }
    assert_eq!(lab.proxy.registrar().binding_count(), 1);
}

/// The OPTIONS keepalives in `sent` towards `nat`, one per transaction (retransmissions
/// left out).
fn keepalives_to(sent: &[Transmit], nat: &str) -> Vec<Transmit> {
    let mut v: Vec<Transmit> = sent
        .iter()
        .filter(|t| parse(t).method() == Some(&Method::Options) && t.flow.remote == addr(nat))
        .cloned()
        .collect();
    v.dedup_by_key(|t| parse(t).branch().map(str::to_owned));
    v
}

#[test]
fn a_mapping_that_dies_under_the_keepalives_halves_the_binding_interval() {
    const NAT_B2: &str = "203.0.113.10:40999"; // the same NAT, a new mapping
    let mut lab = Lab::with_keepalive(Keepalive::Options);
    lab.register("bob", NAT_B, "pw-b");
    let sent = lab.advance(Duration::from_secs(31));
    assert_eq!(keepalives_to(&sent, NAT_B).len(), 1, "one keepalive after the 30 s interval");
    // Nobody answers: the mapping is gone. The phone's next REGISTER comes from a new port.
    lab.advance(Duration::from_secs(5));
    lab.register("bob", NAT_B2, "pw-b");
    let sent = lab.advance(Duration::from_secs(16));
    assert_eq!(keepalives_to(&sent, NAT_B2).len(), 1, "kept alive every 15 s now");
    // The learned interval survives a restart with the snapshot.
    let snap = lab.proxy.registrar().snapshot();
    assert_eq!(snap[0].1.keepalive_interval, 15);
}

#[test]
fn a_phone_that_moves_with_answered_keepalives_keeps_its_interval() {
    let mut lab = Lab::with_keepalive(Keepalive::Options);
    lab.register("bob", NAT_B, "pw-b");
    let sent = lab.advance(Duration::from_secs(31));
    for t in keepalives_to(&sent, NAT_B) {
        let r = parse(&t).response(200, "OK", Some("k"), &[]);
        lab.proxy.handle_input(lab.now, udp(NAT_B), Bytes::from(r)).expect("sip");
    }
    lab.register("bob", "198.51.100.200:5060", "pw-b");
    assert_eq!(lab.proxy.registrar().snapshot()[0].1.keepalive_interval, 0, "the configured interval");
}

#[test]
fn transactions_are_cleaned_up_after_a_call() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKn1"));
    let fwd = out[1].clone();
    lab.send(udp(NAT_B), &reply(&fwd, 200, "OK", "b"));
    assert!(lab.proxy.transaction_count() > 0, "the call had transactions to clean up");
    lab.advance(Duration::from_secs(40));
    assert_eq!(lab.proxy.transaction_count(), 0);
}

#[test]
fn oversized_request_gets_513_and_oversized_body_413() {
    let mut lab = Lab::new();
    let big_body = "a".repeat(20000);
    let inv = invite("bob", "z9hG4bKq1")
        .replace("Content-Length: 3\n\nv=0", &format!("Content-Length: {}\n\n{big_body}", big_body.len()));
    let out = lab.send(udp(TRUSTED), &inv);
    assert_eq!(parse(&out[0]).status(), Some(413));
    let huge = "b".repeat(40000);
    let inv = invite("bob", "z9hG4bKq2")
        .replace("Content-Length: 3\n\nv=0", &format!("Content-Length: {}\n\n{huge}", huge.len()));
    let out = lab.send(udp(TRUSTED), &inv);
    assert_eq!(parse(&out[0]).status(), Some(513));
    assert_eq!(parse(&out[0]).reason(), "Message Too Large");
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    const SEED: &str = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKp;rport\r\nMax-Forwards: 70\r\nRoute: <sip:ph00@203.0.113.1;lr>\r\nTo: <sip:bob@example.com>\r\nFrom: \"A\" <sip:a@x>;tag=1\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContact: <sip:a@203.0.113.50>;+sip.instance=\"<urn:uuid:1>\"\r\nContent-Length: 3\r\n\r\nv=0";

    proptest! {
        /// Arbitrary mutations of a valid request never panic the proxy, from a trusted
        /// or an untrusted source, and whatever it sends is itself scannable SIP.
        #[test]
        fn mutated_requests_never_panic(
            cuts in proptest::collection::vec((0usize..400, any::<u8>()), 0..8),
            trusted in any::<bool>(),
        ) {
            let mut bytes = SEED.as_bytes().to_vec();
            for (pos, b) in cuts {
                let p = pos % (bytes.len() + 1);
                match b % 3 {
                    0 if p < bytes.len() => { bytes[p] = b; }
                    1 => bytes.insert(p, b),
                    _ if p < bytes.len() => { bytes.remove(p); }
                    _ => {}
                }
            }
            let mut lab = Lab::new();
            let from = if trusted { TRUSTED } else { "198.51.100.4:5060" };
            let _ = lab.proxy.handle_input(lab.now, udp(from), Bytes::from(bytes));
            for t in lab.drain() {
                prop_assert!(Message::parse(Bytes::from(t.payload)).is_ok());
            }
            lab.advance(Duration::from_secs(60));
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut lab = Lab::new();
            let _ = lab.proxy.handle_input(lab.now, udp(TRUSTED), Bytes::from(data));
            let _ = lab.drain();
        }
    }
}

fn tcp(remote: &str, conn: u64) -> Flow {
    Flow {
        transport: Transport::Tcp,
        local: addr(LOCAL),
        remote: addr(remote),
        conn: Some(crate::transport::ConnId(conn)),
    }
}

#[test]
fn udp_to_tcp_call_gets_double_record_route_and_uses_the_registration_connection() {
    let mut lab = Lab::new();
    let reg = "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/TCP 10.0.0.5:5060;branch=z9hG4bKtcpreg
To: <sip:bob@example.com>
From: <sip:bob@example.com>;tag=r
Call-ID: tcp-reg
CSeq: 1 REGISTER
Contact: <sip:bob@10.0.0.5:5060;transport=tcp>
Content-Length: 0

";
    let out = lab.send(tcp("203.0.113.50:40100", 7), reg);
    assert_eq!(parse(&out[0]).status(), Some(200));
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKdbl"));
    let fwd = &out[1];
    assert_eq!(fwd.flow.transport, Transport::Tcp);
    assert_eq!(fwd.flow.conn, Some(crate::transport::ConnId(7)), "the registration's own connection");
    let m = parse(fwd);
    let rr = m.value_texts(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 2, "{rr:?}");
    assert!(rr[0].ends_with(";transport=tcp;lr>"), "top entry faces the callee: {rr:?}");
    assert!(rr[1].ends_with("@203.0.113.1:5060;lr>"), "second entry faces the caller: {rr:?}");
    assert!(m.value_texts(HeaderName::Via)[0].starts_with("SIP/2.0/TCP 203.0.113.1:5060;branch="));
}

#[test]
fn path_from_an_edge_proxy_becomes_the_route_to_the_binding() {
    let mut lab = Lab::new();
    let reg = "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKpath
Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKphone
Path: <sip:edge@203.0.113.50:5060;lr>
To: <sip:bob@example.com>
From: <sip:bob@example.com>;tag=r
Call-ID: path-reg
CSeq: 1 REGISTER
Contact: <sip:bob@10.0.0.7:5060>
Content-Length: 0

";
    let out = lab.send(udp(TRUSTED), reg);
    let ok = parse(&out[0]);
    assert_eq!(ok.status(), Some(200));
    assert_eq!(ok.value_texts(HeaderName::Path), vec!["<sip:edge@203.0.113.50:5060;lr>"], "Path echoed (RFC 3327)");
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKviapath"));
    let m = parse(&out[1]);
    assert_eq!(out[1].flow.remote, addr(TRUSTED));
    assert_eq!(m.value_texts(HeaderName::Route), vec!["<sip:edge@203.0.113.50:5060;lr>"]);
    assert_eq!(m.request_uri(), Some("sip:bob@10.0.0.7:5060"));
}

#[test]
fn credentials_for_one_user_cannot_register_another_aor() {
    let mut lab = Lab::new();
    let reg = "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsteal1
To: <sip:bob@example.com>
From: <sip:alice@example.com>;tag=r
Call-ID: steal
CSeq: 1 REGISTER
Contact: <sip:mallory@10.0.0.66:5060>
Content-Length: 0

";
    let out = lab.send(udp(NAT_A), reg);
    let challenge = parse(&out[0]);
    let www = challenge.value_texts(HeaderName::Other);
    let md5 = www.iter().find(|h| h.contains("MD5")).expect("MD5 challenge");
    let nonce = md5.split("nonce=\"").nth(1).and_then(|s| s.split('"').next()).expect("nonce");
    let mut c = crate::auth::Credentials {
        username: "alice".into(),
        realm: "example.com".into(),
        nonce: nonce.into(),
        uri: "sip:example.com".into(),
        ..Default::default()
    };
    c.response =
        crate::auth::digest_response(crate::auth::Algorithm::Md5, "alice", "example.com", "pw-a", "REGISTER", &c);
    let authed = reg.replace("z9hG4bKsteal1", "z9hG4bKsteal2").replace("CSeq: 1", "CSeq: 2").replace(
        "Content-Length: 0",
        &format!(
            "Authorization: Digest username=\"alice\", realm=\"example.com\", nonce=\"{nonce}\", uri=\"sip:example.com\", response=\"{}\"\nContent-Length: 0",
            c.response
        ),
    );
    let out = lab.send(udp(NAT_A), &authed);
    let r = parse(&out[0]);
    assert_eq!(r.status(), Some(403));
    assert_eq!(r.reason(), "Forbidden - Credentials Do Not Match AOR");
    assert_eq!(lab.proxy.registrar().binding_count(), 0);
}

/// The credentials line answering `challenge` (MD5, qop=auth) for `method` on `uri`.
fn credentials(challenge: &Transmit, user: &str, password: &str, method: &str, uri: &str, nc: u32) -> String {
    let c = parse(challenge);
    let hname = if c.status() == Some(401) { "Authorization" } else { "Proxy-Authorization" };
    let all = c.value_texts(HeaderName::Other);
    let md5 = all.iter().find(|h| h.contains("MD5")).expect("MD5 challenge");
    let nonce = md5.split("nonce=\"").nth(1).and_then(|s| s.split('"').next()).expect("nonce");
    let challenge = crate::auth::Challenge { realm: "example.com", nonce, algorithm: crate::auth::Algorithm::Md5 };
    let creds = crate::auth::Credentials::answering(&challenge, user, password, method, uri, nc, "c0ffee");
    format!("{hname}: {}", creds.header_value())
}

/// Adds a header line before Content-Length.
fn with_header(msg: &str, line: &str) -> String {
    msg.replacen("Content-Length:", &format!("{line}\nContent-Length:"), 1)
}

const NAT_X: &str = "198.51.100.66:5060"; // the attacker

/// alice (behind NAT_A) calls bob (registered behind NAT_B), answering the 407 as a phone
/// does; bob answers 200. Returns the INVITE bob got and its Record-Route.
fn authenticated_call(lab: &mut Lab, branch: &str) -> (Transmit, String) {
    lab.register("bob", NAT_B, "pw-b");
    let inv = invite("bob", branch).replace("203.0.113.50:5060", "10.0.0.1:5060");
    let out = lab.send(udp(NAT_A), &inv);
    assert_eq!(parse(&out[0]).status(), Some(407));
    let authed = with_header(
        &inv.replace(&format!("branch={branch}"), &format!("branch={branch}b"))
            .replace("CSeq: 1 INVITE", "CSeq: 2 INVITE"),
        &credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1),
    );
    let out = lab.send(udp(NAT_A), &authed);
    assert_eq!(parse(&out[0]).status(), Some(100), "{}", text(&out[0]));
    let fwd = out[1].clone();
    assert_eq!(fwd.flow.remote, addr(NAT_B));
    let rr = parse(&fwd).value_texts(HeaderName::RecordRoute)[0].to_owned();
    let up = lab.send(udp(NAT_B), &reply(&fwd, 200, "OK", "b9"));
    assert_eq!(parse(&up[0]).status(), Some(200));
    (fwd, rr)
}

/// An in-dialog request of the call above, from bob to alice.
fn bye_from_bob(branch: &str, rr: &str, call_id: &str) -> String {
    format!(
        "BYE sip:caller@10.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 10.0.0.2:5060;branch={branch};rport
Route: {rr}
Max-Forwards: 70
From: <sip:bob@example.com>;tag=b9
To: <sip:caller@trunk.example.net>;tag=from1
Call-ID: {call_id}
CSeq: 7 BYE
Content-Length: 0

"
    )
}

#[test]
fn consumed_credentials_are_not_forwarded_to_the_callee() {
    let mut lab = Lab::new();
    let (fwd, _) = authenticated_call(&mut lab, "z9hG4bKcc1");
    assert!(parse(&fwd).value_texts(HeaderName::ProxyAuthorization).is_empty(), "{}", text(&fwd));
    assert!(!text(&fwd).contains("Proxy-Authorization"));
}

#[test]
fn record_route_token_never_authenticates_a_register() {
    let mut lab = Lab::new();
    let (_, rr) = authenticated_call(&mut lab, "z9hG4bKtr1");
    let steal = format!(
        "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 198.51.100.66:5060;branch=z9hG4bKsteal
Route: {rr}
Max-Forwards: 70
To: <sip:alice@example.com>;tag=from1
From: <sip:alice@example.com>;tag=b9
Call-ID: call-z9hG4bKtr1
CSeq: 1 REGISTER
Contact: <sip:mallory@198.51.100.66:5060>
Content-Length: 0

"
    );
    // From the attacker, and even from a flow of the dialog itself.
    for from in [NAT_X, NAT_B] {
        let out = lab.send(udp(from), &steal.replace("z9hG4bKsteal", &format!("z9hG4bKsteal{}", from.len())));
        assert_eq!(out.len(), 1);
        assert_eq!(parse(&out[0]).status(), Some(401), "{}", text(&out[0]));
    }
    assert!(lab.proxy.registrar().lookup("alice@example.com", 1_700_000_000).is_empty());
}

#[test]
fn record_route_token_routes_nothing_for_a_stranger_or_another_call() {
    let mut lab = Lab::new();
    let (_, rr) = authenticated_call(&mut lab, "z9hG4bKtr2");
    // The dialog's own BYE, replayed by a stranger: challenged, not forwarded.
    let out = lab.send(udp(NAT_X), &bye_from_bob("z9hG4bKx1", &rr, "call-z9hG4bKtr2"));
    assert_eq!(out.len(), 1);
    assert_eq!(parse(&out[0]).status(), Some(407));
    assert_eq!(out[0].flow.remote, addr(NAT_X));
    // A new call to an outside address with the token, from the dialog's own flow but
    // another Call-ID: the token is bound to its dialog.
    let toll = bye_from_bob("z9hG4bKx2", &rr, "fraud-1")
        .replace("BYE sip:caller@10.0.0.1:5060", "INVITE sip:+4412345@198.51.100.99")
        .replace("CSeq: 7 BYE", "CSeq: 1 INVITE");
    let out = lab.send(udp(NAT_B), &toll);
    assert_eq!(out.len(), 1);
    assert_eq!(parse(&out[0]).status(), Some(407));
    // A To tag the dialog never had.
    let other = bye_from_bob("z9hG4bKx3", &rr, "call-z9hG4bKtr2").replace("tag=from1", "tag=zzz");
    assert_eq!(parse(&lab.send(udp(NAT_B), &other)[0]).status(), Some(407));
}

#[test]
fn in_dialog_requests_skip_the_challenge_until_the_margin_after_bye() {
    let mut lab = Lab::new();
    let (_, rr) = authenticated_call(&mut lab, "z9hG4bKtr3");
    let out = lab.send(udp(NAT_B), &bye_from_bob("z9hG4bKy1", &rr, "call-z9hG4bKtr3"));
    assert_eq!(out.len(), 1);
    assert_eq!(parse(&out[0]).method(), Some(&Method::Bye));
    assert_eq!(out[0].flow.remote, addr(NAT_A));
    lab.advance(Duration::from_secs(33));
    let late = bye_from_bob("z9hG4bKy2", &rr, "call-z9hG4bKtr3").replace("CSeq: 7", "CSeq: 8");
    let out = lab.send(udp(NAT_B), &late);
    assert_eq!(parse(&out[0]).status(), Some(407), "the dialog is over");
}

#[test]
fn tokens_do_not_vouch_after_a_restart() {
    let mut lab = Lab::new();
    let (_, rr) = authenticated_call(&mut lab, "z9hG4bKtr4");
    let cfg = lab.proxy.config().clone();
    lab.proxy = Proxy::new(cfg, None, lab.now, 1_700_000_100, 2);
    let out = lab.send(udp(NAT_B), &bye_from_bob("z9hG4bKz1", &rr, "call-z9hG4bKtr4"));
    assert_eq!(parse(&out[0]).status(), Some(407));
    // Answering the challenge is enough: the token still routes to alice's NAT mapping.
    lab.register("bob", NAT_B, "pw-b");
    let authed = with_header(
        &bye_from_bob("z9hG4bKz2", &rr, "call-z9hG4bKtr4").replace("CSeq: 7", "CSeq: 8"),
        &credentials(&out[0], "bob", "pw-b", "BYE", "sip:caller@10.0.0.1:5060", 1),
    );
    let out = lab.send(udp(NAT_B), &authed);
    assert_eq!(parse(&out[0]).method(), Some(&Method::Bye), "{}", text(&out[0]));
    assert_eq!(out[0].flow.remote, addr(NAT_A));
}

#[test]
fn challenges_are_stateless_and_never_retransmitted() {
    let mut lab = Lab::new();
    let inv = invite("bob", "z9hG4bKref1");
    let out = lab.send(udp(NAT_X), &inv);
    assert_eq!(out.len(), 1, "one 407, no 100 Trying");
    assert_eq!(parse(&out[0]).status(), Some(407));
    assert_eq!(lab.proxy.transaction_count(), 0);
    assert!(lab.advance(Duration::from_secs(40)).is_empty(), "nothing retransmitted");
    // A flood spoofed from one victim draws back no more than it sent, plus a small allowance.
    let mut sent = 0;
    let mut back = 0;
    for i in 0..200 {
        let inv = invite("bob", &format!("z9hG4bKflood{i}"));
        sent += inv.replace('\n', "\r\n").len();
        back += lab.send(udp(NAT_X), &inv).iter().map(|t| t.payload.len()).sum::<usize>();
    }
    assert!(back <= sent + 4096, "{back} bytes back for {sent}");
}

#[test]
fn captured_invite_credentials_do_not_work_for_another_destination_or_twice() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    let inv = invite("bob", "z9hG4bKcap1");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let ok = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKcap1", "branch=z9hG4bKcap2"), &creds));
    assert_eq!(parse(&ok[1]).method(), Some(&Method::Invite));
    let elsewhere = with_header(
        &inv.replace("branch=z9hG4bKcap1", "branch=z9hG4bKcap3")
            .replace("INVITE sip:bob@example.com", "INVITE sip:+4412345@198.51.100.99"),
        &creds,
    );
    let out = lab.send(udp(NAT_X), &elsewhere);
    assert_eq!(parse(&out[0]).status(), Some(407), "the digest uri must be the Request-URI");
    let again =
        with_header(&inv.replace("branch=z9hG4bKcap1", "branch=z9hG4bKcap4").replace("call-", "other-"), &creds);
    let out = lab.send(udp(NAT_X), &again);
    assert_eq!(parse(&out[0]).status(), Some(407), "a nonce/nc pair is good once");
    assert!(text(&out[0]).contains("stale=true"));
}

#[test]
fn authenticated_strangers_cannot_tell_unknown_from_unregistered_users() {
    let mut lab = Lab::new();
    let mut answers = Vec::new();
    for (i, user) in ["carol", "nobody"].into_iter().enumerate() {
        let inv = invite(user, &format!("z9hG4bKen{i}"));
        let out = lab.send(udp(NAT_A), &inv);
        let creds = credentials(&out[0], "alice", "pw-a", "INVITE", &format!("sip:{user}@example.com"), 1);
        let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKen", "branch=z9hG4bKen2"), &creds));
        let r = parse(&out[1]);
        answers.push((r.status(), r.reason().to_owned()));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].0, Some(480));
}

#[test]
fn our_domain_on_a_port_we_do_not_listen_on_is_somebody_else() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    // Our port (or none): the registrar routes to bob's binding.
    let out = lab.send(
        udp(TRUSTED),
        &invite("bob", "z9hG4bKmy1").replace("sip:bob@example.com SIP", "sip:bob@example.com:5060 SIP"),
    );
    assert_eq!(out[1].flow.remote, addr(NAT_B));
    // Another port: not us; example.com is no IP literal, so it cannot be routed (no DNS).
    let out = lab.send(
        udp(TRUSTED),
        &invite("bob", "z9hG4bKmy2").replace("sip:bob@example.com SIP", "sip:bob@example.com:5090 SIP"),
    );
    let r = parse(&out[1]);
    assert_eq!(r.status(), Some(404), "{}", text(&out[1]));
    assert!(r.reason().contains("Unresolvable"));
}

#[test]
fn an_agents_nat_profile_is_kept_only_with_an_authenticated_register() {
    let mut lab = Lab::new();
    let reg = "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKnp1;rport
Max-Forwards: 70
To: <sip:alice@example.com>
From: <sip:alice@example.com>;tag=np
Call-ID: nat-profile
CSeq: 1 REGISTER
Contact: <sip:alice@10.0.0.2:5060>
Pinhole-NAT: mapping=eim;filtering=apdf;allocation=preserving;window=203.0.113.9:40001
Content-Length: 0

";
    let out = lab.send(udp(NAT_A), reg);
    assert_eq!(parse(&out[0]).status(), Some(401), "no profile without credentials");
    assert_eq!(lab.proxy.registrar().binding_count(), 0);
    let creds = credentials(&out[0], "alice", "pw-a", "REGISTER", "sip:example.com", 1);
    let authed = with_header(&reg.replace("z9hG4bKnp1", "z9hG4bKnp2").replace("CSeq: 1", "CSeq: 2"), &creds);
    assert_eq!(parse(&lab.send(udp(NAT_A), &authed)[0]).status(), Some(200));
    let b = &lab.proxy.registrar().lookup("alice@example.com", 1_700_000_000)[0];
    assert_eq!(
        b.nat_profile.as_deref(),
        Some("mapping=eim;filtering=apdf;allocation=preserving;window=203.0.113.9:40001")
    );
}

/// The plan keys alice's and bob's agents give with their REGISTERs.
const KEY_A: [u8; 32] = [0xaa; 32];
const KEY_B: [u8; 32] = [0xbb; 32];
const PORT_RESTRICTED: &str = "Pinhole-NAT: mapping=eim;filtering=apdf;allocation=preserving;window=203.0.113.9:40001
Pinhole-Key: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SYMMETRIC_SEQ: &str =
    "Pinhole-NAT: mapping=apdm;filtering=apdf;allocation=sequential;delta=1;window=203.0.113.10:40002
Pinhole-Key: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// The body of a message to an agent, after checking it is signed with that agent's key.
fn signed_body(m: &Message, key: &[u8; 32]) -> String {
    let body = std::str::from_utf8(m.body_bytes()).expect("utf8").to_owned();
    assert!(crate::agent::plan_signed(key, m.call_id().expect("call-id"), &body), "signed for its agent:\n{body}");
    body
}

/// alice (port-restricted cone) calls bob (sequential symmetric), both behind agents that
/// reported profiles; returns the events the proxy reported.
fn profiled_call(lab: &mut Lab) -> Vec<ProxyEvent> {
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with("bob", NAT_B, "pw-b", Some(SYMMETRIC_SEQ));
    while lab.proxy.poll_event().is_some() {}
    let inv = invite("bob", "z9hG4bKpp1").replace("203.0.113.50:5060", "10.0.0.1:5060");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKpp1", "branch=z9hG4bKpp2"), &creds));
    assert_eq!(parse(&out[1]).method(), Some(&Method::Invite), "the call goes on regardless");
    std::iter::from_fn(|| lab.proxy.poll_event()).collect()
}

#[test]
fn a_call_between_two_profiled_endpoints_gets_a_punch_plan() {
    let mut lab = Lab::new();
    assert_eq!(
        profiled_call(&mut lab),
        vec![ProxyEvent::PunchPlanned { call_id: "call-z9hG4bKpp1".into(), method: "prediction" }]
    );
}

#[test]
fn each_agent_gets_its_side_of_the_plan_in_the_sdp_of_its_leg() {
    use pinhole_media::punch::sdp::{PlanStart, WirePlan};
    use pinhole_media::punch::Strategy;
    use pinhole_media::relay::Side;
    let mut lab = Lab::new();
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with("bob", NAT_B, "pw-b", Some(SYMMETRIC_SEQ));
    let inv = invite("bob", "z9hG4bKsp1").replace("203.0.113.50:5060", "10.0.0.1:5060");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKsp1", "branch=z9hG4bKsp2"), &creds));
    let fwd = out[1].clone();
    let offer = parse(&fwd);
    assert_eq!(offer.content_length(), Some(Ok(offer.body_bytes().len())));
    let b = WirePlan::from_sdp(&signed_body(&offer, &KEY_B)).expect("bob's plan in the offer");
    assert!(!crate::agent::plan_signed(&KEY_A, "call-z9hG4bKsp1", &signed_body(&offer, &KEY_B)), "for bob only");
    assert_eq!(b.side, Side::B);
    assert_eq!(b.strategy, Strategy::Prediction { symmetric: Side::B, delta: 1, window: 16 });
    assert_eq!(b.windows, [addr("203.0.113.9:40001"), addr("203.0.113.10:40002")]);
    assert_eq!(b.start, PlanStart::AfterAnswer { ms: 200 });
    // bob answers with SDP; alice's side rides on the 200.
    let ok = reply(&fwd, 200, "OK", "b9")
        .replace("Content-Length: 0\n", "Content-Type: application/sdp\nContent-Length: 3\n")
        + "v=0";
    let up = lab.send(udp(NAT_B), &ok);
    let answer = parse(&up[0]);
    let a = WirePlan::from_sdp(&signed_body(&answer, &KEY_A)).expect("alice's plan in the 200");
    assert_eq!(a.side, Side::A);
    assert_eq!(a.strategy, b.strategy);
    assert_eq!(a.credentials.local_ufrag, b.credentials.remote_ufrag);
    assert_eq!(a.credentials.remote_pwd, b.credentials.local_pwd);
    assert!(a.credentials.local_pwd.len() >= 22 && a.credentials.local_ufrag.len() >= 4, "ICE sizes");
    // A retransmitted 200 carries it again (the first may have been lost) ...
    let again = lab.send(udp(NAT_B), &ok);
    assert_eq!(WirePlan::from_sdp(std::str::from_utf8(parse(&again[0]).body_bytes()).expect("utf8")), Some(a));
    // ... until the caller's ACK says it arrived.
    let rr = offer.value_texts(HeaderName::RecordRoute)[0].to_owned();
    let ack = format!("ACK sip:callee@10.0.0.2:5060 SIP/2.0\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKspack\nRoute: {rr}\nMax-Forwards: 70\nFrom: <sip:caller@trunk.example.net>;tag=from1\nTo: <sip:bob@example.com>;tag=b9\nCall-ID: call-z9hG4bKsp1\nCSeq: 2 ACK\nContent-Length: 0\n\n");
    assert_eq!(lab.send(udp(NAT_A), &ack).len(), 1, "the ACK goes on to bob");
    let late = lab.send(udp(NAT_B), &ok);
    assert!(WirePlan::from_sdp(std::str::from_utf8(parse(&late[0]).body_bytes()).expect("utf8")).is_none());
}

#[test]
fn a_late_offer_call_gives_the_callee_its_plan_with_the_ack() {
    use pinhole_media::punch::sdp::WirePlan;
    use pinhole_media::relay::Side;
    let mut lab = Lab::new();
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with("bob", NAT_B, "pw-b", Some(SYMMETRIC_SEQ));
    // No offer in the INVITE: bob's 200 carries it, alice's ACK the answer.
    let inv = invite("bob", "z9hG4bKlo1")
        .replace("203.0.113.50:5060", "10.0.0.1:5060")
        .replace("Content-Type: application/sdp\nContent-Length: 3\n\nv=0", "Content-Length: 0\n\n");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKlo1", "branch=z9hG4bKlo2"), &creds));
    let fwd = out[1].clone();
    let offer = parse(&fwd);
    assert!(offer.body_bytes().is_empty(), "nothing to carry a plan in");
    let ok = reply(&fwd, 200, "OK", "b9")
        .replace("Content-Length: 0\n", "Content-Type: application/sdp\nContent-Length: 3\n")
        + "v=0";
    let up = lab.send(udp(NAT_B), &ok);
    let a = WirePlan::from_sdp(&signed_body(&parse(&up[0]), &KEY_A)).expect("alice's plan");
    assert_eq!(a.side, Side::A);
    let rr = offer.value_texts(HeaderName::RecordRoute)[0].to_owned();
    let ack = format!("ACK sip:callee@10.0.0.2:5060 SIP/2.0\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKloack\nRoute: {rr}\nMax-Forwards: 70\nFrom: <sip:caller@trunk.example.net>;tag=from1\nTo: <sip:bob@example.com>;tag=b9\nCall-ID: call-z9hG4bKlo1\nCSeq: 2 ACK\nContent-Type: application/sdp\nContent-Length: 3\n\nv=0");
    let down = lab.send(udp(NAT_A), &ack);
    assert_eq!(down.len(), 1, "the ACK goes on to bob");
    let b = WirePlan::from_sdp(&signed_body(&parse(&down[0]), &KEY_B)).expect("bob's plan");
    assert_eq!(b.side, Side::B);
    assert_eq!(b.credentials.local_ufrag, a.credentials.remote_ufrag);
    // Retired with the ACK: a retransmitted 200 has no plan any more.
    let late = lab.send(udp(NAT_B), &ok);
    assert!(WirePlan::from_sdp(std::str::from_utf8(parse(&late[0]).body_bytes()).expect("utf8")).is_none());
}

#[test]
fn a_denied_or_relay_only_call_carries_no_plan() {
    let mut lab = Lab::new();
    let mut cfg = lab.proxy.config().clone();
    cfg.punch = PunchPolicy { enabled: false, ..PunchPolicy::default() };
    lab.proxy = Proxy::new(cfg, None, lab.now, 1_700_000_000, 1);
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with("bob", NAT_B, "pw-b", Some(SYMMETRIC_SEQ));
    let inv = invite("bob", "z9hG4bKdp1").replace("203.0.113.50:5060", "10.0.0.1:5060");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKdp1", "branch=z9hG4bKdp2"), &creds));
    assert_eq!(parse(&out[1]).body_bytes(), b"v=0", "the offer passes untouched");
}

#[test]
fn sdp_towards_a_side_behind_an_agent_offers_the_forwarder_with_a_key_for_its_leg() {
    use pinhole_media::punch::sdp::forwarder_offer;
    let mut lab = Lab::new();
    let mut cfg = lab.proxy.config().clone();
    cfg.faketcp_port = Some(4443);
    cfg.punch = PunchPolicy { enabled: false, ..PunchPolicy::default() }; // no direct path: still offered
    let secret = cfg.secret;
    lab.proxy = Proxy::new(cfg, None, lab.now, 1_700_000_000, 1);
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with(
        "bob",
        NAT_B,
        "pw-b",
        Some(&SYMMETRIC_SEQ.replace(SYMMETRIC_SEQ.lines().next().expect("line"), "Pinhole-NAT: udp=blocked")),
    );
    let sdp = |port: u16| format!("v=0\r\nc=IN IP4 10.0.0.1\r\nm=audio {port} RTP/AVP 0\r\n");
    let inv = invite("bob", "z9hG4bKft1")
        .replace("203.0.113.50:5060", "10.0.0.1:5060")
        .replace("Content-Length: 3\n\nv=0", &format!("Content-Length: {}\n\n{}", sdp(4000).len(), sdp(4000)));
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKft1", "branch=z9hG4bKft2"), &creds));
    let fwd = out[1].clone();
    let offer = parse(&fwd);
    let b = forwarder_offer(&signed_body(&offer, &KEY_B)).expect("bob's leg offered");
    assert_eq!(b, (4443, faketcp_key(&secret, "call-z9hG4bKft1", 4000)));
    assert_eq!(offer.content_length(), Some(Ok(offer.body_bytes().len())));
    let ok = reply(&fwd, 200, "OK", "b9").replace(
        "Content-Length: 0\n",
        &format!("Content-Type: application/sdp\nContent-Length: {}\n", sdp(5000).len()),
    ) + &sdp(5000);
    let up = lab.send(udp(NAT_B), &ok);
    let a = forwarder_offer(&signed_body(&parse(&up[0]), &KEY_A)).expect("alice's leg");
    assert_eq!(a, (4443, faketcp_key(&secret, "call-z9hG4bKft1", 5000)));
    assert_ne!(a.1, b.1, "a key is good for its own leg only");
    // Phones registered without an agent get no offer.
    lab.register("carol", "203.0.113.11:40003", "pw-c");
    let inv = invite("carol", "z9hG4bKft3")
        .replace("203.0.113.50:5060", "10.0.0.1:5060")
        .replace("Content-Length: 3\n\nv=0", &format!("Content-Length: {}\n\n{}", sdp(4002).len(), sdp(4002)));
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:carol@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKft3", "branch=z9hG4bKft4"), &creds));
    assert!(forwarder_offer(std::str::from_utf8(parse(&out[1]).body_bytes()).expect("utf8")).is_none());
}

#[test]
fn the_windows_in_a_plan_are_where_the_agents_were_seen_not_what_they_reported() {
    use pinhole_media::punch::sdp::WirePlan;
    let mut lab = Lab::new();
    // bob's agent claims a victim's address as its window.
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with("bob", NAT_B, "pw-b", Some(&SYMMETRIC_SEQ.replace("window=203.0.113.10:", "window=192.0.2.99:")));
    let inv = invite("bob", "z9hG4bKow1").replace("203.0.113.50:5060", "10.0.0.1:5060");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKow1", "branch=z9hG4bKow2"), &creds));
    let b = WirePlan::from_sdp(&signed_body(&parse(&out[1]), &KEY_B)).expect("plan");
    assert_eq!(b.windows, [addr(NAT_A), addr("203.0.113.10:40002")], "the observed address, the reported port");
}

#[test]
fn a_profile_without_a_plan_key_gets_no_plan_and_no_forwarder() {
    let mut lab = Lab::new();
    let mut cfg = lab.proxy.config().clone();
    cfg.faketcp_port = Some(4443);
    lab.proxy = Proxy::new(cfg, None, lab.now, 1_700_000_000, 1);
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with("bob", NAT_B, "pw-b", Some(SYMMETRIC_SEQ.lines().next().expect("line")));
    let inv = invite("bob", "z9hG4bKnk1").replace("203.0.113.50:5060", "10.0.0.1:5060");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKnk1", "branch=z9hG4bKnk2"), &creds));
    assert_eq!(parse(&out[1]).method(), Some(&Method::Invite));
    assert!(!String::from_utf8_lossy(parse(&out[1]).body_bytes()).contains("x-pinhole"), "nothing for bob");
}

#[test]
fn plan_lines_a_caller_planted_in_its_sdp_never_reach_the_callees_agent_signed() {
    use pinhole_media::punch::sdp::WirePlan;
    let mut lab = Lab::new();
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    lab.register_with("bob", NAT_B, "pw-b", Some(SYMMETRIC_SEQ));
    let planted = "v=0\na=x-pinhole-punch:method=birthday;hard=B;sockets=256;probes=1024;side=B;start=answer+0;windows=192.0.2.99:1,192.0.2.99:2\na=x-pinhole-tcp:9 aaaa\n";
    let inv = invite("bob", "z9hG4bKpl1")
        .replace("203.0.113.50:5060", "10.0.0.1:5060")
        .replace("Content-Length: 3\n\nv=0", &format!("Content-Length: {}\n\n{planted}", planted.len()));
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    let out = lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKpl1", "branch=z9hG4bKpl2"), &creds));
    let offer = parse(&out[1]);
    let body = signed_body(&offer, &KEY_B);
    assert!(!body.contains("192.0.2.99") && !body.contains("x-pinhole-tcp"), "{body}");
    assert!(WirePlan::from_sdp(&body).is_some_and(|p| p.windows[0] == addr(NAT_A)), "only the server's own plan");
}

#[test]
fn calls_without_profiles_get_no_plan() {
    let mut lab = Lab::new();
    lab.register("alice", NAT_A, "pw-a");
    lab.register_with("bob", NAT_B, "pw-b", Some(SYMMETRIC_SEQ));
    let inv = invite("bob", "z9hG4bKnp1").replace("203.0.113.50:5060", "10.0.0.1:5060");
    let out = lab.send(udp(NAT_A), &inv);
    let creds = credentials(&out[0], "alice", "pw-a", "INVITE", "sip:bob@example.com", 1);
    lab.send(udp(NAT_A), &with_header(&inv.replace("branch=z9hG4bKnp1", "branch=z9hG4bKnp2"), &creds));
    assert_eq!(lab.proxy.poll_event(), None);
}

#[test]
fn the_punch_policy_denies_by_switch_user_and_network() {
    for policy in [
        PunchPolicy { enabled: false, ..PunchPolicy::default() },
        PunchPolicy { deny_users: vec!["bob".into()], ..PunchPolicy::default() },
        PunchPolicy { deny: vec![Cidr::parse("203.0.113.10/32").expect("cidr")], ..PunchPolicy::default() },
        PunchPolicy { deny: vec![Cidr::parse("10.0.0.0/8").expect("cidr")], ..PunchPolicy::default() },
    ] {
        let mut lab = Lab::new();
        let mut cfg = lab.proxy.config().clone();
        cfg.punch = policy.clone();
        lab.proxy = Proxy::new(cfg, None, lab.now, 1_700_000_000, 1);
        let events = profiled_call(&mut lab);
        assert_eq!(
            events,
            vec![ProxyEvent::PunchPlanned { call_id: "call-z9hG4bKpp1".into(), method: "denied" }],
            "{policy:?}"
        );
    }
}

mod media {
    use super::*;

    const OFFER: &str =
        "v=0\r\no=- 1 1 IN IP4 203.0.113.50\r\ns=-\r\nc=IN IP4 203.0.113.50\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n";
    const ANSWER: &str =
        "v=0\r\no=- 2 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";

    fn invite_sdp(branch: &str) -> String {
        invite("bob", branch).replace(
            "Content-Length: 3\n\nv=0",
            &format!("Content-Length: {}\n\n{}", OFFER.len(), OFFER.replace("\r\n", "\n")),
        )
    }

    fn media_port(m: &Message) -> u16 {
        pinhole_media::sdp::Sdp::parse(m.body_bytes()).expect("sdp").media[0].port
    }

    fn answer_with_sdp(req: &Transmit, code: u16) -> String {
        let r = reply(req, code, "OK", "b9");
        r.replace("Content-Length: 0\n", &format!("Content-Type: application/sdp\nContent-Length: {}\n", ANSWER.len()))
            + &ANSWER.replace("\r\n", "\n")
    }

    #[test]
    fn offer_and_answer_are_anchored_and_bye_releases_the_session() {
        let mut lab = Lab::with_media();
        lab.register("bob", NAT_B, "pw-b");
        let out = lab.send(udp(TRUSTED), &invite_sdp("z9hG4bKm1"));
        let fwd = out[1].clone();
        let m = parse(&fwd);
        assert!(String::from_utf8_lossy(m.body_bytes()).contains("c=IN IP4 203.0.113.1"));
        let offer_port = media_port(&m);
        assert!((30000..30100).contains(&offer_port));
        assert_eq!(m.content_length(), Some(Ok(m.body.len())));
        let up = lab.send(udp(NAT_B), &answer_with_sdp(&fwd, 200));
        let ok = parse(&up[0]);
        let answer_port = media_port(&ok);
        assert_ne!(answer_port, offer_port);
        assert!(String::from_utf8_lossy(ok.body_bytes()).contains("c=IN IP4 203.0.113.1"));
        let cmds: Vec<_> =
            std::iter::from_fn(|| lab.proxy.media_mut().as_mut().and_then(Relay::poll_command)).collect();
        assert!(cmds.len() >= 2, "links and expectations for the data plane");
        assert_eq!(lab.media_usage(), (1, 4));
        let rr = m.value_texts(HeaderName::RecordRoute)[0].to_owned();
        let bye = format!("BYE sip:callee@10.0.0.2:5060 SIP/2.0\nVia: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bKm1bye\nRoute: {rr}\nFrom: <sip:caller@trunk.example.net>;tag=from1\nTo: <sip:bob@example.com>;tag=b9\nCall-ID: call-z9hG4bKm1\nCSeq: 2 BYE\nContent-Length: 0\n\n");
        lab.send(udp(TRUSTED), &bye);
        assert_eq!(lab.media_usage(), (0, 0));
    }

    #[test]
    fn busy_callee_and_cancel_leave_no_zombie_sessions() {
        let mut lab = Lab::with_media();
        lab.register("bob", NAT_B, "pw-b");
        for i in 0..20 {
            let branch = format!("z9hG4bKz{i}");
            let out = lab.send(udp(TRUSTED), &invite_sdp(&branch));
            let fwd = out[1].clone();
            if i % 2 == 0 {
                lab.send(udp(NAT_B), &reply(&fwd, 486, "Busy Here", "b"));
            } else {
                lab.send(udp(NAT_B), &reply(&fwd, 180, "Ringing", "b"));
                let cancel = format!("CANCEL sip:bob@example.com SIP/2.0\nVia: SIP/2.0/UDP 203.0.113.50:5060;branch={branch}\nTo: <sip:bob@example.com>\nFrom: <sip:caller@trunk.example.net>;tag=from1\nCall-ID: call-{branch}\nCSeq: 1 CANCEL\nContent-Length: 0\n\n");
                lab.send(udp(TRUSTED), &cancel);
                lab.send(udp(NAT_B), &reply(&fwd, 487, "Request Terminated", "b"));
            }
        }
        assert_eq!(lab.media_usage(), (0, 0));
    }

    #[test]
    fn unanchorable_offer_gets_488_naming_the_problem() {
        let mut lab = Lab::with_media();
        lab.register("bob", NAT_B, "pw-b");
        let bad = invite("bob", "z9hG4bKbad").replace("Content-Length: 3\n\nv=0", "Content-Length: 7\n\nnot sdp");
        let out = lab.send(udp(TRUSTED), &bad);
        let r = parse(&out[1]);
        assert_eq!(r.status(), Some(488));
        assert!(r.reason().starts_with("Not Acceptable Here - "), "{}", r.reason());
        assert_eq!(lab.media_usage(), (0, 0));
    }

    #[test]
    fn media_timeout_sends_bye_to_both_sides() {
        let mut lab = Lab::with_media();
        lab.register("bob", NAT_B, "pw-b");
        let out = lab.send(udp(TRUSTED), &invite_sdp("z9hG4bKmt"));
        let fwd = out[1].clone();
        lab.send(udp(NAT_B), &answer_with_sdp(&fwd, 200));
        let later = lab.advance(Duration::from_secs(65));
        let mut byes: Vec<_> = later.iter().filter(|t| parse(t).method() == Some(&Method::Bye)).collect();
        // Unanswered BYEs are retransmitted (Timer E); count transactions, not packets.
        byes.sort_by_key(|t| parse(t).branch().map(str::to_owned));
        byes.dedup_by_key(|t| parse(t).branch().map(str::to_owned));
        assert_eq!(byes.len(), 2, "{:?}", later.iter().map(text).collect::<Vec<_>>());
        let mut to: Vec<_> = byes.iter().map(|t| t.flow.remote).collect();
        to.sort();
        let mut want = vec![addr(TRUSTED), addr(NAT_B)];
        want.sort();
        assert_eq!(to, want);
        let to_b = byes.iter().find(|t| t.flow.remote == addr(NAT_B)).expect("bye to b");
        let m = parse(to_b);
        assert_eq!(m.request_uri(), Some("sip:callee@10.0.0.2:5060"));
        assert_eq!(m.tag(HeaderName::To), Some("b9"));
        assert_eq!(m.cseq(), Some((2, Method::Bye)));
        assert_eq!(lab.media_usage(), (0, 0));
    }

    #[test]
    fn media_off_leaves_sdp_untouched() {
        let mut lab = Lab::new();
        lab.register("bob", NAT_B, "pw-b");
        let out = lab.send(udp(TRUSTED), &invite_sdp("z9hG4bKoff"));
        assert_eq!(parse(&out[1]).body_bytes(), OFFER.as_bytes());
    }
}

#[test]
fn a_phone_registered_through_another_node_is_reached_through_that_node_and_never_back() {
    let mut lab = Lab::new();
    lab.register("bob", NAT_B, "pw-b");
    // bob's binding moves to node 2 (he re-registered there): our copy says so.
    let mut b = lab.proxy.registrar().lookup("bob@example.com", 1_700_000_001)[0].clone();
    b.registered_at += 10;
    b.node_addr = Some(addr("203.0.113.2:5060"));
    lab.proxy.registrar_mut().set_remote("bob@example.com", "edge-2", vec![b], 1_700_000_001);
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKn1"));
    let fwd = &out[1];
    assert_eq!(fwd.flow.remote, addr("203.0.113.2:5060"), "to the node holding bob's flow");
    assert!(text(fwd).starts_with("INVITE sip:bob@example.com SIP/2.0"), "addressed to the AOR:\n{}", text(fwd));
    // A request that comes from the node holding the flow would go back there: refused.
    let mut b = lab.proxy.registrar().lookup("bob@example.com", 1_700_000_001)[0].clone();
    b.node_addr = Some(addr(TRUSTED));
    lab.proxy.registrar_mut().set_remote("bob@example.com", "edge-2", vec![b], 1_700_000_001);
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKn2"));
    let statuses: Vec<Option<u16>> = out.iter().map(|t| parse(t).status()).collect();
    assert_eq!(statuses, vec![Some(100), Some(480)], "no request goes back to its node");
}

#[test]
fn in_a_cluster_a_call_for_a_user_unknown_here_waits_for_the_store_and_reaches_the_other_node() {
    let mut lab = Lab::new();
    lab.proxy.enable_read_through();
    // bob registered through node 2 a moment ago: no copy here yet.
    let out = lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKrt1"));
    let statuses: Vec<Option<u16>> = out.iter().map(|t| parse(t).status()).collect();
    assert_eq!(statuses, vec![Some(100)], "no 480 while the store is asked");
    assert_eq!(lab.proxy.poll_lookup().as_deref(), Some("bob@example.com"));
    assert_eq!(lab.proxy.parked(), 1);
    // A retransmission waits with it, and asks nothing more.
    assert!(lab.send(udp(TRUSTED), &invite("bob", "z9hG4bKrt1")).iter().all(|t| parse(t).status() != Some(480)));
    assert_eq!(lab.proxy.poll_lookup(), None);
    // The store answers: bob is on node 2.
    lab.register("bob", NAT_B, "pw-b");
    let mut b = lab.proxy.registrar().lookup("bob@example.com", 1_700_000_001)[0].clone();
    lab.proxy.registrar_mut().remove("bob@example.com", &b.contact.clone());
    b.node_addr = Some(addr("203.0.113.2:5060"));
    lab.proxy.handle_lookup(lab.now, "bob@example.com", vec![("edge-2".into(), vec![b])]);
    let sent: Vec<Transmit> = std::iter::from_fn(|| lab.proxy.poll_transmit()).collect();
    assert!(
        sent.iter().any(|t| t.flow.remote == addr("203.0.113.2:5060") && parse(t).method() == Some(&Method::Invite)),
        "the waiting INVITE went to node 2"
    );
    assert_eq!(lab.proxy.parked(), 0);
}

#[test]
fn a_lookup_the_store_never_answers_is_answered_from_what_there_is_and_parking_is_bounded() {
    let mut lab = Lab::new();
    lab.proxy.enable_read_through();
    let out = lab.send(udp(TRUSTED), &invite("nobody", "z9hG4bKrt2"));
    assert_eq!(out.len(), 1, "only 100 Trying");
    let late = lab.advance(Duration::from_millis(299));
    assert!(late.iter().all(|t| !matches!(parse(t).status(), Some(404 | 480))), "still waiting");
    let out = lab.advance(Duration::from_millis(2));
    assert!(
        out.iter().any(|t| parse(t).status() == Some(404)),
        "answered from what there is (a trusted caller learns 404)"
    );
    assert_eq!(lab.proxy.parked(), 0);
    // Past the per-AOR cap, requests are answered at once.
    for i in 0..20 {
        lab.send(udp(TRUSTED), &invite("carol", &format!("z9hG4bKcap{i}")));
    }
    assert_eq!(lab.proxy.parked(), 16);
    // Without a cluster nothing waits.
    let mut solo = Lab::new();
    let out = solo.send(udp(TRUSTED), &invite("nobody", "z9hG4bKrt3"));
    assert!(out.iter().any(|t| parse(t).status() == Some(404)));
}

/// An agent at 198.51.100.2, and a lab in which bob registered through it (behind NAT B,
/// with the agent's plan key).
fn agent_registering_bob() -> (crate::agent::Agent<Option<Relay>>, Lab) {
    use crate::agent::{key_to_header, Agent, AgentConfig};
    let agent: Agent<Option<Relay>> = Agent::new(
        AgentConfig { listen: addr("198.51.100.2:5060"), server: addr(LOCAL), max_message: 16384, secret: [7; 32] },
        None,
    );
    let key = format!("Pinhole-Key: {}", key_to_header(&agent.plan_key()));
    let mut lab = Lab::new();
    lab.register_with("bob", NAT_B, "pw-b", Some(&format!("{}\n{key}", SYMMETRIC_SEQ.lines().next().expect("nat"))));
    (agent, lab)
}

#[test]
fn an_agents_signed_profile_update_reaches_its_bindings_and_nobody_elses() {
    use crate::agent::Agent;
    let (mut agent, mut lab) = agent_registering_bob();
    lab.register_with("alice", NAT_A, "pw-a", Some(PORT_RESTRICTED));
    let profile = |lab: &Lab, user: &str| {
        lab.proxy.registrar().lookup(&format!("{user}@example.com"), 1_700_000_001)[0].nat_profile.clone()
    };
    let before_alice = profile(&lab, "alice");
    // The agent's NAT rebooted: a new public address.
    let fresh = "mapping=eim;filtering=apdf;allocation=preserving;window=203.0.113.77:40001";
    agent.set_profile(fresh.into());
    let push = |agent: &mut Agent<Option<Relay>>, unix: u64| {
        agent.push_profile(unix);
        String::from_utf8(agent.poll_transmit().expect("an update").payload).expect("utf8").replace("\r\n", "\n")
    };
    let update = push(&mut agent, 1_700_000_001);
    // From another flow: refused, nothing changes.
    let out = lab.send(udp(NAT_X), &update);
    assert_eq!(parse(&out[0]).status(), Some(403));
    assert_ne!(profile(&lab, "bob").as_deref(), Some(fresh));
    lab.advance(Duration::from_secs(1));
    // From the agent's flow: bob's binding takes it; alice (another agent) keeps hers.
    let out = lab.send(udp(NAT_B), &update);
    assert_eq!(parse(&out[0]).status(), Some(200), "{}", text(&out[0]));
    assert!(text(&out[0]).contains("Pinhole-Updated: 1"));
    assert_eq!(profile(&lab, "bob").as_deref(), Some(fresh));
    assert_eq!(profile(&lab, "alice"), before_alice);
    // The answer is the agent's own: taken, not forwarded.
    agent.handle_input(lab.now, from_server(), Bytes::from(out[0].payload.clone())).expect("SIP");
    assert_eq!(agent.take_profile_answers(), vec![200]);
    assert!(agent.poll_transmit().is_none());
    lab.advance(Duration::from_secs(1));
    // Replayed, or signed with another key: refused.
    assert_eq!(parse(&lab.send(udp(NAT_B), &update)[0]).status(), Some(403), "a replay");
    lab.advance(Duration::from_secs(1));
    let forged = push(&mut agent, 1_700_000_004).replace("window=203.0.113.77", "window=192.0.2.66");
    assert_eq!(parse(&lab.send(udp(NAT_B), &forged)[0]).status(), Some(403), "the signature covers the profile");
    // Too often from one source: refused before any binding is looked at.
    let next = push(&mut agent, 1_700_000_005);
    assert_eq!(parse(&lab.send(udp(NAT_B), &next)[0]).status(), Some(503));
}

#[test]
fn an_agents_signed_quality_report_is_taken_from_its_own_flow_only_and_once() {
    use crate::agent::{Agent, AgentQuality};
    let (mut agent, mut lab) = agent_registering_bob();
    let q = AgentQuality {
        call_id: "direct-1@198.51.100.2".into(),
        mos: 3.91,
        loss_pct: 5.0,
        jitter_ms: 2.5,
        rtt_ms: Some(40.0),
        expected: 500,
        lost: 25,
    };
    let report = |agent: &mut Agent<Option<Relay>>, unix: u64| {
        agent.report_quality(unix, &q);
        String::from_utf8(agent.poll_transmit().expect("a report").payload).expect("utf8").replace("\r\n", "\n")
    };
    let r = report(&mut agent, 1_700_000_001);
    // From another flow: refused, nothing reported.
    assert_eq!(parse(&lab.send(udp(NAT_X), &r)[0]).status(), Some(403));
    assert_eq!(lab.proxy.poll_event(), None);
    // From the agent's flow: taken, with its figures.
    let out = lab.send(udp(NAT_B), &r);
    assert_eq!(parse(&out[0]).status(), Some(200), "{}", text(&out[0]));
    assert_eq!(lab.proxy.poll_event(), Some(ProxyEvent::AgentQuality { agent: addr(NAT_B), report: q.clone() }));
    // The answer is the agent's own: taken, not forwarded.
    agent.handle_input(lab.now, from_server(), Bytes::from(out[0].payload.clone())).expect("SIP");
    assert_eq!(agent.take_profile_answers(), vec![200]);
    // Replayed, or with figures changed after signing: refused.
    assert_eq!(parse(&lab.send(udp(NAT_B), &r)[0]).status(), Some(403), "a replay");
    let forged = report(&mut agent, 1_700_000_001).replace("mos=3.91", "mos=4.40");
    assert_eq!(parse(&lab.send(udp(NAT_B), &forged)[0]).status(), Some(403), "the signature covers the figures");
    // A second report within the same second is its own (times are in milliseconds).
    let next = report(&mut agent, 1_700_000_001);
    assert_eq!(parse(&lab.send(udp(NAT_B), &next)[0]).status(), Some(200));
    // Nonsense figures are malformed, whoever signed them.
    let bad = next.replace("mos=3.91", "mos=9.00");
    assert_eq!(parse(&lab.send(udp(NAT_B), &bad)[0]).status(), Some(400));
    assert!(lab.proxy.poll_event().is_some() && lab.proxy.poll_event().is_none());
}

#[test]
fn a_quality_header_reads_back_what_was_written_and_refuses_what_is_not_a_report() {
    use crate::agent::AgentQuality;
    let q = AgentQuality {
        call_id: "a@b".into(),
        mos: 4.4,
        loss_pct: 0.0,
        jitter_ms: 0.5,
        rtt_ms: None,
        expected: 300,
        lost: 0,
    };
    assert_eq!(AgentQuality::parse_header(&q.to_header()), Some(q.clone()));
    for bad in [
        "",
        "a@b",
        "a@b;mos=4.40;loss=0.00;jitter=0.5;rtt=-;expected=300",
        "a@b;mos=4.40;loss=0.00;jitter=0.5;rtt=-;expected=300;lost=301",
        "a@b;mos=4.40;loss=101;jitter=0.5;rtt=-;expected=300;lost=0",
        "a@b;mos=NaN;loss=0;jitter=0.5;rtt=-;expected=300;lost=0",
        "a b;mos=4.40;loss=0.00;jitter=0.5;rtt=-;expected=300;lost=0",
        "a@b;mos=4.40;loss=0.00;jitter=-1;rtt=-;expected=300;lost=0",
        "a@b;mos=4.40;loss=0.00;jitter=0.5;rtt=-;expected=300;lost=0;extra=1",
    ] {
        assert_eq!(AgentQuality::parse_header(bad), None, "{bad}");
    }
    assert_eq!(AgentQuality::parse_header(&"x".repeat(600)), None);
}

fn from_server() -> Flow {
    Flow { transport: Transport::Udp, local: addr("198.51.100.2:5060"), remote: addr(LOCAL), conn: None }
}
