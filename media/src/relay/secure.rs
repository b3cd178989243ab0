//! Which transport each side of a stream speaks, and what pinhole writes towards it when
//! it terminates them: plain RTP, SDES-SRTP, or WebRTC (ICE-lite and DTLS-SRTP).
//!
//! A stream is terminated when its two sides speak different profiles, or when either is
//! WebRTC (pinhole is the ICE-lite peer of every browser), or when signalling named the
//! recipient's profile and the sender's is secure (SRTP↔SRTP, with keys per leg). Else it
//! passes as before, its bytes untouched.

use std::net::IpAddr;
use std::sync::Arc;

use crate::dtls::{parse_fingerprint, Identity};
use crate::ice_lite::Credentials;
use crate::relay::{PerSide, Side};
use crate::sdes::{Crypto, Suite};
use crate::sdp::{Media, Profile, Transport};
use crate::secure::{DtlsSetup, IceSetup, LegSetup, SdesSetup};

/// What the relay knows of one side's transport.
#[derive(Debug, Clone, Default)]
pub(super) struct SideSec {
    /// The profile this side speaks, once the stream is terminated.
    pub profile: Option<Profile>,
    /// Our ICE credentials towards this side.
    pub ice_local: Option<Credentials>,
    /// The side's ufrag (its checks carry it).
    pub ice_remote: Option<String>,
    /// The side's DTLS certificate fingerprint.
    pub fingerprint: Option<[u8; 32]>,
    /// We are the DTLS client towards this side.
    pub dtls_active: bool,
    /// The side's SDES key (what it sends) and ours (what we send it).
    pub sdes_rx: Option<Crypto>,
    pub sdes_tx: Option<Crypto>,
    /// The side sends RTCP on the RTP port.
    pub mux: bool,
    pub mid: Option<String>,
}

fn random_byte() -> u8 {
    rand::random()
}

/// Why a secure stream cannot be set up: the SIP answer is 488 with this reason.
pub(super) type Refusal = &'static str;

/// Reads the sender's section into `sec` and decides the recipient's profile. Returns
/// whether the stream is terminated.
pub(super) fn negotiate(
    sec: &mut PerSide<SideSec>,
    side: Side,
    m: &Media,
    offer: bool,
    to: Option<Profile>,
    index: usize,
) -> Result<bool, Refusal> {
    let Some(mine) = Profile::of(m) else { return Ok(false) };
    if !m.is_active() {
        return Ok(sec[side].profile.is_some());
    }
    let other = side.other();
    let theirs = if offer {
        to.or(sec[other].profile).unwrap_or(if mine == Profile::WebRtc { Profile::Plain } else { mine })
    } else {
        sec[other].profile.unwrap_or(mine)
    };
    let terminated = mine != theirs
        || mine == Profile::WebRtc
        || sec[side].profile.is_some()
        || (to.is_some() && mine != Profile::Plain);
    if !terminated {
        return Ok(false);
    }
    let s = &mut sec[side];
    s.profile = Some(mine);
    s.mux = m.rtcp_mux || mine == Profile::WebRtc;
    if m.security.mid.is_some() {
        s.mid.clone_from(&m.security.mid);
    }
    match mine {
        Profile::WebRtc => {
            let ufrag = m.security.ice_ufrag.clone();
            if offer && s.ice_remote.is_some() && ufrag != s.ice_remote {
                // An ICE restart: the answerer's credentials change too (RFC 8839 §4.4.1.1.1).
                s.ice_local = None;
            }
            s.ice_remote = ufrag;
            if s.ice_remote.is_some() && s.ice_local.is_none() {
                s.ice_local = Some(Credentials::generate(random_byte));
            }
            s.fingerprint = Some(
                m.security
                    .fingerprint
                    .as_deref()
                    .and_then(parse_fingerprint)
                    .ok_or("no DTLS fingerprint (sha-256) in the SDP")?,
            );
            // The side's `passive` makes us the client; actpass, active or nothing: the server.
            s.dtls_active = m.security.setup.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("passive"));
            s.sdes_rx = None;
        }
        Profile::Sdes => {
            let lines = m.security.crypto.iter().filter_map(|l| Crypto::parse(l));
            if offer {
                let chosen = lines.into_iter().next().ok_or(
                    "no crypto suite negotiated: no a=crypto line offers AES_CM_128_HMAC_SHA1_80 or AEAD_AES_128_GCM",
                )?;
                let keep = s.sdes_tx.as_ref().is_some_and(|t| t.tag == chosen.tag && t.suite == chosen.suite);
                if !keep {
                    s.sdes_tx = Some(Crypto::generate(chosen.tag, chosen.suite, random_byte));
                }
                s.sdes_rx = Some(chosen);
            } else {
                let ours = s.sdes_tx.clone();
                let chosen = lines
                    .into_iter()
                    .find(|c| ours.as_ref().is_some_and(|o| o.tag == c.tag && o.suite == c.suite))
                    .ok_or("no crypto suite negotiated: the answer's a=crypto does not match pinhole's offer")?;
                s.sdes_rx = Some(chosen);
            }
        }
        Profile::Plain => {}
    }
    let sender_mid = sec[side].mid.clone();
    let r = &mut sec[other];
    if offer {
        r.profile = Some(theirs);
        if r.mid.is_none() {
            r.mid = Some(sender_mid.unwrap_or_else(|| index.to_string()));
        }
        match theirs {
            Profile::WebRtc => {
                r.mux = true;
                if r.ice_local.is_none() {
                    r.ice_local = Some(Credentials::generate(random_byte));
                }
            }
            Profile::Sdes => {
                if r.sdes_tx.is_none() {
                    r.sdes_tx = Some(Crypto::generate(1, Suite::AesCm128HmacSha1_80, random_byte));
                }
            }
            Profile::Plain => {}
        }
    }
    Ok(true)
}

