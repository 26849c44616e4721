//! WAMP load against any router (tollgate or Crossbar), for
//! `benches/wamp_load.sh`, which runs it against both in one go. The
//! client side is written here: RawSocket and WebSocket framing, the
//! opening messages through serde (JSON, or MessagePack with rmp-serde),
//! and the messages of the hot paths (CALL, INVOCATION, YIELD, RESULT,
//! PUBLISH, EVENT) written and read by hand, so that one thread of the
//! tool keeps a router on a core of its own busy. None of tollgate's code.
//!
//!   TARGET=127.0.0.1:8080 SCENARIO=rpc TRANSPORT=websocket SERIALIZER=json cargo bench --bench wamp_load
//!
//! TRANSPORT is `rawsocket` (default) or `websocket` (at WS_PATH, `/ws`);
//! SERIALIZER `msgpack` (default) or `json`; REALM `realm1`. Every session
//! joins anonymously. Call and event arguments are `[timestamp, sequence,
//! "x..."]`, PAYLOAD (100) bytes in MessagePack. Scenarios (each prints one
//! line of `key=value`):
//! - `rpc`: one callee registers `com.bench.echo` and answers every
//!   INVOCATION with a YIELD of its arguments; CALLERS (10) sessions call
//!   it, each keeping WINDOW (32) calls outstanding: calls/s answered and
//!   p50/p99 from CALL to RESULT. `CALLERS=1 WINDOW=1` is the latency run.
//!   With CALLEE_TARGET=host:port the callee joins there instead (another
//!   node of a cluster: calls cross the bus), and the callers start once a
//!   call on TARGET is answered.
//! - `fanout`: SUBSCRIBERS (100) sessions subscribe to `com.bench.topic`;
//!   one session publishes to it (unacknowledged), never more than WINDOW
//!   (64) publications ahead of the slowest subscriber (so the router, not
//!   its queues, sets the pace, and nothing is dropped for being slow), at
//!   RATE publications/s when given, else as fast as the window allows:
//!   events/s received (summed over the subscribers), p50/p99 from
//!   PUBLISH to EVENT, events missing (`drops`, from gaps in the sequence)
//!   and subscribers the router closed (`closed`).
//! - `idle`: CONNS (1000) joined sessions, held until stdin closes (the
//!   script reads the router's RSS meanwhile).

#![allow(clippy::print_stdout)] // the tool's output

use std::cell::{Cell, RefCell};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fail(what: impl Into<String>) -> io::Error {
    io::Error::other(what.into())
}

const HELLO: u64 = 1;
const WELCOME: u64 = 2;
const ABORT: u64 = 3;
const GOODBYE: u64 = 6;
const ERROR: u64 = 8;
const PUBLISH: u64 = 16;
const SUBSCRIBE: u64 = 32;
const SUBSCRIBED: u64 = 33;
const EVENT: u64 = 36;
const CALL: u64 = 48;
const RESULT: u64 = 50;
const REGISTER: u64 = 64;
const REGISTERED: u64 = 65;
const INVOCATION: u64 = 68;
const YIELD: u64 = 70;

const PROCEDURE: &str = "com.bench.echo";
const TOPIC: &str = "com.bench.topic";

#[derive(Clone, Copy, PartialEq)]
enum Ser {
    Json,
    MsgPack,
}

/// Where a CALL's result, an INVOCATION's or an EVENT's arguments start:
/// after the type code, the ids and the details dict.
struct Head {
    code: u64,
    /// Elements in the message (MessagePack only).
    len: usize,
    /// RESULT: the request; INVOCATION: the request; EVENT: the
    /// subscription.
    id: u64,
    /// The offset just past the details (JSON: before the comma).
    at: usize,
}

// MessagePack, the little of it the hot paths need.

fn mp_uint(b: &[u8], i: usize) -> Option<(u64, usize)> {
    let t = *b.get(i)?;
    let be = |n: usize| -> Option<(u64, usize)> {
        let s = b.get(i + 1..i + 1 + n)?;
        Some((
            s.iter().fold(0u64, |a, x| a << 8 | u64::from(*x)),
            i + 1 + n,
        ))
    };
    match t {
        0x00..=0x7f => Some((u64::from(t), i + 1)),
        0xcc | 0xd0 => be(1),
        0xcd | 0xd1 => be(2),
        0xce | 0xd2 => be(4),
        0xcf | 0xd3 => be(8),
        _ => None,
    }
}

