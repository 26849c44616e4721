//! One HTTP request from a command-line tool (`register-service`,
//! `register`): http or https (the system's roots, plus a CA of the
//! caller's), with a deadline.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The `message` of a JSON error body, else the body as text.
    pub fn message(&self) -> String {
        let text = String::from_utf8_lossy(&self.body).into_owned();
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(text)
    }
}

/// Why there is no answer; the caller says what it was trying to reach.
#[derive(Debug)]
pub enum SendError {
    BadRequest(String),
    /// Worth another try: the server is not there (yet) or did not answer.
    Unreachable(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::BadRequest(e) | SendError::Unreachable(e) => f.write_str(e),
        }
    }
}

/// Sends one request and reads the whole answer.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    extra_ca_pem: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, SendError> {
    let mut roots = super::tls::system_roots().clone();
    if let Some(pem) = extra_ca_pem {
        super::tls::add_roots(&mut roots, pem).map_err(SendError::BadRequest)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(super::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SendError::BadRequest(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| SendError::BadRequest(format!("bad URL `{url}`: {e}")))?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| SendError::Unreachable(crate::telemetry::error_chain(&e)))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| SendError::Unreachable(format!("the answer was cut short: {e}")))?
            .to_bytes();
        Ok(Answer { status, body })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(SendError::Unreachable(format!(
                "{url} did not answer within {timeout:?}"
            )))
        })
}
