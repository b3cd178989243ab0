//! rtpengine's ng control protocol as Kamailio's rtpengine module speaks it, sans-IO:
//! `<cookie> <dictionary>` in (bencode, or JSON over UDP), the reply out. Commands: ping,
//! offer, answer, delete, query, list, statistics; flags, replace, ICE, direction and
//! interfaces. Replies are cached by cookie for [`REPLY_CACHE`] (bounded in entries and
//! bytes), so a retransmitted request gets the identical reply and is not executed twice,
//! over UDP and TCP alike.
//!
//! ```no_run
//! # use std::time::Instant;
//! # use pinhole_media::ng_server::NgServer;
//! # use pinhole_media::relay::Relay;
//! # fn recv() -> Vec<u8> { unimplemented!() }
//! # fn send(_: &[u8]) {}
//! let mut ng = NgServer::new(Instant::now(), 1_700_000_000);
//! let mut relay: Option<Relay> = None; // Some when the relay is on
//! loop {
//!     if let Some(reply) = ng.handle(Instant::now(), relay.as_mut(), &recv()) {
//!         send(&reply);
//!     }
//! }
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::latch::LatchMode;
use crate::ng::{from_json, split_cookie, to_json, Bencode, NgError, MAX_COOKIE};
use crate::relay::{CallInfo, Component, MediaPath, Options, Relay, RelayError, Side};
use crate::sdp::Profile;
use crate::stats::StreamStats;

/// How long a reply is kept for retransmissions of its request.
pub const REPLY_CACHE: Duration = Duration::from_secs(30);

/// Flags pinhole implements (or whose behaviour is its default).
const KNOWN_FLAGS: &[&str] = &[
    "trust-address",
    "sip-source-address",
    "symmetric",
    "asymmetric",
    "strict-source",
    "port-latching",
    "loop-protect",
    "fast",
    // Always so towards a browser: pinhole writes a=mid and muxes RTCP there.
    "generate-mid",
    "rtcp-mux-offer",
    "rtcp-mux-require",
    "rtcp-mux-accept",
    "no-rtcp-attribute",
];

/// Features pinhole does not have: accepted with a warning naming them, never ignored.
const UNSUPPORTED_KEYS: &[&str] = &["transcode", "codec", "T.38", "T38", "media-echo", "xmlrpc-callback", "metadata"];

/// Most replies cached, and most bytes (cookies and replies) they may hold; past either
/// the oldest are forgotten early.
pub const REPLY_CACHE_ENTRIES: usize = 65_536;
pub const REPLY_CACHE_BYTES: usize = 64 << 20;

/// Replies by cookie, forgotten in the order they were made once older than REPLY_CACHE,
/// or earlier when the cache is over its entry or byte bound.
#[derive(Default)]
struct ReplyCache {
    replies: HashMap<Vec<u8>, Vec<u8>>,
    order: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

impl ReplyCache {
    fn expire(&mut self, now: Instant) {
        while let Some((t, _)) = self.order.front() {
            let full = self.order.len() > REPLY_CACHE_ENTRIES || self.bytes > REPLY_CACHE_BYTES;
            if now.duration_since(*t) < REPLY_CACHE && !full {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, cookie)) = self.order.pop_front() {
            if let Some(r) = self.replies.remove(&cookie) {
                self.bytes -= cookie.len() + r.len();
            }
        }
    }

    fn insert(&mut self, now: Instant, cookie: &[u8], reply: Vec<u8>) {
        self.bytes += cookie.len() + reply.len();
        if let Some(old) = self.replies.insert(cookie.to_vec(), reply) {
            self.bytes -= cookie.len() + old.len();
        }
        self.order.push_back((now, cookie.to_vec()));
        self.expire(now);
    }
}

/// Largest ng message buffered on a stream before the connection is refused.
pub const MAX_STREAM_BUFFER: usize = 1 << 20;

/// The wall clock at an instant, to report times as rtpengine does (unix seconds).
#[derive(Debug, Clone, Copy)]
struct Clock {
    epoch: Instant,
    unix_epoch: u64,
}

impl Clock {
    fn unix(self, now: Instant, t: Instant) -> i64 {
        let wall = self.unix_epoch + now.saturating_duration_since(self.epoch).as_secs();
        i64::try_from(wall.saturating_sub(now.saturating_duration_since(t).as_secs())).unwrap_or(i64::MAX)
    }
}

/// Why a stream must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NgStreamError {
    #[error("no cookie within 256 bytes: not ng")]
    NoCookie,
    #[error("message larger than 1 MiB")]
    TooLarge,
    #[error("{0}")]
    Bencode(NgError),
}

/// The ng protocol engine: one per listener set, owning the reply cache.
pub struct NgServer {
    cache: ReplyCache,
    clock: Clock,
}

impl NgServer {
    /// `unix_now` is the wall clock at `now`.
    pub fn new(now: Instant, unix_now: u64) -> NgServer {
        NgServer { cache: ReplyCache::default(), clock: Clock { epoch: now, unix_epoch: unix_now } }
    }

    /// One datagram in, its reply out (`None`: not ng — no cookie, or one longer than
    /// [`MAX_COOKIE`] — dropped and counted).
    pub fn handle(&mut self, now: Instant, relay: Option<&mut Relay>, datagram: &[u8]) -> Option<Vec<u8>> {
        self.cache.expire(now);
        let Ok((cookie, payload)) = split_cookie(datagram) else {
            metrics::counter!("pinhole_ng_garbage_total").increment(1);
            return None;
        };
        if let Some(reply) = self.cache.replies.get(cookie) {
            return Some(reply.clone());
        }
        let mut reply = cookie.to_vec();
        reply.push(b' ');
        reply.extend_from_slice(&respond(self.clock, now, relay, payload));
        self.cache.insert(now, cookie, reply.clone());
        Some(reply)
    }

