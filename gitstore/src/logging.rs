//! Logging for Kiln's daemons: journald under systemd, stderr otherwise; `KILN_LOG` sets the level.

/// Installs the logger; `identifier` is the syslog identifier journald files entries under.
pub fn init(identifier: &str) {
    let level = std::env::var("KILN_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(j) = systemd_journal_logger::JournalLog::new() {
            if j.with_syslog_identifier(identifier.into())
                .install()
                .is_ok()
            {
                log::set_max_level(level);
                return;
            }
        }
    }
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp_millis()
        .init();
}
