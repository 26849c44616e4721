//! TLS to `https://` upstreams: trusted CAs (a bundle or the system's),
//! optional client certificate, loaded once per route.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;

use super::{FileReader, ca_roots, certified_key, provider, system_roots};
use crate::config::{Config, ConfigError, TargetUrl, UpstreamTls};

pub struct UpstreamTlsMaterial {
    /// Without ALPN: each client sets the protocols it speaks.
    pub config: ClientConfig,
    pub server_name: Option<String>,
    digest: [u8; 32],
}

impl UpstreamTlsMaterial {
    pub fn same_as(&self, other: &UpstreamTlsMaterial) -> bool {
        self.digest == other.digest && self.server_name == other.server_name
    }
}

/// The TLS material of every route with `https://` targets, by route name.
#[derive(Default)]
pub struct UpstreamTlsConfigs {
    by_route: HashMap<String, Arc<UpstreamTlsMaterial>>,
}

impl UpstreamTlsConfigs {
    pub fn load(cfg: &Config) -> Result<UpstreamTlsConfigs, Vec<ConfigError>> {
        let mut out = UpstreamTlsConfigs::default();
        let mut errors = Vec::new();
        let default = UpstreamTls::default();
        for (i, route) in cfg.routes.iter().enumerate() {
            let upstream = &route.upstream;
            let tls_targets = upstream
                .targets
                .iter()
                .filter_map(|t| TargetUrl::parse(t).ok())
                .any(|t| t.tls);
            if !tls_targets {
                continue;
            }
            let settings = upstream.tls.as_ref().unwrap_or(&default);
            match load(settings, &|p| cfg.resolve(p)) {
                Ok(m) => {
                    out.by_route.insert(route.name.clone(), Arc::new(m));
                }
                Err((key, message)) => errors.push(ConfigError {
                    path: format!("routes[{i}].upstream.tls.{key}"),
                    message,
                }),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, route: &str) -> Option<&Arc<UpstreamTlsMaterial>> {
        self.by_route.get(route)
    }
}

fn load(
    tls: &UpstreamTls,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<UpstreamTlsMaterial, (&'static str, String)> {
    let mut files = FileReader::new(resolve);
    let roots = match &tls.ca_file {
        Some(ca) => files
            .read(ca)
            .and_then(|pem| ca_roots(&pem))
            .map_err(|e| ("ca_file", e))?,
        None => system_roots(),
    };
    if let Some(name) = &tls.server_name {
        rustls_pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
            (
                "server_name",
                format!("`{name}` is not a DNS name or IP address"),
            )
        })?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("ca_file", e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = files.read(cert).map_err(|e| ("cert", e))?;
            let private = files.read(key).map_err(|e| ("key", e))?;
            let (certified, _) = certified_key(&chain, &private).map_err(|e| ("cert", e))?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                certified,
            )))
        }
        (Some(_), None) => return Err(("key", "a client `cert` needs its `key`".into())),
        (None, Some(_)) => return Err(("cert", "a client `key` needs its `cert`".into())),
    };
    Ok(UpstreamTlsMaterial {
        config,
        server_name: tls.server_name.clone(),
        digest: files.digest(),
    })
}
