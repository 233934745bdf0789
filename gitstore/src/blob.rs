//! The blob store: where every project durably lives, and the key layout inside it.
//!
//! Layout (all keys under the store URL's prefix):
//! - `clients/<id>.json`: an API client and its token hash
//! - `clients/<id>/notify.json`: where the client wants build notifications, and their secret
//! - `projects/<p>/owner.json`: which client created the project (written once, with Create)
//! - `projects/<p>/manifests/<generation:020>.json`: refs and pack list; generation N+1 is claimed
//!   with a Create, so exactly one writer wins it on every backend, the local filesystem included
//! - `projects/<p>/packs/<pack-name>.{pack,idx}`: immutable packs, named by git's pack checksum
//! - `projects/<p>/build-state.json`: the agent's report of the project's builds (a cache)
//! - `projects/<p>/importers/<q>.json`: project `q` lists packs held here (an import)
//! - `leases/<p>.json`: which agent builds project `p` (see `lease`)
//! - `agents/<id>.json`: an agent that holds leases, and where to reach it

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::project::ProjectId;

/// A handle on the blob store chosen by URL. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid blob store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("blob store: {op} {key}: {source}")]
    Backend {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{key:?} cannot be a blob store key: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("stored record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One object found by [`BlobStore::list`].
pub(crate) struct Listed {
    pub(crate) name: String,
    /// Unix seconds.
    pub(crate) modified: u64,
}

/// Outcome of a write that must not replace an existing object.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Created {
    Yes,
    AlreadyExists,
}

/// What a conditional write compares against: the object as it was read or last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Version(object_store::UpdateVersion);

/// How long object_store retries a failing request before the error is returned.
const STORE_RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

impl BlobStore {
    /// Opens the store at `url`: `file:///abs/dir` (or a plain directory path), `az://container/prefix`,
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `memory://`. Cloud credentials come from the
    /// usual `AZURE_*`, `AWS_*` and `GOOGLE_*` environment variables, as object_store names them.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_env(url, "")
    }

    /// [`BlobStore::open`] where `<prefix>AZURE_*` (and `AWS_*`, `GOOGLE_*`) variables override
    /// the plain ones: a second store in another account, with its own credentials.
    pub fn open_with_env(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let inner: Arc<dyn ObjectStore> = if let Some(dir) = local_dir(url) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
            // Cleanup removes directories a delete leaves empty, so a purged project leaves no
            // `projects/<p>/` behind (object stores have no directories to leave).
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| invalid(e.to_string()))?
                .with_automatic_cleanup(true);
            Arc::new(fs)
        } else {
            let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
            // Bounded, so that a store that stopped answering fails a push in about half a
            // minute with an error to retry, rather than holding it for object_store's default
            // three minutes of retries.
            let defaults = [("timeout", "30s"), ("connect_timeout", "5s")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()));
            let vars = |prefix: &str| {
                let prefix = prefix.to_ascii_lowercase();
                std::env::vars().filter_map(move |(k, v)| {
                    let k = k.to_ascii_lowercase().strip_prefix(&prefix)?.to_owned();
                    let known = ["azure_", "aws_", "google_"]
                        .iter()
                        .any(|p| k.starts_with(p));
                    known.then_some((k, v))
                })
            };
            // Later options win: the prefixed ones over the plain ones.
            let opts: Vec<(String, String)> = defaults
                .into_iter()
                .chain(vars(""))
                .chain(
                    (!prefix.is_empty())
                        .then(|| vars(prefix))
                        .into_iter()
                        .flatten(),
                )
                .collect();
            let retry = object_store::RetryConfig {
                max_retries: 4,
                retry_timeout: STORE_RETRY_TIMEOUT,
                ..Default::default()
            };
            let (scheme, prefix) = object_store::ObjectStoreScheme::parse(&parsed)
                .map_err(|e| invalid(e.to_string()))?;
            macro_rules! build {
                ($builder:ty) => {{
                    let b = opts.iter().fold(
                        <$builder>::new().with_url(url.to_owned()),
                        |b, (k, v)| match k.parse() {
                            Ok(key) => b.with_config(key, v.clone()),
                            Err(_) => b,
                        },
                    );
                    let store = b
                        .with_retry(retry)
                        .build()
                        .map_err(|e| invalid(e.to_string()))?;
                    Arc::new(store) as Arc<dyn ObjectStore>
                }};
            }
            use object_store::ObjectStoreScheme as S;
            let store: Arc<dyn ObjectStore> = match scheme {
                S::MicrosoftAzure => build!(object_store::azure::MicrosoftAzureBuilder),
                S::AmazonS3 => build!(object_store::aws::AmazonS3Builder),
                S::GoogleCloudStorage => build!(object_store::gcp::GoogleCloudStorageBuilder),
                S::Memory => Arc::new(object_store::memory::InMemory::new()),
                other => return Err(invalid(format!("{other:?} is not a supported blob store"))),
            };
            if prefix.as_ref().is_empty() {
                store
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
            }
        };
        Ok(Self {
            inner,
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) async fn get(&self, key: &Path) -> Result<Option<Bytes>, StoreError> {
        match self.inner.get(key).await {
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(|e| backend("get", key, e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(backend("get", key, e)),
        }
    }

    /// The JSON record at `key`, or None when nothing is there.
    pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &Path,
    ) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.get(key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                key: key.to_string(),
                source,
            })
    }

    /// Streams an object into `sink`, calling `progress` with each chunk's size.
    pub(crate) async fn get_stream(
        &self,
        key: &Path,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let r = self
            .inner
            .get(key)
            .await
            .map_err(|e| backend("get", key, e))?;
        let mut stream = r.into_stream();
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| backend("get", key, e))?
        {
            sink(&chunk).map_err(|e| {
                backend(
                    "get",
                    key,
                    object_store::Error::Generic {
                        store: "local",
                        source: Box::new(e),
                    },
                )
            })?;
        }
        Ok(())
    }

    pub(crate) async fn put(&self, key: &Path, data: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(key, PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| backend("put", key, e))
    }

    /// Writes `data` only if nothing is at `key`: the compare-and-swap every backend supports.
    pub(crate) async fn create(&self, key: &Path, data: Bytes) -> Result<Created, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(key, PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(Created::Yes),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(e) => Err(backend("create", key, e)),
        }
    }

    /// The object at `key` and its version, or None when nothing is there.
    pub(crate) async fn get_versioned(
        &self,
        key: &Path,
    ) -> Result<Option<(Bytes, Version)>, StoreError> {
        let r = match self.inner.get(key).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(backend("get", key, e)),
        };
        let version = Version(object_store::UpdateVersion {
            e_tag: r.meta.e_tag.clone(),
            version: r.meta.version.clone(),
        });
        let bytes = r.bytes().await.map_err(|e| backend("get", key, e))?;
        Ok(Some((bytes, version)))
    }

    /// Writes `data` at `key` only if the object is still at `expected` (or, with None, only if
    /// there is none): Azure, S3 and GCS compare-and-swap. None when another writer got there
    /// first. The local filesystem cannot replace conditionally, which is an error here.
    pub(crate) async fn swap(
        &self,
        key: &Path,
        data: Bytes,
        expected: Option<&Version>,
    ) -> Result<Option<Version>, StoreError> {
        let opts = PutOptions {
            mode: match expected {
                None => PutMode::Create,
                Some(v) => PutMode::Update(v.0.clone()),
            },
            ..Default::default()
        };
        match self
            .inner
            .put_opts(key, PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(r) => Ok(Some(Version(object_store::UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            }))),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(None),
            Err(e) => Err(backend("swap", key, e)),
        }
    }

    /// Whether [`BlobStore::swap`] can replace an object: every backend but the local filesystem.
    pub fn replaces_conditionally(&self) -> bool {
        !self.is_local()
    }

    pub(crate) async fn delete(&self, key: &Path) -> Result<(), StoreError> {
        match self.inner.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend("delete", key, e)),
        }
    }

    /// Names (last path segment), sizes and modification times of the objects under `prefix`
    /// whose key sorts after `offset`.
    pub(crate) async fn list(
        &self,
        prefix: &Path,
        offset: Option<&Path>,
    ) -> Result<Vec<Listed>, StoreError> {
        let stream = match offset {
            Some(o) => self.inner.list_with_offset(Some(prefix), o),
            None => self.inner.list(Some(prefix)),
        };
        let metas: Vec<_> = stream
            .try_collect()
            .await
            .map_err(|e| backend("list", prefix, e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                Some(Listed {
                    name: m.location.filename()?.to_owned(),
                    modified: m.last_modified.timestamp().max(0) as u64,
                })
            })
            .collect())
    }

    /// Deletes every key under `projects/<p>/` except the packs named in `keep` (packs another
    /// project's manifest reads from here) and, while any is kept, the importers' records that
    /// say why (so an importer's purge can still tell). Order matters for a purge cut short:
    /// everything else goes first, then the manifests oldest first, so whatever is left still
    /// ends with the newest generation (the one marked deleted) and the next attempt finishes
    /// the job; then `owner.json`, since its absence is what frees the id. Returns how many keys
    /// it deleted.
    pub(crate) async fn purge_project(
        &self,
        p: &ProjectId,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<usize, StoreError> {
        let prefix = Path::from(format!("projects/{p}"));
        let metas: Vec<_> = self
            .inner
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| backend("list", &prefix, e))?;
        let (owner, manifests) = (keys::owner(p), keys::manifests(p));
        let (packs, importers) = (keys::packs(p), keys::importers(p));
        let mut first = Vec::new();
        let mut manifest_keys = Vec::new();
        let mut has_owner = false;
        for m in metas {
            let key = m.location;
            let kept = key.prefix_matches(&packs)
                && key
                    .filename()
                    .and_then(|f| f.rsplit_once('.'))
                    .is_some_and(|(name, _)| keep.contains(name));
            has_owner |= key == owner;
            let record = !keep.is_empty() && key.prefix_matches(&importers);
            if kept || record || key == owner {
                continue;
            }
            if key.prefix_matches(&manifests) {
                manifest_keys.push(key);
            } else {
                first.push(key);
            }
        }
        // Generation numbers are zero-padded: name order is generation order.
        manifest_keys.sort();
        let n = first.len() + manifest_keys.len() + usize::from(has_owner);
        for batch in first.chunks(16) {
            futures::future::try_join_all(batch.iter().map(|k| self.delete(k))).await?;
        }
        for k in &manifest_keys {
            self.delete(k).await?;
        }
        self.delete(&owner).await?;
        Ok(n)
    }

    /// Every project with anything stored: the ids under `projects/`, sorted.
    pub async fn projects(&self) -> Result<Vec<ProjectId>, StoreError> {
        let prefix = Path::from("projects");
        let listing = self
            .inner
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| backend("list", &prefix, e))?;
        let mut ids: Vec<ProjectId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| ProjectId::parse(p.filename()?).ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let key = Path::from("health");
        self.inner
            .list_with_delimiter(Some(&key))
            .await
            .map(|_| ())
            .map_err(|e| backend("list", &key, e))
    }
}

