//! One build: sync → checkout only what changed → install only when dependencies changed →
//! build in the sandbox → publish atomically. Every phase is timed into the status and marked in
//! the log; a failure at any point leaves the last good build served.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gitstore::ProjectId;
use gix::objs::Find;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::agent::{make_owned_dir, Agent, Request};
use crate::checkout::{self, Flat, Owner};
use crate::config::Engine;
use crate::publish;
use crate::sandbox::{self, Exit, Mount, Spec};
use crate::status::{LastGood, Log, Rollback, State};

/// Files whose change means dependencies must be installed again.
const DEPENDENCY_FILES: &[&str] = &[
    "package.json",
    "pnpm-lock.yaml",
    ".npmrc",
    "pnpm-workspace.yaml",
];

/// A phase failure: the state it ends the build in, and what to tell the user.
struct Failure {
    state: State,
    message: String,
}

impl Failure {
    fn failed(message: impl Into<String>) -> Self {
        Self {
            state: State::Failed,
            message: message.into(),
        }
    }
}

pub(crate) async fn run(
    agent: &Arc<Agent>,
    project: &str,
    build: u64,
    req: &Request,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let mut log = match Log::create(&agent.log_path(project, build), agent.cfg.log_limit_bytes) {
        Ok(l) => l,
        Err(e) => {
            agent.update(project, |s| {
                s.finish(
                    State::Failed,
                    Some(format!("cannot open the build log: {e}")),
                )
            });
            return;
        }
    };
    agent.update(project, |s| s.started_at_ms = Some(crate::status::now_ms()));
    log::info!(project, build; "build started");
    let result = steps(agent, project, build, req, cancel, &mut log).await;
    let scratch = agent.scratch_dir(project, build);
    let _ = std::fs::remove_dir_all(&scratch);
    let secs = started.elapsed().as_secs_f64();
    // A share link's build leaves the preview's page as it is.
    let show_status_page = |agent: &Agent| {
        if !req.pin {
            agent.show_status_page(project);
        }
    };
    match result {
        Ok(()) => {
            log.note(&format!("ready in {secs:.2}s"));
            agent.update(project, |s| s.finish(State::Ready, None));
            show_status_page(agent);
            agent.metrics.outcome(State::Ready);
            log::info!(project, build, secs; "build ready");
        }
        Err(f) => {
            let f = if cancel.is_cancelled() && f.state != State::TimedOut {
                Failure {
                    state: State::Cancelled,
                    message: "cancelled".into(),
                }
            } else {
                f
            };
            let f = match agent.disk_full_message(&f.message) {
                Some(message) => Failure { message, ..f },
                None => f,
            };
            log.note(&format!("{}: {}", f.state.as_str(), f.message));
            agent.update(project, |s| s.finish(f.state, Some(f.message.clone())));
            show_status_page(agent);
            agent.metrics.outcome(f.state);
            log::warn!(project, build, state = f.state.as_str(), error = f.message; "build did not succeed");
        }
    }
    agent.mirror(project);
    if agent.is_gone(project) {
        return;
    }
    // Sizes once per build, for the retention report, eviction and the store's build state.
    let installed = agent
        .status(project)
        .is_some_and(|s| s.install.as_deref() == Some("ran"));
    let (a, p) = (agent.clone(), project.to_owned());
    tokio::task::spawn_blocking(move || crate::retention::measure(&a, &p, installed))
        .await
        .expect("measure task");
    agent.report_build_state(project);
}

