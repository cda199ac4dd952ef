//! The in-memory ResultStore (embedded mode) and the Redis one (its Lua script) take the same
//! decisions: the same sequence of messages gives the same verdicts and the same records.

use std::collections::HashMap;

use actix::prelude::*;
use katz_actors::protocol::{cancel_key, job_key, Status};
use katz_actors::store::{Begin, BeginJob, CancelRequested, Finish, ResultStore};
use redis::AsyncCommands;

fn begin(id: &str, digest: &str) -> BeginJob {
    BeginJob {
        id: id.into(),
        digest: digest.into(),
        worker: "w".into(),
        total_steps: 4,
        queue_wait_ms: Some(3),
        ttl_s: 60,
    }
}

fn done(id: &str) -> Finish {
    Finish {
        id: id.into(),
        status: Status::Done,
        png: Some(vec![1, 2, 3]),
        error: None,
        fields: vec![],
        ttl_s: 60,
    }
}

/// Runs the scenario on one store; `set_cancel` marks a job's cancel key the backend's way.
async fn scenario(
    store: Addr<ResultStore>,
    ids: (&str, &str),
    set_cancel: impl AsyncFn(&str),
) -> Vec<String> {
    let (a, b) = ids;
    let mut log = Vec::new();
    let note = |what: &str, v: Begin| format!("{what}: {v:?}");
    log.push(note("first", store.send(begin(a, "d1")).await.unwrap().unwrap()));
    log.push(note(
        "redelivered while running",
        store.send(begin(a, "d1")).await.unwrap().unwrap(),
    ));
    store.send(done(a)).await.unwrap().unwrap();
    log.push(note(
        "after done",
        store.send(begin(a, "d1")).await.unwrap().unwrap(),
    ));
    let other = store.send(begin(a, "d2")).await.unwrap().unwrap();
    log.push(note("other content", other));
    set_cancel(b).await;
    log.push(format!(
        "cancel seen: {}",
        store
            .send(CancelRequested { id: b.into() })
            .await
            .unwrap()
            .unwrap()
    ));
    log.push(note(
        "cancelled before start",
        store.send(begin(b, "d3")).await.unwrap().unwrap(),
    ));
    log
}

#[test]
fn memory_and_redis_stores_decide_alike() {
    actix::System::new().block_on(async {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let (ra, rb) = (format!("twin-r-a-{n}"), format!("twin-r-b-{n}"));
        let redis_store = ResultStore::connect("redis://127.0.0.1:6379/")
            .await
            .expect("Redis on 127.0.0.1:6379");
        let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        let redis_store = redis_store.start();
        let redis_store2 = redis_store.clone();
        let r_log = scenario(redis_store, (&ra, &rb), async |id: &str| {
            let mut c = conn.clone();
            let _: () = c.set_ex(cancel_key(id), 1, 60).await.unwrap();
        })
        .await;

        let (mem_store, mem) = ResultStore::memory(None);
        let m2 = mem.clone();
        let m_log = scenario(
            mem_store.start(),
            ("twin-m-a", "twin-m-b"),
            async move |id: &str| {
                m2.lock().unwrap().blobs.insert(cancel_key(id), vec![1]);
            },
        )
        .await;
        assert_eq!(r_log, m_log);

        let mut c = conn.clone();
        let r_rec: HashMap<String, String> = c.hgetall(job_key(&ra)).await.unwrap();
        let m_rec = mem
            .lock()
            .unwrap()
            .records
            .get(&job_key("twin-m-a"))
            .cloned()
            .unwrap();
        for k in ["status", "attempts", "digest", "worker", "total", "image_key"] {
            let strip = |v: &String| v.replace(&ra, "ID").replace("twin-m-a", "ID");
            assert_eq!(r_rec.get(k).map(strip), m_rec.get(k).map(strip), "field {k}");
        }
        let r_b: String = c.hget(job_key(&rb), "status").await.unwrap();
        assert_eq!(r_b, mem.lock().unwrap().records[&job_key("twin-m-b")]["status"]);
        // a producer's `queued` record without a TTL gets one when the job starts
        let rc = format!("twin-r-c-{n}");
        let _: () = c.hset(job_key(&rc), "status", "queued").await.unwrap();
        let v = redis_store2.send(begin(&rc, "d9")).await.unwrap().unwrap();
        assert_eq!(v, Begin::Run { attempts: 1 });
        let ttl: i64 = c.ttl(job_key(&rc)).await.unwrap();
        assert!((61..=60 + 86_400).contains(&ttl), "running record: ttl {ttl}");
        let _: () = c.del(job_key(&rc)).await.unwrap();
        // a job cancelled before it started: its record expires, the cancel key is gone
        let ttl: i64 = c.ttl(job_key(&rb)).await.unwrap();
        assert!(
            (1..=60).contains(&ttl),
            "record of a job cancelled before start: ttl {ttl}"
        );
        let cancel: bool = c.exists(cancel_key(&rb)).await.unwrap();
        assert!(!cancel, "the cancel key is deleted once obeyed");
        assert!(!mem.lock().unwrap().blobs.contains_key(&cancel_key("twin-m-b")));
        let _: () = c
            .del(&[
                job_key(&ra),
                job_key(&rb),
                format!("katz:job:{ra}:image"),
                cancel_key(&rb),
            ])
            .await
            .unwrap();
    });
}
