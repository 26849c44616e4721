//! The WAMP router against an independent client: autobahn-python 22.7.1,
//! Debian's python3-autobahn with python3-nacl, python3-msgpack and
//! python3-cbor2 (.ci/run installs them), run with Debian's
//! `/usr/bin/python3`. The clients are tests/wamp/service.py; each prints
//! JSON lines that these tests read.
//!
//! The first test is the Crossbar micro-services example our users run:
//! authenticator services joined with static TLS principals authenticate
//! and authorise applications dynamically, round robin, and log to a
//! second realm watched by log daemons.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::support::TestGateway;
use crate::tls::{Identity, TestCa};

const PYTHON: &str = "/usr/bin/python3";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/wamp/service.py");
/// Longest wait for any one line a client prints.
const WAIT: Duration = Duration::from_secs(15);

/// One autobahn-python process and the JSON lines it printed.
struct Py {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Py {
    /// `service.py mode config`, killed when dropped.
    fn start(name: &str, mode: &str, config: Value) -> Py {
        let mut child = Command::new(PYTHON)
            .args([SCRIPT, mode, &config.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("/usr/bin/python3 (Debian's, with python3-autobahn)");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = out.next_line().await {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "raw": line }));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut from, into) = (child.stderr.take().expect("stderr"), stderr.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = from.read(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]);
                into.lock().unwrap().push_str(&text);
            }
        });
        Py {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    #[track_caller]
    fn fail(&self, why: &str) -> ! {
        let last = &self.seen[self.seen.len().saturating_sub(15)..];
        let lines: Vec<String> = last.iter().map(Value::to_string).collect();
        panic!(
            "{}: {why}\nlast lines:\n{}\nstderr:\n{}",
            self.name,
            lines.join("\n"),
            self.stderr.lock().unwrap()
        );
    }

    /// The next line that `pred` takes, skipping others, within [`WAIT`].
    async fn next_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Ok(None) => self.fail(&format!("exited while waiting for {what}")),
                Err(_) => self.fail(&format!("no {what} within {WAIT:?}")),
            }
        }
    }

    /// A line printed so far or from now on that `pred` takes.
    async fn find(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        match self.seen.iter().find(|v| pred(v)) {
            Some(v) => v.clone(),
            None => self.next_where(what, pred).await,
        }
    }

    /// Every line printed so far.
    fn drain(&mut self) -> &[Value] {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }

    async fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// Closes stdin and waits for the exit.
    async fn finish(&mut self) {
        self.stdin = None;
        if tokio::time::timeout(WAIT, self.child.wait()).await.is_err() {
            self.fail("did not exit when its stdin closed");
        }
    }
}

/// A connection as service.py takes it.
fn conn(port: u16, kind: &str, serializer: &str) -> Value {
    json!({ "port": port, "kind": kind, "serializer": serializer })
}

/// The same over TLS: trusting `ca`, presenting `id` when given.
fn tls(mut c: Value, ca: &TestCa, id: Option<&Identity>) -> Value {
    let mut t = json!({ "ca": ca.pem() });
    if let Some(id) = id {
        t["cert"] = json!(id.cert);
        t["key"] = json!(id.key);
    }
    c["tls"] = t;
    c
}

fn with(mut c: Value, realm: &str, auth: Value) -> Value {
    c["realm"] = json!(realm);
    c["auth"] = auth;
    c
}

/// `ab01..` as `AB:01:..`, as Crossbar writes fingerprints.
fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

fn port(gw: &TestGateway, listener: &str) -> u16 {
    gw.gw.listener_addr(listener).expect("listener").port()
}

/// The JSON lines of a `joins` run, by label.
async fn joins(specs: Value) -> serde_json::Map<String, Value> {
    let labels: Vec<String> = specs.as_object().unwrap().keys().cloned().collect();
    let mut py = Py::start("joins", "joins", json!({ "joins": specs }));
    let mut out = serde_json::Map::new();
    while out.len() < labels.len() {
        let line = py
            .next_where("a join's outcome", |v| v["label"].is_string())
            .await;
        out.insert(line["label"].as_str().unwrap().to_owned(), line);
    }
    py.finish().await;
    out
}

