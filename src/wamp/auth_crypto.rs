//! The cryptography of two WAMP authentication methods, as pure functions, so
//! the session code only decides *when* to call them and these can be checked
//! against autobahn-python's own output (see the tests).
//!
//! **WAMP-CRA** (`wampcra`), as autobahn-python and Crossbar do it:
//! the router sends a JSON text ([`cra_challenge`]) in CHALLENGE's
//! `extra.challenge`; the client answers with base64(HMAC-SHA256(key, text)).
//! The key is the secret's UTF-8 bytes, or — when the router also sends
//! `salt`, `iterations` and `keylen` — the UTF-8 bytes of the *base64 text*
//! that [`derive_key`] returns (autobahn never uses the raw PBKDF2 output as
//! the key). The router must keep the exact challenge string it sent and
//! verify against that string, never against a re-serialisation.
//!
//! **WAMP-cryptosign** (`cryptosign`, Ed25519): the router sends 32 random
//! bytes as hex ([`cryptosign_challenge`]); the client signs those bytes and
//! answers with hex(signature ‖ signed message), 96 bytes.
//!
//! Channel binding is not supported: with `authextra.channel_binding =
//! "tls-unique"` autobahn signs `challenge XOR tls-unique` instead of the
//! challenge, which [`cryptosign_verify`] rejects (fails closed). The
//! session code should refuse such a HELLO with a clear reason rather than
//! let it fail as a bad signature.

use std::num::NonZeroU32;

use aws_lc_rs::{hmac, pbkdf2, rand, signature};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use subtle::ConstantTimeEq;

/// PBKDF2 iterations when a salted WAMP-CRA user gives none (autobahn's and
/// Crossbar's default).
pub const CRA_DEFAULT_ITERATIONS: u32 = 1000;
/// Derived key length in bytes when a salted WAMP-CRA user gives none
/// (autobahn's and Crossbar's default).
pub const CRA_DEFAULT_KEYLEN: usize = 32;
/// Longest derived key [`derive_key`] makes; far above any real use, low
/// enough that a typo in the config cannot allocate gigabytes.
pub const CRA_MAX_KEYLEN: usize = 1024;

/// Random bytes in a WAMP-CRA nonce: 48 bytes are 64 base64 characters,
/// the length of Crossbar's `util.newid(64)` nonce.
const CRA_NONCE_BYTES: usize = 48;
/// Length of a WAMP-cryptosign challenge; autobahn refuses any other.
const CRYPTOSIGN_CHALLENGE_BYTES: usize = 32;
const ED25519_PUBKEY_BYTES: usize = 32;
const ED25519_SIGNATURE_BYTES: usize = 64;

/// The challenge object, fields in Crossbar's order.
#[derive(Serialize)]
struct CraChallenge<'a> {
    authid: &'a str,
    authrole: &'a str,
    authmethod: &'a str,
    authprovider: &'a str,
    nonce: &'a str,
    timestamp: &'a str,
    session: u64,
}

/// The JSON text a router puts in CHALLENGE's `extra.challenge` for
/// WAMP-CRA. The client signs this exact text, so keep the returned string.
pub fn cra_challenge(
    authid: &str,
    authrole: &str,
    authmethod: &str,
    authprovider: &str,
    session: u64,
    nonce: &str,
    timestamp: &str,
) -> String {
    let challenge = CraChallenge {
        authid,
        authrole,
        authmethod,
        authprovider,
        nonce,
        timestamp,
        session,
    };
    // Strings and an integer only: serde_json cannot fail on these.
    serde_json::to_string(&challenge).expect("a WAMP-CRA challenge always serialises")
}

/// A fresh WAMP-CRA nonce: 48 random bytes in standard base64 (64 chars),
/// so no two challenges, and hence no two valid signatures, are alike.
/// Panics only if the system RNG fails (see `random_bytes`).
pub fn new_nonce() -> String {
    BASE64.encode(random_bytes::<CRA_NONCE_BYTES>())
}

