//! WebSocket tunnel relay load against any relay (tollgate's `tunnels:` or
//! a Micronets-style Python relay), for `benches/tunnel_load.sh`, which runs
//! it against both in one go. The client side: TLS with a client
//! certificate (tokio-rustls, aws-lc-rs) and tokio-tungstenite, one thread.
//! None of tollgate's code.
//!
//!   TARGET=127.0.0.1:18543 SCENARIO=relay CA=ca.pem CERT=a.pem KEY=a.key CERT2=b.pem KEY2=b.key cargo bench --bench tunnel_load
//!
//! Peers connect to `wss://HOST:port<PREFIX><id>` (HOST `localhost`, the
//! name the server certificate is checked against; PREFIX
//! `/micronets/v1/ws-proxy/`). The first peer on an id presents CERT/KEY,
//! the second CERT2/KEY2 (a relay may take a second connection with the
//! same certificate for a reconnect of the first). Before a scenario
//! starts, each pair proves it has met: the second peer sends short probes
//! until the first sees one. Data messages are SIZE (1024) bytes of
//! binary: the send time (nanoseconds since the tool started), a sequence
//! number, filler. Scenarios (each prints one line of `key=value`):
//! - `relay`: PAIRS (10) pairs on ids `bench-<i>`; the first peer of each
//!   sends as fast as it can with at most WINDOW (64) messages on the way,
//!   the second counts them: messages/s relayed (all pairs), p50/p99 from
//!   send to arrival, messages missing (`drops`, gaps in the sequence).
//! - `pingpong`: one pair; the first peer sends a message, the second
//!   echoes it back through the relay, then the next: round trips/s and
//!   p50/p99 of the round trip.
//! - `idle`: IDS (500) ids with two met peers each, held (answering pings)
//!   until stdin closes; the script reads the relay's RSS meanwhile.
//! - `http`: CONNS (16) HTTP/1.1 keep-alive connections to TARGET (plain
//!   HTTP, a gateway route), each sending `GET HTTP_PATH` (`/svc/bench`)
//!   as soon as the last answer is in: requests/s, p50/p99, non-200
//!   answers (`errors`).
//! - `upstream`: an HTTP/1.1 server at TARGET answering every request with
//!   200 `ok`, until killed (the service behind the tunnel peer in `http`).
//!
//! Every line has `closed` (connections that ended under the load) and
//! `tool_cpu` (this process's CPU in the measured window, % of a core).
//! TARGET must be a loopback address.

#![allow(clippy::print_stdout)] // the tool's output

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws = WebSocketStream<TlsStream<TcpStream>>;
type Tx = SplitSink<Ws, Message>;
type Rx = SplitStream<Ws>;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn fail(what: impl Into<String>) -> io::Error {
    io::Error::other(what.into())
}

fn ws_err(e: WsError) -> io::Error {
    fail(format!("websocket: {e}"))
}

/// What the second peer sends until the first has seen it: shorter than
/// any data message, so readers skip the ones still on the way.
const PROBE: &[u8] = b"p";
/// Send time and sequence number.
const STAMP: usize = 16;

/// The client side of one relay: where, as whom, how.
struct Relay {
    addr: SocketAddr,
    host: String,
    prefix: String,
    /// The first peer of an id, and the second.
    tls: [TlsConnector; 2],
    ws: WebSocketConfig,
}

