//! `tollgate tunnel connect`, the real binary, against a real relay over
//! mTLS: the device side (--forward-to) answering HTTP requests carried by
//! a gateway route, the test-client side (--serve-http) reaching a device
//! peer, SIGTERM, messages it cannot use, a local service that is down, a
//! refused certificate, a refused join, and bad input.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;
use crate::tls::{Identity, TestCa, client_config, https_listener};

const PREFIX: &str = "/micronets/v1/ws-proxy/";

/// A gateway whose mTLS listener `edge` serves the relay, and whose route
/// `/dev/` carries HTTP requests to the peers on tunnel `dev-1`.
async fn gateway(ca: &TestCa) -> TestGateway {
    let server = ca.server("server", "localhost");
    let yaml = [
        "listeners:\n",
        "  - name: sidecar\n    bind: 127.0.0.1:0\n    protocol: http\n",
        &https_listener(
            "edge",
            &server,
            &format!(", client_ca: {}, client_auth: required", ca.pem().display()),
        ),
        "admin:\n  bind: 127.0.0.1:0\n",
        "proxy:\n  access_log: false\n",
        "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n",
        "routes:\n",
        "  - name: dev\n    match: { path_prefix: /dev/ }\n    strip_prefix: true\n",
        "    upstream: { tunnel: dev-1, timeout: 5s }\n",
    ]
    .concat();
    TestGateway::start(&yaml).await
}

fn tunnel_url(gw: &TestGateway, id: &str) -> String {
    let edge = gw.gw.listener_addr("edge").expect("edge listener");
    format!("wss://127.0.0.1:{}{PREFIX}{id}", edge.port())
}

async fn peers_on(gw: &TestGateway, id: &str) -> usize {
    let status = get(&format!("http://{}/admin/tunnels", gw.gw.admin_addr()))
        .await
        .json();
    status[0]["ids"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["id"] == id)
        .map_or(0, |r| r["peers"].as_array().map_or(0, Vec::len))
}

/// A `tollgate tunnel connect` process and its JSON log lines.
struct Peer {
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Peer {
    fn start(url: &str, ca: &TestCa, me: &Identity, side: &[&str]) -> Peer {
        Peer::start_with_log(url, ca, me, side, "info")
    }

    fn start_with_log(url: &str, ca: &TestCa, me: &Identity, side: &[&str], log: &str) -> Peer {
        let mut child = Command::new(BIN)
            .args(["tunnel", "connect", url, "--log-format", "json"])
            .arg("--cert")
            .arg(&me.cert)
            .arg("--key")
            .arg(&me.key)
            .arg("--ca")
            .arg(ca.pem())
            .args(["--timeout", "10s"])
            .args(side)
            .env("TOLLGATE_LOG", log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tollgate tunnel connect");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let into = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "raw": line }));
                into.lock().unwrap().push(v);
            }
        });
        Peer {
            child,
            logs,
            reader: Some(reader),
        }
    }

    fn lines(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["message"] == message)
            .cloned()
            .collect()
    }

    /// Waits for `count` log lines saying `message`; returns the last.
    async fn logged(&self, message: &str, count: usize) -> Value {
        wait_until(
            Duration::from_secs(20),
            &format!("{count} `{message}` log line(s)"),
            || async { self.lines(message).len() >= count },
        )
        .await;
        self.lines(message)[count - 1].clone()
    }

    /// The address `--serve-http 127.0.0.1:0` bound.
    async fn http_addr(&self) -> SocketAddr {
        let line = self.logged("serving HTTP", 1).await;
        line["addr"].as_str().unwrap().parse().unwrap()
    }

    /// Sends SIGTERM and waits (up to 20 s, no timing asserted) for the exit.
    async fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let mut status = None;
        wait_until(Duration::from_secs(20), "the client exits", || {
            status = self.child.try_wait().expect("try_wait");
            std::future::ready(status.is_some())
        })
        .await;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status.unwrap()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The device's local service: `/echo` answers JSON describing the request
