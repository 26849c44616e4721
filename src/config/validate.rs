//! Semantic checks that serde cannot express. All problems are collected, each
//! with the key path it concerns, so one `check-config` run shows them all.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::schema::{
    AuthConfig, AuthRequirement, ClientAuth, Config, EtcdTls, Limits, OAuthConfig, Protocol,
    ProviderConfig, RouteConfig, TokenSource, UpstreamConfig, UpstreamProtocol,
};
use super::{ConfigError, TargetUrl};
use crate::authz::{Policy, Resource};

struct Errors(Vec<ConfigError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn nonzero(&mut self, path: impl Into<String>, d: Duration) {
        if d.is_zero() {
            self.add(path, "must be greater than zero (e.g. `5s`)");
        }
    }
}

pub fn validate(cfg: &Config) -> Vec<ConfigError> {
    let mut errs = Errors(Vec::new());
    listeners(cfg, &mut errs);
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut matches: Vec<(usize, MatchKey)> = Vec::new();
    for (i, route) in cfg.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if let Some(first) = names.insert(route.name.as_str(), i) {
            errs.add(
                format!("{path}.name"),
                format!(
                    "duplicate route name `{}` (also routes[{first}])",
                    route.name
                ),
            );
        }
        self::route(&path, route, &mut errs);
        route_auth(&path, route, &cfg.auth, &mut errs);
        for key in MatchKey::of(route) {
            if let Some((j, _)) = matches.iter().find(|(j, k)| *k == key && *j != i) {
                errs.add(
                    format!("{path}.match"),
                    format!(
                        "matches exactly the same requests as routes[{j}] (`{}`); one of them could never be chosen",
                        cfg.routes[*j].name
                    ),
                );
            }
            matches.push((i, key));
        }
    }
    if cfg.runtime.workers > 1024 {
        errs.add(
            "runtime.workers",
            "must be at most 1024 (0 means one per CPU)",
        );
    }
    auth(&cfg.auth, &mut errs);
    admin(cfg, &mut errs);
    if let Some(o) = &cfg.oauth {
        oauth(cfg, o, &mut errs);
    }
    mqtt(cfg, &mut errs);
    wamp(cfg, &mut errs);
    tunnels(cfg, &mut errs);
    store(cfg, &mut errs);
    bus(cfg, &mut errs);
    errs.nonzero("proxy.connect_timeout", cfg.proxy.connect_timeout);
    errs.nonzero("proxy.pool_idle_timeout", cfg.proxy.pool_idle_timeout);
    errs.0
}

/// `store`: the embedded file or etcd, not both; etcd only in a build with
/// cluster support.
fn store(cfg: &Config, errs: &mut Errors) {
    let Some(etcd) = &cfg.store.etcd else {
        return;
    };
    if !cfg!(feature = "cluster") {
        errs.add(
            "store.etcd",
            "this build has no cluster support (build with --features cluster)",
        );
        return;
    }
    if cfg.store.path_given {
        errs.add(
            "store.path",
            "give either `store.path` (the embedded store) or `store.etcd`, not both",
        );
    }
    if etcd.endpoints.is_empty() {
        errs.add(
            "store.etcd.endpoints",
            "must name at least one etcd endpoint (e.g. `http://127.0.0.1:2379`)",
        );
    }
    for (i, e) in etcd.endpoints.iter().enumerate() {
        let at = format!("store.etcd.endpoints[{i}]");
        let tls = e.starts_with("https://");
        if !tls && !e.starts_with("http://") {
            errs.add(at, format!("`{e}` must start with `http://` or `https://`"));
        } else if e.parse::<http::Uri>().map_or(true, |u| {
            u.host().is_none() || u.authority().is_some_and(|a| a.as_str().contains('@'))
        }) {
            // (A user and password in the URL would end up in every
            // store error message.)
            errs.add(
                at,
                "is not a URL like `http://host:2379` (no user or password in it)",
            );
        } else if tls && etcd.tls.is_none() {
            errs.add(
                at,
                "an `https://` endpoint needs `store.etcd.tls.ca` (the CA etcd's certificate chains to)",
            );
        } else if !tls && etcd.tls.is_some() {
            errs.add(
                at,
                "with `store.etcd.tls` every endpoint must be `https://`",
            );
        }
    }
    if !etcd.prefix.ends_with('/') {
        errs.add(
            "store.etcd.prefix",
            format!("`{}` must end with `/` (e.g. `/tollgate/`)", etcd.prefix),
        );
    }
    client_tls("store.etcd.tls", etcd.tls.as_ref(), errs);
    errs.nonzero("store.etcd.timeout", etcd.timeout);
}

/// A client TLS block (`store.etcd.tls`, `bus.nats.tls`).
fn client_tls(at: &str, tls: Option<&EtcdTls>, errs: &mut Errors) {
    if tls.is_some_and(|t| t.cert.is_some() != t.key.is_some()) {
        errs.add(
            at,
            "`cert` and `key` go together (a client certificate and its key)",
        );
    }
}

