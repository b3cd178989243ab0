//! The agent between phones on its LAN and the server, in messages: bytes on flows, and,
//! where media is anchored, a real relay on the agent's LAN address.

use pinhole_media::relay::Relay;

use super::*;

const AGENT: &str = "198.51.100.2:5060";
const SERVER: &str = "203.0.113.10:5060";
const PHONE: &str = "198.51.100.20:5062";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn config() -> AgentConfig {
    AgentConfig { listen: addr(AGENT), server: addr(SERVER), max_message: 16384, secret: [5; 32] }
}

fn agent() -> Agent<Option<Relay>> {
    Agent::new(config(), None)
}

fn from(remote: &str) -> Flow {
    Flow { transport: Transport::Udp, local: addr(AGENT), remote: addr(remote), conn: None }
}

fn send(a: &mut Agent<Option<Relay>>, remote: &str, text: &str) -> Vec<Transmit> {
    a.handle_input(Instant::now(), from(remote), Bytes::from(text.replace('\n', "\r\n"))).expect("SIP");
    std::iter::from_fn(|| a.poll_transmit()).collect()
}

fn parse(t: &Transmit) -> Message {
    Message::parse(Bytes::from(t.payload.clone())).expect("SIP")
}

const REGISTER: &str = "REGISTER sip:203.0.113.10 SIP/2.0
Via: SIP/2.0/UDP 198.51.100.20:5062;branch=z9hG4bKp1;rport
Route: <sip:198.51.100.2:5060;lr>
Max-Forwards: 70
To: <sip:alice@203.0.113.10>
From: <sip:alice@203.0.113.10>;tag=a1
Call-ID: reg1
CSeq: 1 REGISTER
Contact: <sip:alice@198.51.100.20:5062>
Authorization: Digest username=\"alice\", realm=\"pinhole\", nonce=\"n\", uri=\"sip:203.0.113.10\", response=\"r\"
Content-Length: 0

";

/// The phone registers through the agent and the server accepts it: the server may then
/// send it requests through us.
fn registered(a: &mut Agent<Option<Relay>>) {
    let up = parse(&send(a, PHONE, REGISTER)[0]);
    let ok = String::from_utf8(up.response(200, "OK", Some("s1"), &[])).expect("utf8");
    let down = send(a, SERVER, &ok.replace("\r\n", "\n"));
    assert_eq!(down[0].flow.remote, addr(PHONE));
}

/// An SDP with a plan's lines signed as the server signs them for agent `a`.
fn signed(a: &Agent<Option<Relay>>, call_id: &str, sdp: &str) -> String {
    let sig = format!("{}{}\r\n", pinhole_media::punch::sdp::SIG_PREFIX, sign_plan(&a.plan_key(), call_id, sdp));
    pinhole_media::punch::sdp::insert_lines(sdp, &sig)
}

#[test]
fn a_phone_request_loses_our_route_and_goes_to_the_server_with_credentials_intact() {
    let mut a = agent();
    let out = send(&mut a, PHONE, REGISTER);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].flow.remote, addr(SERVER));
    let m = parse(&out[0]);
    assert!(m.value_texts(HeaderName::Route).is_empty(), "our Route is consumed");
    let vias = m.value_texts(HeaderName::Via);
    assert!(vias[0].starts_with("SIP/2.0/UDP 198.51.100.2:5060;branch=z9hG4bKpha"), "{vias:?}");
    assert_eq!(vias[1], "SIP/2.0/UDP 198.51.100.20:5062;branch=z9hG4bKp1;rport=5062");
    assert_eq!(m.header(HeaderName::MaxForwards), Some("69"));
    assert!(m.header(HeaderName::Authorization).is_some_and(|v| v.contains("username=\"alice\"")));
    assert!(m.value_texts(HeaderName::RecordRoute).is_empty(), "REGISTER is not record-routed");
}

