//! One access log event and the request metrics per request, every
//! failure logged with its source.

use std::time::Instant;

use http::{HeaderValue, Method};

use super::error::{ErrorSource, GatewayError};
use crate::metrics::RouteMetrics;
use crate::transport::ConnState;

/// A request's entry in the access log and the request metrics.
pub(super) struct Entry<'a> {
    pub start: Instant,
    pub conn: Option<&'a ConnState>,
    /// The route's name, `oauth` or `-`.
    pub route: &'a str,
    pub metrics: &'a RouteMetrics,
    pub request_id: &'a HeaderValue,
    pub method: &'a Method,
    /// Path only: query strings may carry tokens and are never logged.
    /// `None` while the log is off.
    pub path: Option<&'a str>,
}

pub(super) fn record(p: &Entry<'_>, status: u16, error: Option<&GatewayError>, subject: &str) {
    let elapsed = p.start.elapsed();
    let listener_index = p.conn.map_or(0, |c| c.listener.index);
    p.metrics.count(listener_index, status);
    p.metrics.duration.observe(elapsed.as_secs_f64());

    let Some(path) = p.path else { return };
    let route = p.route;
    let listener = p.conn.map_or("-", |c| &c.listener.name);
    let peer = p
        .conn
        .map_or_else(|| "-".to_owned(), |c| c.peer.to_string());
    let request_id = p.request_id.to_str().unwrap_or("-");
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    match error {
        None => tracing::info!(
            target: "tollgate::access",
            listener, route, method = %p.method, path = %path, status, latency_ms,
            request_id, peer = %peer, subject,
            "request"
        ),
        Some(e) if e.source() == ErrorSource::Client => tracing::info!(
            target: "tollgate::access",
            listener, route, method = %p.method, path = %path, status, latency_ms,
            request_id, peer = %peer, error = e.code(), source = e.source().as_str(), detail = %e,
            "request refused"
        ),
        Some(e) => tracing::warn!(
            target: "tollgate::access",
            listener, route, method = %p.method, path = %path, status, latency_ms,
            request_id, peer = %peer, error = e.code(), source = e.source().as_str(), detail = %e,
            "request failed"
        ),
    }
}
