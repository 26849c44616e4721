//! `wamp:` in gateway.yaml: the WAMP router. It serves `protocol: wamp`
//! listeners (RawSocket and WebSocket on one port) and, optionally, a
//! WebSocket path on HTTP listeners. Realms, roles and authentication are
//! laid out as Crossbar lays them out, so a Crossbar `config.json` maps
//! onto it key by key; permissions are written in the shared rule syntax.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::authz::syntax::{Conditions, RuleConfig};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WampConfig {
    /// WAMP over WebSocket (`wamp.2.json`, `wamp.2.msgpack`, `wamp.2.cbor`)
    /// at a path of HTTP listeners.
    pub websocket: Option<WampWebSocket>,
    /// The realms; a session joins one of them, and nothing crosses them.
    pub realms: Vec<RealmConfig>,
    /// How sessions authenticate, on every listener serving WAMP that
    /// `listeners` does not name.
    pub auth: WampAuth,
    /// Per listener (by name): its own authentication, as Crossbar's
    /// transports each have theirs.
    pub listeners: BTreeMap<String, WampListener>,
    /// Messages waiting for one session; past it, the session is closed (a
    /// slow client never makes the router buffer without bound).
    pub max_queued_messages: usize,
    /// Largest message accepted.
    pub max_message_size: super::units::ByteSize,
    /// Calls one session may have waiting for their results.
    pub max_pending_calls: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Registrations one session may hold.
    pub max_registrations: usize,
    /// Web pages that may open WAMP over WebSocket (`https://app.example`,
    /// or `*` for any): a handshake that carries an `Origin` field (browsers
    /// always send one) is refused with 403 unless it is listed. Clients
    /// that are not browsers send none and are not affected.
    pub allowed_origins: Vec<String>,
    /// Longest a dynamic authenticator or authorizer may take to answer.
    #[serde(deserialize_with = "super::units::duration")]
    pub auth_timeout: Duration,
}

