//! Step 7 for a route whose upstream is `tunnel: <id>`: the request, with
//! the fields the gateway rewrote for its target, is read whole and
//! carried to the tunnel's peers; their answer becomes the response.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;

use super::body::{ClientBody, ProxyBody, RequestBody, RequestBodyError};
use super::error::GatewayError;
use super::headers;
use crate::transport::{CarriedRequest, CarriedResponse, CarryError, TunnelLink};

/// What the pipeline hands over.
pub struct Carry<'a> {
    pub link: &'a dyn TunnelLink,
    pub tunnel: &'a str,
    pub method: &'a str,
    /// The target: path and query, rewritten as the route says.
    pub target: &'a str,
    /// The outgoing field block (`name: value\r\n` lines).
    pub fields: &'a [u8],
    pub body: Option<ClientBody>,
    pub body_limit: usize,
    pub timeout: Duration,
}

pub async fn carry(c: Carry<'_>) -> Result<Response<ProxyBody>, GatewayError> {
    let started = tokio::time::Instant::now();
    // A body larger than the tunnel's messages cannot go: it is not read
    // past that (its encoded form is checked against the limit later).
    let limit = c
        .link
        .max_message(c.tunnel)
        .ok_or_else(|| GatewayError::Tunnel(CarryError::NoPeer(c.tunnel.to_owned())))?;
    let body_limit = c.body_limit.min(limit);
    let body = match c.body {
        None => Bytes::new(),
        Some(body) => {
            let body = RequestBody::streaming(body, body_limit, Arc::new(AtomicBool::new(false)));
            match tokio::time::timeout(c.timeout, body.collect()).await {
                Ok(Ok(collected)) => collected.to_bytes(),
                Ok(Err(RequestBodyError::TooLarge { limit })) => {
                    return Err(GatewayError::BodyTooLarge { limit });
                }
                Ok(Err(e)) => return Err(GatewayError::ClientBody(e.to_string())),
                Err(_) => {
                    return Err(GatewayError::ClientTimeout {
                        timeout_ms: c.timeout.as_millis(),
                    });
                }
            }
        }
    };
    let (path, query) = c.target.split_once('?').unwrap_or((c.target, ""));
    let mut content_type = None;
    let mut fields = Vec::new();
    for line in c.fields.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        // The body's form says its type and length (Micronets' rule).
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_owned());
        } else if !(name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("connection"))
        {
            fields.push((name.to_owned(), value.to_owned()));
        }
    }
    let request = CarriedRequest {
        method: c.method.to_owned(),
        path: path.to_owned(),
        query: form_urlencoded::parse(query.as_bytes())
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect(),
        headers: fields,
        content_type: content_type.filter(|_| !body.is_empty()),
        body,
    };
    let left = c.timeout.saturating_sub(started.elapsed());
    let answer = c
        .link
        .carry(c.tunnel, request, left)
        .await
        .map_err(GatewayError::Tunnel)?;
    response(c.tunnel, answer)
}

/// The peer's answer as the caller gets it: the fields it may set, with
/// the gateway's framing.
fn response(tunnel: &str, a: CarriedResponse) -> Result<Response<ProxyBody>, GatewayError> {
    let bad = |why: String| {
        GatewayError::Tunnel(CarryError::BadAnswer {
            id: tunnel.to_owned(),
            why,
        })
    };
    let status = StatusCode::from_u16(a.status).map_err(|_| bad(format!("status {}", a.status)))?;
    let mut headers = HeaderMap::with_capacity(a.headers.len() + 1);
    for (name, value) in &a.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad(format!("`{name}` is not a header field name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| bad(format!("the `{name}` field's value is not valid")))?;
        headers.append(name, value);
    }
    headers::strip_hop_by_hop(&mut headers, false);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::CONTENT_TYPE);
    if let Some(t) = &a.content_type {
        let t =
            HeaderValue::from_str(t).map_err(|_| bad("`dataFormat` is not a media type".into()))?;
        headers.insert(header::CONTENT_TYPE, t);
    }
    let mut resp = Response::new(ProxyBody::full(a.body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}
