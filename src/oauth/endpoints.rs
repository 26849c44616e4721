//! The token server's HTTP endpoints and their errors (RFC 6749 §5.2 JSON).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};

use super::clients::{AssertionKeys, cert_matches};
use super::{Client, OAuthServer};
use crate::identity::CertIdentity;
use crate::identity::jwt::keys::KeySet;
use crate::identity::jwt::unix_now;
use crate::metrics::RouteMetrics;
use crate::transport::{LocalBody, LocalFuture, LocalService};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Introspect,
    Revoke,
    Jwks,
    Metadata,
}

impl Endpoint {
    const ALL: [Endpoint; 5] = [
        Endpoint::Token,
        Endpoint::Introspect,
        Endpoint::Revoke,
        Endpoint::Jwks,
        Endpoint::Metadata,
    ];

    /// The number a listener hands back (`LocalService::endpoint`).
    fn number(self) -> u16 {
        self as u16
    }

    fn from_number(n: u16) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.number() == n)
    }

    pub fn from_path(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/oauth2/token" | "/token" => Endpoint::Token,
            "/oauth2/introspect" => Endpoint::Introspect,
            "/oauth2/revoke" => Endpoint::Revoke,
            "/.well-known/jwks.json" => Endpoint::Jwks,
            "/.well-known/oauth-authorization-server" => Endpoint::Metadata,
            _ => return None,
        })
    }
}

/// An RFC 6749 §5.2 error.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: Cow<'static, str>,
    /// Seconds, for 429.
    retry_after: Option<u64>,
}

fn error(
    status: StatusCode,
    code: &'static str,
    description: impl Into<Cow<'static, str>>,
) -> OAuthError {
    OAuthError {
        status,
        code,
        description: description.into(),
        retry_after: None,
    }
}

fn invalid_request(d: impl Into<Cow<'static, str>>) -> OAuthError {
    error(StatusCode::BAD_REQUEST, "invalid_request", d)
}

fn invalid_client() -> OAuthError {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "client authentication failed",
    )
}

impl OAuthError {
    fn into_response(self) -> Response<Bytes> {
        let body = json!({"error": self.code, "error_description": self.description});
        let mut resp = json_response(self.status, body.to_string().into());
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tollgate\", error=\"invalid_client\""),
            );
        }
        resp
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Bytes> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// No token request needs more parameters than this.
const MAX_PARAMETERS: usize = 32;

