//! Reading the fields policies and logs use out of an X.509 certificate.

use aws_lc_rs::digest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};
use x509_parser::x509::AttributeTypeAndValue;

use super::CertIdentity;

impl CertIdentity {
    /// Parses a DER certificate (the verified peer certificate of a TLS
    /// connection, or a file shown by `tollgate pki show`).
    pub fn from_der(der: &[u8]) -> Result<CertIdentity, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let name = cert.subject();
        let strings = |attrs: &mut dyn Iterator<Item = &AttributeTypeAndValue>| -> Vec<String> {
            attrs.filter_map(attr_text).collect()
        };
        let mut identity = CertIdentity {
            subject: rfc4514(name),
            cn: strings(&mut name.iter_common_name()).into_iter().next(),
            o: strings(&mut name.iter_organization()),
            ou: strings(&mut name.iter_organizational_unit()),
            serial: hex(cert.tbs_certificate.raw_serial()),
            issuer: rfc4514(cert.issuer()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            sha256: hex(digest::digest(&digest::SHA256, der).as_ref()),
            x5t_s256: {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(digest::digest(&digest::SHA256, der).as_ref())
            },
            sha1: hex(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref()),
            ..CertIdentity::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(s) => identity.san_dns.push((*s).to_owned()),
                    GeneralName::URI(s) => identity.san_uri.push((*s).to_owned()),
                    GeneralName::RFC822Name(s) => identity.san_email.push((*s).to_owned()),
                    GeneralName::IPAddress(ip) => {
                        if let Some(ip) = ip_text(ip) {
                            identity.san_ip.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(identity)
    }

    /// SPIFFE ids among the URI SANs.
    pub fn spiffe_ids(&self) -> impl Iterator<Item = &str> {
        self.san_uri
            .iter()
            .map(String::as_str)
            .filter(|u| u.starts_with("spiffe://"))
    }
}

fn attr_text(attr: &AttributeTypeAndValue) -> Option<String> {
    attr.as_str().ok().map(str::to_owned)
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match bytes.len() {
        4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The name as RFC 4514 text (`CN=foo,O=backend`): most specific RDN first,
/// as OpenSSL's `-nameopt RFC2253` and Envoy's XFCC `Subject` print it.
fn rfc4514(name: &X509Name) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for rdn in name.iter().collect::<Vec<_>>().into_iter().rev() {
        if !out.is_empty() {
            out.push(',');
        }
        for (i, attr) in rdn.iter().enumerate() {
            if i > 0 {
                out.push('+');
            }
            let oid = attr.attr_type();
            let short = match x509_parser::objects::oid2sn(oid, registry) {
                Ok("commonName") => "CN",
                Ok("organizationName") => "O",
                Ok("organizationalUnitName" | "organizationalUnit") => "OU",
                Ok("countryName") => "C",
                Ok("localityName") => "L",
                Ok("stateOrProvinceName") => "ST",
                Ok("streetAddress") => "STREET",
                Ok("domainComponent") => "DC",
                Ok("userId") => "UID",
                Ok(sn) => sn,
                Err(_) => "",
            };
            if short.is_empty() {
                out.push_str(&oid.to_id_string());
            } else {
                out.push_str(short);
            }
            out.push('=');
            match attr.as_str() {
                Ok(value) => escape_value(value, &mut out),
                Err(_) => {
                    out.push('#');
                    out.push_str(&hex(attr.attr_value().data));
                }
            }
        }
    }
    out
}

/// RFC 4514 §2.4 escaping.
fn escape_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    #[test]
    fn reads_every_field() {
        let mut params = CertificateParams::new(vec!["a.example".into()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "DE");
        dn.push(DnType::OrganizationName, "backend, inc");
        dn.push(DnType::OrganizationalUnitName, "payments");
        dn.push(DnType::CommonName, "svc-1");
        params.distinguished_name = dn;
        params.subject_alt_names.extend([
            SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
            SanType::URI("https://x.example/y".try_into().unwrap()),
            SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ]);
        params.serial_number = Some(vec![0x01, 0xab, 0xcd].into());
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = CertIdentity::from_der(cert.der()).unwrap();

        assert_eq!(id.subject, r"CN=svc-1,OU=payments,O=backend\, inc,C=DE");
        assert_eq!(id.issuer, id.subject);
        assert_eq!(id.cn.as_deref(), Some("svc-1"));
        assert_eq!(id.o, ["backend, inc"]);
        assert_eq!(id.ou, ["payments"]);
        assert_eq!(id.san_dns, ["a.example"]);
        assert_eq!(
            id.san_uri,
            ["spiffe://cluster.local/ns/a/sa/b", "https://x.example/y"]
        );
        assert_eq!(
            id.spiffe_ids().collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/a/sa/b"]
        );
        assert_eq!(id.san_email, ["ops@example.com"]);
        assert_eq!(id.san_ip, ["127.0.0.1"]);
        assert_eq!(id.serial, "01abcd");
        assert_eq!(id.not_after, 1_925_078_400); // 2031-01-02T00:00:00Z
        let sha256 = hex(digest::digest(&digest::SHA256, cert.der()).as_ref());
        assert_eq!(id.sha256, sha256);
        assert_eq!(id.sha256.len(), 64);
        assert_eq!(id.sha1.len(), 40);
    }

    #[test]
    fn escapes_names() {
        let mut out = String::new();
        escape_value("#a+b ", &mut out);
        assert_eq!(out, r"\#a\+b\ ");
    }

    #[test]
    fn rejects_garbage() {
        assert!(CertIdentity::from_der(b"not a certificate").is_err());
    }
}
