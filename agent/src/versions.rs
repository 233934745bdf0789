//! A project's versions as its users see them: the preview branch's commits with the builds made
//! of them, and any commit of the project exported as a download (`git archive`) or as the file
//! tree a WebContainer mounts.
//!
//! Git is read through the git CLI, as the pipeline reads refs, without the machine's git
//! configuration. `git log -z` output is NUL-separated and git cuts a commit message at its first
//! NUL, so no field can run into the next. Reads sync the repository from the store first,
//! through [`Agent::sync_repo`]: one sync at a time per repository, so a read waits at most for
//! a build's sync step, never for the whole build.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;

use gitstore::ProjectId;
use gix::objs::Find;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::agent::Agent;
use crate::checkout::Kind;
use crate::publish;
use crate::status::{BuildSummary, State, Status};

/// Versions listed when the caller does not say how many.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 500;
/// A commit message is cut (at a character boundary) beyond this many bytes.
const MESSAGE_LIMIT: usize = 4096;
/// File content a WebContainer export may hold (before base64): the whole tree is built in
/// memory, and a browser has to hold it too.
pub const WEBCONTAINER_LIMIT: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("commit {commit} is not in project {project}")]
    UnknownCommit { project: String, commit: String },
    #[error(
        "commit {commit} is on no branch of project {project} (a force push may have dropped it)"
    )]
    NotOnBranch { project: String, commit: String },
    #[error("project {0} has no branch yet: push one (main is built)")]
    NoBranch(String),
    #[error("sync from the blob store failed: {0}")]
    Sync(#[from] gitstore::sync::SyncError),
    #[error("git {args}: {message}")]
    Git { args: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the files of commit {commit} are over the {limit}-byte limit of a WebContainer export: download the tar.gz instead")]
    TooLarge { commit: String, limit: u64 },
    #[error("reading commit {commit}: {message}")]
    Objects { commit: String, message: String },
    #[error(transparent)]
    Tree(#[from] crate::checkout::CheckoutError),
}

/// `GET /api/projects/{p}/versions`.
#[derive(Debug, Serialize)]
pub struct Versions {
    pub project: String,
    /// The preview branch (`refs/heads/main`...); None before the first push.
    pub branch: Option<String>,
    pub head: Option<String>,
    /// Commits on the branch, for paging.
    pub total: u64,
    pub limit: usize,
    pub offset: usize,
    /// Newest first.
    pub versions: Vec<Version>,
}

#[derive(Debug, Serialize)]
pub struct Version {
    pub commit: String,
    /// Subject and body, at most 4 KiB.
    pub message: String,
    pub message_truncated: bool,
    pub author: Author,
    /// Author time, Unix seconds.
    pub time: i64,
    /// Paths added, deleted or modified against the first parent (all of them for a root
    /// commit).
    pub files_changed: u64,
    /// The newest build of this commit, if any.
    pub build: Option<BuildRef>,
    /// This is the version the preview URL serves.
    pub current: bool,
}

#[derive(Debug, Serialize)]
pub struct Author {
    pub name: String,
    pub email: String,
}

#[derive(Debug, Serialize)]
pub struct BuildRef {
    pub id: u64,
    pub state: State,
    /// None while the build runs.
    pub duration_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Where this build stays served (when it succeeded), for as long as it is kept.
    pub pinned_url: Option<String>,
    /// Its output is still on disk: the pinned URL works and a rollback to it is instant.
    pub kept: bool,
}

/// One page of the preview branch's history, newest first.
pub async fn list(
    agent: &Agent,
    project: &ProjectId,
    limit: usize,
    offset: usize,
) -> Result<Versions, RepoError> {
    agent.sync_repo(project).await?;
    let name = project.as_str();
    let repo = agent.repo_path(name);
    let mut out = Versions {
        project: name.to_owned(),
        branch: None,
        head: None,
        total: 0,
        limit,
        offset,
        versions: Vec::new(),
    };
    let Some((branch, head)) = preview_branch(&repo).await? else {
        return Ok(out);
    };
    let total = git(
        &repo,
        &["rev-list", "--count", "--end-of-options", &branch, "--"],
    )
    .await?;
    out.total = String::from_utf8_lossy(&total).trim().parse().unwrap_or(0);
    let raw = git(
        &repo,
        &[
            "log",
            "-z",
            "--format=%H%x00%P%x00%an%x00%ae%x00%at%x00%B",
            &format!("--skip={offset}"),
            &format!("--max-count={limit}"),
            "--end-of-options",
            &branch,
            "--",
        ],
    )
    .await?;
    let commits = parse_log(&raw)?;
    let changed = files_changed(&repo, &commits).await?;
    let status = agent.status(name);
    let dir = publish::project_dir(&agent.cfg.publish_dir, name);
    let served = served(agent, name, status.as_ref()).map(|(_, c)| c);
    out.versions = commits
        .into_iter()
        .map(|c| Version {
            files_changed: changed.get(&c.commit).copied().unwrap_or(0),
            build: build_of(agent, name, status.as_ref(), &c.commit, &dir),
            current: served.as_deref() == Some(c.commit.as_str()),
            commit: c.commit,
            message: c.message,
            message_truncated: c.message_truncated,
            author: c.author,
            time: c.time,
        })
        .collect();
    (out.branch, out.head) = (Some(branch), Some(head));
    Ok(out)
}

/// A commit as `git log` described it, before builds are attached.
struct LogEntry {
    commit: String,
    first_parent: Option<String>,
    author: Author,
    time: i64,
    message: String,
    message_truncated: bool,
}

/// Parses `git log -z --format=%H%x00%P%x00%an%x00%ae%x00%at%x00%B`: six NUL-terminated fields
/// per commit.
fn parse_log(raw: &[u8]) -> Result<Vec<LogEntry>, RepoError> {
    let bad = |what: &str| RepoError::Git {
        args: "log".into(),
        message: format!("unexpected output: {what}"),
    };
    let mut fields: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    // Every field is terminated, so the split leaves one empty piece after the last.
    if fields.pop().is_some_and(|last| !last.is_empty()) || fields.len() % 6 != 0 {
        return Err(bad("not six fields per commit"));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    fields
        .chunks_exact(6)
        .map(|f| {
            let commit = text(f[0]);
            if !is_hex(&commit) || commit.len() != 40 {
                return Err(bad("a commit id is not 40 hex digits"));
            }
            let first_parent = text(f[1]).split(' ').next().map(str::to_owned);
            let (message, message_truncated) = bounded(text(f[5]).trim_end(), MESSAGE_LIMIT);
            Ok(LogEntry {
                commit,
                first_parent: first_parent.filter(|p| !p.is_empty()),
                author: Author {
                    name: text(f[2]),
                    email: text(f[3]),
                },
                time: text(f[4])
                    .parse()
                    .map_err(|_| bad("an author time is not a number"))?,
                message,
                message_truncated,
            })
        })
        .collect()
}

fn bounded(s: &str, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s.to_owned(), false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_owned(), true)
}

/// How many paths each commit changed against its first parent, from one `git diff-tree
/// --stdin` for all of them. Its `-z --name-status` output is a commit id, then a one-letter
/// status and a path per change (renames are off, so there are no scores), so ids and statuses
/// cannot be confused with paths.
async fn files_changed(
    repo: &Path,
    commits: &[LogEntry],
) -> Result<HashMap<String, u64>, RepoError> {
    let mut input = String::new();
    for c in commits {
        input.push_str(&c.commit);
        if let Some(p) = &c.first_parent {
            input.push(' ');
            input.push_str(p);
        }
        input.push('\n');
    }
    let raw = run(
        repo,
        &[
            "diff-tree",
            "--stdin",
            "-r",
            "--root",
            "--no-renames",
            "-z",
            "--name-status",
        ],
        Some(input.into_bytes()),
    )
    .await
    .and_then(checked("diff-tree"))?;
    let mut counts = HashMap::new();
    let mut current: Option<String> = None;
    let mut tokens = raw.split(|b| *b == 0).filter(|t| !t.is_empty());
    while let Some(t) = tokens.next() {
        if t.len() == 40 && t.iter().all(u8::is_ascii_hexdigit) {
            let id = String::from_utf8_lossy(t).into_owned();
            counts.insert(id.clone(), 0);
            current = Some(id);
        } else if let Some(id) = &current {
            // A status; its path follows.
            tokens.next();
            *counts.entry(id.clone()).or_default() += 1;
        }
    }
    Ok(counts)
}

/// The newest build of `commit`, leaving out builds that found the commit already published
/// and published nothing.
fn build_of(
    agent: &Agent,
    project: &str,
    status: Option<&Status>,
    commit: &str,
    dir: &Path,
) -> Option<BuildRef> {
    let st = status?;
    if st.state.is_active() && st.commit.as_deref() == Some(commit) {
        return Some(BuildRef {
            id: st.build,
            state: st.state,
            duration_ms: None,
            finished_at_ms: None,
            pinned_url: None,
            kept: false,
        });
    }
    let published_nothing = |h: &BuildSummary| {
        h.state == State::Ready && h.pinned_url.is_none() && !publish::is_kept(dir, h.build)
    };
    let h = st
        .history
        .iter()
        .find(|h| h.commit.as_deref() == Some(commit) && !published_nothing(h))?;
    let kept = h.state == State::Ready && publish::is_kept(dir, h.build);
    Some(BuildRef {
        id: h.build,
        state: h.state,
        duration_ms: Some(h.duration_ms),
        finished_at_ms: Some(h.finished_at_ms),
        // Builds recorded before pinned URLs existed get theirs while they are kept.
        pinned_url: h
            .pinned_url
            .clone()
            .or_else(|| kept.then(|| agent.cfg.pinned_url_for(project, h.build))),
        kept,
    })
}

/// The build `current` points at and its commit.
pub(crate) fn served(
    agent: &Agent,
    project: &str,
    status: Option<&Status>,
) -> Option<(u64, String)> {
    let build = publish::current(&publish::project_dir(&agent.cfg.publish_dir, project))?;
    let st = status?;
    if let Some(g) = st.last_good.as_ref().filter(|g| g.build == build) {
        return Some((build, g.commit.clone()));
    }
    st.history
        .iter()
        .find(|h| h.build == build && h.state == State::Ready)
        .and_then(|h| Some((build, h.commit.clone()?)))
}

/// The head of the branch previews are built from, as a manifest's refs name it: the rule of
/// [`preview_branch`].
pub(crate) fn preview_head(refs: &BTreeMap<String, String>) -> Option<&str> {
    ["refs/heads/main", "refs/heads/master"]
        .iter()
        .find_map(|want| refs.get(*want))
        .or_else(|| {
            refs.iter()
                .find(|(r, _)| r.starts_with("refs/heads/"))
                .map(|(_, c)| c)
        })
        .map(String::as_str)
}

/// The branch previews are built from (`main`, else `master`, else the first branch) and its
/// head; None before the first push.
pub(crate) async fn preview_branch(repo: &Path) -> Result<Option<(String, String)>, RepoError> {
    if !repo.join("HEAD").exists() {
        return Ok(None);
    }
    let out = git(
        repo,
        &[
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            "refs/heads/",
        ],
    )
    .await?;
    let text = String::from_utf8_lossy(&out);
    let refs: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once(' ')).collect();
    Ok(["refs/heads/main", "refs/heads/master"]
        .iter()
        .find_map(|want| refs.iter().find(|(r, _)| r == want))
        .or(refs.first())
        .map(|(r, c)| (r.to_string(), c.to_string())))
}

/// The full id of commit `spec` (hex, possibly abbreviated), once it is found on one of the
/// project's branches. Synced first: the branches that count are the store's, not what this
/// machine saw last (a branch deleted since must not vouch for its commits).
pub(crate) async fn resolve_commit(
    agent: &Agent,
    project: &ProjectId,
    spec: &str,
) -> Result<String, RepoError> {
    let unknown = || RepoError::UnknownCommit {
        project: project.to_string(),
        commit: spec.to_owned(),
    };
    if !is_hex(spec) {
        return Err(unknown());
    }
    agent.sync_repo(project).await?;
    let repo = agent.repo_path(project.as_str());
    let commit = lookup(&repo, spec).await?.ok_or_else(unknown)?;
    if !on_branch(&repo, &commit).await? {
        return Err(RepoError::NotOnBranch {
            project: project.to_string(),
            commit,
        });
    }
    Ok(commit)
}

async fn lookup(repo: &Path, spec: &str) -> Result<Option<String>, RepoError> {
    if !repo.join("HEAD").exists() {
        return Ok(None);
    }
    let out = run(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &format!("{spec}^{{commit}}"),
        ],
        None,
    )
    .await?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((out.status.success() && id.len() == 40).then_some(id))
}

