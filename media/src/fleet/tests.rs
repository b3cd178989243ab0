//! The fleet against real relay cores and ng servers in memory, one per relay address.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;
use crate::anchor::SdpIn;
use crate::ng_server::NgServer;
use crate::relay::{Relay, RelayConfig};

const CALLER: &str = "198.51.100.10";
const CALLEE: &str = "192.0.2.20";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn ng(n: u8) -> SocketAddr {
    SocketAddr::new(ip(&format!("203.0.113.{n}")), 2223)
}

fn stun(n: u8) -> SocketAddr {
    SocketAddr::new(ip(&format!("203.0.113.{n}")), 3478)
}

/// Relays in memory: each a relay core behind an ng server; `dead` ones never answer.
struct Cores {
    relays: HashMap<SocketAddr, (NgServer, Relay)>,
    dead: HashSet<SocketAddr>,
    now: Instant,
    /// Every command sent: to whom, and the command's name.
    sent: Vec<(SocketAddr, String)>,
}

impl NgExchange for Cores {
    fn exchange(&mut self, to: SocketAddr, cookie: &str, payload: &[u8]) -> Option<Vec<u8>> {
        let name = Bencode::decode(payload).ok()?.get("command")?.as_str()?.to_owned();
        self.sent.push((to, name));
        if self.dead.contains(&to) {
            return None;
        }
        let (server, relay) = self.relays.get_mut(&to)?;
        let mut d = format!("{cookie} ").into_bytes();
        d.extend_from_slice(payload);
        let reply = server.handle(self.now, Some(relay), &d)?;
        Some(split_cookie(&reply).ok()?.1.to_vec())
    }
}

impl Cores {
    fn calls_on(&self, n: u8) -> usize {
        self.relays[&ng(n)].1.call_count()
    }
}

fn spec(n: u8, weight: u32, region: Option<&str>, cidrs: &[&str]) -> RelaySpec {
    RelaySpec {
        ng: ng(n),
        weight,
        region: region.map(str::to_owned),
        cidrs: cidrs.iter().map(|c| Cidr::parse(c).expect("cidr")).collect(),
        stun: Some(stun(n)),
    }
}

fn fleet(specs: Vec<RelaySpec>) -> Fleet<Cores> {
    let now = Instant::now();
    let relays = specs
        .iter()
        .map(|s| {
            let cfg = RelayConfig { max_sessions: 40, ..RelayConfig::single(s.ng.ip(), 30000, 30999) };
            (s.ng, (NgServer::new(now, 1_700_000_000), Relay::new(cfg, now)))
        })
        .collect();
    let cores = Cores { relays, dead: HashSet::new(), now, sent: Vec::new() };
    Fleet::new(specs, cores, now, (1000, Duration::from_secs(4 * 3600)), [4; 32])
}

