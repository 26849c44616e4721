//! WAMP messages between nodes on the bus: a small binary header, then
//! the fields as one MessagePack array (binary stays binary).
//!
//! ```text
//! version  u8    1
//! kind     u8    what follows (below)
//! origin   u64   the sending node's id, big-endian
//! fields         a MessagePack array, per kind:
//!   1 event      [realm, topic, publication, publisher, filters, args, kwargs]
//!   2 call       [realm, call, procedure, caller, receive_progress, timeout, args, kwargs]
//!   3 accepted   []                              (the reply to a call)
//!   4 refused    [error, message]                (the reply to a call)
//!   5 result     [realm, call, progress, args, kwargs]
//!   6 error      [realm, call, error, args, kwargs]
//!   7 cancel     [realm, call, mode]
//!   8 heartbeat  []
//! publisher, caller: nil or [session, authid, authrole]; filters: a map of
//! PUBLISH's black and white lists; args: nil or an array; kwargs: nil or
//! a map.
//! ```
//!
//! Anyone on the NATS server can publish anything: [`decode`] checks every
//! field and refuses what a tollgate would not have written.

use bytes::{BufMut, Bytes, BytesMut};

use super::super::dealer::CancelMode;
use super::super::message::Id;
use super::super::value::{BinaryAs, Decoded, Dict, Encoded, Value};

pub const VERSION: u8 = 1;
const HEADER: usize = 1 + 1 + 8;