#[test]
fn a_retransmission_keeps_its_branch_and_the_response_goes_back_to_the_phone() {
    let mut a = agent();
    let first = send(&mut a, PHONE, REGISTER);
    let again = send(&mut a, PHONE, REGISTER);
    assert_eq!(parse(&first[0]).branch(), parse(&again[0]).branch(), "stateless, same branch");
    let fwd = parse(&first[0]);
    let ok = String::from_utf8(fwd.response(
        401,
        "Unauthorized",
        Some("s1"),
        &["WWW-Authenticate: Digest realm=\"pinhole\", nonce=\"x\"".into()],
    ))
    .expect("utf8");
    let back = send(&mut a, SERVER, &ok.replace("\r\n", "\n"));
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].flow.remote, addr(PHONE), "rport of the phone's Via");
    let r = parse(&back[0]);
    assert_eq!(r.status(), Some(401));
    assert_eq!(r.value_texts(HeaderName::Via).len(), 1, "our Via is gone");
    assert!(r.header(HeaderName::Other).is_some_and(|w| w.contains("nonce=\"x\"")), "the challenge passes untouched");
}

#[test]
fn the_server_request_goes_to_the_phone_its_request_uri_names_and_is_record_routed() {
    let mut a = agent();
    registered(&mut a);
    let invite = "INVITE sip:alice@198.51.100.20:5062 SIP/2.0
Via: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bKsrv1
Record-Route: <sip:phtoken@203.0.113.10:5060;lr>
Max-Forwards: 69
To: <sip:alice@203.0.113.10>
From: <sip:bob@203.0.113.10>;tag=b1
Call-ID: call1
CSeq: 1 INVITE
Contact: <sip:bob@203.0.113.50:5060>
Content-Length: 0

";
    let out = send(&mut a, SERVER, invite);
    assert_eq!(out[0].flow.remote, addr(PHONE));
    let m = parse(&out[0]);
    let rr = m.value_texts(HeaderName::RecordRoute);
    assert_eq!(rr, vec!["<sip:198.51.100.2:5060;lr>", "<sip:phtoken@203.0.113.10:5060;lr>"]);
}

#[test]
fn options_to_the_agent_is_answered_by_the_agent() {
    let mut a = agent();
    let options = "OPTIONS sip:198.51.100.2:5060 SIP/2.0
Via: SIP/2.0/UDP 198.51.100.20:5062;branch=z9hG4bKo1
Max-Forwards: 70
To: <sip:198.51.100.2>
From: <sip:alice@203.0.113.10>;tag=o1
Call-ID: opt1
CSeq: 1 OPTIONS
Content-Length: 0

";
    let out = send(&mut a, PHONE, options);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].flow.remote, addr(PHONE));
    assert_eq!(parse(&out[0]).status(), Some(200));
}

#[test]
fn responses_not_carrying_our_via_on_top_are_dropped() {
    let mut a = agent();
    let stray = "SIP/2.0 200 OK
Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKother
To: <sip:x@y>;tag=1
From: <sip:x@y>;tag=2
Call-ID: stray
CSeq: 1 INVITE
Content-Length: 0

";
    assert!(send(&mut a, SERVER, stray).is_empty());
    assert_eq!(a.dropped(), 1);
}

#[test]
fn garbage_is_refused_spent_hops_get_483_and_every_own_route_is_consumed() {
    let mut a = agent();
    assert!(a.handle_input(Instant::now(), from(PHONE), Bytes::from_static(b"\x00\x01junk")).is_err());
    let hops = send(&mut a, PHONE, &REGISTER.replace("Max-Forwards: 70", "Max-Forwards: 0"));
    assert_eq!(parse(&hops[0]).status(), Some(483));
    let to_self = REGISTER.replace(
        "Route: <sip:198.51.100.2:5060;lr>",
        "Route: <sip:198.51.100.2:5060;lr>, <sip:198.51.100.2:5060;lr>, <sip:198.51.100.2:5060>",
    );
    let out = send(&mut a, PHONE, &to_self);
    assert_eq!(out[0].flow.remote, addr(SERVER), "all our own Routes are consumed");
}

