//! Two agents' paths across two modelled NATs and a modelled server (STUN plus a latching
//! relay), in virtual time with 10 ms each way: both phones send media every 20 ms along
//! whatever route their agent says, and what each hears, and how, is recorded.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::natmodel::{matrix_pairs, NatKind, NatModel, MATRIX as KINDS};
use crate::punch::scheduler::Credentials;
use crate::punch::{choose, NatProfile, Strategy};
use crate::relay::Side;

const STUN: &str = "203.0.113.1:3478";
/// The server relay's port for each side's leg.
const RELAY: [&str; 2] = ["203.0.113.1:30000", "203.0.113.1:30002"];
const LATENCY: Duration = Duration::from_millis(10);
const FRAME: Duration = Duration::from_millis(20);
const MEDIA: &[u8] = &[0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7];

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn creds(us: &str, them: &str) -> Credentials {
    Credentials {
        local_ufrag: us.into(),
        local_pwd: format!("{us}-password-0123456789"),
        remote_ufrag: them.into(),
        remote_pwd: format!("{them}-password-0123456789"),
    }
}

struct Agent {
    nat: NatModel,
    lan: IpAddr,
    path: DirectPath,
    /// Media heard: (arrival, direct?).
    heard: Vec<(Instant, bool)>,
    events: Vec<(Instant, PathEvent)>,
    /// Announcements (relay keepalives) this agent's relay leg carried.
    relay_keepalives: u32,
}

impl Agent {
    fn local(&self, socket: usize) -> SocketAddr {
        SocketAddr::new(self.lan, 31000 + u16::try_from(socket).expect("socket"))
    }

    /// Longest silence between media packets heard from `from` on.
    fn longest_gap(&self, from: Instant) -> Duration {
        let times: Vec<Instant> = self.heard.iter().map(|h| h.0).filter(|t| *t >= from).collect();
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(Duration::MAX)
    }
}

/// A packet in flight: (to, from, bytes).
type Packet = (SocketAddr, SocketAddr, Vec<u8>);

struct Lab {
    agents: [Agent; 2],
    strategy: Strategy,
    t0: Instant,
    now: Instant,
    wire: BTreeMap<(Instant, u64), Packet>,
    seq: u64,
    /// The relay's latched source per leg.
    latched: [Option<SocketAddr>; 2],
    next_frame: Instant,
    /// From then on, packets between the two NATs are dropped (a firewall rule).
    cut: Option<Instant>,
}

impl Lab {
    fn new(a: NatKind, b: NatKind, wrong_password: bool) -> Lab {
        Lab::with(a, b, wrong_password, None)
    }

    /// A lab where the gateway of side `mapped` (if any) maps the agent's window on
    /// request (PCP/NAT-PMP), as that agent reports in its profile.
    fn with(a: NatKind, b: NatKind, wrong_password: bool, mapped: Option<usize>) -> Lab {
        let t0 = Instant::now();
        let mut nats = [
            NatModel::new(a, "203.0.113.2".parse().expect("ip"), 5),
            NatModel::new(b, "203.0.113.3".parse().expect("ip"), 9),
        ];
        let lans: [IpAddr; 2] = ["198.51.100.10".parse().expect("ip"), "198.51.100.138".parse().expect("ip")];
        // The profiles as the agents registered them (their probe socket's mapping).
        let profiles: Vec<NatProfile> = (0..2)
            .map(|i| NatProfile {
                mapping: Some(nats[i].kind.mapping),
                filtering: Some(nats[i].kind.filtering),
                allocation: Some(nats[i].kind.allocation.as_reported()),
                window: nats[i].outbound(t0, SocketAddr::new(lans[i], 40000), addr(STUN)),
                portmap: (mapped == Some(i)).then_some(crate::portmap::Protocol::Pcp),
            })
            .collect();
        // The mapped side's gateway forwards its window socket (31000) at a port of its own.
        let external = mapped.map(|i| (i, nats[i].forward(SocketAddr::new(lans[i], 31000), 45_000)));
        let strategy = choose(&profiles[0], &profiles[1]);
        let windows = [profiles[0].window.expect("a"), profiles[1].window.expect("b")];
        let start = t0 + Duration::from_millis(200);
        let plan = |side: Side, c: Credentials| PunchPlan { strategy, side, windows, credentials: c, start };
        let mut b_creds = creds("bbbb", "aaaa");
        if wrong_password {
            b_creds.remote_pwd = "not-the-password-of-aaaa".into();
        }
        let [na, nb] = nats;
        let agent =
            |nat, lan, path| Agent { nat, lan, path, heard: Vec::new(), events: Vec::new(), relay_keepalives: 0 };
        let mut agents = [
            agent(na, lans[0], DirectPath::new(plan(Side::A, creds("aaaa", "bbbb")), addr(STUN), 1)),
            agent(nb, lans[1], DirectPath::new(plan(Side::B, b_creds), addr(STUN), 2)),
        ];
        if let Some((i, public)) = external {
            agents[i].path.set_mapped(t0, public);
        }
        Lab {
            agents,
            strategy,
            t0,
            now: t0,
            wire: BTreeMap::new(),
            seq: 0,
            latched: [None, None],
            next_frame: t0,
            cut: None,
        }
    }

