//! What the broker must not lose across a restart or a crash: retained
//! messages, persistent sessions (subscriptions, expiry), the QoS 1 and 2
//! messages queued or in flight for them, and the QoS 2 packet ids a
//! client published that were acknowledged (PUBREC) but not yet released.
//!
//! One redb file the broker holds open, written by one thread that groups
//! the changes of many connections into one durable transaction (group
//! commit): a client's QoS 1/2 PUBLISH is acknowledged only once every
//! persistent session it was queued for, and its retained copy, are on
//! disk. Bounded by the per-session queue limit and `max_retained`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redb::{Database, ReadableTable, TableDefinition};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::store::DbError;

use super::codec::QoS;
use super::router::SubOptions;

const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// (client id, sequence) -> a delivery and where it stands.
const QUEUE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queue");
/// (client id, packet id) of QoS 2 messages received and not yet released.
const INCOMING: TableDefinition<&[u8], ()> = TableDefinition::new("incoming_qos2");

/// A message as stored (and as recovered).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// Unix milliseconds.
    pub expires_at_ms: Option<u64>,
}

/// A delivery for a persistent session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDelivery {
    pub message: StoredMessage,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<usize>,
    /// Sent with this packet id and not yet acknowledged (0: queued).
    pub pkid: u16,
    /// QoS 2: PUBREC came, PUBREL sent.
    pub released: bool,
}

impl StoredDelivery {
    /// A QoS 2 message whose PUBREC came (only its packet id matters now).
    pub fn released(pkid: u16) -> StoredDelivery {
        StoredDelivery {
            message: StoredMessage {
                topic: String::new(),
                payload: Bytes::new(),
                qos: QoS::ExactlyOnce,
                retain: false,
                properties: None,
                expires_at_ms: None,
            },
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: Vec::new(),
            pkid,
            released: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: Option<usize>,
}

impl StoredSubscription {
    pub fn new(filter: &str, o: &SubOptions) -> StoredSubscription {
        StoredSubscription {
            filter: filter.to_owned(),
            qos: o.qos as u8,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            id: o.id,
        }
    }

    pub fn options(&self) -> SubOptions {
        SubOptions {
            qos: qos(self.qos),
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            id: self.id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    pub expiry_secs: u32,
    /// Unix seconds the client left (0 while connected).
    pub left_at: u64,
    pub subscriptions: Vec<StoredSubscription>,
    /// The owner's user name and authentication method.
    #[serde(default)]
    pub owner: Option<(String, String)>,
}

/// A session as recovered at start.
pub struct Recovered {
    pub client_id: String,
    pub session: StoredSession,
    /// By sequence.
    pub queue: Vec<(u64, StoredDelivery)>,
    pub incoming_qos2: Vec<u16>,
}

pub enum Op {
    Retain(String, Option<StoredMessage>),
    Session(String, Option<StoredSession>),
    Enqueue(String, u64, StoredDelivery),
    /// Sent with a packet id, or released (QoS 2 PUBREC seen).
    Update(String, u64, StoredDelivery),
    Dequeue(String, u64),
    Incoming(String, u16, bool),
    /// Signals once everything before it is durable.
    Sync(tokio::sync::oneshot::Sender<()>),
}

/// The writer's handle; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Op>,
    /// Retained messages are kept in the cluster's store, by the node that
    /// took the publish (the others get them over the bus).
    shares_retained: bool,
}

/// Under the cluster store's prefix: retained messages by topic.
pub const SHARED_RETAINED: &str = "mqtt/retained/";
/// The largest retained message (with its topic) kept in the cluster's
/// store: etcd refuses requests over 1.5 MiB.
const SHARED_MAX_VALUE: usize = 1024 * 1024;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Journal {
    /// Opens (creating) the file, recovers what it holds and starts the
    /// writer thread. With `shared` (cluster mode: the config naming the
    /// cluster's store) retained messages are written there instead, by a
    /// thread of their own (`shared_loop`); the broker follows them from
    /// the store (`mqtt::follow_shared_retained`).
    pub fn open(path: &Path, shared: Option<Arc<Config>>) -> Result<(Journal, Loaded), String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("{}: cannot create its directory: {e}", path.display()))?;
        }
        let db = Database::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let (mut retained, sessions) = load(&db).map_err(|e| format!("{}: {e}", path.display()))?;
        if shared.is_some() {
            // The cluster's come from its store; `$` topics stay each node's.
            retained.retain(|(topic, _)| topic.starts_with('$'));
        }
        let shared_tx = match shared {
            None => None,
            Some(cfg) => {
                let (tx, rx) = mpsc::channel();
                std::thread::Builder::new()
                    .name("tollgate-mqtt-shared".into())
                    .spawn(move || shared_loop(&cfg, rx))
                    .map_err(|e| e.to_string())?;
                Some(tx)
            }
        };
        let (tx, rx) = mpsc::channel();
        let file = path.to_owned();
        let shares_retained = shared_tx.is_some();
        std::thread::Builder::new()
            .name("tollgate-mqtt-journal".into())
            .spawn(move || write_loop(db, shared_tx, rx, file))
            .map_err(|e| e.to_string())?;
        Ok((
            Journal {
                tx,
                shares_retained,
            },
            (retained, sessions),
        ))
    }