impl Default for WampConfig {
    fn default() -> Self {
        WampConfig {
            websocket: None,
            realms: Vec::new(),
            auth: WampAuth::default(),
            listeners: BTreeMap::new(),
            max_queued_messages: 1000,
            max_message_size: super::units::ByteSize::mib(1),
            max_pending_calls: 1000,
            max_subscriptions: 1000,
            max_registrations: 1000,
            auth_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WampWebSocket {
    /// HTTP listeners that serve it (default: every one).
    pub listeners: Option<Vec<String>>,
    pub path: String,
}

impl Default for WampWebSocket {
    fn default() -> Self {
        WampWebSocket {
            listeners: None,
            path: "/ws".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealmConfig {
    pub name: String,
    /// What each role may do here; a session whose role is not listed may
    /// do nothing (the meta API included).
    #[serde(default)]
    pub roles: Vec<RoleConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub name: String,
    /// Static authorisation: rules in order, the first that matches decides.
    #[serde(default)]
    pub permissions: Vec<Permission>,
    /// Dynamic authorisation: a procedure in this realm called as
    /// `(session, uri, action, options)` for every action of the role.
    pub authorizer: Option<String>,
}

/// One rule of a role: `allow:` or `deny:` with the shared rule syntax's
/// conditions (`actions: [call, register, publish, subscribe]`, `uris:`),
/// and whether the caller or publisher is disclosed when it allows.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Permission {
    pub allow: Option<Conditions>,
    pub deny: Option<Conditions>,
    /// Callees see the caller, subscribers the publisher (session, authid,
    /// authrole) for what this rule allows.
    pub disclose: bool,
}

impl RoleConfig {
    /// The role's permissions in the shared policy engine; problems are
    /// `(key path, message)` below `at` (`wamp.realms[i].roles[j]`).
    pub fn policy(&self, at: &str) -> Result<crate::authz::Policy, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        for (k, p) in self.permissions.iter().enumerate() {
            match p.rule() {
                Some(rule) => rules.push(rule),
                None => problems.push((
                    format!("{at}.permissions[{k}]"),
                    "expected exactly one of `allow` and `deny`".to_owned(),
                )),
            }
        }
        match crate::authz::Policy::compile(&rules, crate::authz::Resource::Uri) {
            Ok(policy) if problems.is_empty() => Ok(policy),
            Ok(_) => Err(problems),
            Err(more) => {
                problems.extend(
                    more.into_iter()
                        .map(|(p, m)| (format!("{at}.permissions{p}"), m)),
                );
                Err(problems)
            }
        }
    }
}

impl Permission {
    /// The rule, when exactly one of `allow` and `deny` is given.
    pub fn rule(&self) -> Option<RuleConfig> {
        match (&self.allow, &self.deny) {
            (Some(c), None) => Some(RuleConfig::Allow(c.clone())),
            (None, Some(c)) => Some(RuleConfig::Deny(c.clone())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WampListener {
    pub auth: WampAuth,
}

/// Authentication methods a listener accepts (Crossbar's transport
/// `auth`). With none at all, nobody can join.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WampAuth {
    /// Joining without credentials, as `role`.
    pub anonymous: Option<MethodConfig>,
    /// A ticket: static — a password user's (`auth.users`, the store's) or,
    /// with `jwt: true`, a JWT validated by `auth.jwt`; dynamic — the
    /// authenticator is given it.
    pub ticket: Option<MethodConfig>,
    /// WAMP-CRA: static principals with a secret (salted or not), or an
    /// authenticator that returns `{secret, role, salt?, iterations?, keylen?}`.
    pub wampcra: Option<MethodConfig>,
    /// WAMP-cryptosign (Ed25519): static principals with their
    /// `authorized_keys`, or an authenticator that returns `{pubkey, role}`.
    pub cryptosign: Option<MethodConfig>,
    /// The verified TLS client certificate: static principals keyed by
    /// authid with the certificate's `certificate-sha1` or `cn`, or an
    /// authenticator given the certificate's details.
    pub tls: Option<MethodConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    #[default]
    Static,
    Dynamic,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    #[serde(rename = "type")]
    pub kind: AuthType,
    /// Dynamic: the procedure called as `(realm, authid, details)`.
    pub authenticator: Option<String>,
    /// Dynamic: the realm the authenticator is registered on.
    #[serde(alias = "authenticator-realm")]
    pub authenticator_realm: Option<String>,
    /// Static: by authid.
    pub principals: BTreeMap<String, Principal>,
    /// Anonymous: the role it joins as; ticket: the role of a user or
    /// token that names none.
    pub role: Option<String>,
    /// Ticket: a JWT is accepted as the ticket, its `sub` the authid.
    pub jwt: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Principal {
    /// The authid the session gets (default: the principal's key), so that
    /// several instances of one service, each with its own certificate or
    /// key, join under one authid.
    pub authid: Option<String>,
    pub role: String,
    /// The only realm it may join (default: any the HELLO names).
    pub realm: Option<String>,
    /// tls: the certificate's SHA-1 fingerprint (hex, colons optional).
    #[serde(alias = "certificate-sha1")]
    pub certificate_sha1: Option<String>,
    /// tls: the certificate's subject CN.
    pub cn: Option<String>,
    /// cryptosign: Ed25519 public keys, 32 bytes in hex.
    #[serde(alias = "authorized-keys")]
    pub authorized_keys: Vec<String>,
    /// wampcra: the shared secret; with `salt`, the key the client derives
    /// from its password (autobahn's `derive_key`, as in Crossbar), so the
    /// password itself is not written here.
    pub secret: Option<String>,
    /// wampcra: the salt, iterations and key length the client derives its
    /// key with.
    pub salt: Option<String>,
    pub iterations: Option<u32>,
    pub keylen: Option<usize>,
}
