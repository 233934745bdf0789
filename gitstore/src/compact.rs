//! Compaction: fold a project's many small push packs into one, without ever letting a manifest
//! name a missing object.
//!
//! The new pack holds every object of the packs it replaces (it is built from a repository synced
//! to that manifest, not from what refs reach), so any manifest that lists it is complete. It is
//! uploaded before the manifest that names it is published; the replaced packs move to `retired`
//! and are deleted only after a grace period, so a reader still working from an older generation
//! finds them. Packs no manifest names (left by a push that died before publishing) are deleted
//! after the same grace period.

use std::path::Path;
use std::time::Duration;

use crate::blob::{keys, BlobStore, StoreError};
use crate::git::{self, GitError};
use crate::manifest::{self, unix_now, ManifestError, Publish, Retired};
use crate::project::ProjectId;
use crate::receive;
use crate::sync::{self, SyncError};

#[derive(Clone, Debug)]
pub struct CompactOptions {
    /// Compact only when the manifest lists at least this many packs.
    pub min_packs: usize,
    /// How long replaced and orphaned packs stay in the store before deletion.
    pub grace: Duration,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            min_packs: 16,
            grace: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CompactReport {
    /// The generation that published the compacted pack, if one was made.
    pub generation: Option<u64>,
    pub packs_replaced: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Retired or orphaned packs deleted from the store.
    pub packs_deleted: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("{0}")]
    Local(String),
}

/// Compacts `project`, using `work_dir` for a scratch repository (kept between runs as a cache).
pub async fn compact(
    store: &BlobStore,
    project: &ProjectId,
    work_dir: &Path,
    opts: &CompactOptions,
) -> Result<CompactReport, CompactError> {
    let mut report = CompactReport {
        packs_deleted: collect_garbage(store, project, opts.grace).await?,
        ..Default::default()
    };
    let repo = work_dir.join(format!("{project}.git"));
    sync::sync_repo(store, project, &repo).await?;
    let base = manifest::latest(store, project).await?;
    if base.packs.len() < opts.min_packs {
        return Ok(report);
    }
    report.bytes_before = base.packs.iter().map(|p| p.pack_size).sum();

    // Every object the repository holds: a superset of the listed packs' objects.
    let ids = git::run(
        &repo,
        &[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname)",
        ],
        b"",
    )
    .await?;
    let scratch = tempfile::tempdir_in(work_dir).map_err(|e| CompactError::Local(e.to_string()))?;
    let prefix = scratch.path().join("pack");
    let out = git::run(
        &repo,
        &["pack-objects", "-q", &prefix.to_string_lossy()],
        &ids,
    )
    .await?;
    let hash = String::from_utf8_lossy(&out).trim().to_owned();
    let name = format!("pack-{hash}");
    let pack_path = scratch.path().join(format!("{name}.pack"));
    let idx_path = scratch.path().join(format!("{name}.idx"));
    let local = |e: receive::PushError| CompactError::Local(e.to_string());
    let (pack_size, pack_sha256) = receive::hash_file(&pack_path).map_err(local)?;
    let (idx_size, idx_sha256) = receive::hash_file(&idx_path).map_err(local)?;
    let idx = std::fs::read(&idx_path).map_err(|e| CompactError::Local(e.to_string()))?;
    let replaced: Vec<String> = base.packs.iter().map(|p| p.name.clone()).collect();
    let entry = manifest::PackEntry {
        name: name.clone(),
        pack_size,
        pack_sha256,
        idx_size,
        idx_sha256,
        objects: receive::idx_object_count(&idx).unwrap_or(0),
        replaces: replaced.clone(),
        from: None,
    };
    for (path, ext) in [(&pack_path, "pack"), (&idx_path, "idx")] {
        let data = tokio::fs::read(path)
            .await
            .map_err(|e| CompactError::Local(e.to_string()))?;
        store
            .put(&keys::pack(project, &name, ext), data.into())
            .await?;
    }

    let mut current = base;
    for _ in 0..16 {
        // Pushes that landed meanwhile keep their packs; only the ones folded in are retired.
        if !replaced.iter().all(|r| current.pack(r).is_some()) {
            return Err(CompactError::Local(
                "another compaction replaced these packs first".into(),
            ));
        }
        let mut next = current.next();
        next.packs.retain(|p| !replaced.contains(&p.name));
        next.packs.insert(0, entry.clone());
        let now = unix_now();
        // Retired packs past the grace period were deleted by collect_garbage above.
        next.retired
            .retain(|r| r.retired_at + opts.grace.as_secs() > now);
        next.retired.extend(replaced.iter().map(|n| Retired {
            name: n.clone(),
            retired_at: now,
        }));
        match manifest::publish(store, project, &next).await? {
            Publish::Won => {
                report.generation = Some(next.generation);
                report.packs_replaced = replaced.len();
                report.bytes_after = pack_size;
                log::info!(project:% = project, generation = next.generation, replaced = replaced.len(); "compacted");
                return Ok(report);
            }
            Publish::Lost => current = manifest::latest(store, project).await?,
        }
    }
    Err(CompactError::Local(
        "too much contention on the manifest".into(),
    ))
}

/// Deletes retired packs past their grace period and orphaned packs no manifest names.
async fn collect_garbage(
    store: &BlobStore,
    project: &ProjectId,
    grace: Duration,
) -> Result<usize, CompactError> {
    let m = manifest::latest(store, project).await?;
    let now = unix_now();
    let grace = grace.as_secs();
    let mut deleted = 0;
    let mut names = std::collections::BTreeMap::new();
    for listed in store.list(&keys::packs(project), None).await? {
        if let Some((name, _)) = listed.name.rsplit_once('.') {
            let newest = names.entry(name.to_owned()).or_insert(0);
            *newest = listed.modified.max(*newest);
        }
    }
    for (name, modified) in &names {
        let name = name.as_str();
        if m.pack(name).is_some() {
            continue;
        }
        let expired = match m.retired.iter().find(|r| r.name == name) {
            Some(r) => r.retired_at + grace <= now,
            None => modified + grace <= now,
        };
        if expired {
            for ext in ["pack", "idx"] {
                store.delete(&keys::pack(project, name, ext)).await?;
            }
            deleted += 1;
        }
    }
    Ok(deleted)
}
