//! The broker: subscriptions (exact, prefix, wildcard) and delivering a
//! publication to them, with publisher exclusion, black and white listing
//! by session, authid and authrole, and publisher disclosure. Subscribers of
//! one URI and match policy share one subscription.

use std::collections::HashMap;

use super::message::{Id, Message};
use super::router::{RealmState, global_id, now_text, policy_name, uri_matches};
use super::value::{Dict, Value};
use crate::authz::MatchPolicy;

pub struct Subscription {
    pub uri: String,
    pub policy: MatchPolicy,
    pub subscribers: Vec<Id>,
    pub created: String,
}

impl Subscription {
    pub fn details(&self, id: Id) -> Dict {
        Dict::from([
            ("id".into(), Value::UInt(id)),
            ("created".into(), Value::Str(self.created.clone())),
            ("uri".into(), Value::Str(self.uri.clone())),
            ("match".into(), Value::Str(policy_name(self.policy).into())),
        ])
    }
}

#[derive(Default)]
pub struct Broker {
    pub subscriptions: HashMap<Id, Subscription>,
    exact: HashMap<String, Id>,
    /// Prefix and wildcard subscriptions, looked through on each publish.
    patterns: Vec<Id>,
}

/// A publication on its way to the subscribers.
pub struct Delivery<'a> {
    pub topic: &'a str,
    /// The publishing session (none for the router's meta events).
    pub publisher: Option<Id>,
    /// PUBLISH's options: `exclude_me`, `exclude`, `exclude_authid`,
    /// `exclude_authrole`, `eligible`, `eligible_authid`, `eligible_authrole`.
    pub options: &'a Dict,
    pub disclose: bool,
    pub args: Option<Value>,
    pub kwargs: Option<Value>,
}

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

impl Broker {
    /// The subscription a SUBSCRIBE with this URI and policy joins, if any.
    pub fn lookup(&self, uri: &str, policy: MatchPolicy) -> Option<Id> {
        match policy {
            MatchPolicy::Exact => self.exact.get(uri).copied(),
            _ => self.patterns.iter().copied().find(|id| {
                self.subscriptions
                    .get(id)
                    .is_some_and(|s| s.policy == policy && s.uri == uri)
            }),
        }
    }

    /// Every subscription a publication to `topic` reaches.
    pub fn matching(&self, topic: &str) -> Vec<Id> {
        let mut out: Vec<Id> = self.exact.get(topic).copied().into_iter().collect();
        out.extend(self.patterns.iter().copied().filter(|id| {
            self.subscriptions
                .get(id)
                .is_some_and(|s| uri_matches(s.policy, &s.uri, topic))
        }));
        out
    }

    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.exact.contains_key(topic) || !self.matching(topic).is_empty()
    }

    pub fn subscriptions_of(&self, session: Id) -> Vec<Id> {
        self.subscriptions
            .iter()
            .filter(|(_, s)| s.subscribers.contains(&session))
            .map(|(id, _)| *id)
            .collect()
    }

    /// `wamp.subscription.list`: ids by match policy.
    pub fn list(&self) -> Dict {
        let of = |policy| {
            let mut ids: Vec<Id> = self
                .subscriptions
                .iter()
                .filter(|(_, s)| s.policy == policy)
                .map(|(id, _)| *id)
                .collect();
            ids.sort_unstable();
            Value::List(ids.into_iter().map(Value::UInt).collect())
        };
        Dict::from([
            ("exact".into(), of(MatchPolicy::Exact)),
            ("prefix".into(), of(MatchPolicy::Prefix)),
            ("wildcard".into(), of(MatchPolicy::Wildcard)),
        ])
    }
}

