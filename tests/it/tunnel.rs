//! The WebSocket tunnel relay over real mTLS: peers meeting on an id,
//! order, pings and closes, who may join, limits and slow peers, the
//! Micronets envelope, and HTTP requests carried to a peer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;
use crate::tls::{Identity, TestCa, client_config, https_listener};

const PREFIX: &str = "/micronets/v1/ws-proxy/";

type Peer = WebSocketStream<TlsStream<TcpStream>>;

/// A gateway with an mTLS listener `edge` (client certificates optional,
/// so a peer without one gets an HTTP answer), the sidecar, and `extra`
/// (tunnels:, routes:).
async fn gateway(ca: &TestCa, extra: &str) -> TestGateway {
    let server = ca.server("server", "localhost");
    let yaml = [
        "admin: { bind: 127.0.0.1:0 }\n",
        "listeners:\n",
        "  - name: sidecar\n    bind: 127.0.0.1:0\n",
        &https_listener(
            "edge",
            &server,
            &format!(", client_ca: {}, client_auth: optional", ca.pem().display()),
        ),
        extra,
    ]
    .concat();
    TestGateway::start(&yaml).await
}

/// Opens a peer on `id`; `Err` holds the refusal's status (0: the TLS
/// handshake failed).
async fn connect(
    addr: SocketAddr,
    ca: &Path,
    me: Option<&Identity>,
    id: &str,
) -> Result<Peer, u16> {
    connect_over(TcpStream::connect(addr).await.unwrap(), ca, me, id).await
}

/// Like [`connect`], over a given TCP connection.
async fn connect_over(
    tcp: TcpStream,
    ca: &Path,
    me: Option<&Identity>,
    id: &str,
) -> Result<Peer, u16> {
    let addr = tcp.peer_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, me, &[])));
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|_| 0u16)?;
    let url = format!("wss://localhost:{}{PREFIX}{id}", addr.port());
    match tokio_tungstenite::client_async(url, tls).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        // A TLS 1.3 client learns of a refused certificate on first read.
        Err(_) => Err(0),
    }
}

/// The next data or close message (pings and pongs skipped).
async fn next(ws: &mut Peer) -> Option<Message> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Some(m),
            _ => return None,
        }
    }
}

async fn next_json(ws: &mut Peer) -> Value {
    match next(ws).await {
        Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Reads on after a close: the connection must end without an error
/// (a TLS connection cut without close_notify is one).
async fn end_cleanly(ws: &mut Peer) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the relay ends the connection")
        {
            None => return,
            Some(Ok(_)) => continue,
            Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => return,
            Some(Err(e)) => panic!("the connection did not end cleanly: {e}"),
        }
    }
}

/// Whether nothing arrives for a moment.
async fn quiet(ws: &mut Peer) -> bool {
    tokio::time::timeout(Duration::from_millis(300), ws.next())
        .await
        .is_err()
}

async fn tunnels(gw: &TestGateway) -> Value {
    get(&format!("http://{}/admin/tunnels", gw.gw.admin_addr()))
        .await
        .json()
}

/// A peer on `id` with a certificate of its own (CN `name`, O `org`).
async fn peer(addr: SocketAddr, ca: &TestCa, name: &str, org: &str, id: &str) -> Peer {
    connect(addr, &ca.pem(), Some(&ca.client(name, org)), id)
        .await
        .unwrap()
}

/// Waits until `n` peers are on `id`.
async fn joined(gw: &TestGateway, id: &str, n: usize) {
    wait_until(
        Duration::from_secs(5),
        &format!("{n} peers on {id}"),
        || async { peers_on(&tunnels(gw).await, id) == n },
    )
    .await;
}

/// Peers on `id` (under any prefix).
fn peers_on(status: &Value, id: &str) -> usize {
    status
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|relay| relay["ids"].as_array().unwrap())
        .find(|r| r["id"] == id)
        .map_or(0, |r| r["peers"].as_array().unwrap().len())
}

