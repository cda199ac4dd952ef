//! `katz status ID`: the job's record in Redis, as JSON.

use std::collections::BTreeMap;

use anyhow::bail;
use clap::Args;
use katz_actors::protocol::job_key;
use redis::AsyncCommands;

use super::{block_on, RedisArgs};

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    pub id: String,
    #[command(flatten)]
    pub redis: RedisArgs,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    block_on(async {
        let mut conn = a.redis.connect().await?;
        let rec: BTreeMap<String, String> = conn.hgetall(job_key(&a.id)).await?;
        if rec.is_empty() {
            bail!(
                "no job `{}` in Redis (never submitted, or its result TTL passed)",
                a.id
            );
        }
        println!("{}", serde_json::to_string_pretty(&rec)?);
        Ok(())
    })
}
