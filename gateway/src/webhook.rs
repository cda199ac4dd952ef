//! Webhooks: a job's record POSTed, signed, to its `webhook_url` when it ends — driven from Redis,
//! so any gateway delivers and a restarted one picks up where the others left.
//!
//! ```text
//! POST /v1/jobs {webhook_url} ─▶ record fields webhook_url, webhook_status=pending,
//!                                webhook_attempts=0;  ZADD katz:webhooks:due <now> <id>
//! every gateway, every poll_ms: ZRANGEBYSCORE katz:webhooks:due -inf <now> LIMIT 32
//!   per id: SET katz:webhook:<id>:lock <gateway> NX PX <timeout + 5 s>   (one gateway at a time)
//!     record not final ─▶ due again in 1 s
//!     final ─▶ POST body = the job's view (JSON); headers Katz-Signature: t=<unix s>,v1=<hex
//!              HMAC-SHA256(tenant secret, "<t>.<body>")>, Katz-Job-Id
//!        2xx ─▶ webhook_status=delivered; ZREM
//!        else ─▶ webhook_attempts+1; webhook_status=retrying, due again after
//!                base_delay·2^(attempts-1) (≤ max_delay) | failed after max_attempts; ZREM
//!     DEL the lock
//! ```
//! The lock makes one gateway deliver at a time; a gateway that dies mid-delivery leaves a lock
//! that expires, and the delivery is tried again: at-least-once (a receiver deduplicates by
//! `Katz-Job-Id`). The due set is polled, not fed by the events channel: a job that ended while no
//! gateway was up is still delivered.

use std::time::Duration;

use hmac::{Hmac, Mac};
use redis::AsyncCommands;
use sha2::Sha256;

use katz_actors::protocol::{job_key, now_ms, Status};

use crate::jobs::JobView;
use crate::State;

pub const DUE: &str = "katz:webhooks:due";

fn lock_key(id: &str) -> String {
    format!("katz:webhook:{id}:lock")
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        // HMAC takes a key of any length (longer ones are hashed): never reached
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let v1: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={v1}")
}

/// Whether `url` can be a webhook: an absolute `http://` URL with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("webhook_url `{url}` is not a URL: {e}"))?;
    if u.scheme() != "http" || u.host_str().is_none() {
        return Err(format!(
            "webhook_url `{url}`: an http:// URL with a host (this gateway delivers over plain HTTP; put a TLS proxy in front for https)"
        ));
    }
    Ok(())
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(cfg: &crate::config::WebhookConfig, attempts: u32) -> u64 {
    let exp = attempts.saturating_sub(1).min(30);
    cfg.base_delay_ms.saturating_mul(1 << exp).min(cfg.max_delay_ms)
}

/// The client webhooks are delivered with (made at the gateway's start: a failure stops it).
pub fn client(cfg: &crate::config::WebhookConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .build()
}

