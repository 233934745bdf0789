//! Load benchmark (issue 7): previews per second from nginx, concurrent pushes, and a burst of
//! projects pushed at once, each against a baseline measured in the same run where one exists.
//!
//! Run with `cargo bench -p kiln-tests --bench load`. Everything is real: release builds of
//! gitstore, the agent and `kiln` (unless `KILN_BIN_DIR` names a directory), nginx with the
//! configuration `kiln nginx render` makes, stock `git`, the build sandbox, pnpm and Vite from the
//! harness's shared volume (warm after the first test run; a cold volume downloads packages once).
//!
//! 1. **Previews**: the `vite-react-ts` fixture is built once and served by nginx with Kiln's
//!    rendered configuration (production defaults: access log off, view reports to the agent).
//!    A load generator written here (a thread per connection, HTTP/1.1 keep-alive over std
//!    `TcpStream`, `Accept-Encoding: gzip` like a browser) requests the preview's `index.html`
//!    and its largest hashed asset for `KILN_LOAD_SECS` per point, at each connection count in
//!    `KILN_LOAD_CONNECTIONS`. Baseline: the same load against a second nginx serving the same
//!    build directory from a minimal static `root` configuration (same worker count, same
//!    `gzip_static`, access log off), so the ratio is the cost of Kiln's routing, headers and
//!    view reports. For `index.html`, a third nginx runs Kiln's configuration without the view
//!    reports (a diagnostic row: what the reports cost). All run at once; the order rotates per
//!    point.
//! 2. **Concurrent pushes** to a gitstore without an agent (the baseline has none either):
//!    (a) `KILN_LOAD_PUSHERS` clients each making `KILN_LOAD_PUSHES` one-file commits to ONE
//!    project at once, each pushing `main` and, when rejected, `git pull --rebase` and pushing
//!    again, as a real client does; (b) the same clients spread over `KILN_LOAD_PROJECTS`
//!    projects, `KILN_LOAD_ROUNDS` one-file pushes to each. Afterwards a fresh clone of every
//!    project must reach every commit a push acknowledged, each commit exactly once. Baseline:
//!    stock `git http-backend` (one CGI process per request, as `kiln-gitstore`'s push benchmark
//!    does) behind a bridge written here, with the same clients.
//! 3. **A burst**: `KILN_LOAD_SITES` projects (`KILN_LOAD_APP`: the `vite-react-ts` fixture, or
//!    `static` sites), one per client (tenant), pushed at once to a stack at the agent's default
//!    concurrency and memory. Reports the time until all are ready, each project's push to
//!    ready, `kiln_agent_queue_depth` sampled from `/metrics` every 250 ms, the most builds
//!    running at once (from the statuses' start and end times) and, per build, the peak memory
//!    and CPU time against the sandbox's limits. Baseline: the same builds back to back (the sum
//!    of their own durations over the concurrency), so the ratio is what queueing adds. Then
//!    `KILN_LOAD_ONE_CLIENT` static sites of a single client, where the per-client quota of
//!    concurrent builds (default: the concurrency) refuses builds instead of queueing them, and
//!    the agent must start each refused one when a slot frees.
//!
//! Sizes come from the environment (defaults in parentheses): `KILN_LOAD_SECS` (4),
//! `KILN_LOAD_CONNECTIONS` (8,32,64), `KILN_LOAD_PUSHERS` (8), `KILN_LOAD_PUSHES` (5),
//! `KILN_LOAD_PROJECTS` (100), `KILN_LOAD_ROUNDS` (2), `KILN_LOAD_SITES` (50), `KILN_LOAD_APP`
//! (vite), `KILN_LOAD_ONE_CLIENT` (50); a part whose counts are 0 is skipped. The defaults take
//! 4 to 6 minutes after the release build on a 2-core machine, most of it the burst's 50 Vite
//! builds at concurrency 1.
//!
//! The load generator shares the machine's cores with nginx (and, for `index.html`, with the
//! agent receiving view reports): requests per second are a floor for what nginx alone could do.
//! The run exits non-zero only when something fails outright (a server, a build, a push that
//! never lands); lost commits, errors and builds over their limits are reported in the table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_tests::bench::{self, percentile, progress};
use kiln_tests::{
    bin, fixture_app, free_port, git, http, nginx_bin, run, vite_app, Gitstore, Repo, Stack,
};

/// How long a build may take before the run fails; the first one installs packages.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Attempts a client makes at one commit before it gives up (and the table says so).
const MAX_ATTEMPTS: usize = 60;
/// How often the burst samples the agent's queue depth.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The run's sizes, from the environment so a quick look and a careful run use one program.
struct Knobs {
    secs: f64,
    connections: Vec<usize>,
    pushers: usize,
    pushes: usize,
    projects: usize,
    rounds: usize,
    sites: usize,
    vite: bool,
    one_client: usize,
}

impl Knobs {
    fn from_env() -> Self {
        let num = |name: &str, default: usize| -> usize {
            std::env::var(name).map_or(default, |v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
            })
        };
        let connections = std::env::var("KILN_LOAD_CONNECTIONS")
            .unwrap_or_else(|_| "8,32,64".into())
            .split(',')
            .map(|c| {
                c.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("KILN_LOAD_CONNECTIONS: {c:?} is not a number"))
            })
            .collect();
        let secs = std::env::var("KILN_LOAD_SECS").map_or(4.0, |v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("KILN_LOAD_SECS={v:?} is not a number"))
        });
        let app = std::env::var("KILN_LOAD_APP").unwrap_or_else(|_| "vite".into());
        assert!(
            app == "vite" || app == "static",
            "KILN_LOAD_APP={app:?}: use vite or static"
        );
        Self {
            secs,
            connections,
            pushers: num("KILN_LOAD_PUSHERS", 8).max(1),
            pushes: num("KILN_LOAD_PUSHES", 5),
            projects: num("KILN_LOAD_PROJECTS", 100),
            rounds: num("KILN_LOAD_ROUNDS", 2),
            sites: num("KILN_LOAD_SITES", 50),
            vite: app == "vite",
            one_client: num("KILN_LOAD_ONE_CLIENT", 50),
        }
    }
}

