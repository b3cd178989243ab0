//! Line-based, byte-faithful SDP (RFC 8866) reading and rewriting.
//!
//! SDP is never re-serialised: [`Sdp::parse`] records the lines, [`Sdp::rewrite`] copies
//! them through and changes only `c=`, the `m=` port, `a=rtcp`, the `o=` version (and
//! address when asked), and drops ICE attributes when the relay anchors the media. Unknown
//! lines keep their place and their bytes, line endings included.

use std::fmt;
use std::net::IpAddr;

/// Why an SDP body cannot be anchored. The proxy answers these with 488.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    #[error("SDP is not UTF-8")]
    NotUtf8,
    #[error("SDP does not start with v=0")]
    NoVersion,
    #[error("malformed {0} line")]
    Malformed(&'static str),
    #[error("media section {0} has no connection address")]
    NoConnection(usize),
    #[error("SDP has no o= line")]
    NoOrigin,
}

/// The media direction attribute of a stream (RFC 8866 §6.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

/// What the relay needs to know about one `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub kind: String,
    pub port: u16,
    pub proto: String,
    /// Media-level `c=` if present, else the session-level one.
    pub addr: Option<IpAddr>,
    /// `a=rtcp:` port, if given.
    pub rtcp_port: Option<u16>,
    pub rtcp_mux: bool,
    pub direction: Direction,
    /// What a secure leg needs from the section (session-level values filled in where
    /// the section has none).
    pub security: Security,
}

/// The ICE, DTLS and SDES attributes of one media section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    pub ice_ufrag: Option<String>,
    pub ice_pwd: Option<String>,
    /// `a=fingerprint` value (`sha-256 AB:…`).
    pub fingerprint: Option<String>,
    /// `a=setup` value: `actpass`, `active`, `passive`.
    pub setup: Option<String>,
    /// `a=crypto` values, in order.
    pub crypto: Vec<String>,
    pub mid: Option<String>,
}

/// How a section's transport is secured, by its `m=` protocol (and its attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// RTP/AVP or RTP/AVPF.
    Plain,
    /// RTP/SAVP(F) keyed by `a=crypto` (RFC 4568).
    Sdes,
    /// UDP/TLS/RTP/SAVPF: ICE and DTLS-SRTP, as browsers speak.
    WebRtc,
}

impl Profile {
    /// The profile of a section's protocol, or `None` for one the relay does not
    /// translate (T.38's udptl, TCP, application data).
    pub fn of(m: &Media) -> Option<Profile> {
        Profile::from_transport(&m.proto)
    }

    /// The `m=` protocol pinhole writes for this profile.
    pub fn proto(self) -> &'static str {
        match self {
            Profile::Plain => "RTP/AVP",
            Profile::Sdes => "RTP/SAVP",
            Profile::WebRtc => "UDP/TLS/RTP/SAVPF",
        }
    }

    /// The profile of an `m=` protocol, or of rtpengine's `transport-protocol=` value.
    pub fn from_transport(s: &str) -> Option<Profile> {
        match s.to_ascii_uppercase().as_str() {
            "RTP/AVP" | "RTP/AVPF" => Some(Profile::Plain),
            "RTP/SAVP" | "RTP/SAVPF" => Some(Profile::Sdes),
            "UDP/TLS/RTP/SAVP" | "UDP/TLS/RTP/SAVPF" => Some(Profile::WebRtc),
            _ => None,
        }
    }
}

impl Media {
    /// A disabled (port 0) stream or one on hold the old way (`c=0.0.0.0`): left untouched.
    pub fn is_active(&self) -> bool {
        self.port != 0 && !self.addr.is_some_and(|a| a.is_unspecified())
    }
}

/// An address and port the relay offers for one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub addr: IpAddr,
    pub rtp_port: u16,
    pub rtcp_port: u16,
}

/// How to rewrite a body.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// One entry per `m=` line; `None` leaves that section untouched.
    pub media: Vec<Option<Anchor>>,
    /// Replace the `o=` address with this one.
    pub origin: Option<IpAddr>,
    /// Remove ICE attributes (as rtpengine's ICE=remove).
    pub remove_ice: bool,
    /// Per `m=` line, a new transport for the section (a terminated secure leg).
    pub transport: Vec<Option<Transport>>,
    /// Session-level lines to add after `t=` (such as `a=ice-lite`).
    pub session_add: Vec<String>,
}

/// A section whose transport pinhole terminates: its protocol, the lines it writes, and
/// all of the peer's transport attributes removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transport {
    pub proto: String,
    /// Attribute lines (without `a=`) appended to the section.
    pub add: Vec<String>,
    /// Also drop `a=rtcp-fb` (towards a plain RTP/AVP phone).
    pub drop_feedback: bool,
}

