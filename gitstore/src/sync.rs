//! Incremental sync: bring a local bare repository up to date from the blob store.
//!
//! Only packs the repository lacks are downloaded. Each is streamed to a temporary name, checked
//! against the size and SHA-256 the manifest recorded, and only then renamed into `objects/pack`
//! (the `.pack` before its `.idx`, since git only looks at packs that have an index), so a
//! half-downloaded or corrupted pack never becomes visible. Refs change last, in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blob::{keys, BlobStore, StoreError};
use crate::git::{self, GitError};
use crate::manifest::{self, Manifest, ManifestError, PackEntry};
use crate::project::ProjectId;

/// What a sync did, for logs, metrics and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub generation: u64,
    pub packs_fetched: usize,
    pub objects_fetched: u64,
    /// Pack and index bytes downloaded.
    pub bytes_fetched: u64,
    /// Manifest bytes read (zero when the repository was already current).
    pub manifest_bytes: u64,
    pub refs_changed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pack {name} in the blob store is corrupt: {what}; it was not used")]
    CorruptPack { name: String, what: String },
    #[error("pack {name} is listed by the project's manifest but its .{ext} is missing from the blob store: the store is damaged")]
    MissingPack { name: String, ext: &'static str },
}

impl SyncError {
    /// The store's data itself is wrong (a corrupt or missing pack): trying again cannot help.
    pub fn is_damage(&self) -> bool {
        matches!(self, Self::CorruptPack { .. } | Self::MissingPack { .. })
    }
}

/// Sync state kept beside the repository: the generation it matches, and compacted packs it does
/// not need because it holds every pack they replace.
#[derive(Default, Serialize, Deserialize)]
struct LocalState {
    generation: u64,
    #[serde(default)]
    covered: BTreeSet<String>,
    /// The repository has held packs of another project (an import): objects no ref of this
    /// project reaches may be another project's, so readers must serve only reachable ones.
    /// Never cleared, since a pack once fetched stays in the repository.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    foreign: bool,
}

const STATE_FILE: &str = "kiln-sync.json";

/// Brings the bare repository at `repo` (created if missing) up to date with `project` in `store`.
///
/// Callers serialize syncs of one repository; gitstore holds its per-project lock.
pub async fn sync_repo(
    store: &BlobStore,
    project: &ProjectId,
    repo: &Path,
) -> Result<SyncReport, SyncError> {
    sync_repo_with_progress(store, project, repo, &|_, _| {}).await
}

