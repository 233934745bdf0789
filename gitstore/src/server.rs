//! The gitstore HTTP server: git smart HTTP (`/git/<project>.git/...`), the client and project API
//! (`/api/...`), health and metrics. `router` builds it; `serve` binds and runs it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use futures::TryStreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::auth::{self, AuthError, Client};
use crate::blob::BlobStore;
use crate::browse::{self, BrowseError};
use crate::commits::{self, CommitError};
use crate::git;
use crate::manifest;
use crate::metrics::Metrics;
use crate::project::ProjectId;
use crate::receive::{HookContext, Limits, PushResult};
use crate::sync::{self, SyncReport};
use crate::webhook::Notifier;

/// Everything the server needs, parsed and validated before it starts.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub store_url: String,
    /// Local cache: bare repositories and scratch space. Losing it loses nothing.
    pub data_dir: PathBuf,
    /// SHA-256 (hex) of the admin token; None disables the admin API.
    pub admin_token_sha256: Option<String>,
    pub webhook_secret: String,
    pub agent_urls: Vec<String>,
    pub cors_origins: Vec<String>,
    pub limits: Limits,
    /// The executable git runs as the pre-receive hook (this binary).
    pub hook_exe: PathBuf,
    /// Test-only fault injection handed to the hook.
    pub fault: Option<String>,
    pub compact: crate::compact::CompactOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::blob::StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
pub struct App(Arc<Inner>);

struct Inner {
    cfg: Config,
    store: BlobStore,
    metrics: Metrics,
    notifier: Notifier,
    hooks_dir: PathBuf,
    locks: Mutex<HashMap<ProjectId, Arc<tokio::sync::Mutex<()>>>>,
    /// token hash → client, for a few seconds: revocation reaches every node within that time.
    tokens: Mutex<HashMap<String, (Client, Instant)>>,
    /// project → owning client id; ownership never changes once written.
    owners: Mutex<HashMap<ProjectId, String>>,
    /// Projects with a compaction running on this node.
    compacting: Mutex<std::collections::HashSet<ProjectId>>,
}

const TOKEN_TTL: Duration = Duration::from_secs(5);
const MAX_NEGOTIATION_BYTES: u64 = 64 << 20;

impl App {
    pub fn new(cfg: Config) -> Result<Self, ServeError> {
        let store = BlobStore::open(&cfg.store_url)?;
        let io = |what: String| move |source| ServeError::Io { what, source };
        let hooks_dir = cfg.data_dir.join("hooks");
        std::fs::create_dir_all(cfg.data_dir.join("repos"))
            .map_err(io(format!("creating {}", cfg.data_dir.display())))?;
        std::fs::create_dir_all(&hooks_dir).map_err(io("creating hooks dir".into()))?;
        let hook = hooks_dir.join("pre-receive");
        let script = format!(
            "#!/bin/sh\nexec '{}' hook pre-receive\n",
            cfg.hook_exe.display().to_string().replace('\'', "'\\''")
        );
        std::fs::write(&hook, script).map_err(io(format!("writing {}", hook.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", hook.display())))?;
        let metrics = Metrics::default();
        let notifier = Notifier::start(
            cfg.agent_urls.clone(),
            cfg.webhook_secret.clone().into_bytes(),
            metrics.clone(),
        );
        Ok(Self(Arc::new(Inner {
            cfg,
            store,
            metrics,
            notifier,
            hooks_dir,
            locks: Mutex::default(),
            tokens: Mutex::default(),
            owners: Mutex::default(),
            compacting: Mutex::default(),
        })))
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/clients", post(create_client).get(list_clients))
        .route("/api/clients/{id}", delete(revoke_client))
        .route("/api/projects", post(create_project).get(list_projects))
        .route("/api/projects/{id}", get(project_info))
        .route("/api/projects/{id}/commits", post(create_commit))
        .route("/api/projects/{id}/tree", get(project_tree))
        .route("/api/projects/{id}/files/{*path}", get(project_file))
        .route("/api/projects/{id}/diff", get(project_diff))
        .route(
            "/api/notifications",
            get(notification_info)
                .put(register_notifications)
                .delete(unregister_notifications),
        )
        .route("/git/{repo}/info/refs", get(info_refs))
        .route("/git/{repo}/git-upload-pack", post(upload_pack))
        .route("/git/{repo}/git-receive-pack", post(receive_pack))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), cors_and_log))
        .with_state(app)
}

/// Binds `cfg.listen` and serves until SIGINT or SIGTERM, finishing requests in flight.
pub async fn serve(cfg: Config) -> Result<(), ServeError> {
    let listen = cfg.listen;
    let app = App::new(cfg)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Io {
            what: format!("binding {listen}"),
            source,
        })?;
    log::info!(
        "kiln-gitstore listening on {listen}, store {}, cache {}",
        app.0.store.url(),
        app.0.cfg.data_dir.display()
    );
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|source| ServeError::Io {
            what: "serving".into(),
            source,
        })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    log::info!("shutting down: finishing requests in flight");
}

