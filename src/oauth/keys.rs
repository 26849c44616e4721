//! Signing keys of the token server: generated into the store on first start
//! (or imported from PEM files), `kid` = RFC 7638 thumbprint, published as a
//! JWKS, rotated with an overlap so tokens signed by the previous key stay
//! valid until they expire.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::SigningAlgorithm;
use crate::identity::jwt::keys::{self as verify_keys, KeySet};
use crate::store::Store;

/// A key as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredKey {
    pub kid: String,
    pub alg: SigningAlgorithm,
    /// PKCS#8 PEM private key.
    pub private_pem: String,
    pub created_at: u64,
    /// Set once the key is no longer the signing key: it stays in the JWKS
    /// (and valid for `keys: self`) until then.
    pub retire_at: Option<u64>,
}

impl StoredKey {
    pub fn generate(alg: SigningAlgorithm, now: u64) -> Result<StoredKey, String> {
        let pair = match alg {
            SigningAlgorithm::EdDSA => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
            SigningAlgorithm::ES256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            SigningAlgorithm::RS256 => {
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
        }
        .map_err(|e| format!("cannot generate a {alg:?} key: {e}"))?;
        let private_pem = pair.serialize_pem();
        let key = SigningKey::from_pem(alg, &private_pem, now, None)?;
        Ok(StoredKey {
            kid: key.kid,
            alg,
            private_pem,
            created_at: now,
            retire_at: None,
        })
    }
}

/// A key ready to sign and to publish.
pub struct SigningKey {
    pub kid: String,
    pub alg: SigningAlgorithm,
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    /// The public half as a JWK (with `kid`, `alg`, `use`).
    pub jwk: Jwk,
    pub created_at: u64,
    pub retire_at: Option<u64>,
}

/// The RFC 7638 required members of the public key, and its thumbprint
/// (base64url SHA-256 of those members, sorted, without whitespace).
fn public_members(
    alg: SigningAlgorithm,
    raw: &[u8],
) -> Result<(Map<String, Value>, String), String> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let members: Vec<(&str, String)> = match alg {
        SigningAlgorithm::EdDSA => vec![
            ("crv", "Ed25519".into()),
            ("kty", "OKP".into()),
            ("x", b64(raw)),
        ],
        SigningAlgorithm::ES256 => {
            if raw.len() != 65 || raw[0] != 4 {
                return Err("not an uncompressed P-256 public key".into());
            }
            vec![
                ("crv", "P-256".into()),
                ("kty", "EC".into()),
                ("x", b64(&raw[1..33])),
                ("y", b64(&raw[33..])),
            ]
        }
        SigningAlgorithm::RS256 => {
            let (n, e) = rsa_public(raw).ok_or("not a PKCS#1 RSA public key")?;
            vec![("e", b64(e)), ("kty", "RSA".into()), ("n", b64(n))]
        }
    };
    // Members are already in lexicographic order; values need no escaping.
    let canonical = format!(
        "{{{}}}",
        members
            .iter()
            .map(|(k, v)| format!("\"{k}\":\"{v}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    let map = members
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v)))
        .collect();
    Ok((map, b64(digest.as_ref())))
}

/// `n` and `e` of a DER RSAPublicKey (SEQUENCE { INTEGER n, INTEGER e }),
/// without leading zero bytes.
fn rsa_public(der: &[u8]) -> Option<(&[u8], &[u8])> {
    fn item(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = input.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (&rest[..len], &rest[len..]))
    }
    fn strip(b: &[u8]) -> &[u8] {
        let zeros = b.iter().take_while(|x| **x == 0).count();
        &b[zeros.min(b.len().saturating_sub(1))..]
    }
    let (seq, _) = item(der, 0x30)?;
    let (n, rest) = item(seq, 0x02)?;
    let (e, _) = item(rest, 0x02)?;
    Some((strip(n), strip(e)))
}

fn algorithm(alg: SigningAlgorithm) -> Algorithm {
    match alg {
        SigningAlgorithm::EdDSA => Algorithm::EdDSA,
        SigningAlgorithm::ES256 => Algorithm::ES256,
        SigningAlgorithm::RS256 => Algorithm::RS256,
    }
}

impl SigningKey {
    fn from_pem(
        alg: SigningAlgorithm,
        pem: &str,
        created_at: u64,
        retire_at: Option<u64>,
    ) -> Result<SigningKey, String> {
        let algorithm = algorithm(alg);
        let encoding = match alg {
            SigningAlgorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()),
            SigningAlgorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
            SigningAlgorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
        }
        .map_err(|e| format!("not a {alg:?} private key: {e}"))?;
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| format!("not a private key: {e}"))?;
        let (members, kid) = public_members(alg, pair.public_key_raw())?;
        let mut doc = members;
        doc.insert("kid".into(), kid.clone().into());
        doc.insert("alg".into(), format!("{alg:?}").into());
        doc.insert("use".into(), "sig".into());
        let jwk: Jwk = serde_json::from_value(serde_json::Value::Object(doc))
            .map_err(|e| format!("cannot express the public key as a JWK: {e}"))?;
        Ok(SigningKey {
            kid,
            alg,
            algorithm,
            encoding,
            jwk,
            created_at,
            retire_at,
        })
    }

    fn from_stored(k: &StoredKey) -> Result<SigningKey, String> {
        SigningKey::from_pem(k.alg, &k.private_pem, k.created_at, k.retire_at)
    }
}

