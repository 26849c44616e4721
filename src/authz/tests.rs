//! Policy table tests: (rules, identity, action) -> decision.

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::config::RuleConfig;
use crate::identity::{AuthMethod, CertIdentity, Identity};

/// Rules are written as JSON here (the YAML shape is the same data).
fn rules(json: &str) -> Vec<RuleConfig> {
    serde_json::from_str(json).expect("rules parse")
}

fn jwt(sub: &str, scopes: &[&str], roles: &[&str], claims: serde_json::Value) -> Identity {
    Identity {
        method: AuthMethod::Jwt,
        subject: sub.into(),
        client_id: Some(format!("{sub}-client")),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        claims: claims.as_object().cloned().unwrap_or_default(),
        ..Identity::anonymous()
    }
}

fn cert(cn: &str, o: &str, uri: &str) -> Identity {
    Identity::from_cert(Arc::new(CertIdentity {
        subject: format!("CN={cn},O={o}"),
        cn: Some(cn.into()),
        o: vec![o.into()],
        san_uri: vec![uri.into()],
        sha256: "ab12".into(),
        ..CertIdentity::default()
    }))
}

fn decide(policy: &str, who: &Identity, method: &str, path: &str) -> (bool, Option<usize>) {
    let p = Policy::compile(&rules(policy), Resource::HttpPath).expect("policy compiles");
    let d = p.evaluate(who, &Action::http(method, path));
    (d.allowed(), d.rule)
}

#[test]
fn table() {
    let alice = jwt(
        "alice",
        &["bar.read", "bar.write"],
        &["user"],
        json!({"org": "acme", "groups": ["dev", "ops"], "level": 3, "email": "alice@acme.example"}),
    );
    let bob = jwt("bob", &["bar.read"], &["admin"], json!({"org": "other"}));
    let anon = Identity::anonymous();
    let backend = cert("svc-a", "backend", "spiffe://acme/ns/prod/sa/a");
    let frontend = cert("web", "frontend", "spiffe://acme/ns/prod/sa/web");

    type Case<'a> = (&'a str, &'a Identity, &'a str, &'a str, bool, Option<usize>);
    let cases: &[Case] = &[
        // Empty policy: deny by default.
        ("[]", &alice, "GET", "/x", false, None),
        // Scopes: a list means all of them.
        (
            r#"[{"allow": {"scopes": ["bar.read"]}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"scopes": ["bar.read", "bar.write"]}}]"#,
            &bob,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"scopes": {"any_of": ["bar.write", "bar.read"]}}}]"#,
            &bob,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"scopes": {"all_of": ["bar.read"], "any_of": ["x", "y"]}}}]"#,
            &alice,
            "GET",
            "/",
            false,
            None,
        ),
        // Methods with scopes (DESIGN's example).
        (
            r#"[{"allow": {"scopes": ["bar.read"], "methods": ["GET"]}}]"#,
            &alice,
            "POST",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"scopes": ["bar.read"], "methods": ["get"]}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        // Roles and claims.
        (
            r#"[{"allow": {"roles": ["admin"]}}]"#,
            &bob,
            "DELETE",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"roles": ["admin"]}}]"#,
            &alice,
            "DELETE",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"claims": {"org": "acme"}}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"claims": {"org": "acme"}}}]"#,
            &bob,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"claims": {"groups": "ops"}}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"claims": {"org": ["x", "acme"]}}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"claims": {"level": 3}}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"claims": {"level": "3"}}}]"#,
            &alice,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"claims": {"email": {"matches": "[a-z]+@acme\\.example"}}}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"claims": {"email": {"matches": "acme"}}}}]"#,
            &alice,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"claims": {"email": {"contains": "@acme"}}}}]"#,
            &alice,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"claims": {"missing": "x"}}}]"#,
            &alice,
            "GET",
            "/",
            false,
            None,
        ),
        // Paths with identity substitution; deny before allow; first match decides.
        (
            r#"[{"allow": {"paths": ["/users/{sub}/**"]}}]"#,
            &alice,
            "GET",
            "/users/alice/photos/1",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"paths": ["/users/{sub}/**"]}}]"#,
            &alice,
            "GET",
            "/users/bob/photos",
            false,
            None,
        ),
        (
            r#"[{"allow": {"paths": ["/users/%u/*"]}}]"#,
            &alice,
            "GET",
            "/users/alice/x/y",
            false,
            None,
        ),
        (
            r#"[{"allow": {"paths": ["/users/{sub}/**"]}}]"#,
            &anon,
            "GET",
            "/users//x",
            false,
            None,
        ),
        (
            r#"[{"allow": {"paths": ["/c/{client_id}"]}}]"#,
            &alice,
            "GET",
            "/c/alice-client",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"paths": ["/o/{claim.org}/**"]}}]"#,
            &alice,
            "GET",
            "/o/acme/x",
            true,
            Some(0),
        ),
        (
            r#"[{"deny": {"paths": ["/admin/**"]}}, {"allow": {}}]"#,
            &alice,
            "GET",
            "/admin",
            false,
            Some(0),
        ),
        (
            r#"[{"deny": {"paths": ["/admin/**"]}}, {"allow": {}}]"#,
            &alice,
            "GET",
            "/%61dmin/x",
            false,
            Some(0),
        ),
        (
            r#"[{"deny": {"paths": ["/admin/**"]}}, {"allow": {}}]"#,
            &alice,
            "GET",
            "//admin//x",
            false,
            Some(0),
        ),
        (
            r#"[{"deny": {"paths": ["/admin/**"]}}, {"allow": {}}]"#,
            &alice,
            "GET",
            "/public",
            true,
            Some(1),
        ),
        // Certificates.
        (
            r#"[{"allow": {"cert": {"o": "backend"}}}]"#,
            &backend,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"cert": {"o": "backend"}}}]"#,
            &frontend,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"cert": {"o": "backend"}}}]"#,
            &alice,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"cert": {"cn": ["web", "svc-b"]}}}]"#,
            &frontend,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"cert": {"san_uri_prefix": "spiffe://acme/ns/prod/"}}}]"#,
            &backend,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"cert": {"san_uri_prefix": "spiffe://acme/ns/dev/"}}}]"#,
            &backend,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"cert": {"fingerprint_sha256": "AB:12"}}}]"#,
            &backend,
            "GET",
            "/",
            true,
            Some(0),
        ),
        // How the caller authenticated.
        (
            r#"[{"allow": {"via": ["mtls"]}}]"#,
            &backend,
            "GET",
            "/",
            true,
            Some(0),
        ),
        (
            r#"[{"allow": {"via": ["mtls"]}}]"#,
            &alice,
            "GET",
            "/",
            false,
            None,
        ),
        (
            r#"[{"allow": {"methods": ["GET"]}}]"#,
            &anon,
            "GET",
            "/",
            true,
            Some(0),
        ),
    ];
    for (i, (policy, who, method, path, allowed, rule)) in cases.iter().enumerate() {
        assert_eq!(
            decide(policy, who, method, path),
            (*allowed, *rule),
            "case {i}: {policy} for {} {method} {path}",
            who.subject
        );
    }
}