/// (the body in base64), `/text` and `/binary` answer bodies of those kinds.
async fn local_service() -> Upstream {
    Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let header = |n: &str| parts.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        let answer = |content_type: &str, body: Bytes| {
            Response::builder()
                .status(if parts.method == "POST" { 201 } else { 200 })
                .header("content-type", content_type)
                .header("x-local", "yes")
                .body(full(body))
                .unwrap()
        };
        if parts.uri.path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        match parts.uri.path() {
            "/text" => answer(
                "text/plain; charset=utf-8",
                Bytes::from("héllo from the device"),
            ),
            "/binary" => answer(
                "image/png",
                Bytes::from_static(&[0x89, 0x50, 0, 0xff, 0x10]),
            ),
            _ => {
                let said = json!({
                    "method": parts.method.as_str(),
                    "path": parts.uri.path(),
                    "query": parts.uri.query(),
                    "host": header("host"),
                    "x_test": header("x-test"),
                    "content_type": header("content-type"),
                    "connection_listed": header("x-hop"),
                    "body": base64::engine::general_purpose::STANDARD.encode(&body),
                });
                answer("application/json", Bytes::from(said.to_string()))
            }
        }
    })
    .await
}

type Watcher = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn next(ws: &mut Watcher) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("a message within 20 s")
}

/// A plain WebSocket peer on `dev-1`.
async fn raw_peer(gw: &TestGateway, ca: &TestCa, name: &str) -> Watcher {
    let edge = gw.gw.listener_addr("edge").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(
        &ca.pem(),
        Some(&ca.client(name, "o")),
        &[],
    )));
    let tcp = TcpStream::connect(edge).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tokio_tungstenite::client_async(format!("wss://localhost:{}{PREFIX}dev-1", edge.port()), tls)
        .await
        .unwrap()
        .0
}