#[tokio::test]
async fn two_peers_relay_text_and_binary_in_order_and_closes_propagate() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(&ca, "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n").await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let manager = ca.client("manager", "Micronets Manager");
    let dhcp = ca.client("dhcp", "Micronets DHCP");
    let mut a = connect(addr, &ca.pem(), Some(&manager), "dhcp-0001")
        .await
        .unwrap();
    let mut b = connect(addr, &ca.pem(), Some(&dhcp), "dhcp-0001")
        .await
        .unwrap();
    joined(&gw, "dhcp-0001", 2).await;
    // A peer on another id hears nothing.
    let mut elsewhere = connect(addr, &ca.pem(), Some(&dhcp), "dhcp-0002")
        .await
        .unwrap();

    for i in 0..200u32 {
        let m = if i % 2 == 0 {
            Message::Text(format!("text {i}").into())
        } else {
            Message::Binary(Bytes::from(i.to_be_bytes().to_vec()))
        };
        a.feed(m).await.unwrap();
    }
    a.flush().await.unwrap();
    for i in 0..200u32 {
        let expected = if i % 2 == 0 {
            Message::Text(format!("text {i}").into())
        } else {
            Message::Binary(Bytes::from(i.to_be_bytes().to_vec()))
        };
        assert_eq!(next(&mut b).await, Some(expected), "message {i}");
    }
    b.send(Message::Text("back".into())).await.unwrap();
    assert_eq!(next(&mut a).await, Some(Message::Text("back".into())));
    assert!(quiet(&mut elsewhere).await);

    // Pings are answered by the relay itself.
    a.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    assert!(quiet(&mut b).await, "pings are not relayed");

    // A close goes on to the other peer, code and reason.
    a.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "manager done".into(),
    }))
    .await
    .unwrap();
    match next(&mut b).await {
        Some(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Normal);
            assert_eq!(f.reason.as_str(), "manager done");
        }
        other => panic!("expected the close, got {other:?}"),
    }
    // The relay ends the connection properly: TLS close_notify, no
    // truncation.
    end_cleanly(&mut b).await;
    end_cleanly(&mut a).await;
    joined(&gw, "dhcp-0001", 0).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_tunnel_messages_total{prefix=\"/micronets/v1/ws-proxy/\"}"
        ),
        201.0
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_tunnel_joins_total{prefix=\"/micronets/v1/ws-proxy/\",result=\"joined\"}"
        ),
        3.0
    );
}

#[tokio::test]
async fn a_dropped_connection_closes_the_pipe_unless_told_otherwise() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        "tunnels:\n  - prefix: /pipe/\n  - prefix: /micronets/v1/ws-proxy/\n    close_propagates: false\n",
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let one = ca.client("one", "o");
    let two = ca.client("two", "o");
    // Kept open: the other peer stays when one goes.
    let a = connect(addr, &ca.pem(), Some(&one), "kept").await.unwrap();
    let mut b = connect(addr, &ca.pem(), Some(&two), "kept").await.unwrap();
    joined(&gw, "kept", 2).await;
    drop(a);
    joined(&gw, "kept", 1).await;
    assert!(quiet(&mut b).await, "b stays connected");

    // A pipe: a connection dropped without a close closes the other end.
    let a = connect_at(addr, &ca.pem(), &one, "/pipe/p").await;
    let mut b = connect_at(addr, &ca.pem(), &two, "/pipe/p").await;
    joined(&gw, "p", 2).await;
    drop(a);
    match next(&mut b).await {
        Some(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Away);
            assert!(f.reason.contains("lost"), "{}", f.reason);
        }
        other => panic!("expected the pipe to close, got {other:?}"),
    }
}

async fn connect_at(addr: SocketAddr, ca: &Path, me: &Identity, path: &str) -> Peer {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, Some(me), &[])));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}{path}", addr.port());
    tokio_tungstenite::client_async(url, tls).await.unwrap().0
}

