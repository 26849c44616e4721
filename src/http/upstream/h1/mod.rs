//! Plain HTTP/1.1 to targets: our own client on a per-thread connection pool.
//! Each worker is one thread with its own event loop, so idle connections
//! wait in a per-thread list: checkout and return take no lock. A request is
//! written and its response read by the request's own task, with no channel
//! or connection task in between (hyper's client has both): the head and
//! the body's ready data go out in one write, and the response body streams
//! from the connection's buffer.

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
pub use request::RequestFraming;
use request::RequestWriter;
pub use response::H1Body;

/// An open connection to a target, with what has been read from it and not
/// yet used. Always boxed: it moves with every request, from the
/// pool into the exchange, the response body and back.
pub struct H1Conn {
    io: TcpStream,
    buf: BytesMut,
    addr: SocketAddr,
}

impl H1Conn {
    /// Hands the connection back for the next request to this target, after
    /// its response has been read to the end.
    fn release(self: Box<Self>) {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.entry(self.addr).or_default();
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
    /// The socket is only asked when the event loop has seen it readable.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.io.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// How a request to a target failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
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
/// says) to `addr`, on an idle connection of this thread or a new one.
/// With `wire`, an ordinary response keeps its fields as they came
/// (`wire::ResponseLines`). An idempotent request without body that finds
/// its pooled connection closed before any response came is sent again on
/// a new connection: the target closed an idle connection just as it was
/// reused.
// A plain function returning `send_with`'s future: an async wrapper would
// add a layer that copies the future into itself.
pub fn send_encoded<'a>(
    addr: SocketAddr,
    head: Bytes,
    body: RequestBody,
    framing: RequestFraming,
    method: &'a Method,
    proxy: &'a ProxyConfig,
    wire: bool,
) -> impl Future<Output = Result<Response<H1Body>, H1Error>> + 'a {
    let resendable = body.is_end_stream() && is_idempotent(method);
    let writer = RequestWriter::new(head, body, framing);
    send_with(addr, writer, resendable, method, proxy, wire)
}

async fn send_with(
    addr: SocketAddr,
    writer: RequestWriter,
    resendable: bool,
    method: &Method,
    proxy: &ProxyConfig,
    wire: bool,
) -> Result<Response<H1Body>, H1Error> {
    let mut writer = Some(writer);
    loop {
        // One call site for `exchange` (each would have its own slot in
        // this future); a new connection is boxed: it is the exception, and
        // inline it would make this future larger for every request.
        let (conn, pooled) = match checkout(addr) {
            Some(conn) => (conn, true),
            None => (Box::pin(connect(addr, proxy)).await?, false),
        };
        match exchange(conn, &mut writer, method, wire).await {
            Err(Attempt { error, reply_began })
                if pooled && !reply_began && resendable && !matches!(error, H1Error::Body(_)) =>
            {
                let Some(sent) = writer.take() else {
                    return Err(error);
                };
                tracing::debug!(target = %addr, %error, "pooled connection closed; sending on a new one");
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
    method: &Method,
    wire: bool,
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
        match poll_head(&mut conn, method, wire, cx) {
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
    let body = H1Body::new(conn, &mut parsed, rest, write_failed.is_none());
    Ok(parsed.response.map(|()| body))
}

/// Reads until a final (non-1xx) response head has arrived.
fn poll_head(
    conn: &mut H1Conn,
    method: &Method,
    wire: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<response::Head, Attempt>> {
    let mut reply_began = !conn.buf.is_empty();
    loop {
        let failed = |error| Attempt { error, reply_began };
        match response::parse_head(&mut conn.buf, method, wire) {
            // Upgrades never come this way (they go through hyper's client).
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

/// The most recently used idle connection to `addr` that is still open.
fn checkout(addr: SocketAddr) -> Option<Box<H1Conn>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(Idle { mut conn, .. }) = list.pop() {
            if conn.still_open() {
                return Some(conn);
            }
        }
        None
    })
}

async fn connect(addr: SocketAddr, proxy: &ProxyConfig) -> Result<Box<H1Conn>, H1Error> {
    let io = tokio::time::timeout(proxy.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            H1Error::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {:?}", proxy.connect_timeout),
            ))
        })?
        .map_err(H1Error::Connect)?;
    io.set_nodelay(true).map_err(H1Error::Connect)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    socket2::SockRef::from(&io)
        .set_tcp_keepalive(&keepalive)
        .map_err(H1Error::Connect)?;
    Ok(Box::new(H1Conn {
        io,
        buf: BytesMut::new(),
        addr,
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
    static IDLE: RefCell<FxHashMap<SocketAddr, Vec<Idle>>> = RefCell::new(FxHashMap::default());
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
