//! The bus between the nodes of one gateway (cluster mode): subjects,
//! payloads, queue groups and request/reply, as the front-ends need them
//! to reach their peers on other nodes (MQTT publishes today; WAMP events
//! and calls later). One implementation, on core NATS (`bus.nats`, the
//! `cluster` feature); without `bus` a gateway is one node and nothing
//! here runs.
//!
//! What the bus promises is what core NATS does: at most once, in order
//! per publisher and subscription, nothing lost while connected and the
//! receivers keep up. While NATS is unreachable the bus keeps trying
//! (forever, with backoff); messages sent meanwhile are dropped and
//! counted, never queued without bound, and subscriptions come back by
//! themselves when it returns.

#[cfg(feature = "cluster")]
mod nats;
pub mod subject;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;

/// This process among the nodes: chosen at random at start (a restarted
/// node is a new one), carried by what it sends.
pub type NodeId = u64;

/// A message the bus delivered to a subscription.
#[derive(Debug)]
pub struct Incoming {
    /// What the subscriber said at `subscribe`: which of its
    /// subscriptions this came through.
    pub tag: u64,
    pub subject: String,
    pub payload: Bytes,
    /// Where a request wants its reply (request/reply).
    pub reply: Option<String>,
}

/// Why a message was not sent (each a `tollgate_bus_dropped_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// The bus is not connected.
    Disconnected,
    /// More than `send_queue` messages wait to be sent.
    QueueFull,
    /// Larger than the bus server takes, or a subject longer than
    /// [`MAX_SUBJECT`].
    TooLarge,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the bus is not connected")]
    Disconnected,
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    /// Nobody subscribes to a request's subject (NATS says so at once).
    #[error("no responders")]
    NoResponders,
    #[error("{0}")]
    Failed(String),
}

/// The longest subject sent: NATS refuses a protocol line over 4 KiB by
/// default and drops the connection that sent it.
pub const MAX_SUBJECT: usize = 2048;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A subscription on the bus; dropping it unsubscribes.
pub struct Subscription {
    _cancel: tokio_util::sync::DropGuard,
}

impl Subscription {
    pub fn new(cancel: tokio_util::sync::CancellationToken) -> Subscription {
        Subscription {
            _cancel: cancel.drop_guard(),
        }
    }
}

/// What a bus implementation does.
trait Backend: Send + Sync {
    fn connected(&self) -> bool;
    /// Queues a message to be sent (never waits).
    fn publish(&self, subject: String, payload: Bytes) -> Result<(), NotSent>;
    /// Delivers what reaches `subject` (NATS wildcards: `*` one token,
    /// `>` the rest) into `sink`, tagged; with `queue`, each message goes
    /// to one member of the queue group among every node's subscriptions.
    fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
        tag: u64,
        sink: mpsc::Sender<Incoming>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>>;
    /// Waits until the server has seen everything sent before (a
    /// subscription made before it is in place after it).
    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>>;
    fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BusError>>;
    fn status(&self) -> serde_json::Value;
}

/// The bus's counters and gauges.
pub struct BusMetrics {
    pub connected: IntGauge,
    messages: IntCounterVec,
    duplicates: IntCounterVec,
    pub subscriptions: IntGauge,
    pub dropped: BusDropped,
}

/// `tollgate_bus_dropped_total` by reason.
pub struct BusDropped {
    pub disconnected: IntCounter,
    pub queue_full: IntCounter,
    pub too_large: IntCounter,
    pub malformed: IntCounter,
    pub slow_consumer: IntCounter,
}

/// One kind of traffic's counters (`kind="mqtt"`), resolved once.
pub struct KindCounters {
    pub sent: IntCounter,
    pub received: IntCounter,
    pub duplicates: IntCounter,
}

impl BusMetrics {
    #[cfg(feature = "cluster")]
    fn register(m: &Metrics) -> BusMetrics {
        let dropped = m.counter(
            "tollgate_bus_dropped_total",
            "Bus messages not sent or not delivered, by reason (disconnected | queue_full | too_large | malformed | slow_consumer)",
            &["reason"],
        );
        let r = |reason: &str| dropped.with_label_values(&[reason]);
        BusMetrics {
            connected: m
                .gauge(
                    "tollgate_bus_connected",
                    "1 while the bus to the other nodes is connected",
                    &[],
                )
                .with_label_values(&[] as &[&str]),
            messages: m.counter(
                "tollgate_bus_messages_total",
                "Messages sent to and received from the bus, by direction (sent | received) and kind (mqtt | wamp)",
                &["direction", "kind"],
            ),
            duplicates: m.counter(
                "tollgate_bus_duplicates_total",
                "Bus messages received again through another subscription of this node and skipped, by kind",
                &["kind"],
            ),
            subscriptions: m
                .gauge(
                    "tollgate_bus_subscriptions",
                    "Subscriptions this node holds on the bus (in place at the server)",
                    &[],
                )
                .with_label_values(&[] as &[&str]),
            dropped: BusDropped {
                disconnected: r("disconnected"),
                queue_full: r("queue_full"),
                too_large: r("too_large"),
                malformed: r("malformed"),
                slow_consumer: r("slow_consumer"),
            },
        }
    }

