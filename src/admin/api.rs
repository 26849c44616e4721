//! The admin API: routes in tollgate's shape (`/admin/routes`), Kong 0.x
//! `apis` and Kong >= 1.0 `services`/`routes` for existing registrators, and
//! operator endpoints (`/admin/config`, `/admin/reload`, `/admin/status`,
//! `/admin/clients`). Writes go to the store, then the route table is
//! rebuilt atomically, as on a reload.

// Errors here are finished responses, built once per admin request (the
// control plane): their size does not matter.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};

use super::AdminBackend;
use super::dynamic::{self, ApiRoute, KongService, Origin};
use super::kong;
use crate::store::{Store, Table};
use http_body_util::Full;

/// Largest admin request body.
const MAX_BODY: usize = 256 * 1024;

pub fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// An error in the shape Kong clients read (`message`), with the fields.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "message": message.into() }))
}

fn field_error((field, message): kong::FieldError) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({
            "message": format!("schema violation ({field}: {message})"),
            "name": "schema violation",
            "fields": { field.clone(): message },
        }),
    )
}

fn config_errors(errors: &[crate::config::ConfigError]) -> Response<Full<Bytes>> {
    let fields: Map<String, Value> = errors
        .iter()
        .map(|e| (e.path.clone(), Value::String(e.message.clone())))
        .collect();
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({ "message": format!("invalid route: {}", dynamic::describe(errors)), "fields": fields }),
    )
}

pub(super) fn no_content() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

fn not_found() -> Response<Full<Bytes>> {
    error(StatusCode::NOT_FOUND, "Not found")
}

/// The store could not be read or written (or what was written could not
/// be applied): nothing was acknowledged, so the caller may retry. 507 when
/// the disk is full, 503 otherwise, with the reason.
pub(super) fn store_failed(e: impl std::fmt::Display) -> Response<Full<Bytes>> {
    let reason = e.to_string();
    tracing::error!(error = %reason, "admin API request failed on the store");
    let status = if reason.contains("the disk is full") {
        StatusCode::INSUFFICIENT_STORAGE
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({ "message": format!("the store cannot be used: {reason}"), "name": "store unavailable" }),
    )
}

/// Runs store work off the event loop.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

async fn body_json<B>(req: Request<B>) -> Result<Value, Response<Full<Bytes>>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })
}

fn object(v: &Value) -> Result<&Map<String, Value>, Response<Full<Bytes>>> {
    v.as_object()
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "expected a JSON object"))
}

