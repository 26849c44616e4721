//! A client's session follows it to whichever node it connects to.
//!
//! Each node subscribes on the bus to `<prefix>.mqtt-session.<client id>`
//! for every session it holds (connected or kept for later). A CONNECT
//! for a client id this node does not hold asks that subject first: one
//! round trip, and when no node holds it NATS says "no responders" at once.
//!
//! 1. `take`: the holder disconnects its client (session taken over) and
//!    either ends the session (a clean start, or another owner: as on one
//!    node) or hands it over: subscriptions, expiry, owner, the queued and
//!    in-flight messages, the QoS 2 ids. The session leaves its map and
//!    journal, but stays subscribed, so what is published meanwhile is
//!    queued there; a node asking for it meanwhile is told to ask again.
//! 2. `release`, once the new node answers for the session and its bus
//!    subscriptions for the session's filters are in place: the holder
//!    drops the subscriptions and sends what it queued since step 1.
//!
//! So a message published while a session moves is not lost; one
//! published between the two steps may arrive twice (QoS 1 is at least
//! once; across nodes QoS 2 is too). If the taker never releases (it
//! stopped), the holder drops the session after [`ABANDONED`]. When the
//! bus is down, or the holder does not answer within [`ASK_TIMEOUT`], the
//! client starts afresh here (logged).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::super::broker::Broker;
use super::super::persist::{self, Recovered, StoredDelivery, StoredSession};
use super::super::session::{Delivery, Message, Pushed, Session};
use crate::bus::{Bus, BusError, Complaints, Incoming, NodeId, Subscription, bounded};

/// How long a connecting client waits for the node holding its session.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// A session handed over and never released is dropped after this.
const ABANDONED: Duration = Duration::from_secs(30);
/// The most a handover frame carries (NATS's default `max_payload` is
/// 1 MiB); queued messages past it are dropped, counted and logged.
const MAX_FRAME: usize = 1024 * 1024 - 16 * 1024;

const FORMAT: u8 = 1;
const TAKE: u8 = 1;
const RELEASE: u8 = 2;
const ABSENT: u8 = 0;
const ENDED: u8 = 1;
const MOVED: u8 = 2;
const TAIL: u8 = 3;
const BUSY: u8 = 4;
/// How long a node waits before asking again for a session on its way.
const BUSY_RETRY: Duration = Duration::from_millis(50);

/// This node's side of moving sessions; the broker tells it which
/// sessions it holds.
pub struct Handover {
    bus: Arc<Bus>,
    /// `<prefix>.mqtt-session`
    base: String,
    ops: mpsc::UnboundedSender<Op>,
}

enum Op {
    Held(Arc<str>),
    Released(Arc<str>),
    /// Drop a session handed over and never released (its id).
    Abandoned(Arc<str>, u64),
    /// Answered once the ops before it are done.
    Sync(oneshot::Sender<()>),
}

enum Reply {
    Absent,
    Ended,
    Moved(Recovered),
    Tail(Vec<(u64, StoredDelivery)>),
    /// On its way to another node: ask again.
    Busy,
}

impl Handover {
    /// Answers for `broker`'s sessions on `bus` until `stop`.
    pub fn start(broker: &Arc<Broker>, bus: Arc<Bus>, stop: CancellationToken) {
        let (ops, rx) = mpsc::unbounded_channel();
        let handover = Arc::new(Handover {
            base: format!("{}.mqtt-session", bus.prefix()),
            bus,
            ops,
        });
        if broker.handover.set(handover.clone()).is_err() {
            return;
        }
        // Those held before (recovered from the journal at start).
        for id in broker.sessions().keys() {
            handover.held(id);
        }
        let (tx, requests) = mpsc::channel(handover.bus.receive_queue());
        let task = Answerer {
            broker: broker.clone(),
            handover: handover.clone(),
            tx,
            subs: HashMap::new(),
            moving: HashMap::new(),
            complaints: Complaints::new("an MQTT session"),
        };
        tokio::spawn(task.run(rx, requests, stop));
    }

    /// The broker mapped a session (under its `sessions` lock, so these
    /// come in the order the map changed; one per CONNECT at most).
    pub fn held(&self, id: &Arc<str>) {
        let _ = self.ops.send(Op::Held(id.clone()));
    }

