//! The token server across reloads: the store, the published keys shared with
//! `keys: self` providers, and the current server, rebuilt when gateway.yaml
//! or the store file changes (`tollgate clients add`, `tollgate keys rotate`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use super::keys::{self, KeySource};
use super::limit::{AuthLimiter, Replays};
use super::{ClientRecord, Clients, OAuthServer, serving_listeners};
use crate::config::{ClientAuthLimit, Config, ConfigError};
use crate::identity::Revocations;
use crate::identity::jwt::{SelfKeys, unix_now};
use crate::metrics::Metrics;
use crate::store::Store;

pub struct OAuthRuntime {
    /// What `keys: self` providers verify with.
    pub self_keys: SelfKeys,
    /// What the HTTP stack serves; `None` without an `oauth` section.
    pub server: Arc<ArcSwapOption<OAuthServer>>,
    store: Mutex<Option<Arc<Store>>>,
    /// The config last applied, for rebuilding on store changes.
    applied: Mutex<Option<(Arc<Config>, Arc<Revocations>)>>,
    issued: IntCounterVec,
    auth_failures: IntCounterVec,
    metrics: Arc<Metrics>,
    /// Kept across rebuilds while its settings stay the same.
    limiter: Mutex<Option<(ClientAuthLimit, Arc<AuthLimiter>)>>,
    /// Client assertions already used; kept across rebuilds.
    replays: Arc<Replays>,
}

/// Keys retired by rotation stay published this long past the longest token
/// lifetime, for clock skew and caches.
const OVERLAP_SLACK_SECS: u64 = 120;

impl OAuthRuntime {
    pub fn new(metrics: Arc<Metrics>) -> OAuthRuntime {
        OAuthRuntime {
            self_keys: SelfKeys::default(),
            server: Arc::new(ArcSwapOption::empty()),
            store: Mutex::new(None),
            applied: Mutex::new(None),
            limiter: Mutex::new(None),
            replays: Arc::default(),
            issued: metrics.oauth_tokens_issued.clone(),
            auth_failures: metrics.oauth_client_auth_failures.clone(),
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
        let Some(oauth) = &cfg.oauth else {
            self.server.store(None);
            *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(());
        };
        let fail = |path: &str, message: String| {
            vec![ConfigError {
                path: path.into(),
                message,
            }]
        };
        let store = self.open_store(cfg).map_err(|e| fail("store.path", e))?;
        let overlap = key_overlap(cfg);
        let now = unix_now();
        let source = if oauth.signing_keys.is_empty() {
            KeySource::Store(&store)
        } else {
            KeySource::Files(&oauth.signing_keys, &|p| cfg.resolve(p))
        };
        let ring = keys::load(source, oauth.signing_algorithm, overlap, now).map_err(|e| {
            fail(
                if oauth.signing_keys.is_empty() {
                    "store.path"
                } else {
                    "oauth.signing_keys"
                },
                e,
            )
        })?;
        let stored: Vec<ClientRecord> = store
            .clients()
            .map_err(|e| fail("store.path", e.to_string()))?;
        let revoked = store
            .revoked()
            .map_err(|e| fail("store.path", e.to_string()))?;
        revocations.extend(&revoked);
        let clients = Clients::build(oauth, stored, &|p| cfg.resolve(p))?;
        let listeners = serving_listeners(cfg, oauth);
        let route_listeners: Vec<String> = cfg.listeners.iter().map(|l| l.name.clone()).collect();
        let ring = Arc::new(ring);
        self.self_keys.store(ring.verify.clone());
        tracing::info!(
            clients = clients.len(),
            signing_kid = %ring.signing.kid,
            published_keys = ring.published.len(),
            listeners = ?listeners,
            "token server ready"
        );
        self.server.store(Some(Arc::new(OAuthServer {
            issuer: oauth.issuer.clone(),
            default_ttl: oauth.token_ttl,
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
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((cfg.clone(), revocations.clone()));
        Ok(())
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

    fn open_store(&self, cfg: &Config) -> Result<Arc<Store>, String> {
        let path = Self::store_path(cfg);
        let mut current = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = current.as_ref().filter(|s| s.path() == path) {
            return Ok(s.clone());
        }
        let store = Arc::new(Store::open(&path).map_err(|e| e.to_string())?);
        *current = Some(store.clone());
        Ok(store)
    }

    /// Rebuilds the server whenever the store file changes; ends with `stop`.
    pub fn watch_store(
        self: &Arc<Self>,
        cfg: &Config,
        debounce: std::time::Duration,
        stop: CancellationToken,
    ) {
        if cfg.oauth.is_none() {
            return;
        }
        let path = Store::change_marker(&Self::store_path(cfg));
        let watch = match crate::config::watch::watch_files(std::slice::from_ref(&path)) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(store = %path.display(), error = %e,
                    "cannot watch the store; clients and keys changed by the CLI apply on reload (SIGHUP)");
                return;
            }
        };
        let runtime = self.clone();
        tracing::debug!(store = %path.display(), "watching the store");
        tokio::spawn(async move {
            // Own the whole watch: dropping the OS watcher ends the events.
            let mut watch = watch;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    change = watch.changes.recv() => if change.is_none() { return },
                }
                tokio::time::sleep(debounce).await;
                while watch.changes.try_recv().is_ok() {}
                tracing::debug!("store changed; reloading clients and keys");
                let applied = runtime
                    .applied
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let Some((cfg, revocations)) = applied else {
                    continue;
                };
                let rt = runtime.clone();
                // Store reads block (file lock, fsync): off the event loop.
                let result =
                    tokio::task::spawn_blocking(move || rt.apply(&cfg, &revocations)).await;
                if let Ok(Err(errors)) = result {
                    for e in errors {
                        tracing::error!(key = %e.path, error = %e.message,
                            "store changed but cannot be loaded; the token server keeps its clients and keys");
                    }
                }
            }
        });
    }
}

/// How long a retired key stays published: the longest token lifetime the
/// config can issue, plus slack.
pub(crate) fn key_overlap(cfg: &Config) -> u64 {
    max_ttl(cfg) + OVERLAP_SLACK_SECS
}

fn max_ttl(cfg: &Config) -> u64 {
    cfg.oauth.as_ref().map_or(0, |o| {
        o.clients
            .iter()
            .filter_map(|c| c.token_ttl)
            .chain([o.token_ttl])
            .max()
            .unwrap_or(o.token_ttl)
            .as_secs()
    })
}
