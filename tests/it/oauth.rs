//! The token server through real HTTP: clients added with the CLI, tokens by
//! client_secret_basic and client_secret_post, RFC 6749 errors, tokens used on
//! a `keys: self` route, introspection, revocation, key rotation, restart,
//! and an independent check of tokens and JWKS with Python (PyJWT, jwcrypto).

use std::path::Path;
use std::process::Command;

use base64::Engine;
use http::Request;
use serde_json::Value;

use crate::support::*;

const ISSUER: &str = "http://localhost:8082";

pub(crate) fn oauth_config(up: &Upstream, alg: &str, extra_oauth: &str) -> String {
    config_with_routes(&format!(
        "{}    auth: jwt\n    providers: [local]\n    forward_claims: {{ x-client: client_id }}\n    policy:\n      - allow: {{ scopes: [bar.read] }}\n",
        route("bar", "/bar", &[up], "")
    )) + &format!(
        "auth:\n  providers:\n    - name: local\n      issuer: {ISSUER}\n      audiences: [bar]\n      keys: self\noauth:\n  issuer: {ISSUER}\n  token_ttl: 5m\n  signing_algorithm: {alg}\n{extra_oauth}reload: {{ debounce: 50ms }}\n"
    )
}

/// Runs `tollgate <args> -c <config>` and returns stdout; panics on failure.
pub(crate) fn cli(config: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `clients add` and the secret it printed.
pub(crate) fn add_client(config: &Path, id: &str, extra: &[&str]) -> String {
    let mut args = vec!["clients", "add", id];
    args.extend_from_slice(extra);
    let out = cli(config, &args);
    out.lines()
        .find_map(|l| l.strip_prefix("client_secret: "))
        .expect("the secret is printed")
        .to_owned()
}

pub(crate) async fn post_form(
    gw: &TestGateway,
    path: &str,
    body: &str,
    basic: Option<(&str, &str)>,
) -> TestResponse {
    let mut req =
        Request::post(gw.url(path)).header("content-type", "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        req = req.header("authorization", format!("Basic {cred}"));
    }
    send(req.body(full(body.to_owned())).unwrap()).await
}

/// `clients add` while the gateway runs, then waits until it knows the
/// client; returns the secret.
pub(crate) async fn known_client(gw: &TestGateway, id: &str, extra: &[&str]) -> String {
    let secret = add_client(&gw.path, id, extra);
    wait_until(
        std::time::Duration::from_secs(10),
        "the new client is known",
        || async { authenticates(gw, id, &secret).await },
    )
    .await;
    secret
}

/// An `oauth.clients` entry (YAML) for `id` with `secret`, allowed
/// `bar.read` for audience `bar`.
pub(crate) fn static_client(id: &str, secret: &str) -> String {
    format!(
        "  clients:\n    - {{ id: {id}, secret_sha256: \"{}\", scopes: [bar.read], audiences: [bar] }}\n",
        sha256_hex(secret)
    )
}

pub(crate) fn sha256_hex(s: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A token request authenticated by a client assertion (private_key_jwt).
async fn with_assertion(
    gw: &TestGateway,
    client_id: Option<&str>,
    assertion: &str,
) -> TestResponse {
    let id = client_id
        .map(|c| format!("&client_id={c}"))
        .unwrap_or_default();
    post_form(
        gw,
        "/oauth2/token",
        &format!("grant_type=client_credentials{id}&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}"),
        None,
    )
    .await
}

/// Introspection or revocation of `token`, authenticated as `who`.
pub(crate) async fn token_call(
    gw: &TestGateway,
    endpoint: &str,
    token: &str,
    who: (&str, &str),
) -> TestResponse {
    post_form(gw, endpoint, &format!("token={token}"), Some(who)).await
}

/// Whether the token endpoint accepts the client (it is known and enabled).
pub(crate) async fn authenticates(gw: &TestGateway, id: &str, secret: &str) -> bool {
    post_form(
        gw,
        "/oauth2/token",
        "grant_type=client_credentials",
        Some((id, secret)),
    )
    .await
    .status
        == 200
}

pub(crate) async fn token(gw: &TestGateway, id: &str, secret: &str, extra: &str) -> String {
    let r = post_form(
        gw,
        "/oauth2/token",
        &format!("grant_type=client_credentials{extra}"),
        Some((id, secret)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["access_token"].as_str().unwrap().to_owned()
}

pub(crate) async fn call_bar(gw: &TestGateway, token: &str) -> TestResponse {
    send(
        Request::get(gw.url("/bar/x"))
            .header("authorization", format!("Bearer {token}"))
            .body(full(""))
            .unwrap(),
    )
    .await
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// Microfy's flow: a client added with the CLI gets a token (basic and post
/// auth) and calls a route through the gateway; every RFC 6749 error case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_round_trip_and_errors() {
    let up = Upstream::echo("bar").await;
    let gw = TestGateway::start(&oauth_config(&up, "EdDSA", "")).await;
    let secret = add_client(
        &gw.path,
        "foo",
        &[
            "--scope",
            "bar.read",
            "--scope",
            "bar.write",
            "--audience",
            "bar",
            "--claim",
            "org=acme",
        ],
    );
    let other = add_client(&gw.path, "other", &["--scope", "other.read"]);

    // The gateway sees the store change (clients added while it runs).
    wait_until(
        std::time::Duration::from_secs(10),
        "the new clients are known",
        || async {
            authenticates(&gw, "foo", &secret).await && authenticates(&gw, "other", &other).await
        },
    )
    .await;

    let r = post_form(
        &gw,
        "/oauth2/token",
        "grant_type=client_credentials&scope=bar.read",
        Some(("foo", &secret)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["cache-control"], "no-store");
    let body = r.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["scope"], "bar.read");
    let t = body["access_token"].as_str().unwrap().to_owned();
    let c = claims(&t);
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["sub"], "foo");
    assert_eq!(c["client_id"], "foo");
    assert_eq!(c["aud"], "bar");
    assert_eq!(c["org"], "acme");
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 300);
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "EdDSA");

    let r = call_bar(&gw, &t).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-client"], "foo");

    // client_secret_post on the path Microfy users call.
    let r = post_form(
        &gw,
        "/token",
        &format!("grant_type=client_credentials&client_id=foo&client_secret={secret}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["scope"], "bar.read bar.write");
    // A token without the policy's scope is refused by the route.
    let t_other = token(&gw, "other", &other, "").await;
    assert_eq!(
        call_bar(&gw, &t_other).await.status,
        401,
        "wrong audience for the route"
    );

    let expect = |r: &TestResponse, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.json()["error"], code, "{}", r.text());
    };
    let r = post_form(
        &gw,
        "/oauth2/token",
        "grant_type=client_credentials",
        Some(("foo", "wrong")),
    )
    .await;
    expect(&r, 401, "invalid_client");
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let posted = format!("grant_type=client_credentials&client_id=foo&client_secret={secret}");
    let big = format!(
        "grant_type=client_credentials&pad={}",
        "x".repeat(64 * 1024)
    );
    let foo = Some(("foo", secret.as_str()));
    for (body, basic, status, code) in [
        (
            "grant_type=client_credentials",
            Some(("nobody", "x")),
            401,
            "invalid_client",
        ),
        ("grant_type=client_credentials", None, 401, "invalid_client"),
        (
            "grant_type=client_credentials&scope=admin",
            foo,
            400,
            "invalid_scope",
        ),
        (
            "grant_type=client_credentials&resource=elsewhere",
            foo,
            400,
            "invalid_target",
        ),
        ("grant_type=password", foo, 400, "unsupported_grant_type"),
        ("scope=bar.read", foo, 400, "invalid_request"),
        (
            "grant_type=client_credentials&grant_type=client_credentials",
            foo,
            400,
            "invalid_request",
        ),
        (posted.as_str(), foo, 400, "invalid_request"),
        (big.as_str(), foo, 400, "invalid_request"),
    ] {
        expect(
            &post_form(&gw, "/oauth2/token", body, basic).await,
            status,
            code,
        );
    }
    let r = send(
        Request::post(gw.url("/oauth2/token"))
            .header("content-type", "application/json")
            .body(full("{\"grant_type\":\"client_credentials\"}"))
            .unwrap(),
    )
    .await;
    expect(&r, 400, "invalid_request");
    let r = send(
        Request::get(gw.url("/oauth2/token"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 405);
    // A disabled client cannot authenticate.
    cli(&gw.path, &["clients", "disable", "other"]);
    wait_until(
        std::time::Duration::from_secs(10),
        "the client is disabled",
        || async { !authenticates(&gw, "other", &other).await },
    )
    .await;

    let m = gw.metrics().await;
    assert!(
        metric(&m, "tollgate_oauth_tokens_issued_total{client=\"foo\"}") >= 3.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "tollgate_oauth_client_auth_failures_total{reason=\"bad_credentials\"}"
        ) >= 2.0
    );
    assert!(
        metric(
            &m,
            "tollgate_http_requests_total{class=\"2xx\",listener=\"sidecar\",route=\"oauth\"}"
        ) >= 3.0
    );
    let metadata = get(&gw.url("/.well-known/oauth-authorization-server"))
        .await
        .json();
    assert_eq!(metadata["issuer"], ISSUER);
    assert_eq!(metadata["token_endpoint"], format!("{ISSUER}/oauth2/token"));
    assert_eq!(metadata["grant_types_supported"][0], "client_credentials");
}

/// Introspection says active until revoked; revocation makes the next
/// request through the gateway 401; only the owner can revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_and_revocation() {
    let up = Upstream::echo("bar").await;
    let (a, b, c) = (
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        "cccccccccccccccccccccccccccccccccccc",
    );
    let hash = sha256_hex;
    let clients = format!(
        "  clients:\n    - {{ id: foo, secret_sha256: \"{}\", scopes: [bar.read], audiences: [bar] }}\n    - {{ id: baz, secret_sha256: \"{}\", scopes: [bar.read], audiences: [bar], introspect: true }}\n    - {{ id: qux, secret_sha256: \"{}\", scopes: [bar.read], audiences: [bar] }}\n",
        hash(a),
        hash(b),
        hash(c)
    );
    let gw = TestGateway::start(&oauth_config(&up, "ES256", &clients)).await;
    let t = token(&gw, "foo", a, "").await;
    assert_eq!(call_bar(&gw, &t).await.status, 200);

    let r = token_call(&gw, "/oauth2/introspect", &t, ("baz", b)).await;
    assert_eq!(r.status, 200);
    let info = r.json();
    assert_eq!(info["active"], true);
    assert_eq!(info["client_id"], "foo");
    assert_eq!(info["scope"], "bar.read");
    // Without `introspect` a client learns only about its own tokens.
    let r = token_call(&gw, "/oauth2/introspect", &t, ("qux", c)).await;
    assert_eq!(r.json(), serde_json::json!({"active": false}));
    let r = token_call(&gw, "/oauth2/introspect", &t, ("foo", a)).await;
    assert_eq!(r.json()["active"], true, "its own token");
    let r = post_form(
        &gw,
        "/oauth2/introspect",
        "token=not.a.token",
        Some(("baz", b)),
    )
    .await;
    assert_eq!(r.json(), serde_json::json!({"active": false}));
    let r = post_form(&gw, "/oauth2/introspect", &format!("token={t}"), None).await;
    assert_eq!(r.status, 401, "introspection needs client authentication");

    // Another client's revocation is answered 200 but revokes nothing.
    let r = token_call(&gw, "/oauth2/revoke", &t, ("baz", b)).await;
    assert_eq!(r.status, 200);
    assert_eq!(call_bar(&gw, &t).await.status, 200);

    let r = token_call(&gw, "/oauth2/revoke", &t, ("foo", a)).await;
    assert_eq!(r.status, 200);
    let r = call_bar(&gw, &t).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let r = token_call(&gw, "/oauth2/introspect", &t, ("baz", b)).await;
    assert_eq!(r.json()["active"], false);
    // A new token works.
    assert_eq!(
        call_bar(&gw, &token(&gw, "foo", a, "").await).await.status,
        200
    );
}

/// A keep-alive connection that sends the same token again is answered
/// from what the connection remembers of it, which still sees a
/// revocation; another token on the same connection is checked on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_repeated_token_is_still_checked() {
    let up = Upstream::echo("bar").await;
    let secret = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let clients = static_client("foo", secret);
    let gw = TestGateway::start(&oauth_config(&up, "ES256", &clients)).await;
    let mut conn = connection(gw.addr()).await;
    let bearer = |token: &str| {
        Request::get(gw.url("/bar/x"))
            .header("authorization", format!("Bearer {token}"))
            .body(full(""))
            .unwrap()
    };
    let t = token(&gw, "foo", secret, "").await;
    // Validated, then from the provider's cache, then from the connection.
    for _ in 0..4 {
        let r = send_on(&mut conn, bearer(&t)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["headers"]["x-client"], "foo");
    }
    // The same length, another signature.
    let at = t.len() - 10;
    let swapped = if &t[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &t[..at], &t[at + 1..]);
    let r = send_on(&mut conn, bearer(&forged)).await;
    assert_eq!(
        r.status, 401,
        "a forged token on a connection that sent a good one"
    );
    let r = send_on(&mut conn, bearer(&t)).await;
    assert_eq!(r.status, 200);
    // The remembered field twice is malformed, not remembered (RFC 6750 2).
    let mut twice = bearer(&t);
    let field = twice.headers()["authorization"].clone();
    twice.headers_mut().append("authorization", field);
    let r = send_on(&mut conn, twice).await;
    assert_eq!(r.status, 400, "two Authorization fields: {}", r.text());
    // Another spelling of the same credentials is the same token, and the
    // connection goes on with the first spelling.
    for field in [format!("bearer  {t} "), format!("Bearer {t}")] {
        let mut req = bearer(&t);
        req.headers_mut()
            .insert("authorization", field.parse().unwrap());
        let r = send_on(&mut conn, req).await;
        assert_eq!(r.status, 200, "{field}: {}", r.text());
    }

    let r = token_call(&gw, "/oauth2/revoke", &t, ("foo", secret)).await;
    assert_eq!(r.status, 200);
    for _ in 0..2 {
        let r = send_on(&mut conn, bearer(&t)).await;
        assert_eq!(r.status, 401, "revoked: {}", r.text());
    }
    // Each refusal counted once, whichever way the request went.
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_auth_tokens_total{outcome=\"revoked\",provider=\"local\"}"
        ),
        2.0,
        "{m}"
    );
    let fresh = token(&gw, "foo", secret, "").await;
    for _ in 0..3 {
        let r = send_on(&mut conn, bearer(&fresh)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = send_on(&mut conn, bearer(&t)).await;
    assert_eq!(r.status, 401, "the revoked token, after another");

    // A reload that replaces the provider: the connection's token is checked
    // by the new one, which wants another audience.
    for _ in 0..2 {
        assert_eq!(send_on(&mut conn, bearer(&fresh)).await.status, 200);
    }
    let config = oauth_config(&up, "ES256", &clients);
    let replaced = config.replace(
        "audiences: [bar]\n      keys: self",
        "audiences: [other]\n      keys: self",
    );
    assert_ne!(config, replaced);
    gw.write_config(&replaced);
    gw.gw.reload().await.expect("the reload applies");
    let r = send_on(&mut conn, bearer(&fresh)).await;
    assert_eq!(r.status, 401, "the replaced provider's token: {}", r.text());
}

/// Rotation keeps the old key published (its tokens still pass) and signs
/// with the new one; a restart keeps clients, keys and revocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_restart() {
    let up = Upstream::echo("bar").await;
    let yaml = oauth_config(&up, "EdDSA", "");
    let gw = TestGateway::start(&yaml).await;
    let secret = known_client(&gw, "foo", &["--scope", "bar.read", "--audience", "bar"]).await;
    let old = token(&gw, "foo", &secret, "").await;
    let old_kid = header_kid(&old);
    let jwks = get(&gw.url("/.well-known/jwks.json")).await.json();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);

    let out = cli(&gw.path, &["keys", "rotate"]);
    assert!(out.contains("signing with new key"), "{out}");
    wait_until(
        std::time::Duration::from_secs(10),
        "the JWKS lists both keys",
        || async {
            get(&gw.url("/.well-known/jwks.json")).await.json()["keys"]
                .as_array()
                .unwrap()
                .len()
                == 2
        },
    )
    .await;
    let new = token(&gw, "foo", &secret, "").await;
    assert_ne!(header_kid(&new), old_kid);
    assert_eq!(
        call_bar(&gw, &old).await.status,
        200,
        "the old key's token is valid during the overlap"
    );
    assert_eq!(call_bar(&gw, &new).await.status, 200);
    let r = token_call(&gw, "/oauth2/revoke", &new, ("foo", &secret)).await;
    assert_eq!(r.status, 200);

    // Restart on the same store.
    let dir_config = gw.path.clone();
    let yaml_now = std::fs::read_to_string(&dir_config).unwrap();
    gw.gw.shutdown();
    gw.gw.drained().await;
    let cfg = tollgate::config::load(&dir_config).unwrap();
    let again = tollgate::Gateway::start(cfg, Some(dir_config.clone()))
        .await
        .unwrap();
    let url = |p: &str| format!("http://{}{p}", again.listener_addr("sidecar").unwrap());
    assert_eq!(yaml_now, std::fs::read_to_string(&dir_config).unwrap());
    let call = |t: String| {
        let url = url("/bar/x");
        async move {
            send(
                Request::get(url)
                    .header("authorization", format!("Bearer {t}"))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .status
        }
    };
    assert_eq!(call(old.clone()).await, 200, "keys survive a restart");
    assert_eq!(
        call(new.clone()).await,
        401,
        "revocations survive a restart"
    );
    let r = send(
        Request::post(url("/oauth2/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full(format!(
                "grant_type=client_credentials&client_id=foo&client_secret={secret}"
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "clients survive a restart: {}", r.text());
    again.shutdown();
}

fn header_kid(token: &str) -> String {
    let h: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    h["kid"].as_str().unwrap().to_owned()
}

/// Another implementation agrees: PyJWT verifies the tokens with the
/// published JWKS, and jwcrypto computes the same RFC 7638 thumbprints as kids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_jwks_verify_with_python() {
    let up = Upstream::echo("bar").await;
    for alg in ["EdDSA", "ES256", "RS256"] {
        let gw = TestGateway::start(&oauth_config(&up, alg, "")).await;
        let secret = known_client(&gw, "py", &["--scope", "bar.read", "--audience", "bar"]).await;
        let t = token(&gw, "py", &secret, "").await;
        let jwks = get(&gw.url("/.well-known/jwks.json")).await.text();
        let script = r#"
import json, sys, jwt
from jwcrypto import jwk
jwks = json.loads(sys.argv[1]); token = sys.argv[2]; alg = sys.argv[3]
for k in jwks["keys"]:
    assert jwk.JWK(**k).thumbprint() == k["kid"], ("thumbprint", k)
header = jwt.get_unverified_header(token)
assert header["typ"] == "at+jwt" and header["alg"] == alg, header
key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
pub = jwt.PyJWK(key).key
claims = jwt.decode(token, pub, algorithms=[alg], audience="bar", issuer="http://localhost:8082")
assert claims["client_id"] == "py" and claims["scope"] == "bar.read", claims
print("ok")
"#;
        let out = Command::new("/usr/bin/python3")
            .args(["-c", script, &jwks, &t, alg])
            .output()
            .expect(
                "/usr/bin/python3 with python3-jwt and python3-jwcrypto (.ci/run installs them)",
            );
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
            "{alg}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// OAuth config problems name their keys.
#[test]
fn oauth_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let yaml = config_with_routes(
        "  - name: r\n    match: { path_prefix: / }\n    upstream: { targets: [\"http://127.0.0.1:1\"] }\n",
    ) + "auth:\n  providers:\n    - name: local\n      issuer: http://other\n      audiences: [x]\n      keys: self\n"
        + "oauth:\n  issuer: http://localhost:8082\n  token_ttl: 0s\n  listeners: [nope]\n  clients:\n    - { id: a, secret_sha256: short, claims: { sub: x } }\n    - { id: a, secret_sha256: \"0000000000000000000000000000000000000000000000000000000000000000\" }\n";
    std::fs::write(&path, yaml).unwrap();
    let err = tollgate::gateway::check_config(&path)
        .unwrap_err()
        .to_string();
    for want in [
        "oauth.token_ttl: must be greater than zero",
        "oauth.listeners[0]: `nope` is not a listener name",
        "oauth.clients[0].secret_sha256: expected 64 hex characters",
        "oauth.clients[0].claims.sub: is set by the token server itself",
        "oauth.clients[1].id: duplicate client id `a`",
        "auth.providers[0].issuer: `http://other` differs from oauth.issuer",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}

/// Failed client authentications are limited per client id and per address:
/// past the limit even the right secret gets 429 with Retry-After, until the
/// window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_client_auth_is_rate_limited() {
    let up = Upstream::echo("bar").await;
    let gw = TestGateway::start(&oauth_config(
        &up,
        "EdDSA",
        "  client_auth_limit: { max_failures: 3, window: 2s }\n",
    ))
    .await;
    let secret = known_client(&gw, "foo", &["--scope", "bar.read"]).await;
    for _ in 0..3 {
        let r = post_form(
            &gw,
            "/oauth2/token",
            "grant_type=client_credentials",
            Some(("foo", "guess")),
        )
        .await;
        assert_eq!(r.status, 401);
    }
    let r = post_form(
        &gw,
        "/oauth2/token",
        "grant_type=client_credentials",
        Some(("foo", &secret)),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"], "slow_down");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_oauth_client_auth_failures_total{reason=\"rate_limited\"}"
        ) >= 1.0
    );
    wait_until(
        std::time::Duration::from_secs(10),
        "the window ends",
        || async { authenticates(&gw, "foo", &secret).await },
    )
    .await;
}

/// private_key_jwt (RFC 7523): an assertion signed with the client's
/// registered key gets a token once; replays, wrong audiences, expired or
/// long-lived assertions and other keys are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_clients() {
    let up = Upstream::echo("bar").await;
    let gw = TestGateway::start(&oauth_config(&up, "EdDSA", "")).await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = dir.path().join("signer.pub.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let out = cli(
        &gw.path,
        &[
            "clients",
            "add",
            "signer",
            "--public-key",
            public.to_str().unwrap(),
            "--scope",
            "bar.read",
            "--audience",
            "bar",
        ],
    );
    assert!(!out.contains("client_secret"), "{out}");
    let refused = Command::new(BIN)
        .args(["clients", "rotate-secret", "signer", "-c"])
        .arg(&gw.path)
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a key client never gets a secret"
    );

    let now = tollgate::identity::jwt::unix_now();
    let assertion = |k: &rcgen::KeyPair, aud: &str, exp: u64, jti: &str| {
        let enc = jsonwebtoken::EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
        let claims = serde_json::json!({"iss": "signer", "sub": "signer", "aud": aud, "exp": exp, "iat": now, "jti": jti});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &enc,
        )
        .unwrap()
    };
    let ask = |a: String| {
        let gw = &gw;
        async move { with_assertion(gw, None, &a).await }
    };
    let token_url = format!("{ISSUER}/oauth2/token");
    let good = assertion(&key, &token_url, now + 60, "one");
    wait_until(
        std::time::Duration::from_secs(10),
        "the client is known",
        || async {
            ask(assertion(
                &key,
                ISSUER,
                now + 60,
                &format!("probe-{}", fastrand::u64(..)),
            ))
            .await
            .status
                == 200
        },
    )
    .await;
    let r = ask(good.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(claims(&t)["client_id"], "signer");
    assert_eq!(call_bar(&gw, &t).await.status, 200);

    for (why, a) in [
        ("replayed jti", good),
        (
            "wrong audience",
            assertion(&key, "https://elsewhere", now + 60, "two"),
        ),
        ("expired", assertion(&key, &token_url, now - 120, "three")),
        (
            "lives too long",
            assertion(&key, &token_url, now + 3600, "four"),
        ),
        (
            "another key",
            assertion(&other, &token_url, now + 60, "five"),
        ),
    ] {
        let r = ask(a).await;
        assert_eq!(r.status, 401, "{why}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_client", "{why}");
    }
}

