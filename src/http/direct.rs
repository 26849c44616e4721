//! The direct path: the common request read by tollgate's own HTTP/1 loop
//! (body-less, to plain HTTP/1.1 targets, with no credentials or a bearer
//! token already validated) goes to its target from its wire form, without
//! the tower stack or an `http` request. What it does is the stack's doing
//! for such a request: limits, request id, the route's policy, hop-by-hop
//! and identity headers out, forwarding and claim headers in, the same
//! retries, timeouts, metrics and log. Anything else, and every request the
//! stack would refuse or must look at longer (no route, a limit, a token to
//! validate, a policy denial, a forwarding chain to extend), goes through
//! the stack, where the full rules live.

use std::convert::Infallible;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::BytesMut;
use http::header::{self, HeaderValue};
use http::{Response, Version};
use tokio::time::Sleep;

use super::access_log::{self, Entry};
use super::auth::{self, Step, TokenMemo};
use super::authz::{self, ANONYMOUS};
use super::body::ProxyBody;
use super::headers::{self, Origin, X_REQUEST_ID};
use super::limits::{self, Sizes};
use super::proxy::{self, Outgoing};
use super::request_id;
use super::router::{Route, RouteTable, host_name};
use super::upstream::UpstreamClients;
use super::wire::{self, RequestHead};
use crate::authz::Action;
use crate::identity::Identity;
use crate::oauth::OAuthServer;
use crate::transport::ConnState;

/// What the direct path shares with the stack of its worker.
pub struct DirectPath {
    pub table: Arc<ArcSwap<RouteTable>>,
    pub oauth: Arc<ArcSwapOption<OAuthServer>>,
    pub clients: Arc<UpstreamClients>,
    pub access_log: Arc<AtomicBool>,
}

/// A request the direct path takes.
pub struct Plan {
    route: Arc<Route>,
    /// The caller, on routes that need credentials.
    identity: Option<Arc<Identity>>,
    /// The policy rule that allowed the request, when the route has a policy.
    allowed_by: Option<Option<usize>>,
    request_id: HeaderValue,
    /// The id is ours (the client sent none), so it is added upstream.
    generated_id: bool,
    /// The client's Host, as text.
    host: Range<usize>,
}

/// What a connection's direct path keeps from one request to the next.
#[derive(Default)]
pub struct ConnMemo {
    /// The last `Authorization` field and whom it named.
    tokens: TokenMemo,
    /// The forwarding fields of the last Host: they differ between requests
    /// on a connection only in the Host, which is almost always the same.
    forwarding: BytesMut,
    forwarding_host: Vec<u8>,
}

impl ConnMemo {
    /// Makes `forwarding` the lines for a request to `host` on `conn`.
    fn forward_to(&mut self, conn: &ConnState, host: &str) {
        if self.forwarding.is_empty() || self.forwarding_host != host.as_bytes() {
            let origin = Origin {
                peer: conn.peer.ip(),
                peer_text: &conn.peer_ip,
                proto: conn.listener.scheme,
                host: None,
                version: Version::HTTP_11,
            };
            self.forwarding.clear();
            headers::put_forwarding(&mut self.forwarding, &origin, host);
            self.forwarding_host.clear();
            self.forwarding_host.extend_from_slice(host.as_bytes());
        }
    }
}

impl DirectPath {
    /// Whether the direct path takes `req`, and how; `None` leaves it to
    /// the stack, which answers (and counts) what the direct path refuses.
    /// Its only side effects are on `memo`, what the connection keeps, and
    /// the count of a known token it takes.
    pub fn plan(&self, conn: &ConnState, req: &RequestHead, memo: &mut ConnMemo) -> Option<Plan> {
        let path = req.uri.path();
        if let Some(server) = &*self.oauth.load()
            && server.endpoint(&conn.listener.name, path).is_some()
        {
            return None;
        }
        let mut host = None;
        let mut client_id = None;
        let mut field_bytes = 0;
        for field in &req.fields {
            let value = req.value(field);
            field_bytes += field.0.as_str().len() + value.len() + 4;
            match field.0 {
                header::HOST if host.is_none() => host = Some(field.1.clone()),
                header::HOST => return None,
                header::CONNECTION => {
                    let only_persistence = wire::list_elements(value).all(|t| {
                        t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
                    });
                    if !only_persistence {
                        return None;
                    }
                }
                ref name if *name == X_REQUEST_ID => {
                    if client_id.is_some() || !request_id::acceptable(value) {
                        return None;
                    }
                    client_id = Some(field.1.clone());
                }
                ref name if headers::needs_stack(name) => return None,
                _ => {}
            }
        }
        let host = host?;
        let host_text = std::str::from_utf8(&req.head[host.clone()]).ok()?;
        let table = self.table.load();
        let route = table.find_by(&req.method, host_name(host_text), path, req)?;
        let auth = &route.auth;
        // Client certificates come on TLS listeners, which hyper reads.
        if auth.accept_mtls || !route.pool.plain_http1() {
            return None;
        }
        let identity = if auth.required() {
            match auth::identify_from(auth, req, req.uri.query(), None, Some(&mut memo.tokens)) {
                Ok(Step::Done(identity)) => Some(identity),
                _ => return None,
            }
        } else {
            None
        };
        let allowed_by = match &auth.policy {
            Some(policy) => {
                let who = identity.as_deref().unwrap_or(&ANONYMOUS);
                let decision = policy.evaluate(who, &Action::http(req.method.as_str(), path));
                if !decision.allowed() {
                    return None;
                }
                Some(decision.rule)
            }
            None => None,
        };
        let sizes = Sizes {
            uri: req.uri.path_and_query().map_or(0, |pq| pq.as_str().len()),
            fields: req.fields.len(),
            field_bytes,
            // Heads with a body other than `content-length: 0` never come here.
            declared_body: None,
            path,
        };
        limits::check_sizes(&conn.listener.limits, &sizes).ok()?;
        // Written now for `forward`, which reads the memo.
        memo.forward_to(conn, host_text);
        let (request_id, generated_id) = match client_id {
            // Shares the head's bytes (`acceptable` checked them).
            Some(id) => (
                HeaderValue::from_maybe_shared(req.head.slice(id)).ok()?,
                false,
            ),
            None => (request_id::generate(), true),
        };
        Some(Plan {
            route: route.clone(),
            identity,
            allowed_by,
            request_id,
            generated_id,
            host,
        })
    }

