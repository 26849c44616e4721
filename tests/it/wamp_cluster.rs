//! WAMP across nodes (cluster mode): several gateways in this process on
//! one real `nats-server`, WAMP clients (the hand-written ones of
//! wamp_router.rs) on different nodes.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::bus_nats::cluster::{Nats, raw_publish};
use crate::support::*;
use crate::wamp_router::{Client, config_with, joined};

const WAIT: Duration = Duration::from_secs(20);

/// The fixed bus subscriptions of a node's router: events, inbox, heartbeats.
const FIXED: usize = 3;

async fn node(nats: &Nats) -> (TestGateway, SocketAddr) {
    let bus = format!(
        "bus:\n  nats:\n    servers: ['{}']\n    prefix: tg\n",
        nats.url()
    );
    let gw = TestGateway::start(&config_with(&bus, "")).await;
    let addr = gw.gw.listener_addr("wamp").expect("wamp listener");
    bus_subscriptions(&gw, FIXED).await;
    (gw, addr)
}

/// Waits until the node's router holds `n` subscriptions at the server.
async fn bus_subscriptions(gw: &TestGateway, n: usize) {
    wait_until(WAIT, &format!("{n} WAMP bus subscriptions"), || async {
        metric(&gw.metrics().await, "tollgate_wamp_bus_subscriptions ") == n as f64
    })
    .await;
}

async fn counter(gw: &TestGateway, line: &str) -> f64 {
    metric(&gw.metrics().await, line)
}

/// The next EVENT's args.
async fn event_args(c: &mut Client) -> Value {
    let e = c.recv().await;
    assert_eq!(e[0], 36, "an EVENT: {e}");
    e[4].clone()
}