/// `bus.nats`: only in a build with cluster support; servers without
/// secrets in them; a prefix that is NATS subject tokens.
fn bus(cfg: &Config, errs: &mut Errors) {
    let Some(nats) = &cfg.bus.nats else {
        return;
    };
    if !cfg!(feature = "cluster") {
        errs.add(
            "bus.nats",
            "this build has no cluster support (build with --features cluster)",
        );
        return;
    }
    if nats.servers.is_empty() {
        errs.add(
            "bus.nats.servers",
            "must name at least one NATS server (e.g. `nats://127.0.0.1:4222`)",
        );
    }
    for (i, server) in nats.servers.iter().enumerate() {
        let at = format!("bus.nats.servers[{i}]");
        let tls = server.starts_with("tls://");
        if !tls && !server.starts_with("nats://") {
            errs.add(
                at,
                format!("`{server}` must start with `nats://` or `tls://`"),
            );
        } else if server.parse::<http::Uri>().map_or(true, |u| {
            u.host().is_none()
                || u.authority().is_some_and(|a| a.as_str().contains('@'))
                || !matches!(u.path(), "" | "/")
                || u.query().is_some()
        }) {
            // (Credentials in the URL would end up in every bus error
            // message: `token_file` and `credentials` take them.)
            errs.add(
                at,
                "is not a URL like `nats://host:4222` (no user, password or token in it)",
            );
        } else if tls && nats.tls.is_none() {
            errs.add(
                at,
                "a `tls://` server needs `bus.nats.tls.ca` (the CA NATS's certificate chains to)",
            );
        }
    }
    if !crate::config::valid_subject_prefix(&nats.prefix) {
        errs.add(
            "bus.nats.prefix",
            format!(
                "`{}` must be dot-separated tokens of letters, digits, `-` and `_` (e.g. `tollgate`)",
                nats.prefix
            ),
        );
    }
    client_tls("bus.nats.tls", nats.tls.as_ref(), errs);
    if nats.token_file.is_some() && nats.credentials.is_some() {
        errs.add(
            "bus.nats.token_file",
            "give either `token_file` or `credentials`, not both",
        );
    }
    errs.nonzero("bus.nats.connect_timeout", nats.connect_timeout);
    for (key, n) in [
        ("bus.nats.send_queue", nats.send_queue),
        ("bus.nats.receive_queue", nats.receive_queue),
    ] {
        if n == 0 || n > 1_000_000 {
            errs.add(key, "must be between 1 and 1000000 messages");
        }
    }
}

fn listeners(cfg: &Config, errs: &mut Errors) {
    if cfg.listeners.is_empty() {
        errs.add("listeners", "at least one listener is required");
    }
    let mut binds: Vec<(String, SocketAddr)> = vec![("admin.bind".into(), cfg.admin.bind)];
    let mut names = HashMap::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        if l.name.is_empty() {
            errs.add(format!("{path}.name"), "must not be empty");
        } else if let Some(first) = names.insert(l.name.as_str(), i) {
            errs.add(
                format!("{path}.name"),
                format!(
                    "duplicate listener name `{}` (also listeners[{first}])",
                    l.name
                ),
            );
        }
        for (other, addr) in &binds {
            if overlaps(*addr, l.bind) {
                errs.add(
                    format!("{path}.bind"),
                    format!("{} overlaps {other} ({addr})", l.bind),
                );
            }
        }
        binds.push((format!("{path}.bind"), l.bind));
        limits(&format!("{path}.limits"), &l.limits, errs);
        match (l.protocol, &l.tls) {
            (Protocol::Https, None) => errs.add(
                format!("{path}.tls"),
                "protocol https needs `tls` with at least `cert` and `key`",
            ),
            (Protocol::Http, Some(_)) => errs.add(
                format!("{path}.protocol"),
                "`tls` is set but the protocol is http; use `protocol: https`",
            ),
            _ => {}
        }
        if let Some(tls) = &l.tls
            && tls.client_auth == Some(ClientAuth::None)
            && !tls.client_ca.is_empty()
        {
            errs.add(
                format!("{path}.tls.client_ca"),
                "is set but client_auth is none; use client_auth: optional or required, or remove client_ca",
            );
        }
    }
}

fn mqtt(cfg: &Config, errs: &mut Errors) {
    let m = &cfg.mqtt;
    if let Some(ws) = &m.websocket {
        if !ws.path.starts_with('/') {
            errs.add("mqtt.websocket.path", "must start with `/` (e.g. `/mqtt`)");
        }
        for (i, name) in ws.listeners.iter().flatten().enumerate() {
            match cfg.listeners.iter().find(|l| &l.name == name) {
                None => errs.add(
                    format!("mqtt.websocket.listeners[{i}]"),
                    format!("`{name}` is not a listener"),
                ),
                Some(l) if !l.protocol.is_http() => errs.add(
                    format!("mqtt.websocket.listeners[{i}]"),
                    format!("`{name}` is not an http or https listener"),
                ),
                Some(_) => {}
            }
        }
    }
    if let Some(names) = m.auth.jwt.as_ref().and_then(|j| j.providers.as_ref()) {
        for (i, name) in names.iter().enumerate() {
            if !cfg.auth.providers.iter().any(|p| &p.name == name) {
                errs.add(
                    format!("mqtt.auth.jwt.providers[{i}]"),
                    format!("`{name}` is not a provider under auth.providers"),
                );
            }
        }
    }
    if m.auth.jwt.is_some() && cfg.auth.providers.is_empty() {
        errs.add("mqtt.auth.jwt", "needs a provider under auth.providers");
    }
    if let Some(rules) = &m.policy
        && let Err(problems) = crate::authz::Policy::compile(rules, crate::authz::Resource::Topic)
    {
        for (at, message) in problems {
            errs.add(format!("mqtt.policy{at}"), message);
        }
    }
    let l = &m.limits;
    let packet = l.max_packet_size.0;
    if !(64..=256 * 1024 * 1024).contains(&packet) {
        errs.add(
            "mqtt.limits.max_packet_size",
            "must be between 64B and 256MiB",
        );
    }
    if l.max_inflight == 0 {
        errs.add("mqtt.limits.max_inflight", "must be at least 1");
    }
    if l.max_queued_messages == 0 {
        errs.add("mqtt.limits.max_queued_messages", "must be at least 1");
    }
    errs.nonzero("mqtt.limits.connect_timeout", l.connect_timeout);
    if let Some(r) = &m.registration {
        if !r.path.starts_with('/') {
            errs.add(
                "mqtt.registration.path",
                "must start with `/` (e.g. `/register.json`)",
            );
        }
        if crate::identity::parse_hash(&r.key_sha256).is_none() {
            errs.add(
                "mqtt.registration.key_sha256",
                "must be 64 hex digits (the SHA-256 of the registration key)",
            );
        }
        if r.broker.is_empty() {
            errs.add(
                "mqtt.registration.broker",
                "must say where devices connect (e.g. `mqtts://broker.example.com:8883`)",
            );
        }
        if let Some(ca) = &r.ca {
            let (pem, key) = crate::pki::ca_files(&cfg.resolve(ca));
            for f in [pem, key] {
                if !f.is_file() {
                    errs.add(
                        "mqtt.registration.ca",
                        format!(
                            "{} is missing (a `tollgate pki init-ca` directory is expected)",
                            f.display()
                        ),
                    );
                }
            }
        }
        if r.cert_days == 0 {
            errs.add("mqtt.registration.cert_days", "must be at least 1");
        }
        for (i, name) in r.listeners.iter().flatten().enumerate() {
            if !cfg
                .listeners
                .iter()
                .any(|l| &l.name == name && l.protocol.is_http())
            {
                errs.add(
                    format!("mqtt.registration.listeners[{i}]"),
                    format!("`{name}` is not an http or https listener"),
                );
            }
        }
    }
}

