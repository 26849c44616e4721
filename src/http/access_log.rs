//! One access log line and the request metrics per request, every failure
//! logged with its source. Lines go through the access log's own writer
//! (`telemetry::access_line`): rendered into the worker's buffer, written
//! off the request path.

use std::time::Instant;

use http::HeaderValue;

use super::error::{ErrorSource, GatewayError};
use crate::metrics::RouteMetrics;
use crate::telemetry;
use crate::transport::ConnState;

/// A request's entry in the access log and the request metrics.
pub(super) struct Entry<'a> {
    pub start: Instant,
    pub conn: Option<&'a ConnState>,
    /// The route's name, `oauth` or `-`.
    pub route: &'a str,
    pub metrics: &'a RouteMetrics,
    pub request_id: &'a HeaderValue,
    /// `-` for a request whose head could not be read.
    pub method: &'a str,
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
    let (warn, message) = match error {
        None => (false, "request"),
        Some(e) if e.source() == ErrorSource::Client => (false, "request refused"),
        Some(_) => (true, "request failed"),
    };
    // Rendered into the worker's buffer, written by the log's own thread.
    telemetry::access_line(warn, message, |line| {
        line.text("listener", p.conn.map_or("-", |c| &c.listener.name));
        line.text("route", p.route);
        line.text("method", p.method);
        line.text("path", path);
        line.number("status", u64::from(status));
        line.millis("latency_ms", elapsed.as_micros() as u64);
        line.text("request_id", p.request_id.to_str().unwrap_or("-"));
        line.text("peer", p.conn.map_or("-", |c| &c.peer_text));
        match error {
            None => line.text("subject", subject),
            Some(e) => {
                line.text("error", e.code());
                line.text("source", e.source().as_str());
                line.display("detail", e);
            }
        }
    });
}
