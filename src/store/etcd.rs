//! The store on etcd (cluster mode, the `cluster` feature): every node of a
//! swarm reads and writes the same records.
//!
//! Keys, under the configured prefix: `<table>/<key>` (JSON records),
//! `revoked/<jti>` (the unix time after which the revocation no longer
//! matters) and `meta/generation` (how many write transactions the store has
//! committed). Every write is one etcd transaction that also bumps the
//! generation and only commits if the generation's revision is still the one
//! read before (retried a bounded number of times otherwise), so
//! [`Store::generation`] counts writes across nodes and two writers of an
//! `update` cannot lose each other's rows.
//!
//! The store interface is synchronous and is called from plain threads and
//! from inside tokio runtimes (current-thread ones included). The etcd client
//! therefore runs on its own small runtime; a call sends its request there
//! and waits on a std channel, bounded by the configured timeout, so no call
//! blocks the caller's runtime or hangs while etcd is unreachable.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, Weak, mpsc};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use super::{ChangeFeed, Row, SharedRecords, Store, StoreError, Table};
use crate::config::{Config, EtcdStoreConfig, EtcdTls};

/// Under the prefix: the write counter.
const GENERATION: &str = "meta/generation";
/// Under the prefix: revoked token ids.
const REVOKED: &str = "revoked/";
/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Bytes of values in one transaction of shared records, under etcd's
/// default request limit (1.5 MiB).
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// HTTP/2 pings on the connection to etcd (etcd closes connections that
/// ping more often than every 5 s: `--grpc-keepalive-min-time`), and how
/// long an answer may take.
const KEEP_ALIVE: Duration = Duration::from_secs(6);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// etcd clients [`EtcdStore::shared`] keeps for configs in use.
const KEPT_CLIENTS: usize = 4;
/// How often a write is tried while other writers keep getting in first.
const MAX_ATTEMPTS: usize = 32;

pub struct EtcdStore {
    client: Client,
    endpoints: String,
    prefix: String,
    timeout: Duration,
    /// The watch on the prefix, started by the first [`Store::feed`].
    feed: OnceLock<Arc<ChangeFeed>>,
}

/// The runtime the etcd clients of this process run on.
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("tollgate-etcd")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the etcd client's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs `fut` on the etcd runtime and waits for it, at most `timeout`.
fn run<T, F>(timeout: Duration, fut: F) -> Result<T, String>
where
    T: Send + 'static,
    F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
{
    let rt = runtime()?;
    let (tx, rx) = mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(tokio::time::timeout(timeout, fut).await);
    });
    // The runtime's own timeout answers first; this one is a backstop.
    match rx.recv_timeout(timeout + Duration::from_secs(1)) {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(describe_error(&e)),
        Ok(Err(_)) | Err(_) => Err(format!("no answer from etcd within {timeout:?}")),
    }
}

