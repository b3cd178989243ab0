//! Trunk calls through the proxy in virtual time: a phone and two carriers are byte strings
//! on flows, media anchored on a real relay core.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pinhole_media::anchor::{MediaAnchor, SdpIn, Unanchored};
use pinhole_media::relay::{Relay, RelayConfig};

use crate::auth::{digest_response, Algorithm, Credentials};
use crate::b2bua::{B2buaConfig, Route, Trunk, DEFAULT_COPY_HEADERS};
use crate::message::{HeaderName, Message};
use crate::proxy::{Cidr, Interface, Keepalive, Proxy, ProxyConfig};
use crate::registrar::RegistrarConfig;
use crate::transport::{Flow, Transmit, Transport};

const LOCAL: &str = "203.0.113.1:5060";
/// The phone, in `auth.trusted` (its own address behind a NAT: 10.0.0.2).
const PHONE: &str = "203.0.113.50:5062";
/// alice's phone somewhere else: not trusted, so it authenticates.
const ROAMING: &str = "198.51.100.7:5062";
const CARRIER1: &str = "192.0.2.10:5080";
const CARRIER2: &str = "192.0.2.20:5080";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn udp(remote: &str) -> Flow {
    Flow { transport: Transport::Udp, local: addr(LOCAL), remote: addr(remote), conn: None }
}

fn trunk(name: &str, at: &str, max_calls: usize) -> Trunk {
    let dids = if name == "carrier1" { vec![("15551230001".to_owned(), "alice".to_owned())] } else { vec![] };
    Trunk {
        name: name.into(),
        transport: Transport::Udp,
        address: addr(at),
        username: format!("acct-{name}"),
        password: "trunk-secret".into(),
        register: false,
        max_calls,
        dids,
        options_interval: 0,
        register_expires: 600,
        inbound_auth: false,
    }
}

/// The relay core; with `defer` on, a model of a remote relay fleet as well: each SDP it
/// has not been asked for waits ([`Unanchored::Waiting`]) until the test lets the relay's
/// answers come ([`Lab::relay_answers`]), then anchors on the core.
struct Anchor {
    relay: Option<Relay>,
    defer: bool,
    asked: Vec<(String, String, Vec<u8>)>,
    answered: Vec<(String, String, Vec<u8>)>,
    ready: Vec<String>,
}

impl Anchor {
    fn on(relay: Relay) -> Anchor {
        Anchor { relay: Some(relay), defer: false, asked: vec![], answered: vec![], ready: vec![] }
    }
}

impl MediaAnchor for Anchor {
    fn anchoring(&self) -> bool {
        true
    }

    fn anchor_sdp(&mut self, now: Instant, s: &SdpIn<'_>) -> Result<Vec<u8>, Unanchored> {
        let key = (s.call_id.to_owned(), s.sender_tag.to_owned(), s.sdp.to_vec());
        if self.defer && !self.answered.contains(&key) {
            if !self.asked.contains(&key) {
                self.asked.push(key);
            }
            return Err(Unanchored::Waiting);
        }
        self.relay.anchor_sdp(now, s)
    }

    fn poll_ready(&mut self) -> Option<String> {
        self.ready.pop()
    }

    fn release(&mut self, call_id: &str) -> bool {
        self.relay.release(call_id)
    }

    fn anchors(&self, call_id: &str) -> bool {
        self.relay.anchors(call_id)
    }

    fn counts(&self, call_id: &str) -> Option<(u64, u64)> {
        self.relay.counts(call_id)
    }
}

struct Lab {
    proxy: Proxy<Anchor>,
    now: Instant,
    calls: u32,
}

impl Lab {
    fn new(max_calls: usize) -> Lab {
        Lab::with(max_calls, |_| {})
    }

    /// A lab whose trunks `edit` changes first.
    fn with(max_calls: usize, edit: impl FnOnce(&mut B2buaConfig)) -> Lab {
        let now = Instant::now();
        let mut b2bua = B2buaConfig {
            trunks: vec![trunk("carrier1", CARRIER1, max_calls), trunk("carrier2", CARRIER2, max_calls)],
            routes: vec![Route {
                pattern: regex::Regex::new(r"^\+?1?555\d{7}$").expect("re"),
                trunks: vec![0, 1],
                record: false,
            }],
            copy_headers: DEFAULT_COPY_HEADERS.iter().map(|h| (*h).to_owned()).collect(),
            session_expires: Duration::from_secs(1800),
            ring_timeout: Duration::from_secs(120),
            caller_ids: vec![("alice".into(), "+14155550123".into())],
        };
        edit(&mut b2bua);
        let cfg = ProxyConfig {
            domain: "example.com".into(),
            interfaces: vec![Interface {
                transport: Transport::Udp,
                bind: addr(LOCAL),
                advertise: "203.0.113.1".into(),
            }],
            realm: "example.com".into(),
            users: vec![("alice".into(), "pw-a".into())],
            auth_algorithms: vec![Algorithm::Md5],
            trusted: vec![Cidr::parse("203.0.113.50/32").expect("cidr")],
            registrar: RegistrarConfig { default_expires: 3600, min_expires: 60, max_expires: 7200 },
            keepalive: Keepalive::Off,
            keepalive_interval: Duration::from_secs(30),
            keepalive_min: Duration::from_secs(5),
            max_body: 16384,
            max_message: 32768,
            secret: [9; 32],
            punch: Default::default(),
            faketcp_port: None,
            record_users: Vec::new(),
            b2bua,
        };
        let relay = Relay::new(
            RelayConfig { max_sessions: 100, ..RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099) },
            now,
        );
        Lab { proxy: Proxy::new(cfg, Anchor::on(relay), now, 1_700_000_000, 1), now, calls: 0 }
    }

    /// The (modelled) remote relay answers everything it was asked: the messages waiting
    /// for it go on. Returns what they sent.
    fn relay_answers(&mut self) -> Vec<Transmit> {
        let anchor = self.proxy.media_mut();
        assert!(!anchor.asked.is_empty(), "nothing was waiting for the relay");
        for key in std::mem::take(&mut anchor.asked) {
            anchor.ready.push(key.0.clone());
            anchor.answered.push(key);
        }
        self.proxy.resume_media(self.now);
        std::iter::from_fn(|| self.proxy.poll_transmit()).collect()
    }

    fn relay(&self) -> Option<&Relay> {
        self.proxy.media().relay.as_ref()
    }

    /// Moves virtual time on, firing the proxy's and the relay's timers as the node does.
    fn advance(&mut self, d: Duration) -> Vec<Transmit> {
        let end = self.now + d;
        let mut out = Vec::new();
        loop {
            let relay = self.relay().and_then(Relay::poll_timeout);
            let proxy = self.proxy.poll_timeout().map(|(t, _)| t);
            let Some(t) = [relay, proxy].into_iter().flatten().min().filter(|t| *t <= end) else { break };
            self.now = t.max(self.now);
            let mut ended = Vec::new();
            if let Some(r) = self.proxy.media_mut().relay.as_mut() {
                r.handle_timeout(self.now);
                while let Some(pinhole_media::relay::Event::Ended { call_id, .. }) = r.poll_event() {
                    ended.push(call_id);
                }
            }
            for call_id in ended {
                self.proxy.media_call_ended(self.now, &call_id);
            }
            self.proxy.handle_timeout(self.now);
            out.extend(std::iter::from_fn(|| self.proxy.poll_transmit()));
        }
        self.now = end;
        out
    }

    /// The phone dials `number`; returns everything sent.
    fn dial(&mut self, number: &str) -> Vec<Transmit> {
        self.dial_uri(&format!("sip:{number}@example.com"), "")
    }

    /// The phone sends an INVITE for `uri`, with `extra` header lines (each ending in \n).
    fn dial_uri(&mut self, uri: &str, extra: &str) -> Vec<Transmit> {
        self.dial_from(PHONE, uri, extra)
    }

    /// alice, from an untrusted address, dials `number` and answers the challenge; `extra`
    /// header lines (each ending in \n) go in both INVITEs.
    fn dial_authenticated(&mut self, number: &str, extra: &str) -> Vec<Transmit> {
        let uri = format!("sip:{number}@example.com");
        let out = self.dial_from(ROAMING, &uri, extra);
        let challenge = one(&out, ROAMING, "407");
        let all = challenge.value_texts(HeaderName::Other);
        let md5 = all.iter().find(|h| h.contains("MD5")).expect("MD5 challenge");
        let nonce = md5.split("nonce=\"").nth(1).and_then(|s| s.split('"').next()).expect("nonce");
        let c = crate::auth::Challenge { realm: "example.com", nonce, algorithm: Algorithm::Md5 };
        let creds = Credentials::answering(&c, "alice", "pw-a", "INVITE", &uri, 1, "c0ffee");
        self.dial_from(ROAMING, &uri, &format!("{extra}Proxy-Authorization: {}\n", creds.header_value()))
    }

    /// An INVITE for `uri` from `from`.
    fn dial_from(&mut self, from: &str, uri: &str, extra: &str) -> Vec<Transmit> {
        self.calls += 1;
        let n = self.calls;
        let number = uri.trim_start_matches("sip:").split('@').next().unwrap_or("");
        let sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
        let invite = format!(
            "INVITE {uri} SIP/2.0
{extra}Via: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKphone{n};rport
Max-Forwards: 70
From: \"Alice\" <sip:alice@example.com>;tag=phonetag{n}
To: <sip:{number}@example.com>
Call-ID: phone-call-{n}@10.0.0.2
CSeq: 1 INVITE
Contact: <sip:alice@10.0.0.2:5062>
User-Agent: Secret-Phone/1.0 (internal build 10.0.0.2)
X-Internal-Billing: dept-42
Supported: replaces, 100rel, timer
Content-Type: application/sdp
Content-Length: {}

",
            sdp.len()
        )
        .replace('\n', "\r\n");
        let data = Bytes::from(invite + sdp);
        self.proxy.handle_input(self.now, udp(from), data).expect("SIP");
        std::iter::from_fn(|| self.proxy.poll_transmit()).collect()
    }
}