/// A publication from A reaches B's subscribers (exact and prefix) once,
/// with the same lists and disclosure as on one node; `exclude_me` is the
/// publisher's node's business; A's own subscribers get it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wamp_cluster_events_reach_other_nodes() {
    let nats = Nats::start(None).await;
    let (a, a_addr) = node(&nats).await;
    let (b, b_addr) = node(&nats).await;
    let mut publisher = joined(a_addr, "pub", false, false).await;
    let mut local = joined(a_addr, "a", false, false).await;
    let mut x = joined(b_addr, "x", false, false).await;
    let mut y = joined(b_addr, "y", true, false).await;
    let mut excluded = Client::websocket(b_addr, false).await;
    let excluded_id = excluded.join("realm1", "c").await[1].clone();
    assert_eq!(x.ask(json!([32, 1, {}, "com.test.a.b"])).await[0], 33);
    let prefix = y
        .ask(json!([32, 1, {"match": "prefix"}, "com.test.a"]))
        .await;
    assert_eq!(prefix[0], 33, "{prefix}");
    assert_eq!(
        excluded.ask(json!([32, 1, {}, "com.test.a.b"])).await[0],
        33
    );
    assert_eq!(local.ask(json!([32, 1, {}, "com.test.a.b"])).await[0], 33);
    assert_eq!(
        publisher.ask(json!([32, 1, {}, "com.test.a.b"])).await[0],
        33
    );

    let published = publisher
        .ask(
            json!([16, 1, {"acknowledge": true}, "com.test.a.b", [1, "\u{0}AAEC/w=="], {"k": "v"}]),
        )
        .await;
    assert_eq!(published[0], 17, "{published}");
    let e = x.recv().await;
    assert_eq!(e[0], 36);
    assert_eq!(e[2], published[2], "the publication id travels");
    assert_eq!(e[4], json!([1, "\u{0}AAEC/w=="]), "binary stays binary");
    assert_eq!(e[5], json!({"k": "v"}));
    assert!(e[3].get("topic").is_none(), "exact: {e}");
    assert!(e[3].get("publisher").is_none(), "not disclosed: {e}");
    let e = y.recv().await;
    assert_eq!(e[3]["topic"], "com.test.a.b", "prefix: {e}");
    assert_eq!(event_args(&mut excluded).await, json!([1, "\u{0}AAEC/w=="]));
    assert_eq!(event_args(&mut local).await, json!([1, "\u{0}AAEC/w=="]));

    // Lists by authid, session id and authrole, then a marker every
    // subscriber gets: what comes before it shows who was left out.
    let marker = |n: i64| json!([16, 100 + n, {}, "com.test.a.b", [format!("marker {n}")]]);
    publisher
        .send(json!([16, 2, {"exclude_authid": ["x"]}, "com.test.a.b", [2]]))
        .await;
    publisher.send(marker(2)).await;
    assert_eq!(event_args(&mut x).await, json!(["marker 2"]));
    assert_eq!(event_args(&mut y).await, json!([2]));
    assert_eq!(event_args(&mut y).await, json!(["marker 2"]));
    publisher
        .send(json!([16, 3, {"eligible_authid": ["y", "a"]}, "com.test.a.b", [3]]))
        .await;
    publisher.send(marker(3)).await;
    assert_eq!(event_args(&mut x).await, json!(["marker 3"]));
    assert_eq!(event_args(&mut y).await, json!([3]));
    assert_eq!(event_args(&mut y).await, json!(["marker 3"]));
    publisher
        .send(json!([16, 4, {"exclude": [excluded_id]}, "com.test.a.b", [4]]))
        .await;
    publisher.send(marker(4)).await;
    for c in [&mut excluded] {
        // Events 2 and 3 reached it (neither list named it); 4 did not.
        assert_eq!(event_args(c).await, json!([2]));
        assert_eq!(event_args(c).await, json!(["marker 2"]));
        assert_eq!(event_args(c).await, json!(["marker 3"]));
        assert_eq!(event_args(c).await, json!(["marker 4"]));
    }
    assert_eq!(event_args(&mut x).await, json!([4]));
    assert_eq!(event_args(&mut x).await, json!(["marker 4"]));
    publisher
        .send(json!([16, 5, {"eligible_authrole": ["nobody"]}, "com.test.a.b", [5]]))
        .await;
    publisher.send(marker(5)).await;
    assert_eq!(event_args(&mut x).await, json!(["marker 5"]));

    // exclude_me: false reaches the publisher once (from its own node).
    publisher
        .send(json!([16, 6, {"exclude_me": false}, "com.test.a.b", [6]]))
        .await;
    publisher
        .send(json!([16, 106, {"exclude_me": false}, "com.test.a.b", ["marker 6"]]))
        .await;
    assert_eq!(event_args(&mut publisher).await, json!([6]));
    assert_eq!(event_args(&mut publisher).await, json!(["marker 6"]));
    assert_eq!(event_args(&mut x).await, json!([6]));
    assert_eq!(event_args(&mut x).await, json!(["marker 6"]));
    // A's own subscriber got each once: no copy came back over the bus.
    for want in [
        json!([2]),
        json!(["marker 2"]),
        json!([3]),
        json!(["marker 3"]),
        json!([4]),
        json!(["marker 4"]),
        json!(["marker 5"]),
        json!([6]),
        json!(["marker 6"]),
    ] {
        assert_eq!(event_args(&mut local).await, want);
    }

    for want in [
        json!([4]),
        json!(["marker 4"]),
        json!(["marker 5"]),
        json!([6]),
        json!(["marker 6"]),
    ] {
        assert_eq!(event_args(&mut y).await, want);
    }

    // Disclosure where the publisher's rule says so.
    assert_eq!(
        y.ask(json!([32, 2, {}, "com.test.disclosed.news"])).await[0],
        33
    );
    let publisher_id = {
        let mut p = Client::websocket(a_addr, false).await;
        let id = p.join("realm1", "pub").await[1].clone();
        p.send(json!([16, 7, {}, "com.test.disclosed.news", ["told"]]))
            .await;
        // Its events reach y before this session's GOODBYE matters.
        let e = y.recv().await;
        assert_eq!(e[4], json!(["told"]));
        assert_eq!(e[3]["publisher"], id);
        assert_eq!(e[3]["publisher_authid"], "pub");
        assert_eq!(e[3]["publisher_authrole"], "guest");
        id
    };
    assert!(publisher_id.is_u64());

    let sent = counter(
        &a,
        "tollgate_bus_messages_total{direction=\"sent\",kind=\"wamp\"}",
    )
    .await;
    assert!(sent >= 12.0, "{sent}");
    let received = counter(
        &b,
        "tollgate_bus_messages_total{direction=\"received\",kind=\"wamp\"}",
    )
    .await;
    assert!(received >= 12.0, "{received}");
}