async fn steps(
    agent: &Arc<Agent>,
    project: &str,
    build: u64,
    req: &Request,
    cancel: &CancellationToken,
    log: &mut Log,
) -> Result<(), Failure> {
    let pid = ProjectId::parse(project).map_err(|e| Failure::failed(e.to_string()))?;
    let dir = agent.project_dir(project);
    let repo = agent.repo_path(project);

    // 1. Sync.
    phase(agent, project, log, State::Syncing, "sync");
    let t = Instant::now();
    let report = match agent.sync_repo(&pid).await {
        Ok(report) => {
            agent
                .sync_retries
                .lock()
                .expect("retries lock")
                .remove(project);
            report
        }
        // A rebuild or a rollback of what this machine already holds needs nothing from the
        // store: an outage must not stop it.
        Err(e) if (req.force || req.commit.is_some()) && repo.join("HEAD").is_file() => {
            log.note(&format!(
                "the blob store did not answer ({e}): building from this machine's copy, which may be behind"
            ));
            gitstore::sync::SyncReport::default()
        }
        Err(e) => {
            let again = agent.retry_sync_later(&pid, &e);
            return Err(Failure::failed(format!(
                "sync from the blob store failed: {e}{again}"
            )));
        }
    };
    agent
        .metrics
        .add(&agent.metrics.bytes_fetched, report.bytes_fetched);
    log.note(&format!(
        "generation {}: fetched {} pack(s), {} bytes",
        report.generation, report.packs_fetched, report.bytes_fetched
    ));
    // What the manifest says besides refs: a deletion, and the commits shares pin (which
    // retention keeps). Unreadable shares mean no build is retired this time.
    // Generation 0: the store did not answer (see above), so nothing is known of it.
    let manifest = match report.generation {
        0 => None,
        generation => Some(gitstore::manifest::read(&agent.store, &pid, generation).await),
    };
    let pinned = match manifest {
        Some(Ok(m)) if m.deleted_at.is_some() => {
            agent.mark_gone(project);
            let (a, id) = (agent.clone(), pid.clone());
            tokio::spawn(async move { a.forget(&id, false).await });
            return Err(Failure::failed(
                "the project was deleted: it is no longer built or served",
            ));
        }
        Some(Ok(m)) => Some(crate::retention::pinned_commits(&m)),
        Some(Err(e)) => {
            log.note(&format!(
                "cannot read the manifest's shares ({e}): no old build is retired this time"
            ));
            None
        }
        None => None,
    };
    let (refname, head) = preview_ref(&repo).await.map_err(Failure::failed)?;
    log.note(&format!("{refname} is at {head}"));
    let status = agent.status(project).expect("status exists during a build");
    let target = Target::pick(req, &head, status.last_good.as_ref());
    match &target {
        Target::Head => {}
        Target::Rollback(c) => log.note(&format!("building {c}, asked for by a rollback")),
        Target::Pinned(c) => log.note(&format!(
            "building {c} for a share link: published at its pinned URL only"
        )),
        Target::StillRolledBack(c, _) => log.note(&format!(
            "the preview is rolled back to {c} and {refname} has not moved since: building that commit, not the head"
        )),
    }
    let commit = target.commit(&head).to_owned();
    agent.update(project, |s| s.commit = Some(commit.clone()));
    done(agent, project, "sync", t);

    let publish_dir = publish::project_dir(&agent.cfg.publish_dir, project);
    if let Target::Pinned(c) = &target {
        if let Some(kept) = agent.kept_build_of(project, c) {
            log.note(&format!("commit already built and kept as build {kept}"));
            return Ok(());
        }
    }
    if !req.force {
        if let Some(good) = &status.last_good {
            if good.commit == commit && publish::current(&publish_dir) == Some(good.build) {
                log.note(&format!(
                    "commit already built and published as build {}",
                    good.build
                ));
                return Ok(());
            }
        }
    }
    check_cancel(cancel)?;

    // 2. Checkout only what changed.
    let t = Instant::now();
    let owner = Owner {
        uid: agent.cfg.sandbox_uid,
        gid: agent.cfg.sandbox_gid,
    };
    let worktree = dir.join("worktree");
    let record = dir.join("checkout.json");
    let checkout = || {
        let (repo, worktree, record, commit) = (
            repo.clone(),
            worktree.clone(),
            record.clone(),
            commit.clone(),
        );
        async move {
            tokio::task::spawn_blocking(move || {
                read_and_checkout(&repo, &worktree, &record, &commit, owner)
            })
            .await
            .expect("checkout task")
        }
    };
    let (files, report) = match checkout().await {
        Ok(done) => done,
        // Objects this machine's copy should hold cannot be read: a damaged disk cache. The
        // store is the truth: fetch the repository again, whole, and try once more.
        Err(CheckoutFailure::Objects(e)) => {
            log.note(&format!(
                "this machine's copy of the repository is damaged ({e}): fetching it again from the blob store"
            ));
            agent.metrics.inc(&agent.metrics.repo_repairs);
            let again = agent.refetch_repo(&pid).await.map_err(|e| {
                Failure::failed(format!("checkout failed: the local repository was damaged and fetching it again failed: {e}"))
            })?;
            log.note(&format!(
                "fetched {} pack(s), {} bytes again",
                again.packs_fetched, again.bytes_fetched
            ));
            checkout().await.map_err(|e| {
                Failure::failed(format!(
                    "checkout failed, also from a fresh copy of the blob store's data: {}",
                    e.message()
                ))
            })?
        }
        Err(e) => return Err(Failure::failed(format!("checkout failed: {}", e.message()))),
    };
    log.note(&format!(
        "checkout: {} written, {} deleted{}",
        report.written.len(),
        report.deleted.len(),
        if report.full { " (full checkout)" } else { "" }
    ));
    done(agent, project, "checkout", t);
    check_cancel(cancel)?;

    let scratch = agent.scratch_dir(project, build);
    let _ = std::fs::remove_dir_all(&scratch);
    // Until the end of the build: publishing reads the output from it. `run` removes the
    // directory once this is unmounted.
    let _scratch_fs = sandbox::ScratchFs::mount(&scratch, agent.cfg.disk_bytes)
        .map_err(|e| Failure::failed(format!("scratch dir: {e}")))?;

    let built = if !files.contains_key("package.json") {
        // A static site: nothing to install or build.
        agent.update(project, |s| s.engine = Some("static".into()));
        log.note("no package.json: publishing the files as they are");
        Built {
            out: worktree.clone(),
            warm: None,
        }
    } else {
        // 3. Install only when needed.
        let nm =
            install_if_needed(agent, project, &files, &worktree, &scratch, cancel, log).await?;
        check_cancel(cancel)?;
        // 4. Build.
        let changes = Changes {
            report: &report,
            force: req.force,
            node_modules_in_tree: files.keys().any(|p| p.starts_with("node_modules/")),
        };
        build_in_sandbox(
            agent, project, &worktree, &nm, &scratch, &changes, cancel, log,
        )
        .await?
    };
    let published = match check_cancel(cancel) {
        Ok(()) => {
            let to = Publish {
                build,
                target,
                commit,
                head,
                pinned,
            };
            publish_build(agent, project, &built.out, to, log).await
        }
        Err(f) => Err(f),
    };
    // After publishing its output (which eviction would delete): the process may go now.
    if let Some(w) = built.warm {
        if agent.is_gone(project) || cancel.is_cancelled() {
            w.stop().await;
        } else {
            let cfg = &agent.cfg;
            agent
                .warm
                .put(project, *w, cfg.warm_max, cfg.warm_memory_bytes);
        }
    }
    published
}

