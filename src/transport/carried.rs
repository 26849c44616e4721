//! HTTP carried over a WebSocket tunnel: the terms the HTTP front-end (a
//! route whose upstream is `tunnel: <id>`) and the tunnel front-end (which
//! holds the peers) meet in. Neither imports the other; the composition
//! root hands the HTTP front-end a [`TunnelLink`].

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

/// An HTTP request as a tunnel peer receives it (Micronets' REST:REQUEST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedRequest {
    pub method: String,
    /// The path alone, without the query.
    pub path: String,
    /// The query's name/value pairs, decoded, in order.
    pub query: Vec<(String, String)>,
    /// Header fields in order, without those the body's form conveys
    /// (`Content-Length`, `Content-Type`).
    pub headers: Vec<(String, String)>,
    /// The body's media type (`Content-Type`), when there is a body.
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// A tunnel peer's answer (Micronets' REST:RESPONSE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedResponse {
    pub status: u16,
    pub reason: Option<String>,
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Why a carried request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarryError {
    /// Nobody is connected on the tunnel (or no tunnel serves the id).
    #[error("no peer is connected on tunnel `{0}`")]
    NoPeer(String),
    /// Too many requests already wait on the tunnel.
    #[error("tunnel `{0}` has too many requests waiting")]
    Busy(String),
    /// The request's message would exceed the tunnel's message size.
    #[error("the request does not fit the tunnel's message size ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("no answer on tunnel `{id}` within {timeout:?}")]
    Timeout { id: String, timeout: Duration },
    /// Every peer the request went to left before answering.
    #[error("the peer on tunnel `{0}` left before answering")]
    PeerLeft(String),
    /// The peer's answer is not a usable REST:RESPONSE.
    #[error("the peer on tunnel `{id}` answered with an unusable response: {why}")]
    BadAnswer { id: String, why: String },
}

pub type CarryFuture = Pin<Box<dyn Future<Output = Result<CarriedResponse, CarryError>> + Send>>;

/// What sends a request to the peers of a tunnel and waits for an answer.
pub trait TunnelLink: Send + Sync + 'static {
    /// The largest message the tunnel `target` carries (`None`: no tunnel
    /// serves it): no request body larger than it needs to be read.
    fn max_message(&self, target: &str) -> Option<usize>;

    /// Sends `request` to the peers on tunnel `target` (an id, or a full
    /// path of prefix and id) and waits at most `timeout` for the answer.
    fn carry(&self, target: &str, request: CarriedRequest, timeout: Duration) -> CarryFuture;
}
