//! Warm builds: after a project's build, its `vite build --watch` process stays up in its own
//! sandbox, so the next change costs only Vite's incremental rebuild instead of a cold start of
//! Node, the config, every plugin and the whole module graph.
//!
//! A warm process (`warm.mjs`, driving Vite's own `build()` in watch mode) sees the project's
//! worktree read-only at `/app`, its node_modules through an overlay (Vite writes its caches
//! there; the shared store's files never change), and writes to its own `/out`, without network.
//! A build has the driver copy the files its checkout changed into the process's own copy of the
//! project; the bundler notices each one, rebuilds, and the driver reports on stdout (see
//! `warm.mjs`). The build waits for a rebuild whose start (the bundler's `buildStart` hook)
//! came after the copy and after a change of every file copied (its `watchChange` hook), all
//! seen in order on the driver's one JavaScript thread, and publishes its output as any build's.
//!
//! A rebuild is only trusted where watch mode is exact: files changed in place that the last
//! build read. Added or deleted files, a config or dependency change, another engine or base, a
//! full checkout: the old process goes and a new one's first build is the build. Anything odd
//! (the process died, stalled, or burnt CPU while idle) stops it and the build runs cold.
//!
//! Processes are capped by count and by the memory the idle ones hold (LRU), and stopped after
//! an idle time. Idle ones live in [`Warm`]; a build takes its project's out for as long as it
//! runs, so eviction only ever stops idle processes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::agent::{make_owned_dir, Agent};
use crate::checkout::CheckoutReport;
use crate::config::Engine;
use crate::sandbox::{self, Mount, Spec};

const DRIVER: &str = include_str!("warm.mjs");
/// In a warm process's cgroup name, before the agent's pid.
pub(crate) const CGROUP_MARKER: &str = "warm";
/// Starts an event line on a warm process's stdout.
const MARK: &[u8] = b"\x1ekiln:";
/// The longest line read as a possible event; longer output is log text.
const MAX_LINE: usize = 4 << 20;
/// How long a warm process may stay silent while a build waits for it to notice a change or
/// start rebuilding (not while it builds: that is the build timeout's).
const STALL: Duration = Duration::from_secs(10);
/// CPU an idle warm process may use, as a share of its idle time (plus one second): more means
/// something the project started keeps running between builds.
const IDLE_CPU_SHARE: f64 = 0.05;

/// What a warm process was started with; another key needs another process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    pub(crate) engine: Engine,
    /// The fast engine's directory, mounted at `/kiln-engine`; `None` for the project's Vite.
    pub(crate) engine_dir: Option<PathBuf>,
    /// The project's install (`<volume>/nm/<id>`), whose node_modules the process sees.
    pub(crate) nm: PathBuf,
    pub(crate) base: String,
}

/// The idle warm processes, and how many there are in all.
#[derive(Default)]
pub(crate) struct Warm {
    idle: Mutex<HashMap<String, Watcher>>,
    live: Arc<AtomicUsize>,
    seq: AtomicU64,
}

/// Counts a live warm process for as long as it exists.
struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One project's warm process.
pub(crate) struct Watcher {
    key: Key,
    process: sandbox::Process,
    /// What `process` writes to; unmounted after it is gone (fields drop in order).
    _scratch: sandbox::ScratchFs,
    out: PathBuf,
    /// The tree its copy of the project holds (the worktree's, as of its last request).
    tree: String,
    /// What the last build read, relative to the project root.
    files: HashSet<String>,
    /// The output of the last build when it succeeded (a `done-<n>` dir under `out`): the
    /// build of the tree the copy holds.
    built: Option<PathBuf>,
    /// Output not yet ended by a newline.
    pending: Vec<u8>,
    idle_since: Instant,
    idle_cpu: Duration,
    _ticket: Ticket,
}

/// How a warm build ended.
pub(crate) enum End {
    Built {
        /// Vite's own time for the build, from the watcher's start of it to its end.
        ms: u64,
    },
    /// The build reported errors: the project is at fault; the process stays usable.
    Failed(String),
    TimedOut,
    Cancelled,
    /// The process died, went silent or stopped making sense: build cold instead.
    Lost(String),
}

#[derive(Deserialize)]
#[serde(tag = "ev", rename_all = "lowercase")]
enum Event {
    Applied {
        error: Option<String>,
    },
    Change {
        id: String,
    },
    Start,
    Error {
        message: String,
    },
    End {
        ms: u64,
        files: Vec<String>,
        out: Option<String>,
    },
}

