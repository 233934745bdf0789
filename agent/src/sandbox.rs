//! Runs one install or build command contained: its own cgroup (memory, pids, cpu), new mount,
//! pid, ipc and uts namespaces (and, when `network` is false, a network namespace with no
//! interfaces), an unprivileged uid with no_new_privs, a read-only system view, and a hard timeout
//! that kills everything the command started.
//!
//! How: the agent (root) spawns `unshare --mount --pid --fork --ipc --uts [--net] --kill-child --
//! <agent exe> sandbox-init <spec.json>`. `sandbox-init` ([`init_main`]) is PID 1 of the new pid
//! namespace: it joins the cgroup, builds the new root from [`Spec::mounts`], pivots into it, drops
//! to the sandbox uid and runs the command, reaping until it exits. Killing PID 1 of a pid namespace
//! kills every process in it, and the cgroup is killed as well, so nothing outlives a timeout.
//!
//! The steps, in the order the code takes them:
//!
//! [`run`] (the agent, root, host namespaces):
//! 1. Validate the spec (cgroup name, absolute paths without `..`, a non-root uid and gid).
//! 2. Create the cgroup `kiln/<spec.cgroup>` with the memory limit (no swap on top of it), the
//!    pids limit and a CPU quota of `cpus` periods of 100 ms.
//! 3. Write the spec to a root-only temp dir (0700, file 0600) and start `unshare … sandbox-init`
//!    with stdin closed (or a pipe from the agent, when the spec asks) and stdout and stderr on
//!    one pipe, so output arrives in order.
//! 4. Stream the output; on timeout or cancel, SIGKILL every task of the cgroup and `unshare`.
//! 5. Read peak memory, CPU time, OOM kills and pids-limit refusals from the cgroup, then remove
//!    the cgroup, the temp dir and `spec.root`, whatever happened.
//!
//! [`init_main`] (root, PID 1 of the new pid namespace, in the new mount namespace):
//! 1. Join the cgroup, before anything else, so everything it starts is counted and killable.
//! 2. Make every mount private, so nothing done here propagates to the host.
//! 3. Mount a tmpfs at `spec.root` and build the system view in it: `/usr` and the `/bin`, `/lib*`
//!    links or read-only binds, a generated minimal `/etc` (no host `/etc`: no shadow, no secrets),
//!    a fresh `/proc`, a `/dev` with only null, zero, full, random, urandom and tty, and a `/tmp`
//!    tmpfs (charged to the memory cgroup).
//! 4. Apply [`Spec::mounts`] in order (always nosuid and nodev; binds read-only unless writable);
//!    a mount point whose path crosses a symlink is refused.
//! 5. Set the hostname, `pivot_root` into the new root, detach the old one and make `/` read-only.
//! 6. Set rlimits (no core dumps, 4096 files) and no_new_privs.
//! 7. Start the command with only `spec.env`, as `spec.uid`/`spec.gid` with no supplementary
//!    groups, in `spec.cwd`; reap every orphan until it exits, then exit with its code (128+signal
//!    when it was killed). A failed step prints `kiln sandbox: <step>: <error>` and exits 125.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cgroups_rs::fs::cgroup_builder::CgroupBuilder;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{hierarchies, Cgroup, ControllIdentifier, Controller, MaxValue, Subsystem};
use cgroups_rs::CgroupPid;
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// Everything `sandbox-init` needs; written to a root-only file the agent passes by path.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Name of the cgroup, unique per run, created under `kiln/` in every hierarchy.
    pub cgroup: String,
    /// Empty directory (root-owned) where the new root is assembled; removed after the run.
    pub root: PathBuf,
    /// Mounts inside the new root, applied in order after the system view.
    pub mounts: Vec<Mount>,
    /// False: a network namespace with only a down loopback.
    pub network: bool,
    pub uid: u32,
    pub gid: u32,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
    /// Program (absolute path inside the sandbox) and its arguments.
    pub argv: Vec<String>,
    /// The whole environment; nothing of the agent's leaks in.
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// The command reads a pipe from the agent ([`Process::send`]) on stdin; otherwise stdin
    /// is closed.
    #[serde(default)]
    pub stdin: bool,
}

