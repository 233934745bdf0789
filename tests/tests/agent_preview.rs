//! What a preview carries besides the app (the console-capture script, the building page), and
//! the claim that a machine's disk is only a cache: wipe it and every preview comes back from the
//! blob store alone.

use std::time::{Duration, Instant};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);

#[test]
fn published_pages_carry_the_console_script_for_the_configured_generator() {
    let stack = Stack::start_with(&[
        "--preview-url",
        "http://127.0.0.1:9/preview",
        "--generator-origins",
        "https://gen.example https://other.example:8443",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "console");
    let st = stack.wait_settled("console", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert_eq!(
        st["last_good"]["preview_url"],
        "http://127.0.0.1:9/preview/console/"
    );

    let index = stack.published("console", "index.html").unwrap();
    assert!(
        index.contains("/preview/console/assets/"),
        "Vite's base is the preview URL's path: {index}"
    );
    let script_at = index.find("postMessage").expect("console script injected");
    let app_script_at = index
        .find("type=\"module\"")
        .expect("the app's module script");
    assert!(script_at < app_script_at, "the capture runs before the app");
    assert!(index.contains(r#""origins":["https://gen.example","https://other.example:8443"]"#));
    assert!(index.contains(r#""project":"console""#));
    // The fixture's own markup is intact.
    assert!(index.contains(r#"<div id="root"></div>"#));
    // nginx serves the precompressed copy to most browsers: it must carry the script too.
    let gz = stack.publish_dir().join("console/current/index.html.gz");
    if gz.exists() {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut flate2_reader(&std::fs::read(&gz).unwrap()), &mut out)
            .unwrap();
        assert_eq!(out, index, "index.html.gz is the injected page");
    }
    let page = stack.publish_dir().join("console/status.html");
    assert!(!page.exists(), "no status page once ready");
}

fn flate2_reader(bytes: &[u8]) -> impl std::io::Read + '_ {
    // gzip via the system tool keeps the test crate's dependencies as they are.
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), bytes).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    std::io::Cursor::new(out.stdout)
}

#[test]
fn a_first_build_shows_a_building_page_until_it_is_ready() {
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "fresh");
    let page = stack.publish_dir().join("fresh/status.html");
    let started = Instant::now();
    let mut saw = None;
    while started.elapsed() < COLD {
        if let Ok(p) = std::fs::read_to_string(&page) {
            saw = Some(p);
            break;
        }
        // The webhook may not have reached the agent yet (404 until it has).
        let st = stack.agent_http("GET", "/status/fresh");
        if st.status == 200 && st.json()["state"] == "ready" {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let saw = saw.expect("a building page while the first build ran");
    assert!(saw.contains("Building your preview"), "{saw}");
    assert!(
        saw.contains("postMessage"),
        "the page reports its state to the generator"
    );
    let st = stack.wait_settled("fresh", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}");
    assert!(
        !page.exists(),
        "the building page goes once the app is published"
    );
}

#[test]
fn every_preview_comes_back_from_the_store_after_the_disk_is_lost() {
    let mut stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut heads = Vec::new();
    for (p, text) in [("lost-a", "alpha text"), ("lost-b", "bravo text")] {
        let app = fixture_app(&tmp.path().join(p));
        app.commit_file(
            "src/text.ts",
            format!("export const TEXT: string = '{text}'\n"),
        );
        stack.push(&app, p);
        heads.push((p, app.head(), text));
    }
    for (p, head, _) in &heads {
        assert_eq!(stack.wait_settled(p, head, COLD)["state"], "ready");
    }

    // A Spot eviction: the machine and its disk are gone; a new one starts with nothing.
    stack.kill_agent();
    for d in [stack.state_dir(), stack.publish_dir()] {
        std::fs::remove_dir_all(&d).unwrap();
    }
    stack.restart_agent();

    for (p, head, text) in &heads {
        let st = stack.wait_settled(p, head, COLD);
        assert_eq!(st["state"], "ready", "{p}: {st:#}");
        let assets = stack.publish_dir().join(p).join("current/assets");
        let bundle: String = std::fs::read_dir(&assets)
            .unwrap_or_else(|e| panic!("{p} not published again: {e}"))
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "js"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        assert!(bundle.contains(text), "{p} serves its last pushed text");
    }
}
