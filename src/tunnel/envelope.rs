//! Micronets' message envelope: every message is a JSON object
//! `{"message": {"messageId", "messageType", "requiresResponse", ...}}`.
//! REST:REQUEST and REST:RESPONSE carry an HTTP exchange; a body travels
//! as a JSON value (`application/json`), a string (text), or base64
//! (`application/octet-stream`, anything else).

use std::fmt::Write as _;

use base64::Engine;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::transport::{CarriedRequest, CarriedResponse};

pub const HELLO: &str = "CONN:HELLO";
pub const REST_REQUEST: &str = "REST:REQUEST";
pub const REST_RESPONSE: &str = "REST:RESPONSE";
/// What the relay answers a malformed message with.
pub const MALFORMED: &str = "ERROR:MALFORMED";

const OCTET_STREAM: &str = "application/octet-stream";

/// A message id as the relay compares them: a number's decimal text or a
/// string's content (`3` and `"3"` name the same message).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId(pub String);

impl MessageId {
    fn of(v: &Value) -> Option<MessageId> {
        match v {
            Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(MessageId(s.clone())),
            Value::Number(n) if n.is_u64() || n.is_i64() => Some(MessageId(n.to_string())),
            _ => None,
        }
    }
}

/// A message's envelope, checked.
#[derive(Debug)]
pub struct Envelope {
    pub message_type: String,
    pub requires_response: bool,
    pub message_id: Option<MessageId>,
    pub in_response_to: Option<MessageId>,
    /// The whole `message` object.
    pub fields: Map<String, Value>,
}

