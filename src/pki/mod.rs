//! Certificate tools for operators (`tollgate pki`): a CA, server and client
//! certificates with organisation names, CRLs, and a readable summary of any
//! certificate file. Keys are written owner-only (0600).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

use x509_parser::prelude::FromDer;

use crate::identity::CertIdentity;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> PkiError {
    PkiError::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256.
    #[default]
    EcdsaP256,
    Ed25519,
    Rsa2048,
}

impl KeyAlgorithm {
    fn generate(self) -> Result<KeyPair, PkiError> {
        let key = match self {
            KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyAlgorithm::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            KeyAlgorithm::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
        };
        key.map_err(|e| PkiError::Invalid(format!("cannot generate a key: {e}")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertKind {
    /// TLS server (extended key usage serverAuth); the CN is a DNS SAN unless `--san` is given.
    Server,
    /// TLS client (clientAuth), for mTLS callers and devices.
    Client,
}

/// The two files of a CA directory.
pub fn ca_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

pub struct CaRequest<'a> {
    pub org: &'a str,
    pub cn: &'a str,
    pub days: u32,
    pub algorithm: KeyAlgorithm,
    pub out: &'a Path,
    pub force: bool,
}

/// Creates `ca.pem` and `ca.key` in `out`; refuses to overwrite a CA key
/// unless `force`. Returns the certificate's path.
pub fn init_ca(req: &CaRequest) -> Result<PathBuf, PkiError> {
    let (cert_path, key_path) = ca_files(req.out);
    if key_path.exists() && !req.force {
        return Err(file_error(
            &key_path,
            "a CA key already exists; pass --force to replace it (every certificate it issued stops being trusted)",
        ));
    }
    fs::create_dir_all(req.out).map_err(|e| file_error(req.out, e))?;
    let key = req.algorithm.generate()?;
    let mut params = base_params(req.cn, Some(req.org), None, req.days)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(|e| PkiError::Invalid(format!("cannot sign the CA certificate: {e}")))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(cert_path)
}

pub struct IssueRequest<'a> {
    pub ca: &'a Path,
    pub kind: CertKind,
    pub cn: &'a str,
    pub org: Option<&'a str>,
    pub ou: Option<&'a str>,
    pub sans: &'a [String],
    pub days: u32,
    pub algorithm: KeyAlgorithm,
    /// Writes `<out>.pem` and `<out>.key`.
    pub out: &'a Path,
}

/// Issues a certificate signed by the CA in `req.ca`. Returns the paths of
/// the certificate and key written.
pub fn issue(req: &IssueRequest) -> Result<(PathBuf, PathBuf), PkiError> {
    let (cert, key) = issue_pem(req)?;
    let cert_path = with_suffix(req.out, "pem");
    let key_path = with_suffix(req.out, "key");
    if let Some(dir) = cert_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    }
    write_private(&key_path, key.as_bytes())?;
    write_public(&cert_path, cert.as_bytes())?;
    Ok((cert_path, key_path))
}

/// [`issue`] without files (`req.out` unused): the certificate and key PEM.
pub fn issue_pem(req: &IssueRequest) -> Result<(String, String), PkiError> {
    let issuer = load_ca(req.ca)?;
    let mut sans = req
        .sans
        .iter()
        .map(|s| parse_san(s))
        .collect::<Result<Vec<_>, _>>()?;
    if sans.is_empty() && req.kind == CertKind::Server {
        sans.push(parse_san(req.cn)?);
    }
    let mut params = base_params(req.cn, req.org, req.ou, req.days)?;
    params.subject_alt_names = sans;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![match req.kind {
        CertKind::Server => ExtendedKeyUsagePurpose::ServerAuth,
        CertKind::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    let key = req.algorithm.generate()?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| PkiError::Invalid(format!("cannot sign the certificate: {e}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a CRL signed by the CA that revokes the certificates in `revoke`
/// (PEM files) and every certificate a CRL already at `out` revokes, so a
/// new CRL never un-revokes one. Listeners load it with `tls.crls`.
pub fn crl(ca: &Path, revoke: &[PathBuf], days: u32, out: &Path) -> Result<(), PkiError> {
    let issuer = load_ca(ca)?;
    let now = OffsetDateTime::now_utc();
    let mut revoked = previously_revoked(out)?;
    for file in revoke {
        let bytes = fs::read(file).map_err(|e| file_error(file, e))?;
        for der in crate::transport::tls::certificates(&bytes).map_err(|e| file_error(file, e))? {
            let cert = CertIdentity::from_der(&der).map_err(|e| file_error(file, e))?;
            let serial = unhex(&cert.serial);
            if revoked
                .iter()
                .any(|r| r.serial_number.as_ref() == serial.as_slice())
            {
                continue;
            }
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: now,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            });
        }
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::from_secs(u64::from(days) * 86_400),
        crl_number: SerialNumber::from(now.unix_timestamp() as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer)
        .and_then(|c| c.pem())
        .map_err(|e| PkiError::Invalid(format!("cannot sign the CRL: {e}")))?;
    write_public(out, crl.as_bytes())
}

/// The entries of an existing CRL file (none when there is no file).
fn previously_revoked(file: &Path) -> Result<Vec<RevokedCertParams>, PkiError> {
    let bytes = match fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_error(file, e)),
    };
    let mut out = Vec::new();
    for der in crate::transport::tls::crls(&bytes).map_err(|e| file_error(file, e))? {
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            .map_err(|e| file_error(file, format!("not a CRL: {e}")))?;
        for r in crl.iter_revoked_certificates() {
            out.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.raw_serial()),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                    .unwrap_or_else(|_| OffsetDateTime::now_utc()),
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            });
        }
    }
    Ok(out)
}

