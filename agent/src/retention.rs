//! What stays on this machine's disk, and what is taken off it when it fills up.
//!
//! - Retention, per project: the newest `--keep-builds` published builds and every build
//!   younger than `--keep-builds-secs` stay, and always the current build and the builds of the
//!   commits a live share link names. Applied after every publish (the pipeline) and by the
//!   periodic pass here, which reads a project's shares from the store only when it is about to
//!   retire one of its builds.
//! - Eviction: when the filesystem holding the state or the volume dir is fuller than
//!   `--disk-high-water` percent, idle projects' worktrees and node_modules go, least recently
//!   built or viewed first, until the estimate is under `--disk-low-water`. Their published builds stay
//!   served; the next build checks out and installs again from scratch.
//! - The pnpm store is pruned after evictions (at most once an hour): `pnpm store prune`
//!   removes the files no node_modules on this disk links any more.
//!
//! Sizes come from a per-project record measured once per build (`usage.json`), so neither the
//! report nor the eviction plan walks every node_modules. The pass runs every `--gc-interval`
//! and after each build (the disk check only); `GET /api/retention` computes what a pass would
//! do, `POST /api/retention/run` runs one.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gitstore::ProjectId;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::publish;
use crate::sandbox::{self, Exit, Mount, Spec};
use crate::status::{State, Status};

/// The store is pruned at most this often: a prune stats every file of the store.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Where evicted and deleted directories wait for their deletion, outside the names builds use.
const TRASH: &str = "trash";
/// Projects listed by a report unless the caller asks for more.
pub const REPORT_LIMIT: usize = 500;

/// The state of the periodic pass.
#[derive(Default)]
pub(crate) struct Gc {
    wake: tokio::sync::Notify,
    /// One pass (or API run) at a time.
    running: tokio::sync::Mutex<()>,
    last_prune: Mutex<Option<Instant>>,
    /// node_modules were removed (evicted, or a project deleted) since the last prune.
    freed: AtomicBool,
}

impl Gc {
    /// Asks for a disk check soon (after a build).
    pub(crate) fn poke(&self) {
        self.wake.notify_one();
    }

    /// Something the store's files were linked from is gone: the next prune may reclaim them.
    pub(crate) fn note_freed(&self) {
        self.freed.store(true, Ordering::SeqCst);
    }

    fn prune_due(&self) -> Result<(), String> {
        if !self.freed.load(Ordering::SeqCst) {
            return Err("no node_modules were removed since the last prune".into());
        }
        match *self.last_prune.lock().expect("prune time") {
            Some(t) if t.elapsed() < PRUNE_EVERY => Err(format!(
                "the store was pruned {} min ago (at most once an hour)",
                t.elapsed().as_secs() / 60
            )),
            _ => Ok(()),
        }
    }
}

// ---- Sizes ---------------------------------------------------------------------------------

/// Bytes a project takes on this disk, measured at the end of each build.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Usage {
    pub(crate) worktree_bytes: u64,
    pub(crate) node_modules_bytes: u64,
    /// Its publish directory: kept builds and the assets union (hard links counted once).
    pub(crate) publish_bytes: u64,
    pub(crate) measured_at_ms: u64,
}

const USAGE: &str = "usage.json";

impl Usage {
    pub(crate) fn load(project_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(project_dir.join(USAGE)).ok()?).ok()
    }

    fn save(&self, project_dir: &Path) {
        let bytes = serde_json::to_vec(self).expect("serializes");
        if let Err(e) = crate::fsutil::write_atomic(&project_dir.join(USAGE), &bytes) {
            log::warn!(dir:% = project_dir.display(), error:% = e; "cannot save the project's disk usage");
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.worktree_bytes + self.node_modules_bytes + self.publish_bytes
    }

    fn evictable(&self) -> u64 {
        self.worktree_bytes + self.node_modules_bytes
    }
}

