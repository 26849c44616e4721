//! One access log event and the request metrics per request. This is also
//! where a failed request's [`GatewayError`] becomes its response, so every
//! failure is answered, logged with its source and counted the same way.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::RequestCtx;
use super::authz::Caller;
use super::body::ProxyBody;
use super::error::{ErrorSource, GatewayError};
use super::router::Route;
use crate::metrics::RouteMetrics;
use crate::oauth::OAuthServer;
use crate::transport::ConnState;

#[derive(Clone)]
pub struct AccessLogLayer {
    unmatched: Arc<RouteMetrics>,
    enabled: Arc<AtomicBool>,
}

impl AccessLogLayer {
    /// `unmatched` counts requests no route matched; `enabled` turns the log
    /// events (not the metrics) on and off at reload.
    pub fn new(unmatched: RouteMetrics, enabled: Arc<AtomicBool>) -> Self {
        AccessLogLayer {
            unmatched: Arc::new(unmatched),
            enabled,
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    layer: AccessLogLayer,
}

/// What the log event needs, taken before the request moves on.
struct Pending {
    start: Instant,
    conn: Option<Arc<ConnState>>,
    route: Option<Arc<Route>>,
    /// Token server endpoints: their server, for its metrics.
    endpoint: Option<Arc<OAuthServer>>,
    request_id: HeaderValue,
    method: Method,
    /// Path only: query strings may carry tokens and are never logged.
    path: Option<String>,
    unmatched: Arc<RouteMetrics>,
}

impl<S, B> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = GatewayError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Our inner services are always ready; an error here cannot happen,
        // and would be reported by `call` anyway.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ctx = req.extensions().get::<RequestCtx>();
        let pending = Pending {
            start: Instant::now(),
            conn: ctx.map(|c| c.conn.clone()),
            route: ctx.and_then(|c| c.route.clone()),
            endpoint: ctx.and_then(|c| c.endpoint.as_ref().map(|(s, _)| s.clone())),
            request_id: ctx
                .map(|c| c.request_id.clone())
                .unwrap_or_else(|| HeaderValue::from_static("-")),
            method: req.method().clone(),
            path: self
                .layer
                .enabled
                .load(Ordering::Relaxed)
                .then(|| req.uri().path().to_owned()),
            unmatched: self.layer.unmatched.clone(),
        };
        ResponseFuture {
            inner: self.inner.call(req),
            pending: Some(pending),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, GatewayError>>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(p) = this.pending.take() else {
            // Polled after completion: answer with what we have.
            return Poll::Ready(Ok(
                result.unwrap_or_else(|e| e.to_response(&HeaderValue::from_static("-")))
            ));
        };
        let (resp, error, caller) = match result {
            Ok(mut resp) => {
                let caller = resp.extensions_mut().remove::<Caller>();
                (resp, None, caller)
            }
            Err(e) => (e.to_response(&p.request_id), Some(e), None),
        };
        let subject = caller.as_ref().map_or("-", |c| c.0.subject.as_str());
        let (route, metrics) = match (&p.route, &p.endpoint) {
            (Some(r), _) => (&*r.name, &r.metrics),
            (None, Some(server)) => ("oauth", &server.metrics),
            (None, None) => ("-", &*p.unmatched),
        };
        record(
            &Entry {
                start: p.start,
                conn: p.conn.as_deref(),
                route,
                metrics,
                request_id: &p.request_id,
                method: &p.method,
                path: p.path.as_deref(),
            },
            resp.status().as_u16(),
            error.as_ref(),
            subject,
        );
        Poll::Ready(Ok(resp))
    }
}

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
