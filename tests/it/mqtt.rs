//! The MQTT broker with real clients: rumqttc (3.1.1 and 5) in-process,
//! mosquitto's command-line clients and Python's paho-mqtt as separate
//! programs.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as V5Code, Packet as V5Packet};
use rumqttc::{ConnectReturnCode, Event, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::support::*;

pub(crate) const PASSWORD: &str = "pw-of-every-test-user";

/// A gateway with an MQTT listener, MQTT over WebSocket at `/mqtt` on the
/// HTTP listener, users `dev-a`, `dev-b`, `+` and `#`, and the default rule
/// (`%u/#`) plus `shared/#` for everyone.
async fn broker(extra_mqtt: &str) -> (TestGateway, SocketAddr) {
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let users: String = ["dev-a", "dev-b", "+", "#"]
        .iter()
        .map(|u| format!("    - {{ name: '{u}', password_hash: '{hash}', roles: [device] }}\n"))
        .collect();
    let yaml = format!(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\n\
admin:\n  bind: 127.0.0.1:0\nproxy:\n  access_log: false\nauth:\n  users:\n{users}\
mqtt:\n  websocket: {{ path: /mqtt }}\n  sys_interval: 1s\n  policy:\n    - allow: {{ actions: [publish, subscribe], topics: ['%u/#'] }}\n    - allow: {{ actions: [publish, subscribe], topics: ['shared/#'] }}\n{extra_mqtt}"
    );
    let gw = TestGateway::start(&yaml).await;
    let addr = gw.gw.listener_addr("mqtt").expect("mqtt listener");
    (gw, addr)
}

/// A 3.1.1 client: its handle, what it receives, and its CONNACK code.
pub(crate) struct V4 {
    pub(crate) client: rumqttc::AsyncClient,
    pub(crate) publishes: mpsc::UnboundedReceiver<rumqttc::Publish>,
    pub(crate) acks: mpsc::UnboundedReceiver<Packet>,
}

pub(crate) async fn v4_connect(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
    clean: bool,
) -> Result<V4, ConnectReturnCode> {
    let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
    let (pub_tx, publishes) = mpsc::unbounded_channel();
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
    let mut conn_tx = Some(conn_tx);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(Ok(a.code));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = pub_tx.send(p);
                }
                Ok(Event::Incoming(
                    p @ (Packet::SubAck(_)
                    | Packet::PubAck(_)
                    | Packet::PubComp(_)
                    | Packet::UnsubAck(_)),
                )) => {
                    let _ = ack_tx.send(p);
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(Err(code));
                    }
                    return;
                }
                Err(_) => return,
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), conn_rx).await {
        Ok(Ok(Ok(ConnectReturnCode::Success))) => Ok(V4 {
            client,
            publishes,
            acks,
        }),
        Ok(Ok(Ok(code))) | Ok(Ok(Err(code))) => Err(code),
        other => panic!("no CONNACK: {other:?}"),
    }
}

/// A 3.1.1 client of `user` subscribed to `filter` (its SUBACK read).
pub(crate) async fn subscribed(
    addr: SocketAddr,
    id: &str,
    user: &str,
    clean: bool,
    filter: &str,
    qos: QoS,
) -> V4 {
    let mut c = v4_connect(addr, id, login(user), clean).await.unwrap();
    c.client.subscribe(filter, qos).await.unwrap();
    suback(&mut c).await;
    c
}

/// An admin API call with an optional JSON body.
async fn admin_call(
    gw: &TestGateway,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> TestResponse {
    let body = body.map_or(String::new(), |b| b.to_string());
    send(
        http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", gw.gw.admin_addr()))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap(),
    )
    .await
}

pub(crate) async fn next_publish(
    rx: &mut mpsc::UnboundedReceiver<rumqttc::Publish>,
) -> rumqttc::Publish {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message within 5s")
        .expect("client running")
}

async fn nothing_within(rx: &mut mpsc::UnboundedReceiver<rumqttc::Publish>, ms: u64) {
    if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(ms), rx.recv()).await {
        panic!("unexpected message on {}: {:?}", p.topic, p.payload);
    }
}

