//! Policy table tests: (rules, identity, action) -> decision.

use std::sync::Arc;

use serde_json::json;

use super::syntax::RuleConfig;
use super::*;
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
    let allows = |policy: &str, action: Action<'_>| {
        Policy::compile(&rules(policy), action.kind())
            .unwrap()
            .evaluate(&alice, &action)
            .allowed()
    };
    let publish = |topic| Action::Publish {
        topic,
        qos: 0,
        retain: false,
    };
    let topics = r#"[{"allow": {"actions": ["publish", "subscribe"], "topics": ["%u/#"]}}]"#;
    assert!(allows(topics, publish("alice/temp")));
    assert!(allows(topics, publish("alice")));
    assert!(!allows(topics, publish("bob/temp")));
    assert!(!allows(topics, publish("/alice/temp")));
    let call = |uri| Action::Wamp {
        verb: WampVerb::Call,
        realm: "realm1",
        uri,
        policy: MatchPolicy::Exact,
    };
    let uris = r#"[{"allow": {"actions": ["call"], "uris": ["com.example.{sub}.*"]}}]"#;
    assert!(allows(uris, call("com.example.alice.add")));
    assert!(!allows(uris, call("com.example.alice.add.more")));
    assert!(!allows(uris, call("com.example.bob.add")));
}

/// MQTT: a filter is allowed only when every topic it can match is; `+`
/// and `#` at the first level never reach `$` topics; a caller's own values
/// stand for themselves (a user named `+`, `#` or `a/b` widens nothing);
/// malformed names and filters are refused before any rule.
#[test]
fn mqtt_semantics() {
    let acl = r##"[
        {"allow": {"actions": ["publish", "subscribe"], "topics": ["devices/%u/#"]}},
        {"allow": {"actions": ["subscribe"], "topics": ["news/+/headlines"]}},
        {"allow": {"actions": ["subscribe"], "topics": ["#"], "roles": ["monitor"]}},
        {"allow": {"actions": ["subscribe"], "topics": ["$SYS/broker/#"], "roles": ["ops"]}}
    ]"##;
    let policy = Policy::compile(&rules(acl), Resource::Topic).unwrap();
    let user = |name: &str, roles: &[&str]| jwt(name, &[], roles, json!({}));
    let publish = |who: &Identity, topic| {
        policy
            .evaluate(
                who,
                &Action::Publish {
                    topic,
                    qos: 1,
                    retain: false,
                },
            )
            .allowed()
    };
    let subscribe =
        |who: &Identity, filter| policy.evaluate(who, &Action::Subscribe { filter, qos: 1 });
    let may = |who: &Identity, filter| subscribe(who, filter).allowed();

    let d1 = user("d1", &[]);
    let table: &[(&str, bool)] = &[
        ("devices/d1/temp", true),
        ("devices/d1", true),
        ("devices/d1/#", true),
        ("devices/d1/+/x", true),
        ("devices/+/temp", false),
        ("devices/#", false),
        ("#", false),
        ("+/d1/temp", false),
        ("devices/d2/temp", false),
        ("news/world/headlines", true),
        ("news/+/headlines", true),
        ("news/#", false),
        ("news/+/+", false),
        ("$share/g1/devices/d1/temp", true),
        ("$share/g1/devices/+/temp", false),
    ];
    for (filter, allowed) in table {
        assert_eq!(may(&d1, filter), *allowed, "d1 subscribes {filter}");
    }
    assert!(publish(&d1, "devices/d1/temp"));
    assert!(!publish(&d1, "devices/d2/temp"));

    // Names that are wildcards or separators match nothing of theirs.
    for name in ["+", "#", "d1/x", ""] {
        let odd = user(name, &[]);
        for filter in ["devices/#", "devices/+/temp", "devices/+/#", "#"] {
            assert!(!may(&odd, filter), "user {name:?} subscribes {filter}");
        }
        assert!(!publish(&odd, "devices/d1/x/temp"), "user {name:?}");
    }

    // `#` (a monitor) covers every topic but the `$` ones.
    let monitor = user("m", &["monitor"]);
    assert!(may(&monitor, "#"));
    assert!(may(&monitor, "+/x"));
    assert!(may(&monitor, "devices/d1/temp"));
    assert!(!may(&monitor, "$SYS/#"));
    assert!(!may(&monitor, "$SYS/broker/load"));
    let ops = user("o", &["ops"]);
    assert!(may(&ops, "$SYS/broker/load"));
    assert!(may(&ops, "$SYS/broker/#"));
    assert!(!may(&ops, "$SYS/#"));

    // Malformed: refused before any rule, with the reason.
    for bad in [
        "devices/#/x",
        "devices/d1#",
        "devices/d+/x",
        "",
        "$share/g1",
        "$share//x",
    ] {
        let d = subscribe(&monitor, bad);
        assert!(!d.allowed(), "{bad:?}");
        assert!(matches!(d.reason, Reason::Invalid(_)), "{bad:?}: {d:?}");
    }
    for bad in ["devices/d1/+", "devices/d1/#", ""] {
        assert!(!publish(&d1, bad), "publish {bad:?}");
    }
    // A decision names its rule, or says no rule matched.
    assert_eq!(subscribe(&d1, "news/a/headlines").rule, Some(1));
    let none = subscribe(&d1, "other");
    assert_eq!((none.rule, none.reason), (None, Reason::NoRule));
    assert_eq!(none.to_string(), "denied: no rule matches");
    assert_eq!(
        subscribe(&d1, "news/a/headlines").to_string(),
        "allowed by rule 1"
    );
}