/// A mount at `dst`, a path inside the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Mount {
    Bind {
        src: PathBuf,
        dst: PathBuf,
        writable: bool,
    },
    /// overlayfs: `lower` directories (first is topmost), read-only; writes go to `upper`.
    Overlay {
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        dst: PathBuf,
    },
    Tmpfs {
        dst: PathBuf,
        size_bytes: u64,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPUs worth of time per period, e.g. 2.0.
    pub cpus: f64,
    pub timeout: Duration,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Exit {
    Code(i32),
    Signal(i32),
    TimedOut,
    /// The memory limit was hit (the kernel's OOM killer ran in the cgroup).
    OutOfMemory,
    Cancelled,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub exit: Exit,
    pub peak_memory_bytes: u64,
    pub cpu_time: Duration,
    /// The pids limit refused at least one fork.
    pub pids_limit_hit: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The parent of every sandbox cgroup, in every hierarchy, unless [`delegate_cgroups`] found a
/// subtree systemd delegated to the agent.
const CGROUP_PARENT: &str = "kiln";
/// Set once by [`delegate_cgroups`]: `<the agent's own cgroup>/builds` on cgroup v2 under systemd.
static DELEGATED_PARENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// The key in the spec file that tells `sandbox-init` which parent its cgroup is under.
const PARENT_KEY: &str = "cgroup_parent";

fn cgroup_parent() -> &'static str {
    DELEGATED_PARENT.get().map_or(CGROUP_PARENT, String::as_str)
}

/// Under systemd with `Delegate=yes` on cgroup v2, puts build cgroups inside the agent's own
/// subtree (`<own>/builds/<name>`) instead of `kiln/<name>` at the root, so the unit accounts for
/// and can kill everything the agent starts. v2 forbids processes in a cgroup whose controllers
/// are handed down, so the agent moves itself to `<own>/agent` first. Returns the parent used;
/// on v1, or unless `KILN_CGROUP_DELEGATED=1` says the unit delegated its cgroup, it keeps `kiln`. Call once, at start, before any
/// build.
pub fn delegate_cgroups() -> Result<String, SandboxError> {
    let unified = Path::new(cgroups_rs::fs::cgroup::UNIFIED_MOUNTPOINT);
    // Set by kiln-agent.service beside `Delegate=yes`: writing into a cgroup systemd did not
    // delegate would break its single-writer rule, and the files do not say which is which.
    let delegated = std::env::var("KILN_CGROUP_DELEGATED").as_deref() == Ok("1");
    if !delegated || !hierarchies::is_cgroup2_unified_mode() {
        return Ok(CGROUP_PARENT.to_owned());
    }
    let own = fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("0::")
                .map(|p| p.trim().trim_start_matches('/').to_owned())
        })
        .unwrap_or_default();
    if own.is_empty() || own.split('/').any(|c| c == "..") {
        return Ok(CGROUP_PARENT.to_owned());
    }
    let base = unified.join(&own);
    let cg = |what: &str, e: std::io::Error| SandboxError::Cgroup(format!("{what}: {e}"));
    let agent = base.join("agent");
    let builds = base.join("builds");
    for d in [&agent, &builds] {
        match fs::create_dir(d) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(cg(&format!("creating {}", d.display()), e))
            }
            _ => {}
        }
    }
    fs::write(agent.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| cg(&format!("moving the agent into {}", agent.display()), e))?;
    for dir in [&base, &builds] {
        let control = dir.join("cgroup.subtree_control");
        fs::write(&control, "+memory +pids +cpu")
            .map_err(|e| cg(&format!("enabling controllers in {}", control.display()), e))?;
    }
    let parent = format!("{own}/builds");
    let _ = DELEGATED_PARENT.set(parent.clone());
    Ok(parent)
}
/// CFS period; the quota is `cpus` of these.
const CPU_PERIOD_US: u64 = 100_000;
/// `sandbox-init`'s exit code when a setup step failed (as in `env`, `chroot`, `podman`).
const SETUP_FAILED: i32 = 125;
const HOSTNAME: &str = "kiln-sandbox";
/// PATH for `unshare` and `sandbox-init` (the command gets only `spec.env`).
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The file next to the spec where `sandbox-init` reports how setup and the command ended.
const STATUS_FILE: &str = "status";
/// How long output is still read after `unshare` exited (nothing should hold the pipe by then).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long cleanup waits for the cgroup's tasks to go away before giving up on removing it.
const CLEANUP_GRACE: Duration = Duration::from_secs(10);
/// Directories of the host root shown in the sandbox: the same symlink, or a read-only bind.
const SYSTEM_DIRS: [&str; 6] = ["bin", "sbin", "lib", "lib64", "lib32", "libx32"];
/// Device nodes bound from the host into the sandbox's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// Host `/etc` files copied (contents only) into the sandbox's `/etc` when present: DNS, name
/// service, the dynamic linker's cache. Nothing with secrets.
const ETC_FILES: [&str; 5] = [
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
];
/// Host `/etc` directories bound read-only when present: TLS roots and Debian's alternatives links
/// (`/usr/bin/awk` and friends point through them).
const ETC_DIRS: [&str; 3] = ["ssl", "ca-certificates", "alternatives"];

// ---------------------------------------------------------------------------------------------
// The agent side
// ---------------------------------------------------------------------------------------------

/// Runs `spec` contained and waits for it. `exe` is the agent binary (it provides `sandbox-init`).
/// Everything the command writes to stdout and stderr goes to `output`, in order, as it arrives.
/// `cancel` kills the run and yields [`Exit::Cancelled`].
pub async fn run(
    exe: &std::path::Path,
    spec: &Spec,
    output: &mut (dyn FnMut(&[u8]) + Send),
    cancel: CancellationToken,
) -> Result<Outcome, SandboxError> {
    let mut process = Process::spawn(exe, spec).await?;
    let ended = supervise(&mut process, spec.limits.timeout, output, cancel).await;
    process.finish(ended).await
}

/// A sandboxed command that is still running: [`run`] waits for one, and a warm build process
/// (`crate::warm`) lives across builds. Dropping it kills everything in its cgroup and removes
/// the cgroup and its files; [`Process::stop`] does the same and waits for it.
pub struct Process {
    name: String,
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    pipe: tokio::net::unix::pipe::Receiver,
    spec_path: PathBuf,
    eof: bool,
    exited: Option<std::process::ExitStatus>,
    guard: Cleanup,
}