async fn suback(c: &mut V4) -> Vec<rumqttc::SubscribeReasonCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.acks.recv()).await {
            Ok(Some(Packet::SubAck(s))) => return s.return_codes,
            Ok(Some(_)) => continue,
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

pub(crate) fn login(user: &str) -> Option<(&str, &str)> {
    Some((user, PASSWORD))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_reach_subscribers_of_both_versions() {
    let (_gw, addr) = broker("").await;
    let mut sub4 = v4_connect(addr, "sub4", login("dev-a"), true)
        .await
        .unwrap();
    sub4.client
        .subscribe("shared/#", QoS::ExactlyOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut sub4).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );

    // A v5 subscriber at QoS 1: deliveries are downgraded to it.
    let mut opts = rumqttc::v5::MqttOptions::new("sub5", addr.ip().to_string(), addr.port());
    opts.set_credentials("dev-b", PASSWORD);
    let (sub5, mut events5) = rumqttc::v5::AsyncClient::new(opts, 64);
    let (tx5, mut rx5) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = events5.poll().await {
            if let rumqttc::v5::Event::Incoming(V5Packet::Publish(p)) = ev {
                let _ = tx5.send(p);
            }
        }
    });
    sub5.subscribe("shared/+", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let publisher = v4_connect(addr, "pub", login("dev-b"), true).await.unwrap();
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publisher
            .client
            .publish("shared/t", qos, false, format!("m{i}"))
            .await
            .unwrap();
        let got = next_publish(&mut sub4.publishes).await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..], got.qos),
            ("shared/t", format!("m{i}").as_bytes(), qos)
        );
        let got5 = tokio::time::timeout(Duration::from_secs(5), rx5.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got5.payload[..], format!("m{i}").as_bytes());
        let expected = if qos == QoS::AtMostOnce {
            rumqttc::v5::mqttbytes::QoS::AtMostOnce
        } else {
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce
        };
        assert_eq!(got5.qos, expected, "min(published, subscribed)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_and_refused_with_the_right_code() {
    let (gw, addr) = broker("").await;
    assert_eq!(
        v4_connect(addr, "x", Some(("dev-a", "wrong")), true)
            .await
            .err(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        v4_connect(addr, "x", Some(("nobody", PASSWORD)), true)
            .await
            .err(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        v4_connect(addr, "x", None, true).await.err(),
        Some(ConnectReturnCode::NotAuthorized),
        "no anonymous clients unless enabled"
    );
    // 3.1.1: an empty client id only with a clean session (identifier
    // rejected, 0x02).
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut persistent = connect_packet("", "dev-a", PASSWORD, None);
    // The flags follow `MQTT` and the level.
    let flags = persistent.windows(4).position(|w| w == b"MQTT").unwrap() + 5;
    persistent[flags] &= !0b10;
    tcp.write_all(&persistent).await.unwrap();
    let mut ack = [0u8; 4];
    tcp.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 2]);
    assert!(v4_connect(addr, "", login("dev-a"), true).await.is_ok());
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_mqtt_auth_failures_total{listener=\"mqtt\",reason=\"bad_credentials\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_mqtt_auth_failures_total{listener=\"mqtt\",reason=\"not_authorized\"}"
        ),
        1.0
    );

    // v5: a CONNECT with an empty id gets one assigned.
    let mut opts = rumqttc::v5::MqttOptions::new("", addr.ip().to_string(), addr.port());
    opts.set_credentials("dev-a", PASSWORD);
    let (_c, mut events) = rumqttc::v5::AsyncClient::new(opts, 8);
    let ack = loop {
        match events.poll().await.unwrap() {
            rumqttc::v5::Event::Incoming(V5Packet::ConnAck(a)) => break a,
            _ => continue,
        }
    };
    assert_eq!(ack.code, V5Code::Success);
    let props = ack.properties.unwrap();
    assert!(
        props
            .assigned_client_identifier
            .unwrap()
            .starts_with("auto-")
    );
    assert_eq!(props.receive_max, Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_per_user_and_wildcards_do_not_escape() {
    let (gw, addr) = broker("").await;
    let mut a = v4_connect(addr, "a", login("dev-a"), true).await.unwrap();
    let mut b = v4_connect(addr, "b", login("dev-b"), true).await.unwrap();
    b.client
        .subscribe("dev-b/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut b).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // `dev-a` may not subscribe to another user's topics, to `#`, `+/#`,
    // or anything wider than its own.
    for filter in ["dev-b/#", "#", "+/#", "+/x", "dev-a/../dev-b"] {
        a.client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
        let codes = suback(&mut a).await;
        let own = filter == "dev-a/../dev-b";
        assert_eq!(
            codes,
            [if own {
                rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)
            } else {
                rumqttc::SubscribeReasonCode::Failure
            }],
            "{filter}"
        );
    }
    // A publish to another user's topic is acknowledged (3.1.1 has no
    // refusal) and dropped.
    a.client
        .publish("dev-b/cmd", QoS::AtLeastOnce, false, "evil")
        .await
        .unwrap();
    nothing_within(&mut b.publishes, 500).await;
    a.client
        .publish("dev-a/ok", QoS::AtLeastOnce, false, "fine")
        .await
        .unwrap();
    // Users named `+` and `#` get nothing wider than a literal level.
    for user in ["+", "#"] {
        let mut w = v4_connect(
            addr,
            &format!("w-{}", if user == "+" { "plus" } else { "hash" }),
            login(user),
            true,
        )
        .await
        .unwrap();
        for filter in ["dev-b/#", "+/#", "#"] {
            w.client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
            assert_eq!(
                suback(&mut w).await,
                [rumqttc::SubscribeReasonCode::Failure],
                "user {user} filter {filter}"
            );
        }
        w.client
            .publish("dev-b/x", QoS::AtMostOnce, false, "no")
            .await
            .unwrap();
    }
    nothing_within(&mut b.publishes, 300).await;
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_mqtt_acl_denied_total{action=\"subscribe\",listener=\"mqtt\"}"
        ) >= 10.0
    );
    assert!(
        metric(
            &m,
            "tollgate_mqtt_acl_denied_total{action=\"publish\",listener=\"mqtt\"}"
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_kept_and_cleared() {
    let (_gw, addr) = broker("").await;
    let p = v4_connect(addr, "p", login("dev-a"), true).await.unwrap();
    p.client
        .publish("shared/state", QoS::AtLeastOnce, true, "on")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = v4_connect(addr, "s", login("dev-b"), true).await.unwrap();
    s.client
        .subscribe("shared/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = next_publish(&mut s.publishes).await;
    assert_eq!((&got.payload[..], got.retain), (&b"on"[..], true));
    // Live messages are not flagged retained; an empty retained payload clears.
    p.client
        .publish("shared/state", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    let live = next_publish(&mut s.publishes).await;
    assert!(!live.retain);
    let mut late = v4_connect(addr, "late", login("dev-b"), true)
        .await
        .unwrap();
    late.client
        .subscribe("shared/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    nothing_within(&mut late.publishes, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_when_a_client_vanishes() {
    let (_gw, addr) = broker("").await;
    let mut watcher = v4_connect(addr, "watch", login("dev-b"), true)
        .await
        .unwrap();
    watcher
        .client
        .subscribe("shared/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut watcher).await;
    // A raw 3.1.1 CONNECT with a will, then the socket just closes.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&connect_packet(
        "vanisher",
        "dev-a",
        PASSWORD,
        Some(("shared/status", "gone")),
    ))
    .await
    .unwrap();
    let mut ack = [0u8; 4];
    tcp.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    drop(tcp);
    let will = next_publish(&mut watcher.publishes).await;
    assert_eq!(&will.payload[..], b"gone");

    // A clean DISCONNECT discards it.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&connect_packet(
        "polite",
        "dev-a",
        PASSWORD,
        Some(("shared/status", "gone")),
    ))
    .await
    .unwrap();
    tcp.read_exact(&mut ack).await.unwrap();
    tcp.write_all(&[0xE0, 0]).await.unwrap();
    drop(tcp);
    nothing_within(&mut watcher.publishes, 500).await;
}

/// A 3.1.1 CONNECT (clean session, keep alive 30 s) with a login and an
/// optional will (QoS 1).
fn connect_packet(id: &str, user: &str, password: &str, will: Option<(&str, &str)>) -> Vec<u8> {
    let s = |v: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        out.extend_from_slice(v);
    };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    let mut flags = 0b1100_0010;
    if will.is_some() {
        flags |= 0b0000_1100;
    }
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    s(id.as_bytes(), &mut body);
    if let Some((t, m)) = will {
        s(t.as_bytes(), &mut body);
        s(m.as_bytes(), &mut body);
    }
    s(user.as_bytes(), &mut body);
    s(password.as_bytes(), &mut body);
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_what_was_published_while_away() {
    let (_gw, addr) = broker("").await;
    let s = subscribed(addr, "keeper", "dev-b", false, "shared/q", QoS::AtLeastOnce).await;
    s.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p = v4_connect(addr, "p", login("dev-a"), true).await.unwrap();
    for i in 0..3 {
        p.client
            .publish("shared/q", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut back = v4_connect(addr, "keeper", login("dev-b"), false)
        .await
        .unwrap();
    for i in 0..3 {
        let got = next_publish(&mut back.publishes).await;
        assert_eq!(got.payload, format!("{i}").as_bytes());
    }
    // A clean session starts empty.
    let mut fresh = v4_connect(addr, "keeper", login("dev-b"), true)
        .await
        .unwrap();
    p.client
        .publish("shared/q", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    nothing_within(&mut fresh.publishes, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_packets_close_only_their_connection() {
    let (gw, addr) = broker("  limits: { max_packet_size: 1KiB }\n").await;
    let mut ok = subscribed(addr, "ok", "dev-a", true, "dev-a/#", QoS::AtMostOnce).await;
    let attempts: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        // A CONNECT for protocol level 3 (MQTT 3.1).
        b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x00",
        // A remaining length of five bytes.
        b"\x10\xff\xff\xff\xff\x7f",
        // A PUBLISH announcing 2 MiB.
        b"\x30\x80\x80\x80\x01",
    ];
    for raw in attempts {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(raw).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "closed: {raw:?}");
    }
    // Connected, then an oversized PUBLISH.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&connect_packet("big", "dev-a", PASSWORD, None))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    tcp.read_exact(&mut ack).await.unwrap();
    let mut publish = vec![0x30, 0x80, 0x10, 0, 7];
    publish.extend_from_slice(b"dev-a/x");
    publish.extend(std::iter::repeat_n(b'x', 2048));
    let _ = tcp.write_all(&publish).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    // The other client is unaffected.
    let p = v4_connect(addr, "p", login("dev-a"), true).await.unwrap();
    p.client
        .publish("dev-a/x", QoS::AtMostOnce, false, "still here")
        .await
        .unwrap();
    assert_eq!(
        &next_publish(&mut ok.publishes).await.payload[..],
        b"still here"
    );
    drop(gw);
}

/// mosquitto's own clients, as separate programs, through tollgate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_interoperate() {
    let (_gw, addr) = broker("").await;
    let port = addr.port().to_string();
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "dev-b",
            "-P",
            PASSWORD,
        ])
        .args([
            "-t", "shared/m", "-q", "2", "-C", "2", "-V", "mqttv5", "-W", "10",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian mosquitto-clients)");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (msg, version) in [("from-311", "mqttv311"), ("from-5", "mqttv5")] {
        let status = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-u",
                "dev-a",
                "-P",
                PASSWORD,
            ])
            .args(["-t", "shared/m", "-q", "2", "-m", msg, "-V", version])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }
    let out = sub.wait_with_output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-311\nfrom-5\n");
    // A refused login is an error for mosquitto_pub too.
    let refused = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-u", "dev-a", "-P", "nope"])
        .args(["-t", "dev-a/x", "-m", "x"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
}

/// Python's paho-mqtt over WebSocket (subprotocol `mqtt`) on the HTTP
/// listener, meeting a TCP client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_websocket_meets_a_tcp_client() {
    let (gw, addr) = broker("").await;
    let mut tcp = subscribed(addr, "tcp", "dev-b", true, "shared/ws", QoS::AtLeastOnce).await;
    let script = format!(
        r#"
import paho.mqtt.client as mqtt, sys, time
got = []
c = mqtt.Client(client_id="paho-ws", transport="websockets")
c.ws_set_options(path="/mqtt")
c.username_pw_set("dev-a", "{PASSWORD}")
c.on_message = lambda c, u, m: got.append(m.payload.decode())
rc = c.connect("127.0.0.1", {port}, 30)
c.subscribe("shared/back", 1)
c.loop_start()
time.sleep(0.5)
c.publish("shared/ws", "over-ws", qos=1).wait_for_publish(5)
for _ in range(50):
    if got: break
    time.sleep(0.1)
c.loop_stop()
print(",".join(got))
"#,
        port = gw.addr().port()
    );
    let child = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with paho-mqtt (python3-paho-mqtt)");
    let got = next_publish(&mut tcp.publishes).await;
    assert_eq!(&got.payload[..], b"over-ws");
    tcp.client
        .publish("shared/back", QoS::AtLeastOnce, false, "to-ws")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "to-ws",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Acknowledged means kept: a persistent session's queued QoS 1 and 2
/// messages and retained messages survive `kill -9` and a clean restart,
/// and what was delivered and acknowledged is not delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kill_9_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    std::fs::write(
        &file,
        format!(
            "listeners:\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\n  - name: sidecar\n    bind: 127.0.0.1:0\n\
admin:\n  bind: 127.0.0.1:0\nauth:\n  users:\n    - {{ name: dev-a, password_hash: '{hash}' }}\n    - {{ name: dev-b, password_hash: '{hash}' }}\n\
mqtt:\n  policy:\n    - allow: {{ actions: [publish, subscribe], topics: ['shared/#'] }}\n"
        ),
    )
    .unwrap();
    let (mut child, addr, _logs) = run_binary(&file);
    let mut keeper = v4_connect(addr, "keeper", login("dev-b"), false)
        .await
        .unwrap();
    keeper
        .client
        .subscribe("shared/d", QoS::ExactlyOnce)
        .await
        .unwrap();
    suback(&mut keeper).await;
    keeper.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut publisher = v4_connect(addr, "pub", login("dev-a"), true).await.unwrap();
    for i in 0..5 {
        publisher
            .client
            .publish("shared/d", QoS::AtLeastOnce, false, format!("q1-{i}"))
            .await
            .unwrap();
    }
    publisher
        .client
        .publish("shared/d", QoS::ExactlyOnce, false, "q2")
        .await
        .unwrap();
    publisher
        .client
        .publish("shared/ret", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    // Every one acknowledged (PUBACK, PUBCOMP) before the crash.
    let mut acked = 0;
    while acked < 7 {
        match tokio::time::timeout(Duration::from_secs(5), publisher.acks.recv()).await {
            Ok(Some(Packet::PubAck(_) | Packet::PubComp(_))) => acked += 1,
            Ok(Some(_)) => {}
            other => panic!("acknowledgements: {acked} then {other:?}"),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, addr, _logs) = run_binary(&file);
    let mut back = v4_connect(addr, "keeper", login("dev-b"), false)
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(
            String::from_utf8(next_publish(&mut back.publishes).await.payload.to_vec()).unwrap(),
        );
    }
    assert_eq!(got, ["q1-0", "q1-1", "q1-2", "q1-3", "q1-4", "q2"]);
    let mut late = v4_connect(addr, "late", login("dev-a"), true)
        .await
        .unwrap();
    late.client
        .subscribe("shared/ret", QoS::AtLeastOnce)
        .await
        .unwrap();
    let retained = next_publish(&mut late.publishes).await;
    assert_eq!(
        (&retained.payload[..], retained.retain),
        (&b"kept"[..], true)
    );
    // Let the acknowledgements reach the journal, then stop cleanly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    back.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();

    let (mut child, addr, _logs) = run_binary(&file);
    let mut again = v4_connect(addr, "keeper", login("dev-b"), false)
        .await
        .unwrap();
    nothing_within(&mut again.publishes, 700).await;
    let mut late = v4_connect(addr, "late2", login("dev-a"), true)
        .await
        .unwrap();
    late.client
        .subscribe("shared/ret", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        &next_publish(&mut late.publishes).await.payload[..],
        b"kept"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Operators see the sessions and can end one; a reload that narrows the
/// rules takes away subscriptions a connected client may no longer hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_and_kicked_and_reloaded_rules_apply_at_once() {
    let (gw, addr) = broker("").await;
    let mut a = subscribed(
        addr,
        "watcher",
        "dev-a",
        true,
        "shared/news",
        QoS::AtLeastOnce,
    )
    .await;
    let list = admin_call(&gw, http::Method::GET, "/admin/mqtt/sessions", None)
        .await
        .json();
    let me = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["client_id"] == "watcher")
        .expect("listed")
        .clone();
    assert_eq!(me["user"], "dev-a");
    assert_eq!(me["connected"], true);
    assert_eq!(me["subscriptions"], serde_json::json!(["shared/news"]));

    // A reload without `shared/#`: the subscription goes, live.
    let yaml = std::fs::read_to_string(&gw.path).unwrap();
    gw.write_config(&yaml.replace(
        "    - allow: { actions: [publish, subscribe], topics: ['shared/#'] }\n",
        "",
    ));
    gw.gw.reload().await.expect("reload");
    let list = admin_call(&gw, http::Method::GET, "/admin/mqtt/sessions", None)
        .await
        .json();
    let me = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["client_id"] == "watcher")
        .unwrap()
        .clone();
    assert_eq!(me["subscriptions"], serde_json::json!([]));
    let p = v4_connect(addr, "p", login("dev-b"), true).await.unwrap();
    p.client
        .publish("shared/news", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    nothing_within(&mut a.publishes, 400).await;

    // Kicked: the client is disconnected and its session is gone.
    assert_eq!(
        admin_call(
            &gw,
            http::Method::DELETE,
            "/admin/mqtt/sessions/watcher",
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(
        admin_call(
            &gw,
            http::Method::DELETE,
            "/admin/mqtt/sessions/watcher",
            None
        )
        .await
        .status,
        404
    );
    let list = admin_call(&gw, http::Method::GET, "/admin/mqtt/sessions", None)
        .await
        .json();
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["client_id"] != "watcher")
    );
}

/// A subscriber that stops reading: what waits for it is bounded (in
/// flight, then queued), the rest is dropped and counted, and publishers
/// and other subscribers go on at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_bounded_and_its_drops_counted() {
    let (gw, addr) = broker("  limits: { max_queued_messages: 100, max_inflight: 20 }\n").await;
    // Subscribes at QoS 1, then never reads or acknowledges again.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(&connect_packet("slow", "dev-b", PASSWORD, None))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    slow.read_exact(&mut ack).await.unwrap();
    let mut sub = vec![0x82, 0, 0, 1, 0, 11];
    sub.extend_from_slice(b"shared/slow");
    sub.push(1);
    sub[1] = (sub.len() - 2) as u8;
    slow.write_all(&sub).await.unwrap();
    let mut suback = [0u8; 5];
    slow.read_exact(&mut suback).await.unwrap();
    let mut fast = v4_connect(addr, "fast", login("dev-a"), true)
        .await
        .unwrap();
    fast.client
        .subscribe("shared/slow", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback_of(&mut fast).await;

    // In batches the fast subscriber keeps up with (its queue is bounded too).
    let mut publisher = v4_connect(addr, "p", login("dev-a"), true).await.unwrap();
    let body = vec![b'x'; 1024];
    for _ in 0..40 {
        for _ in 0..50 {
            publisher
                .client
                .publish("shared/slow", QoS::AtLeastOnce, false, body.clone())
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < 50 {
            match tokio::time::timeout(Duration::from_secs(10), publisher.acks.recv()).await {
                Ok(Some(Packet::PubAck(_))) => acked += 1,
                Ok(Some(_)) => {}
                other => panic!("publisher stalled: {other:?}"),
            }
        }
        for _ in 0..50 {
            next_publish(&mut fast.publishes).await;
        }
    }
    let sessions = get(&format!(
        "http://{}/admin/mqtt/sessions",
        gw.gw.admin_addr()
    ))
    .await
    .json();
    let me = sessions["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["client_id"] == "slow")
        .unwrap()
        .clone();
    assert!(me["queued"].as_u64().unwrap() <= 100, "{me}");
    assert!(me["inflight"].as_u64().unwrap() <= 20, "{me}");
    let m = gw.metrics().await;
    let dropped = metric(
        &m,
        "tollgate_mqtt_messages_dropped_total{reason=\"queue_full\"}",
    );
    assert!(dropped >= 2000.0 - 120.0 - 64.0, "dropped {dropped}");
    drop(slow);
}

async fn suback_of(c: &mut V4) {
    suback(c).await;
}

/// Users through the admin API (a generated password is returned once and
/// works at once) with their own topic rules, and through the CLI (`show`,
/// `passwd`), which the running broker picks up from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_with_their_own_topics_through_the_admin_api_and_the_cli() {
    let (gw, addr) = broker("").await;
    let made = admin_call(
        &gw,
        http::Method::POST,
        "/admin/users",
        Some(serde_json::json!({
            "name": "dev-x",
            "roles": ["device"],
            "topics": [{"topic": "sensors/#", "access": "read"}, {"topic": "dev-x/secret", "access": "deny"}]
        })),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let made = made.json();
    let password = made["password"].as_str().unwrap().to_owned();
    assert!(made.get("password_hash").is_none());
    assert_eq!(
        admin_call(
            &gw,
            http::Method::POST,
            "/admin/users",
            Some(serde_json::json!({"name": "dev-x"}))
        )
        .await
        .status,
        409
    );
    let listed = admin_call(&gw, http::Method::GET, "/admin/users", None)
        .await
        .json();
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "dev-x")
    );
    assert!(!listed.to_string().contains("$argon2"), "no hashes listed");

    // A PUT that changes the topics keeps the password; a bad filter is a 400.
    let changed = admin_call(
        &gw,
        http::Method::PUT,
        "/admin/users/dev-x",
        Some(serde_json::json!({
            "roles": ["device"],
            "topics": [{"topic": "sensors/#", "access": "read"}, {"topic": "dev-x/secret", "access": "deny"}]
        })),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    assert!(changed.json().get("password").is_none(), "no new password");
    let refused = admin_call(
        &gw,
        http::Method::PUT,
        "/admin/users/dev-x",
        Some(serde_json::json!({"topics": [{"topic": "a/#/b"}]})),
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    let mut x = v4_connect(addr, "x", Some(("dev-x", &password)), true)
        .await
        .unwrap();
    x.client
        .subscribe("sensors/#", QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut x).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)],
        "its own rule"
    );
    x.client
        .publish("sensors/t", QoS::AtMostOnce, false, "no")
        .await
        .unwrap();
    x.client
        .subscribe("dev-x/#", QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut x).await,
        [rumqttc::SubscribeReasonCode::Failure],
        "its deny covers part of dev-x/#"
    );
    x.client
        .subscribe("dev-x/ok", QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut x).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)],
        "the broker's %u/#"
    );
    let mut a = v4_connect(addr, "a", login("dev-a"), true).await.unwrap();
    a.client
        .subscribe("sensors/#", QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut a).await,
        [rumqttc::SubscribeReasonCode::Failure],
        "not dev-a's"
    );

    // The CLI: show (no hash) and a new password, which the broker loads.
    let show = crate::oauth::cli(&gw.path, &["users", "show", "dev-x"]);
    assert!(
        show.contains("sensors/#") && !show.contains("$argon2"),
        "{show}"
    );
    let out = crate::oauth::cli(&gw.path, &["mqtt", "users", "passwd", "dev-x"]);
    let new = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap()
        .to_owned();
    wait_until(
        Duration::from_secs(10),
        "the new password is loaded",
        || async {
            v4_connect(addr, "x2", Some(("dev-x", &new)), true)
                .await
                .is_ok()
        },
    )
    .await;
    assert!(
        v4_connect(addr, "x3", Some(("dev-x", &password)), true)
            .await
            .is_err()
    );

    assert_eq!(
        admin_call(&gw, http::Method::DELETE, "/admin/users/dev-x", None)
            .await
            .status,
        204
    );
    assert_eq!(
        admin_call(&gw, http::Method::DELETE, "/admin/users/dev-x", None)
            .await
            .status,
        404
    );
    assert!(
        v4_connect(addr, "x4", Some(("dev-x", &new)), true)
            .await
            .is_err()
    );
}

