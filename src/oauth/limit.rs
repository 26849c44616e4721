//! Failed client authentications, counted per client id and per source
//! address in fixed windows: past the limit, the key is refused with 429
//! until its window ends, whatever the credentials.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

struct Window {
    start: Instant,
    failures: AtomicU32,
}

struct Counter<K: Hash + Eq + Send + Sync + 'static> {
    windows: moka::sync::Cache<K, Arc<Window>>,
}

impl<K: Hash + Eq + Send + Sync + Clone + 'static> Counter<K> {
    fn new(window: Duration, capacity: u64) -> Self {
        Counter {
            windows: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(window)
                .build(),
        }
    }

    fn blocked(&self, key: &K, max: u32, window: Duration) -> Option<Duration> {
        let w = self.windows.get(key)?;
        let left = window.saturating_sub(w.start.elapsed());
        (w.failures.load(Ordering::Relaxed) >= max && !left.is_zero()).then_some(left)
    }

    fn fail(&self, key: K) {
        let w = self.windows.get_with(key, || {
            Arc::new(Window {
                start: Instant::now(),
                failures: AtomicU32::new(0),
            })
        });
        w.failures.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct AuthLimiter {
    max_failures: u32,
    window: Duration,
    by_client: Counter<String>,
    by_address: Counter<IpAddr>,
}

/// Keys remembered at most; beyond it the oldest windows are dropped
/// (an attacker rotating ids cannot grow memory without bound).
const CAPACITY: u64 = 100_000;

impl AuthLimiter {
    pub fn new(max_failures: u32, window: Duration) -> AuthLimiter {
        AuthLimiter {
            max_failures,
            window,
            by_client: Counter::new(window, CAPACITY),
            by_address: Counter::new(window, CAPACITY),
        }
    }

    /// How long the caller must wait, when its id or address is over the limit.
    pub fn blocked(&self, client: Option<&str>, addr: IpAddr) -> Option<Duration> {
        if self.max_failures == 0 {
            return None;
        }
        let by_addr = self
            .by_address
            .blocked(&addr, self.max_failures, self.window);
        let by_client = client.and_then(|c| {
            self.by_client
                .blocked(&c.to_owned(), self.max_failures, self.window)
        });
        by_addr.max(by_client)
    }

    pub fn failed(&self, client: Option<&str>, addr: IpAddr) {
        if self.max_failures == 0 {
            return;
        }
        self.by_address.fail(addr);
        if let Some(c) = client {
            self.by_client.fail(c.to_owned());
        }
    }
}

/// `jti`s of client assertions already used, each remembered until its
/// assertion expires (RFC 7523 §3 replay protection).
pub struct Replays {
    seen: moka::sync::Cache<String, u64>,
}

struct UntilExp;

impl moka::Expiry<String, u64> for UntilExp {
    fn expire_after_create(&self, _: &String, exp: &u64, _: Instant) -> Option<Duration> {
        let now = crate::identity::jwt::unix_now();
        // Clock leeway on top, so a replay just past `exp` still finds it.
        Some(Duration::from_secs(exp.saturating_sub(now) + 60))
    }
}

impl Default for Replays {
    fn default() -> Self {
        Replays {
            seen: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .expire_after(UntilExp)
                .build(),
        }
    }
}

impl Replays {
    /// Records the assertion; `false` when it was seen before.
    pub fn first_use(&self, client: &str, jti: &str, exp: u64) -> bool {
        let key = format!("{client}\u{0}{jti}");
        self.seen.entry(key).or_insert(exp).is_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_and_releases() {
        let l = AuthLimiter::new(3, Duration::from_millis(200));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.blocked(Some("x"), a).is_none());
            l.failed(Some("x"), a);
        }
        assert!(l.blocked(Some("x"), a).is_some());
        assert!(
            l.blocked(Some("x"), b).is_some(),
            "the client id is blocked from anywhere"
        );
        assert!(
            l.blocked(Some("y"), a).is_some(),
            "the address is blocked for any id"
        );
        assert!(l.blocked(Some("y"), b).is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            l.blocked(Some("x"), a).is_none(),
            "released after the window"
        );
    }

    #[test]
    fn replays_are_caught_per_client() {
        let r = Replays::default();
        let exp = crate::identity::jwt::unix_now() + 60;
        assert!(r.first_use("a", "j1", exp));
        assert!(!r.first_use("a", "j1", exp));
        assert!(r.first_use("b", "j1", exp));
    }
}
