//! `kiln-gitstore`: the gitstore server and its operator commands.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::time::Duration;

use gitstore::compact::CompactOptions;
use gitstore::receive::Limits;
use gitstore::{server, BlobStore, ProjectId};

#[derive(Parser)]
#[command(
    name = "kiln-gitstore",
    version,
    about = "Kiln gitstore: git push over smart HTTP, mirrored to blob storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve git smart HTTP and the API.
    Serve(ServeArgs),
    /// Bring a local bare repository up to date from the blob store, fetching only missing packs.
    Sync {
        project: String,
        dir: PathBuf,
        #[arg(long, env = "KILN_STORE_URL")]
        store: String,
    },
    /// Fold a project's packs into one and delete retired packs past their grace period.
    Compact {
        project: String,
        #[arg(long, env = "KILN_STORE_URL")]
        store: String,
        /// Scratch directory for the compaction repository.
        #[arg(long, default_value = "/var/cache/kiln/compact")]
        work_dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        min_packs: usize,
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
    /// Create an API client directly in the blob store and print its token (bootstrap).
    CreateClient {
        name: String,
        #[arg(long, env = "KILN_STORE_URL")]
        store: String,
    },
    /// Print the SHA-256 of a token, for KILN_ADMIN_TOKEN_SHA256.
    HashToken { token: String },
    /// Internal: git's pre-receive hook.
    #[command(hide = true)]
    Hook { name: String },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "KILN_GITSTORE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Blob store URL: a directory or file:///dir (embedded default), az://container, s3://bucket, gs://bucket.
    #[arg(long, env = "KILN_STORE_URL")]
    store: String,
    /// Local cache directory (bare repositories); disposable.
    #[arg(
        long,
        env = "KILN_GITSTORE_DATA",
        default_value = "/var/cache/kiln/gitstore"
    )]
    data_dir: PathBuf,
    /// SHA-256 hex of the admin token (see `hash-token`); unset disables the admin API.
    #[arg(long, env = "KILN_ADMIN_TOKEN_SHA256")]
    admin_token_sha256: Option<String>,
    /// Secret for X-Kiln-Signature-256 on webhooks.
    #[arg(long, env = "KILN_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: String,
    /// Agent base URLs notified after each push (comma-separated).
    #[arg(long, env = "KILN_AGENT_URLS", value_delimiter = ',')]
    agent_url: Vec<String>,
    /// Browser origins allowed by CORS (comma-separated), e.g. https://generator.example.
    #[arg(long, env = "KILN_CORS_ORIGINS", value_delimiter = ',')]
    cors_origin: Vec<String>,
    #[arg(long, env = "KILN_MAX_FILE_BYTES", default_value_t = Limits::default().max_file_bytes)]
    max_file_bytes: u64,
    #[arg(long, env = "KILN_MAX_PUSH_BYTES", default_value_t = Limits::default().max_push_bytes)]
    max_push_bytes: u64,
    #[arg(long, env = "KILN_MAX_TREE_FILES", default_value_t = Limits::default().max_tree_files)]
    max_tree_files: u64,
    #[arg(long, env = "KILN_MAX_TREE_DEPTH", default_value_t = Limits::default().max_tree_depth)]
    max_tree_depth: u32,
    /// Compact a project in the background once its manifest lists this many packs.
    #[arg(long, env = "KILN_COMPACT_MIN_PACKS", default_value_t = CompactOptions::default().min_packs)]
    compact_min_packs: usize,
    /// Seconds replaced or orphaned packs stay in the store before deletion.
    #[arg(long, env = "KILN_COMPACT_GRACE_SECS", default_value_t = CompactOptions::default().grace.as_secs())]
    compact_grace_secs: u64,
    /// On SIGTERM, seconds requests in flight (pushes) may take to finish before the server
    /// exits anyway; keep it below the unit's TimeoutStopSec= (75 s), or systemd SIGKILLs first.
    #[arg(long, env = "KILN_GITSTORE_DRAIN_SECS", default_value_t = 60)]
    drain_secs: u64,
    /// The project catalog (SQLite, a cache rebuilt from the store when missing);
    /// default `<data dir>/catalog.sqlite3`.
    #[arg(long, env = "KILN_CATALOG")]
    catalog: Option<PathBuf>,
    /// Seconds a deleted project stays restorable before its blobs are purged.
    #[arg(long, env = "KILN_DELETE_GRACE_SECS", default_value_t = 7 * 24 * 3600)]
    delete_grace_secs: u64,
    /// Projects a client may have (unless the admin set its own quota).
    #[arg(long, env = "KILN_QUOTA_PROJECTS", default_value_t = 10_000)]
    quota_projects: u64,
    /// Pack bytes a client's projects may store (unless the admin set its own quota).
    #[arg(long, env = "KILN_QUOTA_STORED_BYTES", default_value_t = 20 << 30)]
    quota_stored_bytes: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Hook { name } = &cli.command {
        // The hook's stderr goes to the pusher, so it logs nothing else there.
        anyhow::ensure!(name == "pre-receive", "unknown hook {name}");
        std::process::exit(gitstore::receive::pre_receive_main());
    }
    gitstore::logging::init("kiln-gitstore");
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let result = rt.block_on(run(cli.command));
    // Dropping the runtime would wait for every blocking task, however stuck; the drain deadline
    // is the promise, so abandon what is left.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Serves until SIGTERM, telling systemd when it is ready and while it is alive, then finishes
