//! Local services on gateway listeners: endpoints a front-end answers itself
//! on an HTTP listener instead of a route's upstream (the token server now;
//! device registration, MQTT and WAMP over WebSocket and the tunnel later).
//! A front-end declares itself by implementing [`LocalService`]; the
//! composition root hands the HTTP front-end the current set
//! ([`LocalServices`]), which it asks before routing. Neither side imports
//! the other.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;

use crate::identity::CertIdentity;
use crate::metrics::RouteMetrics;

/// A request body as a local service reads it.
pub type LocalBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub type LocalFuture<'a> = Pin<Box<dyn Future<Output = Response<Bytes>> + Send + 'a>>;

pub trait LocalService: Send + Sync + 'static {
    /// The name its requests are logged and counted under (a route's place).
    fn name(&self) -> &str;
    fn metrics(&self) -> &RouteMetrics;
    /// Whether it answers the canonical `path` on `listener`: the endpoint
    /// it is handed back in [`serve`](Self::serve).
    fn endpoint(&self, listener: &str, path: &str) -> Option<u16>;
    /// Answers a request from `peer`, with the connection's verified
    /// client certificate.
    fn serve<'a>(
        self: Arc<Self>,
        endpoint: u16,
        request: Request<LocalBody>,
        peer: IpAddr,
        cert: Option<&'a CertIdentity>,
    ) -> LocalFuture<'a>;
}

/// The local services as they are now (a reload may replace them).
pub trait LocalServices: Send + Sync + 'static {
    /// The service that answers `path` on `listener`, and its endpoint.
    fn find(&self, listener: &str, path: &str) -> Option<(Arc<dyn LocalService>, u16)>;
}
