//! Forwarding to the route's upstream pool: header hygiene, target choice,
//! timeout, bounded retries, passive health reports, upgrade pass-through.

use std::future::Future;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{Parts as UriParts, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Sleep;
use tower::Service;

use super::RequestCtx;
use super::body::{ClientBody, ProxyBody, RequestBody, RequestBodyError};
use super::error::GatewayError;
use super::headers::{self, Origin};
use super::router::Route;
use super::upstream::{
    H1Error, InflightGuard, SendError, Sender, Target, UpstreamBody, UpstreamClients, send_head,
};
use crate::config::UpstreamProtocol;
use crate::transport::ConnState;

/// The last stage: forwards with this worker's upstream clients.
#[derive(Clone)]
pub struct Proxy {
    clients: Arc<UpstreamClients>,
}

impl Proxy {
    pub fn new(clients: Arc<UpstreamClients>) -> Proxy {
        Proxy { clients }
    }
}

type ProxyFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, GatewayError>> + Send + 'static>>;

impl Service<Request<ClientBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = GatewayError;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ClientBody>) -> ProxyFuture {
        let ctx = req.extensions_mut().remove::<RequestCtx>();
        let clients = self.clients.clone();
        Box::pin(async move {
            let mut ctx = ctx.ok_or(GatewayError::NoRoute)?;
            if let Some((server, ep)) = ctx.endpoint.take() {
                return Ok(server
                    .handle(ep, req, ctx.conn.peer.ip(), ctx.conn.peer_cert.as_deref())
                    .await);
            }
            let route = ctx.route.clone().ok_or(GatewayError::NoRoute)?;
            forward_http(&clients, &ctx.conn, &route, req).await
        })
    }
}

pub(super) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How an attempt ended when it did not produce a usable response.
struct Failure {
    error: GatewayError,
    /// Whether another attempt may be made (the request is safe to repeat).
    retryable: bool,
}

/// What goes to the target, attempt after attempt.
// One per request, made in place and never moved about: the size of its
// larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Outgoing<'a> {
    /// An `http` request, readied by [`forward`].
    Http {
        parts: Parts,
        body: Option<ClientBody>,
        client_upgrade: Option<OnUpgrade>,
        /// The client's Host, when the route keeps it.
        kept_host: Option<HeaderValue>,
        path: PathAndQuery,
    },
    /// A body-less request from the direct path, its head written but for
    /// the request line and Host (which depend on the target).
    Encoded {
        method: &'a Method,
        path: &'a str,
        /// The client's Host, when the route keeps it.
        host: Option<&'a [u8]>,
        fields: &'a [u8],
    },
}

impl Outgoing<'_> {
    fn method(&self) -> &Method {
        match self {
            Outgoing::Http { parts, .. } => &parts.method,
            Outgoing::Encoded { method, .. } => method,
        }
    }

    fn replayable(&self) -> bool {
        match self {
            Outgoing::Http { body, .. } => body.as_ref().is_none_or(|b| b.is_end_stream()),
            Outgoing::Encoded { .. } => true,
        }
    }

    /// Sends one attempt to `target`.
    async fn send(
        &mut self,
        sender: Sender<'_>,
        target: &Target,
        replayable: bool,
        body_limit: usize,
    ) -> Result<Result<Response<UpstreamBody>, SendError>, GatewayError> {
        match self {
            Outgoing::Http {
                parts,
                body,
                kept_host,
                path,
                ..
            } => {
                // HTTP/1.1 needs a Host: the target's unless the client's is kept.
                let host = kept_host
                    .clone()
                    .unwrap_or_else(|| target.host_header.clone());
                parts.headers.insert(header::HOST, host);
                let mut uri = UriParts::default();
                if let Some(scheme) = sender.scheme() {
                    uri.scheme = Some(scheme);
                    uri.authority = Some(target.uri_authority.clone());
                }
                uri.path_and_query = Some(path.clone());
                parts.uri = Uri::from_parts(uri).map_err(|e| GatewayError::UpstreamProtocol {
                    target: target.addr.to_string(),
                    detail: format!("cannot build the upstream URI: {e}"),
                })?;
                let upstream_body = match body.take() {
                    Some(b) if !replayable => RequestBody::streaming(b, body_limit),
                    _ => RequestBody::empty(),
                };
                Ok(sender.send(target.addr, parts, upstream_body).await)
            }
            Outgoing::Encoded {
                method,
                path,
                host,
                fields,
            } => {
                let host = host.unwrap_or(target.host_header.as_bytes());
                let mut head = BytesMut::with_capacity(
                    method.as_str().len() + path.len() + host.len() + fields.len() + 32,
                );
                head.put_slice(method.as_str().as_bytes());
                head.put_u8(b' ');
                head.put_slice(path.as_bytes());
                head.put_slice(b" HTTP/1.1\r\nhost: ");
                head.put_slice(host);
                head.put_slice(b"\r\n");
                head.put_slice(fields);
                head.put_slice(b"\r\n");
                let Some(proxy) = sender.direct() else {
                    return Ok(Err(SendError::Direct(H1Error::Invalid(
                        "an encoded head goes to plain HTTP/1.1 targets only",
                    ))));
                };
                // Awaited where it is made: a binding would hold a second
                // copy of the future in this one.
                Ok(send_head(target.addr, head.freeze(), method, proxy)
                    .await
                    .map(|r| r.map(UpstreamBody::H1))
                    .map_err(SendError::from))
            }
        }
    }
}

