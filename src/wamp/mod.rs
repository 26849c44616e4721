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

use std::sync::Arc;

pub use message::{CodecError, Message, Serializer};
pub use router::{Router, Settings};
pub use value::{Dict, Value};

use crate::authz::{Policy, Resource};
use crate::config::{Config, ConfigError};
use crate::identity::{Authenticator, Users};
use crate::transport::{self, ConnState};

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

/// The subprotocols WAMP over WebSocket takes, best first.
pub const WS_SUBPROTOCOLS: &[&str] = &["wamp.2.json", "wamp.2.msgpack", "wamp.2.cbor"];

impl transport::websocket::WsService for Router {
    fn max_message(&self) -> usize {
        self.settings.load().max_message
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
        Box::pin(session::serve(
            ws,
            serializer,
            self,
            conn.peer_cert.clone(),
            conn.peer.to_string(),
        ))
    }
}