/// Delivers due webhooks with `http` until the gateway stops.
pub async fn dispatch(st: State, http: reqwest::Client) {
    let mut shutdown = st.shutdown.clone();
    loop {
        if let Err(e) = round(&st, &http).await {
            tracing::warn!(error = %e, "webhook round failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(st.cfg.webhooks.poll_ms)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn round(st: &State, http: &reqwest::Client) -> redis::RedisResult<()> {
    let mut r = st.redis();
    let due: Vec<String> = r.zrangebyscore_limit(DUE, "-inf", now_ms(), 0, 32).await?;
    for id in due {
        let lock_ms = st.cfg.webhooks.timeout_ms + 5000;
        let got: Option<String> = redis::cmd("SET")
            .arg(lock_key(&id))
            .arg(&st.name)
            .arg("NX")
            .arg("PX")
            .arg(lock_ms)
            .query_async(&mut r)
            .await?;
        if got.is_none() {
            continue;
        }
        let res = one(st, http, &id).await;
        let _: () = r.del(lock_key(&id)).await?;
        res?;
    }
    Ok(())
}

async fn one(st: &State, http: &reqwest::Client, id: &str) -> redis::RedisResult<()> {
    let mut r = st.redis();
    let rec: std::collections::HashMap<String, String> = r.hgetall(job_key(id)).await?;
    let final_ = rec
        .get("status")
        .and_then(|s| Status::parse(s))
        .is_some_and(Status::is_final);
    let (Some(url), Some(secret)) = (
        rec.get("webhook_url").cloned(),
        rec.get("tenant")
            .and_then(|t| st.tenants.by_name(t))
            .and_then(|t| t.cfg.webhook_secret.clone()),
    ) else {
        // the record expired, or its tenant or secret is gone from the configuration
        let _: () = r.zrem(DUE, id).await?;
        return Ok(());
    };
    if !final_ {
        let _: () = r.zadd(DUE, id, now_ms() + 1000).await?;
        return Ok(());
    }
    let attempts = rec
        .get("webhook_attempts")
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let mut view = JobView::from_record(id, rec);
    view.webhook_status = None;
    view.webhook_attempts = None;
    for k in [
        "webhook_status",
        "webhook_attempts",
        "webhook_error",
        "webhook_url",
    ] {
        view.record.remove(k);
    }
    let body = serde_json::to_vec(&view).unwrap_or_default();
    let t = now_ms() / 1000;
    let sent = http
        .post(&url)
        .header("content-type", "application/json")
        .header("katz-signature", signature(secret.as_bytes(), t, &body))
        .header("katz-job-id", id)
        .body(body)
        .send()
        .await;
    let outcome = match sent {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("the receiver answered {}", resp.status())),
        Err(e) => Err(format!("{e}")),
    };
    let key = job_key(id);
    match outcome {
        Ok(()) => {
            tracing::info!(job = id, attempts, "webhook delivered");
            let _: () = redis::pipe()
                .hset_multiple(
                    &key,
                    &[
                        ("webhook_status", "delivered".to_string()),
                        ("webhook_attempts", attempts.to_string()),
                        ("webhook_delivered_ms", now_ms().to_string()),
                    ],
                )
                .ignore()
                .zrem(DUE, id)
                .ignore()
                .query_async(&mut r)
                .await?;
        }
        Err(e) => {
            let give_up = attempts >= st.cfg.webhooks.max_attempts;
            let status = if give_up { "failed" } else { "retrying" };
            tracing::info!(job = id, attempts, error = %e, status, "webhook not delivered");
            let mut p = redis::pipe();
            p.hset_multiple(
                &key,
                &[
                    ("webhook_status", status.to_string()),
                    ("webhook_attempts", attempts.to_string()),
                    ("webhook_error", e),
                ],
            )
            .ignore();
            if give_up {
                p.zrem(DUE, id).ignore();
            } else {
                p.zadd(DUE, id, now_ms() + backoff(&st.cfg.webhooks, attempts))
                    .ignore();
            }
            let _: () = p.query_async(&mut r).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_backoff() {
        // HMAC-SHA256("secret", "1700000000.{}") — the same as Python's
        // hmac.new(b"secret", b"1700000000.{}", "sha256").hexdigest()
        let s = signature(b"secret", 1_700_000_000, b"{}");
        assert!(s.starts_with("t=1700000000,v1="), "{s}");
        assert_eq!(s.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(s, signature(b"other", 1_700_000_000, b"{}"));
        let c = crate::config::WebhookConfig::default();
        assert_eq!(
            (1..=4).map(|a| backoff(&c, a)).collect::<Vec<_>>(),
            vec![1000, 2000, 4000, 8000]
        );
        assert_eq!(backoff(&c, 40), c.max_delay_ms);
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        for u in ["ftp://x/", "not a url", "https://example.com/"] {
            assert!(check_url(u).is_err(), "{u}");
        }
    }
}
