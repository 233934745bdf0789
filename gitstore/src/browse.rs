//! Reading a project's commits without git: the files of a commit, one file's bytes, and the
//! changes between two commits, for generators that do not speak git.
//!
//! Everything reads the local repository, which the caller has just synced from the store, with
//! git plumbing. Commit ids and paths come from clients: each id must be hex and name a commit a
//! ref of this project reaches, each path must pass `path_policy`, before git sees them. Outputs are bounded:
//! a tree by the push limit on files, a diff per file and in total.

use std::path::Path;
use std::process::Stdio;

use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::git;
use crate::path_policy;
use crate::path_policy::printable;

/// Text of one file's diff kept in a response; the rest is cut at a line end.
const MAX_FILE_DIFF_BYTES: usize = 256 << 10;
/// Diff text in one response; later files are listed without theirs.
const MAX_DIFF_BYTES: usize = 8 << 20;
/// Output read from `git diff-tree`; git is stopped past it.
const MAX_GIT_OUTPUT_BYTES: usize = 32 << 20;
/// Blobs larger than this get no text diff (git's `core.bigFileThreshold` treats them as binary).
const MAX_DIFF_BLOB_BYTES: u64 = 4 << 20;
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

#[derive(Debug, thiserror::Error)]
pub(crate) enum BrowseError {
    #[error("{given:?} is not a commit id: {reason}")]
    BadCommit { given: String, reason: &'static str },
    #[error("commit {given} is not in this project (no branch or tag of it reaches that commit)")]
    NoCommit { given: String },
    #[error("{given} is a {kind}, not a commit")]
    NotACommit { given: String, kind: String },
    #[error("the project has no commits yet")]
    Empty,
    #[error("{}: {reason}", printable(.path))]
    BadPath {
        path: String,
        reason: path_policy::PathError,
    },
    #[error("{} does not exist at commit {commit}", printable(.path))]
    NoSuchPath { path: String, commit: String },
    #[error("{} is a directory at commit {commit}; list it with /tree", printable(.path))]
    IsDirectory { path: String, commit: String },
    #[error(transparent)]
    Git(#[from] git::GitError),
    #[error("`git {args}` failed: {detail}")]
    GitOutput { args: String, detail: String },
}

/// The commit `given` names in `repo`, as a full id; None means the repository's HEAD.
pub(crate) async fn resolve(repo: &Path, given: Option<&str>) -> Result<String, BrowseError> {
    let Some(given) = given else {
        return rev_parse(repo, "HEAD^{commit}")
            .await?
            .ok_or(BrowseError::Empty);
    };
    let bad = |reason| BrowseError::BadCommit {
        given: printable(&given.chars().take(64).collect::<String>()),
        reason,
    };
    if !(4..=40).contains(&given.len()) {
        return Err(bad("give 4 to 40 hex digits"));
    }
    if !given.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("only hex digits (0-9, a-f) are allowed"));
    }
    let hex = given.to_ascii_lowercase();
    if let Some(id) = rev_parse(repo, &format!("{hex}^{{commit}}")).await? {
        // The repository may hold commits no ref reaches: history a branch dropped, or, after
        // an import, the source project's later work. Only what the refs reach is this
        // project's, and the answer for the rest is the same as for a commit that is absent.
        if reachable(repo, &id).await? {
            return Ok(id);
        }
        return Err(BrowseError::NoCommit { given: hex });
    }
    if crate::sync::may_hold_foreign_objects(repo) {
        // Naming the kind of an object would tell whether another project holds it.
        return Err(BrowseError::NoCommit { given: hex });
    }
    // Say why: an ambiguous prefix, another kind of object, or nothing at all.
    let out = git::command(repo)
        .args(["cat-file", "-t", &hex])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| BrowseError::GitOutput {
            args: "cat-file -t".into(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        return Err(BrowseError::NotACommit {
            given: hex,
            kind: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        });
    }
    if String::from_utf8_lossy(&out.stderr).contains("ambiguous") {
        return Err(bad("ambiguous in this project; give more hex digits"));
    }
    Err(BrowseError::NoCommit { given: hex })
}

/// Whether a ref of `repo` reaches `commit` (a full id of a commit it holds).
pub(crate) async fn reachable(repo: &Path, commit: &str) -> Result<bool, BrowseError> {
    // Empty when a ref reaches the commit; the walk stops where the refs' history begins.
    let out = git::run(
        repo,
        &["rev-list", "-n", "1", commit, "--not", "--all"],
        b"",
    )
    .await?;
    Ok(out.iter().all(u8::is_ascii_whitespace))
}

async fn rev_parse(repo: &Path, spec: &str) -> Result<Option<String>, BrowseError> {
    let out = git::command(repo)
        .args(["rev-parse", "--verify", "--quiet", spec])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| BrowseError::GitOutput {
            args: "rev-parse".into(),
            detail: e.to_string(),
        })?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// The files of one commit.
#[derive(Debug, Serialize)]
pub(crate) struct Tree {
    pub(crate) commit: String,
    pub(crate) files: Vec<TreeFile>,
    /// More files than the listing bound; only the first ones are listed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) truncated: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct TreeFile {
    pub(crate) path: String,
    pub(crate) size: u64,
    pub(crate) mode: &'static str,
    pub(crate) oid: String,
}

fn mode_name(mode: &[u8]) -> Option<&'static str> {
    match mode {
        b"100644" | b"100664" => Some("file"),
        b"100755" => Some("exec"),
        b"120000" => Some("symlink"),
        _ => None,
    }
}

