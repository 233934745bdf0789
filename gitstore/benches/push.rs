//! Push benchmark (issue 3): `git push` to Kiln's gitstore against plain `git http-backend`.
//!
//! Run with `cargo bench -p kiln-gitstore --bench push` (or `make bench`). Cargo builds the
//! `kiln-gitstore` binary in the bench profile first and hands its path over as
//! `CARGO_BIN_EXE_kiln-gitstore`. Everything is real: stock `git`, a `kiln-gitstore serve` process
//! on a `file://` store, and a plain `git http-backend` behind a small CGI bridge written here,
//! all on free 127.0.0.1 ports. Nothing touches the network.
//!
//! The run, in order:
//! 1. generate a deterministic ~40-file Vite + React + TypeScript app in a temp git repository;
//! 2. start gitstore (compaction disabled, so a background compaction never lands inside a timed
//!    push) and the `git http-backend` baseline, both behind HTTP Basic auth;
//! 3. push the whole app to both, then 15 commits that each change one file, one by one,
//!    alternating which server goes first; time each `git push` process;
//! 4. record the bytes each one-file push wrote to Kiln's store (pack, index, manifest) and the
//!    bytes the baseline received, against a tar.gz of the whole tree (what a naive "upload the
//!    app" would send);
//! 5. sync the project into a fresh bare repository with `kiln-gitstore sync`, then push five more
//!    one-file commits, syncing after each, and compare the bytes sync fetched with the new pack,
//!    index and manifest;
//! 6. print a table of medians and ratios, each against its goal.
//!
//! It exits non-zero only when something fails (a push, a sync, a server); a missed goal is
//! reported as "goal missed" in the table.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::Engine;
use gitstore::manifest::Manifest;

const KILN_BIN: &str = env!("CARGO_BIN_EXE_kiln-gitstore");
const PROJECT: &str = "bench-app";
const ONE_FILE_PUSHES: usize = 15;
const SYNC_ROUNDS: usize = 5;
/// Goal: a one-file push to Kiln takes at most this many times as long as one to plain git.
const PUSH_GOAL: f64 = 1.2;
/// Goal: an incremental sync fetches at most this many times the new pack, index and manifest.
const SYNC_GOAL: f64 = 2.0;
/// Any single command (a push, a sync) that runs longer than this is killed and fails the run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const WEBHOOK_SECRET: &str = "kiln-bench-webhook-secret-0123456789";

