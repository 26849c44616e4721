//! Retry budget (as in Finagle and linkerd): retries may add at most `ratio`
//! of the route's request rate, plus a floor of `min_per_second`, so a failing
//! upstream is never hit by a retry storm. Lock-free: one atomic balance.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use crate::config::RetryBudgetConfig;

/// Balance unit: one retry costs `SCALE`; each request deposits `ratio * SCALE`.
const SCALE: i64 = 1000;

pub struct RetryBudget {
    deposit: i64,
    floor_per_second: i64,
    /// Cap on saved-up balance: the retries of ten seconds at the floor plus
    /// ten seconds of deposits is plenty, and bounds bursts after quiet periods.
    cap: i64,
    balance: AtomicI64,
    epoch: Instant,
    last_refill_second: AtomicU64,
}

impl RetryBudget {
    pub fn new(cfg: &RetryBudgetConfig) -> RetryBudget {
        let floor_per_second = i64::from(cfg.min_per_second) * SCALE;
        RetryBudget {
            deposit: (cfg.ratio * SCALE as f64) as i64,
            floor_per_second,
            cap: (floor_per_second * 10).max(100 * SCALE),
            balance: AtomicI64::new(floor_per_second),
            epoch: Instant::now(),
            last_refill_second: AtomicU64::new(0),
        }
    }

    /// Called once per original request.
    pub fn deposit(&self) {
        if self.deposit > 0 {
            self.add(self.deposit);
        }
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        self.refill_floor();
        self.balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b >= SCALE).then_some(b - SCALE)
            })
            .is_ok()
    }

    fn refill_floor(&self) {
        let now = self.epoch.elapsed().as_secs();
        let last = self.last_refill_second.load(Ordering::Acquire);
        if now > last
            && self
                .last_refill_second
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let seconds = i64::try_from(now - last).unwrap_or(i64::MAX).min(10);
            self.add(self.floor_per_second.saturating_mul(seconds));
        }
    }

    fn add(&self, amount: i64) {
        let cap = self.cap;
        let _ = self
            .balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_add(amount).min(cap))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_bounded_by_ratio() {
        let b = RetryBudget::new(&RetryBudgetConfig {
            ratio: 0.1,
            min_per_second: 0,
        });
        assert!(!b.withdraw(), "nothing deposited yet");
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn floor_allows_retries_without_traffic() {
        let b = RetryBudget::new(&RetryBudgetConfig {
            ratio: 0.0,
            min_per_second: 3,
        });
        let granted = (0..10).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 3);
    }
}
