//! Digest authentication (RFC 3261 §22, RFC 8760: SHA-256 and MD5 with qop=auth).
//!
//! Nonces are stateless: `hex(issued_secs) . hex(mac(secret, issued_secs))`, so any
//! nonce pinhole issued can be checked without a table, and an old one is answered with
//! `stale=true`. Failed attempts are counted per source address and, past a limit, the
//! source is refused without checking (a brute-force brake).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use md5::Md5;
use sha2::{Digest, Sha256};

/// How long an issued nonce stays valid.
pub const NONCE_TTL: Duration = Duration::from_secs(300);
/// Failed attempts per source within [`FAIL_WINDOW`] before the source is refused.
pub const MAX_FAILURES: u32 = 10;
pub const FAIL_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    /// Parses the RFC 8760 algorithm token.
    pub fn from_name(s: &str) -> Option<Algorithm> {
        match s.to_ascii_uppercase().as_str() {
            "MD5" => Some(Algorithm::Md5),
            "SHA-256" => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    fn hash(self, data: &str) -> String {
        match self {
            Algorithm::Md5 => hex::encode(Md5::digest(data.as_bytes())),
            Algorithm::Sha256 => hex::encode(Sha256::digest(data.as_bytes())),
        }
    }
}

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Credentials are valid for this user.
    Authenticated(String),
    /// No credentials for our realm: challenge.
    Missing,
    /// The nonce was ours but has expired: challenge with `stale=true`.
    Stale,
    /// Wrong user, password or malformed credentials: challenge again.
    Failed,
    /// Too many failures from this source: refuse with 403.
    RateLimited,
}

/// Parsed `Digest` credentials (RFC 3261 §25.1 `digest-response`).
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Option<String>,
    pub qop: Option<String>,
    pub nc: Option<String>,
    pub cnonce: Option<String>,
}

impl Credentials {
    pub fn parse(value: &str) -> Option<Credentials> {
        let rest = value.trim();
        let (scheme, params) = rest.split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return None;
        }
        let mut c = Credentials::default();
        for (k, v) in auth_params(params)? {
            match k.to_ascii_lowercase().as_str() {
                "username" => c.username = v,
                "realm" => c.realm = v,
                "nonce" => c.nonce = v,
                "uri" => c.uri = v,
                "response" => c.response = v,
                "algorithm" => c.algorithm = Some(v),
                "qop" => c.qop = Some(v),
                "nc" => c.nc = Some(v),
                "cnonce" => c.cnonce = Some(v),
                _ => {}
            }
        }
        if c.username.is_empty() || c.nonce.is_empty() || c.response.is_empty() {
            return None;
        }
        Some(c)
    }
}

/// Splits `k=v, k="v"` lists, honouring quotes and backslash escapes.
fn auth_params(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return None;
        }
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => val.push(chars.next()?),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        out.push((key, val));
    }
}

struct Failures {
    count: u32,
    window_start: Instant,
}

pub struct Authenticator {
    realm: String,
    users: HashMap<String, String>,
    secret: [u8; 32],
    epoch: Instant,
    failures: HashMap<IpAddr, Failures>,
    algorithms: Vec<Algorithm>,
}

impl Authenticator {
    pub fn new(
        realm: &str,
        users: impl IntoIterator<Item = (String, String)>,
        secret: [u8; 32],
        epoch: Instant,
    ) -> Self {
        Authenticator {
            realm: realm.to_owned(),
            users: users.into_iter().collect(),
            secret,
            epoch,
            failures: HashMap::new(),
            algorithms: vec![Algorithm::Md5, Algorithm::Sha256],
        }
    }

