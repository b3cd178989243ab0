//! The authentication path: challenge, credentials parsing, nonce check, nc window and the
//! guessing brake. Arbitrary header values (some carrying a nonce the authenticator really
//! issued, so the nonce and nc checks are reached) must never panic, and nothing but the
//! right password may authenticate.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pinhole_sip::auth::{Authenticator, Credentials, Verdict};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let t0 = Instant::now();
    let mut a = Authenticator::new("pinhole", [("alice".to_owned(), "secret".to_owned())], [5; 32], 42, t0, 1_700_000_000);
    let nonce = a.nonce(t0);
    let challenges = a.challenges(t0, mode & 2 != 0);
    assert!(!challenges.is_empty());
    let text = String::from_utf8_lossy(rest).replace("NONCE", &nonce);
    let values: Vec<&str> = text.split('\n').collect();
    let _ = values.iter().map(|v| Credentials::parse(v)).count();
    let now = t0 + Duration::from_secs(u64::from(mode >> 4) * 40);
    let src = [198, 51, 100, mode & 0x0f].into();
    for _ in 0..2 {
        if let Verdict::Authenticated(user) = a.verify(now, src, "REGISTER", "sip:pinhole", &values) {
            assert_eq!(user, "alice");
            assert!(text.contains("alice"));
        }
    }
    a.expire(now + Duration::from_secs(600));
});