impl Process {
    /// Steps 1 to 3: validates `spec`, creates its cgroup and starts `sandbox-init` in it.
    /// [`Spec::limits`]'s timeout is the caller's to enforce.
    pub async fn spawn(exe: &Path, spec: &Spec) -> Result<Self, SandboxError> {
        validate(spec)?;
        // Step 3 first half: the spec, root-only. Created before the cgroup so a failure here
        // leaves nothing behind.
        // Beside the new root, in the agent's own scratch: cleaned with it after a crash.
        let parent = spec.root.parent().unwrap_or(Path::new("/tmp"));
        fs::create_dir_all(parent)?;
        let workdir = tempfile::Builder::new()
            .prefix("kiln-sandbox-")
            .tempdir_in(parent)?;
        let spec_path = workdir.path().join("spec.json");
        let mut json = serde_json::to_value(spec).map_err(std::io::Error::from)?;
        json[PARENT_KEY] = cgroup_parent().into();
        let json = serde_json::to_vec(&json).map_err(std::io::Error::from)?;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&spec_path)?
            .write_all(&json)?;
        if !spec.root.exists() {
            fs::create_dir_all(&spec.root)?;
        }
        let mut guard = Cleanup {
            group: None,
            root: spec.root.clone(),
            workdir: Some(workdir),
        };
        guard.group = Some(Group::create(cgroup_parent(), &spec.cgroup, &spec.limits)?);
        let (mut child, pipe) = start(exe, spec, &spec_path)?;
        Ok(Self {
            name: spec.cgroup.clone(),
            stdin: child.stdin.take(),
            child,
            pipe,
            spec_path,
            eof: false,
            exited: None,
            guard,
        })
    }

    fn group(&self) -> &Group {
        self.guard.group.as_ref().expect("a process has its cgroup")
    }

    /// The next output, `None` once the output is closed. Cancellation-safe.
    pub async fn read(&mut self, buf: &mut [u8]) -> Option<usize> {
        while !self.eof {
            match self.pipe.read(buf).await {
                Ok(0) => self.eof = true,
                Ok(n) => return Some(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("sandbox {}: reading output: {e}", self.name);
                    self.eof = true;
                }
            }
        }
        None
    }

    /// Writes `bytes` to the command's stdin (a spec with [`Spec::stdin`]).
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match &mut self.stdin {
            Some(w) => w.write_all(bytes).await,
            None => Err(std::io::Error::new(
                ErrorKind::BrokenPipe,
                "the sandbox was started without stdin",
            )),
        }
    }

    /// Waits for `sandbox-init` to exit. Cancellation-safe.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        let s = self.child.wait().await?;
        self.exited = Some(s);
        Ok(s)
    }

    /// Whether `sandbox-init` has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited.is_some()
    }

    /// SIGKILLs everything in the cgroup; the process ends soon after.
    pub fn kill(&mut self) {
        self.group().kill();
        let _ = self.child.start_kill();
    }

    /// What the kernel has counted for the cgroup so far.
    pub fn stats(&self) -> Stats {
        self.group().stats()
    }

    /// Kills everything left and removes the cgroup and the files, waiting for it.
    pub async fn stop(mut self) {
        self.kill();
        self.guard.finish().await;
    }

    /// After [`supervise`]: the outcome, and step 5.
    async fn finish(mut self, ended: Result<Ended, SandboxError>) -> Result<Outcome, SandboxError> {
        let result = match ended {
            Ok(ended) => {
                let group = self.group();
                group.kill_and_wait(CLEANUP_GRACE).await;
                let stats = group.stats();
                let report = fs::read_to_string(self.spec_path.with_file_name(STATUS_FILE))
                    .unwrap_or_default();
                outcome(ended, &report, stats)
            }
            Err(e) => Err(e),
        };
        self.guard.finish().await;
        result
    }
}

