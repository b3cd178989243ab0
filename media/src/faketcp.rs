//! Fake TCP, sans-IO: datagrams carried as segments of a TCP connection that firewalls and
//! conntrack take for a real one — handshake, sequence and acknowledgement progression,
//! PSH|ACK, a fixed 64 KiB window — with no retransmission and no congestion control. One
//! datagram per segment, no framing (RTP, RTCP and STUN tell themselves apart by their
//! first bytes), so the overhead is the TCP header's 12 bytes more than UDP's.
//!
//! [`Segment`] reads and writes IPv4 + TCP (checksums included); [`Conn`] is one
//! connection's state, client (the agent) or server (the forwarder). A receiver takes any
//! segment from the expected sequence number up to a window ahead (a lost segment is never
//! resent, so the next one jumps the gap); anything behind or beyond is dropped and
//! counted. Pure ACKs keep the peer's view of our receive window moving even when media
//! flows one way only, so strict conntrack (`nf_conntrack_tcp_be_liberal=0`) never sees a
//! segment outside the window it tracks.
//!
//! Blind attacks (RFC 5961): a segment must fall in the receive window *and* acknowledge
//! something we sent not long ago, so a stranger who knows only the 4-tuple guesses right
//! about once in 2^28 tries; a reset is believed only at exactly the next expected
//! sequence number (one merely in the window draws a rate-limited challenge ACK), and in
//! SYN-SENT only if it acknowledges our SYN. A connection that hears nothing, or sees its
//! data go unacknowledged, for [`DEAD_AFTER`] is dead ([`Conn::dead`]): its owner reopens.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The window we advertise (no scaling): what the peer may send beyond our last ACK.
pub const WINDOW: u16 = 65_535;
/// Data we accept ahead of the next expected byte (losses in between are skipped): a
/// second of 2 Mbit/s video lost in one go still resynchronises.
pub const RECEIVE_AHEAD: u32 = 256 * 1024;
/// How far behind what we sent a segment's acknowledgement may be (what was in flight
/// when the peer sent it); one acknowledging more than we sent is a forgery.
pub const ACK_BEHIND: u32 = 256 * 1024;
/// Challenge ACKs (RFC 5961 §3.2) at most this often.
const CHALLENGE_EVERY: Duration = Duration::from_millis(100);
/// Nothing heard, or our data unacknowledged, this long: the connection is dead. The peer
/// sends at least a keepalive every [`KEEPALIVE`], so two lost in a row are tolerated.
pub const DEAD_AFTER: Duration = Duration::from_secs(11);
/// A pure ACK once this much arrived unacknowledged (well inside [`WINDOW`]).
const ACK_EVERY: u32 = 16 * 1024;
/// A keepalive (pure ACK) after this long without sending.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// SYN (client) or SYN-ACK (server) repeated this often while unanswered…
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// …this many times, then the connection fails.
const HANDSHAKE_TRIES: u32 = 5;
/// Largest payload per segment (a datagram larger than this is not carried).
pub const MAX_PAYLOAD: usize = 1400;

/// A parsed IPv4 + TCP segment; `payload` borrows from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: &'a [u8],
}

/// Why a packet is not a segment we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadSegment {
    Short,
    NotIpv4Tcp,
    Fragment,
    Checksum,
}

fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The TCP checksum over the IPv4 pseudo-header and `tcp` (header + payload).
fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, tcp: &[u8]) -> u16 {
    let mut acc = sum16(0, &src.octets());
    acc = sum16(acc, &dst.octets());
    acc += 6 + tcp.len() as u32;
    fold(sum16(acc, tcp))
}