/// the requests in flight (pushes: git acknowledges only durable ones, so cutting one off at the
/// deadline loses nothing the pusher was told is saved).
async fn serve(cfg: server::Config, drain: Duration) -> anyhow::Result<()> {
    let listen = cfg.listen;
    let (store_url, data_dir) = (cfg.store_url.clone(), cfg.data_dir.clone());
    let app = server::App::new(cfg)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    log::info!(listen:% = listen, store = store_url.as_str(), cache:? = data_dir; "kiln-gitstore listening");
    gitstore::systemd::notify_status(&format!("serving on {listen}"));
    gitstore::systemd::notify_ready();
    // The watchdog's own round trip through the runtime and its blocking pool (where git and
    // file work runs) is gitstore's liveness; the server has no deeper state to vouch for.
    gitstore::systemd::spawn_watchdog(|| true);

    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = gitstore::http::serve(
        listener,
        server::router(app),
        gitstore::http::Timeouts::default(),
        async move {
            gitstore::systemd::stop_requested().await;
            log::info!(drain_secs = drain.as_secs(); "stopping: no new connections, finishing requests in flight");
            gitstore::systemd::notify_status("stopping: finishing requests in flight");
            let _ = stopping.send(());
        },
    );
    let deadline = async move {
        match stopped.await {
            Ok(()) => tokio::time::sleep(drain).await,
            // The server ended without a stop request: its own result decides.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = server => served.context("serving")?,
        () = deadline => log::warn!(
            "requests still in flight {drain:?} after SIGTERM; exiting without them \
             (their pushes were not acknowledged, so their clients see an error and retry)"
        ),
    }
    log::info!("stopped");
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(a) => {
            anyhow::ensure!(
                a.webhook_secret.len() >= 16,
                "KILN_WEBHOOK_SECRET must be at least 16 characters"
            );
            if let Some(h) = &a.admin_token_sha256 {
                anyhow::ensure!(
                    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
                    "KILN_ADMIN_TOKEN_SHA256 must be 64 hex digits (see `kiln-gitstore hash-token`)"
                );
            }
            let limits = Limits {
                max_file_bytes: a.max_file_bytes,
                max_push_bytes: a.max_push_bytes,
                max_tree_files: a.max_tree_files,
                max_tree_depth: a.max_tree_depth,
            };
            log::info!(
                "limits: {limits:?}; agents: {:?}; cors origins: {:?}",
                a.agent_url,
                a.cors_origin
            );
            let drain = Duration::from_secs(a.drain_secs);
            let quotas = gitstore::auth::Quotas {
                projects: Some(a.quota_projects),
                stored_bytes: Some(a.quota_stored_bytes),
                ..Default::default()
            };
            let catalog_path = a
                .catalog
                .unwrap_or_else(|| a.data_dir.join("catalog.sqlite3"));
            log::info!(
                "default quotas: {} projects, {} stored bytes per client; deleted projects purged after {} s; catalog {}",
                a.quota_projects,
                a.quota_stored_bytes,
                a.delete_grace_secs,
                catalog_path.display()
            );
            let cfg = server::Config {
                listen: a.listen,
                store_url: a.store,
                data_dir: a.data_dir,
                admin_token_sha256: a.admin_token_sha256.map(|h| h.to_ascii_lowercase()),
                webhook_secret: a.webhook_secret,
                agent_urls: a.agent_url.into_iter().filter(|u| !u.is_empty()).collect(),
                cors_origins: a
                    .cors_origin
                    .into_iter()
                    .filter(|u| !u.is_empty())
                    .collect(),
                limits,
                hook_exe: std::env::current_exe().context("locating this executable")?,
                fault: std::env::var("KILN_FAULT_INJECT").ok(),
                compact: CompactOptions {
                    min_packs: a.compact_min_packs.max(2),
                    grace: Duration::from_secs(a.compact_grace_secs),
                },
                catalog_path,
                delete_grace: Duration::from_secs(a.delete_grace_secs),
                quotas,
            };
            serve(cfg, drain).await?;
        }
        Command::Sync {
            project,
            dir,
            store,
        } => {
            let project = ProjectId::parse(&project)?;
            let store = BlobStore::open(&store)?;
            let started = std::time::Instant::now();
            let bar = ProgressLine::new();
            let r =
                gitstore::sync::sync_repo_with_progress(&store, &project, &dir, &|done, total| {
                    bar.show(done, total)
                })
                .await?;
            bar.finish();
            println!(
                "synced {project} to generation {}: {} packs, {} objects, {} bytes fetched, {} refs changed in {:.0?}",
                r.generation, r.packs_fetched, r.objects_fetched, r.bytes_fetched, r.refs_changed,
                started.elapsed()
            );
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Compact {
            project,
            store,
            work_dir,
            min_packs,
            grace_secs,
        } => {
            let project = ProjectId::parse(&project)?;
            let store = BlobStore::open(&store)?;
            std::fs::create_dir_all(&work_dir)
                .with_context(|| format!("creating {}", work_dir.display()))?;
            let opts = CompactOptions {
                min_packs: min_packs.max(2),
                grace: Duration::from_secs(grace_secs),
            };
            let r = gitstore::compact::compact(&store, &project, &work_dir, &opts).await?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::CreateClient { name, store } => {
            let store = BlobStore::open(&store)?;
            let (c, token) = gitstore::auth::create_client(&store, &name).await?;
            eprintln!(
                "created client {} ({}); the token is shown once:",
                c.id, c.name
            );
            println!("{token}");
        }
        Command::HashToken { token } => println!("{}", gitstore::auth::hash_token(&token)),
        Command::Hook { .. } => unreachable!("handled before logging starts"),
    }
    Ok(())
}

/// A one-line progress bar on stderr for a cold sync, drawn only when stderr is a terminal.
struct ProgressLine {
    tty: bool,
    last: std::sync::Mutex<(std::time::Instant, bool)>,
}

impl ProgressLine {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            tty: std::io::stderr().is_terminal(),
            last: std::sync::Mutex::new((std::time::Instant::now(), false)),
        }
    }

    fn show(&self, done: u64, total: u64) {
        if !self.tty || total == 0 {
            return;
        }
        let mut last = self.last.lock().expect("progress lock");
        // Redraw at most 20 times a second, and always at the end.
        if done < total && last.0.elapsed() < std::time::Duration::from_millis(50) {
            return;
        }
        *last = (std::time::Instant::now(), true);
        let width = 30;
        let filled = (done.saturating_mul(width) / total) as usize;
        eprint!(
            "\r  fetching packs [{}{}] {:.1}/{:.1} MiB",
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            done as f64 / 1048576.0,
            total as f64 / 1048576.0
        );
    }

    fn finish(&self) {
        if self.last.lock().expect("progress lock").1 {
            eprintln!();
        }
    }
}