/// Files for the public web: a store a CDN serves from, keyed by URL path.
impl BlobStore {
    /// Writes `data` at `key` with the headers a CDN passes on. The local filesystem stores no
    /// headers: whatever serves that directory picks the type by extension.
    pub async fn put_web_file(
        &self,
        key: &str,
        data: Bytes,
        content_type: &str,
        cache_control: &str,
    ) -> Result<(), StoreError> {
        let path = web_key(key)?;
        let mut opts = PutOptions::default();
        if !self.is_local() {
            opts.attributes = object_store::Attributes::from_iter([
                (
                    object_store::Attribute::ContentType,
                    content_type.to_owned(),
                ),
                (
                    object_store::Attribute::CacheControl,
                    cache_control.to_owned(),
                ),
            ]);
        }
        self.inner
            .put_opts(&path, PutPayload::from_bytes(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| backend("put", &path, e))
    }

    /// Every key under `prefix/`, at any depth, as written.
    pub async fn keys_under(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let path = web_key(prefix)?;
        let metas: Vec<_> = self
            .inner
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| backend("list", &path, e))?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }

    /// Deletes the object at `key`; none there is no error.
    pub async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        self.delete(&web_key(key)?).await
    }

    fn is_local(&self) -> bool {
        local_dir(&self.url).is_some()
    }
}