/// An etcd client error for people: gRPC's status prints its metadata and
/// the transport error's debug form; this keeps the code, the message and
/// each cause's own words.
fn describe_error(e: &etcd_client::Error) -> String {
    let mut out = match e {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    let mut cause = match e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        etcd_client::Error::TransportError(t) => std::error::Error::source(t),
        other => std::error::Error::source(other),
    };
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// What a write does, given the records it read: the operations and what
/// to return, or `None` to write nothing.
type Plan<'a, R> = dyn FnMut(Vec<KeyValue>) -> Result<Option<(Vec<TxnOp>, R)>, StoreError> + 'a;

/// The generation counter as read: its value and its key's revision (0:
/// never written).
#[derive(Debug, Clone, Copy)]
struct Counter {
    value: u64,
    revision: i64,
}

impl EtcdStore {
    /// A client for `etcd` (files in it resolved by the caller). Connecting
    /// is lazy: an unreachable etcd fails the calls, not this.
    pub fn connect(etcd: &EtcdStoreConfig) -> Result<EtcdStore, StoreError> {
        let endpoints = etcd.endpoints.join(",");
        let fail = |message: String| StoreError::Io {
            path: PathBuf::from(describe(&endpoints, &etcd.prefix)),
            message,
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(etcd.timeout)
            .with_timeout(etcd.timeout)
            // A peer gone silent (a partition) shows within seconds: the
            // watch fails over and readiness says so.
            .with_keep_alive(KEEP_ALIVE, etcd.timeout.min(KEEP_ALIVE_TIMEOUT))
            // A member cut off from its cluster refuses (and ends the watch)
            // instead of serving what it had, or staying silent.
            .with_require_leader(true);
        if let Some(tls) = &etcd.tls {
            options = options.with_tls(tls_options(tls).map_err(fail)?);
        }
        let list = etcd.endpoints.clone();
        let client = run(etcd.timeout, async move {
            Client::connect(list, Some(options)).await
        })
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
        Ok(EtcdStore {
            client,
            endpoints,
            prefix: etcd.prefix.clone(),
            timeout: etcd.timeout,
            feed: OnceLock::new(),
        })
    }

    /// One client per etcd (endpoints, prefix, TLS, timeout) in this
    /// process: the store is opened per operation. A client whose TLS files
    /// changed since it connected (a rotated certificate) is replaced by one
    /// that reads them again.
    pub fn shared(cfg: &Config, etcd: &EtcdStoreConfig) -> Result<Arc<EtcdStore>, StoreError> {
        type Open = (EtcdStoreConfig, Vec<Option<FileStamp>>, Arc<EtcdStore>);
        static OPEN: Mutex<Vec<Open>> = Mutex::new(Vec::new());
        let mut etcd = etcd.clone();
        if let Some(tls) = &mut etcd.tls {
            tls.ca = cfg.resolve(&tls.ca);
            tls.cert = tls.cert.as_ref().map(|p| cfg.resolve(p));
            tls.key = tls.key.as_ref().map(|p| cfg.resolve(p));
        }
        let stamps = tls_stamps(etcd.tls.as_ref());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        match open.iter().find(|(c, ..)| *c == etcd) {
            Some((_, seen, s)) if *seen == stamps => return Ok(s.clone()),
            Some(_) => tracing::info!("the etcd client's TLS files changed; connecting with them"),
            None => {}
        }
        let store = Arc::new(EtcdStore::connect(&etcd)?);
        // A few configs are kept (one per gateway of a test process; one a
        // reload replaced goes once it is the oldest and unused).
        open.retain(|(c, ..)| *c != etcd);
        if open.len() >= KEPT_CLIENTS {
            open.remove(0);
        }
        open.push((etcd, stamps, store.clone()));
        Ok(store)
    }

    fn io(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: PathBuf::from(self.describe()),
            message: message.to_string(),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn table_dir(&self, table: Table) -> String {
        self.key(&format!("{}/", table.name()))
    }

    /// `fut` on the etcd runtime, its error naming what was being done.
    fn call<T, F>(&self, what: &str, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        run(self.timeout, fut).map_err(|e| self.io(format!("{what}: {e}")))
    }

    /// Every record under `dir`, in key order.
    fn range(&self, what: &str, dir: String) -> Result<Vec<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        self.call(what, async move {
            let mut resp = kv.get(dir, Some(GetOptions::new().with_prefix())).await?;
            Ok(resp.take_kvs())
        })
    }

    /// The generation counter and the records under `dir`, read at one
    /// revision.
    fn snapshot(
        &self,
        what: &str,
        dir: Option<String>,
    ) -> Result<(Counter, Vec<KeyValue>), StoreError> {
        let mut kv = self.client.kv_client();
        let mut ops = vec![TxnOp::get(self.key(GENERATION), None)];
        if let Some(dir) = dir {
            ops.push(TxnOp::get(dir, Some(GetOptions::new().with_prefix())));
        }
        let resp = self.call(what, async move { kv.txn(Txn::new().and_then(ops)).await })?;
        let mut gets = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(mut g) => g.take_kvs(),
            _ => Vec::new(),
        });
        let counter = match gets.next().unwrap_or_default().first() {
            None => Counter {
                value: 0,
                revision: 0,
            },
            Some(kv) => Counter {
                value: std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| self.corrupt("meta", "the generation is not a number"))?,
                revision: kv.mod_revision(),
            },
        };
        Ok((counter, gets.next().unwrap_or_default()))
    }

    fn corrupt(&self, table: &str, message: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: PathBuf::from(self.describe()),
            table: table.to_owned(),
            message: message.into(),
        }
    }

    /// One write transaction: reads the counter (and the records under
    /// `dir`), asks `plan` for the operations (`None`: nothing to write),
    /// and commits them with the counter bumped if nobody wrote in between;
    /// otherwise reads and plans again.
    fn write<R>(
        &self,
        what: &str,
        dir: Option<String>,
        plan: &mut Plan<'_, R>,
    ) -> Result<Option<(Vec<TxnOpResponse>, R)>, StoreError> {
        let started = Instant::now();
        for _ in 0..MAX_ATTEMPTS {
            let (counter, rows) = self.snapshot(what, dir.clone())?;
            let Some((mut ops, out)) = plan(rows)? else {
                return Ok(None);
            };
            if ops.len() >= MAX_TXN_OPS {
                return Err(self.io(format!(
                    "{what}: {} changes are more than one etcd transaction may hold ({})",
                    ops.len(),
                    MAX_TXN_OPS - 1
                )));
            }
            let generation = self.key(GENERATION);
            ops.push(TxnOp::put(
                generation.clone(),
                (counter.value + 1).to_string(),
                None,
            ));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    generation,
                    CompareOp::Equal,
                    counter.revision,
                )])
                .and_then(ops);
            let mut kv = self.client.kv_client();
            let resp = self.call(what, async move { kv.txn(txn).await })?;
            if resp.succeeded() {
                return Ok(Some((resp.op_responses(), out)));
            }
            if started.elapsed() >= self.timeout {
                break;
            }
        }
        Err(self.io(format!(
            "{what}: other writers kept changing the store; gave up after {:?}",
            started.elapsed()
        )))
    }

    /// `kvs` under `dir`, as (key without `dir`, value).
    fn rows(&self, dir: &str, kvs: Vec<KeyValue>) -> Result<Vec<Row>, StoreError> {
        kvs.into_iter()
            .map(|kv| {
                let key = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(dir))
                    .ok_or_else(|| self.io(format!("a key under `{dir}` is not UTF-8")))?;
                Ok((key.to_owned(), kv.value().to_vec()))
            })
            .collect()
    }

    fn revocations(&self, kvs: Vec<KeyValue>) -> Result<Vec<(String, u64)>, StoreError> {
        let dir = self.key(REVOKED);
        self.rows(&dir, kvs)?
            .into_iter()
            .map(|(jti, until)| {
                let until = std::str::from_utf8(&until)
                    .ok()
                    .and_then(|u| u.parse().ok())
                    .ok_or_else(|| {
                        self.corrupt("revoked", format!("`{jti}`: the time is not a number"))
                    })?;
                Ok((jti, until))
            })
            .collect()
    }
}

