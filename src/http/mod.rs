//! The HTTP gateway: a tower stack per listener whose stages read top to
//! bottom as a request's path (see `stack.rs`), then the proxy to upstream pools.

mod access_log;
pub mod auth;
pub mod authz;
pub mod body;
mod direct;
pub mod error;
pub mod headers;
mod limits;
mod proxy;
mod request_id;
pub mod router;
mod routing;
mod stack;
pub mod upstream;
pub mod wire;
pub mod xfcc;

use std::sync::Arc;

use http::HeaderValue;

pub use direct::ConnMemo;
pub(crate) use proxy::error_chain;
pub use stack::{HttpEntry, Pipeline, Stack, StackConfig};

use crate::identity::Identity;
use crate::oauth::{Endpoint, OAuthServer};
use crate::transport::ConnState;
use router::Route;

/// Per-request facts shared by the stages, carried in the request's extensions.
#[derive(Clone)]
pub struct RequestCtx {
    pub conn: Arc<ConnState>,
    pub request_id: HeaderValue,
    /// Set by routing; `None` means no route matched.
    pub route: Option<Arc<Route>>,
    /// Set by routing instead of `route` for the token server's endpoints.
    pub endpoint: Option<(Arc<OAuthServer>, Endpoint)>,
    /// Set by authentication; `None` for routes that need none.
    pub identity: Option<Arc<Identity>>,
}
