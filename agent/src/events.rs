//! Build state transitions as a live feed: what `GET /api/events` streams and what outbound
//! notifications are made from.
//!
//! [`Events::observe`] is called on every status write and turns only the writes that change a
//! build's state (phases write their timings too) into an [`Event`] with the next id. Events go
//! to a broadcast channel for live subscribers and into a bounded ring, so a client that
//! reconnects with `Last-Event-ID` gets what it missed, or a reset when the ring no longer
//! reaches back that far. Nothing here waits: a build's status write only takes a short lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gitstore::{BlobStore, ProjectId};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::config::Config;
use crate::status::{State, Status};

/// Events kept for `Last-Event-ID` resumption: minutes of a busy machine's transitions.
const RING: usize = 1000;

/// Events a live subscriber may fall behind by before it is dropped (it reconnects and resumes
/// from the ring).
const LAG: usize = 256;

/// A project with no owner may get one (created, then pushed); an owner never changes.
const NO_OWNER_TTL: Duration = Duration::from_secs(30);

/// One state transition of one build.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Event {
    /// Monotonic across the agent's restarts (ids start at the start time in milliseconds), so
    /// an id from before a restart is never mistaken for a newer one.
    #[serde(skip)]
    pub(crate) id: u64,
    /// The first event of this build (it was queued): outbound notifications say it started.
    #[serde(skip)]
    pub(crate) first: bool,
    pub(crate) project: String,
    pub(crate) build: u64,
    pub(crate) state: State,
    pub(crate) commit: Option<String>,
    /// The project's preview URL: this build once ready, else the building or failed page, or
    /// the last good build.
    pub(crate) preview_url: String,
    /// The URL that shows exactly this build's commit, once it is published.
    pub(crate) pinned_url: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) at_ms: u64,
}

/// What a subscriber gets first: the missed events, or a reset.
pub(crate) enum Resume {
    Missed(Vec<Arc<Event>>),
    /// The id is older than the ring (or from no run of this agent): re-read the statuses.
    Reset {
        newest: u64,
    },
}

struct Feed {
    /// The id the next event gets.
    next: u64,
    ring: VecDeque<Arc<Event>>,
    /// Per project, the build and state last seen, so a write that changes neither is no event.
    last: HashMap<String, (u64, State)>,
}

