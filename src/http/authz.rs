//! Authorization stage: the route's policy decides over the caller's identity
//! and the request (method, path), deny by default; then the identity headers
//! the route forwards (claims, the client certificate) are set for the upstream. While the access log is on,
//! the identity rides back on the response's extensions so the log can name
//! the caller (that costs the response an extensions map, so only then).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower::{Layer, Service};

use super::RequestCtx;
use super::error::GatewayError;
use super::xfcc::{self, XFCC};
use crate::authz::{Action, Effect};
use crate::identity::Identity;

pub(super) static ANONYMOUS: LazyLock<Identity> = LazyLock::new(Identity::anonymous);

/// The caller, attached to the response for the access log.
#[derive(Clone)]
pub struct Caller(pub Arc<Identity>);

#[derive(Clone)]
pub struct AuthzLayer {
    access_log: Arc<AtomicBool>,
}

impl AuthzLayer {
    /// `access_log`: whether the access log is on (and wants the caller).
    pub fn new(access_log: Arc<AtomicBool>) -> Self {
        AuthzLayer { access_log }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            access_log: self.access_log.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    access_log: Arc<AtomicBool>,
}

impl<S, B, RB> Service<Request<B>> for Authorize<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = GatewayError>,
{
    type Response = Response<RB>;
    type Error = GatewayError;
    type Future = Either<Ready<Result<Response<RB>, GatewayError>>, WithCaller<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(ctx) = req.extensions().get::<RequestCtx>() else {
            return Either::Right(WithCaller::new(self.inner.call(req), None));
        };
        let (Some(route), identity) = (ctx.route.clone(), ctx.identity.clone()) else {
            return Either::Right(WithCaller::new(self.inner.call(req), None));
        };
        let xfcc = xfcc::for_connection(&ctx.conn, route.auth.forward_client_cert);
        let auth = &route.auth;
        if let Some(policy) = &auth.policy {
            let who = identity.as_deref().unwrap_or(&ANONYMOUS);
            let decision =
                policy.evaluate(who, &Action::http(req.method().as_str(), req.uri().path()));
            tracing::debug!(
                route = %route.name, subject = %who.subject, via = who.method.as_str(),
                rule = ?decision.rule, allowed = decision.allowed(),
                "policy decision"
            );
            if decision.effect == Effect::Deny {
                route.metrics.denied.inc();
                return Either::Left(ready(Err(GatewayError::Forbidden {
                    realm: auth.realm.clone(),
                    bearer: auth.accept_jwt,
                    scope: policy.scope_hint().to_owned(),
                    rule: decision.rule,
                    subject: who.subject.clone(),
                })));
            }
            route.metrics.allowed.inc();
        } else if identity.is_some() {
            route.metrics.allowed.inc();
        }
        if let Some(who) = &identity {
            let headers = req.headers_mut();
            for (name, field) in &auth.forward_claims {
                // `render` refused control characters; `try_from` takes the
                // String's buffer without copying it (and checks it again:
                // `http` has no safe constructor that does not).
                let value = render(who, field).map(|v| HeaderValue::try_from(v.into_owned()));
                if let Some(Ok(v)) = value {
                    headers.insert(name.clone(), v);
                }
            }
        }
        if !auth.forward_token {
            req.headers_mut().remove(AUTHORIZATION);
        }
        if let Some(xfcc) = xfcc {
            req.headers_mut().insert(XFCC, xfcc);
        }
        let caller = identity.filter(|_| self.access_log.load(Ordering::Relaxed));
        Either::Right(WithCaller::new(self.inner.call(req), caller))
    }
}

/// An identity field as a header value's text: strings as they are,
/// numbers and booleans as text, arrays of strings joined with `,`, objects
/// as JSON. `None` if absent, or if it is no header value (control
/// characters: a claim must not add fields of its own).
pub(super) fn render<'a>(who: &'a Identity, field: &str) -> Option<Cow<'a, str>> {
    let text = match who.field(field) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(match field {
            "scope" | "scopes" if !who.scopes.is_empty() => who.scopes.join(" "),
            "roles" if !who.roles.is_empty() => who.roles.join(","),
            _ => match who.claim(field)? {
                Value::String(s) => s.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(","),
                Value::Null => return None,
                other => other.to_string(),
            },
        }),
    };
    // What `HeaderValue` accepts: no control characters but tab.
    text.bytes()
        .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
        .then_some(text)
}

pin_project! {
    pub struct WithCaller<F> {
        #[pin]
        inner: F,
        caller: Option<Arc<Identity>>,
    }
}

impl<F> WithCaller<F> {
    fn new(inner: F, caller: Option<Arc<Identity>>) -> Self {
        WithCaller { inner, caller }
    }
}

impl<F, RB> Future for WithCaller<F>
where
    F: Future<Output = Result<Response<RB>, GatewayError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut out = std::task::ready!(this.inner.poll(cx));
        if let (Ok(resp), Some(caller)) = (&mut out, this.caller.take()) {
            resp.extensions_mut().insert(Caller(caller));
        }
        Poll::Ready(out)
    }
}