/// What a build produced: its output directory, and the warm process that wrote it, if one did.
struct Built {
    out: PathBuf,
    warm: Option<Box<crate::warm::Watcher>>,
}

/// What the checkout changed, for the warm process to know whether it can rebuild incrementally.
struct Changes<'a> {
    report: &'a checkout::CheckoutReport,
    /// `POST /build`: build even when nothing changed.
    force: bool,
    /// The tree has its own node_modules, where a warm process mounts the installed one.
    node_modules_in_tree: bool,
}

/// What to publish: build `build` of `commit` as `target` says, the branch being at `head`;
/// `pinned`, the commits shares name (None: unknown, so nothing is retired).
struct Publish {
    build: u64,
    target: Target,
    commit: String,
    head: String,
    pinned: Option<std::collections::HashSet<String>>,
}

/// Step 5: `out` into a new build directory, then `current` switched to it (unless the target
/// is a share link's pinned build), then old builds retired.
async fn publish_build(
    agent: &Arc<Agent>,
    project: &str,
    out: &Path,
    to: Publish,
    log: &mut Log,
) -> Result<(), Failure> {
    let Publish {
        build,
        target,
        commit,
        head,
        pinned,
    } = to;
    let publish_dir = publish::project_dir(&agent.cfg.publish_dir, project);
    phase(agent, project, log, State::Publishing, "publish");
    let t = Instant::now();
    let max = agent.cfg.max_output_bytes;
    let (pd, o) = (publish_dir.clone(), out.to_owned());
    let script = crate::preview::console_script(&agent.cfg.generator_origins, project, build);
    let published = tokio::task::spawn_blocking(move || {
        publish::stage(
            &o,
            &pd,
            build,
            max,
            &|rel| rel == "node_modules" || rel.starts_with(".kiln-tmp"),
            &script,
        )
    })
    .await
    .expect("publish task")
    .map_err(|e| Failure::failed(format!("publish failed: {e}")))?;
    for s in &published.skipped {
        log.note(&format!("not published (not a regular file): {s}"));
    }
    log.note(&format!(
        "published {} files, {} bytes ({} precompressed)",
        published.files, published.bytes, published.compressed
    ));
    if let Some(e) = &published.assets_error {
        log.note(&format!(
            "pinned URLs of this build may miss assets: linking them failed: {e}"
        ));
    }
    if !agent.may_publish(project) {
        return Err(Failure::failed(format!(
            "not published: this agent no longer holds project {project}'s lease; the agent that took it over builds and serves it"
        )));
    }
    let (a, p, pd) = (agent.clone(), project.to_owned(), publish_dir.clone());
    let (removed, swept) = tokio::task::spawn_blocking(move || {
        let removed = {
            let locks = a.locks(&p);
            let _switching = locks.publish.lock().expect("publish lock");
            if !matches!(target, Target::Pinned(_)) {
                publish::switch_current(&pd, build)?;
            }
            a.update(&p, |s| target.record(s, &a.cfg, &p, build, &commit, head));
            match &pinned {
                Some(pinned) => publish::retire(&pd, &a.retirable(&p, pinned, &[build])),
                None => Vec::new(),
            }
        };
        if !removed.is_empty() {
            a.metrics
                .add(&a.metrics.builds_retired, removed.len() as u64);
        }
        Ok::<_, publish::PublishError>((removed, publish::sweep(&pd)))
    })
    .await
    .expect("publish task")
    .map_err(|e| Failure::failed(format!("publish failed: {e}")))?;
    if !removed.is_empty() {
        log.note(&format!("retired old builds {removed:?}"));
    }
    if let Err(e) = swept {
        log.note(&format!(
            "pinned URLs of older builds may miss assets: relinking them failed: {e}"
        ));
    }
    done(agent, project, "publish", t);
    Ok(())
}