/// Waits between attempts to watch again after the watch failed.
const WATCH_RETRY_FIRST: Duration = Duration::from_millis(250);
const WATCH_RETRY_MOST: Duration = Duration::from_secs(5);

/// Watches everything under `prefix` and pushes what changed to `feed` until
/// the feed's last handle goes; watches again, with backoff, whenever the
/// watch fails (etcd unreachable, restarted, the watch cancelled).
async fn watch_changes(client: Client, prefix: String, feed: Weak<ChangeFeed>) {
    let Some(stop) = feed.upgrade().map(|f| f.stop_token()) else {
        return;
    };
    let mut wait = WATCH_RETRY_FIRST;
    // Warned once per outage.
    let mut warned = false;
    loop {
        let mut established = false;
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            e = watch_once(client.clone(), &prefix, &feed, &mut established) => e,
        };
        let Some(f) = feed.upgrade() else { return };
        f.set_connected(false);
        drop(f);
        if established {
            wait = WATCH_RETRY_FIRST;
            warned = false;
        }
        if !warned {
            warned = true;
            tracing::warn!(prefix = %prefix, error = %ended,
                "the etcd watch is down: other nodes' changes arrive once it is back (retrying)");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(WATCH_RETRY_MOST);
    }
}

/// One watch, until it fails: why it ended.
async fn watch_once(
    mut client: Client,
    prefix: &str,
    feed: &Weak<ChangeFeed>,
    established: &mut bool,
) -> String {
    let mut stream = match client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
    {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return "etcd ended the watch".to_owned(),
            Err(e) => return e.to_string(),
        };
        let Some(feed) = feed.upgrade() else {
            return "stopped".to_owned();
        };
        if resp.canceled() {
            return format!("etcd cancelled the watch: {}", resp.cancel_reason());
        }
        if resp.created() {
            *established = true;
            tracing::info!(prefix = %prefix, "watching etcd for other nodes' changes");
            feed.set_connected(true);
            continue;
        }
        let mut changes = super::Changes::default();
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(prefix))
            else {
                continue;
            };
            if let Some(jti) = key.strip_prefix(REVOKED) {
                // A purge deletes; only new revocations matter.
                if event.event_type() == EventType::Put
                    && let Some(until) = std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|u| u.parse().ok())
                {
                    changes.revoked.push((jti.to_owned(), until));
                }
            } else if let Some(table) = key
                .split_once('/')
                .and_then(|(t, _)| Table::ALL.into_iter().find(|x| x.name() == t))
            {
                if !changes.tables.contains(&table) {
                    changes.tables.push(table);
                }
            } else if !key.starts_with("meta/") {
                let value = (event.event_type() == EventType::Put).then(|| kv.value().to_vec());
                changes.records.push((key.to_owned(), value));
            }
        }
        feed.push(changes);
    }
}

