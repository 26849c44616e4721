use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_hygiene_and_forwarding_headers() {
    let up = Upstream::start(|req| async move {
        let mut r = echo_response("up", req);
        // Hop-by-hop headers from the upstream must not reach the client either.
        r.headers_mut()
            .insert("connection", "x-upstream-private".parse().unwrap());
        r.headers_mut()
            .insert("x-upstream-private", "1".parse().unwrap());
        r.headers_mut()
            .insert("keep-alive", "timeout=5".parse().unwrap());
        r
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let req = Request::get(gw.url("/h"))
        .header("host", "api.example:8082")
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "gzip")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-end-to-end", "kept")
        .header("x-request-id", "client-chosen-id")
        .body(full(""))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    let h = &seen["headers"];
    for gone in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(h.get(gone).is_none(), "{gone} must not be forwarded: {h}");
    }
    assert_eq!(h["x-end-to-end"], "kept");
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "an untrusted peer's chain is replaced"
    );
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example:8082");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=\"api.example:8082\""
    );
    assert_eq!(h["via"], "1.1 tollgate");
    assert_eq!(
        h["host"],
        up.addr.to_string(),
        "the target's host unless preserve_host"
    );
    assert_eq!(
        h["x-request-id"], "client-chosen-id",
        "a sane client id is propagated"
    );
    assert_eq!(r.headers["x-request-id"], "client-chosen-id");
    assert!(r.headers.get("x-upstream-private").is_none());
    assert!(r.headers.get("keep-alive").is_none());
    assert_eq!(r.headers["via"], "1.1 tollgate");

    // An absurd client id is replaced by a generated one.
    let req = Request::get(gw.url("/h"))
        .header("x-request-id", "x".repeat(500))
        .body(full(""))
        .unwrap();
    let r = send(req).await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32, "generated ids are 128-bit hex");
    assert_eq!(r.json()["headers"]["x-request-id"], id.as_str());
}

/// Forwarding fields a client sends are replaced by the gateway's own; a
/// request with `te: trailers` (which travels) differs in that field only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_fields_are_the_gateways_own() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let request = |stack: bool| {
        let mut b = Request::get(gw.url("/eq?q=1"))
            .header("host", "api.example:8082")
            .header("connection", "keep-alive")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "spoofed.example")
            .header("x-forwarded-client-cert", "Hash=spoofed")
            .header("via", "1.0 other")
            .header("x-end-to-end", "kept");
        if stack {
            b = b.header("te", "trailers");
        }
        b.body(full("")).unwrap()
    };
    let direct = send(request(false)).await;
    let stacked = send(request(true)).await;
    assert_eq!(direct.status, 200);
    assert_eq!(stacked.status, 200);
    let seen = |r: &TestResponse| {
        let mut json = r.json();
        let id = json["headers"]["x-request-id"].clone();
        assert_eq!(
            r.headers["x-request-id"].to_str().unwrap(),
            id.as_str().unwrap(),
            "the generated id goes both ways"
        );
        let headers = json["headers"].as_object_mut().unwrap();
        headers.remove("x-request-id");
        headers.remove("te");
        json
    };
    let (direct, stacked) = (seen(&direct), seen(&stacked));
    assert_eq!(direct, stacked, "the target sees the same request");
    let h = &direct["headers"];
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example:8082");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        h["via"], "1.1 tollgate",
        "an untrusted peer's Via is not kept"
    );
    assert!(h.get("x-forwarded-client-cert").is_none(), "{h}");
    assert!(h.get("connection").is_none(), "{h}");
    assert_eq!(h["x-end-to-end"], "kept");
    assert_eq!(direct["path"], "/eq?q=1");
}

/// A connection keeps its forwarding fields from request to request; a
/// request to another Host on it gets that Host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_connection_forwards_its_own_host() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let mut conn = connection(gw.addr()).await;
    for host in [
        "a.example",
        "a.example",
        "b.example:8082",
        "a.example",
        "[::1]:1",
    ] {
        let req = Request::get("/h")
            .header("host", host)
            .body(full(""))
            .unwrap();
        let r = send_on(&mut conn, req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let h = &r.json()["headers"];
        assert_eq!(h["x-forwarded-host"], host);
        let element = if host.contains(':') {
            format!("host=\"{host}\"")
        } else {
            format!("host={host}")
        };
        assert_eq!(
            h["forwarded"],
            format!("for=127.0.0.1;proto=http;{element}"),
            "{h}"
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["via"], "1.1 tollgate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_host_forwards_the_client_host() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "r",
        "/",
        &[&up],
        "    preserve_host: true\n",
    )))
    .await;
    let req = Request::get(gw.url("/"))
        .header("host", "public.example")
        .body(full(""))
        .unwrap();
    assert_eq!(send(req).await.json()["headers"]["host"], "public.example");

    // An HTTP/1.0 client may send no Host; the upstream still gets one.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response within 10s")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let json = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert_eq!(body["headers"]["host"], up.addr.to_string(), "{raw}");
}

