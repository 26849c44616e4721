//! WAMP over RawSocket (the WAMP spec's "RawSocket Transport"): a 4-byte
//! opening handshake, then length-prefixed frames.
//!
//! Handshake: the client sends `0x7F`, `LLLL SSSS`, `0`, `0` — `LLLL` the
//! largest message it accepts (2^(9+L) bytes) and `SSSS` the serializer
//! (1 JSON, 2 MessagePack, 3 CBOR). The router echoes the serializer with its
//! own length, or answers `0x7F`, `EEEE 0000`, `0`, `0` with an error code
//! and closes.
//!
//! Frames: `RRRR XTTT` then a 24-bit big-endian length and the payload.
//! `TTT` is 0 for a WAMP message, 1 for PING, 2 for PONG; `X` is a 25th
//! length bit, set only for a payload of exactly 2^24 bytes (with the 24
//! length bits clear); `RRRR` must be zero.
//!
//! [`RawSocket::recv`] is cancel safe: partial frames stay in the
//! connection's read buffer, and bytes to write (a PONG, a message whose
//! `send` was dropped halfway) stay in its write buffer until a later call
//! writes them, so a frame is never lost or cut.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::message::Serializer;

/// The first byte of a RawSocket handshake (no HTTP request starts with it).
pub const FIRST_BYTE: u8 = 0x7F;

/// The largest payload the 24 length bits hold; one byte more needs the
/// X bit, which autobahn does not know, so we never send it.
const MAX_24: usize = (1 << 24) - 1;
/// The largest payload a frame can have (X bit set).
const MAX_FRAME: usize = 1 << 24;

const HEADER: usize = 4;
const TYPE_MESSAGE: u8 = 0;
const TYPE_PING: u8 = 1;
const TYPE_PONG: u8 = 2;
const X_BIT: u8 = 0x08;

/// How much the read buffer grows by at a time: a client that announces a
/// large frame and then trickles it costs memory for what it sent, not for
/// what it claimed.
const READ_CHUNK: usize = 64 * 1024;
/// A write buffer larger than this is given back once it is empty.
const KEEP_WRITE_CAPACITY: usize = 64 * 1024;

/// Handshake error codes (the high nibble of the reply's second byte).
const ERR_SERIALIZER: u8 = 1;
const ERR_RESERVED: u8 = 3;
const ERR_MAX_CONNECTIONS: u8 = 4;

/// Why a RawSocket opening handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// Reading or writing failed, or the client closed the connection
    /// (`UnexpectedEof`) before its 4 bytes arrived.
    Io(io::Error),
    /// The first byte is not 0x7F: not a RawSocket client. Nothing was
    /// written.
    NotRawSocket,
    /// The client asked for this serializer, which we do not speak (0 is
    /// illegal, 4 UBJSON and 5 FlatBuffers are not implemented). Answered
    /// with error 1.
    UnsupportedSerializer(u8),
    /// The client set the reserved third or fourth byte. Answered with
    /// error 3.
    Reserved,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the client closed the connection during the RawSocket handshake")
            }
            HandshakeError::Io(e) => write!(f, "RawSocket handshake I/O error: {e}"),
            HandshakeError::NotRawSocket => {
                f.write_str("not a WAMP RawSocket client (first byte is not 0x7F)")
            }
            HandshakeError::UnsupportedSerializer(s) => write!(
                f,
                "the client asked for RawSocket serializer {s}, which is not supported \
                 (1 JSON, 2 MessagePack, 3 CBOR); refused with error 1"
            ),
            HandshakeError::Reserved => f.write_str(
                "the client set the reserved bytes of its RawSocket handshake; refused with error 3",
            ),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandshakeError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// The serializer's RawSocket number.
fn serializer_id(s: Serializer) -> u8 {
    match s {
        Serializer::Json => 1,
        Serializer::MsgPack => 2,
        Serializer::Cbor => 3,
    }
}

fn serializer_from_id(id: u8) -> Option<Serializer> {
    match id {
        1 => Some(Serializer::Json),
        2 => Some(Serializer::MsgPack),
        3 => Some(Serializer::Cbor),
        _ => None,
    }
}

