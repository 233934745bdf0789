//! The build sandbox, run for real as root: each test starts `kiln-agent sandbox-init` through
//! `agent::sandbox::run` and checks what the kernel and the host show afterwards (exit codes,
//! cgroup counters, files on the host, cgroup directories gone), not which functions ran.
//!
//! Needs root, `unshare` (util-linux), cgroup memory/pids/cpu controllers, overlayfs and Node;
//! build the agent first: `cargo build -p kiln-agent`.

use std::io::{ErrorKind, Read};
use std::net::TcpListener;
use std::os::unix::fs::{chown, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::sandbox::{self, Exit, Limits, Mount, Outcome, SandboxError, Spec};
use tokio_util::sync::CancellationToken;

/// The unprivileged uid and gid every sandbox here runs as (no host passwd entry needed).
const UID: u32 = 64123;
const GID: u32 = 64123;
const MIB: u64 = 1024 * 1024;

/// Held by the tests that spin CPUs (fork bomb, endless loop, quota), so their CPU-time checks do
/// not depend on how many of them the test runner happens to overlap on a small machine.
static CPU_BOUND: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cpu_bound() -> std::sync::MutexGuard<'static, ()> {
    CPU_BOUND
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails loudly (with what to install) unless this host can run sandboxes.
fn require_sandbox_host() {
    if let Err(e) = sandbox::check_host() {
        panic!("this test needs a host that can run Kiln sandboxes: {e}");
    }
}

/// A spec with a fresh root dir and a cgroup name unique to this test and process.
struct Case {
    dir: tempfile::TempDir,
    spec: Spec,
}

impl Case {
    fn new(test: &str, argv: &[&str]) -> Self {
        require_sandbox_host();
        let dir = tempfile::Builder::new()
            .prefix("kiln-sandbox-test-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root dir");
        let spec = Spec {
            cgroup: format!("test-{test}-{}", std::process::id()),
            root,
            mounts: Vec::new(),
            network: false,
            uid: UID,
            gid: GID,
            cwd: "/tmp".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("HOME".into(), "/tmp".into()),
            ],
            limits: Limits {
                memory_bytes: 512 * MIB,
                pids: 256,
                cpus: 1.0,
                timeout: Duration::from_secs(60),
            },
            stdin: false,
        };
        Self { dir, spec }
    }

    /// A host directory next to the root, owned by the sandbox user.
    fn host_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("host dir");
        chown(&p, Some(UID), Some(GID)).expect("chown host dir");
        p
    }

    fn run(&self) -> Ran {
        self.run_with(CancellationToken::new())
    }

    fn run_with(&self, cancel: CancellationToken) -> Ran {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let mut out = Vec::new();
        let started = Instant::now();
        let result = rt.block_on(async {
            sandbox::run(
                &kiln_tests::bin("kiln-agent"),
                &self.spec,
                &mut |b: &[u8]| out.extend_from_slice(b),
                cancel,
            )
            .await
        });
        let elapsed = started.elapsed();
        eprintln!("{}: {result:?} after {elapsed:?}", self.spec.cgroup);
        Ran {
            result,
            output: String::from_utf8_lossy(&out).into_owned(),
            elapsed,
        }
    }

    /// The sandbox's cgroup directories, in whichever hierarchies this host has.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        ["memory", "pids", "cpu", "cpuacct", ""]
            .iter()
            .map(|h| {
                Path::new("/sys/fs/cgroup")
                    .join(h)
                    .join("kiln")
                    .join(&self.spec.cgroup)
            })
            .collect()
    }

    /// Asserts the run left nothing behind: no cgroup directory, no process in it, no root dir.
    fn assert_cleaned_up(&self) {
        for d in self.cgroup_dirs() {
            assert!(
                !d.exists(),
                "cgroup {} still exists after the run",
                d.display()
            );
        }
        let marker = format!("kiln/{}", self.spec.cgroup);
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path().join("cgroup")) {
                if text.lines().any(|l| l.ends_with(&marker)) {
                    left.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        assert!(left.is_empty(), "processes still in {marker}: {left:?}");
        assert!(
            !self.spec.root.exists(),
            "root {} was not removed",
            self.spec.root.display()
        );
    }
}

struct Ran {
    result: Result<Outcome, SandboxError>,
    output: String,
    elapsed: Duration,
}

impl Ran {
    fn outcome(&self) -> Outcome {
        match &self.result {
            Ok(o) => *o,
            Err(e) => panic!("sandbox run failed: {e}\noutput:\n{}", self.output),
        }
    }
}

