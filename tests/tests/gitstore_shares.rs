//! Shares and fork imports against a real gitstore on the embedded file store, checked with stock
//! git: a share is created, listed and revoked by its owner; another client imports a fork share
//! as a new project that lists the source's packs instead of copying them, clones exactly the
//! shared history and pushes on it; the source's later commits, which those packs also hold,
//! stay unreachable through the importer (API, fetch and push); compaction on either side keeps
//! what the other needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_tests::*;
use serde_json::{json, Value};

/// A node, the source project's owner and another client, and a scratch directory.
struct Case {
    node: Gitstore,
    /// Owns project `a`.
    alice: String,
    /// Imports as project `b`.
    bob: String,
    work: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Self::with(Options::default())
    }

    fn with(opts: Options) -> Self {
        let node = Gitstore::start_with(opts);
        let alice = node.create_client("alice");
        let bob = node.create_client("bob");
        Self {
            node,
            alice,
            bob,
            work: tempfile::tempdir().unwrap(),
        }
    }

    /// Project `a` with two pushes (two packs); returns the working repository.
    fn source(&self) -> Repo {
        let a = vite_app(&self.work.path().join("a"), "source");
        let out = a.push(&self.node.git_url(&self.alice, "a"), &["main"]);
        assert!(out.ok, "push to a failed: {}", out.stderr);
        a.commit_file("src/second.js", "export const second = 2\n");
        self.push_a(&a);
        a
    }

    fn push_a(&self, a: &Repo) {
        let out = a.push(&self.node.git_url(&self.alice, "a"), &["main"]);
        assert!(out.ok, "push to a failed: {}", out.stderr);
    }

    fn api(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Response {
        let body = body.map(|b| b.to_string());
        self.node.http(method, path, Some(token), body.as_deref())
    }

    /// Creates a share of `a` and returns the 201 answer.
    fn share(&self, body: Value) -> Value {
        let r = self.api("POST", "/api/projects/a/shares", &self.alice, Some(body));
        assert_eq!(r.status, 201, "share refused: {}", r.body);
        r.json()
    }

    fn import(&self, project: &str, token: &str) -> Response {
        self.api(
            "POST",
            &format!("/api/projects/{project}/import"),
            &self.bob,
            Some(json!({ "share": token })),
        )
    }

    /// Imports `token` as `b` and returns the 201 answer.
    fn imported(&self, token: &str) -> Value {
        let r = self.import("b", token);
        assert_eq!(r.status, 201, "import refused: {}", r.body);
        r.json()
    }

    fn clone_b(&self, name: &str) -> Repo {
        Repo::clone(
            &self.node.git_url(&self.bob, "b"),
            &self.work.path().join(name),
        )
    }

    fn manifest(&self, project: &str) -> Value {
        latest_manifest(&self.node.store_dir(), project).expect("project has a manifest")
    }

    fn pack_files(&self, project: &str) -> Vec<String> {
        pack_files(&self.node.store_dir(), project)
    }

    /// `kiln-gitstore compact <project>` with no grace period, as an operator runs it.
    fn compact(&self, project: &str) -> Value {
        let work = self.work.path().join("compact");
        let out = run(Command::new(kiln_bin())
            .args(["compact", project, "--store", self.node.store_url()])
            .arg("--work-dir")
            .arg(&work)
            .args(["--min-packs", "2", "--grace-secs", "0"]));
        assert!(out.ok, "compact {project} failed: {}", out.stderr);
        serde_json::from_str(out.stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("compact printed no report ({e}): {}", out.stdout))
    }

    /// Syncs `project` from the store alone into a new bare repository, as a fresh node would.
    fn fresh_sync(&self, project: &str, name: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        let r = kiln_sync(self.node.store_url(), &[], project, &dir);
        assert!(r.ok, "sync of {project} failed: {}", r.stderr);
        dir
    }
}

/// Pack and index files under `projects/<project>/packs` of a file store.
fn pack_files(store: &Path, project: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join(format!("projects/{project}/packs")))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn log(repo: &Path, rev: &str) -> String {
    let out = git(repo, &["log", "--format=%H %T %s", rev]);
    assert!(out.ok, "git log {rev} failed: {}", out.stderr);
    out.stdout
}