#[tokio::test]
async fn who_may_join_and_how_many() {
    let ca = TestCa::new("Micronets");
    let other_ca = TestCa::new("Elsewhere");
    let gw = gateway(
        &ca,
        &[
            "tunnels:\n",
            "  - prefix: /micronets/v1/ws-proxy/\n",
            "    policy:\n",
            "      - allow: { cert: { o: Micronets Manager }, actions: [join], paths: ['*'] }\n",
            "      - allow: { actions: [join], paths: ['{sub}'] }\n",
        ]
        .concat(),
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let manager = ca.client("manager", "Micronets Manager");
    let dev1 = ca.client("dev-1", "Devices");
    let dev2 = ca.client("dev-2", "Devices");
    let stranger = other_ca.client("dev-1", "Devices");

    // No certificate, another CA's certificate, another device's id.
    assert_eq!(
        connect(addr, &ca.pem(), None, "dev-1").await.err(),
        Some(403)
    );
    assert!(
        matches!(
            connect(addr, &ca.pem(), Some(&stranger), "dev-1").await,
            Err(0)
        ),
        "a foreign CA's certificate fails the TLS handshake"
    );
    assert_eq!(
        connect(addr, &ca.pem(), Some(&dev2), "dev-1").await.err(),
        Some(403)
    );
    // A path that is no tunnel id is no tunnel.
    assert_eq!(
        connect(addr, &ca.pem(), Some(&dev1), "dev-1/x").await.err(),
        Some(404)
    );

    let mut own = connect(addr, &ca.pem(), Some(&dev1), "dev-1")
        .await
        .unwrap();
    let mut m = connect(addr, &ca.pem(), Some(&manager), "dev-1")
        .await
        .unwrap();
    joined(&gw, "dev-1", 2).await;
    // Full: a third certificate is refused...
    let third = ca.client("ops", "Micronets Manager");
    assert_eq!(
        connect(addr, &ca.pem(), Some(&third), "dev-1").await.err(),
        Some(409)
    );
    // ...but the same certificate again replaces its earlier connection
    // (a device reconnecting before its old connection timed out).
    let mut again = connect(addr, &ca.pem(), Some(&dev1), "dev-1")
        .await
        .unwrap();
    match next(&mut own).await {
        Some(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Policy);
            assert!(f.reason.contains("replaced"), "{}", f.reason);
        }
        other => panic!("expected the replaced peer to be closed, got {other:?}"),
    }
    again.send(Message::Text("new".into())).await.unwrap();
    assert_eq!(next(&mut m).await, Some(Message::Text("new".into())));

    let metrics = gw.metrics().await;
    let p = "tollgate_tunnel_joins_total{prefix=\"/micronets/v1/ws-proxy/\",result=";
    assert_eq!(metric(&metrics, &format!("{p}\"denied\"}}")), 2.0);
    assert_eq!(metric(&metrics, &format!("{p}\"full\"}}")), 1.0);
    assert_eq!(metric(&metrics, &format!("{p}\"replaced\"}}")), 1.0);

    // A reload whose policy no longer lets the manager in ends it.
    std::fs::write(
        &gw.path,
        std::fs::read_to_string(&gw.path)
            .unwrap()
            .replace("o: Micronets Manager", "o: Nobody"),
    )
    .unwrap();
    let r = send(
        Request::post(format!("http://{}/admin/reload", gw.gw.admin_addr()))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    match next(&mut m).await {
        Some(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Policy),
        other => panic!("expected the manager to be closed, got {other:?}"),
    }
}

#[tokio::test]
async fn limits_oversize_messages_and_slow_peers() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        &[
            "tunnels:\n",
            "  - prefix: /micronets/v1/ws-proxy/\n",
            "    max_peers: 3\n",
            "    max_message: 2KiB\n",
            "    queue: 8KiB\n",
            "    stall_timeout: 300ms\n",
        ]
        .concat(),
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let a_id = ca.client("a", "o");
    let b_id = ca.client("b", "o");
    let c_id = ca.client("c", "o");

    // Too large: the sender is closed with 1009, the other peer hears nothing.
    let mut a = connect(addr, &ca.pem(), Some(&a_id), "lim").await.unwrap();
    let mut b = connect(addr, &ca.pem(), Some(&b_id), "lim").await.unwrap();
    a.send(Message::Binary(Bytes::from(vec![7u8; 4096])))
        .await
        .unwrap();
    match next(&mut a).await {
        Some(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Size),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    assert!(quiet(&mut b).await);
    drop(b);

    // A peer that stops reading: its queue fills, the sender waits, and
    // after stall_timeout the slow peer is put out; the sender carries on.
    let mut fast = connect(addr, &ca.pem(), Some(&a_id), "slow").await.unwrap();
    // With a small receive window, so the kernel holds little for it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8192).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let slow = connect_over(tcp, &ca.pem(), Some(&b_id), "slow")
        .await
        .unwrap();
    joined(&gw, "slow", 2).await;
    let chunk = Bytes::from(vec![1u8; 2000]);
    let sent = async {
        loop {
            for _ in 0..100 {
                if fast.send(Message::Binary(chunk.clone())).await.is_err() {
                    return;
                }
            }
            if peers_on(&tunnels(&gw).await, "slow") < 2 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), sent)
        .await
        .expect("the slow peer is put out and the sender is never stuck for good");
    assert_eq!(peers_on(&tunnels(&gw).await, "slow"), 1);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_tunnel_slow_peers_total{prefix=\"/micronets/v1/ws-proxy/\"}"
        ),
        1.0
    );
    drop(slow);
    // The sender is still served: a new peer hears it.
    let mut c = connect(addr, &ca.pem(), Some(&c_id), "slow").await.unwrap();
    joined(&gw, "slow", 2).await;
    fast.send(Message::Text("after".into())).await.unwrap();
    // (What the relay had not read of the burst yet may come first.)
    let mut got = next(&mut c).await;
    while let Some(Message::Binary(_)) = got {
        got = next(&mut c).await;
    }
    assert_eq!(got, Some(Message::Text("after".into())));
}

