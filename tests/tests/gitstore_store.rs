//! The blob-store mirror: Azurite as a real Azure backend shared by two nodes, `kiln-gitstore
//! sync` (incremental, and refusing a corrupted pack), and a node killed between uploading a
//! push's pack and publishing its manifest.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_tests::*;

#[test]
fn azurite_store_serves_push_clone_and_sync() {
    let az = Azurite::start();
    az.create_container("kiln-one");
    let g = Gitstore::start_with(az.gitstore_options("kiln-one"));
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Azure");
    let url = g.git_url(&token, "azp");
    let out = app.push(&url, &["main"]);
    assert!(out.ok, "push to an Azurite-backed node:\n{}", out.stderr);
    assert!(out.stderr.contains("stored durably"), "{}", out.stderr);

    let clone = Repo::clone(&url, &work.path().join("clone"));
    assert_eq!(clone.head(), app.head());

    let second = app.commit_file("src/azure.js", "export const CLOUD = 'azure';\n");
    assert!(app.push(&url, &["main"]).ok);
    clone.git_ok(&["pull", "-q", "--ff-only"]);
    assert_eq!(clone.head(), second);

    let mirror = work.path().join("mirror.git");
    let s = kiln_sync("az://kiln-one", &az.env(), "azp", &mirror);
    assert!(s.ok, "sync from Azurite failed:\n{}", s.stderr);
    assert_eq!(s.report["generation"], 2, "{}", s.stdout);
    assert_eq!(s.report["packs_fetched"], 2, "{}", s.stdout);
    let mirror = Repo { path: mirror };
    assert_eq!(mirror.git_ok(&["rev-parse", "refs/heads/main"]), second);
    mirror.git_ok(&["fsck", "--no-progress", "--connectivity-only"]);
}

#[test]
fn azurite_store_shared_by_two_nodes_push_through_a_clone_through_b() {
    let az = Azurite::start();
    az.create_container("kiln-shared");
    let a = Gitstore::start_with(az.gitstore_options("kiln-shared"));
    let b = Gitstore::start_with(az.gitstore_options("kiln-shared"));
    let token = a.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Shared");
    assert!(app.push(&a.git_url(&token, "shared"), &["main"]).ok);

    let clone = Repo::clone(&b.git_url(&token, "shared"), &work.path().join("via-b"));
    assert_eq!(clone.head(), app.head(), "node B does not see A's push");

    // And back: a push through B is visible through A.
    let from_b = clone.commit_file("src/from-b.js", "export const B = 1;\n");
    let out = clone.push("origin", &["main"]);
    assert!(out.ok, "push through B:\n{}", out.stderr);
    app.git_ok(&[
        "pull",
        "-q",
        "--ff-only",
        &a.git_url(&token, "shared"),
        "main",
    ]);
    assert_eq!(app.head(), from_b);
}

/// The names of the packs the newest manifest lists.
fn manifest_packs(store: &Path, project: &str) -> Vec<serde_json::Value> {
    latest_manifest(store, project).expect("manifest")["packs"]
        .as_array()
        .expect("packs array")
        .clone()
}

#[test]
fn sync_fetches_only_new_packs_into_an_existing_repository() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Sync");
    let url = g.git_url(&token, "sy");
    assert!(app.push(&url, &["main"]).ok);

    let mirror = work.path().join("mirror.git");
    let first = kiln_sync(g.store_url(), &[], "sy", &mirror);
    assert!(first.ok, "{}", first.stderr);
    assert_eq!(first.report["generation"], 1, "{}", first.stdout);
    assert_eq!(first.report["packs_fetched"], 1);

    // Nothing new: nothing fetched.
    let idle = kiln_sync(g.store_url(), &[], "sy", &mirror);
    assert!(idle.ok, "{}", idle.stderr);
    assert_eq!(idle.report["bytes_fetched"], 0, "{}", idle.stdout);
    assert_eq!(idle.report["packs_fetched"], 0);

    let second_commit = app.commit_file("src/App.css", "main { max-width: 48rem; }\n");
    assert!(app.push(&url, &["main"]).ok);
    let second = kiln_sync(g.store_url(), &[], "sy", &mirror);
    assert!(second.ok, "{}", second.stderr);
    assert_eq!(second.report["generation"], 2);
    assert_eq!(second.report["packs_fetched"], 1, "{}", second.stdout);
    assert_eq!(second.report["refs_changed"], 1);

    let (b1, b2) = (
        first.report["bytes_fetched"].as_u64().unwrap(),
        second.report["bytes_fetched"].as_u64().unwrap(),
    );
    assert!(
        b2 * 5 < b1,
        "the incremental sync fetched {b2} bytes, not much less than the first sync's {b1}"
    );
    // Exactly the new pack and its index.
    let newest = manifest_packs(&g.store_dir(), "sy").pop().unwrap();
    assert_eq!(
        b2,
        newest["pack_size"].as_u64().unwrap() + newest["idx_size"].as_u64().unwrap()
    );
    let mirror = Repo { path: mirror };
    assert_eq!(mirror.git_ok(&["rev-parse", "main"]), second_commit);
    mirror.git_ok(&["fsck", "--no-progress", "--connectivity-only"]);
}

