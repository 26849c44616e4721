//! Routes registered through the admin API: kept in the store in tollgate's
//! own route shape (with the Kong object a Kong client registered, to answer
//! it in its own shape), and merged with gateway.yaml's routes. A file route
//! wins over an API route of the same name.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{self, Config, ConfigError, RouteConfig};
use crate::store::{Store, Table};

/// Which API created a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `/admin/routes`.
    Admin,
    /// Kong 0.x `/apis`.
    KongApi,
    /// Kong >= 1.0 `/services/{name}/routes`.
    KongRoute,
}

/// One API-registered route as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiRoute {
    /// The route in gateway.yaml's shape (as JSON), `name` included.
    pub route: Value,
    pub origin: Origin,
    pub id: String,
    /// Unix milliseconds.
    pub created_at: u64,
    /// The Kong object as the client registered it (Kong origins).
    #[serde(default)]
    pub kong: Option<Value>,
    /// Kong >= 1.0: the service the route belongs to.
    #[serde(default)]
    pub service: Option<String>,
}

impl ApiRoute {
    pub fn name(&self) -> &str {
        self.route.get("name").and_then(Value::as_str).unwrap_or("")
    }
}

/// A Kong >= 1.0 service as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KongService {
    pub name: String,
    pub id: String,
    /// `http://host:port/path`.
    pub url: String,
    pub created_at: u64,
}

/// The store of a config, when it exists (reading never creates it).
pub fn existing_store(cfg: &Config) -> Result<Option<Arc<dyn Store>>, String> {
    crate::store::existing(cfg).map_err(|e| e.to_string())
}

pub fn store(cfg: &Config) -> Result<Arc<dyn Store>, String> {
    crate::store::open(cfg).map_err(|e| e.to_string())
}

/// The stored API routes; a record that no longer reads is skipped (logged),
/// so it cannot take the others down with it.
pub fn api_routes(store: &dyn Store) -> Result<Vec<ApiRoute>, String> {
    let raw: Vec<Value> = store.records(Table::ApiRoutes).map_err(|e| e.to_string())?;
    Ok(raw
        .into_iter()
        .filter_map(|v| match serde_json::from_value::<ApiRoute>(v) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "an API route record in the store cannot be read; skipped");
                None
            }
        })
        .collect())
}

pub fn kong_services(store: &dyn Store) -> Result<Vec<KongService>, String> {
    store
        .records(Table::KongServices)
        .map_err(|e| e.to_string())
}

/// A route document in gateway.yaml's shape, checked on its own: unknown
/// keys, types and every semantic rule, with errors naming the field.
pub fn parse_route(doc: &Value) -> Result<RouteConfig, Vec<ConfigError>> {
    let route: RouteConfig = serde_json::from_value(doc.clone()).map_err(|e| {
        vec![ConfigError {
            path: "route".into(),
            message: e.to_string(),
        }]
    })?;
    Ok(route)
}

/// What merging found: API routes left out, and why.
#[derive(Debug, Default)]
pub struct Merged {
    /// (route name, reason) for API routes that are not served.
    pub skipped: Vec<(String, String)>,
}

/// gateway.yaml's routes plus the API routes that are valid next to them.
/// An API route whose name a file route has, or that would make the config
/// invalid, is left out (and reported).
pub fn merge(file: &Config, api: &[ApiRoute]) -> (Config, Merged) {
    let mut cfg = file.clone();
    let mut merged = Merged::default();
    for r in api {
        let name = r.name().to_owned();
        if file.routes.iter().any(|f| f.name == name) {
            merged.skipped.push((
                name,
                "gateway.yaml has a route of this name; the file's route is served".into(),
            ));
            continue;
        }
        match parse_route(&r.route) {
            Ok(route) => match shadows_protected(file, &route) {
                Some(why) => merged.skipped.push((name, why)),
                None => cfg.routes.push(route),
            },
            Err(e) => merged.skipped.push((name, describe(&e))),
        }
    }
    // Validate the whole once; drop the API routes it flags, until clean
    // (usually no round at all).
    let first_api = file.routes.len();
    loop {
        let problems = config::problems(&cfg);
        let mut bad: Vec<(usize, Vec<ConfigError>)> = Vec::new();
        for p in problems {
            let Some(i) = route_index(&p.path).filter(|i| *i >= first_api) else {
                continue;
            };
            match bad.iter_mut().find(|(j, _)| *j == i) {
                Some((_, errs)) => errs.push(p),
                None => bad.push((i, vec![p])),
            }
        }
        if bad.is_empty() {
            break;
        }
        bad.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, errs) in bad {
            let route = cfg.routes.remove(i);
            merged.skipped.push((route.name, describe(&errs)));
        }
    }
    (cfg, merged)
}

