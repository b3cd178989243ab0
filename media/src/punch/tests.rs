//! The planner over the 15-cell matrix of NAT kinds, and each planned method carried out
//! against two modelled NATs: a plan is only as good as the packets it gets through.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::*;
use crate::natmodel::{matrix_pairs, NatKind, NatModel, PortAllocation, MATRIX};

const SERVER: &str = "203.0.113.1:3478";
const KINDS: [(&str, NatKind); 5] = MATRIX;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// One endpoint: its media socket on a LAN behind a modelled NAT.
struct End {
    nat: NatModel,
    local: SocketAddr,
    window: SocketAddr,
}

impl End {
    fn new(kind: NatKind, lan: &str, public: &str, seed: u64, now: Instant) -> End {
        let mut nat = NatModel::new(kind, public.parse().expect("ip"), seed);
        let local = addr(lan);
        // The agent's STUN binding from its media socket: the window the server learns.
        let window = nat.outbound(now, local, addr(SERVER)).expect("no loss");
        End { nat, local, window }
    }

    fn profile(&self) -> NatProfile {
        let allocation = self.nat.kind.allocation.as_reported();
        NatProfile {
            mapping: Some(self.nat.kind.mapping),
            filtering: Some(self.nat.kind.filtering),
            allocation: Some(allocation),
            window: Some(self.window),
            portmap: None,
        }
    }

    fn ip(&self) -> IpAddr {
        self.nat.public
    }
}

/// A packet from `from`'s socket `local` to `to`: the source the receiver sees, if it
/// reached the receiver's socket `expect_local` (or any of its sockets when `None`).
fn send(now: Instant, from: &mut End, local: SocketAddr, to_end: &mut End, to: SocketAddr) -> Option<SocketAddr> {
    let src = from.nat.outbound(now, local, to)?;
    if to.ip() != to_end.ip() {
        return None;
    }
    to_end.nat.inbound(now, to.port(), src).map(|_| src)
}

/// Carries out `strategy` between `a` and `b`; true when a packet made it each way between
/// the two endpoints' sockets.
fn carry_out(strategy: Strategy, a: &mut End, b: &mut End, now: Instant) -> bool {
    let mut ends = [a, b];
    let idx = |s: Side| s as usize;
    match strategy {
        Strategy::RelayOnly(_) => false,
        Strategy::Reach { target, open_first } => {
            let [x, y] = &mut ends;
            let (tgt, other) = if idx(target) == 0 { (&mut **x, &mut **y) } else { (&mut **y, &mut **x) };
            if open_first {
                let (l, w) = (tgt.local, other.window);
                let _ = send(now, tgt, l, other, w);
            }
            let (l, w) = (other.local, tgt.window);
            let Some(seen) = send(now, other, l, tgt, w) else { return false };
            let l = tgt.local;
            send(now, tgt, l, other, seen).is_some()
        }
        Strategy::SimultaneousOpen => {
            let [x, y] = &mut ends;
            let (la, wa, lb, wb) = (x.local, x.window, y.local, y.window);
            let _ = send(now, x, la, y, wb); // opens A's side, dropped at B
            let Some(seen_a) = send(now, y, lb, x, wa) else { return false };
            send(now, x, la, y, seen_a).is_some()
        }
        Strategy::Prediction { symmetric, delta, window } => {
            let [x, y] = &mut ends;
            let (sym, cone) = if idx(symmetric) == 0 { (&mut **x, &mut **y) } else { (&mut **y, &mut **x) };
            // The symmetric side sends first: a new mapping at its next port, dropped at the cone.
            let (ls, wc) = (sym.local, cone.window);
            let _ = send(now, sym, ls, cone, wc);
            // The cone sprays the predicted window around that port.
            let predicted = i32::from(sym.window.port()) + i32::from(delta);
            let lc = cone.local;
            for off in -i32::from(window)..=i32::from(window) {
                let Ok(port) = u16::try_from(predicted + off) else { continue };
                let target = SocketAddr::new(sym.ip(), port);
                if let Some(seen) = send(now, cone, lc, sym, target) {
                    // Adopted: the symmetric side answers the source it heard from.
                    return send(now, sym, ls, cone, seen).is_some();
                }
            }
            false
        }
        Strategy::LockstepShotgun { delta, window } => {
            let [x, y] = &mut ends;
            let (la, lb) = (x.local, y.local);
            let (ia, ib) = (x.ip(), y.ip());
            let (pa, pb) = (x.window.port(), y.window.port());
            for k in 1..=window {
                let to_b = SocketAddr::new(ib, pb.wrapping_add(delta[1].wrapping_mul(k)));
                let to_a = SocketAddr::new(ia, pa.wrapping_add(delta[0].wrapping_mul(k)));
                let _ = send(now, x, la, y, to_b);
                if let Some(seen) = send(now, y, lb, x, to_a) {
                    return send(now, x, la, y, seen).is_some();
                }
            }
            false
        }
        Strategy::Birthday { hard, sockets, probes } => {
            let [x, y] = &mut ends;
            let (h, e) = if idx(hard) == 0 { (&mut **x, &mut **y) } else { (&mut **y, &mut **x) };
            let we = e.window;
            let locals: Vec<SocketAddr> =
                (0..sockets).map(|i| SocketAddr::new(h.local.ip(), h.local.port() + 1 + i)).collect();
            for l in &locals {
                let _ = send(now, h, *l, e, we);
            }
            let mut rng: u64 = 0x5eed;
            let le = e.local;
            for _ in 0..probes {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let port = 1024 + (rng >> 33) as u16 % 64000;
                let target = SocketAddr::new(h.ip(), port);
                if send(now, e, le, h, target).is_some() {
                    // The hard side answers from the socket whose mapping it was.
                    return locals.iter().any(|l| send(now, h, *l, e, we).is_some());
                }
            }
            false
        }
    }
}

