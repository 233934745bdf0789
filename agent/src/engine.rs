//! The fast engine: a current Vite that Kiln installs once into the shared volume (pinned by
//! the lockfile in `agent/engines/fast/`) and mounts read-only into builds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::agent::{make_owned_dir, Agent};
use crate::sandbox::{self, Exit};
use crate::status::Log;

const PACKAGE_JSON: &str = include_str!("../engines/fast/package.json");
const LOCKFILE: &str = include_str!("../engines/fast/pnpm-lock.yaml");
/// Written after a complete install, so an install cut short by a crash is redone.
const DONE: &str = ".kiln-installed";

#[derive(Default)]
pub(crate) struct Engines {
    fast: Mutex<Option<PathBuf>>,
}

impl Engines {
    /// The fast engine's directory once it is installed.
    pub(crate) fn fast(&self) -> Option<PathBuf> {
        self.fast.lock().expect("engines lock").clone()
    }
}

/// Content-addressed so a new pinned Vite installs beside the old one, never over it while a
/// build uses it.
fn fast_dir(volume: &Path) -> PathBuf {
    let mut h = Sha256::new();
    h.update(PACKAGE_JSON);
    h.update(LOCKFILE);
    let id = hex::encode(&h.finalize()[..6]);
    volume.join("engines").join(format!("fast-{id}"))
}

impl Agent {
    pub fn fast_engine_ready(&self) -> bool {
        self.engines.fast().is_some()
    }

    /// Installs the fast engine in the background if it is missing; builds use the project's
    /// Vite until it is ready.
    pub fn install_fast_engine(self: &Arc<Self>) {
        let dir = fast_dir(&self.volume());
        if dir.join(DONE).is_file() {
            *self.engines.fast.lock().expect("engines lock") = Some(dir);
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            // Agents sharing a volume (and restarts racing an install) take turns; the loser
            // finds the engine installed.
            let lock_path = agent.volume().join("engines.lock");
            let lock = tokio::task::spawn_blocking(move || {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(|e| e.to_string())?;
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| e.to_string())
            })
            .await
            .expect("lock task");
            let lock = match lock {
                Ok(l) => l,
                Err(e) => {
                    log::error!(error = e; "cannot lock the engines dir");
                    return;
                }
            };
            if dir.join(DONE).is_file() {
                *agent.engines.fast.lock().expect("engines lock") = Some(dir);
                return;
            }
            let result = agent.install_engine(&dir).await;
            drop(lock);
            match result {
                Ok(()) => {
                    log::info!(dir:% = dir.display(); "fast engine installed");
                    *agent.engines.fast.lock().expect("engines lock") = Some(dir);
                }
                Err(e) => log::error!(
                    error = e; "cannot install the fast engine; builds use each project's own Vite"
                ),
            }
        });
    }

    async fn install_engine(&self, dir: &Path) -> Result<(), String> {
        let cfg = &self.cfg;
        let (uid, gid) = (cfg.sandbox_uid, cfg.sandbox_gid);
        let volume = self.volume();
        let err = |e: std::io::Error| e.to_string();
        make_owned_dir(dir, uid, gid, 0o755).map_err(err)?;
        for (name, content) in [("package.json", PACKAGE_JSON), ("pnpm-lock.yaml", LOCKFILE)] {
            std::fs::write(dir.join(name), content).map_err(err)?;
            std::os::unix::fs::chown(dir.join(name), Some(uid), Some(gid)).map_err(err)?;
        }
        let scratch = cfg.state_dir.join("builds").join("engine-fast");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(err)?;
        let rel = dir.strip_prefix(&volume).map_err(|e| e.to_string())?;
        let spec = crate::pipeline::install_spec(
            cfg,
            rel.to_owned(),
            true,
            "engine-fast-install".into(),
            scratch.join("root"),
            "kiln-engine",
        );
        let mut log = Log::create(&cfg.state_dir.join("engine-fast.log"), 1 << 20).map_err(err)?;
        // Like every install: never while the store is pruned.
        let store_lock = crate::retention::lock_store(&volume, false)
            .await
            .map_err(err)?;
        let outcome = {
            let mut output = |b: &[u8]| log.write(b);
            sandbox::run(&self.exe, &spec, &mut output, CancellationToken::new()).await
        }
        .map_err(|e| e.to_string());
        drop(store_lock);
        let _ = std::fs::remove_dir_all(&scratch);
        match outcome?.exit {
            Exit::Code(0) => std::fs::write(dir.join(DONE), b"").map_err(err),
            other => Err(format!(
                "pnpm install ended with {other:?}; see {}",
                log.path().display()
            )),
        }
    }
}
