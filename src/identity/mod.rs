//! Who is calling: one [`Identity`] value built from whatever authenticated
//! the caller (a JWT now; a client certificate, a password or a WAMP ticket in
//! the front-ends that add them). Nothing past authentication looks at raw
//! tokens, headers or certificates again.

mod authenticator;
mod cert;
pub mod jwt;
pub mod limit;
pub mod passwords;
mod providers;
mod revocation;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use authenticator::{Authenticator, Pending, Refusal, Step};
pub(crate) use cert::hex;
pub use passwords::{User, Users};
pub use providers::Providers;
pub use revocation::Revocations;

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Anonymous,
    Jwt,
    Mtls,
    Password,
    Ticket,
    /// WAMP-CRA: an HMAC over the router's challenge with a shared secret.
    WampCra,
    /// WAMP-cryptosign: an Ed25519 signature over the router's challenge.
    Cryptosign,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 7] = [
        AuthMethod::Anonymous,
        AuthMethod::Jwt,
        AuthMethod::Mtls,
        AuthMethod::Password,
        AuthMethod::Ticket,
        AuthMethod::WampCra,
        AuthMethod::Cryptosign,
    ];

    pub fn from_name(name: &str) -> Option<AuthMethod> {
        AuthMethod::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Every name, for error messages.
    pub fn names() -> String {
        AuthMethod::ALL.map(AuthMethod::as_str).join(", ")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Mtls => "mtls",
            AuthMethod::Password => "password",
            AuthMethod::Ticket => "ticket",
            AuthMethod::WampCra => "wampcra",
            AuthMethod::Cryptosign => "cryptosign",
        }
    }
}

/// The verified client certificate of a connection (filled by the TLS
/// front-end; plain listeners never have one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertIdentity {
    /// RFC 4514 subject, e.g. `CN=foo,O=backend`.
    pub subject: String,
    pub cn: Option<String>,
    pub o: Vec<String>,
    pub ou: Vec<String>,
    pub san_dns: Vec<String>,
    /// URI SANs, SPIFFE ids among them.
    pub san_uri: Vec<String>,
    pub san_email: Vec<String>,
    pub san_ip: Vec<String>,
    /// Lower-case hex.
    pub serial: String,
    pub issuer: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Lower-case hex of the DER certificate's SHA-256.
    pub sha256: String,
    pub sha1: String,
    /// base64url SHA-256 of the DER: RFC 8705's `x5t#S256`.
    pub x5t_s256: String,
}

/// Who the caller is, however it authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub method: AuthMethod,
    /// `sub` of a token, CN of a certificate, a user name.
    pub subject: String,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    /// Every claim of a token (empty for other methods).
    pub claims: Map<String, Value>,
    pub cert: Option<Arc<CertIdentity>>,
    /// The JWT provider that accepted the token.
    pub provider: Option<Arc<str>>,
    /// `jti` of a token.
    pub token_id: Option<String>,
    /// Unix seconds after which the credential is no longer valid.
    pub expires_at: Option<u64>,
    /// A certificate-bound token's `cnf.x5t#S256` (RFC 8705 §3): the
    /// connection must present that certificate.
    pub cert_binding: Option<String>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            method: AuthMethod::Anonymous,
            subject: String::new(),
            issuer: None,
            client_id: None,
            scopes: Vec::new(),
            roles: Vec::new(),
            claims: Map::new(),
            cert: None,
            provider: None,
            token_id: None,
            expires_at: None,
            cert_binding: None,
        }
    }

    /// Whether the connection's certificate satisfies a certificate-bound
    /// token; any identity without a binding does.
    pub fn bound_to(&self, peer: Option<&CertIdentity>) -> bool {
        match &self.cert_binding {
            None => true,
            Some(x5t) => !x5t.is_empty() && peer.is_some_and(|c| c.x5t_s256 == *x5t),
        }
    }

    /// An identity from a verified client certificate alone: the subject is
    /// its CN (or the full subject when it has none).
    pub fn from_cert(cert: Arc<CertIdentity>) -> Identity {
        Identity {
            method: AuthMethod::Mtls,
            subject: cert.cn.clone().unwrap_or_else(|| cert.subject.clone()),
            issuer: Some(cert.issuer.clone()),
            expires_at: u64::try_from(cert.not_after).ok(),
            cert: Some(cert),
            ..Identity::anonymous()
        }
    }

    /// A field by name, for policy substitution (`{sub}`, `%u`, `{client_id}`)
    /// and claim headers: the well-known fields, else a claim (dotted paths
    /// reach into objects) when it is a string.
    pub fn field(&self, name: &str) -> Option<&str> {
        match name {
            "sub" => Some(self.subject.as_str()).filter(|s| !s.is_empty()),
            "client_id" => self.client_id.as_deref(),
            "iss" => self.issuer.as_deref(),
            "cn" => self.cert.as_ref()?.cn.as_deref(),
            _ => self.claim(name)?.as_str(),
        }
    }

    /// A claim by name or dotted path (`realm_access.roles`).
    pub fn claim(&self, path: &str) -> Option<&Value> {
        claim_at(&self.claims, path)
    }
}

/// Looks up `a.b.c` in nested JSON objects; a name that itself contains dots
/// is found first as a whole.
pub fn claim_at<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let (head, rest) = path.split_once('.')?;
    match claims.get(head)? {
        Value::Object(inner) => claim_at(inner, rest),
        _ => None,
    }
}

/// Strings from a claim that may be one string (space-separated, as `scope`)
/// or an array of strings (as `scp` or `roles`).
pub fn claim_strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// A hex SHA-256 (64 digits, either case) as bytes: how secrets are
/// configured (OAuth clients, admin tokens).
pub fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}
