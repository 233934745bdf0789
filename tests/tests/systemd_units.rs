//! The systemd units in `systemd/` and the daemons' side of the service protocol.
//!
//! The units are checked by systemd's own tools (`systemd-analyze verify`, and `security
//! --offline` against the scores recorded in systemd/README.md) and for the settings the
//! deployment relies on. The daemons are the real binaries, started the way systemd would start
//! them: `$NOTIFY_SOCKET` is a datagram socket the test binds, `$WATCHDOG_USEC` is set, stop is
//! SIGTERM; and under a stand-in journald socket, their key-values must arrive as journal fields.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::*;

const UNITS: [&str; 3] = [
    "kiln-gitstore.service",
    "kiln-agent.service",
    "kiln-nginx.service",
];

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn require_systemd_analyze() {
    require_tool("systemd-analyze", "apt-get install -y systemd");
}

// ---------------------------------------------------------------------------------------------
// The unit files
// ---------------------------------------------------------------------------------------------

/// `[Service]` (and `[Unit]`) settings of a unit file: key → every value, in order.
fn settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(units_dir().join(unit)).expect("unit file");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{unit}: {line:?}"));
        out.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    out
}

fn one<'a>(s: &'a BTreeMap<String, Vec<String>>, unit: &str, key: &str) -> &'a str {
    match s.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{unit}: expected exactly one {key}=, found {other:?}"),
    }
}

fn seconds(value: &str) -> u64 {
    value
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected a value like `30s`, got {value:?}"))
}

/// A copy of every unit in a temp dir, with the binaries of this build in place of
/// /usr/local/bin, so `verify` checks that the commands exist.
fn units_with_built_binaries() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for unit in UNITS {
        let mut text = std::fs::read_to_string(units_dir().join(unit)).expect("unit file");
        // Longest first: /usr/local/bin/kiln is a prefix of the others.
        for name in ["kiln-gitstore", "kiln-agent", "kiln"] {
            let from = format!("/usr/local/bin/{name} ");
            if text.contains(&from) {
                text = text.replace(&from, &format!("{} ", bin(name).display()));
            }
        }
        assert!(
            !text.contains("/usr/local/bin/"),
            "{unit}: unexpected binary"
        );
        std::fs::write(dir.path().join(unit), text).expect("writing a unit");
    }
    dir
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require_systemd_analyze();
    assert!(
        Path::new("/usr/sbin/nginx").is_file(),
        "kiln-nginx.service runs /usr/sbin/nginx; install it with: apt-get install -y nginx"
    );
    let dir = units_with_built_binaries();
    for unit in UNITS {
        let out = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(unit)));
        // verify exits 0 even for unknown keys and unparsable values; it only prints them.
        assert!(
            out.ok && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
            "systemd-analyze verify {unit}:\n{}{}",
            out.stdout,
            out.stderr
        );
    }
}