    pub fn released(&self, id: &Arc<str>) {
        let _ = self.ops.send(Op::Released(id.clone()));
    }

    fn subject(&self, client_id: &str) -> String {
        let mut s = String::with_capacity(self.base.len() + client_id.len() + 1);
        s.push_str(&self.base);
        s.push('.');
        crate::bus::subject::push_token(&mut s, client_id);
        s
    }

    fn request(&self, kind: u8, extra: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u8(FORMAT);
        b.put_u8(kind);
        b.put_u64(self.bus.node_id());
        extra(&mut b);
        b.freeze()
    }

    /// Asks the node holding `client_id`'s session for it: with `clean`,
    /// or for another `owner`, that node ends it; else it comes here. None
    /// when no node holds one (or it could not be had: logged).
    pub async fn take(
        &self,
        client_id: &str,
        clean: bool,
        owner: &(String, String),
    ) -> Option<Recovered> {
        let payload = self.request(TAKE, |b| {
            b.put_u8(u8::from(clean));
            put_str(b, &owner.0);
            put_str(b, &owner.1);
        });
        let asked = tokio::time::Instant::now();
        let reply = loop {
            let reply = self
                .bus
                .request(self.subject(client_id), payload.clone(), ASK_TIMEOUT)
                .await;
            match reply.map(|r| decode_reply(r, client_id)) {
                Ok(Some(Reply::Busy)) if asked.elapsed() < ASK_TIMEOUT => {
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                other => break other,
            }
        };
        match reply {
            Ok(Some(Reply::Moved(r))) => {
                tracing::info!(client_id, "MQTT session taken over from another node");
                Some(r)
            }
            Ok(Some(Reply::Ended)) => {
                tracing::debug!(client_id, "MQTT session on another node ended");
                None
            }
            Ok(Some(_)) => None,
            Ok(None) => {
                tracing::warn!(client_id = %bounded(client_id),
                    "MQTT session: a malformed answer from the node holding it; starting afresh here");
                None
            }
            Err(BusError::NoResponders) => None,
            Err(e) => {
                tracing::warn!(client_id = %bounded(client_id), error = %e,
                    "MQTT session: the node holding it cannot be asked; starting afresh here");
                None
            }
        }
    }

    /// Once this node receives what `session`'s filters match, asks the
    /// node that handed it over to let go, and queues what that node
    /// received for it meanwhile.
    pub fn finish(self: &Arc<Self>, broker: Arc<Broker>, session: Arc<Session>) {
        let handover = self.clone();
        tokio::spawn(async move {
            // This node answers for the session (its subscription is on
            // the server) and gets what its filters match, before the other
            // lets go.
            let (tx, rx) = oneshot::channel();
            let _ = handover.ops.send(Op::Sync(tx));
            let _ = tokio::time::timeout(ASK_TIMEOUT, async {
                let _ = rx.await;
                if let Some(bridge) = broker.bridge.get() {
                    bridge.settled().await;
                }
                let _ = handover.bus.flush().await;
            })
            .await;
            let payload = handover.request(RELEASE, |_| {});
            let subject = handover.subject(&session.client_id);
            let tail = match handover.bus.request(subject, payload, ASK_TIMEOUT).await {
                Ok(r) => match decode_reply(r, &session.client_id) {
                    Some(Reply::Tail(t)) => t,
                    _ => Vec::new(),
                },
                Err(e) => {
                    tracing::warn!(client_id = %bounded(&session.client_id), error = %e,
                        "MQTT session: the node it came from cannot be told to let go (it drops it within 30 s); messages it queued meanwhile are lost");
                    return;
                }
            };
            let current = broker
                .sessions()
                .get(&session.client_id)
                .is_some_and(|s| s.id == session.id);
            if !current {
                // Ended or taken on meanwhile: what came is not its anymore.
                return;
            }
            let max = broker.settings.load().limits.max_queued_messages;
            for (_, d) in tail {
                let delivery = Delivery {
                    message: Arc::new(Message::from_stored(d.message)),
                    qos: d.qos,
                    retain: d.retain,
                    subscription_ids: d.subscription_ids,
                    seq: 0,
                };
                match session.push(delivery, max, broker.journal.as_ref()) {
                    Pushed::Dropped => broker.metrics.dropped.queue_full.inc(),
                    Pushed::QueuedDroppedQos0 { .. } => {
                        broker.metrics.dropped.queue_full_qos0.inc()
                    }
                    Pushed::Queued { .. } => {}
                }
            }
        });
    }
}

/// The task answering other nodes for this node's sessions.
struct Answerer {
    broker: Arc<Broker>,
    handover: Arc<Handover>,
    tx: mpsc::Sender<Incoming>,
    subs: HashMap<Arc<str>, Subscription>,
    /// Handed over, not yet released: the session and the taker.
    moving: HashMap<Arc<str>, (Arc<Session>, NodeId)>,
    complaints: Complaints,
}

impl Answerer {
    async fn run(
        mut self,
        mut ops: mpsc::UnboundedReceiver<Op>,
        mut requests: mpsc::Receiver<Incoming>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                // Ops first: a request is answered with the map as it is.
                biased;
                _ = stop.cancelled() => return,
                op = ops.recv() => match op {
                    Some(op) => self.apply(op).await,
                    None => return,
                },
                m = requests.recv() => match m {
                    Some(m) => self.answer(m),
                    None => return,
                },
            }
        }
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Held(id) => {
                if self.subs.contains_key(&id) {
                    return;
                }
                let subject = self.handover.subject(&id);
                match self
                    .handover
                    .bus
                    .subscribe(subject, None, 0, self.tx.clone())
                    .await
                {
                    Ok(sub) => {
                        self.subs.insert(id, sub);
                    }
                    Err(e) => tracing::warn!(client_id = %bounded(&id), error = %e,
                        "MQTT session: other nodes cannot find it (its client starts afresh there)"),
                }
            }
            Op::Released(id) => {
                self.subs.remove(&id);
            }
            Op::Abandoned(id, session_id) => {
                if self
                    .moving
                    .get(&id)
                    .is_some_and(|(s, _)| s.id == session_id)
                    && let Some((s, _)) = self.moving.remove(&id)
                {
                    tracing::warn!(client_id = %bounded(&id),
                        "MQTT session handed over but never released by the other node: its subscriptions here end");
                    self.broker.forget_moved(&s);
                }
            }
            Op::Sync(done) => {
                let _ = done.send(());
            }
        }
    }

    fn answer(&mut self, m: Incoming) {
        let Some(reply_to) = m.reply else { return };
        let client_id = match m
            .subject
            .strip_prefix(self.handover.base.as_str())
            .and_then(|t| t.strip_prefix('.'))
            .map(|t| {
                let mut raw = Vec::new();
                crate::bus::subject::decode_token(t, &mut raw).map(|()| String::from_utf8(raw))
            }) {
            Some(Ok(Ok(id))) => id,
            _ => return self.complaints.log("not a client id", &m.subject),
        };
        let Some(request) = Request::decode(m.payload) else {
            self.handover.bus.metrics.dropped.malformed.inc();
            return self
                .complaints
                .log("a malformed session request", &m.subject);
        };
        if request.node == self.handover.bus.node_id() {
            // Our own, through a subscription on its way out (its session
            // just left here): nobody here has it. With the subscription
            // still ours, another client of this node took the id.
            if request.kind == TAKE && !self.subs.contains_key(client_id.as_str()) {
                self.reply(reply_to, &client_id, Reply::Absent);
            }
            return;
        }
        let reply = match request.kind {
            TAKE => self.take(&client_id, &request),
            _ => self.release(&client_id, request.node),
        };
        self.reply(reply_to, &client_id, reply);
    }

    fn take(&mut self, client_id: &str, request: &Request) -> Reply {
        if self.moving.contains_key(client_id) {
            return Reply::Busy;
        }
        let Some(session) = self.broker.sessions().get(client_id).cloned() else {
            return Reply::Absent;
        };
        let owned = session
            .state()
            .owner
            .as_ref()
            .is_none_or(|o| *o == request.owner);
        if request.clean || !owned {
            self.broker.end_taken_over(&session);
            return Reply::Ended;
        }
        let moved = self.broker.hand_over(&session);
        let id: Arc<str> = Arc::from(client_id);
        let session_id = session.id;
        self.moving.insert(id.clone(), (session, request.node));
        let ops = self.handover.ops.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ABANDONED).await;
            let _ = ops.send(Op::Abandoned(id, session_id));
        });
        Reply::Moved(moved)
    }

    fn release(&mut self, client_id: &str, node: NodeId) -> Reply {
        // Only the node it was handed to may end its way here.
        if self
            .moving
            .get(client_id)
            .is_none_or(|(_, taker)| *taker != node)
        {
            return Reply::Absent;
        }
        let Some((session, _)) = self.moving.remove(client_id) else {
            return Reply::Absent;
        };
        let tail = self.broker.take_queue(&session);
        self.broker.forget_moved(&session);
        tracing::debug!(client_id = %bounded(client_id), "MQTT session moved to another node");
        Reply::Tail(tail)
    }

    fn reply(&self, to: String, client_id: &str, reply: Reply) {
        let (frame, left_out) = encode_reply(&reply);
        if left_out > 0 {
            self.broker
                .metrics
                .dropped
                .too_large
                .inc_by(left_out as u64);
            tracing::warn!(client_id = %bounded(client_id), messages = left_out,
                "MQTT session moved to another node without some queued messages: over the bus's largest message");
        }
        let _ = self.handover.bus.publish(to, frame);
    }
}

