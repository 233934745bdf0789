//! Brings a project's worktree to a commit by writing only what changed.
//!
//! The worktree is described by a record of what Kiln last wrote: each path's blob id, mode and
//! the stat it had afterwards. A path is rewritten when its blob or mode changed, or when the file
//! on disk no longer matches its record (someone or something touched it). Without a usable record
//! the worktree is rebuilt from scratch. Every path is checked again before it touches the disk:
//! the store is never trusted.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gitstore::path_policy;
use gix::objs::Find;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading git objects: {0}")]
    Objects(String),
    #[error("refusing {path}: {reason}")]
    UnsafePath {
        path: String,
        reason: path_policy::PathError,
    },
    #[error("{path}: submodules are not supported")]
    Gitlink { path: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckoutError + '_ {
    move |source| CheckoutError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Exec,
    Link,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    oid: String,
    kind: Kind,
    size: u64,
    mtime_ns: i64,
    ino: u64,
}

/// What Kiln last wrote into a worktree.
#[derive(Default, Serialize, Deserialize)]
struct Record {
    tree: String,
    files: BTreeMap<String, Entry>,
}

/// What a checkout changed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckoutReport {
    pub written: Vec<String>,
    /// The written paths the last checkout did not have.
    pub added: Vec<String>,
    pub deleted: Vec<String>,
    /// The worktree was rebuilt from nothing (first build, or its record was lost or damaged).
    pub full: bool,
    /// The tree the worktree held before (per its record), and the one it holds now.
    pub previous_tree: Option<String>,
    pub tree: String,
}

/// Files of a tree: path → (blob id, kind).
pub type Flat = BTreeMap<String, (gix::ObjectId, Kind)>;

/// Lists every file of `tree` in the bare repository's object database, checking each path.
pub fn flatten(objects: &gix::odb::Handle, tree: gix::ObjectId) -> Result<Flat, CheckoutError> {
    let mut out = Flat::new();
    let mut stack = vec![(tree, String::new())];
    let mut buf = Vec::new();
    while let Some((id, prefix)) = stack.pop() {
        let data = objects
            .try_find(&id, &mut buf)
            .map_err(|e| CheckoutError::Objects(e.to_string()))?
            .ok_or_else(|| CheckoutError::Objects(format!("tree {id} is missing")))?;
        let tree = gix::objs::TreeRef::from_bytes(data.data, gix::hash::Kind::Sha1)
            .map_err(|e| CheckoutError::Objects(format!("tree {id}: {e}")))?;
        for e in &tree.entries {
            let name = String::from_utf8(e.filename.to_vec()).map_err(|_| {
                CheckoutError::Objects(format!("{prefix}: a file name is not UTF-8"))
            })?;
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            path_policy::check_component(e.filename).map_err(|reason| {
                CheckoutError::UnsafePath {
                    path: path.clone(),
                    reason,
                }
            })?;
            use gix::objs::tree::EntryKind;
            let kind = match e.mode.kind() {
                EntryKind::Tree => {
                    stack.push((e.oid.to_owned(), path));
                    continue;
                }
                EntryKind::Blob => Kind::File,
                EntryKind::BlobExecutable => Kind::Exec,
                EntryKind::Link => Kind::Link,
                EntryKind::Commit => return Err(CheckoutError::Gitlink { path }),
            };
            out.insert(path, (e.oid.to_owned(), kind));
        }
    }
    Ok(out)
}

