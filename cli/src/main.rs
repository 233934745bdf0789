//! `kiln`: the operator's command line.
//!
//! It talks to gitstore and the agent over their HTTP APIs (`client`), with settings from flags,
//! the environment or Kiln's env files (`settings`), and prints for people or, with `--json`, for
//! scripts (`output`). Exit codes: 0 done, 1 failed (the message says what to fix), 2 bad usage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// First: its `say!` is used by the modules below.
#[macro_use]
mod output;
mod builds;
mod client;
mod doctor;
mod gc;
mod nginx;
mod projects;
mod push;
mod settings;

use client::Remote;
use settings::{Settings, TokenUse};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Operate a Kiln build box",
    after_help = "Settings come from flags, then the environment (KILN_GIT_URL, KILN_AGENT_URL, \
                  KILN_TOKEN or KILN_ADMIN_TOKEN), then .kiln/local/credentials.env in the \
                  current directory (written by `make up`), then /etc/kiln/kiln.env (its \
                  KILN_GITSTORE_LISTEN and KILN_AGENT_LISTEN give the URLs). Tokens are read \
                  only from the environment or those files, never from arguments."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    global: Global,
}

#[derive(clap::Args)]
struct Global {
    /// gitstore's base URL, e.g. http://127.0.0.1:7070.
    #[arg(long, env = "KILN_GIT_URL", global = true, value_name = "URL")]
    git_url: Option<String>,
    /// The agent's base URL, e.g. http://127.0.0.1:7080.
    #[arg(long, env = "KILN_AGENT_URL", global = true, value_name = "URL")]
    agent_url: Option<String>,
    /// Read with KILN_ADMIN_TOKEN (every project) even when KILN_TOKEN is set.
    #[arg(long, global = true)]
    admin: bool,
    /// Print JSON for scripts instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Render nginx's configuration from Kiln's settings.
    Nginx(nginx::Args),
    /// List projects: what was pushed, and what the agent built from it.
    Projects,
    /// Show a project's build: state, commit, phases, error and preview URL.
    Status(builds::StatusArgs),
    /// Print a project's build log; -f follows it until the build ends.
    Logs(builds::LogsArgs),
    /// Rebuild a project's current commit.
    Build(builds::BuildArgs),
    /// Commit a directory as the next version of a project and push it.
    Push(push::Args),
    /// Check that this host can run Kiln, and say what to fix.
    Doctor,
    /// Show what retention would free on the agent's disk (builds, idle projects' worktrees
    /// and node_modules); --run frees it. Needs KILN_ADMIN_TOKEN.
    Gc(gc::Args),
}

/// An error whose report was already printed (doctor's failed checks): exit 1 without repeating it.
#[derive(Debug, thiserror::Error)]
#[error("reported above")]
pub(crate) struct Reported;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = output::Output::new(cli.global.json);
    let result = match cli.cmd {
        Cmd::Nginx(a) => nginx::run(a),
        cmd => run(cmd, &cli.global, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::FAILURE,
        Err(e) => {
            let msg = format!("{e:#}");
            if out.json {
                out.print_json(&serde_json::json!({ "error": msg }));
            }
            eprintln!("{} {msg}", out.paint(output::Style::Bad, "error:"));
            ExitCode::FAILURE
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn run(cmd: Cmd, g: &Global, out: &output::Output) -> anyhow::Result<()> {
    let settings = Settings::load(g.git_url.clone(), g.agent_url.clone(), g.admin);
    let remote = |usage: TokenUse| -> anyhow::Result<(Remote, Remote)> {
        let token = settings.token(usage)?;
        Ok((
            Remote::new(settings.git(), Some(token.clone()), "gitstore"),
            Remote::new(settings.agent(), Some(token), "the agent"),
        ))
    };
    match cmd {
        Cmd::Nginx(_) => unreachable!("handled in main"),
        Cmd::Projects => {
            let (git, agent) = remote(TokenUse::Read)?;
            projects::run(&git, &agent, out).await
        }
        Cmd::Status(a) => builds::status(&remote(TokenUse::Read)?.1, out, a).await,
        Cmd::Logs(a) => builds::logs(&remote(TokenUse::Read)?.1, out, a).await,
        Cmd::Build(a) => builds::build(&remote(TokenUse::Read)?.1, out, a).await,
        Cmd::Push(a) => {
            // Usage problems first: they need no token.
            builds::project_id(&a.project)?;
            let token = settings.token(TokenUse::Push)?;
            let git = Remote::new(settings.git(), Some(token.clone()), "gitstore");
            let agent = Remote::new(settings.agent(), Some(token.clone()), "the agent");
            push::run(&git, Some(&agent), &token, out, a).await
        }
        Cmd::Gc(a) => {
            let token = settings
                .var("KILN_ADMIN_TOKEN")
                .map(|(t, _)| t)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "kiln gc needs the admin token: set KILN_ADMIN_TOKEN (its SHA-256 is \
                         the agent's KILN_ADMIN_TOKEN_SHA256)"
                    )
                })?;
            let agent = Remote::new(settings.agent(), Some(token), "the agent");
            gc::run(&agent, out, a).await
        }
        Cmd::Doctor => {
            let git = Remote::new(settings.git(), None, "gitstore");
            let agent = Remote::new(settings.agent(), None, "the agent");
            doctor::run(&settings, &git, &agent, out).await
        }
    }
}