    /// ng over TCP: `<cookie> <bencoded dictionary>` back to back. Consumes every whole
    /// message at the front of `buf` and returns their replies; a partial message stays.
    /// An error means the stream is not ng and must be closed.
    pub fn handle_stream(
        &mut self,
        now: Instant,
        mut relay: Option<&mut Relay>,
        buf: &mut Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, NgStreamError> {
        self.cache.expire(now);
        let mut replies = Vec::new();
        loop {
            let Some(sp) = buf.iter().take(MAX_COOKIE + 1).position(|&b| b == b' ') else {
                if buf.len() > MAX_COOKIE {
                    metrics::counter!("pinhole_ng_garbage_total").increment(1);
                    return Err(NgStreamError::NoCookie);
                }
                return Ok(replies);
            };
            let used = match Bencode::decode_prefix(&buf[sp + 1..]) {
                Ok((_, used)) => used,
                Err(NgError::Truncated) if buf.len() < MAX_STREAM_BUFFER => return Ok(replies),
                Err(NgError::Truncated) => return Err(NgStreamError::TooLarge),
                Err(e) => {
                    metrics::counter!("pinhole_ng_garbage_total").increment(1);
                    return Err(NgStreamError::Bencode(e));
                }
            };
            let (cookie, payload) = (&buf[..sp], &buf[sp + 1..sp + 1 + used]);
            let reply = match self.cache.replies.get(cookie) {
                Some(r) => r.clone(),
                None => {
                    let mut reply = cookie.to_vec();
                    reply.push(b' ');
                    reply.extend_from_slice(&respond(self.clock, now, relay.as_deref_mut(), payload));
                    self.cache.insert(now, cookie, reply.clone());
                    reply
                }
            };
            replies.push(reply);
            buf.drain(..sp + 1 + used);
        }
    }
}

/// The encoded reply to one message body: bencode, or JSON for a JSON dictionary.
fn respond(clock: Clock, now: Instant, relay: Option<&mut Relay>, payload: &[u8]) -> Vec<u8> {
    if payload.first() == Some(&b'{') {
        let body = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v @ serde_json::Value::Object(_)) => command(clock, now, relay, &from_json(&v)),
            Ok(_) => error("message is not a dictionary"),
            Err(e) => {
                metrics::counter!("pinhole_ng_garbage_total").increment(1);
                error(&format!("invalid JSON: {e}"))
            }
        };
        return serde_json::to_vec(&to_json(&body)).unwrap_or_default();
    }
    let body = match Bencode::decode(payload) {
        Ok(msg @ Bencode::Dict(_)) => command(clock, now, relay, &msg),
        Ok(_) => error("message is not a dictionary"),
        Err(e) => {
            metrics::counter!("pinhole_ng_garbage_total").increment(1);
            error(&format!("invalid bencode: {e}"))
        }
    };
    let mut out = Vec::new();
    body.encode(&mut out);
    out
}

fn error(reason: &str) -> Bencode {
    Bencode::dict(vec![("result", Bencode::str("error")), ("error-reason", Bencode::str(reason))])
}

fn ok(mut pairs: Vec<(&str, Bencode)>) -> Bencode {
    pairs.insert(0, ("result", Bencode::str("ok")));
    Bencode::dict(pairs)
}

/// A key in either spelling Kamailio uses ("call-id" or "call id").
fn get<'a>(msg: &'a Bencode, name: &str) -> Option<&'a Bencode> {
    msg.get(name).or_else(|| msg.get(&name.replace('-', " ")))
}

fn key<'a>(msg: &'a Bencode, name: &str) -> Option<&'a str> {
    get(msg, name).and_then(Bencode::as_str)
}

fn strings(v: Option<&Bencode>) -> Vec<String> {
    match v {
        Some(Bencode::List(l)) => l.iter().filter_map(Bencode::as_str).map(str::to_owned).collect(),
        Some(b) => b.as_str().map(|s| vec![s.to_owned()]).unwrap_or_default(),
        None => vec![],
    }
}

