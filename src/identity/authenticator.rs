//! Credentials to an [`Identity`], for every front-end: a bearer JWT (the
//! provider chosen by its issuer, answered from the provider's cache of
//! validated tokens when it can, checked against revocations and `exp`), a
//! verified client certificate, or both, with certificate-bound tokens
//! (RFC 8705) held to the connection's certificate; a user name with a
//! password or a WAMP ticket, checked against [`Users`]. Refusals are typed;
//! each front-end maps them to its own answer (HTTP 401, MQTT reason code).

use std::borrow::Cow;
use std::sync::Arc;

use super::jwt::{JwtProvider, TokenDigest, TokenError};
use super::passwords::{PasswordError, Users};
use super::{AuthMethod, CertIdentity, Identity};

/// What a front-end (a route, the admin API, a listener) accepts.
pub struct Authenticator {
    pub accept_jwt: bool,
    pub accept_cert: bool,
    /// Both credentials are needed, not either; the token's identity then
    /// carries the certificate.
    pub require_both: bool,
    pub providers: Vec<Arc<JwtProvider>>,
    /// Who may log in with a name and a password or ticket (`None`: nobody).
    pub users: Option<Arc<Users>>,
}

/// Why credentials were refused.
#[derive(Debug)]
pub enum Refusal {
    TokenRequired,
    CertificateRequired,
    /// A token, refused by the provider that checked it (`-` when no
    /// accepted provider issued it).
    InvalidToken {
        provider: Arc<str>,
        error: TokenError,
    },
    /// A name and password (or ticket) that did not verify. The caller is
    /// told only that; `why` is for the operator's log.
    BadPassword {
        user: String,
        why: PasswordError,
    },
    /// This front-end does not take that kind of credential.
    NotAccepted(AuthMethod),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TokenRequired => f.write_str("a bearer token is required"),
            Refusal::CertificateRequired => f.write_str("a client certificate is required"),
            Refusal::InvalidToken { provider, error } => {
                write!(f, "token refused by provider {provider}: {error}")
            }
            Refusal::BadPassword { user, why } => {
                write!(f, "user {user:?} refused: {}", why.as_str())
            }
            Refusal::NotAccepted(method) => write!(f, "{} is not accepted here", method.as_str()),
        }
    }
}

impl Refusal {
    fn token(provider: &JwtProvider, error: TokenError) -> Refusal {
        Refusal::InvalidToken {
            provider: provider.name.clone(),
            error,
        }
    }
}

/// What [`Authenticator::begin`] decided without waiting.
pub enum Step {
    /// Known now: a certificate, or a token validated before (by the
    /// provider at this index of `providers`, for a front-end that
    /// remembers it per connection).
    Done(Arc<Identity>, Option<usize>),
    /// A token no cache knows: its signature must be checked.
    Validate(Pending),
}

/// A token to validate, with what the answer is held to.
pub struct Pending {
    provider: Arc<JwtProvider>,
    token: String,
    digest: TokenDigest,
    cert: Option<Arc<CertIdentity>>,
    attach_cert: bool,
}

impl Pending {
    pub async fn finish(self) -> Result<Arc<Identity>, Refusal> {
        self.provider
            .validate(&self.token, &self.digest)
            .await
            .and_then(|id| bound(id, self.cert.as_ref(), self.attach_cert))
            .map_err(|e| Refusal::token(&self.provider, e))
    }
}

impl Authenticator {
    /// Decides without waiting when it can (a certificate, a token
    /// validated before); otherwise names the provider that must validate
    /// the token: by its issuer when several are accepted.
    pub fn begin(
        &self,
        token: Option<Cow<'_, str>>,
        cert: Option<Arc<CertIdentity>>,
    ) -> Result<Step, Refusal> {
        if self.require_both && cert.is_none() {
            return Err(Refusal::CertificateRequired);
        }
        let Some(token) = token.filter(|_| self.accept_jwt) else {
            return match cert {
                Some(cert) if self.accept_cert && !self.require_both => {
                    Ok(Step::Done(Arc::new(Identity::from_cert(cert)), None))
                }
                _ if self.accept_jwt => Err(Refusal::TokenRequired),
                _ => Err(Refusal::CertificateRequired),
            };
        };
        // A validated token: no signature check, no allocation.
        let digest = TokenDigest::of(&token);
        for (i, p) in self.providers.iter().enumerate() {
            if let Some(hit) = p.cached(&digest) {
                return self
                    .recall(p, hit, cert.as_ref())
                    .map(|id| Step::Done(id, Some(i)));
            }
        }
        let provider = match self.providers.as_slice() {
            [only] => only.clone(),
            several => {
                let iss = JwtProvider::peek_issuer(&token);
                let issuer = several
                    .iter()
                    .find(|p| iss.as_deref() == Some(p.settings.issuer.as_str()));
                match issuer {
                    Some(p) => p.clone(),
                    None => {
                        return Err(Refusal::InvalidToken {
                            provider: Arc::from("-"),
                            error: TokenError::WrongIssuer,
                        });
                    }
                }
            }
        };
        Ok(Step::Validate(Pending {
            provider,
            token: token.into_owned(),
            digest,
            cert,
            attach_cert: self.require_both,
        }))
    }

