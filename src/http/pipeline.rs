//! The one way through the gateway. Every request, whichever listener,
//! HTTP version or codec read it, passes these steps, each written once and
//! in this order:
//!
//! 1. read: a codec hands over the head in wire form ([`RequestHead`]) and
//!    the body (tollgate's HTTP/1 loop, or hyper for HTTP/2);
//! 2. canonicalise and check the listener's limits;
//! 3. route (or a token server endpoint, served locally);
//! 4. authenticate, per the route;
//! 5. authorise by the route's policy, deny by default;
//! 6. rewrite the header fields for the target;
//! 7. forward to the route's pool;
//! 8. log and count, and answer a failure with its JSON error.
//!
//! The head stays in wire form throughout: routing, credentials and the
//! outgoing field block read the bytes the client sent, with no header map
//! built (a map per request costs more than the rest of the proxying).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, Version};
use tokio::time::Sleep;

use super::access_log::{self, Entry, Unfinished};
use super::auth::{self, TokenMemo};
use super::authz::{self, ANONYMOUS};
use super::body::{ClientBody, ProxyBody, Switched};
use super::canonical;
use super::carry;
use super::error::GatewayError;
use super::headers::{self, Chain, FieldRules, Origin, Travel, X_REQUEST_ID};
use super::limits::{self, Sizes};
use super::proxy::{self, Framing, Outgoing};
use super::request_id;
use super::router::{Route, RouteTable};
use super::upstream::UpstreamClients;
use super::wire::{self, RequestHead};
use super::xfcc::{self, XFCC};
use crate::authz::{Action, Effect};
use crate::identity::{Identity, Step};
use crate::metrics::{Metrics, RouteMetrics};
use crate::transport::{ConnState, LocalBody, LocalService, LocalServices, TunnelLink};
use std::pin::Pin;

/// What every worker's pipeline shares.
pub struct PipelineConfig {
    pub table: Arc<ArcSwap<RouteTable>>,
    /// Endpoints front-ends answer themselves (the token server).
    pub local: Arc<dyn LocalServices>,
    /// What carries requests of `tunnel:` routes.
    pub tunnels: Option<Arc<dyn TunnelLink>>,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AtomicBool>,
    /// Request metrics for requests that match no route.
    pub unmatched: RouteMetrics,
}

impl PipelineConfig {
    /// A worker's pipeline; `clients` are that worker's upstream connections.
    pub fn build(&self, clients: UpstreamClients) -> Arc<Pipeline> {
        Arc::new(Pipeline {
            table: self.table.clone(),
            local: self.local.clone(),
            tunnels: self.tunnels.clone(),
            metrics: self.metrics.clone(),
            access_log: self.access_log.clone(),
            unmatched: self.unmatched.clone(),
            clients,
        })
    }
}

/// One worker's way through the gateway.
pub struct Pipeline {
    table: Arc<ArcSwap<RouteTable>>,
    local: Arc<dyn LocalServices>,
    tunnels: Option<Arc<dyn TunnelLink>>,
    metrics: Arc<Metrics>,
    access_log: Arc<AtomicBool>,
    unmatched: RouteMetrics,
    clients: UpstreamClients,
}

/// What a connection keeps from one request to the next.
#[derive(Default)]
pub struct ConnMemo {
    /// The last `Authorization` field and whom it named.
    tokens: TokenMemo,
    /// The forwarding fields of the last Host: they differ between requests
    /// on a connection only in the Host, which is almost always the same.
    forwarding: BytesMut,
    forwarding_host: Vec<u8>,
    /// The last Host field that was canonical as sent, and its host's
    /// length: a repeat needs no second reading.
    host: Vec<u8>,
    host_len: usize,
}

impl ConnMemo {
    /// The forwarding lines for a request to `host` on `conn`, which sent
    /// no forwarding chain of its own.
    fn forwarding(&mut self, conn: &ConnState, version: Version, host: Option<&str>) -> &[u8] {
        let key = host.unwrap_or_default().as_bytes();
        if self.forwarding.is_empty() || self.forwarding_host != key {
            self.forwarding.clear();
            headers::put_forwarding(
                &mut self.forwarding,
                &origin(conn, version),
                host,
                &Chain::default(),
            );
            self.forwarding_host.clear();
            self.forwarding_host.extend_from_slice(key);
        }
        &self.forwarding
    }
}

