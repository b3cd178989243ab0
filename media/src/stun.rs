//! STUN Binding (RFC 8489) for keepalives multiplexed on the SIP UDP port (RFC 5626 §8,
//! demultiplexed as RFC 7983 §7 says): a phone or agent asks what address it is seen from
//! and refreshes its NAT mapping at the same time. Messages are decoded and encoded with
//! stun-rs.
//!
//! Safe on an open port: only well-formed Binding requests are answered, anything else is
//! dropped (and counted by the caller), and a small request never gets a much larger answer
//! (SOFTWARE only for requests at least as large as the answer, FINGERPRINT only when the
//! request carried one).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use stun_rs::attributes::discovery::{
    ChangeRequest, ChangeRequestFlags, OtherAddress, Padding, ResponseOrigin, ResponsePort,
};
use stun_rs::attributes::stun::{ErrorCode, Fingerprint, MessageIntegrity, Software, UserName, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::StunAttribute;
use stun_rs::{DecoderContextBuilder, HMACKey};
use stun_rs::{MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder, TransactionId};

use crate::guard::{Admit, GuardConfig, GuessGuard};

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const SOFTWARE: &str = "pinhole";

/// A STUN message's bytes (our messages fit in 256).
pub(crate) fn encode(msg: &stun_rs::StunMessage) -> Option<Vec<u8>> {
    let mut out = vec![0u8; 256];
    let n = MessageEncoderBuilder::default().build().encode(&mut out, msg).ok()?;
    out.truncate(n);
    Some(out)
}

/// A Binding message of `class` (a request, an indication, a success response) with
/// `transaction`, USERNAME `user` when given, signed with short-term `password`.
pub(crate) fn signed_binding(
    class: stun_rs::MessageClass,
    transaction: [u8; 12],
    user: Option<&str>,
    password: &str,
) -> Option<Vec<u8>> {
    let key = stun_rs::HMACKey::new_short_term(password).ok()?;
    let mut b = stun_rs::StunMessageBuilder::new(stun_rs::methods::BINDING, class)
        .with_transaction_id(stun_rs::TransactionId::from(transaction));
    if let Some(u) = user {
        b = b.with_attribute(stun_rs::attributes::stun::UserName::new(u).ok()?);
    }
    encode(&b.with_attribute(stun_rs::attributes::stun::MessageIntegrity::new(key)).build())
}

/// Whether `data` carries a valid MESSAGE-INTEGRITY under short-term `password`.
pub(crate) fn verified(data: &[u8], password: &str) -> bool {
    let Ok(key) = stun_rs::HMACKey::new_short_term(password) else { return false };
    let ctx = stun_rs::DecoderContextBuilder::default().with_key(key).with_validation().build();
    MessageDecoderBuilder::default().with_context(ctx).build().decode(data).is_ok()
}

/// Does this datagram look like STUN rather than SIP (RFC 7983: first byte 0–3, and the
/// RFC 5389 magic cookie)?
pub fn looks_like_stun(b: &[u8]) -> bool {
    b.len() >= 20 && b[0] < 4 && b[4..8] == MAGIC_COOKIE
}

/// A bare Binding request with this transaction ID: an agent's probe of a relay's round
/// trip.
pub fn binding_request(txid: [u8; 12]) -> Option<Vec<u8>> {
    encode(
        &StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(TransactionId::from(txid)).build(),
    )
}

/// Whether `b` is a Binding success response to the request with `txid`.
pub fn answers(b: &[u8], txid: [u8; 12]) -> bool {
    if !looks_like_stun(b) {
        return false;
    }
    let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(b) else { return false };
    msg.method() == BINDING
        && msg.class() == MessageClass::SuccessResponse
        && *msg.transaction_id() == TransactionId::from(txid)
}

/// The answer to a Binding request from `src`, or `None` when `req` is not one.
pub fn binding_response(req: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
    if !looks_like_stun(req) {
        return None;
    }
    let (msg, _) = MessageDecoderBuilder::default().build().decode(req).ok()?;
    if msg.method() != BINDING || msg.class() != MessageClass::Request {
        return None;
    }
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(*msg.transaction_id())
        .with_attribute(XorMappedAddress::from(src));
    // Bare header + XOR-MAPPED-ADDRESS (IPv4) is 32 bytes; SOFTWARE adds 12 more.
    if req.len() >= 44 {
        b = b.with_attribute(Software::new(SOFTWARE).ok()?);
    }
    if msg.get::<Fingerprint>().is_some() {
        b = b.with_attribute(Fingerprint::default());
    }
    let mut out = vec![0u8; 128];
    let n = MessageEncoderBuilder::default().build().encode(&mut out, &b.build()).ok()?;
    out.truncate(n);
    Some(out)
}

/// The RFC 5780 NAT-behaviour-discovery service: two ports on a primary address and, when
/// configured, the same two ports on an alternate address.
#[derive(Debug, Clone)]
pub struct StunServerConfig {
    pub primary: IpAddr,
    pub alternate: Option<IpAddr>,
    pub ports: [u16; 2],
    /// Requests per second each source address may make (burst: 2 s worth).
    pub rate: u32,
    /// Credentials for MESSAGE-INTEGRITY (RFC 8489 §9.1 short-term: USERNAME + the
    /// password as key). Requests without credentials are answered unauthenticated. Failed
    /// checks are braked per source prefix and per username ([`crate::guard`]).
    pub users: Vec<(String, String)>,
}

/// A response to send from one of the service's sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunReply {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Why a datagram got no answer (counted by the shell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StunDrop {
    /// Not a well-formed STUN Binding request.
    Malformed,
    /// Over the per-source rate.
    RateLimited,
    /// CHANGE-REQUEST for an address or port this server does not have.
    CannotChange,
    /// Credentials from a source or for a username that failed too often: not checked.
    Guarded,
    /// Our own answer could not be encoded (a bug, counted apart from bad input).
    Encode,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct StunServer {
    cfg: StunServerConfig,
    buckets: HashMap<IpAddr, Bucket>,
    guard: GuessGuard,
    next_sweep: Option<Instant>,
    /// Checked in place of an unknown user's key, so unknown users cost the same work.
    decoy: HMACKey,
}

impl StunServer {
    pub fn new(cfg: StunServerConfig) -> StunServer {
        let decoy = HMACKey::new_short_term("decoy-password-never-matches").expect("a plain ASCII password is valid");
        StunServer {
            cfg,
            buckets: HashMap::new(),
            guard: GuessGuard::new(GuardConfig::default()),
            next_sweep: None,
            decoy,
        }
    }

    /// Checks USERNAME + MESSAGE-INTEGRITY; `Ok(None)` means a 401.
    fn check_integrity(
        &mut self,
        now: Instant,
        src: IpAddr,
        user: &str,
        data: &[u8],
    ) -> Result<Option<HMACKey>, StunDrop> {
        if self.next_sweep.is_none_or(|t| now >= t) {
            self.guard.expire(now);
            self.next_sweep = Some(now + Duration::from_secs(1));
        }
        if self.guard.admit(now, src, user) != Admit::Check {
            return Err(StunDrop::Guarded);
        }
        let known =
            self.cfg.users.iter().find(|(name, _)| name == user).and_then(|(_, pw)| HMACKey::new_short_term(pw).ok());
        let key = known.clone().unwrap_or_else(|| self.decoy.clone());
        let ctx = DecoderContextBuilder::default().with_key(key).with_validation().build();
        let valid = MessageDecoderBuilder::default().with_context(ctx).build().decode(data).is_ok() && known.is_some();
        if valid {
            self.guard.succeeded(now, src, user);
            Ok(known)
        } else {
            self.guard.failed(now, src, user);
            Ok(None)
        }
    }

    fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        let rate = f64::from(self.cfg.rate.max(1));
        if self.buckets.len() > 100_000 {
            // A flood of sources: forget the idle ones rather than grow without bound.
            self.buckets.retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(10));
        }
        let b = self.buckets.entry(ip).or_insert(Bucket { tokens: 2.0 * rate, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(2.0 * rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Answers an RFC 3489 ("classic STUN") Binding request: no magic cookie, a 16-byte
    /// transaction id; MAPPED-ADDRESS, SOURCE-ADDRESS and CHANGED-ADDRESS in the answer, and
    /// the same CHANGE-REQUEST semantics. RESPONSE-ADDRESS is ignored (it would make the
    /// server a reflector).
    fn handle_classic(
        &mut self,
        now: Instant,
        local: SocketAddr,
        src: SocketAddr,
        data: &[u8],
    ) -> Result<StunReply, StunDrop> {
        if data.len() < 20 || data[0..2] != [0x00, 0x01] {
            return Err(StunDrop::Malformed);
        }
        let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
        if data.len() != 20 + len || len % 4 != 0 || !src.is_ipv4() {
            return Err(StunDrop::Malformed);
        }
        let mut flags = 0u32;
        let mut pos = 20;
        while pos + 4 <= data.len() {
            let t = u16::from_be_bytes([data[pos], data[pos + 1]]);
            let l = usize::from(u16::from_be_bytes([data[pos + 2], data[pos + 3]]));
            let v = data.get(pos + 4..pos + 4 + l).ok_or(StunDrop::Malformed)?;
            if t == 0x0003 && l == 4 {
                flags = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            }
            pos += 4 + l.next_multiple_of(4);
        }
        if !self.allow(now, src.ip()) {
            return Err(StunDrop::RateLimited);
        }
        let other_ip = self.cfg.alternate.map(|alt| if local.ip() == alt { self.cfg.primary } else { alt });
        let other_port = if local.port() == self.cfg.ports[0] { self.cfg.ports[1] } else { self.cfg.ports[0] };
        let from_ip = if flags & 4 != 0 { other_ip.ok_or(StunDrop::CannotChange)? } else { local.ip() };
        let from = SocketAddr::new(from_ip, if flags & 2 != 0 { other_port } else { local.port() });
        let mut out = Vec::with_capacity(56);
        out.extend_from_slice(&[0x01, 0x01, 0, 0]);
        out.extend_from_slice(&data[4..20]);
        let mut addr_attr = |t: u16, a: SocketAddr| {
            if let SocketAddr::V4(a) = a {
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(&8u16.to_be_bytes());
                out.extend_from_slice(&[0, 1]);
                out.extend_from_slice(&a.port().to_be_bytes());
                out.extend_from_slice(&a.ip().octets());
            }
        };
        addr_attr(0x0001, src);
        addr_attr(0x0004, from);
        if let Some(ip) = other_ip {
            addr_attr(0x0005, SocketAddr::new(ip, other_port));
        }
        let body = (out.len() - 20) as u16;
        out[2..4].copy_from_slice(&body.to_be_bytes());
        Ok(StunReply { from, to: src, bytes: out })
    }

    /// Answers a Binding request that arrived on `local` from `src` (RFC 8489 §7, RFC 5780
    /// §6): XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN and OTHER-ADDRESS; CHANGE-REQUEST picks the
    /// socket it leaves from, RESPONSE-PORT where it goes. A response is never more than
    /// three times its request (or 64 bytes): optional attributes are left out first.
    pub fn handle(
        &mut self,
        now: Instant,
        local: SocketAddr,
        src: SocketAddr,
        data: &[u8],
    ) -> Result<StunReply, StunDrop> {
        if !looks_like_stun(data) {
            return self.handle_classic(now, local, src, data);
        }
        let (msg, _) = MessageDecoderBuilder::default().build().decode(data).map_err(|_| StunDrop::Malformed)?;
        if msg.method() != BINDING || msg.class() != MessageClass::Request {
            return Err(StunDrop::Malformed);
        }
        if !self.allow(now, src.ip()) {
            return Err(StunDrop::RateLimited);
        }
        // Credentials, when the request carries them: a bad one gets 401 (RFC 8489 §9.1.3).
        let key = match (msg.get::<UserName>(), msg.get::<MessageIntegrity>()) {
            (Some(StunAttribute::UserName(u)), Some(_)) => {
                match self.check_integrity(now, src.ip(), u.as_str(), data)? {
                    Some(key) => Some(key),
                    None => return Ok(StunReply { from: local, to: src, bytes: unauthorized(&msg)? }),
                }
            }
            _ => None,
        };
        let other_ip = |ip: IpAddr| -> Option<IpAddr> {
            let alt = self.cfg.alternate?;
            Some(if ip == alt { self.cfg.primary } else { alt })
        };
        let other_port = |p: u16| if p == self.cfg.ports[0] { self.cfg.ports[1] } else { self.cfg.ports[0] };
        let (change_ip, change_port) = match msg.get::<ChangeRequest>() {
            Some(StunAttribute::ChangeRequest(c)) => {
                (c.flags().contains(ChangeRequestFlags::ChangeIp), c.flags().contains(ChangeRequestFlags::ChangePort))
            }
            _ => (false, false),
        };
        let from_ip = if change_ip { other_ip(local.ip()).ok_or(StunDrop::CannotChange)? } else { local.ip() };
        let from = SocketAddr::new(from_ip, if change_port { other_port(local.port()) } else { local.port() });
        let to = match msg.get::<ResponsePort>() {
            Some(StunAttribute::ResponsePort(p)) => SocketAddr::new(src.ip(), *p.as_ref()),
            _ => src,
        };
        // Authenticated requests are not reflection material: no size budget for them.
        let budget = if key.is_some() { usize::MAX } else { (data.len() * 3).max(64) };
        let mut b = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(*msg.transaction_id())
            .with_attribute(XorMappedAddress::from(src))
            .with_attribute(ResponseOrigin::from(from));
        let mut size = 20 + attr_len(src) * 2;
        if let Some(ip) = other_ip(local.ip()) {
            let other = SocketAddr::new(ip, other_port(local.port()));
            if size + attr_len(other) <= budget {
                b = b.with_attribute(OtherAddress::from(other));
                size += attr_len(other);
            }
        }
        if size + 12 <= budget && data.len() >= 44 {
            b = b.with_attribute(Software::new(SOFTWARE).map_err(|_| StunDrop::Encode)?);
            size += 12;
        }
        // PADDING (RFC 5780 §7.6) is echoed at the request's size, so it never amplifies.
        if let Some(StunAttribute::Padding(p)) = msg.get::<Padding>() {
            if size + 4 + p.as_str().len() <= budget.max(data.len()) {
                b = b.with_attribute(p.clone());
                size += 4 + p.as_str().len().next_multiple_of(4);
            }
        }
        if let Some(k) = key {
            b = b.with_attribute(MessageIntegrity::new(k));
            size += 24;
        }
        if msg.get::<Fingerprint>().is_some() && size + 8 <= budget {
            b = b.with_attribute(Fingerprint::default());
        }
        let mut out = vec![0u8; 256 + data.len()];
        let n = MessageEncoderBuilder::default().build().encode(&mut out, &b.build()).map_err(|_| StunDrop::Encode)?;
        out.truncate(n);
        Ok(StunReply { from, to, bytes: out })
    }
}

/// A 401 Unauthenticated error response (RFC 8489 §9.1.3).
fn unauthorized(req: &stun_rs::StunMessage) -> Result<Vec<u8>, StunDrop> {
    let code = stun_rs::ErrorCode::new(401, "Unauthenticated").map_err(|_| StunDrop::Encode)?;
    let msg = StunMessageBuilder::new(BINDING, MessageClass::ErrorResponse)
        .with_transaction_id(*req.transaction_id())
        .with_attribute(ErrorCode::from(code))
        .build();
    let mut out = vec![0u8; 64];
    let n = MessageEncoderBuilder::default().build().encode(&mut out, &msg).map_err(|_| StunDrop::Encode)?;
    out.truncate(n);
    Ok(out)
}

/// Bytes an address attribute takes (4-byte header + family/port + address).
fn attr_len(a: SocketAddr) -> usize {
    if a.is_ipv4() {
        12
    } else {
        24
    }
}

#[cfg(test)]
mod rtt_tests {
    use super::*;

    #[test]
    fn a_bare_binding_request_is_answered_and_the_answer_recognised_by_its_transaction() {
        let txid = [7u8; 12];
        let req = binding_request(txid).expect("encoded");
        let resp = binding_response(&req, "198.51.100.10:4000".parse().expect("addr")).expect("answered");
        assert!(answers(&resp, txid));
        assert!(!answers(&resp, [8u8; 12]), "another transaction");
        assert!(!answers(&req, txid), "a request is no answer");
        assert!(!answers(b"SIP/2.0 200 OK\r\n\r\n", txid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_rs::{StunAttribute, TransactionId};

    fn request(fingerprint: bool) -> Vec<u8> {
        with_attrs(if fingerprint { vec![Fingerprint::default().into()] } else { vec![] })
    }

    #[test]
    fn binding_request_is_answered_with_the_source_address() {
        let src: SocketAddr = "203.0.113.9:40001".parse().expect("addr");
        let req = request(true);
        assert!(looks_like_stun(&req));
        let resp = binding_response(&req, src).expect("answered");
        let (msg, _) = MessageDecoderBuilder::default().build().decode(&resp).expect("decodes");
        assert_eq!(msg.class(), MessageClass::SuccessResponse);
        let Some(StunAttribute::XorMappedAddress(x)) = msg.get::<XorMappedAddress>() else { panic!("no xor-mapped") };
        assert_eq!(x.socket_address(), &src);
        assert!(msg.get::<Fingerprint>().is_some());
        // The request echoes its transaction id.
        let (req_msg, _) = MessageDecoderBuilder::default().build().decode(&req).expect("decodes");
        assert_eq!(msg.transaction_id(), req_msg.transaction_id());
    }

    #[test]
    fn small_requests_get_small_answers() {
        let req = request(false);
        let resp = binding_response(&req, "198.51.100.1:1".parse().expect("addr")).expect("answered");
        assert!(resp.len() <= req.len() * 2, "{} bytes for a {}-byte request", resp.len(), req.len());
    }

    fn server() -> StunServer {
        StunServer::new(StunServerConfig {
            primary: "203.0.113.1".parse().expect("ip"),
            alternate: Some("203.0.113.2".parse().expect("ip")),
            ports: [3478, 3479],
            rate: 10,
            users: vec![("alice".into(), "alice-pw".into())],
        })
    }

    fn signed(user: &str, password: &str) -> Vec<u8> {
        let key = HMACKey::new_short_term(password).expect("key");
        with_attrs(vec![UserName::new(user).expect("user").into(), MessageIntegrity::new(key).into()])
    }

    #[test]
    fn message_integrity_is_checked_against_the_users_and_signed_back() {
        let mut s = server();
        let (local, src): (SocketAddr, SocketAddr) =
            ("203.0.113.1:3478".parse().expect("addr"), "198.51.100.7:5000".parse().expect("addr"));
        let r = s.handle(Instant::now(), local, src, &signed("alice", "alice-pw")).expect("answered");
        let ctx = DecoderContextBuilder::default()
            .with_key(HMACKey::new_short_term("alice-pw").expect("key"))
            .with_validation()
            .build();
        let (msg, _) =
            MessageDecoderBuilder::default().with_context(ctx).build().decode(&r.bytes).expect("valid integrity");
        assert_eq!(msg.class(), MessageClass::SuccessResponse);
        for bad in [signed("alice", "guess"), signed("mallory", "x")] {
            let r = s.handle(Instant::now(), local, src, &bad).expect("answered with an error");
            let (msg, _) = MessageDecoderBuilder::default().build().decode(&r.bytes).expect("decodes");
            assert_eq!(msg.class(), MessageClass::ErrorResponse);
            let Some(StunAttribute::ErrorCode(e)) = msg.get::<ErrorCode>() else { panic!("error code") };
            assert_eq!(e.error_code().error_code(), 401);
        }
    }

    #[test]
    fn integrity_guesses_over_many_sources_are_braked_without_locking_out_the_user() {
        let mut s = server();
        let t0 = Instant::now();
        let local: SocketAddr = "203.0.113.1:3478".parse().expect("addr");
        let home: SocketAddr = "203.0.113.77:5000".parse().expect("addr");
        assert_eq!(
            decode(&s.handle(t0, local, home, &signed("alice", "alice-pw")).expect("ok").bytes).class(),
            MessageClass::SuccessResponse
        );
        let mut outcomes = Vec::new();
        for i in 0..200u32 {
            let src = SocketAddr::from(([198, 51, 100, (i % 13) as u8], 5000));
            let now = t0 + Duration::from_millis(u64::from(i));
            let pw = if i == 199 { "alice-pw".to_owned() } else { format!("guess{i}") };
            outcomes.push(s.handle(now, local, src, &signed("alice", &pw)).map(|r| decode(&r.bytes).class()));
        }
        assert!(!outcomes.contains(&Ok(MessageClass::SuccessResponse)), "the right guess was never checked");
        assert!(outcomes.iter().filter(|o| **o == Ok(MessageClass::ErrorResponse)).count() <= 6);
        assert!(outcomes.contains(&Err(StunDrop::Guarded)));
        let later = t0 + Duration::from_millis(300);
        let r = s.handle(later, local, home, &signed("alice", "alice-pw")).expect("the real user still gets in");
        assert_eq!(decode(&r.bytes).class(), MessageClass::SuccessResponse);
    }

    #[test]
    fn unknown_users_get_the_same_401_as_wrong_passwords() {
        let mut s = server();
        let (local, src): (SocketAddr, SocketAddr) =
            ("203.0.113.1:3478".parse().expect("addr"), "198.51.100.7:5000".parse().expect("addr"));
        let a = s.handle(Instant::now(), local, src, &signed("nobody", "x")).expect("answered");
        let b = s.handle(Instant::now(), local, src, &signed("alice", "x")).expect("answered");
        assert_eq!(decode(&a.bytes).class(), MessageClass::ErrorResponse);
        assert_eq!(a.bytes.len(), b.bytes.len());
    }

    fn decode(bytes: &[u8]) -> stun_rs::StunMessage {
        MessageDecoderBuilder::default().build().decode(bytes).expect("decodes").0
    }

    #[test]
    fn padding_is_echoed_at_the_same_size() {
        let mut s = server();
        let req = with_attrs(vec![Padding::new("x".repeat(400)).expect("padding").into()]);
        let r = s
            .handle(
                Instant::now(),
                "203.0.113.1:3478".parse().expect("addr"),
                "198.51.100.7:5000".parse().expect("addr"),
                &req,
            )
            .expect("answered");
        let (msg, _) = MessageDecoderBuilder::default().build().decode(&r.bytes).expect("decodes");
        let Some(StunAttribute::Padding(p)) = msg.get::<Padding>() else { panic!("padding") };
        assert_eq!(p.as_str().len(), 400);
        assert!(r.bytes.len() <= req.len() * 3);
    }

    fn with_attrs(attrs: Vec<StunAttribute>) -> Vec<u8> {
        let mut b =
            StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(TransactionId::default());
        for a in attrs {
            b = b.with_attribute(a);
        }
        let mut out = vec![0u8; 1024];
        let n = MessageEncoderBuilder::default().build().encode(&mut out, &b.build()).expect("encode");
        out.truncate(n);
        out
    }

    #[test]
    fn change_request_answers_from_the_other_address_and_port() {
        let mut s = server();
        let t = Instant::now();
        let local: SocketAddr = "203.0.113.1:3478".parse().expect("addr");
        let src: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        let req =
            with_attrs(vec![
                ChangeRequest::new(Some(ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort)).into()
            ]);
        let r = s.handle(t, local, src, &req).expect("answered");
        assert_eq!(r.from, "203.0.113.2:3479".parse().expect("addr"));
        assert_eq!(r.to, src);
        let (msg, _) = MessageDecoderBuilder::default().build().decode(&r.bytes).expect("decodes");
        let Some(StunAttribute::ResponseOrigin(o)) = msg.get::<ResponseOrigin>() else { panic!("origin") };
        assert_eq!(o.socket_address(), &r.from);
        let Some(StunAttribute::OtherAddress(o)) = msg.get::<OtherAddress>() else { panic!("other") };
        assert_eq!(o.socket_address(), &"203.0.113.2:3479".parse::<SocketAddr>().expect("addr"));
        assert!(r.bytes.len() <= (req.len() * 3).max(64));
        // Port only.
        let req = with_attrs(vec![ChangeRequest::new(Some(ChangeRequestFlags::ChangePort.into())).into()]);
        assert_eq!(s.handle(t, local, src, &req).expect("answered").from, "203.0.113.1:3479".parse().expect("addr"));
    }

    #[test]
    fn response_port_redirects_only_to_the_same_address() {
        let mut s = server();
        let src: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        let req = with_attrs(vec![ResponsePort::from(6000).into()]);
        let r = s.handle(Instant::now(), "203.0.113.1:3478".parse().expect("addr"), src, &req).expect("answered");
        assert_eq!(r.to, "198.51.100.7:6000".parse().expect("addr"));
    }

    #[test]
    fn without_an_alternate_address_change_ip_is_refused() {
        let mut s = StunServer::new(StunServerConfig { alternate: None, ..server().cfg.clone() });
        let req = with_attrs(vec![ChangeRequest::new(Some(ChangeRequestFlags::ChangeIp.into())).into()]);
        let r = s.handle(
            Instant::now(),
            "203.0.113.1:3478".parse().expect("addr"),
            "198.51.100.7:1".parse().expect("addr"),
            &req,
        );
        assert_eq!(r, Err(StunDrop::CannotChange));
    }

    #[test]
    fn a_source_over_its_rate_is_dropped_and_recovers() {
        let mut s = server();
        let t = Instant::now();
        let req = request(false);
        let local: SocketAddr = "203.0.113.1:3478".parse().expect("addr");
        let src: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        let answered = (0..100).filter(|_| s.handle(t, local, src, &req).is_ok()).count();
        assert_eq!(answered, 20, "burst of two seconds at 10/s");
        assert!(s.handle(t, local, "198.51.100.8:1".parse().expect("addr"), &req).is_ok(), "others unaffected");
        assert!(s.handle(t + Duration::from_secs(1), local, src, &req).is_ok(), "refilled");
    }

    #[test]
    fn classic_rfc3489_requests_get_mapped_source_and_changed_address() {
        let mut s = server();
        // Type 1, length 8, 16-byte transaction id, CHANGE-REQUEST change-port.
        let mut req = vec![0x00, 0x01, 0x00, 0x08];
        req.extend_from_slice(&[7u8; 16]);
        req.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 2]);
        let src: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        let r = s.handle(Instant::now(), "203.0.113.1:3478".parse().expect("addr"), src, &req).expect("answered");
        assert_eq!(r.from, "203.0.113.1:3479".parse().expect("addr"));
        assert_eq!(&r.bytes[..2], &[0x01, 0x01]);
        assert_eq!(&r.bytes[4..20], &[7u8; 16]);
        // MAPPED-ADDRESS first: port 5000, 198.51.100.7.
        assert_eq!(&r.bytes[20..32], &[0, 1, 0, 8, 0, 1, 0x13, 0x88, 198, 51, 100, 7]);
        // CHANGED-ADDRESS: the alternate address and port.
        assert_eq!(&r.bytes[44..56], &[0, 5, 0, 8, 0, 1, 0x0d, 0x97, 203, 0, 113, 2]);
        assert!(r.bytes.len() <= req.len() * 3);
        // Truncated or inconsistent lengths are dropped.
        assert_eq!(
            s.handle(Instant::now(), "203.0.113.1:3478".parse().expect("addr"), src, &req[..24]),
            Err(StunDrop::Malformed)
        );
    }

    #[test]
    fn sip_and_garbage_are_not_stun() {
        assert!(!looks_like_stun(b"OPTIONS sip:a SIP/2.0\r\n\r\n"));
        assert!(!looks_like_stun(b"\r\n\r\n"));
        let mut fake = request(false);
        fake[0] = 0x01; // a success response, not a request
        assert_eq!(binding_response(&fake, "198.51.100.1:1".parse().expect("addr")), None);
        assert_eq!(binding_response(&[0u8; 20], "198.51.100.1:1".parse().expect("addr")), None);
    }
}
