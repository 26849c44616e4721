//! Kong's admin API shapes, translated to tollgate routes: Kong 0.x `apis`
//! (what Microkubes' KongGatewayRegistrator sends) and Kong >= 1.0
//! `services` with their `routes`.

use serde_json::{Map, Value, json};

/// A field of the caller's object and what is wrong with it.
pub type FieldError = (String, String);

fn field(name: &str, message: impl Into<String>) -> FieldError {
    (name.to_owned(), message.into())
}

/// A list given as a JSON array or as one comma-separated string (Kong 0.x
/// accepts both; Microkubes sends `"uris": "/a,/b"`).
pub fn list(obj: &Map<String, Value>, name: &str) -> Result<Vec<String>, FieldError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| field(name, "expected strings"))
            })
            .collect(),
        Some(_) => Err(field(name, "expected a list or a comma-separated string")),
    }
}

fn boolean(obj: &Map<String, Value>, name: &str, default: bool) -> Result<bool, FieldError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(_) => Err(field(name, "expected true or false")),
    }
}

pub fn string<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, FieldError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(field(name, "expected a non-empty string")),
    }
}

/// What a Kong route asks for, in Kong's terms.
pub struct KongRoute<'a> {
    pub name: &'a str,
    pub paths: Vec<String>,
    pub hosts: Vec<String>,
    pub methods: Vec<String>,
    /// `http(s)://host:port/path`.
    pub upstream_url: &'a str,
    pub strip: bool,
    pub preserve_host: bool,
    /// The caller's field names, for errors.
    pub paths_field: &'a str,
    pub url_field: &'a str,
}

/// The tollgate route for a Kong route: the upstream URL's host becomes the
/// target and its path is put in front of what is forwarded (after the
/// matched prefix when `strip` is set, before the whole path otherwise).
pub fn to_route(k: &KongRoute) -> Result<Value, FieldError> {
    if k.paths.is_empty() && k.hosts.is_empty() && k.methods.is_empty() {
        return Err(field(
            k.paths_field,
            "at least one of paths, hosts or methods is required",
        ));
    }
    let url: http::Uri = k
        .upstream_url
        .parse()
        .map_err(|_| field(k.url_field, format!("`{}` is not a URL", k.upstream_url)))?;
    let scheme = match url.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        _ => return Err(field(k.url_field, "expected an http:// or https:// URL")),
    };
    let authority = url
        .authority()
        .ok_or_else(|| field(k.url_field, "the URL has no host"))?;
    let base = url.path().trim_end_matches('/');
    let mut route = json!({
        "name": k.name,
        "match": { "path_prefix": if k.paths.is_empty() { vec!["/".to_owned()] } else { k.paths.clone() } },
        "preserve_host": k.preserve_host,
        "upstream": { "targets": [format!("{scheme}://{authority}")] },
    });
    if !k.hosts.is_empty() {
        route["match"]["host"] = json!(k.hosts);
    }
    if !k.methods.is_empty() {
        route["match"]["methods"] = json!(k.methods);
    }
    match (k.strip, base.is_empty(), k.paths.as_slice()) {
        (true, true, _) => route["strip_prefix"] = json!(true),
        (true, false, _) => route["rewrite_prefix"] = json!(base),
        (false, true, _) => {}
        (false, false, [one]) => {
            route["rewrite_prefix"] = json!(format!("{base}{}", one.trim_end_matches('/')))
        }
        (false, false, _) => {
            return Err(field(
                k.url_field,
                "an upstream URL with a path and several paths needs strip_uri / strip_path",
            ));
        }
    }
    Ok(route)
}

/// A Kong 0.x `api` object: its tollgate route, and the object as Kong
/// would store it (answered back on GET).
pub fn api(
    obj: &Map<String, Value>,
    id: &str,
    created_at: u64,
) -> Result<(Value, Value), FieldError> {
    let name = string(obj, "name")?.ok_or_else(|| field("name", "name is required"))?;
    let upstream_url = string(obj, "upstream_url")?
        .ok_or_else(|| field("upstream_url", "upstream_url is required"))?;
    let uris = list(obj, "uris")?;
    let hosts = list(obj, "hosts")?;
    let methods = list(obj, "methods")?;
    let strip = boolean(obj, "strip_uri", true)?;
    let preserve_host = boolean(obj, "preserve_host", false)?;
    let route = to_route(&KongRoute {
        name,
        paths: uris.clone(),
        hosts: hosts.clone(),
        methods: methods.clone(),
        upstream_url,
        strip,
        preserve_host,
        paths_field: "uris",
        url_field: "upstream_url",
    })?;
    let mut kong = json!({
        "id": id,
        "name": name,
        "created_at": created_at,
        "upstream_url": upstream_url,
        "strip_uri": strip,
        "preserve_host": preserve_host,
        "retries": 5,
        "https_only": false,
        "http_if_terminated": false,
        "upstream_connect_timeout": 60000,
        "upstream_send_timeout": 60000,
        "upstream_read_timeout": 60000,
    });
    for (key, values) in [("uris", uris), ("hosts", hosts), ("methods", methods)] {
        if !values.is_empty() {
            kong[key] = json!(values);
        }
    }
    Ok((route, kong))
}

