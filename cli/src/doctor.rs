//! `kiln doctor`: can this host run Kiln? Each check tries the real thing where it can (creates
//! and removes a cgroup, enters namespaces, mounts an overlay in a throwaway mount namespace,
//! writes to the volume) and says what to fix when it fails. The agent's own start-up check
//! (`agent::sandbox::check_host`) runs too, so doctor and the agent never disagree.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::client::Remote;
use crate::output::{self, Output, Style};
use crate::settings::{Settings, Source};

const GIB: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
    /// Not applicable here (e.g. a URL nobody set).
    Skip,
}

struct Check {
    name: &'static str,
    level: Level,
    detail: String,
    fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            level: Level::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            level: Level::Warn,
            ..Self::fail(name, detail, fix)
        }
    }
    fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            level: Level::Skip,
            ..Self::ok(name, detail)
        }
    }
}

/// Runs every check and prints them; an error (exit 1) if any failed.
pub(crate) async fn run(
    settings: &Settings,
    git: &Remote,
    agent: &Remote,
    out: &Output,
) -> anyhow::Result<()> {
    let (state_dir, _) = settings.agent_path("KILN_AGENT_STATE");
    let mut checks = vec![
        sandbox_host(),
        cgroups(),
        namespaces(),
        overlayfs(&state_dir),
        sandbox_user(settings),
        node(settings),
        pnpm(settings),
        git_cli(),
    ];
    let (volume, _) = settings.agent_path("KILN_AGENT_VOLUME");
    checks.push(disk("pnpm volume", &volume, 5 * GIB, "KILN_AGENT_VOLUME"));
    let (publish, _) = settings.agent_path("KILN_PUBLISH_DIR");
    checks.push(disk("publish dir", &publish, GIB, "KILN_PUBLISH_DIR"));
    checks.push(blob_store(settings).await);
    checks.push(nginx(settings));
    // Behind one front door (nginx), /healthz is the agent's and gitstore's is /gitstore/healthz.
    let gitstore_health = if git.endpoint.url == agent.endpoint.url {
        "/gitstore/healthz"
    } else {
        "/healthz"
    };
    checks.push(healthz("gitstore", git, gitstore_health).await);
    checks.push(healthz("agent", agent, "/healthz").await);

    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    if out.json {
        let list: Vec<_> = checks
            .iter()
            .map(|c| {
                json!({
                    "check": c.name,
                    "ok": c.level != Level::Fail,
                    "level": match c.level {
                        Level::Ok => "ok",
                        Level::Warn => "warn",
                        Level::Fail => "fail",
                        Level::Skip => "skip",
                    },
                    "detail": c.detail,
                    "fix": c.fix,
                })
            })
            .collect();
        out.print_json(&serde_json::Value::Array(list));
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0) + 2;
        for c in &checks {
            let mark = match c.level {
                Level::Ok => out.paint(Style::Good, "✓"),
                Level::Warn => out.paint(Style::Warn, "!"),
                Level::Fail => out.paint(Style::Bad, "✗"),
                Level::Skip => out.paint(Style::Dim, "-"),
            };
            say!("{mark} {:<width$}{}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                say!(
                    "  {:<width$}{}",
                    "",
                    out.paint(Style::Bold, &format!("fix: {fix}"))
                );
            }
        }
        let warned = checks.iter().filter(|c| c.level == Level::Warn).count();
        say!(
            "\n{} checks: {failed} failed, {warned} warning{}",
            checks.len(),
            if warned == 1 { "" } else { "s" }
        );
    }
    if failed > 0 {
        // The report is already printed; main only needs the exit code.
        return Err(crate::Reported.into());
    }
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

const NEEDS_ROOT: &str =
    "run kiln doctor as root: the agent runs as root to create namespaces, mounts and cgroups";

/// The agent's own check, exactly as it runs it before serving.
fn sandbox_host() -> Check {
    match agent::sandbox::check_host() {
        Ok(()) => Check::ok(
            "agent host check",
            "root, unshare, cgroup controllers and overlayfs: the agent will start",
        ),
        Err(e) => Check::fail(
            "agent host check",
            "the agent refuses to start on this host",
            e.to_string(),
        ),
    }
}

