//! HTTP/1.1 on the wire, shared by tollgate's own server loop
//! (`http::h1`) and upstream client (`upstream::h1`): header fields
//! from httparse into `http` types, and the lines both write.

use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

use super::router::FieldLookup;

/// A parsed header: its name, and where its value lies in the parsed buffer.
pub type Field = (HeaderName, Range<usize>);

/// A request head in wire form: its bytes, and where its fields' values
/// lie in them. tollgate's HTTP/1 loop keeps the head as read; a request
/// hyper read is written into this form ([`RequestHead::from_parts`]).
pub struct RequestHead {
    pub head: Bytes,
    pub method: Method,
    /// As the client sent it (origin-form, absolute-form, or the URI of an
    /// HTTP/2 request); shares `head` when read by the loop.
    pub uri: Uri,
    pub version: Version,
    pub fields: Vec<Field>,
}

impl RequestHead {
    pub fn value(&self, field: &Field) -> &[u8] {
        &self.head[field.1.clone()]
    }

    /// The first `name` field's value.
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| f.0 == name)
            .map(|f| self.value(f))
    }

    /// A request hyper read, in wire form: its field values laid end to end.
    pub fn from_parts(parts: http::request::Parts) -> RequestHead {
        let size = parts.headers.iter().map(|(_, v)| v.len()).sum();
        let mut values = BytesMut::with_capacity(size);
        let mut fields: Vec<Field> = Vec::with_capacity(parts.headers.len());
        let mut cookies: Option<usize> = None;
        for (name, value) in &parts.headers {
            // HTTP/2 splits `cookie` into a field per pair; HTTP/1.1 wants
            // them joined into one (RFC 9113 §8.2.3).
            if name == http::header::COOKIE {
                // A map yields a name's values one after another.
                if let Some(at) = cookies.filter(|at| at + 1 == fields.len()) {
                    values.put_slice(b"; ");
                    values.put_slice(value.as_bytes());
                    fields[at].1.end = values.len();
                    continue;
                }
                cookies = Some(fields.len());
            }
            let start = values.len();
            values.put_slice(value.as_bytes());
            fields.push((name.clone(), start..values.len()));
        }
        RequestHead {
            head: values.freeze(),
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            fields,
        }
    }

    /// As an `http` request with `body`, for a service served on the
    /// listener (the token server); `None` if `http` refuses a value.
    pub fn to_request<B>(&self, body: B) -> Option<Request<B>> {
        let headers = header_map(&self.head, self.fields.iter().cloned(), self.fields.len())?;
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = headers;
        Some(request)
    }
}

impl FieldLookup for RequestHead {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> {
        self.fields
            .iter()
            .filter(move |f| f.0 == name)
            .map(|f| self.value(f))
    }

    fn first<'a>(&'a self, name: &HeaderName) -> Option<&'a [u8]> {
        self.get(name)
    }
}

/// Names and value positions of `headers`, which httparse parsed from
/// `buf`; `None` if `http` refuses a name.
pub fn fields(buf: &[u8], headers: &[httparse::Header<'_>]) -> Option<Vec<Field>> {
    let base = buf.as_ptr() as usize;
    // One allocation: collecting into `Option<Vec>` would grow it step by step.
    let mut fields = Vec::with_capacity(headers.len());
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let start = h.value.as_ptr() as usize - base;
        fields.push((name, start..start + h.value.len()));
    }
    Some(fields)
}

/// The elements of a comma-separated field value (RFC 9110 §5.6.1),
/// trimmed; empty elements, which a recipient must accept, are skipped.
pub fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The header map of a head split off its buffer, with room for
/// `capacity` fields; the values share the head's bytes. `None` if `http`
/// refuses a value.
pub fn header_map(
    head: &Bytes,
    fields: impl IntoIterator<Item = Field>,
    capacity: usize,
) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(capacity);
    for (name, range) in fields {
        map.append(
            name,
            HeaderValue::from_maybe_shared(head.slice(range)).ok()?,
        );
    }
    Some(map)
}