/// One pkt-line of git's wire protocol.
fn pkt(line: &str) -> String {
    format!("{:04x}{line}", line.len() + 4)
}

#[test]
fn shares_are_created_listed_and_revoked_by_the_owner_only() {
    let c = Case::new();
    let a = c.source();
    let first = a.git_ok(&["rev-parse", "HEAD~1"]);

    let s = c.share(json!({"mode": "fork"}));
    let token = s["token"].as_str().unwrap().to_owned();
    let id = s["id"].as_str().unwrap().to_owned();
    assert_eq!(s["commit"], a.head().as_str(), "defaults to HEAD: {s}");
    assert_eq!(s["mode"], "fork");
    assert_eq!(s["url"], format!("/share/{token}").as_str());
    assert!(token.starts_with(&format!("a.{id}.")), "{token}");
    assert_eq!(id.len(), 10);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = s["expires_at"].as_u64().unwrap();
    assert!(
        expires > now + 29 * 86400 && expires <= now + 30 * 86400 + 60,
        "{s}"
    );

    let older = c.share(json!({"mode": "view", "commit": &first[..12], "expires_in_secs": 600}));
    assert_eq!(
        older["commit"],
        first.as_str(),
        "a prefix resolves: {older}"
    );

    // Listed without tokens or their hashes; the store holds no token either.
    let list = c.api("GET", "/api/projects/a/shares", &c.alice, None);
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(
        !list.body.contains(&token) && !list.body.contains("sha256"),
        "{}",
        list.body
    );
    let shares = list.json()["shares"].as_array().unwrap().clone();
    assert_eq!(shares.len(), 2);
    assert_eq!(shares[0]["id"], id.as_str());
    assert_eq!(shares[0]["live"], true);
    let stored = serde_json::to_string(&c.manifest("a")).unwrap();
    assert!(!stored.contains(&token), "token stored in clear");

    // Another client cannot see, make or revoke a's shares: a is not found for it.
    for (method, path, body) in [
        ("GET", "/api/projects/a/shares".to_owned(), None),
        (
            "POST",
            "/api/projects/a/shares".to_owned(),
            Some(json!({"mode": "fork"})),
        ),
        ("DELETE", format!("/api/projects/a/shares/{id}"), None),
    ] {
        let r = c.api(method, &path, &c.bob, body);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }

    let r = c.api(
        "DELETE",
        &format!("/api/projects/a/shares/{id}"),
        &c.alice,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["revoked_at"].as_u64().is_some(), "{}", r.body);
    let shares = c
        .api("GET", "/api/projects/a/shares", &c.alice, None)
        .json();
    assert_eq!(shares["shares"][0]["live"], false, "{shares}");
    assert_eq!(shares["shares"][1]["live"], true, "{shares}");

    let r = c.import("b", &token);
    assert_eq!(r.status, 410, "{}", r.body);
    assert_eq!(r.json()["error"], "share_revoked", "{}", r.body);
    assert!(
        r.json()["message"].as_str().unwrap().contains("revoked"),
        "{}",
        r.body
    );
    assert!(latest_manifest(&c.node.store_dir(), "b").is_none());
}

