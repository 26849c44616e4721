//! What every connection shares: the sessions by client id, the
//! subscriptions, the retained messages, the settings of the current
//! config, and the broker's metrics.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::codec::QoS;
use super::persist::{Journal, Op};
use super::router::{Router, Scope, Target};
use super::session::{Delivery, Message, Outgoing, Pushed, Session};
use crate::authz::Policy;
use crate::config::{MqttAuth, MqttLimits, TokenField};
use crate::identity::Authenticator;
use crate::metrics::Metrics;

/// The broker's share of the current config.
pub struct Settings {
    pub limits: MqttLimits,
    pub auth: MqttAuth,
    pub policy: Policy,
    pub authn: Authenticator,
    pub token_in: Option<TokenField>,
    pub username_claim: String,
    /// The JWT claim holding a client's own rules.
    pub acl_claim: Option<String>,
    pub sys_interval: Duration,
}

/// Messages not delivered, by reason.
pub struct Dropped {
    pub queue_full_qos0: IntCounter,
    pub queue_full: IntCounter,
    pub retained_full: IntCounter,
    pub expired: IntCounter,
    pub too_large: IntCounter,
}

pub struct MqttMetrics {
    pub connections: IntGaugeVec,
    pub connects: IntCounterVec,
    messages_in: IntCounterVec,
    messages_out: IntCounterVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    pub dropped: Dropped,
    pub auth_failures: IntCounterVec,
    pub denied: IntCounterVec,
    pub retained: IntGauge,
    pub subscriptions: IntGauge,
    pub sessions: IntGauge,
}

/// One listener's counters of every message, resolved once per connection.
pub struct ListenerCounters {
    /// By QoS (0, 1, 2).
    pub messages_in: [IntCounter; 3],
    pub messages_out: [IntCounter; 3],
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
}

impl MqttMetrics {
    pub fn listener(&self, name: &str) -> ListenerCounters {
        let by_qos =
            |family: &IntCounterVec| ["0", "1", "2"].map(|q| family.with_label_values(&[name, q]));
        ListenerCounters {
            messages_in: by_qos(&self.messages_in),
            messages_out: by_qos(&self.messages_out),
            bytes_in: self.bytes_in.with_label_values(&[name]),
            bytes_out: self.bytes_out.with_label_values(&[name]),
        }
    }
}

impl MqttMetrics {
    fn register(m: &Metrics) -> MqttMetrics {
        let gauge =
            |name: &str, help: &str| m.gauge(name, help, &[]).with_label_values(&[] as &[&str]);
        MqttMetrics {
            connections: m.gauge(
                "tollgate_mqtt_connections",
                "Connected MQTT clients by listener",
                &["listener"],
            ),
            connects: m.counter(
                "tollgate_mqtt_connects_total",
                "MQTT CONNECTs by listener and outcome (accepted | refused)",
                &["listener", "outcome"],
            ),
            messages_in: m.counter(
                "tollgate_mqtt_messages_received_total",
                "PUBLISH packets received from clients, by listener and QoS",
                &["listener", "qos"],
            ),
            messages_out: m.counter(
                "tollgate_mqtt_messages_sent_total",
                "PUBLISH packets sent to clients, by listener and QoS",
                &["listener", "qos"],
            ),
            bytes_in: m.counter(
                "tollgate_mqtt_bytes_received_total",
                "Bytes read from MQTT clients, by listener",
                &["listener"],
            ),
            bytes_out: m.counter(
                "tollgate_mqtt_bytes_sent_total",
                "Bytes written to MQTT clients, by listener",
                &["listener"],
            ),
            dropped: {
                let d = m.counter(
                    "tollgate_mqtt_messages_dropped_total",
                    "Messages not delivered, by reason (queue_full_qos0 | queue_full | retained_full | expired | too_large)",
                    &["reason"],
                );
                let r = |reason: &str| d.with_label_values(&[reason]);
                Dropped {
                    queue_full_qos0: r("queue_full_qos0"),
                    queue_full: r("queue_full"),
                    retained_full: r("retained_full"),
                    expired: r("expired"),
                    too_large: r("too_large"),
                }
            },
            auth_failures: m.counter(
                "tollgate_mqtt_auth_failures_total",
                "Refused MQTT logins by listener and reason (bad_credentials | not_authorized | rate_limited)",
                &["listener", "reason"],
            ),
            denied: m.counter(
                "tollgate_mqtt_acl_denied_total",
                "Publishes, subscriptions and wills the policy refused, by listener and action",
                &["listener", "action"],
            ),
            retained: gauge("tollgate_mqtt_retained_messages", "Retained messages held"),
            subscriptions: gauge("tollgate_mqtt_subscriptions", "Subscriptions held"),
            sessions: gauge(
                "tollgate_mqtt_sessions",
                "Sessions held (connected, and persistent ones whose client is away)",
            ),
        }
    }
}

