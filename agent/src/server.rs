//! The agent's HTTP API: the signed sync webhook, status, logs, rebuild and cancel, versions,
//! rollback and export, the live event stream and notification deliveries, share links, the
//! retention report and run, health and metrics. Errors are JSON `{error, message}` with a
//! status code that says what went wrong.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gitstore::ProjectId;
use serde::Deserialize;

use crate::agent::{Agent, Request, Requested, RollbackError, RollbackTarget, RolledBack};
use crate::ownership::Owner;
use crate::versions::{self, ExportError, RepoError};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// More fields of the body (a quota's name, limit and use).
    details: serde_json::Map<String, serde_json::Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: serde_json::Map::new(),
            retry_after: None,
        }
    }

    /// 429 naming the quota, its limit and its use, with when to try again.
    fn quota(r: &crate::quota::Refusal) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "quota", r.message());
        if let serde_json::Value::Object(fields) = serde_json::to_value(r).expect("serializes") {
            e.details = fields;
        }
        e.retry_after = Some(r.retry_after_secs);
        e
    }

    fn deleted(project: &str) -> Self {
        Self::new(
            StatusCode::GONE,
            "deleted",
            format!("project {project} is deleted: restore it through gitstore to build it again"),
        )
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A failure that is the agent's, not the caller's: the details go to the log only.
    fn internal(what: &str, e: &dyn std::fmt::Display) -> Self {
        log::error!(error:% = e; "{what} failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what} failed on the agent; its log has the details"),
        )
    }

    /// 421: another agent builds the project; its address is in `url`.
    fn elsewhere(project: &str, l: &gitstore::lease::Lease) -> Self {
        let mut e = Self::new(
            StatusCode::MISDIRECTED_REQUEST,
            "elsewhere",
            format!(
                "project {project} is built by agent {} at {}: send this request there",
                l.agent, l.url
            ),
        );
        e.details.insert("owner".into(), l.agent.clone().into());
        e.details.insert("url".into(), l.url.clone().into());
        e
    }

    fn not_found(project: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("project {project} is unknown to this agent: push to it first"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.details;
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        let mut r = (self.status, Json(serde_json::Value::Object(body))).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"kiln\""),
            );
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::UnknownCommit { .. }
            | RepoError::NotOnBranch { .. }
            | RepoError::NoBranch(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            RepoError::Sync(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string())
            }
            RepoError::Git { .. } => Self::internal("reading the repository", &e),
        }
    }
}

impl From<RollbackError> for ApiError {
    fn from(e: RollbackError) -> Self {
        match e {
            RollbackError::UnknownBuild(_) | RollbackError::BuildWithoutCommit(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            RollbackError::Commit(e) => e.into(),
            RollbackError::Publish(e) => Self::internal("the rollback", &e),
            RollbackError::Quota(r) => Self::quota(&r),
            RollbackError::Deleted(p) => Self::deleted(&p),
        }
    }
}

impl From<ExportError> for ApiError {
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::TooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            }
            ExportError::Objects { .. } | ExportError::Tree(_) => Self::internal("the export", &e),
        }
    }
}

/// Token checks are cached briefly: status polling must not read the blob store every time, and a
/// revoked token stops working within the TTL.
const TOKEN_TTL: Duration = Duration::from_secs(5);

/// Token → (checked at, the client id it belongs to, or None if refused).
type TokenCache = HashMap<String, (Instant, Option<String>)>;

#[derive(Clone)]
struct App {
    agent: Arc<Agent>,
    tokens: Arc<Mutex<TokenCache>>,
    /// Timestamped webhook signatures seen within the replay window, with their timestamps.
    seen_webhooks: Arc<Mutex<HashMap<String, u64>>>,
}

/// Past this many signatures within one window, the oldest half is forgotten: a flood of valid
/// webhooks (only the secret's holder can make them) must not grow memory without bound.
const SEEN_WEBHOOKS: usize = 100_000;

