//! Failed authentications (OAuth clients, WAMP logins), counted per known
//! id and per source address in fixed windows: past the limit, the key is
//! refused until its window ends, whatever the credentials.

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
    /// A known client id from one address: guessing one client's secret.
    by_client: Counter<(String, IpAddr)>,
    /// One address, any ids (IPv6 by /64): spraying. Loopback is exempt:
    /// on the sidecar every local service shares it.
    by_address: Counter<IpAddr>,
}

/// Keys remembered at most; beyond it the oldest windows are dropped
/// (an attacker rotating addresses cannot grow memory without bound).
pub const CAPACITY: u64 = 100_000;

/// IPv6 clients usually own a /64: count them as one.
fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        IpAddr::V6(v6) => IpAddr::V4(
            v6.to_ipv4_mapped()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        ),
        v4 => v4,
    }
}

impl AuthLimiter {
    pub fn new(max_failures: u32, window: Duration) -> AuthLimiter {
        AuthLimiter {
            max_failures,
            window,
            by_client: Counter::new(window, CAPACITY),
            by_address: Counter::new(window, CAPACITY),
        }
    }

    /// How long the caller must wait, when its address, or this known
    /// client from this address, is over the limit.
    pub fn blocked(&self, known_client: Option<&str>, addr: IpAddr) -> Option<Duration> {
        if self.max_failures == 0 {
            return None;
        }
        let by_addr = (!addr.is_loopback())
            .then(|| {
                self.by_address
                    .blocked(&address_key(addr), self.max_failures, self.window)
            })
            .flatten();
        let by_client = known_client.and_then(|c| {
            self.by_client.blocked(
                &(c.to_owned(), address_key(addr)),
                self.max_failures,
                self.window,
            )
        });
        by_addr.max(by_client)
    }

    /// Counts a failure; `known_client` only for ids that exist (so made-up
    /// ids cannot fill the table).
    pub fn failed(&self, known_client: Option<&str>, addr: IpAddr) {
        if self.max_failures == 0 {
            return;
        }
        if !addr.is_loopback() {
            self.by_address.fail(address_key(addr));
        }
        if let Some(c) = known_client {
            self.by_client.fail((c.to_owned(), address_key(addr)));
        }
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
            l.blocked(Some("x"), b).is_none(),
            "the client is not locked out from elsewhere"
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
    fn loopback_is_counted_per_client_only_and_ipv6_by_prefix() {
        let l = AuthLimiter::new(2, Duration::from_secs(60));
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..5 {
            l.failed(None, local);
        }
        assert!(
            l.blocked(Some("x"), local).is_none(),
            "unknown ids do not lock out the node"
        );
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        l.failed(None, v6a);
        l.failed(None, v6a);
        assert!(l.blocked(None, v6b).is_some(), "the same /64");
    }
}
