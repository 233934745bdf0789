//! The project catalog: one SQLite row per project on this node's disk, so that listing,
//! filtering by label and counting a client's quota are one indexed query instead of a read of
//! every project in the blob store.
//!
//! Only a cache: every column comes from the store (`owner.json` and the latest manifest). It is
//! rebuilt from there when the file is missing, empty, unreadable or of another schema version,
//! and each manifest this node publishes rewrites its row. A row is only replaced by one of an
//! equal or newer generation, so a rebuild racing with a push never brings an older state back.
//! Another node's publications reach this catalog when this node next syncs that project (or at
//! its next rebuild). SQLite blocks, so every call runs on tokio's blocking pool, one at a time on
//! the one connection.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::auth::{self, AuthError, Owner};
use crate::blob::{BlobStore, StoreError};
use crate::manifest::{self, Manifest, ManifestError};
use crate::project::ProjectId;

/// Bumped whenever the tables change: a catalog of another version is dropped and rebuilt.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT,
    labels TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    pushed_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    head TEXT,
    head_commit TEXT,
    store_bytes INTEGER NOT NULL,
    shared_bytes INTEGER NOT NULL,
    deleted_at INTEGER
) WITHOUT ROWID;
CREATE INDEX projects_by_owner ON projects (owner, id);
CREATE INDEX projects_deleted ON projects (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE TABLE labels (
    project TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (project, key)
) WITHOUT ROWID;
CREATE INDEX labels_by_key ON labels (key, value, project);
";

const COLUMNS: &str = "id, owner, name, labels, created_at, pushed_at, updated_at, generation, \
                       head, head_commit, store_bytes, shared_bytes, deleted_at";

#[derive(Debug, thiserror::Error)]
pub(crate) enum CatalogError {
    #[error("project catalog {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("project catalog {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the project catalog is still being rebuilt from the blob store")]
    NotReady,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// One project as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: ProjectId,
    pub(crate) owner: String,
    pub(crate) name: Option<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) created_at: u64,
    pub(crate) pushed_at: u64,
    pub(crate) updated_at: u64,
    pub(crate) generation: u64,
    pub(crate) head: Option<String>,
    pub(crate) commit: Option<String>,
    pub(crate) store_bytes: u64,
    pub(crate) shared_bytes: u64,
    pub(crate) deleted_at: Option<u64>,
}

impl Entry {
    pub(crate) fn new(id: &ProjectId, owner: &Owner, m: &Manifest) -> Self {
        Self {
            id: id.clone(),
            owner: owner.client.clone(),
            name: m.meta.name.clone(),
            labels: m.meta.labels.clone(),
            created_at: owner.created_at,
            pushed_at: m.pushed_at,
            updated_at: m.updated_at,
            generation: m.generation,
            head: m.head.clone(),
            commit: m.head_commit().map(str::to_owned),
            store_bytes: m.store_bytes(),
            shared_bytes: m.shared_bytes(),
            deleted_at: m.deleted_at,
        }
    }

    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        let bad = |i: usize, e: Box<dyn std::error::Error + Send + Sync>| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e)
        };
        let id: String = row.get(0)?;
        Ok(Self {
            id: ProjectId::parse(&id).map_err(|e| bad(0, e.into()))?,
            owner: row.get(1)?,
            name: row.get(2)?,
            labels: serde_json::from_str(&row.get::<_, String>(3)?)
                .map_err(|e| bad(3, e.into()))?,
            created_at: get_u64(row, 4)?,
            pushed_at: get_u64(row, 5)?,
            updated_at: get_u64(row, 6)?,
            generation: get_u64(row, 7)?,
            head: row.get(8)?,
            commit: row.get(9)?,
            store_bytes: get_u64(row, 10)?,
            shared_bytes: get_u64(row, 11)?,
            deleted_at: row.get::<_, Option<i64>>(12)?.map(|v| v.max(0) as u64),
        })
    }
}

/// SQLite integers are signed; every count and time here fits in 63 bits.
fn get_u64(row: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    row.get::<_, i64>(i).map(|v| v.max(0) as u64)
}

fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Which projects a page lists.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    /// Only this client's projects; None for all (the admin).
    pub(crate) owner: Option<String>,
    /// Deleted projects instead of live ones.
    pub(crate) deleted: bool,
    /// Every label must be present, with this value when one is given.
    pub(crate) labels: Vec<(String, Option<String>)>,
    /// Only ids after this one (the previous page's last).
    pub(crate) after: Option<String>,
    pub(crate) limit: usize,
}

pub(crate) struct Page {
    pub(crate) entries: Vec<Entry>,
    /// The cursor of the next page, when there is one.
    pub(crate) next: Option<String>,
}

/// What a client's live (not deleted) projects take, for its quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) projects: u64,
    pub(crate) stored_bytes: u64,
}

/// A handle on the catalog. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Catalog {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// False until the catalog holds every project of the store (after a rebuild).
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Catalog {
    /// Opens (or creates) the catalog at `path`. A file SQLite cannot read is deleted and
    /// started over. Returns whether it must be [rebuilt](Self::rebuild) before it is complete;
    /// until then, [`Self::wait_ready`] waits.
    pub(crate) fn open(path: &Path) -> Result<(Self, bool), CatalogError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| CatalogError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        if !path.exists() {
            // A write-ahead log left beside a deleted catalog would be replayed into the new one.
            remove_with_sidecars(path, &["-wal", "-shm"])?;
        }
        let (conn, rebuild) = match open_checked(path) {
            Ok(opened) => opened,
            Err(e) => {
                log::warn!(path:? = path; "project catalog unreadable ({e}); deleting it and rebuilding it from the blob store");
                remove_with_sidecars(path, &["", "-wal", "-shm"])?;
                open_checked(path).map_err(|source| CatalogError::Sqlite {
                    path: path.to_owned(),
                    source,
                })?
            }
        };
        let (ready, _) = tokio::sync::watch::channel(!rebuild);
        Ok((
            Self {
                conn: Arc::new(Mutex::new(conn)),
                path: path.to_owned(),
                ready: Arc::new(ready),
            },
            rebuild,
        ))
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, CatalogError> {
        let conn = self.conn.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut c)
        });
        match task.await {
            Ok(r) => r.map_err(|source| CatalogError::Sqlite {
                path: self.path.clone(),
                source,
            }),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Waits until the catalog is complete, at most `timeout`.
    pub(crate) async fn wait_ready(&self, timeout: Duration) -> Result<(), CatalogError> {
        let mut rx = self.ready.subscribe();
        let ready = tokio::time::timeout(timeout, async { rx.wait_for(|r| *r).await.is_ok() })
            .await
            .unwrap_or(false);
        if ready {
            Ok(())
        } else {
            Err(CatalogError::NotReady)
        }
    }

    /// Fills the catalog from the store: every project's owner and latest manifest, 16 at a
    /// time. A project whose records are unreadable is left out (and logged) rather than keeping
    /// every other one from being listed; an unreachable store fails the whole rebuild.
    pub(crate) async fn rebuild(&self, store: &BlobStore) -> Result<usize, CatalogError> {
        let ids = store.projects().await?;
        // The closures own what they use: a stream whose closures borrow is not `Send` for
        // every lifetime, and the caller's `tokio::spawn` needs that.
        let store = store.clone();
        let entries: Vec<Entry> = futures::stream::iter(ids)
            .map(move |p| {
                let store = store.clone();
                async move { read_entry(&store, &p).await.map_err(|e| (p, e)) }
            })
            .buffered(16)
            .then(|r| async move {
                match r {
                    Ok(e) => Ok(e),
                    Err((_, CatalogError::Manifest(ManifestError::Store(e))))
                    | Err((_, CatalogError::Auth(AuthError::Store(e)))) => Err(e.into()),
                    Err((p, e)) => {
                        log::warn!(project:% = p; "left out of the project catalog: {e}");
                        Ok(None)
                    }
                }
            })
            .try_filter_map(|e| async move { Ok::<_, CatalogError>(e) })
            .try_collect()
            .await?;
        let n = entries.len();
        self.call(move |c| {
            let tx = c.transaction()?;
            for e in &entries {
                upsert(&tx, e)?;
            }
            tx.commit()
        })
        .await?;
        self.ready.send_replace(true);
        Ok(n)
    }

    /// Re-reads `project` from the store into its row; drops the row when the project is gone.
    pub(crate) async fn refresh(
        &self,
        store: &BlobStore,
        project: &ProjectId,
    ) -> Result<Option<Entry>, CatalogError> {
        match read_entry(store, project).await? {
            Some(e) => {
                self.put(e.clone()).await?;
                Ok(Some(e))
            }
            None => {
                self.remove(project).await?;
                Ok(None)
            }
        }
    }

    /// Writes `e` unless the row already holds a newer generation.
    pub(crate) async fn put(&self, e: Entry) -> Result<(), CatalogError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            upsert(&tx, &e)?;
            tx.commit()
        })
        .await
    }

    pub(crate) async fn remove(&self, project: &ProjectId) -> Result<(), CatalogError> {
        let id = project.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM projects WHERE id = ?1", [&id])?;
            tx.execute("DELETE FROM labels WHERE project = ?1", [&id])?;
            tx.commit()
        })
        .await
    }

    pub(crate) async fn get(&self, project: &ProjectId) -> Result<Option<Entry>, CatalogError> {
        let id = project.to_string();
        self.call(move |c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM projects WHERE id = ?1"),
                [&id],
                Entry::from_row,
            )
            .optional()
        })
        .await
    }

    /// One page of projects in id order: one indexed query.
    pub(crate) async fn list(&self, filter: Filter) -> Result<Page, CatalogError> {
        let (sql, args) = page_query(&filter);
        let limit = filter.limit;
        let mut entries = self
            .call(move |c| {
                let mut stmt = c.prepare_cached(&sql)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(args), Entry::from_row)?;
                rows.collect::<rusqlite::Result<Vec<Entry>>>()
            })
            .await?;
        let next = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|e| e.id.to_string())
        } else {
            None
        };
        Ok(Page { entries, next })
    }

    /// What `owner`'s live projects take.
    pub(crate) async fn usage(&self, owner: &str) -> Result<Usage, CatalogError> {
        let owner = owner.to_owned();
        self.call(move |c| {
            c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(store_bytes), 0) FROM projects \
                 WHERE owner = ?1 AND deleted_at IS NULL",
                [&owner],
                |r| {
                    Ok(Usage {
                        projects: get_u64(r, 0)?,
                        stored_bytes: get_u64(r, 1)?,
                    })
                },
            )
        })
        .await
    }

    /// [`Self::usage`] of every client that has a live project.
    pub(crate) async fn usage_by_owner(&self) -> Result<HashMap<String, Usage>, CatalogError> {
        self.call(|c| {
            let mut stmt = c.prepare(
                "SELECT owner, COUNT(*), COALESCE(SUM(store_bytes), 0) FROM projects \
                 WHERE deleted_at IS NULL GROUP BY owner",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Usage {
                        projects: get_u64(r, 1)?,
                        stored_bytes: get_u64(r, 2)?,
                    },
                ))
            })?;
            rows.collect()
        })
        .await
    }

    /// Projects deleted at or before `deleted_before` (unix seconds): due for purging.
    pub(crate) async fn deleted_before(
        &self,
        deleted_before: u64,
    ) -> Result<Vec<ProjectId>, CatalogError> {
        let ids: Vec<String> = self
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT id FROM projects WHERE deleted_at IS NOT NULL AND deleted_at <= ?1 ORDER BY id",
                )?;
                let rows = stmt.query_map([sql_int(deleted_before)], |r| r.get(0))?;
                rows.collect()
            })
            .await?;
        Ok(ids
            .iter()
            .filter_map(|s| ProjectId::parse(s).ok())
            .collect())
    }
}

