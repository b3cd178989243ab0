//! The proxy's side of media anchoring: SDP bodies in requests and responses go through
//! the [`MediaAnchor`], calls are released when their dialog ends or fails, and a call the
//! relay ends (media timeout) is torn down with a BYE to each side.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use pinhole_media::anchor::{MediaAnchor, SdpIn, Unanchored, MAX_WAITING, MAX_WAITING_PER_CALL};

use super::{Owner, Proxy, BRANCH_PREFIX};
use crate::message::{HeaderName, Message, Method, Rejection};
use crate::transport::Flow;
use rand::Rng;

/// What the proxy remembers of an answered call, to end it when the relay says so.
#[derive(Debug, Clone)]
pub(super) struct Dialog {
    a_flow: Flow,
    b_flow: Flow,
    /// From of the INVITE (A's identity, with tag) and To of the 2xx (B's, with tag).
    a_from: String,
    b_to: String,
    a_contact: String,
    b_contact: String,
    a_tag: String,
    a_cseq: u32,
    b_cseq: u32,
}

/// A message whose SDP waits for a remote relay (see [`Unanchored::Waiting`]); it is
/// handled again from where it stopped when the anchor names its call ready.
pub(super) enum MediaWait {
    /// A request being routed, on its server transaction.
    Request { key: String, flow: Flow, msg: Message, auth_user: Option<String> },
    /// A response going up server transaction `sk`.
    Response { sk: String, msg: Message, from: Flow },
    /// An ACK (a late offer's answer), forwarded without a transaction.
    Ack { flow: Flow, msg: Message },
}

/// The messages waiting for media, by Call-ID.
#[derive(Default)]
pub(super) struct MediaWaiting {
    by_call: HashMap<String, Vec<MediaWait>>,
    count: usize,
}

/// A request's SDP not anchored: refused with this response, or waiting.
pub(super) enum NotAnchored {
    Refused(Rejection),
    Waiting,
}

/// Does this message carry an SDP body?
pub(crate) fn sdp_body(msg: &Message) -> Option<&[u8]> {
    let body = msg.body_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let sdp_type =
        msg.header(HeaderName::ContentType).map(|t| t.trim().to_ascii_lowercase().starts_with("application/sdp"));
    match sdp_type {
        Some(true) => Some(body),
        Some(false) => None,
        None => body.starts_with(b"v=0").then_some(body),
    }
}

/// An SDP body from the party tagged `tag` on `from`, going towards `to` when known.
fn between<'a>(call_id: &'a str, tag: &'a str, body: &'a [u8], from: Flow, to: Option<Flow>) -> SdpIn<'a> {
    SdpIn {
        call_id,
        sender_tag: tag,
        sdp: body,
        signalling_ip: from.remote.ip(),
        to: to.map(|f| f.remote.ip()),
        hide: false,
        to_browser: to.is_some_and(|f| f.transport.is_websocket()),
        record: false,
    }
}

/// The user part of a From or To value (`"A" <sip:alice@host>;tag=…` → `alice`).
fn uri_user(value: &str) -> Option<&str> {
    let at = value.find("sip:").map(|i| i + 4).or_else(|| value.find("sips:").map(|i| i + 5))?;
    let rest = &value[at..];
    let end = rest.find(['@', '>', ';'])?;
    (rest.as_bytes().get(end) == Some(&b'@')).then(|| &rest[..end])
}

pub(crate) fn contact_uri(msg: &Message) -> Option<String> {
    let v = msg.value_texts(HeaderName::Contact).into_iter().next()?;
    Some(match (v.find('<'), v.find('>')) {
        (Some(s), Some(e)) if s < e => v[s + 1..e].to_owned(),
        _ => v.split(';').next().unwrap_or(v).trim().to_owned(),
    })
}

impl<M: MediaAnchor> Proxy<M> {
    /// Whether the recording policy names this message's caller (From) or callee (To).
    fn recorded(&self, msg: &Message) -> bool {
        let users = &self.cfg.record_users;
        !users.is_empty()
            && [HeaderName::From, HeaderName::To]
                .into_iter()
                .any(|h| msg.header(h).and_then(uri_user).is_some_and(|u| users.iter().any(|r| r == u)))
    }

