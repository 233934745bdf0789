//! nginx serving previews with the configuration `kiln nginx render` makes: a real nginx over a
//! publish directory laid out by hand the way the agent lays it out, checked with raw HTTP so
//! nothing between the test and nginx normalizes a path; then a pushed app in a real Chromium.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_tests::*;

const PASSWD: &str = "root:x:0:0";
const ROOT_SECRET: &str = "kiln-secret-in-the-publish-root";
const OLD_BUILD_SECRET: &str = "kiln-secret-of-a-build-that-is-not-current";
const DOTENV_SECRET: &str = "KILN_DOTENV_SECRET=hunter2";
const INVALID_ID_MARK: &str = "kiln-served-a-project-with-an-invalid-id";
const STATUS_MARK: &str = "kiln-status-page: building";
const JS: &str = "assets/index-B7tTgLHe.js";

/// Everything a hostile request must never get back.
const SECRETS: &[&str] = &[
    PASSWD,
    ROOT_SECRET,
    OLD_BUILD_SECRET,
    DOTENV_SECRET,
    INVALID_ID_MARK,
];

// ---------------------------------------------------------------------------------------------
// A publish directory, as the agent writes it
// ---------------------------------------------------------------------------------------------

struct Site {
    _dir: tempfile::TempDir,
    www: PathBuf,
}

impl Site {
    fn path(&self, rel: &str) -> PathBuf {
        self.www.join(rel)
    }

    fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Writes `rel` and its `.gz` sibling, as publish does for text assets.
    fn write_gz(&self, rel: &str, content: &str) {
        self.write(rel, content);
        let out = run(Command::new("gzip")
            .args(["-k", "-9", "-n", "-f"])
            .arg(self.path(rel)));
        assert!(out.ok, "gzip: {}", out.stderr);
    }

    /// Points `<project>/current` at `builds/<n>` with a rename, as the agent does.
    fn switch_current(&self, project: &str, build: u32) {
        let tmp = self.path(&format!("{project}/.current.tmp"));
        let _ = std::fs::remove_file(&tmp);
        symlink(format!("builds/{build}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.path(&format!("{project}/current"))).unwrap();
    }
}

/// The app's index.html of `project`'s build `n`: the shape Vite writes (with the base path
/// baked into asset URLs), padded past the agent's 256-byte precompression threshold. Builds of
/// one project differ only in a digit, so their pages have the same size.
fn index_html(base: &str, project: &str, n: u32) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n  <head>\n    <meta charset=\"UTF-8\" />\n    \
         <title>{project}</title>\n    <script type=\"module\" crossorigin src=\"{base}{JS}\"></script>\n    \
         <link rel=\"stylesheet\" crossorigin href=\"{base}assets/index-Dx9_aB1c.css\">\n  </head>\n  \
         <body>\n    <div id=\"root\"></div>\n    <!-- {project} build {n} -->\n  </body>\n</html>\n"
    )
}

/// `www/` with projects `foo` (build 1 current, build 2 ready to switch to, and every kind of
/// hostile entry) and `bar` (build 2 current, build 1 holding a secret), and a directory whose
/// name is not a valid project id.
fn site() -> Site {
    let dir = tempfile::Builder::new()
        .prefix("kiln-serving-")
        .tempdir()
        .unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let site = Site { _dir: dir, www };
    set_mode(site._dir.path(), 0o755);
    site.write("secret.txt", ROOT_SECRET);

    for n in [1, 2] {
        let b = format!("foo/builds/{n}");
        site.write_gz(
            &format!("{b}/index.html"),
            &index_html("/preview/foo/", "foo", n),
        );
        site.write_gz(
            &format!("{b}/{JS}"),
            &"console.log('foo app');\n".repeat(40),
        );
        site.write_gz(
            &format!("{b}/assets/index-Dx9_aB1c.css"),
            &"#root { color: #123456 }\n".repeat(20),
        );
    }
    let b1 = "foo/builds/1";
    // nginx's own ETag (mtime and size) cannot tell these two index pages apart.
    let out = run(Command::new("touch")
        .arg("-r")
        .arg(site.path(&format!("{b1}/index.html")))
        .arg(site.path("foo/builds/2/index.html")));
    assert!(out.ok, "touch: {}", out.stderr);
    site.write(
        &format!("{b1}/assets/logo.svg"),
        "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
    );
    site.write(
        &format!("{b1}/assets/app-Q2x4Zp7w.wasm"),
        b"\0asm\x01\0\0\0",
    );
    site.write(&format!("{b1}/manifest.json"), "{\"name\":\"foo\"}");
    site.write(
        &format!("{b1}/favicon.svg"),
        "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
    );
    site.write(
        &format!("{b1}/about.html"),
        "<!doctype html><p>about foo</p>",
    );
    site.write(
        &format!("{b1}/docs/index.html"),
        "<!doctype html><p>foo docs</p>",
    );
    site.write(&format!("{b1}/.env"), DOTENV_SECRET);
    site.write(
        &format!("{b1}/.well-known/security.txt"),
        "Contact: mailto:a@b.c",
    );
    // Symlinks a malicious build could leave (the agent never publishes one).
    symlink("/etc/passwd", site.path(&format!("{b1}/assets/leak.txt"))).unwrap();
    symlink(
        "../../../../bar/builds/1/old-secret.txt",
        site.path(&format!("{b1}/assets/other-project.txt")),
    )
    .unwrap();
    symlink("/etc", site.path(&format!("{b1}/etc"))).unwrap();
    symlink("/etc/passwd", site.path(&format!("{b1}/robots.txt"))).unwrap();
    symlink("/etc/passwd", site.path(&format!("{b1}/passwd.html"))).unwrap();
    symlink("../..", site.path(&format!("{b1}/up"))).unwrap();
    site.switch_current("foo", 1);

    site.write("bar/builds/1/old-secret.txt", OLD_BUILD_SECRET);
    site.write(
        "bar/builds/1/index.html",
        index_html("/preview/bar/", "bar", 1),
    );
    site.write(
        "bar/builds/2/index.html",
        index_html("/preview/bar/", "bar", 2),
    );
    site.write("bar/builds/2/bar.txt", "a file of bar");
    site.switch_current("bar", 2);

    site.write("Foo/builds/1/index.html", INVALID_ID_MARK);
    site.switch_current("Foo", 1);
    site
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// nginx in path mode over `site`, previews at /preview/<project>/.
fn path_mode(site: &Site, extra: &[&str]) -> Nginx {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/preview");
    let mut args = vec!["--preview-url", &url];
    args.extend(extra);
    Nginx::start(port, &site.www, &args)
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP: the request target goes out byte for byte
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn leaked(&self) -> Option<&'static str> {
        let text = self.text();
        SECRETS.iter().copied().find(|s| text.contains(s))
    }
}

