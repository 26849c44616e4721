//! The WAMP router's broker, dealer and meta API on a `protocol: wamp`
//! listener, with clients that write the wire by hand: RawSocket frames and
//! WebSocket messages on the one port, JSON and MessagePack. What a hostile
//! or careless client does (bad handshakes, unknown options, calls it
//! never waits for, a subscriber that stops reading) is here too.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Every client of these tests is a ticket user (password `pw`).
const USERS: &[&str] = &[
    "a", "b", "c", "caller", "callee", "listener", "pub", "x", "y", "watcher", "other", "third",
    "probe", "many", "slow", "fast", "bad", "o",
];

fn config(extra: &str) -> String {
    config_with(extra, "")
}

/// The gateway.yaml of these tests, with `extra` at the end of `wamp:` and
/// `auth_extra` at the end of `auth:`.
pub(crate) fn config_with(extra: &str, auth_extra: &str) -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hash = HASH.get_or_init(|| bcrypt::hash("pw", 4).unwrap());
    let users: String = USERS
        .iter()
        .map(|n| format!("    - {{ name: {n}, password_hash: '{hash}' }}\n"))
        .collect();
    [
        "auth:\n  users:\n",
        &users,
        auth_extra,
        "listeners:\n",
        "  - { name: sidecar, bind: 127.0.0.1:0 }\n",
        "  - { name: wamp, bind: 127.0.0.1:0, protocol: wamp }\n",
        "admin:\n  bind: 127.0.0.1:0\n",
        "wamp:\n",
        "  max_queued_messages: 64\n",
        "  max_pending_calls: 3\n",
        "  max_subscriptions: 20\n",
        "  max_registrations: 20\n",
        "  auth: { anonymous: { role: guest }, ticket: { role: guest } }\n",
        "  realms:\n",
        "    - name: realm1\n",
        "      roles:\n",
        "        - name: guest\n",
        "          permissions:\n",
        "            - deny: { uris: ['com.test.secret.**'] }\n",
        "            - allow: { uris: ['com.test.disclosed.**'] }\n",
        "              disclose: true\n",
        "            - allow: { uris: ['com.test.**'] }\n",
        "            - allow: { actions: [call], uris: ['wamp.session.*', 'wamp.registration.*', 'wamp.subscription.*'] }\n",
        "            - allow: { actions: [subscribe], uris: ['wamp.session.*', 'wamp.registration.*', 'wamp.subscription.*'] }\n",
        "    - name: realm2\n",
        "      roles:\n",
        "        - name: guest\n",
        "          permissions:\n",
        "            - allow: { uris: ['com.test.**'] }\n",
        extra,
    ]
    .concat()
}

async fn router() -> (TestGateway, std::net::SocketAddr) {
    let gw = TestGateway::start(&config("")).await;
    let addr = gw.gw.listener_addr("wamp").expect("wamp listener");
    (gw, addr)
}

enum Link {
    Ws(Box<Ws>),
    Raw(TcpStream),
}

/// A client of one transport and serializer.
pub(crate) struct Client {
    link: Link,
    msgpack: bool,
}

impl Client {
    pub(crate) async fn websocket(addr: std::net::SocketAddr, msgpack: bool) -> Client {
        let mut req = format!("ws://{addr}/any/path")
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
        Client {
            link: Link::Ws(Box::new(ws)),
            msgpack,
        }
    }

