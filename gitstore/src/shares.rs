//! Share links and fork imports.
//!
//! A share is a token that opens one version of a project (`view`) or also lets another client
//! start a new project from that version with its history (`fork`). The token is
//! `<project>.<id>.<secret>`: the project finds the manifest in one read, the id names the share
//! in lists and revocation, and only the SHA-256 of the whole token is stored. Shares live in the
//! project's manifest, so creating or revoking one is a new generation like a push, every node
//! sees it at once, and a deleted project's shares die with it.
//!
//! An import copies no objects: the new project's first manifest lists the source's packs with
//! `from` naming the project whose prefix holds the bytes. That holder keeps a pack while an
//! importer lists it: the import records itself under `projects/<holder>/importers/<p>.json`
//! before it publishes, and the holder's garbage collection asks [`packs_in_use_by_importers`].

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::auth;
use crate::blob::{keys, BlobStore, StoreError};
use crate::manifest::{self, unix_now, Manifest, ManifestError, Publish, Share, ShareMode};
use crate::project::ProjectId;

/// Live (neither revoked nor expired) shares one project may have.
pub const MAX_LIVE_SHARES: usize = 100;
/// The longest a share may stay valid, in seconds (one year).
pub const MAX_EXPIRES_IN_SECS: u64 = 365 * 24 * 3600;
/// How long a share stays valid when the request does not say (30 days).
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 30 * 24 * 3600;
/// Dead (revoked or expired) shares kept listed; older ones are dropped so that a manifest, which
/// every sync reads, stays small.
const KEEP_DEAD_SHARES: usize = 20;
const ID_LEN: usize = 10;
const SECRET_LEN: usize = 32;
/// Attempts at publishing a generation before giving up on a contended manifest.
const PUBLISH_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("not a Kiln share token (expected <project>.<id>.<secret>)")]
    Malformed,
    #[error("unknown share token")]
    Unknown,
    #[error("share {id} was revoked by the project's owner")]
    Revoked { id: String },
    #[error("share {id} expired at {expires_at} (Unix seconds)")]
    Expired { id: String, expires_at: u64 },
    #[error("share {id} is a view share: importing needs a fork share")]
    NotFork { id: String },
    #[error("project {project} has no share {id}")]
    NoSuchShare { project: ProjectId, id: String },
    #[error("project {project} has {limit} live shares, the most allowed; revoke one (DELETE /api/projects/{project}/shares/<id>) or let one expire")]
    TooMany { project: ProjectId, limit: usize },
    #[error("expires_in_secs must be between 1 and {max} (one year); got {given}")]
    BadExpiry { given: u64, max: u64 },
    #[error("project {0} already has commits; import into a new project id")]
    Exists(ProjectId),
    #[error("too much contention on the manifest of project {0}; try again")]
    Contention(ProjectId),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The parts of a well-formed token: the project and the share id.
pub fn parse_token(token: &str) -> Option<(ProjectId, &str)> {
    let mut parts = token.split('.');
    let (project, id, secret) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let id_ok = id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    if !id_ok || !secret_ok {
        return None;
    }
    Some((ProjectId::parse(project).ok()?, id))
}

/// The share of `m` that `token` opens, live or not. Every stored hash is compared, each in
/// constant time, so the time taken says nothing about which one matched.
pub fn find<'m>(m: &'m Manifest, token: &str) -> Option<&'m Share> {
    let (_, id) = parse_token(token)?;
    let hash = auth::hash_token(token);
    let mut found = None;
    for s in &m.shares {
        if bool::from(hash.as_bytes().ct_eq(s.token_sha256.as_bytes())) {
            found = Some(s);
        }
    }
    found.filter(|s| s.id == id)
}

/// When a share created at `now` expires: `expires_in_secs` from now (default 30 days), at most
/// one year.
pub fn expiry(now: u64, expires_in_secs: Option<u64>) -> Result<u64, ShareError> {
    let secs = expires_in_secs.unwrap_or(DEFAULT_EXPIRES_IN_SECS);
    if secs == 0 || secs > MAX_EXPIRES_IN_SECS {
        return Err(ShareError::BadExpiry {
            given: secs,
            max: MAX_EXPIRES_IN_SECS,
        });
    }
    Ok(now + secs)
}

