//! SRTP and SRTCP (RFC 3711) for one direction of one leg, sans-IO, in the two profiles
//! browsers and SDES phones offer: `AES_CM_128_HMAC_SHA1_80` (every peer has it) and
//! `AEAD_AES_128_GCM` (RFC 7714: the header authenticated, the payload sealed, a 16-byte
//! tag). A building block of WebRTC and SDES legs (issue 22).
//!
//! - Session keys are derived from the master key and salt once (key derivation rate 0,
//!   as SDES and DTLS-SRTP use it).
//! - The receiver guesses each packet's rollover counter from its sequence number
//!   (RFC 3711 §3.3.1), checks the tag *before* anything else is believed, then rejects
//!   replays and packets older than a 64-packet window (§3.3.2). State changes only for
//!   packets that pass all three.
//! - A context keeps state for at most [`MAX_SSRCS`] sources: a stranger cannot make it
//!   hold more (a sender's SSRC is learned only from an authenticated packet).

use std::collections::HashMap;

use aes::cipher::{KeyIvInit, StreamCipher};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::mac::ct_eq;

type AesCtr = ctr::Ctr128BE<aes::Aes128>;
type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
type HmacSha1 = Hmac<Sha1>;

/// Master key and salt lengths of `AES_CM_128_HMAC_SHA1_80`.
pub const KEY_LEN: usize = 16;
pub const SALT_LEN: usize = 14;
/// The authentication tag's length (80 bits).
pub const TAG_LEN: usize = 10;
/// `AEAD_AES_128_GCM`'s master salt and tag lengths (RFC 7714 §12).
pub const GCM_SALT_LEN: usize = 12;
pub const GCM_TAG_LEN: usize = 16;
/// `AEAD_AES_256_GCM`'s master key length (RFC 7714 §12): what Chromium's DTLS prefers.
pub const KEY256_LEN: usize = 32;
/// Sources one context keeps state for.
pub const MAX_SSRCS: usize = 16;
/// Packets behind the newest one that are still accepted (once each).
const WINDOW: u64 = 64;

/// Why a packet was refused. Each is counted by the caller; none changes the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    #[error("not an RTP packet, or shorter than its header and tag")]
    Malformed,
    #[error("authentication tag does not verify")]
    BadTag,
    #[error("replayed packet")]
    Replayed,
    #[error("older than the replay window")]
    TooOld,
    #[error("too many sources in one context")]
    TooManySources,
}

/// Session keys derived from a master key and salt (RFC 3711 §4.3, rate 0): SRTP's
/// (labels 0–2) or SRTCP's (labels 3–5).
struct SessionKeys {
    /// The cipher key: the first 16 bytes for AES-128, all 32 for AES-256.
    cipher: [u8; KEY256_LEN],
    salt: [u8; SALT_LEN],
    auth: [u8; 20],
}

/// `n` bytes of the AES-CM keystream of `key` (AES-128 or, with 32 bytes, AES-256) from `iv`.
fn keystream(key: &[u8], iv: &[u8; 16], out: &mut [u8]) {
    out.fill(0);
    match <&[u8; KEY256_LEN]>::try_from(key) {
        Ok(k256) => Aes256Ctr::new(k256.into(), iv.into()).apply_keystream(out),
        Err(_) => {
            let mut k = [0u8; KEY_LEN];
            k.copy_from_slice(&key[..KEY_LEN]);
            AesCtr::new((&k).into(), iv.into()).apply_keystream(out)
        }
    }
}

impl SessionKeys {
    /// With the labels from `first` (0: SRTP, 3: SRTCP): cipher key (as long as the master
    /// key: AES_256_CM_PRF for a 32-byte one, RFC 6188), auth key, salt.
    fn derive_from(master_key: &[u8], master_salt: &[u8; SALT_LEN], first: u8) -> SessionKeys {
        let derive = |label: u8, out: &mut [u8]| {
            // x = (label || index DIV kdr) XOR salt, the label at byte 7 of the 14; kdr 0.
            let mut iv = [0u8; 16];
            iv[..SALT_LEN].copy_from_slice(master_salt);
            iv[7] ^= label;
            keystream(master_key, &iv, out);
        };
        let mut keys = SessionKeys { cipher: [0; KEY256_LEN], salt: [0; SALT_LEN], auth: [0; 20] };
        derive(first, &mut keys.cipher[..master_key.len()]);
        derive(first + 1, &mut keys.auth);
        derive(first + 2, &mut keys.salt);
        keys
    }
}

