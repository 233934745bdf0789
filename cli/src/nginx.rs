//! nginx's configuration, rendered from the templates in `nginx/` with Kiln's settings.

#[derive(clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(_a: Args) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
