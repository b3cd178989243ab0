//! One secure leg of a relayed stream, as the data plane holds it: ICE-lite checks
//! answered, the DTLS handshake driven, SRTP and SRTCP unprotected on the way in and
//! protected on the way out — or SDES keys from the SDP. Sans-IO: the port table
//! ([`crate::ports`]) hands it datagrams and sends what it gives back.
//!
//! What a stranger can make it do:
//! - a STUN check without the ufrag and password pinhole wrote in its SDP gets no answer
//!   and changes nothing ([`IceLite`]);
//! - DTLS is taken only from the address a signed check nominated (or, without ICE, the
//!   latched one), and a handshake is begun for it at most once per leg (and per role and
//!   fingerprint the SDP names), so a flood of ClientHellos costs one handshake;
//! - media is forwarded only after the keys are out, and only packets whose tag verifies
//!   (never replays) are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::dtls::{DtlsLeg, Identity, Keys, State};
use crate::ice_lite::{Checked, Credentials, IceLite};
use crate::sdes::Crypto;
use crate::srtp::SrtpError;

/// ICE-lite for a leg: our credentials (in the SDP we sent) and the peer's ufrag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceSetup {
    pub local: Credentials,
    pub remote_ufrag: String,
}

/// DTLS-SRTP for a leg.
#[derive(Debug, Clone)]
pub struct DtlsSetup {
    pub identity: Arc<Identity>,
    /// The SHA-256 fingerprint in the peer's SDP.
    pub peer_fingerprint: [u8; 32],
    /// We are the DTLS client (the peer's `a=setup` is passive).
    pub active: bool,
}

impl PartialEq for DtlsSetup {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.identity, &other.identity)
            && self.peer_fingerprint == other.peer_fingerprint
            && self.active == other.active
    }
}

/// SDES keys for a leg: the peer's line keys what it sends, ours what we send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdesSetup {
    pub rx: Crypto,
    pub tx: Crypto,
}

/// How the control plane wants one leg secured. Sent again after every offer and answer;
/// what did not change keeps its state (the DTLS session, SRTP rollover counters).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LegSetup {
    pub ice: Option<IceSetup>,
    pub dtls: Option<DtlsSetup>,
    pub sdes: Option<SdesSetup>,
}

/// What a control datagram (STUN, DTLS) came to.
#[derive(Debug, Default)]
pub struct Control {
    /// Datagrams to send back to the source, from the same port.
    pub replies: Vec<Vec<u8>>,
    /// A signed check nominated the source: the leg's address from now on.
    pub nominated: bool,
    /// Refused: counted as a drop.
    pub refused: bool,
}

/// Why a media packet of a secure leg was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No keys yet (the handshake is not complete).
    NotReady,
    Srtp(SrtpError),
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotReady => "not_ready",
            Refusal::Srtp(SrtpError::BadTag) => "bad_tag",
            Refusal::Srtp(SrtpError::Replayed) => "replayed",
            Refusal::Srtp(SrtpError::TooOld) => "too_old",
            Refusal::Srtp(SrtpError::Malformed) => "malformed",
            Refusal::Srtp(SrtpError::TooManySources) => "too_many_sources",
        }
    }
}

/// One leg's security state in the data plane.
pub struct SecureLeg {
    setup: LegSetup,
    ice: Option<IceLite>,
    dtls: Option<DtlsLeg>,
    keys: Option<Keys>,
    /// The address DTLS and media are taken from when the leg has no ICE.
    latched: Option<SocketAddr>,
    /// The handshake failed and was counted (once).
    failed: bool,
}

impl SecureLeg {
    pub fn new(setup: LegSetup) -> SecureLeg {
        let mut leg =
            SecureLeg { setup: LegSetup::default(), ice: None, dtls: None, keys: None, latched: None, failed: false };
        leg.update(setup);
        leg
    }

    /// Signalling changed the leg (or repeated it). An ICE restart keeps the nominated
    /// address until a check under the new credentials nominates another; a new DTLS
    /// fingerprint or role starts a new handshake, and the old keys serve until it is done.
    pub fn update(&mut self, setup: LegSetup) {
        match (&setup.ice, &mut self.ice) {
            (None, _) => self.ice = None,
            (Some(s), Some(ice)) => {
                if ice.local() != &s.local {
                    ice.restart(s.local.clone());
                }
                ice.set_remote_ufrag(&s.remote_ufrag);
            }
            (Some(s), None) => {
                let mut ice = IceLite::new(s.local.clone());
                ice.set_remote_ufrag(&s.remote_ufrag);
                self.ice = Some(ice);
            }
        }
        if setup.dtls != self.setup.dtls {
            self.dtls = None;
            self.failed = false;
        }
        if setup.sdes != self.setup.sdes {
            self.keys = setup.sdes.as_ref().and_then(sdes_keys);
        }
        self.setup = setup;
    }

