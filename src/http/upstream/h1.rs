//! Plain HTTP/1.1 to targets on a per-thread pool of hyper connections.
//! Each worker is one thread with its own event loop, so idle connections
//! wait in a per-thread list: checkout and return take no lock, and no task
//! is spawned per request (hyper-util's pooled client does both).
//!
//! Each connection runs in its own task. Driving it from the request's task
//! instead was measured slower: writes to upstreams and clients then go out
//! one by one rather than batched per event-loop turn, and waking the peers
//! more often costs more than the hand-off between tasks saves.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::TCP_KEEPALIVE;
use crate::config::ProxyConfig;
use crate::http::body::RequestBody;

/// A connection to a target, as the handle that sends requests on it.
pub struct H1Conn {
    sender: SendRequest<RequestBody>,
    addr: SocketAddr,
}

impl H1Conn {
    /// Hands the connection back for the next request to this target, after
    /// its response has been read to the end.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
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
}

/// How a request to a target failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Sends `req` to `addr` on an idle connection of this thread, or a new one.
/// A pooled connection that turns out closed before the request was written
/// to it gives the request back; it is then sent on the next one.
pub async fn send(
    addr: SocketAddr,
    mut req: Request<RequestBody>,
    proxy: &ProxyConfig,
) -> Result<(Response<Incoming>, H1Conn), H1Error> {
    while let Some(mut conn) = checkout(addr) {
        // Ready at once unless its task has not yet seen the end of the
        // previous response; an error means it closed meanwhile.
        if conn.sender.ready().await.is_err() {
            continue;
        }
        match conn.sender.try_send_request(req).await {
            Ok(resp) => return Ok((resp, conn)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(H1Error::Http(e.into_error())),
            },
        }
    }
    let mut conn = connect(addr, proxy).await?;
    match conn.sender.try_send_request(req).await {
        Ok(resp) => Ok((resp, conn)),
        Err(e) => Err(H1Error::Http(e.into_error())),
    }
}

/// The most recently used idle connection to `addr` that is still open.
fn checkout(addr: SocketAddr) -> Option<H1Conn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(Idle { conn, .. }) = list.pop() {
            if !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    })
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
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&keepalive)
        .map_err(H1Error::Connect)?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    // Ends when the target closes the connection or every handle is dropped
    // (the request that holds it, or the idle list).
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(target = %addr, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(H1Conn { sender, addr })
}

struct Idle {
    conn: H1Conn,
    /// The sweep tick at which it went idle.
    tick: u32,
}

/// Idle connections close after this many sweep ticks (a tick is a quarter
/// of `pool_idle_timeout`, so the bound holds within 1.25×).
const IDLE_TICKS: u32 = 4;

thread_local! {
    static IDLE: RefCell<HashMap<SocketAddr, Vec<Idle>>> = RefCell::new(HashMap::new());
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
