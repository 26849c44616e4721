//! The HTTP request path, assembled in one place and read top to bottom.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;
use tower::ServiceBuilder;

use super::RequestCtx;
use super::access_log::{AccessLog, AccessLogLayer};
use super::auth::{AuthLayer, Authenticate};
use super::authz::{Authorize, AuthzLayer};
use super::body::{ClientBody, ProxyBody};
use super::direct::{ConnMemo, DirectPath, Plan};
use super::limits::{LimitsLayer, RequestLimits};
use super::proxy::Proxy;
use super::request_id::{RequestId, RequestIdLayer};
use super::router::RouteTable;
use super::routing::{Routing, RoutingLayer};
use super::upstream::UpstreamClients;
use super::wire::RequestHead;
use crate::metrics::{Metrics, RouteMetrics};
use crate::oauth::OAuthServer;
use crate::transport::{ConnState, RequestGuard};

pub type Stack = RequestId<Routing<AccessLog<RequestLimits<Authenticate<Authorize<Proxy>>>>>>;

/// What the stack's stages share across all connections.
pub struct StackConfig {
    pub table: Arc<ArcSwap<RouteTable>>,
    /// The token server, on the listeners that serve it.
    pub oauth: Arc<ArcSwapOption<OAuthServer>>,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AtomicBool>,
    /// Request metrics for requests that match no route.
    pub unmatched: RouteMetrics,
}

impl StackConfig {
    /// A worker's stack and direct path; `clients` are that worker's
    /// upstream connections.
    pub fn build(&self, clients: UpstreamClients) -> Pipeline {
        let clients = Arc::new(clients);
        let direct = Arc::new(DirectPath {
            table: self.table.clone(),
            oauth: self.oauth.clone(),
            clients: clients.clone(),
            access_log: self.access_log.clone(),
        });
        let stack = ServiceBuilder::new()
            // 1. Every request gets its id before anything can fail.
            .layer(RequestIdLayer)
            // 2. Which route, or which token server endpoint (neither is a 404,
            //    answered by the proxy stage).
            .layer(RoutingLayer::new(self.table.clone(), self.oauth.clone()))
            // 3. One log event and the metrics per request; errors become responses here.
            .layer(AccessLogLayer::new(
                self.unmatched.clone(),
                self.access_log.clone(),
            ))
            // 4. The listener's limits on target, headers and body.
            .layer(LimitsLayer::new(self.metrics.clone()))
            // 5. Who is calling (token, client certificate), per the route.
            .layer(AuthLayer)
            // 6. Whether the route's policy allows it; identity headers for the upstream.
            .layer(AuthzLayer::new(self.access_log.clone()))
            // 7. Forward to the route's upstream pool (or answer a token server endpoint).
            .service(Proxy::new(clients));
        Pipeline { stack, direct }
    }
}

/// A worker's ways through the gateway: the stack, and the direct path
/// for the requests that qualify (see `direct.rs`).
#[derive(Clone)]
pub struct Pipeline {
    stack: Stack,
    direct: Arc<DirectPath>,
}

/// The per-connection hyper service: attaches the request context and counts
/// the request as in flight on its connection.
#[derive(Clone)]
pub struct HttpEntry {
    stack: Stack,
    direct: Arc<DirectPath>,
    conn: Arc<ConnState>,
}

impl HttpEntry {
    pub fn new(pipeline: Pipeline, conn: Arc<ConnState>) -> Self {
        HttpEntry {
            stack: pipeline.stack,
            direct: pipeline.direct,
            conn,
        }
    }

    /// Whether a request read by our own HTTP/1 loop takes the direct path.
    pub fn plan(&self, req: &RequestHead, memo: &mut ConnMemo) -> Option<Plan> {
        self.direct.plan(&self.conn, req, memo)
    }

    /// Runs a planned request on the direct path; `deadline` is the
    /// connection's request timer. Not counted as in flight: the loop that
    /// runs it does not watch for idleness meanwhile.
    pub fn direct<'a>(
        &'a self,
        req: &'a RequestHead,
        plan: &'a mut Plan,
        memo: &'a ConnMemo,
        deadline: Pin<&'a mut Sleep>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + 'a {
        self.direct.forward(&self.conn, req, plan, memo, deadline)
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpEntry {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = EntryFuture;

    fn call(&self, req: Request<Incoming>) -> EntryFuture {
        self.clone().dispatch(req.map(ClientBody::Hyper))
    }
}

impl HttpEntry {
    /// Runs a request through the stack, counted as in flight on its
    /// connection. Every stage is always ready (none holds back requests:
    /// limits answer instead), so `call` needs no `poll_ready` first and the
    /// stack no clone per request.
    pub fn dispatch(&mut self, mut req: Request<ClientBody>) -> EntryFuture {
        let guard = self.conn.begin_request();
        req.extensions_mut().insert(RequestCtx {
            conn: self.conn.clone(),
            request_id: HeaderValue::from_static("-"),
            route: None,
            endpoint: None,
            identity: None,
        });
        EntryFuture {
            inner: self.stack.call(req),
            _guard: guard,
        }
    }
}

pin_project! {
    pub struct EntryFuture {
        #[pin]
        inner: <Stack as Service<Request<ClientBody>>>::Future,
        _guard: RequestGuard,
    }
}

impl Future for EntryFuture {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