/// The transport lines for the section pinhole sends to `to`'s side, which reaches us at
/// `addr:port`. `sender_mux`: the side the SDP came from muxes RTCP (offered to a plain or
/// SDES side, which may take it).
pub(super) fn transport(
    to: &SideSec,
    offer: bool,
    sender_mux: bool,
    identity: Option<&Arc<Identity>>,
    addr: IpAddr,
    port: u16,
) -> Result<Option<Transport>, Refusal> {
    let Some(profile) = to.profile else { return Ok(None) };
    let mut add = Vec::new();
    let mux = if offer { sender_mux } else { to.mux };
    match profile {
        Profile::WebRtc => {
            let identity = identity.ok_or("no DTLS certificate")?;
            if let Some(mid) = &to.mid {
                add.push(format!("mid:{mid}"));
            }
            if let Some(c) = &to.ice_local {
                add.push(format!("ice-ufrag:{}", c.ufrag));
                add.push(format!("ice-pwd:{}", c.pwd));
            }
            add.push(format!("fingerprint:{}", identity.fingerprint_attr()));
            let setup = match (offer, to.dtls_active) {
                (true, _) => "actpass",
                (false, true) => "active",
                (false, false) => "passive",
            };
            add.push(format!("setup:{setup}"));
            add.push("rtcp-mux".to_owned());
            if to.ice_local.is_some() {
                add.push(format!("candidate:1 1 UDP 2130706431 {addr} {port} typ host"));
                add.push("end-of-candidates".to_owned());
            }
        }
        Profile::Sdes => {
            let tx = to.sdes_tx.as_ref().ok_or("no SDES key")?;
            add.push(format!("crypto:{}", tx.value()));
            if mux {
                add.push("rtcp-mux".to_owned());
            }
        }
        Profile::Plain => {
            if mux {
                add.push("rtcp-mux".to_owned());
            }
        }
    }
    Ok(Some(Transport { proto: profile.proto().to_owned(), add, drop_feedback: profile == Profile::Plain }))
}

/// How the data plane secures the side: `None` for plain RTP. A secure side whose keys or
/// fingerprint are not known yet gets a leg that forwards nothing.
pub(super) fn leg_setup(s: &SideSec, identity: Option<&Arc<Identity>>) -> Option<LegSetup> {
    match s.profile? {
        Profile::Plain => None,
        Profile::Sdes => Some(LegSetup {
            sdes: match (&s.sdes_rx, &s.sdes_tx) {
                (Some(rx), Some(tx)) => Some(SdesSetup { rx: rx.clone(), tx: tx.clone() }),
                _ => None,
            },
            ..LegSetup::default()
        }),
        Profile::WebRtc => Some(LegSetup {
            ice: match (&s.ice_local, &s.ice_remote) {
                (Some(local), Some(remote)) => Some(IceSetup { local: local.clone(), remote_ufrag: remote.clone() }),
                _ => None,
            },
            dtls: match (s.fingerprint, identity) {
                (Some(fp), Some(id)) => {
                    Some(DtlsSetup { identity: id.clone(), peer_fingerprint: fp, active: s.dtls_active })
                }
                _ => None,
            },
            sdes: None,
        }),
    }
}