/// Who owns what the checkout writes: the sandbox user must be able to write beside it (through
/// an overlay) during a build.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Makes `worktree` hold exactly `files`, writing only what differs from the record at `record`.
pub fn checkout(
    objects: &gix::odb::Handle,
    tree: gix::ObjectId,
    files: &Flat,
    worktree: &Path,
    record_path: &Path,
    owner: Owner,
) -> Result<CheckoutReport, CheckoutError> {
    let mut record: Option<Record> = std::fs::read(record_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if !worktree.is_dir() {
        record = None;
    }
    let mut report = CheckoutReport::default();
    let mut record = match record {
        Some(r) => r,
        None => {
            report.full = true;
            if worktree.exists() {
                std::fs::remove_dir_all(worktree).map_err(io(worktree))?;
            }
            make_dir(worktree, owner)?;
            Record::default()
        }
    };
    report.previous_tree = Some(record.tree.clone()).filter(|t| !t.is_empty());

    for path in record.files.keys().cloned().collect::<Vec<_>>() {
        if !files.contains_key(&path) {
            let full = worktree.join(&path);
            match std::fs::remove_file(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&full)(e)),
            }
            remove_empty_parents(worktree, &full);
            record.files.remove(&path);
            report.deleted.push(path);
        }
    }

    let mut buf = Vec::new();
    let mut made_dirs = HashSet::new();
    for (path, (oid, kind)) in files {
        let full = worktree.join(path);
        let oid_hex = oid.to_hex().to_string();
        if let Some(e) = record.files.get(path) {
            if e.oid == oid_hex && e.kind == *kind && on_disk_matches(&full, e) {
                continue;
            }
        }
        let data = objects
            .try_find(oid, &mut buf)
            .map_err(|e| CheckoutError::Objects(e.to_string()))?
            .ok_or_else(|| CheckoutError::Objects(format!("{path}: blob {oid} is missing")))?;
        if let Some(parent) = full.parent() {
            if made_dirs.insert(parent.to_owned()) {
                make_dirs(worktree, parent, owner)?;
            }
        }
        if *kind == Kind::Link {
            path_policy::check_symlink_target(path.as_bytes(), data.data).map_err(|reason| {
                CheckoutError::UnsafePath {
                    path: path.clone(),
                    reason,
                }
            })?;
        }
        write_entry(&full, *kind, data.data, owner)?;
        if !record.files.contains_key(path) {
            report.added.push(path.clone());
        }
        let meta = std::fs::symlink_metadata(&full).map_err(io(&full))?;
        record.files.insert(
            path.clone(),
            Entry {
                oid: oid_hex,
                kind: *kind,
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
                ino: meta.ino(),
            },
        );
        report.written.push(path.clone());
    }
    record.tree = tree.to_hex().to_string();
    report.tree = record.tree.clone();
    write_record(record_path, &record)?;
    Ok(report)
}

fn on_disk_matches(full: &Path, e: &Entry) -> bool {
    match std::fs::symlink_metadata(full) {
        Ok(m) => {
            let kind_ok = match e.kind {
                Kind::Link => m.file_type().is_symlink(),
                Kind::File | Kind::Exec => m.file_type().is_file(),
            };
            kind_ok && m.len() == e.size && mtime_ns(&m) == e.mtime_ns && m.ino() == e.ino
        }
        Err(_) => false,
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

/// Writes beside the target and renames over it, so a crash leaves the old or the new content.
fn write_entry(full: &Path, kind: Kind, data: &[u8], owner: Owner) -> Result<(), CheckoutError> {
    let dir = full.parent().expect("worktree paths have a parent");
    let tmp = dir.join(format!(
        ".kiln-tmp-{}",
        full.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    // A directory may stand where a file now goes (or the reverse): clear it first.
    if let Ok(m) = std::fs::symlink_metadata(full) {
        if m.is_dir() {
            std::fs::remove_dir_all(full).map_err(io(full))?;
        }
    }
    match kind {
        Kind::Link => {
            let target = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(data);
            std::os::unix::fs::symlink(target, &tmp).map_err(io(&tmp))?;
            std::os::unix::fs::lchown(&tmp, Some(owner.uid), Some(owner.gid)).map_err(io(&tmp))?;
        }
        Kind::File | Kind::Exec => {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(data).map_err(io(&tmp))?;
            let mode = if kind == Kind::Exec { 0o755 } else { 0o644 };
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io(&tmp))?;
            std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid)).map_err(io(&tmp))?;
        }
    }
    std::fs::rename(&tmp, full).map_err(io(full))
}

fn make_dir(dir: &Path, owner: Owner) -> Result<(), CheckoutError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid)).map_err(io(dir))
}

/// Creates `dir` and its missing parents below `root`, replacing files or links that stand in the
/// way (a path that was a file may now be a directory).
fn make_dirs(root: &Path, dir: &Path, owner: Owner) -> Result<(), CheckoutError> {
    let rel = dir.strip_prefix(root).expect("inside the worktree");
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => std::fs::remove_file(&cur).map_err(io(&cur))?,
            Err(_) => {}
        }
        std::fs::create_dir(&cur).map_err(io(&cur))?;
        std::os::unix::fs::chown(&cur, Some(owner.uid), Some(owner.gid)).map_err(io(&cur))?;
    }
    Ok(())
}

fn remove_empty_parents(root: &Path, file: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == root || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

fn write_record(path: &Path, record: &Record) -> Result<(), CheckoutError> {
    let bytes = serde_json::to_vec(record).expect("serializes");
    crate::fsutil::write_atomic(path, &bytes).map_err(io(path))
}
