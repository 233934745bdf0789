//! What operators and neighbouring services see: signed and retried webhooks, CORS for browser
//! generators, `/healthz` and `/metrics`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::*;

/// One request as the webhook receiver saw it.
struct Delivery {
    at: Instant,
    request_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Delivery {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(s: &mut TcpStream, at: Instant) -> Option<Delivery> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(Delivery {
        at,
        request_line,
        headers,
        body,
    })
}

/// A receiver on a free port that answers 500 to its first request and 200 to every later one,
/// reporting each request on the returned channel.
fn flaky_receiver() -> (u16, mpsc::Receiver<Delivery>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let Some(d) = read_request(&mut s, Instant::now()) else {
                continue;
            };
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if tx.send(d).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

#[test]
fn webhook_delivered_signed_and_retried() {
    let (port, deliveries) = flaky_receiver();
    let g = Gitstore::start_with(Options::args(&[
        "--agent-url",
        &format!("http://127.0.0.1:{port}"),
    ]));
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Hooked");
    assert!(app.push(&g.git_url(&token, "hooked"), &["main"]).ok);
    let head = app.head();

    let wait = Duration::from_secs(20);
    let first = deliveries
        .recv_timeout(wait)
        .expect("no webhook delivery arrived");
    let retry = deliveries
        .recv_timeout(wait)
        .expect("the webhook was not retried after a 500");
    let gap = retry.at - first.at;
    assert!(
        gap >= Duration::from_millis(400),
        "retried after {gap:?}, without backoff"
    );
    for d in [&first, &retry] {
        assert!(
            d.request_line.starts_with("POST /sync-project/hooked "),
            "{}",
            d.request_line
        );
        let sig = d
            .header("X-Kiln-Signature-256")
            .expect("X-Kiln-Signature-256 header");
        let ts = d
            .header("X-Kiln-Timestamp")
            .expect("X-Kiln-Timestamp header");
        let signed = [format!("{ts}.").as_bytes(), &d.body].concat();
        assert_eq!(
            sig,
            format!(
                "sha256={}",
                hmac_sha256_hex(WEBHOOK_SECRET.as_bytes(), &signed)
            ),
            "the signature does not verify against the webhook secret and timestamp"
        );
        assert_ne!(
            sig,
            format!("sha256={}", hmac_sha256_hex(b"some-other-secret", &signed))
        );
        let v: serde_json::Value = serde_json::from_slice(&d.body).expect("JSON body");
        assert_eq!(v["project"], "hooked", "{v}");
        assert_eq!(v["ref"], "refs/heads/main", "{v}");
        assert_eq!(v["old"], "0".repeat(40), "{v}");
        assert_eq!(v["new"], head.as_str(), "{v}");
    }
    // The same announcement, but a new request: a replayed first attempt would be refused.
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&first.body).unwrap(),
        serde_json::from_slice(&retry.body).unwrap(),
    );
    assert_eq!((&a["attempt"], &b["attempt"]), (&1.into(), &2.into()));
    assert_ne!(
        first.header("X-Kiln-Signature-256"),
        retry.header("X-Kiln-Signature-256")
    );

    // Delivered: no further retries. The next push announces old -> new.
    assert!(
        deliveries
            .recv_timeout(Duration::from_millis(1500))
            .is_err(),
        "the webhook was retried after a 200"
    );
    let next = app.commit_file("src/next.js", "export const NEXT = 1;\n");
    assert!(app.push(&g.git_url(&token, "hooked"), &["main"]).ok);
    let d = deliveries
        .recv_timeout(wait)
        .expect("no delivery for the second push");
    let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(v["old"], head.as_str(), "{v}");
    assert_eq!(v["new"], next.as_str(), "{v}");
}

fn preflight(g: &Gitstore, origin: &str) -> Response {
    http(
        "OPTIONS",
        &format!(
            "{}/git/app.git/info/refs?service=git-upload-pack",
            g.base_url()
        ),
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "authorization"),
        ],
        b"",
    )
}