/// A target's response fields as they came (less hop-by-hop fields and
/// those tollgate sets itself), for the direct path: written to the client
/// from the target's bytes, then `Via` and the request id, with no header
/// map built. The response's body carries them
/// (`ProxyBody::response_lines`), having read them; the response's map
/// stays empty.
#[derive(Clone, Default)]
pub struct ResponseLines {
    /// The `x-request-id` tollgate answers with, set by the direct path.
    pub request_id: Option<HeaderValue>,
    /// The response head the lines lie in.
    pub head: Bytes,
    /// Runs of kept lines (CRLF included) in `head`.
    runs: [(u32, u32); MAX_RUNS],
    count: usize,
    /// The one `Content-Length` among them, parsed.
    pub content_length: Option<u64>,
    pub has_date: bool,
}

/// Heads whose kept lines fall into more runs than this take the map.
const MAX_RUNS: usize = 4;

impl ResponseLines {
    /// Keeps the line at `start..end` of the head (lines come in order);
    /// `false` when that would make more than [`MAX_RUNS`] runs.
    pub fn keep(&mut self, start: usize, end: usize) -> bool {
        // Response heads are at most 64 KiB: offsets fit.
        let (start, end) = (start as u32, end as u32);
        match self.count {
            n if n > 0 && self.runs[n - 1].1 == start => self.runs[n - 1].1 = end,
            MAX_RUNS => return false,
            n => {
                self.runs[n] = (start, end);
                self.count += 1;
            }
        }
        true
    }

    /// The kept lines, in order, as runs of bytes.
    pub fn runs(&self) -> impl Iterator<Item = &[u8]> {
        self.runs[..self.count]
            .iter()
            .map(|&(start, end)| &self.head[start as usize..end as usize])
    }
}

/// The header map of field lines this hop wrote (`name: value\r\n`
/// each), for the clients that take a map; a line `http` refuses is left
/// out (none is: every value was checked where it was written or read).
pub fn parse_lines(lines: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(16);
    for line in lines.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

/// One Content-Length value: decimal digits, optionally padded.
pub fn length_value(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Writes header fields as HTTP/1.1 lines (`name: value\r\n`).
pub fn put_fields(out: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        put_field(out, name, value.as_bytes());
    }
}

/// Writes one header field as an HTTP/1.1 line.
pub fn put_field(out: &mut BytesMut, name: &HeaderName, value: &[u8]) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Writes `name: n\r\n` with `n` in decimal, without allocating.
pub fn put_length_field(out: &mut BytesMut, name: &str, n: u64) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(crate::telemetry::decimal(n, &mut [0; 20]));
    out.put_slice(b"\r\n");
}

/// The size line of a chunk of `len` bytes (`{hex}\r\n`), in `buf`.
pub fn chunk_size_line(mut len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len() - 2;
    buf[i..].copy_from_slice(b"\r\n");
    loop {
        i -= 1;
        buf[i] = HEX[len & 0xf];
        len >>= 4;
        if len == 0 {
            return &buf[i..];
        }
    }
}

/// A chunk-size line or the trailer section may not be longer than this.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// Decodes what it can of a chunked body at the front of `buf`: the next
/// state and any data. `Chunk::Trailers` is left for `trailers_end`.
pub fn decode_chunk(
    buf: &mut BytesMut,
    state: Chunk,
) -> Result<(Chunk, Option<Bytes>), &'static str> {
    match state {
        Chunk::Size => match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((used, size))) => {
                buf.advance(used);
                Ok((
                    if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    },
                    None,
                ))
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                Err("chunk-size line too long")
            }
            Ok(httparse::Status::Partial) => Ok((Chunk::Size, None)),
            Err(_) => Err("malformed chunk size"),
        },
        Chunk::Data(left) if !buf.is_empty() => {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let data = buf.split_to(n).freeze();
            let next = if left == n as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - n as u64)
            };
            Ok((next, Some(data)))
        }
        Chunk::DataEnd if buf.len() >= 2 => {
            if &buf[..2] != b"\r\n" {
                return Err("chunk data not followed by CRLF");
            }
            buf.advance(2);
            Ok((Chunk::Size, None))
        }
        other => Ok((other, None)),
    }
}

