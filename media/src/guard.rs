//! A brake on password guessing, shared by SIP digest and STUN MESSAGE-INTEGRITY checks.
//!
//! Two limits, both counted on failed checks only:
//! - per source prefix (an IPv4 address, an IPv6 /64): a hard window — after
//!   [`GuardConfig::source_failures`] failures in [`GuardConfig::source_window`] the prefix is
//!   refused without checking until the window ends;
//! - per username (known or not, so the answer never tells which users exist): after
//!   [`GuardConfig::user_free_failures`] failures, each further check waits a delay that
//!   doubles per failure up to [`GuardConfig::user_max_delay`]. Sources that recently
//!   authenticated as that user skip the delay, so an attacker hammering one account
//!   slows himself down without locking the real user out.
//!
//! Every table is bounded: source prefixes beyond the cap share one overflow entry, which
//! then brakes all newcomers together; usernames beyond the cap are counted together but
//! not delayed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Limits of a [`GuessGuard`]; the defaults are what pinhole runs with.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub source_failures: u32,
    pub source_window: Duration,
    pub user_free_failures: u32,
    pub user_max_delay: Duration,
    /// A username's failure count is forgotten after this long without a failure.
    pub user_forget: Duration,
    /// How long a source stays "known good" for a user after it authenticated.
    pub good_source_ttl: Duration,
    /// Most source prefixes and usernames tracked (each).
    pub max_entries: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            source_failures: 10,
            source_window: Duration::from_secs(60),
            user_free_failures: 5,
            user_max_delay: Duration::from_secs(120),
            user_forget: Duration::from_secs(900),
            good_source_ttl: Duration::from_secs(24 * 3600),
            max_entries: 65_536,
        }
    }
}

/// Whether a credential check may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Check,
    /// The source prefix failed too often: refused unchecked until the window ends.
    SourceBlocked,
    /// The username failed too often: refused unchecked for this long.
    UserDelayed(Duration),
}

/// Known-good sources remembered per user.
const GOOD_SOURCES: usize = 8;

struct SourceWindow {
    failures: u32,
    start: Instant,
}

struct UserState {
    failures: u32,
    last_failure: Option<Instant>,
    good: Vec<(IpAddr, Instant)>,
}

pub struct GuessGuard {
    cfg: GuardConfig,
    sources: HashMap<IpAddr, SourceWindow>,
    users: HashMap<String, UserState>,
}

/// The key failures are counted under: the IPv4 address, or the /64 of an IPv6 address
/// (one subscriber usually holds a whole /64).
pub fn source_prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// The shared key for sources and users beyond the cap.
const OVERFLOW_SOURCE: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
const OVERFLOW_USER: &str = "\0overflow";

impl GuessGuard {
    pub fn new(cfg: GuardConfig) -> GuessGuard {
        GuessGuard { cfg, sources: HashMap::new(), users: HashMap::new() }
    }

    fn source_key(&self, ip: IpAddr) -> IpAddr {
        let p = source_prefix(ip);
        if self.sources.contains_key(&p) || self.sources.len() < self.cfg.max_entries {
            p
        } else {
            OVERFLOW_SOURCE
        }
    }

