//! A raw SIP user agent over UDP for tests that play an attacker or a phone by hand:
//! messages are text, digest answers are computed with pinhole-sip's own helpers.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use pinhole_sip::auth::{Algorithm, Challenge, Credentials};

pub struct Phone {
    pub sock: UdpSocket,
}

impl Phone {
    /// A socket on `ip` (any 127.x address is local on Linux), port chosen by the kernel.
    pub fn bind(ip: &str) -> Phone {
        let sock = UdpSocket::bind((ip, 0)).expect("bind phone");
        Phone { sock }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local addr")
    }

    /// Sends `text` (lines may end in `\n`; they go out as CRLF). Returns the bytes sent.
    pub fn send(&self, to: &str, text: &str) -> usize {
        let wire = crlf(text);
        self.sock.send_to(wire.as_bytes(), to).expect("send")
    }

    /// The next datagram matching `want`, within `timeout`.
    pub fn recv_where(&self, timeout: Duration, want: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.sock.set_read_timeout(Some(left)).expect("timeout");
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if want(&text) {
                    return Some(text);
                }
            }
        }
        None
    }

    /// The next response (not a request), within 2 s.
    pub fn response(&self) -> Option<String> {
        self.recv_where(Duration::from_secs(2), |m| m.starts_with("SIP/2.0 ") && status(m) != Some(100))
    }

    /// Every datagram that arrives within `wait`.
    pub fn collect(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        self.sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }
}

pub fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

pub fn status(msg: &str) -> Option<u16> {
    msg.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// The first value of header `name` (case-insensitive, full names only).
pub fn header<'m>(msg: &'m str, name: &str) -> Option<&'m str> {
    msg.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The credentials line (`Authorization: …` or `Proxy-Authorization: …`) answering the
/// MD5 challenge in `challenge` for `method` on `uri`.
pub fn answer(challenge: &str, user: &str, password: &str, method: &str, uri: &str, nc: u32) -> String {
    let (hname, cname) = if status(challenge) == Some(401) {
        ("Authorization", "WWW-Authenticate")
    } else {
        ("Proxy-Authorization", "Proxy-Authenticate")
    };
    let value = header(challenge, cname).unwrap_or_else(|| panic!("no {cname} in\n{challenge}"));
    let param = |k: &str| value.split(&format!("{k}=\"")).nth(1).and_then(|s| s.split('"').next()).map(str::to_owned);
    let (realm, nonce) = (param("realm").expect("realm"), param("nonce").expect("nonce"));
    let challenge = Challenge { realm: &realm, nonce: &nonce, algorithm: Algorithm::Md5 };
    let c = Credentials::answering(&challenge, user, password, method, uri, nc, "7e57");
    format!("{hname}: {}", c.header_value())
}

/// Inserts a header line before Content-Length.
pub fn with_header(msg: &str, line: &str) -> String {
    msg.replacen("Content-Length:", &format!("{line}\nContent-Length:"), 1)
}

/// A REGISTER for `user` from `phone` with a Contact of `contact`.
pub fn register(server: &str, user: &str, phone: SocketAddr, contact: &str, branch: &str, cseq: u32) -> String {
    format!(
        "REGISTER sip:pinhole.test SIP/2.0
Via: SIP/2.0/UDP {phone};branch=z9hG4bK{branch};rport
Max-Forwards: 70
To: <sip:{user}@pinhole.test>
From: <sip:{user}@pinhole.test>;tag=reg{branch}
Call-ID: reg-{user}-{branch}@{server}
CSeq: {cseq} REGISTER
Contact: <{contact}>
Expires: 600
Content-Length: 0

"
    )
}

/// Registers `user` from `phone`, answering the challenge. Returns the final response.
pub fn register_with_password(phone: &Phone, server: &str, user: &str, password: &str, tag: &str) -> String {
    let contact = format!("sip:{user}@{}", phone.addr());
    phone.send(server, &register(server, user, phone.addr(), &contact, &format!("{tag}a"), 1));
    let challenge = phone.response().expect("challenge");
    assert_eq!(status(&challenge), Some(401), "{challenge}");
    let creds = answer(&challenge, user, password, "REGISTER", "sip:pinhole.test", 1);
    phone.send(server, &with_header(&register(server, user, phone.addr(), &contact, &format!("{tag}b"), 2), &creds));
    phone.response().expect("final response")
}