#[test]
fn relayed_registers_carry_the_agents_profile_and_never_the_phones() {
    let mut a = agent();
    let planted = REGISTER.replace("Content-Length: 0", "Pinhole-NAT: mapping=eim;filtering=eif\nContent-Length: 0");
    let out = send(&mut a, PHONE, &planted);
    assert_eq!(parse(&out[0]).extension_header("Pinhole-NAT"), None, "the phone's claim is removed");
    a.set_profile("mapping=apdm;filtering=apdf;allocation=sequential;delta=1;window=203.0.113.2:40001".into());
    let out = send(&mut a, PHONE, &planted);
    assert_eq!(
        parse(&out[0]).extension_header("Pinhole-NAT"),
        Some("mapping=apdm;filtering=apdf;allocation=sequential;delta=1;window=203.0.113.2:40001")
    );
}

#[test]
fn relayed_registers_carry_the_agents_relay_round_trips_and_never_the_phones() {
    let mut a = agent();
    let planted = REGISTER.replace("Content-Length: 0", "Pinhole-RTT: 203.0.113.21:3478=0\nContent-Length: 0");
    let out = send(&mut a, PHONE, &planted);
    assert_eq!(parse(&out[0]).extension_header("Pinhole-RTT"), None, "the phone's claim is removed");
    a.set_relay_rtts("203.0.113.21:3478=12, 203.0.113.22:3478=80".into());
    let out = send(&mut a, PHONE, &planted);
    assert_eq!(parse(&out[0]).extension_header("Pinhole-RTT"), Some("203.0.113.21:3478=12, 203.0.113.22:3478=80"));
}

#[test]
fn a_punch_plan_is_taken_out_of_the_sdp_before_the_phone_sees_it() {
    use pinhole_media::punch::sdp::insert;
    let sdp =
        "v=0\r\no=- 1 1 IN IP4 203.0.113.10\r\ns=-\r\nc=IN IP4 203.0.113.10\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n";
    let plan = callee_plan();
    let body = signed(&agent(), "planned", &insert(sdp, &plan));
    let invite = format!(
        "INVITE sip:alice@198.51.100.20:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bKsrvp\r\nMax-Forwards: 69\r\nTo: <sip:alice@203.0.113.10>\r\nFrom: <sip:bob@203.0.113.10>;tag=b1\r\nCall-ID: planned\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    a_send_raw(&invite, |a, out| {
        let m = parse(&out[0]);
        assert_eq!(m.body_bytes(), sdp.as_bytes(), "the phone gets the SDP without the plan");
        assert_eq!(m.content_length(), Some(Ok(sdp.len())));
        assert_eq!(a.poll_plan(), None, "the callee's plan waits for the answer");
        // The phone answers: the plan is ready, counted from now, for the server's side.
        let answered = Instant::now();
        let ok = String::from_utf8(m.response(200, "OK", Some("a9"), &[])).expect("utf8");
        a.handle_input(answered, from(PHONE), Bytes::from(ok)).expect("SIP");
        let ready = a.poll_plan().expect("plan ready");
        assert_eq!((ready.call_id.as_str(), ready.server_tag.as_str()), ("planned", "b1"));
        assert_eq!((&ready.plan, ready.answered), (&plan, answered));
    });
    // The same plan from a phone is taken out, and not taken.
    let mut a = agent();
    a.handle_input(
        Instant::now(),
        from(PHONE),
        Bytes::from(invite.replace("Via:", "Route: <sip:198.51.100.2:5060;lr>\r\nVia:")),
    )
    .expect("SIP");
    let up = parse(&a.poll_transmit().expect("forwarded"));
    assert!(!String::from_utf8_lossy(up.body_bytes()).contains("x-pinhole"));
    let ok = String::from_utf8(up.response(200, "OK", Some("z1"), &[])).expect("utf8");
    a.handle_input(Instant::now(), from(SERVER), Bytes::from(ok)).expect("SIP");
    assert_eq!(a.poll_plan(), None);
}