fn tunnels(cfg: &Config, errs: &mut Errors) {
    for (i, t) in cfg.tunnels.iter().enumerate() {
        let at = format!("tunnels[{i}]");
        if !t.prefix.starts_with('/')
            || !t.prefix.ends_with('/')
            || t.prefix.contains(['?', '#', '%'])
        {
            errs.add(
                format!("{at}.prefix"),
                format!("`{}` must be a path that starts and ends with `/` (e.g. `/micronets/v1/ws-proxy/`)", t.prefix),
            );
        }
        for (j, other) in cfg.tunnels.iter().enumerate().take(i) {
            if t.prefix.starts_with(&other.prefix) || other.prefix.starts_with(&t.prefix) {
                errs.add(
                    format!("{at}.prefix"),
                    format!(
                        "overlaps tunnels[{j}]'s `{}`: a path must name one tunnel",
                        other.prefix
                    ),
                );
            }
        }
        match &t.listeners {
            Some(names) => {
                for (j, name) in names.iter().enumerate() {
                    if !cfg.listeners.iter().any(|l| &l.name == name && l.protocol.is_http() && l.asks_for_certs()) {
                        errs.add(
                            format!("{at}.listeners[{j}]"),
                            format!("`{name}` is not an https listener that asks for client certificates (`tls.client_ca`)"),
                        );
                    }
                }
            }
            None if cfg.cert_listeners().is_empty() => errs.add(
                format!("{at}.listeners"),
                "no listener can serve it: a tunnel needs an https listener that asks for client certificates (`tls.client_ca`)",
            ),
            None => {}
        }
        if !(1..=1024).contains(&t.max_peers) {
            errs.add(format!("{at}.max_peers"), "must be between 1 and 1024");
        }
        let max = t.max_message.0;
        if !(1024..=64 * 1024 * 1024).contains(&max) {
            errs.add(
                format!("{at}.max_message"),
                "must be between 1KiB and 64MiB",
            );
        }
        if t.queue.0 < 1024 || t.queue.0 > 1024 * 1024 * 1024 {
            errs.add(format!("{at}.queue"), "must be between 1KiB and 1GiB");
        }
        errs.nonzero(format!("{at}.stall_timeout"), t.stall_timeout);
        errs.nonzero(format!("{at}.idle_timeout"), t.idle_timeout);
        if t.idle_timeout <= t.stall_timeout {
            // A sender waiting on a slow peer reads nothing meanwhile.
            errs.add(
                format!("{at}.idle_timeout"),
                format!("must be longer than stall_timeout ({:?})", t.stall_timeout),
            );
        }
        if t.ping_interval < std::time::Duration::from_secs(1) {
            errs.add(format!("{at}.ping_interval"), "must be at least 1s");
        }
        if t.max_pending_requests == 0 {
            errs.add(format!("{at}.max_pending_requests"), "must be at least 1");
        }
        if let Some(rules) = &t.policy
            && let Err(problems) =
                crate::authz::Policy::compile(rules, crate::authz::Resource::Name)
        {
            for (p, m) in problems {
                errs.add(format!("{at}.policy{p}"), m);
            }
        }
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        let Some(target) = &r.upstream.tunnel else {
            continue;
        };
        let at = format!("routes[{i}].upstream.tunnel");
        let served = match target.strip_prefix('/') {
            Some(_) => cfg.tunnels.iter().any(|t| {
                target
                    .strip_prefix(t.prefix.as_str())
                    .is_some_and(super::is_tunnel_id)
            }),
            None => super::is_tunnel_id(target) && !cfg.tunnels.is_empty(),
        };
        if !served {
            errs.add(
                at,
                format!("`{target}` names no tunnel: expected an id (1 to 128 of A-Z a-z 0-9 . _ : -) of the first `tunnels:` entry, or `<prefix><id>` of one"),
            );
        }
    }
}