/// A callee on A serves a caller on B: arguments (binary too), errors,
/// progressive results, cancels, timeouts, disclosure; a caller that
/// leaves has its call interrupted; nobody anywhere answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wamp_cluster_calls_reach_a_callee_on_another_node() {
    let nats = Nats::start(None).await;
    let (a, a_addr) = node(&nats).await;
    let (_b, b_addr) = node(&nats).await;
    let mut callee = joined(a_addr, "callee", false, false).await;
    for (i, p) in ["com.test.echo", "com.test.slow", "com.test.disclosed.who"]
        .iter()
        .enumerate()
    {
        let r = callee.ask(json!([64, i + 1, {}, p])).await;
        assert_eq!(r[0], 65, "{r}");
    }
    bus_subscriptions(&a, FIXED + 3).await;
    let mut caller = joined(b_addr, "caller", true, false).await;

    // Arguments and keyword arguments both ways, binary as binary.
    let args = json!(["hi", "\u{0}AAEC/w==", 1.5, -7, {"n": [null, true]}]);
    let kwargs = json!({"bin": "\u{0}/w==", "deep": {"a": [1, 2]}});
    caller
        .send(json!([48, 1, {}, "com.test.echo", args, kwargs]))
        .await;
    let inv = callee.recv().await;
    assert_eq!(inv[0], 68, "{inv}");
    assert_eq!(
        (inv[4].clone(), inv[5].clone()),
        (args.clone(), kwargs.clone())
    );
    assert!(inv[3].get("caller").is_none(), "not disclosed: {inv}");
    callee
        .send(json!([
            70,
            inv[1].clone(),
            {},
            inv[4].clone(),
            inv[5].clone()
        ]))
        .await;
    let r = caller.recv().await;
    assert_eq!(r[0], 50, "{r}");
    assert_eq!(r[1], 1);
    assert_eq!((r[3].clone(), r[4].clone()), (args, kwargs));

    // The callee's ERROR, with its arguments.
    caller.send(json!([48, 2, {}, "com.test.echo", [1]])).await;
    let inv = callee.recv().await;
    callee
        .send(json!([8, 68, inv[1].clone(), {}, "com.test.failed", ["why"], {"code": 7}]))
        .await;
    let r = caller.recv().await;
    assert_eq!(
        r,
        json!([8, 48, 2, {}, "com.test.failed", ["why"], {"code": 7}])
    );

    // Progressive results, in order.
    caller
        .send(json!([48, 3, {"receive_progress": true}, "com.test.slow"]))
        .await;
    let inv = callee.recv().await;
    assert_eq!(inv[3]["receive_progress"], true, "{inv}");
    let id = inv[1].clone();
    callee.send(json!([70, id, {"progress": true}, [1]])).await;
    callee.send(json!([70, id, {"progress": true}, [2]])).await;
    callee.send(json!([70, id, {}, [3]])).await;
    for (n, progress) in [(1, true), (2, true), (3, false)] {
        let r = caller.recv().await;
        assert_eq!(
            (r[0].clone(), r[1].clone(), r[3].clone()),
            (json!(50), json!(3), json!([n]))
        );
        assert_eq!(r[2].get("progress") == Some(&json!(true)), progress, "{r}");
    }

    // killnowait: the caller is answered now, the callee interrupted.
    caller.send(json!([48, 4, {}, "com.test.slow"])).await;
    let inv = callee.recv().await;
    caller.send(json!([49, 4, {}])).await;
    let r = caller.recv().await;
    assert_eq!(
        (r[2].clone(), r[4].clone()),
        (json!(4), json!("wamp.error.canceled"))
    );
    assert_eq!(
        callee.recv().await,
        json!([69, inv[1].clone(), {"mode": "killnowait"}])
    );
    // kill: the callee's ERROR is the answer.
    caller.send(json!([48, 5, {}, "com.test.slow"])).await;
    let inv = callee.recv().await;
    caller.send(json!([49, 5, {"mode": "kill"}])).await;
    assert_eq!(
        callee.recv().await,
        json!([69, inv[1].clone(), {"mode": "kill"}])
    );
    callee
        .send(json!([8, 68, inv[1].clone(), {}, "com.test.stopped"]))
        .await;
    let r = caller.recv().await;
    assert_eq!(
        (r[2].clone(), r[4].clone()),
        (json!(5), json!("com.test.stopped"))
    );

    // The call's timeout runs on the callee's node.
    caller
        .send(json!([48, 6, {"timeout": 100}, "com.test.slow"]))
        .await;
    let inv = callee.recv().await;
    let r = caller.recv().await;
    assert_eq!(
        (r[2].clone(), r[4].clone()),
        (json!(6), json!("wamp.error.timeout"))
    );
    assert_eq!(
        callee.recv().await,
        json!([69, inv[1].clone(), {"mode": "killnowait"}])
    );

    // The caller disclosed where its rule says so.
    caller
        .send(json!([48, 7, {}, "com.test.disclosed.who"]))
        .await;
    let inv = callee.recv().await;
    assert_eq!(inv[3]["caller_authid"], "caller");
    assert_eq!(inv[3]["caller_authrole"], "guest");
    assert!(inv[3]["caller"].is_u64(), "{inv}");
    callee.send(json!([70, inv[1].clone(), {}, ["ok"]])).await;
    assert_eq!(caller.recv().await[3], json!(["ok"]));

    // Nobody registered it anywhere: answered at once.
    let r = caller.ask(json!([48, 8, {}, "com.test.nobody"])).await;
    assert_eq!(
        (r[0].clone(), r[2].clone(), r[4].clone()),
        (json!(8), json!(8), json!("wamp.error.no_such_procedure"))
    );

    // At most three calls waiting (max_pending_calls: 3), across nodes too.
    for i in 0..3 {
        caller.send(json!([48, 10 + i, {}, "com.test.slow"])).await;
        assert_eq!(callee.recv().await[0], 68);
    }
    let refused = caller.ask(json!([48, 13, {}, "com.test.slow"])).await;
    assert_eq!(
        (refused[2].clone(), refused[4].clone()),
        (json!(13), json!("wamp.error.canceled"))
    );
    // A caller that leaves: its node tells the callee's, which interrupts.
    drop(caller);
    for _ in 0..3 {
        assert_eq!(callee.recv().await[0], 69);
    }
}