fn main() -> ExitCode {
    // `cargo bench` passes `--bench` (and any filter); this benchmark has a single scenario.
    match run_benchmark() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_benchmark() -> anyhow::Result<()> {
    let started = Instant::now();
    let git_version = run(Command::new("git").arg("--version"), "git --version")
        .context("the push benchmark needs `git` on PATH (apt-get install -y git)")?
        .stdout_text();
    let tmp = tempfile::Builder::new()
        .prefix("kiln-bench-push-")
        .tempdir()
        .context("creating a temp dir")?;

    // 1. The fixture.
    let mut app = Repo::init(&tmp.path().join("app"))?;
    let files = app_files();
    let source_bytes: usize = files.iter().map(|(_, c)| c.len()).sum();
    for (rel, content) in &files {
        app.write(rel, content)?;
    }
    app.commit("scaffold Vite + React + TypeScript app")?;

    // 2. The servers.
    let kiln = Kiln::start(&tmp.path().join("kiln"))?;
    let token = kiln.create_client("bench")?;
    let kiln_url = kiln.git_url(&token);
    let baseline = Baseline::start(&tmp.path().join("baseline"))?;
    let base_url = baseline.git_url();

    // 3. First push of the whole app.
    let mut kiln_seen = Vec::new();
    let kiln_first = app.push(&kiln_url, "kiln", &kiln)?;
    let first_store = kiln.new_store_bytes(&mut kiln_seen)?;
    let received_before = baseline.received();
    let base_first = app.push(&base_url, "git http-backend", &kiln)?;
    let base_first_wire = baseline.received() - received_before;

    // 3. One-file pushes, each timed on both servers; 4. their bytes.
    let mut kiln_ms = Vec::new();
    let mut base_ms = Vec::new();
    let mut kiln_store_bytes = Vec::new();
    let mut kiln_pack_bytes = Vec::new();
    let mut kiln_idx_bytes = Vec::new();
    let mut kiln_manifest_bytes = Vec::new();
    let mut base_wire_bytes = Vec::new();
    let mut tgz_bytes = Vec::new();
    for i in 0..ONE_FILE_PUSHES {
        app.edit_one_file(i)?;
        tgz_bytes.push(app.tar_gz_size()? as f64);
        let received_before = baseline.received();
        let (k, b) = if i % 2 == 0 {
            let k = app.push(&kiln_url, "kiln", &kiln)?;
            (k, app.push(&base_url, "git http-backend", &kiln)?)
        } else {
            let b = app.push(&base_url, "git http-backend", &kiln)?;
            (app.push(&kiln_url, "kiln", &kiln)?, b)
        };
        kiln_ms.push(ms(k));
        base_ms.push(ms(b));
        base_wire_bytes.push((baseline.received() - received_before) as f64);
        let stored = kiln.new_store_bytes(&mut kiln_seen)?;
        kiln_store_bytes.push(stored.total() as f64);
        kiln_pack_bytes.push(stored.pack as f64);
        kiln_idx_bytes.push(stored.idx as f64);
        kiln_manifest_bytes.push(stored.manifest as f64);
    }
    let head = app.head()?;
    for (url, who) in [(&kiln_url, "kiln"), (&base_url, "git http-backend")] {
        let remote = app.git(&["ls-remote", url, "refs/heads/main"])?;
        ensure!(
            remote.starts_with(&head),
            "{who} has main at {remote:?} after the pushes, expected {head}"
        );
    }

    // 5. Sync: a full sync first, then one-file changes each followed by an incremental sync.
    let synced = tmp.path().join("synced.git");
    let full_sync = kiln.sync(&synced)?;
    ensure!(
        full_sync.report.refs_changed > 0,
        "the first sync changed no refs: {:?}",
        full_sync.report
    );
    let mut sync_ratio = Vec::new();
    let mut sync_fetched = Vec::new();
    let mut sync_expected = Vec::new();
    let mut sync_ms = Vec::new();
    for r in 0..SYNC_ROUNDS {
        app.edit_one_file(ONE_FILE_PUSHES + r)?;
        app.push(&kiln_url, "kiln", &kiln)?;
        let stored = kiln.new_store_bytes(&mut kiln_seen)?;
        let s = kiln.sync(&synced)?;
        let got = app.git(&["--git-dir", &synced.to_string_lossy(), "rev-parse", "main"])?;
        ensure!(
            got == app.head()?,
            "after sync the synced repository has main at {got}, expected {}",
            app.head()?
        );
        let fetched = s.report.bytes_fetched + s.report.manifest_bytes;
        sync_fetched.push(fetched as f64);
        sync_expected.push(stored.total() as f64);
        sync_ratio.push(fetched as f64 / stored.total() as f64);
        sync_ms.push(ms(s.elapsed));
    }

    // 6. The table. Pushes to the two servers run back to back, so the ratio within each pair is
    // less exposed to load drifting over the run than the ratio of the two medians.
    let paired: Vec<f64> = kiln_ms.iter().zip(&base_ms).map(|(k, b)| k / b).collect();
    let t = Table {
        title: format!(
            "Kiln push benchmark (issue 3): {} files, {} of source, {}; {} one-file pushes per server",
            files.len(),
            bytes(source_bytes as f64),
            git_version,
            ONE_FILE_PUSHES
        ),
        rows: vec![
            Row::info(
                "push whole app (first push)",
                millis(ms(kiln_first)),
                millis(ms(base_first)),
                ms(kiln_first) / ms(base_first),
            ),
            Row::goal(
                "one-file push, median",
                millis(median(&kiln_ms)),
                millis(median(&base_ms)),
                median(&kiln_ms) / median(&base_ms),
                PUSH_GOAL,
            ),
            Row::goal(
                "one-file push, p90",
                millis(p90(&kiln_ms)),
                millis(p90(&base_ms)),
                p90(&kiln_ms) / p90(&base_ms),
                PUSH_GOAL,
            ),
            Row::info(
                "  median of paired ratios",
                String::new(),
                String::new(),
                median(&paired),
            ),
            Row::goal(
                "bytes per one-file push vs tar.gz",
                bytes(median(&kiln_store_bytes)),
                format!("{} tgz", bytes(median(&tgz_bytes))),
                median(&kiln_store_bytes) / median(&tgz_bytes),
                1.0,
            ),
            Row::text(
                "  store: pack / idx / manifest",
                String::new(),
                format!(
                    "{:.0} / {:.0} / {:.0} B",
                    median(&kiln_pack_bytes),
                    median(&kiln_idx_bytes),
                    median(&kiln_manifest_bytes)
                ),
            ),
            Row::info(
                "  pack only vs http-backend wire",
                bytes(median(&kiln_pack_bytes)),
                bytes(median(&base_wire_bytes)),
                median(&kiln_pack_bytes) / median(&base_wire_bytes),
            ),
            Row::info(
                "  first push: store vs wire",
                bytes(first_store.total() as f64),
                bytes(base_first_wire as f64),
                first_store.total() as f64 / base_first_wire as f64,
            ),
            Row::goal(
                "sync bytes, one-file change",
                bytes(median(&sync_fetched)),
                format!("{} new", bytes(median(&sync_expected))),
                max(&sync_ratio),
                SYNC_GOAL,
            ),
            Row::text(
                "  sync time, one-file change",
                millis(median(&sync_ms)),
                format!(
                    "full sync {}",
                    bytes((full_sync.report.bytes_fetched + full_sync.report.manifest_bytes) as f64)
                ),
            ),
        ],
    };
    print!("{}", t.render());
    println!();
    println!("kiln one-file pushes (ms):     {}", list(&kiln_ms));
    println!("baseline one-file pushes (ms): {}", list(&base_ms));
    println!("paired ratios (kiln / baseline):  {}", ratios(&paired));
    println!(
        "sync ratios (fetched / new pack+idx+manifest): {}",
        ratios(&sync_ratio)
    );
    println!("notes:");
    for note in [
        "baseline: stock `git http-backend` (default config) behind this bench's CGI bridge, with \
         the same HTTP Basic 401 round trip as Kiln; kiln: compaction off during the run",
        "kiln bytes: pack + idx + manifest written to the store per push; wire: request bodies \
         of the baseline's git-receive-pack POSTs",
        &format!(
            "p90 is nearest-rank over {ONE_FILE_PUSHES} samples; the sync row shows medians and \
             the worst ratio of {SYNC_ROUNDS} rounds"
        ),
        &format!("run took {:.1?}", started.elapsed()),
    ] {
        println!("  - {note}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A finished command: its output and its wall time, from spawn to exit.
struct Ran {
    ok: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    elapsed: Duration,
}

impl Ran {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_owned()
    }
}

/// Runs `cmd` to completion with stdin closed, timing it; kills it after [`COMMAND_TIMEOUT`].
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<Ran> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send((out, Instant::now()));
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok((Ok(out), ended)) => Ok(Ran {
            ok: out.status.success(),
            stdout: out.stdout,
            stderr: out.stderr,
            elapsed: ended - started,
        }),
        Ok((Err(e), _)) => Err(e).with_context(|| format!("waiting for {what}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            bail!("{what} ran longer than {COMMAND_TIMEOUT:?}; killed")
        }
    }
}

/// Clears variables that would make a child read the developer's configuration (git's global and
/// system config, Kiln's settings) instead of the benchmark's.
fn hermetic(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("KILN_") || k.starts_with("GIT_") {
            cmd.env_remove(&*k);
        }
    }
    cmd.env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// The app repository
// ---------------------------------------------------------------------------------------------

/// The working repository the benchmark commits to and pushes from.
struct Repo {
    path: PathBuf,
    commits: u64,
}

impl Repo {
    fn init(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let r = Self {
            path: path.to_owned(),
            commits: 0,
        };
        r.git(&["init", "-q", "-b", "main"])?;
        Ok(r)
    }

    fn command(&self) -> Command {
        // Fixed identity and dates: the same fixture gives the same commit ids on every run.
        let date = format!("{} +0000", 1_700_000_000 + 60 * self.commits);
        let mut cmd = Command::new("git");
        hermetic(&mut cmd)
            .arg("-C")
            .arg(&self.path)
            .env("GIT_AUTHOR_NAME", "Kiln Bench")
            .env("GIT_AUTHOR_EMAIL", "bench@kiln.invalid")
            .env("GIT_COMMITTER_NAME", "Kiln Bench")
            .env("GIT_COMMITTER_EMAIL", "bench@kiln.invalid")
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date);
        cmd
    }

    /// Runs git here and returns its trimmed stdout; fails with git's stderr.
    fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(self.command().args(args), &format!("git {args:?}"))?;
        ensure!(
            out.ok,
            "git {args:?} in {} failed:\n{}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout_text())
    }

    fn write(&self, rel: &str, content: &str) -> anyhow::Result<()> {
        let p = self.path.join(rel);
        std::fs::create_dir_all(p.parent().expect("a file has a parent"))
            .with_context(|| format!("creating the parent of {}", p.display()))?;
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))
    }

    fn commit(&mut self, message: &str) -> anyhow::Result<()> {
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "-m", message])?;
        self.commits += 1;
        Ok(())
    }

    fn head(&self) -> anyhow::Result<String> {
        self.git(&["rev-parse", "HEAD"])
    }

    /// Commit `n` of the edit series: one label added to one component, as a generator's
    /// "change the copy of this button" would.
    fn edit_one_file(&mut self, n: usize) -> anyhow::Result<()> {
        let name = COMPONENTS[n % COMPONENTS.len()].0;
        let rel = format!("src/components/{name}.tsx");
        let path = self.path.join(&rel);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let anchor = "const LABELS = {\n";
        let at = text
            .find(anchor)
            .with_context(|| format!("{rel} has no LABELS block"))?
            + anchor.len();
        let mut edited = text;
        edited.insert_str(
            at,
            &format!("  revision{n}: 'Revision {n} of the {name} copy',\n"),
        );
        self.write(&rel, &edited)?;
        self.commit(&format!("{name}: revise copy ({n})"))
    }

    /// The size of a tar.gz of the whole tree at HEAD (`git archive`, gzip level 6).
    fn tar_gz_size(&self) -> anyhow::Result<usize> {
        let out = run(
            self.command().args(["archive", "--format=tar.gz", "HEAD"]),
            "git archive",
        )?;
        ensure!(
            out.ok,
            "git archive failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout.len())
    }

    /// Pushes `main` to `url` and returns the wall time of the `git push` process.
    fn push(&self, url: &str, who: &str, kiln: &Kiln) -> anyhow::Result<Duration> {
        let out = run(
            self.command().args(["push", "-q", url, "main"]),
            &format!("git push to {who}"),
        )?;
        if !out.ok {
            bail!(
                "git push to {who} failed:\n{}\n--- last lines of the kiln-gitstore log ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                kiln.log_tail(20)
            );
        }
        Ok(out.elapsed)
    }
}

