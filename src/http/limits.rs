//! Request limits of the listener: target length, header count and size,
//! declared body size, and path sanity. (Streamed bodies are counted by
//! `RequestBody` as they pass; hyper enforces far-out parser limits itself.)

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, header};
use tower::{Layer, Service};

use super::RequestCtx;
use super::error::GatewayError;
use super::wire;
use crate::config::Limits;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct LimitsLayer {
    metrics: Arc<Metrics>,
}

impl LimitsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        LimitsLayer { metrics }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = RequestLimits<S>;
    fn layer(&self, inner: S) -> RequestLimits<S> {
        RequestLimits {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestLimits<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for RequestLimits<S>
where
    S: Service<Request<B>, Error = GatewayError>,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = Either<Ready<Result<S::Response, GatewayError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(ctx) = req.extensions().get::<RequestCtx>() else {
            return Either::Right(self.inner.call(req));
        };
        let listener = &ctx.conn.listener;
        match check(&listener.limits, &req) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(e) => {
                let limit = match &e {
                    GatewayError::UriTooLong { .. } => "uri",
                    GatewayError::HeadersTooLarge { .. } => "headers",
                    GatewayError::BodyTooLarge { .. } => "body",
                    _ => "path",
                };
                self.metrics
                    .http_limit_exceeded
                    .with_label_values(&[&listener.name, limit])
                    .inc();
                Either::Left(ready(Err(e)))
            }
        }
    }
}

fn check<B>(limits: &Limits, req: &Request<B>) -> Result<(), GatewayError> {
    let headers = req.headers();
    check_sizes(
        limits,
        &Sizes {
            uri: req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()),
            fields: headers.len(),
            // Name, value and the ": " and CRLF of each field, as on the wire.
            field_bytes: headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum(),
            declared_body: headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| wire::length_value(v.as_bytes())),
            path: req.uri().path(),
        },
    )
}

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
