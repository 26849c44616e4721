//! The trust boundary, tried as a hostile client would: raw bytes on the
//! wire, every spelling of a path or host, and what the upstream actually
//! received.

use http::Request;

use crate::support::*;

/// An open catch-all and a protected `/admin` (a policy that allows only
/// DELETE, so a GET that reaches it is refused with 403).
async fn open_and_protected() -> (TestGateway, Upstream, Upstream) {
    let open = Upstream::echo("open").await;
    let admin = Upstream::echo("admin").await;
    let routes = format!(
        "{}{}",
        route("open", "/", &[&open], ""),
        route(
            "admin",
            "/admin",
            &[&admin],
            "    policy:\n      - allow: { methods: [DELETE] }\n"
        )
    );
    (
        TestGateway::start(&config_with_routes(&routes)).await,
        open,
        admin,
    )
}

async fn raw_get(gw: &TestGateway, target: &str, host: &str) -> String {
    let raw = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    exchange_raw(gw.addr(), raw.as_bytes()).await
}

/// Which upstream answered and the path it received, or the gateway's
/// status and error code.
fn decision(response: &str) -> String {
    let (status, body) = status_and_body(response);
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    match status {
        200 => format!("{} {}", json["name"], json["path"]),
        _ => format!("{status} {}", json["error"]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_protected_path_reaches_another_route() {
    let (gw, open, admin) = open_and_protected().await;
    for target in [
        "/%61dmin/x",
        "/%61%64%6D%69%6E/x",
        "//admin/x",
        "///admin//x",
        "/./admin/x",
        "/x/../admin/x",
        "/x/%2e%2e/admin/x",
        "/x/.%2E/admin/x",
        "/admin/./x",
    ] {
        let text = raw_get(&gw, target, "gw.test").await;
        assert_eq!(decision(&text), "403 \"forbidden\"", "{target}: {text}");
    }
    // An escaped separator never separates: refused on routes that do not
    // keep them, and never a way into `/admin`.
    for target in [
        "/admin%2fx",
        "/%2fadmin/x",
        "/%2Fadmin%2Fx",
        "/admin%5cx",
        "/a\\admin",
    ] {
        let text = raw_get(&gw, target, "gw.test").await;
        assert_eq!(decision(&text), "400 \"bad_path\"", "{target}: {text}");
    }
    // Above the root, malformed escapes, an escaped NUL.
    for target in [
        "/..",
        "/a/../../admin",
        "/%2e%2e/admin",
        "/a%zz",
        "/a%0",
        "/a%00",
    ] {
        let text = raw_get(&gw, target, "gw.test").await;
        assert_eq!(decision(&text), "400 \"bad_path\"", "{target}: {text}");
    }
    assert_eq!(open.hits(), 0, "nothing reached the catch-all");
    assert_eq!(admin.hits(), 0, "the policy refused every one");

    // The same over HTTP/2.
    let h2 = h2c_client();
    for target in ["/%61dmin/x", "//admin/x", "/x/../admin/x"] {
        let r = send_with(
            &h2,
            Request::get(format!("http://{}{target}", gw.addr()))
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 403, "{target}");
    }
    assert_eq!(open.hits() + admin.hits(), 0);
}

/// A table of requests whose routing decision, and what the upstream
/// received, must equal those of their canonical form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_is_decided_and_forwarded_as_its_canonical_form() {
    let (gw, _open, _admin) = open_and_protected().await;
    for (target, canonical) in [
        ("/a//b/./c/../d", "/a/b/d"),
        ("/%7euser/%41", "/~user/A"),
        ("/x%2dy?q=%2F", "/x-y?q=%2F"),
        ("/a%3fb", "/a%3Fb"),
        ("/a%20b/", "/a%20b/"),
        ("//", "/"),
        ("/adminx", "/adminx"),
        ("/%41dmin", "/Admin"),
        ("/admin/..", "/"),
    ] {
        let spelled = decision(&raw_get(&gw, target, "gw.test").await);
        let plain = decision(&raw_get(&gw, canonical, "gw.test").await);
        assert_eq!(spelled, plain, "{target} and {canonical}");
        assert_eq!(
            spelled,
            format!("\"open\" \"{canonical}\""),
            "the upstream receives the canonical form of {target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_may_keep_escaped_slashes_without_them_selecting_a_route() {
    let keep = Upstream::echo("keep").await;
    let admin = Upstream::echo("admin").await;
    let routes = format!(
        "{}    encoded_slashes: keep\n{}",
        route("keep", "/", &[&keep], ""),
        route("admin", "/admin", &[&admin], "")
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    for (target, received) in [
        ("/admin%2fx", "/admin%2Fx"),
        ("/%2fadmin/x", "/%2Fadmin/x"),
        ("/files/a%2Fb%5cc", "/files/a%2Fb%5Cc"),
    ] {
        let text = raw_get(&gw, target, "gw.test").await;
        assert_eq!(
            decision(&text),
            format!("\"keep\" \"{received}\""),
            "{target}: {text}"
        );
    }
    assert_eq!(admin.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_routed_by_is_the_host_forwarded() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let any = Upstream::echo("any").await;
    let routes = format!(
        "{}{}{}",
        route("a", "/", &[&a], "    preserve_host: true\n").replace(
            "path_prefix: /\n",
            "path_prefix: /\n      host: a.internal\n"
        ),
        route("b", "/", &[&b], "    preserve_host: true\n").replace(
            "path_prefix: /\n",
            "path_prefix: /\n      host: b.internal\n"
        ),
        route("any", "/", &[&any], ""),
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;
    let received = |text: &str| -> serde_json::Value {
        let (status, body) = status_and_body(text);
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(body).unwrap()
    };

    // Case and a trailing dot do not change the host.
    for host in [
        "A.Internal",
        "a.internal.",
        "a.internal:8082",
        "A.INTERNAL.:8082",
    ] {
        let r = received(&raw_get(&gw, "/x", host).await);
        assert_eq!(r["name"], "a", "{host}");
        let expected = if host.ends_with(":8082") {
            "a.internal:8082"
        } else {
            "a.internal"
        };
        assert_eq!(r["headers"]["host"], expected, "{host}");
        assert_eq!(r["headers"]["x-forwarded-host"], expected, "{host}");
    }

    // The absolute-form target's authority wins over the Host field, for
    // routing and forwarding alike.
    let r = received(
        &exchange_raw(
            gw.addr(),
            b"GET http://b.internal/x HTTP/1.1\r\nhost: a.internal\r\nconnection: close\r\n\r\n",
        )
        .await,
    );
    assert_eq!(r["name"], "b");
    assert_eq!(r["headers"]["host"], "b.internal");
    assert_eq!(r["headers"]["x-forwarded-host"], "b.internal");
    assert_eq!(r["path"], "/x");

    // HTTP/2: `:authority` routes, and a `host` field naming another
    // authority is refused.
    let mut conn = h2_connection(gw.addr()).await;
    let r = h2_send(
        &mut conn,
        Request::get("http://b.internal/x")
            .header("host", "a.internal")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "bad_host");
    let r = h2_send(
        &mut conn,
        Request::get("http://b.internal/x").body(full("")).unwrap(),
    )
    .await;
    assert_eq!(r.json()["name"], "b");
    assert_eq!(r.json()["headers"]["x-forwarded-host"], "b.internal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_are_missing_repeated_or_malformed_are_refused() {
    let up = Upstream::echo("up").await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    for raw in [
        "GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a\r\nHost: a\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: user@a\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a/b\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a:port\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: \r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: [::1\r\nconnection: close\r\n\r\n",
        "GET http://u@a/ HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        "GET http://a:b/ HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    ] {
        let text = exchange_raw(gw.addr(), raw.as_bytes()).await;
        let (status, body) = status_and_body(&text);
        assert_eq!(status, 400, "{raw:?}: {text}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(json["error"], "bad_host", "{raw:?}: {text}");
        assert!(json["request_id"].is_string(), "{raw:?}: {text}");
    }
    assert_eq!(up.hits(), 0);
    // HTTP/1.0 needs no Host.
    let text = exchange_raw(gw.addr(), b"GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_and_body(&text).0, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_underscores_travel_only_where_the_listener_keeps_them() {
    let up = Upstream::echo("up").await;
    let routes = route("r", "/", &[&up], "")
        + &route(
            "claims",
            "/claims",
            &[&up],
            "    forward_claims: { x-user: sub }\n",
        );
    let request = b"GET /x HTTP/1.1\r\nhost: gw.test\r\nx_custom: 1\r\nX_User: mallory\r\n\
        x_forwarded_host: evil\r\nx_request_id: forged\r\nx-plain: 2\r\n\
        transfer_encoding: chunked\r\nconnection: close\r\n\r\n";
    for (keep, custom) in [(false, None), (true, Some("1"))] {
        let yaml = config_with_routes(&routes).replace(
            "bind: 127.0.0.1:0\nadmin",
            &format!("bind: 127.0.0.1:0\n    underscores_in_headers: {keep}\nadmin"),
        );
        let gw = TestGateway::start(&yaml).await;
        let text = exchange_raw(gw.addr(), request).await;
        let (status, body) = status_and_body(&text);
        assert_eq!(status, 200, "{text}");
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        let h = seen["headers"].as_object().unwrap();
        assert_eq!(h.get("x_custom").and_then(|v| v.as_str()), custom, "{h:?}");
        assert_eq!(h["x-plain"], "2");
        for gone in [
            "x_user",
            "x_forwarded_host",
            "x_request_id",
            "transfer_encoding",
        ] {
            assert!(!h.contains_key(gone), "keep {keep}: {gone} in {h:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_chains_are_extended_only_for_trusted_proxies() {
    let up = Upstream::echo("up").await;
    let request = b"GET /x HTTP/1.1\r\nhost: gw.test\r\nx-forwarded-for: 203.0.113.9\r\n\
        x-forwarded-for: 198.51.100.2\r\nforwarded: for=203.0.113.9\r\nvia: 1.1 lb\r\n\
        x-forwarded-proto: https\r\nconnection: close\r\n\r\n";
    for (trusted, xff, forwarded, via) in [
        (
            "[]",
            "127.0.0.1",
            "for=127.0.0.1;proto=http;host=gw.test",
            "1.1 tollgate",
        ),
        (
            "[127.0.0.0/8]",
            "203.0.113.9, 198.51.100.2, 127.0.0.1",
            "for=203.0.113.9, for=127.0.0.1;proto=http;host=gw.test",
            "1.1 lb, 1.1 tollgate",
        ),
        (
            "[10.0.0.0/8, \"::1\"]",
            "127.0.0.1",
            "for=127.0.0.1;proto=http;host=gw.test",
            "1.1 tollgate",
        ),
    ] {
        let yaml = config_with_routes(&route("r", "/", &[&up], "")).replace(
            "bind: 127.0.0.1:0\nadmin",
            &format!("bind: 127.0.0.1:0\n    trusted_proxies: {trusted}\nadmin"),
        );
        let gw = TestGateway::start(&yaml).await;
        let text = exchange_raw(gw.addr(), request).await;
        let (status, body) = status_and_body(&text);
        assert_eq!(status, 200, "{text}");
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        let h = &seen["headers"];
        assert_eq!(h["x-forwarded-for"], xff, "{trusted}");
        assert_eq!(h["forwarded"], forwarded, "{trusted}");
        assert_eq!(h["via"], via, "{trusted}");
        assert_eq!(
            h["x-forwarded-proto"], "http",
            "{trusted}: this hop's scheme"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_trusted_proxy_is_a_config_error_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - name: s\n    bind: 127.0.0.1:0\n    trusted_proxies: [10.0.0.0/33]\n",
    )
    .unwrap();
    let err = tollgate::config::load(&path).unwrap_err().to_string();
    assert!(err.contains("trusted_proxies"), "{err}");
    assert!(err.contains("prefix length"), "{err}");
}

/// HTTP/2 sends each cookie pair as a field of its own; an HTTP/1.1 target
/// gets them joined into one `cookie` field (RFC 9113 §8.2.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookies_reach_an_http1_target_as_one_field() {
    let up = Upstream::start(|req| async move {
        let cookies: Vec<String> = req
            .headers()
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        http::Response::new(full(serde_json::json!(cookies).to_string()))
    })
    .await;
    let gw = TestGateway::start(&config_with_routes(&route("r", "/", &[&up], ""))).await;
    let mut h2 = h2_connection(gw.addr()).await;
    let r = h2_send(
        &mut h2,
        Request::get("http://gw.test/x")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!(["a=1; b=2"]));
}
