//! HTTP/1.1 to targets, plain or TLS: our own client (the only HTTP/1 codec
//! towards targets) on a per-thread connection pool.
//! Each worker is one thread with its own event loop, so idle connections
//! wait in a per-thread list: checkout and return take no lock. A request is
//! written and its response read by the request's own task, with no channel
//! or connection task in between (hyper's client has both): the head and
//! the body's ready data go out in one write, and the response body streams
//! from the connection's buffer.

mod io;
mod request;
mod response;

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Response};
use http_body::Body as _;
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;

use super::TCP_KEEPALIVE;
use crate::config::ProxyConfig;
use crate::http::body::{RequestBody, RequestBodyError};
use crate::http::proxy::is_idempotent;
pub use io::{TlsOrigin, Upgraded, UpstreamIo};
pub use request::RequestFraming;
use request::RequestWriter;
pub use response::H1Body;

/// An open connection to a target, with what has been read from it and not
/// yet used. Always boxed: it moves with every request, from the
/// pool into the exchange, the response body and back.
pub struct H1Conn {
    io: UpstreamIo,
    buf: BytesMut,
    origin: Origin,
}

/// Which pooled connections may carry a request: same address, and the same
/// TLS settings and name (`TlsOrigin::id`; 0 is plain TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Origin {
    addr: SocketAddr,
    tls: u64,
}

/// Where a request goes and how its response is read.
pub struct Exchange<'a> {
    pub addr: SocketAddr,
    /// `https://` targets: how their connections are made.
    pub tls: Option<&'a TlsOrigin>,
    pub method: &'a Method,
    pub proxy: &'a ProxyConfig,
    /// An ordinary response keeps its fields as they came
    /// (`wire::ResponseLines`).
    pub wire: bool,
    /// The request asks to switch protocols: a `101` hands the connection
    /// over ([`H1Body::upgraded`]).
    pub upgrade: bool,
}

impl Exchange<'_> {
    fn origin(&self) -> Origin {
        Origin {
            addr: self.addr,
            tls: self.tls.map_or(0, |t| t.id),
        }
    }
}

impl H1Conn {
    /// Hands the connection back for the next request to this target, after
    /// its response has been read to the end.
    fn release(self: Box<Self>) {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.entry(self.origin).or_default();
            if list.len() < MAX_IDLE.get() {
                list.push(Idle {
                    conn: self,
                    tick: TICK.get(),
                });
            }
        });
    }

    /// Whether an idle connection is still usable: nothing (not even the
    /// end of the stream) may have arrived on it since its last response.
    /// The socket is only asked when the event loop has seen it readable;
    /// TLS records that carry no data (session tickets) do not count.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match &mut self.io {
            UpstreamIo::Plain(tcp) => {
                if tcp.poll_read_ready(&mut cx).is_pending() {
                    return true;
                }
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            UpstreamIo::Tls(_) => {
                response::poll_read_more(&mut self.io, &mut self.buf, &mut cx).is_pending()
            }
        }
    }
}

/// How a request to a target failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("connection error")]
    Io(#[source] std::io::Error),
    #[error("connection closed {0}")]
    Closed(&'static str),
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("request body")]
    Body(#[source] RequestBodyError),
}

/// Sends a request whose head is encoded already (framed as `framing`
/// says) as `to` says, on an idle connection of this thread or a new one.
/// An idempotent request without body that finds its pooled connection
/// closed before any response came is sent again on a new connection: the
/// target closed an idle connection just as it was reused.
// A plain function returning `send_with`'s future: an async wrapper would
// add a layer that copies the future into itself.
pub fn send_encoded<'a>(
    to: Exchange<'a>,
    head: Bytes,
    body: RequestBody,
    framing: RequestFraming,
) -> impl Future<Output = Result<Response<H1Body>, H1Error>> + 'a {
    let resendable = body.is_end_stream() && is_idempotent(to.method);
    let writer = RequestWriter::new(head, body, framing);
    send_with(to, writer, resendable)
}

