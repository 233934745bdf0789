//! What `/status/{project}` answers, kept on disk so it survives restarts, and the build logs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Syncing,
    Installing,
    Building,
    Publishing,
    Ready,
    Failed,
    TimedOut,
    Cancelled,
    /// Not started: the client's build quota was used up. The status says which quota; the
    /// agent builds it once the quota allows (and gitstore redelivers the webhook meanwhile).
    Refused,
}

impl State {
    pub fn is_active(self) -> bool {
        matches!(
            self,
            State::Queued
                | State::Syncing
                | State::Installing
                | State::Building
                | State::Publishing
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Syncing => "syncing",
            State::Installing => "installing",
            State::Building => "building",
            State::Publishing => "publishing",
            State::Ready => "ready",
            State::Failed => "failed",
            State::TimedOut => "timed_out",
            State::Cancelled => "cancelled",
            State::Refused => "refused",
        }
    }
}

/// The last build that was published and is being served.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LastGood {
    pub commit: String,
    pub build: u64,
    pub preview_url: String,
    /// When it became the served build (published, or rolled back to).
    pub published_at_ms: u64,
    /// The URL that shows this build for as long as it is kept, whatever is published later.
    #[serde(default)]
    pub pinned_url: Option<String>,
    /// Set while the preview is rolled back to this build rather than following its branch.
    #[serde(default)]
    pub rollback: Option<Rollback>,
}

/// How the served build came to be an older one than the branch's head.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollback {
    /// The build (and its commit) that was served before.
    pub from_build: Option<u64>,
    pub from_commit: Option<String>,
    pub at_ms: u64,
    /// The preview branch's head when the rollback was made. Builds that find the branch still
    /// there keep the rollback (a redelivered webhook, a restart, `POST /build`); a push that
    /// moves the branch ends it.
    pub head: Option<String>,
}

/// One finished build, newest first in [`Status::history`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildSummary {
    pub build: u64,
    pub commit: Option<String>,
    pub state: State,
    pub engine: Option<String>,
    /// As [`Status::warm`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<String>,
    pub duration_ms: u64,
    pub finished_at_ms: u64,
    pub error: Option<String>,
    /// Set when the build was published (a build that found its commit already published has
    /// none).
    #[serde(default)]
    pub pinned_url: Option<String>,
    /// Set when the build was asked for by a rollback and published: the build it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_from: Option<u64>,
}

