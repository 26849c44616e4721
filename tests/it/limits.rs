use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_uri_and_body_limits() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&limited_config(
        "max_headers: 20, max_header_bytes: 2KiB, max_uri_bytes: 128, max_body_bytes: 1KiB",
        &route("r", "/", &[&up], ""),
    ))
    .await;

    let mut req = Request::get(gw.url("/"));
    for i in 0..30 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let r = send(req.body(full("")).unwrap()).await;
    assert_eq!(r.status, 431, "too many headers");
    assert_eq!(r.json()["error"], "headers_too_large");

    let r = send(
        Request::get(gw.url("/"))
            .header("x-big", "b".repeat(4000))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 431, "headers too big");

    let r = get(&gw.url(&format!("/{}", "p".repeat(200)))).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.json()["error"], "uri_too_long");

    let r = send(
        Request::post(gw.url("/"))
            .body(full(vec![0u8; 2000]))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413, "declared body too large");
    assert_eq!(r.json()["error"], "body_too_large");
    assert_eq!(up.hits(), 0, "refused before reaching the upstream");

    // A chunked body with no declared length is counted as it streams.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![1u8; 512])))),
    );
    let r = send(
        Request::post(gw.url("/"))
            .body(StreamBody::new(chunks).boxed())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413, "streamed body too large: {}", r.text());

    let r = send(
        Request::post(gw.url("/"))
            .body(full(vec![0u8; 1000]))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "within limits");

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_http_limit_exceeded_total{limit=\"headers\",listener=\"sidecar\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_http_limit_exceeded_total{limit=\"body\",listener=\"sidecar\"}"
        ),
        1.0
    );
}

async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a 408 before closing
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_closes_excess_connections() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&limited_config(
        "max_connections: 2",
        &route("r", "/", &[&up], ""),
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut third = TcpStream::connect(gw.addr()).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        closed_by_peer(&mut third, Duration::from_secs(5)).await,
        "third connection closed"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_transport_connections_total{listener=\"sidecar\",outcome=\"rejected_limit\"}"
        ),
        1.0
    );

    drop(held);
    wait_until(Duration::from_secs(5), "a slot frees up", || async {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out.starts_with(b"HTTP/1.1 200")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&limited_config(
        "header_read_timeout: 300ms, idle_timeout: 400ms",
        &route("r", "/", &[&up], ""),
    ))
    .await;

    // Slowloris: a request head that never completes.
    let mut slow = TcpStream::connect(gw.addr()).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-a: ")
        .await
        .unwrap();
    assert!(
        closed_by_peer(&mut slow, Duration::from_secs(5)).await,
        "incomplete head is cut off"
    );

    // An idle keep-alive connection after one request.
    let mut idle = TcpStream::connect(gw.addr()).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_peer(&mut idle, Duration::from_secs(5)).await,
        "idle connection closed"
    );

    // A connection that never sends anything.
    let mut silent = TcpStream::connect(gw.addr()).await.unwrap();
    assert!(
        closed_by_peer(&mut silent, Duration::from_secs(5)).await,
        "silent connection closed"
    );
}
