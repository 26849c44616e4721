//! Writing a request to a target: the head in one buffer, then the body as
//! it streams in, with its length as the client gave it or chunked.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::Body;
use tokio::io::AsyncWrite;

use super::H1Error;
use crate::http::body::{RequestBody, RequestBodyError};
use crate::http::wire;

/// How a request's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    Chunked,
    /// The length the head declares (none declared: no body).
    Length(u64),
}

const LONGER: &str = "longer than its content-length";
const SHORTER: &str = "shorter than its content-length";

/// Writes a request to the target: the head, then the body as it streams
/// in. Body data that is ready goes out in the same write as the head.
pub(crate) struct RequestWriter {
    /// The head, kept whole for a resend; `head_sent` of it is written.
    head: Bytes,
    head_sent: usize,
    /// `None` once the body has ended.
    body: Option<RequestBody>,
    /// `None`: chunked; otherwise the body bytes the head still promises,
    /// which the body must match exactly.
    remaining: Option<u64>,
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
    pub(super) fn new(head: Bytes, body: RequestBody, framing: RequestFraming) -> RequestWriter {
        RequestWriter {
            head,
            head_sent: 0,
            body: (!body.is_end_stream()).then_some(body),
            remaining: match framing {
                RequestFraming::Chunked => None,
                RequestFraming::Length(n) => Some(n),
            },
            pending: VecDeque::new(),
            pending_bytes: 0,
        }
    }

    /// The whole head, written or not: what a resend starts from.
    pub(super) fn into_head(self) -> Bytes {
        self.head
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
                    if self.remaining.is_none() {
                        self.push(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
                // Trailers are not forwarded.
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => match &mut self.remaining {
                        None => {
                            let line = wire::chunk_size_line(data.len(), &mut [0; 18]).to_vec();
                            self.push(Bytes::from(line));
                            self.push(data);
                            self.push(Bytes::from_static(b"\r\n"));
                        }
                        Some(remaining) => {
                            *remaining = remaining
                                .checked_sub(data.len() as u64)
                                .ok_or(H1Error::Body(RequestBodyError::Length(LONGER)))?;
                            self.push(data);
                        }
                    },
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
        io: &mut (impl AsyncWrite + Unpin),
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), H1Error>> {
        loop {
            self.gather(cx)?;
            let head = &self.head[self.head_sent..];
            if head.is_empty() && self.pending.is_empty() {
                // TLS keeps what the socket would not take yet; it must
                // not wait there for more body or the response.
                ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(H1Error::Io)?;
                return match (&self.body, self.remaining) {
                    (Some(_), _) => Poll::Pending,
                    (None, Some(1..)) => {
                        Poll::Ready(Err(H1Error::Body(RequestBodyError::Length(SHORTER))))
                    }
                    (None, _) => Poll::Ready(Ok(())),
                };
            }
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let queued = std::iter::once(head)
                .filter(|h| !h.is_empty())
                .chain(self.pending.iter().map(|b| &b[..]));
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
            let from_head = written.min(head.len());
            self.head_sent += from_head;
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
    use std::future::poll_fn;

    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::http::body::ClientBody;

    /// A body of `data` as our server side reads it: a real hyper `Incoming`
    /// from a POST over loopback.
    async fn incoming(data: &'static [u8]) -> Incoming {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let tx = std::sync::Mutex::new(Some(tx));
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(req.into_body());
                }
                std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .await;
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
            data.len()
        );
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(data).await.unwrap();
        // The client side stays open while the body is read.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        });
        rx.await.unwrap()
    }

    /// Writes `body` after a head declaring `framing` to a loopback peer;
    /// what the peer got, or the writer's error.
    async fn write(body: RequestBody, framing: RequestFraming) -> Result<Vec<u8>, H1Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut io = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut writer = RequestWriter::new(Bytes::from_static(b"HEAD\r\n\r\n"), body, framing);
        poll_fn(|cx| writer.poll_write(&mut io, cx)).await?;
        drop(io);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        Ok(got)
    }

    fn streaming(body: Incoming) -> RequestBody {
        RequestBody::streaming(ClientBody::Hyper(body), 1 << 20, Default::default())
    }

    #[tokio::test]
    async fn a_body_is_held_to_its_declared_length() {
        let got = write(
            streaming(incoming(b"hello world").await),
            RequestFraming::Length(11),
        )
        .await;
        assert_eq!(got.unwrap(), b"HEAD\r\n\r\nhello world");
        let got = write(
            streaming(incoming(b"hello world").await),
            RequestFraming::Chunked,
        )
        .await;
        assert_eq!(got.unwrap(), b"HEAD\r\n\r\nb\r\nhello world\r\n0\r\n\r\n");

        let longer = write(
            streaming(incoming(b"hello world").await),
            RequestFraming::Length(5),
        )
        .await;
        assert!(
            matches!(longer, Err(H1Error::Body(RequestBodyError::Length(LONGER)))),
            "{longer:?}"
        );
        let shorter = write(
            streaming(incoming(b"hello world").await),
            RequestFraming::Length(20),
        )
        .await;
        assert!(
            matches!(
                shorter,
                Err(H1Error::Body(RequestBodyError::Length(SHORTER)))
            ),
            "{shorter:?}"
        );
        let none = write(RequestBody::empty(), RequestFraming::Length(3)).await;
        assert!(
            matches!(none, Err(H1Error::Body(RequestBodyError::Length(SHORTER)))),
            "{none:?}"
        );
        assert_eq!(
            write(RequestBody::empty(), RequestFraming::Length(0))
                .await
                .unwrap(),
            b"HEAD\r\n\r\n"
        );
    }
}