/// Publishes the successor of `project`'s latest manifest as `change` makes it, re-reading and
/// re-applying on a lost race. `change` decides again on every attempt, so a check it makes
/// (a share limit, a free project) holds for the generation that wins.
async fn update<T>(
    store: &BlobStore,
    project: &ProjectId,
    mut change: impl FnMut(&Manifest, &mut Manifest) -> Result<T, ShareError>,
) -> Result<(T, u64), ShareError> {
    for _ in 0..PUBLISH_ATTEMPTS {
        let base = manifest::latest(store, project).await?;
        let mut next = base.next();
        let out = change(&base, &mut next)?;
        if manifest::publish(store, project, &next).await? == Publish::Won {
            return Ok((out, next.generation));
        }
    }
    Err(ShareError::Contention(project.clone()))
}

/// Creates a share of `commit` (which the caller has checked is reachable from a ref of
/// `project`) and returns it with its token, which is shown this once and never stored.
pub async fn create(
    store: &BlobStore,
    project: &ProjectId,
    commit: &str,
    mode: ShareMode,
    expires_at: u64,
) -> Result<(Share, String), ShareError> {
    let id = auth::random_alnum(ID_LEN);
    let token = format!("{project}.{id}.{}", auth::random_alnum(SECRET_LEN));
    let share = Share {
        id,
        token_sha256: auth::hash_token(&token),
        commit: commit.to_owned(),
        mode,
        created_at: unix_now(),
        expires_at: Some(expires_at),
        revoked_at: None,
    };
    let (share, _) = update(store, project, |_, next| {
        let now = unix_now();
        let live = next.shares.iter().filter(|s| s.is_live(now)).count();
        if live >= MAX_LIVE_SHARES {
            return Err(ShareError::TooMany {
                project: project.clone(),
                limit: MAX_LIVE_SHARES,
            });
        }
        prune_dead(&mut next.shares, now);
        next.shares.push(share.clone());
        Ok(share.clone())
    })
    .await?;
    Ok((share, token))
}

/// Drops the oldest dead shares beyond [`KEEP_DEAD_SHARES`].
fn prune_dead(shares: &mut Vec<Share>, now: u64) {
    let died = |s: &Share| s.revoked_at.or(s.expires_at).unwrap_or(0);
    let mut dead: Vec<(u64, String)> = shares
        .iter()
        .filter(|s| !s.is_live(now))
        .map(|s| (died(s), s.id.clone()))
        .collect();
    if dead.len() <= KEEP_DEAD_SHARES {
        return;
    }
    dead.sort();
    let drop: BTreeSet<String> = dead[..dead.len() - KEEP_DEAD_SHARES]
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    shares.retain(|s| !drop.contains(&s.id));
}

/// Every share of `project`, revoked and expired ones included, oldest first.
pub async fn list(store: &BlobStore, project: &ProjectId) -> Result<Vec<Share>, ShareError> {
    Ok(manifest::latest(store, project).await?.shares)
}

/// Revokes share `id` of `project`; revoking a revoked share changes nothing.
pub async fn revoke(store: &BlobStore, project: &ProjectId, id: &str) -> Result<Share, ShareError> {
    let missing = || ShareError::NoSuchShare {
        project: project.clone(),
        id: id.to_owned(),
    };
    let current = manifest::latest(store, project).await?;
    let share = current
        .shares
        .iter()
        .find(|s| s.id == id)
        .ok_or_else(missing)?;
    if share.revoked_at.is_some() {
        return Ok(share.clone());
    }
    let (share, _) = update(store, project, |_, next| {
        let share = next
            .shares
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(missing)?;
        share.revoked_at.get_or_insert_with(unix_now);
        Ok(share.clone())
    })
    .await?;
    Ok(share)
}

/// The project and live share a token opens, for the agent's `/share/<token>` page and for
/// imports. Only a token this module created resolves: the project's shares are compared by
/// hash, each in constant time.
pub async fn resolve(store: &BlobStore, token: &str) -> Result<(ProjectId, Share), ShareError> {
    resolve_with_manifest(store, token)
        .await
        .map(|(p, s, _)| (p, s))
}

