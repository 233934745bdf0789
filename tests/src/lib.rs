//! Harness for Kiln's end-to-end tests: real parts only.
//!
//! Every test drives the stock `git` CLI against real `kiln-gitstore` processes (and, for the
//! Azure backend, a real Azurite), each started here on a free 127.0.0.1 port, in its own temp
//! directory, and killed on drop together with every git child and hook it started. Nothing is
//! mocked and nothing is skipped: a missing tool panics with the command that installs it.
//!
//! The public API, smallest useful set:
//! - [`Gitstore`] (with [`Options`]): a running node; [`Gitstore::git_url`],
//!   [`Gitstore::create_client`], [`Gitstore::http`], [`Gitstore::store_dir`], [`Gitstore::kill`].
//! - [`Azurite`]: a running Azurite blob service with [`Azurite::create_container`].
//! - [`Nginx`]: a real nginx running the configuration `kiln nginx render` makes.
//! - [`Repo`]: a git working repository driven through the CLI; [`vite_app`] makes one with a
//!   small Vite + React app committed on `main`.
//! - [`http`]: a minimal HTTP/1.1 client (std only); [`Response`].
//! - [`kiln_sync`]: the `kiln-gitstore sync` command; [`latest_manifest`], [`generation`] and
//!   [`store_snapshot`] read a file store the way an operator would.
//! - [`run`] / [`Output`]: run any command with a timeout.
//! - [`webhook_receiver`]: a local HTTP endpoint that reports each request it gets.
//! - [`bench`]: what the benchmarks share (release binaries, progress lines, medians).

pub mod bench;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The webhook secret every gitstore started by the harness signs with.
pub const WEBHOOK_SECRET: &str = "kiln-test-webhook-secret-0123456789";

/// Hex HMAC-SHA256, as webhook and notification signatures carry it after `sha256=`.
pub fn hmac_sha256_hex(secret: &[u8], body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The well-known Azurite account key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How long any single external command may run before the harness kills it and fails the test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// What a finished command printed, and whether it exited 0.
#[derive(Clone, Debug)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion (stdin closed) and captures its output; panics if it cannot start or
/// runs longer than three minutes.
pub fn run(cmd: &mut Command) -> Output {
    run_with_input(cmd, None)
}

/// Like [`run`], feeding `input` to the command's stdin.
pub fn run_with_input(cmd: &mut Command, input: Option<&[u8]>) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let writer = input.map(|bytes| {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        })
    });
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if started.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} ran longer than {COMMAND_TIMEOUT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
    }
}

/// Panics with the install command unless `tool` is an executable on PATH.
pub fn require_tool(tool: &str, install: &str) {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let p = dir.join(tool);
            std::fs::metadata(&p).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    });
    assert!(
        found,
        "`{tool}` is required by the end-to-end tests but is not on PATH; install it with: {install}"
    );
}

/// A Kiln binary: `$KILN_BIN_DIR/<name>`, else `<workspace>/target/debug/<name>`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("KILN_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing; build it with: cargo build --workspace --bins",
        bin.display()
    );
    bin
}

/// The `kiln-gitstore` binary.
pub fn kiln_bin() -> PathBuf {
    bin("kiln-gitstore")
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Kills a process group we started (its leader's pid is the group id) and reaps the leader.
fn kill_group(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = Command::new("sh")
            .args(["-c", &format!("kill -9 -{}", child.id())])
            .status();
    }
    let _ = child.wait();
}

/// The last `n` lines of a log file, for panic messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// gitstore
// ---------------------------------------------------------------------------------------------

/// How to start a gitstore node. `Default` gives a fresh file store in the node's temp dir.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Store URL (a directory, `file:///dir` or `az://container`); None = `<tempdir>/store`.
    pub store: Option<String>,
    /// Extra `serve` arguments, e.g. `["--max-file-bytes", "1024"]`.
    pub args: Vec<String>,
    /// Extra environment, e.g. Azurite's ([`Azurite::env`]) or `KILN_FAULT_INJECT`.
    pub env: Vec<(String, String)>,
    /// Admin token; the harness passes its SHA-256 (from `kiln-gitstore hash-token`).
    pub admin_token: Option<String>,
}

impl Options {
    /// Options with extra `serve` arguments and nothing else changed.
    pub fn args(args: &[&str]) -> Self {
        Self {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Self::default()
        }
    }
}

/// A running `kiln-gitstore serve`, killed (with its whole process group) on drop.
pub struct Gitstore {
    child: Child,
    port: u16,
    store: String,
    env: Vec<(String, String)>,
    /// The `serve` arguments after the common ones, for [`Gitstore::restart`].
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Gitstore {
    /// A node with a fresh file store and default limits.
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// Starts a node and waits until `/healthz` answers 200 (20 s at most).
    pub fn start_with(opts: Options) -> Self {
        require_tool("git", "apt-get install -y git");
        let bin = kiln_bin();
        let mut dir = tempfile::Builder::new()
            .prefix("kiln-gitstore-")
            .tempdir()
            .expect("temp dir");
        let store = opts
            .store
            .clone()
            .unwrap_or_else(|| dir.path().join("store").to_string_lossy().into_owned());
        let mut extra = opts.args.clone();
        if let Some(token) = &opts.admin_token {
            let out = run(Command::new(&bin).args(["hash-token", token]));
            assert!(out.ok, "kiln-gitstore hash-token failed: {}", out.stderr);
            extra.extend(["--admin-token-sha256".into(), out.stdout.trim().to_owned()]);
        }
        // A port picked by binding :0 may be taken again before the server binds it: retry.
        for _attempt in 0..5 {
            let port = free_port();
            let child = spawn_gitstore(dir.path(), port, &store, &opts.env, &extra);
            let mut node = Self {
                child,
                port,
                store: store.clone(),
                env: opts.env.clone(),
                extra: extra.clone(),
                dir,
            };
            match node.wait_healthy() {
                Ok(()) => return node,
                Err(log) if log.contains("Address already in use") => {
                    node.kill();
                    dir = node.into_dir();
                }
                Err(log) => panic!(
                    "kiln-gitstore on 127.0.0.1:{port} did not become healthy; last log lines:\n{log}"
                ),
            }
        }
        panic!("kiln-gitstore could not bind a free port in 5 attempts");
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        drop(self);
        dir
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("(exited: {status})\n{}", self.log_tail(40)));
            }
            if let Ok(r) = try_http("GET", &format!("{}/healthz", self.base_url()), &[], b"") {
                if r.status == 200 {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "(no 200 from /healthz within 20 s)\n{}",
            self.log_tail(40)
        ))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The git remote URL of `project`, with `token` as the HTTP Basic password.
    pub fn git_url(&self, token: &str, project: &str) -> String {
        format!(
            "http://kiln:{token}@127.0.0.1:{}/git/{project}.git",
            self.port
        )
    }

