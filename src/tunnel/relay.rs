//! One relay (a `tunnels[]` entry): its rooms, one per id, and the loop
//! each peer's connection runs. A message a peer sends goes to every other
//! peer of its room through their outbound queues, which are bounded in
//! bytes: a sender waits while a receiver's queue is full (the sender's
//! own socket then stops being read: backpressure reaches the client), and
//! a receiver whose queue stays full for `stall_timeout` is disconnected.
//! While it waits a peer still writes what is queued for it, so two peers
//! sending to each other never wait on each other.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use super::envelope::{self, Envelope, MessageId};
use super::{RelayMetrics, Settings};
use crate::config::EnvelopeMode;
use crate::identity::Identity;
use crate::transport::websocket::{self, WebSocket};
use crate::transport::{CarriedResponse, CarryError, ConnState};

/// How long a peer's last close may take to write.
const FAREWELL: Duration = Duration::from_secs(2);
/// Requests one room remembers while they wait for a REST:RESPONSE from
/// another peer (envelope mode); the oldest is forgotten past it.
const TRACKED_REQUESTS: usize = 1024;
/// Queued messages a peer writes in one go.
const WRITE_BATCH: usize = 64;
/// What a queued message costs besides its bytes.
const MESSAGE_OVERHEAD: usize = 128;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A relay: its settings (replaced on reload) and its rooms.
pub struct Relay {
    pub settings: ArcSwap<Settings>,
    pub metrics: RelayMetrics,
    rooms: Mutex<HashMap<Box<str>, Arc<Room>>>,
    /// Ends every peer when the relay is removed from the config.
    pub removed: CancellationToken,
}

/// The peers on one id.
pub struct Room {
    pub id: Box<str>,
    /// Copy-on-write: the relay path reads it without a lock.
    peers: ArcSwap<Vec<Arc<Peer>>>,
    waiting: Mutex<Waiting>,
    /// HTTP requests carried to this room that wait for an answer.
    gateway_waiting: AtomicUsize,
    /// Whether the gateway ever carried a request here; until it has,
    /// nothing a peer sends is parsed for an answer.
    carried: AtomicBool,
}

#[derive(Default)]
struct Waiting {
    /// The gateway's requests: message id → who it went to, who waits.
    gateway: HashMap<MessageId, GatewayRequest>,
    /// Requests between peers (envelope mode): message id → the asker, or
    /// `None` when several peers asked with that id (its answer then goes
    /// to every peer, as without tracking).
    asked: HashMap<MessageId, Asked>,
    /// Tracked requests oldest first, with the `Asked::tracked` they were
    /// tracked under (an entry whose request was answered is skipped).
    asked_order: VecDeque<(MessageId, u64)>,
    tracked: u64,
}

struct Asked {
    asker: Option<u64>,
    tracked: u64,
}

struct GatewayRequest {
    /// Serials of the peers it went to that are still there.
    sent_to: Vec<u64>,
    answer: oneshot::Sender<Result<CarriedResponse, CarryError>>,
}

/// A message on its way to a peer; `cost` is what it holds of the peer's
/// queue, given back once written.
pub struct Outgoing {
    message: Message,
    cost: u32,
}

/// A connected peer, as the others see it.
pub struct Peer {
    pub serial: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Free bytes of its outbound queue.
    budget: Arc<Semaphore>,
    capacity: u32,
    /// Ends it; `farewell` says how.
    stop: CancellationToken,
    farewell: Mutex<Option<CloseFrame>>,
    pub identity: Arc<Identity>,
    pub conn: Arc<ConnState>,
    pub joined: SystemTime,
    pub hello: Mutex<Option<(String, String)>>,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    slow: prometheus::IntCounter,
    put_out: AtomicBool,
}

impl Peer {
    /// Ends the peer with a close frame (the first reason given wins).
    pub fn end(&self, code: CloseCode, reason: &str) {
        let mut f = lock(&self.farewell);
        if f.is_none() {
            *f = Some(CloseFrame {
                code,
                reason: reason.to_owned().into(),
            });
        }
        drop(f);
        self.stop.cancel();
    }