fn main() {
    let bins = bench::release_binaries();
    let knobs = Knobs::from_env();
    let tmp = tempfile::Builder::new()
        .prefix("kiln-bench-load-")
        .tempdir()
        .expect("temp dir");
    println!(
        "Kiln load benchmark (issue 7): binaries {bins}; {} cores; load average {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average()
    );
    let mut table = Table::default();
    if !knobs.connections.is_empty() && knobs.secs > 0.0 {
        previews(&knobs, &tmp.path().join("previews"), &mut table);
    }
    if knobs.pushes > 0 || knobs.rounds > 0 {
        pushes(&knobs, &tmp.path().join("pushes"), &mut table);
    }
    if knobs.sites > 0 || knobs.one_client > 0 {
        burst(&knobs, &tmp.path().join("burst"), &mut table);
    }
    print!("{}", table.render());
    println!(
        "run took {:.0?}; load average at the end {}",
        bench::elapsed(),
        load_average()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Previews from nginx
// ---------------------------------------------------------------------------------------------

fn previews(knobs: &Knobs, dir: &Path, table: &mut Table) {
    let port = free_port();
    let preview = format!("http://127.0.0.1:{port}/preview");
    let stack = Stack::start_with(&["--preview-url", &preview]);
    progress("previews: building the vite-react-ts fixture once");
    let app = fixture_app(&dir.join("app"));
    stack.push(&app, "site");
    let st = stack.wait_settled("site", &app.head(), BUILD_TIMEOUT);
    assert_eq!(st["state"], "ready", "the fixture did not build: {st:#}");
    let build = std::fs::canonicalize(stack.publish_dir().join("site/current"))
        .expect("the published build");
    let asset = largest_asset(&build.join("assets"));

    let gitstore = stack
        .gitstore
        .base_url()
        .trim_start_matches("http://")
        .to_owned();
    let agent = format!("127.0.0.1:{}", stack.agent_port);
    let render = [
        "--preview-url",
        &preview,
        "--agent-listen",
        &agent,
        "--gitstore-listen",
        &gitstore,
    ];
    let kiln = Front::kiln(
        port,
        &stack.publish_dir(),
        &render,
        true,
        &dir.join("nginx-kiln"),
    );
    let quiet = Front::kiln(
        free_port(),
        &stack.publish_dir(),
        &render,
        false,
        &dir.join("nginx-quiet"),
    );
    let plain = Front::plain(free_port(), &build, kiln.user(), &dir.join("nginx-plain"));
    let files = [
        (
            "index.html".to_owned(),
            "/preview/site/".to_owned(),
            "/".to_owned(),
        ),
        (
            format!("hashed asset ({asset})"),
            format!("/preview/site/assets/{asset}"),
            format!("/assets/{asset}"),
        ),
    ];
    // Both must send the same bytes, or the comparison is of two different answers.
    let mut sizes = Vec::new();
    for (what, k, p) in &files {
        let a = probe(kiln.port, k);
        let b = probe(plain.port, p);
        assert_eq!(
            a.status, 200,
            "Kiln's nginx answered {what} with:\n{}",
            a.head
        );
        assert_eq!(
            b.status, 200,
            "the plain nginx answered {what} with:\n{}",
            b.head
        );
        assert_eq!(
            a.body_len, b.body_len,
            "{what}: Kiln sends {} bytes, the plain nginx {}\n{}\n{}",
            a.body_len, b.body_len, a.head, b.head
        );
        sizes.push(a.body_len);
        if k.contains("/assets/") {
            assert!(
                a.header("cache-control")
                    .is_some_and(|c| c.contains("immutable")),
                "Kiln does not serve {asset} as a hashed (immutable) asset:\n{}",
                a.head
            );
        }
    }
    table.note(format!(
        "previews: gzip bodies of {} B (index.html) and {} B (asset); {}-second runs; the load \
         generator's threads run on the same cores as nginx's {} workers",
        sizes[0],
        sizes[1],
        knobs.secs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));

    progress("previews: warming both servers up");
    for (_, k, p) in &files {
        let secs = Duration::from_millis(500);
        for (port, path) in [(kiln.port, k), (plain.port, p), (quiet.port, k)] {
            load(port, path, 8, secs, usize::MAX);
        }
    }
    let views_before = metric(&stack.agent_url(), "kiln_agent_preview_views_total");
    let mut index_requests = 0;
    let secs = Duration::from_secs_f64(knobs.secs);
    for (i, &conns) in knobs.connections.iter().enumerate() {
        for ((what, k, p), &size) in files.iter().zip(&sizes) {
            progress(&format!("previews: {what}, {conns} connections"));
            // Page views are the only requests that report to the agent: only they get the
            // diagnostic run without the reports.
            let mut targets = vec![(0, kiln.port, k), (1, plain.port, p)];
            if what == "index.html" {
                targets.push((2, quiet.port, k));
            }
            // Rotated per point, so drifting machine load does not always fall on one server.
            let rot = i % targets.len();
            targets.rotate_left(rot);
            let mut runs: Vec<(usize, LoadRun)> = targets
                .into_iter()
                .map(|(who, port, path)| (who, load(port, path, conns, secs, size)))
                .collect();
            runs.sort_by_key(|(who, _)| *who);
            let (a, b) = (&runs[0].1, &runs[1].1);
            if what == "index.html" {
                index_requests += a.ok;
            }
            let base = "same files, a minimal nginx `root` config";
            table.row(
                &format!("previews: {what}, {conns} keep-alive connections: requests/s"),
                thousands(a.rps),
                base,
                thousands(b.rps),
                format!("{:.2}x", a.rps / b.rps),
            );
            table.row(
                "  latency p50 / p99",
                format!("{:.2} / {:.2} ms", a.p(0.5), a.p(0.99)),
                "",
                format!("{:.2} / {:.2} ms", b.p(0.5), b.p(0.99)),
                format!(
                    "{:.2}x / {:.2}x",
                    a.p(0.5) / b.p(0.5),
                    a.p(0.99) / b.p(0.99)
                ),
            );
            if let Some((_, q)) = runs.get(2) {
                table.row(
                    "  (diagnostic) Kiln's config without its view reports: requests/s, p99",
                    format!("{}, {:.2} ms", thousands(q.rps), q.p(0.99)),
                    "the same baseline",
                    String::new(),
                    format!("{:.2}x", q.rps / b.rps),
                );
            }
            for (who, r) in &runs {
                if r.errors > 0 {
                    let who = ["Kiln's", "the plain", "the view-less Kiln"][*who];
                    table.note(format!(
                        "previews: {what}, {conns} connections: {} of {} requests to {who} \
                         nginx failed or got another answer",
                        r.errors,
                        r.errors + r.ok
                    ));
                }
            }
        }
    }
    // Reports are fire-and-forget UDP: under load some may be dropped, which only matters for
    // idle-first eviction, but the table should say so.
    std::thread::sleep(Duration::from_millis(500));
    let views = metric(&stack.agent_url(), "kiln_agent_preview_views_total") - views_before;
    table.note(format!(
        "previews: the agent counted {views:.0} view reports for {index_requests} timed \
         index.html requests served by Kiln's nginx ({:.1}%)",
        100.0 * views / index_requests.max(1) as f64
    ));
    for (who, front) in [
        ("Kiln's", &kiln),
        ("the plain", &plain),
        ("the view-less Kiln", &quiet),
    ] {
        let errors = front.error_log();
        if !errors.trim().is_empty() {
            table.note(format!(
                "previews: {who} nginx logged errors: {}",
                tail(&errors, 3).replace('\n', " | ")
            ));
        }
    }
}

/// The largest `.js` file in a Vite build's `assets/`: the app's bundle.
fn largest_asset(assets: &Path) -> String {
    std::fs::read_dir(assets)
        .expect("the build's assets/")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "js"))
        .max_by_key(|e| e.metadata().map_or(0, |m| m.len()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("a .js asset in the build")
}

/// A running nginx (master and workers in their own process group, killed on drop).
struct Front {
    child: Child,
    port: u16,
    conf: String,
    dir: PathBuf,
}

impl Front {
    /// nginx with the configuration `kiln nginx render` makes with `args`.
    /// Without `views`, the lines that report page views to the agent are left out, to show
    /// what they cost.
    fn kiln(port: u16, publish: &Path, args: &[&str], views: bool, dir: &Path) -> Self {
        let runtime = Self::dirs(dir);
        let conf = dir.join("nginx.conf");
        let mut cmd = Command::new(bin("kiln"));
        clear_kiln_env(&mut cmd);
        let out = run(cmd
            .args(["nginx", "render", "--out"])
            .arg(&conf)
            .args(["--http-listen", &format!("127.0.0.1:{port}")])
            .arg("--publish-dir")
            .arg(publish)
            .arg("--runtime-dir")
            .arg(&runtime)
            .arg("--error-log")
            .arg(dir.join("error.log"))
            .args(["--access-log", "off"])
            .args(args));
        assert!(out.ok, "kiln nginx render failed:\n{}", out.stderr);
        if !views {
            let text = std::fs::read_to_string(&conf).expect("rendered nginx.conf");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("syslog:server="))
                .collect();
            assert!(
                kept.len() < text.lines().count(),
                "the rendered nginx.conf reports no views"
            );
            std::fs::write(&conf, kept.join("\n")).expect("writing nginx.conf");
        }
        Self::start(port, &conf, dir)
    }

    /// nginx serving `root` as a plain static site, as anyone would configure it, with what
    /// makes the comparison fair taken from Kiln's: workers, their user, precompressed files.
    fn plain(port: u16, root: &Path, user: Option<&str>, dir: &Path) -> Self {
        let runtime = Self::dirs(dir);
        let conf = dir.join("nginx.conf");
        let mut text = String::new();
        if let Some(u) = user {
            let _ = writeln!(text, "user {u};");
        }
        let _ = write!(
            text,
            r#"worker_processes auto;
pid "{run}/nginx.pid";
error_log {dir}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    client_body_temp_path "{run}/client_body";
    proxy_temp_path "{run}/proxy";
    fastcgi_temp_path "{run}/fastcgi";
    uwsgi_temp_path "{run}/uwsgi";
    scgi_temp_path "{run}/scgi";
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65s;
    types {{
        text/html html;
        text/css css;
        text/javascript js;
        image/svg+xml svg;
    }}
    default_type application/octet-stream;
    gzip_static on;
    server {{
        listen 127.0.0.1:{port};
        root "{root}";
    }}
}}
"#,
            run = runtime.display(),
            dir = dir.display(),
            root = root.display(),
        );
        std::fs::write(&conf, text).expect("writing nginx.conf");
        Self::start(port, &conf, dir)
    }

    /// `dir` and `dir/run`, traversable by workers that drop to www-data.
    fn dirs(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let runtime = dir.join("run");
        std::fs::create_dir_all(&runtime).expect("nginx dirs");
        for d in [dir, runtime.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .expect("chmod nginx dirs");
        }
        runtime
    }

    fn start(port: u16, conf: &Path, dir: &Path) -> Self {
        let log = std::fs::File::create(dir.join("nginx.out")).expect("log file");
        let child = Command::new(nginx_bin())
            .arg("-c")
            .arg(conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("starting nginx");
        let mut front = Self {
            child,
            port,
            conf: std::fs::read_to_string(conf).expect("nginx.conf"),
            dir: dir.to_owned(),
        };
        // Ours once our master wrote its pid (after binding) and a request got an answer.
        let pid_file = dir.join("run/nginx.pid");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = front.child.try_wait() {
                panic!(
                    "nginx exited ({status}):\n{}\n{}",
                    std::fs::read_to_string(dir.join("nginx.out")).unwrap_or_default(),
                    front.error_log()
                );
            }
            let ours = std::fs::read_to_string(&pid_file)
                .is_ok_and(|p| p.trim() == front.child.id().to_string());
            if ours
                && Conn::open(port)
                    .and_then(|mut c| c.get(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
                    .is_ok()
            {
                return front;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not answer on 127.0.0.1:{port} within 10 s:\n{}",
                front.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `user` of the workers, as Kiln's configuration sets it.
    fn user(&self) -> Option<&str> {
        self.conf
            .lines()
            .find_map(|l| l.trim().strip_prefix("user "))
            .map(|u| u.trim_end_matches(';').trim())
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // procps `kill -9 -PID` takes the PID for an option and signals nothing.
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.wait();
    }
}

/// Removes the `KILN_*` settings of whoever runs the benchmark, which `kiln nginx render` would
/// otherwise read for every option not given here.
fn clear_kiln_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KILN_") {
            cmd.env_remove(k);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator: HTTP/1.1 keep-alive over std TcpStream
// ---------------------------------------------------------------------------------------------

/// One keep-alive connection. Responses are read by Content-Length (nginx sends one for static
/// files), the body discarded as it arrives.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    scratch: Box<[u8]>,
}

/// A response's status, head and body length.
struct Reply {
    status: u16,
    head: String,
    body_len: usize,
    close: bool,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

impl Conn {
    fn open(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
            scratch: vec![0; 64 << 10].into_boxed_slice(),
        })
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let n = self.stream.read(&mut self.scratch)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(n)
    }

    /// Sends `request` and reads the whole response.
    fn get(&mut self, request: &[u8]) -> std::io::Result<Reply> {
        self.stream.write_all(request)?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.fill()?;
            self.buf.extend_from_slice(&self.scratch[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut reply = Reply {
            status,
            head,
            body_len: 0,
            close: false,
        };
        reply.body_len = match reply.header("content-length") {
            Some(v) => v.parse().map_err(|_| bad("bad Content-Length"))?,
            None => 0,
        };
        reply.close = reply
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut have = self.buf.len() - head_end;
        while have < reply.body_len {
            have += self.fill()?;
        }
        Ok(reply)
    }
}

/// One request on a new connection, as a browser would send it.
fn probe(port: u16, path: &str) -> Reply {
    Conn::open(port)
        .and_then(|mut c| c.get(request(port, path).as_bytes()))
        .unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

fn request(port: u16, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kiln-load\r\n\
         Accept: */*\r\nAccept-Encoding: gzip\r\n\r\n"
    )
}

struct LoadRun {
    ok: u64,
    errors: u64,
    rps: f64,
    latency_ms: Vec<f64>,
}

impl LoadRun {
    fn p(&self, p: f64) -> f64 {
        pct(&self.latency_ms, p)
    }
}

/// `conns` connections requesting `path` back to back for `secs`; an answer counts when it is a
/// 200 of `expect_len` bytes (`usize::MAX`: any 200).
fn load(port: u16, path: &str, conns: usize, secs: Duration, expect_len: usize) -> LoadRun {
    let req = request(port, path).into_bytes();
    let barrier = Barrier::new(conns + 1);
    let (started, results) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                let (req, barrier) = (&req, &barrier);
                s.spawn(move || {
                    let mut conn = Conn::open(port).expect("connecting to nginx");
                    let mut lat = Vec::with_capacity(64 << 10);
                    let mut errors = 0u64;
                    barrier.wait();
                    let deadline = Instant::now() + secs;
                    loop {
                        let t = Instant::now();
                        if t >= deadline {
                            break;
                        }
                        match conn.get(req) {
                            Ok(r) => {
                                let good = r.status == 200
                                    && (expect_len == usize::MAX || r.body_len == expect_len);
                                if good {
                                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                                } else {
                                    errors += 1;
                                }
                                // nginx closes a connection after keepalive_requests (1000):
                                // reconnecting is part of the cost, for both servers alike.
                                if r.close {
                                    conn = reconnect(port);
                                }
                            }
                            Err(_) => {
                                errors += 1;
                                conn = reconnect(port);
                            }
                        }
                    }
                    (lat, errors, Instant::now())
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("load thread"))
            .collect();
        (started, results)
    });
    let end = results.iter().map(|(_, _, e)| *e).max().unwrap_or(started);
    let mut latency_ms = Vec::new();
    let mut errors = 0;
    for (lat, e, _) in results {
        latency_ms.extend(lat);
        errors += e;
    }
    let ok = latency_ms.len() as u64;
    LoadRun {
        ok,
        errors,
        rps: ok as f64 / (end - started).as_secs_f64(),
        latency_ms,
    }
}

fn reconnect(port: u16) -> Conn {
    let started = Instant::now();
    loop {
        match Conn::open(port) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "cannot reconnect to port {port}: {e}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrent pushes
// ---------------------------------------------------------------------------------------------

/// Where the clients push: Kiln's gitstore, or `git http-backend` behind the bridge.
enum Remote {
    Kiln { node: Gitstore, token: String },
    Plain(Bridge),
}

impl Remote {
    fn url(&self, project: &str) -> String {
        match self {
            Self::Kiln { node, token } => node.git_url(token, project),
            Self::Plain(b) => format!("http://bench:secret@127.0.0.1:{}/{project}.git", b.port),
        }
    }

    /// Makes `project` exist: Kiln creates it on the first push, http-backend needs a repo.
    fn create(&self, project: &str) {
        if let Self::Plain(b) = self {
            b.create(project);
        }
    }
}

#[derive(Default)]
struct PushRun {
    wall_s: f64,
    acked: usize,
    /// From the first attempt at a commit until a push of it was acknowledged.
    latency_ms: Vec<f64>,
    /// Every `git push` process, acknowledged or rejected.
    attempt_ms: Vec<f64>,
    /// Why attempts were rejected, with counts, and what the server said the first time.
    rejections: BTreeMap<String, usize>,
    said: BTreeMap<String, String>,
    gave_up: usize,
    /// Acknowledged commits a fresh clone does not reach, and commits it holds twice.
    missing: Vec<String>,
    duplicated: usize,
}

impl PushRun {
    fn pushes_per_sec(&self) -> f64 {
        self.acked as f64 / self.wall_s
    }

    fn attempts(&self) -> usize {
        self.attempt_ms.len()
    }
}

fn pushes(knobs: &Knobs, dir: &Path, table: &mut Table) {
    progress("pushes: starting gitstore (no agent) and the git http-backend baseline");
    let node = Gitstore::start();
    let token = node.create_client("load");
    let kiln = Remote::Kiln { node, token };
    let plain = Remote::Plain(Bridge::start(&dir.join("plain-root")));
    let seed = vite_app(&dir.join("seed"), "load");
    let base = "plain `git http-backend` (CGI), same clients";
    let k = knobs.pushers;

    if knobs.pushes > 0 {
        let runs: Vec<(&str, PushRun)> = [("kiln", &kiln), ("plain", &plain)]
            .into_iter()
            .map(|(who, remote)| {
                progress(&format!(
                    "pushes: {k} clients x {} commits to one project ({who})",
                    knobs.pushes
                ));
                (
                    who,
                    one_project(
                        remote,
                        &seed,
                        &dir.join(format!("one-{who}")),
                        k,
                        knobs.pushes,
                    ),
                )
            })
            .collect();
        push_rows(
            table,
            &format!(
                "{k} clients pushing to one project ({} commits, `pull --rebase` on rejection)",
                k * knobs.pushes
            ),
            &runs[0].1,
            base,
            &runs[1].1,
        );
    }
    if knobs.rounds > 0 && knobs.projects > 0 {
        // The baseline goes first here, so drifting machine load does not always fall on Kiln.
        let mut runs: Vec<(&str, PushRun)> = [("plain", &plain), ("kiln", &kiln)]
            .into_iter()
            .map(|(who, remote)| {
                progress(&format!(
                    "pushes: {k} clients, {} projects x {} rounds ({who})",
                    knobs.projects, knobs.rounds
                ));
                (
                    who,
                    many_projects(
                        remote,
                        &seed,
                        &dir.join(format!("many-{who}")),
                        k,
                        knobs.projects,
                        knobs.rounds,
                    ),
                )
            })
            .collect();
        runs.reverse();
        push_rows(
            table,
            &format!(
                "{k} clients pushing to {} projects ({} one-file pushes)",
                knobs.projects,
                knobs.projects * knobs.rounds
            ),
            &runs[0].1,
            base,
            &runs[1].1,
        );
    }
}

fn push_rows(table: &mut Table, what: &str, kiln: &PushRun, base: &str, plain: &PushRun) {
    table.row(
        &format!("{what}: acknowledged pushes/s"),
        format!("{:.1}", kiln.pushes_per_sec()),
        base,
        format!("{:.1}", plain.pushes_per_sec()),
        format!("{:.2}x", kiln.pushes_per_sec() / plain.pushes_per_sec()),
    );
    let p = |r: &PushRun, q: f64| pct(&r.latency_ms, q);
    table.row(
        "  until acknowledged (retries included), p50 / p99",
        format!("{:.0} / {:.0} ms", p(kiln, 0.5), p(kiln, 0.99)),
        "",
        format!("{:.0} / {:.0} ms", p(plain, 0.5), p(plain, 0.99)),
        format!(
            "{:.2}x / {:.2}x",
            p(kiln, 0.5) / p(plain, 0.5),
            p(kiln, 0.99) / p(plain, 0.99)
        ),
    );
    let a = |r: &PushRun, q: f64| pct(&r.attempt_ms, q);
    table.row(
        "  one `git push` process, p50 / p99",
        format!("{:.0} / {:.0} ms", a(kiln, 0.5), a(kiln, 0.99)),
        "",
        format!("{:.0} / {:.0} ms", a(plain, 0.5), a(plain, 0.99)),
        format!(
            "{:.2}x / {:.2}x",
            a(kiln, 0.5) / a(plain, 0.5),
            a(kiln, 0.99) / a(plain, 0.99)
        ),
    );
    let attempts = |r: &PushRun| r.attempts() as f64 / r.acked.max(1) as f64;
    table.row(
        "  attempts per acknowledged push",
        format!("{:.2}", attempts(kiln)),
        "",
        format!("{:.2}", attempts(plain)),
        format!("{:.2}x", attempts(kiln) / attempts(plain)),
    );
    let lost = |r: &PushRun| {
        format!(
            "{} lost of {}, {} twice, {} gave up",
            r.missing.len(),
            r.acked,
            r.duplicated,
            r.gave_up
        )
    };
    table.row(
        "  acknowledged commits a fresh clone lacks",
        lost(kiln),
        "",
        lost(plain),
        String::new(),
    );
    for (who, r) in [("Kiln", kiln), ("http-backend", plain)] {
        if !r.rejections.is_empty() {
            let why: Vec<String> = r
                .rejections
                .iter()
                .map(|(k, n)| format!("{n}x {k}"))
                .collect();
            table.note(format!(
                "{what}: {who} rejected attempts: {}",
                why.join("; ")
            ));
            for (kind, said) in &r.said {
                if !said.is_empty() {
                    table.note(format!("{what}: {who}, {kind}, said: {said:?}"));
                }
            }
        }
        if !r.missing.is_empty() {
            table.note(format!(
                "{what}: {who} LOST acknowledged commits: {}",
                r.missing.join(" ")
            ));
        }
    }
}

/// `clients` clones of one project each pushing `pushes` commits of their own file at once.
fn one_project(remote: &Remote, seed: &Repo, dir: &Path, clients: usize, pushes: usize) -> PushRun {
    remote.create("one");
    let url = remote.url("one");
    let out = seed.push(&url, &["main"]);
    assert!(out.ok, "seeding {url}: {}", out.stderr);
    let repos: Vec<Repo> = (0..clients)
        .map(|c| Repo::clone(&url, &dir.join(format!("c{c}"))))
        .collect();
    let run = Mutex::new(PushRun::default());
    let acked: Mutex<Vec<String>> = Mutex::default();
    let barrier = Barrier::new(clients);
    let started = Instant::now();
    std::thread::scope(|s| {
        for (c, repo) in repos.iter().enumerate() {
            let (url, run, acked, barrier) = (&url, &run, &acked, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..pushes {
                    let msg = format!("client {c} commit {i}");
                    repo.write(&format!("load/c{c}/n{i}.txt"), &msg);
                    repo.git_ok(&["add", "-A"]);
                    repo.git_ok(&["commit", "-q", "-m", &msg]);
                    if let Some(head) = push_until_acked(repo, url, run) {
                        acked.lock().expect("acked").push(head);
                    }
                }
            });
        }
    });
    let mut run = run.into_inner().expect("push run");
    run.wall_s = started.elapsed().as_secs_f64();
    let acked = acked.into_inner().expect("acked");
    run.acked = acked.len();
    let expected: Vec<String> = (0..clients)
        .flat_map(|c| (0..pushes).map(move |i| format!("client {c} commit {i}")))
        .collect();
    verify(&url, &dir.join("verify"), &acked, &expected, &mut run);
    run
}

/// `git push url main` until acknowledged, with `git pull --rebase` after each rejection;
/// records every attempt in `run`. Returns the acknowledged commit.
fn push_until_acked(repo: &Repo, url: &str, run: &Mutex<PushRun>) -> Option<String> {
    let first = Instant::now();
    for _ in 0..MAX_ATTEMPTS {
        let t = Instant::now();
        let out = repo.push(url, &["main"]);
        let attempt = ms(t.elapsed());
        if out.ok {
            let head = repo.head();
            let mut r = run.lock().expect("push run");
            r.attempt_ms.push(attempt);
            r.latency_ms.push(ms(first.elapsed()));
            return Some(head);
        }
        {
            let mut r = run.lock().expect("push run");
            r.attempt_ms.push(attempt);
            let why = rejection(&out.stderr);
            *r.rejections.entry(why.clone()).or_default() += 1;
            r.said.entry(why).or_insert_with(|| {
                let remote: Vec<&str> = out
                    .stderr
                    .lines()
                    .filter_map(|l| l.strip_prefix("remote:"))
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect();
                remote.join(" / ").chars().take(240).collect()
            });
        }
        let pull = repo.git(&["pull", "-q", "--rebase", url, "main"]);
        if !pull.ok {
            let mut r = run.lock().expect("push run");
            *r.rejections
                .entry(format!("pull failed: {}", first_line(&pull.stderr)))
                .or_default() += 1;
        }
    }
    run.lock().expect("push run").gave_up += 1;
    None
}

/// Why git refused a push, in a few words: the reason the server gave, or git's own.
fn rejection(stderr: &str) -> String {
    if let Some(line) = stderr.lines().find(|l| l.contains("[remote rejected]")) {
        let why = line
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or(line.trim(), |(w, _)| w);
        return format!("remote rejected ({why})");
    }
    if stderr.contains("fetch first") || stderr.contains("non-fast-forward") {
        return "non-fast-forward (client saw the new head)".into();
    }
    first_line(stderr)
}

fn first_line(text: &str) -> String {
    let l = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)");
    l.chars().take(100).collect()
}

/// `clients` threads, each owning every `clients`-th of `projects` projects, pushing a one-file
/// commit to each of theirs in turn, `rounds` times.
fn many_projects(
    remote: &Remote,
    seed: &Repo,
    dir: &Path,
    clients: usize,
    projects: usize,
    rounds: usize,
) -> PushRun {
    let names: Vec<String> = (0..projects).map(|j| format!("p{j:03}")).collect();
    let seed_path = seed.path.to_string_lossy().into_owned();
    // Untimed: every project exists with the seed app, and has its own working copy.
    let repos: Vec<Repo> = std::thread::scope(|s| {
        let chunks: Vec<_> = (0..clients)
            .map(|c| {
                let (names, seed_path) = (&names, &seed_path);
                s.spawn(move || {
                    (c..names.len())
                        .step_by(clients)
                        .map(|j| {
                            let repo = Repo::clone(seed_path, &dir.join(&names[j]));
                            remote.create(&names[j]);
                            let out = repo.push(&remote.url(&names[j]), &["main"]);
                            assert!(out.ok, "seeding {}: {}", names[j], out.stderr);
                            (j, repo)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Repo)> = chunks
            .into_iter()
            .flat_map(|h| h.join().expect("seeding thread"))
            .collect();
        all.sort_by_key(|(j, _)| *j);
        all.into_iter().map(|(_, r)| r).collect()
    });
    let run = Mutex::new(PushRun::default());
    let acked: Mutex<Vec<Vec<String>>> = Mutex::new(vec![Vec::new(); projects]);
    let barrier = Barrier::new(clients);
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let (repos, names, run, acked, barrier) = (&repos, &names, &run, &acked, &barrier);
            s.spawn(move || {
                barrier.wait();
                for r in 0..rounds {
                    for j in (c..projects).step_by(clients) {
                        let msg = format!("{} round {r}", names[j]);
                        let repo = &repos[j];
                        repo.write(&format!("load/r{r}.txt"), &msg);
                        repo.git_ok(&["add", "-A"]);
                        repo.git_ok(&["commit", "-q", "-m", &msg]);
                        if let Some(head) = push_until_acked(repo, &remote.url(&names[j]), run) {
                            acked.lock().expect("acked")[j].push(head);
                        }
                    }
                }
            });
        }
    });
    let mut run = run.into_inner().expect("push run");
    run.wall_s = started.elapsed().as_secs_f64();
    let acked = acked.into_inner().expect("acked");
    run.acked = acked.iter().map(Vec::len).sum();
    let verified = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for c in 0..clients {
            let (names, acked, verified) = (&names, &acked, &verified);
            s.spawn(move || {
                for j in (c..projects).step_by(clients) {
                    let expected: Vec<String> = (0..rounds)
                        .map(|r| format!("{} round {r}", names[j]))
                        .collect();
                    let mut one = PushRun::default();
                    verify(
                        &remote.url(&names[j]),
                        &dir.join(format!("verify-{}", names[j])),
                        &acked[j],
                        &expected,
                        &mut one,
                    );
                    verified.lock().expect("verified").push(one);
                }
            });
        }
    });
    for one in verified.into_inner().expect("verified") {
        run.missing.extend(one.missing);
        run.duplicated += one.duplicated;
    }
    run
}

/// Clones `url` afresh and checks that `main` reaches every acknowledged commit and holds each
/// expected message exactly once (a rebase gone wrong could lose or repeat one).
fn verify(url: &str, to: &Path, acked: &[String], expected: &[String], run: &mut PushRun) {
    let clone = Repo::clone(url, to);
    let reachable: HashSet<String> = clone
        .git_ok(&["rev-list", "main"])
        .lines()
        .map(str::to_owned)
        .collect();
    run.missing.extend(
        acked
            .iter()
            .filter(|c| !reachable.contains(*c))
            .map(|c| c[..12].to_owned()),
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for subject in clone.git_ok(&["log", "--format=%s", "main"]).lines() {
        *seen.entry(subject.to_owned()).or_default() += 1;
    }
    run.duplicated += expected
        .iter()
        .filter(|m| seen.get(*m).is_some_and(|n| *n > 1))
        .count();
}

// ---------------------------------------------------------------------------------------------
// The baseline: `git http-backend` behind a minimal CGI bridge
// ---------------------------------------------------------------------------------------------

/// Bare repositories under `root` served by `git http-backend`, one CGI process per request,
/// over HTTP/1.1 keep-alive behind Basic auth (any credentials), as a web server in front of it
/// would. A thread per connection: the clients are few.
struct Bridge {
    port: u16,
    root: PathBuf,
}

impl Bridge {
    fn start(root: &Path) -> Self {
        std::fs::create_dir_all(root).expect("baseline root");
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let served = root.to_owned();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let root = served.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve_cgi(conn, &root) {
                        use std::io::ErrorKind::*;
                        if !matches!(e.kind(), ConnectionReset | BrokenPipe | UnexpectedEof) {
                            eprintln!("baseline bridge: {e}");
                        }
                    }
                });
            }
        });
        Self {
            port,
            root: root.to_owned(),
        }
    }

    fn create(&self, project: &str) {
        let name = format!("{project}.git");
        let out = git(&self.root, &["init", "-q", "--bare", "-b", "main", &name]);
        assert!(out.ok, "git init --bare {name}: {}", out.stderr);
        let out = git(
            &self.root.join(&name),
            &["config", "http.receivepack", "true"],
        );
        assert!(out.ok, "git config in {name}: {}", out.stderr);
    }
}

/// Answers requests on one connection until the client closes it.
fn serve_cgi(stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return Err(bad("malformed request line"));
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let mut headers: Vec<(String, String)> = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            read_chunked(&mut reader)?
        } else {
            let len = header("content-length").map_or(Ok(0), |v| {
                v.parse::<usize>().map_err(|_| bad("bad Content-Length"))
            })?;
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
            body
        };
        let response = if header("authorization").is_some_and(|v| v.starts_with("Basic ")) {
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            cgi(root, &method, path, query, &header, body)?
        } else {
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"bench\"\r\nContent-Length: 0\r\n\r\n".to_vec()
        };
        out.write_all(&response)?;
        out.flush()?;
        if header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return Ok(());
        }
    }
}

/// A `Transfer-Encoding: chunked` body (git sends one past `http.postBuffer`).
fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "chunk size"))?;
        if size == 0 {
            loop {
                let mut t = String::new();
                if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
    }
}

/// Runs `git http-backend` for one request and turns its CGI answer into HTTP/1.1.
fn cgi<'a>(
    root: &Path,
    method: &str,
    path: &str,
    query: &str,
    header: &dyn Fn(&str) -> Option<&'a str>,
    body: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "bench")
        .env("REMOTE_ADDR", "127.0.0.1");
    if method == "POST" {
        cmd.env("CONTENT_LENGTH", body.len().to_string());
    }
    for (var, name) in [
        ("CONTENT_TYPE", "content-type"),
        ("HTTP_CONTENT_ENCODING", "content-encoding"),
        ("GIT_PROTOCOL", "git-protocol"),
    ] {
        if let Some(v) = header(name) {
            cmd.env(var, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((i, sep)) = split else {
        let msg = format!(
            "git http-backend answered no CGI headers: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{msg}",
            msg.len()
        )
        .into_bytes());
    };
    let (head, payload) = (&raw[..i], &raw[i + sep..]);
    let mut status = "200 OK".to_owned();
    let mut fields = String::new();
    for line in String::from_utf8_lossy(head).lines() {
        let line = line.trim_end_matches('\r');
        match line.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
            Some(_) => {
                fields.push_str(line);
                fields.push_str("\r\n");
            }
            None => {}
        }
    }
    let mut bytes = format!(
        "HTTP/1.1 {status}\r\n{fields}Content-Length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// 3. A burst of projects pushed at once
// ---------------------------------------------------------------------------------------------

/// The agent's settings as it logged them at start (`kiln-agent starting concurrency=1 ...`).
struct AgentLimits {
    concurrency: usize,
    memory_bytes: u64,
    cpus: f64,
    quota_concurrent: u64,
}

impl AgentLimits {
    fn from_log(log: &str) -> Self {
        let line = log
            .lines()
            .find(|l| l.contains("kiln-agent starting"))
            .unwrap_or_else(|| panic!("the agent did not log its settings:\n{}", tail(log, 20)));
        let kv: HashMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|t| t.split_once('='))
            .collect();
        let get = |k: &str| -> f64 {
            kv.get(k)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k}= in the agent's start line: {line}"))
        };
        Self {
            concurrency: get("concurrency") as usize,
            memory_bytes: (get("memory_mb") as u64) << 20,
            cpus: get("cpus"),
            quota_concurrent: get("quota_concurrent_builds") as u64,
        }
    }
}

/// What one project of a burst went through.
struct Settled {
    /// When its push started (Unix ms).
    pushed_at_ms: u64,
    status: serde_json::Value,
}

fn burst(knobs: &Knobs, dir: &Path, table: &mut Table) {
    let stack = Stack::start();
    let limits = AgentLimits::from_log(&stack.agent_log());
    table.note(format!(
        "burst: the agent's defaults on this machine: concurrency {}, {} MiB and {} CPUs per \
         build, {} concurrent builds per client (an F4s_v2, 4 vCPU and 8 GiB, gets \
         concurrency 2 and 2 GiB)",
        limits.concurrency,
        limits.memory_bytes >> 20,
        limits.cpus,
        limits.quota_concurrent
    ));
    if knobs.sites > 0 {
        let n = knobs.sites;
        let kind = if knobs.vite {
            "vite-react-ts apps"
        } else {
            "static sites"
        };
        progress(&format!("burst: {n} {kind}, one client each"));
        let tokens = par_map(n, 4, |i| {
            stack.gitstore.create_client(&format!("tenant{i:02}"))
        });
        let repos = par_map(n, 4, |i| {
            let path = dir.join(format!("t{i:02}"));
            if knobs.vite {
                fixture_app(&path)
            } else {
                static_site(&path, i)
            }
        });
        let projects: Vec<String> = (0..n).map(|i| format!("t{i:02}")).collect();
        let (settled, depth) = push_burst(&stack, &projects, &repos, &tokens);
        burst_rows(
            table,
            &format!("{n} {kind} of {n} clients pushed at once"),
            &settled,
            &depth,
            &limits,
            knobs.vite,
        );
    }
    if knobs.one_client > 0 {
        let n = knobs.one_client;
        progress(&format!("burst: {n} static sites of one client"));
        let repos = par_map(n, 4, |i| static_site(&dir.join(format!("o{i:02}")), i));
        let tokens = vec![stack.token.clone(); n];
        let projects: Vec<String> = (0..n).map(|i| format!("o{i:02}")).collect();
        let (settled, depth) = push_burst(&stack, &projects, &repos, &tokens);
        burst_rows(
            table,
            &format!("{n} static sites of ONE client pushed at once"),
            &settled,
            &depth,
            &limits,
            false,
        );
        let refusals = metric(&stack.agent_url(), "kiln_agent_quota_refusals_total");
        table.note(format!(
            "burst of one client: the agent counted {refusals:.0} quota refusals (its builds \
             wait as `refused` rather than in the queue, and start as slots free)"
        ));
    }
}

/// Four small files, one of them a hashed asset: a build is a copy.
fn static_site(path: &Path, i: usize) -> Repo {
    let r = Repo::init(path);
    r.write(
        "index.html",
        format!(
            "<!doctype html><title>site {i}</title><link rel=stylesheet href=assets/index-Ab12Cd34.css><p>site {i}</p>\n"
        ),
    );
    r.write(
        "assets/index-Ab12Cd34.css",
        "p { color: #333; }\n".repeat(40),
    );
    r.write(
        "about.html",
        format!("<!doctype html><p>about site {i}</p>\n"),
    );
    r.write("robots.txt", "User-agent: *\n");
    r.git_ok(&["add", "-A"]);
    r.git_ok(&["commit", "-q", "-m", "static site"]);
    r
}

/// Pushes every repo to its project at once (a thread each), then waits until each is settled
/// at its commit; samples the queue depth meanwhile. Returns each project's outcome and the
/// samples (ms since the pushes started, depth).
fn push_burst(
    stack: &Stack,
    projects: &[String],
    repos: &[Repo],
    tokens: &[String],
) -> (Vec<Settled>, Vec<(u64, f64)>) {
    let heads: Vec<String> = repos.iter().map(Repo::head).collect();
    let stop = AtomicBool::new(false);
    let agent = stack.agent_url();
    let t0 = now_ms();
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((now_ms() - t0, metric(&agent, "kiln_agent_queue_depth")));
                std::thread::sleep(SAMPLE_EVERY);
            }
            samples
        });
        let barrier = Barrier::new(projects.len());
        let pushed: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..projects.len())
                .map(|i| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let at = now_ms();
                        let url = stack.gitstore.git_url(&tokens[i], &projects[i]);
                        let out = repos[i].push(&url, &["main"]);
                        assert!(out.ok, "push to {} failed: {}", projects[i], out.stderr);
                        at
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("push thread"))
                .collect()
        });
        progress(&format!(
            "burst: {} pushes acknowledged in {:.1} s; waiting for the builds",
            projects.len(),
            (now_ms() - t0) as f64 / 1000.0
        ));
        let mut settled: Vec<Option<serde_json::Value>> = vec![None; projects.len()];
        let started = Instant::now();
        while settled.iter().any(Option::is_none) {
            assert!(
                started.elapsed() < BUILD_TIMEOUT * 2,
                "not every project settled within {:?}: {:?}\nagent log:\n{}",
                BUILD_TIMEOUT * 2,
                projects
                    .iter()
                    .zip(&settled)
                    .filter(|(_, s)| s.is_none())
                    .map(|(p, _)| p)
                    .collect::<Vec<_>>(),
                tail(&stack.agent_log(), 40)
            );
            std::thread::sleep(Duration::from_millis(500));
            for i in 0..projects.len() {
                if settled[i].is_some() {
                    continue;
                }
                let r = http(
                    "GET",
                    &format!("{agent}/status/{}", projects[i]),
                    &[("Authorization", &format!("Bearer {}", tokens[i]))],
                    b"",
                );
                if r.status != 200 {
                    continue;
                }
                let st = r.json();
                let waiting = st["state"] == "refused"
                    && st["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("concurrent_builds"));
                let active = matches!(
                    st["state"].as_str(),
                    Some("queued" | "syncing" | "installing" | "building" | "publishing")
                );
                if st["commit"].as_str() == Some(heads[i].as_str()) && !active && !waiting {
                    settled[i] = Some(st);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let depth = sampler.join().expect("sampler");
        let settled = pushed
            .into_iter()
            .zip(settled)
            .map(|(at, st)| Settled {
                pushed_at_ms: at,
                status: st.expect("settled"),
            })
            .collect();
        (settled, depth)
    })
}

fn burst_rows(
    table: &mut Table,
    what: &str,
    settled: &[Settled],
    depth: &[(u64, f64)],
    limits: &AgentLimits,
    sandboxed: bool,
) {
    let t0 = settled.iter().map(|s| s.pushed_at_ms).min().unwrap_or(0);
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut failed = Vec::new();
    let mut ready_ms = Vec::new();
    let mut intervals = Vec::new();
    let mut peak_mem = 0u64;
    let mut cpu_share = 0f64;
    let mut over = Vec::new();
    let mut extra = Vec::new();
    for s in settled {
        let st = &s.status;
        let project = st["project"].as_str().unwrap_or("?");
        if st["state"] != "ready" {
            failed.push(format!("{project}: {} {}", st["state"], st["error"]));
        }
        let finished = u(&st["finished_at_ms"]);
        ready_ms.push(finished.saturating_sub(s.pushed_at_ms) as f64);
        // The status API leaves the history out: each project was pushed once, so its current
        // build is its only one (a second would show in its build number, noted below).
        if let Some(start) = st["started_at_ms"].as_u64() {
            intervals.push((start, finished));
        }
        if u(&st["build"]) > 1 {
            extra.push(format!("{project} is at build {}", st["build"]));
        }
        let mem = u(&st["peak_memory_bytes"]);
        peak_mem = peak_mem.max(mem);
        if mem > limits.memory_bytes {
            over.push(format!("{project}: peak memory {} MiB", mem >> 20));
        }
        let sandbox_ms = u(&st["phases"]["install"]) + u(&st["phases"]["build"]);
        if sandbox_ms > 0 {
            let share = u(&st["cpu_time_ms"]) as f64 / (sandbox_ms as f64 * limits.cpus);
            cpu_share = cpu_share.max(share);
            // The CPU quota is enforced per 100 ms period: allow a little for the edges.
            if share > 1.05 {
                over.push(format!(
                    "{project}: {} ms of CPU in {sandbox_ms} ms of sandbox time",
                    u(&st["cpu_time_ms"])
                ));
            }
        }
    }
    let all_ready = settled
        .iter()
        .map(|s| u(&s.status["finished_at_ms"]))
        .max()
        .unwrap_or(t0)
        .saturating_sub(t0) as f64;
    let busy: u64 = intervals.iter().map(|(a, b)| b - a).sum();
    let back_to_back = busy as f64 / limits.concurrency as f64;
    table.row(
        &format!("{what}: first push until all ready"),
        dur(all_ready),
        "the same builds back to back (sum of build times / concurrency)",
        dur(back_to_back),
        format!("{:.2}x", all_ready / back_to_back),
    );
    table.row(
        "  push until ready, per project, p50 / p99",
        format!(
            "{} / {}",
            dur(pct(&ready_ms, 0.5)),
            dur(pct(&ready_ms, 0.99))
        ),
        "a build's own time (start to end), median",
        dur(pct(
            &intervals
                .iter()
                .map(|(a, b)| (b - a) as f64)
                .collect::<Vec<_>>(),
            0.5,
        )),
        String::new(),
    );
    let max_depth = depth.iter().map(|(_, d)| *d).fold(0.0, f64::max);
    table.row(
        "  queue depth (`kiln_agent_queue_depth`), max",
        format!("{max_depth:.0}"),
        "",
        String::new(),
        String::new(),
    );
    let running = max_overlap(&intervals);
    table.row(
        &format!(
            "  builds running at once, max (concurrency {})",
            limits.concurrency
        ),
        format!("{running} ({} builds)", intervals.len()),
        "",
        String::new(),
        String::new(),
    );
    if sandboxed {
        table.row(
            &format!(
                "  peak memory of a build, max (limit {} MiB)",
                limits.memory_bytes >> 20
            ),
            format!("{} MiB", peak_mem >> 20),
            "",
            String::new(),
            String::new(),
        );
        table.row(
            &format!("  CPU time / (sandbox time x {} CPUs), max", limits.cpus),
            format!("{cpu_share:.2}"),
            "",
            String::new(),
            String::new(),
        );
    }
    table.note(format!(
        "{what}: queue depth over time (s:depth): {}",
        series(depth, step_for(depth))
    ));
    if running > limits.concurrency {
        table.note(format!(
            "{what}: {running} builds ran at once, above the concurrency of {}",
            limits.concurrency
        ));
    }
    for f in &failed {
        table.note(format!("{what}: NOT READY: {f}"));
    }
    for o in &over {
        table.note(format!("{what}: OVER ITS LIMIT: {o}"));
    }
    if !extra.is_empty() {
        table.note(format!(
            "{what}: {} projects used more than one build number (a refusal takes one), e.g. {}",
            extra.len(),
            extra[..extra.len().min(3)].join(", ")
        ));
    }
}

/// The most intervals that overlap at one instant.
fn max_overlap(intervals: &[(u64, u64)]) -> usize {
    let mut edges: Vec<(u64, i32)> = intervals
        .iter()
        .flat_map(|&(a, b)| [(a, 1), (b, -1)])
        .collect();
    // An end sorts before a start at the same millisecond: one build handing its slot over.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}

/// About a dozen points over the samples' span, in whole seconds.
fn step_for(samples: &[(u64, f64)]) -> u64 {
    let span = samples.last().map_or(0, |(t, _)| *t);
    (span / 12).div_ceil(1000).max(1) * 1000
}

/// `0s:0 10s:48 20s:44 ...`: the first sample in each `step` (ms).
fn series(samples: &[(u64, f64)], step: u64) -> String {
    let mut out = Vec::new();
    let mut next = 0;
    for &(t, d) in samples {
        if t >= next {
            out.push(format!("{}s:{d:.0}", t / 1000));
            next = (t / step + 1) * step;
        }
    }
    out.join(" ")
}

// ---------------------------------------------------------------------------------------------
// Helpers and the table
// ---------------------------------------------------------------------------------------------

/// `f(0..n)` on `threads` threads, in order.
fn par_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (f, out) = (&f, &out);
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let v = f(i);
                    out.lock().expect("par_map")[i] = Some(v);
                }
            });
        }
    });
    out.into_inner()
        .expect("par_map")
        .into_iter()
        .map(|v| v.expect("every item"))
        .collect()
}

/// The nearest-rank percentile, NaN (shown as such in the table) when nothing was measured.
fn pct(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        percentile(xs, p)
    }
}

/// A sample of the agent's `/metrics` (0 when absent).
fn metric(agent: &str, name: &str) -> f64 {
    let r = http("GET", &format!("{agent}/metrics"), &[], b"");
    r.body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name || k.starts_with(&format!("{name}{{"))).then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Milliseconds as a duration a reader takes in at a glance.
fn dur(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
    notes: Vec<String>,
}

impl Table {
    fn row(&mut self, what: &str, kiln: String, base_what: &str, base: String, ratio: String) {
        self.rows
            .push([what.to_owned(), kiln, base_what.to_owned(), base, ratio]);
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "\n| what | Kiln | baseline | baseline figure | ratio |\n|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }
}
