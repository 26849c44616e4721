//! The embedded store: one redb file. Records are JSON so a store stays
//! readable across versions.
//!
//! The file is opened per operation, not held: redb locks it while open, and
//! `tollgate clients add` must be able to write while the gateway runs. The
//! gateway keeps what it serves from in memory and re-reads when the file
//! changes. Every write transaction is durable (fsync) when it returns, and
//! counts one more generation, so a running gateway can tell whether what it
//! serves is what the store holds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition};

use super::{Row, Store, StoreError, Table};

const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked_tokens");
/// `generation`: how many write transactions the store has committed.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const GENERATION: &str = "generation";

/// Any redb error, boxed (they are large), so `?` works inside transactions.
pub struct DbError(pub Box<redb::Error>);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: Into<redb::Error>> From<E> for DbError {
    fn from(e: E) -> DbError {
        DbError(Box::new(e.into()))
    }
}

pub struct RedbStore {
    path: PathBuf,
    /// The open database, kept while operations follow each other and
    /// closed after [`LINGER`] of quiet, so the CLI can open the file.
    open: Arc<Mutex<Option<Open>>>,
}

struct Open {
    db: Database,
    opened: Instant,
    last_used: Instant,
}

/// How long the file stays open after the last operation. Opening and
/// closing a redb file costs two commits; a burst of admin API writes
/// shares one open.
const LINGER: Duration = Duration::from_millis(250);

/// How long the file stays open at a stretch, however busy: then it is
/// closed for [`YIELD`], so the CLI gets its turn while admin writes keep
/// coming.
const MAX_HOLD: Duration = Duration::from_secs(1);
const YIELD: Duration = Duration::from_millis(100);

/// How long an operation waits for the file while another process has it open.
const LOCK_WAIT: Duration = Duration::from_secs(5);