/// Counts `$SYS` reports from.
#[derive(Default)]
pub struct Totals {
    pub received: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
    pub bytes_received: std::sync::atomic::AtomicU64,
    pub bytes_sent: std::sync::atomic::AtomicU64,
    pub connected: std::sync::atomic::AtomicU64,
}

pub struct Broker {
    pub settings: ArcSwap<Settings>,
    pub sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    pub router: RwLock<Router>,
    pub retained: RwLock<HashMap<Arc<str>, Arc<Message>>>,
    pub metrics: MqttMetrics,
    pub totals: Totals,
    pub started: Instant,
    /// Failed logins per address and per client id, for rate limiting.
    failures: moka::sync::Cache<IpAddr, u32>,
    client_failures: moka::sync::Cache<Arc<str>, u32>,
    /// Where retained messages and persistent sessions are kept (none:
    /// in memory only).
    pub journal: Option<Journal>,
    /// The other nodes (cluster mode), once the gateway joined the bus.
    pub(super) bridge: std::sync::OnceLock<Arc<super::cluster::Bridge>>,
    /// Sessions moving between nodes (cluster mode).
    pub(super) handover: std::sync::OnceLock<Arc<super::cluster::Handover>>,
}

/// What a publish did: how many sessions it was queued for, and, when it
/// had to be written down (retained, or queued for a persistent session),
/// when that is done.
pub struct Routed {
    pub sessions: usize,
    /// Sent to the other nodes too (who gets it there is not known here).
    pub bridged: bool,
    pub durable: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Failed logins from one address within [`FAILURE_WINDOW`] before the
/// next are refused unchecked.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl Broker {
    pub fn new(settings: Settings, metrics: &Metrics, journal: Option<Journal>) -> Arc<Broker> {
        Arc::new(Broker {
            journal,
            settings: ArcSwap::from_pointee(settings),
            sessions: Mutex::new(HashMap::new()),
            router: RwLock::new(Router::default()),
            retained: RwLock::new(HashMap::new()),
            metrics: MqttMetrics::register(metrics),
            totals: Totals::default(),
            started: Instant::now(),
            failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FAILURE_WINDOW)
                .build(),
            client_failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FAILURE_WINDOW)
                .build(),
            bridge: std::sync::OnceLock::new(),
            handover: std::sync::OnceLock::new(),
        })
    }

    pub fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn router_read(&self) -> std::sync::RwLockReadGuard<'_, Router> {
        self.router.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn router_write(&self) -> std::sync::RwLockWriteGuard<'_, Router> {
        self.router.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn retained_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Message>>> {
        self.retained.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether logins from `ip`, or with `client_id`, failed too often to
    /// be checked again now.
    pub fn locked_out(&self, ip: IpAddr, client_id: &Arc<str>) -> bool {
        self.failures.get(&ip).is_some_and(|n| n >= MAX_FAILURES)
            || self
                .client_failures
                .get(client_id)
                .is_some_and(|n| n >= MAX_FAILURES)
    }

    pub fn failed_login(&self, ip: IpAddr, client_id: &Arc<str>) {
        let n = self.failures.get(&ip).unwrap_or(0);
        self.failures.insert(ip, n.saturating_add(1));
        let n = self.client_failures.get(client_id).unwrap_or(0);
        self.client_failures
            .insert(client_id.clone(), n.saturating_add(1));
    }

    /// Routes a message published on this node to every matching
    /// subscription, here and (in cluster mode) on the other nodes, and
    /// keeps it when retained. Shared subscriptions of a message that went
    /// on the bus get it from there (the bus picks the node, this one
    /// included), so that each group sees it once across the nodes.
    pub fn publish(&self, message: Message) -> Routed {
        let bridged = self
            .bridge
            .get()
            .is_some_and(|bridge| bridge.send(&message));
        let scope = if bridged { Scope::Direct } else { Scope::All };
        let mut routed = self.route(Arc::new(message), scope, true);
        routed.bridged = bridged;
        routed
    }

    /// Routes a message another node published (the bus's entry point):
    /// to this node's subscriptions in `scope`, through the same queues
    /// and options as a local one. Keeping retained messages is
    /// [`Broker::retain_remote`]'s.
    pub(super) fn publish_remote(&self, message: Arc<Message>, scope: Scope<'_>) -> Routed {
        self.route(message, scope, false)
    }

    /// Keeps (or clears) a retained message another node published.
    pub(super) fn retain_remote(&self, message: &Arc<Message>) {
        // The cluster's store has it from the node that took the publish.
        let write = !self.journal.as_ref().is_some_and(Journal::shares_retained);
        self.retain(message, write);
    }

    fn route(&self, message: Arc<Message>, scope: Scope<'_>, keep: bool) -> Routed {
        let mut written = false;
        if message.retain && keep {
            written |= self.retain(&message, true);
        }
        let mut targets: Vec<Target> = Vec::new();
        self.router_read()
            .matches_in(&message.topic, message.origin, scope, &mut targets);
        let journal = self.journal.as_ref();
        // One delivery per session: the highest QoS of its matching
        // subscriptions, and every one's identifier.
        targets.sort_by_key(|t| t.session.id);
        let max_queued = self.settings.load().limits.max_queued_messages;
        let mut sent = 0;
        let mut i = 0;
        while i < targets.len() {
            let first = &targets[i];
            let mut qos = first.options.qos;
            let mut as_published = first.options.retain_as_published;
            let mut ids: Vec<usize> = first.options.id.into_iter().collect();
            let mut j = i + 1;
            while j < targets.len() && targets[j].session.id == first.session.id {
                let o = targets[j].options;
                qos = super::codec::higher(qos, o.qos);
                as_published |= o.retain_as_published;
                ids.extend(o.id);
                j += 1;
            }
            let delivery = Delivery {
                message: message.clone(),
                qos: super::codec::lower(qos, message.qos),
                retain: message.retain && as_published,
                subscription_ids: ids,
                seq: 0,
            };
            match first.session.push(delivery, max_queued, journal) {
                Pushed::Queued { persisted } => {
                    sent += 1;
                    written |= persisted;
                }
                Pushed::QueuedDroppedQos0 { persisted } => {
                    sent += 1;
                    written |= persisted;
                    self.metrics.dropped.queue_full_qos0.inc();
                }
                Pushed::Dropped => self.metrics.dropped.queue_full.inc(),
            }
            i = j;
        }
        Routed {
            sessions: sent,
            bridged: false,
            durable: journal
                .filter(|_| written && message.qos != QoS::AtMostOnce)
                .map(Journal::synced),
        }
    }

    /// Keeps (or clears) a retained message, and with `write` journals it;
    /// whether it was journaled.
    fn retain(&self, message: &Arc<Message>, write: bool) -> bool {
        let mut retained = self.retained.write().unwrap_or_else(|e| e.into_inner());
        let shared = self.journal.as_ref().is_some_and(Journal::shares_retained);
        let stored = if message.payload.is_empty() {
            // The cluster's store may hold one this node never saw.
            retained
                .remove(&message.topic)
                .map(|_| None)
                .or(shared.then_some(None))
        } else if retained.contains_key(&message.topic)
            || retained.len() < self.settings.load().limits.max_retained
        {
            retained.insert(message.topic.clone(), message.clone());
            Some(Some(message.stored()))
        } else {
            self.metrics.dropped.retained_full.inc();
            None
        };
        self.metrics.retained.set(retained.len() as i64);
        // Written while the map is locked: the journal sees changes of one
        // topic in the order the map does.
        match (stored, self.journal.as_ref().filter(|_| write)) {
            (Some(m), Some(j)) => {
                j.send(Op::Retain(message.topic.to_string(), m));
                true
            }
            _ => false,
        }
    }

    /// Retained messages matching `filter`, still unexpired.
    pub fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = Instant::now();
        self.retained_read()
            .values()
            .filter(|m| m.expires_at.is_none_or(|t| t > now))
            .filter(|m| super::topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    /// Writes a persistent session's record (expiry, subscriptions).
    pub fn persist_session(&self, session: &Session, left_at: u64) {
        let Some(j) = &self.journal else { return };
        let st = session.state();
        if st.expiry_secs == 0 {
            return;
        }
        let record = st.record(left_at);
        // Sent under the session's lock: records reach the journal in order.
        j.send(Op::Session(session.client_id.to_string(), Some(record)));
    }

    /// Ends a session whose connection left or whose expiry ran out, unless
    /// a client came back to it meanwhile (`generation` moved). Checked
    /// and removed under the `sessions` lock, which a resuming CONNECT
    /// holds while it moves the generation. Whether it ended.
    pub fn end_session(&self, session: &Arc<Session>, generation: u64) -> bool {
        {
            let mut sessions = self.sessions();
            if session.state().generation != generation || !self.unmap(&mut sessions, session) {
                return false;
            }
        }
        self.unsubscribe_all(session);
        true
    }

    /// A session a clean start replaced (the map holds the new one): its
    /// subscriptions go, and its journal record with its queue.
    pub fn forget_replaced(&self, old: &Arc<Session>) {
        self.unsubscribe_all(old);
        if let Some(j) = &self.journal {
            j.send(Op::Session(old.client_id.to_string(), None));
        }
    }

    /// Forgets a session and its subscriptions.
    pub fn drop_session(&self, session: &Arc<Session>) {
        self.unsubscribe_all(session);
        let mut sessions = self.sessions();
        self.unmap(&mut sessions, session);
    }

    /// Takes `session` out of the map (and the journal) if it is the one
    /// there; whether it was.
    fn unmap(&self, sessions: &mut HashMap<Arc<str>, Arc<Session>>, session: &Session) -> bool {
        let mapped = sessions
            .get(&session.client_id)
            .is_some_and(|s| s.id == session.id);
        if mapped {
            sessions.remove(&session.client_id);
            if let Some(j) = &self.journal {
                j.send(Op::Session(session.client_id.to_string(), None));
            }
            if let Some(h) = self.handover.get() {
                h.released(&session.client_id);
            }
        }
        self.metrics.sessions.set(sessions.len() as i64);
        mapped
    }

    fn unsubscribe_all(&self, session: &Session) {
        let subs: Vec<String> = session
            .state()
            .subscriptions
            .drain()
            .map(|(f, _)| f)
            .collect();
        let mut router = self.router_write();
        for raw in &subs {
            if let Ok(s) = super::topic::parse_subscription(raw) {
                router.unsubscribe(s.share, s.filter, session.id);
            }
        }
        self.metrics.subscriptions.set(router.len() as i64);
    }

    /// Disconnects a client (v5: 0x98, administrative action) and ends its
    /// session; whether there was one.
    pub fn kick(&self, client_id: &str) -> bool {
        let Some(session) = self.sessions().get(client_id).cloned() else {
            return false;
        };
        self.evict(&session);
        tracing::info!(client_id, "MQTT session ended by the admin API");
        true
    }

    /// Ends the sessions password users in `names` logged in (those users
    /// were changed or removed); how many.
    pub fn end_sessions_of_users(&self, names: &[String]) -> usize {
        // Not under the sessions' lock: a session's own lock is taken below.
        let all: Vec<Arc<Session>> = self.sessions().values().cloned().collect();
        let victims: Vec<Arc<Session>> = all
            .into_iter()
            .filter(|s| {
                s.state().identity.as_ref().is_some_and(|i| {
                    i.method == crate::identity::AuthMethod::Password
                        && names.iter().any(|n| *n == i.subject)
                })
            })
            .collect();
        for session in &victims {
            self.evict(session);
            tracing::info!(client_id = %session.client_id,
                "MQTT session ended: its user was changed or removed");
        }
        victims.len()
    }

    /// Disconnects a session's client (an operator's doing) and ends the
    /// session.
    fn evict(&self, session: &Arc<Session>) {
        self.end_with_client(session, true);
    }

    /// Ends a session because a client on another node took its id (a
    /// clean start, or another owner): its client is taken over.
    pub(super) fn end_taken_over(&self, session: &Arc<Session>) {
        self.end_with_client(session, false);
    }

    fn end_with_client(&self, session: &Arc<Session>, evicted: bool) {
        {
            let mut st = session.state();
            st.evicted = evicted;
            st.take_over();
        }
        self.drop_session(session);
    }

    /// `GET /admin/mqtt/sessions`.
    pub fn sessions_status(&self) -> serde_json::Value {
        let sessions: Vec<Arc<Session>> = self.sessions().values().cloned().collect();
        let list: Vec<serde_json::Value> = sessions
            .iter()
            .map(|s| {
                let st = s.state();
                let mut subs: Vec<&String> = st.subscriptions.keys().collect();
                subs.sort();
                serde_json::json!({
                    "client_id": &*s.client_id,
                    "connected": s.is_connected(),
                    "user": st.identity.as_ref().map(|i| i.subject.clone()),
                    "via": st.identity.as_ref().map(|i| i.method.as_str()),
                    "subscriptions": subs,
                    "queued": st.queue.len(),
                    "inflight": st.inflight.len(),
                    "expiry_secs": st.expiry_secs,
                })
            })
            .collect();
        serde_json::json!({ "total": list.len(), "data": list })
    }

    /// Takes in the journal's retained messages at start (unexpired ones).
    fn recover_retained(&self, retained: Vec<(String, super::persist::StoredMessage)>) {
        let now = Instant::now();
        let mut map = self.retained.write().unwrap_or_else(|e| e.into_inner());
        for (_, m) in retained {
            let m = Message::from_stored(m);
            if m.expires_at.is_none_or(|t| t > now) {
                map.entry(m.topic.clone()).or_insert_with(|| Arc::new(m));
            }
        }
        self.metrics.retained.set(map.len() as i64);
    }

    /// The cluster's store says what a topic's retained message is now
    /// (`None`: none): kept in memory as it says (its writer journaled it).
    pub(super) fn shared_retained(
        &self,
        topic: &str,
        message: Option<super::persist::StoredMessage>,
    ) {
        let mut map = self.retained.write().unwrap_or_else(|e| e.into_inner());
        match message.map(Message::from_stored) {
            None => {
                map.remove(topic);
            }
            Some(m)
                if map.contains_key(topic)
                    || map.len() < self.settings.load().limits.max_retained =>
            {
                map.insert(m.topic.clone(), Arc::new(m));
            }
            Some(_) => self.metrics.dropped.retained_full.inc(),
        }
        self.metrics.retained.set(map.len() as i64);
    }

    /// Everything the cluster's store holds, read whole: replaces this
    /// node's retained messages but its own `$` topics.
    pub(super) fn replace_shared_retained(
        &self,
        list: Vec<(String, super::persist::StoredMessage)>,
    ) {
        let now = Instant::now();
        let max = self.settings.load().limits.max_retained;
        let mut map = self.retained.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|topic, _| topic.starts_with('$'));
        for (_, m) in list {
            let m = Message::from_stored(m);
            if m.expires_at.is_none_or(|t| t > now) && map.len() < max {
                map.insert(m.topic.clone(), Arc::new(m));
            }
        }
        self.metrics.retained.set(map.len() as i64);
    }

    /// Takes in what the journal held at start: retained messages, and
    /// persistent sessions with their subscriptions, queues and QoS 2
    /// state; each session expires as it would have.
    pub fn recover(
        self: &Arc<Self>,
        retained: Vec<(String, super::persist::StoredMessage)>,
        sessions: Vec<super::persist::Recovered>,
    ) {
        self.recover_retained(retained);
        let unix_now = super::persist::now_ms() / 1000;
        let count = sessions.len();
        for r in sessions {
            let (left_at, expiry_secs) = (r.session.left_at, r.session.expiry_secs);
            let Some(session) = self.install(r) else {
                continue;
            };
            // It expires counting from when its client left (or from now,
            // for one that was connected when the broker stopped).
            let left = match left_at {
                0 => unix_now,
                t => t,
            };
            let remaining = (left + u64::from(expiry_secs)).saturating_sub(unix_now);
            let broker = self.clone();
            let generation = session.state().generation;
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(remaining)).await;
                broker.end_session(&session, generation);
            });
        }
        self.metrics.sessions.set(self.sessions().len() as i64);
        if count > 0 {
            tracing::info!(
                sessions = count,
                retained = self.retained_read().len(),
                "MQTT state recovered"
            );
        }
    }

    /// Puts a session as the journal (or another node) kept it in the map,
    /// its subscriptions in the router; none if the map holds the client
    /// id already.
    fn install(&self, r: super::persist::Recovered) -> Option<Arc<Session>> {
        let session = Session::new(Arc::from(r.client_id.as_str()));
        {
            let mut st = session.state();
            st.expiry_secs = r.session.expiry_secs;
            st.owner = r.session.owner.clone();
            for sub in &r.session.subscriptions {
                st.subscriptions.insert(sub.filter.clone(), sub.options());
            }
            for (seq, d) in r.queue {
                let (pkid, released) = (d.pkid, d.released);
                let delivery = Delivery {
                    message: Arc::new(Message::from_stored(d.message)),
                    qos: d.qos,
                    retain: d.retain,
                    subscription_ids: d.subscription_ids,
                    seq,
                };
                st.next_seq = st.next_seq.max(seq + 1);
                match (pkid, released) {
                    (0, _) => st.queue.push_back(delivery),
                    (pkid, false) => {
                        st.inflight.insert(pkid, Outgoing::Published(delivery));
                    }
                    (pkid, true) => {
                        st.inflight.insert(pkid, Outgoing::Released(seq));
                    }
                }
            }
            st.incoming_qos2.extend(r.incoming_qos2);
        }
        {
            let mut sessions = self.sessions();
            if sessions.contains_key(&session.client_id) {
                return None;
            }
            sessions.insert(session.client_id.clone(), session.clone());
            self.held(&session.client_id);
            self.metrics.sessions.set(sessions.len() as i64);
        }
        let mut router = self.router_write();
        for sub in &r.session.subscriptions {
            if let Ok(parsed) = super::topic::parse_subscription(&sub.filter) {
                router.subscribe(parsed.share, parsed.filter, session.clone(), sub.options());
            }
        }
        self.metrics.subscriptions.set(router.len() as i64);
        drop(router);
        Some(session)
    }

    /// Takes in a session another node handed over (cluster mode), unless
    /// a client of this node took the id meanwhile: routed here from now
    /// on, and its queue, what was in flight and its QoS 2 ids written to
    /// this node's journal.
    pub(super) fn adopt(&self, moved: super::persist::Recovered) -> Option<Arc<Session>> {
        let client = moved.client_id.clone();
        let session = self.install(moved)?;
        if let Some(j) = &self.journal {
            let st = session.state();
            for d in st.queue.iter() {
                if d.seq > 0 {
                    j.send(Op::Enqueue(client.clone(), d.seq, d.stored(0, false)));
                }
            }
            for (pkid, o) in &st.inflight {
                match o {
                    Outgoing::Published(d) if d.seq > 0 => {
                        j.send(Op::Enqueue(client.clone(), d.seq, d.stored(*pkid, false)))
                    }
                    Outgoing::Released(seq) if *seq > 0 => j.send(Op::Enqueue(
                        client.clone(),
                        *seq,
                        super::persist::StoredDelivery::released(*pkid),
                    )),
                    _ => {}
                }
            }
            for pkid in &st.incoming_qos2 {
                j.send(Op::Incoming(client.clone(), *pkid, true));
            }
        }
        Some(session)
    }

    /// Hands `session` to another node (cluster mode): its client is
    /// disconnected (taken over), it leaves the map and the journal (the
    /// other node has it now), and its queue, what is in flight and its
    /// QoS 2 ids are taken out and returned with its record. Its
    /// subscriptions stay in the router until [`Broker::forget_moved`],
    /// once the other node receives them too: what it queues meanwhile
    /// follows ([`Broker::take_queue`]).
    pub(super) fn hand_over(&self, session: &Arc<Session>) -> super::persist::Recovered {
        let mut sessions = self.sessions();
        let moved = {
            let mut st = session.state();
            // Moved under the `sessions` lock, as a resuming CONNECT does:
            // expiry timers and the old connection see it is no longer
            // theirs, and its will waits (the session goes on elsewhere).
            st.handed_over = true;
            st.take_over();
            session.set_connected(false);
            let mut queue: Vec<(u64, super::persist::StoredDelivery)> = Vec::new();
            for (pkid, o) in std::mem::take(&mut st.inflight) {
                queue.push(match o {
                    Outgoing::Published(d) => (d.seq, d.stored(pkid, false)),
                    Outgoing::Released(seq) => {
                        (seq, super::persist::StoredDelivery::released(pkid))
                    }
                });
            }
            queue.extend(
                st.queue
                    .take_all()
                    .into_iter()
                    .map(|d| (d.seq, d.stored(0, false))),
            );
            super::persist::Recovered {
                client_id: session.client_id.to_string(),
                session: st.record(0),
                queue,
                incoming_qos2: st.incoming_qos2.drain().collect(),
            }
        };
        self.unmap(&mut sessions, session);
        moved
    }

    /// A session handed over is received by the other node: its
    /// subscriptions here go.
    pub(super) fn forget_moved(&self, session: &Session) {
        self.unsubscribe_all(session);
    }

    /// What was queued for a session since [`Broker::hand_over`]: taken out.
    pub(super) fn take_queue(
        &self,
        session: &Session,
    ) -> Vec<(u64, super::persist::StoredDelivery)> {
        session
            .state()
            .queue
            .take_all()
            .into_iter()
            .map(|d| (d.seq, d.stored(0, false)))
            .collect()
    }

    /// The session of `client_id` is in the map now (cluster mode: this
    /// node answers for it).
    pub(super) fn held(&self, client_id: &Arc<str>) {
        if let Some(h) = self.handover.get() {
            h.held(client_id);
        }
    }
}
