//! `/admin/users`: password users in the store (MQTT devices, WAMP
//! tickets), as `tollgate users` manages them. A change is written to the
//! store and takes effect at once; a generated password is returned once.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminBackend;
use super::api::{blocking, error, json_response, no_content, store_failed};
use crate::identity::User;
use crate::identity::passwords::{self, UserTopic};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDoc {
    #[serde(default)]
    name: Option<String>,
    /// Generated (and returned once) when absent.
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    topics: Vec<UserTopic>,
    #[serde(default)]
    claims: serde_json::Map<String, Value>,
}

pub async fn list(gw: &dyn AdminBackend) -> Response<Full<Bytes>> {
    let file = gw.file_config();
    let read = blocking(move || {
        // Reading never creates the store.
        match crate::store::existing(&file).map_err(|e| e.to_string())? {
            Some(store) => passwords::stored_users(&*store),
            None => Ok(Vec::new()),
        }
    })
    .await;
    match read {
        Ok(users) => {
            let data: Vec<Value> = users.iter().map(passwords::describe).collect();
            json_response(
                StatusCode::OK,
                &json!({ "total": data.len(), "data": data }),
            )
        }
        Err(e) => store_failed(e),
    }
}

pub async fn get(gw: &dyn AdminBackend, name: &str) -> Response<Full<Bytes>> {
    let (file, name) = (gw.file_config(), name.to_owned());
    let read =
        blocking(
            move || match crate::store::existing(&file).map_err(|e| e.to_string())? {
                Some(store) => passwords::stored_user(&*store, &name),
                None => Ok(None),
            },
        )
        .await;
    match read {
        Ok(Some(u)) => json_response(StatusCode::OK, &passwords::describe(&u)),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such user"),
        Err(e) => store_failed(e),
    }
}

/// `POST /admin/users` (`name` in the body; an existing name is 409) or
/// `PUT /admin/users/{name}` (creates or replaces).
pub async fn put(
    gw: &dyn AdminBackend,
    path_name: Option<&str>,
    doc: Value,
) -> Response<Full<Bytes>> {
    let doc: UserDoc = match serde_json::from_value(doc) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a user: {e}")),
    };
    let creating = path_name.is_none();
    let Some(name) = path_name.map(str::to_owned).or(doc.name.clone()) else {
        return error(StatusCode::BAD_REQUEST, "`name` is required");
    };
    if let Err(why) = passwords::usable_name(&name) {
        return error(StatusCode::BAD_REQUEST, format!("name: {why}"));
    }
    if let Err(e) = doc.topics.iter().try_for_each(UserTopic::check) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let given = doc.password.is_some();
    let (password, generated) = match passwords::new_password(doc.password) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let _one = gw.admin_write_lock().await;
    let (file, users, made_name, secret) = (
        gw.file_config(),
        gw.password_users(),
        name.clone(),
        password.clone(),
    );
    let written = blocking(move || {
        let store = crate::store::open(&file).map_err(|e| e.to_string())?;
        let existing = passwords::stored_user(&*store, &made_name)?;
        let existed = existing.is_some();
        if existed && creating {
            return Ok(None);
        }
        // A change of roles or topics keeps the password it had.
        let password_hash = match existing {
            Some(old) if !given => old.password_hash,
            _ => passwords::hash_password(secret.as_bytes())?,
        };
        let user = User {
            name: made_name,
            password_hash,
            roles: doc.roles,
            claims: doc.claims,
            topics: doc.topics,
        };
        passwords::put_user(&*store, &user)?;
        users.insert(user.clone());
        Ok(Some((user, existed)))
    })
    .await;
    match written {
        Ok(None) => error(StatusCode::CONFLICT, format!("user `{name}` exists")),
        Ok(Some((user, existed))) => {
            tracing::info!(user = %user.name, "user saved through the admin API");
            let mut body = passwords::describe(&user);
            if generated && (creating || !existed) {
                body["password"] = Value::String(password);
            }
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            json_response(status, &body)
        }
        Err(e) => store_failed(e),
    }
}

pub async fn delete(gw: &dyn AdminBackend, name: &str) -> Response<Full<Bytes>> {
    let _one = gw.admin_write_lock().await;
    let (file, users, target) = (gw.file_config(), gw.password_users(), name.to_owned());
    let removed = blocking(move || {
        let store = crate::store::open(&file).map_err(|e| e.to_string())?;
        let removed = passwords::remove_user(&*store, &target)?;
        if removed {
            users.remove(&target);
        }
        Ok(removed)
    })
    .await;
    match removed {
        Ok(true) => {
            tracing::info!(user = %name, "user removed through the admin API");
            no_content()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, "no such user"),
        Err(e) => store_failed(e),
    }
}
