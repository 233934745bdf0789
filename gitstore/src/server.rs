//! The gitstore HTTP server: git smart HTTP (`/git/<project>.git/...`), the client and project API
//! (`/api/...`), health and metrics. `router` builds it; `serve` binds and runs it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use futures::TryStreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::auth::{self, AuthError, Client, Owner, Quotas};
use crate::blob::{self, BlobStore, StoreError};
use crate::browse::{self, BrowseError};
use crate::build_state;
use crate::catalog::{self, Catalog, CatalogError, Entry};
use crate::commits::{self, CommitError};
use crate::git;
use crate::manifest::{self, Share, ShareMode};
use crate::metrics::Metrics;
use crate::project::ProjectId;
use crate::receive::{HookContext, Limits, PushResult, StoredQuota};
use crate::shares::{self, ShareError};
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
    /// The project catalog's SQLite file: a cache, rebuilt from the store when missing.
    pub catalog_path: PathBuf,
    /// How long a deleted project stays restorable before the reaper purges it from the store.
    pub delete_grace: Duration,
    /// The `projects` and `stored_bytes` quotas of clients the admin set none for.
    pub quotas: Quotas,
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
    #[error("opening the project catalog: {0}")]
    Catalog(#[source] Box<dyn std::error::Error + Send + Sync>),
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
    catalog: Catalog,
}

/// How long a client record (its revocation and its quotas included) is trusted from the token
/// cache: an admin change reaches every node within this time (the node that made it at once).
const TOKEN_TTL: Duration = Duration::from_secs(5);
/// How long a request waits for the catalog's rebuild at start before it is told to retry.
const CATALOG_WAIT: Duration = Duration::from_secs(20);
const MAX_NEGOTIATION_BYTES: u64 = 64 << 20;

