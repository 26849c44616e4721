//! WebSocket for local services (MQTT and WAMP over WebSocket, the tunnel
//! relay): the opening handshake (RFC 6455 §4.2) is answered here, once;
//! the framing after it is tokio-tungstenite's, with limits on frames and
//! messages.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use super::{ConnState, LocalBody, LocalFuture, LocalService, Switch, UpgradedIo};
use crate::identity::CertIdentity;
use crate::metrics::RouteMetrics;

/// A WebSocket connection a local service took over.
pub type WebSocket = WebSocketStream<Box<dyn UpgradedIo>>;

/// An opening handshake accepted: the `101` to send and the subprotocol
/// chosen (the first the client offered that the service speaks).
#[derive(Debug)]
pub struct Accepted {
    pub response: Response<Bytes>,
    pub protocol: Option<&'static str>,
}

/// A plain-text refusal of a handshake.
pub fn refuse(status: StatusCode, why: &str) -> Box<Response<Bytes>> {
    let mut r = Response::new(Bytes::from(format!("{why}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Box::new(r)
}

/// Answers a client's opening handshake. `speaks` lists the subprotocols
/// the service takes, best first; when it is not empty the client must
/// offer one of them (`Sec-WebSocket-Protocol`), or is refused with 400.
/// Anything else wrong is a 400 too, or 426 for a version other than 13.
pub fn accept(
    request: &Request<()>,
    speaks: &[&'static str],
) -> Result<Accepted, Box<Response<Bytes>>> {
    let headers = request.headers();
    let tokens = |name: header::HeaderName| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
    };
    if request.method() != http::Method::GET {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket handshake is a GET",
        ));
    }
    if !tokens(header::UPGRADE)
        .iter()
        .any(|t| t.eq_ignore_ascii_case("websocket"))
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "expected `Upgrade: websocket`",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is spoken",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(r);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes())
        .filter(|k| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .is_ok_and(|raw| raw.len() == 16)
        })
        .ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` must be 16 bytes in base64",
            )
        })?;
    let offered = tokens(header::SEC_WEBSOCKET_PROTOCOL);
    let protocol = speaks
        .iter()
        .find(|ours| offered.iter().any(|o| o == *ours))
        .copied();
    if !speaks.is_empty() && protocol.is_none() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            &format!(
                "`Sec-WebSocket-Protocol` must offer one of: {}",
                speaks.join(", ")
            ),
        ));
    }
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::try_from(accept).expect("base64 is a valid field value"),
    );
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok(Accepted { response, protocol })
}

/// The answer to a request for a WebSocket endpoint that is not a
/// handshake: 426, saying how to connect.
pub fn upgrade_required(hint: &str) -> Response<Bytes> {
    let mut r = *refuse(StatusCode::UPGRADE_REQUIRED, hint);
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    r
}

/// The WebSocket on a connection after its `101`; a message (and a frame)
/// longer than `max_message` bytes ends the connection.
pub async fn server(io: Box<dyn UpgradedIo>, max_message: usize) -> WebSocket {
    // A small read buffer: tungstenite's 128 KiB default is allocated per
    // connection and zero-filled before every read.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
}

/// Whether a handshake may connect, given the origins an endpoint lists
/// (`*` for any): one from a page of another site only when its origin is
/// listed. Clients that are not browsers send no `Origin`, or (as paho
/// does) their target as their origin, and are not affected. An origin
/// naming the request's own `Host` is the same site: over TLS when it is
/// `https://` (a page over plain HTTP is another site); without TLS only
/// for an IP address or `localhost` (a DNS name there could be rebound to
/// this address by any site).
pub fn origin_allowed(allowed: &[String], headers: &http::HeaderMap, tls: bool) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).map(|o| o.as_bytes()) else {
        return true;
    };
    let authority = match (origin.strip_prefix(b"https://"), tls) {
        (Some(a), _) => Some(a),
        (None, true) => None,
        (None, false) => origin.strip_prefix(b"http://"),
    };
    let same_site = authority.is_some_and(|a| {
        let Some(host) = headers.get(header::HOST).map(|h| h.as_bytes()) else {
            return false;
        };
        host.eq_ignore_ascii_case(a) && (tls || is_address(host))
    });
    same_site
        || allowed
            .iter()
            .any(|o| o == "*" || o.as_bytes().eq_ignore_ascii_case(origin))
}