fn describe(endpoints: &str, prefix: &str) -> String {
    format!("etcd {endpoints} (prefix {prefix})")
}

/// A file's length and modification time: a replaced file shows.
type FileStamp = (u64, Option<std::time::SystemTime>);

fn tls_stamps(tls: Option<&EtcdTls>) -> Vec<Option<FileStamp>> {
    let Some(tls) = tls else { return Vec::new() };
    [Some(&tls.ca), tls.cert.as_ref(), tls.key.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        })
        .collect()
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, String> {
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()));
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

impl Store for EtcdStore {
    fn describe(&self) -> String {
        describe(&self.endpoints, &self.prefix)
    }

    fn change_marker(&self) -> Option<PathBuf> {
        None
    }

    fn shared_records(&self) -> Option<&dyn SharedRecords> {
        Some(self)
    }

    fn feed(&self) -> Option<Arc<ChangeFeed>> {
        let feed = self.feed.get_or_init(|| {
            let feed = Arc::new(ChangeFeed::default());
            match runtime() {
                Ok(rt) => {
                    rt.spawn(watch_changes(
                        self.client.clone(),
                        self.prefix.clone(),
                        Arc::downgrade(&feed),
                    ));
                }
                Err(e) => tracing::error!(error = %e, "cannot watch etcd"),
            }
            feed
        });
        Some(feed.clone())
    }

    fn generation(&self) -> Result<u64, StoreError> {
        Ok(self.snapshot("reading the generation", None)?.0.value)
    }

