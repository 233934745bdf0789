//! Preview benchmark (issue 2): how long a one-file change takes from `git push` to a published
//! preview on Kiln's agent, against the time Vite itself needs to build the same change.
//!
//! Run with `cargo bench -p kiln-tests --bench preview` (or `make bench`). Everything is real: the
//! agent and gitstore processes of the test harness ([`Stack`]), stock `git`, pnpm and Vite, the
//! build sandbox. Only first installs of an app's packages touch the network.
//!
//! The binaries are release builds (what `make build` deploys): unless `KILN_BIN_DIR` names a
//! directory, the benchmark first runs `cargo build --release` for the agent and gitstore. The
//! agent's own work (sync, checkout, publish with precompression) is several times slower in a
//! debug build, which would measure the optimizer rather than Kiln.
//!
//! For each app (the small `vite-react-ts` fixture and the ~100-file `generated-app` fixture in
//! the style AI app generators produce), and for each build engine the agent offers (`project`,
//! and `fast` when `kiln-agent serve --engine` exists):
//! 1. start a [`Stack`] with that engine, push the app and wait for the first (cold) build;
//! 2. (once per app) install a copy outside the sandbox with `pnpm install --frozen-lockfile` into
//!    a separate pnpm store, which this warms, and build it once;
//! 3. [`CHANGES`] times: change a text constant in a leaf component and commit it, then time
//!    (a) Kiln: from just before `git push` until the agent's status says `ready` for that
//!    commit, polled every [`POLL`], and check the preview holds the new text; (b) the floor:
//!    the same change built by raw `node .../vite/bin/vite.js build` in the installed copy, with
//!    the Vite that engine runs (the project's own, or the fast engine's from the agent's
//!    volume). The order alternates, so drifting machine load falls on both;
//! 4. (once per app) the plain CI flow, [`CI_RUNS`] times: a fresh `git clone` from gitstore,
//!    `pnpm install --frozen-lockfile --prefer-offline` from the warm store, a Vite build;
//! 5. cold materialization, [`COLD_RUNS`] times: push the app to a new project, so the agent syncs,
//!    installs from its already-warm store and builds; against (once per app) `pnpm install
//!    --offline` and the project's Vite build in a fresh copy of the same tree;
//! 6. print per app and engine a table of medians (p90 where there are [`CHANGES`] samples),
//!    ratios to the baselines and the goals, the per-phase medians and every build; then a
//!    summary.
//!
//! The goals (issue 2): Kiln's overhead beyond Vite's own work at most [`OVERHEAD_GOAL_MS`] at the
//! median, and cold materialization within [`COLD_GOAL`]x of an offline install plus build. A
//! missed goal is reported as "missed"; the benchmark panics (exits non-zero) only when something
//! fails: a push, an install, a build, a preview without the change.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_tests::bench::{self, median, percentile, progress};
use kiln_tests::{bin, copy_tree, fixture, fixture_dir, run, shared_volume, Repo, Stack};

/// One-file changes timed per app and engine.
const CHANGES: usize = 7;
/// Runs of the plain CI flow per app.
const CI_RUNS: usize = 3;
/// New projects materialized per app and engine.
const COLD_RUNS: usize = 2;
/// How often the agent's status is polled while waiting for a preview.
const POLL: Duration = Duration::from_millis(20);
/// Goal: Kiln's push-to-preview median exceeds the raw Vite build median by at most this.
const OVERHEAD_GOAL_MS: f64 = 150.0;
/// Goal: a one-file change of the ~100-file generated app, on the fast engine, is served
/// within this from `git push`.
const SERVED_GOAL_MS: f64 = 1000.0;
/// Goal: cold materialization takes at most this many times an offline install plus build.
const COLD_GOAL: f64 = 1.3;
/// The longest a build that installs packages may take.
const COLD_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest a one-file change may take.
const WARM_TIMEOUT: Duration = Duration::from_secs(180);

/// An app the benchmark builds, and the constant its one-file changes rewrite.
struct App {
    /// Directory under `tests/fixtures/`.
    fixture: &'static str,
    /// Project id prefix on the agent.
    project: &'static str,
    /// The leaf file each change edits.
    leaf: &'static str,
    /// The start of the line declaring the constant; a change replaces the whole line.
    decl: &'static str,
}

const APPS: [App; 2] = [
    App {
        fixture: "vite-react-ts",
        project: "small",
        leaf: "src/text.ts",
        decl: "export const TEXT: string",
    },
    App {
        fixture: "generated-app",
        project: "generated",
        leaf: "src/components/layout/site-footer.tsx",
        decl: "const TAGLINE",
    },
];