/// Answers every INVOCATION with its own name, until the connection ends.
fn serve(mut c: Client, name: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = c.try_recv(Duration::from_secs(60)).await {
            if m[0] == 68 {
                c.send(json!([70, m[1].clone(), {}, [name]])).await;
            }
        }
    })
}

/// A shared registration with callees on A and B: calls from C (which has
/// none) and from A reach both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wamp_cluster_shared_registrations_span_nodes() {
    let nats = Nats::start(None).await;
    let (a, a_addr) = node(&nats).await;
    let (b, b_addr) = node(&nats).await;
    let (_c, c_addr) = node(&nats).await;
    let mut on_a = joined(a_addr, "a", false, false).await;
    let mut on_b = joined(b_addr, "b", false, false).await;
    for c in [&mut on_a, &mut on_b] {
        let r = c
            .ask(json!([64, 1, {"invoke": "roundrobin"}, "com.test.shared"]))
            .await;
        assert_eq!(r[0], 65, "{r}");
    }
    bus_subscriptions(&a, FIXED + 1).await;
    bus_subscriptions(&b, FIXED + 1).await;
    let (sa, sb) = (serve(on_a, "a"), serve(on_b, "b"));
    for from in [c_addr, a_addr] {
        let mut caller = joined(from, "caller", false, false).await;
        let mut served = std::collections::BTreeMap::new();
        // Each node is picked at random: 40 calls miss one with a
        // probability of 2^-39.
        for i in 0..40 {
            let r = caller.ask(json!([48, i + 1, {}, "com.test.shared"])).await;
            assert_eq!(r[0], 50, "{r}");
            *served
                .entry(r[3][0].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        assert_eq!(served.len(), 2, "both nodes served: {served:?}");
    }
    sa.abort();
    sb.abort();
}

/// The callee's node stops mid-call: the caller gets an error within
/// seconds, never hangs; a node alone answers what it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wamp_cluster_a_lost_node_fails_its_calls() {
    let nats = Nats::start(None).await;
    let (a, a_addr) = node(&nats).await;
    let (b, b_addr) = node(&nats).await;
    let mut callee = joined(a_addr, "callee", false, false).await;
    assert_eq!(callee.ask(json!([64, 1, {}, "com.test.slow"])).await[0], 65);
    bus_subscriptions(&a, FIXED + 1).await;
    let mut caller = joined(b_addr, "caller", false, false).await;
    caller.send(json!([48, 1, {}, "com.test.slow"])).await;
    assert_eq!(callee.recv().await[0], 68);
    drop(a);
    let r = caller.try_recv(WAIT).await.expect("an answer, not a hang");
    assert_eq!((r[0].clone(), r[2].clone()), (json!(8), json!(1)), "{r}");
    assert!(
        r[4] == "wamp.error.canceled" || r[4] == "tollgate.error.node_lost",
        "{r}"
    );
    drop(callee);
    // Later calls: once the node's registration is gone from the bus,
    // nobody has the procedure (meanwhile a call may still fail as lost).
    let mut request = 1;
    loop {
        request += 1;
        caller.send(json!([48, request, {}, "com.test.slow"])).await;
        let r = caller.try_recv(WAIT).await.expect("an answer, not a hang");
        assert_eq!(
            (r[0].clone(), r[2].clone()),
            (json!(8), json!(request)),
            "{r}"
        );
        if r[4] == "wamp.error.no_such_procedure" {
            break;
        }
        assert!(request < 10, "still not gone: {r}");
    }

    // Without the bus: a call that needs another node fails at once, with
    // a clear error; what this node has goes on.
    let mut local = joined(b_addr, "callee", false, false).await;
    assert_eq!(local.ask(json!([64, 1, {}, "com.test.here"])).await[0], 65);
    drop(nats);
    wait_until(WAIT, "the bus is down", || async {
        counter(&b, "tollgate_bus_connected ").await == 0.0
    })
    .await;
    let r = caller.ask(json!([48, 20, {}, "com.test.elsewhere"])).await;
    assert_eq!(r[4], "tollgate.error.cluster_unavailable", "{r}");
    caller.send(json!([48, 21, {}, "com.test.here"])).await;
    let inv = local.recv().await;
    local.send(json!([70, inv[1].clone(), {}, ["here"]])).await;
    assert_eq!(caller.recv().await[3], json!(["here"]));
}