/// Now in UTC as autobahn's `util.utcnow()` writes it:
/// `2026-12-06T18:30:00.123Z` (milliseconds, `Z`).
pub fn utc_timestamp() -> String {
    format_timestamp(time::OffsetDateTime::now_utc())
}

fn format_timestamp(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// autobahn's `derive_key`: PBKDF2-HMAC-SHA256 of the secret's UTF-8 bytes
/// with the salt's UTF-8 bytes, `keylen` bytes, returned as standard base64
/// with padding. This text (its bytes) is the WAMP-CRA key of a salted user.
///
/// `None` for zero iterations (autobahn fails too), and for a `keylen` of 0
/// (autobahn would make an empty, worthless key) or above
/// [`CRA_MAX_KEYLEN`]; validate the config with this.
pub fn derive_key(secret: &str, salt: &str, iterations: u32, keylen: usize) -> Option<String> {
    let iterations = NonZeroU32::new(iterations)?;
    if keylen == 0 || keylen > CRA_MAX_KEYLEN {
        return None;
    }
    let mut key = vec![0u8; keylen];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt.as_bytes(),
        secret.as_bytes(),
        &mut key,
    );
    Some(BASE64.encode(&key))
}

/// autobahn's `compute_wcs`: standard base64 (with padding) of
/// HMAC-SHA256(key, challenge's UTF-8 bytes) — what the client answers.
pub fn cra_signature(key: &[u8], challenge: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    BASE64.encode(hmac::sign(&key, challenge.as_bytes()))
}

/// Whether `signature` (the client's AUTHENTICATE text) is right for this
/// key and challenge. Compared in constant time so a client cannot learn
/// the expected signature byte by byte.
#[must_use]
pub fn cra_verify(key: &[u8], challenge: &str, signature: &str) -> bool {
    let expected = cra_signature(key, challenge);
    expected.as_bytes().ct_eq(signature.as_bytes()).into()
}

/// A fresh WAMP-cryptosign challenge: 32 random bytes as lower-case hex.
/// Panics only if the system RNG fails (see `random_bytes`).
pub fn cryptosign_challenge() -> String {
    hex_lower(&random_bytes::<CRYPTOSIGN_CHALLENGE_BYTES>())
}

/// An Ed25519 public key from 64 hex digits (either case), as configured or
/// sent in HELLO's `authextra.pubkey`; `None` if it is not exactly that.
pub fn parse_pubkey(hex: &str) -> Option<[u8; ED25519_PUBKEY_BYTES]> {
    let mut pubkey = [0u8; ED25519_PUBKEY_BYTES];
    decode_hex_into(hex, &mut pubkey).then_some(pubkey)
}

/// Whether `signature_hex` is the holder of `pubkey_hex` signing the 32-byte
/// challenge `challenge_hex` (both as hex).
///
/// Accepts autobahn's form, hex(64-byte signature ‖ 32-byte signed message),
/// where the message must equal the challenge, and a bare 64-byte signature.
/// Anything malformed is `false`; nothing here panics.
#[must_use]
pub fn cryptosign_verify(pubkey_hex: &str, challenge_hex: &str, signature_hex: &str) -> bool {
    let Some(pubkey) = parse_pubkey(pubkey_hex) else {
        return false;
    };
    let mut challenge = [0u8; CRYPTOSIGN_CHALLENGE_BYTES];
    if !decode_hex_into(challenge_hex, &mut challenge) {
        return false;
    }
    let mut signed = [0u8; ED25519_SIGNATURE_BYTES + CRYPTOSIGN_CHALLENGE_BYTES];
    let signature = match signature_hex.len() {
        len if len == 2 * ED25519_SIGNATURE_BYTES => {
            let signature = &mut signed[..ED25519_SIGNATURE_BYTES];
            if !decode_hex_into(signature_hex, signature) {
                return false;
            }
            &signed[..ED25519_SIGNATURE_BYTES]
        }
        len if len == 2 * signed.len() => {
            if !decode_hex_into(signature_hex, &mut signed) {
                return false;
            }
            // The client's copy of what it signed: a different message means
            // it signed something else (e.g. a channel-bound challenge).
            if signed[ED25519_SIGNATURE_BYTES..] != challenge {
                return false;
            }
            &signed[..ED25519_SIGNATURE_BYTES]
        }
        _ => return false,
    };
    signature::UnparsedPublicKey::new(&signature::ED25519, &pubkey)
        .verify(&challenge, signature)
        .is_ok()
}