    /// Ends a peer that does not keep up, counted once however many
    /// notice it.
    fn put_out_as_slow(&self, reason: &str) {
        if !self.stop.is_cancelled() && !self.put_out.swap(true, Ordering::Relaxed) {
            self.slow.inc();
            self.end(CloseCode::Policy, reason);
        }
    }

    /// What a message holds of the queue: its bytes and what queueing it
    /// takes (so a flood of empty messages is bounded too).
    fn cost(&self, len: usize) -> u32 {
        u32::try_from(len.saturating_add(MESSAGE_OVERHEAD))
            .unwrap_or(u32::MAX)
            .min(self.capacity)
    }

    /// Queues `message` if its queue has room now.
    fn try_queue(&self, message: &Message, len: usize) -> bool {
        let cost = self.cost(len);
        match self.budget.try_acquire_many(cost) {
            Ok(permit) => {
                permit.forget();
                self.push(message.clone(), cost);
                true
            }
            Err(_) => false,
        }
    }

    /// Queues `message`, waiting until `deadline` for room. When `blame`,
    /// a peer whose queue is still full then is ended as too slow (a
    /// deadline that is someone else's, an HTTP request's, blames nobody).
    async fn queue(
        &self,
        message: Message,
        len: usize,
        deadline: tokio::time::Instant,
        blame: bool,
    ) -> bool {
        let cost = self.cost(len);
        let room = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.budget.acquire_many(cost)) => r,
            // Ended meanwhile (or gone: its budget is closed then).
            _ = self.stop.cancelled() => return false,
        };
        match room {
            Ok(Ok(permit)) => {
                permit.forget();
                self.push(message, cost);
                true
            }
            Ok(Err(_)) => false,
            Err(_) if !blame => false,
            Err(_) => {
                self.put_out_as_slow("too slow: its queue stayed full");
                false
            }
        }
    }

    fn push(&self, message: Message, cost: u32) {
        if self.tx.send(Outgoing { message, cost }).is_err() {
            self.budget.add_permits(cost as usize);
        } else {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queued regardless of room (a close: it holds nothing).
    fn push_close(&self, frame: Option<CloseFrame>) {
        let _ = self.tx.send(Outgoing {
            message: Message::Close(frame),
            cost: 0,
        });
    }
}

/// Why a join was refused.
pub enum Refused {
    Full(usize),
    /// The policy (reloaded since the handshake) no longer lets it in.
    Denied,
}

impl Relay {
    /// A relay whose peers end when `stop` is cancelled (the gateway
    /// stops) or the relay is removed.
    pub fn new(settings: Settings, metrics: RelayMetrics, stop: &CancellationToken) -> Relay {
        Relay {
            settings: ArcSwap::from_pointee(settings),
            metrics,
            rooms: Mutex::new(HashMap::new()),
            removed: stop.child_token(),
        }
    }

    pub fn room(&self, id: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).get(id).cloned()
    }

    pub fn rooms(&self) -> Vec<Arc<Room>> {
        lock(&self.rooms).values().cloned().collect()
    }

    /// Whether a peer with this certificate could join `id` now.
    pub fn has_room_for(&self, id: &str, cert_sha256: &str) -> Result<(), Refused> {
        let max = self.settings.load().max_peers;
        match self.room(id) {
            Some(room) => room.place_for(max, cert_sha256).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Adds a peer to `id`'s room: the room and, when the room was full,
    /// the peer of the same certificate it replaces.
    fn join(&self, id: &str, peer: Arc<Peer>) -> Result<(Arc<Room>, Option<Arc<Peer>>), Refused> {
        let mut rooms = lock(&self.rooms);
        // Read under the rooms' lock: a reload's re-check of the peers
        // (which takes it too) cannot miss one that passed the old policy.
        let settings = self.settings.load();
        let max = settings.max_peers;
        if !settings.may_join(&peer.identity, id) {
            return Err(Refused::Denied);
        }
        let room = rooms
            .entry(id.into())
            .or_insert_with(|| {
                Arc::new(Room {
                    id: id.into(),
                    peers: ArcSwap::from_pointee(Vec::new()),
                    waiting: Mutex::new(Waiting::default()),
                    gateway_waiting: AtomicUsize::new(0),
                    carried: AtomicBool::new(false),
                })
            })
            .clone();
        let cert = peer
            .conn
            .peer_cert
            .as_ref()
            .map(|c| c.sha256.as_str())
            .unwrap_or_default();
        let replaced = match room.place_for(max, cert) {
            Ok(replaced) => replaced,
            Err(refused) => {
                if room.peers.load().is_empty() {
                    rooms.remove(id);
                }
                return Err(refused);
            }
        };
        let mut peers: Vec<Arc<Peer>> = room
            .peers
            .load()
            .iter()
            .filter(|p| replaced.as_ref().is_none_or(|r| r.serial != p.serial))
            .cloned()
            .collect();
        peers.push(peer);
        room.peers.store(Arc::new(peers));
        Ok((room, replaced))
    }

    /// Takes a peer out of its room (the room goes when it is empty and
    /// nothing waits on it); requests only it could answer fail.
    fn leave(&self, room: &Arc<Room>, serial: u64) {
        let mut rooms = lock(&self.rooms);
        let peers: Vec<Arc<Peer>> = room
            .peers
            .load()
            .iter()
            .filter(|p| p.serial != serial)
            .cloned()
            .collect();
        let empty = peers.is_empty();
        room.peers.store(Arc::new(peers));
        let mut waiting = lock(&room.waiting);
        waiting.asked.retain(|_, a| a.asker != Some(serial));
        let orphaned: Vec<MessageId> = waiting
            .gateway
            .iter_mut()
            .filter_map(|(id, r)| {
                r.sent_to.retain(|s| *s != serial);
                r.sent_to.is_empty().then(|| id.clone())
            })
            .collect();
        for id in orphaned {
            if let Some(r) = waiting.gateway.remove(&id) {
                room.gateway_waiting.fetch_sub(1, Ordering::Relaxed);
                let _ = r
                    .answer
                    .send(Err(CarryError::PeerLeft(room.id.to_string())));
            }
        }
        if empty
            && waiting.gateway.is_empty()
            && rooms.get(&room.id).is_some_and(|r| Arc::ptr_eq(r, room))
        {
            rooms.remove(&room.id);
        }
    }

    /// Ends the peers the join policy no longer lets in (after a reload).
    pub fn recheck(&self) {
        let settings = self.settings.load();
        for room in self.rooms() {
            for p in room.peers.load().iter() {
                if !settings.may_join(&p.identity, &room.id) {
                    tracing::info!(prefix = %settings.prefix, id = %room.id, peer = %p.conn.peer,
                        "tunnel peer no longer allowed on its id after a reload");
                    p.end(CloseCode::Policy, "no longer allowed on this tunnel");
                }
            }
        }
    }

    /// Carries an HTTP request to the peers of `id` as a REST:REQUEST and
    /// waits for the REST:RESPONSE that answers it.
    pub async fn carry(
        &self,
        id: &str,
        message_id: String,
        text: String,
        timeout: Duration,
    ) -> Result<CarriedResponse, CarryError> {
        let settings = self.settings.load_full();
        let no_peer = || CarryError::NoPeer(id.to_owned());
        let room = self.room(id).ok_or_else(no_peer)?;
        if text.len() > settings.max_message {
            return Err(CarryError::TooLarge {
                limit: settings.max_message,
            });
        }
        let key = MessageId(message_id);
        let (answer, answered) = oneshot::channel();
        let peers = {
            let mut waiting = lock(&room.waiting);
            // Read under the lock `leave` takes after it changes the list:
            // a peer leaving now either is not among these or fails this
            // request when it goes.
            let peers = room.peers.load_full();
            if peers.is_empty() {
                return Err(no_peer());
            }
            if waiting.gateway.len() >= settings.max_pending_requests {
                return Err(CarryError::Busy(id.to_owned()));
            }
            waiting.gateway.insert(
                key.clone(),
                GatewayRequest {
                    sent_to: peers.iter().map(|p| p.serial).collect(),
                    answer,
                },
            );
            room.gateway_waiting.fetch_add(1, Ordering::Relaxed);
            room.carried.store(true, Ordering::Relaxed);
            peers
        };
        // Whatever happens next (the caller gone included), the request
        // stops waiting.
        let _forget = Forget {
            relay: self,
            room: &room,
            key: &key,
        };
        let len = text.len();
        let message = Message::Text(text.into());
        let deadline = tokio::time::Instant::now() + timeout;
        for p in peers.iter() {
            if !p.try_queue(&message, len) {
                // A peer still full after stall_timeout is too slow; the
                // request's own deadline coming first blames nobody.
                let stall = tokio::time::Instant::now() + settings.stall_timeout;
                p.queue(message.clone(), len, stall.min(deadline), stall <= deadline)
                    .await;
            }
        }
        match tokio::time::timeout_at(deadline, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CarryError::PeerLeft(id.to_owned())),
            Err(_) => Err(CarryError::Timeout {
                id: id.to_owned(),
                timeout,
            }),
        }
    }

    /// Everything about the rooms, for the admin API.
    pub fn status(&self) -> Value {
        let settings = self.settings.load();
        let mut rooms: Vec<Value> = self
            .rooms()
            .iter()
            .map(|room| {
                let peers: Vec<Value> = room
                    .peers
                    .load()
                    .iter()
                    .map(|p| {
                        let cert = p.conn.peer_cert.as_deref();
                        let hello = lock(&p.hello).clone();
                        json!({
                            "serial": p.serial,
                            "peer": p.conn.peer.to_string(),
                            "listener": &*p.conn.listener.name,
                            "cert_cn": cert.and_then(|c| c.cn.as_deref()),
                            "cert_o": cert.map(|c| c.o.clone()).unwrap_or_default(),
                            "cert_sha256": cert.map(|c| c.sha256.as_str()),
                            "joined_unix": p.joined.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                            "peer_class": hello.as_ref().map(|h| h.0.as_str()),
                            "peer_id": hello.as_ref().map(|h| h.1.as_str()),
                            "messages_received": p.received.load(Ordering::Relaxed),
                            "messages_sent": p.sent.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                json!({
                    "id": &*room.id,
                    "peers": peers,
                    "waiting_http_requests": room.gateway_waiting.load(Ordering::Relaxed),
                })
            })
            .collect();
        rooms.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        json!({
            "prefix": settings.prefix,
            "envelope": match settings.envelope { EnvelopeMode::None => "none", EnvelopeMode::Micronets => "micronets" },
            "max_peers": settings.max_peers,
            "ids": rooms,
        })
    }
}

/// Takes a carried request out of its room's waiting list when dropped.
struct Forget<'a> {
    relay: &'a Relay,
    room: &'a Arc<Room>,
    key: &'a MessageId,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut waiting = lock(&self.room.waiting);
        if waiting.gateway.remove(self.key).is_some() {
            self.room.gateway_waiting.fetch_sub(1, Ordering::Relaxed);
        }
        let idle = waiting.gateway.is_empty() && self.room.peers.load().is_empty();
        drop(waiting);
        if idle {
            let mut rooms = lock(&self.relay.rooms);
            if rooms
                .get(&self.room.id)
                .is_some_and(|r| Arc::ptr_eq(r, self.room) && r.peers.load().is_empty())
            {
                rooms.remove(&self.room.id);
            }
        }
    }
}

impl Room {
    /// Whether one more peer fits, or which peer of the same certificate
    /// it replaces when the room is full.
    fn place_for(&self, max: usize, cert_sha256: &str) -> Result<Option<Arc<Peer>>, Refused> {
        let peers = self.peers.load();
        if peers.len() < max {
            return Ok(None);
        }
        peers
            .iter()
            .find(|p| {
                !cert_sha256.is_empty()
                    && p.conn
                        .peer_cert
                        .as_ref()
                        .is_some_and(|c| c.sha256 == cert_sha256)
            })
            .cloned()
            .map(Some)
            .ok_or(Refused::Full(max))
    }

    /// Hands a REST:RESPONSE from peer `from` to the carried request it
    /// answers, when that request went to `from`; `false` when it answers
    /// none of the gateway's.
    fn answer_gateway(&self, env: &Envelope, from: u64, prefix: &str) -> bool {
        let Some(key) = &env.in_response_to else {
            return false;
        };
        let request = {
            let mut waiting = lock(&self.waiting);
            match waiting.gateway.get(key) {
                Some(r) if r.sent_to.contains(&from) => waiting.gateway.remove(key),
                _ => None,
            }
        };
        let Some(request) = request else {
            return false;
        };
        self.gateway_waiting.fetch_sub(1, Ordering::Relaxed);
        let result = env.response().map_err(|why| {
            let shown: String = why.chars().take(200).collect();
            tracing::warn!(prefix, id = %self.id, error = %shown, "unusable REST:RESPONSE on a tunnel");
            CarryError::BadAnswer {
                id: self.id.to_string(),
                why,
            }
        });
        let _ = request.answer.send(result);
        true
    }
}

/// The peer side of one connection, after its `101`.
pub struct Connection {
    pub relay: Arc<Relay>,
    pub id: String,
    pub identity: Arc<Identity>,
    pub conn: Arc<ConnState>,
    pub serial: u64,
    pub shutdown: CancellationToken,
}

/// A message of this peer's that waits for room in other peers' queues.
struct Delivery {
    message: Message,
    len: usize,
    to: Vec<Arc<Peer>>,
    /// When the first of `to` is given up on as too slow.
    deadline: tokio::time::Instant,
}

impl Connection {
    pub async fn run(self, mut ws: WebSocket) {
        let settings = self.relay.settings.load_full();
        let metrics = self.relay.metrics.clone();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let capacity = u32::try_from(settings.queue.max(1)).unwrap_or(u32::MAX);
        let peer = Arc::new(Peer {
            serial: self.serial,
            tx,
            budget: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            // Cancelled too when the relay is removed or the gateway stops.
            stop: self.relay.removed.child_token(),
            farewell: Mutex::new(None),
            identity: self.identity.clone(),
            conn: self.conn.clone(),
            joined: SystemTime::now(),
            hello: Mutex::new(None),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            slow: self.relay.metrics.slow.clone(),
            put_out: AtomicBool::new(false),
        });
        let cert = self.conn.peer_cert.clone();
        let (room, replaced) = match self.relay.join(&self.id, peer.clone()) {
            Ok(joined) => joined,
            Err(refused) => {
                // Lost a race for the last place, or a reload's policy
                // refuses it, since the handshake.
                let frame = match refused {
                    Refused::Full(max) => {
                        metrics.refused_full.inc();
                        close_frame(CloseCode::Again, &format!("tunnel is full ({max} peers)"))
                    }
                    Refused::Denied => {
                        metrics.denied.inc();
                        close_frame(CloseCode::Policy, "not allowed on this tunnel")
                    }
                };
                websocket::close(&mut ws, Some(frame)).await;
                return;
            }
        };
        if let Some(old) = &replaced {
            old.end(
                CloseCode::Policy,
                "replaced by a new connection with the same certificate",
            );
            metrics.replaced.inc();
        }
        metrics.joined.inc();
        metrics.peers.inc();
        let started = Instant::now();
        tracing::info!(prefix = %settings.prefix, id = %self.id, serial = self.serial,
            peer = %self.conn.peer, listener = %self.conn.listener.name,
            cert_cn = cert.as_ref().and_then(|c| c.cn.as_deref()).unwrap_or(""),
            cert_o = %cert.as_ref().map(|c| c.o.join(",")).unwrap_or_default(),
            cert_sha256 = cert.as_ref().map(|c| c.sha256.as_str()).unwrap_or(""),
            peers = room.peers.load().len(), "tunnel peer joined");

        let tick_every = settings.ping_interval.min(settings.idle_timeout);
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + tick_every, tick_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = 0u64;
        let mut quiet_since = Instant::now();
        let mut received = 0u64;
        let mut delivery: Option<Delivery> = None;
        let mut handled: u32 = 0;
        let envelope_mode = settings.envelope == EnvelopeMode::Micronets;
        let stop = peer.stop.clone();

        let end = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break self.ended(&peer),
                out = rx.recv() => {
                    let Some(first) = out else { break self.ended(&peer) };
                    let written = write_queued(&mut ws, first, &mut rx, &peer);
                    match guarded(written, &stop, settings.stall_timeout).await {
                        Ok(Written::Ok) => {}
                        Ok(Written::Closed(frame)) => break End::Close("closed by the other peer", frame),
                        Ok(Written::Failed) => break End::Lost("connection lost while writing"),
                        Err(Cut::Ended) => break self.ended(&peer),
                        Err(Cut::Stalled) => break too_slow(&peer),
                    }
                }
                done = deliver(delivery.as_mut()), if delivery.is_some() => {
                    if done {
                        delivery = None;
                    }
                }
                _ = ticks.tick() => {
                    if received != last_seen {
                        last_seen = received;
                        quiet_since = Instant::now();
                    } else if quiet_since.elapsed() >= settings.idle_timeout {
                        break End::Close("idle", Some(close_frame(CloseCode::Away, "idle for too long")));
                    } else {
                        match guarded(ws.send(Message::Ping(Bytes::new())), &stop, settings.stall_timeout).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break End::Lost("connection lost while writing"),
                            Err(Cut::Ended) => break self.ended(&peer),
                            Err(Cut::Stalled) => break too_slow(&peer),
                        }
                    }
                }
                incoming = ws.next(), if delivery.is_none() => {
                    received = received.wrapping_add(1);
                    let message = match incoming {
                        None => break End::Lost("connection lost"),
                        Some(Err(e)) => break read_error(&e),
                        Some(Ok(m)) => m,
                    };
                    let len = match &message {
                        Message::Text(t) => t.len(),
                        Message::Binary(b) => b.len(),
                        Message::Close(frame) => {
                            let frame = frame.clone();
                            // tungstenite answers the close as we read on.
                            let _ = tokio::time::timeout(FAREWELL, ws.next()).await;
                            if settings.close_propagates {
                                for p in room.peers.load().iter().filter(|p| p.serial != self.serial) {
                                    p.push_close(frame.clone());
                                }
                            }
                            break End::PeerClosed;
                        }
                        // Pings are answered by tungstenite; they and pongs
                        // only show the peer is there.
                        _ => continue,
                    };
                    peer.received.fetch_add(1, Ordering::Relaxed);
                    metrics.bytes.inc_by(len as u64);
                    if let Some(to) = self.route(&room, &peer, &message, envelope_mode, &settings.prefix) {
                        // Queued at once where there is room (no allocation);
                        // the peers whose queues are full wait their turn.
                        let mut full = Vec::new();
                        for p in room.peers.load().iter() {
                            let wanted = match to {
                                To::Others => p.serial != self.serial,
                                To::One(serial) => p.serial == serial,
                            };
                            if wanted && !p.try_queue(&message, len) {
                                full.push(p.clone());
                            }
                        }
                        if !full.is_empty() {
                            delivery = Some(Delivery {
                                message,
                                len,
                                to: full,
                                deadline: tokio::time::Instant::now() + settings.stall_timeout,
                            });
                        }
                        metrics.relayed.inc();
                    }
                    // A burst read at once must not fill every other
                    // peer's queue before their tasks run.
                    handled = handled.wrapping_add(1);
                    if handled % 16 == 0 {
                        crate::transport::after_ready_tasks().await;
                    }
                }
            }
        };

        self.relay.leave(&room, self.serial);
        // Senders waiting for room in its queue stop waiting.
        peer.budget.close();
        metrics.peers.dec();
        let why = match end {
            End::PeerClosed => {
                websocket::finish(&mut ws).await;
                "closed by the peer"
            }
            End::Lost(why) => {
                if settings.close_propagates {
                    // Dropped without a close: the others' pipe is broken too.
                    let frame =
                        close_frame(CloseCode::Away, "the other peer's connection was lost");
                    for p in room.peers.load().iter() {
                        p.push_close(Some(frame.clone()));
                    }
                }
                why
            }
            End::Close(why, frame) => {
                websocket::close(&mut ws, frame).await;
                why
            }
        };
        tracing::info!(prefix = %settings.prefix, id = %self.id, serial = self.serial,
            peer = %self.conn.peer, reason = why,
            received = peer.received.load(Ordering::Relaxed), sent = peer.sent.load(Ordering::Relaxed),
            seconds = started.elapsed().as_secs(), "tunnel peer left");
    }

    /// How a peer the relay ended leaves: the gateway stops, the peer was
    /// put out (`farewell` says why), or its relay was removed.
    fn ended(&self, peer: &Peer) -> End {
        if self.shutdown.is_cancelled() {
            return End::Close(
                "shutdown",
                Some(close_frame(CloseCode::Away, "the gateway is shutting down")),
            );
        }
        if let Some(frame) = lock(&peer.farewell).take() {
            return End::Close("ended by the relay", Some(frame));
        }
        if self.relay.removed.is_cancelled() {
            return End::Close(
                "tunnel removed",
                Some(close_frame(
                    CloseCode::Away,
                    "this tunnel is no longer served",
                )),
            );
        }
        End::Close("ended by the relay", None)
    }

    /// Who a message goes to: every other peer, or one (a REST:RESPONSE to
    /// a peer's request), or nobody (it answered the gateway, or it was
    /// malformed and its sender told so).
    fn route(
        &self,
        room: &Arc<Room>,
        peer: &Arc<Peer>,
        message: &Message,
        envelope_mode: bool,
        prefix: &str,
    ) -> Option<To> {
        let gateway_waits = room.gateway_waiting.load(Ordering::Relaxed) > 0;
        // A room the gateway has carried requests to has its messages read
        // for answers, late ones included.
        if !envelope_mode && !gateway_waits && !room.carried.load(Ordering::Relaxed) {
            return Some(To::Others);
        }
        let parsed = match message {
            Message::Text(t) => Envelope::parse(t.as_bytes()).and_then(|env| {
                if envelope_mode && env.message_type == envelope::MALFORMED {
                    return Err(format!("{} is the relay's own", envelope::MALFORMED));
                }
                Ok(env)
            }),
            _ => Err("a binary message is not an envelope".into()),
        };
        let env = match parsed {
            Ok(env) => env,
            Err(why) if envelope_mode => {
                self.relay.metrics.malformed.inc();
                tracing::debug!(prefix, id = %room.id, peer = %self.conn.peer, error = %why,
                    "malformed tunnel message not relayed");
                let in_response_to = match message {
                    Message::Text(t) => serde_json::from_slice::<Value>(t.as_bytes())
                        .ok()
                        .and_then(|v| v.pointer("/message/messageId").cloned())
                        .and_then(|v| match v {
                            Value::String(s) => Some(MessageId(s)),
                            Value::Number(n) => Some(MessageId(n.to_string())),
                            _ => None,
                        }),
                    _ => None,
                };
                let reply = envelope::malformed(
                    &json!(format!("tollgate-e{}", self.serial)),
                    in_response_to.as_ref(),
                    &why,
                );
                let len = reply.len();
                // Bounded like anything else queued for it.
                if !peer.try_queue(&Message::Text(reply.into()), len) {
                    peer.end(CloseCode::Policy, "too slow: its queue stayed full");
                }
                return None;
            }
            Err(_) => return Some(To::Others),
        };
        if env.message_type == envelope::REST_RESPONSE {
            if gateway_waits && room.answer_gateway(&env, self.serial, prefix) {
                return None;
            }
            // An answer to one of the gateway's requests that came late (or
            // twice, or from a peer it did not go to) is nobody's business.
            if env
                .in_response_to
                .as_ref()
                .is_some_and(|r| r.0.starts_with(super::GATEWAY_IDS))
            {
                return None;
            }
            if envelope_mode && let Some(key) = &env.in_response_to {
                let mut waiting = lock(&room.waiting);
                match waiting.asked.remove(key).map(|a| a.asker) {
                    Some(Some(asker)) => return Some(To::One(asker)),
                    Some(None) => return Some(To::Others),
                    None => {}
                }
            }
        }
        if envelope_mode {
            if let Some(hello) = env.hello() {
                *lock(&peer.hello) = Some(hello);
            }
            if env.message_type == envelope::REST_REQUEST
                && env.requires_response
                && let Some(id) = env.message_id
            {
                let waiting = &mut *lock(&room.waiting);
                match waiting.asked.get_mut(&id) {
                    Some(a) if a.asker != Some(self.serial) => a.asker = None,
                    Some(_) => {}
                    None => {
                        waiting.tracked += 1;
                        let tracked = waiting.tracked;
                        waiting.asked.insert(
                            id.clone(),
                            Asked {
                                asker: Some(self.serial),
                                tracked,
                            },
                        );
                        waiting.asked_order.push_back((id, tracked));
                    }
                }
                while waiting.asked_order.len() > TRACKED_REQUESTS {
                    if let Some((old, tracked)) = waiting.asked_order.pop_front()
                        && waiting
                            .asked
                            .get(&old)
                            .is_some_and(|a| a.tracked == tracked)
                    {
                        waiting.asked.remove(&old);
                    }
                }
            }
        }
        Some(To::Others)
    }
}

