//! Body types of the proxy: streamed both ways, never buffered whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::upstream::{H1Conn, InflightGuard};

/// What tollgate sends to clients: an upstream's body or a small local one.
pub struct ProxyBody {
    kind: Kind,
}

enum Kind {
    Upstream {
        body: Incoming,
        /// Keeps the target's in-flight count until the body is done or dropped.
        _inflight: Option<InflightGuard>,
        /// The pooled HTTP/1 connection the body arrives on: back to the
        /// pool once the body has ended (at once when there is none), closed
        /// if the body is dropped before its end.
        conn: Option<H1Conn>,
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

    pub fn upstream(
        body: Incoming,
        inflight: Option<InflightGuard>,
        conn: Option<H1Conn>,
    ) -> ProxyBody {
        // A body that is already complete is never polled: free its connection now.
        let conn = match conn {
            Some(c) if body.is_end_stream() => {
                c.release();
                None
            }
            other => other,
        };
        ProxyBody {
            kind: Kind::Upstream {
                body,
                _inflight: inflight,
                conn,
            },
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Upstream { body, conn, .. } => {
                let frame = Pin::new(&mut *body).poll_frame(cx);
                let ended = match &frame {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    Poll::Ready(Some(Err(_))) => {
                        *conn = None;
                        false
                    }
                    Poll::Pending => false,
                };
                if ended && let Some(c) = conn.take() {
                    c.release();
                }
                frame
            }
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

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("client body: {0}")]
    Client(#[from] hyper::Error),
}

/// What tollgate sends upstream: the client's body, counted against the
/// listener's limit as it streams, or nothing.
pub struct RequestBody {
    inner: Option<Incoming>,
    remaining: usize,
    limit: usize,
}

impl RequestBody {
    pub fn streaming(body: Incoming, limit: usize) -> RequestBody {
        RequestBody {
            inner: Some(body),
            remaining: limit,
            limit,
        }
    }

    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            remaining: 0,
            limit: 0,
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
        match Pin::new(inner).poll_frame(cx) {
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