    async fn rawsocket(addr: std::net::SocketAddr, msgpack: bool) -> Client {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let serializer = if msgpack { 2 } else { 1 };
        s.write_all(&[0x7F, 0xF0 | serializer, 0, 0]).await.unwrap();
        let mut reply = [0u8; 4];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], 0x7F);
        assert_eq!(reply[1] & 0x0F, serializer, "the serializer asked for");
        assert_eq!(&reply[2..], &[0, 0]);
        Client {
            link: Link::Raw(s),
            msgpack,
        }
    }

    fn encode(&self, m: &Value) -> Vec<u8> {
        if self.msgpack {
            rmp_serde::to_vec(m).unwrap()
        } else {
            m.to_string().into_bytes()
        }
    }

    fn decode(&self, bytes: &[u8]) -> Value {
        if self.msgpack {
            rmp_serde::from_slice(bytes).unwrap()
        } else {
            serde_json::from_slice(bytes).unwrap()
        }
    }

    pub(crate) async fn send(&mut self, m: Value) {
        let bytes = self.encode(&m);
        match &mut self.link {
            Link::Ws(ws) => {
                let frame = if self.msgpack {
                    Frame::binary(bytes)
                } else {
                    Frame::text(String::from_utf8(bytes).unwrap())
                };
                ws.send(frame).await.unwrap();
            }
            Link::Raw(s) => {
                let len = (bytes.len() as u32).to_be_bytes();
                s.write_all(&[0, len[1], len[2], len[3]]).await.unwrap();
                s.write_all(&bytes).await.unwrap();
            }
        }
    }

    pub(crate) async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(5))
            .await
            .expect("a message within 5s")
    }

    pub(crate) async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        tokio::time::timeout(within, self.next()).await.ok()?
    }

    async fn next(&mut self) -> Option<Value> {
        loop {
            match &mut self.link {
                Link::Ws(ws) => {
                    let frame = ws.next().await?.ok()?;
                    let bytes = match frame {
                        Frame::Text(t) => t.as_bytes().to_vec(),
                        Frame::Binary(b) => b.to_vec(),
                        Frame::Close(_) => return None,
                        _ => continue,
                    };
                    return Some(self.decode(&bytes));
                }
                Link::Raw(s) => {
                    let mut h = [0u8; 4];
                    s.read_exact(&mut h).await.ok()?;
                    let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
                    let mut payload = vec![0u8; len];
                    s.read_exact(&mut payload).await.ok()?;
                    match h[0] & 0x07 {
                        0 => return Some(self.decode(&payload)),
                        1 => {
                            let l = (len as u32).to_be_bytes();
                            s.write_all(&[2, l[1], l[2], l[3]]).await.ok()?;
                            s.write_all(&payload).await.ok()?;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Joins as ticket user `authid`; the WELCOME.
    pub(crate) async fn join(&mut self, realm: &str, authid: &str) -> Value {
        self.send(json!([1, realm, {"roles": {"caller": {}, "callee": {"features": {"call_canceling": true}},
            "publisher": {}, "subscriber": {}}, "authmethods": ["ticket"], "authid": authid}]))
            .await;
        let challenge = self.recv().await;
        assert_eq!(challenge[0], 4, "{challenge}");
        self.send(json!([5, "pw", {}])).await;
        let welcome = self.recv().await;
        assert_eq!(welcome[0], 2, "{welcome}");
        welcome
    }

    /// Sends a request and returns the reply (the next message).
    pub(crate) async fn ask(&mut self, m: Value) -> Value {
        self.send(m).await;
        self.recv().await
    }
}

pub(crate) async fn joined(
    addr: std::net::SocketAddr,
    authid: &str,
    raw: bool,
    msgpack: bool,
) -> Client {
    let mut c = if raw {
        Client::rawsocket(addr, msgpack).await
    } else {
        Client::websocket(addr, msgpack).await
    };
    c.join("realm1", authid).await;
    c
}

/// RawSocket and WebSocket on one port, each serializer; calls and events
/// cross them. Bad handshakes get their error codes; PINGs their PONGs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rawsocket_and_websocket_share_a_port() {
    let (_gw, addr) = router().await;
    let mut callee = joined(addr, "callee", true, true).await;
    let mut caller = joined(addr, "caller", false, false).await;
    let mut listener = joined(addr, "listener", true, false).await;
    let reg = callee.ask(json!([64, 1, {}, "com.test.echo"])).await;
    assert_eq!(reg[0], 65);
    let sub = listener.ask(json!([32, 1, {}, "com.test.news"])).await;
    assert_eq!(sub[0], 33);

    caller
        .send(json!([48, 7, {}, "com.test.echo", [1, "two", {"three": [3]}], {"k": "v"}]))
        .await;
    let inv = callee.recv().await;
    assert_eq!(inv[0], 68);
    assert_eq!(inv[4], json!([1, "two", {"three": [3]}]));
    callee
        .send(json!([
            70,
            inv[1].clone(),
            {},
            inv[4].clone(),
            inv[5].clone()
        ]))
        .await;
    assert_eq!(
        caller.recv().await,
        json!([50, 7, {}, [1, "two", {"three": [3]}], {"k": "v"}])
    );

    caller
        .send(json!([16, 8, {}, "com.test.news", ["hi"]]))
        .await;
    let event = listener.recv().await;
    assert_eq!(
        (event[0].clone(), event[4].clone()),
        (json!(36), json!(["hi"]))
    );

    // A PING is answered with its payload.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x7F, 0xF1, 0, 0, 1, 0, 0, 3, b'a', b'b', b'c'])
        .await
        .unwrap();
    let mut reply = [0u8; 11];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[4..], &[2, 0, 0, 3, b'a', b'b', b'c']);

    // An unknown serializer: error 1 in the reply, then the end.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x7F, 0xF5, 0, 0]).await.unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, [0x7F, 0x10, 0, 0]);

    // A frame of an unknown type ends the connection.
    let mut bad = Client::rawsocket(addr, false).await;
    bad.join("realm1", "bad").await;
    if let Link::Raw(s) = &mut bad.link {
        s.write_all(&[7, 0, 0, 0]).await.unwrap();
    }
    let abort = bad.recv().await;
    assert_eq!(abort[2], "wamp.error.protocol_violation");
    assert_eq!(bad.try_recv(Duration::from_secs(5)).await, None);

    // HTTP that is not a WebSocket handshake: an HTTP refusal.
    let got = exchange_raw(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    // Garbage: refused, the connection closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"\x00\x01\x02\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    // Read until the end; a reset (unread bytes at close) is an end too.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("closed");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 400"),
        "{got:?}"
    );

    // The others went on.
    caller.send(json!([48, 9, {}, "com.test.echo", [2]])).await;
    let inv = callee.recv().await;
    callee.send(json!([70, inv[1].clone(), {}, [4]])).await;
    assert_eq!(caller.recv().await[3], json!([4]));
}

/// Shared registrations take turns; a callee that leaves is out of the
/// turn at once and its calls fail; prefix and wildcard registrations name
/// the procedure called; an exact one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_pattern_registrations() {
    let (_gw, addr) = router().await;
    let mut a = joined(addr, "a", true, false).await;
    let mut b = joined(addr, "b", false, true).await;
    let mut caller = joined(addr, "caller", true, false).await;
    let ra = a
        .ask(json!([64, 1, {"invoke": "roundrobin"}, "com.test.rr"]))
        .await;
    let rb = b
        .ask(json!([64, 1, {"invoke": "roundrobin"}, "com.test.rr"]))
        .await;
    assert_eq!(ra[2], rb[2], "one shared registration");
    // Another policy, or none, for the same URI is refused.
    let mut c = joined(addr, "c", true, false).await;
    assert_eq!(
        c.ask(json!([64, 1, {"invoke": "random"}, "com.test.rr"]))
            .await[4],
        "wamp.error.procedure_exists_with_different_invocation_policy"
    );
    assert_eq!(
        c.ask(json!([64, 2, {}, "com.test.rr"])).await[4],
        "wamp.error.procedure_exists_with_different_invocation_policy"
    );
    assert_eq!(
        a.ask(json!([64, 3, {"invoke": "roundrobin"}, "com.test.rr"]))
            .await[4],
        "wamp.error.procedure_already_exists",
        "once per callee"
    );
    assert_eq!(
        c.ask(json!([64, 3, {"invoke": "sideways"}, "com.test.x"]))
            .await[4],
        "wamp.error.invalid_argument"
    );

    let mut served = Vec::new();
    for i in 0..4 {
        caller.send(json!([48, 10 + i, {}, "com.test.rr"])).await;
        let (who, inv) = tokio::select! {
            inv = a.recv() => ("a", inv),
            inv = b.recv() => ("b", inv),
        };
        served.push(who);
        let callee = if who == "a" { &mut a } else { &mut b };
        callee.send(json!([70, inv[1].clone(), {}, [who]])).await;
        assert_eq!(caller.recv().await[3], json!([who]));
    }
    assert_eq!(served, ["a", "b", "a", "b"]);

    // b leaves in the middle of a call: that call fails at once, and a
    // serves every call after.
    caller.send(json!([48, 20, {}, "com.test.rr"])).await;
    caller.send(json!([48, 21, {}, "com.test.rr"])).await;
    let first = a.recv().await;
    let second = b.recv().await;
    assert_eq!(
        (first[0].clone(), second[0].clone()),
        (json!(68), json!(68))
    );
    drop(b);
    let failed = caller.recv().await;
    assert_eq!(
        (failed[0].clone(), failed[2].clone(), failed[4].clone()),
        (json!(8), json!(21), json!("wamp.error.canceled"))
    );
    a.send(json!([70, first[1].clone(), {}, ["a"]])).await;
    assert_eq!(caller.recv().await[1], 20);
    for i in 0..3 {
        caller.send(json!([48, 30 + i, {}, "com.test.rr"])).await;
        let inv = a.recv().await;
        a.send(json!([70, inv[1].clone(), {}, []])).await;
        assert_eq!(caller.recv().await[0], 50);
    }

    // Prefix and wildcard registrations; the exact one wins over both.
    c.ask(json!([64, 4, {"match": "prefix"}, "com.test.p."]))
        .await;
    // (`com.test..w` could reach `com.test.secret.w`, which is denied.)
    let r = c
        .ask(json!([64, 5, {"match": "wildcard"}, "com.test.w..x"]))
        .await;
    assert_eq!(r[0], 65, "{r}");
    caller.send(json!([48, 40, {}, "com.test.p.deep.er"])).await;
    let inv = c.recv().await;
    assert_eq!(inv[3]["procedure"], "com.test.p.deep.er");
    c.send(json!([70, inv[1].clone(), {}, []])).await;
    caller.recv().await;
    caller.send(json!([48, 41, {}, "com.test.w.any.x"])).await;
    let inv = c.recv().await;
    assert_eq!(inv[3]["procedure"], "com.test.w.any.x");
    c.send(json!([70, inv[1].clone(), {}, []])).await;
    caller.recv().await;
    a.ask(json!([64, 6, {}, "com.test.p.exact"])).await;
    caller.send(json!([48, 42, {}, "com.test.p.exact"])).await;
    let inv = a.recv().await;
    assert!(inv[3].get("procedure").is_none(), "{inv}");
    a.send(json!([70, inv[1].clone(), {}, []])).await;
    caller.recv().await;
}

/// Progressive results, the three cancel modes, a call timeout, and the
/// limit on calls waiting; the callee sees the caller only where the rule
/// that allowed the call says `disclose`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_progress_cancel_timeout_and_disclosure() {
    let (_gw, addr) = router().await;
    let mut callee = joined(addr, "callee", true, false).await;
    let mut caller = joined(addr, "caller", false, false).await;
    callee.ask(json!([64, 1, {}, "com.test.slow"])).await;
    callee
        .ask(json!([64, 2, {}, "com.test.disclosed.who"]))
        .await;

    caller
        .send(json!([48, 1, {"receive_progress": true}, "com.test.slow"]))
        .await;
    let inv = callee.recv().await;
    assert_eq!(inv[3]["receive_progress"], true);
    assert!(inv[3].get("caller").is_none(), "not disclosed: {inv}");
    let id = inv[1].clone();
    callee.send(json!([70, id, {"progress": true}, [1]])).await;
    callee.send(json!([70, id, {"progress": true}, [2]])).await;
    callee.send(json!([70, id, {}, [3]])).await;
    for (n, progress) in [(1, true), (2, true), (3, false)] {
        let r = caller.recv().await;
        assert_eq!(r[0], 50);
        assert_eq!(r[3], json!([n]));
        assert_eq!(r[2].get("progress") == Some(&json!(true)), progress, "{r}");
    }

    // skip: the caller is answered, the callee is not told; its late
    // YIELD goes nowhere.
    caller.send(json!([48, 2, {}, "com.test.slow"])).await;
    let inv = callee.recv().await;
    caller.send(json!([49, 2, {"mode": "skip"}])).await;
    assert_eq!(caller.recv().await[4], "wamp.error.canceled");
    callee.send(json!([70, inv[1].clone(), {}, []])).await;
    // kill: the callee is interrupted and its ERROR is the answer.
    caller.send(json!([48, 3, {}, "com.test.slow"])).await;
    let inv = callee.recv().await;
    caller.send(json!([49, 3, {"mode": "kill"}])).await;
    let interrupt = callee.recv().await;
    assert_eq!(interrupt, json!([69, inv[1].clone(), {"mode": "kill"}]));
    callee
        .send(json!([8, 68, inv[1].clone(), {}, "com.test.stopped"]))
        .await;
    assert_eq!(caller.recv().await[4], "com.test.stopped");
    // killnowait (the default): both at once.
    caller.send(json!([48, 4, {}, "com.test.slow"])).await;
    let inv = callee.recv().await;
    caller.send(json!([49, 4, {}])).await;
    assert_eq!(caller.recv().await[4], "wamp.error.canceled");
    assert_eq!(callee.recv().await[0], 69);
    let _ = inv;

    // A timeout: wamp.error.timeout, and the callee is interrupted.
    caller
        .send(json!([48, 5, {"timeout": 100}, "com.test.slow"]))
        .await;
    let inv = callee.recv().await;
    assert_eq!(caller.recv().await[4], "wamp.error.timeout");
    assert_eq!(
        callee.recv().await,
        json!([69, inv[1].clone(), {"mode": "killnowait"}])
    );

    // Disclosure where the rule says so.
    caller
        .send(json!([48, 6, {}, "com.test.disclosed.who"]))
        .await;
    let inv = callee.recv().await;
    assert_eq!(inv[3]["caller_authid"], "caller");
    assert_eq!(inv[3]["caller_authrole"], "guest");
    assert!(inv[3]["caller"].is_u64());
    callee.send(json!([70, inv[1].clone(), {}, []])).await;
    caller.recv().await;

    // At most three calls waiting (max_pending_calls: 3).
    for i in 0..3 {
        caller.send(json!([48, 10 + i, {}, "com.test.slow"])).await;
        callee.recv().await;
    }
    let refused = caller.ask(json!([48, 13, {}, "com.test.slow"])).await;
    assert_eq!(
        (refused[2].clone(), refused[4].clone()),
        (json!(13), json!("wamp.error.canceled"))
    );
    // A caller that leaves: its callee is interrupted.
    drop(caller);
    for _ in 0..3 {
        assert_eq!(callee.recv().await[0], 69);
    }
}

/// Pattern subscriptions say the topic; the publisher is left out unless
/// it asks; black and white lists by session, authid and authrole; the
/// publisher is disclosed where the rule says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_lists_and_disclosure() {
    let (_gw, addr) = router().await;
    let mut publisher = joined(addr, "pub", true, false).await;
    let mut x = joined(addr, "x", false, true).await;
    let mut y = joined(addr, "y", true, true).await;
    let exact = x.ask(json!([32, 1, {}, "com.test.a.b"])).await[2].clone();
    // A prefix that cannot reach the denied `com.test.secret.` is allowed.
    let prefix = x
        .ask(json!([32, 2, {"match": "prefix"}, "com.test.a"]))
        .await;
    assert_eq!(prefix[0], 33, "{prefix}");
    let prefix = prefix[2].clone();
    let wild = y
        .ask(json!([32, 1, {"match": "wildcard"}, "com.test.a."]))
        .await[2]
        .clone();
    publisher.ask(json!([32, 1, {}, "com.test.a.b"])).await;

    publisher
        .send(json!([16, 1, {"acknowledge": true}, "com.test.a.b", [1]]))
        .await;
    assert_eq!(
        publisher.recv().await[0],
        17,
        "PUBLISHED; no EVENT to itself"
    );
    let mut got = [x.recv().await, x.recv().await];
    got.sort_by_key(|e| e[1].as_u64());
    let by_sub = |s: &Value| got.iter().find(|e| e[1] == *s).cloned().unwrap();
    assert!(by_sub(&exact)[3].get("topic").is_none());
    assert_eq!(by_sub(&prefix)[3]["topic"], "com.test.a.b");
    let e = y.recv().await;
    assert_eq!(
        (e[1].clone(), e[3]["topic"].clone()),
        (wild, json!("com.test.a.b"))
    );
    assert!(e[3].get("publisher").is_none(), "not disclosed: {e}");

    // exclude_me: false reaches the publisher too.
    publisher
        .send(json!([16, 2, {"exclude_me": false}, "com.test.a.b", [2]]))
        .await;
    assert_eq!(publisher.recv().await[4], json!([2]));
    x.recv().await;
    x.recv().await;
    y.recv().await;

    // Lists: only y by authid; everyone but y by authrole-less exclude.
    publisher
        .send(json!([16, 3, {"eligible_authid": ["y"]}, "com.test.a.b", [3]]))
        .await;
    assert_eq!(y.recv().await[4], json!([3]));
    assert_eq!(x.try_recv(Duration::from_millis(200)).await, None);
    publisher
        .send(json!([16, 4, {"exclude_authid": ["x"], "exclude_authrole": ["nobody"]}, "com.test.a.b", [4]]))
        .await;
    assert_eq!(y.recv().await[4], json!([4]));
    assert_eq!(x.try_recv(Duration::from_millis(200)).await, None);
    publisher
        .send(json!([16, 5, {"eligible_authrole": ["other"]}, "com.test.a.b", [5]]))
        .await;
    assert_eq!(y.try_recv(Duration::from_millis(200)).await, None);

    // Disclosure where the rule says so.
    y.ask(json!([32, 2, {}, "com.test.disclosed.news"])).await;
    publisher
        .send(json!([16, 6, {}, "com.test.disclosed.news", []]))
        .await;
    let e = y.recv().await;
    assert_eq!(e[3]["publisher_authid"], "pub");
    assert_eq!(e[3]["publisher_authrole"], "guest");
}

