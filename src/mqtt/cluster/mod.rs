//! MQTT across the nodes of a cluster, over the bus.
//!
//! - A message published on a node (after its publish ACL) goes on the bus
//!   under `<prefix>.mqtt.<topic levels>` ([`subject`]), framed by
//!   [`wire`]; `$` topics never travel.
//! - Each node subscribes on the bus to the subjects of its own clients'
//!   filters, one bus subscription per distinct filter (the router counts
//!   subscribers per filter and says when the first comes and the last
//!   goes). A shared subscription `$share/<g>/<f>` is a bus queue group
//!   per (g, f): the bus hands each message to one node with members,
//!   this one included, and that node picks one of its members.
//! - A node gets a message once per matching bus subscription: it routes
//!   the first (origin node, sequence) it sees and skips the rest, and
//!   skips its own messages but on queue groups (its own clients got
//!   those from it directly).
//! - Retained messages also go under `<prefix>.mqtt-retained.…`, which
//!   every node subscribes to whole, so every node keeps them. A node that
//!   starts later does not get those published before it joined.

mod handover;
mod subject;
mod wire;

pub use handover::Handover;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::broker::Broker;
use super::router::{FilterKey, Interest, Scope};
use super::session::Message;
use crate::bus::{Bus, Complaints, Incoming, KindCounters, NodeId, Subscription, bounded};

/// What a node hands to the bus: its messages, numbered.
pub struct Bridge {
    bus: Arc<Bus>,
    node: NodeId,
    /// `<prefix>.mqtt`
    topics: String,
    /// `<prefix>.mqtt-retained`
    retained: String,
    seq: AtomicU64,
    counters: KindCounters,
    pending: Arc<Pending>,
}

impl Bridge {
    /// Resolves once this node's bus subscriptions match its clients'
    /// filters as they stand now (in place at the server); at once while
    /// the bus is down.
    pub async fn settled(&self) {
        if !self.bus.connected() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        self.pending.notify.notify_one();
        let _ = rx.await;
    }

