//! A client and a server connection talking through the codec, in virtual time.

use super::*;

fn a(s: &str) -> SocketAddrV4 {
    s.parse().expect("addr")
}

const CLIENT: &str = "198.51.100.10:40000";
const SERVER: &str = "203.0.113.1:4443";

/// Runs `from`'s queued segments through the wire format into `to`; returns what `to` made
/// of each, with the data it received.
fn deliver(now: Instant, from: &mut Conn, src: &str, to: &mut Conn, dst: &str) -> Vec<(Received, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(o) = from.poll_transmit() {
        let packet = Segment {
            src: a(src),
            dst: a(dst),
            seq: o.seq,
            ack: o.ack,
            flags: o.flags,
            window: WINDOW,
            payload: &o.payload,
        }
        .ip_bytes(7);
        let s = Segment::parse(&packet).expect("our own segment parses");
        out.push((to.handle_segment(now, &s), s.payload.to_vec()));
    }
    out
}

/// One segment through the wire format into `to`.
fn pass(now: Instant, o: &Outgoing, src: &str, to: &mut Conn, dst: &str) -> Received {
    let packet = o.segment(a(src), a(dst));
    let ip = ipv4(*a(src).ip(), *a(dst).ip(), &packet, 1);
    to.handle_segment(now, &Segment::parse(&ip).expect("our own segment parses"))
}

/// A handshake from client ISN `ci` and server ISN `si`.
fn established(now: Instant, ci: u32, si: u32) -> (Conn, Conn) {
    let mut c = Conn::connect(now, ci);
    let syn = c.poll_transmit().expect("SYN");
    assert_eq!((syn.flags, syn.seq), (SYN, ci));
    let mut s = Conn::accept(now, syn.seq, si);
    let r = deliver(now, &mut s, SERVER, &mut c, CLIENT);
    assert_eq!(r[0].0, Received::Control, "SYN-ACK");
    assert_eq!(c.state(), State::Established);
    let r = deliver(now, &mut c, CLIENT, &mut s, SERVER);
    assert_eq!(r[0].0, Received::Control, "ACK");
    assert_eq!(s.state(), State::Established);
    (c, s)
}

#[test]
fn the_handshake_establishes_both_sides_and_data_flows_both_ways_in_sequence() {
    let now = Instant::now();
    let (mut c, mut s) = established(now, 1000, 5000);
    assert!(c.send(now, b"rtp one"));
    assert!(c.send(now, b"rtp two"));
    let first = c.out[0].clone();
    assert_eq!((first.flags, first.seq, first.ack), (PSH | ACK, 1001, 5001));
    assert_eq!(c.out[1].seq, 1001 + 7, "sequence advances by the payload");
    let got = deliver(now, &mut c, CLIENT, &mut s, SERVER);
    assert_eq!(got, vec![(Received::Data, b"rtp one".to_vec()), (Received::Data, b"rtp two".to_vec())]);
    assert!(s.send(now, b"back"));
    let back = s.out[0].clone();
    assert_eq!((back.seq, back.ack), (5001, 1015), "the server acknowledges all it got");
    assert_eq!(deliver(now, &mut s, SERVER, &mut c, CLIENT), vec![(Received::Data, b"back".to_vec())]);
}

#[test]
fn sequence_numbers_wrap_at_two_to_the_32() {
    let now = Instant::now();
    let (mut c, mut s) = established(now, u32::MAX - 10, u32::MAX);
    for k in 0..10u8 {
        assert!(c.send(now, &[k; 5]));
        assert!(s.send(now, &[k; 3]));
    }
    assert!(c.out.iter().any(|o| o.seq < 100), "the client's sequence wrapped");
    assert!(s.out.iter().any(|o| o.seq < 100) && s.out[0].seq == 0, "the server's ISN + 1 is 0");
    let got = deliver(now, &mut c, CLIENT, &mut s, SERVER);
    assert!(got.iter().all(|g| g.0 == Received::Data), "{got:?}");
    let got = deliver(now, &mut s, SERVER, &mut c, CLIENT);
    assert!(got.iter().all(|g| g.0 == Received::Data));
    assert_eq!(s.dropped + c.dropped, 0);
}