// --- the Crossbar micro-services example ----------------------------------

/// The certificates of the example: the router's, the two authenticator
/// instances', the two log daemons', an application's, and some that are
/// not welcome.
struct Certs {
    ca: TestCa,
    server: Identity,
    auth: [Identity; 2],
    logs: [Identity; 2],
    app: Identity,
    /// From our CA, with no principal and not an application.
    mallory: Identity,
    /// From another CA (which must outlive its files).
    _other_ca: TestCa,
    stranger: Identity,
}

impl Certs {
    fn new() -> Certs {
        let ca = TestCa::new("XBR");
        let other_ca = TestCa::new("Other");
        Certs {
            server: ca.server("router", "localhost"),
            auth: [ca.client("auth1", "XBR"), ca.client("auth2", "XBR")],
            logs: [ca.client("log1", "XBR"), ca.client("log2", "XBR")],
            app: ca.client("app1", "XBR"),
            mallory: ca.client("mallory", "XBR"),
            stranger: other_ca.client("stranger", "XBR"),
            _other_ca: other_ca,
            ca,
        }
    }

    fn sha1(id: &Identity) -> String {
        colon_hex(&id.parsed().sha1)
    }

    /// Two mTLS `protocol: wamp` listeners: `wamp-static` with static TLS
    /// principals, `wamp-dynamic` with the authenticator procedure.
    ///
    /// A static principal has one role and at most one realm, and the
    /// principal is the first whose certificate matches and, when the
    /// HELLO names an authid, whose authid it is. So each authenticator
    /// certificate has two principals: authid `authenticator` (realm
    /// `crossbar`, shared by both instances as in the example) and authid
    /// `auth1`/`auth2` (realm `logger`, role `node`); the service names the
    /// authid it wants in its HELLO.
    fn gateway_yaml(&self) -> String {
        let listener_tls = format!(
            "    tls: {{ cert: {}, key: {}, client_ca: {}, client_auth: required }}\n",
            self.server.cert.display(),
            self.server.key.display(),
            self.ca.pem().display()
        );
        let mut principals = String::new();
        for (i, id) in self.auth.iter().enumerate() {
            let sha1 = Self::sha1(id);
            let n = i + 1;
            principals.push_str(&format!(
                "            auth{n}: {{ authid: authenticator, certificate-sha1: '{sha1}', role: authenticator, realm: crossbar }}\n"
            ));
            principals.push_str(&format!(
                "            auth{n}-node: {{ authid: auth{n}, certificate-sha1: '{sha1}', role: node, realm: logger }}\n"
            ));
        }
        for n in 1..=2 {
            principals.push_str(&format!(
                "            log{n}: {{ authid: logdaemon, cn: log{n}, role: logdaemon, realm: logger }}\n"
            ));
        }
        [
            "listeners:\n",
            "  - { name: sidecar, bind: '127.0.0.1:0' }\n",
            "  - name: wamp-static\n    bind: 127.0.0.1:0\n    protocol: wamp\n",
            &listener_tls,
            "  - name: wamp-dynamic\n    bind: 127.0.0.1:0\n    protocol: wamp\n",
            &listener_tls,
            "admin:\n  bind: 127.0.0.1:0\n",
            "wamp:\n  realms:\n",
            "    - name: crossbar\n      roles:\n",
            "        - name: authenticator\n          permissions:\n",
            "            - allow: { actions: [register], uris: [com.example.authenticate, com.example.authorize] }\n",
            "        - name: app\n          authorizer: com.example.authorize\n",
            "    - name: logger\n      roles:\n",
            "        - name: logdaemon\n          permissions:\n",
            "            - allow: { actions: [subscribe], uris: [wamp.session.on_join, wamp.session.on_leave, com.example.log] }\n",
            "            - allow: { actions: [call], uris: [wamp.session.list, wamp.session.get] }\n",
            "        - name: node\n          permissions:\n",
            "            - allow: { actions: [publish], uris: [com.example.log] }\n",
            "  listeners:\n",
            "    wamp-static:\n      auth:\n        tls:\n          type: static\n          principals:\n",
            &principals,
            "    wamp-dynamic:\n      auth:\n",
            "        tls: { type: dynamic, authenticator: com.example.authenticate, authenticator-realm: crossbar }\n",
        ]
        .concat()
    }
}