/// The length nibble for a limit of `max_message` bytes: the largest `n`
/// with 2^(9+n) <= `max_message`, 0 (512 bytes) when it is smaller.
fn length_exponent(max_message: usize) -> u8 {
    (0..=15u8)
        .rev()
        .find(|n| 1usize << (9 + n) <= max_message)
        .unwrap_or(0)
}

/// Reads the 4-byte handshake; `NotRawSocket` after the first byte if it
/// is not 0x7F (nothing more is read).
async fn read_handshake<S: AsyncRead + Unpin>(io: &mut S) -> Result<[u8; 3], HandshakeError> {
    let mut first = [0u8; 1];
    io.read_exact(&mut first).await?;
    if first[0] != FIRST_BYTE {
        return Err(HandshakeError::NotRawSocket);
    }
    let mut rest = [0u8; 3];
    io.read_exact(&mut rest).await?;
    Ok(rest)
}

/// Answers with error `code` and closes the write side; write errors are
/// of no interest (the connection is being refused anyway).
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, code: u8) {
    let _ = io.write_all(&[FIRST_BYTE, code << 4, 0, 0]).await;
    let _ = io.flush().await;
    let _ = io.shutdown().await;
}

/// Reads the client's 4-byte handshake from `io` (within the time the
/// caller gives with `tokio::time::timeout` around it) and answers it.
/// `max_message` is our limit in bytes: we announce the largest 2^(9+n)
/// not above it (at least 512), and that announced limit is what
/// [`RawSocket::recv`] enforces.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    max_message: usize,
) -> Result<RawSocket<S>, HandshakeError> {
    let [octet2, r1, r2] = read_handshake(&mut io).await?;
    if r1 != 0 || r2 != 0 {
        refuse(&mut io, ERR_RESERVED).await;
        return Err(HandshakeError::Reserved);
    }
    let requested = octet2 & 0x0F;
    let Some(serializer) = serializer_from_id(requested) else {
        refuse(&mut io, ERR_SERIALIZER).await;
        return Err(HandshakeError::UnsupportedSerializer(requested));
    };
    let ours = length_exponent(max_message);
    io.write_all(&[FIRST_BYTE, ours << 4 | serializer_id(serializer), 0, 0])
        .await?;
    io.flush().await?;
    let theirs = octet2 >> 4;
    Ok(RawSocket {
        io,
        serializer,
        recv_limit: 1 << (9 + ours),
        send_limit: (1usize << (9 + theirs)).min(MAX_24),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        done: false,
    })
}

/// Reads a client's handshake and refuses it with error 4 ("maximum
/// connection count reached"), then closes the write side. `Ok` when the
/// refusal was sent to a RawSocket client.
pub async fn refuse_busy<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
) -> Result<(), HandshakeError> {
    read_handshake(&mut io).await?;
    refuse(&mut io, ERR_MAX_CONNECTIONS).await;
    Ok(())
}

/// One frame parsed out of the read buffer.
enum Frame {
    Message(Bytes),
    Ping(Bytes),
    Pong,
}

/// A WAMP RawSocket connection after a successful handshake.
pub struct RawSocket<S> {
    io: S,
    serializer: Serializer,
    /// The largest payload we accept (what we announced).
    recv_limit: usize,
    /// The largest payload we send (what the client announced, at most
    /// 2^24 - 1).
    send_limit: usize,
    /// Bytes read and not yet returned (partial frames survive a dropped
    /// `recv`).
    rbuf: BytesMut,
    /// Bytes to write before anything else (PONGs, the rest of a message
    /// whose `send` was dropped halfway).
    wbuf: BytesMut,
    /// EOF, an I/O error, a protocol error or `close`: `recv` says None.
    done: bool,
}