/// The SQL of one page and its parameters: the owner's `(owner, id)` index (or the primary key
/// for the admin) walked in id order from the cursor, labels checked per row by their primary
/// key, one row more than the page to tell whether another follows.
fn page_query(filter: &Filter) -> (String, Vec<Value>) {
    let mut sql = format!("SELECT {COLUMNS} FROM projects p WHERE ");
    sql.push_str(if filter.deleted {
        "p.deleted_at IS NOT NULL"
    } else {
        "p.deleted_at IS NULL"
    });
    let mut args: Vec<Value> = Vec::new();
    if let Some(owner) = &filter.owner {
        sql.push_str(" AND p.owner = ?");
        args.push(Value::Text(owner.clone()));
    }
    if let Some(after) = &filter.after {
        sql.push_str(" AND p.id > ?");
        args.push(Value::Text(after.clone()));
    }
    for (key, value) in &filter.labels {
        sql.push_str(" AND EXISTS (SELECT 1 FROM labels l WHERE l.project = p.id AND l.key = ?");
        args.push(Value::Text(key.clone()));
        if let Some(v) = value {
            sql.push_str(" AND l.value = ?");
            args.push(Value::Text(v.clone()));
        }
        sql.push(')');
    }
    // One more than asked tells whether another page follows.
    sql.push_str(" ORDER BY p.id LIMIT ?");
    args.push(Value::Integer(filter.limit as i64 + 1));
    (sql, args)
}

