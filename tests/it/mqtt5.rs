//! MQTT 5 features, packet by packet: a raw client that writes and reads
//! packets with rumqttc's codec (an implementation apart from the
//! broker's core), so every property and reason code can be sent and
//! checked as it is on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const PASSWORD: &str = "pw";

async fn broker(extra_mqtt: &str) -> (TestGateway, SocketAddr) {
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let users: String = ["alice", "bob"]
        .iter()
        .map(|u| format!("    - {{ name: '{u}', password_hash: '{hash}' }}\n"))
        .collect();
    let yaml = format!(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\n\
admin:\n  bind: 127.0.0.1:0\nproxy:\n  access_log: false\nauth:\n  users:\n{users}\
mqtt:\n  sys_interval: 1s\n  policy:\n    - allow: {{ actions: [publish, subscribe], topics: ['%u/#', 'shared/#'] }}\n    - allow: {{ actions: [subscribe], users: [alice], topics: ['$SYS/#'] }}\n{extra_mqtt}"
    );
    let gw = TestGateway::start(&yaml).await;
    let addr = gw.gw.listener_addr("mqtt").unwrap();
    (gw, addr)
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub(crate) struct Raw {
    tcp: Box<dyn Io>,
    buf: BytesMut,
}

impl Raw {
    /// A CONNECT on `io` with a user name and password of its own.
    async fn connect_on(io: Box<dyn Io>, id: &str, login: Option<(&str, &str)>) -> (Raw, ConnAck) {
        let mut raw = Raw {
            tcp: io,
            buf: BytesMut::new(),
        };
        raw.send(Packet::Connect(
            Connect {
                keep_alive: 60,
                client_id: id.into(),
                clean_start: true,
                properties: Some(ConnectProperties::new()),
            },
            None,
            login.map(|(u, p)| Login {
                username: u.into(),
                password: p.into(),
            }),
        ))
        .await;
        match raw.recv().await {
            Packet::ConnAck(a) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn connect(
        addr: SocketAddr,
        id: &str,
        user: &str,
        props: ConnectProperties,
    ) -> (Raw, ConnAck) {
        Raw::connect_with(addr, id, user, true, props, None).await
    }

    async fn connect_with(
        addr: SocketAddr,
        id: &str,
        user: &str,
        clean: bool,
        props: ConnectProperties,
        will: Option<LastWill>,
    ) -> (Raw, ConnAck) {
        Raw::connect_as(addr, id, (user, PASSWORD), clean, props, will).await
    }

    pub(crate) async fn connect_as(
        addr: SocketAddr,
        id: &str,
        (user, password): (&str, &str),
        clean: bool,
        props: ConnectProperties,
        will: Option<LastWill>,
    ) -> (Raw, ConnAck) {
        let mut raw = Raw {
            tcp: Box::new(TcpStream::connect(addr).await.unwrap()),
            buf: BytesMut::new(),
        };
        raw.send(Packet::Connect(
            Connect {
                keep_alive: 60,
                client_id: id.into(),
                clean_start: clean,
                properties: Some(props),
            },
            will,
            Some(Login {
                username: user.into(),
                password: password.into(),
            }),
        ))
        .await;
        match raw.recv().await {
            Packet::ConnAck(a) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).unwrap();
        self.tcp.write_all(&out).await.unwrap();
    }

    pub(crate) async fn recv(&mut self) -> Packet {
        self.try_recv(Duration::from_secs(5))
            .await
            .expect("a packet within 5s")
    }

    async fn try_recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the broker: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.tcp.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Err(_) => return None,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{e}"),
            }
        }
    }

    async fn publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Packet::Publish(p) => return p,
                Packet::PubRel(r) => self.send(Packet::PubComp(PubComp::new(r.pkid, None))).await,
                _ => {}
            }
        }
    }

    async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<Filter>,
        id: Option<usize>,
    ) -> Vec<SubscribeReasonCode> {
        let props = id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        let mut s = Subscribe::new_many(filters, props);
        s.pkid = pkid;
        self.send(Packet::Subscribe(s)).await;
        match self.recv().await {
            Packet::SubAck(a) => {
                assert_eq!(a.pkid, pkid);
                a.return_codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

fn publish(
    topic: &str,
    qos: QoS,
    pkid: u16,
    payload: &str,
    props: Option<PublishProperties>,
) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        pkid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: props,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_identifiers_and_reason_codes() {
    let (_gw, addr) = broker("").await;
    let (mut a, ack) = Raw::connect(addr, "a", "alice", ConnectProperties::new()).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let p = ack.properties.unwrap();
    assert_eq!(
        (
            p.wildcard_subscription_available,
            p.subscription_identifiers_available,
            p.shared_subscription_available,
            p.retain_available
        ),
        (Some(1), Some(1), Some(1), Some(1))
    );

    // Two overlapping subscriptions: one delivery, the higher QoS, both ids.
    assert_eq!(
        a.subscribe(1, vec![filter("shared/#", QoS::AtMostOnce)], Some(7))
            .await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        a.subscribe(2, vec![filter("shared/+", QoS::AtLeastOnce)], Some(9))
            .await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Not allowed, and not a filter.
    assert_eq!(
        a.subscribe(
            3,
            vec![
                filter("bob/#", QoS::AtMostOnce),
                filter("a/#/b", QoS::AtMostOnce)
            ],
            None
        )
        .await,
        [
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::TopicFilterInvalid
        ]
    );
    let (mut b, _) = Raw::connect(addr, "b", "bob", ConnectProperties::new()).await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        response_topic: Some("bob/replies".into()),
        correlation_data: Some(Bytes::from_static(b"c-1")),
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    b.send(publish(
        "shared/x",
        QoS::AtLeastOnce,
        1,
        "hello",
        Some(props),
    ))
    .await;
    match b.recv().await {
        Packet::PubAck(ack) => assert_eq!(ack.reason, PubAckReason::Success),
        other => panic!("{other:?}"),
    }
    let got = a.publish().await;
    assert_eq!(got.qos, QoS::AtLeastOnce);
    let gp = got.properties.unwrap();
    let mut ids = gp.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, [7, 9]);
    assert_eq!(gp.user_properties, [("k".to_string(), "v".to_string())]);
    assert_eq!(gp.content_type.as_deref(), Some("text/plain"));
    assert_eq!(gp.response_topic.as_deref(), Some("bob/replies"));
    assert_eq!(gp.correlation_data.as_deref(), Some(&b"c-1"[..]));
    a.send(Packet::PubAck(PubAck::new(got.pkid, None))).await;

    // Refusals are reason codes: a topic not allowed, nobody subscribed,
    // a payload that is not the UTF-8 it claims to be.
    b.send(publish("alice/x", QoS::AtLeastOnce, 2, "no", None))
        .await;
    match b.recv().await {
        Packet::PubAck(ack) => assert_eq!(ack.reason, PubAckReason::NotAuthorized),
        other => panic!("{other:?}"),
    }
    b.send(publish("bob/nobody", QoS::AtLeastOnce, 3, "x", None))
        .await;
    match b.recv().await {
        Packet::PubAck(ack) => assert_eq!(ack.reason, PubAckReason::NoMatchingSubscribers),
        other => panic!("{other:?}"),
    }
    let mut bad_utf8 = publish(
        "bob/x",
        QoS::ExactlyOnce,
        4,
        "",
        Some(PublishProperties {
            payload_format_indicator: Some(1),
            ..Default::default()
        }),
    );
    if let Packet::Publish(p) = &mut bad_utf8 {
        p.payload = Bytes::from_static(&[0xff, 0xfe]);
    }
    b.send(bad_utf8).await;
    match b.recv().await {
        Packet::PubRec(rec) => assert_eq!(rec.reason, PubRecReason::PayloadFormatInvalid),
        other => panic!("{other:?}"),
    }
    // UNSUBACK says which existed.
    let mut u = Unsubscribe::new("shared/#", None);
    u.filters.push("never/#".into());
    u.pkid = 5;
    a.send(Packet::Unsubscribe(u)).await;
    match a.recv().await {
        Packet::UnsubAck(ack) => assert_eq!(
            ack.reasons,
            [
                UnsubAckReason::Success,
                UnsubAckReason::NoSubscriptionExisted
            ]
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_retain_handling_and_retain_as_published() {
    let (_gw, addr) = broker("").await;
    let (mut a, _) = Raw::connect(addr, "a", "alice", ConnectProperties::new()).await;
    let mut no_local = filter("shared/nl", QoS::AtMostOnce);
    no_local.nolocal = true;
    a.subscribe(1, vec![no_local], None).await;
    a.send(publish("shared/nl", QoS::AtMostOnce, 0, "mine", None))
        .await;
    assert!(
        a.try_recv(Duration::from_millis(400)).await.is_none(),
        "no-local"
    );

    let mut retained = publish("shared/r", QoS::AtMostOnce, 0, "kept", None);
    if let Packet::Publish(p) = &mut retained {
        p.retain = true;
    }
    a.send(retained.clone()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut b, _) = Raw::connect(addr, "b", "bob", ConnectProperties::new()).await;
    let mut never = filter("shared/r", QoS::AtMostOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    b.subscribe(1, vec![never], None).await;
    assert!(
        b.try_recv(Duration::from_millis(300)).await.is_none(),
        "retain handling 2"
    );
    let mut if_new = filter("shared/r", QoS::AtMostOnce);
    if_new.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    // Not new (the subscription exists): nothing.
    b.subscribe(2, vec![if_new.clone()], None).await;
    assert!(
        b.try_recv(Duration::from_millis(300)).await.is_none(),
        "retain handling 1, existing"
    );
    if_new.path = "shared/+".into();
    b.subscribe(3, vec![if_new], None).await;
    let got = b.publish().await;
    assert!(got.retain, "retained on a new subscription");
    // Retain as published: a live retained message keeps its flag.
    let mut rap = filter("shared/r", QoS::AtMostOnce);
    rap.preserve_retain = true;
    let (mut c, _) = Raw::connect(addr, "c", "bob", ConnectProperties::new()).await;
    c.subscribe(1, vec![rap], None).await;
    let _initial = c.publish().await;
    a.send(retained).await;
    assert!(c.publish().await.retain);
    let live = b.publish().await;
    assert!(
        !live.retain,
        "without retain-as-published the flag is cleared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_both_ways_and_message_expiry() {
    let (_gw, addr) = broker("").await;
    let mut props = ConnectProperties::new();
    props.topic_alias_max = Some(5);
    let (mut a, ack) = Raw::connect(addr, "a", "alice", props).await;
    assert_eq!(ack.properties.unwrap().topic_alias_max, Some(64));
    a.subscribe(1, vec![filter("shared/alias", QoS::AtMostOnce)], None)
        .await;
    let (mut b, _) = Raw::connect(addr, "b", "bob", ConnectProperties::new()).await;
    // Inbound: the topic with alias 3, then the alias alone.
    let with_alias = |topic: &str, body: &str| {
        publish(
            topic,
            QoS::AtMostOnce,
            0,
            body,
            Some(PublishProperties {
                topic_alias: Some(3),
                ..Default::default()
            }),
        )
    };
    b.send(with_alias("shared/alias", "one")).await;
    b.send(with_alias("", "two")).await;
    // Outbound: the first names the topic and an alias, the second only the alias.
    let first = a.publish().await;
    assert_eq!(&first.topic[..], b"shared/alias");
    let alias = first
        .properties
        .as_ref()
        .and_then(|p| p.topic_alias)
        .expect("an alias");
    let second = a.publish().await;
    assert_eq!(
        (&second.topic[..], &second.payload[..]),
        (&b""[..], &b"two"[..])
    );
    assert_eq!(second.properties.and_then(|p| p.topic_alias), Some(alias));
    // An alias never set is a protocol error.
    let mut c_props = ConnectProperties::new();
    c_props.topic_alias_max = Some(0);
    let (mut c, _) = Raw::connect(addr, "c", "bob", c_props).await;
    c.send(publish(
        "",
        QoS::AtMostOnce,
        0,
        "x",
        Some(PublishProperties {
            topic_alias: Some(9),
            ..Default::default()
        }),
    ))
    .await;
    match c.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, DisconnectReasonCode::ProtocolError),
        other => panic!("{other:?}"),
    }

    // Message expiry: a retained message past its interval is gone; one
    // still alive arrives with what is left of it.
    let expiring = |secs: u32, body: &str| {
        let mut p = publish(
            "shared/exp",
            QoS::AtMostOnce,
            0,
            body,
            Some(PublishProperties {
                message_expiry_interval: Some(secs),
                ..Default::default()
            }),
        );
        if let Packet::Publish(p) = &mut p {
            p.retain = true;
        }
        p
    };
    b.send(expiring(1, "short")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut d, _) = Raw::connect(addr, "d", "alice", ConnectProperties::new()).await;
    d.subscribe(1, vec![filter("shared/exp", QoS::AtMostOnce)], None)
        .await;
    assert!(
        d.try_recv(Duration::from_millis(300)).await.is_none(),
        "expired"
    );
    b.send(expiring(100, "long")).await;
    let got = d.publish().await;
    let left = got
        .properties
        .and_then(|p| p.message_expiry_interval)
        .unwrap();
    assert!((1..=100).contains(&left), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_keep_alive_and_session_expiry() {
    let (_gw, addr) =
        broker("  limits: { max_inflight: 2, max_keep_alive: 5s, max_session_expiry: 1h }\n").await;
    let (mut a, ack) = Raw::connect(addr, "a", "alice", ConnectProperties::new()).await;
    let p = ack.properties.unwrap();
    assert_eq!(
        (p.receive_max, p.server_keep_alive),
        (Some(2), Some(5)),
        "60s asked, 5s allowed"
    );
    // A third QoS 2 message before releasing the first two: 0x93.
    for pkid in 1..=3 {
        a.send(publish("alice/q2", QoS::ExactlyOnce, pkid, "x", None))
            .await;
    }
    let mut seen = Vec::new();
    while let Some(p) = a.try_recv(Duration::from_secs(3)).await {
        seen.push(p);
    }
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::ReceiveMaximumExceeded)),
        "{seen:?}"
    );

    // Session expiry: kept while the client is away, within what it asked.
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(2);
    let (mut s, ack) = Raw::connect_with(addr, "keeper", "bob", false, props.clone(), None).await;
    assert!(!ack.session_present);
    s.subscribe(1, vec![filter("shared/s", QoS::AtLeastOnce)], None)
        .await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, ack) = Raw::connect_with(addr, "keeper", "bob", false, props.clone(), None).await;
    assert!(ack.session_present, "within its expiry");
    drop(s);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_s, ack) = Raw::connect_with(addr, "keeper", "bob", false, props, None).await;
    assert!(!ack.session_present, "expired");
}

/// A QoS 0 will "gone" to `topic`, sent `delay` seconds after its client
/// is gone.
pub(crate) fn delayed_will(topic: &'static str, delay: u32) -> LastWill {
    LastWill {
        topic: Bytes::from_static(topic.as_bytes()),
        message: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Some(LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_delay_is_cancelled_by_a_reconnect_and_takeover_is_told() {
    let (_gw, addr) = broker("").await;
    let (mut w, _) = Raw::connect(addr, "watch", "bob", ConnectProperties::new()).await;
    w.subscribe(1, vec![filter("shared/will", QoS::AtMostOnce)], None)
        .await;
    let will = || delayed_will("shared/will", 1);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(60);
    let (first, _) =
        Raw::connect_with(addr, "dev", "alice", false, props.clone(), Some(will())).await;
    drop(first);
    // Back within the delay: no will.
    let (mut second, ack) =
        Raw::connect_with(addr, "dev", "alice", false, props.clone(), Some(will())).await;
    assert!(ack.session_present);
    assert!(
        w.try_recv(Duration::from_millis(1500)).await.is_none(),
        "the will was cancelled"
    );
    // A third connection with the same id takes over: the second is told.
    let (_third, _) = Raw::connect_with(addr, "dev", "alice", false, props, None).await;
    match second.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, DisconnectReasonCode::SessionTakenOver),
        other => panic!("{other:?}"),
    }
    // The second's will (delay 1s, within a session that continues): none.
    assert!(w.try_recv(Duration::from_millis(1500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_the_load() {
    let (_gw, addr) = broker("").await;
    let mut members = Vec::new();
    for i in 0..3 {
        let (mut m, _) =
            Raw::connect(addr, &format!("m{i}"), "alice", ConnectProperties::new()).await;
        m.subscribe(
            1,
            vec![filter("$share/workers/shared/jobs", QoS::AtMostOnce)],
            None,
        )
        .await;
        members.push(m);
    }
    let (mut p, _) = Raw::connect(addr, "p", "bob", ConnectProperties::new()).await;
    for i in 0..30 {
        p.send(publish(
            "shared/jobs",
            QoS::AtMostOnce,
            0,
            &i.to_string(),
            None,
        ))
        .await;
    }
    let mut total = 0;
    for m in &mut members {
        let mut n = 0;
        while m.try_recv(Duration::from_millis(500)).await.is_some() {
            n += 1;
        }
        assert!(n > 0, "every member gets a share");
        total += n;
    }
    assert_eq!(total, 30, "each message to one member");
}

/// A JWT as the password: the user name comes from its claim, a name that
/// is not the token's is refused, and the session ends when the token does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_password_names_the_user_and_ends_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "an HS256 secret of thirty-two bytes!").unwrap();
    let yaml = format!(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\n\
admin:\n  bind: 127.0.0.1:0\nauth:\n  providers:\n    - name: idp\n      issuer: https://idp\n      audiences: [mqtt]\n      secret: {{ file: {} }}\n\
mqtt:\n  auth: {{ password: false, jwt: {{ username_claim: device, acl_claim: acl }} }}\n",
        secret.display()
    );
    let gw = TestGateway::start(&yaml).await;
    let addr = gw.gw.listener_addr("mqtt").unwrap();
    let token = |exp_in: u64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"iss": "https://idp", "aud": "mqtt", "sub": "svc", "device": "dev-j", "exp": now + exp_in,
                // The token's own rules (EMQX's shape), before the broker's.
                "acl": [
                    {"permission": "allow", "action": "subscribe", "topic": "fleet/${username}/#", "qos": [0, 1]},
                    {"permission": "deny", "action": "publish", "topic": "dev-j/secret"}
                ]}),
            &jsonwebtoken::EncodingKey::from_secret(b"an HS256 secret of thirty-two bytes!"),
        )
        .unwrap()
    };
    let tcp = || async { Box::new(TcpStream::connect(addr).await.unwrap()) as Box<dyn Io> };
    // The token's own user (or none) connects; another name is refused.
    let (mut c, ack) = Raw::connect_on(tcp().await, "j1", Some(("", &token(2)))).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        c.subscribe(1, vec![filter("dev-j/#", QoS::AtMostOnce)], None)
            .await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        c.subscribe(2, vec![filter("svc/#", QoS::AtMostOnce)], None)
            .await,
        [SubscribeReasonCode::NotAuthorized]
    );
    let (_, ack) = Raw::connect_on(tcp().await, "j2", Some(("dev-x", &token(60)))).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    let (_, ack) = Raw::connect_on(
        tcp().await,
        "j3",
        Some(("dev-j", "ey.not.atoken-but-long-enough")),
    )
    .await;
    assert_ne!(ack.code, ConnectReturnCode::Success);
    // Passwords are off here: a name and password is refused.
    let (_, ack) = Raw::connect_on(tcp().await, "j4", Some(("dev-j", "secret"))).await;
    assert_eq!(ack.code, ConnectReturnCode::BadUserNamePassword);
    // The first session ends with its token (2 s), told why.
    match c.try_recv(Duration::from_secs(5)).await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::NotAuthorized)
        }
        other => panic!("{other:?}"),
    }
}

