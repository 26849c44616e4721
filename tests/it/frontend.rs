//! A front-end that is not HTTP, built from outside the crate's front-ends:
//! a line protocol on a TLS listener that takes the client's verified
//! certificate as its identity (or a user name and password, `LOGIN <user>
//! <password>`, checked against users in gateway.yaml and the store) and
//! asks the policy engine about MQTT topics (`PUB <topic>`, `SUB <filter>`).
//! It uses only the base layers' interfaces (`transport::FrontEnd`,
//! `identity`, `authz`, `store`), as an MQTT listener will.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tollgate::authz::{Action, Policy, Resource};
use tollgate::identity::{AuthMethod, Authenticator, Identity, User, Users, passwords};
use tollgate::store::StoreView;
use tollgate::transport::{self, ConnState, FrontEnd, ListenerInfo, Shutdown, Stream};

use crate::tls::{TestCa, client_config};

/// Answers each line with `ALLOW` or `DENY <why>`.
struct TopicLines {
    policy: Policy,
    authn: Authenticator,
}

impl FrontEnd for TopicLines {
    async fn serve<S: Stream>(&self, io: S, conn: Arc<ConnState>, _shutdown: Shutdown) {
        let Some(cert) = conn.peer_cert.clone() else {
            return; // the listener requires a certificate
        };
        let mut who = Arc::new(Identity::from_cert(cert));
        let (read, mut write) = tokio::io::split(io);
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(("LOGIN", login)) = line.split_once(' ') {
                let (user, password) = login.split_once(' ').unwrap_or((login, ""));
                let answer = match self
                    .authn
                    .password(user, password.as_bytes(), AuthMethod::Password, None)
                    .await
                {
                    Ok(id) => {
                        who = id;
                        "OK\n".to_owned()
                    }
                    Err(refusal) => format!("DENY {refusal}\n"),
                };
                if write.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
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
        r#"[{"allow": {"actions": ["publish", "subscribe"], "topics": ["fleet/{cn}/#"]}},
            {"allow": {"via": ["password"], "roles": ["device"], "topics": ["devices/%u/#"]}}]"#,
    )
    .unwrap();
    // Users: one in gateway.yaml (bcrypt, as tstack's store holds them),
    // one in a real store (argon2id, as `tollgate users add` writes).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    // Made by Python's bcrypt (`hashpw(b"tstack", gensalt(4))`).
    let bcrypt = "$2b$04$dWmjw0XH4ZOXGz9dmsOZwee2pvH5TdhxF/JJLShsw0VO1kbx81JKK";
    std::fs::write(
        &file,
        format!(
            "store: {{ path: s.redb }}\nauth:\n  users:\n    - {{ name: tstack, password_hash: '{bcrypt}', roles: [device] }}\n"
        ),
    )
    .unwrap();
    let cfg = tollgate::config::load(&file).unwrap();
    let store = tollgate::store::open(&cfg).unwrap();
    passwords::put_user(
        &*store,
        &User {
            name: "dev-7".into(),
            password_hash: passwords::hash_password(b"correct horse").unwrap(),
            roles: vec!["device".into()],
            claims: Default::default(),
            topics: Vec::new(),
        },
    )
    .unwrap();
    let users = Arc::new(Users::default());
    users.load(&cfg, Some(&*store)).unwrap();
    let front_end = Arc::new(TopicLines {
        policy: Policy::compile(&rules, Resource::Topic).unwrap(),
        authn: Authenticator {
            accept_jwt: false,
            accept_cert: true,
            require_both: false,
            providers: Vec::new(),
            users: Some(users),
        },
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

    // A password identity: its own topics only, and no login on a wrong
    // password or an unknown name.
    assert_eq!(
        ask("LOGIN dev-7 wrong").await,
        r#"DENY user "dev-7" refused: wrong password"#
    );
    assert_eq!(
        ask("LOGIN nobody correct horse").await,
        r#"DENY user "nobody" refused: unknown user"#
    );
    assert_eq!(ask("LOGIN dev-7 correct horse").await, "OK");
    assert_eq!(ask("PUB devices/dev-7/temp").await, "ALLOW");
    assert_eq!(
        ask("PUB fleet/sensor-1/temp").await,
        "DENY denied: no rule matches"
    );
    assert_eq!(
        ask("SUB devices/+/temp").await,
        "DENY denied: no rule matches"
    );
    assert_eq!(ask("LOGIN tstack tstack").await, "OK", "a bcrypt hash");
    assert_eq!(ask("SUB devices/tstack/#").await, "ALLOW");
    shutdown.graceful.cancel();
}