impl Rollback {
    /// The record of serving `commit` in place of `from`, made at `now` while the branch is at
    /// `head`; None when `commit` is that head (serving the branch again ends a rollback).
    pub fn after(
        from: Option<&LastGood>,
        commit: &str,
        head: Option<String>,
        now: u64,
    ) -> Option<Self> {
        if head.as_deref() == Some(commit) {
            return None;
        }
        Some(Self {
            from_build: from.map(|g| g.build),
            from_commit: from.map(|g| g.commit.clone()),
            at_ms: now,
            head,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub project: String,
    pub state: State,
    /// The commit of the current (or last) build; unknown until its sync ran.
    pub commit: Option<String>,
    pub build: u64,
    /// `project` or `fast`: the Vite that built it; `static` for apps without package.json.
    pub engine: Option<String>,
    /// How the project's warm process served the build: `started` (its first build),
    /// `rebuilt` (incremental) or `reused` (nothing changed); absent for a cold build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<String>,
    /// Vite's own time for a warm build (from its build's start to its end, as the warm process
    /// measured it): the rest of the push-to-preview time is Kiln's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vite_ms: Option<u64>,
    /// Duration of each finished phase in milliseconds.
    pub phases: BTreeMap<String, u64>,
    /// `ran`, `skipped` (dependencies unchanged) or absent (not reached).
    pub install: Option<String>,
    pub peak_memory_bytes: u64,
    pub cpu_time_ms: u64,
    pub queued_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub error: Option<String>,
    pub last_good: Option<LastGood>,
    /// The commit this build was asked to build instead of the branch's head (a rollback whose
    /// build was pruned); kept on disk so a restart builds the same commit again.
    #[serde(default)]
    pub requested_commit: Option<String>,
    /// The build was asked for by a share link: it is published at its pinned URL only and
    /// leaves `current` (and `last_good`) alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin: bool,
    /// This build's pinned URL, once it is published.
    #[serde(default)]
    pub pinned_url: Option<String>,
    /// Once this build is published as a rollback: the build it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_from: Option<u64>,
    #[serde(default)]
    pub history: Vec<BuildSummary>,
    /// When a preview page of the project was last served (Unix ms), as nginx reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_viewed_at_ms: Option<u64>,
}

const HISTORY: usize = 50;

impl Status {
    pub fn new(project: &str) -> Self {
        Self {
            project: project.to_owned(),
            state: State::Queued,
            commit: None,
            build: 0,
            engine: None,
            warm: None,
            vite_ms: None,
            phases: BTreeMap::new(),
            install: None,
            peak_memory_bytes: 0,
            cpu_time_ms: 0,
            queued_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            last_good: None,
            requested_commit: None,
            pin: false,
            pinned_url: None,
            rollback_from: None,
            history: Vec::new(),
            last_viewed_at_ms: None,
        }
    }

    /// Resets the per-build fields for build `build` of `requested_commit` (None: the branch's
    /// head; `pin`: for a share link, published at its pinned URL only), keeping `last_good`
    /// and history.
    pub fn begin(&mut self, build: u64, requested_commit: Option<String>, pin: bool) {
        self.state = State::Queued;
        self.build = build;
        self.commit = None;
        self.requested_commit = requested_commit;
        self.pin = pin;
        self.pinned_url = None;
        self.rollback_from = None;
        self.engine = None;
        self.warm = None;
        self.vite_ms = None;
        self.phases.clear();
        self.install = None;
        self.peak_memory_bytes = 0;
        self.cpu_time_ms = 0;
        self.queued_at_ms = now_ms();
        self.started_at_ms = None;
        self.finished_at_ms = None;
        self.error = None;
    }

    /// Ends the current build in `state` and records it in the history.
    pub fn finish(&mut self, state: State, error: Option<String>) {
        let now = now_ms();
        self.state = state;
        self.error = error;
        self.finished_at_ms = Some(now);
        self.history.insert(
            0,
            BuildSummary {
                build: self.build,
                commit: self.commit.clone(),
                state,
                engine: self.engine.clone(),
                warm: self.warm.clone(),
                duration_ms: now.saturating_sub(self.started_at_ms.unwrap_or(self.queued_at_ms)),
                finished_at_ms: now,
                error: self.error.clone(),
                pinned_url: self.pinned_url.clone(),
                rollback_from: self.rollback_from,
            },
        );
        self.history.truncate(HISTORY);
    }

    /// Records that build `build` (of `commit`, when known) was not started, and why: one
    /// history entry, and one event for whoever follows the project.
    pub fn refuse(&mut self, build: u64, commit: Option<String>, why: String) {
        self.begin(build, None, false);
        self.commit = commit;
        self.finish(State::Refused, Some(why));
    }

    pub fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::fsutil::write_atomic(path, &serde_json::to_vec_pretty(self).expect("serializes"))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A build's log file: appended as the build runs, bounded in size so a chatty build cannot fill
/// the disk.
pub struct Log {
    file: std::fs::File,
    path: PathBuf,
    written: u64,
    limit: u64,
    truncated: bool,
}

impl Log {
    pub fn create(path: &Path, limit: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            file,
            path: path.to_owned(),
            written,
            limit,
            truncated: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, bytes: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.limit.saturating_sub(self.written) as usize;
        if bytes.len() > room {
            let _ = self.file.write_all(&bytes[..room]);
            let _ = self
                .file
                .write_all(b"\n[kiln] log truncated: it reached its size limit\n");
            self.truncated = true;
            self.written = self.limit;
            return;
        }
        if self.file.write_all(bytes).is_ok() {
            self.written += bytes.len() as u64;
        }
    }

    /// A line from Kiln itself, marked so it stands out from the tools' output.
    pub fn note(&mut self, line: &str) {
        self.write(format!("[kiln] {line}\n").as_bytes());
    }

    pub fn phase(&mut self, name: &str) {
        self.write(format!("==> {name}\n").as_bytes());
    }
}
