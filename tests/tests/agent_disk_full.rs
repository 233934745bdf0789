//! A full disk on the build machine: the agent's state dir is a small tmpfs that the test fills.
//! A build that needs room fails and says the disk is full, every preview stays served, the
//! disk check evicts idle projects' worktrees, the failed sync is retried by itself and
//! succeeds in the room eviction made, and nothing on the disk is corrupt afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_tests::*;

const SETTLE: Duration = Duration::from_secs(120);
const DISK_MIB: u64 = 64;

/// Incompressible bytes, so git's pack holds them whole.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut block = [0u8; 32];
    let mut counter = 0u64;
    while out.len() < n {
        use sha2::Digest;
        block = sha2::Sha256::new()
            .chain_update(block)
            .chain_update(counter.to_le_bytes())
            .finalize()
            .into();
        counter += 1;
        out.extend_from_slice(&block);
    }
    out.truncate(n);
    out
}

fn page(text: &str) -> String {
    format!("<!doctype html><html><head><title>t</title></head><body><p>{text}</p></body></html>\n")
}

fn available_bytes(path: &Path) -> u64 {
    let out = run(std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path));
    assert!(out.ok, "df: {}", out.stderr);
    out.stdout
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df said: {}", out.stdout))
}

fn metric(stack: &Stack, name: &str) -> u64 {
    let body = http("GET", &format!("{}/metrics", stack.agent_url()), &[], b"").body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

fn push_ready(stack: &Stack, repo: &Repo, project: &str) -> serde_json::Value {
    stack.push(repo, project);
    let st = stack.wait_settled(project, &repo.head(), SETTLE);
    assert_eq!(st["state"], "ready", "{st:#}\n{}", stack.build_log(project));
    st
}

/// Every object of the agent's copy of `project` is there and readable.
fn fsck(stack: &Stack, project: &str) {
    let repo = stack
        .state_dir()
        .join(format!("projects/{project}/repo.git"));
    let out = git(&repo, &["fsck", "--no-progress", "--full", "--strict"]);
    assert!(out.ok, "git fsck of {project}'s copy: {}", out.stderr);
}

#[test]
fn a_full_state_disk_fails_the_build_clearly_keeps_every_preview_and_recovers_after_eviction() {
    // The periodic pass waits an hour: only the check after each build may evict, so the test
    // sees the failure first.
    let mut stack = Stack::start_on_small_state_disk(
        DISK_MIB,
        &[
            "--disk-high-water",
            "85",
            "--disk-low-water",
            "70",
            "--gc-interval-secs",
            "3600",
        ],
    );
    let state = stack.state_dir();
    let tmp = tempfile::tempdir().unwrap();

    // `big` holds 12 MiB of data outside what it serves, twice on this disk: its repository's
    // pack and its worktree.
    let big = Repo::init(&tmp.path().join("big"));
    big.write("data/blob.bin", random_bytes(12 << 20));
    big.write("index.html", page("big v1"));
    big.git_ok(&["add", "-A"]);
    big.git_ok(&["commit", "-q", "-m", "big v1"]);
    push_ready(&stack, &big, "big");
    let small = Repo::init(&tmp.path().join("small"));
    small.commit_file("index.html", page("small v1"));
    let v1 = push_ready(&stack, &small, "small");

    // Fill the disk to 1 MiB short of full, as logs or another tenant of the disk would.
    let room = available_bytes(&state);
    let filler = state.join("filler");
    std::fs::write(&filler, vec![0u8; (room - (1 << 20)) as usize]).expect("filling the disk");
    assert_eq!(metric(&stack, "kiln_agent_evictions_total"), 0);
    let health = http("GET", &format!("{}/healthz", stack.agent_url()), &[], b"");
    assert_eq!(
        health.status, 503,
        "a full disk is not reported: {}",
        health.body
    );
    assert!(
        health.json()["problems"]
            .to_string()
            .contains(&format!("disk: {}", state.display())),
        "{}",
        health.body
    );

    // A change needing 3 MiB on that disk (its pack, then its files).
    small.write("data/more.bin", random_bytes(3 << 20));
    small.write("index.html", page("small v2"));
    small.git_ok(&["add", "-A"]);
    small.git_ok(&["commit", "-q", "-m", "small v2"]);
    let v2 = small.head();
    stack.push(&small, "small");
    let started = Instant::now();
    let failed = loop {
        let st = stack.status("small");
        if st["build"] != v1["build"] && st["state"] == "failed" {
            break st;
        }
        assert!(
            st["state"] != "ready" || st["commit"] != v2.as_str(),
            "v2 was built on a full disk: {st:#}"
        );
        assert!(
            started.elapsed() < SETTLE,
            "the build on a full disk never failed: {st:#}\n{}",
            stack.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("disk is full")
            && error.contains("No space left on device")
            && error.contains(&state.display().to_string()),
        "the failure does not say which disk is full: {failed:#}"
    );
    assert!(
        error.contains("tried again by itself"),
        "the failure does not say what happens next: {failed:#}"
    );
    // Both previews are still the last good builds.
    assert!(stack
        .published("small", "index.html")
        .is_some_and(|p| p.contains("small v1")));
    assert!(stack
        .published("big", "index.html")
        .is_some_and(|p| p.contains("big v1")));
    assert_eq!(failed["last_good"]["build"], v1["build"], "{failed:#}");

    // The check after the failed build evicts the idle projects, the retried sync finds room,
    // and v2 is served with no new push.
    let st = stack.wait_settled("small", &v2, SETTLE);
    assert_eq!(st["state"], "ready", "{st:#}\n{}", stack.agent_log());
    assert!(stack
        .published("small", "index.html")
        .is_some_and(|p| p.contains("small v2")));
    assert!(
        metric(&stack, "kiln_agent_evictions_total") >= 1,
        "{}",
        stack.agent_log()
    );
    assert!(
        !state.join("projects/big/worktree/data/blob.bin").exists(),
        "big's worktree was not evicted"
    );
    assert!(stack
        .published("big", "index.html")
        .is_some_and(|p| p.contains("big v1")));
    // The failed fetch left no partial pack behind to hold on to the disk.
    let leftovers: Vec<_> = std::fs::read_dir(state.join("projects/small/repo.git/objects/pack"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "partial packs left: {leftovers:?}");

    // Nothing is corrupt: once the operator frees the disk, both copies pass fsck, an evicted
    // project builds from scratch, and a restarted agent knows every build it had.
    std::fs::remove_file(&filler).unwrap();
    let health = http("GET", &format!("{}/healthz", stack.agent_url()), &[], b"");
    assert_eq!(health.status, 200, "{}", health.body);
    fsck(&stack, "small");
    fsck(&stack, "big");
    big.write("index.html", page("big v2"));
    big.git_ok(&["commit", "-q", "-am", "big v2"]);
    let big_v2 = push_ready(&stack, &big, "big");
    assert!(stack
        .published("big", "index.html")
        .is_some_and(|p| p.contains("big v2")));
    assert_eq!(
        std::fs::read(state.join("projects/big/worktree/data/blob.bin"))
            .map(|b| b.len())
            .ok(),
        Some(12 << 20),
        "the evicted worktree was not checked out again in full"
    );
    stack.restart_agent();
    for (project, commit, build) in [
        ("small", v2.as_str(), &st["build"]),
        ("big", big.head().as_str(), &big_v2["build"]),
    ] {
        let after = stack.status(project);
        assert_eq!(
            (&after["state"], after["commit"].as_str(), &after["build"]),
            (&"ready".into(), Some(commit), build),
            "{project} after a restart: {after:#}"
        );
    }
}