/// tls_client_auth (RFC 8705): a client identified by its certificate over
/// mTLS gets a certificate-bound token, which the gateway accepts only on a
/// connection presenting that certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_auth_and_certificate_bound_tokens() {
    use crate::tls::{TestCa, TlsConn, https_listener};
    let up = Upstream::echo("bar").await;
    let ca = TestCa::new("Acme");
    let server = ca.server("server", "localhost");
    let alice = ca.client("alice", "backend");
    let eve = ca.client("eve", "backend");
    let listeners = https_listener(
        "sidecar",
        &server,
        &format!(", client_ca: {}, client_auth: optional", ca.pem().display()),
    );
    let clients = "  clients:\n    - { id: alice-svc, tls_client_auth: { subject_dn: \"CN=alice,O=backend\" }, scopes: [bar.read], audiences: [bar] }\n";
    let yaml = crate::tls::config(
        &listeners,
        &format!(
            "{}    auth: jwt\n    providers: [local]\n",
            route("bar", "/bar", &[&up], "")
        ),
    ) + &format!(
        "auth:\n  providers:\n    - name: local\n      issuer: {ISSUER}\n      audiences: [bar]\n      keys: self\noauth:\n  issuer: {ISSUER}\n{clients}"
    );
    let gw = TestGateway::start(&yaml).await;
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let body = "grant_type=client_credentials&client_id=alice-svc";
    let mut as_alice = TlsConn::open(gw.addr(), "localhost", &ca.pem(), Some(&alice))
        .await
        .unwrap();
    let mut as_eve = TlsConn::open(gw.addr(), "localhost", &ca.pem(), Some(&eve))
        .await
        .unwrap();
    let mut anonymous = TlsConn::open(gw.addr(), "localhost", &ca.pem(), None)
        .await
        .unwrap();

    let r = as_alice
        .request(http::Method::POST, "/oauth2/token", &form, body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        claims(&t)["cnf"]["x5t#S256"],
        alice.parsed().x5t_s256.as_str()
    );
    let r = as_eve
        .request(http::Method::POST, "/oauth2/token", &form, body)
        .await
        .unwrap();
    assert_eq!(
        r.status,
        401,
        "another certificate is not alice-svc: {}",
        r.text()
    );
    let r = anonymous
        .request(http::Method::POST, "/oauth2/token", &form, body)
        .await
        .unwrap();
    assert_eq!(r.status, 401, "no certificate, no client: {}", r.text());

    let bearer = format!("Bearer {t}");
    let auth = [("authorization", bearer.as_str())];
    let r = as_alice.get_with("/bar/x", &auth).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (who, conn) in [("eve", &mut as_eve), ("no certificate", &mut anonymous)] {
        let r = conn.get_with("/bar/x", &auth).await;
        assert_eq!(r.status, 401, "{who}: {}", r.text());
        assert!(
            r.text().contains("bound to a client certificate"),
            "{who}: {}",
            r.text()
        );
    }
}

