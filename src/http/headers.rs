//! Header hygiene between client and upstream: the one rule for each field
//! a client sends ([`request_field`]: hop-by-hop removal, RFC 9110 §7.6.1,
//! and the fields the gateway owns), hop-by-hop removal from responses,
//! forwarding fields (X-Forwarded-*, RFC 7239 Forwarded) and Via.

use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::Version;
use http::header::{self, HeaderName, HeaderValue};

use super::wire;
pub use crate::transport::hop_by_hop::{
    KEEP_ALIVE, is_hop_by_hop, is_hop_by_hop_name, strip_hop_by_hop,
};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// The forwarding chain a client sent (`X-Forwarded-For`, `Forwarded`),
/// which this hop extends.
#[derive(Default)]
pub struct Chain {
    pub forwarded_for: Vec<u8>,
    pub forwarded: Vec<u8>,
}

/// What the gateway knows about the request's origin.
pub struct Origin<'a> {
    pub peer: IpAddr,
    /// The peer address as header text, rendered once per connection.
    pub peer_text: &'a HeaderValue,
    pub proto: &'static str,
    pub version: Version,
}

/// Writes this hop's `Forwarded` element (RFC 7239): the peer, the scheme
/// and the client's Host (see [`forwarded_host`]).
fn put_forwarded_element(out: &mut BytesMut, origin: &Origin<'_>, host: Option<&str>) {
    let peer = origin.peer_text.as_bytes();
    let host = host.and_then(|h| Some((h, forwarded_host(h)?)));
    out.reserve(32 + peer.len() + host.map_or(0, |(h, _)| h.len()));
    match origin.peer {
        IpAddr::V4(_) => {
            out.put_slice(b"for=");
            out.put_slice(peer);
        }
        IpAddr::V6(_) => {
            out.put_slice(b"for=\"[");
            out.put_slice(peer);
            out.put_slice(b"]\"");
        }
    }
    out.put_slice(b";proto=");
    out.put_slice(origin.proto.as_bytes());
    match host {
        Some((host, HostForm::Token)) => {
            out.put_slice(b";host=");
            out.put_slice(host.as_bytes());
        }
        Some((host, HostForm::Quoted)) => {
            out.put_slice(b";host=\"");
            out.put_slice(host.as_bytes());
            out.put_slice(b"\"");
        }
        None => {}
    }
}

/// What decides whether a client's request field travels on.
pub struct FieldRules<'a> {
    /// Every identity field some route sets (claims, XFCC).
    pub identity_headers: &'a [HeaderName],
    pub forward_token: bool,
    /// The listener keeps names with `_`.
    pub underscores: bool,
    /// The peer is a trusted proxy: its forwarding chain is extended.
    pub trusted: bool,
    /// The request switches protocols, as its route allows.
    pub upgrade: bool,
    /// The request came chunked: its `Content-Length` was not used.
    pub transfer_encoding: bool,
    /// What the client's `Connection` fields name.
    pub connection_named: &'a [Bytes],
}

/// What becomes of a client's request field at this hop.
#[derive(Debug, PartialEq, Eq)]
pub enum Travel {
    Keep,
    Drop,
    /// A forwarding chain this hop extends (`X-Forwarded-For`).
    ForwardedFor,
    /// `Forwarded`, likewise.
    Forwarded,
}

/// The one rule for each field a client sends. A field travels unless it
/// is hop-by-hop (by name, or named by the client's `Connection`), or
/// this hop owns it: the Host (written per target), the request id, the
/// identity fields, `X-Forwarded-*`, `Forwarded` and `Via` (extended only
/// for a trusted peer), `Proxy-*`. Names with `_` are dropped unless the
/// listener keeps them, and even then never a look-alike of an owned or
/// hop-by-hop name. The fields this hop adds come after, so a client can
/// neither remove nor forge them.
pub fn request_field(name: &HeaderName, value: &[u8], rules: &FieldRules<'_>) -> Travel {
    let text = name.as_str();
    let named = || {
        rules
            .connection_named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(text.as_bytes()))
    };
    if text.as_bytes().contains(&b'_') {
        if !rules.underscores || named() {
            return Travel::Drop;
        }
        let folded = text.replace('_', "-");
        return match HeaderName::from_bytes(folded.as_bytes()) {
            Ok(folded) if request_field(&folded, value, rules) == Travel::Keep => Travel::Keep,
            _ => Travel::Drop,
        };
    }
    let keep = |yes: bool| if yes { Travel::Keep } else { Travel::Drop };
    match *name {
        header::HOST => return Travel::Drop,
        // The gateway forwards the caller's credential by the route's
        // setting: a `Connection` token does not remove it.
        header::AUTHORIZATION => return keep(rules.forward_token),
        header::UPGRADE if rules.upgrade => return Travel::Keep,
        header::TE if value.eq_ignore_ascii_case(b"trailers") => return Travel::Keep,
        header::CONTENT_LENGTH if rules.transfer_encoding => return Travel::Drop,
        header::VIA => return keep(rules.trusted),
        _ if is_hop_by_hop(name) => return Travel::Drop,
        _ => {}
    }
    if *name == X_FORWARDED_FOR {
        return if rules.trusted {
            Travel::ForwardedFor
        } else {
            Travel::Drop
        };
    }
    if *name == FORWARDED {
        return if rules.trusted {
            Travel::Forwarded
        } else {
            Travel::Drop
        };
    }
    let owned = *name == X_REQUEST_ID
        || text.starts_with("x-forwarded-")
        || text.starts_with("proxy-")
        || rules.identity_headers.contains(name);
    keep(!owned && !named())
}

