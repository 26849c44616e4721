//! Joining: which authentication method a HELLO gets on this listener, the
//! CHALLENGE/AUTHENTICATE exchange, and the principal it ends with —
//! static (gateway.yaml, the users store, JWT providers, the verified
//! certificate) or dynamic (an authenticator procedure, called as Crossbar
//! calls it: `(realm, authid, details)`).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::auth_crypto as crypto;
use super::dealer::{CallRequest, Caller, Outcome};
use super::message::{Id, Message};
use super::router::Router;
use super::settings::{Settings, fingerprint_key};
use super::value::{Dict, Value};
use super::wire::Wire;
use crate::config::{AuthType, MethodConfig, Principal};
use crate::identity::{AuthMethod, Identity};

/// Who joined, and how.
pub struct Joined {
    pub realm: String,
    pub authid: String,
    pub authrole: String,
    pub authmethod: &'static str,
    /// `static`, `dynamic`, `users`, `jwt`.
    pub authprovider: &'static str,
    pub authextra: Option<Dict>,
    /// For the policy engine: the authid as subject, the role as its one
    /// role, the certificate and a token's claims.
    pub identity: Arc<Identity>,
}

/// Why a join is refused: the ABORT's reason and message (`None`: the
/// connection is gone, nothing to say).
pub struct Refused(pub Option<(String, String)>);

fn refuse(reason: &str, message: impl Into<String>) -> Refused {
    Refused(Some((reason.to_owned(), message.into())))
}

fn not_authorized(message: impl Into<String>) -> Refused {
    refuse("wamp.error.not_authorized", message)
}

const METHODS: [&str; 5] = ["anonymous", "ticket", "wampcra", "cryptosign", "tls"];

/// A principal as an authenticator or the config gives it.
#[derive(Default)]
struct Found {
    realm: Option<String>,
    authid: Option<String>,
    role: Option<String>,
    extra: Option<Dict>,
    /// wampcra
    secret: Option<String>,
    salt: Option<String>,
    iterations: Option<u32>,
    keylen: Option<usize>,
    /// cryptosign
    pubkey: Option<String>,
}

impl Found {
    fn from_principal(p: &Principal) -> Found {
        Found {
            realm: p.realm.clone(),
            role: Some(p.role.clone()),
            secret: p.secret.clone(),
            salt: p.salt.clone(),
            iterations: p.iterations,
            keylen: p.keylen,
            ..Found::default()
        }
    }

    /// An authenticator's answer: a role, or `{role, realm?, authid?,
    /// extra?, secret?, salt?, iterations?, keylen?, pubkey?}`.
    fn from_value(v: Option<Value>) -> Result<Found, Refused> {
        let text = |d: &Dict, k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
        match v {
            Some(Value::Str(role)) => Ok(Found {
                role: Some(role),
                ..Found::default()
            }),
            Some(Value::Dict(d)) => Ok(Found {
                realm: text(&d, "realm"),
                authid: text(&d, "authid"),
                role: text(&d, "role"),
                extra: d.get("extra").and_then(Value::as_dict).cloned(),
                secret: text(&d, "secret"),
                salt: text(&d, "salt"),
                iterations: d
                    .get("iterations")
                    .and_then(Value::as_id)
                    .and_then(|n| u32::try_from(n).ok()),
                keylen: d
                    .get("keylen")
                    .and_then(Value::as_id)
                    .and_then(|n| usize::try_from(n).ok()),
                pubkey: text(&d, "pubkey"),
            }),
            _ => Err(not_authorized(
                "the authenticator answered neither a role nor a principal",
            )),
        }
    }
}

