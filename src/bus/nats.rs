//! The bus on core NATS (async-nats): one connection per node, kept up
//! forever (reconnects with backoff; the client subscribes again by
//! itself after a reconnect). Sends go through one bounded queue and one
//! task, so they leave in the order they were queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use futures_util::StreamExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Backend, BoxFuture, BusError, BusMetrics, Incoming, NodeId, NotSent, Subscription};
use crate::config::{Config, ConfigError, EtcdTls, NatsBusConfig};

pub(super) struct Nats {
    client: async_nats::Client,
    queue: mpsc::Sender<(String, Bytes)>,
    servers: Vec<String>,
    flush_timeout: Duration,
    /// A subject nobody serves (see `flush`).
    flush_subject: String,
}

/// Reconnect delays: doubling from 100ms up to 5s, with jitter so the
/// nodes of a cluster do not all knock at once.
fn backoff(attempts: usize) -> Duration {
    let base = 100u64.saturating_mul(1 << attempts.min(6)).min(5_000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

fn config_error(path: &str, message: impl Into<String>) -> Vec<ConfigError> {
    vec![ConfigError {
        path: path.into(),
        message: message.into(),
    }]
}

/// A TLS client config on aws-lc-rs from the configured files.
fn tls_config(
    cfg: &Config,
    tls: &EtcdTls,
) -> Result<async_nats::rustls::ClientConfig, Vec<ConfigError>> {
    let ca_path = cfg.resolve(&tls.ca);
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| config_error("bus.nats.tls.ca", format!("{}: {e}", ca_path.display())))?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(config_error(
            "bus.nats.tls.ca",
            format!("{}: no certificate in it", ca_path.display()),
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| config_error("bus.nats.tls", e.to_string()))?
    .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (cfg.resolve(cert), cfg.resolve(key));
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    config_error("bus.nats.tls.cert", format!("{}: {e}", cert.display()))
                })?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| config_error("bus.nats.tls.key", format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| config_error("bus.nats.tls.key", e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

impl Nats {
    pub(super) async fn start(
        cfg: &Config,
        nats: &NatsBusConfig,
        node: NodeId,
        metrics: Arc<BusMetrics>,
        stop: CancellationToken,
    ) -> Result<Nats, Vec<ConfigError>> {
        let down = Arc::new(AtomicBool::new(false));
        let mut options = ConnectOptions::new()
            .name(format!("tollgate-{node:016x}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(backoff)
            .connection_timeout(nats.connect_timeout)
            .subscription_capacity(nats.receive_queue)
            .event_callback({
                let metrics = metrics.clone();
                let down = down.clone();
                move |event| {
                    on_event(event, &metrics, &down);
                    std::future::ready(())
                }
            });
        if let Some(tls) = &nats.tls {
            options = options
                .require_tls(true)
                .tls_client_config(tls_config(cfg, tls)?);
        }
        if let Some(file) = &nats.token_file {
            let path = cfg.resolve(file);
            let token = std::fs::read_to_string(&path).map_err(|e| {
                config_error("bus.nats.token_file", format!("{}: {e}", path.display()))
            })?;
            let token = token.trim();
            if token.is_empty() {
                return Err(config_error(
                    "bus.nats.token_file",
                    format!("{}: empty", path.display()),
                ));
            }
            options = options.token(token.to_owned());
        }
        if let Some(file) = &nats.credentials {
            let path = cfg.resolve(file);
            options = options.credentials_file(&path).await.map_err(|e| {
                config_error("bus.nats.credentials", format!("{}: {e}", path.display()))
            })?;
        }
        let servers: Vec<async_nats::ServerAddr> = nats
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse()
                    .map_err(|e| config_error(&format!("bus.nats.servers[{i}]"), format!("{e}")))
            })
            .collect::<Result<_, _>>()?;
        // With retry_on_initial_connect this returns at once; the client
        // connects (and reconnects) in the background.
        let client = options
            .connect(servers)
            .await
            .map_err(|e| config_error("bus.nats", e.to_string()))?;
        // The first connection's failures are not events: said once here.
        let (first, wait) = (client.clone(), nats.connect_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if first.connection_state() != State::Connected && !down.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "cluster bus cannot reach NATS yet (retrying): each node serves its own clients; cross-node messages are dropped until it connects"
                );
            }
        });
        let (queue, rx) = mpsc::channel(nats.send_queue);
        let flush_subject = format!("{}.flush.{node:016x}", nats.prefix);
        // This node answers its own flushes (see `flush`); anyone else
        // listening on the subject gets them too and changes nothing.
        let mut echo = client
            .subscribe(flush_subject.clone())
            .await
            .map_err(|e| config_error("bus.nats", e.to_string()))?;
        let (replier, done) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = done.cancelled() => return,
                    m = echo.next() => m,
                };
                let Some(m) = m else { return };
                if let Some(to) = m.reply {
                    let _ = replier.publish(to, Bytes::new()).await;
                }
            }
        });
        tokio::spawn(send_loop(client.clone(), rx, metrics, stop));
        Ok(Nats {
            client,
            queue,
            servers: nats.servers.clone(),
            flush_timeout: nats.connect_timeout,
            flush_subject,
        })
    }
}