pub async fn handle<B>(gw: &dyn AdminBackend, req: Request<B>) -> Response<Full<Bytes>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (&method, seg.as_slice()) {
        (&Method::GET, ["admin", "status"]) => status(gw),
        (&Method::GET, ["admin", "config"]) => config(gw),
        (&Method::POST, ["admin", "reload"]) => reload(gw).await,
        (&Method::GET, ["admin", "clients"]) => clients(gw),
        (&Method::GET, ["admin", "users"]) => super::users::list(gw).await,
        (&Method::GET, ["admin", "users", name]) => super::users::get(gw, name).await,
        (&Method::POST, ["admin", "users"]) => match body_json(req).await {
            Ok(doc) => super::users::put(gw, None, doc).await,
            Err(r) => r,
        },
        (&Method::PUT, ["admin", "users", name]) => match body_json(req).await {
            Ok(doc) => super::users::put(gw, Some(name), doc).await,
            Err(r) => r,
        },
        (&Method::DELETE, ["admin", "users", name]) => super::users::delete(gw, name).await,
        (&Method::POST, ["admin", "mqtt", "register"]) => match body_json(req).await {
            Ok(doc) => {
                let kind = doc["DeviceType"].as_str().unwrap_or_default().to_owned();
                match gw.mqtt_register(kind) {
                    None => error(
                        StatusCode::NOT_FOUND,
                        "device registration is not configured (mqtt.registration)",
                    ),
                    Some(made) => match made.await {
                        Ok(v) => json_response(StatusCode::CREATED, &v),
                        Err((status, message)) => error(status, message),
                    },
                }
            }
            Err(r) => r,
        },
        (&Method::GET, ["admin", "mqtt", "sessions"]) => match gw.mqtt_sessions() {
            Some(list) => json_response(StatusCode::OK, &list),
            None => error(StatusCode::NOT_FOUND, "the MQTT broker is not enabled"),
        },
        (&Method::DELETE, ["admin", "mqtt", "sessions", client_id]) => {
            match gw.mqtt_kick(client_id) {
                Some(true) => no_content(),
                Some(false) => error(
                    StatusCode::NOT_FOUND,
                    format!("no MQTT session `{client_id}`"),
                ),
                None => error(StatusCode::NOT_FOUND, "the MQTT broker is not enabled"),
            }
        }
        (&Method::GET, ["admin", "wamp", "sessions"]) => match gw.wamp_sessions() {
            Some(list) => json_response(StatusCode::OK, &list),
            None => error(StatusCode::NOT_FOUND, "the WAMP router is not enabled"),
        },
        (&Method::DELETE, ["admin", "wamp", "sessions", id]) => {
            match id.parse().ok().and_then(|id| gw.wamp_kill(id)) {
                Some(true) => no_content(),
                Some(false) => error(StatusCode::NOT_FOUND, format!("no WAMP session `{id}`")),
                None if gw.wamp_sessions().is_none() => {
                    error(StatusCode::NOT_FOUND, "the WAMP router is not enabled")
                }
                None => error(StatusCode::NOT_FOUND, format!("no WAMP session `{id}`")),
            }
        }
        (&Method::GET, ["admin", "tunnels"]) => json_response(StatusCode::OK, &gw.tunnels_status()),
        (&Method::GET, ["admin", "routes"]) => list_routes(gw).await,
        (&Method::GET, ["admin", "routes", name]) => get_route(gw, name).await,
        (&Method::POST, ["admin", "routes"]) => match body_json(req).await {
            Ok(doc) => put_admin_route(gw, None, doc, false).await,
            Err(r) => r,
        },
        (&Method::PUT, ["admin", "routes", name]) => match body_json(req).await {
            Ok(doc) => put_admin_route(gw, Some(name), doc, true).await,
            Err(r) => r,
        },
        (&Method::PATCH, ["admin", "routes", name]) => match body_json(req).await {
            Ok(doc) => patch_admin_route(gw, name, doc).await,
            Err(r) => r,
        },
        (&Method::DELETE, ["admin", "routes", name]) => delete_route(gw, name, None).await,
        (&Method::GET, ["admin", "routes", name, "targets"]) => {
            let route = get_route(gw, name).await;
            if route.status() != StatusCode::OK {
                return route;
            }
            let all = gw.routes_status();
            let targets = all["data"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["name"] == *name))
                .map(|r| r["targets"].clone())
                .unwrap_or_default();
            json_response(StatusCode::OK, &json!({ "data": targets }))
        }
        (&Method::POST, ["admin", "routes", name, "targets"]) => match body_json(req).await {
            Ok(doc) => add_target(gw, name, doc).await,
            Err(r) => r,
        },
        (&Method::PUT, ["admin", "routes", name, "targets"]) => match body_json(req).await {
            Ok(doc) => replace_targets(gw, name, doc).await,
            Err(r) => r,
        },
        (&Method::DELETE, ["admin", "routes", name, "targets", target]) => {
            remove_target(gw, name, target).await
        }
        // Kong 0.x
        (&Method::GET, ["apis"]) => list_kong(gw, Origin::KongApi).await,
        (&Method::GET, ["apis", name]) => get_kong_api(gw, name).await,
        (&Method::POST, ["apis"]) => match body_json(req).await {
            Ok(doc) => put_kong_api(gw, None, doc, false).await,
            Err(r) => r,
        },
        (&Method::PUT, ["apis"]) => match body_json(req).await {
            Ok(doc) => put_kong_api(gw, None, doc, true).await,
            Err(r) => r,
        },
        (&Method::PATCH, ["apis", name]) => match body_json(req).await {
            Ok(doc) => put_kong_api(gw, Some(name), doc, true).await,
            Err(r) => r,
        },
        (&Method::DELETE, ["apis", name]) => delete_route(gw, name, Some(Origin::KongApi)).await,
        // Kong >= 1.0
        (&Method::GET, ["services"]) => list_services(gw).await,
        (&Method::GET, ["services", name]) => get_service(gw, name).await,
        (&Method::POST, ["services"]) => match body_json(req).await {
            Ok(doc) => put_service(gw, None, doc).await,
            Err(r) => r,
        },
        (&Method::PUT | &Method::PATCH, ["services", name]) => match body_json(req).await {
            Ok(doc) => put_service(gw, Some(name), doc).await,
            Err(r) => r,
        },
        (&Method::DELETE, ["services", name]) => delete_service(gw, name).await,
        (&Method::GET, ["services", name, "routes"]) => list_service_routes(gw, name).await,
        (&Method::POST, ["services", name, "routes"]) => match body_json(req).await {
            Ok(doc) => add_service_route(gw, name, doc).await,
            Err(r) => r,
        },
        (&Method::GET, ["routes"]) => list_kong(gw, Origin::KongRoute).await,
        (&Method::GET, ["routes", id]) => get_kong_route(gw, id).await,
        (&Method::DELETE, ["routes", id]) => delete_kong_route(gw, id).await,
        _ => not_found(),
    }
}

