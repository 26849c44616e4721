//! What a target connection runs on: plain TCP, or TLS over it; and the
//! byte stream a connection becomes once it has switched protocols.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Buf;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::H1Conn;

/// A connection's transport. TLS is boxed: most targets are plain, and
/// their connections need not carry a TLS session's size.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// How the connections of one `https://` target URL are made: its TLS
/// settings (offering `http/1.1` by ALPN) and the name its certificate is
/// checked for. Pooled connections are told apart by `id`, so a connection
/// made for one name or trust store never carries another's requests.
pub struct TlsOrigin {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    pub(super) id: u64,
}

impl TlsOrigin {
    pub fn new(config: &ClientConfig, server_name: ServerName<'static>) -> Arc<TlsOrigin> {
        // 0 is plain connections' key.
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut config = config.clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(TlsOrigin {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub(super) async fn handshake(&self, tcp: TcpStream) -> io::Result<UpstreamIo> {
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await?;
        Ok(UpstreamIo::Tls(Box::new(tls)))
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}

/// A target connection that switched protocols (a `101` to an upgrade
/// request): what the target sent after its `101` comes first, then the
/// connection's bytes as they arrive.
pub struct Upgraded(pub(super) Box<H1Conn>);

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let conn = &mut *self.get_mut().0;
        if !conn.buf.is_empty() {
            let n = conn.buf.len().min(buf.remaining());
            buf.put_slice(&conn.buf[..n]);
            conn.buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut conn.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0.io).poll_shutdown(cx)
    }
}
