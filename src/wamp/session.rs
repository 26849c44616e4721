//! One WAMP session on its transport: HELLO, authentication (auth.rs),
//! WELCOME or ABORT, then every message in both directions until GOODBYE
//! or the connection ends. Every call, registration, publication and
//! subscription is authorised first: by the role's rules in the shared
//! policy engine, or by the role's authorizer procedure (its decisions
//! cached for the session when it says so).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::auth::{self, Refused};
use super::broker::Delivery;
use super::cluster::{Outbound, unavailable};
use super::dealer::{CallRequest, Caller, CancelMode, Invoke, call_here, no_such_procedure};
use super::message::{self as m, Id, Message};
use super::meta;
use super::router::{
    Ended, Member, Outgoing, Realm, Router, error, error_with, global_id, match_policy,
};
use super::settings::Role;
use super::value::{Dict, Value};
use super::wire::{Wire, colon_hex};
use crate::authz::{Action, MatchPolicy, Reason, WampVerb};
use crate::identity::{AuthMethod, Identity};

/// Longest URI a session may join, subscribe, register, call or publish to.
const MAX_URI: usize = 1024;

/// Longest authid a HELLO may name.
const MAX_AUTHID: usize = 256;

/// Time a new session has to send its HELLO, and each AUTHENTICATE.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

fn text(s: &str) -> Value {
    Value::Str(s.to_owned())
}

/// What the router says it does (WELCOME's `roles`).
fn router_roles() -> Dict {
    let features = |names: &[&str]| {
        Value::Dict(Dict::from([(
            "features".into(),
            Value::Dict(
                names
                    .iter()
                    .map(|n| ((*n).to_owned(), Value::Bool(true)))
                    .collect(),
            ),
        )]))
    };
    Dict::from([
        (
            "broker".into(),
            features(&[
                "publisher_identification",
                "publisher_exclusion",
                "subscriber_blackwhite_listing",
                "pattern_based_subscription",
                "session_meta_api",
                "subscription_meta_api",
            ]),
        ),
        (
            "dealer".into(),
            features(&[
                "caller_identification",
                "progressive_call_results",
                "call_canceling",
                "call_timeout",
                "pattern_based_registration",
                "shared_registration",
                "session_meta_api",
                "registration_meta_api",
            ]),
        ),
    ])
}

