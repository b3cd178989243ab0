//! SRTP and SRTCP (RFC 3711) for one direction of one leg, sans-IO:
//! `AES_CM_128_HMAC_SHA1_80`, the profile every SDES and DTLS-SRTP peer supports. A building
//! block of WebRTC and SDES legs (issue 22); `AEAD_AES_128_GCM` comes next, beside it.
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
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::mac::ct_eq;

type AesCtr = ctr::Ctr128BE<aes::Aes128>;
type HmacSha1 = Hmac<Sha1>;

/// Master key and salt lengths of `AES_CM_128_HMAC_SHA1_80`.
pub const KEY_LEN: usize = 16;
pub const SALT_LEN: usize = 14;
/// The authentication tag's length (80 bits).
pub const TAG_LEN: usize = 10;
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
    cipher: [u8; KEY_LEN],
    salt: [u8; SALT_LEN],
    auth: [u8; 20],
}

/// `n` bytes of the AES-CM keystream of `key` from `iv`.
fn keystream(key: &[u8; KEY_LEN], iv: &[u8; 16], out: &mut [u8]) {
    out.fill(0);
    AesCtr::new(key.into(), iv.into()).apply_keystream(out);
}

impl SessionKeys {
    fn derive(master_key: &[u8; KEY_LEN], master_salt: &[u8; SALT_LEN]) -> SessionKeys {
        SessionKeys::derive_from(master_key, master_salt, 0)
    }

    /// With the labels from `first` (0: SRTP, 3: SRTCP): cipher key, auth key, salt.
    fn derive_from(master_key: &[u8; KEY_LEN], master_salt: &[u8; SALT_LEN], first: u8) -> SessionKeys {
        let derive = |label: u8, out: &mut [u8]| {
            // x = (label || index DIV kdr) XOR salt, the label at byte 7 of the 14; kdr 0.
            let mut iv = [0u8; 16];
            iv[..SALT_LEN].copy_from_slice(master_salt);
            iv[7] ^= label;
            keystream(master_key, &iv, out);
        };
        let mut keys = SessionKeys { cipher: [0; KEY_LEN], salt: [0; SALT_LEN], auth: [0; 20] };
        derive(first, &mut keys.cipher);
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

/// One direction's SRTP context: protects (sending) or unprotects (receiving) packets.
pub struct Srtp {
    keys: SessionKeys,
    auth: HmacSha1,
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
    /// A context for the master key and salt (`a=crypto` inline key, or the DTLS exporter's).
    pub fn new(master_key: &[u8; KEY_LEN], master_salt: &[u8; SALT_LEN]) -> Srtp {
        let keys = SessionKeys::derive(master_key, master_salt);
        let auth =
            <HmacSha1 as Mac>::new_from_slice(&keys.auth).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        Srtp { keys, auth, sources: HashMap::new() }
    }

    /// A context from the 30 bytes of an SDES inline key (key then salt).
    pub fn from_key_and_salt(key_salt: &[u8]) -> Option<Srtp> {
        let key: &[u8; KEY_LEN] = key_salt.get(..KEY_LEN)?.try_into().ok()?;
        let salt: &[u8; SALT_LEN] = key_salt.get(KEY_LEN..)?.try_into().ok()?;
        Some(Srtp::new(key, salt))
    }

    fn crypt(&self, ssrc: u32, index: u64, payload: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..SALT_LEN].copy_from_slice(&self.keys.salt);
        for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
            *b ^= s;
        }
        for (b, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
            *b ^= s;
        }
        AesCtr::new((&self.keys.cipher).into(), (&iv).into()).apply_keystream(payload);
    }

