//! The cluster bus on NATS: several gateways (nodes) in this process on one
//! real `nats-server` (Debian's, started on a free 127.0.0.1 port per test
//! and killed at the end), MQTT clients (rumqttc) on different nodes. The
//! config check runs in every build.

/// `bus.nats` is refused, naming the key, by a build without cluster
/// support; a build with it checks its keys.
#[test]
fn bus_nats_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let load = |yaml: &str| {
        let file = dir.path().join("gateway.yaml");
        std::fs::write(&file, yaml).unwrap();
        tollgate::config::load(&file)
    };
    let plain = "bus:\n  nats:\n    servers: [nats://127.0.0.1:4222]\n";
    if cfg!(feature = "cluster") {
        let cfg = load("bus:\n  nats: {}\n").unwrap();
        let nats = cfg.bus.nats.as_ref().unwrap();
        assert_eq!(nats.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(nats.prefix, "tollgate");
        load(plain).unwrap();
        load("bus:\n  nats:\n    prefix: prod.eu-1_a\n").unwrap();
        load(
            "bus:\n  nats:\n    servers: [nats://nats, 'tls://n1:4443']\n    tls: { ca: ca.pem }\n",
        )
        .unwrap();
        let errs = load(
            "bus:\n  nats:\n    servers: ['nats://u:secret@127.0.0.1:4222', 'tls://n:4222', 'http://x:1', 'nats://n:1?auth_token=x']\n    prefix: 'a.*.b'\n    tls: { ca: ca.pem, cert: c.pem }\n    send_queue: 0\n",
        )
        .unwrap_err();
        let has = |path: &str, text: &str| {
            errs.errors
                .iter()
                .any(|e| e.path == path && e.message.contains(text))
        };
        assert!(has("bus.nats.servers[0]", "no user"), "{errs}");
        assert!(
            !errs.to_string().contains("secret"),
            "no password in errors: {errs}"
        );
        assert!(has("bus.nats.servers[2]", "nats://"), "{errs}");
        assert!(has("bus.nats.servers[3]", "no user"), "{errs}");
        assert!(has("bus.nats.prefix", "tokens"), "{errs}");
        assert!(has("bus.nats.tls", "go together"), "{errs}");
        assert!(has("bus.nats.send_queue", "between"), "{errs}");
        let errs =
            load("bus:\n  nats:\n    servers: ['tls://n:4222']\n    prefix: ''\n").unwrap_err();
        assert!(
            errs.errors
                .iter()
                .any(|e| e.path == "bus.nats.servers[0]" && e.message.contains("tls.ca")),
            "{errs}"
        );
        assert!(
            errs.errors.iter().any(|e| e.path == "bus.nats.prefix"),
            "{errs}"
        );
        let errs = load("bus:\n  nats:\n    serverz: []\n").unwrap_err();
        assert!(errs.to_string().contains("serverz"), "{errs}");
    } else {
        let errs = load(plain).unwrap_err();
        assert!(
            errs.errors.iter().any(|e| e.path == "bus.nats"
                && e.message
                    == "this build has no cluster support (build with --features cluster)"),
            "{errs}"
        );
    }
    // Without `bus` nothing changes.
    let cfg = load("{}\n").unwrap();
    assert!(cfg.bus.nats.is_none());
}

#[cfg(feature = "cluster")]
pub(crate) mod cluster {
    use std::collections::HashMap;
    use std::net::{SocketAddr, TcpListener};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use rumqttc::{Event, Packet, QoS};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::sync::mpsc;

    use crate::support::*;
    use crate::tls::TestCa;

    const PASSWORD: &str = "pw-of-every-bus-test-user";
    const WAIT: Duration = Duration::from_secs(20);

    /// A `nats-server` on a free 127.0.0.1 port, killed when dropped (or
    /// by [`Nats::kill`]), started again on the same port by
    /// [`Nats::restart`].
    pub(crate) struct Nats {
        child: Option<Child>,
        pub(crate) port: u16,
        /// Server certificate, key and the CA clients must chain to.
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
        /// More command-line arguments.
        args: Vec<String>,
    }