fn sh(script: &str) -> Vec<&str> {
    vec!["/bin/sh", "-c", script]
}

#[test]
fn runs_a_command_as_the_sandbox_user_and_passes_its_exit_code() {
    let case = Case::new("basic", &sh("id -u; id -g; id -G; echo hello; exit 3"));
    let ran = case.run();
    let o = ran.outcome();
    assert_eq!(o.exit, Exit::Code(3), "output:\n{}", ran.output);
    let lines: Vec<&str> = ran.output.lines().collect();
    assert_eq!(
        lines,
        ["64123", "64123", "64123", "hello"],
        "uid, gid, groups (no supplementary ones), then the output"
    );
    assert!(o.peak_memory_bytes > 0, "{o:?}");
    assert!(!o.pids_limit_hit, "{o:?}");
    case.assert_cleaned_up();
}

#[test]
fn hostile_fork_bomb_contained() {
    let _cpu = cpu_bound();
    let mut case = Case::new(
        "forkbomb",
        // The bomb forks in the background; the main shell spins on builtins (no forks) so the
        // run lasts until the timeout while the bomb beats against the pids limit.
        &sh("f() { f | f & }; f; while :; do :; done"),
    );
    case.spec.limits.pids = 64;
    case.spec.limits.timeout = Duration::from_secs(10);
    let ran = case.run();
    let o = ran.outcome();
    assert!(
        matches!(o.exit, Exit::TimedOut | Exit::Signal(_))
            || matches!(o.exit, Exit::Code(c) if c != 0),
        "the bomb's run must end in a failure, got {:?}; output:\n{}",
        o.exit,
        tail(&ran.output)
    );
    assert!(o.pids_limit_hit, "pids.events shows no refused fork: {o:?}");
    assert!(
        ran.elapsed < Duration::from_secs(20),
        "took {:?}",
        ran.elapsed
    );
    let status = Command::new("true")
        .status()
        .expect("the host can still fork");
    assert!(status.success());
    case.assert_cleaned_up();
}

#[test]
fn hostile_8_gib_allocation_contained() {
    let mut case = Case::new(
        "oom",
        &[
            "/usr/bin/node",
            "-e",
            "const a=[];for(let i=0;i<128;i++){a.push(Buffer.alloc(64<<20,1));console.log((i+1)*64)}",
        ],
    );
    let limit = 256 * MIB;
    case.spec.limits.memory_bytes = limit;
    let ran = case.run();
    let o = ran.outcome();
    assert_eq!(o.exit, Exit::OutOfMemory, "output:\n{}", tail(&ran.output));
    assert!(
        o.peak_memory_bytes <= limit + 4 * MIB,
        "peak {} MiB above the {} MiB limit",
        o.peak_memory_bytes / MIB,
        limit / MIB
    );
    assert!(
        o.peak_memory_bytes > 100 * MIB,
        "peak only {} MiB",
        o.peak_memory_bytes / MIB
    );
    assert!(
        !ran.output.contains("\n8192\n"),
        "node allocated all 8 GiB:\n{}",
        tail(&ran.output)
    );
    case.assert_cleaned_up();
}

#[test]
fn hostile_endless_loop_contained() {
    let _cpu = cpu_bound();
    let mut case = Case::new("loop", &sh("while :; do :; done"));
    case.spec.limits.timeout = Duration::from_secs(2);
    let ran = case.run();
    let o = ran.outcome();
    assert_eq!(o.exit, Exit::TimedOut, "output:\n{}", ran.output);
    assert!(
        ran.elapsed < Duration::from_secs(5),
        "a 2 s timeout took {:?}",
        ran.elapsed
    );
    assert!(
        o.cpu_time > Duration::from_millis(500),
        "cpu time {:?}",
        o.cpu_time
    );
    case.assert_cleaned_up();
}

#[test]
fn hostile_cpu_hog_contained_to_the_quota() {
    let _cpu = cpu_bound();
    // Two busy loops under a quota of half a CPU: CPU time stays near 0.5 s per second.
    let mut case = Case::new("quota", &sh("while :; do :; done & while :; do :; done"));
    case.spec.limits.cpus = 0.5;
    case.spec.limits.timeout = Duration::from_secs(3);
    let ran = case.run();
    let o = ran.outcome();
    assert_eq!(o.exit, Exit::TimedOut, "output:\n{}", ran.output);
    assert!(
        o.cpu_time < Duration::from_millis(2200),
        "0.5 CPUs for ~3 s used {:?}",
        o.cpu_time
    );
    assert!(o.cpu_time > Duration::from_millis(500), "{:?}", o.cpu_time);
    case.assert_cleaned_up();
}

