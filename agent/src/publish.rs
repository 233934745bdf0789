//! Publishing a build: copy its output into a new per-build directory, precompress text assets,
//! then switch the project's `current` link with one atomic rename.
//!
//! The output comes from untrusted build code: only regular files and directories are copied
//! (a symlink to `/etc/shadow` in `dist/` must never be served), and sizes are bounded.
//!
//! Every kept build stays servable at its pinned URL (`<p>/b/<n>/`, served from `builds/<n>/`).
//! Apps are built with the moving URL's base, so a pinned page asks for its hashed assets under
//! `<p>/assets/`; the web server answers those from `current/assets/`, else from the project's
//! `assets/` directory, which holds hard links to the `assets/` files of every kept build
//! ([`link_assets`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
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
    #[error("the build's output directory is a symlink, not a directory: only files the build wrote are published")]
    OutputIsLink,
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
    /// Why the build's assets could not be linked into the union, if they could not: its pinned
    /// URL may then miss assets, while the moving URL is fine.
    pub assets_error: Option<String>,
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
    let report = stage(out, project_dir, build, max_bytes, skip, head)?;
    switch_current(project_dir, build)?;
    Ok(report)
}

/// [`publish`] without the switch: the build is complete in `builds/<build>` (and its assets
/// linked into the union) but not yet `current`, so a caller can switch under its own lock.
pub fn stage(
    out: &Path,
    project_dir: &Path,
    build: u64,
    max_bytes: u64,
    skip: &dyn Fn(&str) -> bool,
    head: &str,
) -> Result<Published, PublishError> {
    // The build may have replaced its output directory (a `dist` it creates) with a link to
    // anywhere on the host, which would be read and published as root from here.
    match std::fs::symlink_metadata(out) {
        Ok(m) if m.file_type().is_symlink() => return Err(PublishError::OutputIsLink),
        Ok(m) if m.is_dir() => {}
        _ => return Err(PublishError::NoIndex),
    }
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
    // Before the switch, so the build's pinned URL works from the moment anyone can learn it.
    report.assets_error = link_assets(project_dir).err().map(|e| e.to_string());
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

/// Whether build `build` is on disk, complete, and so servable (a rename makes it appear whole).
pub fn is_kept(project_dir: &Path, build: u64) -> bool {
    project_dir
        .join("builds")
        .join(build.to_string())
        .join("index.html")
        .is_file()
}

/// The builds on disk, oldest first.
pub fn kept_builds(project_dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(project_dir.join("builds"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

const RETIRED: &str = ".retired-";

/// Takes `retired` out of the kept set, never `current`, by renaming them aside: quick enough
/// to run under the lock that orders it with a rollback's switch of `current`. [`sweep`]
/// deletes them afterwards. Which builds go is retention's choice (`crate::retention`).
pub fn retire(project_dir: &Path, retired: &[u64]) -> Vec<u64> {
    let builds = project_dir.join("builds");
    let current = current(project_dir);
    let mut removed = Vec::new();
    for &id in retired {
        if Some(id) == current || !builds.join(id.to_string()).is_dir() {
            continue;
        }
        let to = builds.join(format!("{RETIRED}{id}"));
        let _ = std::fs::remove_dir_all(&to);
        if std::fs::rename(builds.join(id.to_string()), &to).is_ok() {
            removed.push(id);
        }
    }
    removed
}

/// Deletes retired builds (also those a crash left behind) and drops their assets from the
/// union.
pub fn sweep(project_dir: &Path) -> Result<(), PublishError> {
    let builds = project_dir.join("builds");
    for e in std::fs::read_dir(&builds).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(RETIRED) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    link_assets(project_dir).map(|_| ())
}

/// What [`link_assets`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AssetLinks {
    pub linked: u64,
    pub removed: u64,
}

/// Makes `<project_dir>/assets/` the union of the `assets/` directories of every kept build, as
/// hard links (no copy, and deleting a build leaves the union's link valid until it goes too).
///
/// Hashed names are content-addressed, so two builds naming a file alike almost always hold the
/// same bytes; when they do not, the file already in the union stays (a page that loaded it
/// keeps getting what it loaded), and only a file no kept build holds any more is replaced or
/// removed. A `.gz` always comes from the same build as the file it compresses, so nginx's
/// `gzip_static` never pairs one build's file with another's precompressed copy.
pub fn link_assets(project_dir: &Path) -> Result<AssetLinks, PublishError> {
    let union = project_dir.join("assets");
    // Relative path → the kept builds' copies, oldest build first.
    let mut copies: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for build in kept_builds(project_dir) {
        let root = project_dir
            .join("builds")
            .join(build.to_string())
            .join("assets");
        let mut files = Vec::new();
        list_files(&root, "", &mut files)?;
        let names: HashSet<&str> = files.iter().map(String::as_str).collect();
        for rel in &files {
            // A precompressed copy follows its file (below), unless it has none in this build.
            if rel
                .strip_suffix(".gz")
                .is_some_and(|base| names.contains(base))
            {
                continue;
            }
            copies.entry(rel.clone()).or_default().push(root.join(rel));
        }
    }
    let mut wanted: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (rel, sources) in &copies {
        let there = inode(&union.join(rel));
        let chosen = sources
            .iter()
            .find(|s| there.is_some() && inode(s) == there)
            .unwrap_or(&sources[0]);
        // A file named like another's precompressed copy yields to that copy (sorted first).
        wanted.entry(rel.clone()).or_insert_with(|| chosen.clone());
        let gz = PathBuf::from(format!("{}.gz", chosen.display()));
        if gz.is_file() {
            wanted.insert(format!("{rel}.gz"), gz);
        }
    }
    let mut report = AssetLinks::default();
    for (rel, src) in &wanted {
        let dst = union.join(rel);
        if inode(&dst).is_some() && inode(&dst) == inode(src) {
            continue;
        }
        let dir = dst.parent().unwrap_or(&union);
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // Linked under a temporary name and renamed over: a request never finds the name missing.
        let tmp = dir.join(format!(".kiln-link.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::fs::hard_link(src, &tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
        report.linked += 1;
    }
    let mut present = Vec::new();
    list_files(&union, "", &mut present)?;
    let keep: BTreeSet<&str> = wanted.keys().map(String::as_str).collect();
    for rel in present.iter().filter(|r| !keep.contains(r.as_str())) {
        let path = union.join(rel);
        std::fs::remove_file(&path).map_err(io(&path))?;
        report.removed += 1;
    }
    remove_empty_dirs(&union);
    Ok(report)
}

fn inode(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| (m.dev(), m.ino()))
}

/// Regular files under `dir` (relative, `/`-separated); nothing if `dir` is missing.
fn list_files(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), PublishError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let ft = e.file_type().map_err(io(&e.path()))?;
        if ft.is_dir() {
            list_files(&e.path(), &child, out)?;
        } else if ft.is_file() {
            out.push(child);
        }
    }
    Ok(())
}

/// Removes directories left empty under `dir` (not `dir` itself).
fn remove_empty_dirs(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, content: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn build(dir: &Path, n: u64, assets: &[(&str, &str)]) {
        let root = dir.join("builds").join(n.to_string());
        write(&root.join("index.html"), "<!doctype html>");
        for (name, content) in assets {
            write(&root.join("assets").join(name), content);
        }
    }

    fn union(dir: &Path) -> BTreeMap<String, String> {
        let mut files = Vec::new();
        list_files(&dir.join("assets"), "", &mut files).unwrap();
        files
            .into_iter()
            .map(|f| {
                let text = std::fs::read_to_string(dir.join("assets").join(&f)).unwrap();
                (f, text)
            })
            .collect()
    }

    #[test]
    fn the_union_holds_every_kept_builds_assets_and_keeps_the_first_of_a_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        build(
            dir,
            1,
            &[
                ("a.js", "a1"),
                ("a.js.gz", "gz of a1"),
                ("same.css", "css 1"),
            ],
        );
        link_assets(dir).unwrap();
        build(
            dir,
            2,
            &[
                ("b.js", "b2"),
                ("same.css", "css 2"),
                ("fonts/f.woff", "f2"),
            ],
        );
        switch_current(dir, 2).unwrap();
        let report = link_assets(dir).unwrap();
        assert_eq!(report.linked, 2, "only the new names are linked");
        let expect = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            union(dir),
            expect(&[
                ("a.js", "a1"),
                ("a.js.gz", "gz of a1"),
                ("b.js", "b2"),
                ("fonts/f.woff", "f2"),
                ("same.css", "css 1"),
            ])
        );
        let linked = std::fs::metadata(dir.join("assets/a.js")).unwrap();
        assert_eq!(linked.nlink(), 2, "a hard link, not a copy");

        assert_eq!(retire(dir, &[1]), vec![1]);
        sweep(dir).unwrap();
        assert!(!dir.join("builds/1").exists());
        assert_eq!(
            union(dir),
            expect(&[
                ("b.js", "b2"),
                ("fonts/f.woff", "f2"),
                ("same.css", "css 2")
            ]),
            "build 1's files go with it, and its name is taken over by the kept build"
        );
    }

    #[test]
    fn retire_never_takes_current_or_missing_builds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for n in 1..=4 {
            build(dir, n, &[]);
        }
        switch_current(dir, 1).unwrap();
        assert_eq!(retire(dir, &[1, 3, 9]), vec![3]);
        sweep(dir).unwrap();
        assert_eq!(kept_builds(dir), vec![1, 2, 4]);
    }
}