#[test]
fn a_lost_segment_is_skipped_and_old_or_far_segments_are_dropped() {
    let now = Instant::now();
    let (mut c, mut s) = established(now, 1, 2);
    for p in [b"one", b"two", b"thr"] {
        c.send(now, p);
    }
    let lost = c.poll_transmit().expect("one");
    let got = deliver(now, &mut c, CLIENT, &mut s, SERVER);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|g| g.0 == Received::Data), "the gap is jumped: no retransmission comes");
    // The lost one turns up late: behind the window now.
    let late = Segment {
        src: a(CLIENT),
        dst: a(SERVER),
        seq: lost.seq,
        ack: lost.ack,
        flags: lost.flags,
        window: WINDOW,
        payload: &lost.payload,
    };
    assert_eq!(s.handle_segment(now, &late), Received::Dropped);
    // And one from far beyond anything sent.
    let far = Segment { seq: lost.seq.wrapping_add(1 << 30), ..late };
    assert_eq!(s.handle_segment(now, &far), Received::Dropped);
    assert_eq!(s.dropped, 2);
}

#[test]
fn one_way_media_still_gets_acknowledged_and_idle_connections_keep_alive() {
    let now = Instant::now();
    let (mut c, mut s) = established(now, 7, 9);
    for _ in 0..200 {
        c.send(now, &[0x80; 172]);
    }
    deliver(now, &mut c, CLIENT, &mut s, SERVER);
    let acks: Vec<Outgoing> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert!(acks.len() >= 2, "a pure ACK every 16 KiB: {}", acks.len());
    assert!(acks.iter().all(|o| o.flags == ACK && o.payload.is_empty()));
    // Nothing to send for 5 s: a keepalive.
    assert_eq!(s.poll_timeout(), Some(now + KEEPALIVE));
    s.handle_timeout(now + KEEPALIVE);
    let ka = s.poll_transmit().expect("keepalive");
    assert_eq!((ka.flags, ka.payload.len()), (ACK, 0));
}

#[test]
fn a_reset_closes_only_when_its_sequence_is_believable() {
    let now = Instant::now();
    let (mut c, mut s) = established(now, 100, 200);
    let forged =
        Segment { src: a(SERVER), dst: a(CLIENT), seq: 201 + (1 << 31), ack: 0, flags: RST, window: 0, payload: &[] };
    assert_eq!(c.handle_segment(now, &forged), Received::Dropped);
    assert_eq!(c.state(), State::Established);
    let real = Segment { seq: 201, ..forged };
    assert_eq!(c.handle_segment(now, &real), Received::Reset);
    assert_eq!(c.state(), State::Closed);
    assert!(!c.send(now, b"x"), "nothing goes on a closed connection");
    let _ = s.poll_transmit();
}

#[test]
fn an_unanswered_syn_is_repeated_then_given_up() {
    let now = Instant::now();
    let mut c = Conn::connect(now, 42);
    let _ = c.poll_transmit();
    let mut t = now;
    let mut syns = 1;
    while let Some(next) = c.poll_timeout() {
        t = next;
        c.handle_timeout(t);
        syns += std::iter::from_fn(|| c.poll_transmit()).filter(|o| o.flags == SYN && o.seq == 42).count();
    }
    assert_eq!(c.state(), State::Closed);
    assert_eq!(syns, 5);
    assert!(t - now >= Duration::from_secs(5));
}

#[test]
fn the_codec_checks_both_checksums_and_refuses_what_is_not_a_whole_segment() {
    let seg = Segment {
        src: a(CLIENT),
        dst: a(SERVER),
        seq: 1,
        ack: 2,
        flags: PSH | ACK,
        window: WINDOW,
        payload: b"payload",
    };
    let mut p = seg.ip_bytes(1);
    assert_eq!(Segment::parse(&p), Ok(seg));
    assert_eq!(p.len(), 20 + 20 + 7, "no framing: 12 bytes more than UDP's header");
    let last = p.len() - 1;
    p[last] ^= 1;
    assert_eq!(Segment::parse(&p), Err(BadSegment::Checksum));
    p[last] ^= 1;
    p[8] = 1; // TTL: the IP checksum no longer matches
    assert_eq!(Segment::parse(&p), Err(BadSegment::Checksum));
    let mut frag = seg.ip_bytes(1);
    frag[6] = 0x20; // more fragments
    assert_eq!(Segment::parse(&frag), Err(BadSegment::Fragment));
    assert_eq!(Segment::parse(&p[..30]), Err(BadSegment::Short));
    let mut udp = seg.ip_bytes(1);
    udp[9] = 17;
    assert_eq!(Segment::parse(&udp), Err(BadSegment::NotIpv4Tcp));
}

