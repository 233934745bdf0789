//! HTTP to gitstore and the agent: JSON with the token, and errors that say what to change.

use std::time::Duration;

use serde_json::Value;

use crate::settings::{Endpoint, Source};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// For a whole request and its answer; streamed logs have none.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One of the two servers.
pub(crate) struct Remote {
    http: reqwest::Client,
    pub(crate) endpoint: Endpoint,
    token: Option<String>,
    /// `gitstore` or `the agent`, for messages.
    what: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    #[error("cannot reach {what} at {url}: {reason}. Is it running? {hint}")]
    Unreachable {
        what: &'static str,
        url: String,
        reason: String,
        /// Where the URL came from and how to change it.
        hint: String,
    },
    #[error("{what} refused the token ({message}); check KILN_TOKEN or KILN_ADMIN_TOKEN")]
    Unauthorized { what: &'static str, message: String },
    #[error("{what} answered {status}: {message}")]
    Status {
        what: &'static str,
        status: u16,
        message: String,
    },
    #[error("{what} answered {url} with something that is not JSON ({reason}); is {var} the URL of {what}?")]
    NotJson {
        what: &'static str,
        url: String,
        reason: String,
        var: &'static str,
    },
}

impl RemoteError {
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            RemoteError::Status { status, .. } => Some(*status),
            RemoteError::Unauthorized { .. } => Some(401),
            _ => None,
        }
    }
}

impl Remote {
    pub(crate) fn new(endpoint: Endpoint, token: Option<String>, what: &'static str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with rustls builds");
        Self {
            http,
            endpoint,
            token,
            what,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint.url)
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value, RemoteError> {
        let r = self.send(reqwest::Method::GET, path, true).await?;
        self.json(path, r).await
    }

    /// A POST without a body (the agent's `/build`).
    pub(crate) async fn post(&self, path: &str) -> Result<Value, RemoteError> {
        let r = self.send(reqwest::Method::POST, path, true).await?;
        self.json(path, r).await
    }

    /// A GET whose body the caller reads as it arrives (no overall timeout).
    pub(crate) async fn get_stream(&self, path: &str) -> Result<reqwest::Response, RemoteError> {
        self.send(reqwest::Method::GET, path, false).await
    }

    /// `GET <path>` (a /healthz) without a token: its status code and JSON body.
    pub(crate) async fn healthz(&self, path: &str) -> Result<(u16, Value), RemoteError> {
        let r = self
            .http
            .get(self.url(path))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = r.status().as_u16();
        Ok((status, self.json(path, r).await?))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: bool,
    ) -> Result<reqwest::Response, RemoteError> {
        let mut req = self.request(method, path);
        if timeout {
            req = req.timeout(REQUEST_TIMEOUT);
        }
        self.check(req.send().await).await
    }

    /// Turns transport errors and error statuses into [`RemoteError`]s.
    async fn check(
        &self,
        sent: reqwest::Result<reqwest::Response>,
    ) -> Result<reqwest::Response, RemoteError> {
        let r = sent.map_err(|e| self.unreachable(&e))?;
        let status = r.status();
        if status.is_success() {
            return Ok(r);
        }
        let body = r.bytes().await.unwrap_or_default();
        // Both servers answer `{error, message}`; anything else is shown as text.
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        let message = parsed
            .as_ref()
            .and_then(|v| v["message"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&body).trim().to_owned();
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_owned()
                } else {
                    text.chars().take(300).collect()
                }
            });
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(RemoteError::Unauthorized {
                what: self.what,
                message,
            });
        }
        Err(RemoteError::Status {
            what: self.what,
            status: status.as_u16(),
            message,
        })
    }

    async fn json(&self, path: &str, r: reqwest::Response) -> Result<Value, RemoteError> {
        let not_json = |reason: String| RemoteError::NotJson {
            what: self.what,
            url: self.url(path),
            reason,
            var: self.endpoint.var,
        };
        let body = r.bytes().await.map_err(|e| not_json(root_cause(&e)))?;
        serde_json::from_slice(&body).map_err(|e| not_json(e.to_string()))
    }

    fn unreachable(&self, e: &reqwest::Error) -> RemoteError {
        let reason = if e.is_timeout() {
            "timed out".to_owned()
        } else {
            root_cause(e)
        };
        let ep = &self.endpoint;
        let flag = if ep.var == "KILN_GIT_URL" {
            "--git-url"
        } else {
            "--agent-url"
        };
        let hint = match &ep.source {
            Source::Default => format!(
                "No URL was set, so the default was used: set {} or {flag}",
                ep.var
            ),
            Source::Env(_) => format!("Or is {flag} / {} wrong?", ep.var),
            other => format!(
                "Or is the URL taken from {other} wrong? ({} or {flag} override it)",
                ep.var
            ),
        };
        RemoteError::Unreachable {
            what: self.what,
            url: ep.url.clone(),
            reason,
            hint,
        }
    }
}

/// The innermost cause: reqwest's own message ("error sending request") says little.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