/// Readies an `http` request for its target (hop-by-hop headers out,
/// forwarding headers in) and forwards it.
async fn forward_http(
    clients: &UpstreamClients,
    conn: &Arc<ConnState>,
    route: &Arc<Route>,
    mut req: Request<ClientBody>,
) -> Result<Response<ProxyBody>, GatewayError> {
    let upgrade = headers::is_upgrade_request(req.method(), req.version(), req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path = route.upstream_path(&parts.uri);
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::add_forwarding(
        &mut parts.headers,
        &Origin {
            peer: conn.peer.ip(),
            peer_text: &conn.peer_ip,
            proto: conn.listener.scheme,
            host: original_host.as_ref(),
            version: parts.version,
        },
    );
    parts.version = match route.pool.config.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => Version::HTTP_2,
    };
    let mut outgoing = Outgoing::Http {
        parts,
        body: Some(body),
        client_upgrade,
        kept_host: original_host.filter(|_| route.preserve_host),
        path,
    };
    let start = Instant::now();
    let deadline = pin!(tokio::time::sleep_until(start.into()));
    forward(
        clients,
        conn,
        route,
        &mut outgoing,
        upgrade,
        start,
        deadline,
    )
    .await
}

/// How far past its deadline an attempt may be timed out (timeouts are
/// seconds; the timer wheel counts milliseconds).
const TIMER_SLACK: Duration = Duration::from_millis(10);

/// Sends to the route's pool: a target per attempt, each within the
/// route's timeout, retried within the route's limits and budget.
/// `deadline` is the timer the attempts are timed with, re-armed here
/// when it is more than `TIMER_SLACK` off an attempt's deadline: a
/// connection that keeps one for its requests moves it along instead of
/// registering and removing a timer per request.
pub(super) async fn forward(
    clients: &UpstreamClients,
    conn: &Arc<ConnState>,
    route: &Arc<Route>,
    // Borrowed: taken by value, it would sit in this future twice.
    outgoing: &mut Outgoing<'_>,
    upgrade: bool,
    start: Instant,
    mut deadline: Pin<&mut Sleep>,
) -> Result<Response<ProxyBody>, GatewayError> {
    let pool = &route.pool;
    pool.budget.deposit();
    // Only a request without body can be sent again; a streamed body is gone
    // once the first attempt has taken it.
    let replayable = outgoing.replayable();
    let body_limit = conn.listener.limits.max_body_bytes.as_usize();
    let idempotent = is_idempotent(outgoing.method());

    let mut attempt: u32 = 0;
    let mut previous: Option<Arc<Target>> = None;
    // One timer for the request, re-armed for each attempt: a `timeout`
    // wrapper would move the attempt's (large) future in and out of itself.
    // The first attempt goes by the caller's clock reading.
    let mut now = start;
    loop {
        if attempt > 0 {
            now = Instant::now();
        }
        // A reset costs three locked instructions, and a busy connection's
        // requests come well under a millisecond apart.
        let due = tokio::time::Instant::from(now + route.timeout);
        let armed = deadline.deadline();
        if armed < due || armed > due + TIMER_SLACK {
            deadline.as_mut().reset(due + TIMER_SLACK);
        }
        let inflight = InflightGuard::new(
            pool.pick(previous.as_ref(), now)
                .ok_or(GatewayError::NoHealthyTarget)?,
        );
        let target = inflight.counted();
        let may_retry = replayable && attempt < route.retries;
        let sender = clients.sender(target, pool.config.protocol, upgrade);
        let sent = {
            let mut send = pin!(outgoing.send(sender, target, replayable, body_limit));
            poll_fn(|cx| match send.as_mut().poll(cx) {
                Poll::Ready(sent) => Poll::Ready(Ok(sent)),
                Poll::Pending => deadline.as_mut().poll(cx).map(Err),
            })
            .await
        };
        let failure = match sent {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Ok(resp))) => {
                let status = resp.status();
                let gateway_error = matches!(
                    status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                );
                pool.report(target, !gateway_error);
                let retry_status = route.retry_on_status.contains(&status);
                if !(retry_status && idempotent && may_retry) {
                    let client_upgrade = match outgoing {
                        Outgoing::Http { client_upgrade, .. } => client_upgrade.take(),
                        Outgoing::Encoded { .. } => None,
                    };
                    return respond(resp, inflight, client_upgrade, conn, route);
                }
                route.metrics.upstream_status.inc();
                Failure {
                    error: GatewayError::UpstreamProtocol {
                        target: target.addr.to_string(),
                        detail: format!("answered {status}"),
                    },
                    retryable: true,
                }
            }
            Ok(Ok(Err(e))) => {
                let failure = classify(&e, target, idempotent && replayable)?;
                pool.report(target, false);
                if matches!(failure.error, GatewayError::UpstreamConnect { .. }) {
                    route.metrics.upstream_connect.inc();
                } else {
                    route.metrics.upstream_protocol.inc();
                }
                Failure {
                    retryable: failure.retryable && replayable,
                    ..failure
                }
            }
            Err(_) => {
                pool.report(target, false);
                route.metrics.upstream_timeout.inc();
                Failure {
                    error: GatewayError::UpstreamTimeout {
                        target: target.addr.to_string(),
                        timeout_ms: route.timeout.as_millis(),
                    },
                    retryable: idempotent && replayable,
                }
            }
        };
        if !(failure.retryable && may_retry) {
            return Err(failure.error);
        }
        if !pool.budget.withdraw() {
            route.metrics.budget_exhausted.inc();
            tracing::debug!(route = %route.name, "retry budget exhausted");
            return Err(failure.error);
        }
        route.metrics.retried.inc();
        tracing::debug!(route = %route.name, attempt, error = %failure.error, "retrying on another target");
        attempt += 1;
        previous = Some(target.clone());
        // Out of flight before the next pick weighs the targets.
        drop(inflight);
    }
}