/// What a build publishes, decided once the branch's head is known.
enum Target {
    /// The preview branch's head: the usual build.
    Head,
    /// A commit asked for by a rollback.
    Rollback(String),
    /// A commit a share link names: published at its pinned URL, `current` left alone.
    Pinned(String),
    /// The commit the preview is rolled back to: the branch has not moved since the rollback,
    /// so building its head would undo the rollback for no new commit.
    StillRolledBack(String, Rollback),
}

impl Target {
    fn pick(req: &Request, head: &str, good: Option<&LastGood>) -> Self {
        if let Some(c) = &req.commit {
            return if req.pin {
                Self::Pinned(c.clone())
            } else {
                Self::Rollback(c.clone())
            };
        }
        match good.and_then(|g| Some((g, g.rollback.as_ref()?))) {
            Some((g, r)) if r.head.as_deref() == Some(head) => {
                Self::StillRolledBack(g.commit.clone(), r.clone())
            }
            _ => Self::Head,
        }
    }

    fn commit<'a>(&'a self, head: &'a str) -> &'a str {
        match self {
            Self::Head => head,
            Self::Rollback(c) | Self::Pinned(c) | Self::StillRolledBack(c, _) => c,
        }
    }

    /// Records build `build` of `commit` as the served one.
    fn record(
        self,
        s: &mut crate::status::Status,
        cfg: &crate::config::Config,
        project: &str,
        build: u64,
        commit: &str,
        head: String,
    ) {
        let pinned_url = cfg.pinned_url_for(project, build);
        s.pinned_url = Some(pinned_url.clone());
        if let Self::Pinned(_) = self {
            return;
        }
        let now = crate::status::now_ms();
        let from = s.last_good.take();
        let (rollback, rollback_from) = match self {
            Self::Head | Self::Pinned(_) => (None, None),
            Self::Rollback(_) => {
                let r = Rollback::after(from.as_ref(), commit, Some(head), now);
                let from_build = r.as_ref().and(from.as_ref()).map(|g| g.build);
                (r, from_build)
            }
            // Not a new rollback: the same one, served by a fresh build of its commit.
            Self::StillRolledBack(_, r) => (Some(r), None),
        };
        s.rollback_from = rollback_from;
        s.last_good = Some(LastGood {
            commit: commit.to_owned(),
            build,
            preview_url: cfg.preview_url_for(project),
            published_at_ms: now,
            pinned_url: Some(pinned_url),
            rollback,
        });
    }
}

fn phase(agent: &Agent, project: &str, log: &mut Log, state: State, name: &str) {
    log.phase(name);
    agent.update(project, |s| s.state = state);
}

fn done(agent: &Agent, project: &str, name: &str, t: Instant) {
    let ms = t.elapsed().as_millis() as u64;
    agent.metrics.phase(name, ms);
    agent.update(project, |s| {
        s.phases.insert(name.to_owned(), ms);
    });
}

fn check_cancel(cancel: &CancellationToken) -> Result<(), Failure> {
    if cancel.is_cancelled() {
        return Err(Failure {
            state: State::Cancelled,
            message: "cancelled".into(),
        });
    }
    Ok(())
}

/// The branch previews are built from and its head (see [`crate::versions::preview_branch`]).
async fn preview_ref(repo: &Path) -> Result<(String, String), String> {
    crate::versions::preview_branch(repo)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the project has no branch yet: push one (main is built)".to_owned())
}

enum CheckoutFailure {
    /// Git objects could not be read: the repository on disk is damaged or incomplete.
    Objects(String),
    /// Anything else: the tree itself is refused, or the worktree cannot be written.
    Other(String),
}

impl CheckoutFailure {
    fn message(&self) -> &str {
        match self {
            Self::Objects(m) | Self::Other(m) => m,
        }
    }
}