/// `GET <target>` with `Host: host` and extra header lines, over a fresh connection.
fn raw(port: u16, host: &str, target: &str, headers: &[(&str, &str)]) -> Raw {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&bytes)));
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Raw {
        status,
        headers,
        body: bytes[split + 4..].to_vec(),
    }
}

fn get(n: &Nginx, target: &str) -> Raw {
    raw(n.port(), "127.0.0.1", target, &[])
}

fn get_with(n: &Nginx, target: &str, headers: &[(&str, &str)]) -> Raw {
    raw(n.port(), "127.0.0.1", target, headers)
}

fn assert_app(r: &Raw, project: &str, build: u32, what: &str) {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    let text = r.text();
    assert!(
        text.contains("<div id=\"root\"></div>")
            && text.contains(&format!("{project} build {build}")),
        "{what}: expected {project}'s index.html of build {build}, got:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Path mode
// ---------------------------------------------------------------------------------------------

#[test]
fn serves_the_app_at_the_root_and_for_spa_routes() {
    let site = site();
    let n = path_mode(&site, &[]);
    assert_app(&get(&n, "/preview/foo/"), "foo", 1, "the root");
    for route in [
        "/preview/foo/settings",
        "/preview/foo/users/42/edit",
        "/preview/foo/x?tab=2",
    ] {
        assert_app(&get(&n, route), "foo", 1, route);
    }
    assert_app(&get(&n, "/preview/bar/"), "bar", 2, "another project");
    // A directory with its own index.html (a multi-page app) gets it.
    assert!(get(&n, "/preview/foo/docs/").text().contains("foo docs"));
    assert!(get(&n, "/preview/foo/about.html")
        .text()
        .contains("about foo"));
}

#[test]
fn redirects_a_preview_without_its_trailing_slash_keeping_the_port() {
    let site = site();
    let n = path_mode(&site, &[]);
    let r = get(&n, "/preview/foo");
    assert_eq!(r.status, 301, "{r:?}");
    // Relative, so a client that reached nginx through another port or host keeps it.
    assert_eq!(r.header("location"), Some("/preview/foo/"));
    let r = get(&n, "/preview/foo?tab=2");
    assert_eq!(r.header("location"), Some("/preview/foo/?tab=2"));
}

#[test]
fn asset_misses_are_real_404s_not_the_app() {
    let site = site();
    let n = path_mode(&site, &[]);
    for miss in [
        "/preview/foo/assets/missing-1.js",
        "/preview/foo/assets/index-XXXXXXXX.css",
        "/preview/foo/assets/deep/er/chunk-Ab12Cd34.js",
    ] {
        let r = get(&n, miss);
        assert_eq!(r.status, 404, "{miss}: {r:?}");
        assert!(!r.text().contains("id=\"root\""), "{miss} got the app");
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    }
    let r = get(&n, &format!("/preview/foo/{JS}"));
    assert_eq!(r.status, 200);
    assert!(r.text().contains("foo app"));
}

#[test]
fn hashed_assets_are_immutable_and_everything_else_revalidates() {
    let site = site();
    let n = path_mode(&site, &[]);
    for hashed in [JS, "assets/index-Dx9_aB1c.css", "assets/app-Q2x4Zp7w.wasm"] {
        let r = get(&n, &format!("/preview/foo/{hashed}"));
        assert_eq!(r.status, 200, "{hashed}");
        assert_eq!(
            r.header("cache-control"),
            Some("public, max-age=31536000, immutable"),
            "{hashed}"
        );
    }
    // Copied from public/assets/ without a hash: it can change with the next build.
    for (path, what) in [
        (
            "/preview/foo/assets/logo.svg",
            "an unhashed file in assets/",
        ),
        ("/preview/foo/favicon.svg", "a public file"),
        ("/preview/foo/", "index.html"),
        ("/preview/foo/some/route", "a route"),
    ] {
        let r = get(&n, path);
        assert_eq!(r.status, 200, "{what}");
        assert_eq!(r.header("cache-control"), Some("no-cache"), "{what}");
        assert!(r.header("etag").is_some(), "{what} has no ETag: {r:?}");
    }
    let index = get(&n, "/preview/foo/");
    assert_eq!(index.header("etag"), Some("W/\"kiln-1\""));
    assert_eq!(index.header("last-modified"), None, "{index:?}");
}

#[test]
fn etag_changes_when_current_switches_even_within_one_second() {
    let site = site();
    let n = path_mode(&site, &[]);
    let first = get(&n, "/preview/foo/");
    assert_app(&first, "foo", 1, "before the switch");
    let etag1 = first.header("etag").expect("ETag").to_owned();
    let again = get_with(&n, "/preview/foo/", &[("If-None-Match", &etag1)]);
    assert_eq!(again.status, 304, "{again:?}");
    assert!(again.body.is_empty());

    // Build 2's index.html has the same size and mtime: only the build tells them apart.
    site.switch_current("foo", 2);
    for path in ["/preview/foo/", "/preview/foo/some/route"] {
        let after = get_with(&n, path, &[("If-None-Match", &etag1)]);
        assert_app(&after, "foo", 2, "a revalidation after the switch");
        let etag2 = after.header("etag").expect("ETag").to_owned();
        assert_ne!(etag1, etag2);
        let r = get_with(&n, path, &[("If-None-Match", &etag2)]);
        assert_eq!(r.status, 304, "{r:?}");
    }
    // Back to build 1 (a rollback): the old ETag is current again.
    site.switch_current("foo", 1);
    let r = get_with(&n, "/preview/foo/", &[("If-None-Match", &etag1)]);
    assert_eq!(r.status, 304, "{r:?}");
}

#[test]
fn serves_precompressed_gzip_to_clients_that_accept_it() {
    let site = site();
    let n = path_mode(&site, &[]);
    let js = format!("/preview/foo/{JS}");
    let gz = std::fs::read(site.path(&format!("foo/builds/1/{JS}.gz"))).unwrap();
    let plain = std::fs::read(site.path(&format!("foo/builds/1/{JS}"))).unwrap();

    let r = get_with(&n, &js, &[("Accept-Encoding", "gzip, deflate, br")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(
        r.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(r.body, gz, "the agent's .gz, sent as it is");
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));

    let r = get(&n, &js);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, plain);

    let r = get_with(&n, "/preview/foo/", &[("Accept-Encoding", "gzip")]);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("etag"), Some("W/\"kiln-1\""));
}

#[test]
fn sends_correct_types_nosniff_and_frame_ancestors() {
    let site = site();
    let n = path_mode(
        &site,
        &[
            "--generator-origins",
            "https://gen.example.com http://localhost:5173",
        ],
    );
    let csp = "frame-ancestors https://gen.example.com http://localhost:5173";
    for (path, ty) in [
        ("/preview/foo/", "text/html; charset=utf-8"),
        ("/preview/foo/some/route", "text/html; charset=utf-8"),
        (
            &format!("/preview/foo/{JS}") as &str,
            "text/javascript; charset=utf-8",
        ),
        (
            "/preview/foo/assets/index-Dx9_aB1c.css",
            "text/css; charset=utf-8",
        ),
        (
            "/preview/foo/assets/logo.svg",
            "image/svg+xml; charset=utf-8",
        ),
        ("/preview/foo/assets/app-Q2x4Zp7w.wasm", "application/wasm"),
        (
            "/preview/foo/manifest.json",
            "application/json; charset=utf-8",
        ),
        (
            "/preview/foo/assets/missing-1.js",
            "text/html; charset=utf-8",
        ),
        ("/preview/nope/", "text/html; charset=utf-8"),
    ] {
        let r = get(&n, path);
        assert_eq!(r.header("content-type"), Some(ty), "{path}: {r:?}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("content-security-policy"), Some(csp), "{path}");
        assert_eq!(r.header("server"), Some("nginx"), "no version: {path}");
    }

    let open = path_mode(&site, &[]);
    let r = get(&open, "/preview/foo/");
    assert_eq!(
        r.header("content-security-policy"),
        Some("frame-ancestors *")
    );
}

#[test]
fn hostile_mime_sniffing_served_with_fixed_types() {
    let site = site();
    // HTML a build hides under names that are not .html: a browser that sniffed it would run
    // its script on the preview's origin, from a URL the app never meant as a page.
    let html = "<!doctype html><html><body><script>parent.postMessage(document.cookie, '*')\
                </script></body></html>\n";
    let cases = [
        ("notes.txt", "text/plain; charset=utf-8"),
        ("payload", "application/octet-stream"),
        ("assets/payload", "application/octet-stream"),
        ("assets/photo-Q2x4Zp7w.jpg", "image/jpeg"),
        ("data.json", "application/json; charset=utf-8"),
        ("assets/unknown.xyz", "application/octet-stream"),
    ];
    for (rel, _) in cases {
        site.write(&format!("foo/builds/1/{rel}"), html);
    }
    let n = path_mode(&site, &[]);
    for (rel, ty) in cases {
        for prefix in ["/preview/foo", "/preview/foo/b/1"] {
            let path = format!("{prefix}/{rel}");
            let r = get(&n, &path);
            assert_eq!(r.status, 200, "{path}: {r:?}");
            assert_eq!(r.body, html.as_bytes(), "{path}: served as it is");
            assert_eq!(r.header("content-type"), Some(ty), "{path}: {r:?}");
            assert_eq!(
                r.header("x-content-type-options"),
                Some("nosniff"),
                "{path}"
            );
        }
    }
}

#[test]
fn status_page_replaces_navigations_but_not_files_while_present() {
    let site = site();
    let n = path_mode(&site, &[]);
    let app_etag = get(&n, "/preview/foo/").header("etag").unwrap().to_owned();
    let page =
        format!("<!doctype html><meta http-equiv=\"refresh\" content=\"2\"><p>{STATUS_MARK}</p>");
    site.write("foo/status.html", &page);

    for nav in [
        "/preview/foo/",
        "/preview/foo/settings",
        "/preview/foo/index.html",
        "/preview/foo/about.html",
        "/preview/foo/docs/",
    ] {
        // Even a browser holding the app's ETag gets the page, not a 304.
        let r = get_with(&n, nav, &[("If-None-Match", &app_etag)]);
        assert_eq!(r.status, 200, "{nav}: {r:?}");
        assert!(r.text().contains(STATUS_MARK), "{nav}: {}", r.text());
        assert_eq!(r.header("cache-control"), Some("no-store"), "{nav}");
        assert_eq!(r.header("x-kiln-preview"), Some("status"), "{nav}");
        assert_eq!(
            r.header("content-security-policy"),
            Some("frame-ancestors *")
        );
    }
    // The current build's files still load (the status page may use them; open tabs keep working).
    let r = get(&n, &format!("/preview/foo/{JS}"));
    assert_eq!(r.status, 200);
    assert!(r.text().contains("foo app"));
    assert_eq!(get(&n, "/preview/foo/favicon.svg").status, 200);
    assert_eq!(get(&n, "/preview/foo/assets/missing-1.js").status, 404);

    std::fs::remove_file(site.path("foo/status.html")).unwrap();
    let r = get(&n, "/preview/foo/");
    assert_app(&r, "foo", 1, "after the status page is removed");
    assert_eq!(r.header("x-kiln-preview"), None);
    let r = get_with(&n, "/preview/foo/", &[("If-None-Match", &app_etag)]);
    assert_eq!(r.status, 304);

    // First build still running: a status page and nothing to serve yet.
    site.write("fresh/status.html", &page);
    let r = get(&n, "/preview/fresh/");
    assert_eq!(r.status, 200);
    assert!(r.text().contains(STATUS_MARK));
    assert_eq!(
        get(&n, "/preview/fresh/assets/index-B7tTgLHe.js").status,
        404
    );
}

#[test]
fn unknown_project_gets_the_no_preview_page() {
    let site = site();
    std::fs::create_dir_all(site.path("empty/builds")).unwrap();
    let n = path_mode(&site, &[]);
    for (path, project) in [
        ("/preview/nope/", "nope"),
        ("/preview/nope/some/route", "nope"),
        ("/preview/empty/", "empty"),
    ] {
        let r = get(&n, path);
        assert_eq!(r.status, 404, "{path}: {r:?}");
        let text = r.text();
        assert!(
            text.contains("No preview for <code>")
                && text.contains(&format!("{project}</code> yet")),
            "{path}: {text}"
        );
        assert_eq!(
            r.header("cache-control"),
            Some("no-store"),
            "a later build must show"
        );
    }
    assert_eq!(
        get(&n, "/preview/nope/assets/index-B7tTgLHe.js").status,
        404
    );
    // nginx logs nothing alarming for it: a missing project is routine.
    assert!(!n.error_log().contains("realpath()"), "{}", n.error_log());
}

#[test]
fn hostile_invalid_project_ids_rejected() {
    let site = site();
    let n = path_mode(&site, &[]);
    let long = format!("/preview/{}/", "a".repeat(64));
    for path in [
        "/preview/Foo/",
        "/preview/FOO/",
        "/preview/-foo/",
        "/preview/foo_bar/",
        "/preview/foo.bar/",
        "/preview/f%20o/",
        "/preview/",
        "/preview",
        long.as_str(),
    ] {
        let r = get(&n, path);
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert_eq!(r.leaked(), None, "{path}: {}", r.text());
    }
    assert_eq!(
        get(&n, &format!("/preview/{}/", "a".repeat(63))).status,
        404
    );
}

#[test]
fn hostile_path_traversal_in_raw_requests_refused() {
    let site = site();
    let n = path_mode(&site, &[]);
    let attempts = [
        "/preview/foo/../../secret.txt",
        "/preview/foo/..%2f..%2fsecret.txt",
        "/preview/foo/%2e%2e/%2e%2e/secret.txt",
        "/preview/foo/%2E%2E%2F%2E%2E%2Fsecret.txt",
        "/preview/foo/.%2e/.%2e/secret.txt",
        "/preview/foo/..%252f..%252fsecret.txt",
        "/preview/foo/..\\..\\secret.txt",
        "/preview/foo/..%5c..%5csecret.txt",
        "/preview/foo/..;/..;/secret.txt",
        "/preview/foo/%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
        "/preview/foo/assets/../../../../../../../../etc/passwd",
        "/preview/foo/assets/..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/preview/foo/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd",
        "/preview/foo/assets/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/../../../../../../etc/passwd",
        "//etc/passwd",
        // alias-style off-by-slash: "/preview/foo" + "../" must not become ".../foo/../"
        "/preview/foo../secret.txt",
        "/preview/foo../bar/builds/1/old-secret.txt",
        "/preview../secret.txt",
        "/preview/foo%2f..%2f..%2fsecret.txt",
        // builds that are not current are not reachable under any spelling
        "/preview/bar/builds/1/old-secret.txt",
        "/preview/foo/../bar/builds/1/old-secret.txt",
        "/preview/foo/..%2fbar%2fbuilds%2f1%2fold-secret.txt",
        "/preview/foo/current/../../bar/builds/1/old-secret.txt",
        "/preview/bar/current/../builds/1/old-secret.txt",
        "/preview/bar/%2e%2e/bar/builds/1/old-secret.txt",
        "/preview/foo/up/bar/builds/1/old-secret.txt",
        "/preview/foo/%00../../secret.txt",
        "/preview/foo/.env",
        "/preview/foo/%2eenv",
        "/preview/foo/assets/..%2f.env",
        "http://127.0.0.1/preview/foo/../../secret.txt",
        "/preview/Foo/",
    ];
    let mut outcomes = Vec::new();
    for target in attempts {
        let r = get(&n, target);
        outcomes.push(format!("{} {target}", r.status));
        assert_eq!(
            r.leaked(),
            None,
            "{target} leaked a secret ({}):\n{}",
            r.status,
            r.text()
        );
        assert!(
            r.status != 200 || r.text().contains("id=\"root\""),
            "{target}: 200 with something other than an app page:\n{}",
            r.text()
        );
    }
    eprintln!("traversal outcomes:\n{}", outcomes.join("\n"));
}

#[test]
fn hostile_symlinks_out_of_the_build_refused() {
    let site = site();
    // A status page that is a symlink is refused like any other.
    std::fs::create_dir_all(site.path("linked")).unwrap();
    symlink("/etc/passwd", site.path("linked/status.html")).unwrap();
    let n = path_mode(&site, &[]);
    for (path, expect) in [
        ("/preview/foo/assets/leak.txt", 404),
        ("/preview/foo/assets/other-project.txt", 404),
        ("/preview/foo/etc/passwd", 200),
        ("/preview/foo/robots.txt", 200),
        ("/preview/foo/passwd.html", 200),
        ("/preview/foo/up/secret.txt", 200),
        ("/preview/linked/", 404),
    ] {
        let r = get(&n, path);
        assert_eq!(r.leaked(), None, "{path}: {}", r.text());
        assert_eq!(r.status, expect, "{path}: {r:?}");
        if expect == 200 {
            // Not a file of the build, so a route of the app.
            assert_app(&r, "foo", 1, path);
        }
    }
    // `current` itself is a symlink, and is followed.
    assert_app(&get(&n, "/preview/foo/"), "foo", 1, "through current");
    assert!(
        n.error_log().contains("Too many levels of symbolic links"),
        "nginx refused the links itself:\n{}",
        n.error_log()
    );
}

#[test]
fn hostile_directory_listings_and_dotfiles_refused() {
    let site = site();
    let n = path_mode(&site, &[]);
    for dir in [
        "/preview/foo/assets/",
        "/preview/foo/assets/.",
        "/preview/foo/assets",
    ] {
        let r = get(&n, dir);
        let text = r.text();
        assert!(
            !text.contains("Index of") && !text.contains("logo.svg"),
            "{dir} listed the directory:\n{text}"
        );
    }
    assert_eq!(get(&n, "/preview/foo/assets/").status, 404);
    let r = get(&n, "/preview/foo/.env");
    assert_eq!(r.status, 404);
    assert_eq!(r.leaked(), None);
    // Except .well-known, which exists to be fetched.
    let r = get(&n, "/preview/foo/.well-known/security.txt");
    assert_eq!(r.status, 200, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Origin mode
// ---------------------------------------------------------------------------------------------

#[test]
fn origin_mode_serves_each_project_on_its_own_host_and_never_under_a_path() {
    let site = site();
    // Origin-mode builds have base "/": their pages name /assets/... .
    site.write("foo/builds/1/index.html", index_html("/", "foo", 1));
    let port = free_port();
    let n = Nginx::start(
        port,
        &site.www,
        &[
            "--preview-url",
            &format!("http://{{project}}.preview.test:{port}"),
        ],
    );
    let host = |h: &str, target: &str| raw(port, h, target, &[]);

    assert_app(&host("foo.preview.test", "/"), "foo", 1, "foo's host");
    assert_app(
        &host("foo.preview.test", "/some/route"),
        "foo",
        1,
        "a route",
    );
    assert_app(&host("bar.preview.test:80", "/"), "bar", 2, "bar's host");
    assert_app(
        &host("FOO.Preview.Test", "/"),
        "foo",
        1,
        "host names are case-insensitive",
    );
    let r = host("foo.preview.test", &format!("/{JS}"));
    assert_eq!(r.status, 200);
    assert!(r.text().contains("foo app"));
    assert_eq!(host("foo.preview.test", "/assets/missing-1.js").status, 404);
    let r = host("foo.preview.test", "/preview/foo");
    assert_app(&r, "foo", 1, "a path under foo's origin is a route of foo");
    let r = host("nope.preview.test", "/");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("No preview for <code>nope</code>"));

    // No path-mode previews anywhere: they would put every project on one origin.
    for (h, target) in [
        ("127.0.0.1", "/preview/foo/"),
        (&format!("127.0.0.1:{port}") as &str, "/preview/foo/"),
        ("preview.test", "/preview/foo/"),
        ("preview.test", "/"),
        ("foo.bar.preview.test", "/"),
        ("foo_x.preview.test", "/"),
        ("-foo.preview.test", "/"),
        ("Foo.preview.test.", "/"),
        ("..%2f..%2fetc.preview.test", "/"),
    ] {
        let r = host(h, target);
        let text = r.text();
        if h == "Foo.preview.test." {
            // nginx drops the trailing dot and lower-cases: that is foo.
            assert_app(&r, "foo", 1, h);
            continue;
        }
        assert!(
            r.status == 404 || r.status == 400,
            "Host {h} {target}: {r:?}"
        );
        assert!(
            !text.contains("id=\"root\""),
            "Host {h} {target} served an app"
        );
        assert_eq!(r.leaked(), None);
    }
    assert!(!n.conf().contains("location ~ \"^/preview/"));
}

/// `foo` as the agent leaves it after build 2 replaced build 1: build 1's assets (different
/// hashes) are only in the project's kept-assets union, as publish links them.
fn with_two_builds_of_different_assets(site: &Site, base: &str) {
    let old_js = "assets/index-Old1Hash.js";
    site.write(
        "foo/builds/1/index.html",
        index_html(base, "foo", 1).replace(JS, old_js),
    );
    site.write(
        &format!("foo/builds/1/{old_js}"),
        "console.log('build one');\n",
    );
    site.write(
        &format!("foo/assets/{}", &old_js["assets/".len()..]),
        "console.log('build one');\n",
    );
    site.write(&format!("foo/builds/2/{JS}"), "console.log('build two');\n");
    site.switch_current("foo", 2);
}

#[test]
fn pinned_build_urls_keep_showing_their_build_after_current_moves() {
    let site = site();
    with_two_builds_of_different_assets(&site, "/preview/foo/");
    let n = path_mode(&site, &[]);
    assert_app(&get(&n, "/preview/foo/"), "foo", 2, "the moving URL");
    assert_app(
        &get(&n, "/preview/foo/b/1/"),
        "foo",
        1,
        "build 1's pinned URL",
    );
    assert_app(
        &get(&n, "/preview/foo/b/1/some/route"),
        "foo",
        1,
        "a route of the pinned build",
    );
    assert_app(
        &get(&n, "/preview/foo/b/2/"),
        "foo",
        2,
        "build 2's pinned URL",
    );
    let r = get(&n, "/preview/foo/b/1");
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(r.header("location"), Some("/preview/foo/b/1/"));
    // The pinned page names its assets under the moving base; they are still there.
    let page = get(&n, "/preview/foo/b/1/").text();
    assert!(
        page.contains("/preview/foo/assets/index-Old1Hash.js"),
        "{page}"
    );
    let js = get(&n, "/preview/foo/assets/index-Old1Hash.js");
    assert_eq!(js.status, 200, "{js:?}");
    assert!(js.text().contains("build one"));
    assert_eq!(
        js.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    // The current build's own file wins over the union, and a miss in both is a 404.
    assert!(get(&n, &format!("/preview/foo/{JS}"))
        .text()
        .contains("build two"));
    assert_eq!(get(&n, "/preview/foo/assets/index-Gone0000.js").status, 404);
    // A build that is not kept (or never was) is not found, not another build.
    // A build that is not kept (or never was) is a 404, never another build.
    let r = get(&n, "/preview/foo/b/9/");
    assert_eq!(r.status, 404, "{r:?}");
    assert!(!r.text().contains("foo build"), "{r:?}");
    // Only digits name a build: anything else under /b/ is a route of the moving app.
    assert_app(
        &get(&n, "/preview/foo/b/1x/"),
        "foo",
        2,
        "a route that looks like a build",
    );
    // Symlinks inside a pinned build are refused like everywhere else.
    let r = get(&n, "/preview/foo/b/1/assets/leak.txt");
    assert_eq!(r.leaked(), None, "{r:?}");
    assert_eq!(get(&n, "/preview/foo/b/1/.env").leaked(), None);
}

#[test]
fn origin_mode_pins_each_build_on_its_own_host() {
    let site = site();
    with_two_builds_of_different_assets(&site, "/");
    site.write("foo/builds/2/index.html", index_html("/", "foo", 2));
    let port = free_port();
    let _n = Nginx::start(
        port,
        &site.www,
        &[
            "--preview-url",
            &format!("http://{{project}}.preview.test:{port}"),
        ],
    );
    let host = |h: &str, target: &str| raw(port, h, target, &[]);
    assert_app(&host("foo.preview.test", "/"), "foo", 2, "the moving host");
    assert_app(
        &host("1--foo.preview.test", "/"),
        "foo",
        1,
        "build 1's host",
    );
    assert_app(
        &host("1--foo.preview.test", "/a/route"),
        "foo",
        1,
        "a route of build 1",
    );
    let js = host("1--foo.preview.test", "/assets/index-Old1Hash.js");
    assert_eq!(js.status, 200, "{js:?}");
    assert!(js.text().contains("build one"));
    let r = host("9--foo.preview.test", "/");
    assert_eq!(r.status, 404, "{r:?}");
    assert!(!r.text().contains("foo build"), "{r:?}");
    assert_eq!(
        host("1--foo.preview.test", "/assets/leak.txt").leaked(),
        None
    );
}

// ---------------------------------------------------------------------------------------------
// The front door: gitstore and the agent behind nginx
// ---------------------------------------------------------------------------------------------

#[test]
fn front_door_proxies_git_pushes_and_health_checks() {
    let site = site();
    let gs = Gitstore::start();
    let gs_addr = gs.base_url().trim_start_matches("http://").to_owned();
    let nobody = format!("127.0.0.1:{}", free_port());
    let n = path_mode(
        &site,
        &["--gitstore-listen", &gs_addr, "--agent-listen", &nobody],
    );
    let r = n.get("/gitstore/healthz", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, gs.http("GET", "/healthz", None, None).body);
    // /healthz is the agent's, and no agent is running here.
    assert_eq!(n.get("/healthz", &[]).status, 502);

    // A push bigger than any request buffer, streamed through to gitstore, and cloned back.
    let token = gs.create_client("through-nginx");
    let tmp = tempfile::tempdir().unwrap();
    let app = vite_app(&tmp.path().join("app"), "through nginx");
    let mut noise = vec![0u8; 8 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut noise)
        .unwrap();
    app.write("public/noise.bin", &noise);
    app.git_ok(&["add", "-A"]);
    app.git_ok(&["commit", "-q", "-m", "8 MiB of noise"]);
    let url = format!("http://kiln:{token}@127.0.0.1:{}/git/site.git", n.port());
    let out = app.push(&url, &["main"]);
    assert!(out.ok, "push through nginx: {}", out.stderr);
    let clone = Repo::clone(&url, &tmp.path().join("clone"));
    assert_eq!(clone.head(), app.head());
    let auth = format!("Bearer {token}");
    let r = n.get("/api/projects/site", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(&app.head()), "{}", r.body);
    // The agent answers a project's versions, rollback, export and the event stream (no agent
    // here: nginx's 502 shows where they went); the rest of /api/ is gitstore's.
    for agent_route in [
        "/api/projects/site/versions",
        "/api/projects/site/export",
        "/api/events",
        "/api/notifications/deliveries",
    ] {
        let r = n.get(agent_route, &[("Authorization", &auth)]);
        assert_eq!(r.status, 502, "{agent_route} goes to the agent: {}", r.body);
    }
    assert_eq!(
        n.get("/api/projects", &[("Authorization", &auth)]).status,
        200
    );
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

#[test]
fn tls_redirects_plain_http_and_serves_previews_over_https() {
    require_tool("openssl", "apt-get install -y openssl");
    require_tool("curl", "apt-get install -y curl");
    let site = site();
    let tls = tempfile::tempdir().unwrap();
    let (cert, key) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
    let out = run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert!(out.ok, "openssl: {}", out.stderr);
    set_mode(tls.path(), 0o755);
    let (http_port, https_port) = (free_port(), free_port());
    let https = format!("127.0.0.1:{https_port}");
    let n = Nginx::start(
        http_port,
        &site.www,
        &[
            "--preview-url",
            &format!("https://127.0.0.1:{https_port}/preview"),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--https-listen",
            &https,
        ],
    );
    let r = get(&n, "/preview/foo/?tab=2");
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://127.0.0.1:{https_port}/preview/foo/?tab=2").as_str())
    );
    // Verified against the certificate, over HTTP/2.
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-w",
            "\\n%{http_code} %{http_version}",
            "--cacert",
        ])
        .arg(&cert)
        .arg(format!("https://{https}/preview/foo/")));
    assert!(out.ok, "curl: {}", out.stderr);
    assert!(out.stdout.contains("foo build 1"), "{}", out.stdout);
    assert!(out.stdout.ends_with("200 2"), "{}", out.stdout);
}

// ---------------------------------------------------------------------------------------------
// kiln nginx check / render
// ---------------------------------------------------------------------------------------------

fn kiln_nginx(args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("kiln"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KILN_") {
            cmd.env_remove(k);
        }
    }
    run(cmd.arg("nginx").args(args))
}

