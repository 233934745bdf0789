//! Which agent builds a project when several share one blob store: a lease, `leases/<p>.json`,
//! written only by compare-and-swap (Create when there is none, Update against the version last
//! read otherwise), so the store is the only arbiter and two agents never both win a project.
//!
//! A lease names its holder and when it runs out by the holder's wall clock; its holder renews
//! it well before that. A claimant may take a lease over once it has run out by its own clock,
//! so clocks must agree to well within a term (NTP does, by milliseconds). Holders also stop
//! trusting a lease a margin before its end (see the agent), which covers the rest.
//!
//! Agents also announce themselves (`agents/<id>.json`, with their address and how many leases
//! they hold), so a claimant can share the projects a dead agent left among the live ones, and
//! anything that must reach a project's builder can look it up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob::{keys, BlobStore, StoreError, Version};
use crate::project::ProjectId;

/// A project's lease as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's id.
    pub agent: String,
    /// Where the holder answers its API, for whoever must reach the project's builder.
    pub url: String,
    /// `host:port` of the server that serves the holder's previews (empty: not advertised), for
    /// a front door routing preview traffic.
    #[serde(default)]
    pub preview: String,
    /// Unix milliseconds, by the holder's clock, after which anyone may take the lease over.
    pub expires_at_ms: u64,
    /// Counts the claims of this lease: a renewal keeps it, a takeover adds one, so a holder's
    /// record tells one tenure from the next.
    pub tenure: u64,
}

impl Lease {
    pub fn live(&self) -> bool {
        now_ms() < self.expires_at_ms
    }
}

/// Who claims: an agent's id, its addresses and the term of the leases it writes.
#[derive(Clone, Debug)]
pub struct Claimant {
    pub id: String,
    pub url: String,
    pub preview: String,
    pub term: Duration,
}

/// A lease this agent holds, with the version a renewal must find.
#[derive(Clone, Debug)]
pub struct Held {
    pub project: ProjectId,
    pub lease: Lease,
    version: Version,
}

#[derive(Debug)]
pub enum Claim {
    Won(Held),
    /// Another agent holds it and its lease has not run out.
    Taken(Lease),
}

/// An agent as it announced itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub preview: String,
    /// Unix milliseconds: after this the agent is presumed dead.
    pub expires_at_ms: u64,
    /// Leases it held when it wrote this.
    pub holding: usize,
}

/// Agent ids are single path segments: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn valid_agent_id(id: &str) -> bool {
    let b = id.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && !id.bytes().any(|c| c.is_ascii_uppercase())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// The lease of `p`, if any. An unreadable one counts as run out.
pub async fn read(store: &BlobStore, p: &ProjectId) -> Result<Option<Lease>, StoreError> {
    Ok(read_versioned(store, p).await?.map(|(l, _)| l))
}

async fn read_versioned(
    store: &BlobStore,
    p: &ProjectId,
) -> Result<Option<(Lease, Version)>, StoreError> {
    let Some((bytes, version)) = store.get_versioned(&keys::lease(p)).await? else {
        return Ok(None);
    };
    let lease = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        log::warn!(project = p.as_str(), error:% = e; "unreadable lease; treated as run out");
        Lease::default()
    });
    Ok(Some((lease, version)))
}

/// Claims `p` for `me`: wins when there is no lease, when the lease is already `me`'s, or when it
/// has run out; otherwise names the live holder. Of concurrent claimants exactly one wins.
pub async fn claim(store: &BlobStore, p: &ProjectId, me: &Claimant) -> Result<Claim, StoreError> {
    // Twice at most: a lost race re-reads once and then reports the winner.
    for _ in 0..2 {
        let current = read_versioned(store, p).await?;
        let tenure = match &current {
            Some((l, _)) if l.agent == me.id => l.tenure,
            Some((l, _)) if l.live() => return Ok(Claim::Taken(l.clone())),
            Some((l, _)) => l.tenure + 1,
            None => 1,
        };
        let lease = Lease {
            agent: me.id.clone(),
            url: me.url.clone(),
            preview: me.preview.clone(),
            expires_at_ms: now_ms() + me.term.as_millis() as u64,
            tenure,
        };
        let expected = current.as_ref().map(|(_, v)| v);
        if let Some(version) = store
            .swap(&keys::lease(p), encode(&lease), expected)
            .await?
        {
            return Ok(Claim::Won(Held {
                project: p.clone(),
                lease,
                version,
            }));
        }
    }
    match read(store, p).await? {
        Some(l) => Ok(Claim::Taken(l)),
        // Released between our two reads; the next claim will find it free.
        None => Ok(Claim::Taken(Lease::default())),
    }
}