/// An on_join or on_leave a log daemon printed: (authid, authrole).
fn meta_who(v: &Value) -> Option<(String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    if let Some(info) = v.get("on_join") {
        return Some((text(&info["authid"]), text(&info["authrole"])));
    }
    v.get("on_leave").map(|l| (text(&l[1]), text(&l[2])))
}

/// The seed scenario end to end: static TLS principals for the services,
/// dynamic authentication and authorisation of the applications by the
/// services (round robin over two instances), two realms kept apart, and
/// no outage when one authenticator instance is killed with `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossbar_microservices_example_with_autobahn() {
    let certs = Certs::new();
    let gw = TestGateway::start(&certs.gateway_yaml()).await;
    let (static_port, dynamic_port) = (port(&gw, "wamp-static"), port(&gw, "wamp-dynamic"));
    let ca = &certs.ca;

    // The log daemons first (WebSocket, JSON), so that they see the nodes join.
    let mut loggers: Vec<Py> = certs
        .logs
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let name = format!("log{}", i + 1);
            let mut c = tls(conn(static_port, "websocket", "json"), ca, Some(id));
            c = with(c, "logger", json!({ "method": "tls" }));
            c["name"] = json!(name);
            Py::start(&name, "logger", c)
        })
        .collect();
    for l in &mut loggers {
        let ready = l.next_where("ready", |v| v["ready"].is_string()).await;
        let w = &ready["welcome"];
        assert_eq!(
            (&w["realm"], &w["authid"], &w["authrole"], &w["authmethod"]),
            (
                &json!("logger"),
                &json!("logdaemon"),
                &json!("logdaemon"),
                &json!("tls")
            ),
            "{ready}"
        );
    }

    // The authenticator instances (RawSocket, CBOR), one certificate each.
    let mut auths: Vec<Py> = certs
        .auth
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let name = format!("auth{}", i + 1);
            let mut c = tls(conn(static_port, "rawsocket", "cbor"), ca, Some(id));
            c["name"] = json!(name);
            Py::start(&name, "auth", c)
        })
        .collect();
    let mut node_sessions = Vec::new();
    for (i, a) in auths.iter_mut().enumerate() {
        let ready = a.next_where("ready", |v| v["ready"].is_string()).await;
        let (crossbar, logger) = (&ready["crossbar"], &ready["logger"]);
        assert_eq!(
            (
                &crossbar["realm"],
                &crossbar["authid"],
                &crossbar["authrole"],
                &crossbar["authprovider"]
            ),
            (
                &json!("crossbar"),
                &json!("authenticator"),
                &json!("authenticator"),
                &json!("static")
            ),
            "{ready}"
        );
        assert_eq!(
            (&logger["realm"], &logger["authid"], &logger["authrole"]),
            (
                &json!("logger"),
                &json!(format!("auth{}", i + 1)),
                &json!("node")
            ),
            "{ready}"
        );
        node_sessions.push(logger["session"].clone());
    }

    // Both log daemons see both nodes join `logger`, with their certificates.
    for l in &mut loggers {
        for (i, id) in certs.auth.iter().enumerate() {
            let authid = format!("auth{}", i + 1);
            let seen = l
                .find(&format!("on_join of {authid}"), |v| {
                    v["on_join"]["authid"] == authid.as_str() && v["on_join"]["authrole"] == "node"
                })
                .await;
            let cert = &seen["get"]["transport"]["client_cert"];
            assert_eq!(cert["subject"]["cn"], authid.as_str(), "{seen}");
            assert_eq!(cert["sha1"], Certs::sha1(id).as_str(), "{seen}");
            assert_eq!(seen["get"]["session"], node_sessions[i], "{seen}");
        }
    }

    // An application (WebSocket, MessagePack) joins again and again on the
    // dynamic listener.
    let app_conn = with(
        tls(
            conn(dynamic_port, "websocket", "msgpack"),
            ca,
            Some(&certs.app),
        ),
        "crossbar",
        json!({ "method": "tls" }),
    );
    let mut app = Py::start("app", "app", app_conn);
    let mut instances = Vec::new();
    for _ in 0..4 {
        let it = app
            .next_where("an iteration", |v| v["iteration"].is_u64())
            .await;
        let w = &it["welcome"];
        assert_eq!(
            (
                &w["realm"],
                &w["authid"],
                &w["authrole"],
                &w["authmethod"],
                &w["authprovider"]
            ),
            (
                &json!("crossbar"),
                &json!("app1"),
                &json!("app"),
                &json!("tls"),
                &json!("dynamic")
            ),
            "{it}"
        );
        assert_eq!(
            it["result"],
            json!({ "echo": "hello", "other": "wamp.error.not_authorized" }),
            "register and call com.example.app.* are allowed, anything else is not: {it}"
        );
        instances.push(
            w["authextra"]["instance"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
    }
    assert!(
        instances.windows(2).all(|w| w[0] != w[1])
            && instances.iter().all(|i| i == "auth1" || i == "auth2"),
        "the authenticator is called round robin: {instances:?}"
    );

    // What the authenticator was given, and what the authorizer.
    let mut seen_by_auth = None;
    for a in &mut auths {
        if let Some(v) = a.drain().iter().find(|v| v.get("authenticate").is_some()) {
            seen_by_auth = Some(v["authenticate"].clone());
        }
    }
    let asked = seen_by_auth.expect("an authenticator was called");
    assert_eq!(
        (&asked["realm"], &asked["authid"]),
        (&json!("crossbar"), &Value::Null),
        "{asked}"
    );
    let details = &asked["details"];
    assert!(details["session"].is_u64(), "{details}");
    assert_eq!(details["authmethod"], "tls", "{details}");
    let transport = &details["transport"];
    assert_eq!(transport["type"], "websocket", "{transport}");
    assert!(
        transport["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("tcp4:127.0.0.1:")),
        "{transport}"
    );
    let cert = &transport["client_cert"];
    let parsed = certs.app.parsed();
    assert_eq!(cert["sha1"], colon_hex(&parsed.sha1).as_str(), "{cert}");
    assert_eq!(cert["sha256"], colon_hex(&parsed.sha256).as_str(), "{cert}");
    assert_eq!(cert["subject"]["cn"], "app1", "{cert}");
    assert_eq!(cert["subject"]["o"], "XBR", "{cert}");
    assert_eq!(cert["issuer"]["cn"], "XBR Root", "{cert}");
    assert!(
        cert["serial"]
            .as_str()
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())),
        "the serial in decimal: {cert}"
    );
    for k in ["not_before", "not_after"] {
        assert!(
            cert[k].as_str().is_some_and(|t| t.len() >= 20),
            "{k}: {cert}"
        );
    }
    assert_eq!(transport["peer_cert"], *cert, "{transport}");
    let mut denied = None;
    for a in &mut auths {
        if let Some(v) = a
            .drain()
            .iter()
            .find(|v| v["authorize"]["uri"] == "com.example.other")
        {
            denied = Some(v["authorize"].clone());
        }
    }
    assert_eq!(
        denied.expect("the authorizer was asked about com.example.other"),
        json!({ "authid": "app1", "authrole": "app", "uri": "com.example.other",
                "action": "call", "allow": false })
    );

    // An authenticator's error refuses the join with its URI.
    let refused = joins(json!({ "mallory": with(
        tls(conn(dynamic_port, "rawsocket", "json"), ca, Some(&certs.mallory)),
        "crossbar",
        json!({ "method": "tls" }),
    ) }))
    .await;
    assert_eq!(
        refused["mallory"]["abort"]["reason"], "com.example.unknown_client",
        "{:?}",
        refused["mallory"]
    );

    // The nodes log to realm `logger`; both daemons get both instances' logs.
    for l in &mut loggers {
        for instance in ["auth1", "auth2"] {
            l.find(&format!("a log from {instance}"), |v| {
                v["log"]["instance"] == instance && v["log"]["cn"] == "app1"
            })
            .await;
        }
    }

    // `kill -9` one authenticator instance while the application goes on.
    let mut auth1 = auths.remove(0);
    auth1.child.start_kill().unwrap();
    tokio::time::timeout(WAIT, auth1.child.wait())
        .await
        .expect("auth1 dies")
        .unwrap();
    for l in &mut loggers {
        let left = l
            .find("on_leave of auth1", |v| v["on_leave"][1] == "auth1")
            .await;
        assert_eq!(
            left["on_leave"],
            json!([node_sessions[0], "auth1", "node"]),
            "{left}"
        );
    }
    // The router has seen auth1 go: from here on, every join and call works.
    app.send("mark").await;
    let mut before = Vec::new();
    let mut after = 0;
    while after < 5 {
        let it = app
            .next_where("an iteration", |v| v["iteration"].is_u64())
            .await;
        let ok = it["welcome"]["authrole"] == "app"
            && it["result"] == json!({ "echo": "hello", "other": "wamp.error.not_authorized" });
        if it["after_mark"] == true {
            let by = &it["welcome"]["authextra"]["instance"];
            assert!(
                ok && by == "auth2",
                "after auth1 was killed, auth2 serves alone: {it}"
            );
            after += 1;
        } else if !ok {
            before.push(it);
        }
    }
    // A join under way when auth1 died goes on with auth2: the router
    // hands its own calls to another callee of the shared registration.
    assert!(
        before.is_empty(),
        "joins that failed around the kill: {before:#?}"
    );
    app.send("stop").await;
    app.finish().await;

    // With no authenticator left, joins are refused at once.
    let mut auth2 = auths.remove(0);
    auth2.child.start_kill().unwrap();
    tokio::time::timeout(WAIT, auth2.child.wait())
        .await
        .expect("auth2 dies")
        .unwrap();
    for l in &mut loggers {
        l.find("on_leave of auth2", |v| v["on_leave"][1] == "auth2")
            .await;
    }
    let started = Instant::now();
    let refused = joins(json!({ "app": with(
        tls(conn(dynamic_port, "rawsocket", "msgpack"), ca, Some(&certs.app)),
        "crossbar",
        json!({ "method": "tls" }),
    ) }))
    .await;
    assert_eq!(
        refused["app"]["abort"]["reason"], "wamp.error.authentication_failed",
        "{:?}",
        refused["app"]
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Realms are apart: the log daemons never saw a `crossbar` session.
    for l in &mut loggers {
        let name = l.name.clone();
        for v in l.drain() {
            if let Some((authid, authrole)) = meta_who(v) {
                assert!(
                    authrole == "node" || authrole == "logdaemon",
                    "{name} saw a session of another realm ({authid}, {authrole}): {v}"
                );
            }
        }
    }
}

/// Joins that must not succeed: a certificate of another CA (the TLS
/// handshake fails), one of ours without a principal, a principal in the
/// wrong realm, and the dynamic listener when no authenticator is
/// registered (an ABORT, not a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_joins_with_autobahn() {
    let certs = Certs::new();
    let gw = TestGateway::start(&certs.gateway_yaml()).await;
    let (static_port, dynamic_port) = (port(&gw, "wamp-static"), port(&gw, "wamp-dynamic"));
    let ca = &certs.ca;
    let tls_auth = json!({ "method": "tls" });
    let started = Instant::now();
    let out = joins(json!({
        "foreign": with(
            tls(conn(static_port, "rawsocket", "json"), ca, Some(&certs.stranger)),
            "logger", tls_auth.clone()),
        "no_cert": with(
            tls(conn(static_port, "websocket", "json"), ca, None),
            "logger", tls_auth.clone()),
        "no_principal": with(
            tls(conn(static_port, "rawsocket", "msgpack"), ca, Some(&certs.mallory)),
            "crossbar", tls_auth.clone()),
        "wrong_realm": with(
            tls(conn(static_port, "websocket", "cbor"), ca, Some(&certs.logs[0])),
            "crossbar", tls_auth.clone()),
        "not_tls_auth": with(
            tls(conn(static_port, "websocket", "json"), ca, Some(&certs.logs[0])),
            "logger", json!({ "method": "anonymous" })),
        "no_authenticator": with(
            tls(conn(dynamic_port, "websocket", "json"), ca, Some(&certs.app)),
            "crossbar", tls_auth.clone()),
    }))
    .await;
    // autobahn only sees the connection close; a bare TLS connection with
    // the same certificate tells why: the router's alert.
    for (label, alert) in [
        ("foreign", "TLSV1_ALERT_UNKNOWN_CA"),
        ("no_cert", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
    ] {
        let o = &out[label];
        assert!(
            o["welcome"].is_null() && o["abort"].is_null() && o["error"].is_string(),
            "{label}: the TLS handshake fails: {o}"
        );
        assert_eq!(
            o["tls_probe"],
            format!("SSLError: {alert}").as_str(),
            "{label}: {o}"
        );
    }
    for (label, reason) in [
        ("no_principal", "wamp.error.not_authorized"),
        ("wrong_realm", "wamp.error.not_authorized"),
        ("not_tls_auth", "wamp.error.no_auth_method"),
        // Not a refusal: nobody could be asked; the client may retry.
        ("no_authenticator", "wamp.error.authentication_failed"),
    ] {
        let o = &out[label];
        assert_eq!(o["abort"]["reason"], reason, "{label}: {o}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "refusals are prompt: {:?}",
        started.elapsed()
    );
}

// --- serializers and transports -------------------------------------------

const KINDS: [&str; 2] = ["rawsocket", "websocket"];
const SERIALIZERS: [&str; 3] = ["json", "msgpack", "cbor"];

/// A plain `protocol: wamp` listener, `realm1` with role `peer`.
async fn plain_router(auth: &str, extra_roles: &str, users: &str) -> TestGateway {
    let yaml = [
        "listeners:\n",
        "  - { name: sidecar, bind: '127.0.0.1:0' }\n",
        "  - { name: wamp, bind: '127.0.0.1:0', protocol: wamp }\n",
        "admin:\n  bind: 127.0.0.1:0\n",
        users,
        "wamp:\n",
        auth,
        "  realms:\n    - name: realm1\n      roles:\n",
        "        - name: peer\n          permissions:\n",
        "            - allow: { actions: [publish, call], uris: ['com.example.disclosed.**'] }\n",
        "              disclose: true\n",
        "            - allow: { actions: [call, register, publish, subscribe], uris: ['com.example.**'] }\n",
        "            - allow: { actions: [call], uris: ['wamp.session.*', 'wamp.registration.*'] }\n",
        extra_roles,
    ]
    .concat();
    TestGateway::start(&yaml).await
}

/// A caller and callee on each of RawSocket and WebSocket with each of
/// JSON, MessagePack and CBOR: every one calls every other one with binary
/// and nested arguments, and publishes to all the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_and_serializer_with_autobahn() {
    let gw = plain_router("  auth: { anonymous: { role: peer } }\n", "", "").await;
    let p = port(&gw, "wamp");
    let mut connections = serde_json::Map::new();
    for kind in KINDS {
        for ser in SERIALIZERS {
            let c = with(
                conn(p, kind, ser),
                "realm1",
                json!({ "method": "anonymous" }),
            );
            connections.insert(format!("{kind}-{ser}"), c);
        }
    }
    let names: Vec<String> = connections.keys().cloned().collect();
    let mut py = Py::start("matrix", "matrix", json!({ "connections": connections }));
    let line = py
        .next_where("the matrix", |v| v["matrix"].is_object())
        .await;
    let m = &line["matrix"];
    assert_eq!(m["bad"], json!([]), "payloads arrive as sent");
    assert_eq!((&m["calls"], &m["pairs"]), (&json!(30), &json!(30)), "{m}");
    assert_eq!(m["large"], json!(vec![true; 6]), "300 kB of binary: {m}");
    for name in &names {
        let others: Vec<&String> = names.iter().filter(|n| *n != name).collect();
        assert_eq!(m["events"][name], json!(others), "events to {name}");
        let w = &m["welcome"][name];
        let serializer = name.rsplit('-').next().unwrap();
        assert_eq!(
            (&w["serializer"], &w["authrole"], &w["authmethod"]),
            (&json!(serializer), &json!("peer"), &json!("anonymous")),
            "{name}: {w}"
        );
    }
    py.finish().await;
}

// --- the Advanced Profile ---------------------------------------------------

/// Progressive results, cancel, timeout, pattern-based subscriptions and
/// registrations, publisher exclusion, black and white listing, publisher
/// and caller disclosure, the meta API and killing a session, each through
/// autobahn's own API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advanced_profile_with_autobahn() {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let users = [
        "auth:\n  users:\n",
        &format!("    - {{ name: alice, password_hash: '{hash}', roles: [peer] }}\n"),
        &format!("    - {{ name: bob, password_hash: '{hash}', roles: [peer] }}\n"),
        &format!("    - {{ name: carol, password_hash: '{hash}', roles: [guest] }}\n"),
    ]
    .concat();
    let guest = [
        "        - name: guest\n          permissions:\n",
        "            - allow: { actions: [call, subscribe], uris: ['com.example.**'] }\n",
    ]
    .concat();
    let gw = plain_router("  auth: { ticket: {} }\n", &guest, &users).await;
    let p = port(&gw, "wamp");
    let ticket = |who: &str| json!({ "method": "ticket", "authid": who, "ticket": "pw" });
    let mut py = Py::start(
        "features",
        "features",
        json!({ "connections": {
            "alice": with(conn(p, "rawsocket", "json"), "realm1", ticket("alice")),
            "bob": with(conn(p, "websocket", "msgpack"), "realm1", ticket("bob")),
            "carol": with(conn(p, "websocket", "cbor"), "realm1", ticket("carol")),
        } }),
    );
    let ids = py
        .next_where("the sessions", |v| v["sessions"].is_object())
        .await["sessions"]
        .clone();
    py.next_where("the end", |v| v["done"] == true).await;
    let mut checks = serde_json::Map::new();
    for v in py.drain() {
        if let Some(name) = v["check"].as_str() {
            checks.insert(name.to_owned(), v.clone());
        }
    }
    let expected = [
        (
            "progress",
            json!({ "progress": [0, 1, 2], "result": "done" }),
        ),
        (
            "cancel",
            json!({ "caller": "cancelled", "callee_interrupted": true }),
        ),
        (
            "timeout",
            json!({ "error": "wamp.error.timeout", "callee_interrupted": true }),
        ),
        (
            "pattern_subscriptions",
            json!({ "prefix": [["p", "com.example.pfx.a.b"]],
                    "wildcard": [["w", "com.example.dev1.status"]] }),
        ),
        (
            "pattern_registrations",
            json!([
                "com.example.wc.x.get",
                "com.example.pp.deep.er",
                "com.example.pp.exact"
            ]),
        ),
        (
            "publisher_exclusion",
            json!({ "alice": ["second"], "bob": ["first", "second"] }),
        ),
        (
            "black_white_listing",
            json!({ "bob": ["only-bob", "no-guests", "not-carol", "only-peers", "all"],
                    "carol": ["not-bob", "only-carol", "all"] }),
        ),
        (
            "disclosure",
            json!({
                "events": { "disclosed": [ids["alice"], "alice", "peer"], "plain": [null, null, null] },
                "calls": { "disclosed": [ids["bob"], "bob", "peer"], "plain": [null, null, null] },
            }),
        ),
        (
            "meta",
            json!({
                "count": 3,
                "count_guests": 1,
                "get": { "session": ids["bob"], "authid": "bob", "authrole": "peer", "authmethod": "ticket" },
                "callees": [ids["alice"]],
                "guest_count": "wamp.error.not_authorized",
            }),
        ),
        (
            "unregister_unsubscribe",
            json!({ "before": "here", "after": "wamp.error.no_such_procedure", "events": [] }),
        ),
        (
            "kill",
            json!({ "carol_left": { "reason": "com.example.maintenance", "message": "back soon" },
                    "count": 2 }),
        ),
    ];
    let failed: Vec<String> = expected
        .iter()
        .filter(|(name, want)| checks.get(*name).map(|c| &c["value"]) != Some(want))
        .map(|(name, want)| {
            format!(
                "{name}: expected {want}\n  got {}",
                checks.get(*name).unwrap_or(&Value::Null)
            )
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    py.finish().await;
}

// --- authentication methods -------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An Ed25519 key pair from a seed: (private seed, public key), in hex.
fn ed25519(seed: u8) -> (String, String) {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    let seed = [seed; 32];
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
    (hex(&seed), hex(pair.public_key().as_ref()))
}

/// Ticket (a password user), WAMP-CRA (plain and salted secrets) and
/// cryptosign principals join through autobahn's authenticators; a wrong
/// ticket, secret or key is refused with ABORT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_wampcra_and_cryptosign_with_autobahn() {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let users = format!(
        "auth:\n  users:\n    - {{ name: alice, password_hash: '{hash}', roles: [peer] }}\n"
    );
    let derived = tollgate::wamp::auth_crypto::derive_key("pw2", "salt123", 100, 32).unwrap();
    let (private, public) = ed25519(7);
    let (wrong_private, _) = ed25519(8);
    let auth = [
        "  auth:\n    ticket: {}\n",
        "    wampcra:\n      principals:\n",
        "        cra1: { secret: s3cret, role: peer }\n",
        &format!("        cra2: {{ secret: '{derived}', salt: salt123, iterations: 100, keylen: 32, role: peer }}\n"),
        "    cryptosign:\n      principals:\n",
        &format!("        cs1: {{ authorized_keys: ['{public}'], role: peer }}\n"),
    ]
    .concat();
    let gw = plain_router(&auth, "", &users).await;
    let p = port(&gw, "wamp");
    let join = |kind: &str, ser: &str, auth: Value| with(conn(p, kind, ser), "realm1", auth);
    let ticket = |t: &str| json!({ "method": "ticket", "authid": "alice", "ticket": t });
    let cra = |who: &str, s: &str| json!({ "method": "wampcra", "authid": who, "secret": s });
    let cs = |k: &str| json!({ "method": "cryptosign", "authid": "cs1", "privkey": k });
    let out = joins(json!({
        "ticket": join("rawsocket", "json", ticket("pw")),
        "ticket_wrong": join("websocket", "json", ticket("nope")),
        "wampcra": join("websocket", "msgpack", cra("cra1", "s3cret")),
        "wampcra_wrong": join("rawsocket", "msgpack", cra("cra1", "nope")),
        "wampcra_salted": join("rawsocket", "cbor", cra("cra2", "pw2")),
        "wampcra_salted_wrong": join("websocket", "cbor", cra("cra2", "nope")),
        "cryptosign": join("websocket", "cbor", cs(&private)),
        "cryptosign_wrong": join("rawsocket", "json", cs(&wrong_private)),
    }))
    .await;
    for (label, authid, method) in [
        ("ticket", "alice", "ticket"),
        ("wampcra", "cra1", "wampcra"),
        ("wampcra_salted", "cra2", "wampcra"),
        ("cryptosign", "cs1", "cryptosign"),
    ] {
        let w = &out[label]["welcome"];
        assert_eq!(
            (&w["authid"], &w["authrole"], &w["authmethod"]),
            (&json!(authid), &json!("peer"), &json!(method)),
            "{label}: {}",
            out[label]
        );
        let wrong = &out[&format!("{label}_wrong")];
        assert_eq!(
            wrong["abort"]["reason"], "wamp.error.not_authorized",
            "{label} with the wrong credential: {wrong}"
        );
    }
}