/// The next text message as JSON (pings and pongs skipped).
async fn next_json(ws: &mut Watcher) -> Value {
    loop {
        match next(ws).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn forward_to_answers_requests_carried_by_a_gateway_route() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(&ca).await;
    let service = local_service().await;
    let device = Peer::start(
        &tunnel_url(&gw, "dev-1"),
        &ca,
        &ca.client("dev-1", "Micronets DHCP"),
        &["--forward-to", &format!("http://{}", service.addr)],
    );
    device.logged("tunnel connected", 1).await;
    wait_until(Duration::from_secs(10), "the device joined", || async {
        peers_on(&gw, "dev-1").await == 1
    })
    .await;

    // JSON in and out, the query string and a header intact.
    let json_body = r#"{"subnetId":"mocksubnet007","nameservers":["1.2.3.4"]}"#;
    let r = send(
        Request::post(gw.url("/dev/echo?subnet=a%20b&x=1&x=2&amp=%26"))
            .header("content-type", "application/json")
            .header("x-test", "t-1")
            .header("connection", "x-hop")
            .header("x-hop", "not carried")
            .body(full(json_body))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-local"], "yes");
    let seen = r.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/echo");
    assert_eq!(seen["query"], "subnet=a+b&x=1&x=2&amp=%26");
    assert_eq!(seen["host"], service.addr.to_string());
    assert_eq!(seen["x_test"], "t-1");
    assert_eq!(seen["connection_listed"], Value::Null);
    assert_eq!(seen["content_type"], "application/json");
    let body = base64::engine::general_purpose::STANDARD
        .decode(seen["body"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        serde_json::from_str::<Value>(json_body).unwrap()
    );

    // A text body and a binary one reach the service byte for byte.
    let r = send(
        Request::put(gw.url("/dev/echo"))
            .header("content-type", "text/plain; charset=utf-8")
            .body(full("plain tëxt"))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], b64("plain tëxt".as_bytes()));
    assert_eq!(r.json()["content_type"], "text/plain; charset=utf-8");
    let binary = [0u8, 1, 2, 0x80, 0xff, 0];
    let r = send(
        Request::put(gw.url("/dev/echo"))
            .header("content-type", "image/png")
            .body(full(binary.to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["body"], b64(&binary));
    assert_eq!(r.json()["content_type"], "image/png");

    // And come back as they were.
    let r = get(&gw.url("/dev/text")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "héllo from the device");
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
    let r = get(&gw.url("/dev/binary")).await;
    assert_eq!(&r.body[..], &[0x89, 0x50, 0, 0xff, 0x10]);
    assert_eq!(r.headers["content-type"], "image/png");
    assert_eq!(r.headers["x-local"], "yes");

    // Several at once.
    let many: Vec<_> = (0..8)
        .map(|i| {
            let url = gw.url(&format!("/dev/echo?n={i}"));
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for (i, r) in many.into_iter().enumerate() {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["query"], format!("n={i}"));
    }
}

#[tokio::test]
async fn serve_http_reaches_the_device_peer_through_the_relay() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(&ca).await;
    let service = local_service().await;
    let url = tunnel_url(&gw, "dev-1");
    let manager = Peer::start(
        &url,
        &ca,
        &ca.client("manager", "Micronets Manager"),
        &[
            "--serve-http",
            "127.0.0.1:0",
            "--peer-class",
            "micronets-ws-test-client",
        ],
    );
    let addr = manager.http_addr().await;
    manager.logged("tunnel connected", 1).await;
    let device = Peer::start(
        &url,
        &ca,
        &ca.client("dev-1", "Micronets DHCP"),
        &["--forward-to", &format!("http://{}", service.addr)],
    );
    device.logged("tunnel connected", 1).await;
    wait_until(Duration::from_secs(10), "both peers joined", || async {
        peers_on(&gw, "dev-1").await == 2
    })
    .await;
    // The manager heard the device's CONN:HELLO (its own went out before
    // anyone else was there).
    let hello = manager.logged("a peer said hello", 1).await;
    assert_eq!(hello["peer_class"], "tollgate-tunnel-client");

    let r = send(
        Request::post(format!(
            "http://{addr}/micronets/v1/dhcp/subnets?a=1%202&b=x%26y"
        ))
        .header("content-type", "application/json")
        .header("x-test", "via serve-http")
        .body(full(r#"{"subnetId":"s1"}"#))
        .unwrap(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.headers["x-local"], "yes");
    assert_eq!(r.headers["content-type"], "application/json");
    let seen = r.json();
    assert_eq!(seen["path"], "/micronets/v1/dhcp/subnets");
    assert_eq!(seen["query"], "a=1+2&b=x%26y");
    assert_eq!(seen["x_test"], "via serve-http");
    assert_eq!(seen["body"], b64(br#"{"subnetId":"s1"}"#));
    let r = get(&format!("http://{addr}/binary")).await;
    assert_eq!(&r.body[..], &[0x89, 0x50, 0, 0xff, 0x10]);
    let r = get(&format!("http://{addr}/text")).await;
    assert_eq!(r.text(), "héllo from the device");
    // As the seed's README does it, with curl.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-H", "Content-Type: application/json"])
        .arg(format!("http://{addr}/micronets/v1/dhcp/subnets"))
        .output()
        .await
        .expect("curl runs (.ci/run installs it)");
    assert!(out.status.success(), "{out:?}");
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["path"], "/micronets/v1/dhcp/subnets");
    assert_eq!(seen["method"], "GET");

    // The device's connection drops while a request waits for it: the
    // relay closes the manager's end too (closes propagate), the waiting
    // caller gets a 502 at once, and the manager reconnects.
    let hits = service.hits();
    let waiting = tokio::spawn(async move { get(&format!("http://{addr}/slow")).await });
    wait_until(
        Duration::from_secs(10),
        "the request reached the service",
        || std::future::ready(service.hits() > hits),
    )
    .await;
    drop(device);
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("lost"), "{}", r.text());
    manager.logged("tunnel disconnected", 1).await;
    manager.logged("tunnel connected", 2).await;
}

#[tokio::test]
async fn sigterm_says_going_away_and_exits_0() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(&ca).await;
    // A raw peer on the id sees what the client sends.
    let mut watcher = raw_peer(&gw, &ca, "watcher").await;
    let mut device = Peer::start(
        &tunnel_url(&gw, "dev-1"),
        &ca,
        &ca.client("dev-1", "d"),
        &["--forward-to", "http://127.0.0.1:9", "--peer-id", "gw-0001"],
    );
    let hello = next_json(&mut watcher).await;
    assert_eq!(hello["message"]["messageType"], "CONN:HELLO");
    assert_eq!(hello["message"]["requiresResponse"], false);
    assert_eq!(hello["message"]["peerClass"], "tollgate-tunnel-client");
    assert_eq!(hello["message"]["peerId"], "gw-0001");
    wait_until(Duration::from_secs(10), "both on the id", || async {
        peers_on(&gw, "dev-1").await == 2
    })
    .await;

    let status = device.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    // The client's own close, passed on by the relay: not a dropped
    // connection.
    loop {
        match next(&mut watcher).await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Away);
                assert_eq!(f.reason.as_str(), "going away");
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected the client's close, got {other:?}"),
        }
    }
    wait_until(
        Duration::from_secs(10),
        "the gateway saw the peer leave",
        || async { peers_on(&gw, "dev-1").await == 0 },
    )
    .await;
    assert_eq!(device.lines("tunnel client stopped").len(), 1);
}

#[tokio::test]
async fn what_it_cannot_use_is_ignored_and_answers_name_the_request_as_it_was_sent() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(&ca).await;
    let service = local_service().await;
    let mut asker = raw_peer(&gw, &ca, "asker").await;
    let device = Peer::start_with_log(
        &tunnel_url(&gw, "dev-1"),
        &ca,
        &ca.client("dev-1", "d"),
        &["--forward-to", &format!("http://{}", service.addr)],
        "info,tollgate=debug",
    );
    assert_eq!(
        next_json(&mut asker).await["message"]["messageType"],
        "CONN:HELLO"
    );
    for junk in [
        Message::Text("not json".into()),
        Message::Binary(Bytes::from_static(b"\x00\xff")),
        Message::Text(r#"{"message": {"messageType": "REST:REQUEST", "requiresResponse": true}}"#.into()),
        Message::Text(r#"{"message": {"messageType": "REST:RESPONSE", "requiresResponse": false, "inResponseTo": 1, "statusCode": 200}}"#.into()),
        Message::Text(r#"{"message": {"messageType": "EVENT:lease", "requiresResponse": false, "messageBody": "x"}}"#.into()),
    ] {
        use futures_util::SinkExt;
        asker.send(junk).await.unwrap();
    }
    // A request with an unusable body is answered 400; a string id and a
    // number id come back as they were sent.
    let request = |id: Value, extra: Value| {
        let mut m = json!({"messageId": id, "messageType": "REST:REQUEST", "requiresResponse": true,
            "method": "POST", "path": "/echo", "headers": [{"name": "X-Test", "value": "raw"}],
            "queryStrings": [{"name": "q", "value": "a b"}]});
        m.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Message::Text(json!({ "message": m }).to_string().into())
    };
    use futures_util::SinkExt;
    asker
        .send(request(
            json!("bad-1"),
            json!({"dataFormat": "application/octet-stream", "messageBody": "%%%"}),
        ))
        .await
        .unwrap();
    let bad = next_json(&mut asker).await;
    assert_eq!(bad["message"]["inResponseTo"], "bad-1");
    assert_eq!(bad["message"]["statusCode"], 400);
    asker
        .send(request(
            json!("m-7"),
            json!({"dataFormat": "text/plain", "messageBody": "body-marker-xyz"}),
        ))
        .await
        .unwrap();
    asker
        .send(request(
            json!(42),
            json!({"dataFormat": "application/json", "messageBody": {"k": [1, 2]}}),
        ))
        .await
        .unwrap();
    let mut answers = [next_json(&mut asker).await, next_json(&mut asker).await];
    answers.sort_by_key(|a| a["message"]["inResponseTo"].is_number());
    let [text, json_answer] = answers;
    assert_eq!(text["message"]["inResponseTo"], "m-7");
    assert_eq!(json_answer["message"]["inResponseTo"], 42);
    for a in [&text, &json_answer] {
        assert_eq!(a["message"]["messageType"], "REST:RESPONSE");
        assert_eq!(a["message"]["requiresResponse"], false);
        assert_eq!(a["message"]["statusCode"], 201);
        assert_eq!(a["message"]["dataFormat"], "application/json");
        assert_eq!(a["message"]["messageBody"]["query"], "q=a+b");
        assert_eq!(a["message"]["messageBody"]["x_test"], "raw");
    }
    assert_ne!(
        text["message"]["messageId"],
        json_answer["message"]["messageId"]
    );
    assert_eq!(
        text["message"]["messageBody"]["body"],
        b64(b"body-marker-xyz")
    );
    assert_eq!(
        json_answer["message"]["messageBody"]["body"],
        b64(br#"{"k":[1,2]}"#)
    );
    // Still the first connection, and no body in the logs.
    assert_eq!(device.lines("tunnel connected").len(), 1);
    assert_eq!(device.lines("tunnel disconnected").len(), 0);
    device.logged("forwarded a request", 2).await;
    let logs = device.logs.lock().unwrap().clone();
    assert!(
        logs.iter().all(|l| !l.to_string().contains("body-marker")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn a_local_service_that_is_down_is_a_502() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(&ca).await;
    let down = closed_port().await;
    let device = Peer::start(
        &tunnel_url(&gw, "dev-1"),
        &ca,
        &ca.client("dev-1", "d"),
        &["--forward-to", &format!("http://{down}")],
    );
    device.logged("tunnel connected", 1).await;
    wait_until(Duration::from_secs(10), "the device joined", || async {
        peers_on(&gw, "dev-1").await == 1
    })
    .await;
    let r = get(&gw.url("/dev/subnets")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("cannot be reached"), "{}", r.text());
    // The device stays connected and answers the next one too.
    let r = get(&gw.url("/dev/again")).await;
    assert_eq!(r.status, 502);
    assert_eq!(device.lines("tunnel disconnected").len(), 0);
}

#[tokio::test]
async fn a_refused_certificate_is_logged_and_retried() {
    let ca = TestCa::new("Micronets");
    let stranger = TestCa::new("Elsewhere");
    let gw = gateway(&ca).await;
    // The stranger's client certificate, trusting the right CA for the server.
    let me = stranger.client("dev-1", "d");
    let mut child = Peer::start(
        &tunnel_url(&gw, "dev-1"),
        &ca,
        &me,
        &["--serve-http", "127.0.0.1:0"],
    );
    let addr = child.http_addr().await;
    let failure = child.logged("cannot connect to the tunnel relay", 2).await;
    assert!(
        failure["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{failure}"
    );
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "it keeps retrying"
    );
    assert_eq!(child.lines("tunnel connected").len(), 0);
    assert!(!child.lines("reconnecting").is_empty());
    // Meanwhile its HTTP server says the tunnel is not there.
    let r = get(&format!("http://{addr}/x")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(peers_on(&gw, "dev-1").await, 0);
    assert!(child.terminate().await.success());
}

#[tokio::test]
async fn a_refused_join_is_logged_with_its_status_and_retried_until_there_is_room() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(&ca).await;
    // The id holds two peers (max_peers' default): the client is the third.
    let first = raw_peer(&gw, &ca, "first").await;
    let _second = raw_peer(&gw, &ca, "second").await;
    let device = Peer::start(
        &tunnel_url(&gw, "dev-1"),
        &ca,
        &ca.client("dev-1", "d"),
        &["--forward-to", "http://127.0.0.1:9"],
    );
    let refused = device.logged("cannot connect to the tunnel relay", 2).await;
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("HTTP 409"), "{error}");
    // Room again (the pipe closes: the second goes with the first): a
    // later try gets in.
    drop(first);
    device.logged("tunnel connected", 1).await;
    wait_until(Duration::from_secs(10), "the device joined", || async {
        let status = get(&format!("http://{}/admin/tunnels", gw.gw.admin_addr()))
            .await
            .json();
        status[0]["ids"][0]["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["cert_cn"] == "dev-1"))
    })
    .await;
}

#[test]
fn bad_input_exits_2_naming_what_is_wrong() {
    let ca = TestCa::new("Micronets");
    let me = ca.client("dev-1", "d");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["tunnel", "connect"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (cert, key, pem) = (
        me.cert.to_str().unwrap(),
        me.key.to_str().unwrap(),
        ca.pem(),
    );
    let pem = pem.to_str().unwrap();
    let side = ["--forward-to", "http://127.0.0.1:9"];
    let url = "wss://127.0.0.1:9/micronets/v1/ws-proxy/dev-1";
    let cases: [(Vec<&str>, &str); 5] = [
        (
            [
                &[
                    url,
                    "--cert",
                    "/nonexistent/c.pem",
                    "--key",
                    key,
                    "--ca",
                    pem,
                ][..],
                &side,
            ]
            .concat(),
            "/nonexistent/c.pem",
        ),
        (
            [&[url, "--cert", cert, "--key", key, "--ca", key][..], &side].concat(),
            "--ca",
        ),
        (
            [&[url, "--cert", key, "--key", key, "--ca", pem][..], &side].concat(),
            "--cert",
        ),
        (
            [
                &[
                    "ws://127.0.0.1:9/t/x",
                    "--cert",
                    cert,
                    "--key",
                    key,
                    "--ca",
                    pem,
                ][..],
                &side,
            ]
            .concat(),
            "wss://",
        ),
        (
            [
                &[url, "--cert", cert, "--key", key, "--ca", pem][..],
                &["--forward-to", "https://x"],
            ]
            .concat(),
            "--forward-to",
        ),
    ];
    for (args, says) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