/// An error answered to a client: the status, a stable code, and a message saying what to fix.
/// Git routes answer in text/plain, which git prints to the user as `remote: <message>`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    plain: bool,
    /// More fields of the JSON answer, such as the branch head of a conflict.
    extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            plain: false,
            extra: serde_json::Map::new(),
        }
    }

    fn with(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        log::error!("internal error: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the details are in the gitstore log",
        )
    }

    fn plain(mut self) -> Self {
        self.plain = true;
        self
    }

    /// For the API routes, which share helpers with the git routes: always JSON.
    fn json(mut self) -> Self {
        self.plain = false;
        self
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Malformed | AuthError::Rejected => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("{e}: send your Kiln token as the HTTP Basic password (git) or as `Authorization: Bearer <token>`"),
            ),
            AuthError::BadName => Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            AuthError::NoSuchClient(_) => Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            AuthError::NotOwner(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            AuthError::Corrupt { .. } | AuthError::Store(_) => Self::internal(e),
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Json(_) => Self::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()),
            CommitError::Field { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            CommitError::Path { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "bad_path", e.to_string())
            }
            CommitError::Limit(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            }
            CommitError::Conflict { ref head, .. } => {
                let head = head.clone();
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string()).with("head", head.into())
            }
            CommitError::Git { .. } | CommitError::Plumbing(_) => Self::internal(e),
        }
    }
}

impl From<BrowseError> for ApiError {
    fn from(e: BrowseError) -> Self {
        use BrowseError::*;
        match e {
            BadCommit { .. } | NotACommit { .. } | BadPath { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            NoCommit { .. } | Empty | NoSuchPath { .. } | IsDirectory { .. } => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            Git(_) | GitOutput { .. } => Self::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = if self.plain {
            (
                self.status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{}\n", self.message),
            )
                .into_response()
        } else {
            let mut body = self.extra;
            body.insert("error".into(), self.code.into());
            body.insert("message".into(), self.message.into());
            (self.status, Json(body)).into_response()
        };
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"kiln\""),
            );
        }
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

enum Principal {
    Admin,
    Client(Client),
}

impl App {
    async fn principal(&self, headers: &HeaderMap) -> ApiResult<Principal> {
        let token = bearer_or_basic(headers).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "authentication required: send your Kiln token as the HTTP Basic password (git) or as `Authorization: Bearer <token>`",
            )
        })?;
        if let Some(admin) = &self.0.cfg.admin_token_sha256 {
            if auth::token_matches(&token, admin) {
                return Ok(Principal::Admin);
            }
        }
        let key = auth::hash_token(&token);
        if let Some((c, at)) = self.0.tokens.lock().expect("lock").get(&key) {
            if at.elapsed() < TOKEN_TTL {
                return Ok(Principal::Client(c.clone()));
            }
        }
        match auth::authenticate(&self.0.store, &token).await {
            Ok(c) => {
                let mut cache = self.0.tokens.lock().expect("lock");
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(key, (c.clone(), Instant::now()));
                Ok(Principal::Client(c))
            }
            Err(e) => {
                self.0.metrics.inc(&self.0.metrics.auth_failures);
                Err(e.into())
            }
        }
    }

    async fn admin(&self, headers: &HeaderMap) -> ApiResult<()> {
        match self.principal(headers).await? {
            Principal::Admin => Ok(()),
            Principal::Client(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this needs the admin token",
            )),
        }
    }

    /// Checks that `who` may read (or, with `write`, push to) `project`; a first push creates it.
    async fn authorize(&self, who: &Principal, project: &ProjectId, write: bool) -> ApiResult<()> {
        let client = match who {
            Principal::Admin if !write => return Ok(()),
            Principal::Admin => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "the admin token manages clients; push with a client token",
                ))
            }
            Principal::Client(c) => c,
        };
        let cached = self.0.owners.lock().expect("lock").get(project).cloned();
        let owner = match cached {
            Some(o) => Some(o),
            None => auth::owner(&self.0.store, project).await?.map(|o| o.client),
        };
        match owner {
            Some(o) if o == client.id => {}
            Some(_) if write => return Err(AuthError::NotOwner(project.clone()).into()),
            Some(_) | None if !write => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("project {project} not found"),
                ))
            }
            _ => {
                if auth::claim_project(&self.0.store, project, &client.id).await? {
                    log::info!(project:% = project, client = client.id.as_str(); "project created");
                }
            }
        }
        self.0
            .owners
            .lock()
            .expect("lock")
            .insert(project.clone(), client.id.clone());
        Ok(())
    }

    /// `authorize` for the JSON API: another client's project answers 404, as if absent, so
    /// project ids cannot be probed (git push keeps its 403, which git shows as is).
    async fn authorize_api(
        &self,
        who: &Principal,
        project: &ProjectId,
        write: bool,
    ) -> ApiResult<()> {
        match self.authorize(who, project, write).await {
            Err(e) if e.status == StatusCode::FORBIDDEN && matches!(who, Principal::Client(_)) => {
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("project {project} not found"),
                ))
            }
            r => r,
        }
    }

    fn lock(&self, project: &ProjectId) -> Arc<tokio::sync::Mutex<()>> {
        self.0
            .locks
            .lock()
            .expect("lock")
            .entry(project.clone())
            .or_default()
            .clone()
    }

    fn repo_dir(&self, project: &ProjectId) -> PathBuf {
        self.0
            .cfg
            .data_dir
            .join("repos")
            .join(format!("{project}.git"))
    }

    /// Syncs the local cache of `project`; the caller holds the project lock.
    async fn sync_locked(&self, project: &ProjectId) -> ApiResult<SyncReport> {
        let report = sync::sync_repo(&self.0.store, project, &self.repo_dir(project))
            .await
            .map_err(|e| {
                log::error!(project:% = project; "sync from the blob store failed: {e}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the project could not be read from the blob store; try again shortly",
                )
            })?;
        let m = &self.0.metrics;
        m.add(&m.sync_bytes, report.bytes_fetched);
        m.add(&m.sync_packs, report.packs_fetched as u64);
        Ok(report)
    }

    async fn sync(&self, project: &ProjectId) -> ApiResult<()> {
        let lock = self.lock(project);
        let _guard = lock.lock().await;
        self.sync_locked(project).await.map(|_| ())
    }

    fn git_configs(&self) -> Vec<String> {
        let l = &self.0.cfg.limits;
        let mut c = vec![
            format!("core.hooksPath={}", self.0.hooks_dir.display()),
            "receive.unpackLimit=1".into(),
            "receive.fsckObjects=true".into(),
            "receive.autogc=false".into(),
            "receive.denyCurrentBranch=ignore".into(),
            "receive.advertisePushOptions=false".into(),
            "gc.auto=0".into(),
            format!("receive.maxInputSize={}", l.max_push_bytes),
            "uploadpack.allowFilter=true".into(),
        ];
        // The hook names the offending path; git's own fsck would only name the object.
        for id in [
            "hasDot",
            "hasDotdot",
            "hasDotgit",
            "fullPathname",
            "emptyName",
        ] {
            c.push(format!("receive.fsck.{id}=ignore"));
        }
        c
    }
}