fn mp_array(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let t = *b.get(i)?;
    let n = match t {
        0x90..=0x9f => return Some((usize::from(t & 0x0f), i + 1)),
        0xdc => 2,
        0xdd => 4,
        _ => return None,
    };
    let s = b.get(i + 1..i + 1 + n)?;
    Some((
        s.iter().fold(0usize, |a, x| a << 8 | usize::from(*x)),
        i + 1 + n,
    ))
}

/// The offset after the value at `i`.
fn mp_skip(b: &[u8], i: usize) -> Option<usize> {
    let t = *b.get(i)?;
    let len = |n: usize| -> Option<usize> {
        let s = b.get(i + 1..i + 1 + n)?;
        Some(s.iter().fold(0usize, |a, x| a << 8 | usize::from(*x)))
    };
    let items = |mut j: usize, n: usize| -> Option<usize> {
        for _ in 0..n {
            j = mp_skip(b, j)?;
        }
        Some(j)
    };
    let end = match t {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => i + 1,
        0x80..=0x8f => items(i + 1, 2 * usize::from(t & 0x0f))?,
        0x90..=0x9f => items(i + 1, usize::from(t & 0x0f))?,
        0xa0..=0xbf => i + 1 + usize::from(t & 0x1f),
        0xc4 | 0xd9 => i + 2 + len(1)?,
        0xc5 | 0xda => i + 3 + len(2)?,
        0xc6 | 0xdb => i + 5 + len(4)?,
        0xc7 => i + 3 + len(1)?,
        0xc8 => i + 4 + len(2)?,
        0xc9 => i + 6 + len(4)?,
        0xca => i + 5,
        0xcb => i + 9,
        0xcc | 0xd0 => i + 2,
        0xcd | 0xd1 => i + 3,
        0xce | 0xd2 => i + 5,
        0xcf | 0xd3 => i + 9,
        0xd4 => i + 3,
        0xd5 => i + 4,
        0xd6 => i + 6,
        0xd7 => i + 10,
        0xd8 => i + 18,
        0xdc => items(i + 3, len(2)?)?,
        0xdd => items(i + 5, len(4)?)?,
        0xde => items(i + 3, 2 * len(2)?)?,
        0xdf => items(i + 5, 2 * len(4)?)?,
        _ => return None,
    };
    (end <= b.len()).then_some(end)
}

fn mp_put_uint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=0x7f => out.push(v as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, v as u8]),
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

