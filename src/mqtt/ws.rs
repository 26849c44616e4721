//! MQTT over WebSocket is a byte stream cut into binary messages (a packet
//! may span messages, a message may hold several packets): this reads the
//! messages' bytes as one stream and sends each write as one message.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::transport::websocket::WebSocket;

pub struct WsBytes {
    ws: WebSocket,
    /// What is left of the last message read.
    pending: Bytes,
}

impl WsBytes {
    pub fn new(ws: WebSocket) -> WsBytes {
        WsBytes {
            ws,
            pending: Bytes::new(),
        }
    }
}

fn io_error(e: WsError) -> std::io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => std::io::ErrorKind::BrokenPipe.into(),
        e => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    }
}

impl AsyncRead for WsBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                // The end of the stream reads as zero bytes.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // MQTT is binary; a text message is a protocol error
                // (MQTT 5 §6.0).
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a text message on an MQTT WebSocket",
                    )));
                }
                // Pings are answered by the WebSocket layer.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::binary(Bytes::copy_from_slice(data)))
            .map_err(io_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(Pin::new(&mut self.ws).poll_close(cx)).map_err(io_error)?;
        // Then the connection under it: TLS's close_notify and the FIN
        // (see `websocket::finish`).
        Pin::new(self.ws.get_mut()).poll_shutdown(cx)
    }
}
