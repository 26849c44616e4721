//! tollgate's HTTP/1 server codec: the one reader of HTTP/1 requests on the
//! gateway's listeners, plain and TLS. It reads every head itself (whole,
//! split over reads, pipelined, malformed or too large), feeds request
//! bodies (`Content-Length` or chunked, with `100 Continue`) to whoever
//! forwards them, writes responses from the connection's own task with no
//! dispatcher in between, and relays a connection that switched protocols.
//! Every request goes through the gateway's one pipeline; a head that
//! cannot be read is answered with the same JSON errors, then the
//! connection closes. A connection that opens with the HTTP/2 preface is
//! handed to hyper's HTTP/2 server before any HTTP/1 is read.

use std::cell::Cell;
use std::future::poll_fn;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header;
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::ConnMemo;
use super::HttpEntry;
use super::body::{BodyFeed, ClientBody, ProxyBody, Switched, fed_body};
use super::error::GatewayError;
use super::headers::{self, X_REQUEST_ID};
use super::wire::{self, Chunk, RequestHead};
use crate::transport::{ActivityIo, ConnState, Shutdown, Stream};

/// Header slots for one head; a head with more fields is refused (431).
const MAX_HEADERS: usize = 256;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How the loop ended.
pub(crate) enum Ended<S> {
    Closed,
    /// The client speaks HTTP/2: serve it with that, starting with these bytes.
    Http2(S, Bytes),
}

/// A request head read whole, and what its framing says.
struct Parsed {
    request: RequestHead,
    /// The client asked to close after this response (or is HTTP/1.0
    /// without keep-alive).
    close: bool,
    body: BodyFraming,
    expect_continue: bool,
    upgrade: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// What the front of the read buffer holds.
// Made and matched in place, never stored: the size of its larger variant
// costs nothing (boxed, it cost an allocation per request).
#[allow(clippy::large_enum_variant)]
enum Read {
    Request(Parsed),
    /// More bytes are needed.
    Partial,
    Http2,
    Refused(GatewayError),
}

pub(crate) async fn serve<S: Stream>(
    mut io: S,
    state: Arc<ConnState>,
    entry: HttpEntry,
    shutdown: &Shutdown,
) -> Ended<S> {
    let limits = &state.listener.limits;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(1024);
    let mut idle = pin!(state.idle_for(limits.idle_timeout));
    let mut graceful = pin!(shutdown.drain.wait());
    // A head must arrive whole within the header-read timeout of its first
    // byte (a new connection's, of the connection's start): silent or slow
    // clients do not hold their slots.
    let mut head_timer = pin!(tokio::time::sleep(limits.header_read_timeout));
    let mut head_started = true;
    // No request yet: a drain does not close it before its first request
    // (it may have been accepted just as the drain began; the head timer
    // bounds the wait).
    let mut fresh = true;
    let mut memo = ConnMemo::default();
    // The request timer, moved along from request to request (see
    // `proxy::forward`); armed by the first request.
    let mut deadline = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    loop {
        let parsed = match read(&mut buf, limits) {
            Read::Request(parsed) => {
                fresh = false;
                parsed
            }
            Read::Http2 => return Ended::Http2(io, buf.freeze()),
            Read::Refused(error) => {
                let response = entry.refuse(error);
                let _ = write_refusal(&mut io, &mut out, response, &state).await;
                return Ended::Closed;
            }
            Read::Partial => {
                if !buf.is_empty() && !head_started {
                    head_started = true;
                    head_timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + limits.header_read_timeout);
                }
                let read = tokio::select! {
                    biased;
                    read = poll_fn(|cx| io.poll_fill(cx, &mut buf)) => read,
                    _ = &mut graceful, if buf.is_empty() && !fresh => return Ended::Closed,
                    _ = &mut head_timer, if head_started => {
                        tracing::debug!(listener = %state.listener.name, peer = %state.peer,
                            "no whole request head within the header-read timeout; closing");
                        return Ended::Closed;
                    }
                    _ = &mut idle, if !head_started => {
                        tracing::debug!(listener = %state.listener.name, peer = %state.peer, "closing idle connection");
                        return Ended::Closed;
                    }
                };
                match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => state.touch(),
                }
                continue;
            }
        };
        head_started = false;
        let Parsed {
            request,
            close,
            body,
            expect_continue,
            upgrade,
        } = parsed;
        let head_only = request.method == Method::HEAD;
        let http10 = request.version == Version::HTTP_10;
        let mut close = close || shutdown.drain.started();
        let (mut feed, client_body) = match body {
            BodyFraming::None | BodyFraming::Length(0) => (None, ClientBody::Empty),
            BodyFraming::Length(n) => {
                let (feed, body) = fed_body(Some(n));
                let reader = BodyReader::new(feed, Chunk::Data(n), expect_continue);
                (Some(reader), ClientBody::Fed(body))
            }
            BodyFraming::Chunked => {
                let (feed, body) = fed_body(None);
                let reader = BodyReader::new(feed, Chunk::Size, expect_continue);
                (Some(reader), ClientBody::Fed(body))
            }
        };
        let response = run(
            pin!(entry.serve(&request, client_body, upgrade, &mut memo, deadline.as_mut())),
            &mut io,
            &mut buf,
            feed.as_mut(),
            &state,
        )
        .await;
        let Some(mut response) = response else {
            tracing::debug!(listener = %state.listener.name, peer = %state.peer,
                "client closed the connection; request cancelled");
            return Ended::Closed;
        };
        // A body not read to its end leaves the connection out of step:
        // it closes after this response.
        if feed.as_ref().is_some_and(|f| f.state != BodyState::Whole) {
            close = true;
        }
        drop(feed);
        let tunnel = response.body_mut().take_tunnel();
        // As for requests to targets (`upstream::h1`): responses go out in
        // one burst per event-loop turn, waking clients less often.
        crate::transport::after_ready_tasks().await;
        let (parts, mut body) = response.into_parts();
        let framing = ResponseFraming {
            head_request: head_only,
            close: close && tunnel.is_none(),
            http10,
        };
        let written = tokio::select! {
            biased;
            written = write_response(&mut io, &mut out, &parts, &mut body, framing, &state) => written,
            // A client that stops reading is closed like an idle one.
            _ = &mut idle => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took nothing for the idle timeout",
            )),
        };
        drop((parts, body));
        let keep_alive = match written {
            Ok(keep_alive) => keep_alive,
            Err(e) => {
                tracing::debug!(listener = %state.listener.name, peer = %state.peer, error = %e,
                    "response not written whole; closing the connection");
                return Ended::Closed;
            }
        };
        if let Some(tunnel) = tunnel {
            // What the client sent after its upgrade request belongs to the
            // new protocol.
            let client = ActivityIo::new(Rewind::new(io, buf.freeze()), state.clone());
            match tunnel {
                Switched::Upstream(tunnel) => tunnel.relay(client, &state).await,
                Switched::Local(takeover) => takeover(Box::new(client), state.clone()).await,
            }
            return Ended::Closed;
        }
        if close || !keep_alive {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
        if !buf.is_empty() {
            // A pipelined head is under way already.
            head_started = true;
            head_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + limits.header_read_timeout);
        }
    }
}

