//! Token issuance per signing algorithm: the whole token endpoint
//! (`client_secret_basic`: form parsing, secret hash and constant-time
//! compare, claims, signing, response) against the raw signing rate of the
//! same key with the same claims, measured in the same run.

use std::hint::black_box;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::BodyExt;
use http_body_util::Full;
use tollgate::config::Config;
use tollgate::identity::Revocations;
use tollgate::metrics::Metrics;
use tollgate::oauth::OAuthRuntime;
use tollgate::transport::{LocalBody, LocalService};

const SECRET: &str = "bench-client-secret-0123456789abcdef";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, SECRET.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("bench:{SECRET}"))
    );
    for alg in ["EdDSA", "ES256", "RS256"] {
        let path = dir.path().join(format!("{alg}.yaml"));
        std::fs::write(
            &path,
            format!(
                "store: {{ path: {alg}.redb }}\noauth:\n  issuer: http://localhost:8082\n  signing_algorithm: {alg}\n  clients:\n    - {{ id: bench, secret_sha256: \"{hash}\", scopes: [bar.read, bar.write], audiences: [bar] }}\n"
            ),
        )
        .expect("config");
        let cfg: Arc<Config> = Arc::new(tollgate::config::load(&path).expect("valid config"));
        let runtime = OAuthRuntime::new(Arc::new(Metrics::new()), Vec::new());
        runtime
            .apply(&cfg, &Arc::new(Revocations::default()))
            .expect("token server");
        let server = runtime.server.load_full().expect("server");
        let key = server.keys.signing.clone();

        let mut group = c.benchmark_group(format!("oauth/{alg}"));
        group.bench_function("raw_sign", |b| {
            let mut header = jsonwebtoken::Header::new(key.algorithm);
            header.typ = Some("at+jwt".into());
            header.kid = Some(key.kid.clone());
            let claims = serde_json::json!({
                "iss": "http://localhost:8082", "sub": "bench", "aud": "bar",
                "exp": 2_000_000_000u64, "iat": 1_800_000_000u64, "nbf": 1_800_000_000u64,
                "jti": "0123456789abcdef0123456789abcdef", "client_id": "bench",
                "scope": "bar.read bar.write",
            });
            b.iter(|| {
                black_box(jsonwebtoken::encode(&header, &claims, &key.encoding).expect("sign"))
            })
        });
        let listener = &cfg.listeners[0].name;
        let token_endpoint =
            LocalService::endpoint(&*server, listener, "/oauth2/token").expect("served");
        group.bench_function("token_endpoint", |b| {
            b.iter(|| {
                let req = Request::post("/oauth2/token")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("authorization", basic.as_str())
                    .body(LocalBody::new(
                        Full::new(Bytes::from_static(b"grant_type=client_credentials"))
                            .map_err(|e| match e {}),
                    ))
                    .expect("request");
                let resp = rt.block_on(server.clone().serve(
                    token_endpoint,
                    req,
                    "127.0.0.1".parse().expect("ip"),
                    None,
                ));
                assert_eq!(resp.status(), 200);
                black_box(resp)
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
