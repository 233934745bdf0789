//! What the browser gets besides the app itself: the console-capture script injected into every
//! published HTML page, and the page shown in place of the app while its first build runs or
//! after its last build failed (`<publish>/<project>/status.html`, which nginx prefers for
//! navigations while it exists).

use std::path::Path;

use serde::Serialize;

use crate::status::{State, Status};

const CONSOLE_JS: &str = include_str!("console.js");

/// The `status.html` name nginx looks for in a project's publish directory.
pub const STATUS_PAGE: &str = "status.html";

#[derive(Serialize)]
struct ScriptConfig<'a> {
    origins: &'a [String],
    project: &'a str,
    build: u64,
    status: Option<PageStatus<'a>>,
}

#[derive(Serialize)]
struct PageStatus<'a> {
    state: &'a str,
    error: Option<&'a str>,
}

/// The `<script>` element that forwards console output and errors to the framing generator.
pub fn console_script(origins: &[String], project: &str, build: u64) -> String {
    script(&ScriptConfig {
        origins,
        project,
        build,
        status: None,
    })
}

fn script(cfg: &ScriptConfig<'_>) -> String {
    // `<` escaped so no value can close the script element early.
    let json = serde_json::to_string(cfg)
        .expect("serializes")
        .replace('<', "\\u003c");
    format!("<script>{}({json});</script>", CONSOLE_JS.trim_end())
}

/// Inserts `tag` as the first thing the browser runs: right after `<head ...>`, else after
/// `<html ...>`, else after the doctype, else at the very start.
pub fn inject(html: &str, tag: &str) -> String {
    // ASCII lower-casing keeps byte offsets, so positions found in `lower` index `html`.
    let lower = html.to_ascii_lowercase();
    let at = open_tag_end(&lower, "<head")
        .or_else(|| open_tag_end(&lower, "<html"))
        .or_else(|| open_tag_end(&lower, "<!doctype"))
        .unwrap_or(0);
    let mut out = String::with_capacity(html.len() + tag.len());
    out.push_str(&html[..at]);
    out.push_str(tag);
    out.push_str(&html[at..]);
    out
}

/// The byte offset just past the `>` of the first `name` tag in `lower` (lower-cased HTML),
/// where `name` is followed by `>` or whitespace (so `<header>` is not `<head>`).
fn open_tag_end(lower: &str, name: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let start = from + i;
        let after = start + name.len();
        match lower.as_bytes().get(after) {
            Some(b'>') => return Some(after + 1),
            Some(c) if c.is_ascii_whitespace() => {
                return lower[after..].find('>').map(|j| after + j + 1)
            }
            _ => from = after,
        }
    }
    None
}

/// What a project's preview URL should show instead of the app, if anything: a building page
/// while there is nothing to serve yet (or the page showing is a failure), a failure page after a
/// failed build, nothing once a build is ready.
pub fn status_page(
    status: &Status,
    has_current: bool,
    showing_page: bool,
    origins: &[String],
    log_url: Option<&str>,
) -> Option<String> {
    let previous_error = status
        .history
        .first()
        .filter(|h| matches!(h.state, State::Failed | State::TimedOut))
        .and_then(|h| h.error.as_deref());
    let (title, detail, refresh) = match status.state {
        s if s.is_active() => {
            if has_current && !showing_page {
                return None;
            }
            let detail = match previous_error {
                Some(e) if showing_page => format!("The previous build failed:\n{e}"),
                _ => String::new(),
            };
            ("Building your preview…", detail, 2)
        }
        State::Ready => return None,
        State::Failed | State::TimedOut => (
            if status.state == State::TimedOut {
                "The last build timed out"
            } else {
                "The last build failed"
            },
            status.error.clone().unwrap_or_default(),
            5,
        ),
        _ if has_current => return None,
        State::Refused => (
            "Build waiting for quota",
            format!(
                "{}\nIt starts once the quota allows; this page then follows it.",
                status.error.as_deref().unwrap_or_default()
            ),
            10,
        ),
        _ => (
            "No build to show",
            "The last build was cancelled. Push again or ask for a build to see a preview."
                .to_owned(),
            5,
        ),
    };
    let error = matches!(
        status.state,
        State::Failed | State::TimedOut | State::Refused
    )
    .then_some(detail.as_str())
    .filter(|d| !d.is_empty());
    let tag = script(&ScriptConfig {
        origins,
        project: &status.project,
        build: status.build,
        status: Some(PageStatus {
            state: status.state.as_str(),
            error,
        }),
    });
    let commit = status
        .commit
        .as_deref()
        .map(|c| format!(" of commit <code>{}</code>", escape(&c[..c.len().min(12)])))
        .unwrap_or_default();
    let log = match log_url {
        Some(u) => format!(
            r#"<p><a href="{}" target="_blank" rel="noopener">Build log</a> (needs a Kiln token)</p>"#,
            escape(u)
        ),
        None => format!(
            "<p>Build log: <code>GET /logs/{}?build={}</code> on the Kiln API</p>",
            escape(&status.project),
            status.build
        ),
    };
    let detail_html = if detail.is_empty() {
        String::new()
    } else {
        format!("<pre>{}</pre>", escape(&detail))
    };
    Some(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">{tag}
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="kiln-state" content="{state}">
<title>{title}</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;margin:2rem;color:#222}}pre{{white-space:pre-wrap;background:#f6f6f6;border-left:3px solid #c33;padding:.75rem;max-height:60vh;overflow:auto}}code{{font-size:90%}}small{{color:#666}}</style>
</head><body>
<h1>{title}</h1>
<p>Project <code>{project}</code>, build {build}{commit}.</p>
{detail_html}
{log}
<p><small>This page refreshes itself every {refresh} s and shows the app once a build is ready.</small></p>
</body></html>
"#,
        state = status.state.as_str(),
        project = escape(&status.project),
        build = status.build,
    ))
}

