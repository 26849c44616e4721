//! What the gateway and the CLI write at run time (OAuth clients, signing
//! keys, revoked token ids, API-registered routes, users), behind one
//! interface: [`Store`]. The embedded redb file ([`RedbStore`]) is the
//! default; etcd (`EtcdStore`, the `cluster` feature) is the store shared by
//! the nodes of a cluster. [`open`] is the one place that picks one from the
//! config.
//!
//! Records are JSON (the helpers on `dyn Store` do the encoding), so a
//! store stays readable across versions and implementations.

mod embedded;
#[cfg(feature = "cluster")]
mod etcd;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use embedded::{DbError, RedbStore};
#[cfg(feature = "cluster")]
pub use etcd::EtcdStore;

use crate::config::Config;

/// A record: its key and its JSON bytes.
pub type Row = (String, Vec<u8>);

/// The tables of JSON records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Clients,
    SigningKeys,
    /// Routes registered through the admin API (tollgate's and Kong's shapes).
    ApiRoutes,
    /// Kong >= 1.0 services registered through the admin API.
    KongServices,
    /// Users who log in with a name and password (MQTT devices, WAMP
    /// tickets), their hashes and roles.
    Users,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Clients,
        Table::SigningKeys,
        Table::ApiRoutes,
        Table::KongServices,
        Table::Users,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Clients => "oauth_clients",
            Table::SigningKeys => "signing_keys",
            Table::ApiRoutes => "api_routes",
            Table::KongServices => "kong_services",
            Table::Users => "users",
        }
    }

    /// Whether a change is announced to a running gateway (which re-reads
    /// it); API routes are applied by the admin API that wrote them.
    pub fn announced(self) -> bool {
        matches!(self, Table::Clients | Table::SigningKeys | Table::Users)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("store {path}: the disk is full: {message}")]
    Full { path: PathBuf, message: String },
    #[error("store {path}: a record of `{table}` cannot be read: {message}")]
    Corrupt {
        path: PathBuf,
        table: String,
        message: String,
    },
    /// An update's own check refused the change; nothing was written.
    #[error("store table `{table}`: {message}")]
    Refused {
        table: &'static str,
        message: String,
    },
}

/// The store interface. Every write is durable when it returns and counts
/// one more generation, so a running gateway can tell whether what it
/// serves is what the store holds.
pub trait Store: Send + Sync {
    /// Where it is, for messages.
    fn describe(&self) -> String;
    /// A file touched whenever an announced table changes, for watchers
    /// (`None`: the implementation pushes changes another way).
    fn change_marker(&self) -> Option<PathBuf>;
    /// How many write transactions the store has committed.
    fn generation(&self) -> Result<u64, StoreError>;
    fn scan(&self, table: Table) -> Result<Vec<Row>, StoreError>;
    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Whether the record existed.
    fn remove(&self, table: Table, key: &str) -> Result<bool, StoreError>;
    /// Reads a whole table and replaces it with what `f` returns, in one
    /// transaction (so two writers cannot lose each other's rows); `None`
    /// changes nothing. Whether it changed. `f` may run more than once (a
    /// distributed store runs it again when another writer got in first);
    /// only its last run is written.
    fn update(
        &self,
        table: Table,
        f: &mut dyn FnMut(Vec<Row>) -> Result<Option<Vec<Row>>, String>,
    ) -> Result<bool, StoreError>;
    /// Revoked token ids with the time (unix seconds) after which they no
    /// longer matter.
    fn revoked(&self) -> Result<Vec<(String, u64)>, StoreError>;
    fn revoke(&self, jti: &str, until: u64) -> Result<(), StoreError>;
    /// Drops revocations whose tokens have expired; returns how many.
    fn purge_revoked(&self, now: u64) -> Result<usize, StoreError>;
    /// What other writers change, as it happens (a store shared by several
    /// nodes); `None`: changes are announced through [`Store::change_marker`].
    fn feed(&self) -> Option<Arc<ChangeFeed>> {
        None
    }
    /// Records the nodes of a cluster share outside the tables (MQTT
    /// retained messages); `None`: the store is one node's.
    fn shared_records(&self) -> Option<&dyn SharedRecords> {
        None
    }
}

/// Binary records shared by the nodes of a cluster, outside the tables and
/// the generation (no node reloads for them): the last writer of a key
/// wins. Keys are `<dir><name>`.
pub trait SharedRecords: Send + Sync {
    /// Every record under `dir`, as (name, value).
    fn read_all(&self, dir: &str) -> Result<Vec<Row>, StoreError>;
    /// Puts (`Some`) and removes (`None`), durable when it returns; in as
    /// few transactions as the store allows, in order. A key appears once.
    fn write(&self, dir: &str, changes: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError>;
}

/// What changed in a shared store since the last [`ChangeFeed::next`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Tables written.
    pub tables: Vec<Table>,
    /// Revocations made.
    pub revoked: Vec<(String, u64)>,
    /// Shared records written (key under the prefix, value; `None`:
    /// removed), in order: see [`SharedRecords`].
    pub records: Vec<(String, Option<Vec<u8>>)>,
    /// Changes may have been missed (the feed was down, or more came than
    /// it holds): read everything again.
    pub resync: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.revoked.is_empty() && self.records.is_empty() && !self.resync
    }

    pub fn touches(&self, table: Table) -> bool {
        self.resync || self.tables.contains(&table)
    }
}