impl<'a> Segment<'a> {
    /// Reads an IPv4 packet carrying TCP (options skipped). Checksums are verified.
    pub fn parse(packet: &'a [u8]) -> Result<Segment<'a>, BadSegment> {
        if packet.len() < 20 {
            return Err(BadSegment::Short);
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if packet[0] >> 4 != 4 || packet[9] != 6 || ihl < 20 {
            return Err(BadSegment::NotIpv4Tcp);
        }
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if total < ihl + 20 || packet.len() < total || packet.len() < ihl {
            return Err(BadSegment::Short);
        }
        // More fragments, or an offset: not a whole segment.
        if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
            return Err(BadSegment::Fragment);
        }
        if fold(sum16(0, &packet[..ihl])) != 0 {
            return Err(BadSegment::Checksum);
        }
        let src_ip = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst_ip = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let tcp = &packet[ihl..total];
        let off = usize::from(tcp[12] >> 4) * 4;
        if off < 20 || tcp.len() < off {
            return Err(BadSegment::Short);
        }
        let mut acc = sum16(0, &src_ip.octets());
        acc = sum16(acc, &dst_ip.octets());
        acc += 6 + tcp.len() as u32;
        if fold(sum16(acc, tcp)) != 0 {
            return Err(BadSegment::Checksum);
        }
        let be16 = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
        let be32 = |i: usize| u32::from_be_bytes([tcp[i], tcp[i + 1], tcp[i + 2], tcp[i + 3]]);
        Ok(Segment {
            src: SocketAddrV4::new(src_ip, be16(0)),
            dst: SocketAddrV4::new(dst_ip, be16(2)),
            seq: be32(4),
            ack: be32(8),
            flags: tcp[13] & 0x3f,
            window: be16(14),
            payload: &tcp[off..],
        })
    }

    /// The TCP header and payload (no IP header: what a raw TCP socket sends), checksummed.
    pub fn tcp_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(20 + self.payload.len());
        b.extend_from_slice(&self.src.port().to_be_bytes());
        b.extend_from_slice(&self.dst.port().to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.ack.to_be_bytes());
        b.push(5 << 4);
        b.push(self.flags);
        b.extend_from_slice(&self.window.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        b.extend_from_slice(self.payload);
        let c = tcp_checksum(*self.src.ip(), *self.dst.ip(), &b);
        b[16..18].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// The whole IPv4 packet (TTL 64, don't fragment), checksummed.
    pub fn ip_bytes(&self, id: u16) -> Vec<u8> {
        ipv4(*self.src.ip(), *self.dst.ip(), &self.tcp_bytes(), id)
    }
}

/// An IPv4 packet (TTL 64, don't fragment, checksummed) around TCP segment `tcp`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, tcp: &[u8], id: u16) -> Vec<u8> {
    let total = (20 + tcp.len()) as u16;
    let mut b = Vec::with_capacity(usize::from(total));
    b.extend_from_slice(&[0x45, 0]);
    b.extend_from_slice(&total.to_be_bytes());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    let c = fold(sum16(0, &b));
    b[10..12].copy_from_slice(&c.to_be_bytes());
    b.extend_from_slice(tcp);
    b
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    SynSent,
    SynReceived,
    Established,
    /// Reset by the peer, or the handshake went unanswered: open a new one.
    Closed,
}

/// A segment to send: flags, sequence and acknowledgement numbers and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

impl Outgoing {
    pub fn segment(&self, local: SocketAddrV4, remote: SocketAddrV4) -> Vec<u8> {
        Segment {
            src: local,
            dst: remote,
            seq: self.seq,
            ack: self.ack,
            flags: self.flags,
            window: WINDOW,
            payload: &self.payload,
        }
        .tcp_bytes()
    }
}

/// What [`Conn::handle_segment`] made of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A datagram for the application (the segment's payload).
    Data,
    /// Handshake, ACK or keepalive: nothing for the application.
    Control,
    /// Outside the window, or makes no sense in this state: dropped.
    Dropped,
    /// The peer reset the connection.
    Reset,
}

/// One fake-TCP connection.
pub struct Conn {
    state: State,
    /// Next sequence number we send; the next we expect.
    snd_nxt: u32,
    rcv_nxt: u32,
    /// What we last acknowledged.
    acked: u32,
    out: std::collections::VecDeque<Outgoing>,
    last_sent: Instant,
    handshake: (u32, Instant),
    isn: u32,
    /// A simultaneous open's peer ISN, handed to both ends beforehand: only a SYN and a
    /// SYN-ACK with it belong to the connection.
    peer_isn: Option<u32>,
    /// Segments dropped as out of window or out of place.
    pub dropped: u64,
    /// Resets ignored (out of window, or in it but not exact: challenged).
    pub resets_ignored: u64,
    /// When we last took a segment of the peer's, and when its acknowledgements last
    /// caught up with what we sent (or moved towards it).
    last_heard: Instant,
    ack_progress: Instant,
    /// The highest acknowledgement the peer sent.
    peer_ack: u32,
    last_challenge: Option<Instant>,
}

impl Conn {
    /// A client connection: sends a SYN with `isn` now.
    pub fn connect(now: Instant, isn: u32) -> Conn {
        let mut c = Conn::new(now, State::SynSent, isn);
        c.send_control(now, SYN, isn, 0);
        c
    }

    /// A server connection for a client's SYN (`syn` its sequence number): answers with a
    /// SYN-ACK from `isn`.
    pub fn accept(now: Instant, syn: u32, isn: u32) -> Conn {
        let mut c = Conn::new(now, State::SynReceived, isn);
        c.rcv_nxt = syn.wrapping_add(1);
        c.send_control(now, SYN | ACK, isn, c.rcv_nxt);
        c
    }

    /// One end of a simultaneous open (RFC 9293 §3.5, figure 8) with a peer whose ISN we
    /// were told: both ends send a SYN; each answers the other's with a SYN-ACK; either
    /// SYN-ACK establishes. It is what two NATs' conntrack let through when neither will
    /// accept an unsolicited SYN: each side's own SYN opens its NAT for the other's.
    pub fn simultaneous(now: Instant, isn: u32, peer_isn: u32) -> Conn {
        let mut c = Conn::connect(now, isn);
        c.peer_isn = Some(peer_isn);
        c
    }