/// Pipelined bytes read while a request runs are kept up to this much.
const MAX_READ_AHEAD: usize = 64 * 1024;

/// A request body on its way from the socket to the forwarder.
struct BodyReader {
    feed: BodyFeed,
    chunk: Chunk,
    /// `Content-Length` framing (`chunk` counts down `Data`), or chunked.
    chunked: bool,
    state: BodyState,
    /// `100 Continue` is owed once the forwarder asks for the body.
    continue_owed: bool,
    /// Bytes of the `100 Continue` line still to write.
    continue_left: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Reading,
    /// Read to its end: the connection is in step for the next request.
    Whole,
    /// No longer read (broken off, or no one takes it): the connection
    /// closes after the response.
    Abandoned,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl BodyReader {
    fn new(feed: BodyFeed, chunk: Chunk, expect_continue: bool) -> BodyReader {
        BodyReader {
            chunked: chunk == Chunk::Size,
            feed,
            chunk,
            state: BodyState::Reading,
            continue_owed: expect_continue,
            continue_left: 0,
        }
    }

    /// Moves what `buf` holds of the body into the feed; `Err` for a
    /// malformed chunked body.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<(), &'static str> {
        while self.state == BodyState::Reading && !buf.is_empty() {
            if !self.chunked {
                let Chunk::Data(left) = self.chunk else {
                    return Err("a length-framed body lost count");
                };
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                self.feed.push(buf.split_to(n).freeze());
                self.chunk = Chunk::Data(left - n as u64);
                if left == n as u64 {
                    self.whole();
                }
                continue;
            }
            if self.chunk == Chunk::Trailers {
                if wire::trailers_end(buf)? {
                    self.whole();
                }
                return Ok(());
            }
            let (next, data) = wire::decode_chunk(buf, self.chunk)?;
            let moved = next != self.chunk || data.is_some();
            if let Some(data) = data {
                self.feed.push(data);
            }
            self.chunk = next;
            if !moved {
                return Ok(()); // more bytes needed
            }
        }
        Ok(())
    }

