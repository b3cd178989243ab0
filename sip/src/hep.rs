//! HEP v3 (EEP), the capture format Homer, sngrep, Kamailio's siptrace and rtpengine speak:
//! a datagram of typed chunks around one captured message. Encoding only (pinhole exports,
//! it never takes HEP in); the decoder is for tests.
//!
//! Chunk order follows what the strictest receivers read: the fixed header chunks (family,
//! protocol, ports, time, payload type, capture id), the addresses, the password, the
//! payload, and only then the correlation id — sngrep reads the payload at the position
//! those chunks put it and ignores what follows.

use std::net::{IpAddr, SocketAddr};

/// The captured payload's type (HEP's "protocol type" chunk).
pub const SIP: u8 = 0x01;
/// RTCP as JSON (rtpengine and captagent send it so).
pub const RTCP_JSON: u8 = 0x05;
/// A media quality report as JSON (Homer's full MOS report).
pub const REPORT_JSON: u8 = 0x22;

const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;

/// One message to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Carried over TCP (TLS and WebSocket too) rather than UDP.
    pub stream: bool,
    /// Unix time: seconds and microseconds.
    pub time: (u32, u32),
    /// [`SIP`], [`RTCP_JSON`] or [`REPORT_JSON`].
    pub kind: u8,
    pub payload: &'a [u8],
    /// Links RTCP and reports to their call (its Call-ID).
    pub correlation: Option<&'a str>,
}

/// Why a capture was not encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HepError {
    #[error("larger than a HEP packet holds")]
    TooLarge,
}

fn chunk(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&((data.len() + 6) as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// An address in the family of `like`: IPv4 as IPv4-mapped IPv6 when the other end is
/// IPv6 (HEP carries one family per packet).
fn in_family(ip: IpAddr, v6: bool) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v6 => IpAddr::V6(v4.to_ipv6_mapped()),
        other => other,
    }
}

/// Encodes `c` for capture agent `capture_id` (with `password` when the receiver wants
/// one) into `out`, which is cleared first.
pub fn encode(c: &Capture<'_>, capture_id: u32, password: Option<&str>, out: &mut Vec<u8>) -> Result<(), HepError> {
    let password = password.filter(|p| !p.is_empty());
    let correlation = c.correlation.filter(|s| !s.is_empty());
    let v6 = c.src.is_ipv6() || c.dst.is_ipv6();
    let addr_len = if v6 { 2 * (6 + 16) } else { 2 * (6 + 4) };
    let len = 6
        + 2 * 7
        + 2 * 8
        + 2 * 10
        + 7
        + 10
        + addr_len
        + password.map_or(0, |p| 6 + p.len())
        + 6
        + c.payload.len()
        + correlation.map_or(0, |s| 6 + s.len());
    if len > usize::from(u16::MAX) || password.is_some_and(|p| p.len() > 1024) {
        return Err(HepError::TooLarge);
    }
    out.clear();
    out.extend_from_slice(b"HEP3");
    out.extend_from_slice(&(len as u16).to_be_bytes());
    chunk(out, 1, &[if v6 { 10 } else { 2 }]);
    chunk(out, 2, &[if c.stream { IPPROTO_TCP } else { IPPROTO_UDP }]);
    chunk(out, 7, &c.src.port().to_be_bytes());
    chunk(out, 8, &c.dst.port().to_be_bytes());
    chunk(out, 9, &c.time.0.to_be_bytes());
    chunk(out, 10, &c.time.1.to_be_bytes());
    chunk(out, 11, &[c.kind]);
    chunk(out, 12, &capture_id.to_be_bytes());
    for (kind4, kind6, ip) in [(3, 5, c.src.ip()), (4, 6, c.dst.ip())] {
        match in_family(ip, v6) {
            IpAddr::V4(a) => chunk(out, kind4, &a.octets()),
            IpAddr::V6(a) => chunk(out, kind6, &a.octets()),
        }
    }
    if let Some(p) = password {
        chunk(out, 14, p.as_bytes());
    }
    chunk(out, 15, c.payload);
    if let Some(s) = correlation {
        chunk(out, 17, s.as_bytes());
    }
    debug_assert_eq!(out.len(), len);
    Ok(())
}

/// A decoded HEP v3 packet: the chunks a test looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    pub kind: u8,
    pub capture_id: u32,
    pub password: Option<String>,
    pub payload: Vec<u8>,
    pub correlation: Option<String>,
    pub time: (u32, u32),
}