#[test]
fn rejects_bad_share_requests_with_what_to_fix() {
    let c = Case::new();
    let a = c.source();
    let post = |body: Value| c.api("POST", "/api/projects/a/shares", &c.alice, Some(body));

    let r = post(json!({"mode": "edit"}));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_json")),
        "{}",
        r.body
    );
    let r = post(json!({"mode": "view", "expires_in_secs": 366 * 86400}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("one year"), "{}", r.body);
    let r = post(json!({"mode": "view", "commit": "0123456789abcdef0123456789abcdef01234567"}));
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("not in this project"), "{}", r.body);

    // A commit no ref reaches any more (the branch that held it was deleted) cannot be shared.
    a.git_ok(&["checkout", "-q", "-b", "gone"]);
    let dropped = a.commit_file("gone.txt", "soon unreachable\n");
    let url = c.node.git_url(&c.alice, "a");
    assert!(a.push(&url, &["gone"]).ok);
    assert!(a.push(&url, &[":gone"]).ok);
    let r = post(json!({"mode": "view", "commit": dropped}));
    assert_eq!(r.status, 404, "{}", r.body);

    let r = c.api(
        "DELETE",
        "/api/projects/a/shares/nosuchshare",
        &c.alice,
        None,
    );
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn refuses_malformed_forged_view_and_expired_shares_for_import() {
    let c = Case::new();
    let _a = c.source();
    let view = c.share(json!({"mode": "view"}));
    let fork = c.share(json!({"mode": "fork", "expires_in_secs": 1}));

    let r = c.import("b", "not-a-token");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("<project>.<id>.<secret>"), "{}", r.body);

    let fork_token = fork["token"].as_str().unwrap();
    let (prefix, _) = fork_token.rsplit_once('.').unwrap();
    let forged = format!("{prefix}.{}", "x".repeat(32));
    let r = c.import("b", &forged);
    assert_eq!(r.status, 404, "{}", r.body);

    let r = c.import("b", view["token"].as_str().unwrap());
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"], "not_a_fork_share", "{}", r.body);

    std::thread::sleep(Duration::from_millis(2100));
    let r = c.import("b", fork_token);
    assert_eq!(r.status, 410, "{}", r.body);
    assert_eq!(r.json()["error"], "share_expired", "{}", r.body);

    // Nothing was claimed or written for b by any of them.
    assert!(!c.node.store_dir().join("projects/b").exists());
}

#[test]
fn refuses_to_import_into_a_project_that_exists() {
    let c = Case::new();
    let _a = c.source();
    let fork = c.share(json!({"mode": "fork"}));
    let token = fork["token"].as_str().unwrap();
    // a is alice's: for bob it exists, whoever owns it.
    let r = c.import("a", token);
    assert_eq!(r.status, 409, "{}", r.body);
    c.imported(token);
    let r = c.import("b", token);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"], "exists", "{}", r.body);
}

