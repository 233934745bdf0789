//! The agent end to end: a real push through gitstore, the webhook, real pnpm and Vite in the
//! sandbox, and the published preview on disk.

use std::time::Duration;

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(120);

#[test]
fn push_builds_a_preview_and_a_one_file_change_skips_install() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "shop");
    let c1 = app.head();
    let st = stack.wait_settled("shop", &c1, COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["install"], "ran", "{st:#}");
    assert_eq!(st["engine"], "fast", "{st:#}");
    for phase in ["sync", "checkout", "install", "build", "publish"] {
        assert!(
            st["phases"][phase].is_u64(),
            "phase {phase} missing: {st:#}"
        );
    }
    assert_eq!(st["last_good"]["commit"], c1.as_str());
    assert!(
        st["peak_memory_bytes"].as_u64().unwrap() > 10 << 20,
        "{st:#}"
    );
    let index = stack
        .published("shop", "index.html")
        .expect("index.html published");
    assert!(
        index.contains("/shop/assets/"),
        "base path not applied: {index}"
    );
    assert!(stack.published_assets("shop", "js").contains("first text"));
    assert!(
        stack
            .publish_dir()
            .join("shop/current/index.html.gz")
            .is_file()
            || index.len() < 256,
        "text assets are precompressed"
    );

    app.commit_file("src/text.ts", "export const TEXT: string = 'second text'\n");
    stack.push(&app, "shop");
    let c2 = app.head();
    let st = stack.wait_settled("shop", &c2, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["install"], "skipped", "{st:#}");
    assert!(st["phases"].get("install").is_none(), "{st:#}");
    let bundle = stack.published_assets("shop", "js");
    assert!(bundle.contains("second text") && !bundle.contains("first text"));
    let log = stack.build_log("shop");
    assert!(log.contains("checkout: 1 written, 0 deleted"), "{log}");
    assert!(log.contains("==> build"), "{log}");
}

#[test]
fn a_broken_change_fails_with_the_compilers_error_and_keeps_the_last_good_build() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "broken");
    let good = app.head();
    stack.wait_settled("broken", &good, COLD);

    app.commit_file("src/text.ts", "export const TEXT: string = ;\n");
    stack.push(&app, "broken");
    let bad = app.head();
    let st = stack.wait_settled("broken", &bad, WARM);
    assert_eq!(st["state"], "failed", "{st:#}");
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("text.ts"),
        "the error names the file: {error}"
    );
    assert_eq!(st["last_good"]["commit"], good.as_str(), "{st:#}");
    let log = stack.build_log("broken");
    assert!(
        log.contains("text.ts"),
        "the compiler's error is in the log: {log}"
    );
    assert!(
        stack
            .published_assets("broken", "js")
            .contains("first text"),
        "the previous build stays published"
    );
    // The preview URL says the build failed, with the compiler's message, instead of silently
    // showing the old app.
    let page_path = stack.publish_dir().join("broken/status.html");
    let page =
        std::fs::read_to_string(&page_path).expect("a failure page while the build is broken");
    assert!(page.contains("The last build failed"), "{page}");
    assert!(page.contains("text.ts"), "the page names the file: {page}");
    assert!(
        page.contains("http-equiv=\"refresh\""),
        "the page refreshes itself: {page}"
    );

    app.commit_file("src/text.ts", "export const TEXT: string = 'fixed text'\n");
    stack.push(&app, "broken");
    let st = stack.wait_settled("broken", &app.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert!(
        !page_path.exists(),
        "the failure page is gone once a build is ready"
    );
    assert!(stack
        .published_assets("broken", "js")
        .contains("fixed text"));
}