/// Removes `path` with each suffix appended, those that exist.
fn remove_with_sidecars(path: &Path, suffixes: &[&str]) -> Result<(), CatalogError> {
    for suffix in suffixes {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CatalogError::Io {
                    path: p.into(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The catalog entry of `project` from the store; None when it has no owner (never created, or
/// purged).
async fn read_entry(store: &BlobStore, project: &ProjectId) -> Result<Option<Entry>, CatalogError> {
    let (owner, m) = futures::try_join!(
        async {
            auth::owner(store, project)
                .await
                .map_err(CatalogError::from)
        },
        async {
            manifest::latest(store, project)
                .await
                .map_err(CatalogError::from)
        },
    )?;
    Ok(owner.map(|o| Entry::new(project, &o, &m)))
}

/// Opens `path` in WAL mode and makes sure it is a catalog of this schema version: a new file or
/// another version gets fresh tables. Returns whether the catalog needs a rebuild (new, other
/// version, or empty).
fn open_checked(path: &Path) -> rusqlite::Result<(Connection, bool)> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Reading the journal mode is the first read of the file: a file that is not a database
    // fails here.
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(check),
        ));
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version != SCHEMA_VERSION {
        conn.execute_batch(&format!(
            "BEGIN;
             DROP TABLE IF EXISTS projects;
             DROP TABLE IF EXISTS labels;
             {SCHEMA}
             PRAGMA user_version = {SCHEMA_VERSION};
             COMMIT;"
        ))?;
        return Ok((conn, true));
    }
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM projects", [], |r| r.get(0))?;
    Ok((conn, rows == 0))
}

fn upsert(tx: &rusqlite::Transaction<'_>, e: &Entry) -> rusqlite::Result<()> {
    let labels = serde_json::to_string(&e.labels).expect("labels serialize");
    let changed = tx.execute(
        &format!(
            "INSERT INTO projects ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (id) DO UPDATE SET
                owner = excluded.owner, name = excluded.name, labels = excluded.labels,
                created_at = excluded.created_at, pushed_at = excluded.pushed_at,
                updated_at = excluded.updated_at, generation = excluded.generation,
                head = excluded.head, head_commit = excluded.head_commit,
                store_bytes = excluded.store_bytes, shared_bytes = excluded.shared_bytes,
                deleted_at = excluded.deleted_at
             WHERE excluded.generation >= projects.generation"
        ),
        params![
            e.id.as_str(),
            e.owner,
            e.name,
            labels,
            sql_int(e.created_at),
            sql_int(e.pushed_at),
            sql_int(e.updated_at),
            sql_int(e.generation),
            e.head,
            e.commit,
            sql_int(e.store_bytes),
            sql_int(e.shared_bytes),
            e.deleted_at.map(sql_int),
        ],
    )?;
    if changed > 0 {
        tx.execute("DELETE FROM labels WHERE project = ?1", [e.id.as_str()])?;
        let mut insert =
            tx.prepare_cached("INSERT INTO labels (project, key, value) VALUES (?1, ?2, ?3)")?;
        for (k, v) in &e.labels {
            insert.execute(params![e.id.as_str(), k, v])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{PackEntry, Publish};

    fn id(s: &str) -> ProjectId {
        ProjectId::parse(s).unwrap()
    }

    fn pack(name: &str, size: u64, from: Option<&str>) -> PackEntry {
        PackEntry {
            name: name.into(),
            pack_size: size,
            pack_sha256: String::new(),
            idx_size: 10,
            idx_sha256: String::new(),
            objects: 1,
            replaces: Vec::new(),
            from: from.map(id),
        }
    }

    /// Creates `project` for `client` in the store with one published generation.
    async fn stored(
        store: &BlobStore,
        project: &str,
        client: &str,
        edit: impl FnOnce(&mut Manifest),
    ) {
        assert!(auth::claim_project(store, &id(project), client)
            .await
            .unwrap());
        let mut m = Manifest::default().next();
        edit(&mut m);
        assert_eq!(
            manifest::publish(store, &id(project), &m).await.unwrap(),
            Publish::Won
        );
    }

    fn entry(project: &str, owner: &str, labels: &[(&str, &str)]) -> Entry {
        let mut m = Manifest::default().next();
        m.meta.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let o = Owner {
            client: owner.into(),
            created_at: 1,
        };
        Entry::new(&id(project), &o, &m)
    }

    #[tokio::test]
    async fn a_missing_catalog_is_rebuilt_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
        stored(&store, "shop", "aaaa", |m| {
            m.meta.name = Some("The shop".into());
            m.meta.labels.insert("env".into(), "prod".into());
            m.refs.insert("refs/heads/main".into(), "c".repeat(40));
            m.head = Some("refs/heads/main".into());
            m.packs = vec![pack("pack-1", 100, None), pack("pack-2", 50, Some("blog"))];
        })
        .await;
        stored(&store, "blog", "bbbb", |m| m.deleted_at = Some(5)).await;
        // A prefix without owner.json (what a purge keeps for importers) is no project.
        store
            .put(
                &crate::blob::keys::pack(&id("gone"), "pack-9", "pack"),
                bytes::Bytes::from_static(b"x"),
            )
            .await
            .unwrap();

        let path = dir.path().join("cache/catalog.sqlite3");
        let (cat, rebuild) = Catalog::open(&path).unwrap();
        assert!(rebuild, "a new catalog needs a rebuild");
        assert!(cat.wait_ready(Duration::from_millis(10)).await.is_err());
        assert_eq!(cat.rebuild(&store).await.unwrap(), 2);
        cat.wait_ready(Duration::from_millis(10)).await.unwrap();

        let shop = cat.get(&id("shop")).await.unwrap().unwrap();
        assert_eq!(shop.owner, "aaaa");
        assert_eq!(shop.name.as_deref(), Some("The shop"));
        assert_eq!(shop.commit, Some("c".repeat(40)));
        assert_eq!((shop.store_bytes, shop.shared_bytes), (110, 60));
        assert_eq!(
            cat.usage("aaaa").await.unwrap(),
            Usage {
                projects: 1,
                stored_bytes: 110
            }
        );
        // Deleted projects count for no quota and are due once their time has come.
        assert_eq!(cat.usage("bbbb").await.unwrap(), Usage::default());
        assert!(cat.deleted_before(4).await.unwrap().is_empty());
        assert_eq!(cat.deleted_before(5).await.unwrap(), vec![id("blog")]);
        drop(cat);

        // Reopened with rows, it is complete as it is.
        let (cat, rebuild) = Catalog::open(&path).unwrap();
        assert!(!rebuild);
        assert!(cat.get(&id("shop")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_corrupt_or_older_catalog_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite3");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let (cat, rebuild) = Catalog::open(&path).unwrap();
        assert!(rebuild);
        cat.put(entry("a", "c1", &[])).await.unwrap();
        drop(cat);

        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let (cat, rebuild) = Catalog::open(&path).unwrap();
        assert!(rebuild, "another schema version is rebuilt");
        assert!(cat.get(&id("a")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_older_generation_never_replaces_a_newer_row() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = Catalog::open(&dir.path().join("c.sqlite3")).unwrap();
        let mut newer = entry("a", "c1", &[("k", "new")]);
        newer.generation = 5;
        let mut older = entry("a", "c1", &[("k", "old")]);
        older.generation = 4;
        cat.put(newer.clone()).await.unwrap();
        cat.put(older).await.unwrap();
        assert_eq!(cat.get(&id("a")).await.unwrap(), Some(newer));
        let f = Filter {
            labels: vec![("k".into(), Some("old".into()))],
            limit: 10,
            ..Filter::default()
        };
        assert!(cat.list(f).await.unwrap().entries.is_empty());
    }

    #[tokio::test]
    async fn pages_cover_every_project_once_and_filters_combine() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = Catalog::open(&dir.path().join("c.sqlite3")).unwrap();
        for i in 0..250 {
            let owner = if i % 5 == 0 { "other" } else { "me" };
            let tier = if i % 2 == 0 { "free" } else { "paid" };
            let mut labels = vec![("tier", tier)];
            if i % 3 == 0 {
                labels.push(("team/x", "1"));
            }
            cat.put(entry(&format!("p{i:03}"), owner, &labels))
                .await
                .unwrap();
        }
        let mut deleted = entry("p999", "me", &[]);
        deleted.deleted_at = Some(1);
        cat.put(deleted).await.unwrap();

        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = cat
                .list(Filter {
                    owner: Some("me".into()),
                    after: after.clone(),
                    limit: 60,
                    ..Filter::default()
                })
                .await
                .unwrap();
            pages += 1;
            seen.extend(page.entries.iter().map(|e| e.id.to_string()));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let expected: Vec<String> = (0..250)
            .filter(|i| i % 5 != 0)
            .map(|i| format!("p{i:03}"))
            .collect();
        assert_eq!(
            seen, expected,
            "every live project of the owner, once, in order"
        );
        assert_eq!(pages, 4);

        let only = |labels: Vec<(&str, Option<&str>)>| Filter {
            owner: Some("me".into()),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.map(str::to_owned)))
                .collect(),
            limit: 1000,
            ..Filter::default()
        };
        let paid = cat.list(only(vec![("tier", Some("paid"))])).await.unwrap();
        assert!(paid.next.is_none());
        assert_eq!(
            paid.entries.len(),
            (0..250).filter(|i| i % 5 != 0 && i % 2 == 1).count()
        );
        let both = cat
            .list(only(vec![("tier", Some("paid")), ("team/x", None)]))
            .await
            .unwrap();
        let want: Vec<String> = (0..250)
            .filter(|i| i % 5 != 0 && i % 2 == 1 && i % 3 == 0)
            .map(|i| format!("p{i:03}"))
            .collect();
        let got: Vec<String> = both.entries.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(got, want);

        let gone = cat
            .list(Filter {
                owner: Some("me".into()),
                deleted: true,
                limit: 10,
                ..Filter::default()
            })
            .await
            .unwrap();
        assert_eq!(gone.entries.len(), 1);
        assert_eq!(gone.entries[0].id, id("p999"));
        let all = cat
            .list(Filter {
                limit: 1000,
                ..Filter::default()
            })
            .await
            .unwrap();
        assert_eq!(all.entries.len(), 250);
        assert_eq!(cat.usage_by_owner().await.unwrap()["other"].projects, 50);
    }

    #[tokio::test]
    async fn a_page_of_ten_thousand_projects_is_one_indexed_query() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = Catalog::open(&dir.path().join("c.sqlite3")).unwrap();
        let entries: Vec<Entry> = (0..10_000)
            .map(|i| {
                entry(
                    &format!("p{i:05}"),
                    "me",
                    &[("n", if i % 100 == 0 { "x" } else { "y" })],
                )
            })
            .collect();
        cat.call(move |c| {
            let tx = c.transaction()?;
            for e in &entries {
                upsert(&tx, e)?;
            }
            tx.commit()
        })
        .await
        .unwrap();
        for filter in [
            Filter {
                owner: Some("me".into()),
                after: Some("p05000".into()),
                labels: vec![("n".into(), Some("x".into()))],
                limit: 100,
                ..Filter::default()
            },
            Filter {
                after: Some("p05000".into()),
                limit: 100,
                ..Filter::default()
            },
        ] {
            let (sql, args) = page_query(&filter);
            let plan: Vec<String> = cat
                .call(move |c| {
                    let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                    let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| r.get(3))?;
                    rows.collect()
                })
                .await
                .unwrap();
            let plan = plan.join("; ");
            assert!(
                !plan.contains("TEMP B-TREE"),
                "sorts instead of walking an index: {plan}"
            );
            assert!(
                plan.contains("USING INDEX projects_by_owner")
                    || plan.contains("USING PRIMARY KEY"),
                "{plan}"
            );
            let started = std::time::Instant::now();
            let page = cat.list(filter).await.unwrap();
            assert!(!page.entries.is_empty());
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "{:?}",
                started.elapsed()
            );
        }
    }
}
