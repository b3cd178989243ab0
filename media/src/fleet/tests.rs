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
    /// Every call command sent: to whom, and the command's name.
    sent: Vec<(SocketAddr, String)>,
}

impl Cores {
    fn calls_on(&self, n: u8) -> usize {
        self.relays[&ng(n)].1.call_count()
    }

    /// A call command's reply from the relay it went to, unless that one is dead.
    fn answer(&mut self, to: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
        let (_, payload) = split_cookie(datagram).ok()?;
        let name = Bencode::decode(payload).ok()?.get("command")?.as_str()?.to_owned();
        self.sent.push((to, name));
        if self.dead.contains(&to) {
            return None;
        }
        let (server, relay) = self.relays.get_mut(&to)?;
        server.handle(self.now, Some(relay), datagram)
    }
}

/// The fleet and its relays, the datagrams between them carried at once (a dead relay's
/// never answered: the fleet's timers run on in virtual time until it gives up).
struct Lab {
    fleet: Fleet,
    cores: Cores,
}

impl std::ops::Deref for Lab {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.fleet
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut Fleet {
        &mut self.fleet
    }
}

impl Lab {
    /// Carries the call commands out and their replies back (statistics requests are
    /// left unanswered: the tests answer those themselves).
    fn carry(&mut self) {
        let now = self.cores.now;
        while let Some((to, d)) = self.fleet.poll_transmit(now) {
            if d.starts_with(b"s") {
                continue;
            }
            if let Some(reply) = self.cores.answer(to, &d) {
                assert!(self.fleet.handle_reply(now, to, &reply), "the fleet takes its relay's reply");
            }
        }
    }

    /// Carries datagrams until some waiting call is ready, running the fleet's timers in
    /// virtual time when nothing answers.
    fn until_ready(&mut self) {
        for _ in 0..100 {
            self.carry();
            if self.fleet.poll_ready().is_some() {
                while self.fleet.poll_ready().is_some() {}
                return;
            }
            let next = self.fleet.asked_order.front().map(|(t, _)| *t).expect("a command in flight");
            self.cores.now = self.cores.now.max(next);
            self.fleet.handle_timeout(self.cores.now);
        }
        panic!("the fleet never got ready");
    }

    /// Anchors as the signalling core does: handled again each time its call is ready.
    fn anchor_sdp(&mut self, s: &SdpIn<'_>) -> Result<Vec<u8>, MediaRefusal> {
        loop {
            let now = self.cores.now;
            match self.fleet.anchor_sdp(now, s) {
                Ok(out) => return Ok(out),
                Err(Unanchored::Refused(r)) => return Err(r),
                Err(Unanchored::Waiting) => self.until_ready(),
            }
        }
    }

    fn reply(&mut self, from: SocketAddr, datagram: &[u8]) -> bool {
        let now = self.cores.now;
        self.fleet.handle_reply(now, from, datagram)
    }

    /// Releases the call and carries its deletes (running out the timers of those a dead
    /// relay never answers); what the fleet then says the call carried.
    fn release_counting(&mut self, call_id: &str) -> Option<(u64, u64)> {
        if !self.fleet.release(call_id) {
            return None;
        }
        self.carry();
        while let Some(next) = self.fleet.asked_order.front().map(|(t, _)| *t) {
            self.cores.now = self.cores.now.max(next);
            self.fleet.handle_timeout(self.cores.now);
            self.carry();
        }
        let (id, counts) = self.fleet.poll_released().expect("the first hop's delete answered or given up");
        assert_eq!(id, call_id);
        counts
    }

