//! Routing: picks the route from the current table (one lock-free load) and
//! records it in the request context. A request without a route still goes on,
//! so it is logged and counted; the proxy answers it with 404.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::Request;
use tower::{Layer, Service};

use super::RequestCtx;
use super::router::RouteTable;

#[derive(Clone)]
pub struct RoutingLayer {
    table: Arc<ArcSwap<RouteTable>>,
}

impl RoutingLayer {
    pub fn new(table: Arc<ArcSwap<RouteTable>>) -> Self {
        RoutingLayer { table }
    }
}

impl<S> Layer<S> for RoutingLayer {
    type Service = Routing<S>;
    fn layer(&self, inner: S) -> Routing<S> {
        Routing {
            inner,
            table: self.table.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Routing<S> {
    inner: S,
    table: Arc<ArcSwap<RouteTable>>,
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