impl App {
    pub fn new(cfg: Config) -> Result<Self, ServeError> {
        let store = BlobStore::open(&cfg.store_url)?;
        let io = |what: String| move |source| ServeError::Io { what, source };
        let hooks_dir = cfg.data_dir.join("hooks");
        std::fs::create_dir_all(cfg.data_dir.join("repos"))
            .map_err(io(format!("creating {}", cfg.data_dir.display())))?;
        // A node killed mid-push leaves ref locks in its cache, which would refuse every sync
        // of that project from then on; nothing of ours runs git in it yet.
        for e in std::fs::read_dir(cfg.data_dir.join("repos"))
            .map_err(io(format!("reading {}", cfg.data_dir.display())))?
            .flatten()
        {
            match crate::sync::remove_stale_locks(&e.path()) {
                Ok(0) => {}
                Ok(n) => {
                    log::warn!(repo:% = e.path().display(), locks = n; "removed lock files a killed git left")
                }
                Err(err) => {
                    log::error!(repo:% = e.path().display(), error:% = err; "cannot remove stale lock files")
                }
            }
        }
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
        let (catalog, rebuild) =
            Catalog::open(&cfg.catalog_path).map_err(|e| ServeError::Catalog(e.into()))?;
        let app = Self(Arc::new(Inner {
            cfg,
            store,
            metrics,
            notifier,
            hooks_dir,
            locks: Mutex::default(),
            tokens: Mutex::default(),
            owners: Mutex::default(),
            compacting: Mutex::default(),
            catalog,
        }));
        app.spawn_catalog_and_reaper(rebuild);
        Ok(app)
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/clients", post(create_client).get(list_clients))
        .route(
            "/api/clients/{id}",
            delete(revoke_client).patch(set_client_quotas),
        )
        .route("/api/projects", post(create_project).get(list_projects))
        .route(
            "/api/projects/{id}",
            get(project_info)
                .patch(patch_project)
                .delete(delete_project),
        )
        .route("/api/projects/{id}/restore", post(restore_project))
        .route("/api/projects/{id}/commits", post(create_commit))
        .route("/api/projects/{id}/tree", get(project_tree))
        .route("/api/projects/{id}/files/{*path}", get(project_file))
        .route("/api/projects/{id}/diff", get(project_diff))
        .route(
            "/api/projects/{id}/shares",
            post(create_share).get(list_shares),
        )
        .route("/api/projects/{id}/shares/{share}", delete(revoke_share))
        .route("/api/projects/{id}/import", post(import_project))
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
    crate::http::serve(
        listener,
        router(app),
        crate::http::Timeouts::default(),
        shutdown_signal(),
    )
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

    /// The blob store failed to answer: a 503 to retry, not the caller's fault nor a bug.
    fn store(e: impl std::fmt::Display) -> Self {
        log::error!("blob store error: {e}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the blob store did not answer; try again shortly",
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
            AuthError::Store(_) => Self::store(e),
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
                self.check_projects_quota(client).await?;
                if auth::claim_project(&self.0.store, project, &client.id).await? {
                    log::info!(project:% = project, client = client.id.as_str(); "project created");
                    self.published(project).await;
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
        self.follow(project, report.generation).await;
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
            match res {
                Ok(_) => app.published(&project).await,
                Err(e) => {
                    log::warn!(project:% = project; "compaction failed, will retry after a later push: {e}")
                }
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
    if write {
        // Refused here rather than after the pack is sent: git shows this answer's text.
        app.writable(&who, &project)
            .await
            .map_err(ApiError::plain)?;
        if let Some(q) = app.stored_quota(&who).await.map_err(ApiError::plain)? {
            if q.used >= q.limit {
                return Err(stored_bytes_exceeded(q.limit, q.used, 0).plain());
            }
        }
    }
    let proto = if write {
        None
    } else {
        upload_protocol(&app, &project, &headers)
    };
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
    if let Some(p) = upload_protocol(&app, &project, &headers) {
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
    app.writable(&who, &project)
        .await
        .map_err(ApiError::plain)?;
    let quota = app.stored_quota(&who).await.map_err(ApiError::plain)?;

    let received = app.receive(&project, &headers, body, quota).await?;
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
        stored_quota: Option<StoredQuota>,
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
            stored_quota,
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
                        sync::mark_synced(&self.repo_dir(project), from, result.manifest.generation)
                    {
                        log::warn!(project:% = project; "cannot record the sync state: {e}");
                    }
                }
                if result.manifest.packs.len() >= self.0.cfg.compact.min_packs {
                    self.spawn_compaction(project);
                }
                m.inc(&m.pushes_accepted);
                m.add(&m.push_pack_bytes, result.pack_bytes);
                for u in &result.updates {
                    log::info!(project:% = project, generation = result.manifest.generation, r#ref = u.name.as_str(), new = u.new.as_str(); "push stored");
                    self.0
                        .notifier
                        .notify(project.as_str(), &u.name, &u.old, &u.new);
                }
                self.pushed(project, &result.manifest).await;
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
    // Usage is shown when the catalog is complete; a listing does not wait for a rebuild.
    let usage = match app.0.catalog.wait_ready(Duration::ZERO).await {
        Ok(()) => Some(app.0.catalog.usage_by_owner().await?),
        Err(_) => None,
    };
    let list: Vec<_> = clients
        .iter()
        .map(|c| {
            let used = usage
                .as_ref()
                .map(|u| u.get(&c.id).copied().unwrap_or_default());
            serde_json::json!({
                "id": c.id,
                "name": c.name,
                "created_at": c.created_at,
                "revoked": c.revoked,
                "quotas": c.quotas,
                "usage": used.map(|u| serde_json::json!({"projects": u.projects, "stored_bytes": u.stored_bytes})),
            })
        })
        .collect();
    Ok(
        Json(serde_json::json!({ "clients": list, "default_quotas": app.0.cfg.quotas }))
            .into_response(),
    )
}

/// `PATCH /api/clients/<id>` with a `Quotas` object (admin token): replaces the client's quotas;
/// an unset one takes the daemons' default. Other nodes apply it within `TOKEN_TTL`.
async fn set_client_quotas(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    app.admin(&headers).await?;
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(AuthError::NoSuchClient(id).into());
    }
    let quotas: Quotas = json_body(&body)?;
    let c = auth::set_quotas(&app.0.store, &id, quotas).await?;
    app.0.tokens.lock().expect("lock").clear();
    log::info!(client = c.id.as_str(), quotas:? = c.quotas; "client quotas set");
    Ok(Json(serde_json::json!({"id": c.id, "name": c.name, "quotas": c.quotas})).into_response())
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
    // Only a new project counts against the quota: re-creating one's own is a no-op.
    if auth::owner(&app.0.store, &project).await?.is_none() {
        app.check_projects_quota(c).await?;
    }
    let created = auth::claim_project(&app.0.store, &project, &c.id).await?;
    if created {
        app.published(&project).await;
    }
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

// ---------------------------------------------------------------------------------------------
// Projects: metadata, listing, deletion, quotas
// ---------------------------------------------------------------------------------------------

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotReady => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "catalog_rebuilding",
                "the project catalog is being rebuilt from the blob store after a restart; try again in a few seconds",
            ),
            e => Self::internal(e),
        }
    }
}

/// Why a purge stopped; the reaper logs it and tries again at its next round.
#[derive(Debug, thiserror::Error)]
enum PurgeError {
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Share(#[from] ShareError),
}

const ZERO_ID: &str = "0000000000000000000000000000000000000000";
const MAX_NAME_CHARS: usize = 200;
const MAX_LABELS: usize = 32;
const MAX_LABEL_VALUE_CHARS: usize = 200;
const MAX_METADATA_BYTES: usize = 16 << 10;
const MAX_LABEL_FILTERS: usize = 16;

fn quota_exceeded(status: StatusCode, quota: &str, limit: u64, used: u64, msg: String) -> ApiError {
    ApiError::new(status, "quota", msg)
        .with("quota", quota.into())
        .with("limit", limit.into())
        .with("used", used.into())
}

/// 413 for a write of `size` bytes that `used` leaves no room for under `limit`.
fn stored_bytes_exceeded(limit: u64, used: u64, size: u64) -> ApiError {
    let msg = if size == 0 {
        format!("stored_bytes quota: your projects store {used} bytes, your quota is {limit}; delete projects you no longer need or ask the operator to raise the quota")
    } else {
        format!("stored_bytes quota: this commit adds {size} bytes to the {used} your projects store, past your quota of {limit} bytes; delete projects you no longer need or ask the operator to raise the quota")
    };
    quota_exceeded(
        StatusCode::PAYLOAD_TOO_LARGE,
        "stored_bytes",
        limit,
        used,
        msg,
    )
}

impl App {
    /// Rebuilds the catalog when it needs it (retrying while the store is unreachable), then
    /// reaps deleted projects at start and every `min(grace / 4, 10 min)`. Holds the app weakly,
    /// so dropping the last handle ends it.
    fn spawn_catalog_and_reaper(&self, rebuild: bool) {
        let weak = Arc::downgrade(&self.0);
        let every =
            (self.0.cfg.delete_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            let mut rebuilt = !rebuild;
            while !rebuilt {
                let Some(app) = weak.upgrade().map(App) else {
                    return;
                };
                let started = Instant::now();
                match app.0.catalog.rebuild(&app.0.store).await {
                    Ok(n) => {
                        log::info!(projects = n, ms = started.elapsed().as_millis() as u64; "project catalog rebuilt from the blob store");
                        rebuilt = true;
                    }
                    Err(e) => {
                        log::warn!(
                            "rebuilding the project catalog failed, retrying in {delay:?}: {e}"
                        );
                        drop(app);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(60));
                    }
                }
            }
            loop {
                let Some(app) = weak.upgrade().map(App) else {
                    return;
                };
                app.reap().await;
                drop(app);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// The client's `projects` and `stored_bytes` limits, its own or the operator's defaults.
    fn quotas(&self, client: &Client) -> Quotas {
        client.quotas.or(&self.0.cfg.quotas)
    }

    async fn usage(&self, client: &Client) -> ApiResult<catalog::Usage> {
        self.0.catalog.wait_ready(CATALOG_WAIT).await?;
        Ok(self.0.catalog.usage(&client.id).await?)
    }

    /// Refuses a new project past the client's `projects` quota (429). Deleted projects do not
    /// count; restoring one counts again. Nodes count from their own catalogs, so two creations
    /// racing on two nodes may both pass: a soft limit.
    async fn check_projects_quota(&self, client: &Client) -> ApiResult<()> {
        let Some(limit) = self.quotas(client).projects else {
            return Ok(());
        };
        let used = self.usage(client).await?.projects;
        if used >= limit {
            return Err(quota_exceeded(
                StatusCode::TOO_MANY_REQUESTS,
                "projects",
                limit,
                used,
                format!("projects quota: your client has {used} projects, its quota is {limit}; delete projects you no longer need (DELETE /api/projects/<id>) or ask the operator to raise the quota"),
            ));
        }
        Ok(())
    }

    /// The writer's stored-bytes limit and usage, for the checks before and inside a push.
    async fn stored_quota(&self, who: &Principal) -> ApiResult<Option<StoredQuota>> {
        let Principal::Client(client) = who else {
            return Ok(None);
        };
        let Some(limit) = self.quotas(client).stored_bytes else {
            return Ok(None);
        };
        let used = self.usage(client).await?.stored_bytes;
        Ok(Some(StoredQuota { limit, used }))
    }

    /// Brings the catalog row of `project` up to date after this node changed it in the store.
    /// Only logged on failure: the store holds the change, and the row catches up at the next
    /// sync of the project or rebuild.
    pub(crate) async fn published(&self, project: &ProjectId) {
        if let Err(e) = self.0.catalog.refresh(&self.0.store, project).await {
            log::warn!(project:% = project; "project catalog not updated: {e}");
        }
    }

    /// [`Self::published`] when the new manifest is at hand.
    /// [`Self::record`] after a push: the owner comes from the project's row, so the push
    /// answers without reading the store again (a project without a row is read whole).
    async fn pushed(&self, project: &ProjectId, m: &manifest::Manifest) {
        match self.0.catalog.get(project).await {
            Ok(Some(e)) => {
                let owner = Owner {
                    client: e.owner,
                    created_at: e.created_at,
                };
                self.record(project, &owner, m).await
            }
            _ => self.published(project).await,
        }
    }

    async fn record(&self, project: &ProjectId, owner: &Owner, m: &manifest::Manifest) {
        if let Err(e) = self.0.catalog.put(Entry::new(project, owner, m)).await {
            log::warn!(project:% = project; "project catalog not updated: {e}");
        }
    }

    /// After a sync to `generation`: refreshes the catalog row when another node published
    /// since this one last wrote it.
    async fn follow(&self, project: &ProjectId, generation: u64) {
        match self.0.catalog.get(project).await {
            Ok(Some(e)) if e.generation == generation => {}
            _ => self.published(project).await,
        }
    }

    /// The catalog entry of a project about to be written, after `authorize` and a sync: 410
    /// when it is deleted. When its owner record is gone (purged since this node cached the
    /// owner), the write claims the id afresh, as for a new project.
    async fn writable(&self, who: &Principal, project: &ProjectId) -> ApiResult<Entry> {
        let entry = match self.0.catalog.get(project).await? {
            Some(e) => Some(e),
            None => self.0.catalog.refresh(&self.0.store, project).await?,
        };
        let entry = match entry {
            Some(e) => e,
            None => {
                self.0.owners.lock().expect("lock").remove(project);
                self.authorize(who, project, true).await?;
                self.0
                    .catalog
                    .refresh(&self.0.store, project)
                    .await?
                    .ok_or_else(|| ApiError::internal(format!("{project}: no owner after claim")))?
            }
        };
        if let Some(at) = entry.deleted_at {
            return Err(self.gone(project, at));
        }
        Ok(entry)
    }

    fn purge_at(&self, deleted_at: u64) -> u64 {
        deleted_at.saturating_add(self.0.cfg.delete_grace.as_secs())
    }

    fn gone(&self, project: &ProjectId, deleted_at: u64) -> ApiError {
        let purge_at = self.purge_at(deleted_at);
        ApiError::new(
            StatusCode::GONE,
            "deleted",
            format!("project {project} was deleted (at {deleted_at}, unix seconds) and will be purged at {purge_at}; restore it with POST /api/projects/{project}/restore to change it again"),
        )
        .with("deleted_at", deleted_at.into())
        .with("purge_at", purge_at.into())
    }

    /// The owner record of `project` if `who` may see it (its client; the admin token for reads
    /// only). Another client, and a project that does not exist, get the same 404.
    async fn visible_owner(
        &self,
        who: &Principal,
        project: &ProjectId,
        write: bool,
    ) -> ApiResult<Owner> {
        if write && matches!(who, Principal::Admin) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the admin token manages clients; change projects with their client's token",
            ));
        }
        let owner = auth::owner(&self.0.store, project).await?;
        match (owner, who) {
            (Some(o), Principal::Admin) => Ok(o),
            (Some(o), Principal::Client(c)) if o.client == c.id => Ok(o),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("project {project} not found"),
            )),
        }
    }

