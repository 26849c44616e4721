//! Faults are blamed on whoever caused them: a client's stalled body never
//! takes a target out; a target's faults count once per request; ejection
//! never outlasts the fault, nor takes out a route's last targets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A target of raw bytes: `answer` gets each connection after its first
/// read, with what that read brought.
async fn raw_target<F, Fut>(answer: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                    .await
                    .unwrap_or(0);
                buf.truncate(n);
                answer(s, buf).await;
            });
        }
    });
    addr
}

fn upstream_yaml(targets: &[std::net::SocketAddr], extra: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|a| format!("http://{a}")).collect();
    config_with_routes(&format!(
        "  - name: r\n    match: {{ path_prefix: / }}\n    upstream:\n      targets: [{}]\n{extra}",
        targets.join(", ")
    ))
}

/// Five requests whose bodies the client never sends (HTTP/1.1 and HTTP/2)
/// end as the client's timeouts; the targets stay in service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_bodies_never_eject_a_target() {
    // Targets that read the whole body before they answer, as most do.
    let reader = |name: &'static str| {
        Upstream::start(move |req: Request<hyper::body::Incoming>| async move {
            let (parts, body) = req.into_parts();
            let _ = body.collect().await;
            echo_response(name, Request::from_parts(parts, ()))
        })
    };
    let a = reader("a").await;
    let b = reader("b").await;
    let yaml = upstream_yaml(
        &[a.addr, b.addr],
        "      timeout: 300ms\n      passive_health: { consecutive_failures: 2, max_ejected_percent: 100 }\n",
    );
    let gw = TestGateway::start(&yaml).await;
    // HTTP/1.1: a body promised and never sent.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nhost: gw.test\r\ncontent-length: 100\r\n\r\nonly")
            .await
            .unwrap();
        stalled.push(s);
    }
    // HTTP/2: streams whose bodies never end.
    let mut h2 = h2_connection(gw.addr()).await;
    let mut pending = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream_from(rx)).boxed();
        let req = Request::post(format!("http://gw.test:{}/up", gw.addr().port()))
            .body(body)
            .unwrap();
        pending.push((tx, h2.send_request(req)));
    }
    for (tx, response) in pending {
        let r = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("answered")
            .expect("a response");
        assert_eq!(r.status(), 408, "the stall is the client's");
        drop(tx);
    }
    for mut s in stalled {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out),
        )
        .await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("\"client_timeout\""), "{text}");
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_upstream_ejections_total{route=\"r\"}"),
        0.0,
        "{m}"
    );
    // Both targets still take traffic.
    for _ in 0..6 {
        assert_eq!(get(&gw.url("/ok")).await.status, 200);
    }
    assert!(a.hits() >= 3 && b.hits() >= 3, "{} {}", a.hits(), b.hits());
}

/// A stream of body frames from a channel.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A route's only target restarting is served again on the first request
/// after it is back: it was never ejected, however many requests failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_target_that_restarts_is_served_as_soon_as_it_is_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = Upstream::serve(listener, |req| async move { echo_response("first", req) });
    let yaml = upstream_yaml(&[addr], "      retries: 0\n");
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(get(&gw.url("/")).await.status, 200);
    drop(first);
    // Down: every request fails, far past `consecutive_failures`.
    wait_until(Duration::from_secs(5), "the target is down", || async {
        get(&gw.url("/")).await.status == 502
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/")).await.status, 502);
    }
    let again = Upstream::serve(TcpListener::bind(addr).await.unwrap(), |req| async move {
        echo_response("again", req)
    });
    let r = get(&gw.url("/")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "again");
    assert_eq!(again.hits(), 1);
}

/// An ejected target gets a trial request each `trial_interval`; once one
/// succeeds it is back, long before its `ejection_time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_target_is_back_after_one_good_trial() {
    let flaky_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky_addr = flaky_listener.local_addr().unwrap();
    drop(flaky_listener);
    let steady = Upstream::echo("steady").await;
    let yaml = upstream_yaml(
        &[flaky_addr, steady.addr],
        "      retries: 0\n      passive_health: { consecutive_failures: 1, ejection_time: 10m, trial_interval: 100ms }\n",
    );
    let gw = TestGateway::start(&yaml).await;
    wait_until(
        Duration::from_secs(5),
        "the dead target is ejected",
        || async {
            get(&gw.url("/")).await;
            metric(
                &gw.metrics().await,
                "tollgate_upstream_ejections_total{route=\"r\"}",
            ) == 1.0
        },
    )
    .await;
    let flaky = Upstream::serve(
        TcpListener::bind(flaky_addr).await.unwrap(),
        |req| async move { echo_response("flaky", req) },
    );
    wait_until(
        Duration::from_secs(10),
        "the revived target takes traffic again",
        || async {
            get(&gw.url("/")).await;
            flaky.hits() >= 3
        },
    )
    .await;
}

