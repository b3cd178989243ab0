//! Letting work gather under load. A thread that wakes for every datagram pays a context
//! switch per datagram, and on loopback each of its sends wakes the peer too. Past a rate,
//! the SIP UDP threads and the relay workers instead run at most once per short period
//! (well under a millisecond for media, a few for SIP) and take everything that arrived
//! since in one go: many datagrams per system call, per lock and per wakeup, for at most
//! that period of added delay. Below the rate every datagram is handled as it comes.

use std::time::{Duration, Instant};

/// Counts what a thread handles and says how long each of its rounds should last.
#[derive(Debug)]
pub(crate) struct Gather {
    since: Option<Instant>,
    count: u64,
    rate: u64,
    /// Items per second from which rounds are stretched.
    from_rate: u64,
    /// Items a stretched round aims to gather.
    target: u64,
    min: Duration,
    max: Duration,
}

impl Gather {
    /// From `from_rate` items/s on, a round lasts long enough for about `target` items,
    /// within `min..=max`.
    pub(crate) const fn new(from_rate: u64, target: u64, min: Duration, max: Duration) -> Gather {
        Gather { since: None, count: 0, rate: 0, from_rate, target, min, max }
    }

    /// `n` items handled at `now`. The rate is measured over tenths of a second.
    pub(crate) fn count(&mut self, now: Instant, n: usize) {
        let since = *self.since.get_or_insert(now);
        self.count += n as u64;
        let elapsed = now.duration_since(since);
        if elapsed >= Duration::from_millis(100) {
            self.rate = self.count * 1000 / (elapsed.as_millis() as u64).max(1);
            self.count = 0;
            self.since = Some(now);
        }
    }

    /// Items per second over the last measured tenth of a second.
    pub(crate) fn per_second(&self, now: Instant) -> u64 {
        // A long quiet spell since the last window counts as quiet.
        match self.since {
            Some(t) if now.duration_since(t) < Duration::from_millis(300) => self.rate,
            _ => 0,
        }
    }

    /// How long a round should last at this rate, if it should be stretched at all.
    pub(crate) fn round(&self, now: Instant) -> Option<Duration> {
        let rate = self.per_second(now);
        (rate >= self.from_rate)
            .then(|| Duration::from_micros(self.target * 1_000_000 / rate).clamp(self.min, self.max))
    }

    /// What is left at `now` of a round that started at `started`, if it should go on.
    fn rest(&self, started: Instant, now: Instant) -> Option<Duration> {
        (started + self.round(now)?).checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Sleeps until a round that started at `started` has lasted as long as it should.
    pub(crate) fn pace(&self, started: Instant) {
        if let Some(rest) = self.rest(started, Instant::now()) {
            std::thread::sleep(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIP: Gather = Gather::new(1000, 16, Duration::from_millis(1), Duration::from_millis(5));

    /// `n` items spread over 100 ms from `t`.
    fn fill(g: &mut Gather, t: Instant, n: u32) -> Instant {
        for k in 0..n {
            g.count(t + Duration::from_millis(100) * k / n, 1);
        }
        let end = t + Duration::from_millis(100);
        g.count(end, 0);
        end
    }

    #[test]
    fn rounds_are_stretched_only_under_load_and_never_past_the_cap() {
        let t = Instant::now();
        let mut quiet = SIP;
        let end = fill(&mut quiet, t, 50);
        assert_eq!(quiet.round(end), None, "500/s: each handled as it comes");

        let mut busy = SIP;
        let end = fill(&mut busy, t, 1300);
        assert_eq!(busy.per_second(end), 13_000);
        let round = busy.round(end).expect("stretched at 13 000/s");
        assert!((Duration::from_millis(1)..=Duration::from_millis(2)).contains(&round), "{round:?}: about 16 items");

        let mut moderate = SIP;
        let end = fill(&mut moderate, t, 120);
        assert_eq!(moderate.round(end), Some(Duration::from_millis(5)), "capped at 5 ms");
        assert_eq!(moderate.round(end + Duration::from_secs(1)), None, "a quiet second later: not stretched");
    }

    #[test]
    fn a_round_sleeps_only_for_what_is_left_of_it() {
        let t = Instant::now();
        let mut busy = SIP;
        let end = fill(&mut busy, t, 1300); // 13 000/s: rounds of ~1.2 ms
        let round = busy.round(end).expect("stretched");
        assert_eq!(busy.rest(end, end), Some(round), "a round just begun lasts all of it");
        let half = round / 2;
        assert_eq!(busy.rest(end - half, end), Some(round - half));
        assert_eq!(busy.rest(end - round, end), None, "a round already over does not sleep");
        let quiet = SIP;
        assert_eq!(quiet.rest(end, end), None, "no load: no rounds");
    }
}