struct Request {
    kind: u8,
    node: NodeId,
    clean: bool,
    owner: (String, String),
}

impl Request {
    fn decode(mut b: Bytes) -> Option<Request> {
        if b.remaining() < 10 || b.get_u8() != FORMAT {
            return None;
        }
        let kind = b.get_u8();
        let node = b.get_u64();
        match kind {
            TAKE => {
                let clean = take(&mut b, 1)?[0] != 0;
                let user = get_str(&mut b)?;
                let method = get_str(&mut b)?;
                Some(Request {
                    kind,
                    node,
                    clean,
                    owner: (user, method),
                })
            }
            RELEASE => Some(Request {
                kind,
                node,
                clean: false,
                owner: Default::default(),
            }),
            _ => None,
        }
    }
}

fn take(b: &mut Bytes, n: usize) -> Option<Bytes> {
    (b.remaining() >= n).then(|| b.split_to(n))
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u32(s.len() as u32);
    b.put_slice(s.as_bytes());
}

fn get_str(b: &mut Bytes) -> Option<String> {
    let n = take(b, 4)?.get_u32() as usize;
    String::from_utf8(take(b, n)?.to_vec()).ok()
}

/// The frame of `reply`, and how many queued messages did not fit.
fn encode_reply(reply: &Reply) -> (Bytes, usize) {
    let mut b = BytesMut::with_capacity(256);
    b.put_u8(FORMAT);
    let mut left_out = 0;
    match reply {
        Reply::Absent => b.put_u8(ABSENT),
        Reply::Ended => b.put_u8(ENDED),
        Reply::Busy => b.put_u8(BUSY),
        Reply::Moved(r) => {
            b.put_u8(MOVED);
            let record = serde_json::to_vec(&r.session).unwrap_or_default();
            b.put_u32(record.len() as u32);
            b.put_slice(&record);
            b.put_u32(r.incoming_qos2.len() as u32);
            for id in &r.incoming_qos2 {
                b.put_u16(*id);
            }
            left_out = put_deliveries(&mut b, &r.queue);
        }
        Reply::Tail(t) => {
            b.put_u8(TAIL);
            left_out = put_deliveries(&mut b, t);
        }
    }
    (b.freeze(), left_out)
}

