//! The build queue: one build per project at a time, syncs that arrive meanwhile collapsed into
//! one follow-up build of the newest commit, and a bounded number of builds machine-wide.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gitstore::{BlobStore, ProjectId};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::status::{State, Status};

/// Why a build was asked for.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Build even if the commit is already published (`POST /build`).
    pub force: bool,
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
    permits: Arc<Semaphore>,
    /// Bumped whenever any status changes, so log followers and waiters wake.
    changed: watch::Sender<u64>,
    /// Set by [`Agent::shutdown`]: no new build starts.
    stopping: AtomicBool,
}

/// What [`Agent::request`] did.
pub enum Requested {
    /// A new build was queued, or the request joined the queued follow-up.
    Queued(u64),
    /// That commit is already built and published.
    AlreadyBuilt(u64),
}

impl Agent {
    pub fn new(cfg: Config, store: BlobStore, exe: PathBuf) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(cfg.concurrency));
        Arc::new(Self {
            cfg,
            store,
            exe,
            metrics: Metrics::default(),
            engines: Default::default(),
            slots: Mutex::new(HashMap::new()),
            permits,
            changed: watch::channel(0).0,
            stopping: AtomicBool::new(false),
        })
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

    fn slot(&self, project: &str) -> Option<Arc<Mutex<Slot>>> {
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(s) = slots.get(project) {
            return Some(s.clone());
        }
        let status = Status::load(&self.status_path(project))?;
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
        self.changed.send_modify(|n| *n += 1);
    }

    /// Queues a build of `project`'s newest commit, or says it is already built. `hint` is the
    /// commit the caller expects (from the webhook), used only to answer without building.
    pub fn request(
        self: &Arc<Self>,
        project: &ProjectId,
        hint: Option<&str>,
        req: Request,
    ) -> Requested {
        let name = project.as_str();
        let slot = self.slot_or_new(name);
        let mut s = slot.lock().expect("slot lock");
        if !req.force {
            if let (Some(hint), Some(good)) = (hint, &s.status.last_good) {
                if good.commit == hint && !s.status.state.is_active() && s.pending.is_none() {
                    return Requested::AlreadyBuilt(good.build);
                }
            }
            if let (Some(hint), Some(r)) = (hint, &s.running) {
                if s.status.commit.as_deref() == Some(hint) && s.pending.is_none() {
                    return Requested::Queued(r.build);
                }
            }
        }
        if let Some((build, pending)) = &mut s.pending {
            pending.force |= req.force;
            self.metrics.inc(&self.metrics.coalesced);
            return Requested::Queued(*build);
        }
        let build = s.next_build;
        s.next_build += 1;
        if s.running.is_some() {
            s.pending = Some((build, req));
            self.metrics.inc(&self.metrics.coalesced);
            return Requested::Queued(build);
        }
        self.start(name, &mut s, build, req);
        Requested::Queued(build)
    }

    fn start(self: &Arc<Self>, project: &str, s: &mut Slot, build: u64, req: Request) {
        if self.stopping.load(Ordering::SeqCst) {
            // Left queued on disk: the next start builds it (see `recover`).
            s.status.begin(build);
            self.persist(project, &s.status);
            return;
        }
        let cancel = CancellationToken::new();
        s.running = Some(Running {
            build,
            cancel: cancel.clone(),
        });
        s.status.begin(build);
        self.persist(project, &s.status);
        self.write_status_page(project, &s.status);
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
                self.show_status_page(&project);
            }
            drop(permit);
            let slot = self.slot_or_new(&project);
            let mut s = slot.lock().expect("slot lock");
            match s.pending.take() {
                Some((next, _)) if self.stopping.load(Ordering::SeqCst) => {
                    s.status.begin(next);
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
                    s.status.begin(next);
                    self.persist(&project, &s.status);
                    self.write_status_page(&project, &s.status);
                    (build, req) = (next, next_req);
                }
                None => {
                    s.running = None;
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
    /// (the disk is only a cache; the store is the truth).
    pub async fn reconcile(self: &Arc<Self>) -> Result<usize, gitstore::blob::StoreError> {
        let mut queued = 0;
        for id in self.store.projects().await? {
            let p = id.as_str();
            let newest = match gitstore::manifest::newest_generation(&self.store, &id, 0).await {
                Ok(Some(g)) => g,
                // Created but never pushed: nothing to build.
                Ok(None) => continue,
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
            let busy = status.is_some_and(|s| s.state.is_active());
            if (behind || lost) && !busy {
                log::info!(project = p, behind, lost; "reconciling with the blob store");
                self.request(&id, None, Request::default());
                queued += 1;
            }
        }
        Ok(queued)
    }

    /// Builds waiting for a machine-wide slot.
    pub fn queue_depth(&self) -> u64 {
        self.metrics
            .queued
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// After a restart: cleans build scratch, and queues again every build that was interrupted.
    pub fn recover(self: &Arc<Self>) {
        let scratch = self.cfg.state_dir.join("builds");
        let _ = std::fs::remove_dir_all(&scratch);
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
                self.request(&id, None, Request { force: true });
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

/// Creates a directory owned by `uid:gid` with `mode`.
pub(crate) fn make_owned_dir(path: &Path, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
