//! Push notifications to the agents: signed, retried with backoff, never blocking a push.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// `sha256=<hex HMAC-SHA256 of body>`, the value of `X-Kiln-Signature-256`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How far a timestamped webhook's `X-Kiln-Timestamp` may be from the receiver's clock.
pub const REPLAY_WINDOW_SECS: u64 = 300;

/// [`signature`] over `<timestamp>.<body>`, sent with `X-Kiln-Timestamp: <timestamp>`: a captured
/// delivery cannot be replayed after the receiver's window, and within it the receiver refuses
/// a signature it has seen. The outbound notifications to clients use the same scheme.
pub fn timestamped_signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    signature(secret, &timestamped(timestamp, body))
}

/// Checks a [`timestamped_signature`] in constant time (the window is the caller's).
pub fn verify_timestamped_signature(
    secret: &[u8],
    timestamp: u64,
    body: &[u8],
    header: &str,
) -> bool {
    verify_signature(secret, &timestamped(timestamp, body), header)
}

fn timestamped(timestamp: u64, body: &[u8]) -> Vec<u8> {
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    signed
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks a signature header in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

struct Delivery {
    url: String,
    body: serde_json::Value,
}

/// Queue of deliveries; bounded so a dead agent cannot grow memory without limit.
#[derive(Clone)]
pub(crate) struct Notifier {
    tx: Option<mpsc::Sender<Delivery>>,
    agents: Vec<String>,
    metrics: Metrics,
}

const ATTEMPTS: u32 = 8;

impl Notifier {
    pub(crate) fn start(agents: Vec<String>, secret: Vec<u8>, metrics: Metrics) -> Self {
        if agents.is_empty() {
            return Self {
                tx: None,
                agents,
                metrics,
            };
        }
        let (tx, mut rx) = mpsc::channel::<Delivery>(1024);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client builds");
        let m = metrics.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let (client, secret, m) = (client.clone(), secret.clone(), m.clone());
                tokio::spawn(async move { deliver(&client, &secret, d, &m).await });
            }
        });
        Self {
            tx: Some(tx),
            agents,
            metrics,
        }
    }

    /// Announces a ref update of `project` to every agent.
    pub(crate) fn notify(&self, project: &str, name: &str, old: &str, new: &str) {
        let Some(tx) = &self.tx else { return };
        let body = serde_json::json!({
            "project": project, "ref": name, "old": old, "new": new,
        });
        for agent in &self.agents {
            let url = format!("{}/sync-project/{project}", agent.trim_end_matches('/'));
            if tx
                .try_send(Delivery {
                    url: url.clone(),
                    body: body.clone(),
                })
                .is_err()
            {
                self.metrics.inc(&self.metrics.webhooks_dropped);
                log::error!(project, url:%; "webhook queue full; delivery dropped");
            }
        }
    }
}

async fn deliver(client: &reqwest::Client, secret: &[u8], d: Delivery, m: &Metrics) {
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        // Each attempt is a new request (its number in the body, a fresh timestamp): the agent
        // refuses a signature it has seen, and may have seen the attempt whose answer was lost.
        let mut body = d.body.clone();
        body["attempt"] = attempt.into();
        let body = serde_json::to_vec(&body).expect("serializes");
        let ts = unix_now();
        let res = client
            .post(&d.url)
            .header("Content-Type", "application/json")
            .header("X-Kiln-Timestamp", ts.to_string())
            .header(
                "X-Kiln-Signature-256",
                timestamped_signature(secret, ts, &body),
            )
            .body(body)
            .send()
            .await;
        let why = match res {
            Ok(r) if r.status().is_success() => {
                m.inc(&m.webhooks_delivered);
                return;
            }
            // A 4xx other than 408/429 will not get better by retrying.
            Ok(r) if r.status().is_client_error() && ![408, 429].contains(&r.status().as_u16()) => {
                m.inc(&m.webhooks_failed);
                log::error!(url:% = d.url, status = r.status().as_u16(); "webhook refused; not retrying");
                return;
            }
            Ok(r) => format!("status {}", r.status()),
            Err(e) => e.to_string(),
        };
        log::warn!(url:% = d.url, attempt; "webhook delivery failed: {why}");
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }
    m.inc(&m.webhooks_failed);
    log::error!(url:% = d.url; "webhook delivery gave up after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_the_same_body_and_secret() {
        let s = signature(b"secret", b"{\"a\":1}");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64);
        assert!(verify_signature(b"secret", b"{\"a\":1}", &s));
        assert!(!verify_signature(b"secret", b"{\"a\":2}", &s));
        assert!(!verify_signature(b"other", b"{\"a\":1}", &s));
        assert!(!verify_signature(b"secret", b"{\"a\":1}", "sha256=zz"));
        assert!(!verify_signature(b"secret", b"{\"a\":1}", &s[7..]));
        let t = timestamped_signature(b"secret", 1_700_000_000, b"{}");
        assert!(verify_timestamped_signature(
            b"secret",
            1_700_000_000,
            b"{}",
            &t
        ));
        assert!(!verify_timestamped_signature(
            b"secret",
            1_700_000_001,
            b"{}",
            &t
        ));
        assert!(
            !verify_signature(b"secret", b"{}", &t),
            "a body-only check fails"
        );
    }
}