    /// Which algorithms to offer, in the order the challenges are sent. Many deployed
    /// phones (libre/baresip 1.0 among them) answer only the first challenge and give up
    /// if they cannot compute it, so the default puts MD5 first; RFC 8760 §2.4 order is
    /// `[Sha256, Md5]`. Credentials are accepted only in an offered algorithm.
    pub fn with_algorithms(mut self, algorithms: Vec<Algorithm>) -> Self {
        if !algorithms.is_empty() {
            self.algorithms = algorithms;
        }
        self
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn knows_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    fn mac(&self, issued: u64) -> String {
        let mut h = Sha256::new();
        h.update(self.secret);
        h.update(issued.to_be_bytes());
        hex::encode(&h.finalize()[..12])
    }

    pub fn nonce(&self, now: Instant) -> String {
        let issued = now.saturating_duration_since(self.epoch).as_secs();
        format!("{issued:x}.{}", self.mac(issued))
    }

    /// The challenge header values to send, one per offered algorithm.
    pub fn challenges(&self, now: Instant, stale: bool) -> Vec<String> {
        let nonce = self.nonce(now);
        self.algorithms
            .iter()
            .copied()
            .map(|alg| {
                format!(
                    "Digest realm=\"{}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{}",
                    self.realm,
                    alg.name(),
                    if stale { ", stale=true" } else { "" }
                )
            })
            .collect()
    }

    /// Checks the credentials in `header_values` (Authorization or Proxy-Authorization) for
    /// a request with `method`.
    pub fn verify(&mut self, now: Instant, source: IpAddr, method: &str, header_values: &[&str]) -> Verdict {
        if let Some(f) = self.failures.get(&source) {
            if now.saturating_duration_since(f.window_start) < FAIL_WINDOW && f.count >= MAX_FAILURES {
                return Verdict::RateLimited;
            }
        }
        let Some(creds) = header_values.iter().filter_map(|v| Credentials::parse(v)).find(|c| c.realm == self.realm)
        else {
            return if header_values.is_empty() { Verdict::Missing } else { self.fail(now, source) };
        };
        match self.check(now, method, &creds) {
            Verdict::Failed => self.fail(now, source),
            v => v,
        }
    }

    fn check(&self, now: Instant, method: &str, c: &Credentials) -> Verdict {
        let Some((issued_hex, mac)) = c.nonce.split_once('.') else {
            return Verdict::Failed;
        };
        let Ok(issued) = u64::from_str_radix(issued_hex, 16) else {
            return Verdict::Failed;
        };
        if self.mac(issued) != mac {
            return Verdict::Failed;
        }
        let Some(password) = self.users.get(&c.username) else {
            return Verdict::Failed;
        };
        let alg = match c.algorithm.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("MD5") => Algorithm::Md5,
            Some("SHA-256") => Algorithm::Sha256,
            _ => return Verdict::Failed,
        };
        if !self.algorithms.contains(&alg) {
            return Verdict::Failed;
        }
        let expected = digest_response(alg, &c.username, &self.realm, password, method, c);
        if !constant_time_eq(expected.as_bytes(), c.response.to_ascii_lowercase().as_bytes()) {
            return Verdict::Failed;
        }
        let age = now.saturating_duration_since(self.epoch).as_secs().saturating_sub(issued);
        if age > NONCE_TTL.as_secs() {
            return Verdict::Stale;
        }
        Verdict::Authenticated(c.username.clone())
    }

    fn fail(&mut self, now: Instant, source: IpAddr) -> Verdict {
        let f = self.failures.entry(source).or_insert(Failures { count: 0, window_start: now });
        if now.saturating_duration_since(f.window_start) >= FAIL_WINDOW {
            f.count = 0;
            f.window_start = now;
        }
        f.count += 1;
        Verdict::Failed
    }

    /// Forgets failure windows that have ended.
    pub fn expire(&mut self, now: Instant) {
        self.failures.retain(|_, f| now.saturating_duration_since(f.window_start) < FAIL_WINDOW);
    }
}

