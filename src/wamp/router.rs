//! Realms and what happens in them: the sessions joined, subscriptions and
//! registrations (broker.rs, dealer.rs), calls in progress, and the meta
//! events that tell about them. Realms share nothing: a session sees only
//! its own realm's. A realm's state sits behind one lock, taken briefly and
//! never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::broker::Broker;
use super::dealer::Dealer;
use super::message::{self as m, Id, Message};
use super::settings::{RealmRules, Role, Settings};
use super::value::{Dict, Value};
use crate::authz::{MatchPolicy, WampVerb};
use crate::metrics::Metrics;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

/// How the router ends a session from its side (a kill, a full queue):
/// the token wakes the session's task, which sends the farewell if its
/// client still reads, and closes.
#[derive(Default)]
pub struct Ended {
    pub token: CancellationToken,
    farewell: Mutex<Option<Message>>,
}

impl Ended {
    pub fn farewell(&self) -> Option<Message> {
        self.farewell
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// A message for many sessions (an EVENT for a subscription's
/// subscribers): encoded once per serializer, by the first session of it
/// that writes it.
pub struct Shared {
    pub message: Message,
    encoded: [std::sync::OnceLock<bytes::Bytes>; 3],
}

impl Shared {
    pub fn new(message: Message) -> Shared {
        Shared {
            message,
            encoded: Default::default(),
        }
    }

    pub fn encoded(&self, serializer: super::message::Serializer) -> &bytes::Bytes {
        let slot = match serializer {
            super::message::Serializer::Json => 0,
            super::message::Serializer::MsgPack => 1,
            super::message::Serializer::Cbor => 2,
        };
        self.encoded[slot].get_or_init(|| serializer.encode(&self.message).into())
    }
}

/// What a session's queue holds.
pub enum Outgoing {
    One(Message),
    Shared(Arc<Shared>),
}

/// What the router keeps of a joined session.
pub struct Member {
    pub tx: mpsc::Sender<Outgoing>,
    pub ended: Arc<Ended>,
    /// Who it is, for re-checking what it holds when the rules change.
    pub identity: Arc<crate::identity::Identity>,
    /// It announced `call_canceling`: it may be sent INTERRUPTs.
    pub cancels: bool,
    pub authid: Arc<str>,
    pub authrole: Arc<str>,
    /// `wamp.session.get`'s answer and `on_join`'s argument.
    pub details: Arc<Dict>,
    /// Calls it made that wait for their results.
    pub pending_calls: usize,
    /// Subscriptions and registrations it holds.
    pub subscriptions: usize,
    pub registrations: usize,
}

pub struct RealmState {
    pub name: Arc<str>,
    /// The other nodes, in cluster mode (shared by every realm).
    pub cluster: Arc<super::cluster::Slot>,
    pub sessions: HashMap<Id, Member>,
    pub broker: Broker,
    pub dealer: Dealer,
    pub metrics: RealmMetrics,
    next_id: Id,
}

pub struct Realm {
    pub name: Arc<str>,
    state: Mutex<RealmState>,
}

/// The metric families, labelled by realm.
#[derive(Clone)]
pub struct Families {
    sessions: IntGaugeVec,
    calls: IntCounterVec,
    call_errors: IntCounterVec,
    call_seconds: HistogramVec,
    publishes: IntCounterVec,
    events: IntCounterVec,
    denials: IntCounterVec,
    too_slow: IntCounterVec,
    pub join_refusals: IntCounterVec,
    /// Cluster mode: the router's subscriptions at the bus server.
    pub bus_subscriptions: IntGauge,
}

impl Families {
    pub fn register(m: &Metrics) -> Families {
        let realm = &["realm"];
        Families {
            sessions: m.gauge("tollgate_wamp_sessions", "WAMP sessions joined", realm),
            calls: m.counter(
                "tollgate_wamp_calls_total",
                "WAMP calls routed to a callee",
                realm,
            ),
            call_errors: m.counter(
                "tollgate_wamp_call_errors_total",
                "WAMP calls answered with an ERROR (by the callee or the router)",
                realm,
            ),
            call_seconds: m.histogram(
                "tollgate_wamp_call_duration_seconds",
                "From a CALL to its final RESULT or ERROR",
                realm,
            ),
            publishes: m.counter("tollgate_wamp_publishes_total", "WAMP publications", realm),
            events: m.counter("tollgate_wamp_events_total", "WAMP events delivered", realm),
            denials: m.counter(
                "tollgate_wamp_denials_total",
                "WAMP actions refused as not authorized",
                realm,
            ),
            too_slow: m.counter(
                "tollgate_wamp_slow_sessions_total",
                "WAMP sessions closed because their queue was full",
                realm,
            ),
            join_refusals: m.counter(
                "tollgate_wamp_join_refusals_total",
                "WAMP joins refused (authentication, realm, role)",
                &["listener"],
            ),
            bus_subscriptions: m
                .gauge(
                    "tollgate_wamp_bus_subscriptions",
                    "Subscriptions the WAMP router holds at the bus server (cluster mode): events, its inbox, heartbeats and one per exact registration",
                    &[],
                )
                .with_label_values(&[] as &[&str]),
        }
    }

    fn for_realm(&self, name: &str) -> RealmMetrics {
        let l = &[name];
        RealmMetrics {
            sessions: self.sessions.with_label_values(l),
            calls: self.calls.with_label_values(l),
            call_errors: self.call_errors.with_label_values(l),
            call_seconds: self.call_seconds.with_label_values(l),
            publishes: self.publishes.with_label_values(l),
            events: self.events.with_label_values(l),
            denials: self.denials.with_label_values(l),
            too_slow: self.too_slow.with_label_values(l),
        }
    }
}

/// One realm's metrics, resolved once (no label lookup per message).
pub struct RealmMetrics {
    pub sessions: IntGauge,
    pub calls: IntCounter,
    pub call_errors: IntCounter,
    pub call_seconds: Histogram,
    pub publishes: IntCounter,
    pub events: IntCounter,
    pub denials: IntCounter,
    pub too_slow: IntCounter,
}

/// An ERROR for a request.
pub fn error(request_type: u64, request: Id, uri: &str) -> Message {
    Message::Error {
        request_type,
        request,
        details: Dict::new(),
        error: uri.to_owned(),
        args: None,
        kwargs: None,
    }
}

/// An ERROR with a message for people (`args[0]`).
pub fn error_with(request_type: u64, request: Id, uri: &str, message: String) -> Message {
    Message::Error {
        request_type,
        request,
        details: Dict::new(),
        error: uri.to_owned(),
        args: Some(Value::List(vec![Value::Str(message)])),
        kwargs: None,
    }
}

/// A callee's ERROR for a CALL, as its caller gets it.
pub fn call_error(
    request: Id,
    error: String,
    args: Option<Value>,
    kwargs: Option<Value>,
) -> Message {
    Message::Error {
        request_type: m::CALL,
        request,
        details: Dict::new(),
        error,
        args,
        kwargs,
    }
}

/// A session or publication id: random, below 2^53 (WAMP §5.1.2).
pub fn global_id() -> Id {
    fastrand::u64(1..1 << 53)
}

/// Whether `uri` is one `pattern` names under `policy` (WAMP §11.1 of the
/// Advanced Profile: a prefix is a plain text prefix; a wildcard's empty
/// components match any one component).
pub fn uri_matches(policy: MatchPolicy, pattern: &str, uri: &str) -> bool {
    match policy {
        MatchPolicy::Exact => pattern == uri,
        MatchPolicy::Prefix => uri.starts_with(pattern),
        MatchPolicy::Wildcard => {
            let mut p = pattern.split('.');
            let mut u = uri.split('.');
            loop {
                match (p.next(), u.next()) {
                    (None, None) => return true,
                    (Some(a), Some(b)) if a.is_empty() || a == b => {}
                    _ => return false,
                }
            }
        }
    }
}

pub fn policy_name(policy: MatchPolicy) -> &'static str {
    match policy {
        MatchPolicy::Exact => "exact",
        MatchPolicy::Prefix => "prefix",
        MatchPolicy::Wildcard => "wildcard",
    }
}

/// `options.match` of a SUBSCRIBE or REGISTER; `None` for an unknown one.
pub fn match_policy(options: &Dict) -> Option<MatchPolicy> {
    match options.get("match").and_then(Value::as_str) {
        None | Some("exact") => Some(MatchPolicy::Exact),
        Some("prefix") => Some(MatchPolicy::Prefix),
        Some("wildcard") => Some(MatchPolicy::Wildcard),
        Some(_) => None,
    }
}

/// Seconds since the epoch as RFC 3339 text, for `created` fields.
pub fn now_text() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl RealmState {
    /// Counts an entry a session gained (+1) or lost (-1).
    pub fn held(&mut self, session: Id, registration: bool, delta: isize) {
        if let Some(m) = self.sessions.get_mut(&session) {
            let n = if registration {
                &mut m.registrations
            } else {
                &mut m.subscriptions
            };
            *n = n.saturating_add_signed(delta);
        }
    }

    /// A router-scope id (subscriptions, registrations, invocations).
    pub fn id(&mut self) -> Id {
        self.next_id = (self.next_id % ((1 << 53) - 1)) + 1;
        self.next_id
    }

    /// Sends to a session; one whose queue is full is too slow and is
    /// dropped from the realm (its connection then ends, and its own task
    /// cleans up after it).
    pub fn send(&mut self, to: Id, m: Message) {
        self.deliver_to(to, Outgoing::One(m));
    }

    /// Queues for a session; one whose queue is full is too slow and is
    /// ended.
    pub fn deliver_to(&mut self, to: Id, m: Outgoing) {
        let full = match self.sessions.get(&to) {
            Some(member) => member.tx.try_send(m).is_err(),
            None => false,
        };
        if full {
            self.metrics.too_slow.inc();
            tracing::warn!(
                session = to,
                "WAMP session too slow (its queue is full); closing it"
            );
            self.remove(
                to,
                Message::Abort {
                    details: Dict::from([(
                        "message".into(),
                        Value::Str("too slow: the session's queue was full".into()),
                    )]),
                    reason: "wamp.error.system_shutdown".into(),
                },
            );
        }
    }

    /// A meta event (`wamp.session.on_join`, ...) to whoever subscribed.
    pub fn meta_event(&mut self, topic: &str, args: Vec<Value>) {
        if self.broker.matching(topic).next().is_none() {
            return;
        }
        let delivery = super::broker::Delivery {
            topic,
            publication: global_id(),
            publisher: None,
            options: &Dict::new(),
            disclosed: None,
            args: Some(Value::List(args)),
            kwargs: None,
        };
        self.publish(&delivery);
    }

    pub fn join(&mut self, session: Id, member: Member) {
        let details = member.details.clone();
        self.sessions.insert(session, member);
        self.metrics.sessions.inc();
        self.meta_event(
            "wamp.session.on_join",
            vec![Value::Dict((*details).clone())],
        );
    }

    /// A session left (or is no longer a member: then nothing is left to
    /// do).
    pub fn leave(&mut self, session: Id) {
        if let Some(member) = self.sessions.remove(&session) {
            self.cleanup(session, &member);
        }
    }

    /// Ends a session from the router's side: it is no longer a member
    /// from now on, and its task is woken to send `farewell` and close.
    pub fn remove(&mut self, session: Id, farewell: Message) -> bool {
        let Some(member) = self.sessions.remove(&session) else {
            return false;
        };
        *member
            .ended
            .farewell
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(farewell);
        member.ended.token.cancel();
        self.cleanup(session, &member);
        true
    }

    /// A member gone: its subscriptions and registrations go, calls it was
    /// serving fail at once, calls it made are forgotten; then
    /// `wamp.session.on_leave`.
    fn cleanup(&mut self, session: Id, member: &Member) {
        let (authid, authrole) = (&*member.authid, &*member.authrole);
        self.metrics.sessions.dec();
        for id in self.broker.of_session(session) {
            self.unsubscribe(session, id);
        }
        for id in self.dealer.registrations.of_session(session) {
            self.unregister(session, id);
        }
        self.fail_calls_of(session);
        self.meta_event(
            "wamp.session.on_leave",
            vec![
                Value::UInt(session),
                Value::Str(authid.to_owned()),
                Value::Str(authrole.to_owned()),
            ],
        );
    }

    /// Sessions whose `authid` or `authrole` is the given one, but `except`.
    pub fn sessions_where(&self, except: Id, pick: impl Fn(&Member) -> bool) -> Vec<Id> {
        let mut ids: Vec<Id> = self
            .sessions
            .iter()
            .filter(|(id, m)| **id != except && pick(m))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// After a reload: sessions whose realm or role is gone are ended;
    /// subscriptions and registrations the role's rules now refuse are
    /// dropped. (An authorizer's decisions stand until the session asks
    /// again.)
    pub fn recheck(&mut self, realm: &str, rules: Option<&RealmRules>) {
        let gone: Vec<Id> = self
            .sessions
            .iter()
            .filter(|(_, m)| rules.is_none_or(|r| !r.roles.contains_key(&*m.authrole)))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            tracing::info!(
                realm,
                session = id,
                "WAMP session ended: its role or realm is no longer configured"
            );
            self.kill(
                id,
                "wamp.close.close_realm",
                Some("the session's role is no longer configured"),
            );
        }
        let Some(rules) = rules else { return };
        let refused = |members: &HashMap<Id, Member>, verb, uri: &str, policy, session: &Id| {
            let Some(m) = members.get(session) else {
                return false;
            };
            let Some(Role::Static { policy: rules, .. }) = rules.roles.get(&*m.authrole) else {
                return false;
            };
            let action = crate::authz::Action::Wamp {
                verb,
                realm,
                uri,
                policy,
            };
            !rules.evaluate(&m.identity, &action).allowed()
        };
        let mut drop_subs = Vec::new();
        for (id, e) in &self.broker.entries {
            for s in &e.sessions {
                if refused(&self.sessions, WampVerb::Subscribe, &e.uri, e.policy, s) {
                    drop_subs.push((*s, *id));
                }
            }
        }
        let mut drop_regs = Vec::new();
        for (id, e) in &self.dealer.registrations.entries {
            for s in &e.sessions {
                if refused(&self.sessions, WampVerb::Register, &e.uri, e.policy, s) {
                    drop_regs.push((*s, *id));
                }
            }
        }
        for (session, id) in drop_subs {
            tracing::info!(
                realm,
                session,
                subscription = id,
                "WAMP subscription dropped: the rules no longer allow it"
            );
            self.unsubscribe(session, id);
        }
        for (session, id) in drop_regs {
            tracing::info!(
                realm,
                session,
                registration = id,
                "WAMP registration dropped: the rules no longer allow it"
            );
            self.unregister(session, id);
        }
    }

    /// Ends a session with a GOODBYE.
    pub fn kill(&mut self, session: Id, reason: &str, message: Option<&str>) -> bool {
        let mut details = Dict::new();
        if let Some(text) = message {
            details.insert("message".into(), Value::Str(text.to_owned()));
        }
        self.remove(
            session,
            Message::Goodbye {
                details,
                reason: reason.to_owned(),
            },
        )
    }
}

impl Realm {
    pub fn state(&self) -> MutexGuard<'_, RealmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Router {
    /// By name; swapped whole when a reload adds or removes realms (kept
    /// realms keep their state).
    pub realms: ArcSwap<HashMap<String, Arc<Realm>>>,
    pub settings: ArcSwap<Settings>,
    /// Cancelled when the gateway drains: sessions say GOODBYE.
    pub shutdown: CancellationToken,
    pub families: Families,
    /// Failed logins by address: past ten a minute, joins from there are
    /// refused unchecked (loopback exempt, as for OAuth clients).
    pub logins: crate::identity::limit::AuthLimiter,
    /// The other nodes, in cluster mode.
    pub cluster: Arc<super::cluster::Slot>,
}

impl Router {
    pub fn new(settings: Settings, shutdown: CancellationToken, metrics: &Metrics) -> Router {
        let router = Router {
            realms: ArcSwap::from_pointee(HashMap::new()),
            settings: ArcSwap::from_pointee(settings),
            shutdown,
            families: Families::register(metrics),
            logins: crate::identity::limit::AuthLimiter::new(
                10,
                std::time::Duration::from_secs(60),
            ),
            cluster: Arc::default(),
        };
        router.sync_realms();
        router
    }

