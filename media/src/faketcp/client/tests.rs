//! An agent's tunnel against the real forwarder core, in memory and virtual time.

use super::*;
use crate::faketcp::forwarder::{Forwarder, Limits, Output};
use crate::faketcp::{ipv4, RST};

const FWD: &str = "203.0.113.1:4443";
const KEY: &str = "leg-secret-0123456789abcdef";

fn a(s: &str) -> SocketAddrV4 {
    s.parse().expect("addr")
}

struct Lab {
    t: Tunnel,
    f: Forwarder,
    now: Instant,
    /// Datagrams that reached the agent, and the relay.
    agent_got: Vec<Vec<u8>>,
    relay_got: Vec<(u16, Vec<u8>)>,
}

impl Lab {
    fn new(allow: bool) -> Lab {
        let now = Instant::now();
        let mut f = Forwarder::new(a(FWD), Limits::default(), [3; 32], Instant::now());
        if allow {
            f.allow(30002, KEY.into());
        }
        let t = Tunnel::new(now, a("198.51.100.10:0"), (41000, 41009), a(FWD), 30002, KEY.into(), 5);
        Lab { t, f, now, agent_got: Vec::new(), relay_got: Vec::new() }
    }

    /// Moves segments both ways until nothing is in flight.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some((to, tcp)) = self.t.poll_transmit() {
                let p = ipv4(*self.t.local().ip(), *to.ip(), &tcp, 1);
                self.f.handle_segment(self.now, &Segment::parse(&p).expect("segment"));
                moved = true;
            }
            while let Some(o) = self.f.poll_output() {
                moved = true;
                match o {
                    Output::Segment { from, to, tcp } => {
                        let p = ipv4(*from.ip(), *to.ip(), &tcp, 1);
                        let s = Segment::parse(&p).expect("segment");
                        if let Some(d) = self.t.handle_segment(self.now, &s) {
                            self.agent_got.push(d.to_vec());
                        }
                    }
                    Output::ToRelay { port, datagram } => self.relay_got.push((port, datagram)),
                    Output::Bound { .. } => {}
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(t) = [self.t.poll_timeout(), self.f.poll_timeout()].into_iter().flatten().min() {
            if t > until {
                break;
            }
            self.now = t.max(self.now);
            self.t.handle_timeout(self.now);
            self.f.handle_timeout(self.now);
            self.settle();
        }
        self.now = until;
    }
}

const RTP: &[u8] = &[0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 9, 1, 2, 3];

#[test]
fn the_tunnel_proves_its_leg_and_then_carries_datagrams_both_ways() {
    let mut lab = Lab::new(true);
    assert!(!lab.t.send(lab.now, RTP), "nothing goes before the proof is answered");
    lab.settle();
    assert_eq!(lab.t.phase(), Phase::Up);
    assert!(lab.t.send(lab.now, RTP));
    lab.settle();
    assert_eq!(lab.relay_got, vec![(30002, RTP.to_vec())]);
    assert!(lab.f.from_relay(lab.now, 30002, b"\x80back"));
    lab.settle();
    assert_eq!(lab.agent_got, vec![b"\x80back".to_vec()], "the proof's answer is not handed on");
}

#[test]
fn a_reset_connection_is_reopened_from_the_next_port_and_the_leg_goes_on() {
    let mut lab = Lab::new(true);
    lab.settle();
    let first = lab.t.local();
    // The forwarder's host reset it (say, a restart): a believable RST.
    let rst = crate::faketcp::Segment {
        src: a(FWD),
        dst: first,
        seq: lab.t.conn.rcv_nxt,
        ack: 0,
        flags: RST,
        window: 0,
        payload: &[],
    };
    assert_eq!(lab.t.handle_segment(lab.now, &rst), None);
    lab.settle();
    assert_eq!(lab.t.local().port(), first.port() + 1);
    assert_eq!((lab.t.phase(), lab.t.connections), (Phase::Up, 2));
    assert!(lab.t.send(lab.now, RTP));
    lab.settle();
    assert_eq!(lab.relay_got, vec![(30002, RTP.to_vec())]);
    assert!(lab.f.from_relay(lab.now, 30002, RTP), "the forwarder took the new connection for the port");
}

#[test]
fn an_unanswered_proof_opens_a_new_connection_after_three_seconds() {
    let mut lab = Lab::new(false);
    lab.settle();
    assert_eq!(lab.t.phase(), Phase::Proving);
    lab.advance(Duration::from_millis(3100));
    assert_eq!(lab.t.connections, 2);
    assert!(lab.relay_got.is_empty());
}

#[test]
fn a_leg_whose_forwarder_forgot_it_reopens_within_the_dead_time() {
    let mut lab = Lab::new(true);
    lab.settle();
    assert_eq!((lab.t.phase(), lab.t.connections), (Phase::Up, 1));
    let first = lab.t.local();
    // A blind reset the forwarder believed (or a restart): it forgets the connection and
    // drops the agent's segments as unknown; the agent is told nothing.
    lab.f.revoke(30002);
    lab.f.allow(30002, KEY.into());
    let mut t = Duration::ZERO;
    while t < crate::faketcp::DEAD_AFTER + Duration::from_secs(1) {
        let _ = lab.t.send(lab.now, RTP);
        lab.advance(Duration::from_millis(500));
        t += Duration::from_millis(500);
        if lab.t.connections == 2 {
            break;
        }
    }
    assert_eq!(lab.t.connections, 2, "reopened after {t:?}");
    assert!(t >= crate::faketcp::DEAD_AFTER - Duration::from_secs(1), "not before the dead time: {t:?}");
    lab.settle();
    assert_eq!(lab.t.phase(), Phase::Up);
    assert_ne!(lab.t.local(), first, "from another port");
    lab.relay_got.clear();
    assert!(lab.t.send(lab.now, RTP));
    lab.settle();
    assert_eq!(lab.relay_got, vec![(30002, RTP.to_vec())], "the leg goes on");
}