/// The `response` value a client computes (RFC 2617 §3.2.2.1 with RFC 8760 hashes).
pub fn digest_response(
    alg: Algorithm,
    user: &str,
    realm: &str,
    password: &str,
    method: &str,
    c: &Credentials,
) -> String {
    let ha1 = alg.hash(&format!("{user}:{realm}:{password}"));
    let ha2 = alg.hash(&format!("{method}:{}", c.uri));
    match (c.qop.as_deref(), c.nc.as_deref(), c.cnonce.as_deref()) {
        (Some(qop), Some(nc), Some(cnonce)) => alg.hash(&format!("{ha1}:{}:{nc}:{cnonce}:{qop}:{ha2}", c.nonce)),
        _ => alg.hash(&format!("{ha1}:{}:{ha2}", c.nonce)),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(now: Instant) -> Authenticator {
        Authenticator::new("pinhole", [("alice".to_owned(), "secret".to_owned())], [7; 32], now)
    }

    fn answer(a: &Authenticator, now: Instant, alg: Algorithm, password: &str) -> String {
        let mut c = Credentials {
            username: "alice".into(),
            realm: "pinhole".into(),
            nonce: a.nonce(now),
            uri: "sip:example.com".into(),
            qop: Some("auth".into()),
            nc: Some("00000001".into()),
            cnonce: Some("abc".into()),
            ..Default::default()
        };
        c.response = digest_response(alg, "alice", "pinhole", password, "REGISTER", &c);
        format!(
            "Digest username=\"alice\", realm=\"pinhole\", nonce=\"{}\", uri=\"sip:example.com\", response=\"{}\", algorithm={}, qop=auth, nc=00000001, cnonce=\"abc\"",
            c.nonce,
            c.response,
            alg.name()
        )
    }

    #[test]
    fn sha256_and_md5_answers_are_accepted() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        for alg in [Algorithm::Sha256, Algorithm::Md5] {
            let h = answer(&a, t0, alg, "secret");
            assert_eq!(
                a.verify(t0, [198, 51, 100, 1].into(), "REGISTER", &[&h]),
                Verdict::Authenticated("alice".into())
            );
        }
    }

    #[test]
    fn wrong_password_fails_and_repeated_failures_are_rate_limited() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let src: IpAddr = [198, 51, 100, 2].into();
        let bad = answer(&a, t0, Algorithm::Md5, "guess");
        for _ in 0..MAX_FAILURES {
            assert_eq!(a.verify(t0, src, "REGISTER", &[&bad]), Verdict::Failed);
        }
        let good = answer(&a, t0, Algorithm::Md5, "secret");
        assert_eq!(a.verify(t0, src, "REGISTER", &[&good]), Verdict::RateLimited);
        // Another source is unaffected, and the window ends.
        assert_eq!(
            a.verify(t0, [198, 51, 100, 3].into(), "REGISTER", &[&good]),
            Verdict::Authenticated("alice".into())
        );
        let later = t0 + FAIL_WINDOW + Duration::from_secs(1);
        let fresh = answer(&a, later, Algorithm::Md5, "secret");
        assert_eq!(a.verify(later, src, "REGISTER", &[&fresh]), Verdict::Authenticated("alice".into()));
    }

    #[test]
    fn expired_nonce_is_stale_not_failed() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let h = answer(&a, t0, Algorithm::Sha256, "secret");
        let later = t0 + NONCE_TTL + Duration::from_secs(5);
        assert_eq!(a.verify(later, [198, 51, 100, 1].into(), "REGISTER", &[&h]), Verdict::Stale);
    }

    #[test]
    fn forged_nonce_is_refused() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let h = answer(&a, t0, Algorithm::Md5, "secret").replace("nonce=\"0.", "nonce=\"1.");
        assert_eq!(a.verify(t0, [198, 51, 100, 1].into(), "REGISTER", &[&h]), Verdict::Failed);
    }

    #[test]
    fn challenges_follow_the_configured_order() {
        let t0 = Instant::now();
        let a = auth(t0).with_algorithms(vec![Algorithm::Sha256, Algorithm::Md5]);
        let c = a.challenges(t0, true);
        assert!(c[0].contains("algorithm=SHA-256") && c[0].contains("stale=true"));
        assert!(c[1].contains("algorithm=MD5"));
        let d = auth(t0).challenges(t0, false);
        assert!(d[0].contains("algorithm=MD5") && !d[0].contains("stale"));
    }

    #[test]
    fn algorithm_not_offered_is_refused() {
        let t0 = Instant::now();
        let mut a = auth(t0).with_algorithms(vec![Algorithm::Sha256]);
        let h = answer(&a, t0, Algorithm::Md5, "secret");
        assert_eq!(a.verify(t0, [198, 51, 100, 1].into(), "REGISTER", &[&h]), Verdict::Failed);
    }
}