/// What the context knows of one source.
#[derive(Debug, Clone, Copy)]
struct Source {
    /// Highest packet index (rollover counter << 16 | sequence number) accepted or sent.
    newest: u64,
    /// Bit `i`: packet `newest - i` was accepted.
    seen: u64,
}

impl Source {
    /// The packet index a sequence number most likely stands for (RFC 3711 §3.3.1).
    fn guess(&self, seq: u16) -> u64 {
        let roc = self.newest >> 16;
        let s_l = (self.newest & 0xffff) as i64;
        let seq_i = i64::from(seq);
        let v = if s_l < 0x8000 {
            if seq_i - s_l > 0x8000 && roc > 0 {
                roc - 1
            } else {
                roc
            }
        } else if s_l - 0x8000 > seq_i {
            roc + 1
        } else {
            roc
        };
        (v << 16) | u64::from(seq)
    }

    fn check(&self, index: u64) -> Result<(), SrtpError> {
        if index > self.newest {
            return Ok(());
        }
        let behind = self.newest - index;
        if behind >= WINDOW {
            Err(SrtpError::TooOld)
        } else if self.seen & (1 << behind) != 0 {
            Err(SrtpError::Replayed)
        } else {
            Ok(())
        }
    }

    fn accept(&mut self, index: u64) {
        if index > self.newest {
            let ahead = index - self.newest;
            self.seen = if ahead >= WINDOW { 0 } else { self.seen << ahead };
            self.seen |= 1;
            self.newest = index;
        } else if self.newest - index < WINDOW {
            self.seen |= 1 << (self.newest - index);
        }
    }
}

/// How a context seals packets: AES-CM with an HMAC-SHA1 tag, or AES-GCM.
enum Sealer {
    Cm { keys: SessionKeys, auth: HmacSha1 },
    Gcm { aead: Gcm, salt: [u8; GCM_SALT_LEN] },
}

/// AES-GCM of either key size.
enum Gcm {
    A128(Box<Aes128Gcm>),
    A256(Box<Aes256Gcm>),
}

impl Gcm {
    fn seal(&self, nonce: &[u8; GCM_SALT_LEN], aad: &[u8], payload: &mut [u8]) -> Result<aes_gcm::Tag, SrtpError> {
        match self {
            Gcm::A128(a) => a.encrypt_in_place_detached(nonce.into(), aad, payload),
            Gcm::A256(a) => a.encrypt_in_place_detached(nonce.into(), aad, payload),
        }
        .map_err(|_| SrtpError::Malformed)
    }

    fn open(&self, nonce: &[u8; GCM_SALT_LEN], aad: &[u8], payload: &mut [u8], tag: &[u8]) -> Result<(), SrtpError> {
        let tag = aes_gcm::Tag::clone_from_slice(tag);
        match self {
            Gcm::A128(a) => a.decrypt_in_place_detached(nonce.into(), aad, payload, &tag),
            Gcm::A256(a) => a.decrypt_in_place_detached(nonce.into(), aad, payload, &tag),
        }
        .map_err(|_| SrtpError::BadTag)
    }
}

impl Sealer {
    /// AES-CM session keys from labels `first`.. (0: SRTP, 3: SRTCP).
    fn cm(master_key: &[u8; KEY_LEN], master_salt: &[u8; SALT_LEN], first: u8) -> Sealer {
        let keys = SessionKeys::derive_from(master_key, master_salt, first);
        let auth =
            <HmacSha1 as Mac>::new_from_slice(&keys.auth).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        Sealer::Cm { keys, auth }
    }

