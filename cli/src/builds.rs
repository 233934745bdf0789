//! The agent's view of a project: `kiln status`, `kiln logs`, `kiln build`, and waiting for a
//! build to settle (shared with `kiln push --wait`).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::client::{Remote, RemoteError};
use crate::output::{self, Output, Style};

/// Phases in the order a build runs them; others (from a newer agent) follow by name.
const PHASE_ORDER: [&str; 5] = ["sync", "checkout", "install", "build", "publish"];
const POLL: Duration = Duration::from_millis(250);

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    /// Project id.
    pub(crate) project: String,
}

#[derive(clap::Args)]
pub(crate) struct LogsArgs {
    /// Project id.
    pub(crate) project: String,
    /// Follow the log until the build ends.
    #[arg(short, long)]
    pub(crate) follow: bool,
    /// Build number (default: the current or last build).
    #[arg(long)]
    pub(crate) build: Option<u64>,
}

#[derive(clap::Args)]
pub(crate) struct BuildArgs {
    /// Project id.
    pub(crate) project: String,
    /// Wait until the build settles, showing its phase; exit 1 unless it is ready.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 900, value_name = "SECS")]
    pub(crate) timeout: u64,
}

/// The project id, validated before anything is sent.
pub(crate) fn project_id(raw: &str) -> anyhow::Result<gitstore::ProjectId> {
    Ok(gitstore::ProjectId::parse(raw)?)
}

fn is_active(state: &str) -> bool {
    matches!(
        state,
        "queued" | "syncing" | "installing" | "building" | "publishing"
    )
}

/// `GET /status/<p>`, with a 404 explained.
pub(crate) async fn fetch_status(agent: &Remote, project: &str) -> anyhow::Result<Value> {
    agent
        .get(&format!("/status/{project}"))
        .await
        .map_err(|e| match e.status() {
            Some(404) => anyhow::anyhow!(
                "the agent knows no project {project} (or it is another client's): push to it \
                 first, or check KILN_TOKEN"
            ),
            _ => e.into(),
        })
}