fn origin(conn: &ConnState, version: Version) -> Origin<'_> {
    Origin {
        peer: conn.peer.ip(),
        peer_text: &conn.peer_ip,
        proto: conn.listener.scheme,
        version,
    }
}

/// What one pass over a head's fields found.
struct Scan {
    /// The Host fields' values (a range into the head); more than one is
    /// refused.
    host: Option<std::ops::Range<usize>>,
    hosts: usize,
    /// The client's one acceptable `x-request-id`.
    request_id: Option<std::ops::Range<usize>>,
    /// The one `Content-Length`, parsed.
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// Names the client's `Connection` fields list (besides `close`,
    /// `keep-alive` and `upgrade`): hop-by-hop for this request.
    connection_named: Vec<Bytes>,
    /// Name and value bytes of the fields, as the limits count them.
    field_bytes: usize,
}

impl Scan {
    fn of(req: &RequestHead) -> Scan {
        let mut scan = Scan {
            host: None,
            hosts: 0,
            request_id: None,
            content_length: None,
            transfer_encoding: false,
            connection_named: Vec::new(),
            field_bytes: 0,
        };
        let mut ids = 0;
        for field in &req.fields {
            let value = req.value(field);
            scan.field_bytes += field.0.as_str().len() + value.len() + 4;
            match field.0 {
                header::HOST => {
                    scan.hosts += 1;
                    scan.host.get_or_insert(field.1.clone());
                }
                header::CONTENT_LENGTH => scan.content_length = wire::length_value(value),
                header::TRANSFER_ENCODING => scan.transfer_encoding = true,
                header::CONNECTION => {
                    for token in wire::list_elements(value) {
                        if !(token.eq_ignore_ascii_case(b"keep-alive")
                            || token.eq_ignore_ascii_case(b"close")
                            || token.eq_ignore_ascii_case(b"upgrade"))
                        {
                            scan.connection_named.push(req.head.slice_ref(token));
                        }
                    }
                }
                ref name if *name == X_REQUEST_ID => {
                    ids += 1;
                    scan.request_id = Some(field.1.clone());
                }
                _ => {}
            }
        }
        if ids != 1
            || scan
                .request_id
                .as_ref()
                .is_some_and(|r| !request_id::acceptable(&req.head[r.clone()]))
        {
            scan.request_id = None;
        }
        scan
    }
}

/// Who and what a request's log line and metrics name.
#[derive(Default)]
struct Outcome {
    route: Option<Arc<Route>>,
    endpoint: Option<Arc<dyn LocalService>>,
    identity: Option<Arc<Identity>>,
}

/// A request as a codec hands it over.
pub struct Request<'a> {
    pub head: &'a RequestHead,
    pub body: ClientBody,
    /// The client asks to switch protocols (HTTP/1.1 `Upgrade`).
    pub upgrade: bool,
    /// The response may carry its target's field lines as they came
    /// (tollgate's own HTTP/1 writer sends it); hyper needs a header map.
    pub wire_response: bool,
}

impl Pipeline {
    /// Runs one request through every step; failures are answered here.
    /// `deadline` is the timer the request's attempts are timed with (a
    /// connection that keeps one moves it along from request to request).
    pub async fn serve(
        &self,
        conn: &Arc<ConnState>,
        req: Request<'_>,
        memo: &mut ConnMemo,
        deadline: Pin<&mut Sleep>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let head = req.head;
        let scan = Scan::of(head);
        let request_id = match &scan.request_id {
            // Shares the head's bytes (`acceptable` checked them).
            Some(id) => HeaderValue::from_maybe_shared(head.head.slice(id.clone()))
                .unwrap_or_else(|_| request_id::generate()),
            None => request_id::generate(),
        };
        let mut outcome = Outcome::default();
        let result = self
            .steps(
                conn,
                req,
                &scan,
                &request_id,
                memo,
                deadline,
                start,
                &mut outcome,
            )
            .await;
        let (mut resp, error) = match result {
            Ok(resp) => (resp, None),
            Err(e) => (e.to_response(&request_id), Some(e)),
        };
        // A target's body still streaming: logged and counted at its end.
        let resp_status = resp.status().as_u16();
        let log_on = self.access_log.load(Ordering::Relaxed);
        let deferred =
            error.is_none() && outcome.route.is_some() && resp.body().streams_from_target();
        if deferred && let Some(route) = outcome.route.take() {
            resp.body_mut().finish_at_end(Box::new(Unfinished {
                start,
                conn: conn.clone(),
                route,
                request_id: request_id.clone(),
                method: head.method.clone(),
                uri: log_on.then(|| head.uri.clone()),
                identity: outcome.identity.take(),
                status: resp_status,
            }));
        }
        if !deferred {
            let (route, metrics) = match (&outcome.route, &outcome.endpoint) {
                (Some(r), _) => (&*r.name, &r.metrics),
                (None, Some(service)) => (service.name(), service.metrics()),
                (None, None) => ("-", &self.unmatched),
            };
            access_log::record(
                &Entry {
                    start,
                    conn: Some(conn),
                    route,
                    metrics,
                    request_id: &request_id,
                    method: head.method.as_str(),
                    path: log_on.then(|| head.uri.path()),
                },
                resp_status,
                error.as_ref(),
                outcome
                    .identity
                    .as_ref()
                    .map_or("-", |who| who.subject.as_str()),
            );
        }
        match resp.body_mut().response_lines_mut() {
            Some(lines) => lines.request_id = Some(request_id),
            None => {
                resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
            }
        }
        resp
    }