#[test]
fn a_dependency_change_installs_again() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "deps");
    stack.wait_settled("deps", &app.head(), COLD);

    let out = run(std::process::Command::new("pnpm")
        .current_dir(&app.path)
        .args(["add", "clsx@2.1.1", "--lockfile-only", "--ignore-scripts"]));
    assert!(out.ok, "pnpm add: {}", out.stderr);
    app.write(
        "src/components/Header.tsx",
        "import clsx from 'clsx'\nexport function Header({ title }: { title: string }) {\n  return <h1 className={clsx('title', 'kiln-dep-marker')}>{title}</h1>\n}\n",
    );
    app.git_ok(&["add", "-A"]);
    app.git_ok(&["commit", "-q", "-m", "add clsx"]);
    stack.push(&app, "deps");
    let st = stack.wait_settled("deps", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["install"], "ran", "{st:#}");
    assert!(stack
        .published_assets("deps", "js")
        .contains("kiln-dep-marker"));
}

#[test]
fn hostile_unsigned_and_badly_signed_webhooks_rejected() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "hooks");
    stack.wait_settled("hooks", &app.head(), COLD);
    let url = format!("{}/sync-project/hooks", stack.agent_url());
    let r = http("POST", &url, &[("Content-Type", "application/json")], b"{}");
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("X-Kiln-Signature-256"), "{}", r.body);
    let wrong = format!("sha256={}", "0".repeat(64));
    let r = http("POST", &url, &[("X-Kiln-Signature-256", &wrong)], b"{}");
    assert_eq!(r.status, 401, "{}", r.body);

    // A correctly signed webhook for the commit already built builds nothing.
    let body = format!("{{\"ref\":\"refs/heads/main\",\"new\":\"{}\"}}", app.head());
    let sig = signature(body.as_bytes());
    let r = http(
        "POST",
        &url,
        &[("X-Kiln-Signature-256", &sig)],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "ready");
    let sig = signature(b"{}");
    let r = http("POST", &url, &[("X-Kiln-Signature-256", &sig)], b"{}");
    assert!(matches!(r.status, 200 | 202), "{}", r.body);
}

