//! Versions benchmark (issue 6): rollback, export, the project list and storage per version, each
//! against a baseline measured in the same run.
//!
//! Run with `cargo bench -p kiln-tests --bench versions` (or `make bench`). Everything is real:
//! release builds of gitstore, the agent and `kiln` (unless `KILN_BIN_DIR` names a directory), a
//! real nginx rendered by `kiln nginx render` in path mode, stock `git`. Nothing touches the
//! network: the apps are static sites (no package.json), so builds are copies.
//!
//! 1. **Rollback**: push two versions of a static app, then [`ROLLBACKS`] times roll back and
//!    forth between their builds and time from the API call until nginx serves the target's page.
//!    Baseline: what a generator without rollback does, pushing the old content again as a new
//!    commit and waiting until nginx serves it ([`REPUSHES`] times).
//! 2. **Export** of a 40-file project as tar.gz, zip and WebContainer JSON from the agent's API,
//!    [`EXPORTS`] times each; baseline `git archive --format=tar.gz` in a local clone.
//! 3. **Project list** of [`PROJECTS`] projects (created through `POST /api/projects`, one in
//!    ten labelled through `PATCH`): the first page, every page following `next_cursor`, and a
//!    label filter, from gitstore's catalog; baseline: rebuilding that catalog from the blob
//!    store (a new node on the same store, until its first list answers), which is what a list
//!    without the catalog costs.
//! 4. **Storage per version**: [`VERSIONS`] one-file commits to the 40-file project; the bytes
//!    each adds to the blob store, against a tar.gz of the whole tree per version (the seeds'
//!    approach), side by side.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_tests::bench::{self, median, percentile, progress};
use kiln_tests::{free_port, http, run, Gitstore, Nginx, Options, Repo, Response, Stack};

const ROLLBACKS: usize = 20;
const REPUSHES: usize = 5;
const EXPORTS: usize = 20;
const PROJECTS: usize = 10_000;
const LIST_RUNS: usize = 5;
const VERSIONS: usize = 10;
const SETTLE: Duration = Duration::from_secs(120);

fn main() {
    let bins = bench::release_binaries();
    let tmp = tempfile::Builder::new()
        .prefix("kiln-bench-versions-")
        .tempdir()
        .expect("temp dir");
    println!("Kiln versions benchmark (issue 6): binaries {bins}");
    // The default projects quota (10,000) would stop the list benchmark one short.
    let stack = Stack::start_with_gitstore(&[], &["--quota-projects", "20000"]);
    let port = free_port();
    let preview = format!("http://127.0.0.1:{port}/preview");
    let nginx = Nginx::start(port, &stack.publish_dir(), &["--preview-url", &preview]);

    let mut table = Table::default();
    rollback(&stack, &nginx, &tmp.path().join("rollback"), &mut table);
    let app = forty_files(&tmp.path().join("forty"));
    stack.push(&app, "forty");
    stack.wait_settled("forty", &app.head(), SETTLE);
    export(&stack, &app, &mut table);
    storage(&stack, &app, &tmp.path().join("tgz"), &mut table);
    list(&stack, tmp.path(), &mut table);
    print!("{}", table.render());
    println!("run took {:.0?}", bench::elapsed());
}

// ---------------------------------------------------------------------------------------------
// 1. Rollback
// ---------------------------------------------------------------------------------------------