/// Attributes besides ICE's that describe the transport of the party that wrote the SDP:
/// replaced by pinhole's own when it terminates the transport.
const TRANSPORT_ATTRS: &[&str] = &[
    "fingerprint",
    "setup",
    "connection",
    "crypto",
    "rtcp-mux",
    "rtcp-mux-only",
    "rtcp-rsize",
    "rtcp",
    "mid",
    "tls-id",
    "group",
];

/// Whether a terminated section (or the session) drops attribute `name`.
fn transport_attr(name: &str) -> bool {
    ICE_ATTRS.contains(&name) || TRANSPORT_ATTRS.contains(&name)
}

#[derive(Debug, Clone, Copy)]
struct Line {
    start: usize,
    /// End of the text, before the line ending.
    end: usize,
    /// End including the line ending.
    next: usize,
}

/// A parsed SDP body: its text, its lines, and the media sections.
pub struct Sdp<'a> {
    text: &'a str,
    lines: Vec<Line>,
    /// Index of the first line of each media section (the `m=` line).
    media_lines: Vec<usize>,
    pub media: Vec<Media>,
    session_addr: Option<IpAddr>,
}

const ICE_ATTRS: &[&str] = &[
    "ice-ufrag",
    "ice-pwd",
    "ice-options",
    "ice-lite",
    "ice-mismatch",
    "candidate",
    "remote-candidates",
    "end-of-candidates",
];