fn signature(body: &[u8]) -> String {
    format!(
        "sha256={}",
        hmac_sha256_hex(WEBHOOK_SECRET.as_bytes(), body)
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A sync webhook signed the way gitstore signs it, at `ts`.
fn timestamped_webhook(url: &str, ts: u64, signed_ts: u64, body: &[u8]) -> Response {
    let sig = signature(&[format!("{signed_ts}.").as_bytes(), body].concat());
    http(
        "POST",
        url,
        &[
            ("X-Kiln-Timestamp", &ts.to_string()),
            ("X-Kiln-Signature-256", &sig),
        ],
        body,
    )
}

#[test]
fn hostile_replayed_or_stale_webhook_refused() {
    let stack = Stack::start_with(&["--webhook-require-timestamp"]);
    let tmp = tempfile::tempdir().unwrap();
    let site = Repo::init(&tmp.path().join("site"));
    site.commit_file("index.html", "<!doctype html><p>replay</p>\n");
    stack.push(&site, "replayed");
    stack.wait_settled("replayed", &site.head(), COLD);
    let url = format!("{}/sync-project/replayed", stack.agent_url());
    let body = format!(
        "{{\"ref\":\"refs/heads/main\",\"new\":\"{}\"}}",
        site.head()
    );
    let now = unix_now();

    let r = timestamped_webhook(&url, now, now, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    // The same request again, byte for byte, as someone who captured it would send it.
    let r = timestamped_webhook(&url, now, now, body.as_bytes());
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"], "replayed", "{}", r.body);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("make each request unique"));

    // A timestamp moved to dodge the replay check breaks the signature.
    let r = timestamped_webhook(&url, now + 1, now, body.as_bytes());
    assert_eq!(r.status, 401, "{}", r.body);
    // Out of the window, validly signed: refused, saying why.
    let old = now - 3600;
    let r = timestamped_webhook(&url, old, old, body.as_bytes());
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("from this agent's clock"), "{}", r.body);
    let r = http(
        "POST",
        &url,
        &[("X-Kiln-Timestamp", "soon")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("Unix time"), "{}", r.body);
    // Signed over the body alone, which could be replayed forever: refused when required.
    let r = http(
        "POST",
        &url,
        &[("X-Kiln-Signature-256", &signature(body.as_bytes()))],
        body.as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.body.contains("X-Kiln-Timestamp is required"),
        "{}",
        r.body
    );

    // gitstore's own webhooks still arrive: a new push builds.
    site.commit_file("index.html", "<!doctype html><p>after replays</p>\n");
    stack.push(&site, "replayed");
    assert_eq!(
        stack.wait_settled("replayed", &site.head(), COLD)["state"],
        "ready"
    );
    let m = stack.agent_http("GET", "/metrics").body;
    assert!(m.contains("kiln_agent_webhooks_rejected_total 5\n"), "{m}");
}

#[test]
fn refuses_status_without_a_token_or_to_another_client() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    // A static site builds fast: this test is about access, not Vite.
    app.git_ok(&["rm", "-q", "package.json"]);
    app.git_ok(&["commit", "-q", "-m", "static"]);
    stack.push(&app, "private");
    stack.wait_settled("private", &app.head(), WARM);
    let url = format!("{}/status/private", stack.agent_url());
    let r = http("GET", &url, &[], b"");
    assert_eq!(r.status, 401, "{}", r.body);
    let other = stack.gitstore.create_client("someone-else");
    let auth = format!("Bearer {other}");
    let r = http("GET", &url, &[("Authorization", &auth)], b"");
    assert_eq!(
        r.status, 404,
        "another client's project looks absent: {}",
        r.body
    );
    let r = stack.agent_http("GET", "/status/never-pushed");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = stack.agent_http("GET", "/status/..%2Fetc");
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn contains_a_build_that_overwrites_a_shared_node_modules_file() {
    // Two projects share one pnpm store: node_modules files are hard links into it. A build that
    // overwrites react's entry point must change nothing the other project gets.
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let victim = fixture_app(&tmp.path().join("victim"));
    stack.push(&victim, "victim");
    stack.wait_settled("victim", &victim.head(), COLD);

    let evil = fixture_app(&tmp.path().join("evil"));
    evil.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\nimport fs from 'node:fs'\nfor (const f of ['node_modules/react/index.js', 'node_modules/react/cjs/react.production.min.js']) {\n  try { fs.writeFileSync(f, 'throw new Error(\"kiln-poisoned\")'); console.log('overwrote', f) } catch (e) { console.log('write refused', f, e.code) }\n}\nexport default defineConfig({ plugins: [react()] })\n",
    );
    stack.push(&evil, "evil");
    stack.wait_settled("evil", &evil.head(), COLD);

    victim.commit_file(
        "src/text.ts",
        "export const TEXT: string = 'victim rebuilt'\n",
    );
    stack.push(&victim, "victim");
    let st = stack.wait_settled("victim", &victim.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    let bundle = stack.published_assets("victim", "js");
    assert!(bundle.contains("victim rebuilt"));
    assert!(
        !bundle.contains("kiln-poisoned"),
        "another project's build poisoned react"
    );
}

#[test]
fn cancel_stops_a_running_build_and_keeps_the_last_good() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "slow");
    let good = app.head();
    stack.wait_settled("slow", &good, COLD);
    app.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nawait new Promise(r => setTimeout(r, 60000))\nexport default defineConfig({})\n",
    );
    stack.push(&app, "slow");
    let started = std::time::Instant::now();
    loop {
        let st = stack.status("slow");
        if st["state"] == "building" {
            break;
        }
        assert!(started.elapsed() < WARM, "never started building: {st:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = stack.agent_http("POST", "/cancel/slow");
    assert_eq!(r.status, 200, "{}", r.body);
    let st = stack.wait_settled("slow", &app.head(), Duration::from_secs(20));
    assert_eq!(st["state"], "cancelled", "{st:#}");
    assert_eq!(st["last_good"]["commit"], good.as_str());
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "cancel took too long"
    );
}

#[test]
fn a_project_can_pin_its_own_vite_and_fast_failures_fall_back_to_it() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    let pkg = std::fs::read_to_string(app.path.join("package.json")).unwrap();
    let pinned = pkg.replacen('{', "{\n  \"kiln\": { \"engine\": \"project\" },", 1);
    app.commit_file("package.json", pinned);
    stack.push(&app, "pinned");
    let st = stack.wait_settled("pinned", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["engine"], "project", "{st:#}");

    // A config only the project's Vite can load: the fast engine fails, the project's builds.
    let app2 = fixture_app(&tmp.path().join("app2"));
    app2.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\nif (process.argv.some(a => a.includes('kiln-engine'))) throw new Error('kiln-test: not on this Vite')\nexport default defineConfig({ plugins: [react()] })\n",
    );
    stack.push(&app2, "fallback");
    let st = stack.wait_settled("fallback", &app2.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["engine"], "project", "{st:#}");
    let log = stack.build_log("fallback");
    assert!(log.contains("kiln-test: not on this Vite"), "{log}");
    assert!(log.contains("the fast engine failed"), "{log}");
}