    /// Answers, logs and counts a request refused before its head was whole.
    pub fn refuse(&self, conn: &ConnState, error: GatewayError) -> Response<ProxyBody> {
        let request_id = request_id::generate();
        let mut resp = error.to_response(&request_id);
        access_log::record(
            &Entry {
                start: Instant::now(),
                conn: Some(conn),
                route: "-",
                metrics: &self.unmatched,
                request_id: &request_id,
                method: "-",
                path: self.access_log.load(Ordering::Relaxed).then_some("-"),
            },
            resp.status().as_u16(),
            Some(&error),
            "-",
        );
        resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
        resp
    }

    // The steps borrow what `serve` keeps for the log: taken by value,
    // each would sit in this future twice.
    #[allow(clippy::too_many_arguments)]
    async fn steps(
        &self,
        conn: &Arc<ConnState>,
        req: Request<'_>,
        scan: &Scan,
        request_id: &HeaderValue,
        memo: &mut ConnMemo,
        deadline: Pin<&mut Sleep>,
        start: Instant,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let head = req.head;
        // 2. The canonical form, which every later step reads.
        let authority = request_authority(head, scan, memo)?;
        let host = authority.as_ref().map(|a| a.render());
        let host = host.as_deref();
        let canonical = canonical::path(head.uri.path()).map_err(GatewayError::BadPath)?;
        let path = &*canonical.path;

        // 3. Route, or an endpoint a front-end answers itself.
        let endpoint = self.local.find(&conn.listener.name, path);
        if endpoint.is_none() {
            let table = self.table.load();
            outcome.route = table
                .find_by(
                    &head.method,
                    authority.as_ref().map(|a| &*a.host),
                    path,
                    head,
                )
                .cloned();
        }
        self.check_limits(conn, head, scan)?;
        if let Some((service, ep)) = endpoint {
            outcome.endpoint = Some(service.clone());
            // A request to switch protocols on an endpoint that takes
            // connections over (the codec decided it is one: a body-less
            // HTTP/1.1 GET with `Connection: upgrade`).
            if req.upgrade && service.upgrades(ep) {
                let mut request = head
                    .to_request(())
                    .ok_or(GatewayError::BadHeader("a field value is not valid"))?;
                canonical_target(&mut request, path);
                let switch = service.upgrade(ep, request, conn.clone()).await;
                let (parts, body) = switch.response.into_parts();
                let body = match switch.takeover {
                    Some(takeover) if parts.status == http::StatusCode::SWITCHING_PROTOCOLS => {
                        ProxyBody::switching(Switched::Local(takeover))
                    }
                    _ => ProxyBody::full(body),
                };
                return Ok(Response::from_parts(parts, body));
            }
            let mut request = head
                .to_request(req.body)
                .ok_or(GatewayError::BadHeader("a field value is not valid"))?
                .map(LocalBody::new);
            canonical_target(&mut request, path);
            return Ok(service
                .serve(ep, request, conn.peer.ip(), conn.peer_cert.as_deref())
                .await
                .map(ProxyBody::full));
        }
        let route = outcome.route.as_ref().ok_or(GatewayError::NoRoute)?;
        if canonical.encoded_slash && !route.keep_encoded_slashes {
            return Err(GatewayError::BadPath(
                "an escaped `/` or `\\` (`%2F`, `%5C`)",
            ));
        }

        // 4. Who is calling.
        let identity = authenticate(route, conn, head, &mut memo.tokens)
            .await
            .inspect_err(|_| route.metrics.unauthenticated.inc())?;
        outcome.identity = identity;
        let identity = &outcome.identity;

        // 5. Whether the route's policy allows it.
        let auth = &route.auth;
        if let Some(policy) = &auth.policy {
            let who = identity.as_deref().unwrap_or(&ANONYMOUS);
            let decision = policy.evaluate(who, &Action::http(head.method.as_str(), path));
            tracing::debug!(
                route = %route.name, subject = %who.subject, via = who.method.as_str(),
                rule = ?decision.rule, allowed = decision.allowed(), "policy decision"
            );
            if decision.effect == Effect::Deny {
                route.metrics.denied.inc();
                return Err(GatewayError::Forbidden {
                    realm: auth.realm.clone(),
                    bearer: auth.authn.accept_jwt,
                    scope: policy.scope_hint().to_owned(),
                    rule: decision.rule,
                    subject: who.subject.clone(),
                });
            }
            route.metrics.allowed.inc();
        } else if identity.is_some() {
            route.metrics.allowed.inc();
        }

        // 6. The fields the target gets.
        // The codec decided the request asks to switch (`Connection:
        // upgrade` with `Upgrade` on a body-less HTTP/1.1 GET); one the
        // route does not allow goes as a plain request.
        let upgrade = req.upgrade
            && route.tunnel.is_none()
            && head
                .get(&header::UPGRADE)
                .is_some_and(|p| route.allows_upgrade(p));
        let body_follows = !http_body::Body::is_end_stream(&req.body);
        let framing = match scan.content_length {
            Some(n) if !scan.transfer_encoding => Framing::Length(n),
            _ if !body_follows => Framing::Length(0),
            _ => match http_body::Body::size_hint(&req.body).exact() {
                Some(n) => Framing::Declare(n),
                None => Framing::Chunked,
            },
        };
        let fields = self.outgoing_fields(
            conn,
            head,
            scan,
            route,
            identity.as_deref(),
            memo,
            request_id,
            host,
            upgrade,
            framing,
        );

        // 7. Forward: the canonical path (rewritten as the route says).
        let query = head.uri.query();
        let target = match (route.rewrite(path, query), &canonical.path) {
            (Some(rewritten), _) => Cow::Owned(rewritten),
            // As the client sent it, canonical already.
            (None, Cow::Borrowed(_)) => {
                Cow::Borrowed(head.uri.path_and_query().map_or("/", |pq| pq.as_str()))
            }
            (None, Cow::Owned(path)) => match query {
                Some(q) => Cow::Owned(format!("{path}?{q}")),
                None => Cow::Borrowed(path.as_str()),
            },
        };
        if let Some(tunnel) = &route.tunnel {
            let link = self.tunnels.as_deref().ok_or(GatewayError::Tunnel(
                crate::transport::CarryError::NoPeer(tunnel.to_string()),
            ))?;
            return Box::pin(carry::carry(carry::Carry {
                link,
                tunnel,
                method: head.method.as_str(),
                target: &target,
                fields: &fields,
                body: body_follows.then_some(req.body),
                body_limit: conn.listener.limits.max_body_bytes.as_usize(),
                timeout: route.timeout,
            }))
            .await;
        }
        let mut outgoing = Outgoing {
            method: &head.method,
            path: &target,
            host: host.filter(|_| route.preserve_host).map(str::as_bytes),
            fields: &fields,
            body: body_follows.then_some(req.body),
            framing,
            upgrade,
            wire_response: req.wire_response,
            client_waiting: body_follows.then(Default::default),
        };
        // Not boxed: the allocation and the copy into it cost more than
        // this future's one move into the connection's (measured).
        proxy::forward(&self.clients, conn, route, &mut outgoing, start, deadline).await
    }