impl Warm {
    /// Warm processes now, idle or building.
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// The project's idle warm process, taken out for a build.
    pub(crate) fn take(&self, project: &str) -> Option<Watcher> {
        self.idle.lock().expect("warm lock").remove(project)
    }

    /// Gives a process back after a build; stops the least recently used idle ones while there
    /// are more than `max`, or the idle ones hold more than `budget` bytes.
    pub(crate) fn put(&self, project: &str, mut w: Watcher, max: usize, budget: u64) {
        w.idle_since = Instant::now();
        w.idle_cpu = w.process.stats().cpu_time;
        let victims = {
            let mut idle = self.idle.lock().expect("warm lock");
            idle.insert(project.to_owned(), w);
            let mut by_age: Vec<(Instant, String, u64)> = idle
                .iter()
                .map(|(p, w)| (w.idle_since, p.clone(), w.process.stats().resident_bytes))
                .collect();
            by_age.sort();
            let mut held: u64 = by_age.iter().map(|(_, _, b)| b).sum();
            let mut victims = Vec::new();
            for (_, p, bytes) in by_age {
                if self.live() - victims.len() <= max && held <= budget {
                    break;
                }
                if let Some(v) = idle.remove(&p) {
                    held -= bytes;
                    victims.push((p, v));
                }
            }
            victims
        };
        stop_later(
            victims,
            "to stay within the warm processes' count and memory",
        );
    }

    /// A place for one more process: stops the least recently used idle one if `max` are up.
    /// `None` when all `max` are building.
    fn reserve(&self, max: usize) -> Option<Ticket> {
        if max == 0 {
            return None;
        }
        let victim = {
            let mut idle = self.idle.lock().expect("warm lock");
            let victim = if self.live() >= max {
                let oldest = idle
                    .iter()
                    .min_by_key(|(_, w)| w.idle_since)
                    .map(|(p, _)| p.clone())?;
                idle.remove_entry(&oldest)
            } else {
                None
            };
            self.live.fetch_add(1, Ordering::SeqCst);
            victim
        };
        // Stopped at once (not later): its memory is what the new process is to use.
        if let Some((p, v)) = victim {
            log::info!(project = p; "warm process stopped to make room for another project's");
            drop(v);
        }
        Some(Ticket(self.live.clone()))
    }

    /// Stops processes idle for longer than `idle`.
    pub(crate) fn reap(&self, idle: Duration) {
        let victims: Vec<(String, Watcher)> = {
            let mut map = self.idle.lock().expect("warm lock");
            let old: Vec<String> = map
                .iter()
                .filter(|(_, w)| w.idle_since.elapsed() > idle)
                .map(|(p, _)| p.clone())
                .collect();
            old.into_iter()
                .filter_map(|p| map.remove_entry(&p))
                .collect()
        };
        stop_later(victims, "idle");
    }

    /// Stops every idle process (the agent is stopping).
    pub(crate) async fn stop_all(&self) {
        let all: Vec<Watcher> = self
            .idle
            .lock()
            .expect("warm lock")
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in all {
            w.stop().await;
        }
    }
}

fn stop_later(victims: Vec<(String, Watcher)>, why: &'static str) {
    if victims.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for (p, v) in victims {
            log::info!(project = p, why; "warm process stopped");
            v.stop().await;
        }
    });
}

/// Why a checkout cannot be rebuilt incrementally by a process that mirrors `tree` and whose
/// last build read `files`.
fn not_incremental(report: &CheckoutReport, tree: &str, files: &HashSet<String>) -> Option<String> {
    let some = |paths: &[String]| {
        let mut s = paths.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        if paths.len() > 3 {
            s.push_str(&format!(" and {} more", paths.len() - 3));
        }
        s
    };
    if report.full {
        return Some("the worktree was checked out in full".into());
    }
    if report.previous_tree.as_deref() != Some(tree) {
        return Some("the worktree changed since its last build".into());
    }
    if !report.deleted.is_empty() {
        return Some(format!("files were deleted ({})", some(&report.deleted)));
    }
    if !report.added.is_empty() {
        return Some(format!("files were added ({})", some(&report.added)));
    }
    let unread: Vec<String> = report
        .written
        .iter()
        .filter(|p| !files.contains(p.as_str()))
        .cloned()
        .collect();
    if !unread.is_empty() {
        return Some(format!(
            "the last build did not read {} (configuration, public files or new inputs)",
            some(&unread)
        ));
    }
    None
}