impl<S> fmt::Debug for RawSocket<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSocket")
            .field("serializer", &self.serializer)
            .field("recv_limit", &self.recv_limit)
            .field("send_limit", &self.send_limit)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawSocket<S> {
    /// The serializer the client chose.
    pub fn serializer(&self) -> Serializer {
        self.serializer
    }

    /// The largest message we accept (the limit we announced).
    pub fn max_recv(&self) -> usize {
        self.recv_limit
    }

    /// The largest message `send` takes (the limit the client announced,
    /// capped at 2^24 - 1).
    pub fn max_send(&self) -> usize {
        self.send_limit
    }

    /// The underlying connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The next WAMP message's bytes. PINGs are answered here (the PONG
    /// echoes the payload); PONGs are ignored.
    ///
    /// `None`: the peer closed (EOF), the connection failed, or a protocol
    /// error was returned before. `Some(Err(text))`: a protocol error
    /// (oversized frame, bad frame type, reserved bits) — log it and drop
    /// the connection.
    ///
    /// Cancel safe: a future dropped halfway loses nothing; the next call
    /// continues where it stopped.
    pub async fn recv(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            if self.done {
                return None;
            }
            // A queued PONG (or the rest of a dropped send) goes first;
            // until the peer takes it we read no more from it.
            if !self.wbuf.is_empty() && self.drain().await.is_err() {
                self.done = true;
                return None;
            }
            match self.parse() {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(Some(Frame::Message(m))) => return Some(Ok(m)),
                Ok(Some(Frame::Ping(payload))) => {
                    self.queue(TYPE_PONG, &payload);
                    continue;
                }
                Ok(Some(Frame::Pong)) => continue,
                Ok(None) => {}
            }
            let wanted = self.missing().clamp(1, READ_CHUNK);
            self.rbuf.reserve(wanted);
            match self.io.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// Sends one message. `Err` of kind `InvalidInput` (nothing written)
    /// when it is longer than the client accepts; any other `Err` is the
    /// write failing.
    ///
    /// If the future is dropped halfway, the rest of the frame is written
    /// by the next `send`, `recv`, `ping` or `close`.
    pub async fn send(&mut self, message: &[u8]) -> io::Result<()> {
        self.feed(message)?;
        self.drain().await
    }

    /// Queues one message to be written by the next [`flush`](Self::flush)
    /// (or `send`): several messages go out in one write.
    pub fn feed(&mut self, message: &[u8]) -> io::Result<()> {
        self.check_send(message.len(), "message")?;
        self.queue(TYPE_MESSAGE, message);
        Ok(())
    }

    /// Writes whatever is queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.drain().await
    }

    /// Sends a PING with `payload` (the peer answers with a PONG, which
    /// `recv` ignores).
    ///
    /// Careful: autobahn-python (asyncio and Twisted) does not implement
    /// PING: asyncio raises `NotImplementedError`, Twisted takes the frame
    /// type for length bits. Either drops the connection. Only ping peers
    /// known to implement it.
    pub async fn ping(&mut self, payload: &[u8]) -> io::Result<()> {
        self.check_send(payload.len(), "PING payload")?;
        self.queue(TYPE_PING, payload);
        self.drain().await
    }

    /// Writes what is still queued, then shuts the write side down
    /// (errors are ignored: the connection is ending). Later `recv` calls
    /// return `None`.
    pub async fn close(&mut self) {
        if !self.wbuf.is_empty() {
            let _ = self.drain().await;
        }
        let _ = self.io.shutdown().await;
        self.done = true;
    }

    fn check_send(&self, len: usize, what: &str) -> io::Result<()> {
        if len > self.send_limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "RawSocket {what} of {len} bytes is over the {}-byte limit the client announced",
                    self.send_limit
                ),
            ));
        }
        Ok(())
    }

    /// Appends a frame to the write buffer (`payload` is at most 2^24 - 1
    /// bytes: the send limit, or a PING's payload, which is at most our
    /// receive limit and sent back without the X bit only if it fits).
    fn queue(&mut self, kind: u8, payload: &[u8]) {
        let len = payload.len();
        let header = if len > MAX_24 {
            // Only an echoed 2^24-byte PING gets here.
            [kind | X_BIT, 0, 0, 0]
        } else {
            let l = (len as u32).to_be_bytes();
            [kind, l[1], l[2], l[3]]
        };
        self.wbuf.reserve(HEADER + len);
        self.wbuf.put_slice(&header);
        self.wbuf.put_slice(payload);
    }

    /// Writes the write buffer out and flushes. Cancel safe: what was
    /// written is removed from the buffer, what was not stays.
    async fn drain(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            let n = self.io.write(&self.wbuf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.wbuf.advance(n);
        }
        if self.wbuf.capacity() > KEEP_WRITE_CAPACITY {
            self.wbuf = BytesMut::new();
        }
        self.io.flush().await
    }

    /// The frame header at the start of the read buffer, checked: (type,
    /// payload length). `Ok(None)`: fewer than 4 bytes buffered.
    fn header(&self) -> Result<Option<(u8, usize)>, String> {
        let Some(h) = self.rbuf.get(..HEADER) else {
            return Ok(None);
        };
        if h[0] & 0xF0 != 0 {
            return Err(format!(
                "RawSocket frame with reserved bits set (first byte {:#04x})",
                h[0]
            ));
        }
        let kind = h[0] & 0x07;
        if kind > TYPE_PONG {
            return Err(format!("RawSocket frame of unknown type {kind}"));
        }
        let mut len = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
        if h[0] & X_BIT != 0 {
            if len != 0 {
                return Err(
                    "RawSocket frame with the 25th length bit set and a non-zero length".into(),
                );
            }
            len = MAX_FRAME;
        }
        if len > self.recv_limit {
            return Err(format!(
                "RawSocket frame of {len} bytes is over the {}-byte limit we announced",
                self.recv_limit
            ));
        }
        Ok(Some((kind, len)))
    }

    /// How many more bytes the frame being read needs (a header's worth
    /// when its header is not complete yet).
    fn missing(&self) -> usize {
        match self.header() {
            Ok(Some((_, len))) => (HEADER + len).saturating_sub(self.rbuf.len()),
            _ => HEADER - self.rbuf.len().min(HEADER) + READ_CHUNK / 16,
        }
    }

    /// Takes one complete frame out of the read buffer.
    fn parse(&mut self) -> Result<Option<Frame>, String> {
        let Some((kind, len)) = self.header()? else {
            return Ok(None);
        };
        if self.rbuf.len() < HEADER + len {
            return Ok(None);
        }
        self.rbuf.advance(HEADER);
        let payload = self.rbuf.split_to(len).freeze();
        Ok(Some(match kind {
            TYPE_MESSAGE => Frame::Message(payload),
            TYPE_PING => Frame::Ping(payload),
            _ => Frame::Pong,
        }))
    }
}