fn sdp(addr: &str, port: u16) -> Vec<u8> {
    format!(
        "v=0\r\no=- 1 1 IN IP4 {addr}\r\ns=-\r\nc=IN IP4 {addr}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    .into_bytes()
}

fn connection(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.lines().find_map(|l| l.strip_prefix("c=IN IP4 ")).expect("c= line").trim().to_owned()
}

/// An SDP from `from` (its own signalling address), tagged `tag`, towards `to`: what the
/// fleet forwards.
fn anchor(
    f: &mut Fleet<Cores>,
    call: &str,
    tag: &str,
    (from, port): (&str, u16),
    to: Option<&str>,
) -> Result<Vec<u8>, MediaRefusal> {
    let now = f.exchange.now;
    let body = sdp(from, port);
    let s = SdpIn { call_id: call, sender_tag: tag, sdp: &body, signalling_ip: ip(from), to: to.map(ip), hide: false };
    f.anchor_sdp(now, &s)
}

/// An offer from the caller to the callee; the SDP forwarded to the callee.
fn offer(f: &mut Fleet<Cores>, call: &str) -> Result<Vec<u8>, MediaRefusal> {
    anchor(f, call, "a", (CALLER, 4000), Some(CALLEE))
}

fn answer(f: &mut Fleet<Cores>, call: &str) -> Result<Vec<u8>, MediaRefusal> {
    anchor(f, call, "b", (CALLEE, 5000), Some(CALLER))
}

/// A relay's statistics reply with `cookie` (see [`cookie_to`]).
fn stats_reply_with(cookie: &[u8], sessions: i64) -> Vec<u8> {
    let mut d = cookie.to_vec();
    d.push(b' ');
    let current = Bencode::dict(vec![("sessionsown", Bencode::Int(sessions))]);
    Bencode::dict(vec![
        ("result", Bencode::str("ok")),
        ("statistics", Bencode::dict(vec![("currentstatistics", current)])),
    ])
    .encode(&mut d);
    d
}

/// The cookie of the fleet's next statistics request to relay `port` (it asks every relay
/// once a second).
fn cookie_to(f: &mut Fleet<Cores>, port: u8) -> Vec<u8> {
    f.exchange.now += Duration::from_secs(1);
    let now = f.exchange.now;
    let mut found = None;
    while let Some((to, d)) = f.poll_transmit(now) {
        if to == ng(port) && found.is_none() {
            found = d.split(|b| *b == b' ').next().map(<[u8]>::to_vec);
        }
    }
    found.expect("a statistics request")
}

/// The relay's answer to the fleet's latest statistics request.
fn stats_reply(f: &mut Fleet<Cores>, port: u8, sessions: i64) -> Vec<u8> {
    let cookie = cookie_to(f, port);
    stats_reply_with(&cookie, sessions)
}

#[test]
fn twenty_calls_are_spread_evenly_over_two_equal_relays() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    for n in 0..20 {
        let out = offer(&mut f, &format!("call-{n}")).expect("anchored");
        answer(&mut f, &format!("call-{n}")).expect("answered");
        assert!(connection(&out).starts_with("203.0.113.2"), "the callee is sent a relay's address");
    }
    assert_eq!((f.exchange.calls_on(21), f.exchange.calls_on(22)), (10, 10));
}

#[test]
fn weights_share_calls_in_proportion() {
    let mut f = fleet(vec![spec(21, 3, None, &[]), spec(22, 1, None, &[])]);
    for n in 0..20 {
        offer(&mut f, &format!("call-{n}")).expect("anchored");
    }
    assert_eq!((f.exchange.calls_on(21), f.exchange.calls_on(22)), (15, 5));
}

#[test]
fn reported_load_steers_new_calls_to_the_less_busy_relay() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    assert!({
        let r = stats_reply(&mut f, 21, 30);
        f.handle_reply(ng(21), &r)
    });
    assert!({
        let r = stats_reply(&mut f, 22, 0);
        f.handle_reply(ng(22), &r)
    });
    for n in 0..10 {
        offer(&mut f, &format!("call-{n}")).expect("anchored");
    }
    assert_eq!((f.exchange.calls_on(21), f.exchange.calls_on(22)), (0, 10), "30 sessions elsewhere outweigh 10 new");
}

#[test]
fn a_relay_that_stops_answering_is_taken_out_and_new_calls_go_to_the_survivor() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    f.exchange.dead.insert(ng(21));
    for n in 0..6 {
        let out = offer(&mut f, &format!("call-{n}")).expect("the survivor anchors every call");
        assert_eq!(connection(&out), "203.0.113.22");
    }
    assert_eq!(f.exchange.calls_on(22), 6);
    let tried_dead = f.exchange.sent.iter().filter(|(to, _)| *to == ng(21)).count();
    assert_eq!(tried_dead, 1, "the silent relay is tried once, then left out");
    assert_eq!(f.poll_change(), Some(Change { relay: ng(21), up: false, why: "no reply to a call command" }));
    assert!(f.relays().any(|(a, up, _)| a == ng(21) && !up));

    // It answers its statistics again: back in, and the next calls balance onto it.
    f.exchange.dead.clear();
    assert!({
        let r = stats_reply(&mut f, 21, 0);
        f.handle_reply(ng(21), &r)
    });
    assert!({
        let r = stats_reply(&mut f, 22, 6);
        f.handle_reply(ng(22), &r)
    });
    assert_eq!(f.poll_change(), Some(Change { relay: ng(21), up: true, why: "statistics answered" }));
    offer(&mut f, "call-after").expect("anchored");
    assert_eq!(f.exchange.calls_on(21), 1);
}