fn connector(ca: &str, cert: &str, key: &str) -> io::Result<TlsConnector> {
    let pem = |e: rustls_pki_types::pem::Error| fail(format!("PEM: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(pem)? {
        roots
            .add(c.map_err(pem)?)
            .map_err(|e| fail(format!("{ca}: {e}")))?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| fail(format!("{cert}: {e}")))?;
    Ok(TlsConnector::from(Arc::new(cfg)))
}

impl Relay {
    fn from_env(addr: SocketAddr) -> io::Result<Relay> {
        let need =
            |name: &str| std::env::var(name).map_err(|_| fail(format!("set {name} (a PEM file)")));
        let ca = need("CA")?;
        Ok(Relay {
            addr,
            host: env_str("HOST", "localhost"),
            prefix: env_str("PREFIX", "/micronets/v1/ws-proxy/"),
            tls: [
                connector(&ca, &need("CERT")?, &need("KEY")?)?,
                connector(&ca, &need("CERT2")?, &need("KEY2")?)?,
            ],
            ws: WebSocketConfig::default()
                .read_buffer_size(env("READ_BUFFER", 32 * 1024))
                .write_buffer_size(env("WRITE_BUFFER", 32 * 1024)),
        })
    }

    /// Peer `which` (0 or 1) on `id`; also the TLS cipher suite.
    async fn open(&self, id: &str, which: usize, ws: WebSocketConfig) -> io::Result<(Ws, String)> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone()).map_err(|e| fail(e.to_string()))?;
        let tls = self.tls[which].connect(name, tcp).await?;
        let suite = tls
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map_or_else(|| "-".into(), |s| format!("{:?}", s.suite()));
        let url = format!(
            "wss://{}:{}{}{id}",
            self.host,
            self.addr.port(),
            self.prefix
        );
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, tls, Some(ws))
            .await
            .map_err(|e| fail(format!("joining {id}: {e}")))?;
        Ok((ws, suite))
    }

    /// Two peers on `id` that have met: (first's halves, second's halves,
    /// cipher suite).
    async fn pair(&self, id: &str, ws: WebSocketConfig) -> io::Result<(Tx, Rx, Tx, Rx, String)> {
        let (a, suite) = self.open(id, 0, ws).await?;
        let (b, _) = self.open(id, 1, ws).await?;
        let (a_tx, mut a_rx) = a.split();
        let (mut b_tx, b_rx) = b.split();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = tick.tick() => b_tx.send(Message::binary(PROBE)).await.map_err(ws_err)?,
                m = a_rx.next() => match m {
                    Some(Ok(m)) if is_probe(&m) => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(ws_err(e)),
                    None => return Err(fail(format!("{id}: the relay closed the first peer"))),
                },
                _ = &mut deadline => {
                    return Err(fail(format!("{id}: the peers did not meet within 10 s")));
                }
            }
        }
        Ok((a_tx, a_rx, b_tx, b_rx, suite))
    }
}

fn is_probe(m: &Message) -> bool {
    matches!(m, Message::Binary(b) if b.as_ref() == PROBE)
}

/// A data message: send time, sequence number, filler to `size`.
fn data(ts: u64, seq: u64, size: usize) -> Message {
    let mut b = BytesMut::with_capacity(size.max(STAMP));
    b.put_u64(ts);
    b.put_u64(seq);
    b.resize(size.max(STAMP), b'x');
    Message::Binary(b.freeze())
}

/// A data message's (send time, sequence number); None for anything else.
fn stamps(m: &Message) -> Option<(u64, u64)> {
    match m {
        Message::Binary(b) if b.len() >= STAMP => {
            let mut s = &b[..STAMP];
            Some((s.get_u64(), s.get_u64()))
        }
        _ => None,
    }
}

/// What the tasks share (one thread).
struct Shared {
    origin: Instant,
    /// Samples are taken (the measured window).
    recording: Cell<bool>,
    /// Messages relayed, round trips, requests answered.
    done: Cell<u64>,
    drops: Cell<u64>,
    errors: Cell<u64>,
    closed: Cell<u64>,
    /// Nanoseconds.
    samples: RefCell<Vec<u64>>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn ended(&self, who: &str, e: &io::Error) {
        self.closed.set(self.closed.get() + 1);
        if self.closed.get() == 1 {
            eprintln!("tunnel_load: a {who} ended: {e}");
        }
    }

    fn error(&self, what: impl FnOnce() -> String) {
        if self.errors.get() == 0 {
            eprintln!("tunnel_load: {}", what());
        }
        self.errors.set(self.errors.get() + 1);
    }

    fn sample(&self, ns: u64) {
        self.done.set(self.done.get() + 1);
        if self.recording.get() {
            self.samples.borrow_mut().push(ns);
        }
    }

    fn spawn(
        self: &Rc<Self>,
        who: &'static str,
        f: impl Future<Output = io::Result<()>> + 'static,
    ) {
        let sh = self.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = f.await {
                sh.ended(who, &e);
            }
        });
    }
}

/// One pair in the `relay` scenario.
struct Pair {
    sent: Cell<u64>,
    /// The last sequence number that arrived.
    received: Cell<u64>,
    progress: Notify,
}

