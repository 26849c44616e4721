//! The token server across reloads: the store, the published keys shared with
//! `keys: self` providers, and the current server, rebuilt when gateway.yaml
//! or the store file changes (`tollgate clients add`, `tollgate keys rotate`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use super::endpoints::StoreWaiting;
use super::keys::{self, KeySource};
use super::limit::Replays;
use super::{ClientRecord, Clients, OAuthServer, serving_listeners};
use crate::config::watch::{ConfigWatch, watch_files};
use crate::config::{ClientAuthLimit, Config, ConfigError, JwksConfig};
use crate::identity::Revocations;
use crate::identity::jwt::RemoteJwks;
use crate::identity::jwt::{SelfKeys, unix_now};
use crate::identity::limit::AuthLimiter;
use crate::metrics::Metrics;
use crate::store::{Store, StoreView};

pub struct OAuthRuntime {
    /// What `keys: self` providers verify with.
    pub self_keys: SelfKeys,
    /// What the HTTP stack serves; `None` without an `oauth` section.
    pub server: Arc<ArcSwapOption<OAuthServer>>,
    /// What answers the token server's endpoints while it waits for its
    /// store (`server` is `None` then).
    pub waiting: Arc<ArcSwapOption<StoreWaiting>>,
    /// The config last applied, for rebuilding on store changes.
    applied: Mutex<Option<(Arc<Config>, Arc<Revocations>)>>,
    issued: IntCounterVec,
    auth_failures: IntCounterVec,
    metrics: Arc<Metrics>,
    /// Kept across rebuilds while its settings stay the same.
    limiter: Mutex<Option<(ClientAuthLimit, Arc<AuthLimiter>)>>,
    /// Client assertions already used; kept across rebuilds.
    replays: Arc<Replays>,
    /// Pinged when a config is applied, so `maintain` watches its store.
    reapplied: tokio::sync::Notify,
    /// One apply at a time (config reload, store change, key maintenance).
    apply_lock: Mutex<()>,
    /// Clients' JWK Set fetchers by (client, URL), kept across rebuilds.
    remote_keys: Mutex<HashMap<(String, String), Arc<RemoteJwks>>>,
    pub sync: StoreSync,
    /// Everything else served from the store (users), loaded with it.
    views: Vec<Arc<dyn StoreView>>,
}

/// Whether the token server serves what the store holds: the store's
/// generation as last read and as loaded, and why a change waits.
pub struct StoreSync {
    applied: AtomicU64,
    stored: AtomicU64,
    /// Since when a store change waits to be applied, and why.
    waiting: Mutex<Option<(SystemTime, String)>>,
    metrics: Arc<Metrics>,
}

impl StoreSync {
    fn new(metrics: Arc<Metrics>) -> StoreSync {
        metrics.store_in_sync.set(1);
        StoreSync {
            applied: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            waiting: Mutex::new(None),
            metrics,
        }
    }

    fn read(&self, stored: u64) {
        self.stored.store(stored, Ordering::Relaxed);
        self.metrics
            .store_generation
            .with_label_values(&["stored"])
            .set(stored as i64);
        self.publish();
    }

    /// The store was loaded whole as of `generation`.
    fn loaded(&self, generation: u64) {
        self.applied.store(generation, Ordering::Relaxed);
        self.metrics
            .store_generation
            .with_label_values(&["applied"])
            .set(generation as i64);
        let waited = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((since, _)) = waited {
            let waited_ms = since.elapsed().map_or(0, |d| d.as_millis() as u64);
            tracing::info!(
                generation,
                waited_ms,
                "store changes applied; the token server serves what the store holds"
            );
        }
        self.read(generation.max(self.stored.load(Ordering::Relaxed)));
    }

    /// A re-read failed: the change waits (and is retried).
    pub fn failed(&self, why: &str) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match waiting.as_mut() {
            Some((_, reason)) => *reason = why.to_owned(),
            None => *waiting = Some((SystemTime::now(), why.to_owned())),
        }
        drop(waiting);
        self.publish();
    }

    /// The store is in use again (a gateway without a token server reads
    /// it for admin API routes only).
    pub fn usable_again(&self) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.publish();
    }

    /// Why store changes wait, if they do.
    pub fn waiting(&self) -> Option<String> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, why)| why.clone())
    }

    fn in_sync(&self) -> bool {
        self.applied.load(Ordering::Relaxed) >= self.stored.load(Ordering::Relaxed)
            && self
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
    }

    fn publish(&self) {
        self.metrics.store_in_sync.set(i64::from(self.in_sync()));
    }

    /// For `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "generation": {
                "applied": self.applied.load(Ordering::Relaxed),
                "stored": self.stored.load(Ordering::Relaxed),
            },
            "in_sync": self.in_sync(),
            "waiting": waiting.map(|(since, error)| serde_json::json!({
                "since": httpdate::fmt_http_date(since),
                "error": error,
            })),
        })
    }
}

