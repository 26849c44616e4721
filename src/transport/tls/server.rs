//! TLS for listeners: the server config built from a listener's files (SNI
//! certificates, client CAs, CRLs), swapped atomically when the files change,
//! and the certificate expiry metric.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::IntGaugeVec;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::{FileReader, add_roots, certified_key, crls, provider};
use crate::config::{ClientAuth, ConfigError, ServerTls, TlsVersion};
use crate::identity::CertIdentity;

/// Everything a handshake needs, loaded from one listener's files.
pub struct ServerMaterial {
    pub config: Arc<ServerConfig>,
    /// Served certificates and trusted client CAs: what the expiry metric watches.
    pub certs: Vec<LoadedCert>,
    /// URI SAN of the default certificate: XFCC's `By`.
    pub server_uri: Option<Arc<str>>,
    digest: [u8; 32],
}

pub struct LoadedCert {
    /// The file as written in gateway.yaml.
    pub file: String,
    pub subject: String,
    pub not_after: i64,
}

/// Loads a listener's TLS files. Errors name the key (`tls.cert`, `tls.sni[0].key`,
/// ...) under `path` and what was wrong with the file.
pub fn load_server(
    path: &str,
    tls: &ServerTls,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<ServerMaterial, Vec<ConfigError>> {
    let mut load = Loader {
        path,
        files: FileReader::new(resolve),
        errors: Vec::new(),
        certs: Vec::new(),
    };
    let default = load.pair("", &tls.cert, &tls.key);
    let mut named = Vec::new();
    for (i, entry) in tls.sni.iter().enumerate() {
        let key = format!("sni[{i}].");
        if let Some((certified, leaf)) = load.pair(&key, &entry.cert, &entry.key) {
            if leaf.san_dns.is_empty() {
                load.err(
                    format!("{key}cert"),
                    format!(
                        "{} has no DNS subject alternative name to select it by",
                        entry.cert.display()
                    ),
                );
            }
            for name in leaf.san_dns {
                named.push((name.to_ascii_lowercase(), certified.clone()));
            }
        }
    }

    let auth = tls.client_auth();
    let mut roots = rustls::RootCertStore::empty();
    for (i, ca) in tls.client_ca.iter().enumerate() {
        if let Err(e) = load.ca_bundle(ca, &mut roots) {
            load.err(format!("client_ca[{i}]"), e);
        }
    }
    let mut revocations = Vec::new();
    for (i, file) in tls.crls.iter().enumerate() {
        match load.files.read(file).and_then(|b| crls(&b)) {
            Ok(mut list) => revocations.append(&mut list),
            Err(e) => load.err(format!("crls[{i}]"), format!("{}: {e}", file.display())),
        }
    }
    if auth != ClientAuth::None && tls.client_ca.is_empty() {
        load.err(
            "client_ca".into(),
            "client_auth is optional or required, so the CAs client certificates must chain to are needed".into(),
        );
    }
    let Loader {
        files,
        errors,
        certs,
        ..
    } = load;
    let Some((default, leaf)) = default.filter(|_| errors.is_empty()) else {
        return Err(errors);
    };

    let verifier = if auth == ClientAuth::None {
        WebPkiClientVerifier::no_client_auth()
    } else {
        // A CRL past its next update fails closed: a stale list could miss
        // a revocation.
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(revocations)
            .enforce_revocation_expiration();
        let builder = if auth == ClientAuth::Optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        match builder.build() {
            Ok(v) => v,
            Err(e) => {
                return Err(vec![ConfigError {
                    path: format!("{path}.crls"),
                    message: format!("cannot build the client certificate verifier: {e}"),
                }]);
            }
        }
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| {
            vec![ConfigError {
                path: format!("{path}.min_version"),
                message: e.to_string(),
            }]
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SniResolver { default, named }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless resumption: returning clients skip the full handshake.
    if let Ok(ticketer) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(ServerMaterial {
        config: Arc::new(config),
        certs,
        server_uri: leaf.san_uri.first().map(|u| Arc::from(u.as_str())),
        digest: files.digest(),
    })
}

struct Loader<'a> {
    path: &'a str,
    files: FileReader<'a>,
    errors: Vec<ConfigError>,
    certs: Vec<LoadedCert>,
}

impl Loader<'_> {
    /// Adds a CA bundle's certificates to `roots` (and to the expiry watch).
    fn ca_bundle(&mut self, file: &Path, roots: &mut rustls::RootCertStore) -> Result<(), String> {
        let pem = self.files.read(file)?;
        add_roots(roots, &pem).map_err(|e| format!("{}: {e}", file.display()))?;
        for der in super::certificates(&pem)? {
            if let Ok(c) = CertIdentity::from_der(&der) {
                self.certs.push(LoadedCert {
                    file: file.display().to_string(),
                    subject: c.subject,
                    not_after: c.not_after,
                });
            }
        }
        Ok(())
    }

    fn err(&mut self, key: String, message: String) {
        self.errors.push(ConfigError {
            path: format!("{}.{key}", self.path),
            message,
        });
    }

    /// A certificate chain and its key; `key` prefixes the config key in errors.
    fn pair(
        &mut self,
        key: &str,
        cert: &Path,
        keyfile: &Path,
    ) -> Option<(Arc<CertifiedKey>, CertIdentity)> {
        let chain = self.files.read(cert);
        let private = self.files.read(keyfile);
        let (chain, private) = match (chain, private) {
            (Ok(c), Ok(k)) => (c, k),
            (c, k) => {
                if let Err(e) = c {
                    self.err(format!("{key}cert"), e);
                }
                if let Err(e) = k {
                    self.err(format!("{key}key"), e);
                }
                return None;
            }
        };
        match certified_key(&chain, &private) {
            Ok((certified, leaf)) => {
                self.certs.push(LoadedCert {
                    file: cert.display().to_string(),
                    subject: leaf.subject.clone(),
                    not_after: leaf.not_after,
                });
                Some((certified, leaf))
            }
            Err(e) => {
                self.err(
                    format!("{key}cert"),
                    format!("{} with {}: {e}", cert.display(), keyfile.display()),
                );
                None
            }
        }
    }
}

/// Picks the certificate whose DNS name matches the client's server name
/// (exact, or a `*.` wildcard one label deep); the default otherwise.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    named: Vec<(String, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name() {
            let exact = self.named.iter().find(|(n, _)| n.eq_ignore_ascii_case(sni));
            let wildcard = || {
                let (_, parent) = sni.split_once('.')?;
                self.named.iter().find(|(n, _)| {
                    n.strip_prefix("*.")
                        .is_some_and(|p| p.eq_ignore_ascii_case(parent))
                })
            };
            if let Some((_, key)) = exact.or_else(wildcard) {
                return Some(key.clone());
            }
        }
        Some(self.default.clone())
    }
}