/// The keys in use: the one that signs, and the ones still published.
pub struct KeyRing {
    pub signing: Arc<SigningKey>,
    /// Every published key, the signing one first.
    pub published: Vec<Arc<SigningKey>>,
    /// The public keys, for `keys: self` providers.
    pub verify: Arc<KeySet>,
    /// `GET /.well-known/jwks.json`, rendered once.
    pub jwks_json: bytes::Bytes,
}

impl KeyRing {
    fn new(keys: Vec<SigningKey>) -> Result<KeyRing, String> {
        let mut keys: Vec<Arc<SigningKey>> = keys.into_iter().map(Arc::new).collect();
        // The signing key: the newest without a retirement date.
        keys.sort_by_key(|k| (k.retire_at.is_some(), std::cmp::Reverse(k.created_at)));
        let signing = keys
            .first()
            .filter(|k| k.retire_at.is_none())
            .cloned()
            .ok_or("no signing key")?;
        let set = JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        let verify = Arc::new(KeySet::new(
            keys.iter()
                .map(|k| verify_keys::from_jwk(&k.jwk))
                .collect::<Result<_, _>>()?,
        ));
        let jwks_json = serde_json::to_vec(&set).map_err(|e| e.to_string())?.into();
        Ok(KeyRing {
            signing,
            published: keys,
            verify,
            jwks_json,
        })
    }
}

/// Where the keys come from.
pub enum KeySource<'a> {
    /// Generated and kept in the store.
    Store(&'a dyn Store),
    /// PEM files named in gateway.yaml (operators who manage keys elsewhere).
    Files(&'a [PathBuf], &'a dyn Fn(&std::path::Path) -> PathBuf),
}

