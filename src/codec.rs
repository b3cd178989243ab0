//! How a connection's bytes become SIP messages: Content-Length framing on TCP and TLS,
//! an upgrade then WebSocket messages on WS and WSS (the protocol work is in
//! `pinhole_sip::stream` and `pinhole_sip::websocket`; this only joins them up).

use bytes::Bytes;
use pinhole_sip::stream::{Frame, Framer};
use pinhole_sip::websocket::{accept_upgrade, UpgradeError, WsEvent, WsReader};

pub(crate) enum Codec {
    Sip(Framer),
    /// A WebSocket connection before its upgrade: the request so far.
    Upgrade {
        buf: Vec<u8>,
        max_message: usize,
    },
    Ws(WsReader),
}

/// What a connection's bytes came to.
pub(crate) enum Got {
    /// A SIP message for the node.
    Message(Bytes),
    /// Bytes to write back (a CRLF pong, the upgrade's 101, a WebSocket pong).
    Write(Vec<u8>),
    /// A keepalive answered: the connection is alive.
    Alive,
    /// Write these bytes, then close (a refused upgrade, a close frame).
    Close(Vec<u8>),
}

impl Codec {
    pub(crate) fn new(websocket: bool, max_message: usize) -> Codec {
        if websocket {
            Codec::Upgrade { buf: Vec::new(), max_message }
        } else {
            Codec::Sip(Framer::new(max_message))
        }
    }

    pub(crate) fn extend(&mut self, data: &[u8]) {
        match self {
            Codec::Sip(f) => f.extend(data),
            Codec::Upgrade { buf, .. } => buf.extend_from_slice(data),
            Codec::Ws(r) => r.extend(data),
        }
    }

    /// Bytes held for something not whole yet.
    pub(crate) fn buffered(&self) -> usize {
        match self {
            Codec::Sip(f) => f.buffered(),
            Codec::Upgrade { buf, .. } => buf.len(),
            Codec::Ws(r) => r.buffered(),
        }
    }

    /// The next thing the bytes came to, `None` until more arrive. `Err`: garbage, close.
    pub(crate) fn next(&mut self, allowed_origins: &[String]) -> Result<Option<Got>, String> {
        match self {
            Codec::Sip(f) => Ok(f.next_frame().map_err(|e| e.to_string())?.map(|frame| match frame {
                Frame::Message(m) => Got::Message(m),
                Frame::Ping => Got::Write(b"\r\n".to_vec()),
                Frame::Pong => Got::Alive,
            })),
            Codec::Upgrade { buf, max_message } => match accept_upgrade(buf, allowed_origins) {
                Err(UpgradeError::Incomplete) => Ok(None),
                Err(UpgradeError::Refused { response, reason }) => {
                    metrics::counter!("pinhole_sip_websocket_refused_total").increment(1);
                    tracing::debug!(reason, "WebSocket upgrade refused");
                    Ok(Some(Got::Close(response)))
                }
                Ok((used, response)) => {
                    let mut reader = WsReader::new(*max_message);
                    reader.extend(&buf[used..]);
                    *self = Codec::Ws(reader);
                    Ok(Some(Got::Write(response)))
                }
            },
            Codec::Ws(r) => Ok(r.next_event().map_err(|e| e.to_string())?.map(|event| match event {
                WsEvent::Message(m) => Got::Message(Bytes::from(m)),
                WsEvent::Reply(b) => Got::Write(b),
                WsEvent::Pong => Got::Alive,
                WsEvent::Close(b) => Got::Close(b),
            })),
        }
    }
}
