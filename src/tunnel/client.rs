//! `tollgate tunnel connect`: a peer of the tunnel relay. It connects to
//! `wss://…/<prefix><id>` with a client certificate (the relay is mTLS
//! only, so `ws://` is refused), says CONN:HELLO, and then either
//!
//! - `--serve-http ADDR` (Micronets' test client): serves HTTP/1.1 on ADDR
//!   and carries each request over the tunnel as a REST:REQUEST; the
//!   matching REST:RESPONSE is the answer; or
//! - `--forward-to URL` (the device side): makes each REST:REQUEST it
//!   receives a real HTTP request to a local service and sends the answer
//!   back as a REST:RESPONSE.
//!
//! It reconnects with exponential backoff and jitter for as long as it
//! runs (the HTTP server keeps answering, 503, meanwhile), pings every 30 s,
//! and on shutdown says goodbye with a Close (1001, going away).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use super::envelope::{self, Envelope, MessageId};
use crate::telemetry::error_chain;
use crate::transport::hop_by_hop::strip_hop_by_hop;
use crate::transport::tls;
use crate::transport::{CarriedRequest, CarriedResponse};

/// `peerClass` when `--peer-class` is not given.
pub const DEFAULT_PEER_CLASS: &str = "tollgate-tunnel-client";
/// Requests waiting for an answer (serve-http) or being forwarded
/// (forward-to) on one connection, at most; more are answered 503.
const MAX_PENDING: usize = 1024;
/// HTTP connections the local server holds at once, at most.
const MAX_HTTP_CONNECTIONS: usize = 1024;
/// Messages queued for the relay, at most (senders wait beyond it).
const WRITE_QUEUE: usize = 256;
/// A ping goes to the relay this often...
const PING_EVERY: Duration = Duration::from_secs(30);
/// ...and a connection on which nothing at all (not even the pong) has
/// arrived for this long is taken for dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(75);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that lasted this long starts the backoff over.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// On shutdown, how long the Close and the HTTP server's drain may take.
const GOODBYE_WITHIN: Duration = Duration::from_secs(1);
/// How long a local HTTP client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the peer does with the tunnel.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Serve HTTP on this address and carry each request over the tunnel.
    ServeHttp(SocketAddr),
    /// Answer the tunnel's requests from this local HTTP service.
    ForwardTo(String),
}

/// The command line of `tollgate tunnel connect`.
#[derive(Debug, Clone)]
pub struct Options {
    /// `wss://host:port/<prefix><id>`.
    pub url: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub mode: Mode,
    pub peer_class: Option<String>,
    pub peer_id: Option<String>,
    /// Connecting, and each carried request, at most this long.
    pub timeout: Duration,
    /// The largest WebSocket message sent or received, and the largest
    /// HTTP body read.
    pub max_message: usize,
}

/// Bad input: the client cannot start (the command exits with 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(String);

/// The relay's URL, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    url: String,
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("invalid URL `{url}`: {e}"))?;
        match uri.scheme_str() {
            Some("wss") => {}
            Some("ws") => {
                return Err(format!(
                    "`{url}`: the tunnel relay is mTLS only; use a wss:// URL"
                ));
            }
            _ => return Err(format!("`{url}` is not a wss:// URL")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` names no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{url}`: user information in the URL is not used; the client certificate authenticates"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{url}` names no host"));
        }
        if uri.path().len() <= 1 {
            return Err(format!(
                "`{url}` has no path; expected the tunnel's, e.g. /micronets/v1/ws-proxy/<id>"
            ));
        }
        Ok(Target {
            url: url.to_owned(),
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
        })
    }
}

/// `--forward-to`: where requests go, and the path every request's path is
/// put under (none for `http://host:port` or `http://host:port/`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForwardBase {
    authority: String,
    host_header: HeaderValue,
    prefix: String,
}

impl ForwardBase {
    fn parse(url: &str) -> Result<ForwardBase, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--forward-to: invalid URL `{url}`: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "--forward-to `{url}`: only http:// local services are supported"
            ));
        }
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty() && !a.as_str().contains('@'))
            .ok_or_else(|| {
                format!("--forward-to `{url}` names no host (or has user information)")
            })?;
        if uri.query().is_some() {
            return Err(format!("--forward-to `{url}`: a query is not allowed here"));
        }
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("--forward-to `{url}`: {e}"))?;
        Ok(ForwardBase {
            authority: authority.as_str().to_owned(),
            host_header,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

// One per process: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Side {
    Serve(SocketAddr),
    Forward {
        base: Arc<ForwardBase>,
        http: HttpClient<HttpConnector, Full<Bytes>>,
    },
}

/// A peer of the tunnel relay, ready to run.
pub struct Client {
    target: Target,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    peer_class: String,
    peer_id: String,
    side: Side,
    timeout: Duration,
    max_message: usize,
}

/// Reads a file for `flag`, naming it in the error.
fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, SetupError> {
    std::fs::read(path)
        .map_err(|e| SetupError(format!("{flag} {}: cannot read it: {e}", path.display())))
}

/// The machine's host name, else a random id.
fn default_peer_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("{:08x}", fastrand::u32(..)))
}