fn wamp(cfg: &Config, errs: &mut Errors) {
    let w = &cfg.wamp;
    let serves = w.websocket.is_some()
        || cfg
            .listeners
            .iter()
            .any(|l| l.protocol == crate::config::Protocol::Wamp);
    if let Some(ws) = &w.websocket {
        if !ws.path.starts_with('/') {
            errs.add("wamp.websocket.path", "must start with `/` (e.g. `/ws`)");
        }
        for (i, name) in ws.listeners.iter().flatten().enumerate() {
            if !cfg
                .listeners
                .iter()
                .any(|l| &l.name == name && l.protocol.is_http())
            {
                errs.add(
                    format!("wamp.websocket.listeners[{i}]"),
                    format!("`{name}` is not an http or https listener"),
                );
            }
        }
    }
    if serves && w.realms.is_empty() {
        errs.add("wamp.realms", "the router needs at least one realm");
    }
    let mut seen = std::collections::HashSet::new();
    for (i, realm) in w.realms.iter().enumerate() {
        let at = format!("wamp.realms[{i}]");
        if !is_uri(&realm.name) {
            errs.add(format!("{at}.name"), "must be a URI (`com.example.realm`)");
        }
        if !seen.insert(&realm.name) {
            errs.add(
                format!("{at}.name"),
                format!("realm `{}` is listed twice", realm.name),
            );
        }
        let mut roles = std::collections::HashSet::new();
        for (j, role) in realm.roles.iter().enumerate() {
            let at = format!("{at}.roles[{j}]");
            if role.name.is_empty() || !roles.insert(&role.name) {
                errs.add(
                    format!("{at}.name"),
                    "must be a name not used by another role of the realm",
                );
            }
            match &role.authorizer {
                Some(a) if !role.permissions.is_empty() => errs.add(
                    format!("{at}.authorizer"),
                    format!("`{a}` decides everything for the role: give `permissions` or `authorizer`, not both"),
                ),
                Some(a) if !is_uri(a) => errs.add(format!("{at}.authorizer"), "must be a procedure URI"),
                _ => {}
            }
        }
    }
    let realm_names: Vec<&str> = w.realms.iter().map(|r| r.name.as_str()).collect();
    wamp_auth("wamp.auth", &w.auth, &realm_names, cfg, errs);
    for (name, l) in &w.listeners {
        let at = format!("wamp.listeners.{name}");
        let serving = cfg.listeners.iter().any(|x| {
            &x.name == name
                && (x.protocol == crate::config::Protocol::Wamp
                    || (x.protocol.is_http() && w.websocket.is_some()))
        });
        if !serving {
            errs.add(
                at.clone(),
                format!("no listener `{name}` serves WAMP (`protocol: wamp`, or an HTTP listener with `wamp.websocket`)"),
            );
        }
        wamp_auth(&format!("{at}.auth"), &l.auth, &realm_names, cfg, errs);
    }
    if w.max_queued_messages == 0 {
        errs.add("wamp.max_queued_messages", "must be at least 1");
    }
    if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&w.auth_timeout) {
        errs.add("wamp.auth_timeout", "must be between 100ms and 5m");
    }
    for (key, n) in [
        ("max_pending_calls", w.max_pending_calls),
        ("max_subscriptions", w.max_subscriptions),
        ("max_registrations", w.max_registrations),
    ] {
        if n == 0 {
            errs.add(format!("wamp.{key}"), "must be at least 1");
        }
    }
    // A HELLO takes about 1 KiB; RawSocket cannot announce 16 MiB or more.
    let size = w.max_message_size.as_usize();
    if !(4096..1 << 24).contains(&size) {
        errs.add(
            "wamp.max_message_size",
            "must be at least 4KiB and below 16MiB",
        );
    }
    for (i, realm) in w.realms.iter().enumerate() {
        for (j, role) in realm.roles.iter().enumerate() {
            if let Err(problems) = role.policy(&format!("wamp.realms[{i}].roles[{j}]")) {
                for (path, message) in problems {
                    errs.add(path, message);
                }
            }
        }
    }
}

/// A WAMP URI: dot-separated, no empty component, no whitespace.
fn is_uri(s: &str) -> bool {
    !s.is_empty() && !s.split('.').any(str::is_empty) && !s.contains(char::is_whitespace)
}