fn status(gw: &dyn AdminBackend) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &gw.status())
}

fn config(gw: &dyn AdminBackend) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &gw.redacted_config())
}

async fn reload(gw: &dyn AdminBackend) -> Response<Full<Bytes>> {
    match gw.reload().await {
        Ok(r) => json_response(
            StatusCode::OK,
            &json!({ "reloaded": format!("{r:?}").to_lowercase(), "store": gw.status()["store"] }),
        ),
        // The file is fine; the store could not be read (it is retried).
        Err(e)
            if e.errors
                .iter()
                .all(|e| crate::config::StoreConfig::is_key(&e.path)) =>
        {
            store_failed(
                e.errors
                    .iter()
                    .map(|e| e.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
        Err(e) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "message": "the config file has errors; the running config stays", "errors": e.errors.iter().map(|e| format!("{}: {}", e.path, e.message)).collect::<Vec<_>>() }),
        ),
    }
}

fn clients(gw: &dyn AdminBackend) -> Response<Full<Bytes>> {
    match gw.oauth_clients() {
        Some(list) => json_response(StatusCode::OK, &json!({ "data": list })),
        None => error(StatusCode::NOT_FOUND, "the token server is not enabled"),
    }
}

/// The routes being served, with their upstream targets' health, and API
/// routes left out (with why).
async fn list_routes(gw: &dyn AdminBackend) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &gw.routes_status())
}

