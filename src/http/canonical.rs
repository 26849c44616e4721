//! The canonical form of a request: its path and its authority, decided
//! once. Routing, policy, the log and forwarding all read this one form, so
//! no spelling of a path or host can reach a route its canonical form would
//! not, nor be routed by one name and forwarded under another.
//!
//! Path (RFC 3986 §6.2.2, as nginx does it):
//! - escapes of unreserved characters are decoded (`%61` is `a`), other
//!   escapes kept with upper-case hex (`%2f` is `%2F`); raw bytes a path
//!   may not hold (RFC 3986 `pchar`: `#`, `"`, `{`, non-ASCII, ...) are
//!   escaped;
//! - `.` and `..` segments are resolved; `..` above the root is refused;
//! - repeated `/` are merged;
//! - an escaped `/` or `\` (`%2F`, `%5C`) stays escaped, so it never
//!   separates segments; a route takes it only with `encoded_slashes: keep`.
//!   A raw `\`, a malformed escape, or an escaped NUL is refused.
//!
//! Authority: no userinfo; a host name of letters, digits, `-`, `.` and
//! `_`, or an IP literal in brackets; a port of digits. The host is
//! lower-cased and a trailing dot removed.

use std::borrow::Cow;

/// Why a path or authority has no canonical form (the caller gets a 400).
pub type Refusal = &'static str;

/// A request path in canonical form.
#[derive(Debug, PartialEq, Eq)]
pub struct Path<'a> {
    pub path: Cow<'a, str>,
    /// It holds an escaped `/` or `\`.
    pub encoded_slash: bool,
}

/// The canonical form of `raw`, a path (no query) as the request target
/// gives it. Borrows `raw` when it is canonical already, as most are.
pub fn path(raw: &str) -> Result<Path<'_>, Refusal> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err("the path must start with `/`");
    }
    if is_canonical(bytes) {
        return Ok(Path {
            path: Cow::Borrowed(raw),
            encoded_slash: false,
        });
    }
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    // Where each kept segment starts in `out` (its leading `/`), for `..`.
    let mut starts: Vec<usize> = Vec::new();
    let mut encoded_slash = false;
    let mut segment: Vec<u8> = Vec::new();
    let segments = bytes[1..].split(|b| *b == b'/');
    let count = bytes[1..].split(|b| *b == b'/').count();
    for (i, raw_segment) in segments.enumerate() {
        let last = i + 1 == count;
        segment.clear();
        let mut j = 0;
        while j < raw_segment.len() {
            let b = raw_segment[j];
            match b {
                b'%' => {
                    let hex = raw_segment.get(j + 1..j + 3).ok_or("malformed %-escape")?;
                    let value = (hex_value(hex[0]).ok_or("malformed %-escape")? << 4)
                        | hex_value(hex[1]).ok_or("malformed %-escape")?;
                    if value == 0 {
                        return Err("the path holds an escaped NUL");
                    }
                    if is_unreserved(value) {
                        segment.push(value);
                    } else {
                        encoded_slash |= value == b'/' || value == b'\\';
                        push_escape(&mut segment, value);
                    }
                    j += 3;
                    continue;
                }
                b'\\' => return Err("the path holds a `\\`"),
                _ if is_pchar(b) => segment.push(b),
                _ => push_escape(&mut segment, b),
            }
            j += 1;
        }
        match &segment[..] {
            b"" if !last => {}
            b"." => {
                if last {
                    out.push(b'/');
                }
            }
            b".." => {
                let start = starts.pop().ok_or("the path climbs above the root")?;
                out.truncate(start);
                if last {
                    out.push(b'/');
                }
            }
            _ => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(&segment);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    // Printable ASCII and escapes only.
    let path = String::from_utf8(out).map_err(|_| "the path is not text")?;
    Ok(Path {
        path: Cow::Owned(path),
        encoded_slash,
    })
}

/// No escape, no repeated `/`, no `.` or `..` segment, only `pchar`s and
/// `/`: canonical as it is.
fn is_canonical(bytes: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'\\' => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' => {
                // `/.` then the end or `/`, or `/..` then the end or `/`.
                let rest = &bytes[i + 1..];
                let after = if rest.first() == Some(&b'.') {
                    &rest[1..]
                } else {
                    rest
                };
                if after.is_empty() || after[0] == b'/' {
                    return false;
                }
            }
            _ if b == b'/' || is_pchar(b) => {}
            _ => return false,
        }
        prev = b;
    }
    true
}

/// A byte a path segment may hold as it is (RFC 3986 `pchar`, less
/// escapes).
fn is_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
}

/// A request's authority in canonical form.
#[derive(Debug, PartialEq, Eq)]
pub struct Authority<'a> {
    raw: &'a str,
    /// Lower-case, without a trailing dot; an IP literal keeps its brackets.
    pub host: Cow<'a, str>,
    /// As sent, digits only; `None` when absent or empty.
    pub port: Option<&'a str>,
}

