//! JWT validation for one provider: header checks, key lookup (with an
//! unknown-`kid` refetch for remote key sets), signature and claims through
//! jsonwebtoken, and a cache of validated tokens so a repeat request skips
//! the signature check. Revoked `jti`s are refused even when cached.

mod jwks;
pub mod keys;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use moka::Expiry;
use prometheus::IntCounter;
use serde_json::{Map, Value};

pub use jwks::RemoteJwks;
use keys::KeySet;

use super::{AuthMethod, Identity, Revocations, claim_at, claim_strings};
use crate::config::TokenSource;

/// Why a token was refused. The `Display` text is safe to send back as an
/// RFC 6750 `error_description`: it never echoes the token or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token is longer than {0} bytes")]
    TooLarge(usize),
    #[error("the token's algorithm is not accepted")]
    AlgorithmNotAllowed,
    #[error("the token has a critical header parameter this gateway does not understand")]
    CriticalHeader,
    #[error("the token's type is not accepted")]
    WrongType,
    #[error("no key matches the token")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued in the future")]
    IssuedInFuture,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("the token's `{0}` claim is malformed")]
    BadClaim(String),
    #[error("the token has been revoked")]
    Revoked,
    #[error("the token is bound to a client certificate this connection did not present")]
    CertificateMismatch,
}

impl TokenError {
    fn outcome(&self) -> &'static str {
        match self {
            TokenError::Expired => "expired",
            TokenError::Revoked => "revoked",
            _ => "invalid",
        }
    }
}

/// What a provider needs besides its keys, compiled from gateway.yaml.
pub struct ProviderSettings {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub required_claims: Vec<String>,
    pub typ: Option<String>,
    pub roles_claim: String,
    pub max_token_bytes: usize,
    pub token_from: Vec<TokenSource>,
    pub cache_entries: u64,
}

pub enum KeySource {
    Static(KeySet),
    Remote(Arc<RemoteJwks>),
    /// tollgate's own token server's keys (`keys: self`), read in process.
    SelfIssued(SelfKeys),
}

/// The token server's public keys as it publishes them; swapped on rotation.
pub type SelfKeys = Arc<arc_swap::ArcSwap<KeySet>>;

/// Counters by outcome, resolved once.
pub struct TokenMetrics {
    pub valid: IntCounter,
    pub cached: IntCounter,
    pub invalid: IntCounter,
    pub expired: IntCounter,
    pub revoked: IntCounter,
}

impl TokenMetrics {
    fn count(&self, e: &TokenError) {
        match e.outcome() {
            "expired" => self.expired.inc(),
            "revoked" => self.revoked.inc(),
            _ => self.invalid.inc(),
        }
    }
}

pub struct JwtProvider {
    pub name: Arc<str>,
    pub settings: ProviderSettings,
    keys: KeySource,
    /// One `Validation` per accepted algorithm.
    validations: Vec<(Algorithm, Validation)>,
    cache: moka::sync::Cache<[u8; 32], Arc<Identity>>,
    revocations: Arc<Revocations>,
    metrics: TokenMetrics,
}

/// Cache entries live until the token's `exp`, never longer.
struct UntilExp;