impl App {
    /// Compacts `project` in the background, at most once at a time per project on this node.
    fn spawn_compaction(&self, project: &ProjectId) {
        if !self
            .0
            .compacting
            .lock()
            .expect("lock")
            .insert(project.clone())
        {
            return;
        }
        let (app, project) = (self.clone(), project.clone());
        tokio::spawn(async move {
            let dir = app.0.cfg.data_dir.join("compact");
            let res =
                crate::compact::compact(&app.0.store, &project, &dir, &app.0.cfg.compact).await;
            if let Err(e) = res {
                log::warn!(project:% = project; "compaction failed, will retry after a later push: {e}");
            }
            app.0.compacting.lock().expect("lock").remove(&project);
        });
    }
}

fn bearer_or_basic(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Some(t.trim().to_owned());
    }
    let b64 = v.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    s.split_once(':').map(|(_, pass)| pass.to_owned())
}

fn parse_repo(repo: &str) -> ApiResult<ProjectId> {
    let name = repo.strip_suffix(".git").unwrap_or(repo);
    ProjectId::parse(name)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_project", e.to_string()).plain())
}

async fn not_found(req: Request) -> ApiError {
    let msg = if req.uri().path().starts_with("/git/") {
        "not found: gitstore speaks git's smart HTTP protocol only; use a git client (git 1.6.6 or later)"
    } else {
        "no such route"
    };
    ApiError::new(StatusCode::NOT_FOUND, "not_found", msg)
}

#[derive(Deserialize)]
struct ServiceQuery {
    service: Option<String>,
}

fn protocol_v2(headers: &HeaderMap) -> Option<String> {
    headers
        .get("git-protocol")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() < 256 && v.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .map(str::to_owned)
}