    fn check_limits(
        &self,
        conn: &ConnState,
        head: &RequestHead,
        scan: &Scan,
    ) -> Result<(), GatewayError> {
        let sizes = Sizes {
            uri: head.uri.path_and_query().map_or(0, |pq| pq.as_str().len()),
            fields: head.fields.len(),
            field_bytes: scan.field_bytes,
            declared_body: scan.content_length,
        };
        limits::check_sizes(&conn.listener.limits, &sizes).inspect_err(|e| {
            let limit = match e {
                GatewayError::UriTooLong { .. } => "uri",
                GatewayError::HeadersTooLarge { .. } => "headers",
                GatewayError::BodyTooLarge { .. } => "body",
                _ => "path",
            };
            self.metrics
                .http_limit_exceeded
                .with_label_values(&[&conn.listener.name, limit])
                .inc();
        })
    }

    /// The client's fields less those that do not travel on, then the
    /// fields this hop sets. Hop-by-hop fields, and those the client's
    /// `Connection` names, are dropped from what the client sent before
    /// anything is added, so no client can remove what the gateway sets.
    #[allow(clippy::too_many_arguments)]
    fn outgoing_fields(
        &self,
        conn: &ConnState,
        head: &RequestHead,
        scan: &Scan,
        route: &Route,
        identity: Option<&Identity>,
        memo: &mut ConnMemo,
        request_id: &HeaderValue,
        host: Option<&str>,
        upgrade: bool,
        framing: Framing,
    ) -> BytesMut {
        let auth = &route.auth;
        let mut out = BytesMut::with_capacity(head.head.len() + 256);
        let mut chain = Chain::default();
        let rules = FieldRules {
            identity_headers: &auth.identity_headers,
            forward_token: auth.forward_token,
            underscores: conn.listener.underscores_in_headers,
            trusted: conn.forwarded_trusted,
            upgrade,
            transfer_encoding: scan.transfer_encoding,
            connection_named: &scan.connection_named,
        };
        for field in &head.fields {
            let value = head.value(field);
            match headers::request_field(&field.0, value, &rules) {
                Travel::Keep => wire::put_field(&mut out, &field.0, value),
                Travel::Drop => {}
                Travel::ForwardedFor => join(&mut chain.forwarded_for, value),
                Travel::Forwarded => join(&mut chain.forwarded, value),
            }
        }
        if chain.forwarded_for.is_empty() && chain.forwarded.is_empty() {
            out.extend_from_slice(memo.forwarding(conn, head.version, host));
        } else {
            headers::put_forwarding(&mut out, &origin(conn, head.version), host, &chain);
        }
        if upgrade {
            out.extend_from_slice(b"connection: upgrade\r\n");
        }
        match framing {
            Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Declare(n) => wire::put_length_field(&mut out, "content-length", n),
            Framing::Length(_) => {}
        }
        if let Some(who) = identity {
            for (name, field) in &auth.forward_claims {
                if let Some(value) = authz::render(who, field) {
                    wire::put_field(&mut out, name, value.as_bytes());
                }
            }
        }
        if let Some(xfcc) = xfcc::for_connection(conn, auth.forward_client_cert) {
            wire::put_field(&mut out, &XFCC, xfcc.as_bytes());
        }
        wire::put_field(&mut out, &X_REQUEST_ID, request_id.as_bytes());
        out
    }
}

