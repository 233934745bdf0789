//! Stock git against a real gitstore on the embedded file store: push, clone, fetch, ls-remote,
//! both wire protocols, fast-forward rules, and the project API a generator reads after a push.

use std::path::Path;

use kiln_tests::*;

#[test]
fn push_clone_fetch_and_ls_remote_round_trip_with_protocol_v0_and_v2() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Shop");
    let url = g.git_url(&token, "shop");

    let pushed = app.push(&url, &["main"]);
    assert!(pushed.ok, "first push refused:\n{}", pushed.stderr);
    assert!(
        pushed.stderr.contains("stored durably as generation 1"),
        "push did not confirm durability:\n{}",
        pushed.stderr
    );
    let first = app.head();

    // A default clone (git 2.47 speaks v2) checks out the same commit and the same files.
    let clone = Repo::clone(&url, &work.path().join("clone"));
    assert_eq!(clone.head(), first);
    assert_eq!(clone.git_ok(&["symbolic-ref", "HEAD"]), "refs/heads/main");
    assert_eq!(
        clone.git_ok(&["ls-tree", "-r", "HEAD"]),
        app.git_ok(&["ls-tree", "-r", "HEAD"]),
        "the clone's tree differs from what was pushed"
    );
    assert_eq!(
        std::fs::read(clone.path.join("src/App.jsx")).unwrap(),
        std::fs::read(app.path.join("src/App.jsx")).unwrap()
    );

    // Both wire protocols, forced explicitly.
    for v in ["0", "2"] {
        let dest = work.path().join(format!("clone-v{v}"));
        let proto = format!("protocol.version={v}");
        let c = Repo::try_clone(&url, &dest, &["-c", &proto])
            .unwrap_or_else(|o| panic!("clone with protocol v{v} failed:\n{}", o.stderr));
        assert_eq!(c.head(), first, "protocol v{v}");
    }

    // A second commit is visible to `git fetch` in the existing clone, over v0 and v2.
    let second = app.commit_file("src/components/Header.jsx", "export default function Header({ title }) { return <h1 className=\"title\">{title}</h1> }\n");
    let pushed = app.push(&url, &["main"]);
    assert!(pushed.ok, "second push refused:\n{}", pushed.stderr);
    for v in ["0", "2"] {
        let c = Repo {
            path: work.path().join(format!("clone-v{v}")),
        };
        let proto = format!("protocol.version={v}");
        c.git_ok(&["-c", &proto, "fetch", "-q", "origin"]);
        assert_eq!(
            c.git_ok(&["rev-parse", "origin/main"]),
            second,
            "fetch v{v}"
        );
    }
    clone.git_ok(&["pull", "-q", "--ff-only"]);
    assert_eq!(clone.head(), second);

    // ls-remote lists the branch and HEAD at the new commit, over both protocols.
    for v in ["0", "2"] {
        let proto = format!("protocol.version={v}");
        let ls = git(work.path(), &["-c", &proto, "ls-remote", &url]);
        assert!(ls.ok, "ls-remote v{v}: {}", ls.stderr);
        assert!(
            ls.stdout.contains(&format!("{second}\trefs/heads/main")),
            "ls-remote v{v}:\n{}",
            ls.stdout
        );
        assert!(
            ls.stdout.contains(&format!("{second}\tHEAD")),
            "ls-remote v{v}:\n{}",
            ls.stdout
        );
    }
    assert_eq!(generation(&g.store_dir(), "shop"), 2);
}

#[test]
fn project_api_reports_generation_head_and_refs_after_a_push() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let created = g.http(
        "POST",
        "/api/projects",
        Some(&token),
        Some(r#"{"id":"blog"}"#),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["created"], true);
    let again = g.http(
        "POST",
        "/api/projects",
        Some(&token),
        Some(r#"{"id":"blog"}"#),
    );
    assert_eq!(
        again.status, 200,
        "creating an owned project twice: {}",
        again.body
    );

    let empty = g.http("GET", "/api/projects/blog", Some(&token), None);
    assert_eq!(empty.status, 200, "{}", empty.body);
    assert_eq!(empty.json()["generation"], 0);

    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Blog");
    assert!(app.push(&g.git_url(&token, "blog"), &["main"]).ok);
    let info = g.http("GET", "/api/projects/blog", Some(&token), None);
    assert_eq!(info.status, 200, "{}", info.body);
    let v = info.json();
    assert_eq!(v["generation"], 1, "{v}");
    assert_eq!(v["head"], "refs/heads/main", "{v}");
    assert_eq!(v["refs"]["refs/heads/main"], app.head(), "{v}");
    assert_eq!(v["packs"], 1, "{v}");
}

#[test]
fn rejects_non_fast_forward_push_but_accepts_it_forced() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "One");
    let url = g.git_url(&token, "ff");
    assert!(app.push(&url, &["main"]).ok);
    let published = app.head();

    app.write("src/App.css", "main { margin: 0; }\n");
    app.git_ok(&["commit", "-q", "-a", "--amend", "-m", "rewritten"]);
    let rewritten = app.head();
    let unforced = app.push(&url, &["main"]);
    assert!(!unforced.ok, "a non-fast-forward push was accepted");
    assert!(
        unforced.stderr.contains("non-fast-forward") || unforced.stderr.contains("fetch first"),
        "git did not say why:\n{}",
        unforced.stderr
    );
    assert_eq!(
        ls_remote_main(work.path(), &url),
        published,
        "the refused push moved main"
    );
    assert_eq!(generation(&g.store_dir(), "ff"), 1);

    let forced = app.push(&url, &["--force", "main"]);
    assert!(forced.ok, "forced push refused:\n{}", forced.stderr);
    assert_eq!(ls_remote_main(work.path(), &url), rewritten);
    let clone = Repo::clone(&url, &work.path().join("clone"));
    assert_eq!(clone.head(), rewritten);
}