    /// The git remote URL of `project` without credentials.
    pub fn anonymous_git_url(&self, project: &str) -> String {
        format!("http://127.0.0.1:{}/git/{project}.git", self.port)
    }

    /// The store URL this node serves.
    pub fn store_url(&self) -> &str {
        &self.store
    }

    /// The store directory, for a node on a file store.
    pub fn store_dir(&self) -> PathBuf {
        let s = self.store.strip_prefix("file://").unwrap_or(&self.store);
        assert!(s.starts_with('/'), "{} is not a file store", self.store);
        PathBuf::from(s)
    }

    /// Creates an API client with `kiln-gitstore create-client` and returns its token.
    pub fn create_client(&self, name: &str) -> String {
        let mut cmd = Command::new(kiln_bin());
        hermetic_env(&mut cmd);
        let out = run(cmd
            .args(["create-client", name, "--store", &self.store])
            .envs(self.env.iter().cloned()));
        assert!(out.ok, "kiln-gitstore create-client failed: {}", out.stderr);
        let token = out.stdout.trim().to_owned();
        assert!(token.starts_with("kiln_"), "unexpected token {token:?}");
        token
    }

    /// An HTTP request to this node; `bearer` goes in `Authorization: Bearer`, a `body` is sent
    /// as JSON.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        http(
            method,
            &format!("{}{path}", self.base_url()),
            &headers,
            body.unwrap_or("").as_bytes(),
        )
    }

    /// The node's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gitstore.log")).unwrap_or_default()
    }

    fn log_tail(&self, n: usize) -> String {
        tail(&self.dir.path().join("gitstore.log"), n)
    }

    /// SIGKILLs the node's process group: the server, its git children and their hooks.
    pub fn kill(&mut self) {
        kill_group(&mut self.child);
    }

    /// Starts the node again (after [`Gitstore::kill`]) on the same port, store, cache and
    /// arguments, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_gitstore(
            self.dir.path(),
            self.port,
            &self.store,
            &self.env,
            &self.extra,
        );
        if let Err(log) = self.wait_healthy() {
            panic!(
                "kiln-gitstore did not come back on port {}:\n{log}",
                self.port
            );
        }
    }
}

/// `kiln-gitstore serve` with the harness's settings, logging to `<dir>/gitstore.log`
/// (appended to, so a restart keeps what came before).
fn spawn_gitstore(
    dir: &Path,
    port: u16,
    store: &str,
    env: &[(String, String)],
    extra: &[String],
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("gitstore.log"))
        .expect("log file");
    let mut cmd = Command::new(kiln_bin());
    hermetic_env(&mut cmd);
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--store", store])
        .arg("--data-dir")
        .arg(dir.join("cache"))
        .args(["--webhook-secret", WEBHOOK_SECRET])
        .args(extra)
        .envs(env.iter().cloned())
        .env("KILN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .process_group(0);
    cmd.spawn().expect("starting kiln-gitstore")
}

impl Drop for Gitstore {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of kiln-gitstore log (port {}) ---\n{}\n---",
                self.port,
                self.log_tail(30)
            );
        }
    }
}

/// Clears variables that would make a child read the developer's configuration instead of the
/// test's: git's global and system config, askpass helpers, and Kiln's own settings.
fn hermetic_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("KILN_")
            || k.starts_with("GIT_")
            || k.starts_with("AZURE_")
            || k.starts_with("AZURITE_")
            || k == "SSH_ASKPASS"
        {
            cmd.env_remove(k);
        }
    }
    cmd.env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C");
}

/// A webhook receiver on a free port answering 200, reporting each (request line, body).
pub fn webhook_receiver() -> (u16, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let len = text
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            let _ = s.read_exact(&mut body);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let line = text.lines().next().unwrap_or_default().to_owned();
            if tx.send((line, body)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

// ---------------------------------------------------------------------------------------------
// git
// ---------------------------------------------------------------------------------------------

/// Runs `git -C dir args...` hermetically (no global config, no prompts, fixed identity).
pub fn git(dir: &Path, args: &[&str]) -> Output {
    git_with_input(dir, args, None)
}

/// Like [`git`], feeding `input` to stdin.
pub fn git_with_input(dir: &Path, args: &[&str], input: Option<&[u8]>) -> Output {
    require_tool("git", "apt-get install -y git");
    let mut cmd = Command::new("git");
    hermetic_env(&mut cmd);
    cmd.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid");
    run_with_input(&mut cmd, input)
}

/// A git working repository.
#[derive(Clone, Debug)]
pub struct Repo {
    pub path: PathBuf,
}

impl Repo {
    /// `git init -b main` at `path` (created if missing).
    pub fn init(path: &Path) -> Self {
        std::fs::create_dir_all(path).expect("creating repo dir");
        let r = Self {
            path: path.to_owned(),
        };
        r.git_ok(&["init", "-q", "-b", "main"]);
        r
    }

    /// Clones `url` into `path`; Err carries git's output.
    pub fn try_clone(url: &str, path: &Path, extra: &[&str]) -> Result<Self, Output> {
        let parent = path.parent().expect("clone target has a parent");
        std::fs::create_dir_all(parent).expect("creating clone parent");
        let target = path.to_string_lossy();
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["clone", "-q", url, &target]);
        let out = git(parent, &args);
        if out.ok {
            Ok(Self {
                path: path.to_owned(),
            })
        } else {
            Err(out)
        }
    }

    /// Clones `url` into `path`, panicking with git's stderr on failure.
    pub fn clone(url: &str, path: &Path) -> Self {
        Self::try_clone(url, path, &[])
            .unwrap_or_else(|o| panic!("git clone {url} failed:\n{}", o.stderr))
    }

    pub fn git(&self, args: &[&str]) -> Output {
        git(&self.path, args)
    }

    pub fn git_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        git_with_input(&self.path, args, Some(input))
    }

    /// Runs git and returns its trimmed stdout; panics with stderr on failure.
    pub fn git_ok(&self, args: &[&str]) -> String {
        let out = self.git(args);
        assert!(
            out.ok,
            "git {args:?} in {} failed:\n{}",
            self.path.display(),
            out.stderr
        );
        out.stdout.trim().to_owned()
    }

    /// Writes a file (creating directories) without committing.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let p = self.path.join(rel);
        std::fs::create_dir_all(p.parent().expect("file has a parent")).expect("mkdir");
        std::fs::write(p, content).expect("writing file");
    }

    /// Writes `rel`, commits everything with message `rel`, and returns the new commit id.
    pub fn commit_file(&self, rel: &str, content: impl AsRef<[u8]>) -> String {
        self.write(rel, content);
        self.git_ok(&["add", "-A"]);
        self.git_ok(&["commit", "-q", "-m", &format!("update {rel}")]);
        self.head()
    }

    /// The commit `HEAD` points at.
    pub fn head(&self) -> String {
        self.git_ok(&["rev-parse", "HEAD"])
    }

    /// `git push <url> <refspecs...>`.
    pub fn push(&self, url: &str, refspecs: &[&str]) -> Output {
        let mut args = vec!["push", url];
        args.extend(refspecs);
        self.git(&args)
    }
}