// ---------------------------------------------------------------------------------------------
// Kiln's gitstore
// ---------------------------------------------------------------------------------------------

/// A running `kiln-gitstore serve` on a file store, killed with its process group on drop.
struct Kiln {
    child: Child,
    port: u16,
    dir: PathBuf,
}

/// What one push added to the store.
struct Stored {
    pack: u64,
    idx: u64,
    manifest: u64,
}

impl Stored {
    fn total(&self) -> u64 {
        self.pack + self.idx + self.manifest
    }
}

/// The outcome of `kiln-gitstore sync`.
struct Synced {
    report: SyncReport,
    elapsed: Duration,
}

/// The JSON line `kiln-gitstore sync` prints last.
#[derive(Debug, serde::Deserialize)]
struct SyncReport {
    bytes_fetched: u64,
    manifest_bytes: u64,
    refs_changed: u64,
}

impl Kiln {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let store = dir.join("store");
        std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
        let log_path = dir.join("gitstore.log");
        // A port found by binding :0 may be taken before the server binds it: retry.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("finding a free port")?
                .port();
            let log = std::fs::File::create(&log_path).context("creating the gitstore log")?;
            let child = hermetic(&mut Command::new(KILN_BIN))
                .arg("serve")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .arg("--store")
                .arg(&store)
                .arg("--data-dir")
                .arg(dir.join("cache"))
                .args(["--webhook-secret", WEBHOOK_SECRET])
                .args(["--compact-min-packs", "1000"])
                .env("KILN_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().context("cloning the log handle")?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {KILN_BIN}"))?;
            let mut node = Self {
                child,
                port,
                dir: dir.to_owned(),
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                if node.child.try_wait()?.is_some() {
                    break;
                }
                if http_get_status(port, "/healthz") == Some(200) {
                    return Ok(node);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let tail = node.log_tail(30);
            drop(node);
            if !tail.contains("Address already in use") {
                bail!("kiln-gitstore on 127.0.0.1:{port} did not become healthy:\n{tail}");
            }
        }
        bail!("kiln-gitstore could not bind a free port in 5 attempts")
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn git_url(&self, token: &str) -> String {
        format!(
            "http://kiln:{token}@127.0.0.1:{}/git/{PROJECT}.git",
            self.port
        )
    }

    fn create_client(&self, name: &str) -> anyhow::Result<String> {
        let out = run(
            hermetic(&mut Command::new(KILN_BIN))
                .args(["create-client", name, "--store"])
                .arg(self.store()),
            "kiln-gitstore create-client",
        )?;
        ensure!(
            out.ok,
            "kiln-gitstore create-client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = out.stdout_text();
        ensure!(token.starts_with("kiln_"), "unexpected token {token:?}");
        Ok(token)
    }

    /// The project's newest manifest and the size of its file.
    fn latest_manifest(&self) -> anyhow::Result<(Manifest, u64)> {
        let dir = self.store().join(format!("projects/{PROJECT}/manifests"));
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        let newest = names.pop().context("the project has no manifest")?;
        let raw =
            std::fs::read(&newest).with_context(|| format!("reading {}", newest.display()))?;
        let m = serde_json::from_slice(&raw)
            .with_context(|| format!("parsing {}", newest.display()))?;
        Ok((m, raw.len() as u64))
    }

    /// The packs (and manifest) the newest generation added, given the pack names seen so far.
    fn new_store_bytes(&self, seen: &mut Vec<String>) -> anyhow::Result<Stored> {
        let (m, manifest) = self.latest_manifest()?;
        let mut s = Stored {
            pack: 0,
            idx: 0,
            manifest,
        };
        for p in &m.packs {
            if !seen.contains(&p.name) {
                s.pack += p.pack_size;
                s.idx += p.idx_size;
                seen.push(p.name.clone());
            }
        }
        ensure!(
            s.pack > 0,
            "generation {} added no pack to the store",
            m.generation
        );
        Ok(s)
    }

    /// `kiln-gitstore sync <project> <dir>` with `KILN_STORE_URL` set, timed.
    fn sync(&self, repo: &Path) -> anyhow::Result<Synced> {
        let out = run(
            hermetic(&mut Command::new(KILN_BIN))
                .args(["sync", PROJECT])
                .arg(repo)
                .env("KILN_STORE_URL", self.store())
                .env("KILN_LOG", "warn"),
            "kiln-gitstore sync",
        )?;
        ensure!(
            out.ok,
            "kiln-gitstore sync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = out.stdout_text();
        let last = text.lines().last().unwrap_or_default();
        let report = serde_json::from_str(last)
            .with_context(|| format!("kiln-gitstore sync printed no JSON report: {text}"))?;
        Ok(Synced {
            report,
            elapsed: out.elapsed,
        })
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("gitstore.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        // The server is its process group's leader: end it with its git children and hooks.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.wait();
    }
}

/// The status code of `GET path` on 127.0.0.1:`port`, or None if it cannot be had.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let head = String::from_utf8_lossy(&raw);
    head.split(' ').nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The baseline: `git http-backend` behind a minimal CGI bridge
// ---------------------------------------------------------------------------------------------

/// A bare repository served by `git http-backend`, one CGI process per request, over HTTP/1.1
/// with keep-alive and Basic auth (any credentials), as a web server in front of it would.
struct Baseline {
    port: u16,
    /// Request body bytes received by `git-receive-pack` POSTs: what pushes sent on the wire.
    received: Arc<AtomicU64>,
}

impl Baseline {
    fn start(root: &Path) -> anyhow::Result<Self> {
        let repo = root.join(format!("{PROJECT}.git"));
        std::fs::create_dir_all(&repo).with_context(|| format!("creating {}", repo.display()))?;
        for args in [
            &["init", "-q", "--bare", "-b", "main"][..],
            &["config", "http.receivepack", "true"][..],
        ] {
            let out = run(
                hermetic(&mut Command::new("git"))
                    .arg("-C")
                    .arg(&repo)
                    .args(args),
                "git",
            )?;
            ensure!(
                out.ok,
                "git {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(AtomicU64::new(0));
        let (root, counter) = (root.to_owned(), received.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (root, counter) = (root.clone(), counter.clone());
                std::thread::spawn(move || {
                    if let Err(e) = serve_connection(conn, &root, &counter) {
                        use std::io::ErrorKind::*;
                        if !matches!(e.kind(), ConnectionReset | BrokenPipe | UnexpectedEof) {
                            eprintln!("baseline bridge: {e}");
                        }
                    }
                });
            }
        });
        Ok(Self { port, received })
    }

    fn git_url(&self) -> String {
        format!("http://bench:secret@127.0.0.1:{}/{PROJECT}.git", self.port)
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

/// Answers HTTP/1.1 requests on one connection until the client closes it.
fn serve_connection(stream: TcpStream, root: &Path, received: &AtomicU64) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, what.to_owned());
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?.ip().to_string();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return Err(bad("malformed request line"));
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let mut headers: Vec<(String, String)> = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            read_chunked(&mut reader)?
        } else {
            let len: usize = match header("content-length") {
                Some(v) => v.parse().map_err(|_| bad("bad Content-Length"))?,
                None => 0,
            };
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
            body
        };
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let user = header("authorization")
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|d| {
                let d = String::from_utf8(d).ok()?;
                Some(d.split_once(':')?.0.to_owned())
            });
        let response = match user {
            None => b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"bench\"\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Some(user) => {
                if method == "POST" && path.ends_with("/git-receive-pack") {
                    received.fetch_add(body.len() as u64, Ordering::SeqCst);
                }
                let cgi = CgiRequest {
                    method: &method,
                    path,
                    query,
                    content_type: header("content-type"),
                    content_encoding: header("content-encoding"),
                    git_protocol: header("git-protocol"),
                    user: &user,
                    peer: &peer,
                };
                cgi.run(root, body)?
            }
        };
        out.write_all(&response)?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Reads a `Transfer-Encoding: chunked` body (git sends one for pushes over `http.postBuffer`).
fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size");
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        if size == 0 {
            // Trailers, then the empty line that ends the body.
            loop {
                let mut t = String::new();
                if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
    }
}

/// One request, as the CGI variables `git http-backend` reads.
struct CgiRequest<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    content_type: Option<&'a str>,
    content_encoding: Option<&'a str>,
    git_protocol: Option<&'a str>,
    user: &'a str,
    peer: &'a str,
}