pub(crate) async fn status(agent: &Remote, out: &Output, a: StatusArgs) -> anyhow::Result<()> {
    let p = project_id(&a.project)?;
    let st = fetch_status(agent, p.as_str()).await?;
    if out.json {
        out.print_json(&st);
        return Ok(());
    }
    print_status(out, &st);
    Ok(())
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// The preview URL of this status's build, when it is the one being served.
fn preview_of(st: &Value) -> Option<&str> {
    let good = &st["last_good"];
    (good["build"] == st["build"]).then(|| good["preview_url"].as_str())?
}

fn print_status(out: &Output, st: &Value) {
    let state = str_of(st, "state");
    let commit = st["commit"].as_str().map(output::short).unwrap_or("-");
    say!(
        "{}: {} (build {}, commit {commit})",
        out.paint(Style::Bold, str_of(st, "project")),
        out.state(state),
        st["build"]
    );
    let mut rows: Vec<(&str, String)> = Vec::new();
    if let Some(e) = st["engine"].as_str() {
        rows.push(("engine", e.to_owned()));
    }
    if let Some(i) = st["install"].as_str() {
        rows.push(("install", i.to_owned()));
    }
    if let Some(phases) = st["phases"].as_object().filter(|p| !p.is_empty()) {
        let mut names: Vec<&String> = phases.keys().collect();
        names.sort_by_key(|n| {
            PHASE_ORDER
                .iter()
                .position(|p| p == n)
                .unwrap_or(PHASE_ORDER.len())
        });
        let total: u64 = phases.values().filter_map(Value::as_u64).sum();
        let list: Vec<String> = names
            .iter()
            .map(|n| format!("{n} {}", output::millis(phases[*n].as_u64().unwrap_or(0))))
            .collect();
        rows.push((
            "phases",
            format!("{} (total {})", list.join(", "), output::millis(total)),
        ));
    }
    let peak = st["peak_memory_bytes"].as_u64().unwrap_or(0);
    let cpu = st["cpu_time_ms"].as_u64().unwrap_or(0);
    if peak > 0 || cpu > 0 {
        rows.push((
            "resources",
            format!(
                "peak memory {}, cpu {}",
                output::bytes(peak),
                output::millis(cpu)
            ),
        ));
    }
    if let Some(ms) = st["finished_at_ms"].as_u64() {
        rows.push(("finished", output::ago(ms / 1000)));
    } else if let Some(ms) = st["queued_at_ms"].as_u64().filter(|_| is_active(state)) {
        rows.push(("queued", output::ago(ms / 1000)));
    }
    if let Some(url) = preview_of(st) {
        rows.push(("preview", url.to_owned()));
    }
    let good = &st["last_good"];
    if good.is_object() && good["build"] != st["build"] {
        rows.push((
            "last good",
            format!(
                "build {}, commit {}, {}",
                good["build"],
                output::short(str_of(good, "commit")),
                str_of(good, "preview_url")
            ),
        ));
    }
    if let Some(err) = st["error"].as_str() {
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut shown = lines[..lines.len().min(6)].join("\n             ");
        if lines.len() > 6 {
            shown.push_str("\n             …");
        }
        rows.push(("error", out.paint(Style::Bad, &shown)));
        rows.push((
            "full log",
            format!(
                "kiln logs {} --build {}",
                str_of(st, "project"),
                st["build"]
            ),
        ));
    }
    for (k, v) in rows {
        say!("  {}{v}", out.paint(Style::Dim, &format!("{k:<11}")));
    }
}

pub(crate) async fn logs(agent: &Remote, out: &Output, a: LogsArgs) -> anyhow::Result<()> {
    let p = project_id(&a.project)?;
    // Pin the build number now, so a build that starts meanwhile does not switch logs under us.
    let build = match a.build {
        Some(b) => b,
        None => fetch_status(agent, p.as_str()).await?["build"]
            .as_u64()
            .context("the agent's status has no build number")?,
    };
    let mut path = format!("/logs/{p}?build={build}");
    if a.follow {
        path.push_str("&follow=1");
    }
    let mut r = agent
        .get_stream(&path)
        .await
        .map_err(|e| match e.status() {
            Some(404) => anyhow::anyhow!("{e}; list builds with `kiln status {p}`"),
            _ => e.into(),
        })?;
    let mut collected = Vec::new();
    let mut pending = Vec::new();
    let stdout = std::io::stdout();
    while let Some(chunk) = r
        .chunk()
        .await
        .context("the agent's log stream broke off; run the command again")?
    {
        if out.json {
            collected.extend_from_slice(&chunk);
            continue;
        }
        pending.extend_from_slice(&chunk);
        // Highlighting phase markers needs whole lines; plain output passes through as it comes.
        let end = if out.colored() {
            pending.iter().rposition(|b| *b == b'\n')
        } else {
            pending.len().checked_sub(1)
        };
        if let Some(end) = end {
            let rest = pending.split_off(end + 1);
            print_log(out, &mut stdout.lock(), &pending);
            pending = rest;
        }
    }
    if out.json {
        out.print_json(&json!({
            "project": p,
            "build": build,
            "log": String::from_utf8_lossy(&collected),
        }));
    } else {
        print_log(out, &mut stdout.lock(), &pending);
    }
    Ok(())
}

fn print_log(out: &Output, w: &mut impl Write, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for line in text.split_inclusive('\n') {
        let shown = if line.starts_with("==> ") {
            out.paint(Style::Bold, line.trim_end_matches('\n')) + "\n"
        } else if line.starts_with("[kiln] ") {
            out.paint(Style::Dim, line.trim_end_matches('\n')) + "\n"
        } else {
            line.to_owned()
        };
        if let Err(e) = w.write_all(shown.as_bytes()) {
            output::stdout_gone(e);
        }
    }
    if let Err(e) = w.flush() {
        output::stdout_gone(e);
    }
}

pub(crate) async fn build(agent: &Remote, out: &Output, a: BuildArgs) -> anyhow::Result<()> {
    let p = project_id(&a.project)?;
    let queued = agent.post(&format!("/build/{p}")).await?;
    let n = queued["build"]
        .as_u64()
        .context("the agent answered without a build number")?;
    if !a.wait {
        if out.json {
            out.print_json(&json!({"project": p, "build": n, "state": "queued"}));
        } else {
            say!("queued build {n} of {p}; follow it with `kiln logs {p} -f`");
        }
        return Ok(());
    }
    let st = wait(
        agent,
        out,
        p.as_str(),
        Target::Build(n),
        Duration::from_secs(a.timeout),
    )
    .await?;
    report_settled(out, &st, None)
}

/// What a wait is for.
pub(crate) enum Target {
    /// Build number N (or a later one that replaced it) has settled.
    Build(u64),
    /// A build of this commit has settled.
    Commit(String),
}

/// Polls the agent until `target` settles; shows the phase on a terminal. Returns the status.
pub(crate) async fn wait(
    agent: &Remote,
    out: &Output,
    project: &str,
    target: Target,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let spinner = out.spinner(format!("{project}: waiting for the agent"));
    let mut last: Option<Value> = None;
    loop {
        match agent.get(&format!("/status/{project}")).await {
            Ok(st) => {
                let state = str_of(&st, "state").to_owned();
                let settled = !is_active(&state)
                    && match &target {
                        Target::Build(n) => st["build"].as_u64().is_some_and(|b| b >= *n),
                        Target::Commit(c) => st["commit"].as_str() == Some(c.as_str()),
                    };
                if settled {
                    spinner.finish_and_clear();
                    return Ok(st);
                }
                let ours = match &target {
                    Target::Build(n) => st["build"].as_u64() >= Some(*n),
                    Target::Commit(c) => {
                        st["commit"].is_null() || st["commit"].as_str() == Some(c.as_str())
                    }
                };
                spinner.set_message(if ours && is_active(&state) {
                    format!("{project}: build {} {state}", st["build"])
                } else {
                    format!("{project}: waiting for the agent to start the build")
                });
                last = Some(st);
            }
            // A first push reaches the agent by webhook: until then it does not know the project.
            Err(e) if e.status() == Some(404) && matches!(target, Target::Commit(_)) => {}
            Err(e @ RemoteError::Unreachable { .. }) if last.is_some() => {
                spinner.set_message(format!("{project}: agent unreachable, retrying ({e})"));
            }
            Err(e) => {
                spinner.finish_and_clear();
                return Err(e.into());
            }
        }
        if started.elapsed() > timeout {
            spinner.finish_and_clear();
            let now = last
                .as_ref()
                .map(|s| format!("build {} is {}", s["build"], str_of(s, "state")))
                .unwrap_or_else(|| "the agent has not started it".into());
            bail!(
                "gave up waiting after {}s: {now}. Follow it with `kiln logs {project} -f`, or \
                 check that gitstore's KILN_AGENT_URLS names this agent",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Prints how a settled build ended; an error (exit 1) unless it is ready. `extra` is merged
/// into the JSON output.
pub(crate) fn report_settled(
    out: &Output,
    st: &Value,
    extra: Option<serde_json::Map<String, Value>>,
) -> anyhow::Result<()> {
    let state = str_of(st, "state");
    let project = str_of(st, "project");
    let ok = state == "ready";
    if out.json {
        let mut v = json!({
            "project": project,
            "build": st["build"],
            "state": state,
            "commit": st["commit"],
            "preview_url": preview_of(st),
            "error": st["error"],
        });
        if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra) {
            obj.extend(extra);
        }
        out.print_json(&v);
    } else if ok {
        let total: u64 = st["phases"]
            .as_object()
            .map(|p| p.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        say!(
            "{} {project} build {} {} at {} in {}",
            out.paint(Style::Good, "✓"),
            st["build"],
            out.state(state),
            output::short(str_of(st, "commit")),
            output::millis(total)
        );
        if let Some(url) = preview_of(st) {
            say!("  preview {url}");
        }
    } else {
        print_status(out, st);
    }
    if ok {
        Ok(())
    } else {
        let first = st["error"]
            .as_str()
            .and_then(|e| e.lines().find(|l| !l.trim().is_empty()))
            .map(|l| l.trim().trim_end_matches(':'))
            .unwrap_or("no error recorded");
        bail!(
            "build {} of {project} {state}: {first}; see `kiln logs {project} --build {}`",
            st["build"],
            st["build"]
        )
    }
}
