//! The two quotas the agent enforces per client (gitstore enforces projects and stored bytes):
//! builds started per hour, and builds of the client's projects queued or running at once.
//!
//! A client's limits come from its record in the store (`gitstore::auth::Client::quotas`), each
//! unset one from the agent's flags. Admission happens where a build is asked for (the client
//! API, the sync webhook, a rollback or a share link that must build), only when the request
//! would start a new build: a request that joins a queued build, or finds its commit already
//! built, costs nothing. Builds the agent starts by itself (recovery after a restart,
//! reconciliation with the store) are not refused: they replace builds that were admitted.
//!
//! The starts of the last hour are kept in `<state>/quota-starts.json`, so a restart does not
//! hand every client a fresh hour.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gitstore::{BlobStore, ProjectId};
use serde::Serialize;

use crate::agent::{Agent, Request, Requested};

/// How long a client's limits are used before its record is read again: an admin's change takes
/// effect within this.
const CLIENT_TTL: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);
/// What a refusal for concurrency asks the caller to wait: builds take seconds to minutes.
const CONCURRENT_RETRY: Duration = Duration::from_secs(15);

/// Which quota refused a build, with its value and use, for a 429 and the project's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub quota: &'static str,
    pub limit: u64,
    pub used: u64,
    /// Seconds until the quota may allow the build.
    #[serde(skip)]
    pub retry_after_secs: u64,
}

impl Refusal {
    pub fn message(&self) -> String {
        match self.quota {
            "builds_per_hour" => format!(
                "the client's quota of {} builds per hour is used up ({} in the last hour): \
                 the build can start in {} s",
                self.limit, self.used, self.retry_after_secs
            ),
            _ => format!(
                "the client's quota of {} concurrent builds is reached ({} queued or running): \
                 the build can start when one of them ends",
                self.limit, self.used
            ),
        }
    }
}

pub(crate) struct Quotas {
    defaults: gitstore::auth::Quotas,
    /// Client id → when its record was read and its limits.
    clients: Mutex<HashMap<String, (Instant, gitstore::auth::Quotas)>>,
    /// Client id → when its builds of the last hour were admitted (Unix ms), oldest first.
    starts: Mutex<HashMap<String, VecDeque<u64>>>,
    /// Where `starts` is kept across restarts; None in unit tests.
    starts_file: Option<PathBuf>,
    /// One admission at a time, so two requests cannot both take the last unit of a quota.
    admission: tokio::sync::Mutex<()>,
    /// Projects whose sync was refused, with the commit it announced, built once their
    /// client's quota allows.
    refused: Mutex<BTreeMap<String, Option<String>>>,
}

