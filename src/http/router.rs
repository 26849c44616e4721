//! The route table: compiled from gateway.yaml, ordered once so the first match
//! is the most specific one: exact host before wildcard host before any host,
//! then the longest path prefix, then routes with more method/header conditions.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::auth::RouteAuth;
use super::canonical;
use super::upstream::{UpstreamClients, UpstreamPool};
use super::wire;
use super::xfcc::XfccFields;
use crate::authz::{Policy, Resource};
use crate::config::{self, AuthRequirement, Config, Credential, RouteConfig};
use crate::identity::Providers;
use crate::metrics::{Metrics, RouteMetrics};
use crate::transport::tls::{UpstreamTlsConfigs, UpstreamTlsMaterial};

pub struct Route {
    pub name: Arc<str>,
    /// Normalised path prefixes (what `upstream_path` strips or rewrites).
    prefixes: Vec<String>,
    /// Replacement for the matched prefix: `Some("")` strips it.
    rewrite: Option<String>,
    pub preserve_host: bool,
    /// The route takes paths with an escaped `/` or `\`.
    pub keep_encoded_slashes: bool,
    /// Protocols a client may switch to (lower-case).
    pub upgrades: Vec<String>,
    pub pool: Arc<UpstreamPool>,
    /// The tunnel its requests are carried over instead of `pool`.
    pub tunnel: Option<Arc<str>>,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_on_status: Vec<StatusCode>,
    pub metrics: RouteMetrics,
    pub auth: RouteAuth,
}

/// The header fields a route matches on: a header map, or a head as read
/// off the wire.
pub trait FieldLookup {
    /// The values of the `name` fields, in order.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]>;

    /// The first `name` field's value.
    fn first<'a>(&'a self, name: &HeaderName) -> Option<&'a [u8]>;

    /// Whether some `name` field has exactly `value`.
    fn has_value(&self, name: &HeaderName, value: &[u8]) -> bool {
        self.values(name).any(|v| v == value)
    }
}

impl FieldLookup for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> {
        self.get_all(name).iter().map(HeaderValue::as_bytes)
    }

    fn first<'a>(&'a self, name: &HeaderName) -> Option<&'a [u8]> {
        self.get(name).map(HeaderValue::as_bytes)
    }
}

struct Matcher {
    host: HostMatch,
    /// Normalised: no trailing slash, except `/` itself.
    prefix: String,
    methods: Option<Vec<Method>>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

enum HostMatch {
    Any,
    Exact(String),
    /// `*.internal` is stored as `.internal`.
    Suffix(String),
}

impl Matcher {
    /// One matcher per host and prefix of the route.
    fn all(cfg: &config::RouteMatch) -> Vec<Matcher> {
        let mut out = Vec::new();
        for host in cfg.hosts() {
            for prefix in cfg.path_prefix.values() {
                out.push(Matcher::new(cfg, host.as_deref(), prefix));
            }
        }
        out
    }

    fn new(cfg: &config::RouteMatch, host: Option<&str>, prefix: &str) -> Matcher {
        let host = match host.map(|h| h.trim_end_matches('.').to_ascii_lowercase()) {
            None => HostMatch::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_owned()),
                None => HostMatch::Exact(h),
            },
        };
        Matcher {
            host,
            prefix: canonical_prefix(prefix),
            methods: cfg.methods.as_ref().map(|ms| {
                ms.iter()
                    .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                    .collect()
            }),
            headers: cfg
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        }
    }

    fn matches(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
        headers: &impl FieldLookup,
    ) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => host.is_some_and(|host| host.eq_ignore_ascii_case(h)),
            HostMatch::Suffix(s) => host.is_some_and(|host| {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }),
        };
        host_ok
            && prefix_matches(&self.prefix, path)
            && self.methods.as_ref().is_none_or(|ms| ms.contains(method))
            && self
                .headers
                .iter()
                .all(|(name, value)| headers.has_value(name, value.as_bytes()))
    }

    /// Sort key: most specific first.
    fn specificity(&self) -> (u8, Reverse<usize>, Reverse<usize>, Reverse<usize>) {
        let (rank, host_len) = match &self.host {
            HostMatch::Exact(h) => (0, h.len()),
            HostMatch::Suffix(s) => (1, s.len()),
            HostMatch::Any => (2, 0),
        };
        let conditions = usize::from(self.methods.is_some()) + self.headers.len();
        (
            rank,
            Reverse(host_len),
            Reverse(self.prefix.len()),
            Reverse(conditions),
        )
    }
}

