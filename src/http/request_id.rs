//! `x-request-id`: propagated when the client sent a sane one, generated
//! otherwise; set on the upstream request and on the response.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::RequestCtx;
use super::headers::X_REQUEST_ID;

const MAX_LEN: usize = 128;

#[derive(Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

#[derive(Clone)]
pub struct RequestId<S> {
    inner: S,
}

/// Whether a client's request id is kept: short, visible ASCII.
pub(super) fn acceptable(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

/// 128 random bits as 32 hex digits.
pub fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits = fastrand::u128(..);
    let mut out = [0u8; 32];
    for b in out.iter_mut().rev() {
        *b = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&out).expect("hex digits are a valid header value")
}

impl<S, B, ResB> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<ResB>, Error = Infallible>,
{
    type Response = Response<ResB>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if acceptable(v.as_bytes()) => v.clone(),
            _ => {
                let id = generate();
                req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        if let Some(ctx) = req.extensions_mut().get_mut::<RequestCtx>() {
            ctx.request_id = id.clone();
        }
        ResponseFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, ResB> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, Infallible>>,
{
    type Output = Result<Response<ResB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut resp) = std::task::ready!(this.inner.poll(cx));
        if let Some(id) = this.id.take() {
            resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        Poll::Ready(Ok(resp))
    }
}
