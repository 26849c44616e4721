//! Cluster mode in one process: several gateways (nodes) on one real etcd.
//! What one node writes — an OAuth client, an API route, a revocation, a
//! signing key, a user — is served by every other node without a restart;
//! etcd going away leaves every node serving what it has, refuses writes
//! with a clear error, and the nodes catch up when it is back.

use std::time::{Duration, Instant};

use http::{Method, Request};
use serde_json::{Value, json};

use crate::oauth::{
    add_client, authenticates, call_bar, oauth_config, static_client, token, token_call,
};
use crate::store_etcd::cluster::Etcd;
use crate::support::*;

/// Waits for a change to show on a node (bounded; how long it took is
/// printed, the benchmark reports it properly).
const PROPAGATION: Duration = Duration::from_secs(10);

/// A node's gateway.yaml: the `bar` route (tokens of this token server),
/// the static client `foo`, the store on `etcd` under `prefix`.
fn node_config(up: &Upstream, etcd: &Etcd, prefix: &str, extra_oauth: &str) -> String {
    oauth_config(
        up,
        "ES256",
        &format!("{}{extra_oauth}", static_client("foo", SECRET)),
    ) + &format!(
        "store:\n  etcd:\n    endpoints: [{}]\n    prefix: {prefix}\n    timeout: 2s\n",
        etcd.endpoint
    )
}

const SECRET: &str = "ffffffffffffffffffffffffffffffffffff";

async fn admin(gw: &TestGateway, method: Method, path: &str, body: Option<Value>) -> TestResponse {
    send(
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", gw.gw.admin_addr()))
            .header("content-type", "application/json")
            .body(full(body.map(|b| b.to_string()).unwrap_or_default()))
            .unwrap(),
    )
    .await
}

/// Waits until `cond` holds on every node; prints how long it took.
async fn on_every_node<'a, F, Fut>(nodes: &'a [&'a TestGateway], what: &str, cond: F)
where
    F: Fn(&'a TestGateway) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    for node in nodes {
        wait_until(PROPAGATION, what, || cond(node)).await;
    }
    eprintln!("{what}: on every node after {:?}", started.elapsed());
}

