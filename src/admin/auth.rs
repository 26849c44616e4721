//! Who may use the admin API: a bearer token whose SHA-256 is configured,
//! or a JWT / client certificate the admin policy allows. Health, readiness
//! and metrics stay open; with none of these configured the API is open too,
//! which validation allows only on a loopback bind.

use std::sync::Arc;

use http::{HeaderMap, Method, StatusCode, header};
use subtle::ConstantTimeEq;

use crate::authz::{Action, Effect, Policy, Resource};
use crate::config::Config;
use crate::identity::{Authenticator, CertIdentity, Providers};

pub struct AdminAuth {
    token_sha256: Option<[u8; 32]>,
    /// A JWT of the admin providers, or a client certificate: the same
    /// rules as on routes (issuer, revocation, certificate binding).
    authn: Authenticator,
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
            authn: Authenticator {
                accept_jwt: true,
                accept_cert: true,
                require_both: false,
                providers: names
                    .iter()
                    .filter_map(|n| providers.get(n).cloned())
                    .collect(),
                users: None,
            },
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
        let bearer = bearer.filter(|_| !self.authn.providers.is_empty());
        let identity = match self
            .authn
            .authenticate(bearer.map(std::borrow::Cow::Borrowed), cert.cloned())
            .await
        {
            Ok(identity) => identity,
            Err(refusal) => {
                tracing::info!(?refusal, %method, path, "admin API request not authenticated");
                return Err(Denied::Unauthenticated);
            }
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
