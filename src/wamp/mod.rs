//! The WAMP router, built up in slices. So far: the codec (every Basic
//! and Advanced Profile message in JSON, MessagePack and CBOR, checked
//! against the wamp-proto repository's test vectors); WAMP over WebSocket
//! on HTTP listeners; realms; anonymous and ticket authentication through
//! the shared Authenticator; a broker and a dealer with exact matching,
//! every action checked by the shared policy engine.

pub mod message;
mod router;
mod session;
pub mod value;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};

pub use message::{CodecError, Message, Serializer};
pub use router::{Router, Settings};
pub use value::{Dict, Value};

use crate::authz::{Policy, Resource};
use crate::config::{Config, ConfigError};
use crate::identity::{Authenticator, CertIdentity, Users};
use crate::metrics::RouteMetrics;
use crate::transport::{self, ConnState, LocalBody, LocalFuture, LocalService, Switch};

/// The router's settings for `cfg`, with the users the gateway knows.
pub fn settings(cfg: &Config, users: &Arc<Users>) -> Result<Settings, Vec<ConfigError>> {
    let w = &cfg.wamp;
    let policy = Policy::compile(&w.policy, Resource::Uri).map_err(|problems| {
        problems
            .into_iter()
            .map(|(at, message)| ConfigError {
                path: format!("wamp.policy{at}"),
                message,
            })
            .collect::<Vec<_>>()
    })?;
    Ok(Settings {
        policy,
        authn: Authenticator {
            accept_jwt: false,
            accept_cert: false,
            require_both: false,
            providers: Vec::new(),
            users: w.auth.ticket.then(|| users.clone()),
        },
        anonymous: w.auth.anonymous,
        ticket: w.auth.ticket,
        max_queued: w.max_queued_messages,
        max_message: w.max_message_size.as_usize(),
    })
}

/// WAMP over WebSocket at a path of HTTP listeners.
pub struct WampOverWebSocket {
    pub router: Arc<Router>,
    /// `None`: every HTTP listener.
    pub listeners: Option<Vec<String>>,
    pub path: String,
    pub metrics: RouteMetrics,
}

