//! `kiln projects`: gitstore's projects (what was pushed) beside the agent's status (what is
//! built and served).

use serde_json::{json, Value};

use crate::client::{Remote, RemoteError};
use crate::output::{self, Output};

/// Every project gitstore lists, following `next_cursor` page by page (a gitstore from before
/// paging answers one page without it).
async fn list_all(git: &Remote) -> anyhow::Result<Vec<Value>> {
    let mut projects = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/projects?limit=1000&cursor={c}"),
            None => "/api/projects?limit=1000".to_owned(),
        };
        let page = git.get(&path).await.map_err(|e| match e.status() {
            // A gitstore from before the route: say so rather than "no such route".
            Some(404 | 405) => {
                anyhow::anyhow!(
                    "{e}: this gitstore has no GET /api/projects; upgrade kiln-gitstore"
                )
            }
            _ => e.into(),
        })?;
        projects.extend(page["projects"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            // Ids are [a-z0-9-]: nothing to escape in the query.
            Some(c) if cursor.as_deref() != Some(c) => cursor = Some(c.to_owned()),
            _ => return Ok(projects),
        }
    }
}

pub(crate) async fn run(git: &Remote, agent: &Remote, out: &Output) -> anyhow::Result<()> {
    let projects = list_all(git).await?;
    let mut rows = Vec::new();
    let mut agent_problem: Option<RemoteError> = None;
    for p in projects {
        let id = p["id"].as_str().unwrap_or_default().to_owned();
        let status = if agent_problem.is_some() {
            None
        } else {
            match agent.get(&format!("/status/{id}")).await {
                Ok(st) => Some(st),
                // Pushed but never built here (or not announced to this agent yet).
                Err(e) if e.status() == Some(404) => None,
                Err(e) => {
                    agent_problem = Some(e);
                    None
                }
            }
        };
        rows.push((p, status));
    }
    if let Some(e) = &agent_problem {
        eprintln!("warning: no build states: {e}");
    }
    if out.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|(p, st)| {
                json!({
                    "id": p["id"],
                    "name": p["name"],
                    "labels": p["labels"],
                    "commit": p["commit"],
                    "head": p["head"],
                    "updated_at": p["updated_at"],
                    "generation": p["generation"],
                    "owner": p["owner"],
                    "store_bytes": p["store_bytes"],
                    "agent": st.as_ref().map(|st| json!({
                        "state": st["state"],
                        "build": st["build"],
                        "commit": st["commit"],
                        "preview_url": st["last_good"]["preview_url"],
                        "error": st["error"],
                    })),
                })
            })
            .collect();
        out.print_json(&Value::Array(list));
        return Ok(());
    }
    if rows.is_empty() {
        say!(
            "no projects yet: push one with `kiln push <dir> <project>` or `git push` to {}/git/<project>.git",
            git.endpoint.url
        );
        return Ok(());
    }
    let mut table = vec![vec![
        "PROJECT".to_owned(),
        "HEAD".into(),
        "PUSHED".into(),
        "STATE".into(),
        "BUILT".into(),
        "PREVIEW".into(),
    ]];
    for (p, st) in &rows {
        let dash = || "-".to_owned();
        let (state, built, preview) = match st {
            Some(st) => (
                out.state(st["state"].as_str().unwrap_or("-")),
                st["commit"]
                    .as_str()
                    .map(|c| output::short(c).to_owned())
                    .unwrap_or_else(dash),
                st["last_good"]["preview_url"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(dash),
            ),
            None => (out.state("-"), dash(), dash()),
        };
        table.push(vec![
            p["id"].as_str().unwrap_or_default().to_owned(),
            p["commit"]
                .as_str()
                .map(|c| output::short(c).to_owned())
                .unwrap_or_else(dash),
            p["updated_at"]
                .as_u64()
                .map(output::ago)
                .unwrap_or_else(dash),
            state,
            built,
            preview,
        ]);
    }
    out.table(&table);
    Ok(())
}