#[test]
fn cors_preflight_allows_only_configured_origins() {
    let g = Gitstore::start_with(Options::args(&["--cors-origin", "https://gen.example"]));
    let ok = preflight(&g, "https://gen.example");
    assert_eq!(ok.status, 204, "{ok:?}");
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://gen.example")
    );
    let headers = ok
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization"), "{ok:?}");
    assert!(
        ok.header("access-control-allow-methods")
            .unwrap_or_default()
            .contains("POST"),
        "{ok:?}"
    );
    // Actual responses carry the header too, so a browser can read them.
    let health = http(
        "GET",
        &format!("{}/healthz", g.base_url()),
        &[("Origin", "https://gen.example")],
        b"",
    );
    assert_eq!(
        health.header("access-control-allow-origin"),
        Some("https://gen.example")
    );
}

#[test]
fn rejects_cors_preflight_from_an_unlisted_origin() {
    let g = Gitstore::start_with(Options::args(&["--cors-origin", "https://gen.example"]));
    for origin in [
        "https://evil.example",
        "https://gen.example.evil.example",
        "http://gen.example",
        "null",
    ] {
        let r = preflight(&g, origin);
        assert_eq!(r.status, 403, "{origin}: {r:?}");
        assert_eq!(r.header("access-control-allow-origin"), None, "{origin}");
        let health = http(
            "GET",
            &format!("{}/healthz", g.base_url()),
            &[("Origin", origin)],
            b"",
        );
        assert_eq!(
            health.header("access-control-allow-origin"),
            None,
            "{origin}"
        );
    }
}

/// The value of one sample line, e.g. `kiln_gitstore_pushes_total{outcome="accepted"}`.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
}

#[test]
fn healthz_and_metrics_report_status_and_count_pushes() {
    let g = Gitstore::start();
    let health = g.http("GET", "/healthz", None, None);
    assert_eq!(health.status, 200);
    let v = health.json();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["blob_store"], "ok", "{v}");
    assert_eq!(v["cache_dir"], "ok", "{v}");

    let accepted = "kiln_gitstore_pushes_total{outcome=\"accepted\"}";
    let refused = "kiln_gitstore_pushes_total{outcome=\"refused\"}";
    let m = g.http("GET", "/metrics", None, None);
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{m:?}"
    );
    assert_eq!(sample(&m.body, accepted), 0);

    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Metrics");
    let url = g.git_url(&token, "metered");
    assert!(app.push(&url, &["main"]).ok);
    app.commit_file("src/two.js", "export const TWO = 2;\n");
    assert!(app.push(&url, &["main"]).ok);
    // A refused push (ref outside branches and tags) counts as refused, not accepted.
    assert!(!app.push(&url, &["main:refs/notes/x"]).ok);
    // A bad token counts as an auth failure.
    assert!(
        !git(
            work.path(),
            &["ls-remote", &g.git_url("kiln_aaaaaaaaaaaa_x", "metered")]
        )
        .ok
    );
    Repo::clone(&url, &work.path().join("clone"));

    let m = g.http("GET", "/metrics", None, None).body;
    assert_eq!(sample(&m, accepted), 2, "{m}");
    assert_eq!(sample(&m, refused), 1, "{m}");
    assert!(sample(&m, "kiln_gitstore_push_pack_bytes_total") > 0, "{m}");
    assert!(sample(&m, "kiln_gitstore_fetches_total") >= 1, "{m}");
    assert!(sample(&m, "kiln_gitstore_auth_failures_total") >= 1, "{m}");
}

#[test]
fn healthz_turns_unhealthy_when_the_blob_store_is_down() {
    let az = Azurite::start();
    az.create_container("health");
    let g = Gitstore::start_with(az.gitstore_options("health"));
    assert_eq!(g.http("GET", "/healthz", None, None).status, 200);
    drop(az);
    let r = g.http("GET", "/healthz", None, None);
    assert_eq!(r.status, 503, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "unhealthy", "{v}");
    assert_ne!(v["blob_store"], "ok", "{v}");
    assert_eq!(v["cache_dir"], "ok", "{v}");
}