/// Whether a Host field names an IP address or `localhost` (with or
/// without a port).
fn is_address(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Closes a WebSocket as its server: sends `frame`, waits (briefly) for
/// the client's close, then ends the connection under it ([`finish`]).
pub async fn close(ws: &mut WebSocket, frame: Option<CloseFrame>) {
    use futures_util::StreamExt;
    let wait = std::time::Duration::from_secs(2);
    if tokio::time::timeout(wait, ws.close(frame)).await.is_ok() {
        let _ =
            tokio::time::timeout(wait, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    }
    finish(ws).await;
}

/// Ends the connection under a WebSocket whose close handshake is done
/// (or given up on): TLS's close_notify, then the TCP FIN. RFC 6455 has
/// the server close the connection first; dropping it would cut TLS off
/// without its close (clients then report a truncation).
pub async fn finish(ws: &mut WebSocket) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), ws.get_mut().shutdown()).await;
}

/// What serves the connections of a WebSocket endpoint (MQTT and WAMP over
/// WebSocket, the tunnel relay).
pub trait WsService: Send + Sync + 'static {
    /// The largest message it takes.
    fn max_message(&self) -> usize;
    /// Whether a handshake with these header fields may connect (see
    /// [`origin_allowed`]): a browser carries the user's cookies and client
    /// certificate to any site's page.
    fn allows_origin(&self, _headers: &http::HeaderMap, _tls: bool) -> bool {
        true
    }
    /// Serves one connection; `protocol` is the subprotocol chosen.
    fn serve(
        self: Arc<Self>,
        ws: WebSocket,
        protocol: Option<&'static str>,
        conn: Arc<ConnState>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// A WebSocket endpoint at a path of HTTP listeners, as a local service:
/// an upgrade offering one of `subprotocols` goes to `service`; any other
/// request there is answered 426.
pub struct WsEndpoint<S> {
    pub name: &'static str,
    /// `None`: every HTTP listener.
    pub listeners: Option<Vec<String>>,
    pub path: String,
    pub subprotocols: &'static [&'static str],
    pub metrics: RouteMetrics,
    pub service: Arc<S>,
}

impl<S: WsService> LocalService for WsEndpoint<S> {
    fn name(&self) -> &str {
        self.name
    }

    fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    fn endpoint(&self, listener: &str, path: &str) -> Option<u16> {
        let on = self
            .listeners
            .as_ref()
            .is_none_or(|l| l.iter().any(|n| n == listener));
        (on && path == self.path).then_some(0)
    }