/// WAMP: exact, prefix and wildcard subscriptions and registrations; a
/// pattern must cover every URI a prefix or wildcard can match.
#[test]
fn wamp_semantics() {
    let acl = r#"[
        {"allow": {"actions": ["call", "subscribe"], "uris": ["com.app.{sub}.**"]}},
        {"allow": {"actions": ["subscribe"], "uris": ["com.app.public.*.news"]}},
        {"allow": {"actions": ["register"], "uris": ["com.app.svc.*"]}}
    ]"#;
    let policy = Policy::compile(&rules(acl), Resource::Uri).unwrap();
    let alice = jwt("alice", &[], &[], json!({}));
    let may = |verb, uri, policy_kind| {
        policy
            .evaluate(
                &alice,
                &Action::Wamp {
                    verb,
                    realm: "realm1",
                    uri,
                    policy: policy_kind,
                },
            )
            .allowed()
    };
    use MatchPolicy::{Exact, Prefix, Wildcard};
    use WampVerb::{Call, Publish, Register, Subscribe};
    let table: &[(WampVerb, &str, MatchPolicy, bool)] = &[
        (Call, "com.app.alice.add", Exact, true),
        (Call, "com.app.alice", Exact, true),
        (Call, "com.app.bob.add", Exact, false),
        (Call, "com.app..add", Exact, false),
        (Publish, "com.app.alice.x", Exact, false),
        (Subscribe, "com.app.alice.", Prefix, true),
        (Subscribe, "com.app.alice.ev", Prefix, true),
        (Subscribe, "com.app.ali", Prefix, false),
        (Subscribe, "com.app.", Prefix, false),
        (Subscribe, "com.app.alice..x", Wildcard, true),
        (Subscribe, "com.app..x", Wildcard, false),
        (Subscribe, "com.app.public.eu.news", Exact, true),
        (Subscribe, "com.app.public..news", Wildcard, true),
        (Subscribe, "com.app.public.eu.", Prefix, false),
        (Register, "com.app.svc.add", Exact, true),
        (Register, "com.app.svc.", Prefix, false),
        (Register, "com.app.svc.add.x", Exact, false),
    ];
    for (verb, uri, how, allowed) in table {
        assert_eq!(may(*verb, uri, *how), *allowed, "{verb:?} {uri} {how:?}");
    }
    // A caller's value with a `.` is not a component.
    let dotted = jwt("alice.admin", &[], &[], json!({}));
    let d = policy.evaluate(
        &dotted,
        &Action::Wamp {
            verb: Call,
            realm: "realm1",
            uri: "com.app.alice.admin.x",
            policy: Exact,
        },
    );
    assert!(!d.allowed());
}

