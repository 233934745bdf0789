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
    pub preview_url: String,
    /// Bytes the project takes on the agent's disk (worktree, node_modules, kept builds).
    pub disk_bytes: u64,
    /// Unix seconds.
    pub updated_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildStateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("build state of project {project} is unreadable: {source}")]
    Corrupt {
        project: ProjectId,
        #[source]
        source: serde_json::Error,
    },
}

pub async fn read(
    store: &BlobStore,
    project: &ProjectId,
) -> Result<Option<BuildState>, BuildStateError> {
    let Some(bytes) = store.get(&keys::build_state(project)).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| BuildStateError::Corrupt {
            project: project.clone(),
            source,
        })
}

/// Last writer wins: one agent owns a project's builds at a time.
pub async fn write(
    store: &BlobStore,
    project: &ProjectId,
    state: &BuildState,
) -> Result<(), BuildStateError> {
    let body = Bytes::from(serde_json::to_vec(state).expect("serializes"));
    Ok(store.put(&keys::build_state(project), body).await?)
}
