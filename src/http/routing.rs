//! Routing: picks the route from the current table (one lock-free load), or
//! the token server endpoint, and records it in the request context. A request without a route still goes on,
//! so it is logged and counted; the proxy answers it with 404.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::Request;
use tower::{Layer, Service};

use super::RequestCtx;
use super::router::RouteTable;
use crate::oauth::OAuthServer;

#[derive(Clone)]
pub struct RoutingLayer {
    table: Arc<ArcSwap<RouteTable>>,
    oauth: Arc<ArcSwapOption<OAuthServer>>,
}

impl RoutingLayer {
    pub fn new(table: Arc<ArcSwap<RouteTable>>, oauth: Arc<ArcSwapOption<OAuthServer>>) -> Self {
        RoutingLayer { table, oauth }
    }
}

impl<S> Layer<S> for RoutingLayer {
    type Service = Routing<S>;
    fn layer(&self, inner: S) -> Routing<S> {
        Routing {
            inner,
            table: self.table.clone(),
            oauth: self.oauth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Routing<S> {
    inner: S,
    table: Arc<ArcSwap<RouteTable>>,
    oauth: Arc<ArcSwapOption<OAuthServer>>,
}

impl<S, B> Service<Request<B>> for Routing<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        // The token server's paths come first on the listeners that serve it.
        if let Some(server) = &*self.oauth.load() {
            let ep = req
                .extensions()
                .get::<RequestCtx>()
                .and_then(|ctx| server.endpoint(&ctx.conn.listener.name, req.uri().path()));
            if let Some(ep) = ep
                && let Some(ctx) = req.extensions_mut().get_mut::<RequestCtx>()
            {
                ctx.endpoint = Some((server.clone(), ep));
                return self.inner.call(req);
            }
        }
        let route = self
            .table
            .load()
            .find(req.method(), req.uri(), req.headers())
            .cloned();
        if let Some(ctx) = req.extensions_mut().get_mut::<RequestCtx>() {
            ctx.route = route;
        }
        self.inner.call(req)
    }
}
