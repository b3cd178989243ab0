//! The ng control listener (UDP and TCP, bencode or JSON): rtpengine's protocol as Kamailio's rtpengine module
//! speaks it. Commands: ping, offer, answer, delete, query, list, statistics. Replies are
//! cached by cookie, so a retransmitted request gets the identical reply and is not
//! executed twice (requests are handled one at a time, so a retransmission that arrives
//! while the first is processed finds the reply cached).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pinhole_media::latch::LatchMode;
use pinhole_media::ng::{from_json, split_cookie, to_json, Bencode};
use pinhole_media::relay::{Options, Relay, RelayError};

use crate::limits::{Backoff, LogLimiter};
use crate::server::Shared;

/// How long a reply is kept for retransmissions of its request.
const REPLY_CACHE: Duration = Duration::from_secs(30);

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
];

/// Features pinhole does not have: accepted with a warning naming them, never ignored.
const UNSUPPORTED_KEYS: &[&str] =
    &["record-call", "transcode", "codec", "SDES", "DTLS", "T.38", "T38", "media-echo", "xmlrpc-callback", "metadata"];

/// Most replies cached, and most bytes (cookies and replies) they may hold; past either
/// the oldest are forgotten early.
const REPLY_CACHE_ENTRIES: usize = 65_536;
const REPLY_CACHE_BYTES: usize = 64 << 20;
/// ng TCP connections served at once (each has a thread); more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 32;

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

pub(crate) fn run(shared: &Arc<Shared>, sock: &UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    let mut cache = ReplyCache::default();
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
        let now = Instant::now();
        cache.expire(now);
        if let Some(reply) = answer(shared, now, &buf[..n], &mut cache) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

/// One datagram in, its reply out (`None`: no cookie, nothing to answer).
fn answer(shared: &Arc<Shared>, now: Instant, datagram: &[u8], cache: &mut ReplyCache) -> Option<Vec<u8>> {
    let Ok((cookie, payload)) = split_cookie(datagram) else {
        metrics::counter!("pinhole_ng_garbage_total").increment(1);
        return None;
    };
    if let Some(reply) = cache.replies.get(cookie) {
        return Some(reply.clone());
    }
    let mut reply = cookie.to_vec();
    reply.push(b' ');
    reply.extend_from_slice(&respond(shared, now, payload));
    cache.insert(now, cookie, reply.clone());
    Some(reply)
}

/// The encoded reply to one message body: bencode, or JSON for a JSON dictionary.
fn respond(shared: &Arc<Shared>, now: Instant, payload: &[u8]) -> Vec<u8> {
    if payload.first() == Some(&b'{') {
        let body = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v @ serde_json::Value::Object(_)) => handle(shared, now, &from_json(&v)),
            Ok(_) => error("message is not a dictionary"),
            Err(e) => {
                metrics::counter!("pinhole_ng_garbage_total").increment(1);
                error(&format!("invalid JSON: {e}"))
            }
        };
        return serde_json::to_vec(&to_json(&body)).unwrap_or_default();
    }
    let body = match Bencode::decode(payload) {
        Ok(msg @ Bencode::Dict(_)) => handle(shared, now, &msg),
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

/// A connection slot, given back when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// An ng TCP connection silent this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(300);

/// ng over TCP: `<cookie> <bencoded dictionary>` back to back on a stream. A message that
/// cannot be framed closes the connection.
pub(crate) fn run_tcp(shared: &Arc<Shared>, listener: &TcpListener) {
    static ACCEPT_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = Backoff::new();
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!("pinhole_accept_errors_total", "listener" => "ng").increment(1);
                if let Some(suppressed) = ACCEPT_LOG.allow(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "ng accept failed; backing off");
                }
                std::thread::sleep(backoff.next_delay());
                continue;
            }
        };
        backoff.reset();
        if open.load(Relaxed) >= MAX_TCP_CONNECTIONS {
            metrics::counter!("pinhole_ng_connections_refused_total").increment(1);
            continue; // dropping it closes it
        }
        open.fetch_add(1, Relaxed);
        let _ = conn.set_read_timeout(Some(TCP_IDLE));
        let shared = shared.clone();
        let open = open.clone();
        let _ = std::thread::Builder::new().name("ng tcp".into()).spawn(move || {
            let _slot = Slot(open);
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 16 * 1024];
            loop {
                let n = match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                loop {
                    let Some(sp) = buf.iter().take(256).position(|&b| b == b' ') else {
                        if buf.len() > 256 {
                            return; // no cookie within reason: not ng
                        }
                        break;
                    };
                    let (body, used) = match Bencode::decode_prefix(&buf[sp + 1..]) {
                        Ok((Bencode::Dict(d), used)) => (handle(&shared, Instant::now(), &Bencode::Dict(d)), used),
                        Ok((_, used)) => (error("message is not a dictionary"), used),
                        Err(pinhole_media::ng::NgError::Truncated) if buf.len() < 1 << 20 => break,
                        Err(_) => return,
                    };
                    let mut reply = buf[..sp + 1].to_vec();
                    body.encode(&mut reply);
                    if conn.write_all(&reply).is_err() {
                        return;
                    }
                    buf.drain(..sp + 1 + used);
                }
            }
        });
    }
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

