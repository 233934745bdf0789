//! Which projects this agent builds when several agents share one blob store: those whose lease
//! (`gitstore::lease`) it holds. Off (every project is ours) unless `KILN_LEASE_SECS` is set.
//!
//! A lease is trusted for most of a term after it was last written (timed from before the write
//! was sent, on the monotonic clock), and renewed every third of a term, so a holder stops
//! publishing before anyone else may take the lease over. New claims keep the load even: an agent
//! claims only while it holds at most one more project than the least loaded live agent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gitstore::blob::{BlobStore, StoreError};
use gitstore::lease::{self, AgentRecord, Claim, Claimant, Held, Lease};
use gitstore::project::ProjectId;

/// How this agent takes part: its id, address, term and capacity.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub id: String,
    pub url: String,
    /// `host:port` serving this agent's previews, for a front door (empty: not advertised).
    pub preview: String,
    pub term: Duration,
    /// The most projects it holds at once.
    pub capacity: usize,
}

/// Who builds a project, as far as this agent can tell.
#[derive(Debug)]
pub enum Owner {
    Me,
    /// Another live agent holds the lease.
    Other(Lease),
    /// Free, but this agent will not take it: it is full, or others carry less.
    Declined(String),
}

pub(crate) struct Ownership {
    me: Claimant,
    capacity: usize,
    /// Held leases, each with when it was last written.
    held: Mutex<HashMap<String, (Held, Instant)>>,
    /// The other live agents as last read, for keeping the load even.
    peers: Mutex<Vec<AgentRecord>>,
}

impl Ownership {
    pub(crate) fn new(cfg: &LeaseConfig) -> Self {
        Self {
            me: Claimant {
                id: cfg.id.clone(),
                url: cfg.url.clone(),
                preview: cfg.preview.clone(),
                term: cfg.term,
            },
            capacity: cfg.capacity,
            held: Mutex::default(),
            peers: Mutex::default(),
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.me.id
    }

    pub(crate) fn preview(&self) -> &str {
        &self.me.preview
    }

    pub(crate) fn term(&self) -> Duration {
        self.me.term
    }

    pub(crate) fn holding(&self) -> usize {
        self.held.lock().expect("leases").len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Long enough before the term ends that another agent cannot have taken the lease yet.
    fn trust(&self) -> Duration {
        self.me.term * 5 / 6
    }

    /// Whether this agent may build and publish `project` now.
    pub(crate) fn trusted(&self, project: &str) -> bool {
        self.held
            .lock()
            .expect("leases")
            .get(project)
            .is_some_and(|(_, at)| at.elapsed() < self.trust())
    }

    /// Claims `project` unless another agent holds it, this agent is full, or others carry
    /// less (then one of them claims it).
    pub(crate) async fn ensure(
        &self,
        store: &BlobStore,
        project: &ProjectId,
    ) -> Result<Owner, StoreError> {
        if self.trusted(project.as_str()) {
            return Ok(Owner::Me);
        }
        let renewing = self
            .held
            .lock()
            .expect("leases")
            .contains_key(project.as_str());
        if !renewing {
            if let Some(why) = self.decline() {
                // Whoever holds it, if anyone, is the better answer.
                return Ok(match lease::read(store, project).await? {
                    Some(l) if l.live() && l.agent != self.me.id => Owner::Other(l),
                    _ => Owner::Declined(why),
                });
            }
        }
        let sent = Instant::now();
        match lease::claim(store, project, &self.me).await? {
            Claim::Won(h) => {
                self.held
                    .lock()
                    .expect("leases")
                    .insert(project.as_str().to_owned(), (h, sent));
                Ok(Owner::Me)
            }
            Claim::Taken(l) => {
                self.held.lock().expect("leases").remove(project.as_str());
                Ok(Owner::Other(l))
            }
        }
    }

    /// Why this agent should not claim another project now, if it should not.
    fn decline(&self) -> Option<String> {
        let mine = self.holding();
        if mine >= self.capacity {
            return Some(format!(
                "agent {} holds its capacity of {} projects (KILN_LEASE_CAPACITY)",
                self.me.id, self.capacity
            ));
        }
        let least = self
            .peers
            .lock()
            .expect("peers")
            .iter()
            .filter(|p| p.id != self.me.id)
            .map(|p| p.holding)
            .min()?;
        (mine > least + 1).then(|| {
            format!(
                "agent {} holds {mine} projects and another live agent {least}: that one takes it",
                self.me.id
            )
        })
    }

    /// Renews every held lease and announces this agent; returns the projects whose lease it lost
    /// (taken over, or not renewed within the trust window), which it must stop building.
    pub(crate) async fn renew(&self, store: &BlobStore) -> Vec<String> {
        let held: Vec<(String, Held)> = self
            .held
            .lock()
            .expect("leases")
            .iter()
            .map(|(p, (h, _))| (p.clone(), h.clone()))
            .collect();
        let mut lost = Vec::new();
        for (p, mut h) in held {
            let sent = Instant::now();
            match lease::renew(store, &mut h, self.me.term).await {
                Ok(true) => {
                    self.held.lock().expect("leases").insert(p, (h, sent));
                }
                Ok(false) => {
                    log::warn!(project = p.as_str(); "lease taken over by another agent; stopping its builds");
                    self.held.lock().expect("leases").remove(&p);
                    lost.push(p);
                }
                Err(e) => {
                    let mut held = self.held.lock().expect("leases");
                    let expired = held
                        .get(&p)
                        .is_none_or(|(_, at)| at.elapsed() >= self.trust());
                    if expired {
                        log::warn!(project = p.as_str(), error:% = e; "lease not renewed in time; stopping its builds");
                        held.remove(&p);
                        lost.push(p);
                    } else {
                        log::warn!(project = p.as_str(), error:% = e; "lease renewal failed; trying again");
                    }
                }
            }
        }
        if let Err(e) = lease::announce(store, &self.me, self.holding()).await {
            log::warn!(error:% = e; "cannot announce this agent in the blob store");
        }
        match lease::live_agents(store).await {
            Ok(peers) => *self.peers.lock().expect("peers") = peers,
            Err(e) => log::warn!(error:% = e; "cannot list the live agents"),
        }
        lost
    }

    /// Drops the lease of a project purged from the store.
    pub(crate) async fn remove(&self, store: &BlobStore, project: &str) {
        let held = self.held.lock().expect("leases").remove(project);
        if let Some((h, _)) = held {
            if let Err(e) = lease::remove(store, &h).await {
                log::warn!(project, error:% = e; "cannot remove the purged project's lease");
            }
        }
    }
}