/// Form parameters; a parameter may appear once (RFC 6749 §3.2), except the
/// RFC 8707 `resource` and `audience`, which may repeat.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Result<Form, OAuthError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in form_urlencoded::parse(body) {
            if pairs.len() == MAX_PARAMETERS {
                return Err(invalid_request(format!(
                    "more than {MAX_PARAMETERS} parameters"
                )));
            }
            let repeatable = k == "resource" || k == "audience";
            if !repeatable && !seen.insert(k.clone()) {
                return Err(invalid_request(format!(
                    "parameter `{}` is repeated",
                    truncate(&k)
                )));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Form(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl OAuthServer {
    async fn handle(
        self: Arc<Self>,
        ep: Endpoint,
        req: Request<LocalBody>,
        peer: IpAddr,
        cert: Option<&CertIdentity>,
    ) -> Response<Bytes> {
        let result = match ep {
            Endpoint::Jwks | Endpoint::Metadata => {
                if req.method() != Method::GET && req.method() != Method::HEAD {
                    Err(error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "invalid_request",
                        "use GET",
                    ))
                } else {
                    let body = match ep {
                        Endpoint::Jwks => self.keys.jwks_json.clone(),
                        _ => self.metadata_json.clone(),
                    };
                    let mut resp = json_response(StatusCode::OK, body);
                    // Short: validators elsewhere see a rotation within a minute.
                    resp.headers_mut()
                        .insert(CACHE_CONTROL, HeaderValue::from_static("max-age=60"));
                    resp.headers_mut().remove(PRAGMA);
                    Ok(resp)
                }
            }
            Endpoint::Token | Endpoint::Introspect | Endpoint::Revoke => {
                self.post(ep, req, peer, cert).await
            }
        };
        result.unwrap_or_else(OAuthError::into_response)
    }

    async fn post(
        &self,
        ep: Endpoint,
        req: Request<LocalBody>,
        peer: IpAddr,
        cert: Option<&CertIdentity>,
    ) -> Result<Response<Bytes>, OAuthError> {
        if req.method() != Method::POST {
            return Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "use POST",
            ));
        }
        let form_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form_type {
            return Err(invalid_request(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let (parts, body) = req.into_parts();
        let body = read_body(body, self.max_body)
            .await
            .map_err(|e| invalid_request(format!("cannot read the body: {e}")))?;
        let form = Form::parse(&body)?;
        let client = self.authenticate(&parts.headers, &form, peer, cert).await?;
        match ep {
            Endpoint::Token => self.token(&client, &form, cert),
            Endpoint::Introspect => self.introspect(&client, &form),
            _ => self.revoke(&client, &form).await,
        }
    }

    /// One of `client_secret_basic`, `client_secret_post`, `private_key_jwt`
    /// or `tls_client_auth`. Failures count against the client id and the
    /// source address.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        form: &Form,
        peer: IpAddr,
        cert: Option<&CertIdentity>,
    ) -> Result<Arc<Client>, OAuthError> {
        let presented = match presented(headers, form, cert) {
            Ok(p) => p,
            Err((reason, e)) => {
                if let Some(reason) = reason {
                    self.auth_failed(reason);
                    self.limiter.failed(None, peer);
                }
                return Err(e);
            }
        };
        let id = presented.client_id();
        // Failures count per known client (made-up ids cannot fill the table).
        let known = id
            .as_deref()
            .filter(|i| i.len() <= 128 && self.clients.get(i).is_some());
        if let Some(wait) = self.limiter.blocked(known, peer) {
            self.auth_failed("rate_limited");
            return Err(OAuthError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "slow_down",
                description: format!(
                    "too many failed client authentications; retry in {}s",
                    wait.as_secs().max(1)
                )
                .into(),
                retry_after: Some(wait.as_secs().max(1)),
            });
        }
        let (method, found) = match &presented {
            Presented::Secret(id, secret) => (
                "client_secret",
                self.clients.authenticate(id, secret).cloned(),
            ),
            Presented::Certificate(id, cert) => (
                "tls_client_auth",
                self.clients
                    .get(id)
                    .filter(|c| c.tls.as_ref().is_some_and(|t| cert_matches(t, cert)))
                    .cloned(),
            ),
            Presented::Assertion(assertion) => (
                "private_key_jwt",
                self.check_assertion(assertion, form.get("client_id")).await,
            ),
        };
        match found {
            Some(c) if c.enabled => Ok(c),
            found => {
                let reason = if found.is_some() {
                    "disabled"
                } else {
                    "bad_credentials"
                };
                self.auth_failed(reason);
                self.limiter.failed(known, peer);
                // The id is what the caller claimed; never the credential.
                tracing::info!(client = %truncate(id.as_deref().unwrap_or("-")), %peer, method, reason,
                    "client authentication failed");
                Err(invalid_client())
            }
        }
    }

    /// A `private_key_jwt` assertion (RFC 7523): signed by the client's key,
    /// `iss` = `sub` = the client, our token endpoint or issuer in `aud`, an
    /// `exp` at most 10 minutes out, and a `jti` never seen before.
    async fn check_assertion(&self, assertion: &str, form_id: Option<&str>) -> Option<Arc<Client>> {
        let claimed = crate::identity::jwt::JwtProvider::peek_issuer(assertion)?;
        if form_id.is_some_and(|f| f != claimed) {
            return None;
        }
        let client = self.clients.get(&claimed)?;
        let header = jsonwebtoken::decode_header(assertion).ok()?;
        let keys = match client.assertion_keys.as_ref()? {
            AssertionKeys::Static(k) => k.clone(),
            AssertionKeys::Remote(remote) => {
                if remote.keys().is_empty() {
                    remote.first_fetch().await;
                }
                let known = |k: &KeySet| header.kid.as_deref().is_none_or(|kid| k.has_kid(kid));
                if !known(&remote.keys()) {
                    // A key the client rotated in (rate-limited refetch).
                    remote.refetch_for_unknown_kid().await;
                }
                remote.keys()
            }
        };
        if matches!(
            header.alg,
            jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512
        ) {
            return None;
        }
        let base = self.issuer.trim_end_matches('/');
        let audiences = [
            self.issuer.clone(),
            format!("{base}/oauth2/token"),
            format!("{base}/token"),
        ];
        for key in keys.candidates(header.alg, header.kid.as_deref()) {
            let mut v = jsonwebtoken::Validation::new(header.alg);
            v.set_issuer(&[&client.id]);
            v.set_audience(&audiences);
            v.sub = Some(client.id.clone());
            v.leeway = 30;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
            let Ok(data) = jsonwebtoken::decode::<Map<String, Value>>(assertion, &key.key, &v)
            else {
                continue;
            };
            let exp = data.claims.get("exp").and_then(Value::as_u64)?;
            let jti = data.claims.get("jti").and_then(Value::as_str)?;
            if jti.is_empty() || jti.len() > 256 || exp > unix_now() + MAX_ASSERTION_LIFETIME {
                return None;
            }
            // Replays: a jti is accepted once until its assertion expires.
            return self
                .replays
                .first_use(&client.id, jti, exp)
                .then(|| client.clone());
        }
        None
    }

    fn auth_failed(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    fn token(
        &self,
        client: &Client,
        form: &Form,
        cert: Option<&CertIdentity>,
    ) -> Result<Response<Bytes>, OAuthError> {
        match form.get("grant_type") {
            None => return Err(invalid_request("grant_type is missing")),
            Some("client_credentials") => {}
            Some(other) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    format!(
                        "`{}` is not supported; use client_credentials",
                        truncate(other)
                    ),
                ));
            }
        }
        let scopes = allowed_subset(
            form.get("scope").map(|s| s.split_whitespace().collect()),
            &client.scopes,
            "invalid_scope",
            "scope",
        )?;
        let requested: Vec<&str> = form.all("resource").chain(form.all("audience")).collect();
        let audiences = allowed_subset(
            (!requested.is_empty()).then_some(requested),
            &client.audiences,
            "invalid_target",
            "audience",
        )?;
        let now = unix_now();
        let ttl = client.ttl.as_secs();
        let mut claims: Map<String, Value> = client
            .claims
            .iter()
            .filter(|(k, _)| !crate::identity::jwt::RESERVED_CLAIMS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        claims.insert("iss".into(), self.issuer.clone().into());
        claims.insert("sub".into(), client.id.clone().into());
        match audiences.as_slice() {
            [] => {}
            [one] => {
                claims.insert("aud".into(), one.clone().into());
            }
            many => {
                claims.insert("aud".into(), many.into());
            }
        }
        claims.insert("exp".into(), (now + ttl).into());
        claims.insert("iat".into(), now.into());
        claims.insert("nbf".into(), now.into());
        claims.insert("jti".into(), token_id().into());
        claims.insert("client_id".into(), client.id.clone().into());
        let scope = scopes.join(" ");
        if !scope.is_empty() {
            claims.insert("scope".into(), scope.clone().into());
        }
        // Asked for over mutual TLS: bound to that certificate (RFC 8705 §3).
        if let Some(cert) = cert {
            claims.insert("cnf".into(), json!({"x5t#S256": cert.x5t_s256}));
        }
        let key = &self.keys.signing;
        let mut header = jsonwebtoken::Header::new(key.algorithm);
        header.typ = Some("at+jwt".into());
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding).map_err(|e| {
            tracing::error!(error = %e, "signing a token failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the token could not be signed",
            )
        })?;
        self.issued.with_label_values(&[&client.id]).inc();
        let mut body = json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": ttl,
        });
        if !scope.is_empty() {
            body["scope"] = scope.into();
        }
        Ok(json_response(StatusCode::OK, body.to_string().into()))
    }

    /// The claims of a token this server issued, if its signature, issuer and
    /// expiry hold and it is not revoked.
    fn active_claims(&self, token: &str) -> Option<Map<String, Value>> {
        let claims = self.issued_claims(token)?;
        let jti = claims.get("jti").and_then(Value::as_str)?;
        (!self.revocations.is_revoked(jti)).then_some(claims)
    }

    /// The claims of a token this server issued that has not expired,
    /// revoked or not.
    fn issued_claims(&self, token: &str) -> Option<Map<String, Value>> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let keys = &self.keys.verify;
        for key in keys.candidates(header.alg, header.kid.as_deref()) {
            let mut v = jsonwebtoken::Validation::new(header.alg);
            v.set_issuer(&[&self.issuer]);
            v.validate_aud = false;
            v.leeway = 0;
            v.set_required_spec_claims(&["exp", "iss", "jti"]);
            if let Ok(data) = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v) {
                return Some(data.claims);
            }
        }
        None
    }

    /// A client learns about its own tokens; one registered with
    /// `introspect` (a resource server) about any. Others are "inactive"
    /// (RFC 7662 §2.2), which says nothing about them.
    fn introspect(&self, caller: &Client, form: &Form) -> Result<Response<Bytes>, OAuthError> {
        let token = form
            .get("token")
            .ok_or_else(|| invalid_request("token is missing"))?;
        let visible = self.active_claims(token).filter(|claims| {
            caller.introspect
                || claims.get("client_id").and_then(Value::as_str) == Some(caller.id.as_str())
        });
        let body = match visible {
            None => json!({"active": false}),
            Some(mut claims) => {
                claims.insert("active".into(), true.into());
                claims.insert("token_type".into(), "Bearer".into());
                Value::Object(claims)
            }
        };
        Ok(json_response(StatusCode::OK, body.to_string().into()))
    }

    /// Revokes a token of the calling client until it would have expired.
    /// An unknown, expired or foreign token is answered 200 as well (RFC 7009
    /// §2.2): the caller learns nothing about other clients' tokens.
    async fn revoke(&self, client: &Client, form: &Form) -> Result<Response<Bytes>, OAuthError> {
        let token = form
            .get("token")
            .ok_or_else(|| invalid_request("token is missing"))?;
        // Revoked already (on this node, perhaps with a 503 because the store
        // failed): saved again, so a retry makes it durable.
        if let Some(claims) = self.issued_claims(token) {
            let owner = claims.get("client_id").and_then(Value::as_str);
            let jti = claims.get("jti").and_then(Value::as_str);
            let exp = claims.get("exp").and_then(Value::as_u64);
            if let (Some(owner), Some(jti), Some(exp)) = (owner, jti, exp)
                && owner == client.id
            {
                // Refused on this node at once, whatever the store says.
                self.revocations.revoke(jti, exp);
                if let Some(store) = self.store.clone() {
                    // An fsync, and possibly a wait for the CLI's lock: not
                    // on the event loop.
                    let jti_owned = jti.to_owned();
                    let saved =
                        tokio::task::spawn_blocking(move || store.revoke(&jti_owned, exp)).await;
                    let failed = match saved {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(e) => Some(e.to_string()),
                    };
                    // A 200 means durable: without it the caller retries
                    // (the revocation would not survive a restart).
                    if let Some(why) = failed {
                        tracing::error!(client = %client.id, jti, error = %why,
                            "revocation not saved to the store; answered 503 so the caller retries");
                        return Err(OAuthError {
                            retry_after: Some(1),
                            ..error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "temporarily_unavailable",
                                "the revocation could not be saved; try again",
                            )
                        });
                    }
                }
                tracing::info!(client = %client.id, jti, "token revoked");
            }
        }
        Ok(json_response(StatusCode::OK, Bytes::new()))
    }
}