/// The request's authority, canonical: the absolute-form target's or
/// HTTP/2's `:authority` when there is one, the Host field's otherwise.
/// HTTP/1.1 needs exactly one valid Host field even when the target names
/// the authority (RFC 9112 §3.2); an HTTP/2 `host` field must name the
/// same authority as `:authority` (RFC 9113 §8.3.1).
fn request_authority<'a>(
    head: &'a RequestHead,
    scan: &Scan,
    memo: &mut ConnMemo,
) -> Result<Option<canonical::Authority<'a>>, GatewayError> {
    if scan.hosts > 1 {
        return Err(GatewayError::BadHost("more than one Host field"));
    }
    let field = match &scan.host {
        Some(range) => {
            let raw = std::str::from_utf8(&head.head[range.clone()])
                .map_err(|_| GatewayError::BadHost("the Host field is not text"))?;
            // A keep-alive client sends the same Host every time.
            if !memo.host.is_empty() && memo.host == raw.as_bytes() {
                Some(canonical::Authority::again(raw, memo.host_len))
            } else {
                let authority = canonical::authority(raw).map_err(GatewayError::BadHost)?;
                if authority.as_sent() {
                    memo.host.clear();
                    memo.host.extend_from_slice(raw.as_bytes());
                    memo.host_len = authority.host.len();
                }
                Some(authority)
            }
        }
        None if head.version == Version::HTTP_11 => {
            return Err(GatewayError::BadHost(
                "an HTTP/1.1 request needs a Host field",
            ));
        }
        None => None,
    };
    let Some(target) = head.uri.authority() else {
        return Ok(field);
    };
    let target = canonical::authority(target.as_str()).map_err(GatewayError::BadHost)?;
    if head.version == Version::HTTP_2
        && field
            .as_ref()
            .is_some_and(|f| f.render() != target.render())
    {
        return Err(GatewayError::BadHost("`:authority` and `host` differ"));
    }
    Ok(Some(target))
}