impl RedbStore {
    /// Opens (creating the file, its directory and tables when missing) to
    /// check it is usable.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
                path: path.to_owned(),
                message: format!("cannot create its directory: {e}"),
            })?;
        }
        // Created owner-only before redb opens it: nobody else can get a
        // descriptor to the signing keys in between.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match created {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(StoreError::Io {
                        path: path.to_owned(),
                        message: format!("cannot create: {e}"),
                    });
                }
            }
        }
        let store = RedbStore {
            path: path.to_owned(),
            open: Arc::new(Mutex::new(None)),
        };
        // The tables, made once; not a change of what the store holds, so
        // not a generation.
        store.with_db(|db| {
            // The store holds signing keys and secret hashes: owner-only.
            restrict_permissions(path);
            let made = || -> Result<(), DbError> {
                let txn = db.begin_write()?;
                for table in Table::ALL {
                    txn.open_table(definition(table))?;
                }
                txn.open_table(REVOKED)?;
                txn.open_table(META)?;
                txn.commit()?;
                Ok(())
            };
            made().map_err(|e| store.io(e.0))
        })?;
        Ok(store)
    }

    /// The file a change of clients or keys touches. Watchers watch it, not
    /// the store itself: redb writes to the store on every open and close,
    /// so a reader would wake itself up.
    pub fn marker_for(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".changed");
        PathBuf::from(p)
    }

    fn announce_change(&self) {
        let marker = Self::marker_for(&self.path);
        let stamp = format!("{:?}\n", std::time::SystemTime::now());
        if let Err(e) = std::fs::write(&marker, stamp) {
            tracing::warn!(file = %marker.display(), error = %e,
                "cannot touch the store's change marker; a running gateway picks the change up on reload (SIGHUP)");
        }
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        let message = e.to_string();
        // ENOSPC, as the OS words it (redb keeps the io::Error only as text
        // by the time it gets here).
        if message.contains("(os error 28)") {
            return StoreError::Full {
                path: self.path.clone(),
                message,
            };
        }
        StoreError::Io {
            path: self.path.clone(),
            message,
        }
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open
            .as_ref()
            .is_some_and(|o| o.opened.elapsed() >= MAX_HOLD)
        {
            // Held long enough: let another process (the CLI) have it.
            *open = None;
            std::thread::sleep(YIELD);
        }
        if open.is_none() {
            let deadline = Instant::now() + LOCK_WAIT;
            let db = loop {
                match Database::create(&self.path) {
                    Ok(db) => break db,
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                        return Err(self.io("held open by another process for more than 5s"));
                    }
                    Err(e) => return Err(self.io(e)),
                }
            };
            let now = Instant::now();
            *open = Some(Open {
                db,
                opened: now,
                last_used: now,
            });
            self.close_when_quiet();
        }
        let Some(o) = open.as_mut() else {
            return Err(self.io("not open"));
        };
        let out = f(&o.db);
        o.last_used = Instant::now();
        if out.is_err() {
            // A failed commit can leave the open database refusing every
            // later operation: the next one opens the file afresh.
            *open = None;
        }
        out
    }

    /// Closes the file once no operation has used it for [`LINGER`].
    fn close_when_quiet(&self) {
        let open = Arc::downgrade(&self.open);
        let spawned = std::thread::Builder::new()
            .name("tollgate-store".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(LINGER / 2);
                    let Some(open) = open.upgrade() else { return };
                    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                    match open.as_ref() {
                        None => return,
                        Some(o) if o.last_used.elapsed() >= LINGER => {
                            *open = None;
                            return;
                        }
                        Some(_) => {}
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the store's closer; the file stays open");
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, DbError>,
    ) -> Result<T, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.io(e))?;
            let out = f(&txn).map_err(|e| self.io(e.0))?;
            next_generation(&txn).map_err(|e| self.io(e.0))?;
            txn.commit().map_err(|e| self.io(e))?;
            Ok(out)
        })
    }

    /// One store per file in this process (redb allows one open at a time),
    /// kept for the life of the process: reopening would redo `open`'s
    /// checks; the file itself is closed when quiet.
    pub fn shared(path: &Path) -> Result<Arc<RedbStore>, StoreError> {
        static OPEN: Mutex<Vec<(PathBuf, Arc<RedbStore>)>> = Mutex::new(Vec::new());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = open.iter().find(|(p, _)| p == path) {
            return Ok(s.clone());
        }
        let store = Arc::new(RedbStore::open(path)?);
        open.push((path.to_owned(), store.clone()));
        Ok(store)
    }

    fn rows(
        &self,
        t: &impl ReadableTable<&'static str, &'static [u8]>,
    ) -> Result<Vec<Row>, StoreError> {
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.io(e))? {
            let (k, v) = row.map_err(|e| self.io(e))?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn changed(&self, table: Table) {
        if table.announced() {
            self.announce_change();
        }
    }
}

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