    /// A token validated before (cached, or remembered by the connection),
    /// as `provider` checked it again now (`checked`): counted, and held
    /// to the connection's certificate.
    pub fn recall(
        &self,
        provider: &JwtProvider,
        checked: Result<Arc<Identity>, TokenError>,
        cert: Option<&Arc<CertIdentity>>,
    ) -> Result<Arc<Identity>, Refusal> {
        provider.count_known(&checked);
        checked
            .and_then(|id| bound(id, cert, self.require_both))
            .map_err(|e| Refusal::token(provider, e))
    }

    /// The whole of it, for front-ends with nothing to remember.
    pub async fn authenticate(
        &self,
        token: Option<Cow<'_, str>>,
        cert: Option<Arc<CertIdentity>>,
    ) -> Result<Arc<Identity>, Refusal> {
        match self.begin(token, cert)? {
            Step::Done(id, _) => Ok(id),
            Step::Validate(pending) => pending.finish().await,
        }
    }
}

impl Authenticator {
    /// A user name with a password (`method` Password) or a WAMP ticket
    /// (`method` Ticket); with `require_both`, the connection's certificate
    /// as well, which the identity then carries.
    pub async fn password(
        &self,
        user: &str,
        secret: &[u8],
        method: AuthMethod,
        cert: Option<Arc<CertIdentity>>,
    ) -> Result<Arc<Identity>, Refusal> {
        let Some(users) = &self.users else {
            return Err(Refusal::NotAccepted(method));
        };
        if self.require_both && cert.is_none() {
            return Err(Refusal::CertificateRequired);
        }
        let found = users
            .verify(user, secret)
            .await
            .map_err(|why| Refusal::BadPassword {
                user: user.to_owned(),
                why,
            })?;
        Ok(Arc::new(Identity {
            method,
            subject: found.name.clone(),
            roles: found.roles.clone(),
            claims: found.claims.clone(),
            cert: cert.filter(|_| self.require_both),
            ..Identity::anonymous()
        }))
    }
}