/// `routes[12].match` -> 12.
pub fn route_index(path: &str) -> Option<usize> {
    path.strip_prefix("routes[")?
        .split(']')
        .next()?
        .parse()
        .ok()
}

/// Whether `api` could take requests away from a file route that asks for
/// credentials or has a policy: one of its prefixes is that route's prefix or
/// under it, on a host that route also serves. The admin API must not be a
/// way around a protected route.
pub fn shadows_protected(file: &Config, api: &RouteConfig) -> Option<String> {
    let host_overlaps =
        |api_host: &Option<String>, file_host: &Option<String>| match (api_host, file_host) {
            (_, None) => true,
            (None, Some(_)) => true,
            (Some(a), Some(f)) => {
                a == f
                    || f.strip_prefix('*')
                        .is_some_and(|suffix| a.ends_with(suffix))
                    || a.strip_prefix('*')
                        .is_some_and(|suffix| f.ends_with(suffix))
            }
        };
    let under = |api_prefix: &str, file_prefix: &str| {
        let (a, f) = (
            config::normalize_prefix(api_prefix),
            config::normalize_prefix(file_prefix),
        );
        f == "/" || a == f || (a.starts_with(f) && a.as_bytes().get(f.len()) == Some(&b'/'))
    };
    for f in &file.routes {
        let protected = f.policy.is_some() || f.auth != config::AuthRequirement::None;
        if !protected {
            continue;
        }
        for fh in f.matcher.hosts() {
            for ah in api.matcher.hosts() {
                if !host_overlaps(&ah, &fh) {
                    continue;
                }
                for fp in f.matcher.path_prefix.values() {
                    if api
                        .matcher
                        .path_prefix
                        .values()
                        .iter()
                        .any(|ap| under(ap, fp))
                    {
                        return Some(format!(
                            "would take requests from `{}`, a route in gateway.yaml that asks for credentials; register outside its prefixes",
                            f.name
                        ));
                    }
                }
            }
        }
    }
    None
}

/// Problems of a candidate route in the context of the running routes,
/// with `routes[i].` replaced by `route.` so they name the caller's fields.
pub fn check_candidate(
    file: &Config,
    api: &[ApiRoute],
    candidate: &Value,
) -> Result<(), Vec<ConfigError>> {
    let route = parse_route(candidate)?;
    let name = route.name.clone();
    if let Some(why) = shadows_protected(file, &route) {
        return Err(vec![ConfigError {
            path: "route.match".into(),
            message: why,
        }]);
    }
    if file.routes.iter().any(|f| f.name == name) {
        return Err(vec![ConfigError {
            path: "route.name".into(),
            message: format!("`{name}` is a route in gateway.yaml"),
        }]);
    }
    let others: Vec<ApiRoute> = api.iter().filter(|r| r.name() != name).cloned().collect();
    let (mut cfg, _) = merge(file, &others);
    let before = config::problems(&cfg).len();
    let index = cfg.routes.len();
    cfg.routes.push(route);
    let problems = config::problems(&cfg);
    if problems.len() > before {
        let prefix = format!("routes[{index}]");
        return Err(problems[before..]
            .iter()
            .map(|e| ConfigError {
                path: e.path.replacen(&prefix, "route", 1),
                message: e.message.clone(),
            })
            .collect());
    }
    Ok(())
}

pub fn describe(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A short random id for API objects (Kong clients expect one).
pub fn new_id() -> String {
    let mut raw = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut raw);
    let h = crate::identity::hex(&raw);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