    /// Anchors the SDP of a request (offer in INVITE/UPDATE, either in PRACK/ACK) and
    /// returns the body to forward; errors carry the response to send, or say it waits.
    pub(super) fn media_request(
        &mut self,
        now: Instant,
        flow: Flow,
        msg: &Message,
        to: Option<Flow>,
    ) -> Result<Option<Vec<u8>>, NotAnchored> {
        if !self.media.anchoring() {
            return Ok(None);
        }
        let method = msg.method().cloned().unwrap_or(Method::Other(String::new()));
        if !matches!(method, Method::Invite | Method::Update | Method::Prack | Method::Ack) {
            return Ok(None);
        }
        let Some(body) = sdp_body(msg) else {
            return Ok(None);
        };
        let (Some(call_id), Some(tag)) = (msg.call_id(), msg.tag(HeaderName::From)) else {
            return Ok(None);
        };
        let sdp_in = SdpIn { record: self.recorded(msg), ..between(call_id, tag, body, flow, to) };
        match self.media.anchor_sdp(now, &sdp_in) {
            Ok(b) => Ok(Some(b)),
            Err(Unanchored::Waiting) => Err(NotAnchored::Waiting),
            Err(Unanchored::Refused(r)) => Err(NotAnchored::Refused(Rejection::new(r.code, r.reason))),
        }
    }

    /// Anchors the SDP of a 1xx/2xx response coming from `from`; `Ok(None)` leaves the
    /// body, `Err` says the response must wait.
    pub(super) fn media_response(
        &mut self,
        now: Instant,
        from: Flow,
        to: Option<Flow>,
        msg: &Message,
    ) -> Result<Option<Vec<u8>>, Unanchored> {
        if !self.media.anchoring() {
            return Ok(None);
        }
        let (Some(code), Some((_, method))) = (msg.status(), msg.cseq()) else { return Ok(None) };
        if code >= 300 || !matches!(method, Method::Invite | Method::Update | Method::Prack) {
            return Ok(None);
        }
        let Some(body) = sdp_body(msg) else { return Ok(None) };
        let (Some(call_id), Some(tag)) = (msg.call_id(), msg.tag(HeaderName::To)) else { return Ok(None) };
        let sdp_in = SdpIn { record: self.recorded(msg), ..between(call_id, tag, body, from, to) };
        match self.media.anchor_sdp(now, &sdp_in) {
            Ok(b) => Ok(Some(b)),
            Err(Unanchored::Waiting) => Err(Unanchored::Waiting),
            Err(Unanchored::Refused(r)) => {
                tracing::warn!(call_id, error = %r.reason, "answer not anchored; forwarded as is");
                Ok(None)
            }
        }
    }

    /// Keeps a message until its call's relay answers. `false`: too many wait already
    /// (the caller goes on without anchoring, or refuses).
    pub(super) fn wait_for_media(&mut self, msg_call_id: Option<&str>, wait: MediaWait) -> bool {
        let Some(call_id) = msg_call_id else { return false };
        let w = &mut self.media_waiting;
        if w.count >= MAX_WAITING {
            metrics::counter!("pinhole_media_waiting_refused_total").increment(1);
            return false;
        }
        let queue = w.by_call.entry(call_id.to_owned()).or_default();
        if queue.len() >= MAX_WAITING_PER_CALL {
            metrics::counter!("pinhole_media_waiting_refused_total").increment(1);
            return false;
        }
        queue.push(wait);
        w.count += 1;
        true
    }

    /// Messages waiting for media now.
    pub fn media_waiting(&self) -> usize {
        self.media_waiting.count
    }

    /// Handles again every message whose call the anchor names ready (its relay answered
    /// or gave up): each goes on from where it stopped, and may wait again for a later
    /// relay of a chain.
    pub fn resume_media(&mut self, now: Instant) {
        while let Some(call_id) = self.media.poll_ready() {
            self.b2bua.media_ready(now, &call_id, &mut self.media);
            let Some(waiting) = self.media_waiting.by_call.remove(&call_id) else { continue };
            self.media_waiting.count -= waiting.len();
            for w in waiting {
                match w {
                    MediaWait::Request { key, flow, msg, auth_user } => {
                        // Given up meanwhile (a CANCEL, a transaction timeout): nothing to route.
                        if !self.server_txs.contains_key(&key) {
                            continue;
                        }
                        let Some(method) = msg.method().cloned() else { continue };
                        let routing = self.route_info(&msg);
                        self.route_request(now, &key, flow, &msg, &method, routing, auth_user);
                    }
                    MediaWait::Response { sk, msg, from } => self.forward_response(now, &sk, &msg, Some(from)),
                    MediaWait::Ack { flow, msg } => self.forward_ack(now, flow, &msg),
                }
            }
        }
    }

