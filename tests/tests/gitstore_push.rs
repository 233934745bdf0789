//! Stock git against a real gitstore on the embedded file store: push, clone, fetch, auth,
//! fast-forward rules, and every hostile tree refused with its path named.

mod common;

use std::path::Path;

use common::*;

fn started() -> (Gitstore, String) {
    let g = Gitstore::start(Options::default());
    let token = g.client("gen");
    (g, token)
}

#[test]
fn push_clone_and_fetch_round_trip_with_protocol_v0_and_v2() {
    let (g, token) = started();
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "one");
    let url = g.url(&token, "shop");
    let (ok, _, err) = git(&app, &["push", &url, "main"]);
    assert!(ok, "push: {err}");
    assert!(
        err.contains("stored durably"),
        "push did not confirm durability: {err}"
    );
    let head = git_ok(&app, &["rev-parse", "HEAD"]);
    for v in ["0", "2"] {
        let dest = work.path().join(format!("clone-v{v}"));
        let (ok, _, err) = git(
            work.path(),
            &[
                "-c",
                &format!("protocol.version={v}"),
                "clone",
                "-q",
                &url,
                dest.to_str().unwrap(),
            ],
        );
        assert!(ok, "clone v{v}: {err}");
        assert_eq!(git_ok(&dest, &["rev-parse", "HEAD"]), head);
    }
    let second = commit_file(&app, "src/text.js", "export const TEXT = \"two\";\n");
    let (ok, _, err) = git(&app, &["push", &url, "main"]);
    assert!(ok, "second push: {err}");
    let clone = work.path().join("clone-v2");
    git_ok(&clone, &["fetch", "-q", "origin"]);
    assert_eq!(git_ok(&clone, &["rev-parse", "origin/main"]), second);
    let ls = git_ok(work.path(), &["ls-remote", &url]);
    assert!(
        ls.contains(&second) && ls.contains("refs/heads/main"),
        "{ls}"
    );
    assert_eq!(generation(&g.store_dir(), "shop"), 2);
}

#[test]
fn rejects_a_wrong_token_and_asks_for_credentials() {
    let (g, _token) = started();
    let work = tempfile::tempdir().unwrap();
    make_app(&work.path().join("app"), "x");
    let (ok, _, _) = git(
        &work.path().join("app"),
        &["push", &g.url("kiln_aaaaaaaaaaaa_wrong", "p"), "main"],
    );
    assert!(!ok, "push with a wrong token accepted");
    let (code, _) = g.http(
        "GET",
        "/git/p.git/info/refs?service=git-upload-pack",
        None,
        None,
    );
    assert_eq!(code, 401);
}

#[test]
fn refuses_reads_and_pushes_to_another_clients_project() {
    let (g, a) = started();
    let b = g.client("other");
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "mine");
    assert!(git(&app, &["push", &g.url(&a, "private"), "main"]).0);
    let (ok, _, _) = git(
        work.path(),
        &["clone", "-q", &g.url(&b, "private"), "stolen"],
    );
    assert!(!ok, "another client cloned the project");
    let (ok, _, err) = git(
        &app,
        &["push", &g.url(&b, "private"), "main:refs/heads/evil"],
    );
    assert!(!ok && err.contains("another client"), "{err}");
}

#[test]
fn rejects_non_fast_forward_unless_forced() {
    let (g, token) = started();
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "one");
    let url = g.url(&token, "ff");
    assert!(git(&app, &["push", &url, "main"]).0);
    git_ok(&app, &["commit", "-q", "--amend", "-m", "rewritten"]);
    let (ok, _, _) = git(&app, &["push", &url, "main"]);
    assert!(!ok, "non-fast-forward accepted");
    let (ok, _, err) = git(&app, &["push", "--force", &url, "main"]);
    assert!(ok, "forced push refused: {err}");
    let ls = git_ok(work.path(), &["ls-remote", &url, "refs/heads/main"]);
    assert!(ls.starts_with(&git_ok(&app, &["rev-parse", "HEAD"])));
}

#[test]
fn rejects_invalid_project_ids_with_the_rule() {
    let (g, token) = started();
    for bad in ["Bad_Name", "-x", &"a".repeat(64)] {
        let (code, body) = g.http(
            "GET",
            &format!("/git/{bad}.git/info/refs?service=git-receive-pack"),
            Some(&token),
            None,
        );
        assert_eq!(code, 400, "{bad}");
        assert!(body.contains("a-z, 0-9 and '-'"), "{bad}: {body}");
    }
}