/// Every file of `commit` (recursive), at most `max_files` of them.
pub(crate) async fn tree(repo: &Path, commit: &str, max_files: u64) -> Result<Tree, BrowseError> {
    let out = git::run(
        repo,
        &["ls-tree", "-r", "-z", "--long", "--full-tree", commit],
        b"",
    )
    .await?;
    let mut files = Vec::new();
    let mut truncated = false;
    for rec in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let Some(LsTree {
            mode,
            oid,
            size,
            path,
            ..
        }) = ls_tree_record(rec)
        else {
            continue;
        };
        // Gitlinks never pass the push checks; nothing else lacks a mode name.
        let Some(mode) = mode_name(mode) else {
            continue;
        };
        if files.len() as u64 >= max_files {
            truncated = true;
            break;
        }
        files.push(TreeFile {
            path: String::from_utf8_lossy(path).into_owned(),
            size: size.unwrap_or(0),
            mode,
            oid: String::from_utf8_lossy(oid).into_owned(),
        });
    }
    Ok(Tree {
        commit: commit.to_owned(),
        files,
        truncated,
    })
}

/// One record of `git ls-tree -z [--long]`: `<mode> <type> <oid>[ <size>]\t<path>`.
struct LsTree<'a> {
    mode: &'a [u8],
    kind: &'a [u8],
    oid: &'a [u8],
    size: Option<u64>,
    path: &'a [u8],
}

fn ls_tree_record(rec: &[u8]) -> Option<LsTree<'_>> {
    let tab = rec.iter().position(|&b| b == b'\t')?;
    let mut meta = rec[..tab].split(|&b| b == b' ').filter(|f| !f.is_empty());
    let (mode, kind, oid) = (meta.next()?, meta.next()?, meta.next()?);
    let size = meta
        .next()
        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
    Some(LsTree {
        mode,
        kind,
        oid,
        size,
        path: &rec[tab + 1..],
    })
}

/// One file's bytes at a commit.
pub(crate) struct File {
    pub(crate) bytes: Vec<u8>,
    pub(crate) mode: &'static str,
}

