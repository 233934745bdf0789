//! What the benchmarks in `tests/benches/` share: release binaries, progress lines, statistics.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

static STARTED: OnceLock<Instant> = OnceLock::new();

/// A progress line on stderr, stamped with the time since the first one, so a long run shows
/// where it is (the tables go to stdout).
pub fn progress(msg: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed();
    eprintln!("[{:>6.1}s] {msg}", t.as_secs_f64());
}

/// Time since the first [`progress`] line (or the first call of this).
pub fn elapsed() -> std::time::Duration {
    STARTED.get_or_init(Instant::now).elapsed()
}

/// Points the harness at release binaries, built here, unless `KILN_BIN_DIR` is set; returns a
/// description for the report. Call it first, before any thread starts: the harness reads
/// `KILN_BIN_DIR` for every process it spawns.
///
/// Release, because that is what `make build` deploys: the daemons' own work (sync, checkout,
/// publish with precompression) is several times slower in a debug build, which would measure
/// the optimizer rather than Kiln.
pub fn release_binaries() -> String {
    if let Some(dir) = std::env::var_os("KILN_BIN_DIR") {
        return format!("{} (KILN_BIN_DIR)", Path::new(&dir).display());
    }
    // A bench runs as <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("the bench's own path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the bench runs from <target>/<profile>/deps")
        .to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    progress("cargo build --release -p kiln-agent -p kiln-gitstore -p kiln-cli --bins");
    let mut cmd = Command::new(cargo);
    // Cargo runs a bench with the variables it sets for a crate (CARGO_MANIFEST_DIR, ...). Some
    // build scripts (ring's) rerun when one changes, so passing them on would rebuild half the
    // dependency tree here and again on the next plain `cargo build --release`.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&&*k)
        {
            cmd.env_remove(&*k);
        }
    }
    // Not through `run`: a first release build can take minutes, and cargo's progress shows.
    let status = cmd
        .current_dir(workspace)
        .args(["build", "--release"])
        .args(["-p", "kiln-agent", "-p", "kiln-gitstore", "-p", "kiln-cli"])
        .arg("--bins")
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("running cargo");
    assert!(
        status.success(),
        "building the release binaries failed ({status}); or set KILN_BIN_DIR to a directory \
         holding kiln, kiln-agent and kiln-gitstore"
    );
    let dir = target.join("release");
    std::env::set_var("KILN_BIN_DIR", &dir);
    format!("{} (release)", dir.display())
}

/// The nearest-rank percentile `p` (0..=1) of `xs`.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn median(xs: &[f64]) -> f64 {
    percentile(xs, 0.5)
}
