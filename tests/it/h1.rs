//! tollgate's own HTTP/1 codec and upstream client, seen from outside:
//! pipelining, request bodies (length, chunked, `100 Continue`), HTTP/1.0,
//! JSON answers to heads that cannot be read, every response framing, and
//! what a broken upstream response becomes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// An upstream that answers every request head with `reply` and then, with
/// `close`, closes the connection.
async fn scripted(reply: &'static [u8], close: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if s.write_all(reply).await.is_err() || close {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

fn gateway_to(addr: SocketAddr) -> String {
    config_with_routes(&format!(
        "  - name: r\n    match:\n      path_prefix: /\n    upstream:\n      targets: [http://{addr}]\n"
    ))
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let text = exchange_raw(
        gw.addr(),
        b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n\
          HEAD /b HTTP/1.1\r\nhost: x\r\n\r\n\
          GET /c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{text}");
    let a = text.find("\"path\":\"/a\"").expect("/a answered");
    let c = text.find("\"path\":\"/c\"").expect("/c answered");
    assert!(a < c, "in order: {text}");
    assert!(
        !text.contains("\"path\":\"/b\""),
        "HEAD has no body: {text}"
    );
    let last_head = &text[text.rfind("HTTP/1.1 200").unwrap()..];
    assert!(last_head.contains("connection: close\r\n"), "{last_head}");
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn requests_with_bodies_keep_a_connection_in_step() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let text = exchange_raw(
        gw.addr(),
        b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n\
          POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello\
          POST /chunked HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\ntrailer: t\r\n\r\n\
          GET /third HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 4, "{text}");
    let order: Vec<usize> = ["/first", "/second", "/chunked", "/third"]
        .iter()
        .map(|p| text.find(&format!("\"path\":\"{p}\"")).expect(p))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {text}");
    assert!(text.contains("\"method\":\"POST\""));
}

#[tokio::test]
async fn malformed_and_partial_requests_are_answered() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let text = exchange_raw(gw.addr(), b"GET / HTTP/1.1\r\nbad header line\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // A target httparse takes and `http` refuses is answered, not dropped.
    let text = exchange_raw(gw.addr(), b"GET /a<b> HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // A head split over two writes is read whole.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /split HTTP/1.1\r\nho").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"st: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"path\":\"/split\""), "{out}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn every_response_framing_reaches_the_client() {
    for (reply, close, body) in [
        (
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"[..],
            false,
            "hello world",
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", true, "until the end"),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            false,
            "final",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false, "abc"),
    ] {
        let addr = scripted(reply, close).await;
        let gw = TestGateway::start(&gateway_to(addr)).await;
        for _ in 0..2 {
            let r = get(&gw.url("/")).await;
            assert_eq!((r.status.as_u16(), r.text().as_str()), (200, body));
        }
    }
}

/// On the direct path a response's fields go to the client as the target
/// wrote them, less hop-by-hop fields and the target's `x-request-id`
/// (tollgate's own replaces it), with this hop's `Via` after the target's.
#[tokio::test]
async fn response_fields_reach_the_client_as_the_target_wrote_them() {
    let addr = scripted(
        b"HTTP/1.1 200 OK\r\nServer: scripted\r\nConnection: keep-alive\r\n\
          X-Request-Id: the-target-s\r\nVia: 1.0 inner\r\nKeep-Alive: timeout=5\r\n\
          Content-Length: 2\r\nDate: Fri, 04 Dec 2026 18:00:00 GMT\r\nX-Custom:  A b \r\n\r\nok",
        false,
    )
    .await;
    let gw = TestGateway::start(&gateway_to(addr)).await;
    let text = exchange_raw(
        gw.addr(),
        b"GET / HTTP/1.1\r\nhost: x\r\nx-request-id: mine\r\n\r\n\
          HEAD / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (get, head) = text.split_at(text.find("\r\n\r\nok").expect("the body") + 6);
    for response in [get, head] {
        let expected = [
            "HTTP/1.1 200 OK",
            "Server: scripted",
            "Via: 1.0 inner",
            "Content-Length: 2",
            "Date: Fri, 04 Dec 2026 18:00:00 GMT",
            "X-Custom:  A b ",
            "via: 1.1 tollgate",
        ];
        let lines: Vec<&str> = response.lines().collect();
        assert_eq!(lines[..expected.len()], expected, "{response}");
        let lower = response.to_ascii_lowercase();
        assert!(
            !lower.contains("the-target-s") && !lower.contains("keep-alive"),
            "{response}"
        );
        // Date, Content-Length and framing come from the target's lines,
        // not added again.
        for once in ["date:", "content-length:", "x-request-id:"] {
            assert_eq!(lower.matches(once).count(), 1, "{once} {response}");
        }
        assert!(!lower.contains("transfer-encoding"), "{response}");
    }
    assert!(get.contains("x-request-id: mine\r\n"), "{get}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");
    assert!(head.contains("connection: close\r\n"), "{head}");
}

#[tokio::test]
async fn broken_upstream_responses_are_502() {
    let huge: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    for reply in [
        &b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc",
        b"",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        huge,
    ] {
        let addr = scripted(reply, true).await;
        let gw = TestGateway::start(&gateway_to(addr)).await;
        let r = get(&gw.url("/")).await;
        assert_eq!(
            r.status,
            502,
            "{}",
            String::from_utf8_lossy(&reply[..reply.len().min(80)])
        );
        assert_eq!(r.json()["error"], "upstream_error");
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_is_cut_short_not_passed_on() {
    let addr = scripted(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nmore",
        true,
    )
    .await;
    let gw = TestGateway::start(&gateway_to(addr)).await;
    let text = exchange_raw(gw.addr(), b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"));
    assert!(
        !text.contains("more") && !text.ends_with("0\r\n\r\n"),
        "no clean end: {text:?}"
    );
}

#[tokio::test]
async fn an_upstream_closing_mid_body_ends_the_response_not_the_gateway() {
    let addr = scripted(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b",
        true,
    )
    .await;
    let gw = TestGateway::start(&gateway_to(addr)).await;
    let text = exchange_raw(gw.addr(), b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 100\r\n"));
    assert!(
        text.ends_with("only ten b"),
        "the connection closes after what came: {text}"
    );
    let ok = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
    let gw2 = TestGateway::start(&gateway_to(ok)).await;
    assert_eq!(get(&gw2.url("/")).await.text(), "ok");
}

#[tokio::test]
async fn an_upstream_going_quiet_mid_body_is_cut_off_at_the_read_timeout() {
    // Sends part of the body and then holds the connection open, silent.
    let addr = scripted(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b",
        false,
    )
    .await;
    let gw = TestGateway::start(&config_with_routes(&format!(
        "  - name: r\n    match:\n      path_prefix: /\n    upstream:\n      targets: [http://{addr}]\n      read_timeout: 300ms\n"
    )))
    .await;
    // exchange_raw waits for the gateway to close the connection.
    let text = exchange_raw(gw.addr(), b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.ends_with("only ten b"),
        "what came, then the close: {text}"
    );
    // The same through hyper's server (a request with a body goes there).
    let text = exchange_raw(
        gw.addr(),
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("only ten b"), "{text}");
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&limited_config(
        "header_read_timeout: 300ms, idle_timeout: 60s",
        &route("r", "/", &[&up], ""),
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed long before the idle timeout")
        .unwrap();
    assert!(out.is_empty());
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        status_response(200)
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the request reaches the upstream",
        || async { up.hits() == 1 },
    )
    .await;
    drop(s);
    wait_until(
        Duration::from_secs(5),
        "the gateway drops its upstream request",
        || async { up.connections().1 == 0 },
    )
    .await;
}

/// Sockets of this process's network namespace in CLOSE_WAIT towards `port`
/// (Linux: /proc/net/tcp).
fn close_wait_towards(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[2].ends_with(&remote) && cols[3] == "08"
        })
        .count()
}

#[tokio::test]
async fn idle_connections_the_target_closed_leave_the_pool_before_they_expire() {
    let addr = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
    let yaml = gateway_to(addr).replace(
        "proxy:\n  access_log: false\n",
        "proxy:\n  access_log: false\n  pool_idle_timeout: 8s\n",
    );
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(get(&gw.url("/")).await.text(), "ok");
    // The target closed right after answering; the pool's sweep (every 2s
    // here) finds that long before the connection's 8s are up.
    wait_until(
        Duration::from_secs(5),
        "no pooled connection left half-closed",
        || async { close_wait_towards(addr.port()) == 0 },
    )
    .await;
    assert_eq!(get(&gw.url("/")).await.text(), "ok");
}

/// A target that answers each connection's first request and drops the
/// second unanswered: the gateway, which found the connection open in its
/// pool, sends the request again, whole, on a new connection.
#[tokio::test]
async fn a_request_a_pooled_connection_drops_unanswered_is_sent_again_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen_heads = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let heads = seen_heads.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let mut answered = 0;
                loop {
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = seen.drain(..end + 4).collect();
                        heads
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        if answered == 1 {
                            return; // dropped unanswered
                        }
                        answered += 1;
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    // One worker: both requests meet the same pool. No retries: the
    // connection's own resend is what is tested.
    let yaml = config_with_routes(&format!(
        "  - name: r\n    match:\n      path_prefix: /\n    upstream:\n      targets: [http://{addr}]\n      retries: 0\n"
    ))
    .replace(
        "proxy:\n  access_log: false\n",
        "proxy:\n  access_log: false\nruntime:\n  workers: 1\n",
    );
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(get(&gw.url("/first")).await.text(), "ok");
    let second = get(&gw.url("/second?x=1")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "ok");
    let heads = heads.lock().unwrap().clone();
    assert_eq!(
        heads.len(),
        3,
        "first, second dropped, second again: {heads:?}"
    );
    assert!(
        heads[1].starts_with("GET /second?x=1 HTTP/1.1\r\n"),
        "{heads:?}"
    );
    assert_eq!(heads[1], heads[2], "the resent head is the head first sent");
}

/// Every head that cannot be read is answered with the gateway's JSON
/// error and its request id, with the status its fault calls for, and the
/// connection closes.
#[tokio::test]
async fn every_error_reading_a_head_is_json() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let many: String = (0..300).map(|i| format!("x-{i}: v\r\n")).collect();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n folded\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            b"GET / HTTP/1.1\r\nbad header line\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            b"GET / HTTP/3.0\r\nhost: x\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(1 << 20)).into_bytes(),
            414,
            "uri_too_long",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "a".repeat(64 << 10)
            )
            .into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            b"PUT / HTTP/1.1\r\nhost: x\r\nexpect: something\r\n\r\n".to_vec(),
            417,
            "expectation_failed",
        ),
    ];
    for (raw, status, code) in cases {
        let text = exchange_raw(gw.addr(), &raw).await;
        let (got, body) = status_and_body(&text);
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(60)]).into_owned();
        assert_eq!(got, status, "{shown:?}: {text}");
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("{shown:?}: {text}"));
        assert_eq!(json["error"], code, "{shown:?}");
        let id = json["request_id"].as_str().unwrap();
        assert!(text.contains(&format!("x-request-id: {id}\r\n")), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
    }
    assert_eq!(up.hits(), 0);
}