impl RealmState {
    /// Adds the session to the subscription for `uri` and `policy` (made
    /// when it is the first); a second SUBSCRIBE of the same gets the same
    /// id.
    pub fn subscribe(&mut self, session: Id, uri: String, policy: MatchPolicy) -> Id {
        let (id, created) = match self.broker.lookup(&uri, policy) {
            Some(id) => (id, false),
            None => {
                let id = self.id();
                match policy {
                    MatchPolicy::Exact => {
                        self.broker.exact.insert(uri.clone(), id);
                    }
                    _ => self.broker.patterns.push(id),
                }
                self.broker.subscriptions.insert(
                    id,
                    Subscription {
                        uri,
                        policy,
                        subscribers: Vec::new(),
                        created: now_text(),
                    },
                );
                (id, true)
            }
        };
        let Some(sub) = self.broker.subscriptions.get_mut(&id) else {
            return id;
        };
        if sub.subscribers.contains(&session) {
            return id;
        }
        sub.subscribers.push(session);
        let details = sub.details(id);
        if created {
            self.meta_event(
                "wamp.subscription.on_create",
                vec![Value::UInt(session), Value::Dict(details)],
            );
        }
        self.meta_event(
            "wamp.subscription.on_subscribe",
            vec![Value::UInt(session), Value::UInt(id)],
        );
        id
    }

    /// Whether the session had that subscription.
    pub fn unsubscribe(&mut self, session: Id, id: Id) -> bool {
        let Some(sub) = self.broker.subscriptions.get_mut(&id) else {
            return false;
        };
        let Some(at) = sub.subscribers.iter().position(|s| *s == session) else {
            return false;
        };
        sub.subscribers.swap_remove(at);
        let empty = sub.subscribers.is_empty();
        self.meta_event(
            "wamp.subscription.on_unsubscribe",
            vec![Value::UInt(session), Value::UInt(id)],
        );
        if empty && let Some(sub) = self.broker.subscriptions.remove(&id) {
            match sub.policy {
                MatchPolicy::Exact => {
                    self.broker.exact.remove(&sub.uri);
                }
                _ => self.broker.patterns.retain(|p| *p != id),
            }
            self.meta_event(
                "wamp.subscription.on_delete",
                vec![Value::UInt(session), Value::UInt(id)],
            );
        }
        true
    }

    /// Delivers a publication to every subscription it reaches, each
    /// subscriber once per subscription; returns the publication id.
    pub fn publish(&mut self, d: &Delivery<'_>) -> Id {
        let publication = global_id();
        let exclude_me = !matches!(d.options.get("exclude_me"), Some(Value::Bool(false)));
        let exclude = ids(d.options, "exclude");
        let eligible = ids(d.options, "eligible");
        let exclude_authid = texts(d.options, "exclude_authid");
        let exclude_authrole = texts(d.options, "exclude_authrole");
        let eligible_authid = texts(d.options, "eligible_authid");
        let eligible_authrole = texts(d.options, "eligible_authrole");
        let mut publisher_details = Dict::new();
        if d.disclose
            && let Some(p) = d
                .publisher
                .and_then(|p| self.sessions.get(&p).map(|m| (p, m)))
        {
            publisher_details.insert("publisher".into(), Value::UInt(p.0));
            publisher_details.insert(
                "publisher_authid".into(),
                Value::Str(p.1.authid.to_string()),
            );
            publisher_details.insert(
                "publisher_authrole".into(),
                Value::Str(p.1.authrole.to_string()),
            );
        }
        let mut out: Vec<(Id, Message)> = Vec::new();
        for sub_id in self.broker.matching(d.topic) {
            let Some(sub) = self.broker.subscriptions.get(&sub_id) else {
                continue;
            };
            let mut details = publisher_details.clone();
            if sub.policy != MatchPolicy::Exact {
                details.insert("topic".into(), Value::Str(d.topic.to_owned()));
            }
            for &to in &sub.subscribers {
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
                out.push((
                    to,
                    Message::Event {
                        subscription: sub_id,
                        publication,
                        details: details.clone(),
                        args: d.args.clone(),
                        kwargs: d.kwargs.clone(),
                    },
                ));
            }
        }
        if d.publisher.is_some() {
            self.metrics.publishes.inc();
        }
        self.metrics.events.inc_by(out.len() as u64);
        for (to, event) in out {
            self.send(to, event);
        }
        publication
    }
}