impl CgiRequest<'_> {
    /// Runs `git http-backend` with `body` on stdin and turns its CGI answer into HTTP/1.1.
    fn run(&self, root: &Path, body: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let mut cmd = Command::new("git");
        hermetic(&mut cmd)
            .arg("http-backend")
            .env("GIT_PROJECT_ROOT", root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("GATEWAY_INTERFACE", "CGI/1.1")
            .env("SERVER_PROTOCOL", "HTTP/1.1")
            .env("REQUEST_METHOD", self.method)
            .env("PATH_INFO", self.path)
            .env("QUERY_STRING", self.query)
            .env("REMOTE_USER", self.user)
            .env("REMOTE_ADDR", self.peer);
        if self.method == "POST" {
            cmd.env("CONTENT_LENGTH", body.len().to_string());
        }
        for (var, value) in [
            ("CONTENT_TYPE", self.content_type),
            ("HTTP_CONTENT_ENCODING", self.content_encoding),
            ("GIT_PROTOCOL", self.git_protocol),
        ] {
            if let Some(v) = value {
                cmd.env(var, v);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        });
        let out = child.wait_with_output()?;
        let _ = writer.join();
        let raw = out.stdout;
        let (head, payload) = match find(&raw, b"\r\n\r\n") {
            Some(i) => (&raw[..i], &raw[i + 4..]),
            None => match find(&raw, b"\n\n") {
                Some(i) => (&raw[..i], &raw[i + 2..]),
                None => {
                    let msg = format!(
                        "git http-backend answered no CGI headers: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    return Ok(format!(
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{msg}",
                        msg.len()
                    )
                    .into_bytes());
                }
            },
        };
        let mut status = "200 OK".to_owned();
        let mut response = String::new();
        for line in String::from_utf8_lossy(head).lines() {
            let line = line.trim_end_matches('\r');
            match line.split_once(':') {
                Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
                Some(_) => {
                    response.push_str(line);
                    response.push_str("\r\n");
                }
                None => {}
            }
        }
        let mut bytes = format!(
            "HTTP/1.1 {status}\r\n{response}Content-Length: {}\r\n\r\n",
            payload.len()
        )
        .into_bytes();
        bytes.extend_from_slice(payload);
        Ok(bytes)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Statistics and the table
// ---------------------------------------------------------------------------------------------

/// The nearest-rank percentile `p` (0..=1) of `xs`.
fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn median(xs: &[f64]) -> f64 {
    percentile(xs, 0.5)
}

fn p90(xs: &[f64]) -> f64 {
    percentile(xs, 0.9)
}

fn max(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::MIN, f64::max)
}

fn millis(v: f64) -> String {
    format!("{v:.1} ms")
}

fn bytes(v: f64) -> String {
    if v < 10_000.0 {
        format!("{v:.0} B")
    } else {
        format!("{:.1} KiB", v / 1024.0)
    }
}

