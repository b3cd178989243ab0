//! SIP over WebSocket (RFC 7118), the server's side, sans-IO: the HTTP/1.1 upgrade that
//! opens a connection (RFC 6455 §4.2) and the frames after it (§5).
//!
//! - **Upgrade.** A `GET` with `Upgrade: websocket`, `Connection: Upgrade`, version 13, a
//!   16-byte key and the `sip` subprotocol among those offered (RFC 7118 §4: a server
//!   without it must not accept); an `Origin` outside `allowed_origins` (when set) is
//!   refused with 403. The request is bounded ([`MAX_UPGRADE`]) and answered with the
//!   response to write, either way.
//! - **Frames.** What a client sends must be masked (§5.1); data frames may be fragmented
//!   (continuations), control frames may not and carry at most 125 bytes; a message
//!   larger than the configured size is refused from its first frame's header, before it
//!   is buffered. Each whole message is one SIP message (RFC 7118 §5). Pings are answered
//!   with the same payload, a close with a close. What we send: one unmasked text frame
//!   per SIP message ([`text_frame`]), pings for keepalive ([`ping_frame`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 §1.3 mixes into the key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Longest upgrade request read (browsers send well under 2 KiB).
pub const MAX_UPGRADE: usize = 8 * 1024;

/// Why an upgrade was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeError {
    /// The request is not complete yet: read more.
    Incomplete,
    /// Refused: write `response` (an HTTP error naming the problem) and close.
    Refused { response: Vec<u8>, reason: &'static str },
}

/// Reads an upgrade request from the start of `buf`. On success: how many bytes it took,
/// and the `101 Switching Protocols` response to write.
pub fn accept_upgrade(buf: &[u8], allowed_origins: &[String]) -> Result<(usize, Vec<u8>), UpgradeError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_UPGRADE {
            return Err(refuse(431, "Request Header Fields Too Large", "upgrade request too large"));
        }
        return Err(UpgradeError::Incomplete);
    };
    if end + 4 > MAX_UPGRADE {
        return Err(refuse(431, "Request Header Fields Too Large", "upgrade request too large"));
    }
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Err(refuse(400, "Bad Request", "upgrade request not text"));
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    if parts.next() != Some("GET") || parts.nth(1) != Some("HTTP/1.1") {
        return Err(refuse(400, "Bad Request", "not a GET over HTTP/1.1"));
    }
    let headers: Vec<(&str, &str)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim(), v.trim())).collect();
    let header = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v);
    let tokens = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
            .collect()
    };
    if !tokens("Upgrade").iter().any(|t| t == "websocket") || !tokens("Connection").iter().any(|t| t == "upgrade") {
        return Err(refuse(400, "Bad Request", "not a WebSocket upgrade"));
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        let response =
            b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n".to_vec();
        return Err(UpgradeError::Refused { response, reason: "WebSocket version not 13" });
    }
    let key = header("Sec-WebSocket-Key").unwrap_or_default();
    if STANDARD.decode(key).map(|k| k.len()) != Ok(16) {
        return Err(refuse(400, "Bad Request", "bad Sec-WebSocket-Key"));
    }
    if !tokens("Sec-WebSocket-Protocol").iter().any(|t| t == "sip") {
        return Err(refuse(400, "Bad Request", "no sip subprotocol offered"));
    }
    if !allowed_origins.is_empty() && !header("Origin").is_some_and(|o| allowed_origins.iter().any(|a| a == o)) {
        return Err(refuse(403, "Forbidden", "origin not allowed"));
    }
    let accept = STANDARD.encode(Sha1::digest(format!("{key}{GUID}").as_bytes()));
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: sip\r\n\r\n"
    );
    Ok((end + 4, response.into_bytes()))
}

fn refuse(code: u16, phrase: &str, reason: &'static str) -> UpgradeError {
    let response = format!("HTTP/1.1 {code} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes();
    UpgradeError::Refused { response, reason }
}

/// What came in on a WebSocket connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// A whole message: one SIP message.
    Message(Vec<u8>),
    /// Write this back (a pong for a ping).
    Reply(Vec<u8>),
    /// A pong (to our keepalive ping).
    Pong,
    /// The peer closed: write this close frame back, then close.
    Close(Vec<u8>),
}