fn to(out: &[Transmit], remote: &str) -> Vec<Message> {
    out.iter()
        .filter(|t| t.flow.remote == addr(remote))
        .map(|t| Message::parse(Bytes::from(t.payload.clone())).expect("we send SIP"))
        .collect()
}

fn one(out: &[Transmit], remote: &str, what: &str) -> Message {
    let msgs = to(out, remote);
    let found: Vec<&Message> = msgs
        .iter()
        .filter(|m| {
            m.status().map(|c| c.to_string()).as_deref() == Some(what) || m.method().map(|x| x.as_str()) == Some(what)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {what} to {remote} in {:?}",
        msgs.iter().map(|m| m.text(m.start_line_range())).collect::<Vec<_>>()
    );
    found[0].clone()
}

/// The one request `what` sent to `remote`, retransmitted or not (all copies one branch).
fn sent(out: &[Transmit], remote: &str, what: &str) -> Message {
    let msgs: Vec<Message> =
        to(out, remote).into_iter().filter(|m| m.method().map(|x| x.as_str()) == Some(what)).collect();
    assert!(!msgs.is_empty(), "no {what} to {remote}");
    assert!(msgs.iter().all(|m| m.branch() == msgs[0].branch()), "one transaction");
    msgs[0].clone()
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.raw()).into_owned()
}

/// A response of the carrier at `carrier` to `req`, with `extra` headers and an SDP when
/// `sdp`.
fn reply(req: &Message, code: u16, reason: &str, tag: &str, extra: &[&str], sdp: bool) -> String {
    let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    extra.push("Contact: <sip:gw@192.0.2.99:5080>".into());
    let raw = req.response(code, reason, Some(tag), &extra);
    let mut s = String::from_utf8(raw).expect("utf8");
    if sdp {
        let body =
            "v=0\r\no=- 2 2 IN IP4 192.0.2.99\r\ns=-\r\nc=IN IP4 192.0.2.99\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n";
        s = s.replace(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        );
    }
    s
}

fn send_raw(lab: &mut Lab, from: &str, text: String) -> Vec<Transmit> {
    let data = Bytes::from(text);
    lab.proxy.handle_input(lab.now, udp(from), data).expect("SIP");
    std::iter::from_fn(|| lab.proxy.poll_transmit()).collect()
}