impl Watcher {
    /// Starts a warm process for `project`; its first build starts at once.
    async fn spawn(
        agent: &Agent,
        project: &str,
        key: Key,
        worktree: &Path,
        tree: &str,
        ticket: Ticket,
        seq: u64,
    ) -> Result<Self, String> {
        let cfg = &agent.cfg;
        let (uid, gid) = (cfg.sandbox_uid, cfg.sandbox_gid);
        let dir = cfg.state_dir.join("warm").join(project);
        let (app, out, upper, work) = (
            dir.join("app"),
            dir.join("out"),
            dir.join("upper"),
            dir.join("work"),
        );
        let driver = dir.join("warm.mjs");
        if dir.exists() {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(d))
                .await
                .expect("warm dir task")
                .map_err(|e| format!("clearing the warm dir: {e}"))?;
        }
        let scratch = sandbox::ScratchFs::mount(&dir, cfg.disk_bytes).map_err(|e| e.to_string())?;
        {
            let (app, out, upper, work, driver, worktree) = (
                app.clone(),
                out.clone(),
                upper.clone(),
                work.clone(),
                driver.clone(),
                worktree.to_owned(),
            );
            tokio::task::spawn_blocking(move || {
                let err = |what: &str, e: std::io::Error| format!("{what}: {e}");
                make_owned_dir(&out, uid, gid, 0o755).map_err(|e| err("creating /out", e))?;
                make_owned_dir(&upper, uid, gid, 0o755)
                    .map_err(|e| err("creating the overlay", e))?;
                std::fs::create_dir_all(&work).map_err(|e| err("creating the overlay", e))?;
                std::fs::write(&driver, DRIVER).map_err(|e| err("writing the driver", e))?;
                // Written here as root while nothing else can see it yet; from now on only
                // the sandbox writes in it (through the driver).
                copy_tree(&worktree, &app, uid, gid).map_err(|e| err("copying the worktree", e))?;
                // The mount point of the installed node_modules (a tree with its own is
                // never warm).
                let mount_point = app.join("node_modules");
                if mount_point.is_dir() {
                    return Ok(());
                }
                std::fs::create_dir(mount_point).map_err(|e| err("creating node_modules", e))
            })
            .await
            .expect("warm dir task")?;
        }
        let mut mounts = vec![
            Mount::Bind {
                src: worktree.to_owned(),
                dst: "/src".into(),
                writable: false,
            },
            Mount::Bind {
                src: app,
                dst: "/app".into(),
                writable: true,
            },
            Mount::Overlay {
                lower: vec![key.nm.join("node_modules")],
                upper,
                work,
                dst: "/app/node_modules".into(),
            },
            Mount::Bind {
                src: out.clone(),
                dst: "/out".into(),
                writable: true,
            },
            Mount::Bind {
                src: driver,
                dst: "/kiln-warm.mjs".into(),
                writable: false,
            },
        ];
        let vite = match &key.engine_dir {
            Some(d) => {
                mounts.push(Mount::Bind {
                    src: d.clone(),
                    dst: "/kiln-engine".into(),
                    writable: false,
                });
                "/kiln-engine/node_modules/vite"
            }
            None => "/app/node_modules/vite",
        };
        let mut env = crate::pipeline::sandbox_env(cfg, project, "production");
        env.push(("KILN_BASE".into(), key.base.clone()));
        let spec = Spec {
            // The agent's pid too: several agents (tests, a restart's leftovers) share the
            // cgroup tree, and a name found there is killed as stale.
            cgroup: format!("{project}-{CGROUP_MARKER}-{}-{seq}", std::process::id()),
            root: dir.join("root"),
            mounts,
            network: false,
            uid,
            gid,
            cwd: "/app".into(),
            argv: [
                &cfg.node.display().to_string(),
                "/kiln-warm.mjs",
                vite,
                "/app",
                &key.base,
                "/out",
                "/src",
            ]
            .map(str::to_owned)
            .to_vec(),
            env,
            limits: crate::pipeline::limits(cfg, cfg.build_timeout),
            stdin: true,
        };
        let process = sandbox::Process::spawn(&agent.exe, &spec)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            key,
            process,
            _scratch: scratch,
            out,
            tree: tree.to_owned(),
            files: HashSet::new(),
            built: None,
            pending: Vec::new(),
            idle_since: Instant::now(),
            idle_cpu: Duration::ZERO,
            _ticket: ticket,
        })
    }

    /// The output of its last build, which succeeded.
    pub(crate) fn out(&self) -> &Path {
        self.built
            .as_deref()
            .expect("only a built process is published")
    }

    /// Removes the outputs of earlier builds (published, or of rebuilds nobody waited for).
    async fn clear_outputs(&mut self) {
        self.built = None;
        let out = self.out.clone();
        tokio::task::spawn_blocking(move || {
            for e in std::fs::read_dir(&out).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("done-") {
                    // Symlink-safe: never follows a link the build left there.
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        })
        .await
        .expect("clearing task");
    }

    pub(crate) fn stats(&self) -> sandbox::Stats {
        self.process.stats()
    }

    pub(crate) async fn stop(self) {
        self.process.stop().await;
    }

    /// Why this process cannot serve a build with `key` now, if it cannot.
    fn unusable(&mut self, key: &Key) -> Option<String> {
        if self.process.has_exited() {
            return Some("it had exited".into());
        }
        if &self.key != key {
            return Some("the engine, base or install changed".into());
        }
        let idle = self.idle_since.elapsed();
        let used = self.process.stats().cpu_time.saturating_sub(self.idle_cpu);
        if used > Duration::from_secs(1) + idle.mul_f64(IDLE_CPU_SHARE) {
            return Some(format!(
                "it used {:.1}s of CPU in {:.0}s idle: something the project started keeps running",
                used.as_secs_f64(),
                idle.as_secs_f64()
            ));
        }
        None
    }

    /// Has the process copy `changed` from the checkout into its tree, then waits for the
    /// build that includes every one of them (one that started after the copy and after the
    /// bundler reported a change of each); with nothing `changed`, for the first build of a new
    /// process. Output goes to `output`; events are read off it.
    async fn wait(
        &mut self,
        changed: &[String],
        timeout: Duration,
        cancel: &CancellationToken,
        output: &mut (dyn FnMut(&[u8]) + Send),
    ) -> End {
        let deadline = tokio::time::Instant::now() + timeout;
        let first = changed.is_empty();
        let mut applied = first;
        // The changed files the bundler has not reported a change of since they were written.
        let mut need: HashSet<&str> = changed.iter().map(String::as_str).collect();
        if !first {
            self.clear_outputs().await;
            let mut line = serde_json::to_vec(&serde_json::json!({
                "cmd": "apply",
                "files": changed,
            }))
            .expect("serializes");
            line.push(b'\n');
            if let Err(e) = self.process.send(&line).await {
                return End::Lost(format!("it does not take requests ({e})"));
            }
        }
        let mut armed = first;
        let mut running = false;
        let mut errors: Vec<String> = Vec::new();
        let mut heard = tokio::time::Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // A new process loads its config and plugins before it says anything.
            let stall = if running || first {
                deadline
            } else {
                (heard + STALL).min(deadline)
            };
            let events = tokio::select! {
                // Cancellation-safe: a pipe read, timers, a token.
                read = self.process.read(&mut buf) => match read {
                    Some(n) => self.feed(&buf[..n], output),
                    None => {
                        let s = self.process.stats();
                        return End::Lost(if s.oom_kills > 0 {
                            "it ran out of memory and was killed".into()
                        } else {
                            "it exited".into()
                        });
                    }
                },
                () = tokio::time::sleep_until(stall), if stall < deadline => {
                    let what = if !applied {
                        "copy the changed files".to_owned()
                    } else if need.is_empty() {
                        "start a build".to_owned()
                    } else {
                        let mut paths: Vec<&&str> = need.iter().collect();
                        paths.sort();
                        format!("notice the change to {}", paths[0])
                    };
                    return End::Lost(format!("it did not {what} within {}s", STALL.as_secs()));
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.process.kill();
                    return End::TimedOut;
                }
                () = cancel.cancelled() => {
                    self.process.kill();
                    return End::Cancelled;
                }
            };
            for ev in events {
                heard = tokio::time::Instant::now();
                match ev {
                    Event::Applied { error: Some(e) } => {
                        return End::Lost(format!("it could not copy the changed files: {e}"));
                    }
                    Event::Applied { error: None } => applied = true,
                    // A change reported before "applied" was of an older write.
                    Event::Change { id } => {
                        if applied {
                            need.remove(id.as_str());
                        }
                    }
                    Event::Start => {
                        running = true;
                        if applied && need.is_empty() {
                            armed = true;
                            errors.clear();
                        }
                    }
                    Event::Error { message } => {
                        if armed {
                            errors.push(message);
                        }
                    }
                    Event::End { ms, files, out } => {
                        running = false;
                        if armed {
                            self.files = files.into_iter().collect();
                            if !errors.is_empty() {
                                return End::Failed(errors.join("\n"));
                            }
                            let Some(out) = out.filter(|o| {
                                o.strip_prefix("done-").is_some_and(|n| {
                                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                                })
                            }) else {
                                return End::Lost("its build left no output".into());
                            };
                            self.built = Some(self.out.join(out));
                            return End::Built { ms };
                        }
                    }
                }
            }
        }
    }

    /// Splits output into log text and events; a partial line waits for the rest (up to
    /// [`MAX_LINE`]).
    fn feed(&mut self, bytes: &[u8], output: &mut (dyn FnMut(&[u8]) + Send)) -> Vec<Event> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let line = &self.pending[start..start + nl + 1];
            match find(line, MARK).and_then(|at| {
                let ev = serde_json::from_slice::<Event>(&line[at + MARK.len()..]).ok()?;
                Some((at, ev))
            }) {
                Some((at, ev)) => {
                    if at > 0 {
                        output(&line[..at]);
                        output(b"\n");
                    }
                    events.push(ev);
                }
                None => output(line),
            }
            start += nl + 1;
        }
        self.pending.drain(..start);
        // Text of a line still open goes out now (a progress line, a prompt), but for what may
        // be the start of an event.
        let keep = match find(&self.pending, MARK) {
            Some(_) if self.pending.len() <= MAX_LINE => self.pending.len(),
            Some(_) => 0,
            None => self.pending.len().min(MARK.len() - 1),
        };
        let flush = self.pending.len() - keep;
        if flush > 0 {
            output(&self.pending[..flush]);
            self.pending.drain(..flush);
        }
        events
    }
}