async fn on_branch(repo: &Path, commit: &str) -> Result<bool, RepoError> {
    let out = git(
        repo,
        &[
            "for-each-ref",
            "--count=1",
            "--contains",
            commit,
            "--format=%(refname)",
            "refs/heads/",
        ],
    )
    .await?;
    Ok(!out.trim_ascii().is_empty())
}

/// What an export without `commit=` exports: the commit the preview serves, else the preview
/// branch's head.
pub(crate) async fn default_export_commit(
    agent: &Agent,
    project: &ProjectId,
) -> Result<String, RepoError> {
    let name = project.as_str();
    if let Some((_, commit)) = served(agent, name, agent.status(name).as_ref()) {
        return Ok(commit);
    }
    agent.sync_repo(project).await?;
    preview_branch(&agent.repo_path(name))
        .await?
        .map(|(_, c)| c)
        .ok_or_else(|| RepoError::NoBranch(name.to_owned()))
}

/// `git archive --format=<format> <commit>`, streamed as git writes it: the same bytes as that
/// command gives anywhere with the same git, since no configuration is read. An error after the
/// first bytes ends the stream with an error, so the client sees a broken download rather than
/// a short archive.
pub(crate) fn archive(
    repo: &Path,
    commit: &str,
    format: &str,
) -> std::io::Result<impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static> {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("--git-dir").arg(repo).args([
        "archive",
        &format!("--format={format}"),
        "--end-of-options",
        commit,
    ]);
    hermetic(&mut cmd);
    // A client that goes away drops the stream, and with it git.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let commit = commit.to_owned();
    let end = futures::stream::once(async move {
        let mut err = Vec::new();
        let _ = stderr.read_to_end(&mut err).await;
        match child.wait().await {
            Ok(s) if s.success() => None,
            Ok(s) => {
                let message = String::from_utf8_lossy(&err).trim().to_owned();
                log::error!(commit, exit:% = s, error = message; "git archive failed");
                Some(Err(std::io::Error::other(format!(
                    "git archive: {message}"
                ))))
            }
            Err(e) => Some(Err(e)),
        }
    })
    .filter_map(futures::future::ready);
    Ok(tokio_util::io::ReaderStream::new(stdout).chain(end))
}