/// A new repository at `path` with a small Vite + React app (about a dozen files, including a
/// ~40 KB lockfile of incompressible hashes) committed on `main`; `title` varies the content.
pub fn vite_app(path: &Path, title: &str) -> Repo {
    use base64::Engine;
    use sha2::Digest;
    let r = Repo::init(path);
    let mut lock =
        String::from("{\n  \"name\": \"app\",\n  \"lockfileVersion\": 3,\n  \"packages\": {\n");
    for i in 0..300 {
        let digest = sha2::Sha512::digest(format!("{title}/pkg-{i}"));
        let integrity = base64::engine::general_purpose::STANDARD.encode(digest);
        lock.push_str(&format!(
            "    \"node_modules/pkg-{i}\": {{ \"version\": \"1.{i}.0\", \"integrity\": \"sha512-{integrity}\" }},\n"
        ));
    }
    lock.push_str("    \"\": {}\n  }\n}\n");
    let files: [(&str, String); 12] = [
        ("package.json", r#"{"name":"app","private":true,"type":"module","scripts":{"dev":"vite","build":"vite build"},"dependencies":{"react":"^18.3.1","react-dom":"^18.3.1"},"devDependencies":{"@vitejs/plugin-react":"^4.3.1","vite":"^5.4.0"}}
"#.into()),
        ("package-lock.json", lock),
        ("index.html", "<!doctype html>\n<html><head><meta charset=\"UTF-8\"><title>app</title></head>\n<body><div id=\"root\"></div><script type=\"module\" src=\"/src/main.jsx\"></script></body></html>\n".into()),
        ("vite.config.js", "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\nexport default defineConfig({ plugins: [react()] })\n".into()),
        ("src/main.jsx", "import { StrictMode } from 'react'\nimport { createRoot } from 'react-dom/client'\nimport App from './App.jsx'\nimport './index.css'\ncreateRoot(document.getElementById('root')).render(<StrictMode><App /></StrictMode>)\n".into()),
        ("src/App.jsx", format!("import Header from './components/Header.jsx'\nimport Button from './components/Button.jsx'\nimport './App.css'\nexport default function App() {{\n  return <main><Header title={title:?} /><Button /></main>\n}}\n")),
        ("src/App.css", "main { max-width: 40rem; margin: 0 auto; }\n".into()),
        ("src/index.css", ":root { font-family: system-ui, sans-serif; }\n".into()),
        ("src/components/Header.jsx", "export default function Header({ title }) { return <h1>{title}</h1> }\n".into()),
        ("src/components/Button.jsx", "import { useState } from 'react'\nexport default function Button() {\n  const [n, setN] = useState(0)\n  return <button onClick={() => setN(n + 1)}>clicked {n}</button>\n}\n".into()),
        ("public/favicon.svg", "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><circle cx=\"8\" cy=\"8\" r=\"8\"/></svg>\n".into()),
        (".gitignore", "node_modules\ndist\n".into()),
    ];
    for (rel, content) in files {
        r.write(rel, content);
    }
    r.git_ok(&["add", "-A"]);
    r.git_ok(&["commit", "-q", "-m", "scaffold app"]);
    r
}

// ---------------------------------------------------------------------------------------------
// The store, as an operator sees it
// ---------------------------------------------------------------------------------------------

/// The newest manifest of `project` in the file store at `store_dir`, if any.
pub fn latest_manifest(store_dir: &Path, project: &str) -> Option<serde_json::Value> {
    let dir = store_dir.join(format!("projects/{project}/manifests"));
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    let newest = names.pop()?;
    let bytes = std::fs::read(&newest).expect("reading manifest");
    Some(serde_json::from_slice(&bytes).expect("manifest is JSON"))
}

/// Publishes the next manifest generation of `project` in the file store at `store_dir`, made
/// by `edit` from the newest one, as gitstore's metadata, share and delete operations do: a
/// generation that moves no ref. Claimed with a create, like gitstore's CAS. Returns its number.
pub fn publish_generation(
    store_dir: &Path,
    project: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> u64 {
    let mut m = latest_manifest(store_dir, project).expect("the project has a manifest");
    let generation = m["generation"].as_u64().expect("generation") + 1;
    m["generation"] = generation.into();
    m["updated_at"] = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .into();
    edit(&mut m);
    let path = store_dir.join(format!(
        "projects/{project}/manifests/{generation:020}.json"
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("claiming {}: {e}", path.display()));
    f.write_all(&serde_json::to_vec_pretty(&m).unwrap())
        .expect("writing the manifest");
    generation
}

/// The current manifest generation of `project` (0 when never pushed).
pub fn generation(store_dir: &Path, project: &str) -> u64 {
    latest_manifest(store_dir, project).map_or(0, |m| {
        m["generation"].as_u64().expect("generation is a number")
    })
}

/// Every file under `projects/<project>/` in a file store, with its size: compare two snapshots
/// to show a refused push left the store as it was.
pub fn store_snapshot(store_dir: &Path, project: &str) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
        let Ok(read) = std::fs::read_dir(dir) else {
            return;
        };
        for e in read.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("under root");
                let len = e.metadata().map_or(0, |m| m.len());
                out.insert(rel.to_string_lossy().into_owned(), len);
            }
        }
    }
    let root = store_dir.join(format!("projects/{project}"));
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The outcome of `kiln-gitstore sync`.
#[derive(Debug)]
pub struct SyncRun {
    pub ok: bool,
    /// The JSON report (its last stdout line), or Null when there was none.
    pub report: serde_json::Value,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `kiln-gitstore sync <project> <dir> --store <store>` with `env` added.
pub fn kiln_sync(store: &str, env: &[(String, String)], project: &str, dir: &Path) -> SyncRun {
    let mut cmd = Command::new(kiln_bin());
    hermetic_env(&mut cmd);
    let out = run(cmd
        .args(["sync", project])
        .arg(dir)
        .args(["--store", store])
        .envs(env.iter().cloned()));
    let report = out
        .stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    SyncRun {
        ok: out.ok,
        report,
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// An HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order received.
    pub headers: Vec<(String, String)>,
    /// The body as text (lossy): what most assertions read.
    pub body: String,
    /// The body byte for byte (de-chunked), for binary downloads.
    pub bytes: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics (showing the body) if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (`http://host:port/path` only); panics if the
/// server cannot be reached or answers garbage.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    try_http(method, url, headers, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

fn try_http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(authority).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("response without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut payload = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        payload = dechunk(&payload)?;
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&payload).into_owned(),
        bytes: payload,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// `Wed, 21 Oct 2015 07:28:00 GMT` for now (RFC 7231 IMF-fixdate).
fn http_date_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Azurite
// ---------------------------------------------------------------------------------------------

/// A running Azurite blob service (`azurite-blob`), killed on drop.
pub struct Azurite {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts Azurite on a free port and waits (30 s at most) until it accepts connections.
    pub fn start() -> Self {
        require_tool("azurite-blob", "npm i -g azurite@3.35.0");
        let dir = tempfile::Builder::new()
            .prefix("kiln-azurite-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let child = Self::spawn(dir.path(), port);
        let mut az = Self { child, port, dir };
        az.wait_listening();
        az
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("azurite.log"))
            .expect("log file");
        Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.join("data"))
            .args(["--disableTelemetry", "--silent"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("starting azurite-blob")
    }

    /// Freezes the service (SIGSTOP): connections are accepted by the kernel and then hang, as
    /// in a network partition or a store that stopped answering. Killing Azurite instead would
    /// lose the metadata it has not yet saved, which no real store does.
    pub fn stop(&mut self) {
        self.signal("STOP");
    }

    /// Lets a [`Azurite::stop`]ped service run again.
    pub fn resume(&mut self) {
        self.signal("CONT");
        self.wait_listening();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), "--", &format!("-{}", self.child.id())])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} of azurite's process group failed");
    }

