//! Users who log in with a name and a password (MQTT devices, WAMP
//! tickets): from gateway.yaml (`auth.users`) and the store (registered
//! devices, `tollgate users add`). Hashes are argon2id (PHC strings, what
//! tollgate writes); bcrypt hashes (`$2b$…`, as tstack's store holds) verify
//! too.
//!
//! Checking a hash costs tens of milliseconds of CPU by design, so checks
//! run off the event loop, a few at a time, and a name and password that
//! verified are remembered (as a SHA-256, for [`REMEMBER`]) so a device
//! reconnecting does not pay again. A remembered check holds only while the
//! user's hash is unchanged: a changed or removed user is refused at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A user as gateway.yaml and the store hold it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// argon2id PHC string (`$argon2id$v=19$…`) or bcrypt (`$2b$…`).
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Further values the policy engine may match (`{claim.NAME}`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub claims: Map<String, Value>,
    /// The user's own topic rules (tstack's tuser, mosquitto's `user`
    /// sections), checked before the broker's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<UserTopic>,
}

/// One topic a user may (or may not) use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserTopic {
    /// A topic filter; `%u` and `%c` stand for the user and client id.
    pub topic: String,
    #[serde(default)]
    pub access: TopicAccess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicAccess {
    /// Subscribe.
    Read,
    /// Publish.
    Write,
    #[default]
    ReadWrite,
    Deny,
}

impl UserTopic {
    /// Whether the topic is a filter a rule can hold.
    pub fn check(&self) -> Result<(), String> {
        crate::authz::Pattern::parse(&self.topic, crate::authz::Resource::Topic)
            .map(|_| ())
            .map_err(|e| format!("topic {e}"))
    }

    /// `read:a/#`, `write:b`, `deny:c`, or a bare filter (read and write).
    pub fn parse(s: &str) -> Result<UserTopic, String> {
        let (access, topic) = match s.split_once(':') {
            Some(("read", t)) => (TopicAccess::Read, t),
            Some(("write", t)) => (TopicAccess::Write, t),
            Some(("readwrite", t)) => (TopicAccess::ReadWrite, t),
            Some(("deny", t)) => (TopicAccess::Deny, t),
            _ => (TopicAccess::ReadWrite, s),
        };
        if topic.is_empty() {
            return Err(format!("`{s}`: no topic"));
        }
        let t = UserTopic {
            topic: topic.to_owned(),
            access,
        };
        t.check()?;
        Ok(t)
    }
}

/// How long a verified name and password are remembered.
const REMEMBER: Duration = Duration::from_secs(600);
const REMEMBERED_MAX: u64 = 100_000;

/// Bounds on the cost a hash may ask for: a record cannot make every login
/// burn gigabytes or seconds.
const ARGON2_MAX_MEMORY_KIB: u32 = 256 * 1024;
const ARGON2_MAX_PASSES: u32 = 16;
const BCRYPT_MAX_COST: u32 = 15;

/// Why a password was refused (the caller is told only that it was; the
/// operator's log says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordError {
    UnknownUser,
    WrongPassword,
    /// The stored hash cannot be used (logged when it was loaded too).
    UnusableHash,
}

impl PasswordError {
    pub fn as_str(self) -> &'static str {
        match self {
            PasswordError::UnknownUser => "unknown user",
            PasswordError::WrongPassword => "wrong password",
            PasswordError::UnusableHash => "the user's password hash cannot be used",
        }
    }
}

/// The users a gateway knows, replaced whole on reload and store changes.
pub struct Users {
    by_name: ArcSwap<HashMap<String, Arc<User>>>,
    /// SHA-256 of (name, password) -> the hash it verified against.
    verified: moka::sync::Cache<[u8; 32], Arc<str>>,
    /// Hash checks running at once.
    checks: tokio::sync::Semaphore,
    /// Names of users changed (password, roles, topics, claims) or removed:
    /// sessions they logged in are ended by whoever holds them.
    changed: tokio::sync::broadcast::Sender<Arc<[String]>>,
}