/// Revocations and records a subscription holds before it asks for a full
/// re-read instead.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
const FEED_MOST_HELD: usize = 10_000;

/// Changes of a shared store pushed by its implementation to every
/// [`FeedSubscription`], each collecting them until taken: a reader that
/// falls behind gets them merged, never a queue that grows. Whoever holds
/// the last handle ends the implementation's watch.
#[derive(Default)]
pub struct ChangeFeed {
    subscribers: Mutex<Vec<std::sync::Weak<Pending>>>,
    connected: AtomicBool,
    stop: tokio_util::sync::CancellationToken,
}

#[derive(Default)]
struct Pending {
    changes: Mutex<Changes>,
    ready: tokio::sync::Notify,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Changes> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One reader of a [`ChangeFeed`]: sees every change pushed after it
/// subscribed.
pub struct FeedSubscription {
    feed: Arc<ChangeFeed>,
    pending: Arc<Pending>,
}

impl FeedSubscription {
    /// Waits for changes and takes them.
    pub async fn next(&self) -> Changes {
        loop {
            let taken = std::mem::take(&mut *self.pending.lock());
            if !taken.is_empty() {
                return taken;
            }
            self.pending.ready.notified().await;
        }
    }

    pub fn feed(&self) -> &Arc<ChangeFeed> {
        &self.feed
    }
}

impl ChangeFeed {
    /// A new reader. Its first [`FeedSubscription::next`] asks for a full
    /// read: what changed before it subscribed is not known to it.
    pub fn subscribe(self: &Arc<Self>) -> FeedSubscription {
        let pending = Arc::new(Pending::default());
        pending.lock().resync = true;
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.retain(|s| s.strong_count() > 0);
        subscribers.push(Arc::downgrade(&pending));
        FeedSubscription {
            feed: self.clone(),
            pending,
        }
    }

    /// Whether the implementation's watch is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// For the implementation: adds `changes` to what every subscriber has
    /// pending.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn push(&self, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        let subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for pending in subscribers.iter().filter_map(std::sync::Weak::upgrade) {
            {
                let mut p = pending.lock();
                p.resync |= changes.resync;
                for t in &changes.tables {
                    if !p.tables.contains(t) {
                        p.tables.push(*t);
                    }
                }
                p.revoked.extend(changes.revoked.iter().cloned());
                p.records.extend(changes.records.iter().cloned());
                if p.revoked.len() + p.records.len() > FEED_MOST_HELD {
                    p.revoked = Vec::new();
                    p.records = Vec::new();
                    p.resync = true;
                }
            }
            pending.ready.notify_one();
        }
    }

    /// For the implementation: the watch is up (everything is read again:
    /// what changed while it was down is not known) or down.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if up {
            self.push(Changes {
                resync: true,
                ..Changes::default()
            });
        }
    }

    /// For the implementation: cancelled when the last handle goes (its
    /// watch holds the feed weakly).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn stop_token(&self) -> tokio_util::sync::CancellationToken {
        self.stop.clone()
    }
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Something served from the store, read whole when a config is applied
/// and again whenever the store changes.
pub trait StoreView: Send + Sync {
    /// `store` is `None` when the config's store does not exist and
    /// nothing needs it made. An error leaves what was served as it was.
    fn load(&self, cfg: &Config, store: Option<&dyn Store>) -> Result<(), String>;
}

/// The store the config names (`store:`), shared in this process.
pub fn open(cfg: &Config) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(etcd) = &cfg.store.etcd {
        return open_etcd(cfg, etcd);
    }
    Ok(RedbStore::shared(&cfg.resolve(&cfg.store.path))?)
}

#[cfg(feature = "cluster")]
fn open_etcd(
    cfg: &Config,
    etcd: &crate::config::EtcdStoreConfig,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(EtcdStore::shared(cfg, etcd)?)
}

/// Without cluster support the config check refuses `store.etcd`; this
/// says so again to whoever skipped it.
#[cfg(not(feature = "cluster"))]
fn open_etcd(
    _: &Config,
    etcd: &crate::config::EtcdStoreConfig,
) -> Result<Arc<dyn Store>, StoreError> {
    Err(StoreError::Io {
        path: PathBuf::from(format!("etcd {}", etcd.endpoints.join(","))),
        message: "this build has no cluster support (build with --features cluster)".to_owned(),
    })
}

/// The store the config names, if it exists already (read-only callers
/// must not create one). etcd always exists.
pub fn existing(cfg: &Config) -> Result<Option<Arc<dyn Store>>, StoreError> {
    if cfg.store.etcd.is_none() && !cfg.resolve(&cfg.store.path).exists() {
        return Ok(None);
    }
    open(cfg).map(Some)
}