fn list(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn ratios(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Row {
    metric: &'static str,
    kiln: String,
    reference: String,
    ratio: Option<f64>,
    /// The largest ratio that meets the goal.
    goal: Option<f64>,
}

impl Row {
    fn goal(metric: &'static str, kiln: String, reference: String, ratio: f64, goal: f64) -> Self {
        Self {
            metric,
            kiln,
            reference,
            ratio: Some(ratio),
            goal: Some(goal),
        }
    }

    fn info(metric: &'static str, kiln: String, reference: String, ratio: f64) -> Self {
        Self {
            metric,
            kiln,
            reference,
            ratio: Some(ratio),
            goal: None,
        }
    }

    fn text(metric: &'static str, kiln: String, reference: String) -> Self {
        Self {
            metric,
            kiln,
            reference,
            ratio: None,
            goal: None,
        }
    }
}

struct Table {
    title: String,
    rows: Vec<Row>,
}

impl Table {
    fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.title);
        let header = format!(
            "{:<36} {:>12} {:>18} {:>9}  {:<8} {}",
            "metric", "kiln", "baseline/reference", "ratio", "goal", "result"
        );
        let _ = writeln!(s, "{header}");
        let _ = writeln!(s, "{}", "-".repeat(header.len() + 6));
        for r in &self.rows {
            let ratio = r.ratio.map_or(String::new(), |x| format!("{x:.2}x"));
            let (goal, result) = match (r.goal, r.ratio) {
                (Some(g), Some(x)) => (
                    format!("<= {g:.1}x"),
                    if x <= g { "goal met" } else { "goal missed" },
                ),
                _ => (String::new(), "(info)"),
            };
            let _ = writeln!(
                s,
                "{:<36} {:>12} {:>18} {:>9}  {:<8} {}",
                r.metric, r.kiln, r.reference, ratio, goal, result
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The fixture: a deterministic Vite + React + TypeScript app
// ---------------------------------------------------------------------------------------------

/// The components, and whether each has a CSS module.
const COMPONENTS: [(&str, bool); 12] = [
    ("Header", true),
    ("Footer", false),
    ("Sidebar", true),
    ("Button", false),
    ("Card", true),
    ("Modal", true),
    ("TodoList", true),
    ("TodoItem", false),
    ("SearchBar", false),
    ("Tabs", true),
    ("Pagination", false),
    ("Toast", false),
];

const NOUNS: [&str; 16] = [
    "project", "preview", "deploy", "build", "commit", "branch", "member", "invoice", "order",
    "ticket", "message", "profile", "report", "task", "event", "asset",
];

const VERBS: [&str; 12] = [
    "open",
    "archive",
    "rename",
    "share",
    "pin",
    "retry",
    "approve",
    "assign",
    "export",
    "star",
    "duplicate",
    "remove",
];

const STATUSES: [&str; 5] = ["idle", "pending", "active", "done", "failed"];

/// SplitMix64: a tiny deterministic generator, so the fixture is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.range(0, xs.len())]
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

fn kebab(name: &str) -> String {
    let mut s = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            s.push('-');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}

/// Every file of the app, path and content.
fn app_files() -> Vec<(String, String)> {
    let mut rng = Rng(0x6b69_6c6e);
    let mut files: Vec<(String, String)> = [
        ("package.json", PACKAGE_JSON),
        ("tsconfig.json", TSCONFIG),
        ("tsconfig.node.json", TSCONFIG_NODE),
        ("vite.config.ts", VITE_CONFIG),
        ("index.html", INDEX_HTML),
        (".gitignore", GITIGNORE),
        ("README.md", README),
        ("eslint.config.js", ESLINT_CONFIG),
        ("public/favicon.svg", FAVICON),
        (
            "src/vite-env.d.ts",
            "/// <reference types=\"vite/client\" />\n",
        ),
        ("src/main.tsx", MAIN_TSX),
        ("src/App.tsx", APP_TSX),
        ("src/types/index.ts", TYPES_TS),
        ("src/lib/format.ts", FORMAT_TS),
        ("src/lib/api.ts", API_TS),
        ("src/lib/validation.ts", VALIDATION_TS),
        ("src/hooks/useLocalStorage.ts", USE_LOCAL_STORAGE),
        ("src/hooks/useDebounce.ts", USE_DEBOUNCE),
        ("src/hooks/useFetch.ts", USE_FETCH),
        ("src/hooks/useTheme.ts", USE_THEME),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_owned(), c.to_owned()))
    .collect();
    files.push(("src/index.css".into(), stylesheet(&mut rng, INDEX_CSS_HEAD)));
    files.push(("src/App.css".into(), stylesheet(&mut rng, "")));
    for (name, css) in COMPONENTS {
        files.push((
            format!("src/components/{name}.tsx"),
            component(name, css, &mut rng),
        ));
        if css {
            files.push((
                format!("src/components/{name}.module.css"),
                stylesheet(&mut rng, ""),
            ));
        }
    }
    for page in ["Home", "Settings", "About"] {
        files.push((format!("src/pages/{page}.tsx"), page_tsx(page, &mut rng)));
    }
    files
}

/// A React component: props, labels, filtering state, handlers and the markup that uses them.
fn component(name: &str, css: bool, rng: &mut Rng) -> String {
    let noun = rng.pick(&NOUNS);
    let mut s = String::new();
    s.push_str("import { useCallback, useEffect, useMemo, useState } from 'react'\n");
    s.push_str("import type { Item } from '../types'\n");
    s.push_str("import { formatDate, truncate } from '../lib/format'\n");
    if css {
        let _ = writeln!(s, "import styles from './{name}.module.css'");
    }
    let _ = write!(
        s,
        "\nexport interface {name}Props {{\n  title?: string\n  items: Item[]\n"
    );
    const PROPS: [(&str, &str); 6] = [
        ("compact", "boolean"),
        ("maxItems", "number"),
        ("emptyText", "string"),
        ("highlight", "Item['status']"),
        ("onDismiss", "(id: string) => void"),
        ("className", "string"),
    ];
    for i in 0..rng.range(2, 6) {
        let (field, ty) = PROPS[rng.range(0, PROPS.len())];
        let _ = writeln!(s, "  {field}{i}?: {ty}");
    }
    s.push_str("  onSelect?: (item: Item) => void\n}\n\n");
    s.push_str("const LABELS = {\n");
    let mut labels = Vec::new();
    for i in 0..rng.range(3, 10) {
        let (w, v) = (rng.pick(&NOUNS), rng.pick(&VERBS));
        let key = format!("{v}{}{i}", capitalize(w));
        let _ = writeln!(s, "  {key}: '{} {w}',", capitalize(v));
        labels.push(key);
    }
    s.push_str("} as const\n\n");
    let _ = writeln!(s, "const PAGE_SIZE = {}\n", rng.range(5, 25));
    s.push_str(
        "function matches(item: Item, query: string): boolean {\n  const q = query.trim().toLowerCase()\n  if (!q) return true\n  return item.title.toLowerCase().includes(q) || item.tags.some((t) => t.includes(q))\n}\n\n",
    );
    let _ = writeln!(
        s,
        "export function {name}({{ title = '{}', items, onSelect }}: {name}Props) {{",
        capitalize(noun) + "s"
    );
    s.push_str("  const [query, setQuery] = useState('')\n  const [selected, setSelected] = useState<string | null>(null)\n  const [page, setPage] = useState(0)\n\n");
    s.push_str("  const visible = useMemo(\n    () =>\n      items\n        .filter((item) => matches(item, query))\n        .slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE),\n    [items, query, page],\n  )\n  const pages = Math.max(1, Math.ceil(items.length / PAGE_SIZE))\n\n");
    s.push_str("  useEffect(() => {\n    setPage(0)\n  }, [query])\n\n");
    let mut handlers = Vec::new();
    for h in 0..rng.range(1, 5) {
        let verb = rng.pick(&VERBS);
        let status = rng.pick(&STATUSES);
        let handler = format!("handle{}{h}", capitalize(verb));
        let _ = write!(
            s,
            "  const {handler} = useCallback(\n    (item: Item) => {{\n      setSelected(item.id)\n      if (item.status === '{status}') {{\n        setQuery('')\n      }}\n      onSelect?.(item)\n    }},\n    [onSelect],\n  )\n\n"
        );
        handlers.push(handler);
    }
    let class = |c: &str| {
        if css {
            format!("{{styles.{c}}}")
        } else {
            format!("\"{}-{c}\"", kebab(name))
        }
    };
    s.push_str("  return (\n");
    let _ = writeln!(
        s,
        "    <section className={} aria-label={{title}}>",
        class("root")
    );
    let _ = write!(
        s,
        "      <header className={}>\n        <h2>{{title}}</h2>\n        <input\n          type=\"search\"\n          value={{query}}\n          placeholder=\"Search {noun}s\"\n          onChange={{(e) => setQuery(e.target.value)}}\n        />\n      </header>\n",
        class("header")
    );
    let _ = write!(
        s,
        "      <ul className={}>\n        {{visible.map((item) => (\n          <li key={{item.id}} className={{item.id === selected ? 'active' : undefined}}>\n            <span>{{truncate(item.title, 48)}}</span>\n            <time dateTime={{item.createdAt}}>{{formatDate(item.createdAt)}}</time>\n",
        class("list")
    );
    for (i, handler) in handlers.iter().enumerate() {
        let _ = write!(
            s,
            "            <button type=\"button\" onClick={{() => {handler}(item)}}>\n              {{LABELS.{}}}\n            </button>\n",
            labels[i % labels.len()]
        );
    }
    s.push_str("          </li>\n        ))}\n      </ul>\n");
    for b in 0..rng.range(1, 4) {
        let w = rng.pick(&NOUNS);
        let _ = write!(
            s,
            "      {{visible.length === 0 && (\n        <p className={}>\n          No {w}s match “{{query}}” yet ({b}).\n        </p>\n      )}}\n",
            class("empty")
        );
    }
    let _ = write!(
        s,
        "      <footer className={}>\n        <button type=\"button\" disabled={{page === 0}} onClick={{() => setPage(page - 1)}}>\n          Previous\n        </button>\n        <span>\n          {{page + 1}} / {{pages}}\n        </span>\n        <button type=\"button\" disabled={{page + 1 >= pages}} onClick={{() => setPage(page + 1)}}>\n          Next\n        </button>\n      </footer>\n",
        class("footer")
    );
    let _ = write!(s, "    </section>\n  )\n}}\n\nexport default {name}\n");
    s
}

/// A page that composes a few components around data from `useFetch`.
fn page_tsx(page: &str, rng: &mut Rng) -> String {
    let mut s = String::new();
    let mut used = Vec::new();
    for _ in 0..rng.range(2, 5) {
        let c = COMPONENTS[rng.range(0, COMPONENTS.len())].0;
        if !used.contains(&c) {
            used.push(c);
        }
    }
    s.push_str("import { useState } from 'react'\n");
    for c in &used {
        let _ = writeln!(s, "import {c} from '../components/{c}'");
    }
    s.push_str("import { useFetch } from '../hooks/useFetch'\nimport { useDebounce } from '../hooks/useDebounce'\nimport type { Item } from '../types'\n\n");
    let noun = rng.pick(&NOUNS);
    let _ = write!(
        s,
        "export default function {page}Page() {{\n  const [filter, setFilter] = useState('')\n  const debounced = useDebounce(filter, 250)\n  const {{ data, error, loading, reload }} = useFetch<Item[]>(`/api/{noun}s?q=${{encodeURIComponent(debounced)}}`)\n  const items = data ?? []\n\n"
    );
    s.push_str("  if (error) {\n    return (\n      <main className=\"page page-error\">\n        <p role=\"alert\">{error.message}</p>\n        <button type=\"button\" onClick={reload}>\n          Try again\n        </button>\n      </main>\n    )\n  }\n\n");
    let _ = write!(
        s,
        "  return (\n    <main className=\"page page-{}\">\n      <h1>{page}</h1>\n      <label>\n        Filter {noun}s\n        <input value={{filter}} onChange={{(e) => setFilter(e.target.value)}} />\n      </label>\n      {{loading && <p aria-busy=\"true\">Loading {noun}s…</p>}}\n",
        page.to_ascii_lowercase()
    );
    for c in &used {
        let _ = writeln!(
            s,
            "      <{c} title=\"{} {}s\" items={{items}} onSelect={{(item) => console.info('{page}: selected', item.id)}} />",
            capitalize(rng.pick(&VERBS)),
            rng.pick(&NOUNS)
        );
    }
    s.push_str("    </main>\n  )\n}\n");
    s
}

/// A stylesheet: `head`, then rules for the selectors a component's markup uses.
fn stylesheet(rng: &mut Rng, head: &str) -> String {
    const SELECTORS: [&str; 14] = [
        ".root",
        ".header",
        ".header h2",
        ".header input",
        ".list",
        ".list li",
        ".list li:hover",
        ".list li.active",
        ".list button",
        ".empty",
        ".footer",
        ".footer button",
        ".footer button:disabled",
        ".badge",
    ];
    const PROPS: [(&str, &[&str]); 12] = [
        ("display", &["flex", "grid", "block", "inline-flex"]),
        ("gap", &["0.25rem", "0.5rem", "0.75rem", "1rem"]),
        (
            "padding",
            &["0.5rem 0.75rem", "1rem", "0.25rem 0.5rem", "1.5rem 2rem"],
        ),
        ("margin", &["0", "0 auto", "0.5rem 0", "1rem 0 0"]),
        ("border-radius", &["4px", "6px", "8px", "999px"]),
        (
            "color",
            &["var(--fg)", "var(--muted)", "var(--accent)", "#1f2937"],
        ),
        (
            "background",
            &["var(--bg)", "var(--surface)", "transparent", "#f3f4f6"],
        ),
        ("font-size", &["0.875rem", "1rem", "1.125rem", "1.5rem"]),
        ("font-weight", &["400", "500", "600", "700"]),
        (
            "align-items",
            &["center", "flex-start", "baseline", "stretch"],
        ),
        (
            "border",
            &[
                "1px solid var(--border)",
                "none",
                "1px dashed var(--muted)",
                "2px solid var(--accent)",
            ],
        ),
        (
            "transition",
            &[
                "background 120ms ease",
                "opacity 150ms ease-in-out",
                "transform 200ms ease",
                "none",
            ],
        ),
    ];
    let mut s = head.to_owned();
    let mut first = head.is_empty();
    for sel in SELECTORS {
        if rng.range(0, 10) < 3 {
            continue;
        }
        if !first {
            s.push('\n');
        }
        first = false;
        let _ = writeln!(s, "{sel} {{");
        let start = rng.range(0, PROPS.len());
        for k in 0..rng.range(2, 6) {
            let (prop, values) = PROPS[(start + k) % PROPS.len()];
            let _ = writeln!(s, "  {prop}: {};", rng.pick(values));
        }
        s.push_str("}\n");
    }
    let _ = write!(
        s,
        "\n@media (max-width: {}px) {{\n  .root {{\n    padding: 0.5rem;\n  }}\n\n  .footer {{\n    flex-direction: column;\n  }}\n}}\n",
        [480, 640, 768][rng.range(0, 3)]
    );
    s
}

const PACKAGE_JSON: &str = r#"{
  "name": "generated-app",
  "private": true,
  "version": "0.0.0",
  "type": "module",
  "scripts": {
    "dev": "vite",
    "build": "tsc -b && vite build",
    "lint": "eslint .",
    "preview": "vite preview"
  },
  "dependencies": {
    "react": "^18.3.1",
    "react-dom": "^18.3.1"
  },
  "devDependencies": {
    "@eslint/js": "^9.9.0",
    "@types/react": "^18.3.3",
    "@types/react-dom": "^18.3.0",
    "@vitejs/plugin-react": "^4.3.1",
    "eslint": "^9.9.0",
    "eslint-plugin-react-hooks": "^5.1.0-rc.0",
    "eslint-plugin-react-refresh": "^0.4.9",
    "globals": "^15.9.0",
    "typescript": "^5.5.3",
    "typescript-eslint": "^8.0.1",
    "vite": "^5.4.1"
  }
}
"#;

const TSCONFIG: &str = r#"{
  "compilerOptions": {
    "target": "ES2020",
    "useDefineForClassFields": true,
    "lib": ["ES2020", "DOM", "DOM.Iterable"],
    "module": "ESNext",
    "skipLibCheck": true,

    /* Bundler mode */
    "moduleResolution": "bundler",
    "allowImportingTsExtensions": true,
    "isolatedModules": true,
    "moduleDetection": "force",
    "noEmit": true,
    "jsx": "react-jsx",

    /* Linting */
    "strict": true,
    "noUnusedLocals": true,
    "noUnusedParameters": true,
    "noFallthroughCasesInSwitch": true,
    "noUncheckedIndexedAccess": true,
    "baseUrl": ".",
    "paths": {
      "@/*": ["src/*"]
    }
  },
  "include": ["src"],
  "references": [{ "path": "./tsconfig.node.json" }]
}
"#;

const TSCONFIG_NODE: &str = r#"{
  "compilerOptions": {
    "target": "ES2022",
    "lib": ["ES2023"],
    "module": "ESNext",
    "skipLibCheck": true,
    "moduleResolution": "bundler",
    "allowImportingTsExtensions": true,
    "isolatedModules": true,
    "moduleDetection": "force",
    "noEmit": true,
    "strict": true,
    "noUnusedLocals": true,
    "noUnusedParameters": true,
    "noFallthroughCasesInSwitch": true
  },
  "include": ["vite.config.ts"]
}
"#;

