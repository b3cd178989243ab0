//! Content-Length framing of SIP over TCP/TLS (RFC 3261 §18.3) with RFC 5626 §4.4.1
//! CRLF keepalives.

use bytes::{Buf, Bytes, BytesMut};

/// What the framer found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete message, head and body.
    Message(Bytes),
    /// A double-CRLF "ping": answer with a single CRLF "pong".
    Ping,
    /// A single CRLF "pong" in reply to our ping.
    Pong,
}

/// Why a stream must be closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("missing or malformed Content-Length on a stream")]
    BadContentLength,
}

/// Cuts messages out of a byte stream. Feed it with [`Framer::extend`], then call
/// [`Framer::next_frame`] until it returns `Ok(None)`.
pub struct Framer {
    buf: BytesMut,
    max: usize,
}

impl Framer {
    pub fn new(max_message: usize) -> Framer {
        Framer { buf: BytesMut::with_capacity(4096), max: max_message }
    }

    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        // Keepalives between messages.
        if self.buf.starts_with(b"\r\n\r\n") {
            self.buf.advance(4);
            return Ok(Some(Frame::Ping));
        }
        if self.buf.starts_with(b"\r\n") {
            if self.buf.len() < 4 && b"\r\n\r\n".starts_with(&self.buf) {
                // Could be the start of a ping or a lone pong; a pong is exactly CRLF.
                if self.buf.len() == 2 {
                    self.buf.advance(2);
                    return Ok(Some(Frame::Pong));
                }
                return Ok(None);
            }
            self.buf.advance(2);
            return Ok(Some(Frame::Pong));
        }
        let Some(head_end) = find(&self.buf, b"\r\n\r\n") else {
            if self.buf.len() > self.max {
                return Err(StreamError::TooLarge(self.max));
            }
            return Ok(None);
        };
        let head = &self.buf[..head_end];
        let len = content_length(head).ok_or(StreamError::BadContentLength)?;
        let total = (head_end + 4).checked_add(len).ok_or(StreamError::TooLarge(self.max))?;
        if total > self.max {
            return Err(StreamError::TooLarge(self.max));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        Ok(Some(Frame::Message(self.buf.split_to(total).freeze())))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> Option<usize> {
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            let v = std::str::from_utf8(line[colon + 1..].trim_ascii()).ok()?;
            return v.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pipelined_messages_and_keepalives() {
        let mut f = Framer::new(4096);
        f.extend(b"\r\n\r\nOPTIONS sip:a SIP/2.0\r\nContent-Length: 3\r\n\r\nabcSIP/2.0 200 OK\r\nl: 0\r\n\r\n\r\n");
        assert_eq!(f.next_frame(), Ok(Some(Frame::Ping)));
        match f.next_frame() {
            Ok(Some(Frame::Message(m))) => assert!(m.ends_with(b"abc")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Message(_)))));
        assert_eq!(f.next_frame(), Ok(Some(Frame::Pong)));
        assert_eq!(f.next_frame(), Ok(None));
    }

    #[test]
    fn waits_for_the_whole_body() {
        let mut f = Framer::new(4096);
        f.extend(b"MESSAGE sip:a SIP/2.0\r\nContent-Length: 5\r\n\r\nab");
        assert_eq!(f.next_frame(), Ok(None));
        f.extend(b"cde");
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Message(_)))));
    }

    #[test]
    fn stream_without_content_length_is_closed() {
        let mut f = Framer::new(4096);
        f.extend(b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\n\r\n");
        assert_eq!(f.next_frame(), Err(StreamError::BadContentLength));
    }

    #[test]
    fn content_length_near_usize_max_is_refused_not_overflowed() {
        let mut f = Framer::new(100);
        f.extend(format!("MESSAGE sip:a SIP/2.0\r\nl: {}\r\n\r\n", usize::MAX).as_bytes());
        assert_eq!(f.next_frame(), Err(StreamError::TooLarge(100)));
    }

    #[test]
    fn oversized_message_is_refused_before_it_is_buffered_whole() {
        let mut f = Framer::new(100);
        f.extend(b"MESSAGE sip:a SIP/2.0\r\nContent-Length: 1000000\r\n\r\n");
        assert_eq!(f.next_frame(), Err(StreamError::TooLarge(100)));
        let mut g = Framer::new(100);
        g.extend(&[b'a'; 200]);
        assert_eq!(g.next_frame(), Err(StreamError::TooLarge(100)));
    }
}