    /// Forwards a planned request; every failure is answered here, as the
    /// stack answers it.
    // The request and plan are borrowed from the connection's loop: taken
    // by value, each would sit in this future twice (argument and local).
    pub async fn forward(
        &self,
        conn: &Arc<ConnState>,
        req: &RequestHead,
        plan: &mut Plan,
        memo: &ConnMemo,
        deadline: Pin<&mut Sleep>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let Plan {
            route,
            identity,
            allowed_by,
            request_id,
            generated_id,
            host,
        } = plan;
        let host = &req.head[host.clone()];
        let auth = &route.auth;
        if let Some(rule) = *allowed_by {
            let who = identity.as_deref().unwrap_or(&ANONYMOUS);
            tracing::debug!(
                route = %route.name, subject = %who.subject, via = who.method.as_str(),
                rule = ?rule, allowed = true, "policy decision"
            );
        }
        if allowed_by.is_some() || identity.is_some() {
            route.metrics.allowed.inc();
        }

        // The client's fields as they came, less those this hop drops or
        // replaces, then the forwarding fields.
        let mut fields = BytesMut::with_capacity(req.head.len() + 256);
        for field in &req.fields {
            let value = req.value(field);
            let name = &field.0;
            if headers::replaced_by_forwarding(name)
                || auth.identity_headers.contains(name)
                || (!auth.forward_token && *name == header::AUTHORIZATION)
            {
                continue;
            }
            wire::put_field(&mut fields, name, value);
        }
        // `plan` put this request's Host's lines there.
        fields.extend_from_slice(&memo.forwarding);
        if let Some(who) = &identity {
            for (name, field) in &auth.forward_claims {
                if let Some(value) = authz::render(who, field) {
                    wire::put_field(&mut fields, name, value.as_bytes());
                }
            }
        }
        if *generated_id {
            wire::put_field(&mut fields, &X_REQUEST_ID, request_id.as_bytes());
        }

        let path = route.upstream_path(&req.uri);
        let mut outgoing = Outgoing::Encoded {
            method: &req.method,
            path: path.as_str(),
            host: route.preserve_host.then_some(host),
            fields: &fields,
        };
        // Not boxed: the allocation and the copy into it cost more than
        // this future's one move into the connection's (measured).
        let result = proxy::forward(
            &self.clients,
            conn,
            route,
            &mut outgoing,
            false,
            start,
            deadline,
        )
        .await;
        let (mut resp, error) = match result {
            Ok(resp) => (resp, None),
            Err(e) => (e.to_response(request_id), Some(e)),
        };
        access_log::record(
            &Entry {
                start,
                conn: Some(conn),
                route: &route.name,
                metrics: &route.metrics,
                request_id,
                method: &req.method,
                path: self
                    .access_log
                    .load(Ordering::Relaxed)
                    .then(|| req.uri.path()),
            },
            resp.status().as_u16(),
            error.as_ref(),
            identity.as_ref().map_or("-", |who| who.subject.as_str()),
        );
        // Moved, not cloned: a generated id is not shared yet, and its
        // first clone would allocate to share it.
        let request_id = std::mem::replace(request_id, HeaderValue::from_static(""));
        match resp.body_mut().response_lines_mut() {
            Some(lines) => lines.request_id = Some(request_id),
            None => {
                resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
            }
        }
        Ok(resp)
    }
}
