//! The `tollgate` binary itself: check-config, --version, signals.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .expect("run tollgate")
}

#[test]
fn version_flag() {
    let out = tollgate(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn shipped_config_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.yaml");
    let out = tollgate(&["check-config", "-c", shipped]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_config_lists_every_error_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        r#"
listeners:
  - name: a
    bind: 127.0.0.1:8082
  - name: a
    bind: 0.0.0.0:8082
routes:
  - name: one
    match: { path_prefix: /x }
    upstream: { targets: ["http://u:1"], timeout: 0s }
  - name: one
    match: { path_prefix: /x/ }
    upstream: { targets: ["ftp://u"], health_check: { path: health } }
"#,
    )
    .unwrap();
    let out = tollgate(&["check-config", "-c", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display().to_string();
    for expected in [
        format!("{f}: listeners[1].name: duplicate listener name `a`"),
        format!("{f}: listeners[1].bind: 0.0.0.0:8082 overlaps listeners[0].bind"),
        format!("{f}: routes[0].upstream.timeout: must be greater than zero"),
        format!("{f}: routes[1].name: duplicate route name `one`"),
        format!("{f}: routes[1].match: matches exactly the same requests as routes[0]"),
        format!("{f}: routes[1].upstream.targets[0]: `ftp://u` uses scheme `ftp`"),
        format!("{f}: routes[1].upstream.health_check.path: must start with `/`"),
    ] {
        assert!(err.contains(&expected), "missing `{expected}` in:\n{err}");
    }
    assert!(err.contains("7 problems found"), "{err}");
}

#[test]
fn unknown_keys_and_bad_values_name_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    std::fs::write(
        &file,
        "routes:\n  - name: r\n    upstream: { targets: [\"http://u:1\"], timout: 5s }\n",
    )
    .unwrap();
    let out = tollgate(&["check-config", "-c", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[0].upstream") && err.contains("timout"),
        "{err}"
    );

    std::fs::write(
        &file,
        "routes:\n  - name: r\n    upstream: { targets: [\"http://u:1\"], timeout: soon }\n",
    )
    .unwrap();
    let out = tollgate(&["check-config", "-c", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[0].upstream.timeout") && err.contains("like `15s`"),
        "{err}"
    );

    std::fs::write(&file, "routes: [\n").unwrap();
    let out = tollgate(&["check-config", "-c", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&file.display().to_string()));

    let out = tollgate(&["check-config", "-c", "/nonexistent/gateway.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the config file"));
}

#[test]
fn environment_overrides_config_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, "admin: { bind: 127.0.0.1:9090 }\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "-c", file.to_str().unwrap()])
        .env("TOLLGATE_ADMIN__BIND", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.bind") && err.contains("environment"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_drains() {
    let slow = Upstream::start(|req| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        echo_response("slow", req)
    })
    .await;
    let other = Upstream::echo("other").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    let yaml = |up: &Upstream| {
        config_with_routes(&route("r", "/", &[up], ""))
            .replace("access_log: false", "access_log: true")
            + "reload: { watch: false }\n"
    };
    std::fs::write(&file, yaml(&other)).unwrap();
    let (mut child, addr, logs) = run_binary(&file);
    let url = format!("http://{addr}/");
    assert_eq!(get(&url).await.json()["name"], "other");

    std::fs::write(&file, yaml(&slow)).unwrap();
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    kill("-HUP");
    wait_until(
        Duration::from_secs(10),
        "SIGHUP applied the new route",
        || async { slow.hits() > 0 || get(&url).await.json()["name"] == "slow" },
    )
    .await;

    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    let before = slow.hits();
    wait_until(Duration::from_secs(5), "request in flight", || async {
        slow.hits() > before
    })
    .await;
    kill("-TERM");
    let r = in_flight.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the in-flight request finished during the drain"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit after the drain: {status:?}");
    let logs = logs.join().unwrap();
    assert!(
        logs.iter().any(|l| l.contains("config reloaded")),
        "{logs:#?}"
    );
    assert!(
        logs.iter().any(|l| l.contains("\"drained\":true")),
        "{logs:#?}"
    );
    assert!(
        logs.iter().any(|l| l.contains("\"target\":\"tollgate::access\"") || l.contains("\"route\":\"r\"")),
        "one access log event per request: {logs:#?}"
    );
}

/// A request still in flight when the drain deadline passes: cut off, and
/// the exit status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_drain_deadline_exits_non_zero() {
    let (code, _) =
        stop_during_a_slow_request("shutdown: { drain_timeout: 300ms }\n", &["-TERM"]).await;
    assert_eq!(code, Some(1), "the drain missed its deadline");
}

/// A second SIGTERM exits at once with 128 + 15, as a shell reports a
/// process SIGTERM killed (130 would say SIGINT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_with_its_number() {
    let (code, _) =
        stop_during_a_slow_request("shutdown: { drain_timeout: 20s }\n", &["-TERM", "-TERM"]).await;
    assert_eq!(code, Some(143));
}

/// Runs the binary with a route to a target that answers after 3s, sends
/// `signals` while a request waits for it; returns the exit code and logs.
async fn stop_during_a_slow_request(extra: &str, signals: &[&str]) -> (Option<i32>, Vec<String>) {
    let slow = Upstream::start(|req| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        echo_response("slow", req)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        config_with_routes(&route("r", "/", &[&slow], "")) + extra,
    )
    .unwrap();
    let (child, addr, logs) = run_binary(&file);
    let in_flight = tokio::spawn(async move { get(&format!("http://{addr}/")).await });
    wait_until(
        Duration::from_secs(5),
        "the request reached the target",
        || async { slow.hits() > 0 },
    )
    .await;
    for signal in signals {
        assert!(
            Command::new("kill")
                .args([*signal, &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait()
    })
    .await
    .unwrap()
    .unwrap();
    in_flight.abort();
    (status.code(), logs.join().unwrap())
}

/// Text logs to a pipe carry no colour codes; a changed file is one
/// reload and one line saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_are_plain_and_a_reload_is_one_line() {
    let up = Upstream::echo("up").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    let yaml = |name: &str| {
        config_with_routes(&route(name, &format!("/{name}"), &[&up], ""))
            + "reload: { debounce: 100ms }\n"
    };
    std::fs::write(&file, yaml("first")).unwrap();
    let (child, addr, logs) = run_binary_with(&file, "text");
    assert_eq!(get(&format!("http://{addr}/first")).await.status, 200);
    std::fs::write(&file, yaml("second")).unwrap();
    // The reload is done once the new route serves (however busy the
    // machine); then time for any second one a duplicate file event would
    // bring.
    wait_until(Duration::from_secs(20), "the reloaded route", || async {
        get(&format!("http://{addr}/second")).await.status == 200
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let _ = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait()
    })
    .await;
    let logs = logs.join().unwrap();
    assert!(
        logs.iter().all(|l| !l.contains('\u{1b}')),
        "no escape codes: {logs:#?}"
    );
    let reloads = logs
        .iter()
        .filter(|l| l.contains("config reloaded"))
        .count();
    assert_eq!(reloads, 1, "one line per reload: {logs:#?}");
    assert!(
        !logs.iter().any(|l| l.contains("config file changed")),
        "{logs:#?}"
    );
}
