//! Files without git: `POST /api/projects/<p>/commits` from a JSON map of files, and the reads
//! `tree`, `files/<path>` and `diff`, against a real gitstore on the embedded file store. What
//! the API writes is checked with stock `git clone`; hostile requests must be refused with the
//! path named and must leave the store exactly as it was.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use kiln_tests::*;
use serde_json::{json, Value};

const PROJECT: &str = "site";

/// A node, a client token and a scratch directory.
struct Case {
    node: Gitstore,
    token: String,
    work: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Self::with(Options::default())
    }

    fn with(opts: Options) -> Self {
        let node = Gitstore::start_with(opts);
        let token = node.create_client("generator");
        Self {
            node,
            token,
            work: tempfile::tempdir().unwrap(),
        }
    }

    fn commit_as(&self, token: &str, project: &str, body: &Value) -> Response {
        self.node.http(
            "POST",
            &format!("/api/projects/{project}/commits"),
            Some(token),
            Some(&body.to_string()),
        )
    }

    fn commit(&self, body: &Value) -> Response {
        self.commit_as(&self.token, PROJECT, body)
    }

    /// Commits `files` on `parent` and returns the 201 answer; panics on anything else.
    fn committed(&self, parent: Option<&str>, files: Value) -> Value {
        let r = self.commit(&json!({"message": "from the API", "parent": parent, "files": files}));
        assert_eq!(r.status, 201, "commit refused: {}", r.body);
        let v = r.json();
        assert_eq!(v["parent"].as_str(), parent, "{v}");
        v
    }

    fn get(&self, path: &str) -> Response {
        self.node.http("GET", path, Some(&self.token), None)
    }

    fn url(&self) -> String {
        self.node.git_url(&self.token, PROJECT)
    }

    fn clone(&self, name: &str) -> Repo {
        Repo::clone(&self.url(), &self.work.path().join(name))
    }

    fn generation(&self) -> u64 {
        generation(&self.node.store_dir(), PROJECT)
    }

    /// Sends `body`, expects `status`, and checks that not one file of the project's store prefix
    /// changed; returns the answer's JSON.
    fn refused(&self, body: &Value, status: u16) -> Value {
        let store = self.node.store_dir();
        let before = store_snapshot(&store, PROJECT);
        let generation = self.generation();
        let r = self.commit(body);
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(
            store_snapshot(&store, PROJECT),
            before,
            "a refused commit changed the store"
        );
        assert_eq!(self.generation(), generation);
        r.json()
    }
}

