//! Concurrent pushes through two gitstore nodes that share one file store (separate caches): no
//! accepted commit is ever lost, and of racing pushes from one base exactly one wins.

use std::sync::{Arc, Barrier};

use kiln_tests::*;

/// Two nodes on one store, a client token, and `project` seeded with the app on main.
fn two_nodes(project: &str) -> (Gitstore, Gitstore, String, tempfile::TempDir, String) {
    let a = Gitstore::start();
    let b = Gitstore::start_with(Options {
        store: Some(a.store_url().to_owned()),
        ..Options::default()
    });
    let token = a.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let seed = vite_app(&work.path().join("seed"), "Race");
    let out = seed.push(&a.git_url(&token, project), &["main"]);
    assert!(out.ok, "seed push:\n{}", out.stderr);
    let head = seed.head();
    (a, b, token, work, head)
}

#[test]
fn twenty_concurrent_pushes_through_two_nodes_lose_no_commit() {
    const WORKERS: usize = 20;
    const ATTEMPTS: usize = 40;
    let (a, b, token, work, seed) = two_nodes("race");
    let urls = Arc::new([a.git_url(&token, "race"), b.git_url(&token, "race")]);

    // Each worker: its own clone, one unique commit, then push to A or B alternately; on a
    // rejection, `git pull --rebase` from the node just tried and try again.
    let start = Arc::new(Barrier::new(WORKERS));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let repo = Repo::clone(&urls[i % 2], &work.path().join(format!("w{i}")));
            repo.commit_file(
                &format!("src/workers/w{i}.js"),
                format!("export const WORKER = {i};\n"),
            );
            let (urls, start) = (urls.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for attempt in 0..ATTEMPTS {
                    let url = &urls[(i + attempt) % 2];
                    let out = repo.push(url, &["HEAD:refs/heads/main"]);
                    if out.ok {
                        return (repo.head(), attempt + 1);
                    }
                    // Files are unique per worker, so a rebase cannot conflict; a failed fetch is
                    // simply retried on the next attempt.
                    if !repo.git(&["pull", "-q", "--rebase", url, "main"]).ok {
                        let _ = repo.git(&["rebase", "--abort"]);
                    }
                }
                panic!("worker {i} did not get its commit in after {ATTEMPTS} attempts");
            })
        })
        .collect();
    let results: Vec<(String, usize)> = workers
        .into_iter()
        .map(|w| w.join().expect("worker thread"))
        .collect();
    // Every clone starts at the seed, so at most one push can land without a rebase.
    let first_try = results.iter().filter(|(_, tries)| *tries == 1).count();
    assert!(
        first_try <= 1,
        "{first_try} pushes from the same base were all accepted on their first attempt"
    );

    // Read main back through a fresh clone from each node.
    let mut heads = Vec::new();
    for (n, url) in urls.iter().enumerate() {
        let c = Repo::clone(url, &work.path().join(format!("final-{n}")));
        for i in 0..WORKERS {
            assert!(
                c.path.join(format!("src/workers/w{i}.js")).is_file(),
                "worker {i}'s commit is missing from main read through node {n}"
            );
        }
        let subjects = c.git_ok(&["log", "--format=%s", &format!("{seed}..HEAD")]);
        for i in 0..WORKERS {
            let subject = format!("update src/workers/w{i}.js");
            assert_eq!(
                subjects.lines().filter(|l| *l == subject).count(),
                1,
                "worker {i}'s commit appears other than once on main (node {n}):\n{subjects}"
            );
        }
        assert_eq!(
            c.git_ok(&["rev-list", "--count", &format!("{seed}..HEAD")]),
            WORKERS.to_string()
        );
        // Every worker's final pushed commit is on main.
        for (head, _) in &results {
            assert!(
                c.git(&["merge-base", "--is-ancestor", head, "HEAD"]).ok,
                "pushed commit {head} is not on main (node {n})"
            );
        }
        c.git_ok(&["fsck", "--no-progress"]);
        heads.push(c.head());
    }
    assert_eq!(heads[0], heads[1], "the two nodes disagree about main");
    let ls_a = git(work.path(), &["ls-remote", &urls[0], "refs/heads/main"]).stdout;
    let ls_b = git(work.path(), &["ls-remote", &urls[1], "refs/heads/main"]).stdout;
    assert_eq!(ls_a, ls_b);
    assert!(ls_a.starts_with(&heads[0]));
    let m = latest_manifest(&a.store_dir(), "race").unwrap();
    assert_eq!(m["refs"]["refs/heads/main"], heads[0].as_str());
}

#[test]
fn of_concurrent_pushes_from_one_base_exactly_one_wins() {
    const RACERS: usize = 8;
    let (a, b, token, work, seed) = two_nodes("one");
    let urls = [a.git_url(&token, "one"), b.git_url(&token, "one")];
    let racers: Vec<Repo> = (0..RACERS)
        .map(|i| {
            let r = Repo::clone(&urls[i % 2], &work.path().join(format!("r{i}")));
            r.commit_file("src/race.js", format!("export const WINNER = {i};\n"));
            r
        })
        .collect();
    let start = Arc::new(Barrier::new(RACERS));
    let outcomes: Vec<(bool, String, String)> = racers
        .into_iter()
        .map(|r| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let out = r.push("origin", &["main"]);
                (out.ok, r.head(), out.stderr)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("racer thread"))
        .collect();
    let winners: Vec<&(bool, String, String)> = outcomes.iter().filter(|o| o.0).collect();
    assert_eq!(
        winners.len(),
        1,
        "expected exactly one winner; outcomes: {:#?}",
        outcomes
            .iter()
            .map(|(ok, _, err)| (ok, err.lines().last().unwrap_or("")))
            .collect::<Vec<_>>()
    );
    let winner = &winners[0].1;
    for (n, url) in urls.iter().enumerate() {
        let ls = git(work.path(), &["ls-remote", url, "refs/heads/main"]).stdout;
        assert!(ls.starts_with(winner.as_str()), "node {n}: {ls}");
    }
    assert_eq!(generation(&a.store_dir(), "one"), 2);
    let c = Repo::clone(&urls[1], &work.path().join("check"));
    assert_eq!(c.git_ok(&["rev-parse", "HEAD~1"]), seed);
}
