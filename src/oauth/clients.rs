//! OAuth clients: from gateway.yaml and from the store, secrets kept only as
//! SHA-256 hashes and compared in constant time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use crate::config::OAuthConfig;

/// A client as the store keeps it (`tollgate clients add`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub id: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
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
    #[serde(default)]
    pub created_at: u64,
}

fn enabled() -> bool {
    true
}

pub struct Client {
    pub id: String,
    secret_hash: [u8; 32],
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub ttl: Duration,
    pub claims: Map<String, Value>,
    pub enabled: bool,
    /// `config` or `store`.
    pub source: &'static str,
}

#[derive(Default)]
pub struct Clients {
    by_id: HashMap<String, Arc<Client>>,
}

impl Clients {
    /// Clients from the config and the store; a config client wins over a
    /// store client of the same id (logged). Records whose hash is not 64 hex
    /// characters are skipped (logged): they could never authenticate.
    pub fn build(cfg: &OAuthConfig, stored: Vec<ClientRecord>) -> Clients {
        let mut by_id = HashMap::new();
        for c in &cfg.clients {
            let Some(hash) = parse_hash(&c.secret_sha256) else {
                continue; // validation reports it
            };
            by_id.insert(
                c.id.clone(),
                Arc::new(Client {
                    id: c.id.clone(),
                    secret_hash: hash,
                    scopes: c.scopes.clone(),
                    audiences: c.audiences.clone(),
                    ttl: c.token_ttl.unwrap_or(cfg.token_ttl),
                    claims: c.claims.clone(),
                    enabled: c.enabled,
                    source: "config",
                }),
            );
        }
        for r in stored {
            if by_id.contains_key(&r.id) {
                tracing::warn!(client = %r.id, "a client in gateway.yaml has the id of a stored client; the file's wins");
                continue;
            }
            let Some(hash) = parse_hash(&r.secret_sha256) else {
                tracing::warn!(client = %r.id, "stored client has an unusable secret hash; skipped");
                continue;
            };
            by_id.insert(
                r.id.clone(),
                Arc::new(Client {
                    secret_hash: hash,
                    ttl: r.token_ttl_secs.map_or(cfg.token_ttl, Duration::from_secs),
                    source: "store",
                    id: r.id,
                    scopes: r.scopes,
                    audiences: r.audiences,
                    claims: r.claims,
                    enabled: r.enabled,
                }),
            );
        }
        Clients { by_id }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Client>> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The client whose secret this is. An unknown id costs the same hash
    /// and comparison as a known one.
    pub fn authenticate(&self, id: &str, secret: &str) -> Option<&Arc<Client>> {
        let presented = sha256(secret.as_bytes());
        let client = self.by_id.get(id);
        let expected = client.map_or([0xa5; 32], |c| c.secret_hash);
        let matches: bool = presented.ct_eq(&expected).into();
        client.filter(|_| matches)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref());
    out
}

pub fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
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
        }
    }

    #[test]
    fn secrets_authenticate_and_config_wins() {
        let (secret, hash) = new_secret().unwrap();
        assert_eq!(secret.len(), 43);
        let (other, other_hash) = new_secret().unwrap();
        let file_client = crate::config::OAuthClientConfig {
            id: "foo".into(),
            secret_sha256: hash.clone(),
            scopes: vec!["a".into()],
            audiences: vec![],
            token_ttl: None,
            claims: Map::new(),
            enabled: true,
        };
        let stored = vec![
            ClientRecord {
                id: "foo".into(),
                secret_sha256: other_hash.clone(),
                scopes: vec![],
                audiences: vec![],
                token_ttl_secs: None,
                claims: Map::new(),
                enabled: true,
                created_at: 0,
            },
            ClientRecord {
                id: "bar".into(),
                secret_sha256: other_hash.to_uppercase(),
                scopes: vec![],
                audiences: vec![],
                token_ttl_secs: Some(60),
                claims: Map::new(),
                enabled: true,
                created_at: 0,
            },
        ];
        let clients = Clients::build(&cfg(vec![file_client]), stored);
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
