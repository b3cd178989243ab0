//! Both sides of every plan carried out by two schedulers across two modelled NATs, with
//! 10 ms of latency, in virtual time.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::natmodel::{matrix_pairs, NatKind, NatModel, MATRIX as KINDS};
use crate::punch::{choose, NatProfile};

const SERVER: &str = "203.0.113.1:3478";
const LATENCY: Duration = Duration::from_millis(10);

/// A datagram on the wire: (to side, public port, source, bytes), keyed by (arrival, sequence).
type InFlight = (usize, u16, SocketAddr, Vec<u8>);

struct Peer {
    nat: NatModel,
    lan: IpAddr,
    puncher: Puncher,
}

impl Peer {
    fn local(&self, socket: usize) -> SocketAddr {
        SocketAddr::new(self.lan, 31000 + u16::try_from(socket).unwrap_or(0))
    }
}

fn creds(us: &str, them: &str) -> Credentials {
    Credentials {
        local_ufrag: us.into(),
        local_pwd: format!("{us}-password-0123456789"),
        remote_ufrag: them.into(),
        remote_pwd: format!("{them}-password-0123456789"),
    }
}

/// Plans a call between kinds `a` and `b` and runs both sides; returns the method and the
/// time from start until both sides adopted the same path, if they did.
fn run(a: NatKind, b: NatKind) -> (Strategy, Option<Duration>) {
    let t0 = Instant::now();
    let mut nats = [
        NatModel::new(a, "203.0.113.2".parse().expect("ip"), 5),
        NatModel::new(b, "203.0.113.3".parse().expect("ip"), 9),
    ];
    let lans: [IpAddr; 2] = ["198.51.100.10".parse().expect("ip"), "198.51.100.138".parse().expect("ip")];
    // Each agent's STUN binding from its media socket gives its window and profile.
    let windows: Vec<SocketAddr> = (0..2)
        .map(|i| nats[i].outbound(t0, SocketAddr::new(lans[i], 31000), SERVER.parse().expect("addr")).expect("no loss"))
        .collect();
    let profile = |n: &NatModel, w: SocketAddr| NatProfile {
        mapping: Some(n.kind.mapping),
        filtering: Some(n.kind.filtering),
        allocation: Some(n.kind.allocation.as_reported()),
        window: Some(w),
        portmap: None,
    };
    let strategy = choose(&profile(&nats[0], windows[0]), &profile(&nats[1], windows[1]));
    let start = t0 + Duration::from_millis(10);
    let plan = |side: Side, c: Credentials| PunchPlan {
        strategy,
        side,
        windows: [windows[0], windows[1]],
        credentials: c,
        start,
    };
    let [na, nb] = nats;
    let mut peers = [
        Peer { nat: na, lan: lans[0], puncher: Puncher::new(plan(Side::A, creds("aaaa", "bbbb")), 1) },
        Peer { nat: nb, lan: lans[1], puncher: Puncher::new(plan(Side::B, creds("bbbb", "aaaa")), 2) },
    ];
    let mut wire: BTreeMap<(Instant, u64), InFlight> = BTreeMap::new();
    let mut seq = 0u64;
    let mut now = t0;
    while now < start + PUNCH_DEADLINE + Duration::from_secs(1) {
        for i in 0..2 {
            while let Some(t) = peers[i].puncher.poll_transmit() {
                let local = peers[i].local(t.socket);
                let Some(src) = peers[i].nat.outbound(now, local, t.to) else { continue };
                let j = 1 - i;
                if t.to.ip() == peers[j].nat.public {
                    seq += 1;
                    wire.insert((now + LATENCY, seq), (j, t.to.port(), src, t.bytes));
                }
            }
        }
        if let (Some(pa), Some(pb)) = (peers[0].puncher.path(), peers[1].puncher.path()) {
            // Both adopted: each names the other's public side of the same pair of mappings.
            let a_public = peers[0].nat.outbound(now, peers[0].local(pa.0), pa.1).expect("no loss");
            assert_eq!(pb.1, a_public, "B adopted A's mapping towards it");
            return (strategy, Some(now.duration_since(start)));
        }
        let next_wire = wire.keys().next().map(|(t, _)| *t);
        let next_timer = peers.iter().filter_map(|p| p.puncher.poll_timeout()).min();
        let Some(t) = [next_wire, next_timer].into_iter().flatten().min() else { break };
        now = t.max(now);
        while let Some(((at, _), _)) = wire.first_key_value() {
            if *at > now {
                break;
            }
            let Some((_, (j, port, src, bytes))) = wire.pop_first() else { break };
            if let Some(local) = peers[j].nat.inbound(now, port, src) {
                let socket = usize::from(local.port() - 31000);
                peers[j].puncher.handle_input(now, socket, src, &bytes);
            }
        }
        for p in &mut peers {
            p.puncher.handle_timeout(now);
        }
    }
    (strategy, None)
}

