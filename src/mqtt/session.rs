//! A client's session: what outlives a connection when the client asked
//! for it (clean start off, or a v5 session expiry): its subscriptions,
//! the messages waiting for it, the QoS 1 and 2 messages sent but not yet
//! acknowledged (sent again, DUP, when it comes back), and the QoS 2
//! packet ids it published whose release has not come.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::Notify;

use super::codec::QoS;
use super::persist::{Journal, Op};
use super::router::SubOptions;

/// A message as the broker routes it.
#[derive(Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 properties, without topic alias and subscription identifiers
    /// (those belong to one hop).
    pub properties: Option<PublishProperties>,
    /// When the message expiry interval runs out.
    pub expires_at: Option<Instant>,
    /// The session that published it (no-local).
    pub origin: u64,
}

/// A message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<usize>,
    /// Its place in the session's journal (0: not persisted).
    pub seq: u64,
}

impl Message {
    /// As the journal stores it.
    pub fn stored(&self) -> super::persist::StoredMessage {
        super::persist::StoredMessage {
            topic: self.topic.to_string(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.clone(),
            expires_at_ms: self.expires_at.map(|t| {
                super::persist::now_ms()
                    + t.saturating_duration_since(Instant::now()).as_millis() as u64
            }),
        }
    }

    /// From the journal, with `origin` 0 (a publisher of before the restart).
    pub fn from_stored(m: super::persist::StoredMessage) -> Message {
        let now = super::persist::now_ms();
        Message {
            topic: Arc::from(m.topic),
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
            properties: m.properties,
            expires_at: m.expires_at_ms.map(|at| {
                Instant::now() + std::time::Duration::from_millis(at.saturating_sub(now))
            }),
            origin: 0,
        }
    }
}

impl Delivery {
    pub fn stored(&self, pkid: u16, released: bool) -> super::persist::StoredDelivery {
        super::persist::StoredDelivery {
            message: self.message.stored(),
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
            pkid,
            released,
        }
    }
}

/// Where a QoS 1 or 2 message sent to the client stands.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Sent; PUBACK (QoS 1) or PUBREC (QoS 2) awaited.
    Published(Delivery),
    /// QoS 2: PUBREC came, PUBREL sent; PUBCOMP awaited. Its journal
    /// sequence (0: not persisted).
    Released(u64),
}

/// The deliveries waiting for a session, with how many are QoS 0: a full
/// queue makes room by dropping its oldest QoS 0 delivery, and one full of
/// QoS 1/2 deliveries (a slow subscriber) must not be searched for one on
/// every message it is offered.
#[derive(Default)]
pub struct Queue {
    items: VecDeque<Delivery>,
    qos0: usize,
}

impl Queue {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn front(&self) -> Option<&Delivery> {
        self.items.front()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Delivery> {
        self.items.iter()
    }

    fn counted(&mut self, d: &Delivery, added: bool) {
        if d.qos == QoS::AtMostOnce {
            match added {
                true => self.qos0 += 1,
                false => self.qos0 -= 1,
            }
        }
    }

    pub fn push_back(&mut self, d: Delivery) {
        self.counted(&d, true);
        self.items.push_back(d);
    }

    pub fn push_front(&mut self, d: Delivery) {
        self.counted(&d, true);
        self.items.push_front(d);
    }

    pub fn pop_front(&mut self) -> Option<Delivery> {
        let d = self.items.pop_front()?;
        self.counted(&d, false);
        Some(d)
    }

    /// Takes every delivery out, in order.
    pub fn take_all(&mut self) -> VecDeque<Delivery> {
        self.qos0 = 0;
        std::mem::take(&mut self.items)
    }

    /// Drops the oldest QoS 0 delivery; whether there was one.
    fn drop_oldest_qos0(&mut self) -> bool {
        if self.qos0 == 0 {
            return false;
        }
        match self.items.iter().position(|d| d.qos == QoS::AtMostOnce) {
            Some(i) => {
                self.items.remove(i);
                self.qos0 -= 1;
                true
            }
            None => false,
        }
    }
}

pub struct SessionState {
    pub queue: Queue,
    pub inflight: BTreeMap<u16, Outgoing>,
    next_pkid: u16,
    /// Raw filter (with `$share/…`) -> options.
    pub subscriptions: HashMap<String, SubOptions>,
    /// QoS 2 ids the client published and we acknowledged with PUBREC.
    pub incoming_qos2: HashSet<u16>,
    /// Kept after the last connection ends (seconds; 0: ends with it).
    pub expiry_secs: u32,
    /// Counts connections, so a will or expiry timer can tell whether the
    /// client came back meanwhile.
    pub generation: u64,
    /// Tells the connection attached now that a newer one took over.
    pub kick: Option<Arc<Notify>>,
    /// Who attached last (reloaded rules are checked against it).
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// Whose session it is: the user and how it authenticated. Only they
    /// resume it (kept in the journal, so across restarts too).
    pub owner: Option<(String, String)>,
    /// The next journal sequence of a persisted delivery.
    pub next_seq: u64,
    /// Ended by an operator (the admin API), not by a newer connection.
    pub evicted: bool,
    /// Handed to another node (cluster mode): it goes on there.
    pub handed_over: bool,
}

impl SessionState {
    /// Its record as the journal keeps it (`left_at`: Unix seconds its
    /// client left, 0 while connected).
    pub fn record(&self, left_at: u64) -> super::persist::StoredSession {
        super::persist::StoredSession {
            expiry_secs: self.expiry_secs,
            left_at,
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(f, o)| super::persist::StoredSubscription::new(f, o))
                .collect(),
            owner: self.owner.clone(),
        }
    }

