//! Request limits of the listener: target length, header count and size,
//! declared body size. (Streamed bodies are counted by
//! `RequestBody` as they pass; hyper enforces far-out parser limits itself.)

use super::error::GatewayError;
use crate::config::Limits;

/// What the limits are checked against.
pub(super) struct Sizes {
    pub uri: usize,
    pub fields: usize,
    pub field_bytes: usize,
    pub declared_body: Option<u64>,
}

pub(super) fn check_sizes(limits: &Limits, sizes: &Sizes) -> Result<(), GatewayError> {
    let uri_limit = limits.max_uri_bytes.as_usize();
    if sizes.uri > uri_limit {
        return Err(GatewayError::UriTooLong { limit: uri_limit });
    }
    if sizes.fields > limits.max_headers {
        return Err(GatewayError::HeadersTooLarge {
            limit: limits.max_headers,
            what: "headers",
        });
    }
    let header_limit = limits.max_header_bytes.as_usize();
    if sizes.field_bytes > header_limit {
        return Err(GatewayError::HeadersTooLarge {
            limit: header_limit,
            what: "bytes",
        });
    }
    let body_limit = limits.max_body_bytes.as_usize();
    if sizes.declared_body.is_some_and(|n| n > body_limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit: body_limit });
    }
    Ok(())
}