async fn get_route(gw: &dyn AdminBackend, name: &str) -> Response<Full<Bytes>> {
    let all = gw.routes_status();
    let found = all["data"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .cloned();
    match found {
        Some(r) => json_response(StatusCode::OK, &r),
        None => not_found(),
    }
}

/// Loads the API routes, lets `change` edit them, validates the result
/// next to gateway.yaml, saves and applies it. `change` answers the caller.
async fn write_routes(
    gw: &dyn AdminBackend,
    change: impl FnOnce(
        &dyn Store,
        &[ApiRoute],
    ) -> Result<(Option<ApiRoute>, Response<Full<Bytes>>), Response<Full<Bytes>>>
    + Send
    + 'static,
) -> Response<Full<Bytes>> {
    let _one = gw.admin_write_lock().await;
    let file = gw.file_config();
    let result = blocking(move || {
        let store = dynamic::store(&file).map_err(|e| e.to_string())?;
        let routes = dynamic::api_routes(&*store)?;
        Ok(match change(&*store, &routes) {
            Err(resp) => Err(resp),
            Ok((None, resp)) => Ok((resp, None)),
            Ok((Some(route), resp)) => match dynamic::check_candidate(&file, &routes, &route.route)
            {
                Err(errors) => Err(config_errors(&errors)),
                Ok(()) => {
                    store
                        .put_record(Table::ApiRoutes, route.name(), &route)
                        .map_err(|e| e.to_string())?;
                    let before = routes.iter().find(|r| r.name() == route.name()).cloned();
                    Ok((resp, Some((route.name().to_owned(), before))))
                }
            },
        })
    })
    .await;
    match result {
        Err(e) => store_failed(e),
        Ok(Err(resp)) => resp,
        Ok(Ok((resp, None))) => resp,
        Ok(Ok((resp, Some((name, before))))) => {
            if let Err(e) = gw.routes_changed().await {
                return store_failed(e);
            }
            // Files the route names (an upstream CA, a client key) are only
            // read when it is applied: a route left out is taken back.
            let Some(why) = gw.not_served(&name) else {
                return resp;
            };
            let file = gw.file_config();
            let undone = blocking(move || {
                let store = dynamic::store(&file)?;
                match before {
                    Some(r) => store.put_record(Table::ApiRoutes, &name, &r),
                    None => store.remove(Table::ApiRoutes, &name).map(|_| ()),
                }
                .map_err(|e| e.to_string())
            })
            .await;
            if let Err(e) = undone.and(gw.routes_changed().await) {
                return store_failed(e);
            }
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "message": format!("invalid route: {why}") }),
            )
        }
    }
}

async fn put_admin_route(
    gw: &dyn AdminBackend,
    name: Option<&str>,
    doc: Value,
    replace: bool,
) -> Response<Full<Bytes>> {
    if let Err(r) = object(&doc) {
        return r;
    }
    let mut doc = doc;
    if let Some(name) = name {
        match doc.get("name") {
            None => doc["name"] = json!(name),
            Some(n) if n == name => {}
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the body's name differs from the URL's",
                );
            }
        }
    }
    if doc.get("name").and_then(Value::as_str).is_none() {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"message": "route.name is required", "fields": {"route.name": "is required"}}),
        );
    }
    write_routes(gw, move |_, routes| {
        let name = doc["name"].as_str().unwrap_or_default().to_owned();
        let existing = routes.iter().find(|r| r.name() == name);
        if existing.is_some() && !replace {
            return Err(error(
                StatusCode::CONFLICT,
                format!("route `{name}` already exists"),
            ));
        }
        let route = ApiRoute {
            route: doc.clone(),
            origin: Origin::Admin,
            id: existing.map_or_else(dynamic::new_id, |e| e.id.clone()),
            created_at: existing.map_or_else(dynamic::now_ms, |e| e.created_at),
            kong: None,
            service: None,
        };
        let status = if existing.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok((Some(route), json_response(status, &doc)))
    })
    .await
}

async fn patch_admin_route(
    gw: &dyn AdminBackend,
    name: &str,
    patch: Value,
) -> Response<Full<Bytes>> {
    if let Err(r) = object(&patch) {
        return r;
    }
    let name = name.to_owned();
    write_routes(gw, move |_, routes| {
        let existing = routes
            .iter()
            .find(|r| r.name() == name && r.origin == Origin::Admin)
            .ok_or_else(not_found)?;
        let mut doc = existing.route.clone();
        merge_json(&mut doc, &patch);
        doc["name"] = json!(name);
        let route = ApiRoute {
            route: doc.clone(),
            ..existing.clone()
        };
        Ok((Some(route), json_response(StatusCode::OK, &doc)))
    })
    .await
}