/// `Expect: 100-continue`: the interim answer goes out once the request is
/// forwarded, and only then does the client send its body.
#[tokio::test]
async fn a_client_expecting_100_continue_is_told_to_go_on() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        http::Response::new(full(body))
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(
        &(route("r", "/", &[&up], "") + &route("locked", "/locked", &[&up], "    policy: []\n")),
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"PUT /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut interim))
        .await
        .expect("100 Continue")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).await.unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.ends_with("hello"), "{rest}");

    // A request refused before its body is wanted gets no 100: the final
    // answer, and the connection closes (the body was never read).
    let text = exchange_raw(
        gw.addr(),
        b"PUT /locked HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
}

/// HTTP/1.0 clients: served, closed after each response unless they ask
/// to keep the connection, and never sent chunked bodies.
#[tokio::test]
async fn http10_clients_are_served_in_their_terms() {
    let chunked = scripted(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
    )
    .await;
    let gw = TestGateway::start(&gateway_to(chunked)).await;
    let text = exchange_raw(gw.addr(), b"GET /a HTTP/1.0\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("transfer-encoding"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nhello"), "{text}");

    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let text = exchange_raw(
        gw.addr(),
        b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains("connection: keep-alive\r\n"), "{text}");
    assert_eq!(up.hits(), 2);
}

/// A request body is passed on as it arrives, and only as fast as the
/// target takes it: the gateway reads no further ahead than a bounded
/// buffer.
#[tokio::test]
async fn a_large_body_streams_through_with_bounded_read_ahead() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        http::Response::new(full(format!("{}", body.len())))
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let size = 5 << 20;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(
        format!(
            "POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let chunk = vec![b'z'; 64 << 10];
    for _ in 0..size / chunk.len() {
        s.write_all(&chunk).await.unwrap();
    }
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with(&size.to_string()), "{out}");
}
