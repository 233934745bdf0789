//! `kill -9` at seeded random points, many times over: of gitstore while pushes are in flight,
//! and of the agent while builds sync, install, build and publish. After each kill and restart:
//! every push git acknowledged is readable, no ref names a missing object, the preview nginx
//! would serve is a whole build (never half of one), and the interrupted build runs again.
//!
//! `KILN_FAULT_SEED` and `KILN_FAULT_ITERATIONS` reproduce or extend a run; the seed is printed.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);

/// xorshift64*: enough to spread kill points, and reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Self {
        let seed = std::env::var("KILN_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        eprintln!("{test}: KILN_FAULT_SEED={seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn iterations(default: usize) -> usize {
    std::env::var("KILN_FAULT_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Bytes that do not compress, so a push carries a pack big enough to be killed in the middle.
fn noise(seed: u64, len: usize) -> String {
    let mut r = Rng(seed | 1);
    (0..len)
        .map(|_| char::from(b'a' + r.below(26) as u8))
        .collect()
}

#[test]
fn gitstore_killed_at_random_points_of_pushes_loses_no_acknowledged_push() {
    let mut rng = Rng::from_env("gitstore");
    let mut node = Gitstore::start();
    let token = node.create_client("faults");
    let work = tempfile::tempdir().unwrap();
    let repo = Repo::init(&work.path().join("repo"));
    repo.commit_file("README.md", "faults\n");
    let url = node.git_url(&token, "faulty");
    assert!(repo.push(&url, &["main"]).ok);

    // How long an undisturbed push of one iteration's size takes: kills land across it.
    repo.commit_file("blob-0.txt", noise(0, 400_000));
    let started = Instant::now();
    let out = repo.push(&url, &["main"]);
    assert!(out.ok, "{}", out.stderr);
    let push_ms = started.elapsed().as_millis() as u64;

    let mut acknowledged = vec![repo.head()];
    let (mut killed_mid_push, mut survived) = (0, 0);
    for i in 1..=iterations(20) {
        repo.commit_file(&format!("blob-{i}.txt"), noise(i as u64, 400_000));
        let head = repo.head();
        let pusher = {
            let (dir, url) = (work.path().join("repo"), url.clone());
            std::thread::spawn(move || {
                let out = std::process::Command::new("git")
                    .current_dir(dir)
                    .args(["push", "--quiet", &url, "main"])
                    .output()
                    .unwrap();
                out.status.success()
            })
        };
        std::thread::sleep(Duration::from_millis(rng.below(push_ms * 3 / 2 + 1)));
        node.kill();
        let ok = pusher.join().unwrap();
        node.restart();
        if ok {
            acknowledged.push(head.clone());
            survived += 1;
        } else {
            killed_mid_push += 1;
        }
        check_store(&node, &token, "faulty", &acknowledged, work.path(), i);
    }
    eprintln!("{killed_mid_push} pushes killed mid-way, {survived} acknowledged before the kill");
    // The last push went through or not; the next one, undisturbed, must.
    repo.commit_file("after.txt", "after the faults\n");
    let out = repo.push(&url, &["main"]);
    assert!(out.ok, "a push after the faults failed: {}", out.stderr);
    acknowledged.push(repo.head());
    check_store(&node, &token, "faulty", &acknowledged, work.path(), 0);
}

/// A fresh clone has every acknowledged commit and passes `git fsck`.
fn check_store(
    node: &Gitstore,
    token: &str,
    project: &str,
    acknowledged: &[String],
    work: &Path,
    iteration: usize,
) {
    let dir = work.join(format!("clone-{iteration}-{}", acknowledged.len()));
    let clone = Repo::try_clone(&node.git_url(token, project), &dir, &[]).unwrap_or_else(|o| {
        panic!(
            "iteration {iteration}: the project cannot be cloned after a restart: {}\n{}",
            o.stderr,
            node.log()
        )
    });
    for c in acknowledged {
        let out = clone.git(&["cat-file", "-e", &format!("{c}^{{commit}}")]);
        assert!(
            out.ok,
            "iteration {iteration}: acknowledged push {c} is lost\n{}",
            node.log()
        );
    }
    let fsck = clone.git(&["fsck", "--strict", "--no-dangling"]);
    assert!(fsck.ok, "iteration {iteration}: {}", fsck.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn agent_killed_at_random_points_of_builds_serves_whole_builds_and_builds_again() {
    let mut rng = Rng::from_env("agent");
    let mut stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let bystander = Repo::init(&tmp.path().join("bystander"));
    bystander.commit_file("index.html", "<!doctype html><p>bystander</p>\n");
    stack.push(&bystander, "bystander");
    let app = fixture_app(&tmp.path().join("app"));
    app.commit_file("src/text.ts", "export const TEXT: string = 'text-0'\n");
    stack.push(&app, "crashy");
    assert_eq!(
        stack.wait_settled("crashy", &app.head(), COLD)["state"],
        "ready"
    );
    assert_eq!(
        stack.wait_settled("bystander", &bystander.head(), COLD)["state"],
        "ready"
    );

    // A warm build's length, so kills land in sync, install, build and publish alike.
    app.commit_file("src/text.ts", "export const TEXT: string = 'text-warm'\n");
    let started = Instant::now();
    stack.push(&app, "crashy");
    assert_eq!(
        stack.wait_settled("crashy", &app.head(), COLD)["state"],
        "ready"
    );
    let build_ms = started.elapsed().as_millis() as u64;

    let package_json = std::fs::read_to_string(tmp.path().join("app/package.json")).unwrap();
    let mut phases_hit = std::collections::BTreeSet::new();
    for i in 1..=iterations(6) {
        let text = format!("text-{i}");
        // Every other round changes a dependency too, so the kill can land in an install.
        if i % 2 == 0 {
            app.commit_file(
                "package.json",
                package_json.replacen(
                    "\"private\"",
                    &format!("\"x-round\": \"{i}\", \"private\""),
                    1,
                ),
            );
        }
        app.commit_file(
            "src/text.ts",
            format!("export const TEXT: string = '{text}'\n"),
        );
        stack.push(&app, "crashy");
        std::thread::sleep(Duration::from_millis(rng.below(build_ms + 1)));
        if let Some(s) = stack.status("crashy")["state"].as_str() {
            phases_hit.insert(s.to_owned());
        }
        stack.kill_agent();
        // Nothing of the killed agent runs on: not a build, not a warm process.
        let killed = Instant::now();
        while !stack.sandbox_processes().is_empty() {
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "iteration {i}: sandboxes outlived the agent: {:?}",
                stack.sandbox_processes()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_whole_build_served(&stack, "crashy", i);
        assert_whole_build_served(&stack, "bystander", i);
        stack.restart_agent();
        let st = stack.wait_settled("crashy", &app.head(), COLD);
        assert_eq!(
            st["state"],
            "ready",
            "iteration {i}: {st:#}\n{}",
            stack.build_log("crashy")
        );
        assert!(
            stack.published_assets("crashy", "js").contains(&text),
            "iteration {i}: the rebuilt preview does not show {text}"
        );
        assert_whole_build_served(&stack, "crashy", i);
        // What is left is the new agent's warm process for the project, and no build.
        let warm = stack.state_dir().join("warm/crashy");
        let left: Vec<String> = stack
            .sandbox_processes()
            .into_iter()
            .filter(|c| !c.contains(&*warm.to_string_lossy()))
            .collect();
        assert!(left.is_empty(), "iteration {i}: sandboxes left: {left:?}");
    }
    eprintln!("states at the kill: {phases_hit:?}");
    assert!(
        stack
            .published("bystander", "index.html")
            .unwrap()
            .contains("bystander"),
        "the other project's preview is intact"
    );
}

/// What nginx would serve for `project`: `current` resolves to a build whose index.html exists
/// and whose every referenced asset exists (a half-published build would miss some).
fn assert_whole_build_served(stack: &Stack, project: &str, iteration: usize) {
    let dir = stack.publish_dir().join(project);
    let current = dir.join("current");
    let index = std::fs::read_to_string(current.join("index.html"))
        .unwrap_or_else(|e| panic!("iteration {iteration}: {project} serves no index.html: {e}"));
    for part in index.split("/assets/").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect();
        let found = current.join("assets").join(&name).is_file()
            || dir.join("assets").join(&name).is_file();
        assert!(
            found,
            "iteration {iteration}: {project}'s served index.html names assets/{name}, which is missing"
        );
    }
}