#[test]
fn hostile_tcp_connection_during_build_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listening");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let script = format!(
        "const net=require('net');\
         const t=(h,p)=>new Promise(r=>{{const s=net.connect({{host:h,port:p}});s.setTimeout(3000);\
         s.on('connect',()=>{{console.log(h,'CONNECTED');s.destroy();r()}});\
         s.on('error',e=>{{console.log(h,e.code);r()}});\
         s.on('timeout',()=>{{console.log(h,'TIMEOUT');s.destroy();r()}})}});\
         (async()=>{{await t('1.1.1.1',80);await t('127.0.0.1',{port})}})()"
    );
    let case = Case::new("nonet", &["/usr/bin/node", "-e", &script]);
    let ran = case.run();
    let o = ran.outcome();
    assert_eq!(o.exit, Exit::Code(0), "output:\n{}", ran.output);
    assert!(!ran.output.contains("CONNECTED"), "{}", ran.output);
    assert!(
        ran.output.contains("1.1.1.1 ENETUNREACH"),
        "the internet must be unreachable:\n{}",
        ran.output
    );
    assert!(
        ran.output.contains("127.0.0.1 ENETUNREACH"),
        "the host's loopback must be unreachable:\n{}",
        ran.output
    );
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the host listener got a connection from {peer}"),
        Err(e) => panic!("accept: {e}"),
    }
    case.assert_cleaned_up();
}

#[test]
fn allows_the_network_when_the_spec_asks_for_it() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listening");
    let port = listener.local_addr().expect("addr").port();
    let script = format!(
        "const s=require('net').connect({port},'127.0.0.1',()=>{{s.end('from the sandbox')}});\
         s.on('error',e=>{{console.log(e.code);process.exit(1)}})"
    );
    let mut case = Case::new("net", &["/usr/bin/node", "-e", &script]);
    case.spec.network = true;
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = String::new();
        s.read_to_string(&mut got).expect("read");
        got
    });
    let ran = case.run();
    assert_eq!(ran.outcome().exit, Exit::Code(0), "output:\n{}", ran.output);
    assert_eq!(server.join().expect("server"), "from the sandbox");
    case.assert_cleaned_up();
}

