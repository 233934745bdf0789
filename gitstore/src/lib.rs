//! gitstore: where every Kiln project version lives.
//!
//! Each project is a git repository whose durable copy is in blob storage: immutable packs plus a
//! small manifest (refs and pack list) published as numbered generations. gitstore nodes serve git's
//! smart HTTP protocol from local bare repositories that are only caches of that store, so any
//! number of nodes can serve one store. The agent uses [`sync::sync_repo`] to fetch what it lacks.
//!
//! Codemap: `server` (HTTP, auth decisions), `receive` (the push path, run as git's pre-receive
//! hook), `commits` (a commit from a JSON map of files, built in scratch space and sent through
//! the push path), `browse` (a commit's files, one file's bytes, diffs, for clients without git),
//! `sync` (blob store → local repo), `catalog` (the
//! per-node SQLite cache of every project's owner, name, labels and usage, rebuilt from the
//! store), `manifest` and `blob` (the store layout), `build_state` (the agent's report of
//! a project's builds), `auth`
//! (clients, tokens, ownership), `notify` (where a client wants build notifications, read by
//! agents), `path_policy` (what is safe to check out), `webhook`, `systemd`
//! (readiness and watchdog for both daemons' units), `http` (serving with header and body
//! deadlines, for both daemons) and `logging` (journald fields).

pub mod auth;
pub mod blob;
mod browse;
pub mod build_state;
mod catalog;
mod commits;
pub mod compact;
mod git;
pub mod http;
pub mod lease;
pub mod logging;
pub mod manifest;
mod metrics;
pub mod notify;
pub mod path_policy;
pub mod project;
pub mod receive;
pub mod server;
pub mod shares;
pub mod sync;
pub mod systemd;
pub mod webhook;

pub use blob::BlobStore;
pub use browse::content_type;
pub use project::ProjectId;