    /// Publishes the manifest `change` makes of the latest one, re-reading and retrying when
    /// another writer wins the generation (the push path's compare-and-swap). `change` answers
    /// None when there is nothing to publish; the latest manifest is then returned as is.
    async fn update_manifest(
        &self,
        project: &ProjectId,
        mut change: impl FnMut(&manifest::Manifest) -> ApiResult<Option<manifest::Manifest>>,
    ) -> ApiResult<manifest::Manifest> {
        for _ in 0..8 {
            let base = manifest::latest(&self.0.store, project)
                .await
                .map_err(ApiError::store)?;
            let Some(next) = change(&base)? else {
                return Ok(base);
            };
            match manifest::publish(&self.0.store, project, &next)
                .await
                .map_err(ApiError::store)?
            {
                manifest::Publish::Won => return Ok(next),
                manifest::Publish::Lost => continue,
            }
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the project is changing too fast (pushes in flight); try again",
        ))
    }

    /// Tells the agents that `project` changed other than by a push (deleted, restored or
    /// purged: `m` None): the push webhook, naming HEAD's branch and commit (zeros when there is
    /// none). The agent reads the manifest for the rest.
    fn announce(&self, project: &ProjectId, m: Option<&manifest::Manifest>) {
        let head = m
            .and_then(|m| m.head.as_deref())
            .unwrap_or("refs/heads/main");
        let commit = m.and_then(|m| m.head_commit()).unwrap_or(ZERO_ID);
        self.0
            .notifier
            .notify(project.as_str(), head, commit, commit);
    }

    /// Purges every project whose grace period has passed, as the catalog knows them.
    async fn reap(&self) {
        let cutoff = manifest::unix_now().saturating_sub(self.0.cfg.delete_grace.as_secs());
        let due = match self.0.catalog.deleted_before(cutoff).await {
            Ok(due) => due,
            Err(e) => {
                log::warn!("reaper: cannot read the project catalog: {e}");
                return;
            }
        };
        for project in due {
            match self.purge(&project).await {
                Ok(true) => log::info!(project:% = project; "deleted project purged"),
                Ok(false) => {}
                Err(e) => {
                    log::warn!(project:% = project; "purge failed, retrying at the next round: {e}")
                }
            }
        }
    }

    /// Deletes `project` from the store if its latest manifest is still deleted and past the
    /// grace period: every key under its prefix except packs importers still list (per their
    /// records under the prefix, written by `shares`), the local repository, the catalog row.
    /// Packs it imported from an already purged holder go too, once no other importer lists
    /// them. Returns whether it purged.
    async fn purge(&self, project: &ProjectId) -> Result<bool, PurgeError> {
        let lock = self.lock(project);
        let _guard = lock.lock().await;
        let store = &self.0.store;
        let m = manifest::latest(store, project).await?;
        let due = m
            .deleted_at
            .is_some_and(|at| self.purge_at(at) <= manifest::unix_now());
        if !due {
            // Restored meanwhile, or the catalog is behind: correct it.
            self.published(project).await;
            return Ok(false);
        }
        let keep = shares::packs_in_use_by_importers(store, project).await?;
        let deleted = store.purge_project(project, &keep).await?;
        for holder in m.pack_sources() {
            store
                .delete(&blob::keys::importer(&holder, project))
                .await?;
            if auth::owner(store, &holder).await?.is_some() {
                // Live (or its id reused): its own compaction or purge decides about its packs.
                continue;
            }
            let still_read = shares::packs_in_use_by_importers(store, &holder).await?;
            let ours = m.packs.iter().filter(|e| e.from.as_ref() == Some(&holder));
            for e in ours.filter(|e| !still_read.contains(&e.name)) {
                store
                    .delete(&blob::keys::pack(&holder, &e.name, "pack"))
                    .await?;
                store
                    .delete(&blob::keys::pack(&holder, &e.name, "idx"))
                    .await?;
            }
        }
        match tokio::fs::remove_dir_all(self.repo_dir(project)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                log::warn!(project:% = project; "purged, but the local repository stays: {e}")
            }
        }
        self.0.catalog.remove(project).await?;
        self.0.owners.lock().expect("lock").remove(project);
        log::info!(project:% = project, keys = deleted, kept_packs = keep.len(); "project purged from the store");
        self.announce(project, None);
        Ok(true)
    }

    /// What `GET /api/projects/<p>` answers.
    fn project_json(
        &self,
        project: &ProjectId,
        owner: &Owner,
        m: &manifest::Manifest,
        build: Option<build_state::BuildState>,
    ) -> serde_json::Value {
        let pack_bytes: u64 = m.packs.iter().map(|p| p.pack_size).sum();
        serde_json::json!({
            "id": project,
            "owner": owner.client,
            "name": m.meta.name,
            "labels": m.meta.labels,
            "metadata": m.meta.metadata,
            "created_at": owner.created_at,
            "pushed_at": (m.pushed_at > 0).then_some(m.pushed_at),
            "updated_at": m.updated_at,
            "generation": m.generation,
            "head": m.head,
            "commit": m.head_commit(),
            "refs": m.refs,
            "packs": m.packs.len(),
            "pack_bytes": pack_bytes,
            "store_bytes": m.store_bytes(),
            "shared_bytes": m.shared_bytes(),
            "deleted_at": m.deleted_at,
            "purge_at": m.deleted_at.map(|at| self.purge_at(at)),
            "build": build,
        })
    }

    /// The project's JSON with the agent's build report.
    async fn project_answer(
        &self,
        project: &ProjectId,
        owner: &Owner,
        m: &manifest::Manifest,
    ) -> serde_json::Value {
        // Only a report: an unreadable one shows as none rather than failing the request.
        let build = build_state::read(&self.0.store, project)
            .await
            .unwrap_or_else(|e| {
                log::warn!(project:% = project; "build state unreadable: {e}");
                None
            });
        self.project_json(project, owner, m, build)
    }
}

