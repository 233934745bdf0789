//! Outbound notifications: a client that registered a URL with gitstore (`PUT
//! /api/notifications`) gets `build.started`, `build.succeeded` and `build.failed` for its
//! projects, POSTed as JSON and signed with its secret.
//!
//! The status write that makes an event only hands it to a bounded queue ([`Notifier::send`]
//! never waits); one task reads owners and registrations (cached) and starts a task per
//! delivery. Deliveries retry on connection errors, 5xx and 429 with exponential backoff, a
//! bounded number send at once and a bounded number wait for a retry; beyond that a delivery is
//! recorded as failed rather than queued. The last deliveries of each client stay in memory for
//! `GET /api/notifications/deliveries`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gitstore::notify::Registration;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::agent::Agent;
use crate::events::Event;
use crate::status::State;

/// Events waiting for their owner's registration to be read.
const QUEUE: usize = 1024;
/// HTTP requests in flight at once, across clients.
const SENDING: usize = 16;
/// Deliveries started and not yet finished (sending or waiting to retry).
const IN_PROGRESS: usize = 1024;
/// Tries per delivery: the first, then after 1, 2, 4, 8 and 16 s.
const TRIES: u32 = 6;
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Deliveries kept per client for the deliveries API.
const KEPT: usize = 50;
/// How long a registration read from the store is used: a new secret or URL (or a removal)
/// reaches the agent within this time.
const REGISTRATION_TTL: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    Pending,
    Delivered,
    Failed,
}

/// One delivery as `GET /api/notifications/deliveries` shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Delivery {
    pub(crate) id: String,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) project: String,
    pub(crate) build: u64,
    pub(crate) url: String,
    pub(crate) attempts: u32,
    pub(crate) status: Outcome,
    pub(crate) last_status_code: Option<u16>,
    pub(crate) last_error: Option<String>,
    pub(crate) at_ms: u64,
}

/// The body receivers get: the event, what kind of notification it is, and the delivery's id
/// (the same on every retry, so receivers can drop duplicates).
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    project: &'a str,
    build: u64,
    commit: Option<&'a str>,
    state: State,
    preview_url: &'a str,
    pinned_url: Option<&'a str>,
    error: Option<&'a str>,
    at_ms: u64,
    delivery_id: &'a str,
}

pub(crate) struct Notifier {
    queue: mpsc::Sender<Arc<Event>>,
    /// Taken by [`start`].
    events: Mutex<Option<mpsc::Receiver<Arc<Event>>>>,
    shared: Arc<Shared>,
}

struct Shared {
    http: reqwest::Client,
    sending: Semaphore,
    in_progress: Arc<Semaphore>,
    /// client id → its registration (None: none), and when it was read.
    registrations: Mutex<HashMap<String, (Option<Registration>, Instant)>>,
    /// client id → its newest deliveries, oldest first.
    deliveries: Mutex<HashMap<String, VecDeque<Delivery>>>,
}

/// What an event means to a receiver, if anything: intermediate phases are the event stream's.
fn kind(event: &Event) -> Option<&'static str> {
    match event.state {
        State::Queued if event.first => Some("build.started"),
        State::Ready => Some("build.succeeded"),
        State::Failed | State::TimedOut | State::Cancelled => Some("build.failed"),
        _ => None,
    }
}

impl Notifier {
    pub(crate) fn new() -> Self {
        let (queue, events) = mpsc::channel(QUEUE);
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            // A redirect would send the signed body somewhere the client did not register.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kiln-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        Self {
            queue,
            events: Mutex::new(Some(events)),
            shared: Arc::new(Shared {
                http,
                sending: Semaphore::new(SENDING),
                in_progress: Arc::new(Semaphore::new(IN_PROGRESS)),
                registrations: Mutex::default(),
                deliveries: Mutex::default(),
            }),
        }
    }

    /// Hands an event over for notification, without waiting: a full queue drops it (and says
    /// so in the log) rather than slow the build whose status write made it.
    pub(crate) fn send(&self, event: &Arc<Event>) {
        if kind(event).is_none() {
            return;
        }
        if self.queue.try_send(event.clone()).is_err() {
            log::error!(project = event.project.as_str(), build = event.build; "notification queue full; notification dropped");
        }
    }

    /// The newest deliveries to `client`, newest first.
    pub(crate) fn deliveries(&self, client: &str) -> Vec<Delivery> {
        let all = self.shared.deliveries.lock().expect("deliveries lock");
        all.get(client)
            .map(|d| d.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

impl Shared {
    async fn registration(
        &self,
        store: &gitstore::BlobStore,
        client: &str,
    ) -> Result<Option<Registration>, gitstore::notify::NotifyError> {
        let cached = {
            let regs = self.registrations.lock().expect("registrations lock");
            regs.get(client)
                .filter(|(_, at)| at.elapsed() < REGISTRATION_TTL)
                .map(|(r, _)| r.clone())
        };
        if let Some(r) = cached {
            return Ok(r);
        }
        let r = gitstore::notify::load(store, client).await?;
        let mut regs = self.registrations.lock().expect("registrations lock");
        if regs.len() > 10_000 {
            regs.clear();
        }
        regs.insert(client.to_owned(), (r.clone(), Instant::now()));
        Ok(r)
    }

    fn record(&self, client: &str, d: Delivery) {
        let mut all = self.deliveries.lock().expect("deliveries lock");
        let list = all.entry(client.to_owned()).or_default();
        if list.len() == KEPT {
            list.pop_front();
        }
        list.push_back(d);
    }

    fn update(&self, client: &str, id: &str, f: impl FnOnce(&mut Delivery)) {
        let mut all = self.deliveries.lock().expect("deliveries lock");
        if let Some(d) = all
            .get_mut(client)
            .and_then(|l| l.iter_mut().find(|d| d.id == id))
        {
            f(d);
        }
    }
}

/// Starts the task that turns events into deliveries. It holds the agent weakly and ends with
/// it (dropping the agent drops the queue's sender).
pub(crate) fn start(agent: &Arc<Agent>) {
    let Some(mut events) = agent.notifier.events.lock().expect("notifier lock").take() else {
        return;
    };
    let weak: Weak<Agent> = Arc::downgrade(agent);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Some(agent) = weak.upgrade() else { return };
            dispatch(&agent, &event).await;
        }
    });
}

