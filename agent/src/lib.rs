//! The Kiln agent: turns a pushed commit into a served preview on a build VM.
//!
//! Codemap: `server` (HTTP API), `agent` (per-project queue and coalescing, rollbacks),
//! `pipeline` (the phases of one build), `checkout` (only-changed worktree updates), `sandbox`
//! (namespaces, cgroups, uid drop), `publish` (atomic switch of the served build, pruning, the
//! union of kept builds' assets behind pinned URLs), `status` (persisted status and bounded
//! logs), `versions` (the preview branch's commits with their builds, exports as archives and
//! WebContainer trees), `events` (build state transitions: the `/api/events` feed and its
//! resumable ring), `notify` (signed, retried notifications to the URL a client registered),
//! `retention` (which builds stay, LRU eviction of idle projects' worktrees and node_modules,
//! the pnpm store prune, the report), `quota` (builds per hour and concurrent builds per
//! client), `share` (view share links to a pinned build), `views` (when each preview was last viewed,
//! reported by nginx), `warm` (a `vite build --watch` process per recently built project, LRU
//! and memory capped), `config`, `metrics`.

mod agent;
pub mod cdn;
pub mod checkout;
pub mod config;
mod engine;
mod events;
mod fsutil;
mod metrics;
mod notify;
pub mod ownership;
mod pipeline;
pub mod preview;
pub mod publish;
pub mod quota;
pub mod retention;
pub mod sandbox;
pub mod server;
pub mod share;
pub mod status;
pub mod versions;
mod views;
mod warm;

pub use agent::{Agent, Request, Requested, RollbackError, RollbackTarget, RolledBack};