async fn jwks_kids(gw: &TestGateway) -> Vec<String> {
    get(&gw.url("/.well-known/jwks.json")).await.json()["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Microfy's flows across three nodes: a client added on A gets tokens on
/// C; a token issued on B validates on A and C; a route registered on B
/// serves on A and C; a revocation on C is refused on A and B; a key
/// rotated from A's CLI is published and used by every node; a user added
/// on A is known on B and C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_writes_every_node_serves() {
    let etcd = Etcd::start();
    let up = Upstream::echo("bar").await;
    let svc = Upstream::echo("svc").await;
    let yaml = node_config(&up, &etcd, "/c1/", "");
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    let c = TestGateway::start(&yaml).await;
    let all = [&a, &b, &c];

    // One signing key for the cluster: made by whichever node came first.
    let kids = jwks_kids(&a).await;
    assert_eq!(kids.len(), 1, "{kids:?}");
    for n in &all[1..] {
        assert_eq!(jwks_kids(n).await, kids);
    }

    // A client added with A's CLI gets tokens on every node.
    let secret = add_client(
        &a.path,
        "svc-client",
        &["--scope", "bar.read", "--audience", "bar"],
    );
    on_every_node(&all, "the client added on A authenticates", |n| {
        let secret = secret.clone();
        async move { authenticates(n, "svc-client", &secret).await }
    })
    .await;

    // A token issued on B validates on A and C.
    let t = token(&b, "svc-client", &secret, "").await;
    for n in &all {
        assert_eq!(call_bar(n, &t).await.status, 200);
    }

    // A route registered on B serves on A and C.
    let r = admin(
        &b,
        Method::POST,
        "/admin/routes",
        Some(
            json!({"name": "svc", "match": {"path_prefix": "/svc"}, "strip_prefix": true,
            "upstream": {"targets": [format!("http://{}", svc.addr)]}}),
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    on_every_node(&all, "the route registered on B serves", |n| async move {
        let r = get(&n.url("/svc/x")).await;
        r.status == 200 && r.json()["path"] == "/x"
    })
    .await;
    // ...and its removal too.
    assert_eq!(
        admin(&a, Method::DELETE, "/admin/routes/svc", None)
            .await
            .status,
        204
    );
    on_every_node(&all, "the route removed on A is gone", |n| async move {
        get(&n.url("/svc/x")).await.status == 404
    })
    .await;

    // A revocation on C is refused on A and B.
    let r = token_call(&c, "/oauth2/revoke", &t, ("svc-client", &secret)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    on_every_node(&all, "the token revoked on C is refused", |n| {
        let t = t.clone();
        async move { call_bar(n, &t).await.status == 401 }
    })
    .await;

    // A key rotated with A's CLI: every node publishes it and signs with it.
    let rotated = crate::oauth::cli(&a.path, &["keys", "rotate"]);
    let new_kid = kids_after_rotation(&rotated, &kids);
    on_every_node(&all, "the rotated key is published", |n| {
        let new_kid = new_kid.clone();
        async move { jwks_kids(n).await.contains(&new_kid) }
    })
    .await;
    on_every_node(&all, "every node signs with the rotated key", |n| {
        let new_kid = new_kid.clone();
        async move { header_kid(&token(n, "foo", SECRET, "").await) == new_kid }
    })
    .await;
    let t = token(&c, "foo", SECRET, "").await;
    assert_eq!(call_bar(&a, &t).await.status, 200);

    // A user added on A is known on B and C.
    let r = admin(
        &a,
        Method::PUT,
        "/admin/users/dev-1",
        Some(json!({"password": "a long device password"})),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.text());
    on_every_node(&all, "the user added on A is known", |n| async move {
        admin(n, Method::GET, "/admin/users/dev-1", None)
            .await
            .status
            == 200
            && admin(n, Method::GET, "/admin/status", None).await.json()["password_users"] == 1
    })
    .await;
}

/// The kid `keys rotate` printed ("signing with new key KID; ...").
fn kids_after_rotation(printed: &str, before: &[String]) -> String {
    let kid = printed
        .split("new key ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no new kid in {printed:?}"))
        .to_owned();
    assert!(!before.contains(&kid), "{kid} is not new");
    kid
}

fn header_kid(token: &str) -> String {
    use base64::Engine;
    let head = token.split('.').next().unwrap();
    let head: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .unwrap(),
    )
    .unwrap();
    head["kid"].as_str().unwrap().to_owned()
}

/// Three nodes find the signing key due at the same moment: exactly one
/// rotates, each time (the store's transaction reads the key it replaces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotation_happens_once_across_nodes() {
    let etcd = Etcd::start();
    let up = Upstream::echo("bar").await;
    let yaml = node_config(&up, &etcd, "/c2/", "  key_rotation: 2s\n")
        .replace("token_ttl: 5m", "token_ttl: 1s");
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    let c = TestGateway::start(&yaml).await;
    let first = jwks_kids(&a).await;
    // Two rotations after the first key.
    wait_until(Duration::from_secs(30), "two rotations", || async {
        jwks_kids(&a).await.len() >= 3
    })
    .await;
    let store = tollgate::store::open(&tollgate::config::load(&a.path).unwrap()).unwrap();
    let mut made: Vec<u64> = store
        .signing_keys::<Value>()
        .unwrap()
        .iter()
        .map(|k| k["created_at"].as_u64().unwrap())
        .collect();
    made.sort_unstable();
    assert!(made.len() >= 3, "{made:?} (first {first:?})");
    for pair in made.windows(2) {
        assert!(
            pair[1] >= pair[0] + 2,
            "two keys made within one rotation period: {made:?}"
        );
    }
    drop((b, c));
}

/// etcd goes away: every node keeps serving its routes and validating
/// tokens, issues tokens with the key it has, refuses writes (admin API 503,
/// revocation 503) and reports itself degraded but ready; when etcd is back
/// a change made on one node reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_serves_refuses_writes_and_catches_up() {
    let mut etcd = Etcd::start();
    let up = Upstream::echo("bar").await;
    let svc = Upstream::echo("svc").await;
    let yaml = node_config(&up, &etcd, "/c3/", "");
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    let t = token(&a, "foo", SECRET, "").await;

    etcd.stop();
    for n in [&a, &b] {
        assert_eq!(
            call_bar(n, &t).await.status,
            200,
            "serving with what it has"
        );
        let fresh = token(n, "foo", SECRET, "").await;
        assert_eq!(
            call_bar(n, &fresh).await.status,
            200,
            "issuing with its key"
        );
    }
    let route = json!({"name": "svc", "match": {"path_prefix": "/svc"},
        "upstream": {"targets": [format!("http://{}", svc.addr)]}});
    let r = admin(&a, Method::POST, "/admin/routes", Some(route.clone())).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.json()["message"].as_str().unwrap().contains("etcd"),
        "{}",
        r.text()
    );
    let r = token_call(&b, "/oauth2/revoke", &t, ("foo", SECRET)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    // Ready (it serves), and says what waits.
    wait_until(PROPAGATION, "readiness says the watch is down", || async {
        let r = get(&format!("http://{}/readyz", a.gw.admin_addr())).await;
        r.status == 200 && r.text().contains("degraded")
    })
    .await;
    let status = admin(&a, Method::GET, "/admin/status", None).await.json();
    assert_eq!(status["store"]["watching"], false, "{status}");

    etcd.resume();
    // The revocation refused with 503 is retried, as its caller would.
    wait_until(PROPAGATION, "the revocation is saved", || async {
        token_call(&b, "/oauth2/revoke", &t, ("foo", SECRET))
            .await
            .status
            == 200
    })
    .await;
    let r = admin(&a, Method::POST, "/admin/routes", Some(route)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    on_every_node(
        &[&a, &b],
        "after the outage, the route registered on A serves",
        |n| async move { get(&n.url("/svc/x")).await.status == 200 },
    )
    .await;
    on_every_node(
        &[&a, &b],
        "after the outage, the revocation made on B is refused",
        |n| {
            let t = t.clone();
            async move { call_bar(n, &t).await.status == 401 }
        },
    )
    .await;
    wait_until(PROPAGATION, "readiness is plain again", || async {
        get(&format!("http://{}/readyz", a.gw.admin_addr()))
            .await
            .text()
            == "ready\n"
    })
    .await;
    let status = admin(&a, Method::GET, "/admin/status", None).await.json();
    assert_eq!(status["store"]["watching"], true, "{status}");
}

/// A node with an MQTT listener (user `dev-a`, the `%u/#` rule) on the
/// cluster store: its address.
async fn mqtt_node(etcd: &Etcd, prefix: &str) -> (TestGateway, std::net::SocketAddr) {
    let hash = bcrypt::hash(crate::mqtt::PASSWORD, 4).unwrap();
    let yaml = format!(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\n\
admin:\n  bind: 127.0.0.1:0\nauth:\n  users:\n    - {{ name: dev-a, password_hash: '{hash}' }}\n\
mqtt:\n  policy:\n    - allow: {{ actions: [publish, subscribe], topics: ['%u/#'] }}\n\
store:\n  etcd:\n    endpoints: [{}]\n    prefix: {prefix}\n    timeout: 2s\n",
        etcd.endpoint
    );
    let gw = TestGateway::start(&yaml).await;
    let addr = gw.gw.listener_addr("mqtt").unwrap();
    (gw, addr)
}

/// Retained messages are the cluster's: one published on A (acknowledged
/// once etcd has it) is delivered by a node started afterwards, and so is
/// its clearing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_the_clusters() {
    use crate::mqtt::{login, next_publish, subscribed, v4_connect};
    use rumqttc::QoS;
    let etcd = Etcd::start();
    let (_a, addr_a) = mqtt_node(&etcd, "/c4/").await;
    let publisher = v4_connect(addr_a, "pub", login("dev-a"), true)
        .await
        .unwrap();
    for (topic, payload) in [("dev-a/status", "online"), ("dev-a/gone", "soon cleared")] {
        publisher
            .client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }
    publisher
        .client
        .publish("dev-a/gone", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    let mut publisher = publisher;
    let mut acked = 0;
    while acked < 3 {
        match tokio::time::timeout(Duration::from_secs(10), publisher.acks.recv()).await {
            Ok(Some(rumqttc::Packet::PubAck(_))) => acked += 1,
            Ok(Some(_)) => {}
            other => panic!("no PUBACK: {other:?}"),
        }
    }

    // A node that was not there when they were published.
    let (_c, addr_c) = mqtt_node(&etcd, "/c4/").await;
    wait_until(PROPAGATION, "node C has the cluster's retained messages", || async {
        let mut sub = subscribed(addr_c, "sub", "dev-a", true, "dev-a/#", QoS::AtLeastOnce).await;
        let got = tokio::time::timeout(Duration::from_millis(300), sub.publishes.recv()).await;
        let _ = sub.client.disconnect().await;
        matches!(got, Ok(Some(p)) if p.topic == "dev-a/status" && p.payload == "online" && p.retain)
    })
    .await;
    let mut sub = subscribed(addr_c, "sub2", "dev-a", true, "dev-a/#", QoS::AtLeastOnce).await;
    let first = next_publish(&mut sub.publishes).await;
    assert_eq!(first.topic, "dev-a/status");
    // The cleared one is not among them.
    if let Ok(Some(p)) =
        tokio::time::timeout(Duration::from_millis(500), sub.publishes.recv()).await
    {
        panic!(
            "unexpected retained message on {}: {:?}",
            p.topic, p.payload
        );
    }
}

/// The retained message a fresh subscriber of `dev-a/#` on `addr` gets
/// first (none within half a second: `None`).
async fn retained_on(addr: std::net::SocketAddr, id: &str) -> Option<String> {
    use rumqttc::QoS;
    let mut sub =
        crate::mqtt::subscribed(addr, id, "dev-a", true, "dev-a/#", QoS::AtLeastOnce).await;
    let got = tokio::time::timeout(Duration::from_millis(500), sub.publishes.recv()).await;
    let _ = sub.client.disconnect().await;
    match got {
        Ok(Some(p)) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
        _ => None,
    }
}

/// Publishes a retained QoS 1 message on `addr` as dev-a and waits for its
/// PUBACK (bounded: `within`).
async fn publish_retained(
    addr: std::net::SocketAddr,
    id: &str,
    topic: &str,
    payload: &str,
    within: Duration,
) {
    use rumqttc::QoS;
    let mut p = crate::mqtt::v4_connect(addr, id, crate::mqtt::login("dev-a"), true)
        .await
        .unwrap();
    p.client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_owned())
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(within, p.acks.recv()).await {
            Ok(Some(rumqttc::Packet::PubAck(_))) => break,
            Ok(Some(_)) => {}
            other => panic!("no PUBACK for {payload:?}: {other:?}"),
        }
    }
}

