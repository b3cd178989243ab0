//! SRTP against RFC 3711's test vectors (Appendix B.2 and B.3) and libsrtp's reference
//! packets (SRTP and SRTCP, AES-CM and AES-GCM, test/srtp_driver.c), then the receiver's
//! rules: tag first,
//! replays and old packets refused, rollover guessed across a wrap, and a bounded number
//! of sources.

use super::*;

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn arr<const N: usize>(s: &str) -> [u8; N] {
    unhex(s).try_into().expect("length")
}

const MASTER_KEY: &str = "E1F97A0D3E018BE0D64FA32C06DE4139";
const MASTER_SALT: &str = "0EC675AD498AFEEBB6960B3AABE6";

fn context() -> Srtp {
    Srtp::new(&arr(MASTER_KEY), &arr(MASTER_SALT))
}

/// An RTP packet: PCMU, SSRC `ssrc`, sequence `seq`, 20 bytes of `fill`.
fn rtp(ssrc: u32, seq: u16, fill: u8) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&u32::from(seq).wrapping_mul(160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[fill; 20]);
    p
}

#[test]
fn aes_cm_keystream_matches_rfc_3711_b2() {
    let mut out = [0u8; 48];
    keystream(&arr::<16>("2B7E151628AED2A6ABF7158809CF4F3C"), &arr("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000"), &mut out);
    assert_eq!(
        out.to_vec(),
        unhex("E03EAD0935C95E80E166B16DD92B4EB4 D23513162B02D0F72A43A2FE4A5F97AB 41E95B3BB0A2E8DD477901E4FCA894C0")
    );
}

#[test]
fn aes_256_session_keys_match_rfc_6188_7_2() {
    let keys = SessionKeys::derive_from(
        &arr::<32>("f0f04914b513f2763a1b1fa130f10e2998f6f6e43e4309d1e622a0e332b9f1b6"),
        &arr("3b04803de51ee7c96423ab5b78d2"),
        0,
    );
    assert_eq!(keys.cipher.to_vec(), unhex("5ba1064e30ec51613cad926c5a28ef731ec7fb397f70a960653caf06554cd8c4"));
    assert_eq!(keys.salt.to_vec(), unhex("fa31791685ca444a9e07c6c64e93"));
}

