//! Versions, pinned URLs, rollback and export, end to end: real pushes through gitstore, real
//! builds by the agent, and what a user of the API (or of the served files) would check.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(180);
const PREVIEW_URL: &str = "http://127.0.0.1:9/preview";

fn text_commit(app: &Repo, text: &str) -> String {
    app.commit_file(
        "src/text.ts",
        format!("export const TEXT: string = '{text}'\n"),
    )
}

/// The JavaScript of a published build directory (`current` or `builds/<n>`).
fn js_of(dir: &Path) -> String {
    std::fs::read_dir(dir.join("assets"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "js"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect()
}

fn post_json(stack: &Stack, path: &str, token: &str, body: &str) -> Response {
    let auth = format!("Bearer {token}");
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

fn get_as(stack: &Stack, path: &str, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    http(
        "GET",
        &format!("{}{path}", stack.agent_url()),
        &[("Authorization", &auth)],
        b"",
    )
}

fn versions(stack: &Stack, project: &str, query: &str) -> serde_json::Value {
    let r = stack.agent_http("GET", &format!("/api/projects/{project}/versions{query}"));
    assert_eq!(r.status, 200, "versions: {}", r.body);
    r.json()
}

fn current_target(stack: &Stack, project: &str) -> String {
    std::fs::read_link(stack.publish_dir().join(project).join("current"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// `git <args>` in `dir` with the harness's hermetic settings, stdout as bytes.
fn git_bytes(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn wait_reconciled(stack: &Stack, before: usize) {
    let started = Instant::now();
    while stack
        .agent_log()
        .matches("reconciled with the blob store")
        .count()
        <= before
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the restarted agent never reconciled:\n{}",
            stack.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_pushes_list_as_versions_keep_pinned_builds_and_roll_back_at_once() {
    let mut stack = Stack::start_with(&["--preview-url", PREVIEW_URL]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    let mut commits = Vec::new();
    // The fixture says "first text" already.
    for (i, text) in ["first text", "second text", "third text"]
        .iter()
        .enumerate()
    {
        if i > 0 {
            text_commit(&app, text);
        }
        stack.push(&app, "shop");
        let c = app.head();
        let st = stack.wait_settled("shop", &c, if i == 0 { COLD } else { WARM });
        assert_eq!(st["state"], "ready", "{st:#}");
        assert_eq!(
            st["last_good"]["pinned_url"],
            format!("{PREVIEW_URL}/shop/b/{}/", st["build"]),
            "{st:#}"
        );
        commits.push((c, st["build"].as_u64().unwrap()));
    }
    let (c1, b1) = commits[0].clone();
    let (c2, b2) = commits[1].clone();
    let (c3, b3) = commits[2].clone();

    // The list: three commits, newest first, each with its build; the newest is served.
    let v = versions(&stack, "shop", "");
    assert_eq!(v["branch"], "refs/heads/main", "{v:#}");
    assert_eq!(v["total"], 3, "{v:#}");
    let list = v["versions"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|x| x["commit"].as_str().unwrap()).collect();
    assert_eq!(ids, [c3.as_str(), c2.as_str(), c1.as_str()], "{v:#}");
    for (entry, (_, build)) in list.iter().zip(commits.iter().rev()) {
        let b = &entry["build"];
        assert_eq!(b["id"], *build, "{entry:#}");
        assert_eq!(b["state"], "ready", "{entry:#}");
        assert_eq!(b["kept"], true, "{entry:#}");
        assert_eq!(b["pinned_url"], format!("{PREVIEW_URL}/shop/b/{build}/"));
        assert!(b["duration_ms"].as_u64().unwrap() > 0, "{entry:#}");
        assert_eq!(entry["author"]["name"], "Kiln Test");
        assert_eq!(entry["author"]["email"], "test@kiln.invalid");
        let age = now_secs() - entry["time"].as_i64().unwrap();
        assert!(
            (0..3600).contains(&age),
            "author time is Unix seconds: {entry:#}"
        );
    }
    assert_eq!(list[0]["message"], "update src/text.ts");
    assert_eq!(list[0]["files_changed"], 1);
    let fixture_files = app
        .git_ok(&["ls-tree", "-r", "--name-only", &c1])
        .lines()
        .count();
    assert_eq!(
        list[2]["files_changed"], fixture_files,
        "a root commit adds every file"
    );
    let current: Vec<bool> = list.iter().map(|x| x["current"] == true).collect();
    assert_eq!(current, [true, false, false]);
    let page = versions(&stack, "shop", "?limit=2&offset=1");
    let ids: Vec<&str> = page["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["commit"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [c2.as_str(), c1.as_str()]);

    // Build 1 is still whole at its pinned URL, and what its page loads resolves: under the
    // moving URL's assets path, from the union of the kept builds' assets.
    let publish = stack.publish_dir().join("shop");
    let pinned = publish.join("builds").join(b1.to_string());
    assert!(js_of(&pinned).contains("first text"));
    assert!(js_of(&publish.join("current")).contains("third text"));
    let index1 = std::fs::read_to_string(pinned.join("index.html")).unwrap();
    let assets = referenced_assets(&index1, "/preview/shop/");
    assert!(
        assets.iter().any(|a| a.ends_with(".js")),
        "build 1 loads its bundle from the moving URL's path: {index1}"
    );
    for name in &assets {
        let served = std::fs::read(publish.join("assets").join(name))
            .unwrap_or_else(|e| panic!("{name} of build 1 is not in the union: {e}"));
        assert_eq!(
            served,
            std::fs::read(pinned.join("assets").join(name)).unwrap()
        );
    }

    // Roll back to the first commit: its build is kept, so the switch is immediate.
    let started = Instant::now();
    let r = post_json(
        &stack,
        "/api/projects/shop/rollback",
        &stack.token,
        &format!(r#"{{"commit": "{c1}"}}"#),
    );
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(took < Duration::from_secs(1), "rollback took {took:?}");
    eprintln!("rollback to a kept build answered in {took:?}");
    let body = r.json();
    assert_eq!(body["build"], b1);
    assert_eq!(body["commit"], c1.as_str());
    assert_eq!(body["rebuilt"], false);
    assert_eq!(body["preview_url"], format!("{PREVIEW_URL}/shop/"));
    assert_eq!(body["pinned_url"], format!("{PREVIEW_URL}/shop/b/{b1}/"));
    assert_eq!(current_target(&stack, "shop"), format!("builds/{b1}"));
    assert_eq!(
        stack.published("shop", "index.html").unwrap(),
        index1,
        "the served page is build 1's"
    );
    let st = stack.status("shop");
    assert_eq!(st["last_good"]["build"], b1, "{st:#}");
    assert_eq!(st["last_good"]["rollback"]["from_build"], b3, "{st:#}");
    let v = versions(&stack, "shop", "");
    assert_eq!(v["versions"][2]["current"], true, "{v:#}");
    assert_eq!(v["versions"][0]["current"], false, "{v:#}");

    // A restart (with its reconcile against the store) leaves the rollback alone.
    let reconciled = stack
        .agent_log()
        .matches("reconciled with the blob store")
        .count();
    let build_before = stack.status("shop")["build"].clone();
    stack.restart_agent();
    wait_reconciled(&stack, reconciled);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(current_target(&stack, "shop"), format!("builds/{b1}"));
    let st = stack.status("shop");
    assert_eq!(st["last_good"]["build"], b1, "{st:#}");
    assert_eq!(st["build"], build_before, "no build was queued: {st:#}");

    // Roll back by build number, then a new push builds the new head as usual.
    let r = post_json(
        &stack,
        "/api/projects/shop/rollback",
        &stack.token,
        &format!(r#"{{"build": {b2}}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["commit"], c2.as_str());
    assert_eq!(current_target(&stack, "shop"), format!("builds/{b2}"));
    let c4 = text_commit(&app, "fourth text");
    stack.push(&app, "shop");
    let st = stack.wait_settled("shop", &c4, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert!(st["last_good"]["rollback"].is_null(), "{st:#}");
    assert!(js_of(&publish.join("current")).contains("fourth text"));
}

#[test]
fn rollback_to_a_pruned_build_builds_that_commit_again() {
    let stack = Stack::start_with(&["--preview-url", PREVIEW_URL, "--keep-builds", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "pruned");
    let c1 = app.head();
    let b1 = stack.wait_settled("pruned", &c1, COLD)["build"]
        .as_u64()
        .unwrap();
    let c2 = text_commit(&app, "second text");
    stack.push(&app, "pruned");
    let st = stack.wait_settled("pruned", &c2, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    let b2 = st["build"].as_u64().unwrap();
    let publish = stack.publish_dir().join("pruned");
    assert!(!publish.join("builds").join(b1.to_string()).exists());
    // The union holds only what kept builds hold.
    let mut union: Vec<String> = std::fs::read_dir(publish.join("assets"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut kept: Vec<String> =
        std::fs::read_dir(publish.join("builds").join(b2.to_string()).join("assets"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    union.sort();
    kept.sort();
    assert_eq!(union, kept);
    let v = versions(&stack, "pruned", "");
    assert_eq!(v["versions"][1]["build"]["kept"], false, "{v:#}");

    let r = post_json(
        &stack,
        "/api/projects/pruned/rollback",
        &stack.token,
        &format!(r#"{{"commit": "{c1}"}}"#),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let body = r.json();
    assert_eq!(body["rebuilt"], true);
    let b3 = body["build"].as_u64().unwrap();
    assert!(b3 > b2);
    let st = stack.wait_settled("pruned", &c1, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["build"], b3, "{st:#}");
    assert_eq!(st["last_good"]["build"], b3, "{st:#}");
    assert_eq!(st["last_good"]["rollback"]["from_build"], b2, "{st:#}");
    assert_eq!(current_target(&stack, "pruned"), format!("builds/{b3}"));
    let js = js_of(&publish.join("current"));
    assert!(js.contains("first text") && !js.contains("second text"));
    let v = versions(&stack, "pruned", "");
    assert_eq!(v["versions"][1]["commit"], c1.as_str());
    assert_eq!(v["versions"][1]["current"], true, "{v:#}");
    assert_eq!(v["versions"][1]["build"]["id"], b3, "{v:#}");
}

/// A static app (no package.json: published as it is, no install or build) with a text file, a
/// binary file, an executable, a symlink and nested directories.
fn static_app(path: &Path) -> Repo {
    let r = Repo::init(path);
    r.write("index.html", "<!doctype html><p>static app</p>\n");
    r.write("src/main.ts", "export const hi = 'héllo ✓'\n");
    r.write("src/deep/nested/data.json", "{\"n\": 1}\n");
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend((0..=255u8).rev());
    png.extend([0, 0, 0xff, 0xfe, 0xc3]);
    r.write("assets/logo.png", png);
    r.write("run.sh", "#!/bin/sh\necho hi\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/main.ts", path.join("latest.ts")).unwrap();
    r.git_ok(&["add", "-A"]);
    r.git_ok(&["commit", "-q", "-m", "static app"]);
    r
}

#[test]
fn exports_match_git_archive_and_round_trip_as_a_webcontainer_tree() {
    use base64::Engine;
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = static_app(&tmp.path().join("app"));
    stack.push(&app, "export");
    let c = app.head();
    assert_eq!(stack.wait_settled("export", &c, WARM)["state"], "ready");
    let clone = Repo::clone(
        &stack.gitstore.git_url(&stack.token, "export"),
        &tmp.path().join("clone"),
    );

    for format in ["tar.gz", "zip"] {
        let expected = git_bytes(&clone.path, &["archive", &format!("--format={format}"), &c]);
        for query in [String::new(), format!("&commit={}", &c[..12])] {
            let r = stack.agent_http(
                "GET",
                &format!("/api/projects/export/export?format={format}{query}"),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(
                r.bytes == expected,
                "{format}{query}: not byte-identical to git archive"
            );
            assert_eq!(r.header("x-kiln-commit"), Some(c.as_str()));
            let disposition = r.header("content-disposition").unwrap();
            assert_eq!(
                disposition,
                format!("attachment; filename=\"export-{}.{format}\"", &c[..12])
            );
        }
    }

    let r = stack.agent_http("GET", "/api/projects/export/export?format=webcontainer");
    assert_eq!(r.status, 200, "{}", r.body);
    let tree = r.json();
    let mut found = std::collections::BTreeMap::new();
    fn walk(
        node: &serde_json::Value,
        prefix: &str,
        out: &mut std::collections::BTreeMap<String, serde_json::Value>,
    ) {
        for (name, entry) in node.as_object().expect("a directory is an object") {
            let path = format!("{prefix}{name}");
            if let Some(dir) = entry.get("directory") {
                walk(dir, &format!("{path}/"), out);
            } else {
                out.insert(path, entry["file"].clone());
            }
        }
    }
    walk(&tree, "", &mut found);
    let listed = git_bytes(&clone.path, &["ls-tree", "-r", "-z", "--name-only", &c]);
    let paths: Vec<String> = listed
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8(p.to_vec()).unwrap())
        .collect();
    assert_eq!(
        found.keys().cloned().collect::<Vec<_>>(),
        paths,
        "every file of the commit, nothing else"
    );
    for path in &paths {
        let file = &found[path];
        let on_disk = clone.path.join(path);
        if std::fs::symlink_metadata(&on_disk).unwrap().is_symlink() {
            let target = std::fs::read_link(&on_disk).unwrap();
            assert_eq!(file["symlink"], target.to_string_lossy().as_ref(), "{path}");
            continue;
        }
        let bytes = match file["encoding"].as_str() {
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(file["contents"].as_str().unwrap())
                .unwrap(),
            None => file["contents"].as_str().unwrap().as_bytes().to_vec(),
            Some(other) => panic!("{path}: unexpected encoding {other}"),
        };
        assert_eq!(bytes, std::fs::read(&on_disk).unwrap(), "{path}");
    }
    assert_eq!(found["assets/logo.png"]["encoding"], "base64");
    assert_eq!(found["latest.ts"]["symlink"], "src/main.ts");
    assert!(found["src/main.ts"]["contents"]
        .as_str()
        .unwrap()
        .contains('✓'));
}

#[test]
fn refuses_exports_of_unknown_commits_and_bad_formats() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = static_app(&tmp.path().join("app"));
    stack.push(&app, "exp-bad");
    assert_eq!(
        stack.wait_settled("exp-bad", &app.head(), WARM)["state"],
        "ready"
    );
    let unknown = "0123456789abcdef0123456789abcdef01234567";
    for (query, status) in [
        (format!("format=tar.gz&commit={unknown}"), 404),
        (format!("format=webcontainer&commit={unknown}"), 404),
        ("format=rar".to_owned(), 400),
        (String::new(), 400),
        ("format=zip&commit=HEAD~1".to_owned(), 400),
    ] {
        let r = stack.agent_http("GET", &format!("/api/projects/exp-bad/export?{query}"));
        assert_eq!(r.status, status, "{query}: {}", r.body);
        let e = r.json();
        assert!(e["error"].is_string() && e["message"].is_string(), "{e:#}");
    }
    let other = stack.gitstore.create_client("someone-else");
    let r = get_as(&stack, "/api/projects/exp-bad/export?format=zip", &other);
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn rejects_bad_rollbacks_and_version_queries() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = static_app(&tmp.path().join("app"));
    stack.push(&app, "hostile");
    let c = app.head();
    let st = stack.wait_settled("hostile", &c, WARM);
    let build = st["build"].as_u64().unwrap();

    let path = "/api/projects/hostile/rollback";
    for body in [
        "not json",
        "{}",
        r#"{"commit": "abc"}"#,
        r#"{"commit": "HEAD"}"#,
        &format!(r#"{{"commit": "{c}", "build": {build}}}"#),
        r#"{"build": -1}"#,
        r#"{"commit": 5}"#,
        r#"{"tag": "v1"}"#,
    ] {
        let r = post_json(&stack, path, &stack.token, body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["error"], "bad_request", "{body}");
    }
    let unknown = "0123456789abcdef0123456789abcdef01234567";
    let r = post_json(
        &stack,
        path,
        &stack.token,
        &format!(r#"{{"commit": "{unknown}"}}"#),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["message"].as_str().unwrap().contains(unknown));
    let r = post_json(&stack, path, &stack.token, r#"{"build": 999}"#);
    assert_eq!(r.status, 404, "{}", r.body);

    // Another client's token learns nothing about the project, whatever it asks.
    let other = stack.gitstore.create_client("someone-else");
    let r = post_json(&stack, path, &other, &format!(r#"{{"commit": "{c}"}}"#));
    assert_eq!(r.status, 404, "{}", r.body);
    let r = get_as(&stack, "/api/projects/hostile/versions", &other);
    assert_eq!(r.status, 404, "{}", r.body);
    let r = http(
        "GET",
        &format!("{}/api/projects/hostile/versions", stack.agent_url()),
        &[],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.body);

    for query in ["limit=0", "limit=501", "limit=ten", "offset=-1", "offset=x"] {
        let r = stack.agent_http("GET", &format!("/api/projects/hostile/versions?{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .contains(query.split('=').next().unwrap()));
    }

    // A commit that is in the repository but on no branch any more (its branch was deleted)
    // cannot be rolled back to.
    let side = app.commit_file("side.txt", "side\n");
    let url = stack.gitstore.git_url(&stack.token, "hostile");
    assert!(app.push(&url, &["HEAD:refs/heads/side"]).ok);
    let r = stack.agent_http(
        "GET",
        &format!("/api/projects/hostile/export?format=zip&commit={side}"),
    );
    assert_eq!(r.status, 200, "on a branch, it exports: {}", r.body);
    let out = app.push(&url, &[":refs/heads/side"]);
    assert!(out.ok, "{}", out.stderr);
    let r = post_json(
        &stack,
        path,
        &stack.token,
        &format!(r#"{{"commit": "{side}"}}"#),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.json()["message"].as_str().unwrap().contains("no branch"),
        "{}",
        r.body
    );
    assert_eq!(
        current_target(&stack, "hostile"),
        format!("builds/{build}"),
        "nothing changed"
    );
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
