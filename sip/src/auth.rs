//! Digest authentication (RFC 3261 §22, RFC 8760: SHA-256 and MD5 with qop=auth).
//!
//! Nonces are stateless to issue and cheap to check:
//! `hex(unix_secs) . hex(boot) . hex(salt) . hex(hmac(secret, all three))`. The wall-clock
//! time lets an old nonce be answered with `stale=true`; `boot` is random per process
//! start, so nothing captured before a restart is accepted after it; `salt` makes every
//! challenge's nonce unique. A nonce/nc pair is accepted once (a 64-wide window per nonce,
//! remembered for the nonce's life, in a bounded log), and the digest `uri` must be the
//! Request-URI, so captured credentials cannot be replayed or pointed elsewhere.
//!
//! Unknown users cost the same work as known ones, and failures are braked per source
//! prefix and per username ([`pinhole_media::guard`]).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use md5::Md5;
use pinhole_media::guard::{Admit, GuardConfig, GuessGuard};
use sha2::{Digest, Sha256};

use crate::mac::{ct_eq, hmac};

/// How long an issued nonce stays valid.
pub const NONCE_TTL: Duration = Duration::from_secs(300);
/// Most nonces whose used nc values are remembered; past it the oldest are forgotten and
/// every nonce issued up to the forgotten one's time counts as stale.
pub const MAX_TRACKED_NONCES: usize = 65_536;
/// A nc this far below the highest seen for its nonce is refused as too old.
const NC_WINDOW: u32 = 64;

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

    pub fn name(self) -> &'static str {
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
#[non_exhaustive]
pub enum Verdict {
    /// Credentials are valid for this user.
    Authenticated(String),
    /// No credentials for our realm: challenge.
    Missing,
    /// The nonce was ours but is old, or from an earlier run: challenge with `stale=true`.
    Stale,
    /// This nonce/nc pair was already used: challenge with `stale=true`.
    Replayed,
    /// Wrong user, password, URI or malformed credentials: challenge again.
    Failed,
    /// Too many failures from this source prefix: refuse with 403, unchecked.
    RateLimited,
    /// Too many failures for this username: refuse unchecked for this long.
    UserDelayed(Duration),
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

/// What a client needs from a challenge to answer it.
#[derive(Debug, Clone, Copy)]
pub struct Challenge<'a> {
    pub realm: &'a str,
    pub nonce: &'a str,
    pub algorithm: Algorithm,
}

impl Credentials {
    /// The client's side (RFC 2617 §3.2.2, qop=auth): credentials answering `challenge` for
    /// `method` on `uri`, the `nc`-th request under its nonce, with client nonce `cnonce`.
    pub fn answering(
        challenge: &Challenge<'_>,
        user: &str,
        password: &str,
        method: &str,
        uri: &str,
        nc: u32,
        cnonce: &str,
    ) -> Credentials {
        let mut c = Credentials {
            username: user.to_owned(),
            realm: challenge.realm.to_owned(),
            nonce: challenge.nonce.to_owned(),
            uri: uri.to_owned(),
            algorithm: Some(challenge.algorithm.name().to_owned()),
            qop: Some("auth".into()),
            nc: Some(format!("{nc:08x}")),
            cnonce: Some(cnonce.to_owned()),
            ..Default::default()
        };
        c.response = digest_response(challenge.algorithm, user, challenge.realm, password, method, &c);
        c
    }

    /// The `Authorization`/`Proxy-Authorization` value carrying these credentials.
    pub fn header_value(&self) -> String {
        let mut v = format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{}\"",
            self.username, self.realm, self.nonce, self.uri, self.response
        );
        if let Some(a) = &self.algorithm {
            v.push_str(&format!(", algorithm={a}"));
        }
        if let (Some(qop), Some(nc), Some(cnonce)) = (&self.qop, &self.nc, &self.cnonce) {
            v.push_str(&format!(", qop={qop}, nc={nc}, cnonce=\"{cnonce}\""));
        }
        v
    }
}

