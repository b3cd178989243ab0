//! SRTP and SRTCP from the network. Arbitrary datagrams offered to a receiver must never panic and
//! are refused unchanged (a tag cannot be forged by chance); arbitrary RTP protected by a
//! sender and offered in order, with every prefix of the input as one packet, comes back
//! exactly once, whatever its header says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinhole_media::srtp::{Srtcp, Srtp};

fuzz_target!(|data: &[u8]| {
    let key = [7u8; 16];
    let salt = [9u8; 14];
    let mut rx = Srtp::new(&key, &salt);
    let mut stranger = data.to_vec();
    assert!(rx.unprotect(&mut stranger).is_err());
    assert_eq!(stranger, data, "a refused packet is left as it came");

    let mut tx = Srtp::new(&key, &salt);
    for chunk in data.chunks(64) {
        let mut p = chunk.to_vec();
        if tx.protect(&mut p).is_ok() {
            let mut q = p.clone();
            if rx.unprotect(&mut q).is_ok() {
                assert_eq!(q, chunk, "unprotect gives back what was protected");
                assert!(rx.unprotect(&mut p).is_err(), "and only once");
            }
        }
    }
    // SRTCP the same way: strangers refused as they came, ours back exactly once.
    let mut rx = Srtcp::new(&key, &salt);
    let mut stranger = data.to_vec();
    assert!(rx.unprotect(&mut stranger).is_err());
    assert_eq!(stranger, data);
    let mut tx = Srtcp::new(&key, &salt);
    for chunk in data.chunks(64) {
        let mut p = chunk.to_vec();
        if tx.protect(&mut p).is_ok() {
            let mut q = p.clone();
            match rx.unprotect(&mut q) {
                Ok(()) => {
                    assert_eq!(q, chunk, "unprotect gives back what was protected");
                    assert!(rx.unprotect(&mut p).is_err(), "and only once");
                }
                Err(e) => assert_eq!(e, pinhole_media::srtp::SrtpError::TooManySources, "only the source cap refuses ours"),
            }
        }
    }
});