async fn sender(
    mut tx: Tx,
    pair: Rc<Pair>,
    window: u64,
    size: usize,
    sh: Rc<Shared>,
) -> io::Result<()> {
    loop {
        let allowed = (pair.received.get() + window).saturating_sub(pair.sent.get());
        if allowed > 0 {
            let ts = sh.now();
            for _ in 0..allowed {
                let seq = pair.sent.get() + 1;
                pair.sent.set(seq);
                tx.feed(data(ts, seq, size)).await.map_err(ws_err)?;
            }
            tx.flush().await.map_err(ws_err)?;
        }
        pair.progress.notified().await;
    }
}

async fn receiver(mut rx: Rx, pair: Rc<Pair>, sh: Rc<Shared>) -> io::Result<()> {
    while let Some(m) = rx.next().await {
        let m = m.map_err(ws_err)?;
        let Some((ts, seq)) = stamps(&m) else {
            if !is_probe(&m) && !matches!(m, Message::Ping(_) | Message::Pong(_)) {
                sh.error(|| format!("the receiver got {m:?}"));
            }
            continue;
        };
        let last = pair.received.get();
        if seq > last + 1 {
            sh.drops.set(sh.drops.get() + seq - last - 1);
        } else if seq <= last {
            sh.error(|| format!("message {seq} after {last}"));
            continue;
        }
        pair.received.set(seq);
        sh.sample(sh.now().saturating_sub(ts));
        pair.progress.notify_one();
    }
    Err(fail("the relay closed the receiving peer"))
}

/// Drains what a peer is sent (so pings are answered) until the connection
/// ends: Ok when it ends cleanly (after a close handshake, with TLS's
/// close_notify).
async fn drain(mut rx: Rx) -> Result<(), WsError> {
    while let Some(m) = rx.next().await {
        m?;
    }
    Ok(())
}

/// How the idle peers' connections ended.
#[derive(Default)]
struct Ends {
    /// We are closing them (ends before that are failures).
    closing: Cell<bool>,
    clean: Cell<u64>,
    /// The TCP connection closed without TLS's close_notify: a truncation
    /// a TLS client may not tell from an attack.
    truncated: Cell<u64>,
    error: Cell<u64>,
    first_error: RefCell<Option<String>>,
}

impl Ends {
    fn count(&self, end: Result<(), WsError>) {
        let c = match &end {
            Ok(()) => &self.clean,
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => &self.truncated,
            Err(e) => {
                self.first_error
                    .borrow_mut()
                    .get_or_insert_with(|| e.to_string());
                &self.error
            }
        };
        c.set(c.get() + 1);
    }

    fn total(&self) -> u64 {
        self.clean.get() + self.truncated.get() + self.error.get()
    }
}

async fn http_client(addr: SocketAddr, path: String, sh: Rc<Shared>) -> io::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        let t0 = sh.now();
        tcp.write_all(request.as_bytes()).await?;
        let status = loop {
            if let Some((status, len)) = response(&buf)? {
                buf.advance(len);
                break status;
            }
            if tcp.read_buf(&mut buf).await? == 0 {
                return Err(fail("the gateway closed the connection"));
            }
        };
        if status == 200 {
            sh.sample(sh.now().saturating_sub(t0));
        } else {
            sh.error(|| format!("GET {path} answered {status}"));
        }
    }
}

/// A whole response at the start of `b`: (status, its length).
fn response(b: &[u8]) -> io::Result<Option<(u16, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(fail(format!("response: {e}"))),
    };
    let status = r.code.unwrap_or(0);
    let field = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if field("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        // Chunks to the last (no trailers expected).
        let mut at = head;
        loop {
            let Some(eol) = b[at..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            let size = std::str::from_utf8(&b[at..at + eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| fail("bad chunk size"))?;
            at += eol + 2 + size + 2;
            if b.len() < at {
                return Ok(None);
            }
            if size == 0 {
                return Ok(Some((status, at)));
            }
        }
    }
    let len = match field("content-length") {
        Some(v) => v.parse().map_err(|_| fail("bad content-length"))?,
        None => 0,
    };
    Ok((b.len() >= head + len).then_some((status, head + len)))
}

/// The `upstream` scenario's connections: `ok` to every request.
async fn serve(mut tcp: TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::new();
    loop {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Request::new(&mut headers);
            let (head, len) = match r.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let len = r
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                        .unwrap_or(0usize);
                    (n, len)
                }
                Ok(httparse::Status::Partial) => break,
                Err(e) => return Err(fail(format!("request: {e}"))),
            };
            if buf.len() < head + len {
                break;
            }
            buf.advance(head + len);
            out.extend_from_slice(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n",
            );
        }
        if !out.is_empty() {
            tcp.write_all(&out).await?;
            out.clear();
        }
        if tcp.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// This process's CPU time so far, in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |s| s.1);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime and stime: fields 14 and 15, the 12th and 13th after the name.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Warm-up for a second, then `secs` of samples: (per second, samples