/// The page a share link answers with while it cannot redirect (building, refused, revoked):
/// `message`, and a refresh after `retry` seconds when asking again may help.
pub fn share_page(message: &str, retry: Option<u64>) -> String {
    let refresh = retry
        .map(|s| format!(r#"<meta http-equiv="refresh" content="{s}">"#))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Kiln preview</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;margin:2rem;color:#222}}</style>
</head><body>
<p>{}</p>
</body></html>
"#,
        escape(message)
    )
}

/// Writes or removes `status.html` in a project's publish directory; a rename, so nginx never
/// serves half a page.
pub fn set_status_page(project_dir: &Path, page: Option<&str>) -> std::io::Result<()> {
    let path = project_dir.join(STATUS_PAGE);
    match page {
        Some(html) => {
            std::fs::create_dir_all(project_dir)?;
            let tmp = project_dir.join(".status.html.tmp");
            std::fs::write(&tmp, html)?;
            std::fs::rename(&tmp, &path)
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn injects_right_after_the_head_tag() {
        let html = "<!doctype html><HTML><Head lang=x><title>t</title></head><body><header></header></body></html>";
        let out = inject(html, "<script>X</script>");
        assert!(
            out.contains("<Head lang=x><script>X</script><title>"),
            "{out}"
        );
        assert_eq!(inject("<header>h</header>", "S"), "S<header>h</header>");
        assert_eq!(inject("<html><body>", "S"), "<html>S<body>");
        assert_eq!(inject("<!DOCTYPE html><p>", "S"), "<!DOCTYPE html>S<p>");
    }

    #[test]
    fn contains_values_inside_the_script_element() {
        let tag = console_script(&["https://a.example".into()], "p</script><b>", 3);
        assert_eq!(tag.matches("</script>").count(), 1, "{tag}");
        assert!(tag.contains("postMessage"));
    }

    fn status(state: State, error: Option<&str>) -> Status {
        let mut s = Status::new("shop");
        s.build = 4;
        s.state = state;
        s.error = error.map(str::to_owned);
        s
    }

    #[test]
    fn pages_follow_the_build_state() {
        let o = [];
        let building = status(State::Building, None);
        assert!(status_page(&building, false, false, &o, None)
            .unwrap()
            .contains("Building your preview"));
        assert!(status_page(&building, true, false, &o, None).is_none());
        let failed = status(State::Failed, Some("src/App.tsx:3: Unexpected token <x>"));
        let page =
            status_page(&failed, true, false, &o, Some("http://h/logs/shop?build=4")).unwrap();
        assert!(page.contains("Unexpected token &lt;x&gt;"), "{page}");
        assert!(page.contains(r#"href="http://h/logs/shop?build=4""#));
        assert!(status_page(&status(State::Ready, None), true, true, &o, None).is_none());
        assert!(status_page(&status(State::Cancelled, None), true, true, &o, None).is_none());
        assert!(status_page(&status(State::Cancelled, None), false, false, &o, None).is_some());
        let refused = status(State::Refused, Some("refused by quota builds_per_hour"));
        assert!(status_page(&refused, true, false, &o, None).is_none());
        let page = status_page(&refused, false, false, &o, None).unwrap();
        assert!(
            page.contains("waiting for quota") && page.contains("builds_per_hour"),
            "{page}"
        );
        assert!(share_page("<b>", Some(3)).contains("&lt;b&gt;"));
    }

    proptest! {
        #[test]
        fn injection_keeps_the_page_and_adds_the_tag_once(html in ".{0,200}") {
            let out = inject(&html, "<script>K</script>");
            prop_assert_eq!(out.matches("<script>K</script>").count(), html.matches("<script>K</script>").count() + 1);
            prop_assert_eq!(out.replacen("<script>K</script>", "", 1).len(), html.len());
        }
    }
}