/// The forwarding fields of a request to `host`, as wire lines: the
/// client's `chain` extended by the peer in `X-Forwarded-For` and
/// `Forwarded` (RFC 7239), `X-Forwarded-Proto`, `X-Forwarded-Host` and this
/// hop's `Via`.
pub fn put_forwarding(out: &mut BytesMut, origin: &Origin<'_>, host: Option<&str>, chain: &Chain) {
    out.put_slice(b"x-forwarded-for: ");
    if !chain.forwarded_for.is_empty() {
        out.put_slice(&chain.forwarded_for);
        out.put_slice(b", ");
    }
    out.put_slice(origin.peer_text.as_bytes());
    out.put_slice(b"\r\nforwarded: ");
    if !chain.forwarded.is_empty() {
        out.put_slice(&chain.forwarded);
        out.put_slice(b", ");
    }
    put_forwarded_element(out, origin, host);
    out.put_slice(b"\r\n");
    wire::put_field(out, &X_FORWARDED_PROTO, origin.proto.as_bytes());
    if let Some(host) = host {
        wire::put_field(out, &X_FORWARDED_HOST, host.as_bytes());
    }
    wire::put_field(out, &header::VIA, via(origin.version).as_bytes());
}

/// `Via` value for this hop, as text: the wire paths write it as it is (a
/// `HeaderValue` made from it checks its bytes on every call).
pub fn via(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "2 tollgate",
        Version::HTTP_10 => "1.0 tollgate",
        _ => "1.1 tollgate",
    }
}

/// How a Host goes into a `Forwarded` element.
#[derive(Clone, Copy)]
enum HostForm {
    Token,
    Quoted,
}

/// RFC 7239 values are tokens or quoted strings: a host name is a token, a
/// host with a port or an IPv6 literal is quoted (`:`, `[`, `]` are not
/// token characters), and anything else is left out rather than risk a
/// malformed field.
fn forwarded_host(s: &str) -> Option<HostForm> {
    // tchar, RFC 9110 §5.6.2.
    let tchar = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'!' | b'#'..=b'\'' | b'*' | b'+' | b'-' | b'.' | b'^'..=b'`')
            || matches!(b, b'|' | b'~')
    };
    if s.is_empty() {
        None
    } else if s.bytes().all(tchar) {
        Some(HostForm::Token)
    } else if s
        .bytes()
        .all(|b| tchar(b) || matches!(b, b':' | b'[' | b']'))
    {
        Some(HostForm::Quoted)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn transfer_encoding_wins_over_content_length() {
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarding_lines() {
        let origin = Origin {
            peer: "10.1.2.3".parse().unwrap(),
            peer_text: &HeaderValue::from_static("10.1.2.3"),
            proto: "https",
            version: Version::HTTP_11,
        };
        let mut out = BytesMut::new();
        put_forwarding(&mut out, &origin, Some("api.local:8082"), &Chain::default());
        assert_eq!(
            &out[..],
            b"x-forwarded-for: 10.1.2.3\r\nforwarded: for=10.1.2.3;proto=https;host=\"api.local:8082\"\r\n\
              x-forwarded-proto: https\r\nx-forwarded-host: api.local:8082\r\nvia: 1.1 tollgate\r\n"
        );
        for (host, element) in [
            ("api.local", "host=api.local"),
            ("[::1]:80", "host=\"[::1]:80\""),
            ("[::1]", "host=\"[::1]\""),
        ] {
            let mut out = BytesMut::new();
            put_forwarding(&mut out, &origin, Some(host), &Chain::default());
            let text = String::from_utf8(out.to_vec()).unwrap();
            assert!(
                text.contains(&format!("proto=https;{element}\r\n")),
                "{text}"
            );
        }
        // Anything else would need escapes: it is left out.
        for host in ["a b", "a\"b", "a,b", "(x)", "a\\b", ""] {
            let mut out = BytesMut::new();
            put_forwarding(&mut out, &origin, Some(host), &Chain::default());
            assert!(
                out.starts_with(
                    b"x-forwarded-for: 10.1.2.3\r\nforwarded: for=10.1.2.3;proto=https\r\n"
                ),
                "{host:?}"
            );
        }
    }
}