#[test]
fn session_keys_match_rfc_3711_b3() {
    let keys = SessionKeys::derive_from(&arr::<16>(MASTER_KEY), &arr(MASTER_SALT), 0);
    assert_eq!(keys.cipher[..16].to_vec(), unhex("C61E7A93744F39EE10734AFE3FF7A087"));
    assert_eq!(keys.salt.to_vec(), unhex("30CBBC08863D8C85D49DB34A9AE1"));
    assert_eq!(keys.auth.to_vec(), unhex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
}

#[test]
fn libsrtps_reference_packet_protects_and_unprotects_exactly() {
    let plain = unhex("800f1234decafbad cafebabe abababababababababababababababab");
    let sealed = unhex("800f1234decafbad cafebabe 4e55dc4ce79978d88ca4d215949d2402 b78d6acc99ea179b8dbb");
    let mut p = plain.clone();
    context().protect(&mut p).expect("protect");
    assert_eq!(p, sealed);
    let mut rx = context();
    rx.unprotect(&mut p).expect("unprotect");
    assert_eq!(p, plain);
}

#[test]
fn a_packet_with_a_bad_tag_or_a_replay_or_too_old_is_refused_and_changes_nothing() {
    let (mut tx, mut rx) = (context(), context());
    let mut sent = Vec::new();
    for seq in 100..200u16 {
        let mut p = rtp(7, seq, seq as u8);
        tx.protect(&mut p).expect("protect");
        sent.push(p);
    }
    // Every bit of the tag and the header counts.
    let mut forged = sent[0].clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(rx.unprotect(&mut forged), Err(SrtpError::BadTag));
    let mut forged = sent[0].clone();
    forged[3] ^= 1;
    assert_eq!(rx.unprotect(&mut forged), Err(SrtpError::BadTag));
    assert!(rx.sources.is_empty(), "a forged packet teaches the context no source");
    for short in [&[][..], &sent[0][..21], &[0x80; 12][..]] {
        assert_eq!(rx.unprotect(&mut short.to_vec()), Err(SrtpError::Malformed));
    }
    // In order, out of order within the window: each once.
    let mut p = sent[10].clone();
    rx.unprotect(&mut p).expect("first");
    assert_eq!(p, rtp(7, 110, 110));
    for i in [12, 11] {
        rx.unprotect(&mut sent[i].clone()).expect("new within the window");
    }
    let mut again = sent[11].clone();
    assert_eq!(rx.unprotect(&mut again), Err(SrtpError::Replayed));
    assert_eq!(again, sent[11], "a refused packet is left as it came");
    for i in [90, 40] {
        rx.unprotect(&mut sent[i].clone()).expect("new within the window");
    }
    assert_eq!(rx.unprotect(&mut sent[90].clone()), Err(SrtpError::Replayed));
    assert_eq!(rx.unprotect(&mut sent[40].clone()), Err(SrtpError::Replayed));
    // 64 or more behind the newest (190): too old, even never seen.
    assert_eq!(rx.unprotect(&mut sent[26].clone()), Err(SrtpError::TooOld));
    rx.unprotect(&mut sent[27].clone()).expect("63 behind is still in the window");
}

#[test]
fn the_rollover_counter_follows_a_wrap_and_a_late_packet_from_before_it() {
    let (mut tx, mut rx) = (context(), context());
    let seqs = [65_530u16, 65_534, 65_535, 0, 1, 65_533, 2, 30_000, 50_000];
    for seq in seqs {
        let mut p = rtp(9, seq, 1);
        tx.protect(&mut p).expect("protect");
        let mut q = p.clone();
        rx.unprotect(&mut q).unwrap_or_else(|e| panic!("seq {seq}: {e}"));
        assert_eq!(q, rtp(9, seq, 1));
    }
    assert_eq!(rx.sources[&9].newest, (1 << 16) | 50_000, "one wrap, then on");
    // A third party cannot tell the receiver the counter moved on: a packet guessed in
    // the wrong roll fails its tag.
    let mut p = rtp(9, 20_000, 1);
    let mut other_tx = context();
    other_tx.protect(&mut p).expect("protect in roll 0");
    assert_eq!(rx.unprotect(&mut p), Err(SrtpError::BadTag));
}

#[test]
fn a_context_keeps_at_most_its_cap_of_sources() {
    let (mut tx, mut rx) = (context(), context());
    for ssrc in 0..MAX_SSRCS as u32 {
        let mut p = rtp(ssrc, 1, 0);
        tx.protect(&mut p).expect("protect");
        rx.unprotect(&mut p).expect("unprotect");
    }
    let mut p = rtp(MAX_SSRCS as u32, 1, 0);
    assert_eq!(tx.protect(&mut p), Err(SrtpError::TooManySources));
    assert_eq!(rx.unprotect(&mut [p, vec![0; TAG_LEN]].concat()), Err(SrtpError::TooManySources));
    assert_eq!(rx.sources.len(), MAX_SSRCS);
}

#[test]
fn a_header_with_csrcs_and_an_extension_is_authenticated_but_not_encrypted() {
    let mut p = vec![0x91, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0, 3];
    p.extend_from_slice(&[1, 2, 3, 4]); // one CSRC
    p.extend_from_slice(&[0xbe, 0xde, 0x00, 0x01, 9, 9, 9, 9]); // a one-word extension
    p.extend_from_slice(&[0x55; 8]);
    let plain = p.clone();
    context().protect(&mut p).expect("protect");
    assert_eq!(p[..24], plain[..24], "header left as it is");
    assert_ne!(p[24..32], plain[24..32], "payload encrypted");
    let mut rx = context();
    rx.unprotect(&mut p).expect("unprotect");
    assert_eq!(p, plain);
}

#[test]
fn libsrtps_reference_rtcp_packet_protects_and_unprotects_exactly() {
    let plain = unhex("81c8000bcafebabe abababababababababababababababab");
    let sealed = unhex("81c8000bcafebabe 7128035be487b9bdbef89041f977a5a8 80000001 993e08cd54d6c1230798");
    let mut tx = Srtcp::new(&arr(MASTER_KEY), &arr(MASTER_SALT));
    let mut p = plain.clone();
    tx.protect(&mut p).expect("protect");
    assert_eq!(p, sealed);
    let mut rx = Srtcp::new(&arr(MASTER_KEY), &arr(MASTER_SALT));
    rx.unprotect(&mut p).expect("unprotect");
    assert_eq!(p, plain);
    // The same packet again is a replay; a flipped bit anywhere fails the tag.
    let mut again = sealed.clone();
    assert_eq!(rx.unprotect(&mut again), Err(SrtpError::Replayed));
    assert_eq!(again, sealed, "a refused packet is left as it came");
    for i in [0, 9, 24, 30] {
        let mut forged = sealed.clone();
        forged[i] ^= 1;
        assert_eq!(Srtcp::new(&arr(MASTER_KEY), &arr(MASTER_SALT)).unprotect(&mut forged), Err(SrtpError::BadTag));
    }
    assert_eq!(rx.unprotect(&mut vec![0x81; 21]), Err(SrtpError::Malformed), "shorter than header, index and tag");
}

#[test]
fn rtcp_indexes_far_behind_are_refused_and_late_ones_within_the_window_taken_once() {
    let (key, salt) = (arr(MASTER_KEY), arr(MASTER_SALT));
    let mut tx = Srtcp::new(&key, &salt);
    let packets: Vec<Vec<u8>> = (0..100)
        .map(|_| {
            let mut p = unhex("81c8000bcafebabe abababababababababababababababab");
            tx.protect(&mut p).expect("protect");
            p
        })
        .collect();
    let mut rx = Srtcp::new(&key, &salt);
    let mut newest = packets[99].clone();
    rx.unprotect(&mut newest).expect("the newest");
    let mut late = packets[50].clone();
    rx.unprotect(&mut late).expect("49 behind: within the window");
    let mut again = packets[50].clone();
    assert_eq!(rx.unprotect(&mut again), Err(SrtpError::Replayed));
    let mut old = packets[10].clone();
    assert_eq!(rx.unprotect(&mut old), Err(SrtpError::TooOld));
}

const GCM_KEY: &str = "000102030405060708090a0b0c0d0e0f";
const GCM_SALT: &str = "a0a1a2a3a4a5a6a7a8a9aaab";

#[test]
fn libsrtps_aes_gcm_reference_packets_protect_and_unprotect_exactly() {
    let (key, salt) = (arr::<16>(GCM_KEY), arr(GCM_SALT));
    let plain = unhex("800f1234decafbad cafebabe abababababababababababababababab");
    let sealed = unhex("800f1234decafbad cafebabe c5002ede04cfdd2eb91159e0880aa06e d2976826f796b201df3131a127e8a392");
    let mut p = plain.clone();
    Srtp::gcm(&key, &salt).protect(&mut p).expect("protect");
    assert_eq!(p, sealed);
    let mut rx = Srtp::gcm(&key, &salt);
    rx.unprotect(&mut p).expect("unprotect");
    assert_eq!(p, plain);
    let mut forged = sealed.clone();
    forged[5] ^= 1; // the header is authenticated too
    assert_eq!(Srtp::gcm(&key, &salt).unprotect(&mut forged), Err(SrtpError::BadTag));
    let mut forged = sealed.clone();
    forged[20] ^= 1;
    let before = forged.clone();
    assert_eq!(Srtp::gcm(&key, &salt).unprotect(&mut forged), Err(SrtpError::BadTag));
    assert_eq!(forged, before, "a refused packet is left as it came");
    let mut again = sealed.clone();
    assert_eq!(rx.unprotect(&mut again), Err(SrtpError::Replayed));

    let rtcp = unhex("81c8000bcafebabe abababababababababababababababab");
    let srtcp = unhex("81c8000bcafebabe c98b8b5df0392a55852b6c21ac8e7025 c52c6fbea2b3b446ea31123ba88ce61e 80000001");
    let mut p = rtcp.clone();
    Srtcp::gcm(&key, &salt).protect(&mut p).expect("protect");
    assert_eq!(p, srtcp);
    let mut rx = Srtcp::gcm(&key, &salt);
    rx.unprotect(&mut p).expect("unprotect");
    assert_eq!(p, rtcp);
    let mut forged = srtcp.clone();
    forged[41] ^= 0x01; // the index is authenticated
    assert_eq!(Srtcp::gcm(&key, &salt).unprotect(&mut forged), Err(SrtpError::BadTag));
}
