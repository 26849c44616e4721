//! JWT authentication end to end: real tokens signed per algorithm, a real
//! gateway, a real upstream; a real JWKS endpoint for key rotation.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::*;

const ISS: &str = "https://idp.test";
const AUD: &str = "bar";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A signing key and its public half, for one algorithm.
struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    public_pem: String,
    /// Raw public key: the EC point (0x04 | x | y) or the Ed25519 key.
    public_raw: Vec<u8>,
    kid: Option<String>,
}

impl Signer {
    fn new(alg: Algorithm) -> Signer {
        if alg == Algorithm::HS256 {
            let secret = b"0123456789abcdef0123456789abcdef-test-secret";
            return Signer {
                alg,
                key: EncodingKey::from_secret(secret),
                public_pem: String::from_utf8(secret.to_vec()).unwrap(),
                public_raw: Vec::new(),
                kid: None,
            };
        }
        let rc = match alg {
            Algorithm::RS256 | Algorithm::PS256 => &rcgen::PKCS_RSA_SHA256,
            Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Algorithm::ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Algorithm::EdDSA => &rcgen::PKCS_ED25519,
            other => panic!("no test key for {other:?}"),
        };
        let kp = rcgen::KeyPair::generate_for(rc).expect("key generation");
        let private = kp.serialize_pem();
        let key = match alg {
            Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(private.as_bytes()),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private.as_bytes()),
            _ => EncodingKey::from_ec_pem(private.as_bytes()),
        }
        .expect("encoding key");
        Signer {
            alg,
            key,
            public_pem: kp.public_key_pem(),
            public_raw: kp.public_key_raw().to_vec(),
            kid: None,
        }
    }

    fn with_kid(mut self, kid: &str) -> Signer {
        self.kid = Some(kid.into());
        self
    }

    fn header(&self) -> Header {
        let mut h = Header::new(self.alg);
        h.kid = self.kid.clone();
        h
    }

    fn sign(&self, claims: &Value) -> String {
        encode(&self.header(), claims, &self.key).expect("sign")
    }

    fn sign_with(&self, header: &Header, claims: &Value) -> String {
        encode(header, claims, &self.key).expect("sign")
    }

    /// The public key as a JWK with this signer's kid.
    fn jwk(&self) -> Value {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let mut v = match self.alg {
            Algorithm::ES256 => {
                let (x, y) = self.public_raw[1..].split_at(32);
                json!({"kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y)})
            }
            Algorithm::EdDSA => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&self.public_raw)}),
            other => panic!("no JWK in these tests for {other:?}"),
        };
        v["alg"] = json!(format!("{:?}", self.alg));
        v["use"] = json!("sig");
        if let Some(kid) = &self.kid {
            v["kid"] = json!(kid);
        }
        v
    }
}

fn claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300, "iat": now(),
        "scope": "bar.read", "jti": format!("j-{}", fastrand::u64(..)),
    })
}

