//! DTLS-SRTP (RFC 5763/5764) for one WebRTC leg, sans-IO, over str0m's `dimpl`.
//!
//! - The relay has one [`Identity`] (an ECDSA P-256 certificate generated at start), whose
//!   SHA-256 fingerprint goes in every `a=fingerprint` pinhole writes.
//! - A [`DtlsLeg`] is one handshake and its outcome: it takes the leg's datagrams, gives
//!   back the records to send to the same address, and once the handshake is complete
//!   *and* the peer's certificate hashes to the fingerprint in the peer's SDP, the SRTP
//!   keys for both directions ([`Keys`]). A certificate that does not match ends the leg:
//!   no keys, ever, so no media.
//! - As the passive side (a browser's actpass or active offer) the server answers a
//!   ClientHello with a cookie first (HelloVerifyRequest): a stranger with a spoofed source
//!   gets one small record back, never the certificate flight.

use std::sync::Arc;
use std::time::Instant;

use dimpl::{Config, Dtls, DtlsCertificate, Output, SrtpProfile};
use sha2::{Digest, Sha256};

use crate::srtp::{Srtcp, Srtp, GCM_SALT_LEN, KEY256_LEN, KEY_LEN, SALT_LEN};

/// Records a handshake may produce at once before the rest waits for the next poll.
const MAX_RECORDS: usize = 16;

/// The relay's certificate and its fingerprint.
pub struct Identity {
    cert: DtlsCertificate,
    fingerprint: [u8; 32],
    config: Arc<Config>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.fingerprint_attr())
    }
}

/// Why an identity could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make the DTLS certificate: {0}")]
pub struct IdentityError(String);