/// Allocated bytes under `path` (not following symlinks), each inode counted once: what `du`
/// says. 0 when it is missing.
pub(crate) fn dir_bytes(path: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        total += m.blocks() * 512;
        if m.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// The project's install directory (`volume/nm/<name>`), if it has one.
fn install_dir(agent: &Agent, project: &str) -> Option<PathBuf> {
    #[derive(Deserialize)]
    struct Record {
        nm: String,
    }
    let raw = std::fs::read(agent.project_dir(project).join("install.json")).ok()?;
    let r: Record = serde_json::from_slice(&raw).ok()?;
    // The name came from this agent, but the file is on disk: never let it leave `nm/`.
    (!r.nm.is_empty() && r.nm.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| agent.volume().join("nm").join(r.nm))
}

/// Measures the project after a build and records it. node_modules is walked again only when
/// the build installed (it is the big one, and nothing else writes it).
pub(crate) fn measure(agent: &Agent, project: &str, installed: bool) -> Usage {
    let dir = agent.project_dir(project);
    let old = Usage::load(&dir);
    let node_modules_bytes = match old {
        Some(u) if !installed && u.node_modules_bytes > 0 => u.node_modules_bytes,
        _ => install_dir(agent, project).map_or(0, |d| dir_bytes(&d)),
    };
    let usage = Usage {
        worktree_bytes: dir_bytes(&dir.join("worktree")),
        node_modules_bytes,
        publish_bytes: dir_bytes(&publish::project_dir(&agent.cfg.publish_dir, project)),
        measured_at_ms: crate::status::now_ms(),
    };
    if dir.is_dir() {
        usage.save(&dir);
    }
    usage
}

// ---- Which builds stay ----------------------------------------------------------------------

/// A published build on disk, as retention sees it.
#[derive(Clone, Debug)]
pub(crate) struct OnDisk {
    pub(crate) build: u64,
    /// None when the build fell out of the status history (it then cannot be matched to a
    /// share; a share of its commit builds it again when opened).
    pub(crate) commit: Option<String>,
    pub(crate) finished_at_ms: u64,
}

/// Builds to retire: every build on disk but the newest `keep`, those younger than `keep_for`,
/// `current`, the builds of `pinned` commits and `protect`. Shared builds are kept besides the
/// newest `keep`, not among them: opening an old share link does not push out a recent build.
pub(crate) fn to_retire(
    builds: &[OnDisk],
    current: Option<u64>,
    pinned: &HashSet<String>,
    protect: &[u64],
    keep: usize,
    keep_for: Duration,
    now_ms: u64,
) -> Vec<u64> {
    let is_pinned = |b: &OnDisk| b.commit.as_ref().is_some_and(|c| pinned.contains(c));
    let mut newest: Vec<u64> = builds
        .iter()
        .filter(|b| !is_pinned(b))
        .map(|b| b.build)
        .collect();
    newest.sort_unstable_by(|a, b| b.cmp(a));
    newest.truncate(keep);
    let young = |b: &OnDisk| now_ms.saturating_sub(b.finished_at_ms) < keep_for.as_millis() as u64;
    let mut out: Vec<u64> = builds
        .iter()
        .filter(|b| {
            !newest.contains(&b.build)
                && !young(b)
                && Some(b.build) != current
                && !protect.contains(&b.build)
                && !is_pinned(b)
        })
        .map(|b| b.build)
        .collect();
    out.sort_unstable();
    out
}

/// The project's published builds with what the status knows of them.
fn on_disk(publish_dir: &Path, status: Option<&Status>) -> Vec<OnDisk> {
    let mut known: HashMap<u64, (Option<String>, u64)> = HashMap::new();
    if let Some(st) = status {
        for h in st.history.iter().filter(|h| h.state == State::Ready) {
            known
                .entry(h.build)
                .or_insert((h.commit.clone(), h.finished_at_ms));
        }
        if let Some(g) = &st.last_good {
            known
                .entry(g.build)
                .or_insert((Some(g.commit.clone()), g.published_at_ms));
        }
    }
    publish::kept_builds(publish_dir)
        .into_iter()
        .map(|build| {
            let (commit, at) = known.get(&build).cloned().unwrap_or_else(|| {
                // Its directory's time: when its last entry was written, before its publish.
                let mtime = std::fs::metadata(publish_dir.join("builds").join(build.to_string()))
                    .map(|m| m.mtime().max(0) as u64 * 1000)
                    .unwrap_or(0);
                (None, mtime)
            });
            OnDisk {
                build,
                commit,
                finished_at_ms: at,
            }
        })
        .collect()
}

/// Commits named by a live share in the project's latest manifest.
pub(crate) fn pinned_commits(m: &gitstore::manifest::Manifest) -> HashSet<String> {
    let now = crate::status::now_ms() / 1000;
    m.shares
        .iter()
        .filter(|s| s.is_live(now))
        .map(|s| s.commit.to_ascii_lowercase())
        .collect()
}

impl Agent {
    /// The builds of `project` retention would retire now, given the commits shares pin.
    pub(crate) fn retirable(
        &self,
        project: &str,
        pinned: &HashSet<String>,
        protect: &[u64],
    ) -> Vec<u64> {
        let dir = publish::project_dir(&self.cfg.publish_dir, project);
        let status = self.status(project);
        to_retire(
            &on_disk(&dir, status.as_ref()),
            publish::current(&dir),
            pinned,
            protect,
            self.cfg.keep_builds,
            self.cfg.keep_builds_for,
            crate::status::now_ms(),
        )
    }

    /// Retires `builds` of an idle project, returning those retired with their sizes.
    fn retire_now(&self, project: &str, builds: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let dir = publish::project_dir(&self.cfg.publish_dir, project);
        let ids: Vec<u64> = builds.iter().map(|(b, _)| *b).collect();
        let retired = {
            let locks = self.locks(project);
            let _switching = locks.publish.lock().expect("publish lock");
            publish::retire(&dir, &ids)
        };
        if let Err(e) = publish::sweep(&dir) {
            log::warn!(project, error:% = e; "pinned URLs may miss assets: relinking them failed");
        }
        self.metrics
            .add(&self.metrics.builds_retired, retired.len() as u64);
        builds
            .iter()
            .filter(|(b, _)| retired.contains(b))
            .copied()
            .collect()
    }
}

// ---- Eviction -------------------------------------------------------------------------------

impl Agent {
    /// Takes the worktree and node_modules of an idle project off the disk; its published builds
    /// stay. Under the project's slot lock no build can start meanwhile, so both are renamed
    /// aside there (quick) and deleted after. False when the project was building.
    fn evict(&self, project: &str) -> bool {
        let dir = self.project_dir(project);
        let state_trash = self.cfg.state_dir.join(TRASH);
        let volume_trash = self.volume().join(TRASH);
        let mut aside = Vec::new();
        let moved = self.while_idle(project, || {
            // Killed before what it has mounted goes.
            drop(self.warm.take(project));
            let nm = install_dir(self, project);
            for (from, trash) in [
                (Some(dir.join("worktree")), &state_trash),
                (nm, &volume_trash),
            ] {
                let Some(from) = from.filter(|f| f.exists()) else {
                    continue;
                };
                let to = trash.join(format!("{project}-{}", random_suffix()));
                let moved =
                    std::fs::create_dir_all(trash).and_then(|()| std::fs::rename(&from, &to));
                match moved {
                    Ok(()) => aside.push(to),
                    Err(e) => {
                        log::warn!(project, dir:% = from.display(), error:% = e; "cannot evict")
                    }
                }
            }
            // Without their records the next build checks out everything and installs.
            let _ = std::fs::remove_file(dir.join("checkout.json"));
            let _ = std::fs::remove_file(dir.join("install.json"));
        });
        if !moved {
            return false;
        }
        for d in aside {
            if let Err(e) = std::fs::remove_dir_all(&d) {
                log::warn!(project, dir:% = d.display(), error:% = e; "cannot delete an evicted directory");
            }
        }
        if let Some(mut u) = Usage::load(&dir) {
            u.worktree_bytes = 0;
            u.node_modules_bytes = 0;
            u.save(&dir);
        }
        self.gc.note_freed();
        self.metrics.inc(&self.metrics.evictions);
        true
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    hex::encode(rand::rng().random::<[u8; 8]>())
}

/// Use of one filesystem, as `df` computes it.
#[derive(Clone, Debug, Serialize)]
pub struct Disk {
    pub path: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub used_percent: f64,
    pub high_water_percent: u8,
    pub low_water_percent: u8,
    pub over_high_water: bool,
}

impl Agent {
    /// The fuller of the filesystems holding the state dir and the volume.
    pub(crate) fn disk(&self) -> Option<Disk> {
        [&self.cfg.state_dir, &self.cfg.volume_dir]
            .into_iter()
            .filter_map(|p| {
                let s = nix::sys::statvfs::statvfs(p.as_path()).ok()?;
                let f = s.fragment_size();
                let size = s.blocks() * f;
                let used = size.saturating_sub(s.blocks_free() * f);
                // df's percentage: what is used of what non-root users could have.
                let usable = used + s.blocks_available() * f;
                let pct = if usable == 0 {
                    0.0
                } else {
                    used as f64 * 100.0 / usable as f64
                };
                Some(Disk {
                    path: p.display().to_string(),
                    size_bytes: usable,
                    used_bytes: used,
                    used_percent: (pct * 10.0).round() / 10.0,
                    high_water_percent: self.cfg.disk_high_water,
                    low_water_percent: self.cfg.disk_low_water,
                    over_high_water: pct > f64::from(self.cfg.disk_high_water),
                })
            })
            .max_by(|a, b| a.used_percent.total_cmp(&b.used_percent))
    }
}

impl Agent {
    /// For `/healthz`: the disk is a problem once it is nearly out of room, 5% of it or 1 GiB
    /// left, whichever is less. Past the high-water mark alone is not: eviction is working
    /// then, and a fixed "1 GiB free" floor would call a small dedicated state disk broken
    /// while it is empty.
    pub(crate) fn disk_problem(&self) -> Option<String> {
        let Some(d) = self.disk() else {
            return Some(format!(
                "disk: cannot read the filesystem of {}",
                self.cfg.state_dir.display()
            ));
        };
        let free = d.size_bytes.saturating_sub(d.used_bytes);
        (free < (d.size_bytes / 20).min(1 << 30)).then(|| {
            format!(
                "disk: {} is {}% used, {} MiB free; builds that need room fail until eviction \
                 or the operator frees some",
                d.path,
                d.used_percent,
                free >> 20
            )
        })
    }

    /// A build failure a full disk caused, told as such: which filesystem, how full, and what
    /// happens next. None for any other failure. It reads the message because by now each
    /// phase has formatted its own error: an `io::Error` says `(os error 28)` for ENOSPC (122,
    /// EDQUOT, for a quota) whichever step hit it, and node and git say it in words.
    pub(crate) fn disk_full_message(&self, message: &str) -> Option<String> {
        if ![
            "(os error 28)",
            "(os error 122)",
            "ENOSPC",
            "No space left on device",
        ]
        .iter()
        .any(|code| message.contains(code))
        {
            return None;
        }
        let place = self.disk().map_or_else(
            || self.cfg.state_dir.display().to_string(),
            |d| format!("{} is {}% used", d.path, d.used_percent),
        );
        let next = if message.contains("(retry ") {
            "the sync is tried again by itself"
        } else {
            "push again or POST /build once there is room"
        };
        Some(format!(
            "this build machine's disk is full ({place}): {message}. The last good preview stays \
             served; idle projects' worktrees and node_modules are evicted past {}% use, and {next}",
            self.cfg.disk_high_water
        ))
    }
}

// ---- The pnpm store -------------------------------------------------------------------------

/// A lock on the shared pnpm store: installs hold it shared, a prune exclusively, so a prune
/// never deletes a file an install has just added and not linked yet. A file lock, so agents
/// (or test stacks) sharing a volume take turns too.
pub(crate) async fn lock_store(
    volume: &Path,
    exclusive: bool,
) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = volume.join("store.lock");
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let how = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        nix::fcntl::Flock::lock(f, how).map_err(|(_, e)| std::io::Error::from(e))
    })
    .await
    .expect("store lock task")
}

