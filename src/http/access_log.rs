//! One access log line and the request metrics per request, every failure
//! logged with its source. Lines go through the access log's own writer
//! (`telemetry::access_line`): rendered into the worker's buffer, written
//! off the request path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Uri};

use super::error::{ErrorSource, GatewayError};
use super::router::Route;
use crate::identity::Identity;
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

/// A request whose response body is still coming from its target when its
/// head goes to the client: it is logged and counted when the body ends, so
/// a body that breaks off counts as the target's failure (502), not as the
/// status the client was sent.
pub(crate) struct Unfinished {
    pub start: Instant,
    pub conn: Arc<ConnState>,
    pub route: Arc<Route>,
    pub request_id: HeaderValue,
    pub method: Method,
    /// `None` while the log is off.
    pub uri: Option<Uri>,
    pub identity: Option<Arc<Identity>>,
    pub status: u16,
}

/// How a streamed response body ended.
pub(crate) enum BodyEnd<'a> {
    Whole,
    /// The client went away, or its own request body failed, first.
    Client,
    /// The target broke it off (reset, short, stalled).
    Target {
        target: SocketAddr,
        error: &'a dyn std::error::Error,
    },
}

impl Unfinished {
    pub(crate) fn finish(self, end: BodyEnd<'_>) {
        let failure = match end {
            BodyEnd::Whole | BodyEnd::Client => None,
            BodyEnd::Target { target, error } => Some(GatewayError::UpstreamProtocol {
                target: target.to_string(),
                detail: format!(
                    "response body broke off after a {} head: {}",
                    self.status,
                    crate::telemetry::error_chain(error)
                ),
            }),
        };
        let status = if failure.is_some() { 502 } else { self.status };
        if let (Some(failure), None) = (&failure, &self.uri) {
            // The access log is off; a target's failure is still told.
            tracing::warn!(route = %self.route.name, request_id = self.request_id.to_str().unwrap_or("-"),
                error = %failure, "request failed");
        }
        record(
            &Entry {
                start: self.start,
                conn: Some(&self.conn),
                route: &self.route.name,
                metrics: &self.route.metrics,
                request_id: &self.request_id,
                method: self.method.as_str(),
                path: self.uri.as_ref().map(Uri::path),
            },
            status,
            failure.as_ref(),
            self.identity
                .as_ref()
                .map_or("-", |who| who.subject.as_str()),
        );
    }
}
