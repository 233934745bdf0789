//! How results reach a person or a script: JSON with `--json`; otherwise text, colored and with
//! progress bars only on a terminal, plain and quiet in a pipe or a log.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `println!` that ends the program quietly once stdout is closed (`kiln logs -f | head`)
/// instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::say_line(format_args!($($arg)*))
    };
}

pub(crate) fn say_line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}").and_then(|_| out.flush()) {
        stdout_gone(e);
    }
}

/// A reader that went away is not a failure; anything else (a full disk) is.
pub(crate) fn stdout_gone(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1)
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Output {
    pub(crate) json: bool,
    color: bool,
    /// Progress bars and spinners (drawn on stderr).
    progress: bool,
}

#[derive(Clone, Copy)]
pub(crate) enum Style {
    Good,
    Bad,
    Warn,
    Dim,
    Bold,
}

impl Output {
    pub(crate) fn new(json: bool) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
            || std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Self {
            json,
            color: !json && !no_color && std::io::stdout().is_terminal(),
            progress: !json && std::io::stderr().is_terminal(),
        }
    }

    pub(crate) fn colored(&self) -> bool {
        self.color
    }

    pub(crate) fn paint(&self, style: Style, text: &str) -> String {
        if !self.color {
            return text.to_owned();
        }
        let code = match style {
            Style::Good => "32",
            Style::Bad => "31",
            Style::Warn => "33",
            Style::Dim => "2",
            Style::Bold => "1",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }

    /// A build state, colored by what it means.
    pub(crate) fn state(&self, state: &str) -> String {
        let style = match state {
            "ready" => Style::Good,
            "failed" | "timed_out" | "cancelled" => Style::Bad,
            "" | "-" => Style::Dim,
            _ => Style::Warn,
        };
        self.paint(style, state)
    }

    pub(crate) fn print_json(&self, v: &serde_json::Value) {
        say!(
            "{}",
            serde_json::to_string_pretty(v).expect("JSON values serialize")
        );
    }

    /// A spinner on a terminal; hidden otherwise, so callers need not care.
    pub(crate) fn spinner(&self, msg: impl Into<String>) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}").expect("valid template"),
        );
        pb.set_message(msg.into());
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    }

    /// A bar for counted work (git's objects) on a terminal; hidden otherwise.
    pub(crate) fn bar(&self, len: u64) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb
    }

    /// Prints rows with columns padded to their widest cell; the first row is the header.
    pub(crate) fn table(&self, rows: &[Vec<String>]) {
        let width = |s: &str| strip_ansi(s).chars().count();
        let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                rows.iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| width(s))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for (i, row) in rows.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let cell = if i == 0 {
                    self.paint(Style::Bold, cell)
                } else {
                    cell.clone()
                };
                line.push_str(&cell);
                if c + 1 < row.len() {
                    let pad = widths[c] - width(&cell) + 2;
                    line.push_str(&" ".repeat(pad));
                }
            }
            say!("{}", line.trim_end());
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The first 12 hex digits of a commit, as git shows abbreviated ids.
pub(crate) fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// `340ms`, `4.2s`, `3m 05s`.
pub(crate) fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m {:02}s", ms / 60_000, ms % 60_000 / 1000)
    }
}

pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How long ago a Unix time (seconds) was: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub(crate) fn ago(unix_secs: u64) -> String {
    let d = now_secs().saturating_sub(unix_secs);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86_400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(millis(340), "340ms");
        assert_eq!(millis(4_230), "4.2s");
        assert_eq!(millis(185_000), "3m 05s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(short("0123456789abcdef0123"), "0123456789ab");
    }

    #[test]
    fn tables_align_on_visible_width() {
        assert_eq!(strip_ansi("\x1b[32mready\x1b[0m"), "ready");
    }
}
