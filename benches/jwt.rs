//! JWT validation per algorithm: cold (signature checked every time: the
//! provider's token cache is off) and warm (a validated token found in the
//! cache, with the revocation check).

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use tollgate::identity::{Authenticator, Providers};
use tollgate::metrics::Metrics;

fn keypair(alg: Algorithm) -> (EncodingKey, String) {
    if alg == Algorithm::HS256 {
        let secret = "bench-secret-bench-secret-bench-secret-0123";
        return (EncodingKey::from_secret(secret.as_bytes()), secret.into());
    }
    let rc = match alg {
        Algorithm::RS256 => &rcgen::PKCS_RSA_SHA256,
        Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        _ => &rcgen::PKCS_ED25519,
    };
    let kp = rcgen::KeyPair::generate_for(rc).expect("key");
    let pem = kp.serialize_pem();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
        _ => EncodingKey::from_ed_pem(pem.as_bytes()),
    }
    .expect("encoding key");
    (key, kp.public_key_pem())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://idp.bench", "aud": "bar", "sub": "alice", "exp": now + 3600,
        "iat": now, "scope": "bar.read bar.write", "jti": "bench-1", "client_id": "foo",
    });
    let mut group = c.benchmark_group("jwt_validate");
    for (name, alg) in [
        ("RS256", Algorithm::RS256),
        ("ES256", Algorithm::ES256),
        ("EdDSA", Algorithm::EdDSA),
        ("HS256", Algorithm::HS256),
    ] {
        let (key, public) = keypair(alg);
        let file = dir.path().join(name);
        std::fs::write(&file, public).expect("write key");
        let source = if alg == Algorithm::HS256 {
            format!("secret: {{ file: {} }}", file.display())
        } else {
            format!("public_keys: [{}]", file.display())
        };
        let token = encode(&Header::new(alg), &claims, &key).expect("sign");
        for (mode, cache) in [("cold", 0), ("warm", 1000)] {
            let yaml = format!(
                "auth:\n  token_cache_entries: {cache}\n  providers:\n    - name: p\n      issuer: https://idp.bench\n      audiences: [bar]\n      {source}\n"
            );
            let cfg_file = dir.path().join(format!("{name}-{mode}.yaml"));
            std::fs::write(&cfg_file, yaml).expect("write config");
            let cfg = tollgate::config::load(&cfg_file).expect("config");
            let providers = Providers::build(&cfg, None, &Metrics::new(), None).expect("providers");
            let authn = Authenticator {
                accept_jwt: true,
                accept_cert: false,
                require_both: false,
                providers: vec![providers.get("p").expect("provider").clone()],
                users: None,
            };
            rt.block_on(authn.authenticate(Some(Cow::Borrowed(&token)), None))
                .expect("token validates");
            group.bench_function(format!("{name}/{mode}"), |b| {
                b.iter(|| {
                    rt.block_on(authn.authenticate(Some(Cow::Borrowed(black_box(&token))), None))
                        .is_ok()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