    fn release(&mut self, call_id: &str) -> bool {
        let released = self.fleet.release(call_id);
        self.carry();
        released
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

fn fleet(specs: Vec<RelaySpec>) -> Lab {
    let now = Instant::now();
    let relays = specs
        .iter()
        .map(|s| {
            let cfg = RelayConfig { max_sessions: 40, ..RelayConfig::single(s.ng.ip(), 30000, 30999) };
            (s.ng, (NgServer::new(now, 1_700_000_000), Relay::new(cfg, now)))
        })
        .collect();
    let cores = Cores { relays, dead: HashSet::new(), now, sent: Vec::new() };
    Lab { fleet: Fleet::new(specs, now, (1000, Duration::from_secs(4 * 3600)), [4; 32]), cores }
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
    f: &mut Lab,
    call: &str,
    tag: &str,
    (from, port): (&str, u16),
    to: Option<&str>,
) -> Result<Vec<u8>, MediaRefusal> {
    let body = sdp(from, port);
    let s = SdpIn {
        call_id: call,
        sender_tag: tag,
        sdp: &body,
        signalling_ip: ip(from),
        to: to.map(ip),
        hide: false,
        to_browser: false,
        record: false,
    };
    f.anchor_sdp(&s)
}

/// An offer from the caller to the callee; the SDP forwarded to the callee.
fn offer(f: &mut Lab, call: &str) -> Result<Vec<u8>, MediaRefusal> {
    anchor(f, call, "a", (CALLER, 4000), Some(CALLEE))
}

fn answer(f: &mut Lab, call: &str) -> Result<Vec<u8>, MediaRefusal> {
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
fn cookie_to(f: &mut Lab, port: u8) -> Vec<u8> {
    f.cores.now += Duration::from_secs(1);
    let now = f.cores.now;
    let mut found = None;
    while let Some((to, d)) = f.poll_transmit(now) {
        if to == ng(port) && found.is_none() {
            found = d.split(|b| *b == b' ').next().map(<[u8]>::to_vec);
        }
    }
    found.expect("a statistics request")
}

/// The relay's answer to the fleet's latest statistics request.
fn stats_reply(f: &mut Lab, port: u8, sessions: i64) -> Vec<u8> {
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
    assert_eq!((f.cores.calls_on(21), f.cores.calls_on(22)), (10, 10));
}

#[test]
fn weights_share_calls_in_proportion() {
    let mut f = fleet(vec![spec(21, 3, None, &[]), spec(22, 1, None, &[])]);
    for n in 0..20 {
        offer(&mut f, &format!("call-{n}")).expect("anchored");
    }
    assert_eq!((f.cores.calls_on(21), f.cores.calls_on(22)), (15, 5));
}

#[test]
fn reported_load_steers_new_calls_to_the_less_busy_relay() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    assert!({
        let r = stats_reply(&mut f, 21, 30);
        f.reply(ng(21), &r)
    });
    assert!({
        let r = stats_reply(&mut f, 22, 0);
        f.reply(ng(22), &r)
    });
    for n in 0..10 {
        offer(&mut f, &format!("call-{n}")).expect("anchored");
    }
    assert_eq!((f.cores.calls_on(21), f.cores.calls_on(22)), (0, 10), "30 sessions elsewhere outweigh 10 new");
}

#[test]
fn a_relay_that_stops_answering_is_taken_out_and_new_calls_go_to_the_survivor() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    f.cores.dead.insert(ng(21));
    for n in 0..6 {
        let out = offer(&mut f, &format!("call-{n}")).expect("the survivor anchors every call");
        assert_eq!(connection(&out), "203.0.113.22");
    }
    assert_eq!(f.cores.calls_on(22), 6);
    let tried_dead = f.cores.sent.iter().filter(|(to, _)| *to == ng(21)).count();
    assert_eq!(tried_dead, COMMAND_TRIES as usize, "the silent relay is tried for one call, then left out");
    assert_eq!(f.poll_change(), Some(Change { relay: ng(21), up: false, why: "no reply to a call command" }));
    assert!(f.relays().any(|(a, up, _)| a == ng(21) && !up));

    // It answers its statistics again: back in, and the next calls balance onto it.
    f.cores.dead.clear();
    assert!({
        let r = stats_reply(&mut f, 21, 0);
        f.reply(ng(21), &r)
    });
    assert!({
        let r = stats_reply(&mut f, 22, 6);
        f.reply(ng(22), &r)
    });
    assert_eq!(f.poll_change(), Some(Change { relay: ng(21), up: true, why: "statistics answered" }));
    offer(&mut f, "call-after").expect("anchored");
    assert_eq!(f.cores.calls_on(21), 1);
}

#[test]
fn a_call_answered_on_a_relay_that_died_gets_503_naming_the_relay_failure() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    offer(&mut f, "c").expect("anchored");
    f.cores.dead.insert(ng(21));
    let r = answer(&mut f, "c").expect_err("no relay to take the answer");
    assert_eq!((r.code, r.reason.as_str()), (503, "Media Relay Not Answering"));
}

#[test]
fn with_every_relay_silent_a_new_call_is_refused_with_503() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    f.cores.dead.extend([ng(21), ng(22)]);
    let r = offer(&mut f, "c").expect_err("nobody answers");
    assert_eq!((r.code, r.reason.as_str()), (503, "No Media Relay Answering"));
    assert!(!f.anchors("c"));
}

