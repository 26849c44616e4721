//! What `tollgate clients ...` and `tollgate keys ...` do to the store. The
//! running gateway sees the store change and picks it up.

use std::sync::Arc;

use std::time::Duration;

use serde_json::{Map, Value};

use super::keys::{self, StoredKey};
use super::{ClientRecord, new_secret};
use crate::config::{Config, TlsClientAuth};
use crate::identity::jwt::RESERVED_CLAIMS;
use crate::identity::jwt::unix_now;
use crate::store::Store;

pub struct NewClient<'a> {
    pub id: &'a str,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub ttl: Option<Duration>,
    /// `name=value`; a value that parses as JSON is taken as JSON.
    pub claims: &'a [String],
    pub enabled: bool,
    /// May introspect other clients' tokens.
    pub introspect: bool,
    /// PEM or JWK text (private_key_jwt).
    pub public_key: Option<String>,
    /// Or the URL of its JWK Set.
    pub jwks_uri: Option<String>,
    pub tls_client_auth: Option<TlsClientAuth>,
}

fn open(cfg: &Config) -> Result<Arc<dyn Store>, String> {
    crate::store::open(cfg).map_err(|e| e.to_string())
}

fn find(store: &dyn Store, id: &str) -> Result<ClientRecord, String> {
    let clients: Vec<ClientRecord> = store.clients().map_err(|e| e.to_string())?;
    clients
        .into_iter()
        .find(|c| c.id == id)
        .ok_or_else(|| format!("no client `{id}` in the store"))
}

/// Adds a client with exactly one authentication method: a key
/// (private_key_jwt), a certificate identity (tls_client_auth), or else a new
/// secret, returned to be shown once (the store keeps only its hash).
pub fn add_client(cfg: &Config, new: &NewClient) -> Result<Option<String>, String> {
    let key = new.public_key.is_some() || new.jwks_uri.is_some();
    if key && new.tls_client_auth.is_some() {
        return Err(
            "a client authenticates one way: a key (--public-key / --jwks-uri) or a certificate (--tls-*), not both"
                .into(),
        );
    }
    let with_secret = !key && new.tls_client_auth.is_none();
    if let Some(uri) = &new.jwks_uri {
        crate::identity::jwt::jwks_url(uri).map_err(|e| format!("--jwks-uri: {e}"))?;
    }
    if let Some(k) = &new.public_key {
        super::clients::public_keys(k.as_bytes()).map_err(|e| format!("--public-key: {e}"))?;
    }
    if new.id.is_empty() || new.id.len() > 128 || new.id.chars().any(|c| c.is_control() || c == ':')
    {
        return Err(
            "the client id must be 1 to 128 characters, without `:` or control characters".into(),
        );
    }
    let mut claims = Map::new();
    for c in new.claims {
        let (k, v) = c
            .split_once('=')
            .ok_or_else(|| format!("--claim `{c}`: expected name=value"))?;
        if RESERVED_CLAIMS.contains(&k) {
            return Err(format!("--claim `{k}` is set by the token server itself"));
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        claims.insert(k.to_owned(), value);
    }
    if cfg
        .oauth
        .as_ref()
        .is_some_and(|o| o.clients.iter().any(|c| c.id == new.id))
    {
        return Err(format!(
            "`{}` is a client in gateway.yaml; pick another id",
            new.id
        ));
    }
    let store = open(cfg)?;
    if find(&*store, new.id).is_ok() {
        return Err(format!(
            "client `{}` exists; use rotate-secret for a new secret",
            new.id
        ));
    }
    let (secret, hash) = match with_secret {
        true => {
            let (s, h) = new_secret()?;
            (Some(s), Some(h))
        }
        false => (None, None),
    };
    let record = ClientRecord {
        id: new.id.to_owned(),
        secret_sha256: hash,
        public_key: new.public_key.clone(),
        jwks_uri: new.jwks_uri.clone(),
        tls_client_auth: new.tls_client_auth.clone(),
        scopes: new.scopes.clone(),
        audiences: new.audiences.clone(),
        token_ttl_secs: new.ttl.map(|d| d.as_secs()),
        claims,
        enabled: new.enabled,
        introspect: new.introspect,
        created_at: unix_now(),
    };
    store
        .put_client(&record.id, &record)
        .map_err(|e| e.to_string())?;
    Ok(secret)
}

pub fn list_clients(cfg: &Config) -> Result<String, String> {
    let store = open(cfg)?;
    let mut clients: Vec<ClientRecord> = store.clients().map_err(|e| e.to_string())?;
    clients.sort_by(|a, b| a.id.cmp(&b.id));
    let row =
        |id: &str, enabled: &dyn std::fmt::Display, scopes: &str, audiences: &str, from: &str| {
            format!("{id:<24} {enabled:<8} {scopes:<30} {audiences}{from}\n")
        };
    let mut out = row("ID", &"ENABLED", "SCOPES", "AUDIENCES", "");
    for c in clients {
        out += &row(
            &c.id,
            &c.enabled,
            &c.scopes.join(","),
            &c.audiences.join(","),
            "",
        );
    }
    for c in cfg.oauth.iter().flat_map(|o| &o.clients) {
        out += &row(
            &c.id,
            &c.enabled,
            &c.scopes.join(","),
            &c.audiences.join(","),
            " (gateway.yaml)",
        );
    }
    Ok(out)
}

/// One client as JSON, without its secret hash.
pub fn show_client(cfg: &Config, id: &str) -> Result<String, String> {
    let store = open(cfg)?;
    let c = find(&*store, id)?;
    let mut v = serde_json::to_value(&c).map_err(|e| e.to_string())?;
    if let Some(o) = v.as_object_mut() {
        o.remove("secret_sha256");
    }
    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())
}

