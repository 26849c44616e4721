//! The admin API through real HTTP: Kong 0.x and Kong >= 1.0 registrations
//! (a Python client sending what Microkubes' registrator sends), tollgate's
//! own route shape, validation errors, file routes winning, restart, admin
//! credentials, concurrency, and `tollgate register-service`.

use std::process::Command;

use http::{Method, Request};
use serde_json::{Value, json};

use crate::support::*;

fn admin_url(gw: &TestGateway, path: &str) -> String {
    format!("http://{}{path}", gw.gw.admin_addr())
}

async fn admin(gw: &TestGateway, method: Method, path: &str, body: Option<Value>) -> TestResponse {
    admin_with(gw, method, path, body, None).await
}

async fn admin_status(gw: &TestGateway, method: Method, path: &str) -> u16 {
    admin(gw, method, path, None).await.status.as_u16()
}

/// Admin calls without a body, in order, and the status each must get.
async fn expect_statuses(gw: &TestGateway, calls: &[(Method, &str, u16)]) {
    for (method, path, status) in calls {
        assert_eq!(
            admin_status(gw, method.clone(), path).await,
            *status,
            "{method} {path}"
        );
    }
}

async fn admin_with(
    gw: &TestGateway,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> TestResponse {
    let mut req = Request::builder()
        .method(method)
        .uri(admin_url(gw, path))
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    send(req.body(full(body)).unwrap()).await
}

/// What Microkubes' KongGatewayRegistrator does, from Python: look the API
/// up, create it (POST /apis/ with a comma-joined `uris`), read `message` on
/// failure; then update it with PATCH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kong_0x_registration_like_microkubes() {
    let users = Upstream::echo("users").await;
    let users_v2 = Upstream::echo("users-v2").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "status",
        "/_status",
        &[&users],
        "",
    )))
    .await;
    let script = r#"