/// Denied actions answer `wamp.error.not_authorized`, malformed URIs
/// `wamp.error.invalid_uri`, and the router's own `wamp.` namespace is not
/// a client's to register or publish in; realms see nothing of each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_on_every_action() {
    let (_gw, addr) = router().await;
    let mut c = joined(addr, "c", true, false).await;
    for (i, m) in [
        json!([64, 1, {}, "com.test.secret.x"]),
        json!([32, 2, {}, "com.test.secret.x"]),
        json!([48, 3, {}, "com.test.secret.x"]),
        json!([16, 4, {"acknowledge": true}, "com.test.secret.x"]),
        json!([32, 5, {"match": "prefix"}, "com.test.sec"]),
        json!([32, 6, {"match": "wildcard"}, "com.test..x"]),
        json!([64, 7, {}, "org.other.x"]),
    ]
    .into_iter()
    .enumerate()
    {
        let reply = c.ask(m.clone()).await;
        assert_eq!(
            (reply[0].clone(), reply[2].clone(), reply[4].clone()),
            (json!(8), json!(i + 1), json!("wamp.error.not_authorized")),
            "{m}"
        );
    }
    for m in [
        json!([64, 10, {}, "com.test..x"]),
        json!([48, 11, {}, "com.test.a b"]),
        json!([64, 12, {}, "wamp.session.mine"]),
        json!([16, 13, {"acknowledge": true}, "wamp.session.on_join"]),
    ] {
        assert_eq!(c.ask(m.clone()).await[4], "wamp.error.invalid_uri", "{m}");
    }
    assert_eq!(
        c.ask(json!([32, 14, {"match": "fuzzy"}, "com.test.x"]))
            .await[4],
        "wamp.error.invalid_argument"
    );
    // An unacknowledged denied publish is dropped quietly.
    c.send(json!([16, 15, {}, "com.test.secret.x"])).await;
    assert_eq!(c.try_recv(Duration::from_millis(200)).await, None);

    // At most 20 subscriptions and 20 registrations a session.
    let mut many = joined(addr, "many", true, false).await;
    for i in 0..20 {
        assert_eq!(
            many.ask(json!([32, i, {}, format!("com.test.t{i}")])).await[0],
            33
        );
        assert_eq!(
            many.ask(json!([64, i, {}, format!("com.test.p{i}")])).await[0],
            65
        );
    }
    let over = many.ask(json!([32, 30, {}, "com.test.t20"])).await;
    assert_eq!(over[4], "tollgate.error.limit_exceeded", "{over}");
    let over = many.ask(json!([64, 31, {}, "com.test.p20"])).await;
    assert_eq!(over[4], "tollgate.error.limit_exceeded", "{over}");
    // What it holds already costs nothing; what it gives up frees a place.
    let again = many.ask(json!([32, 32, {}, "com.test.t0"])).await;
    assert_eq!(again[0], 33);
    many.ask(json!([34, 33, again[2].clone()])).await;
    assert_eq!(many.ask(json!([32, 34, {}, "com.test.t20"])).await[0], 33);

    // Realm2 has its own procedures.
    c.ask(json!([64, 20, {}, "com.test.here"])).await;
    let mut other = Client::rawsocket(addr, false).await;
    other.join("realm2", "o").await;
    assert_eq!(
        other.ask(json!([48, 1, {}, "com.test.here"])).await[4],
        "wamp.error.no_such_procedure"
    );
    // An unknown realm, and a role the realm does not have.
    let mut nowhere = Client::rawsocket(addr, false).await;
    nowhere.send(json!([1, "realm9", {"roles": {}}])).await;
    assert_eq!(nowhere.recv().await[2], "wamp.error.no_such_realm");
    // An anonymous client names nobody: the authid it asks for is not its.
    let mut anon = Client::rawsocket(addr, false).await;
    anon.send(json!([1, "realm1", {"roles": {}, "authid": "alice"}]))
        .await;
    let welcome = anon.recv().await;
    assert_eq!(welcome[0], 2, "{welcome}");
    let given = welcome[2]["authid"].as_str().unwrap();
    assert!(
        given.starts_with("anonymous-") && given != "alice",
        "{welcome}"
    );
}

