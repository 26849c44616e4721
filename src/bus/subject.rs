//! Any text as one NATS subject token, for the front-ends' subjects.
//!
//! A NATS token is non-empty and holds no `.`, `*`, `>` or whitespace.
//! Text is written byte by byte: printable ASCII (`!` to `~`) stays itself
//! except `.`, `*`, `>` and the escape `%`; every other byte becomes `%`
//! and two upper-case hex digits; empty text is `%` alone. The mapping is
//! one to one: only the spelling [`push_token`] writes decodes.

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Whether a byte stands for itself in a token.
fn raw(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && !matches!(b, b'.' | b'*' | b'>' | b'%')
}

/// Appends `text`'s token to `out`.
pub fn push_token(out: &mut String, text: &str) {
    if text.is_empty() {
        out.push('%');
        return;
    }
    for &b in text.as_bytes() {
        if raw(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// `text` as a token.
pub fn token(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    push_token(&mut s, text);
    s
}

/// The bytes a token stands for, appended to `out`.
pub fn decode_token(token: &str, out: &mut Vec<u8>) -> Result<(), &'static str> {
    if token == "%" {
        return Ok(());
    }
    let bytes = token.as_bytes();
    if bytes.is_empty() {
        return Err("an empty subject token");
    }
    let hex = |c: u8| HEX.iter().position(|&h| h == c);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err("a bad escape in a subject token");
            };
            let decoded = (hi as u8) << 4 | lo as u8;
            if raw(decoded) {
                return Err("an escape of a byte that stands for itself");
            }
            out.push(decoded);
            i += 3;
        } else if raw(b) {
            out.push(b);
            i += 1;
        } else {
            return Err("a byte that must be escaped");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_becomes_one_token_and_back() {
        for text in ["", "realm1", "a.b*c>d", "sp ace", "%25", "ünï日本", "x\0y"] {
            let t = token(text);
            assert!(!t.is_empty());
            assert!(
                t.bytes()
                    .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'.' | b'*' | b'>')),
                "{text:?}: {t}"
            );
            let mut back = Vec::new();
            decode_token(&t, &mut back).unwrap();
            assert_eq!(back, text.as_bytes());
        }
        assert_eq!(token("com.x"), "com%2Ex");
        for bad in ["", "a%2e", "%61", "a%", "a.b", "a b", "%G0"] {
            assert!(decode_token(bad, &mut Vec::new()).is_err(), "{bad}");
        }
    }
}