/// Runs the join's authentication on `wire` for a HELLO to `realm` with
/// `details`; `session` is the id the session will have.
pub async fn authenticate(
    wire: &mut Wire,
    router: &Router,
    settings: &Settings,
    realm: &str,
    details: &Dict,
    session: Id,
) -> Result<Joined, Refused> {
    let auth = settings.auth_for(&wire.conn.listener).clone();
    let offered: Vec<&str> = match details.get("authmethods") {
        Some(Value::List(l)) => l.iter().filter_map(Value::as_str).collect(),
        _ => vec!["anonymous"],
    };
    let config = |m: &str| match m {
        "anonymous" => auth.anonymous.as_ref(),
        "ticket" => auth.ticket.as_ref(),
        "wampcra" => auth.wampcra.as_ref(),
        "cryptosign" => auth.cryptosign.as_ref(),
        "tls" => auth.tls.as_ref(),
        _ => None,
    };
    let Some((method, cfg)) = offered
        .iter()
        .find_map(|m| config(m).map(|c| (*m, c)))
        .and_then(|(m, c)| METHODS.iter().find(|k| **k == m).map(|k| (*k, c)))
    else {
        let accepted: Vec<&str> = METHODS
            .into_iter()
            .filter(|m| config(m).is_some())
            .collect();
        return Err(refuse(
            "wamp.error.no_auth_method",
            format!(
                "no authentication method offered ({}) is accepted here (accepted: {})",
                offered.join(", "),
                accepted.join(", ")
            ),
        ));
    };
    let authid = details
        .get("authid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let authextra = details.get("authextra").and_then(Value::as_dict).cloned();
    let mut ask = Ask {
        router,
        settings,
        cfg,
        realm,
        authid: authid.as_deref(),
        details: Dict::from([
            ("session".into(), Value::UInt(session)),
            ("authmethod".into(), Value::Str(method.into())),
            (
                "authextra".into(),
                Value::Dict(authextra.clone().unwrap_or_default()),
            ),
            ("transport".into(), Value::Dict(wire.details())),
        ]),
    };
    let cert = wire.conn.cert.clone();
    let (found, provider, auth_method, mut identity) = match method {
        "anonymous" => {
            let found = match cfg.kind {
                // Never the HELLO's authid: an anonymous client names
                // nobody (a `{sub}` rule, an `eligible_authid` list, a
                // disclosed caller would take its word for it).
                AuthType::Static => Found {
                    authid: Some(format!("anonymous-{session}")),
                    role: Some(cfg.role.clone().unwrap_or_else(|| "anonymous".into())),
                    ..Found::default()
                },
                AuthType::Dynamic => ask.authenticator().await?,
            };
            (found, kind_name(cfg), AuthMethod::Anonymous, None)
        }
        "ticket" => {
            let ticket = challenge(wire, "ticket", Dict::new()).await?;
            match cfg.kind {
                AuthType::Dynamic => {
                    ask.details
                        .insert("ticket".into(), Value::Str(ticket.clone()));
                    (
                        ask.authenticator().await?,
                        "dynamic",
                        AuthMethod::Ticket,
                        None,
                    )
                }
                AuthType::Static if cfg.jwt && looks_like_jwt(&ticket) => {
                    let id = settings
                        .authn
                        .authenticate(Some(ticket.as_str().into()), cert.clone())
                        .await
                        .map_err(|e| not_authorized(format!("token refused: {e}")))?;
                    let found = Found {
                        authid: Some(id.subject.clone()),
                        role: id.roles.first().cloned().or_else(|| cfg.role.clone()),
                        ..Found::default()
                    };
                    (found, "jwt", AuthMethod::Jwt, Some(id))
                }
                AuthType::Static => {
                    let Some(user) = authid.as_deref() else {
                        return Err(not_authorized("ticket authentication needs an authid"));
                    };
                    let id = settings
                        .authn
                        .password(user, ticket.as_bytes(), AuthMethod::Ticket, None)
                        .await
                        .map_err(|e| {
                            tracing::info!(realm, authid = user, reason = %e, "WAMP ticket refused");
                            not_authorized("authentication failed")
                        })?;
                    let found = Found {
                        role: id.roles.first().cloned().or_else(|| cfg.role.clone()),
                        ..Found::default()
                    };
                    (found, "users", AuthMethod::Ticket, Some(id))
                }
            }
        }
        "wampcra" => {
            let Some(user) = authid.as_deref() else {
                return Err(not_authorized("wampcra needs an authid"));
            };
            let found = match cfg.kind {
                AuthType::Static => principal(cfg, realm, Some(user), |p| p.secret.is_some())
                    .map(|(_, p)| Found::from_principal(p))
                    .ok_or_else(|| not_authorized("authentication failed"))?,
                AuthType::Dynamic => ask.authenticator().await?,
            };
            let Some(secret) = found.secret.clone() else {
                return Err(not_authorized("no secret for this principal"));
            };
            let role = found.role.clone().unwrap_or_default();
            let text = crypto::cra_challenge(
                user,
                &role,
                "wampcra",
                kind_name(cfg),
                session,
                &crypto::new_nonce(),
                &crypto::utc_timestamp(),
            );
            let mut extra = Dict::from([("challenge".into(), Value::Str(text.clone()))]);
            // As Crossbar: a salted principal's `secret` is the key the
            // client derives from its password (autobahn's `derive_key`),
            // so the password itself is never in the config.
            if let Some(salt) = &found.salt {
                let iterations = found.iterations.unwrap_or(crypto::CRA_DEFAULT_ITERATIONS);
                let keylen = found.keylen.unwrap_or(crypto::CRA_DEFAULT_KEYLEN);
                extra.insert("salt".into(), Value::Str(salt.clone()));
                extra.insert("iterations".into(), Value::UInt(iterations.into()));
                extra.insert("keylen".into(), Value::UInt(keylen as u64));
            }
            let key = secret.into_bytes();
            let signature = challenge(wire, "wampcra", extra).await?;
            if !crypto::cra_verify(&key, &text, &signature) {
                tracing::info!(realm, authid = user, "WAMP-CRA signature refused");
                return Err(not_authorized("authentication failed"));
            }
            (found, kind_name(cfg), AuthMethod::WampCra, None)
        }
        "cryptosign" => {
            let pubkey = authextra
                .as_ref()
                .and_then(|e| e.get("pubkey"))
                .and_then(Value::as_str)
                .filter(|k| crypto::parse_pubkey(k).is_some())
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| {
                    not_authorized("cryptosign needs `authextra.pubkey`: 32 bytes in hex")
                })?;
            if authextra
                .as_ref()
                .and_then(|e| e.get("channel_binding"))
                .is_some_and(|b| *b != Value::Null)
            {
                return Err(not_authorized(
                    "cryptosign with channel binding is not supported; connect without it",
                ));
            }
            let found = match cfg.kind {
                AuthType::Static => {
                    let holds = |p: &Principal| {
                        p.authorized_keys
                            .iter()
                            .any(|k| k.eq_ignore_ascii_case(&pubkey))
                    };
                    let (id, p) = principal(cfg, realm, authid.as_deref(), holds)
                        .ok_or_else(|| not_authorized("authentication failed"))?;
                    Found {
                        authid: Some(id.to_owned()),
                        ..Found::from_principal(p)
                    }
                }
                AuthType::Dynamic => {
                    let found = ask.authenticator().await?;
                    // The signature proves only the key the client sent:
                    // the authenticator must name it.
                    if found
                        .pubkey
                        .as_deref()
                        .is_none_or(|k| !k.eq_ignore_ascii_case(&pubkey))
                    {
                        return Err(not_authorized(
                            "the authenticator does not vouch for this key",
                        ));
                    }
                    found
                }
            };
            let text = crypto::cryptosign_challenge();
            let signature = challenge(
                wire,
                "cryptosign",
                Dict::from([
                    ("challenge".into(), Value::Str(text.clone())),
                    ("channel_binding".into(), Value::Null),
                ]),
            )
            .await?;
            if !crypto::cryptosign_verify(&pubkey, &text, &signature) {
                tracing::info!(realm, pubkey = %pubkey, "WAMP-cryptosign signature refused");
                return Err(not_authorized("authentication failed"));
            }
            (found, kind_name(cfg), AuthMethod::Cryptosign, None)
        }
        _ => {
            // tls: the certificate the listener verified.
            let Some(cert) = cert.clone() else {
                return Err(not_authorized(
                    "tls authentication needs a client certificate",
                ));
            };
            let found = match cfg.kind {
                AuthType::Static => {
                    let sha1 = fingerprint_key(&cert.sha1);
                    // A fingerprint names one certificate; a CN may name
                    // several: fingerprints first.
                    let by_sha1 = |p: &Principal| {
                        p.certificate_sha1
                            .as_deref()
                            .is_some_and(|f| fingerprint_key(f) == sha1)
                    };
                    let by_cn = |p: &Principal| {
                        p.certificate_sha1.is_none() && p.cn.is_some() && p.cn == cert.cn
                    };
                    let (id, p) = principal(cfg, realm, authid.as_deref(), by_sha1)
                        .or_else(|| principal(cfg, realm, authid.as_deref(), by_cn))
                        .ok_or_else(|| {
                            not_authorized("no principal for this client certificate")
                        })?;
                    Found {
                        authid: Some(id.to_owned()),
                        ..Found::from_principal(p)
                    }
                }
                AuthType::Dynamic => ask.authenticator().await?,
            };
            (found, kind_name(cfg), AuthMethod::Mtls, None)
        }
    };
    // An authenticator may place the session in another realm; a static
    // principal only names the one realm it may join.
    let realm = match found.realm {
        Some(r) if cfg.kind == AuthType::Dynamic => r,
        Some(r) if r != realm => {
            return Err(not_authorized(format!(
                "this principal may only join realm `{r}`"
            )));
        }
        _ => realm.to_owned(),
    };
    let authid = found
        .authid
        .or(authid)
        .unwrap_or_else(|| format!("anonymous-{session}"));
    let Some(authrole) = found.role.filter(|r| !r.is_empty()) else {
        return Err(refuse(
            "wamp.error.no_such_role",
            "no role for this principal",
        ));
    };
    let mut id = match identity.take() {
        Some(id) => Identity::clone(&id),
        None => Identity::anonymous(),
    };
    id.method = auth_method;
    id.subject = authid.clone();
    id.roles = vec![authrole.clone()];
    id.cert = cert;
    Ok(Joined {
        realm,
        authid,
        authrole,
        authmethod: method,
        authprovider: provider,
        authextra: found.extra,
        identity: Arc::new(id),
    })
}

