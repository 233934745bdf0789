//! Where a client wants its build notifications sent, and the secret they are signed with.
//!
//! gitstore writes the registration (`PUT /api/notifications`), since only gitstore writes the
//! blob store; agents read it with [`load`] when a build of one of the client's projects starts
//! or ends, and sign each delivery with the secret.

use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::blob::{keys, BlobStore, StoreError};
use crate::manifest::unix_now;

/// A client's notification endpoint, stored at `clients/<id>/notify.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registration {
    pub url: String,
    /// The HMAC-SHA256 key of every delivery: this string's bytes, as shown once at
    /// registration.
    pub secret: String,
    pub created_at: u64,
}

/// Long enough for any real receiver, short enough that a record stays small.
pub const MAX_URL_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("bad notification url: {0}")]
    BadUrl(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a receiver URL: absolute http(s) with a host, no credentials (the signature is the
/// authentication, and the URL is shown back in the deliveries list), at most
/// [`MAX_URL_BYTES`]. Returns it normalized.
pub fn check_url(raw: &str) -> Result<String, NotifyError> {
    let bad = |why: &str| NotifyError::BadUrl(format!("{why}, e.g. https://app.example.com/kiln"));
    if raw.len() > MAX_URL_BYTES {
        return Err(bad(&format!("it must be at most {MAX_URL_BYTES} bytes")));
    }
    let url = url::Url::parse(raw.trim()).map_err(|e| bad(&format!("{e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("it must be an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "it must not carry credentials: verify the X-Kiln-Signature-256 header instead",
        ));
    }
    if url.fragment().is_some() {
        return Err(bad("it must not have a #fragment"));
    }
    Ok(url.to_string())
}

/// Registers (or replaces) `client`'s endpoint with a new secret, and returns it: the only time
/// the secret leaves the store.
pub async fn register(
    store: &BlobStore,
    client: &str,
    url: &str,
) -> Result<Registration, NotifyError> {
    let url = check_url(url)?;
    let secret = format!("whsec_{}", hex::encode(rand::rng().random::<[u8; 32]>()));
    let reg = Registration {
        url,
        secret,
        created_at: unix_now(),
    };
    let body = Bytes::from(serde_json::to_vec_pretty(&reg).expect("serializes"));
    store.put(&keys::notify(client), body).await?;
    Ok(reg)
}

pub async fn load(store: &BlobStore, client: &str) -> Result<Option<Registration>, NotifyError> {
    Ok(store.get_json(&keys::notify(client)).await?)
}

/// Removes `client`'s endpoint; true if there was one.
pub async fn unregister(store: &BlobStore, client: &str) -> Result<bool, NotifyError> {
    let existed = store.get(&keys::notify(client)).await?.is_some();
    store.delete(&keys::notify(client)).await?;
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_urls_that_are_not_plain_http_endpoints() {
        assert_eq!(
            check_url("https://App.example.com:8443/hooks/kiln?x=1").unwrap(),
            "https://app.example.com:8443/hooks/kiln?x=1"
        );
        assert!(check_url("http://127.0.0.1:9000").is_ok());
        let long = format!("https://a.com/{}", "x".repeat(MAX_URL_BYTES));
        for bad in [
            "ftp://a.com/x",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "a.com/hook",
            "https://user:pw@a.com/",
            "https://a.com/#frag",
            "",
            long.as_str(),
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_registration_round_trips_and_each_gets_a_new_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).unwrap();
        assert!(load(&store, "aaaaaaaaaaaa").await.unwrap().is_none());
        let a = register(&store, "aaaaaaaaaaaa", "https://a.com/h")
            .await
            .unwrap();
        assert!(a.secret.starts_with("whsec_") && a.secret.len() == 6 + 64);
        let loaded = load(&store, "aaaaaaaaaaaa").await.unwrap().unwrap();
        assert_eq!(
            (loaded.url.as_str(), loaded.secret.as_str()),
            ("https://a.com/h", a.secret.as_str())
        );
        let b = register(&store, "aaaaaaaaaaaa", "https://a.com/h")
            .await
            .unwrap();
        assert_ne!(a.secret, b.secret);
        assert!(unregister(&store, "aaaaaaaaaaaa").await.unwrap());
        assert!(!unregister(&store, "aaaaaaaaaaaa").await.unwrap());
        assert!(load(&store, "aaaaaaaaaaaa").await.unwrap().is_none());
    }
}
