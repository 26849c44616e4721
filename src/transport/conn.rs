//! Per-connection state: the connection permit, activity clock and in-flight
//! request count that the idle timeout is decided on.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;

use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ListenerInfo;
use crate::identity::CertIdentity;

/// Lives as long as the connection, or longer when the connection was
/// upgraded (a WebSocket tunnel keeps its slot under the connection limit).
pub struct ConnState {
    pub listener: Arc<ListenerInfo>,
    pub peer: SocketAddr,
    /// The peer's IP as header text (X-Forwarded-For), rendered once.
    pub peer_ip: HeaderValue,
    /// `ip:port`, for the access log, rendered once.
    pub peer_text: Box<str>,
    /// The verified client certificate, on TLS listeners that asked for one.
    pub peer_cert: Option<Arc<CertIdentity>>,
    /// The peer is a trusted proxy: its forwarding fields are extended.
    pub forwarded_trusted: bool,
    /// Requests of this connection forwarded at once (HTTP/2 streams).
    pub forwarding_slots: Semaphore,
    /// URI SAN of the certificate this connection was served with (XFCC `By`).
    pub server_uri: Option<Arc<str>>,
    /// The client certificate's XFCC header, rendered once per connection for
    /// the field set (a bit set) of the first route that asked.
    pub xfcc: OnceLock<(u8, Option<HeaderValue>)>,
    /// Bumped whenever bytes move; the idle check compares snapshots, so the
    /// data path never reads a clock.
    activity: AtomicU64,
    inflight: AtomicU32,
    active: IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl ConnState {
    pub(super) fn new(
        listener: Arc<ListenerInfo>,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        active: IntGauge,
        peer_cert: Option<Arc<CertIdentity>>,
        server_uri: Option<Arc<str>>,
    ) -> ConnState {
        active.inc();
        let forwarded_trusted = listener
            .trusted_proxies
            .iter()
            .any(|block| block.contains(peer.ip()));
        ConnState {
            forwarded_trusted,
            forwarding_slots: Semaphore::new(listener.limits.max_forwarded_per_connection.max(1)),
            listener,
            peer,
            peer_text: peer.to_string().into_boxed_str(),
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            peer_cert,
            server_uri,
            xfcc: OnceLock::new(),
            activity: AtomicU64::new(0),
            inflight: AtomicU32::new(0),
            active,
            _permit: permit,
        }
    }

    /// Not a read-modify-write (a locked instruction, some 7ns, on every
    /// read and write): a connection's bytes move on its worker's one
    /// thread, and the idle check only asks whether the value changed.
    pub fn touch(&self) {
        let now = self.activity.load(Ordering::Relaxed);
        self.activity.store(now.wrapping_add(1), Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    fn busy(&self) -> bool {
        self.inflight.load(Ordering::Relaxed) > 0
    }

    /// Completes once the connection has had no request in flight and no
    /// bytes moving for `idle` (checked in quarters, so within 1.25 × idle).
    pub async fn idle_for(&self, idle: Duration) {
        let tick = (idle / 4).max(Duration::from_millis(10));
        let mut seen = self.activity();
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(tick).await;
            let now = self.activity();
            if now != seen || self.busy() {
                seen = now;
                quiet = Duration::ZERO;
            } else {
                quiet += tick;
                if quiet >= idle {
                    return;
                }
            }
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.active.dec();
    }
}

pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A socket that records when bytes last moved.
pub struct ActivityIo<T> {
    inner: T,
    state: Arc<ConnState>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, state: Arc<ConnState>) -> Self {
        ActivityIo { inner, state }
    }

    fn counted(&self, res: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        res
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.counted(res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.counted(res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