/// A Kong >= 1.0 service's URL from `url`, or `protocol`/`host`/`port`/`path`.
pub fn service_url(obj: &Map<String, Value>) -> Result<String, FieldError> {
    if let Some(url) = string(obj, "url")? {
        return Ok(url.to_owned());
    }
    let host = string(obj, "host")?.ok_or_else(|| field("host", "url or host is required"))?;
    let protocol = string(obj, "protocol")?.unwrap_or("http");
    let port = match obj.get("port") {
        None | Some(Value::Null) => {
            if protocol == "https" {
                443
            } else {
                80
            }
        }
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| field("port", "expected a port number"))?,
    };
    let path = string(obj, "path")?.unwrap_or("");
    Ok(format!("{protocol}://{host}:{port}{path}"))
}

/// A Kong >= 1.0 route of a service: its tollgate route and Kong object.
pub fn service_route(
    obj: &Map<String, Value>,
    service: &super::dynamic::KongService,
    route_name: &str,
    id: &str,
    created_at: u64,
) -> Result<(Value, Value), FieldError> {
    let paths = list(obj, "paths")?;
    let hosts = list(obj, "hosts")?;
    let methods = list(obj, "methods")?;
    let strip = boolean(obj, "strip_path", true)?;
    let preserve_host = boolean(obj, "preserve_host", false)?;
    let route = to_route(&KongRoute {
        name: route_name,
        paths: paths.clone(),
        hosts: hosts.clone(),
        methods: methods.clone(),
        upstream_url: &service.url,
        strip,
        preserve_host,
        paths_field: "paths",
        url_field: "service",
    })?;
    let kong = json!({
        "id": id,
        "name": string(obj, "name")?,
        "created_at": created_at / 1000,
        "updated_at": created_at / 1000,
        "protocols": ["http", "https"],
        "paths": if paths.is_empty() { Value::Null } else { json!(paths) },
        "hosts": if hosts.is_empty() { Value::Null } else { json!(hosts) },
        "methods": if methods.is_empty() { Value::Null } else { json!(methods) },
        "strip_path": strip,
        "preserve_host": preserve_host,
        "regex_priority": 0,
        "service": { "id": service.id },
    });
    Ok((route, kong))
}

/// A Kong >= 1.0 service object.
pub fn service_object(s: &super::dynamic::KongService) -> Value {
    let url: Option<http::Uri> = s.url.parse().ok();
    let protocol = url.as_ref().and_then(|u| u.scheme_str()).unwrap_or("http");
    json!({
        "id": s.id,
        "name": s.name,
        "created_at": s.created_at / 1000,
        "updated_at": s.created_at / 1000,
        "protocol": protocol,
        "host": url.as_ref().and_then(|u| u.host()),
        "port": url.as_ref().and_then(|u| u.port_u16()).unwrap_or(if protocol == "https" { 443 } else { 80 }),
        "path": url.as_ref().map(|u| u.path()).filter(|p| *p != "/"),
        "retries": 5,
        "connect_timeout": 60000,
        "write_timeout": 60000,
        "read_timeout": 60000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn microkubes_registration() {
        let (route, kong) = api(
            &obj(json!({"name": "user-service", "uris": "/users,/profiles", "upstream_url": "http://user-svc:8080", "preserve_host": true})),
            "id-1",
            7,
        )
        .unwrap();
        assert_eq!(
            route["match"]["path_prefix"],
            json!(["/users", "/profiles"])
        );
        assert_eq!(route["strip_prefix"], true, "Kong 0.x strips by default");
        assert_eq!(route["preserve_host"], true);
        assert_eq!(
            route["upstream"]["targets"],
            json!(["http://user-svc:8080"])
        );
        assert_eq!(kong["uris"], json!(["/users", "/profiles"]));
        assert_eq!(kong["upstream_url"], "http://user-svc:8080");
    }

    #[test]
    fn upstream_paths() {
        let k = |strip: bool, paths: Vec<&str>, url: &str| {
            to_route(&KongRoute {
                name: "r",
                paths: paths.into_iter().map(str::to_owned).collect(),
                hosts: vec![],
                methods: vec![],
                upstream_url: url,
                strip,
                preserve_host: false,
                paths_field: "paths",
                url_field: "url",
            })
        };
        assert_eq!(
            k(true, vec!["/a"], "http://h/base/").unwrap()["rewrite_prefix"],
            "/base"
        );
        assert_eq!(
            k(false, vec!["/a"], "http://h/base").unwrap()["rewrite_prefix"],
            "/base/a"
        );
        assert!(
            k(false, vec!["/a"], "http://h")
                .unwrap()
                .get("rewrite_prefix")
                .is_none()
        );
        assert_eq!(k(true, vec!["/a"], "ftp://h").unwrap_err().0, "url");
        assert_eq!(k(true, vec![], "http://h").unwrap_err().0, "paths");
        assert!(k(false, vec!["/a", "/b"], "http://h/p").is_err());
    }
}