async fn info_refs(
    State(app): State<App>,
    Path(repo): Path<String>,
    Query(q): Query<ServiceQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = parse_repo(&repo)?;
    let service = match q.service.as_deref() {
        Some(s @ ("git-upload-pack" | "git-receive-pack")) => s,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "gitstore speaks git's smart HTTP protocol only; ?service=git-upload-pack or git-receive-pack is required",
            )
            .plain())
        }
    };
    let write = service == "git-receive-pack";
    let who = app.principal(&headers).await.map_err(ApiError::plain)?;
    app.authorize(&who, &project, write)
        .await
        .map_err(ApiError::plain)?;
    app.sync(&project).await.map_err(ApiError::plain)?;
    let proto = if write { None } else { protocol_v2(&headers) };
    let dir = app.repo_dir(&project);
    let mut cmd = git::command(&dir);
    for c in app.git_configs() {
        cmd.arg("-c").arg(c);
    }
    cmd.args([&service[4..], "--stateless-rpc", "--advertise-refs", "."]);
    if let Some(p) = &proto {
        cmd.env("GIT_PROTOCOL", p);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(ApiError::internal)?;
    if !out.status.success() {
        return Err(ApiError::internal(String::from_utf8_lossy(&out.stderr)).plain());
    }
    let mut body = Vec::new();
    let v2 = proto.as_deref().is_some_and(|p| p.contains("version=2"));
    if !v2 {
        let line = format!("# service={service}\n");
        body.extend_from_slice(format!("{:04x}{line}0000", line.len() + 4).as_bytes());
    }
    body.extend_from_slice(&out.stdout);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                format!("application/x-{service}-advertisement"),
            ),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
        ],
        body,
    )
        .into_response())
}

/// Copies a request body into a child's stdin, refusing more than `limit` bytes. Gzip request
/// bodies (git sends them for large negotiations) are inflated, with the limit applied after.
async fn feed(
    body: Body,
    headers: &HeaderMap,
    mut stdin: tokio::process::ChildStdin,
    limit: u64,
) -> Result<u64, FeedError> {
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let mut compressed = Vec::new();
    while let Some(chunk) = stream.try_next().await.map_err(|_| FeedError::Aborted)? {
        total += chunk.len() as u64;
        if total > limit {
            return Err(FeedError::TooLarge(limit));
        }
        if gzip {
            compressed.extend_from_slice(&chunk);
        } else if stdin.write_all(&chunk).await.is_err() {
            // git stopped reading (it rejected the input); its own report says why.
            return Ok(total);
        }
    }
    if gzip {
        let inflated = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&compressed[..])
                .take(limit + 1)
                .read_to_end(&mut out)
                .map(|_| out)
        })
        .await
        .map_err(|_| FeedError::Aborted)?
        .map_err(|_| FeedError::BadGzip)?;
        if inflated.len() as u64 > limit {
            return Err(FeedError::TooLarge(limit));
        }
        total = inflated.len() as u64;
        let _ = stdin.write_all(&inflated).await;
    }
    Ok(total)
}

enum FeedError {
    TooLarge(u64),
    BadGzip,
    Aborted,
}

impl From<FeedError> for ApiError {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::TooLarge(limit) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request larger than {limit} bytes; push fewer or smaller objects at a time"
                ),
            ),
            FeedError::BadGzip => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "request body is not valid gzip",
            ),
            FeedError::Aborted => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "request body ended early",
            ),
        }
        .plain()
    }
}

async fn upload_pack(
    State(app): State<App>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let project = parse_repo(&repo)?;
    let who = app.principal(&headers).await.map_err(ApiError::plain)?;
    app.authorize(&who, &project, false)
        .await
        .map_err(ApiError::plain)?;
    // A node behind a load balancer may see the POST without the advertisement: sync here too.
    app.sync(&project).await.map_err(ApiError::plain)?;
    let mut cmd = git::command(&app.repo_dir(&project));
    for c in app.git_configs() {
        cmd.arg("-c").arg(c);
    }
    cmd.args(["upload-pack", "--stateless-rpc", "."]);
    if let Some(p) = protocol_v2(&headers) {
        cmd.env("GIT_PROTOCOL", p);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ApiError::internal)?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    feed(body, &headers, stdin, MAX_NEGOTIATION_BYTES).await?;
    app.0.metrics.inc(&app.0.metrics.fetches);
    let p = project.clone();
    tokio::spawn(async move {
        if let Ok(out) = child.wait_with_output().await {
            if !out.status.success() {
                log::warn!(project:% = p; "upload-pack: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-git-upload-pack-result"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(stdout)),
    )
        .into_response())
}

async fn receive_pack(
    State(app): State<App>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let project = parse_repo(&repo)?;
    let who = app.principal(&headers).await.map_err(ApiError::plain)?;
    app.authorize(&who, &project, true)
        .await
        .map_err(ApiError::plain)?;
    // One push at a time per project on this node; across nodes the manifest CAS decides.
    let lock = app.lock(&project);
    let _guard = lock.lock().await;
    app.sync_locked(&project).await.map_err(ApiError::plain)?;

    let received = app.receive(&project, &headers, body).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "application/x-git-receive-pack-result",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        received.stdout,
    )
        .into_response())
}

