//! Counters exported at `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Default)]
pub(crate) struct Metrics(Arc<Counters>);

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) pushes_accepted: AtomicU64,
    pub(crate) pushes_refused: AtomicU64,
    pub(crate) push_pack_bytes: AtomicU64,
    pub(crate) fetches: AtomicU64,
    pub(crate) sync_bytes: AtomicU64,
    pub(crate) sync_packs: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) webhooks_delivered: AtomicU64,
    pub(crate) webhooks_failed: AtomicU64,
    pub(crate) webhooks_dropped: AtomicU64,
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

    pub(crate) fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "kiln_gitstore_pushes_total",
            "Pushes by outcome.",
            &[
                ("{outcome=\"accepted\"}", g(&self.pushes_accepted)),
                ("{outcome=\"refused\"}", g(&self.pushes_refused)),
            ],
        );
        counter(
            "kiln_gitstore_push_pack_bytes_total",
            "Pack bytes stored by accepted pushes.",
            &[("", g(&self.push_pack_bytes))],
        );
        counter(
            "kiln_gitstore_fetches_total",
            "Clones and fetches served.",
            &[("", g(&self.fetches))],
        );
        counter(
            "kiln_gitstore_sync_bytes_total",
            "Pack bytes downloaded from the blob store into the local cache.",
            &[("", g(&self.sync_bytes))],
        );
        counter(
            "kiln_gitstore_sync_packs_total",
            "Packs downloaded from the blob store into the local cache.",
            &[("", g(&self.sync_packs))],
        );
        counter(
            "kiln_gitstore_auth_failures_total",
            "Requests refused for a missing or bad token.",
            &[("", g(&self.auth_failures))],
        );
        counter(
            "kiln_gitstore_webhooks_total",
            "Webhook deliveries by outcome.",
            &[
                ("{outcome=\"delivered\"}", g(&self.webhooks_delivered)),
                ("{outcome=\"failed\"}", g(&self.webhooks_failed)),
                ("{outcome=\"dropped\"}", g(&self.webhooks_dropped)),
            ],
        );
        out
    }
}
