//! The ng decoder: cookie split, bencode decode, re-encode. Nothing may panic, and what
//! decodes must re-encode to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinhole_media::ng::{split_cookie, Bencode};

fuzz_target!(|data: &[u8]| {
    let Ok((_, payload)) = split_cookie(data) else { return };
    if let Ok(v) = Bencode::decode(payload) {
        let mut out = Vec::new();
        v.encode(&mut out);
        assert_eq!(Bencode::decode(&out).as_ref(), Ok(&v));
    }
});
