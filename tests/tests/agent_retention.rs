//! Retention, eviction, quotas, deleted projects and view share links, end to end: real pushes
//! through gitstore, real builds by the agent, manifests written into the file store the way
//! gitstore's metadata, share and delete operations write them, and what nginx serves.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(180);
const ADMIN: &str = "kiln-retention-test-admin-token";

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A site without package.json: published as it is, so builds take a moment.
fn static_site(path: &Path, text: &str) -> Repo {
    let r = Repo::init(path);
    r.commit_file("index.html", page(text));
    r
}

fn page(text: &str) -> String {
    format!("<!doctype html><html><head><title>t</title></head><body><p>{text}</p></body></html>\n")
}

fn push_and_settle(stack: &Stack, repo: &Repo, project: &str, timeout: Duration) -> u64 {
    stack.push(repo, project);
    let st = stack.wait_settled(project, &repo.head(), timeout);
    assert_eq!(st["state"], "ready", "{st:#}\n{}", stack.build_log(project));
    st["build"].as_u64().unwrap()
}

/// Build directories on disk, ascending.
fn builds_on_disk(stack: &Stack, project: &str) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(stack.publish_dir().join(project).join("builds"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

fn admin(stack: &Stack, method: &str, path: &str) -> Response {
    let auth = format!("Bearer {ADMIN}");
    http(
        method,
        &format!("{}{path}", stack.agent_url()),
        &[("Authorization", &auth)],
        b"",
    )
}

/// Adds a view share of `commit` to the project's manifest, as gitstore's share API will;
/// returns its token.
fn share(stack: &Stack, project: &str, commit: &str, expires_at: Option<u64>) -> String {
    // The shape gitstore's tokens have: a 10-character id and a 32-character secret.
    let id = format!("{:010}", now_nanos() % 10_000_000_000);
    let token = format!("{project}.{id}.{:032}", now_nanos());
    let hash = sha256(&token);
    publish_generation(&stack.gitstore.store_dir(), project, |m| {
        let mut share = serde_json::json!({
            "id": id, "token_sha256": hash, "commit": commit, "mode": "view",
            "created_at": now_secs(),
        });
        if let Some(e) = expires_at {
            share["expires_at"] = e.into();
        }
        shares_of(m).push(share);
    });
    token
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn shares_of(m: &mut serde_json::Value) -> &mut Vec<serde_json::Value> {
    if !m["shares"].is_array() {
        m["shares"] = serde_json::json!([]);
    }
    m["shares"].as_array_mut().unwrap()
}

fn revoke(stack: &Stack, project: &str, token: &str) {
    let hash = sha256(token);
    publish_generation(&stack.gitstore.store_dir(), project, |m| {
        for s in shares_of(m).iter_mut() {
            if s["token_sha256"] == hash.as_str() {
                s["revoked_at"] = now_secs().into();
            }
        }
    });
}

fn open_share(stack: &Stack, token: &str) -> Response {
    http(
        "GET",
        &format!("{}/share/{token}", stack.agent_url()),
        &[("Accept", "application/json")],
        b"",
    )
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// nginx in front of the stack, serving its publish dir at `url` (`http://127.0.0.1:<port>/preview`).
fn nginx_for(stack: &Stack, port: u16, url: &str) -> Nginx {
    // The stack's temp dir is 0700; production's publish dir sits under the agent's 0711 state
    // dir, which nginx's workers can pass through.
    set_mode(stack.publish_dir().parent().unwrap(), 0o711);
    Nginx::start(
        port,
        &stack.publish_dir(),
        &[
            "--preview-url",
            url,
            "--gitstore-listen",
            stack.gitstore.base_url().trim_start_matches("http://"),
            "--agent-listen",
            stack.agent_url().trim_start_matches("http://"),
        ],
    )
}

/// The report and its entry for `project`, once the project is idle: a build ends (and is
/// ready) a moment before the agent is done with it (it measures the project's directories),
/// and a pass leaves a busy project alone.
fn idle_entry(stack: &Stack, path: &str, project: &str) -> (serde_json::Value, serde_json::Value) {
    let started = Instant::now();
    loop {
        let report = admin(stack, "GET", path);
        assert_eq!(report.status, 200, "{}", report.body);
        let report = report.json();
        let entry = report["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["project"] == project)
            .unwrap_or_else(|| panic!("{project} is not in the report: {report:#}"))
            .clone();
        if entry["idle"] == true {
            return (report, entry);
        }
        assert_eq!(
            entry["evict"], false,
            "a busy project is never evicted: {entry:#}"
        );
        assert!(entry["retire"].as_array().unwrap().is_empty(), "{entry:#}");
        assert!(started.elapsed() < WARM, "never idle: {entry:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn keeps_the_newest_and_shared_builds_and_the_report_matches_what_a_run_frees() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/preview");
    let stack = Stack::start_with(&[
        "--preview-url",
        &url,
        "--keep-builds",
        "2",
        "--keep-builds-secs",
        "0",
        "--admin-token-sha256",
        &sha256(ADMIN),
    ]);
    let nginx = nginx_for(&stack, port, &url);
    let tmp = tempfile::tempdir().unwrap();
    let site = static_site(&tmp.path().join("site"), "version 1");
    let c1 = site.head();
    let b1 = push_and_settle(&stack, &site, "kept", COLD);
    site.commit_file("index.html", page("version 2"));
    let b2 = push_and_settle(&stack, &site, "kept", WARM);

    // A share pins the first version. The generation that adds it moves no branch: its sync
    // builds nothing.
    let token = share(&stack, "kept", &c1, None);
    let r = stack.sync("kept");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "ready", "{}", r.body);
    assert_eq!(stack.status("kept")["build"], b2, "no build for a share");

    site.commit_file("index.html", page("version 3"));
    let b3 = push_and_settle(&stack, &site, "kept", WARM);
    site.commit_file("index.html", page("version 4"));
    let b4 = push_and_settle(&stack, &site, "kept", WARM);

    // The newest two (current and one before) and the shared one stay; build 2 is retired.
    assert_eq!(builds_on_disk(&stack, "kept"), vec![b1, b3, b4]);
    let pinned = |b: u64| nginx.get(&format!("/preview/kept/b/{b}/"), &[]);
    assert_eq!(pinned(b2).status, 404, "a retired build is gone");
    for (b, text) in [(b1, "version 1"), (b3, "version 3"), (b4, "version 4")] {
        let r = pinned(b);
        assert_eq!(r.status, 200, "build {b}: {}", r.body);
        assert!(r.body.contains(text), "build {b}: {}", r.body);
    }
    let r = nginx.get("/preview/kept/", &[]);
    assert!(
        r.status == 200 && r.body.contains("version 4"),
        "{}",
        r.body
    );

    // The share link, through the front door, leads to the shared build's pinned URL.
    let r = nginx.get(&format!("/share/{token}"), &[]);
    assert_eq!(r.status, 302, "{}", r.body);
    assert_eq!(
        r.header("location"),
        Some(format!("{url}/kept/b/{b1}/").as_str())
    );

    // Revoked, the share pins nothing: the report says the run would retire build 1, and the
    // run frees exactly that.
    revoke(&stack, "kept", &token);
    assert_eq!(stack.sync("kept").status, 200);
    let (report, entry) = idle_entry(&stack, "/api/retention", "kept");
    assert_eq!(report["ran"], false, "{report:#}");
    assert_eq!(entry["retire"].as_array().unwrap().len(), 1, "{entry:#}");
    assert_eq!(entry["retire"][0]["build"], b1, "{entry:#}");
    assert!(entry["retire_bytes"].as_u64().unwrap() > 0, "{entry:#}");
    assert!(
        report["disk"]["used_percent"].as_f64().is_some(),
        "{report:#}"
    );
    assert_eq!(
        builds_on_disk(&stack, "kept"),
        vec![b1, b3, b4],
        "a report changes nothing"
    );

    let run = admin(&stack, "POST", "/api/retention/run");
    assert_eq!(run.status, 200, "{}", run.body);
    let run = run.json();
    assert_eq!(run["ran"], true, "{run:#}");
    let freed = run["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["project"] == "kept")
        .unwrap_or_else(|| panic!("kept is not in the run: {run:#}"))
        .clone();
    assert_eq!(freed["retire"], entry["retire"], "{run:#}");
    assert_eq!(
        run["totals"]["build_bytes"],
        report["totals"]["build_bytes"]
    );
    assert_eq!(builds_on_disk(&stack, "kept"), vec![b3, b4]);
    assert_eq!(pinned(b1).status, 404);
    assert_eq!(pinned(b3).status, 200);
    let r = nginx.get(&format!("/share/{token}"), &[]);
    assert_eq!(r.status, 410, "{}", r.body);

    // Clients cannot read or run it.
    let r = stack.agent_http("GET", "/api/retention");
    assert_eq!(r.status, 403, "{}", r.body);

    // The operator's view of the same report.
    let kiln = |args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("kiln"));
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("KILN_AGENT_URL", stack.agent_url())
            .env("KILN_ADMIN_TOKEN", ADMIN)
            .args(args);
        let out = kiln_tests::run(&mut cmd);
        assert!(out.ok, "kiln {args:?}: {}", out.stderr);
        out.stdout
    };
    let table = kiln(&["gc"]);
    eprintln!("kiln gc:\n{table}");
    assert!(
        table.contains("PROJECT") && table.contains("kept"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&kiln(&["gc", "--json"])).unwrap();
    assert_eq!(json["ran"], false, "{json:#}");
    assert_eq!(
        json["totals"]["builds"], 0,
        "nothing left to retire: {json:#}"
    );
}

#[test]
fn a_view_share_of_a_version_no_longer_kept_builds_it_at_its_pinned_url_only() {
    let stack = Stack::start_with(&["--keep-builds", "1", "--keep-builds-secs", "0"]);
    let tmp = tempfile::tempdir().unwrap();
    let site = static_site(&tmp.path().join("site"), "first version");
    let c1 = site.head();
    push_and_settle(&stack, &site, "shared", COLD);
    site.commit_file("index.html", page("second version"));
    let b2 = push_and_settle(&stack, &site, "shared", WARM);
    assert_eq!(builds_on_disk(&stack, "shared"), vec![b2]);

    let token = share(&stack, "shared", &c1, None);
    let r = open_share(&stack, &token);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(r.json()["state"], "building");
    let started = Instant::now();
    let location = loop {
        let r = open_share(&stack, &token);
        if r.status == 302 {
            break r.header("location").unwrap().to_owned();
        }
        assert_eq!(r.status, 202, "{}", r.body);
        assert!(
            started.elapsed() < WARM,
            "the shared version was never built"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let st = stack.status("shared");
    let b3 = st["build"].as_u64().unwrap();
    assert_eq!(st["commit"], c1.as_str(), "{st:#}");
    assert!(
        location.ends_with(&format!("/shared/b/{b3}/")),
        "{location}"
    );
    let root = stack.publish_dir().join("shared");
    let pinned = std::fs::read_to_string(root.join(format!("builds/{b3}/index.html"))).unwrap();
    assert!(pinned.contains("first version"), "{pinned}");
    // The preview itself still serves the branch's head.
    assert_eq!(
        std::fs::read_link(root.join("current")).unwrap(),
        PathBuf::from(format!("builds/{b2}"))
    );
    assert!(stack
        .published("shared", "index.html")
        .unwrap()
        .contains("second version"));
    assert_eq!(st["last_good"]["build"], b2, "{st:#}");
    // Shared, it survives retention next to the newest build.
    site.commit_file("index.html", page("third version"));
    let b4 = push_and_settle(&stack, &site, "shared", WARM);
    assert_eq!(builds_on_disk(&stack, "shared"), vec![b3, b4]);
}

#[test]
fn rejects_revoked_expired_and_unknown_share_links() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let site = static_site(&tmp.path().join("site"), "shared text");
    let c1 = site.head();
    let b1 = push_and_settle(&stack, &site, "links", COLD);
    let live = share(&stack, "links", &c1, None);
    let expired = share(&stack, "links", &c1, Some(now_secs() - 10));
    let revoked = share(&stack, "links", &c1, None);
    revoke(&stack, "links", &revoked);
    assert_eq!(stack.sync("links").status, 200);

    let r = open_share(&stack, &live);
    assert_eq!(r.status, 302, "{}", r.body);
    assert!(r
        .header("location")
        .unwrap()
        .ends_with(&format!("/links/b/{b1}/")));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    for (token, status) in [
        (expired.as_str(), 410),
        (revoked.as_str(), 410),
        ("links.nope.not-a-secret", 404),
        ("not-a-token", 404),
        ("other-project.x.y", 404),
    ] {
        let r = open_share(&stack, token);
        assert_eq!(r.status, status, "{token}: {}", r.body);
        assert!(r.json()["message"].is_string(), "{}", r.body);
    }
    // A browser gets a short page.
    let r = http(
        "GET",
        &format!("{}/share/{revoked}", stack.agent_url()),
        &[],
        b"",
    );
    assert_eq!(r.status, 410);
    assert!(r.body.contains("revoked"), "{}", r.body);
}

#[test]
fn eviction_frees_an_idle_projects_worktree_and_node_modules_and_the_next_push_rebuilds_it() {
    let stack = Stack::start_with(&["--admin-token-sha256", &sha256(ADMIN)]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    push_and_settle(&stack, &app, "evicted", COLD);
    let project = stack.state_dir().join("projects/evicted");
    let install: serde_json::Value =
        serde_json::from_slice(&std::fs::read(project.join("install.json")).unwrap()).unwrap();
    let nm = shared_volume()
        .join("nm")
        .join(install["nm"].as_str().unwrap());
    assert!(nm.join("node_modules").is_dir());
    assert!(project.join("worktree/package.json").is_file());

    // What a pass evicting every idle project would free, then the pass.
    let (_, entry) = idle_entry(&stack, "/api/retention?evict=all", "evicted");
    assert_eq!(entry["evict"], true, "{entry:#}");
    let (wt, nmb) = (
        entry["worktree_bytes"].as_u64().unwrap(),
        entry["node_modules_bytes"].as_u64().unwrap(),
    );
    assert!(wt > 0 && nmb > wt, "{entry:#}");
    assert!(nm.join("node_modules").is_dir(), "a report evicts nothing");

    let run = admin(&stack, "POST", "/api/retention/run?evict=all");
    assert_eq!(run.status, 200, "{}", run.body);
    let run = run.json();
    let done = run["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["project"] == "evicted")
        .unwrap_or_else(|| panic!("not in the run: {run:#}"))
        .clone();
    assert_eq!(done["evict"], true, "{run:#}");
    assert_eq!(
        (
            done["worktree_bytes"].clone(),
            done["node_modules_bytes"].clone()
        ),
        (
            entry["worktree_bytes"].clone(),
            entry["node_modules_bytes"].clone()
        ),
        "the run frees what the report said"
    );
    // Its node_modules linked the store's files: the store is pruned after the eviction.
    assert_eq!(run["prune"]["ran"], true, "{run:#}");
    assert!(!project.join("worktree").exists());
    assert!(!nm.exists());
    assert!(!project.join("install.json").exists());
    // The published preview is not the worktree's: it still serves.
    assert!(stack.published("evicted", "index.html").is_some());
    assert_eq!(stack.status("evicted")["state"], "ready");

    // The next push checks out and installs from scratch, and builds the change.
    app.commit_file(
        "src/text.ts",
        "export const TEXT: string = 'after eviction'\n",
    );
    push_and_settle(&stack, &app, "evicted", COLD);
    let st = stack.status("evicted");
    assert_eq!(st["install"], "ran", "{st:#}");
    let log = stack.build_log("evicted");
    assert!(log.contains("(full checkout)"), "{log}");
    let assets = stack.publish_dir().join("evicted/current/assets");
    let js: String = std::fs::read_dir(&assets)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "js"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(js.contains("after eviction"));
}

#[test]
fn the_disk_check_after_a_build_evicts_idle_projects_past_the_high_water_mark() {
    // At 0 % every idle project is past the mark.
    let stack = Stack::start_with(&["--disk-high-water", "0"]);
    let tmp = tempfile::tempdir().unwrap();
    let site = static_site(&tmp.path().join("site"), "before");
    push_and_settle(&stack, &site, "pressed", COLD);
    let worktree = stack.state_dir().join("projects/pressed/worktree");
    let started = Instant::now();
    while worktree.exists() {
        assert!(started.elapsed() < WARM, "the worktree was never evicted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stack
        .published("pressed", "index.html")
        .unwrap()
        .contains("before"));
    site.commit_file("index.html", page("after"));
    push_and_settle(&stack, &site, "pressed", WARM);
    assert!(stack.build_log("pressed").contains("(full checkout)"));
    assert!(stack
        .published("pressed", "index.html")
        .unwrap()
        .contains("after"));
}

#[test]
fn refuses_builds_past_the_clients_hourly_quota_and_says_which() {
    let mut stack = Stack::start_with(&["--quota-builds-per-hour", "2"]);
    let tmp = tempfile::tempdir().unwrap();
    let site = static_site(&tmp.path().join("site"), "hourly");
    let b1 = push_and_settle(&stack, &site, "hourly", COLD);
    let r = stack.agent_http("POST", "/build/hourly");
    assert_eq!(r.status, 202, "{}", r.body);
    let st = stack.wait_settled("hourly", &site.head(), WARM);
    assert!(st["build"].as_u64().unwrap() > b1, "{st:#}");

    let r = stack.agent_http("POST", "/build/hourly");
    assert_eq!(r.status, 429, "{}", r.body);
    let body = r.json();
    assert_eq!(body["error"], "quota", "{body:#}");
    assert_eq!(body["quota"], "builds_per_hour", "{body:#}");
    assert_eq!(
        (body["limit"].as_u64(), body["used"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("2 builds per hour"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");

    // A push is refused the same way, and the project's status says why nothing builds.
    site.commit_file("index.html", page("refused"));
    stack.push(&site, "hourly");
    let started = Instant::now();
    let st = loop {
        let st = stack.status("hourly");
        if st["state"] == "refused" {
            break st;
        }
        assert!(
            started.elapsed() < WARM,
            "the push was never refused: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        st["error"].as_str().unwrap().contains("builds_per_hour"),
        "{st:#}"
    );
    assert_eq!(st["commit"], site.head().as_str(), "{st:#}");
    let r = stack.sync("hourly");
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["quota"], "builds_per_hour");

    // A restart neither resets the hour nor lets the refused push through: the agent catches
    // up with the store when it starts, and the refused project still goes through the quota.
    stack.restart_agent();
    let started = Instant::now();
    // The log is appended to across restarts: the second start's line.
    while stack
        .agent_log()
        .matches("reconciled with the blob store")
        .count()
        < 2
    {
        assert!(
            started.elapsed() < WARM,
            "never reconciled:\n{}",
            stack.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = stack.agent_http("POST", "/build/hourly");
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(
        (r.json()["quota"].as_str(), r.json()["used"].as_u64()),
        (Some("builds_per_hour"), Some(2))
    );
    let st = stack.status("hourly");
    assert_eq!(st["state"], "refused", "{st:#}");
    assert!(!stack
        .published("hourly", "index.html")
        .unwrap()
        .contains("refused"));
}

#[test]
fn refuses_a_second_concurrent_build_of_the_same_client() {
    let stack = Stack::start_with(&["--quota-concurrent-builds", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let other = static_site(&tmp.path().join("other"), "other");
    push_and_settle(&stack, &other, "other", COLD);

    // A build that takes seconds, so the second request finds it running.
    let slow = Repo::init(&tmp.path().join("slow"));
    slow.write(
        "package.json",
        r#"{"name":"slow","version":"1.0.0","private":true,"scripts":{"build":"sleep 6 && mkdir -p dist && echo '<!doctype html><p>slow</p>' > dist/index.html"}}"#,
    );
    slow.git_ok(&["add", "-A"]);
    slow.git_ok(&["commit", "-q", "-m", "slow build"]);
    stack.push(&slow, "slow");
    let started = Instant::now();
    loop {
        let r = stack.agent_http("GET", "/status/slow");
        if r.status == 200 && r.json()["state"] == "building" {
            break;
        }
        assert!(
            started.elapsed() < COLD,
            "slow never started building: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = stack.agent_http("POST", "/build/other");
    assert_eq!(r.status, 429, "{}", r.body);
    let body = r.json();
    assert_eq!(body["quota"], "concurrent_builds", "{body:#}");
    assert_eq!(
        (body["limit"].as_u64(), body["used"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(r.header("retry-after").is_some());
    // A follow-up of the project already building adds no concurrency.
    let r = stack.agent_http("POST", "/build/slow");
    assert_eq!(r.status, 202, "{}", r.body);

    let st = stack.wait_settled("slow", &slow.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}\n{}", stack.build_log("slow"));
    let r = stack.agent_http("POST", "/build/other");
    assert_eq!(r.status, 202, "once it ended: {}", r.body);
}

#[test]
fn a_deleted_project_is_unpublished_then_rebuilt_when_restored_and_forgotten_when_purged() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let site = static_site(&tmp.path().join("site"), "deleted text");
    push_and_settle(&stack, &site, "doomed", COLD);
    let published = stack.publish_dir().join("doomed");
    let state = stack.state_dir().join("projects/doomed");
    assert!(published.join("current/index.html").is_file());

    publish_generation(&stack.gitstore.store_dir(), "doomed", |m| {
        m["deleted_at"] = now_secs().into();
    });
    let r = stack.sync("doomed");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "deleted");
    assert!(!published.exists(), "still published");
    assert!(
        !state.exists(),
        "its worktree, repository and status are still there"
    );
    for path in ["/status/doomed", "/api/projects/doomed/versions"] {
        let r = stack.agent_http("GET", path);
        assert_eq!(r.status, 410, "{path}: {}", r.body);
        assert_eq!(r.json()["error"], "deleted");
    }
    let r = stack.agent_http("POST", "/build/doomed");
    assert_eq!(r.status, 410, "{}", r.body);

    // Restored: the same commit is built again.
    publish_generation(&stack.gitstore.store_dir(), "doomed", |m| {
        m.as_object_mut().unwrap().remove("deleted_at");
    });
    let r = stack.sync("doomed");
    assert_eq!(r.status, 202, "{}", r.body);
    let st = stack.wait_settled("doomed", &site.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert!(stack
        .published("doomed", "index.html")
        .unwrap()
        .contains("deleted text"));

    // Purged: its manifests are gone from the store, and everything of it here too.
    std::fs::remove_dir_all(stack.gitstore.store_dir().join("projects/doomed")).unwrap();
    let r = stack.sync("doomed");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "purged");
    assert!(!published.exists() && !state.exists());
    assert_eq!(stack.sync("doomed").status, 404);
}

/// Projects in a dry-run report that would evict every idle one, in the order a pass evicts
/// them.
fn eviction_order(stack: &Stack, projects: &[&str]) -> Vec<String> {
    for p in projects {
        idle_entry(stack, "/api/retention?evict=all", p);
    }
    let report = admin(stack, "GET", "/api/retention?evict=all").json();
    report["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["project"].as_str().map(str::to_owned))
        .filter(|p| projects.contains(&p.as_str()))
        .collect()
}

#[test]
fn page_views_nginx_reports_show_in_the_project_api_and_move_a_project_last_in_line_for_eviction() {
    let stack = Stack::start_with(&["--admin-token-sha256", &sha256(ADMIN)]);
    let port = free_port();
    let nginx = nginx_for(&stack, port, &format!("http://127.0.0.1:{port}/preview"));
    let tmp = tempfile::tempdir().unwrap();
    let a = static_site(&tmp.path().join("a"), "a");
    push_and_settle(&stack, &a, "looked-at", COLD);
    let b = static_site(&tmp.path().join("b"), "b");
    b.commit_file("style.css", "p { color: teal }\n");
    push_and_settle(&stack, &b, "unseen", COLD);
    assert_eq!(
        eviction_order(&stack, &["looked-at", "unseen"]),
        ["looked-at", "unseen"],
        "never viewed: least recently built goes first"
    );
    let project = |p: &str| {
        let r = stack.gitstore.http(
            "GET",
            &format!("/api/projects/{p}"),
            Some(&stack.token),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    assert_eq!(
        project("looked-at")["build"]["last_viewed_at"],
        serde_json::Value::Null
    );

    let before = now_secs();
    // An asset is not a page view; sent first, so it would be recorded before the page.
    let css = nginx.get("/preview/unseen/style.css", &[]);
    assert_eq!(css.status, 200, "{}", css.body);
    let page = nginx.get("/preview/looked-at/", &[]);
    assert_eq!(page.status, 200, "{}", page.body);
    let started = Instant::now();
    let viewed_at = loop {
        if let Some(t) = project("looked-at")["build"]["last_viewed_at"].as_u64() {
            break t;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the view never reached the project API: {:#}\n{}",
            project("looked-at"),
            stack.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        (before..=now_secs()).contains(&viewed_at),
        "{viewed_at} not in {before}.."
    );
    let st = stack.status("looked-at");
    assert_eq!(
        st["last_viewed_at_ms"].as_u64().map(|ms| ms / 1000),
        Some(viewed_at),
        "{st:#}"
    );
    assert_eq!(
        project("unseen")["build"]["last_viewed_at"],
        serde_json::Value::Null
    );
    let metrics = stack.agent_http("GET", "/metrics").body;
    assert!(
        metrics.contains("kiln_agent_preview_views_total 1\n"),
        "{metrics}"
    );

    assert_eq!(
        eviction_order(&stack, &["looked-at", "unseen"]),
        ["unseen", "looked-at"],
        "the project just viewed is evicted last"
    );
}
