//! Local services on gateway listeners: endpoints a front-end answers itself
//! on an HTTP listener instead of a route's upstream (the token server now;
//! device registration, MQTT and WAMP over WebSocket and the tunnel later).
//! A front-end declares itself by implementing [`LocalService`]; the
//! composition root hands the HTTP front-end the current set
//! ([`LocalServices`]), which it asks before routing. Neither side imports
//! the other.
//!
//! A local service may also take connections over: a request that asks to
//! switch protocols (WebSocket) on one of its endpoints is handed to
//! [`LocalService::upgrade`], whose `101` answer the HTTP front-end writes
//! before it hands the connection's bytes to the service's [`Takeover`].

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;

use super::ConnState;
use crate::identity::CertIdentity;
use crate::metrics::RouteMetrics;

/// A request body as a local service reads it.
pub type LocalBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub type LocalFuture<'a> = Pin<Box<dyn Future<Output = Response<Bytes>> + Send + 'a>>;

/// A connection after its `101`, with the bytes the client sent behind its
/// upgrade request first.
pub trait UpgradedIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> UpgradedIo for T {}

/// What runs on a connection a local service took over, until it is done
/// with it. The connection counts as open (and drains) while it runs.
pub type Takeover = Box<
    dyn FnOnce(Box<dyn UpgradedIo>, Arc<ConnState>) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send,
>;

/// A local service's answer to a request to switch protocols: a `101`
/// with what takes the connection over, or any other response (a refusal;
/// the connection then goes on as HTTP).
pub struct Switch {
    pub response: Response<Bytes>,
    pub takeover: Option<Takeover>,
}

impl Switch {
    pub fn refuse(response: Response<Bytes>) -> Switch {
        Switch {
            response,
            takeover: None,
        }
    }
}

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
    /// Whether `endpoint` takes requests to switch protocols; those go to
    /// [`upgrade`](Self::upgrade) instead of [`serve`](Self::serve).
    fn upgrades(&self, _endpoint: u16) -> bool {
        false
    }
    /// Answers a request to switch protocols (a body-less HTTP/1.1 GET with
    /// `Connection: upgrade`) on the connection `conn`.
    fn upgrade(
        self: Arc<Self>,
        _endpoint: u16,
        _request: Request<()>,
        _conn: Arc<ConnState>,
    ) -> Pin<Box<dyn Future<Output = Switch> + Send>> {
        Box::pin(async {
            let mut refused = Response::new(Bytes::from_static(b"no protocol switch here\n"));
            *refused.status_mut() = http::StatusCode::BAD_REQUEST;
            Switch::refuse(refused)
        })
    }
}

/// The local services as they are now (a reload may replace them).
pub trait LocalServices: Send + Sync + 'static {
    /// The service that answers `path` on `listener`, and its endpoint.
    fn find(&self, listener: &str, path: &str) -> Option<(Arc<dyn LocalService>, u16)>;
}