/// RFC 7386 merge patch.
fn merge_json(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_json(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn add_target(gw: &dyn AdminBackend, name: &str, doc: Value) -> Response<Full<Bytes>> {
    let name = name.to_owned();
    write_routes(gw, move |_, routes| {
        let existing = by_name(routes, &name)?;
        let target = doc
            .get("target")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    "target is required (`http://host:port`)",
                )
            })?
            .to_owned();
        let mut route = existing.clone();
        let targets = route.route["upstream"]["targets"]
            .as_array_mut()
            .ok_or_else(|| error(StatusCode::BAD_REQUEST, "the route has no upstream targets"))?;
        if targets.iter().any(|t| t == target.as_str()) {
            return Err(error(
                StatusCode::CONFLICT,
                format!("target `{target}` exists"),
            ));
        }
        targets.push(json!(target));
        let body = route.route["upstream"].clone();
        Ok((Some(route), json_response(StatusCode::CREATED, &body)))
    })
    .await
}

fn by_name<'a>(routes: &'a [ApiRoute], name: &str) -> Result<&'a ApiRoute, Response<Full<Bytes>>> {
    routes
        .iter()
        .find(|r| r.name() == name)
        .ok_or_else(not_found)
}

/// `PUT /admin/routes/{name}/targets` with `{"targets": [...]}`.
async fn replace_targets(gw: &dyn AdminBackend, name: &str, doc: Value) -> Response<Full<Bytes>> {
    let name = name.to_owned();
    write_routes(gw, move |_, routes| {
        let existing = by_name(routes, &name)?;
        let targets = doc
            .get("targets")
            .filter(|t| t.is_array())
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    "expected {\"targets\": [\"http://host:port\", ...]}",
                )
            })?
            .clone();
        let mut route = existing.clone();
        route.route["upstream"]["targets"] = targets;
        let body = route.route["upstream"].clone();
        Ok((Some(route), json_response(StatusCode::OK, &body)))
    })
    .await
}

async fn remove_target(gw: &dyn AdminBackend, name: &str, target: &str) -> Response<Full<Bytes>> {
    let (name, target) = (name.to_owned(), target.to_owned());
    write_routes(gw, move |_, routes| {
        let existing = by_name(routes, &name)?;
        let mut route = existing.clone();
        let targets = route.route["upstream"]["targets"]
            .as_array_mut()
            .ok_or_else(not_found)?;
        let before = targets.len();
        targets.retain(|t| t != target.as_str());
        if targets.len() == before {
            return Err(not_found());
        }
        Ok((Some(route), no_content()))
    })
    .await
}

/// Deletes an API route (of one origin, when given).
async fn delete_route(
    gw: &dyn AdminBackend,
    name: &str,
    origin: Option<Origin>,
) -> Response<Full<Bytes>> {
    let name = name.to_owned();
    let _one = gw.admin_write_lock().await;
    let file = gw.file_config();
    let removed = blocking(move || {
        let store = dynamic::store(&file)?;
        let routes = dynamic::api_routes(&*store)?;
        let found = routes
            .iter()
            .find(|r| (r.name() == name || r.id == name) && origin.is_none_or(|o| r.origin == o));
        match found {
            None => Ok(false),
            Some(r) => store
                .remove(Table::ApiRoutes, r.name())
                .map_err(|e| e.to_string()),
        }
    })
    .await;
    drop(_one);
    match removed {
        Err(e) => store_failed(e),
        Ok(false) => not_found(),
        Ok(true) => match gw.routes_changed().await {
            Ok(()) => no_content(),
            Err(e) => store_failed(e),
        },
    }
}

async fn stored_routes(gw: &dyn AdminBackend) -> Result<Vec<ApiRoute>, Response<Full<Bytes>>> {
    let file = gw.file_config();
    blocking(move || match dynamic::existing_store(&file)? {
        None => Ok(Vec::new()),
        Some(store) => dynamic::api_routes(&*store),
    })
    .await
    .map_err(store_failed)
}

async fn list_kong(gw: &dyn AdminBackend, origin: Origin) -> Response<Full<Bytes>> {
    match stored_routes(gw).await {
        Err(r) => r,
        Ok(routes) => {
            let data: Vec<Value> = routes
                .into_iter()
                .filter(|r| r.origin == origin)
                .filter_map(|r| r.kong)
                .collect();
            json_response(
                StatusCode::OK,
                &json!({ "total": data.len(), "data": data, "next": null }),
            )
        }
    }
}

