//! API clients (the app generators), their tokens, and which client owns which project.
//!
//! A token is `kiln_<client id>_<secret>`: the id finds the client record in one read, and only the
//! SHA-256 of the whole token is stored. Tokens carry 192 random bits, so a plain hash is enough;
//! a slow password hash would only slow down every git request.

use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::blob::{keys, BlobStore, Created, StoreError};
use crate::manifest::unix_now;
use crate::project::ProjectId;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Client {
    pub id: String,
    pub name: String,
    pub token_sha256: String,
    pub created_at: u64,
    #[serde(default)]
    pub revoked: bool,
    /// Limits the admin set for this client; unset ones take the daemon's defaults.
    #[serde(default, skip_serializing_if = "Quotas::is_empty")]
    pub quotas: Quotas,
}

/// Per-client limits. `None` means the operator's default applies (each daemon's `--quota-*`
/// flags); gitstore enforces `projects` and `stored_bytes`, the agent the two build limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds_per_hour: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_builds: Option<u64>,
}

impl Quotas {
    pub fn is_empty(&self) -> bool {
        *self == Quotas::default()
    }

    /// These limits with every unset one taken from `defaults`.
    pub fn or(&self, defaults: &Quotas) -> Quotas {
        Quotas {
            projects: self.projects.or(defaults.projects),
            stored_bytes: self.stored_bytes.or(defaults.stored_bytes),
            builds_per_hour: self.builds_per_hour.or(defaults.builds_per_hour),
            concurrent_builds: self.concurrent_builds.or(defaults.concurrent_builds),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub client: String,
    pub created_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing or malformed token")]
    Malformed,
    #[error("unknown or revoked token")]
    Rejected,
    #[error("client name must be 1 to 100 printable characters")]
    BadName,
    #[error("client {0} not found")]
    NoSuchClient(String),
    #[error("project {0} belongs to another client")]
    NotOwner(ProjectId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares a presented token with a stored hash in constant time.
pub fn token_matches(token: &str, sha256_hex: &str) -> bool {
    hash_token(token)
        .as_bytes()
        .ct_eq(sha256_hex.as_bytes())
        .into()
}

pub(crate) fn random_alnum(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Creates a client and returns it with its token, which is shown this once and never stored.
pub async fn create_client(store: &BlobStore, name: &str) -> Result<(Client, String), AuthError> {
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(AuthError::BadName);
    }
    let id = random_alnum(12);
    let token = format!("kiln_{id}_{}", random_alnum(38));
    let client = Client {
        id: id.clone(),
        name: name.to_owned(),
        token_sha256: hash_token(&token),
        created_at: unix_now(),
        revoked: false,
        quotas: Quotas::default(),
    };
    let body = Bytes::from(serde_json::to_vec_pretty(&client).expect("serializes"));
    match store.create(&keys::client(&id), body).await? {
        Created::Yes => Ok((client, token)),
        // 62 random bits of id colliding means a broken RNG, not bad luck.
        Created::AlreadyExists => Err(AuthError::Rejected),
    }
}

pub async fn load_client(store: &BlobStore, id: &str) -> Result<Option<Client>, AuthError> {
    Ok(store.get_json(&keys::client(id)).await?)
}

pub async fn list_clients(store: &BlobStore) -> Result<Vec<Client>, AuthError> {
    let mut out = Vec::new();
    for listed in store
        .list(&object_store::path::Path::from("clients"), None)
        .await?
    {
        if let Some(id) = listed.name.strip_suffix(".json") {
            if let Some(c) = load_client(store, id).await? {
                out.push(c);
            }
        }
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Marks a client revoked; its token stops working on every node once their caches expire.
pub async fn revoke_client(store: &BlobStore, id: &str) -> Result<Client, AuthError> {
    let mut c = load_client(store, id)
        .await?
        .ok_or_else(|| AuthError::NoSuchClient(id.to_owned()))?;
    c.revoked = true;
    let body = Bytes::from(serde_json::to_vec_pretty(&c).expect("serializes"));
    store.put(&keys::client(id), body).await?;
    Ok(c)
}

/// Replaces a client's quotas (admin only, at the API).
pub async fn set_quotas(store: &BlobStore, id: &str, quotas: Quotas) -> Result<Client, AuthError> {
    let mut c = load_client(store, id)
        .await?
        .ok_or_else(|| AuthError::NoSuchClient(id.to_owned()))?;
    c.quotas = quotas;
    let body = Bytes::from(serde_json::to_vec_pretty(&c).expect("serializes"));
    store.put(&keys::client(id), body).await?;
    Ok(c)
}

/// The client a token belongs to.
pub async fn authenticate(store: &BlobStore, token: &str) -> Result<Client, AuthError> {
    let id = token
        .strip_prefix("kiln_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
        .filter(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or(AuthError::Malformed)?;
    match load_client(store, id).await? {
        Some(c) if !c.revoked && token_matches(token, &c.token_sha256) => Ok(c),
        _ => Err(AuthError::Rejected),
    }
}

pub async fn owner(store: &BlobStore, project: &ProjectId) -> Result<Option<Owner>, AuthError> {
    Ok(store.get_json(&keys::owner(project)).await?)
}

/// Makes `client` the owner of `project` unless another client already is. Returns whether the
/// project was created by this call.
pub async fn claim_project(
    store: &BlobStore,
    project: &ProjectId,
    client: &str,
) -> Result<bool, AuthError> {
    let owner = Owner {
        client: client.to_owned(),
        created_at: unix_now(),
    };
    let body = Bytes::from(serde_json::to_vec_pretty(&owner).expect("serializes"));
    match store.create(&keys::owner(project), body).await? {
        Created::Yes => Ok(true),
        Created::AlreadyExists => match self::owner(store, project).await? {
            Some(o) if o.client == client => Ok(false),
            _ => Err(AuthError::NotOwner(project.clone())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_authenticates_only_its_client_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).unwrap();
        let (a, token) = create_client(&store, "gen-a").await.unwrap();
        assert_eq!(authenticate(&store, &token).await.unwrap().id, a.id);
        let stored =
            std::fs::read_to_string(dir.path().join(format!("clients/{}.json", a.id))).unwrap();
        assert!(!stored.contains(&token), "token stored in clear");
        let mut forged = token.clone();
        forged.pop();
        forged.push('!');
        assert!(matches!(
            authenticate(&store, &forged).await,
            Err(AuthError::Rejected)
        ));
        assert!(matches!(
            authenticate(&store, "Bearer nonsense").await,
            Err(AuthError::Malformed)
        ));
        revoke_client(&store, &a.id).await.unwrap();
        assert!(matches!(
            authenticate(&store, &token).await,
            Err(AuthError::Rejected)
        ));
    }

    #[tokio::test]
    async fn a_project_has_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).unwrap();
        let p = ProjectId::parse("shop").unwrap();
        assert!(claim_project(&store, &p, "aaaa").await.unwrap());
        assert!(!claim_project(&store, &p, "aaaa").await.unwrap());
        assert!(matches!(
            claim_project(&store, &p, "bbbb").await,
            Err(AuthError::NotOwner(_))
        ));
    }
}