/// Options from flags, ICE, replace and interface keys; unknown or unsupported features
/// are collected as warnings.
fn options(msg: &Bencode, relay: &Relay, warnings: &mut Vec<String>) -> (Options, bool) {
    let mut o = Options::default();
    let mut trust_address = false;
    let mut webrtc = false;
    for f in strings(get(msg, "flags")) {
        let lf = f.to_ascii_lowercase().replace(' ', "-");
        match lf.as_str() {
            "asymmetric" => o.mode = LatchMode::Asymmetric,
            "symmetric" => o.mode = LatchMode::Symmetric,
            "trust-address" => trust_address = true,
            // rtpengine's one-word WebRTC: ICE=force, UDP/TLS/RTP/SAVPF, rtcp-mux, mid.
            "webrtc" => webrtc = true,
            "record-call" => o.record = true,
            _ if KNOWN_FLAGS.contains(&lf.as_str()) => {}
            _ => warnings.push(format!("unsupported flag '{f}' ignored")),
        }
    }
    for r in strings(get(msg, "replace")) {
        match r.to_ascii_lowercase().replace(' ', "-").as_str() {
            "origin" => o.replace_origin = true,
            // pinhole always rewrites the session c= line and bumps the version.
            "session-connection" | "sdp-version" | "session-name" | "username" => {}
            _ => warnings.push(format!("unsupported replace '{r}' ignored")),
        }
    }
    // rtpengine's `record call` key: "yes" / "on" records, anything else does not.
    if let Some(v) = key(msg, "record-call") {
        o.record |= matches!(v.to_ascii_lowercase().as_str(), "yes" | "on" | "true");
    }
    if o.record && !relay.config().can_record {
        o.record = false;
        warnings.push("record-call ignored: recording is not configured ([recording] dir)".into());
    }
    o.to_profile = secure_profile(msg, webrtc, warnings);
    for k in UNSUPPORTED_KEYS {
        if get(msg, k).is_some() || get(msg, &k.to_ascii_lowercase()).is_some() {
            warnings.push(format!("{k} is not supported"));
        }
    }
    let names = strings(get(msg, "direction"));
    let to_name = key(msg, "to-interface").map(str::to_owned).or_else(|| names.get(1).cloned());
    if let Some(name) = to_name {
        match relay.config().interfaces.iter().position(|i| i.name == name) {
            Some(i) => o.interface = Some(i),
            None => warnings.push(format!("unknown interface '{name}'")),
        }
    }
    (o, trust_address)
}

/// The transport the recipient of an offer speaks, by rtpengine's keys: `WebRTC`,
/// `ICE=force` (with DTLS, the default, it is a browser), `DTLS=off`, `SDES-off` and
/// `transport-protocol`. `None`: the relay's default (a browser's offer goes out as plain
/// RTP; everything else as it came).
fn secure_profile(msg: &Bencode, webrtc: bool, warnings: &mut Vec<String>) -> Option<Profile> {
    let ice_force = match key(msg, "ICE").map(str::to_ascii_lowercase).as_deref() {
        None | Some("remove") | Some("default") => false,
        Some("force") | Some("force-relay") => true,
        Some(other) => {
            warnings.push(format!("ICE={other} is not supported; ICE attributes removed"));
            false
        }
    };
    let dtls_off = match key(msg, "DTLS").map(str::to_ascii_lowercase).as_deref() {
        None | Some("passive") => false,
        Some("off") | Some("no") | Some("disable") => true,
        Some(other) => {
            // pinhole is the DTLS server towards browsers (their setup is active or actpass).
            warnings.push(format!("DTLS={other} is not supported; pinhole is passive"));
            false
        }
    };
    let proto = key(msg, "transport-protocol").and_then(|p| {
        let profile = Profile::from_transport(p);
        if profile.is_none() {
            warnings.push(format!("transport-protocol {p} is not supported; media passed as is"));
        }
        profile
    });
    if webrtc || (ice_force && !dtls_off) || (proto == Some(Profile::WebRtc) && !dtls_off) {
        Some(Profile::WebRtc)
    } else if proto == Some(Profile::WebRtc) {
        Some(Profile::Sdes)
    } else {
        proto
    }
}

fn command(clock: Clock, now: Instant, relay: Option<&mut Relay>, msg: &Bencode) -> Bencode {
    let Some(command) = key(msg, "command") else { return error("no command") };
    metrics::counter!("pinhole_ng_commands_total", "command" => command_label(command)).increment(1);
    if command == "ping" {
        return Bencode::dict(vec![("result", Bencode::str("pong"))]);
    }
    let Some(relay) = relay else { return error("media relay is off") };
    let reply = match command {
        "offer" | "answer" => offer_answer(relay, now, command, msg),
        "delete" => {
            let Some(call_id) = key(msg, "call-id") else { return error("no call-id") };
            let info = relay.describe(call_id).map(|c| query_reply(clock, now, &c, relay.media_path(call_id, now)));
            if relay.delete(call_id) {
                info.unwrap_or_else(|| ok(vec![]))
            } else {
                Bencode::dict(vec![
                    ("warning", Bencode::str("Call-ID not found or tags didn't match")),
                    ("result", Bencode::str("ok")),
                ])
            }
        }
        "query" => {
            let Some(call_id) = key(msg, "call-id") else { return error("no call-id") };
            match relay.describe(call_id) {
                Some(c) => query_reply(clock, now, &c, relay.media_path(call_id, now)),
                None => error("Unknown call-id"),
            }
        }
        "start recording" | "stop recording" => {
            let Some(call_id) = key(msg, "call-id") else { return error("no call-id") };
            if !relay.config().can_record {
                return error("recording is not configured ([recording] dir)");
            }
            if relay.set_recording(call_id, command == "start recording") {
                ok(vec![])
            } else {
                error("Unknown call-id")
            }
        }
        "list" => ok(vec![("calls", Bencode::List(relay.list().iter().map(|c| Bencode::str(c)).collect()))]),
        "statistics" => {
            let t = relay.totals();
            ok(vec![(
                "statistics",
                Bencode::dict(vec![
                    (
                        "currentstatistics",
                        Bencode::dict(vec![
                            ("sessionsown", Bencode::Int(relay.call_count() as i64)),
                            ("sessionstotal", Bencode::Int(relay.call_count() as i64)),
                            ("ports", Bencode::Int(relay.ports_in_use() as i64)),
                        ]),
                    ),
                    (
                        "totalstatistics",
                        Bencode::dict(vec![
                            ("packets", Bencode::Int(t.packets as i64)),
                            ("bytes", Bencode::Int(t.bytes as i64)),
                            ("errors", Bencode::Int(t.dropped as i64)),
                        ]),
                    ),
                ]),
            )])
        }
        other => error(&format!("Unrecognized command '{other}'")),
    };
    reply
}