fn with(mut base: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

async fn call(gw: &TestGateway, path: &str, token: Option<&str>) -> TestResponse {
    let mut req = Request::get(gw.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(req.body(full("")).unwrap()).await
}

fn provider_yaml(name: &str, keys: &str, extra: &str) -> String {
    format!(
        "    - name: {name}\n      issuer: {ISS}\n      audiences: [{AUD}]\n      {keys}\n{extra}"
    )
}

/// A provider `name` whose key is `signer`'s public key, written to a PEM
/// file in `dir` (returned too, for tests that replace it).
fn pem_provider(
    dir: &TempDir,
    name: &str,
    signer: &Signer,
    extra: &str,
) -> (String, std::path::PathBuf) {
    let file = dir.path().join(format!("{name}.pem"));
    std::fs::write(&file, &signer.public_pem).unwrap();
    let yaml = provider_yaml(name, &format!("public_keys: [{}]", file.display()), extra);
    (yaml, file)
}

fn gateway_yaml(providers: &[String], routes: &str) -> String {
    format!(
        "{}auth:\n  providers:\n{}",
        config_with_routes(routes),
        providers.concat()
    )
}

/// Every algorithm: valid, expired, not yet valid, leeway edges, wrong
/// issuer and audience, missing exp.
#[tokio::test]
async fn token_table_per_algorithm() {
    let up = Upstream::echo("up").await;
    let dir = TempDir::new().unwrap();
    let algs = [
        ("rs256", Algorithm::RS256),
        ("ps256", Algorithm::PS256),
        ("es256", Algorithm::ES256),
        ("es384", Algorithm::ES384),
        ("eddsa", Algorithm::EdDSA),
        ("hs256", Algorithm::HS256),
    ];
    let mut providers = Vec::new();
    let mut routes = String::new();
    let mut signers = Vec::new();
    for (name, alg) in algs {
        let s = Signer::new(alg);
        let file = dir.path().join(format!("{name}.pem"));
        std::fs::write(&file, &s.public_pem).unwrap();
        let keys = if alg == Algorithm::HS256 {
            format!("secret: {{ file: {} }}", file.display())
        } else {
            format!("public_keys: [{}]", file.display())
        };
        providers.push(provider_yaml(name, &keys, ""));
        routes.push_str(&route(
            name,
            &format!("/{name}"),
            &[&up],
            &format!("    auth: jwt\n    providers: [{name}]\n"),
        ));
        signers.push((name, s));
    }
    let gw = TestGateway::start(&gateway_yaml(&providers, &routes)).await;

    for (name, s) in &signers {
        let path = format!("/{name}/x");
        let cases: Vec<(&str, Value, u16)> = vec![
            ("valid", claims(), 200),
            ("expired", with(claims(), json!({"exp": now() - 120})), 401),
            (
                "not yet valid",
                with(claims(), json!({"nbf": now() + 300})),
                401,
            ),
            (
                "expired within leeway",
                with(claims(), json!({"exp": now() - 30})),
                200,
            ),
            (
                "expired beyond leeway",
                with(claims(), json!({"exp": now() - 90})),
                401,
            ),
            (
                "issued in the future",
                with(claims(), json!({"iat": now() + 600})),
                401,
            ),
            (
                "wrong issuer",
                with(claims(), json!({"iss": "https://evil.test"})),
                401,
            ),
            (
                "wrong audience",
                with(claims(), json!({"aud": "other"})),
                401,
            ),
            (
                "audience list",
                with(claims(), json!({"aud": ["other", AUD]})),
                200,
            ),
            ("missing exp", with(claims(), json!({"exp": null})), 401),
            ("missing aud", with(claims(), json!({"aud": null})), 401),
        ];
        for (case, c, want) in cases {
            let r = call(&gw, &path, Some(&s.sign(&c))).await;
            assert_eq!(r.status.as_u16(), want, "{name}: {case}: {}", r.text());
            if want == 401 {
                let challenge = r.headers["www-authenticate"].to_str().unwrap();
                assert!(
                    challenge.starts_with("Bearer realm=\"tollgate\", error=\"invalid_token\""),
                    "{challenge}"
                );
                assert_eq!(r.json()["error"], "invalid_token");
            } else {
                assert_eq!(r.json()["name"], "up");
            }
        }
        // A token of another provider's key never validates here.
        let other = &signers.iter().find(|(n, _)| n != name).unwrap().1;
        let r = call(&gw, &path, Some(&other.sign(&claims()))).await;
        assert_eq!(r.status, 401, "{name}: foreign key");
    }
}

/// Hostile tokens: alg none, algorithm confusion, crit, jku/x5u (never
/// fetched), garbage, truncation, oversize, ECDSA r=s=0.
#[tokio::test]
async fn hostile_tokens() {
    let up = Upstream::echo("up").await;
    let dir = TempDir::new().unwrap();
    let rsa = Signer::new(Algorithm::RS256);
    let ec = Signer::new(Algorithm::ES256);
    // A server a forged jku/x5u would point at: it must never be asked.
    let lure = Upstream::start(|_| async { status_response(200) }).await;
    let providers = [
        pem_provider(&dir, "rsa", &rsa, "").0,
        pem_provider(&dir, "ec", &ec, "").0,
    ];
    let routes = route(
        "rsa",
        "/rsa",
        &[&up],
        "    auth: jwt\n    providers: [rsa]\n",
    ) + &route("ec", "/ec", &[&up], "    auth: jwt\n    providers: [ec]\n");
    let gw = TestGateway::start(&gateway_yaml(&providers, &routes)).await;

    let good = rsa.sign(&claims());
    assert_eq!(call(&gw, "/rsa", Some(&good)).await.status, 200);

    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let payload = b64(&claims());
    let none = format!("{}.{payload}.", b64(&json!({"alg": "none", "typ": "JWT"})));
    let none_sig = format!("{}.{payload}.AAAA", b64(&json!({"alg": "none"})));
    // HS256 keyed with the RSA public key's PEM: the classic confusion attack.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(rsa.public_pem.as_bytes()),
    )
    .unwrap();
    let mut crit = rsa.header();
    crit.crit = Some(vec!["exp".into()]);
    let crit = rsa.sign_with(&crit, &claims());
    // Signed by an attacker's key, pointing at the attacker's key URL.
    let attacker = Signer::new(Algorithm::RS256);
    let mut jku = attacker.header();
    jku.jku = Some(format!("http://{}/jwks.json", lure.addr));
    jku.x5u = Some(format!("http://{}/cert.pem", lure.addr));
    let jku = attacker.sign_with(&jku, &claims());
    let mut kid_path = rsa.header();
    kid_path.kid = Some("../../../../etc/passwd".into());
    let kid_path_token = rsa.sign_with(&kid_path, &claims());
    let truncated = &good[..good.len() - 10];
    let parts: Vec<&str> = good.split('.').collect();
    let garbage_b64 = format!("{}.{}!!.{}", parts[0], parts[1], parts[2]);
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(9000), parts[2]);
    let es = ec.sign(&claims());
    let es_parts: Vec<&str> = es.split('.').collect();
    let zero_sig = format!(
        "{}.{}.{}",
        es_parts[0],
        es_parts[1],
        URL_SAFE_NO_PAD.encode([0u8; 64])
    );

    let cases: Vec<(&str, &str, &str, u16)> = vec![
        ("alg none", "/rsa", &none, 401),
        ("alg none with signature", "/rsa", &none_sig, 401),
        ("HS256 with the RSA public key", "/rsa", &confused, 401),
        ("crit header", "/rsa", &crit, 401),
        ("jku / x5u to an attacker key", "/rsa", &jku, 401),
        ("truncated", "/rsa", truncated, 401),
        ("garbage base64", "/rsa", &garbage_b64, 401),
        ("not a JWT", "/rsa", "hello", 401),
        ("oversized", "/rsa", &huge, 401),
        ("ECDSA r=s=0", "/ec", &zero_sig, 401),
        ("RSA token on the EC route", "/ec", &good, 401),
        // Path characters in kid are only ever a map key: the right key still verifies.
        ("kid with path characters", "/rsa", &kid_path_token, 200),
    ];
    for (case, path, token, want) in cases {
        let r = call(&gw, path, Some(token)).await;
        assert_eq!(r.status.as_u16(), want, "{case}: {}", r.text());
        if want == 401 {
            assert_eq!(r.json()["error"], "invalid_token", "{case}");
        }
    }
    assert_eq!(lure.hits(), 0, "a token's jku/x5u must never be fetched");

    // Larger than the listener's header limit: refused before any parsing.
    let r = call(&gw, "/rsa", Some(&"A".repeat(20_000))).await;
    assert_eq!(r.status, 431);

    // Credentials in the wrong shape.
    let r = call(&gw, "/rsa", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"tollgate\"");
    assert_eq!(r.json()["error"], "unauthorized");
    let two = send(
        Request::get(gw.url("/rsa"))
            .header("authorization", format!("Bearer {good}"))
            .header("authorization", format!("Bearer {good}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(two.status, 400);
    assert!(
        two.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_request")
    );
    let basic = send(
        Request::get(gw.url("/rsa"))
            .header("authorization", "Basic dXNlcjpwYXNz")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(basic.status, 401);
    assert_eq!(
        up.hits(),
        2,
        "only the two valid tokens reached the upstream"
    );
}

/// Scope policy, claims forwarded as headers, client-supplied identity headers removed.
#[tokio::test]
async fn policy_claim_headers_and_cache() {
    let up = Upstream::echo("up").await;
    let dir = TempDir::new().unwrap();
    let s = Signer::new(Algorithm::ES256);
    let providers = [pem_provider(&dir, "p", &s, "").0];
    let routes = route(
        "bar",
        "/bar",
        &[&up],
        "    auth: jwt\n    forward_claims: { x-user: sub, x-scopes: scope, x-org: org }\n    forward_token: false\n    policy:\n      - deny: { paths: [/bar/admin/**] }\n      - allow: { scopes: [bar.read], methods: [GET] }\n      - allow: { scopes: [bar.write] }\n",
    ) + &route("open", "/open", &[&up], "");
    let gw = TestGateway::start(&gateway_yaml(&providers, &routes)).await;

    let reader = s.sign(&with(claims(), json!({"org": "acme"})));
    let request = || {
        Request::get(gw.url("/bar/items"))
            .header("authorization", format!("Bearer {reader}"))
            .header("x-user", "mallory")
            .header("x-forwarded-client-cert", "By=spoofed")
            .body(full(""))
            .unwrap()
    };
    let r = send(request()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json();
    let h = &first["headers"];
    assert_eq!(h["x-user"], "alice");
    assert_eq!(h["x-scopes"], "bar.read");
    assert_eq!(h["x-org"], "acme");
    assert!(h.get("authorization").is_none(), "forward_token: false");
    assert!(h.get("x-forwarded-client-cert").is_none());

    // The same token again comes from the cache (and so takes the direct
    // path, from the request's wire form): the target sees the same.
    let r = send(request()).await;
    assert_eq!(r.status, 200);
    let mut again = r.json();
    let mut first = first.clone();
    for seen in [&mut first, &mut again] {
        seen["headers"]
            .as_object_mut()
            .unwrap()
            .remove("x-request-id");
    }
    assert_eq!(again, first);

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_auth_tokens_total{outcome=\"cached\",provider=\"p\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_auth_tokens_total{outcome=\"valid\",provider=\"p\"}"
        ),
        1.0
    );

    // A claim that is no header value (CR LF, as if to add a field of its
    // own) is not forwarded, by the stack (first) nor the direct path.
    let crlf = s.sign(&with(
        claims(),
        json!({"org": "acme\r\nx-evil: 1", "sub": "bob\t1"}),
    ));
    for _ in 0..2 {
        let r = call(&gw, "/bar/items", Some(&crlf)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let h = &r.json()["headers"];
        assert!(h.get("x-org").is_none(), "{h}");
        assert!(h.get("x-evil").is_none(), "{h}");
        assert_eq!(h["x-user"], "bob\t1");
    }
    // Policy: POST needs bar.write; admin paths are denied to everyone.
    let r = send(
        Request::post(gw.url("/bar/items"))
            .header("authorization", format!("Bearer {reader}"))
            .body(full("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "insufficient_scope");
    let challenge = r.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(
        challenge.contains("scope=\"bar.read bar.write\""),
        "{challenge}"
    );
    let writer = s.sign(&with(claims(), json!({"scope": "bar.write"})));
    let r = send(
        Request::post(gw.url("/bar/items"))
            .header("authorization", format!("Bearer {writer}"))
            .body(full("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(call(&gw, "/bar/admin/x", Some(&writer)).await.status, 403);
    assert_eq!(call(&gw, "/bar/%61dmin/x", Some(&writer)).await.status, 403);

    // Identity headers are stripped on routes without auth too.
    let r = send(
        Request::get(gw.url("/open"))
            .header("x-user", "mallory")
            .header("x-org", "evil")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("x-user").is_none());
    assert!(r.json()["headers"].get("x-org").is_none());

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_authz_decisions_total{outcome=\"deny\",route=\"bar\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_authz_decisions_total{outcome=\"allow\",route=\"bar\"}"
        ),
        5.0
    );
}

/// A JWKS endpoint we control: its key set, a fetch counter, and modes.
struct Jwks {
    server: Upstream,
    keys: Arc<Mutex<Value>>,
    mode: Arc<Mutex<&'static str>>,
    fetches: Arc<AtomicUsize>,
}

impl Jwks {
    async fn start(initial: Value) -> Jwks {
        let keys = Arc::new(Mutex::new(initial));
        let mode = Arc::new(Mutex::new("ok"));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, m, f) = (keys.clone(), mode.clone(), fetches.clone());
        let server = Upstream::start(move |_| {
            f.fetch_add(1, Ordering::SeqCst);
            let body = k.lock().unwrap().to_string();
            let mode = *m.lock().unwrap();
            async move {
                match mode {
                    "down" => status_response(503),
                    "garbage" => http::Response::new(full("<html>not json</html>")),
                    _ => {
                        let mut r = http::Response::new(full(body));
                        r.headers_mut()
                            .insert("cache-control", "max-age=1".parse().unwrap());
                        r
                    }
                }
            }
        })
        .await;
        Jwks {
            server,
            keys,
            mode,
            fetches,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn jwks_rotation_refetch_limits_and_stale_keys() {
    let up = Upstream::echo("up").await;
    let a = Signer::new(Algorithm::ES256).with_kid("key-a");
    let b = Signer::new(Algorithm::EdDSA).with_kid("key-b");
    let jwks = Jwks::start(json!({"keys": [a.jwk()]})).await;
    let uri = format!("http://{}/.well-known/jwks.json", jwks.server.addr);
    let providers = [provider_yaml(
        "idp",
        &format!("jwks_uri: {uri}"),
        "      jwks: { min_refresh: 200ms, max_refresh: 200ms, unknown_kid_refetch: 1h }\n",
    )];
    let routes = route("bar", "/bar", &[&up], "    auth: jwt\n");
    let gw = TestGateway::start(&gateway_yaml(&providers, &routes)).await;

    wait_until(Duration::from_secs(5), "key A fetched", || async {
        call(&gw, "/bar", Some(&a.sign(&claims()))).await.status == 200
    })
    .await;

    // Rotation at the issuer: key B appears; a token with kid B triggers a
    // refetch (the background refresh may also pick it up) and validates.
    *jwks.keys.lock().unwrap() = json!({"keys": [a.jwk(), b.jwk()]});
    let r = call(&gw, "/bar", Some(&b.sign(&claims()))).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A flood of forged kids causes no fetch beyond the periodic refresh:
    // the unknown-kid refetch already ran within its interval.
    let mut rng = fastrand::Rng::new();
    let before = jwks.fetches();
    let t0 = std::time::Instant::now();
    for _ in 0..100 {
        let forged = Signer::new(Algorithm::HS256);
        let mut h = a.header();
        h.kid = Some(format!("forged-{}", rng.u64(..)));
        let token = a.sign_with(&h, &claims());
        drop(forged);
        assert_eq!(call(&gw, "/bar", Some(&token)).await.status, 401);
    }
    let periodic = (t0.elapsed().as_millis() / 200) as usize + 2;
    let during = jwks.fetches() - before;
    assert!(
        during <= periodic,
        "{during} fetches during the flood; the refresh alone allows {periodic}"
    );
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_auth_jwks_fetches_total{outcome=\"rate_limited\",provider=\"idp\",reason=\"unknown_kid\"}"
        ) >= 99.0,
        "{m}"
    );

    // Endpoint down, then answering garbage: fresh tokens (not cached) still
    // validate with the keys known before.
    for mode in ["down", "garbage"] {
        *jwks.mode.lock().unwrap() = mode;
        let seen = jwks.fetches();
        wait_until(Duration::from_secs(5), "two failed refreshes", || async {
            jwks.fetches() >= seen + 2
        })
        .await;
        let r = call(&gw, "/bar", Some(&b.sign(&claims()))).await;
        assert_eq!(r.status, 200, "{mode}: {}", r.text());
    }
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_auth_jwks_fetches_total{outcome=\"error\",provider=\"idp\",reason=\"refresh\"}"
        ) >= 4.0
    );
}

#[tokio::test]
async fn token_sources_and_mtls_routes_without_tls() {
    let up = Upstream::echo("up").await;
    let dir = TempDir::new().unwrap();
    let s = Signer::new(Algorithm::EdDSA);
    let providers = [pem_provider(
        &dir,
        "p",
        &s,
        "      token_from: [authorization, { cookie: session }, { query: access_token }]\n",
    )
    .0];
    let routes = route("bar", "/bar", &[&up], "    auth: jwt\n")
        + &route("cert", "/cert", &[&up], "    auth: mtls\n")
        + &route(
            "either",
            "/either",
            &[&up],
            "    auth: { any_of: [jwt, mtls] }\n",
        )
        + &route(
            "both",
            "/both",
            &[&up],
            "    auth: { all_of: [jwt, mtls] }\n",
        );
    let gw = TestGateway::start(&gateway_yaml(&providers, &routes)).await;
    let t = s.sign(&claims());

    let cookie = send(
        Request::get(gw.url("/bar"))
            .header("cookie", format!("theme=dark; session={t}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(cookie.status, 200);
    assert_eq!(
        get(&gw.url(&format!("/bar?x=1&access_token={t}")))
            .await
            .status,
        200
    );
    // The same request with a different token in two places is malformed.
    let other = s.sign(&claims());
    let r = send(
        Request::get(gw.url(&format!("/bar?access_token={other}")))
            .header("authorization", format!("Bearer {t}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400);

    // A plain listener never has a client certificate.
    let r = call(&gw, "/cert", Some(&t)).await;
    assert_eq!(r.status, 401);
    assert!(r.headers.get("www-authenticate").is_none());
    assert_eq!(call(&gw, "/either", Some(&t)).await.status, 200);
    let r = call(&gw, "/either", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"tollgate\"");
    assert_eq!(call(&gw, "/both", Some(&t)).await.status, 401);
}

#[tokio::test]
async fn provider_config_errors_name_the_key() {
    let dir = TempDir::new().unwrap();
    let private = dir.path().join("private.pem");
    std::fs::write(
        &private,
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem(),
    )
    .unwrap();
    let short = dir.path().join("short.secret");
    std::fs::write(&short, "too-short").unwrap();
    let yaml = format!(
        "{}auth:\n  providers:\n{}{}{}{}{}",
        config_with_routes(
            "  - name: r\n    match: { path_prefix: / }\n    upstream: { targets: [http://127.0.0.1:9] }\n    auth: jwt\n    providers: [nope]\n"
        ),
        provider_yaml("missing", "public_keys: [does-not-exist.pem]", ""),
        provider_yaml(
            "private",
            &format!("public_keys: [{}]", private.display()),
            ""
        ),
        provider_yaml(
            "short",
            &format!("secret: {{ file: {} }}", short.display()),
            ""
        ),
        provider_yaml(
            "confused",
            &format!("secret: {{ file: {} }}", short.display()),
            "      algorithms: [RS256, none]\n"
        ),
        provider_yaml("self", "keys: self", ""),
    );
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "routes[0].providers[0]: `nope` is not a provider",
        "auth.providers[0].public_keys[0]: cannot read",
        "auth.providers[1].public_keys[0]:",
        "holds a private key",
        "auth.providers[2].secret.file: the secret must be at least 32 bytes",
        "auth.providers[4].keys: `keys: self` needs",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}

/// An https JWKS endpoint behind a private CA: trusted with `jwks.ca_file`,
/// refused with the system roots.
#[tokio::test]
async fn jwks_over_https_with_a_private_ca() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    // A CA and a server certificate for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test idp CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let signer = Signer::new(Algorithm::ES256).with_kid("tls-key");
    let body = json!({"keys": [signer.jwk()]}).to_string();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(server_cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fetches = Arc::new(AtomicUsize::new(0));
    let served = fetches.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, body, served) = (acceptor.clone(), body.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    served.fetch_add(1, Ordering::SeqCst);
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(body))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    let up = Upstream::echo("up").await;
    let dir = TempDir::new().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let uri = format!("https://127.0.0.1:{}/jwks.json", addr.port());
    let providers = [
        provider_yaml(
            "private",
            &format!("jwks_uri: {uri}"),
            &format!("      jwks: {{ ca_file: {} }}\n", ca_file.display()),
        ),
        provider_yaml("system", &format!("jwks_uri: {uri}"), ""),
    ];
    let routes = route(
        "p",
        "/p",
        &[&up],
        "    auth: jwt\n    providers: [private]\n",
    ) + &route(
        "s",
        "/s",
        &[&up],
        "    auth: jwt\n    providers: [system]\n",
    );
    let gw = TestGateway::start(&gateway_yaml(&providers, &routes)).await;
    let token = signer.sign(&claims());
    wait_until(
        Duration::from_secs(5),
        "keys fetched over https",
        || async { call(&gw, "/p", Some(&token)).await.status == 200 },
    )
    .await;
    // The system roots do not know the private CA: no keys, no access.
    let r = call(&gw, "/s", Some(&signer.sign(&claims()))).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_auth_jwks_fetches_total{outcome=\"error\",provider=\"system\",reason=\"refresh\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(fetches.load(Ordering::SeqCst) >= 1);
    server.abort();
}

/// A key file replaced on disk is picked up by a reload even though
/// gateway.yaml did not change; a broken replacement is rejected.
#[tokio::test]
async fn reload_rereads_key_files() {
    let up = Upstream::echo("up").await;
    let dir = TempDir::new().unwrap();
    let old = Signer::new(Algorithm::ES256);
    let new = Signer::new(Algorithm::ES256);
    let (provider, file) = pem_provider(&dir, "p", &old, "");
    let providers = [provider];
    let routes = route("bar", "/bar", &[&up], "    auth: jwt\n");
    let yaml = gateway_yaml(&providers, &routes).replace(
        "access_log: false",
        "access_log: false\nreload: { watch: false }",
    );
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(
        call(&gw, "/bar", Some(&old.sign(&claims()))).await.status,
        200
    );
    assert_eq!(gw.gw.reload().await.unwrap(), tollgate::Reloaded::Unchanged);

    std::fs::write(&file, "not a key").unwrap();
    assert!(
        gw.gw.reload().await.is_err(),
        "a broken key file is rejected"
    );
    assert_eq!(
        call(&gw, "/bar", Some(&old.sign(&claims()))).await.status,
        200
    );

    std::fs::write(&file, &new.public_pem).unwrap();
    assert_eq!(gw.gw.reload().await.unwrap(), tollgate::Reloaded::Applied);
    assert_eq!(
        call(&gw, "/bar", Some(&new.sign(&claims()))).await.status,
        200
    );
    assert_eq!(
        call(&gw, "/bar", Some(&old.sign(&claims()))).await.status,
        401
    );
}

/// A client can neither strip nor forge what the gateway sets: the
/// `Connection` field naming gateway-set fields removes only the client's
/// own copies, and look-alikes (case, `_` for `-`) never travel. Raw
/// bytes, as a hostile client sends them; checked on what the target got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_look_alikes_cannot_strip_or_forge_identity_fields() {
    let up = Upstream::echo("up").await;
    let dir = TempDir::new().unwrap();
    let s = Signer::new(Algorithm::ES256);
    let providers = [pem_provider(&dir, "p", &s, "").0];
    let routes = route(
        "bar",
        "/bar",
        &[&up],
        "    auth: jwt\n    forward_claims: { x-user: sub, x-scopes: scope }\n",
    );
    let gw = TestGateway::start(&gateway_yaml(&providers, &routes)).await;
    let token = s.sign(&claims());
    for connection in [
        "x-user",
        "X-User, x-request-id",
        "keep-alive, authorization, x-scopes",
        "x-forwarded-for, forwarded, via, x-forwarded-proto, x-forwarded-host",
        "x-user,x-scopes,x-request-id,authorization,x-forwarded-for,via",
    ] {
        // Twice on one connection: the second request is answered from
        // what the connection remembers of the token.
        let one = format!(
            "GET /bar/items HTTP/1.1\r\nhost: gw.test\r\nauthorization: Bearer {token}\r\n\
             connection: {connection}\r\nX_User: mallory\r\nx_user: mallory\r\nx-USER: mallory\r\n\
             x_scopes: admin\r\nx_request_id: forged\r\nx_forwarded_for: 6.6.6.6\r\n\
             x-forwarded-prefix: /evil\r\nx_forwarded_client_cert: By=spoofed\r\n\
             proxy-anything: 1\r\nx-kept: yes\r\n\r\n"
        );
        let raw = format!(
            "{one}{}",
            one.replace("x-kept: yes\r\n", "x-kept: yes\r\nconnection: close\r\n")
        );
        let text = exchange_raw(gw.addr(), raw.as_bytes()).await;
        let answers: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(answers.len(), 2, "{connection}: {text}");
        for answer in answers {
            let answer = format!("HTTP/1.1 {answer}");
            let (status, body) = status_and_body(&answer);
            assert_eq!(status, 200, "{connection}: {answer}");
            let seen: Value = serde_json::from_str(body).unwrap();
            let h = seen["headers"].as_object().unwrap();
            assert_eq!(h["x-user"], "alice", "{connection}: {h:?}");
            assert_eq!(h["x-scopes"], "bar.read", "{connection}: {h:?}");
            assert_eq!(h["authorization"], format!("Bearer {token}").as_str());
            assert_eq!(h["x-request-id"].as_str().unwrap().len(), 32, "{h:?}");
            assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h:?}");
            assert_eq!(h["via"], "1.1 tollgate", "{h:?}");
            assert_eq!(h["x-forwarded-host"], "gw.test", "{h:?}");
            assert_eq!(h["x-kept"], "yes", "{h:?}");
            for gone in [
                "x_user",
                "x_scopes",
                "x_request_id",
                "x_forwarded_for",
                "x-forwarded-prefix",
                "x_forwarded_client_cert",
                "x-forwarded-client-cert",
                "proxy-anything",
                "connection",
            ] {
                assert!(!h.contains_key(gone), "{connection}: {gone} in {h:?}");
            }
        }
    }
}