#[test]
fn check_accepts_the_rendering_and_reports_what_nginx_rejects() {
    let nginx = nginx_bin();
    let nginx = nginx.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let runtime = tmp.path().to_str().unwrap();
    let out = kiln_nginx(&["check", "--nginx", nginx, "--runtime-dir", runtime]);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("nginx -t accepts the configuration"),
        "{}",
        out.stdout
    );

    let out = kiln_nginx(&[
        "check",
        "--nginx",
        nginx,
        "--runtime-dir",
        runtime,
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("/nonexistent/cert.pem") && out.stderr.contains("rejected"),
        "{}",
        out.stderr
    );

    let out = kiln_nginx(&[
        "check",
        "--nginx",
        nginx,
        "--runtime-dir",
        "/nonexistent/run",
    ]);
    assert!(!out.ok);
    assert!(out.stderr.contains("RuntimeDirectory="), "{}", out.stderr);

    let out = kiln_nginx(&[
        "check",
        "--nginx",
        "/nonexistent/nginx",
        "--runtime-dir",
        runtime,
    ]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("apt-get install -y nginx"),
        "{}",
        out.stderr
    );
}

#[test]
fn rejects_settings_that_would_misconfigure_nginx() {
    for (args, says) in [
        (
            &["--preview-url", "https://{project}.preview.example.com/app"][..],
            "KILN_PREVIEW_URL",
        ),
        (
            &["--generator-origins", "https://a.example; script-src *"],
            "KILN_GENERATOR_ORIGINS",
        ),
        (&["--publish-dir", "/srv/www\";\n"], "KILN_PUBLISH_DIR"),
        (&["--http-listen", "localhost"], "KILN_HTTP_LISTEN"),
        (&["--tls-cert", "/etc/kiln/cert.pem"], "KILN_TLS_KEY"),
    ] {
        let mut all = vec!["render"];
        all.extend(args);
        let out = kiln_nginx(&all);
        assert!(!out.ok, "{args:?} was accepted");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "nothing rendered for {args:?}");
    }
    // --out writes the same text render prints.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("nginx.conf");
    let printed = kiln_nginx(&["render"]);
    assert!(printed.ok, "{}", printed.stderr);
    let written = kiln_nginx(&["render", "--out", file.to_str().unwrap()]);
    assert!(
        written.ok && written.stdout.is_empty(),
        "{}",
        written.stderr
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), printed.stdout);
}