#[test]
fn unanswered_statistics_take_a_relay_out_after_three_seconds() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    let t0 = f.cores.now;
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
    assert!(!f.reply(ng(99), &stats_reply_with(b"s1", 1)), "not one of our relays");
    assert!(!f.reply(ng(21), b"s1 d6:result2:oke"), "no statistics");
    assert!(!f.reply(ng(21), b"c1 d6:result2:oke"), "not a statistics cookie");
    // A stranger on the relay's address with a statistics reply, but no cookie of ours.
    let _ = cookie_to(&mut f, 21);
    for guess in [&b"s1"[..], b"s9", b"s2", b"0000000000000001"] {
        assert!(!f.reply(ng(21), &stats_reply_with(guess, 1)), "guessed cookie {guess:?}");
    }
    assert!(!f.reply(ng(21), b"\xff\xfe"), "not ng");
    assert!({
        let r = stats_reply(&mut f, 21, 1);
        f.reply(ng(21), &r)
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
    let sent: Vec<_> = f.cores.sent.iter().map(|(to, c)| (to.ip().to_string(), c.as_str())).collect();
    let want =
        [("203.0.113.21", "offer"), ("203.0.113.22", "offer"), ("203.0.113.22", "answer"), ("203.0.113.21", "answer")];
    assert_eq!(
        sent,
        want.map(|(a, c)| (a.to_owned(), c)),
        "offer out through eu then us, answer back through us then eu"
    );

    // Each relay's far side points at the other relay.
    let eu = f.cores.relays[&ng(21)].1.describe("c").expect("eu holds the call");
    let us = f.cores.relays[&ng(22)].1.describe("c").expect("us holds the call");
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
    assert_eq!(f.cores.sent.iter().filter(|(_, c)| c == "answer").count(), 1);
}

#[test]
fn a_re_invite_from_the_callee_is_an_offer_from_its_side() {
    let mut f = fleet(vec![spec(21, 1, Some("eu"), &["198.51.100.0/24"]), spec(22, 1, Some("us"), &["192.0.2.0/24"])]);
    offer(&mut f, "c").expect("anchored");
    answer(&mut f, "c").expect("answered");
    f.cores.sent.clear();
    let to_caller = anchor(&mut f, "c", "b", (CALLEE, 5002), None).expect("re-offer");
    assert_eq!(connection(&to_caller), "203.0.113.21");
    anchor(&mut f, "c", "a", (CALLER, 4002), None).expect("its answer");
    let sent: Vec<_> = f.cores.sent.iter().map(|(to, c)| (to.ip().to_string(), c.as_str())).collect();
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
    assert_eq!((f.cores.calls_on(21), f.cores.calls_on(22)), (0, 0));
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
        let streams = f.cores.relays[&ng(n)].1.stats("c").expect("call on the relay");
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
    assert_eq!((f.cores.calls_on(21), f.cores.calls_on(22)), (0, 0), "deleted on every hop");
    assert_eq!(f.release_counting("c"), None, "released once");

    offer(&mut f, "d").expect("anchored");
    f.cores.dead.insert(ng(21));
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
    f.cores.dead.insert(ng(22));
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

/// The fleet's own view of anchoring `call`'s offer: no carrying, no retries.
fn offer_once(f: &mut Lab, call: &str) -> Result<Vec<u8>, Unanchored> {
    let body = sdp(CALLER, 4000);
    let s = SdpIn {
        call_id: call,
        sender_tag: "a",
        sdp: &body,
        signalling_ip: ip(CALLER),
        to: Some(ip(CALLEE)),
        hide: false,
        to_browser: false,
        record: false,
    };
    let now = f.cores.now;
    f.fleet.anchor_sdp(now, &s)
}

#[test]
fn a_call_command_goes_out_as_a_datagram_and_its_message_waits_for_the_reply() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    assert_eq!(offer_once(&mut f, "c"), Err(Unanchored::Waiting), "nothing waits on a socket");
    assert_eq!(f.in_flight(), 1);
    assert_eq!(offer_once(&mut f, "c"), Err(Unanchored::Waiting), "the same offer again while it is in flight");
    let now = f.cores.now;
    let (to, d) = f.fleet.poll_transmit(now).expect("the offer");
    assert_eq!(to, ng(21));
    assert!(f.fleet.poll_transmit(now).is_some_and(|(_, d)| d.starts_with(b"s")), "then only statistics: one offer");
    assert_eq!(f.poll_ready(), None, "not ready before the reply");
    let reply = f.cores.answer(to, &d).expect("the relay answers");
    assert!(f.reply(to, &reply));
    assert_eq!(f.poll_ready().as_deref(), Some("c"));
    assert_eq!(f.in_flight(), 0);
    let out = offer_once(&mut f, "c").expect("handled again: anchored from the kept answer");
    assert_eq!(connection(&out), "203.0.113.21");
    assert!(f.anchors("c"));
    assert_eq!(f.cores.sent.len(), 1, "the relay was asked once");
    assert!(f.kept.is_empty(), "the answer is dropped once used");
    assert!(!f.reply(to, &reply), "a repeated reply is not taken twice");
}

#[test]
fn a_reply_must_carry_the_commands_cookie_and_come_from_its_relay() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    assert_eq!(offer_once(&mut f, "c"), Err(Unanchored::Waiting));
    let now = f.cores.now;
    let (to, d) = f.fleet.poll_transmit(now).expect("the offer");
    let reply = f.cores.answer(to, &d).expect("reply");
    let other = if to == ng(21) { ng(22) } else { ng(21) };
    assert!(!f.reply(other, &reply), "the right cookie from another relay");
    let mut forged = b"c0123456789abcdef".to_vec();
    forged.extend_from_slice(&reply[reply.iter().position(|b| *b == b' ').expect("cookie")..]);
    assert!(!f.reply(to, &forged), "a guessed cookie from the right address");
    assert_eq!(f.poll_ready(), None);
    assert!(f.reply(to, &reply));
    assert_eq!(f.poll_ready().as_deref(), Some("c"));
}

