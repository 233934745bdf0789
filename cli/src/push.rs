//! `kiln push <dir> <project>`: a directory of files becomes the next version of a project, for
//! generators that do not speak git.
//!
//! The stock `git` CLI does the work in a throwaway `GIT_DIR` whose work tree is the directory:
//! fetch the current `main` (one commit deep) so the new commit's parent is it, `git add -A` (the
//! directory's `.gitignore` applies; `node_modules` and nested repositories never go in), write
//! the tree and the commit, push it to `main`. The token reaches git through `GIT_CONFIG_*`
//! environment variables as an `http.extraHeader`, never through arguments or the URL, which
//! every user can read in `ps`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::builds::{self, Target};
use crate::client::Remote;
use crate::output::{self, Output, Style};

/// The branch previews are built from.
const BRANCH: &str = "refs/heads/main";

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Directory holding the app's files.
    pub(crate) dir: PathBuf,
    /// Project id (created by its first push).
    pub(crate) project: String,
    /// Commit message.
    #[arg(short, long, default_value = "Update from kiln push")]
    pub(crate) message: String,
    /// Wait for the agent to build the new version; exit 1 unless it is ready.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 900, value_name = "SECS")]
    pub(crate) timeout: u64,
}

pub(crate) async fn run(
    git_api: &Remote,
    agent: Option<&Remote>,
    token: &str,
    out: &Output,
    a: Args,
) -> anyhow::Result<()> {
    let project = builds::project_id(&a.project)?;
    let dir = checked_dir(&a.dir)?;
    let base = &git_api.endpoint.url;
    if base.contains('@') {
        bail!(
            "{} ({base}) must not contain credentials: put the token in KILN_TOKEN",
            git_api.endpoint.var
        );
    }
    let remote = format!("{base}/git/{project}.git");
    let scratch = tempfile::Builder::new()
        .prefix("kiln-push-")
        .tempdir()
        .context("creating a temporary directory")?;
    let git = Git {
        git_dir: scratch.path().join("repo.git"),
        work_tree: dir.clone(),
        auth: format!("Authorization: Bearer {token}"),
    };
    git.init()?;
    std::fs::write(git.git_dir.join("info/exclude"), "node_modules/\n")
        .context("writing the exclude file")?;

    git.run(
        &[
            "-c",
            "advice.addEmbeddedRepo=false",
            "add",
            "-A",
            "--",
            ".",
            ":(exclude,glob)**/node_modules/**",
        ],
        false,
    )?;
    // A nested repository would go in as a submodule link, which gitstore refuses.
    let staged = git.run(&["ls-files", "-s", "-z"], false)?;
    let mut files = 0usize;
    for entry in staged.split('\0').filter(|e| !e.is_empty()) {
        let (meta, path) = entry.split_once('\t').unwrap_or((entry, ""));
        if meta.starts_with("160000 ") {
            git.run(&["update-index", "--force-remove", "--", path], false)?;
            eprintln!("warning: skipped {path}/: it is a git repository of its own");
        } else {
            files += 1;
        }
    }
    if files == 0 {
        bail!(
            "nothing to push: {} has no files once node_modules, nested repositories and what its \
             .gitignore lists are left out",
            dir.display()
        );
    }
    let tree = git.run(&["write-tree"], false)?;
    // The API checks the token with a clear answer (git would only say "Authentication failed")
    // and tells whether there is a main to build on. Local problems were reported before this.
    let parent = match git_api.get(&format!("/api/projects/{project}")).await {
        Ok(info) => info["refs"][BRANCH].as_str().map(str::to_owned),
        // New, or another client's: the push creates it, or git reports whose it is.
        Err(e) if e.status() == Some(404) => None,
        Err(e) => return Err(e.into()),
    };
    let parent = match parent {
        Some(expected) => {
            let spinner = out.spinner(format!("fetching {project}'s main"));
            let fetched = git.run(
                &["fetch", "-q", "--no-tags", "--depth=1", &remote, BRANCH],
                true,
            );
            spinner.finish_and_clear();
            fetched.context("fetching the current main to build on")?;
            let head = git.run(&["rev-parse", "FETCH_HEAD"], false)?;
            if head != expected {
                log_note(
                    out,
                    &format!("main moved to {} meanwhile", output::short(&head)),
                );
            }
            Some(head)
        }
        None => None,
    };

    if let Some(p) = &parent {
        if git.run(&["rev-parse", &format!("{p}^{{tree}}")], false)? == tree {
            return finish(
                out,
                agent,
                &project,
                PushResult {
                    commit: p.clone(),
                    // Only main's own commit was fetched; its parent is not known here.
                    parent: None,
                    files,
                    unchanged: true,
                },
                &a,
            )
            .await;
        }
    }
    let mut commit_args = vec!["commit-tree", tree.as_str(), "-m", a.message.as_str()];
    if let Some(p) = &parent {
        commit_args.extend(["-p", p.as_str()]);
    }
    let commit = git.run(&commit_args, false)?;
    git.push(out, &remote, &format!("{commit}:{BRANCH}"))?;
    finish(
        out,
        agent,
        &project,
        PushResult {
            commit,
            parent,
            files,
            unchanged: false,
        },
        &a,
    )
    .await
}