/// What `git receive-pack` made of one push, or of one API commit sent as a push.
struct Received {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The hook's report of an accepted, durable push; None when it refused.
    result: Option<PushResult>,
}

impl App {
    /// Runs `git receive-pack` on `project` with `body` as its input, so the pre-receive hook
    /// checks, stores and publishes whatever arrives, then does what follows an accepted push on
    /// this node: sync state, compaction, metrics and the webhook. Both `git push` and the commit
    /// API come through here, so neither can skip a step. The caller holds the project lock and
    /// has synced the repository.
    async fn receive(
        &self,
        project: &ProjectId,
        headers: &HeaderMap,
        body: Body,
    ) -> ApiResult<Received> {
        let scratch = tempfile::Builder::new()
            .prefix("push-")
            .tempdir_in(&self.0.cfg.data_dir)
            .map_err(ApiError::internal)?;
        let result_path = scratch.path().join("result.json");
        let ctx = HookContext {
            store_url: self.0.cfg.store_url.clone(),
            project: project.clone(),
            limits: self.0.cfg.limits.clone(),
            result_path: result_path.clone(),
            fault: self.0.cfg.fault.clone(),
        };
        let mut cmd = git::command(&self.repo_dir(project));
        for c in self.git_configs() {
            cmd.arg("-c").arg(c);
        }
        cmd.args(["receive-pack", "--stateless-rpc", "."]).env(
            "KILN_HOOK_CONTEXT",
            serde_json::to_string(&ctx).expect("serializes"),
        );
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(ApiError::internal)?;
        let stdin = child.stdin.take().expect("piped");
        let limit = self.0.cfg.limits.max_push_bytes + (1 << 20);
        let fed = feed(body, headers, stdin, limit).await;
        let m = &self.0.metrics;
        if let Err(e) = fed {
            let _ = child.kill().await;
            m.inc(&m.pushes_refused);
            return Err(e.into());
        }
        let out = child.wait_with_output().await.map_err(ApiError::internal)?;
        if !out.status.success() {
            log::warn!(project:% = project; "receive-pack: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let result = std::fs::read(&result_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<PushResult>(&b).ok());
        match &result {
            Some(result) => {
                if let Some(from) = result.built_on {
                    // The repository already holds exactly this generation: skip the next sync's
                    // manifest read and ref update.
                    if let Err(e) =
                        sync::mark_synced(&self.repo_dir(project), from, result.generation)
                    {
                        log::warn!(project:% = project; "cannot record the sync state: {e}");
                    }
                }
                if result.packs >= self.0.cfg.compact.min_packs {
                    self.spawn_compaction(project);
                }
                m.inc(&m.pushes_accepted);
                m.add(&m.push_pack_bytes, result.pack_bytes);
                for u in &result.updates {
                    log::info!(project:% = project, generation = result.generation, r#ref = u.name.as_str(), new = u.new.as_str(); "push stored");
                    self.0
                        .notifier
                        .notify(project.as_str(), &u.name, &u.old, &u.new);
                }
            }
            None => {
                m.inc(&m.pushes_refused);
                log::info!(project:% = project; "push refused");
            }
        }
        Ok(Received {
            stdout: out.stdout,
            stderr: out.stderr,
            result,
        })
    }
}

async fn healthz(State(app): State<App>) -> Response {
    let store = match tokio::time::timeout(Duration::from_secs(5), app.0.store.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_owned(),
    };
    let probe = app.0.cfg.data_dir.join(".healthz");
    let disk = match std::fs::write(&probe, b"ok") {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("cache dir not writable: {e}"),
    };
    let healthy = store == "ok" && disk == "ok";
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "status": if healthy { "ok" } else { "unhealthy" },
            "blob_store": store,
            "cache_dir": disk,
        })),
    )
        .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.0.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct NewClient {
    name: String,
}

async fn create_client(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    app.admin(&headers).await?;
    let req: NewClient = json_body(&body)?;
    let (c, token) = auth::create_client(&app.0.store, &req.name).await?;
    log::info!(client = c.id.as_str(), name = c.name.as_str(); "client created");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"id": c.id, "name": c.name, "token": token})),
    )
        .into_response())
}

async fn list_clients(State(app): State<App>, headers: HeaderMap) -> ApiResult<Response> {
    app.admin(&headers).await?;
    let clients = auth::list_clients(&app.0.store).await?;
    let list: Vec<_> = clients
        .iter()
        .map(|c| serde_json::json!({"id": c.id, "name": c.name, "created_at": c.created_at, "revoked": c.revoked}))
        .collect();
    Ok(Json(serde_json::json!({ "clients": list })).into_response())
}

