//! OAuth clients: from gateway.yaml and from the store. Each authenticates by
//! a secret (kept only as its SHA-256, compared in constant time), a signed
//! assertion (its public key), or its TLS client certificate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, OAuthConfig, TlsClientAuth};
use crate::identity::jwt::RemoteJwks;
use crate::identity::jwt::keys::KeySet;
use crate::identity::{CertIdentity, parse_hash};

/// A client as the store keeps it (`tollgate clients add`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub id: String,
    /// Hex SHA-256 of the secret.
    #[serde(default)]
    pub secret_sha256: Option<String>,
    /// PEM public key or JWK (Set) text, for private_key_jwt.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Or a JWK Set URL, for private_key_jwt.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub tls_client_auth: Option<TlsClientAuth>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub token_ttl_secs: Option<u64>,
    #[serde(default)]
    pub claims: Map<String, Value>,
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// May introspect other clients' tokens.
    #[serde(default)]
    pub introspect: bool,
    #[serde(default)]
    pub created_at: u64,
}

fn enabled() -> bool {
    true
}

impl ClientRecord {
    /// How many authentication methods it registers: exactly one is valid,
    /// so a certificate or key client can never fall back to a secret.
    pub fn methods(&self) -> usize {
        usize::from(self.secret_sha256.is_some())
            + usize::from(self.public_key.is_some() || self.jwks_uri.is_some())
            + usize::from(self.tls_client_auth.is_some())
    }
}

pub struct Client {
    pub id: String,
    secret_hash: Option<[u8; 32]>,
    /// Keys its assertions must be signed with (private_key_jwt).
    pub assertion_keys: Option<AssertionKeys>,
    pub tls: Option<TlsClientAuth>,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub ttl: Duration,
    pub claims: Map<String, Value>,
    pub enabled: bool,
    pub introspect: bool,
    /// `config` or `store`.
    pub source: &'static str,
}

pub enum AssertionKeys {
    Static(Arc<KeySet>),
    /// The client's JWK Set URL, fetched and refreshed in the background.
    Remote(Arc<RemoteJwks>),
}

/// Gets (or sets up) the fetcher of a client's JWK Set URL.
pub type RemoteKeys<'a> = dyn FnMut(&str, &str) -> Result<Arc<RemoteJwks>, String> + 'a;

#[derive(Default)]
pub struct Clients {
    by_id: HashMap<String, Arc<Client>>,
}

