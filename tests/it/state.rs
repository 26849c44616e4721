//! State that never silently diverges: store changes that cannot load at
//! first are applied once they can, acknowledgements that mean durable,
//! reloads that cannot empty the gateway by accident, a CLI that is never
//! starved, store failures told to admin API callers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Request};
use serde_json::json;

use crate::oauth::{
    authenticates, call_bar, cli, known_client, oauth_config, static_client, token, token_call,
};
use crate::support::*;

fn store_of(gw: &TestGateway) -> PathBuf {
    gw.path.parent().unwrap().join("data/tollgate.redb")
}

/// Another process holding the store's lock (as a slow CLI or a backup
/// tool would) for `secs`; returns once it has the lock.
async fn hold_store(store: &Path, secs: u32) -> Child {
    let store = store.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("flock")
            .args(["-x", store.to_str().unwrap(), "-c"])
            .arg(format!("echo locked; sleep {secs}"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock(1) from util-linux");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        child
    })
    .await
    .unwrap()
}

/// Waits until the process holding the store's lock has ended.
async fn released(lock: Child) {
    tokio::task::spawn_blocking(move || {
        let mut lock = lock;
        lock.wait()
    })
    .await
    .unwrap()
    .unwrap();
}

async fn admin_status(gw: &TestGateway) -> serde_json::Value {
    get(&format!("http://{}/admin/status", gw.gw.admin_addr()))
        .await
        .json()
}

/// `clients disable`, and the store locked before the gateway can read the
/// change: the read fails, is retried, and the client is refused once the
/// lock is gone; meanwhile /admin/status says a change waits, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_change_that_cannot_load_is_applied_once_it_can() {
    let up = Upstream::echo("bar").await;
    let yaml = oauth_config(&up, "ES256", "").replace("debounce: 50ms", "debounce: 500ms");
    let gw = TestGateway::start(&yaml).await;
    let secret = known_client(&gw, "svc", &["--scope", "bar.read", "--audience", "bar"]).await;

    cli(&gw.path, &["clients", "disable", "svc"]);
    let lock = hold_store(&store_of(&gw), 8).await;
    let held = Instant::now();
    wait_until(
        Duration::from_secs(8),
        "the status says a store change waits",
        || async { !admin_status(&gw).await["store"]["waiting"].is_null() },
    )
    .await;
    let status = admin_status(&gw).await;
    assert_eq!(status["store"]["in_sync"], false, "{status}");
    let why = status["store"]["waiting"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(why.contains("held open by another process"), "{why}");
    assert_eq!(metric(&gw.metrics().await, "tollgate_store_in_sync"), 0.0);
    released(lock).await;
    wait_until(
        Duration::from_secs(15),
        "the disabled client is refused",
        || async { !authenticates(&gw, "svc", &secret).await },
    )
    .await;
    assert!(
        held.elapsed() >= Duration::from_secs(7),
        "it waited for the lock"
    );
    let status = admin_status(&gw).await;
    assert_eq!(status["store"]["in_sync"], true, "{status}");
    assert!(status["store"]["waiting"].is_null(), "{status}");
    let generation = &status["store"]["generation"];
    assert_eq!(generation["applied"], generation["stored"], "{status}");
    assert_eq!(metric(&gw.metrics().await, "tollgate_store_in_sync"), 1.0);
}