/// `oauth.key_rotation`: the signing key is replaced when it is that old; the
/// previous one stays published and its tokens keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_key_rotation() {
    let up = Upstream::echo("bar").await;
    let yaml = oauth_config(&up, "EdDSA", "  key_rotation: 2s\n")
        .replace("token_ttl: 5m", "token_ttl: 1s");
    let gw = TestGateway::start(&yaml).await;
    let secret = known_client(&gw, "foo", &["--scope", "bar.read", "--audience", "bar"]).await;
    let first = header_kid(&token(&gw, "foo", &secret, "").await);
    wait_until(
        std::time::Duration::from_secs(15),
        "a new signing key",
        || async { header_kid(&token(&gw, "foo", &secret, "").await) != first },
    )
    .await;
    let jwks = get(&gw.url("/.well-known/jwks.json")).await.json();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        kids.contains(&first.as_str()),
        "the previous key stays published: {kids:?}"
    );
}

/// Keys managed outside tollgate: `oauth.signing_keys` PEM files sign and are
/// published; `keys rotate` refuses to touch them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_signing_keys() {
    let up = Upstream::echo("bar").await;
    let dir = tempfile::tempdir().unwrap();
    let signing = dir.path().join("signing.pem");
    let previous = dir.path().join("previous.pem");
    std::fs::write(
        &signing,
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem(),
    )
    .unwrap();
    std::fs::write(
        &previous,
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .serialize_pem(),
    )
    .unwrap();
    let hash = sha256_hex("imported-keys-secret-0123456789abcdef");
    let gw = TestGateway::start(&oauth_config(
        &up,
        "ES256",
        &format!(
            "  signing_keys: [{}, {}]\n  clients:\n    - {{ id: foo, secret_sha256: \"{hash}\", scopes: [bar.read], audiences: [bar] }}\n",
            signing.display(),
            previous.display()
        ),
    ))
    .await;
    let t = token(&gw, "foo", "imported-keys-secret-0123456789abcdef", "").await;
    let jwks = get(&gw.url("/.well-known/jwks.json")).await.json();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(
        keys[0]["kid"].as_str().unwrap(),
        header_kid(&t),
        "the first file signs"
    );
    assert_eq!(keys[0]["alg"], "ES256");
    assert_eq!(keys[1]["alg"], "EdDSA");
    assert_eq!(call_bar(&gw, &t).await.status, 200);
    let out = Command::new(BIN)
        .args(["keys", "rotate", "-c"])
        .arg(&gw.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("managed outside tollgate"));
}

