//! The push path: gitstore's pre-receive hook.
//!
//! `git receive-pack` keeps a push's objects in a quarantine directory and runs this hook before
//! any ref moves. The hook (1) checks every new tree for paths unsafe to check out and for size
//! limits, (2) uploads the push's pack and index to the blob store, and (3) publishes the next
//! manifest generation with a Create. Only then does it exit 0, so git acknowledges a push only
//! once it is durable; any failure before leaves the store as it was, plus at most an orphan pack
//! that no manifest names.

use crate::path_policy::printable;
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use gix::objs::{Find, FindHeader};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blob::{keys, BlobStore, StoreError};
use crate::manifest::{self, Manifest, ManifestError, PackEntry, Publish};
use crate::path_policy;
use crate::project::ProjectId;

const ZERO: &str = "0000000000000000000000000000000000000000";

/// Limits on what one push may contain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub max_push_bytes: u64,
    /// Files (blobs and symlinks) in one commit's whole tree.
    pub max_tree_files: u64,
    pub max_tree_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: 50 << 20,
            max_push_bytes: 200 << 20,
            max_tree_files: 20_000,
            max_tree_depth: 32,
        }
    }
}

/// What the server hands the hook, through the `KILN_HOOK_CONTEXT` environment variable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HookContext {
    pub store_url: String,
    pub project: ProjectId,
    pub limits: Limits,
    /// Where the hook reports an accepted push back to the server.
    pub result_path: PathBuf,
    /// Test-only fault injection: `pause-before-manifest:<marker file>`.
    #[serde(default)]
    pub fault: Option<String>,
    /// The owner's stored-bytes quota as the server counted it before the push.
    #[serde(default)]
    pub stored_quota: Option<StoredQuota>,
}

/// A client's stored-bytes limit and what its projects store already: a push whose pack would
/// take `used` past `limit` is refused before anything is uploaded.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct StoredQuota {
    pub limit: u64,
    pub used: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefUpdate {
    pub name: String,
    pub old: String,
    pub new: String,
}

/// An accepted push, as the hook reports it to the server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushResult {
    /// The generation this push published, so the server needs no store read to follow it.
    pub manifest: Manifest,
    pub updates: Vec<RefUpdate>,
    pub pack_bytes: u64,
    /// The generation this push's manifest was built on, when it is exactly the local repository
    /// plus this push (no concurrent push was folded in, HEAD unchanged): the server may then
    /// record the repository as synced to `generation` without reading the store again.
    #[serde(default)]
    pub built_on: Option<u64>,
}

/// Why a push was refused; the text goes to the pusher.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{}: {reason}", printable(.path))]
    UnsafePath {
        path: String,
        reason: path_policy::PathError,
    },
    #[error("{}: submodules (gitlinks) are not supported; vendor the code instead", printable(.path))]
    Gitlink { path: String },
    #[error("{}: file is {size} bytes, over the {limit}-byte limit", printable(.path))]
    FileTooLarge { path: String, size: u64, limit: u64 },
    #[error("commit {commit}: tree has more than {limit} files")]
    TooManyFiles { commit: String, limit: u64 },
    #[error("{}: directories nest deeper than {limit} levels", printable(.path))]
    TooDeep { path: String, limit: u32 },
    #[error("push is {size} bytes, over the {limit}-byte limit")]
    PushTooLarge { size: u64, limit: u64 },
    #[error("stored_bytes quota: this push adds {size} bytes to the {used} your projects store, past your quota of {limit} bytes; delete projects you no longer need or ask the operator to raise the quota")]
    Quota { size: u64, used: u64, limit: u64 },
    #[error("{name}: only branches (refs/heads/*) and tags (refs/tags/*) can be pushed")]
    BadRef { name: String },
    #[error("{}: not a valid ref name (see `git check-ref-format`)", printable(.name))]
    InvalidRefName { name: String },
    #[error("{name}: must point at a commit or a tag of one")]
    NotACommit { name: String },
    #[error("{name} changed since you fetched (another push landed first); fetch, merge or rebase, and push again")]
    Stale { name: String },
    #[error("malformed object {id}: {detail}")]
    Malformed { id: String, detail: String },
    #[error("object {id} is missing")]
    MissingObject { id: String },
    #[error("storage failure, nothing was stored: {0}")]
    Store(#[from] StoreError),
    #[error("storage failure, nothing was stored: {0}")]
    Manifest(#[from] ManifestError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Entry point of `kiln-gitstore hook pre-receive`. Returns the process exit code.
pub fn pre_receive_main() -> i32 {
    let ctx: HookContext = match std::env::var("KILN_HOOK_CONTEXT")
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
    {
        Some(c) => c,
        None => {
            eprintln!("kiln: hook started without its context; push refused");
            return 1;
        }
    };
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        eprintln!("kiln: could not read the ref updates; push refused");
        return 1;
    }
    let updates: Vec<RefUpdate> = input
        .lines()
        .filter_map(|l| {
            // A ref name cannot hold a space, but one that does must be refused whole rather
            // than cut at the space into another, valid name.
            let mut it = l.splitn(3, ' ');
            Some(RefUpdate {
                old: it.next()?.to_owned(),
                new: it.next()?.to_owned(),
                name: it.next()?.to_owned(),
            })
        })
        .collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: internal error: {e}; push refused");
            return 1;
        }
    };
    match rt.block_on(accept(&ctx, updates)) {
        Ok(result) => {
            let body = serde_json::to_vec(&result).expect("serializes");
            if let Err(e) = std::fs::write(&ctx.result_path, body) {
                // The push is durable already; only the webhook is at stake.
                eprintln!("kiln: warning: stored, but could not report to the server: {e}");
            }
            eprintln!(
                "kiln: stored durably as generation {}",
                result.manifest.generation
            );
            0
        }
        Err(e) => {
            eprintln!("kiln: push refused: {e}");
            1
        }
    }
}