impl LocalService for WampOverWebSocket {
    fn name(&self) -> &str {
        "wamp-ws"
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
        Box::pin(async {
            let mut r = Response::new(Bytes::from_static(
                b"WAMP over WebSocket: connect with subprotocol wamp.2.json, wamp.2.msgpack or wamp.2.cbor\n",
            ));
            *r.status_mut() = http::StatusCode::UPGRADE_REQUIRED;
            r.headers_mut().insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            );
            r
        })
    }

    fn upgrades(&self, _endpoint: u16) -> bool {
        true
    }

    fn upgrade(
        self: Arc<Self>,
        _endpoint: u16,
        request: Request<()>,
        _conn: Arc<ConnState>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Switch> + Send>> {
        Box::pin(async move {
            let accepted = match transport::websocket::accept(
                &request,
                &["wamp.2.json", "wamp.2.msgpack", "wamp.2.cbor"],
            ) {
                Ok(a) => a,
                Err(refused) => return Switch::refuse(*refused),
            };
            let serializer = accepted
                .protocol
                .and_then(Serializer::from_subprotocol)
                .unwrap_or(Serializer::Json);
            let service = self.clone();
            Switch {
                response: accepted.response,
                takeover: Some(Box::new(move |io, conn| {
                    Box::pin(async move {
                        let max = service.router.settings.load().max_message;
                        let ws = transport::websocket::server(io, max).await;
                        session::serve(
                            ws,
                            serializer,
                            service.router.clone(),
                            conn.peer_cert.clone(),
                            conn.peer.to_string(),
                        )
                        .await;
                    })
                })),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Every vector of wamp-proto's `testsuite/singlemessage` (see
    /// tests/data/README.md): each serializer's bytes decode to the same
    /// message, of the vector's type, with its expected attributes; each
    /// message encodes in each serializer to bytes that decode to it again.
    #[test]
    fn the_wamp_proto_test_vectors() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/wamp-vectors.json");
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 35);
        let mut checked = 0;
        for v in vectors {
            let what = format!("{} ({})", v["file"], v["description"]);
            let mut decoded: Vec<(Serializer, Message)> = Vec::new();
            for j in v["json"].as_array().unwrap() {
                let m = Serializer::Json.decode(j.as_str().unwrap().as_bytes());
                decoded.push((
                    Serializer::Json,
                    m.unwrap_or_else(|e| panic!("{what}: {e}")),
                ));
            }
            for (key, ser) in [("msgpack", Serializer::MsgPack), ("cbor", Serializer::Cbor)] {
                for h in v[key].as_array().unwrap() {
                    let m = ser.decode(&hex(h.as_str().unwrap()));
                    decoded.push((ser, m.unwrap_or_else(|e| panic!("{what} {key}: {e}"))));
                }
            }
            assert!(decoded.len() >= 3, "{what}: a vector in every serializer");
            let first = &decoded[0].1;
            for (ser, m) in &decoded {
                assert_eq!(m, first, "{what}: {ser:?} reads the same message");
                assert_eq!(m.code(), v["code"].as_u64().unwrap(), "{what}");
                for again in [Serializer::Json, Serializer::MsgPack, Serializer::Cbor] {
                    let bytes = again.encode(m);
                    assert_eq!(
                        &again.decode(&bytes).unwrap(),
                        m,
                        "{what}: {again:?} round trip"
                    );
                }
            }
            expected(first, &v["expected"], &what);
            checked += 1;
        }
        assert_eq!(checked, vectors.len());
    }

    type Payload<'a> = (&'a Option<Value>, &'a Option<Value>);

    /// The attributes the vectors name, against the message read.
    fn expected(m: &Message, want: &serde_json::Value, what: &str) {
        let json = |v: &Value| -> serde_json::Value {
            let bytes = Serializer::Json.encode(&Message::Result {
                request: 0,
                details: Dict::new(),
                args: Some(Value::List(vec![v.clone()])),
                kwargs: None,
            });
            let list: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            list[3][0].clone()
        };
        let dict = |d: &Dict| json(&Value::Dict(d.clone()));
        let id = |i: u64| serde_json::Value::from(i);
        let (request, uri, payload): (Option<u64>, Option<&str>, Option<Payload<'_>>) = match m {
            Message::Call {
                request,
                procedure,
                args,
                kwargs,
                ..
            } => (Some(*request), Some(procedure), Some((args, kwargs))),
            Message::Publish {
                request,
                topic,
                args,
                kwargs,
                ..
            } => (Some(*request), Some(topic), Some((args, kwargs))),
            Message::Subscribe { request, topic, .. } => (Some(*request), Some(topic), None),
            Message::Register {
                request, procedure, ..
            } => (Some(*request), Some(procedure), None),
            Message::Result {
                request,
                args,
                kwargs,
                ..
            } => (Some(*request), None, Some((args, kwargs))),
            Message::Error {
                request,
                error,
                args,
                kwargs,
                ..
            } => (Some(*request), Some(error), Some((args, kwargs))),
            Message::Event { args, kwargs, .. } => (None, None, Some((args, kwargs))),
            Message::Hello { realm, .. } => (None, Some(realm), None),
            _ => (None, None, None),
        };
        assert_eq!(want["message_type"].as_u64(), Some(m.code()), "{what}");
        if let (Some(r), Some(w)) = (request, want.get("request_id")) {
            assert_eq!(&id(r), w, "{what}: request id");
        }
        for key in ["procedure", "topic", "realm", "error"] {
            if let Some(w) = want.get(key) {
                assert_eq!(
                    uri.map(serde_json::Value::from).as_ref(),
                    Some(w),
                    "{what}: {key}"
                );
            }
        }
        if let Some((args, kwargs)) = payload {
            if let Some(w) = want.get("args").filter(|w| !w.is_null()) {
                assert_eq!(args.as_ref().map(json).as_ref(), Some(w), "{what}: args");
            }
            if let Some(w) = want.get("kwargs").filter(|w| !w.is_null()) {
                assert_eq!(
                    kwargs.as_ref().map(json).as_ref(),
                    Some(w),
                    "{what}: kwargs"
                );
            }
        }
        let dicts: Vec<(&str, &Dict)> = match m {
            Message::Call { options, .. }
            | Message::Publish { options, .. }
            | Message::Subscribe { options, .. }
            | Message::Register { options, .. }
            | Message::Cancel { options, .. }
            | Message::Interrupt { options, .. }
            | Message::Yield { options, .. } => vec![("options", options)],
            Message::Result { details, .. }
            | Message::Error { details, .. }
            | Message::Event { details, .. }
            | Message::Invocation { details, .. }
            | Message::Abort { details, .. }
            | Message::Goodbye { details, .. } => vec![("details", details)],
            Message::Challenge { extra, .. } | Message::Authenticate { extra, .. } => {
                vec![("extra", extra)]
            }
            _ => vec![],
        };
        for (key, d) in dicts {
            if let Some(w) = want.get(key) {
                assert_eq!(&dict(d), w, "{what}: {key}");
            }
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let json = |s: &str| Serializer::Json.decode(s.as_bytes());
        assert_eq!(json("{}"), Err(CodecError::NotAList));
        assert_eq!(json("[]"), Err(CodecError::NotAList));
        assert_eq!(json("[999, 1]"), Err(CodecError::UnknownType(999)));
        assert!(matches!(
            json(r#"[48, 1, {}]"#),
            Err(CodecError::Shape { code: 48, .. })
        ));
        assert!(
            matches!(
                json(r#"[48, 1, {}, "p", {}]"#),
                Err(CodecError::Shape { code: 48, .. })
            ),
            "args must be a list"
        );
        assert!(
            matches!(
                json(r#"[17, 1, 2, 3]"#),
                Err(CodecError::Shape { code: 17, .. })
            ),
            "too many elements"
        );
        assert!(
            matches!(json(r#"[48, -1, {}, "p"]"#), Err(CodecError::Shape { .. })),
            "ids are not negative"
        );
        assert!(matches!(json("[48, 1"), Err(CodecError::Syntax("JSON", _))));
        assert!(matches!(
            json(r#"[36, 1, 2, {}, "\u0000not base64!"]"#),
            Err(CodecError::Syntax(..))
        ));
        let deep = format!("[50, 1, {{}}, {}{}]", "[".repeat(200), "]".repeat(200));
        assert!(json(&deep).is_err(), "nesting is bounded");
        assert!(Serializer::MsgPack.decode(&[0xc1]).is_err());
        assert!(Serializer::Cbor.decode(&[0xff, 0x00]).is_err());
    }

    #[test]
    fn binary_travels_between_serializers() {
        let m = Message::Event {
            subscription: 1,
            publication: 2,
            details: Dict::new(),
            args: Some(Value::List(vec![Value::Bytes(vec![0, 159, 255])])),
            kwargs: None,
        };
        let json = Serializer::Json.encode(&m);
        assert_eq!(
            String::from_utf8(json.clone()).unwrap(),
            r#"[36,1,2,{},["\u0000AJ//"]]"#
        );
        let from_json = Serializer::Json.decode(&json).unwrap();
        let cbor = Serializer::Cbor.encode(&from_json);
        assert_eq!(Serializer::Cbor.decode(&cbor).unwrap(), m);
        assert_eq!(
            Serializer::from_subprotocol("wamp.2.cbor"),
            Some(Serializer::Cbor)
        );
    }
}
