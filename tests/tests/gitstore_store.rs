//! The blob-store mirror: Azurite, concurrent pushes through two nodes, corrupted packs, a crash
//! between pack upload and manifest write, and signed webhooks.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn sync_cli(
    store: &str,
    env: &[(String, String)],
    project: &str,
    dir: &std::path::Path,
) -> (bool, serde_json::Value, String) {
    let (ok, out, err) = run(Command::new(bin())
        .args(["sync", project])
        .arg(dir)
        .args(["--store", store])
        .envs(env.iter().cloned()));
    let json = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (ok, json, err)
}

#[test]
fn azurite_push_clone_sync_and_a_second_node_sees_the_push() {
    let az = Azurite::start();
    az.create_container("kiln");
    let opts = || Options {
        store: Some("az://kiln/prefix".into()),
        env: az.env(),
        ..Default::default()
    };
    let a = Gitstore::start(opts());
    let b = Gitstore::start(opts());
    let token = a.client("gen");
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "azure");
    let (ok, _, err) = git(&app, &["push", &a.url(&token, "azp"), "main"]);
    assert!(ok, "push to azurite-backed node: {err}");
    let head = git_ok(&app, &["rev-parse", "HEAD"]);
    let clone = work.path().join("clone");
    let (ok, _, err) = git(
        work.path(),
        &[
            "clone",
            "-q",
            &b.url(&token, "azp"),
            clone.to_str().unwrap(),
        ],
    );
    assert!(ok, "clone through the second node: {err}");
    assert_eq!(git_ok(&clone, &["rev-parse", "HEAD"]), head);
    let mirror = work.path().join("mirror.git");
    let (ok, report, err) = sync_cli("az://kiln/prefix", &az.env(), "azp", &mirror);
    assert!(ok, "sync from azurite: {err}");
    assert_eq!(report["packs_fetched"], 1);
    assert_eq!(git_ok(&mirror, &["rev-parse", "refs/heads/main"]), head);
}

#[test]
fn twenty_concurrent_pushes_through_two_nodes_lose_no_commit() {
    let a = Gitstore::start(Options::default());
    let b = Gitstore::start(Options {
        store: Some(a.store.clone()),
        ..Default::default()
    });
    let token = a.client("gen");
    let work = tempfile::tempdir().unwrap();
    let seed = work.path().join("seed");
    make_app(&seed, "seed");
    assert!(git(&seed, &["push", &a.url(&token, "race"), "main"]).0);
    let urls = [a.url(&token, "race"), b.url(&token, "race")];
    let mut workers = Vec::new();
    for i in 0..20 {
        let url = urls[i % 2].clone();
        let dir = work.path().join(format!("w{i}"));
        let (ok, _, err) = git(work.path(), &["clone", "-q", &url, dir.to_str().unwrap()]);
        assert!(ok, "{err}");
        workers.push(std::thread::spawn(move || {
            let id = commit_file(
                &dir,
                &format!("src/w{i}.js"),
                &format!("export const W = {i};\n"),
            );
            for _ in 0..60 {
                if git(&dir, &["push", "-q", "origin", "main"]).0 {
                    return id;
                }
                let _ = git(&dir, &["pull", "-q", "--rebase", "origin", "main"]);
            }
            panic!("worker {i} never got its push in");
        }));
    }
    let pushed: Vec<String> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(pushed.len(), 20);
    let mut heads = Vec::new();
    for (n, url) in urls.iter().enumerate() {
        let c = work.path().join(format!("final{n}"));
        let (ok, _, err) = git(work.path(), &["clone", "-q", url, c.to_str().unwrap()]);
        assert!(ok, "{err}");
        for i in 0..20 {
            assert!(
                c.join(format!("src/w{i}.js")).exists(),
                "commit of worker {i} lost (node {n})"
            );
        }
        heads.push(git_ok(&c, &["rev-parse", "HEAD"]));
    }
    assert_eq!(heads[0], heads[1], "nodes disagree on main");
}

#[test]
fn of_concurrent_pushes_from_one_base_exactly_one_wins() {
    let a = Gitstore::start(Options::default());
    let b = Gitstore::start(Options {
        store: Some(a.store.clone()),
        ..Default::default()
    });
    let token = a.client("gen");
    let work = tempfile::tempdir().unwrap();
    let seed = work.path().join("seed");
    make_app(&seed, "seed");
    assert!(git(&seed, &["push", &a.url(&token, "one"), "main"]).0);
    let mut dirs = Vec::new();
    for i in 0..6 {
        let url = if i % 2 == 0 {
            a.url(&token, "one")
        } else {
            b.url(&token, "one")
        };
        let d = work.path().join(format!("c{i}"));
        assert!(git(work.path(), &["clone", "-q", &url, d.to_str().unwrap()]).0);
        commit_file(&d, "src/text.js", &format!("export const TEXT = {i};\n"));
        dirs.push(d);
    }
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(dirs.len()));
    let results: Vec<bool> = dirs
        .into_iter()
        .map(|d| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                git(&d, &["push", "-q", "origin", "main"]).0
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
}