/// The bytes of `path` at `commit` (a symlink's are its target).
pub(crate) async fn file(repo: &Path, commit: &str, path: &str) -> Result<File, BrowseError> {
    path_policy::check_relative_path(path.as_bytes()).map_err(|reason| BrowseError::BadPath {
        path: path.to_owned(),
        reason,
    })?;
    let out = git::run(
        repo,
        &[
            "--literal-pathspecs",
            "ls-tree",
            "-z",
            "--full-tree",
            commit,
            "--",
            path,
        ],
        b"",
    )
    .await?;
    let missing = || BrowseError::NoSuchPath {
        path: path.to_owned(),
        commit: commit.to_owned(),
    };
    let entry = out
        .split(|&b| b == 0)
        .filter_map(ls_tree_record)
        .find(|e| e.path == path.as_bytes())
        .ok_or_else(missing)?;
    if entry.kind == b"tree" {
        return Err(BrowseError::IsDirectory {
            path: path.to_owned(),
            commit: commit.to_owned(),
        });
    }
    let mode = mode_name(entry.mode).ok_or_else(missing)?;
    let oid = String::from_utf8_lossy(entry.oid).into_owned();
    let bytes = git::run(repo, &["cat-file", "blob", &oid], b"").await?;
    Ok(File { bytes, mode })
}

/// A Content-Type for a file name, by extension.
pub fn content_type(path: &str) -> &'static str {
    let ext = path
        .rsplit('/')
        .next()
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" | "cjs" | "jsx" => "text/javascript; charset=utf-8",
        "ts" | "tsx" | "mts" | "cts" => "text/x-typescript; charset=utf-8",
        "json" | "map" => "application/json",
        "md" | "markdown" => "text/markdown; charset=utf-8",
        "txt" | "lock" | "log" => "text/plain; charset=utf-8",
        "yaml" | "yml" => "application/yaml",
        "toml" => "application/toml",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "mp3" => "audio/mpeg",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

/// The changes from one commit to another.
#[derive(Debug, Serialize)]
pub(crate) struct Diff {
    /// None: from the empty tree (the root commit's own changes).
    pub(crate) from: Option<String>,
    pub(crate) to: String,
    pub(crate) files: Vec<DiffFile>,
    /// Some files lack their diff because the response reached its bound.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) truncated: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct DiffFile {
    pub(crate) path: String,
    pub(crate) status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) old_path: Option<String>,
    pub(crate) binary: bool,
    /// git's unified diff of this file (text files only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) diff: Option<String>,
    /// The diff is cut short or left out: over the per-file or per-response bound, or a file
    /// over 4 MiB (then `diff` is absent).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) truncated: bool,
}

/// One record of `git diff-tree --raw -z`.
struct Raw {
    old_oid: String,
    new_oid: String,
    status: u8,
    path: Vec<u8>,
    old_path: Option<Vec<u8>>,
}

/// The first parent of `commit`, or None for a root commit.
pub(crate) async fn first_parent(repo: &Path, commit: &str) -> Result<Option<String>, BrowseError> {
    rev_parse(repo, &format!("{commit}^1")).await
}

