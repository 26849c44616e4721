//! Forwarding to the route's upstream pool: target choice, timeout, bounded
//! retries, passive health reports, upgrade pass-through.

use std::future::Future;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderValue};
use http::uri::{Parts as UriParts, PathAndQuery};
use http::{Method, Response, StatusCode, Uri, Version};
use tokio::time::Sleep;

use super::body::{ClientBody, ProxyBody, RequestBody, RequestBodyError};
use super::error::GatewayError;
use super::headers;
use super::router::Route;
use super::upstream::{
    Exchange, InflightGuard, RequestFraming, SendError, Sender, Target, UpgradedConn, UpstreamBody,
    UpstreamClients, send_encoded,
};
use super::wire;
use crate::transport::ConnState;

pub(super) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How the request body is framed for the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// As the client's `Content-Length` (kept in the fields) says; 0 when
    /// there is no body.
    Length(u64),
    /// A length the client did not declare (HTTP/2), added by this hop.
    Declare(u64),
    /// Chunked, added by this hop.
    Chunked,
}

impl From<Framing> for RequestFraming {
    fn from(f: Framing) -> RequestFraming {
        match f {
            Framing::Length(n) | Framing::Declare(n) => RequestFraming::Length(n),
            Framing::Chunked => RequestFraming::Chunked,
        }
    }
}

/// How an attempt ended when it did not produce a usable response.
struct Failure {
    error: GatewayError,
    /// Whether another attempt may be made (the request is safe to repeat).
    retryable: bool,
}

/// What goes to the target, attempt after attempt: the head written but
/// for the request line and Host (which depend on the target).
pub(super) struct Outgoing<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// The client's authority, when the route keeps it as the Host.
    pub host: Option<&'a [u8]>,
    /// Header field lines, CRLF-terminated, framing included.
    pub fields: &'a [u8],
    /// `None` when the request has no body.
    pub body: Option<ClientBody>,
    pub framing: Framing,
    /// The client asks to switch protocols, as the route allows.
    pub upgrade: bool,
    /// The response may keep its target's field lines as they came.
    pub wire_response: bool,
    /// Set while the request body waits for the client (requests with a
    /// body only).
    pub client_waiting: Option<Arc<AtomicBool>>,
}

