//! `wamp:` in gateway.yaml: the WAMP router, served as WAMP over WebSocket
//! on HTTP listeners.

use serde::Deserialize;

use crate::authz::syntax::RuleConfig;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WampConfig {
    /// WAMP over WebSocket (`wamp.2.json`, `wamp.2.msgpack`, `wamp.2.cbor`).
    pub websocket: Option<WampWebSocket>,
    /// The realms; a session joins one of them, and nothing crosses them.
    pub realms: Vec<String>,
    pub auth: WampAuth,
    /// Who may call, register, publish and subscribe what (`actions: [call,
    /// register, publish, subscribe]`, `uris:`); none: nothing is allowed.
    pub policy: Vec<RuleConfig>,
    /// Messages waiting for one session; past it, the session is closed (a
    /// slow client never makes the router buffer without bound).
    pub max_queued_messages: usize,
    /// Largest message accepted.
    pub max_message_size: super::units::ByteSize,
}

impl Default for WampConfig {
    fn default() -> Self {
        WampConfig {
            websocket: None,
            realms: Vec::new(),
            auth: WampAuth::default(),
            policy: Vec::new(),
            max_queued_messages: 1000,
            max_message_size: super::units::ByteSize::mib(1),
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
#[serde(deny_unknown_fields, default)]
pub struct WampAuth {
    /// Sessions without credentials join as role `anonymous`.
    pub anonymous: bool,
    /// `ticket`: the authid and ticket are a user name and password
    /// (`auth.users`, the store's users).
    pub ticket: bool,
}

impl Default for WampAuth {
    fn default() -> Self {
        WampAuth {
            anonymous: false,
            ticket: true,
        }
    }
}
