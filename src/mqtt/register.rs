//! Device self-registration (tstack's treg): `POST /register.json` with
//! `{"RegistrationKey", "DeviceType"}` creates a user with a unique name and
//! a random password (the default rule gives it `<name>/#`) and answers
//! `{"Name", "Password", "Broker", "Cert", "Key", "Ca"}`; with a CA
//! configured, the device also gets a client certificate.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::config::{Config, MqttRegistration};
use crate::identity::{CertIdentity, User, Users, passwords};
use crate::metrics::RouteMetrics;
use crate::store::Store;
use crate::transport::{LocalBody, LocalFuture, LocalService};

/// Larger bodies are refused unread.
const MAX_BODY: usize = 4096;

pub struct Registration {
    settings: MqttRegistration,
    key_sha256: [u8; 32],
    /// The CA directory and its certificate (PEM), when devices get
    /// certificates.
    ca: Option<(PathBuf, String)>,
    store: Arc<dyn Store>,
    users: Arc<Users>,
    metrics: RouteMetrics,
    attempts: moka::sync::Cache<IpAddr, u32>,
}

#[derive(Deserialize)]
struct Ask {
    #[serde(rename = "RegistrationKey")]
    key: String,
    #[serde(rename = "DeviceType")]
    device_type: String,
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(status: StatusCode, error: &str, message: &str) -> Response<Bytes> {
    answer(
        status,
        serde_json::json!({ "error": error, "message": message }),
    )
}

impl Registration {
    pub fn build(
        cfg: &Config,
        settings: &MqttRegistration,
        users: Arc<Users>,
        metrics: RouteMetrics,
    ) -> Result<Registration, String> {
        let key_sha256 = crate::identity::parse_hash(&settings.key_sha256)
            .ok_or("mqtt.registration.key_sha256: not 64 hex digits")?;
        let ca = match &settings.ca {
            None => None,
            Some(dir) => {
                let dir = cfg.resolve(dir);
                let (pem, _) = crate::pki::ca_files(&dir);
                let text = std::fs::read_to_string(&pem)
                    .map_err(|e| format!("mqtt.registration.ca: {}: {e}", pem.display()))?;
                Some((dir, text))
            }
        };
        Ok(Registration {
            settings: settings.clone(),
            key_sha256,
            ca,
            store: crate::store::open(cfg).map_err(|e| e.to_string())?,
            users,
            metrics,
            attempts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        })
    }

    async fn register(
        self: Arc<Self>,
        request: Request<LocalBody>,
        peer: IpAddr,
    ) -> Response<Bytes> {
        if request.method() != Method::POST {
            let mut r = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "POST a JSON body",
            );
            r.headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
            return r;
        }
        let tries = self.attempts.get(&peer).unwrap_or(0) + 1;
        self.attempts.insert(peer, tries);
        if tries > self.settings.max_per_minute {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many registrations from this address; try again in a minute",
            );
        }
        let Some(body) = read_body(request.into_body()).await else {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the body is over 4 KiB or was cut short",
            );
        };
        let ask: Ask = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!(
                        "expected {{\"RegistrationKey\": \"...\", \"DeviceType\": \"...\"}}: {e}"
                    ),
                );
            }
        };
        let presented = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ask.key.as_bytes());
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            presented.as_ref(),
            &self.key_sha256[..],
        )) {
            tracing::info!(peer = %peer, device_type = %ask.device_type, "device registration refused: wrong registration key");
            return refuse(StatusCode::FORBIDDEN, "forbidden", "wrong registration key");
        }
        match self.create(&ask.device_type, &peer.to_string()).await {
            Ok(made) => answer(StatusCode::CREATED, made),
            Err(Refusal {
                status,
                error,
                message,
            }) => refuse(status, error, message),
        }
    }

    /// Makes a device of `kind`: a unique user with a random password and,
    /// with a CA, a certificate. Also what `POST /admin/mqtt/register` does
    /// (the admin API's own authentication standing for the key). `by`
    /// names who asked, for the log.
    pub async fn create(
        self: Arc<Self>,
        kind: &str,
        by: &str,
    ) -> Result<serde_json::Value, Refusal> {
        if kind.is_empty()
            || kind.len() > 32
            || !kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                error: "bad_request",
                message: "DeviceType must be 1 to 32 of A-Z, a-z, 0-9, `-`, `_`",
            });
        }
        let name = loop {
            let candidate = format!("{kind}-{:08x}", fastrand::u32(..));
            if !self.users.contains(&candidate) {
                break candidate;
            }
        };
        let this = self.clone();
        let (kind, made_name) = (kind.to_owned(), name.clone());
        // Hashing, the store's fsync and signing: off the event loop.
        let made = tokio::task::spawn_blocking(move || {
            let password = passwords::generate_password()?;
            let user = User {
                name: made_name.clone(),
                password_hash: passwords::hash_password(password.as_bytes())?,
                roles: this.settings.roles.clone(),
                claims: serde_json::Map::from_iter([(
                    "device_type".to_owned(),
                    serde_json::Value::String(kind.clone()),
                )]),
                topics: Vec::new(),
            };
            let cert = match &this.ca {
                None => None,
                Some((dir, _)) => Some(
                    crate::pki::issue_pem(&crate::pki::IssueRequest {
                        ca: dir,
                        kind: crate::pki::CertKind::Client,
                        cn: &made_name,
                        org: Some(&kind),
                        ou: None,
                        sans: &[],
                        days: this.settings.cert_days,
                        algorithm: crate::pki::KeyAlgorithm::EcdsaP256,
                        out: std::path::Path::new(""),
                    })
                    .map_err(|e| e.to_string())?,
                ),
            };
            passwords::put_user(&*this.store, &user)?;
            this.users.insert(user);
            Ok::<_, String>((password, cert, kind))
        })
        .await;
        let (password, cert, kind) = match made {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "device registration failed");
                return Err(Refusal {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    error: "unavailable",
                    message: "the device cannot be registered now; try again later",
                });
            }
            Err(_) => {
                return Err(Refusal {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    error: "internal",
                    message: "registration failed",
                });
            }
        };
        tracing::info!(by, name = %name, device_type = %kind,
            certificate = cert.is_some(), "device registered");
        let (cert, key) = cert.unwrap_or_default();
        Ok(serde_json::json!({
            "Name": name,
            "Password": password,
            "Broker": self.settings.broker,
            "Cert": cert,
            "Key": key,
            "Ca": self.ca.as_ref().map_or("", |(_, pem)| pem.as_str()),
        }))
    }
}