/// A local service decides on the canonical path, as routes do: the
/// request it is handed carries it (and the query as sent).
fn canonical_target<B>(request: &mut http::Request<B>, path: &str) {
    if request.uri().path() == path {
        return;
    }
    let target = match request.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    if let Ok(uri) = http::Uri::try_from(target) {
        *request.uri_mut() = uri;
    }
}

/// Appends a list field's value to the values gathered so far.
fn join(list: &mut Vec<u8>, value: &[u8]) {
    if !list.is_empty() {
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(value);
}

/// The caller, on routes that need credentials. A token validated before
/// is answered without waiting; only a cache miss checks a signature.
async fn authenticate(
    route: &Route,
    conn: &ConnState,
    head: &RequestHead,
    memo: &mut TokenMemo,
) -> Result<Option<Arc<Identity>>, GatewayError> {
    let auth = &route.auth;
    if !auth.required() {
        return Ok(None);
    }
    match auth::identify(auth, head, head.uri.query(), conn.peer_cert.clone(), memo)? {
        Step::Done(identity, _) => Ok(Some(identity)),
        // Boxed: a cache miss is rare, and its future large.
        Step::Validate(pending) => Box::pin(pending.finish())
            .await
            .map(Some)
            .map_err(|r| auth.refused(r)),
    }
}

/// The per-connection handle a listener serves with: the worker's
/// pipeline and the connection's state. tollgate's HTTP/1 loop calls it
/// for every HTTP/1 request; hyper for every HTTP/2 request.
#[derive(Clone)]
pub struct HttpEntry {
    pipeline: Arc<Pipeline>,
    conn: Arc<ConnState>,
}

impl HttpEntry {
    pub fn new(pipeline: Arc<Pipeline>, conn: Arc<ConnState>) -> Self {
        HttpEntry { pipeline, conn }
    }

    /// Serves a request read by tollgate's own HTTP/1 loop; `deadline` is
    /// the connection's request timer. Not counted as in flight: the loop
    /// that runs it does not watch for idleness meanwhile.
    pub fn serve<'a>(
        &'a self,
        head: &'a RequestHead,
        body: ClientBody,
        upgrade: bool,
        memo: &'a mut ConnMemo,
        deadline: Pin<&'a mut Sleep>,
    ) -> impl Future<Output = Response<ProxyBody>> + 'a {
        let req = Request {
            head,
            body,
            upgrade,
            wire_response: true,
        };
        self.pipeline.serve(&self.conn, req, memo, deadline)
    }

    /// The answer to a request the codec refused before it had a whole
    /// head (malformed, too large), logged and counted as any other.
    pub fn refuse(&self, error: GatewayError) -> Response<ProxyBody> {
        self.pipeline.refuse(&self.conn, error)
    }
}

type EntryFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send>>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for HttpEntry {
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = EntryFuture;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> EntryFuture {
        let guard = self.conn.begin_request();
        let (parts, body) = req.into_parts();
        let head = RequestHead::from_parts(parts);
        let entry = self.clone();
        Box::pin(async move {
            let _guard = guard;
            // An HTTP/2 connection's streams share a bounded number of
            // forwarding slots: one client cannot hold an upstream
            // connection per stream.
            let _slot = entry.conn.forwarding_slots.acquire().await;
            let req = Request {
                head: &head,
                body: ClientBody::Hyper(body),
                upgrade: false,
                wire_response: false,
            };
            let deadline = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
            Ok(entry
                .pipeline
                .serve(&entry.conn, req, &mut ConnMemo::default(), deadline)
                .await)
        })
    }
}
