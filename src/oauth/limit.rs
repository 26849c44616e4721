//! `jti`s of client assertions already used (RFC 7523 replay protection).
//! Failed client authentications are counted by the shared
//! `identity::limit::AuthLimiter`.

use crate::identity::limit::CAPACITY;

/// `jti`s of client assertions already used, each remembered until its
/// assertion expires (RFC 7523 §3 replay protection). Bounded, and fails
/// closed: when full of unexpired entries, new assertions are refused.
pub struct Replays {
    seen: std::sync::Mutex<std::collections::HashMap<[u8; 32], u64>>,
    capacity: usize,
}

impl Default for Replays {
    fn default() -> Self {
        Replays::with_capacity(CAPACITY as usize)
    }
}

impl Replays {
    pub fn with_capacity(capacity: usize) -> Replays {
        Replays {
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
            capacity,
        }
    }

    /// Records the assertion; `false` when it was seen before, or when the
    /// table is full of assertions that have not expired.
    pub fn first_use(&self, client: &str, jti: &str, exp: u64) -> bool {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(client.as_bytes());
        ctx.update(&[0]);
        ctx.update(jti.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        let now = crate::identity::jwt::unix_now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(&key).is_some_and(|e| *e + LEEWAY >= now) {
            return false;
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, e| *e + LEEWAY >= now);
            if seen.len() >= self.capacity {
                return false;
            }
        }
        seen.insert(key, exp);
        true
    }
}

/// Clock leeway on top of `exp`, so a replay just past it is still found.
const LEEWAY: u64 = 60;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_caught_per_client_and_a_full_table_refuses() {
        let r = Replays::with_capacity(3);
        let now = crate::identity::jwt::unix_now();
        assert!(r.first_use("a", "j1", now + 60));
        assert!(!r.first_use("a", "j1", now + 60));
        assert!(r.first_use("b", "j1", now + 60));
        assert!(r.first_use("b", "old", now - 3600));
        assert!(
            r.first_use("c", "j2", now + 60),
            "an expired entry makes room"
        );
        assert!(
            !r.first_use("d", "j3", now + 60),
            "full of live entries: refused"
        );
    }
}