/// Why a connection's frames are refused (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// A client's frame without a mask (RFC 6455 §5.1).
    Unmasked,
    /// Reserved bits or opcodes.
    Reserved,
    /// A message longer than allowed.
    TooLarge,
    /// A fragmented or oversized control frame.
    BadControl,
    /// A continuation with no message begun, or a new message before the last ended.
    BadContinuation,
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WsError::Unmasked => "unmasked frame from a client",
            WsError::Reserved => "reserved bits or opcode",
            WsError::TooLarge => "message too large",
            WsError::BadControl => "bad control frame",
            WsError::BadContinuation => "bad continuation",
        })
    }
}

/// The frames of one connection, after its upgrade.
pub struct WsReader {
    buf: Vec<u8>,
    /// The message being reassembled from fragments.
    message: Vec<u8>,
    in_message: bool,
    max_message: usize,
}

impl WsReader {
    pub fn new(max_message: usize) -> WsReader {
        WsReader { buf: Vec::new(), message: Vec::new(), in_message: false, max_message }
    }

    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held for an unfinished frame or message.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.message.len()
    }

    /// The next event, `None` until a frame is whole.
    pub fn next_event(&mut self) -> Result<Option<WsEvent>, WsError> {
        loop {
            let Some((fin, opcode, payload)) = self.next_frame()? else { return Ok(None) };
            match opcode {
                0x0 => {
                    if !self.in_message {
                        return Err(WsError::BadContinuation);
                    }
                    self.append(&payload)?;
                }
                0x1 | 0x2 => {
                    if self.in_message {
                        return Err(WsError::BadContinuation);
                    }
                    self.in_message = true;
                    self.append(&payload)?;
                }
                0x8 => {
                    // Echo the status code, if any (§5.5.1).
                    let code = payload.get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                    return Ok(Some(WsEvent::Close(frame(0x8, &code))));
                }
                0x9 => return Ok(Some(WsEvent::Reply(frame(0xA, &payload)))),
                0xA => return Ok(Some(WsEvent::Pong)),
                _ => return Err(WsError::Reserved),
            }
            if fin && opcode <= 0x2 {
                self.in_message = false;
                return Ok(Some(WsEvent::Message(std::mem::take(&mut self.message))));
            }
        }
    }

    fn append(&mut self, payload: &[u8]) -> Result<(), WsError> {
        if self.message.len() + payload.len() > self.max_message {
            return Err(WsError::TooLarge);
        }
        self.message.extend_from_slice(payload);
        Ok(())
    }

    /// One whole frame off the buffer, unmasked: (FIN, opcode, payload).
    fn next_frame(&mut self) -> Result<Option<(bool, u8, Vec<u8>)>, WsError> {
        let b = &self.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0F);
        if rsv != 0 {
            return Err(WsError::Reserved);
        }
        if b[1] & 0x80 == 0 {
            return Err(WsError::Unmasked);
        }
        let control = opcode & 0x8 != 0;
        let (len, at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        if control && (!fin || len > 125) {
            return Err(WsError::BadControl);
        }
        // Refused from the header, before a byte of it is held.
        if !control && len > (self.max_message - self.message.len().min(self.max_message)) as u64 {
            return Err(WsError::TooLarge);
        }
        let len = usize::try_from(len).map_err(|_| WsError::TooLarge)?;
        let total = at + 4 + len;
        if b.len() < total {
            return Ok(None);
        }
        let mask = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        let payload: Vec<u8> = b[at + 4..total].iter().enumerate().map(|(i, x)| x ^ mask[i % 4]).collect();
        self.buf.drain(..total);
        Ok(Some((fin, opcode, payload)))
    }
}

/// One unmasked frame (the server's), FIN set.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// A SIP message as one text frame.
pub fn text_frame(message: &[u8]) -> Vec<u8> {
    frame(0x1, message)
}

/// A keepalive ping.
pub fn ping_frame() -> Vec<u8> {
    frame(0x9, b"pinhole")
}

#[cfg(test)]
mod tests;