/// The meta API: join and leave events, subscription and registration
/// events, and the procedures that list, get and kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_api() {
    let (gw, addr) = router().await;
    let mut watcher = joined(addr, "watcher", true, false).await;
    for (i, topic) in [
        "wamp.session.on_join",
        "wamp.session.on_leave",
        "wamp.registration.on_create",
        "wamp.registration.on_delete",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(watcher.ask(json!([32, i, {}, topic])).await[0], 33);
    }
    let mut other = joined(addr, "other", false, false).await;
    let join = watcher.recv().await;
    assert_eq!(join[4][0]["authid"], "other");
    assert_eq!(join[4][0]["authrole"], "guest");
    assert_eq!(join[4][0]["transport"]["type"], "websocket");
    let other_id = join[4][0]["session"].clone();

    other.ask(json!([64, 1, {}, "com.test.proc"])).await;
    let created = watcher.recv().await;
    assert_eq!(created[4][0], other_id);
    assert_eq!(created[4][1]["uri"], "com.test.proc");
    let reg_id = created[4][1]["id"].clone();

    let count = watcher.ask(json!([48, 1, {}, "wamp.session.count"])).await;
    assert_eq!(count[3], json!([2]));
    let got = watcher
        .ask(json!([48, 2, {}, "wamp.session.get", [other_id.clone()]]))
        .await;
    assert_eq!(got[3][0]["authid"], "other");
    let callees = watcher
        .ask(json!([
            48,
            3,
            {},
            "wamp.registration.list_callees",
            [reg_id.clone()]
        ]))
        .await;
    assert_eq!(callees[3], json!([[other_id.clone()]]));
    let lookup = watcher
        .ask(json!([
            48,
            4,
            {},
            "wamp.registration.lookup",
            ["com.test.proc"]
        ]))
        .await;
    assert_eq!(lookup[3], json!([reg_id.clone()]));
    let matched = watcher
        .ask(json!([
            48,
            40,
            {},
            "wamp.registration.match",
            ["com.test.proc"]
        ]))
        .await;
    assert_eq!(matched[3], json!([reg_id.clone()]));
    let sub = watcher
        .ask(json!([
            48,
            41,
            {},
            "wamp.subscription.lookup",
            ["wamp.session.on_join"]
        ]))
        .await;
    let count = watcher
        .ask(json!([
            48,
            42,
            {},
            "wamp.subscription.count_subscribers",
            [sub[3][0].clone()]
        ]))
        .await;
    assert_eq!(count[3], json!([1]));
    let matched = watcher
        .ask(json!([
            48,
            43,
            {},
            "wamp.subscription.match",
            ["wamp.session.on_join"]
        ]))
        .await;
    assert_eq!(matched[3], json!([[sub[3][0].clone()]]));
    let missing = watcher
        .ask(json!([48, 5, {}, "wamp.session.get", [12345]]))
        .await;
    assert_eq!(missing[4], "wamp.error.no_such_session");

    // Kill: the victim gets a GOODBYE; its registration goes; on_leave.
    let killed = watcher
        .ask(json!([48, 6, {}, "wamp.session.kill", [other_id.clone()], {"message": "bye"}]))
        .await;
    assert_eq!(killed[0], 50);
    let bye = other.recv().await;
    assert_eq!(
        (bye[0].clone(), bye[2].clone()),
        (json!(6), json!("wamp.close.killed"))
    );
    let mut seen = Vec::new();
    for _ in 0..2 {
        let e = watcher.recv().await;
        seen.push(e[4].clone());
    }
    assert!(
        seen.contains(&json!([other_id.clone(), "other", "guest"])),
        "{seen:?}"
    );
    assert!(seen.iter().any(|a| a[1] == reg_id), "{seen:?}");

    // The admin API lists sessions by realm and ends one.
    let mut third = joined(addr, "third", false, false).await;
    let admin = gw.gw.admin_addr();
    let list = get(&format!("http://{admin}/admin/wamp/sessions")).await;
    assert_eq!(list.status, 200);
    let realm1 = list.json()["realms"]["realm1"].clone();
    let third_entry = realm1
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["authid"] == "third")
        .cloned()
        .expect("listed");
    assert_eq!(third_entry["transport"]["type"], "websocket");
    let id = third_entry["session"].as_u64().unwrap();
    let kill = || {
        http::Request::delete(format!("http://{admin}/admin/wamp/sessions/{id}"))
            .body(full(""))
            .unwrap()
    };
    assert_eq!(send(kill()).await.status, 204);
    assert_eq!(third.recv().await[2], "wamp.close.killed");
    assert_eq!(send(kill()).await.status, 404);

    // Metrics per realm.
    let mut probe = joined(addr, "probe", true, false).await;
    let none = probe.ask(json!([48, 7, {}, "com.test.none"])).await;
    assert_eq!(none[4], "wamp.error.no_such_procedure");
    let metrics = gw.metrics().await;
    let of = |name: &str| metric(&metrics, &format!("{name}{{realm=\"realm1\"}}"));
    assert!(of("tollgate_wamp_sessions") >= 1.0, "{metrics}");
    assert!(of("tollgate_wamp_call_errors_total") >= 1.0, "{metrics}");
}

