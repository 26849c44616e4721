//! A local service that takes connections over: the HTTP front-end hands a
//! WebSocket upgrade on the service's endpoint to it (as MQTT and WAMP over
//! WebSocket and the tunnel relay are served), answers its other requests
//! as usual, and keeps routing everything else.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tollgate::identity::CertIdentity;
use tollgate::metrics::{Metrics, RouteMetrics};
use tollgate::transport::{
    self, ConnState, ListenerInfo, LocalBody, LocalFuture, LocalService, LocalServices, Shutdown,
    Switch, websocket,
};

/// `/echo`: a WebSocket (subprotocol `echo.v1`) that sends every message
/// back, or a plain GET answered with text.
struct Echo {
    metrics: RouteMetrics,
}

impl LocalService for Echo {
    fn name(&self) -> &str {
        "echo"
    }
    fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }
    fn endpoint(&self, _listener: &str, path: &str) -> Option<u16> {
        (path == "/echo").then_some(0)
    }
    fn serve<'a>(
        self: Arc<Self>,
        _endpoint: u16,
        _request: Request<LocalBody>,
        _peer: IpAddr,
        _cert: Option<&'a CertIdentity>,
    ) -> LocalFuture<'a> {
        Box::pin(async { Response::new(Bytes::from_static(b"upgrade me\n")) })
    }
    fn upgrades(&self, _endpoint: u16) -> bool {
        true
    }
    fn upgrade(
        self: Arc<Self>,
        _endpoint: u16,
        request: Request<()>,
        _conn: Arc<ConnState>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Switch> + Send>> {
        Box::pin(async move {
            let accepted = match websocket::accept(&request, &["echo.v1"]) {
                Ok(a) => a,
                Err(refused) => return Switch::refuse(*refused),
            };
            Switch {
                response: accepted.response,
                takeover: Some(Box::new(|io, _conn| {
                    Box::pin(async move {
                        let mut ws = websocket::server(io, 1024).await;
                        while let Some(Ok(msg)) = ws.next().await {
                            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                                return;
                            }
                        }
                    })
                })),
            }
        })
    }
}

struct Services(Arc<Echo>);

impl LocalServices for Services {
    fn find(&self, listener: &str, path: &str) -> Option<(Arc<dyn LocalService>, u16)> {
        let ep = self.0.endpoint(listener, path)?;
        Some((self.0.clone(), ep))
    }
}

async fn serve_echo() -> (std::net::SocketAddr, Shutdown) {
    let cfg = tollgate::config::Config::default();
    let metrics = Arc::new(Metrics::new());
    let providers = tollgate::identity::Providers::build(&cfg, None, &metrics, None).unwrap();
    let clients = tollgate::http::upstream::UpstreamClients::new(&cfg.proxy);
    let table = tollgate::http::router::RouteTable::build(
        &cfg,
        &clients,
        &metrics,
        &providers,
        &transport::tls::UpstreamTlsConfigs::default(),
        None,
    )
    .await;
    let echo = Arc::new(Echo {
        metrics: metrics.route("echo", &["web".to_owned()]),
    });
    let pipeline = tollgate::http::PipelineConfig {
        table: Arc::new(ArcSwap::from_pointee(table)),
        local: Arc::new(Services(echo)),
        tunnels: None,
        metrics: metrics.clone(),
        access_log: Arc::new(AtomicBool::new(false)),
        unmatched: metrics.route("none", &["web".to_owned()]),
    }
    .build(clients);
    let limits = tollgate::config::Limits::default();
    let front_end = Arc::new(tollgate::http::HttpFrontEnd::new(pipeline, &limits));
    let info = Arc::new(ListenerInfo::new("web", 0, limits, None));
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let shutdown = Shutdown::default();
    tokio::spawn(transport::serve(
        socket,
        info,
        front_end,
        shutdown.clone(),
        metrics,
    ));
    (addr, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_handed_to_the_local_service() {
    let (addr, shutdown) = serve_echo().await;
    let url = format!("ws://{addr}/echo");

    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "other, echo.v1".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "echo.v1");
    for text in ["one", "two"] {
        ws.send(Message::text(text)).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    // A message over the service's limit ends the connection; it is not
    // buffered or echoed.
    ws.send(Message::binary(vec![0u8; 4096])).await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(!matches!(after, Some(Ok(Message::Binary(_)))), "{after:?}");

    // No subprotocol the service speaks: refused with the reason, as HTTP.
    let plain = url.as_str().into_client_request().unwrap();
    match tokio_tungstenite::connect_async(plain).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 400);
            let body = String::from_utf8(r.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("echo.v1"), "{body}");
        }
        other => panic!("{other:?}"),
    }

    // The frame right behind the handshake, in the same packet, reaches the
    // service: bytes read ahead belong to the new protocol.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut raw = b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
sec-websocket-protocol: echo.v1\r\n\r\n"
        .to_vec();
    // A masked text frame "hi" (RFC 6455 §5.7's mask).
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    raw.extend_from_slice(&[0x81, 0x82]);
    raw.extend_from_slice(&mask);
    raw.extend(b"hi".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    tcp.write_all(&raw).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let echoed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(&[0x81, 0x02, b'h', b'i']) {
                return;
            }
        }
    })
    .await;
    assert!(echoed.is_ok(), "{}", String::from_utf8_lossy(&got));
    assert!(got.starts_with(b"HTTP/1.1 101 "));

    // Its other requests are served as usual; other paths are routed.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\nGET /other HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = String::new();
    tcp.read_to_string(&mut all).await.unwrap();
    assert!(all.starts_with("HTTP/1.1 200 "), "{all}");
    assert!(all.contains("upgrade me"), "{all}");
    assert!(all.contains("HTTP/1.1 404 "), "{all}");
    shutdown.graceful.cancel();
}