/// The commit's files as the JSON `FileSystemTree` that `@webcontainer/api`'s `mount()` takes:
/// `{"src": {"directory": {"main.ts": {"file": {"contents": "..."}}}}}`. Text (valid UTF-8) is
/// a string; other files are `{"file": {"contents": "<base64>", "encoding": "base64"}}`, which
/// the client turns into a `Uint8Array` before mounting; symlinks are
/// `{"file": {"symlink": "<target>"}}`. The executable bit has no place in the format and is
/// dropped.
pub fn webcontainer(repo: &Path, commit: &str, limit: u64) -> Result<Vec<u8>, ExportError> {
    let objects_err = |message: String| ExportError::Objects {
        commit: commit.to_owned(),
        message,
    };
    let objects = gix::odb::at(repo.join("objects"), gix::hash::Kind::Sha1)
        .map_err(|e| objects_err(e.to_string()))?;
    let tree = crate::pipeline::commit_tree(&objects, commit).map_err(objects_err)?;
    let files = crate::checkout::flatten(&objects, tree)?;
    let mut root: BTreeMap<String, Node> = BTreeMap::new();
    let mut total = 0u64;
    let mut buf = Vec::new();
    for (path, (oid, kind)) in &files {
        let data = objects
            .try_find(oid, &mut buf)
            .map_err(|e| objects_err(e.to_string()))?
            .ok_or_else(|| objects_err(format!("{path}: blob {oid} is missing")))?
            .data;
        total += data.len() as u64;
        if total > limit {
            return Err(ExportError::TooLarge {
                commit: commit.to_owned(),
                limit,
            });
        }
        let node = match (kind, std::str::from_utf8(data)) {
            (Kind::Link, _) => Node::Link(String::from_utf8_lossy(data).into_owned()),
            (_, Ok(text)) => Node::Text(text.to_owned()),
            (_, Err(_)) => Node::Binary(base64(data)),
        };
        insert(&mut root, path, node).map_err(objects_err)?;
    }
    Ok(serde_json::to_vec(&root).expect("serializes"))
}

