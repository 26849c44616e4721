//! A session's transport: WAMP messages over a WebSocket (one message per
//! WebSocket message) or RawSocket (length-prefixed frames), serialized
//! with the serializer the client chose, and what the session tells about
//! the connection (`details.transport`).

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Frame;

use super::message::{Message, Serializer};
use super::rawsocket::RawSocket;
use super::router::Outgoing;
use super::value::{Dict, Value};
use crate::identity::CertIdentity;
use crate::transport::UpgradedIo;
use crate::transport::websocket::WebSocket;

pub enum Transport {
    WebSocket(WebSocket),
    RawSocket(RawSocket<Box<dyn UpgradedIo>>),
}

/// Facts about the connection a session came on.
pub struct Connection {
    pub listener: Arc<str>,
    /// `ip:port`.
    pub peer: String,
    pub ip: std::net::IpAddr,
    pub cert: Option<Arc<CertIdentity>>,
    pub tls: bool,
}

pub struct Wire {
    pub transport: Transport,
    pub serializer: Serializer,
    pub max: usize,
    pub conn: Connection,
}

impl Wire {
    /// Writes one message now.
    pub async fn send(&mut self, message: &Message) -> bool {
        self.feed(message).await && self.flush().await
    }

    /// Buffers one message for the next [`flush`](Self::flush): what a
    /// session's queue holds goes out in one write.
    pub async fn feed(&mut self, message: &Message) -> bool {
        let bytes = self.serializer.encode(message);
        match &mut self.transport {
            Transport::WebSocket(ws) => {
                let frame = match self.serializer.is_text() {
                    true => Frame::text(String::from_utf8(bytes).unwrap_or_default()),
                    false => Frame::binary(bytes),
                };
                ws.feed(frame).await.is_ok()
            }
            Transport::RawSocket(raw) => raw.feed(&bytes).is_ok(),
        }
    }

    /// Buffers a queued message; a shared one is encoded once for every
    /// session of this serializer.
    pub async fn feed_queued(&mut self, message: &Outgoing) -> bool {
        let shared = match message {
            Outgoing::One(m) => return self.feed(m).await,
            Outgoing::Shared(s) => s,
        };
        let bytes = shared.encoded(self.serializer).clone();
        match &mut self.transport {
            Transport::WebSocket(ws) => {
                let frame = match self.serializer.is_text() {
                    true => match tokio_tungstenite::tungstenite::Utf8Bytes::try_from(bytes) {
                        Ok(text) => Frame::Text(text),
                        Err(_) => return false,
                    },
                    false => Frame::Binary(bytes),
                };
                ws.feed(frame).await.is_ok()
            }
            Transport::RawSocket(raw) => raw.feed(&bytes).is_ok(),
        }
    }

    pub async fn flush(&mut self) -> bool {
        match &mut self.transport {
            Transport::WebSocket(ws) => ws.flush().await.is_ok(),
            Transport::RawSocket(raw) => raw.flush().await.is_ok(),
        }
    }

    /// The next message; `Err` with a reason for a malformed one, `None`
    /// when the connection ended.
    pub async fn recv(&mut self) -> Option<Result<Message, String>> {
        let bytes = match &mut self.transport {
            Transport::WebSocket(ws) => loop {
                let frame = match ws.next().await? {
                    Ok(f) => f,
                    // tungstenite enforces the size limit: say so before closing.
                    Err(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
                        return Some(Err(format!("a message over the {}-byte limit", self.max)));
                    }
                    Err(_) => return None,
                };
                match frame {
                    Frame::Text(t) => break bytes::Bytes::from(t),
                    Frame::Binary(b) => break b,
                    Frame::Close(_) => return None,
                    _ => continue,
                }
            },
            Transport::RawSocket(raw) => match raw.recv().await? {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            },
        };
        Some(self.serializer.decode(&bytes).map_err(|e| e.to_string()))
    }

    pub async fn close(&mut self) {
        match &mut self.transport {
            Transport::WebSocket(ws) => crate::transport::websocket::close(ws, None).await,
            Transport::RawSocket(raw) => raw.close().await,
        }
    }

    pub async fn abort(&mut self, reason: &str, message: &str) {
        let _ = self
            .send(&Message::Abort {
                details: Dict::from([("message".into(), Value::Str(message.to_owned()))]),
                reason: reason.to_owned(),
            })
            .await;
        self.close().await;
    }

