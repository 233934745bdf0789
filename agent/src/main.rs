use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agent::config::Config;
use anyhow::{ensure, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln-agent",
    version,
    about = "Kiln agent: builds pushed commits into previews"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Serve(Box<ServeArgs>),
    /// Internal: PID 1 of a build sandbox.
    #[command(hide = true)]
    SandboxInit { spec: PathBuf },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "KILN_AGENT_LISTEN", default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// Blob store URL (file:///dir, az://container, s3://bucket, gs://bucket).
    #[arg(long, env = "KILN_STORE_URL")]
    store: String,
    #[arg(long, env = "KILN_AGENT_STATE", default_value = "/var/lib/kiln-agent")]
    state_dir: PathBuf,
    /// The shared pnpm store and installed node_modules (default: <state-dir>/volume).
    #[arg(long, env = "KILN_AGENT_VOLUME")]
    volume_dir: Option<PathBuf>,
    /// Where published builds go; the web server serves `<dir>/<project>/current/`.
    #[arg(
        long,
        env = "KILN_PUBLISH_DIR",
        default_value = "/var/lib/kiln-agent/www"
    )]
    publish_dir: PathBuf,
    /// Base of preview URLs; `{project}` is replaced by the project id (one origin per project).
    #[arg(
        long,
        env = "KILN_PREVIEW_URL",
        default_value = "http://127.0.0.1:8080/preview"
    )]
    preview_url: String,
    /// Origins of the app generator allowed to frame previews, space-separated
    /// (e.g. `https://app.example.com`): the previews' console messages are posted only to them.
    /// Unset: any origin.
    #[arg(long, env = "KILN_GENERATOR_ORIGINS", default_value = "")]
    generator_origins: String,
    /// Shared secret of the sync webhook (at least 16 characters).
    #[arg(long, env = "KILN_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: String,
    /// Refuse sync webhooks without `X-Kiln-Timestamp` (signed over the body alone, so they can
    /// be replayed). gitstore always sends one; hand-made calls may not.
    #[arg(long, env = "KILN_WEBHOOK_REQUIRE_TIMESTAMP")]
    webhook_require_timestamp: bool,
    #[arg(long, env = "KILN_ADMIN_TOKEN_SHA256")]
    admin_token_sha256: Option<String>,
    /// Unprivileged user that installs and builds run as: a name, or uid:gid.
    #[arg(long, env = "KILN_SANDBOX_USER", default_value = "kiln-build")]
    sandbox_user: String,
    #[arg(long, env = "KILN_BUILD_MEMORY_MB")]
    memory_mb: Option<u64>,
    /// What a build may write outside its /tmp (its changes to the project and its output), on
    /// a tmpfs charged to its memory (default: half the build memory).
    #[arg(long, env = "KILN_BUILD_DISK_MB")]
    build_disk_mb: Option<u64>,
    #[arg(long, env = "KILN_BUILD_PIDS", default_value_t = 1024)]
    pids: u64,
    #[arg(long, env = "KILN_BUILD_CPUS")]
    cpus: Option<f64>,
    #[arg(long, env = "KILN_INSTALL_TIMEOUT_SECS", default_value_t = 600)]
    install_timeout_secs: u64,
    #[arg(long, env = "KILN_BUILD_TIMEOUT_SECS", default_value_t = 300)]
    build_timeout_secs: u64,
    /// Builds at once (default: sized from CPUs and memory).
    #[arg(long, env = "KILN_CONCURRENCY")]
    concurrency: Option<usize>,
    /// On SIGTERM, how long running builds may go on before they are cancelled and left queued
    /// for the next start (keep it under the unit's TimeoutStopSec= minus 20 s).
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECS", default_value_t = 60)]
    shutdown_grace_secs: u64,
    /// Published builds kept per project: the newest N (the current one counts)...
    #[arg(long, env = "KILN_KEEP_BUILDS", default_value_t = 5)]
    keep_builds: usize,
    /// ...and every build younger than this (default 7 days). The current build and builds of
    /// commits a live share link names are always kept.
    #[arg(long, env = "KILN_KEEP_BUILDS_SECS", default_value_t = 7 * 24 * 3600)]
    keep_builds_secs: u64,
    /// Disk use, in percent of the filesystem holding the state or volume dir, above which idle
    /// projects' worktrees and node_modules are evicted, least recently built first (0 evicts
    /// every idle project at each check).
    #[arg(long, env = "KILN_DISK_HIGH_WATER", default_value_t = 85,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    disk_high_water: u8,
    /// Evictions stop once disk use is below this percent.
    #[arg(long, env = "KILN_DISK_LOW_WATER", default_value_t = 70,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    disk_low_water: u8,
    /// How often retention and the disk check run, besides after every build.
    #[arg(long, env = "KILN_GC_INTERVAL_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    gc_interval_secs: u64,
    /// Builds a client may start per hour, unless its client record sets its own quota.
    #[arg(long, env = "KILN_QUOTA_BUILDS_PER_HOUR", default_value_t = 600)]
    quota_builds_per_hour: u64,
    /// Builds of one client's projects queued or running at once, unless its client record
    /// sets its own quota (default: the agent's build concurrency).
    #[arg(long, env = "KILN_QUOTA_CONCURRENT_BUILDS")]
    quota_concurrent_builds: Option<u64>,
    #[arg(long, env = "KILN_LOG_LIMIT_MB", default_value_t = 8)]
    log_limit_mb: u64,
    #[arg(long, env = "KILN_MAX_OUTPUT_MB", default_value_t = 512)]
    max_output_mb: u64,
    #[arg(long, env = "KILN_PNPM", default_value = "/usr/bin/pnpm")]
    pnpm: PathBuf,
    #[arg(long, env = "KILN_NODE", default_value = "/usr/bin/node")]
    node: PathBuf,
    /// Default build engine: `fast` (a current Vite kept by Kiln, falling back to the project's
    /// own on failure) or `project`. A project pins one with `"kiln": {"engine": ...}` in
    /// package.json.
    #[arg(long, env = "KILN_ENGINE", default_value = "fast")]
    engine: agent::config::Engine,
    /// Warm build processes (a `vite build --watch` per recently built project, so a one-file
    /// change costs only Vite's rebuild) kept at most; 0 builds every change cold (default:
    /// what the warm memory holds at 512 MiB each).
    #[arg(long, env = "KILN_WARM_MAX")]
    warm_max: Option<usize>,
    /// Memory the idle warm processes may hold together, least recently used stopped first
    /// (default: a quarter of the machine).
    #[arg(long, env = "KILN_WARM_MEMORY_MB")]
    warm_memory_mb: Option<u64>,
    /// A warm process unused this long is stopped.
    #[arg(long, env = "KILN_WARM_IDLE_SECS", default_value_t = 900)]
    warm_idle_secs: u64,
    /// Several agents on one store: each builds the projects it holds a lease of this many
    /// seconds on (renewed every third), and takes over those of an agent that stopped renewing.
    /// 0, the default, is a single agent: it builds every project. Needs a store that replaces
    /// conditionally (az://, s3://, gs://).
    #[arg(long, env = "KILN_LEASE_SECS", default_value_t = 0)]
    lease_secs: u64,
    /// Projects this agent leases at most.
    #[arg(long, env = "KILN_LEASE_CAPACITY", default_value_t = 1000)]
    lease_capacity: usize,
    /// This agent's id among those sharing the store (default: the host name).
    #[arg(long, env = "KILN_AGENT_ID")]
    agent_id: Option<String>,
    /// Where other machines reach this agent's API, published with its leases (default:
    /// `http://<listen address>`).
    #[arg(long, env = "KILN_AGENT_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// `host:port` of the nginx that serves this agent's previews, where a front door
    /// (`kiln nginx render --route-agents`) sends the previews of the projects it holds.
    #[arg(long, env = "KILN_AGENT_ADVERTISE_PREVIEW", default_value = "")]
    advertise_preview: String,
    /// A blob store that a CDN serves from (`az://previews`, `s3://...`, a directory): every
    /// project's served build is mirrored there as `<project>/<file>`, so previews can be
    /// served with no VM in the path. Keep it apart from KILN_STORE: this one is public.
    /// `KILN_CDN_AZURE_*` (`_AWS_*`, `_GOOGLE_*`) variables override the plain ones for it, for
    /// a store in another account.
    #[arg(long, env = "KILN_CDN_STORE")]
    cdn_store: Option<String>,
    /// Where the CDN serves that store's root, reported in each project's status.
    #[arg(long, env = "KILN_CDN_URL")]
    cdn_url: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::SandboxInit { spec } => std::process::exit(agent::sandbox::init_main(&spec)),
        Cmd::Serve(a) => {
            // Before any thread starts (see its docs).
            agent::sandbox::own_mount_namespace()
                .context("the agent needs root to mount its build scratch space")?;
            gitstore::logging::init("kiln-agent");
            tokio::runtime::Runtime::new()?.block_on(serve(*a))
        }
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    ensure!(
        a.webhook_secret.len() >= 16,
        "KILN_WEBHOOK_SECRET must be at least 16 characters"
    );
    for p in [&a.pnpm, &a.node] {
        ensure!(
            p.starts_with("/usr") && p.exists(),
            "{} must exist under /usr, where the sandbox can see it (install: npm i -g pnpm@10)",
            p.display()
        );
    }
    let (uid, gid) = sandbox_user(&a.sandbox_user)?;
    ensure!(uid != 0, "the sandbox user must not be root");
    let memory_bytes = a
        .memory_mb
        .map(|m| m << 20)
        .unwrap_or_else(Config::default_memory);
    let concurrency = a
        .concurrency
        .unwrap_or_else(|| Config::default_concurrency(memory_bytes));
    let warm_memory_bytes = a
        .warm_memory_mb
        .map(|m| m << 20)
        .unwrap_or_else(Config::default_warm_memory);
    let lease = lease_config(&a)?;
    let cfg = Config {
        volume_dir: a.volume_dir.unwrap_or_else(|| a.state_dir.join("volume")),
        state_dir: a.state_dir,
        publish_dir: a.publish_dir,
        preview_url: a.preview_url,
        generator_origins: a
            .generator_origins
            .split_whitespace()
            .map(agent::config::parse_origin)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("KILN_GENERATOR_ORIGINS: {e}"))?,
        webhook_secret: a.webhook_secret.into_bytes(),
        webhook_require_timestamp: a.webhook_require_timestamp,
        admin_token_sha256: a.admin_token_sha256.map(|h| h.to_ascii_lowercase()),
        sandbox_uid: uid,
        sandbox_gid: gid,
        memory_bytes,
        disk_bytes: a.build_disk_mb.map(|m| m << 20).unwrap_or(memory_bytes / 2),
        pids: a.pids,
        cpus: a.cpus.unwrap_or_else(Config::default_cpus),
        install_timeout: Duration::from_secs(a.install_timeout_secs),
        build_timeout: Duration::from_secs(a.build_timeout_secs),
        concurrency,
        keep_builds: a.keep_builds,
        keep_builds_for: Duration::from_secs(a.keep_builds_secs),
        disk_high_water: a.disk_high_water,
        // Above the high-water mark it could never be reached: evict down to the mark.
        disk_low_water: a.disk_low_water.min(a.disk_high_water),
        gc_interval: Duration::from_secs(a.gc_interval_secs),
        quota_builds_per_hour: a.quota_builds_per_hour,
        quota_concurrent_builds: a.quota_concurrent_builds.unwrap_or(concurrency as u64),
        log_limit_bytes: a.log_limit_mb << 20,
        max_output_bytes: a.max_output_mb << 20,
        pnpm: a.pnpm,
        node: a.node,
        engine: a.engine,
        warm_max: a
            .warm_max
            .unwrap_or_else(|| Config::default_warm_max(warm_memory_bytes)),
        warm_memory_bytes,
        warm_idle: Duration::from_secs(a.warm_idle_secs),
        lease,
    };
    agent::sandbox::check_host().context("this host cannot run build sandboxes")?;
    let cgroups = agent::sandbox::delegate_cgroups().context("using the delegated cgroup")?;
    log::info!(cgroups = cgroups.as_str(); "build cgroups go under this parent");
    for d in [&cfg.state_dir, &cfg.publish_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o711))?;
    let store = gitstore::BlobStore::open(&a.store).context("opening the blob store")?;
    ensure!(
        cfg.lease.is_none() || store.replaces_conditionally(),
        "leases need a blob store that replaces conditionally (az://, s3://, gs://); the local filesystem cannot, and one agent needs none: unset KILN_LEASE_SECS"
    );
    let cdn = match &a.cdn_store {
        Some(url) => {
            ensure!(
                url.trim_end_matches('/') != a.store.trim_end_matches('/'),
                "KILN_CDN_STORE must not be KILN_STORE: what is mirrored there is public"
            );
            let store = gitstore::BlobStore::open_with_env(url, "KILN_CDN_")
                .context("opening the CDN store")?;
            Some(agent::cdn::Cdn::new(store, a.cdn_url.clone()))
        }
        None => None,
    };
    let exe = std::env::current_exe().context("finding the agent binary")?;
    log::info!(
        listen:% = a.listen, store = store.url(), concurrency = cfg.concurrency,
        memory_mb = cfg.memory_bytes >> 20, disk_mb = cfg.disk_bytes >> 20, cpus = cfg.cpus, keep_builds = cfg.keep_builds,
        keep_builds_secs = cfg.keep_builds_for.as_secs(), disk_high_water = cfg.disk_high_water,
        disk_low_water = cfg.disk_low_water, quota_builds_per_hour = cfg.quota_builds_per_hour,
        quota_concurrent_builds = cfg.quota_concurrent_builds, warm_max = cfg.warm_max,
        warm_memory_mb = cfg.warm_memory_bytes >> 20, warm_idle_secs = cfg.warm_idle.as_secs();
        "kiln-agent starting"
    );
    let agent_volume = cfg.volume_dir.clone();
    if let Some(cdn) = &cdn {
        log::info!(cdn_store = cdn.store_url(); "served builds are mirrored to the CDN store");
    }
    let agent = agent::Agent::new(cfg, store, cdn, exe);
    agent
        .prepare_volume()
        .with_context(|| format!("preparing {}", agent_volume.display()))?;
    agent.recover();
    agent.mirror_all();
    if agent.ownership_enabled() {
        // Claims, renewals and catching up with the store, every third of a term.
        agent.start_leases();
    } else {
        // The disk is only a cache: catch up with pushes made while this machine was away.
        // Retried until it works: a store down at start must not leave this machine behind.
        tokio::spawn({
            let agent = agent.clone();
            async move {
                let mut wait = Duration::from_secs(5);
                loop {
                    match agent.reconcile().await {
                        Ok(n) => {
                            log::info!(queued = n; "reconciled with the blob store");
                            break;
                        }
                        Err(e) => log::error!(
                            error:% = e, retry_secs = wait.as_secs();
                            "cannot list projects in the blob store; trying again"
                        ),
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        });
    }
    // Installed even when the default is `project`: a project may pin `fast`.
    agent.install_fast_engine();
    agent.start_gc();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    // nginx reports preview views to the UDP port of the same number (agent/src/views.rs).
    let views = tokio::net::UdpSocket::bind(a.listen)
        .await
        .with_context(|| format!("binding {} (UDP, for nginx's view reports)", a.listen))?;
    agent.start_views(views);
    // Stop budget, inside the unit's TimeoutStopSec= (90 s): HTTP drain, then running builds,
    // then up to 10 s for cancelled sandboxes to be cleaned up.
    const HTTP_DRAIN: Duration = Duration::from_secs(10);
    let build_grace = Duration::from_secs(a.shutdown_grace_secs);
    use gitstore::systemd;
    systemd::notify_status(&format!("serving on {}", a.listen));
    systemd::notify_ready();
    // The watchdog's round trip through the runtime and its blocking pool (where checkouts and
    // publishing run) is the agent's liveness.
    systemd::spawn_watchdog(|| true);
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = gitstore::http::serve(
        listener,
        agent::server::router(agent.clone()),
        gitstore::http::Timeouts::default(),
        async move {
            systemd::stop_requested().await;
            log::info!("stopping: no new requests, then running builds get {build_grace:?}");
            systemd::notify_status("stopping: finishing requests and running builds");
            let _ = stopping.send(());
        },
    );
    // `/logs?follow=1` streams last as long as a build: they must not hold the builds' grace.
    let drain_deadline = async move {
        match stopped.await {
            Ok(()) => tokio::time::sleep(HTTP_DRAIN).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = server => served?,
        () = drain_deadline => log::info!("stopping: dropping HTTP connections still open after {HTTP_DRAIN:?}"),
    }
    agent.shutdown(build_grace).await;
    log::info!("stopped");
    Ok(())
}

fn lease_config(a: &ServeArgs) -> anyhow::Result<Option<agent::ownership::LeaseConfig>> {
    if a.lease_secs == 0 {
        return Ok(None);
    }
    ensure!(
        (3..=3600).contains(&a.lease_secs),
        "KILN_LEASE_SECS must be 0 (one agent) or from 3 to 3600 seconds"
    );
    let id = match &a.agent_id {
        Some(id) => id.clone(),
        None => nix::unistd::gethostname()?
            .to_string_lossy()
            .to_ascii_lowercase(),
    };
    ensure!(
        gitstore::lease::valid_agent_id(&id),
        "agent id {id:?} must be 1 to 63 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit: set KILN_AGENT_ID"
    );
    let preview = a.advertise_preview.trim().to_owned();
    ensure!(
        preview.is_empty() || valid_host_port(&preview),
        "KILN_AGENT_ADVERTISE_PREVIEW={preview:?} must be host:port (letters, digits, '.', '-', and a port), e.g. 10.0.0.5:8080"
    );
    Ok(Some(agent::ownership::LeaseConfig {
        id,
        preview,
        url: a
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", a.listen)),
        term: Duration::from_secs(a.lease_secs),
        capacity: a.lease_capacity.max(1),
    }))
}

/// A name nginx can put in `proxy_pass http://<it>` unchanged: host (or IPv4) and port.
fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// `name` (looked up in /etc/passwd) or `uid:gid`.
fn sandbox_user(spec: &str) -> anyhow::Result<(u32, u32)> {
    if let Some((u, g)) = spec.split_once(':') {
        return Ok((u.parse().context("uid")?, g.parse().context("gid")?));
    }
    let user = nix::unistd::User::from_name(spec)?.with_context(|| {
        format!("sandbox user {spec:?} does not exist: create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {spec}` or set KILN_SANDBOX_USER=uid:gid")
    })?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}
