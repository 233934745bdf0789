//! Mirroring each project's served build into a blob store a CDN serves from, so previews can
//! be served with no VM in the path.
//!
//! Layout: the path of the preview's moving URL, then the file (`preview/<project>/index.html`
//! for previews under `https://host/preview/`), so the `base` the app was built with holds when
//! the CDN maps its root to the store's. In origin mode (`https://{project}.previews.example`)
//! apps are built for `/`, and their files go under `<project>/`: the CDN maps each host to its
//! project's folder (a rewrite rule every CDN has). Only the
//! build `current` points at is mirrored (pinned URLs stay on the VM), and it follows `current`
//! whatever moved it: a build, a rollback, a restart that finds the mirror behind.
//!
//! Order is what keeps a viewer's page whole while a mirror changes: every file but the HTML
//! first, then the HTML pages, `index.html` last; objects the new build no longer has are
//! deleted only after that. Hashed assets of the last few mirrored builds stay, for tabs
//! still showing an older page. What was mirrored is recorded (`cdn.json` in the project's
//! state dir) only once complete, so a crash mid-way uploads again what may not have landed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use gitstore::BlobStore;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::agent::Agent;
use crate::publish;

/// Uploads at once per project: enough to hide a store's round trip, few enough that 50
/// projects mirroring together do not open thousands of connections.
const PARALLEL: usize = 8;
/// Mirrored builds whose hashed assets are kept for pages still open.
const KEEP_ASSETS_OF: usize = 3;
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// The CDN's store, and what is being mirrored now.
pub struct Cdn {
    store: BlobStore,
    /// Where the CDN serves the store's root, for status (`<url>/<project>/`).
    public_url: Option<String>,
    /// Projects with a mirror task running: true when `current` moved again meanwhile.
    running: Mutex<HashMap<String, bool>>,
    /// The last failure per project, until a mirror succeeds.
    errors: Mutex<HashMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CdnError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] gitstore::blob::StoreError),
}

/// `cdn.json`: the mirrored builds, newest first, each with its files' SHA-256.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    mirrored: Vec<Mirrored>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Mirrored {
    build: u64,
    at_ms: u64,
    files: BTreeMap<String, String>,
}

impl Cdn {
    pub fn new(store: BlobStore, public_url: Option<String>) -> Self {
        Self {
            store,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_owned()),
            running: Mutex::default(),
            errors: Mutex::default(),
        }
    }

    pub fn store_url(&self) -> &str {
        self.store.url()
    }
}

impl Agent {
    /// Brings the CDN's copy of `project` to the build `current` points at, in the background;
    /// calls while one runs fold into one more pass.
    pub(crate) fn mirror(self: &Arc<Self>, project: &str) {
        let Some(cdn) = &self.cdn else { return };
        {
            let mut running = cdn.running.lock().expect("cdn lock");
            if let Some(again) = running.get_mut(project) {
                *again = true;
                return;
            }
            running.insert(project.to_owned(), false);
        }
        let (agent, project) = (self.clone(), project.to_owned());
        tokio::spawn(async move {
            let cdn = agent.cdn.as_ref().expect("cdn");
            let mut wait = RETRY_FIRST;
            loop {
                match agent.mirror_once(&project).await {
                    Ok(()) => {
                        cdn.errors.lock().expect("cdn lock").remove(&project);
                        wait = RETRY_FIRST;
                    }
                    Err(e) => {
                        agent.metrics.inc(&agent.metrics.cdn_failures);
                        log::warn!(project, error:% = e, retry_secs = wait.as_secs(); "cannot mirror the preview to the CDN store; trying again");
                        cdn.errors
                            .lock()
                            .expect("cdn lock")
                            .insert(project.clone(), e.to_string());
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(RETRY_MAX);
                        if !agent.is_gone(&project) && !agent.is_stopping() {
                            continue;
                        }
                    }
                }
                let mut running = cdn.running.lock().expect("cdn lock");
                if running.get(&project) == Some(&true) {
                    running.insert(project.clone(), false);
                    continue;
                }
                running.remove(&project);
                break;
            }
        });
    }

    /// At start: mirrors every published project whose CDN copy is behind (a crash mid-mirror,
    /// or a build published while the store was away).
    pub fn mirror_all(self: &Arc<Self>) {
        if self.cdn.is_none() {
            return;
        }
        for e in std::fs::read_dir(&self.cfg.publish_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if gitstore::ProjectId::parse(&name).is_err() {
                continue;
            }
            let behind = publish::current(&e.path())
                .is_some_and(|b| Record::load(&self.project_dir(&name)).latest() != Some(b));
            if behind {
                self.mirror(&name);
            }
        }
    }