/// A timed-out attempt is retried on another target, never on the one that
/// timed out; with no other target the request ends after one timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_target_is_not_tried_again_for_the_request() {
    let slow_hits = Arc::new(AtomicUsize::new(0));
    let slow = {
        let hits = slow_hits.clone();
        Upstream::start(move |req| {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                echo_response("slow", req)
            }
        })
        .await
    };
    let gw = TestGateway::start(&upstream_yaml(
        &[slow.addr],
        "      timeout: 200ms\n      retries: 2\n",
    ))
    .await;
    let r = get(&gw.url("/")).await;
    assert_eq!(r.status, 504);
    assert_eq!(
        slow_hits.load(Ordering::SeqCst),
        1,
        "one attempt, not three"
    );

    let fast = Upstream::echo("fast").await;
    let gw = TestGateway::start(&upstream_yaml(
        &[slow.addr, fast.addr],
        "      timeout: 200ms\n      retries: 2\n      lb: round_robin\n",
    ))
    .await;
    slow_hits.store(0, Ordering::SeqCst);
    for _ in 0..4 {
        let r = get(&gw.url("/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["name"], "fast");
    }
    assert!(slow_hits.load(Ordering::SeqCst) <= 4);
}

/// One request's retries against one target count as one failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_retries_count_once_against_a_target() {
    let dead = closed_port().await;
    let gw = TestGateway::start(&upstream_yaml(
        &[dead],
        "      retries: 2\n      passive_health: { consecutive_failures: 2, max_ejected_percent: 100 }\n",
    ))
    .await;
    assert_eq!(get(&gw.url("/")).await.status, 502);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_http_upstream_errors_total{kind=\"connect\",route=\"r\"}"
        ),
        3.0,
        "three attempts: {m}"
    );
    assert_eq!(
        metric(&m, "tollgate_upstream_ejections_total{route=\"r\"}"),
        0.0,
        "but one failure of the target"
    );
    assert_eq!(get(&gw.url("/")).await.status, 502);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_upstream_ejections_total{route=\"r\"}"),
        1.0,
        "the second request's failure ejects it"
    );
}

/// One HTTP/2 connection cannot hold more upstream requests than
/// `max_forwarded_per_connection`, however many streams it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_holds_a_bounded_number_of_upstream_requests() {
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let up = {
        let (now, most) = (now.clone(), most.clone());
        Upstream::start(move |req| {
            let (now, most) = (now.clone(), most.clone());
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                echo_response("up", req)
            }
        })
        .await
    };
    let yaml = limited_config(
        "max_forwarded_per_connection: 4",
        &route("r", "/", &[&up], ""),
    );
    let gw = TestGateway::start(&yaml).await;
    let h2 = h2_connection(gw.addr()).await;
    let calls = (0..24).map(|_| {
        let mut h2 = h2.clone();
        let uri = format!("http://gw.test:{}/x", gw.addr().port());
        async move { h2_send(&mut h2, Request::get(uri).body(full("")).unwrap()).await }
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.status, 200);
    }
    let most = most.load(Ordering::SeqCst);
    assert!((1..=4).contains(&most), "{most} requests at once");
}

/// A target that dies mid-body is blamed: counted as its error and
/// towards its ejection, not as a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_the_target_counts_against_it() {
    let addr = raw_target(|mut s, _| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
            .await;
    })
    .await;
    let gw = TestGateway::start(&upstream_yaml(
        &[addr],
        "      retries: 0\n      passive_health: { consecutive_failures: 2, max_ejected_percent: 100 }\n",
    ))
    .await;
    for _ in 0..2 {
        let text = exchange_raw(
            gw.addr(),
            b"GET / HTTP/1.1\r\nhost: gw.test\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(status_and_body(&text).1, "short", "cut short: {text}");
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_http_upstream_errors_total{kind=\"protocol\",route=\"r\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "tollgate_upstream_ejections_total{route=\"r\"}"),
        1.0,
        "{m}"
    );
    for (class, count) in [("2xx", 0.0), ("5xx", 2.0)] {
        let name = format!(
            "tollgate_http_requests_total{{class=\"{class}\",listener=\"sidecar\",route=\"r\"}}"
        );
        assert_eq!(metric(&m, &name), count, "{class}: {m}");
    }
}

/// The access line of a request whose body streams from its target is
/// written when the body ends: 502 with the reason when the target cut it
/// short, the status sent when it came whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_logged_when_it_ends() {
    let addr = raw_target(|mut s, request| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
            .await;
        if request.starts_with(b"GET /whole") {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.write_all(b"world").await;
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    let yaml = upstream_yaml(&[addr], "      retries: 0\n")
        .replace("access_log: false", "access_log: true")
        + "reload: { watch: false }\n";
    std::fs::write(&file, yaml).unwrap();
    let (mut child, gw, logs) = run_binary(&file);
    let mut ids = Vec::new();
    for path in ["/whole", "/short"] {
        let raw = format!("GET {path} HTTP/1.1\r\nhost: gw.test\r\nconnection: close\r\n\r\n");
        let text = exchange_raw(gw, raw.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .expect("a request id")
            .to_owned();
        ids.push(id);
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let logs = logs.join().unwrap();
    let line = |id: &str| -> serde_json::Value {
        let found: Vec<_> = logs
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["request_id"] == id)
            .collect();
        assert_eq!(found.len(), 1, "one line for {id}: {logs:#?}");
        found.into_iter().next().unwrap()
    };
    let whole = line(&ids[0]);
    assert_eq!(whole["status"], 200, "{whole}");
    assert!(
        whole["latency_ms"].as_f64().unwrap() >= 50.0,
        "timed to the body's end: {whole}"
    );
    let short = line(&ids[1]);
    assert_eq!(short["status"], 502, "{short}");
    assert_eq!(short["error"], "upstream_error", "{short}");
    assert!(
        short["detail"]
            .as_str()
            .unwrap()
            .contains("broke off after a 200 head"),
        "{short}"
    );
}