#[test]
fn sync_detects_a_corrupted_pack_and_fetches_only_new_packs() {
    let g = Gitstore::start(Options::default());
    let token = g.client("gen");
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "one");
    assert!(git(&app, &["push", &g.url(&token, "sy"), "main"]).0);
    let mirror = work.path().join("mirror.git");
    let (ok, first, err) = sync_cli(&g.store, &[], "sy", &mirror);
    assert!(ok, "{err}");
    commit_file(&app, "src/text.js", "export const TEXT = \"two\";\n");
    assert!(git(&app, &["push", &g.url(&token, "sy"), "main"]).0);
    let (ok, second, err) = sync_cli(&g.store, &[], "sy", &mirror);
    assert!(ok, "{err}");
    assert_eq!(second["packs_fetched"], 1);
    // Exactly the new pack and its index, nothing already held.
    let m = manifest(&g.store_dir(), "sy").unwrap();
    let newest = m["packs"].as_array().unwrap().last().unwrap().clone();
    let expected = newest["pack_size"].as_u64().unwrap() + newest["idx_size"].as_u64().unwrap();
    assert_eq!(
        second["bytes_fetched"].as_u64().unwrap(),
        expected,
        "{first} {second}"
    );
    assert!(second["objects_fetched"].as_u64() < first["objects_fetched"].as_u64());
    assert_eq!(
        git_ok(&mirror, &["rev-parse", "main"]),
        git_ok(&app, &["rev-parse", "HEAD"])
    );

    // Flip one byte of the newest pack, then sync into a fresh repository.
    let m = manifest(&g.store_dir(), "sy").unwrap();
    let name = m["packs"].as_array().unwrap().last().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = g.store_dir().join(format!("projects/sy/packs/{name}.pack"));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let fresh = work.path().join("fresh.git");
    let (ok, _, err) = sync_cli(&g.store, &[], "sy", &fresh);
    assert!(!ok, "sync accepted a corrupted pack");
    assert!(err.contains(&name) && err.contains("corrupt"), "{err}");
    assert!(!fresh.join(format!("objects/pack/{name}.pack")).exists());
    assert!(
        git_ok(&fresh, &["for-each-ref"]).is_empty(),
        "refs moved despite the corrupt pack"
    );
}

#[test]
fn killed_between_pack_upload_and_manifest_write_leaves_project_consistent() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store").to_string_lossy().into_owned();
    let setup = Gitstore::start(Options {
        store: Some(store.clone()),
        ..Default::default()
    });
    let token = setup.client("gen");
    let app = work.path().join("app");
    make_app(&app, "one");
    assert!(git(&app, &["push", &setup.url(&token, "crash"), "main"]).0);
    let good = git_ok(&app, &["rev-parse", "HEAD"]);
    drop(setup);

    let marker = work.path().join("paused");
    let mut faulty = Gitstore::start(Options {
        store: Some(store.clone()),
        env: vec![(
            "KILN_FAULT_INJECT".into(),
            format!("pause-before-manifest:{}", marker.display()),
        )],
        ..Default::default()
    });
    commit_file(&app, "src/text.js", "export const TEXT = \"lost\";\n");
    let url = faulty.url(&token, "crash");
    let app2 = app.clone();
    let pusher = std::thread::spawn(move || git(&app2, &["push", &url, "main"]));
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(
            !pusher.is_finished(),
            "push ended before the fault point: {:?}\n{}",
            pusher.join().unwrap(),
            faulty.log()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "hook never reached the fault point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    faulty.kill();
    assert!(
        !pusher.join().unwrap().0,
        "the client was told a killed push succeeded"
    );
    let store_dir = std::path::PathBuf::from(&store);
    assert_eq!(
        generation(&store_dir, "crash"),
        1,
        "manifest advanced without a finished push"
    );
    let packs = std::fs::read_dir(store_dir.join("projects/crash/packs"))
        .unwrap()
        .count();
    assert_eq!(
        packs, 4,
        "expected the orphan pack (and index) beside the first push's"
    );

    let fresh = Gitstore::start(Options {
        store: Some(store),
        ..Default::default()
    });
    let clone = work.path().join("clone");
    assert!(
        git(
            work.path(),
            &[
                "clone",
                "-q",
                &fresh.url(&token, "crash"),
                clone.to_str().unwrap()
            ]
        )
        .0
    );
    assert_eq!(git_ok(&clone, &["rev-parse", "HEAD"]), good);
    let (ok, _, err) = git(&app, &["push", &fresh.url(&token, "crash"), "main"]);
    assert!(ok, "push after the crash: {err}");
    git_ok(&clone, &["pull", "-q"]);
    assert_eq!(
        git_ok(&clone, &["rev-parse", "HEAD"]),
        git_ok(&app, &["rev-parse", "HEAD"])
    );
}

/// Reads one HTTP request (headers + Content-Length body) from a stream.
fn read_request(s: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, body)
}

#[test]
fn webhook_is_signed_and_retried_after_a_failure() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        for (n, stream) in listener.incoming().take(2).enumerate() {
            let mut s = stream.unwrap();
            let req = read_request(&mut s);
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            got.push(req);
        }
        got
    });
    let g = Gitstore::start(Options {
        args: vec!["--agent-url".into(), format!("http://127.0.0.1:{port}")],
        ..Default::default()
    });
    let token = g.client("gen");
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    make_app(&app, "hook");
    assert!(git(&app, &["push", &g.url(&token, "hooked"), "main"]).0);
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), 2, "expected a failed delivery and its retry");
    for (head, body) in &got {
        assert!(head.starts_with("POST /sync-project/hooked "), "{head}");
        let sig = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-kiln-signature-256:")
                    .map(|v| v.trim().to_owned())
            })
            .expect("signature header");
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body);
        assert_eq!(
            sig,
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        );
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["ref"], "refs/heads/main");
        assert_eq!(v["new"], git_ok(&app, &["rev-parse", "HEAD"]));
        assert_eq!(v["old"], "0000000000000000000000000000000000000000");
    }
    let (code, metrics) = g.http("GET", "/metrics", None, None);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kiln_gitstore_pushes_total{outcome=\"accepted\"} 1"),
        "{metrics}"
    );
}