fn read_and_checkout(
    repo: &Path,
    worktree: &Path,
    record: &Path,
    commit: &str,
    owner: Owner,
) -> Result<(checkout::Flat, checkout::CheckoutReport), CheckoutFailure> {
    let objects = |e: String| CheckoutFailure::Objects(e);
    let classify = |e: checkout::CheckoutError| match e {
        checkout::CheckoutError::Objects(m) => CheckoutFailure::Objects(m),
        other => CheckoutFailure::Other(other.to_string()),
    };
    let odb = gix::odb::at(repo.join("objects"), gix::hash::Kind::Sha1)
        .map_err(|e| objects(e.to_string()))?;
    let tree = commit_tree(&odb, commit).map_err(objects)?;
    let files = checkout::flatten(&odb, tree).map_err(classify)?;
    let report =
        checkout::checkout(&odb, tree, &files, worktree, record, owner).map_err(classify)?;
    Ok((files, report))
}

pub(crate) fn commit_tree(
    objects: &gix::odb::Handle,
    commit: &str,
) -> Result<gix::ObjectId, String> {
    let id = gix::ObjectId::from_hex(commit.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let data = objects
        .try_find(&id, &mut buf)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("commit {commit} is missing"))?;
    let c = gix::objs::CommitRef::from_bytes(data.data, gix::hash::Kind::Sha1)
        .map_err(|e| format!("commit {commit}: {e}"))?;
    Ok(c.tree())
}

/// What the last install was done for.
#[derive(Serialize, Deserialize)]
struct InstallRecord {
    key: String,
    /// Name of the project's install directory under `volume/nm/`, unguessable so no other
    /// project's install can reach it.
    nm: String,
}

fn dependency_key(files: &Flat) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln-install-v1\0");
    for name in DEPENDENCY_FILES {
        if let Some((oid, _)) = files.get(*name) {
            h.update(name.as_bytes());
            h.update(oid.as_bytes());
        }
        h.update(b"\0");
    }
    hex::encode(h.finalize())
}