#[test]
fn every_planned_cell_gets_a_direct_path_in_time_and_relay_cells_none() {
    let mut report = Vec::new();
    for (i, j) in matrix_pairs() {
        let (s, took) = run(KINDS[i].1, KINDS[j].1);
        let limit = match s {
            Strategy::Reach { .. } | Strategy::SimultaneousOpen => Duration::from_secs(1),
            _ => Duration::from_secs(2),
        };
        match took {
            Some(t) => {
                assert!(s.is_direct() && t <= limit, "{} × {}: {} took {t:?}", KINDS[i].0, KINDS[j].0, s.label())
            }
            None => assert!(!s.is_direct(), "{} × {}: {} never made a path", KINDS[i].0, KINDS[j].0, s.label()),
        }
        report.push(format!("{:>16} × {:<16} {:<18} {:?}", KINDS[i].0, KINDS[j].0, s.label(), took));
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(report.iter().filter(|r| !r.ends_with("None")).count(), 13);
}

#[test]
fn a_check_signed_with_the_wrong_password_is_neither_answered_nor_adopted() {
    let t0 = Instant::now();
    let plan = PunchPlan {
        strategy: Strategy::SimultaneousOpen,
        side: Side::A,
        windows: ["203.0.113.2:31000".parse().expect("a"), "203.0.113.3:31000".parse().expect("b")],
        credentials: creds("aaaa", "bbbb"),
        start: t0,
    };
    let mut p = Puncher::new(plan, 1);
    // A stranger who knows the ufrags but not A's password.
    let mut wrong = creds("bbbb", "aaaa");
    wrong.remote_pwd = "not-a-password".into();
    let mut liar = Puncher::new(
        PunchPlan {
            strategy: Strategy::SimultaneousOpen,
            side: Side::B,
            windows: ["203.0.113.2:31000".parse().expect("a"), "192.0.2.66:4000".parse().expect("x")],
            credentials: wrong,
            start: t0,
        },
        3,
    );
    let checks = |puncher: &mut Puncher| {
        puncher.handle_timeout(t0);
        std::iter::from_fn(|| puncher.poll_transmit()).filter(|t| !t.bytes.is_empty()).collect::<Vec<_>>()
    };
    let forged = checks(&mut liar);
    assert!(!forged.is_empty(), "the stranger sent checks");
    p.handle_timeout(t0);
    while p.poll_transmit().is_some() {}
    for t in &forged {
        // Even from the peer's own address.
        p.handle_input(t0, 0, "203.0.113.3:31000".parse().expect("b"), &t.bytes);
    }
    assert!(p.poll_transmit().is_none(), "no answer, no triggered check");
    assert_eq!(p.path(), None);
    // The control: the same checks signed with B's real password are answered.
    let mut honest = Puncher::new(
        PunchPlan {
            strategy: Strategy::SimultaneousOpen,
            side: Side::B,
            windows: ["203.0.113.2:31000".parse().expect("a"), "203.0.113.3:31000".parse().expect("b")],
            credentials: creds("bbbb", "aaaa"),
            start: t0,
        },
        3,
    );
    for t in &checks(&mut honest) {
        p.handle_input(t0, 0, "203.0.113.3:31000".parse().expect("b"), &t.bytes);
    }
    assert!(p.poll_transmit().is_some(), "a check B really signed is answered");
}

fn plan(strategy: Strategy, side: Side, t0: Instant) -> PunchPlan {
    let (us, them) = if side == Side::A { ("aaaa", "bbbb") } else { ("bbbb", "aaaa") };
    PunchPlan {
        strategy,
        side,
        windows: ["203.0.113.2:31000".parse().expect("a"), "203.0.113.3:31000".parse().expect("b")],
        credentials: creds(us, them),
        start: t0,
    }
}

#[test]
fn a_correctly_signed_check_from_another_address_than_the_peers_makes_us_send_nothing() {
    let t0 = Instant::now();
    let mut a = Puncher::new(plan(Strategy::SimultaneousOpen, Side::A, t0), 1);
    let mut b = Puncher::new(plan(Strategy::SimultaneousOpen, Side::B, t0), 2);
    a.handle_timeout(t0);
    while a.poll_transmit().is_some() {}
    b.handle_timeout(t0);
    let signed: Vec<PunchTransmit> = std::iter::from_fn(|| b.poll_transmit()).filter(|t| !t.bytes.is_empty()).collect();
    assert!(!signed.is_empty());
    // B holds the credentials but sends from (or spoofs) a victim's address.
    for t in &signed {
        a.handle_input(t0, 0, "192.0.2.77:9".parse().expect("victim"), &t.bytes);
    }
    assert!(a.poll_transmit().is_none(), "nothing towards the victim");
    assert_eq!(a.foreign(), signed.len() as u64);
    // The control: from B's address the same checks are answered and met.
    for t in &signed {
        a.handle_input(t0, 0, "203.0.113.3:31000".parse().expect("b"), &t.bytes);
    }
    let out: Vec<PunchTransmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert!(out.len() >= 2 && out.iter().all(|t| t.to == "203.0.113.3:31000".parse().expect("b")), "{out:?}");
}

#[test]
fn no_plan_sends_more_than_its_budget_and_only_to_the_peers_address_when_nobody_answers() {
    let t0 = Instant::now();
    let peer_ip = |side: Side| if side == Side::A { "203.0.113.3" } else { "203.0.113.2" };
    for strategy in [
        Strategy::Reach { target: Side::A, open_first: true },
        Strategy::SimultaneousOpen,
        Strategy::Prediction { symmetric: Side::A, delta: 1, window: crate::punch::PREDICTION_WINDOW },
        Strategy::LockstepShotgun { delta: [1, 1], window: crate::punch::PREDICTION_WINDOW },
        Strategy::Birthday {
            hard: Side::A,
            sockets: crate::punch::BIRTHDAY_SOCKETS,
            probes: crate::punch::BIRTHDAY_PROBES,
        },
    ] {
        for side in Side::BOTH {
            let mut p = Puncher::new(plan(strategy, side, t0), 7);
            let mut sent = Vec::new();
            while let Some(t) = p.poll_timeout() {
                p.handle_timeout(t);
                sent.extend(std::iter::from_fn(|| p.poll_transmit()));
            }
            let label = format!("{} side {side:?}", strategy.label());
            assert!(!sent.is_empty(), "{label}: it punched");
            assert!(sent.len() <= MAX_UNANSWERED as usize, "{label}: {} packets", sent.len());
            assert_eq!(p.unanswered_sent() as usize, sent.len(), "{label}: every one counted");
            assert!(sent.iter().all(|t| t.to.ip().to_string() == peer_ip(side)), "{label}: only the peer's address");
            // Checks at one known address back off as ICE's do: 20 a second, then 5.
            let single = sent.iter().all(|t| t.to == sent[0].to);
            if single && !matches!(strategy, Strategy::Birthday { hard, .. } if hard == side) {
                assert!(sent.len() <= 42, "{label}: {} checks at one address", sent.len());
            }
        }
    }
}