    fn wait_listening(&mut self) {
        let (port, log_path) = (self.port, self.dir.path().join("azurite.log"));
        let az = self;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = az.child.try_wait() {
                panic!(
                    "azurite-blob exited ({status}) before listening on {port}; log:\n{}",
                    tail(&log_path, 40)
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                az.kill();
                panic!(
                    "azurite-blob did not listen on 127.0.0.1:{port} within 30 s; log:\n{}",
                    tail(&log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The environment object_store (and so gitstore) needs to use this Azurite.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            (
                "AZURE_STORAGE_ACCOUNT_NAME".into(),
                "devstoreaccount1".into(),
            ),
            (
                "AZURE_STORAGE_ACCOUNT_KEY".into(),
                AZURITE_ACCOUNT_KEY.into(),
            ),
        ]
    }

    /// Options for a gitstore node on container `container` of this Azurite.
    pub fn gitstore_options(&self, container: &str) -> Options {
        Options {
            store: Some(format!("az://{container}")),
            env: self.env(),
            ..Options::default()
        }
    }

    /// Creates `container` with a SharedKey-signed `PUT ?restype=container` (object_store cannot
    /// create containers); panics unless Azurite answers 201.
    pub fn create_container(&self, container: &str) {
        self.create_container_with(container, false);
    }

    /// Creates `container` with anonymous read access to its blobs, as a CDN's origin is.
    pub fn create_public_container(&self, container: &str) {
        self.create_container_with(container, true);
    }

    /// The environment that points a second store, the one of variables named `<prefix>AZURE_*`
    /// (gitstore's `BlobStore::open_with_env`), at this Azurite by its endpoint, whatever the
    /// plain variables say.
    pub fn env_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_USE_EMULATOR", "false".to_owned()),
            (
                "AZURE_STORAGE_ENDPOINT",
                format!("http://127.0.0.1:{}/devstoreaccount1", self.port),
            ),
            ("AZURE_ALLOW_HTTP", "true".to_owned()),
            ("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1".to_owned()),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_ACCOUNT_KEY.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
    }

    /// Where anonymous readers reach `container`.
    pub fn container_url(&self, container: &str) -> String {
        format!(
            "http://127.0.0.1:{}/devstoreaccount1/{container}",
            self.port
        )
    }

    /// Anonymous GET of `key` in `container`: what a CDN (or anyone) reads.
    pub fn public_get(&self, container: &str, key: &str) -> Response {
        http(
            "GET",
            &format!(
                "http://127.0.0.1:{}/devstoreaccount1/{container}/{key}",
                self.port
            ),
            &[],
            b"",
        )
    }

    fn create_container_with(&self, container: &str, public: bool) {
        use base64::Engine;
        use hmac::Mac;
        let account = "devstoreaccount1";
        let date = http_date_now();
        let version = "2021-08-06";
        // VERB, 11 standard headers (all empty; Content-Length is empty for 0 since 2015-02-21),
        // canonicalized x-ms- headers, canonicalized resource (the emulator's path repeats the
        // account).
        let access = if public {
            "x-ms-blob-public-access:blob\n"
        } else {
            ""
        };
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\n{access}x-ms-date:{date}\nx-ms-version:{version}\n/{account}/{account}/{container}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(AZURITE_ACCOUNT_KEY)
            .expect("account key is base64");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
        mac.update(string_to_sign.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let auth = format!("SharedKey {account}:{signature}");
        let r = http(
            "PUT",
            &format!(
                "http://127.0.0.1:{}/{account}/{container}?restype=container",
                self.port
            ),
            &[
                ("x-ms-date", date.as_str()),
                ("x-ms-version", version),
                ("Authorization", auth.as_str()),
                ("x-ms-blob-public-access", if public { "blob" } else { "" }),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect::<Vec<(&str, &str)>>(),
            b"",
        );
        assert_eq!(
            r.status,
            201,
            "creating Azurite container {container}: {}\nlog:\n{}",
            r.body,
            tail(&self.dir.path().join("azurite.log"), 20)
        );
    }

    fn kill(&mut self) {
        kill_group(&mut self.child);
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The agent, with a gitstore that notifies it
// ---------------------------------------------------------------------------------------------

/// The uid:gid installs and builds run as in tests; it needs no host account because the
/// sandbox writes its own /etc/passwd.
pub const SANDBOX_USER: &str = "64200:64200";

/// The pnpm store and node_modules volume shared by every test agent, so each test does not
/// download the same packages again; pnpm's store is safe to share between concurrent installs.
pub fn shared_volume() -> PathBuf {
    std::env::temp_dir().join("kiln-test-volume")
}

/// A running `kiln-agent serve` and a gitstore whose pushes notify it, sharing a file store.
/// Both are killed on drop.
pub struct Stack {
    pub gitstore: Gitstore,
    pub agent: Child,
    pub agent_port: u16,
    agent_args: Vec<String>,
    /// The agent's store, when it is not the stack's own file store: its URL and environment.
    agent_store: Option<(String, Vec<(String, String)>)>,
    /// A client token that owns the projects the test pushes.
    pub token: String,
    /// The state dir is a tmpfs of its own (a small disk), unmounted on drop.
    small_state_disk: bool,
    dir: tempfile::TempDir,
}

impl Stack {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts the agent with extra `serve` arguments, then a gitstore pointed at it.
    pub fn start_with(agent_args: &[&str]) -> Self {
        Self::start_with_gitstore(agent_args, &[])
    }

    /// Like [`Stack::start_with`], with extra gitstore `serve` arguments too.
    pub fn start_with_gitstore(agent_args: &[&str], gitstore_args: &[&str]) -> Self {
        Self::start_full(agent_args, gitstore_args, None, None)
    }

    /// A stack whose agent's state dir (repositories, worktrees, statuses, logs) is a tmpfs of
    /// `mib` MiB: a small disk a test can fill. Its publish dir and volume stay on the host's.
    pub fn start_on_small_state_disk(mib: u64, agent_args: &[&str]) -> Self {
        Self::start_full(agent_args, &[], None, Some(mib))
    }

    /// A stack whose gitstore and agent share container `container` of `az`.
    pub fn start_on_azurite(az: &Azurite, container: &str, agent_args: &[&str]) -> Self {
        Self::start_on_azurite_with_env(az, container, agent_args, &[])
    }

    /// [`Stack::start_on_azurite`] with more environment for both daemons.
    pub fn start_on_azurite_with_env(
        az: &Azurite,
        container: &str,
        agent_args: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let env = az.env().into_iter().chain(env.iter().cloned()).collect();
        Self::start_full(
            agent_args,
            &[],
            Some((format!("az://{container}"), env)),
            None,
        )
    }

    fn start_full(
        agent_args: &[&str],
        gitstore_args: &[&str],
        agent_store: Option<(String, Vec<(String, String)>)>,
        state_disk_mib: Option<u64>,
    ) -> Self {
        require_tool("pnpm", "npm install -g pnpm@10");
        require_tool("node", "apt-get install -y nodejs npm");
        require_tool("unshare", "apt-get install -y util-linux");
        let dir = tempfile::Builder::new()
            .prefix("kiln-stack-")
            .tempdir()
            .expect("temp dir");
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).expect("store dir");
        if let Some(mib) = state_disk_mib {
            let state = dir.path().join("state");
            std::fs::create_dir_all(&state).expect("state dir");
            let out = run(Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={mib}m,mode=0755"),
                    "tmpfs",
                ])
                .arg(&state));
            assert!(
                out.ok,
                "mounting a tmpfs state dir (needs root): {}",
                out.stderr
            );
        }
        let port = free_port();
        let agent_args: Vec<String> = agent_args.iter().map(|s| s.to_string()).collect();
        let agent = spawn_agent(dir.path(), port, &agent_args, agent_store.as_ref());
        let gitstore = Gitstore::start_with(Options {
            store: Some(match &agent_store {
                Some((url, _)) => url.clone(),
                None => store.to_string_lossy().into_owned(),
            }),
            args: ["--agent-url".into(), format!("http://127.0.0.1:{port}")]
                .into_iter()
                .chain(gitstore_args.iter().map(|a| a.to_string()))
                .collect(),
            env: agent_store
                .as_ref()
                .map(|(_, e)| e.clone())
                .unwrap_or_default(),
            ..Options::default()
        });
        let token = gitstore.create_client("agent-tests");
        let mut stack = Self {
            gitstore,
            agent,
            agent_port: port,
            agent_args,
            agent_store,
            token,
            small_state_disk: state_disk_mib.is_some(),
            dir,
        };
        stack.wait_agent_healthy();
        stack
    }

    fn wait_agent_healthy(&mut self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(180) {
            if let Ok(Some(status)) = self.agent.try_wait() {
                panic!("kiln-agent exited ({status}):\n{}", self.agent_log());
            }
            if let Ok(r) = try_http("GET", &format!("{}/healthz", self.agent_url()), &[], b"") {
                // The fast engine installs in the background on first start (into the shared
                // volume); waiting for it makes the engine a test builds with predictable.
                if r.status == 200 && r.json()["fast_engine_ready"] == true {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "kiln-agent did not become healthy with its fast engine within 180 s:\n{}",
            self.agent_log()
        );
    }

    pub fn agent_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.agent_port)
    }

    /// SIGKILLs the agent process alone (not its process group), as a crash or the kernel's
    /// OOM killer would: whatever it started must go away by itself.
    pub fn kill_agent(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }

    /// Processes still running a sandbox of this stack's agent.
    pub fn sandbox_processes(&self) -> Vec<String> {
        let marker = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("sandbox-init") && cmdline.contains(&marker) {
                    found.push(cmdline);
                }
            }
        }
        found
    }

    /// Starts the agent again and waits only until it answers, healthy or not (its blob store
    /// may be down).
    pub fn restart_agent_unchecked(&mut self) {
        self.respawn_agent();
        wait_answering(&self.agent_url(), "kiln-agent", || self.agent_log());
    }

    /// Starts the agent again on the same state, port and arguments.
    pub fn restart_agent(&mut self) {
        self.respawn_agent();
        self.wait_agent_healthy();
    }

    fn respawn_agent(&mut self) {
        kill_group(&mut self.agent);
        self.agent = spawn_agent(
            self.dir.path(),
            self.agent_port,
            &self.agent_args,
            self.agent_store.as_ref(),
        );
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Where the agent publishes: `<publish>/<project>/current/`.
    pub fn publish_dir(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A request to the agent with the client token.
    pub fn agent_http(&self, method: &str, path: &str) -> Response {
        let auth = format!("Bearer {}", self.token);
        http(
            method,
            &format!("{}{path}", self.agent_url()),
            &[("Authorization", &auth)],
            b"",
        )
    }

    pub fn status(&self, project: &str) -> serde_json::Value {
        let r = self.agent_http("GET", &format!("/status/{project}"));
        assert_eq!(r.status, 200, "status of {project}: {}", r.body);
        r.json()
    }

    /// Waits until the agent's status for `project` is at `commit` and no longer building;
    /// returns the status. A build refused by the concurrent-builds quota is not settled: the
    /// agent admits it when the client's running build ends.
    pub fn wait_settled(
        &self,
        project: &str,
        commit: &str,
        timeout: Duration,
    ) -> serde_json::Value {
        let started = Instant::now();
        let mut last = serde_json::Value::Null;
        while started.elapsed() < timeout {
            let r = self.agent_http("GET", &format!("/status/{project}"));
            if r.status == 200 {
                last = r.json();
                let active = matches!(
                    last["state"].as_str(),
                    Some("queued" | "syncing" | "installing" | "building" | "publishing")
                ) || (last["state"] == "refused"
                    && last["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("concurrent_builds")));
                if last["commit"].as_str() == Some(commit) && !active {
                    return last;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{project} did not settle at {commit} within {timeout:?}; last status: {last:#}\nagent log:\n{}",
            self.agent_log()
        );
    }

    /// The build log of the current build.
    pub fn build_log(&self, project: &str) -> String {
        self.agent_http("GET", &format!("/logs/{project}")).body
    }

    /// Every asset named `*.<ext>` (`js`, `css`) of `project`'s current build, concatenated.
    pub fn published_assets(&self, project: &str, ext: &str) -> String {
        let assets = self.publish_dir().join(project).join("current/assets");
        std::fs::read_dir(&assets)
            .unwrap_or_else(|e| panic!("{}: {e}", assets.display()))
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == ext))
            .map(|e| std::fs::read_to_string(e.path()).expect("a published asset"))
            .collect()
    }

    /// The published file `rel` of `project`'s current build.
    pub fn published(&self, project: &str, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.publish_dir().join(project).join("current").join(rel)).ok()
    }

    /// Sends the agent the signed sync webhook for `project`, as gitstore does after each new
    /// manifest generation (a push, a delete, a restore, a share).
    pub fn sync(&self, project: &str) -> Response {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970");
        // Unique, as gitstore's attempt number makes each of its requests: the agent refuses
        // a signature it has already seen.
        let body = format!(
            "{{\"project\":\"{project}\",\"delivery\":\"{}\"}}",
            now.as_nanos()
        );
        let ts = now.as_secs();
        let mut signed = format!("{ts}.").into_bytes();
        signed.extend_from_slice(body.as_bytes());
        let sig = format!(
            "sha256={}",
            hmac_sha256_hex(WEBHOOK_SECRET.as_bytes(), &signed)
        );
        http(
            "POST",
            &format!("{}/sync-project/{project}", self.agent_url()),
            &[
                ("X-Kiln-Timestamp", &ts.to_string()),
                ("X-Kiln-Signature-256", &sig),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    }

    /// Pushes `repo`'s main to `project`.
    pub fn push(&self, repo: &Repo, project: &str) {
        let out = repo.push(&self.gitstore.git_url(&self.token, project), &["main"]);
        assert!(out.ok, "push to {project} failed: {}", out.stderr);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        kill_group(&mut self.agent);
        if std::thread::panicking() {
            eprintln!(
                "--- kiln-agent log ---\n{}\n---",
                tail(&self.dir.path().join("agent.log"), 60)
            );
        }
        if self.small_state_disk {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.state_dir())
                .status();
        }
    }
}

/// Several agents sharing one Azurite container, each with its own state and publish dirs and
/// a lease term of `lease_secs`, and a gitstore that notifies them all, as machines behind one
/// front door would be. All are killed on drop.
pub struct Fleet {
    pub gitstore: Gitstore,
    members: Vec<Member>,
    /// A client token that owns the projects the test pushes.
    pub token: String,
    dir: tempfile::TempDir,
}

struct Member {
    id: String,
    port: u16,
    child: Option<Child>,
    home: PathBuf,
    /// The nginx serving this agent's previews (path mode, under /preview), as on its VM.
    nginx: Option<Nginx>,
}

/// The preview URL of fleet agents and their nginx: path mode under `/preview`.
const FLEET_PREVIEWS: &str = "http://127.0.0.1:9/preview";

impl Fleet {
    pub fn start(az: &Azurite, container: &str, n: usize, lease_secs: u64) -> Self {
        Self::start_full(az, container, n, lease_secs, false)
    }

    /// Like [`Fleet::start`], with an nginx per agent serving its previews, each agent
    /// advertising its nginx for a front door.
    pub fn start_with_previews(az: &Azurite, container: &str, n: usize, lease_secs: u64) -> Self {
        Self::start_full(az, container, n, lease_secs, true)
    }

    fn start_full(
        az: &Azurite,
        container: &str,
        n: usize,
        lease_secs: u64,
        previews: bool,
    ) -> Self {
        require_tool("unshare", "apt-get install -y util-linux");
        let dir = tempfile::Builder::new()
            .prefix("kiln-fleet-")
            .tempdir()
            .expect("temp dir");
        let store = (format!("az://{container}"), az.env());
        let mut members = Vec::new();
        let mut nginx_ports = Vec::new();
        for i in 0..n {
            let (id, port, nginx_port) = (format!("agent-{i}"), free_port(), free_port());
            let home = dir.path().join(&id);
            std::fs::create_dir_all(&home).expect("agent dir");
            let mut args: Vec<String> = [
                "--lease-secs",
                &lease_secs.to_string(),
                "--agent-id",
                &id,
                "--advertise-url",
                &format!("http://127.0.0.1:{port}"),
                "--preview-url",
                FLEET_PREVIEWS,
            ]
            .map(str::to_owned)
            .into();
            if previews {
                args.extend([
                    "--advertise-preview".into(),
                    format!("127.0.0.1:{nginx_port}"),
                ]);
            }
            let child = spawn_agent(&home, port, &args, Some(&store));
            members.push(Member {
                id,
                port,
                child: Some(child),
                home,
                nginx: None,
            });
            nginx_ports.push(nginx_port);
        }
        let urls: Vec<String> = members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.port))
            .collect();
        let gitstore = Gitstore::start_with(Options {
            args: vec!["--agent-url".into(), urls.join(",")],
            ..az.gitstore_options(container)
        });
        let token = gitstore.create_client("fleet-tests");
        let mut fleet = Self {
            gitstore,
            members,
            token,
            dir,
        };
        for i in 0..n {
            wait_answering(&fleet.url(i), fleet.id(i), || fleet.log(i));
        }
        if previews {
            use std::os::unix::fs::PermissionsExt;
            let open = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(fleet.dir.path(), open.clone()).expect("chmod");
            for (m, port) in fleet.members.iter_mut().zip(nginx_ports) {
                std::fs::set_permissions(&m.home, open.clone()).expect("chmod");
                let www = m.home.join("www");
                m.nginx = Some(Nginx::start(port, &www, &["--preview-url", FLEET_PREVIEWS]));
            }
        }
        fleet
    }

    /// A front door nginx on a free port: previews routed to the agent that holds each
    /// project's lease, by asking the agents (`kiln nginx render --route-agents`).
    pub fn front_door(&self) -> Nginx {
        let agents: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        let empty = self.dir.path().join("front-door-www");
        std::fs::create_dir_all(&empty).expect("mkdir");
        Nginx::start(
            free_port(),
            &empty,
            &[
                "--preview-url",
                FLEET_PREVIEWS,
                "--route-agents",
                &agents.join(","),
            ],
        )
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn id(&self, i: usize) -> &str {
        &self.members[i].id
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].port)
    }

    pub fn alive(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// SIGKILLs agent `i`, everything it started and its nginx, as when its machine dies.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            kill_group(&mut c);
        }
        self.members[i].nginx = None;
    }

    /// A request to agent `i` with the client token.
    pub fn http(&self, i: usize, method: &str, path: &str) -> Response {
        let auth = format!("Bearer {}", self.token);
        http(
            method,
            &format!("{}{path}", self.url(i)),
            &[("Authorization", &auth)],
            b"",
        )
    }

    /// Agent `i`'s published file `rel` of `project`'s current build.
    pub fn published(&self, i: usize, project: &str, rel: &str) -> Option<String> {
        let path = self.members[i]
            .home
            .join("www")
            .join(project)
            .join("current")
            .join(rel);
        std::fs::read_to_string(path).ok()
    }

    pub fn log(&self, i: usize) -> String {
        tail(&self.members[i].home.join("agent.log"), 60)
    }

    pub fn push(&self, repo: &Repo, project: &str) {
        let out = repo.push(&self.gitstore.git_url(&self.token, project), &["main"]);
        assert!(out.ok, "push to {project} failed: {}", out.stderr);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if std::thread::panicking() && self.alive(i) {
                eprintln!("--- {} log ---\n{}\n---", self.members[i].id, self.log(i));
            }
            self.kill(i);
        }
    }
}

/// Waits (120 s at most) until the daemon at `url` answers `/healthz`, healthy or not.
fn wait_answering(url: &str, name: &str, log: impl Fn() -> String) {
    let started = Instant::now();
    while try_http("GET", &format!("{url}/healthz"), &[], b"").is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{name} did not answer within 120 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_agent(
    dir: &Path,
    port: u16,
    args: &[String],
    store: Option<&(String, Vec<(String, String)>)>,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .expect("log file");
    let mut cmd = Command::new(bin("kiln-agent"));
    hermetic_env(&mut cmd);
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--store")
        .arg(match store {
            Some((url, _)) => url.into(),
            None => dir.join("store"),
        })
        .envs(store.map(|(_, env)| env.clone()).unwrap_or_default())
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--publish-dir")
        .arg(dir.join("www"))
        .arg("--volume-dir")
        .arg(shared_volume())
        .args(["--webhook-secret", WEBHOOK_SECRET])
        .args(["--sandbox-user", SANDBOX_USER])
        .args(args)
        .env("KILN_LOG", "info")
        // Tests count kept builds, not their age; and the test machine's disk use must not
        // decide which tests find their node_modules evicted. A test passes the flag to use
        // either.
        .env("KILN_KEEP_BUILDS_SECS", "0")
        .env("KILN_DISK_HIGH_WATER", "100")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .process_group(0);
    if !args.iter().any(|a| a == "--preview-url") {
        // Nothing serves previews unless a test starts nginx and says where.
        cmd.args(["--preview-url", "http://127.0.0.1:9/"]);
    }
    cmd.spawn().expect("starting kiln-agent")
}

/// The asset names a published index.html loads from `<base>assets/`.
pub fn referenced_assets(index: &str, base: &str) -> Vec<String> {
    let prefix = format!("{base}assets/");
    index
        .match_indices(&prefix)
        .map(|(i, _)| {
            index[i + prefix.len()..]
                .split(['"', '\''])
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// A new repository at `path` holding the Vite + React + TypeScript fixture app
/// (tests/fixtures/vite-react-ts, with a real pnpm lockfile) committed on `main`.
pub fn fixture_app(path: &Path) -> Repo {
    fixture("vite-react-ts", path)
}

/// A new repository at `path` holding the app `tests/fixtures/<name>` committed on `main`:
/// `vite-react-ts` (small) or `generated-app` (~100 files in the style app generators write:
/// React Router, shadcn/ui, Tailwind, TanStack Query).
pub fn fixture(name: &str, path: &Path) -> Repo {
    let r = Repo::init(path);
    copy_tree(&fixture_dir(name), path);
    r.git_ok(&["add", "-A"]);
    r.git_ok(&["commit", "-q", "-m", &format!("scaffold {name}")]);
    r
}

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Copies the tree at `src` to `dst`, leaving out `.git`, `node_modules` and `dist`; returns the
/// number of files copied.
pub fn copy_tree(src: &Path, dst: &Path) -> usize {
    std::fs::create_dir_all(dst).expect("mkdir");
    let mut files = 0;
    for e in std::fs::read_dir(src)
        .expect("reading a tree to copy")
        .flatten()
    {
        let name = e.file_name();
        if [".git", "node_modules", "dist"].iter().any(|n| name == *n) {
            continue;
        }
        let to = dst.join(&name);
        if e.file_type().expect("file type").is_dir() {
            files += copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copying a file");
            files += 1;
        }
    }
    files
}

// ---------------------------------------------------------------------------------------------
// nginx, with the configuration `kiln nginx render` makes
// ---------------------------------------------------------------------------------------------

/// A running nginx serving a publish directory with Kiln's rendered configuration, on
/// 127.0.0.1:`port` as a plain foreground process (its pid file, temporary files and logs in its
/// own temp dir). Master and workers are killed on drop.
pub struct Nginx {
    child: Child,
    port: u16,
    conf: String,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Renders the configuration for `publish_dir` with `render_args` added (e.g.
    /// `["--preview-url", "http://{project}.preview.test"]`), starts nginx on 127.0.0.1:`port`
    /// and waits (10 s at most) until it answers HTTP.
    ///
    /// Run as root, nginx's workers drop to www-data as in production: every directory above
    /// `publish_dir` must let others through (mode o+x), as the agent's 0711 state dir does.
    pub fn start(port: u16, publish_dir: &Path, render_args: &[&str]) -> Self {
        let nginx = nginx_bin();
        check_workers_can_reach(publish_dir);
        let dir = tempfile::Builder::new()
            .prefix("kiln-nginx-")
            .tempdir()
            .expect("temp dir");
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).expect("runtime dir");
        for d in [dir.path(), runtime.as_path()] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .expect("chmod nginx dirs");
        }
        let conf_path = dir.path().join("nginx.conf");
        let mut render = Command::new(bin("kiln"));
        hermetic_env(&mut render);
        let out = run(render
            .args(["nginx", "render", "--out"])
            .arg(&conf_path)
            .args(["--http-listen", &format!("127.0.0.1:{port}")])
            .arg("--publish-dir")
            .arg(publish_dir)
            .arg("--runtime-dir")
            .arg(&runtime)
            .arg("--error-log")
            .arg(dir.path().join("error.log"))
            .arg("--access-log")
            .arg(dir.path().join("access.log"))
            .args(render_args));
        assert!(out.ok, "kiln nginx render failed:\n{}", out.stderr);
        let conf = std::fs::read_to_string(&conf_path).expect("rendered nginx.conf");
        let log = std::fs::File::create(dir.path().join("nginx.out")).expect("log file");
        let child = Command::new(&nginx)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", nginx.display()));
        let mut n = Self {
            child,
            port,
            conf,
            dir,
        };
        n.wait_answering();
        n
    }

    /// Answering means our master wrote its pid file (after binding the port) and a request got
    /// a response: a bare connect could reach another program that holds the port.
    fn wait_answering(&mut self) {
        let pid_file = self.dir.path().join("run/nginx.pid");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nginx exited ({status}) on 127.0.0.1:{}:\n{}\n{}",
                    self.port,
                    tail(&self.dir.path().join("nginx.out"), 20),
                    tail(&self.dir.path().join("error.log"), 20)
                );
            }
            let ours = std::fs::read_to_string(&pid_file)
                .is_ok_and(|p| p.trim() == self.child.id().to_string());
            if ours && try_http("GET", &format!("{}/", self.base_url()), &[], b"").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nginx did not answer on 127.0.0.1:{} within 10 s:\n{}",
            self.port,
            tail(&self.dir.path().join("error.log"), 20)
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The nginx.conf it runs, as rendered.
    pub fn conf(&self) -> &str {
        &self.conf
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// A GET of `path` (starting with `/`) with extra headers.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http("GET", &format!("{}{path}", self.base_url()), headers, b"")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "--- nginx on port {}: error log ---\n{}\n--- access log ---\n{}\n---",
                self.port,
                tail(&self.dir.path().join("error.log"), 30),
                tail(&self.dir.path().join("access.log"), 30)
            );
        }
    }
}

/// nginx lives in /usr/sbin, which is not on every user's PATH.
pub fn nginx_bin() -> PathBuf {
    let sbin = Path::new("/usr/sbin/nginx");
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("nginx").is_file()));
    if !on_path && sbin.is_file() {
        return sbin.to_owned();
    }
    require_tool("nginx", "apt-get install -y nginx");
    PathBuf::from("nginx")
}

/// Fails early, naming the directory, when workers that drop to www-data could not reach
/// `publish_dir`; nginx itself would only answer 403.
fn check_workers_can_reach(publish_dir: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        return;
    }
    for dir in publish_dir.ancestors() {
        if let Ok(m) = std::fs::metadata(dir) {
            assert!(
                m.permissions().mode() & 0o001 != 0,
                "nginx's workers (www-data) cannot reach {}: {} is mode {:o}; chmod o+x it",
                publish_dir.display(),
                dir.display(),
                m.permissions().mode() & 0o7777
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_has_the_imf_fixdate_shape() {
        let d = http_date_now();
        assert!(d.ends_with(" GMT") && d.len() == 29, "{d}");
        assert_eq!(&d[3..5], ", ");
    }

    #[test]
    fn dechunk_joins_chunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
    }
}