/// Runs `pnpm install` in the project's install dir when its dependency files changed or its
/// node_modules is missing. Returns the install dir (holding `node_modules/`).
async fn install_if_needed(
    agent: &Arc<Agent>,
    project: &str,
    files: &Flat,
    worktree: &Path,
    scratch: &Path,
    cancel: &CancellationToken,
    log: &mut Log,
) -> Result<PathBuf, Failure> {
    let cfg = &agent.cfg;
    let (uid, gid) = (cfg.sandbox_uid, cfg.sandbox_gid);
    let volume = agent.volume();
    let setup = |e: std::io::Error| Failure::failed(format!("preparing the install: {e}"));
    let record_path = agent.project_dir(project).join("install.json");
    let old: Option<InstallRecord> = std::fs::read(&record_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let nm_name = old.as_ref().map(|r| r.nm.clone()).unwrap_or_else(|| {
        use rand::Rng;
        hex::encode(rand::rng().random::<[u8; 16]>())
    });
    let nm = volume.join("nm").join(&nm_name);
    let key = dependency_key(files);
    if old.as_ref().is_some_and(|r| r.key == key) && nm.join("node_modules").is_dir() {
        log.note("dependencies unchanged: install skipped");
        agent.update(project, |s| s.install = Some("skipped".into()));
        agent.metrics.inc(&agent.metrics.install_skipped);
        return Ok(nm);
    }

    phase(agent, project, log, State::Installing, "install");
    let t = Instant::now();
    make_owned_dir(&nm, uid, gid, 0o755).map_err(setup)?;
    for name in DEPENDENCY_FILES {
        let dst = nm.join(name);
        if files.contains_key(*name) {
            std::fs::copy(worktree.join(name), &dst).map_err(setup)?;
            std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(setup)?;
        } else {
            let _ = std::fs::remove_file(&dst);
        }
    }
    let spec = install_spec(
        cfg,
        Path::new("nm").join(&nm_name),
        files.contains_key("pnpm-lock.yaml"),
        format!("{project}-{}-install", scratch_id(scratch)),
        scratch.join("install-root"),
        project,
    );
    log.note(&format!(
        "{} (network allowed in this phase only)",
        spec.argv[1..].join(" ")
    ));
    // Shared with other installs, exclusive of a store prune (which would delete what this
    // install adds to the store before it links it).
    let store_lock = tokio::select! {
        l = crate::retention::lock_store(&volume, false) => l.map_err(setup)?,
        () = cancel.cancelled() => return Err(Failure { state: State::Cancelled, message: "cancelled".into() }),
    };
    // Its node_modules is about to change under the overlay it has mounted.
    if let Some(w) = agent.warm.take(project) {
        log.note("warm process stopped: the dependencies change");
        w.stop().await;
    }
    run_sandboxed(agent, project, "pnpm install", &spec, cancel, log).await?;
    drop(store_lock);
    let rec = InstallRecord { key, nm: nm_name };
    crate::fsutil::write_atomic(&record_path, &serde_json::to_vec(&rec).expect("serializes"))
        .map_err(setup)?;
    agent.update(project, |s| s.install = Some("ran".into()));
    agent.metrics.inc(&agent.metrics.install_ran);
    done(agent, project, "install", t);
    Ok(nm)
}

/// `pnpm install` as every install runs it, in `dir` (relative to the volume): from the shared
/// store, with network, without dependency lifecycle scripts or `.pnpmfile.cjs` (no project code
/// runs while the store is writable).
pub(crate) fn install_spec(
    cfg: &crate::config::Config,
    dir: PathBuf,
    frozen: bool,
    cgroup: String,
    root: PathBuf,
    project: &str,
) -> Spec {
    let lockfile = if frozen {
        "--frozen-lockfile"
    } else {
        "--no-frozen-lockfile"
    };
    let argv = [
        &cfg.pnpm.display().to_string(),
        "install",
        "--store-dir=/kiln/store",
        "--ignore-scripts",
        "--ignore-pnpmfile",
        "--reporter=append-only",
        "--config.confirmModulesPurge=false",
        "--prefer-offline",
        lockfile,
    ]
    .map(str::to_owned)
    .to_vec();
    Spec {
        cgroup,
        root,
        mounts: vec![Mount::Bind {
            src: cfg.volume_dir.clone(),
            dst: "/kiln".into(),
            writable: true,
        }],
        network: true,
        uid: cfg.sandbox_uid,
        gid: cfg.sandbox_gid,
        cwd: Path::new("/kiln").join(dir),
        argv,
        env: sandbox_env(cfg, project, "development"),
        limits: limits(cfg, cfg.install_timeout),
        stdin: false,
    }
}

fn scratch_id(scratch: &Path) -> String {
    scratch
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Builds with Vite (or the package's build script) in the sandbox, offline. Returns the output.
/// The first attempt goes to the project's warm process when Vite builds it. With the fast
/// engine, a failure is retried once, cold, with the project's own Vite.
#[allow(clippy::too_many_arguments)]
async fn build_in_sandbox(
    agent: &Arc<Agent>,
    project: &str,
    worktree: &Path,
    nm: &Path,
    scratch: &Path,
    changes: &Changes<'_>,
    cancel: &CancellationToken,
    log: &mut Log,
) -> Result<Built, Failure> {
    phase(agent, project, log, State::Building, "build");
    let t = Instant::now();
    let has_vite = nm.join("node_modules/vite/bin/vite.js").is_file();
    let wanted = pinned_engine(&worktree.join("package.json")).unwrap_or(agent.cfg.engine);
    let fast = agent.engines.fast();
    let mut attempts = Vec::new();
    if has_vite && wanted == Engine::Fast {
        match &fast {
            Some(dir) => attempts.push((Engine::Fast, Some(dir.clone()))),
            None => {
                log.note("the fast engine is not installed yet: building with the project's Vite")
            }
        }
    }
    attempts.push((Engine::Project, None));
    let last = attempts.len() - 1;
    let mut warm_ok = has_vite && agent.cfg.warm_max > 0;
    if warm_ok && changes.node_modules_in_tree {
        log.note("the tree has its own node_modules: building cold");
        warm_ok = false;
    }
    for (i, (engine, engine_dir)) in attempts.into_iter().enumerate() {
        let r = if i == 0 && warm_ok {
            build_warm(
                agent,
                project,
                worktree,
                nm,
                engine,
                engine_dir.clone(),
                changes,
                cancel,
                log,
            )
            .await
        } else {
            None
        };
        let r = match r {
            Some(r) => r,
            None => {
                if has_vite {
                    agent.metrics.warm("cold");
                }
                agent.update(project, |s| s.warm = None);
                let attempt = scratch.join(engine.as_str());
                build_once(
                    agent,
                    project,
                    worktree,
                    nm,
                    &attempt,
                    engine,
                    engine_dir.as_deref(),
                    has_vite,
                    cancel,
                    log,
                )
                .await
                .map(|out| Built { out, warm: None })
            }
        };
        match r {
            Err(f) if i < last && f.state == State::Failed && !cancel.is_cancelled() => {
                log.note(&format!(
                    "the fast engine failed; building again with the project's own Vite ({})",
                    f.message.lines().next().unwrap_or_default()
                ));
                agent.metrics.inc(&agent.metrics.fast_fallbacks);
            }
            Err(f) => return Err(f),
            Ok(built) => {
                done(agent, project, "build", t);
                return Ok(built);
            }
        }
    }
    unreachable!("the project engine is always the last attempt")
}

/// One attempt through the project's warm process (`crate::warm`); `None` when none can serve
/// it, so the attempt runs cold.
#[allow(clippy::too_many_arguments)]
async fn build_warm(
    agent: &Arc<Agent>,
    project: &str,
    worktree: &Path,
    nm: &Path,
    engine: Engine,
    engine_dir: Option<PathBuf>,
    changes: &Changes<'_>,
    cancel: &CancellationToken,
    log: &mut Log,
) -> Option<Result<Built, Failure>> {
    let base = agent.cfg.base_path_for(project);
    agent.update(project, |s| s.engine = Some(engine.as_str().into()));
    log.note(&format!(
        "engine {}: vite build --watch (warm) with base {base} (no network)",
        engine.as_str()
    ));
    let key = crate::warm::Key {
        engine,
        engine_dir,
        nm: nm.to_owned(),
        base,
    };
    let warmed = agent
        .build_warm(
            project,
            key,
            worktree,
            changes.report,
            changes.force,
            cancel,
            log,
        )
        .await;
    match warmed {
        crate::warm::Warmed::Built(watcher) => Some(Ok(Built {
            out: watcher.out().to_owned(),
            warm: Some(watcher),
        })),
        crate::warm::Warmed::Failed { state, message } => Some(Err(Failure { state, message })),
        crate::warm::Warmed::Cold => None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn build_once(
    agent: &Arc<Agent>,
    project: &str,
    worktree: &Path,
    nm: &Path,
    scratch: &Path,
    engine: Engine,
    engine_dir: Option<&Path>,
    has_vite: bool,
    cancel: &CancellationToken,
    log: &mut Log,
) -> Result<PathBuf, Failure> {
    let cfg = &agent.cfg;
    let (uid, gid) = (cfg.sandbox_uid, cfg.sandbox_gid);
    let setup = |e: std::io::Error| Failure::failed(format!("preparing the build: {e}"));
    let upper = scratch.join("upper");
    let out = scratch.join("out");
    make_owned_dir(&upper, uid, gid, 0o755).map_err(setup)?;
    std::fs::create_dir_all(scratch.join("work")).map_err(setup)?;
    make_owned_dir(&out, uid, gid, 0o755).map_err(setup)?;

    let base = cfg.base_path_for(project);
    let vite_args = |vite: &str| {
        vec![
            cfg.node.display().to_string(),
            vite.to_owned(),
            "build".into(),
            "--base".into(),
            base.clone(),
            "--outDir".into(),
            "/out".into(),
            "--emptyOutDir".into(),
        ]
    };
    let mut mounts = vec![
        Mount::Overlay {
            lower: vec![worktree.to_owned(), nm.to_owned()],
            upper: upper.clone(),
            work: scratch.join("work"),
            dst: "/app".into(),
        },
        Mount::Bind {
            src: out.clone(),
            dst: "/out".into(),
            writable: true,
        },
    ];
    let (argv, result_dir, what) = match engine_dir {
        Some(dir) => {
            mounts.push(Mount::Bind {
                src: dir.to_owned(),
                dst: "/kiln-engine".into(),
                writable: false,
            });
            (
                vite_args("/kiln-engine/node_modules/vite/bin/vite.js"),
                out.clone(),
                "vite build (fast engine)",
            )
        }
        None if has_vite => (
            vite_args("/app/node_modules/vite/bin/vite.js"),
            out.clone(),
            "vite build",
        ),
        None if has_build_script(&worktree.join("package.json")) => (
            vec![cfg.pnpm.display().to_string(), "run".into(), "build".into()],
            upper.join("dist"),
            "pnpm run build",
        ),
        None => return Err(Failure::failed(
            "nothing to build: add vite to the dependencies or a \"build\" script to package.json",
        )),
    };
    agent.update(project, |s| s.engine = Some(engine.as_str().into()));
    log.note(&format!(
        "engine {}: {what} with base {base} (no network)",
        engine.as_str()
    ));
    let mut env = sandbox_env(cfg, project, "production");
    env.push(("KILN_BASE".into(), base));
    let spec = Spec {
        cgroup: format!(
            "{project}-{}-{}",
            scratch_id(scratch.parent().unwrap_or(scratch)),
            engine.as_str()
        ),
        root: scratch.join("root"),
        mounts,
        network: false,
        uid,
        gid,
        cwd: "/app".into(),
        argv,
        env,
        limits: limits(cfg, cfg.build_timeout),
        stdin: false,
    };
    run_sandboxed(agent, project, what, &spec, cancel, log).await?;
    Ok(result_dir)
}

/// A project may pin its engine in package.json: `"kiln": {"engine": "project"}`.
fn pinned_engine(package_json: &Path) -> Option<Engine> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(package_json).ok()?).ok()?;
    v["kiln"]["engine"].as_str()?.parse().ok()
}

fn has_build_script(package_json: &Path) -> bool {
    std::fs::read(package_json)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["scripts"]["build"].is_string())
}

pub(crate) fn sandbox_env(
    cfg: &crate::config::Config,
    project: &str,
    node_env: &str,
) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), "/tmp".into()),
        ("TMPDIR".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("CI".into(), "true".into()),
        ("NODE_ENV".into(), node_env.into()),
        ("KILN_PROJECT".into(), project.into()),
        ("npm_config_update_notifier".into(), "false".into()),
        (
            "NODE_OPTIONS".into(),
            format!("--max-old-space-size={}", (cfg.memory_bytes >> 20) * 3 / 4),
        ),
    ]
}