#[test]
fn units_have_the_hardening_the_deployment_relies_on() {
    for unit in UNITS {
        let s = settings(unit);
        assert_eq!(one(&s, unit, "EnvironmentFile"), "/etc/kiln/kiln.env");
        assert_eq!(one(&s, unit, "Restart"), "on-failure", "{unit}");
        assert!(seconds(one(&s, unit, "RestartSec")) > 0, "{unit}");
        assert_eq!(one(&s, unit, "KillMode"), "mixed", "{unit}");
        for (k, v) in [
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("SystemCallArchitectures", "native"),
        ] {
            assert_eq!(one(&s, unit, k), v, "{unit}: {k}");
        }
        assert!(
            s["SystemCallFilter"][0].starts_with("@system-service"),
            "{unit}: an allow list based on @system-service"
        );
        assert!(!s.contains_key("DynamicUser"), "{unit}");
    }

    for unit in ["kiln-gitstore.service", "kiln-agent.service"] {
        let s = settings(unit);
        assert_eq!(one(&s, unit, "Type"), "notify", "{unit}");
        assert_eq!(one(&s, unit, "NotifyAccess"), "main", "{unit}");
        assert_eq!(seconds(one(&s, unit, "WatchdogSec")), 30, "{unit}");
    }

    let unit = "kiln-gitstore.service";
    let s = settings(unit);
    assert_eq!(one(&s, unit, "User"), "kiln");
    assert_eq!(one(&s, unit, "StateDirectory"), "kiln-gitstore");
    assert!(one(&s, unit, "Environment").contains("KILN_GITSTORE_DATA=/var/lib/kiln-gitstore"));
    assert_eq!(
        one(&s, unit, "ReadWritePaths"),
        "-/var/lib/kiln-store",
        "writable: the state directory and a blob store on this disk, nothing else"
    );
    assert_eq!(one(&s, unit, "CapabilityBoundingSet"), "");
    assert_eq!(
        one(&s, unit, "RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6"
    );
    assert_eq!(one(&s, unit, "RestrictNamespaces"), "yes");
    assert_eq!(one(&s, unit, "MemoryDenyWriteExecute"), "yes");
    assert_eq!(one(&s, unit, "ProtectControlGroups"), "yes");
    // SIGKILL must not come before the drain the binary allows itself after SIGTERM.
    let help = run(Command::new(bin("kiln-gitstore")).args(["serve", "--help"])).stdout;
    let drain: u64 = help
        .split("--drain-secs")
        .nth(1)
        .and_then(|rest| rest.split("[default: ").nth(1))
        .and_then(|d| d.split(']').next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no --drain-secs default in:\n{help}"));
    assert!(
        seconds(one(&s, unit, "TimeoutStopSec")) > drain,
        "TimeoutStopSec must exceed the drain of {drain} s"
    );

    let unit = "kiln-agent.service";
    let s = settings(unit);
    assert!(!s.contains_key("User"), "the sandbox needs root");
    assert_eq!(one(&s, unit, "Delegate"), "yes");
    assert!(
        one(&s, unit, "Environment")
            .split_whitespace()
            .any(|kv| kv == "KILN_CGROUP_DELEGATED=1"),
        "{unit}: the agent must be told its cgroup is delegated, or builds land outside the unit"
    );
    assert_eq!(one(&s, unit, "OOMPolicy"), "continue");
    assert_eq!(one(&s, unit, "StateDirectory"), "kiln-agent");
    // It writes each project's build state into the store, when that is on this disk too.
    assert_eq!(one(&s, unit, "ReadWritePaths"), "-/var/lib/kiln-store");
    let env = one(&s, unit, "Environment");
    assert!(
        env.contains("KILN_AGENT_STATE=/var/lib/kiln-agent"),
        "{env}"
    );
    assert!(
        env.contains("KILN_PUBLISH_DIR=/var/lib/kiln-agent/www"),
        "{env}"
    );
    // Needed by the sandbox; a unit that takes them away breaks every build.
    for missing in [
        "ProtectControlGroups",
        "ProtectHostname",
        "MemoryDenyWriteExecute",
        "PrivateUsers",
        "ProcSubset",
    ] {
        assert!(!s.contains_key(missing), "{unit}: {missing}= breaks builds");
    }
    let ns = one(&s, unit, "RestrictNamespaces");
    for needed in ["mnt", "pid", "ipc", "uts", "net"] {
        assert!(ns.split(' ').any(|n| n == needed), "{unit}: {ns}");
    }
    assert!(!ns.contains("user") && !ns.contains("cgroup"), "{ns}");
    let caps = one(&s, unit, "CapabilityBoundingSet");
    for cap in ["CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"] {
        assert!(caps.split(' ').any(|c| c == cap), "{unit}: {caps}");
    }
    assert!(seconds(one(&s, unit, "TimeoutStopSec")) >= 90);

    let unit = "kiln-nginx.service";
    let s = settings(unit);
    assert!(s["ExecStartPre"]
        .iter()
        .any(|c| c.ends_with("/usr/local/bin/kiln nginx render --out /etc/kiln/nginx.conf")));
    assert!(one(&s, unit, "ExecStart").starts_with("/usr/sbin/nginx -c /etc/kiln/nginx.conf "));
    assert_eq!(
        one(&s, unit, "KillSignal"),
        "SIGQUIT",
        "nginx's graceful stop"
    );
}

/// The exposure scores systemd/README.md records, by unit.
fn recorded_scores() -> BTreeMap<String, f64> {
    let readme = std::fs::read_to_string(units_dir().join("README.md")).expect("systemd/README.md");
    let mut out = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 3 {
            let unit = cells[1].trim_matches('`');
            if let (true, Ok(score)) = (UNITS.contains(&unit), cells[2].parse::<f64>()) {
                out.insert(unit.to_owned(), score);
            }
        }
    }
    out
}

#[test]
fn security_exposure_is_no_worse_than_recorded() {
    require_systemd_analyze();
    let recorded = recorded_scores();
    for unit in UNITS {
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(units_dir().join(unit)));
        assert!(
            !out.stderr.contains("--offline"),
            "`systemd-analyze security --offline` needs systemd 250 or newer: {}",
            out.stderr
        );
        let measured: f64 = out
            .stdout
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for "))
            .and_then(|(_, rest)| rest.split(": ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no overall exposure for {unit}:\n{out:?}"));
        let Some(&was) = recorded.get(unit) else {
            panic!("systemd/README.md records no score for {unit} (measured {measured})");
        };
        assert!(
            measured <= was,
            "{unit}: exposure {measured} is worse than the {was} recorded in systemd/README.md"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The service protocol, against the real daemons
// ---------------------------------------------------------------------------------------------

/// The service manager's end of `$NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next message, or None after `within`.
    fn next(&self, within: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .expect("read timeout");
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Reads until `want` arrives and returns what came before it; panics after `within`.
    fn wait_for(&self, want: &str, within: Duration, child: &mut Daemon) -> Vec<String> {
        let started = Instant::now();
        let mut before = Vec::new();
        while started.elapsed() < within {
            match self.next(Duration::from_millis(100)) {
                Some(m) if m.lines().any(|l| l == want) => return before,
                Some(m) => before.push(m),
                None => {
                    if let Some(status) = child.try_wait() {
                        panic!(
                            "{} exited ({status}) before sending {want}; got {before:?}\n{}",
                            child.name,
                            child.log()
                        );
                    }
                }
            }
        }
        panic!(
            "no {want} from {} within {within:?}; got {before:?}\n{}",
            child.name,
            child.log()
        );
    }
}

/// A daemon started as systemd would (without systemd): killed on drop if still running.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { name, child, log }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waiting for a daemon")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill -TERM {} failed", self.child.id());
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        while started.elapsed() < within {
            if let Some(status) = self.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} still running {within:?} after SIGTERM\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}\n---", self.name, self.log());
        }
    }
}