    pub fn shares_retained(&self) -> bool {
        self.shares_retained
    }

    pub fn send(&self, op: Op) {
        let _ = self.tx.send(op);
    }

    /// Resolves once every change sent before is on disk.
    pub fn synced(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Op::Sync(tx));
        rx
    }
}

fn key(client: &str, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(client.len() + 9);
    k.extend_from_slice(client.as_bytes());
    k.push(0);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(String, u64)> {
    let (client, n) = k.split_at(k.len().checked_sub(9)?);
    let n = u64::from_be_bytes(n.get(1..9)?.try_into().ok()?);
    Some((String::from_utf8(client.to_vec()).ok()?, n))
}

/// Every retained message in the cluster's store.
pub fn read_all_retained(cfg: &Config) -> Result<Vec<(String, StoredMessage)>, String> {
    let store = crate::store::open(cfg).map_err(|e| e.to_string())?;
    let records = store.shared_records().ok_or("the store is not shared")?;
    let rows = records
        .read_all(SHARED_RETAINED)
        .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .filter_map(|(topic, v)| {
            let m = decode_message(&mut Bytes::from(v));
            if m.is_none() {
                tracing::warn!(topic, "a shared retained message cannot be read; skipped");
            }
            Some((topic, m?))
        })
        .collect())
}

/// A retained message as the cluster's store holds it, from a watch event
/// (`None`: cleared, or not one of them).
pub fn shared_retained(key: &str, value: Option<&[u8]>) -> Option<(String, Option<StoredMessage>)> {
    let topic = key.strip_prefix(SHARED_RETAINED)?;
    let message = match value {
        None => None,
        Some(v) => Some(decode_message(&mut Bytes::copy_from_slice(v))?),
    };
    Some((topic.to_owned(), message))
}