#[test]
fn a_late_offer_calls_plan_in_the_ack_is_ready_at_once() {
    use pinhole_media::punch::sdp::insert;
    let plan = callee_plan();
    let body = signed(
        &agent(),
        "late",
        &insert(
            "v=0\r\no=- 1 1 IN IP4 203.0.113.10\r\ns=-\r\nc=IN IP4 203.0.113.10\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n",
            &plan,
        ),
    );
    let ack = format!(
        "ACK sip:alice@198.51.100.20:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bKsrva\r\nMax-Forwards: 69\r\nTo: <sip:alice@203.0.113.10>;tag=a9\r\nFrom: <sip:bob@203.0.113.10>;tag=b1\r\nCall-ID: late\r\nCSeq: 1 ACK\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let at = Instant::now();
    let mut a = agent();
    registered(&mut a);
    a.handle_input(at, from(SERVER), Bytes::from(ack)).expect("SIP");
    let fwd = parse(&a.poll_transmit().expect("the ACK goes on to the phone"));
    assert!(!String::from_utf8_lossy(fwd.body_bytes()).contains("x-pinhole"));
    let ready = a.poll_plan().expect("no answer to wait for");
    assert_eq!((ready.call_id.as_str(), ready.server_tag.as_str(), ready.answered), ("late", "b1", at));
}

/// The callee's side of a simultaneous-open plan, as the server would send it.
fn callee_plan() -> pinhole_media::punch::sdp::WirePlan {
    use pinhole_media::punch::scheduler::Credentials;
    use pinhole_media::punch::sdp::{PlanStart, WirePlan};
    use pinhole_media::punch::Strategy;
    use pinhole_media::relay::Side;
    WirePlan {
        strategy: Strategy::SimultaneousOpen,
        side: Side::B,
        windows: ["203.0.113.2:40001".parse().expect("a"), "203.0.113.3:40002".parse().expect("b")],
        credentials: Credentials {
            local_ufrag: "bbbb".into(),
            local_pwd: "bpassword0123456789abcdef".into(),
            remote_ufrag: "aaaa".into(),
            remote_pwd: "apassword0123456789abcdef".into(),
        },
        start: PlanStart::AfterAnswer { ms: 300 },
    }
}

/// Sends raw bytes from the server and hands the agent and its output to `check`.
fn a_send_raw(text: &str, check: impl FnOnce(&mut Agent<Option<Relay>>, Vec<Transmit>)) {
    let mut a = agent();
    registered(&mut a);
    a.handle_input(Instant::now(), from(SERVER), Bytes::from(text.to_owned())).expect("SIP");
    let out: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
    check(&mut a, out);
}

/// An agent anchoring media on its LAN address.
fn media_agent(t0: Instant) -> Agent<Option<Relay>> {
    Agent::new(config(), Some(Relay::new(relay_config(addr(AGENT).ip(), 31000, 31099), t0)))
}

/// The phone's INVITE through the agent, offering audio from its own address.
fn phone_invite(call_id: &str, branch: &str) -> Bytes {
    phone_invite_with(
        call_id,
        branch,
        "v=0\r\no=- 1 1 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
    )
}

fn phone_invite_with(call_id: &str, branch: &str, offer: &str) -> Bytes {
    Bytes::from(format!(
        "INVITE sip:bob@203.0.113.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20:5062;branch={branch};rport\r\nRoute: <sip:198.51.100.2:5060;lr>\r\nMax-Forwards: 70\r\nTo: <sip:bob@203.0.113.10>\r\nFrom: <sip:alice@203.0.113.10>;tag=a1\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@198.51.100.20:5062>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
        offer.len()
    ))
}

#[test]
fn the_phones_media_is_anchored_on_the_agents_lan_ports_both_ways_and_bye_frees_them() {
    let t0 = Instant::now();
    let mut a = media_agent(t0);
    a.handle_input(t0, from(PHONE), phone_invite("media-call", "z9hG4bKm1")).expect("SIP");
    let fwd = a.poll_transmit().expect("forwarded");
    let up = parse(&fwd);
    let body = String::from_utf8_lossy(up.body_bytes()).into_owned();
    assert!(body.contains("c=IN IP4 198.51.100.2\r\n"), "the server sees the agent's address:\n{body}");
    assert!(body.contains("m=audio 310"), "on the agent's ports:\n{body}");
    // The server's answer (its relay address) is anchored for the phone on the agent too.
    let answer =
        "v=0\r\no=- 2 2 IN IP4 203.0.113.10\r\ns=-\r\nc=IN IP4 203.0.113.10\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n";
    let ok = String::from_utf8(up.response(200, "OK", Some("b1"), &["Content-Type: application/sdp".to_owned()]))
        .expect("utf8")
        .replace("Content-Length: 0\r\n\r\n", &format!("Content-Length: {}\r\n\r\n{answer}", answer.len()));
    a.handle_input(t0, from(SERVER), Bytes::from(ok)).expect("SIP");
    let down = parse(&a.poll_transmit().expect("to the phone"));
    let body = String::from_utf8_lossy(down.body_bytes()).into_owned();
    assert!(body.contains("c=IN IP4 198.51.100.2\r\n") && !body.contains("c=IN IP4 203.0.113.10"), "{body}");
    assert_eq!(a.media().as_ref().map(|r| (r.call_count(), r.ports_in_use())), Some((1, 4)));
    let bye = "BYE sip:bob@203.0.113.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20:5062;branch=z9hG4bKm2;rport\r\nRoute: <sip:198.51.100.2:5060;lr>\r\nMax-Forwards: 70\r\nTo: <sip:bob@203.0.113.10>;tag=b1\r\nFrom: <sip:alice@203.0.113.10>;tag=a1\r\nCall-ID: media-call\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n";
    a.handle_input(t0, from(PHONE), Bytes::from_static(bye.as_bytes())).expect("SIP");
    assert_eq!(a.media().as_ref().map(|r| (r.call_count(), r.ports_in_use())), Some((0, 0)), "BYE frees the ports");
}

#[test]
fn a_call_that_fails_before_its_answer_frees_the_agents_ports() {
    let t0 = Instant::now();
    let mut a = media_agent(t0);
    a.handle_input(t0, from(PHONE), phone_invite("failed-call", "z9hG4bKf1")).expect("SIP");
    let up = parse(&a.poll_transmit().expect("forwarded"));
    assert_eq!(a.media().as_ref().map(Relay::call_count), Some(1));
    let busy = up.response(486, "Busy Here", Some("b1"), &[]);
    a.handle_input(t0, from(SERVER), Bytes::from(busy)).expect("SIP");
    assert_eq!(a.media().as_ref().map(Relay::call_count), Some(0));
}

#[test]
fn a_forwarder_offer_from_the_server_is_kept_and_taken_out_of_the_phones_sdp() {
    let sdp = signed(&agent(), "tunnelled", "v=0\r\no=- 1 1 IN IP4 203.0.113.10\r\ns=-\r\nc=IN IP4 203.0.113.10\r\nt=0 0\r\na=x-pinhole-tcp:4443 0123456789abcdef01234567\r\nm=audio 30000 RTP/AVP 0\r\n");
    let invite = format!(
        "INVITE sip:alice@198.51.100.20:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bKsrvt\r\nMax-Forwards: 69\r\nTo: <sip:alice@203.0.113.10>\r\nFrom: <sip:bob@203.0.113.10>;tag=b1\r\nCall-ID: tunnelled\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    a_send_raw(&invite, |a, out| {
        let body = String::from_utf8_lossy(parse(&out[0]).body_bytes()).into_owned();
        assert!(!body.contains("x-pinhole") && body.contains("m=audio 30000"), "{body}");
        let offer = a.poll_forwarder_offer().expect("kept");
        assert_eq!(
            (offer.call_id.as_str(), offer.server_tag.as_str(), offer.port, offer.key.as_str()),
            ("tunnelled", "b1", 4443, "0123456789abcdef01234567")
        );
    });
    // From a phone: only taken out.
    let mut a = agent();
    let from_phone = invite.replace("Via:", "Route: <sip:198.51.100.2:5060;lr>\r\nVia:");
    a.handle_input(Instant::now(), from(PHONE), Bytes::from(from_phone)).expect("SIP");
    let up = parse(&a.poll_transmit().expect("forwarded"));
    assert!(!String::from_utf8_lossy(up.body_bytes()).contains("x-pinhole"));
    assert_eq!(a.poll_forwarder_offer(), None);
}

