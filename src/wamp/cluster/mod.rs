//! WAMP across the nodes of a cluster, over the bus. Realms are configured
//! alike on every node; what crosses is framed by [`wire`].
//!
//! - Events: a publication accepted here is delivered here, and sent once
//!   to `<prefix>.wamp.<realm>.event`, which every node subscribes to;
//!   the others deliver it to their subscribers through the same matching
//!   and black/white lists (`exclude_me` concerns the publisher's node
//!   only). `wamp.` meta events stay on their node.
//! - Calls: each node subscribes, per exact registration it holds, to
//!   `<prefix>.wamp.<realm>.proc.<uri>` in the queue group of that name.
//!   A call with no `single` callee here is handed over as a bus request;
//!   NATS picks one node of the group (this one included), which picks its
//!   callee by the registration's policy and answers "accepted" at once.
//!   Results, progressive results and errors go to the caller's node's
//!   inbox `<prefix>.wamp.node.<id>`, cancels to the callee's node's.
//!   Across nodes the spread is random per node; round robin (or first,
//!   last, random) within a node. Prefix and wildcard registrations serve
//!   their own node only (they answer when no node has an exact one), and
//!   `single` is unique per node.
//! - No hangs: every node says it is alive on `<prefix>.wamp.nodes` each
//!   second; calls handed to a node not heard from for [`LOST_AFTER`] (or
//!   while the bus is down) fail with `tollgate.error.node_lost`, and calls
//!   served for such a node's callers end (their callees are interrupted).

pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::broker::{Delivery, FILTERS};
use super::dealer::{CallRequest, Caller, NODE_LOST, call_here, no_such_procedure};
use super::message::Id;
use super::router::{Realm, Router};
use super::value::{Dict, Value};
use crate::bus::{
    Bus, BusError, Complaints, Incoming, KindCounters, NodeId, Subscription, bounded,
};
use wire::Frame;

/// A node not heard from for this long is taken for lost.
pub const LOST_AFTER: Duration = Duration::from_secs(3);
/// How often a node says it is alive (and checks on the others).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a node may take to accept a call handed to it.
const HANDOFF: Duration = Duration::from_secs(5);
/// The largest message sent between nodes: NATS's default `max_payload`
/// (1 MiB) less room for its headers.
const MAX_FRAME: usize = (1 << 20) - 4096;
/// At most this many other nodes are remembered.
const MAX_PEERS: usize = 4096;
/// The error of a call that needs another node while the bus is down.
pub const UNAVAILABLE: &str = "tollgate.error.cluster_unavailable";

/// The router's place for the bus: empty until [`join_bus`]; shared by
/// every realm.
#[derive(Default)]
pub struct Slot {
    link: OnceLock<Arc<Link>>,
    /// (realm, uri) of exact registrations that came or went.
    dirty: Mutex<HashSet<(Arc<str>, String)>>,
    notify: Notify,
}

impl Slot {
    pub fn link(&self) -> Option<&Arc<Link>> {
        self.link.get()
    }

    /// An exact registration of `uri` came or went: the node offers it
    /// on the bus, or stops.
    pub fn offer(&self, realm: &Arc<str>, uri: &str) {
        if self.link.get().is_none() {
            return;
        }
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((realm.clone(), uri.to_owned()));
        self.notify.notify_one();
    }
}

/// This node on the bus.
pub struct Link {
    bus: Arc<Bus>,
    node: NodeId,
    /// `<prefix>.wamp`
    base: String,
    counters: KindCounters,
    /// Other nodes: when each was last heard from.
    peers: Mutex<HashMap<NodeId, Instant>>,
}