/// Backoff between attempts to apply a store change that failed to load.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MOST: Duration = Duration::from_secs(30);
/// How often the store's generation is compared with what is served, in
/// case a change notification was missed.
const GENERATION_CHECK: Duration = Duration::from_secs(30);

/// Keys retired by rotation stay published this long past the longest token
/// lifetime, for clock skew and caches.
const OVERLAP_SLACK_SECS: u64 = 120;

impl OAuthRuntime {
    pub fn new(metrics: Arc<Metrics>, views: Vec<Arc<dyn StoreView>>) -> OAuthRuntime {
        OAuthRuntime {
            self_keys: SelfKeys::default(),
            server: Arc::new(ArcSwapOption::empty()),
            waiting: Arc::new(ArcSwapOption::empty()),
            applied: Mutex::new(None),
            limiter: Mutex::new(None),
            replays: Arc::default(),
            reapplied: tokio::sync::Notify::new(),
            remote_keys: Mutex::new(HashMap::new()),
            apply_lock: Mutex::new(()),
            sync: StoreSync::new(metrics.clone()),
            views,
            issued: metrics.counter(
                "tollgate_oauth_tokens_issued_total",
                "Access tokens issued by the token server, by client",
                &["client"],
            ),
            auth_failures: metrics.counter(
                "tollgate_oauth_client_auth_failures_total",
                "Failed client authentications at the token server, by reason (missing | malformed | bad_credentials | disabled | rate_limited)",
                &["reason"],
            ),
            metrics,
        }
    }

    pub fn store_path(cfg: &Config) -> PathBuf {
        cfg.resolve(&cfg.store.path)
    }

    /// Builds the token server for `cfg` (opening the store, generating a
    /// signing key on first use) and swaps it in. On error nothing changes.
    pub fn apply(
        &self,
        cfg: &Arc<Config>,
        revocations: &Arc<Revocations>,
    ) -> Result<(), Vec<ConfigError>> {
        let _one = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_locked(cfg, revocations)
    }

