//! The agent's settings, with defaults sized from the machine it runs on.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// State: bare repos, worktrees, status, logs, the shared pnpm store (root-only).
    pub state_dir: PathBuf,
    /// The shared pnpm store and every project's node_modules, on one filesystem so installs
    /// can hard-link from the store.
    pub volume_dir: PathBuf,
    /// Published builds, read by the web server: `<publish_dir>/<project>/current/`.
    pub publish_dir: PathBuf,
    /// Base of preview URLs, e.g. `https://preview.example.com`; `{project}` in it is replaced
    /// by the project id (one origin per project), otherwise `/<project>/` is appended.
    pub preview_url: String,
    /// Origins of the app generator that frame previews: where the console script posts.
    /// Empty means any origin (`*`).
    pub generator_origins: Vec<String>,
    pub webhook_secret: Vec<u8>,
    /// Refuse sync webhooks signed over the body alone (without `X-Kiln-Timestamp`), which can
    /// be replayed.
    pub webhook_require_timestamp: bool,
    /// SHA-256 of the admin token, which may read every project's status and logs.
    pub admin_token_sha256: Option<String>,
    pub sandbox_uid: u32,
    pub sandbox_gid: u32,
    pub memory_bytes: u64,
    /// What a build may write outside its /tmp (overlay upper and `/out`), on a tmpfs.
    pub disk_bytes: u64,
    pub pids: u64,
    pub cpus: f64,
    pub install_timeout: Duration,
    pub build_timeout: Duration,
    /// Builds running at once.
    pub concurrency: usize,
    /// Published builds kept per project: the newest this many (the current one counts).
    pub keep_builds: usize,
    /// Builds younger than this are kept too, however many there are.
    pub keep_builds_for: Duration,
    /// Disk use (percent of the filesystem holding the state or the volume dir) at which idle
    /// projects' worktrees and node_modules are evicted, least recently built first...
    pub disk_high_water: u8,
    /// ...until use is below this.
    pub disk_low_water: u8,
    /// How often retention and the disk check run besides after each build.
    pub gc_interval: Duration,
    /// Per-client build quotas for clients whose record sets none.
    pub quota_builds_per_hour: u64,
    pub quota_concurrent_builds: u64,
    pub log_limit_bytes: u64,
    pub max_output_bytes: u64,
    /// Program run for `pnpm`; must be visible inside the sandbox (under /usr).
    pub pnpm: PathBuf,
    pub node: PathBuf,
    /// The engine projects build with unless they pin one.
    pub engine: Engine,
    /// Warm build processes (`vite build --watch`) kept at most; 0: every build is cold.
    pub warm_max: usize,
    /// Memory the idle warm processes may hold together before the least recently used go.
    pub warm_memory_bytes: u64,
    /// A warm process unused for this long is stopped.
    pub warm_idle: Duration,
    /// When several agents share the store: this agent builds only the projects it leases.
    pub lease: Option<crate::ownership::LeaseConfig>,
}

/// CPUs and memory of this machine, for defaults.
pub fn machine() -> (usize, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(2 << 30);
    (cpus, mem)
}

impl Config {
    /// Per-build memory: a quarter of the machine, at most 2 GiB (an F4s_v2 with 8 GiB gets 2 GiB).
    pub fn default_memory() -> u64 {
        let (_, mem) = machine();
        (mem / 4).clamp(512 << 20, 2 << 30)
    }

    pub fn default_cpus() -> f64 {
        let (cpus, _) = machine();
        (cpus as f64).min(2.0)
    }

    /// Builds at once: one per two CPUs, bounded by memory for that many builds plus the system.
    pub fn default_concurrency(memory_bytes: u64) -> usize {
        let (cpus, mem) = machine();
        let by_mem = (mem.saturating_sub(1 << 30) / memory_bytes.max(1)) as usize;
        (cpus / 2).min(by_mem).max(1)
    }

    /// Memory for idle warm processes: a quarter of the machine (2 GiB on an F4s_v2), beside
    /// the builds' own.
    pub fn default_warm_memory() -> u64 {
        let (_, mem) = machine();
        mem / 4
    }

    /// Warm processes: what the memory holds at about 512 MiB each (a ~100-file generated app
    /// under Vite 8 holds ~500 MB), at least one.
    pub fn default_warm_max(warm_memory_bytes: u64) -> usize {
        ((warm_memory_bytes / (512 << 20)) as usize).max(1)
    }

    pub fn preview_url_for(&self, project: &str) -> String {
        if self.preview_url.contains("{project}") {
            let mut u = self.preview_url.replace("{project}", project);
            if !u.ends_with('/') {
                u.push('/');
            }
            u
        } else {
            format!("{}/{project}/", self.preview_url.trim_end_matches('/'))
        }
    }

    /// A URL whose content never changes: build `build` of `project`, for as long as the build is
    /// kept. Path mode: `<preview_url>/<project>/b/<build>/`; origin mode: `<build>--<project>` in
    /// place of `{project}`, so the pinned build is an origin of its own, like the moving one.
    /// The build's number leads because project ids may contain `--` themselves.
    pub fn pinned_url_for(&self, project: &str, build: u64) -> String {
        if self.preview_url.contains("{project}") {
            let mut u = self
                .preview_url
                .replace("{project}", &format!("{build}--{project}"));
            if !u.ends_with('/') {
                u.push('/');
            }
            u
        } else {
            format!(
                "{}/{project}/b/{build}/",
                self.preview_url.trim_end_matches('/')
            )
        }
    }

