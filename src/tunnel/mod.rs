//! The WebSocket tunnel relay (Micronets' ws-proxy): peers that connect to
//! the same `<prefix><id>` over mTLS meet, and every message one sends is
//! relayed to the others; HTTP requests to a route whose upstream is
//! `tunnel: <id>` are carried to the peers on that id as REST:REQUEST
//! messages. `tollgate tunnel connect` is the peer side.

pub mod client;
pub mod envelope;
mod relay;

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::authz::{Action, Policy, Resource};
use crate::config::{Config, ConfigError, EnvelopeMode, TunnelConfig, is_tunnel_id};
use crate::identity::{CertIdentity, Identity};
use crate::metrics::{Metrics, RouteMetrics};
use crate::transport::websocket::{self, origin_allowed};
use crate::transport::{
    CarriedRequest, CarryError, CarryFuture, ConnState, LocalBody, LocalFuture, LocalService,
    Switch, TunnelLink,
};
use relay::{Connection, Refused, Relay};

/// How the message ids of the gateway's own requests begin: answers to
/// them are never relayed to other peers.
pub const GATEWAY_IDS: &str = "tollgate-";

/// One relay's settings, compiled from its `tunnels[]` entry.
pub struct Settings {
    pub prefix: String,
    /// The listeners that serve it (TLS listeners with client certificates).
    pub listeners: Vec<String>,
    pub envelope: EnvelopeMode,
    pub max_peers: usize,
    pub max_message: usize,
    pub queue: usize,
    pub stall_timeout: Duration,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub close_propagates: bool,
    pub policy: Option<Policy>,
    pub max_pending_requests: usize,
    pub allowed_origins: Vec<String>,
}

impl Settings {
    fn build(cfg: &Config, t: &TunnelConfig, at: &str) -> Result<Settings, Vec<ConfigError>> {
        let policy = match &t.policy {
            None => None,
            Some(rules) => Some(Policy::compile(rules, Resource::Name).map_err(|errs| {
                errs.into_iter()
                    .map(|(p, message)| ConfigError {
                        path: format!("{at}.policy{p}"),
                        message,
                    })
                    .collect::<Vec<_>>()
            })?),
        };
        Ok(Settings {
            prefix: t.prefix.clone(),
            listeners: match &t.listeners {
                Some(l) => l.clone(),
                None => cfg.cert_listeners(),
            },
            envelope: t.envelope,
            max_peers: t.max_peers,
            max_message: t.max_message.as_usize(),
            queue: t.queue.as_usize(),
            stall_timeout: t.stall_timeout,
            idle_timeout: t.idle_timeout,
            ping_interval: t.ping_interval,
            close_propagates: t.close_propagates,
            policy,
            max_pending_requests: t.max_pending_requests,
            allowed_origins: t.allowed_origins.clone(),
        })
    }

    /// Whether `who` may join tunnel `id`: by the policy, or, without one,
    /// anyone whose certificate the listener verified.
    pub fn may_join(&self, who: &Identity, id: &str) -> bool {
        match &self.policy {
            Some(p) => p.evaluate(who, &Action::TunnelJoin { id }).allowed(),
            None => true,
        }
    }

    /// The id a path names under this relay's prefix.
    fn id_of<'p>(&self, path: &'p str) -> Option<&'p str> {
        path.strip_prefix(self.prefix.as_str())
            .filter(|id| is_tunnel_id(id))
    }
}

/// A relay's metric handles, resolved once.
#[derive(Clone)]
pub struct RelayMetrics {
    peers: IntGauge,
    joined: IntCounter,
    denied: IntCounter,
    refused_full: IntCounter,
    replaced: IntCounter,
    relayed: IntCounter,
    bytes: IntCounter,
    malformed: IntCounter,
    slow: IntCounter,
    http: [IntCounter; 7],
    http_duration: Histogram,
}