/// A subscriber that stops reading is closed once its queue is full; the
/// publisher and everyone else go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_closed_not_buffered() {
    let (_gw, addr) = router().await;
    let mut slow = joined(addr, "slow", true, false).await;
    let mut fast = joined(addr, "fast", false, false).await;
    let mut publisher = joined(addr, "pub", true, false).await;
    slow.ask(json!([32, 1, {}, "com.test.flood"])).await;
    slow.ask(json!([64, 2, {}, "com.test.slowproc"])).await;
    fast.ask(json!([32, 1, {}, "com.test.flood"])).await;
    let payload = "x".repeat(64 * 1024);
    // Far more than the socket buffers and the 64-message queue hold; the
    // fast subscriber reads each batch before the next is published.
    for batch in 0..25 {
        for i in 0..16 {
            publisher
                .send(json!([
                    16,
                    batch * 16 + i + 1,
                    {},
                    "com.test.flood",
                    [payload]
                ]))
                .await;
        }
        for _ in 0..16 {
            assert_eq!(fast.recv().await[0], 36);
        }
    }
    // Before the slow one reads anything, it is out of the realm: what it
    // registered is free.
    let taken = fast.ask(json!([64, 1, {}, "com.test.slowproc"])).await;
    assert_eq!(taken[0], 65, "{taken}");
    // The slow one is gone: after what was in flight, an ABORT or the end.
    let mut ended = false;
    for _ in 0..1000 {
        match slow.try_recv(Duration::from_secs(5)).await {
            Some(m) if m[0] == 36 => continue,
            Some(m) => {
                assert_eq!(m[0], 3, "{m}");
                ended = true;
                break;
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "the slow subscriber was closed");
    publisher
        .send(json!([16, 1000, {"acknowledge": true}, "com.test.flood", []]))
        .await;
    assert_eq!(publisher.recv().await[0], 17);
    assert_eq!(fast.recv().await[0], 36);
}

/// Config mistakes name their key.
#[test]
fn wamp_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let cases = [
        (
            "  listeners:\n    nowhere: { auth: { anonymous: {} } }\n",
            "wamp.listeners.nowhere",
        ),
        (
            "  listeners:\n    wamp:\n      auth:\n        tls: { type: dynamic }\n",
            "wamp.listeners.wamp.auth.tls.authenticator",
        ),
        (
            "  listeners:\n    wamp:\n      auth:\n        cryptosign:\n          principals:\n            k: { role: guest, authorized_keys: [abc] }\n",
            "wamp.listeners.wamp.auth.cryptosign.principals.k.authorized_keys[0]",
        ),
        (
            "  listeners:\n    wamp:\n      auth:\n        tls:\n          principals:\n            k: { role: guest, certificate-sha1: 'AB:CD' }\n",
            "wamp.listeners.wamp.auth.tls.principals.k.certificate-sha1",
        ),
    ];
    for (extra, key) in cases {
        std::fs::write(&path, config(extra)).unwrap();
        let err = tollgate::config::load(&path).expect_err(key).to_string();
        assert!(err.contains(key), "{key}: {err}");
        assert!(err.contains("gateway.yaml"), "{err}");
    }
    let bad_role = config("").replace(
        "            - allow: { uris: ['com.test.**'] }\n        ",
        "            - allow: { uris: ['com.test.**'] }\n              deny: {}\n        ",
    );
    std::fs::write(&path, bad_role).unwrap();
    let err = tollgate::config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains(
            "wamp.realms[0].roles[0].permissions[2]: expected exactly one of `allow` and `deny`"
        ),
        "{err}"
    );
}

