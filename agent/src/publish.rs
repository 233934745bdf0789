//! Publishing a build: copy its output into a new per-build directory, precompress text assets,
//! then switch the project's `current` link with one atomic rename.
//!
//! The output comes from untrusted build code: only regular files and directories are copied
//! (a symlink to `/etc/shadow` in `dist/` must never be served), and sizes are bounded.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the build produced no index.html in its output directory")]
    NoIndex,
    #[error("the build output is over the {limit}-byte limit")]
    TooLarge { limit: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Default)]
pub struct Published {
    pub files: u64,
    pub bytes: u64,
    pub compressed: u64,
    /// Entries of the output that were not regular files or directories and were left out.
    pub skipped: Vec<String>,
}

/// Where a project's builds live under the publish root: `<root>/<project>/builds/<id>` and the
/// `current` link the web server follows.
pub fn project_dir(root: &Path, project: &str) -> PathBuf {
    root.join(project)
}

/// Copies `out` into `<project_dir>/builds/<build>`, compresses text assets beside them, and makes
/// it `current`. `head` (when not empty) is inserted at the top of every HTML page: the console
/// script. A crash before the final rename leaves the previous build current.
pub fn publish(
    out: &Path,
    project_dir: &Path,
    build: u64,
    max_bytes: u64,
    skip: &dyn Fn(&str) -> bool,
    head: &str,
) -> Result<Published, PublishError> {
    if !out.join("index.html").is_file() {
        return Err(PublishError::NoIndex);
    }
    let builds = project_dir.join("builds");
    std::fs::create_dir_all(&builds).map_err(io(&builds))?;
    let dest = builds.join(build.to_string());
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    let staging = builds.join(format!(".{build}.tmp"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    let mut report = Published::default();
    let copy = Copy {
        max_bytes,
        skip,
        head,
    };
    copy.tree(out, &staging, "", &mut report)?;
    std::fs::rename(&staging, &dest).map_err(io(&dest))?;
    switch_current(project_dir, build)?;
    Ok(report)
}

/// Points `current` at `builds/<build>` by renaming a fresh link over it.
pub fn switch_current(project_dir: &Path, build: u64) -> Result<(), PublishError> {
    let link = project_dir.join("current");
    let tmp = project_dir.join(format!(".current.{build}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("builds/{build}"), &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &link).map_err(io(&link))?;
    if let Ok(d) = std::fs::File::open(project_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The build `current` points at.
pub fn current(project_dir: &Path) -> Option<u64> {
    let target = std::fs::read_link(project_dir.join("current")).ok()?;
    target.file_name()?.to_str()?.parse().ok()
}

/// Deletes published builds beyond the newest `keep`, never `current` or `protect`.
pub fn prune(project_dir: &Path, keep: usize, protect: &[u64]) -> Vec<u64> {
    let builds = project_dir.join("builds");
    let current = current(project_dir);
    let mut ids: Vec<u64> = std::fs::read_dir(&builds)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let mut removed = Vec::new();
    for id in ids.into_iter().skip(keep) {
        if Some(id) == current || protect.contains(&id) {
            continue;
        }
        if std::fs::remove_dir_all(builds.join(id.to_string())).is_ok() {
            removed.push(id);
        }
    }
    removed
}

const COMPRESSIBLE: &[&str] = &[
    "html",
    "js",
    "mjs",
    "css",
    "svg",
    "json",
    "txt",
    "map",
    "xml",
    "wasm",
    "ico",
    "webmanifest",
];

struct Copy<'a> {
    max_bytes: u64,
    skip: &'a dyn Fn(&str) -> bool,
    head: &'a str,
}

impl Copy<'_> {
    fn tree(
        &self,
        src: &Path,
        dst: &Path,
        rel: &str,
        report: &mut Published,
    ) -> Result<(), PublishError> {
        std::fs::create_dir(dst).map_err(io(dst))?;
        let mut entries: Vec<_> = std::fs::read_dir(src)
            .map_err(io(src))?
            .collect::<Result<_, _>>()
            .map_err(io(src))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name_str = name.to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name_str.clone()
            } else {
                format!("{rel}/{name_str}")
            };
            if (self.skip)(&child_rel) {
                continue;
            }
            let ft = e.file_type().map_err(io(&e.path()))?;
            let from = e.path();
            let to = dst.join(&name);
            if ft.is_dir() {
                self.tree(&from, &to, &child_rel, report)?;
            } else if ft.is_file() {
                let ext = Path::new(&name).extension().and_then(|x| x.to_str());
                let bytes = if ext == Some("html") && !self.head.is_empty() {
                    let html = std::fs::read(&from).map_err(io(&from))?;
                    let html = crate::preview::inject(&String::from_utf8_lossy(&html), self.head);
                    std::fs::write(&to, &html).map_err(io(&to))?;
                    html.len() as u64
                } else {
                    std::fs::copy(&from, &to).map_err(io(&to))?
                };
                report.files += 1;
                report.bytes += bytes;
                if report.bytes > self.max_bytes {
                    return Err(PublishError::TooLarge {
                        limit: self.max_bytes,
                    });
                }
                if bytes >= 256 && ext.is_some_and(|x| COMPRESSIBLE.contains(&x)) {
                    gzip_beside(&to)?;
                    report.compressed += 1;
                }
            } else {
                report.skipped.push(child_rel);
            }
        }
        Ok(())
    }
}

/// Writes `<file>.gz` for nginx's `gzip_static`, with the same mtime so it is served for it.
fn gzip_beside(file: &Path) -> Result<(), PublishError> {
    let data = std::fs::read(file).map_err(io(file))?;
    let gz_path = PathBuf::from(format!("{}.gz", file.display()));
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(&data).map_err(io(&gz_path))?;
    let gz = enc.finish().map_err(io(&gz_path))?;
    if gz.len() < data.len() {
        std::fs::write(&gz_path, gz).map_err(io(&gz_path))?;
    }
    Ok(())
}