    fn put(&mut self, to: SocketAddr, from: SocketAddr, bytes: Vec<u8>) {
        self.seq += 1;
        self.wire.insert((self.now + LATENCY, self.seq), (to, from, bytes));
    }

    /// Sends from agent `i`'s socket through its NAT.
    fn send(&mut self, i: usize, socket: usize, to: SocketAddr, bytes: Vec<u8>) {
        let local = self.agents[i].local(socket);
        let Some(src) = self.agents[i].nat.outbound(self.now, local, to) else { return };
        let between_nats = self.agents.iter().any(|a| a.nat.public == to.ip());
        if between_nats && self.cut.is_some_and(|c| self.now >= c) {
            return;
        }
        self.put(to, src, bytes);
    }

    fn deliver(&mut self, to: SocketAddr, from: SocketAddr, bytes: Vec<u8>) {
        if to == addr(STUN) {
            if let Some(reply) = crate::stun::binding_response(&bytes, from) {
                self.put(from, to, reply);
            }
            return;
        }
        if let Some(leg) = RELAY.iter().position(|r| addr(r) == to) {
            // The server relay: latches each leg's source, forwards to the other leg.
            self.latched[leg].get_or_insert(from);
            if self.latched[leg] != Some(from) {
                return;
            }
            if crate::stun::looks_like_stun(&bytes) {
                self.agents[leg].relay_keepalives += 1;
            }
            if let Some(dst) = self.latched[1 - leg] {
                self.put(dst, addr(RELAY[1 - leg]), bytes);
            }
            return;
        }
        let Some(j) = self.agents.iter().position(|a| a.nat.public == to.ip()) else { return };
        let now = self.now;
        let a = &mut self.agents[j];
        let Some(local) = a.nat.inbound(now, to.port(), from) else { return };
        let socket = usize::from(local.port() - 31000);
        let relay = Some(addr(RELAY[j]));
        let control = (bytes.is_empty() || crate::stun::looks_like_stun(&bytes))
            && a.path.handle_input(now, socket, from, &bytes, relay);
        if control {
            return;
        }
        if from == addr(RELAY[j]) && socket == 0 {
            a.heard.push((now, false));
        } else if a.path.accepts(socket, from) {
            a.heard.push((now, true));
        }
    }

    fn flush(&mut self) {
        for i in 0..2 {
            while let Some(t) = self.agents[i].path.poll_transmit() {
                self.send(i, t.socket, t.to, t.bytes);
            }
            while let Some(e) = self.agents[i].path.poll_event() {
                self.agents[i].events.push((self.now, e));
            }
        }
    }