impl Default for Users {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Users {
            by_name: ArcSwap::default(),
            verified: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED_MAX)
                .time_to_live(REMEMBER)
                .build(),
            checks: tokio::sync::Semaphore::new(cores),
            changed: tokio::sync::broadcast::channel(64).0,
        }
    }
}

impl Users {
    /// Replaces every user (later entries with the same name win: the
    /// store's over gateway.yaml's when given in that order).
    pub fn replace(&self, users: impl IntoIterator<Item = User>) {
        let map: HashMap<String, Arc<User>> = users
            .into_iter()
            .map(|u| (u.name.clone(), Arc::new(u)))
            .collect();
        let old = self.by_name.swap(Arc::new(map));
        self.announce(&old);
    }

    /// Names of users changed or removed from now on (see `changed`).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<[String]>> {
        self.changed.subscribe()
    }

    /// Tells the holders of sessions which users differ from `old`.
    fn announce(&self, old: &HashMap<String, Arc<User>>) {
        let now = self.by_name.load();
        let changed: Vec<String> = old
            .iter()
            .filter(|(name, user)| now.get(*name).is_none_or(|u| **u != ***user))
            .map(|(name, _)| name.clone())
            .collect();
        if !changed.is_empty() {
            // Nobody listening (no broker, no router) is fine.
            let _ = self.changed.send(changed.into());
        }
    }

    /// Adds (or replaces) one user at once, ahead of the store's next
    /// load (a device that registered logs in right away).
    pub fn insert(&self, user: User) {
        let user = Arc::new(user);
        // rcu: an edit made meanwhile (a registration, another admin
        // write) is not lost.
        let old = self.by_name.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(user.name.clone(), user.clone());
            map
        });
        self.announce(&old);
    }

    pub fn get(&self, name: &str) -> Option<Arc<User>> {
        self.by_name.load().get(name).cloned()
    }

    /// Every user, by name.
    pub fn all(&self) -> Vec<Arc<User>> {
        let mut all: Vec<Arc<User>> = self.by_name.load().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Takes one user out at once, ahead of the store's next load.
    pub fn remove(&self, name: &str) {
        let old = self.by_name.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(name);
            map
        });
        self.announce(&old);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.load().contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The user whose password this is.
    pub async fn verify(&self, name: &str, password: &[u8]) -> Result<Arc<User>, PasswordError> {
        let user = self.by_name.load().get(name).cloned();
        let key = remember_key(name, password);
        if let Some(user) = &user
            && self
                .verified
                .get(&key)
                .is_some_and(|h| *h == *user.password_hash)
        {
            return Ok(user.clone());
        }
        let Ok(_turn) = self.checks.acquire().await else {
            return Err(PasswordError::UnusableHash);
        };
        // An unknown name costs what a known one does: no timing tells
        // which names exist.
        let hash: Arc<str> = match &user {
            Some(u) => Arc::from(u.password_hash.as_str()),
            None => Arc::from(dummy_hash()),
        };
        let password = password.to_vec();
        let checked = {
            let hash = hash.clone();
            tokio::task::spawn_blocking(move || check(&hash, &password)).await
        };
        let checked = checked.unwrap_or(Err(PasswordError::UnusableHash));
        match (user, checked) {
            (None, _) => Err(PasswordError::UnknownUser),
            // Changed or removed while the hash was checked: the session
            // this login would open would miss the announcement.
            (Some(user), Ok(()))
                if self
                    .by_name
                    .load()
                    .get(name)
                    .is_none_or(|now| **now != *user) =>
            {
                Err(PasswordError::UnknownUser)
            }
            (Some(user), Ok(())) => {
                self.verified.insert(key, hash);
                Ok(user)
            }
            (Some(_), Err(e)) => Err(e),
        }
    }
}