pub(crate) struct Events {
    feed: Mutex<Feed>,
    live: broadcast::Sender<Arc<Event>>,
    /// project → owning client id, with when a missing owner was read.
    owners: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            feed: Mutex::new(Feed {
                next: crate::status::now_ms(),
                ring: VecDeque::with_capacity(RING),
                last: HashMap::new(),
            }),
            live: broadcast::channel(LAG).0,
            owners: Mutex::default(),
        }
    }

    /// Records a status read from disk as already seen: a restart is not a transition.
    pub(crate) fn seen(&self, status: &Status) {
        let mut feed = self.feed.lock().expect("events lock");
        feed.last
            .entry(status.project.clone())
            .or_insert((status.build, status.state));
    }

    /// Called with every status about to be persisted: an event if its build or state changed.
    pub(crate) fn observe(&self, cfg: &Config, status: &Status) -> Option<Arc<Event>> {
        let mut feed = self.feed.lock().expect("events lock");
        let now = (status.build, status.state);
        let before = feed.last.insert(status.project.clone(), now);
        if before == Some(now) {
            return None;
        }
        let p = status.project.as_str();
        let published = status.last_good.as_ref().filter(|g| {
            status.state == State::Ready && status.commit.as_deref() == Some(g.commit.as_str())
        });
        let event = Arc::new(Event {
            id: feed.next,
            first: before.is_none_or(|(b, _)| b != status.build),
            project: p.to_owned(),
            build: status.build,
            state: status.state,
            commit: status.commit.clone(),
            preview_url: cfg.preview_url_for(p),
            // A build that found its commit already published serves the earlier build's.
            pinned_url: status
                .pinned_url
                .clone()
                .or_else(|| published.and_then(|g| g.pinned_url.clone())),
            error: status.error.clone(),
            at_ms: crate::status::now_ms(),
        });
        feed.next += 1;
        if feed.ring.len() == RING {
            feed.ring.pop_front();
        }
        feed.ring.push_back(event.clone());
        // Sent under the lock, so a subscriber's snapshot and its receiver neither overlap nor
        // leave a gap. No receivers is not an error.
        let _ = self.live.send(event.clone());
        Some(event)
    }

    /// A live receiver, and what a client that last saw `last_id` missed.
    pub(crate) fn subscribe(
        &self,
        last_id: Option<u64>,
    ) -> (broadcast::Receiver<Arc<Event>>, Resume) {
        let feed = self.feed.lock().expect("events lock");
        let rx = self.live.subscribe();
        let oldest = feed.ring.front().map_or(feed.next, |e| e.id);
        let resume = match last_id {
            None => Resume::Missed(Vec::new()),
            Some(id)
                if id
                    .checked_add(1)
                    .is_some_and(|n| (oldest..=feed.next).contains(&n)) =>
            {
                Resume::Missed(feed.ring.iter().filter(|e| e.id > id).cloned().collect())
            }
            Some(_) => Resume::Reset {
                newest: feed.next - 1,
            },
        };
        (rx, resume)
    }

    /// Drops the cached owner of a purged project, whose id anyone may claim again.
    pub(crate) fn forget_owner(&self, project: &str) {
        self.owners.lock().expect("owners lock").remove(project);
    }

    /// The client that owns `project`, read from the store and cached.
    pub(crate) async fn owner(
        &self,
        store: &BlobStore,
        project: &str,
    ) -> Result<Option<String>, gitstore::auth::AuthError> {
        let cached = self
            .owners
            .lock()
            .expect("owners lock")
            .get(project)
            .cloned();
        match cached {
            Some((Some(client), _)) => return Ok(Some(client)),
            Some((None, at)) if at.elapsed() < NO_OWNER_TTL => return Ok(None),
            _ => {}
        }
        let Ok(id) = ProjectId::parse(project) else {
            return Ok(None);
        };
        let owner = gitstore::auth::owner(store, &id).await?.map(|o| o.client);
        let mut owners = self.owners.lock().expect("owners lock");
        if owners.len() > 100_000 {
            owners.clear();
        }
        owners.insert(project.to_owned(), (owner.clone(), Instant::now()));
        Ok(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::config::test_config("http://127.0.0.1:8080/preview")
    }

    #[test]
    fn only_state_changes_are_events_and_ids_increase() {
        let (cfg, events) = (config(), Events::new());
        let mut st = Status::new("shop");
        st.begin(1, None, false);
        let queued = events.observe(&cfg, &st).expect("queued");
        assert!(queued.first);
        st.phases.insert("sync".into(), 3);
        assert!(events.observe(&cfg, &st).is_none(), "a phase write");
        st.state = State::Syncing;
        let syncing = events.observe(&cfg, &st).expect("syncing");
        assert!(!syncing.first && syncing.id == queued.id + 1);
        st.finish(State::Failed, Some("boom".into()));
        let failed = events.observe(&cfg, &st).expect("failed");
        assert_eq!(failed.error.as_deref(), Some("boom"));
        st.begin(2, None, false);
        assert!(events.observe(&cfg, &st).expect("next build").first);
        // A status loaded from disk is not news.
        let mut other = Status::new("other");
        other.build = 7;
        other.state = State::Ready;
        events.seen(&other);
        assert!(events.observe(&cfg, &other).is_none());
    }

    #[test]
    fn resumes_from_the_ring_or_asks_for_a_reset() {
        let (cfg, events) = (config(), Events::new());
        let (_, fresh) = events.subscribe(Some(0));
        assert!(matches!(fresh, Resume::Reset { .. }), "an id from no run");
        let mut st = Status::new("shop");
        let mut ids = Vec::new();
        for build in 1..=(RING as u64 + 10) {
            st.begin(build, None, false);
            ids.push(events.observe(&cfg, &st).unwrap().id);
        }
        let (mut rx, resume) = events.subscribe(Some(ids[ids.len() - 4]));
        let Resume::Missed(missed) = resume else {
            panic!("within the ring")
        };
        assert_eq!(
            missed.iter().map(|e| e.id).collect::<Vec<_>>(),
            ids[ids.len() - 3..]
        );
        let (_, resume) = events.subscribe(Some(*ids.last().unwrap()));
        assert!(matches!(resume, Resume::Missed(m) if m.is_empty()));
        let (_, resume) = events.subscribe(Some(ids[5]));
        assert!(
            matches!(resume, Resume::Reset { newest } if newest == *ids.last().unwrap()),
            "older than the ring"
        );
        let (_, resume) = events.subscribe(Some(ids.last().unwrap() + 5));
        assert!(matches!(resume, Resume::Reset { .. }), "from the future");
        st.begin(9999, None, false);
        let live = events.observe(&cfg, &st).unwrap();
        assert_eq!(rx.try_recv().unwrap().id, live.id);
    }
}