#[test]
fn hostile_reading_etc_shadow_refused() {
    let case = Case::new(
        "shadow",
        &sh(
            "cat /etc/shadow; echo \"cat=$?\"; echo ROOT; ls -a /; echo ETC; ls -a /etc; \
             ls /root /var/lib/kiln /home; echo \"ls=$?\"",
        ),
    );
    let ran = case.run();
    assert_eq!(ran.outcome().exit, Exit::Code(0), "output:\n{}", ran.output);
    let out = &ran.output;
    assert!(
        out.contains("/etc/shadow: No such file or directory") && out.contains("cat=1"),
        "{out}"
    );
    assert!(
        out.contains("ls=2"),
        "/root, /var/lib/kiln, /home must not exist:\n{out}"
    );
    let section = |from: &str, to: &str| -> Vec<String> {
        let start = out.find(from).expect("section") + from.len();
        let end = out[start..].find(to).map_or(out.len(), |i| start + i);
        out[start..end]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let root = section("ROOT\n", "ETC\n");
    let allowed_root = [
        ".", "..", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "usr", "etc", "proc", "dev",
        "tmp",
    ];
    for e in &root {
        assert!(
            allowed_root.contains(&e.as_str()),
            "unexpected /{e} in the sandbox: {root:?}"
        );
    }
    let etc = section("ETC\n", "ls:");
    let allowed_etc = [
        ".",
        "..",
        "passwd",
        "group",
        "hosts",
        "hostname",
        "resolv.conf",
        "nsswitch.conf",
        "host.conf",
        "gai.conf",
        "ld.so.cache",
        "localtime",
        "ssl",
        "ca-certificates",
        "alternatives",
    ];
    for e in &etc {
        assert!(
            allowed_etc.contains(&e.as_str()),
            "unexpected /etc/{e}: {etc:?}"
        );
    }
    case.assert_cleaned_up();
}

#[test]
fn hostile_reading_another_projects_dir_refused() {
    let other = tempfile::Builder::new()
        .prefix("kiln-other-project-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let secret = other.path().join("kiln-secret-7f3a.txt");
    std::fs::write(&secret, "the other project's secret").expect("secret");
    chown(other.path(), Some(UID), Some(GID)).expect("chown");
    chown(&secret, Some(UID), Some(GID)).expect("chown");
    let script = format!(
        "cat {0}; ls {1}; find / -path /proc -prune -o -name kiln-secret-7f3a.txt -print; echo done",
        secret.display(),
        other.path().display()
    );
    let case = Case::new("otherproject", &sh(&script));
    let ran = case.run();
    assert_eq!(ran.outcome().exit, Exit::Code(0), "output:\n{}", ran.output);
    assert!(
        !ran.output.contains("secret\n") && !ran.output.contains("the other project"),
        "{}",
        ran.output
    );
    assert!(
        ran.output.contains("No such file or directory"),
        "{}",
        ran.output
    );
    assert!(
        !ran.output.contains("kiln-secret-7f3a.txt\n"),
        "find located the file:\n{}",
        ran.output
    );
    assert!(ran.output.ends_with("done\n"), "{}", ran.output);
    case.assert_cleaned_up();
}

#[test]
fn hostile_writing_outside_the_project_dir_refused() {
    let mut case = Case::new(
        "writes",
        &sh(&format!(
            "for f in /usr/kiln-x-{0} /etc/kiln-x /kiln-x /bin/kiln-x /proc/kiln-x /dev/kiln-x; do \
               if echo x > $f; then echo \"WROTE $f\"; fi; done; \
             echo built > /app/out.txt && echo \"app=$?\"; echo scratch > /tmp/t && echo tmp=ok",
            std::process::id()
        )),
    );
    let app = case.host_dir("app");
    case.spec.mounts.push(Mount::Bind {
        src: app.clone(),
        dst: "/app".into(),
        writable: true,
    });
    case.spec.cwd = "/app".into();
    let ran = case.run();
    assert_eq!(ran.outcome().exit, Exit::Code(0), "output:\n{}", ran.output);
    assert!(!ran.output.contains("WROTE"), "{}", ran.output);
    assert!(
        ran.output.contains("app=0") && ran.output.contains("tmp=ok"),
        "{}",
        ran.output
    );
    assert!(!Path::new(&format!("/usr/kiln-x-{}", std::process::id())).exists());
    let out = app.join("out.txt");
    assert_eq!(
        std::fs::read_to_string(&out).expect("out.txt on the host"),
        "built\n"
    );
    let meta = std::fs::metadata(&out).expect("metadata");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (UID, GID),
        "owner of the file on the host"
    );
    case.assert_cleaned_up();
}

#[test]
fn hostile_writing_through_a_read_only_bind_refused() {
    let mut case = Case::new(
        "robind",
        &sh("cat /src/a.txt; echo y > /src/a.txt || echo refused"),
    );
    let src = case.host_dir("src");
    std::fs::write(src.join("a.txt"), "input\n").expect("write");
    chown(src.join("a.txt"), Some(UID), Some(GID)).expect("chown");
    case.spec.mounts.push(Mount::Bind {
        src: src.clone(),
        dst: "/src".into(),
        writable: false,
    });
    let ran = case.run();
    assert_eq!(ran.outcome().exit, Exit::Code(0), "output:\n{}", ran.output);
    assert!(ran.output.contains("input\n"), "{}", ran.output);
    assert!(
        ran.output.contains("Read-only file system") && ran.output.contains("refused"),
        "{}",
        ran.output
    );
    assert_eq!(
        std::fs::read_to_string(src.join("a.txt")).expect("read"),
        "input\n"
    );
    case.assert_cleaned_up();
}

#[test]
fn hostile_writes_to_an_overlay_lower_dir_contained() {
    let mut case = Case::new(
        "overlay",
        &sh("cat /app/node_modules/pkg/index.js; \
             echo 'module.exports = \"changed\"' > /app/node_modules/pkg/index.js; \
             cat /app/node_modules/pkg/index.js; mkdir /app/node_modules/.vite && echo vite=ok"),
    );
    let original = "module.exports = \"original\"\n";
    let store = case.host_dir("store");
    let lower = case.host_dir("lower");
    let pkg = lower.join("pkg");
    std::fs::create_dir(&pkg).expect("pkg dir");
    chown(&pkg, Some(UID), Some(GID)).expect("chown");
    let stored = store.join("index.js");
    std::fs::write(&stored, original).expect("store file");
    chown(&stored, Some(UID), Some(GID)).expect("chown");
    std::fs::hard_link(&stored, pkg.join("index.js")).expect("hard link");
    let upper = case.host_dir("upper");
    let work = case.host_dir("work");
    case.spec.mounts.push(Mount::Overlay {
        lower: vec![lower.clone()],
        upper: upper.clone(),
        work,
        dst: "/app/node_modules".into(),
    });
    let ran = case.run();
    assert_eq!(ran.outcome().exit, Exit::Code(0), "output:\n{}", ran.output);
    assert_eq!(
        ran.output,
        "module.exports = \"original\"\nmodule.exports = \"changed\"\nvite=ok\n"
    );
    assert_eq!(std::fs::read_to_string(&stored).expect("store"), original);
    assert_eq!(
        std::fs::read_to_string(pkg.join("index.js")).expect("lower"),
        original
    );
    assert_eq!(
        std::fs::metadata(&stored).expect("meta").nlink(),
        2,
        "the hard link holds"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("pkg/index.js")).expect("upper"),
        "module.exports = \"changed\"\n"
    );
    assert!(upper.join(".vite").is_dir());
    case.assert_cleaned_up();
}

