//! Body types of the proxy: streamed both ways, never buffered whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::access_log::{BodyEnd, Unfinished};
use super::proxy::Tunnel;
use super::upstream::{H1Error, InflightGuard, UpstreamBody};
use super::wire::ResponseLines;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who takes a connection over after its `101`.
pub enum Switched {
    /// A route's target: bytes are relayed to it.
    Upstream(Tunnel),
    /// A local service (MQTT or WAMP over WebSocket, the tunnel relay).
    Local(crate::transport::Takeover),
}

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
        /// The request's log line and count, made when the body ends.
        unfinished: Option<Box<Unfinished>>,
    },
    Full(Option<Bytes>),
    /// A `101` response: no body, what takes the connection after it.
    Switching(Option<Switched>),
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

    /// The body of a `101` response, carrying what takes the connection.
    pub fn switching(to: Switched) -> ProxyBody {
        ProxyBody {
            kind: Kind::Switching(Some(to)),
        }
    }

    /// What takes the connection over once the `101` is written.
    pub fn take_tunnel(&mut self) -> Option<Switched> {
        match &mut self.kind {
            Kind::Switching(tunnel) => tunnel.take(),
            _ => None,
        }
    }

    /// The response's fields as its target wrote them, on the direct path
    /// (see `wire::ResponseLines`).
    pub fn response_lines(&self) -> Option<&ResponseLines> {
        match &self.kind {
            Kind::Upstream { body, .. } => body.lines(),
            Kind::Full(_) | Kind::Switching(_) => None,
        }
    }

    pub fn response_lines_mut(&mut self) -> Option<&mut ResponseLines> {
        match &mut self.kind {
            Kind::Upstream { body, .. } => body.lines_mut(),
            Kind::Full(_) | Kind::Switching(_) => None,
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
                unfinished: None,
            },
        }
    }

    /// Whether this is a target's body still coming (not all in hand).
    pub(crate) fn streams_from_target(&self) -> bool {
        matches!(&self.kind, Kind::Upstream { body, .. } if !body.arrived())
    }

    /// Has the request logged and counted when this target's body ends.
    pub(crate) fn finish_at_end(&mut self, request: Box<Unfinished>) {
        if let Kind::Upstream { unfinished, .. } = &mut self.kind {
            *unfinished = Some(request);
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Kind::Upstream {
            body,
            inflight,
            unfinished: unfinished @ Some(_),
            ..
        } = &mut self.kind
        {
            let request = unfinished.take().expect("matched Some");
            // A server may stop polling once the body says it has ended.
            if body.is_end_stream() {
                inflight.counted().succeeded();
                request.finish(BodyEnd::Whole);
            } else {
                request.finish(BodyEnd::Client);
            }
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

/// A target's body broke off: its failure, counted against it, and the
/// request logged and counted as failed.
fn target_failed(
    inflight: &InflightGuard,
    unfinished: &mut Option<Box<Unfinished>>,
    error: &(dyn std::error::Error + 'static),
) {
    inflight.counted().body_failed();
    if let Some(request) = unfinished.take() {
        request.finish(BodyEnd::Target {
            target: inflight.target(),
            error,
        });
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
                unfinished,
            } => match Pin::new(body).poll_frame(cx) {
                Poll::Pending if stall.expired(cx) => {
                    let error = BodyStalled(stall.limit);
                    target_failed(inflight, unfinished, &error);
                    Poll::Ready(Some(Err(error.into())))
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Err(error))) => {
                    // The client's own body failing (still going out while
                    // the answer streams) is not the target's fault.
                    if error
                        .downcast_ref::<H1Error>()
                        .is_some_and(|e| matches!(e, H1Error::Body(_)))
                    {
                        if let Some(request) = unfinished.take() {
                            request.finish(BodyEnd::Client);
                        }
                    } else {
                        target_failed(inflight, unfinished, &*error);
                    }
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Ready(None) => {
                    inflight.counted().succeeded();
                    if let Some(request) = unfinished.take() {
                        request.finish(BodyEnd::Whole);
                    }
                    Poll::Ready(None)
                }
                ready => {
                    stall.armed = false;
                    ready
                }
            },
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Switching(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Switching(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) | Kind::Switching(_) => SizeHint::with_exact(0),
        }
    }
}

/// A client's request body: none, one tollgate's HTTP/1 loop reads off
/// the wire ([`FedBody`]), or hyper's (HTTP/2).
pub enum ClientBody {
    Empty,
    Fed(FedBody),
    Hyper(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Fed(body) => body.poll_data(cx).map(|d| d.map(|d| d.map(Frame::data))),
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Fed(body) => body.is_end_stream(),
            ClientBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Fed(body) => body.size_hint(),
            ClientBody::Hyper(body) => body.size_hint(),
        }
    }
}

/// Body bytes the HTTP/1 loop may read ahead of the forwarder, at most.
const FED_AHEAD: usize = 64 * 1024;

/// A request body read off the wire by the connection's HTTP/1 loop (which
/// owns the socket) and taken by whoever forwards the request, through a
/// bounded queue: the loop reads no further than [`FED_AHEAD`] ahead of
/// the forwarder, so a slow target slows the client instead of filling
/// memory. Both ends run on the connection's worker thread, so its lock is
/// never contended.
pub struct FedBody {
    pipe: Arc<Mutex<Pipe>>,
    /// The length the head declares, for the size hint.
    declared: Option<u64>,
}

/// The loop's end of a [`FedBody`].
pub struct BodyFeed {
    pipe: Arc<Mutex<Pipe>>,
}

#[derive(Default)]
struct Pipe {
    chunks: std::collections::VecDeque<Bytes>,
    queued: usize,
    taken: u64,
    /// `Some(Ok)` once the body ended whole, `Some(Err)` if it broke off.
    end: Option<Result<(), &'static str>>,
    reader: Option<std::task::Waker>,
    feeder: Option<std::task::Waker>,
    /// The forwarder asked for the body (time for `100 Continue`).
    wanted: bool,
    reader_gone: bool,
}

/// A body and its feed, for a request whose head declares `declared`
/// bytes (`None`: chunked).
pub fn fed_body(declared: Option<u64>) -> (BodyFeed, FedBody) {
    let pipe = Arc::new(Mutex::new(Pipe::default()));
    (BodyFeed { pipe: pipe.clone() }, FedBody { pipe, declared })
}

fn lock(pipe: &Mutex<Pipe>) -> std::sync::MutexGuard<'_, Pipe> {
    pipe.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FedBody {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let mut pipe = lock(&self.pipe);
        if let Some(chunk) = pipe.chunks.pop_front() {
            pipe.queued -= chunk.len();
            pipe.taken += chunk.len() as u64;
            if let Some(feeder) = pipe.feeder.take() {
                feeder.wake();
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
        match pipe.end {
            Some(Ok(())) => Poll::Ready(None),
            Some(Err(why)) => Poll::Ready(Some(Err(why.into()))),
            None => {
                if !pipe.wanted {
                    pipe.wanted = true;
                    if let Some(feeder) = pipe.feeder.take() {
                        feeder.wake();
                    }
                }
                pipe.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let pipe = lock(&self.pipe);
        pipe.chunks.is_empty() && matches!(pipe.end, Some(Ok(())))
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) => SizeHint::with_exact(n.saturating_sub(lock(&self.pipe).taken)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for FedBody {
    fn drop(&mut self) {
        let mut pipe = lock(&self.pipe);
        pipe.reader_gone = true;
        if let Some(feeder) = pipe.feeder.take() {
            feeder.wake();
        }
    }
}

impl BodyFeed {
    /// Ready when the body may take more bytes; `false` once no one will
    /// read them.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut pipe = lock(&self.pipe);
        if pipe.reader_gone {
            return Poll::Ready(false);
        }
        if pipe.queued < FED_AHEAD {
            return Poll::Ready(true);
        }
        pipe.feeder = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Whether the forwarder has asked for the body (once asked, always).
    pub fn wanted(&self, cx: &mut Context<'_>) -> bool {
        let mut pipe = lock(&self.pipe);
        if !pipe.wanted {
            pipe.feeder = Some(cx.waker().clone());
        }
        pipe.wanted
    }

    pub fn push(&self, data: Bytes) {
        let mut pipe = lock(&self.pipe);
        pipe.queued += data.len();
        pipe.chunks.push_back(data);
        if let Some(reader) = pipe.reader.take() {
            reader.wake();
        }
    }

    /// The body ended: whole, or broken off for `why`.
    pub fn end(&self, end: Result<(), &'static str>) {
        let mut pipe = lock(&self.pipe);
        pipe.end.get_or_insert(end);
        if let Some(reader) = pipe.reader.take() {
            reader.wake();
        }
    }
}

impl Drop for BodyFeed {
    fn drop(&mut self) {
        self.end(Err("the client connection ended before its body"));
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("client body: {0}")]
    Client(BoxError),
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
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
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
