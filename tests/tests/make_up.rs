//! The README's first command, end to end: `make up`'s script starts gitstore, the agent and
//! nginx, pushes the bundled example app and serves it; then a change pushed with stock git shows
//! up in the page nginx serves. It runs beside the user's own stack (its own dir and ports).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_tests::*;

struct LocalStack {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl LocalStack {
    fn script(&self, verb: &str) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../provisioning/local.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(script).arg(verb);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    }

    fn credentials(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.dir.path().join("local/credentials.env"))
            .expect("local.sh up writes credentials.env");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        let out = self.script("down");
        if !out.ok {
            eprintln!("local.sh down: {}", out.stderr);
        }
    }
}

fn setting<'a>(creds: &'a [(String, String)], key: &str) -> &'a str {
    creds
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("credentials.env has no {key}"))
}

/// The JavaScript nginx serves for the preview at `url`: the page, then every script it names.
fn served_js(url: &str) -> String {
    let page = http("GET", url, &[], b"");
    assert_eq!(page.status, 200, "{url}: {}", page.body);
    let origin = url.split("/preview/").next().unwrap();
    page.body
        .split('"')
        .filter(|s| s.contains("/assets/") && s.ends_with(".js"))
        .map(|src| http("GET", &format!("{origin}{src}"), &[], b"").body)
        .collect()
}

#[test]
fn make_up_serves_the_example_and_a_pushed_change_shows_in_the_served_page() {
    require_tool("nginx", "apt-get install -y nginx");
    let dir = tempfile::Builder::new()
        .prefix("kiln-make-up-")
        .tempdir()
        .unwrap();
    // nginx's workers (www-data) traverse to www/ inside it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let bin_dir = bin("kiln").parent().unwrap().to_owned();
    let http_port = free_port();
    let env = vec![
        (
            "KILN_LOCAL_DIR".to_owned(),
            dir.path().join("local").display().to_string(),
        ),
        ("KILN_BIN_DIR".to_owned(), bin_dir.display().to_string()),
        ("KILN_GIT_PORT".to_owned(), free_port().to_string()),
        ("KILN_AGENT_PORT".to_owned(), free_port().to_string()),
        ("KILN_HTTP_PORT".to_owned(), http_port.to_string()),
    ];
    let stack = LocalStack { dir, env };
    let up = stack.script("up");
    assert!(
        up.ok,
        "local.sh up failed:\n{}\n{}\nagent log:\n{}",
        up.stdout,
        up.stderr,
        std::fs::read_to_string(stack.dir.path().join("local/logs/agent.log")).unwrap_or_default()
    );
    let creds = stack.credentials();
    let preview = format!("http://127.0.0.1:{http_port}/preview/hello/");
    assert!(
        up.stdout.contains(&preview),
        "make up prints the preview URL: {}",
        up.stdout
    );
    assert_eq!(
        setting(&creds, "KILN_PREVIEW_URL"),
        format!("http://127.0.0.1:{http_port}/preview")
    );
    assert!(served_js(&preview).contains("Hello from Kiln"));

    // A change, with stock git, through the front door.
    let token = setting(&creds, "KILN_TOKEN");
    let url = format!("http://kiln:{token}@127.0.0.1:{http_port}/git/hello.git");
    let work = tempfile::tempdir().unwrap();
    let repo = Repo::clone(&url, &work.path().join("hello"));
    repo.commit_file(
        "src/text.ts",
        "export const TEXT: string = 'a change through nginx'\n",
    );
    let out = repo.push(&url, &["main"]);
    assert!(out.ok, "push: {}", out.stderr);
    let head = repo.head();

    let auth = format!("Bearer {token}");
    let started = Instant::now();
    loop {
        let st = http(
            "GET",
            &format!("http://127.0.0.1:{http_port}/status/hello"),
            &[("Authorization", &auth)],
            b"",
        );
        if st.status == 200 && st.json()["commit"] == head.as_str() {
            match st.json()["state"].as_str() {
                Some("ready") => break,
                Some("failed" | "timed_out" | "cancelled") => panic!("build failed: {}", st.body),
                _ => {}
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "not ready: {}",
            st.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let js = served_js(&preview);
    assert!(
        js.contains("a change through nginx"),
        "the served page has the new text"
    );
    assert!(!js.contains("Hello from Kiln"));
}
