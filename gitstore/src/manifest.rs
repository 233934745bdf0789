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
