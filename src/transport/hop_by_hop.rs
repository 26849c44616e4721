//! Hop-by-hop header fields (RFC 9110 §7.6.1): they describe one
//! connection and never cross a proxy or a tunnel. The one rule, for the
//! gateway's requests and responses and for the tunnel's peers.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers that never cross the proxy, besides those the
/// `Connection` header names.
/// `Connection` must stay first and `Transfer-Encoding` last: indexes below.
const HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TRAILER,
    &header::UPGRADE,
    &header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers. With `upgrade`, the `Upgrade` header and
/// `Connection: upgrade` are kept so the protocol switch reaches the peer.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names finds what is present, so absent headers cost
    // no lookups (most messages carry one hop-by-hop header or none).
    let mut present = [false; HOP_BY_HOP.len()];
    let mut te = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present[i] = true;
        } else if name == header::TE {
            te = true;
        }
    }
    // Headers named by Connection are hop-by-hop too (`keep-alive`, `close`
    // and `upgrade` name nothing else to remove).
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !(t.eq_ignore_ascii_case("keep-alive")
                    || t.eq_ignore_ascii_case("close")
                    || t.eq_ignore_ascii_case("upgrade"))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    // A message framed by Transfer-Encoding that also carries Content-Length
    // (a smuggling attempt or a broken peer): the length was not used to read
    // it and must not travel on (RFC 9112 §6.3); the next hop frames it anew.
    if present[7] {
        headers.remove(header::CONTENT_LENGTH);
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        if !(upgrade && **name == header::UPGRADE) {
            headers.remove(*name);
        }
    }
    // `TE: trailers` is end-to-end meaningful (gRPC); any other TE is not.
    if te
        && headers
            .get(header::TE)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a field is one [`strip_hop_by_hop`] may remove by its name
/// alone (`TE` included), besides those `Connection` names.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name) || *name == header::TE
}

/// [`is_hop_by_hop`] for a name as it came off the wire, in any case.
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
        || name.eq_ignore_ascii_case(b"te")
}
