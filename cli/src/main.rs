//! `kiln`: the operator's command line.

use clap::{Parser, Subcommand};

mod nginx;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Operate a Kiln build box")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Render nginx's configuration from Kiln's settings.
    Nginx(nginx::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Nginx(a) => nginx::run(a),
    }
}