async fn resolve_with_manifest(
    store: &BlobStore,
    token: &str,
) -> Result<(ProjectId, Share, Manifest), ShareError> {
    let (project, _) = parse_token(token).ok_or(ShareError::Malformed)?;
    let m = manifest::latest(store, &project).await?;
    if m.deleted_at.is_some() {
        return Err(ShareError::Unknown);
    }
    let share = find(&m, token).ok_or(ShareError::Unknown)?;
    let now = unix_now();
    if share.revoked_at.is_some() {
        return Err(ShareError::Revoked {
            id: share.id.clone(),
        });
    }
    if let Some(expires_at) = share.expires_at.filter(|_| !share.is_live(now)) {
        return Err(ShareError::Expired {
            id: share.id.clone(),
            expires_at,
        });
    }
    let share = share.clone();
    Ok((project, share, m))
}

/// What an import made.
#[derive(Clone, Debug)]
pub struct Imported {
    pub source: ProjectId,
    pub share: Share,
    pub generation: u64,
    /// Packs listed from another project's prefix (none copied).
    pub packs_shared: usize,
}

/// Who records themselves as using a holder's packs, at `projects/<holder>/importers/<p>.json`.
#[derive(Serialize, Deserialize)]
struct ImporterRecord {
    importer: ProjectId,
    source: ProjectId,
    share: String,
    created_at: u64,
}

/// Starts `into` from the version a fork share opens: refs `{refs/heads/main: share.commit}`
/// and the source's packs, each with `from` naming the project that holds its bytes. `into`
/// must have no commits yet (the caller has claimed it for the importing client).
pub async fn import(
    store: &BlobStore,
    token: &str,
    into: &ProjectId,
) -> Result<Imported, ShareError> {
    let (source, share, source_m) = resolve_with_manifest(store, token).await?;
    if share.mode != ShareMode::Fork {
        return Err(ShareError::NotFork { id: share.id });
    }
    if &source == into {
        return Err(ShareError::Exists(into.clone()));
    }
    // A fork of a fork points at the project that holds the bytes, never at the middle one,
    // so the middle one's deletion or compaction cannot take bytes it never held from under it.
    let packs: Vec<_> = source_m
        .packs
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.from = Some(p.from.unwrap_or_else(|| source.clone()));
            p
        })
        .collect();
    let holders: BTreeSet<ProjectId> = packs.iter().filter_map(|p| p.from.clone()).collect();
    // Recorded before the manifest that lists the packs is published, so a holder's garbage
    // collection that runs in between already sees this importer.
    let record = ImporterRecord {
        importer: into.clone(),
        source: source.clone(),
        share: share.id.clone(),
        created_at: unix_now(),
    };
    let body = Bytes::from(serde_json::to_vec_pretty(&record).expect("serializes"));
    for holder in &holders {
        store
            .put(&keys::importer(holder, into), body.clone())
            .await?;
    }
    let refs = BTreeMap::from([("refs/heads/main".to_owned(), share.commit.clone())]);
    let (packs_shared, generation) = update(store, into, |base, next| {
        if !base.refs.is_empty() || !base.packs.is_empty() || base.deleted_at.is_some() {
            return Err(ShareError::Exists(into.clone()));
        }
        next.refs = refs.clone();
        next.head = Some("refs/heads/main".to_owned());
        next.packs = packs.clone();
        next.retired.clear();
        next.pushed_at = next.updated_at;
        Ok(packs.len())
    })
    .await?;
    log::info!(project:% = into, source:% = source, share = share.id.as_str(), generation; "imported from a fork share");
    Ok(Imported {
        source,
        share,
        generation,
        packs_shared,
    })
}