async fn revoke_client(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    app.admin(&headers).await?;
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(AuthError::NoSuchClient(id).into());
    }
    let c = auth::revoke_client(&app.0.store, &id).await?;
    app.0.tokens.lock().expect("lock").clear();
    log::info!(client = c.id.as_str(); "client revoked");
    Ok(Json(serde_json::json!({"id": c.id, "revoked": true})).into_response())
}

#[derive(Deserialize)]
struct NewProject {
    id: String,
}

async fn create_project(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let who = app.principal(&headers).await?;
    let req: NewProject = json_body(&body)?;
    let project = ProjectId::parse(&req.id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_project", e.to_string()))?;
    let Principal::Client(c) = &who else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "projects belong to clients; create them with a client token",
        ));
    };
    let created = auth::claim_project(&app.0.store, &project, &c.id).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({"id": project, "created": created})),
    )
        .into_response())
}

async fn project_info(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = ProjectId::parse(&id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_project", e.to_string()))?;
    let who = app.principal(&headers).await?;
    app.authorize(&who, &project, false).await?;
    let m = manifest::latest(&app.0.store, &project)
        .await
        .map_err(ApiError::internal)?;
    let bytes: u64 = m.packs.iter().map(|p| p.pack_size).sum();
    Ok(Json(serde_json::json!({
        "id": project,
        "generation": m.generation,
        "head": m.head,
        "refs": m.refs,
        "packs": m.packs.len(),
        "pack_bytes": bytes,
        "updated_at": m.updated_at,
    }))
    .into_response())
}

/// `GET /api/projects`: the caller's projects (every project for the admin token), each with its
/// owner, HEAD commit and the time its manifest last changed. One listing of `projects/`, then the
/// owner and latest manifest of each, a few at a time.
async fn list_projects(State(app): State<App>, headers: HeaderMap) -> ApiResult<Response> {
    use futures::StreamExt;
    let who = app.principal(&headers).await?;
    let ids = app.0.store.projects().await.map_err(ApiError::internal)?;
    let store = &app.0.store;
    let rows: Vec<Option<serde_json::Value>> = futures::stream::iter(ids)
        .map(|project| {
            let who = &who;
            async move {
                let owner = auth::owner(store, &project).await?;
                if let Principal::Client(c) = who {
                    if owner.as_ref().is_none_or(|o| o.client != c.id) {
                        return Ok(None);
                    }
                }
                let m = manifest::latest(store, &project)
                    .await
                    .map_err(ApiError::internal)?;
                let commit = m.head.as_ref().and_then(|h| m.refs.get(h));
                Ok::<_, ApiError>(Some(serde_json::json!({
                    "id": project,
                    "owner": owner.as_ref().map(|o| &o.client),
                    "created_at": owner.as_ref().map(|o| o.created_at),
                    "head": m.head,
                    "commit": commit,
                    "generation": m.generation,
                    "updated_at": (m.generation > 0).then_some(m.updated_at),
                })))
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let projects: Vec<_> = rows.into_iter().flatten().collect();
    Ok(Json(serde_json::json!({ "projects": projects })).into_response())
}

impl From<crate::notify::NotifyError> for ApiError {
    fn from(e: crate::notify::NotifyError) -> Self {
        use crate::notify::NotifyError;
        match e {
            NotifyError::BadUrl(_) => {
                Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            NotifyError::Corrupt { .. } | NotifyError::Store(_) => Self::internal(e),
        }
    }
}

/// The client whose notifications a request manages; the admin token has none.
async fn notification_client(app: &App, headers: &HeaderMap) -> ApiResult<Client> {
    match app.principal(headers).await? {
        Principal::Client(c) => Ok(c),
        Principal::Admin => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "notifications belong to clients; register them with a client token",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNotifications {
    url: String,
}

/// `PUT /api/notifications {"url"}`: where the agents post this client's build events. Answers
/// the signing secret, this once; every PUT makes a new one.
async fn register_notifications(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let c = notification_client(&app, &headers).await?;
    let req: NewNotifications = json_body(&body)?;
    let reg = crate::notify::register(&app.0.store, &c.id, &req.url).await?;
    log::info!(client = c.id.as_str(), url = reg.url.as_str(); "notification url registered");
    Ok(Json(serde_json::json!({"url": reg.url, "secret": reg.secret})).into_response())
}

/// `GET /api/notifications`: the registered URL, never the secret.
async fn notification_info(State(app): State<App>, headers: HeaderMap) -> ApiResult<Response> {
    let c = notification_client(&app, &headers).await?;
    match crate::notify::load(&app.0.store, &c.id).await? {
        Some(reg) => Ok(
            Json(serde_json::json!({"url": reg.url, "created_at": reg.created_at})).into_response(),
        ),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no notification url registered: PUT /api/notifications {\"url\": \"https://...\"}",
        )),
    }
}

/// `DELETE /api/notifications`: stops notifications (agents notice within their cache's 30 s).
async fn unregister_notifications(
    State(app): State<App>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let c = notification_client(&app, &headers).await?;
    let deleted = crate::notify::unregister(&app.0.store, &c.id).await?;
    log::info!(client = c.id.as_str(), deleted; "notification url removed");
    Ok(Json(serde_json::json!({ "deleted": deleted })).into_response())
}

fn parse_project(id: &str) -> ApiResult<ProjectId> {
    ProjectId::parse(id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_project", e.to_string()))
}

/// The largest commit request body: the files may total `max_push_bytes` once decoded, plus
/// room for base64's 4/3 and the JSON around them.
fn commit_body_limit(limits: &crate::receive::Limits) -> u64 {
    limits.max_push_bytes.saturating_mul(4) / 3 + (1 << 20)
}

/// Reads a whole request body, refusing more than `limit` bytes. The commit route reads its
/// body itself instead of through axum's `DefaultBodyLimit`, so the refusal is JSON and names
/// the setting that bounds it.
async fn read_body(body: Body, limit: u64) -> ApiResult<Vec<u8>> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.try_next().await.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "request body ended early",
        )
    })? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request body over {limit} bytes (room for KILN_MAX_PUSH_BYTES of files in base64); send fewer or smaller files per commit"
                ),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// `POST /api/projects/<p>/commits`: a commit from a JSON map of files, for generators that do
/// not speak git. The request is checked first; the commit is then built in scratch space and
/// sent through [`App::receive`] as a one-commit push, so the pre-receive hook checks, stores
/// and publishes it and the webhook fires exactly as for `git push`.
async fn create_commit(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    let who = app.principal(&headers).await?;
    let Principal::Client(client) = &who else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin token manages clients; commit with a client token",
        ));
    };
    let limits = app.0.cfg.limits.clone();
    // Checked before the project is claimed or anything is locked: a bad request costs nothing.
    let raw = read_body(body, commit_body_limit(&limits)).await?;
    let req = commits::parse(&raw, &limits)?;
    drop(raw);
    app.authorize_api(&who, &project, true).await?;

    let lock = app.lock(&project);
    let _guard = lock.lock().await;
    app.sync_locked(&project).await?;
    let scratch = tempfile::Builder::new()
        .prefix("commit-")
        .tempdir_in(&app.0.cfg.data_dir)
        .map_err(ApiError::internal)?;
    let committer = commits::Person::client(&client.name, &client.id);
    let built = commits::build(
        &app.repo_dir(&project),
        scratch.path(),
        req,
        &committer,
        &limits,
    )
    .await?;
    let pack = tokio::fs::File::open(&built.pack)
        .await
        .map_err(ApiError::internal)?;
    let commands = axum::body::Bytes::from(built.receive_pack_commands());
    let input = futures::StreamExt::chain(
        futures::stream::iter([Ok::<_, std::io::Error>(commands)]),
        tokio_util::io::ReaderStream::new(pack),
    );
    let received = app
        .receive(&project, &HeaderMap::new(), Body::from_stream(input))
        .await
        .map_err(ApiError::json)?;

    let accepted = commits::ref_status(&received.stdout, &built.refname);
    let generation = match (&received.result, &accepted) {
        (Some(r), _) => Some(r.generation),
        // The hook stored it but could not report back: the store is the truth.
        (None, Some(Ok(()))) => Some(
            manifest::latest(&app.0.store, &project)
                .await
                .map_err(ApiError::internal)?
                .generation,
        ),
        _ => None,
    };
    if let Some(generation) = generation {
        if let Some(Err(reason)) = &accepted {
            // Durable in the store; the local ref catches up at the next sync.
            log::warn!(project:% = project; "commit stored but the local ref did not move: {reason}");
        }
        log::info!(project:% = project, commit = built.commit.as_str(), generation = generation; "commit stored through the API");
        return Ok((
            StatusCode::CREATED,
            Json(serde_json::json!({
                "commit": built.commit,
                "parent": built.parent,
                "tree": built.tree,
                "branch": built.refname.trim_start_matches("refs/heads/"),
                "generation": generation,
            })),
        )
            .into_response());
    }
    Err(commit_refused(&app, &project, &built, &received).await)
}