#[test]
fn cancel_kills_the_run_and_removes_the_cgroup() {
    let case = Case::new("cancel", &["/bin/sleep", "60"]);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        trigger.cancel();
    });
    let ran = case.run_with(cancel);
    canceller.join().expect("canceller");
    assert_eq!(
        ran.outcome().exit,
        Exit::Cancelled,
        "output:\n{}",
        ran.output
    );
    assert!(
        ran.elapsed < Duration::from_secs(3),
        "cancel took {:?}",
        ran.elapsed
    );
    case.assert_cleaned_up();
}

#[test]
fn hostile_environment_and_process_tree_probe_contained() {
    let mut case = Case::new(
        "env",
        &sh(
            "/usr/bin/env; echo \"pid=$$\"; echo \"host=$(cat /proc/sys/kernel/hostname)\"; \
             ls /proc | grep -c '^[0-9]'",
        ),
    );
    case.spec.env = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("KILN_BUILD".into(), "42".into()),
    ];
    let ran = case.run();
    assert_eq!(ran.outcome().exit, Exit::Code(0), "output:\n{}", ran.output);
    let lines: Vec<&str> = ran.output.lines().collect();
    let env: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("pid=") && !l.starts_with("host="))
        .take_while(|l| l.contains('='))
        .collect();
    let mut env_sorted = env.clone();
    env_sorted.sort();
    // Exactly the spec's variables (sh adds PWD): nothing of the test process (CARGO_*, HOME,
    // USER, tokens...) gets in.
    assert_eq!(
        env_sorted,
        ["KILN_BUILD=42", "PATH=/usr/bin:/bin", "PWD=/tmp"],
        "output:\n{}",
        ran.output
    );
    assert!(
        lines.contains(&"pid=2"),
        "the command is PID 1's child: {}",
        ran.output
    );
    assert!(lines.contains(&"host=kiln-sandbox"), "{}", ran.output);
    // init, sh, ls, grep (and the cat, perhaps, not yet reaped): a handful, not the host's.
    let procs: usize = lines
        .last()
        .and_then(|l| l.parse().ok())
        .expect("process count");
    assert!(procs <= 6, "the sandbox sees {procs} processes");
    case.assert_cleaned_up();
}

#[test]
fn rejects_a_mount_of_a_missing_directory() {
    let mut case = Case::new("badmount", &["/bin/true"]);
    case.spec.mounts.push(Mount::Bind {
        src: case.dir.path().join("does-not-exist"),
        dst: "/app".into(),
        writable: true,
    });
    let ran = case.run();
    match &ran.result {
        Err(SandboxError::Setup(msg)) => {
            assert!(msg.contains("does-not-exist"), "{msg}");
            assert!(
                ran.output.contains("kiln sandbox: bind source"),
                "{}",
                ran.output
            );
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
    case.assert_cleaned_up();
}

#[test]
fn rejects_a_root_sandbox_user_and_escaping_paths() {
    let mut case = Case::new("rootuser", &["/bin/true"]);
    case.spec.uid = 0;
    assert!(
        matches!(case.run().result, Err(SandboxError::Setup(m)) if m.contains("uid 0")),
        "uid 0 must be refused"
    );
    case.spec.uid = UID;
    case.spec.mounts.push(Mount::Tmpfs {
        dst: "/app/../etc".into(),
        size_bytes: MIB,
    });
    assert!(
        matches!(case.run().result, Err(SandboxError::Setup(m)) if m.contains("..")),
        "a destination with .. must be refused"
    );
    case.spec.mounts.clear();
    case.spec.cgroup = "../../escape".into();
    assert!(matches!(case.run().result, Err(SandboxError::Setup(_))));
}

/// The last lines of some output, for assertion messages.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