/// On a TLS listener that verifies client certificates, the certificate
/// names the user (its CN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_the_user_on_mqtts() {
    let ca = crate::tls::TestCa::new("Devices");
    let server = ca.server("broker", "localhost");
    let sensor = ca.client("sensor-1", "fleet");
    let yaml = format!(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\n  - name: mqtts\n    bind: 127.0.0.1:0\n    protocol: mqtt\n    tls: {{ cert: {}, key: {}, client_ca: {}, client_auth: optional }}\n\
admin:\n  bind: 127.0.0.1:0\n",
        server.cert.display(),
        server.key.display(),
        ca.pem().display()
    );
    let gw = TestGateway::start(&yaml).await;
    let addr = gw.gw.listener_addr("mqtts").unwrap();
    let tls = |id: Option<&crate::tls::Identity>| {
        let config = crate::tls::client_config(&ca.pem(), id, &[]);
        async move {
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            Box::new(connector.connect(name, tcp).await.unwrap()) as Box<dyn Io>
        }
    };
    let (mut c, ack) = Raw::connect_on(tls(Some(&sensor)).await, "s1", None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        c.subscribe(1, vec![filter("sensor-1/#", QoS::AtLeastOnce)], None)
            .await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        c.subscribe(2, vec![filter("sensor-2/#", QoS::AtLeastOnce)], None)
            .await,
        [SubscribeReasonCode::NotAuthorized]
    );
    c.send(publish("sensor-1/t", QoS::AtMostOnce, 0, "21.5", None))
        .await;
    assert_eq!(&c.publish().await.payload[..], b"21.5");
    // Without a certificate (or credentials): not authorized.
    let (_, ack) = Raw::connect_on(tls(None).await, "s2", None).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
}

