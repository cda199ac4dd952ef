//! Queue-depth gauges: every few seconds, a passive declare of each queue a process consumes or
//! serves gives its ready messages and consumers (`katz_queue_messages{queue}`,
//! `katz_queue_consumers{queue}`).
//!
//! ```text
//! poll(amqp, queues, every, gauges) ── own AMQP connection ─▶ queue_declare(passive) per queue
//!     ok  ─▶ gauges.messages / gauges.consumers .set(…)
//!     404 (not declared yet) ─▶ gauge left as it was; the broker closed the channel: a new one
//!     connection lost ─▶ gauges kept, reconnect at the next period
//! ```
//!
//! A passive declare never creates a queue, so polling cannot change the topology. The task runs
//! until its runtime stops.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::metrics::{QueueGauges, QueueLabel};
use crate::redact;
use crate::topology;

/// How often `katz worker` and `katz controlnet-worker` read their queues' depth.
pub const EVERY: Duration = Duration::from_secs(5);

/// What the poller reads and where it writes.
#[derive(Clone)]
pub struct QueuePoll {
    pub amqp: String,
    /// The AMQP connection's name (as the broker shows it).
    pub name: String,
    pub queues: Vec<String>,
    pub every: Duration,
    pub gauges: QueueGauges,
}

/// Reads every queue's depth once per period, forever (until the runtime stops).
pub async fn poll(p: QueuePoll) {
    let mut conn: Option<lapin::Connection> = None;
    let mut channel: Option<lapin::Channel> = None;
    loop {
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = None;
            conn = match topology::connect(&p.amqp, &p.name).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::debug!(
                        error = %redact::error(&e, &[p.amqp.as_str()]),
                        "queue depth: cannot reach RabbitMQ"
                    );
                    None
                }
            };
        }
        if let Some(c) = &conn {
            for q in &p.queues {
                if channel.as_ref().is_none_or(|ch| !ch.status().connected()) {
                    channel = c.create_channel().await.ok();
                }
                let Some(ch) = &channel else { break };
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                match ch
                    .queue_declare(q.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    Ok(queue) => {
                        let label = QueueLabel { queue: q.clone() };
                        p.gauges
                            .messages
                            .get_or_create(&label)
                            .set(queue.message_count() as i64);
                        p.gauges
                            .consumers
                            .get_or_create(&label)
                            .set(queue.consumer_count() as i64);
                    }
                    Err(e) => {
                        // a queue nobody declared yet: the broker closes the channel (404)
                        tracing::debug!(queue = %q, error = %e, "queue depth: no answer");
                        channel = None;
                    }
                }
            }
        }
        tokio::time::sleep(p.every).await;
    }
}