    /// Runs until `until`: media every frame from both phones, along their agent's route.
    fn run(&mut self, until: Instant) {
        while self.now < until {
            self.flush();
            let timers = self.agents.iter().filter_map(|a| a.path.poll_timeout()).min();
            let wire = self.wire.keys().next().map(|k| k.0);
            let next = [timers, wire, Some(self.next_frame), Some(until)].into_iter().flatten().min();
            self.now = next.expect("something is due").max(self.now);
            while let Some(((at, _), _)) = self.wire.first_key_value() {
                if *at > self.now {
                    break;
                }
                let Some((_, (to, from, bytes))) = self.wire.pop_first() else { break };
                self.deliver(to, from, bytes);
            }
            if self.now >= self.next_frame {
                for (i, relay) in RELAY.iter().enumerate() {
                    match self.agents[i].path.route() {
                        Route::Relay => self.send(i, 0, addr(relay), MEDIA.to_vec()),
                        Route::Direct { socket, to } => self.send(i, socket, to, MEDIA.to_vec()),
                        Route::Both { socket, to } => {
                            self.send(i, socket, to, MEDIA.to_vec());
                            self.send(i, 0, addr(relay), MEDIA.to_vec());
                        }
                    }
                }
                self.next_frame += FRAME;
            }
            for (a, relay) in self.agents.iter_mut().zip(RELAY) {
                a.path.handle_timeout(self.now, Some(addr(relay)));
            }
        }
        self.flush();
    }

    fn direct_at(&self, i: usize) -> Option<Instant> {
        self.agents[i].events.iter().find(|(_, e)| matches!(e, PathEvent::Direct { .. })).map(|(t, _)| *t)
    }

    fn start(&self) -> Instant {
        self.t0 + Duration::from_millis(200)
    }
}