const HTTP_RESULTS: [&str; 7] = [
    "answered",
    "no_peer",
    "busy",
    "too_large",
    "timeout",
    "peer_left",
    "bad_answer",
];

struct Families {
    peers: IntGaugeVec,
    joins: IntCounterVec,
    messages: IntCounterVec,
    bytes: IntCounterVec,
    malformed: IntCounterVec,
    slow: IntCounterVec,
    http: IntCounterVec,
    http_duration: prometheus::HistogramVec,
}

impl Families {
    fn new(m: &Metrics) -> Families {
        Families {
            peers: m.gauge(
                "tollgate_tunnel_peers",
                "Peers connected to WebSocket tunnels",
                &["prefix"],
            ),
            joins: m.counter(
                "tollgate_tunnel_joins_total",
                "Tunnel joins by result (joined, denied, full, replaced)",
                &["prefix", "result"],
            ),
            messages: m.counter(
                "tollgate_tunnel_messages_total",
                "Messages peers sent through tunnels",
                &["prefix"],
            ),
            bytes: m.counter(
                "tollgate_tunnel_received_bytes_total",
                "Payload bytes peers sent through tunnels",
                &["prefix"],
            ),
            malformed: m.counter(
                "tollgate_tunnel_malformed_total",
                "Messages refused as malformed envelopes (not relayed)",
                &["prefix"],
            ),
            slow: m.counter(
                "tollgate_tunnel_slow_peers_total",
                "Peers disconnected because their outbound queue stayed full",
                &["prefix"],
            ),
            http: m.counter(
                "tollgate_tunnel_http_requests_total",
                "HTTP requests carried over tunnels, by result",
                &["prefix", "result"],
            ),
            http_duration: m.histogram(
                "tollgate_tunnel_http_duration_seconds",
                "Time from carrying an HTTP request to its answer",
                &["prefix"],
            ),
        }
    }

    fn relay(&self, prefix: &str) -> RelayMetrics {
        let join = |r: &str| self.joins.with_label_values(&[prefix, r]);
        RelayMetrics {
            peers: self.peers.with_label_values(&[prefix]),
            joined: join("joined"),
            denied: join("denied"),
            refused_full: join("full"),
            replaced: join("replaced"),
            relayed: self.messages.with_label_values(&[prefix]),
            bytes: self.bytes.with_label_values(&[prefix]),
            malformed: self.malformed.with_label_values(&[prefix]),
            slow: self.slow.with_label_values(&[prefix]),
            http: HTTP_RESULTS.map(|r| self.http.with_label_values(&[prefix, r])),
            http_duration: self.http_duration.with_label_values(&[prefix]),
        }
    }
}

/// The tunnel front-end: every relay of the config. It outlives reloads;
/// a relay whose prefix stays keeps its peers.
pub struct Tunnels {
    relays: ArcSwap<Vec<Arc<Relay>>>,
    families: Families,
    shutdown: CancellationToken,
    serials: AtomicU64,
    messages: AtomicU64,
    route_metrics: RouteMetrics,
}

/// Whether the config serves tunnels.
pub fn enabled(cfg: &Config) -> bool {
    !cfg.tunnels.is_empty()
}

