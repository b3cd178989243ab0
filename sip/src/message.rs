//! SIP message scanning (RFC 3261 §7) and byte-faithful splicing.
//!
//! A [`Message`] keeps the received bytes and the byte ranges of its start line, header
//! lines and body. Header values are parsed on demand with ezk-sip-types. Forwarding never
//! re-serialises a message: an [`Editor`] records replacements of byte ranges and splices
//! them into a copy of the original bytes, so everything pinhole does not touch arrives
//! exactly as it was sent.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use ezk_sip_types::header::typed::{Contact, FromTo, Routing, Via};
use ezk_sip_types::header::HeaderParse;
use ezk_sip_types::uri::NameAddr;

/// A SIP request method (RFC 3261 §7.1 plus the common extensions).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Update,
    Prack,
    Info,
    Message,
    Subscribe,
    Notify,
    Refer,
    Publish,
    Other(String),
}

impl Method {
    pub fn from_token(token: &str) -> Method {
        match token {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "UPDATE" => Method::Update,
            "PRACK" => Method::Prack,
            "INFO" => Method::Info,
            "MESSAGE" => Method::Message,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "PUBLISH" => Method::Publish,
            other => Method::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Other(s) => s,
            known => known.label(),
        }
    }

    /// A metrics label: the method name for known methods, `OTHER` for extensions, so a
    /// stream of random methods cannot grow the label set without bound.
    pub fn label(&self) -> &'static str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Info => "INFO",
            Method::Message => "MESSAGE",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Publish => "PUBLISH",
            Method::Other(_) => "OTHER",
        }
    }

    /// Methods whose initial request creates a dialog, so the proxy Record-Routes them.
    pub fn creates_dialog(&self) -> bool {
        matches!(self, Method::Invite | Method::Subscribe | Method::Refer)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header names pinhole looks at, with compact forms (RFC 3261 §7.3.3) folded in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    MaxForwards,
    Route,
    RecordRoute,
    ContentLength,
    ContentType,
    Expires,
    Authorization,
    ProxyAuthorization,
    Require,
    ProxyRequire,
    Supported,
    Path,
    Other,
}

impl HeaderName {
    pub fn parse(name: &[u8]) -> HeaderName {
        let eq = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            1 => match name[0].to_ascii_lowercase() {
                b'v' => HeaderName::Via,
                b'f' => HeaderName::From,
                b't' => HeaderName::To,
                b'i' => HeaderName::CallId,
                b'm' => HeaderName::Contact,
                b'l' => HeaderName::ContentLength,
                b'c' => HeaderName::ContentType,
                b'k' => HeaderName::Supported,
                _ => HeaderName::Other,
            },
            _ if eq("via") => HeaderName::Via,
            _ if eq("from") => HeaderName::From,
            _ if eq("to") => HeaderName::To,
            _ if eq("call-id") => HeaderName::CallId,
            _ if eq("cseq") => HeaderName::CSeq,
            _ if eq("contact") => HeaderName::Contact,
            _ if eq("max-forwards") => HeaderName::MaxForwards,
            _ if eq("route") => HeaderName::Route,
            _ if eq("record-route") => HeaderName::RecordRoute,
            _ if eq("content-length") => HeaderName::ContentLength,
            _ if eq("content-type") => HeaderName::ContentType,
            _ if eq("expires") => HeaderName::Expires,
            _ if eq("authorization") => HeaderName::Authorization,
            _ if eq("proxy-authorization") => HeaderName::ProxyAuthorization,
            _ if eq("require") => HeaderName::Require,
            _ if eq("proxy-require") => HeaderName::ProxyRequire,
            _ if eq("supported") => HeaderName::Supported,
            _ if eq("path") => HeaderName::Path,
            _ => HeaderName::Other,
        }
    }

    /// Headers whose values may be combined into one comma-separated line (RFC 3261 §7.3.1).
    fn is_list(self) -> bool {
        matches!(
            self,
            HeaderName::Via
                | HeaderName::Contact
                | HeaderName::Route
                | HeaderName::RecordRoute
                | HeaderName::Require
                | HeaderName::ProxyRequire
                | HeaderName::Supported
                | HeaderName::Path
        )
    }
}

/// One header line as received.
#[derive(Clone, Debug)]
pub struct Header {
    pub name: HeaderName,
    /// The whole line including its terminator and any folded continuation lines.
    pub line: Range<usize>,
    /// The value, trimmed of surrounding white space.
    pub value: Range<usize>,
}

/// The first line of a message.
#[derive(Clone, Debug)]
pub enum StartLine {
    Request { method: Method, uri: Range<usize> },
    Response { code: u16, reason: Range<usize> },
}

/// Why a datagram or stream frame could not be read as a SIP message at all. Such input
/// gets no reply: it is dropped and counted (UDP) or closes the connection (streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Garbage {
    #[error("empty message")]
    Empty,
    #[error("no start line")]
    NoStartLine,
    #[error("malformed start line")]
    BadStartLine,
    #[error("malformed header line")]
    BadHeaderLine,
    #[error("header section not terminated")]
    Unterminated,
    #[error("message is not UTF-8")]
    NotUtf8,
}