enum Node {
    Dir(BTreeMap<String, Node>),
    Text(String),
    /// Base64 of the bytes.
    Binary(String),
    Link(String),
}

#[derive(Serialize)]
struct FileNode<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    contents: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    symlink: Option<&'a str>,
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        let file = |contents, encoding, symlink| FileNode {
            contents,
            encoding,
            symlink,
        };
        match self {
            Node::Dir(entries) => m.serialize_entry("directory", entries)?,
            Node::Text(t) => m.serialize_entry("file", &file(Some(t), None, None))?,
            Node::Binary(b) => m.serialize_entry("file", &file(Some(b), Some("base64"), None))?,
            Node::Link(l) => m.serialize_entry("file", &file(None, None, Some(l)))?,
        }
        m.end()
    }
}

fn insert(root: &mut BTreeMap<String, Node>, path: &str, node: Node) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('/').collect();
    let leaf = parts.pop().unwrap_or_default();
    let mut dir = root;
    for part in parts {
        match dir
            .entry(part.to_owned())
            .or_insert_with(|| Node::Dir(BTreeMap::new()))
        {
            Node::Dir(d) => dir = d,
            _ => return Err(format!("{path}: a parent directory is also a file")),
        }
    }
    if dir.insert(leaf.to_owned(), node).is_some() {
        return Err(format!("{path}: named twice in the tree"));
    }
    Ok(())
}

