//! The rule language's syntax tree: what gateway.yaml (routes, the admin
//! API, later MQTT and WAMP) writes as `policy:`. It belongs to the policy
//! engine; the config embeds it.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::OneOrMany;

/// One policy rule: `{allow: {...}}` or `{deny: {...}}`; every condition given
/// must hold for the rule to match.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleConfig {
    Allow(Conditions),
    Deny(Conditions),
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conditions {
    /// A list means all of them; or `{all_of: [...], any_of: [...]}`.
    pub scopes: Option<SetMatch>,
    pub roles: Option<SetMatch>,
    /// Claim (or dotted path) -> a value, a list of accepted values, or
    /// `{equals, contains, matches, any_of}`.
    pub claims: BTreeMap<String, ClaimMatch>,
    pub cert: Option<CertMatch>,
    /// How the caller authenticated: jwt, mtls, password, ticket, anonymous.
    pub via: Option<Vec<String>>,
    /// HTTP methods (MQTT/WAMP: publish, subscribe, call, register).
    #[serde(alias = "actions")]
    pub methods: Option<Vec<String>>,
    /// Resource patterns: `*` one segment, `**` the rest, `{sub}`/`%u`,
    /// `{client_id}`/`%c` and `{claim.NAME}` the caller's own values.
    #[serde(alias = "resources", alias = "topics", alias = "uris")]
    pub paths: Option<Vec<String>>,
    /// The caller's subject (a user name, a token's `sub`) is one of these.
    pub users: Option<Vec<String>>,
    /// MQTT: the publish's QoS, or the subscription's, is at most this.
    pub max_qos: Option<u8>,
    /// MQTT: a publish's retain flag is this (other actions: any).
    pub retain: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SetMatch {
    AllOf(Vec<String>),
    Ops {
        #[serde(default)]
        all_of: Vec<String>,
        #[serde(default)]
        any_of: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ClaimMatch {
    Value(ScalarValue),
    AnyOf(Vec<ScalarValue>),
    Ops(ClaimOps),
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimOps {
    pub equals: Option<ScalarValue>,
    /// The claim is an array holding this value, or a string containing it.
    pub contains: Option<String>,
    /// A regular expression the whole (string) claim must match.
    pub matches: Option<String>,
    pub any_of: Option<Vec<ScalarValue>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ScalarValue {
    Bool(bool),
    Int(i64),
    Str(String),
}

/// Certificate fields; each takes one value or a list of accepted values.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertMatch {
    pub cn: Option<OneOrMany>,
    pub o: Option<OneOrMany>,
    pub ou: Option<OneOrMany>,
    pub san_dns: Option<OneOrMany>,
    pub san_uri: Option<OneOrMany>,
    pub san_uri_prefix: Option<OneOrMany>,
    pub fingerprint_sha256: Option<OneOrMany>,
}