impl Client {
    /// Checks the options and reads the certificate files; every error
    /// names the option or file at fault.
    pub fn new(options: Options) -> Result<Client, SetupError> {
        let target = Target::parse(&options.url).map_err(SetupError)?;
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|e| SetupError(format!("`{}`: not a usable host name: {e}", target.url)))?;
        let cert_pem = read_file("--cert", &options.cert)?;
        let key_pem = read_file("--key", &options.key)?;
        let ca_pem = read_file("--ca", &options.ca)?;
        let chain = tls::certificates(&cert_pem)
            .map_err(|e| SetupError(format!("--cert {}: {e}", options.cert.display())))?;
        let key = tls::private_key(&key_pem)
            .map_err(|e| SetupError(format!("--key {}: {e}", options.key.display())))?;
        let roots = tls::ca_roots(&ca_pem)
            .map_err(|e| SetupError(format!("--ca {}: {e}", options.ca.display())))?;
        let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                SetupError(format!(
                    "--cert {} with --key {}: {e}",
                    options.cert.display(),
                    options.key.display()
                ))
            })?;
        // The WebSocket handshake is HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let side = match &options.mode {
            Mode::ServeHttp(addr) => Side::Serve(*addr),
            Mode::ForwardTo(url) => {
                let base = ForwardBase::parse(url).map_err(SetupError)?;
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(options.timeout));
                let http = HttpClient::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .pool_timer(TokioTimer::new())
                    .build(connector);
                Side::Forward {
                    base: Arc::new(base),
                    http,
                }
            }
        };
        if options.max_message < 1024 {
            return Err(SetupError("--max-message must be at least 1KiB".to_owned()));
        }
        if options.timeout.is_zero() {
            return Err(SetupError("--timeout must be more than 0".to_owned()));
        }
        Ok(Client {
            target,
            server_name,
            tls: TlsConnector::from(Arc::new(config)),
            peer_class: options
                .peer_class
                .unwrap_or_else(|| DEFAULT_PEER_CLASS.to_owned()),
            peer_id: options.peer_id.unwrap_or_else(default_peer_id),
            side,
            timeout: options.timeout,
            max_message: options.max_message,
        })
    }

    /// Runs until `shutdown` is cancelled. Fails only when the HTTP address
    /// cannot be bound.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SetupError> {
        let client = Arc::new(self);
        match &client.side {
            Side::Serve(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| SetupError(format!("--serve-http {addr}: cannot listen: {e}")))?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| SetupError(format!("--serve-http {addr}: {e}")))?;
                tracing::info!(addr = %bound, "serving HTTP");
                let link = Arc::new(Link::default());
                let server = serve_http(
                    listener,
                    link.clone(),
                    client.timeout,
                    client.max_message,
                    shutdown.clone(),
                );
                tokio::join!(server, client.stay_connected(Some(link), &shutdown));
            }
            Side::Forward { .. } => client.stay_connected(None, &shutdown).await,
        }
        tracing::info!("tunnel client stopped");
        Ok(())
    }

    /// Connects, and reconnects with backoff, until shutdown.
    async fn stay_connected(
        self: &Arc<Self>,
        link: Option<Arc<Link>>,
        shutdown: &CancellationToken,
    ) {
        let mut backoff = Backoff::default();
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = tokio::time::timeout(self.timeout, self.connect()) => c,
            };
            match connected {
                Ok(Ok(ws)) => {
                    let since = Instant::now();
                    tracing::info!(
                        url = %self.target.url,
                        peer_class = %self.peer_class,
                        peer_id = %self.peer_id,
                        "tunnel connected"
                    );
                    let ended = self.session(ws, link.as_deref(), shutdown).await;
                    let lasted = since.elapsed();
                    match ended {
                        Ended::Shutdown => {
                            tracing::info!(url = %self.target.url, lasted = ?lasted, "tunnel disconnected: shutting down");
                            return;
                        }
                        Ended::Lost(why) => {
                            tracing::warn!(url = %self.target.url, lasted = ?lasted, reason = %why, "tunnel disconnected");
                        }
                    }
                    if lasted > STABLE_AFTER {
                        backoff.reset();
                    }
                }
                Ok(Err(why)) => {
                    tracing::warn!(url = %self.target.url, error = %why, "cannot connect to the tunnel relay");
                }
                Err(_) => {
                    tracing::warn!(url = %self.target.url, timeout = ?self.timeout, "cannot connect to the tunnel relay: timed out");
                }
            }
            let delay = backoff.next_delay();
            tracing::info!(retry_in = ?delay, "reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// TCP, TLS with the client certificate, the WebSocket handshake.
    async fn connect(&self) -> Result<Ws, String> {
        let tcp = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| format!("{}:{}: {e}", self.target.host, self.target.port))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {}", error_chain(&e)))?;
        // A small read buffer, as the relay's side keeps (tungstenite's
        // default is 128 KiB per connection).
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message));
        match tokio_tungstenite::client_async_with_config(
            self.target.url.as_str(),
            tls,
            Some(config),
        )
        .await
        {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(response)) => {
                let said = response
                    .body()
                    .as_deref()
                    .map(|b| {
                        String::from_utf8_lossy(b)
                            .chars()
                            .take(200)
                            .filter(|c| !c.is_control())
                            .collect::<String>()
                    })
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| format!(": {}", s.trim()))
                    .unwrap_or_default();
                Err(format!(
                    "the relay refused the WebSocket handshake with HTTP {}{said}",
                    response.status()
                ))
            }
            Err(e) => Err(format!("WebSocket handshake failed: {}", error_chain(&e))),
        }
    }

    /// One connection, from HELLO to its end.
    async fn session(
        self: &Arc<Self>,
        ws: Ws,
        link: Option<&Link>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let mut writer = tokio::spawn(write_loop(sink, rx));
        let conn = Arc::new(Conn::new(tx.clone(), self.max_message));
        let hello = envelope::hello(&json!(0), &self.peer_class, &self.peer_id);
        let _ = tx.send(Message::text(hello)).await;
        if let Some(link) = link {
            link.set(Some(conn.clone()));
        }
        // forward-to: requests being answered, ended with the connection.
        let mut forwarding = JoinSet::new();
        let forward_slots = Arc::new(Semaphore::new(MAX_PENDING));
        let silence = tokio::time::sleep(SILENCE_LIMIT);
        tokio::pin!(silence);
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ended::Shutdown,
                w = &mut writer => {
                    break Ended::Lost(match w {
                        Ok(Err(e)) => format!("cannot send: {e}"),
                        _ => "the writer stopped".to_owned(),
                    });
                }
                Some(_) = forwarding.join_next(), if !forwarding.is_empty() => {}
                _ = &mut silence => {
                    break Ended::Lost(format!("nothing received for {SILENCE_LIMIT:?}"));
                }
                read = stream.next() => match read {
                    None => break Ended::Lost("the relay closed the connection".to_owned()),
                    Some(Err(e)) => break Ended::Lost(error_chain(&e)),
                    Some(Ok(message)) => {
                        silence.as_mut().reset(tokio::time::Instant::now() + SILENCE_LIMIT);
                        match message {
                        Message::Text(text) => {
                            self.on_message(text.as_bytes(), &conn, link.is_some(), &mut forwarding, &forward_slots);
                        }
                        Message::Binary(data) => {
                            self.on_message(&data, &conn, link.is_some(), &mut forwarding, &forward_slots);
                        }
                        Message::Close(frame) => {
                            // tungstenite answers it; the stream ends next.
                            let (code, reason) = frame
                                .map(|f| (u16::from(f.code), f.reason.to_string()))
                                .unwrap_or((1005, String::new()));
                            tracing::info!(code, reason = %reason, "the relay closed the tunnel");
                        }
                        // Pongs to the relay's pings are queued on read and
                        // go out on the next read or write.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                        }
                    }
                },
            }
        };
        if let Some(link) = link {
            link.set(None);
        }
        // Waiting requests learn that the connection is gone (502).
        conn.fail_pending();
        forwarding.abort_all();
        if matches!(ended, Ended::Shutdown) {
            drop(conn);
            // The Close goes out, then the relay's answering Close ends
            // the stream; neither may hold the exit up for long.
            let _ = tokio::time::timeout(GOODBYE_WITHIN, async {
                let close = Message::Close(Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: "going away".into(),
                }));
                let _ = tx.send(close).await;
                drop(tx);
                let _ = (&mut writer).await;
                while let Some(Ok(_)) = stream.next().await {}
            })
            .await;
        }
        writer.abort();
        ended
    }

    /// One message from the relay. Nothing a relay sends may crash the
    /// client: what is not understood is logged (never its body) and dropped.
    fn on_message(
        self: &Arc<Self>,
        data: &[u8],
        conn: &Arc<Conn>,
        serving: bool,
        forwarding: &mut JoinSet<()>,
        slots: &Arc<Semaphore>,
    ) {
        let env = match Envelope::parse(data) {
            Ok(env) => env,
            Err(why) => {
                tracing::debug!(error = %why, len = data.len(), "ignoring a malformed message");
                return;
            }
        };
        if let Some((class, id)) = env.hello() {
            tracing::info!(peer_class = %class, peer_id = %id, "a peer said hello");
            return;
        }
        if serving {
            conn.answer(&env);
            return;
        }
        if env.message_type != envelope::REST_REQUEST {
            tracing::debug!(message_type = %env.message_type, "ignoring a message that is not a REST:REQUEST");
            return;
        }
        let Some(reply_to) = env.fields.get("messageId").cloned() else {
            tracing::debug!("ignoring a REST:REQUEST without a messageId");
            return;
        };
        let Side::Forward { base, http } = &self.side else {
            return;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let busy = text_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in progress",
            );
            // Not waited for: when even the queue to the relay is full,
            // the asker's own timeout answers.
            let text = envelope::encode_response(&json!(conn.fresh_id()), &reply_to, &busy);
            let _ = conn.tx.try_send(Message::text(text));
            return;
        };
        let conn = conn.clone();
        let (base, http) = (base.clone(), http.clone());
        let (timeout, max) = (self.timeout, self.max_message);
        forwarding.spawn(async move {
            let answer = match env.request() {
                Ok(request) => forward(&http, &base, request, timeout, max).await,
                Err(why) => text_answer(
                    StatusCode::BAD_REQUEST,
                    &format!("the carried request is unusable: {why}"),
                ),
            };
            conn.reply(&reply_to, &answer).await;
            drop(slot);
        });
    }
}