/// The first static principal that `proves` accepts (a certificate, a
/// key), may join `realm` and, when the HELLO named an authid, has that
/// authid; with the authid it gives.
fn principal<'a>(
    cfg: &'a MethodConfig,
    realm: &str,
    hello_authid: Option<&str>,
    proves: impl Fn(&Principal) -> bool,
) -> Option<(&'a str, &'a Principal)> {
    cfg.principals.iter().find_map(|(key, p)| {
        let authid = p.authid.as_deref().unwrap_or(key);
        let fits = p.realm.as_deref().is_none_or(|r| r == realm)
            && hello_authid.is_none_or(|h| h == authid);
        (fits && proves(p)).then_some((authid, p))
    })
}

fn kind_name(cfg: &MethodConfig) -> &'static str {
    match cfg.kind {
        AuthType::Static => "static",
        AuthType::Dynamic => "dynamic",
    }
}

/// Three dot-separated base64url parts.
fn looks_like_jwt(ticket: &str) -> bool {
    let parts: Vec<&str> = ticket.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Sends a CHALLENGE and returns the AUTHENTICATE's signature.
async fn challenge(wire: &mut Wire, method: &str, extra: Dict) -> Result<String, Refused> {
    if !wire
        .send(&Message::Challenge {
            method: method.into(),
            extra,
        })
        .await
    {
        return Err(Refused(None));
    }
    match tokio::time::timeout(super::session::JOIN_TIMEOUT, wire.recv()).await {
        Ok(Some(Ok(Message::Authenticate { signature, .. }))) => Ok(signature),
        Ok(None) | Err(_) => Err(Refused(None)),
        Ok(Some(Err(e))) => Err(refuse("wamp.error.protocol_violation", e)),
        Ok(Some(Ok(_))) => Err(refuse(
            "wamp.error.protocol_violation",
            "expected AUTHENTICATE",
        )),
    }
}

/// A call to a dynamic authenticator.
struct Ask<'a> {
    router: &'a Router,
    settings: &'a Settings,
    cfg: &'a MethodConfig,
    realm: &'a str,
    authid: Option<&'a str>,
    details: Dict,
}

