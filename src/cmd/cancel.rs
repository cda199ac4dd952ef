//! `katz cancel ID`: a queued job is cancelled at once (its record then expires like any ended
//! job's, after the default result TTL); a running one stops at its next step. The cancel key
//! expires after a day if no worker takes the job.

use clap::Args;
use katz_actors::protocol::{cancel_key, job_key, now_ms, DEFAULT_RESULT_TTL_S};

use super::{block_on, RedisArgs};

const CANCEL_LUA: &str = r#"
redis.call('SET', KEYS[2], '1', 'EX', 86400)
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_ms', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return st or ''
"#;

#[derive(Args, Debug, Clone)]
pub struct CancelArgs {
    pub id: String,
    #[command(flatten)]
    pub redis: RedisArgs,
}

pub fn run(a: CancelArgs) -> anyhow::Result<()> {
    block_on(async {
        let mut conn = a.redis.connect().await?;
        let before: String = redis::Script::new(CANCEL_LUA)
            .key(job_key(&a.id))
            .key(cancel_key(&a.id))
            .arg(now_ms())
            .arg(DEFAULT_RESULT_TTL_S)
            .invoke_async(&mut conn)
            .await?;
        match before.as_str() {
            "" => println!("cancel recorded for `{}` (no status yet: it will not run)", a.id),
            "queued" => println!("`{}` was queued: cancelled", a.id),
            "running" => println!("`{}` is running: it stops at its next step", a.id),
            s => println!("`{}` already ended ({s})", a.id),
        }
        Ok(())
    })
}