#[test]
fn a_call_answered_on_a_relay_that_died_gets_503_naming_the_relay_failure() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    offer(&mut f, "c").expect("anchored");
    f.exchange.dead.insert(ng(21));
    let r = answer(&mut f, "c").expect_err("no relay to take the answer");
    assert_eq!((r.code, r.reason.as_str()), (503, "Media Relay Not Answering"));
}

#[test]
fn with_every_relay_silent_a_new_call_is_refused_with_503() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    f.exchange.dead.extend([ng(21), ng(22)]);
    let r = offer(&mut f, "c").expect_err("nobody answers");
    assert_eq!((r.code, r.reason.as_str()), (503, "No Media Relay Answering"));
    assert!(!f.anchors("c"));
}

#[test]
fn unanswered_statistics_take_a_relay_out_after_three_seconds() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    let t0 = f.exchange.now;
    let mut sent = 0;
    for s in 0..=3 {
        let now = t0 + Duration::from_secs(s);
        while let Some((to, d)) = f.poll_transmit(now) {
            assert_eq!(to, ng(21));
            assert!(d.ends_with(b"d7:command10:statisticse"));
            sent += 1;
        }
        assert_eq!(f.poll_timeout(), Some(now + STATS_INTERVAL));
    }
    assert_eq!(sent, 4, "one request a second");
    assert_eq!(f.poll_change(), Some(Change { relay: ng(21), up: false, why: "statistics unanswered" }));
}

#[test]
fn garbage_and_strangers_on_the_statistics_socket_are_refused() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    assert!(!f.handle_reply(ng(99), &stats_reply_with(b"s1", 1)), "not one of our relays");
    assert!(!f.handle_reply(ng(21), b"s1 d6:result2:oke"), "no statistics");
    assert!(!f.handle_reply(ng(21), b"c1 d6:result2:oke"), "not a statistics cookie");
    // A stranger on the relay's address with a statistics reply, but no cookie of ours.
    let _ = cookie_to(&mut f, 21);
    for guess in [&b"s1"[..], b"s9", b"s2", b"0000000000000001"] {
        assert!(!f.handle_reply(ng(21), &stats_reply_with(guess, 1)), "guessed cookie {guess:?}");
    }
    assert!(!f.handle_reply(ng(21), b"\xff\xfe"), "not ng");
    assert!({
        let r = stats_reply(&mut f, 21, 1);
        f.handle_reply(ng(21), &r)
    });
}

#[test]
fn an_endpoint_is_served_by_the_relay_whose_cidr_holds_its_address() {
    let mut f = fleet(vec![
        spec(21, 1, None, &[]),
        spec(22, 1, None, &["198.51.100.0/24"]),
        spec(23, 1, None, &["198.51.100.0/28"]),
    ]);
    for n in 0..3 {
        let out = offer(&mut f, &format!("c{n}")).expect("anchored");
        assert_eq!(connection(&out), "203.0.113.23", "the longest prefix holding the caller");
    }
    let out = anchor(&mut f, "other", "x", ("192.0.2.99", 4000), None).expect("anchored");
    assert_eq!(connection(&out), "203.0.113.21", "an address no CIDR holds goes to the relay serving anyone");
}

#[test]
fn endpoints_in_two_regions_are_chained_through_a_relay_in_each() {
    let mut f = fleet(vec![spec(21, 1, Some("eu"), &["198.51.100.0/24"]), spec(22, 1, Some("us"), &["192.0.2.0/24"])]);
    let to_callee = offer(&mut f, "c").expect("anchored");
    assert_eq!(connection(&to_callee), "203.0.113.22", "the callee talks to its own region's relay");
    assert_eq!(f.hops("c"), Some(vec![ng(21), ng(22)]));
    let to_caller = answer(&mut f, "c").expect("answered");
    assert_eq!(connection(&to_caller), "203.0.113.21", "the caller talks to its own region's relay");
    let sent: Vec<_> = f.exchange.sent.iter().map(|(to, c)| (to.ip().to_string(), c.as_str())).collect();
    let want =
        [("203.0.113.21", "offer"), ("203.0.113.22", "offer"), ("203.0.113.22", "answer"), ("203.0.113.21", "answer")];
    assert_eq!(
        sent,
        want.map(|(a, c)| (a.to_owned(), c)),
        "offer out through eu then us, answer back through us then eu"
    );

    // Each relay's far side points at the other relay.
    let eu = f.exchange.relays[&ng(21)].1.describe("c").expect("eu holds the call");
    let us = f.exchange.relays[&ng(22)].1.describe("c").expect("us holds the call");
    let expected = |info: &crate::relay::CallInfo| -> Vec<String> {
        info.streams.iter().flat_map(|s| s.sdp.0.iter().filter_map(|a| a.map(|a| a.ip().to_string()))).collect()
    };
    assert!(expected(&eu).contains(&"203.0.113.22".to_owned()), "eu sends the callee's way to us: {:?}", expected(&eu));
    assert!(expected(&us).contains(&"203.0.113.21".to_owned()), "us sends the caller's way to eu: {:?}", expected(&us));
}

