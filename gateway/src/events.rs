//! `GET /v1/jobs/{id}/events`: a job's progress as Server-Sent Events.
//!
//! ```text
//! SUBSCRIBE katz:events:<id> ─┐  (subscribed first, then the record read: no step is missed)
//! HGETALL katz:job:<id> ──────┤ every second too (an event lost on the way is caught up)
//!                             ▼
//!   follow task ─mpsc─▶ SSE stream:  `status` (the record, at once) → `progress` {status, step,
//!   total, eta_ms} per step → `preview` {step, url, png_base64} when preview_step grows → `end`
//!   (the final record) ─ then the stream closes
//! ```
//! A client that disconnects drops the stream; the task's next send fails and it ends,
//! unsubscribing. A gateway that stops ends every stream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine;
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use katz_actors::protocol::{events_channel, job_key, Status};

use katz_actors::protocol::preview_key;

use crate::jobs::JobView;
use crate::State;

/// How often the record is read besides the events.
const POLL: Duration = Duration::from_secs(1);

struct Follow {
    id: String,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    step: Option<(String, u32)>,
    preview_step: Option<u32>,
}

impl Follow {
    async fn send(&self, name: &str, data: serde_json::Value) -> bool {
        let ev = Event::default().event(name).data(data.to_string());
        self.tx.send(Ok(ev)).await.is_ok()
    }

    /// Sends what changed in `rec` (progress, a new preview); true when the job ended.
    async fn record(&mut self, st: &State, rec: HashMap<String, String>) -> Option<bool> {
        let view = JobView::from_record(&self.id, rec);
        let now = (view.status.clone(), view.step);
        if self.step.as_ref() != Some(&now) {
            self.step = Some(now);
            let ok = self
                .send(
                    "progress",
                    json!({"status": view.status, "step": view.step, "total": view.total, "eta_ms": view.eta_ms}),
                )
                .await;
            if !ok {
                return None;
            }
        }
        if let Some(p) = view.preview_step {
            if self.preview_step.is_none_or(|s| p > s) {
                self.preview_step = Some(p);
                let png: Option<Vec<u8>> = st.redis().get(preview_key(&self.id)).await.ok().flatten();
                let data = json!({
                    "step": p,
                    "url": format!("/v1/jobs/{}/preview", self.id),
                    "png_base64": png.map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
                });
                if !self.send("preview", data).await {
                    return None;
                }
            }
        }
        let ended = Status::parse(&view.status).is_some_and(Status::is_final);
        if ended
            && !self
                .send("end", serde_json::to_value(&view).unwrap_or_default())
                .await
        {
            return None;
        }
        Some(ended)
    }
}

async fn follow(st: State, mut f: Follow) {
    let mut shutdown = st.shutdown.clone();
    let sub = async {
        let mut ps = st.client.get_async_pubsub().await.ok()?;
        ps.subscribe(events_channel(&f.id)).await.ok()?;
        Some(ps)
    };
    let Some(ps) = sub.await else {
        let _ = f
            .send(
                "error",
                json!({"error": {"code": "unavailable", "message": "redis is away"}}),
            )
            .await;
        return;
    };
    let mut msgs = ps.into_on_message();
    let read = |st: &State, id: &str| {
        let mut r = st.redis();
        let key = job_key(id);
        async move { r.hgetall::<_, HashMap<String, String>>(key).await.ok() }
    };
    let Some(rec) = read(&st, &f.id).await else { return };
    let view = JobView::from_record(&f.id, rec.clone());
    if !f
        .send("status", serde_json::to_value(&view).unwrap_or_default())
        .await
    {
        return;
    }
    if f.record(&st, rec).await != Some(false) {
        return;
    }
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            m = msgs.next() => {
                let Some(m) = m else { return };
                let payload: String = m.get_payload().unwrap_or_default();
                let Ok(ev) = serde_json::from_str::<serde_json::Value>(&payload) else { continue };
                // the record holds every field the event has, and more (started_ms for the ETA)
                let Some(mut rec) = read(&st, &f.id).await else { return };
                if let Some(p) = ev.get("preview_step").and_then(|v| v.as_u64()) {
                    rec.entry("preview_step".into()).or_insert(p.to_string());
                }
                if f.record(&st, rec).await != Some(false) { return }
            }
            _ = tick.tick() => {
                let Some(rec) = read(&st, &f.id).await else { return };
                if rec.is_empty() {
                    let _ = f.send("error", json!({"error": {"code": "not_found", "message": "the job's record expired"}})).await;
                    return;
                }
                if f.record(&st, rec).await != Some(false) { return }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// The SSE answer for job `id` (its ownership already checked).
pub fn stream(st: State, id: String) -> impl axum::response::IntoResponse {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(follow(
        st,
        Follow {
            id,
            tx,
            step: None,
            preview_step: None,
        },
    ));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}