#[test]
fn with_udp_blocked_the_server_is_reached_over_tcp_and_phones_still_over_udp() {
    let mut a = agent();
    a.set_server_transport(Transport::Tcp);
    let out = send(&mut a, PHONE, REGISTER);
    assert_eq!((out[0].flow.transport, out[0].flow.remote), (Transport::Tcp, addr(SERVER)));
    let m = parse(&out[0]);
    assert!(m.value_texts(HeaderName::Via)[0].starts_with("SIP/2.0/TCP 198.51.100.2:5060;"), "our Via says TCP");
    // The server's answer comes back on the connection; the phone gets it over UDP.
    let ok = String::from_utf8(m.response(200, "OK", None, &[])).expect("utf8");
    let mut tcp = from(SERVER);
    tcp.transport = Transport::Tcp;
    a.handle_input(Instant::now(), tcp, Bytes::from(ok)).expect("SIP");
    let down = a.poll_transmit().expect("to the phone");
    assert_eq!((down.flow.transport, down.flow.remote), (Transport::Udp, addr(PHONE)));
}

/// An INVITE from `remote` to our phone with `body` as its SDP.
fn server_invite(call_id: &str, body: &str) -> String {
    format!(
        "INVITE sip:alice@198.51.100.20:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bK{call_id}\r\nMax-Forwards: 69\r\nTo: <sip:alice@203.0.113.10>\r\nFrom: <sip:bob@203.0.113.10>;tag=b1\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The phone answers the INVITE `fwd` the agent forwarded to it.
fn phone_answers(a: &mut Agent<Option<Relay>>, fwd: &Transmit) {
    let ok = String::from_utf8(parse(fwd).response(200, "OK", Some("a9"), &[])).expect("utf8");
    a.handle_input(Instant::now(), from(PHONE), Bytes::from(ok)).expect("SIP");
}

#[test]
fn plans_count_only_signed_with_our_key_by_the_servers_own_address() {
    use pinhole_media::punch::sdp::insert;
    let sdp =
        "v=0\r\no=- 1 1 IN IP4 203.0.113.10\r\ns=-\r\nc=IN IP4 203.0.113.10\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n";
    let plan = insert(sdp, &callee_plan());
    let other_key = Agent::new(AgentConfig { secret: [6; 32], ..config() }, None).plan_key();
    let forged_sig = format!("{}{}\r\n", pinhole_media::punch::sdp::SIG_PREFIX, sign_plan(&other_key, "c1", &plan));
    let mut a = agent();
    registered(&mut a);
    let cases = [
        ("unsigned", SERVER, plan.clone()),
        ("signed with another agent's key", SERVER, pinhole_media::punch::sdp::insert_lines(&plan, &forged_sig)),
        ("signed for another call", SERVER, signed(&a, "c2", &plan)),
        ("from the server's IP on another port", "203.0.113.10:5999", signed(&a, "c1", &plan)),
    ];
    for (i, (what, source, body)) in cases.into_iter().enumerate() {
        a.handle_input(Instant::now(), from(source), Bytes::from(server_invite("c1", &body))).expect("SIP");
        let out: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
        assert!(!String::from_utf8_lossy(parse(&out[0]).body_bytes()).contains("x-pinhole"), "{what}: taken out");
        if let Some(fwd) = out.iter().find(|t| t.flow.remote == addr(PHONE)) {
            phone_answers(&mut a, fwd);
        }
        assert_eq!(a.poll_plan(), None, "{what}: not carried out");
        assert_eq!(a.plans_refused(), i as u64 + 1, "{what}: counted");
    }
    // The control: the same plan, signed for this call with our key, by the server.
    a.handle_input(Instant::now(), from(SERVER), Bytes::from(server_invite("c1", &signed(&a, "c1", &plan))))
        .expect("SIP");
    let fwd = a.poll_transmit().expect("to the phone");
    phone_answers(&mut a, &fwd);
    assert!(a.poll_plan().is_some(), "a signed plan is carried out");
    assert_eq!(a.plans_refused(), 4);
}

#[test]
fn relayed_registers_carry_the_agents_plan_key_and_never_the_phones() {
    let mut a = agent();
    let planted = REGISTER.replace("Content-Length: 0", &format!("Pinhole-Key: {}\nContent-Length: 0", "0".repeat(64)));
    let out = send(&mut a, PHONE, &planted);
    let m = parse(&out[0]);
    let keys: Vec<&str> = m.extension_headers("Pinhole-Key").map(|(_, r)| m.text(r)).collect();
    assert_eq!(keys, vec![key_to_header(&a.plan_key())], "ours only");
    assert_eq!(key_from_header(keys[0]), Some(a.plan_key()));
    assert_ne!(a.plan_key(), [0; 32]);
}

#[test]
fn a_forged_answer_from_a_stranger_allocates_nothing() {
    let t0 = Instant::now();
    let mut a = media_agent(t0);
    a.handle_input(t0, from(PHONE), phone_invite("forged", "z9hG4bKfa1")).expect("SIP");
    let up = parse(&a.poll_transmit().expect("forwarded"));
    let ports = |a: &Agent<Option<Relay>>| a.media().as_ref().map(Relay::ports_in_use);
    assert_eq!(ports(&a), Some(4), "the phone's offer holds its ports");
    let fifty: String = (0..50).map(|i| format!("m=audio {} RTP/AVP 0\r\n", 30000 + 2 * i)).collect();
    let answer = format!("v=0\r\no=- 2 2 IN IP4 203.0.113.66\r\ns=-\r\nc=IN IP4 203.0.113.66\r\nt=0 0\r\n{fifty}");
    let real = String::from_utf8(up.response(200, "OK", Some("b1"), &["Content-Type: application/sdp".to_owned()]))
        .expect("utf8")
        .replace("Content-Length: 0\r\n\r\n", &format!("Content-Length: {}\r\n\r\n{answer}", answer.len()));
    // A stranger guessing our branch: dropped, nothing allocated.
    let ours = up.branch().expect("branch").to_owned();
    let guessed = real.replace(&ours, "z9hG4bKpha0123456789abcdef");
    a.handle_input(t0, from("203.0.113.66:5060"), Bytes::from(guessed.clone())).expect("SIP");
    a.handle_input(t0, from(SERVER), Bytes::from(guessed)).expect("SIP");
    assert!(a.poll_transmit().is_none(), "not ours: nothing goes to the phone");
    assert_eq!((a.dropped(), ports(&a)), (2, Some(4)));
    // Even the real answer cannot make one call hold more than a call needs.
    a.handle_input(t0, from(SERVER), Bytes::from(real)).expect("SIP");
    assert!(a.poll_transmit().is_some(), "the real answer goes on");
    assert_eq!(ports(&a), Some(4), "50 streams are refused, not anchored");
    // A phone offering more streams than a call needs is told why.
    let five: String = (0..5).map(|i| format!("m=audio {} RTP/AVP 0\r\n", 4000 + 2 * i)).collect();
    let offer = format!("v=0\r\no=- 1 1 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\nt=0 0\r\n{five}");
    a.handle_input(t0, from(PHONE), phone_invite_with("wide", "z9hG4bKfa2", &offer)).expect("SIP");
    let refusal = parse(&a.poll_transmit().expect("a reply"));
    assert_eq!(refusal.status(), Some(488));
    assert!(String::from_utf8_lossy(refusal.raw()).contains("More Than 4 Media Streams"));
}

#[test]
fn requests_go_only_between_the_phones_and_the_server() {
    let mut a = agent();
    // A stranger routing through us to a LAN host.
    let message = "MESSAGE sip:printer@198.51.100.30 SIP/2.0
Via: SIP/2.0/UDP 203.0.113.66:5060;branch=z9hG4bKx1
Route: <sip:198.51.100.2:5060;lr>, <sip:198.51.100.30:5060;lr>
Max-Forwards: 70
To: <sip:printer@198.51.100.30>
From: <sip:eve@203.0.113.66>;tag=e1
Call-ID: lan1
CSeq: 1 MESSAGE
Content-Length: 0

";
    let out = send(&mut a, "203.0.113.66:5060", message);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].flow.remote, addr("203.0.113.66:5060"), "only a reply, to the sender");
    assert_eq!(parse(&out[0]).status(), Some(403));
    // The same from the server: not one of our phones.
    let out = send(&mut a, SERVER, &message.replace("203.0.113.66:5060;branch", "203.0.113.10:5060;branch"));
    assert_eq!((out.len(), out[0].flow.remote, parse(&out[0]).status()), (1, addr(SERVER), Some(404)));
    assert_eq!(a.refused(), 2);
    // The server's request to a phone registered through us goes on (the control).
    registered(&mut a);
    let to_phone = message.replace("Route: <sip:198.51.100.2:5060;lr>, <sip:198.51.100.30:5060;lr>\n", "");
    let out = send(&mut a, SERVER, &to_phone.replace("printer@198.51.100.30", "alice@198.51.100.20:5062"));
    assert_eq!(out[0].flow.remote, addr(PHONE));
    assert_eq!(a.refused(), 2);
}