/// Serves a session until it ends.
pub async fn serve(mut wire: Wire, router: Arc<Router>) {
    let settings = router.settings.load_full();
    let hello = tokio::time::timeout(JOIN_TIMEOUT, wire.recv()).await;
    let (hello_realm, hello_details) = match hello {
        Ok(Some(Ok(Message::Hello { realm, details }))) => (realm, details),
        Ok(Some(Ok(_))) => {
            return wire
                .abort("wamp.error.protocol_violation", "expected HELLO")
                .await;
        }
        Ok(Some(Err(e))) => return wire.abort("wamp.error.protocol_violation", &e).await,
        _ => return,
    };
    // What the logs and lookups take from a client is short.
    let authid_len = hello_details
        .get("authid")
        .and_then(Value::as_str)
        .map_or(0, str::len);
    if hello_realm.len() > MAX_URI || authid_len > MAX_AUTHID {
        refused(&router, &wire);
        return wire
            .abort(
                "wamp.error.invalid_argument",
                "the realm or authid is too long",
            )
            .await;
    }
    if let Some(wait) = router.logins.blocked(None, wire.conn.ip) {
        refused(&router, &wire);
        tracing::info!(peer = %wire.conn.peer, "WAMP join refused unchecked: too many failed logins");
        return wire
            .abort(
                "wamp.error.not_authorized",
                &format!(
                    "too many failed logins; try again in {}s",
                    wait.as_secs().max(1)
                ),
            )
            .await;
    }
    let session = global_id();
    let joined = match auth::authenticate(
        &mut wire,
        &router,
        &settings,
        &hello_realm,
        &hello_details,
        session,
    )
    .await
    {
        Ok(j) => j,
        Err(Refused(Some((reason, message)))) => {
            refused(&router, &wire);
            if reason == "wamp.error.not_authorized" {
                router.logins.failed(None, wire.conn.ip);
            }
            tracing::info!(realm = %hello_realm, peer = %wire.conn.peer, reason = %reason,
                why = %message, "WAMP join refused");
            return wire.abort(&reason, &message).await;
        }
        Err(Refused(None)) => return,
    };
    let Some(realm) = router.realm(&joined.realm) else {
        refused(&router, &wire);
        tracing::info!(realm = %joined.realm, authid = %joined.authid, peer = %wire.conn.peer,
            "WAMP join refused: no such realm");
        return wire
            .abort(
                "wamp.error.no_such_realm",
                &format!("no realm `{}`", joined.realm),
            )
            .await;
    };
    let has_role = settings
        .realms
        .get(&joined.realm)
        .is_some_and(|r| r.roles.contains_key(&joined.authrole));
    if !has_role {
        refused(&router, &wire);
        tracing::info!(realm = %joined.realm, authid = %joined.authid, authrole = %joined.authrole,
            "WAMP join refused: the realm has no such role");
        return wire
            .abort(
                "wamp.error.no_such_role",
                &format!("realm `{}` has no role `{}`", joined.realm, joined.authrole),
            )
            .await;
    }
    let mut details = Dict::from([
        ("session".into(), Value::UInt(session)),
        ("authid".into(), text(&joined.authid)),
        ("authrole".into(), text(&joined.authrole)),
        ("authmethod".into(), text(joined.authmethod)),
        ("authprovider".into(), text(joined.authprovider)),
        ("transport".into(), Value::Dict(wire.details())),
    ]);
    if let Some(extra) = &joined.authextra {
        details.insert("authextra".into(), Value::Dict(extra.clone()));
    }
    let details = Arc::new(details);
    let (tx, mut rx) = mpsc::channel(settings.max_queued);
    let authid: Arc<str> = Arc::from(joined.authid.as_str());
    let authrole: Arc<str> = Arc::from(joined.authrole.as_str());
    let mut welcome = Dict::from([
        ("realm".into(), text(&joined.realm)),
        ("authid".into(), text(&joined.authid)),
        ("authrole".into(), text(&joined.authrole)),
        ("authmethod".into(), text(joined.authmethod)),
        ("authprovider".into(), text(joined.authprovider)),
        ("roles".into(), Value::Dict(router_roles())),
    ]);
    if let Some(extra) = joined.authextra {
        welcome.insert("authextra".into(), Value::Dict(extra));
    }
    // A member before the WELCOME goes out, so that whoever hears of the
    // WELCOME finds the session; what is queued for it meanwhile waits in
    // its queue, behind the WELCOME.
    let ended = Arc::new(Ended::default());
    let cancels = matches!(
        hello_details
            .get("roles")
            .and_then(Value::as_dict)
            .and_then(|r| r.get("callee"))
            .and_then(Value::as_dict)
            .and_then(|c| c.get("features"))
            .and_then(Value::as_dict)
            .and_then(|f| f.get("call_canceling")),
        Some(Value::Bool(true))
    );
    realm.state().join(
        session,
        Member {
            tx,
            ended: ended.clone(),
            identity: joined.identity.clone(),
            cancels,
            authid: authid.clone(),
            authrole: authrole.clone(),
            details: details.clone(),
            pending_calls: 0,
            subscriptions: 0,
            registrations: 0,
        },
    );
    if !wire
        .send(&Message::Welcome {
            session,
            details: welcome,
        })
        .await
    {
        realm.state().leave(session);
        return;
    }
    let cert = wire.conn.cert.clone();
    tracing::info!(realm = %realm.name, session, authid = %authid, authrole = %authrole,
        authmethod = joined.authmethod, peer = %wire.conn.peer,
        cert_cn = cert.as_ref().and_then(|c| c.cn.as_deref()).unwrap_or(""),
        cert_o = %cert.as_ref().map(|c| c.o.join(",")).unwrap_or_default(),
        cert_sha1 = %cert.as_ref().map(|c| colon_hex(&c.sha1)).unwrap_or_default(),
        "WAMP session joined");
    let mut s = Session {
        realm: realm.clone(),
        session,
        authid,
        authrole,
        identity: joined.identity,
        details,
        router: router.clone(),
        cache: HashMap::new(),
        ended: ended.clone(),
    };
    // A session joined with a JWT ends when the token does.
    let expires_at = s
        .identity
        .expires_at
        .filter(|_| s.identity.method == AuthMethod::Jwt);
    let expiry = async move {
        match expires_at {
            Some(at) => {
                let left = at.saturating_sub(crate::identity::jwt::unix_now());
                tokio::time::sleep(Duration::from_secs(left)).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let bye = |reason: &str, message: &str| Message::Goodbye {
        details: Dict::from([("message".into(), text(message))]),
        reason: reason.to_owned(),
    };
    // Every write is cut short when the router ends the session, so a
    // client that stops reading never holds its session (and what it
    // registered) in place.
    let stop = ended.token.clone();
    let mut handled: u32 = 0;
    let (why, farewell) = loop {
        let sent = tokio::select! {
            _ = stop.cancelled() => break ("ended by the router", ended.farewell()),
            _ = router.shutdown.cancelled() => {
                break ("shutdown", Some(bye("wamp.close.system_shutdown", "the router is shutting down")));
            }
            () = &mut expiry => {
                break ("token expired", Some(bye("wamp.close.token_expired", "the session's token expired")));
            }
            incoming = wire.recv() => match incoming {
                None => break ("connection closed", None),
                Some(Err(e)) => {
                    break ("protocol violation", Some(abort_message("wamp.error.protocol_violation", &e)));
                }
                Some(Ok(Message::Goodbye { .. })) => {
                    break ("goodbye", Some(Message::Goodbye {
                        details: Dict::new(),
                        reason: "wamp.close.goodbye_and_out".into(),
                    }));
                }
                Some(Ok(msg)) => {
                    // A burst of publications read at once must not fill
                    // every subscriber's queue before their tasks run:
                    // let them drain now and then.
                    handled = handled.wrapping_add(1);
                    if handled % 16 == 0 {
                        crate::transport::after_ready_tasks().await;
                    }
                    match s.handle(msg).await {
                        Ok(Some(reply)) => write(&mut wire, &reply, &stop).await,
                        Ok(None) => true,
                        Err(e) => {
                            break ("protocol violation", Some(abort_message("wamp.error.protocol_violation", e)));
                        }
                    }
                }
            },
            outgoing = rx.recv() => match outgoing {
                Some(msg) => write_queued(&mut wire, msg, &mut rx, &stop).await,
                None => break ("ended by the router", ended.farewell()),
            },
        };
        if !sent {
            match stop.is_cancelled() {
                // Cut short: the farewell's write could not finish either.
                true => break ("ended by the router while writing", None),
                false => break ("connection closed", None),
            }
        }
    };
    realm.state().leave(session);
    if let Some(m) = farewell {
        // A last word, if the client still reads.
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, wire.send(&m)).await;
    }
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, wire.close()).await;
    tracing::info!(realm = %realm.name, session, authid = %s.authid, authrole = %s.authrole,
        reason = why, "WAMP session left");
}

/// How long a session's last GOODBYE or ABORT may take to write.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes a message unless the router ends the session first; `false`
/// when the connection is gone or the write was cut short.
async fn write(wire: &mut Wire, message: &Message, stop: &CancellationToken) -> bool {
    tokio::select! {
        sent = wire.send(message) => sent,
        _ = stop.cancelled() => false,
    }
}

/// Writes a queued message and whatever else the queue holds (up to a
/// batch) in one write, unless the router ends the session first.
async fn write_queued(
    wire: &mut Wire,
    first: Outgoing,
    rx: &mut mpsc::Receiver<Outgoing>,
    stop: &CancellationToken,
) -> bool {
    const BATCH: usize = 64;
    let all = async {
        if !wire.feed_queued(&first).await {
            return false;
        }
        for _ in 1..BATCH {
            match rx.try_recv() {
                Ok(m) if wire.feed_queued(&m).await => {}
                Ok(_) => return false,
                Err(_) => break,
            }
        }
        wire.flush().await
    };
    tokio::select! {
        sent = all => sent,
        _ = stop.cancelled() => false,
    }
}

fn abort_message(reason: &str, message: &str) -> Message {
    Message::Abort {
        details: Dict::from([("message".into(), text(message))]),
        reason: reason.to_owned(),
    }
}

fn refused(router: &Router, wire: &Wire) {
    router
        .families
        .join_refusals
        .with_label_values(&[&*wire.conn.listener])
        .inc();
}

/// What an authorisation decided.
enum Verdict {
    Allowed {
        disclose: bool,
    },
    Denied,
    /// The URI is not one (`wamp.error.invalid_uri`).
    Invalid(&'static str),
    /// The authorizer could not decide (`wamp.error.authorization_failed`).
    Failed,
}

struct Session {
    realm: Arc<Realm>,
    session: Id,
    authid: Arc<str>,
    authrole: Arc<str>,
    identity: Arc<Identity>,
    details: Arc<Dict>,
    router: Arc<Router>,
    /// An authorizer's decisions it asked to be cached.
    cache: HashMap<(WampVerb, MatchPolicy, String), (bool, bool)>,
    /// Set when the router ended the session: what it still sends is
    /// dropped.
    ended: Arc<Ended>,
}

fn verb_name(verb: WampVerb) -> &'static str {
    match verb {
        WampVerb::Call => "call",
        WampVerb::Register => "register",
        WampVerb::Publish => "publish",
        WampVerb::Subscribe => "subscribe",
    }
}

impl Session {
    /// Whether the session's role may do `verb` on `uri`; refusals are
    /// counted.
    async fn authorize(
        &mut self,
        verb: WampVerb,
        uri: &str,
        policy: MatchPolicy,
        options: &Dict,
    ) -> Verdict {
        let verdict = self.decide(verb, uri, policy, options).await;
        if let Verdict::Denied = verdict {
            self.realm.state().metrics.denials.inc();
        }
        verdict
    }

    async fn decide(
        &mut self,
        verb: WampVerb,
        uri: &str,
        policy: MatchPolicy,
        options: &Dict,
    ) -> Verdict {
        let settings = self.router.settings.load_full();
        let action = Action::Wamp {
            verb,
            realm: &self.realm.name,
            uri,
            policy,
        };
        if uri.len() > MAX_URI {
            return Verdict::Invalid("longer than 1024 bytes");
        }
        // The router's own namespace: only it publishes meta events and
        // serves meta procedures there.
        if matches!(verb, WampVerb::Publish | WampVerb::Register) && uri.starts_with("wamp.") {
            return Verdict::Invalid("`wamp.` URIs are the router's own");
        }
        if let Err(why) = action.wanted() {
            return Verdict::Invalid(why);
        }
        let role = settings
            .realms
            .get(&*self.realm.name)
            .and_then(|r| r.roles.get(&*self.authrole));
        let authorizer = match role {
            None => return Verdict::Denied,
            Some(Role::Static { policy, disclose }) => {
                let d = policy.evaluate(&self.identity, &action);
                return match d.reason {
                    Reason::Invalid(why) => Verdict::Invalid(why),
                    _ if d.allowed() => Verdict::Allowed {
                        disclose: d.rule.and_then(|i| disclose.get(i).copied()) == Some(true),
                    },
                    _ => Verdict::Denied,
                };
            }
            Some(Role::Dynamic { authorizer }) => authorizer.clone(),
        };
        let key = (verb, policy, uri.to_owned());
        if let Some((allow, disclose)) = self.cache.get(&key) {
            return match allow {
                true => Verdict::Allowed {
                    disclose: *disclose,
                },
                false => Verdict::Denied,
            };
        }
        let args = vec![
            Value::Dict((*self.details).clone()),
            text(uri),
            text(verb_name(verb)),
            Value::Dict(options.clone()),
        ];
        let answer = auth::call(&self.router, &settings, &self.realm.name, &authorizer, args).await;
        let first = match answer {
            Ok((Some(Value::List(mut l)), _)) if !l.is_empty() => l.swap_remove(0),
            Ok(_) => Value::Null,
            Err(e) => {
                tracing::warn!(realm = %self.realm.name, session = self.session, authorizer = %authorizer,
                    uri, action = verb_name(verb), reason = %e, "WAMP authorizer failed; refused");
                return Verdict::Failed;
            }
        };
        let (allow, disclose, cache) = match &first {
            Value::Bool(b) => (*b, false, false),
            Value::Dict(d) => {
                let flag = |k: &str| matches!(d.get(k), Some(Value::Bool(true)));
                (flag("allow"), flag("disclose"), flag("cache"))
            }
            _ => {
                tracing::warn!(realm = %self.realm.name, authorizer = %authorizer,
                    "WAMP authorizer answered neither a bool nor {{allow, ...}}; denied");
                (false, false, false)
            }
        };
        if cache {
            // Bounded: a session asking for ever new URIs stops being cached.
            if self.cache.len() >= 1000 {
                self.cache.clear();
            }
            self.cache.insert(key, (allow, disclose));
        }
        match allow {
            true => Verdict::Allowed { disclose },
            false => Verdict::Denied,
        }
    }

    /// Answers a message; `Err` for one a client may not send.
    async fn handle(&mut self, msg: Message) -> Result<Option<Message>, &'static str> {
        if self.ended.token.is_cancelled() {
            return Ok(None);
        }
        Ok(match msg {
            Message::Subscribe {
                request,
                options,
                topic,
            } => {
                let Some(policy) = match_policy(&options) else {
                    return Ok(Some(error(
                        m::SUBSCRIBE,
                        request,
                        "wamp.error.invalid_argument",
                    )));
                };
                match self
                    .authorize(WampVerb::Subscribe, &topic, policy, &options)
                    .await
                {
                    Verdict::Allowed { .. } => {
                        let max = self.router.settings.load().max_subscriptions;
                        let mut state = self.realm.state();
                        let held = state
                            .sessions
                            .get(&self.session)
                            .map_or(0, |m| m.subscriptions);
                        // Subscribing again to what it holds costs nothing.
                        let again = state.broker.lookup(&topic, policy).is_some_and(|id| {
                            state.broker.entries[&id].sessions.contains(&self.session)
                        });
                        if held >= max && !again {
                            return Ok(Some(limit(m::SUBSCRIBE, request, "subscriptions", max)));
                        }
                        let subscription = state.subscribe(self.session, topic, policy);
                        Some(Message::Subscribed {
                            request,
                            subscription,
                        })
                    }
                    v => Some(refusal(m::SUBSCRIBE, request, v, &topic)),
                }
            }
            Message::Unsubscribe {
                request,
                subscription,
            } => match self.realm.state().unsubscribe(self.session, subscription) {
                true => Some(Message::Unsubscribed {
                    request,
                    details: None,
                }),
                false => Some(error(
                    m::UNSUBSCRIBE,
                    request,
                    "wamp.error.no_such_subscription",
                )),
            },
            Message::Publish {
                request,
                options,
                topic,
                args,
                kwargs,
            } => {
                let acknowledge = matches!(options.get("acknowledge"), Some(Value::Bool(true)));
                let verdict = self
                    .authorize(WampVerb::Publish, &topic, MatchPolicy::Exact, &options)
                    .await;
                let Verdict::Allowed { disclose } = verdict else {
                    return Ok(acknowledge.then(|| refusal(m::PUBLISH, request, verdict, &topic)));
                };
                let delivery = Delivery {
                    topic: &topic,
                    publication: global_id(),
                    publisher: Some(self.session),
                    options: &options,
                    disclosed: disclose.then_some((self.session, &*self.authid, &*self.authrole)),
                    args,
                    kwargs,
                };
                self.realm.state().publish(&delivery);
                if let Some(link) = self.router.cluster.link() {
                    link.send_event(&self.realm.name, &delivery);
                }
                acknowledge.then_some(Message::Published {
                    request,
                    publication: delivery.publication,
                })
            }
            Message::Register {
                request,
                options,
                procedure,
            } => {
                let (Some(policy), Some(invoke)) =
                    (match_policy(&options), Invoke::from_options(&options))
                else {
                    return Ok(Some(error_with(
                        m::REGISTER,
                        request,
                        "wamp.error.invalid_argument",
                        "`match` must be exact, prefix or wildcard; `invoke` single, \
                         roundrobin, random, first or last"
                            .into(),
                    )));
                };
                let verdict = self
                    .authorize(WampVerb::Register, &procedure, policy, &options)
                    .await;
                match verdict {
                    Verdict::Allowed { .. } => {
                        let max = self.router.settings.load().max_registrations;
                        let mut state = self.realm.state();
                        if state
                            .sessions
                            .get(&self.session)
                            .is_some_and(|m| m.registrations >= max)
                        {
                            return Ok(Some(limit(m::REGISTER, request, "registrations", max)));
                        }
                        let done = state.register(self.session, procedure, policy, invoke);
                        Some(match done {
                            Ok(registration) => Message::Registered {
                                request,
                                registration,
                            },
                            Err(uri) => error(m::REGISTER, request, uri),
                        })
                    }
                    v => Some(refusal(m::REGISTER, request, v, &procedure)),
                }
            }
            Message::Unregister {
                request,
                registration,
            } => match self.realm.state().unregister(self.session, registration) {
                true => Some(Message::Unregistered {
                    request,
                    details: None,
                }),
                false => Some(error(
                    m::UNREGISTER,
                    request,
                    "wamp.error.no_such_registration",
                )),
            },
            Message::Call {
                request,
                options,
                procedure,
                args,
                kwargs,
            } => self.call(request, options, procedure, args, kwargs).await,
            Message::Yield {
                request,
                options,
                args,
                kwargs,
            } => {
                self.realm
                    .state()
                    .yielded(self.session, request, &options, args, kwargs);
                None
            }
            Message::Error {
                request_type: m::INVOCATION,
                request,
                error,
                args,
                kwargs,
                ..
            } => {
                self.realm
                    .state()
                    .failed(self.session, request, error, args, kwargs);
                None
            }
            Message::Cancel { request, options } => {
                let Some(mode) = CancelMode::from_options(&options) else {
                    return Ok(Some(error(
                        m::CANCEL,
                        request,
                        "wamp.error.invalid_argument",
                    )));
                };
                // A call already answered has nothing to cancel.
                self.realm.state().cancel(self.session, request, mode);
                None
            }
            // Acknowledged delivery is not offered; an acknowledgement is harmless.
            Message::EventReceived { .. } => None,
            _ => return Err("a message a client does not send, or not now"),
        })
    }

    async fn call(
        &mut self,
        request: Id,
        options: Dict,
        procedure: String,
        args: Option<Value>,
        kwargs: Option<Value>,
    ) -> Option<Message> {
        let disclose = match self
            .authorize(WampVerb::Call, &procedure, MatchPolicy::Exact, &options)
            .await
        {
            Verdict::Allowed { disclose } => disclose,
            v => return Some(refusal(m::CALL, request, v, &procedure)),
        };
        // The router's own namespace: its meta procedures, or nothing (no
        // client registration, whatever its pattern, answers `wamp.` calls).
        if procedure.starts_with("wamp.") && !meta::is_meta(&procedure) {
            return Some(no_such_procedure(request, &procedure));
        }
        if meta::is_meta(&procedure) {
            let positional = match &args {
                Some(Value::List(l)) => l.as_slice(),
                _ => &[],
            };
            let named = kwargs.as_ref().and_then(Value::as_dict);
            let answer = meta::call(
                &mut self.realm.state(),
                self.session,
                &procedure,
                positional,
                named,
            );
            return Some(match answer {
                Ok(values) => Message::Result {
                    request,
                    details: Dict::new(),
                    args: Some(Value::List(values)),
                    kwargs: None,
                },
                Err((uri, message)) => error_with(m::CALL, request, uri, message),
            });
        }
        let settings = self.router.settings.load();
        let mut state = self.realm.state();
        let waiting = state
            .sessions
            .get(&self.session)
            .map_or(0, |m| m.pending_calls);
        if waiting >= settings.max_pending_calls {
            return Some(error_with(
                m::CALL,
                request,
                "wamp.error.canceled",
                format!("too many calls waiting for results ({waiting})"),
            ));
        }
        let timeout = options.get("timeout").and_then(Value::as_id).unwrap_or(0);
        // Cluster mode: unless a `single` callee here has it, the call goes
        // to whichever node NATS picks (this one included).
        if let Some(link) = self.router.cluster.link() {
            let regs = &state.dealer.registrations;
            let exact = (regs.lookup(&procedure, MatchPolicy::Exact))
                .and_then(|id| regs.entries.get(&id))
                .map(|r| r.kind.invoke);
            if exact != Some(Invoke::Single) {
                let here = exact.is_some() || state.dealer.best_match(&procedure).is_some();
                if link.connected() {
                    let progress =
                        matches!(options.get("receive_progress"), Some(Value::Bool(true)));
                    let call = state.forward(self.session, request, progress);
                    drop(state);
                    link.hand_off(
                        &self.realm,
                        call,
                        Outbound {
                            procedure,
                            options,
                            disclose: disclose.then(|| {
                                (
                                    self.session,
                                    self.authid.to_string(),
                                    self.authrole.to_string(),
                                )
                            }),
                            args,
                            kwargs,
                            here,
                        },
                    );
                    return None;
                }
                if !here {
                    state.metrics.call_errors.inc();
                    return Some(unavailable(request));
                }
            }
        }
        drop(state);
        call_here(
            &self.realm,
            CallRequest {
                caller: Caller::Session {
                    id: self.session,
                    request,
                },
                procedure: &procedure,
                options: &options,
                disclose: disclose.then_some((self.session, &*self.authid, &*self.authrole)),
                args,
                kwargs,
            },
            timeout,
        )
    }
}

/// The ERROR for a SUBSCRIBE or REGISTER past the session's limit.
fn limit(request_type: u64, request: Id, what: &str, max: usize) -> Message {
    error_with(
        request_type,
        request,
        "tollgate.error.limit_exceeded",
        format!("a session may hold at most {max} {what}"),
    )
}

/// The ERROR for a refused action.
fn refusal(request_type: u64, request: Id, verdict: Verdict, uri: &str) -> Message {
    match verdict {
        Verdict::Invalid(why) => error_with(
            request_type,
            request,
            "wamp.error.invalid_uri",
            format!("`{uri}`: {why}"),
        ),
        Verdict::Failed => error_with(
            request_type,
            request,
            "wamp.error.authorization_failed",
            format!("the authorizer could not decide on `{uri}`"),
        ),
        _ => error_with(
            request_type,
            request,
            "wamp.error.not_authorized",
            format!("not authorized for `{uri}`"),
        ),
    }
}
