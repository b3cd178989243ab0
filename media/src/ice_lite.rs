//! ICE-lite (RFC 8445 §2.5) for one leg of the relay facing a browser: the relay offers
//! host candidates on its own addresses with `a=ice-lite`, never checks, and answers the
//! browser's connectivity checks. Sans-IO: datagrams in, answers out.
//!
//! - **Credentials.** Each leg has its own ufrag (8 characters) and password (24, 144
//!   bits), made from the caller's randomness and put in the SDP pinhole sends. A check
//!   counts only with USERNAME `ours:theirs` (their ufrag from their SDP), a
//!   MESSAGE-INTEGRITY under our password and a FINGERPRINT (RFC 8445 §7.2.2).
//! - **Answers.** A counted check gets a Binding success response with its source in
//!   XOR-MAPPED-ADDRESS, signed with our password and fingerprinted: no larger than the
//!   check, and only to someone who knows the password. Anything else is dropped without
//!   a word and counted: a stranger gets nothing back, so nothing can be reflected.
//! - **Nomination.** A counted check with USE-CANDIDATE selects its source: the only
//!   address media of the leg may come from and go to, the latch. Checks from another
//!   address are answered (the browser probes every pair) but move nothing until one of
//!   them nominates; an ICE restart (new ufrags in a re-offer) keeps the selected address
//!   until a check under the new credentials nominates again, so media never stops.
//! - **Role.** A lite agent is always controlled; a check claiming ICE-CONTROLLED (two
//!   controlled agents) is refused as a role conflict would be, and counted.

use std::net::SocketAddr;

use stun_rs::attributes::ice::{IceControlled, IceControlling, Priority, UseCandidate};
use stun_rs::attributes::stun::{Fingerprint, MessageIntegrity, UserName, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, StunAttribute, StunMessageBuilder};

use crate::stun::{encode, verified};

/// Characters of `ice-char` (RFC 8839 §5.4).
const ICE_CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const UFRAG_LEN: usize = 8;
const PWD_LEN: usize = 24;
// RFC 8445 §5.3: at least 128 bits of randomness in the password (6 bits a character).
const _: () = assert!(PWD_LEN * 6 >= 128);

/// A leg's short-term credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub ufrag: String,
    pub pwd: String,
}

impl Credentials {
    /// Fresh credentials from `random` (called for each character; use a CSPRNG).
    pub fn generate(mut random: impl FnMut() -> u8) -> Credentials {
        let mut take = |n: usize| -> String { (0..n).map(|_| ICE_CHARS[usize::from(random() & 63)] as char).collect() };
        Credentials { ufrag: take(UFRAG_LEN), pwd: take(PWD_LEN) }
    }
}

/// Why a datagram got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a STUN Binding request at all.
    NotACheck,
    /// No or the wrong USERNAME (another leg's, or a stale ufrag).
    Username,
    /// MESSAGE-INTEGRITY missing or wrong, or no FINGERPRINT.
    Integrity,
    /// The sender claims the controlled role too.
    RoleConflict,
}

/// What a checked datagram came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Send `bytes` back to the check's source; `nominated`: it is the leg's address now.
    Answer {
        bytes: Vec<u8>,
        nominated: bool,
    },
    Refused(Refused),
}

/// One leg's ICE-lite state.
#[derive(Debug)]
pub struct IceLite {
    local: Credentials,
    remote_ufrag: Option<String>,
    selected: Option<SocketAddr>,
}

impl IceLite {
    pub fn new(local: Credentials) -> IceLite {
        IceLite { local, remote_ufrag: None, selected: None }
    }

    /// Our credentials, for the SDP (`a=ice-ufrag`, `a=ice-pwd`).
    pub fn local(&self) -> &Credentials {
        &self.local
    }

    /// The peer's ufrag from its SDP. A new one (an ICE restart) takes effect at once;
    /// the selected address stays until a check under the new credentials nominates.
    pub fn set_remote_ufrag(&mut self, ufrag: &str) {
        self.remote_ufrag = Some(ufrag.to_owned());
    }

    /// Restarts with `local` credentials (our side of an ICE restart).
    pub fn restart(&mut self, local: Credentials) {
        self.local = local;
    }

    /// The address checks nominated: where the leg's media may come from and go to.
    pub fn selected(&self) -> Option<SocketAddr> {
        self.selected
    }

    /// A datagram from `from` on the leg's port that looks like STUN.
    pub fn handle(&mut self, from: SocketAddr, data: &[u8]) -> Checked {
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(data) else {
            return Checked::Refused(Refused::NotACheck);
        };
        if msg.method() != BINDING || msg.class() != MessageClass::Request {
            return Checked::Refused(Refused::NotACheck);
        }
        let Some(theirs) = self.remote_ufrag.as_deref() else {
            return Checked::Refused(Refused::Username);
        };
        let expected = format!("{}:{theirs}", self.local.ufrag);
        if !matches!(msg.get::<UserName>(), Some(StunAttribute::UserName(u)) if u.as_str() == expected) {
            return Checked::Refused(Refused::Username);
        }
        if msg.get::<Fingerprint>().is_none() || !verified(data, &self.local.pwd) {
            return Checked::Refused(Refused::Integrity);
        }
        if msg.get::<IceControlled>().is_some() {
            return Checked::Refused(Refused::RoleConflict);
        }
        let nominated = msg.get::<UseCandidate>().is_some();
        if nominated {
            self.selected = Some(from);
        }
        let Ok(key) = stun_rs::HMACKey::new_short_term(&self.local.pwd) else {
            return Checked::Refused(Refused::Integrity);
        };
        let answer = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(*msg.transaction_id())
            .with_attribute(XorMappedAddress::from(from))
            .with_attribute(MessageIntegrity::new(key))
            .with_attribute(Fingerprint::default())
            .build();
        match encode(&answer) {
            Some(bytes) => Checked::Answer { bytes, nominated },
            None => Checked::Refused(Refused::Integrity),
        }
    }
}

/// A check as a browser sends it (USERNAME, PRIORITY, ICE-CONTROLLING or, with
/// `controlled`, ICE-CONTROLLED, USE-CANDIDATE when `nominate`, MESSAGE-INTEGRITY under
/// `pwd`, FINGERPRINT). An ICE-lite agent sends none: this is for tests, fuzzing and the
/// benchmarks, which play the browser.
pub fn browser_check(user: &str, pwd: &str, nominate: bool, controlled: bool, tid: [u8; 12]) -> Option<Vec<u8>> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(stun_rs::TransactionId::from(tid))
        .with_attribute(UserName::new(user).ok()?)
        .with_attribute(Priority::from(1_853_817_087));
    b = if controlled { b.with_attribute(IceControlled::from(42)) } else { b.with_attribute(IceControlling::from(42)) };
    if nominate {
        b = b.with_attribute(UseCandidate::default());
    }
    let key = stun_rs::HMACKey::new_short_term(pwd).ok()?;
    encode(&b.with_attribute(MessageIntegrity::new(key)).with_attribute(Fingerprint::default()).build())
}

#[cfg(test)]
pub(crate) mod tests;