/// Removes the cgroups named `<anything>-<marker>-<pid>-<n>` whose agent (`pid`) is gone, with
/// whatever is left in them: a killed agent's warm processes die with it (parent-death signal),
/// but their groups stay behind.
pub fn remove_orphaned_cgroups(marker: &str) {
    let parent = cgroup_parent();
    let mut names = std::collections::BTreeSet::new();
    for base in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
        for e in fs::read_dir(Path::new(base).join(parent))
            .into_iter()
            .flatten()
            .flatten()
        {
            names.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    let needle = format!("-{marker}-");
    for name in names {
        let Some((_, rest)) = name.rsplit_once(&needle) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let group = Group::load(parent, &name);
        group.kill();
        if let Err(e) = group.remove() {
            log::warn!("sandbox: removing orphaned cgroup {}: {e}", group.path());
        }
    }
}

/// Step 1: refuse specs that cannot be run safely, before touching anything.
fn validate(spec: &Spec) -> Result<(), SandboxError> {
    let bad = |what: String| Err(SandboxError::Setup(what));
    let name_ok = !spec.cgroup.is_empty()
        && spec.cgroup.len() <= 128
        && spec.cgroup != "."
        && spec.cgroup != ".."
        && spec
            .cgroup
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !name_ok {
        return bad(format!(
            "cgroup name {:?} must be 1-128 characters of [A-Za-z0-9._-]",
            spec.cgroup
        ));
    }
    if spec.uid == 0 || spec.gid == 0 {
        return bad(format!(
            "refusing to run a sandbox as uid {} gid {}: pick an unprivileged uid and gid",
            spec.uid, spec.gid
        ));
    }
    if !spec.root.is_absolute() || spec.root.parent().is_none() {
        return bad(format!(
            "root {} must be an absolute path other than /",
            spec.root.display()
        ));
    }
    if spec.argv.is_empty() {
        return bad("argv is empty".into());
    }
    sandbox_path(&spec.cwd).map_err(|e| SandboxError::Setup(format!("cwd: {e}")))?;
    for m in &spec.mounts {
        let dst = match m {
            Mount::Bind { dst, .. } | Mount::Overlay { dst, .. } | Mount::Tmpfs { dst, .. } => dst,
        };
        if sandbox_path(dst)?.as_os_str().is_empty() {
            return bad(format!("mount destination {} is the root", dst.display()));
        }
        if let Mount::Overlay {
            lower, upper, work, ..
        } = m
        {
            if lower.is_empty() {
                return bad(format!("overlay at {} has no lower dir", dst.display()));
            }
            for p in lower.iter().chain([upper, work]) {
                let s = p.to_string_lossy();
                if !p.is_absolute() || s.contains([',', ':', '\\']) {
                    return bad(format!(
                        "overlay dir {} must be absolute without ',', ':' or '\\'",
                        p.display()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A path inside the sandbox, relative to its root: absolute, without `..` or `.`.
fn sandbox_path(p: &Path) -> Result<PathBuf, SandboxError> {
    if !p.is_absolute() {
        return Err(SandboxError::Setup(format!(
            "{} is not an absolute path",
            p.display()
        )));
    }
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => rel.push(n),
            _ => {
                return Err(SandboxError::Setup(format!(
                    "{} must not contain '.' or '..'",
                    p.display()
                )))
            }
        }
    }
    Ok(rel)
}

/// What `supervise` saw: how `unshare` ended, and whether we killed the run.
struct Ended {
    status: std::process::ExitStatus,
    killed: Option<Exit>,
}

/// Step 3 second half: starts `unshare … sandbox-init` with its output on our pipe.
fn start(
    exe: &Path,
    spec: &Spec,
    spec_path: &Path,
) -> Result<(tokio::process::Child, tokio::net::unix::pipe::Receiver), SandboxError> {
    // One pipe for stdout and stderr, so the output keeps the order it was written in. Our end
    // is non-blocking; the command's end is blocking, as programs expect.
    let (sender, pipe) = tokio::net::unix::pipe::pipe()?;
    let writer = sender.into_blocking_fd()?;
    let writer2 = writer.try_clone()?;
    // setpriv's parent-death signal: if the agent dies outright, unshare gets SIGKILL and its
    // --kill-child takes the sandbox's PID 1, and so the whole pid namespace, with it.
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "unshare"]);
    cmd.args(["--mount", "--pid", "--fork", "--ipc", "--uts"]);
    if !spec.network {
        cmd.arg("--net");
    }
    cmd.args(["--kill-child", "--"])
        .arg(exe)
        .arg("sandbox-init")
        .arg(spec_path)
        .env_clear()
        .env("PATH", SYSTEM_PATH)
        .stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(writer)
        .stderr(writer2)
        .kill_on_drop(true);
    let spawned = cmd.spawn();
    // The command holds our copies of the pipe's write end: close them, or EOF never comes.
    drop(cmd);
    let child = spawned.map_err(|e| {
        SandboxError::Setup(format!(
            "starting unshare: {e} (install it with: apt-get install util-linux)"
        ))
    })?;
    Ok((child, pipe))
}

/// Step 4: streams the output, enforces the timeout and the cancel token, until the process
/// exited and its output closed.
async fn supervise(
    process: &mut Process,
    timeout: Duration,
    output: &mut (dyn FnMut(&[u8]) + Send),
    cancel: CancellationToken,
) -> Result<Ended, SandboxError> {
    let timer = tokio::time::sleep(timeout);
    tokio::pin!(timer);
    let mut buf = vec![0u8; 64 * 1024];
    let mut status = None;
    let mut killed = None;
    let mut drain_until = None;
    while status.is_none() || !process.eof {
        let drain = tokio::time::sleep_until(
            drain_until.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
        );
        let eof = process.eof;
        // Every branch is cancellation-safe: a pipe read, a child wait, timers and a token.
        tokio::select! {
            read = process.pipe.read(&mut buf), if !eof => match read {
                Ok(0) => process.eof = true,
                Ok(n) => output(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("sandbox {}: reading output: {e}", process.name);
                    process.eof = true;
                }
            },
            waited = process.child.wait(), if status.is_none() => {
                let waited = waited?;
                process.exited = Some(waited);
                status = Some(waited);
                // Init is gone, so its namespace is; anything left in the cgroup goes too.
                process.group().kill();
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            () = &mut timer, if killed.is_none() && status.is_none() => {
                killed = Some(Exit::TimedOut);
                process.kill();
            }
            () = cancel.cancelled(), if killed.is_none() && status.is_none() => {
                killed = Some(Exit::Cancelled);
                process.kill();
            }
            () = drain, if drain_until.is_some() => {
                log::warn!("sandbox {}: output still open {DRAIN_GRACE:?} after exit", process.name);
                break;
            }
        }
    }
    Ok(Ended {
        status: status.expect("loop ends after the child exited"),
        killed,
    })
}

/// Turns what we saw into an [`Outcome`]: our kill first, then init's report, then `unshare`'s
/// status; a failed command after an OOM kill is [`Exit::OutOfMemory`].
fn outcome(ended: Ended, report: &str, stats: Stats) -> Result<Outcome, SandboxError> {
    use std::os::unix::process::ExitStatusExt;
    let exit = match ended.killed {
        Some(exit) => exit,
        None => {
            let last = report.lines().last().unwrap_or_default();
            let reported = if let Some(msg) = last.strip_prefix("setup ") {
                return Err(SandboxError::Setup(msg.to_owned()));
            } else if let Some(code) = last.strip_prefix("exit code ") {
                code.parse().ok().map(Exit::Code)
            } else if let Some(sig) = last.strip_prefix("exit signal ") {
                sig.parse().ok().map(Exit::Signal)
            } else {
                None
            };
            // No report: init itself died (OOM-killed, or killed before it got that far).
            let exit = reported.unwrap_or_else(|| match ended.status.signal() {
                Some(sig) => Exit::Signal(sig),
                None => Exit::Code(ended.status.code().unwrap_or(-1)),
            });
            if stats.oom_kills > 0 && exit != Exit::Code(0) {
                Exit::OutOfMemory
            } else {
                exit
            }
        }
    };
    Ok(Outcome {
        exit,
        peak_memory_bytes: stats.peak_memory_bytes,
        cpu_time: stats.cpu_time,
        pids_limit_hit: stats.pids_limit_hit,
    })
}

/// Step 5: removes the cgroup, the spec dir and `spec.root`, on every path out of [`run`]; if
/// the run future is dropped, [`Drop`] does the same without waiting.
struct Cleanup {
    group: Option<Group>,
    root: PathBuf,
    workdir: Option<tempfile::TempDir>,
}

impl Cleanup {
    async fn finish(&mut self) {
        if let Some(group) = self.group.take() {
            group.kill_and_wait(CLEANUP_GRACE).await;
            let started = tokio::time::Instant::now();
            loop {
                match group.remove() {
                    Ok(()) => break,
                    Err(e) if started.elapsed() > CLEANUP_GRACE => {
                        log::error!("sandbox: cannot remove cgroup {}: {e}", group.path());
                        break;
                    }
                    Err(_) => {
                        group.kill();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        self.remove_files();
    }

    fn remove_files(&mut self) {
        if let Some(dir) = self.workdir.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                log::warn!("sandbox: removing {}: {e}", path.display());
            }
        }
        // Only ever an empty directory on the host: the tmpfs lived in the sandbox's namespace.
        match fs::remove_dir(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => log::warn!("sandbox: removing root {}: {e}", self.root.display()),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            for _ in 0..20 {
                group.kill();
                if group.remove().is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        self.remove_files();
    }
}

// ---------------------------------------------------------------------------------------------
// The cgroup (v1 or v2, through cgroups-rs)
// ---------------------------------------------------------------------------------------------

/// What the kernel counted for a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub peak_memory_bytes: u64,
    /// Memory the cgroup holds now that the kernel cannot simply drop: anonymous memory and
    /// tmpfs (not page cache).
    pub resident_bytes: u64,
    pub cpu_time: Duration,
    pub pids_limit_hit: bool,
    pub oom_kills: u64,
}

/// `kiln/<name>` in the memory, pids and cpu (and on v1 cpuacct) hierarchies.
struct Group {
    cg: Cgroup,
    v2: bool,
}

impl Group {
    fn controllers(v2: bool) -> Vec<String> {
        let names: &[&str] = if v2 {
            &["memory", "pids", "cpu"]
        } else {
            &["memory", "pids", "cpu", "cpuacct"]
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A handle on an existing (or not yet created) group.
    fn load(parent: &str, name: &str) -> Self {
        let hier = hierarchies::auto();
        let v2 = hier.v2();
        let cg = Cgroup::load_with_specified_controllers(
            hier,
            format!("{parent}/{name}"),
            Self::controllers(v2),
        );
        Self { cg, v2 }
    }

    /// Step 2: creates the group with the spec's limits.
    fn create(parent: &str, name: &str, limits: &Limits) -> Result<Self, SandboxError> {
        let stale = Self::load(parent, name);
        if stale.cg.exists() {
            // Left by a crashed agent: nothing in it may keep running.
            log::warn!("sandbox: removing stale cgroup {}", stale.path());
            for _ in 0..40 {
                stale.kill();
                if stale.remove().is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let hier = hierarchies::auto();
        let v2 = hier.v2();
        let relative = format!("{parent}/{name}");
        let cg = CgroupBuilder::new(&relative)
            .set_specified_controllers(Self::controllers(v2))
            .build(hier)
            .map_err(|e| SandboxError::Cgroup(format!("creating {relative}: {e}")))?;
        let group = Self { cg, v2 };
        if let Err(e) = group.configure(parent, limits) {
            let _ = group.remove();
            return Err(e);
        }
        Ok(group)
    }

    fn path(&self) -> &str {
        self.cg.path()
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> SandboxError {
        SandboxError::Cgroup(format!("{} {what}: {e}", self.path()))
    }

    fn configure(&self, parent: &str, limits: &Limits) -> Result<(), SandboxError> {
        for name in Self::controllers(self.v2) {
            if !self
                .cg
                .subsystems()
                .iter()
                .any(|s| s.controller_name() == name)
            {
                return Err(self.err(
                    "",
                    format!("the {name} controller is not available on this host"),
                ));
            }
        }
        if self.v2 {
            self.check_subtree_control(parent)?;
        }
        let mem: &MemController = self.controller()?;
        let bytes = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
        mem.set_limit(bytes)
            .map_err(|e| self.err("setting the memory limit", e))?;
        // No swap on top of the limit. v1: memory+swap equal to memory; v2: swap.max is swap only.
        if self.v2 {
            let swap = mem.path().join("memory.swap.max");
            if swap.exists() {
                fs::write(&swap, "0").map_err(|e| self.err("setting memory.swap.max", e))?;
            }
        } else if mem.path().join("memory.memsw.limit_in_bytes").exists() {
            mem.set_memswap_limit(bytes)
                .map_err(|e| self.err("setting the memory+swap limit", e))?;
        }
        let pids: &PidController = self.controller()?;
        pids.set_pid_max(MaxValue::Value(
            i64::try_from(limits.pids.max(1)).unwrap_or(i64::MAX),
        ))
        .map_err(|e| self.err("setting pids.max", e))?;
        if limits.cpus > 0.0 {
            let cpu: &CpuController = self.controller()?;
            let quota = (limits.cpus * CPU_PERIOD_US as f64).round().max(1000.0) as i64;
            cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
                .map_err(|e| self.err("setting the cpu quota", e))?;
        }
        Ok(())
    }

    /// On v2 the parent must hand memory, pids and cpu down, or the limits files do not exist.
    fn check_subtree_control(&self, parent: &str) -> Result<(), SandboxError> {
        let parent = Path::new(cgroups_rs::fs::cgroup::UNIFIED_MOUNTPOINT)
            .join(parent)
            .join("cgroup.subtree_control");
        let current = fs::read_to_string(&parent).unwrap_or_default();
        for c in ["memory", "pids", "cpu"] {
            if !current.split_whitespace().any(|x| x == c) {
                fs::write(&parent, format!("+{c}"))
                    .map_err(|e| self.err(&format!("enabling +{c} in {}", parent.display()), e))?;
            }
        }
        Ok(())
    }

    fn controller<'a, T>(&'a self) -> Result<&'a T, SandboxError>
    where
        &'a T: From<&'a Subsystem>,
        T: Controller + ControllIdentifier,
    {
        self.cg
            .controller_of::<T>()
            .ok_or_else(|| self.err("", format!("{:?} controller missing", T::controller_type())))
    }

    /// SIGKILL everything in the group (v2: `cgroup.kill` when the kernel has it).
    fn kill(&self) {
        if self.v2 && self.cg.kill().is_ok() {
            return;
        }
        for p in self.cg.procs() {
            if let Ok(pid) = i32::try_from(p.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.cg.procs().is_empty()
    }

    /// Kills until no task is left (or `grace` passed).
    async fn kill_and_wait(&self, grace: Duration) {
        let started = tokio::time::Instant::now();
        while !self.is_empty() && started.elapsed() < grace {
            self.kill();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn remove(&self) -> Result<(), SandboxError> {
        if !self.cg.exists() {
            return Ok(());
        }
        self.cg.delete().map_err(|e| self.err("removing", e))
    }

    /// Step 5: what the kernel counted, read before the group is removed.
    fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        if let Some(mem) = self.cg.controller_of::<MemController>() {
            if self.v2 {
                let read = |f: &str| {
                    fs::read_to_string(mem.path().join(f))
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                };
                stats.peak_memory_bytes = read("memory.peak")
                    .or_else(|| read("memory.current"))
                    .unwrap_or(0);
                let stat = mem.path().join("memory.stat");
                stats.resident_bytes = keyed(&stat, "anon") + keyed(&stat, "shmem");
                stats.oom_kills = keyed(&mem.path().join("memory.events"), "oom_kill");
            } else {
                let m = mem.memory_stat();
                stats.peak_memory_bytes = m.max_usage_in_bytes;
                stats.resident_bytes = m.stat.total_rss + m.stat.total_shmem;
                stats.oom_kills = m.oom_control.oom_kill;
            }
        }
        if self.v2 {
            if let Some(cpu) = self.cg.controller_of::<CpuController>() {
                let usec = keyed(&cpu.path().join("cpu.stat"), "usage_usec");
                stats.cpu_time = Duration::from_micros(usec);
            }
        } else if let Some(acct) = self.cg.controller_of::<CpuAcctController>() {
            stats.cpu_time = Duration::from_nanos(acct.cpuacct().usage);
        }
        if let Some(pids) = self.cg.controller_of::<PidController>() {
            stats.pids_limit_hit = pids.get_pid_events().unwrap_or(0) > 0;
        }
        stats
    }
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines); 0 when absent.
fn keyed(file: &Path, key: &str) -> u64 {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// sandbox-init: PID 1 of the sandbox
// ---------------------------------------------------------------------------------------------

/// A failed setup step: what was being done and why it failed.
struct StepError {
    what: String,
    err: String,
}

type Step<T = ()> = Result<T, StepError>;

trait Context<T> {
    fn step(self, what: impl FnOnce() -> String) -> Step<T>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn step(self, what: impl FnOnce() -> String) -> Step<T> {
        self.map_err(|e| StepError {
            what: what(),
            err: e.to_string(),
        })
    }
}

/// Init's report to the agent, a file next to the spec (opened before the mounts change, so the
/// descriptor still reaches it after `pivot_root`): `setup <step>: <error>`, or
/// `exit code N` / `exit signal N`.
struct Report(Option<fs::File>);

impl Report {
    fn open(spec_path: &Path) -> Self {
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(spec_path.with_file_name(STATUS_FILE));
        Self(file.ok())
    }

    fn line(&mut self, line: &str) {
        if let Some(f) = &mut self.0 {
            let _ = writeln!(f, "{line}");
        }
    }

    fn setup_failed(&mut self, e: StepError) -> i32 {
        eprintln!("kiln sandbox: {}: {}", e.what, e.err);
        self.line(&format!("setup {}: {}", e.what, e.err));
        SETUP_FAILED
    }
}

/// `kiln-agent sandbox-init <spec.json>`: PID 1 of the sandbox. Returns the process exit code.
pub fn init_main(spec_path: &std::path::Path) -> i32 {
    let mut report = Report::open(spec_path);
    let parsed = fs::read(spec_path)
        .step(|| format!("reading {}", spec_path.display()))
        .and_then(|b| {
            let v: serde_json::Value =
                serde_json::from_slice(&b).step(|| format!("parsing {}", spec_path.display()))?;
            let parent = v[PARENT_KEY].as_str().unwrap_or(CGROUP_PARENT).to_owned();
            let spec: Spec =
                serde_json::from_value(v).step(|| format!("parsing {}", spec_path.display()))?;
            Ok((spec, parent))
        });
    let (spec, parent) = match parsed {
        Ok(p) => p,
        Err(e) => return report.setup_failed(e),
    };
    if let Err(e) = setup(&spec, &parent) {
        return report.setup_failed(e);
    }
    // Step 7: the command, unprivileged, with only its own environment.
    let mut cmd = std::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .uid(spec.uid)
        .gid(spec.gid)
        .current_dir(&spec.cwd)
        .stdin(if spec.stdin {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    let child = match cmd.spawn().step(|| format!("starting {}", spec.argv[0])) {
        Ok(child) => child,
        Err(e) => return report.setup_failed(e),
    };
    let main = Pid::from_raw(child.id() as i32);
    // As PID 1 every orphan is ours to reap; the command's own end is the sandbox's end.
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => {
                report.line(&format!("exit code {code}"));
                return code;
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                report.line(&format!("exit signal {}", sig as i32));
                return 128 + sig as i32;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("kiln sandbox: waiting for {}: {e}", spec.argv[0]);
                return SETUP_FAILED;
            }
        }
    }
}

/// Steps 1 to 6 of `sandbox-init`.
fn setup(spec: &Spec, cgroup_parent: &str) -> Step {
    // 1. The cgroup first: from here on everything is counted and killable. Our pid is 1 in
    //    this namespace; the kernel reads a pid written to cgroup.procs in the writer's namespace.
    let group = Group::load(cgroup_parent, &spec.cgroup);
    if !group.cg.exists() {
        return Err(StepError {
            what: format!("joining cgroup {}", group.path()),
            err: "it does not exist".into(),
        });
    }
    group
        .cg
        .add_task_by_tgid(CgroupPid::from(u64::from(std::process::id())))
        .step(|| format!("joining cgroup {}", group.path()))?;

    // 2. Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step(|| "making / private".into())?;

    // 3. The system view.
    let root = spec.root.as_path();
    mount_tmpfs(
        root,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755,size=16m",
    )?;
    system_view(root)?;
    etc(root, spec)?;
    let proc_dir = mkdir(root, "proc")?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .step(|| "mounting /proc".into())?;
    dev(root)?;
    let tmp = mkdir(root, "tmp")?;
    mount_tmpfs(
        &tmp,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777,size=512m",
    )?;

    // 4. The spec's mounts, in order.
    for m in &spec.mounts {
        apply_mount(root, spec, m)?;
    }

    // 5. Hostname, pivot, read-only root.
    nix::unistd::sethostname(HOSTNAME).step(|| "setting the hostname".into())?;
    pivot(root)?;
    nix::unistd::chdir(&spec.cwd).step(|| format!("entering {}", spec.cwd.display()))?;

    // 6. Limits that survive the uid change, and no way back up.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).step(|| "setting RLIMIT_CORE".into())?;
    setrlimit(Resource::RLIMIT_NOFILE, 4096, 4096).step(|| "setting RLIMIT_NOFILE".into())?;
    nix::sys::prctl::set_no_new_privs().step(|| "setting no_new_privs".into())?;
    Ok(())
}

/// `/usr` read-only; `/bin`, `/sbin` and `/lib*` as the same symlinks, or read-only binds.
fn system_view(root: &Path) -> Step {
    let usr = mkdir(root, "usr")?;
    bind(Path::new("/usr"), &usr, ro())?;
    for name in SYSTEM_DIRS {
        let host = Path::new("/").join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        let inside = root.join(name);
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&host).step(|| format!("reading {}", host.display()))?;
            symlink(&target, &inside).step(|| format!("linking /{name}"))?;
        } else if meta.is_dir() {
            mkdir(root, name)?;
            bind(&host, &inside, ro())?;
        }
    }
    Ok(())
}

/// A minimal `/etc`: generated passwd, group, hosts and hostname; DNS, TLS and linker files from
/// the host; never the host's `/etc` itself (shadow, ssh keys, the agent's secrets).
fn etc(root: &Path, spec: &Spec) -> Step {
    let etc = mkdir(root, "etc")?;
    let generated = [
        (
            "passwd",
            format!(
                "root:x:0:0::/root:/usr/sbin/nologin\nkiln:x:{}:{}::/tmp:/usr/sbin/nologin\n",
                spec.uid, spec.gid
            ),
        ),
        ("group", format!("root:x:0:\nkiln:x:{}:\n", spec.gid)),
        (
            "hosts",
            format!("127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost\n"),
        ),
        ("hostname", format!("{HOSTNAME}\n")),
    ];
    for (name, content) in generated {
        write_file(&etc.join(name), content.as_bytes())?;
    }
    for name in ETC_FILES {
        match fs::read(Path::new("/etc").join(name)) {
            Ok(bytes) => write_file(&etc.join(name), &bytes)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StepError {
                    what: format!("reading /etc/{name}"),
                    err: e.to_string(),
                })
            }
        }
    }
    let localtime = Path::new("/etc/localtime");
    if let Ok(meta) = fs::symlink_metadata(localtime) {
        if meta.file_type().is_symlink() {
            let target = fs::read_link(localtime).step(|| "reading /etc/localtime".into())?;
            symlink(target, etc.join("localtime")).step(|| "linking /etc/localtime".into())?;
        } else if let Ok(bytes) = fs::read(localtime) {
            write_file(&etc.join("localtime"), &bytes)?;
        }
    }
    for name in ETC_DIRS {
        let host = Path::new("/etc").join(name);
        if fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
            let inside = mkdir(&etc, name)?;
            bind(&host, &inside, ro())?;
        }
    }
    // TLS private keys (Debian's ssl-cert) are not for builds, even unreadable ones.
    let private = etc.join("ssl/private");
    if fs::symlink_metadata(&private).is_ok_and(|m| m.is_dir()) {
        mount_tmpfs(
            &private,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "mode=0700,size=4k",
        )?;
    }
    Ok(())
}

/// `/dev`: a tmpfs with the harmless devices bound in, `/dev/shm` and the fd links.
fn dev(root: &Path) -> Step {
    let dev = mkdir(root, "dev")?;
    mount_tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=64k",
    )?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let node = dev.join(name);
        write_file(&node, b"")?;
        bind(&host, &node, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
    }
    let shm = mkdir(&dev, "shm")?;
    mount_tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "mode=1777,size=64m",
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(name)).step(|| format!("linking /dev/{name}"))?;
    }
    Ok(())
}

/// One of [`Spec::mounts`], always nosuid and nodev.
fn apply_mount(root: &Path, spec: &Spec, m: &Mount) -> Step {
    match m {
        Mount::Bind { src, dst, writable } => {
            let meta = fs::metadata(src).step(|| format!("bind source {}", src.display()))?;
            let target = mount_point(root, dst, !meta.is_dir())?;
            let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            if !writable {
                flags |= MsFlags::MS_RDONLY;
            }
            bind(src, &target, flags)
        }
        Mount::Overlay {
            lower,
            upper,
            work,
            dst,
        } => {
            let target = mount_point(root, dst, false)?;
            let lower: Vec<String> = lower
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let data = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.join(":"),
                upper.display(),
                work.display()
            );
            mount(
                Some("overlay"),
                &target,
                Some("overlay"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(data.as_str()),
            )
            .step(|| format!("mounting overlay at {} ({data})", dst.display()))
        }
        Mount::Tmpfs { dst, size_bytes } => {
            let target = mount_point(root, dst, false)?;
            mount_tmpfs(
                &target,
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                &format!(
                    "mode=0755,uid={},gid={},size={}",
                    spec.uid, spec.gid, size_bytes
                ),
            )
        }
    }
}

/// `pivot_root` into `root` without a directory for the old root: stack it on the new one and
/// detach it (pivot_root(2), "new_root and put_old may be the same directory"). Then `/` is
/// made read-only: nothing outside the spec's writable mounts and the tmpfs dirs takes writes.
fn pivot(root: &Path) -> Step {
    nix::unistd::chdir(root).step(|| format!("entering {}", root.display()))?;
    nix::unistd::pivot_root(".", ".").step(|| format!("pivot_root to {}", root.display()))?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detaching the old root".into())?;
    nix::unistd::chdir("/").step(|| "entering /".into())?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | ro(),
        None::<&str>,
    )
    .step(|| "making / read-only".into())
}

fn ro() -> MsFlags {
    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

/// Binds `src` on `dst`, then remounts the bind with exactly `flags` (a bind ignores them).
fn bind(src: &Path, dst: &Path, flags: MsFlags) -> Step {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .step(|| format!("binding {} on {}", src.display(), dst.display()))?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .step(|| format!("remounting {} ({flags:?})", dst.display()))
}

fn mount_tmpfs(dst: &Path, flags: MsFlags, data: &str) -> Step {
    mount(Some("tmpfs"), dst, Some("tmpfs"), flags, Some(data))
        .step(|| format!("mounting tmpfs at {} ({data})", dst.display()))
}

/// Creates `root/name` (0755) for a mount or for content.
fn mkdir(root: &Path, name: &str) -> Step<PathBuf> {
    let dir = root.join(name);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(StepError {
                what: format!("creating {}", dir.display()),
                err: e.to_string(),
            })
        }
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .step(|| format!("chmod {}", dir.display()))?;
    Ok(dir)
}

fn write_file(path: &Path, bytes: &[u8]) -> Step {
    fs::write(path, bytes).step(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .step(|| format!("chmod {}", path.display()))
}

/// The host path of `dst` (a path inside the sandbox) under `root`, created as a directory (or an
/// empty file for a file bind) where missing. A component that is a symlink is refused: the
/// tree under a project dir is the project's to shape, and a `node_modules -> /etc` must not
/// move a mount outside the sandbox.
fn mount_point(root: &Path, dst: &Path, file: bool) -> Step<PathBuf> {
    let rel = sandbox_path(dst).step(|| format!("mount destination {}", dst.display()))?;
    let mut cur = root.to_path_buf();
    let count = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        cur.push(c);
        let last = i + 1 == count;
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(StepError {
                    what: format!("mount destination {}", dst.display()),
                    err: format!("{} is a symlink", cur.display()),
                })
            }
            Ok(m) if !last && !m.is_dir() => {
                return Err(StepError {
                    what: format!("mount destination {}", dst.display()),
                    err: format!("{} is not a directory", cur.display()),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if last && file {
                    write_file(&cur, b"")?;
                } else {
                    fs::create_dir(&cur).step(|| format!("creating {}", cur.display()))?;
                }
            }
            Err(e) => {
                return Err(StepError {
                    what: format!("mount destination {}", dst.display()),
                    err: e.to_string(),
                })
            }
        }
    }
    Ok(cur)
}

// ---------------------------------------------------------------------------------------------
// Scratch space: what a build may write outside its /tmp
// ---------------------------------------------------------------------------------------------

/// Gives the agent a mount namespace of its own, so that the scratch filesystems it mounts
/// ([`ScratchFs`]) go away with it however it ends (a crash included) and never show on the
/// host. Host mounts still reach it (slave propagation). Call first thing in `main`: mount
/// namespaces are per thread, so every thread must be started after this.
pub fn own_mount_namespace() -> Result<(), SandboxError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::Setup(format!("unshare(CLONE_NEWNS): {e}")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::Setup(format!("making / a slave mount: {e}")))
}

/// A tmpfs of `size_bytes` at `path` on the agent's side, for a build's writable dirs (overlay
/// upper, `/out`, a warm process's copy of the project): a build that fills it gets ENOSPC, not
/// the host's disk, and its pages count against the memory cgroup of the build that wrote them.
/// Unmounted on drop.
pub struct ScratchFs {
    path: PathBuf,
}

impl ScratchFs {
    pub fn mount(path: &Path, size_bytes: u64) -> Result<Self, SandboxError> {
        fs::create_dir_all(path)?;
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("mode=0755,size={size_bytes}").as_str()),
        )
        .map_err(|e| SandboxError::Setup(format!("mounting a tmpfs at {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
            log::warn!("sandbox: unmounting {}: {e}", self.path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host check
// ---------------------------------------------------------------------------------------------

/// Checks that this host can run sandboxes (root, `unshare`, cgroup controllers, overlayfs), for
/// `/healthz` and `kiln doctor`; the error says what to install or enable.
pub fn check_host() -> Result<(), SandboxError> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(SandboxError::Setup(format!(
            "sandboxes need root (namespaces, mounts, cgroups); the agent runs as uid {euid}"
        )));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| SYSTEM_PATH.into());
    let has_unshare = std::env::split_paths(&path)
        .chain(std::env::split_paths(SYSTEM_PATH))
        .any(|dir| {
            fs::metadata(dir.join("unshare"))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    if !has_unshare {
        return Err(SandboxError::Setup(
            "`unshare` is not on PATH; install it with: apt-get install util-linux".into(),
        ));
    }
    let hier = hierarchies::auto();
    let v2 = hier.v2();
    let available: Vec<String> = if v2 {
        let root = Path::new(cgroups_rs::fs::cgroup::UNIFIED_MOUNTPOINT);
        fs::read_to_string(root.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    } else {
        hier.subsystems()
            .iter()
            .map(|s| s.controller_name())
            .collect()
    };
    let missing: Vec<String> = Group::controllers(v2)
        .into_iter()
        .filter(|c| !available.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(SandboxError::Cgroup(if v2 {
            format!(
                "cgroup v2 controllers missing at the root: {}; enable them (kernel config, or \
                 systemd.unified_cgroup_hierarchy=1 with a current systemd)",
                missing.join(", ")
            )
        } else {
            format!(
                "cgroup v1 hierarchies not mounted: {}; mount each under /sys/fs/cgroup \
                 (mount -t cgroup -o NAME cgroup /sys/fs/cgroup/NAME)",
                missing.join(", ")
            )
        }));
    }
    let filesystems = fs::read_to_string("/proc/filesystems")?;
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return Err(SandboxError::Setup(
            "overlayfs is not available; load it with: modprobe overlay".into(),
        ));
    }
    Ok(())
}