impl<'a> Sdp<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Sdp<'a>, SdpError> {
        let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
        let mut lines = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            let (end, next) = match rest.find('\n') {
                Some(i) => {
                    let e = if i > 0 && rest.as_bytes()[i - 1] == b'\r' { i - 1 } else { i };
                    (pos + e, pos + i + 1)
                }
                None => (text.len(), text.len()),
            };
            lines.push(Line { start: pos, end, next });
            pos = next;
        }
        let line_text = |l: &Line| &text[l.start..l.end];
        if lines.first().map(line_text) != Some("v=0") {
            return Err(SdpError::NoVersion);
        }
        let mut media_lines = Vec::new();
        let mut media: Vec<Media> = Vec::new();
        let mut session_addr = None;
        let mut has_origin = false;
        let mut session_security = Security::default();
        for (i, l) in lines.iter().enumerate() {
            let t = line_text(l);
            if t.is_empty() {
                continue;
            }
            let (kind, value) = t.split_at(t.len().min(2));
            match kind {
                "o=" => {
                    has_origin = true;
                    parse_origin(value)?;
                }
                "m=" => {
                    let mut it = value.split_ascii_whitespace();
                    let k = it.next().ok_or(SdpError::Malformed("m="))?;
                    let port_field = it.next().ok_or(SdpError::Malformed("m="))?;
                    let port = port_field
                        .split('/')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok())
                        .ok_or(SdpError::Malformed("m="))?;
                    let proto = it.next().ok_or(SdpError::Malformed("m="))?;
                    media_lines.push(i);
                    media.push(Media {
                        kind: k.to_owned(),
                        port,
                        proto: proto.to_owned(),
                        addr: None,
                        rtcp_port: None,
                        rtcp_mux: false,
                        direction: Direction::SendRecv,
                        security: Security::default(),
                    });
                }
                "c=" => {
                    let addr = parse_connection(value)?;
                    match media.last_mut() {
                        Some(m) => m.addr = Some(addr),
                        None => session_addr = Some(addr),
                    }
                }
                "a=" => {
                    let (name, val) = value.split_once(':').unwrap_or((value, ""));
                    let sec = match media.last_mut() {
                        Some(m) => &mut m.security,
                        None => &mut session_security,
                    };
                    let val_owned = || Some(val.trim().to_owned());
                    match name {
                        "ice-ufrag" => sec.ice_ufrag = val_owned(),
                        "ice-pwd" => sec.ice_pwd = val_owned(),
                        "fingerprint" => sec.fingerprint = val_owned(),
                        "setup" => sec.setup = val_owned(),
                        "mid" => sec.mid = val_owned(),
                        "crypto" if sec.crypto.len() < 16 => sec.crypto.push(val.trim().to_owned()),
                        _ => {}
                    }
                    let Some(m) = media.last_mut() else { continue };
                    match name {
                        "rtcp" => {
                            let p = val.split_ascii_whitespace().next().unwrap_or("");
                            m.rtcp_port = Some(p.parse().map_err(|_| SdpError::Malformed("a=rtcp"))?);
                        }
                        "rtcp-mux" => m.rtcp_mux = true,
                        "sendonly" => m.direction = Direction::SendOnly,
                        "recvonly" => m.direction = Direction::RecvOnly,
                        "inactive" => m.direction = Direction::Inactive,
                        "sendrecv" => m.direction = Direction::SendRecv,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        if !has_origin {
            return Err(SdpError::NoOrigin);
        }
        for (i, m) in media.iter_mut().enumerate() {
            if m.addr.is_none() {
                m.addr = session_addr;
            }
            let (sec, session) = (&mut m.security, &session_security);
            for (field, value) in [
                (&mut sec.ice_ufrag, &session.ice_ufrag),
                (&mut sec.ice_pwd, &session.ice_pwd),
                (&mut sec.fingerprint, &session.fingerprint),
                (&mut sec.setup, &session.setup),
            ] {
                if field.is_none() {
                    field.clone_from(value);
                }
            }
            if m.port != 0 && m.addr.is_none() {
                return Err(SdpError::NoConnection(i));
            }
        }
        Ok(Sdp { text, lines, media_lines, media, session_addr })
    }

    fn line(&self, i: usize) -> &str {
        let l = self.lines[i];
        &self.text[l.start..l.end]
    }

    fn eol(&self, i: usize) -> &str {
        let l = self.lines[i];
        &self.text[l.end..l.next]
    }

    /// Which media section line `i` belongs to (None: session level).
    fn section_of(&self, i: usize) -> Option<usize> {
        self.media_lines.iter().rposition(|&m| m <= i)
    }

    /// Applies `rw`, returning the new body.
    pub fn rewrite(&self, rw: &Rewrite) -> Vec<u8> {
        let anchor =
            |section: usize| rw.media.get(section).copied().flatten().filter(|_| self.media[section].is_active());
        let transport = |section: usize| rw.transport.get(section).and_then(Option::as_ref);
        let any_transport = rw.transport.iter().any(Option::is_some);
        // The session-level c= follows the first anchored stream.
        let session_anchor = (0..self.media.len()).find_map(anchor);
        let default_eol = self.lines.first().map_or("\r\n", |_| self.eol(0));
        let default_eol = if default_eol.is_empty() { "\r\n" } else { default_eol };
        let mut out = String::with_capacity(self.text.len() + 64);
        let mut pending_c: Option<(usize, Anchor)> = None;
        for i in 0..self.lines.len() {
            let t = self.line(i);
            let eol = if self.eol(i).is_empty() && i + 1 < self.lines.len() { default_eol } else { self.eol(i) };
            let section = self.section_of(i);
            // A media section without its own c= whose anchor differs from the session's
            // gets one, right after m= (and i=, if present), as RFC 8866 orders them.
            if let Some((sec, a)) = pending_c {
                if !t.starts_with("i=") {
                    out.push_str(&format!("c={}{default_eol}", conn(a.addr)));
                    pending_c = None;
                    let _ = sec;
                }
            }
            let (kind, value) = t.split_at(t.len().min(2));
            match (kind, section) {
                ("o=", None) => {
                    out.push_str(&rewrite_origin(value, rw.origin));
                }
                ("c=", None) => match session_anchor {
                    Some(a) => out.push_str(&format!("c={}", conn(a.addr))),
                    None => out.push_str(t),
                },
                ("c=", Some(s)) => match anchor(s) {
                    Some(a) => out.push_str(&format!("c={}", conn(a.addr))),
                    None => out.push_str(t),
                },
                ("m=", Some(s)) => match anchor(s) {
                    Some(a) => {
                        let m_line = replace_m_port(value, a.rtp_port);
                        match transport(s) {
                            Some(t) => out.push_str(&replace_m_proto(&m_line, &t.proto)),
                            None => out.push_str(&m_line),
                        }
                        let has_own_c = self.section_has_c(s);
                        let session_ok =
                            session_anchor.is_some_and(|sa| sa.addr == a.addr) && self.session_addr.is_some();
                        if !has_own_c && !session_ok {
                            pending_c = Some((s, a));
                        }
                    }
                    None => out.push_str(t),
                },
                ("a=", Some(s)) if anchor(s).is_some() => {
                    let Some(a) = anchor(s) else { continue };
                    let (name, val) = value.split_once(':').unwrap_or((value, ""));
                    if let Some(t) = transport(s) {
                        if transport_attr(name) || (t.drop_feedback && name == "rtcp-fb") {
                            continue;
                        }
                    }
                    if rw.remove_ice && ICE_ATTRS.contains(&name) {
                        continue; // drop the line and its ending
                    }
                    if name == "rtcp" {
                        let port = if self.media[s].rtcp_mux { a.rtp_port } else { a.rtcp_port };
                        let addr_part = val.split_ascii_whitespace().count() > 1;
                        if addr_part {
                            out.push_str(&format!("a=rtcp:{port} {}", conn(a.addr)));
                        } else {
                            out.push_str(&format!("a=rtcp:{port}"));
                        }
                    } else {
                        out.push_str(t);
                    }
                }
                ("a=", None) if (rw.remove_ice || any_transport) && session_anchor.is_some() => {
                    let name = value.split(':').next().unwrap_or(value);
                    if ICE_ATTRS.contains(&name) || (any_transport && transport_attr(name)) {
                        continue;
                    }
                    out.push_str(t);
                }
                ("t=", None) => {
                    out.push_str(t);
                    for add in &rw.session_add {
                        out.push_str(eol);
                        out.push_str("a=");
                        out.push_str(add);
                    }
                }
                _ => out.push_str(t),
            }
            out.push_str(eol);
            // A terminated section's own lines close it.
            let last_of_section =
                section.is_some_and(|s| self.media_lines.get(s + 1).map_or(i + 1 == self.lines.len(), |&n| n == i + 1));
            if let (true, Some(s)) = (last_of_section, section) {
                if let Some(t) = transport(s).filter(|_| anchor(s).is_some()) {
                    if self.eol(i).is_empty() {
                        out.push_str(default_eol);
                    }
                    for add in &t.add {
                        out.push_str("a=");
                        out.push_str(add);
                        out.push_str(default_eol);
                    }
                }
            }
        }
        if let Some((_, a)) = pending_c {
            out.push_str(&format!("c={}{default_eol}", conn(a.addr)));
        }
        out.into_bytes()
    }

    fn section_has_c(&self, s: usize) -> bool {
        let start = self.media_lines[s];
        let end = self.media_lines.get(s + 1).copied().unwrap_or(self.lines.len());
        (start + 1..end).any(|i| self.line(i).starts_with("c="))
    }
}

fn conn(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("IN IP4 {a}"),
        IpAddr::V6(a) => format!("IN IP6 {a}"),
    }
}

