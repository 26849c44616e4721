//! The JWT providers of a config, compiled: key material read from files and
//! the environment, remote key sets set up. A reload keeps a provider whose
//! settings and key material did not change (with its token cache and, for a
//! remote set, the keys already fetched).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::Revocations;
use super::jwt::keys::{self, Family, KeySet};
use super::jwt::{JwtProvider, KeySource, ProviderSettings, RemoteJwks, SelfKeys, TokenMetrics};
use crate::config::{Config, ConfigError, ProviderConfig, SecretSource};
use crate::metrics::Metrics;

pub struct Providers {
    by_name: HashMap<String, Built>,
    pub revocations: Arc<Revocations>,
}

struct Built {
    provider: Arc<JwtProvider>,
    config: ProviderConfig,
    /// SHA-256 over the key material read for it (never the material itself).
    material: [u8; 32],
}

const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// HMAC secrets shorter than this are refused (RFC 7518 3.2: at least the hash size).
const MIN_SECRET_BYTES: usize = 32;

impl Providers {
    /// The longest `leeway` of any provider: a token is accepted until its
    /// `exp` plus its provider's leeway, so a revocation must outlive that.
    pub fn max_leeway(&self) -> Duration {
        self.by_name
            .values()
            .map(|b| b.provider.settings.leeway)
            .max()
            .unwrap_or_default()
    }

