//! `x-request-id`: propagated when the client sent a sane one, generated
//! otherwise; set on the upstream request and on the response.

use http::HeaderValue;

const MAX_LEN: usize = 128;

/// Whether a client's request id is kept: short, visible ASCII.
pub(super) fn acceptable(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

/// 128 random bits as 32 hex digits.
pub fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits = fastrand::u128(..);
    let mut out = [0u8; 32];
    for b in out.iter_mut().rev() {
        *b = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&out).expect("hex digits are a valid header value")
}