fn cell(i: usize, j: usize, now: Instant) -> (End, End) {
    let a = End::new(KINDS[i].1, "198.51.100.10:31000", "203.0.113.2", 11 + i as u64, now);
    let b = End::new(KINDS[j].1, "198.51.100.138:31000", "203.0.113.3", 23 + j as u64, now);
    (a, b)
}

#[test]
fn the_matrix_plans_a_direct_path_in_13_of_15_cells_and_each_one_works() {
    let now = Instant::now();
    let mut table = Vec::new();
    for (i, j) in matrix_pairs() {
        let (mut a, mut b) = cell(i, j, now);
        let s = choose(&a.profile(), &b.profile());
        let worked = carry_out(s, &mut a, &mut b, now);
        assert_eq!(worked, s.is_direct(), "{} × {}: {s:?} planned, carried out: {worked}", KINDS[i].0, KINDS[j].0);
        table.push((KINDS[i].0, KINDS[j].0, s.label()));
    }
    let direct = table.iter().filter(|(_, _, s)| *s != "relay").count();
    assert_eq!(direct, 13, "{table:#?}");
    let relayed: Vec<_> = table.iter().filter(|(_, _, s)| *s == "relay").map(|(a, b, _)| (*a, *b)).collect();
    assert_eq!(relayed, vec![("symmetric-seq", "symmetric-random"), ("symmetric-random", "symmetric-random")]);
}

#[test]
fn each_cell_gets_the_method_of_the_table() {
    let now = Instant::now();
    let want = [
        ["reach", "reach", "reach", "reach", "reach"],
        ["", "reach", "reach", "reach", "reach"],
        ["", "", "simultaneous-open", "prediction", "birthday"],
        ["", "", "", "lockstep-shotgun", "relay"],
        ["", "", "", "", "relay"],
    ];
    for (i, j) in matrix_pairs() {
        let (a, b) = cell(i, j, now);
        let want = want[i][j];
        assert_eq!(choose(&a.profile(), &b.profile()).label(), want, "{} × {}", KINDS[i].0, KINDS[j].0);
        assert_eq!(choose(&b.profile(), &a.profile()).label(), want, "{} × {} (swapped)", KINDS[j].0, KINDS[i].0);
    }
}

#[test]
fn a_restricted_cone_opens_its_filter_before_it_is_reached() {
    let now = Instant::now();
    let (a, b) = cell(1, 4, now);
    assert_eq!(choose(&a.profile(), &b.profile()), Strategy::Reach { target: Side::A, open_first: true });
    assert_eq!(choose(&b.profile(), &a.profile()), Strategy::Reach { target: Side::B, open_first: true });
}

#[test]
fn a_prediction_reaches_a_nat_whose_delta_is_not_one() {
    let now = Instant::now();
    let seq3 = NatKind { allocation: PortAllocation::Sequential { delta: 3 }, ..NatKind::SYMMETRIC_SEQ };
    let mut a = End::new(NatKind::PORT_RESTRICTED, "198.51.100.10:31000", "203.0.113.2", 1, now);
    let mut b = End::new(seq3, "198.51.100.138:31000", "203.0.113.3", 2, now);
    let s = choose(&a.profile(), &b.profile());
    assert_eq!(s, Strategy::Prediction { symmetric: Side::B, delta: 3, window: PREDICTION_WINDOW });
    assert!(carry_out(s, &mut a, &mut b, now));
}