/// Extends `held` by a term. False when the lease is no longer `held`'s (taken over after it ran
/// out): the holder must stop building the project.
pub async fn renew(store: &BlobStore, held: &mut Held, term: Duration) -> Result<bool, StoreError> {
    let lease = Lease {
        expires_at_ms: now_ms() + term.as_millis() as u64,
        ..held.lease.clone()
    };
    match store
        .swap(
            &keys::lease(&held.project),
            encode(&lease),
            Some(&held.version),
        )
        .await?
    {
        Some(version) => {
            held.lease = lease;
            held.version = version;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Removes `held`'s lease: for a project purged from the store, whose lease would otherwise
/// outlive it.
pub async fn remove(store: &BlobStore, held: &Held) -> Result<(), StoreError> {
    store.delete(&keys::lease(&held.project)).await
}

/// Of `projects` (the store's listing), those that may be free: without a lease, or with one last
/// written more than a term ago (by the store's clock; [`claim`] decides by the lease itself).
/// One listing of `leases/`, whatever the number of projects' objects.
pub async fn unclaimed(
    store: &BlobStore,
    projects: &[ProjectId],
    term: Duration,
) -> Result<Vec<ProjectId>, StoreError> {
    let leases = store.list(&keys::leases(), None).await?;
    let stale_before = (now_ms() / 1000).saturating_sub(term.as_secs().max(1));
    let fresh: std::collections::HashSet<String> = leases
        .into_iter()
        .filter(|l| l.modified >= stale_before)
        .filter_map(|l| l.name.strip_suffix(".json").map(str::to_owned))
        .collect();
    Ok(projects
        .iter()
        .filter(|p| !fresh.contains(p.as_str()))
        .cloned()
        .collect())
}

/// Writes `me`'s announcement, good for a term.
pub async fn announce(store: &BlobStore, me: &Claimant, holding: usize) -> Result<(), StoreError> {
    let record = AgentRecord {
        id: me.id.clone(),
        url: me.url.clone(),
        preview: me.preview.clone(),
        expires_at_ms: now_ms() + me.term.as_millis() as u64,
        holding,
    };
    let bytes = Bytes::from(serde_json::to_vec(&record).expect("serializes"));
    store.put(&keys::agent(&me.id), bytes).await
}

/// Every agent whose announcement has not run out.
pub async fn live_agents(store: &BlobStore) -> Result<Vec<AgentRecord>, StoreError> {
    let listed = store.list(&keys::agents(), None).await?;
    let mut live = Vec::new();
    for l in listed {
        let Some(id) = l.name.strip_suffix(".json") else {
            continue;
        };
        if !valid_agent_id(id) {
            continue;
        }
        let record: Option<AgentRecord> = store.get_json(&keys::agent(id)).await.unwrap_or(None);
        if let Some(r) = record.filter(|r| r.expires_at_ms > now_ms()) {
            live.push(r);
        }
    }
    live.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(live)
}

fn encode(lease: &Lease) -> Bytes {
    Bytes::from(serde_json::to_vec(lease).expect("serializes"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(id: &str, term_ms: u64) -> Claimant {
        Claimant {
            id: id.into(),
            url: format!("http://{id}"),
            preview: format!("{id}:80"),
            term: Duration::from_millis(term_ms),
        }
    }

    fn project() -> ProjectId {
        ProjectId::parse("leased").unwrap()
    }

    #[tokio::test]
    async fn one_claimant_wins_and_the_others_see_it_until_it_runs_out() {
        let store = BlobStore::open("memory://").unwrap();
        let (a, b) = (me("a", 300), me("b", 300));
        let Claim::Won(held) = claim(&store, &project(), &a).await.unwrap() else {
            panic!("a free project was not won");
        };
        assert_eq!(held.lease.tenure, 1);
        match claim(&store, &project(), &b).await.unwrap() {
            Claim::Taken(l) => assert_eq!((l.agent.as_str(), l.url.as_str()), ("a", "http://a")),
            Claim::Won(_) => panic!("b took a live lease"),
        }
        tokio::time::sleep(Duration::from_millis(350)).await;
        let Claim::Won(taken) = claim(&store, &project(), &b).await.unwrap() else {
            panic!("b could not take over a lease that ran out");
        };
        assert_eq!(taken.lease.tenure, 2);
        // a's renewal finds the lease changed: it has lost the project.
        let mut stale = held;
        assert!(!renew(&store, &mut stale, a.term).await.unwrap());
        assert_eq!(read(&store, &project()).await.unwrap().unwrap().agent, "b");
    }

    #[tokio::test]
    async fn renewals_keep_a_lease_and_removing_it_frees_it_at_once() {
        let store = BlobStore::open("memory://").unwrap();
        let (a, b) = (me("a", 200), me("b", 200));
        let Claim::Won(mut held) = claim(&store, &project(), &a).await.unwrap() else {
            panic!("not won");
        };
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(renew(&store, &mut held, a.term).await.unwrap());
            assert!(matches!(
                claim(&store, &project(), &b).await.unwrap(),
                Claim::Taken(_)
            ));
        }
        remove(&store, &held).await.unwrap();
        assert!(matches!(
            claim(&store, &project(), &b).await.unwrap(),
            Claim::Won(_)
        ));
    }

    #[tokio::test]
    async fn of_many_racing_claimants_exactly_one_wins() {
        let store = BlobStore::open("memory://").unwrap();
        let claims = futures::future::join_all((0..8).map(|i| {
            let store = store.clone();
            async move { claim(&store, &project(), &me(&format!("a{i}"), 5000)).await }
        }))
        .await;
        let won = claims
            .iter()
            .filter(|c| matches!(c, Ok(Claim::Won(_))))
            .count();
        assert_eq!(won, 1);
    }

    #[test]
    fn agent_ids_are_single_lowercase_segments() {
        for ok in ["vm-1", "a", "build.eu-west.3", "x_y"] {
            assert!(valid_agent_id(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "a/b", "..", ".a", &"a".repeat(64), "a b"] {
            assert!(!valid_agent_id(bad), "{bad}");
        }
    }
}
