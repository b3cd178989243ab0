//! STUN Binding (RFC 8489) for keepalives multiplexed on the SIP UDP port (RFC 5626 §8,
//! demultiplexed as RFC 7983 §7 says): a phone or agent asks what address it is seen from
//! and refreshes its NAT mapping at the same time. Messages are decoded and encoded with
//! stun-rs.
//!
//! Safe on an open port: only well-formed Binding requests are answered, anything else is
//! dropped (and counted by the caller), and a small request never gets a much larger answer
//! (SOFTWARE only for requests at least as large as the answer, FINGERPRINT only when the
//! request carried one).

use std::net::SocketAddr;

use stun_rs::attributes::stun::{Fingerprint, Software, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder};

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const SOFTWARE: &str = "pinhole";

/// Does this datagram look like STUN rather than SIP (RFC 7983: first byte 0–3, and the
/// RFC 5389 magic cookie)?
pub fn looks_like_stun(b: &[u8]) -> bool {
    b.len() >= 20 && b[0] < 4 && b[4..8] == MAGIC_COOKIE
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

#[cfg(test)]
mod tests {
    use super::*;
    use stun_rs::{StunAttribute, TransactionId};

    fn request(fingerprint: bool) -> Vec<u8> {
        let mut b =
            StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(TransactionId::default());
        if fingerprint {
            b = b.with_attribute(Fingerprint::default());
        }
        let mut out = vec![0u8; 64];
        let n = MessageEncoderBuilder::default().build().encode(&mut out, &b.build()).expect("encode");
        out.truncate(n);
        out
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
