//! `tunnels:` in gateway.yaml: WebSocket relays (Micronets' ws-proxy) at
//! path prefixes of TLS listeners that ask for client certificates. Peers
//! connecting to `<prefix><id>` meet and exchange messages.

use std::time::Duration;

use serde::Deserialize;

use super::units::{ByteSize, duration};
use crate::authz::syntax::RuleConfig;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// Peers connect to `<prefix><id>`; ends with `/`.
    pub prefix: String,
    /// TLS listeners with client certificates that serve it (default:
    /// every one).
    pub listeners: Option<Vec<String>>,
    /// `none`: messages are relayed as they are. `micronets`: each must be
    /// a JSON envelope (`{"message": {"messageId", "messageType",
    /// "requiresResponse"}}`); a malformed one is answered with an error
    /// instead of relayed, CONN:HELLO peers are listed, and a REST:RESPONSE
    /// goes only to the peer whose REST:REQUEST it answers.
    pub envelope: EnvelopeMode,
    /// Peers one id holds at once; one more is refused (409), unless it
    /// presents the same certificate as a peer there, which it replaces.
    pub max_peers: usize,
    /// Largest message, in either direction.
    pub max_message: ByteSize,
    /// Bytes waiting to be written to one peer; a sender waits while the
    /// peer's queue is full (backpressure), and a peer whose queue stays
    /// full for `stall_timeout` is disconnected.
    pub queue: ByteSize,
    #[serde(deserialize_with = "duration")]
    pub stall_timeout: Duration,
    /// A peer that sends nothing (pongs included) for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A peer quiet for this long is pinged.
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// A peer's close (or its dropped connection) closes the other peers on
    /// its id, with its code and reason: the tunnel is a pipe.
    pub close_propagates: bool,
    /// Who may join which id (`actions: [join]`, `paths: ["{sub}"]`, ...),
    /// first match decides, no match denies. Without one, every peer whose
    /// certificate the listener verified may join any id.
    pub policy: Option<Vec<RuleConfig>>,
    /// Web pages that may open a tunnel (`https://app.example`, or `*`): a
    /// handshake carrying an `Origin` field (browsers send one, with the
    /// user's client certificate) is refused with 403 unless it is listed.
    pub allowed_origins: Vec<String>,
    /// HTTP requests carried to a tunnel (`upstream: {tunnel: <id>}`) that
    /// may wait for answers on one id at once.
    pub max_pending_requests: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeMode {
    #[default]
    None,
    Micronets,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            prefix: "/micronets/v1/ws-proxy/".into(),
            listeners: None,
            envelope: EnvelopeMode::None,
            max_peers: 2,
            max_message: ByteSize::mib(1),
            queue: ByteSize::mib(1),
            stall_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            ping_interval: Duration::from_secs(30),
            close_propagates: true,
            policy: None,
            max_pending_requests: 256,
            allowed_origins: Vec::new(),
        }
    }
}

impl super::Config {
    /// The listeners a tunnel serves on when it names none: the HTTPS
    /// listeners that verify client certificates.
    pub fn cert_listeners(&self) -> Vec<String> {
        self.listeners
            .iter()
            .filter(|l| l.protocol.is_http() && l.asks_for_certs())
            .map(|l| l.name.clone())
            .collect()
    }
}

impl super::ListenerConfig {
    /// Whether it is TLS and verifies the client certificates it gets.
    pub fn asks_for_certs(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_auth() != super::ClientAuth::None)
    }
}

/// A tunnel id: 1 to 128 of `A-Z a-z 0-9 . _ : -`, not `.` or `..`.
pub fn is_tunnel_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}
