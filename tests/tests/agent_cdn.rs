//! Previews with no VM in the path: the agent mirrors each project's served build into a
//! public Azurite container (what a CDN would use as its origin), read here anonymously as a
//! CDN reads it. Previews are under `/preview/` here, so a project's files are under
//! `preview/<project>/` in the container.

use std::time::{Duration, Instant};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(120);
const CDN: &str = "cdn";

fn cdn_args(cdn: &Azurite) -> Vec<String> {
    vec![
        "--cdn-store".into(),
        format!("az://{CDN}"),
        "--cdn-url".into(),
        cdn.container_url(CDN),
        "--preview-url".into(),
        "http://127.0.0.1:9/preview".into(),
    ]
}

/// Waits until the project's status says the CDN serves `build`.
fn wait_mirrored(stack: &Stack, project: &str, build: &serde_json::Value, within: Duration) {
    let started = Instant::now();
    loop {
        let st = stack.status(project);
        if st["cdn"]["build"] == *build && st["cdn"]["mirroring"] == false {
            assert!(st["cdn"]["error"].is_null(), "{st:#}");
            return;
        }
        assert!(
            started.elapsed() < within,
            "build {build} was not mirrored to the CDN store within {within:?}: {st:#}\n{}",
            stack.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The keys of the `<base>assets/...` files an HTML page loads (the preview's path is the
/// key's: `preview/<project>/`).
fn assets_of(page: &str, project: &str) -> Vec<String> {
    referenced_assets(page, &format!("/preview/{project}/"))
        .into_iter()
        .map(|a| format!("preview/{project}/assets/{a}"))
        .collect()
}

#[test]
fn the_served_build_is_mirrored_to_a_public_container_assets_before_pages_with_cdn_headers() {
    let az = Azurite::start();
    az.create_container("kiln");
    az.create_public_container(CDN);
    let args = cdn_args(&az);
    let stack = Stack::start_on_azurite(
        &az,
        "kiln",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "shop");
    let v1 = stack.wait_settled("shop", &app.head(), COLD);
    assert_eq!(v1["state"], "ready", "{v1:#}\n{}", stack.build_log("shop"));
    wait_mirrored(&stack, "shop", &v1["build"], WARM);
    assert_eq!(
        stack.status("shop")["cdn"]["url"],
        format!("{}/preview/shop/", az.container_url(CDN))
    );

    // What the CDN would serve: the page as nginx serves it, with headers a CDN passes on.
    let page = az.public_get(CDN, "preview/shop/index.html");
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(
        Some(page.body.as_str()),
        stack.published("shop", "index.html").as_deref()
    );
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    let v1_assets = assets_of(&page.body, "shop");
    assert!(
        v1_assets.iter().any(|a| a.ends_with(".js"))
            && v1_assets.iter().any(|a| a.ends_with(".css")),
        "the page loads no script or style: {}",
        page.body
    );
    for key in &v1_assets {
        let r = az.public_get(CDN, key);
        assert_eq!(r.status, 200, "{key}: {}", r.body);
        let rel = key.strip_prefix("preview/shop/").unwrap();
        assert_eq!(
            Some(r.body.as_str()),
            stack.published("shop", rel).as_deref(),
            "{key}"
        );
        let want = if key.ends_with(".js") {
            "text/javascript; charset=utf-8"
        } else {
            "text/css; charset=utf-8"
        };
        assert_eq!(r.header("content-type"), Some(want), "{key}");
        assert_eq!(
            r.header("cache-control"),
            Some("public, max-age=31536000, immutable"),
            "{key}"
        );
    }
    // publish's precompressed copies are nginx's business; a CDN compresses for itself.
    assert_eq!(az.public_get(CDN, "preview/shop/index.html.gz").status, 404);

    // A one-file change: every page the CDN hands out meanwhile loads only assets it has.
    app.commit_file(
        "src/text.ts",
        "export const TEXT: string = \"mirrored change\";\n",
    );
    stack.push(&app, "shop");
    let started = Instant::now();
    let mut pages_seen = 0;
    let v2 = loop {
        let page = az.public_get(CDN, "preview/shop/index.html");
        assert_eq!(page.status, 200, "the page vanished mid-mirror");
        for key in assets_of(&page.body, "shop") {
            let r = az.public_get(CDN, &key);
            assert_eq!(r.status, 200, "the CDN's page loads {key}, which it lacks");
        }
        pages_seen += 1;
        let st = stack.status("shop");
        if st["state"] == "ready"
            && st["commit"] == app.head().as_str()
            && st["cdn"]["build"] == st["build"]
        {
            break st;
        }
        assert!(started.elapsed() < WARM, "{st:#}\n{}", stack.agent_log());
    };
    assert!(pages_seen > 1);
    let page = az.public_get(CDN, "preview/shop/index.html");
    let v2_assets = assets_of(&page.body, "shop");
    assert_ne!(v1_assets, v2_assets, "a new build, new hashed names");
    let script = v2_assets.iter().find(|a| a.ends_with(".js")).unwrap();
    assert!(az.public_get(CDN, script).body.contains("mirrored change"));
    // A tab still showing the old page can load what it asks for.
    for key in &v1_assets {
        assert_eq!(az.public_get(CDN, key).status, 200, "{key} is gone already");
    }

    // A rollback moves the CDN too.
    let r = http(
        "POST",
        &format!("{}/api/projects/shop/rollback", stack.agent_url()),
        &[
            ("Authorization", &format!("Bearer {}", stack.token)),
            ("Content-Type", "application/json"),
        ],
        format!(r#"{{"build": {}}}"#, v1["build"]).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_mirrored(&stack, "shop", &v1["build"], WARM);
    assert_eq!(
        assets_of(&az.public_get(CDN, "preview/shop/index.html").body, "shop"),
        v1_assets
    );
    let m = stack.agent_http("GET", "/metrics").body;
    assert!(
        m.lines().any(|l| l == "kiln_agent_cdn_mirrors_total 3"),
        "{m}"
    );
    let _ = v2;
}

#[test]
fn a_mirror_cut_short_by_a_crash_is_finished_after_restart_and_a_deleted_project_leaves_the_cdn() {
    let az = Azurite::start();
    az.create_container("kiln");
    // Its own service, so it can stop answering while the project's store goes on.
    let mut cdn = Azurite::start();
    cdn.create_public_container(CDN);
    let args = cdn_args(&cdn);
    let mut stack = Stack::start_on_azurite_with_env(
        &az,
        "kiln",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &cdn.env_with_prefix("KILN_CDN_"),
    );
    let tmp = tempfile::tempdir().unwrap();
    let site = Repo::init(&tmp.path().join("site"));
    site.write("index.html", "<!doctype html><p>one</p>\n");
    site.write("about.html", "<!doctype html><p>about</p>\n");
    site.git_ok(&["add", "-A"]);
    site.git_ok(&["commit", "-q", "-m", "one"]);
    stack.push(&site, "blog");
    let v1 = stack.wait_settled("blog", &site.head(), WARM);
    assert_eq!(v1["state"], "ready", "{v1:#}");
    wait_mirrored(&stack, "blog", &v1["build"], WARM);
    assert_eq!(cdn.public_get(CDN, "preview/blog/about.html").status, 200);

    // The CDN's store stops answering: the preview on the VM does not wait for it.
    cdn.stop();
    site.write("index.html", "<!doctype html><p>two</p>\n");
    site.git_ok(&["rm", "-q", "about.html"]);
    site.git_ok(&["commit", "-q", "-am", "two"]);
    stack.push(&site, "blog");
    let v2 = stack.wait_settled("blog", &site.head(), WARM);
    assert_eq!(v2["state"], "ready", "{v2:#}");
    assert!(stack
        .published("blog", "index.html")
        .is_some_and(|p| p.contains("two")));
    assert_eq!(v2["cdn"]["build"], v1["build"], "{v2:#}");
    // The agent dies mid-mirror; the store comes back; the restarted agent finishes the job.
    stack.kill_agent();
    cdn.resume();
    assert!(cdn
        .public_get(CDN, "preview/blog/index.html")
        .body
        .contains("one"));
    stack.restart_agent();
    wait_mirrored(&stack, "blog", &v2["build"], WARM);
    assert!(cdn
        .public_get(CDN, "preview/blog/index.html")
        .body
        .contains("two"));
    assert_eq!(
        cdn.public_get(CDN, "preview/blog/about.html").status,
        404,
        "a page the served build no longer has is still on the CDN"
    );

    // Deleting the project takes it off the CDN as well as off the VM.
    let r = stack
        .gitstore
        .http("DELETE", "/api/projects/blog", Some(&stack.token), None);
    assert!(
        r.status == 200 || r.status == 202 || r.status == 204,
        "{}",
        r.body
    );
    let started = Instant::now();
    while cdn.public_get(CDN, "preview/blog/index.html").status != 404 {
        assert!(
            started.elapsed() < WARM,
            "the deleted project is still on the CDN\n{}",
            stack.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
