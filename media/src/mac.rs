//! The one MAC helper: HMAC-SHA256 (RFC 2104) over length-prefixed parts, and a constant
//! time comparison. Nonces and Record-Route tokens are both derived here, each with its own
//! label, so a value minted for one purpose never verifies as the other.

use sha2::{Digest, Sha256};

const BLOCK: usize = 64;

/// HMAC-SHA256 of `label` and `parts` under `key`. Each part is length-prefixed, so
/// `("ab", "c")` and `("a", "bc")` give different MACs.
pub fn hmac(key: &[u8; 32], label: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; BLOCK];
    k[..32].copy_from_slice(key);
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
        inner.update((p.len() as u64).to_be_bytes());
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Lower-case hex of `bytes` (MACs, keys and cookies as they travel in text).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equality whose time depends only on the lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_shape_and_separates_parts_and_labels() {
        let k = [7u8; 32];
        assert_ne!(hmac(&k, "x", &[b"ab", b"c"]), hmac(&k, "x", &[b"a", b"bc"]));
        assert_ne!(hmac(&k, "nonce", &[b"a"]), hmac(&k, "token", &[b"a"]));
        assert_eq!(hmac(&k, "x", &[b"a"]), hmac(&k, "x", &[b"a"]));
        assert_ne!(hmac(&[8u8; 32], "x", &[b"a"]), hmac(&k, "x", &[b"a"]));
    }

    #[test]
    fn ct_eq_compares_whole_values() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
