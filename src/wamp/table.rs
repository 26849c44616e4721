//! What subscriptions and registrations share: a URI with a match policy
//! and the sessions on it, kept by id, found by exact URI at once and by
//! pattern through the (few) prefix and wildcard entries.

use std::collections::HashMap;

use super::message::Id;
use super::router::{now_text, policy_name, uri_matches};
use super::value::{Dict, Value};
use crate::authz::MatchPolicy;

pub struct Entry<T> {
    pub uri: String,
    pub policy: MatchPolicy,
    /// Subscribers or callees, in the order they came.
    pub sessions: Vec<Id>,
    pub created: String,
    /// What only one kind has (a registration's invocation policy).
    pub kind: T,
}

impl<T> Entry<T> {
    pub fn new(uri: String, policy: MatchPolicy, session: Id, kind: T) -> Entry<T> {
        Entry {
            uri,
            policy,
            sessions: vec![session],
            created: now_text(),
            kind,
        }
    }

    /// The meta API's description (`wamp.subscription.get`, `on_create`).
    pub fn details(&self, id: Id) -> Dict {
        Dict::from([
            ("id".into(), Value::UInt(id)),
            ("created".into(), Value::Str(self.created.clone())),
            ("uri".into(), Value::Str(self.uri.clone())),
            ("match".into(), Value::Str(policy_name(self.policy).into())),
        ])
    }
}

pub struct Table<T> {
    pub entries: HashMap<Id, Entry<T>>,
    exact: HashMap<String, Id>,
    /// Prefix and wildcard entries, looked through on each lookup by URI.
    patterns: Vec<Id>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            entries: HashMap::new(),
            exact: HashMap::new(),
            patterns: Vec::new(),
        }
    }
}

impl<T> Table<T> {
    /// The entry for exactly this URI and policy.
    pub fn lookup(&self, uri: &str, policy: MatchPolicy) -> Option<Id> {
        match policy {
            MatchPolicy::Exact => self.exact.get(uri).copied(),
            _ => self.patterns.iter().copied().find(|id| {
                self.entries
                    .get(id)
                    .is_some_and(|e| e.policy == policy && e.uri == uri)
            }),
        }
    }

    /// The exact entry for `uri`, if any, then every pattern that matches it.
    pub fn matching<'a>(&'a self, uri: &'a str) -> impl Iterator<Item = (Id, &'a Entry<T>)> + 'a {
        let exact = self
            .exact
            .get(uri)
            .and_then(|id| self.entries.get(id).map(|e| (*id, e)));
        let patterns = self.patterns.iter().filter_map(move |id| {
            let e = self.entries.get(id)?;
            uri_matches(e.policy, &e.uri, uri).then_some((*id, e))
        });
        exact.into_iter().chain(patterns)
    }

    pub fn insert(&mut self, id: Id, entry: Entry<T>) {
        match entry.policy {
            MatchPolicy::Exact => {
                self.exact.insert(entry.uri.clone(), id);
            }
            _ => self.patterns.push(id),
        }
        self.entries.insert(id, entry);
    }

    /// Takes the session off the entry; `None` when it was not on it,
    /// `Some(true)` when that emptied (and removed) the entry.
    pub fn remove_session(&mut self, id: Id, session: Id) -> Option<bool> {
        let entry = self.entries.get_mut(&id)?;
        let at = entry.sessions.iter().position(|s| *s == session)?;
        entry.sessions.remove(at);
        if !entry.sessions.is_empty() {
            return Some(false);
        }
        if let Some(entry) = self.entries.remove(&id) {
            match entry.policy {
                MatchPolicy::Exact => {
                    self.exact.remove(&entry.uri);
                }
                _ => self.patterns.retain(|p| *p != id),
            }
        }
        Some(true)
    }

    /// The entries a session is on.
    pub fn of_session(&self, session: Id) -> Vec<Id> {
        self.entries
            .iter()
            .filter(|(_, e)| e.sessions.contains(&session))
            .map(|(id, _)| *id)
            .collect()
    }

    /// `wamp.subscription.list`, `wamp.registration.list`: ids by policy.
    pub fn list(&self) -> Dict {
        let of = |policy| {
            let mut ids: Vec<Id> = self
                .entries
                .iter()
                .filter(|(_, e)| e.policy == policy)
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