    fn apply_locked(
        &self,
        cfg: &Arc<Config>,
        revocations: &Arc<Revocations>,
    ) -> Result<(), Vec<ConfigError>> {
        let fail = |path: &str, message: String| {
            vec![ConfigError {
                path: path.into(),
                message,
            }]
        };
        let store_key = cfg.store.key();
        let store = self.open_store(cfg).map_err(|e| fail(store_key, e))?;
        // Read first: what follows is at least this new.
        let generation = match &store {
            Some(store) => store
                .generation()
                .map_err(|e| fail(store_key, e.to_string()))?,
            None => 0,
        };
        for view in &self.views {
            view.load(cfg, store.as_deref())
                .map_err(|e| fail(store_key, e))?;
        }
        let (Some(oauth), Some(store)) = (&cfg.oauth, store) else {
            self.server.store(None);
            self.waiting.store(None);
            self.sync.loaded(generation);
            self.remember(cfg, revocations);
            return Ok(());
        };
        let stored: Vec<ClientRecord> = store
            .clients()
            .map_err(|e| fail(store_key, e.to_string()))?;
        let overlap = key_overlap(cfg, &stored);
        let now = unix_now();
        let source = if oauth.signing_keys.is_empty() {
            KeySource::Store(&*store)
        } else {
            KeySource::Files(&oauth.signing_keys, &|p| cfg.resolve(p))
        };
        let ring = keys::load(source, oauth.signing_algorithm, overlap, now).map_err(|e| {
            fail(
                if oauth.signing_keys.is_empty() {
                    store_key
                } else {
                    "oauth.signing_keys"
                },
                e,
            )
        })?;
        let revoked = store
            .revoked()
            .map_err(|e| fail(store_key, e.to_string()))?;
        revocations.extend(&revoked);
        let mut previous =
            std::mem::take(&mut *self.remote_keys.lock().unwrap_or_else(|e| e.into_inner()));
        let mut kept = HashMap::new();
        let fetches = self.metrics.auth_jwks_fetches.clone();
        let clients = Clients::build(oauth, stored, &|p| cfg.resolve(p), &mut |id, uri| {
            let key = (id.to_owned(), uri.to_owned());
            let remote = match previous.remove(&key) {
                Some(r) => r,
                None => {
                    let r = Arc::new(RemoteJwks::new(
                        &format!("client:{id}"),
                        crate::identity::jwt::jwks_url(uri)?,
                        JwksConfig::default(),
                        crate::transport::tls::system_roots(),
                        fetches.clone(),
                    )?);
                    r.start();
                    r
                }
            };
            kept.insert(key, remote.clone());
            Ok(remote)
        });
        *self.remote_keys.lock().unwrap_or_else(|e| e.into_inner()) = kept;
        let clients = clients?;
        let listeners = serving_listeners(cfg, oauth);
        let route_listeners: Vec<String> = cfg.listeners.iter().map(|l| l.name.clone()).collect();
        let ring = Arc::new(ring);
        self.self_keys.store(ring.verify.clone());
        // Told when what it serves changed; a re-read that found the same
        // is not news.
        let same = self.server.load().as_ref().is_some_and(|s| {
            s.clients.len() == clients.len()
                && s.keys.signing.kid == ring.signing.kid
                && s.keys.published.len() == ring.published.len()
                && s.listeners == listeners
        });
        if same {
            tracing::debug!(clients = clients.len(), "token server re-read; unchanged");
        } else {
            tracing::info!(
                clients = clients.len(),
                signing_kid = %ring.signing.kid,
                published_keys = ring.published.len(),
                listeners = ?listeners,
                "token server ready"
            );
        }
        self.server.store(Some(Arc::new(OAuthServer {
            issuer: oauth.issuer.clone(),
            clients,
            keys: ring,
            revocations: revocations.clone(),
            store: Some(store),
            listeners,
            max_body: oauth.max_body_bytes.as_usize(),
            metadata_json: OAuthServer::metadata(&oauth.issuer),
            metrics: self.metrics.route("oauth", &route_listeners),
            issued: self.issued.clone(),
            auth_failures: self.auth_failures.clone(),
            limiter: self.limiter(&oauth.client_auth_limit),
            replays: self.replays.clone(),
        })));
        // Only now: in between, its endpoints would fall through to 404.
        self.waiting.store(None);
        self.sync.loaded(generation);
        self.remember(cfg, revocations);
        Ok(())
    }

    /// The config applied, for re-reads; `maintain` is told when its store moved.
    fn remember(&self, cfg: &Arc<Config>, revocations: &Arc<Revocations>) {
        let previous = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((cfg.clone(), revocations.clone()));
        if previous.is_none_or(|(c, _)| c.store != cfg.store || c.base_dir != cfg.base_dir) {
            self.reapplied.notify_one();
        }
    }

    /// The store cannot be used at start: no token server until it can
    /// (the gateway retries); `keys: self` routes have no keys meanwhile.
    pub fn start_without_store(
        &self,
        cfg: &Arc<Config>,
        revocations: &Arc<Revocations>,
        why: &str,
    ) {
        self.server.store(None);
        self.waiting.store(cfg.oauth.as_ref().map(|oauth| {
            let route_listeners: Vec<String> =
                cfg.listeners.iter().map(|l| l.name.clone()).collect();
            Arc::new(StoreWaiting {
                listeners: serving_listeners(cfg, oauth),
                metrics: self.metrics.route("oauth", &route_listeners),
            })
        }));
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((cfg.clone(), revocations.clone()));
        self.sync.failed(why);
        self.reapplied.notify_one();
    }