fn ls_remote_main(dir: &Path, url: &str) -> String {
    let out = git(dir, &["ls-remote", url, "refs/heads/main"]);
    assert!(out.ok, "ls-remote: {}", out.stderr);
    out.stdout
        .split('\t')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[test]
fn accepts_ordinary_dot_names_gitignore_and_github_workflows() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Dots");
    app.write(".github/workflows/ci.yml", "on: push\njobs: {}\n");
    app.write(".gitignore", "node_modules\ndist\n.env\n");
    app.write(".gitattributes", "* text=auto\n");
    app.write("src/.gitkeep", "");
    app.write("git/notes.md", "a directory called git is fine\n");
    app.git_ok(&["add", "-A"]);
    app.git_ok(&["commit", "-q", "-m", "dot files"]);
    let url = g.git_url(&token, "dots");
    let out = app.push(&url, &["main"]);
    assert!(out.ok, "ordinary dot names refused:\n{}", out.stderr);
    let clone = Repo::clone(&url, &work.path().join("clone"));
    assert!(clone.path.join(".github/workflows/ci.yml").is_file());
    assert!(clone.path.join(".gitignore").is_file());
    assert!(clone.path.join("src/.gitkeep").is_file());
}

#[test]
fn pushes_to_a_second_branch_and_a_tag_are_stored_and_cloned() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Refs");
    let url = g.git_url(&token, "refs");
    assert!(app.push(&url, &["main"]).ok);
    app.git_ok(&["checkout", "-q", "-b", "feature"]);
    let feature = app.commit_file("src/feature.js", "export const F = 1;\n");
    app.git_ok(&["tag", "-a", "v1", "-m", "release 1"]);
    let out = app.push(&url, &["feature", "v1"]);
    assert!(out.ok, "branch and tag push refused:\n{}", out.stderr);
    let ls = git(work.path(), &["ls-remote", &url]);
    assert!(
        ls.stdout
            .contains(&format!("{feature}\trefs/heads/feature")),
        "{}",
        ls.stdout
    );
    assert!(ls.stdout.contains("\trefs/tags/v1\n"), "{}", ls.stdout);
    let clone = Repo::clone(&url, &work.path().join("clone"));
    assert_eq!(clone.git_ok(&["rev-parse", "v1^{commit}"]), feature);
    // Deleting the branch is a ref update like any other.
    let del = app.push(&url, &[":feature"]);
    assert!(del.ok, "branch deletion refused:\n{}", del.stderr);
    let ls = git(work.path(), &["ls-remote", &url]);
    assert!(!ls.stdout.contains("refs/heads/feature"), "{}", ls.stdout);
}

#[test]
fn isomorphic_git_pushes_and_clones() {
    require_tool("node", "apt-get install -y nodejs npm");
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    assert!(
        js.join("node_modules/isomorphic-git").exists(),
        "isomorphic-git is missing; install it with: cd tests/js && npm ci"
    );
    let g = Gitstore::start();
    let token = g.create_client("browser-generator");
    let work = tempfile::tempdir().unwrap();
    let out = run(std::process::Command::new("node")
        .arg(js.join("isomorphic-git-roundtrip.mjs"))
        .arg(g.anonymous_git_url("iso"))
        .arg(&token)
        .arg(work.path().join("w")));
    assert!(out.ok, "isomorphic-git round trip failed:\n{}", out.stderr);
    assert!(out.stdout.contains("\"pushed\""), "{}", out.stdout);
    assert_eq!(generation(&g.store_dir(), "iso"), 1);
}
