//! Logging for Kiln's daemons: journald under systemd, stderr otherwise; `KILN_LOG` sets the level.
//!
//! Records carry their ids as `log` key-values (`log::info!(project = p, build = n; "...")`).
//! journald gets each one as its own field, named in upper case (PROJECT=, BUILD=), so
//! `journalctl -u kiln-agent PROJECT=shop` picks one project's lines; on stderr they follow the
//! message as `project=shop build=7`.

/// Installs the logger; `identifier` is the syslog identifier journald files entries under.
pub fn init(identifier: &str) {
    let level = std::env::var("KILN_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    // Only when stderr itself is the journal stream (systemd sets `$JOURNAL_STREAM` to its device
    // and inode): a child that inherited the variable but writes elsewhere keeps plain stderr.
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(j) = systemd_journal_logger::JournalLog::new() {
            // The logger sends every key-value of a record as a journal field, upper-cased.
            if j.with_syslog_identifier(identifier.into())
                .install()
                .is_ok()
            {
                log::set_max_level(level);
                return;
            }
        }
    }
    stderr_logger(level).init();
}

/// env_logger with the key-values after the message (its `kv` feature, on in the workspace).
fn stderr_logger(level: log::LevelFilter) -> env_logger::Builder {
    let mut b = env_logger::Builder::new();
    b.filter_level(level).format_timestamp_millis();
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn stderr_lines_show_the_key_values() {
        let out = Captured::default();
        let logger = stderr_logger(log::LevelFilter::Info)
            .target(env_logger::Target::Pipe(Box::new(out.clone())))
            .write_style(env_logger::WriteStyle::Never)
            .build();
        let kvs: [(&str, log::kv::Value); 2] = [("project", "shop".into()), ("build", 7.into())];
        logger.log(
            &log::Record::builder()
                .level(log::Level::Info)
                .target("agent::pipeline")
                .args(format_args!("build started"))
                .key_values(&kvs)
                .build(),
        );
        logger.flush();
        let line = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            line.contains("build started project=shop build=7"),
            "{line:?}"
        );
    }
}