/// Copies the worktree `src` (regular files, executables, symlinks) to a new `dst` owned by
/// `uid`/`gid`.
fn copy_tree(src: &Path, dst: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    make_owned_dir(dst, uid, gid, 0o755)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type()?;
        if ft.is_dir() {
            copy_tree(&from, &to, uid, gid)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            std::os::unix::fs::lchown(&to, Some(uid), Some(gid))?;
        } else if ft.is_file() {
            std::fs::copy(&from, &to)?;
            std::os::unix::fs::chown(&to, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What a warm build gave the pipeline.
pub(crate) enum Warmed {
    /// Built (or unchanged since the process's last build): publish `watcher.out()`, then give
    /// the process back with [`Warm::put`].
    Built(Box<Watcher>),
    /// The build failed in a way the project owns; the process was given back or stopped.
    Failed {
        state: crate::status::State,
        message: String,
    },
    /// No warm process could serve: build cold (the reason is in the log).
    Cold,
}

impl Agent {
    /// Builds `project` with its warm process: an incremental rebuild when the checkout allows
    /// one, else the first build of a new process. See the module docs. The status and metrics
    /// say how: `started` (a new process's first build), `rebuilt` (incremental) or `reused`
    /// (nothing changed since its last build).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn build_warm(
        &self,
        project: &str,
        key: Key,
        worktree: &Path,
        report: &CheckoutReport,
        force: bool,
        cancel: &CancellationToken,
        log: &mut crate::status::Log,
    ) -> Warmed {
        use crate::status::State;
        let max = self.cfg.warm_max;
        let mut watcher = None;
        if let Some(mut w) = self.warm.take(project) {
            let why = w
                .unusable(&key)
                .or_else(|| not_incremental(report, &w.tree, &w.files))
                .or_else(|| {
                    (report.written.is_empty() && (force || w.built.is_none()))
                        .then(|| "a rebuild with no change was asked for".to_owned())
                });
            match why {
                Some(why) => {
                    log.note(&format!("warm process restarted: {why}"));
                    w.stop().await;
                }
                None => watcher = Some(w),
            }
        }
        let (mut w, changed) = match watcher {
            Some(w) if report.written.is_empty() => {
                log.note("no file changed since the warm process's last build: publishing it");
                self.served_warm(project, "reused");
                return Warmed::Built(Box::new(w));
            }
            Some(mut w) => {
                w.tree = report.tree.clone();
                (w, report.written.as_slice())
            }
            None => {
                let Some(ticket) = self.warm.reserve(max) else {
                    log.note(&format!(
                        "all {max} warm processes are building: building cold"
                    ));
                    return Warmed::Cold;
                };
                let seq = self.warm.seq.fetch_add(1, Ordering::SeqCst);
                match Watcher::spawn(self, project, key, worktree, &report.tree, ticket, seq).await
                {
                    Ok(w) => (w, &[][..]),
                    Err(e) => {
                        log.note(&format!("cannot start a warm process ({e}): building cold"));
                        return Warmed::Cold;
                    }
                }
            }
        };
        let first = changed.is_empty();
        let before = w.stats();
        let end = {
            let mut output = |b: &[u8]| log.write(b);
            w.wait(changed, self.cfg.build_timeout, cancel, &mut output)
                .await
        };
        let after = w.stats();
        self.update(project, |s| {
            s.peak_memory_bytes = s.peak_memory_bytes.max(after.peak_memory_bytes);
            s.cpu_time_ms += after.cpu_time.saturating_sub(before.cpu_time).as_millis() as u64;
        });
        let how = if first { "started" } else { "rebuilt" };
        if !matches!(end, End::Lost(_)) {
            self.served_warm(project, how);
        }
        match end {
            End::Built { ms } => {
                self.update(project, |s| s.vite_ms = Some(ms));
                log.note(&format!(
                    "warm process {how}: Vite built in {ms} ms; peak memory {} MiB since it started",
                    after.peak_memory_bytes >> 20
                ));
                Warmed::Built(Box::new(w))
            }
            End::Failed(message) if !after.pids_limit_hit => {
                if w.process.has_exited() {
                    w.stop().await;
                } else {
                    self.warm.put(project, w, max, self.cfg.warm_memory_bytes);
                }
                Warmed::Failed {
                    state: State::Failed,
                    message: format!(
                        "vite build failed: {}",
                        crate::pipeline::strip_ansi(&message)
                    ),
                }
            }
            End::Failed(message) => {
                w.stop().await;
                Warmed::Failed {
                    state: State::Failed,
                    message: format!(
                        "vite build failed: {}\n(the limit of {} processes was reached)",
                        crate::pipeline::strip_ansi(&message),
                        self.cfg.pids
                    ),
                }
            }
            End::TimedOut => {
                w.stop().await;
                Warmed::Failed {
                    state: State::TimedOut,
                    message: format!(
                        "vite build (warm) timed out after {}s and was killed",
                        self.cfg.build_timeout.as_secs()
                    ),
                }
            }
            End::Cancelled => {
                w.stop().await;
                Warmed::Failed {
                    state: State::Cancelled,
                    message: "cancelled".into(),
                }
            }
            End::Lost(why) => {
                log.note(&format!("warm process stopped: {why}; building cold"));
                w.stop().await;
                Warmed::Cold
            }
        }
    }
}

impl Agent {
    fn served_warm(&self, project: &str, how: &str) {
        self.metrics.warm(how);
        self.update(project, |s| s.warm = Some(how.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(written: &[&str], added: &[&str], deleted: &[&str]) -> CheckoutReport {
        let v = |s: &[&str]| s.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        CheckoutReport {
            written: v(written),
            added: v(added),
            deleted: v(deleted),
            full: false,
            previous_tree: Some("t1".into()),
            tree: "t2".into(),
        }
    }

    #[test]
    fn only_in_place_changes_to_files_the_build_read_are_incremental() {
        let files: HashSet<String> = ["src/App.tsx", "src/main.tsx", "index.html"]
            .map(String::from)
            .into();
        assert_eq!(
            not_incremental(&report(&["src/App.tsx"], &[], &[]), "t1", &files),
            None
        );
        assert_eq!(not_incremental(&report(&[], &[], &[]), "t1", &files), None);
        let why = |r| not_incremental(&r, "t1", &files).unwrap();
        assert!(why(report(&["vite.config.ts"], &[], &[])).contains("vite.config.ts"));
        assert!(why(report(
            &["src/new.tsx", "src/App.tsx"],
            &["src/new.tsx"],
            &[]
        ))
        .contains("added"));
        assert!(why(report(&[], &[], &["src/App.tsx"])).contains("deleted"));
        let mut full = report(&["src/App.tsx"], &[], &[]);
        full.full = true;
        assert!(why(full).contains("in full"));
        assert!(
            not_incremental(&report(&["src/App.tsx"], &[], &[]), "t0", &files)
                .unwrap()
                .contains("changed since"),
            "a checkout the process did not see leaves its copy behind"
        );
    }
}