/// Reads one byte (to tell a RawSocket client, whose first byte is 0x7F,
/// from an HTTP/WebSocket one). `None` at EOF.
pub async fn read_first_byte<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    match io.read(&mut b).await? {
        0 => Ok(None),
        _ => Ok(Some(b[0])),
    }
}

pin_project_lite::pin_project! {
    /// A connection some of whose first bytes were read already (the byte
    /// [`read_first_byte`] took, or what an HTTP head parser read past the
    /// head): reading replays them first, writing goes straight through.
    #[derive(Debug)]
    pub struct Prefixed<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    /// `inner`, whose reads start with `prefix`.
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }

    /// `inner` after one byte read from it: reads start with `first`.
    pub fn with_first_byte(first: u8, inner: S) -> Prefixed<S> {
        Prefixed::new(Bytes::copy_from_slice(&[first]), inner)
    }

    /// The bytes still to replay.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The connection; the bytes not replayed yet (see [`Prefixed::prefix`])
    /// are dropped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.is_empty() || buf.remaining() == 0 {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

impl<S: crate::transport::Stream> crate::transport::Stream for Prefixed<S> {
    fn alpn(&self) -> Option<&[u8]> {
        self.inner.alpn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Waker;
    use tokio::io::{DuplexStream, duplex};

    /// Handshake as a client with `octet2`; the router's reply and socket.
    async fn connect(
        octet2: u8,
        max_message: usize,
    ) -> (DuplexStream, [u8; 4], RawSocket<DuplexStream>) {
        let (mut client, server) = duplex(1 << 16);
        client.write_all(&[0x7F, octet2, 0, 0]).await.unwrap();
        let socket = accept(server, max_message).await.unwrap();
        let mut reply = [0u8; 4];
        client.read_exact(&mut reply).await.unwrap();
        (client, reply, socket)
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let l = (payload.len() as u32).to_be_bytes();
        let mut f = vec![kind, l[1], l[2], l[3]];
        f.extend_from_slice(payload);
        f
    }

    async fn read_frame(client: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut h = [0u8; 4];
        client.read_exact(&mut h).await.unwrap();
        let len = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
        let mut payload = vec![0u8; len];
        client.read_exact(&mut payload).await.unwrap();
        (h[0], payload)
    }

    /// Polls `fut` once; true when it is still pending.
    fn poll_once<F: Future>(fut: F) -> bool {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        fut.as_mut().poll(&mut cx).is_pending()
    }

    /// The client sends `octet2` (and reserved bytes `r`); the router's
    /// reply, whether it closed afterwards, and accept's result.
    async fn refused(bytes: [u8; 4]) -> (Vec<u8>, HandshakeError) {
        let (mut client, server) = duplex(1024);
        client.write_all(&bytes).await.unwrap();
        let err = accept(server, 1 << 20).await.unwrap_err();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        (reply, err)
    }

    #[tokio::test]
    async fn handshake_for_each_serializer() {
        for (id, ser) in [
            (1, Serializer::Json),
            (2, Serializer::MsgPack),
            (3, Serializer::Cbor),
        ] {
            let (_client, reply, socket) = connect(0xF0 | id, 1 << 20).await;
            assert_eq!(reply, [0x7F, (11 << 4) | id, 0, 0]);
            assert_eq!(socket.serializer(), ser);
            assert_eq!(socket.max_recv(), 1 << 20);
            // autobahn's 0xF: 2^24, which 24 length bits cannot say.
            assert_eq!(socket.max_send(), (1 << 24) - 1);
        }
    }

    #[test]
    fn length_nibble_for_limits() {
        for (max, n) in [
            (0, 0),
            (100, 0),
            (512, 0),
            (1023, 0),
            (1024, 1),
            (65_535, 6),
            (65_536, 7),
            (1 << 20, 11),
            ((1 << 24) - 1, 14),
            (1 << 24, 15),
            (usize::MAX, 15),
        ] {
            assert_eq!(length_exponent(max), n, "max_message {max}");
        }
    }

    #[tokio::test]
    async fn announced_length_and_client_limit() {
        let (_c, reply, socket) = connect(0x01, 65_536).await;
        assert_eq!(reply, [0x7F, 0x71, 0, 0]);
        assert_eq!(socket.max_recv(), 65_536);
        assert_eq!(socket.max_send(), 512);
        let (_c, reply, socket) = connect(0x52, 300).await;
        assert_eq!(reply, [0x7F, 0x02, 0, 0]);
        assert_eq!(socket.max_recv(), 512);
        assert_eq!(socket.max_send(), 1 << 14);
    }

    #[tokio::test]
    async fn unsupported_serializer_is_refused_with_error_1() {
        let (reply, err) = refused([0x7F, 0xF5, 0, 0]).await;
        assert_eq!(reply, [0x7F, 0x10, 0, 0]);
        assert!(matches!(err, HandshakeError::UnsupportedSerializer(5)));
        assert!(err.to_string().contains("serializer 5"), "{err}");
        let (reply, err) = refused([0x7F, 0xF0, 0, 0]).await;
        assert_eq!(reply, [0x7F, 0x10, 0, 0]);
        assert!(matches!(err, HandshakeError::UnsupportedSerializer(0)));
    }

    #[tokio::test]
    async fn reserved_bytes_are_refused_with_error_3() {
        for bytes in [[0x7F, 0xF1, 1, 0], [0x7F, 0xF1, 0, 0x80]] {
            let (reply, err) = refused(bytes).await;
            assert_eq!(reply, [0x7F, 0x30, 0, 0]);
            assert!(matches!(err, HandshakeError::Reserved));
        }
    }

    #[tokio::test]
    async fn not_rawsocket_writes_nothing() {
        let (mut client, server) = duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let err = accept(server, 1 << 20).await.unwrap_err();
        assert!(matches!(err, HandshakeError::NotRawSocket), "{err}");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert!(reply.is_empty());
    }

    #[tokio::test]
    async fn eof_during_handshake() {
        let (mut client, server) = duplex(1024);
        client.write_all(&[0x7F, 0xF1]).await.unwrap();
        drop(client);
        let err = accept(server, 1 << 20).await.unwrap_err();
        assert!(
            matches!(&err, HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err}"
        );
        assert!(err.to_string().contains("closed"), "{err}");
    }

    #[tokio::test]
    async fn refuse_busy_answers_error_4() {
        let (mut client, server) = duplex(1024);
        client.write_all(&[0x7F, 0xF1, 0, 0]).await.unwrap();
        refuse_busy(server).await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, [0x7F, 0x40, 0, 0]);
    }