/// `N` bytes from the system RNG.
///
/// # Panics
/// If the system RNG fails. AWS-LC aborts before that happens on supported
/// platforms; should it ever happen, carrying on with a predictable
/// challenge would let a recorded answer be replayed, so stop instead.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::fill(&mut bytes).expect("system random number generator failed");
    bytes
}

fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Fills `out` from exactly `2 * out.len()` hex digits; `false` (with `out`
/// partly written) on any other length or a non-hex character.
fn decode_hex_into(hex: &str, out: &mut [u8]) -> bool {
    let hex = hex.as_bytes();
    if hex.len() != 2 * out.len() {
        return false;
    }
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (Some(high), Some(low)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
            return false;
        };
        *byte = (high << 4) | low;
    }
    true
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! Expected values were computed once with autobahn-python 22.7.1 (the
    //! client library these methods come from) and pasted here:
    //!
    //!     /usr/bin/python3 tests/data/wamp_auth_vectors.py
    //!
    //! e.g. `/usr/bin/python3 -c "from autobahn.wamp.auth import derive_key,
    //! compute_wcs; k = derive_key('secret2', 'salt123', 100, 16); print(k,
    //! compute_wcs(k, CHALLENGE))"`, and for cryptosign
    //! `CryptosignKey.from_bytes(bytes(range(32))).sign_challenge(
    //! Challenge('cryptosign', {'challenge': bytes(range(0xa0, 0xc0)).hex()}))`
    //! (with `txaio.use_twisted()` so the Deferred fires at once).

    use super::*;

    /// `cra_challenge("joe", "frontend", "wampcra", "static",
    /// 4391174163346446, NONCE, "2026-12-06T18:30:00.123Z")`.
    const CHALLENGE: &str = concat!(
        r#"{"authid":"joe","authrole":"frontend","authmethod":"wampcra","#,
        r#""authprovider":"static","#,
        r#""nonce":"Fz6ypmmOh0mAmsLuTfPUmHbmcBbIHHFeQNvFHr2zqoVmUd4xTnFYiScVLwhvxMCa","#,
        r#""timestamp":"2026-12-06T18:30:00.123Z","session":4391174163346446}"#
    );
    const NONCE: &str = "Fz6ypmmOh0mAmsLuTfPUmHbmcBbIHHFeQNvFHr2zqoVmUd4xTnFYiScVLwhvxMCa";

    // compute_wcs(b'secret2', CHALLENGE)
    const UNSALTED_SIGNATURE: &str = "x1WYdHNqcF/wV2jAq81Hf3simX/c7C38Qw13U9Y8kAw=";
    // derive_key('secret2', 'salt123', 100, 16)
    const SALTED_KEY: &str = "LG5/FwnS5WvgmlEyLPk/pQ==";
    // compute_wcs(derive_key(b'secret2', 'salt123', 100, 16), CHALLENGE)
    const SALTED_SIGNATURE: &str = "S/kWKjjo8LS/3Ju5h7/5aC1rqslbhntC9v3KNXR5zMs=";

    // CryptosignKey.from_bytes(bytes(range(32))).public_key()
    const PUBKEY: &str = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8";
    // CryptosignKey.from_bytes(bytes([0x42] * 32)).public_key()
    const OTHER_PUBKEY: &str = "2152f8d19b791d24453242e15f2eab6cb7cffa7b6a5ed30097960e069881db12";
    // bytes(range(0xa0, 0xc0)).hex()
    const CS_CHALLENGE: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
    // What autobahn's client sends: hex(signature ‖ challenge).
    const CS_SIGNATURE: &str = concat!(
        "01055eed19b94a3a8d1f9d45a13f2b690204cb2062dbfe84ccb2f8378a0dad26",
        "9e814ae454fb5b30d36a2442e8a32f6ba2fcbb41ba2e529368d2267315c13e02",
        "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
    );
    // The same key signing with channel_id=bytes([0x5a] * 32),
    // channel_id_type='tls-unique': it signs challenge XOR channel id.
    const CS_CHANNEL_BOUND_SIGNATURE: &str = concat!(
        "88bfe787e27d0ccdeb2c145599721b93d7ecd470d35bf0bce8f2d6f6c8b22c18",
        "1023fadf5289fdf3005886be21584cba4e66aaa806acb5c147d2af19f9baa00b",
        "fafbf8f9fefffcfdf2f3f0f1f6f7f4f5eaebe8e9eeefecede2e3e0e1e6e7e4e5"
    );

    #[test]
    fn cra_challenge_matches_known_text() {
        let challenge = cra_challenge(
            "joe",
            "frontend",
            "wampcra",
            "static",
            4_391_174_163_346_446,
            NONCE,
            "2026-12-06T18:30:00.123Z",
        );
        assert_eq!(challenge, CHALLENGE);
    }

    #[test]
    fn cra_challenge_is_json_with_every_field() {
        let nonce = new_nonce();
        let timestamp = utc_timestamp();
        let challenge = cra_challenge(
            "jo\"e\\ü",
            "frontend",
            "wampcra",
            "static",
            u64::from(u32::MAX) + 7,
            &nonce,
            &timestamp,
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&challenge).expect("challenge is JSON");
        let object = parsed.as_object().expect("challenge is an object");
        assert_eq!(object.len(), 7);
        assert_eq!(object["authid"], "jo\"e\\ü");
        assert_eq!(object["authrole"], "frontend");
        assert_eq!(object["authmethod"], "wampcra");
        assert_eq!(object["authprovider"], "static");
        assert_eq!(object["nonce"], nonce.as_str());
        assert_eq!(object["timestamp"], timestamp.as_str());
        assert_eq!(object["session"], u64::from(u32::MAX) + 7);
    }

    #[test]
    fn nonces_are_long_and_fresh() {
        let first = new_nonce();
        assert_eq!(first.len(), 64);
        assert!(BASE64.decode(&first).is_ok_and(|raw| raw.len() == 48));
        assert_ne!(first, new_nonce());
    }

    #[test]
    fn timestamp_format() {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(1_796_581_800_123_456_789)
            .expect("valid instant");
        assert_eq!(format_timestamp(at), "2026-12-06T18:30:00.123Z");

        let now = utc_timestamp();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'), "{now}");
        assert_eq!(&now[10..11], "T", "{now}");
        assert_eq!(&now[19..20], ".", "{now}");
    }

    #[test]
    fn derive_key_matches_autobahn() {
        // derive_key('secret2', 'salt123', 1000, 32): the defaults.
        assert_eq!(
            derive_key(
                "secret2",
                "salt123",
                CRA_DEFAULT_ITERATIONS,
                CRA_DEFAULT_KEYLEN
            )
            .as_deref(),
            Some("nythvFZ7EuM5sPCQrrgnz1oJiZXUNcZZFlDIdGSiNUs=")
        );
        assert_eq!(
            derive_key("secret2", "salt123", 100, 16).as_deref(),
            Some(SALTED_KEY)
        );
        // derive_key('pässwörd', 'sälz', 1000, 32): UTF-8 bytes of both.
        assert_eq!(
            derive_key("pässwörd", "sälz", 1000, 32).as_deref(),
            Some("huILEu3UvxJKz9ice7QNb0Xs3l0FWQG39DTor+ngMXc=")
        );
    }

    #[test]
    fn derive_key_rejects_unusable_parameters() {
        assert_eq!(derive_key("secret2", "salt123", 0, 32), None);
        assert_eq!(derive_key("secret2", "salt123", 1000, 0), None);
        assert_eq!(
            derive_key("secret2", "salt123", 1, CRA_MAX_KEYLEN + 1),
            None
        );
        assert!(derive_key("secret2", "salt123", 1, CRA_MAX_KEYLEN).is_some());
    }

    #[test]
    fn cra_signature_unsalted_matches_autobahn() {
        assert_eq!(cra_signature(b"secret2", CHALLENGE), UNSALTED_SIGNATURE);
    }

    #[test]
    fn cra_signature_salted_uses_the_base64_text_as_key() {
        let key = derive_key("secret2", "salt123", 100, 16).expect("valid parameters");
        assert_eq!(cra_signature(key.as_bytes(), CHALLENGE), SALTED_SIGNATURE);
        // The raw PBKDF2 bytes are *not* the key.
        let raw = BASE64.decode(&key).expect("base64");
        assert_ne!(cra_signature(&raw, CHALLENGE), SALTED_SIGNATURE);
    }

    #[test]
    fn cra_verify_accepts_only_the_exact_signature() {
        assert!(cra_verify(b"secret2", CHALLENGE, UNSALTED_SIGNATURE));
        assert!(cra_verify(
            SALTED_KEY.as_bytes(),
            CHALLENGE,
            SALTED_SIGNATURE
        ));

        let mut flipped = UNSALTED_SIGNATURE.to_owned();
        flipped.replace_range(0..1, "y");
        assert!(!cra_verify(b"secret2", CHALLENGE, &flipped));
        assert!(!cra_verify(b"secret3", CHALLENGE, UNSALTED_SIGNATURE));
        assert!(!cra_verify(
            b"secret2",
            &CHALLENGE.replace("joe", "jim"),
            UNSALTED_SIGNATURE
        ));
        assert!(!cra_verify(b"secret2", CHALLENGE, ""));
        assert!(!cra_verify(
            b"secret2",
            CHALLENGE,
            &format!("{UNSALTED_SIGNATURE}\n")
        ));
        assert!(!cra_verify(
            b"secret2",
            CHALLENGE,
            UNSALTED_SIGNATURE.trim_end_matches('=')
        ));
    }

    #[test]
    fn cryptosign_challenge_is_32_random_bytes_in_lower_hex() {
        let challenge = cryptosign_challenge();
        assert_eq!(challenge.len(), 64);
        assert!(
            challenge
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_ne!(challenge, cryptosign_challenge());
    }

    #[test]
    fn cryptosign_verify_accepts_autobahn_signature() {
        assert!(cryptosign_verify(PUBKEY, CS_CHALLENGE, CS_SIGNATURE));
        // The bare 64-byte signature.
        assert!(cryptosign_verify(
            PUBKEY,
            CS_CHALLENGE,
            &CS_SIGNATURE[..128]
        ));
        // Hex is case-insensitive, as in autobahn and Crossbar.
        assert!(cryptosign_verify(
            &PUBKEY.to_uppercase(),
            &CS_CHALLENGE.to_uppercase(),
            &CS_SIGNATURE.to_uppercase()
        ));
    }

    #[test]
    fn cryptosign_verify_rejects_wrong_key_or_challenge() {
        assert!(!cryptosign_verify(OTHER_PUBKEY, CS_CHALLENGE, CS_SIGNATURE));
        let other_challenge = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbeff";
        assert!(!cryptosign_verify(PUBKEY, other_challenge, CS_SIGNATURE));
        assert!(!cryptosign_verify(
            PUBKEY,
            other_challenge,
            &CS_SIGNATURE[..128]
        ));
        // A valid signature whose appended message is not the challenge.
        let wrong_message = format!("{}{}", &CS_SIGNATURE[..128], other_challenge);
        assert!(!cryptosign_verify(PUBKEY, CS_CHALLENGE, &wrong_message));
        // One flipped bit in the signature itself.
        let flipped = format!("00{}", &CS_SIGNATURE[2..]);
        assert!(!cryptosign_verify(PUBKEY, CS_CHALLENGE, &flipped));
    }

    #[test]
    fn cryptosign_verify_rejects_channel_bound_signature() {
        assert!(!cryptosign_verify(
            PUBKEY,
            CS_CHALLENGE,
            CS_CHANNEL_BOUND_SIGNATURE
        ));
        assert!(!cryptosign_verify(
            PUBKEY,
            CS_CHALLENGE,
            &CS_CHANNEL_BOUND_SIGNATURE[..128]
        ));
    }

    #[test]
    fn cryptosign_verify_rejects_malformed_input() {
        let signature = CS_SIGNATURE;
        let odd = |s: &str| s[..s.len() - 1].to_owned();
        let non_hex = |s: &str| format!("{}zz", &s[..s.len() - 2]);
        let multibyte = |s: &str| format!("{}é", &s[..s.len() - 2]);

        for (pubkey, challenge, signature) in [
            (odd(PUBKEY), CS_CHALLENGE.to_owned(), signature.to_owned()),
            (PUBKEY.to_owned(), odd(CS_CHALLENGE), signature.to_owned()),
            (PUBKEY.to_owned(), CS_CHALLENGE.to_owned(), odd(signature)),
            (
                non_hex(PUBKEY),
                CS_CHALLENGE.to_owned(),
                signature.to_owned(),
            ),
            (
                PUBKEY.to_owned(),
                non_hex(CS_CHALLENGE),
                signature.to_owned(),
            ),
            (
                PUBKEY.to_owned(),
                CS_CHALLENGE.to_owned(),
                non_hex(signature),
            ),
            (
                PUBKEY.to_owned(),
                CS_CHALLENGE.to_owned(),
                non_hex(&signature[..128]),
            ),
            (
                PUBKEY.to_owned(),
                CS_CHALLENGE.to_owned(),
                multibyte(signature),
            ),
            (String::new(), CS_CHALLENGE.to_owned(), signature.to_owned()),
            (PUBKEY.to_owned(), String::new(), signature.to_owned()),
            (PUBKEY.to_owned(), CS_CHALLENGE.to_owned(), String::new()),
            (String::new(), String::new(), String::new()),
            // Right bytes, wrong lengths: a 16-byte challenge, a 33-byte key,
            // a signature with one byte too many.
            (
                PUBKEY.to_owned(),
                CS_CHALLENGE[..32].to_owned(),
                signature.to_owned(),
            ),
            (
                format!("{PUBKEY}00"),
                CS_CHALLENGE.to_owned(),
                signature.to_owned(),
            ),
            (
                PUBKEY.to_owned(),
                CS_CHALLENGE.to_owned(),
                format!("{signature}00"),
            ),
        ] {
            assert!(
                !cryptosign_verify(&pubkey, &challenge, &signature),
                "accepted {pubkey:?} {challenge:?} {signature:?}"
            );
        }
    }

    #[test]
    fn parse_pubkey_wants_exactly_32_hex_bytes() {
        let parsed = parse_pubkey(PUBKEY).expect("valid key");
        assert_eq!(hex_lower(&parsed), PUBKEY);
        assert_eq!(parse_pubkey(&PUBKEY.to_uppercase()), Some(parsed));
        assert_eq!(parse_pubkey(""), None);
        assert_eq!(parse_pubkey(&PUBKEY[..63]), None);
        assert_eq!(parse_pubkey(&PUBKEY[..62]), None);
        assert_eq!(parse_pubkey(&format!("{PUBKEY}00")), None);
        assert_eq!(parse_pubkey(&format!("0x{}", &PUBKEY[2..])), None);
        assert_eq!(parse_pubkey(&format!(" {}", &PUBKEY[1..])), None);
    }
}
