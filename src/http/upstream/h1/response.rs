//! Reading a target's response: the head parsed with httparse into `http`
//! types (header values share the read buffer), then the body as its framing
//! says, from the same buffer and socket.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncRead;

use super::request::RequestWriter;
use super::{H1Conn, H1Error};
use crate::http::headers::{self, X_REQUEST_ID};
use crate::http::wire::{self, Chunk, decode_chunk, trailers_end};

/// A response head may not be larger than this (status line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the target closes the connection (HTTP/1.0 style).
    Close,
    Done,
}

/// Reads into `buf` from `io`; `Ok(0)` is the end of the stream.
pub(super) fn poll_read_more(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    buf.reserve(READ_CHUNK);
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// A parsed response head; `framing` and `keep_alive` come from its headers.
pub(super) struct Head {
    pub response: Response<()>,
    /// An ordinary head's fields as they came; the map is empty then.
    lines: Option<Box<wire::ResponseLines>>,
    framing: Framing,
    keep_alive: bool,
}

/// Parses a complete response head at the front of `buf`, consuming it.
/// `Ok(None)`: more bytes are needed.
/// With `wire`, an ordinary response keeps its fields as they came
/// ([`wire::ResponseLines`]); any other builds its header map.
pub(super) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    wire: bool,
) -> Result<Option<Head>, H1Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Uninitialised slots: zeroing them all costs more than the parse.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    // The defaults refuse folded lines and invalid header lines instead of
    // skipping them: `scan_lines` forwards the bytes between parsed names
    // as they are, so it relies on that.
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
        Ok(httparse::Status::Complete(_)) => {
            return Err(H1Error::Invalid("response head too large"));
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(H1Error::Invalid("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Invalid("too many response headers"));
        }
        Err(_) => return Err(H1Error::Invalid("malformed response head")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Invalid("malformed status code"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if let Some((mut lines, persistence)) = (wire && !switching)
        .then(|| scan_lines(buf, len, parsed.headers))
        .flatten()
    {
        lines.head = buf.split_to(len).freeze();
        let framing = if bodiless(status, method) {
            Framing::Done
        } else {
            length_framing(lines.content_length)
        };
        return Ok(Some(Head {
            response,
            lines: Some(Box::new(lines)),
            framing,
            keep_alive: persistence.keeps(version, framing),
        }));
    }
    let fields =
        wire::fields(buf, parsed.headers).ok_or(H1Error::Invalid("malformed header name"))?;
    let head = buf.split_to(len).freeze();

    // The map comes out without hop-by-hop fields. An ordinary response's
    // only ones are Connection (whose tokens decide reuse) and Keep-Alive:
    // they are left out as the map is built. Any other (Transfer-Encoding
    // after framing has read it), or a Connection naming fields, is
    // removed by the full rules (`headers::strip_hop_by_hop`).
    let mut persistence = Persistence::default();
    // A 101's Upgrade and Connection go to the client as the upgrade
    // rules say (`proxy::respond`).
    let mut ordinary = !switching;
    for (name, range) in &fields {
        match hop(name.as_str().as_bytes()) {
            Hop::Connection => ordinary &= persistence.read(&head[range.clone()]),
            Hop::Other => ordinary = false,
            Hop::KeepAlive | Hop::No => {}
        }
    }
    let capacity = fields.len() + 2;
    let kept = fields.into_iter().filter(|(name, _)| {
        !(ordinary && (*name == header::CONNECTION || *name == headers::KEEP_ALIVE))
    });
    let mut headers = wire::header_map(&head, kept, capacity)
        .ok_or(H1Error::Invalid("malformed header value"))?;

    let framing = framing(status, method, &mut headers)?;
    if !ordinary && !switching {
        headers::strip_hop_by_hop(&mut headers, false);
    }
    *response.headers_mut() = headers;
    Ok(Some(Head {
        response,
        lines: None,
        framing,
        keep_alive: persistence.keeps(version, framing),
    }))
}

/// What a response's Connection fields say about reuse.
#[derive(Default)]
struct Persistence {
    close: bool,
    keep_alive: bool,
}

impl Persistence {
    /// Reads one Connection value; `false` if it names anything besides
    /// `close` and `keep-alive` (fields that are hop-by-hop too).
    fn read(&mut self, value: &[u8]) -> bool {
        let mut only_persistence = true;
        for token in wire::list_elements(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else {
                only_persistence = false;
            }
        }
        only_persistence
    }

    /// Whether the connection carries another request after this response.
    fn keeps(&self, version: Version, framing: Framing) -> bool {
        let persistent = if version == Version::HTTP_10 {
            self.keep_alive
        } else {
            !self.close
        };
        persistent && framing != Framing::Close
    }
}

/// A field name's part in hop-by-hop handling, in any case.
enum Hop {
    /// Its tokens decide reuse, and may name more hop-by-hop fields.
    Connection,
    KeepAlive,
    /// Any other hop-by-hop field: the full rules remove it.
    Other,
    No,
}

fn hop(name: &[u8]) -> Hop {
    if name.eq_ignore_ascii_case(b"connection") {
        Hop::Connection
    } else if name.eq_ignore_ascii_case(b"keep-alive") {
        Hop::KeepAlive
    } else if headers::is_hop_by_hop_name(name) {
        Hop::Other
    } else {
        Hop::No
    }
}

/// The lines of an ordinary response head (`len` bytes at the front of
/// `buf`) that travel on: all but Connection, Keep-Alive and
/// `x-request-id` (tollgate sets its own), with what Connection says. The
/// lines' head is left for the caller to set once split off. `None` for
/// any other head: one with another hop-by-hop field, a Connection naming
/// fields, more than one Content-Length or a malformed one, a line not
/// ended by CRLF, or too many gaps; the header map and its full rules take
/// those.
fn scan_lines(
    buf: &[u8],
    len: usize,
    fields: &[httparse::Header<'_>],
) -> Option<(wire::ResponseLines, Persistence)> {
    let base = buf.as_ptr() as usize;
    let mut lines = wire::ResponseLines::default();
    let mut persistence = Persistence::default();
    for (i, field) in fields.iter().enumerate() {
        let start = field.name.as_ptr() as usize - base;
        // A line ends where the next begins, the last before the empty line.
        let end = fields
            .get(i + 1)
            .map_or(len - 2, |next| next.name.as_ptr() as usize - base);
        if end < start + 2 || &buf[end - 2..end] != b"\r\n" {
            return None;
        }
        let name = field.name.as_bytes();
        let keep = match hop(name) {
            Hop::Connection => {
                if !persistence.read(field.value) {
                    return None;
                }
                false
            }
            Hop::KeepAlive => false,
            Hop::Other => return None,
            Hop::No if name.eq_ignore_ascii_case(X_REQUEST_ID.as_str().as_bytes()) => false,
            Hop::No if name.eq_ignore_ascii_case(b"content-length") => {
                if lines.content_length.is_some() {
                    return None;
                }
                lines.content_length = Some(wire::length_value(field.value)?);
                true
            }
            Hop::No => {
                lines.has_date |= name.eq_ignore_ascii_case(b"date");
                true
            }
        };
        if keep && !lines.keep(start, end) {
            return None;
        }
    }
    Some((lines, persistence))
}

/// How a body of this declared length (none: until the connection closes)
/// ends.
fn length_framing(length: Option<u64>) -> Framing {
    match length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    }
}

/// Responses that have no body, whatever their fields say.
fn bodiless(status: StatusCode, method: &Method) -> bool {
    *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// RFC 9112 §6.3, for a response to `method`.
fn framing(
    status: StatusCode,
    method: &Method,
    headers: &mut HeaderMap,
) -> Result<Framing, H1Error> {
    if bodiless(status, method) {
        return Ok(Framing::Done);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let chunked_last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        // The decoded length is what the client gets; a stale length would lie.
        headers.remove(header::CONTENT_LENGTH);
        return Ok(if chunked_last {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        });
    }
    let mut length: Option<u64> = None;
    let mut values = 0;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            values += 1;
            let n = wire::length_value(part).ok_or(H1Error::Invalid("malformed content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Invalid("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    if let (Some(n), 2..) = (length, values) {
        // Repeats of one length travel on as that one length.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(length_framing(length))
}

/// A response body read from its target connection. At its end the
/// connection goes back to the worker's pool when it can carry another
/// request; dropped before its end, the connection is closed.
pub struct H1Body {
    conn: Option<Box<H1Conn>>,
    /// The head's fields as they came, for an ordinary head on the direct
    /// path (`wire::ResponseLines`).
    lines: Option<Box<wire::ResponseLines>>,
    framing: Framing,
    keep_alive: bool,
    /// The rest of the request body, still going out while the response
    /// comes in (boxed: seldom there).
    writer: Option<Box<RequestWriter>>,
}

impl H1Body {
    /// `reusable`: the request went out without a write error.
    pub(super) fn new(
        conn: Box<H1Conn>,
        head: &mut Head,
        writer: Option<RequestWriter>,
        reusable: bool,
    ) -> H1Body {
        let mut body = H1Body {
            conn: Some(conn),
            lines: head.lines.take(),
            framing: head.framing,
            keep_alive: head.keep_alive && reusable,
            writer: writer.map(Box::new),
        };
        if body.framing == Framing::Done {
            body.finish();
        }
        body
    }

    /// A `101` to an upgrade request: no body; the connection is the
    /// tunnel's ([`H1Body::upgraded`]), never pooled.
    pub(super) fn switched(conn: Box<H1Conn>) -> H1Body {
        H1Body {
            conn: Some(conn),
            lines: None,
            framing: Framing::Done,
            keep_alive: false,
            writer: None,
        }
    }

    /// The connection of a `101` response, to relay bytes on.
    pub fn upgraded(mut self) -> Option<super::Upgraded> {
        self.conn.take().map(super::Upgraded)
    }

    /// The body has ended: the connection is reusable when the target allows
    /// it and nothing more arrived. A request body still going out (the
    /// target answered before reading it all) is finished first, apart from
    /// the response.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !(self.keep_alive && conn.buf.is_empty()) {
            return;
        }
        match self.writer.take() {
            None => conn.release(),
            Some(writer) => {
                tokio::spawn(finish_request(conn, writer));
            }
        }
    }

    /// Whether the rest of the body has arrived already (so it can no
    /// longer break off).
    pub fn arrived(&self) -> bool {
        match (self.framing, &self.conn) {
            (Framing::Done, _) => true,
            (Framing::Length(left), Some(conn)) => conn.buf.len() as u64 >= left,
            _ => false,
        }
    }

    /// The target's fields as they came, when its response head kept them.
    pub fn lines(&self) -> Option<&wire::ResponseLines> {
        self.lines.as_deref()
    }

    pub fn lines_mut(&mut self) -> Option<&mut wire::ResponseLines> {
        self.lines.as_deref_mut()
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(e)))
    }

    /// Moves the request body along. Once the response has begun, the
    /// target failing to take it only means the connection cannot be reused;
    /// the client's body failing ends the response too (the target may be
    /// waiting for the rest).
    fn poll_writer(&mut self, cx: &mut Context<'_>) -> Result<(), H1Error> {
        if let (Some(writer), Some(conn)) = (self.writer.as_mut(), self.conn.as_mut()) {
            match writer.poll_write(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => self.writer = None,
                Poll::Ready(Err(e @ H1Error::Body(_))) => return Err(e),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(target = %conn.origin.addr, error = %e, "request body not sent whole");
                    self.keep_alive = false;
                    self.writer = None;
                }
                Poll::Pending => {}
            }
        }
        Ok(())
    }
}

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        if let Err(e) = this.poll_writer(cx) {
            return this.fail(e);
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(left) if !buf.is_empty() => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    this.framing = Framing::Length(left - n as u64);
                    if left == n as u64 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !buf.is_empty() => {
                    let data = buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match decode_chunk(buf, state).map_err(H1Error::Invalid)
                {
                    Err(e) => return this.fail(e),
                    Ok((next, data)) => {
                        this.framing = Framing::Chunked(next);
                        if let Some(data) = data {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        if next == Chunk::Trailers {
                            match trailers_end(buf).map_err(H1Error::Invalid) {
                                Ok(true) => {
                                    this.finish();
                                    return Poll::Ready(None);
                                }
                                Ok(false) => {}
                                Err(e) => return this.fail(e),
                            }
                        } else if next != state {
                            // A size line or CRLF was consumed: decode on.
                            continue;
                        }
                    }
                },
                Framing::Length(_) | Framing::Close => {}
            }
            // Everything buffered is used: read more.
            let conn = this.conn.as_mut().expect("checked above");
            match ready!(poll_read_more(&mut conn.io, &mut conn.buf, cx)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1Error::Closed("before the end of the response body")),
                Ok(_) => {}
                Err(e) => return this.fail(H1Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// How long the rest of a request body may take once its response is done.
const FINISH_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn finish_request(mut conn: Box<H1Conn>, mut writer: Box<RequestWriter>) {
    let sent = tokio::time::timeout(
        FINISH_REQUEST_TIMEOUT,
        poll_fn(|cx| writer.poll_write(&mut conn.io, cx)),
    )
    .await;
    match sent {
        Ok(Ok(())) => conn.release(),
        Ok(Err(e)) => {
            tracing::debug!(target = %conn.origin.addr, error = %e, "request body not sent whole after its response");
        }
        Err(_) => {
            tracing::debug!(target = %conn.origin.addr, "request body still not sent after its response; closing");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parsed both ways; framing, reuse and errors must not depend on it.
    fn head(raw: &str, method: Method) -> Result<Option<Head>, H1Error> {
        let wire = parse_head(&mut BytesMut::from(raw), &method, true);
        let map = parse_head(&mut BytesMut::from(raw), &method, false);
        match (&wire, &map) {
            (Ok(Some(w)), Ok(Some(m))) => {
                assert_eq!(
                    (w.framing, w.keep_alive),
                    (m.framing, m.keep_alive),
                    "{raw:?}"
                );
            }
            (Err(_), Err(_)) | (Ok(None), Ok(None)) => {}
            _ => panic!("{raw:?}: the wire form and the map disagree"),
        }
        map
    }

    /// The wire form's lines as text, or `None` if the head took the map.
    fn lines(raw: &str, method: Method) -> Option<(String, Option<u64>, bool)> {
        let h = parse_head(&mut BytesMut::from(raw), &method, true)
            .unwrap()
            .unwrap();
        let lines = h.lines?;
        assert!(h.response.headers().is_empty(), "fields are in one place");
        let text = lines.runs().map(|r| String::from_utf8_lossy(r)).collect();
        Some((text, lines.content_length, lines.has_date))
    }

    #[test]
    fn ordinary_heads_keep_their_lines_as_they_came() {
        let (text, length, date) = lines(
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Fri, 04 Dec 2026 18:00:00 GMT\r\n\
             Connection: keep-alive\r\nX-Request-Id: theirs\r\nVia: 1.0 inner\r\n\
             Keep-Alive: timeout=5\r\nContent-Length:  12 \r\nx-a: 1\r\n\r\n",
            Method::GET,
        )
        .expect("an ordinary head");
        assert_eq!(
            text,
            "Server: up\r\nDate: Fri, 04 Dec 2026 18:00:00 GMT\r\nVia: 1.0 inner\r\n\
             Content-Length:  12 \r\nx-a: 1\r\n"
        );
        assert_eq!((length, date), (Some(12), true));
        let (text, length, date) = lines("HTTP/1.1 204 No Content\r\n\r\n", Method::GET).unwrap();
        assert_eq!((text.as_str(), length, date), ("", None, false));

        // Four runs of kept lines are kept.
        let (text, ..) = lines(
            "HTTP/1.1 200 OK\r\na: 1\r\nkeep-alive: 1\r\nb: 1\r\nkeep-alive: 1\r\nc: 1\r\n\
             keep-alive: 1\r\nd: 1\r\n\r\n",
            Method::GET,
        )
        .unwrap();
        assert_eq!(text, "a: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\n");

        // Anything else takes the map and its full rules.
        for raw in [
            "HTTP/1.1 200 OK\r\nUpgrade: h2c\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTrailer: x-sum\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nProxy-Connection: close\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: 1\r\ny: 2\n\r\n",
            "HTTP/1.1 200 OK\r\nx: 1\r\n\n",
            "HTTP/1.1 200 OK\r\nConnection: x-private\r\nx-private: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTE: trailers\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n",
            "HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 0\n\n",
            "HTTP/1.1 200 OK\r\na: 1\r\nkeep-alive: 1\r\nb: 1\r\nkeep-alive: 1\r\nc: 1\r\n\
             keep-alive: 1\r\nd: 1\r\nkeep-alive: 1\r\ne: 1\r\n\r\n",
        ] {
            assert!(lines(raw, Method::GET).is_none(), "{raw:?}");
        }
    }

    #[test]
    fn framing_follows_the_headers_and_the_request() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Done);
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.response.headers().contains_key(header::CONTENT_LENGTH));
        let h = head("HTTP/1.0 200 OK\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = head(
            "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Done, false));
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Length(3));
        assert_eq!(h.response.headers()[header::CONTENT_LENGTH], "3");
    }

    #[test]
    fn response_heads_come_without_hop_by_hop_fields() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive);
        let names: Vec<_> = h.response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a", "content-length"]);

        // Connection naming a field, or another hop-by-hop field: the full
        // rules remove them too, and end-to-end fields stay.
        for extra in [
            "Connection: x-private\r\nx-private: 1",
            "Trailer: x-sum",
            "Transfer-Encoding: chunked",
        ] {
            let h = head(
                &format!("HTTP/1.1 200 OK\r\n{extra}\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n"),
                Method::GET,
            )
            .unwrap()
            .unwrap();
            let headers = h.response.headers();
            for gone in ["connection", "x-private", "trailer", "transfer-encoding"] {
                assert!(headers.get(gone).is_none(), "{extra}: {gone} left");
            }
            assert_eq!(headers["x-a"], "1", "{extra}");
        }

        // Tokens decide reuse whatever their case or spacing.
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: Keep-Alive , CLOSE\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        assert!(h.response.headers().get(header::CONNECTION).is_none());
        let h = head(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive && h.response.headers().get(header::CONNECTION).is_none());
    }

    #[test]
    fn bad_heads_are_errors_not_guesses() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1e3\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(head(raw, Method::GET).is_err(), "{raw:?}");
        }
        assert!(
            head("HTTP/1.1 200 OK\r\ncontent-le", Method::GET)
                .unwrap()
                .is_none()
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES + 1));
        assert!(head(&huge, Method::GET).is_err());
    }

    #[test]
    fn the_head_is_consumed_and_the_body_left() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok");
        let h = parse_head(&mut buf, &Method::GET, false).unwrap().unwrap();
        assert_eq!(&buf[..], b"ok");
        assert_eq!(h.response.headers()["x-a"], "1");
    }
}