fn mp_put_str(out: &mut Vec<u8>, s: &[u8]) {
    match s.len() {
        n @ 0..=31 => out.push(0xa0 | n as u8),
        n @ 32..=255 => out.extend_from_slice(&[0xd9, n as u8]),
        n => {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(s);
}

// JSON, the same little.

fn js_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// Past whitespace and `c`.
fn js_expect(b: &[u8], i: usize, c: u8) -> Option<usize> {
    let i = js_ws(b, i);
    (*b.get(i)? == c).then_some(i + 1)
}

fn js_uint(b: &[u8], i: usize) -> Option<(u64, usize)> {
    let start = js_ws(b, i);
    let mut i = start;
    let mut v = 0u64;
    while let Some(d @ b'0'..=b'9') = b.get(i) {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        i += 1;
    }
    (i > start).then_some((v, i))
}

/// The offset after the value at `i`.
fn js_skip(b: &[u8], i: usize) -> Option<usize> {
    let mut i = js_ws(b, i);
    let mut depth = 0usize;
    loop {
        match *b.get(i)? {
            b'"' => {
                i += 1;
                loop {
                    match *b.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            b',' | b'}' | b']' if depth == 0 => return Some(i),
            _ => i += 1,
        }
    }
}

impl Ser {
    fn parse(name: &str) -> Option<Ser> {
        match name {
            "json" => Some(Ser::Json),
            "msgpack" => Some(Ser::MsgPack),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Ser::Json => "json",
            Ser::MsgPack => "msgpack",
        }
    }

    /// The RawSocket serializer number.
    fn raw_id(self) -> u8 {
        match self {
            Ser::Json => 1,
            Ser::MsgPack => 2,
        }
    }

    fn encode(self, v: &Value, out: &mut Vec<u8>) {
        match self {
            Ser::Json => serde_json::to_writer(out, v).expect("encodable"),
            Ser::MsgPack => out.extend(rmp_serde::to_vec(v).expect("encodable")),
        }
    }

    /// A message as text, for error reports.
    fn show(self, m: &[u8]) -> String {
        let v = match self {
            Ser::Json => serde_json::from_slice::<Value>(m).ok(),
            Ser::MsgPack => rmp_serde::from_slice::<Value>(m).ok(),
        };
        v.map_or_else(|| format!("{m:?}"), |v| v.to_string())
    }

    fn code(self, m: &[u8]) -> Option<u64> {
        match self {
            Ser::MsgPack => mp_uint(m, mp_array(m, 0)?.1).map(|c| c.0),
            Ser::Json => js_uint(m, js_expect(m, 0, b'[')?).map(|c| c.0),
        }
    }

    fn head(self, m: &[u8]) -> Option<Head> {
        let ids = |code| match code {
            RESULT => 1,
            INVOCATION | EVENT => 2,
            _ => 0,
        };
        match self {
            Ser::MsgPack => {
                let (len, i) = mp_array(m, 0)?;
                let (code, i) = mp_uint(m, i)?;
                let n = ids(code);
                if n == 0 {
                    return Some(Head {
                        code,
                        len,
                        id: 0,
                        at: i,
                    });
                }
                let (id, mut i) = mp_uint(m, i)?;
                if n == 2 {
                    i = mp_skip(m, i)?;
                }
                let at = mp_skip(m, i)?;
                Some(Head { code, len, id, at })
            }
            Ser::Json => {
                let (code, i) = js_uint(m, js_expect(m, 0, b'[')?)?;
                let n = ids(code);
                if n == 0 {
                    return Some(Head {
                        code,
                        len: 0,
                        id: 0,
                        at: i,
                    });
                }
                let (id, mut i) = js_uint(m, js_expect(m, i, b',')?)?;
                if n == 2 {
                    i = js_skip(m, js_expect(m, i, b',')?)?;
                }
                let at = js_skip(m, js_expect(m, i, b',')?)?;
                Some(Head {
                    code,
                    len: 0,
                    id,
                    at,
                })
            }
        }
    }

    /// The first two arguments (timestamp, sequence) of a message whose
    /// arguments start at `h.at`.
    fn stamps(self, m: &[u8], h: &Head) -> Option<(u64, u64)> {
        match self {
            Ser::MsgPack => {
                let (n, i) = mp_array(m, h.at)?;
                if n < 2 {
                    return None;
                }
                let (ts, i) = mp_uint(m, i)?;
                Some((ts, mp_uint(m, i)?.0))
            }
            Ser::Json => {
                let i = js_expect(m, js_expect(m, h.at, b',')?, b'[')?;
                let (ts, i) = js_uint(m, i)?;
                Some((ts, js_uint(m, js_expect(m, i, b',')?)?.0))
            }
        }
    }

    /// `[code, request, {}, uri, [ts, seq, "x..."]]`: a CALL or a PUBLISH.
    fn request(
        self,
        out: &mut Vec<u8>,
        code: u64,
        request: u64,
        uri: &str,
        stamps: (u64, u64),
        filler: &[u8],
    ) {
        match self {
            Ser::MsgPack => {
                out.extend_from_slice(&[0x95, code as u8]);
                mp_put_uint(out, request);
                out.push(0x80);
                mp_put_str(out, uri.as_bytes());
                out.extend_from_slice(&[0x93, 0xcf]);
                out.extend_from_slice(&stamps.0.to_be_bytes());
                out.push(0xcf);
                out.extend_from_slice(&stamps.1.to_be_bytes());
                mp_put_str(out, filler);
            }
            Ser::Json => {
                let _ = write!(
                    out,
                    "[{code},{request},{{}},\"{uri}\",[{},{},\"",
                    stamps.0, stamps.1
                );
                out.extend_from_slice(filler);
                out.extend_from_slice(b"\"]]");
            }
        }
    }

    /// `[YIELD, request, {}, args...]` with the INVOCATION's arguments, as
    /// they came.
    fn yield_for(self, out: &mut Vec<u8>, invocation: &[u8], h: &Head) {
        match self {
            Ser::MsgPack => {
                // An INVOCATION has 4 to 6 elements, a YIELD one fewer.
                out.extend_from_slice(&[0x90 | (h.len.clamp(2, 16) - 1) as u8, YIELD as u8]);
                mp_put_uint(out, h.id);
                out.push(0x80);
            }
            Ser::Json => {
                let _ = write!(out, "[{YIELD},{},{{}}", h.id);
            }
        }
        out.extend_from_slice(&invocation[h.at..]);
    }
}

/// The WebSocket mask (the client must mask; any key will do).
const MASK: [u8; 4] = [0x5a, 0x13, 0xc7, 0x2e];

/// Where a message read is: `start..end` of the read buffer, or (a
/// fragmented WebSocket message, put together) the fragment buffer. Valid
/// until the next `fill`.
#[derive(Clone, Copy)]
enum At {
    Buf(usize, usize),
    Frag,
}

fn message<'a>(rbuf: &'a [u8], frag: &'a [u8], at: At) -> &'a [u8] {
    match at {
        At::Buf(start, end) => &rbuf[start..end],
        At::Frag => frag,
    }
}

/// One connection: RawSocket or WebSocket, bytes to write gathered in
/// `out` and written with one `flush`. Messages are read in place.
struct Conn {
    tcp: TcpStream,
    ws: bool,
    ser: Ser,
    rbuf: BytesMut,
    /// What of `rbuf` was parsed (dropped before the next read).
    rpos: usize,
    out: Vec<u8>,
    /// The message being built (framed into `out` by `queue`).
    msg: Vec<u8>,
    /// A fragmented WebSocket message so far.
    frag: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr, ws: bool, ser: Ser) -> io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut c = Conn {
            tcp,
            ws,
            ser,
            rbuf: BytesMut::with_capacity(16 * 1024),
            rpos: 0,
            out: Vec::with_capacity(16 * 1024),
            msg: Vec::with_capacity(512),
            frag: Vec::new(),
        };
        if ws {
            let protocol = format!("wamp.2.{}", ser.name());
            let path = std::env::var("WS_PATH").unwrap_or_else(|_| "/ws".into());
            let head = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
            );
            c.tcp.write_all(head.as_bytes()).await?;
            let end = loop {
                if let Some(at) = c.rbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                c.fill().await?;
            };
            let response = String::from_utf8_lossy(&c.rbuf[..end]).to_ascii_lowercase();
            if !response.starts_with("http/1.1 101") || !response.contains(&protocol) {
                return Err(fail(format!("WebSocket handshake refused: {response}")));
            }
            c.rbuf.advance(end);
        } else {
            c.tcp.write_all(&[0x7f, 0xf0 | ser.raw_id(), 0, 0]).await?;
            let mut reply = [0u8; 4];
            c.tcp.read_exact(&mut reply).await?;
            if reply[0] != 0x7f || reply[1] & 0x0f != ser.raw_id() {
                return Err(fail(format!(
                    "RawSocket handshake refused (error {})",
                    reply[1] >> 4
                )));
            }
        }
        Ok(c)
    }

    /// The message buffer, emptied, to write the next message into.
    fn msg(&mut self) -> &mut Vec<u8> {
        self.msg.clear();
        &mut self.msg
    }

    /// Frames the message buffer into `out`.
    fn queue(&mut self) {
        let op = if self.ser == Ser::Json { 0x1 } else { 0x2 };
        let msg = std::mem::take(&mut self.msg);
        self.frame(op, &msg);
        self.msg = msg;
    }

    /// A frame of `kind` (WebSocket opcode; RawSocket: text and binary are
    /// messages, 0x9 PING, 0xA PONG).
    fn frame(&mut self, op: u8, payload: &[u8]) {
        let len = payload.len();
        if !self.ws {
            let kind = match op {
                0xA => 2,
                0x9 => 1,
                _ => 0,
            };
            let l = (len as u32).to_be_bytes();
            self.out.extend_from_slice(&[kind, l[1], l[2], l[3]]);
            self.out.extend_from_slice(payload);
            return;
        }
        self.out.push(0x80 | op);
        match len {
            0..=125 => self.out.push(0x80 | len as u8),
            126..=0xffff => {
                self.out.push(0x80 | 126);
                self.out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                self.out.push(0x80 | 127);
                self.out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        self.out.extend_from_slice(&MASK);
        self.out
            .extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
    }

    async fn send(&mut self, v: &Value) -> io::Result<()> {
        let ser = self.ser;
        ser.encode(v, self.msg());
        self.queue();
        self.flush().await
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.tcp.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Drops what was parsed from the read buffer.
    fn compact(&mut self) {
        self.rbuf.advance(self.rpos);
        self.rpos = 0;
    }

    /// Reads what has come (at least a byte).
    async fn fill(&mut self) -> io::Result<()> {
        self.compact();
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(64 * 1024);
        }
        if self.tcp.read_buf(&mut self.rbuf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// The next whole message in the read buffer. PINGs are answered
    /// (their PONG goes out with the next flush).
    fn next(&mut self) -> io::Result<Option<At>> {
        loop {
            let base = self.rpos;
            let b = &self.rbuf[base..];
            if !self.ws {
                if b.len() < 4 {
                    return Ok(None);
                }
                let kind = b[0] & 0x07;
                let len = usize::from(b[1]) << 16 | usize::from(b[2]) << 8 | usize::from(b[3]);
                if b.len() < 4 + len {
                    return Ok(None);
                }
                let (start, end) = (base + 4, base + 4 + len);
                self.rpos = end;
                match kind {
                    0 => return Ok(Some(At::Buf(start, end))),
                    1 => {
                        let ping = self.rbuf[start..end].to_vec();
                        self.frame(0xA, &ping);
                    }
                    _ => {}
                }
                continue;
            }
            if b.len() < 2 {
                return Ok(None);
            }
            let (fin, op, masked) = (b[0] & 0x80 != 0, b[0] & 0x0f, b[1] & 0x80 != 0);
            let (len, mut at) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
                    10,
                ),
                126 | 127 => return Ok(None),
                n => (usize::from(n), 2),
            };
            let key = if masked {
                at += 4;
                b.get(at - 4..at).map(|k| [k[0], k[1], k[2], k[3]])
            } else {
                None
            };
            if b.len() < at + len {
                return Ok(None);
            }
            let (start, end) = (base + at, base + at + len);
            self.rpos = end;
            if let Some(k) = key {
                for (i, x) in self.rbuf[start..end].iter_mut().enumerate() {
                    *x ^= k[i & 3];
                }
            }
            match op {
                0x0 => {
                    self.frag.extend_from_slice(&self.rbuf[start..end]);
                    if fin {
                        return Ok(Some(At::Frag));
                    }
                }
                0x1 | 0x2 if fin => return Ok(Some(At::Buf(start, end))),
                0x1 | 0x2 => {
                    self.frag.clear();
                    self.frag.extend_from_slice(&self.rbuf[start..end]);
                }
                0x8 => return Err(fail("the router closed the WebSocket")),
                0x9 => {
                    let ping = self.rbuf[start..end].to_vec();
                    self.frame(0xA, &ping);
                }
                _ => {}
            }
        }
    }

    /// The next message, copied (the opening messages).
    async fn recv(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(at) = self.next()? {
                return Ok(message(&self.rbuf, &self.frag, at).to_vec());
            }
            self.flush().await?;
            self.fill().await?;
        }
    }

    /// Sends `v` and reads until a message of type `code` (an ERROR,
    /// ABORT or GOODBYE first fails).
    async fn ask(&mut self, v: Value, code: u64) -> io::Result<()> {
        self.send(&v).await?;
        loop {
            let m = self.recv().await?;
            match self.ser.code(&m) {
                Some(c) if c == code => return Ok(()),
                Some(ERROR | ABORT | GOODBYE) | None => {
                    return Err(fail(format!("{v} answered with {}", self.ser.show(&m))));
                }
                _ => {}
            }
        }
    }

    /// A session on `realm`, joined anonymously.
    async fn join(addr: SocketAddr, ws: bool, ser: Ser, realm: &str) -> io::Result<Conn> {
        let mut c = Conn::open(addr, ws, ser).await?;
        let roles = json!({ "caller": {}, "callee": {}, "publisher": {}, "subscriber": {} });
        c.ask(json!([HELLO, realm, { "roles": roles }]), WELCOME)
            .await?;
        Ok(c)
    }
}

/// What the tasks share (one thread).
struct Shared {
    ser: Ser,
    origin: Instant,
    filler: Vec<u8>,
    /// Samples are taken (the measured window).
    recording: Cell<bool>,
    /// Calls answered, events received.
    done: Cell<u64>,
    errors: Cell<u64>,
    drops: Cell<u64>,
    closed: Cell<u64>,
    /// Nanoseconds from CALL to RESULT, or PUBLISH to EVENT.
    samples: RefCell<Vec<u64>>,
    /// A subscriber read something (the publisher may go on).
    progress: Notify,
}

impl Shared {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn ended(&self, who: &str, e: &io::Error) {
        self.closed.set(self.closed.get() + 1);
        if self.closed.get() == 1 {
            eprintln!("wamp_load: a {who} connection ended: {e}");
        }
        self.progress.notify_one();
    }
}

async fn callee(mut c: Conn, sh: Rc<Shared>) -> io::Result<()> {
    c.ask(json!([REGISTER, 1, {}, PROCEDURE]), REGISTERED)
        .await?;
    tokio::task::spawn_local(async move {
        let run = async {
            loop {
                while let Some(at) = c.next()? {
                    let m = message(&c.rbuf, &c.frag, at);
                    match sh.ser.head(m) {
                        Some(h) if h.code == INVOCATION => {
                            c.msg.clear();
                            sh.ser.yield_for(&mut c.msg, m, &h);
                            c.queue();
                        }
                        _ => return Err(fail(format!("callee got {}", sh.ser.show(m)))),
                    }
                }
                c.flush().await?;
                c.fill().await?;
            }
        };
        let r: io::Result<()> = run.await;
        if let Err(e) = r {
            sh.ended("callee", &e);
        }
    });
    Ok(())
}

async fn caller(mut c: Conn, window: usize, sh: Rc<Shared>) {
    let ser = sh.ser;
    let run = async {
        let mut request = 0u64;
        let mut outstanding = 0;
        loop {
            if outstanding < window {
                let ts = sh.now();
                while outstanding < window {
                    request += 1;
                    outstanding += 1;
                    ser.request(c.msg(), CALL, request, PROCEDURE, (ts, request), &sh.filler);
                    c.queue();
                }
            }
            c.flush().await?;
            c.fill().await?;
            let now = sh.now();
            while let Some(at) = c.next()? {
                let m = message(&c.rbuf, &c.frag, at);
                match ser.head(m) {
                    Some(h) if h.code == RESULT => {
                        outstanding -= 1;
                        sh.done.set(sh.done.get() + 1);
                        if sh.recording.get() {
                            let (ts, _) = ser.stamps(m, &h).ok_or_else(|| {
                                fail(format!("RESULT without our arguments: {}", ser.show(m)))
                            })?;
                            sh.samples.borrow_mut().push(now.saturating_sub(ts));
                        }
                    }
                    Some(h) if h.code == ERROR => {
                        outstanding -= 1;
                        if sh.errors.get() == 0 {
                            eprintln!("wamp_load: a call failed: {}", ser.show(m));
                        }
                        sh.errors.set(sh.errors.get() + 1);
                    }
                    _ => return Err(fail(format!("caller got {}", ser.show(m)))),
                }
            }
        }
    };
    let r: io::Result<()> = run.await;
    if let Err(e) = r {
        sh.ended("caller", &e);
    }
}

/// Counts events; `last` is the last sequence number seen.
async fn subscriber(mut c: Conn, last: Rc<Cell<u64>>, sh: Rc<Shared>) {
    let ser = sh.ser;
    let run = async {
        loop {
            c.fill().await?;
            let now = sh.now();
            while let Some(at) = c.next()? {
                let m = message(&c.rbuf, &c.frag, at);
                let h = ser
                    .head(m)
                    .filter(|h| h.code == EVENT)
                    .ok_or_else(|| fail(format!("subscriber got {}", ser.show(m))))?;
                let (ts, seq) = ser
                    .stamps(m, &h)
                    .ok_or_else(|| fail(format!("EVENT without our arguments: {}", ser.show(m))))?;
                if seq > last.get() + 1 {
                    sh.drops.set(sh.drops.get() + seq - last.get() - 1);
                }
                last.set(seq);
                sh.done.set(sh.done.get() + 1);
                if sh.recording.get() {
                    sh.samples.borrow_mut().push(now.saturating_sub(ts));
                }
            }
            c.flush().await?;
            sh.progress.notify_one();
        }
    };
    let r: io::Result<()> = run.await;
    if let Err(e) = r {
        last.set(u64::MAX);
        sh.ended("subscriber", &e);
    }
}

/// Publishes at most `window` ahead of the slowest subscriber still
/// connected, at `rate` publications/s when given.
async fn publisher(
    mut c: Conn,
    window: u64,
    rate: u64,
    subs: Vec<Rc<Cell<u64>>>,
    sh: Rc<Shared>,
) -> io::Result<u64> {
    let ser = sh.ser;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut seq = 0u64;
    loop {
        let slowest = subs
            .iter()
            .map(|s| s.get())
            .filter(|s| *s != u64::MAX)
            .min()
            .ok_or_else(|| fail("every subscriber is gone"))?;
        let mut allowed = (slowest + window).saturating_sub(seq);
        if rate > 0 {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            allowed = allowed.min(due.saturating_sub(seq));
        }
        if allowed > 0 {
            let ts = sh.now();
            for _ in 0..allowed {
                seq += 1;
                ser.request(c.msg(), PUBLISH, seq, TOPIC, (ts, seq), &sh.filler);
                c.queue();
            }
            c.flush().await?;
        }
        if rate > 0 {
            tick.tick().await;
        } else {
            sh.progress.notified().await;
        }
        // Whatever the router sends (an ERROR would mean a refusal) is read
        // and dropped.
        c.compact();
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::ZERO, c.tcp.read_buf(&mut c.rbuf)).await
        {
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            while let Some(at) = c.next()? {
                if sh.errors.get() == 0 {
                    eprintln!(
                        "wamp_load: the publisher got {}",
                        ser.show(message(&c.rbuf, &c.frag, at))
                    );
                }
                sh.errors.set(sh.errors.get() + 1);
            }
        }
    }
}

/// Until a call on `addr` is answered (10 s at most): a registration made
/// on another node reaches this one over the bus a moment after REGISTERED.
async fn until_served(addr: SocketAddr, ws: bool, ser: Ser, realm: &str) -> io::Result<()> {
    let mut c = Conn::join(addr, ws, ser, realm).await?;
    let start = Instant::now();
    let mut id = 0u64;
    loop {
        id += 1;
        match c
            .ask(json!([CALL, id, {}, PROCEDURE, [0, 0, ""]]), RESULT)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Warm-up for a second, then `secs` of samples: (per second, samples
/// sorted).
async fn measure(secs: u64, sh: &Shared) -> (f64, Vec<u64>) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    sh.samples.borrow_mut().clear();
    let start = sh.done.get();
    sh.recording.set(true);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    sh.recording.set(false);
    let rate = (sh.done.get() - start) as f64 / t.elapsed().as_secs_f64();
    let mut s = std::mem::take(&mut *sh.samples.borrow_mut());
    s.sort_unstable();
    (rate, s)
}

/// The `p` quantile in microseconds.
fn pct(s: &[u64], p: f64) -> f64 {
    s.get(((s.len() as f64 * p) as usize).min(s.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0) as f64
        / 1000.0
}

async fn run(addr: SocketAddr, scenario: &str) -> io::Result<String> {
    let secs = env("SECS", 5u64);
    let realm = std::env::var("REALM").unwrap_or_else(|_| "realm1".into());
    let transport = std::env::var("TRANSPORT").unwrap_or_else(|_| "rawsocket".into());
    let ws = match transport.as_str() {
        "websocket" => true,
        "rawsocket" => false,
        other => return Err(fail(format!("unknown TRANSPORT {other}"))),
    };
    let ser_name = std::env::var("SERIALIZER").unwrap_or_else(|_| "msgpack".into());
    let ser =
        Ser::parse(&ser_name).ok_or_else(|| fail(format!("unknown SERIALIZER {ser_name}")))?;
    // [ts, seq, "x..."] in MessagePack: 1 + 9 + 9 + 2 bytes around the text.
    let filler = vec![b'x'; env("PAYLOAD", 100usize).saturating_sub(21)];
    let sh = Rc::new(Shared {
        ser,
        origin: Instant::now(),
        filler,
        recording: Cell::new(false),
        done: Cell::new(0),
        errors: Cell::new(0),
        drops: Cell::new(0),
        closed: Cell::new(0),
        samples: RefCell::new(Vec::new()),
        progress: Notify::new(),
    });
    let tag = format!("transport={transport} serializer={}", ser.name());
    let out = match scenario {
        "rpc" => {
            let callers = env("CALLERS", 10usize);
            let window = env("WINDOW", 32usize);
            let callee_addr = std::env::var("CALLEE_TARGET")
                .map_or(addr, |t| t.parse().expect("CALLEE_TARGET is host:port"));
            callee(Conn::join(callee_addr, ws, ser, &realm).await?, sh.clone()).await?;
            if callee_addr != addr {
                until_served(addr, ws, ser, &realm).await?;
            }
            for _ in 0..callers {
                let c = Conn::join(addr, ws, ser, &realm).await?;
                tokio::task::spawn_local(caller(c, window, sh.clone()));
            }
            let (rate, s) = measure(secs, &sh).await;
            format!(
                "scenario=rpc {tag} callers={callers} window={window} calls_per_s={rate:.0} p50_us={:.0} p99_us={:.0} errors={} closed={}",
                pct(&s, 0.5),
                pct(&s, 0.99),
                sh.errors.get(),
                sh.closed.get()
            )
        }
        "fanout" => {
            let subscribers = env("SUBSCRIBERS", 100usize);
            let window = env("WINDOW", 64u64);
            let rate = env("RATE", 0u64);
            let mut lasts = Vec::new();
            for _ in 0..subscribers {
                let mut c = Conn::join(addr, ws, ser, &realm).await?;
                c.ask(json!([SUBSCRIBE, 1, {}, TOPIC]), SUBSCRIBED).await?;
                let last = Rc::new(Cell::new(0));
                lasts.push(last.clone());
                tokio::task::spawn_local(subscriber(c, last, sh.clone()));
            }
            let p = Conn::join(addr, ws, ser, &realm).await?;
            let published = tokio::task::spawn_local({
                let sh = sh.clone();
                async move {
                    let r = publisher(p, window, rate, lasts, sh.clone()).await;
                    if let Err(e) = &r {
                        sh.ended("publisher", e);
                    }
                }
            });
            let (events, s) = measure(secs, &sh).await;
            published.abort();
            format!(
                "scenario=fanout {tag} subscribers={subscribers} window={window} rate={rate} events_per_s={events:.0} p50_us={:.0} p99_us={:.0} drops={} closed={} errors={}",
                pct(&s, 0.5),
                pct(&s, 0.99),
                sh.drops.get(),
                sh.closed.get(),
                sh.errors.get()
            )
        }
        "idle" => {
            let n = env("CONNS", 1000usize);
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                held.push(Conn::join(addr, ws, ser, &realm).await?);
            }
            println!("ready sessions={n}");
            // Held until the script closes stdin.
            let mut line = String::new();
            let _ =
                tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
            drop(held);
            format!("scenario=idle {tag} sessions={n}")
        }
        other => return Err(fail(format!("unknown SCENARIO {other}"))),
    };
    Ok(out)
}

fn main() {
    let Ok(target) = std::env::var("TARGET") else {
        eprintln!("wamp_load: set TARGET=host:port and SCENARIO (see benches/wamp_load.sh)");
        return;
    };
    let addr: SocketAddr = target.parse().expect("TARGET is host:port");
    let scenario = std::env::var("SCENARIO").unwrap_or_else(|_| "rpc".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    match local.block_on(&rt, run(addr, &scenario)) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("wamp_load {scenario}: {e}");
            std::process::exit(1);
        }
    }
}