    fn scan(&self, table: Table) -> Result<Vec<Row>, StoreError> {
        let dir = self.table_dir(table);
        let kvs = self.range(&format!("reading `{}`", table.name()), dir.clone())?;
        self.rows(&dir, kvs)
    }

    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = format!("{}{key}", self.table_dir(table));
        self.write(&format!("writing to `{}`", table.name()), None, &mut |_| {
            Ok(Some((vec![TxnOp::put(key.clone(), value, None)], ())))
        })?;
        Ok(())
    }

    fn remove(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let key = format!("{}{key}", self.table_dir(table));
        let written = self.write(
            &format!("removing from `{}`", table.name()),
            None,
            &mut |_| Ok(Some((vec![TxnOp::delete(key.clone(), None)], ()))),
        )?;
        Ok(written.is_some_and(|(resps, ())| {
            matches!(resps.first(), Some(TxnOpResponse::Delete(d)) if d.deleted() > 0)
        }))
    }

    fn update(
        &self,
        table: Table,
        f: &mut dyn FnMut(Vec<Row>) -> Result<Option<Vec<Row>>, String>,
    ) -> Result<bool, StoreError> {
        let dir = self.table_dir(table);
        let written = self.write(
            &format!("updating `{}`", table.name()),
            Some(dir.clone()),
            &mut |kvs| {
                let current = self.rows(&dir, kvs)?;
                let Some(next) = f(current.clone()).map_err(|message| StoreError::Refused {
                    table: table.name(),
                    message,
                })?
                else {
                    return Ok(None);
                };
                // Later rows of the same key win, as in the embedded store.
                let next: BTreeMap<String, Vec<u8>> = next.into_iter().collect();
                let current: BTreeMap<String, Vec<u8>> = current.into_iter().collect();
                let mut ops = Vec::new();
                for k in current.keys().filter(|k| !next.contains_key(*k)) {
                    ops.push(TxnOp::delete(format!("{dir}{k}"), None));
                }
                for (k, v) in next.iter().filter(|(k, v)| current.get(*k) != Some(*v)) {
                    ops.push(TxnOp::put(format!("{dir}{k}"), v.clone(), None));
                }
                Ok(Some((ops, ())))
            },
        )?;
        Ok(written.is_some())
    }

    fn revoked(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let kvs = self.range("reading revoked tokens", self.key(REVOKED))?;
        self.revocations(kvs)
    }

    fn revoke(&self, jti: &str, until: u64) -> Result<(), StoreError> {
        let key = self.key(&format!("{REVOKED}{jti}"));
        self.write("revoking a token", None, &mut |_| {
            Ok(Some((
                vec![TxnOp::put(key.clone(), until.to_string(), None)],
                (),
            )))
        })?;
        Ok(())
    }

    fn purge_revoked(&self, now: u64) -> Result<usize, StoreError> {
        // In transactions of at most what etcd allows; almost always one.
        let mut purged = 0;
        loop {
            let mut more = false;
            let written = self.write(
                "purging revoked tokens",
                Some(self.key(REVOKED)),
                &mut |kvs| {
                    let expired: Vec<String> = self
                        .revocations(kvs)?
                        .into_iter()
                        .filter(|(_, until)| *until <= now)
                        .map(|(jti, _)| jti)
                        .collect();
                    more = expired.len() >= MAX_TXN_OPS;
                    let ops: Vec<TxnOp> = expired
                        .iter()
                        .take(MAX_TXN_OPS - 1)
                        .map(|jti| TxnOp::delete(self.key(&format!("{REVOKED}{jti}")), None))
                        .collect();
                    let n = ops.len();
                    // Nothing to purge is no write: on a cluster every node's
                    // purge tick would otherwise count a generation that
                    // every node reloads for.
                    Ok((n > 0).then_some((ops, n)))
                },
            )?;
            purged += written.map_or(0, |(_, n)| n);
            if !more {
                return Ok(purged);
            }
        }
    }
}

impl SharedRecords for EtcdStore {
    fn read_all(&self, dir: &str) -> Result<Vec<Row>, StoreError> {
        let dir = self.key(dir);
        let kvs = self.range(&format!("reading `{dir}`"), dir.clone())?;
        self.rows(&dir, kvs)
    }

    fn write(&self, dir: &str, changes: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let dir = self.key(dir);
        let mut rest = changes;
        while !rest.is_empty() {
            // As many as one transaction holds (at least one).
            let mut bytes = 0;
            let n = rest
                .iter()
                .take(MAX_TXN_OPS)
                .take_while(|(k, v)| {
                    bytes += dir.len() + k.len() + v.as_ref().map_or(0, Vec::len);
                    bytes <= MAX_TXN_BYTES
                })
                .count()
                .max(1);
            let (now, later) = rest.split_at(n);
            rest = later;
            let ops: Vec<TxnOp> = now
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => TxnOp::put(format!("{dir}{k}"), v.clone(), None),
                    None => TxnOp::delete(format!("{dir}{k}"), None),
                })
                .collect();
            let mut kv = self.client.kv_client();
            self.call(&format!("writing `{dir}`"), async move {
                kv.txn(Txn::new().and_then(ops)).await
            })?;
        }
        Ok(())
    }
}