type Ws = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

enum Ended {
    Shutdown,
    Lost(String),
}

/// Sends what the session queues, and a ping every 30 s.
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<(), tungstenite::Error> {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else {
                    return Ok(());
                };
                let mut closing = matches!(m, Message::Close(_));
                sink.feed(m).await?;
                while !closing && let Ok(m) = rx.try_recv() {
                    closing = matches!(m, Message::Close(_));
                    sink.feed(m).await?;
                }
                sink.flush().await?;
                if closing {
                    return Ok(());
                }
            }
            _ = ping.tick() => sink.send(Message::Ping(Bytes::new())).await?,
        }
    }
}

type Waiter = oneshot::Sender<Result<CarriedResponse, String>>;

/// One connection's sending side and, in serve-http mode, the requests
/// waiting for their REST:RESPONSE by message id.
struct Conn {
    tx: mpsc::Sender<Message>,
    max_message: usize,
    next_id: AtomicU64,
    pending: Mutex<HashMap<MessageId, Waiter>>,
}

impl Conn {
    fn new(tx: mpsc::Sender<Message>, max_message: usize) -> Conn {
        Conn {
            tx,
            max_message,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, Waiter>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A REST:RESPONSE (or the relay's refusal) for a waiting request.
    fn answer(&self, env: &Envelope) {
        let refused = env.message_type == envelope::MALFORMED;
        if env.message_type != envelope::REST_RESPONSE && !refused {
            tracing::debug!(message_type = %env.message_type, "ignoring a message that is not a REST:RESPONSE");
            return;
        }
        let waiter = env
            .in_response_to
            .as_ref()
            .and_then(|id| self.pending().remove(id));
        let Some(waiter) = waiter else {
            tracing::debug!(message_type = %env.message_type, "ignoring an answer to no waiting request");
            return;
        };
        let answer = if refused {
            let why = env
                .fields
                .get("reasonPhrase")
                .and_then(Value::as_str)
                .unwrap_or("refused");
            Err(format!("the relay did not carry the request: {why}"))
        } else {
            env.response()
                .map_err(|why| format!("the peer's answer is unusable: {why}"))
        };
        let _ = waiter.send(answer);
    }

    fn fail_pending(&self) {
        self.pending().clear();
    }

    /// Carries `request` and waits for its answer.
    async fn carry(
        self: Arc<Self>,
        request: CarriedRequest,
        timeout: Duration,
    ) -> Response<Full<Bytes>> {
        let n = self.fresh_id();
        let text = envelope::encode_request(&json!(n), &request);
        if text.len() > self.max_message {
            return text_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request does not fit the tunnel's message size",
            );
        }
        let id = MessageId(n.to_string());
        let (waiter, answer) = oneshot::channel();
        {
            let mut pending = self.pending();
            if pending.len() >= MAX_PENDING {
                return text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many requests are waiting on the tunnel",
                );
            }
            pending.insert(id.clone(), waiter);
        }
        // However this ends (even the caller going away), the id is no
        // longer waited for.
        let _forget = Forget { conn: &self, id };
        let exchange = async {
            if self.tx.send(Message::text(text)).await.is_err() {
                return text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the tunnel is not connected",
                );
            }
            match answer.await {
                Ok(Ok(response)) => http_response(response),
                Ok(Err(why)) => text_response(StatusCode::BAD_GATEWAY, &why),
                Err(_) => text_response(
                    StatusCode::BAD_GATEWAY,
                    "the tunnel connection was lost before the answer came",
                ),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                text_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("no answer over the tunnel within {timeout:?}"),
                )
            })
    }

    /// Sends a REST:RESPONSE to the request whose `messageId` was `to`.
    async fn reply(&self, to: &Value, response: &CarriedResponse) {
        let id = json!(self.fresh_id());
        let mut text = envelope::encode_response(&id, to, response);
        // Checked here so that the caller gets a 502 rather than the
        // connection ending on a message too large to send.
        if text.len() > self.max_message {
            text = envelope::encode_response(
                &id,
                to,
                &text_answer(
                    StatusCode::BAD_GATEWAY,
                    "the local service's response does not fit the tunnel's message size",
                ),
            );
        }
        let _ = self.tx.send(Message::text(text)).await;
    }
}