/// Finds who wants `event` and starts its delivery.
async fn dispatch(agent: &Agent, event: &Event) {
    let Some(kind) = kind(event) else { return };
    let p = event.project.as_str();
    let client = match agent.events.owner(&agent.store, p).await {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            log::warn!(project = p, error:% = e; "cannot read the project's owner; notification skipped");
            return;
        }
    };
    let shared = &agent.notifier.shared;
    let reg = match shared.registration(&agent.store, &client).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            log::warn!(project = p, client, error:% = e; "cannot read the notification registration; notification skipped");
            return;
        }
    };
    let id = {
        use rand::Rng;
        format!("dlv_{}", hex::encode(rand::rng().random::<[u8; 12]>()))
    };
    let body = serde_json::to_vec(&Body {
        kind,
        project: p,
        build: event.build,
        commit: event.commit.as_deref(),
        state: event.state,
        preview_url: &event.preview_url,
        pinned_url: event.pinned_url.as_deref(),
        error: event.error.as_deref(),
        at_ms: event.at_ms,
        delivery_id: &id,
    })
    .expect("serializes");
    let mut record = Delivery {
        id: id.clone(),
        kind,
        project: p.to_owned(),
        build: event.build,
        url: reg.url.clone(),
        attempts: 0,
        status: Outcome::Pending,
        last_status_code: None,
        last_error: None,
        at_ms: event.at_ms,
    };
    let Ok(slot) = shared.in_progress.clone().try_acquire_owned() else {
        record.status = Outcome::Failed;
        record.last_error = Some("too many deliveries in progress on this agent".into());
        shared.record(&client, record);
        log::error!(project = p, client; "too many notification deliveries in progress; one dropped");
        return;
    };
    shared.record(&client, record);
    let shared = shared.clone();
    tokio::spawn(async move {
        deliver(&shared, &client, &id, kind, &reg, body).await;
        drop(slot);
    });
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `sha256=<hex>` over `<timestamp>.<body>`: the timestamp is signed so a captured delivery
/// cannot be replayed later than receivers' window.
pub(crate) fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    gitstore::webhook::timestamped_signature(secret.as_bytes(), timestamp, body)
}

async fn deliver(
    shared: &Shared,
    client: &str,
    id: &str,
    kind: &'static str,
    reg: &Registration,
    body: Vec<u8>,
) {
    let mut delay = FIRST_RETRY;
    for attempt in 1..=TRIES {
        let sent = {
            let _turn = shared.sending.acquire().await.expect("never closed");
            // Signed per attempt: a retry minutes later still has a fresh timestamp.
            let ts = unix_secs();
            shared
                .http
                .post(&reg.url)
                .header("Content-Type", "application/json")
                .header("X-Kiln-Event", kind)
                .header("X-Kiln-Delivery", id)
                .header("X-Kiln-Timestamp", ts.to_string())
                .header("X-Kiln-Signature-256", signature(&reg.secret, ts, &body))
                .body(body.clone())
                .send()
                .await
        };
        let (code, error, retry) = match sent {
            Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None, false),
            Ok(r) => {
                let s = r.status();
                let retry = s.is_server_error() || s.as_u16() == 429;
                (Some(s.as_u16()), Some(format!("answered {s}")), retry)
            }
            // Only the kind of failure: the receiver's network details stay on this machine.
            Err(e) if e.is_timeout() => (None, Some(format!("no answer within {TIMEOUT:?}")), true),
            Err(e) if e.is_connect() => (None, Some("cannot connect".to_owned()), true),
            Err(e) if e.is_builder() => (None, Some("the url cannot be requested".into()), false),
            Err(_) => (None, Some("the request failed".to_owned()), true),
        };
        let done = error.is_none() || !retry || attempt == TRIES;
        let outcome = match (&error, done) {
            (None, _) => Outcome::Delivered,
            (Some(_), true) => Outcome::Failed,
            (Some(_), false) => Outcome::Pending,
        };
        shared.update(client, id, |d| {
            d.attempts = attempt;
            d.status = outcome;
            d.last_status_code = code;
            d.last_error = error.clone();
        });
        if done {
            match &error {
                None => log::info!(client, delivery = id, kind, attempt; "notification delivered"),
                Some(e) => {
                    log::warn!(client, delivery = id, kind, attempt, error = e.as_str(); "notification failed")
                }
            }
            return;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_the_timestamp_and_the_body() {
        let s = signature("whsec_k", 1_700_000_000, b"{\"a\":1}");
        assert_eq!(
            s,
            gitstore::webhook::signature(b"whsec_k", b"1700000000.{\"a\":1}")
        );
        assert_ne!(s, signature("whsec_k", 1_700_000_001, b"{\"a\":1}"));
        assert_ne!(s, signature("whsec_k", 1_700_000_000, b"{\"a\":2}"));
    }
}