#[test]
fn a_phone_registered_before_the_profile_is_measured_is_told_to_come_back_in_seconds() {
    let grant = |a: &mut Agent<Option<Relay>>| {
        let up = parse(&send(a, PHONE, REGISTER)[0]);
        let ok = String::from_utf8(up.response(200, "OK", Some("s1"), &["Expires: 3600".to_owned()]))
            .expect("utf8")
            .replace("\r\nServer:", "\r\nContact: <sip:alice@198.51.100.20:5062>;expires=3600\r\nServer:");
        parse(&send(a, SERVER, &ok.replace("\r\n", "\n"))[0])
    };
    let mut a = agent();
    let down = grant(&mut a);
    assert_eq!(down.header(HeaderName::Expires), Some("20"), "no profile yet");
    assert_eq!(down.value_texts(HeaderName::Contact), vec!["<sip:alice@198.51.100.20:5062>;expires=20"]);
    // Once the profile is there, the phone keeps what the server granted.
    a.set_profile("mapping=eim;filtering=apdf;allocation=preserving;window=203.0.113.2:40001".into());
    let down = grant(&mut a);
    assert_eq!(down.header(HeaderName::Expires), Some("3600"));
    assert_eq!(down.value_texts(HeaderName::Contact), vec!["<sip:alice@198.51.100.20:5062>;expires=3600"]);
}
