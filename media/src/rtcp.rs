//! What the relay reads of RTCP (RFC 3550 §6.4): sender reports' NTP time (the `LSR` a
//! receiver will echo) and the report blocks of sender and receiver reports (loss, jitter,
//! `LSR`/`DLSR` for the round trip). A compound packet is walked part by part; a part whose
//! length runs past the datagram ends the walk, and what came before it still counts.

/// One thing found in an RTCP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A sender report from `ssrc`: the middle 32 bits of its NTP timestamp, which
    /// receivers echo as `LSR`.
    Sender { ssrc: u32, ntp_middle: u32 },
    /// A report block: what `reporter` received of `source`.
    Block(ReportBlock),
}

/// A report block of an SR or RR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlock {
    pub reporter: u32,
    pub source: u32,
    /// Fraction lost since the last report, in 1/256.
    pub fraction_lost: u8,
    /// Cumulative packets lost (24-bit signed).
    pub cumulative_lost: i32,
    pub highest_seq: u32,
    /// Interarrival jitter in the stream's timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the last SR's NTP time from `source` (0: none yet).
    pub lsr: u32,
    /// Delay since that SR in 1/65536 s.
    pub dlsr: u32,
}

const SR: u8 = 200;
const RR: u8 = 201;
const BLOCK: usize = 24;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Calls `f` with each sender report and report block in `data`, in order.
pub fn for_each(data: &[u8], mut f: impl FnMut(Item)) {
    let mut rest = data;
    while rest.len() >= 4 {
        if rest[0] >> 6 != 2 {
            return;
        }
        let count = usize::from(rest[0] & 0x1f);
        let pt = rest[1];
        let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
        let Some(part) = rest.get(..len) else { return };
        rest = &rest[len..];
        let (reporter, blocks_at) = match pt {
            SR => {
                let (Some(ssrc), Some(ntp_middle)) = (u32_at(part, 4), u32_at(part, 10)) else { continue };
                f(Item::Sender { ssrc, ntp_middle });
                (ssrc, 28)
            }
            RR => match u32_at(part, 4) {
                Some(ssrc) => (ssrc, 8),
                None => continue,
            },
            _ => continue,
        };
        for i in 0..count {
            let at = blocks_at + i * BLOCK;
            let Some(b) = part.get(at..at + BLOCK) else { break };
            let word = |k: usize| u32_at(b, k).unwrap_or(0);
            let lost = word(4) & 0x00ff_ffff;
            f(Item::Block(ReportBlock {
                reporter,
                source: word(0),
                fraction_lost: b[4],
                // Sign-extend the 24-bit field.
                cumulative_lost: ((lost << 8) as i32) >> 8,
                highest_seq: word(8),
                jitter: word(12),
                lsr: word(16),
                dlsr: word(20),
            }));
        }
    }
}

/// A sender report from `ssrc` whose NTP time's middle bits are `ntp_middle`.
#[cfg(test)]
pub(crate) fn sender_report(ssrc: u32, ntp_middle: u32) -> Vec<u8> {
    let mut p = vec![0x80, SR, 0, 6];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&(ntp_middle >> 16).to_be_bytes());
    p.extend_from_slice(&((ntp_middle & 0xffff) << 16).to_be_bytes());
    p.extend_from_slice(&[0; 12]);
    p
}

/// A receiver report from `ssrc` with one block about `about` echoing `lsr` after `dlsr`.
#[cfg(test)]
pub(crate) fn receiver_report(ssrc: u32, about: u32, lsr: u32, dlsr: u32) -> Vec<u8> {
    let mut p = vec![0x81, RR, 0, 7];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&about.to_be_bytes());
    p.extend_from_slice(&[0; 12]);
    p.extend_from_slice(&lsr.to_be_bytes());
    p.extend_from_slice(&dlsr.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender report from 0x11111111 with one block about 0x22222222, followed by a
    /// receiver report from 0x22222222 with one block about 0x11111111.
    fn compound() -> Vec<u8> {
        let mut p = vec![0x81, SR, 0, 12];
        p.extend_from_slice(&0x1111_1111u32.to_be_bytes());
        p.extend_from_slice(&[0xe0, 0x00, 0x00, 0x01, 0xab, 0xcd, 0x80, 0x00]); // NTP
        p.extend_from_slice(&[0; 12]); // RTP time, packet and octet counts
        p.extend_from_slice(&0x2222_2222u32.to_be_bytes());
        p.extend_from_slice(&[64, 0xff, 0xff, 0xfe]); // 25% lost, cumulative −2
        p.extend_from_slice(&[0, 1, 0, 10]);
        p.extend_from_slice(&80u32.to_be_bytes());
        p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        p.extend_from_slice(&65536u32.to_be_bytes());
        p.extend_from_slice(&[0x81, RR, 0, 7]);
        p.extend_from_slice(&0x2222_2222u32.to_be_bytes());
        p.extend_from_slice(&0x1111_1111u32.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 3]);
        p.extend_from_slice(&[0, 0, 1, 0]);
        p.extend_from_slice(&8u32.to_be_bytes());
        p.extend_from_slice(&0x0001_abcdu32.to_be_bytes());
        p.extend_from_slice(&32768u32.to_be_bytes());
        p
    }

    #[test]
    fn a_compound_report_yields_its_sender_time_and_every_block() {
        let mut items = Vec::new();
        for_each(&compound(), |i| items.push(i));
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], Item::Sender { ssrc: 0x1111_1111, ntp_middle: 0x0001_abcd });
        let Item::Block(b) = items[1] else { panic!("block") };
        assert_eq!((b.reporter, b.source, b.fraction_lost, b.cumulative_lost), (0x1111_1111, 0x2222_2222, 64, -2));
        assert_eq!((b.highest_seq, b.jitter, b.lsr, b.dlsr), (65546, 80, 0x1234_5678, 65536));
        let Item::Block(b) = items[2] else { panic!("block") };
        assert_eq!(
            (b.reporter, b.source, b.cumulative_lost, b.lsr, b.dlsr),
            (0x2222_2222, 0x1111_1111, 3, 0x0001_abcd, 32768)
        );
    }

    #[test]
    fn a_part_running_past_the_datagram_ends_the_walk_and_what_came_before_counts() {
        let mut p = compound();
        p.truncate(p.len() - 4);
        let mut items = Vec::new();
        for_each(&p, |i| items.push(i));
        assert_eq!(items.len(), 2, "the SR and its block, not the cut RR");
        // A block count larger than the part holds reads only whole blocks.
        let mut p = compound();
        p[0] = 0x85;
        let mut items = Vec::new();
        for_each(&p[..52], |i| items.push(i));
        assert_eq!(items.len(), 2);
        for_each(&[0x81, SR, 0xff, 0xff], |_| panic!("nothing"));
        for_each(&[], |_| panic!("nothing"));
    }
}
