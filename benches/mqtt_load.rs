//! MQTT load against any broker (tollgate or mosquitto), for
//! `benches/mqtt_load.sh`, which runs it against both in one go. Raw
//! MQTT 3.1.1 over TCP (packets from rumqttc's codec), one thread.
//!
//!   TARGET=127.0.0.1:1883 SCENARIO=fanin QOS=1 SECS=5 cargo bench --bench mqtt_load
//!
//! Scenarios (each prints one line of `key=value`):
//! - `fanin`: PUBLISHERS (10) publish to their own topic, as fast as they
//!   can or RATE messages/s together (QoS 0); one subscriber to `bench/#`
//!   counts what arrives (msgs/s). QoS 1 publishers keep WINDOW (64)
//!   messages unacknowledged at most.
//! - `fanout`: one publisher, SUBSCRIBERS (100) subscribers to its topic:
//!   deliveries/s summed over the subscribers.
//! - `latency`: one publisher at RATE (2000) msgs/s, one subscriber: p50
//!   and p99 from publish to arrival.
//! - `connrate`: CONCURRENCY (32) loops of connect, CONNACK, DISCONNECT.
//! - `idle`: CONNS (10000) connected clients, held until stdin closes
//!   (the script reads the broker's RSS meanwhile).
//!
//! With SUB_TARGET=host:port the subscribers of `fanin`, `fanout` and
//! `latency` connect there instead (another node of a cluster).

#![allow(clippy::print_stdout)] // the tool's output

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn qos(n: u8) -> QoS {
    if n == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    }
}

struct Client {
    tcp: TcpStream,
    buf: BytesMut,
    out: BytesMut,
}

impl Client {
    async fn connect(addr: SocketAddr, id: &str) -> std::io::Result<Client> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut c = Client {
            tcp,
            buf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::with_capacity(64 * 1024),
        };
        let mut connect = Connect::new(id);
        connect.keep_alive = 600;
        c.queue(Packet::Connect(connect));
        c.flush().await?;
        match c.read().await? {
            Packet::ConnAck(_) => Ok(c),
            other => Err(std::io::Error::other(format!("no CONNACK: {other:?}"))),
        }
    }

    fn queue(&mut self, p: Packet) {
        p.write(&mut self.out, usize::MAX).expect("encodable");
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    async fn read(&mut self) -> std::io::Result<Packet> {
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            if self.tcp.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, q: QoS) -> std::io::Result<()> {
        let mut sub = Subscribe::new(filter, q);
        sub.pkid = 1;
        self.queue(Packet::Subscribe(sub));
        self.flush().await?;
        loop {
            if let Packet::SubAck(_) = self.read().await? {
                return Ok(());
            }
        }
    }
}