    fn nats_binary() -> &'static str {
        if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        }
    }

    impl Nats {
        pub(crate) async fn start(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Nats {
            Nats::start_with(tls, &[]).await
        }

        async fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>, args: &[&str]) -> Nats {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut n = Nats {
                child: None,
                port,
                tls,
                args: args.iter().map(|a| a.to_string()).collect(),
            };
            n.restart().await;
            n
        }

        pub(crate) fn url(&self) -> String {
            let scheme = if self.tls.is_some() { "tls" } else { "nats" };
            format!("{scheme}://127.0.0.1:{}", self.port)
        }

        async fn restart(&mut self) {
            let mut cmd = Command::new(nats_binary());
            cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
            cmd.args(&self.args);
            if let Some((cert, key, ca)) = &self.tls {
                cmd.arg("--tlsverify")
                    .arg("--tlscert")
                    .arg(cert)
                    .arg("--tlskey")
                    .arg(key)
                    .arg("--tlscacert")
                    .arg(ca);
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server runs (Debian package nats-server)");
            self.child = Some(child);
            let port = self.port;
            wait_until(WAIT, "nats-server accepts connections", || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await;
        }

        fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    impl Drop for Nats {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// A node: MQTT listener, admin, users `dev` (everything but publishing
    /// to `secret/#` when `deny_secret`), the bus on `nats`.
    async fn node(nats: &Nats, extra_bus: &str, deny_secret: bool) -> (TestGateway, SocketAddr) {
        node_with(nats, extra_bus, deny_secret, "").await
    }

    async fn node_with(
        nats: &Nats,
        extra_bus: &str,
        deny_secret: bool,
        extra_mqtt: &str,
    ) -> (TestGateway, SocketAddr) {
        let hash = bcrypt::hash(PASSWORD, 4).unwrap();
        let deny = if deny_secret {
            "    - deny: { actions: [publish], topics: ['secret/#'] }\n"
        } else {
            ""
        };
        let yaml = format!(
            "listeners:\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\n\
admin:\n  bind: 127.0.0.1:0\nproxy:\n  access_log: false\n\
auth:\n  users:\n    - {{ name: dev, password_hash: '{hash}' }}\n\
mqtt:\n{extra_mqtt}  policy:\n{deny}    - allow: {{ actions: [publish, subscribe], topics: ['#'] }}\n\
bus:\n  nats:\n    servers: ['{}']\n    prefix: test.bus\n{extra_bus}",
            nats.url()
        );
        let gw = TestGateway::start(&yaml).await;
        let addr = gw.gw.listener_addr("mqtt").expect("mqtt listener");
        (gw, addr)
    }

    struct Client {
        c: rumqttc::AsyncClient,
        rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
        acks: mpsc::UnboundedReceiver<Packet>,
    }

    async fn connect(addr: SocketAddr, id: &str) -> Client {
        connect_session(addr, id, true).await.0
    }

    /// With `clean` off, a persistent session (3.1.1: it lasts the
    /// broker's maximum); and whether the broker had one (CONNACK).
    async fn connect_session(addr: SocketAddr, id: &str, clean: bool) -> (Client, bool) {
        let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_clean_session(clean);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_credentials("dev", PASSWORD);
        opts.set_inflight(100);
        let (c, mut events) = rumqttc::AsyncClient::new(opts, 256);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(
                        p @ (Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_)),
                    )) => {
                        let _ = ack_tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let present = match tokio::time::timeout(WAIT, acks.recv()).await {
            Ok(Some(Packet::ConnAck(a))) if a.code == rumqttc::ConnectReturnCode::Success => {
                a.session_present
            }
            other => panic!("no CONNACK for {id}: {other:?}"),
        };
        (Client { c, rx, acks }, present)
    }

    /// The client ids of `gw`'s sessions, and whether each is connected.
    async fn sessions(gw: &TestGateway) -> Vec<(String, bool)> {
        let list = get(&format!(
            "http://{}/admin/mqtt/sessions",
            gw.gw.admin_addr()
        ))
        .await;
        let list: serde_json::Value = serde_json::from_slice(&list.body).unwrap();
        let mut ids: Vec<(String, bool)> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["client_id"].as_str().unwrap().to_owned(),
                    s["connected"].as_bool().unwrap(),
                )
            })
            .collect();
        ids.sort();
        ids
    }

    async fn sessions_are(gw: &TestGateway, want: &[(&str, bool)]) {
        let want: Vec<(String, bool)> = want.iter().map(|(i, c)| (i.to_string(), *c)).collect();
        wait_until(WAIT, &format!("sessions {want:?}"), || async {
            sessions(gw).await == want
        })
        .await;
    }

    impl Client {
        async fn ack(&mut self, what: &str) {
            match tokio::time::timeout(WAIT, self.acks.recv()).await {
                Ok(Some(_)) => {}
                other => panic!("no {what}: {other:?}"),
            }
        }

        async fn sub(&mut self, filter: &str, qos: QoS) {
            self.c.subscribe(filter, qos).await.unwrap();
            self.ack("SUBACK").await;
        }

        async fn unsub(&mut self, filter: &str) {
            self.c.unsubscribe(filter).await.unwrap();
            self.ack("UNSUBACK").await;
        }

        async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
            self.c
                .publish(topic, qos, retain, payload.into())
                .await
                .unwrap();
        }

        async fn next(&mut self) -> rumqttc::Publish {
            tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("a message in time")
                .expect("client running")
        }

        /// Every message up to and including the one to `topic`.
        async fn until(&mut self, topic: &str) -> Vec<rumqttc::Publish> {
            let mut got = Vec::new();
            loop {
                let p = self.next().await;
                let last = p.topic == topic;
                got.push(p);
                if last {
                    return got;
                }
            }
        }
    }

    async fn value(gw: &TestGateway, line: &str) -> f64 {
        metric(&gw.metrics().await, line)
    }

    /// Waits until `gw` holds `n` bus subscriptions at the server (the one
    /// for retained messages included): it is connected, and messages to
    /// those subscriptions reach it.
    async fn bus_subscriptions(gw: &TestGateway, n: usize) {
        wait_until(WAIT, &format!("{n} bus subscriptions"), || async {
            value(gw, "tollgate_bus_subscriptions ").await == n as f64
        })
        .await;
    }

    async fn connected(gw: &TestGateway, up: bool) {
        let want = if up { 1.0 } else { 0.0 };
        wait_until(WAIT, "tollgate_bus_connected", || async {
            value(gw, "tollgate_bus_connected ").await == want
        })
        .await;
    }

    /// `n` plain nodes on `nats`, each connected to it.
    async fn connected_nodes(nats: &Nats, n: usize) -> Vec<(TestGateway, SocketAddr)> {
        let mut nodes = Vec::new();
        for _ in 0..n {
            let node = node(nats, "", false).await;
            connected(&node.0, true).await;
            nodes.push(node);
        }
        nodes
    }

    fn text(p: &rumqttc::Publish) -> String {
        String::from_utf8(p.payload.to_vec()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_qos1_publishes_reach_another_node_in_order() {
        let nats = Nats::start(None).await;
        let (a, a_addr) = node(&nats, "", false).await;
        let (b, b_addr) = node(&nats, "", false).await;
        connected(&a, true).await;
        connected(&b, true).await;
        let mut sub = connect(b_addr, "sub").await;
        sub.sub("load/#", QoS::AtLeastOnce).await;
        bus_subscriptions(&b, 3).await; // retained, load.>, load
        bus_subscriptions(&a, 1).await;
        let publisher = connect(a_addr, "pub").await;
        const N: usize = 1000;
        let feeder = tokio::spawn(async move {
            for i in 0..N {
                publisher
                    .publish("load/seq", QoS::AtLeastOnce, false, i.to_string())
                    .await;
            }
            publisher
        });
        for i in 0..N {
            let p = sub.next().await;
            assert_eq!(p.topic, "load/seq");
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert_eq!(text(&p), i.to_string(), "in order, none lost");
        }
        let _publisher = feeder.await.unwrap();
        let m = a.metrics().await;
        assert!(
            metric(
                &m,
                "tollgate_bus_messages_total{direction=\"sent\",kind=\"mqtt\"}"
            ) >= N as f64,
            "{m}"
        );
        let m = b.metrics().await;
        assert!(
            metric(
                &m,
                "tollgate_bus_messages_total{direction=\"received\",kind=\"mqtt\"}"
            ) >= N as f64,
            "{m}"
        );
        // The admin status shows the bus.
        let status = get(&format!("http://{}/admin/status", b.gw.admin_addr())).await;
        let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
        assert_eq!(status["bus"]["connected"], true, "{status}");
        assert_eq!(status["bus"]["kind"], "nats", "{status}");
        assert_eq!(status["bus"]["prefix"], "test.bus", "{status}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_wildcards_overlaps_and_odd_topics() {
        let nats = Nats::start(None).await;
        let (a, a_addr) = node(&nats, "", false).await;
        let (b, b_addr) = node(&nats, "", false).await;
        bus_subscriptions(&a, 1).await;
        let mut sub = connect(b_addr, "sub").await;
        // Overlapping filters of one client: one copy each.
        sub.sub("w/#", QoS::AtLeastOnce).await;
        sub.sub("w/+/x", QoS::AtLeastOnce).await;
        sub.sub("+/+/x", QoS::AtMostOnce).await;
        let mut other = connect(b_addr, "other").await;
        other.sub("w/+/x", QoS::AtLeastOnce).await;
        other.sub("end", QoS::AtLeastOnce).await;
        // retained + w.> + w + w.*.x + *.*.x + end
        bus_subscriptions(&b, 6).await;
        let publisher = connect(a_addr, "pub").await;
        let topics = [
            "w",                 // `w/#` matches its parent level
            "w/a/x",             // all three filters
            "w//x",              // an empty level
            "w/a.b*c>d %25 ~/x", // what NATS tokens cannot hold
            "w/ünï çødé/x",      // UTF-8 and a space
            "w/a/b/c/d",         // deep
            "w/",                // a trailing empty level
            "q/a/x",             // only `+/+/x`
            "q/a/y",             // nothing: never reaches `sub`
        ];
        for t in topics {
            publisher.publish(t, QoS::AtLeastOnce, false, t).await;
        }
        // Ordering holds per publisher and bus subscription: `+/+/x` and
        // `w/#` are two, so collect until all came.
        let expect: Vec<&str> = topics[..8].to_vec(); // not `q/a/y`
        let mut got: Vec<rumqttc::Publish> = Vec::new();
        while got.len() < expect.len() {
            got.push(sub.next().await);
        }
        let mut seen: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
        seen.sort();
        let mut want = expect.clone();
        want.sort();
        assert_eq!(seen, want, "each once");
        for p in &got {
            assert_eq!(text(p), p.topic, "payload intact");
        }
        let got: HashMap<String, rumqttc::Publish> =
            got.into_iter().map(|p| (p.topic.clone(), p)).collect();
        // `w/a/x` went to `sub` with the highest QoS of its filters.
        assert_eq!(got["w/a/x"].qos, QoS::AtLeastOnce);
        publisher.publish("end", QoS::AtLeastOnce, false, "").await;
        let got = other.until("end").await;
        let seen: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
        assert_eq!(
            seen,
            ["w/a/x", "w//x", "w/a.b*c>d %25 ~/x", "w/ünï çødé/x", "end"]
        );
        let m = b.metrics().await;
        assert_eq!(
            metric(&m, "tollgate_bus_dropped_total{reason=\"malformed\"}"),
            0.0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_shared_subscriptions_span_nodes() {
        let nats = Nats::start(None).await;
        let (a, a_addr) = node(&nats, "", false).await;
        let (b, b_addr) = node(&nats, "", false).await;
        let (c, c_addr) = node(&nats, "", false).await;
        let mut on_a = connect(a_addr, "member-a").await;
        on_a.sub("$share/g/jobs/+", QoS::AtLeastOnce).await;
        let mut on_b = connect(b_addr, "member-b").await;
        on_b.sub("$share/g/jobs/+", QoS::AtLeastOnce).await;
        let mut b2 = connect(b_addr, "member-b2").await;
        b2.sub("$share/g/jobs/+", QoS::AtLeastOnce).await;
        // A plain subscriber of the same topics on B gets every message.
        let mut watcher = connect(b_addr, "watcher").await;
        watcher.sub("jobs/+", QoS::AtLeastOnce).await;
        bus_subscriptions(&a, 2).await;
        bus_subscriptions(&b, 3).await;
        bus_subscriptions(&c, 1).await;
        let pub_a = connect(a_addr, "pub-a").await;
        let pub_c = connect(c_addr, "pub-c").await;
        const N: usize = 200;
        for i in 0..N {
            // From a node with members (A) and one without (C).
            let p = if i % 2 == 0 { &pub_a } else { &pub_c };
            p.publish("jobs/x", QoS::AtLeastOnce, false, i.to_string())
                .await;
        }
        let mut count: HashMap<String, usize> = HashMap::new();
        let mut by_node = [0usize; 2];
        while count.len() < N {
            tokio::select! {
                p = on_a.next() => { by_node[0] += 1; *count.entry(text(&p)).or_default() += 1; }
                p = on_b.next() => { by_node[1] += 1; *count.entry(text(&p)).or_default() += 1; }
                p = b2.next() => { by_node[1] += 1; *count.entry(text(&p)).or_default() += 1; }
            }
        }
        // The watcher got all (the last one means the rest were routed).
        let mut seen = 0;
        while seen < N {
            watcher.next().await;
            seen += 1;
        }
        assert!(count.values().all(|&n| n == 1), "each once: {count:?}");
        assert!(
            by_node[0] > 0 && by_node[1] > 0,
            "both nodes get some: {by_node:?}"
        );
        // Nothing more comes: a last message through the group is the next one.
        pub_c
            .publish("jobs/x", QoS::AtLeastOnce, false, "last")
            .await;
        let p = tokio::select! {
            p = on_a.next() => p,
            p = on_b.next() => p,
            p = b2.next() => p,
        };
        assert_eq!(text(&p), "last", "no duplicate came before it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_retained_acl_and_unsubscribe() {
        let nats = Nats::start(None).await;
        let (a, a_addr) = node(&nats, "", true).await;
        let (b, b_addr) = node(&nats, "", false).await;
        bus_subscriptions(&a, 1).await;
        bus_subscriptions(&b, 1).await;
        let publisher = connect(a_addr, "pub").await;
        // Retained on A: kept by B too, and given to a later subscriber there.
        publisher
            .publish("r/1", QoS::AtLeastOnce, true, "kept")
            .await;
        wait_until(WAIT, "B keeps the retained message", || async {
            value(&b, "tollgate_mqtt_retained_messages ").await == 1.0
        })
        .await;
        let mut late = connect(b_addr, "late").await;
        late.sub("r/#", QoS::AtLeastOnce).await;
        let p = late.next().await;
        assert_eq!(
            (p.topic.as_str(), text(&p).as_str(), p.retain),
            ("r/1", "kept", true)
        );
        // Cleared on A: cleared on B.
        publisher.publish("r/1", QoS::AtLeastOnce, true, "").await;
        wait_until(WAIT, "B clears the retained message", || async {
            value(&b, "tollgate_mqtt_retained_messages ").await == 0.0
        })
        .await;

        // A publish A's rules refuse never reaches B.
        let mut sub = connect(b_addr, "sub").await;
        sub.sub("secret/#", QoS::AtLeastOnce).await;
        sub.sub("open/#", QoS::AtLeastOnce).await;
        sub.sub("other/#", QoS::AtLeastOnce).await;
        // retained, r.>, r, secret.>, secret, open.>, open, other.>, other
        bus_subscriptions(&b, 9).await;
        let sent = |m: &str| {
            metric(
                m,
                "tollgate_bus_messages_total{direction=\"sent\",kind=\"mqtt\"}",
            )
        };
        let before = sent(&a.metrics().await);
        publisher
            .publish("secret/x", QoS::AtLeastOnce, false, "no")
            .await;
        publisher
            .publish("open/x", QoS::AtLeastOnce, false, "yes")
            .await;
        let got = sub.until("open/x").await;
        assert_eq!(got.len(), 1, "the refused one did not come first: {got:?}");
        assert_eq!(
            sent(&a.metrics().await) - before,
            1.0,
            "only the allowed one went on the bus"
        );

        // Unsubscribed on B: B leaves the bus subscription, and its client
        // gets nothing more of it.
        sub.unsub("open/#").await;
        bus_subscriptions(&b, 7).await;
        let received = |m: &str| {
            metric(
                m,
                "tollgate_bus_messages_total{direction=\"received\",kind=\"mqtt\"}",
            )
        };
        let before = received(&b.metrics().await);
        publisher
            .publish("open/y", QoS::AtLeastOnce, false, "gone")
            .await;
        publisher
            .publish("other/z", QoS::AtLeastOnce, false, "here")
            .await;
        let got = sub.until("other/z").await;
        assert_eq!(got.len(), 1, "nothing of `open/#` any more: {got:?}");
        assert_eq!(
            received(&b.metrics().await) - before,
            1.0,
            "B no longer receives `open/…` from the bus at all"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_outage_keeps_nodes_serving_and_recovers() {
        let mut nats = Nats::start(None).await;
        let (a, a_addr) = node(&nats, "", false).await;
        let (b, b_addr) = node(&nats, "", false).await;
        let mut local_a = connect(a_addr, "local-a").await;
        local_a.sub("o/#", QoS::AtLeastOnce).await;
        let mut remote_b = connect(b_addr, "remote-b").await;
        remote_b.sub("o/#", QoS::AtLeastOnce).await;
        bus_subscriptions(&a, 3).await;
        bus_subscriptions(&b, 3).await;
        let pub_a = connect(a_addr, "pub-a").await;
        let pub_b = connect(b_addr, "pub-b").await;
        pub_a
            .publish("o/before", QoS::AtLeastOnce, false, "1")
            .await;
        assert_eq!(remote_b.next().await.topic, "o/before");
        assert_eq!(local_a.next().await.topic, "o/before");

        nats.kill();
        connected(&a, false).await;
        connected(&b, false).await;
        // Each node serves its own clients.
        pub_a
            .publish("o/during", QoS::AtLeastOnce, false, "2")
            .await;
        assert_eq!(local_a.next().await.topic, "o/during");
        pub_b
            .publish("o/during-b", QoS::AtLeastOnce, false, "3")
            .await;
        assert_eq!(
            remote_b.next().await.topic,
            "o/during-b",
            "not o/during: dropped"
        );
        wait_until(WAIT, "the dropped message is counted", || async {
            value(&a, "tollgate_bus_dropped_total{reason=\"disconnected\"}").await >= 1.0
        })
        .await;
        let ready = get(&format!("http://{}/readyz", a.gw.admin_addr())).await;
        assert_eq!(ready.status, http::StatusCode::OK, "local service is ready");
        let status = get(&format!("http://{}/admin/status", a.gw.admin_addr())).await;
        let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
        assert_eq!(status["bus"]["connected"], false, "{status}");

        // NATS back on the same port: the same MQTT clients get each
        // other's messages again.
        nats.restart().await;
        connected(&a, true).await;
        connected(&b, true).await;
        // B's subscriptions come back with its reconnection; probe until
        // one arrives.
        let mut n = 0;
        loop {
            n += 1;
            pub_a
                .publish(&format!("o/probe/{n}"), QoS::AtLeastOnce, false, "p")
                .await;
            match tokio::time::timeout(Duration::from_millis(500), remote_b.rx.recv()).await {
                Ok(Some(p)) => {
                    assert!(p.topic.starts_with("o/probe/"), "{}", p.topic);
                    break;
                }
                Ok(None) => panic!("client gone"),
                Err(_) => assert!(n < 40, "cross-node delivery did not resume"),
            }
        }
        pub_a.publish("o/after", QoS::AtLeastOnce, false, "4").await;
        let got = remote_b.until("o/after").await;
        assert!(
            got.iter()
                .all(|p| p.topic.starts_with("o/probe/") || p.topic == "o/after")
        );
        drop(local_a);
    }

    /// Raw NATS protocol: connect, publish `frames`, wait for the server's
    /// PONG (everything before it was processed).
    pub(crate) async fn raw_publish(port: u16, frames: &[(String, Vec<u8>)]) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let info = lines.next_line().await.unwrap().unwrap();
        assert!(info.starts_with("INFO"), "{info}");
        write
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .await
            .unwrap();
        for (subject, payload) in frames {
            write
                .write_all(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())
                .await
                .unwrap();
            write.write_all(payload).await.unwrap();
            write.write_all(b"\r\n").await.unwrap();
        }
        write.write_all(b"PING\r\n").await.unwrap();
        loop {
            let line = lines.next_line().await.unwrap().unwrap();
            if line == "PONG" {
                return;
            }
            assert!(!line.starts_with("-ERR"), "{line}");
        }
    }

    /// A frame as tollgate writes it (version 1, QoS 1), around `payload`.
    fn frame(origin: u64, seq: u64, props: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![1u8, 1];
        f.extend_from_slice(&origin.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&(props.len() as u32).to_be_bytes());
        f.extend_from_slice(props);
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_hostile_publisher_is_dropped_and_counted() {
        let nats = Nats::start(None).await;
        let (a, a_addr) = node(&nats, "", false).await;
        let (b, b_addr) =
            node_with(&nats, "", false, "  limits: { max_packet_size: 64KiB }\n").await;
        let mut sub = connect(b_addr, "sub").await;
        sub.sub("h/#", QoS::AtLeastOnce).await;
        bus_subscriptions(&a, 1).await;
        bus_subscriptions(&b, 3).await;
        let s = "test.bus.mqtt.h.x".to_owned();
        let big = vec![b'x'; 300 * 1024];
        let hostile: Vec<(String, Vec<u8>)> = vec![
            (s.clone(), b"garbage".to_vec()),
            (s.clone(), Vec::new()),
            (s.clone(), vec![9; 40]), // unknown version
            (s.clone(), frame(1, 1, &[0x03, 0xff, 0xff], b"x")), // property cut short
            (s.clone(), frame(1, 2, &[0x77], b"x")), // unknown property
            (s.clone(), frame(1, 3, &[0x08, 0, 1, b'#'], b"x")), // response topic `#`
            (s.clone(), frame(1, 4, &[0x01, 1], &[0xff, 0xfe])), // "UTF-8" that is not
            ({
                let mut f = frame(1, 5, &[], b"");
                f[18..22].copy_from_slice(&u32::MAX.to_be_bytes());
                (s.clone(), f)
            }),
            ("test.bus.mqtt.h.%zz".to_owned(), frame(1, 6, &[], b"x")), // bad escape
            ("test.bus.mqtt.h.%61".to_owned(), frame(1, 7, &[], b"x")), // not the one spelling
            ("test.bus.mqtt-retained.h.x".to_owned(), b"junk".to_vec()),
            (s.clone(), frame(1, 8, &[], &big)), // over max_packet_size
        ];
        raw_publish(nats.port, &hostile).await;
        // The node still routes what its peers send.
        let publisher = connect(a_addr, "pub").await;
        publisher
            .publish("h/ok", QoS::AtLeastOnce, false, "fine")
            .await;
        let got = sub.until("h/ok").await;
        assert_eq!(got.len(), 1, "nothing hostile reached the client: {got:?}");
        let m = b.metrics().await;
        assert_eq!(
            metric(&m, "tollgate_bus_dropped_total{reason=\"malformed\"}"),
            11.0,
            "{m}"
        );
        assert_eq!(
            metric(&m, "tollgate_bus_dropped_total{reason=\"too_large\"}"),
            1.0
        );
        // A well-formed message of a stranger is taken (the bus is trusted
        // as a peer; its publish ACL was the origin's business).
        raw_publish(nats.port, &[(s.clone(), frame(99, 1, &[], b"peer"))]).await;
        let p = sub.next().await;
        assert_eq!((p.topic.as_str(), text(&p).as_str()), ("h/x", "peer"));
        drop(a);
    }

    /// The next packet but acknowledgements and pings.
    async fn next5(
        rx: &mut mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
    ) -> rumqttc::v5::mqttbytes::v5::Packet {
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        loop {
            match tokio::time::timeout(WAIT, rx.recv()).await {
                Ok(Some(P5::ConnAck(_) | P5::PingResp(_) | P5::PubAck(_))) => continue,
                Ok(Some(p)) => return p,
                other => panic!("nothing in time: {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_mqtt5_properties_travel() {
        use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
        let nats = Nats::start(None).await;
        let (a, a_addr) = node(&nats, "", false).await;
        let (b, b_addr) = node(&nats, "", false).await;
        bus_subscriptions(&a, 1).await;
        let v5 = |addr: SocketAddr, id: &str| {
            let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
            opts.set_credentials("dev", PASSWORD);
            let (c, mut events) = rumqttc::v5::AsyncClient::new(opts, 16);
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                loop {
                    match events.poll().await {
                        Ok(rumqttc::v5::Event::Incoming(p)) => {
                            let _ = tx.send(p);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            (c, rx)
        };
        let (sub, mut sub_rx) = v5(b_addr, "sub5");
        sub.subscribe("p5/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .unwrap();
        assert!(matches!(next5(&mut sub_rx).await, P5::SubAck(_)));
        bus_subscriptions(&b, 3).await;
        let (publisher, _pub_rx) = v5(a_addr, "pub5");
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(600),
            content_type: Some("text/plain".into()),
            response_topic: Some("p5/reply".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"\x00corr")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            ..PublishProperties::default()
        };
        publisher
            .publish_with_properties(
                "p5/x",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                "héllo",
                props,
            )
            .await
            .unwrap();
        let P5::Publish(p) = next5(&mut sub_rx).await else {
            panic!("not a PUBLISH")
        };
        assert_eq!(&p.topic[..], b"p5/x");
        assert_eq!(&p.payload[..], "héllo".as_bytes());
        let got = p.properties.expect("properties travel");
        assert_eq!(got.payload_format_indicator, Some(1));
        assert_eq!(got.content_type.as_deref(), Some("text/plain"));
        assert_eq!(got.response_topic.as_deref(), Some("p5/reply"));
        assert_eq!(got.correlation_data.as_deref(), Some(&b"\x00corr"[..]));
        assert_eq!(
            got.user_properties,
            [
                ("k".to_owned(), "v".to_owned()),
                ("k".to_owned(), "w".to_owned())
            ]
        );
        let left = got.message_expiry_interval.expect("expiry travels");
        assert!(left > 0 && left <= 600, "{left}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_over_mutual_tls() {
        let ca = TestCa::new("bus");
        let server = ca.server("nats", "127.0.0.1");
        let client = ca.client("node", "gateway");
        let nats = Nats::start(Some((server.cert.clone(), server.key.clone(), ca.pem()))).await;
        let tls = format!(
            "    tls: {{ ca: '{}', cert: '{}', key: '{}' }}\n",
            ca.pem().display(),
            client.cert.display(),
            client.key.display()
        );
        let (a, a_addr) = node(&nats, &tls, false).await;
        let (b, b_addr) = node(&nats, &tls, false).await;
        // A file that cannot be read is named by its key at start.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.yaml");
        std::fs::write(
            &file,
            format!(
                "listeners:\n  - name: mqtt\n    bind: 127.0.0.1:0\n    protocol: mqtt\nadmin:\n  bind: 127.0.0.1:0\nbus:\n  nats:\n    servers: ['{}']\n    tls: {{ ca: missing-ca.pem }}\n",
                nats.url()
            ),
        )
        .unwrap();
        let cfg = tollgate::config::load(&file).unwrap();
        let err = tollgate::Gateway::start(cfg, Some(file.clone()))
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("bus.nats.tls.ca"), "{err}");
        connected(&a, true).await;
        connected(&b, true).await;
        let mut sub = connect(b_addr, "sub").await;
        sub.sub("t/+", QoS::AtLeastOnce).await;
        bus_subscriptions(&a, 1).await;
        bus_subscriptions(&b, 2).await;
        let publisher = connect(a_addr, "pub").await;
        publisher
            .publish("t/1", QoS::AtLeastOnce, false, "over tls")
            .await;
        let p = sub.next().await;
        assert_eq!((p.topic.as_str(), text(&p).as_str()), ("t/1", "over tls"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_token_from_a_file() {
        let nats = Nats::start_with(None, &["--auth", "bus-token-of-the-test"]).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nats-token");
        std::fs::write(&file, "bus-token-of-the-test\n").unwrap();
        let auth = format!("    token_file: '{}'\n", file.display());
        let (a, a_addr) = node(&nats, &auth, false).await;
        let (b, b_addr) = node(&nats, &auth, false).await;
        connected(&a, true).await;
        connected(&b, true).await;
        let mut sub = connect(b_addr, "sub").await;
        sub.sub("k/+", QoS::AtLeastOnce).await;
        bus_subscriptions(&a, 1).await;
        bus_subscriptions(&b, 2).await;
        let publisher = connect(a_addr, "pub").await;
        publisher
            .publish("k/1", QoS::AtLeastOnce, false, "authorized")
            .await;
        assert_eq!(text(&sub.next().await), "authorized");
        let status = get(&format!("http://{}/admin/status", a.gw.admin_addr())).await;
        let body = String::from_utf8(status.body.to_vec()).unwrap();
        assert!(!body.contains("bus-token-of-the-test"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_nodes_start_before_nats() {
        let mut nats = Nats::start(None).await;
        nats.kill();
        // NATS is down: the nodes start, serve and are ready all the same.
        let (a, a_addr) = node(&nats, "", false).await;
        let (b, b_addr) = node(&nats, "", false).await;
        let ready = get(&format!("http://{}/readyz", a.gw.admin_addr())).await;
        assert_eq!(ready.status, http::StatusCode::OK);
        let mut sub = connect(b_addr, "sub").await;
        sub.sub("s/#", QoS::AtLeastOnce).await;
        let publisher = connect(a_addr, "pub").await;
        nats.restart().await;
        connected(&a, true).await;
        connected(&b, true).await;
        bus_subscriptions(&a, 1).await;
        bus_subscriptions(&b, 3).await;
        publisher
            .publish("s/1", QoS::AtLeastOnce, false, "late")
            .await;
        assert_eq!(text(&sub.next().await), "late");
    }

    /// A persistent session follows its client to another node: what was
    /// queued for it there comes along (none lost), what is published
    /// after reaches it on its new node, and the old node no longer holds
    /// it. A clean start on a third node ends it wherever it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_a_session_follows_its_client_to_another_node() {
        let nats = Nats::start(None).await;
        let mut nodes = connected_nodes(&nats, 3).await;
        let (c, c_addr) = nodes.pop().unwrap();
        let (b, b_addr) = nodes.pop().unwrap();
        let (a, a_addr) = nodes.pop().unwrap();
        let (mut x, present) = connect_session(a_addr, "mover", false).await;
        assert!(!present);
        x.sub("move/#", QoS::AtLeastOnce).await;
        x.c.disconnect().await.unwrap();
        sessions_are(&a, &[("mover", false)]).await;
        // Queued on A while its client is away.
        let publisher = connect(a_addr, "pub").await;
        for i in 1..=3 {
            publisher
                .publish(&format!("move/{i}"), QoS::AtLeastOnce, false, i.to_string())
                .await;
        }
        wait_until(WAIT, "3 queued on A", || async {
            let l = get(&format!("http://{}/admin/mqtt/sessions", a.gw.admin_addr())).await;
            let l: serde_json::Value = serde_json::from_slice(&l.body).unwrap();
            l["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["client_id"] == "mover" && s["queued"] == 3)
        })
        .await;

        let (mut x, present) = connect_session(b_addr, "mover", false).await;
        assert!(present, "the session came from A");
        for i in 1..=3 {
            let p = x.next().await;
            assert_eq!(
                (p.topic.as_str(), text(&p)),
                (&*format!("move/{i}"), i.to_string())
            );
        }
        sessions_are(&a, &[("pub", true)]).await;
        sessions_are(&b, &[("mover", true)]).await;
        // Its subscription lives on B now: a publish on C reaches it there.
        let on_c = connect(c_addr, "pub-c").await;
        on_c.publish("move/4", QoS::AtLeastOnce, false, "4").await;
        let p = x.next().await;
        assert_eq!((p.topic.as_str(), text(&p)), ("move/4", "4".into()));
        // And one on A (which held it before).
        publisher
            .publish("move/5", QoS::AtLeastOnce, false, "5")
            .await;
        let p = x.next().await;
        assert_eq!((p.topic.as_str(), text(&p)), ("move/5", "5".into()));
        let m = a.metrics().await;
        assert_eq!(
            metric(
                &m,
                "tollgate_mqtt_messages_dropped_total{reason=\"too_large\"}"
            ),
            0.0
        );

        // While connected on B, the same id on C with a clean start: B's
        // client is taken over and its session ends; C's starts afresh.
        let (_y, present) = connect_session(c_addr, "mover", true).await;
        assert!(!present, "a clean start");
        sessions_are(&b, &[]).await;
        sessions_are(&c, &[("mover", true), ("pub-c", true)]).await;
        // B's client saw its connection end.
        assert!(
            tokio::time::timeout(WAIT, async { while x.rx.recv().await.is_some() {} })
                .await
                .is_ok(),
            "B's connection ended"
        );
    }

    /// A node shutting down (a rolling restart) still hands its
    /// sessions over: a client that reconnects to another node keeps its
    /// subscriptions and what was queued for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_a_draining_node_hands_its_sessions_over() {
        let nats = Nats::start(None).await;
        let mut nodes = connected_nodes(&nats, 2).await;
        let (b, b_addr) = nodes.pop().unwrap();
        let (a, a_addr) = nodes.pop().unwrap();
        let (mut x, _) = connect_session(a_addr, "roller", false).await;
        x.sub("roll/#", QoS::AtLeastOnce).await;
        x.c.disconnect().await.unwrap();
        sessions_are(&a, &[("roller", false)]).await;
        let publisher = connect(a_addr, "pub").await;
        publisher
            .publish("roll/1", QoS::AtLeastOnce, false, "1")
            .await;
        wait_until(WAIT, "queued on A", || async {
            get(&format!("http://{}/admin/mqtt/sessions", a.gw.admin_addr()))
                .await
                .body
                .windows(10)
                .any(|w| w == b"\"queued\":1")
        })
        .await;
        a.gw.shutdown();
        let (mut x, present) = connect_session(b_addr, "roller", false).await;
        assert!(present, "handed over while A drains");
        let p = x.next().await;
        assert_eq!((p.topic.as_str(), text(&p)), ("roll/1", "1".into()));
        sessions_are(&b, &[("roller", true)]).await;
    }

    /// In cluster mode a SUBACK means the subscription is in place on
    /// every node: a publish on another node right after it arrives
    /// (each round a filter new to the cluster).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_a_suback_means_every_node_delivers() {
        let nats = Nats::start(None).await;
        let nodes = connected_nodes(&nats, 2).await;
        let mut sub = connect(nodes[1].1, "sub").await;
        let publisher = connect(nodes[0].1, "pub").await;
        for round in 0..20 {
            let topic = format!("fresh/{round}");
            sub.sub(&topic, QoS::AtLeastOnce).await;
            publisher
                .publish(&topic, QoS::AtLeastOnce, false, round.to_string())
                .await;
            let p = sub.next().await;
            assert_eq!(
                (p.topic.as_str(), text(&p)),
                (topic.as_str(), round.to_string())
            );
        }
    }

    /// A session that moves keeps its client's will (v5, with a delay)
    /// from being published: the session goes on on the new node, and the
    /// old connection is told it was taken over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bus_nats_a_moved_session_sends_no_will() {
        use rumqttc::v5::mqttbytes::v5::{ConnectProperties, DisconnectReasonCode, Packet as P5};
        let nats = Nats::start(None).await;
        let nodes = connected_nodes(&nats, 2).await;
        let (a, a_addr) = (&nodes[0].0, nodes[0].1);
        let b_addr = nodes[1].1;
        let mut watcher = connect(b_addr, "watcher").await;
        watcher.sub("will/#", QoS::AtMostOnce).await;
        let will = crate::mqtt5::delayed_will("will/roamer", 1);
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(60);
        let login = ("dev", PASSWORD);
        let (mut first, _) = crate::mqtt5::Raw::connect_as(
            a_addr,
            "roamer",
            login,
            false,
            props.clone(),
            Some(will),
        )
        .await;
        sessions_are(a, &[("roamer", true)]).await;
        let (_second, ack) =
            crate::mqtt5::Raw::connect_as(b_addr, "roamer", login, false, props, None).await;
        assert!(ack.session_present, "moved from A");
        match first.recv().await {
            P5::Disconnect(d) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::SessionTakenOver)
            }
            other => panic!("{other:?}"),
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(2500), watcher.rx.recv())
                .await
                .is_err(),
            "no will: the session goes on on B"
        );
    }
}