    fn serve<'a>(
        self: Arc<Self>,
        _endpoint: u16,
        _request: Request<LocalBody>,
        _peer: IpAddr,
        _cert: Option<&'a CertIdentity>,
    ) -> LocalFuture<'a> {
        let hint = format!(
            "a WebSocket endpoint: connect with subprotocol {}",
            self.subprotocols.join(", ")
        );
        Box::pin(async move { upgrade_required(&hint) })
    }

    fn upgrades(&self, _endpoint: u16) -> bool {
        true
    }

    fn upgrade(
        self: Arc<Self>,
        _endpoint: u16,
        request: Request<()>,
        conn: Arc<ConnState>,
    ) -> Pin<Box<dyn Future<Output = Switch> + Send>> {
        Box::pin(async move {
            if !self
                .service
                .allows_origin(request.headers(), conn.listener.tls.is_some())
            {
                return Switch::refuse(*refuse(
                    StatusCode::FORBIDDEN,
                    "this origin may not connect (allowed_origins)",
                ));
            }
            let accepted = match accept(&request, self.subprotocols) {
                Ok(a) => a,
                Err(refused) => return Switch::refuse(*refused),
            };
            let service = self.service.clone();
            let protocol = accepted.protocol;
            Switch {
                response: accepted.response,
                takeover: Some(Box::new(move |io, conn| {
                    Box::pin(async move {
                        let ws = server(io, service.max_message()).await;
                        service.serve(ws, protocol, conn).await;
                    })
                })),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(extra: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/mqtt")
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn answers_the_rfc_example_and_picks_a_subprotocol() {
        let ok = accept(
            &handshake(&[("sec-websocket-protocol", "chat, mqtt")]),
            &["mqtt"],
        )
        .unwrap();
        assert_eq!(ok.response.status(), 101);
        // RFC 6455 §1.3's worked example.
        assert_eq!(
            ok.response.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(ok.protocol, Some("mqtt"));
        assert_eq!(ok.response.headers()["sec-websocket-protocol"], "mqtt");
        let none = accept(&handshake(&[]), &[]).unwrap();
        assert!(none.protocol.is_none());
        assert!(
            !none
                .response
                .headers()
                .contains_key("sec-websocket-protocol")
        );
    }

    #[test]
    fn only_listed_origins_and_the_same_site_connect() {
        let headers = |origin: Option<&str>| {
            let mut h = http::HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("gw.example:8443"));
            if let Some(o) = origin {
                h.insert(header::ORIGIN, o.parse().unwrap());
            }
            h
        };
        let listed = ["https://app.example".to_owned()];
        let tls = |o| origin_allowed(&listed, &headers(o), true);
        assert!(tls(None), "not a browser");
        assert!(tls(Some("https://app.example")));
        assert!(tls(Some("https://gw.example:8443")), "same site");
        assert!(
            !tls(Some("http://gw.example:8443")),
            "a plain-HTTP page is another site"
        );
        assert!(!tls(Some("https://evil.example")));
        assert!(!tls(Some("https://gw.example")), "another port");
        assert!(!tls(Some("null")));
        assert!(!origin_allowed(
            &[],
            &headers(Some("https://app.example")),
            true
        ));
        assert!(origin_allowed(
            &["*".to_owned()],
            &headers(Some("https://evil.example")),
            true
        ));
        // Without TLS a DNS name could be rebound: only addresses are the same site.
        assert!(!origin_allowed(
            &listed,
            &headers(Some("http://gw.example:8443")),
            false
        ));
        let plain = |origin: &str, host: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static(host));
            h.insert(header::ORIGIN, origin.parse().unwrap());
            origin_allowed(&[], &h, false)
        };
        assert!(plain("https://127.0.0.1:8082", "127.0.0.1:8082"), "paho's");
        assert!(plain("http://localhost:8082", "localhost:8082"));
        assert!(plain("http://[::1]:8082", "[::1]:8082"));
        assert!(!plain("http://rebind.example:8082", "rebind.example:8082"));
    }

    #[test]
    fn refuses_what_is_not_a_handshake() {
        let status = |r: Result<Accepted, Box<Response<Bytes>>>| r.unwrap_err().status().as_u16();
        assert_eq!(
            status(accept(&handshake(&[]), &["mqtt"])),
            400,
            "no subprotocol"
        );
        assert_eq!(
            status(accept(
                &handshake(&[("sec-websocket-protocol", "wamp.2.json")]),
                &["mqtt"]
            )),
            400
        );
        let mut old = handshake(&[]);
        old.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        let refused = accept(&old, &[]).unwrap_err();
        assert_eq!(refused.status(), 426);
        assert_eq!(refused.headers()["sec-websocket-version"], "13");
        let mut short = handshake(&[]);
        short
            .headers_mut()
            .insert("sec-websocket-key", HeaderValue::from_static("c2hvcnQ="));
        assert_eq!(status(accept(&short, &[])), 400);
        let mut h2c = handshake(&[]);
        h2c.headers_mut()
            .insert("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(status(accept(&h2c, &[])), 400);
        let mut post = handshake(&[]);
        *post.method_mut() = http::Method::POST;
        assert_eq!(status(accept(&post, &[])), 405);
    }
}