impl Envelope {
    /// Parses and checks a text message. The error says what is wrong.
    pub fn parse(text: &[u8]) -> Result<Envelope, String> {
        let value: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(mut outer) = value else {
            return Err("not a JSON object".into());
        };
        let Some(Value::Object(fields)) = outer.remove("message") else {
            return Err("no `message` object".into());
        };
        let message_type = match fields.get("messageType") {
            Some(Value::String(t)) if !t.is_empty() => t.clone(),
            _ => return Err("`message.messageType` must be a non-empty string".into()),
        };
        let requires_response = match fields.get("requiresResponse") {
            Some(Value::Bool(b)) => *b,
            _ => return Err("`message.requiresResponse` must be true or false".into()),
        };
        let id_at = |key: &str| -> Result<Option<MessageId>, String> {
            match fields.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => MessageId::of(v).map(Some).ok_or_else(|| {
                    format!("`message.{key}` must be an integer or a string of 1 to 256 bytes")
                }),
            }
        };
        let message_id = id_at("messageId")?;
        let in_response_to = id_at("inResponseTo")?;
        if requires_response && message_id.is_none() {
            return Err("a message that requires a response needs a `messageId`".into());
        }
        if message_type == REST_RESPONSE && in_response_to.is_none() {
            return Err("a REST:RESPONSE needs `inResponseTo`".into());
        }
        if message_type == REST_REQUEST {
            match fields.get("method") {
                Some(Value::String(m)) if !m.is_empty() => {}
                _ => return Err("a REST:REQUEST needs a `method`".into()),
            }
            match fields.get("path") {
                Some(Value::String(p)) if p.starts_with('/') => {}
                _ => return Err("a REST:REQUEST needs a `path` starting with `/`".into()),
            }
        }
        Ok(Envelope {
            message_type,
            requires_response,
            message_id,
            in_response_to,
            fields,
        })
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// A CONN:HELLO's `peerClass` and `peerId`.
    pub fn hello(&self) -> Option<(String, String)> {
        if self.message_type != HELLO {
            return None;
        }
        let text = |key| match self.fields.get(key) {
            Some(Value::String(s)) => s.chars().take(128).collect(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        Some((text("peerClass"), text("peerId")))
    }

    /// The HTTP request a REST:REQUEST carries.
    pub fn request(&self) -> Result<CarriedRequest, String> {
        if self.message_type != REST_REQUEST {
            return Err(format!("a {} is not a REST:REQUEST", self.message_type));
        }
        let query = match self.fields.get("queryStrings") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => pairs(v, "queryStrings")?,
        };
        let (headers, content_type, body) = self.body_and_headers()?;
        Ok(CarriedRequest {
            method: self.str("method").unwrap_or_default().to_owned(),
            path: self.str("path").unwrap_or_default().to_owned(),
            query,
            headers,
            content_type,
            body,
        })
    }

    /// The HTTP response a REST:RESPONSE carries.
    pub fn response(&self) -> Result<CarriedResponse, String> {
        if self.message_type != REST_RESPONSE {
            return Err(format!("a {} is not a REST:RESPONSE", self.message_type));
        }
        let status = self
            .fields
            .get("statusCode")
            .and_then(Value::as_u64)
            .filter(|s| (200..=599).contains(s))
            .ok_or("`statusCode` must be an integer from 200 to 599")?;
        let reason = self.str("reasonPhrase").map(str::to_owned);
        let (headers, content_type, body) = self.body_and_headers()?;
        Ok(CarriedResponse {
            status: status as u16,
            reason,
            headers,
            content_type,
            body,
        })
    }

    /// The header pairs, the body's media type and the body's bytes.
    fn body_and_headers(&self) -> Result<Parts, String> {
        let mut headers = match self.fields.get("headers") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => pairs(v, "headers")?,
        };
        let format = self.str("dataFormat").map(str::to_owned);
        let body = match (self.fields.get("messageBody"), format.as_deref()) {
            (None | Some(Value::Null), _) => Bytes::new(),
            (Some(v), Some(f)) if is_json(f) => Bytes::from(v.to_string()),
            (Some(Value::String(s)), Some(f)) if essence(f) == OCTET_STREAM => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| "`messageBody` is not base64, as `dataFormat` says")?,
            ),
            (Some(Value::String(s)), _) => Bytes::from(s.clone()),
            // A JSON body without a `dataFormat`: JSON, as sent.
            (Some(v), None) => Bytes::from(v.to_string()),
            (Some(_), Some(f)) => {
                return Err(format!(
                    "`messageBody` must be a string for `dataFormat` `{f}`"
                ));
            }
        };
        // A binary body's own media type rides in the headers (see
        // `put_body`); otherwise `dataFormat` is the body's type.
        let carried_type = headers
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .map(|i| headers.remove(i).1);
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case("content-length"));
        let content_type = match format {
            Some(f) if essence(&f) == OCTET_STREAM => carried_type.or(Some(f)),
            Some(f) => Some(f),
            None if body.is_empty() => None,
            None => carried_type.or_else(|| Some("application/json".into())),
        };
        Ok((headers, content_type, body))
    }
}

/// A message's header pairs, its body's media type and its body.
type Parts = (Vec<(String, String)>, Option<String>, Bytes);

/// `[{"name", "value"}, ...]` as pairs.
fn pairs(v: &Value, key: &str) -> Result<Vec<(String, String)>, String> {
    let bad = || format!("`{key}` must be a list of {{\"name\", \"value\"}} strings");
    let list = v.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|item| {
            let name = item.get("name").and_then(Value::as_str).ok_or_else(bad)?;
            let value = match item.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => return Err(bad()),
            };
            Ok((name.to_owned(), value))
        })
        .collect()
}

fn pairs_json(pairs: &[(String, String)]) -> Value {
    Value::Array(
        pairs
            .iter()
            .map(|(n, v)| json!({"name": n, "value": v}))
            .collect(),
    )
}

