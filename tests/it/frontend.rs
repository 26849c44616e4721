//! A front-end that is not HTTP, built from outside the crate's front-ends:
//! a line protocol on a TLS listener that takes the client's verified
//! certificate as its identity and asks the policy engine about MQTT topics
//! (`PUB <topic>`, `SUB <filter>`). It uses only the base layers' interfaces
//! (`transport::FrontEnd`, `identity`, `authz`), as an MQTT listener will.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tollgate::authz::{Action, Policy, Resource};
use tollgate::identity::Identity;
use tollgate::transport::{self, ConnState, FrontEnd, ListenerInfo, Shutdown, Stream};

use crate::tls::{TestCa, client_config};

/// Answers each line with `ALLOW` or `DENY <why>`.
struct TopicLines {
    policy: Policy,
}

impl FrontEnd for TopicLines {
    async fn serve<S: Stream>(&self, io: S, conn: Arc<ConnState>, _shutdown: Shutdown) {
        let Some(cert) = conn.peer_cert.clone() else {
            return; // the listener requires a certificate
        };
        let who = Identity::from_cert(cert);
        let (read, mut write) = tokio::io::split(io);
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let action = match line.split_once(' ') {
                Some(("PUB", topic)) => Action::Publish {
                    topic,
                    qos: 0,
                    retain: false,
                },
                Some(("SUB", filter)) => Action::Subscribe { filter, qos: 0 },
                _ => {
                    let _ = write.write_all(b"ERR expected PUB or SUB\n").await;
                    continue;
                }
            };
            let decision = self.policy.evaluate(&who, &action);
            let answer = if decision.allowed() {
                "ALLOW\n".to_owned()
            } else {
                format!("DENY {decision}\n")
            };
            if write.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_protocol_front_end_on_a_tls_listener() {
    let ca = TestCa::new("Devices");
    let server = ca.server("broker", "localhost");
    let sensor = ca.client("sensor-1", "fleet");
    let listener: tollgate::config::ListenerConfig = serde_json::from_value(serde_json::json!({
        "name": "lines",
        "bind": "127.0.0.1:0",
        "protocol": "https",
        "tls": {
            "cert": server.cert,
            "key": server.key,
            "client_ca": ca.pem(),
        },
    }))
    .unwrap();
    let settings = listener.tls.clone().unwrap();
    let material =
        transport::tls::load_server("lines.tls", &settings, &|p| p.to_path_buf()).unwrap();
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let tls = Arc::new(transport::tls::TlsListener::new(
        "lines",
        "lines.tls".into(),
        settings,
        std::path::PathBuf::from("."),
        material,
        metrics.tls_cert_expiry.clone(),
    ));
    let info = Arc::new(ListenerInfo::new(
        "lines",
        0,
        listener.limits.clone(),
        Some(tls),
    ));
    let rules: Vec<tollgate::config::RuleConfig> = serde_json::from_str(
        r#"[{"allow": {"actions": ["publish", "subscribe"], "topics": ["fleet/{cn}/#"]}}]"#,
    )
    .unwrap();
    let front_end = Arc::new(TopicLines {
        policy: Policy::compile(&rules, Resource::Topic).unwrap(),
    });
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let shutdown = Shutdown::default();
    tokio::spawn(transport::serve(
        socket,
        info,
        front_end,
        shutdown.clone(),
        metrics,
    ));

    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&ca.pem(), Some(&sensor), &[])));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (read, mut write) = tokio::io::split(tls);
    let mut answers = BufReader::new(read).lines();
    let mut ask = async |line: &str| {
        write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), answers.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    assert_eq!(ask("PUB fleet/sensor-1/temp").await, "ALLOW");
    assert_eq!(ask("SUB fleet/sensor-1/#").await, "ALLOW");
    assert_eq!(
        ask("PUB fleet/sensor-2/temp").await,
        "DENY denied: no rule matches"
    );
    assert_eq!(
        ask("SUB fleet/+/temp").await,
        "DENY denied: no rule matches"
    );
    assert!(
        ask("SUB fleet/#/x")
            .await
            .starts_with("DENY denied: not a topic filter")
    );
    shutdown.graceful.cancel();
}
