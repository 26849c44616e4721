//! `tollgate register-service`: a service's start script registers its
//! route with the gateway's admin API (Kong 0.x `PUT /apis`, so any
//! Kong-compatible gateway takes it too) and exits non-zero when that fails,
//! so a container can stop as Microkubes' registrator makes it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::transport::http_client::{self, SendError};

pub struct Registration<'a> {
    /// The admin API's base URL, e.g. `http://127.0.0.1:9090`.
    pub admin: &'a str,
    pub name: &'a str,
    pub paths: &'a [String],
    pub hosts: &'a [String],
    /// Where the service listens: `http://<host>:<port>`.
    pub upstream_url: String,
    pub strip_path: bool,
    pub preserve_host: bool,
    pub token: Option<&'a str>,
    /// Keep trying this long while the gateway is not up yet.
    pub wait: Duration,
}

/// `GET url` answers 2xx within 5 seconds: `tollgate healthcheck`.
pub fn probe(url: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let answer = http_client::send(
            Method::GET,
            url,
            &[],
            Bytes::new(),
            None,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| format!("{url}: {e}"))?;
        match answer.status.is_success() {
            true => Ok(()),
            false => Err(format!("{url} answered {}", answer.status)),
        }
    })
}

/// Registers (or with `deregister`, removes) the service. Returns what to
/// print on success.
pub fn run(r: &Registration, deregister: bool) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let base = r.admin.trim_end_matches('/');
        let (method, url, body) = if deregister {
            (
                Method::DELETE,
                format!("{base}/apis/{}", r.name),
                Bytes::new(),
            )
        } else {
            let doc = serde_json::json!({
                "name": r.name,
                "uris": r.paths,
                "hosts": r.hosts,
                "upstream_url": r.upstream_url,
                "strip_uri": r.strip_path,
                "preserve_host": r.preserve_host,
            });
            (
                Method::PUT,
                format!("{base}/apis"),
                Bytes::from(doc.to_string()),
            )
        };
        let deadline = Instant::now() + r.wait;
        let mut backoff = Duration::from_millis(200);
        let auth = r.token.map(|t| format!("Bearer {t}"));
        loop {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = &auth {
                headers.push(("authorization", a.as_str()));
            }
            let sent = http_client::send(
                method.clone(),
                &url,
                &headers,
                body.clone(),
                None,
                Duration::from_secs(10),
            )
            .await;
            match sent {
                Ok(answer) => {
                    let status = answer.status;
                    return match status {
                        StatusCode::OK | StatusCode::CREATED => {
                            Ok(format!("registered {} ({status})", r.name))
                        }
                        StatusCode::NO_CONTENT => Ok(format!("deregistered {}", r.name)),
                        StatusCode::NOT_FOUND if deregister => {
                            Ok(format!("{} was not registered", r.name))
                        }
                        _ => Err(format!(
                            "the gateway refused ({status}): {}",
                            answer.message()
                        )),
                    };
                }
                Err(SendError::Unreachable(e)) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "admin API not reachable yet; retrying");
                }
                Err(SendError::Unreachable(e)) => {
                    return Err(format!("cannot reach the admin API at {base}: {e}"));
                }
                Err(e) => return Err(e.to_string()),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    })
}
