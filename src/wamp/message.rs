//! WAMP messages (the Basic and Advanced Profile's) and their three
//! serializers: JSON, MessagePack and CBOR (`wamp.2.json`, `.msgpack`,
//! `.cbor`). A message is a list whose first element is its type code; the
//! arguments of calls and events are kept as they came (a list and a dict,
//! or a transparent binary payload) and passed on untouched.

use super::value::{BinaryAs, Decoded, Dict, Encoded, Value};

pub type Id = u64;

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello {
        realm: String,
        details: Dict,
    },
    Welcome {
        session: Id,
        details: Dict,
    },
    Abort {
        details: Dict,
        reason: String,
    },
    Challenge {
        method: String,
        extra: Dict,
    },
    Authenticate {
        signature: String,
        extra: Dict,
    },
    Goodbye {
        details: Dict,
        reason: String,
    },
    Error {
        request_type: u64,
        request: Id,
        details: Dict,
        error: String,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Publish {
        request: Id,
        options: Dict,
        topic: String,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Published {
        request: Id,
        publication: Id,
    },
    Subscribe {
        request: Id,
        options: Dict,
        topic: String,
    },
    Subscribed {
        request: Id,
        subscription: Id,
    },
    Unsubscribe {
        request: Id,
        subscription: Id,
    },
    Unsubscribed {
        request: Id,
        details: Option<Dict>,
    },
    Event {
        subscription: Id,
        publication: Id,
        details: Dict,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    /// Acknowledged event delivery (`x_acknowledged_delivery`).
    EventReceived {
        publication: Id,
    },
    Call {
        request: Id,
        options: Dict,
        procedure: String,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Cancel {
        request: Id,
        options: Dict,
    },
    Result {
        request: Id,
        details: Dict,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Register {
        request: Id,
        options: Dict,
        procedure: String,
    },
    Registered {
        request: Id,
        registration: Id,
    },
    Unregister {
        request: Id,
        registration: Id,
    },
    Unregistered {
        request: Id,
        details: Option<Dict>,
    },
    Invocation {
        request: Id,
        registration: Id,
        details: Dict,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Interrupt {
        request: Id,
        options: Dict,
    },
    Yield {
        request: Id,
        options: Dict,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
}

pub const HELLO: u64 = 1;
pub const WELCOME: u64 = 2;
pub const ABORT: u64 = 3;
pub const CHALLENGE: u64 = 4;
pub const AUTHENTICATE: u64 = 5;
pub const GOODBYE: u64 = 6;
pub const ERROR: u64 = 8;
pub const PUBLISH: u64 = 16;
pub const PUBLISHED: u64 = 17;
pub const SUBSCRIBE: u64 = 32;
pub const SUBSCRIBED: u64 = 33;
pub const UNSUBSCRIBE: u64 = 34;
pub const UNSUBSCRIBED: u64 = 35;
pub const EVENT: u64 = 36;
pub const EVENT_RECEIVED: u64 = 337;
pub const CALL: u64 = 48;
pub const CANCEL: u64 = 49;
pub const RESULT: u64 = 50;
pub const REGISTER: u64 = 64;
pub const REGISTERED: u64 = 65;
pub const UNREGISTER: u64 = 66;
pub const UNREGISTERED: u64 = 67;
pub const INVOCATION: u64 = 68;
pub const INTERRUPT: u64 = 69;
pub const YIELD: u64 = 70;

/// Why bytes are not a WAMP message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("not {0}: {1}")]
    Syntax(&'static str, String),
    #[error("a WAMP message is a list starting with its type code")]
    NotAList,
    #[error("unknown message type {0}")]
    UnknownType(u64),
    #[error("message type {code}: {problem}")]
    Shape { code: u64, problem: &'static str },
}

/// The serializers of `wamp.2.json`, `wamp.2.msgpack`, `wamp.2.cbor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serializer {
    Json,
    MsgPack,
    Cbor,
}

impl Serializer {
    /// The WebSocket subprotocol.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Serializer::Json => "wamp.2.json",
            Serializer::MsgPack => "wamp.2.msgpack",
            Serializer::Cbor => "wamp.2.cbor",
        }
    }

    pub fn from_subprotocol(p: &str) -> Option<Serializer> {
        [Serializer::Json, Serializer::MsgPack, Serializer::Cbor]
            .into_iter()
            .find(|s| s.subprotocol() == p)
    }

    /// Whether its messages are text (WebSocket text frames).
    pub fn is_text(self) -> bool {
        self == Serializer::Json
    }

    pub fn decode(self, bytes: &[u8]) -> Result<Message, CodecError> {
        let Decoded(value) = match self {
            Serializer::Json => serde_json::from_slice(bytes)
                .map_err(|e| CodecError::Syntax("JSON", e.to_string()))?,
            Serializer::MsgPack => rmp_serde::from_slice(bytes)
                .map_err(|e| CodecError::Syntax("MessagePack", e.to_string()))?,
            Serializer::Cbor => ciborium::from_reader(bytes)
                .map_err(|e| CodecError::Syntax("CBOR", e.to_string()))?,
        };
        Message::from_value(value)
    }

    pub fn encode(self, message: &Message) -> Vec<u8> {
        let value = message.to_value();
        match self {
            Serializer::Json => {
                serde_json::to_vec(&Encoded(&value, BinaryAs::JsonString)).unwrap_or_default()
            }
            Serializer::MsgPack => {
                rmp_serde::to_vec(&Encoded(&value, BinaryAs::Bytes)).unwrap_or_default()
            }
            Serializer::Cbor => {
                let mut out = Vec::new();
                let _ = ciborium::into_writer(&Encoded(&value, BinaryAs::Bytes), &mut out);
                out
            }
        }
    }
}

/// Reads a message's elements in order.
struct Fields {
    code: u64,
    items: std::vec::IntoIter<Value>,
}

impl Fields {
    fn bad(&self, problem: &'static str) -> CodecError {
        CodecError::Shape {
            code: self.code,
            problem,
        }
    }

    fn id(&mut self) -> Result<Id, CodecError> {
        self.items
            .next()
            .and_then(|v| v.as_id())
            .ok_or_else(|| self.bad("expected an id"))
    }

    fn uri(&mut self) -> Result<String, CodecError> {
        match self.items.next() {
            Some(Value::Str(s)) => Ok(s),
            _ => Err(self.bad("expected a URI string")),
        }
    }

    fn dict(&mut self) -> Result<Dict, CodecError> {
        match self.items.next() {
            Some(Value::Dict(d)) => Ok(d),
            _ => Err(self.bad("expected a dict")),
        }
    }

    fn opt_dict(&mut self) -> Result<Option<Dict>, CodecError> {
        match self.items.next() {
            None => Ok(None),
            Some(Value::Dict(d)) => Ok(Some(d)),
            _ => Err(self.bad("expected a dict")),
        }
    }

    /// Arguments (a list, or a binary payload passed through) and keyword
    /// arguments (a dict), both optional.
    fn payload(&mut self) -> Result<(Option<Value>, Option<Value>), CodecError> {
        let args = match self.items.next() {
            None => None,
            Some(v @ (Value::List(_) | Value::Bytes(_))) => Some(v),
            Some(_) => return Err(self.bad("arguments must be a list")),
        };
        let kwargs = match self.items.next() {
            None => None,
            Some(v @ Value::Dict(_)) => Some(v),
            Some(_) => return Err(self.bad("keyword arguments must be a dict")),
        };
        Ok((args, kwargs))
    }

    fn done(mut self) -> Result<(), CodecError> {
        match self.items.next() {
            None => Ok(()),
            Some(_) => Err(self.bad("more elements than it has")),
        }
    }
}

impl Message {
    pub fn code(&self) -> u64 {
        match self {
            Message::Hello { .. } => HELLO,
            Message::Welcome { .. } => WELCOME,
            Message::Abort { .. } => ABORT,
            Message::Challenge { .. } => CHALLENGE,
            Message::Authenticate { .. } => AUTHENTICATE,
            Message::Goodbye { .. } => GOODBYE,
            Message::Error { .. } => ERROR,
            Message::Publish { .. } => PUBLISH,
            Message::Published { .. } => PUBLISHED,
            Message::Subscribe { .. } => SUBSCRIBE,
            Message::Subscribed { .. } => SUBSCRIBED,
            Message::Unsubscribe { .. } => UNSUBSCRIBE,
            Message::Unsubscribed { .. } => UNSUBSCRIBED,
            Message::Event { .. } => EVENT,
            Message::EventReceived { .. } => EVENT_RECEIVED,
            Message::Call { .. } => CALL,
            Message::Cancel { .. } => CANCEL,
            Message::Result { .. } => RESULT,
            Message::Register { .. } => REGISTER,
            Message::Registered { .. } => REGISTERED,
            Message::Unregister { .. } => UNREGISTER,
            Message::Unregistered { .. } => UNREGISTERED,
            Message::Invocation { .. } => INVOCATION,
            Message::Interrupt { .. } => INTERRUPT,
            Message::Yield { .. } => YIELD,
        }
    }

    pub fn from_value(value: Value) -> Result<Message, CodecError> {
        let Value::List(items) = value else {
            return Err(CodecError::NotAList);
        };
        let mut items = items.into_iter();
        let code = items
            .next()
            .and_then(|v| v.as_id())
            .ok_or(CodecError::NotAList)?;
        let mut f = Fields { code, items };
        let m = match code {
            HELLO => Message::Hello {
                realm: f.uri()?,
                details: f.dict()?,
            },
            WELCOME => Message::Welcome {
                session: f.id()?,
                details: f.dict()?,
            },
            ABORT => Message::Abort {
                details: f.dict()?,
                reason: f.uri()?,
            },
            CHALLENGE => Message::Challenge {
                method: f.uri()?,
                extra: f.dict()?,
            },
            AUTHENTICATE => Message::Authenticate {
                signature: f.uri()?,
                extra: f.dict()?,
            },
            GOODBYE => Message::Goodbye {
                details: f.dict()?,
                reason: f.uri()?,
            },
            ERROR => {
                let (request_type, request, details, error) =
                    (f.id()?, f.id()?, f.dict()?, f.uri()?);
                let (args, kwargs) = f.payload()?;
                Message::Error {
                    request_type,
                    request,
                    details,
                    error,
                    args,
                    kwargs,
                }
            }
            PUBLISH => {
                let (request, options, topic) = (f.id()?, f.dict()?, f.uri()?);
                let (args, kwargs) = f.payload()?;
                Message::Publish {
                    request,
                    options,
                    topic,
                    args,
                    kwargs,
                }
            }
            PUBLISHED => Message::Published {
                request: f.id()?,
                publication: f.id()?,
            },
            SUBSCRIBE => Message::Subscribe {
                request: f.id()?,
                options: f.dict()?,
                topic: f.uri()?,
            },
            SUBSCRIBED => Message::Subscribed {
                request: f.id()?,
                subscription: f.id()?,
            },
            UNSUBSCRIBE => Message::Unsubscribe {
                request: f.id()?,
                subscription: f.id()?,
            },
            UNSUBSCRIBED => Message::Unsubscribed {
                request: f.id()?,
                details: f.opt_dict()?,
            },
            EVENT => {
                let (subscription, publication, details) = (f.id()?, f.id()?, f.dict()?);
                let (args, kwargs) = f.payload()?;
                Message::Event {
                    subscription,
                    publication,
                    details,
                    args,
                    kwargs,
                }
            }
            EVENT_RECEIVED => Message::EventReceived {
                publication: f.id()?,
            },
            CALL => {
                let (request, options, procedure) = (f.id()?, f.dict()?, f.uri()?);
                let (args, kwargs) = f.payload()?;
                Message::Call {
                    request,
                    options,
                    procedure,
                    args,
                    kwargs,
                }
            }
            CANCEL => Message::Cancel {
                request: f.id()?,
                options: f.dict()?,
            },
            RESULT => {
                let (request, details) = (f.id()?, f.dict()?);
                let (args, kwargs) = f.payload()?;
                Message::Result {
                    request,
                    details,
                    args,
                    kwargs,
                }
            }
            REGISTER => Message::Register {
                request: f.id()?,
                options: f.dict()?,
                procedure: f.uri()?,
            },
            REGISTERED => Message::Registered {
                request: f.id()?,
                registration: f.id()?,
            },
            UNREGISTER => Message::Unregister {
                request: f.id()?,
                registration: f.id()?,
            },
            UNREGISTERED => Message::Unregistered {
                request: f.id()?,
                details: f.opt_dict()?,
            },
            INVOCATION => {
                let (request, registration, details) = (f.id()?, f.id()?, f.dict()?);
                let (args, kwargs) = f.payload()?;
                Message::Invocation {
                    request,
                    registration,
                    details,
                    args,
                    kwargs,
                }
            }
            INTERRUPT => Message::Interrupt {
                request: f.id()?,
                options: f.dict()?,
            },
            YIELD => {
                let (request, options) = (f.id()?, f.dict()?);
                let (args, kwargs) = f.payload()?;
                Message::Yield {
                    request,
                    options,
                    args,
                    kwargs,
                }
            }
            other => return Err(CodecError::UnknownType(other)),
        };
        f.done()?;
        Ok(m)
    }

    pub fn to_value(&self) -> Value {
        let id = |i: &Id| i64::try_from(*i).map_or(Value::UInt(*i), Value::Int);
        let s = |t: &String| Value::Str(t.clone());
        let d = |d: &Dict| Value::Dict(d.clone());
        let mut out = vec![Value::Int(self.code() as i64)];
        // The arguments only when there are any; an empty list is written
        // when keyword arguments follow.
        let payload = |out: &mut Vec<Value>, args: &Option<Value>, kwargs: &Option<Value>| match (
            args, kwargs,
        ) {
            (None, None) => {}
            (Some(a), None) => out.push(a.clone()),
            (a, Some(k)) => {
                out.push(a.clone().unwrap_or(Value::List(Vec::new())));
                out.push(k.clone());
            }
        };
        match self {
            Message::Hello { realm, details } => out.extend([s(realm), d(details)]),
            Message::Welcome { session, details } => out.extend([id(session), d(details)]),
            Message::Abort { details, reason } | Message::Goodbye { details, reason } => {
                out.extend([d(details), s(reason)])
            }
            Message::Challenge { method, extra } => out.extend([s(method), d(extra)]),
            Message::Authenticate { signature, extra } => out.extend([s(signature), d(extra)]),
            Message::Error {
                request_type,
                request,
                details,
                error,
                args,
                kwargs,
            } => {
                out.extend([id(request_type), id(request), d(details), s(error)]);
                payload(&mut out, args, kwargs);
            }
            Message::Publish {
                request,
                options,
                topic,
                args,
                kwargs,
            } => {
                out.extend([id(request), d(options), s(topic)]);
                payload(&mut out, args, kwargs);
            }
            Message::Published {
                request,
                publication,
            } => out.extend([id(request), id(publication)]),
            Message::Subscribe {
                request,
                options,
                topic,
            } => out.extend([id(request), d(options), s(topic)]),
            Message::Subscribed {
                request,
                subscription,
            }
            | Message::Unsubscribe {
                request,
                subscription,
            } => out.extend([id(request), id(subscription)]),
            Message::Unsubscribed { request, details }
            | Message::Unregistered { request, details } => {
                out.push(id(request));
                out.extend(details.as_ref().map(d));
            }
            Message::Event {
                subscription,
                publication,
                details,
                args,
                kwargs,
            } => {
                out.extend([id(subscription), id(publication), d(details)]);
                payload(&mut out, args, kwargs);
            }
            Message::EventReceived { publication } => out.push(id(publication)),
            Message::Call {
                request,
                options,
                procedure,
                args,
                kwargs,
            } => {
                out.extend([id(request), d(options), s(procedure)]);
                payload(&mut out, args, kwargs);
            }
            Message::Cancel { request, options } | Message::Interrupt { request, options } => {
                out.extend([id(request), d(options)])
            }
            Message::Result {
                request,
                details,
                args,
                kwargs,
            } => {
                out.extend([id(request), d(details)]);
                payload(&mut out, args, kwargs);
            }
            Message::Register {
                request,
                options,
                procedure,
            } => out.extend([id(request), d(options), s(procedure)]),
            Message::Registered {
                request,
                registration,
            }
            | Message::Unregister {
                request,
                registration,
            } => out.extend([id(request), id(registration)]),
            Message::Invocation {
                request,
                registration,
                details,
                args,
                kwargs,
            } => {
                out.extend([id(request), id(registration), d(details)]);
                payload(&mut out, args, kwargs);
            }
            Message::Yield {
                request,
                options,
                args,
                kwargs,
            } => {
                out.extend([id(request), d(options)]);
                payload(&mut out, args, kwargs);
            }
        }
        Value::List(out)
    }
}