    #[tokio::test]
    async fn messages_both_ways() {
        let (mut client, _, mut socket) = connect(0xF1, 1 << 20).await;
        // Two frames in one write, then one split over writes.
        let mut both = frame(0, br#"[1,"realm1",{}]"#);
        both.extend(frame(0, b""));
        client.write_all(&both).await.unwrap();
        assert_eq!(
            socket.recv().await.unwrap().unwrap(),
            &br#"[1,"realm1",{}]"#[..]
        );
        assert_eq!(socket.recv().await.unwrap().unwrap(), &b""[..]);
        let big = vec![7u8; 200_000];
        let f = frame(0, &big);
        let writer = tokio::spawn(async move {
            for part in f.chunks(3001) {
                client.write_all(part).await.unwrap();
            }
            client
        });
        assert_eq!(socket.recv().await.unwrap().unwrap(), big);
        let mut client = writer.await.unwrap();

        socket.send(br#"[2,1,{}]"#).await.unwrap();
        socket.send(b"").await.unwrap();
        assert_eq!(read_frame(&mut client).await, (0, br#"[2,1,{}]"#.to_vec()));
        assert_eq!(read_frame(&mut client).await, (0, Vec::new()));
    }

    #[tokio::test]
    async fn ping_is_answered_with_pong_and_pong_ignored() {
        let (mut client, _, mut socket) = connect(0xF1, 1 << 20).await;
        let mut bytes = frame(1, b"abc");
        bytes.extend(frame(2, b"ignored"));
        bytes.extend(frame(1, b""));
        bytes.extend(frame(0, b"[]"));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(socket.recv().await.unwrap().unwrap(), &b"[]"[..]);
        assert_eq!(read_frame(&mut client).await, (2, b"abc".to_vec()));
        assert_eq!(read_frame(&mut client).await, (2, Vec::new()));

        socket.ping(b"hi").await.unwrap();
        assert_eq!(read_frame(&mut client).await, (1, b"hi".to_vec()));
    }

    #[tokio::test]
    async fn oversized_frame_fails_without_reading_it() {
        let (mut client, _, mut socket) = connect(0xF1, 1 << 20).await;
        // At the limit: fine.
        let writer = tokio::spawn(async move {
            client
                .write_all(&frame(0, &vec![1u8; 1 << 20]))
                .await
                .unwrap();
            client
        });
        assert_eq!(socket.recv().await.unwrap().unwrap().len(), 1 << 20);
        drop(writer.await.unwrap());
        // One over: refused from the header alone.
        let (mut client, _, mut socket) = connect(0xF1, 1 << 20).await;
        let claim = (1u32 << 20) + 1;
        let l = claim.to_be_bytes();
        client
            .write_all(&[0, l[1], l[2], l[3], 1, 2, 3])
            .await
            .unwrap();
        let err = socket.recv().await.unwrap().unwrap_err();
        assert!(err.contains("1048577 bytes"), "{err}");
        assert!(
            socket.rbuf.capacity() < 1 << 20,
            "{}",
            socket.rbuf.capacity()
        );
        assert!(socket.recv().await.is_none());
        // The largest 24-bit claim and the X bit against a 512-byte limit.
        for header in [[0, 0xFF, 0xFF, 0xFF], [0x08, 0, 0, 0]] {
            let (mut client, reply, mut socket) = connect(0xF1, 512).await;
            assert_eq!(reply[1], 0x01);
            client.write_all(&header).await.unwrap();
            let err = socket.recv().await.unwrap().unwrap_err();
            assert!(err.contains("512-byte limit"), "{err}");
            assert!(socket.rbuf.capacity() < 1 << 16);
        }
        // A large claim is read in chunks: memory follows what arrives.
        let (mut client, _, mut socket) = connect(0xF1, 1 << 24).await;
        client.write_all(&[0, 0xFF, 0xFF, 0xFF, 9]).await.unwrap();
        assert!(poll_once(socket.recv()));
        assert!(
            socket.rbuf.capacity() <= 2 * READ_CHUNK,
            "{}",
            socket.rbuf.capacity()
        );
    }

    #[tokio::test]
    async fn bad_frame_types_and_reserved_bits_fail() {
        for header in [
            [3, 0, 0, 0],
            [7, 0, 0, 1],
            [0x10, 0, 0, 0],
            [0x80, 0, 0, 0],
            [0x08, 0, 0, 1],
        ] {
            let (mut client, _, mut socket) = connect(0xF1, 1 << 24).await;
            client.write_all(&header).await.unwrap();
            client.write_all(b"x").await.unwrap();
            let err = socket.recv().await.unwrap().unwrap_err();
            assert!(err.starts_with("RawSocket frame"), "{err}");
            assert!(socket.recv().await.is_none());
        }
    }

    #[tokio::test]
    async fn send_over_client_limit_is_invalid_input() {
        let (mut client, _, mut socket) = connect(0x01, 1 << 20).await;
        let err = socket.send(&[b'x'; 513]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("512-byte limit"), "{err}");
        let err = socket.ping(&[0; 513]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // Nothing of it was written; a message at the limit goes.
        socket.send(&[b'y'; 512]).await.unwrap();
        assert_eq!(read_frame(&mut client).await, (0, vec![b'y'; 512]));
    }

    #[tokio::test]
    async fn recv_dropped_mid_frame_loses_nothing() {
        let (mut client, _, mut socket) = connect(0xF1, 1 << 20).await;
        let f = frame(0, b"[1,\"realm1\",{}]");
        // Half a header, then the rest of the header and half the payload.
        client.write_all(&f[..2]).await.unwrap();
        assert!(poll_once(socket.recv()));
        client.write_all(&f[2..10]).await.unwrap();
        assert!(poll_once(socket.recv()));
        client.write_all(&f[10..]).await.unwrap();
        assert_eq!(socket.recv().await.unwrap().unwrap(), &f[4..]);

        // Also inside select! against a channel, as the session uses it.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        client.write_all(&f[..7]).await.unwrap();
        tx.send(1).await.unwrap();
        tokio::select! {
            biased;
            _ = socket.recv() => panic!("message not complete yet"),
            n = rx.recv() => assert_eq!(n, Some(1)),
        }
        client.write_all(&f[7..]).await.unwrap();
        assert_eq!(socket.recv().await.unwrap().unwrap(), &f[4..]);
    }

    #[tokio::test]
    async fn send_dropped_midway_finishes_its_frame_later() {
        let (mut client, server) = duplex(16);
        client.write_all(&[0x7F, 0xF1, 0, 0]).await.unwrap();
        let mut socket = accept(server, 1 << 20).await.unwrap();
        let mut reply = [0u8; 4];
        client.read_exact(&mut reply).await.unwrap();
        // The pipe takes 16 bytes; the rest of the frame stays queued.
        let first = vec![b'a'; 100];
        assert!(poll_once(socket.send(&first)));
        let reader = tokio::spawn(async move {
            let a = read_frame(&mut client).await;
            let b = read_frame(&mut client).await;
            (a, b)
        });
        socket.send(b"second").await.unwrap();
        let (a, b) = reader.await.unwrap();
        assert_eq!(a, (0, first));
        assert_eq!(b, (0, b"second".to_vec()));
    }

    #[tokio::test]
    async fn eof_is_none() {
        let (client, _, mut socket) = connect(0xF1, 1 << 20).await;
        drop(client);
        assert!(socket.recv().await.is_none());
        assert!(socket.recv().await.is_none());
        // Mid-frame too.
        let (mut client, _, mut socket) = connect(0xF1, 1 << 20).await;
        client.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        drop(client);
        assert!(socket.recv().await.is_none());
    }

    #[tokio::test]
    async fn close_shuts_the_write_side() {
        let (mut client, _, mut socket) = connect(0xF1, 1 << 20).await;
        socket.send(b"[3,{},\"bye\"]").await.unwrap();
        socket.close().await;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, frame(0, b"[3,{},\"bye\"]"));
        assert!(socket.recv().await.is_none());
    }

    #[tokio::test]
    async fn prefixed_replays_the_first_byte() {
        let (mut client, mut server) = duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let b = read_first_byte(&mut server).await.unwrap();
        assert_eq!(b, Some(b'G'));
        let mut io = Prefixed::with_first_byte(b.unwrap(), server);
        let mut line = [0u8; 16];
        io.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET / HTTP/1.1\r\n");
        io.write_all(b"HTTP/1.1 400 Bad Request\r\n").await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 400 Bad Request\r\n");

        // One byte at a time.
        let (mut client, mut server) = duplex(1024);
        client.write_all(b"xy").await.unwrap();
        let b = read_first_byte(&mut server).await.unwrap();
        let mut io = Prefixed::with_first_byte(b.unwrap(), server);
        let mut one = [0u8; 1];
        io.read_exact(&mut one).await.unwrap();
        assert_eq!(one, *b"x");
        io.read_exact(&mut one).await.unwrap();
        assert_eq!(one, *b"y");

        // Several bytes (what an HTTP parser read past the head), read in
        // small pieces, then the stream; into_inner after they are read.
        let (mut client, server) = duplex(1024);
        client.write_all(b"tail").await.unwrap();
        let mut io = Prefixed::new(Bytes::from_static(b"abcde"), server);
        let mut three = [0u8; 3];
        io.read_exact(&mut three).await.unwrap();
        assert_eq!(&three, b"abc");
        assert_eq!(io.prefix(), b"de");
        let mut six = [0u8; 6];
        io.read_exact(&mut six).await.unwrap();
        assert_eq!(&six, b"detail");
        assert!(io.prefix().is_empty());
        let mut server = io.into_inner();
        server.write_all(b"direct").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"direct");

        // EOF before any byte.
        let (client, mut server) = duplex(1024);
        drop(client);
        assert_eq!(read_first_byte(&mut server).await.unwrap(), None);
    }

    #[tokio::test]
    async fn prefixed_into_accept() {
        let (mut client, mut server) = duplex(1024);
        client.write_all(&[0x7F, 0xF2, 0, 0]).await.unwrap();
        client
            .write_all(&frame(0, b"\x93\x01\xa1r\x80"))
            .await
            .unwrap();
        let b = read_first_byte(&mut server).await.unwrap();
        assert_eq!(b, Some(FIRST_BYTE));
        let mut socket = accept(Prefixed::with_first_byte(b.unwrap(), server), 1 << 20)
            .await
            .unwrap();
        assert_eq!(socket.serializer(), Serializer::MsgPack);
        let mut reply = [0u8; 4];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, [0x7F, 0xB2, 0, 0]);
        assert_eq!(
            socket.recv().await.unwrap().unwrap(),
            &b"\x93\x01\xa1r\x80"[..]
        );
    }
}
