//! Request limits of the listener: target length, header count and size,
//! declared body size, and path sanity. (Streamed bodies are counted by
//! `RequestBody` as they pass; hyper enforces far-out parser limits itself.)

use super::error::GatewayError;
use crate::config::Limits;

/// What the limits are checked against.
pub(super) struct Sizes<'a> {
    pub uri: usize,
    pub fields: usize,
    pub field_bytes: usize,
    pub declared_body: Option<u64>,
    pub path: &'a str,
}

pub(super) fn check_sizes(limits: &Limits, sizes: &Sizes<'_>) -> Result<(), GatewayError> {
    let uri_limit = limits.max_uri_bytes.as_usize();
    if sizes.uri > uri_limit {
        return Err(GatewayError::UriTooLong { limit: uri_limit });
    }
    if sizes.fields > limits.max_headers {
        return Err(GatewayError::HeadersTooLarge {
            limit: limits.max_headers,
            what: "headers",
        });
    }
    let header_limit = limits.max_header_bytes.as_usize();
    if sizes.field_bytes > header_limit {
        return Err(GatewayError::HeadersTooLarge {
            limit: header_limit,
            what: "bytes",
        });
    }
    let body_limit = limits.max_body_bytes.as_usize();
    if sizes.declared_body.is_some_and(|n| n > body_limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit: body_limit });
    }
    if has_dot_segment(sizes.path) {
        return Err(GatewayError::BadPath);
    }
    Ok(())
}

/// `.` and `..` segments (also percent-encoded) could walk a rewritten path
/// out of its prefix on the upstream, so they are refused outright.
fn has_dot_segment(path: &str) -> bool {
    // Most paths have neither `.` nor `%`: one pass says so.
    path.bytes().any(|b| b == b'.' || b == b'%')
        && path.split('/').any(|seg| {
            let seg = seg.as_bytes();
            let is_dot = |s: &[u8]| s == b"." || s.eq_ignore_ascii_case(b"%2e");
            match seg.len() {
                1 | 3 => is_dot(seg),
                2 => seg == b"..",
                4 | 6 => {
                    let (a, b) = seg.split_at(if seg[0] == b'.' { 1 } else { 3 });
                    is_dot(a) && is_dot(b)
                }
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::has_dot_segment;

    #[test]
    fn dot_segments() {
        for bad in [
            "/a/../b",
            "/..",
            "/./x",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/%2e/",
            "/a/%2E",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/",
            "/a/b",
            "/a..b/",
            "/.well-known/x",
            "/a/...",
            "/a/%2e%2ex",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }
}