    /// Where this leg's media goes and comes from: the nominated (or latched) address.
    pub fn peer(&self) -> Option<SocketAddr> {
        match &self.ice {
            Some(ice) => ice.selected(),
            None => self.latched,
        }
    }

    pub fn has_ice(&self) -> bool {
        self.ice.is_some()
    }

    /// Whether media may flow (keys are out).
    pub fn ready(&self) -> bool {
        self.keys.is_some()
    }

    /// Without ICE: the latch accepted `src`; DTLS and media are taken from it.
    pub fn latch(&mut self, src: SocketAddr) {
        if self.ice.is_none() {
            self.latched = Some(src);
        }
    }

    /// A STUN datagram from `src`.
    pub fn on_stun(&mut self, now: Instant, src: SocketAddr, data: &[u8]) -> Control {
        let mut c = Control::default();
        let Some(ice) = self.ice.as_mut() else {
            c.refused = true;
            return c;
        };
        match ice.handle(src, data) {
            Checked::Answer { bytes, nominated } => {
                c.replies.push(bytes);
                c.nominated = nominated;
                if nominated {
                    // An active DTLS side begins once it knows where the peer is.
                    self.start_dtls(now);
                    self.drain(&mut c.replies);
                }
            }
            Checked::Refused(_) => c.refused = true,
        }
        c
    }

    /// A DTLS datagram from `src`: taken only from the leg's address.
    pub fn on_dtls(&mut self, now: Instant, src: SocketAddr, data: &[u8]) -> Control {
        let mut c = Control::default();
        if self.peer() != Some(src) || self.setup.dtls.is_none() {
            c.refused = true;
            return c;
        }
        self.start_dtls(now);
        if let Some(d) = self.dtls.as_mut() {
            d.handle(now, data);
        }
        self.drain(&mut c.replies);
        c
    }

    fn start_dtls(&mut self, now: Instant) {
        if self.dtls.is_some() {
            return;
        }
        if let Some(s) = &self.setup.dtls {
            self.dtls = Some(DtlsLeg::new(&s.identity, s.peer_fingerprint, s.active, now));
        }
    }

    /// Records to send to the leg's address, and the keys once they are out.
    fn drain(&mut self, out: &mut Vec<Vec<u8>>) {
        let Some(d) = self.dtls.as_mut() else { return };
        while let Some(p) = d.poll_transmit() {
            out.push(p);
        }
        if let Some(k) = d.take_keys() {
            metrics::counter!("pinhole_dtls_handshakes_total", "outcome" => "done").increment(1);
            self.keys = Some(k);
        }
        if matches!(d.state(), State::Failed(_)) && !self.failed {
            // The leg keeps its failed handshake: no second one until signalling changes it.
            self.failed = true;
            metrics::counter!("pinhole_dtls_handshakes_total", "outcome" => "failed").increment(1);
        }
    }

    /// Whether the leg has timers: a handshake under way, or one to begin as the client
    /// once the peer's address is known.
    pub fn wants_timer(&self) -> bool {
        match &self.dtls {
            Some(d) => d.state() == State::Handshaking,
            None => self.setup.dtls.as_ref().is_some_and(|d| d.active),
        }
    }

    /// Retransmissions due by `now` (or the first ClientHello of an active leg whose peer
    /// is known): datagrams for the leg's address.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if self.dtls.is_none() && self.peer().is_some() && self.setup.dtls.as_ref().is_some_and(|d| d.active) {
            self.start_dtls(now);
        }
        if let Some(d) = self.dtls.as_mut() {
            if d.poll_timeout().is_some_and(|t| t <= now) {
                d.handle_timeout(now);
            }
        }
        self.drain(&mut out);
        out
    }

    /// What the peer sent, in place: SRTP or SRTCP (by RFC 5761's payload-type rule) to
    /// plain.
    pub fn unprotect(&mut self, packet: &mut Vec<u8>, rtcp: bool) -> Result<(), Refusal> {
        let k = self.keys.as_mut().ok_or(Refusal::NotReady)?;
        if rtcp { k.rx_rtcp.unprotect(packet) } else { k.rx.unprotect(packet) }.map_err(Refusal::Srtp)
    }

    /// What goes to the peer, in place: plain to SRTP or SRTCP.
    pub fn protect(&mut self, packet: &mut Vec<u8>, rtcp: bool) -> Result<(), Refusal> {
        let k = self.keys.as_mut().ok_or(Refusal::NotReady)?;
        if rtcp { k.tx_rtcp.protect(packet) } else { k.tx.protect(packet) }.map_err(Refusal::Srtp)
    }
}

fn sdes_keys(s: &SdesSetup) -> Option<Keys> {
    let (rx, rx_rtcp) = s.rx.contexts()?;
    let (tx, tx_rtcp) = s.tx.contexts()?;
    Some(Keys { rx, rx_rtcp, tx, tx_rtcp })
}

#[cfg(test)]
mod tests;
