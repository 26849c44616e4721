//! Accept loop: connection limits, TLS with the client's verified
//! certificate, the connection's facts (`ConnState`); then the listener's
//! front-end serves the connection (`FrontEnd`): the HTTP gateway, the admin
//! API, later MQTT and WAMP.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::{Notify, futures::Notified};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{ActivityIo, ConnState};
use super::tls::{TlsListener, certificate_problem};
use crate::config::units::Cidr;
use crate::config::{Limits, ListenerConfig, Protocol};
use crate::identity::CertIdentity;
use crate::metrics::Metrics;
use prometheus::{IntCounter, IntGauge};

/// What every connection of a listener shares.
pub struct ListenerInfo {
    pub name: Arc<str>,
    /// Position in `listeners`, the index of per-listener metric handles.
    pub index: usize,
    pub scheme: &'static str,
    pub limits: Limits,
    /// Connection slots, shared by every worker serving this listener.
    pub slots: Arc<Semaphore>,
    /// TLS listeners: the current certificates and client verifier.
    pub tls: Option<Arc<TlsListener>>,
    /// Request fields with `_` in their names travel on.
    pub underscores_in_headers: bool,
    /// Peers whose forwarding fields are kept and extended.
    pub trusted_proxies: Vec<Cidr>,
    /// Which front-end serves it.
    pub protocol: Protocol,
}

impl ListenerInfo {
    pub fn new(
        name: &str,
        index: usize,
        limits: Limits,
        tls: Option<Arc<TlsListener>>,
    ) -> ListenerInfo {
        ListenerInfo {
            name: Arc::from(name),
            index,
            scheme: if tls.is_some() { "https" } else { "http" },
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            tls,
            underscores_in_headers: false,
            trusted_proxies: Vec::new(),
            protocol: Protocol::Http,
        }
    }

    /// With the protocol and header settings of `config`.
    pub fn with_headers(mut self, config: &ListenerConfig) -> ListenerInfo {
        self.underscores_in_headers = config.underscores_in_headers;
        self.trusted_proxies = config.trusted_proxies.clone();
        self.protocol = config.protocol;
        self
    }
}

/// Shutdown in two steps: `graceful` stops accepting and asks connections to
/// finish their current requests; `force` closes whatever is left once the
/// drain deadline has passed.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub graceful: CancellationToken,
    pub force: CancellationToken,
    pub tracker: TaskTracker,
    /// `graceful` as one worker's connections see it on every request
    /// (set up by `for_worker`).
    pub drain: Arc<Drain>,
}

impl Shutdown {
    /// The same shutdown through tokens of one worker's own, and a drain
    /// signal that follows `graceful` without a lock per check. Call on
    /// the worker's runtime.
    pub fn for_worker(&self) -> Shutdown {
        let graceful = self.graceful.child_token();
        let drain = Arc::new(Drain::default());
        tokio::spawn({
            let (graceful, drain) = (graceful.clone(), drain.clone());
            async move {
                graceful.cancelled().await;
                drain.start();
            }
        });
        Shutdown {
            graceful,
            force: self.force.child_token(),
            tracker: self.tracker.clone(),
            drain,
        }
    }
}

/// The graceful step of a shutdown as connections check it between
/// requests: a flag, and a wait that registers its task once instead of
/// taking a lock each time the connection wakes (as polling a
/// `CancellationToken` does).
#[derive(Default)]
pub struct Drain {
    started: AtomicBool,
    notify: Notify,
}

impl Drain {
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    fn start(&self) {
        self.started.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Resolves once the drain has started.
    pub fn wait(&self) -> DrainWait<'_> {
        DrainWait {
            drain: self,
            notified: self.notify.notified(),
            registered: None,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct DrainWait<'a> {
        drain: &'a Drain,
        #[pin]
        notified: Notified<'a>,
        // The waker `notified` holds.
        registered: Option<Waker>,
    }
}

impl Future for DrainWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.drain.started() {
            return Poll::Ready(());
        }
        // Still registered with this task: the start (which sets the flag
        // before it notifies) will wake it.
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        // Registered before the flag is read again, so a start in between
        // is not missed.
        this.notified.as_mut().enable();
        if this.drain.started() || this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A connection's byte stream as the listener hands it over: plain TCP or
/// TLS (front-ends are generic over it, so a plain connection is read with
/// no indirection).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Reads what has arrived into `buf`; `Ok(0)` is the end of the stream.
    /// A short read clears the socket's readiness (tokio's `poll_read`
    /// does): the next poll waits for news instead of trying a read that
    /// would only say "nothing yet" (a system call per request saved).
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<std::io::Result<usize>> {
        buf.reserve(4096);
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }

    /// The protocol the TLS handshake chose by ALPN.
    fn alpn(&self) -> Option<&[u8]> {
        None
    }
}

impl Stream for TcpStream {}

impl Stream for tokio_rustls::server::TlsStream<TcpStream> {
    fn alpn(&self) -> Option<&[u8]> {
        self.get_ref().1.alpn_protocol()
    }
}

/// What serves a listener's connections once accepted (and, on a TLS
/// listener, once the handshake verified the client): the HTTP front-end,
/// the admin API, and later MQTT, WAMP and the tunnel. The connection's
/// slot is held until the returned future ends.
pub trait FrontEnd: Send + Sync + 'static {
    fn serve<S: Stream>(
        &self,
        io: S,
        conn: Arc<ConnState>,
        shutdown: Shutdown,
    ) -> impl Future<Output = ()> + Send;
}

/// A hyper server for a listener's limits; `http2_only` for connections
/// that chose HTTP/2 already. Its parser limits sit above the listener's
/// own (which answer with a JSON 431/414); they catch what is far beyond.
pub fn hyper_server(limits: &Limits, http2_only: bool) -> auto::Builder<TokioExecutor> {
    let header_bytes = limits.max_header_bytes.as_usize();
    let uri_bytes = limits.max_uri_bytes.as_usize();
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size((header_bytes * 2 + uri_bytes).max(8192))
        .max_headers(limits.max_headers.saturating_mul(2).max(100))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(header_bytes * 2 + uri_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    if http2_only { b.http2_only() } else { b }
}

/// Per-listener handles the accept loop and its connections count with.
#[derive(Clone)]
struct Counters {
    active: IntGauge,
    handshake_ok: IntCounter,
    handshake_bad_cert: IntCounter,
    handshake_failed: IntCounter,
    handshake_timeout: IntCounter,
}

/// Serves one listener until `shutdown.graceful` fires.
pub async fn serve<F: FrontEnd>(
    listener: TcpListener,
    info: Arc<ListenerInfo>,
    front_end: Arc<F>,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
) {
    let served = metrics
        .transport_connections
        .with_label_values(&[&info.name, "served"]);
    let rejected = metrics
        .transport_connections
        .with_label_values(&[&info.name, "rejected_limit"]);
    let handshakes = |outcome: &str| {
        metrics
            .tls_handshakes
            .with_label_values(&[&info.name, outcome])
    };
    let counters = Counters {
        active: metrics
            .transport_active_connections
            .with_label_values(&[&info.name]),
        handshake_ok: handshakes("ok"),
        handshake_bad_cert: handshakes("bad_certificate"),
        handshake_failed: handshakes("failed"),
        handshake_timeout: handshakes("timeout"),
    };
    let mut last_limit_warning: Option<Instant> = None;
    let mut draining = false;
    loop {
        let accepted = if draining {
            // Connections the kernel already took are served (closing the
            // socket would reset them); then the listener goes.
            match listener.accept().now_or_never() {
                Some(accepted) => accepted,
                None => break,
            }
        } else {
            tokio::select! {
                _ = shutdown.graceful.cancelled() => {
                    draining = true;
                    continue;
                }
                accepted = listener.accept() => accepted,
            }
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(_) if draining => break,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(listener = %info.name, error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = info.slots.clone().try_acquire_owned() else {
            rejected.inc();
            if last_limit_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_limit_warning = Some(Instant::now());
                tracing::warn!(listener = %info.name, %peer, limit = info.limits.max_connections,
                    "connection limit reached; closing new connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        served.inc();
        let conn = Accepted {
            stream,
            peer,
            permit,
            info: info.clone(),
            counters: counters.clone(),
        };
        let front_end = front_end.clone();
        let shutdown_conn = shutdown.clone();
        shutdown.tracker.spawn(async move {
            conn.serve(&*front_end, shutdown_conn).await;
        });
    }
    tracing::info!(listener = %info.name, "listener stopped accepting");
}

/// A connection that holds a slot and has not been served yet.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    info: Arc<ListenerInfo>,
    counters: Counters,
}

impl Accepted {
    async fn serve<F: FrontEnd>(self, front_end: &F, shutdown: Shutdown) {
        let Accepted {
            stream,
            peer,
            permit,
            info,
            counters,
        } = self;
        let Some(tls) = info.tls.clone() else {
            let state = Arc::new(ConnState::new(
                info,
                peer,
                permit,
                counters.active,
                None,
                None,
            ));
            return front_end.serve(stream, state, shutdown).await;
        };
        // The handshake counts against the header-read timeout: a client that
        // opens a connection and sends nothing is closed in the same time.
        let material = tls.material();
        let server_uri = material.server_uri.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(material.config.clone());
        drop(material);
        let timeout = info.limits.header_read_timeout;
        let handshake = tokio::select! {
            done = tokio::time::timeout(timeout, acceptor.accept(stream)) => done,
            _ = shutdown.graceful.cancelled() => return,
        };
        let stream = match handshake {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                if let Some(problem) = certificate_problem(&e) {
                    counters.handshake_bad_cert.inc();
                    tracing::warn!(listener = %info.name, %peer, error = %problem,
                        "TLS handshake failed: client certificate rejected");
                } else {
                    counters.handshake_failed.inc();
                    tracing::info!(listener = %info.name, %peer, error = %e, "TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                counters.handshake_timeout.inc();
                tracing::info!(listener = %info.name, %peer, timeout_ms = timeout.as_millis() as u64,
                    "TLS handshake timed out");
                return;
            }
        };
        counters.handshake_ok.inc();
        let peer_cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|der| CertIdentity::from_der(der));
        let peer_cert = match peer_cert {
            None => None,
            Some(Ok(cert)) => {
                // Crossbar's connect line: who, from where, which certificate.
                tracing::info!(listener = %info.name, %peer, cn = cert.cn.as_deref().unwrap_or(""),
                    o = %cert.o.join(","), sha256 = %cert.sha256, sha1 = %cert.sha1,
                    "client certificate verified");
                Some(Arc::new(cert))
            }
            Some(Err(e)) => {
                // Verified by rustls yet unreadable here: refuse rather than serve it anonymously.
                tracing::warn!(listener = %info.name, %peer, error = %e,
                    "verified client certificate cannot be read; closing the connection");
                return;
            }
        };
        let state = Arc::new(ConnState::new(
            info,
            peer,
            permit,
            counters.active,
            peer_cert,
            server_uri,
        ));
        front_end.serve(stream, state, shutdown).await;
    }
}

/// Serves a connection with a hyper server (HTTP/2, or the admin API's
/// HTTP/1.1 and HTTP/2): closed when idle, gracefully on the drain, at once
/// at its deadline.
pub async fn serve_hyper<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    stream: I,
    state: Arc<ConnState>,
    service: S,
    shutdown: Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer: SocketAddr = state.peer;
    let idle = state.listener.limits.idle_timeout;
    let io = TokioIo::new(ActivityIo::new(stream, state.clone()));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(listener = %state.listener.name, %peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = shutdown.graceful.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = state.idle_for(idle), if !closing => {
                tracing::debug!(listener = %state.listener.name, %peer, "closing idle connection");
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = shutdown.force.cancelled() => {
                tracing::debug!(listener = %state.listener.name, %peer, "drain deadline passed; closing connection");
                break;
            }
        }
    }
}

/// Binds `count` sockets to one address with SO_REUSEPORT, one per worker, so
/// the kernel spreads new connections over the workers. With port 0 the first
/// socket picks the port and the others join it. Returns the bound address.
pub fn bind_shared(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    use socket2::{Domain, Socket, Type};
    // SO_REUSEPORT would let a second gateway (or anything of the same user)
    // silently share the port; a plain bind first makes a taken port an error.
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&bound.into())?;
        socket.listen(4096)?;
        if let Some(local) = socket.local_addr()?.as_socket() {
            bound = local;
        }
        sockets.push(socket.into());
    }
    Ok((bound, sockets))
}
