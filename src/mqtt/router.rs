//! Who gets a message: subscriptions in a tree of topic levels, so a
//! publish walks the levels of its topic (and the `+` and `#` branches)
//! instead of testing every filter. Shared subscriptions (`$share/g/f`)
//! hand each message to one member of the group, in turn.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::codec::QoS;
use super::session::Session;

/// How a client subscribed (MQTT 5 subscription options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// The subscription identifier (v5), if the SUBSCRIBE carried one.
    pub id: Option<usize>,
}

#[derive(Clone)]
struct Subscriber {
    session: Arc<Session>,
    options: SubOptions,
}

struct Group {
    name: Box<str>,
    members: Vec<Subscriber>,
    next: AtomicUsize,
}

impl Group {
    /// One member, in turn, skipping members whose client is away (their
    /// share goes to one that is there, when there is one).
    fn pick(&self, out: &mut Vec<Target>) {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let pick = (0..n)
            .map(|i| &self.members[(start + i) % n])
            .find(|m| m.session.is_connected())
            .or_else(|| self.members.get(start % n));
        if let Some(m) = pick {
            out.push(Target {
                session: m.session.clone(),
                options: m.options,
            });
        }
    }
}

/// Which subscriptions a message is for.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every one (a message of this node alone).
    All,
    /// Not the shared ones (theirs travel through the bus's queue groups).
    Direct,
    /// One shared subscription: a member of `group` subscribed to `filter`.
    Group { group: &'a str, filter: &'a str },
}

/// A distinct subscription as the bus sees it: a filter, or a shared
/// subscription's group and filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FilterKey {
    pub share: Option<Box<str>>,
    pub filter: Box<str>,
}

/// Told when a [`FilterKey`] gains its first subscriber or loses its last.
pub trait Interest: Send + Sync {
    fn changed(&self, key: FilterKey);
}