async fn get_kong_api(gw: &dyn AdminBackend, name: &str) -> Response<Full<Bytes>> {
    match stored_routes(gw).await {
        Err(r) => r,
        Ok(routes) => routes
            .into_iter()
            .find(|r| r.origin == Origin::KongApi && (r.name() == name || r.id == name))
            .and_then(|r| r.kong)
            .map_or_else(not_found, |k| json_response(StatusCode::OK, &k)),
    }
}

/// Kong 0.x create (`POST /apis`: 409 when it exists), create-or-replace
/// (`PUT /apis`) and update (`PATCH /apis/{name}`: fields merged into the
/// stored object).
async fn put_kong_api(
    gw: &dyn AdminBackend,
    name: Option<&str>,
    doc: Value,
    replace: bool,
) -> Response<Full<Bytes>> {
    let obj = match object(&doc) {
        Ok(o) => o.clone(),
        Err(r) => return r,
    };
    let patch_of = name.map(str::to_owned);
    write_routes(gw, move |_, routes| {
        let mut fields = obj;
        let target_name = match &patch_of {
            Some(n) => n.clone(),
            None => kong::string(&fields, "name").map_err(field_error)?.unwrap_or_default().to_owned(),
        };
        let existing = routes
            .iter()
            .find(|r| r.origin == Origin::KongApi && (r.name() == target_name || r.id == target_name));
        if patch_of.is_some() {
            let existing = existing.ok_or_else(not_found)?;
            let mut merged = existing.kong.clone().unwrap_or_default().as_object().cloned().unwrap_or_default();
            merged.extend(fields);
            // The name in the URL stays: a body cannot move the update onto
            // another route.
            merged.insert("name".into(), json!(existing.name()));
            fields = merged;
        } else if existing.is_some() && !replace {
            return Err(json_response(
                StatusCode::CONFLICT,
                &json!({ "message": format!("already exists with value '{target_name}'"), "name": format!("already exists with value '{target_name}'") }),
            ));
        }
        if routes.iter().any(|r| r.name() == target_name && r.origin != Origin::KongApi) {
            return Err(error(StatusCode::CONFLICT, format!("a route named `{target_name}` exists")));
        }
        let id = existing.map_or_else(dynamic::new_id, |e| e.id.clone());
        let created = existing.map_or_else(dynamic::now_ms, |e| e.created_at);
        let (route, kong_obj) = kong::api(&fields, &id, created).map_err(field_error)?;
        let status = if existing.is_some() { StatusCode::OK } else { StatusCode::CREATED };
        let resp = json_response(status, &kong_obj);
        Ok((
            Some(ApiRoute { route, origin: Origin::KongApi, id, created_at: created, kong: Some(kong_obj), service: None }),
            resp,
        ))
    })
    .await
}

async fn services(gw: &dyn AdminBackend) -> Result<Vec<KongService>, Response<Full<Bytes>>> {
    let file = gw.file_config();
    blocking(move || match dynamic::existing_store(&file)? {
        None => Ok(Vec::new()),
        Some(store) => dynamic::kong_services(&*store),
    })
    .await
    .map_err(store_failed)
}

async fn list_services(gw: &dyn AdminBackend) -> Response<Full<Bytes>> {
    match services(gw).await {
        Err(r) => r,
        Ok(list) => {
            let data: Vec<Value> = list.iter().map(kong::service_object).collect();
            json_response(StatusCode::OK, &json!({ "data": data, "next": null }))
        }
    }
}

async fn get_service(gw: &dyn AdminBackend, name: &str) -> Response<Full<Bytes>> {
    match services(gw).await {
        Err(r) => r,
        Ok(list) => list
            .iter()
            .find(|s| s.name == name || s.id == name)
            .map_or_else(not_found, |s| {
                json_response(StatusCode::OK, &kong::service_object(s))
            }),
    }
}