#[tokio::test]
async fn the_micronets_envelope_is_checked_and_answers_go_to_the_asker() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n    envelope: micronets\n    max_peers: 3\n",
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let mut manager = peer(addr, &ca, "m", "o", "gw-7").await;
    let mut dhcp = peer(addr, &ca, "d", "o", "gw-7").await;
    let mut logger = peer(addr, &ca, "l", "o", "gw-7").await;

    joined(&gw, "gw-7", 3).await;
    // Malformed: answered to the sender, relayed to nobody.
    for (bad, says) in [
        (Message::Text("not json".into()), "not JSON"),
        (
            Message::Text(r#"{"message": {"messageId": 9, "requiresResponse": false}}"#.into()),
            "messageType",
        ),
        (Message::Binary(Bytes::from_static(b"\x00\x01")), "binary"),
    ] {
        manager.send(bad).await.unwrap();
        let e = next_json(&mut manager).await;
        assert_eq!(e["message"]["messageType"], "ERROR:MALFORMED");
        assert_eq!(e["message"]["statusCode"], 400);
        let why = e["message"]["reasonPhrase"].as_str().unwrap();
        assert!(why.contains(says), "{why} should say {says}");
    }
    assert!(quiet(&mut dhcp).await);

    let hello = json!({"message": {"messageId": 0, "messageType": "CONN:HELLO",
        "requiresResponse": false, "peerClass": "micronets-dhcp-service", "peerId": "12345678"}});
    dhcp.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut manager).await, hello);
    assert_eq!(next_json(&mut logger).await, hello);
    let status = tunnels(&gw).await;
    let peers = status[0]["ids"][0]["peers"].as_array().unwrap();
    assert!(
        peers
            .iter()
            .any(|p| p["peer_class"] == "micronets-dhcp-service" && p["peer_id"] == "12345678"),
        "{status}"
    );

    // A request reaches every other peer; its response only the asker.
    let request = json!({"message": {"messageId": 3, "messageType": "REST:REQUEST",
        "requiresResponse": true, "method": "GET", "path": "/micronets/v1/dhcp/subnets"}});
    manager
        .send(Message::Text(request.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut dhcp).await, request);
    assert_eq!(next_json(&mut logger).await, request);
    let response = json!({"message": {"messageId": 2, "inResponseTo": 3,
        "messageType": "REST:RESPONSE", "requiresResponse": false, "statusCode": 200,
        "dataFormat": "application/json", "messageBody": {"subnets": []}}});
    dhcp.send(Message::Text(response.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut manager).await, response);
    assert!(
        quiet(&mut logger).await,
        "the response went to the asker only"
    );
    // Two peers asking with the same id: the answer cannot be told apart,
    // so it goes to every other peer, as an untracked message would.
    let ask = json!({"message": {"messageId": 5, "messageType": "REST:REQUEST",
        "requiresResponse": true, "method": "GET", "path": "/x"}});
    for asker in [&mut manager, &mut logger] {
        asker
            .send(Message::Text(ask.to_string().into()))
            .await
            .unwrap();
        assert_eq!(next_json(&mut dhcp).await, ask);
    }
    assert_eq!(next_json(&mut logger).await, ask);
    assert_eq!(next_json(&mut manager).await, ask);
    let answer = json!({"message": {"messageId": 6, "inResponseTo": 5,
        "messageType": "REST:RESPONSE", "requiresResponse": false, "statusCode": 204}});
    dhcp.send(Message::Text(answer.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut manager).await, answer);
    assert_eq!(next_json(&mut logger).await, answer);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_tunnel_malformed_total{prefix=\"/micronets/v1/ws-proxy/\"}"
        ),
        3.0
    );
}