/// What a journal batch hands to the cluster's store: its retained changes
/// and its waiters (answered once those changes, and all before them, are
/// there).
struct SharedBatch {
    changes: Vec<(String, Option<Vec<u8>>)>,
    waiters: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// Writes retained messages to the cluster's store, in order, and answers
/// waiters in order once what they wait for is written. Changes not written
/// yet are kept (the latest per topic) and tried again with backoff, so a
/// failed write is never lost; meanwhile waiters wait (their clients are
/// not acknowledged), and the journal's own writes go on.
fn shared_loop(cfg: &Config, rx: mpsc::Receiver<SharedBatch>) {
    let mut pending: std::collections::BTreeMap<String, Option<Vec<u8>>> = Default::default();
    let mut held: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut wait = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let next = if pending.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(wait)
        };
        let mut take = |batch: SharedBatch| {
            pending.extend(batch.changes);
            held.extend(batch.waiters);
        };
        match next {
            Ok(batch) => {
                take(batch);
                while let Ok(batch) = rx.try_recv() {
                    take(batch);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if !pending.is_empty() {
            let changes: Vec<(String, Option<Vec<u8>>)> = pending
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let written = crate::store::open(cfg)
                .map_err(|e| e.to_string())
                .and_then(|store| match store.shared_records() {
                    Some(records) => records
                        .write(SHARED_RETAINED, &changes)
                        .map_err(|e| e.to_string()),
                    None => Err("the store is not shared".to_owned()),
                });
            match written {
                Ok(()) => {
                    pending.clear();
                    wait = Duration::from_millis(100);
                    if std::mem::take(&mut failing) {
                        tracing::info!(
                            "retained MQTT messages are written to the cluster's store again"
                        );
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::error!(error = %e,
                            "cannot write retained MQTT messages to the cluster's store; publishes waiting for it are not acknowledged until it can (retrying)");
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        for w in held.drain(..) {
            let _ = w.send(());
        }
    }
}

/// The writer: every op waiting is applied in one transaction (retained
/// messages, in cluster mode, in the shared store after it).
fn write_loop(
    db: Database,
    shared: Option<mpsc::Sender<SharedBatch>>,
    rx: mpsc::Receiver<Op>,
    file: PathBuf,
) {
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut waiters = Vec::new();
        let mut shared_changes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        let written = (|| -> Result<(), DbError> {
            let txn = db.begin_write()?;
            {
                let mut retained = txn.open_table(RETAINED)?;
                let mut sessions = txn.open_table(SESSIONS)?;
                let mut queue = txn.open_table(QUEUE)?;
                let mut incoming = txn.open_table(INCOMING)?;
                for op in ops {
                    match op {
                        // `$` topics (the broker's own statistics) are each
                        // node's: they stay in its journal.
                        Op::Retain(topic, m) if shared.is_some() && !topic.starts_with('$') => {
                            let mut value = m.map(|m| encode_message(&m).to_vec());
                            if value
                                .as_ref()
                                .is_some_and(|v| v.len() + topic.len() > SHARED_MAX_VALUE)
                            {
                                // Not kept there: no older one may stay instead.
                                tracing::warn!(
                                    topic,
                                    "a retained message is too large for the cluster's store; kept in memory on the nodes only"
                                );
                                value = None;
                            }
                            shared_changes.push((topic, value));
                        }
                        Op::Retain(topic, Some(m)) => {
                            retained.insert(topic.as_str(), encode_message(&m).as_ref())?;
                        }
                        Op::Retain(topic, None) => {
                            retained.remove(topic.as_str())?;
                        }
                        Op::Session(client, Some(s)) => {
                            let json = serde_json::to_vec(&s).unwrap_or_default();
                            sessions.insert(client.as_str(), json.as_slice())?;
                        }
                        Op::Session(client, None) => {
                            sessions.remove(client.as_str())?;
                            // Its queue and QoS 2 state go with it.
                            let mut from = client.clone().into_bytes();
                            from.push(0);
                            let mut to = client.into_bytes();
                            to.push(1);
                            queue.retain_in(from.as_slice()..to.as_slice(), |_, _| false)?;
                            incoming.retain_in(from.as_slice()..to.as_slice(), |_, _| false)?;
                        }
                        Op::Enqueue(client, seq, d) | Op::Update(client, seq, d) => {
                            queue.insert(
                                key(&client, seq).as_slice(),
                                encode_delivery(&d).as_ref(),
                            )?;
                        }
                        Op::Dequeue(client, seq) => {
                            queue.remove(key(&client, seq).as_slice())?;
                        }
                        Op::Incoming(client, pkid, true) => {
                            incoming.insert(key(&client, u64::from(pkid)).as_slice(), ())?;
                        }
                        Op::Incoming(client, pkid, false) => {
                            incoming.remove(key(&client, u64::from(pkid)).as_slice())?;
                        }
                        Op::Sync(w) => waiters.push(w),
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        match written {
            // Acknowledged only once the cluster's store has them too (in
            // order: after everything before them).
            Ok(()) if shared.is_some() => {
                if std::mem::take(&mut failing) {
                    tracing::info!(file = %file.display(), "MQTT state is written again");
                }
                if let Some(tx) = &shared {
                    let _ = tx.send(SharedBatch {
                        changes: shared_changes,
                        waiters,
                    });
                }
            }
            Ok(()) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(file = %file.display(), "MQTT state is written again");
                }
                for w in waiters {
                    let _ = w.send(());
                }
            }
            Err(e) => {
                // Waiters are dropped: their clients get no acknowledgement
                // and publish again.
                if !failing {
                    tracing::error!(file = %file.display(), error = %e,
                        "cannot write MQTT state; messages to persistent sessions are not acknowledged until it can");
                }
                failing = true;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Retained messages by topic, and sessions.
pub type Loaded = (Vec<(String, StoredMessage)>, Vec<Recovered>);

fn load(db: &Database) -> Result<Loaded, DbError> {
    {
        let txn = db.begin_write()?;
        txn.open_table(RETAINED)?;
        txn.open_table(SESSIONS)?;
        txn.open_table(QUEUE)?;
        txn.open_table(INCOMING)?;
        txn.commit()?;
    }
    let txn = db.begin_read()?;
    let mut retained = Vec::new();
    for row in txn.open_table(RETAINED)?.iter()? {
        let (k, v) = row?;
        match decode_message(&mut Bytes::copy_from_slice(v.value())) {
            Some(m) => retained.push((k.value().to_owned(), m)),
            None => tracing::warn!(
                topic = k.value(),
                "a stored retained message cannot be read; skipped"
            ),
        }
    }
    let mut sessions: Vec<Recovered> = Vec::new();
    for row in txn.open_table(SESSIONS)?.iter()? {
        let (k, v) = row?;
        match serde_json::from_slice::<StoredSession>(v.value()) {
            Ok(session) => sessions.push(Recovered {
                client_id: k.value().to_owned(),
                session,
                queue: Vec::new(),
                incoming_qos2: Vec::new(),
            }),
            Err(e) => {
                tracing::warn!(client_id = k.value(), error = %e, "a stored MQTT session cannot be read; skipped")
            }
        }
    }
    let find = |sessions: &mut Vec<Recovered>, client: &str| {
        sessions.iter_mut().position(|s| s.client_id == client)
    };
    for row in txn.open_table(QUEUE)?.iter()? {
        let (k, v) = row?;
        let Some((client, seq)) = split_key(k.value()) else {
            continue;
        };
        let Some(i) = find(&mut sessions, &client) else {
            continue;
        };
        if let Some(d) = decode_delivery(&mut Bytes::copy_from_slice(v.value())) {
            sessions[i].queue.push((seq, d));
        }
    }
    for row in txn.open_table(INCOMING)?.iter()? {
        let (k, _) = row?;
        let Some((client, pkid)) = split_key(k.value()) else {
            continue;
        };
        if let Some(i) = find(&mut sessions, &client) {
            sessions[i].incoming_qos2.push(pkid as u16);
        }
    }
    Ok((retained, sessions))
}

fn qos(n: u8) -> QoS {
    match n {
        2 => QoS::ExactlyOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

/// The properties that travel with a message, as JSON (rare, small).
#[derive(Serialize, Deserialize)]
struct Props {
    pfi: Option<u8>,
    rt: Option<String>,
    cd: Option<Vec<u8>>,
    up: Vec<(String, String)>,
    ct: Option<String>,
}

const FORMAT: u8 = 1;

fn encode_message(m: &StoredMessage) -> BytesMut {
    let mut b = BytesMut::with_capacity(32 + m.topic.len() + m.payload.len());
    b.put_u8(FORMAT);
    b.put_u8(m.qos as u8);
    b.put_u8(u8::from(m.retain));
    b.put_u64(m.expires_at_ms.unwrap_or(0));
    b.put_u32(m.topic.len() as u32);
    b.put_slice(m.topic.as_bytes());
    b.put_u32(m.payload.len() as u32);
    b.put_slice(&m.payload);
    let props = m.properties.as_ref().map(|p| {
        serde_json::to_vec(&Props {
            pfi: p.payload_format_indicator,
            rt: p.response_topic.clone(),
            cd: p.correlation_data.as_ref().map(|c| c.to_vec()),
            up: p.user_properties.clone(),
            ct: p.content_type.clone(),
        })
        .unwrap_or_default()
    });
    let props = props.unwrap_or_default();
    b.put_u32(props.len() as u32);
    b.put_slice(&props);
    b
}

fn take(b: &mut Bytes, n: usize) -> Option<Bytes> {
    (b.remaining() >= n).then(|| b.split_to(n))
}

fn decode_message(b: &mut Bytes) -> Option<StoredMessage> {
    if take(b, 1)?[0] != FORMAT || b.remaining() < 2 + 8 + 4 {
        return None;
    }
    let q = qos(b.get_u8());
    let retain = b.get_u8() != 0;
    let expires = b.get_u64();
    let n = b.get_u32() as usize;
    let topic = String::from_utf8(take(b, n)?.to_vec()).ok()?;
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    let payload = take(b, n)?;
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    let props = take(b, n)?;
    let properties = if props.is_empty() {
        None
    } else {
        let p: Props = serde_json::from_slice(&props).ok()?;
        Some(PublishProperties {
            payload_format_indicator: p.pfi,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: p.rt,
            correlation_data: p.cd.map(Bytes::from),
            user_properties: p.up,
            subscription_identifiers: Vec::new(),
            content_type: p.ct,
        })
    };
    Some(StoredMessage {
        topic,
        payload,
        qos: q,
        retain,
        properties,
        expires_at_ms: (expires != 0).then_some(expires),
    })
}

pub(super) fn encode_delivery(d: &StoredDelivery) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(d.qos as u8);
    b.put_u8(u8::from(d.retain));
    b.put_u16(d.pkid);
    b.put_u8(u8::from(d.released));
    b.put_u16(d.subscription_ids.len() as u16);
    for id in &d.subscription_ids {
        b.put_u32(*id as u32);
    }
    b.put_slice(&encode_message(&d.message));
    b
}

pub(super) fn decode_delivery(b: &mut Bytes) -> Option<StoredDelivery> {
    if b.remaining() < 7 {
        return None;
    }
    let q = qos(b.get_u8());
    let retain = b.get_u8() != 0;
    let pkid = b.get_u16();
    let released = b.get_u8() != 0;
    let n = b.get_u16() as usize;
    if b.remaining() < n * 4 {
        return None;
    }
    let subscription_ids = (0..n).map(|_| b.get_u32() as usize).collect();
    Some(StoredDelivery {
        message: decode_message(b)?,
        qos: q,
        retain,
        subscription_ids,
        pkid,
        released,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> StoredMessage {
        StoredMessage {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"\x00\xffpayload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Some(PublishProperties {
                user_properties: vec![("k".into(), "v".into())],
                correlation_data: Some(Bytes::from_static(b"c")),
                ..Default::default()
            }),
            expires_at_ms: Some(123),
        }
    }

    #[tokio::test]
    async fn survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/mqtt.redb");
        let d = StoredDelivery {
            message: message(),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![3, 70000],
            pkid: 9,
            released: false,
        };
        {
            let (j, (retained, sessions)) = Journal::open(&path, None).unwrap();
            assert!(retained.is_empty() && sessions.is_empty());
            j.send(Op::Retain("a/b".into(), Some(message())));
            j.send(Op::Session(
                "c1".into(),
                Some(StoredSession {
                    expiry_secs: 60,
                    left_at: 0,
                    subscriptions: vec![StoredSubscription {
                        filter: "a/#".into(),
                        qos: 1,
                        no_local: false,
                        retain_as_published: true,
                        id: Some(4),
                    }],
                    owner: Some(("alice".into(), "password".into())),
                }),
            ));
            j.send(Op::Enqueue("c1".into(), 1, d.clone()));
            j.send(Op::Enqueue("c1".into(), 2, d.clone()));
            j.send(Op::Dequeue("c1".into(), 1));
            j.send(Op::Incoming("c1".into(), 77, true));
            j.send(Op::Session(
                "gone".into(),
                Some(StoredSession {
                    expiry_secs: 1,
                    left_at: 0,
                    subscriptions: vec![],
                    owner: None,
                }),
            ));
            j.send(Op::Enqueue("gone".into(), 1, d.clone()));
            j.send(Op::Session("gone".into(), None));
            j.synced().await.unwrap();
        }
        // The writer thread holds the file until it sees its channel close.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (_, (retained, sessions)) = loop {
            match Journal::open(&path, None) {
                Ok(j) => break j,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.contains("already open"), "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(retained, [("a/b".to_string(), message())]);
        assert_eq!(sessions.len(), 1);
        let s = &sessions[0];
        assert_eq!(s.client_id, "c1");
        assert_eq!(s.session.subscriptions[0].id, Some(4));
        assert_eq!(s.queue, [(2, d)]);
        assert_eq!(s.incoming_qos2, [77]);
    }

    #[test]
    fn garbage_does_not_decode() {
        for bad in [
            &b""[..],
            b"\x01",
            b"\x02\x00\x00",
            b"\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff",
        ] {
            assert!(decode_message(&mut Bytes::copy_from_slice(bad)).is_none());
            assert!(decode_delivery(&mut Bytes::copy_from_slice(bad)).is_none());
        }
    }
}