/// One listener's (or the default) WAMP authentication methods.
fn wamp_auth(
    at: &str,
    a: &crate::config::WampAuth,
    realms: &[&str],
    cfg: &Config,
    errs: &mut Errors,
) {
    use crate::config::AuthType;
    let methods = [
        ("anonymous", &a.anonymous),
        ("ticket", &a.ticket),
        ("wampcra", &a.wampcra),
        ("cryptosign", &a.cryptosign),
        ("tls", &a.tls),
    ];
    for (name, m) in methods {
        let Some(m) = m else { continue };
        let at = format!("{at}.{name}");
        match m.kind {
            AuthType::Dynamic => {
                if !m.authenticator.as_deref().is_some_and(is_uri) {
                    errs.add(
                        format!("{at}.authenticator"),
                        "a dynamic method needs the authenticator procedure's URI",
                    );
                }
                // Never the realm a client names: whoever may register the
                // procedure there would authenticate everyone.
                match &m.authenticator_realm {
                    None => errs.add(
                        format!("{at}.authenticator_realm"),
                        "name the realm the authenticator is registered on (`authenticator-realm`)",
                    ),
                    Some(r) if !realms.contains(&r.as_str()) => errs.add(
                        format!("{at}.authenticator_realm"),
                        format!("no realm `{r}` in wamp.realms"),
                    ),
                    Some(_) => {}
                }
                if !m.principals.is_empty() {
                    errs.add(
                        format!("{at}.principals"),
                        "a dynamic method asks its authenticator, not principals",
                    );
                }
            }
            AuthType::Static => {
                if m.authenticator.is_some() || m.authenticator_realm.is_some() {
                    errs.add(
                        format!("{at}.type"),
                        "an authenticator needs `type: dynamic`",
                    );
                }
                if matches!(name, "wampcra" | "cryptosign" | "tls") && m.principals.is_empty() {
                    errs.add(
                        format!("{at}.principals"),
                        "static authentication needs at least one principal",
                    );
                }
                if matches!(name, "anonymous" | "ticket") && !m.principals.is_empty() {
                    errs.add(format!("{at}.principals"), format!("{name} takes no principals (ticket users are `auth.users` and the store's)"));
                }
            }
        }
        if m.jwt && name != "ticket" {
            errs.add(format!("{at}.jwt"), "only a ticket can be a JWT");
        }
        if m.jwt && cfg.auth.providers.is_empty() {
            errs.add(
                format!("{at}.jwt"),
                "no JWT providers configured (auth.providers)",
            );
        }
        for (id, p) in &m.principals {
            let at = format!("{at}.principals.{id}");
            if p.role.is_empty() {
                errs.add(format!("{at}.role"), "every principal needs a role");
            }
            if let Some(r) = &p.realm
                && !realms.contains(&r.as_str())
            {
                errs.add(
                    format!("{at}.realm"),
                    format!("no realm `{r}` in wamp.realms"),
                );
            }
            match name {
                "tls" => {
                    if let Some(f) = &p.certificate_sha1
                        && f.chars().filter(char::is_ascii_hexdigit).count() != 40
                    {
                        errs.add(
                            format!("{at}.certificate-sha1"),
                            "expected 20 bytes in hex (`AB:CD:...`)",
                        );
                    }
                    if p.certificate_sha1.is_none() && p.cn.is_none() {
                        errs.add(
                            at.clone(),
                            "a tls principal needs `certificate-sha1` or `cn`",
                        );
                    }
                }
                "cryptosign" => {
                    if p.authorized_keys.is_empty() {
                        errs.add(
                            format!("{at}.authorized_keys"),
                            "expected at least one Ed25519 public key",
                        );
                    }
                    for (k, key) in p.authorized_keys.iter().enumerate() {
                        if key.len() != 64 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
                            errs.add(
                                format!("{at}.authorized_keys[{k}]"),
                                "expected 32 bytes in hex",
                            );
                        }
                    }
                }
                "wampcra" => {
                    if p.secret.as_deref().is_none_or(str::is_empty) {
                        errs.add(
                            format!("{at}.secret"),
                            "a wampcra principal needs its secret",
                        );
                    }
                    if p.iterations == Some(0) || p.keylen.is_some_and(|k| k == 0 || k > 1024) {
                        errs.add(
                            format!("{at}.keylen"),
                            "iterations and keylen must be at least 1 (keylen at most 1024)",
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

/// Two binds collide when they share a port (non-zero) and one address covers the other.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn limits(path: &str, l: &Limits, errs: &mut Errors) {
    if l.max_connections == 0 {
        errs.add(format!("{path}.max_connections"), "must be at least 1");
    }
    if l.max_header_bytes.0 < 1024 {
        errs.add(format!("{path}.max_header_bytes"), "must be at least 1KiB");
    }
    if l.max_headers == 0 {
        errs.add(format!("{path}.max_headers"), "must be at least 1");
    }
    if l.max_uri_bytes.0 < 64 {
        errs.add(format!("{path}.max_uri_bytes"), "must be at least 64 bytes");
    }
    if l.max_concurrent_streams == 0 {
        errs.add(
            format!("{path}.max_concurrent_streams"),
            "must be at least 1",
        );
    }
    errs.nonzero(format!("{path}.header_read_timeout"), l.header_read_timeout);
    errs.nonzero(format!("{path}.idle_timeout"), l.idle_timeout);
}

fn route(path: &str, r: &RouteConfig, errs: &mut Errors) {
    if r.name.is_empty()
        || !r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        errs.add(
            format!("{path}.name"),
            format!(
                "`{}` is not a valid route name; expected letters, digits, `-`, `_` or `.`",
                r.name
            ),
        );
    }
    let m = &r.matcher;
    if m.path_prefix.values().is_empty() {
        errs.add(
            format!("{path}.match.path_prefix"),
            "at least one prefix is required",
        );
    }
    for prefix in m.path_prefix.values() {
        if !prefix.starts_with('/') || prefix.contains(['?', '#']) {
            errs.add(
                format!("{path}.match.path_prefix"),
                format!("`{prefix}` must be a path starting with `/` (no query)"),
            );
        }
    }
    for host in m.host.iter().flat_map(|h| h.values()) {
        let name = host.strip_prefix("*.").unwrap_or(host);
        let valid = !name.is_empty()
            && !name.contains('*')
            && name.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']')
            });
        if !valid {
            errs.add(
                format!("{path}.match.host"),
                format!("`{host}` is not a host name; expected `api.internal` or `*.internal`"),
            );
        }
    }
    if let Some(methods) = &m.methods {
        if methods.is_empty() {
            errs.add(
                format!("{path}.match.methods"),
                "is empty; leave it out to match every method",
            );
        }
        for (j, method) in methods.iter().enumerate() {
            if Method::from_bytes(method.to_ascii_uppercase().as_bytes()).is_err() {
                errs.add(
                    format!("{path}.match.methods[{j}]"),
                    format!("`{method}` is not an HTTP method"),
                );
            }
        }
    }
    for (name, value) in &m.headers {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            errs.add(
                format!("{path}.match.headers.{name}"),
                "is not a valid header name",
            );
        }
        if HeaderValue::from_str(value).is_err() {
            errs.add(
                format!("{path}.match.headers.{name}"),
                "value is not a valid header value",
            );
        }
    }
    if let Some(rewrite) = &r.rewrite_prefix {
        if !rewrite.starts_with('/') || rewrite.contains(['?', '#']) {
            errs.add(
                format!("{path}.rewrite_prefix"),
                format!("`{rewrite}` must be a path starting with `/`"),
            );
        }
        if r.strip_prefix {
            errs.add(
                format!("{path}.rewrite_prefix"),
                "cannot be combined with strip_prefix: true (strip is rewrite_prefix: /)",
            );
        }
    }
    upstream(&format!("{path}.upstream"), &r.upstream, errs);
}