/// A request that can be answered with an error response, and the response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: u16,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: u16, reason: impl Into<String>) -> Rejection {
        Rejection { code, reason: reason.into() }
    }
}

/// A scanned SIP message: the original bytes plus the ranges of its parts.
#[derive(Clone, Debug)]
pub struct Message {
    raw: Bytes,
    pub start: StartLine,
    start_line: Range<usize>,
    pub headers: Vec<Header>,
    /// Where the header section ends (the offset of the empty line).
    head_end: usize,
    pub body: Range<usize>,
    /// The top Via, parsed once on first use.
    top_via: std::cell::OnceCell<Option<Via>>,
    /// From's and To's name-addr and the Request-URI, parsed once on first use (validation
    /// and routing both need them).
    from: std::cell::OnceCell<Option<NameAddr>>,
    to: std::cell::OnceCell<Option<NameAddr>>,
    request_uri: std::cell::OnceCell<Option<ezk_sip_types::uri::SipUri>>,
    /// Where From's and To's tags are, found once (routing asks for them many times).
    tags: std::cell::OnceCell<[Option<Range<usize>>; 2]>,
}

/// Upper bound on header lines accepted in one message.
const MAX_HEADERS: usize = 256;

impl Message {
    /// Scans `raw` as one complete SIP message (a UDP datagram, or one frame cut from a
    /// stream by [`crate::stream::Framer`]).
    pub fn parse(raw: Bytes) -> Result<Message, Garbage> {
        let data: &[u8] = &raw;
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(Garbage::Empty);
        }
        let (start_line, mut pos) = next_line(data, 0).ok_or(Garbage::NoStartLine)?;
        let start_text = std::str::from_utf8(&data[start_line.clone()]).map_err(|_| Garbage::NotUtf8)?;
        let start = parse_start_line(start_text, start_line.start)?;