/// What a store prune did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Prune {
    pub ran: bool,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_files: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_packages: Option<u64>,
    pub duration_ms: u64,
}

impl Agent {
    /// `pnpm store prune` against the shared store, in the install sandbox's setting (the
    /// volume at `/kiln`, the sandbox user, the install environment) but without network.
    async fn prune_store(&self) -> Prune {
        let t = Instant::now();
        let cfg = &self.cfg;
        let lock = match lock_store(&cfg.volume_dir, true).await {
            Ok(l) => l,
            Err(e) => {
                return Prune {
                    message: format!("cannot lock the store: {e}"),
                    ..Prune::default()
                }
            }
        };
        let suffix = random_suffix();
        let scratch = cfg
            .state_dir
            .join("builds")
            .join(format!("store-prune-{suffix}"));
        let spec = Spec {
            cgroup: format!("store-prune-{suffix}"),
            root: scratch.join("root"),
            mounts: vec![Mount::Bind {
                src: cfg.volume_dir.clone(),
                dst: "/kiln".into(),
                writable: true,
            }],
            network: false,
            uid: cfg.sandbox_uid,
            gid: cfg.sandbox_gid,
            // Not the volume's root: pnpm lists its working directory, and that one is not
            // listable by design.
            cwd: "/tmp".into(),
            argv: vec![
                cfg.pnpm.display().to_string(),
                "store".into(),
                "prune".into(),
                "--store-dir=/kiln/store".into(),
            ],
            env: crate::pipeline::sandbox_env(cfg, "kiln-store", "development"),
            limits: crate::pipeline::limits(cfg, cfg.install_timeout),
            stdin: false,
        };
        let mut out = Vec::new();
        let run = {
            let mut output = |b: &[u8]| {
                if out.len() < 64 << 10 {
                    out.extend_from_slice(b);
                }
            };
            sandbox::run(&self.exe, &spec, &mut output, CancellationToken::new()).await
        };
        drop(lock);
        let _ = std::fs::remove_dir_all(&scratch);
        *self.gc.last_prune.lock().expect("prune time") = Some(Instant::now());
        self.gc.freed.store(false, Ordering::SeqCst);
        let text = String::from_utf8_lossy(&out);
        let count = |what: &str| {
            text.lines().find_map(|l| {
                let rest = l.trim().strip_prefix("Removed ")?;
                let (n, unit) = rest.split_once(' ')?;
                unit.starts_with(what).then(|| n.parse().ok())?
            })
        };
        let duration_ms = t.elapsed().as_millis() as u64;
        let (ran, message) = match run.map(|o| o.exit) {
            Ok(Exit::Code(0)) => {
                self.metrics.inc(&self.metrics.store_prunes);
                (true, "pnpm store prune finished".to_owned())
            }
            Ok(exit) => {
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
                (
                    false,
                    format!("pnpm store prune ended with {exit:?}: {tail}"),
                )
            }
            Err(e) => (false, format!("pnpm store prune could not run: {e}")),
        };
        if ran {
            log::info!(files:? = count("file"), packages:? = count("package"), duration_ms; "pruned the pnpm store");
        } else {
            log::warn!(error = message; "store prune failed");
        }
        Prune {
            ran,
            message,
            removed_files: count("file"),
            removed_packages: count("package"),
            duration_ms,
        }
    }
}