/// Why receive-pack refused an API commit. A branch that moved (a push on another node won the
/// race) is a conflict whatever the hook printed, so that is decided from the store itself.
async fn commit_refused(
    app: &App,
    project: &ProjectId,
    built: &commits::Built,
    received: &Received,
) -> ApiError {
    let stderr = String::from_utf8_lossy(&received.stderr);
    match manifest::latest(&app.0.store, project).await {
        Ok(m) => {
            let head = m.refs.get(&built.refname).cloned();
            if head != built.parent {
                return CommitError::Conflict {
                    branch: built.refname.clone(),
                    head,
                    parent: built.parent.clone(),
                }
                .into();
            }
        }
        Err(e) => log::warn!(project:% = project; "cannot read the manifest after a refusal: {e}"),
    }
    match commits::hook_refusal(&received.stderr) {
        Some(reason) if reason.starts_with("storage failure") => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{reason}; try again shortly"),
        ),
        // receive.rs words every size refusal as "... over the <n>-byte limit".
        Some(reason) if reason.contains("-byte limit") => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", reason)
        }
        Some(reason) => ApiError::new(StatusCode::BAD_REQUEST, "refused", reason),
        // receive.maxInputSize (git_configs) stops an oversized pack before the hook runs.
        None if stderr.contains("exceeds maximum allowed size") => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the commit's pack is over the max_push_bytes limit of {} bytes (KILN_MAX_PUSH_BYTES); split the change into several commits",
                app.0.cfg.limits.max_push_bytes
            ),
        ),
        None => {
            log::warn!(project:% = project; "API commit refused by git: {}", stderr.trim());
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "refused",
                "git refused the commit's objects; the details are in the gitstore log",
            )
        }
    }
}