const VITE_CONFIG: &str = r#"import { defineConfig } from 'vite'
import react from '@vitejs/plugin-react'
import { fileURLToPath, URL } from 'node:url'

// https://vitejs.dev/config/
export default defineConfig({
  plugins: [react()],
  resolve: {
    alias: {
      '@': fileURLToPath(new URL('./src', import.meta.url)),
    },
  },
  server: {
    host: '127.0.0.1',
    port: 5173,
    strictPort: true,
    proxy: {
      '/api': {
        target: 'http://127.0.0.1:8787',
        changeOrigin: true,
      },
    },
  },
  build: {
    outDir: 'dist',
    sourcemap: true,
    target: 'es2020',
    rollupOptions: {
      output: {
        manualChunks: {
          react: ['react', 'react-dom'],
        },
      },
    },
  },
})
"#;

const INDEX_HTML: &str = r#"<!doctype html>
<html lang="en">
  <head>
    <meta charset="UTF-8" />
    <link rel="icon" type="image/svg+xml" href="/favicon.svg" />
    <meta name="viewport" content="width=device-width, initial-scale=1.0" />
    <meta name="description" content="A generated Vite + React + TypeScript app" />
    <title>Generated App</title>
  </head>
  <body>
    <div id="root"></div>
    <script type="module" src="/src/main.tsx"></script>
  </body>