/// Standard base64 with padding (RFC 4648), as `atob` and `Buffer.from(s, "base64")` read it.
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub(crate) fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// No system or user git configuration: what the agent lists and exports must not depend on the
/// machine's `~/.gitconfig` (a `tar.tar.gz.command` there would change every archive).
fn hermetic(cmd: &mut tokio::process::Command) {
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("LC_ALL", "C");
}

async fn run(
    repo: &Path,
    args: &[&str],
    input: Option<Vec<u8>>,
) -> Result<std::process::Output, RepoError> {
    use tokio::io::AsyncWriteExt;
    let fail = |message: String| RepoError::Git {
        args: args.join(" "),
        message,
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("--git-dir").arg(repo).args(args);
    hermetic(&mut cmd);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run git: {e}")))?;
    if let Some(bytes) = input {
        // Written beside the read: git answers as it reads, and a full stdout pipe would stop it.
        let mut stdin = child.stdin.take().expect("piped stdin");
        tokio::spawn(async move {
            let _ = stdin.write_all(&bytes).await;
        });
    }
    child
        .wait_with_output()
        .await
        .map_err(|e| fail(e.to_string()))
}

fn checked(what: &str) -> impl FnOnce(std::process::Output) -> Result<Vec<u8>, RepoError> + '_ {
    move |out| {
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(RepoError::Git {
                args: what.to_owned(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

async fn git(repo: &Path, args: &[&str]) -> Result<Vec<u8>, RepoError> {
    run(repo, args, None).await.and_then(checked(args[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn parses_log_records_whatever_the_message_holds() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let raw = format!(
            "{a}\0{b}\0Ann\0ann@x\x001700000000\0subject\n\nbody with \x1e and newline\n\0{b}\0\0Bob\0b@x\x001600000000\0\0"
        );
        let log = parse_log(raw.as_bytes()).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].first_parent.as_deref(), Some(b.as_str()));
        assert_eq!(log[0].message, "subject\n\nbody with \x1e and newline");
        assert_eq!(log[0].time, 1_700_000_000);
        assert_eq!(log[1].first_parent, None);
        assert_eq!(log[1].message, "");
        assert!(parse_log(b"nothex\0\0a\0b\x001\0m\0").is_err());
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let (m, cut) = bounded(&"é".repeat(3000), MESSAGE_LIMIT);
        assert!(cut && m.len() <= MESSAGE_LIMIT && m.chars().all(|c| c == 'é'));
        assert_eq!(bounded("short", MESSAGE_LIMIT), ("short".to_owned(), false));
    }

    #[test]
    fn trees_nest_into_directories() {
        let mut root = BTreeMap::new();
        insert(&mut root, "src/main.ts", Node::Text("x".into())).unwrap();
        insert(&mut root, "src/logo.png", Node::Binary(base64(&[0, 1]))).unwrap();
        insert(&mut root, "link", Node::Link("src/main.ts".into())).unwrap();
        assert!(insert(&mut root, "link/x", Node::Text(String::new())).is_err());
        assert_eq!(
            serde_json::to_value(&root).unwrap(),
            serde_json::json!({
                "link": {"file": {"symlink": "src/main.ts"}},
                "src": {"directory": {
                    "logo.png": {"file": {"contents": "AAE=", "encoding": "base64"}},
                    "main.ts": {"file": {"contents": "x"}},
                }},
            })
        );
    }
}