/// Decodes a HEP v3 packet; `None` unless every chunk is whole.
pub fn decode(b: &[u8]) -> Option<Decoded> {
    if b.get(..4)? != b"HEP3" {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*b.get(4)?, *b.get(5)?]));
    let mut rest = b.get(6..total)?;
    let mut d = Decoded::default();
    let (mut ips, mut ports): ([Option<IpAddr>; 2], [u16; 2]) = ([None; 2], [0; 2]);
    while !rest.is_empty() {
        let kind = u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]);
        let len = usize::from(u16::from_be_bytes([*rest.get(4)?, *rest.get(5)?]));
        let data = rest.get(6..len)?;
        rest = &rest[len..];
        let u32_of = |d: &[u8]| Some(u32::from_be_bytes(d.try_into().ok()?));
        match kind {
            3 | 4 => ips[usize::from(kind - 3)] = Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            5 | 6 => ips[usize::from(kind - 5)] = Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            7 | 8 => ports[usize::from(kind - 7)] = u16::from_be_bytes(data.try_into().ok()?),
            9 => d.time.0 = u32_of(data)?,
            10 => d.time.1 = u32_of(data)?,
            11 => d.kind = *data.first()?,
            12 => d.capture_id = u32_of(data)?,
            14 => d.password = Some(String::from_utf8_lossy(data).into_owned()),
            15 => d.payload = data.to_vec(),
            17 => d.correlation = Some(String::from_utf8_lossy(data).into_owned()),
            _ => {}
        }
    }
    d.src = ips[0].map(|ip| SocketAddr::new(ip, ports[0]));
    d.dst = ips[1].map(|ip| SocketAddr::new(ip, ports[1]));
    Some(d)
}

/// The Call-ID of a SIP message (`Call-ID:` or its compact form `i:`), for correlation.
pub fn call_id(msg: &[u8]) -> Option<&str> {
    let head = msg.split(|&c| c == b'\n').take_while(|l| !l.is_empty() && *l != b"\r");
    for line in head.skip(1) {
        let Some(colon) = line.iter().position(|&c| c == b':') else { continue };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
            return std::str::from_utf8(line[colon + 1..].trim_ascii()).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] =
        b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1\r\ni: abc@192.0.2.1\r\n\r\nv=0\r\n";

    fn capture(payload: &[u8]) -> Capture<'_> {
        Capture {
            src: "192.0.2.1:5060".parse().expect("src"),
            dst: "198.51.100.2:5080".parse().expect("dst"),
            stream: false,
            time: (1_800_000_000, 250_000),
            kind: SIP,
            payload,
            correlation: None,
        }
    }

    #[test]
    fn a_sip_message_encodes_with_the_fixed_chunks_first_and_decodes_whole() {
        let mut out = Vec::new();
        encode(&capture(INVITE), 2001, None, &mut out).expect("encode");
        assert_eq!(&out[..4], b"HEP3");
        assert_eq!(usize::from(u16::from_be_bytes([out[4], out[5]])), out.len());
        // The layout sngrep reads by position: 8 fixed chunks (73 bytes with the header),
        // two IPv4 chunks, then the payload chunk.
        assert_eq!(&out[73 + 20..73 + 24], &[0, 0, 0, 15]);
        assert_eq!(&out[73 + 26..73 + 26 + INVITE.len()], INVITE);
        let d = decode(&out).expect("decode");
        assert_eq!(d.src, Some("192.0.2.1:5060".parse().expect("src")));
        assert_eq!(d.dst, Some("198.51.100.2:5080".parse().expect("dst")));
        assert_eq!((d.kind, d.capture_id, d.time), (SIP, 2001, (1_800_000_000, 250_000)));
        assert_eq!((d.payload.as_slice(), d.password, d.correlation), (INVITE, None, None));
    }

    #[test]
    fn password_and_correlation_are_carried_and_mixed_families_become_ipv6() {
        let mut c = capture(b"{}");
        c.kind = RTCP_JSON;
        c.correlation = Some("abc@192.0.2.1");
        c.dst = "[2001:db8::2]:5080".parse().expect("dst");
        let mut out = Vec::new();
        encode(&c, 7, Some("s3cret"), &mut out).expect("encode");
        let d = decode(&out).expect("decode");
        assert_eq!(d.password.as_deref(), Some("s3cret"));
        assert_eq!(d.correlation.as_deref(), Some("abc@192.0.2.1"));
        assert_eq!(d.src, Some("[::ffff:192.0.2.1]:5060".parse().expect("mapped")));
        assert_eq!(d.payload, b"{}");
    }

    #[test]
    fn a_message_too_large_for_one_packet_is_refused() {
        let big = vec![b'x'; 65_500];
        assert_eq!(encode(&capture(&big), 1, None, &mut Vec::new()), Err(HepError::TooLarge));
        let fits = vec![b'x'; 65_000];
        assert!(encode(&capture(&fits), 1, None, &mut Vec::new()).is_ok());
    }

    #[test]
    fn call_id_is_found_in_full_and_compact_form_and_not_in_the_body() {
        assert_eq!(call_id(INVITE), Some("abc@192.0.2.1"));
        assert_eq!(call_id(b"BYE sip:a SIP/2.0\r\nCall-ID:  x-1 \r\n\r\n"), Some("x-1"));
        assert_eq!(call_id(b"SIP/2.0 200 OK\r\nVia: x\r\n\r\nCall-ID: body\r\n"), None);
        assert_eq!(call_id(b""), None);
    }
}