pub fn router(agent: Arc<Agent>) -> Router {
    let app = App {
        agent,
        tokens: Arc::default(),
        seen_webhooks: Arc::default(),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/sync-project/{project}", post(sync_project))
        .route("/build/{project}", post(rebuild))
        .route("/cancel/{project}", post(cancel))
        .route("/status/{project}", get(status))
        .route("/logs/{project}", get(logs))
        .route("/api/projects/{project}/versions", get(list_versions))
        .route("/api/projects/{project}/rollback", post(rollback))
        .route("/api/projects/{project}/export", get(export))
        .route("/api/events", get(events))
        .route("/api/notifications/deliveries", get(deliveries))
        .route("/api/retention", get(retention_report))
        .route("/api/retention/run", post(retention_run))
        .route("/share/{token}", get(open_share))
        .route("/route/{project}", get(route))
        .layer(DefaultBodyLimit::max(64 << 10))
        .with_state(app)
}

fn project_id(raw: &str) -> ApiResult<ProjectId> {
    ProjectId::parse(raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
}

impl App {
    /// The sync webhook's signature: over `<X-Kiln-Timestamp>.<body>` within the replay window
    /// and never seen before, or (unless the operator requires timestamps) over the body alone.
    fn check_webhook(&self, headers: &HeaderMap, body: &[u8]) -> ApiResult<()> {
        use gitstore::webhook::{self, REPLAY_WINDOW_SECS};
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let secret = &self.agent.cfg.webhook_secret;
        let sig = header("x-kiln-signature-256").unwrap_or("");
        let bad_sig = |signed: &str| {
            ApiError::unauthorized(format!(
                "missing or bad X-Kiln-Signature-256: sign {signed} with HMAC-SHA256 and the \
                 webhook secret, as sha256=<hex>"
            ))
        };
        let Some(ts) = header("x-kiln-timestamp") else {
            if self.agent.cfg.webhook_require_timestamp {
                return Err(ApiError::unauthorized(
                    "X-Kiln-Timestamp is required: send the Unix time in seconds and sign \
                     `<timestamp>.<body>`",
                ));
            }
            if !webhook::verify_signature(secret, body, sig) {
                return Err(bad_sig("the exact body"));
            }
            return Ok(());
        };
        let ts: u64 = ts.trim().parse().map_err(|_| {
            ApiError::unauthorized("X-Kiln-Timestamp must be the Unix time in whole seconds")
        })?;
        let now = crate::status::now_ms() / 1000;
        if now.abs_diff(ts) > REPLAY_WINDOW_SECS {
            return Err(ApiError::unauthorized(format!(
                "X-Kiln-Timestamp {ts} is {} s from this agent's clock (at most \
                 {REPLAY_WINDOW_SECS} s): sign with the current time",
                now.abs_diff(ts)
            )));
        }
        if !webhook::verify_timestamped_signature(secret, ts, body, sig) {
            return Err(bad_sig("`<X-Kiln-Timestamp>.<body>`"));
        }
        let mut seen = self.seen_webhooks.lock().expect("webhook replay cache");
        seen.retain(|_, at| now.abs_diff(*at) <= REPLAY_WINDOW_SECS);
        if seen.len() >= SEEN_WEBHOOKS {
            let mut ats: Vec<u64> = seen.values().copied().collect();
            let (_, median, _) = ats.select_nth_unstable(SEEN_WEBHOOKS / 2);
            let median = *median;
            seen.retain(|_, at| *at > median);
        }
        if seen.insert(sig.to_owned(), ts).is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "replayed",
                "this signed webhook was already received: make each request unique (a fresh \
                 X-Kiln-Timestamp, or a delivery id in the body) and sign it again",
            ));
        }
        Ok(())
    }

    /// Allows the admin token, or a client token of the client that owns `project`.
    async fn authorize(&self, headers: &HeaderMap, project: &ProjectId) -> ApiResult<()> {
        let client = match self.caller(headers).await? {
            Caller::Admin => return Ok(()),
            Caller::Client(c) => c,
        };
        // Cached: an owner is written once, so a store outage does not lock its client out.
        let owner = self
            .agent
            .events
            .owner(&self.agent.store, project.as_str())
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()))?;
        match owner {
            Some(o) if o == client => Ok(()),
            // Same answer as for a project that does not exist: ids of others' projects stay private.
            _ => Err(ApiError::not_found(project.as_str())),
        }
    }

    /// The project named by a path segment, once the caller may act on it (and it is not
    /// deleted).
    async fn authorized(&self, headers: &HeaderMap, raw: &str) -> ApiResult<ProjectId> {
        let project = project_id(raw)?;
        self.authorize(headers, &project).await?;
        if self.agent.is_gone(project.as_str()) {
            return Err(ApiError::deleted(project.as_str()));
        }
        if let Some(l) = self.agent.holder_elsewhere(&project).await {
            return Err(ApiError::elsewhere(project.as_str(), &l));
        }
        Ok(project)
    }

    /// For a request that builds: this agent must hold the project's lease, claiming it if free.
    async fn claimed(&self, project: &ProjectId) -> ApiResult<()> {
        match self
            .agent
            .owner(project)
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()))?
        {
            Owner::Me => Ok(()),
            Owner::Other(l) => Err(ApiError::elsewhere(project.as_str(), &l)),
            Owner::Declined(why) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "declined",
                format!("{why}; try again shortly"),
            )),
        }
    }

    fn status(&self, project: &ProjectId) -> ApiResult<crate::status::Status> {
        self.agent
            .status(project.as_str())
            .ok_or_else(|| ApiError::not_found(project.as_str()))
    }
}

