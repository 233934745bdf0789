//! The project manifest: refs, HEAD and the pack list, published as numbered generations.
//!
//! Generation N+1 is written with a Create, so of two writers that both read N exactly one wins; the
//! loser re-reads and decides (a push is refused or rebased onto non-conflicting changes, compaction
//! retries). Manifests are never rewritten, so a reader that found generation N can always read it.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob::{keys, BlobStore, Created, StoreError};
use crate::project::ProjectId;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// 0 for a project that has never been pushed; no generation-0 object exists.
    pub generation: u64,
    /// The branch `HEAD` points at, e.g. `refs/heads/main`.
    pub head: Option<String>,
    pub refs: BTreeMap<String, String>,
    pub packs: Vec<PackEntry>,
    /// Packs replaced by compaction, kept in the store until a grace period has passed.
    #[serde(default)]
    pub retired: Vec<Retired>,
    /// Unix seconds.
    pub updated_at: u64,
    /// Unix seconds of the last change to `refs` (0 before the first push); `updated_at` also
    /// moves for metadata, shares and compaction.
    #[serde(default)]
    pub pushed_at: u64,
    /// What the generator says about the project: name, labels, free-form JSON.
    #[serde(default, skip_serializing_if = "ProjectMeta::is_empty")]
    pub meta: ProjectMeta,
    /// Set by `DELETE /api/projects/{p}`: the project is gone for its users and is reaped once
    /// the grace period has passed; a restore clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<u64>,
    /// Share links, revoked ones included (they stay listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form JSON, bounded in size by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

impl ProjectMeta {
    pub fn is_empty(&self) -> bool {
        *self == ProjectMeta::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Short public id, used to list and revoke.
    pub id: String,
    /// SHA-256 of the share token; the token itself is shown once, at creation.
    pub token_sha256: String,
    pub commit: String,
    pub mode: ShareMode,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Opens the preview of the shared version.
    View,
    /// Also lets another client import the version, with its history, as a new project.
    Fork,
}

impl Share {
    /// Neither revoked nor expired at `now` (unix seconds).
    pub fn is_live(&self, now: u64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// `pack-<checksum>`, as git names it.
    pub name: String,
    pub pack_size: u64,
    pub pack_sha256: String,
    pub idx_size: u64,
    pub idx_sha256: String,
    pub objects: u64,
    /// Packs whose objects this one holds (set by compaction): a reader that has them all needs
    /// nothing from this pack.
    #[serde(default)]
    pub replaces: Vec<String>,
    /// The project whose prefix holds this pack, when it is not this one: an import shares the
    /// source project's packs instead of copying them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ProjectId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub name: String,
    pub retired_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("manifest generation {generation} of project {project} is unreadable: {source}")]
    Corrupt {
        project: ProjectId,
        generation: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest generation {generation} of project {project} is listed but missing")]
    Missing { project: ProjectId, generation: u64 },
}

/// Whether a new generation was published.
#[derive(Debug, PartialEq, Eq)]
pub enum Publish {
    Won,
    /// Another writer claimed that generation first: re-read and decide.
    Lost,
}

impl Manifest {
    pub fn pack(&self, name: &str) -> Option<&PackEntry> {
        self.packs.iter().find(|p| p.name == name)
    }

    /// The commit of the branch HEAD names, if that branch exists.
    pub fn head_commit(&self) -> Option<&str> {
        self.head
            .as_ref()
            .and_then(|h| self.refs.get(h))
            .map(String::as_str)
    }

    /// Pack and index bytes under this project's own prefix: what it costs in the store.
    pub fn store_bytes(&self) -> u64 {
        self.packs
            .iter()
            .filter(|p| p.from.is_none())
            .map(|p| p.pack_size + p.idx_size)
            .sum()
    }

    /// Pack and index bytes this project reads from other projects' prefixes (imports).
    pub fn shared_bytes(&self) -> u64 {
        self.packs
            .iter()
            .filter(|p| p.from.is_some())
            .map(|p| p.pack_size + p.idx_size)
            .sum()
    }

