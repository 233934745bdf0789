//! systemd's service protocol without libsystemd: readiness, stopping, status and the watchdog
//! (sd_notify(3)), each a datagram to `$NOTIFY_SOCKET`.
//!
//! Both daemons use it the same way: READY=1 once the listener is bound and start-up recovery is
//! done, so `systemctl start` (and every unit ordered after ours) waits until the service really
//! answers; STOPPING=1 on SIGTERM; WATCHDOG=1 while the daemon still gets work done, so systemd
//! restarts a wedged one. Without `$NOTIFY_SOCKET` (`make up`, the tests) every call does nothing.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Tells systemd that start-up is complete (`Type=notify`).
pub fn notify_ready() {
    notify("READY=1");
}

/// Tells systemd that the service is shutting down on its own initiative or on SIGTERM, so a
/// slow drain is reported as "deactivating" rather than as a hung service.
pub fn notify_stopping() {
    notify("STOPPING=1");
}

/// The one-line status `systemctl status` shows.
pub fn notify_status(status: &str) {
    // One assignment per line: a newline would start a new (bogus) assignment.
    notify(&format!("STATUS={}", status.replace('\n', " ")));
}

/// Waits for SIGTERM (how systemd stops a service) or SIGINT (Ctrl-C), then sends STOPPING=1.
pub async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    notify_stopping();
}

/// Pings the watchdog at half of `$WATCHDOG_USEC` (`WatchdogSec=`), for as long as the daemon
/// is responsive: each ping needs a free tokio worker (this task), a free blocking-pool thread
/// (where `is_healthy` runs) and `is_healthy()` returning true within the ping interval. A daemon
/// whose workers or blocking pool are stuck, or that reports itself unhealthy, stops pinging and
/// systemd restarts it. None when the watchdog is off or meant for another process
/// (`$WATCHDOG_PID`). Must be called inside a tokio runtime.
pub fn spawn_watchdog<F>(is_healthy: F) -> Option<tokio::task::JoinHandle<()>>
where
    F: Fn() -> bool + Send + Sync + 'static,
{
    let target = Target::from_env()?;
    let every = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    log::info!(interval_ms = every.as_millis() as u64; "systemd watchdog on");
    Some(tokio::spawn(watchdog_loop(
        target,
        every,
        Arc::new(is_healthy),
    )))
}

fn notify(message: &str) {
    if let Some(target) = Target::from_env() {
        if let Err(e) = target.send(message) {
            log::warn!("sd_notify {message:?} to {:?}: {e}", target.shown);
        }
    }
}

/// The notification socket and an unbound datagram socket to send from.
struct Target {
    addr: SocketAddr,
    socket: UnixDatagram,
    /// `$NOTIFY_SOCKET` as given, for error messages.
    shown: OsString,
}

impl Target {
    /// None when not under systemd; a malformed `$NOTIFY_SOCKET` is logged and ignored, since a
    /// daemon that refused to start over it would be worse than one that never reports ready.
    fn from_env() -> Option<Self> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        match Self::new(&value) {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("ignoring NOTIFY_SOCKET={value:?}: {e}");
                None
            }
        }
    }

    fn new(value: &OsStr) -> io::Result<Self> {
        Ok(Self {
            addr: parse_address(value)?,
            socket: UnixDatagram::unbound()?,
            shown: value.to_owned(),
        })
    }

    fn send(&self, message: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(message.as_bytes(), &self.addr)?;
        if sent != message.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                message.len()
            )));
        }
        Ok(())
    }
}

/// `/path` is a filesystem socket, `@name` an abstract one (systemd's own notation for the
/// leading NUL byte). Other forms (`vsock:`, used for VMs) are not for services.
fn parse_address(value: &OsStr) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(Path::new(value)),
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or an @abstract name",
        )),
    }
}

/// Half the watchdog timeout, as sd_watchdog_enabled(3) recommends, or None when the watchdog is
/// off, malformed, or addressed to another pid (a child that inherited the variables).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