#[test]
fn a_routed_call_reaches_the_carrier_with_only_pinhole_visible_and_its_challenge_answered() {
    let mut lab = Lab::new(10);
    let out = lab.dial("15551230001");
    assert_eq!(one(&out, PHONE, "100").status(), Some(100));
    let invite = one(&out, CARRIER1, "INVITE");
    let t = text(&invite);
    for leak in ["10.0.0.2", "203.0.113.50", "phone-call-1", "phonetag1", "Secret-Phone", "X-Internal"] {
        assert!(!t.contains(leak), "{leak} leaked to the carrier:\n{t}");
    }
    assert!(t.starts_with("INVITE sip:15551230001@192.0.2.10:5080 SIP/2.0\r\n"), "{t}");
    assert!(t.contains("Via: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKpb"), "{t}");
    assert!(t.contains("From: <sip:alice@203.0.113.1>;tag=pb"), "{t}");
    assert!(t.contains("Contact: <sip:203.0.113.1:5060>"), "{t}");
    assert!(t.contains("Supported: replaces, timer, 100rel"), "ours on this leg:\n{t}");
    assert!(t.contains("c=IN IP4 203.0.113.1"), "SDP anchored on the relay:\n{t}");
    // The carrier challenges; pinhole acknowledges and answers with the trunk's account.
    let out = send_raw(
        &mut lab,
        CARRIER1,
        reply(
            &invite,
            407,
            "Proxy Authentication Required",
            "c1",
            &["Proxy-Authenticate: Digest realm=\"carrier\", nonce=\"n0nce\", qop=\"auth\""],
            false,
        ),
    );
    let ack = one(&out, CARRIER1, "ACK");
    assert_eq!(ack.branch(), invite.branch(), "the ACK of a non-2xx is in its transaction");
    let again = one(&out, CARRIER1, "INVITE");
    assert_eq!(again.cseq().map(|c| c.0), Some(2));
    assert_eq!(again.call_id(), invite.call_id());
    let auth = again.header(HeaderName::ProxyAuthorization).expect("credentials");
    let creds = Credentials::parse(auth).expect("parses");
    assert_eq!((creds.username.as_str(), creds.realm.as_str()), ("acct-carrier1", "carrier"));
    let expected = digest_response(Algorithm::Md5, "acct-carrier1", "carrier", "trunk-secret", "INVITE", &creds);
    assert_eq!(creds.response, expected, "a digest the carrier can check");
    assert!(to(&out, PHONE).is_empty(), "the phone saw nothing of it");
    // Ringing, then the answer.
    let out = send_raw(&mut lab, CARRIER1, reply(&again, 180, "Ringing", "c1", &[], false));
    let ringing = one(&out, PHONE, "180");
    let a_tag = ringing.tag(HeaderName::To).expect("our tag").to_owned();
    assert_eq!(ringing.call_id(), Some("phone-call-1@10.0.0.2"), "the phone's own dialog");
    let out =
        send_raw(&mut lab, CARRIER1, reply(&again, 200, "OK", "c1", &["Record-Route: <sip:edge.carrier;lr>"], true));
    let ack = one(&out, CARRIER1, "ACK");
    let ack_text = text(&ack);
    assert!(ack_text.starts_with("ACK sip:gw@192.0.2.99:5080 SIP/2.0"), "{ack_text}");
    assert!(ack_text.contains("Route: <sip:edge.carrier;lr>") && ack_text.contains("CSeq: 2 ACK"), "{ack_text}");
    assert!(!ack_text.contains("10.0.0.2"));
    let ok = one(&out, PHONE, "200");
    let ok_text = text(&ok);
    assert_eq!(ok.tag(HeaderName::To), Some(a_tag.as_str()));
    assert!(ok_text.contains("c=IN IP4 203.0.113.1") && !ok_text.contains("192.0.2.99"), "{ok_text}");
    // The phone's ACK stops the 2xx; then the phone hangs up.
    let ack = format!(
        "ACK sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKack1\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=phonetag1\r\nTo: <sip:15551230001@example.com>;tag={a_tag}\r\nCall-ID: phone-call-1@10.0.0.2\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    );
    assert!(send_raw(&mut lab, PHONE, ack).is_empty());
    assert!(to(&lab.advance(Duration::from_secs(2)), PHONE).is_empty(), "no 2xx retransmission after the ACK");
    assert_eq!(lab.relay().map(Relay::call_count), Some(1));
    let bye = format!(
        "BYE sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKbye1\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=phonetag1\r\nTo: <sip:15551230001@example.com>;tag={a_tag}\r\nCall-ID: phone-call-1@10.0.0.2\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    let out = send_raw(&mut lab, PHONE, bye);
    assert_eq!(one(&out, PHONE, "200").status(), Some(200));
    let bye_b = one(&out, CARRIER1, "BYE");
    let bye_text = text(&bye_b);
    assert!(
        bye_text.contains(&format!("Call-ID: {}", invite.call_id().unwrap_or(""))) && bye_text.contains("CSeq: 3 BYE"),
        "{bye_text}"
    );
    assert!(bye_text.contains("tag=c1") && !bye_text.contains("phonetag"), "{bye_text}");
    assert_eq!(lab.relay().map(Relay::call_count), Some(0), "media released");
    let record = lab.proxy.poll_call_record().expect("a call record");
    assert_eq!(
        (record.caller.as_str(), record.callee.as_str(), record.trunk.as_str()),
        ("alice", "15551230001", "carrier1")
    );
    assert_eq!((record.hangup, record.code), ("caller", 200));
    assert!(record.answer_ms.is_some());
}

#[test]
fn a_carrier_503_fails_over_to_the_next_trunk_and_the_phone_hears_one_ringing() {
    let mut lab = Lab::new(10);
    let out = lab.dial("15551230002");
    let first = one(&out, CARRIER1, "INVITE");
    let out = send_raw(&mut lab, CARRIER1, reply(&first, 180, "Ringing", "c1", &[], false));
    one(&out, PHONE, "180");
    let out = send_raw(&mut lab, CARRIER1, reply(&first, 503, "Service Unavailable", "c1", &[], false));
    one(&out, CARRIER1, "ACK");
    let second = one(&out, CARRIER2, "INVITE");
    assert!(to(&out, PHONE).is_empty(), "the failover is not the phone's business");
    let out = send_raw(&mut lab, CARRIER2, reply(&second, 180, "Ringing", "c2", &[], false));
    assert!(to(&out, PHONE).is_empty(), "no second ringing");
    let out = send_raw(&mut lab, CARRIER2, reply(&second, 200, "OK", "c2", &[], true));
    one(&out, CARRIER2, "ACK");
    one(&out, PHONE, "200");
    assert_eq!(lab.proxy.b2bua().stats.failovers, 1);
    assert_eq!(lab.proxy.b2bua().active_calls().collect::<Vec<_>>(), vec![("carrier1", 0), ("carrier2", 1)]);
}

#[test]
fn a_call_over_the_trunks_limits_gets_503_and_a_second_challenge_gets_403() {
    let mut lab = Lab::new(1);
    let out = lab.dial("15551230003");
    let first = one(&out, CARRIER1, "INVITE");
    let out = lab.dial("15551230004");
    one(&out, CARRIER2, "INVITE");
    let out = lab.dial("15551230005");
    let refused = one(&out, PHONE, "503");
    assert!(refused.reason().contains("Trunks"), "{}", refused.reason());
    // A trunk that challenges twice: the call fails with 403, and nothing is left.
    let challenge = ["Proxy-Authenticate: Digest realm=\"c\", nonce=\"n1\", algorithm=SHA-256, qop=\"auth\""];
    let out =
        send_raw(&mut lab, CARRIER1, reply(&first, 407, "Proxy Authentication Required", "c1", &challenge, false));
    let retry = one(&out, CARRIER1, "INVITE");
    assert!(retry.header(HeaderName::ProxyAuthorization).is_some_and(|v| v.contains("algorithm=SHA-256")));
    let out =
        send_raw(&mut lab, CARRIER1, reply(&retry, 407, "Proxy Authentication Required", "c1", &challenge, false));
    assert_eq!(one(&out, PHONE, "403").status(), Some(403));
    assert_eq!(lab.proxy.b2bua().active_calls().map(|(_, n)| n).sum::<usize>(), 1);
}

#[test]
fn a_cancel_crossing_the_carriers_answer_ends_with_a_bye_and_nothing_left_behind() {
    let mut lab = Lab::new(10);
    let out = lab.dial("15551230006");
    let invite = one(&out, CARRIER1, "INVITE");
    let out = send_raw(&mut lab, CARRIER1, reply(&invite, 180, "Ringing", "c1", &[], false));
    one(&out, PHONE, "180");
    let cancel = "CANCEL sip:15551230006@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKphone1;rport\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=phonetag1\r\nTo: <sip:15551230006@example.com>\r\nCall-ID: phone-call-1@10.0.0.2\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n";
    let out = send_raw(&mut lab, PHONE, cancel.to_owned());
    let phone = to(&out, PHONE);
    assert!(phone.iter().any(|m| m.status() == Some(200)) && phone.iter().any(|m| m.status() == Some(487)));
    let c = one(&out, CARRIER1, "CANCEL");
    assert_eq!(c.branch(), invite.branch());
    // The carrier's 200 had already left: pinhole acknowledges it and hangs up.
    let ok = reply(&invite, 200, "OK", "c1", &[], true);
    let out = send_raw(&mut lab, CARRIER1, ok.clone());
    one(&out, CARRIER1, "ACK");
    one(&out, CARRIER1, "BYE");
    assert!(to(&out, PHONE).is_empty());
    // The carrier repeats its 200 (our ACK was lost): the ACK again, not a second BYE.
    let out = send_raw(&mut lab, CARRIER1, ok);
    one(&out, CARRIER1, "ACK");
    assert!(to(&out, CARRIER1).iter().all(|m| m.method().map(|x| x.as_str()) != Some("BYE")));
    assert_eq!(lab.relay().map(Relay::call_count), Some(0));
    let record = lab.proxy.poll_call_record().expect("record");
    assert_eq!((record.hangup, record.code), ("caller", 487));
    // After the retransmission window, the call is forgotten.
    lab.advance(Duration::from_secs(40));
    assert_eq!(lab.proxy.b2bua().call_count(), 0);
}

#[test]
fn the_carriers_bye_hangs_up_the_phone_in_its_own_dialog() {
    let mut lab = Lab::new(10);
    let out = lab.dial("15551230007");
    let invite = one(&out, CARRIER1, "INVITE");
    let out = send_raw(&mut lab, CARRIER1, reply(&invite, 200, "OK", "c1", &[], true));
    let a_tag = one(&out, PHONE, "200").tag(HeaderName::To).expect("tag").to_owned();
    let b_tag = trunk_leg_tag(&lab);
    let bye = format!(
        "BYE sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.99:5080;branch=z9hG4bKcbye\r\nFrom: <sip:15551230007@192.0.2.10>;tag=c1\r\nTo: <sip:alice@203.0.113.1>;tag={b_tag}\r\nCall-ID: {}\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n",
        invite.call_id().unwrap_or("")
    );
    let out = send_raw(&mut lab, CARRIER1, bye);
    one(&out, CARRIER1, "200");
    let bye_a = one(&out, PHONE, "BYE");
    let t = text(&bye_a);
    assert!(t.starts_with("BYE sip:alice@10.0.0.2:5062 SIP/2.0"), "{t}");
    assert!(
        t.contains("Call-ID: phone-call-1@10.0.0.2")
            && t.contains(&format!("tag={a_tag}"))
            && t.contains("tag=phonetag1"),
        "{t}"
    );
    assert!(!t.contains("192.0.2"), "the carrier stays hidden from the phone too:\n{t}");
    assert_eq!(lab.proxy.poll_call_record().map(|r| r.hangup), Some("callee"));
}

#[test]
fn a_call_to_a_local_user_not_on_a_route_is_proxied_to_the_user() {
    let mut lab = Lab::new(10);
    let reg = "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.3:5064;branch=z9hG4bKregb\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=rb\r\nCall-ID: reg-bob\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@10.0.0.3:5064>\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(one(&send_raw(&mut lab, PHONE, reg.to_owned()), PHONE, "200").status(), Some(200));
    let out = lab.dial("bob");
    assert!(to(&out, CARRIER1).is_empty() && to(&out, CARRIER2).is_empty());
    let invite = one(&out, PHONE, "INVITE");
    assert!(text(&invite).starts_with("INVITE sip:bob@10.0.0.3:5064 SIP/2.0"), "bob is called:\n{}", text(&invite));
    assert_eq!(lab.proxy.b2bua().call_count(), 0);
    assert_eq!(lab.proxy.b2bua().stats.calls_started, 0);
}

#[test]
fn nothing_from_a_local_user_reaches_a_carrier_except_through_a_route() {
    let mut lab = Lab::new(10);
    for (what, uri, extra) in [
        ("an unrouted number at a carrier's address", "sip:0044207946000@192.0.2.10:5080", ""),
        ("a carrier named in a preloaded Route", "sip:bob@example.com", "Route: <sip:192.0.2.20:5080;lr>\n"),
        ("a routed number's host given as the carrier", "sip:nobody@192.0.2.20", ""),
    ] {
        let out = lab.dial_uri(uri, extra);
        assert!(to(&out, CARRIER1).is_empty() && to(&out, CARRIER2).is_empty(), "{what}: reached a carrier");
        let refusal = one(&out, PHONE, "403");
        assert!(refusal.reason().contains("Trunks Are Reached Only Through Routes"), "{what}");
    }
    assert_eq!(lab.proxy.b2bua().stats.calls_started, 0);
    // The control: a routed number goes to the carrier, through the B2BUA.
    let out = lab.dial("15551230002");
    sent(&out, CARRIER1, "INVITE");
    assert_eq!(lab.proxy.b2bua().stats.calls_started, 1);
}

fn register_alice(lab: &mut Lab) {
    let reg = "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKreg1\r\nMax-Forwards: 70\r\nTo: <sip:alice@example.com>\r\nFrom: <sip:alice@example.com>;tag=r1\r\nCall-ID: reg-alice\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@10.0.0.2:5062>\r\nContent-Length: 0\r\n\r\n";
    let out = send_raw(lab, PHONE, reg.to_owned());
    assert_eq!(one(&out, PHONE, "200").status(), Some(200));
}

fn carrier_invite(number: &str, sdp: bool) -> String {
    let body = "v=0\r\no=- 7 7 IN IP4 192.0.2.99\r\ns=-\r\nc=IN IP4 192.0.2.99\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";
    let (ct, body) = if sdp { ("Content-Type: application/sdp\r\n", body) } else { ("", "") };
    format!(
        "INVITE sip:{number}@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5999;branch=z9hG4bKcin1\r\nMax-Forwards: 70\r\nFrom: <sip:+14155550100@192.0.2.10>;tag=cin\r\nTo: <sip:{number}@203.0.113.1>\r\nCall-ID: carrier-call-1@192.0.2.10\r\nCSeq: 10 INVITE\r\nContact: <sip:gw@192.0.2.99:5080>\r\nRecord-Route: <sip:edge.carrier.example;lr>\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn a_carrier_calling_a_did_rings_the_mapped_user_with_the_topology_hidden_both_ways() {
    let mut lab = Lab::new(10);
    register_alice(&mut lab);
    // The carrier sends from a port of its own, not the trunk's configured one.
    let out = send_raw(&mut lab, "192.0.2.10:5999", carrier_invite("15551230001", true));
    assert_eq!(one(&out, "192.0.2.10:5999", "100").status(), Some(100));
    let invite = one(&out, PHONE, "INVITE");
    let t = text(&invite);
    assert!(t.starts_with("INVITE sip:alice@10.0.0.2:5062 SIP/2.0\r\n"), "to the binding:\n{t}");
    assert!(t.contains("From: <sip:+14155550100@203.0.113.1>;tag=pb"), "the caller's number, our address:\n{t}");
    assert!(t.contains("To: <sip:alice@example.com>"), "{t}");
    for leak in ["192.0.2", "carrier-call-1", "tag=cin", "edge.carrier"] {
        assert!(!t.contains(leak), "{leak} reached the phone:\n{t}");
    }
    assert!(t.contains("c=IN IP4 203.0.113.1"), "anchored:\n{t}");
    let ok = reply(&invite, 200, "OK", "ph1", &[], true);
    let out = send_raw(&mut lab, PHONE, ok);
    one(&out, PHONE, "ACK");
    let answer = one(&out, "192.0.2.10:5999", "200");
    let t = text(&answer);
    assert!(t.contains("Call-ID: carrier-call-1@192.0.2.10") && t.contains("CSeq: 10 INVITE"), "{t}");
    assert!(t.contains("Contact: <sip:203.0.113.1:5060>") && t.contains("c=IN IP4 203.0.113.1"), "{t}");
    for leak in ["10.0.0.2", "203.0.113.50", "ph1", "gw@192.0.2.99"] {
        assert!(!t.contains(leak), "{leak} reached the carrier:\n{t}");
    }
    assert_eq!(lab.proxy.b2bua().active_calls().next(), Some(("carrier1", 1)), "inbound calls count against the trunk");
}

#[test]
fn a_trunk_call_to_an_unknown_number_is_404_and_the_same_number_from_a_stranger_is_challenged() {
    let mut lab = Lab::new(10);
    register_alice(&mut lab);
    let out = send_raw(&mut lab, "192.0.2.10:5999", carrier_invite("15559999999", false));
    assert!(one(&out, "192.0.2.10:5999", "404").reason().contains("No Such Number"));
    // The same DID from an address that is not the trunk's is just a stranger's call.
    let out = send_raw(&mut lab, "198.51.100.66:5060", carrier_invite("15551230001", false));
    assert_eq!(one(&out, "198.51.100.66:5060", "407").status(), Some(407));
    assert!(to(&out, PHONE).is_empty());
    // And a DID whose user is not registered: 480.
    let mut lab = Lab::new(10);
    let out = send_raw(&mut lab, "192.0.2.10:5999", carrier_invite("15551230001", false));
    assert_eq!(one(&out, "192.0.2.10:5999", "480").status(), Some(480));
}

#[test]
fn a_trunk_registration_answers_its_challenge_and_is_refreshed_before_it_expires() {
    let mut lab = Lab::with(10, |c| c.trunks[0].register = true);
    let out = lab.advance(Duration::from_millis(10));
    let reg = sent(&out, CARRIER1, "REGISTER");
    let t = text(&reg);
    assert!(
        t.starts_with("REGISTER sip:192.0.2.10:5080 SIP/2.0") && t.contains("To: <sip:acct-carrier1@192.0.2.10:5080>"),
        "{t}"
    );
    assert!(t.contains("Contact: <sip:acct-carrier1@203.0.113.1:5060>") && t.contains("Expires: 600"), "{t}");
    assert_eq!(lab.proxy.b2bua().trunk_state(0), Some((false, true)));
    let challenge = ["WWW-Authenticate: Digest realm=\"carrier\", nonce=\"r1\", qop=\"auth\""];
    let out = send_raw(&mut lab, CARRIER1, reply(&reg, 401, "Unauthorized", "r", &challenge, false));
    let again = one(&out, CARRIER1, "REGISTER");
    assert_eq!((again.call_id(), again.cseq().map(|c| c.0)), (reg.call_id(), Some(2)));
    let creds = Credentials::parse(again.header(HeaderName::Authorization).expect("credentials")).expect("parses");
    let expected = digest_response(Algorithm::Md5, "acct-carrier1", "carrier", "trunk-secret", "REGISTER", &creds);
    assert_eq!((creds.uri.as_str(), creds.response.as_str()), ("sip:192.0.2.10:5080", expected.as_str()));
    let ok = reply(&again, 200, "OK", "r", &[], false)
        .replace("Contact: <sip:gw@192.0.2.99:5080>", "Contact: <sip:acct-carrier1@203.0.113.1:5060>;expires=60");
    assert!(send_raw(&mut lab, CARRIER1, ok).is_empty());
    assert_eq!(lab.proxy.b2bua().trunk_state(0), Some((true, true)));
    // The registrar granted 60 s: refreshed at 48, not before.
    assert!(to(&lab.advance(Duration::from_secs(47)), CARRIER1).is_empty());
    let refresh = sent(&lab.advance(Duration::from_secs(2)), CARRIER1, "REGISTER");
    assert_eq!((refresh.call_id(), refresh.cseq().map(|c| c.0)), (reg.call_id(), Some(3)));
}

#[test]
fn a_failing_registrar_is_retried_with_growing_backoff() {
    let mut lab = Lab::with(10, |c| c.trunks[0].register = true);
    let mut at = Vec::new();
    let start = lab.now;
    let mut out = lab.advance(Duration::from_millis(10));
    for _ in 0..4 {
        let reg = sent(&out, CARRIER1, "REGISTER");
        at.push((lab.now - start).as_secs());
        send_raw(&mut lab, CARRIER1, reply(&reg, 503, "Service Unavailable", "r", &[], false));
        assert_eq!(lab.proxy.b2bua().trunk_state(0), Some((false, true)));
        out = Vec::new();
        while to(&out, CARRIER1).is_empty() {
            out = lab.advance(Duration::from_millis(500));
        }
    }
    assert_eq!(at, vec![0, 2, 6, 14], "retries after 2, 4 and 8 s");
}

#[test]
fn a_trunk_that_stops_answering_pings_is_skipped_until_it_answers_again() {
    let mut lab = Lab::with(10, |c| c.trunks[0].options_interval = 10);
    // The first ping at 1 s; carrier1 never answers. Two lost pings: down.
    let out = lab.advance(Duration::from_secs(2));
    let ping = sent(&out, CARRIER1, "OPTIONS");
    assert!(!text(&ping).contains("10.0.0.2"));
    lab.advance(Duration::from_secs(15));
    assert_eq!(lab.proxy.b2bua().trunk_state(0), Some((false, false)));
    // A call goes straight to the second trunk.
    let out = lab.dial("15551230009");
    assert!(to(&out, CARRIER1).iter().all(|m| m.method().map(|x| x.as_str()) != Some("INVITE")));
    one(&out, CARRIER2, "INVITE");
    // carrier1 answers its next ping (at 21 s): up again.
    let out = lab.advance(Duration::from_secs(5));
    let ping = sent(&out, CARRIER1, "OPTIONS");
    send_raw(&mut lab, CARRIER1, reply(&ping, 200, "OK", "p", &[], false));
    assert_eq!(lab.proxy.b2bua().trunk_state(0), Some((false, true)));
}

/// Our tag on the trunk leg of the (only) call.
fn trunk_leg_tag(lab: &Lab) -> String {
    lab.proxy.b2bua().calls.values().next().map(|c| c.b.local_tag.clone()).expect("a call")
}

/// A call answered by carrier1 with `session` as its Session-Expires, acknowledged by the
/// phone; returns the carrier's INVITE.
fn answered_call(lab: &mut Lab, session: &str) -> Message {
    let out = lab.dial("15551230010");
    let invite = one(&out, CARRIER1, "INVITE");
    assert!(text(&invite).contains("Session-Expires: 1800;refresher=uac"), "{}", text(&invite));
    let extra: Vec<&str> = if session.is_empty() { vec![] } else { vec![session] };
    let out = send_raw(lab, CARRIER1, reply(&invite, 200, "OK", "c1", &extra, true));
    let a_tag = one(&out, PHONE, "200").tag(HeaderName::To).expect("tag").to_owned();
    let ack = format!(
        "ACK sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKack9\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=phonetag1\r\nTo: <sip:15551230010@example.com>;tag={a_tag}\r\nCall-ID: phone-call-1@10.0.0.2\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    );
    send_raw(lab, PHONE, ack);
    invite
}

/// The lab's proxy again, over a relay that never times media out.
fn without_media_timeout(lab: &mut Lab) {
    let cfg = lab.proxy.config().clone();
    let relay = Relay::new(
        RelayConfig {
            media_timeout: Duration::from_secs(3600),
            ..RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099)
        },
        lab.now,
    );
    lab.proxy = Proxy::new(cfg, Anchor::on(relay), lab.now, 1_700_000_000, 1);
}

#[test]
fn we_refresh_the_trunk_session_and_a_carrier_that_stops_answering_ends_both_legs() {
    let mut lab = Lab::new(10);
    without_media_timeout(&mut lab);
    let invite = answered_call(&mut lab, "Session-Expires: 90;refresher=uac");
    // At half the interval: a re-INVITE offering the same SDP again.
    assert!(to(&lab.advance(Duration::from_secs(44)), CARRIER1).is_empty());
    let out = lab.advance(Duration::from_secs(2));
    let refresh = sent(&out, CARRIER1, "INVITE");
    let t = text(&refresh);
    assert_eq!(refresh.call_id(), invite.call_id());
    assert!(t.contains("Session-Expires: 90;refresher=uac") && t.contains("c=IN IP4 203.0.113.1"), "{t}");
    assert_eq!(refresh.body_bytes(), invite.body_bytes(), "the same offer");
    let out =
        send_raw(&mut lab, CARRIER1, reply(&refresh, 200, "OK", "c1", &["Session-Expires: 90;refresher=uac"], true));
    one(&out, CARRIER1, "ACK");
    assert!(to(&out, PHONE).is_empty(), "refreshes stay on the trunk leg");
    // The next refresh goes unanswered: the carrier is gone, both legs get a BYE.
    let out = lab.advance(Duration::from_secs(45 + 33));
    sent(&out, PHONE, "BYE");
    assert_eq!(lab.proxy.poll_call_record().map(|r| r.hangup), Some("session-timer"));
    assert_eq!(lab.relay().map(Relay::call_count), Some(0));
}

#[test]
fn a_carrier_that_should_refresh_and_does_not_has_the_call_cleared() {
    let mut lab = Lab::new(10);
    without_media_timeout(&mut lab);
    answered_call(&mut lab, "Session-Expires: 90;refresher=uas");
    // The carrier refreshes: 90 s less a third (30 s) without one, and the call is over.
    assert!(to(&lab.advance(Duration::from_secs(59)), PHONE).is_empty());
    let out = lab.advance(Duration::from_secs(2));
    sent(&out, PHONE, "BYE");
    sent(&out, CARRIER1, "BYE");
}

#[test]
fn a_call_whose_media_stops_is_ended_by_the_relay_on_both_legs() {
    let mut lab = Lab::new(10);
    answered_call(&mut lab, "");
    // No Session-Expires: no session timer; the relay's media timeout (60 s) ends it.
    let out = lab.advance(Duration::from_secs(75));
    sent(&out, PHONE, "BYE");
    sent(&out, CARRIER1, "BYE");
    assert_eq!(lab.proxy.poll_call_record().map(|r| r.hangup), Some("media-timeout"));
}

#[test]
fn a_refer_in_a_trunk_call_gets_501_and_an_info_is_carried_to_the_other_leg() {
    let mut lab = Lab::new(10);
    let invite = answered_call(&mut lab, "");
    let b_tag = trunk_leg_tag(&lab);
    let refer = format!(
        "REFER sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.99:5080;branch=z9hG4bKref\r\nFrom: <sip:15551230010@192.0.2.10>;tag=c1\r\nTo: <sip:alice@203.0.113.1>;tag={b_tag}\r\nCall-ID: {}\r\nCSeq: 5 REFER\r\nRefer-To: <sip:someone@192.0.2.50>\r\nContent-Length: 0\r\n\r\n",
        invite.call_id().unwrap_or("")
    );
    let out = send_raw(&mut lab, CARRIER1, refer);
    assert!(one(&out, CARRIER1, "501").reason().contains("REFER"));
    assert!(to(&out, PHONE).is_empty());
    // DTMF as INFO from the carrier reaches the phone in its own dialog, and the answer goes back.
    let body = "Signal=5\r\nDuration=160\r\n";
    let info = format!(
        "INFO sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.99:5080;branch=z9hG4bKinfo\r\nFrom: <sip:15551230010@192.0.2.10>;tag=c1\r\nTo: <sip:alice@203.0.113.1>;tag={b_tag}\r\nCall-ID: {}\r\nCSeq: 6 INFO\r\nContent-Type: application/dtmf-relay\r\nContent-Length: {}\r\n\r\n{body}",
        invite.call_id().unwrap_or(""),
        body.len()
    );
    let out = send_raw(&mut lab, CARRIER1, info);
    let to_phone = one(&out, PHONE, "INFO");
    let t = text(&to_phone);
    assert!(t.contains("Call-ID: phone-call-1@10.0.0.2") && t.contains("Signal=5") && !t.contains("192.0.2"), "{t}");
    let ok = to_phone.response(200, "OK", None, &[]);
    let out = send_raw(&mut lab, PHONE, String::from_utf8(ok).expect("utf8"));
    let back = one(&out, CARRIER1, "200");
    assert_eq!(back.cseq().map(|c| c.0), Some(6), "the carrier's own transaction");
}

#[test]
fn a_trunk_with_inbound_auth_must_answer_a_challenge_before_its_call_rings_anyone() {
    let mut lab = Lab::with(10, |c| c.trunks[0].inbound_auth = true);
    register_alice(&mut lab);
    let invite = carrier_invite("15551230001", false);
    let out = send_raw(&mut lab, "192.0.2.10:5999", invite.clone());
    let challenge = one(&out, "192.0.2.10:5999", "407");
    assert!(to(&out, PHONE).is_empty(), "nobody rings before the carrier proves itself");
    let value = challenge.extension_header("Proxy-Authenticate").expect("a challenge");
    let param = |name: &str| {
        value
            .split(',')
            .find_map(|p| p.trim().trim_start_matches("Digest ").strip_prefix(&format!("{name}=")))
            .map(|v| v.trim_matches('"').to_owned())
            .expect("param")
    };
    let (realm, nonce) = (param("realm"), param("nonce"));
    let algorithm = Algorithm::from_name(&param("algorithm")).unwrap_or(Algorithm::Md5);
    let ch = crate::auth::Challenge { realm: &realm, nonce: &nonce, algorithm };
    let creds = Credentials::answering(
        &ch,
        "acct-carrier1",
        "trunk-secret",
        "INVITE",
        "sip:15551230001@203.0.113.1",
        1,
        "c0ffee",
    );
    let again = invite
        .replace("branch=z9hG4bKcin1", "branch=z9hG4bKcin2")
        .replace("CSeq: 10 INVITE", &format!("CSeq: 11 INVITE\r\nProxy-Authorization: {}", creds.header_value()));
    let out = send_raw(&mut lab, "192.0.2.10:5999", again);
    let to_phone = one(&out, PHONE, "INVITE");
    assert!(!text(&to_phone).contains("Proxy-Authorization"), "the trunk's credentials stay here");
}

#[test]
fn a_reliable_183_from_the_carrier_is_pracked_here_and_reaches_the_phone_with_its_early_media() {
    let mut lab = Lab::new(10);
    let out = lab.dial("15551230011");
    let invite = one(&out, CARRIER1, "INVITE");
    let early = reply(&invite, 183, "Session Progress", "c1", &["Require: 100rel", "RSeq: 7"], true);
    let out = send_raw(&mut lab, CARRIER1, early);
    let prack = sent(&out, CARRIER1, "PRACK");
    let t = text(&prack);
    assert!(t.starts_with("PRACK sip:gw@192.0.2.99:5080 SIP/2.0"), "to the early dialog's target:\n{t}");
    assert!(t.contains("RAck: 7 1 INVITE") && t.contains("CSeq: 2 PRACK") && t.contains("tag=c1"), "{t}");
    let progress = one(&out, PHONE, "183");
    let p = text(&progress);
    assert!(
        p.contains("c=IN IP4 203.0.113.1") && !p.contains("RSeq") && !p.contains("100rel"),
        "unreliable, anchored:\n{p}"
    );
    send_raw(&mut lab, CARRIER1, String::from_utf8(prack.response(200, "OK", None, &[])).expect("utf8"));
    // The answer: the ACK keeps the INVITE's CSeq; a later BYE follows the PRACK's.
    let out = send_raw(&mut lab, CARRIER1, reply(&invite, 200, "OK", "c1", &[], true));
    assert_eq!(one(&out, CARRIER1, "ACK").cseq().map(|c| c.0), Some(1));
}

#[test]
fn a_phone_that_requires_an_extension_gets_420_naming_it() {
    let mut lab = Lab::new(10);
    let invite = "INVITE sip:15551230012@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKreq\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=r1\r\nTo: <sip:15551230012@example.com>\r\nCall-ID: req-1\r\nCSeq: 1 INVITE\r\nRequire: 100rel\r\nContact: <sip:alice@10.0.0.2:5062>\r\nContent-Length: 0\r\n\r\n";
    let out = send_raw(&mut lab, PHONE, invite.to_owned());
    let refused = one(&out, PHONE, "420");
    assert_eq!(refused.extension_header("Unsupported"), Some("100rel"));
    assert!(to(&out, CARRIER1).is_empty());
}

#[test]
fn a_hold_re_invite_from_the_phone_is_carried_to_the_carrier_and_answered_back_anchored() {
    let mut lab = Lab::new(10);
    let invite = answered_call(&mut lab, "");
    let a_tag = lab.proxy.b2bua().calls.values().next().map(|c| c.a.local_tag.clone()).expect("a call");
    let sdp = "v=0\r\no=- 1 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n";
    let reinvite = format!(
        "INVITE sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKhold\r\nMax-Forwards: 70\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=phonetag1\r\nTo: <sip:15551230010@example.com>;tag={a_tag}\r\nCall-ID: phone-call-1@10.0.0.2\r\nCSeq: 2 INVITE\r\nContact: <sip:alice@10.0.0.2:5062>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    let out = send_raw(&mut lab, PHONE, reinvite);
    let to_carrier = one(&out, CARRIER1, "INVITE");
    let t = text(&to_carrier);
    assert_eq!(to_carrier.call_id(), invite.call_id(), "the trunk leg's dialog");
    assert!(t.contains("a=sendonly") && t.contains("c=IN IP4 203.0.113.1") && !t.contains("10.0.0.2"), "{t}");
    assert!(t.contains("CSeq: 2 INVITE") && t.contains("tag=c1"), "our CSeq space on that leg:\n{t}");
    let out = send_raw(&mut lab, CARRIER1, reply(&to_carrier, 200, "OK", "c1", &[], true));
    assert_eq!(one(&out, CARRIER1, "ACK").cseq().map(|c| c.0), Some(2));
    let ok = one(&out, PHONE, "200");
    let o = text(&ok);
    assert!(o.contains("CSeq: 2 INVITE") && o.contains("c=IN IP4 203.0.113.1") && !o.contains("192.0.2"), "{o}");
}

#[test]
fn a_bye_with_a_calls_call_id_from_a_stranger_or_with_wrong_tags_is_refused_and_the_call_goes_on() {
    let mut lab = Lab::new(10);
    let invite = answered_call(&mut lab, "");
    let b_tag = trunk_leg_tag(&lab);
    let bye = |tag: &str| {
        format!(
            "BYE sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.66:5080;branch=z9hG4bKevil\r\nFrom: <sip:x@192.0.2.10>;tag=c1\r\nTo: <sip:alice@203.0.113.1>;tag={tag}\r\nCall-ID: {}\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n",
            invite.call_id().unwrap_or("")
        )
    };
    // Right Call-ID and tags, wrong address; then the carrier's address with a wrong tag.
    let out = send_raw(&mut lab, "198.51.100.66:5080", bye(&b_tag));
    assert_eq!(one(&out, "198.51.100.66:5080", "481").status(), Some(481));
    let out = send_raw(&mut lab, CARRIER1, bye("guess"));
    assert_eq!(one(&out, CARRIER1, "481").status(), Some(481));
    assert!(to(&out, PHONE).is_empty(), "the phone's call goes on");
    assert_eq!(lab.relay().map(Relay::call_count), Some(1));
    assert!(lab.proxy.poll_call_record().is_none());
}

#[test]
fn an_authenticated_callers_trunk_identity_is_its_account_whatever_its_from_or_pai_says() {
    let mut lab = Lab::new(10);
    let forged =
        "P-Asserted-Identity: <sip:+19995550000@example.com>\nP-Preferred-Identity: <sip:+19995550001@example.com>\n";
    let out = lab.dial_authenticated("15551230002", forged);
    let invite = sent(&out, CARRIER1, "INVITE");
    let t = text(&invite);
    assert!(t.contains("From: <sip:+14155550123@203.0.113.1>;tag="), "alice's caller ID, not her From:\n{t}");
    assert!(t.contains("P-Asserted-Identity: <sip:+14155550123@203.0.113.1>"), "{t}");
    assert!(!t.contains("+1999555000") && !t.contains("P-Preferred-Identity"), "the phone's claims are gone:\n{t}");
    let out = send_raw(&mut lab, CARRIER1, reply(&invite, 486, "Busy Here", "c1", &[], false));
    assert!(!to(&out, ROAMING).is_empty());
    let record = std::iter::from_fn(|| lab.proxy.poll_call_record()).last().expect("a call record");
    assert_eq!(record.caller, "+14155550123", "the record names who authenticated");
}

#[test]
fn a_display_name_or_a_strange_from_never_shapes_the_carrier_leg() {
    // A trusted PBX's From is used, when it is a number; anything else calls as anonymous.
    for (from, expected) in [
        ("\"sip:+1666@evil\" <sip:+14155559999@example.com>", "+14155559999"),
        ("\"Alice>\" <sip:al%3Eice@example.com>", "anonymous"),
        ("<sip:example.com>", "anonymous"),
    ] {
        let mut lab = Lab::new(10);
        let uri = "sip:15551230002@example.com";
        let sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
        let inv = format!("INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKdn{expected}\r\nMax-Forwards: 70\r\nFrom: {from};tag=dn\r\nTo: <{uri}>\r\nCall-ID: dn-{expected}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@10.0.0.2:5062>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len());
        let out = send_raw(&mut lab, PHONE, inv);
        let t = text(&sent(&out, CARRIER1, "INVITE"));
        assert!(t.contains(&format!("From: <sip:{expected}@203.0.113.1>;tag=")), "{from}:\n{t}");
        assert!(Message::parse(Bytes::from(t.clone())).is_ok(), "well-formed");
    }
}

#[test]
fn numbers_a_trunk_cannot_dial_take_no_slot_and_ascii_digits_alone_match_a_route() {
    let mut lab = Lab::with(1, |c| {
        c.routes = vec![
            Route { pattern: regex::Regex::new(r"^9\d+$").expect("re"), trunks: vec![0], record: false },
            Route { pattern: regex::Regex::new(r"^8").expect("re"), trunks: vec![0], record: false },
        ];
    });
    for number in ["8%201234", "8%0D%0A1234", "8%401234", "9\u{ff11}\u{ff12}", "9\u{0661}\u{0662}"] {
        let out = lab.dial(number);
        assert!(to(&out, CARRIER1).is_empty(), "{number:?} reached the carrier");
        assert!(!to(&out, PHONE).is_empty(), "{number:?} was answered");
    }
    assert_eq!(lab.proxy.b2bua().stats.calls_started, 0, "no slot taken");
    // The one slot is still free: a good number goes out.
    let out = lab.dial("91234");
    sent(&out, CARRIER1, "INVITE");
}

#[test]
fn a_carrier_that_rings_forever_is_cancelled_at_the_ring_timeout_and_frees_its_slot() {
    let mut lab = Lab::with(1, |c| c.ring_timeout = Duration::from_secs(60));
    let out = lab.dial("15551230002");
    let invite = sent(&out, CARRIER1, "INVITE");
    send_raw(&mut lab, CARRIER1, reply(&invite, 180, "Ringing", "c1", &[], false));
    assert_eq!(lab.proxy.b2bua().active_calls().next(), Some(("carrier1", 1)));
    assert!(to(&lab.advance(Duration::from_secs(59)), PHONE).iter().all(|m| m.status() != Some(408)));
    let out = lab.advance(Duration::from_secs(2));
    sent(&out, CARRIER1, "CANCEL");
    let timeout = one(&out, PHONE, "408");
    assert!(timeout.reason().contains("Ring Timeout"), "{}", timeout.reason());
    assert_eq!(lab.proxy.b2bua().active_calls().next(), Some(("carrier1", 0)), "the slot is free");
    sent(&lab.dial("15551230003"), CARRIER1, "INVITE");
}

#[test]
fn when_every_trunk_of_a_route_is_down_the_call_is_tried_on_them_anyway() {
    let mut lab = Lab::with(10, |c| {
        for t in &mut c.trunks {
            t.options_interval = 30;
        }
    });
    // Neither carrier answers its pings: both go down.
    lab.advance(Duration::from_secs(70));
    assert_eq!(lab.proxy.b2bua().trunk_state(0), Some((false, false)));
    assert_eq!(lab.proxy.b2bua().trunk_state(1), Some((false, false)));
    let out = lab.dial("15551230002");
    sent(&out, CARRIER1, "INVITE");
    assert!(to(&out, PHONE).iter().all(|m| m.status() != Some(503)), "not refused");
}

#[test]
fn a_user_registered_from_a_trunks_address_is_still_called_as_a_user() {
    // A PBX that is a trunk and also registers its users: calls to them are proxied.
    let mut lab = Lab::new(10);
    let pbx = "192.0.2.10:5070";
    let reg = |auth: &str| {
        format!("REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {pbx};branch=z9hG4bKpbx{};rport\r\nMax-Forwards: 70\r\nTo: <sip:alice@example.com>\r\nFrom: <sip:alice@example.com>;tag=pbx\r\nCall-ID: reg-pbx\r\nCSeq: {} REGISTER\r\nContact: <sip:alice@{pbx}>\r\n{auth}Content-Length: 0\r\n\r\n", auth.len(), if auth.is_empty() { 1 } else { 2 })
    };
    let out = send_raw(&mut lab, pbx, reg(""));
    let challenge = one(&out, pbx, "401");
    let all = challenge.value_texts(HeaderName::Other);
    let md5 = all.iter().find(|h| h.contains("MD5")).expect("MD5 challenge");
    let nonce = md5.split("nonce=\"").nth(1).and_then(|s| s.split('"').next()).expect("nonce");
    let c = crate::auth::Challenge { realm: "example.com", nonce, algorithm: Algorithm::Md5 };
    let creds = Credentials::answering(&c, "alice", "pw-a", "REGISTER", "sip:example.com", 1, "c0ffee");
    let out = send_raw(&mut lab, pbx, reg(&format!("Authorization: {}\r\n", creds.header_value())));
    assert_eq!(one(&out, pbx, "200").status(), Some(200));
    let out = lab.dial("alice");
    let invite = one(&out, pbx, "INVITE");
    assert!(text(&invite).starts_with("INVITE sip:alice@192.0.2.10:5070 SIP/2.0"), "{}", text(&invite));
}

#[test]
fn a_trunk_call_whose_relay_answers_late_goes_on_at_each_step_once_it_answers() {
    let mut lab = Lab::new(10);
    lab.proxy.media_mut().defer = true;
    let out = lab.dial("15551230013");
    assert_eq!(one(&out, PHONE, "100").status(), Some(100));
    assert!(to(&out, CARRIER1).is_empty(), "the carrier's INVITE waits for the relay");
    let out = lab.relay_answers();
    let invite = one(&out, CARRIER1, "INVITE");
    assert!(text(&invite).contains("c=IN IP4 203.0.113.1"), "{}", text(&invite));

    // Early media: the 183 reaches the phone once its SDP is anchored.
    let out = send_raw(&mut lab, CARRIER1, reply(&invite, 183, "Session Progress", "c1", &[], true));
    assert!(to(&out, PHONE).is_empty(), "the 183 waits");
    let out = lab.relay_answers();
    assert!(text(&one(&out, PHONE, "183")).contains("c=IN IP4 203.0.113.1"));

    // The answer (a new SDP): the carrier gets its ACK at once, the phone its 200 later.
    let answer = reply(&invite, 200, "OK", "c1", &[], true).replace("o=- 2 2", "o=- 2 3");
    let out = send_raw(&mut lab, CARRIER1, answer.clone());
    one(&out, CARRIER1, "ACK");
    assert!(to(&out, PHONE).is_empty(), "the phone's 200 waits");
    // The carrier repeats its 2xx meanwhile: acknowledged again, still one answer later.
    let out = send_raw(&mut lab, CARRIER1, answer);
    one(&out, CARRIER1, "ACK");
    let out = lab.relay_answers();
    let ok = one(&out, PHONE, "200");
    let a_tag = ok.tag(HeaderName::To).expect("tag").to_owned();
    assert!(text(&ok).contains("c=IN IP4 203.0.113.1") && !text(&ok).contains("192.0.2.99"), "{}", text(&ok));

    // Hold from the phone: carried across once anchored; the carrier's answer likewise.
    let sdp = "v=0\r\no=- 1 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n";
    let reinvite = format!(
        "INVITE sip:203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKhold\r\nMax-Forwards: 70\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=phonetag1\r\nTo: <sip:15551230013@example.com>;tag={a_tag}\r\nCall-ID: phone-call-1@10.0.0.2\r\nCSeq: 2 INVITE\r\nContact: <sip:alice@10.0.0.2:5062>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    let out = send_raw(&mut lab, PHONE, reinvite);
    assert!(to(&out, CARRIER1).is_empty(), "the re-INVITE waits");
    let out = lab.relay_answers();
    let to_carrier = one(&out, CARRIER1, "INVITE");
    assert!(text(&to_carrier).contains("a=sendonly"));
    let held = reply(&to_carrier, 200, "OK", "c1", &[], true).replace("o=- 2 2", "o=- 2 4");
    let out = send_raw(&mut lab, CARRIER1, held);
    assert_eq!(one(&out, CARRIER1, "ACK").cseq().map(|c| c.0), Some(2), "acknowledged at once");
    assert!(to(&out, PHONE).is_empty(), "its answer waits");
    let out = lab.relay_answers();
    let ok = one(&out, PHONE, "200");
    assert!(text(&ok).contains("CSeq: 2 INVITE") && text(&ok).contains("c=IN IP4 203.0.113.1"), "{}", text(&ok));
    assert_eq!(lab.relay().map(Relay::call_count), Some(1));
}

#[test]
fn a_phone_that_cancels_while_the_carriers_answer_waits_for_media_has_the_carrier_leg_hung_up() {
    let mut lab = Lab::new(10);
    lab.proxy.media_mut().defer = true;
    lab.dial("15551230014");
    let out = lab.relay_answers();
    let invite = one(&out, CARRIER1, "INVITE");
    let out = send_raw(&mut lab, CARRIER1, reply(&invite, 180, "Ringing", "c1", &[], false));
    one(&out, PHONE, "180");
    let out = send_raw(&mut lab, CARRIER1, reply(&invite, 200, "OK", "c1", &[], true));
    one(&out, CARRIER1, "ACK");
    let cancel = "CANCEL sip:15551230014@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKphone1;rport\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=phonetag1\r\nTo: <sip:15551230014@example.com>\r\nCall-ID: phone-call-1@10.0.0.2\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n";
    let out = send_raw(&mut lab, PHONE, cancel.to_owned());
    one(&out, PHONE, "487");
    let out = lab.relay_answers();
    assert!(to(&out, PHONE).iter().all(|m| m.status() != Some(200)), "no answer after the 487");
    let bye = one(&out, CARRIER1, "BYE");
    assert!(text(&bye).contains("tag=c1"), "{}", text(&bye));
}
