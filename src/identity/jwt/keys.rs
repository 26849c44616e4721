//! Verification keys: a key set indexed by `kid`, loaded from PEM or JWK
//! files, a remote JWK Set document, or a shared HMAC secret.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Key families; a key only ever verifies algorithms of its own family, so
/// an RSA public key can never be used as an HMAC secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

pub fn family(alg: Algorithm) -> Family {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Ed,
        _ => Family::Rsa,
    }
}

pub struct Key {
    pub kid: Option<String>,
    pub family: Family,
    /// The JWK's `alg`, when it names one: then only that algorithm.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl Key {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.family == family(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
    by_kid: HashMap<String, Vec<usize>>,
}

/// Keys with no `kid` (a PEM file) are tried for a token without one, and so
/// are all keys of the family when the set is small; a token naming a `kid`
/// only gets the keys with that `kid`.
const TRY_ALL_LIMIT: usize = 8;

impl KeySet {
    pub fn new(keys: Vec<Key>) -> KeySet {
        let mut by_kid: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            if let Some(kid) = &k.kid {
                by_kid.entry(kid.clone()).or_default().push(i);
            }
        }
        KeySet { keys, by_kid }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// Keys that may verify a token with this `alg` and `kid`.
    pub fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<&Key> {
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some(idx) => idx
                    .iter()
                    .map(|i| &self.keys[*i])
                    .filter(|k| k.accepts(alg))
                    .collect(),
                // A kid we do not know may still be a PEM key's token.
                None => self
                    .keys
                    .iter()
                    .filter(|k| k.kid.is_none() && k.accepts(alg))
                    .collect(),
            },
            None => {
                let fitting: Vec<&Key> = self.keys.iter().filter(|k| k.accepts(alg)).collect();
                if fitting.len() <= TRY_ALL_LIMIT {
                    fitting
                } else {
                    fitting.into_iter().filter(|k| k.kid.is_none()).collect()
                }
            }
        }
    }

    pub fn families(&self) -> Vec<Family> {
        let mut out: Vec<Family> = Vec::new();
        for k in &self.keys {
            if !out.contains(&k.family) {
                out.push(k.family);
            }
        }
        out
    }
}

/// One public key from a JWK. Symmetric (`oct`) keys are refused: an HMAC
/// secret published in a key set would let anyone who can read it sign.
pub fn from_jwk(jwk: &Jwk) -> Result<Key, String> {
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(_) => Family::Ec,
        AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "symmetric (`oct`) keys are not accepted in a key set; use `secret`".into(),
            );
        }
    };
    if let Some(jsonwebtoken::jwk::PublicKeyUse::Encryption) = jwk.common.public_key_use {
        return Err("key is for encryption (`use: enc`)".into());
    }
    let alg = match jwk.common.key_algorithm {
        Some(ka) => Some(
            ka.to_string()
                .parse::<Algorithm>()
                .map_err(|_| format!("key algorithm `{ka}` cannot verify signatures"))?,
        ),
        None => None,
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        family,
        alg,
        key,
    })
}

/// Keys from a JWK Set document (`{"keys": [...]}`) or a single JWK. Keys
/// that cannot be used are skipped and reported; none usable is an error.
pub fn from_jwk_json(bytes: &[u8]) -> Result<(Vec<Key>, Vec<String>), String> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let items = match doc.get("keys") {
        Some(serde_json::Value::Array(items)) => items.clone(),
        Some(_) => return Err("`keys` is not an array".into()),
        None if doc.get("kty").is_some() => vec![doc],
        None => return Err("neither a JWK Set (`keys`) nor a JWK (`kty`)".into()),
    };
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let parsed = serde_json::from_value::<Jwk>(item)
            .map_err(|e| format!("not a supported JWK: {e}"))
            .and_then(|jwk| from_jwk(&jwk));
        match parsed {
            Ok(k) => keys.push(k),
            Err(e) => skipped.push(format!("keys[{i}]: {e}")),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "no usable key{}",
            if skipped.is_empty() {
                String::new()
            } else {
                format!(" ({})", skipped.join("; "))
            }
        ));
    }
    Ok((keys, skipped))
}

/// Public keys from a PEM file: SPKI `PUBLIC KEY` (RSA, EC or Ed25519) or
/// PKCS#1 `RSA PUBLIC KEY`, one or more per file.
pub fn from_pem(bytes: &[u8]) -> Result<Vec<Key>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not a text PEM file".to_owned())?;
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let after = &rest[begin + 11..];
        let label = after
            .find("-----")
            .map(|end| &after[..end])
            .ok_or("a PEM header is not closed")?;
        let end_marker = format!("-----END {label}-----");
        let len = rest[begin..]
            .find(&end_marker)
            .ok_or_else(|| format!("no `{end_marker}` line"))?
            + end_marker.len();
        let pem = &rest.as_bytes()[begin..begin + len];
        rest = &rest[begin + len..];
        let (family, key) = match label {
            "RSA PUBLIC KEY" => (Family::Rsa, DecodingKey::from_rsa_pem(pem)),
            // The SPKI algorithm identifier decides; try each family's parser.
            "PUBLIC KEY" => {
                if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                    (Family::Ed, Ok(k))
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (Family::Ec, Ok(k))
                } else {
                    (Family::Rsa, DecodingKey::from_rsa_pem(pem))
                }
            }
            l if l.contains("PRIVATE KEY") => {
                return Err("holds a private key; give the public key only".into());
            }
            _ => continue,
        };
        let key = key.map_err(|e| format!("unusable public key: {e}"))?;
        keys.push(Key {
            kid: None,
            family,
            alg: None,
            key,
        });
    }
    if keys.is_empty() {
        return Err("no `PUBLIC KEY` or `RSA PUBLIC KEY` PEM block".into());
    }
    Ok(keys)
}

pub fn from_secret(secret: &[u8]) -> Key {
    Key {
        kid: None,
        family: Family::Hmac,
        alg: None,
        key: DecodingKey::from_secret(secret),
    }
}