    /// For `/status`: what the CDN serves of `project`, and why not the current build.
    pub(crate) fn cdn_status(&self, project: &str) -> Option<serde_json::Value> {
        let cdn = self.cdn.as_ref()?;
        let record = Record::load(&self.project_dir(project));
        let latest = record.mirrored.first();
        Some(serde_json::json!({
            "build": latest.map(|m| m.build),
            "mirrored_at_ms": latest.map(|m| m.at_ms),
            "url": cdn.public_url.as_ref().map(|u| format!("{u}/{}/", self.cdn_prefix(project))),
            "mirroring": cdn.running.lock().expect("cdn lock").contains_key(project),
            "error": cdn.errors.lock().expect("cdn lock").get(project),
        }))
    }

    /// Deletes the CDN's copy of a project that is deleted here.
    pub(crate) async fn unmirror(&self, project: &str) {
        let Some(cdn) = &self.cdn else { return };
        let deleted = async {
            let keys = cdn.store.keys_under(&self.cdn_prefix(project)).await?;
            futures::stream::iter(keys)
                .map(|k| async move { cdn.store.delete_key(&k).await })
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<()>>()
                .await
        };
        if let Err(e) = deleted.await {
            log::error!(project, error:% = e; "cannot delete the project's copy in the CDN store");
        }
        cdn.errors.lock().expect("cdn lock").remove(project);
    }

    /// The folder of the CDN's store that holds `project`'s files (see the module's docs).
    fn cdn_prefix(&self, project: &str) -> String {
        match self.cfg.base_path_for(project).trim_matches('/') {
            "" => project.to_owned(),
            path => path.to_owned(),
        }
    }

    async fn mirror_once(&self, project: &str) -> Result<(), CdnError> {
        let cdn = self.cdn.as_ref().expect("cdn");
        let published = publish::project_dir(&self.cfg.publish_dir, project);
        let Some(build) = publish::current(&published) else {
            return Ok(());
        };
        let state = self.project_dir(project);
        let mut record = Record::load(&state);
        if record.latest() == Some(build) || !self.may_publish(project) || self.is_gone(project) {
            return Ok(());
        }
        let dir = published.join("builds").join(build.to_string());
        let d = dir.clone();
        let files = tokio::task::spawn_blocking(move || hash_tree(&d))
            .await
            .expect("hash task")?;
        let before = record.mirrored.first().map(|m| &m.files);
        let changed: Vec<String> = files
            .iter()
            .filter(|(rel, sha)| before.and_then(|b| b.get(*rel)) != Some(*sha))
            .map(|(rel, _)| rel.clone())
            .collect();
        let (mut pages, rest): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|rel| is_page(rel));
        let prefix = self.cdn_prefix(project);
        let upload = |rel: String| {
            let (key, path) = (format!("{prefix}/{rel}"), dir.join(&rel));
            let headers = (gitstore::content_type(&rel), cache_control(&rel));
            async move {
                let bytes = tokio::fs::read(&path)
                    .await
                    .map_err(|source| CdnError::Io { path, source })?;
                let n = bytes.len() as u64;
                cdn.store
                    .put_web_file(&key, bytes.into(), headers.0, headers.1)
                    .await?;
                self.metrics.add(&self.metrics.cdn_bytes, n);
                self.metrics.inc(&self.metrics.cdn_files);
                Ok::<_, CdnError>(())
            }
        };
        futures::stream::iter(rest)
            .map(upload)
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        pages.sort_by_key(|rel| rel == "index.html");
        for rel in pages {
            upload(rel).await?;
        }
        // Deleted while this ran: what it uploaded after the deletion's listing goes too.
        if self.is_gone(project) {
            self.unmirror(project).await;
            return Ok(());
        }
        // What stays: the new build whole, and the hashed assets of the builds before it.
        let mut keep: BTreeSet<String> = files.keys().cloned().collect();
        for m in record.mirrored.iter().take(KEEP_ASSETS_OF - 1) {
            keep.extend(m.files.keys().filter(|r| is_hashed_asset(r)).cloned());
        }
        record.mirrored.insert(
            0,
            Mirrored {
                build,
                at_ms: crate::status::now_ms(),
                files,
            },
        );
        record.mirrored.truncate(KEEP_ASSETS_OF);
        record.save(&state)?;
        let stale: Vec<String> = cdn
            .store
            .keys_under(&prefix)
            .await?
            .into_iter()
            .filter(|k| {
                k.strip_prefix(&prefix)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_none_or(|rel| !keep.contains(rel))
            })
            .collect();
        futures::stream::iter(stale)
            .map(|k| async move { cdn.store.delete_key(&k).await })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        self.metrics.inc(&self.metrics.cdn_mirrors);
        log::info!(project, build, store = cdn.store.url(); "preview mirrored to the CDN store");
        Ok(())
    }
}

