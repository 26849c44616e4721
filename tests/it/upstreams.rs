use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Request;
use tokio::net::TcpListener;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let c = Upstream::echo("c").await;
    let gw = TestGateway::start(&config_with_routes(&route("rr", "/", &[&a, &b, &c], ""))).await;
    for _ in 0..30 {
        assert_eq!(get(&gw.url("/")).await.status, 200);
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (10, 10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_the_busy_target() {
    let slow = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        status_response(200)
    })
    .await;
    let fast = Upstream::echo("fast").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "lr",
        "/",
        &[&slow, &fast],
        "      lb: least_request\n",
    )))
    .await;
    // Pin the slow target with in-flight requests, then the rest must avoid it.
    let url = gw.url("/");
    let mut pending = Vec::new();
    while slow.hits() < 3 {
        let url = url.clone();
        pending.push(tokio::spawn(async move { get(&url).await.status }));
        // Each reaches a target before the next goes: none is still on its
        // way to the slow one when the count is taken.
        let sent = pending.len();
        wait_until(
            Duration::from_secs(10),
            "the request reached a target",
            || async { slow.hits() + fast.hits() >= sent },
        )
        .await;
    }
    let slow_before = slow.hits();
    for _ in 0..20 {
        assert_eq!(get(&url).await.status, 200);
    }
    assert_eq!(
        slow.hits(),
        slow_before,
        "no new request went to the busy target"
    );
    for p in pending {
        assert_eq!(p.await.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_check_ejects_and_recovers() {
    let sick = Arc::new(AtomicBool::new(false));
    let flag = sick.clone();
    let flaky = Upstream::start(move |req| {
        let sick = flag.load(Ordering::SeqCst);
        async move {
            if req.uri().path() == "/health" && sick {
                status_response(500)
            } else {
                echo_response("flaky", req)
            }
        }
    })
    .await;
    let steady = Upstream::echo("steady").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "hc",
        "/",
        &[&flaky, &steady],
        "      health_check: { path: /health, interval: 100ms, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2 }\n",
    )))
    .await;

    sick.store(true, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(10),
        "flaky target marked unhealthy",
        || async {
            metric(
                &gw.metrics().await,
                "tollgate_upstream_health_changes_total{route=\"hc\",state=\"unhealthy\"}",
            ) >= 1.0
        },
    )
    .await;
    for _ in 0..10 {
        let r = get(&gw.url("/app")).await;
        assert_eq!(
            r.json()["name"],
            "steady",
            "unhealthy target gets no traffic"
        );
    }

    sick.store(false, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(10),
        "flaky target healthy again",
        || async {
            metric(
                &gw.metrics().await,
                "tollgate_upstream_health_changes_total{route=\"hc\",state=\"healthy\"}",
            ) >= 1.0
        },
    )
    .await;
    let mut names = std::collections::HashSet::new();
    for _ in 0..10 {
        names.insert(
            get(&gw.url("/app")).await.json()["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert!(
        names.contains("flaky") && names.contains("steady"),
        "recovered target is back in rotation: {names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_and_recovery() {
    // Reserve a port, leave it closed for now: the target is down.
    let reserved = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let steady = Upstream::echo("steady").await;
    let routes = format!(
        "  - name: pe\n    match: {{ path_prefix: / }}\n    upstream:\n      targets: [http://{down_addr}, http://{}]\n      retries: 0\n      passive_health: {{ consecutive_failures: 2, ejection_time: 1s, trial_interval: 1m }}\n",
        steady.addr
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    let mut failures = 0;
    for _ in 0..20 {
        if get(&gw.url("/")).await.status == 502 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 2,
        "two failures eject the target; the rest go to the live one"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_upstream_ejections_total{route=\"pe\"}"),
        1.0
    );

    // The target comes back; after the ejection time it gets traffic again.
    let revived = Upstream::serve(
        TcpListener::bind(down_addr).await.unwrap(),
        |req| async move { echo_response("revived", req) },
    );
    wait_until(
        Duration::from_secs(10),
        "revived target receives traffic",
        || async {
            get(&gw.url("/")).await;
            revived.hits() > 0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_only_for_idempotent_requests() {
    let unavailable = Upstream::start(|_| async { status_response(503) }).await;
    let ok = Upstream::echo("ok").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "retry",
        "/",
        &[&unavailable, &ok],
        "      retries: 1\n      retry_on_status: [503]\n      passive_health: { consecutive_failures: 0 }\n",
    )))
    .await;
    // Round robin starts at the first target: the 503 one.
    let r = get(&gw.url("/idempotent")).await;
    assert_eq!(r.status, 200, "GET retried on the other target");
    assert_eq!((unavailable.hits(), ok.hits()), (1, 1));

    // Back on the 503 target's turn: a POST is not retried.
    let r = send(
        Request::post(gw.url("/not-idempotent"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 503, "POST is answered with the upstream's 503");
    assert_eq!((unavailable.hits(), ok.hits()), (2, 1));

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_http_retries_total{outcome=\"retried\",route=\"retry\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_retried_on_another_target() {
    let dead = closed_port().await;
    let ok = Upstream::echo("ok").await;
    let routes = format!(
        "  - name: ce\n    match: {{ path_prefix: / }}\n    upstream:\n      targets: [http://{dead}, http://{}]\n      retries: 1\n",
        ok.addr
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    for _ in 0..4 {
        let r = send(Request::delete(gw.url("/x")).body(full("")).unwrap()).await;
        assert_eq!(r.status, 200);
    }
    let r = send(Request::post(gw.url("/x")).body(full("")).unwrap()).await;
    assert_eq!(
        r.status, 200,
        "nothing was sent on a failed connect, so even POST is retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_names_resolve_to_targets() {
    let up = Upstream::echo("named").await;
    let routes = format!(
        "  - name: dns\n    match: {{ path_prefix: / }}\n    upstream:\n      targets: [http://localhost:{}]\n      dns_refresh: 200ms\n",
        up.addr.port()
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    // localhost may also resolve to ::1 where nothing listens: connect errors
    // are retried on the other address, so every request succeeds.
    for _ in 0..6 {
        let r = get(&gw.url("/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["headers"]["host"],
            format!("localhost:{}", up.addr.port())
        );
    }
    let m = gw.metrics().await;
    assert!(metric(&m, "tollgate_upstream_targets{route=\"dns\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_target_is_503() {
    let dead = closed_port().await;
    // A route's last target is ejected only where the operator allows it.
    let routes = format!(
        "  - name: gone\n    match: {{ path_prefix: / }}\n    upstream:\n      targets: [http://{dead}]\n      retries: 0\n      passive_health: {{ consecutive_failures: 1, ejection_time: 1m, max_ejected_percent: 100 }}\n"
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    assert_eq!(
        get(&gw.url("/")).await.status,
        502,
        "the first failure is the upstream's"
    );
    let r = get(&gw.url("/")).await;
    assert_eq!(r.status, 503, "then no target is left");
    assert_eq!(r.json()["error"], "no_healthy_upstream");
}

/// Keep-alive connections to a target are reused whatever the response's
/// framing (length, chunked, none), and closed once idle for the pool's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_closed_when_idle() {
    use http::{Method, Response};
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};

    let up = Upstream::start(|req| async move {
        match req.uri().path() {
            "/chunked" => {
                let frames = ["ch", "unk", "ed"]
                    .map(|s| Ok::<_, BoxError>(Frame::data(bytes::Bytes::from(s))));
                Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                    frames,
                ))))
            }
            "/empty" => status_response(204),
            _ => Response::new(full("length")),
        }
    })
    .await;
    let yaml = config_with_routes(&route("r", "/", &[&up], "")).replace(
        "proxy:\n  access_log: false\n",
        "proxy:\n  access_log: false\n  pool_idle_timeout: 300ms\nruntime:\n  workers: 1\n",
    );
    let gw = TestGateway::start(&yaml).await;
    for _ in 0..5 {
        for (method, path, status, body) in [
            (Method::GET, "/len", 200, "length"),
            (Method::GET, "/chunked", 200, "chunked"),
            (Method::GET, "/empty", 204, ""),
            (Method::HEAD, "/len", 200, ""),
            (Method::POST, "/len", 200, "length"),
        ] {
            let r = send(
                Request::builder()
                    .method(method.clone())
                    .uri(gw.url(path))
                    .body(full("request body"))
                    .unwrap(),
            )
            .await;
            assert_eq!(
                (r.status.as_u16(), r.text().as_str()),
                (status, body),
                "{method} {path}"
            );
        }
    }
    assert_eq!(up.hits(), 25);
    assert_eq!(up.connections(), (1, 1), "one upstream connection, reused");
    wait_until(
        Duration::from_secs(5),
        "the idle upstream connection closes",
        || async { up.connections().1 == 0 },
    )
    .await;
    assert_eq!(get(&gw.url("/len")).await.status, 200);
    assert_eq!(up.connections(), (2, 1));
}

/// A pooled connection that the target closed while it sat idle is not used:
/// the next request, even a POST with a body, goes out on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_idle_connections_loses_no_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Answers one request per connection with a keep-alive response, then
    // closes the connection shortly after.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(12).any(|w| w == b"request body") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let targets = format!(
        "  - name: r\n    match:\n      path_prefix: /\n    upstream:\n      targets: [http://{addr}]\n"
    );
    let gw = TestGateway::start(&config_with_routes(&targets)).await;
    for _ in 0..3 {
        let r = send(
            Request::post(gw.url("/"))
                .header("content-length", "12")
                .body(full("request body"))
                .unwrap(),
        )
        .await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