impl Expiry<[u8; 32], Arc<Identity>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Identity>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let exp = value.expires_at.unwrap_or(0);
        Some(Duration::from_secs(exp.saturating_sub(unix_now())))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl JwtProvider {
    pub fn new(
        name: &str,
        settings: ProviderSettings,
        keys: KeySource,
        revocations: Arc<Revocations>,
        metrics: TokenMetrics,
    ) -> JwtProvider {
        let validations = settings
            .algorithms
            .iter()
            .map(|alg| {
                let mut v = Validation::new(*alg);
                v.leeway = settings.leeway.as_secs();
                v.validate_nbf = true;
                v.set_issuer(&[&settings.issuer]);
                v.set_audience(&settings.audiences);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                (*alg, v)
            })
            .collect();
        let cache = moka::sync::Cache::builder()
            .max_capacity(settings.cache_entries)
            .expire_after(UntilExp)
            .build();
        JwtProvider {
            name: Arc::from(name),
            settings,
            keys,
            validations,
            cache,
            revocations,
            metrics,
        }
    }

    pub fn remote(&self) -> Option<&Arc<RemoteJwks>> {
        match &self.keys {
            KeySource::Remote(r) => Some(r),
            KeySource::Static(_) | KeySource::SelfIssued(_) => None,
        }
    }

    /// The validated-token cache: `Some` on a hit (still checked against the
    /// revocation list and `exp`), `None` when the token must be validated.
    /// Not counted: the caller that answers counts ([`Self::count_known`]).
    pub fn cached(&self, digest: &TokenDigest) -> Option<Result<Arc<Identity>, TokenError>> {
        self.cache.get(&digest.0).map(|id| self.recheck(id))
    }

    /// An identity this provider validated before, checked again against
    /// the revocation list and `exp`.
    pub fn recheck(&self, id: Arc<Identity>) -> Result<Arc<Identity>, TokenError> {
        self.still_valid(&id).map(|()| id)
    }

    /// Counts the answer for a token validated before: a cache hit, or why
    /// it is refused now.
    pub fn count_known(&self, result: &Result<Arc<Identity>, TokenError>) {
        match result {
            Ok(_) => self.metrics.cached.inc(),
            Err(e) => self.metrics.count(e),
        }
    }

    fn still_valid(&self, id: &Identity) -> Result<(), TokenError> {
        if id
            .token_id
            .as_deref()
            .is_some_and(|jti| self.revocations.is_revoked(jti))
        {
            return Err(TokenError::Revoked);
        }
        if id
            .expires_at
            .is_some_and(|exp| exp + self.settings.leeway.as_secs() <= unix_now())
        {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    /// Full validation of a token the cache did not have; a valid one is
    /// cached under `digest`. May wait for a key set refetch when the token
    /// names a `kid` this provider has not seen.
    pub async fn validate(
        &self,
        token: &str,
        digest: &TokenDigest,
    ) -> Result<Arc<Identity>, TokenError> {
        let result = self.check(token).await;
        match &result {
            Ok(id) => {
                self.metrics.valid.inc();
                self.cache.insert(digest.0, id.clone());
            }
            Err(e) => self.metrics.count(e),
        }
        result
    }

    async fn check(&self, token: &str) -> Result<Arc<Identity>, TokenError> {
        if token.len() > self.settings.max_token_bytes {
            return Err(TokenError::TooLarge(self.settings.max_token_bytes));
        }
        let header = self.header(token)?;
        let remote = match &self.keys {
            KeySource::Static(set) => return self.verify(token, &header, set),
            KeySource::SelfIssued(set) => return self.verify(token, &header, &set.load()),
            KeySource::Remote(remote) => remote,
        };
        let mut keys = remote.keys();
        if keys.is_empty() {
            remote.first_fetch().await;
            keys = remote.keys();
        }
        let known = header.kid.as_deref().is_none_or(|kid| keys.has_kid(kid));
        if !known && !keys.is_empty() {
            // A new kid may be a key rotated in at the issuer: fetch the set
            // again (rate-limited, so forged kids cannot cause a fetch storm).
            remote.refetch_for_unknown_kid().await;
            keys = remote.keys();
        }
        self.verify(token, &header, &keys)
    }

    fn header(&self, token: &str) -> Result<TokenHeader, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let b64 = |part: &str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !b64(h) || !b64(p) || !b64(s) {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(h)
            .map_err(|_| TokenError::Malformed)?;
        let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&raw) else {
            return Err(TokenError::Malformed);
        };
        // We understand no extension, so any `crit` means reject (RFC 7515 4.1.11).
        if header.contains_key("crit") {
            return Err(TokenError::CriticalHeader);
        }
        // `jku`, `x5u`, `jwk` and `x5c` are never used to find keys: the
        // provider's own key source decides which keys are trusted.
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(TokenError::Malformed)?;
        let alg = alg
            .parse::<Algorithm>()
            .ok()
            .filter(|a| self.settings.algorithms.contains(a))
            .ok_or(TokenError::AlgorithmNotAllowed)?;
        if let Some(want) = &self.settings.typ {
            let typ = header.get("typ").and_then(Value::as_str).unwrap_or("");
            let typ = typ.strip_prefix("application/").unwrap_or(typ);
            if !typ.eq_ignore_ascii_case(want) {
                return Err(TokenError::WrongType);
            }
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) if k.len() <= 256 => Some(k.clone()),
            Some(_) => return Err(TokenError::Malformed),
        };
        Ok(TokenHeader { alg, kid })
    }

    fn verify(
        &self,
        token: &str,
        header: &TokenHeader,
        keys: &KeySet,
    ) -> Result<Arc<Identity>, TokenError> {
        let candidates = keys.candidates(header.alg, header.kid.as_deref());
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey);
        }
        let validation = &self
            .validations
            .iter()
            .find(|(a, _)| *a == header.alg)
            .ok_or(TokenError::AlgorithmNotAllowed)?
            .1;
        let mut last = TokenError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.identity(data.claims).map(Arc::new),
                Err(e) => {
                    last = map_error(e.kind());
                    // Another key may still verify; a claims error is final.
                    if last != TokenError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn identity(&self, claims: Map<String, Value>) -> Result<Identity, TokenError> {
        let now = unix_now();
        let leeway = self.settings.leeway.as_secs();
        if let Some(iat) = claims.get("iat") {
            let iat = iat
                .as_u64()
                .ok_or_else(|| TokenError::BadClaim("iat".into()))?;
            if iat > now + leeway {
                return Err(TokenError::IssuedInFuture);
            }
        }
        for name in &self.settings.required_claims {
            if claim_at(&claims, name).is_none() {
                return Err(TokenError::MissingClaim(name.clone()));
            }
        }
        let string = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        let mut scopes = claim_strings(claims.get("scope"));
        for s in claim_strings(claims.get("scp")) {
            if !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        let id = Identity {
            method: AuthMethod::Jwt,
            subject: string("sub").unwrap_or_default(),
            issuer: string("iss"),
            client_id: string("client_id").or_else(|| string("azp")),
            scopes,
            roles: claim_strings(claim_at(&claims, &self.settings.roles_claim)),
            provider: Some(self.name.clone()),
            token_id: string("jti"),
            expires_at: claims.get("exp").and_then(Value::as_u64),
            cert: None,
            // A confirmation this gateway cannot check (not `x5t#S256`, or
            // malformed) binds the token to nothing any connection has.
            cert_binding: claims.get("cnf").map(|c| {
                c.get("x5t#S256")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            }),
            claims,
        };
        self.still_valid(&id)?;
        Ok(id)
    }

    /// The issuer named by a token, unverified: picks the provider to check
    /// it with when a route accepts several.
    pub fn peek_issuer(token: &str) -> Option<String> {
        let payload = token.split('.').nth(1)?;
        let raw = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let claims: Map<String, Value> = serde_json::from_slice(&raw).ok()?;
        claims.get("iss")?.as_str().map(str::to_owned)
    }
}

/// The cache key of a token: its SHA-256, computed once per request however
/// many providers look it up.
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &str) -> TokenDigest {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        TokenDigest(out)
    }
}

fn map_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
        ErrorKind::InvalidClaimFormat(c) => TokenError::BadClaim(c.clone()),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            TokenError::AlgorithmNotAllowed
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => TokenError::Malformed,
        _ => TokenError::BadSignature,
    }
}

/// A client's JWK Set URL, checked: https, or http to a loopback address
/// (anyone on the path of a plain fetch could swap the client's keys).
pub fn jwks_url(uri: &str) -> Result<http::Uri, String> {
    let parsed = uri
        .parse::<http::Uri>()
        .ok()
        .filter(|u| u.host().is_some())
        .ok_or_else(|| format!("`{uri}` is not a URL"))?;
    let loopback = parsed.host().is_some_and(|h| {
        h == "localhost"
            || h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match parsed.scheme_str() {
        Some("https") => Ok(parsed),
        Some("http") if loopback => Ok(parsed),
        _ => Err(format!(
            "`{uri}` must be https (plain http only to a loopback address)"
        )),
    }
}

/// Claims the token server sets itself; client claims cannot replace them.
pub const RESERVED_CLAIMS: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "client_id",
    "scope",
    "cnf",
];