impl Identity {
    /// A fresh self-signed ECDSA P-256 certificate (a random serial, a year of validity).
    pub fn generate() -> Result<Identity, IdentityError> {
        let err = |e: rcgen::Error| IdentityError(e.to_string());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, "pinhole");
        let serial: [u8; 16] = rand::random();
        params.serial_number = Some(serial.to_vec().into());
        let cert = params.self_signed(&key).map_err(err)?;
        let der = cert.der().to_vec();
        let fingerprint = Sha256::digest(&der).into();
        let config = Config::builder()
            // Replies to a ClientHello are a cookie until the peer proves its address.
            .use_server_cookie(true)
            .build()
            .map_err(|e| IdentityError(e.to_string()))?;
        Ok(Identity {
            cert: DtlsCertificate { certificate: der, private_key: key.serialize_der() },
            fingerprint,
            config: Arc::new(config),
        })
    }

    /// The value of our `a=fingerprint` attribute.
    pub fn fingerprint_attr(&self) -> String {
        format!("sha-256 {}", colon_hex(&self.fingerprint))
    }
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A peer's `a=fingerprint` value: only SHA-256 is taken (every browser sends it).
pub fn parse_fingerprint(value: &str) -> Option<[u8; 32]> {
    let (hash, hex) = value.trim().split_once(' ')?;
    if !hash.eq_ignore_ascii_case("sha-256") {
        return None;
    }
    let bytes: Vec<u8> = hex
        .trim()
        .split(':')
        .map(|p| if p.len() == 2 { u8::from_str_radix(p, 16).ok() } else { None })
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// SRTP contexts of one leg once keyed: what the peer sends is unprotected with `rx`,
/// what goes to the peer is protected with `tx`.
pub struct Keys {
    pub rx: Srtp,
    pub rx_rtcp: Srtcp,
    pub tx: Srtp,
    pub tx_rtcp: Srtcp,
}

/// Contexts for one direction from a master key and salt.
fn contexts(key: &[u8], salt: &[u8]) -> Option<(Srtp, Srtcp)> {
    match (key.len(), salt.len()) {
        (KEY_LEN, SALT_LEN) => {
            let (k, s) = (key.try_into().ok()?, salt.try_into().ok()?);
            Some((Srtp::new(k, s), Srtcp::new(k, s)))
        }
        (KEY_LEN | KEY256_LEN, GCM_SALT_LEN) => {
            let s: &[u8; GCM_SALT_LEN] = salt.try_into().ok()?;
            Some((Srtp::gcm(key, s), Srtcp::gcm(key, s)))
        }
        _ => None,
    }
}

/// Keys from the exporter's output (RFC 5764 §4.2: client key, server key, client salt,
/// server salt); `client`: we were the DTLS client.
fn keys_from(material: &[u8], profile: SrtpProfile, client: bool) -> Option<Keys> {
    let (key_len, salt_len) = match profile {
        SrtpProfile::AES128_CM_SHA1_80 => (KEY_LEN, SALT_LEN),
        SrtpProfile::AEAD_AES_128_GCM => (KEY_LEN, GCM_SALT_LEN),
        SrtpProfile::AEAD_AES_256_GCM => (KEY256_LEN, GCM_SALT_LEN),
        _ => return None,
    };
    if material.len() != 2 * (key_len + salt_len) {
        return None;
    }
    let (client_key, rest) = material.split_at(key_len);
    let (server_key, rest) = rest.split_at(key_len);
    let (client_salt, server_salt) = rest.split_at(salt_len);
    let (client_ctx, server_ctx) = (contexts(client_key, client_salt)?, contexts(server_key, server_salt)?);
    let ((tx, tx_rtcp), (rx, rx_rtcp)) = if client { (client_ctx, server_ctx) } else { (server_ctx, client_ctx) };
    Some(Keys { rx, rx_rtcp, tx, tx_rtcp })
}

/// How a leg's handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Handshaking,
    /// Keys are out (taken with [`DtlsLeg::take_keys`]).
    Done,
    /// The peer's certificate did not match its SDP, the handshake timed out or failed,
    /// or the peer closed: no keys from this leg.
    Failed(&'static str),
}

/// One leg's DTLS handshake.
pub struct DtlsLeg {
    dtls: Dtls,
    /// The SHA-256 fingerprint the peer's SDP announced.
    expected: [u8; 32],
    client: bool,
    cert_ok: Option<bool>,
    keys: Option<Keys>,
    state: State,
    next_timeout: Option<Instant>,
    out: Vec<Vec<u8>>,
    buf: Vec<u8>,
}

impl DtlsLeg {
    /// A handshake with the peer whose SDP fingerprint is `expected`; `active`: we are the
    /// DTLS client (the peer said `a=setup:passive`) and send the ClientHello first.
    pub fn new(identity: &Identity, expected: [u8; 32], active: bool, now: Instant) -> DtlsLeg {
        let mut dtls = Dtls::new_12(identity.config.clone(), identity.cert.clone(), now);
        dtls.set_active(active);
        let mut leg = DtlsLeg {
            dtls,
            expected,
            client: active,
            cert_ok: None,
            keys: None,
            state: State::Handshaking,
            next_timeout: None,
            out: Vec::new(),
            buf: vec![0; 2048],
        };
        if active {
            leg.handle_timeout(now);
        }
        leg
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// A datagram from the peer (first byte 20–63).
    pub fn handle(&mut self, now: Instant, data: &[u8]) {
        if matches!(self.state, State::Failed(_)) {
            return;
        }
        if self.dtls.handle_timeout(now).is_err() || self.dtls.handle_packet(data).is_err() {
            self.fail("the DTLS handshake failed");
            return;
        }
        self.drain();
    }

    /// When [`DtlsLeg::handle_timeout`] should run next (retransmissions, the handshake's end).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_timeout.filter(|_| self.state == State::Handshaking)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state != State::Handshaking {
            return;
        }
        if self.dtls.handle_timeout(now).is_err() {
            self.fail("the DTLS handshake timed out");
            return;
        }
        self.drain();
    }

    /// Records to send to the peer's address, oldest first.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    /// The keys, once: after the handshake completed with the right certificate.
    pub fn take_keys(&mut self) -> Option<Keys> {
        self.keys.take()
    }

    fn fail(&mut self, why: &'static str) {
        self.state = State::Failed(why);
        self.keys = None;
        self.out.clear();
    }

    fn drain(&mut self) {
        let mut material = None;
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) if self.out.len() < MAX_RECORDS => self.out.push(p.to_vec()),
                Output::Packet(_) => {}
                Output::BufferTooSmall { needed } => {
                    if needed > 1 << 16 {
                        self.fail("a DTLS record larger than 64 KiB");
                        return;
                    }
                    self.buf.resize(needed, 0);
                }
                Output::Timeout(at) => {
                    self.next_timeout = Some(at);
                    break;
                }
                Output::PeerCert(der) => {
                    let got: [u8; 32] = Sha256::digest(der).into();
                    self.cert_ok = Some(crate::mac::ct_eq(&got, &self.expected));
                }
                Output::KeyingMaterial(km, profile) => material = Some((km.to_vec(), profile)),
                Output::Connected | Output::ApplicationData(_) => {}
                Output::CloseNotify => {
                    self.fail("the peer closed DTLS");
                    return;
                }
                _ => {}
            }
        }
        if let Some((km, profile)) = material {
            match self.cert_ok {
                Some(true) => match keys_from(&km, profile, self.client) {
                    Some(k) => {
                        self.keys = Some(k);
                        self.state = State::Done;
                    }
                    None => self.fail("an SRTP profile pinhole does not take"),
                },
                Some(false) => self.fail("the peer's certificate does not match its SDP fingerprint"),
                None => self.fail("the peer sent no certificate"),
            }
        }
    }
}

/// Whether a datagram on a leg's port is DTLS (RFC 7983: first byte 20–63).
pub fn is_dtls(data: &[u8]) -> bool {
    matches!(data.first(), Some(20..=63))
}

#[cfg(test)]
mod tests;