        let mut headers = Vec::new();
        let head_end;
        loop {
            let Some((line, next)) = next_line(data, pos) else {
                return Err(Garbage::Unterminated);
            };
            if line.is_empty() {
                head_end = pos;
                pos = next;
                break;
            }
            // Fold continuation lines (RFC 3261 §7.3.1).
            let mut end = line.end;
            let mut after = next;
            while matches!(data.get(after), Some(b' ' | b'\t')) {
                match next_line(data, after) {
                    Some((cont, n)) => {
                        end = cont.end;
                        after = n;
                    }
                    None => return Err(Garbage::Unterminated),
                }
            }
            let text = &data[line.start..end];
            let colon = memchr::memchr(b':', text).ok_or(Garbage::BadHeaderLine)?;
            let name_bytes = trim(&text[..colon]);
            if name_bytes.is_empty() || !name_bytes.iter().all(|&b| is_token(b)) {
                return Err(Garbage::BadHeaderLine);
            }
            let vstart = line.start + colon + 1;
            let value = trim_range(data, vstart..end);
            headers.push(Header { name: HeaderName::parse(name_bytes), line: line.start..after, value });
            if headers.len() > MAX_HEADERS {
                return Err(Garbage::BadHeaderLine);
            }
            pos = after;
        }
        // Every header value must be text: one check over the whole section (the start
        // line was checked above).
        if std::str::from_utf8(&data[start_line.end..head_end]).is_err() {
            return Err(Garbage::NotUtf8);
        }
        let body = pos..data.len();
        Ok(Message {
            raw,
            start,
            start_line,
            headers,
            head_end,
            body,
            top_via: Default::default(),
            from: Default::default(),
            to: Default::default(),
            request_uri: Default::default(),
            tags: Default::default(),
        })
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// The Request-URI as received.
    pub fn request_uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(self.text(uri.clone())),
            StartLine::Response { .. } => None,
        }
    }

    pub fn reason(&self) -> &str {
        match &self.start {
            StartLine::Response { reason, .. } => self.text(reason.clone()),
            StartLine::Request { .. } => "",
        }
    }

    /// Text of a range known to lie within a scanned, UTF-8-checked part.
    pub fn text(&self, r: Range<usize>) -> &str {
        self.raw.get(r).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("")
    }

    pub fn body_bytes(&self) -> &[u8] {
        self.raw.get(self.body.clone()).unwrap_or(&[])
    }

    /// The first value of a single-valued header.
    pub fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers.iter().find(|h| h.name == name).map(|h| self.text(h.value.clone()))
    }

    /// Every value of a header, splitting comma-separated lists where the header allows it.
    /// Each item is (index into `headers`, range of the value).
    pub fn values(&self, name: HeaderName) -> Vec<(usize, Range<usize>)> {
        let mut out = Vec::new();
        for (i, h) in self.headers.iter().enumerate().filter(|(_, h)| h.name == name) {
            if name.is_list() {
                for r in split_list(&self.raw, h.value.clone()) {
                    out.push((i, r));
                }
            } else {
                out.push((i, h.value.clone()));
            }
        }
        out
    }

    /// The first value of an extension header, by its name (case-insensitive).
    pub fn extension_header(&self, name: &str) -> Option<&str> {
        self.extension_headers(name).next().map(|(_, r)| self.text(r))
    }

    /// (header index, value range) of every extension header by this name.
    pub fn extension_headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (usize, Range<usize>)> + 'a {
        self.headers.iter().enumerate().filter(|(_, h)| h.name == HeaderName::Other).filter_map(move |(i, h)| {
            let (n, _) = self.text(h.line.clone()).split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| (i, h.value.clone()))
        })
    }

    pub fn value_texts(&self, name: HeaderName) -> Vec<&str> {
        self.values(name).into_iter().map(|(_, r)| self.text(r)).collect()
    }

    pub fn call_id(&self) -> Option<&str> {
        self.header(HeaderName::CallId).filter(|s| !s.is_empty())
    }

    /// CSeq number and method (RFC 3261 §20.16).
    pub fn cseq(&self) -> Option<(u32, Method)> {
        let v = self.header(HeaderName::CSeq)?;
        let mut it = v.split_ascii_whitespace();
        let num = it.next()?.parse::<u32>().ok()?;
        let method = Method::from_token(it.next()?);
        if it.next().is_some() {
            return None;
        }
        Some((num, method))
    }

    pub fn max_forwards(&self) -> Option<Result<u32, ()>> {
        self.header(HeaderName::MaxForwards)
            .map(|v| v.parse::<u32>().map_err(|_| ()).and_then(|n| if n > 255 { Err(()) } else { Ok(n) }))
    }

    pub fn content_length(&self) -> Option<Result<usize, ()>> {
        self.header(HeaderName::ContentLength).map(|v| v.parse::<usize>().map_err(|_| ()))
    }

    /// The top Via, parsed (once).
    pub fn top_via(&self) -> Option<&Via> {
        self.top_via
            .get_or_init(|| {
                let (_, r) = self.values(HeaderName::Via).into_iter().next()?;
                self.parse_value::<Via>(r)
            })
            .as_ref()
    }

    /// The branch parameter of the top Via. A request's top Via is parsed in full (it is
    /// validated and routed by); a response only needs the branch to find its transaction,
    /// so its parameters are scanned without parsing the rest.
    pub fn branch(&self) -> Option<&str> {
        if self.is_request() {
            return self.top_via()?.params.get_val("branch").map(|b| b.as_str());
        }
        let h = self.headers.iter().find(|h| h.name == HeaderName::Via)?;
        let first = split_list(&self.raw, h.value.clone()).into_iter().next()?;
        let v = self.text(first);
        let params = v.find(';')?;
        let r = param_in(&v[params..], "branch")?;
        Some(&v[params + r.start..params + r.end]).filter(|b| !b.is_empty())
    }

    pub fn vias(&self) -> Vec<Option<Via>> {
        self.values(HeaderName::Via).into_iter().map(|(_, r)| self.parse_value::<Via>(r)).collect()
    }

    /// The tag parameter of From or To.
    pub fn tag(&self, name: HeaderName) -> Option<&str> {
        let i = match name {
            HeaderName::From => 0,
            HeaderName::To => 1,
            _ => return param_of_name_addr(self.header(name)?, "tag"),
        };
        let tags = self.tags.get_or_init(|| {
            [HeaderName::From, HeaderName::To].map(|name| {
                let h = self.headers.iter().find(|h| h.name == name)?;
                let tag = param_range_of_name_addr(self.text(h.value.clone()), "tag")?;
                Some(h.value.start + tag.start..h.value.start + tag.end)
            })
        });
        tags[i].clone().map(|r| self.text(r))
    }

    /// The URI inside From or To (parsed once; `None` for any other header).
    pub fn name_addr(&self, name: HeaderName) -> Option<&NameAddr> {
        let cell = match name {
            HeaderName::From => &self.from,
            HeaderName::To => &self.to,
            _ => return None,
        };
        cell.get_or_init(|| {
            let h = self.headers.iter().find(|h| h.name == name)?;
            self.parse_value::<FromTo>(h.value.clone()).map(|ft| ft.uri)
        })
        .as_ref()
    }

    pub fn contacts(&self) -> Vec<(Range<usize>, Option<Contact>)> {
        self.values(HeaderName::Contact)
            .into_iter()
            .map(|(_, r)| {
                let parsed = self.parse_value::<Contact>(r.clone());
                (r, parsed)
            })
            .collect()
    }

    /// Parses a value range with an ezk-sip-types header parser, requiring that it consume
    /// the whole value.
    pub fn parse_value<T: HeaderParse>(&self, r: Range<usize>) -> Option<T> {
        let text = self.text(r);
        match T::parse(&self.raw, text) {
            Ok((rest, v)) if rest.trim().is_empty() => Some(v),
            _ => None,
        }
    }

    /// [`Self::validate_request`] after the whole-message limit (513).
    pub fn check_request(&self, max_message: usize, max_body: usize) -> Result<(), Rejection> {
        if self.raw.len() > max_message {
            return Err(Rejection::new(513, "Message Too Large"));
        }
        self.validate_request(max_body)
    }

    /// Checks a request for the errors RFC 3261 says must be answered, returning the
    /// response to send. The checks that need routing state (483, 420 for Proxy-Require,
    /// 416 scheme) are here too so that every entry point applies them alike.
    pub fn validate_request(&self, max_body: usize) -> Result<(), Rejection> {
        let Some(method) = self.method() else {
            return Ok(());
        };
        for (name, label) in [
            (HeaderName::Via, "Via"),
            (HeaderName::From, "From"),
            (HeaderName::To, "To"),
            (HeaderName::CallId, "Call-ID"),
            (HeaderName::CSeq, "CSeq"),
        ] {
            if self.header(name).is_none() {
                return Err(Rejection::new(400, format!("Missing {label} Header")));
            }
        }
        if self.call_id().is_none() {
            return Err(Rejection::new(400, "Empty Call-ID Header"));
        }
        let Some((_, cseq_method)) = self.cseq() else {
            return Err(Rejection::new(400, "Malformed CSeq Header"));
        };
        if &cseq_method != method {
            return Err(Rejection::new(400, "CSeq Method Does Not Match Request Method"));
        }
        // The top Via is parsed once and kept (the proxy reads it again); the rest only here.
        let vias = self.values(HeaderName::Via);
        if self.top_via().is_none() || vias.into_iter().skip(1).any(|(_, r)| self.parse_value::<Via>(r).is_none()) {
            return Err(Rejection::new(400, "Malformed Via Header"));
        }
        if self.branch().is_none() {
            // RFC 2543 peers send no branch; pinhole needs one to match transactions.
            return Err(Rejection::new(400, "Missing Via Branch Parameter"));
        }
        if self.name_addr(HeaderName::From).is_none() {
            return Err(Rejection::new(400, "Malformed From Header"));
        }
        if self.name_addr(HeaderName::To).is_none() {
            return Err(Rejection::new(400, "Malformed To Header"));
        }
        if let Some(Err(())) = self.max_forwards() {
            return Err(Rejection::new(400, "Malformed Max-Forwards Header"));
        }
        match self.content_length() {
            Some(Err(())) => return Err(Rejection::new(400, "Malformed Content-Length Header")),
            Some(Ok(n)) if n > self.body.len() => {
                return Err(Rejection::new(400, "Content-Length Exceeds Message Body"))
            }
            _ => {}
        }
        if self.body.len() > max_body {
            return Err(Rejection::new(413, "Request Body Too Large"));
        }
        let uri = self.request_uri().unwrap_or("");
        let scheme = uri.split(':').next().unwrap_or("").to_ascii_lowercase();
        if scheme != "sip" && scheme != "sips" {
            return Err(Rejection::new(416, "Unsupported URI Scheme"));
        }
        if self.request_sip_uri().is_none() {
            return Err(Rejection::new(400, "Malformed Request-URI"));
        }
        for (name, label) in [(HeaderName::Contact, "Contact"), (HeaderName::Route, "Route")] {
            for (_, r) in self.values(name) {
                let text = self.text(r.clone());
                if text == "*" && name == HeaderName::Contact {
                    continue;
                }
                let ok = match name {
                    HeaderName::Contact => self.parse_value::<Contact>(r.clone()).is_some(),
                    _ => self.parse_value::<Routing>(r.clone()).is_some(),
                };
                if !ok {
                    return Err(Rejection::new(400, format!("Malformed {label} Header")));
                }
            }
        }
        Ok(())
    }

    /// The Request-URI as a SIP URI (parsed once).
    pub fn request_sip_uri(&self) -> Option<&ezk_sip_types::uri::SipUri> {
        self.request_uri
            .get_or_init(|| {
                let StartLine::Request { uri, .. } = &self.start else {
                    return None;
                };
                let text = self.text(uri.clone());
                use ezk_sip_types::parse::Parse;
                match ezk_sip_types::uri::SipUri::parse(&self.raw)(text) {
                    Ok(("", u)) => Some(u),
                    _ => None,
                }
            })
            .as_ref()
    }

    /// The message truncated to Content-Length (UDP allows trailing bytes, RFC 3261 §18.3).
    pub fn truncated_to_content_length(self) -> Message {
        match self.content_length() {
            Some(Ok(n)) if n < self.body.len() => {
                let end = self.body.start + n;
                let raw = self.raw.slice(..end);
                Message { raw, body: self.body.start..end, ..self }
            }
            _ => self,
        }
    }

    /// Builds a response to this request (RFC 3261 §8.2.6): Via, From, To, Call-ID and CSeq
    /// are copied byte for byte; a To tag is added when given and absent.
    pub fn response(&self, code: u16, reason: &str, to_tag: Option<&str>, extra: &[String]) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(format!("SIP/2.0 {code} {reason}\r\n").as_bytes());
        for h in &self.headers {
            match h.name {
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    self.copy_line(&mut out, h);
                }
                HeaderName::To => {
                    let value = self.text(h.value.clone());
                    out.extend_from_slice(b"To: ");
                    out.extend_from_slice(value.as_bytes());
                    if let (Some(tag), None) = (to_tag, param_of_name_addr(value, "tag")) {
                        if code > 100 {
                            out.extend_from_slice(b";tag=");
                            out.extend_from_slice(tag.as_bytes());
                        }
                    }
                    out.extend_from_slice(b"\r\n");
                }
                _ => {}
            }
        }
        for e in extra {
            out.extend_from_slice(e.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Server: pinhole\r\nContent-Length: 0\r\n\r\n");
        out
    }

    fn copy_line(&self, out: &mut Vec<u8>, h: &Header) {
        let line = self.raw.get(h.line.clone()).unwrap_or(&[]);
        out.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Offset where a new header line can be inserted at the top of the header section.
    pub fn first_header_offset(&self) -> usize {
        self.headers.first().map(|h| h.line.start).unwrap_or(self.head_end)
    }

    pub fn head_end(&self) -> usize {
        self.head_end
    }

    pub fn start_line_range(&self) -> Range<usize> {
        self.start_line.clone()
    }
}

/// Records replacements of byte ranges of a message and splices them into a copy.
pub struct Editor<'a> {
    msg: &'a Message,
    edits: Vec<(Range<usize>, Vec<u8>)>,
}