/// `GET /api/projects/<p>`: the project's metadata, refs, usage, deletion and last build.
async fn project_info(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    let who = app.principal(&headers).await?;
    let owner = app.visible_owner(&who, &project, false).await?;
    let m = manifest::latest(&app.0.store, &project)
        .await
        .map_err(ApiError::store)?;
    Ok(Json(app.project_answer(&project, &owner, &m).await).into_response())
}

/// A validated `PATCH /api/projects/<p>` body: `Some` for each field present (`Some(None)`:
/// null, which clears it).
#[derive(Debug)]
struct MetaPatch {
    name: Option<Option<String>>,
    labels: Option<std::collections::BTreeMap<String, String>>,
    metadata: Option<Option<serde_json::Value>>,
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// `[a-z0-9][a-z0-9._/-]{0,62}`.
fn valid_label_key(k: &str) -> bool {
    let b = k.as_bytes();
    let tail = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._/-".contains(c);
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(tail)
}

fn bad_label(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_label", msg)
}

fn check_label_value(key: &str, v: &str) -> ApiResult<()> {
    if v.chars().count() > MAX_LABEL_VALUE_CHARS || !printable(v) {
        return Err(bad_label(format!(
            "label {key:?}: values are at most {MAX_LABEL_VALUE_CHARS} printable characters"
        )));
    }
    Ok(())
}

fn check_label_key(key: &str) -> ApiResult<()> {
    if !valid_label_key(key) {
        let shown: String = key.chars().take(70).collect();
        return Err(bad_label(format!(
            "label key {shown:?}: use 1 to 63 characters from a-z, 0-9 and '.', '_', '/', '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

impl MetaPatch {
    fn parse(body: &[u8]) -> ApiResult<Self> {
        use serde_json::Value;
        let fields: serde_json::Map<String, Value> = json_body(body)?;
        let mut patch = MetaPatch {
            name: None,
            labels: None,
            metadata: None,
        };
        for (key, value) in fields {
            match key.as_str() {
                "name" => {
                    patch.name = Some(match value {
                        Value::Null => None,
                        Value::String(n)
                            if !n.is_empty()
                                && n.chars().count() <= MAX_NAME_CHARS
                                && printable(&n) =>
                        {
                            Some(n)
                        }
                        _ => {
                            return Err(ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "bad_name",
                                format!("name must be 1 to {MAX_NAME_CHARS} printable characters, or null to clear it"),
                            ))
                        }
                    })
                }
                "labels" => {
                    let map = match value {
                        Value::Null => serde_json::Map::new(),
                        Value::Object(m) => m,
                        _ => {
                            return Err(bad_label(
                                "labels must be an object of string values (it replaces every label), or null to clear them".into(),
                            ))
                        }
                    };
                    if map.len() > MAX_LABELS {
                        return Err(bad_label(format!(
                            "{} labels; a project has at most {MAX_LABELS}",
                            map.len()
                        )));
                    }
                    let mut labels = std::collections::BTreeMap::new();
                    for (k, v) in map {
                        check_label_key(&k)?;
                        let Value::String(v) = v else {
                            return Err(bad_label(format!("label {k:?}: the value must be a string")));
                        };
                        check_label_value(&k, &v)?;
                        labels.insert(k, v);
                    }
                    patch.labels = Some(labels);
                }
                "metadata" => {
                    let size = serde_json::to_vec(&value).map_or(usize::MAX, |v| v.len());
                    if size > MAX_METADATA_BYTES {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too_large",
                            format!("metadata is {size} bytes of JSON, over the {MAX_METADATA_BYTES}-byte limit; keep large data elsewhere and store a reference to it"),
                        ));
                    }
                    patch.metadata = Some((!value.is_null()).then_some(value));
                }
                other => {
                    let shown: String = other.chars().take(40).collect();
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("unknown field {shown:?}: a project's PATCH takes name, labels and metadata"),
                    ));
                }
            }
        }
        Ok(patch)
    }

    fn apply(&self, meta: &mut manifest::ProjectMeta) {
        if let Some(name) = &self.name {
            meta.name = name.clone();
        }
        if let Some(labels) = &self.labels {
            meta.labels = labels.clone();
        }
        if let Some(metadata) = &self.metadata {
            meta.metadata = metadata.clone();
        }
    }
}

/// `PATCH /api/projects/<p> {name?, labels?, metadata?}`: publishes the metadata in a new
/// manifest generation (durable in the store like any push), then answers as `GET` does.
async fn patch_project(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    let who = app.principal(&headers).await?;
    let owner = app.visible_owner(&who, &project, true).await?;
    let patch = MetaPatch::parse(&body)?;
    let m = app
        .update_manifest(&project, |base| {
            if let Some(at) = base.deleted_at {
                return Err(app.gone(&project, at));
            }
            let mut next = base.next();
            patch.apply(&mut next.meta);
            Ok((next.meta != base.meta).then_some(next))
        })
        .await?;
    app.record(&project, &owner, &m).await;
    log::info!(project:% = project, generation = m.generation; "project metadata set");
    Ok(Json(app.project_answer(&project, &owner, &m).await).into_response())
}

/// `DELETE /api/projects/<p>`: marks the project deleted in a new generation (202). Pushes are
/// refused from then on; `POST .../restore` undoes it until `purge_at`, when the reaper deletes
/// its blobs. Deleting it again answers the first deletion.
async fn delete_project(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    let who = app.principal(&headers).await?;
    let owner = app.visible_owner(&who, &project, true).await?;
    let m = app
        .update_manifest(&project, |base| {
            if base.deleted_at.is_some() {
                return Ok(None);
            }
            let mut next = base.next();
            next.deleted_at = Some(next.updated_at);
            Ok(Some(next))
        })
        .await?;
    app.record(&project, &owner, &m).await;
    app.announce(&project, Some(&m));
    let deleted_at = m.deleted_at.unwrap_or_default();
    log::info!(project:% = project, generation = m.generation; "project deleted");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "id": project,
            "deleted_at": deleted_at,
            "purge_at": app.purge_at(deleted_at),
            "generation": m.generation,
        })),
    )
        .into_response())
}