impl<'a> Authority<'a> {
    /// Whether `raw` is canonical as it is (so [`Authority::again`] may
    /// stand for [`authority`] on the same text).
    pub fn as_sent(&self) -> bool {
        matches!(self.host, Cow::Borrowed(_))
            && self.raw.len() == self.host.len() + self.port.map_or(0, |p| p.len() + 1)
    }

    /// The form of `raw`, known to be canonical as sent with its host
    /// ending at `host_len` (a connection's repeat of its last Host).
    pub fn again(raw: &'a str, host_len: usize) -> Authority<'a> {
        Authority {
            raw,
            host: Cow::Borrowed(&raw[..host_len]),
            port: raw.get(host_len + 1..).filter(|p| !p.is_empty()),
        }
    }

    /// `host[:port]`: what the target's Host and `X-Forwarded-Host` say.
    pub fn render(&self) -> Cow<'_, str> {
        let whole = self.host.len() + self.port.map_or(0, |p| p.len() + 1);
        match (&self.host, self.port) {
            // Most authorities come canonical: no copy.
            (Cow::Borrowed(_), _) if self.raw.len() == whole => Cow::Borrowed(self.raw),
            (_, None) => Cow::Borrowed(&self.host),
            (_, Some(port)) => Cow::Owned(format!("{}:{port}", self.host)),
        }
    }
}

/// The canonical form of an authority (a Host field's value, the
/// absolute-form target's, or HTTP/2's `:authority`).
pub fn authority(raw: &str) -> Result<Authority<'_>, Refusal> {
    if raw.starts_with('[') {
        return ip_literal(raw);
    }
    // One pass over a table (this runs on every request): the host's
    // bytes checked, upper case and repeated dots noted, the port found.
    let bytes = raw.as_bytes();
    let (mut seen, mut dots, mut colon) = (0u8, false, None);
    let mut prev = DOT;
    for (i, &b) in bytes.iter().enumerate() {
        let class = HOST_BYTE[usize::from(b)];
        if class == COLON {
            colon = Some(i);
            break;
        }
        seen |= class;
        dots |= (class & prev) == DOT;
        prev = class;
    }
    if seen & INVALID != 0 || dots {
        return Err("the host is not a host name");
    }
    let upper = seen & UPPER != 0;
    let host_end = colon.unwrap_or(bytes.len());
    let port = match colon {
        None => None,
        Some(c) => port(&raw[c + 1..])?,
    };
    // A trailing dot names the same host.
    let name = &raw[..host_end];
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("the host is empty");
    }
    Ok(Authority {
        raw,
        host: if upper {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        },
        port,
    })
}

// Classes of a host name's bytes, as bits (see `HOST_BYTE`).
const NAME: u8 = 1;
const UPPER: u8 = 2;
const DOT: u8 = 4;
const COLON: u8 = 8;
const INVALID: u8 = 16;

/// What each byte is in a host name: letters, digits, `-` and `_`, dots,
/// the port's colon; anything else is invalid.
static HOST_BYTE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => NAME,
            b'A'..=b'Z' => UPPER,
            b'.' => DOT,
            b':' => COLON,
            _ => INVALID,
        };
        b += 1;
    }
    table
};

fn ip_literal(raw: &str) -> Result<Authority<'_>, Refusal> {
    let end = raw.find(']').ok_or("an IP literal without `]`")?;
    let literal = &raw[1..end];
    if literal.is_empty()
        || !literal
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    {
        return Err("a malformed IP literal");
    }
    let port = match &raw[end + 1..] {
        "" => None,
        rest => port(rest.strip_prefix(':').ok_or("junk after the IP literal")?)?,
    };
    Ok(Authority {
        raw,
        host: lower(&raw[..=end]),
        port,
    })
}

/// A port: digits, at most 65535; empty is none.
fn port(p: &str) -> Result<Option<&str>, Refusal> {
    if p.is_empty() {
        return Ok(None);
    }
    let digits = p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    match p.parse::<u32>() {
        Ok(n) if digits && n <= 65535 => Ok(Some(p)),
        _ => Err("the port is not a number"),
    }
}

fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(raw: &str) -> Result<String, Refusal> {
        path(raw).map(|p| p.path.into_owned())
    }

    #[test]
    fn paths_take_one_form() {
        for (raw, canonical) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//admin/x", "/admin/x"),
            ("/admin//x", "/admin/x"),
            ("/admin///", "/admin/"),
            ("/%61dmin/x", "/admin/x"),
            ("/%41%44MIN", "/ADMIN"),
            ("/a/./b", "/a/b"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/../admin", "/admin"),
            ("/a/%2e%2E/admin", "/admin"),
            ("/a/.%2e/admin", "/admin"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a..b/...", "/a..b/..."),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/~user/%7e", "/~user/~"),
            ("/..a", "/..a"),
            ("/a#/../b", "/b"),
            ("/a b{}", "/a%20b%7B%7D"),
            ("/a:b@c;d=e,f", "/a:b@c;d=e,f"),
            ("/.", "/"),
        ] {
            assert_eq!(canon(raw).as_deref(), Ok(canonical), "{raw}");
            // Canonical is a fixed point.
            assert_eq!(canon(canonical).as_deref(), Ok(canonical), "{canonical}");
        }
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for raw in ["/", "/a/b", "/a/b/", "/.well-known/x", "/a..b", "/a:b@c"] {
            assert!(matches!(path(raw).unwrap().path, Cow::Borrowed(_)), "{raw}");
        }
    }

    #[test]
    fn encoded_separators_are_kept_and_flagged() {
        for raw in ["/admin%2fx", "/%2Fadmin/x", "/a%5cb", "/a%5Cb"] {
            let p = path(raw).unwrap();
            assert!(p.encoded_slash, "{raw}");
            assert!(!p.path.contains("//"), "{raw}");
        }
        assert!(!path("/a%20b").unwrap().encoded_slash);
    }

    #[test]
    fn some_paths_have_no_canonical_form() {
        for raw in [
            "", "a/b", "*", "/..", "/a/../..", "/%2e%2e", "/a\\b", "/a%", "/a%2", "/a%zz", "/a%00b",
        ] {
            assert!(path(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn authorities_take_one_form() {
        for (raw, host, port) in [
            ("api.example", "api.example", None),
            ("API.Example.", "api.example", None),
            ("api.example:8082", "api.example", Some("8082")),
            ("api.example.:80", "api.example", Some("80")),
            ("api.example:", "api.example", None),
            ("tasks.my_svc", "tasks.my_svc", None),
            ("127.0.0.1:9", "127.0.0.1", Some("9")),
            ("[::1]", "[::1]", None),
            ("[::1]:8082", "[::1]", Some("8082")),
            ("[FE80::1]", "[fe80::1]", None),
        ] {
            let a = authority(raw).unwrap();
            assert_eq!((&*a.host, a.port), (host, port), "{raw}");
        }
        assert_eq!(authority("A.b.:81").unwrap().render(), "a.b:81");
        assert_eq!(authority("a.b:").unwrap().render(), "a.b");
        // What a connection remembers stands for the whole reading.
        for raw in ["a.b:81", "a.b", "[::1]:9", "tasks.x_y"] {
            let a = authority(raw).unwrap();
            assert!(a.as_sent(), "{raw}");
            assert_eq!(Authority::again(raw, a.host.len()), a, "{raw}");
        }
        for raw in ["A.b", "a.b.", "a.b:", "a.b.:80"] {
            assert!(!authority(raw).unwrap().as_sent(), "{raw}");
        }
        assert!(matches!(
            authority("a.b:81").unwrap().render(),
            Cow::Borrowed("a.b:81")
        ));
        assert!(matches!(
            authority("[::1]:81").unwrap().render(),
            Cow::Borrowed("[::1]:81")
        ));
        for raw in [
            "",
            ":80",
            ".",
            "a..b",
            ".a",
            "user@host",
            "a b",
            "a,b",
            "a/b",
            "h:1:2",
            "h:x",
            "h:99999",
            "[::1",
            "[zz]",
            "[::1]x",
            "h\u{e9}",
            "a%41",
            "[]",
        ] {
            assert!(authority(raw).is_err(), "{raw:?}");
        }
    }

    proptest::proptest! {
        /// The canonical form is its own canonical form, with no repeated
        /// `/`, no dot segment, no escape of a byte that may stand as it
        /// is, and hex in upper case.
        #[test]
        fn the_canonical_form_is_a_fixed_point(raw in "/[a-zA-Z0-9%./\\\\_~:@!$&'()*+,;= #-]{0,40}") {
            if let Ok(p) = path(&raw) {
                let again = path(&p.path).expect("a canonical path has a canonical form");
                proptest::prop_assert_eq!(&again.path, &p.path);
                proptest::prop_assert!(!p.path.contains("//") || p.path == "//", "{}", p.path);
                proptest::prop_assert!(!p.path.split('/').any(|s| s == "." || s == ".."), "{}", p.path);
                let bytes = p.path.as_bytes();
                for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'%') {
                    let hex = &bytes[i + 1..i + 3];
                    proptest::prop_assert!(hex.iter().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)), "{}", p.path);
                    let value = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
                    proptest::prop_assert!(!is_unreserved(value), "{}", p.path);
                }
            }
        }

        /// A host name in any case, with or without its trailing dot and
        /// port, names the same host.
        #[test]
        fn hosts_differing_in_case_or_a_dot_are_one(host in "[a-z][a-z0-9-]{0,10}(\\.[a-z0-9-]{1,8}){0,3}", upper in proptest::prelude::any::<u32>(), dot in proptest::prelude::any::<bool>(), port in proptest::option::of(1u16..)) {
            let spelled: String = host
                .chars()
                .enumerate()
                .map(|(i, c)| if upper >> (i % 32) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                .collect();
            let mut raw = spelled.clone();
            if dot {
                raw.push('.');
            }
            if let Some(port) = port {
                raw.push_str(&format!(":{port}"));
            }
            let a = authority(&raw).unwrap();
            proptest::prop_assert_eq!(&*a.host, host.as_str());
            proptest::prop_assert_eq!(a.port.map(|p| p.parse::<u16>().unwrap()), port);
        }
    }
}
