//! TLS material: PEM files read into rustls types (aws-lc-rs is the only
//! crypto provider), server configs for listeners with reload, and client
//! configs for `https://` upstreams.

mod client;
mod server;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

pub use client::{UpstreamTlsConfigs, UpstreamTlsMaterial};
pub use server::{ServerMaterial, TlsListener, load_server};

use crate::identity::CertIdentity;

pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Reads files and keeps a SHA-256 over everything read, so a reload can tell
/// whether the material changed without keeping the material around.
pub struct FileReader<'a> {
    resolve: &'a dyn Fn(&Path) -> PathBuf,
    digest: aws_lc_rs::digest::Context,
}

impl<'a> FileReader<'a> {
    pub fn new(resolve: &'a dyn Fn(&Path) -> PathBuf) -> FileReader<'a> {
        FileReader {
            resolve,
            digest: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
        }
    }

    /// The file's bytes, or an error naming the resolved path.
    pub fn read(&mut self, path: &Path) -> Result<Vec<u8>, String> {
        let full = (self.resolve)(path);
        let bytes =
            std::fs::read(&full).map_err(|e| format!("cannot read {}: {e}", full.display()))?;
        self.digest.update(full.as_os_str().as_encoded_bytes());
        self.digest.update(&(bytes.len() as u64).to_be_bytes());
        self.digest.update(&bytes);
        Ok(bytes)
    }

    pub fn digest(self) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(self.digest.finish().as_ref());
        out
    }
}

/// Every certificate in a PEM bundle.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("holds no `BEGIN CERTIFICATE` block".into());
    }
    Ok(certs)
}

pub fn ca_roots(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    add_roots(&mut roots, pem)?;
    Ok(roots)
}

pub fn add_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<(), String> {
    let (added, _) = roots.add_parsable_certificates(certificates(pem)?);
    if added == 0 {
        return Err("holds no usable CA certificate".into());
    }
    Ok(())
}

/// The operating system's trusted CAs, read once.
pub fn system_roots() -> rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading a system CA certificate failed");
            }
            roots.add_parsable_certificates(found.certs);
            roots
        })
        .clone()
}

pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "holds no PEM private key (`BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`)".into()
        }
        e => format!("not a PEM private key: {e}"),
    })
}

/// A certificate chain with its key, checked to belong together; and the
/// leaf's parsed fields.
pub fn certified_key(
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Arc<CertifiedKey>, CertIdentity), String> {
    let chain = certificates(chain_pem)?;
    let leaf = CertIdentity::from_der(&chain[0])?;
    let key = provider()
        .key_provider
        .load_private_key(private_key(key_pem)?)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let certified = CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|e| format!("the key does not belong to the certificate ({e})"))?;
    Ok((Arc::new(certified), leaf))
}

/// CRLs from a PEM file (`BEGIN X509 CRL` blocks) or a single DER CRL.
pub fn crls(bytes: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    if !bytes.starts_with(b"-----") {
        return Ok(vec![CertificateRevocationListDer::from(bytes.to_vec())]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM CRL file: {e}"))?;
    if crls.is_empty() {
        return Err("holds no `BEGIN X509 CRL` block".into());
    }
    Ok(crls)
}

/// Why a handshake failed, when it was the peer's certificate: expired,
/// revoked, unknown issuer, none presented.
pub fn certificate_problem(e: &std::io::Error) -> Option<&rustls::Error> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    matches!(
        inner,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
    .then_some(inner)
}