/// The requested values (deduplicated) when each is allowed; all allowed
/// values when none are requested.
fn allowed_subset(
    requested: Option<Vec<&str>>,
    allowed: &[String],
    code: &'static str,
    what: &str,
) -> Result<Vec<String>, OAuthError> {
    let Some(requested) = requested else {
        return Ok(allowed.to_vec());
    };
    let mut out: Vec<String> = Vec::new();
    for r in requested {
        if !allowed.iter().any(|a| a == r) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                code,
                format!("{what} `{}` is not allowed for this client", truncate(r)),
            ));
        }
        if !out.iter().any(|o| o == r) {
            out.push(r.to_owned());
        }
    }
    Ok(out)
}

/// Assertions may not live longer than this (seconds), so the replay cache
/// stays small.
const MAX_ASSERTION_LIFETIME: u64 = 600;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The credential a request presents.
enum Presented<'f> {
    Secret(Cow<'f, str>, Cow<'f, str>),
    Assertion(&'f str),
    /// `client_id` in the body, with the connection's verified certificate.
    Certificate(&'f str, &'f CertIdentity),
}

impl Presented<'_> {
    /// The client id the request claims, before anything is verified.
    fn client_id(&self) -> Option<Cow<'_, str>> {
        match self {
            Presented::Secret(id, _) => Some(Cow::Borrowed(id)),
            Presented::Certificate(id, _) => Some(Cow::Borrowed(id)),
            Presented::Assertion(a) => {
                crate::identity::jwt::JwtProvider::peek_issuer(a).map(Cow::Owned)
            }
        }
    }
}