/// Every relay's settings, or what is wrong with them.
pub fn settings(cfg: &Config) -> Result<Vec<Settings>, Vec<ConfigError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, t) in cfg.tunnels.iter().enumerate() {
        match Settings::build(cfg, t, &format!("tunnels[{i}]")) {
            Ok(s) => out.push(s),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

impl Tunnels {
    pub fn new(
        settings: Vec<Settings>,
        metrics: &Metrics,
        listeners: &[String],
        shutdown: CancellationToken,
    ) -> Tunnels {
        let families = Families::new(metrics);
        let relays = settings
            .into_iter()
            .map(|s| {
                let m = families.relay(&s.prefix);
                Arc::new(Relay::new(s, m, &shutdown))
            })
            .collect();
        Tunnels {
            relays: ArcSwap::from_pointee(relays),
            families,
            shutdown,
            serials: AtomicU64::new(1),
            messages: AtomicU64::new(1),
            route_metrics: metrics.route("tunnel", listeners),
        }
    }

    /// Takes a reloaded config: relays whose prefix stays keep their peers
    /// (and end those the new policy refuses); removed ones end theirs.
    pub fn apply(&self, settings: Vec<Settings>) {
        let old = self.relays.load_full();
        let mut kept = Vec::with_capacity(settings.len());
        for s in settings {
            match old.iter().find(|r| r.settings.load().prefix == s.prefix) {
                Some(r) => {
                    r.settings.store(Arc::new(s));
                    r.recheck();
                    kept.push(r.clone());
                }
                None => {
                    let m = self.families.relay(&s.prefix);
                    kept.push(Arc::new(Relay::new(s, m, &self.shutdown)));
                }
            }
        }
        for r in old.iter() {
            if !kept.iter().any(|k| Arc::ptr_eq(k, r)) {
                r.removed.cancel();
            }
        }
        self.relays.store(Arc::new(kept));
    }

    /// The relay serving `path` on `listener`, and the id it names.
    fn find<'p>(&self, listener: &str, path: &'p str) -> Option<(Arc<Relay>, &'p str)> {
        self.relays.load().iter().find_map(|r| {
            let s = r.settings.load();
            if !s.listeners.iter().any(|l| l == listener) {
                return None;
            }
            s.id_of(path).map(|id| (r.clone(), id))
        })
    }

    /// The relay and id a route's `tunnel:` names: `<prefix><id>`, or an
    /// id of the first relay.
    fn target<'t>(&self, target: &'t str) -> Option<(Arc<Relay>, &'t str)> {
        let relays = self.relays.load();
        if target.starts_with('/') {
            relays
                .iter()
                .find_map(|r| r.settings.load().id_of(target).map(|id| (r.clone(), id)))
        } else {
            relays.first().map(|r| (r.clone(), target))
        }
    }

    /// Every relay's ids and peers, for the admin API.
    pub fn status(&self) -> Value {
        Value::Array(self.relays.load().iter().map(|r| r.status()).collect())
    }
}

impl LocalService for Tunnels {
    fn name(&self) -> &str {
        "tunnel"
    }

    fn metrics(&self) -> &RouteMetrics {
        &self.route_metrics
    }

    fn endpoint(&self, listener: &str, path: &str) -> Option<u16> {
        self.find(listener, path).map(|_| 0)
    }

    fn serve<'a>(
        self: Arc<Self>,
        _endpoint: u16,
        _request: Request<LocalBody>,
        _peer: IpAddr,
        _cert: Option<&'a CertIdentity>,
    ) -> LocalFuture<'a> {
        Box::pin(async {
            websocket::upgrade_required("a WebSocket tunnel: connect with a WebSocket handshake")
        })
    }

    fn upgrades(&self, _endpoint: u16) -> bool {
        true
    }

    fn upgrade(
        self: Arc<Self>,
        _endpoint: u16,
        request: Request<()>,
        conn: Arc<ConnState>,
    ) -> Pin<Box<dyn Future<Output = Switch> + Send>> {
        Box::pin(async move {
            match self.admit(&request, &conn) {
                Ok(switch) => switch,
                Err(refused) => Switch::refuse(*refused),
            }
        })
    }
}