    /// The projects whose prefixes hold some of this project's packs, each once, sorted.
    pub fn pack_sources(&self) -> Vec<ProjectId> {
        let set: std::collections::BTreeSet<&ProjectId> =
            self.packs.iter().filter_map(|p| p.from.as_ref()).collect();
        set.into_iter().cloned().collect()
    }

    /// The successor of this manifest, to be filled in and published.
    pub fn next(&self) -> Manifest {
        Manifest {
            generation: self.generation + 1,
            updated_at: unix_now(),
            ..self.clone()
        }
    }
}

/// The highest generation after `after`, or None when there is none newer.
pub async fn newest_generation(
    store: &BlobStore,
    project: &ProjectId,
    after: u64,
) -> Result<Option<u64>, ManifestError> {
    let offset = (after > 0).then(|| keys::manifest(project, after));
    let names = store
        .list(&keys::manifests(project), offset.as_ref())
        .await?;
    Ok(names
        .iter()
        .filter_map(|l| l.name.strip_suffix(".json")?.parse::<u64>().ok())
        .filter(|g| *g > after)
        .max())
}

pub async fn read(
    store: &BlobStore,
    project: &ProjectId,
    generation: u64,
) -> Result<Manifest, ManifestError> {
    let bytes = store
        .get(&keys::manifest(project, generation))
        .await?
        .ok_or_else(|| ManifestError::Missing {
            project: project.clone(),
            generation,
        })?;
    serde_json::from_slice(&bytes).map_err(|source| ManifestError::Corrupt {
        project: project.clone(),
        generation,
        source,
    })
}

/// The current manifest; an empty generation 0 for a project never pushed.
pub async fn latest(store: &BlobStore, project: &ProjectId) -> Result<Manifest, ManifestError> {
    match newest_generation(store, project, 0).await? {
        Some(g) => read(store, project, g).await,
        None => Ok(Manifest::default()),
    }
}

/// Publishes `m` as generation `m.generation`, only if no writer has claimed it.
pub async fn publish(
    store: &BlobStore,
    project: &ProjectId,
    m: &Manifest,
) -> Result<Publish, ManifestError> {
    let body = serde_json::to_vec_pretty(m).expect("manifest serializes");
    match store
        .create(&keys::manifest(project, m.generation), Bytes::from(body))
        .await?
    {
        Created::Yes => Ok(Publish::Won),
        Created::AlreadyExists => Ok(Publish::Lost),
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> ProjectId {
        ProjectId::parse("p1").unwrap()
    }

    #[tokio::test]
    async fn racing_writers_of_one_generation_have_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).unwrap();
        let base = latest(&store, &project()).await.unwrap();
        assert_eq!(base.generation, 0);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = store.clone();
            let mut m = base.next();
            m.refs.insert("refs/heads/main".into(), format!("{i:040}"));
            tasks.push(tokio::spawn(async move {
                publish(&store, &project(), &m).await
            }));
        }
        let mut won = 0;
        for t in tasks {
            if t.await.unwrap().unwrap() == Publish::Won {
                won += 1;
            }
        }
        assert_eq!(won, 1);
        let now = latest(&store, &project()).await.unwrap();
        assert_eq!(now.generation, 1);
        assert_eq!(now.refs.len(), 1);
    }

    #[tokio::test]
    async fn newest_generation_skips_what_the_reader_already_has() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).unwrap();
        let mut m = Manifest::default();
        for _ in 0..12 {
            m = m.next();
            assert_eq!(publish(&store, &project(), &m).await.unwrap(), Publish::Won);
        }
        assert_eq!(
            newest_generation(&store, &project(), 3).await.unwrap(),
            Some(12)
        );
        assert_eq!(
            newest_generation(&store, &project(), 12).await.unwrap(),
            None
        );
        assert_eq!(latest(&store, &project()).await.unwrap().generation, 12);
    }
}
