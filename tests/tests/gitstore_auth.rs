//! Who may do what: tokens, project ownership between clients, revocation across nodes, and the
//! admin API. Every refusal is checked from the outside, the way a client would see it.

use std::time::{Duration, Instant};

use kiln_tests::*;

const ADMIN_TOKEN: &str = "kiln-admin-token-for-tests-0123456789";

fn admin_node() -> Gitstore {
    Gitstore::start_with(Options {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Options::default()
    })
}

/// A node, a client token, and `project` pushed by that client once.
fn owned_project(project: &str) -> (Gitstore, String, tempfile::TempDir, Repo) {
    let g = Gitstore::start();
    let token = g.create_client("owner");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Owned");
    let out = app.push(&g.git_url(&token, project), &["main"]);
    assert!(out.ok, "setup push refused:\n{}", out.stderr);
    (g, token, work, app)
}

#[test]
fn rejects_push_with_a_wrong_token() {
    let (g, token, _work, app) = owned_project("wrong");
    let before = store_snapshot(&g.store_dir(), "wrong");
    app.commit_file("src/x.js", "export const X = 1;\n");
    // A well-formed token of a client that does not exist, and the real token with its secret
    // altered: both refused, and git says authentication failed.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('a') { 'b' } else { 'a' });
    for bad in [
        "kiln_aaaaaaaaaaaa_notarealsecret",
        "nonsense",
        forged.as_str(),
    ] {
        let out = app.push(&g.git_url(bad, "wrong"), &["main"]);
        assert!(!out.ok, "push with token {bad:?} accepted");
        assert!(
            out.stderr.contains("Authentication failed"),
            "token {bad:?}:\n{}",
            out.stderr
        );
    }
    assert_eq!(store_snapshot(&g.store_dir(), "wrong"), before);
}

#[test]
fn rejects_anonymous_requests_with_401_and_www_authenticate() {
    let (g, _token, work, _app) = owned_project("anon");
    for path in [
        "/git/anon.git/info/refs?service=git-upload-pack",
        "/git/anon.git/info/refs?service=git-receive-pack",
        "/api/projects/anon",
    ] {
        let r = g.http("GET", path, None, None);
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"kiln\""),
            "{path}"
        );
        assert!(r.body.contains("token"), "{path}: {}", r.body);
    }
    let clone = Repo::try_clone(&g.anonymous_git_url("anon"), &work.path().join("c"), &[]);
    let err = clone.expect_err("anonymous clone succeeded");
    assert!(
        err.stderr.contains("could not read Username") || err.stderr.contains("Authentication"),
        "{}",
        err.stderr
    );
}

#[test]
fn refuses_clone_of_another_clients_project() {
    let (g, _a, work, _app) = owned_project("private");
    let b = g.create_client("intruder");
    let err = Repo::try_clone(&g.git_url(&b, "private"), &work.path().join("stolen"), &[])
        .expect_err("another client cloned the project");
    assert!(
        err.stderr.contains("not found") || err.stderr.contains("404"),
        "{}",
        err.stderr
    );
    let ls = git(work.path(), &["ls-remote", &g.git_url(&b, "private")]);
    assert!(
        !ls.ok && ls.stdout.is_empty(),
        "ls-remote leaked refs: {}",
        ls.stdout
    );
    let info = g.http("GET", "/api/projects/private", Some(&b), None);
    assert_eq!(info.status, 404, "{}", info.body);
}

#[test]
fn refuses_push_to_another_clients_project() {
    let (g, _a, _work, app) = owned_project("private");
    let b = g.create_client("intruder");
    let before = store_snapshot(&g.store_dir(), "private");
    app.commit_file("src/evil.js", "export const EVIL = 1;\n");
    for refspec in ["main", "main:refs/heads/evil"] {
        let out = app.push(&g.git_url(&b, "private"), &[refspec]);
        assert!(!out.ok, "another client pushed {refspec}");
        assert!(
            out.stderr.contains("another client"),
            "the refusal does not say why:\n{}",
            out.stderr
        );
    }
    assert_eq!(store_snapshot(&g.store_dir(), "private"), before);
}