impl<'a> Editor<'a> {
    pub fn new(msg: &'a Message) -> Editor<'a> {
        Editor { msg, edits: Vec::new() }
    }

    pub fn replace(&mut self, range: Range<usize>, with: impl Into<Vec<u8>>) -> &mut Self {
        self.edits.push((range, with.into()));
        self
    }

    pub fn insert(&mut self, at: usize, with: impl Into<Vec<u8>>) -> &mut Self {
        self.replace(at..at, with)
    }

    /// Inserts a header line at the top of the header section.
    pub fn prepend_header(&mut self, name: &str, value: &str) -> &mut Self {
        let at = self.msg.first_header_offset();
        self.insert(at, format!("{name}: {value}\r\n"))
    }

    /// Inserts a header line at the end of the header section.
    pub fn append_header(&mut self, name: &str, value: &str) -> &mut Self {
        let at = self.msg.head_end;
        self.insert(at, format!("{name}: {value}\r\n"))
    }

    /// Removes one value of a (possibly comma-separated) header; the whole line goes when it
    /// was the only value.
    pub fn remove_value(&mut self, header: usize, value: Range<usize>) -> &mut Self {
        let Some(h) = self.msg.headers.get(header) else {
            return self;
        };
        if !h.name.is_list() {
            return self.replace(h.line.clone(), Vec::new());
        }
        let parts = split_list(&self.msg.raw, h.value.clone());
        if parts.len() <= 1 {
            return self.replace(h.line.clone(), Vec::new());
        }
        let raw = &self.msg.raw;
        let Some(idx) = parts.iter().position(|p| *p == value) else {
            return self; // not a value of this header: nothing to remove
        };
        let range = if idx + 1 < parts.len() {
            value.start..parts[idx + 1].start
        } else {
            // Last value: remove from the preceding comma.
            let mut s = value.start;
            while s > h.value.start && raw.get(s - 1).is_some_and(|&b| b != b',') {
                s -= 1;
            }
            s.saturating_sub(1).max(h.value.start)..value.end
        };
        self.replace(range, Vec::new())
    }

    /// §16.6 step 3: Max-Forwards one less, or 69 where the request had none.
    pub fn decrement_max_forwards(&mut self) -> &mut Self {
        let msg = self.msg;
        match msg.headers.iter().find(|h| h.name == HeaderName::MaxForwards) {
            Some(h) => {
                let mf = msg.max_forwards().and_then(Result::ok).unwrap_or(70);
                self.replace(h.value.clone(), mf.saturating_sub(1).to_string())
            }
            None => self.append_header("Max-Forwards", "69"),
        }
    }

    /// Replaces the body and keeps Content-Length true.
    pub fn set_body(&mut self, body: &[u8]) -> &mut Self {
        let msg = self.msg;
        match msg.headers.iter().find(|h| h.name == HeaderName::ContentLength) {
            Some(h) => {
                self.replace(h.value.clone(), body.len().to_string());
            }
            None => {
                self.append_header("Content-Length", &body.len().to_string());
            }
        }
        self.replace(msg.body.clone(), body.to_vec())
    }

    /// Applies the edits. Edits must not overlap; inserts at one offset keep their order.
    pub fn finish(mut self) -> Vec<u8> {
        self.edits.sort_by_key(|(r, _)| (r.start, r.end));
        let raw: &[u8] = &self.msg.raw;
        let extra: usize = self.edits.iter().map(|(_, w)| w.len()).sum();
        let mut out = Vec::with_capacity(raw.len() + extra);
        let mut pos = 0;
        for (r, with) in &self.edits {
            if r.start < pos || r.end > raw.len() {
                continue; // overlapping or out of range: skip rather than corrupt
            }
            out.extend_from_slice(&raw[pos..r.start]);
            out.extend_from_slice(with);
            pos = r.end;
        }
        out.extend_from_slice(&raw[pos..]);
        out
    }
}

/// Returns (line range without terminator, offset after terminator). Accepts CRLF or LF.
fn next_line(data: &[u8], from: usize) -> Option<(Range<usize>, usize)> {
    let rest = data.get(from..)?;
    let nl = memchr::memchr(b'\n', rest)?;
    let mut end = from + nl;
    if end > from && data[end - 1] == b'\r' {
        end -= 1;
    }
    Some((from..end, from + nl + 1))
}

fn parse_start_line(text: &str, base: usize) -> Result<StartLine, Garbage> {
    if let Some(rest) = text.strip_prefix("SIP/2.0 ") {
        let code_str = rest.get(..3).ok_or(Garbage::BadStartLine)?;
        let code: u16 = code_str.parse().map_err(|_| Garbage::BadStartLine)?;
        if !(100..=699).contains(&code) {
            return Err(Garbage::BadStartLine);
        }
        if rest.len() > 3 && !rest[3..].starts_with(' ') {
            return Err(Garbage::BadStartLine);
        }
        let rstart = base + 8 + rest.len().min(4);
        return Ok(StartLine::Response { code, reason: rstart..base + text.len() });
    }
    let mut parts = text.splitn(3, ' ');
    let method = parts.next().ok_or(Garbage::BadStartLine)?;
    let uri = parts.next().ok_or(Garbage::BadStartLine)?;
    let version = parts.next().ok_or(Garbage::BadStartLine)?;
    if method.is_empty() || !method.bytes().all(is_token) || uri.is_empty() || version != "SIP/2.0" {
        return Err(Garbage::BadStartLine);
    }
    let ustart = base + method.len() + 1;
    Ok(StartLine::Request { method: Method::from_token(method), uri: ustart..ustart + uri.len() })
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

fn trim(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let e = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(s, |e| e + 1);
    &b[s..e]
}

fn trim_range(data: &[u8], r: Range<usize>) -> Range<usize> {
    let mut s = r.start;
    let mut e = r.end;
    while s < e && data[s].is_ascii_whitespace() {
        s += 1;
    }
    while e > s && data[e - 1].is_ascii_whitespace() {
        e -= 1;
    }
    s..e
}

/// Splits a comma-separated header value, ignoring commas inside quotes and angle brackets.
fn split_list(data: &[u8], r: Range<usize>) -> Vec<Range<usize>> {
    if memchr::memchr(b',', &data[r.clone()]).is_none() {
        // Most values are one item.
        let part = trim_range(data, r);
        return if part.is_empty() { Vec::new() } else { vec![part] };
    }
    let mut out = Vec::new();
    let mut in_quote = false;
    let mut in_angle = false;
    let mut escaped = false;
    let mut start = r.start;
    for i in r.clone() {
        let b = data[i];
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'<' if !in_quote => in_angle = true,
            b'>' if !in_quote => in_angle = false,
            b',' if !in_quote && !in_angle => {
                let part = trim_range(data, start..i);
                if !part.is_empty() {
                    out.push(part);
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    let part = trim_range(data, start..r.end);
    if !part.is_empty() {
        out.push(part);
    }
    out
}

/// A parameter of a name-addr header value (From/To/Contact), looked up after the URI.
/// Quoted display names and quoted parameter values may contain `<`, `>` and `;`.
pub fn param_of_name_addr<'v>(value: &'v str, name: &str) -> Option<&'v str> {
    value.get(param_range_of_name_addr(value, name)?)
}

/// Where [`param_of_name_addr`]'s value lies in `value`.
fn param_range_of_name_addr(value: &str, name: &str) -> Option<Range<usize>> {
    let bytes = value.as_bytes();
    let mut in_quote = false;
    let mut uri_end = None;
    let mut seen_angle = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => in_quote = !in_quote,
            b'<' if !in_quote => seen_angle = true,
            b'>' if !in_quote && seen_angle => {
                uri_end = Some(i + 1);
                break;
            }
            _ => {}
        }
    }
    let params = match uri_end {
        Some(i) => i,
        None if seen_angle => return None,
        None => value.find(';').unwrap_or(value.len()),
    };
    param_in(&value[params..], name).map(|r| params + r.start..params + r.end)
}

/// Where the value of parameter `name` lies in `;a=1;b="x;y"`: trimmed, and empty (at the
/// end of the name) for a flag.
fn param_in(params: &str, name: &str) -> Option<Range<usize>> {
    let pb = params.as_bytes();
    let mut start = 0;
    let mut in_quote = false;
    for i in 0..=pb.len() {
        let at_end = i == pb.len();
        if !at_end && pb[i] == b'"' {
            in_quote = !in_quote;
        }
        if at_end || (pb[i] == b';' && !in_quote) {
            let item = trim_range(pb, start..i);
            start = i + 1;
            let p = &params[item.clone()];
            if p.is_empty() {
                continue;
            }
            let (key, value) = match p.find('=') {
                Some(eq) => (&p[..eq], trim_range(pb, item.start + eq + 1..item.end)),
                None => (p, item.end..item.end),
            };
            if key.trim().eq_ignore_ascii_case(name) {
                return Some(value);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Message {
        Message::parse(Bytes::from(s.replace('\n', "\r\n"))).expect("scans")
    }

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK776asdhds;rport
Max-Forwards: 70
To: Bob <sip:bob@example.com>
From: Alice <sip:alice@example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.example.com
CSeq: 314159 INVITE
Contact: <sip:alice@198.51.100.7>
Content-Type: application/sdp
Content-Length: 4

v=0
";

    #[test]
    fn scans_request_parts() {
        let m = msg(INVITE);
        assert_eq!(m.method(), Some(&Method::Invite));
        assert_eq!(m.request_uri(), Some("sip:bob@example.com"));
        assert_eq!(m.call_id(), Some("a84b4c76e66710@pc33.example.com"));
        assert_eq!(m.cseq(), Some((314159, Method::Invite)));
        assert_eq!(m.tag(HeaderName::From), Some("1928301774"));
        assert_eq!(m.tag(HeaderName::To), None);
        assert_eq!(m.body_bytes(), b"v=0\r\n");
        assert_eq!(m.clone().truncated_to_content_length().body_bytes(), b"v=0\r");
        assert!(m.validate_request(65536).is_ok());
        let via = m.top_via().expect("via");
        assert_eq!(via.params.get_val("branch").map(|b| b.as_str()), Some("z9hG4bK776asdhds"));
    }

    #[test]
    fn compact_headers_are_understood() {
        let m = msg("BYE sip:bob@192.0.2.4 SIP/2.0
v: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa
t: <sip:bob@example.com>;tag=x
f: <sip:alice@example.com>;tag=y
i: abc
CSeq: 2 BYE
m: <sip:alice@198.51.100.7>
l: 0

");
        assert_eq!(m.call_id(), Some("abc"));
        assert!(m.top_via().is_some());
        assert_eq!(m.contacts().len(), 1);
        assert!(m.validate_request(100).is_ok());
    }

    #[test]
    fn several_vias_on_one_line_are_all_kept() {
        let m = msg("SIP/2.0 200 OK
Via: SIP/2.0/UDP 203.0.113.1;branch=z9hG4bKp1, SIP/2.0/TCP 198.51.100.2:5070;branch=z9hG4bKp2
Via: SIP/2.0/UDP [2001:db8::9]:5060;branch=z9hG4bKp3
To: <sip:b@x>;tag=1
From: <sip:a@x>;tag=2
Call-ID: c
CSeq: 1 INVITE
Content-Length: 0

");
        let vias = m.vias();
        assert_eq!(vias.len(), 3);
        assert!(vias.iter().all(Option::is_some));
        // Removing the top one keeps the other two byte for byte.
        let (hi, r) = m.values(HeaderName::Via)[0].clone();
        let mut e = Editor::new(&m);
        e.remove_value(hi, r);
        let out = String::from_utf8(e.finish()).expect("utf8");
        assert!(out.contains("Via: SIP/2.0/TCP 198.51.100.2:5070;branch=z9hG4bKp2\r\n"), "{out}");
        assert!(out.contains("Via: SIP/2.0/UDP [2001:db8::9]:5060;branch=z9hG4bKp3\r\n"));
        assert!(!out.contains("z9hG4bKp1"));
        // A range that is none of the header's values removes nothing (it once removed the first).
        let mut e = Editor::new(&m);
        e.remove_value(hi, 0..3);
        assert_eq!(e.finish(), m.raw().to_vec(), "unchanged");
    }

    #[test]
    fn instance_contacts_from_softphones_parse() {
        let m = msg("REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bKx
To: <sip:a@example.com>
From: <sip:a@example.com>;tag=1
Call-ID: r
CSeq: 1 REGISTER
Contact: <sip:a@x>;+sip.instance=\"<urn:uuid:1>\";reg-id=1, <sip:a@[2001:db8::1]:5062;transport=tcp>;expires=60
Content-Length: 0

");
        let contacts = m.contacts();
        assert_eq!(contacts.len(), 2);
        assert!(contacts.iter().all(|(_, c)| c.is_some()));
        assert!(m.validate_request(100).is_ok());
        let c0 = contacts[0].1.as_ref().expect("parsed");
        assert_eq!(c0.params.get_val("+sip.instance").map(|v| v.as_str()), Some("<urn:uuid:1>"));
        assert_eq!(param_of_name_addr(m.text(contacts[0].0.clone()), "+sip.instance"), Some("\"<urn:uuid:1>\""));
        assert_eq!(param_of_name_addr(m.text(contacts[0].0.clone()), "reg-id"), Some("1"));
    }

    #[test]
    fn missing_call_id_names_the_problem() {
        let m = msg("OPTIONS sip:x@example.com SIP/2.0
Via: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa
To: <sip:x@example.com>
From: <sip:a@example.com>;tag=y
CSeq: 1 OPTIONS

");
        assert_eq!(m.validate_request(100), Err(Rejection::new(400, "Missing Call-ID Header")));
    }

    #[test]
    fn tel_uri_is_an_unsupported_scheme() {
        let m = msg("INVITE tel:+15551234 SIP/2.0
Via: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa
To: <sip:x@example.com>
From: <sip:a@example.com>;tag=y
Call-ID: c
CSeq: 1 INVITE

");
        assert_eq!(m.validate_request(100).map_err(|r| r.code), Err(416));
    }

    #[test]
    fn garbage_is_not_a_message() {
        assert_eq!(Message::parse(Bytes::from_static(b"\x16\x03\x01hello")).err(), Some(Garbage::NoStartLine));
        assert_eq!(
            Message::parse(Bytes::from_static(b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\n")).err(),
            Some(Garbage::Unterminated)
        );
        assert_eq!(Message::parse(Bytes::from_static(b"hello world\r\n\r\n")).err(), Some(Garbage::BadStartLine));
        assert_eq!(Message::parse(Bytes::from_static(b"\r\n\r\n")).err(), Some(Garbage::Empty));
    }

    #[test]
    fn response_copies_dialog_headers_and_adds_tag() {
        let m = msg(INVITE);
        let r = String::from_utf8(m.response(486, "Busy Here", Some("t1"), &[])).expect("utf8");
        assert!(r.starts_with("SIP/2.0 486 Busy Here\r\n"));
        assert!(r.contains("To: Bob <sip:bob@example.com>;tag=t1\r\n"));
        assert!(r.contains("Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK776asdhds;rport\r\n"));
        let parsed = Message::parse(Bytes::from(r.into_bytes())).expect("response scans");
        assert_eq!(parsed.status(), Some(486));
    }

    #[test]
    fn set_body_keeps_content_length_true() {
        let m = msg(INVITE);
        let mut e = Editor::new(&m);
        e.set_body(b"v=0\r\no=- 1 1 IN IP4 203.0.113.1\r\n");
        let out = Message::parse(Bytes::from(e.finish())).expect("scans");
        assert_eq!(out.content_length(), Some(Ok(out.body.len())));
    }

    #[test]
    fn folded_header_lines_are_one_header() {
        let m = msg("OPTIONS sip:x@example.com SIP/2.0
Via: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa
Subject: I know you're there,
 pick up the phone
To: <sip:x@example.com>
From: <sip:a@example.com>;tag=y
Call-ID: c
CSeq: 1 OPTIONS

");
        assert_eq!(m.headers.len(), 6);
        assert!(m.validate_request(100).is_ok());
    }

    #[test]
    fn a_responses_branch_is_found_in_its_top_via_alone() {
        let r = msg("SIP/2.0 200 OK\nVia: SIP/2.0/UDP 192.0.2.1:5060;rport=5060;BRANCH=z9hG4bKabc;received=192.0.2.1, SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKother\nCall-ID: x\n\n");
        assert_eq!(r.branch(), Some("z9hG4bKabc"));
        let quoted =
            msg("SIP/2.0 180 Ringing\nVia: SIP/2.0/UDP [2001:db8::1]:5060;x=\"a;branch=no\";branch=z9hG4bKv6\n\n");
        assert_eq!(quoted.branch(), Some("z9hG4bKv6"), "a quoted ';' is not a parameter boundary");
        assert_eq!(
            msg("SIP/2.0 200 OK\nVia: SIP/2.0/UDP 192.0.2.1;branch\n\n").branch(),
            None,
            "a bare flag is no branch"
        );
        assert_eq!(msg("SIP/2.0 200 OK\nVia: SIP/2.0/UDP 192.0.2.1\n\n").branch(), None);
        assert_eq!(msg("SIP/2.0 200 OK\nCall-ID: x\n\n").branch(), None);
    }

    #[test]
    fn a_bare_tag_parameter_is_an_empty_tag_not_a_crash() {
        // Found by the sip_message fuzz target.
        let m = msg("INVITE sip:bob@example.com SIP/2.0\nFrom: <sip:c@x>;tag\nTo: <sip:bob@example.com>;tag=b1\n\n");
        assert_eq!(m.tag(HeaderName::From), Some(""));
        assert_eq!(m.tag(HeaderName::To), Some("b1"));
    }
}
