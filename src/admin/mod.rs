//! The admin listener: `/healthz` (process alive), `/readyz` (serving, not
//! draining) and `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::http::body::ProxyBody;
use crate::metrics::Metrics;

/// Readiness as load balancers and orchestrators see it.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
pub struct AdminService {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

impl AdminService {
    pub fn new(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Self {
        AdminService { metrics, readiness }
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.readiness.is_ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => {
                let mut resp = Response::new(ProxyBody::full(Bytes::from(self.metrics.render())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Ready<Result<Response<ProxyBody>, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        ready(Ok(self.respond(&req)))
    }
}
