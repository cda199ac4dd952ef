//! The gateway's RabbitMQ side: one connection, publishes with publisher confirms, queue depths.
//!
//! ```text
//! publish(queue, job) ─▶ channel (connect on first use or after a loss) ─▶ declare the queue's
//!   topology once ─▶ basic_publish, persistent ─▶ wait for the broker's ack ─▶ Ok
//!   (a failure drops the connection and tries once more on a new one, then answers 503)
//! depth(queue) ─▶ a passive declare on a channel of its own ─▶ messages ready | None (no queue)
//! ```

use std::collections::HashSet;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Mutex;

use katz_actors::topology;

use crate::error::ApiError;

pub struct Broker {
    url: String,
    state: Mutex<Option<Live>>,
}

struct Live {
    conn: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

impl Broker {
    pub fn new(url: String) -> Broker {
        Broker {
            url,
            state: Mutex::new(None),
        }
    }

    async fn live(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Live>>, lapin::Error> {
        let mut g = self.state.lock().await;
        let ok = g
            .as_ref()
            .is_some_and(|l| l.conn.status().connected() && l.channel.status().connected());
        if !ok {
            let conn = topology::connect(&self.url, "katz-gateway").await?;
            let channel = conn.create_channel().await?;
            *g = Some(Live {
                conn,
                channel,
                declared: HashSet::new(),
            });
        }
        Ok(g)
    }

    async fn try_publish(&self, queue: &str, payload: &[u8], priority: u8, id: &str) -> Result<(), String> {
        let channel = {
            let mut g = self.live().await.map_err(|e| e.to_string())?;
            let Some(live) = g.as_mut() else {
                return Err("no RabbitMQ connection".into());
            };
            if !live.declared.contains(queue) {
                topology::declare(&live.channel, queue)
                    .await
                    .map_err(|e| e.to_string())?;
                live.declared.insert(queue.to_string());
            }
            live.channel.clone()
        };
        topology::publish(&channel, queue, payload, priority, id)
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes a job and returns once the broker confirmed it (persistent, durable queue).
    pub async fn publish(&self, queue: &str, payload: &[u8], priority: u8, id: &str) -> Result<(), ApiError> {
        match self.try_publish(queue, payload, priority, id).await {
            Ok(()) => Ok(()),
            Err(first) => {
                tracing::warn!(error = %first, "publish failed; reconnecting to RabbitMQ once");
                *self.state.lock().await = None;
                self.try_publish(queue, payload, priority, id)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("rabbitmq: {e}")))
            }
        }
    }

    /// Messages ready in `queue`, by a passive declare (None: no such queue, or no broker).
    pub async fn depth(&self, queue: &str) -> Option<u32> {
        let channel = {
            let g = self.live().await.ok()?;
            g.as_ref()?.conn.create_channel().await.ok()?
        };
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = channel
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await
            .ok()?;
        let _ = channel.close(200, "depth read".into()).await;
        Some(q.message_count())
    }

    /// Whether RabbitMQ answers (connecting if needed).
    pub async fn up(&self) -> bool {
        self.live().await.is_ok()
    }
}