/// [`sync_repo`], calling `progress(fetched, total)` as pack bytes arrive, for a progress bar
/// over a cold materialization.
pub async fn sync_repo_with_progress(
    store: &BlobStore,
    project: &ProjectId,
    repo: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<SyncReport, SyncError> {
    git::init_bare(repo).await?;
    let state_path = repo.join(STATE_FILE);
    let mut state: LocalState = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let Some(generation) = manifest::newest_generation(store, project, state.generation).await?
    else {
        return Ok(SyncReport {
            generation: state.generation,
            ..Default::default()
        });
    };
    let m = manifest::read(store, project, generation).await?;
    let mut report = SyncReport {
        generation,
        manifest_bytes: serde_json::to_vec_pretty(&m).map_or(0, |v| v.len() as u64),
        ..Default::default()
    };
    if m.packs.iter().any(|p| p.from.is_some()) && !state.foreign {
        // Recorded before the first foreign pack lands, so no reader ever sees it unflagged.
        state.foreign = true;
        write_atomic(
            &state_path,
            &serde_json::to_vec(&state).expect("serializes"),
        )?;
    }
    let pack_dir = repo.join("objects/pack");
    let total: u64 = m
        .packs
        .iter()
        .filter(|e| {
            !pack_dir.join(format!("{}.idx", e.name)).is_file() && !state.covered.contains(&e.name)
        })
        .map(|e| e.pack_size + e.idx_size)
        .sum();
    let fetched = std::sync::atomic::AtomicU64::new(0);
    let add = |n: u64| {
        let now = fetched.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        progress(now.min(total), total);
    };
    for entry in &m.packs {
        let have = |name: &str| {
            pack_dir.join(format!("{name}.idx")).is_file() || state.covered.contains(name)
        };
        if have(&entry.name) {
            continue;
        }
        if !entry.replaces.is_empty() && entry.replaces.iter().all(|r| have(r)) {
            state.covered.insert(entry.name.clone());
            continue;
        }
        report.bytes_fetched += download_pack(store, project, entry, &pack_dir, &add).await?;
        report.packs_fetched += 1;
        report.objects_fetched += entry.objects;
    }
    report.refs_changed = apply_refs(repo, &m).await?;
    state.generation = generation;
    write_atomic(
        &state_path,
        &serde_json::to_vec(&state).expect("serializes"),
    )?;
    Ok(report)
}

/// The store generation the repository at `repo` was last synced to (0 if never).
pub fn synced_generation(repo: &Path) -> u64 {
    std::fs::read(repo.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<LocalState>(&b).ok())
        .map_or(0, |s| s.generation)
}

/// Whether the repository at `repo` may hold objects of another project (it was synced from a
/// manifest listing packs `from` another project): serve only what this project's refs reach.
pub fn may_hold_foreign_objects(repo: &Path) -> bool {
    std::fs::read(repo.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<LocalState>(&b).ok())
        .is_some_and(|s| s.foreign)
}

/// Records that the repository at `repo` now matches `generation`, when the caller knows it does
/// (it just made that generation from this repository): the next sync then reads nothing more.
pub fn mark_synced(repo: &Path, from: u64, generation: u64) -> Result<bool, SyncError> {
    let state_path = repo.join(STATE_FILE);
    let mut state: LocalState = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if state.generation != from {
        return Ok(false);
    }
    state.generation = generation;
    write_atomic(
        &state_path,
        &serde_json::to_vec(&state).expect("serializes"),
    )?;
    Ok(true)
}

/// Removes the lock files a killed git left in a bare repository (`refs/**.lock`, `HEAD.lock`,
/// `packed-refs.lock`, `config.lock`, `shallow.lock`), each of which would make every later ref
/// update of it fail with "File exists". Call only when no git process can be working in it:
/// at a daemon's start, its previous processes (children included) are gone. Returns how many
/// it removed.
pub fn remove_stale_locks(repo: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for name in ["HEAD", "packed-refs", "config", "shallow"] {
        match std::fs::remove_file(repo.join(format!("{name}.lock"))) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let mut dirs = vec![repo.join("refs")];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                dirs.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".lock") {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Sets the repository's refs and HEAD to the manifest's, in one `update-ref` transaction.
async fn apply_refs(repo: &Path, m: &Manifest) -> Result<usize, SyncError> {
    let local: BTreeMap<String, String> = git::refs(repo).await?.into_iter().collect();
    let mut script = String::new();
    let mut changed = 0;
    for (name, id) in &m.refs {
        if local.get(name) != Some(id) {
            script.push_str(&format!("update {name} {id}\n"));
            changed += 1;
        }
    }
    for name in local.keys().filter(|n| !m.refs.contains_key(*n)) {
        script.push_str(&format!("delete {name}\n"));
        changed += 1;
    }
    if changed > 0 {
        git::run(repo, &["update-ref", "--stdin"], script.as_bytes()).await?;
    }
    if let Some(head) = &m.head {
        let current = git::run(repo, &["symbolic-ref", "HEAD"], b"").await?;
        if String::from_utf8_lossy(&current).trim() != head {
            git::run(repo, &["symbolic-ref", "HEAD", head], b"").await?;
        }
    }
    Ok(changed)
}

async fn download_pack(
    store: &BlobStore,
    project: &ProjectId,
    entry: &PackEntry,
    pack_dir: &Path,
    add: &(dyn Fn(u64) + Send + Sync),
) -> Result<u64, SyncError> {
    let tmp_pack = pack_dir.join(format!(".kiln-tmp-{}.pack", entry.name));
    let tmp_idx = pack_dir.join(format!(".kiln-tmp-{}.idx", entry.name));
    let result = async {
        let a = fetch_verified(store, project, entry, "pack", &tmp_pack, add).await?;
        let b = fetch_verified(store, project, entry, "idx", &tmp_idx, add).await?;
        rename(&tmp_pack, &pack_dir.join(format!("{}.pack", entry.name)))?;
        rename(&tmp_idx, &pack_dir.join(format!("{}.idx", entry.name)))?;
        sync_dir(pack_dir)?;
        Ok(a + b)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_pack);
        let _ = std::fs::remove_file(&tmp_idx);
    }
    result
}

async fn fetch_verified(
    store: &BlobStore,
    project: &ProjectId,
    entry: &PackEntry,
    ext: &'static str,
    dest: &Path,
    add: &(dyn Fn(u64) + Send + Sync),
) -> Result<u64, SyncError> {
    let (size, sha) = match ext {
        "pack" => (entry.pack_size, &entry.pack_sha256),
        _ => (entry.idx_size, &entry.idx_sha256),
    };
    let io = |source| SyncError::Io {
        path: dest.to_owned(),
        source,
    };
    std::fs::create_dir_all(dest.parent().expect("pack dir")).map_err(io)?;
    let mut file = std::fs::File::create(dest).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let corrupt = |what: String| SyncError::CorruptPack {
        name: entry.name.clone(),
        what,
    };
    store
        .get_stream(
            &keys::pack(holder(project, entry), &entry.name, ext),
            |chunk| {
                got += chunk.len() as u64;
                if got > size {
                    // Stop early: a blob larger than recorded is wrong whatever the rest says.
                    return Err(std::io::Error::other("larger than the manifest records"));
                }
                hasher.update(chunk);
                add(chunk.len() as u64);
                file.write_all(chunk)
            },
        )
        .await
        .map_err(|e| match e {
            StoreError::Backend { .. } if got > size => {
                corrupt(format!(".{ext} is larger than the {size} bytes recorded"))
            }
            StoreError::Backend {
                source: object_store::Error::NotFound { .. },
                ..
            } => SyncError::MissingPack {
                name: entry.name.clone(),
                ext,
            },
            e => SyncError::Store(e),
        })?;
    if got != size {
        return Err(corrupt(format!(
            ".{ext} has {got} bytes, the manifest records {size}"
        )));
    }
    let actual = hex::encode(hasher.finalize());
    if &actual != sha {
        return Err(corrupt(format!(
            ".{ext} has SHA-256 {actual}, the manifest records {sha}"
        )));
    }
    file.sync_all().map_err(io)?;
    Ok(got)
}

/// The project whose prefix holds `entry`'s bytes: another one for a pack shared by an import.
pub(crate) fn holder<'a>(project: &'a ProjectId, entry: &'a PackEntry) -> &'a ProjectId {
    entry.from.as_ref().unwrap_or(project)
}

fn rename(from: &Path, to: &Path) -> Result<(), SyncError> {
    std::fs::rename(from, to).map_err(|source| SyncError::Io {
        path: to.to_owned(),
        source,
    })
}

fn sync_dir(dir: &Path) -> Result<(), SyncError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SyncError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Replaces `path` with `data` so a crash leaves either the old or the new content.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SyncError> {
    let io = |source| SyncError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // A half-written tmp on a full disk would hold on to the room the retry needs.
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> std::process::Output {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .expect("git runs")
    }

    #[test]
    fn a_lock_left_by_a_killed_git_is_removed_and_refs_update_again() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("p.git");
        assert!(git(d.path(), &["init", "-q", "--bare", "p.git"])
            .status
            .success());
        let blob = git(&repo, &["hash-object", "-w", "--stdin"]);
        let tree_in = format!(
            "100644 blob {}\tf\n",
            String::from_utf8_lossy(&blob.stdout).trim()
        );
        let mut mktree = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .arg("mktree")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        mktree
            .stdin
            .take()
            .unwrap()
            .write_all(tree_in.as_bytes())
            .unwrap();
        let tree = mktree.wait_with_output().unwrap();
        let commit = git(
            &repo,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.com",
                "commit-tree",
                String::from_utf8_lossy(&tree.stdout).trim(),
                "-m",
                "c",
            ],
        );
        let commit = String::from_utf8_lossy(&commit.stdout).trim().to_owned();
        std::fs::create_dir_all(repo.join("refs/heads/feature")).unwrap();
        for lock in [
            "refs/heads/main.lock",
            "refs/heads/feature/x.lock",
            "packed-refs.lock",
        ] {
            std::fs::write(repo.join(lock), "").unwrap();
        }
        let update = || git(&repo, &["update-ref", "refs/heads/main", &commit]);
        let refused = update();
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("File exists"));

        assert_eq!(remove_stale_locks(&repo).unwrap(), 3);
        assert!(update().status.success());
        assert_eq!(remove_stale_locks(&repo).unwrap(), 0);
        assert!(git(&repo, &["fsck", "--no-progress"]).status.success());
    }
}