async fn send_with(
    to: Exchange<'_>,
    writer: RequestWriter,
    resendable: bool,
) -> Result<Response<H1Body>, H1Error> {
    let mut writer = Some(writer);
    let origin = to.origin();
    loop {
        // One call site for `exchange` (each would have its own slot in
        // this future); a new connection is boxed: it is the exception, and
        // inline it would make this future larger for every request.
        let (conn, pooled) = match checkout(origin) {
            Some(conn) => (conn, true),
            None => (Box::pin(connect(&to, origin)).await?, false),
        };
        match exchange(conn, &mut writer, &to).await {
            Err(Attempt { error, reply_began })
                if pooled && !reply_began && resendable && !matches!(error, H1Error::Body(_)) =>
            {
                let Some(sent) = writer.take() else {
                    return Err(error);
                };
                tracing::debug!(target = %to.addr, %error, "pooled connection closed; sending on a new one");
                writer = Some(RequestWriter::new(
                    sent.into_head(),
                    RequestBody::empty(),
                    RequestFraming::Length(0),
                ));
            }
            done => return done.map_err(|a| a.error),
        }
    }
}

/// A failed exchange, and whether any of the reply had arrived.
struct Attempt {
    error: H1Error,
    reply_began: bool,
}

/// Writes the request while reading the response head (a target may answer
/// before it has read the whole body); what is left of the body goes on
/// with the response body.
async fn exchange(
    mut conn: Box<H1Conn>,
    writer: &mut Option<RequestWriter>,
    to: &Exchange<'_>,
) -> Result<Response<H1Body>, Attempt> {
    // Write after the worker's other ready tasks have had their turn:
    // targets then get this turn's requests in one burst instead of being
    // woken for each (measured with `yield_now`: +7% requests/s under load).
    crate::transport::after_ready_tasks().await;
    let mut write_failed: Option<H1Error> = None;
    // The writer stays where it is when done: a resend takes its head.
    let mut writing = writer.is_some();
    let mut parsed = poll_fn(|cx| {
        if writing && let Some(w) = writer.as_mut() {
            match w.poll_write(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => writing = false,
                Poll::Ready(Err(error @ H1Error::Body(_))) => {
                    return Poll::Ready(Err(Attempt {
                        error,
                        reply_began: false,
                    }));
                }
                // The target may have answered already (a 413 before
                // closing, say): what it sent is read before giving up.
                Poll::Ready(Err(error)) => {
                    writing = false;
                    write_failed = Some(error);
                }
                Poll::Pending => {}
            }
        }
        match poll_head(&mut conn, to, cx) {
            Poll::Ready(Err(attempt)) if !attempt.reply_began => {
                Poll::Ready(Err(match write_failed.take() {
                    Some(error) => Attempt {
                        error,
                        reply_began: false,
                    },
                    None => attempt,
                }))
            }
            other => other,
        }
    })
    .await?;
    let rest = if writing { writer.take() } else { None };
    if parsed.response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        if rest.is_some() || write_failed.is_some() {
            return Err(Attempt {
                error: H1Error::Invalid("101 Switching Protocols before the request was sent"),
                reply_began: true,
            });
        }
        return Ok(parsed.response.map(|()| H1Body::switched(conn)));
    }
    let body = H1Body::new(conn, &mut parsed, rest, write_failed.is_none());
    Ok(parsed.response.map(|()| body))
}