/// Kong >= 1.0 `POST /services` (409 when it exists) and `PUT`/`PATCH
/// /services/{name}` (create or update; its routes follow the new URL).
async fn put_service(
    gw: &dyn AdminBackend,
    name: Option<&str>,
    doc: Value,
) -> Response<Full<Bytes>> {
    let obj = match object(&doc) {
        Ok(o) => o.clone(),
        Err(r) => return r,
    };
    let url_name = name.map(str::to_owned);
    let _one = gw.admin_write_lock().await;
    let file = gw.file_config();
    let result = blocking(move || {
        let store = dynamic::store(&file)?;
        let existing_services = dynamic::kong_services(&*store)?;
        let routes = dynamic::api_routes(&*store)?;
        let respond = |r: Response<Full<Bytes>>| Ok::<_, String>(Err(r));
        let name = match (&url_name, kong::string(&obj, "name")) {
            (Some(n), _) => n.clone(),
            (None, Ok(Some(n))) => n.to_owned(),
            (None, Ok(None)) => return respond(field_error(("name".into(), "name is required".into()))),
            (None, Err(e)) => return respond(field_error(e)),
        };
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
            return respond(field_error(("name".into(), "letters, digits, `-`, `_` and `.` only".into())));
        }
        let existing = existing_services.iter().find(|s| s.name == name);
        if existing.is_some() && url_name.is_none() {
            return respond(json_response(
                StatusCode::CONFLICT,
                &json!({ "message": format!("UNIQUE violation detected on '{{name=\"{name}\"}}'"), "name": "unique constraint violation" }),
            ));
        }
        let url = match kong::service_url(&obj) {
            Ok(u) => u,
            Err(e) if existing.is_some() && obj.get("url").is_none() && obj.get("host").is_none() => {
                let _ = e;
                existing.map(|s| s.url.clone()).unwrap_or_default()
            }
            Err(e) => return respond(field_error(e)),
        };
        let service = KongService {
            name: name.clone(),
            id: existing.map_or_else(dynamic::new_id, |s| s.id.clone()),
            url,
            created_at: existing.map_or_else(dynamic::now_ms, |s| s.created_at),
        };
        // Its routes follow the new URL; each must still be valid.
        let mut updated = Vec::new();
        for r in routes.iter().filter(|r| r.service.as_deref() == Some(name.as_str())) {
            let kong_obj = r.kong.clone().unwrap_or_default();
            let fields = kong_obj.as_object().cloned().unwrap_or_default();
            match kong::service_route(&fields, &service, r.name(), &r.id, r.created_at) {
                Ok((route, k)) => updated.push(ApiRoute { route, kong: Some(k), ..r.clone() }),
                Err(e) => return respond(field_error(e)),
            }
        }
        let others: Vec<ApiRoute> = routes
            .iter()
            .filter(|r| r.service.as_deref() != Some(name.as_str()))
            .cloned()
            .collect();
        for r in &updated {
            if let Err(errors) = dynamic::check_candidate(&file, &others, &r.route) {
                return respond(config_errors(&errors));
            }
        }
        store.put_record(Table::KongServices, &name, &service).map_err(|e| e.to_string())?;
        for r in &updated {
            store.put_record(Table::ApiRoutes, r.name(), r).map_err(|e| e.to_string())?;
        }
        let status = if existing.is_some() { StatusCode::OK } else { StatusCode::CREATED };
        Ok(Ok((json_response(status, &kong::service_object(&service)), !updated.is_empty())))
    })
    .await;
    drop(_one);
    match result {
        Err(e) => store_failed(e),
        Ok(Err(resp)) => resp,
        Ok(Ok((resp, routes_moved))) => {
            if routes_moved && let Err(e) = gw.routes_changed().await {
                return store_failed(e);
            }
            resp
        }
    }
}