#[derive(Deserialize)]
struct CommitQuery {
    commit: Option<String>,
}

/// Authorizes a read of `id` and syncs its repository, for the tree, file and diff routes.
async fn readable(app: &App, id: &str, headers: &HeaderMap) -> ApiResult<(ProjectId, PathBuf)> {
    let project = parse_project(id)?;
    let who = app.principal(headers).await?;
    app.authorize_api(&who, &project, false).await?;
    app.sync(&project).await?;
    let repo = app.repo_dir(&project);
    Ok((project, repo))
}

/// `GET /api/projects/<p>/tree[?commit=<hex>]`: every file of a commit (default: HEAD).
async fn project_tree(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(q): Query<CommitQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (_, repo) = readable(&app, &id, &headers).await?;
    let commit = browse::resolve(&repo, q.commit.as_deref()).await?;
    let tree = browse::tree(&repo, &commit, app.0.cfg.limits.max_tree_files).await?;
    Ok(Json(tree).into_response())
}

/// `GET /api/projects/<p>/files/<path>[?commit=<hex>]`: one file's bytes.
async fn project_file(
    State(app): State<App>,
    Path((id, path)): Path<(String, String)>,
    Query(q): Query<CommitQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (_, repo) = readable(&app, &id, &headers).await?;
    let commit = browse::resolve(&repo, q.commit.as_deref()).await?;
    let file = browse::file(&repo, &commit, &path).await?;
    let content_type = if file.mode == "symlink" {
        "text/plain; charset=utf-8"
    } else {
        browse::content_type(&path)
    };
    let commit = HeaderValue::from_str(&commit).map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::HeaderName::from_static("x-kiln-commit"), commit),
            (
                header::HeaderName::from_static("x-kiln-mode"),
                HeaderValue::from_static(file.mode),
            ),
            // Project files are not gitstore's pages: a browser must not run or sniff them.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; sandbox"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        file.bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

/// `GET /api/projects/<p>/diff[?from=<hex>][&to=<hex>]`: the files changed between two commits;
/// `to` defaults to HEAD and `from` to `to`'s first parent (its own changes).
async fn project_diff(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (_, repo) = readable(&app, &id, &headers).await?;
    let to = browse::resolve(&repo, q.to.as_deref()).await?;
    let from = match q.from.as_deref() {
        Some(f) => Some(browse::resolve(&repo, Some(f)).await?),
        None => browse::first_parent(&repo, &to).await?,
    };
    let diff = browse::diff(&repo, from.as_deref(), &to).await?;
    Ok(Json(diff).into_response())
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.len() > 64 << 10 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "JSON body over 64 KiB",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("invalid JSON body: {e}"),
        )
    })
}

/// CORS for the configured generator origins (browser git clients such as isomorphic-git), and
/// one log line per request.
async fn cors_and_log(State(app): State<App>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let allowed = origin
        .as_deref()
        .filter(|o| app.0.cfg.cors_origins.iter().any(|a| a == o || a == "*"))
        .map(str::to_owned);
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let mut res = if method == Method::OPTIONS {
        match &allowed {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "origin not allowed; the operator lists generator origins in KILN_CORS_ORIGINS",
            )
            .into_response(),
        }
    } else {
        next.run(req).await
    };
    if let Some(o) = allowed {
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&o) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "Authorization, Content-Type, Content-Encoding, Git-Protocol, Accept",
            ),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Content-Type, WWW-Authenticate, X-Kiln-Commit, X-Kiln-Mode"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    log::info!(method:% = method, path = path.as_str(), status = res.status().as_u16(), ms = started.elapsed().as_millis() as u64; "request");
    res
}