fn cgroups() -> Check {
    const NAME: &str = "cgroups";
    let root = Path::new("/sys/fs/cgroup");
    let v2 = root.join("cgroup.controllers").is_file();
    let wanted = ["memory", "pids", "cpu"];
    let (version, present, probe_dir): (&str, Vec<&str>, PathBuf) = if v2 {
        let listed = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let present = wanted
            .iter()
            .copied()
            .filter(|c| listed.split_whitespace().any(|l| l == *c))
            .collect();
        ("v2", present, root.to_owned())
    } else {
        let present = wanted
            .iter()
            .copied()
            .filter(|c| root.join(c).join("cgroup.procs").is_file())
            .collect();
        ("v1", present, root.join("memory"))
    };
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| !present.contains(c))
        .collect();
    if !missing.is_empty() {
        let fix = if v2 {
            format!(
                "enable the {} controller(s) at the root (kernel config, or boot with \
                 systemd.unified_cgroup_hierarchy=1 on a current systemd)",
                missing.join(", ")
            )
        } else {
            format!(
                "mount the {} hierarchies under /sys/fs/cgroup (mount -t cgroup -o NAME cgroup \
                 /sys/fs/cgroup/NAME)",
                missing.join(", ")
            )
        };
        return Check::fail(
            NAME,
            format!("{version}: missing {}", missing.join(", ")),
            fix,
        );
    }
    let detail = format!("{version}: {}", present.join(", "));
    if !is_root() {
        return Check::fail(NAME, format!("{detail}; not probed"), NEEDS_ROOT);
    }
    // Builds get a group each: creating one is the real test (a container's cgroup fs is
    // often read-only although every controller is listed).
    let probe = probe_dir.join(format!("kiln-doctor-{}", std::process::id()));
    match std::fs::create_dir(&probe) {
        Ok(()) => {
            let _ = std::fs::remove_dir(&probe);
            Check::ok(
                NAME,
                format!("{detail}; a probe group was created and removed"),
            )
        }
        Err(e) => Check::fail(
            NAME,
            format!(
                "{detail}; cannot create a group in {}: {e}",
                probe_dir.display()
            ),
            "give the agent a writable cgroup hierarchy (on a VM or host, not an unprivileged \
             container)",
        ),
    }
}

/// Runs `unshare` with `args` and `true`; Err holds what it said.
fn unshare(args: &[&str]) -> Result<(), String> {
    let out = Command::new("unshare")
        .args(args)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "`unshare` is not on PATH".to_owned()
            } else {
                e.to_string()
            }
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn namespaces() -> Check {
    const NAME: &str = "namespaces";
    // The flags the sandbox uses for a build (network off).
    let sandbox = ["--mount", "--pid", "--fork", "--ipc", "--uts", "--net"];
    if let Err(e) = unshare(&sandbox) {
        let fix = if e.contains("not on PATH") {
            "install util-linux (apt-get install util-linux)"
        } else if !is_root() {
            NEEDS_ROOT
        } else {
            "allow namespaces: run on a VM or host, or give the container CAP_SYS_ADMIN and no \
             seccomp filter on unshare/clone"
        };
        return Check::fail(NAME, format!("mount, pid, ipc, uts, net: {e}"), fix);
    }
    // The sandbox does not use user namespaces; shown because operators ask.
    let user = match unshare(&["--user"]) {
        Ok(()) => "user: available".to_owned(),
        Err(_) => "user: unavailable (not needed)".to_owned(),
    };
    Check::ok(NAME, format!("mount, pid, ipc, uts, net: ok; {user}"))
}

fn overlayfs(state_dir: &Path) -> Check {
    const NAME: &str = "overlayfs";
    let listed = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"));
    if !listed {
        return Check::fail(
            NAME,
            "overlay is not in /proc/filesystems",
            "load it: modprobe overlay",
        );
    }
    if !is_root() {
        return Check::fail(NAME, "listed; not probed", NEEDS_ROOT);
    }
    // Build scratch (the overlay's upper dir) lives in the state dir: mount there if it exists,
    // since an overlay upper on some filesystems (overlay itself, in containers) is refused.
    let base = if state_dir.is_dir() {
        state_dir.to_owned()
    } else {
        std::env::temp_dir()
    };
    let tmp = match tempfile::Builder::new()
        .prefix(".kiln-doctor-")
        .tempdir_in(&base)
    {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot create a probe dir in {}: {e}", base.display()),
                format!("make {} writable by root", base.display()),
            )
        }
    };
    for d in ["lower", "upper", "work", "merged"] {
        let _ = std::fs::create_dir(tmp.path().join(d));
    }
    let p = |d: &str| tmp.path().join(d).display().to_string();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        p("lower"),
        p("upper"),
        p("work")
    );
    // In a mount namespace of its own, the mount vanishes when `unshare` exits.
    let res = Command::new("unshare")
        .args(["--mount", "--", "mount", "-t", "overlay", "overlay", "-o"])
        .arg(&opts)
        .arg(p("merged"))
        .stdin(Stdio::null())
        .output();
    match res {
        Ok(o) if o.status.success() => Check::ok(
            NAME,
            format!("an overlay mounts with its upper dir in {}", base.display()),
        ),
        Ok(o) => Check::fail(
            NAME,
            format!(
                "mounting an overlay in {} failed: {}",
                base.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "put KILN_AGENT_STATE on ext4 or xfs (an overlay's upper dir cannot be on overlayfs)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot run unshare: {e}"),
            "apt-get install util-linux",
        ),
    }
}