#[derive(Deserialize, Default)]
struct SyncBody {
    #[serde(rename = "ref")]
    _ref: Option<String>,
    new: Option<String>,
    #[serde(default)]
    changed_files: Vec<serde_json::Value>,
}

/// The commit a sync webhook announces (`new`), if any, from its untrusted body.
fn sync_hint(body: &[u8]) -> ApiResult<Option<String>> {
    let parsed: SyncBody = if body.iter().all(u8::is_ascii_whitespace) {
        SyncBody::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "body must be JSON {{ref?, new?, changed_files?}}: {e}"
            ))
        })?
    };
    if parsed.changed_files.len() > 100_000 {
        return Err(ApiError::bad_request("too many changed_files"));
    }
    match parsed.new.as_deref() {
        // The null id: the ref was deleted, there is no commit to expect.
        Some(c) if c.chars().all(|c| c == '0') => Ok(None),
        Some(c) if c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(c.to_ascii_lowercase()))
        }
        Some(c) => Err(ApiError::bad_request(format!(
            "`new` must be a 40-hex commit id, got {c:?}"
        ))),
        None => Ok(None),
    }
}

/// `POST /sync-project/{project}`: signed with the shared webhook secret.
async fn sync_project(
    State(app): State<App>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    if let Err(e) = app.check_webhook(&headers, &body) {
        app.agent.metrics.inc(&app.agent.metrics.webhooks_rejected);
        return Err(e);
    }
    let project = project_id(&raw)?;
    let hint = sync_hint(&body)?;
    let agent = &app.agent;
    let name = project.as_str();
    // Decided under the project's lifecycle lock, from the manifest read under it: a delete and
    // the restore after it are applied in the order gitstore made them.
    let locks = agent.locks(name);
    let _deciding = locks.lifecycle.lock().await;
    let manifest = gitstore::manifest::latest(&agent.store, &project)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()))?;
    if manifest.generation == 0 {
        if agent.has_local(name) {
            // Purged: its manifests are gone from the store.
            agent.forget_locked(&project, true).await;
            return Ok(Json(serde_json::json!({"state": "purged"})).into_response());
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("project {project} has nothing in the blob store yet: push to it first"),
        ));
    }
    if manifest.deleted_at.is_some() {
        agent.forget_locked(&project, false).await;
        return Ok(Json(serde_json::json!({"state": "deleted"})).into_response());
    }
    match agent
        .owner(&project)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()))?
    {
        Owner::Me => {}
        // gitstore tells every agent; the one that holds the lease builds.
        Owner::Other(l) => {
            return Ok(Json(serde_json::json!({
                "state": "elsewhere",
                "owner": l.agent,
                "url": l.url,
                "message": format!("project {name} is built by agent {}", l.agent),
            }))
            .into_response())
        }
        Owner::Declined(why) => {
            return Ok(
                Json(serde_json::json!({"state": "declined", "message": why})).into_response(),
            )
        }
    }
    agent.restored(name);
    let head = versions::preview_head(&manifest.refs).map(str::to_owned);
    agent.shares.remember(name, Arc::new(manifest));
    // The preview branch's head in the newest manifest, rather than the pushed ref's new value:
    // a push to another branch, or a generation that only changes metadata or shares, then
    // finds its commit built and builds nothing.
    let hint = head.or(hint);
    if let Some((build, state)) = hint.as_deref().and_then(|h| agent.already_tried(name, h)) {
        return Ok(Json(serde_json::json!({
            "build": build,
            "state": state.as_str(),
            "message": format!("this commit's last build ended {}: POST /build/{name} builds it again", state.as_str()),
        }))
        .into_response());
    }
    Ok(
        match agent
            .request_within_quota(&project, hint.as_deref(), Request::default())
            .await
        {
            Requested::Queued(build) | Requested::Busy(build) => (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"build": build, "state": "queued"})),
            )
                .into_response(),
            Requested::AlreadyBuilt(build) => (
                StatusCode::OK,
                Json(serde_json::json!({"build": build, "state": "ready", "message": "already built"})),
            )
                .into_response(),
            Requested::Refused(r) => {
                // gitstore redelivers on 429; the status tells the generator why nothing builds.
                agent.record_refusal(name, hint.as_deref(), &r);
                return Err(ApiError::quota(&r));
            }
            Requested::Deleted => return Err(ApiError::deleted(name)),
        },
    )
}

/// `POST /build/{project}`: rebuild the current commit.
async fn rebuild(
    State(app): State<App>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = app.authorized(&headers, &raw).await?;
    let req = Request {
        force: true,
        ..Request::default()
    };
    app.claimed(&project).await?;
    let build = match app.agent.request_within_quota(&project, None, req).await {
        Requested::Queued(b) | Requested::AlreadyBuilt(b) | Requested::Busy(b) => b,
        Requested::Refused(r) => return Err(ApiError::quota(&r)),
        Requested::Deleted => return Err(ApiError::deleted(project.as_str())),
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"build": build, "state": "queued"})),
    )
        .into_response())
}