/// `text` as one subject token; a long one as its digest, so that every
/// subject stays well under the bus's limit.
fn bounded_token(text: &str) -> String {
    let t = crate::bus::subject::token(text);
    if t.len() <= 200 {
        return t;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    // `%%` starts no token of the plain spelling.
    let mut out = String::from("%%");
    for b in &digest.as_ref()[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

impl Link {
    fn event_subject(&self, realm: &str) -> String {
        format!("{}.{}.event", self.base, bounded_token(realm))
    }

    fn proc_subject(&self, realm: &str, uri: &str) -> String {
        format!(
            "{}.{}.proc.{}",
            self.base,
            bounded_token(realm),
            bounded_token(uri)
        )
    }

    fn inbox(&self, node: NodeId) -> String {
        format!("{}.node.{node:016x}", self.base)
    }

    fn send(&self, subject: String, frame: &Frame) {
        if self
            .bus
            .publish(subject, wire::encode(self.node, frame))
            .is_ok()
        {
            self.counters.sent.inc();
        }
    }

    /// To another node's inbox (a call's answer, a cancel). A final
    /// answer too large for the bus becomes an error, so that the caller
    /// never waits for an answer that cannot arrive.
    pub fn send_to(&self, node: NodeId, frame: &Frame) {
        let mut bytes = wire::encode(self.node, frame);
        if bytes.len() > MAX_FRAME {
            bytes = match frame {
                Frame::Result {
                    realm,
                    call,
                    progress: false,
                    ..
                }
                | Frame::Error { realm, call, .. } => wire::encode(
                    self.node,
                    &Frame::Error {
                        realm: realm.clone(),
                        call: *call,
                        error: "wamp.error.payload_size_exceeded".into(),
                        args: Some(Value::List(vec![Value::Str(format!(
                            "the answer is larger than the {MAX_FRAME} bytes that cross nodes"
                        ))])),
                        kwargs: None,
                    },
                ),
                _ => {
                    self.bus.metrics.dropped.too_large.inc();
                    return;
                }
            };
        }
        if self.bus.publish(self.inbox(node), bytes).is_ok() {
            self.counters.sent.inc();
        }
    }

    /// Sends a publication accepted here to the other nodes.
    pub fn send_event(&self, realm: &str, d: &Delivery<'_>) {
        if d.topic.starts_with("wamp.") {
            return;
        }
        let filters: Dict = FILTERS
            .iter()
            .filter_map(|k| d.options.get(*k).map(|v| ((*k).to_owned(), v.clone())))
            .collect();
        let frame = Frame::Event {
            realm: realm.to_owned(),
            topic: d.topic.to_owned(),
            publication: d.publication,
            publisher: d
                .disclosed
                .map(|(id, authid, authrole)| (id, authid.to_owned(), authrole.to_owned())),
            filters,
            args: d.args.clone(),
            kwargs: d.kwargs.clone(),
        };
        self.send(self.event_subject(realm), &frame);
    }

    pub fn connected(&self) -> bool {
        self.bus.connected()
    }

    /// Hands a session's call, noted with `RealmState::forward` as `call`,
    /// to whichever node NATS picks; answers come to the inbox. Nobody
    /// anywhere: a callee here serves it, or the caller is told at once.
    pub fn hand_off(self: &Arc<Self>, realm: &Arc<Realm>, call: u64, out: Outbound) {
        let (link, realm) = (self.clone(), realm.clone());
        tokio::spawn(async move {
            let timeout = out
                .options
                .get("timeout")
                .and_then(Value::as_id)
                .unwrap_or(0);
            let frame = Frame::Call {
                realm: realm.name.to_string(),
                call,
                procedure: out.procedure,
                caller: out.disclose,
                progress: matches!(out.options.get("receive_progress"), Some(Value::Bool(true))),
                timeout,
                args: out.args,
                kwargs: out.kwargs,
            };
            let bytes = wire::encode(link.node, &frame);
            let Frame::Call {
                procedure,
                caller,
                args,
                kwargs,
                ..
            } = frame
            else {
                return;
            };
            let subject = link.proc_subject(&realm.name, &procedure);
            let answer = link.bus.request(subject, bytes, HANDOFF).await;
            match answer {
                Ok(reply) => match wire::decode(&reply) {
                    Ok((node, Frame::Accepted)) => {
                        link.counters.received.inc();
                        link.heard(node);
                        realm.state().forward_accepted(call, node);
                    }
                    Ok((_, Frame::Refused { error, message })) => {
                        link.counters.received.inc();
                        realm.state().forward_failed(call, &error, message);
                    }
                    _ => {
                        link.bus.metrics.dropped.malformed.inc();
                        realm.state().forward_failed(
                            call,
                            NODE_LOST,
                            "the node that took the call did not accept it".into(),
                        );
                    }
                },
                Err(e @ (BusError::NoResponders | BusError::Disconnected)) => {
                    let Some((session, request)) = realm.state().take_forwarded(call) else {
                        return;
                    };
                    let refusal = match (out.here, e) {
                        (true, _) => call_here(
                            &realm,
                            CallRequest {
                                caller: Caller::Session {
                                    id: session,
                                    request,
                                },
                                procedure: &procedure,
                                options: &out.options,
                                disclose: caller.as_ref().map(|(id, authid, authrole)| {
                                    (*id, authid.as_str(), authrole.as_str())
                                }),
                                args,
                                kwargs,
                            },
                            timeout,
                        ),
                        (false, BusError::NoResponders) => {
                            Some(no_such_procedure(request, &procedure))
                        }
                        (false, _) => Some(unavailable(request)),
                    };
                    if let Some(m) = refusal {
                        let mut state = realm.state();
                        if !out.here {
                            state.metrics.call_errors.inc();
                        }
                        state.send(session, m);
                    }
                }
                Err(e) => realm.state().forward_failed(
                    call,
                    NODE_LOST,
                    format!("the call could not be handed to another node: {e}"),
                ),
            }
        });
    }

    fn heard(&self, node: NodeId) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() < MAX_PEERS || peers.contains_key(&node) {
            peers.insert(node, Instant::now());
        }
    }
}

/// A session's call on its way to another node.
pub struct Outbound {
    pub procedure: String,
    pub options: Dict,
    pub disclose: Option<wire::Who>,
    pub args: Option<Value>,
    pub kwargs: Option<Value>,
    /// A callee here may serve it when no other node does.
    pub here: bool,
}

/// The ERROR of a call that needs another node while the bus is down.
pub fn unavailable(request: Id) -> super::Message {
    super::router::error_with(
        super::message::CALL,
        request,
        UNAVAILABLE,
        "no callee on this node, and the bus to the other nodes is down".into(),
    )
}

/// Puts `router` on `bus`: publications and calls reach the other nodes,
/// and theirs reach this node's sessions, until `stop`.
pub fn join_bus(router: &Arc<Router>, bus: Arc<Bus>, stop: CancellationToken) {
    let link = Arc::new(Link {
        node: bus.node_id(),
        base: format!("{}.wamp", bus.prefix()),
        counters: bus.metrics.kind("wamp"),
        peers: Mutex::default(),
        bus: bus.clone(),
    });
    if router.cluster.link.set(link.clone()).is_err() {
        return;
    }
    // Exact registrations made before now.
    for realm in router.realms.load().values() {
        let state = realm.state();
        for r in state.dealer.registrations.entries.values() {
            if r.policy == crate::authz::MatchPolicy::Exact {
                router.cluster.offer(&realm.name, &r.uri);
            }
        }
    }
    let (tx, rx) = mpsc::channel(bus.receive_queue());
    let dispatcher = Dispatcher {
        router: router.clone(),
        link,
        tx,
        procs: HashMap::new(),
        tags: HashMap::new(),
        next_tag: TAG_PROCS,
        fixed: Vec::new(),
        confirmed: false,
        complaints: Complaints::new("a WAMP"),
    };
    tokio::spawn(dispatcher.run(rx, stop));
}

const TAG_EVENTS: u64 = 0;
const TAG_INBOX: u64 = 1;
const TAG_NODES: u64 = 2;
const TAG_PROCS: u64 = 3;

/// The one task that keeps this node's bus subscriptions in step with its
/// exact registrations, handles what comes in, and keeps the heartbeat.
struct Dispatcher {
    router: Arc<Router>,
    link: Arc<Link>,
    tx: mpsc::Sender<Incoming>,
    procs: HashMap<(Arc<str>, String), (u64, Subscription)>,
    tags: HashMap<u64, (Arc<str>, String)>,
    next_tag: u64,
    /// Events, the inbox and heartbeats.
    fixed: Vec<Subscription>,
    /// The server has every subscription made so far.
    confirmed: bool,
    complaints: Complaints,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Incoming>, stop: CancellationToken) {
        let base = &self.link.base;
        for (subject, tag) in [
            (format!("{base}.*.event"), TAG_EVENTS),
            (self.link.inbox(self.link.node), TAG_INBOX),
            (format!("{base}.nodes"), TAG_NODES),
        ] {
            match self
                .link
                .bus
                .subscribe(subject, None, tag, self.tx.clone())
                .await
            {
                Ok(s) => self.fixed.push(s),
                Err(e) => {
                    tracing::warn!(error = %e, "WAMP cannot subscribe on the bus: it serves this node only")
                }
            }
        }
        self.settle().await;
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.router.cluster.notify.notified() => self.settle().await,
                _ = tick.tick() => self.tick().await,
                m = rx.recv() => match m {
                    Some(m) => self.handle(m),
                    None => return,
                },
            }
        }
    }

    /// Subscribes to the procedures of exact registrations that came and
    /// leaves those that went.
    async fn settle(&mut self) {
        let dirty: Vec<(Arc<str>, String)> = std::mem::take(
            &mut *self
                .router
                .cluster
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
        .into_iter()
        .collect();
        for key in dirty {
            let wanted = self.router.realm(&key.0).is_some_and(|r| {
                (r.state().dealer.registrations)
                    .lookup(&key.1, crate::authz::MatchPolicy::Exact)
                    .is_some()
            });
            match (wanted, self.procs.contains_key(&key)) {
                (true, false) => {
                    let subject = self.link.proc_subject(&key.0, &key.1);
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    let sub = self
                        .link
                        .bus
                        .subscribe(subject.clone(), Some(subject), tag, self.tx.clone())
                        .await;
                    match sub {
                        Ok(sub) => {
                            self.tags.insert(tag, key.clone());
                            self.procs.insert(key, (tag, sub));
                            self.confirmed = false;
                        }
                        Err(e) => {
                            tracing::warn!(realm = %key.0, procedure = %bounded(&key.1), error = %e,
                                "a WAMP registration cannot be offered to the other nodes: it serves this node only")
                        }
                    }
                }
                (false, true) => {
                    if let Some((tag, sub)) = self.procs.remove(&key) {
                        self.tags.remove(&tag);
                        drop(sub);
                    }
                }
                _ => {}
            }
        }
        self.confirm().await;
    }

    /// Once the server has the subscriptions made so far, the gauge says
    /// how many there are.
    async fn confirm(&mut self) {
        if !self.confirmed && self.link.bus.connected() && self.link.bus.flush().await.is_ok() {
            self.confirmed = true;
        }
        if self.confirmed {
            let n = self.fixed.len() + self.procs.len();
            self.router.families.bus_subscriptions.set(n as i64);
        }
    }

    /// Says this node is alive; fails calls on nodes that are not.
    async fn tick(&mut self) {
        self.confirm().await;
        let realms = self.router.realms.load();
        if !self.link.bus.connected() {
            let failed: usize = realms
                .values()
                .map(|r| {
                    r.state()
                        .fail_forwarded(|_| true, "the bus to the other nodes is down")
                })
                .sum();
            if failed > 0 {
                tracing::warn!(
                    calls = failed,
                    "WAMP calls waiting on other nodes failed: the bus is down"
                );
            }
            return;
        }
        self.link
            .send(format!("{}.nodes", self.link.base), &Frame::Heartbeat);
        let (alive, lost) = {
            let mut peers = self.link.peers.lock().unwrap_or_else(|e| e.into_inner());
            let mut lost = Vec::new();
            peers.retain(|node, at| {
                let keep = at.elapsed() < LOST_AFTER;
                if !keep {
                    lost.push(*node);
                }
                keep
            });
            let mut alive: HashSet<NodeId> = peers.keys().copied().collect();
            alive.insert(self.link.node);
            (alive, lost)
        };
        for realm in realms.values() {
            let mut state = realm.state();
            let failed = state.fail_forwarded(
                |n| n.is_some_and(|n| !alive.contains(&n)),
                "the node serving the call was lost (not heard from for 3 seconds)",
            );
            state.drop_calls_from(|n| !alive.contains(&n));
            if failed > 0 {
                tracing::warn!(realm = %realm.name, calls = failed,
                    "WAMP calls failed: the node serving them was lost");
            }
        }
        for node in lost {
            tracing::info!(node = %format_args!("{node:016x}"),
                "WAMP: a node was not heard from for {}s: taken for lost", LOST_AFTER.as_secs());
        }
    }

    fn malformed(&mut self, why: &'static str, subject: &str) {
        self.link.bus.metrics.dropped.malformed.inc();
        self.complaints.log(why, subject);
    }

    fn handle(&mut self, m: Incoming) {
        // Answers are let through whatever their size (a dropped one would
        // leave its caller waiting); NATS bounds them.
        let max = self.router.settings.load().max_message;
        if m.tag != TAG_INBOX && m.payload.len() > max.saturating_add(4096) {
            self.link.bus.metrics.dropped.too_large.inc();
            return self
                .complaints
                .log("larger than wamp.max_message_size", &m.subject);
        }
        let (origin, frame) = match wire::decode(&m.payload) {
            Ok(f) => f,
            Err(why) => return self.malformed(why, &m.subject),
        };
        // Its own events and heartbeats come back; its own calls and
        // answers are real (its queue subscription may be the one picked).
        if origin == self.link.node && matches!(m.tag, TAG_EVENTS | TAG_NODES) {
            return;
        }
        self.link.counters.received.inc();
        match (m.tag, frame) {
            (TAG_NODES, Frame::Heartbeat) => self.link.heard(origin),
            (
                TAG_EVENTS,
                Frame::Event {
                    realm,
                    topic,
                    publication,
                    publisher,
                    filters,
                    args,
                    kwargs,
                },
            ) => {
                if topic.is_empty() || topic.len() > 1024 || topic.starts_with("wamp.") {
                    return self.malformed("a topic no client may publish to", &m.subject);
                }
                if m.subject != self.link.event_subject(&realm) {
                    return self.malformed("an event under another realm's subject", &m.subject);
                }
                let Some(r) = self.router.realm(&realm) else {
                    return;
                };
                r.state().publish(&Delivery {
                    topic: &topic,
                    publication,
                    publisher: None,
                    options: &filters,
                    disclosed: publisher
                        .as_ref()
                        .map(|(id, authid, authrole)| (*id, authid.as_str(), authrole.as_str())),
                    args,
                    kwargs,
                });
            }
            (TAG_INBOX, f @ (Frame::Result { .. } | Frame::Error { .. })) => {
                self.link.heard(origin);
                let (realm, call) = match &f {
                    Frame::Result { realm, call, .. } | Frame::Error { realm, call, .. } => {
                        (realm.clone(), *call)
                    }
                    _ => return,
                };
                if let Some(r) = self.router.realm(&realm) {
                    r.state().forward_answered(call, origin, f);
                }
            }
            (TAG_INBOX, Frame::Cancel { realm, call, mode }) => {
                if let Some(r) = self.router.realm(&realm) {
                    r.state().cancel_remote(origin, call, mode);
                }
            }
            (
                tag,
                Frame::Call {
                    realm,
                    call,
                    procedure,
                    caller,
                    progress,
                    timeout,
                    args,
                    kwargs,
                },
            ) if tag >= TAG_PROCS => {
                let Some(reply) = m.reply else {
                    return self.malformed("a call without a reply subject", &m.subject);
                };
                // None: withdrawn meanwhile (the caller is told so).
                let offered = self.tags.get(&tag);
                if offered.is_some_and(|(r, uri)| **r != *realm || *uri != procedure) {
                    return self.malformed("a call under another procedure's subject", &m.subject);
                }
                let offered = offered.is_some();
                let options = Dict::from([("receive_progress".into(), Value::Bool(progress))]);
                let realm = self.router.realm(&realm).filter(|_| offered);
                let placed = realm.map(|r| {
                    let placed = r.state().call(CallRequest {
                        caller: Caller::Remote { node: origin, call },
                        procedure: &procedure,
                        options: &options,
                        disclose: caller.as_ref().map(|(id, authid, authrole)| {
                            (*id, authid.as_str(), authrole.as_str())
                        }),
                        args,
                        kwargs,
                    });
                    (r, placed)
                });
                let answer = match placed {
                    Some((r, Ok(invocation))) => {
                        self.link.heard(origin);
                        super::dealer::arm_timeout(&r, invocation, timeout);
                        Frame::Accepted
                    }
                    _ => Frame::Refused {
                        error: "wamp.error.no_such_procedure".into(),
                        message: format!(
                            "no callee registered procedure `{}`",
                            bounded(&procedure)
                        ),
                    },
                };
                self.link.send(reply, &answer);
            }
            _ => self.malformed("a kind of message that does not belong there", &m.subject),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_stay_short_and_apart() {
        assert_eq!(bounded_token("com.test.echo"), "com%2Etest%2Eecho");
        let long = "a.".repeat(600);
        let t = bounded_token(&long);
        assert!(t.starts_with("%%") && t.len() == 34, "{t}");
        assert_ne!(t, bounded_token(&format!("{long}b")));
        assert!(!t.contains(['.', '*', '>', ' ']));
    }
}