/// Reads until a final (non-1xx) response head has arrived.
fn poll_head(
    conn: &mut H1Conn,
    to: &Exchange<'_>,
    cx: &mut Context<'_>,
) -> Poll<Result<response::Head, Attempt>> {
    let mut reply_began = !conn.buf.is_empty();
    loop {
        let failed = |error| Attempt { error, reply_began };
        match response::parse_head(&mut conn.buf, to.method, to.wire) {
            Ok(Some(head))
                if head.response.status() == http::StatusCode::SWITCHING_PROTOCOLS
                    && to.upgrade =>
            {
                return Poll::Ready(Ok(head));
            }
            Ok(Some(head)) if head.response.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                return Poll::Ready(Err(failed(H1Error::Invalid(
                    "101 Switching Protocols without an upgrade request",
                ))));
            }
            // 100 Continue and other interim responses are not forwarded.
            Ok(Some(head)) if head.response.status().is_informational() => continue,
            Ok(Some(head)) => return Poll::Ready(Ok(head)),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Err(failed(e))),
        }
        match std::task::ready!(response::poll_read_more(&mut conn.io, &mut conn.buf, cx)) {
            Ok(0) => return Poll::Ready(Err(failed(H1Error::Closed("before a response")))),
            Ok(_) => reply_began = true,
            Err(e) => return Poll::Ready(Err(failed(H1Error::Io(e)))),
        }
    }
}

/// The most recently used idle connection to `origin` that is still open.
fn checkout(origin: Origin) -> Option<Box<H1Conn>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&origin)?;
        while let Some(Idle { mut conn, .. }) = list.pop() {
            if conn.still_open() {
                return Some(conn);
            }
        }
        None
    })
}

/// A new connection: TCP, and the TLS handshake for `https://` targets,
/// both within `connect_timeout`.
async fn connect(to: &Exchange<'_>, origin: Origin) -> Result<Box<H1Conn>, H1Error> {
    let timeout = to.proxy.connect_timeout;
    let made = tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(to.addr)
            .await
            .map_err(H1Error::Connect)?;
        tcp.set_nodelay(true).map_err(H1Error::Connect)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(&keepalive)
            .map_err(H1Error::Connect)?;
        match to.tls {
            None => Ok(UpstreamIo::Plain(tcp)),
            Some(tls) => tls.handshake(tcp).await.map_err(H1Error::Tls),
        }
    })
    .await
    .map_err(|_| {
        H1Error::Connect(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?}"),
        ))
    })??;
    Ok(Box::new(H1Conn {
        io: made,
        buf: BytesMut::new(),
        origin,
    }))
}

struct Idle {
    conn: Box<H1Conn>,
    /// The sweep tick at which it went idle.
    tick: u32,
}

/// Idle connections close after this many sweep ticks (a tick is a quarter
/// of `pool_idle_timeout`, so the bound holds within 1.25×).
const IDLE_TICKS: u32 = 4;

thread_local! {
    /// Keyed by target address with FxHash: the keys are the operator's
    /// targets, not client input, and SipHash cost 1% of a request.
    static IDLE: RefCell<FxHashMap<Origin, Vec<Idle>>> = RefCell::new(FxHashMap::default());
    static TICK: Cell<u32> = const { Cell::new(0) };
    /// Per target; 0 (no pooling) on a thread that did not start a pool.
    static MAX_IDLE: Cell<usize> = const { Cell::new(0) };
}

/// Sets this thread up for pooling with `proxy`'s limits and starts its
/// sweeper, which closes connections idle for `pool_idle_timeout`. Call from
/// the worker's event loop; the sweeper ends with it.
pub fn start_worker_pool(proxy: &ProxyConfig) {
    MAX_IDLE.set(proxy.pool_max_idle_per_target);
    let tick = (proxy.pool_idle_timeout / IDLE_TICKS).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            sweep();
        }
    });
}

fn sweep() {
    let now = TICK.get().wrapping_add(1);
    TICK.set(now);
    IDLE.with(|idle| {
        // Lists are oldest first: drop the expired front of each, and any
        // the target has closed meanwhile (so they do not wait in CLOSE_WAIT
        // for the next checkout).
        idle.borrow_mut().retain(|_, list| {
            let keep_from = list
                .iter()
                .position(|i| now.wrapping_sub(i.tick) < IDLE_TICKS)
                .unwrap_or(list.len());
            list.drain(..keep_from);
            list.retain_mut(|i| i.conn.still_open());
            !list.is_empty()
        });
    });
}