    fn limiter(&self, settings: &ClientAuthLimit) -> Arc<AuthLimiter> {
        let mut current = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, l)) = current.as_ref()
            && s == settings
        {
            return l.clone();
        }
        let l = Arc::new(AuthLimiter::new(settings.max_failures, settings.window));
        *current = Some((settings.clone(), l.clone()));
        l
    }

    /// Drops stored revocations of tokens that have expired anyway.
    pub async fn purge_stored_revocations(&self, now: u64) {
        let Some((cfg, _)) = self.current() else {
            return;
        };
        let store = match self.open_store(&cfg) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot purge expired revocations from the store");
                return;
            }
        };
        match tokio::task::spawn_blocking(move || store.purge_revoked(now)).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::debug!(purged = n, "expired revocations purged from the store")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot purge expired revocations from the store")
            }
            _ => {}
        }
    }

    /// The store, created for a token server; without one, only if it
    /// exists (users and API routes are read from it, never made).
    fn open_store(&self, cfg: &Config) -> Result<Option<Arc<dyn Store>>, String> {
        let opened = match cfg.oauth {
            Some(_) => crate::store::open(cfg).map(Some),
            None => crate::store::existing(cfg),
        };
        opened.map_err(|e| e.to_string())
    }

    /// Runs until `stop`: rebuilds the server when the store's change marker
    /// is touched (`tollgate clients ...`, `tollgate keys rotate`), drops keys
    /// whose overlap has ended, and rotates the signing key when
    /// `oauth.key_rotation` says it is due.
    pub fn maintain(self: &Arc<Self>, debounce: Duration, stop: CancellationToken) {
        let runtime = self.clone();
        tokio::spawn(async move {
            let mut watched: Option<(PathBuf, ConfigWatch)> = None;
            let mut warned: Option<PathBuf> = None;
            let mut next_check = tokio::time::Instant::now();
            let mut next_generation_check = tokio::time::Instant::now() + GENERATION_CHECK;
            // A change that failed to load: when to try again, and the wait after.
            let mut retry: Option<(tokio::time::Instant, Duration)> = None;
            loop {
                let current = runtime.current();
                // A load that failed elsewhere (a reload, the start) is
                // retried here too.
                if retry.is_none() && current.is_some() && runtime.sync.waiting().is_some() {
                    retry = Some((tokio::time::Instant::now() + RETRY_FIRST, RETRY_FIRST));
                }
                let marker = current
                    .as_ref()
                    .and_then(|(cfg, _)| crate::store::change_marker(cfg));
                // Key checks every minute, more often for short rotation periods.
                let every = current
                    .as_ref()
                    .and_then(|(cfg, _)| cfg.oauth.as_ref()?.key_rotation)
                    .map_or(Duration::from_secs(60), |r| {
                        (r / 4).clamp(Duration::from_millis(250), Duration::from_secs(60))
                    });
                // A store not made yet (no token server, no users added)
                // is watched once its directory exists; the generation
                // check finds it first.
                let marker = marker.filter(|m| {
                    m.parent()
                        .is_none_or(|d| d.as_os_str().is_empty() || d.exists())
                });
                if watched.as_ref().map(|(p, _)| p) != marker.as_ref() {
                    watched = marker.and_then(|m| match watch_files(std::slice::from_ref(&m)) {
                        Ok(w) => Some((m, w)),
                        Err(e) => {
                            if warned.as_ref() != Some(&m) {
                                tracing::warn!(store = %m.display(), error = %e,
                                    "cannot watch the store; its changes apply within a minute, or on reload (SIGHUP)");
                                warned = Some(m);
                            }
                            None
                        }
                    });
                }
                let changed = async {
                    match watched.as_mut() {
                        Some((_, w)) => w.changes.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let retry_at = retry.map(|(at, _)| at);
                let load = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = runtime.reapplied.notified() => continue,
                    _ = tokio::time::sleep_until(next_check) => {
                        next_check = tokio::time::Instant::now() + every;
                        runtime.clone().keys_due().await;
                        false
                    }
                    _ = tokio::time::sleep_until(next_generation_check) => {
                        next_generation_check = tokio::time::Instant::now() + GENERATION_CHECK;
                        retry.is_none() && runtime.clone().store_moved_on().await
                    }
                    _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => true,
                    change = changed => {
                        if change.is_none() {
                            watched = None;
                            continue;
                        }
                        tokio::time::sleep(debounce).await;
                        if let Some((_, w)) = watched.as_mut() {
                            while w.changes.try_recv().is_ok() {}
                        }
                        tracing::debug!("store changed; reloading clients and keys");
                        true
                    }
                };
                if load {
                    retry = match (runtime.clone().reapply().await, retry) {
                        (Ok(()), _) => None,
                        (Err(_), None) => {
                            Some((tokio::time::Instant::now() + RETRY_FIRST, RETRY_FIRST))
                        }
                        (Err(_), Some((_, wait))) => {
                            let wait = (wait * 2).min(RETRY_MOST);
                            Some((tokio::time::Instant::now() + wait, wait))
                        }
                    };
                }
            }
        });
    }

    /// Whether the store holds changes the token server does not serve (its
    /// generation is past what was loaded).
    async fn store_moved_on(self: Arc<Self>) -> bool {
        let Some((cfg, _)) = self.current() else {
            return false;
        };
        let runtime = self.clone();
        let read = tokio::task::spawn_blocking(move || match runtime.open_store(&cfg)? {
            Some(store) => store.generation().map_err(|e| e.to_string()),
            None => Ok(0),
        })
        .await;
        match read {
            Ok(Ok(generation)) => {
                self.sync.read(generation);
                generation > self.sync.applied.load(Ordering::Relaxed)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the store's generation");
                false
            }
            Err(_) => false,
        }
    }

    fn current(&self) -> Option<(Arc<Config>, Arc<Revocations>)> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies the current config again (reading the store afresh). A
    /// failure leaves the running server as it was, is logged and counted
    /// as a change waiting; the caller tries again.
    pub async fn reapply(self: Arc<Self>) -> Result<(), String> {
        // Store access blocks (file lock, fsync): off the event loop. The
        // config is read under the lock, so a reload cannot be undone by an
        // older snapshot.
        let runtime = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _one = runtime.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
            match runtime.current() {
                Some((cfg, revocations)) => runtime.apply_locked(&cfg, &revocations),
                None => Ok(()),
            }
        })
        .await;
        let why = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(errors)) => errors
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => e.to_string(),
        };
        tracing::error!(error = %why,
            "store changed but cannot be loaded; the token server keeps its clients and keys until it can (retrying)");
        self.sync.failed(&why);
        Err(why)
    }

    /// Rotates a signing key that is due, or drops published keys whose
    /// overlap has ended.
    async fn keys_due(self: Arc<Self>) {
        let (Some((cfg, _)), Some(server)) = (self.current(), self.server.load_full()) else {
            return;
        };
        let Some(oauth) = cfg.oauth.as_ref() else {
            return;
        };
        let now = unix_now();
        let max_age = oauth
            .key_rotation
            .filter(|_| oauth.signing_keys.is_empty())
            .map(|age| age.as_secs());
        let rotate = max_age.is_some_and(|age| server.keys.signing.created_at + age <= now);
        if let (true, Some(max_age)) = (rotate, max_age) {
            let store = self.open_store(&cfg);
            let alg = oauth.signing_algorithm;
            let rotated = tokio::task::spawn_blocking(move || {
                let store = store?.ok_or("no store")?;
                let stored: Vec<ClientRecord> = store.clients().map_err(|e| e.to_string())?;
                keys::rotate_due(&*store, alg, key_overlap(&cfg, &stored), now, max_age)
            })
            .await;
            match rotated {
                // The store's change marker (or feed) brings the new key in.
                Ok(Ok(Some(kid))) => {
                    tracing::info!(kid, "signing key rotated (oauth.key_rotation)")
                }
                // Another node rotated first; its key is read now.
                Ok(Ok(None)) => {
                    let _ = self.reapply().await;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "automatic key rotation failed; signing with the current key")
                }
                Err(_) => {}
            }
        } else if server
            .keys
            .published
            .iter()
            .any(|k| k.retire_at.is_some_and(|t| t <= now))
        {
            let _ = self.reapply().await;
        }
    }
}

/// How long a retired key stays published: the longest token lifetime the
/// config can issue, plus slack.
pub(crate) fn key_overlap(cfg: &Config, stored: &[ClientRecord]) -> u64 {
    max_ttl(cfg, stored) + OVERLAP_SLACK_SECS
}

/// The longest token lifetime of any client, in gateway.yaml or the store.
fn max_ttl(cfg: &Config, stored: &[ClientRecord]) -> u64 {
    cfg.oauth.as_ref().map_or(0, |o| {
        let configured = o
            .clients
            .iter()
            .filter_map(|c| c.token_ttl)
            .chain([o.token_ttl])
            .map(|d| d.as_secs());
        let stored = stored.iter().filter_map(|c| c.token_ttl_secs);
        configured.chain(stored).max().unwrap_or(0)
    })
}
