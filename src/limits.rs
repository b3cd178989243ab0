//! Process-level limits: file descriptors, accept failures and their log lines.
//!
//! Every connection a stranger opens costs a descriptor. pinhole raises its soft
//! RLIMIT_NOFILE to the hard limit at start, keeps its connection caps well below what is
//! left after the relay ports, and when accept() fails anyway (EMFILE, ENFILE, ENOBUFS)
//! it backs off and logs at most one line per interval: a log line per failure would
//! itself be the denial of service.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Descriptors kept free for everything that is not a connection: the store's snapshot
/// file, listeners, the metrics server, STUN and ng sockets, TLS key files.
pub(crate) const FD_HEADROOM: u64 = 1024;

/// Raises the soft open-file limit as far as the hard limit allows; returns the soft limit.
pub(crate) fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// The connection cap that fits in `nofile` descriptors next to `other` descriptors the
/// process needs for itself (relay ports and the headroom).
pub(crate) fn connection_cap(configured: usize, nofile: u64, other: u64) -> usize {
    let room = nofile.saturating_sub(other + FD_HEADROOM);
    configured.min(usize::try_from(room).unwrap_or(usize::MAX)).max(1)
}

/// At most one log line per `interval`; the lines in between are counted and reported with
/// the next one.
pub(crate) struct LogLimiter {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub(crate) const fn new(interval: Duration) -> LogLimiter {
        LogLimiter { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed)` when a line may be written now.
    pub(crate) fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.0 {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// Exponential backoff for a failing accept loop: 10 ms doubling to 1 s, reset on success.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Backoff {
        Backoff(Backoff::MIN)
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Backoff::MIN;
    }

    /// The delay to wait now; the next one is twice as long.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Backoff::MAX);
        d
    }
}

/// A failed accept: counted, logged within limits, and waited out.
pub(crate) async fn accept_failed(what: &'static str, error: &std::io::Error, backoff: &mut Backoff, log: &LogLimiter) {
    metrics::counter!("pinhole_accept_errors_total", "listener" => what).increment(1);
    if let Some(suppressed) = log.allow(Instant::now()) {
        tracing::warn!(listener = what, %error, suppressed, "accept failed; backing off");
    }
    tokio::time::sleep(backoff.next_delay()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_lets_one_line_through_per_interval_and_counts_the_rest() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(l.allow(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(999));
    }

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Backoff::MIN);
        assert_eq!(delays[1], Backoff::MIN * 2);
        assert_eq!(delays[9], Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(), Backoff::MIN);
    }

    #[test]
    fn connection_cap_leaves_room_for_relay_ports_and_headroom() {
        assert_eq!(connection_cap(4096, 1_048_576, 10_000), 4096);
        assert_eq!(connection_cap(4096, 12_000, 10_000), 976);
        assert_eq!(connection_cap(4096, 1024, 10_000), 1);
    }
}
