//! SRTP and SRTCP from the network, in both profiles (AES-CM with HMAC-SHA1, AES-GCM), and
//! the SDES `a=crypto` lines that key them: one that is taken reads back from what we
//! would write, and keys both contexts.
//! Arbitrary datagrams offered to a receiver must never panic and are refused unchanged (a
//! tag cannot be forged by chance); arbitrary packets protected by a sender and offered in
//! order, every 64 bytes of the input as one packet, come back exactly once, whatever their
//! headers say, or are refused only as old, repeated or past the cap on sources.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinhole_media::srtp::{Srtcp, Srtp, SrtpError};

const KEY: [u8; 16] = [7; 16];

/// A sender and a receiver of one kind; `protect`/`unprotect` as the kind has them.
trait Context {
    fn protect(&mut self, p: &mut Vec<u8>) -> Result<(), SrtpError>;
    fn unprotect(&mut self, p: &mut Vec<u8>) -> Result<(), SrtpError>;
}

impl Context for Srtp {
    fn protect(&mut self, p: &mut Vec<u8>) -> Result<(), SrtpError> {
        Srtp::protect(self, p)
    }
    fn unprotect(&mut self, p: &mut Vec<u8>) -> Result<(), SrtpError> {
        Srtp::unprotect(self, p)
    }
}

impl Context for Srtcp {
    fn protect(&mut self, p: &mut Vec<u8>) -> Result<(), SrtpError> {
        Srtcp::protect(self, p)
    }
    fn unprotect(&mut self, p: &mut Vec<u8>) -> Result<(), SrtpError> {
        Srtcp::unprotect(self, p)
    }
}

fn exercise(data: &[u8], mut tx: impl Context, mut rx: impl Context) {
    let mut stranger = data.to_vec();
    assert!(rx.unprotect(&mut stranger).is_err());
    assert_eq!(stranger, data, "a refused packet is left as it came");
    for chunk in data.chunks(64) {
        let mut p = chunk.to_vec();
        if tx.protect(&mut p).is_ok() {
            let mut q = p.clone();
            match rx.unprotect(&mut q) {
                Ok(()) => {
                    assert_eq!(q, chunk, "unprotect gives back what was protected");
                    assert!(rx.unprotect(&mut p).is_err(), "and only once");
                }
                // Its sequence numbers come from the input: old or repeated ones may be
                // refused, as may a source past the cap, but never its tag or its form.
                Err(e) => assert!(!matches!(e, SrtpError::BadTag | SrtpError::Malformed), "ours refused: {e}"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(c) = pinhole_media::sdes::Crypto::parse(&String::from_utf8_lossy(data)) {
        assert_eq!(pinhole_media::sdes::Crypto::parse(&c.value()), Some(c.clone()));
        assert!(c.contexts().is_some());
    }
    let (salt, gcm_salt) = ([9u8; 14], [9u8; 12]);
    exercise(data, Srtp::new(&KEY, &salt), Srtp::new(&KEY, &salt));
    exercise(data, Srtp::gcm(&KEY, &gcm_salt), Srtp::gcm(&KEY, &gcm_salt));
    exercise(data, Srtcp::new(&KEY, &salt), Srtcp::new(&KEY, &salt));
    exercise(data, Srtcp::gcm(&KEY, &gcm_salt), Srtcp::gcm(&KEY, &gcm_salt));
});