    /// Ends whatever the attached connection does with this session: the
    /// generation moves (its connection, will and expiry timer see it is
    /// no longer theirs) and the connection is told to go.
    pub fn take_over(&mut self) {
        self.generation += 1;
        if let Some(k) = self.kick.take() {
            k.notify_one();
        }
    }

    /// A packet id not in flight (1..=65535).
    pub fn next_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return Some(self.next_pkid);
            }
        }
        None
    }
}

pub struct Session {
    /// Unique in the process.
    pub id: u64,
    pub client_id: Arc<str>,
    state: Mutex<SessionState>,
    /// A delivery was queued.
    pub wake: Notify,
    connected: AtomicBool,
}

/// What `Session::push` did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued (and written to the journal, for a persistent session).
    Queued { persisted: bool },
    /// Queued, and an older QoS 0 message was dropped to make room.
    QueuedDroppedQos0 { persisted: bool },
    /// The queue was full of QoS 1/2 messages: this one was dropped.
    Dropped,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Session {
    pub fn new(client_id: Arc<str>) -> Arc<Session> {
        Session::with_id(NEXT_ID.fetch_add(1, Ordering::Relaxed), client_id)
    }

    fn with_id(id: u64, client_id: Arc<str>) -> Arc<Session> {
        Arc::new(Session {
            id,
            client_id,
            state: Mutex::new(SessionState {
                queue: Queue::default(),
                inflight: BTreeMap::new(),
                next_pkid: 0,
                subscriptions: HashMap::new(),
                incoming_qos2: HashSet::new(),
                expiry_secs: 0,
                generation: 0,
                kick: None,
                identity: None,
                owner: None,
                next_seq: 1,
                evicted: false,
                handed_over: false,
            }),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
        })
    }

    pub fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn identity(&self) -> Option<Arc<crate::identity::Identity>> {
        self.state().identity.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Queues a delivery within `max` queued messages. Past it, an older
    /// QoS 0 message makes room; without one, a QoS 0 delivery is dropped,
    /// and so is a QoS 1/2 one (counted by the caller).
    pub fn push(&self, mut delivery: Delivery, max: usize, journal: Option<&Journal>) -> Pushed {
        let mut state = self.state();
        let mut dropped_qos0 = false;
        if state.queue.len() >= max {
            if !state.queue.drop_oldest_qos0() {
                return Pushed::Dropped;
            }
            dropped_qos0 = true;
        }
        // A persistent session's QoS 1/2 messages go to the journal.
        let mut persisted = false;
        if let Some(j) = journal
            && state.expiry_secs > 0
            && delivery.qos != QoS::AtMostOnce
        {
            persisted = true;
            delivery.seq = state.next_seq;
            state.next_seq += 1;
            j.send(Op::Enqueue(
                self.client_id.to_string(),
                delivery.seq,
                delivery.stored(0, false),
            ));
        }
        state.queue.push_back(delivery);
        drop(state);
        self.wake.notify_one();
        match dropped_qos0 {
            true => Pushed::QueuedDroppedQos0 { persisted },
            false => Pushed::Queued { persisted },
        }
    }

    #[cfg(test)]
    pub fn for_test(id: u64) -> Arc<Session> {
        Session::with_id(id, Arc::from(format!("c{id}")))
    }

    #[cfg(test)]
    pub fn set_connected_for_test(&self, c: bool) {
        self.set_connected(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(qos: QoS, n: u8) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: Arc::from("t"),
                payload: Bytes::from(vec![n]),
                qos,
                retain: false,
                properties: None,
                expires_at: None,
                origin: 0,
            }),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            seq: 0,
        }
    }

    #[test]
    fn a_full_queue_drops_qos0_first() {
        let s = Session::for_test(1);
        assert_eq!(
            s.push(delivery(QoS::AtMostOnce, 0), 2, None),
            Pushed::Queued { persisted: false }
        );
        assert_eq!(
            s.push(delivery(QoS::AtLeastOnce, 1), 2, None),
            Pushed::Queued { persisted: false }
        );
        assert_eq!(
            s.push(delivery(QoS::AtLeastOnce, 2), 2, None),
            Pushed::QueuedDroppedQos0 { persisted: false }
        );
        assert_eq!(
            s.push(delivery(QoS::AtMostOnce, 3), 2, None),
            Pushed::Dropped
        );
        assert_eq!(
            s.push(delivery(QoS::ExactlyOnce, 4), 2, None),
            Pushed::Dropped
        );
        let kept: Vec<u8> = s
            .state()
            .queue
            .iter()
            .map(|d| d.message.payload[0])
            .collect();
        assert_eq!(kept, [1, 2]);
    }

    #[test]
    fn the_queue_counts_its_qos0_deliveries() {
        let mut q = Queue::default();
        q.push_back(delivery(QoS::AtLeastOnce, 0));
        q.push_back(delivery(QoS::AtMostOnce, 1));
        q.push_front(delivery(QoS::AtMostOnce, 2));
        assert_eq!(q.qos0, 2);
        assert_eq!(q.pop_front().map(|d| d.message.payload[0]), Some(2));
        assert_eq!(q.qos0, 1);
        assert!(q.drop_oldest_qos0());
        assert_eq!((q.qos0, q.len()), (0, 1));
        assert!(!q.drop_oldest_qos0(), "only QoS 1 left");
        q.push_back(delivery(QoS::AtMostOnce, 3));
        assert_eq!(q.take_all().len(), 2);
        assert_eq!((q.qos0, q.len()), (0, 0));
    }
}