const PEER: &str = "192.0.2.20:41000";

#[test]
fn a_simultaneous_open_whose_syns_cross_establishes_both_ends() {
    let now = Instant::now();
    let mut c = Conn::simultaneous(now, 7, u32::MAX);
    let mut p = Conn::simultaneous(now, u32::MAX, 7);
    // Both SYNs are in flight at once; each end answers the other's with a SYN-ACK.
    let syn_c = c.poll_transmit().expect("SYN");
    let syn_p = p.poll_transmit().expect("SYN");
    assert_eq!((syn_c.flags, syn_p.flags), (SYN, SYN));
    assert_eq!(pass(now, &syn_c, CLIENT, &mut p, PEER), Received::Control);
    assert_eq!(pass(now, &syn_p, PEER, &mut c, CLIENT), Received::Control);
    assert_eq!((c.state(), p.state()), (State::SynReceived, State::SynReceived));
    let synack_c = c.poll_transmit().expect("c's SYN-ACK");
    let synack_p = p.poll_transmit().expect("p's SYN-ACK");
    assert_eq!((synack_c.flags, synack_c.ack, synack_p.ack), (SYN | ACK, 0, 8));
    assert_eq!(pass(now, &synack_c, CLIENT, &mut p, PEER), Received::Control);
    assert_eq!(pass(now, &synack_p, PEER, &mut c, CLIENT), Received::Control);
    assert_eq!((c.state(), p.state()), (State::Established, State::Established));
    // The ISN of u32::MAX wraps: p's first byte is sequence 0.
    assert!(p.send(now, b"wraps"));
    assert_eq!(p.out.back().map(|o| o.seq), Some(0));
    let got = deliver(now, &mut p, PEER, &mut c, CLIENT);
    assert_eq!(got.last(), Some(&(Received::Data, b"wraps".to_vec())));
    assert!(c.send(now, b"back"));
    let got = deliver(now, &mut c, CLIENT, &mut p, PEER);
    assert_eq!(got.last(), Some(&(Received::Data, b"back".to_vec())));
}

#[test]
fn a_simultaneous_open_whose_first_syn_was_dropped_still_establishes() {
    let now = Instant::now();
    let mut c = Conn::simultaneous(now, 100, 900);
    let mut p = Conn::simultaneous(now, 900, 100);
    let _lost = c.poll_transmit(); // the peer's NAT had no mapping yet and dropped it
    assert_eq!(deliver(now, &mut p, PEER, &mut c, CLIENT)[0].0, Received::Control, "p's SYN opens c");
    assert_eq!(c.state(), State::SynReceived);
    assert_eq!(deliver(now, &mut c, CLIENT, &mut p, PEER)[0].0, Received::Control, "c's SYN-ACK");
    assert_eq!(p.state(), State::Established);
    assert_eq!(deliver(now, &mut p, PEER, &mut c, CLIENT)[0].0, Received::Control, "p's ACK");
    assert_eq!(c.state(), State::Established);
}

#[test]
fn a_simultaneous_open_drops_a_syn_without_the_announced_isn() {
    let now = Instant::now();
    let mut c = Conn::simultaneous(now, 100, 900);
    let _ = c.poll_transmit();
    let forged = Segment { src: a(PEER), dst: a(CLIENT), seq: 901, ack: 0, flags: SYN, window: WINDOW, payload: &[] };
    assert_eq!(c.handle_segment(now, &forged), Received::Dropped);
    let forged_synack = Segment { ack: 101, flags: SYN | ACK, ..forged };
    assert_eq!(c.handle_segment(now, &forged_synack), Received::Dropped);
    assert_eq!(c.state(), State::SynSent);
    assert!(c.poll_transmit().is_none(), "nothing answers a stranger");
}

/// A deterministic stream of guesses.
fn guesses(seed: u64) -> impl Iterator<Item = u32> {
    let mut x = seed | 1;
    std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some((x >> 16) as u32)
    })
}

