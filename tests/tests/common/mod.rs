//! A small harness for the gitstore end-to-end tests: real `kiln-gitstore` processes, real `git`,
//! real Azurite, each on a free 127.0.0.1 port and killed on drop.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-webhook-secret-0123456789";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Panics with the install command when a tool the test needs is missing.
pub fn require(tool: &str, install: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is required: {install}");
}

pub fn bin() -> PathBuf {
    let dir = std::env::var_os("KILN_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let b = dir.join("kiln-gitstore");
    assert!(
        b.exists(),
        "{} missing: run `cargo build -p kiln-gitstore`",
        b.display()
    );
    b
}

/// Runs a command, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn git(dir: &Path, args: &[&str]) -> (bool, String, String) {
    require("git", "apt-get install -y git");
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=t@kiln.test", "-c", "user.name=t"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0"))
}

pub fn git_ok(dir: &Path, args: &[&str]) -> String {
    let (ok, out, err) = git(dir, args);
    assert!(ok, "git {args:?} failed: {err}");
    out.trim().to_owned()
}

/// A fresh repository with a small Vite + React app committed on main.
pub fn make_app(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir.join("src/components")).unwrap();
    git_ok(dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("package.json"), r#"{"name":"app","private":true,"scripts":{"build":"vite build"},"dependencies":{"react":"^18.3.1","react-dom":"^18.3.1"},"devDependencies":{"vite":"^5.4.0"}}"#).unwrap();
    std::fs::write(dir.join("index.html"), "<!doctype html><div id=\"root\"></div><script type=\"module\" src=\"/src/main.jsx\"></script>\n").unwrap();
    std::fs::write(dir.join("src/main.jsx"), "import { createRoot } from 'react-dom/client'\nimport { TEXT } from './text.js'\ncreateRoot(document.getElementById('root')).render(<h1>{TEXT}</h1>)\n").unwrap();
    std::fs::write(
        dir.join("src/text.js"),
        format!("export const TEXT = {text:?};\n"),
    )
    .unwrap();
    for i in 0..5 {
        std::fs::write(
            dir.join(format!("src/components/C{i}.jsx")),
            format!("export default function C{i}() {{ return <p>{i}</p> }}\n"),
        )
        .unwrap();
    }
    std::fs::write(dir.join(".gitignore"), "node_modules\n").unwrap();
    git_ok(dir, &["add", "-A"]);
    git_ok(dir, &["commit", "-qm", "app"]);
}

pub fn commit_file(dir: &Path, path: &str, content: &str) -> String {
    let p = dir.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
    git_ok(dir, &["add", "-A"]);
    git_ok(dir, &["commit", "-qm", path]);
    git_ok(dir, &["rev-parse", "HEAD"])
}

/// A running gitstore node.
pub struct Gitstore {
    child: Child,
    pub port: u16,
    pub store: String,
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

#[derive(Default)]
pub struct Options {
    pub store: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Gitstore {
    pub fn start(opts: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = opts
            .store
            .unwrap_or_else(|| dir.path().join("store").to_string_lossy().into_owned());
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("gitstore.log")).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            &store,
        ])
        .arg("--data-dir")
        .arg(dir.path().join("cache"))
        .args(["--webhook-secret", SECRET])
        .args(&opts.args)
        .envs(opts.env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
        let child = cmd.spawn().expect("start gitstore");
        let g = Self {
            child,
            port,
            store,
            dir,
            env: opts.env,
        };
        g.wait_healthy();
        g
    }

    fn wait_healthy(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if self.http("GET", "/healthz", None, None).0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "gitstore not healthy on {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gitstore.log")).unwrap_or_default()
    }

    /// A new client's token, made with the CLI straight in the store.
    pub fn client(&self, name: &str) -> String {
        let (ok, out, err) = run(Command::new(bin())
            .args(["create-client", name, "--store", &self.store])
            .envs(self.env.iter().cloned()));
        assert!(ok, "create-client: {err}");
        out.trim().to_owned()
    }

    pub fn url(&self, token: &str, project: &str) -> String {
        format!(
            "http://kiln:{token}@127.0.0.1:{}/git/{project}.git",
            self.port
        )
    }

    /// (status, body) of an HTTP request, through curl.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method]);
        if let Some(t) = bearer {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        cmd.arg(format!("http://127.0.0.1:{}{path}", self.port));
        let (_, out, _) = run(&mut cmd);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Kills the node and every git process and hook it started.
    pub fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
    }

    pub fn store_dir(&self) -> PathBuf {
        PathBuf::from(&self.store)
    }
}

impl Drop for Gitstore {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The newest manifest of `project` in a file store.
pub fn manifest(store: &Path, project: &str) -> Option<serde_json::Value> {
    let dir = store.join(format!("projects/{project}/manifests"));
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    names.sort();
    let last = names.pop()?;
    serde_json::from_slice(&std::fs::read(last).ok()?).ok()
}

pub fn generation(store: &Path, project: &str) -> u64 {
    manifest(store, project).map_or(0, |m| m["generation"].as_u64().unwrap())
}

/// A running Azurite blob service with one container made for the test.
pub struct Azurite {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    pub fn start() -> Self {
        require("azurite-blob", "npm install -g azurite@3.35.0");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("azurite-blob")
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--disableTelemetry",
                "--silent",
                "--location",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start azurite");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "azurite did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// Environment object_store needs to reach this Azurite.
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
            ("AZURE_STORAGE_ACCOUNT_KEY".into(), AZURITE_KEY.into()),
        ]
    }

    /// Creates a container with a SharedKey-signed PUT (object_store cannot create containers).
    pub fn create_container(&self, name: &str) {
        use base64::Engine;
        use hmac::Mac;
        let date = httpdate_now();
        let version = "2021-08-06";
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/devstoreaccount1/devstoreaccount1/{name}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(AZURITE_KEY)
            .unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(string_to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let (_, code, _) = run(Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            &format!("x-ms-date: {date}"),
            "-H",
            &format!("x-ms-version: {version}"),
            "-H",
            &format!("Authorization: SharedKey devstoreaccount1:{sig}"),
            "-H",
            "Content-Length: 0",
            &format!(
                "http://127.0.0.1:{}/devstoreaccount1/{name}?restype=container",
                self.port
            ),
        ]));
        assert_eq!(code, "201", "creating container {name} in azurite");
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

fn httpdate_now() -> String {
    let (_, out, _) = run(Command::new("date")
        .args(["-u", "+%a, %d %b %Y %H:%M:%S GMT"])
        .env("LC_ALL", "C"));
    out.trim().to_owned()
}
