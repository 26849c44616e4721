//! Authentication on HTTP: reads the credentials the route asks for (a
//! bearer token from where its providers say, the connection's verified
//! client certificate) and has the route's [`Authenticator`] tell who the
//! caller is; its refusals become 400/401 here. Each connection also
//! remembers its last `Authorization` field ([`TokenMemo`]), which spares a
//! keep-alive client's repeat requests the field's parsing, the token's
//! hash and the shared cache.

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
use crate::identity::jwt::JwtProvider;
use crate::identity::{Authenticator, CertIdentity, Identity, Refusal, Step};

/// A route's authentication and authorization settings, compiled.
pub struct RouteAuth {
    /// Which credentials the route takes, and its JWT providers.
    pub authn: Authenticator,
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
            authn: Authenticator {
                accept_jwt: false,
                accept_cert: false,
                require_both: false,
                providers: Vec::new(),
                users: None,
            },
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
        self.authn.accept_jwt || self.authn.accept_cert
    }

    /// The HTTP answer to a refusal: the one place they are mapped.
    pub(super) fn refused(&self, refusal: Refusal) -> GatewayError {
        let unauthenticated = |reason| GatewayError::Unauthenticated {
            realm: self.realm.clone(),
            bearer: self.authn.accept_jwt,
            reason,
        };
        match refusal {
            Refusal::TokenRequired => unauthenticated("a bearer token is required"),
            Refusal::CertificateRequired => unauthenticated("a client certificate is required"),
            Refusal::InvalidToken { provider, error } => GatewayError::InvalidToken {
                realm: self.realm.clone(),
                provider,
                error,
            },
            // HTTP routes take no passwords today.
            Refusal::BadPassword { .. } | Refusal::NotAccepted(_) => {
                unauthenticated("these credentials are not accepted here")
            }
        }
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

/// Decides without waiting when it can (a token validated before, a
/// certificate); otherwise names the provider that must validate the
/// token. Reads the request's fields and query, the connection's
/// certificate and `memo`, the connection's last `Authorization` field.
pub(super) fn identify(
    auth: &RouteAuth,
    fields: &impl FieldLookup,
    query: Option<&str>,
    cert: Option<Arc<CertIdentity>>,
    memo: &mut TokenMemo,
) -> Result<Step, GatewayError> {
    let authn = &auth.authn;
    // The field the connection sent last: no parsing, no hash, no allocation.
    let key = memo_key(auth, fields);
    if let Some(key) = key
        && !(authn.require_both && cert.is_none())
        && let Some((p, id)) = memo.recall(key, &authn.providers)
    {
        return authn
            .recall(p, p.recheck(id), cert.as_ref())
            .map(|id| Step::Done(id, None))
            .map_err(|r| auth.refused(r));
    }
    let token = if authn.accept_jwt {
        find_token(&auth.sources, fields, query).map_err(|reason| {
            GatewayError::InvalidAuthRequest {
                realm: auth.realm.clone(),
                reason,
            }
        })?
    } else {
        None
    };
    let step = authn.begin(token, cert).map_err(|r| auth.refused(r))?;
    if let (Step::Done(id, Some(i)), Some(key)) = (&step, key) {
        memo.remember(key, &authn.providers[*i], id);
    }
    Ok(step)
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