#[derive(Default)]
struct Subscribers {
    direct: Vec<Subscriber>,
    shared: Vec<Group>,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_empty()
    }

    fn collect(&self, origin: u64, scope: Scope<'_>, out: &mut Vec<Target>) {
        self.collect_direct(origin, out);
        if let Scope::All = scope {
            for g in &self.shared {
                g.pick(out);
            }
        }
    }

    fn collect_direct(&self, origin: u64, out: &mut Vec<Target>) {
        for s in &self.direct {
            if s.options.no_local && s.session.id == origin {
                continue;
            }
            out.push(Target {
                session: s.session.clone(),
                options: s.options,
            });
        }
    }

    fn insert(&mut self, share: Option<&str>, sub: Subscriber) -> bool {
        let list = match share {
            None => &mut self.direct,
            Some(name) => {
                let i = match self.shared.iter().position(|g| &*g.name == name) {
                    Some(i) => i,
                    None => {
                        self.shared.push(Group {
                            name: name.into(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        self.shared.len() - 1
                    }
                };
                &mut self.shared[i].members
            }
        };
        match list.iter_mut().find(|s| s.session.id == sub.session.id) {
            Some(existing) => {
                existing.options = sub.options;
                false
            }
            None => {
                list.push(sub);
                true
            }
        }
    }

    fn remove(&mut self, share: Option<&str>, session: u64) -> bool {
        match share {
            None => {
                let before = self.direct.len();
                self.direct.retain(|s| s.session.id != session);
                before != self.direct.len()
            }
            Some(name) => {
                let Some(g) = self.shared.iter_mut().find(|g| &*g.name == name) else {
                    return false;
                };
                let before = g.members.len();
                g.members.retain(|s| s.session.id != session);
                let removed = before != g.members.len();
                self.shared.retain(|g| !g.members.is_empty());
                removed
            }
        }
    }
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Subscribers whose filter ends here.
    here: Subscribers,
    /// Subscribers of `<this level>/#`: this level and everything below.
    rest: Subscribers,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.rest.is_empty()
    }
}

/// A session a message goes to, with the options of (one of) its
/// matching subscriptions.
pub struct Target {
    pub session: Arc<Session>,
    pub options: SubOptions,
}

#[derive(Default)]
pub struct Router {
    root: Node,
    count: usize,
    /// Subscribers per distinct filter (and group), kept while someone
    /// listens to `interest`.
    filters: HashMap<FilterKey, usize>,
    interest: Option<Arc<dyn Interest>>,
}

impl Router {
    /// Adds or replaces `session`'s subscription to `filter` (valid, without
    /// `$share/`); whether it is new.
    pub fn subscribe(
        &mut self,
        share: Option<&str>,
        filter: &str,
        session: Arc<Session>,
        options: SubOptions,
    ) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        let mut rest = false;
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                rest = true;
                break;
            }
            node = node.children.entry(level.into()).or_default();
        }
        let subs = if rest { &mut node.rest } else { &mut node.here };
        let added = subs.insert(share, Subscriber { session, options });
        self.count += usize::from(added);
        if added && let Some(interest) = &self.interest {
            let key = FilterKey {
                share: share.map(Box::from),
                filter: filter.into(),
            };
            let n = self.filters.entry(key.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                interest.changed(key);
            }
        }
        added
    }

    /// Tells `interest` of every change from now on, and of every filter
    /// subscribed so far.
    pub fn set_interest(&mut self, interest: Arc<dyn Interest>) {
        fn walk(node: &Node, path: &mut Vec<String>, out: &mut HashMap<FilterKey, usize>) {
            let mut add = |subs: &Subscribers, filter: String| {
                if !subs.direct.is_empty() {
                    let key = FilterKey {
                        share: None,
                        filter: filter.as_str().into(),
                    };
                    *out.entry(key).or_insert(0) += subs.direct.len();
                }
                for g in &subs.shared {
                    let key = FilterKey {
                        share: Some(g.name.clone()),
                        filter: filter.as_str().into(),
                    };
                    *out.entry(key).or_insert(0) += g.members.len();
                }
            };
            if !path.is_empty() {
                add(&node.here, path.join("/"));
            }
            let mut rest = path.clone();
            rest.push("#".into());
            add(&node.rest, rest.join("/"));
            for (level, child) in &node.children {
                path.push(level.to_string());
                walk(child, path, out);
                path.pop();
            }
        }
        let mut filters = HashMap::new();
        walk(&self.root, &mut Vec::new(), &mut filters);
        for key in filters.keys() {
            interest.changed(key.clone());
        }
        self.filters = filters;
        self.interest = Some(interest);
    }

    /// Whether anyone subscribes to `key` (tracked once an interest is set).
    pub fn has_filter(&self, key: &FilterKey) -> bool {
        self.filters.contains_key(key)
    }

    /// Whether there was such a subscription.
    pub fn unsubscribe(&mut self, share: Option<&str>, filter: &str, session: u64) -> bool {
        fn walk(node: &mut Node, levels: &[&str], share: Option<&str>, session: u64) -> bool {
            match levels {
                [] => node.here.remove(share, session),
                ["#"] => node.rest.remove(share, session),
                [first, tail @ ..] => {
                    let Some(child) = node.children.get_mut(*first) else {
                        return false;
                    };
                    let removed = walk(child, tail, share, session);
                    if child.is_empty() {
                        node.children.remove(*first);
                    }
                    removed
                }
            }
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = walk(&mut self.root, &levels, share, session);
        self.count -= usize::from(removed);
        if removed && let Some(interest) = &self.interest {
            let key = FilterKey {
                share: share.map(Box::from),
                filter: filter.into(),
            };
            if let Some(n) = self.filters.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.filters.remove(&key);
                    interest.changed(key);
                }
            }
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every subscription matching `topic`, one entry per matching
    /// subscription (a session subscribed twice appears twice; the broker
    /// merges them). `origin` is the publishing session, for no-local.
    pub fn matches(&self, topic: &str, origin: u64, out: &mut Vec<Target>) {
        self.matches_in(topic, origin, Scope::All, out);
    }

    /// [`Router::matches`] among the subscriptions `scope` names.
    pub fn matches_in(&self, topic: &str, origin: u64, scope: Scope<'_>, out: &mut Vec<Target>) {
        if let Scope::Group { group, filter } = scope {
            return self.group_member(group, filter, out);
        }
        let levels: Vec<&str> = topic.split('/').collect();
        // `+` and `#` at the first level never match a `$` topic.
        let dollar = topic.starts_with('$');
        // `node.rest` holds `<level>/#`, which matches that level too.
        struct Walk<'s, 'o> {
            dollar: bool,
            origin: u64,
            scope: Scope<'s>,
            out: &'o mut Vec<Target>,
        }
        fn walk(w: &mut Walk<'_, '_>, node: &Node, levels: &[&str], first: bool) {
            let wild = !(first && w.dollar);
            if wild {
                node.rest.collect(w.origin, w.scope, w.out);
            }
            let Some((level, tail)) = levels.split_first() else {
                node.here.collect(w.origin, w.scope, w.out);
                return;
            };
            if let Some(child) = node.children.get(*level) {
                walk(w, child, tail, false);
            }
            if wild && let Some(child) = node.children.get("+") {
                walk(w, child, tail, false);
            }
        }
        let mut w = Walk {
            dollar,
            origin,
            scope,
            out,
        };
        walk(&mut w, &self.root, &levels, true);
    }

    /// One member of the shared subscription `$share/<group>/<filter>`.
    fn group_member(&self, group: &str, filter: &str, out: &mut Vec<Target>) {
        let mut node = &self.root;
        let mut levels = filter.split('/').peekable();
        let mut rest = false;
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                rest = true;
                break;
            }
            match node.children.get(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let subs = if rest { &node.rest } else { &node.here };
        if let Some(g) = subs.shared.iter().find(|g| &*g.name == group) {
            g.pick(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }

    #[test]
    fn walks_levels_and_wildcards() {
        let mut r = Router::default();
        let s: Vec<Arc<Session>> = (1..=6).map(Session::for_test).collect();
        r.subscribe(None, "a/b", s[0].clone(), opts(QoS::AtMostOnce));
        r.subscribe(None, "a/+", s[1].clone(), opts(QoS::AtLeastOnce));
        r.subscribe(None, "a/#", s[2].clone(), opts(QoS::AtMostOnce));
        r.subscribe(None, "#", s[3].clone(), opts(QoS::AtMostOnce));
        r.subscribe(None, "+/b", s[4].clone(), opts(QoS::AtMostOnce));
        r.subscribe(None, "$SYS/#", s[5].clone(), opts(QoS::AtMostOnce));
        let who = |r: &Router, topic: &str| {
            let mut out = Vec::new();
            r.matches(topic, 0, &mut out);
            let mut ids: Vec<u64> = out.iter().map(|t| t.session.id).collect();
            ids.sort();
            ids
        };
        assert_eq!(who(&r, "a/b"), [1, 2, 3, 4, 5]);
        assert_eq!(who(&r, "a"), [3, 4], "`a/#` matches `a`");
        assert_eq!(who(&r, "a/c/d"), [3, 4]);
        assert_eq!(who(&r, "x/b"), [4, 5]);
        assert_eq!(
            who(&r, "$SYS/uptime"),
            [6],
            "no leading wildcard reaches `$`"
        );
        assert_eq!(r.len(), 6);
        assert!(r.unsubscribe(None, "a/#", 3));
        assert!(!r.unsubscribe(None, "a/#", 3));
        assert_eq!(who(&r, "a/c/d"), [4]);
    }

    #[test]
    fn shared_groups_take_turns() {
        let mut r = Router::default();
        let s: Vec<Arc<Session>> = (1..=3).map(Session::for_test).collect();
        for session in &s {
            session.set_connected_for_test(true);
            r.subscribe(Some("g"), "jobs/+", session.clone(), opts(QoS::AtLeastOnce));
        }
        let mut counts = [0; 3];
        for _ in 0..30 {
            let mut out = Vec::new();
            r.matches("jobs/1", 0, &mut out);
            assert_eq!(out.len(), 1);
            counts[(out[0].session.id - 1) as usize] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
        // A member that is away is skipped.
        s[0].set_connected_for_test(false);
        for _ in 0..10 {
            let mut out = Vec::new();
            r.matches("jobs/1", 0, &mut out);
            assert_ne!(out[0].session.id, 1);
        }
    }
}