/// Keeps the connected gauge and logs one warning per outage (`down`:
/// one is going on).
fn on_event(event: Event, metrics: &BusMetrics, down: &AtomicBool) {
    match event {
        Event::Connected => {
            metrics.connected.set(1);
            if down.swap(false, Ordering::Relaxed) {
                tracing::info!("cluster bus reconnected to NATS: cross-node messages flow again");
            } else {
                tracing::info!("cluster bus connected to NATS");
            }
        }
        Event::Disconnected => {
            metrics.connected.set(0);
            if !down.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "cluster bus lost NATS: each node serves its own clients; cross-node messages are dropped (tollgate_bus_dropped_total) until it is back"
                );
            }
        }
        Event::SlowConsumer(_) => metrics.dropped.slow_consumer.inc(),
        Event::ServerError(e) => tracing::warn!(error = %e, "NATS reported an error"),
        Event::ClientError(e) => tracing::debug!(error = %e, "NATS client error"),
        Event::LameDuckMode | Event::Draining | Event::Closed => {
            tracing::info!(event = %event, "NATS connection");
        }
    }
}

/// Sends what is queued, in order, while connected; drops (and counts)
/// what comes while it is not.
async fn send_loop(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<(String, Bytes)>,
    metrics: Arc<BusMetrics>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = rx.recv() => next,
        };
        let Some((subject, payload)) = next else {
            return;
        };
        if client.connection_state() != State::Connected {
            metrics.dropped.disconnected.inc();
            continue;
        }
        if let Err(e) = client.publish(subject, payload).await {
            match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                    metrics.dropped.too_large.inc();
                }
                _ => metrics.dropped.disconnected.inc(),
            }
        }
    }
}

impl Backend for Nats {
    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn publish(&self, subject: String, payload: Bytes) -> Result<(), NotSent> {
        if !self.connected() {
            return Err(NotSent::Disconnected);
        }
        // (Over the server's max_payload: the client refuses it in the
        // send loop, counted there.)
        self.queue
            .try_send((subject, payload))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => NotSent::QueueFull,
                mpsc::error::TrySendError::Closed(_) => NotSent::Disconnected,
            })
    }

    fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
        tag: u64,
        sink: mpsc::Sender<Incoming>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>> {
        Box::pin(async move {
            let mut sub = match queue {
                Some(q) => self.client.queue_subscribe(subject, q).await,
                None => self.client.subscribe(subject).await,
            }
            .map_err(|e| BusError::Failed(e.to_string()))?;
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => break,
                        m = sub.next() => m,
                    };
                    let Some(m) = m else { break };
                    let item = Incoming {
                        tag,
                        subject: m.subject.into_string(),
                        payload: m.payload,
                        reply: m.reply.map(|r| r.into_string()),
                    };
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        sent = sink.send(item) => if sent.is_err() { break },
                    }
                }
                // Dropping `sub` unsubscribes.
            });
            Ok(Subscription::new(cancel))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            // async-nats's flush only writes out what is buffered. The
            // server reads a connection in order: the answer to a request
            // this node serves itself comes once the server has read
            // everything sent before it, subscriptions included.
            let asked = self
                .client
                .request(self.flush_subject.clone(), Bytes::new());
            match tokio::time::timeout(self.flush_timeout, asked).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(BusError::Failed(e.to_string())),
                Err(_) => Err(BusError::TimedOut(self.flush_timeout)),
            }
        })
    }

    fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BusError>> {
        Box::pin(async move {
            if !self.connected() {
                return Err(BusError::Disconnected);
            }
            match tokio::time::timeout(timeout, self.client.request(subject, payload)).await {
                Ok(Ok(m)) => Ok(m.payload),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    Err(BusError::NoResponders)
                }
                Ok(Err(e)) => Err(BusError::Failed(e.to_string())),
                Err(_) => Err(BusError::TimedOut(timeout)),
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        let info = self.client.server_info();
        serde_json::json!({
            "kind": "nats",
            "servers": self.servers,
            "state": format!("{:?}", self.client.connection_state()),
            "server_name": (!info.server_name.is_empty()).then_some(info.server_name),
        })
    }
}
