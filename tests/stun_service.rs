//! The RFC 5780 STUN service on loopback: 127.0.0.1 is the primary address and 127.0.0.2
//! the alternate (both are local), each with two ports.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use stun_rs::attributes::discovery::{ChangeRequest, ChangeRequestFlags, OtherAddress, ResponseOrigin, ResponsePort};
use stun_rs::attributes::stun::XorMappedAddress;
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute, StunMessageBuilder, TransactionId,
};

fn request(attrs: Vec<StunAttribute>) -> Vec<u8> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(TransactionId::default());
    for a in attrs {
        b = b.with_attribute(a);
    }
    let mut out = vec![0u8; 128];
    let n = MessageEncoderBuilder::default().build().encode(&mut out, &b.build()).expect("encode");
    out.truncate(n);
    out
}

fn exchange(sock: &UdpSocket, to: SocketAddr, req: &[u8]) -> Option<(SocketAddr, stun_rs::StunMessage)> {
    sock.send_to(req, to).expect("send");
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    let (msg, _) = MessageDecoderBuilder::default().build().decode(&buf[..n]).expect("decodes");
    Some((from, msg))
}

#[test]
fn binding_requests_follow_change_request_and_report_the_mapping() {
    let dir = TempDir::new("stunsvc");
    let (p1, p2) = (free_port(), free_port());
    let _ph = Pinhole::with_config(
        &dir,
        &format!(
            "[sip]\nlisten = []\ndomain = \"stun.test\"\n[registrar]\nstore = \"\"\n[media]\nmode = \"off\"\n\
             [stun]\nlisten = [\"127.0.0.1:{p1}\", \"127.0.0.1:{p2}\"]\nalternate = \"127.0.0.2\"\n"
        ),
    );
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
    let primary: SocketAddr = format!("127.0.0.1:{p1}").parse().expect("addr");

    let (from, msg) = exchange(&sock, primary, &request(vec![])).expect("plain binding answered");
    assert_eq!(from, primary);
    let Some(StunAttribute::XorMappedAddress(x)) = msg.get::<XorMappedAddress>() else { panic!("xor-mapped") };
    assert_eq!(x.socket_address(), &sock.local_addr().expect("addr"));
    let Some(StunAttribute::OtherAddress(o)) = msg.get::<OtherAddress>() else { panic!("other-address") };
    assert_eq!(o.socket_address(), &format!("127.0.0.2:{p2}").parse::<SocketAddr>().expect("addr"));

    for (flags, want) in [
        (ChangeRequestFlags::ChangePort.into(), format!("127.0.0.1:{p2}")),
        (ChangeRequestFlags::ChangeIp.into(), format!("127.0.0.2:{p1}")),
        (ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort, format!("127.0.0.2:{p2}")),
    ] {
        let (from, msg) =
            exchange(&sock, primary, &request(vec![ChangeRequest::new(Some(flags)).into()])).expect("answered");
        assert_eq!(from.to_string(), want);
        let Some(StunAttribute::ResponseOrigin(o)) = msg.get::<ResponseOrigin>() else { panic!("response-origin") };
        assert_eq!(o.socket_address(), &from);
    }

    // RESPONSE-PORT sends the answer to another port of the same address.
    let other = UdpSocket::bind("127.0.0.1:0").expect("bind");
    other.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
    sock.send_to(&request(vec![ResponsePort::from(other.local_addr().expect("addr").port()).into()]), primary)
        .expect("send");
    let mut buf = [0u8; 512];
    assert!(other.recv_from(&mut buf).is_ok(), "answer went to the RESPONSE-PORT");

    // Garbage gets nothing.
    sock.send_to(b"hello, stun?", primary).expect("send");
    assert!(sock.recv_from(&mut buf).is_err(), "garbage is dropped");
}