/// A readable summary of every certificate in a PEM (or DER) file.
pub fn show(file: &Path) -> Result<String, PkiError> {
    let bytes = fs::read(file).map_err(|e| file_error(file, e))?;
    let ders = if bytes.starts_with(b"-----") {
        crate::transport::tls::certificates(&bytes)
            .map_err(|e| file_error(file, e))?
            .into_iter()
            .map(|d| d.to_vec())
            .collect()
    } else {
        vec![bytes]
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut out = String::new();
    for (i, der) in ders.iter().enumerate() {
        let c = CertIdentity::from_der(der).map_err(|e| file_error(file, e))?;
        if i > 0 {
            out.push('\n');
        }
        let line = |out: &mut String, k: &str, v: &str| {
            out.push_str(&format!("{k:<18}{v}\n"));
        };
        line(&mut out, "subject:", &c.subject);
        line(&mut out, "issuer:", &c.issuer);
        line(&mut out, "serial:", &c.serial);
        line(&mut out, "not before:", &rfc3339(c.not_before));
        let left = c.not_after - now;
        let state = if left < 0 {
            format!("EXPIRED {} days ago", -left / 86_400)
        } else {
            format!("{} days left", left / 86_400)
        };
        line(
            &mut out,
            "not after:",
            &format!("{} ({state})", rfc3339(c.not_after)),
        );
        for (k, list) in [
            ("san dns:", &c.san_dns),
            ("san uri:", &c.san_uri),
            ("san email:", &c.san_email),
            ("san ip:", &c.san_ip),
        ] {
            if !list.is_empty() {
                line(&mut out, k, &list.join(", "));
            }
        }
        line(&mut out, "sha256:", &colons(&c.sha256));
        line(&mut out, "sha1:", &colons(&c.sha1));
    }
    Ok(out)
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// `AB:CD:...`, as openssl prints fingerprints.
fn colons(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

fn unhex(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .filter_map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
        .collect()
}

fn base_params(
    cn: &str,
    org: Option<&str>,
    ou: Option<&str>,
    days: u32,
) -> Result<CertificateParams, PkiError> {
    if cn.is_empty() {
        return Err(PkiError::Invalid("--cn must not be empty".into()));
    }
    if days == 0 {
        return Err(PkiError::Invalid("--days must be at least 1".into()));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(org) = org.filter(|o| !o.is_empty()) {
        dn.push(DnType::OrganizationName, org);
    }
    if let Some(ou) = ou.filter(|o| !o.is_empty()) {
        dn.push(DnType::OrganizationalUnitName, ou);
    }
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that run behind.
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| PkiError::Invalid("no randomness for a serial number".into()))?;
    serial[0] &= 0x7f; // positive
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

/// `DNS:x`, `URI:x`, `IP:x`, `email:x`, or a bare value whose form says which.
fn parse_san(s: &str) -> Result<SanType, PkiError> {
    let bad = |e: rcgen::Error| PkiError::Invalid(format!("subject alternative name `{s}`: {e}"));
    let (kind, value) = match s.split_once(':') {
        Some((k, v))
            if ["dns", "uri", "ip", "email"].contains(&k.to_ascii_lowercase().as_str()) =>
        {
            (k.to_ascii_lowercase(), v)
        }
        _ if s.parse::<std::net::IpAddr>().is_ok() => ("ip".into(), s),
        _ if s.contains("://") => ("uri".into(), s),
        _ if s.contains('@') => ("email".into(), s),
        _ => ("dns".into(), s),
    };
    Ok(match kind.as_str() {
        "ip" => SanType::IpAddress(
            value
                .parse()
                .map_err(|_| PkiError::Invalid(format!("`{value}` is not an IP address")))?,
        ),
        "uri" => SanType::URI(value.try_into().map_err(bad)?),
        "email" => SanType::Rfc822Name(value.try_into().map_err(bad)?),
        _ => SanType::DnsName(value.try_into().map_err(bad)?),
    })
}

fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let (cert_path, key_path) = ca_files(dir);
    let cert = fs::read_to_string(&cert_path).map_err(|e| file_error(&cert_path, e))?;
    let key = fs::read_to_string(&key_path).map_err(|e| file_error(&key_path, e))?;
    let key = KeyPair::from_pem(&key).map_err(|e| file_error(&key_path, e))?;
    Issuer::from_ca_cert_pem(&cert, key).map_err(|e| file_error(&cert_path, e))
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Replaces `path` atomically, readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, bytes, 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = with_suffix(path, "tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| file_error(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| file_error(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_by_form() {
        assert!(matches!(
            parse_san("127.0.0.1").unwrap(),
            SanType::IpAddress(_)
        ));
        assert!(matches!(
            parse_san("spiffe://a/b").unwrap(),
            SanType::URI(_)
        ));
        assert!(matches!(
            parse_san("ops@x.org").unwrap(),
            SanType::Rfc822Name(_)
        ));
        assert!(matches!(
            parse_san("DNS:a.local").unwrap(),
            SanType::DnsName(_)
        ));
        assert!(matches!(
            parse_san("localhost").unwrap(),
            SanType::DnsName(_)
        ));
        assert!(parse_san("IP:nope").is_err());
    }

    #[test]
    fn ca_issue_show_for_every_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Rsa2048,
        ] {
            let ca = dir.path().join(format!("{alg:?}"));
            init_ca(&CaRequest {
                org: "Acme",
                cn: "Acme Root",
                days: 10,
                algorithm: alg,
                out: &ca,
                force: false,
            })
            .unwrap();
            let out = ca.join("client");
            let (cert, key) = issue(&IssueRequest {
                ca: &ca,
                kind: CertKind::Client,
                cn: "device-1",
                org: Some("devices"),
                ou: None,
                sans: &["spiffe://acme/device-1".into()],
                days: 5,
                algorithm: alg,
                out: &out,
            })
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{alg:?} key mode");
            let text = show(&cert).unwrap();
            assert!(text.contains("CN=device-1,O=devices"), "{text}");
            assert!(text.contains("O=Acme"), "{text}");
            assert!(text.contains("spiffe://acme/device-1"), "{text}");
            assert!(
                text.contains("5 days left") || text.contains("4 days left"),
                "{text}"
            );
        }
        let again = init_ca(&CaRequest {
            org: "Acme",
            cn: "x",
            days: 1,
            algorithm: KeyAlgorithm::EcdsaP256,
            out: &dir.path().join("EcdsaP256"),
            force: false,
        });
        assert!(again.unwrap_err().to_string().contains("--force"));
    }

    #[test]
    fn crls_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&CaRequest {
            org: "Acme",
            cn: "Root",
            days: 10,
            algorithm: KeyAlgorithm::EcdsaP256,
            out: &ca,
            force: false,
        })
        .unwrap();
        let leaf = |name: &str| {
            issue(&IssueRequest {
                ca: &ca,
                kind: CertKind::Client,
                cn: name,
                org: None,
                ou: None,
                sans: &[],
                days: 5,
                algorithm: KeyAlgorithm::EcdsaP256,
                out: &dir.path().join(name),
            })
            .unwrap()
            .0
        };
        let (a, b) = (leaf("a"), leaf("b"));
        let out = dir.path().join("ca.crl");
        crl(&ca, std::slice::from_ref(&a), 7, &out).unwrap();
        crl(&ca, &[b, a], 7, &out).unwrap();
        assert_eq!(
            previously_revoked(&out).unwrap().len(),
            2,
            "a stays revoked, once"
        );
    }
}
