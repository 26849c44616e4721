//! A remote JWK Set: fetched with the hyper client (https with the system or
//! a given CA), refreshed in the background on the schedule the response's
//! `Cache-Control: max-age` asks for (within configured bounds), fetched again
//! when a token names an unknown `kid` (at most once per interval, and
//! concurrent requests share one fetch), and kept as it was when the endpoint
//! fails or answers garbage (stale-if-error).

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounterVec;

use super::keys::{self, KeySet};
use crate::config::JwksConfig;
use crate::telemetry::error_chain;

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

pub struct RemoteJwks {
    provider: Arc<str>,
    uri: Uri,
    client: HttpsClient,
    settings: JwksConfig,
    keys: ArcSwap<KeySet>,
    refetch: Mutex<Refetch>,
    /// The control runtime: fetches run there, whichever worker asked.
    runtime: OnceLock<tokio::runtime::Handle>,
    fetches: IntCounterVec,
    /// Turns true once the first fetch has been tried, whatever its outcome.
    first_attempt: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct Refetch {
    last: Option<Instant>,
    inflight: Option<Shared<BoxFuture<'static, bool>>>,
}

impl RemoteJwks {
    pub fn new(
        provider: &str,
        uri: Uri,
        settings: JwksConfig,
        roots: rustls::RootCertStore,
        fetches: IntCounterVec,
    ) -> Result<RemoteJwks, String> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(https);
        Ok(RemoteJwks {
            provider: Arc::from(provider),
            uri,
            client,
            settings,
            keys: ArcSwap::from_pointee(KeySet::default()),
            refetch: Mutex::new(Refetch::default()),
            runtime: OnceLock::new(),
            fetches,
            first_attempt: tokio::sync::watch::Sender::new(false),
        })
    }

    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Starts the background refresh on the current (control) runtime; it
    /// ends when the provider is dropped (a reload replaced it).
    pub fn start(self: &Arc<Self>) {
        if self.runtime.set(tokio::runtime::Handle::current()).is_err() {
            return;
        }
        let weak: Weak<RemoteJwks> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let Some(me) = weak.upgrade() else { return };
                let fetched = me.fetch_and_store("refresh").await;
                me.first_attempt.send_replace(true);
                let wait = match fetched {
                    Ok(max_age) => {
                        backoff = Duration::from_secs(1);
                        max_age
                            .unwrap_or(Duration::from_secs(300))
                            .clamp(me.settings.min_refresh, me.settings.max_refresh)
                    }
                    Err(()) => {
                        let wait = backoff.min(me.settings.min_refresh);
                        backoff = (backoff * 2).min(me.settings.min_refresh);
                        wait
                    }
                };
                drop(me);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// Waits (up to the fetch timeout) for the first fetch after start to
    /// have been tried, so the first requests do not fail for want of keys.
    pub async fn first_fetch(&self) {
        let mut attempted = self.first_attempt.subscribe();
        let _ = tokio::time::timeout(self.settings.timeout, attempted.wait_for(|done| *done)).await;
    }

    /// Fetches the set again for a token whose `kid` is unknown; returns once
    /// the fetch is done (or at once when one ran too recently). Concurrent
    /// callers wait for the same fetch.
    pub async fn refetch_for_unknown_kid(self: &Arc<Self>) -> bool {
        let fetch = {
            let mut state = self.refetch.lock().unwrap_or_else(|p| p.into_inner());
            match &state.inflight {
                Some(f) if f.peek().is_none() => f.clone(),
                _ => {
                    let recent = state
                        .last
                        .is_some_and(|t| t.elapsed() < self.settings.unknown_kid_refetch);
                    let Some(runtime) = self.runtime.get().filter(|_| !recent) else {
                        self.count("unknown_kid", "rate_limited");
                        return false;
                    };
                    state.last = Some(Instant::now());
                    let me = self.clone();
                    let task = runtime
                        .spawn(async move { me.fetch_and_store("unknown_kid").await.is_ok() });
                    let f = async move { task.await.unwrap_or(false) }.boxed().shared();
                    state.inflight = Some(f.clone());
                    f
                }
            }
        };
        fetch.await
    }

    fn count(&self, reason: &str, outcome: &str) {
        self.fetches
            .with_label_values(&[&self.provider, reason, outcome])
            .inc();
    }

    /// One fetch; on success the new keys replace the old and the max-age is
    /// returned; on failure the old keys stay and the reason is logged.
    async fn fetch_and_store(&self, reason: &str) -> Result<Option<Duration>, ()> {
        match self.fetch().await {
            Ok((set, skipped, max_age)) => {
                for s in &skipped {
                    tracing::warn!(provider = %self.provider, uri = %self.uri, key = %s, "JWK Set key skipped");
                }
                tracing::debug!(provider = %self.provider, keys = set.len(), reason, "JWK Set fetched");
                self.keys.store(Arc::new(set));
                self.count(reason, "ok");
                Ok(max_age)
            }
            Err(e) => {
                let kept = self.keys.load().len();
                tracing::warn!(provider = %self.provider, uri = %self.uri, error = %e, kept_keys = kept, reason,
                    "JWK Set fetch failed; keeping the keys already known");
                self.count(reason, "error");
                Err(())
            }
        }
    }

    async fn fetch(&self) -> Result<(KeySet, Vec<String>, Option<Duration>), String> {
        let req = Request::get(self.uri.clone())
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .header(
                header::USER_AGENT,
                concat!("tollgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let timeout = self.settings.timeout;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("answered HTTP {}", resp.status()));
        }
        let max_age = resp
            .headers()
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let limit = self.settings.max_bytes.as_usize();
        let body = tokio::time::timeout(timeout, Limited::new(resp.into_body(), limit).collect())
            .await
            .map_err(|_| format!("body not received within {timeout:?}"))?
            .map_err(|e| format!("reading the body failed (limit {limit} bytes): {e}"))?
            .to_bytes();
        let (keys, skipped) = keys::from_jwk_json(&body)?;
        Ok((KeySet::new(keys), skipped, max_age))
    }
}

/// `max-age` from a Cache-Control value (`no-store`/`no-cache` mean zero).
fn max_age(value: &str) -> Option<Duration> {
    value.split(',').map(str::trim).find_map(|d| {
        if d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        let (k, v) = d.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| v.trim().trim_matches('"').parse().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=abc"), None);
    }
}