/// Tunnel ids are names taken whole; a policy for one front-end never
/// decides another's actions.
#[test]
fn tunnels_and_kinds() {
    let policy = Policy::compile(
        &rules(r#"[{"allow": {"actions": ["join"], "paths": ["{sub}"]}}]"#),
        Resource::Name,
    )
    .unwrap();
    let dev = jwt("dev-7", &[], &[], json!({}));
    assert!(
        policy
            .evaluate(&dev, &Action::TunnelJoin { id: "dev-7" })
            .allowed()
    );
    assert!(
        !policy
            .evaluate(&dev, &Action::TunnelJoin { id: "dev-8" })
            .allowed()
    );
    let http = Policy::compile(&rules(r#"[{"allow": {}}]"#), Resource::HttpPath).unwrap();
    let d = http.evaluate(
        &dev,
        &Action::Publish {
            topic: "a",
            qos: 0,
            retain: false,
        },
    );
    assert_eq!(d.reason, Reason::OtherKind);
    assert!(!d.allowed());
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

/// Per-user rules (mosquitto's `user` sections) and MQTT QoS and retain
/// limits.
#[test]
fn users_qos_and_retain_conditions() {
    let acl = r##"[
        {"deny": {"actions": ["publish"], "retain": true, "topics": ["#"]}},
        {"allow": {"users": ["alice"], "topics": ["shared/#"], "max_qos": 1}},
        {"allow": {"topics": ["%u/#"]}}
    ]"##;
    let policy = Policy::compile(&rules(acl), Resource::Topic).unwrap();
    let alice = jwt("alice", &[], &[], json!({}));
    let bob = jwt("bob", &[], &[], json!({}));
    let publish = |who: &Identity, topic, qos, retain| {
        policy
            .evaluate(who, &Action::Publish { topic, qos, retain })
            .allowed()
    };
    let subscribe = |who: &Identity, filter, qos| {
        policy
            .evaluate(who, &Action::Subscribe { filter, qos })
            .allowed()
    };
    assert!(publish(&alice, "shared/x", 1, false));
    assert!(!publish(&alice, "shared/x", 2, false), "above max_qos");
    assert!(
        !publish(&alice, "shared/x", 0, true),
        "retained: denied first"
    );
    assert!(!publish(&alice, "alice/x", 0, true), "retained anywhere");
    assert!(publish(&alice, "alice/x", 2, false));
    assert!(!publish(&bob, "shared/x", 0, false), "alice's rule only");
    assert!(subscribe(&alice, "shared/#", 1));
    assert!(!subscribe(&alice, "shared/#", 2));
    assert!(subscribe(&bob, "bob/#", 2));
    assert!(Policy::compile(&rules(r#"[{"allow": {"max_qos": 3}}]"#), Resource::Topic).is_err());
}

/// A deny rule reaches every subscription that could match what it denies:
/// a wildcard never receives a denied topic through a later, wider allow.
#[test]
fn deny_rules_stop_filters_that_reach_them() {
    let acl = r##"[
        {"deny": {"actions": ["subscribe", "publish"], "topics": ["secret/#", "%u/private"]}},
        {"allow": {"topics": ["#"]}}
    ]"##;
    let policy = Policy::compile(&rules(acl), Resource::Topic).unwrap();
    let d1 = jwt("d1", &[], &[], json!({}));
    let may = |filter| {
        policy
            .evaluate(&d1, &Action::Subscribe { filter, qos: 0 })
            .allowed()
    };
    for (filter, allowed) in [
        ("#", false),
        ("+/x", false),
        ("secret/x", false),
        ("secret", false),
        ("+/+", false),
        ("d1/+", false),
        ("d1/private", false),
        ("d2/private", true),
        ("public/#", true),
        ("+", false), // `secret/#` names `secret` too
        ("x/+/+", true),
        ("a/b/c", true),
    ] {
        assert_eq!(may(filter), allowed, "{filter}");
    }
    let publish = |topic| {
        policy
            .evaluate(
                &d1,
                &Action::Publish {
                    topic,
                    qos: 0,
                    retain: false,
                },
            )
            .allowed()
    };
    assert!(!publish("secret/x") && publish("public/x"));
}

/// Conditions an action does not carry: an allow rule's hold, a deny
/// rule's do not (a `retain` deny stops retained publishes, not
/// subscriptions); `#` never reaches a denied `$` topic.
#[test]
fn deny_conditions_apply_only_where_they_can() {
    let acl = r##"[
        {"deny": {"retain": true, "topics": ["#"]}},
        {"deny": {"topics": ["$SYS/#"]}},
        {"allow": {"topics": ["#"]}}
    ]"##;
    let policy = Policy::compile(&rules(acl), Resource::Topic).unwrap();
    let who = jwt("d1", &[], &[], json!({}));
    let sub = |filter| {
        policy
            .evaluate(&who, &Action::Subscribe { filter, qos: 0 })
            .allowed()
    };
    let publish = |retain| {
        policy
            .evaluate(
                &who,
                &Action::Publish {
                    topic: "a/b",
                    qos: 0,
                    retain,
                },
            )
            .allowed()
    };
    assert!(
        sub("#"),
        "neither the retain deny nor the $SYS deny reaches `#`"
    );
    assert!(sub("a/+"));
    assert!(!sub("$SYS/broker/uptime"));
    assert!(publish(false));
    assert!(!publish(true));
}

/// WAMP deny rules reach every prefix and wildcard that can name what they
/// deny, and only those.
#[test]
fn wamp_deny_rules_reach_patterns() {
    let acl = r#"[
        {"deny": {"uris": ["com.app.secret.**"]}},
        {"allow": {"uris": ["com.app.**"]}}
    ]"#;
    let policy = Policy::compile(&rules(acl), Resource::Uri).unwrap();
    let who = jwt("alice", &[], &[], json!({}));
    use MatchPolicy::{Exact, Prefix, Wildcard};
    for (uri, how, allowed) in [
        ("com.app.a", Prefix, true),
        ("com.app.a.", Prefix, true),
        ("com.app.sec", Prefix, false),
        ("com.app.", Prefix, false),
        ("com.app.secret.x", Exact, false),
        ("com.app..x", Wildcard, false),
        ("com.app.w..x", Wildcard, true),
    ] {
        let d = policy.evaluate(
            &who,
            &Action::Wamp {
                verb: WampVerb::Subscribe,
                realm: "realm1",
                uri,
                policy: how,
            },
        );
        assert_eq!(d.allowed(), allowed, "{uri} {how:?}: {d}");
    }
}
