//! Resource patterns shared by every front-end: HTTP paths (`/users/{sub}/**`),
//! MQTT topics (`devices/%u/#`) and WAMP URIs (`com.example.{sub}.*`).
//!
//! A pattern is a list of segments: a literal, `*` or `+` (exactly one
//! segment), `**` or `#` (everything that follows, possibly nothing; last
//! only), or a placeholder for one of the caller's own values: `{sub}`/`%u`,
//! `{client_id}`/`%c`, `{iss}`, `{claim.NAME}`. A placeholder matches a whole
//! segment equal to the value; a caller without that value matches nothing.

use std::borrow::Cow;

use super::Resource;
use crate::identity::Identity;

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    One,
    Rest,
    Field(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    segments: Vec<Segment>,
}

impl Pattern {
    pub fn parse(pattern: &str, kind: Resource) -> Result<Pattern, String> {
        let mut segments = Vec::new();
        let parts: Vec<&str> = kind.pattern_segments(pattern);
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "*" | "+" => Segment::One,
                "**" | "#" => {
                    if i + 1 != parts.len() {
                        return Err(format!(
                            "`{pattern}`: `{part}` may only be the last segment"
                        ));
                    }
                    Segment::Rest
                }
                "%u" => Segment::Field("sub".into()),
                "%c" => Segment::Field("client_id".into()),
                p if p.starts_with('{') && p.ends_with('}') => {
                    let name = &p[1..p.len() - 1];
                    let name = name.strip_prefix("claim.").unwrap_or(name);
                    if name.is_empty() || name.contains(['{', '}']) {
                        return Err(format!("`{pattern}`: `{p}` is not a placeholder"));
                    }
                    Segment::Field(name.to_owned())
                }
                p if p.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "`{pattern}`: `{p}`: wildcards and placeholders must be whole segments"
                    ));
                }
                p => Segment::Literal(p.to_owned()),
            };
            segments.push(seg);
        }
        Ok(Pattern { segments })
    }

    /// Whether every resource in `wanted` (segments split as the pattern's
    /// kind splits them) is one this pattern names for `who`. A plain
    /// resource is all `Want::Exact`; an MQTT filter or a WAMP prefix or
    /// wildcard subscription names many, and is covered only when each of
    /// them is. The caller's values stand for themselves: one that is empty
    /// or holds a separator or wildcard of the kind matches nothing. At the
    /// first level of an MQTT topic, `+` and `#` never reach a `$` topic.
    pub fn covers<'a>(
        &self,
        wanted: impl Iterator<Item = Want<'a>>,
        who: &Identity,
        kind: Resource,
    ) -> bool {
        let mut wanted = wanted.peekable();
        for (level, seg) in self.segments.iter().enumerate() {
            let system = |w: &str| level == 0 && kind == Resource::Topic && w.starts_with('$');
            match seg {
                Segment::Rest => {
                    return !matches!(wanted.peek(), Some(Want::Exact(w)) if system(w));
                }
                Segment::One => match wanted.next() {
                    Some(Want::Exact(w)) if !system(&w) => {}
                    Some(Want::One) => {}
                    _ => return false,
                },
                Segment::Literal(lit) => match wanted.next() {
                    Some(Want::Exact(w)) if w == lit.as_str() => {}
                    _ => return false,
                },
                Segment::Field(name) => match (wanted.next(), who.field(name)) {
                    (Some(Want::Exact(w)), Some(value)) if kind.is_level(value) && w == value => {}
                    _ => return false,
                },
            }
        }
        wanted.next().is_none()
    }
}

impl Pattern {
    /// Whether some resource in `wanted` is one this pattern names for
    /// `who`: how a deny rule reads a filter or a prefix, so that no
    /// subscription reaches what is denied (`#` after `deny secret/#` is
    /// refused, as is `+/x`, which can match `secret/x`).
    pub fn overlaps<'a>(
        &self,
        wanted: impl Iterator<Item = Want<'a>>,
        who: &Identity,
        kind: Resource,
    ) -> bool {
        let value_ok = |name: &str| who.field(name).is_some_and(|v| kind.is_level(v));
        // Every segment from `from` on can name something.
        let satisfiable = |from: usize| {
            self.segments[from..].iter().all(|s| match s {
                Segment::Field(name) => value_ok(name),
                _ => true,
            })
        };
        let mut wanted = wanted.peekable();
        for (level, seg) in self.segments.iter().enumerate() {
            let first = level == 0 && kind == Resource::Topic;
            let want = wanted.next();
            let ok = match (seg, want) {
                // `#` at the first level names no `$` topic.
                (Segment::Rest, Some(Want::Exact(w))) if first && w.starts_with('$') => false,
                (Segment::Rest, _) => return true,
                (_, None) => false,
                // `#` at the first level names no `$` topic either.
                (Segment::Literal(l), Some(Want::Rest)) if first && l.starts_with('$') => false,
                (_, Some(Want::Rest)) => return satisfiable(level),
                // A prefix names every URI whose component here starts
                // with it, and anything after.
                (Segment::Literal(l), Some(Want::Prefix(p))) => {
                    return l.starts_with(&*p) && satisfiable(level + 1);
                }
                (_, Some(Want::Prefix(_))) => return satisfiable(level),
                (Segment::One, Some(Want::Exact(w))) => !(first && w.starts_with('$')),
                (Segment::One, Some(Want::One)) => true,
                (Segment::Literal(l), Some(Want::Exact(w))) => w == l.as_str(),
                (Segment::Literal(l), Some(Want::One)) => !(first && l.starts_with('$')),
                (Segment::Field(name), Some(Want::Exact(w))) => {
                    who.field(name).is_some_and(|v| kind.is_level(v) && v == w)
                }
                (Segment::Field(name), Some(Want::One)) => value_ok(name),
            };
            if !ok {
                return false;
            }
        }
        matches!(wanted.next(), None | Some(Want::Rest))
    }
}

/// One level of what an action asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Want<'a> {
    /// This level, as written.
    Exact(Cow<'a, str>),
    /// Any one level (MQTT `+`, an empty WAMP wildcard component).
    One,
    /// Any levels from here on, or none (MQTT `#`).
    Rest,
    /// A WAMP prefix subscription's last component: any text after this,
    /// then any components.
    Prefix(Cow<'a, str>),
}