</html>
"#;

const GITIGNORE: &str = "# Logs\nlogs\n*.log\nnpm-debug.log*\npnpm-debug.log*\n\nnode_modules\ndist\ndist-ssr\n*.local\n\n# Editor directories and files\n.vscode/*\n!.vscode/extensions.json\n.idea\n.DS_Store\n";

const README: &str = r#"# Generated App

This project was generated as a Vite + React + TypeScript app.

## Scripts

- `pnpm dev` starts the dev server on http://127.0.0.1:5173
- `pnpm build` type-checks and builds into `dist/`
- `pnpm lint` runs ESLint
- `pnpm preview` serves the production build

## Layout

- `src/components/`: presentational components, each with an optional CSS module
- `src/pages/`: the pages, composed from components and hooks
- `src/hooks/`: `useFetch`, `useDebounce`, `useLocalStorage`, `useTheme`
- `src/lib/`: formatting, API access and validation
- `src/types/`: shared types

## API

The dev server proxies `/api` to `http://127.0.0.1:8787`. Every list endpoint answers
`{ items, total, page }` and accepts `?q=` for search.

## Theming

Colors come from CSS variables in `src/index.css`; `useTheme` toggles `data-theme` on the
document element and remembers the choice in local storage.
"#;

const ESLINT_CONFIG: &str = r#"import js from '@eslint/js'
import globals from 'globals'
import reactHooks from 'eslint-plugin-react-hooks'
import reactRefresh from 'eslint-plugin-react-refresh'
import tseslint from 'typescript-eslint'

export default tseslint.config(
  { ignores: ['dist'] },
  {
    extends: [js.configs.recommended, ...tseslint.configs.recommended],
    files: ['**/*.{ts,tsx}'],
    languageOptions: {
      ecmaVersion: 2020,
      globals: globals.browser,
    },
    plugins: {
      'react-hooks': reactHooks,
      'react-refresh': reactRefresh,
    },
    rules: {
      ...reactHooks.configs.recommended.rules,
      'react-refresh/only-export-components': ['warn', { allowConstantExport: true }],
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
    },
  },
)
"#;

const FAVICON: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32" width="32" height="32">
  <defs>
    <linearGradient id="g" x1="0" y1="0" x2="1" y2="1">
      <stop offset="0" stop-color="#646cff" />
      <stop offset="1" stop-color="#61dafb" />
    </linearGradient>
  </defs>
  <rect width="32" height="32" rx="7" fill="url(#g)" />
  <path d="M9 22V10h3l4 6 4-6h3v12h-3v-7l-4 6-4-6v7z" fill="#fff" />
</svg>
"##;

const MAIN_TSX: &str = r#"import { StrictMode } from 'react'
import { createRoot } from 'react-dom/client'
import App from './App'
import './index.css'

const root = document.getElementById('root')
if (!root) {
  throw new Error('index.html has no #root element')
}

createRoot(root).render(
  <StrictMode>
    <App />
  </StrictMode>,
)
"#;

const APP_TSX: &str = r#"import { useMemo, useState } from 'react'
import Header from './components/Header'
import Footer from './components/Footer'
import Sidebar from './components/Sidebar'
import Toast from './components/Toast'
import HomePage from './pages/Home'
import SettingsPage from './pages/Settings'
import AboutPage from './pages/About'
import { useTheme } from './hooks/useTheme'
import type { Item } from './types'
import './App.css'

type Route = 'home' | 'settings' | 'about'

const ROUTES: { id: Route; label: string }[] = [
  { id: 'home', label: 'Home' },
  { id: 'settings', label: 'Settings' },
  { id: 'about', label: 'About' },
]

function routeFromHash(hash: string): Route {
  const id = hash.replace(/^#\/?/, '')
  return ROUTES.some((r) => r.id === id) ? (id as Route) : 'home'
}

export default function App() {
  const [route, setRoute] = useState<Route>(() => routeFromHash(window.location.hash))
  const { theme, toggle } = useTheme()
  const nav: Item[] = useMemo(
    () =>
      ROUTES.map((r, i) => ({
        id: r.id,
        title: r.label,
        status: r.id === route ? 'active' : 'idle',
        createdAt: new Date(2024, 0, i + 1).toISOString(),
        tags: [r.id],
      })),
    [route],
  )

  const go = (item: Item) => {
    const next = routeFromHash(item.id)
    window.location.hash = `#/${next}`
    setRoute(next)
  }

  return (
    <div className="app" data-theme={theme}>
      <Header title="Generated App" items={nav} onSelect={go} />
      <div className="app-body">
        <Sidebar title="Navigate" items={nav} onSelect={go} />
        {route === 'home' && <HomePage />}
        {route === 'settings' && <SettingsPage />}
        {route === 'about' && <AboutPage />}
      </div>
      <Footer title={`Theme: ${theme}`} items={[]} onSelect={toggle} />
      <Toast title="Saved" items={[]} />
    </div>
  )
}
"#;

const TYPES_TS: &str = r#"export type Status = 'idle' | 'pending' | 'active' | 'done' | 'failed'

export interface User {
  id: string
  name: string
  email: string
  avatarUrl?: string
  role: 'owner' | 'editor' | 'viewer'
}

export interface Item {
  id: string
  title: string
  status: Status
  createdAt: string
  updatedAt?: string
  tags: string[]
  owner?: User
}

export interface Page<T> {
  items: T[]
  total: number
  page: number
}

export interface ApiError {
  error: string
  message: string
}

export type Theme = 'light' | 'dark' | 'system'

export interface Settings {
  theme: Theme
  pageSize: number
  notifications: boolean
  language: 'en' | 'fr' | 'de' | 'es'
}

export const DEFAULT_SETTINGS: Settings = {
  theme: 'system',
  pageSize: 20,
  notifications: true,
  language: 'en',
}
"#;

const FORMAT_TS: &str = r#"const dateFormat = new Intl.DateTimeFormat('en', {
  year: 'numeric',
  month: 'short',
  day: 'numeric',
})

const relativeFormat = new Intl.RelativeTimeFormat('en', { numeric: 'auto' })

export function formatDate(iso: string): string {
  const d = new Date(iso)
  return Number.isNaN(d.getTime()) ? '—' : dateFormat.format(d)
}

export function formatRelative(iso: string, now: Date = new Date()): string {
  const seconds = Math.round((new Date(iso).getTime() - now.getTime()) / 1000)
  const steps: [Intl.RelativeTimeFormatUnit, number][] = [
    ['year', 31_536_000],
    ['month', 2_592_000],
    ['day', 86_400],
    ['hour', 3_600],
    ['minute', 60],
  ]
  for (const [unit, size] of steps) {
    if (Math.abs(seconds) >= size) {
      return relativeFormat.format(Math.round(seconds / size), unit)
    }
  }
  return relativeFormat.format(seconds, 'second')
}

export function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`
}

export function formatBytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB']
  let i = 0
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024
    i += 1
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`
}

export function pluralize(count: number, word: string): string {
  return `${count} ${word}${count === 1 ? '' : 's'}`
}
"#;

const API_TS: &str = r#"import type { ApiError, Page } from '../types'

const BASE = '/api'

export class RequestError extends Error {
  constructor(
    public readonly status: number,
    public readonly body: ApiError | null,
  ) {
    super(body?.message ?? `request failed with status ${status}`)
  }
}

