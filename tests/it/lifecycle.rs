use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tollgate::Reloaded;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_requests() {
    let slow = Upstream::start(|req| async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        echo_response("slow", req)
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(&route("slow", "/", &[&slow], ""))).await;
    let url = gw.url("/work");
    let in_flight = tokio::spawn(async move { get(&url).await });
    wait_until(
        Duration::from_secs(5),
        "request reached the upstream",
        || async { slow.hits() == 1 },
    )
    .await;

    gw.gw.shutdown();
    let ready = get(&format!("http://{}/readyz", gw.gw.admin_addr())).await;
    assert_eq!(ready.status, 503, "not ready while draining");
    wait_until(
        Duration::from_secs(5),
        "listener stops accepting",
        || async { tokio::net::TcpStream::connect(gw.addr()).await.is_err() },
    )
    .await;

    let r = in_flight.await.unwrap();
    assert_eq!(
        r.status, 200,
        "in-flight request completes during the drain"
    );
    assert!(gw.gw.drained().await, "drain finished before the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_idle_keep_alive_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let mut idle = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
    // The connection now waits, idle, for its next request.
    gw.gw.shutdown();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection is closed by the drain");
    assert!(gw.gw.drained().await, "drain finished before the deadline");
}

/// A connection accepted just before the drain began, whose request comes
/// after: it is answered (and then closed), not cut off unanswered; so is
/// one still waiting in the listen queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_as_the_drain_begins_gets_its_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let mut fresh = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    // Accepted by the gateway (the listener counts it) before the drain.
    wait_until(
        Duration::from_secs(5),
        "the connection is accepted",
        || async {
            metric(
                &gw.metrics().await,
                "tollgate_transport_active_connections{listener=\"sidecar\"}",
            ) >= 1.0
        },
    )
    .await;
    gw.gw.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    fresh
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), fresh.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text:?}"
    );
    assert!(gw.gw.drained().await, "drain finished before the deadline");
}

fn two_route_config(target: &Upstream) -> String {
    config_with_routes(&route("switch", "/", &[target], ""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_traffic_loses_no_request() {
    let old = Upstream::echo("old").await;
    let new = Upstream::echo("new").await;
    let gw = TestGateway::start(&two_route_config(&old)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served_by_new = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, failures, served_by_new, url) = (
            stop.clone(),
            failures.clone(),
            served_by_new.clone(),
            gw.url("/"),
        );
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::get(&url).body(full("")).unwrap();
                match tokio::time::timeout(Duration::from_secs(5), c.request(req)).await {
                    Ok(Ok(resp)) if resp.status() == 200 => {
                        use http_body_util::BodyExt;
                        let body = resp.into_body().collect().await.unwrap().to_bytes();
                        if body.windows(5).any(|w| w == b"\"new\"") {
                            served_by_new.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.write_config(&two_route_config(&new));
    wait_until(
        Duration::from_secs(10),
        "traffic moves to the new upstream",
        || async { served_by_new.load(Ordering::SeqCst) > 50 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no failed request out of {total}"
    );
    assert!(old.hits() > 0 && new.hits() > 0);
    let m = gw.metrics().await;
    assert!(metric(&m, "tollgate_config_reloads_total{outcome=\"ok\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_keeps_the_running_config() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&two_route_config(&up)).await;
    gw.write_config("routes:\n  - name: broken\n    match: { path_prefix: nope }\n    upstream: { targets: [ftp://x] }\n");
    wait_until(
        Duration::from_secs(10),
        "the watcher rejects the bad file",
        || async {
            metric(
                &gw.metrics().await,
                "tollgate_config_reloads_total{outcome=\"rejected\"}",
            ) >= 1.0
        },
    )
    .await;
    let r = get(&gw.url("/still")).await;
    assert_eq!(r.status, 200, "old routes still serve");
    assert_eq!(r.json()["name"], "up");

    let err = gw
        .gw
        .reload()
        .await
        .expect_err("explicit reload reports the errors");
    let text = err.to_string();
    assert!(text.contains("routes[0].match.path_prefix"), "{text}");
    assert!(text.contains("routes[0].upstream.targets[0]"), "{text}");

    // Fixing the file applies it.
    gw.write_config(&two_route_config(&up).replace("name: switch", "name: fixed"));
    assert!(matches!(
        gw.gw.reload().await,
        Ok(Reloaded::Applied | Reloaded::Unchanged)
    ));
    wait_until(
        Duration::from_secs(10),
        "the fixed config is in effect",
        || async {
            gw.gw
                .config()
                .routes
                .first()
                .is_some_and(|r| r.name == "fixed")
        },
    )
    .await;
}
