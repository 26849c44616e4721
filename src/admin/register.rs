//! `tollgate register-service`: a service's start script registers its
//! route with the gateway's admin API (Kong 0.x `PUT /apis`, so any
//! Kong-compatible gateway takes it too) and exits non-zero when that fails,
//! so a container can stop as Microkubes' registrator makes it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("bad URL `{url}`: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("{url} answered {}", resp.status())),
            Ok(Err(e)) => Err(format!("{url}: {}", crate::telemetry::error_chain(&e))),
            Err(_) => Err(format!("{url} did not answer within 5s")),
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
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(crate::transport::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(crate::transport::tls::system_roots())
                    .with_no_client_auth(),
            )
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let deadline = Instant::now() + r.wait;
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(&url)
                .header("content-type", "application/json");
            if let Some(t) = r.token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| format!("bad admin URL `{url}`: {e}"))?;
            match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    let text = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                        .unwrap_or_default();
                    return match status {
                        StatusCode::OK | StatusCode::CREATED => {
                            Ok(format!("registered {} ({status})", r.name))
                        }
                        StatusCode::NO_CONTENT => Ok(format!("deregistered {}", r.name)),
                        StatusCode::NOT_FOUND if deregister => {
                            Ok(format!("{} was not registered", r.name))
                        }
                        _ => {
                            let message = serde_json::from_str::<serde_json::Value>(&text)
                                .ok()
                                .and_then(|v| v["message"].as_str().map(str::to_owned))
                                .unwrap_or(text);
                            Err(format!("the gateway refused ({status}): {message}"))
                        }
                    };
                }
                Ok(Err(e)) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "admin API not reachable yet; retrying");
                }
                Ok(Err(e)) => {
                    return Err(format!(
                        "cannot reach the admin API at {base}: {}",
                        crate::telemetry::error_chain(&e)
                    ));
                }
                Err(_) if Instant::now() < deadline => {}
                Err(_) => return Err(format!("the admin API at {base} did not answer")),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    })
}
