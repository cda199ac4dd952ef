//! RabbitMQ topology of katz, declared the same way by workers and producers (declaring is
//! idempotent when the arguments match, an error when they do not).
//!
//! ```text
//! exchange katz.jobs (direct) ──routing key = queue name──▶ queue katz.jobs.<base>
//!     x-max-priority 10, x-dead-letter-exchange katz.dlx, x-dead-letter-routing-key <queue>.dead
//! exchange katz.dlx (direct) ──<queue>.dead──▶ queue katz.jobs.<base>.dead
//! ```

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::protocol::{DEAD_EXCHANGE, JOBS_EXCHANGE, MAX_PRIORITY};

/// The dead-letter queue of a job queue.
pub fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

pub async fn connect(uri: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default()
        .with_client_property("connection_name".into(), LongString::from(name));
    Connection::connect(uri, props).await
}

/// Declares both exchanges, the job queue and its dead-letter queue.
pub async fn declare(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            JOBS_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            DEAD_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    let dead = dead_queue(queue);
    let qopts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(dead.as_str().into(), qopts, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            dead.as_str().into(),
            DEAD_EXCHANGE.into(),
            dead.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongInt(MAX_PRIORITY as i32));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(DEAD_EXCHANGE)),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dead.as_str())),
    );
    channel.queue_declare(queue.into(), qopts, args).await?;
    channel
        .queue_bind(
            queue.into(),
            JOBS_EXCHANGE.into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (negative confirm)")]
    Nacked,
}

/// Publishes a job (persistent, with priority) and waits for the broker's confirmation.
pub async fn publish(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    priority: u8,
    job_id: &str,
) -> Result<(), PublishError> {
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_priority(priority.min(MAX_PRIORITY))
        .with_message_id(job_id.into())
        .with_content_type("application/msgpack".into())
        .with_timestamp(crate::protocol::now_ms() / 1000);
    let confirm = channel
        .basic_publish(
            JOBS_EXCHANGE.into(),
            queue.into(),
            BasicPublishOptions::default(),
            payload,
            props,
        )
        .await?
        .await?;
    if confirm.is_nack() {
        return Err(PublishError::Nacked);
    }
    Ok(())
}
