//! Realms and what happens in them: the sessions joined, subscriptions and
//! registrations, and calls in progress. Realms share nothing: a session
//! sees only its own realm's.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::message::{Id, Message};
use super::value::Dict;
use crate::authz::Policy;
use crate::identity::Authenticator;

/// The router's share of the current config.
pub struct Settings {
    pub policy: Policy,
    pub authn: Authenticator,
    pub anonymous: bool,
    pub ticket: bool,
    pub max_queued: usize,
    pub max_message: usize,
}

/// What the router keeps of a joined session: where its messages go.
pub struct Member {
    pub tx: mpsc::Sender<Message>,
}

#[derive(Default)]
pub struct RealmState {
    pub sessions: HashMap<Id, Member>,
    subscription_by_topic: HashMap<String, Id>,
    /// Subscription id -> topic and subscribers.
    subscriptions: HashMap<Id, (String, HashSet<Id>)>,
    registration_by_procedure: HashMap<String, Id>,
    /// Registration id -> procedure and callee.
    registrations: HashMap<Id, (String, Id)>,
    /// Invocation id -> caller, the caller's request id, callee.
    pending: HashMap<Id, (Id, Id, Id)>,
    next_id: Id,
}

pub struct Realm {
    pub name: Arc<str>,
    state: Mutex<RealmState>,
}

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

impl RealmState {
    fn id(&mut self) -> Id {
        self.next_id += 1;
        self.next_id
    }

    /// Sends to a session; one whose queue is full is too slow and is
    /// dropped from the realm (its connection then ends).
    fn send(&mut self, to: Id, m: Message) {
        let full = match self.sessions.get(&to) {
            Some(member) => member.tx.try_send(m).is_err(),
            None => false,
        };
        if full {
            tracing::warn!(
                session = to,
                "WAMP session too slow (its queue is full); closing it"
            );
            self.sessions.remove(&to);
        }
    }

    pub fn subscribe(&mut self, session: Id, topic: String) -> Id {
        let id = match self.subscription_by_topic.get(&topic) {
            Some(id) => *id,
            None => {
                let id = self.id();
                self.subscription_by_topic.insert(topic.clone(), id);
                self.subscriptions.insert(id, (topic, HashSet::new()));
                id
            }
        };
        if let Some((_, members)) = self.subscriptions.get_mut(&id) {
            members.insert(session);
        }
        id
    }

    /// Whether the session had that subscription.
    pub fn unsubscribe(&mut self, session: Id, id: Id) -> bool {
        let Some((topic, members)) = self.subscriptions.get_mut(&id) else {
            return false;
        };
        let had = members.remove(&session);
        if members.is_empty() {
            let topic = topic.clone();
            self.subscriptions.remove(&id);
            self.subscription_by_topic.remove(&topic);
        }
        had
    }

    /// Delivers an event to the topic's subscribers (but `exclude`);
    /// returns the publication id.
    pub fn publish(
        &mut self,
        topic: &str,
        exclude: Option<Id>,
        details: Dict,
        args: Option<super::Value>,
        kwargs: Option<super::Value>,
    ) -> Id {
        let publication = fastrand::u64(1..1 << 53);
        let Some(id) = self.subscription_by_topic.get(topic).copied() else {
            return publication;
        };
        let members: Vec<Id> = self
            .subscriptions
            .get(&id)
            .map(|(_, m)| m.iter().copied().filter(|s| Some(*s) != exclude).collect())
            .unwrap_or_default();
        for to in members {
            self.send(
                to,
                Message::Event {
                    subscription: id,
                    publication,
                    details: details.clone(),
                    args: args.clone(),
                    kwargs: kwargs.clone(),
                },
            );
        }
        publication
    }

    pub fn register(&mut self, session: Id, procedure: String) -> Option<Id> {
        if self.registration_by_procedure.contains_key(&procedure) {
            return None;
        }
        let id = self.id();
        self.registration_by_procedure.insert(procedure.clone(), id);
        self.registrations.insert(id, (procedure, session));
        Some(id)
    }

    pub fn unregister(&mut self, session: Id, id: Id) -> bool {
        match self.registrations.get(&id) {
            Some((procedure, callee)) if *callee == session => {
                let procedure = procedure.clone();
                self.registrations.remove(&id);
                self.registration_by_procedure.remove(&procedure);
                true
            }
            _ => false,
        }
    }

    /// Hands a call to its callee; `false` when nobody registered it.
    pub fn call(
        &mut self,
        caller: Id,
        request: Id,
        procedure: &str,
        args: Option<super::Value>,
        kwargs: Option<super::Value>,
    ) -> bool {
        let Some(reg) = self.registration_by_procedure.get(procedure).copied() else {
            return false;
        };
        let Some((_, callee)) = self.registrations.get(&reg).cloned() else {
            return false;
        };
        let invocation = self.id();
        self.pending.insert(invocation, (caller, request, callee));
        self.send(
            callee,
            Message::Invocation {
                request: invocation,
                registration: reg,
                details: Dict::new(),
                args,
                kwargs,
            },
        );
        true
    }

    /// A callee's YIELD or ERROR for an invocation it was given.
    pub fn answer(&mut self, callee: Id, invocation: Id, to_caller: impl FnOnce(Id) -> Message) {
        match self.pending.get(&invocation) {
            Some((_, _, c)) if *c == callee => {}
            _ => return,
        }
        if let Some((caller, request, _)) = self.pending.remove(&invocation) {
            self.send(caller, to_caller(request));
        }
    }

    /// A session left: its subscriptions and registrations go, calls it was
    /// serving fail at once, calls it made are forgotten.
    pub fn leave(&mut self, session: Id) {
        self.sessions.remove(&session);
        let subs: Vec<Id> = self
            .subscriptions
            .iter()
            .filter(|(_, (_, m))| m.contains(&session))
            .map(|(id, _)| *id)
            .collect();
        for id in subs {
            self.unsubscribe(session, id);
        }
        let regs: Vec<Id> = self
            .registrations
            .iter()
            .filter(|(_, (_, c))| *c == session)
            .map(|(id, _)| *id)
            .collect();
        for id in regs {
            self.unregister(session, id);
        }
        let gone: Vec<(Id, Id, Id, Id)> = self
            .pending
            .iter()
            .filter(|(_, (caller, _, callee))| *callee == session || *caller == session)
            .map(|(inv, (caller, request, callee))| (*inv, *caller, *request, *callee))
            .collect();
        for (inv, caller, request, callee) in gone {
            self.pending.remove(&inv);
            if callee == session && caller != session {
                self.send(
                    caller,
                    error(super::message::CALL, request, "wamp.error.canceled"),
                );
            }
        }
    }
}

impl Realm {
    pub fn state(&self) -> MutexGuard<'_, RealmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Router {
    pub realms: HashMap<String, Arc<Realm>>,
    pub settings: ArcSwap<Settings>,
}

impl Router {
    pub fn new(realms: &[String], settings: Settings) -> Router {
        Router {
            realms: realms
                .iter()
                .map(|r| {
                    (
                        r.clone(),
                        Arc::new(Realm {
                            name: Arc::from(r.as_str()),
                            state: Mutex::new(RealmState::default()),
                        }),
                    )
                })
                .collect(),
            settings: ArcSwap::from_pointee(settings),
        }
    }
}
