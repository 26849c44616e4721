//! Plain HTTP/1.1 to targets over connections that the request's own task
//! drives. The hyper connection is polled from the proxied request's future
//! and then from its response body, so a request costs no hand-off to a
//! connection task and back, and no task spawned to watch for the connection
//! to become idle again (what a pooled client with a task per connection
//! does). Each worker is one thread with its own event loop, so idle
//! connections wait in a per-thread list: checkout and return take no lock.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::ProxyConfig;
use crate::http::body::RequestBody;

type Conn = Connection<TokioIo<TcpStream>, RequestBody>;

/// One connection to a target: the request handle and the connection state
/// machine that this side polls itself. Boxed: it moves between the pool,
/// request futures and response bodies, and its buffers are large.
pub struct H1Conn(Box<ConnParts>);

struct ConnParts {
    sender: SendRequest<RequestBody>,
    /// `None` once the connection has finished (closed or failed).
    conn: Option<Conn>,
    addr: SocketAddr,
}

impl H1Conn {
    /// Moves the connection's IO along; false once it has finished. Dropping
    /// a finished connection fails any request still queued on it, so a
    /// waiting response future always resolves.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.0.conn.as_mut() else {
            return false;
        };
        if Pin::new(conn).poll(cx).is_ready() {
            self.0.conn = None;
            return false;
        }
        true
    }

    /// Hands the connection back for the next request to this target, after
    /// its response has been read to the end.
    pub fn release(mut self, cx: &mut Context<'_>) {
        if !self.drive(cx) {
            return;
        }
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let limit = LIMITS.get().max_idle;
            let list = idle.entry(self.0.addr).or_default();
            if list.len() < limit {
                list.push(Idle {
                    conn: self,
                    tick: TICK.get(),
                });
            }
        });
    }
}

impl H1Conn {
    /// `release` from async code: for a response without a body to read.
    pub async fn release_now(self) {
        let mut conn = Some(self);
        poll_fn(|cx| {
            if let Some(c) = conn.take() {
                c.release(cx);
            }
            Poll::Ready(())
        })
        .await;
    }
}

/// How a request to a target failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Sends `req` to `addr` on an idle connection of this thread, or a new one.
/// A pooled connection that turns out closed before the request was written
/// to it gives the request back; it is then sent on a fresh connection.
pub async fn send(
    addr: SocketAddr,
    mut req: Request<RequestBody>,
    proxy: &ProxyConfig,
) -> Result<(Response<Incoming>, H1Conn), H1Error> {
    while let Some(mut conn) = checkout(addr).await {
        match exchange(&mut conn, req).await {
            Ok(resp) => return Ok((resp, conn)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(H1Error::Http(e.into_error())),
            },
        }
    }
    let mut conn = connect(addr, proxy).await?;
    match exchange(&mut conn, req).await {
        Ok(resp) => Ok((resp, conn)),
        Err(e) => Err(H1Error::Http(e.into_error())),
    }
}

/// Writes the request and reads the response head, driving the connection
/// from this task.
async fn exchange(
    conn: &mut H1Conn,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>> {
    let mut response = pin!(conn.0.sender.try_send_request(req));
    poll_fn(|cx| {
        conn.drive(cx);
        response.as_mut().poll(cx)
    })
    .await
}

/// The most recently used idle connection to `addr` that is still open.
async fn checkout(addr: SocketAddr) -> Option<H1Conn> {
    loop {
        let mut conn = IDLE
            .with(|idle| idle.borrow_mut().get_mut(&addr)?.pop())?
            .conn;
        // Polling notices a close by the target (and finishes the previous
        // response's bookkeeping); only a connection waiting for a request is used.
        let open = poll_fn(|cx| Poll::Ready(conn.drive(cx))).await;
        if open && conn.0.sender.is_ready() {
            return Some(conn);
        }
    }
}

async fn connect(addr: SocketAddr, proxy: &ProxyConfig) -> Result<H1Conn, H1Error> {
    let stream = tokio::time::timeout(proxy.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            H1Error::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {:?}", proxy.connect_timeout),
            ))
        })?
        .map_err(H1Error::Connect)?;
    stream.set_nodelay(true).map_err(H1Error::Connect)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&keepalive)
        .map_err(H1Error::Connect)?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    Ok(H1Conn(Box::new(ConnParts {
        sender,
        conn: Some(conn),
        addr,
    })))
}

struct Idle {
    conn: H1Conn,
    /// The sweep tick at which it went idle.
    tick: u32,
}

#[derive(Clone, Copy)]
struct Limits {
    max_idle: usize,
}

/// Idle connections close after this many sweep ticks (a tick is a quarter
/// of `pool_idle_timeout`, so the bound holds within 1.25×).
const IDLE_TICKS: u32 = 4;

thread_local! {
    static IDLE: RefCell<HashMap<SocketAddr, Vec<Idle>>> = RefCell::new(HashMap::new());
    static TICK: Cell<u32> = const { Cell::new(0) };
    static LIMITS: Cell<Limits> = const { Cell::new(Limits { max_idle: 0 }) };
}

/// Sets this thread up for pooling with `proxy`'s limits and starts its
/// sweeper, which closes connections idle for `pool_idle_timeout`. Call from
/// the worker's event loop; the sweeper ends with it.
pub fn start_worker_pool(proxy: &ProxyConfig) {
    LIMITS.set(Limits {
        max_idle: proxy.pool_max_idle_per_target,
    });
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
        // Lists are oldest first: drop the expired front of each.
        idle.borrow_mut().retain(|_, list| {
            let keep_from = list
                .iter()
                .position(|i| now.wrapping_sub(i.tick) < IDLE_TICKS)
                .unwrap_or(list.len());
            list.drain(..keep_from);
            !list.is_empty()
        });
    });
}
