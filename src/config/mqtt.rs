//! `mqtt:` in gateway.yaml: the broker that serves listeners with
//! `protocol: mqtt` (plain or with `tls:`) and MQTT over WebSocket on HTTP
//! listeners.

use std::time::Duration;

use serde::Deserialize;

use super::units::{self, ByteSize};
use crate::authz::syntax::RuleConfig;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// MQTT over WebSocket (subprotocol `mqtt`) on HTTP listeners.
    pub websocket: Option<MqttWebSocket>,
    pub auth: MqttAuth,
    /// Who may publish and subscribe where (`actions: [publish, subscribe]`,
    /// `topics:` with `+`/`#`, `%u` the user name, `%c` the client id).
    /// Default: each user under its own name, `%u/#` (tstack's rule).
    pub policy: Option<Vec<RuleConfig>>,
    pub limits: MqttLimits,
    /// Where retained messages and persistent sessions are kept.
    pub persistence: MqttPersistence,
    /// Device self-registration (`POST /register.json`, tstack's treg).
    pub registration: Option<MqttRegistration>,
    /// How often `$SYS/broker/...` statistics are published; 0 turns them off.
    #[serde(deserialize_with = "units::duration")]
    pub sys_interval: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            websocket: None,
            auth: MqttAuth::default(),
            policy: None,
            limits: MqttLimits::default(),
            persistence: MqttPersistence::default(),
            registration: None,
            sys_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttRegistration {
    #[serde(default = "default_register_path")]
    pub path: String,
    /// HTTP listeners that serve it (default: every one).
    #[serde(default)]
    pub listeners: Option<Vec<String>>,
    /// SHA-256 (hex) of the registration key devices present.
    pub key_sha256: String,
    /// Where devices connect, returned to them (e.g. `mqtts://broker:8883`).
    pub broker: String,
    /// A `tollgate pki init-ca` directory: each device also gets a client
    /// certificate (CN its name, O its device type) and the CA.
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    #[serde(default = "default_cert_days")]
    pub cert_days: u32,
    /// Roles the new users get.
    #[serde(default = "default_device_roles")]
    pub roles: Vec<String>,
    /// Attempts per client address and minute.
    #[serde(default = "default_register_rate")]
    pub max_per_minute: u32,
}

fn default_register_path() -> String {
    "/register.json".into()
}
fn default_cert_days() -> u32 {
    365
}
fn default_device_roles() -> Vec<String> {
    vec!["device".into()]
}
fn default_register_rate() -> u32 {
    30
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttPersistence {
    /// Off: everything is in memory and gone with the process.
    pub enabled: bool,
    /// A redb file the broker holds open (not the shared store).
    pub path: std::path::PathBuf,
}

impl Default for MqttPersistence {
    fn default() -> Self {
        MqttPersistence {
            enabled: true,
            path: "data/mqtt.redb".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttWebSocket {
    /// HTTP listeners that serve it (default: every one).
    pub listeners: Option<Vec<String>>,
    pub path: String,
    /// Web pages that may connect (`https://app.example`, or `*`): a
    /// handshake carrying an `Origin` field (browsers send one, with the
    /// user's cookies and client certificate) is refused with 403 unless
    /// it is listed. Clients that are not browsers send none.
    pub allowed_origins: Vec<String>,
}

impl Default for MqttWebSocket {
    fn default() -> Self {
        MqttWebSocket {
            listeners: None,
            path: "/mqtt".into(),
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttAuth {
    /// User name and password against `auth.users` and the store's users.
    pub password: bool,
    /// A JWT in the CONNECT (as the password, or the user name).
    pub jwt: Option<MqttJwt>,
    /// On a listener that verified a client certificate, it identifies the
    /// client; the user name is its CN.
    pub certificate: bool,
    /// Clients with no credentials at all connect as `anonymous`.
    pub anonymous: bool,
    /// A session authenticated by a JWT is disconnected when the token expires.
    pub disconnect_on_expiry: bool,
}

impl Default for MqttAuth {
    fn default() -> Self {
        MqttAuth {
            password: true,
            jwt: None,
            certificate: true,
            anonymous: false,
            disconnect_on_expiry: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttJwt {
    /// Providers under `auth.providers` whose tokens are accepted (default: all).
    pub providers: Option<Vec<String>>,
    /// Where the token is: `password` (the user name must then match
    /// `username_claim`, or be empty) or `username`.
    pub token_in: TokenField,
    /// The claim the MQTT user name (`%u`) is taken from.
    pub username_claim: String,
    /// A claim holding the client's own rules, EMQX's shape: a list of
    /// `{permission: allow|deny, action: publish|subscribe|all, topic, qos,
    /// retain}`, checked before `mqtt.policy` (off unless named).
    pub acl_claim: Option<String>,
}

impl Default for MqttJwt {
    fn default() -> Self {
        MqttJwt {
            providers: None,
            token_in: TokenField::Password,
            username_claim: "sub".into(),
            acl_claim: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenField {
    Password,
    Username,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttLimits {
    /// Largest packet accepted, and announced to v5 clients.
    pub max_packet_size: ByteSize,
    /// QoS 1 and 2 messages in flight per client, each way (v5 Receive Maximum).
    pub max_inflight: u16,
    /// Messages waiting for a client (connected or not); past it QoS 0
    /// messages are dropped first, then new messages, counted.
    pub max_queued_messages: usize,
    /// Longest keep alive a client may ask; a longer one (or none) is
    /// replaced with this (v5 Server Keep Alive). 0: any.
    #[serde(deserialize_with = "units::duration")]
    pub max_keep_alive: Duration,
    /// Longest a disconnected persistent session is kept.
    #[serde(deserialize_with = "units::duration")]
    pub max_session_expiry: Duration,
    /// Topic aliases a v5 client may use towards the broker.
    pub max_topic_aliases: u16,
    /// Retained messages kept in all; past it, new topics are not retained.
    pub max_retained: usize,
    /// Time a new connection has to send its CONNECT.
    #[serde(deserialize_with = "units::duration")]
    pub connect_timeout: Duration,
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            max_packet_size: ByteSize::mib(1),
            max_inflight: 64,
            max_queued_messages: 1000,
            max_keep_alive: Duration::ZERO,
            max_session_expiry: Duration::from_secs(24 * 3600),
            max_topic_aliases: 64,
            max_retained: 100_000,
            connect_timeout: Duration::from_secs(10),
        }
    }
}
