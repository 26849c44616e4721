//! Authentication: reads the credentials the route asks for (a bearer
//! token, the connection's verified client certificate) and tells who the
//! caller is, as an [`Identity`]. A token already validated is answered from
//! the provider's cache without waiting; only a cache miss checks a
//! signature. Each connection also remembers its last `Authorization` field
//! ([`TokenMemo`]), which spares a keep-alive client's repeat requests the
//! field's parsing, the token's hash and the shared cache.

use std::borrow::Cow;
use std::sync::{Arc, Weak};

use aws_lc_rs::constant_time::verify_slices_are_equal;
use http::HeaderName;
use http::header::{AUTHORIZATION, COOKIE};

use super::error::GatewayError;
use super::router::FieldLookup;
use super::xfcc::XfccFields;
use crate::authz::Policy;
use crate::config::TokenSource;
use crate::identity::jwt::{JwtProvider, TokenDigest, TokenError};
use crate::identity::{CertIdentity, Identity};

/// A route's authentication and authorization settings, compiled.
pub struct RouteAuth {
    pub accept_jwt: bool,
    pub accept_mtls: bool,
    /// Both credentials are needed (`all_of`), not either.
    pub require_both: bool,
    pub providers: Vec<Arc<JwtProvider>>,
    /// Where tokens are read, the union over the route's providers.
    pub sources: Vec<TokenSource>,
    pub policy: Option<Policy>,
    /// Header set for the upstream -> identity field or claim.
    pub forward_claims: Vec<(HeaderName, String)>,
    pub forward_token: bool,
    /// Client certificate fields sent upstream in `x-forwarded-client-cert`.
    pub forward_client_cert: XfccFields,
    /// Every identity header any route sets: removed from every request.
    pub identity_headers: Arc<[HeaderName]>,
    pub realm: Arc<str>,
}

impl RouteAuth {
    pub fn open(identity_headers: Arc<[HeaderName]>, realm: Arc<str>) -> RouteAuth {
        RouteAuth {
            accept_jwt: false,
            accept_mtls: false,
            require_both: false,
            providers: Vec::new(),
            sources: Vec::new(),
            policy: None,
            forward_claims: Vec::new(),
            forward_token: true,
            forward_client_cert: XfccFields::default(),
            identity_headers,
            realm,
        }
    }

    pub(super) fn required(&self) -> bool {
        self.accept_jwt || self.accept_mtls
    }

    fn unauthenticated(&self, reason: &'static str) -> GatewayError {
        GatewayError::Unauthenticated {
            realm: self.realm.clone(),
            bearer: self.accept_jwt,
            reason,
        }
    }
}

/// What the synchronous path decided.
pub(super) enum Step {
    Done(Arc<Identity>),
    Validate {
        provider: Arc<JwtProvider>,
        token: String,
        digest: TokenDigest,
        /// The connection's certificate: attached with `all_of: [jwt, mtls]`,
        /// and what a certificate-bound token must match.
        cert: Option<Arc<CertIdentity>>,
        attach_cert: bool,
    },
}

pub(super) fn invalid_token(
    auth: &RouteAuth,
    provider: &JwtProvider,
    error: TokenError,
) -> GatewayError {
    GatewayError::InvalidToken {
        realm: auth.realm.clone(),
        provider: provider.name.clone(),
        error,
    }
}

/// The `Authorization` field a connection sent last, with the provider
/// that validated its bearer token and the identity it gave. A keep-alive
/// client sends the same field with every request; this spares each repeat
/// the field's parsing, the token's SHA-256 and the lookup in the provider's
/// shared cache. Every use still checks revocation and `exp`, and only on
/// routes that read tokens from `Authorization` alone and accept that
/// provider; a provider a reload replaced matches no route.
#[derive(Default)]
pub struct TokenMemo(Option<Remembered>);

struct Remembered {
    /// The whole field value, `Bearer <token>`.
    authorization: Box<[u8]>,
    /// Weak: a replaced provider (and its key set refresher) must not live
    /// on in idle connections. It keeps the allocation, so the address is
    /// not reused while this compares against it.
    provider: Weak<JwtProvider>,
    identity: Arc<Identity>,
}

