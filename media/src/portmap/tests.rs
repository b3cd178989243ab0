//! The mapper against modelled gateways: one that speaks PCP, one that speaks only
//! NAT-PMP, one with neither, and strangers, in virtual time.

use super::*;

const GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const LAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const WAN: [u8; 4] = [203, 0, 113, 2];

#[derive(Clone, Copy, PartialEq)]
enum Gateway {
    Pcp,
    PmpOnly,
    Neither,
    RefusesPcp,
}

/// The gateway's answer to one request (external port = internal + 1000, lifetime granted
/// at most 3600).
fn answer(gw: Gateway, req: &[u8]) -> Option<Vec<u8>> {
    match (gw, req.first()) {
        (Gateway::Neither, _) => None,
        (Gateway::Pcp | Gateway::RefusesPcp, Some(2)) => {
            let mut r = req[..60].to_vec();
            r[1] = 0x81;
            r[3] = if gw == Gateway::RefusesPcp { 2 } else { 0 }; // NOT_AUTHORIZED
            let asked = u32::from_be_bytes([req[4], req[5], req[6], req[7]]);
            r[4..8].copy_from_slice(&asked.min(3600).to_be_bytes());
            let port = u16::from_be_bytes([req[40], req[41]]);
            r[24 + 18..24 + 20].copy_from_slice(&(port + 1000).to_be_bytes());
            r[24 + 32..24 + 36].copy_from_slice(&WAN);
            Some(r)
        }
        (Gateway::PmpOnly, Some(2)) => Some(vec![0, 0x81, 0, 1, 0, 0, 0, 9]),
        (Gateway::PmpOnly, Some(0)) if req[1] == 0 => Some([&[0u8, 128, 0, 0, 0, 0, 0, 9][..], &WAN].concat()),
        (Gateway::PmpOnly, Some(0)) if req[1] == 1 => {
            let port = u16::from_be_bytes([req[4], req[5]]);
            let asked = u32::from_be_bytes([req[8], req[9], req[10], req[11]]);
            let mut r = vec![0, 129, 0, 0, 0, 0, 0, 9];
            r.extend_from_slice(&port.to_be_bytes());
            r.extend_from_slice(&(port + 1000).to_be_bytes());
            r.extend_from_slice(&asked.min(3600).to_be_bytes());
            Some(r)
        }
        _ => None,
    }
}

/// Runs a mapper against `gw` until it has a mapping or gave up; returns it, the time it
/// took and the requests it sent.
fn run(gw: Gateway) -> (PortMapper, Duration, usize) {
    let t0 = Instant::now();
    let mut m = PortMapper::new(t0, GW, LAN, 31000, 7200, [7; 12]);
    let (mut now, mut sent) = (t0, 0);
    while m.mapping().is_none() && !m.failed() {
        while let Some(req) = m.poll_transmit() {
            sent += 1;
            if let Some(a) = answer(gw, &req) {
                m.handle_input(now, m.gateway(), &a);
            }
        }
        if m.mapping().is_some() || m.failed() {
            break;
        }
        now = m.poll_timeout().expect("asking waits for something");
        m.handle_timeout(now);
    }
    (m, now - t0, sent)
}

#[test]
fn a_pcp_gateway_maps_the_port_at_once() {
    let (m, took, sent) = run(Gateway::Pcp);
    let map = m.mapping().expect("mapped");
    assert_eq!((map.protocol, map.external), (Protocol::Pcp, "203.0.113.2:32000".parse().expect("addr")));
    assert_eq!(map.lifetime, Duration::from_secs(3600), "what the gateway granted");
    assert_eq!((took, sent), (Duration::ZERO, 1));
}

#[test]
fn a_nat_pmp_gateway_is_asked_in_its_own_protocol_after_it_refuses_pcps_version() {
    let (m, took, _) = run(Gateway::PmpOnly);
    let map = m.mapping().expect("mapped");
    assert_eq!((map.protocol, map.external), (Protocol::Pmp, "203.0.113.2:32000".parse().expect("addr")));
    assert_eq!(map.protocol.token(), "pmp");
    assert_eq!(took, Duration::ZERO, "no waiting for PCP to time out");
}

#[test]
fn a_gateway_with_neither_or_that_refuses_changes_nothing_within_three_seconds() {
    let (m, took, sent) = run(Gateway::Neither);
    assert!(m.failed() && m.mapping().is_none());
    assert!(took <= Duration::from_secs(3), "{took:?}");
    assert_eq!(sent, 3 + 3 * 2, "three PCP requests, three NAT-PMP pairs");
    let (m, _, sent) = run(Gateway::RefusesPcp);
    assert!(m.failed());
    assert_eq!(sent, 1, "a refusal is an answer");
}

#[test]
fn only_the_gateways_answers_to_our_own_request_count() {
    let t0 = Instant::now();
    let mut m = PortMapper::new(t0, GW, LAN, 31000, 7200, [7; 12]);
    let req = m.poll_transmit().expect("a request");
    let good = answer(Gateway::Pcp, &req).expect("an answer");
    // From another address or port: ignored.
    m.handle_input(t0, "198.51.100.66:5351".parse().expect("addr"), &good);
    m.handle_input(t0, "198.51.100.1:5352".parse().expect("addr"), &good);
    // With another nonce, or for another port: ignored.
    let mut other_nonce = good.clone();
    other_nonce[24] ^= 1;
    m.handle_input(t0, m.gateway(), &other_nonce);
    let mut other_port = good.clone();
    other_port[24 + 16..24 + 18].copy_from_slice(&31002u16.to_be_bytes());
    m.handle_input(t0, m.gateway(), &other_port);
    for junk in [&[][..], &[2][..], &[0, 128][..], &good[..59]] {
        m.handle_input(t0, m.gateway(), junk);
    }
    assert_eq!(m.mapping(), None);
    m.handle_input(t0, m.gateway(), &good);
    assert!(m.mapping().is_some(), "the real answer");
}

#[test]
fn a_mapping_is_renewed_at_half_its_lifetime_and_deleted_when_released() {
    let (mut m, _, _) = run(Gateway::Pcp);
    let map = m.mapping().expect("mapped");
    let renew = m.poll_timeout().expect("a renewal");
    assert_eq!(renew, map.granted + Duration::from_secs(1800));
    m.handle_timeout(renew);
    let again = m.poll_transmit().expect("asked again");
    assert_eq!(&again[4..8], &7200u32.to_be_bytes());
    m.handle_input(renew, m.gateway(), &answer(Gateway::Pcp, &again).expect("answer"));
    assert_eq!(m.mapping().map(|x| x.granted), Some(renew));
    m.release();
    let delete = m.poll_transmit().expect("a delete");
    assert_eq!(&delete[4..8], &0u32.to_be_bytes(), "lifetime 0");
    assert_eq!((m.mapping(), m.poll_timeout()), (None, None));
}

#[test]
fn a_mapping_behind_a_second_nat_is_not_public() {
    let (m, _, _) = run(Gateway::Pcp);
    let map = m.mapping().expect("mapped");
    assert!(map.is_public_at(IpAddr::from(WAN)), "the gateway holds the address STUN saw");
    assert!(!map.is_public_at("198.18.0.7".parse().expect("addr")), "a carrier's NAT beyond the gateway");
}