#[test]
fn sync_detects_corrupted_pack_and_leaves_target_without_it() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Corrupt");
    let url = g.git_url(&token, "corrupt");
    assert!(app.push(&url, &["main"]).ok);
    app.commit_file("src/two.js", "export const TWO = 2;\n");
    assert!(app.push(&url, &["main"]).ok);

    // Flip one byte in the middle of the newest pack.
    let name = manifest_packs(&g.store_dir(), "corrupt").pop().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = g
        .store_dir()
        .join(format!("projects/corrupt/packs/{name}.pack"));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let fresh = work.path().join("fresh.git");
    let s = kiln_sync(g.store_url(), &[], "corrupt", &fresh);
    assert!(!s.ok, "sync accepted a corrupted pack:\n{}", s.stdout);
    assert!(
        s.stderr.contains(&name) && s.stderr.contains("corrupt"),
        "the error does not name the corrupt pack {name}:\n{}",
        s.stderr
    );
    let fresh = Repo { path: fresh };
    assert_eq!(
        fresh.git_ok(&["for-each-ref"]),
        "",
        "refs were written although a pack was corrupt"
    );
    let leftovers: Vec<String> = std::fs::read_dir(fresh.path.join("objects/pack"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(&name))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "the corrupt pack reached the repository: {leftovers:?}"
    );
}

#[test]
fn killed_between_pack_upload_and_manifest_write_leaves_project_consistent() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let store_url = store.to_string_lossy().into_owned();
    let token;
    let app = vite_app(&work.path().join("app"), "Crash");
    let good;
    {
        let setup = Gitstore::start_with(Options {
            store: Some(store_url.clone()),
            ..Options::default()
        });
        token = setup.create_client("generator");
        assert!(app.push(&setup.git_url(&token, "crash"), &["main"]).ok);
        good = app.head();
    }
    let manifest_before = latest_manifest(&store, "crash").unwrap();
    let listed: BTreeSet<String> = manifest_before["packs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();

    let marker = work.path().join("paused-before-manifest");
    let mut faulty = Gitstore::start_with(Options {
        store: Some(store_url.clone()),
        env: vec![(
            "KILN_FAULT_INJECT".into(),
            format!("pause-before-manifest:{}", marker.display()),
        )],
        ..Options::default()
    });
    let lost = app.commit_file("src/lost.js", "export const LOST = true;\n");
    let url = faulty.git_url(&token, "crash");
    let pusher_repo = app.clone();
    let pusher = std::thread::spawn(move || pusher_repo.push(&url, &["main"]));
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            !pusher.is_finished(),
            "the push ended before reaching the fault point:\n{}",
            pusher.join().unwrap().stderr
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the hook never reached the fault point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    faulty.kill();
    let killed = pusher.join().unwrap();
    assert!(
        !killed.ok,
        "git reported success for a push whose node was killed before the manifest write"
    );

    assert_eq!(
        latest_manifest(&store, "crash").unwrap(),
        manifest_before,
        "the manifest changed without a finished push"
    );
    let on_disk: BTreeSet<String> = std::fs::read_dir(store.join("projects/crash/packs"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".pack")
                .map(str::to_owned)
        })
        .collect();
    let orphans: Vec<&String> = on_disk.difference(&listed).collect();
    assert_eq!(
        orphans.len(),
        1,
        "expected exactly one orphan pack (uploaded, named by no manifest); on disk {on_disk:?}, listed {listed:?}"
    );

    let fresh = Gitstore::start_with(Options {
        store: Some(store_url),
        ..Options::default()
    });
    let url = fresh.git_url(&token, "crash");
    let clone = Repo::clone(&url, &work.path().join("clone"));
    assert_eq!(
        clone.head(),
        good,
        "the clone does not show the last durable commit"
    );

    let out = app.push(&url, &["main"]);
    assert!(out.ok, "push after the crash refused:\n{}", out.stderr);
    clone.git_ok(&["pull", "-q", "--ff-only"]);
    assert_eq!(clone.head(), lost);
    assert_eq!(generation(&store, "crash"), 2);
    let after = Repo::clone(&url, &work.path().join("after"));
    assert_eq!(after.head(), lost);
    after.git_ok(&["fsck", "--no-progress"]);
}