#[test]
fn endpoints_in_one_region_use_one_relay() {
    let mut f =
        fleet(vec![spec(21, 1, Some("eu"), &["198.51.100.0/24", "192.0.2.0/24"]), spec(22, 1, Some("us"), &[])]);
    offer(&mut f, "c").expect("anchored");
    assert_eq!(f.hops("c"), Some(vec![ng(21)]));
}

#[test]
fn an_answer_repeated_in_the_183_and_the_200_is_sent_to_the_relay_once() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    offer(&mut f, "c").expect("anchored");
    let first = answer(&mut f, "c").expect("183");
    let second = answer(&mut f, "c").expect("200");
    assert_eq!(first, second);
    assert_eq!(f.exchange.sent.iter().filter(|(_, c)| c == "answer").count(), 1);
}

#[test]
fn a_re_invite_from_the_callee_is_an_offer_from_its_side() {
    let mut f = fleet(vec![spec(21, 1, Some("eu"), &["198.51.100.0/24"]), spec(22, 1, Some("us"), &["192.0.2.0/24"])]);
    offer(&mut f, "c").expect("anchored");
    answer(&mut f, "c").expect("answered");
    f.exchange.sent.clear();
    let to_caller = anchor(&mut f, "c", "b", (CALLEE, 5002), None).expect("re-offer");
    assert_eq!(connection(&to_caller), "203.0.113.21");
    anchor(&mut f, "c", "a", (CALLER, 4002), None).expect("its answer");
    let sent: Vec<_> = f.exchange.sent.iter().map(|(to, c)| (to.ip().to_string(), c.as_str())).collect();
    let want =
        [("203.0.113.22", "offer"), ("203.0.113.21", "offer"), ("203.0.113.21", "answer"), ("203.0.113.22", "answer")];
    assert_eq!(sent, want.map(|(a, c)| (a.to_owned(), c)));
}

#[test]
fn release_deletes_the_call_on_every_hop() {
    let mut f = fleet(vec![spec(21, 1, Some("eu"), &["198.51.100.0/24"]), spec(22, 1, Some("us"), &["192.0.2.0/24"])]);
    offer(&mut f, "c").expect("anchored");
    answer(&mut f, "c").expect("answered");
    assert!(f.release("c"));
    assert!(!f.anchors("c"));
    assert_eq!((f.exchange.calls_on(21), f.exchange.calls_on(22)), (0, 0));
    assert!(!f.release("c"), "released once");
}

#[test]
fn a_released_call_reports_what_its_first_relay_carried() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut f = fleet(vec![spec(21, 1, Some("eu"), &["198.51.100.0/24"]), spec(22, 1, Some("us"), &["192.0.2.0/24"])]);
    offer(&mut f, "c").expect("anchored");
    answer(&mut f, "c").expect("answered");
    // The caller's relay (21) carried 150 packets of 172 bytes each way and 3 RTCP; the
    // callee's relay (22) saw the same media (a few lost on the way), which must not be
    // counted twice nor stand in for the first hop's.
    for (n, rtp) in [(21, 150), (22, 147)] {
        let streams = f.exchange.relays[&ng(n)].1.stats("c").expect("call on the relay");
        for side in crate::relay::Side::BOTH {
            let st = streams[0].get(crate::relay::Component::Rtp, side);
            st.packets.fetch_add(rtp, Relaxed);
            st.bytes.fetch_add(rtp * 172, Relaxed);
            let rtcp = streams[0].get(crate::relay::Component::Rtcp, side);
            rtcp.packets.fetch_add(3, Relaxed);
            rtcp.bytes.fetch_add(3 * 80, Relaxed);
        }
    }
    assert_eq!(f.release_counting("c"), Some((306, 2 * (150 * 172 + 3 * 80))));
    assert_eq!((f.exchange.calls_on(21), f.exchange.calls_on(22)), (0, 0), "deleted on every hop");
    assert_eq!(f.release_counting("c"), None, "released once");

    offer(&mut f, "d").expect("anchored");
    f.exchange.dead.insert(ng(21));
    assert_eq!(f.release_counting("d"), None, "a silent relay tells nothing");
    assert!(!f.anchors("d"), "the call is forgotten all the same");
}