    /// A dialog-ending request (BYE) or a failed/cancelled initial INVITE releases the media.
    pub(super) fn media_end(&mut self, now: Instant, call_id: &str) {
        let path = self.media.path(call_id, now);
        if self.media.release(call_id) {
            tracing::info!(call_id, path = path.unwrap_or("-"), "relay session released");
        }
        self.dialogs.remove(call_id);
        self.punch_plans.remove(call_id);
        self.agent_legs.remove(call_id);
    }

    /// Remembers an answered call (2xx to an initial INVITE going up `a_flow`).
    pub(super) fn media_dialog(&mut self, request: &Message, a_flow: Flow, response: &Message, b_flow: Flow) {
        let Some(call_id) = request.call_id() else {
            return;
        };
        if !self.media.anchors(call_id) {
            return;
        }
        let d = Dialog {
            a_flow,
            b_flow,
            a_from: request.header(HeaderName::From).unwrap_or_default().to_owned(),
            b_to: response.header(HeaderName::To).unwrap_or_default().to_owned(),
            a_contact: contact_uri(request).unwrap_or_default(),
            b_contact: contact_uri(response).unwrap_or_default(),
            a_tag: request.tag(HeaderName::From).unwrap_or_default().to_owned(),
            a_cseq: request.cseq().map_or(1, |(n, _)| n),
            b_cseq: 0,
        };
        self.dialogs.insert(call_id.to_owned(), d);
    }

    /// Tracks CSeq numbers of in-dialog requests so a relay-initiated BYE is in sequence.
    pub(super) fn media_seen_request(&mut self, msg: &Message) {
        let (Some(call_id), Some((n, _)), Some(tag)) = (msg.call_id(), msg.cseq(), msg.tag(HeaderName::From)) else {
            return;
        };
        if let Some(d) = self.dialogs.get_mut(call_id) {
            if d.a_tag == tag {
                d.a_cseq = d.a_cseq.max(n);
            } else {
                d.b_cseq = d.b_cseq.max(n);
            }
        }
    }

    /// The relay gave up on a call (media timeout, …): end its dialog with a BYE to each
    /// side.
    pub fn media_call_ended(&mut self, now: Instant, call_id: &str) {
        self.b2bua.media_ended(now, call_id, &mut self.media);
        if let Some(d) = self.dialogs.remove(call_id) {
            self.send_bye(now, call_id, &d, true);
            self.send_bye(now, call_id, &d, false);
        }
    }

    fn send_bye(&mut self, now: Instant, call_id: &str, d: &Dialog, to_b: bool) {
        let (flow, uri, from, to, cseq) = if to_b {
            (d.b_flow, &d.b_contact, &d.a_from, &d.b_to, d.a_cseq.saturating_add(1))
        } else {
            (d.a_flow, &d.a_contact, &d.b_to, &d.a_from, d.b_cseq.saturating_add(1))
        };
        let Some(iface) = self.interface_index(flow.transport, flow.local, flow.remote) else {
            return;
        };
        let branch = format!("{BRANCH_PREFIX}bye.{:016x}", self.rng.gen::<u64>());
        let req = format!(
            "BYE {uri} SIP/2.0\r\nVia: SIP/2.0/{} {};branch={branch}\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} BYE\r\nReason: SIP;cause=408;text=\"Media Timeout\"\r\nContent-Length: 0\r\n\r\n",
            flow.transport.via_token(),
            self.cfg.interfaces[iface].host_port(),
        );
        if let Ok(sent) = Message::parse(Bytes::from(req)) {
            self.start_client(now, branch, Owner::Local, flow, sent);
        }
    }

    /// Where media is anchored.
    pub fn media(&self) -> &M {
        &self.media
    }

    pub fn media_mut(&mut self) -> &mut M {
        &mut self.media
    }
}