/// Loads the key ring. From the store: drops keys past their retirement,
/// generates a key of `alg` when none signs or the signing key has another
/// algorithm (the old one is retired after `overlap`), and saves changes.
pub fn load(
    source: KeySource,
    alg: SigningAlgorithm,
    overlap: u64,
    now: u64,
) -> Result<KeyRing, String> {
    match source {
        KeySource::Files(files, resolve) => {
            let mut keys = Vec::new();
            for (i, f) in files.iter().enumerate() {
                let path = resolve(f);
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
                let alg = pem_algorithm(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
                // The first file signs; the others are published (retiring "never").
                let retire = (i > 0).then_some(u64::MAX);
                keys.push(
                    SigningKey::from_pem(alg, &pem, u64::MAX - i as u64, retire)
                        .map_err(|e| format!("{}: {e}", path.display()))?,
                );
            }
            KeyRing::new(keys)
        }
        KeySource::Store(store) => {
            let kept = store.update_signing_keys(|stored: Vec<StoredKey>| {
                let (kept, changed) = maintain(stored, alg, overlap, now)?;
                let rows = changed.then(|| rows(&kept));
                Ok((rows, kept))
            })?;
            KeyRing::new(
                kept.iter()
                    .map(SigningKey::from_stored)
                    .collect::<Result<_, _>>()?,
            )
        }
    }
}

fn rows(keys: &[StoredKey]) -> Vec<(String, StoredKey)> {
    keys.iter().map(|k| (k.kid.clone(), k.clone())).collect()
}

/// Generates a new signing key and retires the current one after `overlap`
/// (one store transaction): `tollgate keys rotate`.
pub fn rotate(
    store: &dyn Store,
    alg: SigningAlgorithm,
    overlap: u64,
    now: u64,
) -> Result<String, String> {
    rotate_when(store, alg, overlap, now, None)?.ok_or_else(|| "no key was rotated".to_owned())
}

/// Rotates the signing key if it is at least `max_age` seconds old, as read
/// in the same transaction as the write: of several nodes finding it due at
/// once, exactly one rotates (the others read its new key and find nothing
/// due). The new key's id, if one was made.
pub fn rotate_due(
    store: &dyn Store,
    alg: SigningAlgorithm,
    overlap: u64,
    now: u64,
    max_age: u64,
) -> Result<Option<String>, String> {
    rotate_when(store, alg, overlap, now, Some(max_age))
}

fn rotate_when(
    store: &dyn Store,
    alg: SigningAlgorithm,
    overlap: u64,
    now: u64,
    max_age: Option<u64>,
) -> Result<Option<String>, String> {
    store.update_signing_keys(|mut stored: Vec<StoredKey>| {
        let due = max_age.is_none_or(|age| {
            !stored
                .iter()
                .any(|k| k.retire_at.is_none() && k.alg == alg && k.created_at + age > now)
        });
        if !due {
            return Ok((None, None));
        }
        for k in stored.iter_mut().filter(|k| k.retire_at.is_none()) {
            k.retire_at = Some(now + overlap);
        }
        let new = StoredKey::generate(alg, now)?;
        let kid = new.kid.clone();
        stored.push(new);
        let (kept, _) = maintain(stored, alg, overlap, now)?;
        Ok((Some(rows(&kept)), Some(kid)))
    })
}

fn maintain(
    stored: Vec<StoredKey>,
    alg: SigningAlgorithm,
    overlap: u64,
    now: u64,
) -> Result<(Vec<StoredKey>, bool), String> {
    let before = stored.len();
    let mut kept: Vec<StoredKey> = stored
        .into_iter()
        .filter(|k| k.retire_at.is_none_or(|t| t > now))
        .collect();
    let mut changed = kept.len() != before;
    let signs_with_alg = kept.iter().any(|k| k.retire_at.is_none() && k.alg == alg);
    if !signs_with_alg {
        for k in kept.iter_mut().filter(|k| k.retire_at.is_none()) {
            k.retire_at = Some(now + overlap);
        }
        kept.push(StoredKey::generate(alg, now)?);
        changed = true;
    }
    Ok((kept, changed))
}

fn pem_algorithm(pem: &str) -> Result<SigningAlgorithm, String> {
    let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| format!("not a private key: {e}"))?;
    let alg = pair.algorithm();
    if alg == &rcgen::PKCS_ED25519 {
        Ok(SigningAlgorithm::EdDSA)
    } else if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Ok(SigningAlgorithm::ES256)
    } else if alg == &rcgen::PKCS_RSA_SHA256 {
        Ok(SigningAlgorithm::RS256)
    } else {
        Err("expected an Ed25519, P-256 or RSA private key".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_rotate_and_retire() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let ring = load(
            KeySource::Store(&*store),
            SigningAlgorithm::EdDSA,
            600,
            1000,
        )
        .unwrap();
        assert_eq!(ring.published.len(), 1);
        let first = ring.signing.kid.clone();
        // Loading again keeps the key.
        let ring = load(
            KeySource::Store(&*store),
            SigningAlgorithm::EdDSA,
            600,
            1001,
        )
        .unwrap();
        assert_eq!(ring.signing.kid, first);

        let second = rotate(&*store, SigningAlgorithm::EdDSA, 600, 2000).unwrap();
        let ring = load(
            KeySource::Store(&*store),
            SigningAlgorithm::EdDSA,
            600,
            2001,
        )
        .unwrap();
        assert_eq!(ring.signing.kid, second);
        assert_eq!(
            ring.published.len(),
            2,
            "the old key is published during the overlap"
        );
        assert!(ring.verify.has_kid(&first));
        let jwks: serde_json::Value = serde_json::from_slice(&ring.jwks_json).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        assert_eq!(jwks["keys"][0]["kid"], second.as_str());

        let ring = load(
            KeySource::Store(&*store),
            SigningAlgorithm::EdDSA,
            600,
            2601,
        )
        .unwrap();
        assert_eq!(ring.published.len(), 1, "retired after the overlap");

        // Another algorithm configured: a new key, the old one overlaps.
        let ring = load(
            KeySource::Store(&*store),
            SigningAlgorithm::ES256,
            600,
            3000,
        )
        .unwrap();
        assert_eq!(ring.signing.alg, SigningAlgorithm::ES256);
        assert_eq!(ring.published.len(), 2);
    }

    #[test]
    fn every_algorithm_signs_and_verifies() {
        for alg in [
            SigningAlgorithm::EdDSA,
            SigningAlgorithm::ES256,
            SigningAlgorithm::RS256,
        ] {
            let k = StoredKey::generate(alg, 1).unwrap();
            let key = SigningKey::from_stored(&k).unwrap();
            assert_eq!(key.kid.len(), 43, "base64url SHA-256 thumbprint");
            let mut header = jsonwebtoken::Header::new(key.algorithm);
            header.kid = Some(key.kid.clone());
            let token =
                jsonwebtoken::encode(&header, &serde_json::json!({"sub": "x"}), &key.encoding)
                    .unwrap();
            let verify = KeySet::new(vec![verify_keys::from_jwk(&key.jwk).unwrap()]);
            let candidates = verify.candidates(key.algorithm, Some(&key.kid));
            assert_eq!(candidates.len(), 1, "{alg:?}");
            let mut v = jsonwebtoken::Validation::new(key.algorithm);
            v.required_spec_claims.clear();
            v.validate_exp = false;
            v.validate_aud = false;
            jsonwebtoken::decode::<serde_json::Value>(&token, &candidates[0].key, &v).unwrap();
        }
    }
}