    /// AES-GCM session key and salt (RFC 7714 §11: the same AES-CM derivation, the
    /// 96-bit master salt padded with zeros), from labels `first`.. A 16-byte master key
    /// makes `AEAD_AES_128_GCM`, a 32-byte one `AEAD_AES_256_GCM`.
    fn gcm(master_key: &[u8], master_salt: &[u8; GCM_SALT_LEN], first: u8) -> Sealer {
        let mut padded = [0u8; SALT_LEN];
        padded[..GCM_SALT_LEN].copy_from_slice(master_salt);
        let keys = SessionKeys::derive_from(master_key, &padded, first);
        let mut salt = [0u8; GCM_SALT_LEN];
        salt.copy_from_slice(&keys.salt[..GCM_SALT_LEN]);
        let aead = if master_key.len() == KEY256_LEN {
            Gcm::A256(Box::new(Aes256Gcm::new((&keys.cipher).into())))
        } else {
            let mut k = [0u8; KEY_LEN];
            k.copy_from_slice(&keys.cipher[..KEY_LEN]);
            Gcm::A128(Box::new(Aes128Gcm::new((&k).into())))
        };
        Sealer::Gcm { aead, salt }
    }

    fn tag_len(&self) -> usize {
        match self {
            Sealer::Cm { .. } => TAG_LEN,
            Sealer::Gcm { .. } => GCM_TAG_LEN,
        }
    }
}

/// A GCM nonce: `ssrc` at bytes 2–5 and `low` (ROC and sequence, or 0 and the SRTCP index)
/// at 6–11, XORed with the session salt (RFC 7714 §8.1, §9.1).
fn gcm_nonce(salt: &[u8; GCM_SALT_LEN], ssrc: u32, low: u64) -> [u8; GCM_SALT_LEN] {
    let mut iv = [0u8; GCM_SALT_LEN];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..].copy_from_slice(&low.to_be_bytes()[2..]);
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    iv
}

/// One direction's SRTP context: protects (sending) or unprotects (receiving) packets.
pub struct Srtp {
    sealer: Sealer,
    sources: HashMap<u32, Source>,
}

/// The RTP header's length (fixed part, CSRCs, extension), or `None` when it is not RTP
/// version 2 or does not fit.
fn header_len(p: &[u8]) -> Option<usize> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return None;
    }
    let mut len = 12 + 4 * usize::from(p[0] & 0x0f);
    if p[0] & 0x10 != 0 {
        let ext = p.get(len + 2..len + 4)?;
        len += 4 + 4 * usize::from(u16::from_be_bytes([ext[0], ext[1]]));
    }
    (len <= p.len()).then_some(len)
}

impl Srtp {
    /// An `AES_CM_128_HMAC_SHA1_80` context for the master key and salt (`a=crypto` inline
    /// key, or the DTLS exporter's).
    pub fn new(master_key: &[u8; KEY_LEN], master_salt: &[u8; SALT_LEN]) -> Srtp {
        Srtp { sealer: Sealer::cm(master_key, master_salt, 0), sources: HashMap::new() }
    }

    /// An `AEAD_AES_128_GCM` (16-byte key) or `AEAD_AES_256_GCM` (32-byte key) context for
    /// the master key and its 12-byte salt.
    pub fn gcm(master_key: &[u8], master_salt: &[u8; GCM_SALT_LEN]) -> Srtp {
        Srtp { sealer: Sealer::gcm(master_key, master_salt, 0), sources: HashMap::new() }
    }

    /// Encrypts an RTP packet in place and appends its tag.
    pub fn protect(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        let header = header_len(packet).ok_or(SrtpError::Malformed)?;
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let full = self.sources.len() >= MAX_SSRCS;
        let source = match self.sources.get(&ssrc) {
            Some(s) => *s,
            None if full => return Err(SrtpError::TooManySources),
            None => Source { newest: u64::from(seq), seen: 0 },
        };
        let index = source.guess(seq);
        match &self.sealer {
            Sealer::Cm { keys, auth } => {
                cm_crypt(keys, ssrc, index, &mut packet[header..]);
                let tag = hmac_tag(auth, &[packet, &((index >> 16) as u32).to_be_bytes()]);
                packet.extend_from_slice(&tag);
            }
            Sealer::Gcm { aead, salt } => {
                let nonce = gcm_nonce(salt, ssrc, index);
                let (aad, payload) = packet.split_at_mut(header);
                let tag = aead.seal(&nonce, aad, payload)?;
                packet.extend_from_slice(&tag);
            }
        }
        self.sources.entry(ssrc).or_insert(source).accept(index);
        Ok(())
    }

