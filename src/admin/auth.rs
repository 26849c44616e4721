//! Who may use the admin API: a bearer token whose SHA-256 is configured,
//! or a JWT / client certificate the admin policy allows. Health, readiness
//! and metrics stay open; with none of these configured the API is open too,
//! which validation allows only on a loopback bind.

use std::sync::Arc;

use http::{HeaderMap, Method, StatusCode, header};
use subtle::ConstantTimeEq;

use crate::authz::{Action, Effect, Policy, Resource};
use crate::config::Config;
use crate::identity::jwt::JwtProvider;
use crate::identity::{CertIdentity, Identity, Providers};

pub struct AdminAuth {
    token_sha256: Option<[u8; 32]>,
    providers: Vec<Arc<JwtProvider>>,
    policy: Option<Policy>,
}

pub enum Denied {
    Unauthenticated,
    Forbidden,
}

impl Denied {
    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Unauthenticated => StatusCode::UNAUTHORIZED,
            Denied::Forbidden => StatusCode::FORBIDDEN,
        }
    }
}

impl AdminAuth {
    /// From a validated config (the policy compiles, providers exist).
    pub fn build(cfg: &Config, providers: &Providers) -> AdminAuth {
        let admin = &cfg.admin;
        let names: Vec<String> = match &admin.providers {
            Some(n) => n.clone(),
            None => providers.all().map(|p| p.name.to_string()).collect(),
        };
        AdminAuth {
            token_sha256: admin
                .token_sha256
                .as_deref()
                .and_then(crate::identity::parse_hash),
            providers: names
                .iter()
                .filter_map(|n| providers.get(n).cloned())
                .collect(),
            policy: admin
                .policy
                .as_deref()
                .and_then(|rules| Policy::compile(rules, Resource::HttpPath).ok()),
        }
    }

    fn open(&self) -> bool {
        self.token_sha256.is_none() && self.policy.is_none()
    }

    pub async fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        cert: Option<&Arc<CertIdentity>>,
    ) -> Result<(), Denied> {
        if self.open() {
            return Ok(());
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if let (Some(expected), Some(token)) = (&self.token_sha256, bearer) {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
            if bool::from(digest.as_ref().ct_eq(expected)) {
                return Ok(());
            }
        }
        let Some(policy) = &self.policy else {
            return Err(Denied::Unauthenticated);
        };
        let identity = match bearer {
            Some(token) => {
                let mut found = None;
                for p in &self.providers {
                    if let Ok(id) = p.authenticate(token).await {
                        found = Some(id);
                        break;
                    }
                }
                found
            }
            None => cert.map(|c| Arc::new(Identity::from_cert(c.clone()))),
        };
        let Some(identity) = identity else {
            return Err(Denied::Unauthenticated);
        };
        let decision = policy.evaluate(&identity, &Action::http(method.as_str(), path));
        if decision.effect == Effect::Allow {
            Ok(())
        } else {
            tracing::info!(subject = %identity.subject, %method, path, "admin API request denied by admin.policy");
            Err(Denied::Forbidden)
        }
    }
}
