//! Envoy's `x-forwarded-client-cert` header: the verified client certificate
//! of the connection, told to the upstream as
//! `By=<our URI SAN>;Hash=<sha256>;Subject="<RFC 4514>";URI=<san>;DNS=<san>`.

use http::{HeaderName, HeaderValue};

use crate::config::XfccField;
use crate::identity::CertIdentity;
use crate::transport::ConnState;

pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The fields a route forwards, as a bit set (cheap to copy and compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XfccFields(u8);

impl XfccFields {
    pub fn new(fields: &[XfccField]) -> XfccFields {
        XfccFields(fields.iter().fold(0, |bits, f| bits | Self::bit(*f)))
    }

    fn bit(f: XfccField) -> u8 {
        1 << (f as u8)
    }

    fn has(self, f: XfccField) -> bool {
        self.0 & Self::bit(f) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The connection's XFCC header for `fields`: rendered once per connection
/// (a route asking for other fields renders its own).
pub fn for_connection(conn: &ConnState, fields: XfccFields) -> Option<HeaderValue> {
    let cert = conn.peer_cert.as_deref()?;
    if fields.is_empty() {
        return None;
    }
    let render_now = || render(cert, conn.server_uri.as_deref(), fields);
    match conn.xfcc.get_or_init(|| (fields.0, render_now())) {
        (bits, value) if *bits == fields.0 => value.clone(),
        _ => render_now(),
    }
}

/// The header for `cert`, or `None` when no chosen field has a value.
pub fn render(cert: &CertIdentity, by: Option<&str>, fields: XfccFields) -> Option<HeaderValue> {
    let mut out = String::with_capacity(256);
    let mut pair = |key: &str, value: &str, always_quote: bool| {
        if !out.is_empty() {
            out.push(';');
        }
        out.push_str(key);
        out.push('=');
        let quote = always_quote || value.contains([',', ';', '=', '"']);
        if quote {
            out.push('"');
            for c in value.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        } else {
            out.push_str(value);
        }
    };
    if fields.has(XfccField::By)
        && let Some(by) = by
    {
        pair("By", by, false);
    }
    if fields.has(XfccField::Hash) {
        pair("Hash", &cert.sha256, false);
    }
    if fields.has(XfccField::Subject) {
        pair("Subject", &cert.subject, true);
    }
    if fields.has(XfccField::Uri) {
        for uri in &cert.san_uri {
            pair("URI", uri, false);
        }
    }
    if fields.has(XfccField::Dns) {
        for dns in &cert.san_dns {
            pair("DNS", dns, false);
        }
    }
    // Certificate text is not trusted to be header-safe: drop what is not.
    HeaderValue::from_str(&out).ok().filter(|_| !out.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_format() {
        let cert = CertIdentity {
            subject: r#"CN=svc,O=back\, "end""#.into(),
            san_uri: vec!["spiffe://c/ns/a".into()],
            san_dns: vec!["a.local".into(), "b.local".into()],
            sha256: "ab12".into(),
            ..CertIdentity::default()
        };
        let all = XfccFields::new(&[
            XfccField::By,
            XfccField::Hash,
            XfccField::Subject,
            XfccField::Uri,
            XfccField::Dns,
        ]);
        let v = render(&cert, Some("spiffe://gw"), all).unwrap();
        assert_eq!(
            v,
            r#"By=spiffe://gw;Hash=ab12;Subject="CN=svc,O=back\\, \"end\"";URI=spiffe://c/ns/a;DNS=a.local;DNS=b.local"#
        );
        let hash_only = XfccFields::new(&[XfccField::Hash, XfccField::By]);
        assert_eq!(render(&cert, None, hash_only).unwrap(), "Hash=ab12");
        assert!(render(&cert, None, XfccFields::new(&[XfccField::By])).is_none());
        assert!(XfccFields::new(&[]).is_empty());
    }
}
