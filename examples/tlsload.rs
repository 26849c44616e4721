//! A small TLS load generator for `benches/tls_load.sh`: wrk cannot present
//! client certificates, so mTLS listeners (tollgate's and nginx's) are driven
//! by this instead, the same client for both.
//!
//!   tlsload --addr 127.0.0.1:8443 --ca ca.pem --cert c.pem --key c.key \
//!           --mode handshake|keepalive --conns 32 --seconds 10
//!
//! `handshake`: every request on a new connection with a full handshake (no
//! resumption). `keepalive`: one connection per worker, requests back to back.
//! Prints `requests/s`, `p50_us`, `p99_us` and `errors`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::transport::tls::{ca_roots, certificates, private_key};

struct Args {
    addr: SocketAddr,
    ca: String,
    cert: Option<String>,
    key: Option<String>,
    keepalive: bool,
    conns: usize,
    seconds: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        addr: "127.0.0.1:8443".parse().map_err(|e| format!("{e}"))?,
        ca: String::new(),
        cert: None,
        key: None,
        keepalive: false,
        conns: 32,
        seconds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = value()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "--ca" => a.ca = value()?,
            "--cert" => a.cert = Some(value()?),
            "--key" => a.key = Some(value()?),
            "--mode" => a.keepalive = value()? == "keepalive",
            "--conns" => a.conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "--seconds" => a.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.ca.is_empty() {
        return Err("--ca is required".into());
    }
    Ok(a)
}

fn client_config(a: &Args) -> Result<rustls::ClientConfig, String> {
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{p}: {e}"));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(ca_roots(&read(&a.ca)?)?);
    let mut cfg = match (&a.cert, &a.key) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(certificates(&read(c)?)?, private_key(&read(k)?)?)
            .map_err(|e| e.to_string())?,
        _ => builder.with_no_client_auth(),
    };
    // Every new connection is a full handshake.
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n";

/// Reads one small response: headers plus a Content-Length body.
async fn read_response<S: AsyncReadExt + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(|e| e.to_string())?;
            if !head.starts_with("HTTP/1.1 200") {
                return Err(head.lines().next().unwrap_or("").to_owned());
            }
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(());
            }
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed mid-response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn worker(
    a: Arc<Args>,
    connector: tokio_rustls::TlsConnector,
    until: Instant,
) -> (Vec<u32>, u64) {
    let name = ServerName::try_from("localhost").expect("valid name");
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut buf = Vec::with_capacity(8192);
    let mut conn = None;
    while Instant::now() < until {
        let start = Instant::now();
        let result = async {
            if conn.is_none() || !a.keepalive {
                let tcp = TcpStream::connect(a.addr)
                    .await
                    .map_err(|e| e.to_string())?;
                tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                conn = Some(
                    connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let s = conn.as_mut().expect("connected");
            s.write_all(if a.keepalive { REQUEST } else { REQUEST_CLOSE })
                .await
                .map_err(|e| e.to_string())?;
            read_response(s, &mut buf).await
        }
        .await;
        match result {
            Ok(()) => latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Err(e) => {
                if errors == 0 {
                    eprintln!("tlsload: {e}");
                }
                errors += 1;
                conn = None;
            }
        }
        if !a.keepalive {
            conn = None;
        }
    }
    (latencies, errors)
}

#[allow(clippy::print_stdout)]
fn main() {
    let a = match args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("tlsload: {e}");
            std::process::exit(2);
        }
    };
    let cfg = match client_config(&a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tlsload: {e}");
            std::process::exit(2);
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut all, errors, elapsed) = rt.block_on(async {
        let start = Instant::now();
        let until = start + Duration::from_secs(a.seconds);
        let tasks: Vec<_> = (0..a.conns)
            .map(|_| tokio::spawn(worker(a.clone(), connector.clone(), until)))
            .collect();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.expect("worker");
            all.extend(l);
            errors += e;
        }
        (all, errors, start.elapsed())
    });
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "requests/s: {:.0}",
        all.len() as f64 / elapsed.as_secs_f64()
    );
    println!("p50_us: {}", pct(0.50));
    println!("p99_us: {}", pct(0.99));
    println!("errors: {errors}");
}