/// Which credential the request carries; more than one is refused. Errors
/// carry the failure reason to count (`None` for a malformed request).
#[allow(clippy::type_complexity)]
fn presented<'f>(
    headers: &HeaderMap,
    form: &'f Form,
    cert: Option<&'f CertIdentity>,
) -> Result<Presented<'f>, (Option<&'static str>, OAuthError)> {
    let basic = match headers.get(AUTHORIZATION) {
        None => None,
        Some(v) => Some(basic_credentials(v).ok_or((Some("malformed"), invalid_client()))?),
    };
    let assertion = match (
        form.get("client_assertion_type"),
        form.get("client_assertion"),
    ) {
        (None, None) => None,
        (Some(JWT_BEARER), Some(a)) => Some(a),
        (Some(_), Some(_)) => {
            return Err((
                None,
                invalid_request(format!("client_assertion_type must be {JWT_BEARER}")),
            ));
        }
        _ => {
            return Err((
                None,
                invalid_request("client_assertion and client_assertion_type go together"),
            ));
        }
    };
    let secret = form.get("client_secret");
    let methods = usize::from(basic.is_some())
        + usize::from(secret.is_some())
        + usize::from(assertion.is_some());
    if methods > 1 {
        return Err((
            None,
            invalid_request("more than one client authentication method"),
        ));
    }
    if let Some((id, secret)) = basic {
        return Ok(Presented::Secret(Cow::Owned(id), Cow::Owned(secret)));
    }
    if let Some(a) = assertion {
        return Ok(Presented::Assertion(a));
    }
    match (form.get("client_id"), secret, cert) {
        (Some(id), Some(secret), _) => {
            Ok(Presented::Secret(Cow::Borrowed(id), Cow::Borrowed(secret)))
        }
        (None, Some(_), _) => Err((None, invalid_request("client_secret without client_id"))),
        (Some(id), None, Some(cert)) => Ok(Presented::Certificate(id, cert)),
        _ => Err((Some("missing"), invalid_client())),
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn basic_credentials(v: &HeaderValue) -> Option<(String, String)> {
    let v = v.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

fn form_decode(s: &str) -> Option<String> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

/// A 128-bit random token id.
fn token_id() -> String {
    let mut raw = [0u8; 16];
    // The system RNG does not fail on supported platforms; a zero id would
    // still be unique enough not to matter for one token.
    let _ = aws_lc_rs::rand::fill(&mut raw);
    crate::identity::hex(&raw)
}

/// Caller-supplied text in messages and logs, bounded.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A form body, at most `limit` bytes.
async fn read_body(mut body: LocalBody, limit: usize) -> Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("longer than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// The token server answers its endpoints itself on the listeners that
/// serve it; the HTTP front-end finds it through `transport::LocalServices`.
impl LocalService for OAuthServer {
    fn name(&self) -> &str {
        "oauth"
    }

    fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    fn endpoint(&self, listener: &str, path: &str) -> Option<u16> {
        OAuthServer::endpoint(self, listener, path).map(Endpoint::number)
    }

    fn serve<'a>(
        self: Arc<Self>,
        endpoint: u16,
        request: Request<LocalBody>,
        peer: IpAddr,
        cert: Option<&'a CertIdentity>,
    ) -> LocalFuture<'a> {
        // Boxed: the token server's future is large, and seldom needed.
        Box::pin(async move {
            match Endpoint::from_number(endpoint) {
                Some(ep) => self.handle(ep, request, peer, cert).await,
                None => json_response(StatusCode::NOT_FOUND, Bytes::new()),
            }
        })
    }
}

/// The token server's endpoints while it waits for its store: 503, so a
/// client retries (a 404 would say there is no token server at all).
pub struct StoreWaiting {
    pub listeners: Vec<String>,
    pub metrics: RouteMetrics,
}

impl LocalService for StoreWaiting {
    fn name(&self) -> &str {
        "oauth"
    }

    fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    fn endpoint(&self, listener: &str, path: &str) -> Option<u16> {
        let ep = Endpoint::from_path(path)?;
        self.listeners
            .iter()
            .any(|l| l == listener)
            .then_some(ep.number())
    }

    fn serve<'a>(
        self: Arc<Self>,
        _endpoint: u16,
        _request: Request<LocalBody>,
        _peer: IpAddr,
        _cert: Option<&'a CertIdentity>,
    ) -> LocalFuture<'a> {
        Box::pin(async {
            let body = serde_json::json!({
                "error": "temporarily_unavailable",
                "error_description": "the token server waits for its store; retry shortly",
            });
            let mut r = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from(body.to_string()),
            );
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_decoded() {
        let enc = base64::engine::general_purpose::STANDARD.encode("my%3Aid:s+e%26cret");
        let v = HeaderValue::from_str(&format!("Basic {enc}")).unwrap();
        assert_eq!(
            basic_credentials(&v).unwrap(),
            ("my:id".to_string(), "s e&cret".to_string())
        );
        assert!(basic_credentials(&HeaderValue::from_static("Bearer x")).is_none());
        assert!(basic_credentials(&HeaderValue::from_static("Basic !!!")).is_none());
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert!(Form::parse(b"grant_type=a&grant_type=b").is_err());
        let f = Form::parse(b"resource=a&resource=b&scope=x").unwrap();
        assert_eq!(f.all("resource").collect::<Vec<_>>(), ["a", "b"]);
    }
}