impl TokenMemo {
    /// The remembered provider and identity, if `authorization` is the
    /// remembered field (compared in constant time) and `providers` has
    /// its provider.
    fn recall<'a>(
        &self,
        authorization: &[u8],
        providers: &'a [Arc<JwtProvider>],
    ) -> Option<(&'a JwtProvider, Arc<Identity>)> {
        let r = self.0.as_ref()?;
        // aws-lc's constant-time compare: the field is a credential. (It
        // takes a tenth of subtle's byte-at-a-time `ct_eq` here.)
        let same = verify_slices_are_equal(&r.authorization, authorization).is_ok();
        let provider = providers
            .iter()
            .find(|p| std::ptr::eq(Arc::as_ptr(p), r.provider.as_ptr()))?;
        same.then(|| (&**provider, r.identity.clone()))
    }

    fn remember(
        &mut self,
        authorization: &[u8],
        provider: &Arc<JwtProvider>,
        identity: &Arc<Identity>,
    ) {
        self.0 = Some(Remembered {
            authorization: authorization.into(),
            provider: Arc::downgrade(provider),
            identity: identity.clone(),
        });
    }
}

/// The request's one `Authorization` value, on routes that read tokens
/// from nowhere else: the key of the connection's [`TokenMemo`].
fn memo_key<'a>(auth: &RouteAuth, fields: &'a impl FieldLookup) -> Option<&'a [u8]> {
    if auth.sources != [TokenSource::Authorization] {
        return None;
    }
    let mut values = fields.values(&AUTHORIZATION);
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// Decides without waiting when it can (no token needed, a token
/// validated before, a certificate); otherwise names the provider that
/// must validate the token. Reads the request's fields and query, the
/// connection's certificate and `memo`, the connection's last
/// `Authorization` field.
pub(super) fn identify(
    auth: &RouteAuth,
    fields: &impl FieldLookup,
    query: Option<&str>,
    cert: Option<Arc<CertIdentity>>,
    memo: &mut TokenMemo,
) -> Result<Step, GatewayError> {
    // Only `all_of` attaches the certificate to the token's identity.
    let attach_cert = auth.require_both;
    // The field the connection sent last: no parsing, no hash, no allocation.
    let key = memo_key(auth, fields);
    if let Some(key) = key
        && !(auth.require_both && cert.is_none())
        && let Some((p, id)) = memo.recall(key, &auth.providers)
    {
        return known(auth, p, p.recheck(id), cert.as_ref(), attach_cert);
    }
    let token = if auth.accept_jwt {
        find_token(&auth.sources, fields, query).map_err(|reason| {
            GatewayError::InvalidAuthRequest {
                realm: auth.realm.clone(),
                reason,
            }
        })?
    } else {
        None
    };
    if auth.require_both && cert.is_none() {
        return Err(auth.unauthenticated("a client certificate is required"));
    }
    let Some(token) = token else {
        return match cert {
            Some(cert) if auth.accept_mtls && !auth.require_both => {
                Ok(Step::Done(Arc::new(Identity::from_cert(cert))))
            }
            _ if auth.accept_jwt => Err(auth.unauthenticated("a bearer token is required")),
            _ => Err(auth.unauthenticated("a client certificate is required")),
        };
    };
    // A validated token: no signature check, no allocation.
    let digest = TokenDigest::of(&token);
    for p in &auth.providers {
        if let Some(hit) = p.cached(&digest) {
            if let (Some(key), Ok(id)) = (key, &hit) {
                memo.remember(key, p, id);
            }
            return known(auth, p, hit, cert.as_ref(), attach_cert);
        }
    }
    let provider = match auth.providers.as_slice() {
        [only] => only.clone(),
        several => {
            let iss = JwtProvider::peek_issuer(&token);
            match several
                .iter()
                .find(|p| iss.as_deref() == Some(p.settings.issuer.as_str()))
            {
                Some(p) => p.clone(),
                None => {
                    return Err(GatewayError::InvalidToken {
                        realm: auth.realm.clone(),
                        provider: Arc::from("-"),
                        error: TokenError::WrongIssuer,
                    });
                }
            }
        }
    };
    Ok(Step::Validate {
        provider,
        token: token.into_owned(),
        digest,
        cert,
        attach_cert,
    })
}

