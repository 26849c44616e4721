//! Revoked token ids (`jti`). Checked on every authenticated request, cached
//! or not, so a revocation takes effect at once; an entry is kept until the
//! token would have expired anyway, then purged.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

#[derive(Default)]
pub struct Revocations {
    /// jti -> unix seconds when the token expires. Copy-on-write: revocations
    /// are rare, checks are on every request.
    revoked: ArcSwap<HashMap<String, u64>>,
}

impl Revocations {
    pub fn is_revoked(&self, jti: &str) -> bool {
        let revoked = self.revoked.load();
        !revoked.is_empty() && revoked.contains_key(jti)
    }

    pub fn revoke(&self, jti: &str, expires_at: u64) {
        self.revoked.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(jti.to_owned(), expires_at);
            Arc::new(next)
        });
    }

    /// Adds many at once (loading the store's list).
    pub fn extend(&self, entries: &[(String, u64)]) {
        if entries.is_empty() {
            return;
        }
        self.revoked.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.extend(entries.iter().cloned());
            Arc::new(next)
        });
    }

    /// Drops entries of tokens that have expired by `now` (unix seconds).
    pub fn purge(&self, now: u64) -> usize {
        let mut purged = 0;
        self.revoked.rcu(|current| {
            let next: HashMap<String, u64> = current
                .iter()
                .filter(|(_, exp)| **exp > now)
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            purged = current.len() - next.len();
            Arc::new(next)
        });
        purged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_check_purge() {
        let r = Revocations::default();
        assert!(!r.is_revoked("a"));
        r.revoke("a", 100);
        r.revoke("b", 300);
        assert!(r.is_revoked("a") && r.is_revoked("b"));
        assert_eq!(r.purge(200), 1);
        assert!(!r.is_revoked("a"));
        assert!(r.is_revoked("b"));
    }
}
