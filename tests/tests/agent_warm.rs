//! Warm builds end to end: the agent keeps a `vite build --watch` process per recently built
//! project, and what a user sees (the published preview, the status, the log) must be exactly
//! what a cold build of the same commit gives, only sooner.

use std::time::{Duration, Instant};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(120);

fn set_text(app: &Repo, text: &str) -> String {
    app.commit_file(
        "src/text.ts",
        format!("export const TEXT: string = '{text}'\n"),
    )
}

/// Sandboxes of this stack's agent that are warm processes (a cold build's sandbox is gone
/// when its build is): `unshare` and `sandbox-init` name the same spec file.
fn warm_processes(stack: &Stack) -> usize {
    let dir = stack.state_dir().join("warm");
    let specs: std::collections::HashSet<String> = stack
        .sandbox_processes()
        .iter()
        .filter(|c| c.contains(&*dir.to_string_lossy()))
        .filter_map(|c| c.split_whitespace().last().map(str::to_owned))
        .collect();
    specs.len()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_one_file_change_is_rebuilt_by_the_warm_process_and_published_whole() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "shop");
    let st = stack.wait_settled("shop", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(
        st["warm"], "started",
        "the first build starts the warm process: {st:#}"
    );
    assert_eq!(
        warm_processes(&stack),
        1,
        "the warm process stays up after its build"
    );

    for (i, text) in ["second text", "third text"].into_iter().enumerate() {
        let c = set_text(&app, text);
        stack.push(&app, "shop");
        let st = stack.wait_settled("shop", &c, WARM);
        assert_eq!(st["state"], "ready", "{st:#}");
        assert_eq!(st["warm"], "rebuilt", "change {i}: {st:#}");
        assert_eq!(st["install"], "skipped", "{st:#}");
        let vite_ms = st["vite_ms"].as_u64().expect("Vite's own time");
        assert!(
            vite_ms <= st["phases"]["build"].as_u64().unwrap(),
            "Vite's rebuild is within the build phase: {st:#}"
        );
        assert_eq!(st["last_good"]["commit"], c.as_str());
        let js = stack.published_assets("shop", "js");
        assert!(
            js.contains(text) && !js.contains("first text"),
            "change {i}: the published bundle is the new build only"
        );
        let log = stack.build_log("shop");
        assert!(log.contains("warm process rebuilt: Vite built in"), "{log}");
        assert!(
            log.contains("engine fast: vite build --watch (warm)"),
            "{log}"
        );
        assert!(
            stack
                .published("shop", "index.html")
                .unwrap()
                .contains("/shop/assets/"),
            "the base path holds for warm builds"
        );
    }
    let metrics = stack.agent_http("GET", "/metrics").body;
    assert!(
        metrics.contains("kiln_agent_warm_builds_total{how=\"rebuilt\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("kiln_agent_warm_processes 1"), "{metrics}");
    assert_eq!(
        warm_processes(&stack),
        1,
        "one process per project, not per build"
    );
}

#[test]
fn added_deleted_and_config_changes_restart_the_warm_process_and_build_exactly() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "grow");
    stack.wait_settled("grow", &app.head(), COLD);

    // A new component, imported by a changed file: watch mode is not trusted with new files.
    app.write(
        "src/components/Badge.tsx",
        "export function Badge() { return <b>badge from a new file</b> }\n",
    );
    app.write(
        "src/App.tsx",
        "import { Badge } from './components/Badge'\nimport { TEXT } from './text'\n\
         export default function App() { return <main><h1>{TEXT}</h1><Badge /></main> }\n",
    );
    app.git_ok(&["add", "-A"]);
    app.git_ok(&["commit", "-q", "-m", "badge"]);
    stack.push(&app, "grow");
    let st = stack.wait_settled("grow", &app.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    let log = stack.build_log("grow");
    assert!(
        log.contains("warm process restarted: files were added (src/components/Badge.tsx)"),
        "{log}"
    );
    assert!(stack
        .published_assets("grow", "js")
        .contains("badge from a new file"));

    // The config is not a module: a change to it needs a new process too.
    let config = std::fs::read_to_string(tmp.path().join("app/vite.config.ts")).unwrap();
    app.commit_file(
        "vite.config.ts",
        config.replace(
            "plugins: [",
            "define: { __KILN_FLAG__: JSON.stringify('flag from the config') },\n  plugins: [",
        ),
    );
    app.commit_file(
        "src/text.ts",
        "declare const __KILN_FLAG__: string\nexport const TEXT: string = __KILN_FLAG__\n",
    );
    stack.push(&app, "grow");
    let st = stack.wait_settled("grow", &app.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    assert!(stack
        .build_log("grow")
        .contains("did not read vite.config.ts"));
    assert!(stack
        .published_assets("grow", "js")
        .contains("flag from the config"));

    // Deleting the component again (and its import).
    app.git_ok(&["rm", "-q", "src/components/Badge.tsx"]);
    app.write(
        "src/App.tsx",
        "import { TEXT } from './text'\nexport default function App() { return <h1>{TEXT}</h1> }\n",
    );
    app.git_ok(&["commit", "-qam", "no badge"]);
    stack.push(&app, "grow");
    let st = stack.wait_settled("grow", &app.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    assert!(stack.build_log("grow").contains("files were deleted"));
    assert!(!stack
        .published_assets("grow", "js")
        .contains("badge from a new file"));
    assert_eq!(warm_processes(&stack), 1, "the old processes are gone");
}

#[test]
fn a_broken_change_fails_with_the_error_and_the_fix_is_served() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "oops");
    let good = app.head();
    stack.wait_settled("oops", &good, COLD);

    app.commit_file("src/text.ts", "export const TEXT: string = \n");
    stack.push(&app, "oops");
    let st = stack.wait_settled("oops", &app.head(), WARM);
    assert_eq!(st["state"], "failed", "{st:#}");
    let error = st["error"].as_str().unwrap();
    assert!(
        error.contains("text.ts"),
        "the error names the file: {error}"
    );
    assert_eq!(st["last_good"]["commit"], good.as_str(), "{st:#}");
    assert!(stack.published_assets("oops", "js").contains("first text"));

    let fixed = set_text(&app, "fixed text");
    stack.push(&app, "oops");
    let st = stack.wait_settled("oops", &fixed, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["last_good"]["commit"], fixed.as_str());
    let js = stack.published_assets("oops", "js");
    assert!(js.contains("fixed text") && !js.contains("first text"));
}

#[test]
fn the_warm_processes_are_capped_least_recently_used_first() {
    let stack = Stack::start_with(&["--warm-max", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let a = fixture_app(&tmp.path().join("a"));
    let b = fixture_app(&tmp.path().join("b"));
    stack.push(&a, "first");
    stack.wait_settled("first", &a.head(), COLD);
    stack.push(&b, "second");
    let st = stack.wait_settled("second", &b.head(), COLD);
    assert_eq!(st["warm"], "started", "{st:#}");
    assert_eq!(warm_processes(&stack), 1, "the cap holds");
    assert!(stack
        .agent_log()
        .contains("warm process stopped to make room for another project's"));

    let c = set_text(&a, "back to the first");
    stack.push(&a, "first");
    let st = stack.wait_settled("first", &c, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(
        st["warm"], "started",
        "its process was the one stopped: {st:#}"
    );
    assert!(stack
        .published_assets("first", "js")
        .contains("back to the first"));
    assert_eq!(warm_processes(&stack), 1);
}

#[test]
fn idle_warm_processes_stop_and_warm_max_zero_builds_cold() {
    let stack = Stack::start_with(&["--warm-idle-secs", "1", "--gc-interval-secs", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "idle");
    stack.wait_settled("idle", &app.head(), COLD);
    wait_for(
        "the idle warm process stops",
        Duration::from_secs(20),
        || warm_processes(&stack) == 0,
    );
    let c = set_text(&app, "after idling");
    stack.push(&app, "idle");
    let st = stack.wait_settled("idle", &c, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    drop(stack);

    let cold = Stack::start_with(&["--warm-max", "0"]);
    cold.push(&app, "cold");
    let st = cold.wait_settled("cold", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert!(st.get("warm").is_none(), "{st:#}");
    assert_eq!(warm_processes(&cold), 0);
    assert!(cold.published_assets("cold", "js").contains("after idling"));
}

#[test]
fn a_dependency_change_stops_the_warm_process_before_installing() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "deps");
    stack.wait_settled("deps", &app.head(), COLD);
    let pkg = std::fs::read_to_string(tmp.path().join("app/package.json")).unwrap();
    app.commit_file(
        "package.json",
        pkg.replace(
            "\"private\": true,",
            "\"private\": true,\n  \"description\": \"x\",",
        ),
    );
    stack.push(&app, "deps");
    let st = stack.wait_settled("deps", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["install"], "ran", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    let log = stack.build_log("deps");
    let stopped = log
        .find("warm process stopped: the dependencies change")
        .expect("stopped");
    assert!(stopped < log.find("pnpm install").unwrap(), "{log}");
}

#[test]
fn cancel_kills_a_warm_rebuild_with_its_process_and_the_next_push_builds() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    // A plugin that spins on a marker, so that one rebuild hangs until it is killed.
    app.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\n\
         const hang = { name: 'hang', transform(code) { if (code.includes('KILN_HANG')) { for (;;) {} } } }\n\
         export default defineConfig({ plugins: [react(), hang] })\n",
    );
    stack.push(&app, "stop");
    let good = app.head();
    stack.wait_settled("stop", &good, COLD);
    let hang = set_text(&app, "KILN_HANG");
    stack.push(&app, "stop");
    wait_for("the rebuild runs", WARM, || {
        let st = stack.status("stop");
        st["state"] == "building" && st["commit"] == hang.as_str()
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = stack.agent_http("POST", "/cancel/stop");
    assert_eq!(r.status, 200, "{}", r.body);
    let st = stack.wait_settled("stop", &hang, Duration::from_secs(20));
    assert_eq!(st["state"], "cancelled", "{st:#}");
    assert_eq!(st["warm"], "rebuilt", "{st:#}");
    assert_eq!(st["last_good"]["commit"], good.as_str());
    wait_for(
        "the warm process is killed",
        Duration::from_secs(10),
        || warm_processes(&stack) == 0,
    );
    let next = set_text(&app, "after the cancel");
    stack.push(&app, "stop");
    let st = stack.wait_settled("stop", &next, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    assert!(stack
        .published_assets("stop", "js")
        .contains("after the cancel"));
}

#[test]
fn tailwind_classes_new_in_a_change_are_in_the_rebuilt_css_of_a_generated_app() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture("generated-app", &tmp.path().join("app"));
    stack.push(&app, "gen");
    let st = stack.wait_settled("gen", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    let footer = "src/components/layout/site-footer.tsx";
    let text = std::fs::read_to_string(tmp.path().join("app").join(footer)).unwrap();
    assert!(!stack.published_assets("gen", "css").contains("0\\.123em"));
    app.commit_file(
        footer,
        text.replace("<span>", "<span className=\"tracking-[0.123em]\">"),
    );
    stack.push(&app, "gen");
    let st = stack.wait_settled("gen", &app.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "rebuilt", "{st:#}");
    let css = stack.published_assets("gen", "css");
    assert!(
        css.contains("tracking-\\[0\\.123em\\]"),
        "Tailwind generated the class the change uses"
    );
    assert!(stack
        .published_assets("gen", "js")
        .contains("tracking-[0.123em]"));
}

#[test]
fn hostile_warm_process_cannot_write_the_checkout() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    app.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\n\
         import fs from 'node:fs'\n\
         for (const p of ['/src/pwned', '/src/src/text.ts']) {\n\
           try { fs.writeFileSync(p, \"export const TEXT: string = 'pwned'\\n\"); console.log('KILN-WROTE ' + p) }\n\
           catch (e) { console.log('KILN-REFUSED ' + p + ' ' + e.code) }\n\
         }\n\
         export default defineConfig({ plugins: [react()] })\n",
    );
    stack.push(&app, "tamper");
    let st = stack.wait_settled("tamper", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    let log = stack.build_log("tamper");
    for p in ["/src/pwned", "/src/src/text.ts"] {
        assert!(
            log.contains(&format!("KILN-REFUSED {p} EROFS")),
            "the checkout is read-only to the warm process: {log}"
        );
    }
    let worktree = stack.state_dir().join("projects/tamper/worktree");
    assert!(!worktree.join("pwned").exists());
    let text = std::fs::read_to_string(worktree.join("src/text.ts")).unwrap();
    assert!(!text.contains("pwned"), "{text}");
    assert!(!stack.published_assets("tamper", "js").contains("pwned"));
}

#[test]
fn hostile_background_work_left_running_in_a_warm_process_is_stopped() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    // Keeps a CPU busy for 200 ms of every 250 ms, builds or not.
    app.commit_file(
        "vite.config.ts",
        "import { defineConfig } from 'vite'\nimport react from '@vitejs/plugin-react'\n\
         setInterval(() => { const end = Date.now() + 200; while (Date.now() < end) {} }, 250)\n\
         export default defineConfig({ plugins: [react()] })\n",
    );
    stack.push(&app, "miner");
    let st = stack.wait_settled("miner", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["warm"], "started", "{st:#}");
    std::thread::sleep(Duration::from_secs(4));
    let c = set_text(&app, "after the miner");
    stack.push(&app, "miner");
    let st = stack.wait_settled("miner", &c, WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(
        st["warm"], "started",
        "a process that works while idle is not reused: {st:#}"
    );
    let log = stack.build_log("miner");
    assert!(
        log.contains("warm process restarted: it used")
            && log.contains("something the project started keeps running"),
        "{log}"
    );
    assert!(stack
        .published_assets("miner", "js")
        .contains("after the miner"));
}

#[test]
fn the_projects_own_vite_5_rebuilds_the_same_file_warm_again_and_again() {
    // Rollup's watcher (Vite 5) loses a file that is replaced by a rename: every change must
    // still be seen, or each would wait out the stall and build cold.
    let stack = Stack::start_with(&["--engine", "project"]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture("generated-app", &tmp.path().join("app"));
    stack.push(&app, "five");
    let st = stack.wait_settled("five", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(st["engine"], "project", "{st:#}");
    let footer = "src/components/layout/site-footer.tsx";
    let text = std::fs::read_to_string(tmp.path().join("app").join(footer)).unwrap();
    for i in 0..3 {
        let tagline = format!("tagline {i} from vite 5");
        let c = app.commit_file(
            footer,
            text.replace("Ship work your team is proud of.", &tagline),
        );
        stack.push(&app, "five");
        let st = stack.wait_settled("five", &c, WARM);
        assert_eq!(st["state"], "ready", "{st:#}");
        assert_eq!(
            st["warm"],
            "rebuilt",
            "change {i}: {st:#}\n{}",
            stack.build_log("five")
        );
        assert!(stack.published_assets("five", "js").contains(&tagline));
    }
}
