//! The broker: subscriptions (exact, prefix, wildcard) and delivering a
//! publication to them, with publisher exclusion, black and white listing
//! by session, authid and authrole, and publisher disclosure. Subscribers of
//! one URI and match policy share one subscription.

use super::message::{Id, Message};
use std::sync::Arc;

use super::router::{Outgoing, RealmState, Shared};
use super::table::{Entry, Table};
use super::value::{Dict, Value};
use crate::authz::MatchPolicy;

/// Subscriptions: one per URI and match policy, shared by its
/// subscribers.
pub type Broker = Table<()>;

/// A publication on its way to the subscribers: one published here, or on
/// another node (cluster mode), or a meta event. Every one passes the same
/// matching and filtering ([`RealmState::publish`]).
pub struct Delivery<'a> {
    pub topic: &'a str,
    pub publication: Id,
    /// The publishing session on this node, for `exclude_me` (none for
    /// meta events and publications from other nodes).
    pub publisher: Option<Id>,
    /// PUBLISH's options: `exclude_me`, `exclude`, `exclude_authid`,
    /// `exclude_authrole`, `eligible`, `eligible_authid`, `eligible_authrole`.
    pub options: &'a Dict,
    /// The publisher (session, authid, authrole), when disclosed.
    pub disclosed: Option<(Id, &'a str, &'a str)>,
    pub args: Option<Value>,
    pub kwargs: Option<Value>,
}

/// The options that pick subscribers, the ones that travel with a
/// publication to other nodes (`exclude_me` concerns the publisher's node).
pub const FILTERS: [&str; 6] = [
    "exclude",
    "exclude_authid",
    "exclude_authrole",
    "eligible",
    "eligible_authid",
    "eligible_authrole",
];

fn ids(options: &Dict, key: &str) -> Option<Vec<Id>> {
    match options.get(key)? {
        Value::List(l) => Some(l.iter().filter_map(Value::as_id).collect()),
        _ => Some(Vec::new()),
    }
}

fn texts<'a>(options: &'a Dict, key: &str) -> Option<Vec<&'a str>> {
    match options.get(key)? {
        Value::List(l) => Some(l.iter().filter_map(Value::as_str).collect()),
        Value::Str(s) => Some(vec![s.as_str()]),
        _ => Some(Vec::new()),
    }
}

impl RealmState {
    /// Adds the session to the subscription for `uri` and `policy` (made
    /// when it is the first); a second SUBSCRIBE of the same gets the same
    /// id.
    pub fn subscribe(&mut self, session: Id, uri: String, policy: MatchPolicy) -> Id {
        if let Some(id) = self.broker.lookup(&uri, policy) {
            let Some(sub) = self.broker.entries.get_mut(&id) else {
                return id;
            };
            if !sub.sessions.contains(&session) {
                sub.sessions.push(session);
                self.held(session, false, 1);
                self.meta_event(
                    "wamp.subscription.on_subscribe",
                    vec![Value::UInt(session), Value::UInt(id)],
                );
            }
            return id;
        }
        let id = self.id();
        let sub = Entry::new(uri, policy, session, ());
        let details = sub.details(id);
        self.broker.insert(id, sub);
        self.held(session, false, 1);
        self.meta_event(
            "wamp.subscription.on_create",
            vec![Value::UInt(session), Value::Dict(details)],
        );
        self.meta_event(
            "wamp.subscription.on_subscribe",
            vec![Value::UInt(session), Value::UInt(id)],
        );
        id
    }

    /// Whether the session had that subscription.
    pub fn unsubscribe(&mut self, session: Id, id: Id) -> bool {
        let Some(emptied) = self.broker.remove_session(id, session) else {
            return false;
        };
        self.held(session, false, -1);
        let args = || vec![Value::UInt(session), Value::UInt(id)];
        self.meta_event("wamp.subscription.on_unsubscribe", args());
        if emptied {
            self.meta_event("wamp.subscription.on_delete", args());
        }
        true
    }

    /// Delivers a publication to every subscription it reaches, each
    /// subscriber once per subscription.
    pub fn publish(&mut self, d: &Delivery<'_>) {
        let publication = d.publication;
        let exclude_me = !matches!(d.options.get("exclude_me"), Some(Value::Bool(false)));
        let exclude = ids(d.options, "exclude");
        let eligible = ids(d.options, "eligible");
        let exclude_authid = texts(d.options, "exclude_authid");
        let exclude_authrole = texts(d.options, "exclude_authrole");
        let eligible_authid = texts(d.options, "eligible_authid");
        let eligible_authrole = texts(d.options, "eligible_authrole");
        let mut publisher_details = Dict::new();
        if let Some((session, authid, authrole)) = d.disclosed {
            publisher_details.insert("publisher".into(), Value::UInt(session));
            publisher_details.insert("publisher_authid".into(), Value::Str(authid.to_owned()));
            publisher_details.insert("publisher_authrole".into(), Value::Str(authrole.to_owned()));
        }
        // One EVENT per subscription, shared by its subscribers and encoded
        // once per serializer.
        let mut out: Vec<(Id, Arc<Shared>)> = Vec::new();
        for (sub_id, sub) in self.broker.matching(d.topic) {
            let mut details = publisher_details.clone();
            if sub.policy != MatchPolicy::Exact {
                details.insert("topic".into(), Value::Str(d.topic.to_owned()));
            }
            let event = Arc::new(Shared::new(Message::Event {
                subscription: sub_id,
                publication,
                details,
                args: d.args.clone(),
                kwargs: d.kwargs.clone(),
            }));
            for &to in &sub.sessions {
                if exclude_me && Some(to) == d.publisher {
                    continue;
                }
                let Some(member) = self.sessions.get(&to) else {
                    continue;
                };
                let listed = |list: &Option<Vec<&str>>, value: &str| {
                    list.as_ref().is_some_and(|l| l.contains(&value))
                };
                let excluded = exclude.as_ref().is_some_and(|l| l.contains(&to))
                    || listed(&exclude_authid, &member.authid)
                    || listed(&exclude_authrole, &member.authrole);
                let eligible_ok = eligible.as_ref().is_none_or(|l| l.contains(&to))
                    && eligible_authid
                        .as_ref()
                        .is_none_or(|l| l.contains(&&*member.authid))
                    && eligible_authrole
                        .as_ref()
                        .is_none_or(|l| l.contains(&&*member.authrole));
                if excluded || !eligible_ok {
                    continue;
                }
                out.push((to, event.clone()));
            }
        }
        if d.publisher.is_some() {
            self.metrics.publishes.inc();
        }
        self.metrics.events.inc_by(out.len() as u64);
        for (to, event) in out {
            self.deliver_to(to, Outgoing::Shared(event));
        }
    }
}