/// gateway.yaml's users, then the store's (which win on a shared name).
impl crate::store::StoreView for Users {
    fn load(
        &self,
        cfg: &crate::config::Config,
        store: Option<&dyn crate::store::Store>,
    ) -> Result<(), String> {
        let stored: Vec<User> = match store {
            Some(store) => stored_users(store)?,
            None => Vec::new(),
        };
        let stored = stored
            .into_iter()
            .filter(|u| match usable_hash(&u.password_hash) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(user = %u.name, error = %why,
                    "a stored user's password hash cannot be used; the user cannot log in");
                    false
                }
            });
        let before = self.len();
        self.replace(cfg.auth.users.iter().cloned().chain(stored));
        if self.len() != before {
            tracing::info!(users = self.len(), "password users loaded");
        }
        Ok(())
    }
}

fn remember_key(name: &str, password: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(&(name.len() as u64).to_be_bytes());
    ctx.update(name.as_bytes());
    ctx.update(password);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A hash of a password nobody has, made once, with the default cost.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password(b"\0no user has this password\0").unwrap_or_default())
}

/// Whether `password` matches `hash` (argon2 PHC or bcrypt).
pub fn check(hash: &str, password: &[u8]) -> Result<(), PasswordError> {
    usable_hash(hash).map_err(|_| PasswordError::UnusableHash)?;
    if is_bcrypt(hash) {
        return match bcrypt::verify(password, hash) {
            Ok(true) => Ok(()),
            Ok(false) => Err(PasswordError::WrongPassword),
            Err(_) => Err(PasswordError::UnusableHash),
        };
    }
    let parsed = PasswordHash::new(hash).map_err(|_| PasswordError::UnusableHash)?;
    argon2::Argon2::default()
        .verify_password(password, &parsed)
        .map_err(|e| match e {
            argon2::password_hash::Error::Password => PasswordError::WrongPassword,
            _ => PasswordError::UnusableHash,
        })
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$", "$2x$"]
        .iter()
        .any(|p| hash.starts_with(p))
}

/// Whether a user name is one a login can carry: 1 to 256 characters, no
/// control characters (MQTT and WAMP names are UTF-8 strings).
pub fn usable_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 || name.contains(char::is_control) {
        return Err("must be 1 to 256 characters without control characters".into());
    }
    Ok(())
}

/// Whether a hash can be checked, and at a bounded cost; why not.
pub fn usable_hash(hash: &str) -> Result<(), String> {
    if is_bcrypt(hash) {
        let cost: u32 = hash
            .get(4..6)
            .and_then(|c| c.parse().ok())
            .ok_or("a bcrypt hash without a cost")?;
        if cost > BCRYPT_MAX_COST {
            return Err(format!(
                "bcrypt cost {cost} is above {BCRYPT_MAX_COST}: each login would take seconds"
            ));
        }
        if hash.len() != 60 {
            return Err("a bcrypt hash is 60 characters".into());
        }
        return Ok(());
    }
    let parsed = PasswordHash::new(hash).map_err(|e| {
        format!(
            "neither an argon2 PHC string (`$argon2id$v=19$m=…`) nor a bcrypt hash (`$2b$…`): {e}"
        )
    })?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "`{}` hashes are not accepted: use argon2id or bcrypt",
            parsed.algorithm
        ));
    }
    let params =
        argon2::Params::try_from(&parsed).map_err(|e| format!("argon2 parameters: {e}"))?;
    if params.m_cost() > ARGON2_MAX_MEMORY_KIB || params.t_cost() > ARGON2_MAX_PASSES {
        return Err(format!(
            "argon2 cost m={} KiB, t={} is above m={ARGON2_MAX_MEMORY_KIB}, t={ARGON2_MAX_PASSES}",
            params.m_cost(),
            params.t_cost()
        ));
    }
    if parsed.hash.is_none() {
        return Err("an argon2 PHC string without its hash".into());
    }
    Ok(())
}

/// An argon2id hash of `password` with a fresh salt and the default cost
/// (OWASP's: 19 MiB, 2 passes).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| "no randomness for a salt".to_owned())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Adds or replaces a user in the store (the running gateway picks it up).
pub fn put_user(store: &dyn crate::store::Store, user: &User) -> Result<(), String> {
    usable_name(&user.name).map_err(|e| format!("user name: {e}"))?;
    usable_hash(&user.password_hash)?;
    store
        .put_record(crate::store::Table::Users, &user.name, user)
        .map_err(|e| e.to_string())
}