/// tstack's registration round trip: `tollgate register` gets a name, a
/// password and a certificate from `POST /register.json`; the device then
/// connects over TLS with that certificate (and, on the plain listener,
/// with the password) and may use only its own topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_device_connects_over_mqtts_with_what_it_got() {
    let ca = crate::tls::TestCa::new("Devices");
    let server = ca.server("broker", "localhost");
    let ca_dir = ca.pem().parent().unwrap().to_path_buf();
    let key_hash = crate::oauth::sha256_hex("reg-key");
    let yaml = format!(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\n  - name: mqtts\n    bind: 127.0.0.1:0\n    protocol: mqtt\n    tls: {{ cert: {}, key: {}, client_ca: {}, client_auth: optional }}\n\
admin:\n  bind: 127.0.0.1:0\nmqtt:\n  registration: {{ key_sha256: '{key_hash}', broker: 'mqtts://localhost:8883', ca: {}, max_per_minute: 4 }}\n",
        server.cert.display(),
        server.key.display(),
        ca.pem().display(),
        ca_dir.display()
    );
    let gw = TestGateway::start(&yaml).await;
    let url = gw.url("/register.json");
    // Refusals: wrong key, not JSON, not a POST, a bad device type.
    let post = |body: &'static str| {
        let url = url.clone();
        async move {
            send(
                http::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(full(body))
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(
        post(r#"{"RegistrationKey": "nope", "DeviceType": "sensor"}"#)
            .await
            .status,
        403
    );
    assert_eq!(post("not json").await.status, 400);
    assert_eq!(get(&url).await.status, 405);
    assert_eq!(
        post(r#"{"RegistrationKey": "reg-key", "DeviceType": "a b"}"#)
            .await
            .status,
        400
    );

    // The CLI, as a device's setup script runs it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("etc/device/mqtt.yaml");
    let done = std::process::Command::new(BIN)
        .args([
            "register",
            "--url",
            &url,
            "--key",
            "reg-key",
            "--device-type",
            "sensor",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let field = |name: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap();
        serde_json::from_str(&line[name.len() + 2..]).unwrap()
    };
    let name = field("Name");
    assert!(name.starts_with("sensor-"), "{name}");
    assert_eq!(field("Broker"), "mqtts://localhost:8883");
    assert!(field("Ca").contains("BEGIN CERTIFICATE"));
    let id = crate::tls::Identity {
        cert: dir.path().join("dev.pem"),
        key: dir.path().join("dev.key"),
    };
    std::fs::write(&id.cert, field("Cert")).unwrap();
    std::fs::write(&id.key, field("Key")).unwrap();
    assert_eq!(id.parsed().cn.as_deref(), Some(name.as_str()));

    // Over TLS with its certificate: its own topics only.
    let tls_addr = gw.gw.listener_addr("mqtts").unwrap();
    let config = crate::tls::client_config(&ca.pem(), Some(&id), &[]);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(tls_addr).await.unwrap();
    let sni = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let io = Box::new(connector.connect(sni, tcp).await.unwrap()) as Box<dyn Io>;
    let (mut c, ack) = Raw::connect_on(io, "dev-1", None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        c.subscribe(
            1,
            vec![filter(&format!("{name}/#"), QoS::AtLeastOnce)],
            None
        )
        .await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        c.subscribe(2, vec![filter("#", QoS::AtLeastOnce)], None)
            .await,
        [SubscribeReasonCode::NotAuthorized]
    );

    // With its password on the plain listener, at once (no reload needed).
    let plain = gw.gw.listener_addr("mqtt").unwrap();
    let io = Box::new(TcpStream::connect(plain).await.unwrap()) as Box<dyn Io>;
    let (mut p, ack) = Raw::connect_on(io, "dev-2", Some((&name, &field("Password")))).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    p.send(publish(
        &format!("{name}/t"),
        QoS::AtMostOnce,
        0,
        "hi",
        None,
    ))
    .await;
    assert_eq!(&c.publish().await.payload[..], b"hi");

    // The admin API registers too, its own authentication standing for the key.
    let by_admin = send(
        http::Request::post(format!("http://{}/admin/mqtt/register", gw.gw.admin_addr()))
            .header("content-type", "application/json")
            .body(full(r#"{"DeviceType": "gateway"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(by_admin.status, 201, "{}", by_admin.text());
    let by_admin = by_admin.json();
    assert!(by_admin["Name"].as_str().unwrap().starts_with("gateway-"));
    assert!(
        by_admin["Cert"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    // Rate-limited per address: 4 attempts a minute, and a GET is none.
    assert_eq!(
        post(r#"{"RegistrationKey": "reg-key", "DeviceType": "sensor"}"#)
            .await
            .status,
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_second_connect_packet_size_redelivery_and_sys() {
    let (_gw, addr) = broker("").await;
    // Keep alive: silent for 1.5 times it, the client is told and closed.
    let mut quiet = Raw {
        tcp: Box::new(TcpStream::connect(addr).await.unwrap()),
        buf: BytesMut::new(),
    };
    quiet
        .send(Packet::Connect(
            Connect {
                keep_alive: 1,
                client_id: "quiet".into(),
                clean_start: true,
                properties: Some(ConnectProperties::new()),
            },
            None,
            Some(Login {
                username: "bob".into(),
                password: PASSWORD.into(),
            }),
        ))
        .await;
    assert!(matches!(quiet.recv().await, Packet::ConnAck(_)));
    let started = std::time::Instant::now();
    match quiet.try_recv(Duration::from_secs(5)).await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // A second CONNECT is a protocol error.
    let (mut twice, _) = Raw::connect(addr, "twice", "bob", ConnectProperties::new()).await;
    twice
        .send(Packet::Connect(
            Connect {
                keep_alive: 60,
                client_id: "twice".into(),
                clean_start: true,
                properties: None,
            },
            None,
            None,
        ))
        .await;
    match twice.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, DisconnectReasonCode::ProtocolError),
        other => panic!("{other:?}"),
    }

    // The client's Maximum Packet Size: larger messages are not sent to it.
    let mut small = ConnectProperties::new();
    small.max_packet_size = Some(100);
    let (mut s, _) = Raw::connect(addr, "small", "alice", small).await;
    s.subscribe(1, vec![filter("shared/size", QoS::AtMostOnce)], None)
        .await;
    let (mut p, _) = Raw::connect(addr, "p", "bob", ConnectProperties::new()).await;
    p.send(publish(
        "shared/size",
        QoS::AtMostOnce,
        0,
        &"x".repeat(200),
        None,
    ))
    .await;
    p.send(publish("shared/size", QoS::AtMostOnce, 0, "fits", None))
        .await;
    assert_eq!(&s.publish().await.payload[..], b"fits");

    // Unacknowledged QoS 1 goes again, as a duplicate with its packet id,
    // when the session's client comes back.
    let mut keep = ConnectProperties::new();
    keep.session_expiry_interval = Some(60);
    let (mut r, _) = Raw::connect_with(addr, "redeliver", "alice", false, keep.clone(), None).await;
    r.subscribe(1, vec![filter("shared/dup", QoS::AtLeastOnce)], None)
        .await;
    p.send(publish("shared/dup", QoS::AtLeastOnce, 9, "once", None))
        .await;
    let first = r.publish().await;
    assert!(!first.dup);
    drop(r); // no PUBACK
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, ack) = Raw::connect_with(addr, "redeliver", "alice", false, keep, None).await;
    assert!(ack.session_present);
    let again = r.publish().await;
    assert_eq!(
        (again.dup, again.pkid, &again.payload[..]),
        (true, first.pkid, &b"once"[..])
    );
    r.send(Packet::PubAck(PubAck::new(again.pkid, None))).await;

    // $SYS statistics, to whom the rules let see them; `#` does not reach them.
    let (mut sys, _) = Raw::connect(addr, "sys", "alice", ConnectProperties::new()).await;
    assert_eq!(
        sys.subscribe(1, vec![filter("$SYS/broker/uptime", QoS::AtMostOnce)], None)
            .await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    let uptime = sys.publish().await;
    assert!(String::from_utf8_lossy(&uptime.payload).ends_with(" seconds"));
    let (mut b, _) = Raw::connect(addr, "b-sys", "bob", ConnectProperties::new()).await;
    assert_eq!(
        b.subscribe(1, vec![filter("$SYS/#", QoS::AtMostOnce)], None)
            .await,
        [SubscribeReasonCode::NotAuthorized]
    );
}

/// Anonymous clients only when enabled; their `%u` is empty and names no
/// topic, so only rules written for them apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_only_when_enabled() {
    let (_gw, addr) = broker(
        "  auth: { anonymous: true }\n  policy:\n    - allow: { via: [anonymous], actions: [subscribe], topics: ['public/#'] }\n    - allow: { topics: ['%u/#'] }\n",
    )
    .await;
    let io = Box::new(TcpStream::connect(addr).await.unwrap()) as Box<dyn Io>;
    let (mut anon, ack) = Raw::connect_on(io, "anon", None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        anon.subscribe(
            1,
            vec![
                filter("public/#", QoS::AtMostOnce),
                filter("alice/#", QoS::AtMostOnce),
                filter("+/#", QoS::AtMostOnce)
            ],
            None
        )
        .await,
        [
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::NotAuthorized
        ]
    );
}

/// A session is resumed only by its owner: another user with the same
/// client id starts afresh (and the old session, with what was queued for
/// it, is gone rather than handed over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_resume_a_session_by_its_client_id() {
    let (_gw, addr) = broker("").await;
    let mut keep = ConnectProperties::new();
    keep.session_expiry_interval = Some(60);
    let (mut owner, _) = Raw::connect_with(addr, "dev-1", "alice", false, keep.clone(), None).await;
    owner
        .subscribe(1, vec![filter("shared/private", QoS::AtLeastOnce)], None)
        .await;
    drop(owner);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut p, _) = Raw::connect(addr, "p", "bob", ConnectProperties::new()).await;
    p.send(publish(
        "shared/private",
        QoS::AtLeastOnce,
        1,
        "for alice",
        None,
    ))
    .await;
    assert!(matches!(p.recv().await, Packet::PubAck(_)));
    let (mut thief, ack) = Raw::connect_with(addr, "dev-1", "bob", false, keep.clone(), None).await;
    assert!(!ack.session_present, "not bob's session");
    assert!(
        thief.try_recv(Duration::from_millis(500)).await.is_none(),
        "alice's queue is not handed over"
    );
    // The id now holds bob's fresh session: alice does not get that either.
    let (_back, ack) = Raw::connect_with(addr, "dev-1", "alice", false, keep, None).await;
    assert!(!ack.session_present, "bob's session is not alice's");
}