/// `git check-ref-format`'s rules. git applies them only after the pre-receive hook, which
/// publishes the manifest: a name it would refuse must not reach the store, where every other
/// node would fail to sync it.
fn valid_ref_name(name: &str) -> bool {
    let bad_char = |c: char| c.is_ascii_control() || " ~^:?*[\\".contains(c);
    !name.is_empty()
        && name != "@"
        && !name.contains("..")
        && !name.contains("@{")
        && !name.ends_with('.')
        && !name.chars().any(bad_char)
        && name
            .split('/')
            .all(|c| !c.is_empty() && !c.starts_with('.') && !c.ends_with(".lock"))
}

async fn accept(ctx: &HookContext, updates: Vec<RefUpdate>) -> Result<PushResult, PushError> {
    for u in &updates {
        let ok_prefix = u.name.starts_with("refs/heads/") || u.name.starts_with("refs/tags/");
        if !valid_ref_name(&u.name) {
            return Err(PushError::InvalidRefName {
                name: u.name.clone(),
            });
        }
        if !ok_prefix || u.name.len() > 255 {
            return Err(PushError::BadRef {
                name: u.name.clone(),
            });
        }
    }
    let quarantine = std::env::var_os("GIT_QUARANTINE_PATH").map(PathBuf::from);
    let repo = std::env::current_dir().map_err(|e| PushError::Internal(e.to_string()))?;
    let tips: Vec<String> = updates
        .iter()
        .filter(|u| u.new != ZERO)
        .map(|u| u.new.clone())
        .collect();
    if !tips.is_empty() {
        let limits = ctx.limits.clone();
        let q = quarantine.clone();
        let r = repo.clone();
        let names: Vec<(String, String)> = updates
            .iter()
            .filter(|u| u.new != ZERO)
            .map(|u| (u.name.clone(), u.new.clone()))
            .collect();
        tokio::task::spawn_blocking(move || check_new_history(&r, q.as_deref(), &names, &limits))
            .await
            .map_err(|e| PushError::Internal(e.to_string()))??;
    }
    if !tips.is_empty() && crate::sync::may_hold_foreign_objects(&repo) {
        check_only_own_objects(&repo, quarantine.as_deref(), &tips).await?;
    }
    let pack = match &quarantine {
        Some(q) => describe_pack(q)?,
        None => None,
    };
    if let Some((entry, _, _)) = &pack {
        if entry.pack_size > ctx.limits.max_push_bytes {
            return Err(PushError::PushTooLarge {
                size: entry.pack_size,
                limit: ctx.limits.max_push_bytes,
            });
        }
        if let Some(q) = ctx.stored_quota {
            if q.used.saturating_add(entry.pack_size) > q.limit {
                return Err(PushError::Quota {
                    size: entry.pack_size,
                    used: q.used,
                    limit: q.limit,
                });
            }
        }
    }

    let store = BlobStore::open(&ctx.store_url).map_err(PushError::Store)?;
    let project = &ctx.project;
    let mut base = manifest::latest(&store, project).await?;
    let first_base = base.generation;
    for u in &updates {
        check_not_stale(&base, u)?;
    }
    if let Some((entry, pack_path, idx_path)) = &pack {
        if base.pack(&entry.name).is_none() {
            let (pack_key, idx_key) = (
                keys::pack(project, &entry.name, "pack"),
                keys::pack(project, &entry.name, "idx"),
            );
            // Both are stored before the manifest that names them is published.
            futures::try_join!(
                upload(&store, &pack_key, pack_path),
                upload(&store, &idx_key, idx_path),
            )?;
        }
    }
    if let Some(fault) = ctx
        .fault
        .as_deref()
        .and_then(|f| f.strip_prefix("pause-before-manifest:"))
    {
        // Lets a test kill gitstore at the one moment that matters: pack stored, manifest not.
        let _ = std::fs::write(fault, b"paused");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    for _ in 0..16 {
        let mut next = base.next();
        for u in &updates {
            if u.new == ZERO {
                next.refs.remove(&u.name);
            } else {
                next.refs.insert(u.name.clone(), u.new.clone());
            }
        }
        if let Some((entry, _, _)) = &pack {
            if next.pack(&entry.name).is_none() {
                next.packs.push(entry.clone());
            }
        }
        if !updates.is_empty() {
            next.pushed_at = next.updated_at;
        }
        let head_set = next.head.is_none();
        if head_set {
            next.head = default_head(&next.refs);
        }
        match manifest::publish(&store, project, &next).await? {
            Publish::Won => {
                return Ok(PushResult {
                    updates,
                    pack_bytes: pack.as_ref().map_or(0, |(e, _, _)| e.pack_size),
                    built_on: (base.generation == first_base && !head_set)
                        .then_some(base.generation),
                    manifest: next,
                })
            }
            Publish::Lost => {
                // Another push landed. It is only a conflict if it moved one of our refs; pushes
                // to other refs are rebased onto it rather than refused.
                base = manifest::latest(&store, project).await?;
                for u in &updates {
                    check_not_stale(&base, u)?;
                }
            }
        }
    }
    Err(PushError::Internal(
        "too much contention on the project manifest; push again".into(),
    ))
}

/// After an import the repository also holds the source project's objects past the shared
/// commit. A push must not make them this project's by naming one it did not send (a ref, a
/// parent or a tree entry whose id the pusher learnt elsewhere): every object the new tips reach
/// is either in the push or already reachable from this project's refs. The answer for one that
/// is not is the same as for an object that is absent.
async fn check_only_own_objects(
    repo: &Path,
    quarantine: Option<&Path>,
    tips: &[String],
) -> Result<(), PushError> {
    // Run in the hook's environment, which git points at the quarantine with the repository's
    // objects as an alternate, so the walk sees both.
    let rev_list = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("git")
            .args(&args)
            .current_dir(repo)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| PushError::Internal(format!("git rev-list: {e}")))?;
        if !out.status.success() {
            return Err(PushError::Internal(format!(
                "git rev-list: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(' ').next())
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect::<Vec<String>>())
    };
    let mut args: Vec<String> = vec!["rev-list".into(), "--objects".into()];
    args.extend(tips.iter().cloned());
    args.extend(["--not".into(), "--all".into()]);
    let new = rev_list(args).await?;
    let q = quarantine.map(Path::to_owned);
    let outside = tokio::task::spawn_blocking(move || -> Result<Vec<String>, PushError> {
        let Some(q) = q else { return Ok(new) };
        let odb = gix::odb::at(q, gix::hash::Kind::Sha1)
            .map_err(|e| PushError::Internal(e.to_string()))?;
        let mut outside = Vec::new();
        for id in new {
            let oid = parse_id(&id)?;
            if odb
                .try_header(&oid)
                .map_err(|e| PushError::Internal(e.to_string()))?
                .is_none()
            {
                outside.push(id);
            }
        }
        Ok(outside)
    })
    .await
    .map_err(|e| PushError::Internal(e.to_string()))??;
    if outside.is_empty() {
        return Ok(());
    }
    // Rare: a client that left out an object an older commit of a ref reaches (the walk above
    // only stops at the refs' tips). Settle it with the whole reachable set.
    let reachable: HashSet<String> =
        rev_list(vec!["rev-list".into(), "--objects".into(), "--all".into()])
            .await?
            .into_iter()
            .collect();
    match outside.into_iter().find(|id| !reachable.contains(id)) {
        Some(id) => Err(PushError::MissingObject { id }),
        None => Ok(()),
    }
}

fn check_not_stale(base: &Manifest, u: &RefUpdate) -> Result<(), PushError> {
    let current = base.refs.get(&u.name).map_or(ZERO, String::as_str);
    if current != u.old {
        return Err(PushError::Stale {
            name: u.name.clone(),
        });
    }
    Ok(())
}

fn default_head(refs: &BTreeMap<String, String>) -> Option<String> {
    ["refs/heads/main", "refs/heads/master"]
        .iter()
        .map(|s| s.to_string())
        .find(|h| refs.contains_key(h))
        .or_else(|| refs.keys().find(|k| k.starts_with("refs/heads/")).cloned())
}

async fn upload(
    store: &BlobStore,
    key: &object_store::path::Path,
    file: &Path,
) -> Result<(), PushError> {
    let data = tokio::fs::read(file)
        .await
        .map_err(|e| PushError::Internal(format!("{}: {e}", file.display())))?;
    store.put(key, data.into()).await?;
    Ok(())
}

/// The pack this push brought (receive.unpackLimit=1 keeps every push as one pack), with paths.
fn describe_pack(quarantine: &Path) -> Result<Option<(PackEntry, PathBuf, PathBuf)>, PushError> {
    let dir = quarantine.join("pack");
    let Ok(read) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut packs: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    if packs.len() > 1 {
        return Err(PushError::Internal(format!(
            "expected one pack in the quarantine, found {}",
            packs.len()
        )));
    }
    let Some(pack) = packs.pop() else {
        return Ok(None);
    };
    let idx = pack.with_extension("idx");
    let name = pack
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| PushError::Internal("pack without a name".into()))?
        .to_owned();
    let (pack_size, pack_sha256) = hash_file(&pack)?;
    let (idx_size, idx_sha256) = hash_file(&idx)?;
    let idx_bytes = std::fs::read(&idx).map_err(|e| PushError::Internal(e.to_string()))?;
    let objects = idx_object_count(&idx_bytes).unwrap_or(0);
    Ok(Some((
        PackEntry {
            name,
            pack_size,
            pack_sha256,
            idx_size,
            idx_sha256,
            objects,
            replaces: Vec::new(),
            from: None,
        },
        pack,
        idx,
    )))
}

/// Object count from a version-2 pack index: the last fan-out entry.
pub(crate) fn idx_object_count(idx: &[u8]) -> Option<u64> {
    let off = 8 + 255 * 4;
    (idx.len() >= off + 4 && idx[..4] == [0xff, b't', b'O', b'c'])
        .then(|| u32::from_be_bytes(idx[off..off + 4].try_into().expect("4 bytes")) as u64)
}

pub(crate) fn hash_file(path: &Path) -> Result<(u64, String), PushError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| PushError::Internal(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let n = std::io::copy(&mut f, &mut hasher)
        .map_err(|e| PushError::Internal(format!("{}: {e}", path.display())))?;
    Ok((n, hex::encode(hasher.finalize())))
}

/// Reads objects from the push's quarantine first, then from the repository.
struct Objects {
    quarantine: Option<gix::odb::Handle>,
    repo: gix::odb::Handle,
}

impl Objects {
    fn open(repo: &Path, quarantine: Option<&Path>) -> Result<Self, PushError> {
        let open = |p: PathBuf| {
            gix::odb::at(p, gix::hash::Kind::Sha1).map_err(|e| PushError::Internal(e.to_string()))
        };
        Ok(Self {
            quarantine: quarantine.map(|q| open(q.to_owned())).transpose()?,
            repo: open(repo.join("objects"))?,
        })
    }

    /// The object database holding `id`: the quarantine for what this push brought, else the repo.
    fn source(&self, id: &gix::hash::oid) -> Result<&gix::odb::Handle, PushError> {
        if let Some(q) = &self.quarantine {
            if q.try_header(id)
                .map_err(|e| PushError::Internal(e.to_string()))?
                .is_some()
            {
                return Ok(q);
            }
        }
        Ok(&self.repo)
    }

    fn find<'a>(
        &self,
        id: &gix::hash::oid,
        buf: &'a mut Vec<u8>,
    ) -> Result<gix::objs::Data<'a>, PushError> {
        self.source(id)?
            .try_find(id, buf)
            .map_err(|e| PushError::Internal(e.to_string()))?
            .ok_or_else(|| PushError::MissingObject { id: id.to_string() })
    }

    fn size(&self, id: &gix::hash::oid) -> Result<u64, PushError> {
        self.source(id)?
            .try_header(id)
            .map_err(|e| PushError::Internal(e.to_string()))?
            .map(|h| h.size)
            .ok_or_else(|| PushError::MissingObject { id: id.to_string() })
    }
}