impl Quotas {
    pub(crate) fn new(
        builds_per_hour: u64,
        concurrent_builds: u64,
        starts_file: Option<PathBuf>,
    ) -> Self {
        // Unreadable (first start, or torn by a crash before the rename): an empty hour.
        let starts = starts_file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            defaults: gitstore::auth::Quotas {
                builds_per_hour: Some(builds_per_hour),
                concurrent_builds: Some(concurrent_builds),
                ..Default::default()
            },
            clients: Mutex::default(),
            starts: Mutex::new(starts),
            starts_file,
            admission: tokio::sync::Mutex::new(()),
            refused: Mutex::default(),
        }
    }

    /// The client's limits, its record's or the defaults.
    async fn of(&self, store: &BlobStore, client: &str) -> gitstore::auth::Quotas {
        let cached = self
            .clients
            .lock()
            .expect("quota cache")
            .get(client)
            .filter(|(at, _)| at.elapsed() < CLIENT_TTL)
            .map(|(_, q)| *q);
        if let Some(q) = cached {
            return q;
        }
        let own = match gitstore::auth::load_client(store, client).await {
            Ok(Some(c)) => c.quotas,
            Ok(None) => Default::default(),
            Err(e) => {
                // The defaults still apply: a store hiccup must neither lift nor block builds.
                log::warn!(client, error:% = e; "cannot read the client's quotas; using the defaults");
                Default::default()
            }
        };
        let q = own.or(&self.defaults);
        let mut clients = self.clients.lock().expect("quota cache");
        if clients.len() > 100_000 {
            clients.clear();
        }
        clients.insert(client.to_owned(), (Instant::now(), q));
        q
    }

    /// Builds the client started within the last hour, and when the oldest of them leaves it.
    fn hourly(&self, client: &str, now_ms: u64) -> (u64, Duration) {
        let hour = HOUR.as_millis() as u64;
        let mut starts = self.starts.lock().expect("quota starts");
        let Some(q) = starts.get_mut(client) else {
            return (0, Duration::ZERO);
        };
        while q.front().is_some_and(|t| now_ms.saturating_sub(*t) >= hour) {
            q.pop_front();
        }
        let wait = q.front().map_or(0, |t| hour - now_ms.saturating_sub(*t));
        (q.len() as u64, Duration::from_millis(wait))
    }

    fn record_start(&self, client: &str, now_ms: u64) {
        let hour = HOUR.as_millis() as u64;
        let body = {
            let mut starts = self.starts.lock().expect("quota starts");
            starts
                .entry(client.to_owned())
                .or_default()
                .push_back(now_ms);
            starts.retain(|_, q| {
                q.retain(|t| now_ms.saturating_sub(*t) < hour);
                !q.is_empty()
            });
            self.starts_file
                .as_ref()
                .map(|_| serde_json::to_vec(&*starts).expect("serializes"))
        };
        if let (Some(file), Some(body)) = (&self.starts_file, body) {
            if let Err(e) = crate::fsutil::write_atomic(file, &body) {
                log::warn!(file:% = file.display(), error:% = e; "cannot save the hourly build counts");
            }
        }
    }

    pub(crate) fn note_refused(&self, project: &str, commit: Option<&str>) {
        self.refused
            .lock()
            .expect("refused set")
            .insert(project.to_owned(), commit.map(str::to_owned));
    }

    pub(crate) fn clear_refused(&self, project: &str) {
        self.refused.lock().expect("refused set").remove(project);
    }

    fn refused(&self) -> Vec<(String, Option<String>)> {
        self.refused
            .lock()
            .expect("refused set")
            .iter()
            .map(|(p, c)| (p.clone(), c.clone()))
            .collect()
    }
}

/// The limits applied to one admission, checked under the project's slot lock.
pub(crate) struct Admission {
    per_hour: Option<u64>,
    hourly_used: u64,
    hourly_wait: Duration,
    concurrent: Option<u64>,
    /// The client's other projects with a build queued or running.
    active_elsewhere: u64,
}

impl Admission {
    /// No limits: builds the agent starts by itself.
    pub(crate) fn unlimited() -> Self {
        Self {
            per_hour: None,
            hourly_used: 0,
            hourly_wait: Duration::ZERO,
            concurrent: None,
            active_elsewhere: 0,
        }
    }

    /// Whether a new build may be allocated; `project_active` says the project already has a
    /// build queued or running, so the new one follows it and adds no concurrency.
    pub(crate) fn check(&self, project_active: bool) -> Result<(), Refusal> {
        if let Some(limit) = self.per_hour {
            if self.hourly_used >= limit {
                return Err(Refusal {
                    quota: "builds_per_hour",
                    limit,
                    used: self.hourly_used,
                    retry_after_secs: self.hourly_wait.as_secs().max(1),
                });
            }
        }
        if let Some(limit) = self.concurrent {
            if !project_active && self.active_elsewhere >= limit {
                return Err(Refusal {
                    quota: "concurrent_builds",
                    limit,
                    used: self.active_elsewhere,
                    retry_after_secs: CONCURRENT_RETRY.as_secs(),
                });
            }
        }
        Ok(())
    }
}

impl Agent {
    /// [`Agent::request`] for a caller whose builds count against the project owner's quotas:
    /// `Requested::Refused` when a new build would exceed one.
    pub(crate) async fn request_within_quota(
        self: &Arc<Self>,
        project: &ProjectId,
        hint: Option<&str>,
        req: Request,
    ) -> Requested {
        let requested = self.admit(project, hint, req).await;
        if let Requested::Refused(r) = &requested {
            self.metrics.inc(&self.metrics.quota_refusals);
            log::info!(project = project.as_str(), quota = r.quota, limit = r.limit, used = r.used; "build refused by quota");
        }
        requested
    }