/// Builds a commit whose tree comes from `build` (a shell snippet run in the repo that writes the
/// tree id to ./tree), pushes it, and returns git's stderr; panics if the push was accepted.
fn refused(g: &Gitstore, token: &str, project: &str, build: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    git_ok(d, &["init", "-q", "-b", "main"]);
    let (ok, _, err) = run(std::process::Command::new("sh")
        .arg("-c")
        .arg(build)
        .current_dir(d));
    assert!(ok, "fixture: {err}");
    let tree = std::fs::read_to_string(d.join("tree")).unwrap();
    let commit = git_ok(d, &["commit-tree", tree.trim(), "-m", "hostile"]);
    git_ok(d, &["update-ref", "refs/heads/main", &commit]);
    let before = generation(&g.store_dir(), project);
    let (ok, _, err) = git(d, &["push", &g.url(token, project), "main"]);
    assert!(!ok, "hostile push accepted: {build}");
    assert_eq!(
        generation(&g.store_dir(), project),
        before,
        "refused push changed the store"
    );
    err
}

fn blob(content: &str) -> String {
    format!("b=$(printf '%s' '{content}' | git hash-object -w --stdin)")
}

fn assert_refused_naming(path: &str, build: &str) {
    let (g, token) = started();
    let err = refused(&g, &token, "hostile", build);
    assert!(
        err.contains(path) && err.contains("push refused"),
        "expected {path:?} named in: {err}"
    );
}

#[test]
fn refuses_dotgit_directory() {
    assert_refused_naming(".git", &format!("{}; t=$(printf '100644 blob '$b'\\tconfig\\n' | git mktree); printf '040000 tree '$t'\\t.git\\n' | git mktree --missing > tree", blob("x")));
}

#[test]
fn refuses_dotgit_upper_case() {
    assert_refused_naming(".GIT", &format!("{}; t=$(printf '100644 blob '$b'\\tconfig\\n' | git mktree); printf '040000 tree '$t'\\t.GIT\\n' | git mktree > tree", blob("x")));
}

#[test]
fn refuses_dotgit_with_trailing_dot() {
    assert_refused_naming(".git.", &format!("{}; t=$(printf '100644 blob '$b'\\tconfig\\n' | git mktree); printf '040000 tree '$t'\\t.git.\\n' | git mktree > tree", blob("x")));
}

#[test]
fn refuses_dotgit_with_trailing_space() {
    assert_refused_naming(".Git ", &format!("{}; t=$(printf '100644 blob '$b'\\tconfig\\n' | git mktree); printf '040000 tree '$t'\\t.Git \\n' | git mktree > tree", blob("x")));
}

#[test]
fn refuses_ntfs_short_name_of_dotgit() {
    assert_refused_naming("git~1", &format!("{}; t=$(printf '100644 blob '$b'\\tconfig\\n' | git mktree); printf '040000 tree '$t'\\tgit~1\\n' | git mktree > tree", blob("x")));
}

#[test]
fn refuses_nested_dotgit() {
    assert_refused_naming("src/.git", &format!("{}; t=$(printf '100644 blob '$b'\\tconfig\\n' | git mktree); s=$(printf '040000 tree '$t'\\t.git\\n' | git mktree --missing); printf '040000 tree '$s'\\tsrc\\n' | git mktree > tree", blob("x")));
}

#[test]
fn refuses_dotdot_component() {
    assert_refused_naming("..", &format!("{}; t=$(printf '100644 blob '$b'\\tx\\n' | git mktree); printf '040000 tree '$t'\\t..\\n' | git mktree --missing > tree", blob("x")));
}

#[test]
fn refuses_absolute_symlink() {
    assert_refused_naming("link", "b=$(printf /etc/shadow | git hash-object -w --stdin); printf '120000 blob '$b'\\tlink\\n' | git mktree > tree");
}

#[test]
fn refuses_symlink_escaping_the_tree() {
    assert_refused_naming("src/up", "b=$(printf ../../outside | git hash-object -w --stdin); t=$(printf '120000 blob '$b'\\tup\\n' | git mktree); printf '040000 tree '$t'\\tsrc\\n' | git mktree > tree");
}

#[test]
fn refuses_symlink_into_dotgit() {
    assert_refused_naming("cfg", "b=$(printf .git/config | git hash-object -w --stdin); printf '120000 blob '$b'\\tcfg\\n' | git mktree > tree");
}

