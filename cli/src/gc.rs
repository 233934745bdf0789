//! `kiln gc`: what the agent's retention pass would free now (`GET /api/retention`), or, with
//! `--run`, runs it and shows what it freed (`POST /api/retention/run`). Admin token only.

use serde_json::Value;

use crate::client::Remote;
use crate::output::{self, Output, Style};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Run the pass now (retire builds, evict, prune) instead of only reporting.
    #[arg(long)]
    pub(crate) run: bool,
    /// Evict every idle project's worktree and node_modules, whatever the disk use.
    #[arg(long)]
    pub(crate) evict_all: bool,
    /// Projects listed (the totals count all).
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: usize,
}

pub(crate) async fn run(agent: &Remote, out: &Output, a: Args) -> anyhow::Result<()> {
    let mut path = format!("/api/retention{}", if a.run { "/run" } else { "" });
    path.push_str(&format!("?limit={}", a.limit));
    if a.evict_all {
        path.push_str("&evict=all");
    }
    let r = if a.run {
        agent.post(&path).await
    } else {
        agent.get(&path).await
    }
    .map_err(|e| match e.status() {
        Some(403) => anyhow::anyhow!(
            "retention is the operator's: set KILN_ADMIN_TOKEN (or pass --admin when both \
             tokens are set)"
        ),
        _ => e.into(),
    })?;
    if out.json {
        out.print_json(&r);
        return Ok(());
    }
    print(out, &r);
    Ok(())
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn print(out: &Output, r: &Value) {
    let ran = r["ran"] == true;
    let disk = |d: &Value| {
        format!(
            "{:.1}% of {} used ({}), high water {}%, low water {}%",
            d["used_percent"].as_f64().unwrap_or(0.0),
            output::bytes(num(&d["size_bytes"])),
            d["path"].as_str().unwrap_or("-"),
            d["high_water_percent"],
            d["low_water_percent"],
        )
    };
    if r["disk"].is_object() {
        let over = if r["disk"]["over_high_water"] == true {
            out.paint(Style::Bad, " (over high water)")
        } else {
            String::new()
        };
        say!("disk: {}{over}", disk(&r["disk"]));
    }
    say!(
        "keep: the newest {} builds and those younger than {}, the current one and shared ones",
        r["keep_builds"],
        age(num(&r["keep_builds_secs"]))
    );
    let projects = r["projects"].as_array().cloned().unwrap_or_default();
    if !projects.is_empty() {
        let mut rows = vec![vec![
            "PROJECT".to_owned(),
            if ran { "RETIRED" } else { "RETIRE" }.to_owned(),
            "BYTES".to_owned(),
            "WORKTREE".to_owned(),
            "NODE_MODULES".to_owned(),
            if ran { "EVICTED" } else { "EVICT" }.to_owned(),
            "LAST BUILT".to_owned(),
        ]];
        for p in &projects {
            let builds: Vec<String> = p["retire"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| b["build"].to_string())
                .collect();
            rows.push(vec![
                p["project"].as_str().unwrap_or("-").to_owned(),
                if builds.is_empty() {
                    "-".to_owned()
                } else {
                    builds.join(",")
                },
                output::bytes(num(&p["retire_bytes"])),
                output::bytes(num(&p["worktree_bytes"])),
                output::bytes(num(&p["node_modules_bytes"])),
                match (p["evict"] == true, p["idle"] == true) {
                    (true, _) => out.paint(Style::Bad, "yes"),
                    (false, true) => "no".to_owned(),
                    (false, false) => "building".to_owned(),
                },
                p["last_built_at_ms"]
                    .as_u64()
                    .map_or("-".to_owned(), |ms| output::ago(ms / 1000)),
            ]);
        }
        out.table(&rows);
    }
    let t = &r["totals"];
    let listed = projects.len() as u64;
    if num(&t["projects"]) > listed {
        say!(
            "({listed} of {} projects listed; --limit shows more)",
            t["projects"]
        );
    }
    say!(
        "{} {} builds ({}), {} {} idle projects' worktrees and node_modules ({}; {} evictable in all)",
        if ran { "retired" } else { "would retire" },
        t["builds"],
        output::bytes(num(&t["build_bytes"])),
        if ran { "evicted" } else { "would evict" },
        t["evictions"],
        output::bytes(num(&t["evict_bytes"])),
        output::bytes(num(&t["evictable_bytes"])),
    );
    if let Some(m) = r["prune"]["message"].as_str().filter(|m| !m.is_empty()) {
        say!("pnpm store prune: {m}");
    }
    if ran && r["disk_after"].is_object() {
        say!("disk now: {}", disk(&r["disk_after"]));
    }
}

fn age(secs: u64) -> String {
    match secs {
        0 => "0 s (off)".to_owned(),
        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s => format!("{s} s"),
    }
}