/// Whom a peer's message goes to.
#[derive(Clone, Copy)]
enum To {
    /// Every other peer on its id.
    Others,
    /// The peer of this serial (the asker of a request it answers).
    One(u64),
}

/// How a peer's connection ended.
enum End {
    /// It sent a close (answered, and passed on to the others when
    /// closes propagate).
    PeerClosed,
    /// Its connection broke without a close.
    Lost(&'static str),
    /// The relay ends it, with this close.
    Close(&'static str, Option<CloseFrame>),
}

fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }
}

fn read_error(e: &tokio_tungstenite::tungstenite::Error) -> End {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::error::CapacityError;
    let (why, code, reason) = match e {
        Error::Capacity(CapacityError::MessageTooLong { .. }) => (
            "message too large",
            CloseCode::Size,
            "message larger than the tunnel's max_message",
        ),
        Error::Protocol(_) => (
            "protocol violation",
            CloseCode::Protocol,
            "protocol violation",
        ),
        Error::Utf8(_) => (
            "invalid UTF-8",
            CloseCode::Invalid,
            "a text message must be UTF-8",
        ),
        _ => return End::Lost("connection lost"),
    };
    End::Close(why, Some(close_frame(code, reason)))
}

/// Waits for room for `d` in the queues of the peers it still goes to;
/// `true` when it is queued everywhere (or given up on where a peer was
/// too slow).
async fn deliver(d: Option<&mut Delivery>) -> bool {
    let Some(d) = d else {
        return std::future::pending().await;
    };
    // One deadline for the whole delivery: a sender waits on its slow
    // receivers together, not one stall_timeout after another.
    if let Some(p) = d.to.first().cloned() {
        p.queue(d.message.clone(), d.len, d.deadline, true).await;
        d.to.remove(0);
    }
    d.to.retain(|p| !p.try_queue(&d.message, d.len));
    d.to.is_empty()
}

