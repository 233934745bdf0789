//! Files without git: a commit made from a JSON map of paths to contents.
//!
//! A generator that does not speak git sends the files it changed on top of a parent commit.
//! [`parse`] checks the request with the push rules (`path_policy`, the configured limits) before
//! any work. [`build`] then writes the new blobs, trees and commit into a scratch object directory
//! that only borrows the project repository's objects (git's alternates), and packs what the
//! parent lacks. The server sends that pack through `git receive-pack` exactly as a push arrives,
//! so the pre-receive hook (`receive`) checks the new tree, stores the pack and publishes the
//! manifest like for any push.
//!
//! Nothing here writes to the repository or the blob store. That is what keeps the hook honest:
//! it checks the commits found only in the push's quarantine, so the commit must reach the
//! repository through receive-pack, never by a side door.

use crate::path_policy::printable;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::git;
use crate::path_policy;
use crate::receive::Limits;

/// Longest commit message accepted, in bytes.
pub(crate) const MAX_MESSAGE_BYTES: usize = 16 << 10;
const MAX_IDENT_BYTES: usize = 256;
const MAX_BRANCH_BYTES: usize = 200;
const ZERO: &str = "0000000000000000000000000000000000000000";

/// Why a commit request was refused before it reached the push path.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    #[error("invalid commit request: {0}; send {{\"message\": \"...\", \"parent\": \"<40 hex>\" or null, \"files\": {{\"<path>\": \"<text>\" | null | {{\"base64\": \"...\"}} | {{\"symlink\": \"<target>\"}}}}}}")]
    Json(#[source] serde_json::Error),
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("{}: {reason}", printable(.path))]
    Path { path: String, reason: String },
    /// A configured limit; the text names it and its setting.
    #[error("{0}")]
    Limit(String),
    #[error("{branch} is at {}, not at the parent you sent ({}); read the head, apply your changes on it and send them again", .head.as_deref().unwrap_or("nothing (no commit yet)"), .parent.as_deref().unwrap_or("null"))]
    Conflict {
        branch: String,
        head: Option<String>,
        parent: Option<String>,
    },
    #[error("`git {args}` failed: {detail}")]
    Git { args: String, detail: String },
    #[error(transparent)]
    Plumbing(#[from] git::GitError),
}

/// A git identity, checked so that `git commit-tree` and receive-pack's fsck accept it.
#[derive(Clone, Debug)]
pub(crate) struct Person {
    pub(crate) name: String,
    pub(crate) email: String,
}

impl Person {
    /// The identity of an API client: its name (made safe for an ident) at a kiln address.
    pub(crate) fn client(name: &str, id: &str) -> Self {
        let clean: String = name
            .chars()
            .filter(|c| !c.is_control() && !matches!(c, '<' | '>'))
            .take(100)
            .collect();
        let clean = clean.trim();
        Self {
            name: if clean.is_empty() {
                format!("kiln client {id}")
            } else {
                clean.to_owned()
            },
            email: format!("{id}@clients.kiln.invalid"),
        }
    }
}

/// A validated commit request.
#[derive(Debug)]
pub(crate) struct CommitRequest {
    pub(crate) message: String,
    /// The branch head the client built on; None for the branch's first commit.
    pub(crate) parent: Option<String>,
    /// The branch name, without `refs/heads/`.
    pub(crate) branch: String,
    pub(crate) author: Option<Person>,
    changes: Vec<(String, Change)>,
}

