//! Shared test helpers: a gateway on free ports from a YAML string, small
//! real upstream servers, HTTP/1.1 and h2c clients, and condition polling.

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tollgate::Gateway;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A gateway started from YAML in a temp dir (so reload tests can rewrite it).
pub struct TestGateway {
    pub gw: Gateway,
    pub path: PathBuf,
    _dir: TempDir,
}

impl TestGateway {
    pub async fn start(yaml: &str) -> TestGateway {
        init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let cfg =
            tollgate::config::load(&path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let gw = Gateway::start(cfg, Some(path.clone()))
            .await
            .expect("gateway starts");
        TestGateway {
            gw,
            path,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gw.listener_addr("sidecar").expect("sidecar listener")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn write_config(&self, yaml: &str) {
        // Write-then-rename, as editors and config management tools do.
        let tmp = self.path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &self.path).expect("replace config");
    }

    pub async fn metrics(&self) -> String {
        let r = get(&format!("http://{}/metrics", self.gw.admin_addr())).await;
        String::from_utf8(r.body.to_vec()).expect("utf-8 metrics")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.gw.shutdown();
    }
}

/// Test logs on demand: `TEST_LOG=debug cargo test ...`.
fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// The YAML of a gateway with one sidecar listener on a free port and the given routes.
pub fn config_with_routes(routes: &str) -> String {
    format!(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nproxy:\n  access_log: false\nroutes:\n{routes}"
    )
}

/// Like [`config_with_routes`], with `limits` (YAML flow mapping body) on the listener.
pub fn limited_config(limits: &str, routes: &str) -> String {
    config_with_routes(routes).replace(
        "bind: 127.0.0.1:0\nadmin",
        &format!("bind: 127.0.0.1:0\n    limits: {{ {limits} }}\nadmin"),
    )
}

/// A route to the given upstreams, YAML at list-item indentation.
pub fn route(name: &str, prefix: &str, targets: &[&Upstream], extra: &str) -> String {
    let targets: Vec<String> = targets
        .iter()
        .map(|u| format!("http://{}", u.addr))
        .collect();
    format!(
        "  - name: {name}\n    match:\n      path_prefix: {prefix}\n    upstream:\n      targets: [{}]\n{extra}",
        targets.join(", ")
    )
}

/// A real HTTP server (HTTP/1.1 and h2c) run by a closure.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted, and those still open.
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Self::serve(listener, handler)
    }

    pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let mut tasks = JoinSet::new();
        let counter = hits.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (accepted_in, open_in) = (accepted.clone(), open.clone());
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted_in.fetch_add(1, Ordering::SeqCst);
                open_in.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let counter = counter.clone();
                let open = open_in.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            hits,
            accepted,
            open,
            _tasks: tasks,
        }
    }

    /// Answers every request with JSON describing it: name, method, path,
    /// version and headers (lists joined by `, `).
    pub async fn echo(name: &'static str) -> Upstream {
        Upstream::start(move |req| async move { echo_response(name, req) }).await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> (usize, usize) {
        (
            self.accepted.load(Ordering::SeqCst),
            self.open.load(Ordering::SeqCst),
        )
    }
}

pub fn echo_response<B>(name: &str, req: Request<B>) -> Response<TestBody> {
    let mut headers = serde_json::Map::new();
    for key in req.headers().keys() {
        let values: Vec<&str> = req
            .headers()
            .get_all(key)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect();
        headers.insert(key.as_str().into(), values.join(", ").into());
    }
    let body = serde_json::json!({
        "name": name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    Response::new(full(body.to_string()))
}

pub fn status_response(status: u16) -> Response<TestBody> {
    let mut r = Response::new(full(format!("status {status}")));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    r
}

/// A port with nothing listening on it.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub version: http::Version,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn send_with(
    client: &Client<HttpConnector, TestBody>,
    req: Request<TestBody>,
) -> TestResponse {
    answer(client.request(req)).await
}

/// A response within 20 s, collected whole.
async fn answer<E: std::fmt::Debug>(
    response: impl Future<Output = Result<Response<Incoming>, E>>,
) -> TestResponse {
    let resp = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("response within 20s")
        .expect("request succeeds at the HTTP level");
    collect(resp).await
}

/// One HTTP/1.1 connection to `addr`, kept alive across its requests.
pub async fn connection(addr: SocketAddr) -> SendRequest<TestBody> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

/// `req` on `conn`, which must still be open. As a client does, an
/// absolute URI goes as a path with a Host field.
pub async fn send_on(conn: &mut SendRequest<TestBody>, mut req: Request<TestBody>) -> TestResponse {
    if let Some(authority) = req.uri().authority().cloned() {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = path.parse().expect("path");
        req.headers_mut().insert(
            http::header::HOST,
            authority.as_str().parse().expect("host"),
        );
    }
    let resp = tokio::time::timeout(Duration::from_secs(20), async {
        conn.ready().await?;
        conn.send_request(req).await
    })
    .await
    .expect("response within 20s")
    .expect("request succeeds at the HTTP level");
    collect(resp).await
}

async fn collect(resp: Response<Incoming>) -> TestResponse {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body,
    }
}

pub async fn send(req: Request<TestBody>) -> TestResponse {
    send_with(&client(), req).await
}

pub async fn get(url: &str) -> TestResponse {
    send(Request::get(url).body(full("")).expect("request")).await
}

/// Polls `cond` every 20ms until it holds or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a metric line that starts with `prefix` (name and labels).
pub fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs `tollgate run -c file` with JSON logs; returns the child, the first
/// listener's address and a thread that returns every log line once the
/// child exits.
pub fn run_binary(
    file: &std::path::Path,
) -> (Child, SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    run_binary_with(file, "json")
}

/// [`run_binary`] with logs in `format` (`text` or `json`).
pub fn run_binary_with(
    file: &std::path::Path,
    format: &str,
) -> (Child, SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    let mut child = std::process::Command::new(BIN)
        .args([
            "run",
            "-c",
            file.to_str().expect("utf-8 path"),
            "--log-format",
            format,
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the tollgate binary");
    let (addr, logs) = listen_addr(&mut child);
    (child, addr, logs)
}

/// Reads JSON log lines from the child's stderr until one says "listening".
fn listen_addr(child: &mut Child) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "listening"
            {
                let _ = tx.send(v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap());
            } else if line.contains("listening") {
                // Text: `... listening name=sidecar addr=127.0.0.1:1234 ...`
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .and_then(|a| a.trim_matches('"').parse::<SocketAddr>().ok());
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
            lines.push(line);
        }
        lines
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("gateway logs its address");
    (addr, reader)
}

/// Sends `raw` on one connection and reads until the gateway closes it.
pub async fn exchange_raw(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, raw)
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out),
    )
    .await
    .expect("the gateway closes the connection")
    .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw response's status and body (the text after its head).
pub fn status_and_body(response: &str) -> (u16, &str) {
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body)
}

/// One HTTP/2 (h2c) connection to `addr`: requests go with the fields they
/// are given, `:authority` from their URI.
pub async fn h2_connection(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

pub async fn h2_send(
    conn: &mut hyper::client::conn::http2::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> TestResponse {
    answer(conn.send_request(req)).await
}

/// Opens a WebSocket to `url` through the gateway and checks that `count`
/// text messages come back as sent (the target echoes).
pub async fn websocket_echoes(
    url: &str,
    count: usize,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for i in 0..count {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an echo within 5s")
            .unwrap()
            .unwrap();
        assert_eq!(reply, Message::text(format!("hello {i}")));
    }
    ws
}
