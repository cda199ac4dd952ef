//! Messages of the JobConsumer actor.

use actix::Message;

/// Stop taking jobs, finish those in flight, ack them, close the connection, then stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// How many jobs are in flight (for tests and health checks).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct InFlight;