async fn cancel(
    State(app): State<App>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = app.authorized(&headers, &raw).await?;
    app.status(&project)?;
    let ids = app.agent.cancel(project.as_str());
    Ok(Json(serde_json::json!({"cancelled": ids})).into_response())
}

async fn status(
    State(app): State<App>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = app.authorized(&headers, &raw).await?;
    let st = app.status(&project)?;
    let mut v = serde_json::to_value(&st).expect("serializes");
    // The history of earlier builds would make "ready" or "failed" appear in a status about a
    // build that is neither; it belongs to the versions API.
    if let Some(o) = v.as_object_mut() {
        o.remove("history");
        if let Some(cdn) = app.agent.cdn_status(project.as_str()) {
            o.insert("cdn".into(), cdn);
        }
    }
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
struct LogQuery {
    build: Option<u64>,
    follow: Option<String>,
}

/// `GET /logs/{project}[?build=N][&follow=1]`: the build log; with follow, streamed until the
/// build ends.
async fn logs(
    State(app): State<App>,
    Path(raw): Path<String>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = app.authorized(&headers, &raw).await?;
    let st = app.status(&project)?;
    let build = q.build.unwrap_or(st.build);
    let path = app.agent.log_path(project.as_str(), build);
    let follow = matches!(q.follow.as_deref(), Some("1" | "true" | "yes"));
    if !follow {
        let bytes = tokio::fs::read(&path).await.map_err(|_| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no log for build {build}"),
            )
        })?;
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response());
    }
    let agent = app.agent.clone();
    let name = project.as_str().to_owned();
    let stream = async_stream(agent, name, build, path);
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Tails a log file until its build is no longer running.
fn async_stream(
    agent: Arc<Agent>,
    project: String,
    build: u64,
    path: std::path::PathBuf,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    futures::stream::unfold(
        (0u64, false, agent.subscribe()),
        move |(mut offset, finished, mut changes)| {
            let (agent, project, path) = (agent.clone(), project.clone(), path.clone());
            async move {
                if finished {
                    return None;
                }
                loop {
                    let running = agent
                        .status(&project)
                        .is_some_and(|s| s.build == build && s.state.is_active());
                    if let Ok(mut f) = tokio::fs::File::open(&path).await {
                        let _ = f.seek(std::io::SeekFrom::Start(offset)).await;
                        let mut buf = Vec::new();
                        let _ = f.take(1 << 20).read_to_end(&mut buf).await;
                        if !buf.is_empty() {
                            offset += buf.len() as u64;
                            return Some((Ok(Bytes::from(buf)), (offset, false, changes)));
                        }
                    }
                    if !running {
                        return None;
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
                }
            }
        },
    )
}

/// The query string as pairs; its own parse, so a malformed one gets the JSON error every route
/// answers with.
fn query(uri: &Uri) -> ApiResult<HashMap<String, String>> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))
}

/// `GET /api/projects/{project}/versions[?limit=N&offset=M]`: the preview branch's commits,
/// newest first, with their builds.
async fn list_versions(
    State(app): State<App>,
    Path(raw): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = app.authorized(&headers, &raw).await?;
    let q = query(&uri)?;
    let limit = match q.get("limit") {
        None => versions::DEFAULT_LIMIT,
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=versions::MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit must be a whole number from 1 to {}, got {v:?}",
                    versions::MAX_LIMIT
                ))
            })?,
    };
    let offset = match q.get("offset") {
        None => 0,
        Some(v) => v.parse::<u32>().map_err(|_| {
            ApiError::bad_request(format!("offset must be a whole number, got {v:?}"))
        })? as usize,
    };
    let list = versions::list(&app.agent, &project, limit, offset).await?;
    Ok(Json(list).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    commit: Option<String>,
    build: Option<u64>,
}

/// `POST /api/projects/{project}/rollback` with `{"commit": "<40 hex>"}` or `{"build": N}`: 200
/// when a kept build was switched to, 202 when a build of the commit was queued.
async fn rollback(
    State(app): State<App>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let project = app.authorized(&headers, &raw).await?;
    let shape = r#"send {"commit": "<40-hex commit id>"} or {"build": <build number>}"#;
    let parsed: RollbackBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("{shape}: {e}")))?;
    let target = match parsed {
        RollbackBody {
            commit: Some(c),
            build: None,
        } if c.len() == 40 && versions::is_hex(&c) => RollbackTarget::Commit(c),
        RollbackBody {
            commit: Some(c),
            build: None,
        } => {
            return Err(ApiError::bad_request(format!(
                "commit must be a full 40-hex commit id, got {c:?}"
            )))
        }
        RollbackBody {
            commit: None,
            build: Some(b),
        } => RollbackTarget::Build(b),
        _ => return Err(ApiError::bad_request(shape)),
    };
    let name = project.as_str();
    app.claimed(&project).await?;
    Ok(match app.agent.rollback(&project, target).await? {
        RolledBack::Switched { build, commit } => Json(serde_json::json!({
            "build": build,
            "commit": commit,
            "preview_url": app.agent.cfg.preview_url_for(name),
            "pinned_url": app.agent.cfg.pinned_url_for(name, build),
            "rebuilt": false,
        }))
        .into_response(),
        RolledBack::Queued { build, commit } => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "build": build,
                "commit": commit,
                "state": "queued",
                "rebuilt": true,
            })),
        )
            .into_response(),
    })
}

