//! Trunk calls whose SDP waits for a remote relay's answer ([`Unanchored::Waiting`]): where
//! each stopped, so it goes on from there when the anchor names the call ready.

use std::collections::HashMap;
use std::time::Instant;

use pinhole_media::anchor::{MediaAnchor, MAX_WAITING, MAX_WAITING_PER_CALL};

use super::{B2bua, Leg, Phase};
use crate::message::Message;
use crate::transport::Flow;

/// Where a call's handling stopped to wait for its media.
pub(super) enum Resume {
    /// Sending the B leg's INVITE (with these credentials, after a challenge).
    BInvite(Option<(&'static str, String)>),
    /// Carrying an in-dialog request to the other leg.
    Bridge { leg: Leg, flow: Flow, msg: Message },
    /// Answering the phone with the B leg's 2xx (acknowledged already).
    Answer { flow: Flow, msg: Message },
    /// Relaying a provisional response with SDP to the phone.
    Provisional(Message),
    /// Relaying the response to a request carried across (a 2xx acknowledged already).
    Bridged { msg: Message, origin: Box<Message>, origin_flow: Flow, origin_leg: Leg },
}

/// Waiting calls by the Call-ID their media is anchored under (the A leg's).
#[derive(Default)]
pub(super) struct Waiting {
    by_call: HashMap<String, Vec<(u64, Resume)>>,
    count: usize,
}

impl B2bua {
    /// Keeps call `id`'s handling until its media is ready. `false`: too many wait already
    /// (the caller goes on without it).
    pub(super) fn wait_for_media(&mut self, id: u64, resume: Resume) -> bool {
        let Some(call) = self.calls.get(&id) else { return false };
        let w = &mut self.waiting;
        let queued = w.by_call.get(&call.a.call_id).map_or(0, Vec::len);
        if w.count >= MAX_WAITING || queued >= MAX_WAITING_PER_CALL {
            metrics::counter!("pinhole_media_waiting_refused_total").increment(1);
            return false;
        }
        w.by_call.entry(call.a.call_id.clone()).or_default().push((id, resume));
        w.count += 1;
        true
    }

    /// The anchor has the answer the call anchored as `call_id` waited for: its handling
    /// goes on where it stopped, unless the call moved on meanwhile.
    pub fn media_ready<M: MediaAnchor>(&mut self, now: Instant, call_id: &str, media: &mut M) {
        let Some(waiting) = self.waiting.by_call.remove(call_id) else { return };
        self.waiting.count -= waiting.len();
        let mut hung_up = false;
        for (id, resume) in waiting {
            let Some(call) = self.calls.get(&id) else { continue };
            let calling = call.phase == Phase::Calling && !call.cancelled;
            let bridging = matches!(call.phase, Phase::Answered | Phase::Confirmed);
            match resume {
                Resume::BInvite(auth) if calling => self.send_b_invite(now, id, media, auth),
                Resume::Provisional(msg) if calling => self.relay_provisional(now, id, &msg, media),
                Resume::Answer { flow, msg } if calling => self.answer_a(now, id, flow, &msg, media),
                Resume::Answer { .. } if (call.cancelled || call.phase == Phase::Ended) && !hung_up => {
                    // The phone gave up while the answer waited: the carrier's leg is up
                    // (we acknowledged its 2xx), so hang it up.
                    hung_up = true;
                    self.send_bye(now, id, Leg::B);
                }
                Resume::Bridge { leg, flow, msg } if bridging => self.bridge_request(now, id, leg, flow, msg, media),
                Resume::Bridged { msg, origin, origin_flow, origin_leg } if call.phase != Phase::Ended => {
                    self.relay_bridged_response(now, id, &msg, &origin, origin_flow, origin_leg, media)
                }
                _ => {}
            }
        }
    }
}