/// Kong refuses to delete a service that still has routes.
async fn delete_service(gw: &dyn AdminBackend, name: &str) -> Response<Full<Bytes>> {
    let name = name.to_owned();
    let _one = gw.admin_write_lock().await;
    let file = gw.file_config();
    let result = blocking(move || {
        let store = dynamic::store(&file)?;
        let services = dynamic::kong_services(&*store)?;
        let Some(service) = services.iter().find(|s| s.name == name || s.id == name) else {
            return Ok(Err(not_found()));
        };
        let routes = dynamic::api_routes(&*store)?;
        if routes
            .iter()
            .any(|r| r.service.as_deref() == Some(service.name.as_str()))
        {
            return Ok(Err(error(
                StatusCode::BAD_REQUEST,
                "an existing 'routes' entity references this 'services' entity",
            )));
        }
        store
            .remove(Table::KongServices, &service.name)
            .map_err(|e| e.to_string())?;
        Ok(Ok(()))
    })
    .await;
    match result {
        Err(e) => store_failed(e),
        Ok(Err(r)) => r,
        Ok(Ok(())) => no_content(),
    }
}

async fn list_service_routes(gw: &dyn AdminBackend, name: &str) -> Response<Full<Bytes>> {
    match stored_routes(gw).await {
        Err(r) => r,
        Ok(routes) => {
            let data: Vec<Value> = routes
                .into_iter()
                .filter(|r| r.service.as_deref() == Some(name))
                .filter_map(|r| r.kong)
                .collect();
            json_response(StatusCode::OK, &json!({ "data": data, "next": null }))
        }
    }
}

/// Kong >= 1.0 `POST /services/{name}/routes`: the tollgate route is named
/// `{service}.{route name or id}`.
async fn add_service_route(
    gw: &dyn AdminBackend,
    service_name: &str,
    doc: Value,
) -> Response<Full<Bytes>> {
    let obj = match object(&doc) {
        Ok(o) => o.clone(),
        Err(r) => return r,
    };
    let svc = match services(gw).await {
        Err(r) => return r,
        Ok(list) => match list
            .into_iter()
            .find(|s| s.name == service_name || s.id == service_name)
        {
            Some(s) => s,
            None => return not_found(),
        },
    };
    write_routes(gw, move |_, routes| {
        let id = dynamic::new_id();
        let label = match kong::string(&obj, "name").map_err(field_error)? {
            Some(n) => n.to_owned(),
            None => id.clone(),
        };
        let route_name = format!("{}.{label}", svc.name);
        if routes.iter().any(|r| r.name() == route_name) {
            return Err(json_response(
                StatusCode::CONFLICT,
                &json!({ "message": format!("UNIQUE violation detected on '{{name=\"{label}\"}}'") }),
            ));
        }
        let created = dynamic::now_ms();
        let (route, kong_obj) =
            kong::service_route(&obj, &svc, &route_name, &id, created).map_err(field_error)?;
        let resp = json_response(StatusCode::CREATED, &kong_obj);
        Ok((
            Some(ApiRoute { route, origin: Origin::KongRoute, id, created_at: created, kong: Some(kong_obj), service: Some(svc.name.clone()) }),
            resp,
        ))
    })
    .await
}

async fn get_kong_route(gw: &dyn AdminBackend, id: &str) -> Response<Full<Bytes>> {
    match stored_routes(gw).await {
        Err(r) => r,
        Ok(routes) => routes
            .into_iter()
            .find(|r| {
                r.origin == Origin::KongRoute
                    && (r.id == id || r.kong.as_ref().is_some_and(|k| k["name"] == id))
            })
            .and_then(|r| r.kong)
            .map_or_else(not_found, |k| json_response(StatusCode::OK, &k)),
    }
}

async fn delete_kong_route(gw: &dyn AdminBackend, id: &str) -> Response<Full<Bytes>> {
    let name = match stored_routes(gw).await {
        Err(r) => return r,
        Ok(routes) => routes
            .into_iter()
            .find(|r| {
                r.origin == Origin::KongRoute
                    && (r.id == id || r.kong.as_ref().is_some_and(|k| k["name"] == id))
            })
            .map(|r| r.name().to_owned()),
    };
    match name {
        None => not_found(),
        Some(n) => delete_route(gw, &n, Some(Origin::KongRoute)).await,
    }
}