fn main() {
    // `cargo bench` passes `--bench` (and any filter); this benchmark has a single scenario.
    let bins = bench::release_binaries();
    let engines = engines();
    let tmp = tempfile::Builder::new()
        .prefix("kiln-bench-preview-")
        .tempdir()
        .expect("temp dir");
    let store = bench_store();
    println!(
        "Kiln preview benchmark (issue 2): binaries {bins}; engines {}; baselines' pnpm store {}",
        engines.join(", "),
        store.display()
    );
    let offered = engines.len() > 1;
    let mut results = Vec::new();
    for app in &APPS {
        let mut base = floor_setup(app, &tmp.path().join(app.project), &store);
        for engine in &engines {
            let dir = tmp.path().join(format!("{}-{engine}", app.project));
            let r = bench_app(app, engine, offered, &base, &dir, &store);
            if base.ci.is_empty() {
                base.ci = r.ci.clone();
            }
            if base.cold.is_empty() {
                base.cold = r.cold_base.clone();
            }
            if engine == "project" {
                base.project_floor = r.floor_ms.clone();
            }
            print!("{}", r.render());
            results.push(r);
        }
    }
    println!();
    print!("{}", summary(&results));
    println!("notes:");
    for note in [
        "kiln: from just before `git push` until /status says ready for the pushed commit \
         (polled every 20 ms); each preview's JS is checked to hold its change"
            .to_owned(),
        "overhead: per change, kiln's time minus Vite's own rebuild as the agent's warm process \
         timed it (buildStart to end; status.vite_ms), then the median: what Kiln adds (push, \
         webhook, sync, checkout, the copy into the warm process, publish, status)"
            .to_owned(),
        "watcher: the same change rebuilt by `vite build --watch` (driven by agent/src/warm.mjs) in \
         a second installed copy outside the sandbox, timed from the file's write to the end of \
         the rebuild; kiln - watcher also holds the sandbox's effect on Vite itself"
            .to_owned(),
        "vite (floor): raw `node <vite>/bin/vite.js build` of the same change in a copy installed \
         once outside the sandbox, with the Vite the engine runs (project: the app's Vite 5; \
         fast: the fast engine's, from the agent's volume)"
            .to_owned(),
        "ci: `git clone` from gitstore + `pnpm install --frozen-lockfile --prefer-offline` (warm \
         store) + the app's vite build; cold: a new project on the agent (sync + install from its \
         warm store + build) against `pnpm install --offline --frozen-lockfile` + the app's vite \
         build in a fresh copy"
            .to_owned(),
        format!(
            "p90 is nearest-rank over {CHANGES} samples; run took {:.0?}",
            bench::elapsed()
        ),
    ] {
        println!("  - {note}");
    }
}

// ---------------------------------------------------------------------------------------------
// Setup: binaries, engines, the baselines' pnpm store, the apps
// ---------------------------------------------------------------------------------------------

fn engines() -> Vec<String> {
    let help = run(Command::new(bin("kiln-agent")).args(["serve", "--help"]));
    assert!(help.ok, "kiln-agent serve --help failed: {}", help.stderr);
    if help.stdout.contains("--engine") && help.stdout.contains("fast") {
        vec!["project".into(), "fast".into()]
    } else {
        vec!["project".into()]
    }
}

/// The pnpm store the baselines install from, kept between runs like the harness's shared
/// volume, and separate from it so the agent's store being warm never helps a baseline.
fn bench_store() -> PathBuf {
    std::env::temp_dir().join("kiln-bench-pnpm-store")
}

/// The fast engine's Vite, as installed by an agent into the shared volume (the newest install
/// when there are several).
fn fast_engine_vite() -> PathBuf {
    let engines = shared_volume().join("engines");
    let newest = std::fs::read_dir(&engines)
        .expect("the agent's engines dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fast-"))
        .filter_map(|e| {
            let done = e.path().join(".kiln-installed").metadata().ok()?;
            Some((done.modified().ok()?, e.path()))
        })
        .max();
    let (_, dir) = newest.unwrap_or_else(|| {
        panic!(
            "no installed fast engine under {}, though the agent said it was ready",
            engines.display()
        )
    });
    let vite = dir.join("node_modules/vite/bin/vite.js");
    assert!(vite.is_file(), "{} is missing", vite.display());
    vite
}