struct PushResult {
    commit: String,
    parent: Option<String>,
    files: usize,
    /// The files equal the current main: nothing was pushed.
    unchanged: bool,
}

async fn finish(
    out: &Output,
    agent: Option<&Remote>,
    project: &gitstore::ProjectId,
    r: PushResult,
    a: &Args,
) -> anyhow::Result<()> {
    let fields = json!({
        "project": project,
        "commit": r.commit,
        "parent": r.parent,
        "files": r.files,
        "unchanged": r.unchanged,
    });
    if !out.json {
        if r.unchanged {
            say!(
                "{project} unchanged: main is already {} with these {} files",
                output::short(&r.commit),
                r.files
            );
        } else {
            say!(
                "{} pushed {project} {} ({} files, parent {})",
                out.paint(Style::Good, "✓"),
                r.commit,
                r.files,
                r.parent.as_deref().map(output::short).unwrap_or("none")
            );
        }
    }
    let Some(agent) = agent.filter(|_| a.wait) else {
        if out.json {
            out.print_json(&fields);
        }
        return Ok(());
    };
    let st = builds::wait(
        agent,
        out,
        project.as_str(),
        Target::Commit(r.commit.clone()),
        Duration::from_secs(a.timeout),
    )
    .await?;
    let extra = match fields {
        Value::Object(mut m) => {
            m.remove("project");
            m.remove("commit");
            Some(m)
        }
        _ => None,
    };
    builds::report_settled(out, &st, extra)
}

fn log_note(out: &Output, msg: &str) {
    if !out.json {
        eprintln!("{}", out.paint(Style::Dim, msg));
    }
}

/// The directory, refused with the reason when it cannot be pushed.
fn checked_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot push {}: {}",
            dir.display(),
            if e.kind() == std::io::ErrorKind::NotFound {
                "no such directory".to_owned()
            } else {
                e.to_string()
            }
        )
    })?;
    if !meta.is_dir() {
        bail!("cannot push {}: not a directory", dir.display());
    }
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_name() != ".git");
    if entries.next().is_none() {
        bail!("cannot push {}: the directory is empty", dir.display());
    }
    dir.canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))
}

/// git, run against the scratch repository and the pushed directory, isolated from the user's
/// git configuration and repository variables.
struct Git {
    git_dir: PathBuf,
    work_tree: PathBuf,
    /// The `http.extraHeader` value, given only to commands that talk to gitstore.
    auth: String,
}

/// Variables a user may set that still make sense here: who commits, and TLS trust.
const KEEP_GIT_VARS: [&str; 8] = [
    "GIT_AUTHOR_NAME",
    "GIT_AUTHOR_EMAIL",
    "GIT_AUTHOR_DATE",
    "GIT_COMMITTER_NAME",
    "GIT_COMMITTER_EMAIL",
    "GIT_COMMITTER_DATE",
    "GIT_SSL_CAINFO",
    "GIT_SSL_CAPATH",
];

