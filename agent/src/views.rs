//! When each preview was last viewed: the project API's `last_viewed_at`, and the order in which
//! idle projects are evicted (least recently built or viewed first).
//!
//! nginx reports every navigation of a preview (an HTML page, or its revalidation, not the assets
//! it loads) as one syslog datagram over UDP to the agent's listen address: the agent binds the
//! UDP port of the same number. UDP, so that a preview never waits on the agent nor fails with
//! it: a lost datagram only leaves the time a little older. Only loopback senders are heard and
//! only projects this agent builds are recorded, so a forged datagram can at most make a project
//! look recently viewed.
//!
//! A view is written (status file, build state in the store) at once when the time last written
//! is older than [`COALESCE`]; later ones are folded into the next flush. However busy a preview
//! is, that is at most one write per project per [`COALESCE`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gitstore::ProjectId;
use tokio::net::UdpSocket;

use crate::agent::Agent;

pub(crate) const COALESCE: Duration = Duration::from_secs(60);
/// nginx's view datagram is a syslog header and a project id: a bigger one is not a view.
const MAX_DATAGRAM: usize = 512;
/// The syslog tag nginx.conf.tera gives the view log.
const TAG: &str = "kiln_view: ";

#[derive(Default)]
pub(crate) struct Views {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per project, the view time (Unix ms) last written to its status.
    written: HashMap<String, u64>,
    /// Views newer than `written`, to be written by the next flush.
    pending: HashMap<String, u64>,
}

/// The project whose view a datagram reports. nginx sends `<PRI>TIMESTAMP kiln_view: <project>`.
pub(crate) fn parse(datagram: &[u8]) -> Option<ProjectId> {
    let text = std::str::from_utf8(datagram).ok()?;
    let (_, project) = text.split_once(TAG)?;
    ProjectId::parse(project.trim_end()).ok()
}

impl Agent {
    /// Listens for nginx's view datagrams and flushes coalesced views, for as long as the agent
    /// runs.
    pub fn start_views(self: &Arc<Self>, socket: UdpSocket) {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; MAX_DATAGRAM];
            loop {
                let (n, from) = match socket.recv_from(&mut buf).await {
                    Ok(got) => got,
                    Err(e) => {
                        log::warn!(error:% = e; "receiving a view report");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if !from.ip().to_canonical().is_loopback() {
                    continue;
                }
                if let Some(project) = parse(&buf[..n]) {
                    agent.viewed(&project, crate::status::now_ms());
                }
            }
        });
        let agent = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(COALESCE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let due =
                    std::mem::take(&mut agent.views.inner.lock().expect("views lock").pending);
                if !due.is_empty() {
                    let a = agent.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        for (project, at_ms) in due {
                            a.write_view(&project, at_ms);
                        }
                    })
                    .await;
                }
            }
        });
    }

    /// Records a view of `project` at `at_ms` (Unix ms).
    pub(crate) fn viewed(self: &Arc<Self>, project: &ProjectId, at_ms: u64) {
        let p = project.as_str();
        if self.is_gone(p) || !self.is_known(p) {
            return;
        }
        self.metrics.inc(&self.metrics.views);
        let write_now = {
            let mut v = self.views.inner.lock().expect("views lock");
            let written = match v.written.get(p) {
                Some(at) => *at,
                None => {
                    let at = self
                        .status(p)
                        .and_then(|s| s.last_viewed_at_ms)
                        .unwrap_or(0);
                    v.written.insert(p.to_owned(), at);
                    at
                }
            };
            if at_ms.saturating_sub(written) >= COALESCE.as_millis() as u64 {
                v.written.insert(p.to_owned(), at_ms);
                v.pending.remove(p);
                true
            } else {
                v.pending.insert(p.to_owned(), at_ms);
                false
            }
        };
        if write_now {
            let agent = self.clone();
            let p = p.to_owned();
            tokio::task::spawn_blocking(move || agent.write_view(&p, at_ms));
        }
    }

    fn write_view(&self, project: &str, at_ms: u64) {
        if self.is_gone(project) {
            return;
        }
        self.views
            .inner
            .lock()
            .expect("views lock")
            .written
            .insert(project.to_owned(), at_ms);
        self.update(project, |s| {
            s.last_viewed_at_ms = s.last_viewed_at_ms.max(Some(at_ms));
        });
        self.report_build_state(project);
    }

    /// Forgets a project's views (it was deleted or purged).
    pub(crate) fn forget_views(&self, project: &str) {
        let mut v = self.views.inner.lock().expect("views lock");
        v.written.remove(project);
        v.pending.remove(project);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_project_from_nginx_syslog_datagrams() {
        let p = parse(b"<190>Nov 23 10:01:02 kiln_view: my-app").expect("a view");
        assert_eq!(p.as_str(), "my-app");
        // nginx ends nothing with a newline today, but a relay might.
        assert!(parse(b"<190>Nov 23 10:01:02 kiln_view: my-app\n").is_some());
    }

    #[test]
    fn refuses_what_is_not_a_view_of_a_valid_project() {
        for bad in [
            &b"<190>Nov 23 10:01:02 other: my-app"[..],
            b"<190>Nov 23 10:01:02 kiln_view: ",
            b"<190>Nov 23 10:01:02 kiln_view: ../etc",
            b"<190>Nov 23 10:01:02 kiln_view: a b",
            b"<190>Nov 23 10:01:02 kiln_view: \xff\xfe",
            b"",
        ] {
            assert!(parse(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest::proptest! {
        #[test]
        fn any_datagram_parses_or_is_refused_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Some(p) = parse(&bytes) {
                proptest::prop_assert!(ProjectId::parse(p.as_str()).is_ok());
            }
        }
    }
}