    /// `details.transport` of the session, as Crossbar gives it to
    /// authenticators and the meta API: `type`, `protocol`, `peer`, and the
    /// client certificate as `peer_cert` (also `client_cert`).
    pub fn details(&self) -> Dict {
        let kind = match self.transport {
            Transport::WebSocket(_) => "websocket",
            Transport::RawSocket(_) => "rawsocket",
        };
        let family = if self.conn.peer.starts_with('[') {
            "tcp6"
        } else {
            "tcp4"
        };
        let mut d = Dict::from([
            ("type".into(), Value::Str(kind.into())),
            (
                "protocol".into(),
                Value::Str(self.serializer.subprotocol().into()),
            ),
            (
                "peer".into(),
                Value::Str(format!("{family}:{}", self.conn.peer)),
            ),
            ("is_secure".into(), Value::Bool(self.conn.tls)),
            (
                "listener".into(),
                Value::Str(self.conn.listener.to_string()),
            ),
        ]);
        if let Some(cert) = &self.conn.cert {
            let c = Value::Dict(cert_details(cert));
            d.insert("peer_cert".into(), c.clone());
            d.insert("client_cert".into(), c);
        }
        d
    }
}

/// A certificate as Crossbar describes it: fingerprints as upper-case hex
/// with colons, subject and issuer by lower-case short name, the serial in
/// decimal, validity as RFC 3339 text.
pub fn cert_details(cert: &CertIdentity) -> Dict {
    let colons = colon_hex;
    let time = |secs: i64| {
        time::OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default()
    };
    Dict::from([
        ("sha1".into(), Value::Str(colons(&cert.sha1))),
        ("sha256".into(), Value::Str(colons(&cert.sha256))),
        ("subject".into(), Value::Dict(name_details(&cert.subject))),
        ("issuer".into(), Value::Dict(name_details(&cert.issuer))),
        ("serial".into(), Value::Str(decimal(&cert.serial))),
        ("not_before".into(), Value::Str(time(cert.not_before))),
        ("not_after".into(), Value::Str(time(cert.not_after))),
    ])
}

/// `ab01..` as `AB:01:..`, how Crossbar writes fingerprints.
pub fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// An RFC 4514 name (`CN=a,O=b`) as `{cn: a, o: b}`; the first value of a
/// repeated attribute; `\`-escapes undone.
fn name_details(name: &str) -> Dict {
    let mut out = Dict::new();
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    current.push('\\');
                    current.push(n);
                }
            }
            ',' | '+' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    for part in parts {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        let mut unescaped = String::with_capacity(value.len());
        let mut it = value.chars();
        while let Some(c) = it.next() {
            match c {
                '\\' => unescaped.extend(it.next()),
                c => unescaped.push(c),
            }
        }
        out.entry(key.trim().to_ascii_lowercase())
            .or_insert(Value::Str(unescaped));
    }
    out
}

/// Hex digits of an unsigned number as decimal text.
fn decimal(hex: &str) -> String {
    let mut digits: Vec<u8> = vec![0]; // little-endian base 10
    for h in hex.chars().filter_map(|c| c.to_digit(16)) {
        let mut carry = h;
        for d in &mut digits {
            let v = u32::from(*d) * 16 + carry;
            *d = (v % 10) as u8;
            carry = v / 10;
        }
        while carry > 0 {
            digits.push((carry % 10) as u8);
            carry /= 10;
        }
    }
    digits.iter().rev().map(|d| char::from(b'0' + d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_serials() {
        let d = name_details("CN=auth1,O=XBR\\, Ltd,OU=ops,C=GB");
        assert_eq!(d.get("cn"), Some(&Value::Str("auth1".into())));
        assert_eq!(d.get("o"), Some(&Value::Str("XBR, Ltd".into())));
        assert_eq!(d.get("ou"), Some(&Value::Str("ops".into())));
        assert_eq!(d.get("c"), Some(&Value::Str("GB".into())));
        assert_eq!(decimal("ff"), "255");
        assert_eq!(decimal("0"), "0");
        // 2^128, past any machine integer.
        assert_eq!(
            decimal("0100000000000000000000000000000000"),
            "340282366920938463463374607431768211456"
        );
    }
}
