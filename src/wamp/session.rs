//! One WAMP session over a WebSocket: HELLO, authentication (anonymous or
//! ticket through the shared Authenticator), WELCOME, then every message
//! in both directions until GOODBYE or the connection ends. Every call,
//! registration, publication and subscription is checked by the shared
//! policy engine.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Frame;

use super::message::{self as m, Id, Message, Serializer};
use super::router::{Member, Realm, Router, error};
use super::value::{Dict, Value};
use crate::authz::{Action, MatchPolicy, WampVerb};
use crate::identity::{AuthMethod, CertIdentity, Identity};
use crate::transport::websocket::WebSocket;

/// Time a new session has to send its HELLO (and AUTHENTICATE).
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

fn details(pairs: &[(&str, Value)]) -> Dict {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn text(s: &str) -> Value {
    Value::Str(s.to_owned())
}

struct Wire {
    ws: WebSocket,
    serializer: Serializer,
    max: usize,
}

impl Wire {
    async fn send(&mut self, message: &Message) -> bool {
        let bytes = self.serializer.encode(message);
        let frame = match self.serializer.is_text() {
            true => Frame::text(String::from_utf8(bytes).unwrap_or_default()),
            false => Frame::binary(bytes),
        };
        self.ws.send(frame).await.is_ok()
    }

    /// The next message; `Err` with a reason for a malformed one.
    async fn recv(&mut self) -> Option<Result<Message, String>> {
        loop {
            let frame = match self.ws.next().await? {
                Ok(f) => f,
                // tungstenite enforces the size limit: say so before closing.
                Err(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
                    return Some(Err(format!("a message over the {}-byte limit", self.max)));
                }
                Err(_) => return None,
            };
            let bytes = match frame {
                Frame::Text(t) => t.as_bytes().to_vec(),
                Frame::Binary(b) => b.to_vec(),
                Frame::Close(_) => return None,
                _ => continue,
            };
            return Some(self.serializer.decode(&bytes).map_err(|e| e.to_string()));
        }
    }

    async fn abort(&mut self, reason: &str, message: &str) {
        let _ = self
            .send(&Message::Abort {
                details: details(&[("message", text(message))]),
                reason: reason.to_owned(),
            })
            .await;
        let _ = self.ws.close(None).await;
    }
}

/// Serves a session until it ends.
pub async fn serve(
    ws: WebSocket,
    serializer: Serializer,
    router: Arc<Router>,
    cert: Option<Arc<CertIdentity>>,
    peer: String,
) {
    let settings = router.settings.load_full();
    let mut wire = Wire {
        ws,
        serializer,
        max: settings.max_message,
    };
    let hello = tokio::time::timeout(JOIN_TIMEOUT, wire.recv()).await;
    let (realm_name, hello_details) = match hello {
        Ok(Some(Ok(Message::Hello { realm, details }))) => (realm, details),
        Ok(Some(Ok(_))) => {
            return wire
                .abort("wamp.error.protocol_violation", "expected HELLO")
                .await;
        }
        Ok(Some(Err(e))) => return wire.abort("wamp.error.protocol_violation", &e).await,
        _ => return,
    };
    let Some(realm) = router.realms.get(&realm_name).cloned() else {
        return wire
            .abort(
                "wamp.error.no_such_realm",
                &format!("no realm `{realm_name}`"),
            )
            .await;
    };
    let methods: Vec<String> = match hello_details.get("authmethods") {
        Some(Value::List(l)) => l
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let authid = hello_details
        .get("authid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // Ticket when offered and allowed; else anonymous when allowed.
    let identity = if settings.ticket && methods.iter().any(|m| m == "ticket") {
        let Some(authid) = authid.clone() else {
            return wire
                .abort("wamp.error.not_authorized", "ticket needs an authid")
                .await;
        };
        if !wire
            .send(&Message::Challenge {
                method: "ticket".into(),
                extra: Dict::new(),
            })
            .await
        {
            return;
        }
        let ticket = match tokio::time::timeout(JOIN_TIMEOUT, wire.recv()).await {
            Ok(Some(Ok(Message::Authenticate { signature, .. }))) => signature,
            _ => {
                return wire
                    .abort("wamp.error.protocol_violation", "expected AUTHENTICATE")
                    .await;
            }
        };
        match settings
            .authn
            .password(&authid, ticket.as_bytes(), AuthMethod::Ticket, cert.clone())
            .await
        {
            Ok(id) => id,
            Err(refusal) => {
                tracing::info!(realm = %realm_name, authid = %authid, peer = %peer, reason = %refusal,
                    "WAMP join refused");
                return wire
                    .abort("wamp.error.not_authorized", "authentication failed")
                    .await;
            }
        }
    } else if settings.anonymous {
        Arc::new(Identity {
            subject: format!("anonymous-{:08x}", fastrand::u32(..)),
            ..Identity::anonymous()
        })
    } else {
        return wire
            .abort(
                "wamp.error.not_authorized",
                "no accepted authentication method offered",
            )
            .await;
    };
    let authrole = identity
        .roles
        .first()
        .cloned()
        .unwrap_or_else(|| match identity.method {
            AuthMethod::Anonymous => "anonymous".into(),
            _ => "user".into(),
        });
    let session = fastrand::u64(1..1 << 53);
    let (tx, mut rx) = mpsc::channel(settings.max_queued);
    realm.state().sessions.insert(session, Member { tx });
    let roles = details(&[
        ("broker", Value::Dict(Dict::new())),
        ("dealer", Value::Dict(Dict::new())),
    ]);
    let welcome = Message::Welcome {
        session,
        details: details(&[
            ("realm", text(&realm_name)),
            ("authid", text(&identity.subject)),
            ("authrole", text(&authrole)),
            ("authmethod", text(identity.method.as_str())),
            ("roles", Value::Dict(roles)),
        ]),
    };
    if !wire.send(&welcome).await {
        realm.state().leave(session);
        return;
    }
    let cert_of = identity.cert.as_deref().or(cert.as_deref());
    tracing::info!(realm = %realm_name, session, authid = %identity.subject, authrole = %authrole,
        authmethod = identity.method.as_str(), peer = %peer,
        cert_cn = cert_of.and_then(|c| c.cn.as_deref()).unwrap_or(""),
        cert_o = %cert_of.map(|c| c.o.join(",")).unwrap_or_default(),
        cert_sha1 = cert_of.map_or("", |c| c.sha1.as_str()),
        "WAMP session joined");
    let joined = Joined {
        realm: realm.clone(),
        session,
        identity,
        router: router.clone(),
    };
    let why = loop {
        tokio::select! {
            incoming = wire.recv() => match incoming {
                None => break "connection closed",
                Some(Err(e)) => {
                    wire.abort("wamp.error.protocol_violation", &e).await;
                    break "protocol violation";
                }
                Some(Ok(Message::Goodbye { .. })) => {
                    let _ = wire.send(&Message::Goodbye {
                        details: Dict::new(),
                        reason: "wamp.close.goodbye_and_out".into(),
                    }).await;
                    break "goodbye";
                }
                Some(Ok(msg)) => match joined.handle(msg) {
                    Ok(Some(reply)) => {
                        if !wire.send(&reply).await {
                            break "connection closed";
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        wire.abort("wamp.error.protocol_violation", e).await;
                        break "protocol violation";
                    }
                },
            },
            outgoing = rx.recv() => match outgoing {
                Some(msg) => {
                    if !wire.send(&msg).await {
                        break "connection closed";
                    }
                }
                // Dropped from the realm (too slow).
                None => {
                    wire.abort("wamp.error.system_shutdown", "too slow: the session's queue was full").await;
                    break "too slow";
                }
            },
        }
    };
    realm.state().leave(session);
    tracing::info!(realm = %realm_name, session, authid = %joined.identity.subject, reason = why,
        "WAMP session left");
}

struct Joined {
    realm: Arc<Realm>,
    session: Id,
    identity: Arc<Identity>,
    router: Arc<Router>,
}

impl Joined {
    fn allowed(&self, verb: WampVerb, uri: &str) -> bool {
        let settings = self.router.settings.load();
        settings
            .policy
            .evaluate(
                &self.identity,
                &Action::Wamp {
                    verb,
                    realm: &self.realm.name,
                    uri,
                    policy: MatchPolicy::Exact,
                },
            )
            .allowed()
    }

    /// Answers a message; `Err` for one a client may not send.
    fn handle(&self, msg: Message) -> Result<Option<Message>, &'static str> {
        let not_authorized =
            |code, request| Some(error(code, request, "wamp.error.not_authorized"));
        Ok(match msg {
            Message::Subscribe {
                request,
                options,
                topic,
            } => {
                if options
                    .get("match")
                    .and_then(Value::as_str)
                    .is_some_and(|p| p != "exact")
                {
                    Some(error(m::SUBSCRIBE, request, "wamp.error.invalid_argument"))
                } else if !self.allowed(WampVerb::Subscribe, &topic) {
                    not_authorized(m::SUBSCRIBE, request)
                } else {
                    let subscription = self.realm.state().subscribe(self.session, topic);
                    Some(Message::Subscribed {
                        request,
                        subscription,
                    })
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
                if !self.allowed(WampVerb::Publish, &topic) {
                    return Ok(acknowledge
                        .then(|| error(m::PUBLISH, request, "wamp.error.not_authorized")));
                }
                // The publisher is left out unless it asks otherwise.
                let exclude_me = !matches!(options.get("exclude_me"), Some(Value::Bool(false)));
                let publication = self.realm.state().publish(
                    &topic,
                    exclude_me.then_some(self.session),
                    Dict::new(),
                    args,
                    kwargs,
                );
                acknowledge.then_some(Message::Published {
                    request,
                    publication,
                })
            }
            Message::Register {
                request,
                options: _,
                procedure,
            } => {
                if !self.allowed(WampVerb::Register, &procedure) {
                    not_authorized(m::REGISTER, request)
                } else {
                    match self.realm.state().register(self.session, procedure) {
                        Some(registration) => Some(Message::Registered {
                            request,
                            registration,
                        }),
                        None => Some(error(
                            m::REGISTER,
                            request,
                            "wamp.error.procedure_already_exists",
                        )),
                    }
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
                options: _,
                procedure,
                args,
                kwargs,
            } => {
                if !self.allowed(WampVerb::Call, &procedure) {
                    not_authorized(m::CALL, request)
                } else if self
                    .realm
                    .state()
                    .call(self.session, request, &procedure, args, kwargs)
                {
                    None
                } else {
                    Some(error(m::CALL, request, "wamp.error.no_such_procedure"))
                }
            }
            Message::Yield {
                request,
                options: _,
                args,
                kwargs,
            } => {
                self.realm
                    .state()
                    .answer(self.session, request, |caller_request| Message::Result {
                        request: caller_request,
                        details: Dict::new(),
                        args,
                        kwargs,
                    });
                None
            }
            Message::Error {
                request_type: m::INVOCATION,
                request,
                details,
                error,
                args,
                kwargs,
            } => {
                self.realm
                    .state()
                    .answer(self.session, request, |caller_request| Message::Error {
                        request_type: m::CALL,
                        request: caller_request,
                        details,
                        error,
                        args,
                        kwargs,
                    });
                None
            }
            _ => return Err("a message a client does not send, or not now"),
        })
    }
}