/// `POST /api/projects/<p>/restore`: clears a deletion before its purge time, if the client's
/// quotas have room for the project again.
async fn restore_project(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    let who = app.principal(&headers).await?;
    let owner = app.visible_owner(&who, &project, true).await?;
    let past_grace = |at: u64| {
        let purge_at = app.purge_at(at);
        (purge_at <= manifest::unix_now()).then(|| {
            ApiError::new(
                StatusCode::GONE,
                "purged",
                format!("project {project} was deleted at {at} and its grace period ended at {purge_at}; it is being purged and cannot be restored"),
            )
        })
    };
    let current = manifest::latest(&app.0.store, &project)
        .await
        .map_err(ApiError::store)?;
    if let Some(at) = current.deleted_at {
        if let Some(e) = past_grace(at) {
            return Err(e);
        }
        if let Principal::Client(client) = &who {
            app.check_projects_quota(client).await?;
        }
        if let Some(q) = app.stored_quota(&who).await? {
            let size = current.store_bytes();
            if q.used.saturating_add(size) > q.limit {
                return Err(stored_bytes_exceeded(q.limit, q.used, size));
            }
        }
    }
    let m = app
        .update_manifest(&project, |base| {
            let Some(at) = base.deleted_at else {
                return Ok(None);
            };
            if let Some(e) = past_grace(at) {
                return Err(e);
            }
            let mut next = base.next();
            next.deleted_at = None;
            Ok(Some(next))
        })
        .await?;
    let restored = m.generation != current.generation;
    if restored {
        app.record(&project, &owner, &m).await;
        app.announce(&project, Some(&m));
        log::info!(project:% = project, generation = m.generation; "project restored");
    }
    Ok(Json(serde_json::json!({
        "id": project,
        "restored": restored,
        "generation": m.generation,
    }))
    .into_response())
}