/// Checks every commit the push introduces.
fn check_new_history(
    repo: &Path,
    quarantine: Option<&Path>,
    tips: &[(String, String)],
    limits: &Limits,
) -> Result<(), PushError> {
    let objects = Objects::open(repo, quarantine)?;
    let mut buf = Vec::new();
    let mut commits = Vec::new();
    for (name, tip) in tips {
        let id = parse_id(tip)?;
        let commit = peel_to_commit(&objects, &id, &mut buf)
            .ok_or(PushError::NotACommit { name: name.clone() })??;
        commits.push(commit);
    }
    let new = new_commits(&objects, &commits, &mut buf)?;
    let mut checker = TreeChecker {
        objects: &objects,
        limits,
        seen: HashSet::new(),
    };
    for id in new {
        let data = objects.find(&id, &mut buf)?;
        let commit = gix::objs::CommitRef::from_bytes(data.data, gix::hash::Kind::Sha1)
            .map_err(|e| malformed(&id, e))?;
        let tree = commit.tree();
        let files = checker.check_tree(&tree, "", 0)?;
        if files > limits.max_tree_files {
            return Err(PushError::TooManyFiles {
                commit: id.to_string(),
                limit: limits.max_tree_files,
            });
        }
    }
    Ok(())
}

fn parse_id(hex: &str) -> Result<gix::ObjectId, PushError> {
    gix::ObjectId::from_hex(hex.as_bytes()).map_err(|e| PushError::Malformed {
        id: hex.chars().take(64).collect(),
        detail: e.to_string(),
    })
}