/// private_key_jwt with the client's JWK Set URL: fetched on first use, and
/// fetched again when an assertion names a key the client rotated in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_with_a_jwks_url() {
    use std::sync::{Arc, Mutex};
    let up = Upstream::echo("bar").await;
    let jwk = |k: &rcgen::KeyPair, kid: &str| {
        let raw = k.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]), "kid": kid, "alg": "ES256"})
    };
    let k1 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let k2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let published = Arc::new(Mutex::new(serde_json::json!({"keys": [jwk(&k1, "k1")]})));
    let served = published.clone();
    let jwks = Upstream::start(move |_| {
        let body = served.lock().unwrap().to_string();
        async move { http::Response::new(full(body)) }
    })
    .await;
    let gw = TestGateway::start(&oauth_config(
        &up,
        "EdDSA",
        &format!(
            "  clients:\n    - {{ id: remote, jwks_uri: \"http://{}/jwks.json\", scopes: [bar.read], audiences: [bar] }}\n",
            jwks.addr
        ),
    ))
    .await;
    let now = tollgate::identity::jwt::unix_now();
    let assertion = |k: &rcgen::KeyPair, kid: &str, jti: &str| {
        let enc = jsonwebtoken::EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        let claims = serde_json::json!({"iss": "remote", "sub": "remote", "aud": ISSUER, "exp": now + 60, "jti": jti});
        jsonwebtoken::encode(&header, &claims, &enc).unwrap()
    };
    let ask = |a: String| {
        let gw = &gw;
        async move { with_assertion(gw, Some("remote"), &a).await }
    };
    let r = ask(assertion(&k1, "k1", "a")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let fetched = jwks.hits();

    // The client rotates in k2: an assertion naming it makes the gateway
    // fetch the set again.
    *published.lock().unwrap() = serde_json::json!({"keys": [jwk(&k1, "k1"), jwk(&k2, "k2")]});
    let r = ask(assertion(&k2, "k2", "b")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(jwks.hits() > fetched);

    // A key the client never published is refused.
    let k3 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let r = ask(assertion(&k3, "k3", "c")).await;
    assert_eq!(r.status, 401, "{}", r.text());
}