/// A listener's live TLS material: handshakes read it, the watcher replaces it.
pub struct TlsListener {
    name: Arc<str>,
    /// Key path of the listener's `tls` in gateway.yaml, for error messages.
    path: String,
    settings: ServerTls,
    base_dir: PathBuf,
    current: ArcSwap<ServerMaterial>,
    expiry: IntGaugeVec,
    /// Label sets exported for the current material, removed when it is replaced.
    exported: Mutex<Vec<[String; 3]>>,
    /// One reload at a time: the watcher and SIGHUP may race, and the older
    /// read must not be stored last.
    reloading: Mutex<()>,
}

impl TlsListener {
    pub fn new(
        name: &str,
        path: String,
        settings: ServerTls,
        base_dir: PathBuf,
        material: ServerMaterial,
        expiry: IntGaugeVec,
    ) -> TlsListener {
        let listener = TlsListener {
            name: Arc::from(name),
            path,
            settings,
            base_dir,
            current: ArcSwap::from_pointee(material),
            expiry,
            exported: Mutex::new(Vec::new()),
            reloading: Mutex::new(()),
        };
        listener.check_expiry(true);
        listener
    }

    pub fn material(&self) -> arc_swap::Guard<Arc<ServerMaterial>> {
        self.current.load()
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        crate::config::resolve_path(&self.base_dir, p)
    }