    /// The path the app is served under, which Vite's `base` must match: `/` in origin mode,
    /// else the preview URL's own path plus `/<project>/`.
    pub fn base_path_for(&self, project: &str) -> String {
        if self.preview_url.contains("{project}") {
            return "/".to_owned();
        }
        let path = url_path(&self.preview_url).trim_end_matches('/');
        format!("{path}/{project}/")
    }
}

impl Config {
    /// Where a build's log can be read, when previews share the API's host (path mode).
    pub fn log_url_for(&self, project: &str, build: u64) -> Option<String> {
        if self.preview_url.contains("{project}") {
            return None;
        }
        let (scheme, rest) = self.preview_url.split_once("://")?;
        if !matches!(scheme, "http" | "https") {
            return None;
        }
        let host = rest.split('/').next()?;
        Some(format!("{scheme}://{host}/logs/{project}?build={build}"))
    }
}

/// The path of an absolute URL (`http://h:1/a/b` → `/a/b`), or the string itself if it has no
/// scheme.
fn url_path(url: &str) -> &str {
    match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
        None => url,
    }
}

/// Checks a generator origin: `scheme://host[:port]` with nothing after, as browsers compare it.
pub fn parse_origin(s: &str) -> Result<String, String> {
    let bad = || {
        format!("{s:?} is not an origin: write scheme://host[:port] with no path, e.g. https://app.example.com")
    };
    let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
    let host_ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !matches!(scheme, "http" | "https") || !host_ok {
        return Err(bad());
    }
    Ok(s.to_ascii_lowercase())
}

/// Which Vite builds a project.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// A current Vite kept by Kiln in the shared store, run against the project's own config
    /// and plugins: several times faster than the Vite 5 generated apps pin.
    Fast,
    /// The Vite the project installed.
    Project,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Fast => "fast",
            Engine::Project => "project",
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Engine::Fast),
            "project" => Ok(Engine::Project),
            _ => Err(format!("unknown engine {s:?}: use fast or project")),
        }
    }
}

/// A configuration for unit tests: `preview_url` and placeholders that no test reads.
#[cfg(test)]
pub(crate) fn test_config(preview_url: &str) -> Config {
    Config {
        preview_url: preview_url.into(),
        generator_origins: Vec::new(),
        state_dir: "/s".into(),
        volume_dir: "/v".into(),
        publish_dir: "/w".into(),
        webhook_secret: Vec::new(),
        webhook_require_timestamp: false,
        admin_token_sha256: None,
        sandbox_uid: 1,
        sandbox_gid: 1,
        memory_bytes: 1,
        disk_bytes: 1,
        pids: 1,
        cpus: 1.0,
        install_timeout: Duration::ZERO,
        build_timeout: Duration::ZERO,
        concurrency: 1,
        keep_builds: 1,
        keep_builds_for: Duration::ZERO,
        disk_high_water: 85,
        disk_low_water: 70,
        gc_interval: Duration::from_secs(300),
        quota_builds_per_hour: 600,
        quota_concurrent_builds: 1,
        log_limit_bytes: 1,
        max_output_bytes: 1,
        pnpm: "/usr/bin/pnpm".into(),
        node: "/usr/bin/node".into(),
        engine: Engine::Fast,
        warm_max: 0,
        warm_memory_bytes: 0,
        warm_idle: Duration::ZERO,
        lease: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(preview_url: &str) -> Config {
        test_config(preview_url)
    }

    fn with_url(preview_url: &str) -> String {
        config(preview_url).base_path_for("shop")
    }

    #[test]
    fn pinned_urls_name_the_build_in_the_path_or_the_origin() {
        let pinned = |u: &str| config(u).pinned_url_for("my--shop", 12);
        assert_eq!(
            pinned("http://127.0.0.1:8080/preview"),
            "http://127.0.0.1:8080/preview/my--shop/b/12/"
        );
        assert_eq!(
            pinned("http://127.0.0.1:8080/preview/"),
            "http://127.0.0.1:8080/preview/my--shop/b/12/"
        );
        assert_eq!(
            pinned("https://{project}.preview.example.com"),
            "https://12--my--shop.preview.example.com/"
        );
    }

    #[test]
    fn base_path_follows_the_preview_urls_path() {
        assert_eq!(with_url("http://127.0.0.1:8080/preview"), "/preview/shop/");
        assert_eq!(with_url("http://127.0.0.1:8080/preview/"), "/preview/shop/");
        assert_eq!(with_url("http://127.0.0.1:8080"), "/shop/");
        assert_eq!(with_url("https://{project}.preview.example.com"), "/");
        assert_eq!(with_url("file:///srv/www"), "/srv/www/shop/");
    }

    #[test]
    fn rejects_origins_with_paths_or_odd_schemes() {
        assert_eq!(
            parse_origin("https://App.example.com:8443").unwrap(),
            "https://app.example.com:8443"
        );
        for bad in [
            "https://a.com/",
            "https://a.com/x",
            "ftp://a.com",
            "a.com",
            "https://",
            "https://a b",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }
}