/// SIGHUP's way in (`Gateway::reload`) reads the store even when the file
/// is unchanged: a change whose notification never came is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_store_as_well_as_the_file() {
    let up = Upstream::echo("bar").await;
    // No watcher of the change marker can see a change made this way:
    // written by another process whose marker touch is undone.
    let gw = TestGateway::start(&oauth_config(&up, "ES256", "")).await;
    let secret = known_client(&gw, "svc", &["--scope", "bar.read", "--audience", "bar"]).await;
    let store = store_of(&gw);
    // The marker cannot be touched (a directory stands in its place): the
    // write below goes unannounced. What the swap itself woke is over first.
    let marker = tollgate::store::RedbStore::marker_for(&store);
    std::fs::remove_file(&marker).unwrap();
    std::fs::create_dir(&marker).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let disabled = {
        let store: std::sync::Arc<dyn tollgate::store::Store> =
            tollgate::store::RedbStore::shared(&store).unwrap();
        let mut records: Vec<serde_json::Value> = store.clients().unwrap();
        let svc = records.iter_mut().find(|c| c["id"] == "svc").unwrap();
        svc["enabled"] = json!(false);
        let svc = svc.clone();
        let generation = store.generation().unwrap();
        store.put_client("svc", &svc).unwrap();
        assert_eq!(store.generation().unwrap(), generation + 1);
        svc
    };
    assert_eq!(disabled["enabled"], false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(authenticates(&gw, "svc", &secret).await, "not seen yet");
    gw.gw.reload().await.expect("reload");
    assert!(!authenticates(&gw, "svc", &secret).await, "seen on reload");
}

/// A revocation the store cannot take is a 503 the caller retries (the
/// token is refused on this node meanwhile); the retried one is a 200 and
/// survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_acknowledged_only_once_durable() {
    let up = Upstream::echo("bar").await;
    let secret = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let clients = static_client("foo", secret);
    let gw = TestGateway::start(&oauth_config(&up, "ES256", &clients)).await;
    let t = token(&gw, "foo", secret, "").await;
    assert_eq!(call_bar(&gw, &t).await.status, 200);

    let lock = hold_store(&store_of(&gw), 6).await;
    let r = token_call(&gw, "/oauth2/revoke", &t, ("foo", secret)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "temporarily_unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(call_bar(&gw, &t).await.status, 401, "refused here at once");
    released(lock).await;
    let r = token_call(&gw, "/oauth2/revoke", &t, ("foo", secret)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let path = gw.path.clone();
    gw.gw.shutdown();
    gw.gw.drained().await;
    let again = tollgate::Gateway::start(tollgate::config::load(&path).unwrap(), Some(path))
        .await
        .unwrap();
    let r = send(
        Request::get(format!(
            "http://{}/bar/x",
            again.listener_addr("sidecar").unwrap()
        ))
        .header("authorization", format!("Bearer {t}"))
        .body(full(""))
        .unwrap(),
    )
    .await;
    assert_eq!(r.status, 401, "the revocation survived the restart");
    again.shutdown();
}

/// Under load, the config file is emptied, left with comments only, made
/// an empty mapping, and given no routes: each is refused, no request
/// fails; a file that says `allow_no_routes` is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_config_file_never_empties_the_gateway() {
    let up = Upstream::echo("up").await;
    let yaml = config_with_routes(&route("r", "/", &[&up], "")) + "reload: { debounce: 50ms }\n";
    let gw = TestGateway::start(&yaml).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, served, failed, url) =
            (stop.clone(), served.clone(), failed.clone(), gw.url("/x"));
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let req = Request::get(&url).body(full("")).unwrap();
                match tokio::time::timeout(Duration::from_secs(5), c.request(req)).await {
                    Ok(Ok(resp)) if resp.status() == 200 => served.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        })
    };
    let rejected = || async {
        metric(
            &gw.metrics().await,
            "tollgate_config_reloads_total{outcome=\"rejected\"}",
        )
    };
    let bad = [
        String::new(),
        "# being rewritten\n\n# nothing yet\n".to_owned(),
        "{}\n".to_owned(),
        config_with_routes("").replace("routes:\n", "routes: []\n"),
    ];
    for (i, text) in bad.iter().enumerate() {
        // Written in place, as `> gateway.yaml` or a truncating save does.
        std::fs::write(&gw.path, text).unwrap();
        wait_until(Duration::from_secs(10), "the file is refused", || async {
            rejected().await >= (i + 1) as f64
        })
        .await;
        let err = gw.gw.reload().await.expect_err("refused on reload too");
        let text = err.to_string();
        assert!(
            text.contains("allow_no_routes"),
            "the error says how to do it on purpose: {text}"
        );
    }
    let before = served.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "traffic still flows", || async {
        served.load(Ordering::SeqCst) > before + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request failed");

    std::fs::write(
        &gw.path,
        config_with_routes("").replace("routes:\n", "routes: []\n")
            + "reload: { allow_no_routes: true }\n",
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "an empty route list on purpose",
        || async { gw.gw.config().routes.is_empty() },
    )
    .await;
    assert_eq!(get(&gw.url("/x")).await.status, 404);
}