    fn whole(&mut self) {
        self.state = BodyState::Whole;
        self.feed.end(Ok(()));
    }

    fn abandon(&mut self, why: &'static str) {
        self.state = BodyState::Abandoned;
        self.feed.end(Err(why));
    }
}

/// Runs the request through the pipeline while serving the connection:
/// the request's body is read and fed as the forwarder takes it (with
/// `100 Continue` first when the client asked); once it is whole, bytes
/// that arrive (pipelined requests) are kept in `buf`, and the end of the
/// stream means the client is gone: `None` drops (cancels) the request.
///
/// The request comes pinned where it was made: moving it in by value would
/// copy it, and keep a second slot for it in this future.
async fn run<S: Stream>(
    mut request: Pin<&mut impl Future<Output = Response<ProxyBody>>>,
    io: &mut S,
    buf: &mut BytesMut,
    mut body: Option<&mut BodyReader>,
    state: &ConnState,
) -> Option<Response<ProxyBody>> {
    poll_fn(|cx| {
        if let Poll::Ready(response) = request.as_mut().poll(cx) {
            return Poll::Ready(Some(response));
        }
        loop {
            let reader = match body.as_deref_mut() {
                Some(reader) if reader.state == BodyState::Reading => reader,
                Some(reader) if reader.state == BodyState::Abandoned => return Poll::Pending,
                // No body, or a whole one: read ahead (pipelined requests),
                // and notice the client leaving.
                _ => {
                    if buf.len() >= MAX_READ_AHEAD {
                        return Poll::Pending;
                    }
                    match io.poll_fill(cx, buf) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Pending => return Poll::Pending,
                    }
                }
            };
            if reader.continue_owed && reader.feed.wanted(cx) {
                reader.continue_owed = false;
                reader.continue_left = CONTINUE.len();
            }
            while reader.continue_left > 0 {
                let from = CONTINUE.len() - reader.continue_left;
                match Pin::new(&mut *io).poll_write(cx, &CONTINUE[from..]) {
                    Poll::Ready(Ok(n)) if n > 0 => reader.continue_left -= n,
                    Poll::Ready(_) => {
                        reader.continue_left = 0;
                        reader.abandon("the client connection failed");
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if reader.state != BodyState::Reading {
                continue;
            }
            if let Err(why) = reader.decode(buf) {
                reader.abandon(why);
                continue;
            }
            if reader.state != BodyState::Reading {
                continue;
            }
            // Read more once the forwarder has taken what it was given.
            match reader.feed.poll_room(cx) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => {
                    reader.abandon("the body is no longer read");
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
            match io.poll_fill(cx, buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    reader.abandon("the client closed the connection before the end of its body");
                }
                // Body bytes are activity: a long upload is not idle.
                Poll::Ready(Ok(_)) => state.touch(),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Reads a request head at the front of `buf`, consuming it once whole.
fn read(buf: &mut BytesMut, limits: &crate::config::Limits) -> Read {
    if buf.is_empty() {
        return Read::Partial;
    }
    let preface = buf.len().min(H2_PREFACE.len());
    if buf[..preface] == H2_PREFACE[..preface] {
        return if preface == H2_PREFACE.len() {
            Read::Http2
        } else {
            Read::Partial
        };
    }
    // Uninitialised slots: zeroing them all costs more than the parse.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let uri_limit = limits.max_uri_bytes.as_usize();
    let head_limit = uri_limit + limits.max_header_bytes.as_usize() + 4096;
    let len = match config.parse_request_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            // A head may not grow past the limits while it comes in.
            let line_end = buf.windows(2).position(|w| w == b"\r\n");
            if line_end.map_or(buf.len(), |end| end) > uri_limit + 32 {
                return Read::Refused(GatewayError::UriTooLong { limit: uri_limit });
            }
            if buf.len() > head_limit {
                return Read::Refused(GatewayError::HeadersTooLarge {
                    limit: limits.max_header_bytes.as_usize(),
                    what: "bytes",
                });
            }
            return Read::Partial;
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Read::Refused(GatewayError::HeadersTooLarge {
                limit: limits.max_headers,
                what: "headers",
            });
        }
        Err(e) => {
            // A target too long to parse is still too long.
            if buf
                .windows(2)
                .position(|w| w == b"\r\n")
                .unwrap_or(buf.len())
                > uri_limit + 32
            {
                return Read::Refused(GatewayError::UriTooLong { limit: uri_limit });
            }
            return Read::Refused(GatewayError::BadRequest(head_error(e)));
        }
    };
    let facts = match parse_head(buf, &parsed) {
        Ok(facts) => facts,
        Err(error) => return Read::Refused(error),
    };
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(facts.path)) else {
        return Read::Refused(GatewayError::BadRequest("a malformed request target"));
    };
    Read::Request(Parsed {
        request: RequestHead {
            head,
            method: facts.method,
            uri,
            version: facts.version,
            fields: facts.fields,
        },
        close: facts.close,
        body: facts.body,
        expect_continue: facts.expect_continue,
        upgrade: facts.upgrade,
    })
}

/// What a whole head says, with its parts as ranges of the buffer.
struct HeadFacts {
    method: Method,
    version: Version,
    path: std::ops::Range<usize>,
    fields: Vec<wire::Field>,
    close: bool,
    body: BodyFraming,
    expect_continue: bool,
    upgrade: bool,
}

fn head_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "a malformed header field name",
        httparse::Error::HeaderValue => "a malformed header field value (folded lines are refused)",
        httparse::Error::NewLine => "a malformed line ending",
        httparse::Error::Version => "an unknown HTTP version",
        httparse::Error::Token | httparse::Error::Status => "a malformed request line",
        httparse::Error::TooManyHeaders => "too many header fields",
    }
}

/// The request and its framing from a head httparse read whole from `buf`.
fn parse_head(buf: &[u8], parsed: &httparse::Request<'_, '_>) -> Result<HeadFacts, GatewayError> {
    let bad = GatewayError::BadRequest;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(bad("an unknown HTTP version")),
    };
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(bad("a malformed method"))?;
    let path = parsed.path.ok_or(bad("no request target"))?;
    let fields = wire::fields(buf, parsed.headers).ok_or(bad("a malformed header field name"))?;
    let (mut close_token, mut keep_alive_token) = (false, false);
    let (mut length, mut chunked, mut transfer_encoding) = (None, false, false);
    let (mut expect_continue, mut connection_upgrade, mut has_upgrade) = (false, false, false);
    for (name, range) in &fields {
        let value = &buf[range.clone()];
        match *name {
            header::CONTENT_LENGTH => {
                let n = wire::length_value(value).ok_or(bad("a malformed Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad("conflicting Content-Length fields"));
                }
                length = Some(n);
            }
            header::TRANSFER_ENCODING => {
                transfer_encoding = true;
                // Only chunked, last, frames a request (RFC 9112 §6.3).
                chunked = wire::list_elements(value)
                    .last()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            }
            header::CONNECTION => {
                for token in wire::list_elements(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close_token = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_token = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        connection_upgrade = true;
                    }
                }
            }
            header::EXPECT => {
                if value.eq_ignore_ascii_case(b"100-continue") {
                    expect_continue = true;
                } else {
                    return Err(GatewayError::ExpectationFailed);
                }
            }
            header::UPGRADE => has_upgrade = true,
            _ => {}
        }
    }
    // HTTP/1.0 keeps the connection only when asked to.
    let close = close_token || (version == Version::HTTP_10 && !keep_alive_token);
    let body = match (transfer_encoding, length) {
        // Both would let two readers frame it two ways (smuggling).
        (true, Some(_)) => return Err(bad("both Transfer-Encoding and Content-Length")),
        (true, None) if version == Version::HTTP_10 => {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        (true, None) if !chunked => {
            return Err(bad("a Transfer-Encoding other than chunked, last"));
        }
        (true, None) => BodyFraming::Chunked,
        (false, Some(n)) => BodyFraming::Length(n),
        (false, None) => BodyFraming::None,
    };
    let upgrade = connection_upgrade
        && has_upgrade
        && method == Method::GET
        && version == Version::HTTP_11
        && body == BodyFraming::None;
    let path_start = path.as_ptr() as usize - buf.as_ptr() as usize;
    Ok(HeadFacts {
        method,
        version,
        path: path_start..path_start + path.len(),
        fields,
        close,
        body,
        expect_continue,
        upgrade,
    })
}

/// How a response goes out.
#[derive(Clone, Copy)]
struct ResponseFraming {
    head_request: bool,
    /// Close after this response.
    close: bool,
    /// The client speaks HTTP/1.0: no chunked framing.
    http10: bool,
}

/// Writes a refusal (a whole small body) and closes.
async fn write_refusal<S: Stream>(
    io: &mut S,
    out: &mut BytesMut,
    response: Response<ProxyBody>,
    state: &ConnState,
) -> std::io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let framing = ResponseFraming {
        head_request: false,
        close: true,
        http10: false,
    };
    write_response(io, out, &parts, &mut body, framing, state).await?;
    io.shutdown().await
}

/// Writes the head and streams the body: with its length when it is known,
/// chunked otherwise (close-delimited to an HTTP/1.0 client). `Ok(false)`
/// when the connection cannot carry another request.
// The response is borrowed: taken by value, it would sit in this future
// twice (as argument and as its parts).
async fn write_response<S: Stream>(
    io: &mut S,
    out: &mut BytesMut,
    parts: &http::response::Parts,
    body: &mut ProxyBody,
    framing: ResponseFraming,
    state: &ConnState,
) -> std::io::Result<bool> {
    let status = parts.status;
    let bodiless = framing.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.clear();
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    // A response of our own client has its target's fields as they came,
    // then what tollgate adds; any other has all its fields in its map.
    let lines = body.response_lines();
    if let Some(lines) = lines {
        for run in lines.runs() {
            out.put_slice(run);
        }
        wire::put_field(out, &header::VIA, headers::via(Version::HTTP_11).as_bytes());
        if let Some(id) = &lines.request_id {
            wire::put_field(out, &X_REQUEST_ID, id.as_bytes());
        }
    }
    wire::put_fields(out, &parts.headers);
    if !(lines.is_some_and(|l| l.has_date) || parts.headers.contains_key(header::DATE)) {
        out.put_slice(b"date: ");
        put_date(out);
        out.put_slice(b"\r\n");
    }
    let mut declared = match lines {
        Some(lines) => lines.content_length,
        None => parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| wire::length_value(v.as_bytes())),
    };
    let mut chunked = false;
    let mut close = framing.close;
    if !bodiless && declared.is_none() {
        match body.size_hint().exact() {
            Some(n) => {
                wire::put_length_field(out, "content-length", n);
                declared = Some(n);
            }
            // HTTP/1.0 knows no chunks: the end of the connection ends it.
            None if framing.http10 => close = true,
            None => {
                out.put_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        }
    }
    if close {
        out.put_slice(b"connection: close\r\n");
    } else if framing.http10 {
        out.put_slice(b"connection: keep-alive\r\n");
    }
    out.put_slice(b"\r\n");
    if bodiless || body.is_end_stream() {
        if chunked {
            out.put_slice(b"0\r\n\r\n");
        }
        io.write_all(out).await?;
        state.touch();
        check_length(declared, 0, bodiless)?;
        return Ok(!close);
    }

    let mut sent: u64 = 0;
    let mut pending_head = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(std::io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not forwarded
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if declared.is_some_and(|d| sent > d) {
            return Err(std::io::Error::other("body longer than its content-length"));
        }
        let mut size_line = [0u8; 18];
        let size_line = if chunked {
            wire::chunk_size_line(data.len(), &mut size_line)
        } else {
            &[][..]
        };
        let head: &[u8] = if pending_head { out } else { &[] };
        let tail: &[u8] = if chunked { b"\r\n" } else { &[] };
        write_all_vectored(io, &mut [head, size_line, &data, tail]).await?;
        state.touch();
        pending_head = false;
    }
    if pending_head || chunked {
        let head: &[u8] = if pending_head { out } else { &[] };
        let end: &[u8] = if chunked { b"0\r\n\r\n" } else { &[] };
        write_all_vectored(io, &mut [head, end]).await?;
        state.touch();
    }
    check_length(declared, sent, false)?;
    Ok(!close)
}

/// A body shorter than its declared length leaves the client waiting: the
/// connection must close.
fn check_length(declared: Option<u64>, sent: u64, bodiless: bool) -> std::io::Result<()> {
    match declared {
        Some(d) if !bodiless && d != sent => Err(std::io::Error::other(format!(
            "body ended after {sent} of {d} bytes"
        ))),
        _ => Ok(()),
    }
}

async fn write_all_vectored<S: Stream>(io: &mut S, parts: &mut [&[u8]]) -> std::io::Result<()> {
    let mut first = 0;
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); 4];
        let count = (parts.len() - first).min(slices.len());
        for (slice, part) in slices.iter_mut().zip(&parts[first..]) {
            *slice = IoSlice::new(part);
        }
        let mut n = io.write_vectored(&slices[..count]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let take = n.min(parts[first].len());
            parts[first] = &parts[first][take..];
            n -= take;
            if parts[first].is_empty() {
                first += 1;
            }
        }
    }
}

