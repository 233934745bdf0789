//! Projects as a generator's backend sees them: metadata kept in the manifest (so it survives
//! losing the node's catalog), listing from the catalog with paging and label filters, deletion
//! with a grace period, restore and purge, and the `projects` and `stored_bytes` quotas. All
//! through HTTP and stock git against a real gitstore.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_tests::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "kiln-admin-token-for-tests-0123456789";

fn admin_options() -> Options {
    Options {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Options::default()
    }
}

fn client_id(token: &str) -> &str {
    token.split('_').nth(1).expect("kiln_<id>_<secret>")
}

fn get(g: &Gitstore, token: &str, path: &str) -> Response {
    g.http("GET", path, Some(token), None)
}

fn patch(g: &Gitstore, token: &str, project: &str, body: &Value) -> Response {
    g.http(
        "PATCH",
        &format!("/api/projects/{project}"),
        Some(token),
        Some(&body.to_string()),
    )
}

fn create(g: &Gitstore, token: &str, project: &str) -> Response {
    g.http(
        "POST",
        "/api/projects",
        Some(token),
        Some(&json!({ "id": project }).to_string()),
    )
}

fn set_quotas(g: &Gitstore, token: &str, quotas: Value) {
    let r = g.http(
        "PATCH",
        &format!("/api/clients/{}", client_id(token)),
        Some(ADMIN_TOKEN),
        Some(&quotas.to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Every project id a listing shows, following `next_cursor`, with the number of pages.
fn list_all(g: &Gitstore, token: &str, query: &str) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/projects?{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = get(g, token, &path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let v = r.json();
        pages += 1;
        for p in v["projects"].as_array().expect("projects is a list") {
            ids.push(p["id"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (ids, pages),
        }
        assert!(pages < 100, "paging does not end");
    }
}

fn listed(g: &Gitstore, token: &str, query: &str) -> Vec<String> {
    list_all(g, token, query).0
}

/// Polls `cond` every 100 ms for up to `secs` seconds.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metadata_is_kept_in_the_store_and_survives_losing_the_catalog() {
    let scratch = tempfile::tempdir().unwrap();
    let catalog = scratch.path().join("catalog.sqlite3");
    let catalog_arg = catalog.to_string_lossy().into_owned();
    let mut g = Gitstore::start_with(Options::args(&["--catalog", &catalog_arg]));
    let token = g.create_client("generator");
    let app = vite_app(&scratch.path().join("app"), "Meta");
    assert!(app.push(&g.git_url(&token, "meta"), &["main"]).ok);
    assert!(catalog.exists(), "the catalog is at --catalog");

    let r = patch(
        &g,
        &token,
        "meta",
        &json!({
            "name": "Coffee shop landing page",
            "labels": {"env": "prod", "team/web": "growth"},
            "metadata": {"prompt": "a landing page for a coffee shop", "turns": [1, 2, 3]},
        }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["generation"], 2, "a PATCH publishes a generation");
    // A field left out stays as it is; null clears.
    let r = patch(&g, &token, "meta", &json!({"metadata": {"v": 2}}));
    assert_eq!(r.status, 200, "{}", r.body);
    let info = get(&g, &token, "/api/projects/meta").json();
    assert_eq!(info["name"], "Coffee shop landing page", "{info}");
    assert_eq!(info["labels"], json!({"env": "prod", "team/web": "growth"}));
    assert_eq!(info["metadata"], json!({"v": 2}));
    assert_eq!(info["commit"], app.head());
    assert_eq!(info["head"], "refs/heads/main");
    assert_eq!(info["generation"], 3);
    assert!(info["created_at"].as_u64().unwrap() > 0, "{info}");
    assert!(info["pushed_at"].as_u64().unwrap() > 0, "{info}");
    assert!(info["store_bytes"].as_u64().unwrap() > 10_000, "{info}");
    assert_eq!(info["deleted_at"], Value::Null);
    assert_eq!(info["build"], Value::Null, "no agent has built it");
    // The manifest in the store carries it: that is what makes it durable.
    let m = latest_manifest(&g.store_dir(), "meta").unwrap();
    assert_eq!(m["meta"]["name"], "Coffee shop landing page");

    // A new node on the same store with no catalog rebuilds it from the store alone.
    g.kill();
    std::fs::remove_file(&catalog).unwrap();
    let g2 = Gitstore::start_with(Options {
        store: Some(g.store_url().to_owned()),
        args: vec!["--catalog".into(), catalog_arg.clone()],
        ..Options::default()
    });
    let info2 = get(&g2, &token, "/api/projects/meta").json();
    assert_eq!(info2["name"], info["name"]);
    assert_eq!(info2["labels"], info["labels"]);
    assert_eq!(info2["metadata"], info["metadata"]);
    let list = get(&g2, &token, "/api/projects").json();
    let row = &list["projects"][0];
    assert_eq!(row["id"], "meta", "{list}");
    assert_eq!(row["name"], "Coffee shop landing page", "{list}");
    assert_eq!(row["labels"]["env"], "prod", "{list}");
    assert_eq!(row["commit"], app.head(), "{list}");
    assert_eq!(row["store_bytes"], info["store_bytes"], "{list}");
    assert_eq!(list["next_cursor"], Value::Null);
    assert!(catalog.exists(), "the catalog was written again");

    // Clearing with null.
    let r = patch(&g2, &token, "meta", &json!({"name": null, "labels": null}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["name"], Value::Null);
    assert_eq!(v["labels"], json!({}));
    assert_eq!(v["metadata"], json!({"v": 2}));
}

#[test]
fn rejects_metadata_it_cannot_keep_and_says_what_to_fix() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    assert_eq!(create(&g, &token, "strict").status, 201);
    let before = store_snapshot(&g.store_dir(), "strict");
    let too_many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (body, status, needle) in [
        (
            json!({"metadata": {"blob": "x".repeat(17 << 10)}}),
            413,
            "16384-byte limit",
        ),
        (json!({"labels": {"Bad Key": "v"}}), 400, "label key"),
        (json!({"labels": {"-x": "v"}}), 400, "label key"),
        (
            json!({"labels": {"k": "v".repeat(201)}}),
            400,
            "200 printable",
        ),
        (json!({"labels": {"k": 7}}), 400, "must be a string"),
        (json!({"labels": too_many}), 400, "at most 32"),
        (json!({"name": "n".repeat(201)}), 400, "name must be"),
        (json!({"name": "tab\there"}), 400, "printable"),
        (json!({"owner": "me"}), 400, "unknown field"),
    ] {
        let r = patch(&g, &token, "strict", &body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let v = r.json();
        assert!(
            v["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    assert_eq!(
        store_snapshot(&g.store_dir(), "strict"),
        before,
        "a refused PATCH publishes nothing"
    );
}

#[test]
fn lists_every_project_once_across_pages_and_filters_by_label() {
    let g = Gitstore::start();
    let a = g.create_client("a");
    let b = g.create_client("b");
    let mut expected = BTreeSet::new();
    for i in 0..250 {
        let id = format!("p{i:03}");
        let r = create(&g, &a, &id);
        assert_eq!(r.status, 201, "{id}: {}", r.body);
        expected.insert(id);
    }
    for i in (0..250).step_by(10) {
        let mut labels = json!({"tier": "paid"});
        if i % 20 == 0 {
            labels["team/x"] = json!("1");
        }
        let r = patch(&g, &a, &format!("p{i:03}"), &json!({"labels": labels}));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for id in ["theirs-1", "theirs-2"] {
        assert_eq!(create(&g, &b, id).status, 201);
    }

    let (ids, pages) = list_all(&g, &a, "limit=100");
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 250, "every project exactly once");
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");
    let first = get(&g, &a, "/api/projects").json();
    assert_eq!(
        first["projects"].as_array().unwrap().len(),
        100,
        "default limit"
    );
    assert_eq!(first["next_cursor"], "p099");

    let paid = listed(&g, &a, "label=tier=paid");
    assert_eq!(paid.len(), 25, "{paid:?}");
    assert_eq!(listed(&g, &a, "label=tier").len(), 25);
    assert!(listed(&g, &a, "label=tier=free").is_empty());
    let both = listed(&g, &a, "label=tier=paid&label=team/x");
    let want: Vec<String> = (0..250).step_by(20).map(|i| format!("p{i:03}")).collect();
    assert_eq!(both, want);
    let r = get(&g, &a, "/api/projects?label=Not%20A%20Key");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = get(&g, &a, "/api/projects?limit=1001");
    assert_eq!(r.status, 400, "{}", r.body);

    // Another client's projects stay invisible, to the listing and to every project route.
    assert_eq!(listed(&g, &b, "limit=1000"), vec!["theirs-1", "theirs-2"]);
    assert_eq!(get(&g, &b, "/api/projects/p000").status, 404);
    assert_eq!(patch(&g, &b, "p000", &json!({"name": "mine"})).status, 404);
    assert_eq!(
        g.http("DELETE", "/api/projects/p000", Some(&b), None)
            .status,
        404
    );
    assert_eq!(
        get(&g, &a, "/api/projects/p000").json()["labels"]["tier"],
        "paid"
    );
}

#[test]
fn a_deleted_project_refuses_pushes_until_it_is_restored() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Deleted");
    let url = g.git_url(&token, "gone");
    assert!(app.push(&url, &["main"]).ok);

    let r = g.http("DELETE", "/api/projects/gone", Some(&token), None);
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    let deleted_at = v["deleted_at"].as_u64().unwrap();
    assert_eq!(v["purge_at"].as_u64().unwrap(), deleted_at + 7 * 24 * 3600);
    let again = g.http("DELETE", "/api/projects/gone", Some(&token), None);
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(
        again.json()["deleted_at"],
        deleted_at,
        "deleting twice is the first deletion"
    );

    app.commit_file("src/late.js", "export const LATE = 1;\n");
    let out = app.push(&url, &["main"]);
    assert!(!out.ok, "a push to a deleted project was accepted");
    assert!(
        out.stderr.contains("was deleted") && out.stderr.contains("/restore"),
        "the refusal does not say how to restore:\n{}",
        out.stderr
    );
    let commit = g.http(
        "POST",
        "/api/projects/gone/commits",
        Some(&token),
        Some(&json!({"message": "m", "parent": null, "files": {"a.txt": "a"}}).to_string()),
    );
    assert_eq!(commit.status, 410, "{}", commit.body);
    assert_eq!(commit.json()["error"], "deleted");
    let r = patch(&g, &token, "gone", &json!({"name": "x"}));
    assert_eq!(r.status, 410, "{}", r.body);

    let info = get(&g, &token, "/api/projects/gone").json();
    assert_eq!(info["deleted_at"], deleted_at, "{info}");
    assert!(info["purge_at"].as_u64().is_some(), "{info}");
    assert!(listed(&g, &token, "").is_empty(), "listed while deleted");
    assert_eq!(listed(&g, &token, "deleted=true"), vec!["gone"]);

    let r = g.http("POST", "/api/projects/gone/restore", Some(&token), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["restored"], true);
    let out = app.push(&url, &["main"]);
    assert!(out.ok, "push after restore: {}", out.stderr);
    assert_eq!(listed(&g, &token, ""), vec!["gone"]);
    assert!(listed(&g, &token, "deleted=true").is_empty());
    let info = get(&g, &token, "/api/projects/gone").json();
    assert_eq!(info["deleted_at"], Value::Null);
    assert_eq!(info["commit"], app.head());
}

#[test]
fn the_reaper_purges_a_deleted_project_after_its_grace_and_frees_the_id() {
    let g = Gitstore::start_with(Options {
        env: vec![("KILN_DELETE_GRACE_SECS".into(), "1".into())],
        ..Options::default()
    });
    let a = g.create_client("a");
    let b = g.create_client("b");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Reaped");
    assert!(app.push(&g.git_url(&a, "reaped"), &["main"]).ok);
    let prefix = g.store_dir().join("projects/reaped");
    assert!(prefix.join("owner.json").exists());

    let r = g.http("DELETE", "/api/projects/reaped", Some(&a), None);
    assert_eq!(r.status, 202, "{}", r.body);
    wait_for(30, "the purge of projects/reaped", || !prefix.exists());
    wait_for(10, "the purge's log line", || {
        g.log().contains("project purged")
    });
    assert_eq!(get(&g, &a, "/api/projects/reaped").status, 404);
    let r = g.http("POST", "/api/projects/reaped/restore", Some(&a), None);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(listed(&g, &a, "deleted=true").is_empty());

    // The id is free: another client takes it and pushes afresh.
    let r = create(&g, &b, "reaped");
    assert_eq!(r.status, 201, "{}", r.body);
    let other = vite_app(&work.path().join("other"), "Someone else");
    let out = other.push(&g.git_url(&b, "reaped"), &["main"]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        get(&g, &b, "/api/projects/reaped").json()["commit"],
        other.head()
    );
}

#[test]
fn the_projects_quota_answers_429_with_its_name() {
    let g = Gitstore::start_with(admin_options());
    let token = g.create_client("generator");
    set_quotas(&g, &token, json!({"projects": 2}));
    let clients = get(&g, ADMIN_TOKEN, "/api/clients").json();
    let me = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == client_id(&token))
        .unwrap()
        .clone();
    assert_eq!(me["quotas"]["projects"], 2, "{clients}");
    assert_eq!(clients["default_quotas"]["projects"], 10_000, "{clients}");

    assert_eq!(create(&g, &token, "one").status, 201);
    assert_eq!(create(&g, &token, "two").status, 201);
    assert_eq!(
        create(&g, &token, "two").status,
        200,
        "re-creating costs nothing"
    );
    let r = create(&g, &token, "three");
    assert_eq!(r.status, 429, "{}", r.body);
    let v = r.json();
    assert_eq!(v["error"], "quota", "{v}");
    assert_eq!(v["quota"], "projects", "{v}");
    assert_eq!(v["limit"], 2, "{v}");
    assert_eq!(v["used"], 2, "{v}");
    assert!(v["message"].as_str().unwrap().contains("projects quota"));

    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Quota");
    let out = app.push(&g.git_url(&token, "three"), &["main"]);
    assert!(!out.ok, "a push created a project past the quota");
    assert!(out.stderr.contains("projects quota"), "{}", out.stderr);
    assert!(!g.store_dir().join("projects/three").exists());

    // A deleted project no longer counts (and restoring it would need room again).
    let r = g.http("DELETE", "/api/projects/one", Some(&token), None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(app.push(&g.git_url(&token, "three"), &["main"]).ok);
    let r = g.http("POST", "/api/projects/one/restore", Some(&token), None);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["quota"], "projects");
}

/// Appends `kib` KiB of incompressible bytes to the repository as a new commit.
fn commit_noise(app: &Repo, rel: &str, kib: usize, seed: u64) -> String {
    let mut x = seed | 1;
    let noise: Vec<u8> = (0..kib << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    app.commit_file(rel, noise)
}

fn stored_bytes(g: &Gitstore, token: &str, project: &str) -> u64 {
    get(g, token, &format!("/api/projects/{project}")).json()["store_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_stored_bytes_quota_answers_413_for_pushes_and_commits() {
    let g = Gitstore::start_with(admin_options());
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Bytes");
    let url = g.git_url(&token, "bytes");

    // A pack larger than the whole quota: the hook refuses it before anything is stored.
    set_quotas(&g, &token, json!({"stored_bytes": 1000}));
    let out = app.push(&url, &["main"]);
    assert!(!out.ok, "a push past the stored_bytes quota was accepted");
    assert!(
        out.stderr.contains("stored_bytes quota") && out.stderr.contains("1000"),
        "{}",
        out.stderr
    );
    assert_eq!(generation(&g.store_dir(), "bytes"), 0);

    set_quotas(&g, &token, json!({}));
    assert!(app.push(&url, &["main"]).ok);
    let used = stored_bytes(&g, &token, "bytes");
    let limit = used + 4096;
    set_quotas(&g, &token, json!({"stored_bytes": limit}));

    // The commits API: 16 KiB of noise does not fit in the 4 KiB left.
    let noise = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..16 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{:02x}", x as u8)
            })
            .collect::<String>()
    };
    let r = g.http(
        "POST",
        "/api/projects/bytes/commits",
        Some(&token),
        Some(
            &json!({"message": "noise", "parent": app.head(), "files": {"noise.txt": noise}})
                .to_string(),
        ),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    let v = r.json();
    assert_eq!(v["error"], "quota", "{v}");
    assert_eq!(v["quota"], "stored_bytes", "{v}");
    assert_eq!(v["limit"], limit, "{v}");
    assert_eq!(v["used"], used, "{v}");
    // A small one fits.
    let r = g.http(
        "POST",
        "/api/projects/bytes/commits",
        Some(&token),
        Some(
            &json!({"message": "small", "parent": app.head(), "files": {"small.txt": "hi\n"}})
                .to_string(),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    app.git_ok(&["pull", "-q", &url, "main"]);

    // git: a push too large for what is left, refused by the hook with the quota named...
    commit_noise(&app, "public/noise.bin", 16, 7);
    let out = app.push(&url, &["main"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("stored_bytes quota"), "{}", out.stderr);
    // ...and once the client is at its quota, refused before the pack is sent (HTTP 413).
    let now_used = stored_bytes(&g, &token, "bytes");
    set_quotas(&g, &token, json!({"stored_bytes": now_used}));
    let out = app.push(&url, &["main"]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("stored_bytes quota") && out.stderr.contains("413"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_purge_keeps_the_packs_an_import_lists_until_the_importer_is_purged_too() {
    let g = Gitstore::start_with(Options {
        env: vec![("KILN_DELETE_GRACE_SECS".into(), "1".into())],
        ..Options::default()
    });
    let (a, b) = (g.create_client("a"), g.create_client("b"));
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Source");
    assert!(app.push(&g.git_url(&a, "source"), &["main"]).ok);
    let share = g.http(
        "POST",
        "/api/projects/source/shares",
        Some(&a),
        Some(r#"{"mode":"fork"}"#),
    );
    assert_eq!(share.status, 201, "{}", share.body);
    let token = share.json()["token"].as_str().unwrap().to_owned();
    let r = g.http(
        "POST",
        "/api/projects/fork/import",
        Some(&b),
        Some(&json!({ "share": token }).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        listed(&g, &b, ""),
        vec!["fork"],
        "an import is listed at once"
    );

    let source = g.store_dir().join("projects/source");
    assert_eq!(
        g.http("DELETE", "/api/projects/source", Some(&a), None)
            .status,
        202
    );
    wait_for(30, "the purge of source", || {
        !source.join("owner.json").exists()
    });
    let left: Vec<String> = store_snapshot(&g.store_dir(), "source")
        .into_keys()
        .collect();
    assert!(
        left.iter()
            .all(|k| k.starts_with("packs/") || k.starts_with("importers/")),
        "only what the import reads stays: {left:?}"
    );
    assert!(left.iter().any(|k| k.ends_with(".pack")), "{left:?}");
    let clone = Repo::clone(&g.git_url(&b, "fork"), &work.path().join("fork"));
    assert_eq!(
        clone.head(),
        app.head(),
        "the fork still reads the kept packs"
    );

    assert_eq!(
        g.http("DELETE", "/api/projects/fork", Some(&b), None)
            .status,
        202
    );
    wait_for(
        30,
        "the purge of the fork and of what it kept alive",
        || !source.exists() && !g.store_dir().join("projects/fork").exists(),
    );
}
