//! What the agent that builds a project last published for it, kept in the store next to the
//! manifest so that gitstore's project API (and any other node) can show it without asking the
//! agent. Written by the agent after each publish, rollback or failed build; read by gitstore.
//! Only a report: losing it loses nothing, the next build writes it again.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob::{keys, BlobStore, StoreError};
use crate::project::ProjectId;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildState {
    /// Host name of the agent that wrote this.
    pub agent: String,
    /// The build `current` points at, with its commit, or None before the first success.
    pub current_build: Option<u64>,
    pub current_commit: Option<String>,
    /// State of the newest build: `queued`, `building`, `ready`, `failed`, ...
    pub last_state: String,
    /// Unix seconds at which the newest build finished, if it has.
    pub last_built_at: Option<u64>,
    /// Unix seconds at which a preview page of the project was last served, to the minute.
    #[serde(default)]
    pub last_viewed_at: Option<u64>,
    pub preview_url: String,
    /// Bytes the project takes on the agent's disk (worktree, node_modules, kept builds).
    pub disk_bytes: u64,
    /// Unix seconds.
    pub updated_at: u64,
}

pub async fn read(
    store: &BlobStore,
    project: &ProjectId,
) -> Result<Option<BuildState>, StoreError> {
    store.get_json(&keys::build_state(project)).await
}

/// Last writer wins: one agent owns a project's builds at a time.
pub async fn write(
    store: &BlobStore,
    project: &ProjectId,
    state: &BuildState,
) -> Result<(), StoreError> {
    let body = Bytes::from(serde_json::to_vec(state).expect("serializes"));
    store.put(&keys::build_state(project), body).await
}