pub(crate) fn limits(cfg: &crate::config::Config, timeout: Duration) -> sandbox::Limits {
    sandbox::Limits {
        memory_bytes: cfg.memory_bytes,
        pids: cfg.pids,
        cpus: cfg.cpus,
        timeout,
    }
}

/// Runs `spec`, streaming its output into the log, and turns how it ended into a failure.
async fn run_sandboxed(
    agent: &Arc<Agent>,
    project: &str,
    what: &str,
    spec: &Spec,
    cancel: &CancellationToken,
    log: &mut Log,
) -> Result<(), Failure> {
    let mut tail = Tail::default();
    let outcome = {
        let mut output = |b: &[u8]| {
            log.write(b);
            tail.push(b);
        };
        sandbox::run(&agent.exe, spec, &mut output, cancel.clone()).await
    }
    .map_err(|e| Failure::failed(format!("sandbox: {e}")))?;
    agent.update(project, |s| {
        s.peak_memory_bytes = s.peak_memory_bytes.max(outcome.peak_memory_bytes);
        s.cpu_time_ms += outcome.cpu_time.as_millis() as u64;
    });
    log.note(&format!(
        "{what}: {:?}, peak memory {} MiB, cpu {} ms",
        outcome.exit,
        outcome.peak_memory_bytes >> 20,
        outcome.cpu_time.as_millis()
    ));
    let limits = &spec.limits;
    let fail = |state, message: String| Err(Failure { state, message });
    // A run that forked up to its limit may hang, not fail (node cannot start its threads):
    // the timeout's message must still say why.
    let pids_note = if outcome.pids_limit_hit {
        format!("\n(the limit of {} processes was reached)", limits.pids)
    } else {
        String::new()
    };
    match outcome.exit {
        Exit::Code(0) => Ok(()),
        Exit::TimedOut => fail(
            State::TimedOut,
            format!(
                "{what} timed out after {}s and was killed{pids_note}",
                limits.timeout.as_secs()
            ),
        ),
        Exit::OutOfMemory => fail(
            State::Failed,
            format!(
                "{what} ran out of memory (limit {} MiB) and was killed",
                limits.memory_bytes >> 20
            ),
        ),
        Exit::Cancelled => fail(State::Cancelled, "cancelled".into()),
        Exit::Code(c) | Exit::Signal(c) => {
            let mut message = format!(
                "{what} {}",
                tail.summary(c, matches!(outcome.exit, Exit::Signal(_)))
            );
            message.push_str(&pids_note);
            fail(State::Failed, message)
        }
    }
}

/// The last lines of a phase's output, to put the compiler's error into the status.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    const MAX: usize = 4096;

    fn push(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
        if self.0.len() > Self::MAX * 2 {
            self.0.drain(..self.0.len() - Self::MAX);
        }
    }

    fn summary(&self, code: i32, signal: bool) -> String {
        let text = String::from_utf8_lossy(&self.0);
        // Stack frames say where the tool failed, not what is wrong with the app: leave them
        // to the log and show the first error message and what follows it.
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("at "))
            .collect();
        let start = lines
            .iter()
            .position(|l| l.to_ascii_lowercase().contains("error"))
            .unwrap_or(lines.len().saturating_sub(8));
        let last = lines[start..lines.len().min(start + 10)].join("\n");
        let how = if signal {
            format!("killed by signal {code}")
        } else {
            format!("exited with code {code}")
        };
        format!("{how}:\n{}", strip_ansi(&last))
    }
}

pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
