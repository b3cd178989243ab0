//! A byte budget for what unauthenticated sources can make us send.
//!
//! Challenges and refusals go to addresses nobody has verified, so a spoofed request turns
//! pinhole into a reflector. Each source prefix earns credit with the bytes it sends and
//! spends it on the bytes we answer; a small allowance covers the first exchange. A flood
//! of spoofed requests therefore draws back at most its own bytes plus the allowance.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use pinhole_media::guard::source_prefix;

/// Credit a new source starts with.
pub(super) const REPLY_ALLOWANCE: usize = 4096;
/// Most credit a source can bank.
const REPLY_CREDIT_CAP: usize = 65_536;
/// Most sources tracked; beyond them a request may only draw its own size.
const MAX_SOURCES: usize = 65_536;
/// A source idle this long starts afresh.
const IDLE: Duration = Duration::from_secs(60);

struct Credit {
    bytes: usize,
    last: Instant,
}

#[derive(Default)]
pub(super) struct ReplyBudget {
    sources: HashMap<IpAddr, Credit>,
}

impl ReplyBudget {
    /// A request of `request` bytes from `src` wants an answer of `reply` bytes: may it go?
    pub(super) fn allow(&mut self, now: Instant, src: IpAddr, request: usize, reply: usize) -> bool {
        let key = source_prefix(src);
        if !self.sources.contains_key(&key) && self.sources.len() >= MAX_SOURCES {
            return reply <= request;
        }
        let c = self.sources.entry(key).or_insert(Credit { bytes: REPLY_ALLOWANCE, last: now });
        c.bytes = (c.bytes + request).min(REPLY_CREDIT_CAP);
        c.last = now;
        if c.bytes < reply {
            return false;
        }
        c.bytes -= reply;
        true
    }

    pub(super) fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    pub(super) fn expire(&mut self, now: Instant) {
        self.sources.retain(|_, c| now.saturating_duration_since(c.last) < IDLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_draws_back_at_most_its_own_bytes_plus_the_allowance() {
        let t0 = Instant::now();
        let mut b = ReplyBudget::default();
        let src: IpAddr = [198, 51, 100, 1].into();
        let sent: usize = 200 * 300;
        let back: usize = (0..200).filter(|_| b.allow(t0, src, 300, 600)).count() * 600;
        assert!(back <= sent + REPLY_ALLOWANCE, "{back} bytes back for {sent}");
        assert!(back > 0, "the first exchanges are answered");
        assert!(b.allow(t0, [198, 51, 100, 2].into(), 300, 600), "another source has its own allowance");
        b.expire(t0 + IDLE);
        assert!(b.sources.is_empty());
    }
}