impl Outgoing<'_> {
    fn replayable(&self) -> bool {
        self.body.is_none()
    }

    /// Sends one attempt to `target`.
    async fn send(
        &mut self,
        sender: Sender<'_>,
        target: &Target,
        body_limit: usize,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let host = self.host.unwrap_or(target.host_header.as_bytes());
        let body = match (self.body.take(), &self.client_waiting) {
            (Some(b), Some(waiting)) => RequestBody::streaming(b, body_limit, waiting.clone()),
            _ => RequestBody::empty(),
        };
        if let Sender::H1 { proxy, tls } = sender {
            let mut head = BytesMut::with_capacity(
                self.method.as_str().len() + self.path.len() + host.len() + self.fields.len() + 32,
            );
            head.put_slice(self.method.as_str().as_bytes());
            head.put_u8(b' ');
            head.put_slice(self.path.as_bytes());
            head.put_slice(b" HTTP/1.1\r\nhost: ");
            head.put_slice(host);
            head.put_slice(b"\r\n");
            head.put_slice(self.fields);
            head.put_slice(b"\r\n");
            let to = Exchange {
                addr: target.addr,
                tls,
                method: self.method,
                proxy,
                wire: self.wire_response,
                upgrade: self.upgrade,
            };
            // Awaited where it is made: a binding would hold a second
            // copy of the future in this one.
            return send_encoded(to, head.freeze(), body, self.framing.into())
                .await
                .map(|r| r.map(UpstreamBody::H1))
                .map_err(SendError::from);
        }
        // hyper's HTTP/2 clients take a header map.
        let mut request = http::Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.version_mut() = Version::HTTP_2;
        let mut map = wire::parse_lines(self.fields);
        if let Ok(host) = HeaderValue::from_bytes(host) {
            map.insert(header::HOST, host);
        }
        *request.headers_mut() = map;
        let mut uri = UriParts::default();
        uri.scheme = Some(match sender {
            Sender::H2(_) => http::uri::Scheme::HTTPS,
            _ => http::uri::Scheme::HTTP,
        });
        uri.authority = Some(target.uri_authority.clone());
        uri.path_and_query = Some(
            PathAndQuery::try_from(self.path).unwrap_or_else(|_| PathAndQuery::from_static("/")),
        );
        if let Ok(uri) = Uri::from_parts(uri) {
            *request.uri_mut() = uri;
        }
        sender.send(request).await
    }
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
    start: Instant,
    mut deadline: Pin<&mut Sleep>,
) -> Result<Response<ProxyBody>, GatewayError> {
    let pool = &route.pool;
    pool.budget.deposit();
    // Only a request without body can be sent again; a streamed body is gone
    // once the first attempt has taken it.
    let replayable = outgoing.replayable();
    let body_limit = conn.listener.limits.max_body_bytes.as_usize();
    let idempotent = is_idempotent(outgoing.method);
    let upgrade = outgoing.upgrade;

    let mut attempt: u32 = 0;
    // Targets that failed this request (each counted against its health
    // once, whatever the retries), and those that timed out (never tried
    // again: with one target a request would wait its timeout again).
    let mut failed: Vec<Arc<Target>> = Vec::new();
    let mut timed_out: Vec<Arc<Target>> = Vec::new();
    let mut last_error: Option<GatewayError> = None;
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
        let Some(picked) = pool.pick(&failed, &timed_out, now) else {
            return Err(last_error.unwrap_or(GatewayError::NoHealthyTarget));
        };
        let inflight = InflightGuard::new(picked);
        let target = inflight.counted();
        let may_retry = replayable && attempt < route.retries;
        let sender = clients.sender(target, pool.config.protocol);
        let sent = {
            let mut send = pin!(outgoing.send(sender, target, body_limit));
            poll_fn(|cx| match send.as_mut().poll(cx) {
                Poll::Ready(sent) => Poll::Ready(Ok(sent)),
                Poll::Pending => deadline.as_mut().poll(cx).map(Err),
            })
            .await
        };
        // A target's fault, counted once per request.
        let mut target_failed = |target: &Arc<Target>| {
            if !failed.iter().any(|t| Arc::ptr_eq(t, target)) {
                pool.report_failure(target);
                failed.push(target.clone());
            }
        };
        let failure = match sent {
            Ok(Ok(resp)) => {
                let status = resp.status();
                // A success is told when the body has come whole.
                if pool.failure_status(status) {
                    target_failed(target);
                }
                let retry_status = route.retry_on_status.contains(&status);
                if !(retry_status && idempotent && may_retry) {
                    return respond(resp, inflight, upgrade, route);
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
            Ok(Err(e)) => {
                // The client's faults return here, counted against no target.
                let failure = classify(&e, target, idempotent && replayable)?;
                target_failed(target);
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
            // The time ran out while the body waited for the client: the
            // client's doing.
            Err(_)
                if outgoing
                    .client_waiting
                    .as_ref()
                    .is_some_and(|w| w.load(Ordering::Relaxed)) =>
            {
                return Err(GatewayError::ClientTimeout {
                    timeout_ms: route.timeout.as_millis(),
                });
            }
            Err(_) => {
                target_failed(target);
                timed_out.push(target.clone());
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
        last_error = Some(failure.error);
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
    let detail = crate::telemetry::error_chain(e);
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

fn respond(
    resp: Response<UpstreamBody>,
    inflight: InflightGuard,
    upgrade: bool,
    route: &Route,
) -> Result<Response<ProxyBody>, GatewayError> {
    let (mut parts, body) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        // Only our HTTP/1.1 client reads a 101, and only to an upgrade request.
        let upstream = match body {
            UpstreamBody::H1(body) if upgrade => body.upgraded(),
            _ => None,
        };
        let Some(upstream) = upstream else {
            return Err(GatewayError::UpstreamProtocol {
                target: inflight.target().to_string(),
                detail: "101 Switching Protocols without an upgrade request".into(),
            });
        };
        inflight.counted().succeeded();
        let tunnel = Tunnel {
            upstream,
            _inflight: inflight,
            route: route.name.clone(),
        };
        headers::strip_hop_by_hop(&mut parts.headers, true);
        parts.version = Version::HTTP_11;
        return Ok(Response::from_parts(
            parts,
            ProxyBody::switching(super::body::Switched::Upstream(tunnel)),
        ));
    }
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

/// The target's side of a connection that switched protocols (WebSocket),
/// carried by the `101` response to the client's connection, which relays
/// it once the `101` is written.
pub struct Tunnel {
    upstream: UpgradedConn,
    /// The target counts it in flight while it lasts.
    _inflight: InflightGuard,
    route: Arc<str>,
}

impl Tunnel {
    /// Relays bytes both ways until either side closes, or nothing moves
    /// for the listener's idle timeout. `client` counts activity on `conn`.
    pub async fn relay(
        self,
        mut client: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        conn: &ConnState,
    ) {
        let route = &self.route;
        let mut upstream = self.upstream;
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
}