enum Written {
    Ok,
    /// Another peer's close: written, and the connection ends.
    Closed(Option<CloseFrame>),
    Failed,
}

/// Writes a queued message and what else is queued (up to a batch) in
/// one write, unless the peer is ended first.
async fn write_queued(
    ws: &mut WebSocket,
    first: Outgoing,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    peer: &Peer,
) -> Written {
    let mut next = Some(first);
    let mut n = 0;
    while let Some(out) = next.take() {
        if let Message::Close(frame) = out.message {
            if ws.flush().await.is_err() {
                return Written::Failed;
            }
            return Written::Closed(frame);
        }
        let fed = ws.feed(out.message).await;
        peer.budget.add_permits(out.cost as usize);
        if fed.is_err() {
            return Written::Failed;
        }
        n += 1;
        if n < WRITE_BATCH {
            next = rx.try_recv().ok();
        }
    }
    match ws.flush().await {
        Ok(()) => Written::Ok,
        Err(_) => Written::Failed,
    }
}

/// Why a write was cut short.
enum Cut {
    /// The peer was ended meanwhile.
    Ended,
    /// It made no progress for `stall_timeout`: the peer stopped reading.
    Stalled,
}

/// A write to a peer's socket, cut short when the peer is ended or the
/// write takes longer than `stall` (what is written at once is at most
/// its queue, so a peer that reads at all finishes well within it).
async fn guarded<T>(
    write: impl Future<Output = T>,
    stop: &CancellationToken,
    stall: Duration,
) -> Result<T, Cut> {
    tokio::select! {
        w = tokio::time::timeout(stall, write) => w.map_err(|_| Cut::Stalled),
        _ = stop.cancelled() => Err(Cut::Ended),
    }
}

/// A peer put out for not reading what is written to it.
fn too_slow(peer: &Peer) -> End {
    peer.put_out_as_slow("too slow: stopped reading");
    End::Close("too slow: a write stalled", lock(&peer.farewell).take())
}