/// `GET /api/projects/{project}/export?format=tar.gz|zip|webcontainer[&commit=<hex>]`: the files
/// of a commit (default: the one the preview serves, else the branch's head).
async fn export(
    State(app): State<App>,
    Path(raw): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = app.authorized(&headers, &raw).await?;
    let q = query(&uri)?;
    let format = q.get("format").map(String::as_str);
    let (content_type, extension) = match format {
        Some("tar.gz") => ("application/gzip", "tar.gz"),
        Some("zip") => ("application/zip", "zip"),
        Some("webcontainer") => ("application/json", "json"),
        _ => {
            return Err(ApiError::bad_request(format!(
                "format must be tar.gz, zip or webcontainer, got {format:?}"
            )))
        }
    };
    let commit = match q.get("commit") {
        Some(c) if (4..=40).contains(&c.len()) && versions::is_hex(c) => {
            versions::resolve_commit(&app.agent, &project, &c.to_ascii_lowercase()).await?
        }
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "commit must be 4 to 40 hex digits, got {c:?}"
            )))
        }
        None => versions::default_export_commit(&app.agent, &project).await?,
    };
    let repo = app.agent.repo_path(project.as_str());
    let disposition = format!(
        "attachment; filename=\"{project}-{}.{extension}\"",
        &commit[..12]
    );
    let mut r = if extension == "json" {
        let c = commit.clone();
        let tree = tokio::task::spawn_blocking(move || {
            versions::webcontainer(&repo, &c, versions::WEBCONTAINER_LIMIT)
        })
        .await
        .expect("export task")?;
        Body::from(tree).into_response()
    } else {
        let stream = versions::archive(&repo, &commit, extension)
            .map_err(|e| ApiError::internal("starting git archive", &e))?;
        let mut r = Body::from_stream(stream).into_response();
        r.headers_mut().insert(
            header::CONTENT_DISPOSITION,
            header::HeaderValue::from_str(&disposition).expect("ids and hex are header-safe"),
        );
        r
    };
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        "x-kiln-commit",
        header::HeaderValue::from_str(&commit).expect("hex is header-safe"),
    );
    Ok(r)
}

/// `GET /route/{project}`: where the project's previews are served, for a front door's
/// `auth_request` (nginx/nginx.conf.tera): 204 with `X-Kiln-Route: host:port` of the nginx of the
/// agent that holds the lease, or `none` when no live agent holds it or its holder advertises no
/// preview address. Unauthenticated, like the previews themselves; only the front door asks.
async fn route(State(app): State<App>, Path(raw): Path<String>) -> ApiResult<Response> {
    let project = project_id(&raw)?;
    let to = app.agent.preview_route(&project).await;
    let to = if to.is_empty() { "none".to_owned() } else { to };
    Ok((
        StatusCode::NO_CONTENT,
        [("x-kiln-route", to), ("cache-control", "max-age=2".into())],
    )
        .into_response())
}

async fn healthz(State(app): State<App>) -> Response {
    let mut problems = Vec::new();
    // A health check answers promptly, whatever the store does.
    match tokio::time::timeout(Duration::from_secs(5), app.agent.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("blob store: {e}")),
        Err(_) => problems.push("blob store: no answer within 5 s".into()),
    }
    let free = crate::fsutil::disk_free(&app.agent.cfg.state_dir).unwrap_or(0);
    problems.extend(app.agent.disk_problem());
    if let Err(e) = crate::sandbox::check_host() {
        problems.push(format!("sandbox: {e}"));
    }
    let body = serde_json::json!({
        "ok": problems.is_empty(),
        // Previews are served from disk whatever the problem: degraded, never down.
        "status": if problems.is_empty() { "ok" } else { "degraded" },
        "problems": problems,
        "queue_depth": app.agent.queue_depth(),
        "leases": app.agent.lease_summary(),
        "fast_engine_ready": app.agent.fast_engine_ready(),
        "disk_free_bytes": free,
    });
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let m = &app.agent.metrics;
    m.warm_live.store(
        app.agent.warm.live() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.agent.metrics.render(),
    )
        .into_response()
}

/// Who is calling the routes that are not about one project.
enum Caller {
    Admin,
    Client(String),
}

