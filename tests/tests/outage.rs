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

/// Polls the agent's health until it is (or is not) ok.
fn wait_agent_healthy(stack: &Stack, healthy: bool) -> Response {
    let started = Instant::now();
    loop {
        let r = stack.agent_http("GET", "/healthz");
        if (r.status == 200) == healthy {
            return r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the agent's healthz never turned {}: {} {}",
            if healthy { "healthy" } else { "degraded" },
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn during_a_store_outage_the_agent_rebuilds_what_it_has_and_builds_a_missed_push_once_it_returns() {
    use sha2::Digest;
    let admin = "kiln-outage-test-admin-token";
    let admin_sha = hex::encode(sha2::Sha256::digest(admin.as_bytes()));
    let mut az = Azurite::start();
    az.create_container("agent-outage");
    let mut stack =
        Stack::start_on_azurite(&az, "agent-outage", &["--admin-token-sha256", &admin_sha]);
    let as_admin = |stack: &Stack, method: &str, path: &str| {
        http(
            method,
            &format!("{}{path}", stack.agent_url()),
            &[("Authorization", &format!("Bearer {admin}"))],
            b"",
        )
    };
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    app.commit_file(
        "src/text.ts",
        "export const TEXT: string = 'before the outage'\n",
    );
    stack.push(&app, "calm");
    let first = app.head();
    assert_eq!(
        stack.wait_settled("calm", &first, Duration::from_secs(300))["state"],
        "ready"
    );

    // The store goes: health says degraded, a client the agent has seen is still let in, and
    // what this machine has still builds while the preview stays served.
    az.stop();
    let r = wait_agent_healthy(&stack, false);
    assert_eq!(r.json()["status"], "degraded", "{}", r.body);
    assert!(r.body.contains("blob store"), "{}", r.body);
    assert!(stack.published("calm", "index.html").is_some());
    let r = stack.agent_http("POST", "/build/calm");
    assert_eq!(r.status, 202, "{}", r.body);
    let st = stack.wait_settled("calm", &first, Duration::from_secs(180));
    assert_eq!(st["state"], "ready", "{st:#}");
    let log = stack.build_log("calm");
    assert!(log.contains("building from this machine's copy"), "{log}");
    // A webhook while the store is away answers what to do (gitstore retries it).
    let r = stack.sync("calm");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "store", "{}", r.body);
    az.resume();
    wait_agent_healthy(&stack, true);

    // A push the agent misses (it is down), then the store goes too, and the agent comes
    // back: it cannot catch up, nor check a token it has not seen, and says so.
    stack.kill_agent();
    app.commit_file(
        "src/text.ts",
        "export const TEXT: string = 'pushed while away'\n",
    );
    stack.push(&app, "calm");
    let missed = app.head();
    az.stop();
    stack.restart_agent_unchecked();
    let r = stack.agent_http("GET", "/status/calm");
    assert_eq!(
        r.status, 503,
        "a token it cannot check is not refused as bad: {}",
        r.body
    );
    let r = as_admin(&stack, "GET", "/status/calm");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["last_good"]["commit"],
        first.as_str(),
        "{}",
        r.body
    );

    // Back: the missed push is built by itself (the catch-up with the store, which failed at
    // start, is retried), with no new push and no restart.
    az.resume();
    let st = stack.wait_settled("calm", &missed, Duration::from_secs(300));
    assert_eq!(st["state"], "ready", "{st:#}");
    assert!(stack
        .published_assets("calm", "js")
        .contains("pushed while away"));
    wait_agent_healthy(&stack, true);
}
