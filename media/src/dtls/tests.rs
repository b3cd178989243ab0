use std::time::Duration;

use super::*;

/// Runs a handshake between two legs, passing every record across, until both are done
/// or `rounds` pass; returns the records' sizes each way (client → server, back).
fn run(client: &mut DtlsLeg, server: &mut DtlsLeg, mut now: Instant, rounds: usize) -> (Vec<usize>, Vec<usize>) {
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        while let Some(p) = client.poll_transmit() {
            up.push(p.len());
            server.handle(now, &p);
        }
        while let Some(p) = server.poll_transmit() {
            down.push(p.len());
            client.handle(now, &p);
        }
        if client.state() != State::Handshaking && server.state() != State::Handshaking {
            break;
        }
        now += Duration::from_millis(10);
    }
    (up, down)
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 160, 0x11, 0x22, 0x33, 0x44];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

#[test]
fn a_handshake_with_the_announced_certificate_keys_both_directions_alike() {
    let (ours, theirs) = (Identity::generate().expect("id"), Identity::generate().expect("id"));
    let now = Instant::now();
    // The browser is the client (it answered actpass with active); we are passive.
    let mut server = DtlsLeg::new(&ours, theirs.fingerprint, false, now);
    let mut client = DtlsLeg::new(&theirs, ours.fingerprint, true, now);
    let (up, down) = run(&mut client, &mut server, now, 20);
    assert_eq!((client.state(), server.state()), (State::Done, State::Done));
    // The cookie exchange first: the answer to the first ClientHello is no larger.
    assert!(down[0] <= up[0], "HelloVerifyRequest {} bytes for a ClientHello of {}", down[0], up[0]);
    let (mut c, mut s) = (client.take_keys().expect("keys"), server.take_keys().expect("keys"));
    assert!(server.take_keys().is_none(), "keys come out once");
    let mut p = rtp(1);
    c.tx.protect(&mut p).expect("protect");
    s.rx.unprotect(&mut p).expect("the server reads what the client sends");
    assert_eq!(p, rtp(1));
    s.tx.protect(&mut p).expect("protect");
    c.rx.unprotect(&mut p).expect("and the other way");
    assert_eq!(p, rtp(1));
}

#[test]
fn a_certificate_other_than_the_one_in_the_sdp_gets_no_keys() {
    let (ours, theirs, mallory) =
        (Identity::generate().expect("id"), Identity::generate().expect("id"), Identity::generate().expect("id"));
    let now = Instant::now();
    // The SDP announced `theirs`, but mallory does the handshake.
    let mut server = DtlsLeg::new(&ours, theirs.fingerprint, false, now);
    let mut client = DtlsLeg::new(&mallory, ours.fingerprint, true, now);
    run(&mut client, &mut server, now, 20);
    assert!(matches!(server.state(), State::Failed(why) if why.contains("fingerprint")), "{:?}", server.state());
    assert!(server.take_keys().is_none());
}

#[test]
fn a_client_hello_from_a_spoofed_source_gets_only_a_cookie_back() {
    let (ours, theirs) = (Identity::generate().expect("id"), Identity::generate().expect("id"));
    let now = Instant::now();
    let mut server = DtlsLeg::new(&ours, theirs.fingerprint, false, now);
    let mut client = DtlsLeg::new(&theirs, ours.fingerprint, true, now);
    let hello = client.poll_transmit().expect("ClientHello");
    // The stranger never sees the answer, so it can only repeat its first hello.
    let mut sent = 0;
    for _ in 0..50 {
        server.handle(now, &hello);
        while let Some(p) = server.poll_transmit() {
            assert!(p.len() <= hello.len(), "a reply of {} bytes to {}", p.len(), hello.len());
            sent += 1;
        }
    }
    assert!(sent >= 1, "the cookie was sent");
    assert_eq!(server.state(), State::Handshaking);
}

#[test]
fn fingerprints_are_read_in_sha_256_only() {
    let id = Identity::generate().expect("id");
    let attr = id.fingerprint_attr();
    assert_eq!(parse_fingerprint(&attr), Some(id.fingerprint));
    assert_eq!(parse_fingerprint(&attr.to_lowercase()), Some(id.fingerprint));
    assert_eq!(parse_fingerprint(&attr.replace("sha-256", "sha-1")), None);
    assert_eq!(parse_fingerprint("sha-256 AB:CD"), None);
    assert_eq!(parse_fingerprint("sha-256"), None);
}
