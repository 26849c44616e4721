//! The WAMP router over WebSocket, with clients that speak the wire
//! (tokio-tungstenite, JSON and MessagePack frames written by hand).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn router() -> TestGateway {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let yaml = [
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n",
        &format!(
            "auth:\n  users:\n    - {{ name: alice, password_hash: '{hash}', roles: [backend] }}\n"
        ),
        &format!("    - {{ name: bob, password_hash: '{hash}', roles: [frontend] }}\n"),
        "wamp:\n  websocket: { path: /ws }\n  auth: { ticket: {} }\n  realms:\n",
        "    - name: realm1\n      roles: &roles\n",
        "        - name: backend\n          permissions:\n",
        "            - allow: { actions: [register, publish], uris: ['com.example.**'] }\n",
        "        - name: frontend\n          permissions:\n",
        "            - allow: { actions: [call, subscribe], uris: ['com.example.**'] }\n",
        "    - name: realm2\n      roles: *roles\n",
    ]
    .concat();
    TestGateway::start(&yaml).await
}

/// A client of one serializer.
struct Client {
    ws: Ws,
    msgpack: bool,
}

impl Client {
    async fn open(gw: &TestGateway, msgpack: bool) -> Client {
        let mut req = format!("ws://{}/ws", gw.addr())
            .into_client_request()
            .unwrap();
        let proto = if msgpack {
            "wamp.2.msgpack"
        } else {
            "wamp.2.json"
        };
        req.headers_mut()
            .insert("sec-websocket-protocol", proto.parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], proto);
        Client { ws, msgpack }
    }

    async fn send(&mut self, m: Value) {
        let frame = if self.msgpack {
            Frame::binary(rmp_serde::to_vec(&m).unwrap())
        } else {
            Frame::text(m.to_string())
        };
        self.ws.send(frame).await.unwrap();
    }

    async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(5))
            .await
            .expect("a message within 5s")
    }

    async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        loop {
            let frame = tokio::time::timeout(within, self.ws.next())
                .await
                .ok()??
                .ok()?;
            return Some(match frame {
                Frame::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                Frame::Binary(b) => rmp_serde::from_slice(&b).unwrap(),
                Frame::Close(_) => return None,
                _ => continue,
            });
        }
    }

    /// HELLO with ticket authentication; the WELCOME or ABORT.
    async fn join(&mut self, realm: &str, authid: &str, ticket: &str) -> Value {
        self.send(json!([1, realm, {"roles": {"caller": {}, "callee": {}, "publisher": {}, "subscriber": {}},
            "authmethods": ["ticket"], "authid": authid}]))
            .await;
        let first = self.recv().await;
        if first[0] != 4 {
            return first;
        }
        assert_eq!(first[1], "ticket");
        self.send(json!([5, ticket, {}])).await;
        self.recv().await
    }
}