import json, sys, urllib.request, urllib.error
admin, upstream = sys.argv[1], sys.argv[2]
def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(admin + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
status, _ = call("GET", "/apis/user-service")
assert status == 404, status
status, body = call("POST", "/apis/", {"name": "user-service", "uris": "/users,/profiles", "upstream_url": upstream, "preserve_host": True})
assert status == 201, (status, body)
status, body = call("GET", "/apis/user-service")
assert status == 200 and body["uris"] == ["/users", "/profiles"] and body["upstream_url"] == upstream, body
status, body = call("POST", "/apis/", {"name": "user-service", "uris": "/users", "upstream_url": upstream})
assert status == 409 and "message" in body, (status, body)
status, body = call("POST", "/apis/", {"name": "broken", "uris": "/b"})
assert status == 400 and "upstream_url" in body["message"], (status, body)
print("ok")
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &admin_url(&gw, ""),
            &format!("http://{}", users.addr),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Served at once, prefix stripped (Kong 0.x default), the caller's Host kept.
    let r = send(
        Request::get(gw.url("/profiles/7"))
            .header("host", "api.example")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "users");
    assert_eq!(r.json()["path"], "/7");
    assert_eq!(r.json()["headers"]["host"], "api.example");

    let r = admin(
        &gw,
        Method::PATCH,
        "/apis/user-service",
        Some(json!({"upstream_url": format!("http://{}", users_v2.addr)})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["uris"],
        json!(["/users", "/profiles"]),
        "PATCH keeps the other fields"
    );
    assert_eq!(get(&gw.url("/users/1")).await.json()["name"], "users-v2");

    // A body cannot move a PATCH onto another name.
    let r = admin(
        &gw,
        Method::PATCH,
        "/apis/user-service",
        Some(json!({"name": "status"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "user-service");
    let r = admin(&gw, Method::GET, "/apis", None).await;
    assert_eq!(r.json()["total"], 1);
    assert!(gw.metrics().await.contains("route=\"user-service\""));
    expect_statuses(
        &gw,
        &[
            (Method::DELETE, "/apis/user-service", 204),
            (Method::GET, "/apis/user-service", 404),
            (Method::DELETE, "/apis/user-service", 404),
        ],
    )
    .await;
    assert_eq!(get(&gw.url("/users/1")).await.status, 404);
    let m = gw.metrics().await;
    assert!(
        !m.contains("route=\"user-service\""),
        "a removed route's series are dropped"
    );
}

/// Kong >= 1.0: a service, a route on it, traffic; a service with routes
/// cannot be deleted; its routes follow a new URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kong_1x_services_and_routes() {
    let orders = Upstream::echo("orders").await;
    let orders_v2 = Upstream::echo("orders-v2").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "status",
        "/_status",
        &[&orders],
        "",
    )))
    .await;
    // curl, as a shell registrator would.
    let out = tokio::task::block_in_place(|| {
        Command::new("curl")
            .args([
                "-sS",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
            ])
            .arg(
                json!({"name": "orders", "url": format!("http://{}/api", orders.addr)}).to_string(),
            )
            .args(["-w", "\n%{http_code}"])
            .arg(admin_url(&gw, "/services"))
            .output()
            .expect("curl is installed (.ci/run installs it)")
    });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "201", "{text}");
    assert_eq!(serde_json::from_str::<Value>(body).unwrap()["path"], "/api");
    let r = admin(
        &gw,
        Method::POST,
        "/services",
        Some(json!({"name": "orders", "url": "http://x"})),
    )
    .await;
    assert_eq!(r.status, 409);
    let r = admin(
        &gw,
        Method::POST,
        "/services/orders/routes",
        Some(json!({"name": "public", "paths": ["/orders"], "methods": ["GET"]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let route_id = r.json()["id"].as_str().unwrap().to_owned();
    let r = get(&gw.url("/orders/42")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/api/42");
    let r = send(Request::post(gw.url("/orders/42")).body(full("")).unwrap()).await;
    assert_eq!(r.status, 404, "only GET is routed");

    let r = admin(
        &gw,
        Method::PATCH,
        "/services/orders",
        Some(json!({"url": format!("http://{}", orders_v2.addr)})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&gw.url("/orders/42")).await;
    assert_eq!(r.json()["name"], "orders-v2");
    assert_eq!(r.json()["path"], "/42");

    assert_eq!(
        admin(&gw, Method::GET, "/services/orders/routes", None)
            .await
            .json()["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let route_path = format!("/routes/{route_id}");
    expect_statuses(
        &gw,
        &[
            (Method::DELETE, "/services/orders", 400),
            (Method::DELETE, &route_path, 204),
            (Method::DELETE, "/services/orders", 204),
        ],
    )
    .await;
    assert_eq!(get(&gw.url("/orders/42")).await.status, 404);
}

/// tollgate's own shape: create, conflict, validation errors naming the
/// field, replace, targets, delete; a file route's name is refused and a
/// file route added later wins (the API route is reported as not served);
/// a restart keeps API routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_validation_file_precedence_and_restart() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let file_route = route("status", "/_status", &[&a], "");
    let gw = TestGateway::start(&config_with_routes(&file_route)).await;
    let doc = |name: &str, prefix: &str, up: &Upstream| json!({"name": name, "match": {"path_prefix": prefix}, "strip_prefix": true, "upstream": {"targets": [format!("http://{}", up.addr)]}});
    let r = admin(
        &gw,
        Method::POST,
        "/admin/routes",
        Some(doc("svc", "/svc", &a)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(get(&gw.url("/svc/x")).await.json()["path"], "/x");
    assert_eq!(
        admin(
            &gw,
            Method::POST,
            "/admin/routes",
            Some(doc("svc", "/svc", &a))
        )
        .await
        .status,
        409
    );

    let mut bad = doc("bad", "/bad", &a);
    bad["upstrem"] = json!({});
    let r = admin(&gw, Method::POST, "/admin/routes", Some(bad)).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("upstrem"), "{}", r.text());
    let mut bad = doc("bad", "/bad", &a);
    bad["upstream"]["targets"] = json!(["ftp://nowhere"]);
    let r = admin(&gw, Method::POST, "/admin/routes", Some(bad)).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["fields"]["route.upstream.targets[0]"].is_string(),
        "{}",
        r.text()
    );
    let r = admin(
        &gw,
        Method::POST,
        "/admin/routes",
        Some(doc("other", "/svc", &a)),
    )
    .await;
    assert_eq!(r.status, 400, "same match as `svc`: {}", r.text());
    let r = admin(
        &gw,
        Method::PUT,
        "/admin/routes/status",
        Some(doc("status", "/elsewhere", &a)),
    )
    .await;
    assert_eq!(r.status, 400, "a file route's name: {}", r.text());

    let r = admin(&gw, Method::GET, "/admin/routes/svc/targets", None).await;
    assert_eq!(
        r.json()["data"].as_array().unwrap().len(),
        1,
        "{}",
        r.text()
    );
    let r = admin(
        &gw,
        Method::POST,
        "/admin/routes/svc/targets",
        Some(json!({"target": format!("http://{}", b.addr)})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let both = json!({"targets": [format!("http://{}", a.addr), format!("http://{}", b.addr)]});
    let r = admin(&gw, Method::PUT, "/admin/routes/svc/targets", Some(both)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(&gw, Method::GET, "/admin/routes/svc/targets", None).await;
    assert_eq!(
        r.json()["data"].as_array().unwrap().len(),
        2,
        "{}",
        r.text()
    );
    let r = admin(
        &gw,
        Method::DELETE,
        &format!(
            "/admin/routes/svc/targets/{}",
            urlencode(&format!("http://{}", a.addr))
        ),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(get(&gw.url("/svc/x")).await.json()["name"], "b");
    let r = admin(&gw, Method::GET, "/admin/routes", None).await;
    let svc = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "svc")
        .cloned()
        .unwrap();
    assert_eq!(svc["source"], "api");
    assert_eq!(svc["targets"][0]["healthy"], true);

    // Files a route names are read when it is applied: one that does not
    // load is refused and not kept, and nothing else is disturbed.
    let mut tls_route = doc("tls", "/tls", &a);
    tls_route["upstream"] =
        json!({"targets": ["https://127.0.0.1:1"], "tls": {"ca_file": "/nonexistent/ca.pem"}});
    let r = admin(&gw, Method::POST, "/admin/routes", Some(tls_route)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("ca_file"), "{}", r.text());
    assert_eq!(
        admin_status(&gw, Method::GET, "/admin/routes/tls").await,
        404
    );
    let r = admin(&gw, Method::PUT, "/admin/routes/x", Some(json!([1]))).await;
    assert_eq!(r.status, 400, "not an object: {}", r.text());
    // A reload the file breaks is rejected and changes nothing.
    let good = std::fs::read_to_string(&gw.path).unwrap();
    gw.write_config(&good.replace("targets: [http://", "targets: [ftp://"));
    assert!(gw.gw.reload().await.is_err());
    assert_eq!(admin_status(&gw, Method::GET, "/admin/status").await, 200);
    gw.write_config(&good);

    // A file route of the same name, added later, wins.
    let r = admin(
        &gw,
        Method::PUT,
        "/admin/routes/late",
        Some(doc("late", "/late", &a)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    gw.write_config(&config_with_routes(&format!(
        "{file_route}{}",
        route("late", "/late", &[&b], "")
    )));
    gw.gw.reload().await.unwrap();
    assert_eq!(get(&gw.url("/late")).await.json()["name"], "b");
    let r = admin(&gw, Method::GET, "/admin/routes", None).await;
    assert_eq!(r.json()["not_served"][0]["name"], "late", "{}", r.text());

    // Restart on the same store.
    let path = gw.path.clone();
    gw.gw.shutdown();
    gw.gw.drained().await;
    let again =
        tollgate::Gateway::start(tollgate::config::load(&path).unwrap(), Some(path.clone()))
            .await
            .unwrap();
    let url = format!("http://{}/svc/y", again.listener_addr("sidecar").unwrap());
    let r = get(&url).await;
    assert_eq!(r.status, 200, "API routes survive a restart: {}", r.text());
    assert_eq!(r.json()["name"], "b");
    again.shutdown();
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// With a token configured, the API needs it (health stays open); the
/// operator endpoints answer; a non-loopback bind without auth is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_credentials_and_operator_endpoints() {
    let a = Upstream::echo("a").await;
    let token = "admin-token-0123456789abcdef0123456789";
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let yaml = config_with_routes(&route("r", "/", &[&a], "")).replace(
        "admin:\n  bind: 127.0.0.1:0\n",
        &format!("admin:\n  bind: 127.0.0.1:0\n  token_sha256: \"{hash}\"\n"),
    );
    let gw = TestGateway::start(&yaml).await;
    let r = admin(&gw, Method::GET, "/admin/status", None).await;
    assert_eq!(r.status, 401);
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(
        admin_with(&gw, Method::GET, "/apis", None, Some("wrong"))
            .await
            .status,
        401
    );
    assert_eq!(
        get(&admin_url(&gw, "/healthz")).await.status,
        200,
        "health stays open"
    );
    let r = admin_with(&gw, Method::GET, "/admin/status", None, Some(token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["listeners"][0]["name"], "sidecar");
    let r = admin_with(&gw, Method::GET, "/admin/config", None, Some(token)).await;
    assert_eq!(
        r.json()["file"]["admin"]["token_sha256"],
        "<redacted>",
        "{}",
        r.text()
    );
    let r = admin_with(&gw, Method::POST, "/admin/reload", None, Some(token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin_with(&gw, Method::GET, "/admin/clients", None, Some(token))
            .await
            .status,
        404
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        config_with_routes(&route("r", "/", &[&a], ""))
            .replace("admin:\n  bind: 127.0.0.1:0", "admin:\n  bind: 0.0.0.0:0"),
    )
    .unwrap();
    let err = tollgate::gateway::check_config(&file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.bind") && err.contains("no authentication"),
        "{err}"
    );
}

/// 50 registrations at once: every one is stored and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_lose_none() {
    let up = Upstream::echo("svc").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "status",
        "/_status",
        &[&up],
        "",
    )))
    .await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = admin_url(&gw, "/apis/");
        let body = json!({"name": format!("svc-{i}"), "uris": format!("/svc-{i}"), "upstream_url": format!("http://{}", up.addr)});
        tasks.push(tokio::spawn(async move {
            send(
                Request::post(url)
                    .header("content-type", "application/json")
                    .body(full(body.to_string()))
                    .unwrap(),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    assert_eq!(
        admin(&gw, Method::GET, "/apis", None).await.json()["total"],
        50
    );
    for i in 0..50 {
        assert_eq!(
            get(&gw.url(&format!("/svc-{i}/x"))).await.status,
            200,
            "svc-{i}"
        );
    }
}

/// `tollgate register-service` registers, deregisters, and fails (non-zero)
/// when the gateway cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_service_cli() {
    let up = Upstream::echo("svc").await;
    let gw = TestGateway::start(&config_with_routes(&route(
        "status",
        "/_status",
        &[&up],
        "",
    )))
    .await;
    let admin = admin_url(&gw, "");
    let port = up.addr.port().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "register-service",
            "--admin",
            admin.as_str(),
            "--name",
            "billing",
            "--path",
            "/billing",
            "--host",
            "127.0.0.1",
            "--port",
            port.as_str(),
        ];
        args.extend_from_slice(extra);
        Command::new(BIN).args(&args).output().unwrap()
    };
    let out = tokio::task::block_in_place(|| run(&[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = get(&gw.url("/billing/invoices")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/invoices");
    let out = tokio::task::block_in_place(|| run(&["--deregister"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get(&gw.url("/billing/invoices")).await.status, 404);

    let closed = closed_port().await;
    let out = Command::new(BIN)
        .args([
            "register-service",
            "--admin",
            &format!("http://{closed}"),
            "--name",
            "x",
            "--path",
            "/x",
            "--host",
            "127.0.0.1",
            "--port",
            "1",
            "--wait",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

/// Admin access by a JWT with an admin scope, or by a client certificate the
/// admin policy allows, over an admin listener with TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_access_by_jwt_scope_or_certificate() {
    use crate::tls::{TestCa, TlsConn};
    let a = Upstream::echo("a").await;
    let ca = TestCa::new("Acme");
    let server = ca.server("admin", "localhost");
    let ops = ca.client("ops", "ops");
    let dev = ca.client("dev", "dev");
    let dir = tempfile::tempdir().unwrap();
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let public = dir.path().join("admin-idp.pem");
    std::fs::write(&public, signing.public_key_pem()).unwrap();
    let yaml = config_with_routes(&route("r", "/", &[&a], "")).replace(
        "admin:\n  bind: 127.0.0.1:0\n",
        &format!(
            "admin:\n  bind: 127.0.0.1:0\n  providers: [idp]\n  policy:\n    - allow: {{ scopes: [tollgate.admin] }}\n    - allow: {{ cert: {{ o: ops }} }}\n  tls: {{ cert: {}, key: {}, client_ca: {}, client_auth: optional }}\n",
            server.cert.display(),
            server.key.display(),
            ca.pem().display()
        ),
    ) + &format!(
        "auth:\n  providers:\n    - name: idp\n      issuer: https://idp.test\n      audiences: [tollgate]\n      public_keys: [{}]\n",
        public.display()
    );
    let gw = TestGateway::start(&yaml).await;
    let token = |scope: &str| {
        let enc =
            jsonwebtoken::EncodingKey::from_ed_pem(signing.serialize_pem().as_bytes()).unwrap();
        let now = tollgate::identity::jwt::unix_now();
        let claims = json!({"iss": "https://idp.test", "aud": "tollgate", "sub": "ops-bot", "scope": scope, "exp": now + 300, "iat": now});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &enc,
        )
        .unwrap()
    };
    let addr = gw.gw.admin_addr();
    let admin_token = format!("Bearer {}", token("tollgate.admin"));
    let reader_token = format!("Bearer {}", token("reader"));
    let mut anonymous = TlsConn::open(addr, "localhost", &ca.pem(), None)
        .await
        .unwrap();
    let r = anonymous.get_with("/admin/status", &[]).await;
    assert_eq!(r.status, 401);
    let r = anonymous
        .get_with("/admin/status", &[("authorization", admin_token.as_str())])
        .await;
    assert_eq!(r.status, 200, "admin scope: {}", r.text());
    let r = anonymous
        .get_with("/admin/status", &[("authorization", reader_token.as_str())])
        .await;
    assert_eq!(r.status, 403, "another scope: {}", r.text());
    let mut as_ops = TlsConn::open(addr, "localhost", &ca.pem(), Some(&ops))
        .await
        .unwrap();
    assert_eq!(
        as_ops.get_with("/admin/status", &[]).await.status,
        200,
        "O=ops certificate"
    );
    let mut as_dev = TlsConn::open(addr, "localhost", &ca.pem(), Some(&dev))
        .await
        .unwrap();
    assert_eq!(
        as_dev.get_with("/admin/status", &[]).await.status,
        403,
        "O=dev certificate"
    );
    assert_eq!(anonymous.get_with("/healthz", &[]).await.status, 200);
}

/// The admin API is no way around a protected route: an API route under a
/// gateway.yaml route's prefix that asks for credentials (or has a policy)
/// is refused; next to it is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_routes_cannot_shadow_protected_file_routes() {
    let up = Upstream::echo("up").await;
    let protected = route(
        "secure",
        "/secure",
        &[&up],
        "    policy:\n      - allow: { paths: [/secure/public/**] }\n",
    );
    let gw = TestGateway::start(&config_with_routes(&protected)).await;
    let doc = |name: &str, prefix: &str, host: Option<&str>| {
        let mut d = json!({"name": name, "match": {"path_prefix": prefix}, "upstream": {"targets": [format!("http://{}", up.addr)]}});
        if let Some(h) = host {
            d["match"]["host"] = json!(h);
        }
        d
    };
    for (name, prefix, host) in [
        ("inside", "/secure/admin", None),
        ("same", "/secure", Some("api.internal")),
    ] {
        let r = admin(
            &gw,
            Method::POST,
            "/admin/routes",
            Some(doc(name, prefix, host)),
        )
        .await;
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert!(r.text().contains("secure"), "{}", r.text());
    }
    let r = admin(
        &gw,
        Method::POST,
        "/admin/routes",
        Some(doc("beside", "/securex", None)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin(&gw, Method::POST, "/apis/", Some(json!({"name": "kong-inside", "uris": "/secure/x", "upstream_url": format!("http://{}", up.addr)}))).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(get(&gw.url("/secure/admin")).await.status, 403);
}