thread_local! {
    /// The `date` header text and the second it was rendered for.
    static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
}

fn put_date(out: &mut BytesMut) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (at, mut text) = DATE.get();
    if at != secs {
        let rendered = httpdate::fmt_http_date(now);
        text.copy_from_slice(&rendered.as_bytes()[..29]);
        DATE.set((secs, text));
    }
    out.put_slice(&text);
}

/// A connection whose first bytes were read already: they come first.
pub(crate) struct Rewind<S> {
    read: Bytes,
    io: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(io: S, read: Bytes) -> Rewind<S> {
        Rewind { read, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn read_one(raw: &str) -> Read {
        read(&mut BytesMut::from(raw), &Limits::default())
    }

    fn parsed(raw: &str) -> Parsed {
        match read_one(raw) {
            Read::Request(p) => p,
            Read::Partial => panic!("{raw:?}: partial"),
            Read::Http2 => panic!("{raw:?}: http2"),
            Read::Refused(e) => panic!("{raw:?}: refused: {e}"),
        }
    }

    fn refused(raw: &str) -> GatewayError {
        match read_one(raw) {
            Read::Refused(e) => e,
            _ => panic!("{raw:?}: not refused"),
        }
    }

    #[test]
    fn heads_are_read_whole_and_leave_what_follows() {
        let mut buf = BytesMut::from("GET /a?b HTTP/1.1\r\nhost: x\r\nx-y: 1\r\n\r\nGET /next");
        let Read::Request(p) = read(&mut buf, &Limits::default()) else {
            panic!("a request");
        };
        assert_eq!(p.request.uri, "/a?b");
        assert_eq!(
            p.request.get(&http::HeaderName::from_static("x-y")),
            Some(&b"1"[..])
        );
        assert!(!p.close);
        assert_eq!(&buf[..], b"GET /next", "the next request stays buffered");
        assert!(matches!(read(&mut buf, &Limits::default()), Read::Partial));
        assert!(parsed("DELETE / HTTP/1.1\r\nconnection: keep-alive, close\r\n\r\n").close);
    }

    #[test]
    fn framing_follows_the_head() {
        assert_eq!(
            parsed("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n").body,
            BodyFraming::Length(5)
        );
        assert_eq!(
            parsed("POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n").body,
            BodyFraming::Length(5)
        );
        assert_eq!(
            parsed("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n").body,
            BodyFraming::Chunked
        );
        assert_eq!(parsed("GET / HTTP/1.1\r\n\r\n").body, BodyFraming::None);
        assert!(
            parsed("PUT / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n")
                .expect_continue
        );
        let up = parsed("GET / HTTP/1.1\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n");
        assert!(up.upgrade);
        // HTTP/1.0 closes unless asked to keep the connection.
        assert!(parsed("GET / HTTP/1.0\r\n\r\n").close);
        assert!(!parsed("GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").close);
        assert_eq!(
            parsed("GET / HTTP/1.0\r\n\r\n").request.version,
            Version::HTTP_10
        );
        // Absolute-form targets are read here too.
        assert_eq!(
            parsed("GET http://a/x HTTP/1.1\r\nhost: b\r\n\r\n")
                .request
                .uri,
            "http://a/x"
        );
    }

    #[test]
    fn smuggling_shapes_and_malformed_heads_are_refused() {
        for raw in [
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 0x10\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: identity\r\n\r\n",
            "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header line\r\n\r\n",
            "GET / HTTP/1.1\r\nx-a: 1\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nx a: 1\r\n\r\n",
            "GET /a<b> HTTP/1.1\r\nhost: x\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            let e = refused(raw);
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{raw:?}: {e}");
        }
        assert_eq!(
            refused("PUT / HTTP/1.1\r\nexpect: tea\r\n\r\n").status(),
            StatusCode::EXPECTATION_FAILED
        );
    }

    #[test]
    fn heads_past_the_limits_are_refused_before_they_are_whole() {
        let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000));
        assert_eq!(refused(&long_target).status(), StatusCode::URI_TOO_LONG);
        let long_line = format!("GET /{}", "a".repeat(1 << 20));
        assert_eq!(refused(&long_line).status(), StatusCode::URI_TOO_LONG);
        let many_bytes = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(40 * 1024));
        assert_eq!(
            refused(&many_bytes).status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\n{many}\r\n")).status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn the_http2_preface_is_told_apart() {
        assert!(matches!(
            read_one("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Read::Http2
        ));
        assert!(matches!(read_one("PRI * HTTP/2"), Read::Partial));
        // Not the preface: an HTTP/1 request (which the pipeline refuses).
        assert!(matches!(
            read_one("PRI * HTTP/1.1\r\n\r\n"),
            Read::Request(_)
        ));
    }
}

/// Property tests of the head reader against another parser: hyper's
/// HTTP/1 server reads the same bytes. Where both take a request they must
/// agree on it (method, target, fields, body) and on where the next one
/// starts: a disagreement there is how requests are smuggled past a proxy.
/// The seeds are `fuzz/corpus/h1-heads.txt`, mutated byte by byte, and
/// heads built from tricky parts. `PROPTEST_CASES` sets how many (`.ci/run`
/// runs many more than `cargo test`).
#[cfg(test)]
mod differential {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use http_body_util::BodyExt;
    use proptest::prelude::*;