#[test]
fn an_answer_nobody_comes_back_for_has_its_session_deleted_on_the_relay() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    assert_eq!(offer_once(&mut f, "cancelled"), Err(Unanchored::Waiting));
    f.carry();
    assert_eq!(f.poll_ready().as_deref(), Some("cancelled"));
    assert_eq!(f.cores.calls_on(21), 1, "the relay made the session");
    // The INVITE was cancelled meanwhile: it never comes back for its answer.
    f.cores.now += ANSWER_KEPT;
    let now = f.cores.now;
    f.fleet.handle_timeout(now);
    f.carry();
    assert_eq!(f.cores.calls_on(21), 0, "deleted when the kept answer expired");
    assert_eq!(f.cores.sent.last().map(|(_, c)| c.as_str()), Some("delete"));
    assert!(f.kept.is_empty());
}

#[test]
fn a_silent_relay_is_asked_twice_then_the_waiting_offer_goes_to_the_next() {
    let mut f = fleet(vec![spec(21, 1, None, &[]), spec(22, 1, None, &[])]);
    f.cores.dead.insert(ng(21));
    let t0 = f.cores.now;
    assert_eq!(offer_once(&mut f, "c"), Err(Unanchored::Waiting));
    f.carry();
    assert_eq!(f.poll_timeout(), Some(t0 + COMMAND_WAIT), "a resend is due");
    f.until_ready();
    assert_eq!(f.cores.now, t0 + COMMAND_WAIT * COMMAND_TRIES, "given up after {COMMAND_TRIES} tries");
    // Handled again: the silence is kept, the offer goes to the survivor.
    assert_eq!(offer_once(&mut f, "c"), Err(Unanchored::Waiting));
    f.until_ready();
    let out = offer_once(&mut f, "c").expect("anchored on the survivor");
    assert_eq!(connection(&out), "203.0.113.22");
    let to_dead = f.cores.sent.iter().filter(|(to, _)| *to == ng(21)).count();
    assert_eq!(to_dead, COMMAND_TRIES as usize);
}

#[test]
fn commands_in_flight_are_bounded_and_past_the_bound_a_new_call_gets_503() {
    let mut f = fleet(vec![spec(21, 1, None, &[])]);
    f.fleet.max_calls = usize::MAX;
    for n in 0..MAX_ASKED {
        assert_eq!(offer_once(&mut f, &format!("c{n}")), Err(Unanchored::Waiting));
    }
    let r = offer_once(&mut f, "one-more");
    assert_eq!(
        r,
        Err(Unanchored::Refused(MediaRefusal { code: 503, reason: "Media Relay Commands Backlogged".into() }))
    );
    assert_eq!(f.in_flight(), MAX_ASKED);
}