fn offer_answer(relay: &mut Relay, now: Instant, command: &str, msg: &Bencode) -> Bencode {
    let Some(call_id) = key(msg, "call-id") else { return error("no call-id") };
    let Some(sdp) = get(msg, "sdp").and_then(Bencode::as_bytes) else { return error("No SDP body in message") };
    let mut warnings = Vec::new();
    let (opts, trust_address) = options(msg, relay, &mut warnings);
    // received-from: ["IP4", "203.0.113.9"] — where the SIP message came from. With
    // trust-address the SDP alone says where the endpoint is.
    let received_from = match get(msg, "received-from") {
        Some(Bencode::List(l)) => l.get(1).and_then(Bencode::as_str).and_then(|s| s.parse::<IpAddr>().ok()),
        _ => None,
    };
    let signalling_ip = if trust_address { None } else { received_from };
    let r = if command == "offer" {
        relay.offer(now, call_id, key(msg, "from-tag").unwrap_or(""), sdp, signalling_ip, opts)
    } else {
        relay.answer(now, call_id, key(msg, "to-tag").unwrap_or(""), sdp, signalling_ip, opts)
    };
    match r {
        Ok(out) => {
            let mut pairs = vec![("sdp", Bencode::Bytes(out))];
            if !warnings.is_empty() {
                pairs.push(("warning", Bencode::str(&warnings.join("; "))));
            }
            ok(pairs)
        }
        Err(RelayError::LoadLimit) => Bencode::dict(vec![("result", Bencode::str("load limit"))]),
        Err(e) => error(&e.to_string()),
    }
}

fn endpoint(a: Option<SocketAddr>) -> Bencode {
    match a {
        Some(a) => Bencode::dict(vec![
            ("family", Bencode::str(if a.is_ipv4() { "IPv4" } else { "IPv6" })),
            ("address", Bencode::str(&a.ip().to_string())),
            ("port", Bencode::Int(i64::from(a.port()))),
        ]),
        None => Bencode::dict(vec![]),
    }
}

/// A stream's counters; for RTP (`quality`: its path's round trip) also what its sequence
/// numbers, timing and RTCP say of its quality (pinhole's own keys).
fn stats(s: &StreamStats, quality: Option<Option<u32>>) -> Bencode {
    let mut d = vec![
        ("packets", Bencode::Int(s.packets.load(Relaxed) as i64)),
        ("bytes", Bencode::Int(s.bytes.load(Relaxed) as i64)),
        ("errors", Bencode::Int(s.dropped.load(Relaxed) as i64)),
    ];
    if let Some(rtt) = quality {
        let q = s.quality();
        d.push(("expected", Bencode::Int(q.expected as i64)));
        d.push(("lost", Bencode::Int(q.lost as i64)));
        d.push(("jitter", Bencode::Int(q.jitter_ms.round() as i64)));
        if let Some(rtt) = rtt {
            d.push(("round-trip time", Bencode::Int(i64::from(rtt))));
        }
        if q.expected > 0 {
            let mos = crate::quality::mos_us(rtt, q.jitter_ms, q.loss_pct());
            d.push(("MOS", Bencode::Int((mos * 10.0) as i64)));
        }
    }
    Bencode::dict(d)
}

/// One MOS figure as rtpengine writes it: MOS × 10, round trip µs, jitter ms, loss %.
fn mos_entry(mos: f64, rtt_us: f64, jitter_ms: f64, loss_pct: f64) -> Vec<(&'static str, Bencode)> {
    vec![
        ("MOS", Bencode::Int((mos * 10.0) as i64)),
        ("round-trip time", Bencode::Int(rtt_us as i64)),
        ("jitter", Bencode::Int(jitter_ms.round() as i64)),
        ("packet loss", Bencode::Int(loss_pct.round() as i64)),
    ]
}

/// rtpengine's `SSRC` dictionary: per sending SSRC, its cumulative loss and its average,
/// lowest and highest MOS over the call's samples.
fn ssrc_reply(clock: Clock, now: Instant, c: &CallInfo) -> Bencode {
    let mut out: Vec<(Vec<u8>, Bencode)> = Vec::new();
    for s in &c.streams {
        for side in Side::BOTH {
            let st = s.stats.get(Component::Rtp, side);
            let track = &s.quality[side];
            let q = st.quality();
            if q.expected == 0 {
                continue;
            }
            let mut entry = vec![("cumulative loss", Bencode::Int(q.lost as i64))];
            if let Some((mos, rtt, jitter, loss)) = track.average() {
                let mut avg = mos_entry(mos, rtt, jitter, loss);
                avg.push(("samples", Bencode::Int(i64::from(track.samples))));
                entry.push(("average MOS", Bencode::dict(avg)));
            }
            for (key, sample) in [("lowest MOS", track.lowest), ("highest MOS", track.highest)] {
                if let Some(x) = sample {
                    let mut e = mos_entry(x.mos, f64::from(x.rtt_us.unwrap_or(0)), x.jitter_ms, x.loss_pct);
                    e.push(("reported at", Bencode::Int(clock.unix(now, x.at))));
                    entry.push((key, Bencode::dict(e)));
                }
            }
            out.push((q.ssrc.to_string().into_bytes(), Bencode::dict(entry)));
        }
    }
    Bencode::Dict(out)
}