/// A media type without its parameters, lower-case.
fn essence(media: &str) -> String {
    media
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_json(media: &str) -> bool {
    let e = essence(media);
    e == "application/json" || e.ends_with("+json")
}

fn is_text(media: &str) -> bool {
    let e = essence(media);
    e.starts_with("text/")
        || e.ends_with("+xml")
        || matches!(
            e.as_str(),
            "application/xml"
                | "application/x-www-form-urlencoded"
                | "application/javascript"
                | "application/yaml"
        )
        || media.to_ascii_lowercase().contains("charset=")
}

/// Puts `dataFormat` and `messageBody` for a body (none when it is empty):
/// JSON as a value, text as a string, anything else base64 as
/// `application/octet-stream`, its own media type then kept in `headers`
/// so nothing is lost.
fn put_body(
    message: &mut Map<String, Value>,
    headers: &mut Vec<(String, String)>,
    content_type: Option<&str>,
    body: &[u8],
) {
    if body.is_empty() {
        if let Some(t) = content_type {
            message.insert("dataFormat".into(), t.into());
        }
        return;
    }
    let media = content_type.unwrap_or(OCTET_STREAM);
    if is_json(media)
        && let Ok(v) = serde_json::from_slice::<Value>(body)
    {
        message.insert("dataFormat".into(), media.into());
        message.insert("messageBody".into(), v);
        return;
    }
    if is_text(media)
        && let Ok(s) = std::str::from_utf8(body)
    {
        message.insert("dataFormat".into(), media.into());
        message.insert("messageBody".into(), s.into());
        return;
    }
    if essence(media) != OCTET_STREAM {
        headers.push(("Content-Type".into(), media.to_owned()));
    }
    message.insert("dataFormat".into(), OCTET_STREAM.into());
    message.insert(
        "messageBody".into(),
        base64::engine::general_purpose::STANDARD
            .encode(body)
            .into(),
    );
}

fn wrap(message: Map<String, Value>) -> String {
    let mut outer = Map::new();
    outer.insert("message".into(), Value::Object(message));
    Value::Object(outer).to_string()
}

fn base(id: &Value, message_type: &str, requires_response: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("messageId".into(), id.clone());
    m.insert("messageType".into(), message_type.into());
    m.insert("requiresResponse".into(), requires_response.into());
    m
}

/// A REST:REQUEST carrying `request`, with message id `id`.
pub fn encode_request(id: &Value, request: &CarriedRequest) -> String {
    let mut m = base(id, REST_REQUEST, true);
    m.insert("method".into(), request.method.as_str().into());
    m.insert("path".into(), request.path.as_str().into());
    if !request.query.is_empty() {
        m.insert("queryStrings".into(), pairs_json(&request.query));
    }
    let mut headers = request.headers.clone();
    put_body(
        &mut m,
        &mut headers,
        request.content_type.as_deref(),
        &request.body,
    );
    m.insert("headers".into(), pairs_json(&headers));
    wrap(m)
}

/// A REST:RESPONSE to message `in_response_to`, with message id `id`.
pub fn encode_response(id: &Value, in_response_to: &Value, response: &CarriedResponse) -> String {
    let mut m = base(id, REST_RESPONSE, false);
    m.insert("inResponseTo".into(), in_response_to.clone());
    m.insert("statusCode".into(), response.status.into());
    m.insert(
        "reasonPhrase".into(),
        response.reason.as_deref().map_or(Value::Null, Value::from),
    );
    let mut headers = response.headers.clone();
    put_body(
        &mut m,
        &mut headers,
        response.content_type.as_deref(),
        &response.body,
    );
    if !headers.is_empty() {
        m.insert("headers".into(), pairs_json(&headers));
    }
    wrap(m)
}

/// A CONN:HELLO introducing a peer.
pub fn hello(id: &Value, peer_class: &str, peer_id: &str) -> String {
    let mut m = base(id, HELLO, false);
    m.insert("peerClass".into(), peer_class.into());
    m.insert("peerId".into(), peer_id.into());
    wrap(m)
}

/// The relay's answer to a message it would not relay: `why` says what
/// was wrong; `in_response_to` names the message when it had an id.
pub fn malformed(id: &Value, in_response_to: Option<&MessageId>, why: &str) -> String {
    let mut m = base(id, MALFORMED, false);
    if let Some(r) = in_response_to {
        m.insert("inResponseTo".into(), r.0.as_str().into());
    }
    m.insert("statusCode".into(), 400.into());
    let mut reason = String::with_capacity(why.len() + 32);
    let _ = write!(reason, "not relayed: {why}");
    m.insert("reasonPhrase".into(), reason.into());
    wrap(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(content_type: Option<&str>, body: &[u8]) -> CarriedRequest {
        CarriedRequest {
            method: "POST".into(),
            path: "/micronets/v1/dhcp/subnets".into(),
            query: vec![("a".into(), "1 2".into()), ("a".into(), "x&y".into())],
            headers: vec![("Host".into(), "localhost:5001".into())],
            content_type: content_type.map(str::to_owned),
            body: Bytes::copy_from_slice(body),
        }
    }

    fn round_trip(r: &CarriedRequest) -> (Value, CarriedRequest) {
        let text = encode_request(&json!(7), r);
        let env = Envelope::parse(text.as_bytes()).unwrap();
        assert_eq!(env.message_id, Some(MessageId("7".into())));
        assert!(env.requires_response);
        let v: Value = serde_json::from_str(&text).unwrap();
        (v, env.request().unwrap())
    }

    #[test]
    fn bodies_travel_as_json_text_or_base64() {
        let json_body = br#"{"subnetId":"mocksubnet007","nameservers":["1.2.3.4"]}"#;
        let (v, back) = round_trip(&request(Some("application/json"), json_body));
        assert_eq!(v["message"]["messageBody"]["subnetId"], "mocksubnet007");
        assert_eq!(v["message"]["dataFormat"], "application/json");
        assert_eq!(
            serde_json::from_slice::<Value>(&back.body).unwrap(),
            serde_json::from_slice::<Value>(json_body).unwrap()
        );
        assert_eq!(back.query, request(None, b"").query);

        let (v, back) = round_trip(&request(
            Some("text/plain; charset=utf-8"),
            "héllo".as_bytes(),
        ));
        assert_eq!(v["message"]["messageBody"], "héllo");
        assert_eq!(&back.body[..], "héllo".as_bytes());
        assert_eq!(
            back.content_type.as_deref(),
            Some("text/plain; charset=utf-8")
        );

        let binary = [0u8, 159, 146, 150, 255];
        let (v, back) = round_trip(&request(Some("image/png"), &binary));
        assert_eq!(v["message"]["dataFormat"], OCTET_STREAM);
        assert_eq!(v["message"]["messageBody"], "AJ+Slv8=");
        assert_eq!(&back.body[..], &binary);
        assert_eq!(back.content_type.as_deref(), Some("image/png"));
        assert!(back.headers.iter().all(|(n, _)| n != "Content-Type"));

        // JSON that does not parse goes as base64, untouched.
        let (v, back) = round_trip(&request(Some("application/json"), b"{not json"));
        assert_eq!(v["message"]["dataFormat"], OCTET_STREAM);
        assert_eq!(&back.body[..], b"{not json");
        assert_eq!(back.content_type.as_deref(), Some("application/json"));

        let (v, back) = round_trip(&request(None, b""));
        assert!(v["message"].get("messageBody").is_none());
        assert!(back.body.is_empty());
        assert_eq!(back.content_type, None);
    }

    #[test]
    fn reads_the_seeds_examples() {
        let get = r#"{"message": {"messageId": 3, "messageType": "REST:REQUEST",
            "requiresResponse": true, "method": "GET", "path": "/micronets/v1/dhcp/subnets",
            "headers": [{"name": "Host", "value": "localhost:5001"}]}}"#;
        let r = Envelope::parse(get.as_bytes()).unwrap().request().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/micronets/v1/dhcp/subnets")
        );
        assert_eq!(r.headers, vec![("Host".into(), "localhost:5001".into())]);
        let resp = r#"{"message": {"messageId": 2, "inResponseTo": 3, "messageType": "REST:RESPONSE",
            "reasonPhrase": null, "requiresResponse": false, "statusCode": 200,
            "dataFormat": "application/json", "messageBody": {"subnets": []}}}"#;
        let env = Envelope::parse(resp.as_bytes()).unwrap();
        assert_eq!(env.in_response_to, Some(MessageId("3".into())));
        let r = env.response().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], br#"{"subnets":[]}"#);
        let delete = r#"{"message": {"messageId": 3, "inResponseTo": 5,
            "messageType": "REST:RESPONSE", "requiresResponse": false, "statusCode": 200}}"#;
        let r = Envelope::parse(delete.as_bytes())
            .unwrap()
            .response()
            .unwrap();
        assert!(r.body.is_empty() && r.content_type.is_none());
        let hello = r#"{"message": {"messageId": 0, "messageType": "CONN:HELLO",
            "requiresResponse": false, "peerClass": "micronets-ws-test-client", "peerId": "12345678"}}"#;
        assert_eq!(
            Envelope::parse(hello.as_bytes()).unwrap().hello(),
            Some(("micronets-ws-test-client".into(), "12345678".into()))
        );
        // The seed's EVENT has no messageId: fine, it needs no response.
        let event = r#"{"message": {"messageType": "EVENT:lease", "requiresResponse": false,
            "dataFormat": "text/plain", "messageBody": "x"}}"#;
        assert!(Envelope::parse(event.as_bytes()).is_ok());
    }

    #[test]
    fn responses_round_trip() {
        let r = CarriedResponse {
            status: 201,
            reason: Some("Created".into()),
            headers: vec![("X-Trace".into(), "abc".into())],
            content_type: Some("application/json".into()),
            body: Bytes::from_static(br#"{"ok":true}"#),
        };
        let text = encode_response(&json!("tg-1"), &json!("tollgate-9"), &r);
        let env = Envelope::parse(text.as_bytes()).unwrap();
        assert_eq!(env.in_response_to, Some(MessageId("tollgate-9".into())));
        assert_eq!(env.response().unwrap(), r);
    }

    #[test]
    fn refuses_what_is_not_an_envelope() {
        for (bad, says) in [
            (&b"nope"[..], "not JSON"),
            (b"[1]", "not a JSON object"),
            (b"{\"msg\": {}}", "no `message`"),
            (b"{\"message\": {\"requiresResponse\": false}}", "messageType"),
            (b"{\"message\": {\"messageType\": \"X\"}}", "requiresResponse"),
            (
                b"{\"message\": {\"messageType\": \"X\", \"requiresResponse\": true}}",
                "needs a `messageId`",
            ),
            (
                b"{\"message\": {\"messageType\": \"X\", \"requiresResponse\": false, \"messageId\": 1.5}}",
                "messageId",
            ),
            (
                b"{\"message\": {\"messageType\": \"REST:RESPONSE\", \"requiresResponse\": false, \"messageId\": 1}}",
                "inResponseTo",
            ),
            (
                b"{\"message\": {\"messageType\": \"REST:REQUEST\", \"requiresResponse\": true, \"messageId\": 1, \"method\": \"GET\", \"path\": \"x\"}}",
                "path",
            ),
        ] {
            let e = Envelope::parse(bad).unwrap_err();
            assert!(e.contains(says), "{e} should say {says}");
        }
        let bad_status = r#"{"message": {"messageId": 1, "inResponseTo": 1, "messageType": "REST:RESPONSE",
            "requiresResponse": false, "statusCode": 101}}"#;
        assert!(
            Envelope::parse(bad_status.as_bytes())
                .unwrap()
                .response()
                .is_err()
        );
        let bad_b64 = r#"{"message": {"messageId": 1, "inResponseTo": 1, "messageType": "REST:RESPONSE",
            "requiresResponse": false, "statusCode": 200, "dataFormat": "application/octet-stream",
            "messageBody": "%%%"}}"#;
        assert!(
            Envelope::parse(bad_b64.as_bytes())
                .unwrap()
                .response()
                .is_err()
        );
        let m = malformed(
            &json!("tollgate-e1"),
            Some(&MessageId("4".into())),
            "not JSON",
        );
        let env = Envelope::parse(m.as_bytes()).unwrap();
        assert_eq!(env.message_type, MALFORMED);
        assert_eq!(env.in_response_to, Some(MessageId("4".into())));
    }
}
