//! The admin listener: `/healthz` (process alive), `/readyz` (serving, not
//! draining), `/metrics` (Prometheus text format), and the admin API (route
//! registration, Kong-compatible endpoints, operator endpoints).

mod api;
pub mod auth;
pub mod dynamic;
mod kong;
pub mod register;
mod users;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::transport::ConnState;
pub use auth::AdminAuth;
use http_body_util::Full;

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

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the admin API needs from the running gateway; the composition root
/// implements it.
pub trait AdminBackend: Send + Sync + 'static {
    /// `GET /admin/status`.
    fn status(&self) -> serde_json::Value;
    /// `GET /admin/config`: secrets redacted.
    fn redacted_config(&self) -> serde_json::Value;
    /// `GET /admin/routes`: routes served, their targets' health.
    fn routes_status(&self) -> serde_json::Value;
    /// The token server's clients, without secrets; `None` without one.
    fn oauth_clients(&self) -> Option<Vec<serde_json::Value>>;
    /// gateway.yaml as running (without API routes).
    fn file_config(&self) -> Arc<crate::config::Config>;
    /// Why an API route is not served, if it is not.
    fn not_served(&self, name: &str) -> Option<String>;
    fn admin_auth(&self) -> Arc<AdminAuth>;
    fn metrics(&self) -> &crate::metrics::Metrics;
    fn readiness(&self) -> &Readiness;
    /// Why store changes wait to be applied, if they do.
    fn store_waiting(&self) -> Option<String>;
    /// Reads gateway.yaml (and the store) again.
    fn reload(&self)
    -> BoxFuture<'_, Result<crate::config::Reloaded, crate::config::ConfigErrors>>;
    /// The API routes in the store changed: apply them.
    fn routes_changed(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Held by one admin write at a time.
    fn admin_write_lock(&self) -> BoxFuture<'_, tokio::sync::MutexGuard<'_, ()>>;
    /// Password users as served (changed at once by the admin API).
    fn password_users(&self) -> Arc<crate::identity::Users>;
    /// Registers a device of `device_type` (`None`: registration is not
    /// configured): its name, password, broker and certificate, or the
    /// status and message of a refusal.
    fn mqtt_register(
        &self,
        device_type: String,
    ) -> Option<BoxFuture<'_, Result<serde_json::Value, (http::StatusCode, String)>>>;
    /// The MQTT broker's sessions (`None`: no broker).
    fn mqtt_sessions(&self) -> Option<serde_json::Value>;
    /// Disconnects an MQTT client and ends its session (`None`: no broker;
    /// `Some(false)`: no such session).
    fn mqtt_kick(&self, client_id: &str) -> Option<bool>;
    /// The WAMP router's sessions by realm (`None`: no router).
    fn wamp_sessions(&self) -> Option<serde_json::Value>;
    /// Ends a WAMP session (`None`: no router; `Some(false)`: no such
    /// session).
    fn wamp_kill(&self, session: u64) -> Option<bool>;
    /// Every tunnel relay's ids and their peers.
    fn tunnels_status(&self) -> serde_json::Value;
}

/// The admin listener's front-end: hyper serves its connections (HTTP/1.1
/// and HTTP/2) with an [`AdminService`] each.
pub struct AdminFrontEnd {
    gateway: Arc<dyn AdminBackend>,
    server: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
}

impl AdminFrontEnd {
    pub fn new(gateway: Arc<dyn AdminBackend>, limits: &crate::config::Limits) -> AdminFrontEnd {
        AdminFrontEnd {
            gateway,
            server: crate::transport::hyper_server(limits, false),
        }
    }
}

impl crate::transport::FrontEnd for AdminFrontEnd {
    async fn serve<S: crate::transport::Stream>(
        &self,
        io: S,
        conn: Arc<ConnState>,
        shutdown: crate::transport::Shutdown,
    ) {
        let service = AdminService::new(self.gateway.clone(), conn.clone());
        crate::transport::serve_hyper(&self.server, io, conn, service, shutdown).await;
    }
}

/// The admin listener's service for one connection.
#[derive(Clone)]
pub struct AdminService {
    gateway: Arc<dyn AdminBackend>,
    conn: Arc<ConnState>,
}

impl AdminService {
    pub fn new(gateway: Arc<dyn AdminBackend>, conn: Arc<ConnState>) -> Self {
        AdminService { gateway, conn }
    }

    /// Health, readiness and metrics: open, GET/HEAD only.
    fn probe(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let path = req.uri().path();
        if !matches!(path, "/healthz" | "/readyz" | "/metrics") {
            return None;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Some(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
        }
        Some(match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            // Ready while the store waits (the routes that need no store
            // serve), and the detail says so.
            "/readyz" if self.gateway.readiness().is_ready() => {
                match self.gateway.store_waiting() {
                    None => text(StatusCode::OK, "ready\n"),
                    Some(why) => {
                        let mut resp = text(StatusCode::OK, "");
                        *resp.body_mut() = Full::new(Bytes::from(format!(
                            "ready; degraded: store changes wait: {why}\n"
                        )));
                        resp
                    }
                }
            }
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            _ => {
                let body = Bytes::from(self.gateway.metrics().render());
                let mut resp = Response::new(Full::new(body));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
        })
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
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
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        if let Some(resp) = self.probe(&req) {
            return Box::pin(std::future::ready(Ok(resp)));
        }
        let svc = self.clone();
        Box::pin(async move {
            let auth = svc.gateway.admin_auth();
            let checked = auth
                .check(
                    req.method(),
                    req.uri().path(),
                    req.headers(),
                    svc.conn.peer_cert.as_ref(),
                )
                .await;
            if let Err(denied) = checked {
                let mut resp = api::json_response(
                    denied.status(),
                    &serde_json::json!({ "message": match denied {
                        auth::Denied::Unauthenticated => "admin credentials required",
                        auth::Denied::Forbidden => "not allowed by admin.policy",
                    }}),
                );
                if denied.status() == StatusCode::UNAUTHORIZED {
                    resp.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
                    );
                }
                return Ok(resp);
            }
            Ok(api::handle(&*svc.gateway, req).await)
        })
    }
}