#[test]
fn a_fork_share_imports_as_a_project_that_lists_the_source_packs() {
    let (port, deliveries) = webhook_receiver();
    let c = Case::with(Options::args(&[
        "--agent-url",
        &format!("http://127.0.0.1:{port}"),
    ]));
    let a = c.source();
    let shared = a.head();
    let fork = c.share(json!({"mode": "fork"}));

    let done = c.imported(fork["token"].as_str().unwrap());
    assert_eq!(done["id"], "b");
    assert_eq!(done["commit"], shared.as_str());
    assert_eq!(done["packs_shared"], 2, "{done}");

    let m = c.manifest("b");
    assert_eq!(m["refs"], json!({"refs/heads/main": shared}), "{m}");
    assert_eq!(m["head"], "refs/heads/main");
    let packs = m["packs"].as_array().unwrap();
    assert_eq!(packs.len(), 2, "{m}");
    assert!(packs.iter().all(|p| p["from"] == "a"), "{m}");
    assert!(
        c.pack_files("b").is_empty(),
        "objects copied: {:?}",
        c.pack_files("b")
    );

    // The agents hear of b as of a push (a's own pushes were announced too).
    let body = loop {
        let (line, body) = deliveries
            .recv_timeout(Duration::from_secs(20))
            .expect("no webhook after the import");
        if line.starts_with("POST /sync-project/b ") {
            break body;
        }
        assert!(line.starts_with("POST /sync-project/a "), "{line}");
    };
    let hook: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(hook["ref"], "refs/heads/main", "{hook}");
    assert_eq!(hook["new"], shared.as_str(), "{hook}");

    // Exactly the shared history, and b is bob's: alice cannot read it.
    let b = c.clone_b("b");
    assert_eq!(log(&b.path, "HEAD"), log(&a.path, &shared));
    let r = c.api("GET", "/api/projects/b/tree", &c.alice, None);
    assert_eq!(r.status, 404, "{}", r.body);

    // bob pushes on b; a is untouched.
    let a_before = store_snapshot(&c.node.store_dir(), "a");
    let a_generation = generation(&c.node.store_dir(), "a");
    let next = b.commit_file("src/bob.js", "export const bob = true\n");
    let out = b.push(&c.node.git_url(&c.bob, "b"), &["main"]);
    assert!(out.ok, "push to b failed: {}", out.stderr);
    assert_eq!(c.manifest("b")["refs"]["refs/heads/main"], next.as_str());
    assert_eq!(c.pack_files("b").len(), 2, "one pack and its index");
    assert_eq!(store_snapshot(&c.node.store_dir(), "a"), a_before);
    assert_eq!(generation(&c.node.store_dir(), "a"), a_generation);
    let a2 = Repo::clone(
        &c.node.git_url(&c.alice, "a"),
        &c.work.path().join("a-again"),
    );
    assert_eq!(a2.head(), shared);

    // A node that has never seen either project rebuilds b from the store alone.
    let fresh = c.fresh_sync("b", "b-fresh.git");
    assert_eq!(log(&fresh, "main"), log(&b.path, "HEAD"));

    // The API commit path works on b too.
    let r = c.api(
        "POST",
        "/api/projects/b/commits",
        &c.bob,
        Some(json!({"message": "api", "parent": next, "files": {"api.txt": "x\n"}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn refuses_to_serve_source_commits_past_the_share_through_the_import() {
    let c = Case::new();
    let a = c.source();
    let shared = a.head();
    let fork = c.share(json!({"mode": "fork"}));
    // alice's later work lands in a pack of a before bob imports, so b lists that pack too.
    let secret = a.commit_file("src/secret.js", "export const secret = 'alice only'\n");
    c.push_a(&a);
    c.imported(fork["token"].as_str().unwrap());
    assert_eq!(c.manifest("b")["packs"].as_array().unwrap().len(), 3);

    // Not through the read API...
    for path in [
        format!("/api/projects/b/tree?commit={secret}"),
        format!("/api/projects/b/files/src/secret.js?commit={secret}"),
        format!("/api/projects/b/diff?to={secret}"),
        format!("/api/projects/b/diff?from={secret}&to={shared}"),
        format!("/api/projects/b/tree?commit={}", &secret[..10]),
    ] {
        let r = c.api("GET", &path, &c.bob, None);
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert!(r.body.contains("not in this project"), "{path}: {}", r.body);
        assert!(!r.body.contains("alice only"));
    }
    // ... while the shared commit reads as usual.
    let r = c.api(
        "GET",
        &format!("/api/projects/b/tree?commit={shared}"),
        &c.bob,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // Not through git fetch...
    let b = c.clone_b("b");
    let url = c.node.git_url(&c.bob, "b");
    for version in ["2", "0"] {
        let out = b.git(&[
            "-c",
            &format!("protocol.version={version}"),
            "fetch",
            &url,
            &secret,
        ]);
        assert!(!out.ok, "protocol v{version} fetched {secret}");
        assert!(!b.git(&["cat-file", "-e", &secret]).ok);
    }
    // ... nor by a client that asks the server directly, in either protocol.
    let auth = format!("Bearer {}", c.bob);
    let upload = format!("{}/git/b.git/git-upload-pack", c.node.base_url());
    let ct = ("Content-Type", "application/x-git-upload-pack-request");
    let v2 = format!(
        "{}{}0001{}{}0000",
        pkt("command=fetch\n"),
        pkt("object-format=sha1\n"),
        pkt(&format!("want {secret}\n")),
        pkt("done\n"),
    );
    let r = http(
        "POST",
        &upload,
        &[("Authorization", &auth), ct, ("Git-Protocol", "version=2")],
        v2.as_bytes(),
    );
    assert!(
        !r.bytes.windows(4).any(|w| w == b"PACK"),
        "v2 served a pack: {}",
        r.body
    );
    let v0 = format!(
        "{}0000{}",
        pkt(&format!("want {secret} side-band-64k ofs-delta\n")),
        pkt("done\n"),
    );
    let r = http(
        "POST",
        &upload,
        &[("Authorization", &auth), ct],
        v0.as_bytes(),
    );
    assert!(
        !r.bytes.windows(4).any(|w| w == b"PACK"),
        "v0 served a pack: {}",
        r.body
    );
    assert!(r.body.contains("not our ref"), "{}", r.body);

    // Nor by pushing a ref to it without sending it (the server has the objects, the pusher
    // only their id).
    let empty_pack = Command::new("git")
        .args(["pack-objects", "--stdout", "-q"])
        .current_dir(&b.path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
        .stdout;
    assert!(empty_pack.starts_with(b"PACK"));
    let mut body = format!(
        "{}0000",
        pkt(&format!(
            "{} {secret} refs/heads/stolen\0report-status\n",
            "0".repeat(40)
        ))
    )
    .into_bytes();
    body.extend_from_slice(&empty_pack);
    let r = http(
        "POST",
        &format!("{}/git/b.git/git-receive-pack", c.node.base_url()),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-git-receive-pack-request"),
        ],
        &body,
    );
    assert!(!r.body.contains("ok refs/heads/stolen"), "{}", r.body);
    assert!(r.body.contains("ng refs/heads/stolen"), "{}", r.body);
    assert!(c.manifest("b")["refs"].get("refs/heads/stolen").is_none());
    let refs = b.git_ok(&["ls-remote", &url]);
    assert!(!refs.contains(&secret), "{refs}");
}

#[test]
fn compaction_keeps_each_side_whole_and_the_source_packs_in_place() {
    let c = Case::new();
    let a = c.source();
    let shared = a.head();
    let fork = c.share(json!({"mode": "fork"}));
    let secret = a.commit_file("src/secret.js", "export const secret = 'alice only'\n");
    c.push_a(&a);
    c.imported(fork["token"].as_str().unwrap());
    let b = c.clone_b("b");
    b.commit_file("src/bob.js", "export const bob = true\n");
    assert!(b.push(&c.node.git_url(&c.bob, "b"), &["main"]).ok);
    let source_packs = c.pack_files("a");
    assert_eq!(source_packs.len(), 6, "{source_packs:?}");

    // a compacts; with no grace its replaced packs would go at the next collection, but b
    // lists them, so they stay.
    let r = c.compact("a");
    assert_eq!(r["packs_replaced"], 3, "{r}");
    c.compact("a");
    let after = c.pack_files("a");
    for name in &source_packs {
        assert!(
            after.contains(name),
            "{name} deleted while b lists it: {after:?}"
        );
    }
    let fresh = c.fresh_sync("b", "b-fresh-1.git");
    assert_eq!(log(&fresh, "main"), log(&b.path, "HEAD"));

    // b compacts: what it needs of a's packs becomes its own pack, a's are not touched, and
    // alice's later commit is not among what b now holds.
    let a_before = c.pack_files("a");
    let r = c.compact("b");
    assert_eq!(r["packs_replaced"], 4, "{r}");
    c.compact("b");
    assert_eq!(
        c.pack_files("a"),
        a_before,
        "b's compaction touched a's packs"
    );
    let m = c.manifest("b");
    let packs = m["packs"].as_array().unwrap();
    assert_eq!(packs.len(), 1, "{m}");
    assert!(packs[0].get("from").is_none(), "{m}");
    // Only b's own pack was retired (and, with no grace, deleted): a's are a's to collect.
    assert_eq!(m["retired"].as_array().map_or(0, Vec::len), 1, "{m}");
    assert!(c.pack_files("b").len() == 2, "{:?}", c.pack_files("b"));
    let fresh = c.fresh_sync("b", "b-fresh-2.git");
    assert_eq!(log(&fresh, "main"), log(&b.path, "HEAD"));
    assert!(log(&fresh, "main").contains(&shared));
    assert!(
        !git(&fresh, &["cat-file", "-e", &secret]).ok,
        "b's own pack holds a's later commit"
    );
    let b2 = c.clone_b("b-again");
    assert_eq!(b2.head(), b.head());

    // Nothing lists a's replaced packs any more: a's next collection deletes them, and a still
    // clones.
    c.compact("a");
    assert_eq!(c.pack_files("a").len(), 2, "{:?}", c.pack_files("a"));
    let fresh_a = c.fresh_sync("a", "a-fresh.git");
    assert_eq!(log(&fresh_a, "main"), log(&a.path, "HEAD"));
}