fn sandbox_user(settings: &Settings) -> Check {
    const NAME: &str = "sandbox user";
    let (user, _) = settings
        .var("KILN_SANDBOX_USER")
        .unwrap_or_else(|| ("kiln-build".into(), Source::Default));
    let create = format!("useradd --system --no-create-home --shell /usr/sbin/nologin {user}");
    if let Some((uid, gid)) = user.split_once(':') {
        return match (uid.parse::<u32>(), gid.parse::<u32>()) {
            (Ok(0), _) | (_, Ok(0)) => Check::fail(
                NAME,
                format!("{user} is root"),
                "set KILN_SANDBOX_USER to an unprivileged user",
            ),
            (Ok(_), Ok(_)) => Check::ok(NAME, format!("{user} (uid:gid, no account needed)")),
            _ => Check::fail(
                NAME,
                format!("KILN_SANDBOX_USER={user:?} is neither a name nor uid:gid"),
                "set KILN_SANDBOX_USER to a user name or uid:gid",
            ),
        };
    }
    match nix::unistd::User::from_name(&user) {
        Ok(Some(u)) if u.uid.is_root() => Check::fail(
            NAME,
            format!("{user} is root"),
            "set KILN_SANDBOX_USER to an unprivileged user",
        ),
        Ok(Some(u)) => Check::ok(NAME, format!("{user} (uid {}, gid {})", u.uid, u.gid)),
        Ok(None) => Check::fail(NAME, format!("no user {user}"), create),
        Err(e) => Check::fail(NAME, format!("looking up {user}: {e}"), create),
    }
}