/// A JWT as the ticket: validated by the configured provider, its `sub`
/// the authid and its first role the authrole; the session ends when the
/// token does; a forged token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_ticket_joins_until_the_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let key = b"an HS256 secret of thirty-two bytes!";
    std::fs::write(&secret, key).unwrap();
    let providers = [
        "  providers:\n    - name: idp\n      issuer: https://idp\n      audiences: [wamp]\n",
        &format!("      secret: {{ file: {} }}\n", secret.display()),
    ]
    .concat();
    let gw = TestGateway::start(&config_with(
        "  listeners:\n    wamp:\n      auth:\n        ticket: { jwt: true, role: guest }\n",
        &providers,
    ))
    .await;
    let addr = gw.gw.listener_addr("wamp").unwrap();
    let token = |key: &[u8], roles: &[&str], exp_in: u64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"iss": "https://idp", "aud": "wamp", "sub": "svc", "roles": roles, "exp": now + exp_in}),
            &jsonwebtoken::EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    let join = |ticket: String| async move {
        let mut c = Client::rawsocket(addr, false).await;
        c.send(json!([1, "realm1", {"roles": {"caller": {}}, "authmethods": ["ticket"]}]))
            .await;
        let challenge = c.recv().await;
        assert_eq!(challenge[1], "ticket", "{challenge}");
        c.send(json!([5, ticket, {}])).await;
        let reply = c.recv().await;
        (c, reply)
    };
    let (mut c, welcome) = join(token(key, &[], 2)).await;
    assert_eq!(welcome[0], 2, "{welcome}");
    assert_eq!(welcome[2]["authid"], "svc");
    assert_eq!(
        welcome[2]["authrole"], "guest",
        "the method's role: none in the token"
    );
    assert_eq!(welcome[2]["authprovider"], "jwt");
    let bye = c.recv().await;
    assert_eq!(
        (bye[0].clone(), bye[2].clone()),
        (json!(6), json!("wamp.close.token_expired"))
    );

    let (_, abort) = join(token(b"another secret of thirty-two bytes!!", &[], 60)).await;
    assert_eq!(
        (abort[0].clone(), abort[2].clone()),
        (json!(3), json!("wamp.error.not_authorized"))
    );
    // A role the token names but the realm lacks.
    let (_, abort) = join(token(key, &["admin"], 60)).await;
    assert_eq!(abort[2], "wamp.error.no_such_role");
}

