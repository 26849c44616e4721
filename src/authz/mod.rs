//! One policy engine for every front-end, pure and deny by default:
//! `(Identity, Action) -> Decision`. Rules are checked in order and the first
//! whose conditions all hold decides; when none does, the answer is deny.
//! HTTP routes, MQTT topics and WAMP URIs all use it, differing only in how a
//! resource splits into segments ([`Resource`]).

mod pattern;
pub mod syntax;

use std::borrow::Cow;
use std::collections::HashSet;

use regex::Regex;
use serde_json::Value;

pub use pattern::{Pattern, Want};

use crate::config::OneOrMany;
use crate::identity::{AuthMethod, CertIdentity, Identity};
use syntax::{CertMatch, ClaimMatch, Conditions, RuleConfig, ScalarValue, SetMatch};

/// How a front-end's resource names split into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Paths: `/`-separated, empty segments ignored (`/a//b/` is `/a/b`),
    /// each segment percent-decoded, so `/%61dmin` is `/admin` to a rule.
    HttpPath,
    /// MQTT topics: `/`-separated, empty levels significant.
    Topic,
    /// WAMP URIs: `.`-separated.
    Uri,
    /// A name taken whole (a tunnel's id).
    Name,
}

impl Resource {
    fn pattern_segments(self, pattern: &str) -> Vec<&str> {
        match self {
            Resource::HttpPath => pattern.split('/').filter(|s| !s.is_empty()).collect(),
            Resource::Topic => pattern.split('/').collect(),
            Resource::Uri => pattern.split('.').collect(),
            Resource::Name => vec![pattern],
        }
    }

    /// Whether a caller's value can stand for one level: not empty, and
    /// free of this kind's separator and wildcards (a user named `+`, `#`
    /// or `a/b` must not widen a pattern).
    pub(crate) fn is_level(self, value: &str) -> bool {
        !value.is_empty()
            && match self {
                Resource::HttpPath => !value.contains('/'),
                Resource::Topic => !value.contains(['/', '+', '#', '\0']),
                Resource::Uri => !value.contains(['.', '#', ' ']),
                Resource::Name => true,
            }
    }
}

/// How an action's resource is read into levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Percent-decoded, empty segments skipped.
    Path,
    /// Each level as written.
    Exact,
    /// MQTT filter: `+` and `#` levels are wildcards.
    Filter,
    /// WAMP wildcard subscription: an empty component is a wildcard.
    Wildcard,
}

/// The levels an action asks for ([`Want`]s), read as they are needed:
/// nothing is allocated unless a path segment holds a `%` escape.
#[derive(Clone)]
pub struct Wanted<'a> {
    parts: std::str::Split<'a, char>,
    reading: Reading,
    /// A WAMP prefix subscription's last component, given last.
    prefix: Option<&'a str>,
}

impl<'a> Iterator for Wanted<'a> {
    type Item = Want<'a>;

    fn next(&mut self) -> Option<Want<'a>> {
        loop {
            let Some(part) = self.parts.next() else {
                return self.prefix.take().map(|p| Want::Prefix(Cow::Borrowed(p)));
            };
            return Some(match (self.reading, part) {
                (Reading::Path, "") => continue,
                (Reading::Path, p) => Want::Exact(percent_decode(p)),
                (Reading::Filter, "+") | (Reading::Wildcard, "") => Want::One,
                (Reading::Filter, "#") => Want::Rest,
                (_, p) => Want::Exact(Cow::Borrowed(p)),
            });
        }
    }
}

/// Decodes `%XX` escapes; a malformed escape or invalid UTF-8 leaves the
/// segment as it was (it then matches only a literal written the same way).
fn percent_decode(segment: &str) -> Cow<'_, str> {
    if !segment.contains('%') {
        return Cow::Borrowed(segment);
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return Cow::Borrowed(segment),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_or(Cow::Borrowed(segment), Cow::Owned)
}

/// A WAMP action's verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WampVerb {
    Call,
    Register,
    Publish,
    Subscribe,
}

/// How a WAMP subscription or registration matches URIs (WAMP §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchPolicy {
    Exact,
    /// Every URI that starts with the given text.
    Prefix,
    /// Empty components match any one component.
    Wildcard,
}