#[test]
fn every_planned_cell_goes_direct_through_gathering_and_announcing_with_no_gap_in_media() {
    let mut report = Vec::new();
    for (i, j) in matrix_pairs() {
        let mut lab = Lab::new(KINDS[i].1, KINDS[j].1, false);
        let until = lab.start() + Duration::from_secs(4);
        lab.run(until);
        let cell = format!("{} × {}: {}", KINDS[i].0, KINDS[j].0, lab.strategy.label());
        // Media was heard from the first frames on, relayed, whatever the plan.
        for a in &lab.agents {
            let first = a.heard.first().map(|h| h.0).expect("media heard");
            assert!(first - lab.t0 <= Duration::from_millis(100), "{cell}: first media after {:?}", first - lab.t0);
            assert!(a.longest_gap(first) <= Duration::from_millis(60), "{cell}: a gap of {:?}", a.longest_gap(first));
        }
        match (lab.direct_at(0), lab.direct_at(1)) {
            (Some(da), Some(db)) => {
                assert!(lab.strategy.is_direct(), "{cell}");
                let took = da.max(db) - lab.start();
                let limit = match lab.strategy {
                    Strategy::Reach { .. } | Strategy::SimultaneousOpen => Duration::from_secs(1),
                    _ => Duration::from_secs(2),
                };
                assert!(took <= limit, "{cell}: direct after {took:?}");
                // And the media really moved: the last second came directly, both ways.
                for a in &lab.agents {
                    let late: Vec<bool> =
                        a.heard.iter().filter(|h| h.0 >= until - Duration::from_secs(1)).map(|h| h.1).collect();
                    assert!(late.len() >= 45 && late.iter().all(|d| *d), "{cell}: late media not all direct");
                }
                report.push(format!("{cell} direct after {took:?}"));
            }
            (None, None) => {
                assert!(!lab.strategy.is_direct(), "{cell}: planned but never direct");
                report.push(format!("{cell} relayed"));
            }
            other => panic!("{cell}: only one side went direct: {other:?}"),
        }
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(report.iter().filter(|r| r.contains("direct after")).count(), 13);
}

#[test]
fn a_direct_path_that_dies_falls_back_to_the_relay_within_a_second_and_the_relay_leg_was_kept_alive() {
    let kinds = KINDS.map(|k| k.1);
    let mut lab = Lab::new(kinds[2], kinds[2], false);
    lab.run(lab.start() + Duration::from_secs(10));
    assert!(lab.direct_at(0).is_some() && lab.direct_at(1).is_some());
    // While direct, the relay leg heard from each agent at least every 2 s.
    for a in &lab.agents {
        assert!(a.relay_keepalives >= 4, "{} keepalives", a.relay_keepalives);
        assert!(matches!(a.path.route(), Route::Direct { .. }));
    }
    let cut = lab.now;
    lab.cut = Some(cut);
    lab.run(cut + Duration::from_secs(3));
    for a in &lab.agents {
        let fell = a.events.iter().find(|(_, e)| *e == PathEvent::FellBack).map(|(t, _)| *t).expect("fell back");
        assert!(fell - cut <= Duration::from_secs(1), "fell back after {:?}", fell - cut);
        assert_eq!(a.path.route(), Route::Relay);
        // A late path sends through the relay too, well before it is given up.
        let gap = a.longest_gap(cut - Duration::from_millis(100));
        assert!(gap <= Duration::from_millis(400), "a dropout of {gap:?}");
        assert!(a.heard.last().is_some_and(|h| !h.1 && h.0 >= lab.now - Duration::from_millis(100)));
    }
    // The rule goes: the path answers again and media goes back to it.
    lab.cut = None;
    let healed = lab.now;
    lab.run(healed + Duration::from_secs(3));
    for a in &lab.agents {
        assert!(matches!(a.path.route(), Route::Direct { .. }), "{:?}", a.path.phase());
        assert_eq!(a.events.last().map(|e| e.1), Some(PathEvent::Recovered));
        assert!(a.longest_gap(healed) <= Duration::from_millis(60));
    }
}

#[test]
fn a_short_loss_on_the_direct_path_sends_through_both_for_a_moment_and_stays_direct() {
    let kinds = KINDS.map(|k| k.1);
    let mut lab = Lab::new(kinds[2], kinds[2], false);
    lab.run(lab.start() + Duration::from_secs(3));
    let cut = lab.now;
    lab.cut = Some(cut);
    lab.run(cut + Duration::from_millis(500));
    for a in &lab.agents {
        assert!(matches!(a.path.route(), Route::Both { .. }), "late: both ways, {:?}", a.path.route());
    }
    lab.cut = None;
    lab.run(cut + Duration::from_secs(2));
    for a in &lab.agents {
        assert!(matches!(a.path.route(), Route::Direct { .. }));
        assert!(!a.events.iter().any(|(_, e)| *e == PathEvent::FellBack), "never given up");
        assert!(a.longest_gap(cut - Duration::from_millis(100)) <= Duration::from_millis(400));
    }
}

#[test]
fn an_announcement_signed_with_the_wrong_password_starts_nothing() {
    let kinds = KINDS.map(|k| k.1);
    let mut lab = Lab::new(kinds[2], kinds[2], true);
    lab.run(lab.start() + Duration::from_secs(6));
    // B signs with the wrong key: A never learns B's window, so A never punches; B learns
    // A's but its checks fail A's verification. Both stay relayed, and both say so.
    assert_eq!(lab.agents[0].path.phase(), Phase::Relayed);
    for a in &lab.agents {
        assert!(a.heard.iter().all(|h| !h.1), "nothing direct");
        assert!(a.events.iter().any(|(_, e)| *e == PathEvent::Failed));
        assert_eq!(a.path.route(), Route::Relay);
    }
}

#[test]
fn a_relay_only_plan_sends_nothing_and_consumes_nothing() {
    let kinds = KINDS.map(|k| k.1);
    let mut lab = Lab::new(kinds[4], kinds[4], false);
    assert!(!lab.strategy.is_direct());
    lab.run(lab.start() + Duration::from_secs(2));
    for a in &mut lab.agents {
        assert_eq!(a.path.phase(), Phase::Relayed);
        assert_eq!(a.path.poll_timeout(), None);
        assert!(a.relay_keepalives == 0 && a.events.is_empty());
        assert!(!a.path.handle_input(lab.now, 0, addr("192.0.2.9:5000"), &[0, 1, 0, 0], None));
        assert!(a.heard.len() >= 90, "media relayed all along");
    }
}

/// The STUN service's answer to the Binding request in `request`, mapping it to `mapped`.
fn stun_answer(request: &[u8], mapped: SocketAddr) -> Vec<u8> {
    let (req, _) = MessageDecoderBuilder::default().build().decode(request).expect("stun");
    let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(*req.transaction_id())
        .with_attribute(XorMappedAddress::from(mapped))
        .build();
    encode(&msg).expect("encoded")
}

#[test]
fn a_peer_announcing_another_address_than_the_one_the_server_saw_is_never_punched() {
    let t0 = Instant::now();
    let windows = [addr("203.0.113.2:40000"), addr("203.0.113.3:40000")];
    let plan = |side, c| PunchPlan { strategy: Strategy::SimultaneousOpen, side, windows, credentials: c, start: t0 };
    let relay = addr(RELAY[0]);
    // A (the attacker's agent) announces `announced`; B must punch only A's vouched address.
    let run = |announced: SocketAddr| {
        let mut a = DirectPath::new(plan(Side::A, creds("aaaa", "bbbb")), addr(STUN), 1);
        let mut b = DirectPath::new(plan(Side::B, creds("bbbb", "aaaa")), addr(STUN), 2);
        let mut b_sent = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_secs(6) {
            a.handle_timeout(now, Some(relay));
            b.handle_timeout(now, Some(relay));
            while let Some(t) = a.poll_transmit() {
                if t.to == addr(STUN) {
                    a.handle_input(now, 0, addr(STUN), &stun_answer(&t.bytes, announced), Some(relay));
                } else if t.to == relay {
                    b.handle_input(now, 0, relay, &t.bytes, Some(relay));
                }
            }
            while let Some(t) = b.poll_transmit() {
                if t.to == addr(STUN) {
                    b.handle_input(now, 0, addr(STUN), &stun_answer(&t.bytes, windows[1]), Some(relay));
                } else if t.to != relay {
                    b_sent.push(t.to);
                }
            }
            now += Duration::from_millis(10);
        }
        (b.phase(), b_sent)
    };
    let (phase, sent) = run(addr("192.0.2.77:9"));
    assert!(sent.is_empty(), "nothing towards the announced victim: {sent:?}");
    assert_eq!(phase, Phase::Relayed, "no punching at all");
    // The control: the same announcement of A's own address starts punching at it.
    let (_, sent) = run(addr("203.0.113.2:40123"));
    assert!(!sent.is_empty() && sent.iter().all(|to| *to == addr("203.0.113.2:40123")), "{sent:?}");
}

#[test]
fn a_mapped_window_makes_the_unpunchable_pairs_go_direct() {
    let kinds = KINDS.map(|k| k.1);
    // symmetric-seq × symmetric-random and random × random: relay without a mapping.
    for (a, b) in [(3, 4), (4, 4)] {
        assert!(!Lab::new(kinds[a], kinds[b], false).strategy.is_direct());
        for side in [0, 1] {
            let mut lab = Lab::with(kinds[a], kinds[b], false, Some(side));
            assert!(lab.strategy.is_direct(), "{:?}", lab.strategy);
            lab.run(lab.start() + Duration::from_secs(3));
            for (i, ag) in lab.agents.iter().enumerate() {
                assert_eq!(ag.path.phase(), Phase::Direct, "{a}×{b} mapped on {side}: agent {i} {:?}", ag.events);
            }
            assert!(lab.agents.iter().all(|ag| ag.heard.iter().any(|h| h.1)), "media went direct");
        }
    }
}