    /// Checks and decrypts an SRTP packet in place, leaving the RTP packet (tag removed).
    /// On any error the packet and the context are as they were.
    pub fn unprotect(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        let body = packet.len().checked_sub(self.sealer.tag_len()).ok_or(SrtpError::Malformed)?;
        let header = header_len(&packet[..body]).ok_or(SrtpError::Malformed)?;
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let known = self.sources.get(&ssrc).copied();
        if known.is_none() && self.sources.len() >= MAX_SSRCS {
            return Err(SrtpError::TooManySources);
        }
        // A new source starts at its first packet's sequence number, rollover counter 0.
        let source = known.unwrap_or(Source { newest: u64::from(seq), seen: 0 });
        let index = source.guess(seq);
        match &self.sealer {
            Sealer::Cm { keys, auth } => {
                let tag = hmac_tag(auth, &[&packet[..body], &((index >> 16) as u32).to_be_bytes()]);
                if !ct_eq(&tag, &packet[body..]) {
                    return Err(SrtpError::BadTag);
                }
                if known.is_some() {
                    source.check(index)?;
                }
                packet.truncate(body);
                cm_crypt(keys, ssrc, index, &mut packet[header..]);
            }
            Sealer::Gcm { aead, salt } => {
                if known.is_some() {
                    source.check(index)?;
                }
                let nonce = gcm_nonce(salt, ssrc, index);
                let mut tag = [0u8; GCM_TAG_LEN];
                tag.copy_from_slice(&packet[body..]);
                // In place: GCM checks the tag before it decrypts a byte.
                let (aad, sealed) = packet[..body].split_at_mut(header);
                aead.open(&nonce, aad, sealed, &tag)?;
                packet.truncate(body);
            }
        }
        self.sources.entry(ssrc).or_insert(source).accept(index);
        Ok(())
    }
}

/// AES-CM over `payload` for a packet of `ssrc` with index (or SRTCP index) `index`
/// (RFC 3711 §4.1.1: the IV is the session salt XOR the SSRC and the index).
fn cm_crypt(keys: &SessionKeys, ssrc: u32, index: u64, payload: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..SALT_LEN].copy_from_slice(&keys.salt);
    for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
        *b ^= s;
    }
    for (b, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
        *b ^= s;
    }
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(&keys.cipher[..KEY_LEN]);
    AesCtr::new((&key).into(), (&iv).into()).apply_keystream(payload);
}

/// The 80-bit HMAC-SHA1 tag over `parts`.
fn hmac_tag(auth: &HmacSha1, parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut mac = auth.clone();
    for p in parts {
        mac.update(p);
    }
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&full[..TAG_LEN]);
    tag
}

/// The SRTCP index's 31 bits, and the E flag above them (the payload is encrypted).
const SRTCP_INDEX_MASK: u32 = 0x7fff_ffff;
const SRTCP_E: u32 = 0x8000_0000;
/// An RTCP packet's fixed header: V/P/RC, PT, length, SSRC.
const RTCP_HEADER: usize = 8;

/// SRTCP's associated data under GCM: the fixed header, then E and the index (RFC 7714 §9.2).
fn srtcp_aad(header: &[u8], e_index: [u8; 4]) -> [u8; RTCP_HEADER + 4] {
    let mut aad = [0u8; RTCP_HEADER + 4];
    aad[..RTCP_HEADER].copy_from_slice(&header[..RTCP_HEADER]);
    aad[RTCP_HEADER..].copy_from_slice(&e_index);
    aad
}

/// One direction's SRTCP context (RFC 3711 §3.4, RFC 7714 §9): every compound RTCP packet
/// encrypted after its first 8 bytes, its SRTCP index and E flag appended (after the GCM
/// tag, before the HMAC one), authenticated whole. The receiver checks the tag first,
/// then refuses replays and indexes more than 64 behind the newest, per source, for at
/// most [`MAX_SSRCS`] sources.
pub struct Srtcp {
    sealer: Sealer,
    sources: HashMap<u32, Source>,
    /// The next index this sender uses (libsrtp starts at 1, as this does).
    next_index: u32,
}

impl Srtcp {
    /// An `AES_CM_128_HMAC_SHA1_80` context.
    pub fn new(master_key: &[u8; KEY_LEN], master_salt: &[u8; SALT_LEN]) -> Srtcp {
        Srtcp { sealer: Sealer::cm(master_key, master_salt, 3), sources: HashMap::new(), next_index: 1 }
    }

