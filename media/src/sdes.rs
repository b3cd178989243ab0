//! SDES (RFC 4568): the `a=crypto` attribute through which SIP phones (baresip, Linphone)
//! offer SRTP keys in their SDP, and the one pinhole answers with. Sans-IO: text in, keys
//! out, and SRTP/SRTCP contexts made from them.
//!
//! Read strictly, since the line comes from whoever sent the SDP: a tag of at most nine
//! digits, one of the two suites pinhole speaks, exactly one `inline:` key of exactly the
//! suite's key and salt length, an optional lifetime; an MKI, more than one key, or any
//! session parameter (`UNENCRYPTED_SRTP`, `KDR=`…) makes the line one pinhole does not
//! take (the peer usually offers another).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::srtp::{Srtcp, Srtp, GCM_SALT_LEN, KEY_LEN, SALT_LEN};

/// The SRTP suites an `a=crypto` line may name that pinhole speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    AesCm128HmacSha1_80,
    AeadAes128Gcm,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::AeadAes128Gcm => "AEAD_AES_128_GCM",
        }
    }

    fn from_name(name: &str) -> Option<Suite> {
        [Suite::AesCm128HmacSha1_80, Suite::AeadAes128Gcm].into_iter().find(|s| s.name() == name)
    }

    /// The master key and salt's length together.
    pub fn key_salt_len(self) -> usize {
        match self {
            Suite::AesCm128HmacSha1_80 => KEY_LEN + SALT_LEN,
            Suite::AeadAes128Gcm => KEY_LEN + GCM_SALT_LEN,
        }
    }
}

/// One `a=crypto` line's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crypto {
    pub tag: u32,
    pub suite: Suite,
    /// The master key then the master salt.
    pub key_salt: Vec<u8>,
}

impl Crypto {
    /// Reads an attribute value (what follows `a=crypto:`); `None` for anything pinhole
    /// does not take.
    pub fn parse(value: &str) -> Option<Crypto> {
        let mut fields = value.trim().split_ascii_whitespace();
        let tag = fields.next()?;
        if tag.is_empty() || tag.len() > 9 || !tag.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let suite = Suite::from_name(fields.next()?)?;
        let key_params = fields.next()?;
        if fields.next().is_some() || key_params.contains(';') {
            return None; // session parameters, or a second key
        }
        let mut parts = key_params.strip_prefix("inline:")?.split('|');
        let key_salt = STANDARD.decode(parts.next()?).ok()?;
        if key_salt.len() != suite.key_salt_len() {
            return None;
        }
        match (parts.next(), parts.next()) {
            (None, _) => {}
            (Some(lifetime), None) if lifetime_ok(lifetime) => {}
            _ => return None, // an MKI, or garbage
        }
        Some(Crypto { tag: tag.parse().ok()?, suite, key_salt })
    }

    /// Fresh keys for `suite` under `tag` from `random` (a CSPRNG's bytes).
    pub fn generate(tag: u32, suite: Suite, mut random: impl FnMut() -> u8) -> Crypto {
        Crypto { tag, suite, key_salt: (0..suite.key_salt_len()).map(|_| random()).collect() }
    }

    /// The attribute value to put after `a=crypto:`.
    pub fn value(&self) -> String {
        format!("{} {} inline:{}", self.tag, self.suite.name(), STANDARD.encode(&self.key_salt))
    }

    /// SRTP and SRTCP contexts keyed by this line (one direction: the sender's keys).
    pub fn contexts(&self) -> Option<(Srtp, Srtcp)> {
        let key: &[u8; KEY_LEN] = self.key_salt.get(..KEY_LEN)?.try_into().ok()?;
        let salt = &self.key_salt[KEY_LEN..];
        Some(match self.suite {
            Suite::AesCm128HmacSha1_80 => {
                let salt: &[u8; SALT_LEN] = salt.try_into().ok()?;
                (Srtp::new(key, salt), Srtcp::new(key, salt))
            }
            Suite::AeadAes128Gcm => {
                let salt: &[u8; GCM_SALT_LEN] = salt.try_into().ok()?;
                (Srtp::gcm(key, salt), Srtcp::gcm(key, salt))
            }
        })
    }
}

/// A key lifetime: `2^N` (N ≤ 48) or a decimal number of packets.
fn lifetime_ok(s: &str) -> bool {
    match s.strip_prefix("2^") {
        Some(n) => n.parse::<u8>().is_ok_and(|n| n <= 48),
        None => !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_digit()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phones_offer_is_read_and_keys_a_context_that_talks_to_one_made_from_our_own_line() {
        // baresip's and Linphone's shape: tag, suite, a 30-byte inline key, perhaps a lifetime.
        let offer = "1 AES_CM_128_HMAC_SHA1_80 inline:d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSoj|2^31";
        let c = Crypto::parse(offer).expect("read");
        assert_eq!((c.tag, c.suite, c.key_salt.len()), (1, Suite::AesCm128HmacSha1_80, 30));
        let mut n = 0u8;
        let ours = Crypto::generate(1, Suite::AeadAes128Gcm, || {
            n = n.wrapping_add(13);
            n
        });
        let again = Crypto::parse(&ours.value()).expect("our own line reads back");
        assert_eq!(again, ours);
        // What one side protects with the line, the other unprotects with the same line.
        let (mut tx, _) = ours.contexts().expect("contexts");
        let (mut rx, _) = again.contexts().expect("contexts");
        let mut p = vec![0x80, 0, 0, 1, 0, 0, 0, 160, 0xca, 0xfe, 0xba, 0xbe, 1, 2, 3, 4];
        tx.protect(&mut p).expect("protect");
        rx.unprotect(&mut p).expect("unprotect");
        assert_eq!(&p[12..], &[1, 2, 3, 4]);
    }

    #[test]
    fn lines_pinhole_does_not_take_are_refused() {
        let key30 = STANDARD.encode([7u8; 30]);
        let key28 = STANDARD.encode([7u8; 28]);
        for bad in [
            // RFC 4568 §4's own example carries an MKI.
            "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32".to_owned(),
            format!("1 AES_CM_128_HMAC_SHA1_32 inline:{key30}"),
            format!("1 F8_128_HMAC_SHA1_80 inline:{key30}"),
            format!("1 AES_CM_128_HMAC_SHA1_80 inline:{key28}"),
            format!("1 AEAD_AES_128_GCM inline:{key30}"),
            format!("1 AES_CM_128_HMAC_SHA1_80 inline:{key30} UNENCRYPTED_SRTP"),
            format!("1 AES_CM_128_HMAC_SHA1_80 inline:{key30};inline:{key30}"),
            format!("1234567890 AES_CM_128_HMAC_SHA1_80 inline:{key30}"),
            format!("x AES_CM_128_HMAC_SHA1_80 inline:{key30}"),
            format!("1 AES_CM_128_HMAC_SHA1_80 inline:{key30}|2^99"),
            format!("1 AES_CM_128_HMAC_SHA1_80 {key30}"),
            "1 AES_CM_128_HMAC_SHA1_80 inline:not*base64".to_owned(),
            String::new(),
        ] {
            assert_eq!(Crypto::parse(&bad), None, "{bad:?}");
        }
        assert!(Crypto::parse(&format!("7 AEAD_AES_128_GCM inline:{key28}|1048576")).is_some());
    }
}