/// Anyone on the NATS server may publish anything to the WAMP subjects:
/// garbage and frames no tollgate writes are dropped and counted, and
/// events and calls go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wamp_cluster_hostile_bus_messages_are_dropped_and_counted() {
    let nats = Nats::start(None).await;
    let (a, a_addr) = node(&nats).await;
    let (b, b_addr) = node(&nats).await;
    let mut callee = joined(a_addr, "callee", false, false).await;
    assert_eq!(callee.ask(json!([64, 1, {}, "com.test.echo"])).await[0], 65);
    bus_subscriptions(&a, FIXED + 1).await;
    let mut sub = joined(b_addr, "x", false, false).await;
    assert_eq!(sub.ask(json!([32, 1, {}, "com.test.a.b"])).await[0], 33);
    let node_id = |gw: &TestGateway| {
        gw.gw.status()["bus"]["node_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (a_id, b_id) = (node_id(&a), node_id(&b));
    let frame = |kind: u8, fields: Value| {
        let mut f = vec![1u8, kind];
        f.extend_from_slice(&7u64.to_be_bytes());
        f.extend(rmp_serde::to_vec(&fields).unwrap());
        f
    };
    let event = "tg.wamp.realm1.event".to_owned();
    let proc_ = "tg.wamp.realm1.proc.com%2Etest%2Eecho".to_owned();
    let hostile: Vec<(String, Vec<u8>)> = vec![
        (event.clone(), b"".to_vec()),
        (event.clone(), vec![0xff; 64]),
        (event.clone(), vec![2, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0x90]),
        (event.clone(), frame(1, json!(["realm1"]))),
        (event.clone(), {
            let mut deep = frame(1, json!([]));
            deep.truncate(10);
            deep.extend(std::iter::repeat_n(0x91, 50_000));
            deep
        }),
        // Meta events are the router's own.
        (
            event.clone(),
            frame(
                1,
                json!(["realm1", "wamp.session.on_join", 1, null, {}, null, null]),
            ),
        ),
        // An event under another realm's subject.
        (
            event.clone(),
            frame(
                1,
                json!(["realm2", "com.test.a.b", 1, null, {}, null, null]),
            ),
        ),
        // Options that are not black/white lists.
        (
            event.clone(),
            frame(
                1,
                json!(["realm1", "com.test.a.b", 1, null, {"exclude_me": false}, null, null]),
            ),
        ),
        (format!("tg.wamp.node.{b_id}"), vec![1, 5, 0]),
        (format!("tg.wamp.node.{b_id}"), frame(3, json!([]))),
        (
            format!("tg.wamp.node.{a_id}"),
            frame(7, json!(["realm1", 1, "explode"])),
        ),
        ("tg.wamp.nodes".to_owned(), frame(8, json!([1]))),
        (proc_.clone(), vec![0; 9]),
        // A well-formed call without a reply subject.
        (
            proc_.clone(),
            frame(
                2,
                json!(["realm1", 1, "com.test.echo", null, false, 0, null, null]),
            ),
        ),
    ];
    raw_publish(nats.port, &hostile).await;
    // Each node counts what reached it: events and heartbeats both, each
    // inbox its own, the call subject its one subscriber (A).
    let malformed = "tollgate_bus_dropped_total{reason=\"malformed\"}";
    wait_until(WAIT, "every hostile message counted", || async {
        counter(&a, malformed).await == 12.0 && counter(&b, malformed).await == 11.0
    })
    .await;
    // Nothing reached a client; both nodes still serve across.
    let mut publisher = joined(a_addr, "pub", false, false).await;
    publisher
        .send(json!([16, 1, {}, "com.test.a.b", ["after"]]))
        .await;
    assert_eq!(event_args(&mut sub).await, json!(["after"]));
    let mut caller = joined(b_addr, "caller", false, false).await;
    caller.send(json!([48, 1, {}, "com.test.echo", [1]])).await;
    let inv = callee.recv().await;
    assert_eq!(inv[0], 68, "only the real call came: {inv}");
    callee.send(json!([70, inv[1].clone(), {}, ["fine"]])).await;
    assert_eq!(caller.recv().await[3], json!(["fine"]));
}

/// A node that takes a call and then goes silent (a crash, a partition):
/// the caller's node fails the call once it has not heard from that node
/// for a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wamp_cluster_a_silent_node_fails_its_calls() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let nats = Nats::start(None).await;
    let (b, b_addr) = node(&nats).await;
    // The other node, on raw NATS: it offers the procedure like a node.
    let subject = "tg.wamp.realm1.proc.com%2Etest%2Eghost";
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    write
        .write_all(
            format!("CONNECT {{\"verbose\":false}}\r\nSUB {subject} {subject} 1\r\nPING\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    line.clear();
    read.read_line(&mut line).await.unwrap();
    assert_eq!(line, "PONG\r\n");

    let mut caller = joined(b_addr, "caller", false, false).await;
    caller
        .send(json!([48, 1, {}, "com.test.ghost", ["boo"]]))
        .await;
    // The hand-off: MSG <subject> <sid> <reply> <len>.
    line.clear();
    read.read_line(&mut line).await.unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((parts[0], parts[1]), ("MSG", subject), "{line}");
    let (reply, len) = (parts[3].to_owned(), parts[4].parse::<usize>().unwrap());
    let mut payload = vec![0u8; len + 2];
    read.read_exact(&mut payload).await.unwrap();
    assert_eq!(&payload[..2], &[1, 2], "a version 1 call");
    // "Accepted by node 0x99", then silence.
    let mut accepted = vec![1u8, 3];
    accepted.extend_from_slice(&0x99u64.to_be_bytes());
    accepted.push(0x90);
    write
        .write_all(format!("PUB {reply} {}\r\n", accepted.len()).as_bytes())
        .await
        .unwrap();
    write.write_all(&accepted).await.unwrap();
    write.write_all(b"\r\n").await.unwrap();
    let r = caller.try_recv(WAIT).await.expect("an answer, not a hang");
    assert_eq!(
        (r[0].clone(), r[2].clone(), r[4].clone()),
        (json!(8), json!(1), json!("tollgate.error.node_lost")),
        "{r}"
    );
    assert!(counter(&b, "tollgate_wamp_call_errors_total{realm=\"realm1\"}").await >= 1.0);
    drop(write);
}

/// Prefix and wildcard registrations serve their own node (when no node
/// has an exact one); `single` is unique per node, and a node's own
/// `single` callee serves its callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wamp_cluster_pattern_and_single_registrations_are_per_node() {
    let nats = Nats::start(None).await;
    let (a, a_addr) = node(&nats).await;
    let (b, b_addr) = node(&nats).await;
    let mut on_b = joined(b_addr, "b", false, false).await;
    let r = on_b
        .ask(json!([64, 1, {"match": "prefix"}, "com.test.pat."]))
        .await;
    assert_eq!(r[0], 65, "{r}");
    let mut on_a = joined(a_addr, "a", false, false).await;
    for c in [&mut on_a, &mut on_b] {
        let r = c.ask(json!([64, 2, {}, "com.test.single"])).await;
        assert_eq!(r[0], 65, "single on each node: {r}");
    }
    bus_subscriptions(&a, FIXED + 1).await;
    bus_subscriptions(&b, FIXED + 1).await;

    let mut caller_b = joined(b_addr, "caller", false, false).await;
    caller_b
        .send(json!([48, 1, {}, "com.test.pat.x", [1]]))
        .await;
    let inv = on_b.recv().await;
    assert_eq!(inv[3]["procedure"], "com.test.pat.x", "{inv}");
    on_b.send(json!([70, inv[1].clone(), {}, ["b"]])).await;
    assert_eq!(caller_b.recv().await[3], json!(["b"]));
    let mut caller_a = joined(a_addr, "caller", false, false).await;
    let r = caller_a.ask(json!([48, 1, {}, "com.test.pat.x"])).await;
    assert_eq!(r[4], "wamp.error.no_such_procedure", "{r}");

    // Each node's own `single` callee serves its callers.
    for (caller, callee, name) in [
        (&mut caller_a, &mut on_a, "a"),
        (&mut caller_b, &mut on_b, "b"),
    ] {
        caller.send(json!([48, 2, {}, "com.test.single"])).await;
        let inv = callee.recv().await;
        assert_eq!(inv[0], 68, "{inv}");
        callee.send(json!([70, inv[1].clone(), {}, [name]])).await;
        assert_eq!(caller.recv().await[3], json!([name]));
    }
}