    /// An `AEAD_AES_128_GCM` or `AEAD_AES_256_GCM` context (by the key's length).
    pub fn gcm(master_key: &[u8], master_salt: &[u8; GCM_SALT_LEN]) -> Srtcp {
        Srtcp { sealer: Sealer::gcm(master_key, master_salt, 3), sources: HashMap::new(), next_index: 1 }
    }

    /// Encrypts a compound RTCP packet in place, appending E + index and the tag.
    pub fn protect(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        if packet.len() < RTCP_HEADER || packet[0] >> 6 != 2 {
            return Err(SrtpError::Malformed);
        }
        let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let index = self.next_index & SRTCP_INDEX_MASK;
        self.next_index = self.next_index.wrapping_add(1);
        let e_index = (SRTCP_E | index).to_be_bytes();
        match &self.sealer {
            Sealer::Cm { keys, auth } => {
                cm_crypt(keys, ssrc, u64::from(index), &mut packet[RTCP_HEADER..]);
                packet.extend_from_slice(&e_index);
                let tag = hmac_tag(auth, &[packet]);
                packet.extend_from_slice(&tag);
            }
            Sealer::Gcm { aead, salt } => {
                let nonce = gcm_nonce(salt, ssrc, u64::from(index));
                let (header, payload) = packet.split_at_mut(RTCP_HEADER);
                let tag = aead.seal(&nonce, &srtcp_aad(header, e_index), payload)?;
                packet.extend_from_slice(&tag);
                packet.extend_from_slice(&e_index);
            }
        }
        Ok(())
    }

    /// Checks and decrypts an SRTCP packet in place, leaving the compound RTCP packet. On
    /// any error the packet and the context are as they were.
    pub fn unprotect(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        let tag_len = self.sealer.tag_len();
        let body = packet.len().checked_sub(tag_len + 4).filter(|b| *b >= RTCP_HEADER).ok_or(SrtpError::Malformed)?;
        if packet[0] >> 6 != 2 {
            return Err(SrtpError::Malformed);
        }
        let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        // Where E + index sit: before the HMAC tag, after the GCM one.
        let at = match self.sealer {
            Sealer::Cm { .. } => body,
            Sealer::Gcm { .. } => body + tag_len,
        };
        let e_index = u32::from_be_bytes([packet[at], packet[at + 1], packet[at + 2], packet[at + 3]]);
        let index = e_index & SRTCP_INDEX_MASK;
        let known = self.sources.get(&ssrc).copied();
        if known.is_none() && self.sources.len() >= MAX_SSRCS {
            return Err(SrtpError::TooManySources);
        }
        let source = known.unwrap_or(Source { newest: u64::from(index), seen: 0 });
        match &self.sealer {
            Sealer::Cm { keys, auth } => {
                let tag = hmac_tag(auth, &[&packet[..body + 4]]);
                if !ct_eq(&tag, &packet[body + 4..]) {
                    return Err(SrtpError::BadTag);
                }
                if known.is_some() {
                    source.check(u64::from(index))?;
                }
                packet.truncate(body);
                if e_index & SRTCP_E != 0 {
                    cm_crypt(keys, ssrc, u64::from(index), &mut packet[RTCP_HEADER..]);
                }
            }
            Sealer::Gcm { aead, salt } => {
                if e_index & SRTCP_E == 0 {
                    // Unencrypted SRTCP under GCM (authentication only) is not offered here.
                    return Err(SrtpError::Malformed);
                }
                if known.is_some() {
                    source.check(u64::from(index))?;
                }
                let nonce = gcm_nonce(salt, ssrc, u64::from(index));
                let aad = srtcp_aad(&packet[..RTCP_HEADER], e_index.to_be_bytes());
                let mut tag = [0u8; GCM_TAG_LEN];
                tag.copy_from_slice(&packet[body..body + tag_len]);
                aead.open(&nonce, &aad, &mut packet[RTCP_HEADER..body], &tag)?;
                packet.truncate(body);
            }
        }
        self.sources.entry(ssrc).or_insert(source).accept(u64::from(index));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