/// `app`'s leaf file under `root`, with its constant set to `text`.
fn edited(app: &App, root: &Path, text: &str) -> String {
    let path = root.join(app.leaf);
    let src = std::fs::read_to_string(&path).expect("reading the leaf file");
    let mut found = false;
    let mut out = String::new();
    for line in src.lines() {
        if !found && line.starts_with(app.decl) {
            found = true;
            let _ = writeln!(out, "{} = {text:?};", app.decl);
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(
        found,
        "{} has no line starting with {:?}",
        path.display(),
        app.decl
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Commands, timed
// ---------------------------------------------------------------------------------------------

/// Runs `cmd`, panicking with its output unless it exits 0; returns its wall time in ms.
fn timed(cmd: &mut Command, what: &str) -> f64 {
    let t = Instant::now();
    let out = run(cmd);
    let ms = ms(t.elapsed());
    assert!(
        out.ok,
        "{what} failed:\n{}\n{}",
        tail(&out.stdout, 30),
        tail(&out.stderr, 30)
    );
    ms
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `pnpm install --frozen-lockfile --ignore-scripts` in `dir` from `store`, plus `extra` flags.
fn pnpm_install(dir: &Path, store: &Path, extra: &str) -> f64 {
    let mut cmd = Command::new("pnpm");
    cmd.current_dir(dir)
        .args([
            "install",
            "--frozen-lockfile",
            "--ignore-scripts",
            "--reporter=append-only",
            "--config.confirmModulesPurge=false",
            extra,
        ])
        .arg(format!("--store-dir={}", store.display()))
        .env("CI", "true")
        .env("npm_config_update_notifier", "false");
    timed(
        &mut cmd,
        &format!("pnpm install {extra} in {}", dir.display()),
    )
}

/// `node <vite> build` in `dir`; `vite` is relative to `dir` or absolute.
fn vite_build(dir: &Path, vite: &Path) -> f64 {
    let mut cmd = Command::new("node");
    cmd.current_dir(dir)
        .arg(vite)
        .arg("build")
        .env("CI", "true");
    timed(
        &mut cmd,
        &format!("{} build in {}", vite.display(), dir.display()),
    )
}

/// The project's own Vite, relative to the app's directory.
fn project_vite() -> PathBuf {
    PathBuf::from("node_modules/vite/bin/vite.js")
}

/// The JavaScript under `assets/` of `dir`, concatenated.
fn bundle(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("assets")) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "js") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Kiln
// ---------------------------------------------------------------------------------------------

/// One build on the agent, as the benchmark saw it and the agent reported it.
#[derive(Clone, Debug)]
struct Build {
    /// From just before `git push` until the status said ready.
    total_ms: f64,
    /// The `git push` process alone (until gitstore acknowledged a durable push).
    push_ms: f64,
    /// The agent's phase timings (`sync`, `checkout`, `install`, `build`, `publish`).
    phases: BTreeMap<String, f64>,
    engine: String,
    install: String,
    /// How the agent's warm process served it (`rebuilt`, `started`, ...), empty when cold.
    warm: String,
    /// Vite's own time for the build, as the warm process measured it (warm builds only).
    vite_ms: Option<f64>,
}

impl Build {
    fn phase(&self, name: &str) -> f64 {
        self.phases.get(name).copied().unwrap_or(0.0)
    }

    /// Time in neither `git push` nor a phase the agent timed: webhook delivery, queueing,
    /// bookkeeping between phases, and the poll's resolution.
    fn other_ms(&self) -> f64 {
        self.total_ms - self.push_ms - self.phases.values().sum::<f64>()
    }
}

/// Pushes `repo` to `project` and waits, polling every [`POLL`], until the agent's status is
/// ready at the pushed commit; panics with the status and build log if the build did not
/// succeed.
fn push_to_preview(stack: &Stack, repo: &Repo, project: &str, timeout: Duration) -> Build {
    let commit = repo.head();
    let path = format!("/status/{project}");
    let t = Instant::now();
    stack.push(repo, project);
    let push_ms = ms(t.elapsed());
    loop {
        let r = stack.agent_http("GET", &path);
        if r.status == 200 {
            let st = r.json();
            let active = matches!(
                st["state"].as_str(),
                Some("queued" | "syncing" | "installing" | "building" | "publishing")
            );
            if st["commit"].as_str() == Some(commit.as_str()) && !active {
                let total_ms = ms(t.elapsed());
                assert_eq!(
                    st["state"],
                    "ready",
                    "the build of {project} at {commit} did not succeed: {st:#}\nbuild log:\n{}",
                    tail(&stack.build_log(project), 60)
                );
                let phases = st["phases"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                return Build {
                    total_ms,
                    push_ms,
                    phases,
                    engine: st["engine"].as_str().unwrap_or("?").to_owned(),
                    install: st["install"].as_str().unwrap_or("-").to_owned(),
                    warm: st["warm"].as_str().unwrap_or_default().to_owned(),
                    vite_ms: st["vite_ms"].as_f64(),
                };
            }
        }
        assert!(
            t.elapsed() < timeout,
            "{project} was not ready at {commit} within {timeout:?}; last answer {} {}\nagent \
             log:\n{}",
            r.status,
            r.body,
            tail(&stack.agent_log(), 40)
        );
        std::thread::sleep(POLL);
    }
}

/// Waits until the agent says its fast engine is installed, when it reports that at all.
fn wait_fast_engine(stack: &Stack) {
    let t = Instant::now();
    loop {
        let r = stack.agent_http("GET", "/healthz");
        let ready = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .map(|v| v["fast_engine_ready"].clone());
        if ready != Some(serde_json::Value::Bool(false)) {
            return;
        }
        assert!(
            t.elapsed() < COLD_TIMEOUT,
            "the agent's fast engine was not ready within {COLD_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The warm watcher's own rebuild time: `vite build --watch` in an installed copy, outside Kiln
/// (no push, no sandbox), driven by the agent's own `agent/src/warm.mjs` so that the end of the
/// rebuild that holds a change is known exactly.
struct WatchFloor {
    child: std::process::Child,
    events: std::sync::mpsc::Receiver<serde_json::Value>,
    dir: PathBuf,
    /// Where the last build's output is: warm.mjs moves each build's to a directory of its own.
    out: PathBuf,
}

impl WatchFloor {
    fn start(dir: &Path, vite_pkg: &Path) -> Self {
        let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src/warm.mjs");
        // A previous engine's floor left its done-<n> outputs here, which this one's would
        // not replace.
        let _ = std::fs::remove_dir_all(dir.join("dist-watch"));
        let mut child = Command::new("node")
            .arg(driver)
            .arg(vite_pkg)
            .arg(dir)
            .arg("/")
            .arg(dir.join("dist-watch"))
            // Its checkout to copy changes from: the floor writes them into the root itself.
            .arg(dir)
            .current_dir(dir)
            .env("CI", "true")
            .env("NODE_ENV", "production")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting the watcher floor");
        let stdout = child.stdout.take().expect("piped");
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some((_, json)) = line.split_once("\x1ekiln:") {
                    if let Ok(v) = serde_json::from_str(json) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut w = Self {
            child,
            events,
            dir: dir.to_owned(),
            out: PathBuf::new(),
        };
        w.until_end();
        w
    }

    fn until_end(&mut self) {
        let end = self.until(|e| e["ev"] == "end");
        // Named under the outDir it was given.
        let name = end["out"].as_str().expect("the build's output directory");
        self.out = self.dir.join("dist-watch").join(name);
    }

    fn until(&self, mut done: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
        loop {
            let e = self
                .events
                .recv_timeout(WARM_TIMEOUT)
                .expect("the watcher floor stopped reporting");
            assert!(e["ev"] != "error", "the watcher floor's build failed: {e}");
            if done(&e) {
                return e;
            }
        }
    }

    /// Writes `content` to `rel` as the agent's warm process does (by rename for Rolldown, in
    /// place for Rollup, whose watcher loses renamed files) and returns the time until the
    /// rebuild that started after the watcher saw it ended.
    fn rebuild(&mut self, rel: &str, content: &str, rename: bool) -> f64 {
        let path = self.dir.join(rel);
        let t = Instant::now();
        if rename {
            let tmp = path.with_extension("kiln-bench-tmp");
            std::fs::write(&tmp, content).expect("writing the leaf");
            std::fs::rename(&tmp, &path).expect("renaming the leaf");
        } else {
            std::fs::write(&path, content).expect("writing the leaf");
        }
        self.until(|e| e["ev"] == "change" && e["id"] == rel);
        self.until(|e| e["ev"] == "start");
        self.until_end();
        ms(t.elapsed())
    }
}

impl Drop for WatchFloor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// One app
// ---------------------------------------------------------------------------------------------

/// What is measured once per app and shared by its engines.
struct Baselines {
    files: usize,
    /// The copy installed once outside the sandbox, for the floor's Vite builds.
    floor_dir: PathBuf,
    /// A second such copy, for the watcher floor (a watcher in `floor_dir` would rebuild on
    /// the raw floor's edits).
    watch_dir: PathBuf,
    /// Its first install and build.
    first_ms: f64,
    /// Filled by the first engine's run, reused by the others.
    ci: Vec<CiRun>,
    cold: Vec<(f64, f64)>,
    /// The floor of the `project` engine's run: the app's own Vite.
    project_floor: Vec<f64>,
}

#[derive(Clone, Copy, Debug)]
struct CiRun {
    clone_ms: f64,
    install_ms: f64,
    build_ms: f64,
}

impl CiRun {
    fn total(&self) -> f64 {
        self.clone_ms + self.install_ms + self.build_ms
    }
}

/// Installs `app` once outside the sandbox (warming the baselines' store) and builds it once,
/// so the floor starts as warm as Kiln after its first build.
fn floor_setup(app: &App, dir: &Path, store: &Path) -> Baselines {
    progress(&format!("{}: installing the floor copy", app.fixture));
    let floor_dir = dir.join("floor");
    let files = copy_tree(&fixture_dir(app.fixture), &floor_dir);
    let install_ms = pnpm_install(&floor_dir, store, "--prefer-offline");
    let build_ms = vite_build(&floor_dir, &project_vite());
    let watch_dir = dir.join("watch");
    copy_tree(&fixture_dir(app.fixture), &watch_dir);
    pnpm_install(&watch_dir, store, "--prefer-offline");
    Baselines {
        files,
        floor_dir,
        watch_dir,
        first_ms: install_ms + build_ms,
        ci: Vec::new(),
        cold: Vec::new(),
        project_floor: Vec::new(),
    }
}

struct AppResult {
    app: &'static str,
    engine: String,
    files: usize,
    first: Build,
    first_base_ms: f64,
    changes: Vec<Build>,
    /// Raw Vite builds of the same changes, with this engine's Vite.
    floor_ms: Vec<f64>,
    /// The same changes rebuilt by a `vite build --watch` of this engine's Vite outside Kiln.
    watch_ms: Vec<f64>,
    /// The app's own Vite, for the fast engine's comparison.
    project_floor_ms: Vec<f64>,
    ci: Vec<CiRun>,
    cold: Vec<Build>,
    cold_base: Vec<(f64, f64)>,
    /// `/proc/loadavg` when the run started and ended, to spot other work on the machine.
    load: (String, String),
}

/// The 1-minute load average.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn bench_app(
    app: &App,
    engine: &str,
    offered: bool,
    base: &Baselines,
    dir: &Path,
    store: &Path,
) -> AppResult {
    let label = format!("{}/{engine}", app.fixture);
    let load_before = load_average();
    progress(&format!("{label}: starting the stack"));
    let args: &[&str] = if offered { &["--engine", engine] } else { &[] };
    let stack = Stack::start_with(args);
    wait_fast_engine(&stack);
    let project = format!("{}-{engine}", app.project);
    let vite = if engine == "fast" {
        fast_engine_vite()
    } else {
        project_vite()
    };

    // 1. The first build.
    progress(&format!("{label}: first build"));
    let repo = fixture(app.fixture, &dir.join("repo"));
    let first = push_to_preview(&stack, &repo, &project, COLD_TIMEOUT);
    let published = stack.publish_dir().join(&project).join("current");
    if engine != "project" {
        // One untimed build with this Vite (floor_setup built with the app's own), so its first
        // run's cold caches are not in the samples.
        vite_build(&base.floor_dir, &vite);
    }

    progress(&format!("{label}: starting the watcher floor"));
    let vite_pkg = if engine == "fast" {
        vite.parent()
            .and_then(Path::parent)
            .expect("vite/bin/vite.js")
            .to_owned()
    } else {
        base.watch_dir.join("node_modules/vite")
    };
    let mut watcher = WatchFloor::start(&base.watch_dir, &vite_pkg);

    // 3. One-file changes: Kiln, the raw floor and the watcher floor, in turns going first.
    progress(&format!("{label}: {CHANGES} one-file changes"));
    let mut changes = Vec::new();
    let mut floor_ms = Vec::new();
    let mut watch_ms = Vec::new();
    for i in 0..CHANGES {
        let text = format!("Kiln bench edit {i} of {project}");
        let content = edited(app, &repo.path, &text);
        let kiln = |changes: &mut Vec<Build>| {
            repo.commit_file(app.leaf, &content);
            changes.push(push_to_preview(&stack, &repo, &project, WARM_TIMEOUT));
            assert!(
                bundle(&published).contains(&text),
                "the preview of {project} does not hold the change {text:?}"
            );
        };
        let floor = |floor_ms: &mut Vec<f64>| {
            std::fs::write(base.floor_dir.join(app.leaf), &content).expect("writing the leaf");
            floor_ms.push(vite_build(&base.floor_dir, &vite));
            assert!(
                bundle(&base.floor_dir.join("dist")).contains(&text),
                "the floor's build does not hold the change {text:?}"
            );
        };
        let mut watch = |watch_ms: &mut Vec<f64>| {
            watch_ms.push(watcher.rebuild(app.leaf, &content, engine == "fast"));
            assert!(
                bundle(&watcher.out).contains(&text),
                "the watcher floor's build does not hold the change {text:?}"
            );
        };
        match i % 3 {
            0 => {
                kiln(&mut changes);
                floor(&mut floor_ms);
                watch(&mut watch_ms);
            }
            1 => {
                floor(&mut floor_ms);
                watch(&mut watch_ms);
                kiln(&mut changes);
            }
            _ => {
                watch(&mut watch_ms);
                kiln(&mut changes);
                floor(&mut floor_ms);
            }
        }
    }
    drop(watcher);

    // 4. The plain CI flow, once per app: it does not involve the agent.
    let ci = if base.ci.is_empty() {
        progress(&format!("{label}: {CI_RUNS} plain CI runs"));
        (0..CI_RUNS)
            .map(|i| {
                let to = dir.join(format!("ci-{i}"));
                let url = stack.gitstore.git_url(&stack.token, &project);
                let t = Instant::now();
                let clone = Repo::try_clone(&url, &to, &[])
                    .unwrap_or_else(|o| panic!("git clone {url} failed:\n{}", o.stderr));
                let clone_ms = ms(t.elapsed());
                let install_ms = pnpm_install(&clone.path, store, "--prefer-offline");
                let build_ms = vite_build(&clone.path, &project_vite());
                CiRun {
                    clone_ms,
                    install_ms,
                    build_ms,
                }
            })
            .collect()
    } else {
        base.ci.clone()
    };

    // 5. Cold materialization: new projects on the agent; offline installs of fresh copies
    // once per app.
    progress(&format!("{label}: {COLD_RUNS} cold materializations"));
    let mut cold = Vec::new();
    for i in 0..COLD_RUNS {
        let b = push_to_preview(&stack, &repo, &format!("{project}-new{i}"), COLD_TIMEOUT);
        assert_eq!(b.install, "ran", "a new project installs its packages");
        cold.push(b);
    }
    let cold_base = if base.cold.is_empty() {
        (0..COLD_RUNS)
            .map(|i| {
                let copy = dir.join(format!("cold-{i}"));
                copy_tree(&repo.path, &copy);
                let install_ms = pnpm_install(&copy, store, "--offline");
                (install_ms, vite_build(&copy, &project_vite()))
            })
            .collect()
    } else {
        base.cold.clone()
    };

    AppResult {
        app: app.fixture,
        engine: engine.to_owned(),
        files: base.files,
        first,
        first_base_ms: base.first_ms,
        changes,
        project_floor_ms: if engine == "project" {
            floor_ms.clone()
        } else {
            base.project_floor.clone()
        },
        floor_ms,
        watch_ms,
        ci,
        cold,
        cold_base,
        load: (load_before, load_average()),
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and the tables
// ---------------------------------------------------------------------------------------------

fn p90(xs: &[f64]) -> f64 {
    percentile(xs, 0.9)
}

fn millis(v: f64) -> String {
    format!("{v:.0} ms")
}

fn signed(v: f64) -> String {
    format!("{v:+.0} ms")
}

fn list(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

/// The engines the agent reported for `builds`, e.g. `fast` or `fast+project` after a fallback.
fn engines_seen(builds: &[Build]) -> String {
    let mut seen: Vec<&str> = builds.iter().map(|b| b.engine.as_str()).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.join("+")
}

const PHASES: [&str; 5] = ["sync", "checkout", "install", "build", "publish"];

/// A table row: metric, kiln value, baseline name and value, ratio, goal, result.
struct Row {
    metric: String,
    kiln: String,
    baseline: String,
    value: String,
    ratio: String,
    goal: String,
    result: &'static str,
}

impl Row {
    /// Two times and their ratio.
    fn ratio(metric: String, kiln: f64, baseline: &str, value: f64) -> Self {
        Self {
            metric,
            kiln: millis(kiln),
            baseline: baseline.to_owned(),
            value: millis(value),
            ratio: format!("{:.2}x", kiln / value),
            goal: String::new(),
            result: "",
        }
    }

    /// A difference in ms and what it is.
    fn diff(metric: &str, kiln: f64, what: &str) -> Self {
        Self {
            metric: metric.to_owned(),
            kiln: signed(kiln),
            baseline: what.to_owned(),
            value: String::new(),
            ratio: String::new(),
            goal: String::new(),
            result: "",
        }
    }

    fn goal(mut self, goal: String, met: bool) -> Self {
        self.goal = goal;
        self.result = verdict(met);
        self
    }
}

fn render_rows(rows: &[Row]) -> String {
    let mut s = String::new();
    let line = |s: &mut String, r: [&str; 7]| {
        let _ = writeln!(
            s,
            "{:<42} {:>9}  {:<38} {:>8} {:>6}  {:<9} {}",
            r[0], r[1], r[2], r[3], r[4], r[5], r[6]
        );
    };
    line(
        &mut s,
        ["metric", "kiln", "baseline", "", "ratio", "goal", "result"],
    );
    let _ = writeln!(s, "{}", "-".repeat(128));
    for r in rows {
        line(
            &mut s,
            [
                &r.metric,
                &r.kiln,
                &r.baseline,
                &r.value,
                &r.ratio,
                &r.goal,
                r.result,
            ],
        );
    }
    s
}

impl AppResult {
    fn kiln_ms(&self) -> Vec<f64> {
        self.changes.iter().map(|b| b.total_ms).collect()
    }

    /// Kiln's time beyond Vite's own work on each change (the rebuild its warm process
    /// reported), at the median; a cold build counts whole.
    fn overhead_ms(&self) -> f64 {
        let beyond: Vec<f64> = self
            .changes
            .iter()
            .map(|b| b.total_ms - b.vite_ms.unwrap_or(0.0))
            .collect();
        median(&beyond)
    }

    fn ci_ms(&self) -> Vec<f64> {
        self.ci.iter().map(CiRun::total).collect()
    }

    fn cold_ms(&self) -> Vec<f64> {
        self.cold.iter().map(|b| b.total_ms).collect()
    }

    fn cold_base_ms(&self) -> Vec<f64> {
        self.cold_base.iter().map(|(i, b)| i + b).collect()
    }

    fn cold_ratio(&self) -> f64 {
        median(&self.cold_ms()) / median(&self.cold_base_ms())
    }

    fn vite_label(&self) -> &'static str {
        if self.engine == "fast" {
            "fast engine's Vite"
        } else {
            "app's own Vite"
        }
    }

    fn render(&self) -> String {
        let kiln = self.kiln_ms();
        let floor = &self.floor_ms;
        let watch = &self.watch_ms;
        let overhead = self.overhead_ms();
        let paired: Vec<f64> = kiln.iter().zip(watch).map(|(k, w)| k - w).collect();
        let outside: Vec<f64> = self
            .changes
            .iter()
            .map(|b| b.total_ms - b.phase("build"))
            .collect();
        let build_phase: Vec<f64> = self.changes.iter().map(|b| b.phase("build")).collect();
        let mut rows = vec![
            Row::ratio(
                format!("one-file push-to-preview, median (N={CHANGES})"),
                median(&kiln),
                &format!("watcher's own rebuild ({}), median", self.vite_label()),
                median(watch),
            ),
            Row::ratio(
                "one-file push-to-preview, p90".into(),
                p90(&kiln),
                "watcher's own rebuild, p90",
                p90(watch),
            ),
            Row::diff(
                "  overhead beyond Vite's own rebuild (median)",
                overhead,
                "kiln - the rebuild its warm process timed",
            )
            .goal(
                format!("<= {OVERHEAD_GOAL_MS:.0} ms"),
                overhead <= OVERHEAD_GOAL_MS,
            ),
            Row::diff(
                "  beyond the watcher outside Kiln (median)",
                median(&kiln) - median(watch),
                "kiln median - watcher median (info)",
            ),
            Row::diff(
                "  same, median of paired differences",
                median(&paired),
                "(info)",
            ),
            Row::diff(
                "  kiln outside the build phase, median",
                median(&outside),
                "push+sync+checkout+publish+other (info)",
            ),
            Row::ratio(
                "  build phase (sandboxed watcher), median".into(),
                median(&build_phase),
                "watcher's own rebuild, median (info)",
                median(watch),
            ),
            Row::ratio(
                "one-file push-to-preview vs raw build".into(),
                median(&kiln),
                &format!("raw vite build ({}), median", self.vite_label()),
                median(floor),
            ),
        ];
        if self.app == "generated-app" && self.engine == "fast" {
            let k = median(&kiln);
            rows.push(
                Row::diff(
                    "  large app, fast engine: served within",
                    k - SERVED_GOAL_MS,
                    "kiln median - 1000 ms",
                )
                .goal(format!("< {SERVED_GOAL_MS:.0} ms"), k < SERVED_GOAL_MS),
            );
        }
        if self.engine != "project" && !self.project_floor_ms.is_empty() {
            rows.push(Row::ratio(
                "  push-to-preview vs the app's own Vite".into(),
                median(&kiln),
                "raw vite build (app's own Vite) (info)",
                median(&self.project_floor_ms),
            ));
        }
        rows.extend([
            Row::ratio(
                format!("one-file push-to-preview vs CI (N={CI_RUNS})"),
                median(&kiln),
                "clone + pnpm install + build (info)",
                median(&self.ci_ms()),
            ),
            Row::ratio(
                format!("cold materialization, median (N={COLD_RUNS})"),
                median(&self.cold_ms()),
                "pnpm install --offline + vite build",
                median(&self.cold_base_ms()),
            )
            .goal(
                format!("<= {COLD_GOAL:.1}x"),
                self.cold_ratio() <= COLD_GOAL,
            ),
            Row::ratio(
                "first build (project's first push)".into(),
                self.first.total_ms,
                "first install + build, no sandbox (info)",
                self.first_base_ms,
            ),
        ]);

        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n== {} ({} files), agent engine {} (builds reported engine: {}; load average {} \
             -> {}) ==",
            self.app,
            self.files,
            self.engine,
            engines_seen(&self.changes),
            self.load.0,
            self.load.1
        );
        s.push_str(&render_rows(&rows));
        let _ = writeln!(
            s,
            "phase medians, one-file builds (ms): {}",
            phase_medians(&self.changes)
        );
        let _ = writeln!(
            s,
            "phase medians, cold builds (ms):     {}",
            phase_medians(&self.cold)
        );
        let _ = writeln!(
            s,
            "first build (ms):                    {} (install {})",
            phase_medians(std::slice::from_ref(&self.first)),
            self.first.install
        );
        let _ = writeln!(s, "one-file builds (ms):");
        let _ = writeln!(
            s,
            "  {:>2} {:>7} {:>6} {:>6} {:>8} {:>7} {:>7} {:>6} {:>9} {:>8}  engine",
            "#",
            "total",
            "push",
            "sync",
            "checkout",
            "build",
            "publish",
            "other",
            "raw vite",
            "watcher"
        );
        for (i, ((b, f), w)) in self.changes.iter().zip(floor).zip(watch).enumerate() {
            let p = |k: &str| b.phases.get(k).map_or("-".into(), |v| format!("{v:.0}"));
            let _ = writeln!(
                s,
                "  {i:>2} {:>7.0} {:>6.0} {:>6} {:>8} {:>7} {:>7} {:>6.0} {:>9.0} {:>8.0}  {}{}{}",
                b.total_ms,
                b.push_ms,
                p("sync"),
                p("checkout"),
                p("build"),
                p("publish"),
                b.other_ms(),
                f,
                w,
                b.engine,
                if b.warm.is_empty() {
                    String::new()
                } else {
                    format!(" warm {}", b.warm)
                },
                if b.install == "skipped" {
                    String::new()
                } else {
                    format!(" (install {})", b.install)
                }
            );
        }
        let _ = writeln!(
            s,
            "ci runs, clone/install/build (ms): {}",
            self.ci
                .iter()
                .map(|c| format!("{:.0}/{:.0}/{:.0}", c.clone_ms, c.install_ms, c.build_ms))
                .collect::<Vec<_>>()
                .join("  ")
        );
        let _ = writeln!(
            s,
            "cold kiln (ms): {}; cold baseline, install/build (ms): {}",
            list(&self.cold_ms()),
            self.cold_base
                .iter()
                .map(|(i, b)| format!("{i:.0}/{b:.0}"))
                .collect::<Vec<_>>()
                .join("  ")
        );
        s
    }
}

/// `push 70  sync 15  checkout 2  build 900  publish 12  other 20`: medians over `builds`.
fn phase_medians(builds: &[Build]) -> String {
    let mut parts = vec![format!(
        "push {:.0}",
        median(&builds.iter().map(|b| b.push_ms).collect::<Vec<_>>())
    )];
    for phase in PHASES {
        let xs: Vec<f64> = builds
            .iter()
            .filter_map(|b| b.phases.get(phase).copied())
            .collect();
        if !xs.is_empty() {
            parts.push(format!("{phase} {:.0}", median(&xs)));
        }
    }
    parts.push(format!(
        "other {:.0}",
        median(&builds.iter().map(Build::other_ms).collect::<Vec<_>>())
    ));
    parts.join("  ")
}

/// One line per app and engine with the two goals.
fn summary(results: &[AppResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Summary: medians of {CHANGES} one-file changes; watcher = `vite build --watch` rebuild \
         outside Kiln, vite = raw build, both with the engine's Vite; overhead = kiln - the \
         rebuild time the agent's warm process reported"
    );
    let header = format!(
        "{:<14} {:<7} {:>8} {:>8} {:>8} {:>8} {:>9} {:<7} {:>8} {:>8} {:>9} {:>6} {:<7}",
        "app",
        "engine",
        "kiln",
        "kiln p90",
        "watcher",
        "vite",
        "overhead",
        "<=150ms",
        "ci flow",
        "cold",
        "cold base",
        "ratio",
        "<=1.3x"
    );
    let _ = writeln!(s, "{header}");
    let _ = writeln!(s, "{}", "-".repeat(header.len()));
    for r in results {
        let overhead = r.overhead_ms();
        let _ = writeln!(
            s,
            "{:<14} {:<7} {:>8} {:>8} {:>8} {:>8} {:>9} {:<7} {:>8} {:>8} {:>9} {:>5.2}x {:<7}",
            r.app,
            engines_seen(&r.changes),
            millis(median(&r.kiln_ms())),
            millis(p90(&r.kiln_ms())),
            millis(median(&r.watch_ms)),
            millis(median(&r.floor_ms)),
            signed(overhead),
            verdict(overhead <= OVERHEAD_GOAL_MS),
            millis(median(&r.ci_ms())),
            millis(median(&r.cold_ms())),
            millis(median(&r.cold_base_ms())),
            r.cold_ratio(),
            verdict(r.cold_ratio() <= COLD_GOAL)
        );
    }
    s
}