/// The upstream sees the first chunk before the client has sent the second
/// (and the client sees the first response chunk before the upstream sends
/// the second): neither direction is buffered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_buffering() {
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 64; // 16 MiB each way
    let first_chunk_seen = Arc::new(Notify::new());
    let client_got_first = Arc::new(Notify::new());
    let (seen, got) = (first_chunk_seen.clone(), client_got_first.clone());
    let up = Upstream::start(move |req| {
        let (seen, got) = (seen.clone(), got.clone());
        async move {
            let mut body = req.into_body();
            let mut received = 0usize;
            while let Some(frame) = body.frame().await {
                let data = frame.unwrap().into_data().unwrap_or_default();
                if received == 0 && !data.is_empty() {
                    seen.notify_one();
                }
                received += data.len();
            }
            // Stream the response: the rest only after the client got the first chunk.
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(vec![b'd'; CHUNK]))))
                    .await;
                got.notified().await;
                for _ in 1..CHUNKS {
                    if tx
                        .send(Ok(Frame::data(Bytes::from(vec![b'd'; CHUNK]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))));
            r.headers_mut()
                .insert("x-received", received.to_string().parse().unwrap());
            r
        }
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], "")).replace(
        "bind: 127.0.0.1:0\nadmin",
        "bind: 127.0.0.1:0\n    limits: { max_body_bytes: 64MiB }\nadmin",
    ))
    .await;

    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    let seen = first_chunk_seen.clone();
    let sender = tokio::spawn(async move {
        tx.send(Ok(Frame::data(Bytes::from(vec![b'u'; CHUNK]))))
            .await
            .unwrap();
        seen.notified().await;
        for _ in 1..CHUNKS {
            tx.send(Ok(Frame::data(Bytes::from(vec![b'u'; CHUNK]))))
                .await
                .unwrap();
        }
    });
    let req = Request::post(gw.url("/upload"))
        .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("no deadlock: the request body streams")
        .unwrap();
    sender.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-received"],
        (CHUNK * CHUNKS).to_string().as_str()
    );
    let mut body = resp.into_body();
    let mut total = 0usize;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .expect("no deadlock: the response body streams")
    {
        let n = frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
        if total == 0 && n > 0 {
            client_got_first.notify_one();
        }
        total += n;
    }
    assert_eq!(total, CHUNK * CHUNKS);
}

/// An mpsc receiver as a `Stream` (tokio-stream is not needed for one adapter).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_json() {
    let dead = closed_port().await;
    let routes = format!(
        "  - name: dead\n    match: {{ path_prefix: / }}\n    upstream: {{ targets: [http://{dead}], retries: 0 }}\n"
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, 502);
    let body = r.json();
    assert_eq!(body["error"], "upstream_unavailable");
    assert!(
        !body["message"].as_str().unwrap().contains("127.0.0.1"),
        "callers are not told private addresses: {body}"
    );
    assert!(body["request_id"].as_str().unwrap().len() == 32);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_http_upstream_errors_total{kind=\"connect\",route=\"dead\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504() {
    let slow = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        status_response(200)
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "slow",
        "/",
        &[&slow],
        "      timeout: 300ms\n      retries: 0\n",
    )))
    .await;
    let started = std::time::Instant::now();
    let r = get(&gw.url("/")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered at the route timeout, not the upstream's pace"
    );
}