fn rollback(stack: &Stack, nginx: &Nginx, dir: &Path, table: &mut Table) {
    progress("rollback: two versions of a static app");
    let app = Repo::init(dir);
    let mut builds = Vec::new();
    for v in ["version one", "version two"] {
        app.write("index.html", page(v));
        app.git_ok(&["add", "-A"]);
        app.git_ok(&["commit", "-q", "-m", v]);
        stack.push(&app, "roll");
        let st = stack.wait_settled("roll", &app.head(), SETTLE);
        assert_eq!(st["state"], "ready", "{st:#}");
        builds.push((st["build"].as_u64().expect("build number"), v));
    }
    wait_served(nginx, "roll", "version two");
    let mut samples = Vec::new();
    for i in 0..ROLLBACKS {
        let (build, text) = builds[i % 2];
        let started = Instant::now();
        let r = agent_post(
            stack,
            "/api/projects/roll/rollback",
            &format!(r#"{{"build": {build}}}"#),
        );
        assert_eq!(r.status, 200, "rollback: {}", r.body);
        wait_served(nginx, "roll", text);
        samples.push(ms(started.elapsed()));
    }
    progress("rollback baseline: push the old content again as a new commit");
    let mut base = Vec::new();
    for i in 0..REPUSHES {
        let text = ["version one", "version two"][i % 2];
        app.write("index.html", page(text));
        app.git_ok(&["commit", "-q", "-am", &format!("again {text} {i}")]);
        let started = Instant::now();
        stack.push(&app, "roll");
        wait_served(nginx, "roll", text);
        base.push(ms(started.elapsed()));
    }
    table.row(
        "rollback: API call until nginx serves the old build",
        &samples,
        "push the old content again, until served",
        &base,
    );
}

fn page(text: &str) -> String {
    format!("<!doctype html><title>bench</title><p>{text}</p>\n")
}

/// Polls nginx (every millisecond: the figure is the switch, not the poll) until the project's
/// page holds `text`.
fn wait_served(nginx: &Nginx, project: &str, text: &str) {
    let started = Instant::now();
    loop {
        let r = nginx.get(&format!("/preview/{project}/"), &[]);
        if r.status == 200 && r.body.contains(text) {
            return;
        }
        assert!(
            started.elapsed() < SETTLE,
            "nginx never served {text:?} for {project}: {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Export
// ---------------------------------------------------------------------------------------------

/// A static site of 40 files the size and texture of generated components (1 to 4 KB each, words
/// from a code-like vocabulary, so they compress about as well as real source does; repeated
/// text would flatter the tar.gz baseline).
fn forty_files(dir: &Path) -> Repo {
    const WORDS: &[&str] = &[
        "const",
        "return",
        "props",
        "useState",
        "className",
        "onClick",
        "items",
        "map",
        "filter",
        "title",
        "description",
        "button",
        "container",
        "flex",
        "grid",
        "text-sm",
        "font-medium",
        "rounded-lg",
        "shadow",
        "px-4",
        "py-2",
        "hover:bg-gray-100",
        "export",
        "default",
        "function",
        "async",
        "await",
        "fetch",
        "response",
        "json",
        "error",
        "loading",
        "setData",
        "useEffect",
        "user",
        "cart",
        "product",
        "price",
        "quantity",
        "total",
        "checkout",
        "form",
        "input",
        "value",
        "onChange",
        "event",
        "target",
        "submit",
        "header",
        "footer",
        "nav",
        "link",
        "href",
        "image",
        "src",
        "alt",
        "width",
        "height",
        "children",
        "key",
        "index",
    ];
    let r = Repo::init(dir);
    r.write("index.html", page("forty files"));
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut word = || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        WORDS[(seed >> 33) as usize % WORDS.len()]
    };
    for i in 0..39 {
        let mut body = format!("// component {i}\nexport function Component{i}(props) {{\n");
        for line in 0..(20 + (i * 7) % 60) {
            let _ = writeln!(
                body,
                "  const {}{line} = {}({}, \"{} {}\");",
                word(),
                word(),
                word(),
                word(),
                word()
            );
        }
        body.push_str("  return null;\n}\n");
        r.write(&format!("src/components/c{i:02}.tsx"), body);
    }
    r.git_ok(&["add", "-A"]);
    r.git_ok(&["commit", "-q", "-m", "forty files"]);
    r
}

fn export(stack: &Stack, app: &Repo, table: &mut Table) {
    progress("export: tar.gz, zip and webcontainer of a 40-file project");
    let mut base = Vec::new();
    for _ in 0..EXPORTS {
        let started = Instant::now();
        let out = run(std::process::Command::new("git")
            .current_dir(&app.path)
            .args(["archive", "--format=tar.gz", "-o", "/dev/null", "HEAD"]));
        assert!(out.ok, "git archive: {}", out.stderr);
        base.push(ms(started.elapsed()));
    }
    for format in ["tar.gz", "zip", "webcontainer"] {
        let mut samples = Vec::new();
        for _ in 0..EXPORTS {
            let started = Instant::now();
            let r = stack.agent_http(
                "GET",
                &format!("/api/projects/forty/export?format={format}"),
            );
            samples.push(ms(started.elapsed()));
            assert_eq!(r.status, 200, "export {format}: {}", r.body);
            assert!(r.bytes.len() > 1000, "export {format} is too small");
        }
        table.row(
            &format!("export of 40 files as {format} (HTTP)"),
            &samples,
            "`git archive --format=tar.gz` in a local clone",
            &base,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Storage per version
// ---------------------------------------------------------------------------------------------

fn storage(stack: &Stack, app: &Repo, dir: &Path, table: &mut Table) {
    progress("storage: one-file commits against a tar.gz per version");
    std::fs::create_dir_all(dir).expect("tgz dir");
    let project_dir = stack.gitstore.store_dir().join("projects/forty");
    let mut kiln = Vec::new();
    let mut tgz = Vec::new();
    let mut manifests = Vec::new();
    for i in 0..VERSIONS {
        let before = du(&project_dir);
        let manifests_before = du(&project_dir.join("manifests"));
        let rel = format!("src/components/c{:02}.tsx", (i * 7) % 39);
        let mut text = std::fs::read_to_string(app.path.join(&rel)).expect("component");
        let _ = writeln!(text, "export const EDIT_{i} = {i};");
        app.write(&rel, text);
        app.git_ok(&["commit", "-q", "-am", &format!("edit {i}")]);
        stack.push(app, "forty");
        kiln.push((du(&project_dir) - before) as f64);
        manifests.push((du(&project_dir.join("manifests")) - manifests_before) as f64);
        let archive = dir.join(format!("v{i}.tar.gz"));
        let out = run(std::process::Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .args(["--exclude=.git", "-C"])
            .arg(&app.path)
            .arg("."));
        assert!(out.ok, "tar: {}", out.stderr);
        tgz.push(std::fs::metadata(&archive).expect("archive").len() as f64);
    }
    table.note(format!(
        "of the bytes per version, the manifest generation is {:.0} B (median); the rest is the \
         pack and its index",
        median(&manifests)
    ));
    table.bytes_row(
        "bytes added to the blob store per one-file version",
        &kiln,
        "a tar.gz of the whole tree per version",
        &tgz,
    );
}

/// Bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = e.metadata() else { continue };
        total += if meta.is_dir() {
            du(&e.path())
        } else {
            meta.len()
        };
    }
    total
}

// ---------------------------------------------------------------------------------------------
// 4. The project list
// ---------------------------------------------------------------------------------------------

fn list(stack: &Stack, scratch: &Path, table: &mut Table) {
    progress(&format!("list: creating {PROJECTS} projects"));
    let base = stack.gitstore.base_url();
    let auth = format!("Bearer {}", stack.token);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (base, auth) = (&base, &auth);
            s.spawn(move || {
                for i in (t..PROJECTS).step_by(4) {
                    let r = http(
                        "POST",
                        &format!("{base}/api/projects"),
                        &[
                            ("Authorization", auth),
                            ("Content-Type", "application/json"),
                        ],
                        format!(r#"{{"id": "p{i:05}"}}"#).as_bytes(),
                    );
                    assert!(r.status == 201 || r.status == 200, "create: {}", r.body);
                    if i % 10 == 0 {
                        let r = http(
                            "PATCH",
                            &format!("{base}/api/projects/p{i:05}"),
                            &[
                                ("Authorization", auth),
                                ("Content-Type", "application/json"),
                            ],
                            br#"{"labels": {"tier": "paid"}}"#,
                        );
                        assert_eq!(r.status, 200, "patch: {}", r.body);
                    }
                }
            });
        }
    });
    progress(&format!(
        "list: created in {:.1} s; timing pages",
        started.elapsed().as_secs_f64()
    ));
    let get = |query: &str| -> Response {
        let r = http(
            "GET",
            &format!("{base}/api/projects{query}"),
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(r.status, 200, "list {query}: {}", r.body);
        r
    };
    let mut first = Vec::new();
    let mut all = Vec::new();
    let mut labelled = Vec::new();
    for _ in 0..LIST_RUNS {
        let started = Instant::now();
        get("?limit=100");
        first.push(ms(started.elapsed()));

        let started = Instant::now();
        let (mut seen, mut cursor) = (0, None::<String>);
        loop {
            let q = match &cursor {
                Some(c) => format!("?limit=1000&cursor={c}"),
                None => "?limit=1000".to_owned(),
            };
            let page = get(&q).json();
            seen += page["projects"].as_array().expect("projects").len();
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        all.push(ms(started.elapsed()));
        assert!(seen >= PROJECTS, "listed {seen} of {PROJECTS} projects");

        let started = Instant::now();
        let page = get("?label=tier=paid&limit=1000").json();
        labelled.push(ms(started.elapsed()));
        assert_eq!(
            page["projects"].as_array().expect("projects").len(),
            PROJECTS / 10
        );
    }
    progress("list baseline: rebuild the catalog from the blob store");
    let mut rebuild = Vec::new();
    for i in 0..3 {
        let catalog = scratch.join(format!("catalog-{i}.sqlite3"));
        let started = Instant::now();
        let node = Gitstore::start_with(Options {
            store: Some(stack.gitstore.store_url().to_owned()),
            args: vec!["--catalog".into(), catalog.to_string_lossy().into_owned()],
            ..Options::default()
        });
        let r = http(
            "GET",
            &format!("{}/api/projects?limit=1", node.base_url()),
            &[("Authorization", &auth)],
            b"",
        );
        rebuild.push(ms(started.elapsed()));
        assert_eq!(r.status, 200, "list on a new node: {}", r.body);
        assert_eq!(r.json()["projects"].as_array().map(Vec::len), Some(1));
    }
    let label = format!("a new node rebuilding the catalog of {PROJECTS} from the store");
    table.row("list: first page of 100", &first, &label, &rebuild);
    table.row(
        &format!("list: all {PROJECTS}, pages of 1000"),
        &all,
        &label,
        &rebuild,
    );
    table.row(
        "list: label filter (1,000 of them)",
        &labelled,
        &label,
        &rebuild,
    );
}

// ---------------------------------------------------------------------------------------------
// Requests and the table
// ---------------------------------------------------------------------------------------------

fn agent_post(stack: &Stack, path: &str, body: &str) -> Response {
    let auth = format!("Bearer {}", stack.token);
    http(
        "POST",
        &format!("{}{path}", stack.agent_url()),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
    notes: Vec<String>,
}

impl Table {
    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    fn row(&mut self, what: &str, xs: &[f64], base_what: &str, base: &[f64]) {
        self.push(what, xs, base_what, base, |v| format!("{v:.1} ms"));
    }

    fn bytes_row(&mut self, what: &str, xs: &[f64], base_what: &str, base: &[f64]) {
        self.push(what, xs, base_what, base, |v| format!("{v:.0} B"));
    }

    fn push(
        &mut self,
        what: &str,
        xs: &[f64],
        base_what: &str,
        base: &[f64],
        show: impl Fn(f64) -> String,
    ) {
        let (m, b) = (median(xs), median(base));
        self.rows.push([
            what.to_owned(),
            format!("{} (p90 {})", show(m), show(percentile(xs, 0.9))),
            base_what.to_owned(),
            show(b),
            format!("{:.3}x", m / b),
        ]);
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "\n| what | Kiln, median | baseline | baseline, median | ratio |\n|---|---|---|---|---|\n",
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
