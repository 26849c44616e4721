//! tollgate's own HTTP/1.1 server loop for plain-TCP connections, for the
//! common request: a complete head in the buffer, no body, no upgrade. It
//! runs the request through the gateway's one pipeline and writes the
//! response from the connection's own task, with no per-connection
//! dispatcher in between.
//! Anything else (a body, `Expect`, an upgrade, HTTP/1.0, a head split over
//! reads, a malformed head) hands the connection with what it has read over
//! to hyper, which serves it from then on.

use std::cell::Cell;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::header;
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::conn::ConnState;
use super::listener::Shutdown;
use crate::http::ConnMemo;
use crate::http::HttpEntry;
use crate::http::body::ProxyBody;
use crate::http::headers::{self, X_REQUEST_ID};
use crate::http::wire::{self, RequestHead};

/// Request heads with more headers than this go to hyper (which applies the
/// listener's limits the same way).
const MAX_HEADERS: usize = 64;

/// How the loop ended.
pub(super) enum Ended {
    Closed,
    /// Serve the rest with hyper, starting with these bytes.
    HandOff(TcpStream, Bytes),
}

pub(super) async fn serve(
    mut io: TcpStream,
    state: Arc<ConnState>,
    entry: HttpEntry,
    shutdown: &Shutdown,
) -> Ended {
    let limits = &state.listener.limits;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(1024);
    let mut idle = pin!(state.idle_for(limits.idle_timeout));
    let mut graceful = pin!(shutdown.drain.wait());
    // A new connection sends its first head within the header-read timeout
    // (as hyper has it), so silent connections do not hold their slots for
    // the whole idle timeout.
    let mut first_head = pin!(tokio::time::sleep(limits.header_read_timeout));
    let mut served = false;
    let mut memo = ConnMemo::default();
    // The direct path's request timer, moved along from request to request
    // (see `proxy::forward`); armed by the first request.
    let mut deadline = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    loop {
        if buf.is_empty() {
            buf.reserve(4096);
            let read = tokio::select! {
                biased;
                read = io.read_buf(&mut buf) => read,
                _ = &mut graceful => return Ended::Closed,
                _ = &mut first_head, if !served => {
                    tracing::debug!(listener = %state.listener.name, peer = %state.peer,
                        "no request within the header-read timeout; closing");
                    return Ended::Closed;
                }
                _ = &mut idle => {
                    tracing::debug!(listener = %state.listener.name, peer = %state.peer, "closing idle connection");
                    return Ended::Closed;
                }
            };
            match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => state.touch(),
            }
        }
        let Some(parsed) = parse_request(&mut buf) else {
            return Ended::HandOff(io, buf.freeze());
        };
        served = true;
        let head = parsed.request.method == Method::HEAD;
        let close = parsed.close || shutdown.drain.started();
        let request = parsed.request;
        let response = run(
            pin!(entry.serve(&request, &mut memo, deadline.as_mut())),
            &io,
            &mut buf,
        )
        .await;
        let Some(response) = response else {
            tracing::debug!(listener = %state.listener.name, peer = %state.peer,
                "client closed the connection; request cancelled");
            return Ended::Closed;
        };
        // As for requests to targets (`upstream::h1`): responses go out in
        // one burst per event-loop turn, waking clients less often.
        crate::transport::after_ready_tasks().await;
        let (parts, mut body) = response.into_parts();
        let written = tokio::select! {
            biased;
            written = write_response(&mut io, &mut out, &parts, &mut body, head, close, &state) => written,
            // A client that stops reading is closed like an idle one.
            _ = &mut idle => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took nothing for the idle timeout",
            )),
        };
        drop((parts, body));
        if let Err(e) = written {
            tracing::debug!(listener = %state.listener.name, peer = %state.peer, error = %e,
                "response not written whole; closing the connection");
            return Ended::Closed;
        }
        if close {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

/// Pipelined bytes read while a request runs are kept up to this much.
const MAX_READ_AHEAD: usize = 64 * 1024;

/// Runs the request through the stack while watching the connection:
/// bytes that arrive meanwhile (pipelined requests) are kept in `buf`; the
/// end of the stream means the client is gone, and `None` drops (cancels)
/// the request.
///
/// The request comes pinned where it was made: moving it in by value would
/// copy it, and keep a second slot for it in this future.
async fn run(
    mut request: Pin<&mut impl Future<Output = Response<ProxyBody>>>,
    io: &TcpStream,
    buf: &mut BytesMut,
) -> Option<Response<ProxyBody>> {
    loop {
        tokio::select! {
            biased;
            response = &mut request => return Some(response),
            // Readiness only: no read is tried until the socket has news.
            // The socket's own reader slot is watched (`readable()` would
            // add and remove a waiter under a lock each time), and it is
            // the slot the next request's read waits in.
            ready = std::future::poll_fn(|cx| io.poll_read_ready(cx)), if buf.len() < MAX_READ_AHEAD => {
                ready.ok()?;
                buf.reserve(4096);
                match io.try_read_buf(buf) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return None,
                }
            }
        }
    }
}