    pub fn empty() -> Providers {
        Providers {
            by_name: HashMap::new(),
            revocations: Arc::new(Revocations::default()),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<JwtProvider>> {
        self.by_name.get(name).map(|b| &b.provider)
    }

    /// Every provider, in no particular order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<JwtProvider>> {
        self.by_name.values().map(|b| &b.provider)
    }

    /// Whether `other` holds exactly these providers (every one reused).
    pub fn same_as(&self, other: &Providers) -> bool {
        self.by_name.len() == other.by_name.len()
            && self.by_name.iter().all(|(name, b)| {
                other
                    .by_name
                    .get(name)
                    .is_some_and(|o| Arc::ptr_eq(&o.provider, &b.provider))
            })
    }

    /// Starts the background refresh of remote key sets (on the current runtime).
    pub fn start(&self) {
        for b in self.by_name.values() {
            if let Some(remote) = b.provider.remote() {
                remote.start();
            }
        }
    }

    /// `self_keys`: the token server's public keys, for `keys: self`
    /// providers (`None` when the config has no `oauth` section).
    pub fn build(
        cfg: &Config,
        previous: Option<&Providers>,
        metrics: &Metrics,
        self_keys: Option<&SelfKeys>,
    ) -> Result<Providers, Vec<ConfigError>> {
        let revocations = previous.map_or_else(
            || Arc::new(Revocations::default()),
            |p| p.revocations.clone(),
        );
        let mut errors = Vec::new();
        let mut by_name = HashMap::new();
        for (i, pc) in cfg.auth.providers.iter().enumerate() {
            let path = format!("auth.providers[{i}]");
            let mut err = |key: &str, message: String| {
                errors.push(ConfigError {
                    path: if key.is_empty() {
                        path.clone()
                    } else {
                        format!("{path}.{key}")
                    },
                    message,
                })
            };
            let Some((plan, material)) = key_source(cfg, pc, self_keys, &mut err) else {
                continue;
            };
            let reused = previous.and_then(|p| p.by_name.get(&pc.name)).filter(|b| {
                b.config == *pc
                    && b.material == material
                    && cfg.auth.token_cache_entries == b.provider.settings.cache_entries
            });
            if let Some(b) = reused {
                by_name.insert(
                    pc.name.clone(),
                    Built {
                        provider: b.provider.clone(),
                        config: pc.clone(),
                        material,
                    },
                );
                continue;
            }
            let Some(algorithms) = algorithms(pc, &plan, &mut err) else {
                continue;
            };
            let source = match plan {
                KeyPlan::Static(set) => KeySource::Static(set),
                KeyPlan::SelfIssued(keys) => KeySource::SelfIssued(keys),
                KeyPlan::Remote(uri, roots) => {
                    let roots = roots.unwrap_or_else(crate::transport::tls::system_roots);
                    let fetches = metrics.auth_jwks_fetches.clone();
                    match RemoteJwks::new(&pc.name, uri, pc.jwks.clone(), roots, fetches) {
                        Ok(r) => KeySource::Remote(Arc::new(r)),
                        Err(e) => {
                            err("jwks_uri", format!("cannot set up the HTTPS client: {e}"));
                            continue;
                        }
                    }
                }
            };
            let settings = ProviderSettings {
                issuer: pc.issuer.clone(),
                audiences: pc.audiences.clone(),
                algorithms,
                leeway: pc.leeway,
                required_claims: pc.required_claims.clone(),
                typ: pc.typ.clone(),
                roles_claim: pc.roles_claim.clone(),
                max_token_bytes: pc.max_token_bytes.as_usize(),
                token_from: pc.token_from.clone(),
                cache_entries: cfg.auth.token_cache_entries,
            };
            let counter = |outcome: &str| {
                metrics
                    .auth_tokens
                    .with_label_values(&[pc.name.as_str(), outcome])
            };
            let token_metrics = TokenMetrics {
                valid: counter("valid"),
                cached: counter("cached"),
                invalid: counter("invalid"),
                expired: counter("expired"),
                revoked: counter("revoked"),
            };
            let provider = JwtProvider::new(
                &pc.name,
                settings,
                source,
                revocations.clone(),
                token_metrics,
            );
            by_name.insert(
                pc.name.clone(),
                Built {
                    provider: Arc::new(provider),
                    config: pc.clone(),
                    material,
                },
            );
        }
        if errors.is_empty() {
            Ok(Providers {
                by_name,
                revocations,
            })
        } else {
            Err(errors)
        }
    }
}

/// Key material read, before anything is built from it: a reused provider
/// needs nothing more (in particular no HTTPS client for a remote set).
enum KeyPlan {
    Static(KeySet),
    /// The key set's URL and the CA roots from `jwks.ca_file` (`None`: the system's).
    Remote(http::Uri, Option<rustls::RootCertStore>),
    SelfIssued(SelfKeys),
}

fn key_source(
    cfg: &Config,
    pc: &ProviderConfig,
    self_keys: Option<&SelfKeys>,
    err: &mut dyn FnMut(&str, String),
) -> Option<(KeyPlan, [u8; 32])> {
    let given = [
        !pc.public_keys.is_empty(),
        pc.jwks_uri.is_some(),
        pc.secret.is_some(),
        pc.keys.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        err(
            "",
            "expected exactly one key source: public_keys, jwks_uri, secret or keys: self".into(),
        );
        return None;
    }
    let mut material = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let source = if pc.keys.is_some() {
        let Some(oauth) = &cfg.oauth else {
            err(
                "keys",
                "`keys: self` needs tollgate's own token server: add the `oauth` section".into(),
            );
            return None;
        };
        if oauth.issuer != pc.issuer {
            err(
                "issuer",
                format!(
                    "`{}` differs from oauth.issuer `{}`; tokens of the token server would never match",
                    pc.issuer, oauth.issuer
                ),
            );
            return None;
        }
        // check-config has no running token server: the keys are read at start.
        KeyPlan::SelfIssued(self_keys.cloned().unwrap_or_default())
    } else if let Some(uri) = &pc.jwks_uri {
        let parsed = uri
            .parse::<http::Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        let Some(parsed) = parsed else {
            err("jwks_uri", format!("`{uri}` is not an http(s) URL"));
            return None;
        };
        let roots = match &pc.jwks.ca_file {
            None => None,
            Some(ca) => {
                let path = cfg.resolve(ca);
                let roots = std::fs::read(&path)
                    .map_err(|e| format!("cannot read: {e}"))
                    .and_then(|pem| {
                        material.update(&pem);
                        crate::transport::tls::ca_roots(&pem)
                    });
                match roots {
                    Ok(roots) => Some(roots),
                    Err(e) => {
                        err("jwks.ca_file", format!("{}: {e}", path.display()));
                        return None;
                    }
                }
            }
        };
        KeyPlan::Remote(parsed, roots)
    } else if let Some(secret) = &pc.secret {
        let (key, bytes) = match secret {
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(v) => ("secret.env", v.into_bytes()),
                Err(_) => {
                    err(
                        "secret.env",
                        format!("environment variable `{var}` is not set"),
                    );
                    return None;
                }
            },
            SecretSource::File(path) => {
                let path = cfg.resolve(path);
                match std::fs::read(&path) {
                    Ok(mut b) => {
                        while b.last().is_some_and(|c| c.is_ascii_whitespace()) {
                            b.pop();
                        }
                        ("secret.file", b)
                    }
                    Err(e) => {
                        err(
                            "secret.file",
                            format!("cannot read {}: {e}", path.display()),
                        );
                        return None;
                    }
                }
            }
        };
        if bytes.len() < MIN_SECRET_BYTES {
            err(
                key,
                format!("the secret must be at least {MIN_SECRET_BYTES} bytes (256 bits)"),
            );
            return None;
        }
        material.update(&bytes);
        KeyPlan::Static(KeySet::new(vec![keys::from_secret(&bytes)]))
    } else {
        let mut all = Vec::new();
        for (j, file) in pc.public_keys.iter().enumerate() {
            let path = cfg.resolve(file);
            let loaded = std::fs::read(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|bytes| {
                    material.update(&bytes);
                    let trimmed = bytes.trim_ascii_start();
                    if trimmed.starts_with(b"{") {
                        keys::from_jwk_json(&bytes).map(|(k, _)| k)
                    } else {
                        keys::from_pem(&bytes)
                    }
                    .map_err(|e| format!("{}: {e}", path.display()))
                });
            match loaded {
                Ok(mut k) => all.append(&mut k),
                Err(e) => err(&format!("public_keys[{j}]"), e),
            }
        }
        if all.is_empty() {
            return None;
        }
        KeyPlan::Static(KeySet::new(all))
    };
    let mut digest = [0u8; 32];
    digest.copy_from_slice(material.finish().as_ref());
    Some((source, digest))
}

