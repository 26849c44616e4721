//! The OAuth 2.0 token server (client credentials): `POST /oauth2/token` (and
//! `/token`), introspection (RFC 7662), revocation (RFC 7009), the JWKS and
//! the RFC 8414 metadata, on the listeners that enable it. Tokens are RFC 9068
//! JWTs signed with keys from the store; `keys: self` providers verify them in
//! process.

mod clients;
mod endpoints;
pub mod keys;
mod limit;
pub mod manage;
mod runtime;

use std::sync::Arc;

use bytes::Bytes;
use prometheus::IntCounterVec;

pub use clients::{Client, ClientRecord, Clients, new_secret};
pub use endpoints::{Endpoint, StoreWaiting};
pub use runtime::OAuthRuntime;

use crate::config::OAuthConfig;
use crate::identity::Revocations;
use crate::metrics::RouteMetrics;
use crate::store::Store;
use keys::KeyRing;

/// One config's token server: settings, clients and keys as of its build.
/// Replaced as a whole when the config or the store changes.
pub struct OAuthServer {
    pub issuer: String,
    pub clients: Clients,
    pub keys: Arc<KeyRing>,
    revocations: Arc<Revocations>,
    store: Option<Arc<dyn Store>>,
    /// Listeners that serve the endpoints.
    listeners: Vec<String>,
    max_body: usize,
    metadata_json: Bytes,
    /// Request metrics, under the route name `oauth`.
    pub metrics: RouteMetrics,
    issued: IntCounterVec,
    auth_failures: IntCounterVec,
    limiter: Arc<crate::identity::limit::AuthLimiter>,
    replays: Arc<limit::Replays>,
}

/// Listeners that serve the token server: as configured, else `sidecar`,
/// else the first listener.
pub fn serving_listeners(cfg: &crate::config::Config, oauth: &OAuthConfig) -> Vec<String> {
    match &oauth.listeners {
        Some(l) => l.clone(),
        None if cfg.listeners.iter().any(|l| l.name == "sidecar") => vec!["sidecar".into()],
        None => cfg
            .listeners
            .iter()
            .take(1)
            .map(|l| l.name.clone())
            .collect(),
    }
}

const AUTH_METHODS: [&str; 4] = [
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "tls_client_auth",
];

impl OAuthServer {
    /// The endpoint a request on `listener` to `path` is for, if any.
    pub fn endpoint(&self, listener: &str, path: &str) -> Option<Endpoint> {
        let ep = Endpoint::from_path(path)?;
        self.listeners.iter().any(|l| l == listener).then_some(ep)
    }

    fn metadata(issuer: &str) -> Bytes {
        let base = issuer.trim_end_matches('/');
        let doc = serde_json::json!({
            "issuer": issuer,
            "token_endpoint": format!("{base}/oauth2/token"),
            "jwks_uri": format!("{base}/.well-known/jwks.json"),
            "introspection_endpoint": format!("{base}/oauth2/introspect"),
            "revocation_endpoint": format!("{base}/oauth2/revoke"),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": AUTH_METHODS,
            "introspection_endpoint_auth_methods_supported": AUTH_METHODS,
            "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
            "token_endpoint_auth_signing_alg_values_supported": ["EdDSA", "ES256", "ES384", "RS256", "PS256"],
            "tls_client_certificate_bound_access_tokens": true,
        });
        Bytes::from(doc.to_string())
    }
}