pub fn remove_client(cfg: &Config, id: &str) -> Result<(), String> {
    let store = open(cfg)?;
    if store.remove_client(id).map_err(|e| e.to_string())? {
        Ok(())
    } else {
        Err(format!("no client `{id}` in the store"))
    }
}

/// A new secret for a client; the old one stops working at once.
pub fn rotate_secret(cfg: &Config, id: &str) -> Result<String, String> {
    let store = open(cfg)?;
    let mut c = find(&*store, id)?;
    if c.secret_sha256.is_none() {
        return Err(format!(
            "client `{id}` authenticates with a key or a certificate, not a secret"
        ));
    }
    let (secret, hash) = new_secret()?;
    c.secret_sha256 = Some(hash);
    store.put_client(id, &c).map_err(|e| e.to_string())?;
    Ok(secret)
}

pub fn set_enabled(cfg: &Config, id: &str, enabled: bool) -> Result<(), String> {
    let store = open(cfg)?;
    let mut c = find(&*store, id)?;
    c.enabled = enabled;
    store.put_client(id, &c).map_err(|e| e.to_string())
}

/// A new signing key; the previous one stays published until tokens it
/// signed have expired. Returns the new key's id.
pub fn rotate_keys(cfg: &Config) -> Result<String, String> {
    let oauth = cfg
        .oauth
        .as_ref()
        .ok_or("the config has no `oauth` section")?;
    if !oauth.signing_keys.is_empty() {
        return Err(
            "oauth.signing_keys are managed outside tollgate; replace the files instead".into(),
        );
    }
    let store = open(cfg)?;
    let stored: Vec<ClientRecord> = store.clients().map_err(|e| e.to_string())?;
    let overlap = super::runtime::key_overlap(cfg, &stored);
    keys::rotate(&*store, oauth.signing_algorithm, overlap, unix_now())
}

pub fn list_keys(cfg: &Config) -> Result<String, String> {
    let store = open(cfg)?;
    let mut keys: Vec<StoredKey> = store.signing_keys().map_err(|e| e.to_string())?;
    keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    let mut out = format!("{:<45} {:<6} {:<12} {}\n", "KID", "ALG", "CREATED", "STATE");
    for k in keys {
        let state = match k.retire_at {
            None => "signing".to_string(),
            Some(t) => format!("published until {t}"),
        };
        out.push_str(&format!(
            "{:<45} {:<6} {:<12} {}\n",
            k.kid,
            format!("{:?}", k.alg),
            k.created_at,
            state
        ));
    }
    Ok(out)
}