fn unix(now: Instant, t: Instant) -> i64 {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    wall.saturating_sub(now.saturating_duration_since(t).as_secs()) as i64
}

/// Options from flags, ICE, replace and interface keys; unknown or unsupported features
/// are collected as warnings.
fn options(msg: &Bencode, relay: &Relay, warnings: &mut Vec<String>) -> (Options, bool) {
    let mut o = Options::default();
    let mut trust_address = false;
    for f in strings(get(msg, "flags")) {
        let lf = f.to_ascii_lowercase().replace(' ', "-");
        match lf.as_str() {
            "asymmetric" => o.mode = LatchMode::Asymmetric,
            "symmetric" => o.mode = LatchMode::Symmetric,
            "trust-address" => trust_address = true,
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
    match key(msg, "ICE").map(str::to_ascii_lowercase).as_deref() {
        None | Some("remove") | Some("default") => {}
        Some(other) => warnings.push(format!("ICE={other} is not supported; ICE attributes removed")),
    }
    if let Some(proto) = key(msg, "transport-protocol") {
        if !proto.eq_ignore_ascii_case("RTP/AVP") && !proto.eq_ignore_ascii_case("RTP/AVPF") {
            warnings.push(format!("transport-protocol {proto} (SRTP bridging) is not supported; media passed as is"));
        }
    }
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

fn handle(shared: &Arc<Shared>, now: Instant, msg: &Bencode) -> Bencode {
    let Some(command) = key(msg, "command") else { return error("no command") };
    metrics::counter!("pinhole_ng_commands_total", "command" => command_label(command)).increment(1);
    if command == "ping" {
        return Bencode::dict(vec![("result", Bencode::str("pong"))]);
    }
    let mut p = shared.proxy();
    let Some(relay) = p.relay_mut() else { return error("media relay is off") };
    let reply = match command {
        "offer" | "answer" => offer_answer(relay, now, command, msg),
        "delete" => {
            let Some(call_id) = key(msg, "call-id") else { return error("no call-id") };
            let info = relay.describe(call_id).map(|c| query_reply(now, &c));
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
                Some(c) => query_reply(now, &c),
                None => error("Unknown call-id"),
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
    crate::server::drain_media(shared, &mut p);
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

fn stats(s: &pinhole_media::stats::StreamStats) -> Bencode {
    Bencode::dict(vec![
        ("packets", Bencode::Int(s.packets.load(Relaxed) as i64)),
        ("bytes", Bencode::Int(s.bytes.load(Relaxed) as i64)),
        ("errors", Bencode::Int(s.dropped.load(Relaxed) as i64)),
    ])
}

/// The reply to query (and delete): per tag, its medias and streams with local port,
/// endpoint and statistics, plus totals.
fn query_reply(now: Instant, c: &pinhole_media::relay::CallInfo) -> Bencode {
    let mut tags = Vec::new();
    let mut totals = [(0i64, 0i64, 0i64); 2];
    for side in 0..2 {
        let medias: Vec<Bencode> = c
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let streams = (0..2)
                    .map(|k| {
                        let st = &s.stats[k * 2 + side];
                        totals[k].0 += st.packets.load(Relaxed) as i64;
                        totals[k].1 += st.bytes.load(Relaxed) as i64;
                        totals[k].2 += st.dropped.load(Relaxed) as i64;
                        let sdp = s.sdp[side].map(|a| SocketAddr::new(a.ip(), a.port().saturating_add(k as u16)));
                        Bencode::dict(vec![
                            ("local port", Bencode::Int(i64::from(s.ports[side].0) + k as i64)),
                            ("endpoint", endpoint(sdp)),
                            ("stats", stats(st)),
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
        ("created", Bencode::Int(unix(now, c.created))),
        ("last signal", Bencode::Int(unix(now, c.last_signal))),
        ("tags", Bencode::Dict(tags)),
        ("totals", Bencode::dict(vec![("RTP", total(totals[0])), ("RTCP", total(totals[1]))])),
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
        _ => "other",
    }
}
