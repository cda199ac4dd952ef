//! Threads that outlive the jobs they run.
//!
//! ONNX Runtime's CUDA provider makes per-thread state (its library handles) the first time a
//! thread runs a session; on the H200 hosts a fresh thread cost about 0.2 s before its first
//! kernel. Work that needs a thread of its own per job (a ControlNet session overlapping the UNet
//! encoder) therefore takes one from here: an idle thread if there is one, else a new one that
//! stays for the next job.
//!
//! ```text
//! run(job) ─▶ idle sender? ─yes─▶ that thread runs job, then puts its sender back
//!                         └─no──▶ new thread (named), runs job, then waits idle
//! ```

use std::sync::{mpsc, Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A pool that grows to the number of jobs running at once and never shrinks below it.
pub struct LastingThreads {
    name: String,
    idle: Arc<Mutex<Vec<mpsc::Sender<Job>>>>,
}

impl LastingThreads {
    pub fn new(name: impl Into<String>) -> Self {
        LastingThreads {
            name: name.into(),
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Runs `job` on an idle thread, or on a new one. A panicking job is caught (its thread
    /// stays usable); report its outcome through a channel of the job's own.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut job: Job = Box::new(job);
        loop {
            let tx = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match tx {
                Some(tx) => match tx.send(job) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::SendError(j)) => job = j, // that thread is gone: try the next
                },
                None => break,
            }
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let idle = self.idle.clone();
        let n = idle.lock().map(|v| v.len()).unwrap_or(0);
        std::thread::Builder::new()
            .name(format!("{}-{n}", self.name))
            .spawn(move || {
                let mut next = Some(job);
                while let Some(job) = next.take() {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    idle.lock().unwrap_or_else(|p| p.into_inner()).push(tx.clone());
                    next = rx.recv().ok();
                }
            })?;
        Ok(())
    }

    /// Threads waiting for a job.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }
}

impl Default for LastingThreads {
    fn default() -> Self {
        LastingThreads::new("katz-lasting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn threads_are_reused_and_grow_with_concurrent_jobs() {
        let pool = LastingThreads::new("t");
        let id = |pool: &LastingThreads| {
            let (tx, rx) = mpsc::channel();
            pool.run(move || tx.send(std::thread::current().id()).unwrap())
                .unwrap();
            let t = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            // wait until the thread is back in the idle list
            for _ in 0..500 {
                if pool.idle() > 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            t
        };
        let first = id(&pool);
        assert_eq!(id(&pool), first, "a second job got a new thread");
        // two jobs at once: two threads, both kept
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        pool.run(move || {
            go_rx.recv().unwrap();
            tx.send(std::thread::current().id()).unwrap();
        })
        .unwrap();
        pool.run(move || tx2.send(std::thread::current().id()).unwrap())
            .unwrap();
        let b = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        go_tx.send(()).unwrap();
        let a = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_ne!(a, b);
        // a panic leaves the thread usable
        pool.run(|| panic!("boom")).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (tx, rx) = mpsc::channel();
        pool.run(move || tx.send(1).unwrap()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
    }
}