/// A token's identity checked against the connection's certificate (RFC
/// 8705 binding), with the certificate attached when both are required.
fn bound(
    id: Arc<Identity>,
    cert: Option<&Arc<CertIdentity>>,
    attach: bool,
) -> Result<Arc<Identity>, TokenError> {
    if !id.bound_to(cert.map(|c| &**c)) {
        return Err(TokenError::CertificateMismatch);
    }
    Ok(match cert.filter(|_| attach) {
        None => id,
        Some(cert) => {
            let mut both = Identity::clone(&id);
            both.cert = Some(cert.clone());
            Arc::new(both)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Providers;
    use crate::metrics::Metrics;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "an HS256 secret of thirty-two bytes!";

    /// Providers `a` and `b` (issuers `https://a`, `https://b`), HS256.
    fn providers(dir: &std::path::Path) -> Providers {
        let key = dir.join("secret");
        std::fs::write(&key, SECRET).unwrap();
        let provider = |name: &str| {
            format!(
                "    - name: {name}\n      issuer: https://{name}\n      audiences: [bar]\n      secret: {{ file: {} }}\n",
                key.display()
            )
        };
        let file = dir.join("gateway.yaml");
        std::fs::write(
            &file,
            format!("auth:\n  providers:\n{}{}", provider("a"), provider("b")),
        )
        .unwrap();
        let cfg = crate::config::load(&file).unwrap();
        Providers::build(&cfg, None, &Metrics::new(), None).unwrap()
    }

    fn token(iss: &str, extra: serde_json::Value) -> String {
        let mut claims = json!({"iss": iss, "sub": "svc", "aud": "bar", "exp": 4_000_000_000u64});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn cert(x5t: &str) -> Arc<CertIdentity> {
        Arc::new(CertIdentity {
            cn: Some("device-1".into()),
            x5t_s256: x5t.into(),
            ..CertIdentity::default()
        })
    }

    #[tokio::test]
    async fn credentials_to_identity_or_a_typed_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let providers = providers(dir.path());
        let both: Vec<_> = ["a", "b"]
            .iter()
            .map(|n| providers.get(n).unwrap().clone())
            .collect();
        let authn = |jwt, cert, both_needed| Authenticator {
            accept_jwt: jwt,
            accept_cert: cert,
            require_both: both_needed,
            providers: both.clone(),
            users: None,
        };
        let run = |a: &Authenticator, token: Option<String>, c: Option<Arc<CertIdentity>>| {
            let a = Authenticator {
                accept_jwt: a.accept_jwt,
                accept_cert: a.accept_cert,
                require_both: a.require_both,
                providers: a.providers.clone(),
                users: None,
            };
            async move { a.authenticate(token.map(Cow::Owned), c).await }
        };
        let from_b = token("https://b", json!({}));
        let id = run(&authn(true, false, false), Some(from_b.clone()), None)
            .await
            .unwrap();
        assert_eq!(id.issuer.as_deref(), Some("https://b"), "chosen by issuer");
        // The second time it comes from the cache, with the same answer.
        let again = run(&authn(true, false, false), Some(from_b.clone()), None)
            .await
            .unwrap();
        assert_eq!(again.subject, "svc");

        let refused = |r: Result<Arc<Identity>, Refusal>| r.unwrap_err();
        assert!(matches!(
            refused(run(&authn(true, false, false), None, None).await),
            Refusal::TokenRequired
        ));
        assert!(matches!(
            refused(run(&authn(false, true, false), None, None).await),
            Refusal::CertificateRequired
        ));
        assert!(matches!(
            refused(run(&authn(true, true, true), Some(from_b.clone()), None).await),
            Refusal::CertificateRequired
        ));
        match refused(
            run(
                &authn(true, false, false),
                Some(token("https://c", json!({}))),
                None,
            )
            .await,
        ) {
            Refusal::InvalidToken { provider, error } => {
                assert_eq!(&*provider, "-");
                assert!(matches!(error, TokenError::WrongIssuer));
            }
            other => panic!("{other:?}"),
        }
        // Not a JWT: no issuer to choose a provider by.
        match refused(run(&authn(true, false, false), Some("not.a.jwt".into()), None).await) {
            Refusal::InvalidToken { provider, .. } => assert_eq!(&*provider, "-"),
            other => panic!("{other:?}"),
        }

        // A certificate alone, or attached to the token when both are needed.
        let dev = cert("thumb-1");
        let id = run(&authn(true, true, false), None, Some(dev.clone()))
            .await
            .unwrap();
        assert_eq!(id.subject, "device-1");
        let id = run(
            &authn(true, true, true),
            Some(from_b.clone()),
            Some(dev.clone()),
        )
        .await
        .unwrap();
        assert_eq!(id.subject, "svc");
        assert!(id.cert.is_some(), "the certificate rides along");

        // A certificate-bound token (RFC 8705) only with its certificate,
        // whether validated now or answered from the cache.
        let bound = token("https://a", json!({"cnf": {"x5t#S256": "thumb-1"}}));
        for _ in 0..2 {
            let on = |c| run(&authn(true, true, false), Some(bound.clone()), c);
            assert!(on(Some(dev.clone())).await.is_ok());
            match refused(on(Some(cert("thumb-2"))).await) {
                Refusal::InvalidToken { error, .. } => {
                    assert!(matches!(error, TokenError::CertificateMismatch))
                }
                other => panic!("{other:?}"),
            }
            assert!(on(None).await.is_err(), "no certificate at all");
        }
    }

    #[tokio::test]
    async fn passwords_and_tickets() {
        use crate::identity::passwords::{User, hash_password};
        let users = Arc::new(Users::default());
        users.replace([User {
            name: "dev-1".into(),
            password_hash: hash_password(b"pw").unwrap(),
            roles: vec!["device".into()],
            claims: serde_json::Map::new(),
            topics: Vec::new(),
        }]);
        let authn = |users: Option<Arc<Users>>, both| Authenticator {
            accept_jwt: false,
            accept_cert: false,
            require_both: both,
            providers: Vec::new(),
            users,
        };
        let open = authn(Some(users.clone()), false);
        let id = open
            .password("dev-1", b"pw", AuthMethod::Password, None)
            .await
            .unwrap();
        assert_eq!(
            (id.method, id.subject.as_str()),
            (AuthMethod::Password, "dev-1")
        );
        assert_eq!(id.roles, ["device"]);
        let id = open
            .password("dev-1", b"pw", AuthMethod::Ticket, None)
            .await
            .unwrap();
        assert_eq!(id.method, AuthMethod::Ticket);
        for (user, pw, why) in [
            ("dev-1", &b"PW"[..], PasswordError::WrongPassword),
            ("dev-2", b"pw", PasswordError::UnknownUser),
        ] {
            match open.password(user, pw, AuthMethod::Password, None).await {
                Err(Refusal::BadPassword { user: u, why: w }) => {
                    assert_eq!((u.as_str(), w), (user, why))
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            authn(None, false)
                .password("dev-1", b"pw", AuthMethod::Password, None)
                .await,
            Err(Refusal::NotAccepted(AuthMethod::Password))
        ));
        let both = authn(Some(users), true);
        assert!(matches!(
            both.password("dev-1", b"pw", AuthMethod::Password, None)
                .await,
            Err(Refusal::CertificateRequired)
        ));
        let id = both
            .password("dev-1", b"pw", AuthMethod::Password, Some(cert("t")))
            .await
            .unwrap();
        assert_eq!(id.cert.as_ref().unwrap().cn.as_deref(), Some("device-1"));
    }
}
