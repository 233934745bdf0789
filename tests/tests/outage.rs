//! A blob store outage (Azurite stopped, mid-push too): pushes fail with a message that says to
//! retry and store nothing half-way, health says the store is down, and once the store is back
//! every push made before the outage is there and the next push goes through, with no restart.

use std::time::{Duration, Instant};

use kiln_tests::*;

fn noise(len: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn wait_healthy(g: &Gitstore, healthy: bool) -> Response {
    let started = Instant::now();
    loop {
        let r = g.http("GET", "/healthz", None, None);
        if (r.status == 200) == healthy {
            return r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "healthz never turned {}: {} {}",
            if healthy { "healthy" } else { "unhealthy" },
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_blob_store_outage_fails_pushes_cleanly_and_everything_resumes_when_it_returns() {
    let mut az = Azurite::start();
    az.create_container("outage");
    let g = Gitstore::start_with(az.gitstore_options("outage"));
    let token = g.create_client("outage");
    let work = tempfile::tempdir().unwrap();
    let repo = Repo::init(&work.path().join("repo"));
    let before = repo.commit_file("README.md", "before the outage\n");
    let url = g.git_url(&token, "weathered");
    assert!(repo.push(&url, &["main"]).ok);

    // Down: health says so, a push fails and git shows why and that a retry is the remedy.
    az.stop();
    let r = wait_healthy(&g, false);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_ne!(r.json()["blob_store"], "ok", "{}", r.body);
    let during = repo.commit_file("during.txt", "pushed during the outage\n");
    let out = repo.push(&url, &["main"]);
    assert!(!out.ok, "a push without a store was acknowledged");
    let said = out.stderr.to_lowercase();
    assert!(
        said.contains("store") && (said.contains("retry") || said.contains("try again")),
        "git shows no retryable store error:\n{}",
        out.stderr
    );

    // Back: no restart of gitstore, the failed push goes through when retried.
    az.resume();
    wait_healthy(&g, true);
    let out = repo.push(&url, &["main"]);
    assert!(out.ok, "the retried push failed: {}", out.stderr);
    let clone = Repo::clone(&url, &work.path().join("after"));
    assert_eq!(clone.head(), during);
    assert!(clone.git(&["cat-file", "-e", &before]).ok);

    // Mid-push: a push carrying a pack of a few MB, the store stopped while it uploads.
    repo.commit_file("big.txt", noise(6_000_000, 7));
    let big = repo.head();
    let pusher = {
        let (dir, url) = (work.path().join("repo"), url.clone());
        std::thread::spawn(move || {
            std::process::Command::new("git")
                .current_dir(dir)
                .args(["push", "--quiet", &url, "main"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    az.stop();
    let out = pusher.join().unwrap();
    az.resume();
    wait_healthy(&g, true);
    let acknowledged = out.status.success();
    let clone = Repo::clone(&url, &work.path().join("mid"));
    if acknowledged {
        assert_eq!(clone.head(), big, "an acknowledged push is missing");
    } else {
        // Refused: the branch is where it was, whole; a retry goes through.
        assert_eq!(clone.head(), during);
        let out = repo.push(&url, &["main"]);
        assert!(out.ok, "the retried push failed: {}", out.stderr);
    }
    let fsck = clone.git(&["fsck", "--strict", "--no-dangling"]);
    assert!(fsck.ok, "{}", fsck.stderr);
    let clone = Repo::clone(&url, &work.path().join("last"));
    assert_eq!(clone.head(), big);
}
