//! The ng control listener (UDP): rtpengine's protocol as Kamailio's rtpengine module
//! speaks it. This build answers ping, offer, answer and delete; replies are cached by
//! cookie so a retransmitted request is answered identically and not executed twice.

use std::collections::HashMap;
use std::net::{IpAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinhole_media::ng::{split_cookie, Bencode};
use pinhole_media::relay::{Options, RelayError};

use crate::server::Shared;

/// How long a reply is kept for retransmissions of its request.
const REPLY_CACHE: Duration = Duration::from_secs(30);

pub(crate) fn run(shared: &Arc<Shared>, sock: &UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    let mut cache: HashMap<Vec<u8>, (Instant, Vec<u8>)> = HashMap::new();
    let mut last_sweep = Instant::now();
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let now = Instant::now();
        if now.duration_since(last_sweep) > Duration::from_secs(5) {
            cache.retain(|_, (t, _)| now.duration_since(*t) < REPLY_CACHE);
            last_sweep = now;
        }
        let Ok((cookie, payload)) = split_cookie(&buf[..n]) else {
            metrics::counter!("pinhole_ng_garbage_total").increment(1);
            continue; // no cookie: nothing to answer to
        };
        if let Some((_, reply)) = cache.get(cookie) {
            let _ = sock.send_to(reply, from);
            continue;
        }
        let body = match Bencode::decode(payload) {
            Ok(msg) => handle(shared, now, &msg),
            Err(e) => error(&format!("invalid bencode: {e}")),
        };
        let mut reply = cookie.to_vec();
        reply.push(b' ');
        body.encode(&mut reply);
        let _ = sock.send_to(&reply, from);
        cache.insert(cookie.to_vec(), (now, reply));
    }
}

fn error(reason: &str) -> Bencode {
    Bencode::dict(vec![("result", Bencode::str("error")), ("error-reason", Bencode::str(reason))])
}

fn key<'a>(msg: &'a Bencode, name: &str) -> Option<&'a str> {
    msg.get(name).or_else(|| msg.get(&name.replace('-', " "))).and_then(Bencode::as_str)
}

fn handle(shared: &Arc<Shared>, now: Instant, msg: &Bencode) -> Bencode {
    let Some(command) = key(msg, "command") else { return error("no command") };
    metrics::counter!("pinhole_ng_commands_total", "command" => command_label(command)).increment(1);
    if command == "ping" {
        return Bencode::dict(vec![("result", Bencode::str("pong"))]);
    }
    let Some(call_id) = key(msg, "call-id") else { return error("no call-id") };
    let received_from = match msg.get("received-from") {
        Some(Bencode::List(l)) => l.get(1).and_then(Bencode::as_str).and_then(|s| s.parse::<IpAddr>().ok()),
        _ => None,
    };
    let mut p = shared.proxy();
    let Some(relay) = p.relay_mut() else { return error("media relay is off") };
    let result = match command {
        "offer" | "answer" => {
            let Some(sdp) = msg.get("sdp").and_then(Bencode::as_bytes) else { return error("No SDP body in message") };
            let r = if command == "offer" {
                let tag = key(msg, "from-tag").unwrap_or("");
                relay.offer(now, call_id, tag, sdp, received_from, Options::default())
            } else {
                let tag = key(msg, "to-tag").unwrap_or("");
                relay.answer(now, call_id, tag, sdp, received_from, Options::default())
            };
            match r {
                Ok(out) => Bencode::dict(vec![("result", Bencode::str("ok")), ("sdp", Bencode::Bytes(out))]),
                Err(RelayError::LoadLimit) => Bencode::dict(vec![("result", Bencode::str("load limit"))]),
                Err(e) => error(&e.to_string()),
            }
        }
        "delete" => {
            if relay.delete(call_id) {
                Bencode::dict(vec![("result", Bencode::str("ok"))])
            } else {
                Bencode::dict(vec![
                    ("warning", Bencode::str("Call-ID not found or tags didn't match")),
                    ("result", Bencode::str("ok")),
                ])
            }
        }
        other => error(&format!("Unrecognized command '{other}'")),
    };
    crate::server::drain_media(shared, &mut p);
    result
}

fn command_label(c: &str) -> &'static str {
    match c {
        "ping" => "ping",
        "offer" => "offer",
        "answer" => "answer",
        "delete" => "delete",
        _ => "other",
    }
}