async fn watchdog_loop(
    target: Target,
    every: Duration,
    is_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_healthy = true;
    loop {
        tick.tick().await;
        let check = Arc::clone(&is_healthy);
        // A check that hangs (a deadlock it takes part in, an exhausted blocking pool) times out
        // here and costs one leaked blocking thread; systemd restarts us soon after.
        let healthy = matches!(
            tokio::time::timeout(every, tokio::task::spawn_blocking(move || check())).await,
            Ok(Ok(true))
        );
        if healthy {
            if let Err(e) = target.send("WATCHDOG=1") {
                log::warn!("watchdog ping to {:?}: {e}", target.shown);
            }
        }
        if healthy != was_healthy {
            if healthy {
                log::info!("healthy again: watchdog pings resumed");
            } else {
                log::error!(
                    "unhealthy or unresponsive for {every:?}: watchdog pings stopped, systemd \
                     restarts the service unless this recovers"
                );
            }
            was_healthy = healthy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket
            .recv(&mut buf)
            .expect("a notification within the timeout");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let target = Target::new(path.as_os_str()).unwrap();
        target.send("READY=1").unwrap();
        target.send("STATUS=serving on 127.0.0.1:7070").unwrap();
        assert_eq!(receive(&server), "READY=1");
        assert_eq!(receive(&server), "STATUS=serving on 127.0.0.1:7070");
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("kiln-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let target = Target::new(OsStr::new(&format!("@{name}"))).unwrap();
        target.send("STOPPING=1").unwrap();
        assert_eq!(receive(&server), "STOPPING=1");
    }

    #[test]
    fn a_missing_listener_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::new(dir.path().join("nobody").as_os_str()).unwrap();
        assert!(target.send("READY=1").is_err());
    }

    #[test]
    fn only_paths_and_abstract_names_are_addresses() {
        assert!(parse_address(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(parse_address(OsStr::new("@/org/freedesktop/systemd1/notify")).is_ok());
        for bad in ["", "relative/notify", "vsock:2:1234"] {
            assert!(parse_address(OsStr::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_and_only_for_us() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval(Some("30000000"), None, 42), half);
        assert_eq!(watchdog_interval(Some("30000000"), Some("42"), 42), half);
        assert_eq!(watchdog_interval(Some("30000000"), Some("43"), 42), None);
        assert_eq!(watchdog_interval(Some("30000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 42), None);
        assert_eq!(watchdog_interval(None, Some("42"), 42), None);
    }

    async fn recv_within(server: &tokio::net::UnixDatagram, wait: Duration) -> Option<String> {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(wait, server.recv(&mut buf))
            .await
            .ok()?;
        Some(String::from_utf8_lossy(&buf[..n.expect("recv")]).into_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchdog_pings_only_while_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = tokio::net::UnixDatagram::bind(&path).unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&healthy);
        let every = Duration::from_millis(20);
        let task = tokio::spawn(watchdog_loop(
            Target::new(path.as_os_str()).unwrap(),
            every,
            Arc::new(move || flag.load(Ordering::SeqCst)),
        ));
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            assert_eq!(
                recv_within(&server, Duration::from_millis(300))
                    .await
                    .as_deref(),
                Some("WATCHDOG=1")
            );
        }

        healthy.store(false, Ordering::SeqCst);
        // A ping already on its way may still arrive; after that, silence.
        tokio::time::sleep(every * 3).await;
        while server.try_recv(&mut buf).is_ok() {}
        assert_eq!(
            recv_within(&server, Duration::from_millis(300)).await,
            None,
            "pinged while unhealthy"
        );

        healthy.store(true, Ordering::SeqCst);
        assert_eq!(
            recv_within(&server, Duration::from_millis(300))
                .await
                .as_deref(),
            Some("WATCHDOG=1")
        );
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_health_check_stops_the_pings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = tokio::net::UnixDatagram::bind(&path).unwrap();
        let hang = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&hang);
        let task = tokio::spawn(watchdog_loop(
            Target::new(path.as_os_str()).unwrap(),
            Duration::from_millis(20),
            Arc::new(move || {
                while flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                true
            }),
        ));
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_secs(5), server.recv(&mut buf)).await;
        assert_eq!(&buf[..got.unwrap().unwrap()], b"WATCHDOG=1");

        hang.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        while server.try_recv(&mut buf).is_ok() {}
        let got = tokio::time::timeout(Duration::from_millis(300), server.recv(&mut buf)).await;
        assert!(got.is_err(), "pinged while the health check hung");
        hang.store(false, Ordering::SeqCst);
        task.abort();
    }
}