/// `GET /api/projects[?limit=][&cursor=][&label=k[=v]]...[&deleted=true]`: the caller's
/// projects (every project for the admin token) from the catalog, in id order, one indexed query
/// a page. `next_cursor` is null on the last page.
async fn list_projects(
    State(app): State<App>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let who = app.principal(&headers).await?;
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg);
    let mut filter = catalog::Filter {
        owner: match &who {
            Principal::Admin => None,
            Principal::Client(c) => Some(c.id.clone()),
        },
        limit: 100,
        ..catalog::Filter::default()
    };
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "limit" => {
                filter.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| bad("limit must be a number from 1 to 1000".into()))?
            }
            "cursor" => {
                let after = ProjectId::parse(&v).map_err(|_| {
                    bad("cursor must be the next_cursor of the previous page".into())
                })?;
                filter.after = Some(after.to_string());
            }
            "label" => {
                let (key, value) = match v.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (v.as_ref(), None),
                };
                check_label_key(key)?;
                if let Some(v) = value {
                    check_label_value(key, v)?;
                }
                filter
                    .labels
                    .push((key.to_owned(), value.map(str::to_owned)));
                if filter.labels.len() > MAX_LABEL_FILTERS {
                    return Err(bad(format!("at most {MAX_LABEL_FILTERS} label filters")));
                }
            }
            "deleted" => {
                filter.deleted = match v.as_ref() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad("deleted must be true or false".into())),
                }
            }
            other => {
                let shown: String = other.chars().take(40).collect();
                return Err(bad(format!(
                    "unknown query parameter {shown:?}: use limit, cursor, label and deleted"
                )));
            }
        }
    }
    app.0.catalog.wait_ready(CATALOG_WAIT).await?;
    let page = app.0.catalog.list(filter).await?;
    let projects: Vec<_> = page
        .entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "id": e.id,
                "owner": e.owner,
                "name": e.name,
                "labels": e.labels,
                "created_at": e.created_at,
                "pushed_at": (e.pushed_at > 0).then_some(e.pushed_at),
                "updated_at": (e.generation > 0).then_some(e.updated_at),
                "generation": e.generation,
                "head": e.head,
                "commit": e.commit,
                "store_bytes": e.store_bytes,
                "shared_bytes": e.shared_bytes,
                "deleted_at": e.deleted_at,
                "purge_at": e.deleted_at.map(|at| app.purge_at(at)),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "projects": projects, "next_cursor": page.next })).into_response())
}