#[test]
fn blind_segments_knowing_only_the_four_tuple_neither_inject_nor_stall_a_leg() {
    let now = Instant::now();
    let (mut c, mut s) = established(now, 100, 200);
    // The leg carries some media first.
    for _ in 0..50 {
        assert!(c.send(now, &[0x80; 172]));
    }
    assert!(deliver(now, &mut c, CLIENT, &mut s, SERVER).iter().all(|r| r.0 == Received::Data));
    let mut g = guesses(7);
    let mut injected = 0;
    for _ in 0..4096 {
        let (seq, ack) = (g.next().unwrap_or(0), g.next().unwrap_or(0));
        let forged = Segment {
            src: a(CLIENT),
            dst: a(SERVER),
            seq,
            ack,
            flags: PSH | ACK,
            window: WINDOW,
            payload: &[0x80; 172],
        };
        if s.handle_segment(now, &forged) == Received::Data {
            injected += 1;
        }
    }
    assert_eq!(injected, 0, "guessed segments taken as the leg's media");
    // The leg goes on: the client's next datagram is taken.
    assert!(c.send(now, b"\x80next"));
    assert_eq!(deliver(now, &mut c, CLIENT, &mut s, SERVER)[0], (Received::Data, b"\x80next".to_vec()));
    // A segment acknowledging data never sent, even at the right sequence, is refused.
    let ahead = Segment {
        src: a(CLIENT),
        dst: a(SERVER),
        seq: s.rcv_nxt,
        ack: s.snd_nxt.wrapping_add(1000),
        flags: PSH | ACK,
        window: WINDOW,
        payload: b"x",
    };
    assert_eq!(s.handle_segment(now, &ahead), Received::Dropped);
}

#[test]
fn blind_resets_are_challenged_not_believed_and_a_syn_sent_reset_must_acknowledge_our_syn() {
    let now = Instant::now();
    let (mut c, _s) = established(now, 100, 200);
    let mut g = guesses(11);
    let (mut challenges, mut sent) = (0, 0);
    for i in 0..65_536u32 {
        let seq = g.next().unwrap_or(0);
        if seq == c.rcv_nxt {
            continue; // the one exact guess in 2^32
        }
        sent += 1;
        let at = now + Duration::from_micros(u64::from(i) * 20);
        let rst = Segment { src: a(SERVER), dst: a(CLIENT), seq, ack: 0, flags: RST, window: 0, payload: &[] };
        assert_ne!(c.handle_segment(at, &rst), Received::Reset);
        while let Some(o) = c.poll_transmit() {
            assert_eq!(o.flags, ACK, "only challenge ACKs");
            challenges += 1;
        }
    }
    assert_eq!(c.state(), State::Established, "65 536 blind resets later");
    assert!(challenges <= 14, "challenge ACKs rate-limited: {challenges} in 1.3 s");
    assert_eq!(c.resets_ignored, sent, "every one counted");
    // In SYN-SENT a reset counts only if it acknowledges our SYN.
    let mut connecting = Conn::connect(now, 5000);
    let blind = Segment { src: a(SERVER), dst: a(CLIENT), seq: 9, ack: 0, flags: RST, window: 0, payload: &[] };
    assert_eq!(connecting.handle_segment(now, &blind), Received::Dropped);
    let real = Segment { ack: 5001, flags: RST | ACK, ..blind };
    assert_eq!(connecting.handle_segment(now, &real), Received::Reset);
}

#[test]
fn a_connection_that_hears_nothing_or_sees_no_acknowledgement_goes_dead() {
    let now = Instant::now();
    let (mut c, mut s) = established(now, 100, 200);
    assert!(!c.dead(now + DEAD_AFTER - Duration::from_millis(1)));
    // The peer keeps acknowledging (its keepalives carry its ACK): alive well past the limit.
    let mut t = now;
    for _ in 0..40 {
        t += Duration::from_secs(1);
        c.send(t, b"\x80media");
        deliver(t, &mut c, CLIENT, &mut s, SERVER);
        s.handle_timeout(t);
        deliver(t, &mut s, SERVER, &mut c, CLIENT);
        assert!(!c.dead(t), "alive at {:?}", t - now);
    }
    // Then the peer forgets us: our data goes unanswered, nothing is heard.
    c.send(t, b"\x80media");
    let _ = c.poll_transmit();
    assert!(!c.dead(t + KEEPALIVE), "a keepalive late is not death");
    assert!(c.dead(t + DEAD_AFTER), "dead after {DEAD_AFTER:?} of silence");
}
