//! What authorisation needs beside the policy engine (`crate::authz`): the
//! caller of routes that take anyone, and identity fields rendered as the
//! header values the route forwards.

use std::borrow::Cow;
use std::sync::LazyLock;

use serde_json::Value;

use crate::identity::Identity;

pub(super) static ANONYMOUS: LazyLock<Identity> = LazyLock::new(Identity::anonymous);

/// An identity field as a header value's text: strings as they are,
/// numbers and booleans as text, arrays of strings joined with `,`, objects
/// as JSON. `None` if absent, or if it is no header value (control
/// characters: a claim must not add fields of its own).
pub(super) fn render<'a>(who: &'a Identity, field: &str) -> Option<Cow<'a, str>> {
    let text = match who.field(field) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(match field {
            "scope" | "scopes" if !who.scopes.is_empty() => who.scopes.join(" "),
            "roles" if !who.roles.is_empty() => who.roles.join(","),
            _ => match who.claim(field)? {
                Value::String(s) => s.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(","),
                Value::Null => return None,
                other => other.to_string(),
            },
        }),
    };
    // What `HeaderValue` accepts: no control characters but tab.
    text.bytes()
        .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
        .then_some(text)
}