impl App {
    /// The admin token, or the client a token belongs to (checked against the blob store,
    /// cached for [`TOKEN_TTL`]).
    async fn caller(&self, headers: &HeaderMap) -> ApiResult<Caller> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("send your Kiln token as `Authorization: Bearer <token>`")
            })?;
        if let Some(admin) = &self.agent.cfg.admin_token_sha256 {
            if gitstore::auth::token_matches(token, admin) {
                return Ok(Caller::Admin);
            }
        }
        let cached = {
            let cache = self.tokens.lock().expect("token cache");
            cache.get(token).cloned()
        };
        let client = match cached {
            Some((at, c)) if at.elapsed() < TOKEN_TTL => c,
            _ => {
                let c = match gitstore::auth::authenticate(&self.agent.store, token).await {
                    Ok(c) => Some(c.id),
                    // The store did not answer: what it said last stands (a revocation waits
                    // for it to come back); a token never seen cannot be checked.
                    Err(gitstore::auth::AuthError::Store(e)) => {
                        return match cached {
                            Some((_, c)) => c.map(Caller::Client).ok_or_else(|| {
                                ApiError::unauthorized("the token is unknown or revoked")
                            }),
                            None => Err(ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "store",
                                format!("cannot check the token: the blob store did not answer ({e}); try again shortly"),
                            )),
                        };
                    }
                    Err(_) => None,
                };
                let mut cache = self.tokens.lock().expect("token cache");
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(token.to_owned(), (Instant::now(), c.clone()));
                c
            }
        };
        client
            .map(Caller::Client)
            .ok_or_else(|| ApiError::unauthorized("the token is unknown or revoked"))
    }

    /// Whether `caller` may see `project`'s events: the admin all, a client those it owns.
    async fn may_see(&self, caller: &Caller, project: &str) -> ApiResult<bool> {
        let Caller::Client(client) = caller else {
            return Ok(true);
        };
        let owner = self
            .agent
            .events
            .owner(&self.agent.store, project)
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()))?;
        Ok(owner.as_deref() == Some(client.as_str()))
    }
}

/// Comments sent while nothing happens, so proxies and clients see the stream alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Projects one `?project=` list may name.
const MAX_EVENT_PROJECTS: usize = 100;

/// `GET /api/events[?project=a,b]`: server-sent events of build state transitions of the
/// caller's projects (every project for the admin token). `Last-Event-ID` resumes after the
/// event it names, or gets `event: reset` when that is no longer in the agent's memory.
async fn events(State(app): State<App>, uri: Uri, headers: HeaderMap) -> ApiResult<Response> {
    let caller = app.caller(&headers).await?;
    let q = query(&uri)?;
    let only = match q.get("project") {
        None => None,
        Some(list) => {
            let ids = list
                .split(',')
                .map(|p| project_id(p.trim()).map(|p| p.as_str().to_owned()))
                .collect::<ApiResult<std::collections::HashSet<String>>>()?;
            if ids.len() > MAX_EVENT_PROJECTS {
                return Err(ApiError::bad_request(format!(
                    "at most {MAX_EVENT_PROJECTS} projects per stream; leave out ?project= for all of yours"
                )));
            }
            for p in &ids {
                if !app.may_see(&caller, p).await? {
                    return Err(ApiError::not_found(p));
                }
            }
            Some(ids)
        }
    };
    // A value that is no id this agent gave gets a reset, as an expired one does.
    let last_id = headers.get("last-event-id").map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX)
    });
    let (live, resume) = app.agent.events.subscribe(last_id);
    let mut backlog = std::collections::VecDeque::new();
    backlog.push_back(Frame::Raw(Bytes::from_static(b": kiln build events\n\n")));
    match resume {
        crate::events::Resume::Missed(missed) => {
            backlog.extend(missed.into_iter().map(Frame::Event))
        }
        crate::events::Resume::Reset { newest } => backlog.push_back(Frame::Raw(Bytes::from(
            format!("event: reset\nid: {newest}\ndata: {{}}\n\n"),
        ))),
    }
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut auth = HeaderMap::new();
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        auth.insert(header::AUTHORIZATION, v.clone());
    }
    let stream = EventStream {
        app,
        auth,
        caller,
        only,
        live,
        backlog,
        keep_alive,
    };
    let body = futures::stream::unfold(stream, |mut s| async move {
        let frame = s.next().await?;
        Some((Ok::<_, std::io::Error>(frame), s))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // nginx would otherwise hold events back to fill its buffer.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

enum Frame {
    Raw(Bytes),
    Event(Arc<crate::events::Event>),
}

/// One `/api/events` connection.
struct EventStream {
    app: App,
    /// The request's credentials, checked again at every keep-alive.
    auth: HeaderMap,
    caller: Caller,
    only: Option<std::collections::HashSet<String>>,
    live: tokio::sync::broadcast::Receiver<Arc<crate::events::Event>>,
    /// What is sent before live events: the opening comment, then the missed events or a reset.
    backlog: std::collections::VecDeque<Frame>,
    keep_alive: tokio::time::Interval,
}

impl EventStream {
    /// The next bytes to send; None ends the stream.
    async fn next(&mut self) -> Option<Bytes> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let event = match self.backlog.pop_front() {
                Some(Frame::Raw(b)) => return Some(b),
                Some(Frame::Event(e)) => e,
                // Both branches are cancel-safe: a lost race loses neither an event nor a tick.
                None => tokio::select! {
                    r = self.live.recv() => match r {
                        Ok(e) => e,
                        // Dropped rather than buffered without bound; the client reconnects
                        // with Last-Event-ID and resumes from the ring.
                        Err(RecvError::Lagged(n)) => {
                            log::warn!(missed = n; "event stream client too slow; disconnected");
                            return None;
                        }
                        Err(RecvError::Closed) => return None,
                    },
                    _ = self.keep_alive.tick() => {
                        // A revoked token's stream ends within a tick, as its requests do.
                        if self.app.caller(&self.auth).await.is_err() {
                            return None;
                        }
                        return Some(Bytes::from_static(b": keep-alive\n\n"));
                    }
                },
            };
            if self
                .only
                .as_ref()
                .is_some_and(|o| !o.contains(&event.project))
            {
                continue;
            }
            // Not knowing the owner (the store failing) must not show the event, nor end the
            // stream.
            if !matches!(
                self.app.may_see(&self.caller, &event.project).await,
                Ok(true)
            ) {
                continue;
            }
            let data = serde_json::to_string(&*event).expect("serializes");
            return Some(Bytes::from(format!(
                "event: build\nid: {}\ndata: {data}\n\n",
                event.id
            )));
        }
    }
}