impl From<crate::notify::NotifyError> for ApiError {
    fn from(e: crate::notify::NotifyError) -> Self {
        use crate::notify::NotifyError;
        match e {
            NotifyError::BadUrl(_) => {
                Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            NotifyError::Store(_) => Self::internal(e),
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
    app.writable(&who, &project).await?;
    let quota = app.stored_quota(&who).await?;
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
    if let Some(q) = quota {
        let size = pack.metadata().await.map_err(ApiError::internal)?.len();
        if q.used.saturating_add(size) > q.limit {
            return Err(stored_bytes_exceeded(q.limit, q.used, size));
        }
    }
    let commands = axum::body::Bytes::from(built.receive_pack_commands());
    let input = futures::StreamExt::chain(
        futures::stream::iter([Ok::<_, std::io::Error>(commands)]),
        tokio_util::io::ReaderStream::new(pack),
    );
    let received = app
        .receive(&project, &HeaderMap::new(), Body::from_stream(input), quota)
        .await
        .map_err(ApiError::json)?;

    let accepted = commits::ref_status(&received.stdout, &built.refname);
    let generation = match (&received.result, &accepted) {
        (Some(r), _) => Some(r.manifest.generation),
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
        // A push racing this commit filled the quota after the check above.
        Some(reason) if reason.starts_with("stored_bytes quota") => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "quota", reason)
                .with("quota", "stored_bytes".into())
        }
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
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
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

// ---------------------------------------------------------------------------------------------
// Shares and imports
// ---------------------------------------------------------------------------------------------

impl From<ShareError> for ApiError {
    fn from(e: ShareError) -> Self {
        let (status, code) = match &e {
            ShareError::Malformed | ShareError::BadExpiry { .. } => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ShareError::Unknown | ShareError::NoSuchShare { .. } => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ShareError::Revoked { .. } => (StatusCode::GONE, "share_revoked"),
            ShareError::Expired { .. } => (StatusCode::GONE, "share_expired"),
            ShareError::NotFork { .. } => (StatusCode::FORBIDDEN, "not_a_fork_share"),
            ShareError::TooMany { .. } => (StatusCode::CONFLICT, "too_many_shares"),
            ShareError::Exists(_) => (StatusCode::CONFLICT, "exists"),
            ShareError::Contention(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ShareError::Manifest(_) | ShareError::Store(_) => return Self::internal(e),
        };
        Self::new(status, code, e.to_string())
    }
}

/// The Git-Protocol header to run upload-pack with. Protocol v2 sends any object the repository
/// holds to whoever names it, and after an import that includes the source project's later
/// commits; such repositories speak v0, whose stateless upload-pack serves only what refs reach.
fn upload_protocol(app: &App, project: &ProjectId, headers: &HeaderMap) -> Option<String> {
    protocol_v2(headers).filter(|_| !sync::may_hold_foreign_objects(&app.repo_dir(project)))
}

/// Checks that the caller is the client owning `project`: shares are the owner's to make and
/// see. Another client gets the 404 every project route gives it; the admin token is told why.
async fn share_owner(app: &App, headers: &HeaderMap, project: &ProjectId) -> ApiResult<Client> {
    let who = app.principal(headers).await?;
    let Principal::Client(client) = &who else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "shares belong to the project's owner; manage them with its client token",
        ));
    };
    app.authorize_api(&who, project, false).await?;
    Ok(client.clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewShare {
    commit: Option<String>,
    expires_in_secs: Option<u64>,
    mode: ShareMode,
}

fn share_json(s: &Share) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "mode": s.mode,
        "commit": s.commit,
        "created_at": s.created_at,
        "expires_at": s.expires_at,
        "revoked_at": s.revoked_at,
        "live": s.is_live(manifest::unix_now()),
    })
}