struct Forget<'a> {
    conn: &'a Conn,
    id: MessageId,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.conn.pending().remove(&self.id);
    }
}

/// The serve-http side's view of the tunnel: the connection, when there is one.
#[derive(Default)]
struct Link {
    current: Mutex<Option<Arc<Conn>>>,
}

impl Link {
    fn set(&self, conn: Option<Arc<Conn>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    fn get(&self) -> Option<Arc<Conn>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The local HTTP/1.1 server of serve-http mode, until shutdown.
async fn serve_http(
    listener: TcpListener,
    link: Arc<Link>,
    timeout: Duration,
    max_message: usize,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => tokio::select! {
                    _ = shutdown.cancelled() => break,
                    a = listener.accept() => a.map(|a| (a, slot)),
                },
                Err(_) => break,
            },
        };
        let ((stream, _), slot) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let link = link.clone();
        let service = hyper::service::service_fn(move |req| {
            let link = link.clone();
            async move { Ok::<_, Infallible>(handle_http(req, &link, timeout, max_message).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(GOODBYE_WITHIN, graceful.shutdown()).await;
}

async fn handle_http<B>(
    req: Request<B>,
    link: &Link,
    timeout: Duration,
    max_message: usize,
) -> Response<Full<Bytes>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(conn) = link.get() else {
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the tunnel is not connected; retrying",
        );
    };
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    // A client that sends its body slowly holds a connection slot only
    // as long as a request may take.
    let request = match tokio::time::timeout(timeout, carried_request(req, max_message)).await {
        Ok(Ok(r)) => r,
        Ok(Err(refusal)) => return refusal,
        Err(_) => {
            return text_response(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            );
        }
    };
    let response = conn.carry(request, timeout).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), "carried a request");
    response
}

/// Fields carried as they are: not hop-by-hop (the gateway's one rule,
/// fields `Connection` names included), not those the body's form conveys,
/// not those in `also`.
fn carried_fields(mut headers: HeaderMap, also: &[HeaderName]) -> Vec<(String, String)> {
    strip_hop_by_hop(&mut headers, false);
    // `TE: trailers` too: a message carries no trailers.
    for name in [header::TE, header::CONTENT_LENGTH, header::CONTENT_TYPE] {
        headers.remove(name);
    }
    for name in also {
        headers.remove(name);
    }
    header_pairs(&headers)
}