/// A device peer answering REST:REQUESTs as `answer` says.
fn device<F>(mut ws: Peer, answer: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(&Value) -> Option<Value> + Send + 'static,
{
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["message"]["messageType"] != "REST:REQUEST" {
                continue;
            }
            match answer(&v["message"]) {
                Some(reply) => ws
                    .send(Message::Text(reply.to_string().into()))
                    .await
                    .unwrap(),
                // Leaves mid-request.
                None => return,
            }
        }
    })
}

#[tokio::test]
async fn http_requests_are_carried_to_the_peer_and_answered() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        &[
            "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n",
            "routes:\n",
            "  - name: dhcp\n    match: { path_prefix: /dhcp/ }\n    rewrite_prefix: /micronets/v1/dhcp/\n",
            "    upstream: { tunnel: dev-1, timeout: 2s }\n",
            "  - name: guarded\n    match: { path_prefix: /guarded/ }\n    auth: mtls\n",
            "    upstream: { tunnel: /micronets/v1/ws-proxy/dev-1 }\n",
        ]
        .concat(),
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let url = |p: &str| gw.url(p);

    // Nobody on the tunnel yet.
    let r = get(&url("/dhcp/subnets")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "tunnel_no_peer");

    let ws = peer(addr, &ca, "dev-1", "d", "dev-1").await;
    let _dev = device(ws, |m| {
        let path = m["path"].as_str().unwrap();
        let id = m["messageId"].clone();
        let base = |status: u16, format: &str, body: Value| {
            json!({"message": {"messageId": 100, "inResponseTo": id, "messageType": "REST:RESPONSE",
                "requiresResponse": false, "statusCode": status, "dataFormat": format,
                "messageBody": body, "headers": [{"name": "X-Device", "value": "dev-1"},
                {"name": "Connection", "value": "x-secret"}, {"name": "X-Secret", "value": "s"}]}})
        };
        match path {
            "/micronets/v1/dhcp/echo" => Some(base(201, "application/json", m.clone())),
            "/micronets/v1/dhcp/text" => Some(base(200, "text/plain", json!("plain text"))),
            "/micronets/v1/dhcp/binary" => {
                Some(base(200, "application/octet-stream", json!("AAEC/w==")))
            }
            "/micronets/v1/dhcp/garbage" => Some(base(99, "text/plain", json!("x"))),
            "/micronets/v1/dhcp/slow" => Some(json!({"message": {"messageType": "EVENT:x",
                "requiresResponse": false}})),
            _ => None,
        }
    });

    joined(&gw, "dev-1", 1).await;
    // JSON body, query strings and headers arrive; the answer comes back.
    let r = send(
        Request::post(url("/dhcp/echo?subnet=a%20b&x=1&x=2"))
            .header("content-type", "application/json")
            .header("x-trace", "t-1")
            .body(full(r#"{"subnetId": "mocksubnet007"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-device"], "dev-1");
    assert!(
        !r.headers.contains_key("x-secret"),
        "Connection-named fields are dropped"
    );
    let seen = r.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/micronets/v1/dhcp/echo");
    assert_eq!(
        seen["queryStrings"],
        json!([{"name": "subnet", "value": "a b"}, {"name": "x", "value": "1"}, {"name": "x", "value": "2"}])
    );
    assert_eq!(seen["dataFormat"], "application/json");
    assert_eq!(seen["messageBody"], json!({"subnetId": "mocksubnet007"}));
    let headers: Vec<(String, String)> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_ascii_lowercase(),
                h["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(headers.contains(&("x-trace".into(), "t-1".into())));
    assert!(headers.iter().any(|(n, _)| n == "x-request-id"));
    assert!(headers.iter().any(|(n, _)| n == "x-forwarded-for"));
    assert!(
        !headers
            .iter()
            .any(|(n, _)| n == "content-length" || n == "content-type")
    );

    // Binary in, text and binary out.
    let r = send(
        Request::put(url("/dhcp/echo"))
            .header("content-type", "image/png")
            .body(full(vec![0u8, 1, 2, 255]))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["dataFormat"], "application/octet-stream");
    assert_eq!(r.json()["messageBody"], "AAEC/w==");
    let r = get(&url("/dhcp/text")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "plain text");
    assert_eq!(r.headers["content-type"], "text/plain");
    let r = get(&url("/dhcp/binary")).await;
    assert_eq!(&r.body[..], &[0u8, 1, 2, 255]);

    // Unusable answer, no answer in time, the route's auth.
    let r = get(&url("/dhcp/garbage")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let r = get(&url("/dhcp/slow")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    let r = get(&url("/guarded/x")).await;
    assert_eq!(r.status, 401);

    // The peer leaves mid-request: 502 at once, not a hang.
    let r = tokio::time::timeout(Duration::from_secs(1), get(&url("/dhcp/leave")))
        .await
        .expect("an answer before the 2 s timeout");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "tunnel_peer_left");

    let m = gw.metrics().await;
    let p = "tollgate_tunnel_http_requests_total{prefix=\"/micronets/v1/ws-proxy/\",result=";
    assert_eq!(metric(&m, &format!("{p}\"answered\"}}")), 4.0);
    assert_eq!(metric(&m, &format!("{p}\"no_peer\"}}")), 1.0);
    assert_eq!(metric(&m, &format!("{p}\"timeout\"}}")), 1.0);
    assert_eq!(metric(&m, &format!("{p}\"peer_left\"}}")), 1.0);
    assert_eq!(metric(&m, &format!("{p}\"bad_answer\"}}")), 1.0);
}

#[tokio::test]
async fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let check = |yaml: &str| {
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, yaml).unwrap();
        tollgate::config::load(&path).unwrap_err().to_string()
    };
    let e = check("tunnels:\n  - prefix: /t/\n");
    assert!(
        e.contains("tunnels[0].listeners") && e.contains("client certificates"),
        "{e}"
    );
    let e = check("tunnels:\n  - prefix: t\n    listeners: [sidecar]\n");
    assert!(e.contains("tunnels[0].prefix"), "{e}");
    assert!(e.contains("tunnels[0].listeners[0]"), "{e}");
    let e = check(
        "routes:\n  - name: r\n    match: { path_prefix: /r/ }\n    upstream: { tunnel: dev-1, targets: [http://127.0.0.1:1] }\n",
    );
    assert!(e.contains("routes[0].upstream.targets"), "{e}");
    assert!(e.contains("routes[0].upstream.tunnel"), "{e}");
}

#[tokio::test]
async fn quiet_peers_are_pinged_and_silent_ones_closed() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n    ping_interval: 1s\n    idle_timeout: 2s\n    stall_timeout: 1s\n",
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let mut awake = peer(addr, &ca, "a", "o", "idle").await;
    let mut asleep = peer(addr, &ca, "b", "o", "idle").await;
    // One reads (and so answers the relay's pings); the other does not.
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, awake.next()).await {
            if let Message::Ping(_) = m {
                pings += 1;
            }
        }
        (pings, awake)
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (pings, _awake) = reader.await.unwrap();
    assert!(pings >= 2, "pinged {pings} times");
    // The sleeper's next messages: pings it never answered, then the close.
    let mut got = next(&mut asleep).await;
    while let Some(Message::Binary(_) | Message::Text(_)) = got {
        got = next(&mut asleep).await;
    }
    match got {
        Some(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Away);
            assert!(f.reason.contains("idle"), "{}", f.reason);
        }
        other => panic!("expected the idle close, got {other:?}"),
    }
    assert_eq!(peers_on(&tunnels(&gw).await, "idle"), 1);
}