fn file_bytes(repo: &Repo, rel: &str) -> Vec<u8> {
    std::fs::read(repo.path.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every path of HEAD in a clone with its mode (`ls-tree -r`), sorted.
fn clone_files(repo: &Repo) -> Vec<(String, String, String)> {
    repo.git_ok(&["ls-tree", "-r", "HEAD"])
        .lines()
        .map(|l| {
            let (meta, path) = l.split_once('\t').unwrap();
            let mut f = meta.split(' ');
            let mode = f.next().unwrap().to_owned();
            f.next();
            (path.to_owned(), mode, f.next().unwrap().to_owned())
        })
        .collect()
}

/// A GET that keeps the body as bytes (the harness's [`http`] decodes it as text).
fn get_bytes(node: &Gitstore, path: &str, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    let r = http(
        "GET",
        &format!("{}{path}", node.base_url()),
        &[("Authorization", &auth)],
        b"",
    );
    assert!(
        !r.headers.iter().any(|(k, _)| k == "transfer-encoding"),
        "expected a sized body"
    );
    r
}

/// Bytes 0..=255 twice, with the NULs that make git call a file binary.
fn binary_blob() -> Vec<u8> {
    (0..512u32).map(|i| (i % 256) as u8).collect()
}

#[test]
fn commit_then_clone_shows_exactly_those_files_and_fires_the_webhook() {
    let (port, deliveries) = webhook_receiver();
    let c = Case::with(Options::args(&[
        "--agent-url",
        &format!("http://127.0.0.1:{port}"),
    ]));
    let bin = binary_blob();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bin);
    let first = c.committed(
        None,
        json!({
            "index.html": "<h1>hello</h1>\n",
            "src/main.js": "console.log('hi')\n",
            "src/old.js": "export const old = 1\n",
            "assets/logo.bin": {"base64": b64},
            "run.sh": {"text": "#!/bin/sh\necho hi\n", "executable": true},
            "link": {"symlink": "src/main.js"},
        }),
    );
    let commit = first["commit"].as_str().unwrap().to_owned();
    assert_eq!(first["generation"], 1, "{first}");
    assert_eq!(first["branch"], "main", "{first}");
    assert_eq!(c.generation(), 1);

    // The first commit created the project, owned by this client.
    let projects = c.get("/api/projects").json();
    assert_eq!(projects["projects"][0]["id"], PROJECT, "{projects}");
    assert_eq!(projects["projects"][0]["commit"], commit.as_str());

    let clone = c.clone("clone");
    assert_eq!(clone.head(), commit);
    assert_eq!(
        clone.git_ok(&["rev-parse", "HEAD^{tree}"]),
        first["tree"].as_str().unwrap()
    );
    let modes: Vec<(String, String)> = clone_files(&clone)
        .into_iter()
        .map(|(p, m, _)| (p, m))
        .collect();
    let want: Vec<(String, String)> = [
        ("assets/logo.bin", "100644"),
        ("index.html", "100644"),
        ("link", "120000"),
        ("run.sh", "100755"),
        ("src/main.js", "100644"),
        ("src/old.js", "100644"),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(modes, want);
    assert_eq!(file_bytes(&clone, "assets/logo.bin"), bin);
    assert_eq!(file_bytes(&clone, "index.html"), b"<h1>hello</h1>\n");
    assert_eq!(
        std::fs::read_link(clone.path.join("link")).unwrap(),
        Path::new("src/main.js")
    );
    let log = clone.git_ok(&["log", "-1", "--format=%an <%ae>|%cn|%s"]);
    assert!(
        log.starts_with("generator <") && log.ends_with("|generator|from the API"),
        "default author and committer are the client: {log}"
    );

    // The same signed webhook as a push.
    let (line, body) = deliveries
        .recv_timeout(Duration::from_secs(20))
        .expect("no webhook after the API commit");
    assert!(
        line.starts_with(&format!("POST /sync-project/{PROJECT} ")),
        "{line}"
    );
    let hook: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(hook["ref"], "refs/heads/main", "{hook}");
    assert_eq!(hook["new"], commit.as_str(), "{hook}");

    // The second commit keeps what it does not name, replaces, deletes and adds.
    let second = c.committed(
        Some(&commit),
        json!({
            "src/old.js": null,
            "index.html": "<h1>hello again</h1>\n",
            "src/new.js": "export const fresh = 2\n",
        }),
    );
    assert_eq!(second["generation"], 2, "{second}");
    clone.git_ok(&["pull", "-q", "--ff-only"]);
    assert_eq!(clone.head(), second["commit"].as_str().unwrap());
    assert!(!clone.path.join("src/old.js").exists());
    assert_eq!(file_bytes(&clone, "index.html"), b"<h1>hello again</h1>\n");
    assert_eq!(
        file_bytes(&clone, "src/new.js"),
        b"export const fresh = 2\n"
    );
    assert_eq!(file_bytes(&clone, "assets/logo.bin"), bin);
    assert_eq!(
        clone.git_ok(&["rev-parse", "HEAD~1"]),
        commit,
        "the parent is the first commit"
    );
    let (_, hook) = deliveries
        .recv_timeout(Duration::from_secs(20))
        .expect("no webhook after the second commit");
    let hook: Value = serde_json::from_slice(&hook).unwrap();
    assert_eq!(hook["old"], commit.as_str(), "{hook}");

    // A whole directory goes with one null, and an author can be given.
    let third = c.commit(&json!({
        "message": "drop src",
        "parent": second["commit"],
        "author": {"name": "Ada", "email": "ada@example.com"},
        "files": {"src": null},
    }));
    assert_eq!(third.status, 201, "{}", third.body);
    clone.git_ok(&["pull", "-q", "--ff-only"]);
    assert!(!clone.path.join("src").exists());
    assert_eq!(
        clone.git_ok(&["log", "-1", "--format=%an <%ae>"]),
        "Ada <ada@example.com>"
    );
}

#[test]
fn rejects_a_stale_parent_with_409_carrying_the_head() {
    let c = Case::new();
    let a = c.committed(None, json!({"a.txt": "1\n"}))["commit"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = c.committed(Some(&a), json!({"a.txt": "2\n"}))["commit"]
        .as_str()
        .unwrap()
        .to_owned();
    for parent in [json!(a), Value::Null, json!("0".repeat(40))] {
        let v = c.refused(
            &json!({"message": "late", "parent": parent, "files": {"a.txt": "3\n"}}),
            409,
        );
        assert_eq!(v["error"], "conflict", "{v}");
        assert_eq!(v["head"], b.as_str(), "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(&b),
            "the message names the head: {v}"
        );
    }
    // A new branch starts from null; its head is null until then.
    let v = c.refused(
        &json!({"message": "m", "parent": a, "branch": "feature", "files": {}}),
        409,
    );
    assert_eq!(v["head"], Value::Null, "{v}");
    let r = c.commit(
        &json!({"message": "m", "parent": null, "branch": "feature/x", "files": {"f": "x"}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["branch"], "feature/x");
}

#[test]
fn api_commits_and_git_pushes_interleave_like_pushes() {
    let c = Case::new();
    let first = c.committed(None, json!({"README.md": "from the API\n"}))["commit"]
        .as_str()
        .unwrap()
        .to_owned();
    let clone = c.clone("clone");
    assert_eq!(clone.head(), first);

    // A git push on top of the API commit.
    let pushed = clone.commit_file("pushed.txt", "from git\n");
    let out = clone.push(&c.url(), &["main"]);
    assert!(out.ok, "push after an API commit refused:\n{}", out.stderr);

    // The API sees the push as the head, and builds on it.
    let v = c.refused(
        &json!({"message": "stale", "parent": first, "files": {"x": "x"}}),
        409,
    );
    assert_eq!(v["head"], pushed.as_str(), "{v}");
    let api = c.committed(Some(&pushed), json!({"api.txt": "again\n"}))["commit"]
        .as_str()
        .unwrap()
        .to_owned();

    // A push that has not fetched the API commit is refused like any stale push...
    clone.commit_file("later.txt", "later\n");
    let out = clone.push(&c.url(), &["main"]);
    assert!(!out.ok, "a push behind the API commit was accepted");
    assert!(
        out.stderr.contains("fetch first") || out.stderr.contains("non-fast-forward"),
        "{}",
        out.stderr
    );
    // ...and goes through once it has.
    clone.git_ok(&["pull", "-q", "--rebase", "origin", "main"]);
    let out = clone.push(&c.url(), &["main"]);
    assert!(out.ok, "push after fetching refused:\n{}", out.stderr);
    assert_eq!(clone.git_ok(&["rev-parse", "HEAD~1"]), api);
    let tree = c.get(&format!("/api/projects/{PROJECT}/tree")).json();
    let paths: Vec<&str> = tree["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["README.md", "api.txt", "later.txt", "pushed.txt"]);
    assert_eq!(c.generation(), 4);
}

#[test]
fn refuses_dotgit_paths_naming_them() {
    let c = Case::new();
    let seed = c.committed(None, json!({"a.txt": "a\n"}));
    for path in [
        ".git/config",
        ".GIT/hooks/pre-commit",
        "src/.git",
        "git~1/config",
        ".git./x",
    ] {
        let v = c.refused(
            &json!({"message": "m", "parent": seed["commit"], "files": {path: "[core]\n"}}),
            400,
        );
        let msg = v["message"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{path}: ")), "{path}: {v}");
        assert!(msg.contains(".git"), "{v}");
    }
}

#[test]
fn refuses_traversal_and_absolute_paths_naming_them() {
    let c = Case::new();
    let seed = c.committed(None, json!({"a.txt": "a\n"}));
    for path in ["../x", "a/../../b", "/etc/passwd", "a//b", "./a", "a/", ""] {
        let v = c.refused(
            &json!({"message": "m", "parent": seed["commit"], "files": {path: "x"}}),
            400,
        );
        assert_eq!(v["error"], "bad_path", "{path}: {v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{path}: ")),
            "{path}: {v}"
        );
    }
    // Also when the path is deleted, not written.
    let v = c.refused(
        &json!({"message": "m", "parent": seed["commit"], "files": {"../a.txt": null}}),
        400,
    );
    assert!(
        v["message"].as_str().unwrap().starts_with("../a.txt: "),
        "{v}"
    );
}

#[test]
fn refuses_escaping_symlinks_naming_them() {
    let c = Case::new();
    let seed = c.committed(None, json!({"a.txt": "a\n"}));
    for (link, target) in [
        ("l", "../outside"),
        ("d/l", "../../etc/passwd"),
        ("l", "/etc/passwd"),
        ("l", "x/../../y"),
        ("l", "sub/.git/config"),
    ] {
        let v = c.refused(
            &json!({"message": "m", "parent": seed["commit"], "files": {link: {"symlink": target}}}),
            400,
        );
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{link}: ")),
            "{link} -> {target}: {v}"
        );
    }
}

#[test]
fn refuses_a_path_that_would_be_both_file_and_directory() {
    let c = Case::new();
    let seed = c.committed(None, json!({"a": "file\n"}));
    let v = c.refused(
        &json!({"message": "m", "parent": seed["commit"], "files": {"a/b": "x"}}),
        400,
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("both a file and a directory"),
        "{v}"
    );
    let v = c.refused(
        &json!({"message": "m", "parent": seed["commit"], "files": {"missing.txt": null}}),
        400,
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("missing.txt: not in the parent"),
        "{v}"
    );
    // Deleting the file in the same commit makes room for the directory.
    let r = c.commit(
        &json!({"message": "m", "parent": seed["commit"], "files": {"a": null, "a/b": "x"}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn rejects_requests_over_the_limits_with_413_naming_the_limit() {
    let c = Case::with(Options::args(&[
        "--max-file-bytes",
        "1024",
        "--max-push-bytes",
        "3000",
        "--max-tree-files",
        "4",
    ]));
    let seed = c.committed(None, json!({"a": "1", "b": "2", "c": "3"}));
    let parent = seed["commit"].clone();
    let cases = [
        (json!({"big.txt": "x".repeat(1025)}), "max_file_bytes"),
        (
            json!({"big.bin": {"base64": base64::engine::general_purpose::STANDARD.encode(vec![7u8; 2000])}}),
            "max_file_bytes",
        ),
        (
            json!({"1": "x".repeat(1000), "2": "x".repeat(1000), "3": "x".repeat(1000), "4": "x".repeat(1000)}),
            "max_push_bytes",
        ),
        // Only the whole tree is over: three kept from the parent, two new.
        (json!({"d": "4", "e": "5"}), "max_tree_files"),
    ];
    for (files, limit) in cases {
        let v = c.refused(
            &json!({"message": "m", "parent": parent, "files": files}),
            413,
        );
        assert_eq!(v["error"], "too_large", "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(limit),
            "{limit}: {v}"
        );
    }
    // The request body itself is bounded.
    let huge = json!({"message": "m", "parent": parent, "files": {"x": "y".repeat(2 << 20)}});
    let v = c.refused(&huge, 413);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("KILN_MAX_PUSH_BYTES"),
        "{v}"
    );
    // At the limit is fine.
    let r =
        c.commit(&json!({"message": "m", "parent": parent, "files": {"ok.txt": "x".repeat(1024)}}));
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn rejects_malformed_requests_saying_what_to_fix() {
    let c = Case::new();
    let post = |body: &str| {
        c.node.http(
            "POST",
            &format!("/api/projects/{PROJECT}/commits"),
            Some(&c.token),
            Some(body),
        )
    };
    let cases = [
        ("{not json", "bad_json", "invalid commit request"),
        (r#"{"parent": null, "files": {}}"#, "bad_json", "message"),
        (
            r#"{"message": "m", "files": {}}"#,
            "bad_request",
            "parent: required",
        ),
        (
            r#"{"message": "m", "parent": "main", "files": {}}"#,
            "bad_request",
            "40 hex",
        ),
        (
            r#"{"message": "m", "parent": null, "files": {"a": 5}}"#,
            "bad_json",
            "files[\"a\"]",
        ),
        (
            r#"{"message": "m", "parent": null, "branch": "../x", "files": {}}"#,
            "bad_request",
            "branch",
        ),
    ];
    for (body, code, hint) in cases {
        let r = post(body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"], code, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(hint), "{body}: {v}");
    }
    let long = json!({"message": "m".repeat(17 << 10), "parent": null, "files": {}});
    let r = post(&long.to_string());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("message:"), "{}", r.body);
    assert_eq!(c.generation(), 0, "nothing was stored");
    assert_eq!(
        c.get("/api/projects").json()["projects"],
        json!([]),
        "a refused request created the project"
    );
}

#[test]
fn rejects_bad_tokens_and_other_clients_projects() {
    let c = Case::with(Options {
        admin_token: Some("kiln-admin-test-token".into()),
        ..Options::default()
    });
    let seed = c.committed(None, json!({"a.txt": "a\n"}));
    let commit = seed["commit"].as_str().unwrap();
    let other = c.node.create_client("other");
    let body = json!({"message": "m", "parent": commit, "files": {"b": "b"}}).to_string();
    let reads = [
        format!("/api/projects/{PROJECT}/tree"),
        format!("/api/projects/{PROJECT}/files/a.txt"),
        format!("/api/projects/{PROJECT}/diff?to={commit}"),
    ];

    for token in [Some("kiln_nobody_secret"), None] {
        let r = c.node.http(
            "POST",
            &format!("/api/projects/{PROJECT}/commits"),
            token,
            Some(&body),
        );
        assert_eq!(r.status, 401, "{}", r.body);
        for path in &reads {
            assert_eq!(c.node.http("GET", path, token, None).status, 401, "{path}");
        }
    }
    let r = c.node.http(
        "POST",
        &format!("/api/projects/{PROJECT}/commits"),
        Some(&other),
        Some(&body),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    for path in &reads {
        let r = c.node.http("GET", path, Some(&other), None);
        assert_eq!(r.status, 404, "{path}: {}", r.body);
    }
    assert_eq!(c.generation(), 1);

    // The admin reads every project but commits to none.
    let admin = "kiln-admin-test-token";
    for path in &reads {
        assert_eq!(
            c.node.http("GET", path, Some(admin), None).status,
            200,
            "{path}"
        );
    }
    let r = c.node.http(
        "POST",
        &format!("/api/projects/{PROJECT}/commits"),
        Some(admin),
        Some(&body),
    );
    assert_eq!(r.status, 403, "{}", r.body);
}

#[test]
fn tree_lists_what_the_clone_has() {
    let c = Case::new();
    let first = c.committed(
        None,
        json!({
            "package.json": "{}\n",
            "src/App.jsx": "export default () => null\n",
            "src/deep/er/x.css": "a{}\n",
            "bin/run": {"text": "#!/bin/sh\n", "executable": true},
            "latest": {"symlink": "src/App.jsx"},
            "img.png": {"base64": base64::engine::general_purpose::STANDARD.encode(binary_blob())},
        }),
    );
    let commit = first["commit"].as_str().unwrap();
    let clone = c.clone("clone");
    let r = c.get(&format!("/api/projects/{PROJECT}/tree"));
    assert_eq!(r.status, 200, "{}", r.body);
    let tree = r.json();
    assert_eq!(tree["commit"], commit);
    let listed: Vec<(String, String, String, u64)> = tree["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["mode"].as_str().unwrap().to_owned(),
                f["oid"].as_str().unwrap().to_owned(),
                f["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, u64)> = clone_files(&clone)
        .into_iter()
        .map(|(path, mode, oid)| {
            let name = match mode.as_str() {
                "100755" => "exec",
                "120000" => "symlink",
                _ => "file",
            };
            let size = clone.git_ok(&["cat-file", "-s", &oid]).parse().unwrap();
            (path, name.to_owned(), oid, size)
        })
        .collect();
    assert_eq!(listed, want);

    // An older commit by a short id; bad and unknown ids say so.
    let second = c.committed(Some(commit), json!({"package.json": null}));
    let old = c
        .get(&format!(
            "/api/projects/{PROJECT}/tree?commit={}",
            &commit[..8]
        ))
        .json();
    assert_eq!(old["files"].as_array().unwrap().len(), 6, "{old}");
    let now = c.get(&format!("/api/projects/{PROJECT}/tree")).json();
    assert_eq!(now["commit"], second["commit"]);
    assert_eq!(now["files"].as_array().unwrap().len(), 5, "{now}");
    for (q, status) in [
        ("zz12", 400),
        ("abc", 400),
        ("deadbeef", 404),
        (&"f".repeat(41)[..], 400),
    ] {
        let r = c.get(&format!("/api/projects/{PROJECT}/tree?commit={q}"));
        assert_eq!(r.status, status, "{q}: {}", r.body);
        assert!(
            r.json()["message"].as_str().unwrap().len() > 10,
            "{}",
            r.body
        );
    }
    let blob = clone.git_ok(&["rev-parse", "HEAD:package.json"]);
    let r = c.get(&format!("/api/projects/{PROJECT}/tree?commit={blob}"));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("not a commit"), "{}", r.body);
}

#[test]
fn tree_of_a_project_without_commits_is_404() {
    let c = Case::new();
    let created = c.node.http(
        "POST",
        "/api/projects",
        Some(&c.token),
        Some(r#"{"id": "empty"}"#),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let r = c.get("/api/projects/empty/tree");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("no commits yet"), "{}", r.body);
}

#[test]
fn files_returns_the_bytes_exactly() {
    let c = Case::new();
    let bin = binary_blob();
    let first = c.committed(
        None,
        json!({
            "index.html": "<script>alert(1)</script>\n",
            "data/blob.bin": {"base64": base64::engine::general_purpose::STANDARD.encode(&bin)},
            "unicode é.txt": "naïve ☃\n",
            "link": {"symlink": "index.html"},
        }),
    );
    let commit = first["commit"].as_str().unwrap();
    let get = |path: &str| {
        get_bytes(
            &c.node,
            &format!("/api/projects/{PROJECT}/files/{path}"),
            &c.token,
        )
    };

    let r = get("data/blob.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, bin, "binary bytes differ");
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("x-kiln-commit"), Some(commit));
    assert_eq!(r.header("x-kiln-mode"), Some("file"));

    let r = get("index.html");
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, b"<script>alert(1)</script>\n");
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        r.header("content-security-policy")
            .is_some_and(|v| v.contains("sandbox")),
        "project HTML must not run on the gitstore origin: {:?}",
        r.headers
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));

    let r = get("unicode%20%C3%A9.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, "naïve ☃\n".as_bytes());

    let r = get("link");
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, b"index.html");
    assert_eq!(r.header("x-kiln-mode"), Some("symlink"));

    // An older version by commit.
    let second = c.committed(Some(commit), json!({"index.html": "<p>v2</p>\n"}));
    let r = get("index.html");
    assert_eq!(r.bytes, b"<p>v2</p>\n");
    assert_eq!(r.header("x-kiln-commit"), second["commit"].as_str());
    let r = get(&format!("index.html?commit={commit}"));
    assert_eq!(r.bytes, b"<script>alert(1)</script>\n");

    for (path, status, hint) in [
        ("missing.txt", 404, "does not exist"),
        ("data", 404, "is a directory"),
        ("data/blob.bin/x", 404, "does not exist"),
        (".git/config", 400, ".git"),
        ("a/%2E%2E/b", 400, "`..`"),
    ] {
        let r = c.get(&format!("/api/projects/{PROJECT}/files/{path}"));
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(
            r.json()["message"].as_str().unwrap().contains(hint),
            "{path}: {}",
            r.body
        );
    }
}

#[test]
fn diff_lists_added_modified_deleted_and_renamed_with_unified_text() {
    let c = Case::new();
    let keep: String = (0..40)
        .map(|i| format!("line {i} stays the same\n"))
        .collect();
    let first = c.committed(
        None,
        json!({
            "app.js": "const a = 1\nconst b = 2\n",
            "gone.txt": "bye\n",
            "old/name.txt": keep,
            "logo.bin": {"base64": base64::engine::general_purpose::STANDARD.encode(binary_blob())},
            "kind": "a file that becomes a link\n",
        }),
    );
    let from = first["commit"].as_str().unwrap();
    let mut bin2 = binary_blob();
    bin2[3] = 0xff;
    let big: String = (0..20_000)
        .map(|i| format!("generated line {i}\n"))
        .collect();
    let second = c.committed(
        Some(from),
        json!({
            "app.js": "const a = 1\nconst b = 3\n",
            "gone.txt": null,
            "old/name.txt": null,
            "new/name.txt": keep,
            "added.txt": "new\n",
            "logo.bin": {"base64": base64::engine::general_purpose::STANDARD.encode(&bin2)},
            "kind": {"symlink": "app.js"},
            "big.txt": big,
        }),
    );
    let to = second["commit"].as_str().unwrap();

    let r = c.get(&format!("/api/projects/{PROJECT}/diff?from={from}&to={to}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let d = r.json();
    assert_eq!(d["from"], from);
    assert_eq!(d["to"], to);
    let files = d["files"].as_array().unwrap();
    let by = |path: &str| {
        files
            .iter()
            .find(|f| f["path"] == path)
            .unwrap_or_else(|| panic!("{path} not in the diff: {d}"))
    };
    assert_eq!(files.len(), 7, "{d}");

    let app = by("app.js");
    assert_eq!(app["status"], "modified");
    assert_eq!(app["binary"], false);
    let text = app["diff"].as_str().unwrap();
    assert!(text.contains("\n-const b = 2\n+const b = 3\n"), "{text}");
    assert!(text.contains("--- a/app.js\n+++ b/app.js\n@@ "), "{text}");

    assert_eq!(by("gone.txt")["status"], "deleted");
    assert!(by("gone.txt")["diff"]
        .as_str()
        .unwrap()
        .contains("\n-bye\n"));
    assert_eq!(by("added.txt")["status"], "added");
    assert!(by("added.txt")["diff"]
        .as_str()
        .unwrap()
        .contains("\n+new\n"));
    let renamed = by("new/name.txt");
    assert_eq!(renamed["status"], "renamed", "{renamed}");
    assert_eq!(renamed["old_path"], "old/name.txt");
    let logo = by("logo.bin");
    assert_eq!(
        (&logo["status"], &logo["binary"]),
        (&json!("modified"), &json!(true))
    );
    assert!(logo.get("diff").is_none(), "{logo}");
    let kind = by("kind");
    assert_eq!(kind["status"], "type_changed", "{kind}");
    assert!(kind["diff"].as_str().unwrap().contains("+app.js"), "{kind}");
    let big = by("big.txt");
    assert_eq!(big["truncated"], true, "{}", big["truncated"]);
    let cut = big["diff"].as_str().unwrap();
    assert!(
        cut.len() <= 256 << 10 && cut.len() > 200 << 10,
        "{}",
        cut.len()
    );
    assert!(cut.ends_with('\n'), "cut at a line end");

    // Without `from`: the commit's own changes; a root commit's against nothing.
    let own = c
        .get(&format!("/api/projects/{PROJECT}/diff?to={to}"))
        .json();
    assert_eq!(own["from"], from);
    assert_eq!(own["files"].as_array().unwrap().len(), 7);
    let root = c
        .get(&format!("/api/projects/{PROJECT}/diff?to={from}"))
        .json();
    assert_eq!(root["from"], Value::Null);
    assert_eq!(root["files"].as_array().unwrap().len(), 5, "{root}");
    assert!(root["files"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["status"] == "added"));

    let r = c.get(&format!("/api/projects/{PROJECT}/diff?from=nothex&to={to}"));
    assert_eq!(r.status, 400, "{}", r.body);
    let r = c.get(&format!(
        "/api/projects/{PROJECT}/diff?from={}&to={to}",
        "1".repeat(40)
    ));
    assert_eq!(r.status, 404, "{}", r.body);
}

/// The request's files are within every limit, but the pack git builds from them (incompressible
/// bytes plus tree and commit) is over `max_push_bytes`, which only the push path measures.
#[test]
fn rejects_a_commit_whose_pack_is_over_the_push_limit() {
    let c = Case::with(Options::args(&[
        "--max-file-bytes",
        "3000",
        "--max-push-bytes",
        "3000",
    ]));
    let seed = c.committed(None, json!({"a.txt": "a\n"}));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..2990)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(noise);
    let v = c.refused(
        &json!({"message": "m", "parent": seed["commit"], "files": {"noise.bin": {"base64": b64}}}),
        413,
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("KILN_MAX_PUSH_BYTES"),
        "{v}"
    );
}

/// The API checks the files a request names; the pre-receive hook checks every file of the new
/// tree. A node started with a lower `max_file_bytes` than the one that stored a file refuses
/// an API commit that keeps it, exactly as it would refuse a push: the API commit went through
/// the hook.
#[test]
fn refuses_an_inherited_file_over_the_limit_in_the_hook_like_a_push() {
    let c = Case::new();
    let seed = c.committed(None, json!({"big.txt": "x".repeat(2000)}));
    let strict = Gitstore::start_with(Options {
        store: Some(c.node.store_url().to_owned()),
        args: vec!["--max-file-bytes".into(), "1024".into()],
        ..Options::default()
    });
    let store = c.node.store_dir();
    let before = store_snapshot(&store, PROJECT);
    let r = strict.http(
        "POST",
        &format!("/api/projects/{PROJECT}/commits"),
        Some(&c.token),
        Some(
            &json!({"message": "m", "parent": seed["commit"], "files": {"small.txt": "ok"}})
                .to_string(),
        ),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(
        r.json()["message"],
        "big.txt: file is 2000 bytes, over the 1024-byte limit",
        "expected the hook's own words"
    );
    assert_eq!(store_snapshot(&store, PROJECT), before);

    // A git push of the same change is refused with the same words.
    let clone = c.clone("clone");
    clone.commit_file("small.txt", "ok");
    let out = clone.push(&strict.git_url(&c.token, PROJECT), &["main"]);
    assert!(!out.ok, "push accepted");
    assert!(
        out.stderr
            .contains("big.txt: file is 2000 bytes, over the 1024-byte limit"),
        "{}",
        out.stderr
    );
}

/// Bodies are bounded by KILN_MAX_PUSH_BYTES, not by axum's 2 MB default for extractors.
#[test]
fn accepts_a_body_larger_than_the_default_extractor_limit() {
    let c = Case::new();
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let v = c.committed(
        None,
        json!({"big.bin": {"base64": base64::engine::general_purpose::STANDARD.encode(&big)}}),
    );
    let r = get_bytes(
        &c.node,
        &format!(
            "/api/projects/{PROJECT}/files/big.bin?commit={}",
            v["commit"].as_str().unwrap()
        ),
        &c.token,
    );
    assert_eq!(r.status, 200);
    assert!(r.bytes == big, "3 MiB file differs after the round trip");
}