    /// Every file the material is read from.
    fn files(&self) -> Vec<PathBuf> {
        let s = &self.settings;
        [&s.cert, &s.key]
            .into_iter()
            .chain(s.sni.iter().flat_map(|p| [&p.cert, &p.key]))
            .chain(s.client_ca.iter())
            .chain(s.crls.iter())
            .map(|p| self.resolve(p))
            .collect()
    }

    /// Reads the files again; new handshakes use the new material. A file that
    /// does not load keeps the current material. Returns whether it changed.
    pub fn reload(&self) -> Result<bool, String> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = load_server(&self.path, &self.settings, &|p| self.resolve(p));
        match loaded {
            Ok(m) if m.digest == self.current.load().digest => Ok(false),
            Ok(m) => {
                self.current.store(Arc::new(m));
                self.check_expiry(true);
                tracing::info!(listener = %self.name, "TLS certificates reloaded; new handshakes use them");
                Ok(true)
            }
            Err(errors) => {
                let text = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::error!(listener = %self.name, errors = %text,
                    "TLS files changed but do not load; the previous certificates stay in use");
                Err(text)
            }
        }
    }

    /// Updates the expiry gauge; with `warn`, logs certificates that expire
    /// within `expiry_warning` (or have expired).
    fn check_expiry(&self, warn: bool) {
        let now = crate::identity::jwt::unix_now() as i64;
        let material = self.current.load();
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        let labels: Vec<[String; 3]> = material
            .certs
            .iter()
            .map(|c| [self.name.to_string(), c.file.clone(), c.subject.clone()])
            .collect();
        for old in exported.iter().filter(|l| !labels.contains(l)) {
            let _ = self
                .expiry
                .remove_label_values(&[&old[0], &old[1], &old[2]]);
        }
        for (cert, l) in material.certs.iter().zip(&labels) {
            let left = cert.not_after - now;
            self.expiry
                .with_label_values(&[&l[0], &l[1], &l[2]])
                .set(left);
            if !warn {
                continue;
            }
            if left <= 0 {
                tracing::error!(listener = %self.name, file = %cert.file, subject = %cert.subject,
                    "certificate has expired; replace it");
            } else if left < self.settings.expiry_warning.as_secs() as i64 {
                tracing::warn!(listener = %self.name, file = %cert.file, subject = %cert.subject,
                    days_left = left / 86_400, "certificate expires soon; replace it");
            }
        }
        *exported = labels;
    }

    /// Watches the files (reloading after `debounce`) and refreshes the expiry
    /// gauge every minute, warning once a day; ends with `stop`.
    pub fn watch(self: Arc<Self>, debounce: Duration, stop: CancellationToken) {
        let watch = match crate::config::watch::watch_files(&self.files()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(listener = %self.name, error = %e,
                    "cannot watch the TLS files; they reload with the config (SIGHUP) instead");
                None
            }
        };
        tokio::spawn(async move {
            let mut watch = watch;
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            let mut warned = Instant::now();
            loop {
                let changed = async {
                    match watch.as_mut() {
                        Some(w) => w.changes.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let daily = warned.elapsed() >= Duration::from_secs(86_400);
                        if daily {
                            warned = Instant::now();
                        }
                        self.check_expiry(daily);
                    }
                    change = changed => {
                        if change.is_none() {
                            watch = None;
                            continue;
                        }
                        // Certificate and key are often written one after the other.
                        tokio::time::sleep(debounce).await;
                        if let Some(w) = watch.as_mut() {
                            while w.changes.try_recv().is_ok() {}
                        }
                        let _ = self.reload();
                    }
                }
            }
        });
    }
}