fn web_key(key: &str) -> Result<Path, StoreError> {
    Path::parse(key).map_err(|e| StoreError::InvalidKey {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn backend(op: &'static str, key: &Path, source: object_store::Error) -> StoreError {
    StoreError::Backend {
        op,
        key: key.to_string(),
        source,
    }
}

fn local_dir(url: &str) -> Option<std::path::PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(rest.into());
    }
    (!url.contains("://")).then(|| {
        let p = std::path::PathBuf::from(url);
        if p.is_absolute() {
            p
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        }
    })
}

pub(crate) mod keys {
    use super::*;

    pub(crate) fn client(id: &str) -> Path {
        Path::from(format!("clients/{id}.json"))
    }
    pub(crate) fn notify(client: &str) -> Path {
        Path::from(format!("clients/{client}/notify.json"))
    }
    pub(crate) fn owner(p: &ProjectId) -> Path {
        Path::from(format!("projects/{p}/owner.json"))
    }
    pub(crate) fn build_state(p: &ProjectId) -> Path {
        Path::from(format!("projects/{p}/build-state.json"))
    }
    pub(crate) fn manifests(p: &ProjectId) -> Path {
        Path::from(format!("projects/{p}/manifests"))
    }
    pub(crate) fn manifest(p: &ProjectId, generation: u64) -> Path {
        Path::from(format!("projects/{p}/manifests/{generation:020}.json"))
    }
    pub(crate) fn pack(p: &ProjectId, name: &str, ext: &str) -> Path {
        Path::from(format!("projects/{p}/packs/{name}.{ext}"))
    }
    pub(crate) fn packs(p: &ProjectId) -> Path {
        Path::from(format!("projects/{p}/packs"))
    }
    pub(crate) fn lease(p: &ProjectId) -> Path {
        Path::from(format!("leases/{p}.json"))
    }
    pub(crate) fn leases() -> Path {
        Path::from("leases")
    }
    pub(crate) fn agent(id: &str) -> Path {
        Path::from(format!("agents/{id}.json"))
    }
    pub(crate) fn agents() -> Path {
        Path::from("agents")
    }
    /// Where imports record that they list `holder`'s packs (written by `shares`).
    pub(crate) fn importers(holder: &ProjectId) -> Path {
        Path::from(format!("projects/{holder}/importers"))
    }
    pub(crate) fn importer(holder: &ProjectId, importer: &ProjectId) -> Path {
        Path::from(format!("projects/{holder}/importers/{importer}.json"))
    }
}
