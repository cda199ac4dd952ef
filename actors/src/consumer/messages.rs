//! Messages of the JobConsumer actor.

use actix::Message;

/// Stop taking jobs, finish those in flight, ack them, close the connection, then stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;