/// Retained writes to etcd: a burst on one topic (one journal batch naming
/// it many times) ends as its last; a write while etcd is down is kept and
/// written when it is back (its PUBACK waits for that); a clear on a node
/// that never saw the message still clears it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_writes_survive_bursts_outages_and_strangers() {
    use rumqttc::QoS;
    let mut etcd = Etcd::start();
    let (_a, addr_a) = mqtt_node(&etcd, "/c5/").await;
    // One connection: the burst, then its last at QoS 1, in order.
    let mut publisher = crate::mqtt::v4_connect(addr_a, "burst", crate::mqtt::login("dev-a"), true)
        .await
        .unwrap();
    for i in 0..300 {
        publisher
            .client
            .publish("dev-a/t", QoS::AtMostOnce, true, format!("v{i}"))
            .await
            .unwrap();
    }
    publisher
        .client
        .publish("dev-a/t", QoS::AtLeastOnce, true, "final")
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), publisher.acks.recv()).await {
            Ok(Some(rumqttc::Packet::PubAck(_))) => break,
            Ok(Some(_)) => {}
            other => panic!("no PUBACK for the burst's last: {other:?}"),
        }
    }
    let (_c, addr_c) = mqtt_node(&etcd, "/c5/").await;
    wait_until(
        PROPAGATION,
        "a new node serves the burst's last",
        || async { retained_on(addr_c, "s1").await.as_deref() == Some("final") },
    )
    .await;

    // etcd away: the PUBACK waits; back: written, and every node has it.
    etcd.stop();
    let waiting = tokio::spawn(publish_retained(
        addr_a,
        "outage",
        "dev-a/t",
        "v2",
        Duration::from_secs(60),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "not acknowledged while etcd is down"
    );
    etcd.resume();
    waiting.await.unwrap();
    let (_d, addr_d) = mqtt_node(&etcd, "/c5/").await;
    for (addr, name) in [(addr_c, "C"), (addr_d, "D (new)")] {
        wait_until(
            PROPAGATION,
            &format!("node {name} serves the write made during the outage"),
            || async { retained_on(addr, "s2").await.as_deref() == Some("v2") },
        )
        .await;
    }

    // A node that never had `dev-a/u` clears it: gone everywhere.
    publish_retained(addr_a, "u1", "dev-a/u", "u1", Duration::from_secs(10)).await;
    let (_e, addr_e) = mqtt_node(&etcd, "/c5/").await;
    publish_retained(addr_e, "u2", "dev-a/u", "", Duration::from_secs(10)).await;
    wait_until(PROPAGATION, "the clear reaches node A", || async {
        let mut sub =
            crate::mqtt::subscribed(addr_a, "s3", "dev-a", true, "dev-a/u", QoS::AtLeastOnce).await;
        let got = tokio::time::timeout(Duration::from_millis(300), sub.publishes.recv()).await;
        let _ = sub.client.disconnect().await;
        got.is_err()
    })
    .await;
}

/// A record this node cannot read makes its re-read fail (and retry); a
/// revocation another node makes meanwhile is refused here all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_apply_while_a_re_read_fails() {
    let etcd = Etcd::start();
    let up = Upstream::echo("bar").await;
    let yaml = node_config(&up, &etcd, "/c6/", "");
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    let t = token(&a, "foo", SECRET, "").await;
    assert_eq!(call_bar(&b, &t).await.status, 200);
    // `/c6/oauth_clients/zz` = "not json", through etcd's JSON gateway.
    let r = send(
        Request::post(format!("{}/v3/kv/put", etcd.endpoint))
            .body(full(
                r#"{"key":"L2M2L29hdXRoX2NsaWVudHMveno=","value":"bm90IGpzb24="}"#,
            ))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = token_call(&a, "/oauth2/revoke", &t, ("foo", SECRET)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(PROPAGATION, "B refuses the token revoked on A", || async {
        call_bar(&b, &t).await.status == 401
    })
    .await;
}