impl Tunnels {
    /// Checks a peer's handshake: certificate, id, origin, policy, room.
    fn admit(
        self: &Arc<Self>,
        request: &Request<()>,
        conn: &Arc<ConnState>,
    ) -> Result<Switch, Box<Response<Bytes>>> {
        // The canonical path (the pipeline hands it over), as routing saw it.
        let Some((relay, id)) = self.find(&conn.listener.name, request.uri().path()) else {
            return Err(websocket::refuse(
                StatusCode::BAD_REQUEST,
                "a tunnel id is 1 to 128 of A-Z a-z 0-9 . _ : -",
            ));
        };
        let settings = relay.settings.load_full();
        let Some(cert) = conn.peer_cert.clone() else {
            relay.metrics.denied.inc();
            tracing::info!(prefix = %settings.prefix, id, peer = %conn.peer, reason = "no client certificate", "tunnel join refused");
            return Err(websocket::refuse(
                StatusCode::FORBIDDEN,
                "a tunnel peer must present a client certificate",
            ));
        };
        if !origin_allowed(&settings.allowed_origins, request.headers(), true) {
            relay.metrics.denied.inc();
            return Err(websocket::refuse(
                StatusCode::FORBIDDEN,
                "this origin may not connect (tunnels[].allowed_origins)",
            ));
        }
        let identity = Arc::new(Identity::from_cert(cert.clone()));
        if !settings.may_join(&identity, id) {
            relay.metrics.denied.inc();
            tracing::info!(prefix = %settings.prefix, id, peer = %conn.peer,
                cert_cn = cert.cn.as_deref().unwrap_or(""), cert_o = %cert.o.join(","),
                cert_sha256 = %cert.sha256, reason = "policy", "tunnel join refused");
            return Err(websocket::refuse(
                StatusCode::FORBIDDEN,
                &format!("not allowed to join tunnel `{id}`"),
            ));
        }
        if let Err(Refused::Full(max)) = relay.has_room_for(id, &cert.sha256) {
            relay.metrics.refused_full.inc();
            tracing::info!(prefix = %settings.prefix, id, peer = %conn.peer,
                cert_cn = cert.cn.as_deref().unwrap_or(""), reason = "full", "tunnel join refused");
            return Err(websocket::refuse(
                StatusCode::CONFLICT,
                &format!("tunnel `{id}` already has {max} peers"),
            ));
        }
        let accepted = websocket::accept(request, &[])?;
        let id = id.to_owned();
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let shutdown = self.shutdown.clone();
        let max_message = settings.max_message;
        Ok(Switch {
            response: accepted.response,
            takeover: Some(Box::new(move |io, conn| {
                Box::pin(async move {
                    let ws = websocket::server(io, max_message).await;
                    Connection {
                        relay,
                        id,
                        identity,
                        conn,
                        serial,
                        shutdown,
                    }
                    .run(ws)
                    .await;
                })
            })),
        })
    }
}

impl TunnelLink for Tunnels {
    fn max_message(&self, target: &str) -> Option<usize> {
        self.target(target)
            .map(|(relay, _)| relay.settings.load().max_message)
    }

    fn carry(&self, target: &str, request: CarriedRequest, timeout: Duration) -> CarryFuture {
        let Some((relay, id)) = self.target(target) else {
            return Box::pin(std::future::ready(Err(CarryError::NoPeer(
                target.to_owned(),
            ))));
        };
        let id = id.to_owned();
        // Unique, and not to be guessed by a peer the request did not go to.
        let message_id = format!(
            "{GATEWAY_IDS}{}-{:016x}",
            self.messages.fetch_add(1, Ordering::Relaxed),
            fastrand::u64(..)
        );
        Box::pin(async move {
            let text = envelope::encode_request(&json!(message_id), &request);
            drop(request);
            let started = Instant::now();
            let result = relay.carry(&id, message_id, text, timeout).await;
            let m = &relay.metrics;
            let slot = match &result {
                Ok(_) => 0,
                Err(CarryError::NoPeer(_)) => 1,
                Err(CarryError::Busy(_)) => 2,
                Err(CarryError::TooLarge { .. }) => 3,
                Err(CarryError::Timeout { .. }) => 4,
                Err(CarryError::PeerLeft(_)) => 5,
                Err(CarryError::BadAnswer { .. }) => 6,
            };
            m.http[slot].inc();
            m.http_duration.observe(started.elapsed().as_secs_f64());
            result
        })
    }
}
