//! Body types of the proxy: streamed both ways, never buffered whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::upstream::{H1Error, InflightGuard, UpstreamBody};
use super::wire::ResponseLines;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What tollgate sends to clients: an upstream's body or a small local one.
pub struct ProxyBody {
    kind: Kind,
}

enum Kind {
    Upstream {
        body: UpstreamBody,
        /// Keeps the target's in-flight count until the body is done or dropped.
        inflight: InflightGuard,
        stall: StallWatch,
    },
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(Some(bytes)),
        }
    }

    pub fn empty() -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(None),
        }
    }

    /// The response's fields as its target wrote them, on the direct path
    /// (see `wire::ResponseLines`).
    pub fn response_lines(&self) -> Option<&ResponseLines> {
        match &self.kind {
            Kind::Upstream { body, .. } => body.lines(),
            Kind::Full(_) => None,
        }
    }

    pub fn response_lines_mut(&mut self) -> Option<&mut ResponseLines> {
        match &mut self.kind {
            Kind::Upstream { body, .. } => body.lines_mut(),
            Kind::Full(_) => None,
        }
    }

    /// A target's body, cut off with an error when the target sends
    /// nothing for `read_timeout` while we wait for it.
    pub fn upstream(
        body: UpstreamBody,
        inflight: InflightGuard,
        read_timeout: Duration,
    ) -> ProxyBody {
        if body.is_end_stream() {
            inflight.counted().succeeded();
        }
        ProxyBody {
            kind: Kind::Upstream {
                body,
                inflight,
                stall: StallWatch {
                    limit: read_timeout,
                    timer: None,
                    armed: false,
                },
            },
        }
    }
}

/// The read deadline of a response body: armed when the body has nothing
/// ready, disarmed by the next frame. A body that never waits (most small
/// responses arrive with their head) never sets a timer.
struct StallWatch {
    limit: Duration,
    /// Boxed: only bodies that wait need one, and it is reused by resetting.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl StallWatch {
    /// Whether the body has waited longer than the limit (with the task
    /// woken when it will have).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }
}

/// A target that went quiet mid-body.
#[derive(Debug, thiserror::Error)]
#[error("the target sent nothing for {}s within the response body", .0.as_secs_f64())]
pub struct BodyStalled(Duration);

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Upstream {
                body,
                inflight,
                stall,
            } => match Pin::new(body).poll_frame(cx) {
                Poll::Pending if stall.expired(cx) => {
                    let error = BodyStalled(stall.limit);
                    inflight.counted().body_failed(&error);
                    Poll::Ready(Some(Err(error.into())))
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Err(error))) => {
                    // The client's own body failing (still going out while
                    // the answer streams) is not the target's fault.
                    if !error
                        .downcast_ref::<H1Error>()
                        .is_some_and(|e| matches!(e, H1Error::Body(_)))
                    {
                        inflight.counted().body_failed(&*error);
                    }
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Ready(None) => {
                    inflight.counted().succeeded();
                    Poll::Ready(None)
                }
                ready => {
                    stall.armed = false;
                    ready
                }
            },
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// A client's request body as the stack sees it: hyper's, or none (requests
/// read by tollgate's own HTTP/1 reader carry no body).
pub enum ClientBody {
    Empty,
    Hyper(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Hyper(body) => body.size_hint(),
        }
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("client body: {0}")]
    Client(#[from] hyper::Error),
    /// The body did not match the length its head declares; sent on, the
    /// rest of the connection would be read out of step (smuggling).
    #[error("request body {0}")]
    Length(&'static str),
}

/// What tollgate sends upstream: the client's body, counted against the
/// listener's limit as it streams, or nothing.
pub struct RequestBody {
    inner: Option<ClientBody>,
    remaining: usize,
    limit: usize,
    /// Set while the body waits for the client's next bytes: a request
    /// timing out then is the client's doing, not the target's.
    waiting: Option<Arc<AtomicBool>>,
}

impl RequestBody {
    pub fn streaming(body: ClientBody, limit: usize, waiting: Arc<AtomicBool>) -> RequestBody {
        RequestBody {
            inner: Some(body),
            remaining: limit,
            limit,
            waiting: Some(waiting),
        }
    }

    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            remaining: 0,
            limit: 0,
            waiting: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Some(waiting) = &this.waiting {
            waiting.store(polled.is_pending(), Ordering::Relaxed);
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if data.len() > this.remaining {
                        this.inner = None;
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge {
                            limit: this.limit,
                        })));
                    }
                    this.remaining -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}
