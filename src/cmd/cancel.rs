//! `katz cancel ID`: a queued job is cancelled at once (its record then expires like any ended
//! job's, after the default result TTL); a running one stops at its next step. The cancel key
//! expires after a day if no worker takes the job.

use clap::Args;
use katz_actors::protocol::DEFAULT_RESULT_TTL_S;

use super::{block_on, RedisArgs};

#[derive(Args, Debug, Clone)]
pub struct CancelArgs {
    pub id: String,
    #[command(flatten)]
    pub redis: RedisArgs,
}

pub fn run(a: CancelArgs) -> anyhow::Result<()> {
    block_on(async {
        let mut conn = a.redis.connect().await?;
        let before = katz_actors::producer::cancel(&mut conn, &a.id, DEFAULT_RESULT_TTL_S).await?;
        match before.as_str() {
            "" => println!("cancel recorded for `{}` (no status yet: it will not run)", a.id),
            "queued" => println!("`{}` was queued: cancelled", a.id),
            "running" => println!("`{}` is running: it stops at its next step", a.id),
            s => println!("`{}` already ended ({s})", a.id),
        }
        Ok(())
    })
}
