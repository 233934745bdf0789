//! The build queue: one build per project at a time, syncs that arrive meanwhile collapsed into
//! one follow-up build of the newest commit, and a bounded number of builds machine-wide; and
//! rollbacks, which switch the served build at once when it is still on disk and queue a build of
//! the old commit when it is not.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gitstore::{BlobStore, ProjectId};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::publish::{self, PublishError};
use crate::status::{LastGood, Rollback, State, Status};
use crate::versions::RepoError;

/// Syncs the store failed are retried this many times, the first after [`SYNC_RETRY_FIRST`],
/// doubling up to 16 times that (about 9 minutes in all).
const SYNC_RETRIES: u32 = 10;
const SYNC_RETRY_FIRST: Duration = Duration::from_secs(5);

/// Why a build was asked for.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Build even if the commit is already published (`POST /build`).
    pub force: bool,
    /// Build exactly this commit instead of the preview branch's head, and publish it as a
    /// rollback: a rollback to a commit whose build is no longer on disk. The caller checks that
    /// it is on a branch.
    pub commit: Option<String>,
    /// With `commit`: a share link's build, published at its pinned URL only. `current`, the
    /// preview's status page and `last_good` stay as they are.
    pub pin: bool,
}

/// Per-project locks that live outside the slot, because they are held across slow work.
#[derive(Default)]
pub(crate) struct ProjectLocks {
    /// Held while the bare repository syncs from the store: `gitstore::sync::sync_repo` needs
    /// its callers to serialize (temporary pack names, the ref transaction), and builds, the
    /// versions list, rollbacks and exports all sync.
    repo: tokio::sync::Mutex<()>,
    /// Held while `current`, `last_good` and the set of kept builds change together, so a
    /// rollback cannot point `current` at a build a prune is deleting, nor leave `last_good`
    /// naming another build than `current` names.
    pub(crate) publish: Mutex<()>,
    /// Held while a sync decides what the project's latest manifest means (build it, or take a
    /// deleted project off this machine) and while a deletion runs, so a restore and the
    /// deletion before it cannot interleave.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
}

struct Running {
    build: u64,
    cancel: CancellationToken,
}

struct Slot {
    status: Status,
    running: Option<Running>,
    /// The follow-up build, if syncs arrived during the running one.
    pending: Option<(u64, Request)>,
    next_build: u64,
}

pub struct Agent {
    pub(crate) cfg: Config,
    pub(crate) store: BlobStore,
    pub(crate) exe: PathBuf,
    pub(crate) metrics: Metrics,
    pub(crate) engines: crate::engine::Engines,
    slots: Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    locks: Mutex<HashMap<String, Arc<ProjectLocks>>>,
    permits: Arc<Semaphore>,
    /// Bumped whenever any status changes, so log followers and waiters wake.
    changed: watch::Sender<u64>,
    /// Set by [`Agent::shutdown`]: no new build starts.
    stopping: AtomicBool,
    /// State transitions, for `/api/events` and notifications.
    pub(crate) events: crate::events::Events,
    pub(crate) notifier: crate::notify::Notifier,
    pub(crate) quotas: crate::quota::Quotas,
    pub(crate) gc: crate::retention::Gc,
    pub(crate) shares: crate::share::Shares,
    pub(crate) views: crate::views::Views,
    pub(crate) warm: crate::warm::Warm,
    /// Syncs retried after the blob store failed them, per project, since the last success.
    pub(crate) sync_retries: Mutex<HashMap<String, u32>>,
    /// Projects whose latest manifest says they are deleted: nothing of them is built or served
    /// until a sync finds them restored.
    gone: Mutex<HashSet<String>>,
    /// This machine's name, for the build state it reports to the store.
    pub(crate) hostname: String,
    /// The leases of the projects this agent builds, when several agents share the store.
    pub(crate) ownership: Option<crate::ownership::Ownership>,
    /// Where served builds are mirrored for a CDN, if anywhere.
    pub(crate) cdn: Option<crate::cdn::Cdn>,
}

/// What a rollback asks for.
#[derive(Clone, Debug)]
pub enum RollbackTarget {
    Commit(String),
    Build(u64),
}

/// What [`Agent::rollback`] did.
#[derive(Clone, Debug)]
pub enum RolledBack {
    /// `current` now serves this kept build.
    Switched { build: u64, commit: String },
    /// No build of the commit is on disk: this build of it was queued.
    Queued { build: u64, commit: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("build {0} is not in this project's build history")]
    UnknownBuild(u64),
    #[error("build {0} ended before it knew its commit: roll back to a commit instead")]
    BuildWithoutCommit(u64),
    #[error(transparent)]
    Commit(#[from] RepoError),
    #[error("switching the served build: {0}")]
    Publish(#[from] PublishError),
    #[error("{}", .0.message())]
    Quota(crate::quota::Refusal),
    #[error("project {0} is deleted: restore it first")]
    Deleted(String),
}

/// What [`Agent::request`] did.
#[derive(Debug)]
pub enum Requested {
    /// A new build was queued, or the request joined the queued follow-up.
    Queued(u64),
    /// That commit is already built and published.
    AlreadyBuilt(u64),
    /// The project owner's build quota does not allow another build now.
    Refused(crate::quota::Refusal),
    /// The project is deleted: nothing is built until it is restored.
    Deleted,
    /// A share link's build was not queued because another build of the project is waiting
    /// (this one, a push's or a rollback's, goes first): ask again once it has run.
    Busy(u64),
}

impl Agent {
    /// Call within a tokio runtime: the notification task starts here.
    pub fn new(
        cfg: Config,
        store: BlobStore,
        cdn: Option<crate::cdn::Cdn>,
        exe: PathBuf,
    ) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(cfg.concurrency));
        let quotas = crate::quota::Quotas::new(
            cfg.quota_builds_per_hour,
            cfg.quota_concurrent_builds,
            Some(cfg.state_dir.join("quota-starts.json")),
        );
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ownership = cfg.lease.as_ref().map(crate::ownership::Ownership::new);
        let agent = Arc::new(Self {
            ownership,
            cdn,
            cfg,
            store,
            exe,
            metrics: Metrics::default(),
            engines: Default::default(),
            slots: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            permits,
            changed: watch::channel(0).0,
            stopping: AtomicBool::new(false),
            events: crate::events::Events::new(),
            notifier: crate::notify::Notifier::new(),
            quotas,
            gc: crate::retention::Gc::default(),
            shares: crate::share::Shares::default(),
            views: crate::views::Views::default(),
            warm: crate::warm::Warm::default(),
            sync_retries: Mutex::default(),
            gone: Mutex::default(),
            hostname,
        });
        crate::notify::start(&agent);
        agent
    }

