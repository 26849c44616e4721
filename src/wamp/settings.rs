//! The router's share of the config, compiled: each realm's roles with
//! their rules in the shared policy engine (or their dynamic authorizer),
//! and each listener's authentication methods.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::authz::Policy;
use crate::config::{Config, ConfigError, MethodConfig, WampAuth};
use crate::identity::{Authenticator, Providers, Users};

pub struct Settings {
    pub realms: HashMap<String, RealmRules>,
    /// By listener name; others use `default_auth`.
    pub listener_auth: HashMap<String, Arc<WampAuth>>,
    pub default_auth: Arc<WampAuth>,
    /// Password users and JWT providers, for tickets.
    pub authn: Authenticator,
    pub max_queued: usize,
    pub max_message: usize,
    pub max_pending_calls: usize,
    pub max_subscriptions: usize,
    pub max_registrations: usize,
    pub auth_timeout: Duration,
    pub allowed_origins: Vec<String>,
}

#[derive(Default)]
pub struct RealmRules {
    pub roles: HashMap<String, Role>,
}

pub enum Role {
    /// Rules in the shared policy engine; `disclose[i]`: rule `i` discloses
    /// the caller or publisher.
    Static { policy: Policy, disclose: Vec<bool> },
    /// A procedure of the realm decides each action.
    Dynamic { authorizer: String },
}

impl Settings {
    pub fn auth_for(&self, listener: &str) -> &Arc<WampAuth> {
        self.listener_auth
            .get(listener)
            .unwrap_or(&self.default_auth)
    }
}

/// The router's settings for `cfg`, with the users and JWT providers the
/// gateway knows.
pub fn settings(
    cfg: &Config,
    providers: &Providers,
    users: &Arc<Users>,
) -> Result<Settings, Vec<ConfigError>> {
    let w = &cfg.wamp;
    let mut errors = Vec::new();
    let mut realms = HashMap::new();
    for (i, realm) in w.realms.iter().enumerate() {
        let mut rules = RealmRules::default();
        for (j, role) in realm.roles.iter().enumerate() {
            let at = format!("wamp.realms[{i}].roles[{j}]");
            let compiled = match &role.authorizer {
                Some(authorizer) => Role::Dynamic {
                    authorizer: authorizer.clone(),
                },
                None => match role.policy(&at) {
                    Ok(policy) => Role::Static {
                        policy,
                        disclose: role.permissions.iter().map(|p| p.disclose).collect(),
                    },
                    Err(problems) => {
                        errors.extend(
                            problems
                                .into_iter()
                                .map(|(path, message)| ConfigError { path, message }),
                        );
                        continue;
                    }
                },
            };
            rules.roles.insert(role.name.clone(), compiled);
        }
        realms.insert(realm.name.clone(), rules);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let any = |f: &dyn Fn(&MethodConfig) -> bool| {
        std::iter::once(&w.auth)
            .chain(w.listeners.values().map(|l| &l.auth))
            .any(|a| a.ticket.as_ref().is_some_and(f))
    };
    Ok(Settings {
        realms,
        listener_auth: w
            .listeners
            .iter()
            .map(|(name, l)| (name.clone(), Arc::new(l.auth.clone())))
            .collect(),
        default_auth: Arc::new(w.auth.clone()),
        authn: Authenticator {
            accept_jwt: any(&|m| m.jwt),
            accept_cert: false,
            require_both: false,
            providers: providers.all().cloned().collect(),
            users: Some(users.clone()),
        },
        max_queued: w.max_queued_messages,
        max_message: w.max_message_size.as_usize(),
        max_pending_calls: w.max_pending_calls,
        max_subscriptions: w.max_subscriptions,
        max_registrations: w.max_registrations,
        auth_timeout: w.auth_timeout,
        allowed_origins: w.allowed_origins.clone(),
    })
}

/// Upper-case hex without separators: how certificate fingerprints are
/// compared, however they were written.
pub fn fingerprint_key(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}
