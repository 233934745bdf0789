//! Damaged data: a corrupt or missing pack in the store is detected, reported in the status and
//! never built or served, and the last good preview stays; a damaged copy on the agent's disk
//! is repaired from the store by itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_tests::*;

const SETTLE: Duration = Duration::from_secs(120);

fn packs_in(dir: &Path) -> Vec<PathBuf> {
    let mut packs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    packs.sort();
    packs
}

/// The store's pack that holds `commit`'s push: the one not in `before`.
fn new_pack(stack: &Stack, project: &str, before: &[PathBuf]) -> PathBuf {
    let dir = stack
        .gitstore
        .store_dir()
        .join(format!("projects/{project}/packs"));
    let mut new: Vec<PathBuf> = packs_in(&dir)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(
        new.len(),
        1,
        "expected one new pack in {}: {new:?}",
        dir.display()
    );
    new.pop().unwrap()
}

fn store_packs(stack: &Stack, project: &str) -> Vec<PathBuf> {
    packs_in(
        &stack
            .gitstore
            .store_dir()
            .join(format!("projects/{project}/packs")),
    )
}

/// Pushes v2 while the agent is down (so it meets the store's copy only), damages that push's
/// pack in the store with `damage`, starts the agent and returns its settled status.
fn push_damaged_while_away(
    stack: &mut Stack,
    repo: &Repo,
    project: &str,
    damage: impl FnOnce(&Path),
) -> (String, serde_json::Value) {
    let before = store_packs(stack, project);
    stack.kill_agent();
    let v2 = repo.commit_file("index.html", "<h1>v2</h1>\n");
    stack.push(repo, project);
    let pack = new_pack(stack, project, &before);
    damage(&pack);
    stack.restart_agent();
    // The sync fails before the build knows its commit: wait for the failure itself.
    let started = std::time::Instant::now();
    let st = loop {
        let st = stack.status(project);
        if st["state"] == "failed" || st["commit"] == v2.as_str() && st["state"] == "ready" {
            break st;
        }
        assert!(
            started.elapsed() < SETTLE,
            "{project} never settled: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    (pack.file_stem().unwrap().to_string_lossy().into_owned(), st)
}

fn served(stack: &Stack, project: &str, rel: &str) -> String {
    stack.published(project, rel).unwrap_or_default()
}

fn start_with_v1(project: &str, dir: &Path) -> (Stack, Repo, String) {
    let stack = Stack::start();
    let repo = Repo::init(&dir.join(project));
    let v1 = repo.commit_file("index.html", "<h1>v1</h1>\n");
    stack.push(&repo, project);
    let st = stack.wait_settled(project, &v1, SETTLE);
    assert_eq!(st["state"], "ready", "{st:#}");
    (stack, repo, v1)
}

#[test]
fn a_corrupt_pack_in_the_store_fails_the_build_by_name_and_the_last_good_preview_stays() {
    let work = tempfile::tempdir().unwrap();
    let (mut stack, repo, v1) = start_with_v1("flipped", work.path());
    let (pack, st) = push_damaged_while_away(&mut stack, &repo, "flipped", |p| {
        let mut bytes = std::fs::read(p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(p, bytes).unwrap();
    });
    assert_eq!(st["state"], "failed", "{st:#}");
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&pack) && error.contains("corrupt"),
        "the status does not name the corrupt pack {pack}: {error}"
    );
    assert_eq!(st["last_good"]["commit"], v1.as_str(), "{st:#}");
    assert!(
        served(&stack, "flipped", "index.html").contains("<h1>v1</h1>"),
        "the served preview changed"
    );
    // Nothing of the corrupt pack reached the agent's repository.
    let local = stack
        .state_dir()
        .join("projects/flipped/repo.git/objects/pack");
    assert!(
        packs_in(&local)
            .iter()
            .all(|p| !p.to_string_lossy().contains(&pack)),
        "the corrupt pack is in the agent's repository"
    );
}

#[test]
fn a_manifest_naming_a_missing_pack_fails_the_build_by_name_and_the_last_good_preview_stays() {
    let work = tempfile::tempdir().unwrap();
    let (mut stack, repo, v1) = start_with_v1("vanished", work.path());
    let (pack, st) = push_damaged_while_away(&mut stack, &repo, "vanished", |p| {
        std::fs::remove_file(p).unwrap();
    });
    assert_eq!(st["state"], "failed", "{st:#}");
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&pack) && error.contains("missing from the blob store"),
        "the status does not name the missing pack {pack}: {error}"
    );
    assert_eq!(st["last_good"]["commit"], v1.as_str(), "{st:#}");
    assert!(served(&stack, "vanished", "index.html").contains("<h1>v1</h1>"));
    // Not retried: the store's data is wrong, and trying again cannot help.
    assert!(!error.contains("retry"), "{error}");
    // gitstore's redelivery of the webhook the agent missed while down may ask once more; after
    // that nothing is retried on its own (the agent retries a store that does not answer after
    // 5, 10, 20 s...).
    std::thread::sleep(Duration::from_secs(2));
    let settled = stack.status("vanished")["build"].clone();
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        stack.status("vanished")["build"],
        settled,
        "a build of a damaged store was retried"
    );
}

#[test]
fn a_damaged_repository_on_the_agents_disk_is_fetched_again_from_the_store() {
    let work = tempfile::tempdir().unwrap();
    let (stack, repo, _) = start_with_v1("frayed", work.path());
    let v2 = repo.commit_file("about.html", "<h1>about</h1>\n");
    stack.push(&repo, "frayed");
    let st = stack.wait_settled("frayed", &v2, SETTLE);
    assert_eq!(st["state"], "ready", "{st:#}");
    let built = st["build"].as_u64().unwrap();

    // Every pack of the agent's copy cut to half its length, as a bad disk or a crash of the
    // file system might leave it.
    let local = stack
        .state_dir()
        .join("projects/frayed/repo.git/objects/pack");
    let packs = packs_in(&local);
    assert!(!packs.is_empty());
    for p in &packs {
        let len = std::fs::metadata(p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    }

    let r = stack.agent_http("POST", "/build/frayed");
    assert_eq!(r.status, 202, "{}", r.body);
    let st = stack.wait_settled("frayed", &v2, SETTLE);
    assert_eq!(
        st["state"],
        "ready",
        "{st:#}\n{}",
        stack.build_log("frayed")
    );
    assert!(st["build"].as_u64().unwrap() > built, "{st:#}");
    let log = stack.build_log("frayed");
    assert!(
        log.contains("damaged") && log.contains("fetching it again from the blob store"),
        "the log does not say the local copy was repaired:\n{log}"
    );
    assert!(served(&stack, "frayed", "about.html").contains("<h1>about</h1>"));
    let repaired = Repo {
        path: stack.state_dir().join("projects/frayed/repo.git"),
    };
    repaired.git_ok(&["fsck", "--no-progress", "--connectivity-only"]);
    let metrics = http("GET", &format!("{}/metrics", stack.agent_url()), &[], b"").body;
    assert!(
        metrics.contains("kiln_agent_repo_repairs_total 1"),
        "{metrics}"
    );
}