fn parse_connection(value: &str) -> Result<IpAddr, SdpError> {
    let mut it = value.split_ascii_whitespace();
    let (nettype, addrtype, addr) = (it.next(), it.next(), it.next());
    if nettype != Some("IN") {
        return Err(SdpError::Malformed("c="));
    }
    // Multicast TTL/count suffixes (addr/ttl) are not relayable, but parse the address.
    let a = addr.and_then(|a| a.split('/').next()).ok_or(SdpError::Malformed("c="))?;
    let ip: IpAddr = a.parse().map_err(|_| SdpError::Malformed("c="))?;
    match (addrtype, ip) {
        (Some("IP4"), IpAddr::V4(_)) | (Some("IP6"), IpAddr::V6(_)) => Ok(ip),
        _ => Err(SdpError::Malformed("c=")),
    }
}

/// `o=<username> <sess-id> <sess-version> IN <addrtype> <address>`
fn parse_origin(value: &str) -> Result<(), SdpError> {
    let f: Vec<&str> = value.split_ascii_whitespace().collect();
    if f.len() != 6 || f[2].parse::<u64>().is_err() {
        return Err(SdpError::Malformed("o="));
    }
    Ok(())
}

fn rewrite_origin(value: &str, addr: Option<IpAddr>) -> String {
    let f: Vec<&str> = value.split_ascii_whitespace().collect();
    // parse_origin validated six fields and a numeric version.
    let version = f.get(2).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0).wrapping_add(1);
    let (addrtype, address) = match addr {
        Some(IpAddr::V4(a)) => ("IP4".to_owned(), a.to_string()),
        Some(IpAddr::V6(a)) => ("IP6".to_owned(), a.to_string()),
        None => (f.get(4).copied().unwrap_or("IP4").to_owned(), f.get(5).copied().unwrap_or("").to_owned()),
    };
    format!(
        "o={} {} {version} {} {addrtype} {address}",
        f.first().copied().unwrap_or("-"),
        f.get(1).copied().unwrap_or("0"),
        f.get(3).copied().unwrap_or("IN"),
    )
}

/// `m=<media> <port> <proto> <fmt>…` with another protocol.
fn replace_m_proto(m_line: &str, proto: &str) -> String {
    let mut f: Vec<&str> = m_line.splitn(4, ' ').collect();
    if f.len() >= 3 {
        f[2] = proto;
    }
    f.join(" ")
}

fn replace_m_port(value: &str, port: u16) -> String {
    // m=<media> <port>[/<count>] <proto> <fmt> …: keep every byte but the port digits.
    let media_end = value.find(' ').unwrap_or(value.len());
    let rest = &value[media_end..];
    let port_start = media_end + (rest.len() - rest.trim_start().len());
    let after = &value[port_start..];
    let port_len = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
    format!("m={}{}{}", &value[..port_start], port, &value[port_start + port_len..])
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        })
    }
}

#[cfg(test)]
mod tests;