impl Git {
    fn command(&self, args: &[&str], network: bool) -> Command {
        let mut cmd = Command::new("git");
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if (k.starts_with("GIT_") && !KEEP_GIT_VARS.contains(&k.as_ref())) || k == "SSH_ASKPASS"
            {
                cmd.env_remove(k.as_ref());
            }
        }
        for (k, default) in [
            ("GIT_AUTHOR_NAME", "kiln"),
            ("GIT_AUTHOR_EMAIL", "kiln@localhost"),
            ("GIT_COMMITTER_NAME", "kiln"),
            ("GIT_COMMITTER_EMAIL", "kiln@localhost"),
        ] {
            if std::env::var_os(k).is_none() {
                cmd.env(k, default);
            }
        }
        cmd.env("GIT_DIR", &self.git_dir)
            .env("GIT_WORK_TREE", &self.work_tree)
            // A user's global config could sign commits, run hooks or rewrite URLs.
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .current_dir(&self.work_tree)
            .args(args);
        if network {
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", &self.auth);
        }
        cmd
    }

    /// Creates the scratch repository (git refuses `GIT_WORK_TREE` while initializing).
    fn init(&self) -> anyhow::Result<()> {
        let out = self
            .command(&["init", "-q", "--bare"], false)
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .arg(&self.git_dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| git_missing(&e))?;
        if !out.status.success() {
            bail!(
                "git init failed:\n{}",
                explain(&String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(())
    }

    /// Runs git to completion; its trimmed stdout, or an error with what git said.
    fn run(&self, args: &[&str], network: bool) -> anyhow::Result<String> {
        let out = self
            .command(args, network)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| git_missing(&e))?;
        if !out.status.success() {
            bail!(
                "git {} failed:\n{}",
                args.first().copied().unwrap_or_default(),
                explain(&String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `git push`, with git's upload progress as a bar on a terminal.
    fn push(&self, out: &Output, remote: &str, refspec: &str) -> anyhow::Result<()> {
        let mut child = self
            .command(
                &["push", "--progress", "--no-verify", remote, refspec],
                true,
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| git_missing(&e))?;
        let mut stderr = child.stderr.take().expect("piped");
        let bar = out.bar(0);
        let mut all = Vec::new();
        let mut line = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    show_progress(&bar, &String::from_utf8_lossy(&line));
                    all.append(&mut line);
                    all.push(b'\n');
                } else {
                    line.push(b);
                }
            }
        }
        all.extend_from_slice(&line);
        bar.finish_and_clear();
        let status = child.wait().context("waiting for git push")?;
        if !status.success() {
            let said = String::from_utf8_lossy(&all);
            let mut msg = format!("git push to {remote} failed:\n{}", explain(&said));
            if said.contains("fetch first") || said.contains("non-fast-forward") {
                msg.push_str("\nmain moved on gitstore while this push ran: run kiln push again");
            }
            bail!(msg);
        }
        Ok(())
    }
}

/// Moves the bar to what a git progress line says, e.g.
/// `Writing objects:  40% (2/5), 1.20 MiB | 2.00 MiB/s`.
fn show_progress(bar: &indicatif::ProgressBar, line: &str) {
    let Some((phase, rest)) = line.split_once(':') else {
        return;
    };
    let Some((counts, tail)) = rest.split_once('(').and_then(|(_, r)| r.split_once(')')) else {
        return;
    };
    let Some((done, total)) = counts.split_once('/') else {
        return;
    };
    let (Ok(done), Ok(total)) = (done.trim().parse::<u64>(), total.trim().parse::<u64>()) else {
        return;
    };
    bar.set_prefix(phase.trim().to_owned());
    bar.set_length(total);
    bar.set_position(done);
    let detail = tail
        .trim_start_matches(',')
        .trim()
        .trim_end_matches(", done.");
    bar.set_message(detail.to_owned());
}

/// What git said, minus its progress lines.
fn explain(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            !(l.contains("objects:") || l.starts_with("Total ") || l.starts_with("To "))
                || l.starts_with("remote:")
        })
        .collect();
    let lines = if lines.is_empty() {
        vec!["(git printed nothing)"]
    } else {
        lines
    };
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn git_missing(e: &std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!("`git` is not on PATH; install it (apt-get install git)")
    } else {
        anyhow::anyhow!("cannot run git: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_progress_lines_move_the_bar() {
        let bar = indicatif::ProgressBar::hidden();
        show_progress(&bar, "Writing objects:  40% (2/5), 1.20 MiB | 2.00 MiB/s");
        assert_eq!((bar.position(), bar.length()), (2, Some(5)));
        assert_eq!(bar.prefix(), "Writing objects");
        assert_eq!(bar.message(), "1.20 MiB | 2.00 MiB/s");
        show_progress(&bar, "remote: project x belongs to another client");
        assert_eq!(bar.position(), 2);
    }

    #[test]
    fn git_errors_keep_what_the_server_said() {
        let said = "Enumerating objects: 5, done.\nWriting objects: 100% (5/5), done.\nremote: project x belongs to another client\nfatal: unable to access 'http://h/git/x.git/': The requested URL returned error: 403\n";
        let shown = explain(said);
        assert!(shown.contains("remote: project x belongs to another client"));
        assert!(shown.contains("fatal: unable to access"));
        assert!(!shown.contains("Writing objects"));
    }
}