/// What the caller wants to do, in its front-end's terms.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// An HTTP request: its method and canonical path.
    Http { method: &'a str, path: &'a str },
    /// MQTT PUBLISH to a topic name.
    Publish {
        topic: &'a str,
        qos: u8,
        retain: bool,
    },
    /// MQTT SUBSCRIBE with a topic filter (`+`, `#`, `$share/group/...`):
    /// allowed only when every topic it can match is.
    Subscribe { filter: &'a str, qos: u8 },
    /// A WAMP action in a realm; a subscription or registration with a
    /// prefix or wildcard policy is allowed only when every URI it can
    /// match is.
    Wamp {
        verb: WampVerb,
        realm: &'a str,
        uri: &'a str,
        policy: MatchPolicy,
    },
    /// Joining a WebSocket tunnel by its id.
    TunnelJoin { id: &'a str },
}

impl<'a> Action<'a> {
    pub fn http(method: &'a str, path: &'a str) -> Action<'a> {
        Action::Http { method, path }
    }

    /// The front-end kind of resource it names.
    pub fn kind(&self) -> Resource {
        match self {
            Action::Http { .. } => Resource::HttpPath,
            Action::Publish { .. } | Action::Subscribe { .. } => Resource::Topic,
            Action::Wamp { .. } => Resource::Uri,
            Action::TunnelJoin { .. } => Resource::Name,
        }
    }

    /// The verb rules name (`methods` / `actions`), upper-case for all but
    /// HTTP methods (which are compared without case).
    pub fn verb(&self) -> &'a str {
        match self {
            Action::Http { method, .. } => method,
            Action::Publish { .. }
            | Action::Wamp {
                verb: WampVerb::Publish,
                ..
            } => "PUBLISH",
            Action::Subscribe { .. }
            | Action::Wamp {
                verb: WampVerb::Subscribe,
                ..
            } => "SUBSCRIBE",
            Action::Wamp {
                verb: WampVerb::Call,
                ..
            } => "CALL",
            Action::Wamp {
                verb: WampVerb::Register,
                ..
            } => "REGISTER",
            Action::TunnelJoin { .. } => "JOIN",
        }
    }

    /// The levels it asks for, or why its resource is not a valid one.
    pub fn wanted(&self) -> Result<Wanted<'a>, &'static str> {
        let read = |text: &'a str, sep: char, reading| Wanted {
            parts: text.split(sep),
            reading,
            prefix: None,
        };
        match *self {
            Action::Http { path, .. } => Ok(read(path, '/', Reading::Path)),
            Action::Publish { topic, .. } => {
                if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                    return Err("not a topic name (empty, or with a wildcard or NUL)");
                }
                Ok(read(topic, '/', Reading::Exact))
            }
            Action::Subscribe { filter, .. } => {
                // A shared subscription is judged by its filter.
                let filter = match filter.strip_prefix("$share/") {
                    Some(rest) => match rest.split_once('/') {
                        Some((group, f)) if !group.is_empty() && !group.contains(['+', '#']) => f,
                        _ => return Err("a shared subscription needs `$share/GROUP/FILTER`"),
                    },
                    None => filter,
                };
                let levels: Vec<&str> = filter.split('/').collect();
                let valid = !filter.is_empty()
                    && !filter.contains('\0')
                    && levels.iter().enumerate().all(|(i, l)| match *l {
                        "+" => true,
                        "#" => i + 1 == levels.len(),
                        l => !l.contains(['+', '#']),
                    });
                if !valid {
                    return Err("not a topic filter (`+` and `#` are whole levels, `#` last)");
                }
                Ok(read(filter, '/', Reading::Filter))
            }
            Action::Wamp { uri, policy, .. } => {
                if uri.contains(['#', ' ']) {
                    return Err("not a WAMP URI");
                }
                match policy {
                    MatchPolicy::Exact if uri.is_empty() || uri.split('.').any(str::is_empty) => {
                        Err("not a WAMP URI (empty component)")
                    }
                    MatchPolicy::Exact => Ok(read(uri, '.', Reading::Exact)),
                    MatchPolicy::Wildcard => Ok(read(uri, '.', Reading::Wildcard)),
                    MatchPolicy::Prefix => {
                        let (head, last) = match uri.rsplit_once('.') {
                            Some((head, last)) => (Some(head), last),
                            None => (None, uri),
                        };
                        let mut wanted = read(head.unwrap_or(""), '.', Reading::Exact);
                        if head.is_none() {
                            // Nothing before the prefix: only the prefix.
                            wanted.parts.next();
                        }
                        wanted.prefix = Some(last);
                        Ok(wanted)
                    }
                }
            }
            Action::TunnelJoin { id } if id.is_empty() || id.contains('\0') => {
                Err("not a tunnel id")
            }
            // Split on a character no id holds: the id is one level.
            Action::TunnelJoin { id } => Ok(read(id, '\0', Reading::Exact)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// The outcome, the rule (index into the policy) that decided it, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub effect: Effect,
    pub rule: Option<usize>,
    pub reason: Reason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `rule` matched and decided.
    Matched,
    /// No rule matched: denied by default.
    NoRule,
    /// The action's resource is malformed (a topic with a wildcard, a
    /// filter with `#` inside): denied before any rule.
    Invalid(&'static str),
    /// The policy is for another front-end's resources.
    OtherKind,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.effect == Effect::Allow
    }

    fn denied(reason: Reason) -> Decision {
        Decision {
            effect: Effect::Deny,
            rule: None,
            reason,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let effect = if self.allowed() { "allowed" } else { "denied" };
        match (self.reason, self.rule) {
            (Reason::Matched, Some(i)) => write!(f, "{effect} by rule {i}"),
            (Reason::Matched | Reason::NoRule, _) => write!(f, "denied: no rule matches"),
            (Reason::Invalid(why), _) => write!(f, "denied: {why}"),
            (Reason::OtherKind, _) => {
                write!(f, "denied: the policy is for another kind of resource")
            }
        }
    }
}

#[derive(Debug)]
pub struct Policy {
    kind: Resource,
    rules: Vec<Rule>,
    /// The scopes the allow rules name, space-separated: the `scope` of an
    /// `insufficient_scope` challenge.
    scope_hint: String,
}

#[derive(Debug)]
struct Rule {
    effect: Effect,
    scopes: Option<Sets>,
    roles: Option<Sets>,
    claims: Vec<(String, ClaimTest)>,
    cert: Option<CertTest>,
    via: Option<Vec<AuthMethod>>,
    verbs: Option<Vec<String>>,
    resources: Option<Vec<Pattern>>,
    users: Option<Vec<String>>,
    max_qos: Option<u8>,
    retain: Option<bool>,
}

#[derive(Debug)]
struct Sets {
    all_of: Vec<String>,
    any_of: Vec<String>,
}

#[derive(Debug)]
enum ClaimTest {
    AnyOf(Vec<ScalarValue>),
    Contains(String),
    Matches(Regex),
}

#[derive(Debug)]
struct CertTest {
    fields: Vec<(CertField, HashSet<String>)>,
    san_uri_prefix: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum CertField {
    Cn,
    O,
    Ou,
    SanDns,
    SanUri,
    Sha256,
}

impl Policy {
    /// Compiles rules; errors are `(key path below the rule list, message)`.
    pub fn compile(rules: &[RuleConfig], kind: Resource) -> Result<Policy, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            let (effect, cond, key) = match rule {
                RuleConfig::Allow(c) => (Effect::Allow, c, "allow"),
                RuleConfig::Deny(c) => (Effect::Deny, c, "deny"),
            };
            let at = |field: &str| format!("[{i}].{key}.{field}");
            match Rule::compile(effect, cond, kind, &at) {
                Ok(r) => compiled.push(r),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut named: Vec<&str> = Vec::new();
        for r in compiled.iter().filter(|r| r.effect == Effect::Allow) {
            for s in r
                .scopes
                .iter()
                .flat_map(|s| s.all_of.iter().chain(&s.any_of))
            {
                if !named.contains(&s.as_str()) {
                    named.push(s);
                }
            }
        }
        let scope_hint = named.join(" ");
        Ok(Policy {
            kind,
            rules: compiled,
            scope_hint,
        })
    }

    pub fn evaluate(&self, who: &Identity, action: &Action<'_>) -> Decision {
        if action.kind() != self.kind {
            return Decision::denied(Reason::OtherKind);
        }
        let wanted = match action.wanted() {
            Ok(w) => w,
            Err(why) => return Decision::denied(Reason::Invalid(why)),
        };
        let verb = action.verb();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(who, verb, &wanted, self.kind) && rule.fits(action) {
                return Decision {
                    effect: rule.effect,
                    rule: Some(i),
                    reason: Reason::Matched,
                };
            }
        }
        Decision::denied(Reason::NoRule)
    }

    /// Scopes named by the allow rules, for an `insufficient_scope` challenge.
    pub fn scope_hint(&self) -> &str {
        &self.scope_hint
    }
}

impl Rule {
    fn compile(
        effect: Effect,
        c: &Conditions,
        kind: Resource,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Rule, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let sets = |m: &Option<SetMatch>| {
            m.as_ref().map(|m| match m {
                SetMatch::AllOf(all) => Sets {
                    all_of: all.clone(),
                    any_of: Vec::new(),
                },
                SetMatch::Ops { all_of, any_of } => Sets {
                    all_of: all_of.clone(),
                    any_of: any_of.clone(),
                },
            })
        };
        let mut claims = Vec::new();
        for (name, m) in &c.claims {
            let test = match m {
                ClaimMatch::Value(v) => Ok(ClaimTest::AnyOf(vec![v.clone()])),
                ClaimMatch::AnyOf(vs) => Ok(ClaimTest::AnyOf(vs.clone())),
                ClaimMatch::Ops(ops) => {
                    let given = [
                        ops.equals.is_some(),
                        ops.contains.is_some(),
                        ops.matches.is_some(),
                        ops.any_of.is_some(),
                    ];
                    if given.iter().filter(|g| **g).count() != 1 {
                        Err("expected exactly one of equals, contains, matches, any_of".to_owned())
                    } else if let Some(v) = &ops.equals {
                        Ok(ClaimTest::AnyOf(vec![v.clone()]))
                    } else if let Some(vs) = &ops.any_of {
                        Ok(ClaimTest::AnyOf(vs.clone()))
                    } else if let Some(s) = &ops.contains {
                        Ok(ClaimTest::Contains(s.clone()))
                    } else {
                        let re = ops.matches.as_deref().unwrap_or_default();
                        regex::RegexBuilder::new(&format!("^(?:{re})$"))
                            .size_limit(1 << 20)
                            .build()
                            .map(ClaimTest::Matches)
                            .map_err(|e| format!("invalid regular expression: {e}"))
                    }
                }
            };
            match test {
                Ok(t) => claims.push((name.clone(), t)),
                Err(e) => errors.push((at(&format!("claims.{name}")), e)),
            }
        }
        let mut resources = None;
        if let Some(patterns) = &c.paths {
            let mut compiled = Vec::new();
            for (j, p) in patterns.iter().enumerate() {
                match Pattern::parse(p, kind) {
                    Ok(p) => compiled.push(p),
                    Err(e) => errors.push((at(&format!("paths[{j}]")), e)),
                }
            }
            resources = Some(compiled);
        }
        let mut via = None;
        if let Some(names) = &c.via {
            let mut methods = Vec::with_capacity(names.len());
            for (j, v) in names.iter().enumerate() {
                match AuthMethod::from_name(v) {
                    Some(m) => methods.push(m),
                    None => errors.push((
                        at(&format!("via[{j}]")),
                        format!("`{v}`: expected one of {}", AuthMethod::names()),
                    )),
                }
            }
            via = Some(methods);
        }
        if c.max_qos.is_some_and(|q| q > 2) {
            errors.push((at("max_qos"), "must be 0, 1 or 2".to_owned()));
        }
        let rule = Rule {
            users: c.users.clone(),
            max_qos: c.max_qos,
            retain: c.retain,
            effect,
            scopes: sets(&c.scopes),
            roles: sets(&c.roles),
            claims,
            cert: c.cert.as_ref().map(CertTest::compile),
            via,
            verbs: c
                .methods
                .as_ref()
                .map(|ms| ms.iter().map(|m| m.to_ascii_uppercase()).collect()),
            resources,
        };
        if errors.is_empty() {
            Ok(rule)
        } else {
            Err(errors)
        }
    }

    fn matches(&self, who: &Identity, verb: &str, wanted: &Wanted<'_>, kind: Resource) -> bool {
        self.via.as_ref().is_none_or(|v| v.contains(&who.method))
            && self.users.as_ref().is_none_or(|u| u.contains(&who.subject))
            && self
                .verbs
                .as_ref()
                .is_none_or(|vs| vs.iter().any(|v| v.eq_ignore_ascii_case(verb)))
            && self.scopes.as_ref().is_none_or(|s| s.holds(&who.scopes))
            && self.roles.as_ref().is_none_or(|s| s.holds(&who.roles))
            && self
                .claims
                .iter()
                .all(|(name, test)| who.claim(name).is_some_and(|v| test.holds(v)))
            && self
                .cert
                .as_ref()
                .is_none_or(|t| who.cert.as_deref().is_some_and(|c| t.holds(c)))
            && self.resources.as_ref().is_none_or(|ps| {
                // An allow rule must name all a filter reaches; a deny rule
                // anything it reaches.
                ps.iter().any(|p| match self.effect {
                    Effect::Allow => p.covers(wanted.clone(), who, kind),
                    Effect::Deny => p.overlaps(wanted.clone(), who, kind),
                })
            })
    }
}

impl Rule {
    /// The conditions on the action itself: QoS, retain. One the action
    /// does not carry (retain on a subscription) holds for an allow rule
    /// and not for a deny rule: `deny {retain: true}` stops retained
    /// publishes, not subscriptions.
    fn fits(&self, action: &Action<'_>) -> bool {
        let (qos, retain) = match *action {
            Action::Publish { qos, retain, .. } => (Some(qos), Some(retain)),
            Action::Subscribe { qos, .. } => (Some(qos), None),
            _ => (None, None),
        };
        let absent = self.effect == Effect::Allow;
        self.max_qos
            .is_none_or(|max| qos.map_or(absent, |q| q <= max))
            && self
                .retain
                .is_none_or(|want| retain.map_or(absent, |r| r == want))
    }
}

impl Sets {
    fn holds(&self, have: &[String]) -> bool {
        self.all_of.iter().all(|s| have.contains(s))
            && (self.any_of.is_empty() || self.any_of.iter().any(|s| have.contains(s)))
    }
}

fn scalar_eq(want: &ScalarValue, got: &Value) -> bool {
    match (want, got) {
        (ScalarValue::Str(w), Value::String(g)) => w == g,
        (ScalarValue::Int(w), Value::Number(g)) => g.as_i64() == Some(*w),
        (ScalarValue::Bool(w), Value::Bool(g)) => w == g,
        _ => false,
    }
}

impl ClaimTest {
    /// A claim that is an array matches when one of its elements does.
    fn holds(&self, claim: &Value) -> bool {
        match (self, claim) {
            (ClaimTest::AnyOf(wants), Value::Array(items)) => items
                .iter()
                .any(|item| wants.iter().any(|w| scalar_eq(w, item))),
            (ClaimTest::AnyOf(wants), v) => wants.iter().any(|w| scalar_eq(w, v)),
            (ClaimTest::Contains(s), Value::Array(items)) => {
                items.iter().any(|i| i.as_str() == Some(s))
            }
            (ClaimTest::Contains(s), Value::String(v)) => v.contains(s.as_str()),
            (ClaimTest::Matches(re), Value::String(v)) => re.is_match(v),
            (ClaimTest::Matches(re), Value::Array(items)) => items
                .iter()
                .any(|i| i.as_str().is_some_and(|s| re.is_match(s))),
            _ => false,
        }
    }
}

impl CertTest {
    fn compile(m: &CertMatch) -> CertTest {
        let mut fields = Vec::new();
        let mut add = |field, v: &Option<OneOrMany>, lower: bool| {
            if let Some(v) = v {
                let values = v
                    .values()
                    .iter()
                    .map(|s| {
                        if lower {
                            s.to_ascii_lowercase().replace(':', "")
                        } else {
                            s.clone()
                        }
                    })
                    .collect();
                fields.push((field, values));
            }
        };
        add(CertField::Cn, &m.cn, false);
        add(CertField::O, &m.o, false);
        add(CertField::Ou, &m.ou, false);
        add(CertField::SanDns, &m.san_dns, false);
        add(CertField::SanUri, &m.san_uri, false);
        add(CertField::Sha256, &m.fingerprint_sha256, true);
        CertTest {
            fields,
            san_uri_prefix: m
                .san_uri_prefix
                .as_ref()
                .map(|v| v.values().to_vec())
                .unwrap_or_default(),
        }
    }

    fn holds(&self, cert: &CertIdentity) -> bool {
        self.fields.iter().all(|(field, accepted)| {
            let any = |vals: &[String]| vals.iter().any(|v| accepted.contains(v));
            match field {
                CertField::Cn => cert.cn.as_ref().is_some_and(|cn| accepted.contains(cn)),
                CertField::O => any(&cert.o),
                CertField::Ou => any(&cert.ou),
                CertField::SanDns => any(&cert.san_dns),
                CertField::SanUri => any(&cert.san_uri),
                CertField::Sha256 => accepted.contains(&cert.sha256),
            }
        }) && (self.san_uri_prefix.is_empty()
            || cert.san_uri.iter().any(|uri| {
                self.san_uri_prefix
                    .iter()
                    .any(|p| uri.starts_with(p.as_str()))
            }))
    }
}

#[cfg(test)]
mod tests;