fn upstream(path: &str, u: &UpstreamConfig, errs: &mut Errors) {
    if u.tunnel.is_some() {
        // Carried over a tunnel: none of a pool's settings apply (the
        // tunnel's target is checked with the tunnels).
        for (set, key) in [
            (!u.targets.is_empty(), "targets"),
            (u.tls.is_some(), "tls"),
            (u.health_check.is_some(), "health_check"),
        ] {
            if set {
                errs.add(
                    format!("{path}.{key}"),
                    "does not apply to a `tunnel` upstream (its peers answer)",
                );
            }
        }
        errs.nonzero(format!("{path}.timeout"), u.timeout);
        return;
    }
    if u.targets.is_empty() {
        errs.add(format!("{path}.targets"), "at least one target is required");
    }
    let mut schemes = BTreeSet::new();
    for (i, t) in u.targets.iter().enumerate() {
        match TargetUrl::parse(t) {
            Ok(t) => {
                schemes.insert(t.tls);
            }
            Err(e) => errs.add(format!("{path}.targets[{i}]"), e),
        }
    }
    let tls = match (schemes.contains(&false), schemes.contains(&true)) {
        (true, true) => {
            errs.add(
                format!("{path}.targets"),
                "mixes http:// and https:// targets; one upstream speaks one of them",
            );
            None
        }
        (_, tls) => Some(tls),
    };
    if tls == Some(false) && u.tls.is_some() {
        errs.add(
            format!("{path}.tls"),
            "is set but every target is http://; use https:// targets",
        );
    }
    match (u.protocol, tls) {
        (UpstreamProtocol::H2, Some(false)) => errs.add(
            format!("{path}.protocol"),
            "h2 is HTTP/2 over TLS and needs https:// targets; use h2c for cleartext HTTP/2",
        ),
        (UpstreamProtocol::H2c, Some(true)) => errs.add(
            format!("{path}.protocol"),
            "h2c is cleartext HTTP/2; use h2 with https:// targets",
        ),
        _ => {}
    }
    errs.nonzero(format!("{path}.timeout"), u.timeout);
    errs.nonzero(format!("{path}.read_timeout"), u.read_timeout);
    errs.nonzero(format!("{path}.dns_refresh"), u.dns_refresh);
    if u.retries > 10 {
        errs.add(format!("{path}.retries"), "must be at most 10");
    }
    for (i, s) in u.retry_on_status.iter().enumerate() {
        if !(100..=599).contains(s) {
            errs.add(
                format!("{path}.retry_on_status[{i}]"),
                format!("{s} is not an HTTP status"),
            );
        }
    }
    let b = &u.retry_budget;
    if !(0.0..=1.0).contains(&b.ratio) {
        errs.add(
            format!("{path}.retry_budget.ratio"),
            "must be between 0.0 and 1.0",
        );
    }
    if let Some(hc) = &u.health_check {
        let hp = format!("{path}.health_check");
        if !hc.path.starts_with('/') {
            errs.add(format!("{hp}.path"), "must start with `/`");
        }
        errs.nonzero(format!("{hp}.interval"), hc.interval);
        errs.nonzero(format!("{hp}.timeout"), hc.timeout);
        if hc.healthy_threshold == 0 {
            errs.add(format!("{hp}.healthy_threshold"), "must be at least 1");
        }
        if hc.unhealthy_threshold == 0 {
            errs.add(format!("{hp}.unhealthy_threshold"), "must be at least 1");
        }
    }
    if u.passive_health.consecutive_failures > 0 {
        errs.nonzero(
            format!("{path}.passive_health.ejection_time"),
            u.passive_health.ejection_time,
        );
        errs.nonzero(
            format!("{path}.passive_health.trial_interval"),
            u.passive_health.trial_interval,
        );
    }
    if u.passive_health.max_ejected_percent > 100 {
        errs.add(
            format!("{path}.passive_health.max_ejected_percent"),
            format!(
                "{} is not a percentage; expected 0 to 100",
                u.passive_health.max_ejected_percent
            ),
        );
    }
    for (i, status) in u.passive_health.failure_statuses.iter().enumerate() {
        if !(100..=599).contains(status) {
            errs.add(
                format!("{path}.passive_health.failure_statuses[{i}]"),
                format!("{status} is not an HTTP status; expected 100 to 599"),
            );
        }
    }
}