/// `POST /api/projects/<p>/shares {mode, commit?, expires_in_secs?}`: a share of a commit the
/// project's refs reach (default: HEAD's). Answers the token, this once, and the view URL path;
/// only the token's SHA-256 is stored.
async fn create_share(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    let req: NewShare = json_body(&body)?;
    let client = share_owner(&app, &headers, &project).await?;
    let expires_at = shares::expiry(manifest::unix_now(), req.expires_in_secs)?;
    app.sync(&project).await?;
    let commit = browse::resolve(&app.repo_dir(&project), req.commit.as_deref()).await?;
    let (share, token) =
        shares::create(&app.0.store, &project, &commit, req.mode, expires_at).await?;
    log::info!(project:% = project, client = client.id.as_str(), share = share.id.as_str(), commit = commit.as_str(); "share created");
    let mut body = share_json(&share);
    body["token"] = token.clone().into();
    // Relative: the agent serves it, behind whatever public origin the operator gives it.
    body["url"] = format!("/share/{token}").into();
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /api/projects/<p>/shares`: every share, revoked and expired ones included; no tokens.
async fn list_shares(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    share_owner(&app, &headers, &project).await?;
    let list = shares::list(&app.0.store, &project).await?;
    let list: Vec<_> = list.iter().map(share_json).collect();
    Ok(Json(serde_json::json!({ "shares": list })).into_response())
}

/// `DELETE /api/projects/<p>/shares/<id>`: revokes a share; its token stops working at once on
/// every node (resolving reads the latest manifest). Revoking twice is not an error.
async fn revoke_share(
    State(app): State<App>,
    Path((id, share)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    share_owner(&app, &headers, &project).await?;
    let share = shares::revoke(&app.0.store, &project, &share).await?;
    log::info!(project:% = project, share = share.id.as_str(); "share revoked");
    Ok(Json(share_json(&share)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRequest {
    share: String,
}

/// `POST /api/projects/<new>/import {share}`: starts the caller's new project from a fork
/// share's version, with its history, listing the source's packs instead of copying them, then
/// notifies the agents as a push would so the new project builds.
async fn import_project(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let project = parse_project(&id)?;
    let req: ImportRequest = json_body(&body)?;
    let who = app.principal(&headers).await?;
    let Principal::Client(client) = &who else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "projects belong to clients; import with a client token",
        ));
    };
    // Checked before anything is claimed: a bad, dead or view-only token costs nothing.
    let (_, share) = shares::resolve(&app.0.store, &req.share).await?;
    if share.mode != ShareMode::Fork {
        return Err(ShareError::NotFork { id: share.id }.into());
    }
    let exists = || ShareError::Exists(project.clone());
    // A new project counts against the client's `projects` quota (429).
    if auth::owner(&app.0.store, &project).await?.is_none() {
        app.check_projects_quota(client).await?;
    }
    match auth::claim_project(&app.0.store, &project, &client.id).await {
        // Already the caller's: allowed while it has no commits (shares::import checks), so an
        // import that failed after the claim can be retried.
        Ok(_) => {}
        Err(AuthError::NotOwner(_)) => return Err(exists().into()),
        Err(e) => return Err(e.into()),
    }
    app.0
        .owners
        .lock()
        .expect("lock")
        .insert(project.clone(), client.id.clone());
    let imported = shares::import(&app.0.store, &req.share, &project).await?;
    app.published(&project).await;
    log::info!(project:% = project, client = client.id.as_str(), source:% = imported.source, share = imported.share.id.as_str(), generation = imported.generation; "project imported");
    const ZERO: &str = "0000000000000000000000000000000000000000";
    app.0.notifier.notify(
        project.as_str(),
        "refs/heads/main",
        ZERO,
        &imported.share.commit,
    );
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "id": project,
            "commit": imported.share.commit,
            "packs_shared": imported.packs_shared,
            "source": imported.source,
            "generation": imported.generation,
        })),
    )
        .into_response())
}