/// The answer for a token validated before (remembered or cached), as
/// `provider` checked it again now, counted.
fn known(
    auth: &RouteAuth,
    provider: &JwtProvider,
    checked: Result<Arc<Identity>, TokenError>,
    cert: Option<&Arc<CertIdentity>>,
    attach_cert: bool,
) -> Result<Step, GatewayError> {
    provider.count_known(&checked);
    match checked.and_then(|id| bound(id, cert, attach_cert)) {
        Ok(id) => Ok(Step::Done(id)),
        Err(e) => Err(invalid_token(auth, provider, e)),
    }
}

/// A token's identity checked against the connection's certificate (RFC
/// 8705 binding), with the certificate attached when the route wants both.
pub(super) fn bound(
    id: Arc<Identity>,
    cert: Option<&Arc<CertIdentity>>,
    attach: bool,
) -> Result<Arc<Identity>, TokenError> {
    if !id.bound_to(cert.map(|c| &**c)) {
        return Err(TokenError::CertificateMismatch);
    }
    Ok(with_cert(id, cert.filter(|_| attach).cloned()))
}

/// With `all_of: [jwt, mtls]` the token's identity carries the certificate.
fn with_cert(id: Arc<Identity>, cert: Option<Arc<CertIdentity>>) -> Arc<Identity> {
    match cert {
        None => id,
        Some(cert) => {
            let mut both = Identity::clone(&id);
            both.cert = Some(cert);
            Arc::new(both)
        }
    }
}

/// A field value as text, as `HeaderValue::to_str` reads it (visible
/// ASCII, spaces and tabs).
fn text(v: &[u8]) -> Option<&str> {
    // In blocks without an early exit, which the compiler vectorizes: a
    // token is some hundreds of bytes, and this runs on every request but a
    // connection's repeats of its remembered field.
    let visible = |block: &[u8]| {
        block.iter().fold(true, |ok, &b| {
            ok & ((b == b'\t') | (0x20..0x7f).contains(&b))
        })
    };
    v.chunks(32)
        .all(visible)
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}

/// The bearer token, from the first source that has one. A request that
/// carries tokens in more than one place is malformed (RFC 6750 2).
fn find_token<'a>(
    sources: &[TokenSource],
    fields: &'a impl FieldLookup,
    query: Option<&'a str>,
) -> Result<Option<Cow<'a, str>>, &'static str> {
    let mut found: Option<Cow<'a, str>> = None;
    for source in sources {
        let token: Option<Cow<'a, str>> = match source {
            TokenSource::Authorization => {
                let mut values = fields.values(&AUTHORIZATION);
                let first = values.next();
                if values.next().is_some() {
                    return Err("more than one Authorization header");
                }
                match first.map(text) {
                    None => None,
                    Some(None) => return Err("the Authorization header is not text"),
                    Some(Some(v)) => match v.split_once(' ') {
                        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                            let token = token.trim();
                            if token.is_empty() {
                                return Err("the Bearer credentials are empty");
                            }
                            Some(Cow::Borrowed(token))
                        }
                        // Another scheme (Basic, ...) is not a bearer token.
                        _ => None,
                    },
                }
            }
            TokenSource::Header(name) => HeaderName::from_bytes(name.as_bytes())
                .ok()
                .and_then(|name| fields.first(&name).and_then(text))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(Cow::Borrowed),
            TokenSource::Cookie(name) => fields
                .values(&COOKIE)
                .filter_map(text)
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| Cow::Borrowed(v.trim_matches('"'))),
            TokenSource::Query(name) => query.and_then(|q| {
                q.split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| Cow::Borrowed(v))
            }),
        };
        if let Some(t) = token {
            match &found {
                Some(f) if *f != t => return Err("the request carries more than one token"),
                Some(_) => {}
                None => found = Some(t),
            }
        }
    }
    Ok(found)
}