impl Ask<'_> {
    async fn authenticator(&mut self) -> Result<Found, Refused> {
        let procedure = self.cfg.authenticator.as_deref().unwrap_or_default();
        // Never the realm the client named (validation requires one).
        let Some(on) = self.cfg.authenticator_realm.as_deref() else {
            return Err(refuse(
                "wamp.error.authentication_failed",
                "no authenticator realm configured",
            ));
        };
        let args = vec![
            Value::Str(self.realm.to_owned()),
            self.authid
                .map_or(Value::Null, |a| Value::Str(a.to_owned())),
            Value::Dict(std::mem::take(&mut self.details)),
        ];
        match call(self.router, self.settings, on, procedure, args).await {
            Ok((args, _)) => {
                let first = match args {
                    Some(Value::List(mut l)) if !l.is_empty() => Some(l.swap_remove(0)),
                    _ => None,
                };
                Found::from_value(first)
            }
            Err(CallFailed::Error(uri, message)) => {
                tracing::info!(realm = self.realm, authid = self.authid.unwrap_or(""), error = %uri,
                    "WAMP authenticator refused the join");
                Err(refuse(&uri, message))
            }
            Err(other) => {
                tracing::warn!(realm = self.realm, procedure, reason = %other,
                    "WAMP authenticator could not be asked; join refused");
                // Not a refusal: the client may try again.
                Err(refuse(
                    "wamp.error.authentication_failed",
                    other.to_string(),
                ))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallFailed {
    #[error("no realm `{0}` for the procedure")]
    NoRealm(String),
    #[error("no callee registered `{0}`")]
    NoCallee(String),
    #[error("no answer within the time allowed")]
    Timeout,
    #[error("the callee left")]
    Gone,
    #[error("{0}: {1}")]
    Error(String, String),
}

/// The router's own call of `procedure` on realm `on` (an authenticator,
/// an authorizer), waited for at most `auth_timeout`.
pub async fn call(
    router: &Router,
    settings: &Settings,
    on: &str,
    procedure: &str,
    args: Vec<Value>,
) -> Result<(Option<Value>, Option<Value>), CallFailed> {
    let realm = router
        .realm(on)
        .ok_or_else(|| CallFailed::NoRealm(on.to_owned()))?;
    let (tx, rx) = oneshot::channel();
    let options = Dict::new();
    let invocation = realm
        .state()
        .call(CallRequest {
            caller: Caller::Router(tx),
            procedure,
            options: &options,
            disclose: None,
            args: Some(Value::List(args)),
            kwargs: None,
        })
        .map_err(|_| CallFailed::NoCallee(procedure.to_owned()))?;
    match tokio::time::timeout(settings.auth_timeout, rx).await {
        Ok(Ok(Outcome::Result(args, kwargs))) => Ok((args, kwargs)),
        Ok(Ok(Outcome::Error(uri, args))) => {
            let message = match args {
                Some(Value::List(l)) => l
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            };
            Err(CallFailed::Error(uri, message))
        }
        Ok(Err(_)) => Err(CallFailed::Gone),
        Err(_) => {
            realm.state().forget(invocation);
            Err(CallFailed::Timeout)
        }
    }
}