/// A program the sandbox runs: it only sees /usr.
fn sandboxed_tool(settings: &Settings, key: &'static str) -> Result<(PathBuf, String), String> {
    let (path, _) = settings.agent_path(key);
    if !path.starts_with("/usr") {
        return Err(format!(
            "{} is outside /usr, where the sandbox cannot see it",
            path.display()
        ));
    }
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    let out = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((path, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

fn node(settings: &Settings) -> Check {
    const NAME: &str = "node";
    let fix = "install Node.js 20 or later under /usr (Debian/Ubuntu: apt-get install nodejs, or \
               NodeSource's nodejs package), or point KILN_NODE at it";
    match sandboxed_tool(settings, "KILN_NODE") {
        Ok((path, version)) => {
            let major = version
                .trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok());
            match major {
                Some(m) if m >= 20 => Check::ok(NAME, format!("{version} at {}", path.display())),
                _ => Check::fail(
                    NAME,
                    format!("{version} at {} is older than 20", path.display()),
                    fix,
                ),
            }
        }
        Err(e) => Check::fail(NAME, e, fix),
    }
}

fn pnpm(settings: &Settings) -> Check {
    match sandboxed_tool(settings, "KILN_PNPM") {
        Ok((path, version)) => Check::ok("pnpm", format!("{version} at {}", path.display())),
        Err(e) => Check::fail(
            "pnpm",
            e,
            "npm install -g pnpm@10 (installs it under /usr), or point KILN_PNPM at it",
        ),
    }
}

fn git_cli() -> Check {
    match Command::new("git").arg("--version").output() {
        Ok(o) if o.status.success() => {
            Check::ok("git", String::from_utf8_lossy(&o.stdout).trim().to_owned())
        }
        _ => Check::fail(
            "git",
            "git is not on PATH",
            "apt-get install git (gitstore and kiln push run it)",
        ),
    }
}

fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// A directory the agent writes: writable, with at least `want` free (less is a warning).
fn disk(name: &'static str, dir: &Path, want: u64, var: &str) -> Check {
    // Missing is fine: the agent creates it; judge the filesystem it will be on.
    let existing = dir
        .ancestors()
        .find(|a| a.is_dir())
        .unwrap_or(Path::new("/"));
    let note = if existing == dir {
        String::new()
    } else {
        format!(" (not created yet; checked {})", existing.display())
    };
    if let Err(e) = tempfile::tempfile_in(existing) {
        return Check::fail(
            name,
            format!("{}{note} is not writable: {e}", dir.display()),
            format!("make it writable by the agent (root), or set {var}"),
        );
    }
    let Some(free) = free_bytes(existing) else {
        return Check::warn(
            name,
            format!("{}{note}: free space unknown", dir.display()),
            format!("check the filesystem of {}", existing.display()),
        );
    };
    let detail = format!("{}{note}: {} free", dir.display(), output::bytes(free));
    if free < want {
        Check::warn(
            name,
            detail,
            format!(
                "free space or move {var} to a larger disk (want at least {})",
                output::bytes(want)
            ),
        )
    } else {
        Check::ok(name, detail)
    }
}

async fn blob_store(settings: &Settings) -> Check {
    const NAME: &str = "blob store";
    let Some((url, _)) = settings.store_url() else {
        return Check::warn(
            NAME,
            "KILN_STORE_URL is not set here, so the store was not checked",
            "set KILN_STORE_URL as gitstore and the agent have it (or add it to /etc/kiln/kiln.env)",
        );
    };
    // Opening a directory store creates it: say it is missing instead.
    let local = url
        .strip_prefix("file://")
        .or_else(|| (!url.contains("://")).then_some(url.as_str()));
    if let Some(dir) = local {
        if !Path::new(dir).is_dir() {
            return Check::fail(
                NAME,
                format!("{url}: no such directory"),
                "check KILN_STORE_URL; gitstore creates a directory store when it first starts",
            );
        }
    }
    let store = match gitstore::BlobStore::open(&url) {
        Ok(s) => s,
        Err(e) => return Check::fail(NAME, e.to_string(), "fix KILN_STORE_URL"),
    };
    match tokio::time::timeout(Duration::from_secs(10), store.ping()).await {
        Ok(Ok(())) => Check::ok(NAME, format!("{url}: listed")),
        Ok(Err(e)) => Check::fail(
            NAME,
            format!("{url}: {e}"),
            "check the store's credentials (AZURE_*, AWS_*, GOOGLE_*) and network access",
        ),
        Err(_) => Check::fail(
            NAME,
            format!("{url}: no answer within 10s"),
            "check network access to the store",
        ),
    }
}

/// nginx is installed and accepts Kiln's configuration, rendered from this box's settings by
/// `kiln nginx check` (this same binary, so doctor and that command never disagree).
fn nginx(settings: &Settings) -> Check {
    const NAME: &str = "nginx";
    let run = |p: &str| Command::new(p).arg("-v").stdin(Stdio::null()).output();
    let version = match run("nginx").or_else(|_| run("/usr/sbin/nginx")) {
        // nginx -v prints to stderr.
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stderr)
            .trim()
            .trim_start_matches("nginx version: ")
            .to_owned(),
        _ => {
            return Check::fail(
                NAME,
                "nginx is not installed",
                "apt-get install nginx (it serves the previews)",
            )
        }
    };
    let checked = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .args(["nginx", "check"])
            .envs(settings.file_env())
            .stdin(Stdio::null())
            .output()
    });
    match checked {
        Ok(o) if o.status.success() => Check::ok(
            NAME,
            format!("{version}; nginx -t accepts Kiln's rendered configuration"),
        ),
        Ok(o) => {
            let said = String::from_utf8_lossy(&o.stderr);
            let last = said
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no reason given")
                .trim_start_matches("error: ")
                .to_owned();
            let fix = if last.contains("see above") {
                "run `kiln nginx check` to see what nginx -t objects to".to_owned()
            } else {
                last
            };
            Check::fail(NAME, format!("{version}; `kiln nginx check` failed"), fix)
        }
        Err(e) => Check::warn(
            NAME,
            format!("{version}; configuration not checked: {e}"),
            "run `kiln nginx check`",
        ),
    }
}

async fn healthz(name: &'static str, remote: &Remote, path: &str) -> Check {
    let ep = &remote.endpoint;
    if !ep.configured() {
        return Check::skip(name, format!("not checked: {} is not set", ep.var));
    }
    match remote.healthz(path).await {
        Ok((200, _)) => Check::ok(name, format!("{} is healthy", ep.url)),
        Ok((status, body)) => {
            let problems: Vec<String> = body["problems"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_else(|| {
                    body.as_object()
                        .map(|o| {
                            o.iter()
                                .filter(|(k, v)| *k != "status" && v.as_str() != Some("ok"))
                                .map(|(k, v)| format!("{k}: {v}"))
                                .collect()
                        })
                        .unwrap_or_default()
                });
            Check::fail(
                name,
                format!("{} answered {status}: {}", ep.url, problems.join("; ")),
                format!("see the {name}'s log"),
            )
        }
        Err(e) => Check::fail(
            name,
            e.to_string(),
            format!("start the {name}, or set {} to where it listens", ep.var),
        ),
    }
}
