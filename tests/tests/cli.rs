//! The `kiln` operator CLI end to end: real gitstore and agent processes, the stock git CLI, and
//! what a person (or a script, with `--json`) sees.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::*;

/// Longest any one `kiln` command may take here (a cold install and build included).
const KILN_TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished `kiln` printed, and its exit code.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    #[track_caller]
    fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "kiln failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// How `kiln` is run: its environment and working directory, nothing inherited from the
/// developer's shell that Kiln or git would read.
struct Kiln {
    env: Vec<(String, String)>,
    cwd: tempfile::TempDir,
}

impl Kiln {
    fn new(git_url: &str, agent_url: &str, token: &str) -> Self {
        Self {
            env: vec![
                ("KILN_GIT_URL".into(), git_url.into()),
                ("KILN_AGENT_URL".into(), agent_url.into()),
                ("KILN_TOKEN".into(), token.into()),
            ],
            // No .kiln/local/credentials.env here, so only the variables above apply.
            cwd: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// No settings in the environment at all.
    fn bare() -> Self {
        Self {
            env: Vec::new(),
            cwd: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn for_stack(stack: &Stack) -> Self {
        Self::new(&stack.gitstore.base_url(), &stack.agent_url(), &stack.token)
    }

    fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    fn run(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(bin("kiln"));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("KILN_") || k.starts_with("GIT_") || k == "NO_COLOR" {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .envs(self.env.iter().cloned())
            .current_dir(self.cwd.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = format!("kiln {}", args.join(" "));
        let mut child = cmd.spawn().expect("starting kiln");
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("waiting for kiln") {
                break s;
            }
            if started.elapsed() > KILN_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{shown}` ran longer than {KILN_TIMEOUT:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            code: status.code().unwrap_or(-1),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }
}

/// A static site (no package.json: the agent publishes it as is, in well under a second) with a
/// `node_modules` that must never be pushed and a file its `.gitignore` leaves out.
fn static_site(dir: &Path) {
    let files = [
        (
            "index.html",
            "<!doctype html><title>site</title><script src=\"app.js\"></script>\n",
        ),
        ("app.js", "document.title = 'first'\n"),
        ("css/site.css", "body { margin: 0 }\n"),
        (".gitignore", "*.log\n"),
        ("debug.log", "not pushed: ignored\n"),
        (
            "node_modules/left-pad/index.js",
            "module.exports = 'not pushed'\n",
        ),
        ("pages/node_modules/x.js", "nested, not pushed either\n"),
    ];
    for (rel, content) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}

/// Every file under `dir` and its content, leaving out `.git`, `node_modules` and `*.log`.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if p.is_dir() {
                if name != ".git" && name != "node_modules" {
                    walk(root, &p, out);
                }
            } else if !name.ends_with(".log") {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The real git on PATH, for a wrapper to hand over to.
fn real_git() -> PathBuf {
    require_tool("git", "apt-get install -y git");
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("git"))
        .find(|p| p.is_file())
        .unwrap()
}

#[test]
fn push_creates_versions_that_clone_back_and_list_with_their_build() {
    let stack = Stack::start();
    let kiln = Kiln::for_stack(&stack);
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    static_site(&site);

    let first = kiln.run(&["push", site.to_str().unwrap(), "site", "--wait"]);
    first.assert_ok();
    assert!(first.stdout.contains("pushed site"), "{first:?}");
    assert!(first.stdout.contains("ready"), "{first:?}");
    assert!(
        first.stdout.contains("preview http://127.0.0.1:9/site/"),
        "the preview URL is shown: {first:?}"
    );

    let clone = Repo::clone(
        &stack.gitstore.git_url(&stack.token, "site"),
        &tmp.path().join("clone"),
    );
    let c1 = clone.head();
    assert!(first.stdout.contains(&c1), "the commit is shown: {first:?}");
    assert_eq!(
        tree(&clone.path),
        tree(&site),
        "the clone holds the dir minus node_modules and ignored files"
    );
    assert!(!clone.path.join("node_modules").exists());
    assert!(!clone.path.join("pages/node_modules").exists());
    assert!(!clone.path.join("debug.log").exists());

    std::fs::write(site.join("app.js"), "document.title = 'second'\n").unwrap();
    std::fs::remove_file(site.join("css/site.css")).unwrap();
    std::fs::write(site.join("about.html"), "<p>about</p>\n").unwrap();
    let second = kiln.run(&[
        "push",
        site.to_str().unwrap(),
        "site",
        "-m",
        "second version",
        "--wait",
        "--json",
    ]);
    second.assert_ok();
    let v = second.json();
    assert_eq!(v["parent"], c1.as_str(), "{v:#}");
    assert_eq!(v["state"], "ready", "{v:#}");
    assert_eq!(v["files"], 4, "{v:#}");
    let c2 = v["commit"].as_str().unwrap().to_owned();
    clone.git_ok(&["pull", "-q", "--ff-only"]);
    assert_eq!(clone.head(), c2);
    assert_eq!(
        clone.git_ok(&["rev-parse", "HEAD^"]),
        c1,
        "the second push has the first as parent"
    );
    assert_eq!(
        clone.git_ok(&["log", "-1", "--format=%s"]),
        "second version"
    );
    assert_eq!(tree(&clone.path), tree(&site));
    assert_eq!(
        stack.published("site", "app.js").as_deref(),
        Some("document.title = 'second'\n")
    );

    let same = kiln.run(&["push", site.to_str().unwrap(), "site", "--json"]);
    same.assert_ok();
    assert_eq!(same.json()["unchanged"], true, "{same:?}");
    assert_eq!(same.json()["commit"], c2.as_str());

    let listed = kiln.run(&["projects"]);
    listed.assert_ok();
    let row = listed
        .stdout
        .lines()
        .find(|l| l.starts_with("site "))
        .unwrap_or_else(|| panic!("site is listed: {listed:?}"));
    assert!(row.contains(&c2[..12]) && row.contains("ready"), "{row}");
    assert!(row.contains("http://127.0.0.1:9/site/"), "{row}");
    assert!(listed.stdout.starts_with("PROJECT"), "{listed:?}");

    let listed = kiln.run(&["projects", "--json"]);
    listed.assert_ok();
    let list = listed.json();
    let p = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "site")
        .unwrap_or_else(|| panic!("site in {list:#}"));
    assert_eq!(p["commit"], c2.as_str());
    assert!(p["updated_at"].as_u64().unwrap() > 0);
    assert_eq!(p["agent"]["state"], "ready");
    assert_eq!(p["agent"]["commit"], c2.as_str());

    // Projects belong to the client that pushed them.
    let other = Kiln::for_stack(&stack).with("KILN_TOKEN", stack.gitstore.create_client("other"));
    let theirs = other.run(&["projects", "--json"]);
    theirs.assert_ok();
    assert_eq!(theirs.json(), serde_json::json!([]));
    let theirs = other.run(&["projects"]);
    assert!(theirs.stdout.contains("no projects yet"), "{theirs:?}");

    // `make up` leaves its settings in .kiln/local/credentials.env, read when nothing is set.
    let local = Kiln::bare();
    let creds = local.cwd.path().join(".kiln/local");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(
        creds.join("credentials.env"),
        format!(
            "# Written by make up\nKILN_TOKEN={}\nKILN_GIT_URL={}\nKILN_AGENT_URL={}\n",
            stack.token,
            stack.gitstore.base_url(),
            stack.agent_url()
        ),
    )
    .unwrap();
    let st = local.run(&["status", "site", "--json"]);
    st.assert_ok();
    assert_eq!(st.json()["commit"], c2.as_str());
    let nothing = Kiln::bare().run(&["status", "site"]);
    assert_eq!(nothing.code, 1, "{nothing:?}");
    assert!(nothing.stderr.contains("set KILN_TOKEN"), "{nothing:?}");
}

#[test]
fn status_logs_and_build_show_a_real_build() {
    let stack = Stack::start();
    let kiln = Kiln::for_stack(&stack);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "shop");
    let commit = app.head();
    stack.wait_settled("shop", &commit, Duration::from_secs(300));

    let st = kiln.run(&["status", "shop"]);
    st.assert_ok();
    assert!(
        st.stdout.starts_with("shop: ready (build 1, commit "),
        "{st:?}"
    );
    assert!(st.stdout.contains(&commit[..12]), "{st:?}");
    for line in ["engine", "phases", "preview"] {
        assert!(st.stdout.contains(line), "{line} shown: {st:?}");
    }
    let st = kiln.run(&["status", "shop", "--json"]);
    st.assert_ok();
    let v = st.json();
    assert_eq!(v["state"], "ready");
    assert_eq!(v["commit"], commit.as_str());

    let queued = kiln.run(&["build", "shop"]);
    queued.assert_ok();
    assert!(
        queued.stdout.contains("queued build 2 of shop"),
        "{queued:?}"
    );
    let followed = kiln.run(&["logs", "shop", "-f"]);
    followed.assert_ok();
    assert!(followed.stdout.contains("==> build"), "{followed:?}");
    assert!(
        followed.stdout.contains("published"),
        "the log runs to the end: {followed:?}"
    );
    let after = stack.status("shop");
    assert_eq!(after["build"], 2, "{after:#}");
    assert_eq!(
        after["state"], "ready",
        "-f returned only once the build ended: {after:#}"
    );

    let old = kiln.run(&["logs", "shop", "--build", "1", "--json"]);
    old.assert_ok();
    assert_eq!(old.json()["build"], 1);
    assert!(old.json()["log"].as_str().unwrap().contains("==> install"));

    let rebuilt = kiln.run(&["build", "shop", "--wait"]);
    rebuilt.assert_ok();
    assert!(
        rebuilt.stdout.contains("shop build 3 ready at"),
        "{rebuilt:?}"
    );
    assert_eq!(stack.status("shop")["build"], 3);

    let unknown = kiln.run(&["status", "nope"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("no project nope"), "{unknown:?}");
}

#[test]
fn refuses_a_bad_project_id_a_missing_dir_and_an_empty_dir() {
    // Nothing listens on port 9: these must be refused before anything is sent.
    let kiln = Kiln::new(
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        "kiln_aaaaaaaaaaaa_x",
    );
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    static_site(&site);

    let bad = kiln.run(&["push", site.to_str().unwrap(), "My_App"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(
        bad.stderr.contains("invalid project id \"My_App\""),
        "{bad:?}"
    );
    assert!(
        bad.stderr.contains("a-z, 0-9 and '-'"),
        "the rule is stated: {bad:?}"
    );

    let missing = tmp.path().join("no-such-dir");
    let r = kiln.run(&["push", missing.to_str().unwrap(), "app"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("no-such-dir") && r.stderr.contains("no such directory"),
        "{r:?}"
    );

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let r = kiln.run(&["push", empty.to_str().unwrap(), "app"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("the directory is empty"), "{r:?}");

    let only_deps = tmp.path().join("only-deps");
    std::fs::create_dir_all(only_deps.join("node_modules/x")).unwrap();
    std::fs::write(only_deps.join("node_modules/x/i.js"), "x").unwrap();
    let r = kiln.run(&["push", only_deps.to_str().unwrap(), "app"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("nothing to push"), "{r:?}");

    let usage = kiln.run(&["push", site.to_str().unwrap()]);
    assert_eq!(usage.code, 2, "a usage error exits 2: {usage:?}");
}

#[test]
fn rejects_a_bad_token_naming_the_variable() {
    let gitstore = Gitstore::start();
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    static_site(&site);
    let kiln = Kiln::new(
        &gitstore.base_url(),
        "http://127.0.0.1:9",
        "kiln_aaaaaaaaaaaa_notarealsecretnotarealsecretnotareal",
    );
    let r = kiln.run(&["push", site.to_str().unwrap(), "app"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("refused the token"), "{r:?}");
    assert!(r.stderr.contains("KILN_TOKEN"), "{r:?}");
    assert!(
        store_snapshot(&gitstore.store_dir(), "app").is_empty(),
        "nothing was stored"
    );

    let r = kiln.run(&["projects", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("refused the token"),
        "{r:?}"
    );

    let none = Kiln::new(&gitstore.base_url(), "http://127.0.0.1:9", "").with("KILN_TOKEN", "");
    let r = none.run(&["push", site.to_str().unwrap(), "app"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("set KILN_TOKEN"), "{r:?}");
}

/// The token reaches git through its environment: every argument vector git is started with
/// (recorded by a wrapper first on PATH) is free of it, while the pushes it authorized succeed.
#[test]
fn push_keeps_the_token_out_of_gits_arguments() {
    let gitstore = Gitstore::start();
    let token = gitstore.create_client("argv");
    let tmp = tempfile::tempdir().unwrap();
    let wrappers = tmp.path().join("bin");
    std::fs::create_dir(&wrappers).unwrap();
    let argv_log = tmp.path().join("git-argv.log");
    let wrapper = wrappers.join("git");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            argv_log.display(),
            real_git().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        wrappers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kiln = Kiln::new(&gitstore.base_url(), "http://127.0.0.1:9", &token).with("PATH", path);
    let site = tmp.path().join("site");
    static_site(&site);
    kiln.run(&["push", site.to_str().unwrap(), "argv"])
        .assert_ok();
    std::fs::write(site.join("app.js"), "document.title = 'again'\n").unwrap();
    kiln.run(&["push", site.to_str().unwrap(), "argv"])
        .assert_ok();

    let argv = std::fs::read_to_string(&argv_log).expect("the wrapper ran");
    assert!(argv.lines().any(|l| l.starts_with("fetch ")), "{argv}");
    assert_eq!(
        argv.lines().filter(|l| l.starts_with("push ")).count(),
        2,
        "{argv}"
    );
    let secret = token.rsplit('_').next().unwrap();
    assert!(
        !argv.contains(secret),
        "the token is in git's arguments:\n{argv}"
    );
    assert!(!argv.contains('@'), "credentials in a URL:\n{argv}");
}

#[test]
fn doctor_reports_every_check_as_json_and_text() {
    let gitstore = Gitstore::start();
    let kiln = Kiln::new(&gitstore.base_url(), "", "")
        .with("KILN_STORE_URL", gitstore.store_url())
        .with("KILN_SANDBOX_USER", SANDBOX_USER);
    let r = kiln.run(&["doctor", "--json"]);
    let checks = r.json();
    let checks = checks.as_array().expect("an array of checks");
    let by_name = |name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {checks:#?}"))
    };
    for c in checks {
        assert!(c["ok"].is_boolean() && c["detail"].is_string(), "{c:#}");
        assert!(
            c["ok"] == true || c["fix"].is_string(),
            "a failed check says what to fix: {c:#}"
        );
    }
    for name in [
        "agent host check",
        "cgroups",
        "namespaces",
        "overlayfs",
        "sandbox user",
        "node",
        "pnpm",
        "pnpm volume",
        "publish dir",
        "blob store",
        "nginx",
        "gitstore",
        "agent",
    ] {
        by_name(name);
    }
    // The tests run as root on a host with cgroups, as the agent does.
    assert_eq!(
        by_name("namespaces")["ok"],
        true,
        "{:#}",
        by_name("namespaces")
    );
    assert_eq!(by_name("cgroups")["ok"], true, "{:#}", by_name("cgroups"));
    assert_eq!(by_name("sandbox user")["ok"], true);
    assert_eq!(
        by_name("blob store")["ok"],
        true,
        "{:#}",
        by_name("blob store")
    );
    assert_eq!(by_name("gitstore")["ok"], true, "{:#}", by_name("gitstore"));
    assert_eq!(by_name("agent")["level"], "skip", "no agent URL was set");
    let failed = checks.iter().any(|c| c["ok"] == false);
    assert_eq!(
        r.code,
        i32::from(failed),
        "exit 1 exactly when a check failed: {r:?}"
    );

    let text = kiln.run(&["doctor"]);
    assert_eq!(text.code, r.code);
    assert!(text.stdout.contains("✓ namespaces"), "{text:?}");
    assert!(text.stdout.contains("checks:"), "{text:?}");
}

#[test]
fn projects_lists_every_clients_projects_for_the_admin_even_without_an_agent() {
    let gitstore = Gitstore::start_with(Options {
        admin_token: Some("kiln-test-admin-token".into()),
        ..Options::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let mut heads = Vec::new();
    for (client, project) in [("a", "alpha"), ("b", "beta")] {
        let token = gitstore.create_client(client);
        let repo = Repo::init(&tmp.path().join(project));
        heads.push(repo.commit_file("index.html", format!("<p>{project}</p>\n")));
        let out = repo.push(&gitstore.git_url(&token, project), &["main"]);
        assert!(out.ok, "{}", out.stderr);
    }
    // Nothing listens on port 9: the build states are missing, the listing is not.
    let admin = Kiln::new(&gitstore.base_url(), "http://127.0.0.1:9", "")
        .with("KILN_ADMIN_TOKEN", "kiln-test-admin-token");
    let r = admin.run(&["projects", "--json"]);
    r.assert_ok();
    let list = r.json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "beta"], "{list:#}");
    assert_eq!(list[0]["commit"], heads[0].as_str());
    assert_eq!(list[1]["commit"], heads[1].as_str());
    assert!(list[0]["agent"].is_null(), "{list:#}");
    assert!(
        r.stderr
            .contains("warning: no build states: cannot reach the agent"),
        "{r:?}"
    );
}