#[derive(Debug)]
enum Change {
    Delete,
    Blob {
        data: Vec<u8>,
        /// None keeps the parent's executable bit for a file that was there.
        executable: Option<bool>,
    },
    Symlink(Vec<u8>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    message: String,
    // Required even when null, so a client that forgot it is not taken for a first commit.
    #[serde(default, deserialize_with = "present")]
    parent: Option<Option<String>>,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    author: Option<RawPerson>,
    files: Files,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerson {
    name: String,
    email: String,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The `files` object, in order, with each value's errors naming its path.
struct Files(Vec<(String, FileSpec)>);

impl<'de> Deserialize<'de> for Files {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Files;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping paths to contents")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Files, A::Error> {
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                while let Some(path) = map.next_key::<String>()? {
                    let spec = map.next_value::<FileSpec>().map_err(|e| {
                        de::Error::custom(format!("files[{:?}]: {e}", printable(&path)))
                    })?;
                    if !seen.insert(path.clone()) {
                        return Err(de::Error::custom(format!(
                            "files[{:?}] appears twice",
                            printable(&path)
                        )));
                    }
                    out.push((path, spec));
                }
                Ok(Files(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// One value of `files`: `"text"`, `null`, `{"text"|"base64": ..., "executable": bool}` or
/// `{"symlink": "target"}`.
enum FileSpec {
    Delete,
    Text(String, Option<bool>),
    Base64(String, Option<bool>),
    Symlink(String),
}

impl<'de> Deserialize<'de> for FileSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FileSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "the file's text, null to delete it, {\"base64\": \"...\"} or {\"symlink\": \"target\"}",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FileSpec, E> {
                Ok(FileSpec::Text(v.to_owned(), None))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<FileSpec, E> {
                Ok(FileSpec::Text(v, None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<FileSpec, E> {
                Ok(FileSpec::Delete)
            }
            fn visit_none<E: de::Error>(self) -> Result<FileSpec, E> {
                Ok(FileSpec::Delete)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileSpec, A::Error> {
                let (mut text, mut b64, mut link, mut exec) = (None, None, None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "text" => text = Some(map.next_value::<String>()?),
                        "base64" => b64 = Some(map.next_value::<String>()?),
                        "symlink" => link = Some(map.next_value::<String>()?),
                        "executable" => exec = Some(map.next_value::<bool>()?),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["text", "base64", "symlink", "executable"],
                            ))
                        }
                    }
                }
                match (text, b64, link) {
                    (Some(t), None, None) => Ok(FileSpec::Text(t, exec)),
                    (None, Some(b), None) => Ok(FileSpec::Base64(b, exec)),
                    (None, None, Some(_)) if exec.is_some() => Err(de::Error::custom(
                        "a symlink has no executable bit; drop \"executable\"",
                    )),
                    (None, None, Some(l)) => Ok(FileSpec::Symlink(l)),
                    _ => Err(de::Error::custom(
                        "give exactly one of \"text\", \"base64\" or \"symlink\"",
                    )),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses and checks a request body: the JSON shape, the message, branch and identity, every
/// path and symlink target by `path_policy`, and the sizes against `limits`. Checks that need the
/// parent's tree (deletions, file/directory clashes, the whole tree's file count and depth) come
/// in [`build`].
pub(crate) fn parse(body: &[u8], limits: &Limits) -> Result<CommitRequest, CommitError> {
    let raw: RawRequest = serde_json::from_slice(body).map_err(CommitError::Json)?;
    let field = |field, reason: &str| CommitError::Field {
        field,
        reason: reason.to_owned(),
    };

    let message = raw.message;
    if message.trim().is_empty() {
        return Err(field("message", "must not be empty"));
    }
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(field(
            "message",
            &format!(
                "{} bytes, over the {MAX_MESSAGE_BYTES}-byte limit",
                message.len()
            ),
        ));
    }
    if message.contains('\0') {
        return Err(field("message", "NUL characters are not allowed"));
    }

    let parent = match raw.parent {
        None => {
            return Err(field(
                "parent",
                "required: the branch head your files build on (40 hex digits), or null for the branch's first commit",
            ))
        }
        Some(None) => None,
        Some(Some(p)) => {
            let p = p.to_ascii_lowercase();
            if p.len() != 40 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(field(
                    "parent",
                    "must be a full commit id (40 hex digits) or null",
                ));
            }
            Some(p)
        }
    };

    let branch = raw.branch.unwrap_or_else(|| "main".to_owned());
    check_branch(&branch).map_err(|reason| field("branch", &reason))?;

    let author = raw
        .author
        .map(|a| {
            Ok::<_, CommitError>(Person {
                name: check_ident("author.name", &a.name)?,
                email: check_ident("author.email", &a.email)?,
            })
        })
        .transpose()?;

    let files = raw.files.0;
    if files.len() as u64 > limits.max_tree_files {
        return Err(CommitError::Limit(format!(
            "{} files in one request, over the max_tree_files limit of {} (KILN_MAX_TREE_FILES)",
            files.len(),
            limits.max_tree_files
        )));
    }
    let mut total = 0u64;
    let mut changes = Vec::with_capacity(files.len());
    for (path, spec) in files {
        let bad = |reason: String| CommitError::Path {
            path: path.clone(),
            reason,
        };
        path_policy::check_relative_path(path.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let dirs = path.matches('/').count() as u64;
        if dirs > u64::from(limits.max_tree_depth) {
            return Err(bad(format!(
                "directories nest deeper than the max_tree_depth limit of {} levels (KILN_MAX_TREE_DEPTH)",
                limits.max_tree_depth
            )));
        }
        let change = match spec {
            FileSpec::Delete => Change::Delete,
            FileSpec::Text(t, executable) => Change::Blob {
                data: t.into_bytes(),
                executable,
            },
            FileSpec::Base64(b, executable) => Change::Blob {
                data: base64::engine::general_purpose::STANDARD
                    .decode(b.as_bytes())
                    .map_err(|e| bad(format!("\"base64\" is not valid standard base64: {e}")))?,
                executable,
            },
            FileSpec::Symlink(target) => {
                path_policy::check_symlink_target(path.as_bytes(), target.as_bytes())
                    .map_err(|e| bad(e.to_string()))?;
                Change::Symlink(target.into_bytes())
            }
        };
        let size = match &change {
            Change::Delete => 0,
            Change::Blob { data, .. } | Change::Symlink(data) => data.len() as u64,
        };
        if size > limits.max_file_bytes {
            return Err(CommitError::Limit(format!(
                "{}: file is {size} bytes, over the max_file_bytes limit of {} (KILN_MAX_FILE_BYTES)",
                printable(&path),
                limits.max_file_bytes
            )));
        }
        total += size;
        if total > limits.max_push_bytes {
            return Err(CommitError::Limit(format!(
                "the files total more than the max_push_bytes limit of {} bytes (KILN_MAX_PUSH_BYTES); split the change into several commits",
                limits.max_push_bytes
            )));
        }
        changes.push((path, change));
    }
    Ok(CommitRequest {
        message,
        parent,
        branch,
        author,
        changes,
    })
}

/// A branch name that is safe everywhere a ref name goes: plain components of
/// `[A-Za-z0-9._-]`, none hidden, none a lock file, no `..`.
fn check_branch(b: &str) -> Result<(), String> {
    if b.is_empty() || b.len() > MAX_BRANCH_BYTES {
        return Err(format!("must be 1 to {MAX_BRANCH_BYTES} bytes"));
    }
    if b == "HEAD" || b.starts_with('-') {
        return Err("`HEAD` and names starting with `-` are not branch names".into());
    }
    for c in b.split('/') {
        let plain = c
            .bytes()
            .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'));
        if c.is_empty() || !plain || c.starts_with('.') || c.ends_with(".lock") || c.contains("..")
        {
            return Err(format!(
                "{b:?} is not a plain branch name (use letters, digits, `.`, `_`, `-` and `/` between parts)"
            ));
        }
    }
    Ok(())
}

fn check_ident(field: &'static str, v: &str) -> Result<String, CommitError> {
    let v = v.trim();
    let reason = if v.is_empty() {
        "must not be empty"
    } else if v.len() > MAX_IDENT_BYTES {
        "longer than 256 bytes"
    } else if v.chars().any(|c| c.is_control() || c == '<' || c == '>') {
        "`<`, `>` and control characters are not allowed"
    } else {
        return Ok(v.to_owned());
    };
    Err(CommitError::Field {
        field,
        reason: reason.to_owned(),
    })
}

/// A commit built in scratch space, ready to be sent to receive-pack.
#[derive(Debug)]
pub(crate) struct Built {
    pub(crate) commit: String,
    pub(crate) tree: String,
    pub(crate) parent: Option<String>,
    /// `refs/heads/<branch>`.
    pub(crate) refname: String,
    /// The objects the parent lacks, as a pack file.
    pub(crate) pack: PathBuf,
}

impl Built {
    /// The start of a receive-pack request updating the branch from the parent to the commit;
    /// the pack follows it.
    pub(crate) fn receive_pack_commands(&self) -> Vec<u8> {
        let old = self.parent.as_deref().unwrap_or(ZERO);
        // No side-band: the hook's refusal then reaches receive-pack's stderr, where the server
        // reads it, rather than being muxed into the report.
        let line = format!("{old} {} {}\0report-status\n", self.commit, self.refname);
        format!("{:04x}{line}0000", line.len() + 4).into_bytes()
    }
}

/// A tree entry: its mode and its blob, either in the parent (`Some`) or new (`None`, the index
/// of its change).
struct Entry {
    mode: &'static str,
    oid: Result<String, usize>,
}

/// Builds the commit of `req` on the project repository `repo` in `scratch` (an empty directory
/// the caller removes). The caller holds the project lock and has synced `repo`, so the branch
/// head read here is the one the push path will compare against.
pub(crate) async fn build(
    repo: &Path,
    scratch: &Path,
    req: CommitRequest,
    committer: &Person,
    limits: &Limits,
) -> Result<Built, CommitError> {
    let refname = format!("refs/heads/{}", req.branch);
    let head = git::refs(repo)
        .await?
        .into_iter()
        .find(|(name, _)| *name == refname)
        .map(|(_, id)| id);
    if head != req.parent {
        return Err(CommitError::Conflict {
            branch: refname,
            head,
            parent: req.parent,
        });
    }

    let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    if let Some(parent) = &req.parent {
        let out = git::run(repo, &["ls-tree", "-r", "-z", "--full-tree", parent], b"").await?;
        for rec in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let Some(tab) = rec.iter().position(|&b| b == b'\t') else {
                continue;
            };
            let mut meta = rec[..tab].split(|&b| b == b' ');
            let (Some(mode), Some(_kind), Some(oid)) = (meta.next(), meta.next(), meta.next())
            else {
                continue;
            };
            let mode = match mode {
                b"100755" => "100755",
                b"120000" => "120000",
                b"160000" => "160000",
                _ => "100644",
            };
            let oid = String::from_utf8_lossy(oid).into_owned();
            entries.insert(rec[tab + 1..].to_vec(), Entry { mode, oid: Ok(oid) });
        }
    }

    // Deletions first, so `{"a": null, "a/b": ...}` turns a file into a directory in one commit.
    for (path, change) in &req.changes {
        if !matches!(change, Change::Delete) {
            continue;
        }
        let key = path.as_bytes();
        if entries.remove(key).is_some() {
            continue;
        }
        let prefix = [key, b"/"].concat();
        let before = entries.len();
        entries.retain(|k, _| !k.starts_with(&prefix));
        if entries.len() == before {
            return Err(CommitError::Path {
                path: path.clone(),
                reason: "not in the parent commit, so there is nothing to delete".into(),
            });
        }
    }
    for (i, (path, change)) in req.changes.iter().enumerate() {
        let mode = match change {
            Change::Delete => continue,
            Change::Symlink(_) => "120000",
            Change::Blob {
                executable: Some(true),
                ..
            } => "100755",
            Change::Blob {
                executable: Some(false),
                ..
            } => "100644",
            Change::Blob {
                executable: None, ..
            } => match entries.get(path.as_bytes()) {
                Some(Entry { mode: "100755", .. }) => "100755",
                _ => "100644",
            },
        };
        entries.insert(path.as_bytes().to_vec(), Entry { mode, oid: Err(i) });
    }

    check_shape(&entries, limits)?;

    let objects = scratch.join("objects");
    let blobs = write_blobs(&objects, req.changes).await?;
    let mut index_info = Vec::new();
    for (path, e) in &entries {
        let oid = match &e.oid {
            Ok(oid) => oid.as_str(),
            Err(i) => blobs[*i].as_str(),
        };
        index_info.extend_from_slice(format!("{} {oid}\t", e.mode).as_bytes());
        index_info.extend_from_slice(path);
        index_info.push(0);
    }

    let env = Scratch::new(repo, scratch);
    env.run(&["update-index", "-z", "--index-info"], &index_info, &[])
        .await?;
    let tree = env.run_line(&["write-tree"], b"", &[]).await?;
    let author = req.author.as_ref().unwrap_or(committer);
    let idents = [
        ("GIT_AUTHOR_NAME", author.name.as_str()),
        ("GIT_AUTHOR_EMAIL", author.email.as_str()),
        ("GIT_COMMITTER_NAME", committer.name.as_str()),
        ("GIT_COMMITTER_EMAIL", committer.email.as_str()),
    ];
    let mut args = vec![
        "-c",
        "i18n.commitEncoding=UTF-8",
        "commit-tree",
        "--no-gpg-sign",
        &tree,
    ];
    if let Some(p) = &req.parent {
        args.extend(["-p", p]);
    }
    let commit = env.run_line(&args, req.message.as_bytes(), &idents).await?;

    let pack = scratch.join("commit.pack");
    let revs = match &req.parent {
        Some(p) => format!("{commit}\n^{p}\n"),
        None => format!("{commit}\n"),
    };
    env.pack(&revs, &pack).await?;
    Ok(Built {
        commit,
        tree,
        parent: req.parent,
        refname,
        pack,
    })
}

/// The whole new tree must be one git can write and the push path will accept: no path both a
/// file and a directory, no more files than `max_tree_files`.
fn check_shape(entries: &BTreeMap<Vec<u8>, Entry>, limits: &Limits) -> Result<(), CommitError> {
    for path in entries.keys() {
        for (i, _) in path.iter().enumerate().filter(|(_, &b)| b == b'/') {
            if entries.contains_key(&path[..i]) {
                let file = String::from_utf8_lossy(&path[..i]).into_owned();
                return Err(CommitError::Path {
                    reason: format!(
                        "{} would be both a file and a directory; delete one of them (null) in the same commit",
                        printable(&file)
                    ),
                    path: String::from_utf8_lossy(path).into_owned(),
                });
            }
        }
    }
    if entries.len() as u64 > limits.max_tree_files {
        return Err(CommitError::Limit(format!(
            "the commit would hold {} files, over the max_tree_files limit of {} (KILN_MAX_TREE_FILES); delete some in the same commit",
            entries.len(),
            limits.max_tree_files
        )));
    }
    Ok(())
}

/// Writes each new blob as a loose object in the scratch `objects` directory; returns their ids
/// by change index (deletions get an empty id).
async fn write_blobs(
    objects: &Path,
    changes: Vec<(String, Change)>,
) -> Result<Vec<String>, CommitError> {
    let objects = objects.to_owned();
    tokio::task::spawn_blocking(move || {
        let fail = |detail: String| CommitError::Git {
            args: "(writing blobs)".into(),
            detail,
        };
        for sub in ["pack", "info"] {
            std::fs::create_dir_all(objects.join(sub))
                .map_err(|e| fail(format!("{}: {e}", objects.display())))?;
        }
        let store = gix::odb::loose::Store::at(&objects, gix::hash::Kind::Sha1);
        use gix::objs::Write;
        changes
            .into_iter()
            .map(|(_, change)| match change {
                Change::Delete => Ok(String::new()),
                Change::Blob { data, .. } | Change::Symlink(data) => store
                    .write_buf(gix::objs::Kind::Blob, &data)
                    .map(|id| id.to_string())
                    .map_err(|e| fail(e.to_string())),
            })
            .collect()
    })
    .await
    .map_err(|e| CommitError::Git {
        args: "(writing blobs)".into(),
        detail: e.to_string(),
    })?
}

/// git plumbing run against the project repository with new objects going to the scratch object
/// directory (the repository's objects are only read, as an alternate) and a scratch index.
struct Scratch {
    repo: PathBuf,
    objects: PathBuf,
    alternate: String,
    index: PathBuf,
}

impl Scratch {
    fn new(repo: &Path, scratch: &Path) -> Self {
        // The alternates variable is colon-separated; a quoted entry may hold any path.
        let alt = repo.join("objects").to_string_lossy().into_owned();
        let alternate = format!("\"{}\"", alt.replace('\\', "\\\\").replace('"', "\\\""));
        Self {
            repo: repo.to_owned(),
            objects: scratch.join("objects"),
            alternate,
            index: scratch.join("index"),
        }
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = git::command(&self.repo);
        cmd.args(args)
            .env("GIT_OBJECT_DIRECTORY", &self.objects)
            .env("GIT_ALTERNATE_OBJECT_DIRECTORIES", &self.alternate)
            .env("GIT_INDEX_FILE", &self.index)
            .envs(env.iter().copied());
        cmd
    }

    async fn run(
        &self,
        args: &[&str],
        input: &[u8],
        env: &[(&str, &str)],
    ) -> Result<Vec<u8>, CommitError> {
        Ok(git::run_command(self.command(args, env), args, input).await?)
    }

    async fn run_line(
        &self,
        args: &[&str],
        input: &[u8],
        env: &[(&str, &str)],
    ) -> Result<String, CommitError> {
        let out = self.run(args, input, env).await?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }

    /// `git pack-objects --revs` of `revs` into the file `to`: exactly what `git push` would send.
    async fn pack(&self, revs: &str, to: &Path) -> Result<(), CommitError> {
        let args = ["pack-objects", "--revs", "--stdout", "-q"];
        let fail = |detail: String| CommitError::Git {
            args: args.join(" "),
            detail,
        };
        let file = std::fs::File::create(to).map_err(|e| fail(format!("{}: {e}", to.display())))?;
        let mut child = self
            .command(&args, &[])
            .stdin(Stdio::piped())
            .stdout(Stdio::from(file))
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start git: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(revs.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(())
    }
}

/// What receive-pack reported for one ref: `Ok(())`, or git's reason.
pub(crate) fn ref_status(stdout: &[u8], refname: &str) -> Option<Result<(), String>> {
    let mut rest = stdout;
    while rest.len() >= 4 {
        let len = std::str::from_utf8(&rest[..4])
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())?;
        if len < 4 {
            rest = &rest[4..];
            continue;
        }
        let line = String::from_utf8_lossy(rest.get(4..len)?);
        let line = line.trim_end_matches('\n');
        if let Some(name) = line.strip_prefix("ok ") {
            if name == refname {
                return Some(Ok(()));
            }
        } else if let Some(ng) = line.strip_prefix("ng ") {
            if let Some(reason) = ng.strip_prefix(refname).and_then(|r| r.strip_prefix(' ')) {
                return Some(Err(reason.to_owned()));
            }
        }
        rest = &rest[len..];
    }
    None
}

/// The hook's reason for a refusal, from receive-pack's stderr (`kiln: push refused: <reason>`).
pub(crate) fn hook_refusal(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr).lines().find_map(|l| {
        l.trim()
            .strip_prefix("kiln: push refused: ")
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(json: &str) -> CommitRequest {
        parse(json.as_bytes(), &Limits::default()).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn parse_err(json: &str) -> String {
        parse(json.as_bytes(), &Limits::default())
            .map(|r| panic!("{json} was accepted: {r:?}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_every_file_form() {
        let r = parse_ok(
            r##"{"message": "m", "parent": null, "files": {
                "a.txt": "hi", "b.bin": {"base64": "AAEC"}, "l": {"symlink": "a.txt"},
                "gone": null, "run.sh": {"text": "#!/bin/sh", "executable": true}}}"##,
        );
        assert_eq!(r.branch, "main");
        assert_eq!(r.parent, None);
        let kinds: Vec<String> = r
            .changes
            .iter()
            .map(|(p, c)| match c {
                Change::Delete => format!("{p}:del"),
                Change::Blob { data, executable } => format!("{p}:{data:?}:{executable:?}"),
                Change::Symlink(t) => format!("{p}:->{}", String::from_utf8_lossy(t)),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "a.txt:[104, 105]:None",
                "b.bin:[0, 1, 2]:None",
                "l:->a.txt",
                "gone:del",
                "run.sh:[35, 33, 47, 98, 105, 110, 47, 115, 104]:Some(true)"
            ]
        );
    }

    #[test]
    fn rejects_hostile_paths_naming_them() {
        for path in [
            ".git/config",
            "../x",
            "a/../../b",
            "/etc/passwd",
            "a//b",
            "x/.GIT/hooks",
        ] {
            let err = parse_err(&format!(
                r#"{{"message": "m", "parent": null, "files": {{"{path}": "x"}}}}"#
            ));
            assert!(err.starts_with(&format!("{path}: ")), "{path}: {err}");
        }
        let err = parse_err(
            r#"{"message": "m", "parent": null, "files": {"l": {"symlink": "../../etc"}}}"#,
        );
        assert!(err.contains("outside the repository"), "{err}");
    }

    #[test]
    fn rejects_malformed_requests_saying_what_to_fix() {
        let cases = [
            (
                r#"{"parent": null, "files": {}}"#,
                "missing field `message`",
            ),
            (r#"{"message": "m", "files": {}}"#, "parent: required"),
            (
                r#"{"message": " ", "parent": null, "files": {}}"#,
                "message: must not be empty",
            ),
            (
                r#"{"message": "m", "parent": "abc", "files": {}}"#,
                "40 hex digits",
            ),
            (
                r#"{"message": "m", "parent": null, "branch": "a..b", "files": {}}"#,
                "branch:",
            ),
            (
                r#"{"message": "m", "parent": null, "branch": "x.lock", "files": {}}"#,
                "branch:",
            ),
            (
                r#"{"message": "m", "parent": null, "files": {"a": 1}}"#,
                "files[\"a\"]",
            ),
            (
                r#"{"message": "m", "parent": null, "files": {"a": {"base64": "!"}}}"#,
                "a: \"base64\"",
            ),
            (
                r#"{"message": "m", "parent": null, "files": {"a": {"text": "x", "base64": ""}}}"#,
                "exactly one",
            ),
            (
                r#"{"message": "m", "parent": null, "files": {"a": "x", "a": "y"}}"#,
                "appears twice",
            ),
            (
                r#"{"message": "m", "parent": null, "author": {"name": "a<b", "email": "e"}, "files": {}}"#,
                "author.name",
            ),
            (
                r#"{"message": "m", "parent": null, "files": {}, "extra": 1}"#,
                "unknown field `extra`",
            ),
        ];
        for (json, want) in cases {
            let err = parse_err(json);
            assert!(err.contains(want), "{json}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn enforces_limits_naming_them() {
        let limits = Limits {
            max_file_bytes: 4,
            max_push_bytes: 6,
            max_tree_files: 3,
            max_tree_depth: 1,
        };
        let err = |json: &str| parse(json.as_bytes(), &limits).unwrap_err().to_string();
        assert!(
            err(r#"{"message": "m", "parent": null, "files": {"a": "12345"}}"#)
                .contains("max_file_bytes")
        );
        assert!(
            err(r#"{"message": "m", "parent": null, "files": {"a": "1234", "b": "123"}}"#)
                .contains("max_push_bytes")
        );
        assert!(err(
            r#"{"message": "m", "parent": null, "files": {"a": "", "b": "", "c": "", "d": ""}}"#
        )
        .contains("max_tree_files"));
        assert!(
            err(r#"{"message": "m", "parent": null, "files": {"a/b/c": ""}}"#)
                .contains("max_tree_depth")
        );
    }

    #[test]
    fn reads_the_report_for_one_ref() {
        let pkt = |l: &str| format!("{:04x}{l}", l.len() + 4);
        let report = format!("{}{}0000", pkt("unpack ok\n"), pkt("ok refs/heads/main\n"));
        assert_eq!(
            ref_status(report.as_bytes(), "refs/heads/main"),
            Some(Ok(()))
        );
        let ng = pkt("ng refs/heads/main pre-receive hook declined\n");
        let report = format!("{}{ng}0000", pkt("unpack ok\n"));
        assert_eq!(
            ref_status(report.as_bytes(), "refs/heads/main"),
            Some(Err("pre-receive hook declined".into()))
        );
        assert_eq!(ref_status(b"", "refs/heads/main"), None);
    }

    // The commits API takes JSON from any client: whatever the bytes, parsing answers (never
    // panics), and what it accepts can be checked out safely, whatever spelling a path uses.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn hostile_segment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(".git".to_owned()),
                Just(".GIT".to_owned()),
                Just(".git ".to_owned()),
                Just(".git.".to_owned()),
                Just("git~1".to_owned()),
                Just("..".to_owned()),
                Just(".".to_owned()),
                Just(String::new()),
                Just("a\\b".to_owned()),
                Just("\u{200c}.git".to_owned()),
                Just("ok.txt".to_owned()),
                Just("src".to_owned()),
                "[a-z0-9._-]{1,8}",
                any::<String>(),
            ]
        }

        fn path() -> impl Strategy<Value = String> {
            (
                any::<bool>(),
                prop::collection::vec(hostile_segment(), 1..5),
            )
                .prop_map(|(abs, segs)| format!("{}{}", if abs { "/" } else { "" }, segs.join("/")))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn refuses_or_parses_any_bytes_without_panicking(body in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse(&body, &Limits::default());
            }

            #[test]
            fn accepts_only_paths_that_stay_inside_the_checkout(paths in prop::collection::vec(path(), 1..6)) {
                let files: serde_json::Map<String, serde_json::Value> = paths
                    .iter()
                    .map(|p| (p.clone(), serde_json::Value::String("x".into())))
                    .collect();
                let body = serde_json::json!({"message": "m", "parent": null, "files": files});
                if let Ok(req) = parse(body.to_string().as_bytes(), &Limits::default()) {
                    for (path, _) in &req.changes {
                        prop_assert!(!path.starts_with('/'), "{path:?}");
                        prop_assert!(!path.contains('\\') && !path.contains('\0'), "{path:?}");
                        for seg in path.split('/') {
                            // What macOS (code points HFS+ ignores) and Windows (case, trailing
                            // dots and spaces) would open it as.
                            let seen: String = seg
                                .chars()
                                .filter(|c| !matches!(c, '\u{200C}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{206A}'..='\u{206F}' | '\u{FEFF}'))
                                .collect::<String>()
                                .to_ascii_lowercase();
                            let seen = seen.trim_end_matches(['.', ' ']);
                            prop_assert!(!seg.is_empty() && seg != "." && seg != "..", "{path:?}");
                            prop_assert!(seen != ".git" && seen != "git~1", "{path:?}");
                        }
                    }
                }
            }

            #[test]
            fn keeps_every_accepted_files_bytes_exactly(
                files in prop::collection::btree_map("[a-z]{1,6}(/[a-z]{1,6}){0,2}\\.txt", any::<String>(), 1..6),
            ) {
                let body = serde_json::json!({"message": "m", "parent": null, "files": files});
                let req = parse(body.to_string().as_bytes(), &Limits::default());
                // A name may be both a file and a directory prefix of another; that is caught
                // later, against the tree. Everything else here is valid and must parse.
                let req = req.map_err(|e| TestCaseError::fail(e.to_string()))?;
                for (path, change) in &req.changes {
                    match change {
                        Change::Blob { data, .. } => prop_assert_eq!(data, files[path].as_bytes()),
                        other => prop_assert!(false, "{path}: {other:?}"),
                    }
                }
            }
        }
    }
}
