//! View share links: `GET /share/<token>` opens the version a share pins, without a login (the
//! token is the credential).
//!
//! A token is `<project>.<id>.<secret>`; gitstore keeps only its SHA-256, in the share list of
//! the project's manifest. The link resolves to the pinned URL of a kept build of the shared
//! commit; when none is kept (retired, or never built on this machine), it queues a build of
//! that commit published at its pinned URL only, leaving the project's preview as it is, and
//! answers that it is building. Retention keeps the builds of commits a live share names, so a
//! link usually redirects at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gitstore::manifest::Manifest;
use gitstore::ProjectId;

use crate::agent::{Agent, Request, Requested};
use crate::publish;
use crate::status::State;

/// How long a project's manifest answers share links before it is read again. Each link
/// opened costs a store read at most this often per project; a revoked link stops working
/// within it (at once when gitstore's webhook for the change reaches this agent).
const MANIFEST_TTL: Duration = Duration::from_secs(5);
/// A token no cached share matches is checked against a fresh read, at most this often per
/// project: a link created a moment ago opens at once, and unknown tokens cannot make the
/// agent read the store more often than this.
const MISS_EVERY: Duration = Duration::from_secs(1);
/// A failed build of a shared version is not retried on every reload of the link.
const FAILED_RETRY: Duration = Duration::from_secs(600);
/// What the building answer asks the browser to wait before asking again.
pub const BUILDING_RETRY_SECS: u64 = 3;

/// Manifests read for share links, per project.
#[derive(Default)]
pub(crate) struct Shares {
    manifests: Mutex<HashMap<String, (Instant, Arc<Manifest>)>>,
    /// When a miss last made a fresh read, per project.
    misses: Mutex<HashMap<String, Instant>>,
}

impl Shares {
    /// The project's latest manifest, as read at most `ttl` ago.
    async fn manifest(
        &self,
        store: &gitstore::BlobStore,
        project: &ProjectId,
        ttl: Duration,
    ) -> Result<Arc<Manifest>, gitstore::manifest::ManifestError> {
        let cached = self
            .manifests
            .lock()
            .expect("share cache")
            .get(project.as_str())
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, m)| m.clone());
        if let Some(m) = cached {
            return Ok(m);
        }
        let m = Arc::new(gitstore::manifest::latest(store, project).await?);
        self.remember(project.as_str(), m.clone());
        Ok(m)
    }

    /// A manifest just read by a sync: share links see its shares at once.
    pub(crate) fn remember(&self, project: &str, m: Arc<Manifest>) {
        let mut cache = self.manifests.lock().expect("share cache");
        if cache.len() > 10_000 {
            cache.retain(|_, (at, _)| at.elapsed() < MANIFEST_TTL);
        }
        cache.insert(project.to_owned(), (Instant::now(), m));
    }

    /// Whether a token that matched no cached share may check a fresh read now.
    fn may_recheck(&self, project: &str) -> bool {
        let mut misses = self.misses.lock().expect("share misses");
        if misses.len() > 10_000 {
            misses.retain(|_, at| at.elapsed() < MISS_EVERY);
        }
        match misses.get(project) {
            Some(at) if at.elapsed() < MISS_EVERY => false,
            _ => {
                misses.insert(project.to_owned(), Instant::now());
                true
            }
        }
    }

    pub(crate) fn forget(&self, project: &str) {
        self.manifests.lock().expect("share cache").remove(project);
    }
}

/// Where a share link leads.
#[derive(Debug)]
pub enum Opened {
    /// A kept build of the shared commit.
    Redirect { build: u64, url: String },
    /// A build of the shared commit is queued or running.
    Building { build: Option<u64> },
    /// The project owner's build quota does not allow building it now.
    Refused(crate::quota::Refusal),
    /// The last build of the shared commit failed, recently.
    Failed { build: u64, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("this share link is not valid: check that it was copied whole")]
    Unknown,
    #[error("this share link was revoked by the project's owner")]
    Revoked,
    #[error("this share link has expired: ask the project's owner for a new one")]
    Expired,
    #[error("the shared project was deleted")]
    Deleted,
    #[error("the blob store could not be read: {0}")]
    Store(#[from] gitstore::manifest::ManifestError),
}

impl Agent {
    /// Resolves a share token to the build that shows its version, queuing one when no kept
    /// build has it.
    pub async fn open_share(self: &Arc<Self>, token: &str) -> Result<Opened, ShareError> {
        let (project, _) = gitstore::shares::parse_token(token).ok_or(ShareError::Unknown)?;
        let find = |m: &Manifest| gitstore::shares::find(m, token).cloned();
        let mut m = self
            .shares
            .manifest(&self.store, &project, MANIFEST_TTL)
            .await?;
        if find(&m).is_none() && self.shares.may_recheck(project.as_str()) {
            m = self
                .shares
                .manifest(&self.store, &project, Duration::ZERO)
                .await?;
        }
        let share = find(&m).ok_or(ShareError::Unknown)?;
        if m.deleted_at.is_some() {
            return Err(ShareError::Deleted);
        }
        let now = crate::status::now_ms() / 1000;
        if !share.is_live(now) {
            return Err(if share.revoked_at.is_some() {
                ShareError::Revoked
            } else {
                ShareError::Expired
            });
        }
        let commit = share.commit.to_ascii_lowercase();
        let name = project.as_str();
        if let Some(build) = self.kept_build_of(name, &commit) {
            return Ok(Opened::Redirect {
                build,
                url: self.cfg.pinned_url_for(name, build),
            });
        }
        if let Some(st) = self.status(name) {
            if st.state.is_active() && st.commit.as_deref() == Some(&commit) {
                return Ok(Opened::Building {
                    build: Some(st.build),
                });
            }
            let last = st
                .history
                .iter()
                .find(|h| h.commit.as_deref() == Some(&commit));
            if let Some(h) = last.filter(|h| matches!(h.state, State::Failed | State::TimedOut)) {
                let age = crate::status::now_ms().saturating_sub(h.finished_at_ms);
                if age < FAILED_RETRY.as_millis() as u64 {
                    return Ok(Opened::Failed {
                        build: h.build,
                        error: h.error.clone().unwrap_or_default(),
                    });
                }
            }
        }
        let req = Request {
            force: false,
            commit: Some(commit.clone()),
            pin: true,
        };
        match self.request_within_quota(&project, None, req).await {
            Requested::Queued(b) => {
                log::info!(project = name, build = b, commit; "share link: no kept build of the commit; building it");
                Ok(Opened::Building { build: Some(b) })
            }
            // Another build goes first; the page asks again.
            Requested::Busy(_) => Ok(Opened::Building { build: None }),
            Requested::AlreadyBuilt(b) => Ok(Opened::Redirect {
                build: b,
                url: self.cfg.pinned_url_for(name, b),
            }),
            Requested::Refused(r) => Ok(Opened::Refused(r)),
            Requested::Deleted => Err(ShareError::Deleted),
        }
    }

    /// The newest kept, successful build of `commit`.
    pub(crate) fn kept_build_of(&self, project: &str, commit: &str) -> Option<u64> {
        let st = self.status(project)?;
        let dir = publish::project_dir(&self.cfg.publish_dir, project);
        let good = st
            .last_good
            .iter()
            .filter(|g| g.commit == commit)
            .map(|g| g.build);
        let done = st
            .history
            .iter()
            .filter(|h| h.state == State::Ready && h.commit.as_deref() == Some(commit))
            .map(|h| h.build);
        good.chain(done)
            .filter(|b| publish::is_kept(&dir, *b))
            .max()
    }
}