fn admin(cfg: &Config, errs: &mut Errors) {
    let a = &cfg.admin;
    if !a.bind.ip().is_loopback() && !a.authenticated() {
        errs.add(
            "admin.bind",
            format!(
                "{} is not a loopback address and the admin API has no authentication; set admin.token_sha256 or admin.policy (or bind 127.0.0.1)",
                a.bind
            ),
        );
    }
    if let Some(h) = &a.token_sha256
        && crate::identity::parse_hash(h).is_none()
    {
        errs.add(
            "admin.token_sha256",
            "expected 64 hex characters: the SHA-256 of the admin token",
        );
    }
    for (i, name) in a.providers.iter().flatten().enumerate() {
        if !cfg.auth.providers.iter().any(|p| &p.name == name) {
            errs.add(
                format!("admin.providers[{i}]"),
                format!("`{name}` is not a provider under auth.providers"),
            );
        }
    }
    if let Some(rules) = &a.policy
        && let Err(problems) = Policy::compile(rules, Resource::HttpPath)
    {
        for (path, message) in problems {
            errs.add(format!("admin.policy{path}"), message);
        }
    }
    if a.providers.is_some() && a.policy.is_none() {
        errs.add(
            "admin.policy",
            "admin.providers is set but no policy says which tokens may use the admin API",
        );
    }
}

fn oauth(cfg: &Config, o: &OAuthConfig, errs: &mut Errors) {
    if o.issuer.trim().is_empty() {
        errs.add(
            "oauth.issuer",
            "must not be empty (e.g. `http://localhost:8082`)",
        );
    }
    errs.nonzero("oauth.token_ttl", o.token_ttl);
    if let Some(every) = o.key_rotation {
        let longest = o
            .clients
            .iter()
            .filter_map(|c| c.token_ttl)
            .chain([o.token_ttl])
            .max()
            .unwrap_or(o.token_ttl);
        if every < longest * 2 {
            errs.add(
                "oauth.key_rotation",
                format!(
                    "{} is shorter than twice the longest token lifetime ({}); keys would pile up",
                    humantime::format_duration(every),
                    humantime::format_duration(longest)
                ),
            );
        }
        if !o.signing_keys.is_empty() {
            errs.add(
                "oauth.key_rotation",
                "signing_keys are managed outside tollgate; rotate by replacing the files",
            );
        }
    }
    if let Some(listeners) = &o.listeners {
        for (i, l) in listeners.iter().enumerate() {
            if !cfg.listeners.iter().any(|x| &x.name == l) {
                errs.add(
                    format!("oauth.listeners[{i}]"),
                    format!("`{l}` is not a listener name"),
                );
            }
        }
    }
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for (i, c) in o.clients.iter().enumerate() {
        let path = format!("oauth.clients[{i}]");
        if c.id.is_empty() || c.id.contains(':') {
            errs.add(format!("{path}.id"), "must be non-empty and without `:`");
        } else if let Some(first) = ids.insert(c.id.as_str(), i) {
            errs.add(
                format!("{path}.id"),
                format!(
                    "duplicate client id `{}` (also oauth.clients[{first}])",
                    c.id
                ),
            );
        }
        if let Some(h) = &c.secret_sha256
            && crate::identity::parse_hash(h).is_none()
        {
            errs.add(
                format!("{path}.secret_sha256"),
                "expected 64 hex characters: the SHA-256 of the secret (e.g. `printf %s \"$SECRET\" | sha256sum`)",
            );
        }
        let methods = usize::from(c.secret_sha256.is_some())
            + usize::from(c.public_key.is_some() || c.jwks_uri.is_some())
            + usize::from(c.tls_client_auth.is_some());
        if methods != 1 {
            errs.add(
                path.clone(),
                "needs exactly one way to authenticate: secret_sha256, public_key or jwks_uri, or tls_client_auth",
            );
        }
        if c.public_key.is_some() && c.jwks_uri.is_some() {
            errs.add(
                format!("{path}.jwks_uri"),
                "give public_key or jwks_uri, not both",
            );
        }
        if let Some(uri) = &c.jwks_uri
            && let Err(e) = crate::identity::jwt::jwks_url(uri)
        {
            errs.add(format!("{path}.jwks_uri"), e);
        }
        if let Some(ttl) = c.token_ttl {
            errs.nonzero(format!("{path}.token_ttl"), ttl);
        }
        for k in c.claims.keys() {
            if crate::identity::jwt::RESERVED_CLAIMS.contains(&k.as_str()) {
                errs.add(
                    format!("{path}.claims.{k}"),
                    "is set by the token server itself",
                );
            }
        }
    }
}

fn auth(a: &AuthConfig, errs: &mut Errors) {
    if a.realm.is_empty() || a.realm.contains(['"', '\\']) || !a.realm.is_ascii() {
        errs.add(
            "auth.realm",
            "must be non-empty ASCII text without quotes or backslashes",
        );
    }
    let mut names = HashMap::new();
    for (i, p) in a.providers.iter().enumerate() {
        let path = format!("auth.providers[{i}]");
        if p.name.is_empty() || p.name.contains(char::is_whitespace) {
            errs.add(
                format!("{path}.name"),
                "must be a non-empty name without spaces",
            );
        } else if let Some(first) = names.insert(p.name.as_str(), i) {
            errs.add(
                format!("{path}.name"),
                format!(
                    "duplicate provider name `{}` (also auth.providers[{first}])",
                    p.name
                ),
            );
        }
        provider(&path, p, errs);
    }
    let mut users = HashMap::new();
    for (i, u) in a.users.iter().enumerate() {
        let path = format!("auth.users[{i}]");
        if let Err(why) = crate::identity::passwords::usable_name(&u.name) {
            errs.add(format!("{path}.name"), why);
        } else if let Some(first) = users.insert(u.name.as_str(), i) {
            errs.add(
                format!("{path}.name"),
                format!("duplicate user `{}` (also auth.users[{first}])", u.name),
            );
        }
        for (j, t) in u.topics.iter().enumerate() {
            if let Err(why) = t.check() {
                errs.add(format!("{path}.topics[{j}].topic"), why);
            }
        }
        if let Err(why) = crate::identity::passwords::usable_hash(&u.password_hash) {
            errs.add(
                format!("{path}.password_hash"),
                format!("{why} (make one with `tollgate users hash`)"),
            );
        }
    }
}