    fn tag(&self, packet: &[u8], roc: u32) -> [u8; TAG_LEN] {
        let mut mac = self.auth.clone();
        mac.update(packet);
        mac.update(&roc.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
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
        self.crypt(ssrc, index, &mut packet[header..]);
        let tag = self.tag(packet, (index >> 16) as u32);
        packet.extend_from_slice(&tag);
        self.sources.entry(ssrc).or_insert(source).accept(index);
        Ok(())
    }

    /// Checks and decrypts an SRTP packet in place, leaving the RTP packet (tag removed).
    /// On any error the packet and the context are as they were.
    pub fn unprotect(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        let body = packet.len().checked_sub(TAG_LEN).ok_or(SrtpError::Malformed)?;
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
        let tag = self.tag(&packet[..body], (index >> 16) as u32);
        if !ct_eq(&tag, &packet[body..]) {
            return Err(SrtpError::BadTag);
        }
        if known.is_some() {
            source.check(index)?;
        }
        packet.truncate(body);
        self.crypt(ssrc, index, &mut packet[header..]);
        self.sources.entry(ssrc).or_insert(source).accept(index);
        Ok(())
    }
}

/// The SRTCP index's 31 bits, and the E flag above them (the payload is encrypted).
const SRTCP_INDEX_MASK: u32 = 0x7fff_ffff;
const SRTCP_E: u32 = 0x8000_0000;
/// An RTCP packet's fixed header: V/P/RC, PT, length, SSRC.
const RTCP_HEADER: usize = 8;

/// One direction's SRTCP context (RFC 3711 §3.4): every compound RTCP packet encrypted
/// after its first 8 bytes, its SRTCP index and E flag appended, then the tag over all of
/// it. The receiver checks the tag first, then refuses replays and indexes more than 64
/// behind the newest, per source, for at most [`MAX_SSRCS`] sources.
pub struct Srtcp {
    keys: SessionKeys,
    auth: HmacSha1,
    sources: HashMap<u32, Source>,
    /// The next index this sender uses (libsrtp starts at 1, as this does).
    next_index: u32,
}

impl Srtcp {
    pub fn new(master_key: &[u8; KEY_LEN], master_salt: &[u8; SALT_LEN]) -> Srtcp {
        let keys = SessionKeys::derive_from(master_key, master_salt, 3);
        let auth =
            <HmacSha1 as Mac>::new_from_slice(&keys.auth).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        Srtcp { keys, auth, sources: HashMap::new(), next_index: 1 }
    }

    fn crypt(&self, ssrc: u32, index: u32, payload: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..SALT_LEN].copy_from_slice(&self.keys.salt);
        for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
            *b ^= s;
        }
        for (b, s) in iv[10..14].iter_mut().zip(index.to_be_bytes()) {
            *b ^= s;
        }
        AesCtr::new((&self.keys.cipher).into(), (&iv).into()).apply_keystream(payload);
    }

    fn tag(&self, authenticated: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.auth.clone();
        mac.update(authenticated);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Encrypts a compound RTCP packet in place, appending E + index and the tag.
    pub fn protect(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        if packet.len() < RTCP_HEADER || packet[0] >> 6 != 2 {
            return Err(SrtpError::Malformed);
        }
        let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let index = self.next_index & SRTCP_INDEX_MASK;
        self.next_index = self.next_index.wrapping_add(1);
        self.crypt(ssrc, index, &mut packet[RTCP_HEADER..]);
        packet.extend_from_slice(&(SRTCP_E | index).to_be_bytes());
        let tag = self.tag(packet);
        packet.extend_from_slice(&tag);
        Ok(())
    }

    /// Checks and decrypts an SRTCP packet in place, leaving the compound RTCP packet. On
    /// any error the packet and the context are as they were.
    pub fn unprotect(&mut self, packet: &mut Vec<u8>) -> Result<(), SrtpError> {
        let body = packet.len().checked_sub(TAG_LEN + 4).filter(|b| *b >= RTCP_HEADER).ok_or(SrtpError::Malformed)?;
        if packet[0] >> 6 != 2 {
            return Err(SrtpError::Malformed);
        }
        let tag = self.tag(&packet[..body + 4]);
        if !ct_eq(&tag, &packet[body + 4..]) {
            return Err(SrtpError::BadTag);
        }
        let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let e_index = u32::from_be_bytes([packet[body], packet[body + 1], packet[body + 2], packet[body + 3]]);
        let index = e_index & SRTCP_INDEX_MASK;
        let known = self.sources.get(&ssrc).copied();
        if known.is_none() && self.sources.len() >= MAX_SSRCS {
            return Err(SrtpError::TooManySources);
        }
        let source = known.unwrap_or(Source { newest: u64::from(index), seen: 0 });
        if known.is_some() {
            source.check(u64::from(index))?;
        }
        packet.truncate(body);
        if e_index & SRTCP_E != 0 {
            self.crypt(ssrc, index, &mut packet[RTCP_HEADER..]);
        }
        self.sources.entry(ssrc).or_insert(source).accept(u64::from(index));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