async function request<T>(path: string, init?: RequestInit): Promise<T> {
  const res = await fetch(`${BASE}${path}`, {
    headers: { 'Content-Type': 'application/json', ...init?.headers },
    ...init,
  })
  if (!res.ok) {
    const body = (await res.json().catch(() => null)) as ApiError | null
    throw new RequestError(res.status, body)
  }
  return res.status === 204 ? (undefined as T) : ((await res.json()) as T)
}

export function list<T>(resource: string, q = '', page = 0): Promise<Page<T>> {
  const params = new URLSearchParams({ q, page: String(page) })
  return request<Page<T>>(`/${resource}?${params}`)
}

export function get<T>(resource: string, id: string): Promise<T> {
  return request<T>(`/${resource}/${encodeURIComponent(id)}`)
}

export function create<T>(resource: string, body: Partial<T>): Promise<T> {
  return request<T>(`/${resource}`, { method: 'POST', body: JSON.stringify(body) })
}

export function update<T>(resource: string, id: string, body: Partial<T>): Promise<T> {
  return request<T>(`/${resource}/${encodeURIComponent(id)}`, {
    method: 'PATCH',
    body: JSON.stringify(body),
  })
}

export function remove(resource: string, id: string): Promise<void> {
  return request<void>(`/${resource}/${encodeURIComponent(id)}`, { method: 'DELETE' })
}
"#;

const VALIDATION_TS: &str = r#"export type Rule<T> = (value: T) => string | null

export const required: Rule<string> = (v) => (v.trim() ? null : 'This field is required')

export function minLength(n: number): Rule<string> {
  return (v) => (v.length >= n ? null : `Use at least ${n} characters`)
}

export function maxLength(n: number): Rule<string> {
  return (v) => (v.length <= n ? null : `Use at most ${n} characters`)
}

export const email: Rule<string> = (v) =>
  /^[^\s@]+@[^\s@]+\.[^\s@]+$/.test(v) ? null : 'Enter a valid email address'

export function inRange(min: number, max: number): Rule<number> {
  return (v) => (v >= min && v <= max ? null : `Choose a value from ${min} to ${max}`)
}

export function validate<T>(value: T, rules: Rule<T>[]): string[] {
  return rules.map((rule) => rule(value)).filter((e): e is string => e !== null)
}

export function validateForm<T extends Record<string, unknown>>(
  values: T,
  schema: { [K in keyof T]?: Rule<T[K]>[] },
): Partial<Record<keyof T, string>> {
  const errors: Partial<Record<keyof T, string>> = {}
  for (const key of Object.keys(schema) as (keyof T)[]) {
    const found = validate(values[key], schema[key] ?? [])
    if (found.length > 0) {
      errors[key] = found[0]
    }
  }
  return errors
}
"#;

const USE_LOCAL_STORAGE: &str = r#"import { useCallback, useEffect, useState } from 'react'

export function useLocalStorage<T>(key: string, initial: T) {
  const [value, setValue] = useState<T>(() => {
    try {
      const raw = window.localStorage.getItem(key)
      return raw === null ? initial : (JSON.parse(raw) as T)
    } catch {
      return initial
    }
  })

  useEffect(() => {
    try {
      window.localStorage.setItem(key, JSON.stringify(value))
    } catch {
      // Storage full or disabled: keep the value in memory only.
    }
  }, [key, value])

  useEffect(() => {
    const onStorage = (e: StorageEvent) => {
      if (e.key === key && e.newValue !== null) {
        setValue(JSON.parse(e.newValue) as T)
      }
    }
    window.addEventListener('storage', onStorage)
    return () => window.removeEventListener('storage', onStorage)
  }, [key])

  const reset = useCallback(() => setValue(initial), [initial])
  return [value, setValue, reset] as const
}
"#;

const USE_DEBOUNCE: &str = r#"import { useEffect, useRef, useState } from 'react'

export function useDebounce<T>(value: T, delayMs = 300): T {
  const [debounced, setDebounced] = useState(value)
  useEffect(() => {
    const timer = window.setTimeout(() => setDebounced(value), delayMs)
    return () => window.clearTimeout(timer)
  }, [value, delayMs])
  return debounced
}

export function useDebouncedCallback<A extends unknown[]>(
  fn: (...args: A) => void,
  delayMs = 300,
): (...args: A) => void {
  const timer = useRef<number | undefined>(undefined)
  const latest = useRef(fn)
  latest.current = fn

  useEffect(() => () => window.clearTimeout(timer.current), [])

  return (...args: A) => {
    window.clearTimeout(timer.current)
    timer.current = window.setTimeout(() => latest.current(...args), delayMs)
  }
}
"#;

const USE_FETCH: &str = r#"import { useCallback, useEffect, useRef, useState } from 'react'

interface FetchState<T> {
  data: T | null
  error: Error | null
  loading: boolean
}

export function useFetch<T>(url: string, init?: RequestInit) {
  const [state, setState] = useState<FetchState<T>>({ data: null, error: null, loading: true })
  const [nonce, setNonce] = useState(0)
  const controller = useRef<AbortController | null>(null)

  useEffect(() => {
    controller.current?.abort()
    const ac = new AbortController()
    controller.current = ac
    setState((s) => ({ ...s, loading: true, error: null }))
    fetch(url, { ...init, signal: ac.signal })
      .then(async (res) => {
        if (!res.ok) {
          throw new Error(`${res.status} ${res.statusText}`)
        }
        const data = (await res.json()) as T
        setState({ data, error: null, loading: false })
      })
      .catch((error: unknown) => {
        if (ac.signal.aborted) return
        setState({
          data: null,
          error: error instanceof Error ? error : new Error(String(error)),
          loading: false,
        })
      })
    return () => ac.abort()
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [url, nonce])

  const reload = useCallback(() => setNonce((n) => n + 1), [])
  return { ...state, reload }
}
"#;

const USE_THEME: &str = r#"import { useCallback, useEffect, useMemo } from 'react'
import { useLocalStorage } from './useLocalStorage'
import type { Theme } from '../types'

function systemTheme(): 'light' | 'dark' {
  return window.matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light'
}

export function useTheme() {
  const [stored, setStored] = useLocalStorage<Theme>('theme', 'system')
  const theme = useMemo(() => (stored === 'system' ? systemTheme() : stored), [stored])

  useEffect(() => {
    document.documentElement.dataset.theme = theme
  }, [theme])

  useEffect(() => {
    if (stored !== 'system') return
    const media = window.matchMedia('(prefers-color-scheme: dark)')
    const onChange = () => setStored('system')
    media.addEventListener('change', onChange)
    return () => media.removeEventListener('change', onChange)
  }, [stored, setStored])

  const toggle = useCallback(() => {
    setStored(theme === 'dark' ? 'light' : 'dark')
  }, [theme, setStored])

  return { theme, stored, setTheme: setStored, toggle }
}
"#;

const INDEX_CSS_HEAD: &str = r#":root {
  --bg: #ffffff;
  --surface: #f8fafc;
  --fg: #0f172a;
  --muted: #64748b;
  --accent: #646cff;
  --border: #e2e8f0;
  font-family: Inter, system-ui, Avenir, Helvetica, Arial, sans-serif;
  line-height: 1.5;
  font-weight: 400;
  color: var(--fg);
  background-color: var(--bg);
  font-synthesis: none;
  text-rendering: optimizeLegibility;
  -webkit-font-smoothing: antialiased;
}

[data-theme='dark'] {
  --bg: #0b1120;
  --surface: #111827;
  --fg: #e2e8f0;
  --muted: #94a3b8;
  --border: #1f2937;
}

body {
  margin: 0;
  min-width: 320px;
  min-height: 100vh;
}

"#;