/// Whether the user was there.
pub fn remove_user(store: &dyn crate::store::Store, name: &str) -> Result<bool, String> {
    store
        .remove(crate::store::Table::Users, name)
        .map_err(|e| e.to_string())
}

/// A user in the store.
pub fn stored_user(store: &dyn crate::store::Store, name: &str) -> Result<Option<User>, String> {
    Ok(stored_users(store)?.into_iter().find(|u| u.name == name))
}

/// The store's users; a record that cannot be read is skipped (and
/// logged), so one bad row never holds back every other change.
pub fn stored_users(store: &dyn crate::store::Store) -> Result<Vec<User>, String> {
    let rows = store
        .scan(crate::store::Table::Users)
        .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, bytes)| match serde_json::from_slice(&bytes) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(user = %name, error = %e, "a stored user cannot be read; skipped");
                None
            }
        })
        .collect())
}

/// A user as shown (CLI, admin API): never its hash.
pub fn describe(u: &User) -> Value {
    serde_json::json!({
        "name": u.name,
        "roles": u.roles,
        "claims": u.claims,
        "topics": u.topics,
        "hash": if u.password_hash.starts_with("$argon2") { "argon2" } else { "bcrypt" },
    })
}

/// What a new user or a new password is made of: the password given, or a
/// generated one (returned, to be shown once).
pub fn new_password(given: Option<String>) -> Result<(String, bool), String> {
    match given {
        Some(p) if p.is_empty() => Err("an empty password".into()),
        Some(p) => Ok((p, false)),
        None => Ok((generate_password()?, true)),
    }
}

/// A random password for a new user: 24 characters of base64url (144 bits).
pub fn generate_password() -> Result<String, String> {
    use base64::Engine;
    let mut raw = [0u8; 18];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| "no randomness for a password".to_owned())?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, hash: String) -> User {
        User {
            name: name.into(),
            password_hash: hash,
            roles: vec!["device".into()],
            claims: Map::new(),
            topics: Vec::new(),
        }
    }

    #[tokio::test]
    async fn argon2id_and_bcrypt_verify_and_changes_apply_at_once() {
        let users = Users::default();
        let argon = hash_password(b"s3cret").unwrap();
        assert!(
            argon.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{argon}"
        );
        let bcrypt = bcrypt::hash(b"tstack", 4).unwrap();
        users.replace([user("a", argon.clone()), user("b", bcrypt)]);
        assert_eq!(users.verify("a", b"s3cret").await.unwrap().name, "a");
        assert_eq!(
            users.verify("b", b"tstack").await.unwrap().roles,
            ["device"]
        );
        assert_eq!(
            users.verify("a", b"S3cret").await.unwrap_err(),
            PasswordError::WrongPassword
        );
        assert_eq!(
            users.verify("a", b"").await.unwrap_err(),
            PasswordError::WrongPassword
        );
        assert_eq!(
            users.verify("c", b"s3cret").await.unwrap_err(),
            PasswordError::UnknownUser
        );
        // Remembered, then the password changes: the old one is refused.
        assert!(users.verify("a", b"s3cret").await.is_ok());
        users.replace([user("a", hash_password(b"new").unwrap())]);
        assert_eq!(
            users.verify("a", b"s3cret").await.unwrap_err(),
            PasswordError::WrongPassword
        );
        assert!(users.verify("a", b"new").await.is_ok());
        users.replace([]);
        assert_eq!(
            users.verify("a", b"new").await.unwrap_err(),
            PasswordError::UnknownUser
        );
    }

    #[test]
    fn hashes_are_checked_before_use() {
        assert!(usable_hash(&hash_password(b"x").unwrap()).is_ok());
        assert!(usable_hash(&bcrypt::hash(b"x", 4).unwrap()).is_ok());
        for bad in [
            "",
            "plain",
            "$2b$31$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyzABCDE",
            "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=99,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA",
        ] {
            assert!(usable_hash(bad).is_err(), "{bad}");
            assert_eq!(check(bad, b"x"), Err(PasswordError::UnusableHash), "{bad}");
        }
    }
}
