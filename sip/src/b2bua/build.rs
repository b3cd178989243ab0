//! Messages the B2BUA writes itself: requests of its dialogs, hop-by-hop CANCEL/ACK,
//! responses with bodies, the header allow-list, and reading a carrier's challenge.

use std::net::SocketAddr;

use crate::auth::Algorithm;
use crate::message::Message;
use crate::transport::Transport;

pub(super) use crate::proxy::{build_hop_request as hop_request, contact_uri, sdp_body};

/// A request from its parts.
pub(super) struct RequestSpec<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    pub via: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub call_id: &'a str,
    pub cseq: u32,
    pub contact: Option<&'a str>,
    pub routes: &'a [String],
    pub extra: &'a [String],
    /// The body and its Content-Type.
    pub body: Option<(&'a [u8], &'a str)>,
}

impl RequestSpec<'_> {
    pub(super) fn build(&self) -> Vec<u8> {
        let mut out = format!("{} {} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\n", self.method, self.uri, self.via);
        for r in self.routes {
            out.push_str(&format!("Route: {r}\r\n"));
        }
        out.push_str(&format!(
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {}\r\n",
            self.from, self.to, self.call_id, self.cseq, self.method
        ));
        if let Some(c) = self.contact {
            out.push_str(&format!("Contact: {c}\r\n"));
        }
        for e in self.extra {
            out.push_str(e);
            out.push_str("\r\n");
        }
        out.push_str("User-Agent: pinhole\r\n");
        finish(out, self.body)
    }
}

fn finish(mut head: String, body: Option<(&[u8], &str)>) -> Vec<u8> {
    match body {
        Some((b, content_type)) => {
            head.push_str(&format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", b.len()));
            let mut out = head.into_bytes();
            out.extend_from_slice(b);
            out
        }
        None => {
            head.push_str("Content-Length: 0\r\n\r\n");
            head.into_bytes()
        }
    }
}

/// A response to `request` with our To tag, `extra` headers and an optional body.
pub(super) fn response_with_body(
    request: &Message,
    code: u16,
    reason: &str,
    to_tag: &str,
    extra: &[String],
    body: Option<(&[u8], &str)>,
) -> Vec<u8> {
    let base = request.response(code, reason, Some(to_tag), extra);
    // `response` ends with "Server: pinhole\r\nContent-Length: 0\r\n\r\n": replace the
    // length and add the body.
    let text = String::from_utf8_lossy(&base);
    let head = text.strip_suffix("Content-Length: 0\r\n\r\n").unwrap_or(&text).to_owned();
    finish(head, body)
}

/// The values of `request`'s headers named in `allow` (case-insensitive), as header lines.
pub(super) fn copied_headers(request: &Message, allow: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for h in &request.headers {
        let line = request.text(h.line.clone());
        let Some((name, _)) = line.split_once(':') else { continue };
        let name = name.trim();
        if allow.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            let value = request.text(h.value.clone());
            // 100rel is not carried across: PRACK is not bridged.
            if name.eq_ignore_ascii_case("supported") || name.eq_ignore_ascii_case("k") {
                let kept: Vec<&str> =
                    value.split(',').map(str::trim).filter(|v| !v.eq_ignore_ascii_case("100rel")).collect();
                if !kept.is_empty() {
                    out.push(format!("{name}: {}", kept.join(", ")));
                }
                continue;
            }
            out.push(format!("{name}: {value}"));
        }
    }
    out
}

pub(super) fn host_port(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => v.to_string(),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    }
}

pub(super) fn transport_param(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "",
        Transport::Tcp => ";transport=tcp",
        Transport::Tls => ";transport=tls",
        Transport::Ws => ";transport=ws",
        Transport::Wss => ";transport=wss",
    }
}

/// A carrier's `Digest` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ParsedChallenge {
    pub realm: String,
    pub nonce: String,
    pub algorithm: Algorithm,
    pub opaque: Option<String>,
    /// `qop` offered includes `auth`.
    pub qop_auth: bool,
}

impl ParsedChallenge {
    pub(super) fn parse(value: &str) -> Option<ParsedChallenge> {
        let (scheme, params) = value.trim().split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return None;
        }
        let mut c = ParsedChallenge {
            realm: String::new(),
            nonce: String::new(),
            algorithm: Algorithm::Md5,
            opaque: None,
            qop_auth: false,
        };
        for (k, v) in crate::auth::auth_params(params)? {
            match k.to_ascii_lowercase().as_str() {
                "realm" => c.realm = v,
                "nonce" => c.nonce = v,
                "opaque" => c.opaque = Some(v),
                "algorithm" => c.algorithm = Algorithm::from_name(&v)?,
                "qop" => c.qop_auth = v.split(',').any(|q| q.trim().eq_ignore_ascii_case("auth")),
                _ => {}
            }
        }
        (!c.nonce.is_empty()).then_some(c)
    }
}