/// Carried pairs as a header map; fields HTTP cannot carry are dropped.
fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                map.append(n, v);
            }
            _ => tracing::debug!(field = %name, "dropping a header field HTTP cannot carry"),
        }
    }
    map
}

/// A header map's fields as text, in order (a value that is not UTF-8 is
/// read leniently).
fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            let value = match v.to_str() {
                Ok(s) => s.to_owned(),
                Err(_) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
            };
            (n.as_str().to_owned(), value)
        })
        .collect()
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Reads a body of at most `max` bytes.
async fn read_body<B>(body: B, max: usize) -> Result<Bytes, (StatusCode, String)>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {max} bytes"),
        )),
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            format!("the body was cut short: {}", error_chain(&*e)),
        )),
    }
}

/// serve-http: a local HTTP request as a carried one.
async fn carried_request<B>(
    req: Request<B>,
    max: usize,
) -> Result<CarriedRequest, Response<Full<Bytes>>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(text_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {max} bytes"),
        ));
    }
    let body = read_body(body, max)
        .await
        .map_err(|(status, why)| text_response(status, &why))?;
    let content_type = content_type(&parts.headers);
    let headers = carried_fields(parts.headers, &[]);
    let query = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    Ok(CarriedRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query,
        headers,
        content_type,
        body,
    })
}

/// serve-http: a carried answer as the local HTTP response.
fn http_response(r: CarriedResponse) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(Full::new(r.body));
    *response.status_mut() = status;
    let mut fields = header_map(&r.headers);
    strip_hop_by_hop(&mut fields, false);
    for name in [header::TE, header::CONTENT_LENGTH, header::CONTENT_TYPE] {
        fields.remove(name);
    }
    let headers = response.headers_mut();
    *headers = fields;
    if let Some(t) = r.content_type.and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert(header::CONTENT_TYPE, t);
    }
    if let Some(reason) = r.reason
        && status.canonical_reason() != Some(reason.as_str())
        && let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(reason)
    {
        response.extensions_mut().insert(phrase);
    }
    response
}

/// forward-to: the HTTP request to the local service.
fn local_request(base: &ForwardBase, r: CarriedRequest) -> Result<Request<Full<Bytes>>, String> {
    // The path goes below the base as it is: it may not climb out of it
    // (`..`, escaped or not) or smuggle a query or fragment in.
    if !r.path.starts_with('/') || r.path.contains(['?', '#']) {
        return Err(format!("`{}` is not a plain absolute path", r.path));
    }
    if r.path.split('/').any(|segment| {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        decoded == "." || decoded == ".."
    }) {
        return Err(format!("`{}` holds a dot segment", r.path));
    }
    let mut target = format!("http://{}{}{}", base.authority, base.prefix, r.path);
    if !r.query.is_empty() {
        target.push('?');
        target.push_str(
            &form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&r.query)
                .finish(),
        );
    }
    let uri: Uri = target
        .parse()
        .map_err(|e| format!("the path is not usable in a URL: {e}"))?;
    let method = http::Method::from_bytes(r.method.as_bytes())
        .map_err(|_| format!("`{}` is not an HTTP method", r.method))?;
    let mut request = Request::new(Full::new(r.body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    for (name, value) in &r.headers {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a header field name"))?;
        HeaderValue::from_str(value)
            .map_err(|_| format!("the `{name}` field's value is not usable"))?;
    }
    let mut fields = header_map(&r.headers);
    strip_hop_by_hop(&mut fields, false);
    for name in [
        header::HOST,
        header::TE,
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
    ] {
        fields.remove(name);
    }
    let headers = request.headers_mut();
    *headers = fields;
    headers.insert(header::HOST, base.host_header.clone());
    if let Some(t) = r.content_type {
        let t =
            HeaderValue::from_str(&t).map_err(|_| "the content type is not usable".to_owned())?;
        headers.insert(header::CONTENT_TYPE, t);
    }
    Ok(request)
}

/// forward-to: the local service's response as a carried one.
async fn carried_response<B>(response: Response<B>, max: usize) -> Result<CarriedResponse, String>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = response.into_parts();
    let body = read_body(body, max)
        .await
        .map_err(|(_, why)| format!("the local service's response: {why}"))?;
    let reason = parts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
        .or_else(|| parts.status.canonical_reason().map(str::to_owned));
    Ok(CarriedResponse {
        status: parts.status.as_u16(),
        reason,
        content_type: content_type(&parts.headers),
        headers: carried_fields(parts.headers, &[]),
        body,
    })
}

/// forward-to: one carried request answered by the local service.
async fn forward(
    http: &HttpClient<HttpConnector, Full<Bytes>>,
    base: &ForwardBase,
    request: CarriedRequest,
    timeout: Duration,
    max: usize,
) -> CarriedResponse {
    let (method, path) = (request.method.clone(), request.path.clone());
    let request = match local_request(base, request) {
        Ok(r) => r,
        Err(why) => {
            return text_answer(
                StatusCode::BAD_REQUEST,
                &format!("the carried request cannot be made: {why}"),
            );
        }
    };
    let exchange = async {
        let response = http.request(request).await.map_err(|e| {
            format!(
                "the local service at {} cannot be reached: {}",
                base.authority,
                error_chain(&e)
            )
        })?;
        carried_response(response, max).await
    };
    let answer = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(why)) => text_answer(StatusCode::BAD_GATEWAY, &why),
        Err(_) => text_answer(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("the local service did not answer within {timeout:?}"),
        ),
    };
    tracing::debug!(%method, %path, status = answer.status, "forwarded a request");
    answer
}