    fn user_key<'a>(&self, user: &'a str) -> &'a str {
        if self.users.contains_key(user) || self.users.len() < self.cfg.max_entries {
            user
        } else {
            OVERFLOW_USER
        }
    }

    /// May `src` have its credentials for `user` checked now?
    pub fn admit(&self, now: Instant, src: IpAddr, user: &str) -> Admit {
        let prefix = source_prefix(src);
        if let Some(w) = self.sources.get(&self.source_key(src)) {
            if now.saturating_duration_since(w.start) < self.cfg.source_window && w.failures >= self.cfg.source_failures
            {
                return Admit::SourceBlocked;
            }
        }
        // Past the cap new usernames share an overflow entry for counting, but are never
        // delayed by it: one flood of made-up names must not brake every real user.
        let Some(u) = self.users.get(user) else {
            return Admit::Check;
        };
        if u.good.iter().any(|(p, at)| *p == prefix && now.saturating_duration_since(*at) < self.cfg.good_source_ttl) {
            return Admit::Check;
        }
        match (self.user_delay(u), u.last_failure) {
            (Some(delay), Some(last)) => {
                let ready = last + delay;
                if now < ready {
                    Admit::UserDelayed(ready - now)
                } else {
                    Admit::Check
                }
            }
            _ => Admit::Check,
        }
    }

    fn user_delay(&self, u: &UserState) -> Option<Duration> {
        let over = u.failures.checked_sub(self.cfg.user_free_failures)?;
        let delay = Duration::from_secs(1u64 << over.min(20));
        Some(delay.min(self.cfg.user_max_delay))
    }

    /// Records a failed check.
    pub fn failed(&mut self, now: Instant, src: IpAddr, user: &str) {
        let key = self.source_key(src);
        let window = self.cfg.source_window;
        let w = self.sources.entry(key).or_insert(SourceWindow { failures: 0, start: now });
        if now.saturating_duration_since(w.start) >= window {
            *w = SourceWindow { failures: 0, start: now };
        }
        w.failures = w.failures.saturating_add(1);
        let forget = self.cfg.user_forget;
        let key = self.user_key(user).to_owned();
        let u = self.users.entry(key).or_insert(UserState { failures: 0, last_failure: None, good: Vec::new() });
        if u.last_failure.is_some_and(|t| now.saturating_duration_since(t) >= forget) {
            u.failures = 0;
        }
        u.failures = u.failures.saturating_add(1);
        u.last_failure = Some(now);
    }

    /// Records a successful check: `src` becomes a known-good source for `user`.
    pub fn succeeded(&mut self, now: Instant, src: IpAddr, user: &str) {
        let prefix = source_prefix(src);
        let key = self.user_key(user).to_owned();
        if key == OVERFLOW_USER {
            return;
        }
        let u = self.users.entry(key).or_insert(UserState { failures: 0, last_failure: None, good: Vec::new() });
        if let Some(g) = u.good.iter_mut().find(|(p, _)| *p == prefix) {
            g.1 = now;
            return;
        }
        if u.good.len() >= GOOD_SOURCES {
            if let Some(oldest) = u.good.iter().enumerate().min_by_key(|(_, (_, t))| *t).map(|(i, _)| i) {
                u.good.swap_remove(oldest);
            }
        }
        u.good.push((prefix, now));
    }

    /// Forgets ended windows, forgiven users and stale good sources.
    pub fn expire(&mut self, now: Instant) {
        let cfg = &self.cfg;
        self.sources.retain(|_, w| now.saturating_duration_since(w.start) < cfg.source_window);
        self.users.retain(|_, u| {
            u.good.retain(|(_, t)| now.saturating_duration_since(*t) < cfg.good_source_ttl);
            if u.last_failure.is_some_and(|t| now.saturating_duration_since(t) >= cfg.user_forget) {
                u.failures = 0;
                u.last_failure = None;
            }
            u.failures > 0 || !u.good.is_empty()
        });
    }

    /// Tracked (source prefixes, usernames), for tests and metrics.
    pub fn tracked(&self) -> (usize, usize) {
        (self.sources.len(), self.users.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_source_is_blocked_after_its_failures_until_the_window_ends() {
        let t0 = Instant::now();
        let mut g = GuessGuard::new(GuardConfig { user_free_failures: 1000, ..GuardConfig::default() });
        for i in 0..10 {
            assert_eq!(g.admit(t0, ip("198.51.100.1"), &format!("u{i}")), Admit::Check);
            g.failed(t0, ip("198.51.100.1"), &format!("u{i}"));
        }
        assert_eq!(g.admit(t0, ip("198.51.100.1"), "x"), Admit::SourceBlocked);
        assert_eq!(g.admit(t0, ip("198.51.100.2"), "x"), Admit::Check);
        assert_eq!(g.admit(t0 + Duration::from_secs(61), ip("198.51.100.1"), "x"), Admit::Check);
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64() {
        let t0 = Instant::now();
        let mut g = GuessGuard::new(GuardConfig { user_free_failures: 1000, ..GuardConfig::default() });
        for i in 0..10 {
            g.failed(t0, ip(&format!("2001:db8:1:2::{i:x}")), "u");
        }
        assert_eq!(g.admit(t0, ip("2001:db8:1:2:ffff::1"), "v"), Admit::SourceBlocked);
        assert_eq!(g.admit(t0, ip("2001:db8:1:3::1"), "v"), Admit::Check);
    }

    #[test]
    fn guesses_spread_over_many_sources_meet_a_growing_user_delay() {
        let t0 = Instant::now();
        let mut g = GuessGuard::new(GuardConfig::default());
        g.succeeded(t0, ip("203.0.113.7"), "alice");
        let mut checked = 0;
        for i in 0..500u32 {
            let src = IpAddr::from([198, 51, 100, (i % 56) as u8]);
            let now = t0 + Duration::from_millis(u64::from(i) / 5);
            if g.admit(now, src, "alice") == Admit::Check {
                checked += 1;
                g.failed(now, src, "alice");
            }
        }
        assert!(checked <= 6, "only the free failures and one more were checked, not {checked}");
        // The real user's own source is not delayed; a newcomer is, with a doubling delay.
        assert_eq!(g.admit(t0 + Duration::from_millis(100), ip("203.0.113.7"), "alice"), Admit::Check);
        assert!(matches!(g.admit(t0 + Duration::from_millis(100), ip("192.0.2.1"), "alice"), Admit::UserDelayed(_)));
        // The delay is capped, so the real user from a new network gets in eventually.
        assert_eq!(g.admit(t0 + Duration::from_secs(121), ip("192.0.2.1"), "alice"), Admit::Check);
    }

    #[test]
    fn unknown_and_known_users_are_braked_alike() {
        let t0 = Instant::now();
        let mut g = GuessGuard::new(GuardConfig::default());
        for i in 0..6u8 {
            g.failed(t0, IpAddr::from([198, 51, 100, i]), "alice");
            g.failed(t0, IpAddr::from([198, 51, 100, i]), "nobody");
        }
        let a = g.admit(t0, ip("192.0.2.9"), "alice");
        assert_eq!(a, g.admit(t0, ip("192.0.2.9"), "nobody"));
        assert!(matches!(a, Admit::UserDelayed(_)));
    }

    #[test]
    fn tables_are_bounded_and_overflow_shares_one_brake() {
        let t0 = Instant::now();
        let mut g = GuessGuard::new(GuardConfig { max_entries: 4, ..GuardConfig::default() });
        for i in 0..100u8 {
            g.failed(t0, IpAddr::from([198, 51, 100, i]), &format!("u{i}"));
        }
        let (s, u) = g.tracked();
        assert!(s <= 5 && u <= 5, "{s} sources, {u} users");
        assert_eq!(g.admit(t0, ip("198.51.100.200"), "fresh"), Admit::SourceBlocked);
        assert_eq!(g.admit(t0, ip("198.51.100.1"), "fresh"), Admit::Check, "a tracked source is judged alone");
        g.expire(t0 + Duration::from_secs(3600));
        assert_eq!(g.tracked(), (0, 0));
    }
}