    async fn admit(
        self: &Arc<Self>,
        project: &ProjectId,
        hint: Option<&str>,
        req: Request,
    ) -> Requested {
        let name = project.as_str();
        let client = match self.events.owner(&self.store, name).await {
            Ok(Some(c)) => c,
            // A project without an owner has no client to count against.
            Ok(None) => return self.request(project, hint, req),
            Err(e) => {
                log::warn!(project = name, error:% = e; "cannot read the project's owner; building without quota checks");
                return self.request(project, hint, req);
            }
        };
        let limits = self.quotas.of(&self.store, &client).await;
        let _one_at_a_time = self.quotas.admission.lock().await;
        let mut active_elsewhere = 0;
        if limits.concurrent_builds.is_some() {
            for p in self.active_projects() {
                if p != name
                    && self
                        .events
                        .owner(&self.store, &p)
                        .await
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some(client.as_str())
                {
                    active_elsewhere += 1;
                }
            }
        }
        let now = crate::status::now_ms();
        let (hourly_used, hourly_wait) = self.quotas.hourly(&client, now);
        let admission = Admission {
            per_hour: limits.builds_per_hour,
            hourly_used,
            hourly_wait,
            concurrent: limits.concurrent_builds,
            active_elsewhere,
        };
        let (requested, started) = self.request_admitted(project, hint, req, &admission);
        if started {
            self.quotas.record_start(&client, now);
            self.quotas.clear_refused(name);
        }
        requested
    }

    /// Builds refused earlier whose quota may allow them now: after a build ends, and at every
    /// maintenance pass. gitstore redelivers refused webhooks too, but gives up after minutes.
    pub(crate) async fn retry_refused(self: &Arc<Self>) {
        for (p, commit) in self.quotas.refused() {
            let Ok(id) = ProjectId::parse(&p) else {
                self.quotas.clear_refused(&p);
                continue;
            };
            match self.admit(&id, commit.as_deref(), Request::default()).await {
                Requested::Refused(_) => {}
                Requested::Queued(_) | Requested::AlreadyBuilt(_) | Requested::Busy(_) => {
                    log::info!(project = p; "a build refused by quota earlier is admitted now");
                    self.quotas.clear_refused(&p);
                }
                Requested::Deleted => self.quotas.clear_refused(&p),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(per_hour: u64, used: u64, concurrent: u64, elsewhere: u64) -> Admission {
        Admission {
            per_hour: Some(per_hour),
            hourly_used: used,
            hourly_wait: Duration::from_secs(1800),
            concurrent: Some(concurrent),
            active_elsewhere: elsewhere,
        }
    }

    #[test]
    fn refuses_past_either_quota_and_says_which() {
        assert!(admission(2, 1, 1, 0).check(false).is_ok());
        let r = admission(2, 2, 1, 0).check(false).unwrap_err();
        assert_eq!((r.quota, r.limit, r.used), ("builds_per_hour", 2, 2));
        assert_eq!(r.retry_after_secs, 1800);
        let r = admission(10, 0, 1, 1).check(false).unwrap_err();
        assert_eq!((r.quota, r.limit, r.used), ("concurrent_builds", 1, 1));
        assert!(
            admission(10, 0, 1, 1).check(true).is_ok(),
            "a follow-up of a project already building adds no concurrency"
        );
    }

    #[test]
    fn the_hourly_window_forgets_old_starts() {
        let q = Quotas::new(5, 1, None);
        let now = 10 * HOUR.as_millis() as u64;
        q.record_start("c", now);
        q.record_start("c", now);
        assert_eq!(q.hourly("c", now).0, 2);
        let (used, wait) = q.hourly("c", now + HOUR.as_millis() as u64 - 10_000);
        assert_eq!((used, wait), (2, Duration::from_secs(10)));
        assert_eq!(q.hourly("c", now + HOUR.as_millis() as u64).0, 0);
        assert_eq!(q.hourly("other", now).0, 0);
    }

    #[test]
    fn the_hours_starts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("quota-starts.json");
        let now = crate::status::now_ms();
        let q = Quotas::new(5, 1, Some(file.clone()));
        q.record_start("c", now - HOUR.as_millis() as u64);
        q.record_start("c", now - 1000);
        q.record_start("d", now);
        let again = Quotas::new(5, 1, Some(file.clone()));
        assert_eq!(again.hourly("c", now).0, 1, "the start an hour ago is gone");
        assert_eq!(again.hourly("d", now).0, 1);
        std::fs::write(&file, b"{torn").unwrap();
        assert_eq!(Quotas::new(5, 1, Some(file)).hourly("c", now).0, 0);
    }
}