#[test]
fn refuses_gitlink_submodule() {
    assert_refused_naming("sub", "printf '160000 commit 1111111111111111111111111111111111111111\\tsub\\n' | git mktree --missing > tree");
}

#[test]
fn refuses_malformed_tree_object() {
    // A tree whose entry has a zero-padded mode and a missing NUL: git's fsck rejects it.
    let (g, token) = started();
    let err = refused(
        &g,
        &token,
        "malformed",
        "printf 'garbage tree bytes' | git hash-object -t tree --literally -w --stdin > tree",
    );
    assert!(!err.is_empty());
}

#[test]
fn refuses_file_over_the_size_limit() {
    let g = Gitstore::start(Options {
        args: vec!["--max-file-bytes".into(), "1024".into()],
        ..Default::default()
    });
    let token = g.client("gen");
    let err = refused(&g, &token, "big", "head -c 4096 /dev/zero | tr '\\0' a > big.txt; b=$(git hash-object -w big.txt); printf '100644 blob '$b'\\tbig.txt\\n' | git mktree > tree");
    assert!(
        err.contains("big.txt") && err.contains("1024-byte limit"),
        "{err}"
    );
}

#[test]
fn refuses_too_many_files() {
    let g = Gitstore::start(Options {
        args: vec!["--max-tree-files".into(), "5".into()],
        ..Default::default()
    });
    let token = g.client("gen");
    let err = refused(&g, &token, "many", "for i in 1 2 3 4 5 6 7; do b=$(echo $i | git hash-object -w --stdin); printf '100644 blob '$b'\\tf'$i'\\n'; done | git mktree > tree");
    assert!(err.contains("more than 5 files"), "{err}");
}

#[test]
fn refuses_trees_nested_too_deep() {
    let g = Gitstore::start(Options {
        args: vec!["--max-tree-depth".into(), "3".into()],
        ..Default::default()
    });
    let token = g.client("gen");
    let err = refused(&g, &token, "deep", "b=$(echo x | git hash-object -w --stdin); t=$(printf '100644 blob '$b'\\tf\\n' | git mktree); for d in a b c d; do t=$(printf '040000 tree '$t'\\t'$d'\\n' | git mktree); done; echo $t > tree");
    assert!(err.contains("deeper than 3"), "{err}");
}

#[test]
fn refuses_refs_outside_branches_and_tags() {
    let (g, token) = started();
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "x");
    let (ok, _, err) = git(&app, &["push", &g.url(&token, "refs"), "main:refs/notes/x"]);
    assert!(!ok && err.contains("refs/notes/x"), "{err}");
}

#[test]
fn accepts_ordinary_dot_names() {
    let (g, token) = started();
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "x");
    commit_file(&app, ".github/workflows/ci.yml", "on: push\n");
    commit_file(&app, ".gitignore", "dist\n");
    let (ok, _, err) = git(&app, &["push", &g.url(&token, "dots"), "main"]);
    assert!(ok, "{err}");
}

#[test]
fn isomorphic_git_pushes_and_clones() {
    require("node", "apt-get install -y nodejs npm");
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    assert!(
        js.join("node_modules/isomorphic-git").exists(),
        "isomorphic-git missing: run `cd tests/js && npm ci`"
    );
    let (g, token) = started();
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/git/iso.git", g.port);
    let (ok, out, err) = run(std::process::Command::new("node")
        .arg(js.join("isomorphic-git-roundtrip.mjs"))
        .args([&url, &token, work.path().join("w").to_str().unwrap()]));
    assert!(ok, "isomorphic-git round trip failed: {err}");
    assert!(out.contains("\"pushed\""), "{out}");
}

#[test]
fn cors_preflight_allows_only_configured_origins() {
    let g = Gitstore::start(Options {
        args: vec!["--cors-origin".into(), "https://gen.example".into()],
        ..Default::default()
    });
    let (_, out, _) = run(std::process::Command::new("curl").args([
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://gen.example",
        &format!("http://127.0.0.1:{}/git/p.git/info/refs", g.port),
    ]));
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://gen.example"),
        "{out}"
    );
    let (_, out, _) = run(std::process::Command::new("curl").args([
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://evil.example",
        &format!("http://127.0.0.1:{}/git/p.git/info/refs", g.port),
    ]));
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
}
