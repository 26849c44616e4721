//! Every way a proxied request can fail, and the one place where a failure
//! becomes a response. Each error says whose fault it was (as pingora does):
//! the client's, the upstream's or the gateway's own.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use crate::identity::jwt::TokenError;
use crate::transport::CarryError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Upstream,
    Gateway,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Gateway => "gateway",
        }
    }
}

/// The `Display` text is for the operator's log and may name upstream
/// addresses; callers get [`GatewayError::public_message`].
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("request target longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("request headers exceed {limit} {what}")]
    HeadersTooLarge { limit: usize, what: &'static str },
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("bad request path: {0}")]
    BadPath(&'static str),
    #[error("bad Host: {0}")]
    BadHost(&'static str),
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("an expectation other than 100-continue")]
    ExpectationFailed,
    #[error("bad header field: {0}")]
    BadHeader(&'static str),
    #[error("reading the request body failed: {0}")]
    ClientBody(String),
    #[error("the client's body stalled for the route's timeout ({timeout_ms} ms)")]
    ClientTimeout { timeout_ms: u128 },
    #[error("no healthy upstream target")]
    NoHealthyTarget,
    #[error("connecting to upstream {target} failed: {detail}")]
    UpstreamConnect { target: String, detail: String },
    #[error("upstream {target} did not answer within {timeout_ms} ms")]
    UpstreamTimeout { target: String, timeout_ms: u128 },
    #[error("upstream {target} failed: {detail}")]
    UpstreamProtocol { target: String, detail: String },
    /// A request carried over a WebSocket tunnel got no usable answer.
    #[error("{0}")]
    Tunnel(crate::transport::CarryError),
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        realm: Arc<str>,
        /// The route takes bearer tokens: answer with a `Bearer` challenge.
        bearer: bool,
        reason: &'static str,
    },
    #[error("token refused by provider `{provider}`: {error}")]
    InvalidToken {
        realm: Arc<str>,
        provider: Arc<str>,
        error: TokenError,
    },
    #[error("malformed credentials: {reason}")]
    InvalidAuthRequest {
        realm: Arc<str>,
        reason: &'static str,
    },
    #[error("subject `{subject}` denied by the route's policy (rule {rule:?})")]
    Forbidden {
        realm: Arc<str>,
        bearer: bool,
        /// Scopes the policy's allow rules name, for the challenge.
        scope: String,
        rule: Option<usize>,
        subject: String,
    },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::BadPath(_)
            | GatewayError::BadHost(_)
            | GatewayError::BadHeader(_)
            | GatewayError::BadRequest(_)
            | GatewayError::ClientBody(_)
            | GatewayError::InvalidAuthRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::ExpectationFailed => StatusCode::EXPECTATION_FAILED,
            GatewayError::Unauthenticated { .. } | GatewayError::InvalidToken { .. } => {
                StatusCode::UNAUTHORIZED
            }
            GatewayError::Forbidden { .. } => StatusCode::FORBIDDEN,
            GatewayError::NoHealthyTarget => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamConnect { .. } | GatewayError::UpstreamProtocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Tunnel(e) => match e {
                CarryError::NoPeer(_) | CarryError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
                CarryError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                CarryError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                CarryError::PeerLeft(_) | CarryError::BadAnswer { .. } => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// Machine-readable error code, the `error` field of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::UriTooLong { .. } => "uri_too_long",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BadPath(_) => "bad_path",
            GatewayError::BadHost(_) => "bad_host",
            GatewayError::BadHeader(_) => "bad_header",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::ExpectationFailed => "expectation_failed",
            GatewayError::ClientBody(_) => "bad_request_body",
            GatewayError::ClientTimeout { .. } => "client_timeout",
            GatewayError::NoHealthyTarget => "no_healthy_upstream",
            GatewayError::UpstreamConnect { .. } => "upstream_unavailable",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::UpstreamProtocol { .. } => "upstream_error",
            GatewayError::Tunnel(e) => match e {
                CarryError::NoPeer(_) => "tunnel_no_peer",
                CarryError::Busy(_) => "tunnel_busy",
                CarryError::TooLarge { .. } => "body_too_large",
                CarryError::Timeout { .. } => "upstream_timeout",
                CarryError::PeerLeft(_) => "tunnel_peer_left",
                CarryError::BadAnswer { .. } => "upstream_error",
            },
            GatewayError::Unauthenticated { .. } => "unauthorized",
            GatewayError::InvalidToken { .. } => "invalid_token",
            GatewayError::InvalidAuthRequest { .. } => "invalid_request",
            GatewayError::Forbidden { bearer: true, .. } => "insufficient_scope",
            GatewayError::Forbidden { .. } => "forbidden",
        }
    }

    pub fn source(&self) -> ErrorSource {
        match self {
            GatewayError::NoRoute
            | GatewayError::UriTooLong { .. }
            | GatewayError::HeadersTooLarge { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::BadPath(_)
            | GatewayError::BadHost(_)
            | GatewayError::BadHeader(_)
            | GatewayError::BadRequest(_)
            | GatewayError::ExpectationFailed
            | GatewayError::ClientBody(_)
            | GatewayError::ClientTimeout { .. }
            | GatewayError::Unauthenticated { .. }
            | GatewayError::InvalidToken { .. }
            | GatewayError::InvalidAuthRequest { .. }
            | GatewayError::Forbidden { .. }
            | GatewayError::Tunnel(CarryError::TooLarge { .. }) => ErrorSource::Client,
            GatewayError::Tunnel(_) => ErrorSource::Upstream,
            GatewayError::UpstreamConnect { .. }
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamProtocol { .. } => ErrorSource::Upstream,
            GatewayError::NoHealthyTarget => ErrorSource::Gateway,
        }
    }

    /// What the caller is told: no upstream addresses or internal detail.
    pub fn public_message(&self) -> String {
        match self {
            GatewayError::ClientBody(_) => "the request body could not be read".into(),
            GatewayError::UpstreamConnect { .. } => "the upstream service is unreachable".into(),
            GatewayError::UpstreamTimeout { .. } => {
                "the upstream service did not answer in time".into()
            }
            GatewayError::UpstreamProtocol { .. } => "the upstream service failed to answer".into(),
            GatewayError::Unauthenticated { reason, .. } => (*reason).into(),
            GatewayError::InvalidToken { error, .. } => error.to_string(),
            GatewayError::InvalidAuthRequest { reason, .. } => (*reason).into(),
            GatewayError::Forbidden { .. } => "access to this resource is not allowed".into(),
            GatewayError::Tunnel(e) => match e {
                CarryError::NoPeer(_) => "no device is connected on the tunnel".into(),
                CarryError::Busy(_) => "too many requests wait on the tunnel".into(),
                CarryError::TooLarge { .. } => "the request is too large for the tunnel".into(),
                CarryError::Timeout { .. } => "the device did not answer in time".into(),
                CarryError::PeerLeft(_) => "the device left before answering".into(),
                CarryError::BadAnswer { .. } => "the device failed to answer".into(),
            },
            // The remaining messages hold only what the caller sent or limits.
            _ => self.to_string(),
        }
    }

    /// The response for this error: its status and a JSON body
    /// `{"error", "message", "request_id"}`.
    pub fn to_response(&self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.public_message(),
            "request_id": request_id.to_str().unwrap_or_default(),
        });
        let mut resp = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(challenge) = self
            .challenge()
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        resp
    }

    /// The RFC 6750 `WWW-Authenticate` challenge, for routes that take
    /// bearer tokens: no error code when no token came, `invalid_token`,
    /// `invalid_request` or `insufficient_scope` otherwise.
    fn challenge(&self) -> Option<String> {
        let quoted = |s: &str| s.replace(['"', '\\'], "");
        match self {
            GatewayError::Unauthenticated {
                realm,
                bearer: true,
                ..
            } => Some(format!("Bearer realm=\"{}\"", quoted(realm))),
            GatewayError::InvalidToken { realm, error, .. } => Some(format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
                quoted(realm),
                quoted(&error.to_string())
            )),
            GatewayError::InvalidAuthRequest { realm, reason } => Some(format!(
                "Bearer realm=\"{}\", error=\"invalid_request\", error_description=\"{}\"",
                quoted(realm),
                quoted(reason)
            )),
            GatewayError::Forbidden {
                realm,
                bearer: true,
                scope,
                ..
            } => {
                let mut c = format!(
                    "Bearer realm=\"{}\", error=\"insufficient_scope\"",
                    quoted(realm)
                );
                if !scope.is_empty() {
                    c.push_str(&format!(", scope=\"{}\"", quoted(scope)));
                }
                Some(c)
            }
            _ => None,
        }
    }
}