/// Failed logins are limited per address and per client id: after ten in a
/// minute the next are refused unchecked (0x9F; 3.1.1: unavailable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited() {
    let (gw, addr) = broker("").await;
    for _ in 0..10 {
        assert_eq!(
            v4_connect(addr, "guess", Some(("dev-a", "wrong")), true)
                .await
                .err(),
            Some(ConnectReturnCode::BadUserNamePassword)
        );
    }
    // Now even the right password is not checked.
    assert_eq!(
        v4_connect(addr, "guess", login("dev-a"), true).await.err(),
        Some(ConnectReturnCode::ServiceUnavailable)
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_mqtt_auth_failures_total{listener=\"mqtt\",reason=\"rate_limited\"}"
        ),
        1.0
    );
}

/// A browser page's handshake (it carries `Origin`) is refused unless
/// `mqtt.websocket.allowed_origins` lists it; clients that are not
/// browsers send none and connect.
#[tokio::test]
async fn browsers_connect_over_websocket_only_from_listed_origins() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (gw, _) = broker("").await;
    let url = format!("ws://{}/mqtt", gw.addr());
    let open = |origin: Option<&'static str>| {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    match open(Some("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert!(open(None).await.is_ok());
}

/// A user changed or removed (admin API, CLI, store, reload) loses the
/// sessions it logged in; other users keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_changed_or_removed_user_end() {
    let (gw, addr) = broker("").await;
    let made = admin_call(
        &gw,
        http::Method::POST,
        "/admin/users",
        Some(serde_json::json!({"name": "dev-y", "roles": ["device"]})),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let password = made.json()["password"].as_str().unwrap().to_owned();
    let mut y = v4_connect(addr, "y", Some(("dev-y", &password)), true)
        .await
        .unwrap();
    let mut a = v4_connect(addr, "a", login("dev-a"), true).await.unwrap();

    let changed = admin_call(
        &gw,
        http::Method::PUT,
        "/admin/users/dev-y",
        Some(serde_json::json!({"roles": ["device", "sensor"]})),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    let ended = tokio::time::timeout(Duration::from_secs(5), y.publishes.recv())
        .await
        .expect("dev-y's connection ends");
    assert!(ended.is_none(), "the client's connection was closed");
    // Others are untouched.
    a.client
        .subscribe("dev-a/#", QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut a).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );

    // The same password still works (a PUT keeps it) until the user goes.
    let mut y2 = v4_connect(addr, "y2", Some(("dev-y", &password)), true)
        .await
        .unwrap();
    assert_eq!(
        admin_call(&gw, http::Method::DELETE, "/admin/users/dev-y", None)
            .await
            .status,
        204
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), y2.publishes.recv())
        .await
        .expect("the removed user's connection ends");
    assert!(ended.is_none());
    let status = admin_call(&gw, http::Method::GET, "/admin/mqtt/sessions", None)
        .await
        .json();
    assert!(!status.to_string().contains("\"y2\""), "{status}");
}