/// A configured prefix in the form requests are matched in (see
/// `canonical`), without its trailing `/`.
fn canonical_prefix(prefix: &str) -> String {
    let canonical = canonical::path(prefix).map_or(Cow::Borrowed(prefix), |p| p.path);
    config::normalize_prefix(&canonical).to_owned()
}

impl Route {
    /// Whether the route lets a client switch to the protocol its
    /// `Upgrade` field names first (`websocket`, `h2c/...`).
    pub fn allows_upgrade(&self, upgrade: &[u8]) -> bool {
        let first = wire::list_elements(upgrade).next().unwrap_or_default();
        let name = first.split(|b| *b == b'/').next().unwrap_or_default();
        self.upgrades
            .iter()
            .any(|p| p.as_bytes().eq_ignore_ascii_case(name))
    }
}

/// Segment-aware: `/bar` matches `/bar` and `/bar/x`, never `/barn`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

impl Route {
    /// The target to send upstream for a request to the canonical `path`,
    /// when the route strips or rewrites its prefix; `None` sends the
    /// request's own.
    pub fn rewrite(&self, path: &str, query: Option<&str>) -> Option<String> {
        let replacement = self.rewrite.as_ref()?;
        // The longest of the route's prefixes that this path is under.
        let prefix = self
            .prefixes
            .iter()
            .filter(|p| prefix_matches(p, path))
            .max_by_key(|p| p.len())
            .map_or("/", String::as_str);
        let rest = if prefix == "/" {
            path
        } else {
            path.get(prefix.len()..).unwrap_or("")
        };
        let mut s = String::with_capacity(
            replacement.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1,
        );
        s.push_str(replacement);
        s.push_str(rest);
        if s.is_empty() {
            s.push('/');
        }
        if let Some(q) = query {
            s.push('?');
            s.push_str(q);
        }
        Some(s)
    }
}

pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Every (host, prefix, conditions) of every route, most specific first.
    entries: Vec<(Matcher, Arc<Route>)>,
}

impl RouteTable {
    /// Compiles routes from a validated config. Upstream pools whose route and
    /// upstream settings are unchanged are carried over from `previous`, with
    /// their health state and warm connections.
    pub async fn build(
        cfg: &Config,
        clients: &UpstreamClients,
        metrics: &Metrics,
        providers: &Providers,
        upstream_tls: &UpstreamTlsConfigs,
        previous: Option<&RouteTable>,
    ) -> RouteTable {
        let listeners: Vec<String> = cfg.listeners.iter().map(|l| l.name.clone()).collect();
        let identity_headers = identity_headers(cfg);
        let realm: Arc<str> = Arc::from(cfg.auth.realm.as_str());
        // Pools resolve their DNS names as they start: start them together so
        // one slow name does not hold up the others.
        let routes = cfg.routes.iter().enumerate().map(|(index, rc)| {
            let listeners = &listeners;
            let identity_headers = &identity_headers;
            let realm = &realm;
            async move {
                let name: Arc<str> = Arc::from(rc.name.as_str());
                let route_metrics = metrics.route(&rc.name, listeners);
                let tls = upstream_tls.get(&rc.name).cloned();
                let reused = previous.and_then(|p| {
                    p.routes
                        .iter()
                        .find(|r| {
                            *r.name == *name
                                && r.pool.config == rc.upstream
                                && same_tls(r.pool.tls.as_deref(), tls.as_deref())
                        })
                        .map(|r| r.pool.clone())
                });
                let pool = match reused {
                    Some(pool) => pool,
                    None => {
                        UpstreamPool::start(
                            name.clone(),
                            rc.upstream.clone(),
                            clients,
                            tls,
                            route_metrics.clone(),
                        )
                        .await
                    }
                };
                let auth = compile_auth(rc, providers, identity_headers.clone(), realm.clone());
                (
                    index,
                    Arc::new(Route::new(name, rc, pool, route_metrics, auth)),
                )
            }
        });
        let routes = futures_util::future::join_all(routes).await;
        let mut entries: Vec<(usize, Matcher, Arc<Route>)> = routes
            .iter()
            .flat_map(|(index, r)| {
                Matcher::all(&cfg.routes[*index].matcher)
                    .into_iter()
                    .map(|m| (*index, m, r.clone()))
            })
            .collect();
        entries.sort_by_key(|(index, m, _)| (m.specificity(), *index));
        RouteTable {
            routes: routes.into_iter().map(|(_, r)| r).collect(),
            entries: entries.into_iter().map(|(_, m, r)| (m, r)).collect(),
        }
    }