/// One keep-alive connection whose requests go to routes with long and
/// short timeouts in turn: each request is timed by its own route (the
/// connection's one request timer is moved along, and back, between them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_connection_keeps_its_routes_timeout() {
    let up = Upstream::start(|req| async move {
        if req.uri().path().ends_with("/slow") {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        status_response(200)
    })
    .await;
    let routes = route(
        "long",
        "/long",
        &[&up],
        "      timeout: 10s\n      retries: 0\n",
    ) + &route(
        "short",
        "/short",
        &[&up],
        "      timeout: 300ms\n      retries: 0\n",
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    let mut conn = connection(gw.addr()).await;
    let get = |path: &str| Request::get(gw.url(path)).body(full("")).unwrap();
    for (path, status) in [
        ("/long/fast", 200),
        ("/short/slow", 504),
        ("/long/slow", 200),
        ("/short/fast", 200),
        ("/short/slow", 504),
        ("/long/slow", 200),
    ] {
        let r = send_on(&mut conn, get(path)).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_from_client_to_upstream() {
    let up = Upstream::echo("h2").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "h2",
        "/",
        &[&up],
        "      protocol: h2c\n",
    )))
    .await;
    let h2 = h2c_client();
    for _ in 0..3 {
        let r = send_with(&h2, Request::get(gw.url("/x")).body(full("")).unwrap()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version, http::Version::HTTP_2, "client side is h2c");
        assert_eq!(r.json()["version"], "HTTP/2.0", "upstream side is h2c");
    }
    // HTTP/1.1 clients reach an h2c upstream too.
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.json()["version"], "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let echo = Upstream::echo("echo").await;
    let routes = format!(
        "  - name: ws\n    match: {{ path_prefix: /ws/ }}\n    strip_prefix: true\n    upstream: {{ targets: [http://{ws_addr}] }}\n  \
           - name: closed\n    match: {{ path_prefix: /closed/ }}\n    upgrades: []\n    upstream: {{ targets: [http://{ws_addr}] }}\n{}",
        route("echo", "/echo", &[&echo], "")
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    // A route without the protocol among its `upgrades` sends the request
    // as a plain one; a target switching anyway is a bad gateway.
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/closed/x", gw.addr())).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 502),
        other => panic!("expected a refused handshake, got {other:?}"),
    }
    // An upgrade to a protocol no route allows never reaches the target.
    let text = exchange_raw(
        gw.addr(),
        b"GET /echo HTTP/1.1\r\nhost: gw.test\r\nconnection: upgrade, http2-settings, close\r\n\
          upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    let (status, body) = status_and_body(&text);
    assert_eq!(status, 200, "{text}");
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(seen["headers"].get(gone).is_none(), "{gone}: {seen}");
    }
    let mut ws = websocket_echoes(&format!("ws://{}/ws/echo", gw.addr()), 5).await;
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_data().as_ref(), big.as_slice());
    ws.close(None).await.unwrap();
}

/// What a target sends right behind its `101`, in the same packet, reaches
/// the client first, before anything relayed later; and the client's bytes
/// reach the target.
#[tokio::test]
async fn bytes_behind_a_101_are_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            io.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        io.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nfirst",
        )
        .await
        .unwrap();
        let mut ping = [0u8; 4];
        io.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        io.write_all(b"pong").await.unwrap();
    });
    let routes = format!(
        "  - name: ws\n    match: {{ path_prefix: / }}\n    upstream: {{ targets: [http://{target}] }}\n"
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    let mut client = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nhost: gw.test\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Duration::from_secs(5);
    tokio::time::timeout(deadline, async {
        while !seen.ends_with(b"first") {
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the 101 and the bytes behind it");
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\nfirst"), "{text}");
    client.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tokio::time::timeout(deadline, client.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websocket_tunnel_is_closed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    let routes = format!(
        "  - name: ws\n    match: {{ path_prefix: / }}\n    upstream: {{ targets: [http://{ws_addr}] }}\n"
    );
    let gw = TestGateway::start(&limited_config("idle_timeout: 300ms", &routes)).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", gw.addr()))
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the quiet tunnel is closed by the gateway");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
}

/// Transfer-Encoding and Content-Length together (a request smuggling
/// attempt), and other framings two readers could read two ways, are
/// refused with 400 and the connection closed (RFC 9112 §6.1); nothing
/// reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_framing_is_refused() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    for raw in [
        &b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4, 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ] {
        let out = exchange_raw(gw.addr(), raw).await;
        let (status, body) = status_and_body(&out);
        assert_eq!(status, 400, "{}: {out}", String::from_utf8_lossy(raw));
        assert!(body.contains("\"request_id\""), "{out}");
    }
    assert_eq!(up.hits(), 0);
}