impl Store for RedbStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn change_marker(&self) -> Option<PathBuf> {
        Some(RedbStore::marker_for(&self.path))
    }

    fn generation(&self) -> Result<u64, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.io(e))?;
            let t = txn.open_table(META).map_err(|e| self.io(e))?;
            let generation = t.get(GENERATION).map_err(|e| self.io(e))?;
            Ok(generation.map_or(0, |g| g.value()))
        })
    }

    fn scan(&self, table: Table) -> Result<Vec<Row>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.io(e))?;
            let t = txn.open_table(definition(table)).map_err(|e| self.io(e))?;
            self.rows(&t)
        })
    }

    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(definition(table))?.insert(key, value)?;
            Ok(())
        })?;
        self.changed(table);
        Ok(())
    }

    fn remove(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let removed =
            self.write(|txn| Ok(txn.open_table(definition(table))?.remove(key)?.is_some()))?;
        self.changed(table);
        Ok(removed)
    }

    fn update(
        &self,
        table: Table,
        f: &mut dyn FnMut(Vec<Row>) -> Result<Option<Vec<Row>>, String>,
    ) -> Result<bool, StoreError> {
        let changed = self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.io(e))?;
            let current = {
                let t = txn.open_table(definition(table)).map_err(|e| self.io(e))?;
                self.rows(&t)?
            };
            let Some(rows) = f(current).map_err(|message| StoreError::Refused {
                table: table.name(),
                message,
            })?
            else {
                txn.abort().map_err(|e| self.io(e))?;
                return Ok(false);
            };
            {
                let mut t = txn.open_table(definition(table)).map_err(|e| self.io(e))?;
                t.retain(|_, _| false).map_err(|e| self.io(e))?;
                for (k, v) in &rows {
                    t.insert(k.as_str(), v.as_slice()).map_err(|e| self.io(e))?;
                }
            }
            next_generation(&txn).map_err(|e| self.io(e.0))?;
            txn.commit().map_err(|e| self.io(e))?;
            Ok(true)
        })?;
        if changed {
            self.changed(table);
        }
        Ok(changed)
    }

    fn revoked(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.io(e))?;
            let t = txn.open_table(REVOKED).map_err(|e| self.io(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.io(e))? {
                let (k, v) = row.map_err(|e| self.io(e))?;
                out.push((k.value().to_owned(), v.value()));
            }
            Ok(out)
        })
    }

    fn revoke(&self, jti: &str, until: u64) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(REVOKED)?.insert(jti, until)?;
            Ok(())
        })
    }

    fn purge_revoked(&self, now: u64) -> Result<usize, StoreError> {
        // Nothing to purge is no write (and no new generation, which every
        // reader would reload for).
        if !self.revoked()?.iter().any(|(_, until)| *until <= now) {
            return Ok(0);
        }
        self.write(|txn| {
            let mut t = txn.open_table(REVOKED)?;
            let mut purged = 0;
            t.retain(|_, until| {
                let keep = until > now;
                purged += usize::from(!keep);
                keep
            })?;
            Ok(purged)
        })
    }
}

/// Counts a write transaction, inside it.
fn next_generation(txn: &redb::WriteTransaction) -> Result<(), DbError> {
    let mut meta = txn.open_table(META)?;
    let next = meta.get(GENERATION)?.map_or(0, |g| g.value()) + 1;
    meta.insert(GENERATION, next)?;
    Ok(())
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(store = %path.display(), error = %e, "cannot make the store owner-only");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed helpers live on `dyn Store`.
    fn open(path: &Path) -> Arc<dyn Store> {
        Arc::new(RedbStore::open(path).unwrap())
    }

    #[test]
    fn round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/t.redb");
        let store = open(&path);
        store
            .put_client("a", &serde_json::json!({"id": "a"}))
            .unwrap();
        store
            .put_client("b", &serde_json::json!({"id": "b"}))
            .unwrap();
        assert!(store.remove_client("b").unwrap());
        assert!(!store.remove_client("b").unwrap());
        store.revoke("j1", 10).unwrap();
        store.revoke("j2", 100).unwrap();
        assert_eq!(store.purge_revoked(50).unwrap(), 1);
        store
            .update_signing_keys(|_: Vec<serde_json::Value>| {
                Ok((
                    Some(vec![("k1".to_string(), serde_json::json!({"kid": "k1"}))]),
                    (),
                ))
            })
            .unwrap();
        drop(store);

        let store = open(&path);
        // 2 clients, 2 removes, 2 revokes, a purge, keys; opening is none.
        assert_eq!(store.generation().unwrap(), 8);
        let clients: Vec<serde_json::Value> = store.clients().unwrap();
        assert_eq!(clients, [serde_json::json!({"id": "a"})]);
        assert_eq!(store.revoked().unwrap(), [("j2".to_string(), 100)]);
        let keys: Vec<serde_json::Value> = store.signing_keys().unwrap();
        assert_eq!(keys.len(), 1);
    }
}