/// `GET /api/notifications/deliveries`: the caller's newest notification deliveries, newest
/// first (the admin token names a client with `?client=<id>`).
async fn deliveries(State(app): State<App>, uri: Uri, headers: HeaderMap) -> ApiResult<Response> {
    let client = match app.caller(&headers).await? {
        Caller::Client(c) => c,
        Caller::Admin => query(&uri)?
            .remove("client")
            .filter(|c| c.len() == 12 && c.bytes().all(|b| b.is_ascii_alphanumeric()))
            .ok_or_else(|| {
                ApiError::bad_request("with the admin token, name a client: ?client=<id>")
            })?,
    };
    Ok(
        Json(serde_json::json!({"deliveries": app.agent.notifier.deliveries(&client)}))
            .into_response(),
    )
}

impl App {
    /// Allows the admin token only.
    async fn admin(&self, headers: &HeaderMap) -> ApiResult<()> {
        match self.caller(headers).await? {
            Caller::Admin => Ok(()),
            Caller::Client(_) => Err(ApiError::forbidden(
                "retention is the operator's: use the admin token (KILN_ADMIN_TOKEN)",
            )),
        }
    }
}

/// The options of a retention report or run, from `?limit=N&evict=all`.
fn retention_options(uri: &Uri, dry_run: bool) -> ApiResult<crate::retention::Options> {
    let q = query(uri)?;
    let limit = match q.get("limit") {
        None => crate::retention::REPORT_LIMIT,
        Some(v) => v.parse().map_err(|_| {
            ApiError::bad_request(format!("limit must be a whole number, got {v:?}"))
        })?,
    };
    let evict_all = match q.get("evict").map(String::as_str) {
        None => false,
        Some("all") => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "evict may only be \"all\" (evict every idle project), got {v:?}"
            )))
        }
    };
    Ok(crate::retention::Options {
        dry_run,
        retention: true,
        evict_all,
        limit,
    })
}

/// `GET /api/retention[?evict=all][&limit=N]` (admin): what a retention pass would free now:
/// per project the builds it would retire and their bytes, the worktree and node_modules bytes
/// eviction could take, and the disk's use against its high-water mark.
async fn retention_report(
    State(app): State<App>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    app.admin(&headers).await?;
    let opts = retention_options(&uri, true)?;
    Ok(Json(app.agent.gc_pass(opts).await).into_response())
}

/// `POST /api/retention/run[?evict=all][&limit=N]` (admin): runs a pass now and answers what
/// it freed.
async fn retention_run(
    State(app): State<App>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    app.admin(&headers).await?;
    let opts = retention_options(&uri, false)?;
    Ok(Json(app.agent.gc_pass(opts).await).into_response())
}