/// `tollgate clients add` while the admin API writes a route every 100 ms
/// (the gateway never lets the file go for long on its own): the CLI gets
/// its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_gets_the_store_while_the_admin_api_writes() {
    let up = Upstream::echo("bar").await;
    let gw = TestGateway::start(&oauth_config(&up, "ES256", "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let url = format!("http://{}/admin/routes", gw.gw.admin_addr());
        let target = format!("http://{}", up.addr);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let doc = json!({"name": format!("api{i}"), "match": {"path_prefix": format!("/api{i}")}, "upstream": {"targets": [target]}});
                let r = send(
                    Request::post(&url)
                        .header("content-type", "application/json")
                        .body(full(doc.to_string()))
                        .unwrap(),
                )
                .await;
                assert!(r.status.is_success(), "{} {}", r.status, r.text());
                writes.fetch_add(1, Ordering::SeqCst);
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config = gw.path.clone();
    let started = Instant::now();
    let added = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["clients", "add", "svc", "--scope", "bar.read", "-c"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(
        added.status.success(),
        "clients add while the admin API writes: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(took < Duration::from_secs(5), "within its wait: {took:?}");
    assert!(writes.load(Ordering::SeqCst) >= 5);
}

/// A store the admin API cannot use is a 503 with the reason (not a bare
/// 500), and the next calls work once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_store_failures_say_why_and_recover() {
    let up = Upstream::echo("bar").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/r", &[&up], ""))).await;
    let url = format!("http://{}/admin/routes", gw.gw.admin_addr());
    let post = |name: &'static str| {
        let url = url.clone();
        let target = format!("http://{}", up.addr);
        async move {
            let doc = json!({"name": name, "match": {"path_prefix": format!("/{name}")}, "upstream": {"targets": [target]}});
            send(
                Request::builder()
                    .method(Method::POST)
                    .uri(&url)
                    .header("content-type", "application/json")
                    .body(full(doc.to_string()))
                    .unwrap(),
            )
            .await
        }
    };
    assert!(post("first").await.status.is_success());
    let lock = hold_store(&store_of(&gw), 6).await;
    let r = post("second").await;
    assert_eq!(r.status, 503, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("held open by another process"),
        "{message}"
    );
    released(lock).await;
    let listed = get(&url).await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert!(post("third").await.status.is_success());
    assert_eq!(get(&gw.url("/third")).await.status, 200);
    assert_eq!(
        get(&gw.url("/second")).await.status,
        404,
        "never acknowledged"
    );
}

/// A store that cannot be opened at start (here its directory cannot be
/// made): the gateway starts, serves the file's routes, says why in
/// /readyz, answers admin writes 503; once the store can be made, the token
/// server and admin writes work without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_starts_without_its_store_and_recovers() {
    let up = Upstream::echo("bar").await;
    let secret = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let clients = static_client("foo", secret);
    let dir = tempfile::tempdir().unwrap();
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, "a file where the store's directory should be").unwrap();
    let yaml = oauth_config(&up, "ES256", &clients)
        + &format!("store: {{ path: {}/tollgate.redb }}\n", blocked.display());
    let gw = TestGateway::start(&yaml).await;

    assert_eq!(
        get(&gw.url("/bar/x")).await.status,
        401,
        "the route serves (it wants a token)"
    );
    let ready = get(&format!("http://{}/readyz", gw.gw.admin_addr())).await;
    assert_eq!(ready.status, 200);
    assert!(ready.text().contains("degraded"), "{}", ready.text());
    assert!(
        ready.text().contains("cannot create its directory"),
        "{}",
        ready.text()
    );
    assert_eq!(metric(&gw.metrics().await, "tollgate_store_in_sync"), 0.0);
    let doc = json!({"name": "api", "match": {"path_prefix": "/api"}, "upstream": {"targets": [format!("http://{}", up.addr)]}});
    let post = || {
        send(
            Request::post(format!("http://{}/admin/routes", gw.gw.admin_addr()))
                .header("content-type", "application/json")
                .body(full(doc.to_string()))
                .unwrap(),
        )
    };
    let r = post().await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("cannot create its directory"),
        "{}",
        r.text()
    );

    // The token server's endpoints say "later", not "no such thing".
    let waiting = send(
        Request::post(gw.url("/oauth2/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("grant_type=client_credentials"))
            .unwrap(),
    )
    .await;
    assert_eq!(waiting.status, 503, "{}", waiting.text());
    assert_eq!(waiting.json()["error"], "temporarily_unavailable");
    assert_eq!(waiting.headers["retry-after"], "5");
    assert_eq!(get(&gw.url("/.well-known/jwks.json")).await.status, 503);

    std::fs::remove_file(&blocked).unwrap();
    wait_until(
        Duration::from_secs(15),
        "the token server is back",
        || async { authenticates(&gw, "foo", secret).await },
    )
    .await;
    let t = token(&gw, "foo", secret, "").await;
    assert_eq!(call_bar(&gw, &t).await.status, 200);
    let ready = get(&format!("http://{}/readyz", gw.gw.admin_addr())).await;
    assert_eq!(ready.text(), "ready\n");
    assert!(post().await.status.is_success());
    assert_eq!(get(&gw.url("/api")).await.status, 200);
    assert_eq!(metric(&gw.metrics().await, "tollgate_store_in_sync"), 1.0);
}

/// `tollgate users …` writes password users to the store; the running
/// gateway loads them (with gateway.yaml's) as it loads clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_users_from_the_cli_reach_the_running_gateway() {
    let up = Upstream::echo("bar").await;
    let hash = tollgate::identity::passwords::hash_password(b"yaml-pw").unwrap();
    let yaml = oauth_config(&up, "ES256", "").replace(
        "auth:\n  providers:",
        &format!("auth:\n  users:\n    - {{ name: svc, password_hash: '{hash}' }}\n  providers:"),
    );
    let gw = TestGateway::start(&yaml).await;
    let users = || gw.gw.status()["password_users"].as_u64().unwrap();
    assert_eq!(users(), 1, "gateway.yaml's user");

    let added = cli(&gw.path, &["users", "add", "dev-1", "--role", "device"]);
    let password = added
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("a generated password is printed")
        .to_owned();
    assert_eq!(password.len(), 24);
    wait_until(
        Duration::from_secs(10),
        "the new user is loaded",
        || async { users() == 2 },
    )
    .await;
    assert_eq!(
        cli(&gw.path, &["users", "list"]).trim(),
        "dev-1\troles=device"
    );

    // The stored hash is one the password verifies against.
    let store = tollgate::store::RedbStore::shared(&store_of(&gw)).unwrap();
    let stored: Vec<tollgate::identity::User> = (&*store as &dyn tollgate::store::Store)
        .records(tollgate::store::Table::Users)
        .unwrap();
    tollgate::identity::passwords::check(&stored[0].password_hash, password.as_bytes()).unwrap();

    assert_eq!(
        cli(&gw.path, &["users", "remove", "dev-1"]).trim(),
        "user dev-1 removed"
    );
    wait_until(Duration::from_secs(10), "the user is gone", || async {
        users() == 1
    })
    .await;

    // `users hash` reads standard input and needs no config.
    let mut hashing = Command::new(BIN)
        .args(["users", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    hashing
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let out = hashing.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    tollgate::identity::passwords::check(hash.trim(), b"from stdin").unwrap();
}

#[test]
fn unusable_password_hashes_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(
        &path,
        "auth:\n  users:\n    - { name: a, password_hash: plain }\n    - { name: a, password_hash: '$2b$20$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyzABCDE' }\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("auth.users[0].password_hash"), "{err}");
    assert!(
        err.contains("auth.users[1].name: duplicate user `a`"),
        "{err}"
    );
    assert!(
        err.contains("auth.users[1].password_hash: bcrypt cost 20"),
        "{err}"
    );
}