    /// New settings: realms added are created; realms removed take no new
    /// sessions (those in them stay until they leave).
    /// New settings: what sessions hold is checked again under the new
    /// rules at once (a session whose role or realm is gone is ended).
    pub fn apply(&self, settings: Settings) {
        let before = self.realms.load_full();
        self.settings.store(Arc::new(settings));
        self.sync_realms();
        let settings = self.settings.load();
        for realm in before.values() {
            realm
                .state()
                .recheck(&realm.name, settings.realms.get(&*realm.name));
        }
    }

    fn sync_realms(&self) {
        let settings = self.settings.load();
        let old = self.realms.load();
        let realms = settings
            .realms
            .keys()
            .map(|name| {
                let realm = old.get(name).cloned().unwrap_or_else(|| {
                    Arc::new(Realm {
                        name: Arc::from(name.as_str()),
                        state: Mutex::new(RealmState {
                            name: Arc::from(name.as_str()),
                            cluster: self.cluster.clone(),
                            sessions: HashMap::new(),
                            broker: Broker::default(),
                            dealer: Dealer::default(),
                            metrics: self.families.for_realm(name),
                            next_id: 0,
                        }),
                    })
                });
                (name.clone(), realm)
            })
            .collect();
        self.realms.store(Arc::new(realms));
    }

