//! The MQTT broker (3.1.1 and 5): a front-end like HTTP, on listeners with
//! `protocol: mqtt` (plain or TLS) and as MQTT over WebSocket on HTTP
//! listeners. Clients authenticate through the shared `Authenticator`
//! (password users, JWTs, client certificates) and every publish,
//! subscription and will is checked by the shared policy engine.

pub mod acl_file;
mod broker;
mod cluster;
mod codec;
mod connection;
mod persist;
pub mod register;
mod router;
mod session;
pub mod topic;
mod ws;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

pub use broker::{Broker, Settings};
pub use cluster::join_bus;
use connection::ConnInfo;
pub use register::Registration;

use crate::authz::syntax::RuleConfig;
use crate::authz::{Policy, Resource};
use crate::config::{Config, ConfigError};
use crate::identity::{Authenticator, Providers, Users};
use crate::metrics::Metrics;
use crate::transport::{self, ConnState, FrontEnd, Shutdown, Stream};

/// Each user under its own name (tstack's rule).
const DEFAULT_POLICY: &str =
    r#"[{"allow": {"actions": ["publish", "subscribe"], "topics": ["%u/#"]}}]"#;

/// The broker's settings for `cfg`, with the JWT providers and users the
/// rest of the gateway uses.
pub fn settings(
    cfg: &Config,
    providers: &Providers,
    users: &Arc<Users>,
) -> Result<Settings, Vec<ConfigError>> {
    let m = &cfg.mqtt;
    let default_rules: Vec<RuleConfig>;
    let rules = match &m.policy {
        Some(rules) => rules.as_slice(),
        None => {
            default_rules = serde_json::from_str(DEFAULT_POLICY).unwrap_or_default();
            default_rules.as_slice()
        }
    };
    let policy = Policy::compile(rules, Resource::Topic).map_err(|problems| {
        problems
            .into_iter()
            .map(|(at, message)| ConfigError {
                path: format!("mqtt.policy{at}"),
                message,
            })
            .collect::<Vec<_>>()
    })?;
    let jwt = m.auth.jwt.as_ref();
    let provider_list = match jwt.and_then(|j| j.providers.as_ref()) {
        Some(names) => names
            .iter()
            .filter_map(|n| providers.get(n).cloned())
            .collect(),
        None if jwt.is_some() => providers.all().cloned().collect(),
        None => Vec::new(),
    };
    Ok(Settings {
        limits: m.limits.clone(),
        auth: m.auth.clone(),
        policy,
        authn: Authenticator {
            accept_jwt: jwt.is_some(),
            accept_cert: m.auth.certificate,
            require_both: false,
            providers: provider_list,
            users: m.auth.password.then(|| users.clone()),
        },
        token_in: jwt.map(|j| j.token_in),
        sys_interval: m.sys_interval,
        acl_claim: jwt.and_then(|j| j.acl_claim.clone()),
        username_claim: jwt.map_or_else(|| "sub".to_owned(), |j| j.username_claim.clone()),
    })
}

/// Whether the config serves MQTT anywhere.
pub fn enabled(cfg: &Config) -> bool {
    cfg.mqtt.websocket.is_some()
        || cfg.mqtt.registration.is_some()
        || cfg
            .listeners
            .iter()
            .any(|l| l.protocol == crate::config::Protocol::Mqtt)
}

impl Broker {
    /// The broker for `settings`, registering its metrics, with what its
    /// journal kept (`mqtt.persistence`).
    pub fn start(
        cfg: &Config,
        settings: Settings,
        metrics: &Metrics,
    ) -> Result<Arc<Broker>, Vec<ConfigError>> {
        let p = &cfg.mqtt.persistence;
        if !p.enabled {
            return Ok(Broker::new(settings, metrics, None));
        }
        // Cluster mode: retained messages are the cluster's, in its store.
        let shared = cfg.store.etcd.is_some().then(|| Arc::new(cfg.clone()));
        let shares = shared.is_some();
        let (journal, (retained, sessions)) = persist::Journal::open(&cfg.resolve(&p.path), shared)
            .map_err(|message| {
                vec![ConfigError {
                    path: "mqtt.persistence.path".into(),
                    message,
                }]
            })?;
        let broker = Broker::new(settings, metrics, Some(journal));
        broker.recover(retained, sessions);
        if shares {
            follow_shared_retained(Arc::new(cfg.clone()), Arc::downgrade(&broker));
        }
        Ok(broker)
    }

    /// Swaps in the settings of a reloaded config. Connected clients keep
    /// their identity; rules apply to what they do next, and subscriptions
    /// the new rules no longer allow are dropped.
    pub fn apply(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
        self.recheck_subscriptions();
    }

    /// Every connected or kept session's subscriptions against the rules
    /// as they are now, through the same checks a SUBSCRIBE gets (the
    /// client's own rules included).
    fn recheck_subscriptions(&self) {
        let settings = self.settings.load();
        let sessions: Vec<Arc<session::Session>> = self.sessions().values().cloned().collect();
        for s in sessions {
            let Some(identity) = s.identity() else {
                continue;
            };
            let own = connection::claim_rules(&settings, &identity)
                .ok()
                .flatten()
                .map(Arc::new);
            connection::drop_refused_subscriptions(self, &settings, own.as_ref(), &identity, &s);
        }
        self.metrics
            .subscriptions
            .set(self.router_read().len() as i64);
    }