async fn joined(gw: &TestGateway, realm: &str, who: &str, msgpack: bool) -> Client {
    let mut c = Client::open(gw, msgpack).await;
    let welcome = c.join(realm, who, "pw").await;
    assert_eq!(welcome[0], 2, "{welcome}");
    assert_eq!(welcome[2]["authid"], who);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_events_between_serializers_within_a_realm() {
    let gw = router().await;
    let mut alice = joined(&gw, "realm1", "alice", false).await;
    let mut bob = joined(&gw, "realm1", "bob", true).await;

    alice.send(json!([64, 1, {}, "com.example.add"])).await;
    let registered = alice.recv().await;
    assert_eq!(
        (registered[0].clone(), registered[1].clone()),
        (json!(65), json!(1))
    );
    alice.send(json!([64, 2, {}, "com.example.add"])).await;
    assert_eq!(alice.recv().await[4], "wamp.error.procedure_already_exists");

    bob.send(json!([48, 7, {}, "com.example.add", [2, 3], {"k": "v"}]))
        .await;
    let inv = alice.recv().await;
    assert_eq!(inv[0], 68);
    assert_eq!(
        (inv[4].clone(), inv[5].clone()),
        (json!([2, 3]), json!({"k": "v"}))
    );
    alice.send(json!([70, inv[1], {}, [5]])).await;
    let result = bob.recv().await;
    assert_eq!(result, json!([50, 7, {}, [5]]));

    // An error from the callee reaches the caller.
    bob.send(json!([48, 8, {}, "com.example.add", ["x"]])).await;
    let inv = alice.recv().await;
    alice
        .send(json!([
            8,
            68,
            inv[1],
            {},
            "com.example.error.bad_argument",
            ["not a number"]
        ]))
        .await;
    assert_eq!(
        bob.recv().await,
        json!([
            8,
            48,
            8,
            {},
            "com.example.error.bad_argument",
            ["not a number"]
        ])
    );

    // Events, acknowledged; the publisher is left out.
    bob.send(json!([32, 9, {}, "com.example.news"])).await;
    let subscribed = bob.recv().await;
    assert_eq!(subscribed[0], 33);
    alice
        .send(json!([16, 10, {"acknowledge": true}, "com.example.news", ["hello"]]))
        .await;
    assert_eq!(alice.recv().await[0], 17);
    let event = bob.recv().await;
    assert_eq!(
        (event[0].clone(), event[1].clone(), event[4].clone()),
        (json!(36), subscribed[2].clone(), json!(["hello"]))
    );

    // The rules: bob may not register or publish; unknown procedures.
    bob.send(json!([64, 11, {}, "com.example.mine"])).await;
    assert_eq!(
        bob.recv().await.as_array().unwrap()[..5],
        json!([8, 64, 11, {}, "wamp.error.not_authorized"])
            .as_array()
            .unwrap()[..]
    );
    bob.send(json!([16, 12, {"acknowledge": true}, "com.example.news", []]))
        .await;
    assert_eq!(
        bob.recv().await.as_array().unwrap()[..5],
        json!([8, 16, 12, {}, "wamp.error.not_authorized"])
            .as_array()
            .unwrap()[..]
    );
    bob.send(json!([48, 13, {}, "com.example.missing"])).await;
    assert_eq!(
        bob.recv().await.as_array().unwrap()[..5],
        json!([8, 48, 13, {}, "wamp.error.no_such_procedure"])
            .as_array()
            .unwrap()[..]
    );

    // Realms are apart: realm2 sees neither the procedure nor the events.
    let mut other = joined(&gw, "realm2", "bob", false).await;
    other
        .send(json!([48, 1, {}, "com.example.add", [1, 1]]))
        .await;
    assert_eq!(other.recv().await[4], "wamp.error.no_such_procedure");

    // A callee that vanishes mid-call fails the call at once.
    bob.send(json!([48, 14, {}, "com.example.add", [1, 1]]))
        .await;
    assert_eq!(alice.recv().await[0], 68);
    drop(alice);
    let failed = bob.recv().await;
    assert_eq!(
        failed.as_array().unwrap()[..5],
        json!([8, 48, 14, {}, "wamp.error.canceled"])
            .as_array()
            .unwrap()[..]
    );
    // And the procedure is gone with it.
    bob.send(json!([48, 15, {}, "com.example.add", [1, 1]]))
        .await;
    assert_eq!(bob.recv().await[4], "wamp.error.no_such_procedure");

    // GOODBYE is answered.
    bob.send(json!([6, {}, "wamp.close.close_realm"])).await;
    assert_eq!(
        bob.recv().await,
        json!([6, {}, "wamp.close.goodbye_and_out"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_refused_with_a_reason_and_bad_messages_abort_only_their_session() {
    let gw = router().await;
    let mut c = Client::open(&gw, false).await;
    let abort = c.join("realm1", "alice", "wrong").await;
    assert_eq!(
        (abort[0].clone(), abort[2].clone()),
        (json!(3), json!("wamp.error.not_authorized"))
    );
    let mut c = Client::open(&gw, false).await;
    let abort = c.join("nowhere", "alice", "pw").await;
    assert_eq!(abort[2], "wamp.error.no_such_realm");
    let mut c = Client::open(&gw, false).await;
    c.send(json!([1, "realm1", {"roles": {}}])).await;
    assert_eq!(
        c.recv().await[2],
        "wamp.error.no_auth_method",
        "no anonymous sessions unless enabled"
    );

    let mut ok = joined(&gw, "realm1", "bob", false).await;
    let mut bad = joined(&gw, "realm1", "alice", false).await;
    bad.ws.send(Frame::text("[48, 1, {}]")).await.unwrap();
    let abort = bad.recv().await;
    assert_eq!(
        (abort[0].clone(), abort[2].clone()),
        (json!(3), json!("wamp.error.protocol_violation"))
    );
    ok.send(json!([48, 2, {}, "com.example.nothing"])).await;
    assert_eq!(
        ok.recv().await[4],
        "wamp.error.no_such_procedure",
        "the other session goes on"
    );

    // A message over the size limit (1 MiB) is refused with the reason.
    let mut big = joined(&gw, "realm1", "bob", false).await;
    let huge = format!(
        "[16, 1, {{}}, \"com.example.x\", [\"{}\"]]",
        "x".repeat(2 << 20)
    );
    // The router stops reading at the frame's header, so the send itself
    // may meet a reset; either way the session ends at once, never hangs.
    let _ = big.ws.send(Frame::text(huge)).await;
    if let Some(abort) = big.try_recv(Duration::from_secs(5)).await {
        assert_eq!(abort[0], 3);
        assert!(
            abort[1]["message"].as_str().unwrap().contains("limit"),
            "{abort}"
        );
    }
    let mut after = joined(&gw, "realm1", "bob", false).await;
    after.send(json!([48, 3, {}, "com.example.nothing"])).await;
    assert_eq!(after.recv().await[4], "wamp.error.no_such_procedure");

    // The wrong subprotocol is refused before any WAMP.
    let mut req = format!("ws://{}/ws", gw.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
}