fn malformed(id: &gix::hash::oid, e: impl std::fmt::Display) -> PushError {
    PushError::Malformed {
        id: id.to_string(),
        detail: e.to_string(),
    }
}

/// The commits this push brought: those reachable from `tips` that are only in the quarantine.
/// Everything in the repository's own object database arrived in an accepted push (or a sync of
/// one) and was checked then, so the walk stops there; this is `rev-list <tips> --not --all`
/// without a process.
fn new_commits(
    objects: &Objects,
    tips: &[gix::ObjectId],
    buf: &mut Vec<u8>,
) -> Result<Vec<gix::ObjectId>, PushError> {
    let Some(quarantine) = &objects.quarantine else {
        return Ok(Vec::new());
    };
    let mut seen = HashSet::new();
    let mut todo = tips.to_vec();
    let mut out = Vec::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        let data = match quarantine
            .try_find(&id, buf)
            .map_err(|e| PushError::Internal(e.to_string()))?
        {
            Some(d) => d,
            None => continue,
        };
        if data.kind != gix::objs::Kind::Commit {
            return Err(malformed(&id, "a parent is not a commit"));
        }
        let commit = gix::objs::CommitRef::from_bytes(data.data, gix::hash::Kind::Sha1)
            .map_err(|e| malformed(&id, e))?;
        todo.extend(commit.parents());
        out.push(id);
    }
    Ok(out)
}