#[test]
fn a_relay_at_its_session_limit_refuses_with_503() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    for n in 0..40 {
        offer(&mut f, &format!("c{n}")).expect("under the relay's limit");
    }
    let r = offer(&mut f, "one-too-many").expect_err("the relay is full");
    assert_eq!((r.code, r.reason.as_str()), (503, "Media Relay At Session Limit"));
    assert!(!f.anchors("one-too-many"));
}

#[test]
fn an_agents_measured_round_trips_pick_the_nearest_relay_over_cidrs_and_load() {
    let mut f = fleet(vec![spec(21, 1, Some("eu"), &["198.51.100.0/24"]), spec(22, 1, Some("us"), &["192.0.2.0/24"])]);
    // The caller's agent finds the us relay nearer, whatever its CIDR says.
    let caller = rtts_header(&[(stun(21), 80), (stun(22), 9)]);
    f.prefer("c", Some(&caller), None);
    offer(&mut f, "c").expect("anchored");
    assert_eq!(f.hops("c"), Some(vec![ng(22)]), "both ends nearest to us: one relay");

    // Each end nearest to its own region's relay: chained.
    let (near_eu, near_us) = (rtts_header(&[(stun(21), 5), (stun(22), 90)]), rtts_header(&[(stun(22), 4)]));
    f.prefer("d", Some(&near_eu), Some(&near_us));
    offer(&mut f, "d").expect("anchored");
    assert_eq!(f.hops("d"), Some(vec![ng(21), ng(22)]));
}

#[test]
fn round_trips_to_a_relay_that_is_out_or_unknown_are_ignored() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    f.exchange.dead.insert(ng(22));
    offer(&mut f, "warmup").expect("taken out on the way");
    let hint = rtts_header(&[(stun(22), 1), ("198.51.100.99:3478".parse().expect("addr"), 0)]);
    f.prefer("c", Some(&hint), None);
    offer(&mut f, "c").expect("anchored");
    assert_eq!(f.hops("c"), Some(vec![ng(21)]));
}

#[test]
fn hints_are_bounded_and_dropped_with_their_call() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    let hint = rtts_header(&[(stun(21), 3)]);
    for n in 0..MAX_HINTS + 10 {
        f.prefer(&format!("never-{n}"), Some(&hint), None);
    }
    assert!(f.hints.len() <= MAX_HINTS);
    f.prefer("c", Some(&hint), None);
    assert!(f.hints.contains_key("c"));
    assert!(!f.release("c"), "no call yet");
    assert!(!f.hints.contains_key("c"), "its hint goes with it");
}

#[test]
fn rtt_values_are_read_strictly() {
    let a: SocketAddr = "203.0.113.21:3478".parse().expect("addr");
    assert_eq!(parse_rtts("203.0.113.21:3478=12"), Some(vec![(a, 12)]));
    assert_eq!(parse_rtts(&rtts_header(&[(a, 12), (stun(22), 7)])), Some(vec![(a, 12), (stun(22), 7)]));
    for bad in ["", "203.0.113.21:3478", "203.0.113.21=5", "203.0.113.21:3478=-1", "x=1", "203.0.113.21:3478=1e3"] {
        assert_eq!(parse_rtts(bad), None, "{bad:?}");
    }
    let many = (0..=MAX_RTTS).map(|i| format!("203.0.113.{i}:3478=1")).collect::<Vec<_>>().join(",");
    assert_eq!(parse_rtts(&many), None, "more than {MAX_RTTS} relays");
}