/// Who published or called, when disclosed: (session, authid, authrole).
pub type Who = (Id, String, String);

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Event {
        realm: String,
        topic: String,
        publication: Id,
        publisher: Option<Who>,
        filters: Dict,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Call {
        realm: String,
        call: u64,
        procedure: String,
        caller: Option<Who>,
        progress: bool,
        /// Milliseconds; 0 for none.
        timeout: u64,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Accepted,
    Refused {
        error: String,
        message: String,
    },
    Result {
        realm: String,
        call: u64,
        progress: bool,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Error {
        realm: String,
        call: u64,
        error: String,
        args: Option<Value>,
        kwargs: Option<Value>,
    },
    Cancel {
        realm: String,
        call: u64,
        mode: CancelMode,
    },
    Heartbeat,
}

fn text(s: &str) -> Value {
    Value::Str(s.to_owned())
}

fn opt(v: &Option<Value>) -> Value {
    v.clone().unwrap_or(Value::Null)
}

fn who(w: &Option<Who>) -> Value {
    match w {
        None => Value::Null,
        Some((id, authid, authrole)) => {
            Value::List(vec![Value::UInt(*id), text(authid), text(authrole)])
        }
    }
}

/// The bytes of `frame` from `origin`.
pub fn encode(origin: u64, frame: &Frame) -> Bytes {
    let (kind, fields) = match frame {
        Frame::Event {
            realm,
            topic,
            publication,
            publisher,
            filters,
            args,
            kwargs,
        } => (
            1,
            vec![
                text(realm),
                text(topic),
                Value::UInt(*publication),
                who(publisher),
                Value::Dict(filters.clone()),
                opt(args),
                opt(kwargs),
            ],
        ),
        Frame::Call {
            realm,
            call,
            procedure,
            caller,
            progress,
            timeout,
            args,
            kwargs,
        } => (
            2,
            vec![
                text(realm),
                Value::UInt(*call),
                text(procedure),
                who(caller),
                Value::Bool(*progress),
                Value::UInt(*timeout),
                opt(args),
                opt(kwargs),
            ],
        ),
        Frame::Accepted => (3, vec![]),
        Frame::Refused { error, message } => (4, vec![text(error), text(message)]),
        Frame::Result {
            realm,
            call,
            progress,
            args,
            kwargs,
        } => (
            5,
            vec![
                text(realm),
                Value::UInt(*call),
                Value::Bool(*progress),
                opt(args),
                opt(kwargs),
            ],
        ),
        Frame::Error {
            realm,
            call,
            error,
            args,
            kwargs,
        } => (
            6,
            vec![
                text(realm),
                Value::UInt(*call),
                text(error),
                opt(args),
                opt(kwargs),
            ],
        ),
        Frame::Cancel { realm, call, mode } => {
            (7, vec![text(realm), Value::UInt(*call), text(mode.name())])
        }
        Frame::Heartbeat => (8, vec![]),
    };
    let body =
        rmp_serde::to_vec(&Encoded(&Value::List(fields), BinaryAs::Bytes)).unwrap_or_default();
    let mut out = BytesMut::with_capacity(HEADER + body.len());
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u64(origin);
    out.put_slice(&body);
    out.freeze()
}

/// Reads the fields of a decoded array in order, checking each.
struct Fields(std::vec::IntoIter<Value>);

type Result<T> = std::result::Result<T, &'static str>;

impl Fields {
    fn next(&mut self) -> Result<Value> {
        self.0.next().ok_or("a field is missing")
    }

    fn text(&mut self) -> Result<String> {
        match self.next()? {
            Value::Str(s) => Ok(s),
            _ => Err("a field is not text"),
        }
    }

    /// An error URI: short, without whitespace.
    fn uri(&mut self) -> Result<String> {
        let s = self.text()?;
        match !s.is_empty() && s.len() <= 1024 && !s.contains(char::is_whitespace) {
            true => Ok(s),
            false => Err("an error that is not a URI"),
        }
    }

    fn id(&mut self) -> Result<u64> {
        self.next()?.as_id().ok_or("a field is not an id")
    }

    fn flag(&mut self) -> Result<bool> {
        match self.next()? {
            Value::Bool(b) => Ok(b),
            _ => Err("a field is not a bool"),
        }
    }

    fn args(&mut self) -> Result<Option<Value>> {
        match self.next()? {
            Value::Null => Ok(None),
            v @ Value::List(_) => Ok(Some(v)),
            _ => Err("args is not an array"),
        }
    }

    fn kwargs(&mut self) -> Result<Option<Value>> {
        match self.next()? {
            Value::Null => Ok(None),
            v @ Value::Dict(_) => Ok(Some(v)),
            _ => Err("kwargs is not a map"),
        }
    }

    fn who(&mut self) -> Result<Option<Who>> {
        match self.next()? {
            Value::Null => Ok(None),
            Value::List(l) => {
                let mut f = Fields(l.into_iter());
                let w = (f.id()?, f.text()?, f.text()?);
                f.end()?;
                Ok(Some(w))
            }
            _ => Err("a session is neither nil nor [id, authid, authrole]"),
        }
    }

    fn end(&mut self) -> Result<()> {
        match self.0.next() {
            None => Ok(()),
            Some(_) => Err("more fields than the kind has"),
        }
    }
}

/// Reads a frame: its origin and what it says.
pub fn decode(frame: &[u8]) -> Result<(u64, Frame)> {
    if frame.len() < HEADER {
        return Err("shorter than the header");
    }
    if frame[0] != VERSION {
        return Err("an unknown version");
    }
    let kind = frame[1];
    let mut origin = [0u8; 8];
    origin.copy_from_slice(&frame[2..HEADER]);
    let origin = u64::from_be_bytes(origin);
    let body = &frame[HEADER..];
    let mut reader = body;
    let Decoded(value) =
        rmp_serde::from_read(&mut reader).map_err(|_| "fields that are not MessagePack")?;
    if !reader.is_empty() {
        return Err("bytes after the fields");
    }
    let Value::List(fields) = value else {
        return Err("fields that are not an array");
    };
    let mut f = Fields(fields.into_iter());
    let decoded = match kind {
        1 => Frame::Event {
            realm: f.text()?,
            topic: f.text()?,
            publication: f.id()?,
            publisher: f.who()?,
            filters: match f.next()? {
                Value::Dict(d)
                    if d.keys()
                        .all(|k| super::super::broker::FILTERS.contains(&k.as_str())) =>
                {
                    d
                }
                _ => return Err("filters that are not PUBLISH's lists"),
            },
            args: f.args()?,
            kwargs: f.kwargs()?,
        },
        2 => Frame::Call {
            realm: f.text()?,
            call: f.id()?,
            procedure: f.text()?,
            caller: f.who()?,
            progress: f.flag()?,
            timeout: f.id()?,
            args: f.args()?,
            kwargs: f.kwargs()?,
        },
        3 => Frame::Accepted,
        4 => Frame::Refused {
            error: f.uri()?,
            message: f.text()?,
        },
        5 => Frame::Result {
            realm: f.text()?,
            call: f.id()?,
            progress: f.flag()?,
            args: f.args()?,
            kwargs: f.kwargs()?,
        },
        6 => Frame::Error {
            realm: f.text()?,
            call: f.id()?,
            // Whatever the callee said (its node took it): an answer is
            // never dropped for its error's spelling.
            error: f.text()?,
            args: f.args()?,
            kwargs: f.kwargs()?,
        },
        7 => Frame::Cancel {
            realm: f.text()?,
            call: f.id()?,
            mode: CancelMode::from_name(&f.text()?).ok_or("an unknown cancel mode")?,
        },
        8 => Frame::Heartbeat,
        _ => return Err("an unknown kind"),
    };
    f.end()?;
    Ok((origin, decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let args = Some(Value::List(vec![
            Value::Bytes(vec![0, 1, 255]),
            Value::Int(-3),
            Value::Float(1.5),
        ]));
        let kwargs = Some(Value::Dict(Dict::from([("k".into(), text("v"))])));
        let frames = [
            Frame::Event {
                realm: "r".into(),
                topic: "com.a".into(),
                publication: 7,
                publisher: Some((3, "me".into(), "role".into())),
                filters: Dict::from([("exclude_authid".into(), Value::List(vec![text("x")]))]),
                args: args.clone(),
                kwargs: kwargs.clone(),
            },
            Frame::Call {
                realm: "r".into(),
                call: u64::MAX,
                procedure: "com.p".into(),
                caller: None,
                progress: true,
                timeout: 100,
                args: None,
                kwargs: kwargs.clone(),
            },
            Frame::Accepted,
            Frame::Refused {
                error: "wamp.error.no_such_procedure".into(),
                message: "gone".into(),
            },
            Frame::Result {
                realm: "r".into(),
                call: 1,
                progress: false,
                args: args.clone(),
                kwargs: None,
            },
            Frame::Error {
                realm: "r".into(),
                call: 1,
                error: "com.err".into(),
                args,
                kwargs,
            },
            Frame::Cancel {
                realm: "r".into(),
                call: 9,
                mode: CancelMode::Kill,
            },
            Frame::Heartbeat,
        ];
        for f in frames {
            let bytes = encode(42, &f);
            assert_eq!(decode(&bytes), Ok((42, f)));
        }
    }

    #[test]
    fn hostile_bytes_are_refused() {
        let good = encode(1, &Frame::Heartbeat);
        let mut bad_version = good.to_vec();
        bad_version[0] = 2;
        let mut bad_kind = good.to_vec();
        bad_kind[1] = 99;
        let mut trailing = good.to_vec();
        trailing.push(0xc0);
        let deep = {
            let mut v = vec![1u8, 8, 0, 0, 0, 0, 0, 0, 0, 1];
            v.extend(std::iter::repeat_n(0x91, 10_000));
            v.push(0xc0);
            v
        };
        let extra_field = {
            let mut v = good[..HEADER].to_vec();
            v.extend(rmp_serde::to_vec(&vec![1]).unwrap());
            v
        };
        let bad_filters = encode(
            1,
            &Frame::Event {
                realm: "r".into(),
                topic: "t".into(),
                publication: 1,
                publisher: None,
                filters: Dict::from([("exclude_me".into(), Value::Bool(false))]),
                args: None,
                kwargs: None,
            },
        );
        for bad in [
            &b""[..],
            &good[..5],
            &bad_version,
            &bad_kind,
            &trailing,
            &deep,
            &extra_field,
            &bad_filters,
            &encode(
                1,
                &Frame::Refused {
                    error: "not a uri".into(),
                    message: String::new(),
                },
            ),
            &[1, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff],
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
