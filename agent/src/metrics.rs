//! Counters exported at `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::status::State;

const WARM: [&str; 4] = ["started", "rebuilt", "reused", "cold"];
const PHASES: [&str; 5] = ["sync", "checkout", "install", "build", "publish"];
const OUTCOMES: [State; 4] = [
    State::Ready,
    State::Failed,
    State::TimedOut,
    State::Cancelled,
];

#[derive(Clone, Default)]
pub(crate) struct Metrics(Arc<Counters>);

#[derive(Default)]
pub(crate) struct Counters {
    outcomes: [AtomicU64; 4],
    phase_ms: [AtomicU64; 5],
    phase_count: [AtomicU64; 5],
    pub(crate) queued: AtomicU64,
    pub(crate) bytes_fetched: AtomicU64,
    pub(crate) install_ran: AtomicU64,
    pub(crate) install_skipped: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) webhooks_rejected: AtomicU64,
    pub(crate) fast_fallbacks: AtomicU64,
    pub(crate) quota_refusals: AtomicU64,
    pub(crate) builds_retired: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) store_prunes: AtomicU64,
    pub(crate) views: AtomicU64,
    /// Builds by how a warm process served them: started, rebuilt, reused, cold.
    warm: [AtomicU64; 4],
    pub(crate) warm_live: AtomicU64,
    pub(crate) leases_held: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) repo_repairs: AtomicU64,
    pub(crate) cdn_mirrors: AtomicU64,
    pub(crate) cdn_failures: AtomicU64,
    pub(crate) cdn_files: AtomicU64,
    pub(crate) cdn_bytes: AtomicU64,
}

impl std::ops::Deref for Metrics {
    type Target = Counters;
    fn deref(&self) -> &Counters {
        &self.0
    }
}

impl Metrics {
    pub(crate) fn inc(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn outcome(&self, s: State) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == s) {
            self.inc(&self.outcomes[i]);
        }
    }

    pub(crate) fn phase(&self, name: &str, ms: u64) {
        if let Some(i) = PHASES.iter().position(|p| *p == name) {
            self.add(&self.phase_ms[i], ms);
            self.inc(&self.phase_count[i]);
        }
    }

    /// A Vite build, by how a warm process served it (`cold`: none did).
    pub(crate) fn warm(&self, how: &str) {
        if let Some(i) = WARM.iter().position(|w| *w == how) {
            self.inc(&self.warm[i]);
        }
    }

    pub(crate) fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        family(
            "kiln_agent_builds_total",
            "counter",
            "Finished builds by outcome.",
            OUTCOMES
                .iter()
                .zip(&self.outcomes)
                .map(|(o, c)| (format!("{{outcome=\"{}\"}}", o.as_str()), g(c)))
                .collect(),
        );
        family(
            "kiln_agent_phase_milliseconds_sum",
            "counter",
            "Time spent in each build phase.",
            PHASES
                .iter()
                .zip(&self.phase_ms)
                .map(|(p, c)| (format!("{{phase=\"{p}\"}}"), g(c)))
                .collect(),
        );
        family(
            "kiln_agent_phase_milliseconds_count",
            "counter",
            "Completed runs of each build phase.",
            PHASES
                .iter()
                .zip(&self.phase_count)
                .map(|(p, c)| (format!("{{phase=\"{p}\"}}"), g(c)))
                .collect(),
        );
        family(
            "kiln_agent_queue_depth",
            "gauge",
            "Builds waiting for a build slot.",
            vec![(String::new(), g(&self.queued))],
        );
        family(
            "kiln_agent_leases_held",
            "gauge",
            "Projects whose lease this agent holds (0 when leases are off).",
            vec![(String::new(), g(&self.leases_held))],
        );
        family(
            "kiln_agent_leases_lost_total",
            "counter",
            "Leases taken over or not renewed in time: their builds were stopped.",
            vec![(String::new(), g(&self.leases_lost))],
        );
        family(
            "kiln_agent_repo_repairs_total",
            "counter",
            "Local repositories found damaged and fetched again from the blob store.",
            vec![(String::new(), g(&self.repo_repairs))],
        );
        family(
            "kiln_agent_cdn_mirrors_total",
            "counter",
            "Served builds mirrored whole to the CDN store.",
            vec![(String::new(), g(&self.cdn_mirrors))],
        );
        family(
            "kiln_agent_cdn_failures_total",
            "counter",
            "Mirrors to the CDN store that failed (each is tried again).",
            vec![(String::new(), g(&self.cdn_failures))],
        );
        family(
            "kiln_agent_cdn_uploaded_files_total",
            "counter",
            "Files uploaded to the CDN store (unchanged files are not).",
            vec![(String::new(), g(&self.cdn_files))],
        );
        family(
            "kiln_agent_cdn_uploaded_bytes_total",
            "counter",
            "Bytes uploaded to the CDN store.",
            vec![(String::new(), g(&self.cdn_bytes))],
        );
        family(
            "kiln_agent_fetched_bytes_total",
            "counter",
            "Pack bytes fetched from the blob store.",
            vec![(String::new(), g(&self.bytes_fetched))],
        );
        family(
            "kiln_agent_installs_total",
            "counter",
            "Install phases run or skipped because dependencies were unchanged.",
            vec![
                ("{result=\"ran\"}".into(), g(&self.install_ran)),
                ("{result=\"skipped\"}".into(), g(&self.install_skipped)),
            ],
        );
        family(
            "kiln_agent_coalesced_requests_total",
            "counter",
            "Build requests folded into an already queued follow-up build.",
            vec![(String::new(), g(&self.coalesced))],
        );
        family(
            "kiln_agent_webhooks_rejected_total",
            "counter",
            "Webhooks refused for a bad or missing signature.",
            vec![(String::new(), g(&self.webhooks_rejected))],
        );
        family(
            "kiln_agent_fast_engine_fallbacks_total",
            "counter",
            "Builds the fast engine failed and the project's own Vite built again.",
            vec![(String::new(), g(&self.fast_fallbacks))],
        );
        family(
            "kiln_agent_quota_refusals_total",
            "counter",
            "Builds refused because the client's build quota was used up.",
            vec![(String::new(), g(&self.quota_refusals))],
        );
        family(
            "kiln_agent_builds_retired_total",
            "counter",
            "Published builds removed by retention.",
            vec![(String::new(), g(&self.builds_retired))],
        );
        family(
            "kiln_agent_evictions_total",
            "counter",
            "Idle projects whose worktree and node_modules were evicted for disk space.",
            vec![(String::new(), g(&self.evictions))],
        );
        family(
            "kiln_agent_store_prunes_total",
            "counter",
            "Successful prunes of the shared pnpm store.",
            vec![(String::new(), g(&self.store_prunes))],
        );
        family(
            "kiln_agent_warm_builds_total",
            "counter",
            "Vite builds by how a warm process served them: started (a new process's first build), rebuilt (incremental), reused (nothing changed), cold (none).",
            WARM.iter()
                .zip(&self.warm)
                .map(|(w, c)| (format!("{{how=\"{w}\"}}"), g(c)))
                .collect(),
        );
        family(
            "kiln_agent_warm_processes",
            "gauge",
            "Warm build processes running, idle or building.",
            vec![(String::new(), g(&self.warm_live))],
        );
        family(
            "kiln_agent_preview_views_total",
            "counter",
            "Preview page views nginx reported for projects this agent builds.",
            vec![(String::new(), g(&self.views))],
        );
        out
    }
}