/// Receives until `stop`, counting publishes (acknowledging QoS 1), and
/// handing each payload to `seen`.
async fn receive(mut c: Client, count: Rc<Cell<u64>>, stop: Rc<Cell<bool>>, seen: impl Fn(&[u8])) {
    while !stop.get() {
        let Ok(p) = c.read().await else { return };
        if let Packet::Publish(p) = p {
            count.set(count.get() + 1);
            seen(&p.payload);
            if p.qos == QoS::AtLeastOnce {
                c.queue(Packet::PubAck(PubAck::new(p.pkid)));
                // Acknowledgements go out in bursts, as the reads come.
                if c.buf.is_empty() && c.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Publishes to `topic` until `stop`: QoS 0 in bursts of 64 (every
/// `pace`, when given), QoS 1 with at most `window` unacknowledged.
async fn publish(
    mut c: Client,
    topic: String,
    q: QoS,
    window: u16,
    payload: Vec<u8>,
    stop: Rc<Cell<bool>>,
    pace: Option<Duration>,
) {
    let mut pkid: u16 = 0;
    let mut inflight: u16 = 0;
    let mut tick = pace.map(tokio::time::interval);
    while !stop.get() {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let burst = if q == QoS::AtMostOnce {
            64
        } else {
            window - inflight
        };
        for _ in 0..burst {
            let mut p = Publish::new(topic.clone(), q, payload.clone());
            if q == QoS::AtLeastOnce {
                pkid = pkid % 60000 + 1;
                p.pkid = pkid;
                inflight += 1;
            }
            c.queue(Packet::Publish(p));
        }
        if c.flush().await.is_err() {
            return;
        }
        if q == QoS::AtLeastOnce {
            // At least one acknowledgement before the next burst.
            loop {
                match c.read().await {
                    Ok(Packet::PubAck(_)) => {
                        inflight -= 1;
                        if c.buf.is_empty() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        } else {
            tokio::task::yield_now().await;
        }
    }
}

async fn measure(secs: u64, counts: &[Rc<Cell<u64>>]) -> f64 {
    // One second to warm up, then the window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start: u64 = counts.iter().map(|c| c.get()).sum();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let end: u64 = counts.iter().map(|c| c.get()).sum();
    (end - start) as f64 / t.elapsed().as_secs_f64()
}

async fn run(addr: SocketAddr, sub_addr: SocketAddr, scenario: &str) -> std::io::Result<String> {
    let secs = env("SECS", 5u64);
    let q = qos(env("QOS", 0u8));
    let payload = vec![b'x'; env("PAYLOAD", 64usize)];
    let stop = Rc::new(Cell::new(false));
    // Subscribers on another node: its bus subscription follows the SUBACK.
    let settle = || async move {
        if sub_addr != addr {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let out = match scenario {
        "fanin" => {
            let publishers = env("PUBLISHERS", 10usize);
            let mut sub = Client::connect(sub_addr, "bench-sub").await?;
            sub.subscribe("bench/#", q).await?;
            let count = Rc::new(Cell::new(0));
            tokio::task::spawn_local(receive(sub, count.clone(), stop.clone(), |_| {}));
            settle().await;
            for i in 0..publishers {
                let c = Client::connect(addr, &format!("bench-pub-{i}")).await?;
                let window = env("WINDOW", 64u16);
                // RATE (messages/s, all publishers together) paces QoS 0.
                let rate = env("RATE", 0u64);
                let pace = (rate > 0 && q == QoS::AtMostOnce)
                    .then(|| Duration::from_nanos(64 * 1_000_000_000 * publishers as u64 / rate));
                tokio::task::spawn_local(publish(
                    c,
                    format!("bench/{i}"),
                    q,
                    window,
                    payload.clone(),
                    stop.clone(),
                    pace,
                ));
            }
            let rate = measure(secs, &[count]).await;
            format!(
                "scenario=fanin qos={} publishers={publishers} msgs_per_s={rate:.0}",
                q as u8
            )
        }
        "fanout" => {
            let subscribers = env("SUBSCRIBERS", 100usize);
            let mut counts = Vec::new();
            for i in 0..subscribers {
                let mut s = Client::connect(sub_addr, &format!("bench-sub-{i}")).await?;
                s.subscribe("bench/fan", q).await?;
                let count = Rc::new(Cell::new(0));
                counts.push(count.clone());
                tokio::task::spawn_local(receive(s, count, stop.clone(), |_| {}));
            }
            settle().await;
            let p = Client::connect(addr, "bench-pub").await?;
            tokio::task::spawn_local(publish(
                p,
                "bench/fan".into(),
                q,
                env("WINDOW", 64u16),
                payload.clone(),
                stop.clone(),
                None,
            ));
            let rate = measure(secs, &counts).await;
            format!(
                "scenario=fanout qos={} subscribers={subscribers} deliveries_per_s={rate:.0}",
                q as u8
            )
        }
        "latency" => {
            let rate = env("RATE", 2000u64);
            let mut sub = Client::connect(sub_addr, "bench-lat-sub").await?;
            sub.subscribe("bench/lat", q).await?;
            let origin = Instant::now();
            let samples = Rc::new(std::cell::RefCell::new(Vec::new()));
            let count = Rc::new(Cell::new(0));
            {
                let samples = samples.clone();
                tokio::task::spawn_local(receive(sub, count, stop.clone(), move |body| {
                    if let Ok(sent) = <[u8; 8]>::try_from(&body[..8.min(body.len())]) {
                        let sent = u64::from_be_bytes(sent);
                        let now = origin.elapsed().as_nanos() as u64;
                        samples.borrow_mut().push(now.saturating_sub(sent));
                    }
                }));
            }
            settle().await;
            let mut p = Client::connect(addr, "bench-lat-pub").await?;
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            let until = Instant::now() + Duration::from_secs(secs + 1);
            let mut pkid = 0u16;
            while Instant::now() < until {
                tick.tick().await;
                let mut body = (origin.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
                body.extend_from_slice(&payload[..payload.len().saturating_sub(8)]);
                let mut m = Publish::new("bench/lat", q, body);
                if q == QoS::AtLeastOnce {
                    pkid = pkid % 60000 + 1;
                    m.pkid = pkid;
                }
                p.queue(Packet::Publish(m));
                p.flush().await?;
                // Acknowledgements are read and dropped as they come.
                if q == QoS::AtLeastOnce {
                    loop {
                        match tokio::time::timeout(Duration::ZERO, p.tcp.read_buf(&mut p.buf)).await
                        {
                            Ok(Ok(n)) if n > 0 => p.buf.clear(),
                            _ => break,
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut s = samples.borrow().clone();
            // The first second is warm-up.
            let skip = (rate as usize).min(s.len());
            s.drain(..skip);
            s.sort_unstable();
            let pct = |p: f64| {
                s.get(((s.len() as f64 * p) as usize).min(s.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0) as f64
                    / 1000.0
            };
            format!(
                "scenario=latency qos={} rate={rate} samples={} p50_us={:.0} p99_us={:.0}",
                q as u8,
                s.len(),
                pct(0.5),
                pct(0.99)
            )
        }
        "connrate" => {
            let concurrency = env("CONCURRENCY", 32usize);
            let count = Rc::new(Cell::new(0));
            for i in 0..concurrency {
                let (count, stop) = (count.clone(), stop.clone());
                tokio::task::spawn_local(async move {
                    let mut n = 0u64;
                    while !stop.get() {
                        n += 1;
                        let Ok(mut c) = Client::connect(addr, &format!("bench-c-{i}-{n}")).await
                        else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        c.queue(Packet::Disconnect);
                        let _ = c.flush().await;
                        count.set(count.get() + 1);
                    }
                });
            }
            let rate = measure(secs, &[count]).await;
            format!("scenario=connrate concurrency={concurrency} connects_per_s={rate:.0}")
        }
        "idle" => {
            let n = env("CONNS", 10_000usize);
            let mut held = Vec::with_capacity(n);
            for i in 0..n {
                held.push(Client::connect(addr, &format!("bench-idle-{i}")).await?);
            }
            println!("ready conns={n}");
            // Held until the script closes stdin.
            let mut line = String::new();
            let _ =
                tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
            drop(held);
            format!("scenario=idle conns={n}")
        }
        other => return Err(std::io::Error::other(format!("unknown SCENARIO {other}"))),
    };
    stop.set(true);
    Ok(out)
}

fn main() {
    let Ok(target) = std::env::var("TARGET") else {
        eprintln!("mqtt_load: set TARGET=host:port and SCENARIO (see benches/mqtt_load.sh)");
        return;
    };
    let addr: SocketAddr = target.parse().expect("TARGET is host:port");
    let sub_addr: SocketAddr =
        std::env::var("SUB_TARGET").map_or(addr, |t| t.parse().expect("SUB_TARGET is host:port"));
    let scenario = std::env::var("SCENARIO").unwrap_or_else(|_| "fanin".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    match local.block_on(&rt, run(addr, sub_addr, &scenario)) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("mqtt_load {scenario}: {e}");
            std::process::exit(1);
        }
    }
}