    /// The most specific route for a request's canonical host (without
    /// its port) and path.
    pub fn find_by(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &impl FieldLookup,
    ) -> Option<&Arc<Route>> {
        self.entries
            .iter()
            .find(|(m, _)| m.matches(host, path, method, headers))
            .map(|(_, r)| r)
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Whether every route's upstream TLS material is what `upstream_tls` holds.
    pub fn same_tls(&self, upstream_tls: &UpstreamTlsConfigs) -> bool {
        self.routes.iter().all(|r| {
            same_tls(
                r.pool.tls.as_deref(),
                upstream_tls.get(&r.name).map(|m| &**m),
            )
        })
    }
}

fn same_tls(a: Option<&UpstreamTlsMaterial>, b: Option<&UpstreamTlsMaterial>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same_as(b),
        _ => false,
    }
}

impl Route {
    fn new(
        name: Arc<str>,
        rc: &RouteConfig,
        pool: Arc<UpstreamPool>,
        metrics: RouteMetrics,
        auth: RouteAuth,
    ) -> Route {
        let rewrite = if rc.strip_prefix {
            Some(String::new())
        } else {
            rc.rewrite_prefix
                .as_deref()
                .map(|p| p.trim_end_matches('/').to_owned())
        };
        Route {
            name,
            prefixes: rc
                .matcher
                .path_prefix
                .values()
                .iter()
                .map(|p| canonical_prefix(p))
                .collect(),
            rewrite,
            preserve_host: rc.preserve_host,
            keep_encoded_slashes: rc.encoded_slashes == config::EncodedSlashes::Keep,
            upgrades: rc.upgrades.iter().map(|p| p.to_ascii_lowercase()).collect(),
            tunnel: rc.upstream.tunnel.as_deref().map(Arc::from),
            timeout: rc.upstream.timeout,
            retries: rc.upstream.retries,
            retry_on_status: rc
                .upstream
                .retry_on_status
                .iter()
                .filter_map(|s| StatusCode::from_u16(*s).ok())
                .collect(),
            pool,
            metrics,
            auth,
        }
    }
}

/// Headers that carry identity to upstreams: the client's copies are removed
/// from every request, whichever route it takes.
fn identity_headers(cfg: &Config) -> Arc<[HeaderName]> {
    let mut names = vec![super::xfcc::XFCC];
    for r in &cfg.routes {
        for h in r.forward_claims.keys() {
            if let Ok(name) = HeaderName::from_bytes(h.as_bytes())
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    names.into()
}

/// A route's auth settings; the config was validated, so every provider
/// named exists and the policy compiles (a policy that did not would deny all).
fn compile_auth(
    rc: &RouteConfig,
    providers: &Providers,
    identity_headers: Arc<[HeaderName]>,
    realm: Arc<str>,
) -> RouteAuth {
    let mut auth = RouteAuth::open(identity_headers, realm);
    let has = |list: &[Credential], c| list.contains(&c);
    let authn = &mut auth.authn;
    (authn.accept_jwt, authn.accept_cert, authn.require_both) = match &rc.auth {
        AuthRequirement::None => (false, false, false),
        AuthRequirement::Jwt => (true, false, false),
        AuthRequirement::Mtls => (false, true, false),
        AuthRequirement::Any => (true, true, false),
        AuthRequirement::AnyOf(l) => (has(l, Credential::Jwt), has(l, Credential::Mtls), false),
        AuthRequirement::AllOf(l) => {
            let (j, m) = (has(l, Credential::Jwt), has(l, Credential::Mtls));
            (j, m, j && m)
        }
    };
    if authn.accept_jwt {
        authn.providers = match &rc.providers {
            Some(names) => names
                .iter()
                .filter_map(|n| providers.get(n).cloned())
                .collect(),
            None => {
                let mut all: Vec<_> = providers.all().cloned().collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                all
            }
        };
        for p in &authn.providers {
            for s in &p.settings.token_from {
                if !auth.sources.contains(s) {
                    auth.sources.push(s.clone());
                }
            }
        }
    }
    auth.policy = rc.policy.as_ref().map(|rules| {
        Policy::compile(rules, Resource::HttpPath).unwrap_or_else(|_| {
            Policy::compile(&[], Resource::HttpPath).expect("the empty policy compiles")
        })
    });
    auth.forward_claims = rc
        .forward_claims
        .iter()
        .filter_map(|(h, field)| Some((HeaderName::from_bytes(h.as_bytes()).ok()?, field.clone())))
        .collect();
    auth.forward_token = rc.forward_token;
    auth.forward_client_cert = XfccFields::new(&rc.forward_client_cert.0);
    auth
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_segment_aware() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/bar", "/bar"));
        assert!(prefix_matches("/bar", "/bar/x"));
        assert!(!prefix_matches("/bar", "/barn"));
        assert!(!prefix_matches("/bar", "/ba"));
    }
}