    pub(crate) fn project_dir(&self, project: &str) -> PathBuf {
        self.cfg.state_dir.join("projects").join(project)
    }

    fn status_path(&self, project: &str) -> PathBuf {
        self.project_dir(project).join("status.json")
    }

    pub(crate) fn log_path(&self, project: &str, build: u64) -> PathBuf {
        self.project_dir(project)
            .join("logs")
            .join(format!("{build}.log"))
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn locks(&self, project: &str) -> Arc<ProjectLocks> {
        let mut locks = self.locks.lock().expect("locks lock");
        locks.entry(project.to_owned()).or_default().clone()
    }

    pub(crate) fn repo_path(&self, project: &str) -> PathBuf {
        self.project_dir(project).join("repo.git")
    }

    /// Brings the project's bare repository up to date with the store, one sync at a time.
    /// Waits at most for another sync, not for a whole build: builds hold the lock only while
    /// they sync.
    pub(crate) async fn sync_repo(
        &self,
        project: &ProjectId,
    ) -> Result<gitstore::sync::SyncReport, gitstore::sync::SyncError> {
        let locks = self.locks(project.as_str());
        let _one_at_a_time = locks.repo.lock().await;
        gitstore::sync::sync_repo(&self.store, project, &self.repo_path(project.as_str())).await
    }

    /// Replaces the project's local repository with a fresh copy from the store: the repair of
    /// a damaged disk cache. The old one is renamed away first, so no reader sees it half gone.
    pub(crate) async fn refetch_repo(
        &self,
        project: &ProjectId,
    ) -> Result<gitstore::sync::SyncReport, gitstore::sync::SyncError> {
        let locks = self.locks(project.as_str());
        let _one_at_a_time = locks.repo.lock().await;
        let repo = self.repo_path(project.as_str());
        let damaged = repo.with_extension("git.damaged");
        let _ = std::fs::remove_dir_all(&damaged);
        if let Err(e) = std::fs::rename(&repo, &damaged) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(gitstore::sync::SyncError::Io {
                    path: repo,
                    source: e,
                });
            }
        }
        let _ = std::fs::remove_dir_all(&damaged);
        gitstore::sync::sync_repo(&self.store, project, &repo).await
    }

    /// After a sync the store failed (an outage, a timeout): asks for the build again later,
    /// with backoff, so that a push acknowledged just before the outage is built once the store
    /// is back without another push. Returns what to tell the user.
    pub(crate) fn retry_sync_later(
        self: &Arc<Self>,
        project: &ProjectId,
        e: &gitstore::sync::SyncError,
    ) -> String {
        if e.is_damage() {
            return String::new();
        }
        let attempt = {
            let mut retries = self.sync_retries.lock().expect("retries lock");
            let n = retries.entry(project.as_str().to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        if attempt > SYNC_RETRIES {
            return format!(
                " (gave up after {SYNC_RETRIES} retries; the next push or POST /build tries again)"
            );
        }
        let delay = SYNC_RETRY_FIRST * 2u32.pow((attempt - 1).min(4));
        let (agent, id) = (self.clone(), project.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if !agent.stopping.load(Ordering::SeqCst) && !agent.is_gone(id.as_str()) {
                agent.request(&id, None, Request::default());
            }
        });
        format!(
            " (retry {attempt} of {SYNC_RETRIES} in {}s)",
            delay.as_secs()
        )
    }

    fn slot(&self, project: &str) -> Option<Arc<Mutex<Slot>>> {
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(s) = slots.get(project) {
            return Some(s.clone());
        }
        let status = Status::load(&self.status_path(project))?;
        self.events.seen(&status);
        let next_build = status
            .history
            .first()
            .map_or(status.build, |h| h.build.max(status.build))
            + 1;
        let s = Arc::new(Mutex::new(Slot {
            status,
            running: None,
            pending: None,
            next_build,
        }));
        slots.insert(project.to_owned(), s.clone());
        Some(s)
    }

    fn slot_or_new(&self, project: &str) -> Arc<Mutex<Slot>> {
        if let Some(s) = self.slot(project) {
            return s;
        }
        let mut slots = self.slots.lock().expect("slots lock");
        slots
            .entry(project.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Slot {
                    status: Status::new(project),
                    running: None,
                    pending: None,
                    next_build: 1,
                }))
            })
            .clone()
    }

    /// The project's status, if the agent has ever been asked to build it.
    pub fn status(&self, project: &str) -> Option<Status> {
        let slot = self.slot(project)?;
        let s = slot.lock().expect("slot lock");
        Some(s.status.clone())
    }

    /// Changes the status and persists it.
    pub(crate) fn update(&self, project: &str, f: impl FnOnce(&mut Status)) {
        let slot = self.slot_or_new(project);
        let mut s = slot.lock().expect("slot lock");
        f(&mut s.status);
        self.persist(project, &s.status);
    }

    fn persist(&self, project: &str, status: &Status) {
        let path = self.status_path(project);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = status.save(&path) {
            log::error!(project, error:% = e; "cannot save status");
        }
        if let Some(event) = self.events.observe(&self.cfg, status) {
            self.notifier.send(&event);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Queues a build of `project`'s newest commit, or says it is already built. `hint` is the
    /// commit the caller expects (from the webhook), used only to answer without building.
    /// Quotas are not checked: this is for builds the agent starts by itself.
    pub fn request(
        self: &Arc<Self>,
        project: &ProjectId,
        hint: Option<&str>,
        req: Request,
    ) -> Requested {
        let no_limits = crate::quota::Admission::unlimited();
        self.request_admitted(project, hint, req, &no_limits).0
    }

    /// [`Agent::request`], allocating a new build only if `admission` allows it. Also says
    /// whether a new build was allocated (what a quota counts).
    pub(crate) fn request_admitted(
        self: &Arc<Self>,
        project: &ProjectId,
        hint: Option<&str>,
        req: Request,
        admission: &crate::quota::Admission,
    ) -> (Requested, bool) {
        let name = project.as_str();
        if self.is_gone(name) {
            return (Requested::Deleted, false);
        }
        let slot = self.slot_or_new(name);
        let mut s = slot.lock().expect("slot lock");
        if !req.force && req.commit.is_none() {
            if let (Some(hint), Some(good)) = (hint, &s.status.last_good) {
                // Under a rollback, the head it was made at counts as built: a redelivered
                // webhook for it must not bring back the build the user rolled away from.
                let rolled_back_at = good.rollback.as_ref().and_then(|r| r.head.as_deref());
                if (good.commit == hint || rolled_back_at == Some(hint))
                    && !s.status.state.is_active()
                    && s.pending.is_none()
                {
                    return (Requested::AlreadyBuilt(good.build), false);
                }
            }
            if let (Some(hint), Some(r)) = (hint, &s.running) {
                if s.status.commit.as_deref() == Some(hint) && s.pending.is_none() {
                    return (Requested::Queued(r.build), false);
                }
            }
        }
        if let (Some(c), Some(r)) = (&req.commit, &s.running) {
            // The same rollback (or share link) asked for twice: one build serves both.
            if s.status.requested_commit.as_ref() == Some(c)
                && s.status.pin == req.pin
                && s.pending.is_none()
            {
                return (Requested::Queued(r.build), false);
            }
        }
        let news = hint.is_some_and(|h| is_news(&s.status, h));
        if let Some((build, pending)) = &mut s.pending {
            let build = *build;
            if req.pin {
                if pending.pin && pending.commit == req.commit {
                    self.metrics.inc(&self.metrics.coalesced);
                    return (Requested::Queued(build), false);
                }
                return (Requested::Busy(build), false);
            }
            if pending.pin {
                // A share link's build yields to a push or a rollback; the link asks again.
                *pending = req;
            } else {
                pending.force |= req.force;
                // The newest intent wins: a rollback replaces a queued build of the head, and a
                // push of a new commit replaces a queued rollback. A sync that brings nothing
                // new (no hint, or a commit already seen) leaves a queued rollback alone.
                if req.commit.is_some() || news {
                    pending.commit = req.commit;
                }
            }
            self.metrics.inc(&self.metrics.coalesced);
            return (Requested::Queued(build), false);
        }
        if let Err(refusal) = admission.check(s.running.is_some()) {
            return (Requested::Refused(refusal), false);
        }
        let build = s.next_build;
        s.next_build += 1;
        if s.running.is_some() {
            s.pending = Some((build, req));
            self.metrics.inc(&self.metrics.coalesced);
            return (Requested::Queued(build), true);
        }
        self.start(name, &mut s, build, req);
        (Requested::Queued(build), true)
    }

    /// Records in the project's status (and so its events) that a sync's build was refused by
    /// a quota, so the generator sees why nothing builds. Repeated refusals (gitstore retries)
    /// update the one record instead of adding builds to the history.
    pub(crate) fn record_refusal(
        &self,
        project: &str,
        commit: Option<&str>,
        why: &crate::quota::Refusal,
    ) {
        self.quotas.note_refused(project, commit);
        let slot = self.slot_or_new(project);
        let mut s = slot.lock().expect("slot lock");
        if s.running.is_some() || s.pending.is_some() {
            // Its status is the running build's; the refusal is retried when that one ends.
            return;
        }
        let message = format!("refused by quota {}: {}", why.quota, why.message());
        if s.status.state == State::Refused {
            s.status.error = Some(message.clone());
            if let Some(h) = s.status.history.first_mut() {
                h.error = Some(message);
            }
        } else {
            let build = s.next_build;
            s.next_build += 1;
            s.status.refuse(build, commit.map(str::to_owned), message);
        }
        self.persist(project, &s.status);
        // Nothing served yet: the preview says why it waits. Otherwise the app stays.
        if publish::current(&publish::project_dir(&self.cfg.publish_dir, project)).is_none() {
            self.write_status_page(project, &s.status);
        }
    }

    /// Builds or rollbacks queued or running now, by project.
    pub(crate) fn active_projects(&self) -> Vec<String> {
        self.running()
    }

    fn start(self: &Arc<Self>, project: &str, s: &mut Slot, build: u64, req: Request) {
        if self.stopping.load(Ordering::SeqCst) {
            // Left queued on disk: the next start builds it (see `recover`).
            s.status.begin(build, req.commit, req.pin);
            self.persist(project, &s.status);
            return;
        }
        let cancel = CancellationToken::new();
        s.running = Some(Running {
            build,
            cancel: cancel.clone(),
        });
        s.status.begin(build, req.commit.clone(), req.pin);
        self.persist(project, &s.status);
        if !req.pin {
            self.write_status_page(project, &s.status);
        }
        let agent = self.clone();
        let project = project.to_owned();
        tokio::spawn(async move {
            agent.drive(project, build, req, cancel).await;
        });
    }

    /// Runs a build and then any follow-up that was queued during it.
    async fn drive(
        self: Arc<Self>,
        project: String,
        build: u64,
        req: Request,
        cancel: CancellationToken,
    ) {
        let (mut build, mut req, mut cancel) = (build, req, cancel);
        loop {
            self.metrics
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => p.ok(),
                _ = cancel.cancelled() => None,
            };
            self.metrics
                .queued
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if permit.is_some() {
                crate::pipeline::run(&self, &project, build, &req, &cancel).await;
            } else {
                self.update(&project, |st| {
                    st.finish(State::Cancelled, Some("cancelled while queued".into()))
                });
                if !req.pin {
                    self.show_status_page(&project);
                }
            }
            drop(permit);
            let slot = self.slot_or_new(&project);
            let mut s = slot.lock().expect("slot lock");
            match s.pending.take() {
                Some((next, next_req)) if self.stopping.load(Ordering::SeqCst) => {
                    s.status.begin(next, next_req.commit, next_req.pin);
                    self.persist(&project, &s.status);
                    s.running = None;
                    return;
                }
                Some((next, next_req)) => {
                    cancel = CancellationToken::new();
                    s.running = Some(Running {
                        build: next,
                        cancel: cancel.clone(),
                    });
                    s.status.begin(next, next_req.commit.clone(), next_req.pin);
                    self.persist(&project, &s.status);
                    if !next_req.pin {
                        self.write_status_page(&project, &s.status);
                    }
                    (build, req) = (next, next_req);
                }
                None => {
                    s.running = None;
                    drop(s);
                    // A build slot of this client freed: a build its quota refused may start;
                    // and the disk may have passed its high-water mark.
                    let agent = self.clone();
                    tokio::spawn(async move { agent.retry_refused().await });
                    self.gc.poke();
                    return;
                }
            }
        }
    }

    /// Cancels the running build and any queued follow-up. Returns the cancelled build ids.
    pub fn cancel(&self, project: &str) -> Vec<u64> {
        let Some(slot) = self.slot(project) else {
            return Vec::new();
        };
        let mut s = slot.lock().expect("slot lock");
        let mut ids = Vec::new();
        if let Some((b, _)) = s.pending.take() {
            ids.push(b);
        }
        if let Some(r) = &s.running {
            r.cancel.cancel();
            ids.push(r.build);
        }
        ids
    }

    /// Projects with a build running now.
    fn running(&self) -> Vec<String> {
        let slots: Vec<_> = {
            let slots = self.slots.lock().expect("slots lock");
            slots.iter().map(|(p, s)| (p.clone(), s.clone())).collect()
        };
        slots
            .into_iter()
            .filter(|(_, s)| s.lock().expect("slot lock").running.is_some())
            .map(|(p, _)| p)
            .collect()
    }

    /// Stops for a restart: starts no new build, gives running builds `grace` to finish, then
    /// cancels the rest and leaves them queued on disk, so the next start builds them again.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop_builds(grace).await;
        self.warm.stop_all().await;
    }

    async fn stop_builds(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut changed = self.subscribe();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let running = self.running();
            if running.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                log::warn!(builds = running.len(); "stopping: cancelling builds that did not finish; they run again at the next start");
                for p in &running {
                    self.cancel(p);
                }
                // Cancelled sandboxes are killed at once; this wait is for their clean-up.
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                while !self.running().is_empty() && tokio::time::Instant::now() < until {
                    let _ = tokio::time::timeout_at(until, changed.changed()).await;
                }
                for p in &running {
                    self.update(p, |s| {
                        s.state = State::Queued;
                        s.error = Some("interrupted by an agent shutdown; queued again".into());
                    });
                }
                return;
            }
            log::info!(builds = running.len(); "stopping: waiting for running builds");
            let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
        }
    }

    /// Builds every project in the blob store that this machine has not built at its newest
    /// version: after a restart that missed webhooks, or on a fresh machine whose disk was lost
    /// (the disk is only a cache; the store is the truth). Projects deleted or purged meanwhile
    /// are taken off this machine instead.
    pub async fn reconcile(self: &Arc<Self>) -> Result<usize, gitstore::blob::StoreError> {
        let mut queued = 0;
        let listed = self.store.projects().await?;
        // With leases, only the projects this agent holds or may claim: those that look free.
        let candidates = match &self.ownership {
            Some(o) => gitstore::lease::unclaimed(&self.store, &listed, o.term()).await?,
            None => listed.clone(),
        };
        for id in &candidates {
            let p = id.as_str();
            if !self.is_mine(id).await {
                continue;
            }
            let newest = match gitstore::manifest::newest_generation(&self.store, id, 0).await {
                Ok(Some(g)) => g,
                // Created but never pushed: nothing to build. Purged: nothing to keep.
                Ok(None) => {
                    if self.has_local(p) {
                        self.forget(id, true).await;
                    }
                    continue;
                }
                Err(e) => {
                    log::warn!(project = p, error:% = e; "cannot read the project's manifests; skipped");
                    continue;
                }
            };
            let repo = self.project_dir(p).join("repo.git");
            let behind = gitstore::sync::synced_generation(&repo) < newest;
            let status = self.status(p);
            let lost = match &status {
                None => true,
                Some(s) => {
                    s.last_good.is_some()
                        && crate::publish::current(&crate::publish::project_dir(
                            &self.cfg.publish_dir,
                            p,
                        ))
                        .is_none()
                }
            };
            let busy = status.as_ref().is_some_and(|s| s.state.is_active());
            // Refused by a quota before the restart: it still counts against the quota.
            let refused = status
                .as_ref()
                .filter(|s| s.state == State::Refused)
                .map(|s| s.commit.clone());
            if (behind || lost) && !busy {
                match gitstore::manifest::read(&self.store, id, newest).await {
                    Ok(m) if m.deleted_at.is_some() => {
                        self.forget(id, false).await;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!(project = p, error:% = e; "cannot read the project's manifest; skipped");
                        continue;
                    }
                }
                log::info!(project = p, behind, lost; "reconciling with the blob store");
                match refused {
                    Some(commit) => {
                        let hint = commit.as_deref();
                        match self
                            .request_within_quota(id, hint, Request::default())
                            .await
                        {
                            Requested::Refused(why) => self.record_refusal(p, hint, &why),
                            _ => queued += 1,
                        }
                    }
                    None => {
                        self.request(id, None, Request::default());
                        queued += 1;
                    }
                }
            }
        }
        // Purged while this machine was away: nothing of them is left in the store.
        let listed: HashSet<&str> = listed.iter().map(ProjectId::as_str).collect();
        for e in std::fs::read_dir(self.cfg.state_dir.join("projects"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| ProjectId::parse(n).ok())
            else {
                continue;
            };
            if !listed.contains(id.as_str()) {
                self.forget(&id, true).await;
            }
        }
        Ok(queued)
    }

    /// Who builds `project`: this agent unless another holds its lease (always this agent when
    /// leases are off). Claims it when it is free and this agent should take it.
    pub(crate) async fn owner(
        &self,
        project: &ProjectId,
    ) -> Result<crate::ownership::Owner, gitstore::blob::StoreError> {
        match &self.ownership {
            Some(o) => o.ensure(&self.store, project).await,
            None => Ok(crate::ownership::Owner::Me),
        }
    }

    /// The live lease of another agent on `project`, read without claiming: where a request
    /// about the project belongs. None when leases are off, the lease is this agent's or nobody's,
    /// or the store does not answer (this agent then answers from what it has).
    pub(crate) async fn holder_elsewhere(
        &self,
        project: &ProjectId,
    ) -> Option<gitstore::lease::Lease> {
        let o = self.ownership.as_ref()?;
        if o.trusted(project.as_str()) {
            return None;
        }
        match gitstore::lease::read(&self.store, project).await {
            Ok(Some(l)) if l.live() && l.agent != o.id() => Some(l),
            _ => None,
        }
    }

    /// `host:port` serving `project`'s previews: this agent's advertised address while it holds
    /// the lease, else the live holder's; empty when nobody live holds it, leases are off, or
    /// the store does not answer.
    pub(crate) async fn preview_route(&self, project: &ProjectId) -> String {
        let Some(o) = &self.ownership else {
            return String::new();
        };
        if o.trusted(project.as_str()) {
            return o.preview().to_owned();
        }
        match gitstore::lease::read(&self.store, project).await {
            // Also this agent's own lease from before a restart: its disk still has the builds.
            Ok(Some(l)) if l.live() => l.preview,
            _ => String::new(),
        }
    }

    async fn is_mine(&self, project: &ProjectId) -> bool {
        match self.owner(project).await {
            Ok(crate::ownership::Owner::Me) => true,
            Ok(_) => false,
            Err(e) => {
                log::warn!(project = project.as_str(), error:% = e; "cannot read the project's lease; skipped");
                false
            }
        }
    }

    /// Whether this agent may switch `project`'s served build now: it holds a lease no other
    /// agent can have taken yet (always, when leases are off).
    pub(crate) fn may_publish(&self, project: &str) -> bool {
        self.ownership.as_ref().is_none_or(|o| o.trusted(project))
    }

    /// With leases: renews them every third of a term, stops the builds of any it lost, and
    /// claims and builds projects that have no live holder (another agent died, or nobody has
    /// taken a project yet), so each project's preview comes back within about a term and a
    /// build after its holder is lost.
    /// For `/healthz`: this agent's id, leases held and capacity; null when leases are off.
    pub(crate) fn lease_summary(&self) -> serde_json::Value {
        match &self.ownership {
            Some(o) => serde_json::json!({
                "agent": o.id(),
                "held": o.holding(),
                "capacity": o.capacity(),
                "term_secs": o.term().as_secs(),
            }),
            None => serde_json::Value::Null,
        }
    }

    pub fn ownership_enabled(&self) -> bool {
        self.ownership.is_some()
    }

    pub fn start_leases(self: &Arc<Self>) {
        let Some(o) = &self.ownership else { return };
        let every = o.term() / 3;
        let agent = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if agent.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let o = agent.ownership.as_ref().expect("leases on");
                for p in o.renew(&agent.store).await {
                    agent.metrics.inc(&agent.metrics.leases_lost);
                    agent.cancel(&p);
                    if let Some(w) = agent.warm.take(&p) {
                        w.stop().await;
                    }
                }
                agent
                    .metrics
                    .leases_held
                    .store(o.holding() as u64, Ordering::Relaxed);
                if let Err(e) = agent.reconcile().await {
                    log::warn!(error:% = e; "cannot look for projects without a live lease");
                }
            }
        });
    }

    /// From now on nothing of the project is built, and no build reports its state.
    pub(crate) fn mark_gone(&self, project: &str) {
        self.gone
            .lock()
            .expect("gone lock")
            .insert(project.to_owned());
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(crate) fn is_gone(&self, project: &str) -> bool {
        self.gone.lock().expect("gone lock").contains(project)
    }

    /// A sync found the project's latest manifest live: it builds again (after a restore, or a
    /// new project of the same name after a purge).
    pub(crate) fn restored(&self, project: &str) -> bool {
        self.gone.lock().expect("gone lock").remove(project)
    }

    /// Whether anything of the project is on this machine.
    pub(crate) fn has_local(&self, project: &str) -> bool {
        self.is_known(project)
            || self.project_dir(project).exists()
            || publish::project_dir(&self.cfg.publish_dir, project).exists()
    }

    /// The project's latest manifest says it is deleted, or it has none any more (`purged`):
    /// stops its builds, unpublishes it (nginx answers 404 from then on) and removes its
    /// worktree, node_modules, repository cache, status and logs. A deleted project stays
    /// refused until a sync finds it restored; a purged one is forgotten entirely.
    pub async fn forget(self: &Arc<Self>, project: &ProjectId, purged: bool) {
        let locks = self.locks(project.as_str());
        let _decided = locks.lifecycle.lock().await;
        self.forget_locked(project, purged).await;
    }

    /// [`Agent::forget`] for a caller that holds the project's lifecycle lock.
    pub(crate) async fn forget_locked(self: &Arc<Self>, project: &ProjectId, purged: bool) {
        let name = project.as_str();
        if let (true, Some(o)) = (purged, &self.ownership) {
            o.remove(&self.store, name).await;
        }
        if !self.has_local(name) {
            // Already off this machine (a restart reading a deletion it applied before).
            if purged {
                self.restored(name);
            } else {
                self.mark_gone(name);
            }
            return;
        }
        self.mark_gone(name);
        let cancelled = self.cancel(name);
        // The cancelled build ends at once (its sandbox is killed); it must be over before its
        // directories go, or it could publish into them again.
        let mut changed = self.subscribe();
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.running().iter().any(|p| p == name) && tokio::time::Instant::now() < until {
            let _ = tokio::time::timeout_at(until, changed.changed()).await;
        }
        let locks = self.locks(name);
        let _no_sync = locks.repo.lock().await;
        let agent = self.clone();
        let n = name.to_owned();
        tokio::task::spawn_blocking(move || agent.remove_local(&n))
            .await
            .expect("removal task");
        self.unmirror(name).await;
        self.slots.lock().expect("slots lock").remove(name);
        self.quotas.clear_refused(name);
        self.shares.forget(name);
        self.forget_views(name);
        self.gc.note_freed();
        if purged {
            // Its id may be claimed again, by anyone.
            self.events.forget_owner(name);
            self.restored(name);
        }
        log::info!(project = name, purged, cancelled:? = cancelled; "project deleted: unpublished and removed from this machine");
    }

    fn remove_local(&self, project: &str) {
        // Killed before what it has mounted goes.
        drop(self.warm.take(project));
        let _ = std::fs::remove_dir_all(self.cfg.state_dir.join("warm").join(project));
        let trash = self.cfg.publish_dir.join(".trash");
        let published = publish::project_dir(&self.cfg.publish_dir, project);
        if published.exists() {
            let aside = trash.join(format!("{project}-{}", crate::status::now_ms()));
            // Renamed first, under the publish lock: nginx answers 404 from this instant, and no
            // rollback switches `current` in what is being deleted.
            let moved = {
                let locks = self.locks(project);
                let _switching = locks.publish.lock().expect("publish lock");
                std::fs::create_dir_all(&trash).and_then(|()| std::fs::rename(&published, &aside))
            };
            let gone = match moved {
                Ok(()) => std::fs::remove_dir_all(&aside),
                Err(_) => std::fs::remove_dir_all(&published),
            };
            if let Err(e) = gone {
                log::error!(project, error:% = e; "cannot remove the project's published builds");
            }
        }
        let nm = std::fs::read(self.project_dir(project).join("install.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["nm"].as_str().map(str::to_owned))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric()));
        if let Some(nm) = nm {
            let _ = std::fs::remove_dir_all(self.volume().join("nm").join(nm));
        }
        let dir = self.project_dir(project);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::error!(project, dir:% = dir.display(), error:% = e; "cannot remove the project's files");
            }
        }
        let prefix = format!("{project}-");
        for e in std::fs::read_dir(self.cfg.state_dir.join("builds"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            // `<project>-<build>`: a digit follows, so project `a` never takes `a-b`'s scratch.
            if n.strip_prefix(&prefix)
                .is_some_and(|rest| rest.bytes().next().is_some_and(|b| b.is_ascii_digit()))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Runs `f` while no build of the project can start; false (and `f` not run) when one is
    /// queued or running.
    pub(crate) fn while_idle(&self, project: &str, f: impl FnOnce()) -> bool {
        let Some(slot) = self.slot(project) else {
            f();
            return true;
        };
        let s = slot.lock().expect("slot lock");
        if s.running.is_some() {
            return false;
        }
        f();
        true
    }

    /// Whether a sync for `head` has nothing to build: the project's last build was of that
    /// commit and failed or was cancelled (a metadata or share change publishes a manifest
    /// generation without moving any branch; `POST /build` builds it again on purpose).
    pub(crate) fn already_tried(&self, project: &str, head: &str) -> Option<(u64, State)> {
        let slot = self.slot(project)?;
        let s = slot.lock().expect("slot lock");
        let tried = s.running.is_none()
            && s.pending.is_none()
            && s.status.commit.as_deref() == Some(head)
            && matches!(
                s.status.state,
                State::Failed | State::TimedOut | State::Cancelled
            );
        tried.then_some((s.status.build, s.status.state))
    }

    /// Writes the project's build state to the store for gitstore's project API, off the build
    /// path: a report, so a failure is only logged.
    pub(crate) fn report_build_state(&self, project: &str) {
        if self.is_gone(project) {
            return;
        }
        let (Some(st), Ok(id)) = (self.status(project), ProjectId::parse(project)) else {
            return;
        };
        let served = crate::versions::served(self, project, Some(&st));
        let usage = crate::retention::Usage::load(&self.project_dir(project)).unwrap_or_default();
        let state = gitstore::build_state::BuildState {
            agent: self.hostname.clone(),
            current_build: served.as_ref().map(|(b, _)| *b),
            current_commit: served.map(|(_, c)| c),
            last_state: st.state.as_str().to_owned(),
            last_built_at: st.finished_at_ms.map(|ms| ms / 1000),
            last_viewed_at: st.last_viewed_at_ms.map(|ms| ms / 1000),
            preview_url: self.cfg.preview_url_for(project),
            disk_bytes: usage.total(),
            updated_at: crate::status::now_ms() / 1000,
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = gitstore::build_state::write(&store, &id, &state).await {
                log::warn!(project = id.as_str(), error:% = e; "cannot write the build state to the store");
            }
        });
    }

    /// Serves `target` again. A kept successful build of it is switched to at once (a rename and
    /// a status write, under the lock that orders it with publishing and pruning); otherwise a
    /// build of exactly that commit is queued, once the commit is found on one of the project's
    /// branches.
    ///
    /// A build running meanwhile still publishes when it finishes: it was asked for after the
    /// commit it builds was pushed, so what it publishes is newer than the rollback's target.
    pub async fn rollback(
        self: &Arc<Self>,
        project: &ProjectId,
        target: RollbackTarget,
    ) -> Result<RolledBack, RollbackError> {
        let name = project.as_str();
        let status = self.status(name);
        let dir = publish::project_dir(&self.cfg.publish_dir, name);
        let (commit, asked_build) = match target {
            RollbackTarget::Commit(c) => (c.to_ascii_lowercase(), None),
            RollbackTarget::Build(n) => {
                let st = status.as_ref().ok_or(RollbackError::UnknownBuild(n))?;
                let commit = match st.history.iter().find(|h| h.build == n) {
                    Some(h) => h.commit.clone(),
                    None => st
                        .last_good
                        .as_ref()
                        .filter(|g| g.build == n)
                        .map(|g| Some(g.commit.clone()))
                        .ok_or(RollbackError::UnknownBuild(n))?,
                };
                (commit.ok_or(RollbackError::BuildWithoutCommit(n))?, Some(n))
            }
        };
        // Successful, kept builds of the commit: the one asked for first, then newest first.
        let mut builds: Vec<u64> = status
            .iter()
            .flat_map(|s| {
                let good = s.last_good.iter().map(|g| (g.build, g.commit.as_str()));
                let done = s
                    .history
                    .iter()
                    .filter(|h| h.state == State::Ready)
                    .filter_map(|h| Some((h.build, h.commit.as_deref()?)));
                good.chain(done)
            })
            .filter(|(_, c)| *c == commit)
            .map(|(b, _)| b)
            .filter(|b| publish::is_kept(&dir, *b))
            .collect();
        builds.sort_unstable_by(|a, b| b.cmp(a));
        builds.dedup();
        if let Some(n) = asked_build.filter(|n| builds.contains(n)) {
            builds.retain(|b| *b != n);
            builds.insert(0, n);
        }
        // The head as this machine knows it, without a sync: if a push is on its way, its
        // build sees a head that moved and publishes it, as a new push should.
        let head = crate::versions::preview_branch(&self.repo_path(name))
            .await
            .ok()
            .flatten()
            .map(|(_, c)| c);
        for build in builds {
            let (agent, project, c, head) =
                (self.clone(), name.to_owned(), commit.clone(), head.clone());
            let switched =
                tokio::task::spawn_blocking(move || agent.switch_to(&project, build, &c, head))
                    .await
                    .expect("rollback task")?;
            if switched {
                self.report_build_state(name);
                self.mirror(name);
                return Ok(RolledBack::Switched { build, commit });
            }
        }
        crate::versions::resolve_commit(self, project, &commit).await?;
        let req = Request {
            force: false,
            commit: Some(commit.clone()),
            pin: false,
        };
        let build = match self.request_within_quota(project, None, req).await {
            Requested::Queued(b) | Requested::AlreadyBuilt(b) | Requested::Busy(b) => b,
            Requested::Refused(r) => return Err(RollbackError::Quota(r)),
            Requested::Deleted => return Err(RollbackError::Deleted(name.to_owned())),
        };
        log::info!(project = name, build, commit; "rollback: no kept build of the commit; building it");
        Ok(RolledBack::Queued { build, commit })
    }

    /// Makes kept build `build` of `commit` the served one. False when it is no longer kept (a
    /// prune took it since it was picked).
    fn switch_to(
        &self,
        project: &str,
        build: u64,
        commit: &str,
        head: Option<String>,
    ) -> Result<bool, PublishError> {
        let dir = publish::project_dir(&self.cfg.publish_dir, project);
        let locks = self.locks(project);
        let _switching = locks.publish.lock().expect("publish lock");
        if !publish::is_kept(&dir, build) {
            return Ok(false);
        }
        let good = self.status(project).and_then(|s| s.last_good);
        if publish::current(&dir) == Some(build) && good.is_some_and(|g| g.build == build) {
            return Ok(true);
        }
        publish::switch_current(&dir, build)?;
        let now = crate::status::now_ms();
        let (preview_url, pinned_url) = (
            self.cfg.preview_url_for(project),
            self.cfg.pinned_url_for(project, build),
        );
        let mut from = None;
        self.update(project, |s| {
            from = s.last_good.take();
            s.last_good = Some(LastGood {
                commit: commit.to_owned(),
                build,
                preview_url,
                published_at_ms: now,
                pinned_url: Some(pinned_url),
                rollback: Rollback::after(from.as_ref(), commit, head, now),
            });
        });
        // The build rolled back to is a ready one: a later build's failure page (or the
        // building page that follows one) must not hide it. Each build writes the page again
        // as it starts and ends, so nothing else needs to change.
        if let Err(e) = crate::preview::set_status_page(&dir, None) {
            log::error!(project, error:% = e; "cannot remove the preview's status page");
        }
        log::info!(project, build, commit, from_build:? = from.map(|g| g.build); "rolled back");
        Ok(true)
    }

    /// Builds waiting for a machine-wide slot.
    pub fn queue_depth(&self) -> u64 {
        self.metrics
            .queued
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// After a restart: cleans build scratch, and queues again every build that was interrupted.
    pub fn recover(self: &Arc<Self>) {
        for scratch in ["builds", "warm"] {
            let _ = std::fs::remove_dir_all(self.cfg.state_dir.join(scratch));
        }
        crate::sandbox::remove_orphaned_cgroups(crate::warm::CGROUP_MARKER);
        let Ok(entries) = std::fs::read_dir(self.cfg.state_dir.join("projects")) else {
            return;
        };
        for e in entries.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(id) = ProjectId::parse(&name) else {
                continue;
            };
            // A sync killed mid-way leaves ref locks that would fail every later one; no build
            // or sync of ours runs yet.
            match gitstore::sync::remove_stale_locks(&self.repo_path(&name)) {
                Ok(0) => {}
                Ok(n) => {
                    log::warn!(project = name, locks = n; "removed lock files a killed git left in the repository")
                }
                Err(e) => {
                    log::error!(project = name, error:% = e; "cannot remove stale lock files")
                }
            }
            let Some(st) = self.status(&name) else {
                continue;
            };
            if st.state.is_active() {
                log::warn!(project = name, build = st.build; "build was interrupted by a restart; queuing it again");
                self.update(&name, |s| {
                    s.finish(
                        State::Cancelled,
                        Some("interrupted by an agent restart; rebuilt".into()),
                    )
                });
                // A rollback's build is of its commit, not of whatever the branch holds now.
                let commit = st.requested_commit.clone();
                self.request(
                    &id,
                    None,
                    Request {
                        force: true,
                        commit,
                        pin: st.pin,
                    },
                );
            }
        }
    }

    /// Shows (or removes) the page the preview URL serves in place of the app, from the
    /// project's current status.
    pub(crate) fn show_status_page(&self, project: &str) {
        if let Some(st) = self.status(project) {
            self.write_status_page(project, &st);
        }
    }

    fn write_status_page(&self, project: &str, status: &Status) {
        let dir = crate::publish::project_dir(&self.cfg.publish_dir, project);
        let page = crate::preview::status_page(
            status,
            crate::publish::current(&dir).is_some(),
            dir.join(crate::preview::STATUS_PAGE).exists(),
            &self.cfg.generator_origins,
            self.cfg.log_url_for(project, status.build).as_deref(),
        );
        if let Err(e) = crate::preview::set_status_page(&dir, page.as_deref()) {
            log::error!(project, error:% = e; "cannot write the preview's status page");
        }
    }

    pub(crate) fn is_known(&self, project: &str) -> bool {
        self.slot(project).is_some()
    }

    pub(crate) fn scratch_dir(&self, project: &str, build: u64) -> PathBuf {
        self.cfg
            .state_dir
            .join("builds")
            .join(format!("{project}-{build}"))
    }

    pub(crate) fn volume(&self) -> PathBuf {
        self.cfg.volume_dir.clone()
    }

    /// Creates the volume's fixed layout with its owners and modes: the store writable by the
    /// sandbox user, `nm/` traversable but not listable, so no install finds another's dir.
    pub fn prepare_volume(&self) -> std::io::Result<()> {
        let v = self.volume();
        let (uid, gid) = (self.cfg.sandbox_uid, self.cfg.sandbox_gid);
        make_owned_dir(&v, 0, 0, 0o711)?;
        make_owned_dir(&v.join("store"), uid, gid, 0o755)?;
        make_owned_dir(&v.join("nm"), 0, 0, 0o711)?;
        make_owned_dir(&v.join("engines"), 0, 0, 0o755)
    }
}

/// Whether a webhook's commit is one the project has not seen: not the running build's, not the
/// served one, not the head a rollback was made at.
fn is_news(status: &Status, hint: &str) -> bool {
    let good = status.last_good.as_ref();
    let rolled_back_at = good
        .and_then(|g| g.rollback.as_ref())
        .and_then(|r| r.head.as_deref());
    status.commit.as_deref() != Some(hint)
        && good.is_none_or(|g| g.commit != hint)
        && rolled_back_at != Some(hint)
}

/// Creates a directory owned by `uid:gid` with `mode`.
pub(crate) fn make_owned_dir(path: &Path, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