// ---- The pass and its report ----------------------------------------------------------------

/// What a pass does.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Only compute what would be freed.
    pub dry_run: bool,
    /// Retire builds too (the disk check after a build skips it).
    pub retention: bool,
    /// Evict every idle project, whatever the disk use.
    pub evict_all: bool,
    /// Projects listed in the report (the totals count all).
    pub limit: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RetiredBuild {
    pub build: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProjectReport {
    pub project: String,
    /// Builds retention retires (or retired).
    pub retire: Vec<RetiredBuild>,
    pub retire_bytes: u64,
    /// No build queued or running (nor finishing): its worktree and node_modules may be
    /// evicted.
    pub idle: bool,
    pub worktree_bytes: u64,
    pub node_modules_bytes: u64,
    /// Evicted (or, in a dry run, would be) by this pass.
    pub evict: bool,
    pub last_built_at_ms: Option<u64>,
    pub last_viewed_at_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub projects: usize,
    pub builds: usize,
    pub build_bytes: u64,
    pub evictions: usize,
    pub evict_bytes: u64,
    /// What idle projects' worktrees and node_modules take, evicted or not.
    pub evictable_bytes: u64,
    /// build_bytes + evict_bytes. node_modules files are mostly hard links into the pnpm
    /// store: their bytes come back from the store prune that follows evictions.
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// False for `GET /api/retention` (what a pass would do now).
    pub ran: bool,
    pub disk: Option<Disk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_after: Option<Disk>,
    pub keep_builds: usize,
    pub keep_builds_secs: u64,
    pub totals: Totals,
    /// Projects with something to free, evictions first, then the least recently used.
    pub projects: Vec<ProjectReport>,
    pub prune: Prune,
}

/// A project as the pass sees it before deciding.
struct Candidate {
    id: ProjectId,
    retire: Vec<u64>,
    idle: bool,
    usage: Usage,
    last_built_at_ms: Option<u64>,
    last_viewed_at_ms: Option<u64>,
}

impl Candidate {
    /// Built or viewed, whichever is later: a project someone is looking at is likely to be
    /// pushed again soon.
    fn last_used_at_ms(&self) -> u64 {
        self.last_built_at_ms
            .max(self.last_viewed_at_ms)
            .unwrap_or(0)
    }
}

impl Agent {
    /// Starts the periodic pass: every `--gc-interval` a full one, and a disk check after each
    /// build.
    pub fn start_gc(self: &Arc<Self>) {
        // Left by a crash mid-eviction or mid-deletion.
        for d in [self.cfg.state_dir.join(TRASH), self.volume().join(TRASH)] {
            let _ = std::fs::remove_dir_all(d);
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let interval = agent.cfg.gc_interval;
            let mut next_full = tokio::time::Instant::now() + interval;
            loop {
                let full = tokio::select! {
                    () = tokio::time::sleep_until(next_full) => true,
                    () = agent.gc.wake.notified() => false,
                };
                if full {
                    next_full = tokio::time::Instant::now() + interval;
                }
                let opts = Options {
                    retention: full,
                    limit: 0,
                    ..Options::default()
                };
                agent.warm.reap(agent.cfg.warm_idle);
                let r = agent.gc_pass(opts).await;
                if r.totals.bytes > 0 || r.prune.ran {
                    log::info!(
                        retired = r.totals.builds, retired_bytes = r.totals.build_bytes,
                        evicted = r.totals.evictions, evicted_bytes = r.totals.evict_bytes,
                        pruned = r.prune.ran; "reclaimed disk"
                    );
                }
                if full {
                    agent.retry_refused().await;
                }
            }
        });
    }

    /// One pass: retention over every idle project, then the disk check and its evictions, then
    /// the store prune when due. A dry run changes nothing and reports what a pass would do.
    pub async fn gc_pass(self: &Arc<Self>, opts: Options) -> Report {
        let _one_pass = self.gc.running.lock().await;
        let agent = self.clone();
        let (disk, mut candidates) = tokio::task::spawn_blocking(move || {
            let disk = agent.disk();
            // The check after a build is a statvfs unless the disk is past its mark: it must not
            // read every project's records each time.
            let pressed = opts.evict_all || disk.as_ref().is_some_and(|d| d.over_high_water);
            let candidates = if opts.retention || pressed {
                agent.candidates(opts.retention)
            } else {
                Vec::new()
            };
            (disk, candidates)
        })
        .await
        .expect("gc task");
        // Shares are read from the store only for projects with builds to retire, right before
        // deciding: a share created since the last build protects its build.
        for c in candidates.iter_mut().filter(|c| !c.retire.is_empty()) {
            c.retire = match gitstore::manifest::latest(&self.store, &c.id).await {
                Ok(m) => self.retirable(c.id.as_str(), &pinned_commits(&m), &[]),
                Err(e) => {
                    log::warn!(project = c.id.as_str(), error:% = e; "cannot read the project's shares; retiring none of its builds");
                    Vec::new()
                }
            };
        }
        let agent = self.clone();
        let mut report =
            tokio::task::spawn_blocking(move || agent.reclaim(opts, disk, &candidates))
                .await
                .expect("gc task");
        report.prune = match self.gc.prune_due() {
            Err(why) => Prune {
                message: format!("not due: {why}"),
                ..Prune::default()
            },
            Ok(()) if opts.dry_run => Prune {
                message: "due: the store would be pruned".into(),
                ..Prune::default()
            },
            Ok(()) => self.prune_store().await,
        };
        if !opts.dry_run {
            report.disk_after = self.disk();
        }
        report
    }

    /// Every local project with what it holds, least recently built or viewed first (never used
    /// ones before any other); with `retention`, the builds it could retire unless shared.
    fn candidates(&self, retention: bool) -> Vec<Candidate> {
        let active: HashSet<String> = self.active_projects().into_iter().collect();
        let none = HashSet::new();
        let mut out: Vec<Candidate> = self
            .local_projects()
            .into_iter()
            .filter(|id| !self.is_gone(id.as_str()))
            .map(|id| {
                let p = id.as_str();
                let idle = !active.contains(p);
                let retire = if retention && idle {
                    self.retirable(p, &none, &[])
                } else {
                    Vec::new()
                };
                // Built before sizes were recorded: measured once, here.
                let usage =
                    Usage::load(&self.project_dir(p)).unwrap_or_else(|| measure(self, p, true));
                let status = self.status(p);
                let last_built_at_ms = status
                    .as_ref()
                    .and_then(|s| s.finished_at_ms.or(s.started_at_ms));
                Candidate {
                    id,
                    retire,
                    idle,
                    usage,
                    last_built_at_ms,
                    last_viewed_at_ms: status.and_then(|s| s.last_viewed_at_ms),
                }
            })
            .collect();
        out.sort_by_key(|c| (c.last_used_at_ms(), c.id.as_str().to_owned()));
        out
    }

    /// Retires and evicts what the candidates say (or, in a dry run, sizes it), and reports.
    fn reclaim(&self, opts: Options, disk: Option<Disk>, candidates: &[Candidate]) -> Report {
        let evict = self.eviction_plan(candidates, disk.as_ref(), opts.evict_all);
        let mut report = Report {
            ran: !opts.dry_run,
            disk,
            disk_after: None,
            keep_builds: self.cfg.keep_builds,
            keep_builds_secs: self.cfg.keep_builds_for.as_secs(),
            totals: Totals::default(),
            projects: Vec::new(),
            prune: Prune::default(),
        };
        for c in candidates {
            let p = c.id.as_str();
            let dir = publish::project_dir(&self.cfg.publish_dir, p);
            let sized: Vec<(u64, u64)> = c
                .retire
                .iter()
                .map(|b| (*b, dir_bytes(&dir.join("builds").join(b.to_string()))))
                .collect();
            let retired = if opts.dry_run || sized.is_empty() {
                sized
            } else {
                self.retire_now(p, &sized)
            };
            let evicted = evict.contains(p) && (opts.dry_run || self.evict(p));
            let entry = ProjectReport {
                project: p.to_owned(),
                retire_bytes: retired.iter().map(|(_, b)| b).sum(),
                retire: retired
                    .into_iter()
                    .map(|(build, bytes)| RetiredBuild { build, bytes })
                    .collect(),
                idle: c.idle,
                worktree_bytes: c.usage.worktree_bytes,
                node_modules_bytes: c.usage.node_modules_bytes,
                evict: evicted,
                last_built_at_ms: c.last_built_at_ms,
                last_viewed_at_ms: c.last_viewed_at_ms,
            };
            let t = &mut report.totals;
            if c.idle {
                t.evictable_bytes += c.usage.evictable();
            }
            t.builds += entry.retire.len();
            t.build_bytes += entry.retire_bytes;
            if evicted {
                t.evictions += 1;
                t.evict_bytes += c.usage.evictable();
            }
            if !entry.retire.is_empty() || c.usage.evictable() > 0 {
                t.projects += 1;
                report.projects.push(entry);
            }
        }
        report.totals.bytes = report.totals.build_bytes + report.totals.evict_bytes;
        report.projects.sort_by_key(|e| {
            (
                !e.evict,
                e.retire.is_empty(),
                e.last_built_at_ms.max(e.last_viewed_at_ms).unwrap_or(0),
            )
        });
        report.projects.truncate(opts.limit);
        report
    }

    /// Idle projects to evict, least recently built or viewed first, until the disk estimate is under the
    /// low-water mark (or all of them, with `all`).
    fn eviction_plan(
        &self,
        candidates: &[Candidate],
        disk: Option<&Disk>,
        all: bool,
    ) -> HashSet<String> {
        let mut out = HashSet::new();
        let Some(disk) = disk.filter(|d| all || d.over_high_water) else {
            return out;
        };
        let low = disk.size_bytes as f64 * f64::from(self.cfg.disk_low_water) / 100.0;
        let mut used = disk.used_bytes as f64;
        for c in candidates
            .iter()
            .filter(|c| c.idle && c.usage.evictable() > 0)
        {
            if !all && used < low {
                break;
            }
            used -= c.usage.evictable() as f64;
            out.insert(c.id.as_str().to_owned());
        }
        out
    }

    /// Projects with a directory in the state dir.
    fn local_projects(&self) -> Vec<ProjectId> {
        let mut ids: Vec<ProjectId> = std::fs::read_dir(self.cfg.state_dir.join("projects"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| ProjectId::parse(e.file_name().to_str()?).ok())
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(build: u64, commit: &str, age_secs: u64, now: u64) -> OnDisk {
        OnDisk {
            build,
            commit: Some(commit.into()),
            finished_at_ms: now - age_secs * 1000,
        }
    }

    #[test]
    fn keeps_the_newest_the_young_the_current_and_the_shared() {
        let now = 10_000_000_000;
        let day = 86_400;
        let builds = vec![
            b(1, "c1", 9 * day, now),
            b(2, "c2", 8 * day, now),
            b(3, "c3", 8 * day, now),
            b(4, "c4", 2 * day, now),
            b(5, "c5", 60, now),
            b(6, "c6", 30, now),
        ];
        let week = Duration::from_secs(7 * day);
        let none = HashSet::new();
        // The newest two, and the week's builds.
        assert_eq!(
            to_retire(&builds, Some(6), &none, &[], 2, week, now),
            vec![1, 2, 3]
        );
        // No age rule: the newest two only, but current and the shared commit stay.
        let shared: HashSet<String> = ["c2".to_owned()].into();
        assert_eq!(
            to_retire(&builds, Some(1), &shared, &[], 2, Duration::ZERO, now),
            vec![3, 4]
        );
        // A shared build does not take one of the newest places.
        let shared: HashSet<String> = ["c6".to_owned()].into();
        assert_eq!(
            to_retire(&builds, Some(6), &shared, &[], 2, Duration::ZERO, now),
            vec![1, 2, 3]
        );
        // A protected build (being published) stays whatever the rule.
        assert_eq!(
            to_retire(&builds, Some(6), &none, &[3], 0, Duration::ZERO, now),
            vec![1, 2, 4, 5]
        );
        // A build whose commit is unknown is never matched to a share.
        let mut unknown = builds.clone();
        unknown[1].commit = None;
        let shared: HashSet<String> = ["c2".to_owned()].into();
        assert_eq!(
            to_retire(&unknown, Some(6), &shared, &[], 2, Duration::ZERO, now),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn sizes_count_hard_links_once_and_skip_symlink_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("a"), vec![1u8; 64 << 10]).unwrap();
        let one = dir_bytes(d);
        std::fs::hard_link(d.join("a"), d.join("b")).unwrap();
        assert_eq!(dir_bytes(d), one, "a second name for the same file");
        std::os::unix::fs::symlink("/usr", d.join("usr")).unwrap();
        assert!(dir_bytes(d) < one + (64 << 10));
        assert_eq!(dir_bytes(&d.join("missing")), 0);
    }
}