fn text_answer(status: StatusCode, text: &str) -> CarriedResponse {
    CarriedResponse {
        status: status.as_u16(),
        reason: status.canonical_reason().map(str::to_owned),
        headers: Vec::new(),
        content_type: Some("text/plain; charset=utf-8".to_owned()),
        body: Bytes::from(format!("{text}\n")),
    }
}

fn text_response(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Exponential backoff: 0.5 s doubling up to 30 s, each delay drawn
/// between half and all of its step so that peers do not retry in step.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            step: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(BACKOFF_MAX);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    fn reset(&mut self) {
        self.step = BACKOFF_FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)], body: &'static [u8]) -> Request<Full<Bytes>> {
        let mut r = Request::builder().method("POST").uri(uri);
        for (n, v) in headers {
            r = r.header(*n, *v);
        }
        r.body(Full::new(Bytes::from_static(body))).unwrap()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_local_request_is_carried_with_its_query_decoded_and_hop_by_hop_fields_dropped() {
        let body = br#"{"subnetId":"mocksubnet007"}"#;
        let req = request(
            "/micronets/v1/dhcp/subnets?a=1+2&b=x%26y&a=3&flag&u=%C3%A9",
            &[
                ("Host", "localhost:5001"),
                ("User-Agent", "curl/8"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "listed in Connection"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic eA=="),
                ("Content-Type", "application/json"),
                ("Content-Length", "28"),
                ("Accept", "*/*"),
                ("X-Multi", "a"),
                ("X-Multi", "b"),
            ],
            body,
        );
        let carried = carried_request(req, 1024).await.unwrap();
        assert_eq!(carried.method, "POST");
        assert_eq!(carried.path, "/micronets/v1/dhcp/subnets");
        assert_eq!(
            carried.query,
            pairs(&[
                ("a", "1 2"),
                ("b", "x&y"),
                ("a", "3"),
                ("flag", ""),
                ("u", "é")
            ])
        );
        assert_eq!(
            carried.headers,
            pairs(&[
                ("host", "localhost:5001"),
                ("user-agent", "curl/8"),
                ("accept", "*/*"),
                ("x-multi", "a"),
                ("x-multi", "b"),
            ])
        );
        assert_eq!(carried.content_type.as_deref(), Some("application/json"));
        assert_eq!(&carried.body[..], body);
        // On the wire the JSON body is a JSON value.
        let text = envelope::encode_request(&json!(1), &carried);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["message"]["messageBody"]["subnetId"], "mocksubnet007");
        assert_eq!(v["message"]["queryStrings"][1]["value"], "x&y");
        assert_eq!(
            Envelope::parse(text.as_bytes()).unwrap().request().unwrap(),
            carried
        );
    }

    #[tokio::test]
    async fn text_and_binary_bodies_survive_the_trip() {
        for (media, body) in [
            ("text/plain; charset=utf-8", "héllo wörld".as_bytes()),
            ("image/png", &[0u8, 159, 146, 150, 255, 0][..]),
            ("application/octet-stream", b"\x00\x01\x02"),
        ] {
            let req = Request::builder()
                .method("PUT")
                .uri("/x")
                .header("content-type", media)
                .body(Full::new(Bytes::copy_from_slice(body)))
                .unwrap();
            let carried = carried_request(req, 1024).await.unwrap();
            let text = envelope::encode_request(&json!(2), &carried);
            let back = Envelope::parse(text.as_bytes()).unwrap().request().unwrap();
            assert_eq!(&back.body[..], body, "{media}");
            assert_eq!(back.content_type.as_deref(), Some(media));
            // The device side makes the same request of its local service.
            let base = ForwardBase::parse("http://127.0.0.1:8080").unwrap();
            let local = local_request(&base, back).unwrap();
            assert_eq!(local.headers()["content-type"], media);
            assert_eq!(
                local.headers().get_all("content-type").iter().count(),
                1,
                "one Content-Type for {media}"
            );
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_with_413() {
        let req = request("/x", &[("content-length", "2000")], b"");
        let refused = carried_request(req, 1024).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Without a declared length, reading stops at the limit.
        let req = request("/x", &[], &[b'a'; 2000]);
        let req = req.map(|b| {
            http_body_util::StreamBody::new(futures_util::stream::once(async move {
                Ok::<_, Infallible>(http_body::Frame::data(
                    b.collect().await.unwrap().to_bytes(),
                ))
            }))
        });
        let refused = carried_request(req, 1024).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_carried_response_becomes_the_local_response() {
        let r = CarriedResponse {
            status: 201,
            reason: Some("Made It".into()),
            headers: pairs(&[
                ("X-Trace", "abc"),
                ("Connection", "close"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "99"),
                ("Content-Type", "text/html"),
                ("Bad Name", "x"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ]),
            content_type: Some("application/json".into()),
            body: Bytes::from_static(br#"{"ok":true}"#),
        };
        let resp = http_response(r.clone());
        assert_eq!(resp.status(), StatusCode::CREATED);
        let h = resp.headers();
        assert_eq!(h["x-trace"], "abc");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        for gone in ["connection", "transfer-encoding", "content-length"] {
            assert!(!h.contains_key(gone), "{gone} is not carried");
        }
        assert_eq!(
            resp.extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|p| p.as_bytes()),
            Some(&b"Made It"[..])
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"ok":true}"#);
        // The standard phrase needs no extension.
        let plain = http_response(CarriedResponse {
            reason: Some("Created".into()),
            ..r
        });
        assert!(
            plain
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );
    }

    #[test]
    fn a_carried_path_cannot_leave_the_base() {
        let base = ForwardBase::parse("http://127.0.0.1:8080/api").unwrap();
        for path in ["/../admin", "/a/%2e%2E/b", "/./x", "/x?y=1", "/x#f", "x"] {
            let r = CarriedRequest {
                method: "GET".into(),
                path: path.into(),
                query: Vec::new(),
                headers: Vec::new(),
                content_type: None,
                body: Bytes::new(),
            };
            assert!(local_request(&base, r).is_err(), "{path} must be refused");
        }
    }

    #[test]
    fn the_local_request_goes_to_the_forward_to_service() {
        let base = ForwardBase::parse("http://127.0.0.1:8080/api/").unwrap();
        let carried = CarriedRequest {
            method: "PATCH".into(),
            path: "/subnets/7".into(),
            query: pairs(&[("q", "a b"), ("x", "1&2"), ("q", "é")]),
            headers: pairs(&[
                ("Host", "gateway.example"),
                ("X-Request-Id", "r1"),
                ("Connection", "close, X-Secret-Hop"),
                ("X-Secret-Hop", "1"),
                ("Upgrade", "websocket"),
                ("Proxy-Connection", "keep-alive"),
                ("Content-Length", "5"),
                ("Accept", "*/*"),
            ]),
            content_type: Some("application/json".into()),
            body: Bytes::from_static(b"{}"),
        };
        let r = local_request(&base, carried.clone()).unwrap();
        assert_eq!(r.method(), "PATCH");
        assert_eq!(
            r.uri().to_string(),
            "http://127.0.0.1:8080/api/subnets/7?q=a+b&x=1%262&q=%C3%A9"
        );
        let mut names: Vec<&str> = r.headers().keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "content-type", "host", "x-request-id"]);
        assert_eq!(r.headers()["host"], "127.0.0.1:8080");
        assert_eq!(r.headers()["content-type"], "application/json");
        // Without a base path and without a query.
        let base = ForwardBase::parse("http://localhost:5000").unwrap();
        let r = local_request(
            &base,
            CarriedRequest {
                query: Vec::new(),
                ..carried.clone()
            },
        )
        .unwrap();
        assert_eq!(r.uri().to_string(), "http://localhost:5000/subnets/7");
        // What HTTP cannot say is refused, not sent half.
        let bad = CarriedRequest {
            method: "GET X".into(),
            ..carried.clone()
        };
        assert!(local_request(&base, bad).is_err());
        let bad = CarriedRequest {
            headers: pairs(&[("X-Bad", "a\nb")]),
            ..carried
        };
        assert!(local_request(&base, bad).is_err());
    }

    #[tokio::test]
    async fn the_local_response_is_carried_back() {
        let mut resp = Response::builder()
            .status(418)
            .header("Content-Type", "text/plain")
            .header("Content-Length", "5")
            .header("Connection", "keep-alive")
            .header("Keep-Alive", "timeout=5")
            .header("X-A", "1")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        resp.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::try_from(&b"Short And Stout"[..]).unwrap());
        let c = carried_response(resp, 1024).await.unwrap();
        assert_eq!(c.status, 418);
        assert_eq!(c.reason.as_deref(), Some("Short And Stout"));
        assert_eq!(c.headers, pairs(&[("x-a", "1")]));
        assert_eq!(c.content_type.as_deref(), Some("text/plain"));
        assert_eq!(&c.body[..], b"hello");
        let big = Response::new(Full::new(Bytes::from(vec![b'x'; 2000])));
        assert!(carried_response(big, 1024).await.is_err());
    }

    #[test]
    fn urls_are_checked() {
        let t = Target::parse("wss://gw.example:8443/micronets/v1/ws-proxy/dhcp-0001").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("gw.example", 8443));
        assert_eq!(Target::parse("wss://gw/t/x").unwrap().port, 443);
        assert_eq!(Target::parse("wss://[::1]:9/t/x").unwrap().host, "::1");
        for (bad, says) in [
            ("ws://gw/t/x", "mTLS only"),
            ("https://gw/t/x", "not a wss://"),
            ("wss://gw:8443", "no path"),
            ("wss://gw:8443/", "no path"),
            ("wss://u:p@gw/t/x", "user information"),
            ("not a url", "invalid URL"),
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(ForwardBase::parse("https://127.0.0.1:1").is_err());
        assert!(ForwardBase::parse("http://127.0.0.1:1/?a=b").is_err());
        assert!(ForwardBase::parse("127.0.0.1:1").is_err());
        let b = ForwardBase::parse("http://127.0.0.1:5000/").unwrap();
        assert_eq!(
            (b.authority.as_str(), b.prefix.as_str()),
            ("127.0.0.1:5000", "")
        );
    }

    #[test]
    fn backoff_doubles_to_30s_with_jitter_and_starts_over() {
        let mut b = Backoff::default();
        let mut step = BACKOFF_FIRST;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} within half of {step:?}");
            step = (step * 2).min(BACKOFF_MAX);
        }
        assert_eq!(b.step, BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_FIRST);
    }

    /// A REST:RESPONSE text answering `to`.
    fn response_to(to: &Value, status: u16) -> Envelope {
        let text = envelope::encode_response(
            &json!("relay-1"),
            to,
            &CarriedResponse {
                status,
                reason: None,
                headers: pairs(&[("X-From", "device")]),
                content_type: Some("text/plain".into()),
                body: Bytes::from_static(b"from the device"),
            },
        );
        Envelope::parse(text.as_bytes()).unwrap()
    }

    async fn sent_id(rx: &mut mpsc::Receiver<Message>) -> Value {
        let Some(Message::Text(t)) = rx.recv().await else {
            panic!("a text message is sent");
        };
        let env = Envelope::parse(t.as_bytes()).unwrap();
        assert_eq!(env.message_type, envelope::REST_REQUEST);
        env.fields["messageId"].clone()
    }

    fn get(path: &str) -> CarriedRequest {
        CarriedRequest {
            method: "GET".into(),
            path: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            content_type: None,
            body: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn answers_are_matched_to_waiting_requests_by_id() {
        let (tx, mut rx) = mpsc::channel(8);
        let conn = Arc::new(Conn::new(tx, 1 << 20));
        let first = tokio::spawn(conn.clone().carry(get("/a"), Duration::from_secs(20)));
        let first_id = sent_id(&mut rx).await;
        let second = tokio::spawn(conn.clone().carry(get("/b"), Duration::from_secs(20)));
        let second_id = sent_id(&mut rx).await;
        assert_eq!((first_id.clone(), second_id.clone()), (json!(1), json!(2)));
        // Not answers, or answers to nobody waiting: ignored.
        conn.answer(
            &Envelope::parse(
                br#"{"message": {"messageType": "EVENT:x", "requiresResponse": false}}"#,
            )
            .unwrap(),
        );
        conn.answer(&response_to(&json!(99), 500));
        // An id sent as a number may come back as a string.
        conn.answer(&response_to(&json!("2"), 202));
        let resp = second.await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(resp.headers()["x-from"], "device");
        assert_eq!(resp.headers()["content-type"], "text/plain");
        // The relay refusing a request answers it with 502.
        let refusal = envelope::malformed(&json!("e"), Some(&MessageId("1".into())), "too big");
        conn.answer(&Envelope::parse(refusal.as_bytes()).unwrap());
        let resp = first.await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("too big"));
        assert!(conn.pending().is_empty());
    }

    #[tokio::test]
    async fn no_answer_is_504_and_a_lost_connection_502() {
        let (tx, mut rx) = mpsc::channel(8);
        let conn = Arc::new(Conn::new(tx, 1 << 20));
        let resp = conn
            .clone()
            .carry(get("/slow"), Duration::from_millis(50))
            .await;
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(
            conn.pending().is_empty(),
            "a request that timed out is forgotten"
        );
        let _ = sent_id(&mut rx).await;
        let waiting = tokio::spawn(conn.clone().carry(get("/lost"), Duration::from_secs(20)));
        let _ = sent_id(&mut rx).await;
        conn.fail_pending();
        assert_eq!(waiting.await.unwrap().status(), StatusCode::BAD_GATEWAY);
        // A request too large for a message is refused before it is sent.
        let (tx, _rx) = mpsc::channel(8);
        let small = Arc::new(Conn::new(tx, 1024));
        let mut big = get("/big");
        big.content_type = Some("text/plain".into());
        big.body = Bytes::from(vec![b'a'; 2000]);
        let resp = small.clone().carry(big, Duration::from_secs(1)).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn without_a_connection_the_local_server_answers_503() {
        let link = Link::default();
        let resp = handle_http(request("/x", &[], b""), &link, Duration::from_secs(1), 1024).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// A local service answering with what it was asked, or slowly.
    async fn local_service() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let said = json!({
                            "method": parts.method.as_str(),
                            "uri": parts.uri.to_string(),
                            "host": parts.headers["host"].to_str().unwrap(),
                            "type": parts.headers.get("content-type").map(|v| v.to_str().unwrap()),
                            "body": String::from_utf8_lossy(&body),
                        });
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .header("x-local", "yes")
                                .body(Full::new(Bytes::from(said.to_string())))
                                .unwrap(),
                        )
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn forward_asks_the_local_service() {
        let addr = local_service().await;
        let http = HttpClient::builder(TokioExecutor::new()).build_http();
        let base = ForwardBase::parse(&format!("http://{addr}")).unwrap();
        let mut req = get("/echo");
        req.method = "POST".into();
        req.query = pairs(&[("a", "1 2")]);
        req.content_type = Some("text/plain".into());
        req.body = Bytes::from_static(b"hi");
        let answer = forward(&http, &base, req, Duration::from_secs(20), 1 << 20).await;
        assert_eq!(answer.status, 200);
        assert!(answer.headers.contains(&("x-local".into(), "yes".into())));
        assert!(
            answer
                .headers
                .iter()
                .all(|(n, _)| n != "content-type" && n != "content-length")
        );
        let said: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(said["uri"], "/echo?a=1+2");
        assert_eq!(said["host"], addr.to_string());
        assert_eq!(said["type"], "text/plain");
        assert_eq!(said["body"], "hi");
        let slow = forward(
            &http,
            &base,
            get("/slow"),
            Duration::from_millis(100),
            1 << 20,
        )
        .await;
        assert_eq!(slow.status, 504);
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let gone = ForwardBase::parse(&format!("http://{closed}")).unwrap();
        let down = forward(&http, &gone, get("/x"), Duration::from_secs(20), 1 << 20).await;
        assert_eq!(down.status, 502);
        assert!(String::from_utf8_lossy(&down.body).contains("cannot be reached"));
    }
}