/// A reload applies to what sessions hold at once: registrations and
/// subscriptions the new rules refuse are dropped, and a session whose role
/// is gone is ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rechecks_what_sessions_hold() {
    let (gw, addr) = router().await;
    let mut callee = joined(addr, "callee", true, false).await;
    let mut caller = joined(addr, "caller", false, false).await;
    assert_eq!(callee.ask(json!([64, 1, {}, "com.test.p"])).await[0], 65);
    assert_eq!(
        callee.ask(json!([64, 2, {}, "com.test.keep.p"])).await[0],
        65
    );
    let mut other = Client::rawsocket(addr, false).await;
    other
        .send(json!([1, "realm2", {"roles": {}, "authmethods": ["ticket"], "authid": "o"}]))
        .await;
    other.recv().await;
    other.send(json!([5, "pw", {}])).await;
    assert_eq!(other.recv().await[0], 2);

    let narrower = config("")
        .replacen(
            "            - allow: { uris: ['com.test.**'] }\n",
            "            - allow: { uris: ['com.test.keep.**'] }\n",
            1,
        )
        .replace(
            "      roles:\n        - name: guest\n          permissions:\n            - allow: { uris: ['com.test.**'] }\n",
            "      roles:\n        - name: visitor\n          permissions:\n            - allow: { uris: ['com.test.**'] }\n",
        );
    assert_ne!(narrower, config(""));
    gw.write_config(&narrower);
    let bye = other
        .try_recv(Duration::from_secs(15))
        .await
        .expect("a GOODBYE after the reload");
    assert_eq!(
        (bye[0].clone(), bye[2].clone()),
        (json!(6), json!("wamp.close.close_realm")),
        "realm2 has no role guest now"
    );
    // The registration the rules no longer allow is gone; the other stays.
    let lookup = |uri: &str| json!([48, 1, {}, "wamp.registration.lookup", [uri]]);
    for _ in 0..100 {
        if caller.ask(lookup("com.test.p")).await[3] == json!([null]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(caller.ask(lookup("com.test.p")).await[3], json!([null]));
    assert!(caller.ask(lookup("com.test.keep.p")).await[3][0].is_u64());
    caller.send(json!([48, 1, {}, "com.test.keep.p"])).await;
    let inv = callee.recv().await;
    assert_eq!(inv[0], 68);
}

/// A browser page's handshake (it carries `Origin`) connects only from a
/// listed origin, on `protocol: wamp` listeners and at the HTTP path alike;
/// clients that are not browsers send none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_origins_may_connect() {
    let gw = TestGateway::start(&config(
        "  websocket: { path: /ws }\n  allowed_origins: ['https://app.example']\n",
    ))
    .await;
    let wamp = gw.gw.listener_addr("wamp").unwrap();
    for url in [format!("ws://{wamp}/"), format!("ws://{}/ws", gw.addr())] {
        let open = |origin: Option<&'static str>| {
            let mut req = url.as_str().into_client_request().unwrap();
            req.headers_mut()
                .insert("sec-websocket-protocol", "wamp.2.json".parse().unwrap());
            if let Some(o) = origin {
                req.headers_mut().insert("origin", o.parse().unwrap());
            }
            tokio_tungstenite::connect_async(req)
        };
        match open(Some("https://evil.example")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 403, "{url}")
            }
            other => panic!(
                "{url}: expected 403, got {:?}",
                other.map(|(_, r)| r.status())
            ),
        }
        assert!(open(Some("https://app.example")).await.is_ok(), "{url}");
        assert!(open(None).await.is_ok(), "{url}");
    }
}

/// A ticket user removed by a reload loses its session (GOODBYE
/// `wamp.close.killed`); the other users keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_users_session_ends() {
    let gw = TestGateway::start(&config("")).await;
    let addr = gw.gw.listener_addr("wamp").unwrap();
    let mut a = joined(addr, "a", true, false).await;
    let mut b = joined(addr, "b", false, false).await;
    let yaml = std::fs::read_to_string(&gw.path).unwrap();
    let line = yaml
        .lines()
        .find(|l| l.contains("{ name: a,"))
        .unwrap()
        .to_owned();
    std::fs::write(&gw.path, yaml.replace(&format!("{line}\n"), "")).unwrap();
    let r = send(
        http::Request::post(format!("http://{}/admin/reload", gw.gw.admin_addr()))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bye = a.recv().await;
    assert_eq!(bye[0], 6, "{bye}");
    assert_eq!(bye[2], "wamp.close.killed", "{bye}");
    // b still calls (an error for a procedure nobody registered is an answer).
    let answer = b.ask(json!([48, 7, {}, "com.test.nobody"])).await;
    assert_eq!(answer[0], 8, "{answer}");
}
