//! Several agents on one blob store (Azurite): each project is built by exactly one of them,
//! the one holding its lease; the others send requests about it there. When an agent dies, its
//! projects come back on the others from the store alone, and later pushes build there.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln_tests::*;

const LEASE_SECS: u64 = 6;

/// The agent that serves `project` ready at `commit`, once exactly one does; every other live
/// agent must send the request there (421 naming it).
fn wait_owner(f: &Fleet, project: &str, commit: &str, timeout: Duration) -> usize {
    let started = Instant::now();
    let mut seen = String::new();
    while started.elapsed() < timeout {
        let mut ready = Vec::new();
        seen.clear();
        for i in (0..f.len()).filter(|&i| f.alive(i)) {
            let r = f.http(i, "GET", &format!("/status/{project}"));
            seen.push_str(&format!("{}: {} {}\n", f.id(i), r.status, r.body));
            if r.status == 200 && r.json()["commit"] == commit && r.json()["state"] == "ready" {
                ready.push(i);
            }
        }
        if let [owner] = ready[..] {
            for i in (0..f.len()).filter(|&i| f.alive(i) && i != owner) {
                let r = f.http(i, "GET", &format!("/status/{project}"));
                assert_eq!(r.status, 421, "{} about {project}: {}", f.id(i), r.body);
                let v = r.json();
                assert_eq!(v["error"], "elsewhere", "{}", r.body);
                assert_eq!(v["owner"], f.id(owner), "{}", r.body);
                assert_eq!(v["url"], f.url(owner), "{}", r.body);
            }
            return owner;
        }
        assert!(
            ready.len() <= 1,
            "{project} is ready on two agents:\n{seen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{project} was not ready at {commit} on any agent within {timeout:?}:\n{seen}");
}

#[test]
fn each_project_has_one_builder_and_a_dead_agents_projects_come_back_on_the_others() {
    let az = Azurite::start();
    az.create_container("fleet");
    let mut f = Fleet::start(&az, "fleet", 3, LEASE_SECS);
    let work = tempfile::tempdir().unwrap();

    // Six static apps: a build is a copy, so the test is about who builds, not how.
    let mut commits = BTreeMap::new();
    let mut repos = BTreeMap::new();
    let mut owners = BTreeMap::new();
    for n in 0..6 {
        let p = format!("leased-{n}");
        let repo = Repo::init(&work.path().join(&p));
        let c = repo.commit_file("index.html", format!("<h1>{p} v1</h1>\n"));
        f.push(&repo, &p);
        let owner = wait_owner(&f, &p, &c, Duration::from_secs(60));
        let page = f.published(owner, &p, "index.html").unwrap_or_default();
        assert!(
            page.contains(&format!("{p} v1")),
            "{p} on {}: {page}",
            f.id(owner)
        );
        commits.insert(p.clone(), c);
        repos.insert(p.clone(), repo);
        owners.insert(p, owner);
    }
    let mut load = vec![0; f.len()];
    for &o in owners.values() {
        load[o] += 1;
    }
    eprintln!("projects per agent: {load:?}");
    assert!(
        load.iter().filter(|&&n| n > 0).count() >= 2,
        "one agent took every project: {load:?}"
    );
    // Ownership is stable: renewals keep every project where it is.
    std::thread::sleep(Duration::from_secs(LEASE_SECS * 2));
    for (p, &o) in &owners {
        assert_eq!(wait_owner(&f, p, &commits[p], Duration::from_secs(10)), o);
    }

    // Kill the busiest agent, as a machine dies: its leases run out and the others take them.
    let victim = (0..f.len()).max_by_key(|&i| load[i]).unwrap();
    let lost: Vec<String> = owners
        .iter()
        .filter(|(_, &o)| o == victim)
        .map(|(p, _)| p.clone())
        .collect();
    f.kill(victim);
    let killed = Instant::now();
    for p in &lost {
        let new_owner = wait_owner(&f, p, &commits[p], Duration::from_secs(LEASE_SECS * 8));
        assert_ne!(new_owner, victim);
        let page = f.published(new_owner, p, "index.html").unwrap_or_default();
        assert!(
            page.contains(&format!("{p} v1")),
            "{p} rebuilt on {}: {page}",
            f.id(new_owner)
        );
        owners.insert(p.clone(), new_owner);
    }
    eprintln!(
        "{} projects of {} back on the others {:?} after it died (lease {LEASE_SECS} s)",
        lost.len(),
        f.id(victim),
        killed.elapsed()
    );
    // The survivors' own projects did not move.
    for (p, &o) in &owners {
        assert_eq!(
            wait_owner(&f, p, &commits[p], Duration::from_secs(10)),
            o,
            "{p} moved"
        );
    }

    // A push to a taken-over project builds on its new owner.
    let p = &lost[0];
    let c2 = repos[p].commit_file("index.html", format!("<h1>{p} v2</h1>\n"));
    f.push(&repos[p], p);
    let o = wait_owner(&f, p, &c2, Duration::from_secs(60));
    assert_eq!(o, owners[p]);
    let page = f.published(o, p, "index.html").unwrap_or_default();
    assert!(page.contains(&format!("{p} v2")), "{page}");

    // Health says who this agent is and what it holds.
    let h = http("GET", &format!("{}/healthz", f.url(o)), &[], b"").json();
    assert_eq!(h["leases"]["agent"], f.id(o), "{h:#}");
    let held = owners.values().filter(|&&x| x == o).count();
    assert_eq!(h["leases"]["held"].as_u64(), Some(held as u64), "{h:#}");
}

#[test]
fn leases_on_a_store_that_cannot_replace_conditionally_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("kiln-agent"))
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--store")
        .arg(dir.path().join("store"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--publish-dir")
        .arg(dir.path().join("www"))
        .args(["--webhook-secret", "0123456789abcdef0123"])
        .args(["--sandbox-user", "65534:65534", "--lease-secs", "30"])
        .output()
        .expect("running kiln-agent");
    assert!(
        !out.status.success(),
        "an agent with leases on a file store started"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("KILN_LEASE_SECS") && said.contains("conditionally"),
        "the refusal does not say what to change:\n{said}"
    );
}

/// What the front door serves at `/preview/<project>/`, once it is a 200 containing `want`.
fn wait_served(door: &Nginx, project: &str, want: &str, timeout: Duration) -> Response {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        let r = door.get(&format!("/preview/{project}/"), &[]);
        if r.status == 200 && r.body.contains(want) {
            return r;
        }
        last = Some((r.status, r.body));
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the front door did not serve {want:?} for {project} within {timeout:?}; last: {last:?}\n{}",
        door.error_log()
    );
}

