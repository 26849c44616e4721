//! The WAMP router: realms with roles, a broker and a dealer (exact,
//! prefix and wildcard matching; shared registrations; progressive
//! results, cancel, timeouts), the meta API, static and dynamic
//! authentication (anonymous, ticket, WAMP-CRA, cryptosign, TLS
//! certificates, JWTs) and authorisation (the shared policy engine, or an
//! authorizer procedure). Served on `protocol: wamp` listeners (RawSocket
//! and WebSocket on one port) and at a WebSocket path of HTTP listeners;
//! JSON, MessagePack and CBOR. In cluster mode events and calls cross
//! nodes over the bus (cluster/).

mod auth;
pub mod auth_crypto;
mod broker;
mod cluster;
mod dealer;
pub mod message;
mod meta;
pub mod rawsocket;
mod router;
mod session;
mod settings;
mod table;
pub mod value;
mod wire;

use std::sync::Arc;

pub use cluster::join_bus;
pub use message::{CodecError, Message, Serializer};
pub use router::Router;
pub use settings::{Settings, settings};
pub use value::{Dict, Value};

use crate::transport::{self, ConnState, FrontEnd, Shutdown, Stream};
use wire::{Connection, Transport, Wire};

/// Whether the config serves WAMP anywhere.
pub fn enabled(cfg: &crate::config::Config) -> bool {
    cfg.wamp.websocket.is_some()
        || cfg
            .listeners
            .iter()
            .any(|l| l.protocol == crate::config::Protocol::Wamp)
}

/// The subprotocols WAMP over WebSocket takes, best first.
pub const WS_SUBPROTOCOLS: &[&str] = &["wamp.2.json", "wamp.2.msgpack", "wamp.2.cbor"];

/// Longest HTTP head a WebSocket handshake on a `protocol: wamp` listener
/// may have.
const MAX_HANDSHAKE: usize = 16 * 1024;

fn connection(conn: &ConnState) -> Connection {
    Connection {
        listener: conn.listener.name.clone(),
        peer: conn.peer.to_string(),
        ip: conn.peer.ip(),
        cert: conn.peer_cert.clone(),
        tls: conn.listener.tls.is_some(),
    }
}

impl transport::websocket::WsService for Router {
    fn max_message(&self) -> usize {
        self.settings.load().max_message
    }

    fn allows_origin(&self, headers: &http::HeaderMap, tls: bool) -> bool {
        transport::websocket::origin_allowed(&self.settings.load().allowed_origins, headers, tls)
    }

    fn serve(
        self: Arc<Self>,
        ws: transport::websocket::WebSocket,
        protocol: Option<&'static str>,
        conn: Arc<ConnState>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let serializer = protocol
            .and_then(Serializer::from_subprotocol)
            .unwrap_or(Serializer::Json);
        let max = self.settings.load().max_message;
        let wire = Wire {
            transport: Transport::WebSocket(ws),
            serializer,
            max,
            conn: connection(&conn),
        };
        Box::pin(session::serve(wire, self))
    }
}

/// `protocol: wamp` listeners: a RawSocket handshake starts with 0x7F,
/// which no HTTP request does; anything else is a WebSocket handshake (at
/// any path).
pub struct WampFrontEnd {
    pub router: Arc<Router>,
}

impl FrontEnd for WampFrontEnd {
    async fn serve<S: Stream>(&self, mut io: S, conn: Arc<ConnState>, shutdown: Shutdown) {
        let max = self.router.settings.load().max_message;
        let peer = conn.peer;
        let opening = async {
            let first = rawsocket::read_first_byte(&mut io).await.ok().flatten()?;
            let io = rawsocket::Prefixed::new(bytes::Bytes::copy_from_slice(&[first]), io);
            if first == rawsocket::FIRST_BYTE {
                return match rawsocket::accept(Box::new(io) as Box<dyn transport::UpgradedIo>, max)
                    .await
                {
                    Ok(raw) => Some((raw.serializer(), Transport::RawSocket(raw))),
                    Err(e) => {
                        tracing::info!(listener = %conn.listener.name, peer = %peer, error = %e,
                            "WAMP RawSocket handshake refused");
                        None
                    }
                };
            }
            websocket_handshake(io, max, &conn, &self.router).await
        };
        let opened = tokio::select! {
            o = tokio::time::timeout(session::JOIN_TIMEOUT, opening) => o.ok().flatten(),
            _ = shutdown.graceful.cancelled() => None,
        };
        let Some((serializer, transport)) = opened else {
            return;
        };
        let wire = Wire {
            transport,
            serializer,
            max,
            conn: connection(&conn),
        };
        session::serve(wire, self.router.clone()).await;
    }
}

/// Reads an HTTP head and answers it as a WebSocket handshake (the one
/// place that does, `transport::websocket::accept`); bytes behind the head
/// stay for the WebSocket.
async fn websocket_handshake<S: Stream>(
    mut io: rawsocket::Prefixed<S>,
    max: usize,
    conn: &ConnState,
    router: &Router,
) -> Option<(Serializer, Transport)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = bytes::BytesMut::with_capacity(1024);
    let (request, head_len) = loop {
        if io.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut request = http::Request::builder()
                    .method(parsed.method.unwrap_or("GET"))
                    .uri(parsed.path.unwrap_or("/"));
                for h in parsed.headers.iter() {
                    request = request.header(h.name, h.value);
                }
                break (request.body(()).ok()?, len);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HANDSHAKE => continue,
            _ => {
                let _ = io
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                    .await;
                tracing::info!(listener = %conn.listener.name, peer = %conn.peer,
                    "not a WAMP RawSocket or WebSocket handshake");
                return None;
            }
        }
    };
    use transport::websocket::WsService;
    let accepted = match router.allows_origin(request.headers(), conn.listener.tls.is_some()) {
        true => transport::websocket::accept(&request, WS_SUBPROTOCOLS),
        false => {
            let mut r = http::Response::new(bytes::Bytes::from_static(
                b"this origin may not connect (wamp.allowed_origins)\n",
            ));
            *r.status_mut() = http::StatusCode::FORBIDDEN;
            Err(Box::new(r))
        }
    };
    let (response, protocol) = match accepted {
        Ok(a) => (a.response, a.protocol),
        Err(refusal) => (*refusal, None),
    };
    let mut head = format!("HTTP/1.1 {}\r\n", response.status());
    for (name, value) in response.headers() {
        head.push_str(name.as_str());
        head.push_str(": ");
        head.push_str(value.to_str().unwrap_or_default());
        head.push_str("\r\n");
    }
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        head.push_str(&format!(
            "connection: close\r\ncontent-length: {}\r\n\r\n",
            response.body().len()
        ));
        let _ = io.write_all(head.as_bytes()).await;
        let _ = io.write_all(response.body()).await;
        return None;
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes()).await.ok()?;
    let rest = buf.split_off(head_len).freeze();
    let io = rawsocket::Prefixed::new(rest, io.into_inner());
    let ws = transport::websocket::server(Box::new(io), max).await;
    let serializer = protocol
        .and_then(Serializer::from_subprotocol)
        .unwrap_or(Serializer::Json);
    Some((serializer, Transport::WebSocket(ws)))
}