/// Names of `holder`'s packs that some importer's latest manifest lists: garbage collection of
/// `holder` must keep them whatever `holder`'s own manifest says.
pub async fn packs_in_use_by_importers(
    store: &BlobStore,
    holder: &ProjectId,
) -> Result<BTreeSet<String>, ShareError> {
    let mut names = BTreeSet::new();
    for listed in store.list(&keys::importers(holder), None).await? {
        let Some(importer) = listed
            .name
            .strip_suffix(".json")
            .and_then(|n| ProjectId::parse(n).ok())
        else {
            continue;
        };
        let m = manifest::latest(store, &importer).await?;
        names.extend(
            m.packs
                .iter()
                .filter(|p| p.from.as_ref() == Some(holder))
                .map(|p| p.name.clone()),
        );
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).unwrap();
        (dir, store)
    }

    fn project(name: &str) -> ProjectId {
        ProjectId::parse(name).unwrap()
    }

    /// A project with one pushed commit and one pack, as the push path would publish it.
    async fn pushed(store: &BlobStore, p: &ProjectId) {
        let mut m = Manifest::default().next();
        m.refs.insert("refs/heads/main".into(), "a".repeat(40));
        m.head = Some("refs/heads/main".into());
        m.packs.push(manifest::PackEntry {
            name: format!("pack-{}", "1".repeat(40)),
            pack_size: 10,
            pack_sha256: "0".repeat(64),
            idx_size: 10,
            idx_sha256: "0".repeat(64),
            objects: 3,
            replaces: Vec::new(),
            from: None,
        });
        assert_eq!(manifest::publish(store, p, &m).await.unwrap(), Publish::Won);
    }

    #[test]
    fn parses_only_the_token_shape_it_makes() {
        let good = format!("shop-1.{}.{}", "a1".repeat(5), "Zz9".repeat(10) + "ab");
        let (p, id) = parse_token(&good).unwrap();
        assert_eq!(p.as_str(), "shop-1");
        assert_eq!(id, "a1a1a1a1a1");
        for bad in [
            String::new(),
            "shop".into(),
            "shop.abc.def".into(),
            format!("shop.{}.{}", "A".repeat(10), "a".repeat(32)),
            format!("shop.{}.{}", "a".repeat(10), "a".repeat(31)),
            format!("shop.{}.{}.x", "a".repeat(10), "a".repeat(32)),
            format!("Shop.{}.{}", "a".repeat(10), "a".repeat(32)),
            format!(".{}.{}", "a".repeat(10), "a".repeat(32)),
            format!("shop.{}.{}", "a".repeat(10), "a-".repeat(16)),
        ] {
            assert!(parse_token(&bad).is_none(), "{bad:?} parsed");
        }
    }

    #[tokio::test]
    async fn a_share_resolves_until_revoked_and_only_by_its_token() {
        let (_d, store) = store();
        let p = project("shop");
        pushed(&store, &p).await;
        let exp = expiry(unix_now(), None).unwrap();
        let (share, token) = create(&store, &p, &"a".repeat(40), ShareMode::Fork, exp)
            .await
            .unwrap();
        assert!(token.starts_with("shop."));
        assert!(parse_token(&token).is_some());
        let (rp, rs) = resolve(&store, &token).await.unwrap();
        assert_eq!((rp, rs.id.clone()), (p.clone(), share.id.clone()));
        let stored = serde_json::to_string(&list(&store, &p).await.unwrap()).unwrap();
        assert!(!stored.contains(&token), "token stored in clear");

        // Same project and id, another secret: not ours.
        let forged = format!("shop.{}.{}", share.id, "b".repeat(32));
        assert!(matches!(
            resolve(&store, &forged).await,
            Err(ShareError::Unknown)
        ));
        revoke(&store, &p, &share.id).await.unwrap();
        assert!(matches!(
            resolve(&store, &token).await,
            Err(ShareError::Revoked { .. })
        ));
        assert!(matches!(
            revoke(&store, &p, "nosuchid00").await,
            Err(ShareError::NoSuchShare { .. })
        ));
    }

    #[tokio::test]
    async fn refuses_more_live_shares_than_the_limit() {
        let (_d, store) = store();
        let p = project("shop");
        pushed(&store, &p).await;
        let exp = expiry(unix_now(), Some(60)).unwrap();
        for _ in 0..MAX_LIVE_SHARES {
            create(&store, &p, &"a".repeat(40), ShareMode::View, exp)
                .await
                .unwrap();
        }
        let err = create(&store, &p, &"a".repeat(40), ShareMode::View, exp)
            .await
            .unwrap_err();
        assert!(matches!(err, ShareError::TooMany { .. }), "{err}");
    }

    #[test]
    fn expiry_is_bounded() {
        assert_eq!(expiry(100, Some(1)).unwrap(), 101);
        assert_eq!(expiry(100, None).unwrap(), 100 + DEFAULT_EXPIRES_IN_SECS);
        assert!(expiry(100, Some(0)).is_err());
        assert!(expiry(100, Some(MAX_EXPIRES_IN_SECS + 1)).is_err());
    }

    #[test]
    fn prunes_only_the_oldest_dead_shares() {
        let share = |id: usize, revoked: Option<u64>| Share {
            id: format!("{id:010}"),
            token_sha256: String::new(),
            commit: String::new(),
            mode: ShareMode::View,
            created_at: 0,
            expires_at: Some(1_000_000),
            revoked_at: revoked,
        };
        let mut shares: Vec<Share> = (0..30).map(|i| share(i, Some(i as u64))).collect();
        shares.push(share(99, None));
        prune_dead(&mut shares, 10);
        assert_eq!(shares.len(), KEEP_DEAD_SHARES + 1);
        assert!(shares.iter().any(|s| s.id == format!("{:010}", 99)));
        assert!(!shares.iter().any(|s| s.id == format!("{:010}", 0)));
    }

    #[tokio::test]
    async fn an_import_lists_the_holders_packs_and_pins_them() {
        let (_d, store) = store();
        let (a, b, c) = (project("a"), project("b"), project("c"));
        pushed(&store, &a).await;
        let exp = expiry(unix_now(), None).unwrap();
        let (_, fork) = create(&store, &a, &"a".repeat(40), ShareMode::Fork, exp)
            .await
            .unwrap();
        let (_, view) = create(&store, &a, &"a".repeat(40), ShareMode::View, exp)
            .await
            .unwrap();
        assert!(matches!(
            import(&store, &view, &b).await,
            Err(ShareError::NotFork { .. })
        ));
        let done = import(&store, &fork, &b).await.unwrap();
        assert_eq!(done.packs_shared, 1);
        let mb = manifest::latest(&store, &b).await.unwrap();
        assert!(mb.packs.iter().all(|p| p.from.as_ref() == Some(&a)));
        assert!(matches!(
            import(&store, &fork, &b).await,
            Err(ShareError::Exists(_))
        ));
        // A fork of the fork points at a, which holds the bytes.
        let (_, fork_b) = create(&store, &b, &"a".repeat(40), ShareMode::Fork, exp)
            .await
            .unwrap();
        import(&store, &fork_b, &c).await.unwrap();
        let mc = manifest::latest(&store, &c).await.unwrap();
        assert!(mc.packs.iter().all(|p| p.from.as_ref() == Some(&a)));
        let pinned = packs_in_use_by_importers(&store, &a).await.unwrap();
        assert_eq!(pinned.len(), 1);
        assert!(packs_in_use_by_importers(&store, &b)
            .await
            .unwrap()
            .is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// No string we did not make parses as one of ours, let alone resolves: anything that
        /// parses has exactly our shape, and a parsed token still needs its hash in the manifest.
        #[test]
        fn only_our_shape_parses(s in "\\PC{0,80}") {
            if let Some((p, id)) = parse_token(&s) {
                let parts: Vec<&str> = s.split('.').collect();
                prop_assert_eq!(parts.len(), 3);
                prop_assert_eq!(parts[0], p.as_str());
                prop_assert_eq!(parts[1], id);
                prop_assert_eq!(parts[2].len(), SECRET_LEN);
            }
        }

        #[test]
        fn a_random_token_for_a_shared_project_never_resolves(
            id in "[a-z0-9]{10}", secret in "[a-zA-Z0-9]{32}",
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (_d, store) = store();
                let p = project("shop");
                pushed(&store, &p).await;
                let exp = expiry(unix_now(), None).unwrap();
                let (_, real) = create(&store, &p, &"a".repeat(40), ShareMode::Fork, exp)
                    .await
                    .unwrap();
                let guess = format!("shop.{id}.{secret}");
                prop_assume!(guess != real);
                prop_assert!(matches!(resolve(&store, &guess).await, Err(ShareError::Unknown)));
                Ok(())
            })?;
        }
    }
}