impl Clients {
    /// Clients from the config and the store; a config client wins over a
    /// store client of the same id (logged). A config client whose key file
    /// cannot be read is an error; a store record that cannot be used is
    /// skipped and logged.
    pub fn build(
        cfg: &OAuthConfig,
        stored: Vec<ClientRecord>,
        resolve: &dyn Fn(&Path) -> PathBuf,
        remote: &mut RemoteKeys,
    ) -> Result<Clients, Vec<ConfigError>> {
        let mut by_id = HashMap::new();
        let mut errors = Vec::new();
        for (i, c) in cfg.clients.iter().enumerate() {
            let assertion_keys = match (&c.public_key, &c.jwks_uri) {
                (None, Some(uri)) => match remote(&c.id, uri) {
                    Ok(r) => Some(AssertionKeys::Remote(r)),
                    Err(message) => {
                        errors.push(ConfigError {
                            path: format!("oauth.clients[{i}].jwks_uri"),
                            message,
                        });
                        continue;
                    }
                },
                (None, None) => None,
                (Some(file), _) => {
                    let path = resolve(file);
                    match std::fs::read(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))
                        .and_then(|b| {
                            public_keys(&b).map_err(|e| format!("{}: {e}", path.display()))
                        }) {
                        Ok(k) => Some(AssertionKeys::Static(Arc::new(k))),
                        Err(message) => {
                            errors.push(ConfigError {
                                path: format!("oauth.clients[{i}].public_key"),
                                message,
                            });
                            continue;
                        }
                    }
                }
            };
            by_id.insert(
                c.id.clone(),
                Arc::new(Client {
                    id: c.id.clone(),
                    secret_hash: c.secret_sha256.as_deref().and_then(parse_hash),
                    assertion_keys,
                    tls: c.tls_client_auth.clone(),
                    scopes: c.scopes.clone(),
                    audiences: c.audiences.clone(),
                    ttl: c.token_ttl.unwrap_or(cfg.token_ttl),
                    claims: c.claims.clone(),
                    enabled: c.enabled,
                    introspect: c.introspect,
                    source: "config",
                }),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for r in stored {
            if r.methods() != 1 {
                tracing::warn!(client = %r.id, "stored client does not have exactly one authentication method; skipped");
                continue;
            }
            if by_id.contains_key(&r.id) {
                tracing::warn!(client = %r.id, "a client in gateway.yaml has the id of a stored client; the file's wins");
                continue;
            }
            let secret_hash = match r.secret_sha256.as_deref().map(parse_hash) {
                Some(None) => {
                    tracing::warn!(client = %r.id, "stored client has an unusable secret hash; skipped");
                    continue;
                }
                Some(h) => h,
                None => None,
            };
            let assertion_keys = match (&r.public_key, &r.jwks_uri) {
                (Some(k), _) => {
                    public_keys(k.as_bytes()).map(|k| Some(AssertionKeys::Static(Arc::new(k))))
                }
                (None, Some(uri)) => remote(&r.id, uri).map(|r| Some(AssertionKeys::Remote(r))),
                (None, None) => Ok(None),
            };
            let assertion_keys = match assertion_keys {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(client = %r.id, error = %e, "stored client has unusable assertion keys; skipped");
                    continue;
                }
            };
            by_id.insert(
                r.id.clone(),
                Arc::new(Client {
                    secret_hash,
                    assertion_keys,
                    tls: r.tls_client_auth,
                    ttl: r.token_ttl_secs.map_or(cfg.token_ttl, Duration::from_secs),
                    source: "store",
                    id: r.id,
                    scopes: r.scopes,
                    audiences: r.audiences,
                    claims: r.claims,
                    enabled: r.enabled,
                    introspect: r.introspect,
                }),
            );
        }
        Ok(Clients { by_id })
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Client>> {
        self.by_id.get(id)
    }

    /// Every client, sorted by id, without secrets: `GET /admin/clients`.
    pub fn summary(&self) -> Vec<serde_json::Value> {
        let mut all: Vec<&Arc<Client>> = self.by_id.values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.iter()
            .map(|c| {
                let method = if c.secret_hash.is_some() {
                    "client_secret"
                } else if c.assertion_keys.is_some() {
                    "private_key_jwt"
                } else {
                    "tls_client_auth"
                };
                serde_json::json!({
                    "id": c.id, "enabled": c.enabled, "scopes": c.scopes,
                    "audiences": c.audiences, "token_ttl_secs": c.ttl.as_secs(),
                    "auth_method": method, "source": c.source,
                })
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The client whose secret this is. An unknown id (or one without a
    /// secret) costs the same hash and comparison as a known one.
    pub fn authenticate(&self, id: &str, secret: &str) -> Option<&Arc<Client>> {
        let presented = sha256(secret.as_bytes());
        let client = self.by_id.get(id);
        let expected = client.and_then(|c| c.secret_hash);
        let matches: bool = presented.ct_eq(&expected.unwrap_or([0xa5; 32])).into();
        client.filter(|_| matches && expected.is_some())
    }
}

/// Whether a verified certificate is the one a client registered.
pub fn cert_matches(auth: &TlsClientAuth, cert: &CertIdentity) -> bool {
    let has = |list: &[String], v: &str| list.iter().any(|x| x == v);
    match auth {
        TlsClientAuth::SubjectDn(dn) => cert.subject == *dn,
        TlsClientAuth::SanDns(v) => has(&cert.san_dns, v),
        TlsClientAuth::SanUri(v) => has(&cert.san_uri, v),
        TlsClientAuth::SanEmail(v) => has(&cert.san_email, v),
        TlsClientAuth::SanIp(v) => has(&cert.san_ip, v),
    }
}

/// A client's assertion keys from PEM (public keys) or JWK / JWK Set text.
pub fn public_keys(bytes: &[u8]) -> Result<KeySet, String> {
    let trimmed = bytes.trim_ascii_start();
    let keys = if trimmed.starts_with(b"{") {
        crate::identity::jwt::keys::from_jwk_json(bytes).map(|(k, _)| k)?
    } else {
        crate::identity::jwt::keys::from_pem(bytes)?
    };
    if keys.is_empty() {
        return Err("holds no public key".into());
    }
    Ok(KeySet::new(keys))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref());
    out
}

/// A new 256-bit secret (base64url) and its hex SHA-256.
pub fn new_secret() -> Result<(String, String), String> {
    use base64::Engine;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| "no randomness for a secret".to_string())?;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let hash = crate::identity::hex(&sha256(secret.as_bytes()));
    Ok((secret, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml_clients: Vec<crate::config::OAuthClientConfig>) -> OAuthConfig {
        OAuthConfig {
            issuer: "http://localhost:8082".into(),
            token_ttl: Duration::from_secs(300),
            signing_algorithm: Default::default(),
            listeners: None,
            signing_keys: Vec::new(),
            clients: yaml_clients,
            max_body_bytes: crate::config::units::ByteSize::kib(16),
            client_auth_limit: Default::default(),
            key_rotation: None,
        }
    }

    #[test]
    fn secrets_authenticate_and_config_wins() {
        let (secret, hash) = new_secret().unwrap();
        assert_eq!(secret.len(), 43);
        let (other, other_hash) = new_secret().unwrap();
        let file_client = crate::config::OAuthClientConfig {
            id: "foo".into(),
            secret_sha256: Some(hash.clone()),
            public_key: None,
            jwks_uri: None,
            tls_client_auth: None,
            scopes: vec!["a".into()],
            audiences: vec![],
            token_ttl: None,
            claims: Map::new(),
            enabled: true,
            introspect: false,
        };
        let stored = vec![
            ClientRecord {
                id: "foo".into(),
                secret_sha256: Some(other_hash.clone()),
                public_key: None,
                jwks_uri: None,
                tls_client_auth: None,
                scopes: vec![],
                audiences: vec![],
                token_ttl_secs: None,
                claims: Map::new(),
                enabled: true,
                introspect: false,
                created_at: 0,
            },
            ClientRecord {
                id: "bar".into(),
                secret_sha256: Some(other_hash.to_uppercase()),
                public_key: None,
                jwks_uri: None,
                tls_client_auth: None,
                scopes: vec![],
                audiences: vec![],
                token_ttl_secs: Some(60),
                claims: Map::new(),
                enabled: true,
                introspect: false,
                created_at: 0,
            },
        ];
        let clients = Clients::build(
            &cfg(vec![file_client]),
            stored,
            &|p| p.to_owned(),
            &mut |_, _| Err("no remote keys here".into()),
        )
        .unwrap();
        assert_eq!(clients.len(), 2);
        assert_eq!(
            clients.authenticate("foo", &secret).unwrap().source,
            "config"
        );
        assert!(clients.authenticate("foo", &other).is_none());
        let bar = clients.authenticate("bar", &other).unwrap();
        assert_eq!(bar.ttl, Duration::from_secs(60));
        assert!(clients.authenticate("nobody", &other).is_none());
        assert!(parse_hash("zz").is_none());
    }
}
