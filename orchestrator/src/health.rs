//! A head's view of its own connection to etcd, as pure bookkeeping.
//!
//! Outage is not failure: a node lease that lapsed while etcd itself was
//! away (paused, restarting, unreachable) says nothing about the node. The
//! head therefore only reads a missing lease as a dead node once it has
//! reached etcd without interruption for a grace period, long enough for
//! every healthy agent to notice the lapse and register again. While etcd
//! has been healthy for long, detection is as fast as the lease TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// One stretch of time during which this head could not reach etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    /// Wall-clock start (seconds since the epoch), for status and events.
    pub since: f64,
    pub lasted: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct EtcdHealth {
    /// Since when every etcd call succeeded; None: never, or failing now.
    healthy_since: Option<Instant>,
    /// When the current outage began (monotonic, wall clock).
    down_since: Option<(Instant, f64)>,
}

impl EtcdHealth {
    /// Records a successful round trip; returns the outage it ended, if any.
    pub fn ok(&mut self, at: Instant) -> Option<Outage> {
        if self.healthy_since.is_none() {
            self.healthy_since = Some(at);
        }
        self.down_since.take().map(|(t, wall)| Outage {
            since: wall,
            lasted: at.saturating_duration_since(t),
        })
    }

    /// Records a round trip that began at `started` (`wall` on the wall
    /// clock) and ended at `at`, answered or not. One that took `slow` or
    /// longer counts as etcd having been away meanwhile: etcd frozen for a
    /// few seconds (SIGSTOP, an fsync stall) answers late rather than
    /// failing, yet revokes on resuming the leases it could not renew, so
    /// a lapse seen right after it says nothing about their holders.
    pub fn round_trip(&mut self, started: Instant, wall: f64, at: Instant, slow: Duration) {
        if at.saturating_duration_since(started) >= slow {
            self.failed(started, wall);
        }
    }

    /// Records a failed etcd call.
    pub fn failed(&mut self, at: Instant, wall: f64) {
        self.healthy_since = None;
        if self.down_since.is_none() {
            self.down_since = Some((at, wall));
        }
    }

    /// Wall-clock start of the outage going on now.
    pub fn down_since(&self) -> Option<f64> {
        self.down_since.map(|(_, w)| w)
    }

    /// Whether a lapsed node lease now means a silent node: etcd has
    /// answered this head without a break for at least `grace`.
    pub fn lapse_means_dead(&self, at: Instant, grace: Duration) -> bool {
        self.healthy_since
            .is_some_and(|t| at.saturating_duration_since(t) >= grace)
    }
}

/// A leader step slower than this means etcd stalled: a third of the TTL,
/// the keepers' renewal period (a stall shorter than that loses no lease).
pub fn slow_answer(ttl_s: u64) -> Duration {
    Duration::from_millis(ttl_s.max(1) * 1000 / 3)
}

/// The grace after etcd comes back: two lease TTLs, so an agent whose lease
/// etcd revoked on resuming has a full TTL to notice and re-register even
/// on a loaded machine. Steady-state detection is unaffected.
pub fn grace(ttl_s: u64) -> Duration {
    Duration::from_secs(2 * ttl_s.max(1))
}

/// One head's etcd health, kept by its leader loop and read by its service.
pub type SharedHealth = Arc<std::sync::Mutex<EtcdHealth>>;

/// Records a failed etcd call in `h` when `e` says etcd did not answer.
pub fn note_etcd_error(h: &SharedHealth, e: &crate::error::Error) {
    let away = match e {
        crate::error::Error::Etcd(e) => crate::store::unreachable(e),
        crate::error::Error::EtcdConnect { .. } => true,
        _ => false,
    };
    if away {
        if let Ok(mut h) = h.lock() {
            h.failed(Instant::now(), crate::state::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_head_waits_the_grace_before_declaring_anything() {
        let t0 = Instant::now();
        let mut h = EtcdHealth::default();
        let g = Duration::from_secs(6);
        assert!(!h.lapse_means_dead(t0, g), "never reached etcd");
        assert_eq!(h.ok(t0), None);
        assert!(!h.lapse_means_dead(t0 + Duration::from_secs(5), g));
        assert!(h.lapse_means_dead(t0 + Duration::from_secs(6), g));
    }

    #[test]
    fn an_outage_resets_the_clock_and_is_reported_once() {
        let t0 = Instant::now();
        let mut h = EtcdHealth::default();
        let g = Duration::from_secs(6);
        h.ok(t0);
        let s = |n| t0 + Duration::from_secs(n);
        assert!(h.lapse_means_dead(s(100), g));
        h.failed(s(100), 1000.0);
        h.failed(s(105), 1005.0);
        assert_eq!(h.down_since(), Some(1000.0), "the first failure counts");
        assert!(!h.lapse_means_dead(s(108), g), "etcd is away");
        let o = h.ok(s(110)).expect("an outage ended");
        assert_eq!(o.since, 1000.0);
        assert_eq!(o.lasted, Duration::from_secs(10));
        assert_eq!(h.ok(s(111)), None, "reported once");
        assert_eq!(h.down_since(), None);
        assert!(!h.lapse_means_dead(s(115), g), "lease lapsed in the outage");
        assert!(h.lapse_means_dead(s(116), g));
    }

    #[test]
    fn a_late_answer_is_an_outage_too() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let (g, slow) = (Duration::from_secs(6), Duration::from_secs(1));
        let mut h = EtcdHealth::default();
        h.ok(t0);
        assert!(h.lapse_means_dead(s(10_000), g));
        h.round_trip(s(10_000), 50.0, s(10_050), slow);
        assert_eq!(h.ok(s(10_050)), None);
        assert!(h.lapse_means_dead(s(10_050), g), "a quick answer");
        h.round_trip(s(10_100), 60.0, s(13_600), slow);
        let o = h.ok(s(13_600)).expect("late");
        assert_eq!((o.since, o.lasted), (60.0, Duration::from_millis(3500)));
        assert!(!h.lapse_means_dead(s(19_000), g), "the grace starts again");
        assert!(h.lapse_means_dead(s(19_600), g));
    }

    #[test]
    fn grace_is_two_ttls() {
        assert_eq!(grace(3), Duration::from_secs(6));
        assert_eq!(grace(0), Duration::from_secs(2));
    }
}