    pub fn kind(&self, kind: &str) -> KindCounters {
        KindCounters {
            sent: self.messages.with_label_values(&["sent", kind]),
            received: self.messages.with_label_values(&["received", kind]),
            duplicates: self.duplicates.with_label_values(&[kind]),
        }
    }

    pub fn drop_reason(&self, why: NotSent) -> &IntCounter {
        match why {
            NotSent::Disconnected => &self.dropped.disconnected,
            NotSent::QueueFull => &self.dropped.queue_full,
            NotSent::TooLarge => &self.dropped.too_large,
        }
    }
}

/// The bus a node's front-ends share.
pub struct Bus {
    node: NodeId,
    prefix: Arc<str>,
    receive_queue: usize,
    backend: Box<dyn Backend>,
    pub metrics: Arc<BusMetrics>,
}

impl Bus {
    /// The bus `cfg` asks for (`bus.nats`), connecting in the background
    /// (the gateway serves its own clients while it cannot); none without
    /// `bus`. Problems with files it names are reported under their keys.
    pub async fn start(
        cfg: &Config,
        metrics: &Metrics,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Option<Arc<Bus>>, Vec<ConfigError>> {
        let Some(nats) = &cfg.bus.nats else {
            return Ok(None);
        };
        #[cfg(feature = "cluster")]
        {
            let node = new_node_id();
            let metrics = Arc::new(BusMetrics::register(metrics));
            let backend = nats::Nats::start(cfg, nats, node, metrics.clone(), stop).await?;
            tracing::info!(node = %format_args!("{node:016x}"), servers = ?nats.servers,
                prefix = %nats.prefix, "cluster bus on NATS");
            Ok(Some(Arc::new(Bus {
                node,
                prefix: Arc::from(nats.prefix.as_str()),
                receive_queue: nats.receive_queue,
                backend: Box::new(backend),
                metrics,
            })))
        }
        #[cfg(not(feature = "cluster"))]
        {
            let _ = (nats, metrics, stop);
            Err(vec![ConfigError {
                path: "bus.nats".into(),
                message: "this build has no cluster support (build with --features cluster)".into(),
            }])
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The first token(s) of every subject (`bus.nats.prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many received messages may wait for their consumer.
    pub fn receive_queue(&self) -> usize {
        self.receive_queue
    }

    pub fn connected(&self) -> bool {
        self.backend.connected()
    }

    /// Sends `payload` to `subject` (queued; never waits). A message that
    /// cannot be sent is counted as dropped, and why is returned.
    pub fn publish(&self, subject: String, payload: Bytes) -> Result<(), NotSent> {
        let sent = if subject.len() > MAX_SUBJECT {
            Err(NotSent::TooLarge)
        } else {
            self.backend.publish(subject, payload)
        };
        if let Err(why) = sent {
            self.metrics.drop_reason(why).inc();
        }
        sent
    }

    /// See [`Backend::subscribe`].
    pub async fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
        tag: u64,
        sink: mpsc::Sender<Incoming>,
    ) -> Result<Subscription, BusError> {
        if subject.len() > MAX_SUBJECT {
            return Err(BusError::Failed(format!(
                "a subject longer than {MAX_SUBJECT} bytes"
            )));
        }
        self.backend.subscribe(subject, queue, tag, sink).await
    }

    /// See [`Backend::flush`].
    pub async fn flush(&self) -> Result<(), BusError> {
        self.backend.flush().await
    }

    /// Sends a request and waits for its first reply.
    pub async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        if subject.len() > MAX_SUBJECT {
            return Err(BusError::Failed(format!(
                "a subject longer than {MAX_SUBJECT} bytes"
            )));
        }
        self.backend.request(subject, payload, timeout).await
    }

    /// For `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let mut s = self.backend.status();
        if let Some(o) = s.as_object_mut() {
            o.insert("node_id".into(), format!("{:016x}", self.node).into());
            o.insert("prefix".into(), self.prefix.to_string().into());
            o.insert("connected".into(), self.connected().into());
            o.insert(
                "subscriptions".into(),
                self.metrics.subscriptions.get().into(),
            );
        }
        s
    }
}

/// At most the first 120 characters of `s` (for log lines about what a
/// hostile sender chose).
pub fn bounded(s: &str) -> &str {
    match s.char_indices().nth(120) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Logs bus messages a front-end refused, at most one line per 10 seconds
/// (a hostile publisher can send many), with how many were not logged.
pub struct Complaints {
    kind: &'static str,
    last: Option<std::time::Instant>,
    quiet: u64,
}

impl Complaints {
    pub fn new(kind: &'static str) -> Complaints {
        Complaints {
            kind,
            last: None,
            quiet: 0,
        }
    }

    pub fn log(&mut self, why: &str, subject: &str) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            self.quiet += 1;
            return;
        }
        self.last = Some(std::time::Instant::now());
        tracing::warn!(reason = why, subject = %bounded(subject), not_logged = self.quiet,
            "{} message from the bus was dropped (tollgate_bus_dropped_total)", self.kind);
        self.quiet = 0;
    }
}

/// A random, non-zero node id.
#[cfg(feature = "cluster")]
fn new_node_id() -> NodeId {
    let mut b = [0u8; 8];
    loop {
        if aws_lc_rs::rand::fill(&mut b).is_err() {
            b = fastrand::u64(..).to_be_bytes();
        }
        let id = u64::from_be_bytes(b);
        if id != 0 {
            return id;
        }
    }
}