/// A `kiln-gitstore serve` command on a fresh file store in `dir`, environment cleared (only
/// what systemd would pass, plus `env`), and its port.
fn gitstore_command(dir: &Path, env: &[(&str, String)], args: &[&str]) -> (Command, u16) {
    let port = free_port();
    let mut cmd = Command::new(bin("kiln-gitstore"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("KILN_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--store")
        .arg(dir.join("store"))
        .arg("--data-dir")
        .arg(dir.join("cache"))
        .args(["--webhook-secret", WEBHOOK_SECRET])
        .args(args);
    (cmd, port)
}

/// Starts gitstore until it reports READY=1, retrying when the picked port was taken meanwhile.
/// Returns the daemon, its port and the messages sent before READY=1.
fn start_gitstore(
    dir: &Path,
    notify: &NotifySocket,
    wrap: impl Fn(Command) -> Command,
    env: &[(&str, String)],
    args: &[&str],
) -> (Daemon, u16, Vec<String>) {
    require_tool("git", "apt-get install -y git");
    let mut env = env.to_vec();
    env.push(("NOTIFY_SOCKET", notify.path.to_string_lossy().into_owned()));
    for _attempt in 0..5 {
        let (cmd, port) = gitstore_command(dir, &env, args);
        let mut daemon = Daemon::spawn("kiln-gitstore", wrap(cmd), dir.join("gitstore.log"));
        let started = Instant::now();
        let mut before = Vec::new();
        while started.elapsed() < Duration::from_secs(20) {
            if let Some(m) = notify.next(Duration::from_millis(100)) {
                if m.lines().any(|l| l == "READY=1") {
                    return (daemon, port, before);
                }
                before.push(m);
            } else if daemon.try_wait().is_some() {
                break;
            }
        }
        let log = daemon.log();
        if !log.contains("Address already in use") {
            panic!("kiln-gitstore sent no READY=1 (got {before:?}):\n{log}");
        }
    }
    panic!("kiln-gitstore could not bind a free port in 5 attempts");
}

fn healthz(port: u16) -> u16 {
    http("GET", &format!("http://127.0.0.1:{port}/healthz"), &[], b"").status
}

/// Receives `n` WATCHDOG=1 pings, failing if any other message comes in between.
fn expect_pings(notify: &NotifySocket, n: usize, within: Duration, daemon: &Daemon) {
    let started = Instant::now();
    for i in 0..n {
        let left = within.saturating_sub(started.elapsed());
        match notify.next(left) {
            Some(m) if m == "WATCHDOG=1" => {}
            other => panic!(
                "ping {i} of {n}: got {other:?} from {}\n{}",
                daemon.name,
                daemon.log()
            ),
        }
    }
}

#[test]
fn gitstore_reports_ready_pings_the_watchdog_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind();
    let (mut gitstore, port, before) = start_gitstore(
        dir.path(),
        &notify,
        |c| c,
        &[("WATCHDOG_USEC", "200000".into())],
        &[],
    );
    // Ready means answering: the listener is bound before READY=1 is sent.
    assert_eq!(healthz(port), 200);
    assert!(before.iter().all(|m| !m.contains("STOPPING")), "{before:?}");
    // Every 100 ms (half of WATCHDOG_USEC); 10 of them within 3 s leaves room for a slow CI.
    expect_pings(&notify, 10, Duration::from_secs(3), &gitstore);

    gitstore.sigterm();
    notify.wait_for("STOPPING=1", Duration::from_secs(5), &mut gitstore);
    let status = gitstore.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", gitstore.log());
}

#[test]
fn gitstore_leaves_a_watchdog_meant_for_another_process_alone() {
    // WATCHDOG_PID names another process: the pings are not ours to send (sd_watchdog_enabled).
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind();
    let (mut gitstore, port, _) = start_gitstore(
        dir.path(),
        &notify,
        |c| c,
        &[
            ("WATCHDOG_USEC", "200000".into()),
            ("WATCHDOG_PID", "1".into()),
        ],
        &[],
    );
    assert_eq!(healthz(port), 200);
    let extra = notify.next(Duration::from_millis(600));
    assert_eq!(extra, None, "unexpected notification");
    gitstore.sigterm();
    assert_eq!(gitstore.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn gitstore_finishes_a_request_in_flight_after_sigterm_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind();
    let (mut gitstore, port, _) = start_gitstore(dir.path(), &notify, |c| c, &[], &[]);
    // A request whose body is still arriving when the stop comes, like a push uploading its pack.
    let body = br#"{"name":"in-flight"}"#;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        conn,
        "POST /api/clients HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.write_all(&body[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    gitstore.sigterm();
    notify.wait_for("STOPPING=1", Duration::from_secs(5), &mut gitstore);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        gitstore.try_wait().is_none(),
        "exited with a request in flight:\n{}",
        gitstore.log()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting connections after SIGTERM"
    );

    conn.write_all(&body[5..]).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("the response");
    // No admin token is configured: the answer is a refusal, but a complete one.
    assert!(
        response.starts_with("HTTP/1.1 "),
        "no response to the request in flight: {response:?}"
    );
    let status = gitstore.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", gitstore.log());
}

#[test]
fn gitstore_gives_up_on_a_stuck_push_after_the_drain_and_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind();
    let marker = dir.path().join("paused");
    let (mut gitstore, port, _) = start_gitstore(
        dir.path(),
        &notify,
        |c| c,
        // The hook stops for an hour between uploading the pack and publishing the manifest.
        &[(
            "KILN_FAULT_INJECT",
            format!("pause-before-manifest:{}", marker.display()),
        )],
        &["--drain-secs", "1"],
    );
    let token = {
        let mut cmd = Command::new(bin("kiln-gitstore"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("create-client")
            .arg("stuck")
            .arg("--store")
            .arg(dir.path().join("store"));
        let out = run(&mut cmd);
        assert!(out.ok, "create-client: {}", out.stderr);
        out.stdout.trim().to_owned()
    };
    let repo = Repo::init(&dir.path().join("app"));
    repo.commit_file("index.html", "<h1>stuck</h1>\n");
    let url = format!("http://kiln:{token}@127.0.0.1:{port}/git/stuck.git");
    let pusher = std::thread::spawn(move || repo.push(&url, &["main"]));
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            !pusher.is_finished(),
            "the push ended before the fault point"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no fault point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let stopping = Instant::now();
    gitstore.sigterm();
    notify.wait_for("STOPPING=1", Duration::from_secs(5), &mut gitstore);
    let status = gitstore.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", gitstore.log());
    assert!(
        stopping.elapsed() >= Duration::from_millis(900),
        "exited before the drain ran out"
    );
    assert!(gitstore.log().contains("requests still in flight"));
    let pushed = pusher.join().unwrap();
    assert!(
        !pushed.ok,
        "git reported success for a push cut off before its manifest"
    );
}

#[test]
fn agent_reports_ready_pings_the_watchdog_and_stops_cleanly_on_sigterm() {
    // Stack installs the fast engine into the shared volume once (the agent would otherwise
    // install it in the background during this test) and checks the tools the agent needs.
    drop(Stack::start());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let notify = NotifySocket::bind();
    let mut agent = None;
    for _attempt in 0..5 {
        let port = free_port();
        let mut cmd = Command::new(bin("kiln-agent"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KILN_LOG", "info")
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "200000")
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--store")
            .arg(dir.path().join("store"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--publish-dir")
            .arg(dir.path().join("www"))
            .arg("--volume-dir")
            .arg(shared_volume())
            .args(["--webhook-secret", WEBHOOK_SECRET])
            .args(["--sandbox-user", SANDBOX_USER]);
        let mut daemon = Daemon::spawn("kiln-agent", cmd, dir.path().join("agent.log"));
        let started = Instant::now();
        let mut ready = false;
        while !ready && started.elapsed() < Duration::from_secs(60) {
            match notify.next(Duration::from_millis(100)) {
                Some(m) => ready = m.lines().any(|l| l == "READY=1"),
                None if daemon.try_wait().is_some() => break,
                None => {}
            }
        }
        if ready {
            agent = Some((daemon, port));
            break;
        }
        assert!(
            daemon.log().contains("Address already in use"),
            "kiln-agent sent no READY=1:\n{}",
            daemon.log()
        );
    }
    let (mut agent, port) = agent.expect("kiln-agent could not bind a free port in 5 attempts");
    let r = http("GET", &format!("http://127.0.0.1:{port}/healthz"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    expect_pings(&notify, 10, Duration::from_secs(3), &agent);

    agent.sigterm();
    notify.wait_for("STOPPING=1", Duration::from_secs(5), &mut agent);
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

// ---------------------------------------------------------------------------------------------
// Journal fields
// ---------------------------------------------------------------------------------------------

/// Fields of one journal native-protocol datagram: `KEY=value\n`, or `KEY\n<u64 LE len><value>\n`.
fn journal_fields(mut d: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[nl + 1..];
        } else {
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            out.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            );
            d = &d[nl + 9 + len + 1..];
        }
    }
    out
}

#[test]
fn under_journald_key_values_become_upper_case_journal_fields() {
    require_tool("unshare", "apt-get install -y util-linux");
    require_tool("mount", "apt-get install -y mount");
    // journald's socket has a fixed path; a private mount namespace puts ours there.
    let journal = tempfile::tempdir().unwrap();
    let socket = UnixDatagram::bind(journal.path().join("socket")).expect("journal socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind();
    let stderr = dir.path().join("gitstore.log");
    let journal_dir = journal.path().to_owned();
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let wrap = |inner: Command| {
        // systemd sets JOURNAL_STREAM to the device and inode of the stream it connects to
        // stderr; the daemon logs natively only when they match its stderr (the log file here).
        let meta = std::fs::File::create(&stderr)
            .and_then(|f| f.metadata())
            .unwrap();
        let mut cmd = Command::new("unshare");
        if !root {
            cmd.args(["--user", "--map-root-user"]);
        }
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
                 mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
            )
            .arg(&journal_dir)
            .arg(inner.get_program())
            .args(inner.get_args())
            .env_clear()
            .envs(
                inner
                    .get_envs()
                    .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
            )
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        cmd
    };
    let (mut gitstore, port, _) = start_gitstore(dir.path(), &notify, wrap, &[], &[]);
    // Daemon::spawn truncated the log file that the inode above names; it is still the same file.
    assert_eq!(healthz(port), 200);

    let started = Instant::now();
    let mut seen = Vec::new();
    let fields = loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no journal entry for GET /healthz; entries: {seen:#?}\nstderr:\n{}",
            gitstore.log()
        );
        let mut buf = vec![0u8; 64 << 10];
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let f = journal_fields(&buf[..n]);
        if f.get("PATH").map(String::as_str) == Some("/healthz") {
            break f;
        }
        seen.push(f);
    };
    assert_eq!(fields["MESSAGE"], "request");
    assert_eq!(fields["METHOD"], "GET");
    assert_eq!(fields["STATUS"], "200");
    assert!(fields["MS"].parse::<u64>().is_ok(), "{fields:?}");
    assert_eq!(fields["SYSLOG_IDENTIFIER"], "kiln-gitstore");
    assert_eq!(fields["PRIORITY"], "5", "info is journald's notice");
    // Native entries replace the stderr lines, which journald would otherwise store twice.
    assert!(
        !gitstore.log().contains("path=/healthz"),
        "{}",
        gitstore.log()
    );

    gitstore.sigterm();
    assert_eq!(gitstore.wait_exit(Duration::from_secs(10)).code(), Some(0));
}