/// Splits `k=v, k="v"` lists, honouring quotes and backslash escapes.
pub(crate) fn auth_params(s: &str) -> Option<Vec<(String, String)>> {
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

/// Which nc values of each nonce were used, remembered while the nonce is valid.
#[derive(Default)]
struct NonceLog {
    used: HashMap<String, NcWindow>,
    /// (first use, issue time, key), oldest first.
    order: VecDeque<(Instant, u64, String)>,
    /// Nonces issued at or before this unix time and not in `used` are stale.
    floor: u64,
}

struct NcWindow {
    max: u32,
    /// Bit i: `max - i` was used.
    seen: u64,
}

impl NcWindow {
    fn accept(&mut self, nc: u32) -> bool {
        if nc > self.max {
            let shift = nc - self.max;
            self.seen = if shift >= NC_WINDOW { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.max = nc;
            return true;
        }
        let back = self.max - nc;
        if back >= NC_WINDOW || self.seen & (1 << back) != 0 {
            return false;
        }
        self.seen |= 1 << back;
        true
    }
}

impl NonceLog {
    /// Records one use; false if it was used before (or can no longer be told apart).
    fn accept(&mut self, now: Instant, key: String, issued: u64, nc: u32) -> bool {
        if let Some(w) = self.used.get_mut(&key) {
            return w.accept(nc);
        }
        if issued <= self.floor {
            return false;
        }
        while self.used.len() >= MAX_TRACKED_NONCES {
            let Some((_, t, k)) = self.order.pop_front() else { break };
            self.used.remove(&k);
            self.floor = self.floor.max(t);
        }
        self.used.insert(key.clone(), NcWindow { max: nc, seen: 1 });
        self.order.push_back((now, issued, key));
        true
    }

    fn expire(&mut self, now: Instant) {
        while let Some((t, _, _)) = self.order.front() {
            // A nonce is issued before its first use, so it is stale by now.
            if now.saturating_duration_since(*t) <= NONCE_TTL + Duration::from_secs(2) {
                break;
            }
            if let Some((_, _, k)) = self.order.pop_front() {
                self.used.remove(&k);
            }
        }
    }
}

/// The parts of a nonce pinhole issued.
struct Nonce {
    issued: u64,
    boot: u64,
}

pub struct Authenticator {
    realm: String,
    users: HashMap<String, String>,
    /// Stands in for the password of unknown users, so they cost the same work.
    decoy: String,
    secret: [u8; 32],
    boot: u64,
    salt: u64,
    epoch: Instant,
    unix_epoch: u64,
    guard: GuessGuard,
    nonces: NonceLog,
    algorithms: Vec<Algorithm>,
}

impl Authenticator {
    /// `boot` must be random per process start; `unix_now` is the wall clock at `now`.
    pub fn new(
        realm: &str,
        users: impl IntoIterator<Item = (String, String)>,
        secret: [u8; 32],
        boot: u64,
        now: Instant,
        unix_now: u64,
    ) -> Self {
        Authenticator {
            realm: realm.to_owned(),
            users: users.into_iter().collect(),
            decoy: hex::encode(hmac(&secret, "decoy", &[&boot.to_be_bytes()])),
            secret,
            boot,
            salt: boot.rotate_left(17),
            epoch: now,
            unix_epoch: unix_now,
            guard: GuessGuard::new(GuardConfig::default()),
            nonces: NonceLog::default(),
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

    pub fn with_guard(mut self, cfg: GuardConfig) -> Self {
        self.guard = GuessGuard::new(cfg);
        self
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn knows_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    fn unix(&self, now: Instant) -> u64 {
        self.unix_epoch + now.saturating_duration_since(self.epoch).as_secs()
    }

    fn nonce_mac(&self, issued: u64, boot: u64, salt: u64) -> String {
        let d = hmac(&self.secret, "nonce", &[&issued.to_be_bytes(), &boot.to_be_bytes(), &salt.to_be_bytes()]);
        hex::encode(&d[..12])
    }

    /// A fresh nonce; every call gives a different one.
    pub fn nonce(&mut self, now: Instant) -> String {
        self.salt = self.salt.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let (issued, boot, salt) = (self.unix(now), self.boot, self.salt);
        format!("{issued:x}.{boot:016x}.{salt:016x}.{}", self.nonce_mac(issued, boot, salt))
    }

    fn parse_nonce(&self, nonce: &str) -> Option<Nonce> {
        let mut it = nonce.split('.');
        let (issued_hex, boot_hex, salt_hex, mac) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || issued_hex.len() > 16 || boot_hex.len() != 16 || salt_hex.len() != 16 {
            return None;
        }
        let issued = u64::from_str_radix(issued_hex, 16).ok()?;
        let boot = u64::from_str_radix(boot_hex, 16).ok()?;
        let salt = u64::from_str_radix(salt_hex, 16).ok()?;
        ct_eq(self.nonce_mac(issued, boot, salt).as_bytes(), mac.as_bytes()).then_some(Nonce { issued, boot })
    }

    /// The challenge header values to send, one per offered algorithm, sharing one nonce.
    pub fn challenges(&mut self, now: Instant, stale: bool) -> Vec<String> {
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
    /// a request with `method` and `request_uri`, received from `source`.
    pub fn verify(
        &mut self,
        now: Instant,
        source: IpAddr,
        method: &str,
        request_uri: &str,
        header_values: &[&str],
    ) -> Verdict {
        let creds = header_values.iter().filter_map(|v| Credentials::parse(v)).find(|c| c.realm == self.realm);
        if creds.is_none() && header_values.is_empty() {
            return Verdict::Missing;
        }
        // Credentials for another realm, or unparseable, fail like a wrong password.
        let user = creds.as_ref().map_or("", |c| c.username.as_str());
        match self.guard.admit(now, source, user) {
            Admit::Check => {}
            Admit::SourceBlocked => return Verdict::RateLimited,
            Admit::UserDelayed(d) => return Verdict::UserDelayed(d),
        }
        let v = match &creds {
            Some(c) => self.check(now, method, request_uri, c),
            None => Verdict::Failed,
        };
        match &v {
            Verdict::Failed => self.guard.failed(now, source, user),
            Verdict::Authenticated(u) => self.guard.succeeded(now, source, u),
            _ => {}
        }
        v
    }

    fn check(&mut self, now: Instant, method: &str, request_uri: &str, c: &Credentials) -> Verdict {
        let Some(nonce) = self.parse_nonce(&c.nonce) else {
            return Verdict::Failed;
        };
        let alg = match c.algorithm.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("MD5") => Algorithm::Md5,
            Some("SHA-256") => Algorithm::Sha256,
            _ => return Verdict::Failed,
        };
        // The same hashing whether or not the user exists.
        let (known, password) = match self.users.get(&c.username) {
            Some(p) => (true, p.as_str()),
            None => (false, self.decoy.as_str()),
        };
        let expected = digest_response(alg, &c.username, &self.realm, password, method, c);
        let matches = ct_eq(expected.as_bytes(), c.response.to_ascii_lowercase().as_bytes());
        if !(known && matches && self.algorithms.contains(&alg) && c.uri == request_uri) {
            return Verdict::Failed;
        }
        let unix = self.unix(now);
        if nonce.boot != self.boot || unix.saturating_sub(nonce.issued) > NONCE_TTL.as_secs() || nonce.issued > unix {
            return Verdict::Stale;
        }
        let nc = match (c.qop.as_deref(), c.nc.as_deref()) {
            (Some(_), Some(nc)) => match u32::from_str_radix(nc, 16) {
                Ok(n) if n > 0 => n,
                _ => return Verdict::Failed,
            },
            (Some(_), None) => return Verdict::Failed,
            // RFC 2069 style, no nc: the nonce itself is good for one request.
            (None, _) => 1,
        };
        let key = format!("{}\0{}", c.username, c.nonce);
        if !self.nonces.accept(now, key, nonce.issued, nc) {
            return Verdict::Replayed;
        }
        Verdict::Authenticated(c.username.clone())
    }

    /// Nothing to forget: no failures counted, no nonces tracked.
    pub fn is_idle(&self) -> bool {
        self.guard.tracked() == (0, 0) && self.nonces.used.is_empty()
    }

    /// Forgets failure windows that have ended and nonces that are stale.
    pub fn expire(&mut self, now: Instant) {
        self.guard.expire(now);
        self.nonces.expire(now);
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

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "sip:example.com";
    const BOOT: u64 = 0x1234_5678_9abc_def0;

    fn auth(now: Instant) -> Authenticator {
        Authenticator::new("pinhole", [("alice".to_owned(), "secret".to_owned())], [7; 32], BOOT, now, 1_700_000_000)
    }

    fn header(user: &str, nonce: &str, alg: Algorithm, password: &str, uri: &str, nc: u32) -> String {
        let challenge = Challenge { realm: "pinhole", nonce, algorithm: alg };
        Credentials::answering(&challenge, user, password, "REGISTER", uri, nc, "abc").header_value()
    }

    fn answer(a: &mut Authenticator, now: Instant, alg: Algorithm, password: &str) -> String {
        let nonce = a.nonce(now);
        header("alice", &nonce, alg, password, URI, 1)
    }

    fn src(last: u8) -> IpAddr {
        [198, 51, 100, last].into()
    }

    fn ok() -> Verdict {
        Verdict::Authenticated("alice".into())
    }

    #[test]
    fn sha256_and_md5_answers_are_accepted() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        for alg in [Algorithm::Sha256, Algorithm::Md5] {
            let h = answer(&mut a, t0, alg, "secret");
            assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&h]), ok());
        }
    }

    #[test]
    fn a_source_that_fails_too_often_is_refused_unchecked_until_its_window_ends() {
        let t0 = Instant::now();
        let guard = GuardConfig { user_free_failures: 1000, ..GuardConfig::default() };
        let mut a = auth(t0).with_guard(guard.clone());
        for _ in 0..guard.source_failures {
            let bad = answer(&mut a, t0, Algorithm::Md5, "guess");
            assert_eq!(a.verify(t0, src(2), "REGISTER", URI, &[&bad]), Verdict::Failed);
        }
        let good = answer(&mut a, t0, Algorithm::Md5, "secret");
        assert_eq!(a.verify(t0, src(2), "REGISTER", URI, &[&good]), Verdict::RateLimited);
        assert_eq!(a.verify(t0, src(3), "REGISTER", URI, &[&good]), ok(), "another source is unaffected");
        let later = t0 + guard.source_window + Duration::from_secs(1);
        let fresh = answer(&mut a, later, Algorithm::Md5, "secret");
        assert_eq!(a.verify(later, src(2), "REGISTER", URI, &[&fresh]), ok());
    }

    #[test]
    fn guesses_spread_over_many_sources_never_reach_the_password() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let home: IpAddr = [203, 0, 113, 7].into();
        let h = answer(&mut a, t0, Algorithm::Md5, "secret");
        assert_eq!(a.verify(t0, home, "REGISTER", URI, &[&h]), ok());
        let mut verdicts = Vec::new();
        for i in 0..500u32 {
            let now = t0 + Duration::from_millis(u64::from(i) / 5);
            let password = if i == 499 { "secret".to_owned() } else { format!("guess{i}") };
            let h = answer(&mut a, now, Algorithm::Md5, &password);
            verdicts.push(a.verify(now, src((i % 56) as u8), "REGISTER", URI, &[&h]));
        }
        assert!(!verdicts.contains(&ok()), "the right guess was never checked");
        assert!(verdicts.iter().filter(|v| **v == Verdict::Failed).count() <= 6);
        // The real user, from where she registered before, is not locked out.
        let later = t0 + Duration::from_millis(200);
        let h = answer(&mut a, later, Algorithm::Md5, "secret");
        assert_eq!(a.verify(later, home, "REGISTER", URI, &[&h]), ok());
    }

    #[test]
    fn expired_nonce_is_stale_not_failed() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let h = answer(&mut a, t0, Algorithm::Sha256, "secret");
        let later = t0 + NONCE_TTL + Duration::from_secs(5);
        assert_eq!(a.verify(later, src(1), "REGISTER", URI, &[&h]), Verdict::Stale);
    }

    #[test]
    fn nonce_from_an_earlier_run_is_stale_even_with_the_same_secret() {
        let t0 = Instant::now();
        let mut before = auth(t0);
        let h = answer(&mut before, t0, Algorithm::Md5, "secret");
        let mut after = Authenticator::new(
            "pinhole",
            [("alice".to_owned(), "secret".to_owned())],
            [7; 32],
            BOOT ^ 1,
            t0,
            1_700_000_000,
        );
        assert_eq!(after.verify(t0, src(1), "REGISTER", URI, &[&h]), Verdict::Stale);
        let wrong = answer(&mut before, t0, Algorithm::Md5, "guess");
        assert_eq!(
            after.verify(t0, src(1), "REGISTER", URI, &[&wrong]),
            Verdict::Failed,
            "stale only with the password"
        );
    }

    #[test]
    fn forged_nonce_is_refused() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let nonce = a.nonce(t0);
        let forged = format!("{:x}{}", 1_700_000_999u64, &nonce[8..]);
        let h = header("alice", &forged, Algorithm::Md5, "secret", URI, 1);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&h]), Verdict::Failed);
    }

    #[test]
    fn a_nonce_and_nc_pair_is_accepted_once() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let nonce = a.nonce(t0);
        let first = header("alice", &nonce, Algorithm::Md5, "secret", URI, 1);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&first]), ok());
        assert_eq!(a.verify(t0, src(9), "REGISTER", URI, &[&first]), Verdict::Replayed, "replayed elsewhere");
        let second = header("alice", &nonce, Algorithm::Md5, "secret", URI, 2);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&second]), ok(), "the next nc is fine");
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&second]), Verdict::Replayed);
        let out_of_order = header("alice", &nonce, Algorithm::Md5, "secret", URI, 5);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&out_of_order]), ok());
        let late = header("alice", &nonce, Algorithm::Md5, "secret", URI, 4);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&late]), ok(), "reordered but unused");
        let zero = header("alice", &nonce, Algorithm::Md5, "secret", URI, 0);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&zero]), Verdict::Failed);
    }

    #[test]
    fn credentials_for_another_request_uri_are_refused() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let h = answer(&mut a, t0, Algorithm::Md5, "secret");
        assert_eq!(a.verify(t0, src(1), "REGISTER", "sip:elsewhere.example", &[&h]), Verdict::Failed);
    }

    #[test]
    fn unknown_users_fail_like_wrong_passwords() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        let nonce = a.nonce(t0);
        let h = header("mallory", &nonce, Algorithm::Md5, "secret", URI, 1);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&h]), Verdict::Failed);
        let h = header("alice", &nonce, Algorithm::Md5, "nope", URI, 1);
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&h]), Verdict::Failed);
    }

    #[test]
    fn every_challenge_carries_a_fresh_nonce() {
        let t0 = Instant::now();
        let mut a = auth(t0);
        assert_ne!(a.nonce(t0), a.nonce(t0));
    }

    #[test]
    fn forgotten_nonces_count_as_stale_when_the_log_is_full() {
        let t0 = Instant::now();
        let mut log = NonceLog::default();
        for i in 0..MAX_TRACKED_NONCES as u64 + 1 {
            assert!(log.accept(t0, format!("n{i}"), 1000 + i, 1));
        }
        assert_eq!(log.used.len(), MAX_TRACKED_NONCES);
        assert!(!log.accept(t0, "n0".into(), 1000, 2), "evicted: cannot prove it unused");
        assert!(log.accept(t0, "n-new".into(), 1000 + MAX_TRACKED_NONCES as u64 + 5, 1));
        log.expire(t0 + NONCE_TTL + Duration::from_secs(10));
        assert!(log.used.is_empty());
    }

    #[test]
    fn challenges_follow_the_configured_order() {
        let t0 = Instant::now();
        let mut a = auth(t0).with_algorithms(vec![Algorithm::Sha256, Algorithm::Md5]);
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
        let h = answer(&mut a, t0, Algorithm::Md5, "secret");
        assert_eq!(a.verify(t0, src(1), "REGISTER", URI, &[&h]), Verdict::Failed);
    }
}
