//! The interface a signalling core anchors media through: SDP in, rewritten SDP out, and
//! calls released when their dialog ends. The SIP proxy is generic over it and knows
//! nothing of the relay's ports, latches or timers; `Option<Relay>` implements it (`None`:
//! media passes untouched). Calls the relay ends on its own come out of the relay as
//! events, and the driver above both tells the proxy to end their dialogs.

use std::net::IpAddr;
use std::time::Instant;

use crate::relay::{EndReason, MediaPath, Options, Relay, RelayError};

/// Why an SDP could not be anchored, as the SIP response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRefusal {
    pub code: u16,
    pub reason: String,
}

/// Messages a signalling core keeps waiting at once for their media ([`Unanchored::Waiting`]),
/// over all calls and per call; past either it goes on without waiting (a request is
/// refused with 503, a response forwarded with its SDP as it came).
pub const MAX_WAITING: usize = 4096;
pub const MAX_WAITING_PER_CALL: usize = 16;

/// Why an SDP body was not anchored (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unanchored {
    /// Not at all: answer with this response.
    Refused(MediaRefusal),
    /// Not yet: a remote relay was asked and has not answered. The message waits and is
    /// handled again once [`MediaAnchor::poll_ready`] names its call; the answer is kept
    /// for it meanwhile, so the same SDP then anchors at once.
    Waiting,
}

impl Unanchored {
    /// The response for a caller that cannot wait (its anchor is local and never does).
    pub fn into_refusal(self) -> MediaRefusal {
        match self {
            Unanchored::Refused(r) => r,
            Unanchored::Waiting => MediaRefusal { code: 500, reason: "Media Anchoring Unfinished".into() },
        }
    }
}

impl From<MediaRefusal> for Unanchored {
    fn from(r: MediaRefusal) -> Self {
        Unanchored::Refused(r)
    }
}

/// An SDP body to anchor: from the party tagged `sender_tag`, whose signalling came from
/// `signalling_ip`, going to the party at `to` when known (its address family picks the
/// relay's; a relay fleet picks relays near both).
#[derive(Debug, Clone, Copy)]
pub struct SdpIn<'a> {
    pub call_id: &'a str,
    pub sender_tag: &'a str,
    pub sdp: &'a [u8],
    pub signalling_ip: IpAddr,
    pub to: Option<IpAddr>,
    /// Hide the sender's address everywhere in the SDP, its `o=` line too: for a B2BUA's
    /// legs, where the other side must not learn it.
    pub hide: bool,
    /// The recipient is a browser (its signalling comes over a WebSocket): its media is
    /// WebRTC, whatever the sender speaks.
    pub to_browser: bool,
    /// Record the call's media (the recording policy names its caller, callee or route).
    pub record: bool,
}

pub trait MediaAnchor {
    /// Whether SDP bodies are anchored at all.
    fn anchoring(&self) -> bool;

    /// Anchors an SDP body (see [`SdpIn`]); returns the body to forward.
    fn anchor_sdp(&mut self, now: Instant, s: &SdpIn<'_>) -> Result<Vec<u8>, Unanchored>;

    /// A call some of whose messages wait ([`Unanchored::Waiting`]) has its answer, or its
    /// relay gave up: handle them again. Until `None`.
    fn poll_ready(&mut self) -> Option<String> {
        None
    }

    /// Before a new call's first SDP: what the caller's and the callee's agents measured to
    /// the relays (`Pinhole-RTT` values), for an anchor that picks a relay per call.
    fn prefer(&mut self, _call_id: &str, _caller: Option<&str>, _callee: Option<&str>) {}

    /// The call's dialog ended or failed: free its media.
    fn release(&mut self, call_id: &str) -> bool;

    /// Whether this call's media is anchored.
    fn anchors(&self, call_id: &str) -> bool;

    /// Which way the call's media goes now (`relay`, `direct`, `quiet`), when anchored.
    fn path(&self, _call_id: &str, _now: Instant) -> Option<&'static str> {
        None
    }

    /// Packets and bytes the relay carried for the call so far (both ways, RTP and RTCP).
    fn counts(&self, _call_id: &str) -> Option<(u64, u64)> {
        None
    }

    /// What the relay measured of the call's media quality so far.
    fn quality(&self, _call_id: &str) -> Option<crate::quality::CallQuality> {
        None
    }

    /// Frees the call's media as [`Self::release`] does and says what the relay carried for
    /// it, when that is known (a remote relay tells it in its reply to the delete).
    fn release_counting(&mut self, call_id: &str) -> Option<(u64, u64)> {
        let counts = self.counts(call_id);
        self.release(call_id);
        counts
    }
}

impl MediaAnchor for Option<Relay> {
    fn anchoring(&self) -> bool {
        self.is_some()
    }

    /// SDP through the relay, when there is one; refusals as SIP responses.
    fn anchor_sdp(&mut self, now: Instant, s: &SdpIn<'_>) -> Result<Vec<u8>, Unanchored> {
        let Some(relay) = self else { return Ok(s.sdp.to_vec()) };
        let opts = Options {
            to_v6: s.to.map(|ip| ip.is_ipv6()),
            replace_origin: s.hide,
            to_profile: s.to_browser.then_some(crate::sdp::Profile::WebRtc),
            record: s.record,
            ..Options::default()
        };
        relay.on_sdp(now, s.call_id, s.sender_tag, s.sdp, Some(s.signalling_ip), opts).map_err(|e| {
            let (code, reason) = match e {
                RelayError::LoadLimit => (503, "Media Relay At Session Limit".to_owned()),
                RelayError::PortsExhausted => (503, "Media Relay Out Of Ports".to_owned()),
                RelayError::TooManyStreams(n) => (488, format!("Not Acceptable Here - More Than {n} Media Streams")),
                RelayError::Sdp(e) => (488, format!("Not Acceptable Here - {e}")),
                RelayError::UnknownCall => (488, "Not Acceptable Here - Unknown Call".to_owned()),
                RelayError::Security(why) => (488, format!("Not Acceptable Here - {why}")),
            };
            Unanchored::Refused(MediaRefusal { code, reason })
        })
    }

    fn release(&mut self, call_id: &str) -> bool {
        self.as_mut().is_some_and(|r| r.delete(call_id))
    }

    fn anchors(&self, call_id: &str) -> bool {
        self.as_ref().is_some_and(|r| r.has_call(call_id))
    }

    fn counts(&self, call_id: &str) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let streams = self.as_ref()?.stats(call_id)?;
        let all = streams.iter().flat_map(|s| s.iter());
        Some(all.fold((0, 0), |(p, b), st| (p + st.packets.load(Relaxed), b + st.bytes.load(Relaxed))))
    }

    fn path(&self, call_id: &str, now: Instant) -> Option<&'static str> {
        self.as_ref()?.media_path(call_id, now).map(MediaPath::label)
    }

    fn quality(&self, call_id: &str) -> Option<crate::quality::CallQuality> {
        self.as_ref()?.quality(call_id).filter(|q| !q.directions.is_empty())
    }
}

impl EndReason {
    /// The metric label and log word for this reason.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::MediaTimeout => "media",
            EndReason::OfferTimeout => "offer",
            EndReason::MaxDuration => "duration",
        }
    }
}