/// `GET /share/{token}` (no credentials but the token): 302 to the pinned URL of a kept build
/// of the shared version, or 202 while one is built; 404 for a token that names no share, 410
/// for a revoked or expired one. Browsers get a short page, `Accept: application/json` JSON.
async fn open_share(
    State(app): State<App>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    use crate::share::{Opened, ShareError};
    let json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    let answer = |status: StatusCode,
                  code: &str,
                  message: &str,
                  retry: Option<u64>,
                  mut body: serde_json::Map<String, serde_json::Value>| {
        // A 202 is no error: its body says the state instead.
        let key = if status.is_success() {
            "state"
        } else {
            "error"
        };
        body.insert(key.into(), code.into());
        body.insert("message".into(), message.into());
        let mut r = if json {
            (status, Json(serde_json::Value::Object(body))).into_response()
        } else {
            let html = crate::preview::share_page(message, retry);
            (
                status,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html,
            )
                .into_response()
        };
        let h = r.headers_mut();
        // The link may be revoked at any time: never cached, here or by a proxy.
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        h.insert(
            header::REFERRER_POLICY,
            header::HeaderValue::from_static("no-referrer"),
        );
        if let Some(secs) = retry {
            h.insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        r
    };
    let none = serde_json::Map::new;
    match app.agent.open_share(&token).await {
        Ok(Opened::Redirect { url, .. }) => {
            let mut r = (StatusCode::FOUND, [(header::LOCATION, url.clone())]).into_response();
            let h = r.headers_mut();
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            h.insert(
                header::REFERRER_POLICY,
                header::HeaderValue::from_static("no-referrer"),
            );
            r
        }
        Ok(Opened::Building { build }) => {
            let mut body = none();
            if let Some(b) = build {
                body.insert("build".into(), b.into());
            }
            let retry = crate::share::BUILDING_RETRY_SECS;
            let mut r = answer(
                StatusCode::ACCEPTED,
                "building",
                "This version is being built; the page opens it when it is ready.",
                Some(retry),
                body,
            );
            if !json {
                r.headers_mut()
                    .insert(header::REFRESH, header::HeaderValue::from(retry));
            }
            r
        }
        Ok(Opened::Refused(q)) => {
            let mut body = none();
            if let serde_json::Value::Object(fields) = serde_json::to_value(&q).expect("serializes")
            {
                body = fields;
            }
            answer(
                StatusCode::TOO_MANY_REQUESTS,
                "quota",
                &format!("This version cannot be built now: {}", q.message()),
                Some(q.retry_after_secs),
                body,
            )
        }
        Ok(Opened::Failed { build, error }) => {
            let mut body = none();
            body.insert("build".into(), build.into());
            let first = error.lines().next().unwrap_or("the build failed");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "build_failed",
                &format!("This version could not be built: {first}"),
                Some(600),
                body,
            )
        }
        Err(e @ ShareError::Unknown) => answer(
            StatusCode::NOT_FOUND,
            "not_found",
            &e.to_string(),
            None,
            none(),
        ),
        Err(e @ (ShareError::Revoked | ShareError::Expired | ShareError::Deleted)) => {
            answer(StatusCode::GONE, "gone", &e.to_string(), None, none())
        }
        Err(ShareError::Store(e)) => {
            log::error!(error:% = e; "share link: cannot read the store");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "store",
                "The share link cannot be checked right now; try again in a minute.",
                Some(30),
                none(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_announced_commit_or_says_what_is_wrong() {
        let head = "A".repeat(40);
        let body = format!(r#"{{"ref":"refs/heads/main","new":"{head}","attempt":2}}"#);
        assert_eq!(
            sync_hint(body.as_bytes()).unwrap(),
            Some(head.to_ascii_lowercase())
        );
        assert_eq!(sync_hint(b"").unwrap(), None);
        assert_eq!(
            sync_hint(br#"{"new":"0000000000000000000000000000000000000000"}"#).unwrap(),
            None
        );
        for (bad, says) in [
            (&br#"{"new":"abc"}"#[..], "40-hex"),
            (b"{", "must be JSON"),
            (br#"{"new":1}"#, "must be JSON"),
        ] {
            let e = sync_hint(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(says), "{}", e.message);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_body_is_a_commit_nothing_or_a_400(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            match sync_hint(&body) {
                Ok(Some(c)) => proptest::prop_assert!(
                    c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                ),
                Ok(None) => {}
                Err(e) => proptest::prop_assert_eq!(e.status, StatusCode::BAD_REQUEST),
            }
        }

        #[test]
        fn any_json_shaped_body_is_answered(new in "[0-9a-fA-F]{0,41}|\\PC{0,50}", files in 0usize..3) {
            let body = serde_json::json!({"new": new, "changed_files": vec!["x"; files]});
            let got = sync_hint(body.to_string().as_bytes());
            let valid = new.len() == 40 && new.bytes().all(|b| b.is_ascii_hexdigit());
            proptest::prop_assert_eq!(got.is_ok(), valid || new.chars().all(|c| c == '0'));
        }
    }
}