#[test]
fn an_incomplete_profile_stays_on_the_relay() {
    let now = Instant::now();
    let (a, b) = cell(0, 0, now);
    let unknown = NatProfile { window: None, ..a.profile() };
    assert_eq!(choose(&unknown, &b.profile()), Strategy::RelayOnly(RelayReason::Unknown));
    let no_filtering = NatProfile { filtering: None, ..b.profile() };
    assert_eq!(choose(&a.profile(), &no_filtering), Strategy::RelayOnly(RelayReason::Unknown));
}

/// Every method, for trying them all where the plan says none works.
fn every_method() -> Vec<Strategy> {
    let mut v = vec![Strategy::SimultaneousOpen];
    for side in Side::BOTH {
        v.push(Strategy::Reach { target: side, open_first: true });
        v.push(Strategy::Prediction { symmetric: side, delta: 1, window: PREDICTION_WINDOW });
        v.push(Strategy::Birthday { hard: side, sockets: BIRTHDAY_SOCKETS, probes: BIRTHDAY_PROBES });
    }
    v.push(Strategy::LockstepShotgun { delta: [1, 1], window: PREDICTION_WINDOW });
    v
}

#[test]
fn where_the_plan_says_relay_no_method_gets_through() {
    let now = Instant::now();
    for (i, j) in [(3, 4), (4, 4)] {
        for s in every_method() {
            let (mut a, mut b) = cell(i, j, now);
            assert!(!carry_out(s, &mut a, &mut b, now), "{} × {}: {s:?} got through", KINDS[i].0, KINDS[j].0);
        }
    }
}

#[test]
fn a_cheaper_method_than_planned_fails_where_the_plan_is_needed() {
    let now = Instant::now();
    // Port-restricted × random symmetric: only birthday works.
    let (mut a, mut b) = cell(2, 4, now);
    assert!(!carry_out(Strategy::SimultaneousOpen, &mut a, &mut b, now));
    // Sequential × sequential: one-sided prediction fails, lockstep works.
    let (mut a, mut b) = cell(3, 3, now);
    let one_sided = Strategy::Prediction { symmetric: Side::B, delta: 1, window: PREDICTION_WINDOW };
    assert!(!carry_out(one_sided, &mut a, &mut b, now));
}

#[test]
fn a_profile_survives_its_header_form_and_garbage_is_refused() {
    let now = Instant::now();
    for (i, _) in KINDS.iter().enumerate() {
        let (a, _) = cell(i, i, now);
        let p = a.profile();
        assert_eq!(NatProfile::parse_header(&p.to_header()), Some(p), "{}", p.to_header());
    }
    let p = NatProfile::parse_header("mapping=EIM; filtering=apdf; allocation=port-block; block=64; extra=1")
        .expect("parses");
    assert_eq!(p.allocation, Some(Allocation::PortBlock { size: 64 }));
    assert_eq!(p.window, None);
    for bad in ["mapping=xyz", "allocation=sequential", "window=not-an-address", "mapping"] {
        assert_eq!(NatProfile::parse_header(bad), None, "{bad}");
    }
}

#[test]
fn a_side_whose_gateway_maps_ports_is_reached_even_between_two_random_symmetric_nats() {
    use crate::portmap::Protocol;
    let now = Instant::now();
    // The two pairs no punching can open.
    for (i, j) in [(3, 4), (4, 4)] {
        let (a, b) = cell(i, j, now);
        assert!(!choose(&a.profile(), &b.profile()).is_direct(), "without a mapping: relay");
        let mapped = NatProfile { portmap: Some(Protocol::Pcp), ..b.profile() };
        assert_eq!(choose(&a.profile(), &mapped), Strategy::Reach { target: Side::B, open_first: false });
        let both = NatProfile { portmap: Some(Protocol::Pmp), ..a.profile() };
        assert!(choose(&both, &mapped).is_direct());
    }
    // The field survives the trip through Pinhole-NAT, and an unknown protocol spoils it.
    let p = NatProfile { portmap: Some(Protocol::Pcp), ..cell(4, 4, now).0.profile() };
    assert_eq!(NatProfile::parse_header(&p.to_header()), Some(p));
    assert!(p.to_header().ends_with(";portmap=pcp"), "{}", p.to_header());
    assert_eq!(NatProfile::parse_header("mapping=apdm;filtering=apdf;portmap=upnp-ish"), None);
}
