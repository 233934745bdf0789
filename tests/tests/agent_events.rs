//! Live build state without polling, and outbound notifications: the agent's `GET /api/events`
//! (server-sent events) read off a raw socket, and signed notifications posted to a receiver
//! this test runs, registered through gitstore's `PUT /api/notifications`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(120);

/// A static site: no install and no Vite, so it is ready within a second of the push.
fn static_app(path: &std::path::Path, text: &str) -> Repo {
    let r = Repo::init(path);
    r.commit_file("index.html", format!("<!doctype html><p>{text}</p>\n"));
    r
}

/// One server-sent event.
#[derive(Clone, Debug)]
struct SseEvent {
    kind: String,
    id: Option<u64>,
    data: serde_json::Value,
}

impl SseEvent {
    fn state(&self) -> &str {
        self.data["state"].as_str().unwrap_or_default()
    }
}

/// An open `/api/events` stream: a thread reads the socket (de-chunking the body) and hands over
/// each event as it is complete.
struct Sse {
    events: mpsc::Receiver<SseEvent>,
    /// Comment lines (keep-alives), in order.
    comments: Arc<Mutex<Vec<String>>>,
    socket: TcpStream,
}

impl Sse {
    /// Opens the stream; Err carries the status and body of a refusal.
    fn open(
        stack: &Stack,
        query: &str,
        token: Option<&str>,
        last_id: Option<&str>,
    ) -> Result<Self, (u16, String)> {
        let authority = format!("127.0.0.1:{}", stack.agent_port);
        let socket = TcpStream::connect(&authority).expect("connecting to the agent");
        let mut req = format!(
            "GET /api/events{query} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n"
        );
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(id) = last_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        (&socket).write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim_end().is_empty() {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        let status: u16 = head[0].split(' ').nth(1).unwrap().parse().unwrap();
        let header = |name: &str| {
            head.iter()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        };
        if status != 200 {
            let len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
        assert!(
            header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")),
            "{head:?}"
        );
        let (tx, events) = mpsc::channel();
        let comments = Arc::default();
        let c = Arc::clone(&comments);
        std::thread::spawn(move || read_events(reader, tx, c));
        Ok(Self {
            events,
            comments,
            socket,
        })
    }

    fn next(&self, timeout: Duration) -> Option<SseEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Whether the agent ends the stream within `timeout` (events meanwhile are ignored).
    fn ends_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    /// Every event up to and including the first that `done` accepts.
    fn until(&self, timeout: Duration, done: impl Fn(&SseEvent) -> bool) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(e) = self.next(deadline.saturating_duration_since(Instant::now())) {
            let last = done(&e);
            seen.push(e);
            if last {
                return seen;
            }
        }
        panic!("the awaited event did not come within {timeout:?}; events so far: {seen:#?}");
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

/// Reads a chunked `text/event-stream` body into events until the connection ends.
fn read_events(
    mut reader: BufReader<TcpStream>,
    tx: mpsc::Sender<SseEvent>,
    comments: Arc<Mutex<Vec<String>>>,
) {
    let mut text = String::new();
    let (mut kind, mut id, mut data) = (String::new(), None, String::new());
    loop {
        let mut size = String::new();
        if reader.read_line(&mut size).unwrap_or(0) == 0 {
            return;
        }
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return;
        };
        if size == 0 {
            return;
        }
        let mut chunk = vec![0; size + 2];
        if reader.read_exact(&mut chunk).is_err() {
            return;
        }
        text.push_str(std::str::from_utf8(&chunk[..size]).expect("utf-8 events"));
        while let Some(i) = text.find('\n') {
            let line: String = text.drain(..=i).collect();
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if !data.is_empty() {
                    let event = SseEvent {
                        kind: std::mem::take(&mut kind),
                        id: id.take(),
                        data: serde_json::from_str(&data).expect("event data is JSON"),
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
                data.clear();
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse().expect("numeric ids"));
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            } else {
                assert!(line.starts_with(':'), "not an SSE line: {line:?}");
                comments.lock().unwrap().push(line.to_owned());
            }
        }
    }
}

#[test]
fn a_push_streams_its_states_to_its_owner_only_and_resumes_without_repeats() {
    let stack = Stack::start();
    let other = stack.gitstore.create_client("someone-else");
    let mine = Sse::open(&stack, "", Some(&stack.token), None).expect("stream opens");
    let theirs = Sse::open(&stack, "", Some(&other), None).expect("stream opens");

    let tmp = tempfile::tempdir().unwrap();
    let their_app = static_app(&tmp.path().join("theirs"), "not yours");
    let out = their_app.push(&stack.gitstore.git_url(&other, "theirs"), &["main"]);
    assert!(out.ok, "{}", out.stderr);
    let app = fixture_app(&tmp.path().join("app"));
    stack.push(&app, "shop");

    let seen = mine.until(COLD, |e| {
        e.data["project"] == "shop"
            && !matches!(
                e.state(),
                "queued" | "syncing" | "installing" | "building" | "publishing"
            )
    });
    assert!(
        seen.iter()
            .all(|e| e.data["project"] == "shop" && e.kind == "build"),
        "only my project's build events: {seen:#?}"
    );
    let states: Vec<&str> = seen.iter().map(SseEvent::state).collect();
    assert_eq!(
        states,
        [
            "queued",
            "syncing",
            "installing",
            "building",
            "publishing",
            "ready"
        ],
        "one event per transition, none per phase write: {seen:#?}"
    );
    let ids: Vec<u64> = seen
        .iter()
        .map(|e| e.id.expect("every event has an id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let ready = &seen.last().unwrap().data;
    assert_eq!(ready["commit"], app.head().as_str(), "{ready:#}");
    assert_eq!(ready["build"], 1, "{ready:#}");
    assert_eq!(
        ready["preview_url"], "http://127.0.0.1:9/shop/",
        "{ready:#}"
    );
    assert_eq!(
        ready["pinned_url"], "http://127.0.0.1:9/shop/b/1/",
        "{ready:#}"
    );
    assert!(
        ready["error"].is_null() && ready["at_ms"].as_u64().unwrap() > 0,
        "{ready:#}"
    );
    assert_eq!(
        seen[0].data["commit"],
        serde_json::Value::Null,
        "unknown until the sync"
    );

    // The other client saw its own build and nothing of mine.
    let their_seen = theirs.until(WARM, |e| e.state() == "ready");
    if let Some(e) = theirs.next(Duration::from_millis(500)) {
        panic!("nothing more for the other client, got {e:#?}");
    }
    assert!(
        their_seen.iter().all(|e| e.data["project"] == "theirs"),
        "{their_seen:#?}"
    );

    // Resuming after the second event replays exactly the rest, other clients' events left out
    // though the ring holds them, and then waits for new ones.
    for query in ["", "?project=shop"] {
        let resumed = Sse::open(&stack, query, Some(&stack.token), Some(&ids[1].to_string()))
            .expect("stream opens");
        let replay = resumed.until(Duration::from_secs(10), |e| e.id == Some(ids[5]));
        assert_eq!(
            replay.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
            ids[2..],
            "{replay:#?}"
        );
        assert_eq!(replay.last().unwrap().data, *ready);
        if let Some(e) = resumed.next(Duration::from_secs(1)) {
            panic!("no repeats after the replay, got {e:#?}");
        }
    }

    // An id the agent no longer holds (or never gave) asks the client to re-read statuses.
    for stale in ["1", "not-a-number"] {
        let reset = Sse::open(&stack, "", Some(&stack.token), Some(stale)).expect("stream opens");
        let first = reset.next(Duration::from_secs(10)).expect("a reset");
        assert_eq!(first.kind, "reset", "{first:#?}");
        assert!(first.id.unwrap() >= ids[5], "{first:#?}");
    }

    // The stream goes on: a rebuild shows up live.
    let r = stack.agent_http("POST", "/build/shop");
    assert_eq!(r.status, 202, "{}", r.body);
    let next = mine.until(WARM, |e| e.state() == "ready");
    assert!(next.iter().all(|e| e.data["build"] == 2), "{next:#?}");
    assert!(next[0].id.unwrap() > ids[5]);
}

#[test]
fn refuses_event_streams_without_a_token_or_for_another_clients_project() {
    let stack = Stack::start();
    let other = stack.gitstore.create_client("someone-else");
    let r = stack.gitstore.http(
        "POST",
        "/api/projects",
        Some(&other),
        Some(r#"{"id":"theirs"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);

    let (status, body) = Sse::open(&stack, "", None, None).err().expect("refused");
    assert_eq!(status, 401, "{body}");
    let (status, body) = Sse::open(&stack, "", Some("kiln_aaaaaaaaaaaa_forged"), None)
        .err()
        .expect("refused");
    assert_eq!(status, 401, "{body}");
    let (status, body) = Sse::open(&stack, "?project=theirs", Some(&stack.token), None)
        .err()
        .expect("refused");
    assert_eq!(status, 404, "another client's project looks absent: {body}");
    let (status, body) = Sse::open(&stack, "?project=..%2Fetc", Some(&stack.token), None)
        .err()
        .expect("refused");
    assert_eq!(status, 400, "{body}");
    assert!(Sse::open(&stack, "?project=theirs", Some(&other), None).is_ok());

    let url = format!("{}/api/notifications/deliveries", stack.agent_url());
    let r = http("GET", &url, &[], b"");
    assert_eq!(r.status, 401, "{}", r.body);
    let r = stack.agent_http("GET", "/api/notifications/deliveries");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deliveries"], serde_json::json!([]));
}

#[test]
fn refuses_a_revoked_token_at_the_next_keep_alive() {
    let stack = Stack::start();
    let token = stack.gitstore.create_client("short-lived");
    let stream = Sse::open(&stack, "", Some(&token), None).expect("stream opens");
    let started = Instant::now();
    while !stream
        .comments
        .lock()
        .unwrap()
        .iter()
        .any(|c| c == ": keep-alive")
    {
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "a keep-alive every 15 s: {:?}",
            stream.comments.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!stream.ends_within(Duration::from_millis(200)));
    // Revoked in the store, as `DELETE /api/clients/<id>` does.
    let id = token.split('_').nth(1).unwrap();
    let record = stack
        .gitstore
        .store_dir()
        .join(format!("clients/{id}.json"));
    let mut client: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    client["revoked"] = true.into();
    std::fs::write(&record, client.to_string()).unwrap();
    assert!(
        stream.ends_within(Duration::from_secs(25)),
        "the stream of a revoked token ends at a keep-alive"
    );
}

#[test]
fn refuses_notification_urls_that_are_not_http_and_registration_without_a_token() {
    let gitstore = Gitstore::start();
    let token = gitstore.create_client("generator");
    let put = |body: &str, token: Option<&str>| {
        gitstore.http("PUT", "/api/notifications", token, Some(body))
    };
    for bad in [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "example.com/hook",
        "https://user:pw@example.com/hook",
        "",
    ] {
        let r = put(&serde_json::json!({ "url": bad }).to_string(), Some(&token));
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let long = format!("https://example.com/{}", "a".repeat(4096));
    let r = put(
        &serde_json::json!({ "url": long }).to_string(),
        Some(&token),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = put(r#"{"url": "https://example.com/hook"}"#, None);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = put(
        r#"{"url": "https://example.com/hook"}"#,
        Some("kiln_aaaaaaaaaaaa_forged"),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let r = gitstore.http("GET", "/api/notifications", None, None);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = gitstore.http("DELETE", "/api/notifications", None, None);
    assert_eq!(r.status, 401, "{}", r.body);

    let r = gitstore.http("GET", "/api/notifications", Some(&token), None);
    assert_eq!(r.status, 404, "nothing registered yet: {}", r.body);
    let r = put(r#"{"url": "https://example.com/hook"}"#, Some(&token));
    assert_eq!(r.status, 200, "{}", r.body);
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 32, "{secret}");
    let r = gitstore.http("GET", "/api/notifications", Some(&token), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["url"], "https://example.com/hook");
    assert!(
        !r.body.contains(&secret),
        "the secret is shown once: {}",
        r.body
    );
    let stored = std::fs::read_to_string(
        gitstore
            .store_dir()
            .join("clients")
            .join(token.split('_').nth(1).unwrap())
            .join("notify.json"),
    )
    .expect("stored in the blob store");
    assert!(stored.contains("https://example.com/hook"), "{stored}");
    let r = gitstore.http("DELETE", "/api/notifications", Some(&token), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deleted"], true);
    let r = gitstore.http("GET", "/api/notifications", Some(&token), None);
    assert_eq!(r.status, 404, "{}", r.body);
}

/// One request the receiver got, and what it answered.
#[derive(Debug)]
struct Received {
    headers: Vec<(String, String)>,
    body: String,
    answered: u16,
    at_secs: u64,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header: {self:#?}"))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A notification receiver on a free port: answers 500 to the first two `build.succeeded`
/// deliveries and 200 to everything else, and reports each request.
fn receiver() -> (String, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/kiln/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut succeeded = 0;
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(&conn);
            let mut headers = Vec::new();
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.push((k.trim().to_owned(), v.trim().to_owned()));
                }
            }
            assert!(
                request_line.starts_with("POST /kiln/hook "),
                "{request_line}"
            );
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let body = String::from_utf8(body).unwrap();
            let mut answered = 200;
            if body.contains("\"type\":\"build.succeeded\"") {
                succeeded += 1;
                if succeeded <= 2 {
                    answered = 500;
                }
            }
            let _ = (&conn).write_all(
                format!("HTTP/1.1 {answered} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            let _ = conn.shutdown(Shutdown::Both);
            let got = Received {
                headers,
                body,
                answered,
                at_secs: unix_secs(),
            };
            if tx.send(got).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

/// Checks what every receiver must: a fresh timestamp and the signature over `<ts>.<body>`.
fn verify(got: &Received, secret: &str) {
    use hmac::Mac;
    let ts: u64 = got
        .header("X-Kiln-Timestamp")
        .parse()
        .expect("unix seconds");
    assert!(
        ts + 300 >= got.at_secs && ts <= got.at_secs + 5,
        "a fresh timestamp: {ts} at {}",
        got.at_secs
    );
    let sig = got.header("X-Kiln-Signature-256");
    let sig = hex::decode(sig.strip_prefix("sha256=").expect("sha256=<hex>")).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(got.body.as_bytes());
    mac.verify_slice(&sig)
        .unwrap_or_else(|_| panic!("the signature does not verify: {got:#?}"));
}

/// Waits for the deliveries API to show the delivery `id` settled; returns it.
fn settled_delivery(stack: &Stack, id: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let r = stack.agent_http("GET", "/api/notifications/deliveries");
        assert_eq!(r.status, 200, "{}", r.body);
        let list = r.json()["deliveries"].as_array().unwrap().clone();
        if let Some(d) = list.iter().find(|d| d["id"] == id) {
            if d["status"] != "pending" {
                return d.clone();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "delivery {id} did not settle: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_registered_url_gets_signed_notifications_retried_until_delivered() {
    let stack = Stack::start();
    let (url, received) = receiver();
    let r = stack.gitstore.http(
        "PUT",
        "/api/notifications",
        Some(&stack.token),
        Some(&serde_json::json!({ "url": url }).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let secret = r.json()["secret"].as_str().unwrap().to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let app = static_app(&tmp.path().join("app"), "hello");
    stack.push(&app, "hooked");
    stack.wait_settled("hooked", &app.head(), WARM);

    // build.started once, build.succeeded three times (500, 500, then 200): 1 s and 2 s apart.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(r) => got.push(r),
            Err(_) => panic!("4 requests expected, got {got:#?}"),
        }
    }
    for r in &got {
        verify(r, &secret);
        assert_eq!(r.header("Content-Type"), "application/json");
    }
    let started: Vec<_> = got
        .iter()
        .filter(|r| r.json()["type"] == "build.started")
        .collect();
    let succeeded: Vec<_> = got
        .iter()
        .filter(|r| r.json()["type"] == "build.succeeded")
        .collect();
    assert_eq!((started.len(), succeeded.len()), (1, 3), "{got:#?}");
    let s = started[0].json();
    assert_eq!(s["project"], "hooked");
    assert_eq!(s["state"], "queued");
    assert_eq!(s["build"], 1);
    let body = succeeded[2].json();
    assert_eq!(body["project"], "hooked", "{body:#}");
    assert_eq!(body["build"], 1, "{body:#}");
    assert_eq!(body["commit"], app.head().as_str(), "{body:#}");
    assert_eq!(body["state"], "ready", "{body:#}");
    assert_eq!(
        body["preview_url"], "http://127.0.0.1:9/hooked/",
        "{body:#}"
    );
    assert_eq!(
        body["pinned_url"], "http://127.0.0.1:9/hooked/b/1/",
        "{body:#}"
    );
    assert!(
        body["error"].is_null() && body["at_ms"].as_u64().unwrap() > 0,
        "{body:#}"
    );
    let id = body["delivery_id"].as_str().unwrap().to_owned();
    assert!(
        succeeded
            .iter()
            .all(|r| r.json()["delivery_id"] == id.as_str()),
        "retries keep the delivery id: {succeeded:#?}"
    );
    assert_eq!(
        succeeded.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    assert_ne!(
        started[0].json()["delivery_id"],
        id.as_str(),
        "each notification is its own delivery"
    );

    let d = settled_delivery(&stack, &id);
    assert_eq!(d["status"], "delivered", "{d:#}");
    assert_eq!(d["attempts"], 3, "{d:#}");
    assert_eq!(d["last_status_code"], 200, "{d:#}");
    assert_eq!(d["type"], "build.succeeded", "{d:#}");
    assert_eq!(d["project"], "hooked", "{d:#}");
    assert_eq!(d["build"], 1, "{d:#}");
    assert_eq!(d["url"], url.as_str(), "{d:#}");
    let s = settled_delivery(&stack, started[0].json()["delivery_id"].as_str().unwrap());
    assert_eq!(
        (s["status"].as_str(), s["attempts"].as_u64()),
        (Some("delivered"), Some(1))
    );

    // A build that fails: a package.json with nothing to build.
    app.commit_file("package.json", r#"{"name":"hooked","private":true}"#);
    stack.push(&app, "hooked");
    let st = stack.wait_settled("hooked", &app.head(), COLD);
    assert_eq!(st["state"], "failed", "{st:#}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = received
            .recv_timeout(left)
            .expect("a build.failed notification");
        verify(&r, &secret);
        if r.json()["type"] == "build.failed" {
            break r.json();
        }
        assert_eq!(r.json()["type"], "build.started", "{r:#?}");
    };
    assert_eq!(failed["build"], 2, "{failed:#}");
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert_eq!(failed["commit"], app.head().as_str(), "{failed:#}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("nothing to build"), "{failed:#}");
    assert_eq!(error, st["error"].as_str().unwrap(), "the status's error");
    assert!(
        failed["pinned_url"].is_null(),
        "never published: {failed:#}"
    );
}