#[test]
fn a_front_door_sends_each_preview_to_the_machine_that_builds_it_and_follows_a_takeover() {
    let az = Azurite::start();
    az.create_container("door");
    let mut f = Fleet::start_with_previews(&az, "door", 3, LEASE_SECS);
    let door = f.front_door();
    let work = tempfile::tempdir().unwrap();

    // Unknown to every agent: no machine serves it, and the door says so rather than erring.
    let r = door.get("/preview/nobody-has-this/", &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("No build machine serves this project"),
        "{}",
        r.body
    );

    let mut owners = BTreeMap::new();
    for n in 0..4 {
        let p = format!("routed-{n}");
        let repo = Repo::init(&work.path().join(&p));
        let c = repo.commit_file("index.html", format!("<h1>{p} v1</h1>\n"));
        f.push(&repo, &p);
        let owner = wait_owner(&f, &p, &c, Duration::from_secs(60));
        // Served through the door from the owner's disk alone: no other machine has it.
        let r = wait_served(&door, &p, &format!("{p} v1"), Duration::from_secs(10));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{r:?}");
        for i in (0..f.len()).filter(|&i| i != owner) {
            assert!(
                f.published(i, &p, "index.html").is_none(),
                "{p} also on {}",
                f.id(i)
            );
        }
        owners.insert(p, owner);
    }

    // The machine of one project dies: agent and nginx. The door serves it again from the agent
    // that takes the lease over.
    let (p, &victim) = owners.iter().next().unwrap();
    f.kill(victim);
    let killed = Instant::now();
    wait_served(
        &door,
        p,
        &format!("{p} v1"),
        Duration::from_secs(LEASE_SECS * 8),
    );
    eprintln!(
        "{p} served through the front door again {:?} after its machine died",
        killed.elapsed()
    );
    // Every other project is still served.
    for q in owners.keys() {
        wait_served(
            &door,
            q,
            &format!("{q} v1"),
            Duration::from_secs(LEASE_SECS * 8),
        );
    }
}