/// Microkubes-style ACL (roles, resources, actions, grants) written as rules.
#[test]
fn microkubes_acl() {
    let policy = r#"[
        {"allow": {"roles": ["admin"]}},
        {"allow": {"roles": ["user"], "methods": ["GET", "PUT"], "paths": ["/users/{sub}", "/users/{sub}/**"]}},
        {"allow": {"roles": {"any_of": ["user", "system"]}, "methods": ["GET"], "paths": ["/public/**"]}}
    ]"#;
    let alice = jwt("alice", &[], &["user"], json!({}));
    let root = jwt("root", &[], &["admin"], json!({}));
    let sys = jwt("sys", &[], &["system"], json!({}));
    assert_eq!(
        decide(policy, &alice, "PUT", "/users/alice/profile"),
        (true, Some(1))
    );
    assert_eq!(
        decide(policy, &alice, "DELETE", "/users/alice"),
        (false, None)
    );
    assert_eq!(decide(policy, &alice, "GET", "/users/bob"), (false, None));
    assert_eq!(
        decide(policy, &root, "DELETE", "/users/bob"),
        (true, Some(0))
    );
    assert_eq!(decide(policy, &sys, "GET", "/public/a"), (true, Some(2)));
    assert_eq!(decide(policy, &sys, "GET", "/users/sys"), (false, None));
}

/// The same engine over MQTT topics and WAMP URIs.
#[test]
fn topics_and_uris() {
    let alice = jwt("alice", &[], &[], json!({}));
    let allows = |policy: &str, kind, verb, resource| {
        Policy::compile(&rules(policy), kind)
            .unwrap()
            .evaluate(
                &alice,
                &Action {
                    verb,
                    resource,
                    kind,
                },
            )
            .allowed()
    };
    let topics = r#"[{"allow": {"actions": ["publish", "subscribe"], "topics": ["%u/#"]}}]"#;
    assert!(allows(topics, Resource::Topic, "publish", "alice/temp"));
    assert!(allows(topics, Resource::Topic, "publish", "alice"));
    assert!(!allows(topics, Resource::Topic, "publish", "bob/temp"));
    assert!(!allows(topics, Resource::Topic, "publish", "/alice/temp"));
    let uris = r#"[{"allow": {"actions": ["call"], "uris": ["com.example.{sub}.*"]}}]"#;
    assert!(allows(uris, Resource::Uri, "call", "com.example.alice.add"));
    assert!(!allows(
        uris,
        Resource::Uri,
        "call",
        "com.example.alice.add.more"
    ));
    assert!(!allows(uris, Resource::Uri, "call", "com.example.bob.add"));
}

#[test]
fn compile_errors_name_the_rule() {
    let bad = rules(
        r#"[{"allow": {"paths": ["/a/**/b"]}}, {"deny": {"claims": {"x": {"matches": "("}}}}, {"allow": {"via": ["magic"]}}]"#,
    );
    let errors = Policy::compile(&bad, Resource::HttpPath).unwrap_err();
    let paths: Vec<&str> = errors.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "[0].allow.paths[0]",
            "[1].deny.claims.x",
            "[2].allow.via[0]"
        ]
    );
}