    /// Sends a message published on this node to the others; whether the
    /// bus took it (a `$` topic never goes; a message the bus cannot take
    /// now is dropped there and counted).
    pub fn send(&self, message: &Message) -> bool {
        if message.topic.starts_with('$') {
            return false;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(self.node, seq, message);
        let sent = self
            .bus
            .publish(
                subject::for_topic(&self.topics, &message.topic),
                frame.clone(),
            )
            .is_ok();
        if sent {
            self.counters.sent.inc();
        }
        if message.retain {
            let subject = subject::for_topic(&self.retained, &message.topic);
            if self.bus.publish(subject, frame).is_ok() {
                self.counters.sent.inc();
            }
        }
        sent
    }
}

/// Filters whose subscribers came or went, for the dispatcher to settle.
#[derive(Default)]
struct Pending {
    dirty: Mutex<HashSet<FilterKey>>,
    /// Told once the changes before them are settled.
    waiters: Mutex<Vec<oneshot::Sender<()>>>,
    notify: Notify,
}

impl Interest for Pending {
    fn changed(&self, key: FilterKey) {
        // `$` filters match only `$` topics, which never travel.
        if key.filter.starts_with('$') {
            return;
        }
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        self.notify.notify_one();
    }
}

/// Puts `broker` on `bus`: what its clients publish reaches the other
/// nodes, and what the others publish reaches its clients, until `stop`.
pub fn join_bus(broker: &Arc<Broker>, bus: Arc<Bus>, stop: CancellationToken) {
    let topics = format!("{}.mqtt", bus.prefix());
    let retained = format!("{}.mqtt-retained", bus.prefix());
    let pending = Arc::new(Pending::default());
    let bridge = Arc::new(Bridge {
        pending: pending.clone(),
        node: bus.node_id(),
        topics: topics.clone(),
        retained: retained.clone(),
        seq: AtomicU64::new(1),
        counters: bus.metrics.kind("mqtt"),
        bus: bus.clone(),
    });
    if broker.bridge.set(bridge).is_err() {
        return;
    }
    Handover::start(broker, bus.clone(), stop.clone());
    let (tx, rx) = mpsc::channel(bus.receive_queue());
    broker.router_write().set_interest(pending.clone());
    let dispatcher = Dispatcher {
        broker: broker.clone(),
        counters: bus.metrics.kind("mqtt"),
        bus,
        topics,
        retained,
        tx,
        pending,
        subs: HashMap::new(),
        tags: HashMap::new(),
        next_tag: TAG_RETAINED + 1,
        seen: Seen::default(),
        complaints: Complaints::new("an MQTT"),
        _retained_sub: None,
    };
    tokio::spawn(dispatcher.run(rx, stop));
}

/// How a bus subscription's messages are routed here.
enum Via {
    /// To every matching subscription but shared ones.
    Direct,
    /// To one member of one shared subscription.
    Shared { group: Box<str>, filter: Box<str> },
}

const TAG_RETAINED: u64 = 0;

/// The one task that keeps this node's bus subscriptions in step with its
/// clients' and routes what comes in (in the order it comes: one task, so
/// a message seen first through one subscription is routed before a later
/// one seen through another).
struct Dispatcher {
    broker: Arc<Broker>,
    bus: Arc<Bus>,
    counters: KindCounters,
    topics: String,
    retained: String,
    tx: mpsc::Sender<Incoming>,
    pending: Arc<Pending>,
    subs: HashMap<FilterKey, Vec<(u64, Subscription)>>,
    tags: HashMap<u64, Via>,
    next_tag: u64,
    seen: Seen,
    complaints: Complaints,
    _retained_sub: Option<Subscription>,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Incoming>, stop: CancellationToken) {
        match self
            .bus
            .subscribe(
                format!("{}.>", self.retained),
                None,
                TAG_RETAINED,
                self.tx.clone(),
            )
            .await
        {
            Ok(s) => self._retained_sub = Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "retained MQTT messages of other nodes cannot be received")
            }
        }
        self.settle(&stop).await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.pending.notify.notified() => self.settle(&stop).await,
                m = rx.recv() => match m {
                    Some(m) => self.handle(m),
                    None => return,
                },
            }
        }
    }

    /// Subscribes on the bus to filters that gained their first subscriber,
    /// and leaves those that lost their last; once the server has the new
    /// ones, the subscriptions gauge says so.
    async fn settle(&mut self, stop: &CancellationToken) {
        let waiters = std::mem::take(
            &mut *self
                .pending
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let dirty: Vec<FilterKey> =
            std::mem::take(&mut *self.pending.dirty.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        // The first time, the subscription to retained messages is new.
        let mut added = self.bus.metrics.subscriptions.get() == 0;
        for key in dirty {
            let wanted = self.broker.router_read().has_filter(&key);
            match (wanted, self.subs.contains_key(&key)) {
                (true, false) => {
                    let held = self.subscribe(&key).await;
                    added |= !held.is_empty();
                    self.subs.insert(key, held);
                }
                (false, true) => {
                    for (tag, sub) in self.subs.remove(&key).unwrap_or_default() {
                        self.tags.remove(&tag);
                        drop(sub);
                    }
                }
                _ => {}
            }
        }
        if added {
            self.confirm(stop).await;
        }
        for w in waiters {
            let _ = w.send(());
        }
        let held: usize = self.subs.values().map(Vec::len).sum();
        let retained = usize::from(self._retained_sub.is_some());
        self.bus.metrics.subscriptions.set((held + retained) as i64);
    }

    /// Waits until the server has the subscriptions made so far (while
    /// NATS is away nothing comes in, and the client subscribes again on
    /// reconnecting; changes meanwhile wait for it).
    async fn confirm(&self, stop: &CancellationToken) {
        loop {
            if self.bus.connected() {
                match self.bus.flush().await {
                    Ok(()) => return,
                    Err(e) => tracing::debug!(error = %e, "bus flush after subscribing"),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn subscribe(&mut self, key: &FilterKey) -> Vec<(u64, Subscription)> {
        let queue = key.share.as_deref().map(|g| queue_group(g, &key.filter));
        let mut held = Vec::new();
        for subject in subject::for_filter(&self.topics, &key.filter) {
            let tag = self.next_tag;
            self.next_tag += 1;
            match self
                .bus
                .subscribe(subject, queue.clone(), tag, self.tx.clone())
                .await
            {
                Ok(sub) => {
                    let via = match &key.share {
                        None => Via::Direct,
                        Some(g) => Via::Shared {
                            group: g.clone(),
                            filter: key.filter.clone(),
                        },
                    };
                    self.tags.insert(tag, via);
                    held.push((tag, sub));
                }
                Err(e) => {
                    tracing::warn!(filter = %bounded(&key.filter), error = %e,
                        "an MQTT subscription cannot reach the other nodes: it gets this node's messages only");
                }
            }
        }
        held
    }

    fn handle(&mut self, m: Incoming) {
        let (base, via) = if m.tag == TAG_RETAINED {
            (&self.retained, None)
        } else {
            match self.tags.get(&m.tag) {
                Some(via) => (&self.topics, Some(via)),
                // A subscription left meanwhile.
                None => return,
            }
        };
        let max = self
            .broker
            .settings
            .load()
            .limits
            .max_packet_size
            .as_usize();
        let frame = match wire::decode(m.payload, max) {
            Ok(f) => f,
            Err(wire::WireError::TooLarge) => {
                self.bus.metrics.dropped.too_large.inc();
                return self
                    .complaints
                    .log("larger than mqtt.limits.max_packet_size", &m.subject);
            }
            Err(wire::WireError::Malformed(why)) => {
                self.bus.metrics.dropped.malformed.inc();
                return self.complaints.log(why, &m.subject);
            }
        };
        let topic = match subject::topic_of(base, &m.subject) {
            Ok(t) => t,
            Err(why) => {
                self.bus.metrics.dropped.malformed.inc();
                return self.complaints.log(why, &m.subject);
            }
        };
        let own = frame.origin == self.bus.node_id();
        let message = Arc::new(Message {
            topic: Arc::from(topic),
            payload: frame.payload,
            qos: frame.qos,
            retain: frame.retain,
            properties: frame.properties,
            expires_at: frame
                .expiry
                .map(|s| Instant::now() + Duration::from_secs(u64::from(s))),
            origin: 0,
        });
        match via {
            None => {
                if !own && message.retain {
                    self.counters.received.inc();
                    self.broker.retain_remote(&message);
                }
            }
            Some(Via::Direct) => {
                if own {
                    return;
                }
                if !self.seen.first(frame.origin, frame.seq) {
                    self.counters.duplicates.inc();
                    return;
                }
                self.counters.received.inc();
                self.broker.publish_remote(message, Scope::Direct);
            }
            Some(Via::Shared { group, filter }) => {
                self.counters.received.inc();
                self.broker
                    .publish_remote(message, Scope::Group { group, filter });
            }
        }
    }
}

/// The bus queue group of `$share/<group>/<filter>`: NATS groups queue
/// subscribers by name across subjects, so the filter is part of it.
fn queue_group(group: &str, filter: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, filter.as_bytes());
    let hex: String = digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut name = subject::for_topic("mqtt-share", group);
    name.push('.');
    name.push_str(&hex);
    name
}

/// Which (origin, sequence) pairs were routed: per origin the highest
/// sequence seen and a window of the [`WINDOW`] before it. A sequence
/// below the window is let through (a duplicate that late is rarer than
/// a message that late through a second subscription). At most
/// [`MAX_ORIGINS`] origins; the one heard from least recently goes.
#[derive(Default)]
struct Seen {
    origins: HashMap<NodeId, Window>,
    clock: u64,
}

const WINDOW: u64 = 4096;
const MAX_ORIGINS: usize = 1024;

struct Window {
    top: u64,
    bits: Box<[u64; (WINDOW / 64) as usize]>,
    used: u64,
}

impl Window {
    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = seq % WINDOW;
        (&mut self.bits[(i / 64) as usize], 1 << (i % 64))
    }
}

impl Seen {
    /// Whether `seq` from `origin` is seen for the first time (and notes it).
    fn first(&mut self, origin: NodeId, seq: u64) -> bool {
        self.clock += 1;
        if !self.origins.contains_key(&origin) && self.origins.len() >= MAX_ORIGINS {
            let oldest = self
                .origins
                .iter()
                .min_by_key(|(_, w)| w.used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.origins.remove(&k);
            }
        }
        let w = self.origins.entry(origin).or_insert_with(|| Window {
            top: seq,
            bits: Box::new([0; (WINDOW / 64) as usize]),
            used: 0,
        });
        w.used = self.clock;
        if seq > w.top {
            // Clear what slides into the window between the old top and seq.
            let gap = (seq - w.top).min(WINDOW);
            for s in (seq - gap + 1)..=seq {
                let (word, bit) = w.bit(s);
                *word &= !bit;
            }
            w.top = seq;
        } else if w.top - seq >= WINDOW {
            return true;
        }
        let (word, bit) = w.bit(seq);
        let first = *word & bit == 0;
        *word |= bit;
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_passes_once() {
        let mut seen = Seen::default();
        assert!(seen.first(1, 5));
        assert!(!seen.first(1, 5));
        assert!(seen.first(2, 5), "origins apart");
        assert!(seen.first(1, 7));
        assert!(seen.first(1, 6), "late but new");
        assert!(!seen.first(1, 6));
        assert!(seen.first(1, 6 + WINDOW * 3));
        assert!(!seen.first(1, 6 + WINDOW * 3));
        assert!(
            seen.first(1, 7 + WINDOW * 2),
            "below the window: let through"
        );
        for s in 10_000..20_000 {
            assert!(seen.first(3, s));
            assert!(!seen.first(3, s));
            if s >= 10_100 {
                assert!(!seen.first(3, s - 100));
            }
        }
    }

    #[test]
    fn origins_are_bounded() {
        let mut seen = Seen::default();
        for o in 0..(MAX_ORIGINS as u64 * 2) {
            assert!(seen.first(o, 1));
        }
        assert_eq!(seen.origins.len(), MAX_ORIGINS);
    }

    #[test]
    fn queue_groups_differ_by_filter() {
        assert_ne!(queue_group("g", "a/+"), queue_group("g", "a/#"));
        assert!(!queue_group("g h", "x").contains(' '));
    }
}