/// Skips the trailer section (trailers are not forwarded). True once its
/// closing empty line has been consumed.
pub fn trailers_end(buf: &mut BytesMut) -> Result<bool, &'static str> {
    loop {
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            if buf.len() > MAX_TRAILERS {
                return Err("trailer section too large");
            }
            return Ok(false);
        };
        buf.advance(eol + 2);
        if eol == 0 {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_elements_are_trimmed_and_empty_ones_skipped() {
        let found: Vec<&[u8]> = list_elements(b" keep-alive ,, Close,\t").collect();
        assert_eq!(found, [&b"keep-alive"[..], b"Close"]);
        assert_eq!(list_elements(b" , ").count(), 0);
    }

    #[test]
    fn fields_render_as_http1_lines() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = BytesMut::new();
        put_fields(&mut out, &headers);
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            put_length_field(&mut out, "content-length", n);
        }
        assert_eq!(
            &out[..],
            format!(
                "x-a: 1\r\nx-a: 2\r\ncontent-length: 0\r\ncontent-length: 7\r\ncontent-length: 10\r\ncontent-length: 12345\r\ncontent-length: {}\r\n",
                u64::MAX
            )
            .as_bytes()
        );
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        for n in [0usize, 1, 15, 16, 255, 4096, usize::MAX] {
            assert_eq!(
                chunk_size_line(n, &mut [0; 18]),
                format!("{n:x}\r\n").as_bytes()
            );
        }
    }

    #[test]
    fn parsed_fields_share_the_head() {
        let raw = Bytes::from_static(b"GET / HTTP/1.1\r\nx-a: 1\r\nx-b:\r\n\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(&raw).unwrap().is_complete());
        let found = fields(&raw, req.headers).unwrap();
        let capacity = found.len();
        let map = header_map(&raw, found, capacity).unwrap();
        assert_eq!(map["x-a"], "1");
        assert_eq!(map["x-b"], "");
    }

    fn decode_all(mut raw: BytesMut) -> Result<Vec<u8>, &'static str> {
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        loop {
            let (next, data) = decode_chunk(&mut raw, state)?;
            if next == Chunk::Trailers {
                assert!(trailers_end(&mut raw)?, "trailers complete");
                assert!(raw.is_empty());
                return Ok(out);
            }
            match data {
                Some(d) => out.extend_from_slice(&d),
                None if next == state => return Err("incomplete"),
                None => {}
            }
            state = next;
        }
    }

    #[test]
    fn chunked_bodies_decode_across_split_reads() {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ntrailer: x\r\n\r\n";
        assert_eq!(
            decode_all(BytesMut::from(&raw[..])).unwrap(),
            b"hello world"
        );
        // Fed a byte at a time, the decoder waits instead of failing.
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        let mut done = false;
        for b in raw {
            buf.extend_from_slice(&[*b]);
            loop {
                let (next, data) = decode_chunk(&mut buf, state).unwrap();
                let moved = next != state || data.is_some();
                if let Some(d) = data {
                    out.extend_from_slice(&d);
                }
                state = next;
                if state == Chunk::Trailers {
                    done = trailers_end(&mut buf).unwrap();
                    break;
                }
                if !moved {
                    break;
                }
            }
        }
        assert!(done);
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for raw in [&b"zz\r\nhello\r\n0\r\n\r\n"[..], b"5\r\nhelloXX0\r\n\r\n"] {
            assert!(decode_all(BytesMut::from(raw)).is_err(), "{raw:?}");
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(decode_chunk(&mut BytesMut::from(&long[..]), Chunk::Size).is_err());
    }
}