/// Follows annotated tags down to a commit; None when the tip is a tree or blob.
fn peel_to_commit(
    objects: &Objects,
    id: &gix::ObjectId,
    buf: &mut Vec<u8>,
) -> Option<Result<gix::ObjectId, PushError>> {
    let mut id = *id;
    for _ in 0..16 {
        let data = match objects.find(&id, buf) {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        match data.kind {
            gix::objs::Kind::Commit => return Some(Ok(id)),
            gix::objs::Kind::Tag => {
                match gix::objs::TagRef::from_bytes(data.data, gix::hash::Kind::Sha1) {
                    Ok(tag) => id = tag.target(),
                    Err(e) => return Some(Err(malformed(&id, e))),
                }
            }
            _ => return None,
        }
    }
    None
}

struct TreeChecker<'a> {
    objects: &'a Objects,
    limits: &'a Limits,
    /// (tree, depth) pairs already checked, with their file counts: a tree's verdict depends only
    /// on its content and on how deep it sits (symlink targets may climb up to the root).
    seen: HashSet<(gix::ObjectId, u32)>,
}

impl TreeChecker<'_> {
    /// Checks the tree at `path` (depth 0 = root, so `a/b/c/` is 3 levels deep) and returns how many files it holds.
    fn check_tree(&mut self, id: &gix::ObjectId, path: &str, depth: u32) -> Result<u64, PushError> {
        if depth > self.limits.max_tree_depth {
            return Err(PushError::TooDeep {
                path: path.to_owned(),
                limit: self.limits.max_tree_depth,
            });
        }
        let mut buf = Vec::new();
        let data = self.objects.find(id, &mut buf)?;
        if data.kind != gix::objs::Kind::Tree {
            return Err(malformed(id, "expected a tree"));
        }
        let tree = gix::objs::TreeRef::from_bytes(data.data, gix::hash::Kind::Sha1)
            .map_err(|e| malformed(id, e))?;
        let mut files = 0u64;
        for entry in &tree.entries {
            let child = if path.is_empty() {
                String::from_utf8_lossy(entry.filename).into_owned()
            } else {
                format!("{path}/{}", String::from_utf8_lossy(entry.filename))
            };
            path_policy::check_component(entry.filename).map_err(|reason| {
                PushError::UnsafePath {
                    path: child.clone(),
                    reason,
                }
            })?;
            let oid = entry.oid.to_owned();
            use gix::objs::tree::EntryKind;
            match entry.mode.kind() {
                EntryKind::Tree => {
                    if self.seen.contains(&(oid, depth + 1)) {
                        // Counted before; a cheap recount keeps the file limit honest.
                        files += self.count_files(&oid)?;
                    } else {
                        files += self.check_tree(&oid, &child, depth + 1)?;
                        self.seen.insert((oid, depth + 1));
                    }
                }
                EntryKind::Blob | EntryKind::BlobExecutable => {
                    let size = self.objects.size(&oid)?;
                    if size > self.limits.max_file_bytes {
                        return Err(PushError::FileTooLarge {
                            path: child,
                            size,
                            limit: self.limits.max_file_bytes,
                        });
                    }
                    files += 1;
                }
                EntryKind::Link => {
                    let mut tbuf = Vec::new();
                    let target = self.objects.find(&oid, &mut tbuf)?;
                    path_policy::check_symlink_target(child.as_bytes(), target.data).map_err(
                        |reason| PushError::UnsafePath {
                            path: child.clone(),
                            reason,
                        },
                    )?;
                    files += 1;
                }
                EntryKind::Commit => return Err(PushError::Gitlink { path: child }),
            }
            if files > self.limits.max_tree_files {
                return Err(PushError::TooManyFiles {
                    commit: format!("at {}", printable(&child)),
                    limit: self.limits.max_tree_files,
                });
            }
        }
        Ok(files)
    }

    fn count_files(&self, id: &gix::ObjectId) -> Result<u64, PushError> {
        let mut buf = Vec::new();
        let data = self.objects.find(id, &mut buf)?;
        let tree = gix::objs::TreeRef::from_bytes(data.data, gix::hash::Kind::Sha1)
            .map_err(|e| malformed(id, e))?;
        let mut n = 0;
        let subtrees: Vec<gix::ObjectId> = tree
            .entries
            .iter()
            .filter_map(|e| {
                if e.mode.is_tree() {
                    Some(e.oid.to_owned())
                } else {
                    n += 1;
                    None
                }
            })
            .collect();
        for t in subtrees {
            n += self.count_files(&t)?;
            if n > self.limits.max_tree_files {
                break;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::valid_ref_name;

    #[test]
    fn ref_names_follow_git_check_ref_format() {
        for ok in [
            "refs/heads/main",
            "refs/heads/feature/x-1",
            "refs/tags/v1.0",
        ] {
            assert!(valid_ref_name(ok), "{ok}");
        }
        for bad in [
            "refs/heads/a\u{1}b",
            "refs/heads/a b",
            "refs/heads/../../escape",
            "refs/heads/x.lock",
            "refs/heads/.hidden",
            "refs/heads//double",
            "refs/heads/end.",
            "refs/heads/end/",
            "refs/heads/a@{1}",
            "refs/heads/a~1",
            "refs/heads/a^",
            "refs/heads/a:b",
            "refs/heads/a?",
            "refs/heads/a*",
            "refs/heads/a[",
            "refs/heads/a\\b",
            "refs/heads/a\u{7f}",
            "@",
            "",
        ] {
            assert!(!valid_ref_name(bad), "{bad:?}");
        }
    }
}
