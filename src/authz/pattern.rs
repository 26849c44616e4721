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

    /// `resource`: segments split the same way (see [`Resource::segments`]).
    pub fn matches<'a>(
        &self,
        mut rest: impl Iterator<Item = Cow<'a, str>>,
        who: &Identity,
    ) -> bool {
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => {
                    if rest.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if rest.next().as_deref() != Some(lit.as_str()) {
                        return false;
                    }
                }
                Segment::Field(name) => match (rest.next(), who.field(name)) {
                    (Some(got), Some(value)) if got.as_ref() == value => {}
                    _ => return false,
                },
            }
        }
        rest.next().is_none()
    }
}