impl Record {
    fn path(state: &Path) -> PathBuf {
        state.join("cdn.json")
    }

    /// An unreadable record is as good as none: everything is uploaded again.
    fn load(state: &Path) -> Self {
        std::fs::read(Self::path(state))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, state: &Path) -> Result<(), CdnError> {
        let path = Self::path(state);
        std::fs::create_dir_all(state)
            .and_then(|()| {
                crate::fsutil::write_atomic(&path, &serde_json::to_vec(self).expect("serializes"))
            })
            .map_err(|source| CdnError::Io { path, source })
    }

    fn latest(&self) -> Option<u64> {
        self.mirrored.first().map(|m| m.build)
    }
}

/// Every file of a published build and its SHA-256, but the `.gz` copies publish made of
/// its text files (a CDN compresses for itself).
fn hash_tree(root: &Path) -> Result<BTreeMap<String, String>, CdnError> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = dirs.pop() {
        let io = |source| CdnError::Io {
            path: dir.clone(),
            source,
        };
        for e in std::fs::read_dir(&dir).map_err(io)? {
            let e = e.map_err(io)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            // Published builds hold only regular files and directories (publish copies no
            // links); anything else is not the build's.
            let t = e.file_type().map_err(io)?;
            if t.is_dir() {
                dirs.push((e.path(), r));
            } else if t.is_file() {
                if name
                    .strip_suffix(".gz")
                    .is_some_and(|orig| dir.join(orig).is_file())
                {
                    continue;
                }
                let path = e.path();
                let bytes = std::fs::read(&path).map_err(|source| CdnError::Io { path, source })?;
                out.insert(r, hex::encode(sha2::Sha256::digest(&bytes)));
            }
        }
    }
    Ok(out)
}

fn is_page(rel: &str) -> bool {
    let lower = rel.to_ascii_lowercase();
    lower.ends_with(".html") || lower.ends_with(".htm")
}

/// The same rule as nginx's `$kiln_asset_cache` (nginx/nginx.conf.tera): a file under
/// `assets/` whose name carries Vite's 8-character content hash never changes.
fn is_hashed_asset(rel: &str) -> bool {
    let Some(name) = rel
        .strip_prefix("assets/")
        .map(|r| r.rsplit('/').next().unwrap_or(r))
    else {
        return false;
    };
    let hash_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    let b = name.as_bytes();
    (0..b.len()).any(|i| {
        let (Some(hash), Some(ext)) = (b.get(i + 1..i + 9), b.get(i + 10..)) else {
            return false;
        };
        b[i] == b'-'
            && hash.iter().all(|&c| hash_char(c))
            && hash
                .iter()
                .any(|&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
            && b[i + 9] == b'.'
            && !ext.is_empty()
            && ext.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'.')
    })
}

fn cache_control(rel: &str) -> &'static str {
    if is_hashed_asset(rel) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_assets_match_the_nginx_rule() {
        for yes in [
            "assets/index-BxK3a9_z.js",
            "assets/index-D4f-kQ2a.css",
            "assets/fonts/inter-Ab12Cd34.woff2",
            "assets/chunk-a1b2c3d4.js.map",
        ] {
            assert!(is_hashed_asset(yes), "{yes}");
        }
        for no in [
            "index.html",
            "assets/logo.svg",
            "assets/my-component.js",
            "assets/abcdefgh-abcdefgh.js",
            "img/index-BxK3a9_z.js",
            "assets/index-BxK3a9_z.",
        ] {
            assert!(!is_hashed_asset(no), "{no}");
        }
    }

    #[test]
    fn hashing_a_build_leaves_out_publishs_gz_copies_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("assets")).unwrap();
        for (p, b) in [
            ("index.html", "<p>x"),
            ("index.html.gz", "z"),
            ("assets/a-Ab12Cd34.js", "1"),
            ("assets/a-Ab12Cd34.js.gz", "z"),
            ("data.bin.gz", "shipped by the app"),
        ] {
            std::fs::write(d.path().join(p), b).unwrap();
        }
        let files = hash_tree(d.path()).unwrap();
        assert_eq!(
            files.keys().map(String::as_str).collect::<Vec<_>>(),
            ["assets/a-Ab12Cd34.js", "data.bin.gz", "index.html"]
        );
        assert_eq!(
            files["index.html"],
            hex::encode(sha2::Sha256::digest(b"<p>x"))
        );
    }
}