/// The reply to query (and delete): per tag, its medias and streams with local port,
/// endpoint and statistics, plus totals.
fn query_reply(clock: Clock, now: Instant, c: &CallInfo, path: Option<MediaPath>) -> Bencode {
    let mut tags = Vec::new();
    let mut totals = [(0i64, 0i64, 0i64); 2];
    for side in Side::BOTH {
        let medias: Vec<Bencode> = c
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let streams = Component::BOTH
                    .into_iter()
                    .map(|component| {
                        let st = s.stats.get(component, side);
                        let total = &mut totals[component as usize];
                        total.0 += st.packets.load(Relaxed) as i64;
                        total.1 += st.bytes.load(Relaxed) as i64;
                        total.2 += st.dropped.load(Relaxed) as i64;
                        let offset = component.port_offset();
                        let sdp = s.sdp[side].map(|a| SocketAddr::new(a.ip(), a.port().saturating_add(offset)));
                        Bencode::dict(vec![
                            ("local port", Bencode::Int(i64::from(s.ports[side].0 + offset))),
                            ("endpoint", endpoint(sdp)),
                            ("stats", stats(st, (component == Component::Rtp).then(|| s.stats.path_rtt_us(side)))),
                        ])
                    })
                    .collect();
                Bencode::dict(vec![
                    ("index", Bencode::Int(i as i64 + 1)),
                    ("type", Bencode::str(&s.kind)),
                    ("protocol", Bencode::str(&s.proto)),
                    ("streams", Bencode::List(streams)),
                ])
            })
            .collect();
        let tag = &c.tags[side];
        tags.push((
            tag.as_bytes().to_vec(),
            Bencode::dict(vec![("tag", Bencode::str(tag)), ("medias", Bencode::List(medias))]),
        ));
    }
    let total = |t: (i64, i64, i64)| {
        Bencode::dict(vec![("packets", Bencode::Int(t.0)), ("bytes", Bencode::Int(t.1)), ("errors", Bencode::Int(t.2))])
    };
    ok(vec![
        ("created", Bencode::Int(clock.unix(now, c.created))),
        ("last signal", Bencode::Int(clock.unix(now, c.last_signal))),
        ("tags", Bencode::Dict(tags)),
        ("totals", Bencode::dict(vec![("RTP", total(totals[0])), ("RTCP", total(totals[1]))])),
        ("SSRC", ssrc_reply(clock, now, c)),
        // pinhole's own: whether the media still goes through us (see relay::MediaPath).
        ("media path", Bencode::str(path.map_or("quiet", MediaPath::label))),
    ])
}