    fn new(now: Instant, state: State, isn: u32) -> Conn {
        Conn {
            state,
            snd_nxt: isn.wrapping_add(1),
            rcv_nxt: 0,
            acked: 0,
            out: std::collections::VecDeque::new(),
            last_sent: now,
            handshake: (1, now),
            isn,
            peer_isn: None,
            dropped: 0,
            resets_ignored: 0,
            last_heard: now,
            ack_progress: now,
            peer_ack: isn.wrapping_add(1),
            last_challenge: None,
        }
    }

    fn established(&mut self, now: Instant) {
        self.state = State::Established;
        self.last_heard = now;
        self.ack_progress = now;
    }

    /// Whether an established connection has gone dead: nothing heard from the peer, or
    /// our data left unacknowledged, for [`DEAD_AFTER`] (a reset we could not believe, a
    /// peer that forgot us, a path that broke).
    pub fn dead(&self, now: Instant) -> bool {
        self.state == State::Established && self.dead_at().is_some_and(|t| now >= t)
    }

    /// When the connection will count as dead if nothing changes.
    pub fn dead_at(&self) -> Option<Instant> {
        (self.state == State::Established).then(|| self.last_heard.min(self.ack_progress) + DEAD_AFTER)
    }

    /// Whether `ack` acknowledges what we sent recently (and nothing we did not send).
    fn ack_acceptable(&self, ack: u32) -> bool {
        self.snd_nxt.wrapping_sub(ack) <= ACK_BEHIND
    }

    /// The peer's segment `s` was taken: note it was heard and how far it acknowledged.
    fn heard(&mut self, now: Instant, s: &Segment<'_>) {
        self.last_heard = now;
        if s.flags & ACK == 0 {
            return;
        }
        let advanced = s.ack.wrapping_sub(self.peer_ack) as i32 > 0;
        if advanced {
            self.peer_ack = s.ack;
        }
        if advanced || self.peer_ack == self.snd_nxt {
            self.ack_progress = now;
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    fn send_control(&mut self, now: Instant, flags: u8, seq: u32, ack: u32) {
        self.out.push_back(Outgoing { flags, seq, ack, payload: Vec::new() });
        self.last_sent = now;
        if flags & ACK != 0 {
            self.acked = ack;
        }
    }

    /// A datagram to carry: `false` when the connection is not established or it is too
    /// large (it is then not sent; UDP would have lost it too).
    pub fn send(&mut self, now: Instant, datagram: &[u8]) -> bool {
        if self.state != State::Established || datagram.is_empty() || datagram.len() > MAX_PAYLOAD {
            return false;
        }
        if self.peer_ack == self.snd_nxt {
            // Nothing was outstanding: the wait for an acknowledgement starts now.
            self.ack_progress = now;
        }
        self.out.push_back(Outgoing {
            flags: PSH | ACK,
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
            payload: datagram.to_vec(),
        });
        self.snd_nxt = self.snd_nxt.wrapping_add(datagram.len() as u32);
        self.acked = self.rcv_nxt;
        self.last_sent = now;
        true
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }

    /// When [`Conn::handle_timeout`] wants to run: a handshake retry or a keepalive.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::SynSent | State::SynReceived => Some(self.handshake.1 + HANDSHAKE_RETRY),
            State::Established => Some(self.last_sent + KEEPALIVE),
            State::Closed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::SynSent | State::SynReceived if now >= self.handshake.1 + HANDSHAKE_RETRY => {
                if self.handshake.0 >= HANDSHAKE_TRIES {
                    self.state = State::Closed;
                    return;
                }
                self.handshake = (self.handshake.0 + 1, now);
                let (flags, ack) = if self.state == State::SynSent { (SYN, 0) } else { (SYN | ACK, self.rcv_nxt) };
                self.send_control(now, flags, self.isn, ack);
            }
            State::Established if now >= self.last_sent + KEEPALIVE => {
                self.send_control(now, ACK, self.snd_nxt, self.rcv_nxt);
            }
            _ => {}
        }
    }