struct Parsed {
    request: RequestHead,
    /// The client asked to close after this response.
    close: bool,
}

/// A complete, body-less HTTP/1.1 request at the front of `buf`, consumed;
/// `None` (and `buf` untouched) for anything hyper should read instead.
fn parse_request(buf: &mut BytesMut) -> Option<Parsed> {
    // Uninitialised slots: zeroing them all costs more than the parse.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path?;
    if !path.starts_with('/') {
        return None;
    }
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let fields = wire::fields(buf, parsed.headers)?;
    let mut close = false;
    for (name, range) in &fields {
        let value = &buf[range.clone()];
        match *name {
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE => return None,
            header::CONTENT_LENGTH if value != b"0" => return None,
            header::CONNECTION => {
                for token in wire::list_elements(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return None;
                    }
                }
            }
            _ => {}
        }
    }
    let path_start = path.as_ptr() as usize - buf.as_ptr() as usize;
    let path_range = path_start..path_start + path.len();

    let head = buf.split_to(len).freeze();
    match Uri::from_maybe_shared(head.slice(path_range)) {
        Ok(uri) => Some(Parsed {
            request: RequestHead {
                head,
                method,
                uri,
                version: Version::HTTP_11,
                fields,
            },
            close,
        }),
        // httparse takes targets that `http` refuses (`/a<b>`): hyper gets
        // the head back, with what follows, and answers it.
        Err(_) => {
            give_back(buf, &head);
            None
        }
    }
}

/// Puts a head split off `buf` back in front of it.
fn give_back(buf: &mut BytesMut, head: &[u8]) {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(head);
    whole.extend_from_slice(buf);
    *buf = whole;
}

/// Writes the head and streams the body: with its length when it is known,
/// chunked otherwise.
// The response is borrowed: taken by value, it would sit in this future
// twice (as argument and as its parts).
async fn write_response(
    io: &mut TcpStream,
    out: &mut BytesMut,
    parts: &http::response::Parts,
    body: &mut ProxyBody,
    head_request: bool,
    close: bool,
    state: &ConnState,
) -> std::io::Result<()> {
    let status = parts.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.clear();
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    // A direct-path response has its target's fields as they came, then
    // what tollgate adds; any other has all its fields in its map.
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
    if close {
        out.put_slice(b"connection: close\r\n");
    }
    let mut declared = match lines {
        Some(lines) => lines.content_length,
        None => parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| wire::length_value(v.as_bytes())),
    };
    let mut chunked = false;
    if !bodiless && declared.is_none() {
        match body.size_hint().exact() {
            Some(n) => {
                wire::put_length_field(out, "content-length", n);
                declared = Some(n);
            }
            None => {
                out.put_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        }
    }
    out.put_slice(b"\r\n");
    if bodiless || body.is_end_stream() {
        if chunked {
            out.put_slice(b"0\r\n\r\n");
        }
        io.write_all(out).await?;
        state.touch();
        return check_length(declared, 0, bodiless);
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
    check_length(declared, sent, false)
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

async fn write_all_vectored(io: &mut TcpStream, parts: &mut [&[u8]]) -> std::io::Result<()> {
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

/// A connection handed over to hyper: what was read already comes first.
pub(super) struct Rewind {
    read: Bytes,
    io: TcpStream,
}

impl Rewind {
    pub(super) fn new(io: TcpStream, read: Bytes) -> Rewind {
        Rewind { read, io }
    }
}

impl AsyncRead for Rewind {
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
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
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

    fn parse(raw: &str) -> Option<Parsed> {
        parse_request(&mut BytesMut::from(raw))
    }

    #[test]
    fn plain_requests_are_read_here() {
        let mut buf = BytesMut::from("GET /a?b HTTP/1.1\r\nhost: x\r\nx-y: 1\r\n\r\nGET /next");
        let p = parse_request(&mut buf).unwrap();
        assert_eq!(p.request.uri, "/a?b");
        assert_eq!(
            p.request.get(&http::HeaderName::from_static("x-y")),
            Some(&b"1"[..])
        );
        assert!(!p.close);
        assert_eq!(&buf[..], b"GET /next", "the next request stays buffered");
        assert!(
            parse("DELETE / HTTP/1.1\r\nconnection: keep-alive, close\r\n\r\n")
                .unwrap()
                .close
        );
        assert!(parse("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n").is_some());
    }

    #[test]
    fn everything_else_is_left_to_hyper() {
        for raw in [
            "GET / HTTP/1.1\r\nhost: x\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "PUT / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
            "GET /a<b> HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            assert!(parse_request(&mut buf).is_none(), "{raw:?}");
            assert_eq!(&buf[..], raw.as_bytes(), "left as read");
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        assert!(parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).is_none());
    }
}