/// What changed from `from` (None: the empty tree) to `to`, both resolved commits.
pub(crate) async fn diff(repo: &Path, from: Option<&str>, to: &str) -> Result<Diff, BrowseError> {
    let base = from.unwrap_or(EMPTY_TREE);
    let threshold = format!("core.bigFileThreshold={MAX_DIFF_BLOB_BYTES}");
    // Options that a global git config could otherwise change are pinned, so the output parses.
    let args = [
        "-c",
        &threshold,
        "-c",
        "core.quotePath=true",
        "diff-tree",
        "-r",
        "-z",
        "-M",
        "--raw",
        "-p",
        "--full-index",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        "--src-prefix=a/",
        "--dst-prefix=b/",
        base,
        to,
    ];
    let (out, cut) = run_capped(repo, &args, MAX_GIT_OUTPUT_BYTES).await?;
    let (raws, patch) = parse_raw(&out);
    let chunks = split_patch(patch);

    let mut files = Vec::with_capacity(raws.len());
    let mut chunks = chunks.into_iter();
    let mut budget = MAX_DIFF_BYTES;
    let mut truncated = cut;
    let mut in_step = true;
    let mut large = Vec::new();
    for raw in &raws {
        let status = match raw.status {
            b'A' => "added",
            b'D' => "deleted",
            b'R' => "renamed",
            b'T' => "type_changed",
            _ => "modified",
        };
        // git writes a type change as a deletion and an addition.
        let parts = if raw.status == b'T' { 2 } else { 1 };
        let mut text = Vec::new();
        let mut binary = false;
        let mut complete = in_step;
        for _ in 0..parts {
            match chunks.next() {
                Some(c) if in_step && chunk_matches(c, raw) => {
                    binary |= is_binary_chunk(c);
                    text.extend_from_slice(c);
                }
                _ => {
                    // Out of step with git's output (or past its end): no more diffs to pair.
                    in_step = false;
                    complete = false;
                }
            }
        }
        let mut file = DiffFile {
            path: String::from_utf8_lossy(&raw.path).into_owned(),
            status,
            old_path: raw
                .old_path
                .as_ref()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            binary: false,
            diff: None,
            truncated: false,
        };
        if !complete {
            file.truncated = true;
            truncated = true;
        } else if binary {
            file.binary = true;
            large.push(files.len());
        } else {
            match String::from_utf8(text) {
                Err(_) => file.binary = true,
                Ok(mut t) => {
                    let cap = MAX_FILE_DIFF_BYTES.min(budget);
                    if t.len() > cap {
                        let cut_at = t[..floor_char_boundary(&t, cap)]
                            .rfind('\n')
                            .map_or(0, |i| i + 1);
                        t.truncate(cut_at);
                        file.truncated = true;
                        truncated |= budget < MAX_FILE_DIFF_BYTES;
                    }
                    budget -= t.len();
                    file.diff = (!t.is_empty() || !file.truncated).then_some(t);
                }
            }
        }
        files.push(file);
    }
    // git calls files over the threshold binary without looking; say "too large" instead.
    if !large.is_empty() {
        let oids: Vec<&str> = large
            .iter()
            .flat_map(|&i| [raws[i].old_oid.as_str(), raws[i].new_oid.as_str()])
            .filter(|o| !o.bytes().all(|b| b == b'0'))
            .collect();
        let sizes = blob_sizes(repo, &oids).await?;
        for &i in &large {
            let big = [&raws[i].old_oid, &raws[i].new_oid].iter().any(|o| {
                sizes
                    .get(o.as_str())
                    .is_some_and(|&s| s > MAX_DIFF_BLOB_BYTES)
            });
            if big {
                files[i].binary = false;
                files[i].truncated = true;
            }
        }
    }
    Ok(Diff {
        from: from.map(str::to_owned),
        to: to.to_owned(),
        files,
        truncated,
    })
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The raw records at the head of `git diff-tree -z --raw -p` output, and the patch after them.
fn parse_raw(out: &[u8]) -> (Vec<Raw>, &[u8]) {
    let mut raws = Vec::new();
    let mut rest = out;
    while rest.first() == Some(&b':') {
        let mut fields = rest.splitn(2, |&b| b == 0);
        let (Some(meta), Some(after)) = (fields.next(), fields.next()) else {
            break;
        };
        let meta = String::from_utf8_lossy(&meta[1..]).into_owned();
        let parts: Vec<&str> = meta.split(' ').collect();
        let [_, _, old_oid, new_oid, status] = parts[..] else {
            break;
        };
        let status = status.as_bytes().first().copied().unwrap_or(b'M');
        let Some((path, after)) = split_nul(after) else {
            break;
        };
        let (old_path, path, after) = if matches!(status, b'R' | b'C') {
            let Some((new, after2)) = split_nul(after) else {
                break;
            };
            (Some(path.to_vec()), new.to_vec(), after2)
        } else {
            (None, path.to_vec(), after)
        };
        raws.push(Raw {
            old_oid: old_oid.to_owned(),
            new_oid: new_oid.to_owned(),
            status,
            path,
            old_path,
        });
        rest = after;
    }
    // git ends the raw part with one more terminator before the patch.
    if let Some(r) = rest
        .strip_prefix(b"\0")
        .or_else(|| rest.strip_prefix(b"\n"))
    {
        rest = r;
    }
    (raws, rest)
}

fn split_nul(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&x| x == 0)?;
    Some((&b[..i], &b[i + 1..]))
}

