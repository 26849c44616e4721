//! Writing a request to a target: the head in one buffer, then the body as
//! it streams in, with its length as the client gave it or chunked.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header;
use http::request::Parts;
use http_body::Body;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::H1Error;
use crate::http::body::RequestBody;
use crate::http::wire;

/// Encodes the request line and headers. Returns whether the body must be
/// sent chunked (it has content but no declared length).
pub(super) fn encode_head(parts: &Parts, body: &RequestBody, out: &mut BytesMut) -> bool {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    wire::put_fields(out, &parts.headers);
    let mut chunked = false;
    if !body.is_end_stream() && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        match body.size_hint().exact() {
            Some(n) => wire::put_length_field(out, "content-length", n),
            None => {
                out.put_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        }
    }
    out.put_slice(b"\r\n");
    chunked
}

/// Writes a request to the target: the head, then the body as it streams
/// in. Body data that is ready goes out in the same write as the head.
pub(crate) struct RequestWriter {
    /// What is left of the head to write.
    head: Bytes,
    /// `None` once the body has ended.
    body: Option<RequestBody>,
    chunked: bool,
    /// Body data encoded and not yet written, in order (stays unallocated
    /// for a request without body).
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
}

/// Body data gathered ahead of a write, at most.
const GATHER_BYTES: usize = 64 * 1024;
/// Buffers per vectored write, at most.
const WRITE_SLICES: usize = 8;

impl RequestWriter {
    pub(super) fn new(head: Bytes, body: RequestBody, chunked: bool) -> RequestWriter {
        RequestWriter {
            head,
            body: (!body.is_end_stream()).then_some(body),
            chunked,
            pending: VecDeque::new(),
            pending_bytes: 0,
        }
    }

    /// The head, as long as none of it has been written.
    pub(super) fn head(&self) -> &Bytes {
        &self.head
    }

    fn push(&mut self, bytes: Bytes) {
        self.pending_bytes += bytes.len();
        self.pending.push_back(bytes);
    }

    /// Moves what the body has ready into `pending`.
    fn gather(&mut self, cx: &mut Context<'_>) -> Result<(), H1Error> {
        while self.pending_bytes < GATHER_BYTES {
            let Some(body) = self.body.as_mut() else {
                return Ok(());
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(None) => {
                    self.body = None;
                    if self.chunked {
                        self.push(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
                // Trailers are not forwarded.
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => {
                        if self.chunked {
                            let line = wire::chunk_size_line(data.len(), &mut [0; 18]).to_vec();
                            self.push(Bytes::from(line));
                            self.push(data);
                            self.push(Bytes::from_static(b"\r\n"));
                        } else {
                            self.push(data);
                        }
                    }
                    _ => {}
                },
                Poll::Ready(Some(Err(e))) => return Err(H1Error::Body(e)),
            }
        }
        Ok(())
    }

    /// Ready once the whole request has been written.
    pub(super) fn poll_write(
        &mut self,
        io: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), H1Error>> {
        loop {
            self.gather(cx)?;
            if self.head.is_empty() && self.pending.is_empty() {
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let queued = std::iter::once(&self.head)
                .filter(|h| !h.is_empty())
                .chain(&self.pending);
            let mut count = 0;
            for (slice, bytes) in slices.iter_mut().zip(queued) {
                *slice = IoSlice::new(bytes);
                count += 1;
            }
            let mut written = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))
                .map_err(H1Error::Io)?;
            if written == 0 {
                return Poll::Ready(Err(H1Error::Io(std::io::ErrorKind::WriteZero.into())));
            }
            let from_head = written.min(self.head.len());
            self.head.advance(from_head);
            written -= from_head;
            self.pending_bytes -= written;
            while written > 0 {
                let front = self
                    .pending
                    .front_mut()
                    .expect("written bytes were pending");
                let n = written.min(front.len());
                front.advance(n);
                written -= n;
                if front.is_empty() {
                    self.pending.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_is_origin_form_with_every_header() {
        let (parts, ()) = http::Request::put("/a?b=1")
            .header("host", "up")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = BytesMut::new();
        assert!(!encode_head(&parts, &RequestBody::empty(), &mut out));
        assert_eq!(
            &out[..],
            b"PUT /a?b=1 HTTP/1.1\r\nhost: up\r\nx-two: 1\r\nx-two: 2\r\n\r\n"
        );
    }
}