#[tokio::test]
async fn only_a_peer_the_request_went_to_answers_it_and_late_answers_go_nowhere() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        &[
            "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n    max_peers: 3\n",
            "routes:\n",
            "  - name: dev\n    match: { path_prefix: /dev/ }\n",
            "    upstream: { tunnel: dev-9, timeout: 10s }\n",
        ]
        .concat(),
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let mut device = peer(addr, &ca, "dev-9", "d", "dev-9").await;
    joined(&gw, "dev-9", 1).await;
    let url = gw.url("/dev/x");
    let waiting = tokio::spawn(async move { get(&url).await });
    let request = next_json(&mut device).await;
    let id = request["message"]["messageId"].clone();
    assert!(id.as_str().unwrap().starts_with("tollgate-"), "{id}");

    // A peer that joins afterwards never got the request: its "answer"
    // is not taken, and not relayed either.
    let mut intruder = peer(addr, &ca, "x", "d", "dev-9").await;
    joined(&gw, "dev-9", 2).await;
    let answer = |status: u16, body: &str| {
        json!({"message": {"messageId": 1, "inResponseTo": id, "messageType": "REST:RESPONSE",
            "requiresResponse": false, "statusCode": status, "dataFormat": "text/plain",
            "messageBody": body}})
        .to_string()
    };
    intruder
        .send(Message::Text(answer(200, "spoofed").into()))
        .await
        .unwrap();
    assert!(
        quiet(&mut device).await,
        "an answer to the gateway is nobody else's"
    );
    assert!(!waiting.is_finished());
    device
        .send(Message::Text(answer(201, "real").into()))
        .await
        .unwrap();
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "real");
    // Sent again, late: dropped, not relayed.
    device
        .send(Message::Text(answer(201, "again").into()))
        .await
        .unwrap();
    assert!(quiet(&mut intruder).await);
}