/// The accepted algorithms: as configured (checked against the key source),
/// or every algorithm the source's key families can verify.
fn algorithms(
    pc: &ProviderConfig,
    plan: &KeyPlan,
    err: &mut dyn FnMut(&str, String),
) -> Option<Vec<Algorithm>> {
    let hmac_source = matches!(plan, KeyPlan::Static(set) if set.families() == [Family::Hmac]);
    if pc.algorithms.is_empty() {
        let families = match plan {
            KeyPlan::Static(set) => set.families(),
            KeyPlan::Remote(..) => vec![Family::Rsa, Family::Ec, Family::Ed],
            // What the token server signs with.
            KeyPlan::SelfIssued(_) => {
                return Some(vec![Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256]);
            }
        };
        let pool = if hmac_source { HMAC } else { ASYMMETRIC };
        return Some(
            pool.iter()
                .copied()
                .filter(|a| families.contains(&keys::family(*a)))
                .collect(),
        );
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (j, name) in pc.algorithms.iter().enumerate() {
        let key = format!("algorithms[{j}]");
        match name.parse::<Algorithm>() {
            Ok(a) if HMAC.contains(&a) && !hmac_source => {
                err(
                    &key,
                    format!("`{name}` needs a shared `secret` as this provider's key source"),
                );
                ok = false;
            }
            Ok(a) if !HMAC.contains(&a) && hmac_source => {
                err(
                    &key,
                    format!("`{name}` needs public keys; this provider has a shared secret"),
                );
                ok = false;
            }
            Ok(a) => out.push(a),
            Err(_) => {
                err(
                    &key,
                    format!(
                        "`{name}` is not an accepted algorithm; expected one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512 (never `none`)"
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_outlive_the_longest_leeway() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), [7u8; 32]).unwrap();
        let path = dir.path().join("gateway.yaml");
        let provider = |name: &str, leeway: &str| {
            format!(
                "    - {{ name: {name}, issuer: https://{name}, audiences: [a], leeway: {leeway}, secret: {{ file: secret }} }}\n"
            )
        };
        let providers = provider("short", "30s") + &provider("long", "2m");
        std::fs::write(
            &path,
            format!("auth:\n  providers:\n{providers}routes: []\n"),
        )
        .unwrap();
        let cfg = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let built =
            Providers::build(&cfg, None, &Metrics::new(), None).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(built.max_leeway(), Duration::from_secs(120));
    }
}