/// As many of `items` as fit in [`MAX_FRAME`] (what is in flight comes
/// first, then the queue in order); how many did not.
fn put_deliveries(b: &mut BytesMut, items: &[(u64, StoredDelivery)]) -> usize {
    let count_at = b.len();
    b.put_u32(0);
    let mut n = 0u32;
    for (seq, d) in items {
        let one = persist::encode_delivery(d);
        if b.len() + 12 + one.len() > MAX_FRAME {
            break;
        }
        b.put_u64(*seq);
        b.put_u32(one.len() as u32);
        b.put_slice(&one);
        n += 1;
    }
    b[count_at..count_at + 4].copy_from_slice(&n.to_be_bytes());
    items.len() - n as usize
}

fn get_deliveries(b: &mut Bytes) -> Option<Vec<(u64, StoredDelivery)>> {
    let n = take(b, 4)?.get_u32() as usize;
    // Each takes at least 12 bytes: a count past that is a lie.
    if n > b.remaining() / 12 {
        return None;
    }
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = take(b, 8)?.get_u64();
        let len = take(b, 4)?.get_u32() as usize;
        let mut one = take(b, len)?;
        items.push((seq, persist::decode_delivery(&mut one)?));
    }
    Some(items)
}

fn decode_reply(mut b: Bytes, client_id: &str) -> Option<Reply> {
    if b.remaining() < 2 || b.get_u8() != FORMAT {
        return None;
    }
    Some(match b.get_u8() {
        ABSENT => Reply::Absent,
        ENDED => Reply::Ended,
        BUSY => Reply::Busy,
        MOVED => {
            let n = take(&mut b, 4)?.get_u32() as usize;
            let session: StoredSession = serde_json::from_slice(&take(&mut b, n)?).ok()?;
            let n = take(&mut b, 4)?.get_u32() as usize;
            if n > b.remaining() / 2 {
                return None;
            }
            let incoming_qos2 = (0..n).map(|_| b.get_u16()).collect();
            let queue = get_deliveries(&mut b)?;
            Reply::Moved(Recovered {
                client_id: client_id.to_owned(),
                session,
                queue,
                incoming_qos2,
            })
        }
        TAIL => Reply::Tail(get_deliveries(&mut b)?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::codec::QoS;
    use super::*;

    fn delivery(n: u8) -> StoredDelivery {
        StoredDelivery {
            message: persist::StoredMessage {
                topic: "a/b".into(),
                payload: Bytes::from(vec![n; 1000]),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: None,
                expires_at_ms: None,
            },
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![7],
            pkid: u16::from(n),
            released: false,
        }
    }

    #[test]
    fn a_session_survives_the_frame() {
        let moved = Recovered {
            client_id: "c".into(),
            session: StoredSession {
                expiry_secs: 60,
                left_at: 0,
                subscriptions: vec![persist::StoredSubscription {
                    filter: "a/#".into(),
                    qos: 1,
                    no_local: false,
                    retain_as_published: true,
                    id: Some(7),
                }],
                owner: Some(("u".into(), "password".into())),
            },
            queue: vec![(3, delivery(1)), (0, StoredDelivery::released(9))],
            incoming_qos2: vec![4, 5],
        };
        let (frame, left_out) = encode_reply(&Reply::Moved(moved));
        assert_eq!(left_out, 0);
        let Some(Reply::Moved(back)) = decode_reply(frame.clone(), "c") else {
            panic!("not moved");
        };
        assert_eq!(back.session.subscriptions[0].filter, "a/#");
        assert_eq!(back.session.owner, Some(("u".into(), "password".into())));
        assert_eq!(back.incoming_qos2, [4, 5]);
        assert_eq!(back.queue[0], (3, delivery(1)));
        assert!(back.queue[1].1.released);
        // Every cut of it is refused, never a panic.
        for n in 0..frame.len() {
            let _ = decode_reply(frame.slice(..n), "c");
        }
        assert!(decode_reply(Bytes::from_static(b"\x01\x03\xff\xff\xff\xff"), "c").is_none());
    }

    #[test]
    fn a_queue_over_the_frame_is_cut() {
        let items: Vec<_> = (0..2000u32)
            .map(|i| (u64::from(i) + 1, delivery(i as u8)))
            .collect();
        let (frame, left_out) = encode_reply(&Reply::Tail(items));
        assert!(frame.len() <= MAX_FRAME);
        assert!(left_out > 0 && left_out < 2000);
        let Some(Reply::Tail(back)) = decode_reply(frame, "c") else {
            panic!("not a tail");
        };
        assert_eq!(back.len() + left_out, 2000);
        assert_eq!(back[0].0, 1);
    }

    #[test]
    fn requests_are_checked() {
        assert!(Request::decode(Bytes::from_static(b"\x01\x01")).is_none());
        let mut b = BytesMut::new();
        b.put_u8(FORMAT);
        b.put_u8(TAKE);
        b.put_u64(9);
        b.put_u8(0);
        put_str(&mut b, "user");
        put_str(&mut b, "jwt");
        let r = Request::decode(b.clone().freeze()).unwrap();
        assert_eq!((r.node, r.clean), (9, false));
        assert_eq!(r.owner, ("user".into(), "jwt".into()));
        b.truncate(b.len() - 1);
        assert!(Request::decode(b.freeze()).is_none());
    }
}