#[test]
fn contains_an_agent_crash_mid_build_and_redoes_the_build_after_restart() {
    let mut stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "crash");
    let good = app.head();
    stack.wait_settled("crash", &good, COLD);
    app.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\nawait new Promise(r => setTimeout(r, 4000))\nexport default defineConfig({ plugins: [react()] })\n",
    );
    stack.push(&app, "crash");
    let started = std::time::Instant::now();
    while stack.status("crash")["state"] != "building" {
        assert!(started.elapsed() < WARM, "never started building");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !stack.sandbox_processes().is_empty(),
        "the build runs in a sandbox"
    );
    stack.kill_agent();
    let killed = std::time::Instant::now();
    while !stack.sandbox_processes().is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "sandbox processes outlived the agent: {:?}",
            stack.sandbox_processes()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        stack.published("crash", "index.html").is_some(),
        "the last good preview is still served"
    );
    stack.restart_agent();
    let st = stack.wait_settled("crash", &app.head(), COLD);
    assert_eq!(
        st["state"], "ready",
        "the interrupted build ran again: {st:#}"
    );
    assert!(
        !stack.state_dir().join("builds").join("crash-2").exists(),
        "scratch of the interrupted build was cleaned"
    );
}

/// SIGTERM, as `systemctl stop` sends: builds get the grace, then are cancelled and left queued,
/// the agent exits 0, and the next start builds them.
#[test]
fn a_stop_requeues_a_build_past_its_grace_and_the_next_start_builds_it() {
    let mut stack = Stack::start_with(&["--shutdown-grace-secs", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    app.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\nawait new Promise(r => setTimeout(r, 8000))\nexport default defineConfig({ plugins: [react()] })\n",
    );
    stack.push(&app, "stopping");
    let started = std::time::Instant::now();
    loop {
        let st = stack.agent_http("GET", "/status/stopping");
        if st.status == 200 && st.json()["state"] == "building" {
            break;
        }
        assert!(
            started.elapsed() < COLD,
            "never started building: {}",
            st.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &stack.agent.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let signalled = std::time::Instant::now();
    let exit = loop {
        if let Some(status) = stack.agent.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(30),
            "the agent did not stop within its grace and clean-up:\n{}",
            stack.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        exit.success(),
        "a stop is a clean exit: {exit}\n{}",
        stack.agent_log()
    );
    assert!(
        stack.sandbox_processes().is_empty(),
        "no build outlives the agent: {:?}",
        stack.sandbox_processes()
    );
    let on_disk: serde_json::Value = serde_json::from_slice(
        &std::fs::read(stack.state_dir().join("projects/stopping/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(on_disk["state"], "queued", "left queued: {on_disk:#}");

    stack.restart_agent();
    let st = stack.wait_settled("stopping", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "the next start built it: {st:#}");
}
