use http::Request;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_specific_route_wins() {
    let any = Upstream::echo("any").await;
    let api = Upstream::echo("api").await;
    let api_v2 = Upstream::echo("api-v2").await;
    let exact_host = Upstream::echo("exact-host").await;
    let wildcard = Upstream::echo("wildcard").await;
    let posts = Upstream::echo("posts").await;
    let canary = Upstream::echo("canary").await;
    let routes = [
        route("any", "/", &[&any], ""),
        route("api", "/api", &[&api], ""),
        route("api-v2", "/api/v2/", &[&api_v2], ""),
        format!(
            "  - name: exact-host\n    match: {{ host: svc.internal, path_prefix: / }}\n    upstream: {{ targets: [http://{}] }}\n",
            exact_host.addr
        ),
        format!(
            "  - name: wildcard\n    match: {{ host: \"*.internal\", path_prefix: /api }}\n    upstream: {{ targets: [http://{}] }}\n",
            wildcard.addr
        ),
        format!(
            "  - name: posts\n    match: {{ path_prefix: /api, methods: [POST] }}\n    upstream: {{ targets: [http://{}] }}\n",
            posts.addr
        ),
        format!(
            "  - name: canary\n    match: {{ path_prefix: /api, headers: {{ x-canary: \"yes\" }} }}\n    upstream: {{ targets: [http://{}] }}\n",
            canary.addr
        ),
    ]
    .concat();
    let gw = TestGateway::start(&config_with_routes(&routes)).await;

    let who =
        |method: &'static str, path: &'static str, host: Option<&'static str>, canary: bool| {
            let url = gw.url(path);
            async move {
                let mut b = Request::builder().method(method).uri(url);
                if let Some(h) = host {
                    b = b.header("host", h);
                }
                if canary {
                    b = b.header("x-canary", "yes");
                }
                let r = send(b.body(full("")).unwrap()).await;
                assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
                r.json()["name"].as_str().unwrap().to_owned()
            }
        };
    assert_eq!(who("GET", "/other", None, false).await, "any");
    assert_eq!(who("GET", "/api", None, false).await, "api");
    assert_eq!(who("GET", "/api/users", None, false).await, "api");
    assert_eq!(
        who("GET", "/apix", None, false).await,
        "any",
        "prefix is segment-aware"
    );
    assert_eq!(
        who("GET", "/api/v2", None, false).await,
        "api-v2",
        "longest prefix wins"
    );
    assert_eq!(who("GET", "/api/v2/x", None, false).await, "api-v2");
    assert_eq!(
        who("GET", "/api/v2/x", Some("svc.internal"), false).await,
        "exact-host",
        "exact host beats any host"
    );
    assert_eq!(
        who("GET", "/api/x", Some("other.internal:8082"), false).await,
        "wildcard",
        "wildcard host, port ignored"
    );
    assert_eq!(
        who("GET", "/other", Some("other.internal"), false).await,
        "any",
        "wildcard route needs its prefix"
    );
    assert_eq!(
        who("GET", "/api/x", Some("internal"), false).await,
        "api",
        "*.internal does not match the bare domain"
    );
    assert_eq!(
        who("POST", "/api/x", None, false).await,
        "posts",
        "method condition"
    );
    assert_eq!(
        who("GET", "/api/x", None, true).await,
        "canary",
        "header condition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_and_rewrite_prefix() {
    let up = Upstream::echo("up").await;
    let routes = [
        route("strip", "/bar/", &[&up], "    strip_prefix: true\n"),
        route("rewrite", "/old", &[&up], "    rewrite_prefix: /new/api/\n"),
        route("keep", "/keep", &[&up], ""),
    ]
    .concat();
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    let path_of = |p: &'static str| {
        let url = gw.url(p);
        async move {
            let r = get(&url).await;
            assert_eq!(r.status, 200);
            r.json()["path"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(path_of("/bar/x/y?q=1&r=2").await, "/x/y?q=1&r=2");
    assert_eq!(path_of("/bar").await, "/");
    assert_eq!(path_of("/bar/").await, "/");
    assert_eq!(path_of("/old/thing?a=b").await, "/new/api/thing?a=b");
    assert_eq!(path_of("/old").await, "/new/api");
    assert_eq!(path_of("/keep/it").await, "/keep/it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_request_gets_json_404_and_bad_paths_400() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("only", "/only", &[&up], ""))).await;
    let r = get(&gw.url("/nope")).await;
    assert_eq!(r.status, 404);
    let body = r.json();
    assert_eq!(body["error"], "no_route");
    assert_eq!(
        body["request_id"].as_str().unwrap(),
        r.headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(r.headers["content-type"], "application/json");

    // Dot segments are resolved: this one walks out of the route.
    let r = get(&gw.url("/only/%2e%2e/secret")).await;
    assert_eq!(r.status, 404);
    let r = get(&gw.url("/only/../../secret")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_path");
    assert_eq!(up.hits(), 0, "refused requests never reach the upstream");

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_http_requests_total{class=\"4xx\",listener=\"sidecar\",route=\"none\"}"
        ),
        3.0
    );
}

/// A route may match several prefixes and hosts: each is ranked on its own
/// (a longer prefix of another route on the same host still wins), and
/// strip/rewrite uses the prefix that matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_several_prefixes_and_hosts() {
    let multi = Upstream::echo("multi").await;
    let deeper = Upstream::echo("deeper").await;
    let routes = [
        format!(
            "  - name: multi\n    match: {{ path_prefix: [/a, /b/c], host: [one.internal, \"*.two.internal\"] }}\n    strip_prefix: true\n    upstream: {{ targets: [http://{}] }}\n",
            multi.addr
        ),
        format!(
            "  - name: deeper\n    match: {{ path_prefix: /a/deep, host: one.internal }}\n    upstream: {{ targets: [http://{}] }}\n",
            deeper.addr
        ),
    ]
    .concat();
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    let call = |path: &str, host: &str| {
        let req = Request::get(gw.url(path))
            .header("host", host)
            .body(full(""))
            .unwrap();
        async move { send(req).await }
    };
    for (path, host, name, upstream_path) in [
        ("/a/x", "one.internal", "multi", "/x"),
        ("/b/c/y?q=1", "one.internal", "multi", "/y?q=1"),
        ("/b/c", "x.two.internal", "multi", "/"),
        ("/a/deep/z", "one.internal", "deeper", "/a/deep/z"),
    ] {
        let r = call(path, host).await;
        assert_eq!(r.status, 200, "{path} {host}: {}", r.text());
        assert_eq!(r.json()["name"], name, "{path} {host}");
        assert_eq!(r.json()["path"], upstream_path, "{path} {host}");
    }
    assert_eq!(call("/b/x", "one.internal").await.status, 404);
    assert_eq!(call("/a/x", "three.internal").await.status, 404);
}