    pub fn realm(&self, name: &str) -> Option<Arc<Realm>> {
        self.realms.load().get(name).cloned()
    }
}

impl Router {
    /// `GET /admin/wamp/sessions`: every realm's sessions, with what they
    /// joined as and where from.
    pub fn sessions_status(&self) -> serde_json::Value {
        let realms = self.realms.load();
        let mut names: Vec<&String> = realms.keys().collect();
        names.sort();
        let mut out = serde_json::Map::new();
        for name in names {
            let state = realms[name].state();
            let mut sessions: Vec<serde_json::Value> = state
                .sessions
                .iter()
                .map(|(id, m)| {
                    let mut details = serde_json::to_value(super::value::Encoded(
                        &Value::Dict((*m.details).clone()),
                        super::value::BinaryAs::JsonString,
                    ))
                    .unwrap_or_default();
                    if let Some(d) = details.as_object_mut() {
                        d.insert("session".into(), (*id).into());
                        d.insert("pending_calls".into(), m.pending_calls.into());
                    }
                    details
                })
                .collect();
            sessions.sort_by_key(|s| s["session"].as_u64());
            out.insert(name.clone(), serde_json::Value::Array(sessions));
        }
        serde_json::json!({ "realms": out })
    }

    /// Ends the sessions password users in `names` joined with (a ticket
    /// checked against the user's password; those users were changed or
    /// removed); how many.
    pub fn end_sessions_of_users(&self, names: &[String]) -> usize {
        use crate::identity::AuthMethod;
        let mut ended = 0;
        for realm in self.realms.load().values() {
            let mut state = realm.state();
            // Tickets checked against a password user ("users"), not those
            // a dynamic authenticator vouched for under the same name.
            let victims = state.sessions_where(0, |m| {
                matches!(m.identity.method, AuthMethod::Password | AuthMethod::Ticket)
                    && matches!(m.details.get("authprovider"), Some(super::Value::Str(p)) if p == "users")
                    && names.iter().any(|n| *n == m.identity.subject)
            });
            for id in victims {
                if state.kill(
                    id,
                    "wamp.close.killed",
                    Some("the user was changed or removed"),
                ) {
                    tracing::info!(realm = %realm.name, session = id,
                        "WAMP session ended: its user was changed or removed");
                    ended += 1;
                }
            }
        }
        ended
    }

    /// Ends a session (in whichever realm) with GOODBYE `wamp.close.killed`;
    /// whether there was one.
    pub fn kill(&self, session: Id) -> bool {
        self.realms.load().values().any(|realm| {
            realm
                .state()
                .kill(session, "wamp.close.killed", Some("ended by an operator"))
        })
    }
}