/// sorted, this tool's CPU in %).
async fn measure(secs: u64, sh: &Shared) -> (f64, Vec<u64>, f64) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    sh.samples.borrow_mut().clear();
    let start = sh.done.get();
    let cpu = cpu_ticks();
    sh.recording.set(true);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    sh.recording.set(false);
    let elapsed = t.elapsed().as_secs_f64();
    let rate = (sh.done.get() - start) as f64 / elapsed;
    let cpu = (cpu_ticks() - cpu) as f64 / elapsed;
    let mut s = std::mem::take(&mut *sh.samples.borrow_mut());
    s.sort_unstable();
    (rate, s, cpu)
}

/// The `p` quantile in microseconds.
fn pct(s: &[u64], p: f64) -> f64 {
    s.get(((s.len() as f64 * p) as usize).min(s.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0) as f64
        / 1000.0
}

async fn run(addr: SocketAddr, scenario: &str) -> io::Result<String> {
    let secs = env("SECS", 5u64);
    let size = env("SIZE", 1024usize).max(STAMP);
    let sh = Rc::new(Shared {
        origin: Instant::now(),
        recording: Cell::new(false),
        done: Cell::new(0),
        drops: Cell::new(0),
        errors: Cell::new(0),
        closed: Cell::new(0),
        samples: RefCell::new(Vec::new()),
    });
    let tail = |sh: &Shared, s: &[u64], cpu: f64| {
        format!(
            "p50_us={:.0} p99_us={:.0} drops={} errors={} closed={} tool_cpu={cpu:.0}",
            pct(s, 0.5),
            pct(s, 0.99),
            sh.drops.get(),
            sh.errors.get(),
            sh.closed.get()
        )
    };
    let out = match scenario {
        "relay" => {
            let relay = Relay::from_env(addr)?;
            let pairs = env("PAIRS", 10usize);
            let window = env("WINDOW", 64u64);
            let mut suite = String::new();
            for i in 0..pairs {
                let (a_tx, a_rx, b_tx, b_rx, s) =
                    relay.pair(&format!("bench-{i}"), relay.ws).await?;
                suite = s;
                // The first peer is sent only the probes still on the way
                // (and pings): drained. The second only reads.
                sh.spawn("sending peer", async move {
                    drain(a_rx).await.map_err(ws_err)?;
                    Err(fail("the relay closed the sending peer"))
                });
                drop(b_tx);
                let pair = Rc::new(Pair {
                    sent: Cell::new(0),
                    received: Cell::new(0),
                    progress: Notify::new(),
                });
                sh.spawn("receiving peer", receiver(b_rx, pair.clone(), sh.clone()));
                sh.spawn("sending peer", sender(a_tx, pair, window, size, sh.clone()));
            }
            let (rate, s, cpu) = measure(secs, &sh).await;
            format!(
                "scenario=relay pairs={pairs} window={window} size={size} tls={suite} msgs_per_s={rate:.0} {}",
                tail(&sh, &s, cpu)
            )
        }
        "pingpong" => {
            let relay = Relay::from_env(addr)?;
            let (mut a_tx, mut a_rx, mut b_tx, mut b_rx, suite) =
                relay.pair("bench-pingpong", relay.ws).await?;
            sh.spawn("echoing peer", async move {
                while let Some(m) = b_rx.next().await {
                    let m = m.map_err(ws_err)?;
                    if stamps(&m).is_some() {
                        b_tx.send(m).await.map_err(ws_err)?;
                    }
                }
                Err(fail("the relay closed the echoing peer"))
            });
            let shc = sh.clone();
            sh.spawn("pinging peer", async move {
                let sh = shc;
                let mut seq = 0u64;
                loop {
                    seq += 1;
                    a_tx.send(data(sh.now(), seq, size)).await.map_err(ws_err)?;
                    loop {
                        let m = a_rx
                            .next()
                            .await
                            .ok_or_else(|| fail("the relay closed the pinging peer"))?
                            .map_err(ws_err)?;
                        if let Some((ts, n)) = stamps(&m) {
                            if n != seq {
                                sh.error(|| format!("echo {n} for {seq}"));
                            }
                            sh.sample(sh.now().saturating_sub(ts));
                            break;
                        }
                    }
                }
            });
            let (rate, s, cpu) = measure(secs, &sh).await;
            format!(
                "scenario=pingpong size={size} tls={suite} rtt_per_s={rate:.0} {}",
                tail(&sh, &s, cpu)
            )
        }
        "idle" => {
            let relay = Relay::from_env(addr)?;
            let ids = env("IDS", 500usize);
            // Idle peers need no large buffers (the tool's memory, not the
            // relay's, but 1,000 peers add up).
            let small = relay.ws.read_buffer_size(4096).write_buffer_size(0);
            let ends = Rc::new(Ends::default());
            let (mut first, mut second) = (Vec::with_capacity(ids), Vec::with_capacity(ids));
            for i in 0..ids {
                let (a_tx, a_rx, b_tx, b_rx, _) = relay.pair(&format!("idle-{i}"), small).await?;
                for rx in [a_rx, b_rx] {
                    let (sh, ends) = (sh.clone(), ends.clone());
                    tokio::task::spawn_local(async move {
                        let end = drain(rx).await;
                        if !ends.closing.get() {
                            sh.ended("idle peer", &io::Error::other(format!("{end:?}")));
                        }
                        ends.count(end);
                    });
                }
                first.push(a_tx);
                second.push(b_tx);
            }
            let n = 2 * ids;
            println!("ready peers={n}");
            // Held until the script closes stdin.
            let mut line = String::new();
            let _ =
                tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
            // Then the first peer of each id closes (a WebSocket close
            // from the client; a relay may close the second with it),
            // then the second, and every connection's end is looked at.
            let closed = sh.closed.get();
            ends.closing.set(true);
            for tx in [first, second] {
                for mut tx in tx {
                    let _ = tx.close().await;
                }
                let t = Instant::now();
                while ends.total() < n as u64 && t.elapsed() < Duration::from_secs(2) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if let Some(e) = ends.first_error.borrow().as_ref() {
                eprintln!("tunnel_load: a peer's connection ended with: {e}");
            }
            format!(
                "scenario=idle peers={n} closed={closed} clean_ends={} truncated_ends={} error_ends={} open={}",
                ends.clean.get(),
                ends.truncated.get(),
                ends.error.get(),
                n as u64 - ends.total()
            )
        }
        "http" => {
            let conns = env("CONNS", 16usize);
            let path = env_str("HTTP_PATH", "/svc/bench");
            for _ in 0..conns {
                sh.spawn(
                    "HTTP connection",
                    http_client(addr, path.clone(), sh.clone()),
                );
            }
            let (rate, s, cpu) = measure(secs, &sh).await;
            format!(
                "scenario=http conns={conns} requests_per_s={rate:.0} {}",
                tail(&sh, &s, cpu)
            )
        }
        "upstream" => {
            let listener = TcpListener::bind(addr).await?;
            println!("ready upstream={addr}");
            loop {
                let (tcp, _) = listener.accept().await?;
                tokio::task::spawn_local(serve(tcp));
            }
        }
        other => return Err(fail(format!("unknown SCENARIO {other}"))),
    };
    Ok(out)
}

fn main() {
    let Ok(target) = std::env::var("TARGET") else {
        eprintln!(
            "tunnel_load: set TARGET=127.0.0.1:port and SCENARIO (see benches/tunnel_load.sh)"
        );
        return;
    };
    let addr: SocketAddr = target.parse().expect("TARGET is ip:port");
    if !addr.ip().is_loopback() {
        eprintln!("tunnel_load: TARGET must be a loopback address (127.0.0.0/8 or ::1)");
        std::process::exit(2);
    }
    let scenario = std::env::var("SCENARIO").unwrap_or_else(|_| "relay".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    match local.block_on(&rt, run(addr, &scenario)) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("tunnel_load {scenario}: {e}");
            std::process::exit(1);
        }
    }
}
