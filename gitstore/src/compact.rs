//! Compaction: fold a project's many small push packs into one, without ever letting a manifest
//! name a missing object.
//!
//! The new pack holds every object of the packs it replaces (it is built from a repository synced
//! to that manifest, not from what refs reach), so any manifest that lists it is complete. It is
//! uploaded before the manifest that names it is published; the replaced packs move to `retired`
//! and are deleted only after a grace period, so a reader still working from an older generation
//! finds them. Packs no manifest names (left by a push that died before publishing) are deleted
//! after the same grace period.
//!
//! Packs listed `from` another project (an import) are never retired or deleted here: they are
//! that project's. Compacting an importer folds what it needs of them into a pack of its own and
//! stops listing them; the holder keeps them while any importer lists them.

use std::path::Path;
use std::time::Duration;

use crate::blob::{keys, BlobStore, StoreError};
use crate::git::{self, GitError};
use crate::manifest::{self, unix_now, Manifest, ManifestError, Publish, Retired};
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
    #[error(transparent)]
    Share(#[from] crate::shares::ShareError),
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
    let latest = manifest::latest(store, project).await?;
    if latest.packs.len() < opts.min_packs {
        return Ok(report);
    }
    // Which objects go into the new pack depends on which pack holds them when another
    // project's packs are involved, so the repository must hold exactly the manifest's packs:
    // start it afresh. The same when it held another project's packs before (an import that an
    // earlier compaction made independent), so that none of those objects is folded in.
    let fresh =
        latest.packs.iter().any(|p| p.from.is_some()) || sync::may_hold_foreign_objects(&repo);
    if fresh {
        match std::fs::remove_dir_all(&repo) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CompactError::Local(format!("{}: {e}", repo.display())))
            }
            _ => {}
        }
    }
    let synced = sync::sync_repo(store, project, &repo).await?;
    // Exactly the generation the repository holds: a newer one may list packs it lacks, and
    // replacing those with a pack built without them would lose their objects.
    let base = manifest::read(store, project, synced.generation).await?;
    if base.packs.len() < opts.min_packs {
        return Ok(report);
    }
    let shared = base.packs.iter().any(|p| p.from.is_some());
    if shared && !fresh {
        return Err(CompactError::Local(
            "the project imported packs while it was being compacted; compact again".into(),
        ));
    }
    report.bytes_before = base.packs.iter().map(|p| p.pack_size).sum();

    let ids = if shared {
        own_and_reachable(&repo, &base).await?
    } else {
        // Every object the repository holds: a superset of the listed packs' objects.
        git::run(
            &repo,
            &[
                "cat-file",
                "--batch-all-objects",
                "--batch-check=%(objectname)",
            ],
            b"",
        )
        .await?
    };
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
    let own_replaced: Vec<String> = base
        .packs
        .iter()
        .filter(|p| p.from.is_none())
        .map(|p| p.name.clone())
        .collect();
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
        // Another project's packs are its own to delete: this one only stops listing them.
        next.retired.extend(own_replaced.iter().map(|n| Retired {
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

/// The objects a compacted pack of a project that lists other projects' packs may hold: every
/// object of its own packs, and of the others only what its refs and live shares reach. The
/// other packs may hold objects the project was never given (the source's later commits), which
/// must not become the importer's own.
async fn own_and_reachable(repo: &Path, m: &Manifest) -> Result<Vec<u8>, CompactError> {
    let mut ids = std::collections::BTreeSet::new();
    for p in m.packs.iter().filter(|p| p.from.is_none()) {
        let idx_path = repo.join(format!("objects/pack/{}.idx", p.name));
        let idx = tokio::fs::read(&idx_path)
            .await
            .map_err(|e| CompactError::Local(format!("{}: {e}", idx_path.display())))?;
        // `<offset> <id> (<crc>)` per object.
        let out = git::run(repo, &["show-index"], &idx).await?;
        ids.extend(
            String::from_utf8_lossy(&out)
                .lines()
                .filter_map(|l| l.split(' ').nth(1).map(str::to_owned)),
        );
    }
    let now = unix_now();
    let mut args = vec!["rev-list", "--objects", "--ignore-missing", "--all"];
    args.extend(
        m.shares
            .iter()
            .filter(|s| s.is_live(now))
            .map(|s| s.commit.as_str()),
    );
    let out = git::run(repo, &args, b"").await?;
    ids.extend(
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split(' ').next().map(str::to_owned)),
    );
    let mut list = Vec::new();
    for id in ids.into_iter().filter(|id| !id.is_empty()) {
        list.extend_from_slice(id.as_bytes());
        list.push(b'\n');
    }
    Ok(list)
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
    let mut in_use = None;
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
            // An importer may still list the pack (`from` this project): it stays until none does.
            if in_use.is_none() {
                in_use = Some(crate::shares::packs_in_use_by_importers(store, project).await?);
            }
            if in_use.as_ref().is_some_and(|u| u.contains(name)) {
                continue;
            }
            for ext in ["pack", "idx"] {
                store.delete(&keys::pack(project, name, ext)).await?;
            }
            deleted += 1;
        }
    }
    Ok(deleted)
}