#[tokio::test]
async fn a_peer_whose_writes_stall_is_put_out_and_a_removed_tunnel_closes_its_peers() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        &[
            "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n",
            "    queue: 64MiB\n    stall_timeout: 500ms\n",
            "  - prefix: /other/\n",
        ]
        .concat(),
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let mut fast = peer(addr, &ca, "a", "o", "w").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8192).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let _asleep = connect_over(tcp, &ca.pem(), Some(&ca.client("b", "o")), "w")
        .await
        .unwrap();
    joined(&gw, "w", 2).await;
    // Its queue never fills (64 MiB), but writing to it stops moving.
    let chunk = Bytes::from(vec![2u8; 16 * 1024]);
    let sent = async {
        loop {
            for _ in 0..16 {
                if fast.send(Message::Binary(chunk.clone())).await.is_err() {
                    return;
                }
            }
            if peers_on(&tunnels(&gw).await, "w") < 2 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), sent)
        .await
        .expect("the stalled peer is put out");

    // A reload that removes a tunnel closes its peers (1001).
    let mut other = connect_at(addr, &ca.pem(), &ca.client("c", "o"), "/other/o").await;
    joined(&gw, "o", 1).await;
    std::fs::write(
        &gw.path,
        std::fs::read_to_string(&gw.path)
            .unwrap()
            .replace("  - prefix: /other/\n", ""),
    )
    .unwrap();
    let r = send(
        Request::post(format!("http://{}/admin/reload", gw.gw.admin_addr()))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    match next(&mut other).await {
        Some(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Away);
            assert!(f.reason.contains("no longer served"), "{}", f.reason);
        }
        other => panic!("expected the removed tunnel's close, got {other:?}"),
    }
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "tollgate_tunnel_peers{prefix=\"/other/\"}"), 0.0);
}

/// Another spelling of an id (an escaped unreserved character) is that
/// id, for the join policy too: the decision is on the canonical path.
#[tokio::test]
async fn another_spelling_of_an_id_is_that_id() {
    let ca = TestCa::new("Micronets");
    let gw = gateway(
        &ca,
        "tunnels:\n  - prefix: /micronets/v1/ws-proxy/\n    policy:\n      - allow: { actions: [join], paths: ['{sub}'] }\n",
    )
    .await;
    let addr = gw.gw.listener_addr("edge").unwrap();
    let dev1 = ca.client("dev-1", "Devices");
    let dev2 = ca.client("dev-2", "Devices");
    assert_eq!(
        connect(addr, &ca.pem(), Some(&dev2), "dev%2D1").await.err(),
        Some(403)
    );
    let _spelled = connect(addr, &ca.pem(), Some(&dev1), "dev%2D1")
        .await
        .unwrap();
    joined(&gw, "dev-1", 1).await;
}