fn provider(path: &str, p: &ProviderConfig, errs: &mut Errors) {
    if p.issuer.is_empty() {
        errs.add(
            format!("{path}.issuer"),
            "must not be empty (the exact `iss` of accepted tokens)",
        );
    }
    if p.audiences.is_empty() || p.audiences.iter().any(String::is_empty) {
        errs.add(
            format!("{path}.audiences"),
            "expected at least one audience: tokens must be meant for this gateway's services",
        );
    }
    if p.leeway > Duration::from_secs(3600) {
        errs.add(format!("{path}.leeway"), "must be at most 1h");
    }
    if p.token_from.is_empty() {
        errs.add(
            format!("{path}.token_from"),
            "expected at least one token source",
        );
    }
    for (j, s) in p.token_from.iter().enumerate() {
        let name = match s {
            TokenSource::Authorization => continue,
            TokenSource::Header(n) | TokenSource::Cookie(n) | TokenSource::Query(n) => n,
        };
        let bad = match s {
            TokenSource::Header(_) => HeaderName::from_bytes(name.as_bytes()).is_err(),
            _ => name.is_empty() || name.contains(['=', ';', '&', ' ']),
        };
        if bad {
            errs.add(
                format!("{path}.token_from[{j}]"),
                format!("`{name}` is not a valid name"),
            );
        }
    }
    if p.max_token_bytes.0 < 256 {
        errs.add(
            format!("{path}.max_token_bytes"),
            "must be at least 256 bytes",
        );
    }
    let j = &p.jwks;
    errs.nonzero(format!("{path}.jwks.timeout"), j.timeout);
    errs.nonzero(format!("{path}.jwks.min_refresh"), j.min_refresh);
    if j.max_refresh < j.min_refresh {
        errs.add(
            format!("{path}.jwks.max_refresh"),
            "must not be shorter than jwks.min_refresh",
        );
    }
    if j.max_bytes.0 < 1024 {
        errs.add(format!("{path}.jwks.max_bytes"), "must be at least 1KiB");
    }
}

fn route_auth(path: &str, r: &RouteConfig, a: &AuthConfig, errs: &mut Errors) {
    let takes_jwt = match &r.auth {
        AuthRequirement::Jwt | AuthRequirement::Any => true,
        AuthRequirement::AnyOf(l) | AuthRequirement::AllOf(l) => {
            if l.is_empty() {
                errs.add(
                    format!("{path}.auth"),
                    "names no credential; expected jwt and/or mtls",
                );
            }
            l.contains(&super::schema::Credential::Jwt)
        }
        AuthRequirement::None | AuthRequirement::Mtls => false,
    };
    if takes_jwt && a.providers.is_empty() {
        errs.add(
            format!("{path}.auth"),
            "accepts JWTs but no provider is configured under auth.providers",
        );
    }
    if let Some(names) = &r.providers {
        if !takes_jwt {
            errs.add(
                format!("{path}.providers"),
                "is only meaningful with auth: jwt (or any)",
            );
        }
        if names.is_empty() {
            errs.add(
                format!("{path}.providers"),
                "is empty; leave it out to accept every provider",
            );
        }
        for (j, n) in names.iter().enumerate() {
            if !a.providers.iter().any(|p| p.name == *n) {
                errs.add(
                    format!("{path}.providers[{j}]"),
                    format!("`{n}` is not a provider under auth.providers"),
                );
            }
        }
    }
    if let Some(rules) = &r.policy
        && let Err(problems) = Policy::compile(rules, Resource::HttpPath)
    {
        for (at, message) in problems {
            errs.add(format!("{path}.policy{at}"), message);
        }
    }
    for name in r.forward_claims.keys() {
        let lower = name.to_ascii_lowercase();
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            errs.add(
                format!("{path}.forward_claims.{name}"),
                "is not a valid header name",
            );
        } else if matches!(
            lower.as_str(),
            "authorization"
                | "host"
                | "connection"
                | "content-length"
                | "transfer-encoding"
                | "cookie"
        ) {
            errs.add(
                format!("{path}.forward_claims.{name}"),
                "cannot carry identity: tollgate or HTTP itself owns this header",
            );
        }
    }
}

/// What a route matches, normalised, to detect routes that shadow each other.
#[derive(PartialEq)]
struct MatchKey {
    host: Option<String>,
    prefix: String,
    methods: Option<BTreeSet<String>>,
    headers: Vec<(String, String)>,
}

impl MatchKey {
    /// One key per host and prefix the route matches.
    fn of(r: &RouteConfig) -> Vec<MatchKey> {
        let m = &r.matcher;
        let hosts = m.hosts();
        let methods: Option<BTreeSet<String>> = m
            .methods
            .as_ref()
            .map(|ms| ms.iter().map(|s| s.to_ascii_uppercase()).collect());
        let headers: Vec<(String, String)> = m
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        let mut keys = Vec::new();
        for host in &hosts {
            for prefix in m.path_prefix.values() {
                keys.push(MatchKey {
                    host: host.clone(),
                    prefix: super::normalize_prefix(prefix).to_owned(),
                    methods: methods.clone(),
                    headers: headers.clone(),
                });
            }
        }
        keys
    }
}