/// Why a device was not registered.
pub struct Refusal {
    pub status: StatusCode,
    pub error: &'static str,
    pub message: &'static str,
}

/// The whole body, if it is within [`MAX_BODY`] and arrives whole.
async fn read_body(mut body: LocalBody) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() + data.len() > MAX_BODY {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out)
}

impl LocalService for Registration {
    fn name(&self) -> &str {
        "mqtt-register"
    }

    fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    fn endpoint(&self, listener: &str, path: &str) -> Option<u16> {
        let on = self
            .settings
            .listeners
            .as_ref()
            .is_none_or(|l| l.iter().any(|n| n == listener));
        (on && path == self.settings.path).then_some(0)
    }

    fn serve<'a>(
        self: Arc<Self>,
        _endpoint: u16,
        request: Request<LocalBody>,
        peer: IpAddr,
        _cert: Option<&'a CertIdentity>,
    ) -> LocalFuture<'a> {
        Box::pin(self.register(request, peer))
    }
}

/// `tollgate register` (tstack's tregister): registers this device at
/// `url` and writes what comes back (name, password, broker, certificate,
/// key, CA) as YAML to `out` for the device's application (its directory
/// made, the file owner-only). Returns what to print.
pub fn register_device(
    url: &str,
    key: &str,
    device_type: &str,
    ca: Option<&std::path::Path>,
    out: &std::path::Path,
) -> Result<String, String> {
    let ca_pem = match ca {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("--ca {}: {e}", p.display()))?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let body = serde_json::json!({ "RegistrationKey": key, "DeviceType": device_type });
    let answer = runtime
        .block_on(crate::transport::http_client::send(
            Method::POST,
            url,
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
            ca_pem.as_deref(),
            Duration::from_secs(30),
        ))
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if answer.status != StatusCode::CREATED {
        return Err(format!(
            "registration refused ({}): {}",
            answer.status,
            answer.message()
        ));
    }
    let got: serde_json::Value = serde_json::from_slice(&answer.body)
        .map_err(|e| format!("the registration answer is not JSON: {e}"))?;
    let mut yaml =
        String::from("# Written by `tollgate register`: this device's MQTT credentials.\n");
    for field in ["Name", "Password", "Broker", "Cert", "Key", "Ca"] {
        let value = got[field].as_str().unwrap_or("");
        // A JSON string is a YAML double-quoted scalar.
        yaml.push_str(&format!(
            "{field}: {}\n",
            serde_json::Value::String(value.to_owned())
        ));
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| format!("{}: {e}", out.display()))?;
        f.write_all(yaml.as_bytes())
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(format!(
        "registered as {} (broker {}); credentials in {}",
        got["Name"].as_str().unwrap_or("?"),
        got["Broker"].as_str().unwrap_or("?"),
        out.display()
    ))
}