/// Sorts a client error into the caller's fault (returned as `Err`) or an
/// upstream failure. Connect errors are always retryable: nothing was sent.
fn classify(e: &SendError, target: &Target, repeatable: bool) -> Result<Failure, GatewayError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(body_err) = s.downcast_ref::<RequestBodyError>() {
            return Err(match body_err {
                RequestBodyError::TooLarge { limit } => {
                    GatewayError::BodyTooLarge { limit: *limit }
                }
                RequestBodyError::Client(e) => GatewayError::ClientBody(e.to_string()),
                RequestBodyError::Length(_) => GatewayError::ClientBody(body_err.to_string()),
            });
        }
        source = s.source();
    }
    let detail = error_chain(e);
    Ok(if e.is_connect() {
        Failure {
            error: GatewayError::UpstreamConnect {
                target: target.addr.to_string(),
                detail,
            },
            retryable: true,
        }
    } else {
        Failure {
            error: GatewayError::UpstreamProtocol {
                target: target.addr.to_string(),
                detail,
            },
            retryable: repeatable,
        }
    })
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn respond(
    mut resp: Response<UpstreamBody>,
    inflight: InflightGuard,
    client_upgrade: Option<OnUpgrade>,
    conn: &Arc<ConnState>,
    route: &Route,
) -> Result<Response<ProxyBody>, GatewayError> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(client_upgrade) = client_upgrade else {
            return Err(GatewayError::UpstreamProtocol {
                target: inflight.target().to_string(),
                detail: "101 Switching Protocols without an upgrade request".into(),
            });
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(
            client_upgrade,
            upstream_upgrade,
            inflight,
            conn.clone(),
            route.name.clone(),
        ));
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, true);
        parts.version = Version::HTTP_11;
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    if let UpstreamBody::Hyper(_) = body {
        headers::strip_hop_by_hop(&mut parts.headers, false);
    }
    // The writer adds Via after a response's lines as they came.
    if body.lines().is_none() {
        parts.headers.append(
            header::VIA,
            HeaderValue::from_static(headers::via(parts.version)),
        );
    }
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        ProxyBody::upstream(body, inflight, route.pool.config.read_timeout),
    ))
}

/// Relays an upgraded connection (WebSocket) byte for byte. The client's
/// connection state (and so its connection-limit slot) lives as long as the
/// tunnel does.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    _inflight: InflightGuard,
    conn: Arc<ConnState>,
    route: Arc<str>,
) {
    let (client, upstream) = tokio::join!(client, upstream);
    match (client, upstream) {
        (Ok(client), Ok(upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            // Bytes moving either way count as activity on the client
            // connection; a tunnel quiet for the listener's idle timeout ends.
            let idle = conn.listener.limits.idle_timeout;
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                    Ok((up, down)) => tracing::debug!(
                        route = %route, peer = %conn.peer, bytes_up = up, bytes_down = down,
                        "upgraded connection closed"
                    ),
                    Err(e) => tracing::debug!(
                        route = %route, peer = %conn.peer, error = %e, "upgraded connection ended with an error"
                    ),
                },
                _ = conn.idle_for(idle) => tracing::debug!(
                    route = %route, peer = %conn.peer, "upgraded connection idle; closed"
                ),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(route = %route, peer = %conn.peer, error = %e, "protocol upgrade failed");
        }
    }
}