/// Where a change of the configured store is announced, if anywhere (not
/// for etcd: its changes reach the gateway through the generation).
pub fn change_marker(cfg: &Config) -> Option<PathBuf> {
    if cfg.store.etcd.is_some() {
        return None;
    }
    Some(RedbStore::marker_for(&cfg.resolve(&cfg.store.path)))
}

fn corrupt(store: &dyn Store, table: Table, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        path: PathBuf::from(store.describe()),
        table: table.name().to_owned(),
        message: e.to_string(),
    }
}

fn encode<V: Serialize>(store: &dyn Store, value: &V) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Io {
        path: PathBuf::from(store.describe()),
        message: format!("cannot encode a record: {e}"),
    })
}

/// Typed records.
impl dyn Store + '_ {
    pub fn records<V: DeserializeOwned>(&self, table: Table) -> Result<Vec<V>, StoreError> {
        self.scan(table)?
            .iter()
            .map(|(_, v)| serde_json::from_slice(v).map_err(|e| corrupt(self, table, e)))
            .collect()
    }

    pub fn put_record<V: Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &V,
    ) -> Result<(), StoreError> {
        self.put(table, key, &encode(self, value)?)
    }

    pub fn clients<V: DeserializeOwned>(&self) -> Result<Vec<V>, StoreError> {
        self.records(Table::Clients)
    }

    pub fn put_client<V: Serialize>(&self, id: &str, client: &V) -> Result<(), StoreError> {
        self.put_record(Table::Clients, id, client)
    }

    pub fn remove_client(&self, id: &str) -> Result<bool, StoreError> {
        self.remove(Table::Clients, id)
    }

    pub fn signing_keys<V: DeserializeOwned>(&self) -> Result<Vec<V>, StoreError> {
        self.records(Table::SigningKeys)
    }

    /// Reads the signing keys and replaces them with what `f` returns, in one
    /// write transaction (so the CLI and the gateway cannot lose each
    /// other's keys). `f` returning `None` changes nothing; it may run more
    /// than once (see [`Store::update`]).
    pub fn update_signing_keys<V, T>(
        &self,
        mut f: impl FnMut(Vec<V>) -> Result<(Option<Vec<(String, V)>>, T), String>,
    ) -> Result<T, String>
    where
        V: Serialize + DeserializeOwned,
    {
        let mut out = None;
        let table = Table::SigningKeys;
        self.update(table, &mut |rows| {
            let current = rows
                .iter()
                .map(|(_, v)| serde_json::from_slice(v).map_err(|e| corrupt(self, table, e)))
                .collect::<Result<Vec<V>, _>>()
                .map_err(|e| e.to_string())?;
            let (next, o) = f(current)?;
            out = Some(o);
            next.map(|rows| {
                rows.iter()
                    .map(|(k, v)| Ok((k.clone(), encode(self, v).map_err(|e| e.to_string())?)))
                    .collect()
            })
            .transpose()
        })
        .map_err(|e| e.to_string())?;
        out.ok_or_else(|| "the signing keys were not read".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_feed_merges_what_each_subscriber_has_not_taken() {
        let feed = Arc::new(ChangeFeed::default());
        let a = feed.subscribe();
        // A new subscriber reads everything first.
        assert!(a.next().await.resync);
        feed.push(Changes {
            tables: vec![Table::Clients],
            revoked: vec![("j1".into(), 10)],
            ..Changes::default()
        });
        let b = feed.subscribe();
        feed.push(Changes {
            tables: vec![Table::Clients, Table::ApiRoutes],
            revoked: vec![("j2".into(), 20)],
            ..Changes::default()
        });
        let got = a.next().await;
        assert_eq!(got.tables, [Table::Clients, Table::ApiRoutes]);
        assert_eq!(got.revoked, [("j1".into(), 10), ("j2".into(), 20)]);
        assert!(!got.resync && got.touches(Table::ApiRoutes) && !got.touches(Table::Users));
        let got = b.next().await;
        assert!(got.resync, "b subscribed after j1");
        assert_eq!(got.revoked, [("j2".to_owned(), 20)]);
        feed.push(Changes {
            records: vec![
                ("mqtt/retained/a".into(), Some(b"1".to_vec())),
                ("mqtt/retained/a".into(), None),
            ],
            ..Changes::default()
        });
        assert_eq!(b.next().await.records.len(), 2, "in order, each");

        // More revocations than it holds: a full read instead.
        feed.push(Changes {
            revoked: (0..=FEED_MOST_HELD as u64)
                .map(|i| (i.to_string(), i))
                .collect(),
            ..Changes::default()
        });
        let got = a.next().await;
        assert!(got.resync && got.revoked.is_empty());

        // The watch is told to stop when the last handle goes.
        let stop = feed.stop_token();
        drop(b);
        drop(feed);
        assert!(!stop.is_cancelled(), "a still holds it");
        drop(a);
        assert!(stop.is_cancelled());
    }
}