    use super::*;
    use crate::config::Limits;

    /// A request as one reader saw it, and whether the one after it (the
    /// marker `GET /next`) was found where it should be.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        method: String,
        target: String,
        fields: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        next_found: bool,
    }

    const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nhost: n\r\n\r\n";

    /// tollgate's reading: the head, the body as the loop decodes it, then
    /// the next head. `None` when it refuses the request or it is cut short.
    fn ours(bytes: &[u8]) -> Option<Seen> {
        let mut buf = BytesMut::from(bytes);
        let Read::Request(parsed) = read(&mut buf, &Limits::default()) else {
            return None;
        };
        let mut body = Vec::new();
        if let BodyFraming::Length(_) | BodyFraming::Chunked = parsed.body {
            let (feed, fed) = crate::http::body::fed_body(None);
            let chunk = match parsed.body {
                BodyFraming::Length(n) => Chunk::Data(n),
                _ => Chunk::Size,
            };
            let mut reader = BodyReader::new(feed, chunk, false);
            if matches!(parsed.body, BodyFraming::Length(0)) {
                reader.whole();
            }
            reader.decode(&mut buf).ok()?;
            if reader.state != BodyState::Whole {
                return None;
            }
            let mut fed = ClientBody::Fed(fed);
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            loop {
                match Pin::new(&mut fed).poll_frame(&mut cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        body.extend_from_slice(&frame.into_data().unwrap_or_default())
                    }
                    Poll::Ready(None) => break,
                    _ => return None,
                }
            }
        }
        // A connection that closes after this request reads no other.
        let next_found = !parsed.close
            && matches!(read(&mut buf, &Limits::default()), Read::Request(p) if p.request.uri == "/next");
        let req = parsed.request;
        Some(Seen {
            method: req.method.to_string(),
            target: req.uri.to_string(),
            fields: req
                .fields
                .iter()
                .map(|f| (f.0.to_string(), req.value(f).to_vec()))
                .collect(),
            body,
            next_found,
        })
    }

    /// hyper's reading of the same bytes, on an in-memory connection.
    async fn hypers(bytes: Vec<u8>) -> Option<Seen> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let tx = tx.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes().to_vec());
                    let _ = tx.send((parts, body));
                    Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
                }
            });
        let conn = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                // The client's end of the bytes is no reason to drop the
                // requests read before it.
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        client.write_all(&bytes).await.ok()?;
        client.shutdown().await.ok()?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink),
        )
        .await;
        conn.abort();
        let (parts, body) = rx.try_recv().ok()?;
        let body = body.ok()?;
        let next_found = rx.try_recv().is_ok_and(|(p, _)| p.uri.path() == "/next");
        Some(Seen {
            method: parts.method.to_string(),
            target: parts.uri.to_string(),
            fields: parts
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            body,
            next_found,
        })
    }

    fn unescape(line: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chars = line.bytes().peekable();
        while let Some(b) = chars.next() {
            if b != b'\\' {
                out.push(b);
                continue;
            }
            match chars.next() {
                Some(b'r') => out.push(b'\r'),
                Some(b'n') => out.push(b'\n'),
                Some(b't') => out.push(b'\t'),
                Some(b'x') => {
                    let hex: Vec<u8> = chars.by_ref().take(2).collect();
                    let text = std::str::from_utf8(&hex).unwrap_or("00");
                    out.push(u8::from_str_radix(text, 16).unwrap_or(0));
                }
                Some(other) => out.push(other),
                None => {}
            }
        }
        out
    }

    fn seeds() -> Vec<Vec<u8>> {
        include_str!("../../fuzz/corpus/h1-heads.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(unescape)
            .collect()
    }

    /// A seed with a few bytes changed, inserted or removed.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        let seeds = seeds();
        (
            0..seeds.len(),
            prop::collection::vec(
                (
                    any::<u16>(),
                    0u8..3,
                    prop::sample::select(&b"\r\n :;,\t0a-Xx"[..]),
                ),
                0..4,
            ),
        )
            .prop_map(move |(i, edits)| {
                let mut bytes = seeds[i].clone();
                for (at, kind, b) in edits {
                    let at = usize::from(at) % (bytes.len() + 1);
                    match kind {
                        0 if at < bytes.len() => bytes[at] = b,
                        1 => bytes.insert(at, b),
                        _ if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        _ => {}
                    }
                }
                bytes
            })
    }

    /// A head built from parts that readers have disagreed on.
    fn built() -> impl Strategy<Value = Vec<u8>> {
        let names = prop::sample::select(vec![
            "host",
            "content-length",
            "Content-Length",
            "transfer-encoding",
            "Transfer-Encoding",
            "connection",
            "expect",
            "x-a",
            "content-length ",
            " x-b",
            "te",
            "x_y",
        ]);
        let values = prop::sample::select(vec![
            "5",
            "0",
            "chunked",
            "Chunked",
            "gzip, chunked",
            "chunked, gzip",
            "5, 5",
            "-1",
            "+5",
            "05",
            "close",
            "keep-alive",
            "100-continue",
            "a",
            "",
            " chunked",
            "chunked ",
        ]);
        let line_end = prop::sample::select(vec!["\r\n", "\n"]);
        let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "http/1.1"]);
        let body = prop::sample::select(vec![
            "",
            "hello",
            "5\r\nhello\r\n0\r\n\r\n",
            "5\nhello\n0\n\n",
            "0\r\n\r\n",
            "5;x=y\r\nhello\r\n0\r\nt: 1\r\n\r\n",
            "3\r\nhello\r\n0\r\n\r\n",
        ]);
        (
            version,
            prop::collection::vec((names, values, line_end.clone()), 0..5),
            line_end,
            body,
        )
            .prop_map(|(version, fields, end, body)| {
                let mut out = format!("POST /p HTTP{}{end}", &version[4..]).into_bytes();
                for (n, v, e) in fields {
                    out.extend_from_slice(format!("{n}: {v}{e}").as_bytes());
                }
                out.extend_from_slice(end.as_bytes());
                out.extend_from_slice(body.as_bytes());
                out
            })
    }

    /// Whether both took a request (so the comparison said something).
    fn agree(bytes: &[u8], runtime: &tokio::runtime::Runtime) -> Result<bool, TestCaseError> {
        let mut with_next = bytes.to_vec();
        with_next.extend_from_slice(NEXT);
        let ours = ours(&with_next);
        let theirs = runtime.block_on(hypers(with_next.clone()));
        if let (Some(ours), Some(theirs)) = (&ours, &theirs) {
            prop_assert_eq!(
                &ours.method,
                &theirs.method,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            prop_assert_eq!(
                &ours.body,
                &theirs.body,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            prop_assert_eq!(
                ours.next_found,
                theirs.next_found,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            // hyper keeps origin-form targets as they are; fields likewise,
            // but for repeats of one Content-Length, which it folds into
            // one (the bodies above say both framed it alike).
            prop_assert_eq!(&ours.target, &theirs.target);
            // (A header map groups a name's values: compare by name.)
            let framing = |fields: &[(String, Vec<u8>)]| -> Vec<(String, Vec<u8>)> {
                let mut kept: Vec<_> = fields
                    .iter()
                    .filter(|(n, _)| n != "content-length")
                    .cloned()
                    .collect();
                kept.sort_by(|a, b| a.0.cmp(&b.0));
                kept
            };
            prop_assert_eq!(framing(&ours.fields), framing(&theirs.fields));
            return Ok(true);
        }
        Ok(false)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn the_seeds_are_read_alike() {
        let runtime = runtime();
        let mut compared = 0;
        let seeds = seeds();
        for seed in &seeds {
            compared += usize::from(agree(seed, &runtime).unwrap());
            // And the reader never panics on any prefix of them.
            for end in 0..seed.len() {
                let _ = read(&mut BytesMut::from(&seed[..end]), &Limits::default());
            }
        }
        // Most seeds are requests both readers take: the comparison bites.
        assert!(compared * 2 > seeds.len(), "{compared} of {}", seeds.len());
    }

    proptest! {
        #[test]
        fn mutated_seeds_are_read_alike(bytes in mutated()) {
            agree(&bytes, &runtime())?;
        }

        #[test]
        fn built_heads_are_read_alike(bytes in built()) {
            agree(&bytes, &runtime())?;
        }

        #[test]
        fn any_bytes_are_read_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = read(&mut BytesMut::from(&bytes[..]), &Limits::default());
            let _ = crate::http::canonical::path(&String::from_utf8_lossy(&bytes));
            let _ = crate::http::canonical::authority(&String::from_utf8_lossy(&bytes));
        }
    }
}