// ---------------------------------------------------------------------------------------------
// End to end: a pushed app, built by the agent, served by nginx, framed by a generator
// ---------------------------------------------------------------------------------------------

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(120);

#[test]
fn browser_shows_a_pushed_app_in_a_cross_origin_frame_and_receives_its_console() {
    require_tool("node", "apt-get install -y nodejs npm");
    let chromium = Path::new("/usr/bin/chromium");
    assert!(
        chromium.is_file(),
        "Debian's Chromium is required by the browser test; install it with: apt-get install -y chromium"
    );
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    assert!(
        js.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing; install it with: cd tests/js && npm ci"
    );

    let (nginx_port, parent_port) = (free_port(), free_port());
    let parent = format!("http://127.0.0.1:{parent_port}");
    let url = format!("http://127.0.0.1:{nginx_port}/preview");
    let stack = Stack::start_with(&["--preview-url", &url, "--generator-origins", &parent]);
    // The stack's temp dir is 0700; production's publish dir sits under the agent's 0711 state
    // dir, which nginx's workers can pass through.
    set_mode(stack.publish_dir().parent().unwrap(), 0o711);
    let nginx = Nginx::start(
        nginx_port,
        &stack.publish_dir(),
        &[
            "--preview-url",
            &url,
            "--generator-origins",
            &parent,
            "--gitstore-listen",
            stack.gitstore.base_url().trim_start_matches("http://"),
            "--agent-listen",
            stack.agent_url().trim_start_matches("http://"),
        ],
    );

    // The fixture app plus what a generator wants to hear about: a log line, an uncaught error,
    // an unhandled rejection and a missing asset (a real 404 from nginx).
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app(&tmp.path().join("app"));
    let main = std::fs::read_to_string(app.path.join("src/main.tsx")).unwrap();
    app.commit_file(
        "src/main.tsx",
        format!(
            "{main}\nconsole.log('kiln-e2e: app started', {{ answer: 42 }})\n\
             setTimeout(() => {{ throw new Error('kiln-e2e: deliberate uncaught error') }}, 0)\n\
             Promise.reject(new Error('kiln-e2e: deliberate rejection'))\n\
             const img = document.createElement('img')\n\
             img.src = `${{import.meta.env.BASE_URL}}assets/kiln-e2e-missing.png`\n\
             document.body.appendChild(img)\n"
        ),
    );
    // Pushed through nginx's front door, as a generator on another machine would.
    let remote = format!(
        "http://kiln:{}@127.0.0.1:{nginx_port}/git/shop.git",
        stack.token
    );
    let out = app.push(&remote, &["main"]);
    assert!(out.ok, "push through nginx failed: {}", out.stderr);
    let st = stack.wait_settled("shop", &app.head(), COLD);
    assert_eq!(st["state"], "ready", "{st:#}\n{}", stack.build_log("shop"));
    let build = st["build"].as_u64().expect("build number");

    // The agent's API through the front door.
    let health = nginx.get("/healthz", &[]);
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["fast_engine_ready"], true, "{}", health.body);
    let auth = format!("Bearer {}", stack.token);
    let r = nginx.get("/status/shop", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["commit"], app.head().as_str());
    let r = nginx.get("/logs/shop", &[("Authorization", &auth)]);
    assert!(
        r.status == 200 && r.body.contains("==> build"),
        "{}",
        r.body
    );

    let preview = format!("{url}/shop/");
    let config = serde_json::json!({
        "previewUrl": preview,
        "parentPort": parent_port,
        "expectText": "first text",
        "wantMessages": [
            ["console", "kiln-e2e: app started"],
            ["error", "kiln-e2e: deliberate uncaught error"],
            ["unhandledrejection", "kiln-e2e: deliberate rejection"],
            ["resource", "kiln-e2e-missing.png"],
        ],
        "blockedHost": "other-generator.test",
    });
    let out = run(Command::new("node")
        .current_dir(&js)
        .arg("preview-in-frame.mjs")
        .arg(config.to_string()));
    let report: serde_json::Value = out
        .stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the browser script gave no report:\n{}\n{}",
                out.stdout, out.stderr
            )
        });
    assert!(
        out.ok,
        "the browser script failed: {report:#}\n{}",
        out.stderr
    );

    // (a) The app rendered inside the frame.
    let allowed = &report["allowed"];
    let text = allowed["frameText"].as_str().unwrap_or_default();
    assert!(
        text.contains("first text"),
        "the app did not render in the frame ({}); frame text: {text:?}\nreport: {allowed:#}",
        allowed["renderError"]
    );
    // (b) Its console reached the parent, from the preview's origin, naming project and build.
    let messages = allowed["messages"].as_array().cloned().unwrap_or_default();
    let find = |kind: &str, needle: &str| {
        messages
            .iter()
            .find(|m| m["data"]["type"] == kind && m["data"].to_string().contains(needle))
            .cloned()
    };
    let missing_script = if stack
        .published("shop", "index.html")
        .is_some_and(|i| i.contains("postMessage"))
    {
        ""
    } else {
        " (the published index.html has no console script: the agent did not inject it)"
    };
    let log = find("console", "kiln-e2e: app started").unwrap_or_else(|| {
        panic!("no console message reached the parent{missing_script}; got: {messages:#?}\n{allowed:#}")
    });
    assert_eq!(log["origin"], format!("http://127.0.0.1:{nginx_port}"));
    let data = &log["data"];
    assert_eq!(data["kiln"], 1);
    assert_eq!(data["level"], "log");
    assert_eq!(data["project"], "shop");
    assert_eq!(data["build"], build);
    assert!(data["time"].is_u64(), "{data}");
    assert_eq!(data["args"][0], "kiln-e2e: app started");
    assert_eq!(data["args"][1], "{\"answer\":42}");
    let error = find("error", "kiln-e2e: deliberate uncaught error")
        .unwrap_or_else(|| panic!("no uncaught error reached the parent; got: {messages:#?}"));
    assert!(error["data"]["source"]
        .as_str()
        .is_some_and(|s| s.contains("/preview/shop/assets/")));
    assert!(error["data"]["line"].is_u64(), "{error}");
    find("unhandledrejection", "kiln-e2e: deliberate rejection")
        .unwrap_or_else(|| panic!("no unhandled rejection reached the parent; got: {messages:#?}"));
    let failed_load = messages
        .iter()
        .find(|m| m["data"]["type"] == "resource" && m["data"]["tag"] == "img")
        .unwrap_or_else(|| panic!("no failed load reached the parent; got: {messages:#?}"));
    // README: `resource` carries the URL that failed to load, which is what a generator shows.
    assert!(
        failed_load["data"]["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/preview/shop/assets/kiln-e2e-missing.png")),
        "the failed-load message names {} instead of the image that got nginx's 404 \
         (agent/src/console.js sets every message's `url` to the page's address, over \
         the resource's own): {failed_load:#}",
        failed_load["data"]["url"]
    );

    // A parent that frame-ancestors leaves out gets neither the app nor its messages.
    let blocked = &report["blocked"];
    assert!(
        !blocked["frameText"]
            .as_str()
            .unwrap_or_default()
            .contains("first text"),
        "Chromium showed the preview to a parent frame-ancestors does not allow: {blocked:#}"
    );
    assert_eq!(blocked["messages"], serde_json::json!([]), "{blocked:#}");
    assert!(
        blocked["parentConsole"]
            .to_string()
            .contains("frame-ancestors"),
        "{blocked:#}"
    );

    // A failed build: the status page takes the preview's place, readable by nginx's workers,
    // while the last good build's assets stay served for tabs still open on it.
    let index = nginx.get("/preview/shop/", &[]).body;
    let asset = index
        .split("/preview/shop/assets/")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(|name| format!("/preview/shop/assets/{name}"))
        .expect("an asset in index.html");
    app.commit_file("src/text.ts", "export const TEXT: string = ;\n");
    stack.push(&app, "shop");
    let st = stack.wait_settled("shop", &app.head(), WARM);
    assert_eq!(st["state"], "failed", "{st:#}");
    let r = nginx.get("/preview/shop/", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-kiln-preview"), Some("status"), "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(
        r.body.contains("text.ts"),
        "the page says what failed: {}",
        r.body
    );
    assert_eq!(nginx.get(&asset, &[]).status, 200, "{asset}");
}