#[test]
fn refuses_project_creation_of_an_id_another_client_owns() {
    let (g, _a, _work, _app) = owned_project("taken");
    let b = g.create_client("intruder");
    let r = g.http("POST", "/api/projects", Some(&b), Some(r#"{"id":"taken"}"#));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("another client"));
}

#[test]
fn refuses_push_with_the_admin_token() {
    let g = admin_node();
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Admin");
    let out = app.push(&g.git_url(ADMIN_TOKEN, "adminpush"), &["main"]);
    assert!(!out.ok, "the admin token pushed a project");
    assert!(out.stderr.contains("client token"), "{}", out.stderr);
    assert_eq!(generation(&g.store_dir(), "adminpush"), 0);
}

#[test]
fn refuses_client_token_on_the_admin_api() {
    let g = admin_node();
    let client = g.create_client("generator");
    let create = g.http(
        "POST",
        "/api/clients",
        Some(&client),
        Some(r#"{"name":"x"}"#),
    );
    assert_eq!(create.status, 403, "{}", create.body);
    let list = g.http("GET", "/api/clients", Some(&client), None);
    assert_eq!(list.status, 403, "{}", list.body);
    let id = client.split('_').nth(1).unwrap();
    let revoke = g.http("DELETE", &format!("/api/clients/{id}"), Some(&client), None);
    assert_eq!(revoke.status, 403, "{}", revoke.body);
    // The client still works: it was not revoked by its own attempt.
    let p = g.http(
        "POST",
        "/api/projects",
        Some(&client),
        Some(r#"{"id":"still"}"#),
    );
    assert_eq!(p.status, 201, "{}", p.body);
}

#[test]
fn rejects_admin_api_requests_without_a_token() {
    let g = admin_node();
    for (method, path, body) in [
        ("POST", "/api/clients", Some(r#"{"name":"x"}"#)),
        ("GET", "/api/clients", None),
        ("DELETE", "/api/clients/aaaaaaaaaaaa", None),
    ] {
        let r = g.http(method, path, None, body);
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        assert!(r.header("www-authenticate").is_some(), "{method} {path}");
    }
    let wrong = g.http("GET", "/api/clients", Some("not-the-admin-token"), None);
    assert_eq!(wrong.status, 401, "{}", wrong.body);
}

#[test]
fn rejects_revoked_client_token_on_every_node_within_the_cache_ttl() {
    let a = Gitstore::start_with(Options {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Options::default()
    });
    let b = Gitstore::start_with(Options {
        store: Some(a.store_url().to_owned()),
        ..Options::default()
    });
    let created = a.http(
        "POST",
        "/api/clients",
        Some(ADMIN_TOKEN),
        Some(r#"{"name":"short-lived"}"#),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let v = created.json();
    let (id, token) = (
        v["id"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    );
    assert_eq!(v["name"], "short-lived");

    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Revoked");
    // Through B, so B has the token in its cache when the revocation lands on A.
    let out = app.push(&b.git_url(&token, "revoked"), &["main"]);
    assert!(out.ok, "push before revocation:\n{}", out.stderr);
    assert!(git(work.path(), &["ls-remote", &b.git_url(&token, "revoked")]).ok);

    let revoke = a.http(
        "DELETE",
        &format!("/api/clients/{id}"),
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(revoke.status, 200, "{}", revoke.body);
    let revoked_at = Instant::now();
    let listed = a
        .http("GET", "/api/clients", Some(ADMIN_TOKEN), None)
        .json();
    let entry = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .cloned()
        .expect("revoked client still listed");
    assert_eq!(entry["revoked"], true, "{listed}");

    // The node that revoked refuses at once.
    let ls = git(work.path(), &["ls-remote", &a.git_url(&token, "revoked")]);
    assert!(!ls.ok, "node A still accepts a revoked token");
    assert!(ls.stderr.contains("revoked"), "{}", ls.stderr);

    // The other node refuses within its token cache lifetime (documented as a few seconds).
    loop {
        let ls = git(work.path(), &["ls-remote", &b.git_url(&token, "revoked")]);
        if !ls.ok {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(6),
            "node B still accepts the revoked token after {:?}",
            revoked_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    app.commit_file("src/late.js", "export const LATE = 1;\n");
    let late = app.push(&b.git_url(&token, "revoked"), &["main"]);
    assert!(!late.ok, "a revoked client pushed");
    assert_eq!(generation(&a.store_dir(), "revoked"), 1);
}