    /// A segment of this connection (the caller matched its 4-tuple).
    pub fn handle_segment(&mut self, now: Instant, s: &Segment<'_>) -> Received {
        if s.flags & RST != 0 {
            return self.reset(now, s);
        }
        match self.state {
            State::Closed => {
                self.dropped += 1;
                Received::Dropped
            }
            State::SynSent => {
                let peer_ok = self.peer_isn.is_none_or(|p| p == s.seq);
                if s.flags & (SYN | ACK) == SYN | ACK && s.ack == self.isn.wrapping_add(1) && peer_ok {
                    self.rcv_nxt = s.seq.wrapping_add(1);
                    self.established(now);
                    self.send_control(now, ACK, self.snd_nxt, self.rcv_nxt);
                    return Received::Control;
                }
                if s.flags & (SYN | ACK) == SYN && self.peer_isn == Some(s.seq) {
                    // The peer's SYN crossed ours: answer it, ours stands.
                    self.rcv_nxt = s.seq.wrapping_add(1);
                    self.state = State::SynReceived;
                    self.handshake = (1, now);
                    self.send_control(now, SYN | ACK, self.isn, self.rcv_nxt);
                    return Received::Control;
                }
                self.dropped += 1;
                Received::Dropped
            }
            State::SynReceived => {
                let answers_ours = s.flags & ACK != 0 && s.ack == self.isn.wrapping_add(1);
                if s.flags & SYN != 0 && answers_ours && self.peer_isn == Some(s.seq) {
                    // A simultaneous open's SYN-ACK: both SYNs are acknowledged.
                    self.established(now);
                    self.send_control(now, ACK, self.snd_nxt, self.rcv_nxt);
                    return Received::Control;
                }
                if s.flags & SYN != 0 && s.seq.wrapping_add(1) == self.rcv_nxt {
                    // The client's SYN again: our SYN-ACK was lost.
                    self.send_control(now, SYN | ACK, self.isn, self.rcv_nxt);
                    return Received::Control;
                }
                if s.flags & ACK != 0 && s.ack == self.isn.wrapping_add(1) {
                    self.established(now);
                    return self.data(now, s);
                }
                self.dropped += 1;
                Received::Dropped
            }
            State::Established => {
                if s.flags & SYN != 0 {
                    // A retransmitted SYN-ACK (our ACK was lost): ACK again.
                    if s.flags & ACK != 0 && s.seq.wrapping_add(1) == self.rcv_nxt {
                        self.send_control(now, ACK, self.snd_nxt, self.rcv_nxt);
                        return Received::Control;
                    }
                    if self.peer_isn == Some(s.seq) && s.seq.wrapping_add(1) == self.rcv_nxt {
                        // A simultaneous open's peer that missed our SYN-ACK sends its SYN again.
                        self.send_control(now, SYN | ACK, self.isn, self.rcv_nxt);
                        return Received::Control;
                    }
                    self.dropped += 1;
                    return Received::Dropped;
                }
                self.data(now, s)
            }
        }
    }

    /// A reset (RFC 5961 §3.2): in SYN-SENT believed only if it acknowledges our SYN
    /// (RFC 9293 §3.10.7.3); otherwise only at exactly the next expected sequence number.
    /// One elsewhere in the window draws a challenge ACK (a real peer that lost its state
    /// answers it with a reset we can believe); anything else is dropped.
    fn reset(&mut self, now: Instant, s: &Segment<'_>) -> Received {
        let exact = match self.state {
            State::SynSent => s.flags & ACK != 0 && s.ack == self.isn.wrapping_add(1),
            State::Closed => false,
            State::SynReceived | State::Established => s.seq == self.rcv_nxt,
        };
        if exact {
            self.state = State::Closed;
            return Received::Reset;
        }
        self.resets_ignored += 1;
        let in_window = s.seq.wrapping_sub(self.rcv_nxt) < RECEIVE_AHEAD;
        let due = self.last_challenge.is_none_or(|t| now >= t + CHALLENGE_EVERY);
        if self.state == State::Established && in_window && due {
            self.last_challenge = Some(now);
            self.send_control(now, ACK, self.snd_nxt, self.rcv_nxt);
            return Received::Control;
        }
        Received::Dropped
    }

    /// An established connection's segment: in window (from the next expected byte to
    /// [`RECEIVE_AHEAD`] beyond) and acknowledging what we sent, its data is taken and the
    /// gap before it forgotten.
    fn data(&mut self, now: Instant, s: &Segment<'_>) -> Received {
        if s.flags & ACK == 0 || !self.ack_acceptable(s.ack) {
            self.dropped += 1;
            return Received::Dropped;
        }
        if s.payload.is_empty() {
            self.heard(now, s);
            return Received::Control;
        }
        let ahead = s.seq.wrapping_sub(self.rcv_nxt);
        if ahead >= RECEIVE_AHEAD {
            self.dropped += 1;
            return Received::Dropped;
        }
        self.heard(now, s);
        self.rcv_nxt = s.seq.wrapping_add(s.payload.len() as u32);
        if self.rcv_nxt.wrapping_sub(self.acked) >= ACK_EVERY {
            self.send_control(now, ACK, self.snd_nxt, self.rcv_nxt);
        }
        Received::Data
    }
}

pub mod client;
pub mod direct;
pub mod forwarder;

#[cfg(test)]
mod tests;
