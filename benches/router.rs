//! Micro-benchmarks of the request path's pure parts: route lookup in a table
//! of realistic size, and header hygiene.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use tollgate::config::{self, Config};
use tollgate::http::canonical;
use tollgate::http::headers::{self, Chain, Origin};
use tollgate::http::router::RouteTable;
use tollgate::http::upstream::UpstreamClients;
use tollgate::metrics::Metrics;

fn table(routes: usize) -> RouteTable {
    let mut yaml = String::from("routes:\n");
    for i in 0..routes {
        yaml.push_str(&format!(
            "  - name: r{i}\n    match: {{ path_prefix: /svc{i}/api }}\n    upstream: {{ targets: [\"http://127.0.0.1:{}\"] }}\n",
            10000 + i
        ));
    }
    yaml.push_str("  - name: hosted\n    match: { host: \"*.internal\", path_prefix: / }\n    upstream: { targets: [\"http://127.0.0.1:9999\"] }\n");
    let dir = std::env::temp_dir().join(format!("tollgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("gateway.yaml");
    std::fs::write(&file, yaml).expect("write");
    let cfg: Config = config::load(&file).expect("valid bench config");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let clients = UpstreamClients::new(&cfg.proxy);
        RouteTable::build(
            &cfg,
            &clients,
            &Metrics::new(),
            &tollgate::identity::Providers::empty(),
            &Default::default(),
            None,
        )
        .await
    })
}

/// A request's canonical form, then the most specific route for it: what
/// the pipeline does to route.
fn lookup(table: &RouteTable, headers: &HeaderMap, uri: &Uri) -> bool {
    let host = headers
        .get("host")
        .and_then(|h| canonical::authority(h.to_str().ok()?).ok());
    let Ok(path) = canonical::path(uri.path()) else {
        return false;
    };
    table
        .find_by(
            &Method::GET,
            host.as_ref().map(|h| &*h.host),
            &path.path,
            headers,
        )
        .is_some()
}

fn route_lookup(c: &mut Criterion) {
    let table = table(100);
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("localhost:8082"));
    let hit: Uri = "/svc73/api/users/42?x=1".parse().expect("uri");
    let miss: Uri = "/nothing/here".parse().expect("uri");
    let spelled: Uri = "/svc73//api/./users/%34%32?x=1".parse().expect("uri");
    c.bench_function("route_lookup/100_routes/hit", |b| {
        b.iter(|| black_box(lookup(&table, &headers, black_box(&hit))))
    });
    c.bench_function("route_lookup/100_routes/miss", |b| {
        b.iter(|| black_box(lookup(&table, &headers, black_box(&miss))))
    });
    c.bench_function("route_lookup/100_routes/hit_needing_canonical_form", |b| {
        b.iter(|| black_box(lookup(&table, &headers, black_box(&spelled))))
    });
}

fn header_hygiene(c: &mut Criterion) {
    let peer_text = HeaderValue::from_static("127.0.0.1");
    let origin = Origin {
        peer: [127, 0, 0, 1].into(),
        peer_text: &peer_text,
        proto: "http",
        version: Version::HTTP_11,
    };
    let chain = Chain {
        forwarded_for: b"10.0.0.7".to_vec(),
        forwarded: Vec::new(),
    };
    let mut out = BytesMut::with_capacity(512);
    c.bench_function("headers/forwarding_lines", |b| {
        b.iter(|| {
            out.clear();
            headers::put_forwarding(&mut out, &origin, Some(black_box("localhost:8082")), &chain);
            black_box(out.len())
        })
    });
}

criterion_group!(benches, route_lookup, header_hygiene);
criterion_main!(benches);