/// The patch split into one chunk per `diff --git` header. A header can only start a line there:
/// every line of content starts with ` `, `+`, `-` or `\`, and git quotes names with newlines.
fn split_patch(patch: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at < patch.len() {
        if patch[at..].starts_with(b"diff --git ") {
            starts.push(at);
        }
        match patch[at..].iter().position(|&b| b == b'\n') {
            Some(i) => at += i + 1,
            None => break,
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(n, &s)| &patch[s..starts.get(n + 1).copied().unwrap_or(patch.len())])
        .collect()
}

/// With `--full-index`, a chunk that changes content names both blob ids: pairing a raw record
/// with a chunk of another file is then caught rather than shown.
fn chunk_matches(chunk: &[u8], raw: &Raw) -> bool {
    let text = String::from_utf8_lossy(&chunk[..chunk.len().min(4096)]);
    match text.lines().find_map(|l| l.strip_prefix("index ")) {
        None => true,
        Some(ids) => {
            let ids = ids.split(' ').next().unwrap_or_default();
            let Some((a, b)) = ids.split_once("..") else {
                return false;
            };
            let zero = |s: &str| s.bytes().all(|c| c == b'0');
            (a == raw.old_oid || zero(a)) && (b == raw.new_oid || zero(b))
        }
    }
}

fn is_binary_chunk(chunk: &[u8]) -> bool {
    let head = &chunk[..chunk.len().min(64 << 10)];
    head.split(|&b| b == b'\n')
        .any(|l| l.starts_with(b"Binary files ") || l == b"GIT binary patch")
}

/// Sizes of blobs by id, from one `git cat-file --batch-check`.
async fn blob_sizes(
    repo: &Path,
    oids: &[&str],
) -> Result<std::collections::HashMap<String, u64>, BrowseError> {
    let input: String = oids.iter().map(|o| format!("{o}\n")).collect();
    let out = git::run(
        repo,
        &["cat-file", "--batch-check=%(objectname) %(objectsize)"],
        input.as_bytes(),
    )
    .await?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| {
            let (id, size) = l.split_once(' ')?;
            Some((id.to_owned(), size.parse().ok()?))
        })
        .collect())
}

/// Runs git and reads at most `cap` bytes of its stdout; past that git is killed and the second
/// value is true.
async fn run_capped(
    repo: &Path,
    args: &[&str],
    cap: usize,
) -> Result<(Vec<u8>, bool), BrowseError> {
    let fail = |detail: String| BrowseError::GitOutput {
        args: args.join(" "),
        detail,
    };
    let mut child = git::command(repo)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start git: {e}")))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Drained alongside stdout, so a chatty stderr cannot stall git.
    let errors = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut v).await;
        v
    });
    let mut out = Vec::new();
    stdout
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if out.len() > cap {
        out.truncate(cap);
        let _ = child.kill().await;
        return Ok((out, true));
    }
    let status = child.wait().await.map_err(|e| fail(e.to_string()))?;
    let err = errors.await.unwrap_or_default();
    if !status.success() {
        return Err(fail(format!(
            "{status}: {}",
            String::from_utf8_lossy(&err).trim()
        )));
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_raw_records_from_the_patch() {
        let out = b":000000 100644 0000 aaaa A\0new.txt\0:100644 100644 bbbb bbbb R100\0old\0moved\0\0diff --git a/new.txt b/new.txt\n+x\ndiff --git a/old b/moved\n";
        let (raws, patch) = parse_raw(out);
        assert_eq!(raws.len(), 2);
        assert_eq!(raws[0].path, b"new.txt");
        assert_eq!(raws[1].old_path.as_deref(), Some(&b"old"[..]));
        assert_eq!(raws[1].path, b"moved");
        let chunks = split_patch(patch);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0], b"diff --git a/new.txt b/new.txt\n+x\n");
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(
            content_type("src/App.JSX"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("a.png"), "image/png");
        assert_eq!(content_type("Makefile"), "application/octet-stream");
        assert_eq!(content_type(".gitignore"), "application/octet-stream");
    }
}
