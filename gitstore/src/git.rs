//! Running the `git` executable: receive-pack, upload-pack and a few plumbing commands whose
//! on-disk effects must be exactly git's own (ref transactions, repository layout).

use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
#[error("`git {args}` failed: {detail}")]
pub struct GitError {
    args: String,
    detail: String,
}

/// A `git` command with the environment cleared of variables that would point it elsewhere.
pub(crate) fn command(repo: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("git");
    for var in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_QUARANTINE_PATH",
        "GIT_INDEX_FILE",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .arg("-C")
        .arg(repo)
        .kill_on_drop(true);
    cmd
}

/// Runs a git command to completion, feeding `input`, and returns its stdout.
pub(crate) async fn run(repo: &Path, args: &[&str], input: &[u8]) -> Result<Vec<u8>, GitError> {
    let mut cmd = command(repo);
    cmd.args(args);
    run_command(cmd, args, input).await
}

/// Runs `cmd` (made by [`command`], `args` already on it) to completion, feeding `input`, and
/// returns its stdout; `args` names the command in errors.
pub(crate) async fn run_command(
    mut cmd: tokio::process::Command,
    args: &[&str],
    input: &[u8],
) -> Result<Vec<u8>, GitError> {
    let fail = |detail: String| GitError {
        args: args.join(" "),
        detail,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot start git: {e} (install it: apt-get install git)"
            ))
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let _ = writer.await;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Creates a bare repository at `dir` unless one is there.
pub(crate) async fn init_bare(dir: &Path) -> Result<(), GitError> {
    if dir.join("HEAD").is_file() && dir.join("objects").is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|e| GitError {
            args: "init".into(),
            detail: format!("cannot create {}: {e}", parent.display()),
        })?;
    let d = dir.to_string_lossy();
    run(parent, &["init", "--bare", "-q", "-b", "main", &d], b"").await?;
    Ok(())
}

/// Local refs (`refs/...` name → hex id).
pub(crate) async fn refs(repo: &Path) -> Result<Vec<(String, String)>, GitError> {
    let out = run(
        repo,
        &["for-each-ref", "--format=%(objectname) %(refname)"],
        b"",
    )
    .await?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| {
            let (id, name) = l.split_once(' ')?;
            Some((name.to_owned(), id.to_owned()))
        })
        .collect())
}