fn command_label(c: &str) -> &'static str {
    match c {
        "ping" => "ping",
        "offer" => "offer",
        "answer" => "answer",
        "delete" => "delete",
        "query" => "query",
        "list" => "list",
        "statistics" => "statistics",
        "start recording" => "start recording",
        "stop recording" => "stop recording",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    //! rtpengine auto-daemon style: a command in, the reply checked; SDP with `PORT`
    //! standing for whatever relay port was chosen (`RTCP` for PORT + 1).

    use super::*;
    use crate::relay::RelayConfig;

    const OFFER: &str = "v=0\r\no=- 1545997027 1 IN IP4 198.51.100.1\r\ns=tester\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 3000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";
    const ANSWER: &str = "v=0\r\no=- 1545997028 1 IN IP4 198.51.100.2\r\ns=tester\r\nc=IN IP4 198.51.100.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

    struct Daemon {
        ng: NgServer,
        relay: Option<Relay>,
        now: Instant,
        cookie: u32,
    }

    impl Daemon {
        fn new() -> Daemon {
            let now = Instant::now();
            let ip = "203.0.113.1".parse().expect("ip");
            let relay = Relay::new(
                RelayConfig { max_sessions: 10, can_record: true, ..RelayConfig::single(ip, 30000, 30099) },
                now,
            );
            Daemon { ng: NgServer::new(now, 1_700_000_000), relay: Some(relay), now, cookie: 0 }
        }

        fn raw(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
            self.ng.handle(self.now, self.relay.as_mut(), datagram)
        }

        /// Sends a bencoded command under a fresh cookie; the decoded reply dictionary.
        fn send(&mut self, pairs: Vec<(&str, Bencode)>) -> Bencode {
            self.cookie += 1;
            let mut msg = format!("c{} ", self.cookie).into_bytes();
            Bencode::dict(pairs).encode(&mut msg);
            let reply = self.raw(&msg).expect("a reply");
            let (cookie, body) = split_cookie(&reply).expect("cookie");
            assert_eq!(cookie, format!("c{}", self.cookie).as_bytes());
            Bencode::decode(body).expect("bencode reply")
        }

        fn offer(&mut self, call: &str) -> Bencode {
            self.send(vec![
                ("command", Bencode::str("offer")),
                ("call-id", Bencode::str(call)),
                ("from-tag", Bencode::str("tagA")),
                ("sdp", Bencode::str(OFFER)),
            ])
        }

        fn answer(&mut self, call: &str) -> Bencode {
            self.send(vec![
                ("command", Bencode::str("answer")),
                ("call-id", Bencode::str(call)),
                ("from-tag", Bencode::str("tagA")),
                ("to-tag", Bencode::str("tagB")),
                ("sdp", Bencode::str(ANSWER)),
            ])
        }
    }

    fn text<'a>(reply: &'a Bencode, key: &str) -> &'a str {
        reply.get(key).and_then(Bencode::as_str).unwrap_or_else(|| panic!("no {key} in {reply}"))
    }

    /// The SDP with the relay port of its m= line turned into `PORT` (and `RTCP`).
    fn placeholders(sdp: &str) -> String {
        let port = sdp
            .lines()
            .find_map(|l| l.strip_prefix("m=audio "))
            .and_then(|l| l.split(' ').next())
            .and_then(|p| p.parse::<u16>().ok())
            .expect("m= port");
        assert!((30000..30100).contains(&port), "a relay port: {port}");
        sdp.replace(&format!(" {port} "), " PORT ").replace(&format!(":{}", port + 1), ":RTCP")
    }

    #[test]
    fn ping_is_answered_with_pong() {
        let mut d = Daemon::new();
        assert_eq!(d.raw(b"abc d7:command4:pinge"), Some(b"abc d6:result4:ponge".to_vec()));
    }

    #[test]
    fn offer_moves_the_media_onto_relay_ports() {
        let mut d = Daemon::new();
        let r = d.offer("call-1");
        assert_eq!(text(&r, "result"), "ok");
        assert_eq!(
            placeholders(text(&r, "sdp")),
            "v=0\r\no=- 1545997027 2 IN IP4 198.51.100.1\r\ns=tester\r\nc=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio PORT RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
        );
    }

    #[test]
    fn answer_completes_the_call_and_query_reports_both_tags() {
        let mut d = Daemon::new();
        d.offer("call-2");
        let r = d.answer("call-2");
        assert_eq!(text(&r, "result"), "ok");
        assert!(placeholders(text(&r, "sdp")).contains("c=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio PORT RTP/AVP 0\r\n"));
        let q = d.send(vec![("command", Bencode::str("query")), ("call-id", Bencode::str("call-2"))]);
        assert_eq!(text(&q, "result"), "ok");
        let tags = q.get("tags").expect("tags");
        assert!(tags.get("tagA").is_some() && tags.get("tagB").is_some(), "{q}");
        assert_eq!(q.get("created"), Some(&Bencode::Int(1_700_000_000)));
        assert_eq!(text(&q, "media path"), "quiet", "no media yet");
    }

    #[test]
    fn query_reports_each_ssrcs_loss_and_mos_as_rtpengine_does_and_delete_releases_a_report() {
        use crate::latch::RtpInfo;
        let mut d = Daemon::new();
        d.offer("call-q");
        d.answer("call-q");
        let relay = d.relay.as_mut().expect("relay");
        let stats = relay.stats("call-q").expect("stats");
        let (a, b) = (stats[0].get(Component::Rtp, Side::A), stats[0].get(Component::Rtp, Side::B));
        // Ten seconds each way: A loses every twentieth packet (5%), B none.
        for seq in 0..500u16 {
            let at = u64::from(seq) * 20_000_000;
            let rtp = |ssrc| Some(RtpInfo { ssrc, seq, timestamp: u32::from(seq) * 160, payload_type: 0 });
            if seq % 20 != 7 {
                a.on_packet(at, 172, rtp(1111));
            }
            b.on_packet(at, 172, rtp(2222));
            if seq == 250 {
                relay.sample_quality(d.now + Duration::from_secs(5));
            }
        }
        relay.sample_quality(d.now + Duration::from_secs(10));
        let q = d.send(vec![("command", Bencode::str("query")), ("call-id", Bencode::str("call-q"))]);
        let ssrc = q.get("SSRC").expect("SSRC");
        let lossy = ssrc.get("1111").expect("A's SSRC");
        assert_eq!(lossy.get("cumulative loss"), Some(&Bencode::Int(25)));
        let mos = |e: &Bencode, k: &str| e.get(k).and_then(|m| m.get("MOS")).cloned();
        let clean = ssrc.get("2222").expect("B's SSRC");
        let (Some(Bencode::Int(lossy_mos)), Some(Bencode::Int(clean_mos))) =
            (mos(lossy, "average MOS"), mos(clean, "average MOS"))
        else {
            panic!("average MOS in {q}")
        };
        assert!(lossy_mos < clean_mos - 3, "{lossy_mos} vs {clean_mos}: MOS × 10");
        assert_eq!(lossy.get("average MOS").and_then(|m| m.get("packet loss")), Some(&Bencode::Int(5)));
        assert_eq!(lossy.get("average MOS").and_then(|m| m.get("samples")), Some(&Bencode::Int(2)));
        assert!(lossy.get("lowest MOS").and_then(|m| m.get("reported at")).is_some());
        // The stream's own stats carry pinhole's figures too.
        let stream = q.get("tags").and_then(|t| t.get("tagA")).and_then(|t| t.get("medias")).expect("medias");
        assert!(stream.to_string().contains("lost"), "{stream}");
        d.send(vec![("command", Bencode::str("delete")), ("call-id", Bencode::str("call-q"))]);
        let released = d.relay.as_mut().and_then(Relay::poll_released).expect("a report");
        assert_eq!((released.call_id.as_str(), released.directions.len()), ("call-q", 2));
        let worst = released.mos().expect("a MOS");
        assert!((3.5..4.3).contains(&worst), "{worst}");
        assert!((released.loss_pct() - 2.5).abs() < 0.01, "25 of 1000: {}", released.loss_pct());
    }

    #[test]
    fn offer_without_sdp_is_an_error_naming_it() {
        let mut d = Daemon::new();
        let r = d.send(vec![("command", Bencode::str("offer")), ("call-id", Bencode::str("x"))]);
        assert_eq!(text(&r, "result"), "error");
        assert_eq!(text(&r, "error-reason"), "No SDP body in message");
    }

    #[test]
    fn answer_for_an_unknown_call_is_an_error() {
        let mut d = Daemon::new();
        let r = d.answer("nobody");
        assert_eq!(text(&r, "result"), "error");
        assert_eq!(text(&r, "error-reason"), "unknown call");
    }

    #[test]
    fn delete_of_an_unknown_call_warns_as_rtpengine_does() {
        let mut d = Daemon::new();
        let r = d.send(vec![("command", Bencode::str("delete")), ("call-id", Bencode::str("nobody"))]);
        assert_eq!(text(&r, "result"), "ok");
        assert_eq!(text(&r, "warning"), "Call-ID not found or tags didn't match");
    }

    #[test]
    fn delete_frees_the_ports_and_list_and_statistics_follow() {
        let mut d = Daemon::new();
        d.offer("call-3");
        d.answer("call-3");
        let l = d.send(vec![("command", Bencode::str("list"))]);
        assert_eq!(l.get("calls"), Some(&Bencode::List(vec![Bencode::str("call-3")])));
        let s = d.send(vec![("command", Bencode::str("statistics"))]);
        let current = s.get("statistics").and_then(|s| s.get("currentstatistics")).expect("current");
        assert_eq!(current.get("sessionsown"), Some(&Bencode::Int(1)));
        let r = d.send(vec![("command", Bencode::str("delete")), ("call-id", Bencode::str("call-3"))]);
        assert_eq!(text(&r, "result"), "ok");
        assert_eq!(d.relay.as_ref().map(Relay::ports_in_use), Some(0));
        let l = d.send(vec![("command", Bencode::str("list"))]);
        assert_eq!(l.get("calls"), Some(&Bencode::List(vec![])));
    }

    #[test]
    fn unsupported_features_are_accepted_with_a_warning_naming_them() {
        let mut d = Daemon::new();
        let r = d.send(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("call-4")),
            ("from-tag", Bencode::str("tagA")),
            ("sdp", Bencode::str(OFFER)),
            ("flags", Bencode::List(vec![Bencode::str("trust-address"), Bencode::str("loop-detect")])),
            ("transcode", Bencode::str("PCMA")),
        ]);
        assert_eq!(text(&r, "result"), "ok");
        let w = text(&r, "warning");
        assert!(w.contains("loop-detect") && w.contains("transcode"), "{w}");
    }

    /// The Record commands the relay queued since the last look: (on, ports).
    fn record_commands(d: &mut Daemon) -> Vec<(bool, usize)> {
        let relay = d.relay.as_mut().expect("relay");
        std::iter::from_fn(|| relay.poll_command())
            .filter_map(|c| match c {
                crate::relay::Command::Record { on, ports, .. } => Some((on, ports.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn record_call_and_start_and_stop_recording_record_every_port_of_the_call() {
        let mut d = Daemon::new();
        let r = d.send(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("call-r")),
            ("from-tag", Bencode::str("tagA")),
            ("sdp", Bencode::str(OFFER)),
            ("record call", Bencode::str("yes")),
        ]);
        assert_eq!((text(&r, "result"), r.get("warning")), ("ok", None));
        // One stream: RTP and RTCP ports of both sides.
        assert_eq!(record_commands(&mut d), vec![(true, 4)]);
        d.answer("call-r");
        assert_eq!(record_commands(&mut d), vec![(true, 4)], "the answer keeps every port recorded");
        let stop = d.send(vec![("command", Bencode::str("stop recording")), ("call-id", Bencode::str("call-r"))]);
        assert_eq!(text(&stop, "result"), "ok");
        assert_eq!(record_commands(&mut d), vec![(false, 4)]);
        assert!(!d.relay.as_ref().is_some_and(|r| r.recording("call-r")));
        let start = d.send(vec![("command", Bencode::str("start recording")), ("call-id", Bencode::str("call-r"))]);
        assert_eq!(text(&start, "result"), "ok");
        assert_eq!(record_commands(&mut d), vec![(true, 4)]);
        d.send(vec![("command", Bencode::str("delete")), ("call-id", Bencode::str("call-r"))]);
        assert_eq!(record_commands(&mut d), vec![(false, 4)], "a delete finishes the recording");
        let unknown = d.send(vec![("command", Bencode::str("start recording")), ("call-id", Bencode::str("nobody"))]);
        assert_eq!(text(&unknown, "error-reason"), "Unknown call-id");
        // The flag spelling works too.
        let r = d.send(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("call-f")),
            ("from-tag", Bencode::str("tagA")),
            ("sdp", Bencode::str(OFFER)),
            ("flags", Bencode::List(vec![Bencode::str("record-call")])),
        ]);
        assert_eq!((text(&r, "result"), r.get("warning")), ("ok", None));
        assert_eq!(record_commands(&mut d), vec![(true, 4)]);
    }

    #[test]
    fn the_webrtc_flag_offers_a_plain_phone_to_a_browser_the_way_rtpengine_does() {
        let mut d = Daemon::new();
        let r = d.send(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("call-w")),
            ("from-tag", Bencode::str("tagA")),
            ("sdp", Bencode::str(OFFER)),
            ("flags", Bencode::List(vec![Bencode::str("WebRTC")])),
        ]);
        assert_eq!(text(&r, "result"), "ok", "{r:?}");
        let sdp = text(&r, "sdp");
        for want in [
            "UDP/TLS/RTP/SAVPF",
            "a=ice-lite",
            "a=ice-ufrag:",
            "a=fingerprint:sha-256 ",
            "a=setup:actpass",
            "a=rtcp-mux",
            "a=mid:",
        ] {
            assert!(sdp.contains(want), "{want} missing from {sdp}");
        }
        // The same offer with ICE=force and RTP/SAVPF (the older way to say it) too; with
        // transport-protocol RTP/AVP and ICE=remove it stays plain.
        let r = d.send(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("call-w2")),
            ("from-tag", Bencode::str("tagA")),
            ("sdp", Bencode::str(OFFER)),
            ("ICE", Bencode::str("force")),
            ("transport-protocol", Bencode::str("RTP/SAVPF")),
        ]);
        assert!(text(&r, "sdp").contains("UDP/TLS/RTP/SAVPF"), "{r:?}");
        let r = d.send(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("call-w3")),
            ("from-tag", Bencode::str("tagA")),
            ("sdp", Bencode::str(OFFER)),
            ("ICE", Bencode::str("remove")),
            ("transport-protocol", Bencode::str("RTP/AVP")),
        ]);
        assert!(text(&r, "sdp").contains("RTP/AVP") && !text(&r, "sdp").contains("fingerprint"), "{r:?}");
    }

    #[test]
    fn a_retransmitted_request_gets_the_cached_reply_and_runs_once() {
        let mut d = Daemon::new();
        let mut msg = b"same ".to_vec();
        Bencode::dict(vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str("call-5")),
            ("from-tag", Bencode::str("tagA")),
            ("sdp", Bencode::str(OFFER)),
        ])
        .encode(&mut msg);
        let first = d.raw(&msg);
        let ports = d.relay.as_ref().map(Relay::ports_in_use);
        assert_eq!(d.raw(&msg), first);
        assert_eq!(d.relay.as_ref().map(Relay::ports_in_use), ports, "no second allocation");
    }

    #[test]
    fn json_messages_get_json_replies() {
        let mut d = Daemon::new();
        let reply = d.raw(br#"j1 {"command":"ping"}"#).expect("reply");
        assert_eq!(reply, br#"j1 {"result":"pong"}"#.to_vec());
    }

    #[test]
    fn malformed_messages_get_an_error_and_cookieless_ones_nothing() {
        let mut d = Daemon::new();
        let reply = d.raw(b"m1 d7:command4:pin").expect("reply");
        assert!(String::from_utf8_lossy(&reply).contains("invalid bencode"), "{reply:?}");
        let reply = d.raw(b"m2 l4:pinge").expect("reply");
        assert!(String::from_utf8_lossy(&reply).contains("message is not a dictionary"));
        assert_eq!(d.raw(b"d7:command4:pinge"), None);
        assert_eq!(d.raw(&[vec![b'x'; MAX_COOKIE + 1], b" d7:command4:pinge".to_vec()].concat()), None);
    }

    #[test]
    fn with_the_relay_off_media_commands_are_refused() {
        let mut d = Daemon::new();
        d.relay = None;
        let r = d.offer("call-6");
        assert_eq!(text(&r, "error-reason"), "media relay is off");
        assert_eq!(d.raw(b"p d7:command4:pinge"), Some(b"p d6:result4:ponge".to_vec()));
    }

    #[test]
    fn a_stream_answers_back_to_back_messages_and_keeps_a_partial_one() {
        let mut d = Daemon::new();
        let mut buf = b"a d7:command4:pingeb d7:command4:pingec d7:comm".to_vec();
        let replies = d.ng.handle_stream(d.now, d.relay.as_mut(), &mut buf).expect("ng");
        assert_eq!(replies, vec![b"a d6:result4:ponge".to_vec(), b"b d6:result4:ponge".to_vec()]);
        assert_eq!(buf, b"c d7:comm".to_vec());
        buf.extend_from_slice(b"and4:pinge");
        let replies = d.ng.handle_stream(d.now, d.relay.as_mut(), &mut buf).expect("ng");
        assert_eq!(replies, vec![b"c d6:result4:ponge".to_vec()]);
        assert!(buf.is_empty());
        // The reply cache covers streams too: a repeated cookie is not executed again.
        let mut again = b"c d7:command4:liste".to_vec();
        let replies = d.ng.handle_stream(d.now, d.relay.as_mut(), &mut again).expect("ng");
        assert_eq!(replies, vec![b"c d6:result4:ponge".to_vec()]);
    }

    #[test]
    fn a_stream_without_a_cookie_or_with_garbage_is_refused() {
        let mut d = Daemon::new();
        let mut buf = vec![b'x'; 300];
        assert_eq!(d.ng.handle_stream(d.now, d.relay.as_mut(), &mut buf), Err(NgStreamError::NoCookie));
        let mut buf = b"k x7:garbage".to_vec();
        assert!(matches!(d.ng.handle_stream(d.now, d.relay.as_mut(), &mut buf), Err(NgStreamError::Bencode(_))));
    }

    #[test]
    fn the_reply_cache_is_bounded_in_entries_and_expires_in_order() {
        let t0 = Instant::now();
        let mut c = ReplyCache::default();
        for i in 0..REPLY_CACHE_ENTRIES + 10 {
            c.insert(t0, format!("k{i}").as_bytes(), vec![0; 8]);
        }
        assert_eq!(c.replies.len(), REPLY_CACHE_ENTRIES);
        assert!(!c.replies.contains_key(b"k0".as_slice()), "the oldest went first");
        c.expire(t0 + REPLY_CACHE);
        assert!(c.replies.is_empty());
        assert_eq!(c.bytes, 0);
    }
}