    /// Publishes `$SYS/broker/...` statistics every `sys_interval`, retained
    /// (as mosquitto does), until `stop`.
    pub fn publish_sys(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let broker = self.clone();
        tokio::spawn(async move {
            loop {
                let interval = broker.settings.load().sys_interval;
                if interval.is_zero() {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(10)) => continue,
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let t = &broker.totals;
                let stats = [
                    ("version", format!("tollgate {}", env!("CARGO_PKG_VERSION"))),
                    (
                        "uptime",
                        format!("{} seconds", broker.started.elapsed().as_secs()),
                    ),
                    (
                        "clients/connected",
                        t.connected.load(Ordering::Relaxed).to_string(),
                    ),
                    ("clients/total", broker.sessions().len().to_string()),
                    (
                        "messages/received",
                        t.received.load(Ordering::Relaxed).to_string(),
                    ),
                    ("messages/sent", t.sent.load(Ordering::Relaxed).to_string()),
                    (
                        "bytes/received",
                        t.bytes_received.load(Ordering::Relaxed).to_string(),
                    ),
                    (
                        "bytes/sent",
                        t.bytes_sent.load(Ordering::Relaxed).to_string(),
                    ),
                    (
                        "retained messages/count",
                        broker.retained_read().len().to_string(),
                    ),
                    (
                        "subscriptions/count",
                        broker.router_read().len().to_string(),
                    ),
                ];
                for (name, value) in stats {
                    let _ = broker.publish(session::Message {
                        topic: Arc::from(format!("$SYS/broker/{name}")),
                        payload: Bytes::from(value),
                        qos: codec::QoS::AtMostOnce,
                        retain: true,
                        properties: None,
                        expires_at: None,
                        origin: 0,
                    });
                }
            }
        });
    }
}

/// Serves a listener with `protocol: mqtt`.
pub struct MqttFrontEnd {
    pub broker: Arc<Broker>,
}

impl FrontEnd for MqttFrontEnd {
    async fn serve<S: Stream>(&self, io: S, conn: Arc<ConnState>, shutdown: Shutdown) {
        let info = ConnInfo {
            listener: conn.listener.name.clone(),
            peer: conn.peer,
            cert: conn.peer_cert.clone(),
            transport: if conn.listener.tls.is_some() {
                "tls"
            } else {
                "tcp"
            },
        };
        connection::serve(io, info, self.broker.clone(), shutdown.graceful.clone()).await;
    }
}

/// MQTT over WebSocket (subprotocol `mqtt`; `mqttv3.1` is what some 3.1.1
/// clients offer): each connection's binary messages are its byte stream.
pub struct MqttWebSocket {
    pub broker: Arc<Broker>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// `mqtt.websocket.allowed_origins`.
    pub allowed_origins: Vec<String>,
}

/// The subprotocols MQTT over WebSocket takes.
pub const WS_SUBPROTOCOLS: &[&str] = &["mqtt", "mqttv3.1"];

impl transport::websocket::WsService for MqttWebSocket {
    fn allows_origin(&self, headers: &http::HeaderMap, tls: bool) -> bool {
        transport::websocket::origin_allowed(&self.allowed_origins, headers, tls)
    }

    fn max_message(&self) -> usize {
        // Packets may span messages; a message is at most a packet and a
        // header.
        self.broker
            .settings
            .load()
            .limits
            .max_packet_size
            .as_usize()
            + 8
    }

    fn serve(
        self: Arc<Self>,
        ws: transport::websocket::WebSocket,
        _protocol: Option<&'static str>,
        conn: Arc<ConnState>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let info = ConnInfo {
                listener: conn.listener.name.clone(),
                peer: conn.peer,
                cert: conn.peer_cert.clone(),
                transport: "websocket",
            };
            connection::serve(
                ws::WsBytes::new(ws),
                info,
                self.broker.clone(),
                self.shutdown.clone(),
            )
            .await;
        })
    }
}

/// Cluster mode: keeps the broker's retained messages as the cluster's
/// store has them — read whole when its watch (re)starts (so a node that
/// starts later, or whose bus was away, catches up), then each change as
/// it is written, by whichever node. Ends with the broker.
fn follow_shared_retained(cfg: Arc<Config>, broker: std::sync::Weak<Broker>) {
    tokio::spawn(async move {
        let mut wait = std::time::Duration::from_millis(250);
        let feed = loop {
            let opened = {
                let cfg = cfg.clone();
                tokio::task::spawn_blocking(move || crate::store::open(&cfg)).await
            };
            match opened {
                Ok(Ok(store)) => match store.feed() {
                    Some(feed) => break feed.subscribe(),
                    None => return,
                },
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the cluster's retained MQTT messages cannot be followed yet; retrying")
                }
                Err(_) => return,
            }
            if broker.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(30));
        };
        loop {
            let changes = tokio::select! {
                c = feed.next() => c,
                // Checked now and then: the broker may be gone.
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                    if broker.strong_count() == 0 { return }
                    continue;
                }
            };
            let Some(b) = broker.upgrade() else { return };
            if changes.resync {
                let cfg = cfg.clone();
                match tokio::task::spawn_blocking(move || persist::read_all_retained(&cfg)).await {
                    Ok(Ok(list)) => {
                        tracing::debug!(
                            retained = list.len(),
                            "the cluster's retained MQTT messages read"
                        );
                        b.replace_shared_retained(list)
                    }
                    // The watch is down again: its return reads again.
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "the cluster's retained MQTT messages cannot be read")
                    }
                    Err(_) => return,
                }
                continue;
            }
            for (key, value) in changes.records {
                if let Some((topic, message)) = persist::shared_retained(&key, value.as_deref()) {
                    b.shared_retained(&topic, message);
                }
            }
        }
    });
}
